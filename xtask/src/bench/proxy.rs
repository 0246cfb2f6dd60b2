//! The userspace proxies kha replaces, configured as kubespray configures them, run by the
//! bench itself: Debian's nginx (stream proxy, kubespray's `nginx-proxy`) and haproxy
//! (kubespray's haproxy option). Each runs in the lab's node namespace, outside kha's
//! cgroup (so its upstream connects are not rewritten), from a config file in the bench's
//! temp dir, in the foreground; the bench kills exactly the processes it started.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::netns;

use super::procfs;

/// kubespray's templates, with what the bench changes (see `docs/benchmarks.md`):
/// roles/kubernetes/node/templates/loadbalancer/{nginx.conf.j2,haproxy.cfg.j2}.
const PACKAGES: [&str; 3] = ["nginx", "libnginx-mod-stream", "haproxy"];
const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// One proxied service: a localhost listener and the servers behind it.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub listen: SocketAddr,
    pub servers: Vec<SocketAddr>,
    /// haproxy health-check port when the servers' own port speaks no TLS (identity ports):
    /// the check then goes to the master's apiserver port on the same address.
    pub check_port: Option<u16>,
}

/// Installs nginx, its stream module and haproxy from Debian when missing, their system
/// services kept from starting.
pub fn ensure_installed() -> Result<()> {
    crate::setup::debian_packages("the bench's proxies", &PACKAGES, "about 30 s")
}

/// kubespray's nginx.conf.j2 `stream {}` part, one `upstream`/`server` pair per service;
/// the process settings as kubespray's (2 workers, epoll, multi_accept); `daemon off` and
/// paths in `dir` so that the bench runs and stops it. The `http {}` block (a health
/// endpoint for the node) is left out.
pub fn nginx_conf(dir: &Path, upstreams: &[Upstream]) -> String {
    let mut c = String::new();
    if Path::new(NGINX_STREAM_MODULE).exists() {
        // Debian builds the stream module as a dynamic module, loaded by
        // /etc/nginx/modules-enabled only from its own nginx.conf.
        let _ = writeln!(c, "load_module {NGINX_STREAM_MODULE};");
    }
    let _ = write!(
        c,
        "error_log stderr notice;\n\
         pid {pid};\n\
         daemon off;\n\
         worker_processes 2;\n\
         worker_rlimit_nofile 130048;\n\
         worker_shutdown_timeout 10s;\n\n\
         events {{\n  multi_accept on;\n  use epoll;\n  worker_connections 16384;\n}}\n\n\
         stream {{\n",
        pid = dir.join("nginx.pid").display()
    );
    for u in upstreams {
        let _ = writeln!(c, "  upstream {} {{\n    least_conn;", u.name);
        for s in &u.servers {
            let _ = writeln!(c, "    server {s};");
        }
        let _ = write!(
            c,
            "  }}\n\n  server {{\n    listen        {};\n    proxy_pass    {};\n    proxy_timeout 10m;\n    proxy_connect_timeout 1s;\n  }}\n\n",
            u.listen, u.name
        );
    }
    c.push_str("}\n");
    c
}

/// kubespray's haproxy.cfg.j2 with one frontend/backend pair per service. Logging goes to
/// 127.0.0.1 syslog as in kubespray (in the node namespace nothing listens there).
pub fn haproxy_cfg(upstreams: &[Upstream]) -> String {
    let mut c = String::from(
        "global\n    maxconn                 4000\n    log                     127.0.0.1 local0\n\n\
         defaults\n    mode                    http\n    log                     global\n    option                  httplog\n\
         \x20   option                  dontlognull\n    option                  http-server-close\n    option                  redispatch\n\
         \x20   retries                 5\n    timeout http-request    5m\n    timeout queue           5m\n    timeout connect         30s\n\
         \x20   timeout client          15m\n    timeout server          15m\n    timeout http-keep-alive 30s\n    timeout check           30s\n\
         \x20   maxconn                 4000\n\n",
    );
    for u in upstreams {
        let _ = write!(
            c,
            "frontend {n}_frontend\n  bind {listen}\n  mode tcp\n  option tcplog\n  default_backend {n}_backend\n\n\
             backend {n}_backend\n  mode tcp\n  balance leastconn\n  default-server inter 15s downinter 15s rise 2 fall 2 slowstart 60s maxconn 1000 maxqueue 256 weight 100\n\
             \x20 option httpchk GET /healthz\n  http-check expect status 200\n",
            n = u.name,
            listen = u.listen
        );
        for (i, s) in u.servers.iter().enumerate() {
            let port = u.check_port.map(|p| format!(" port {p}")).unwrap_or_default();
            let _ = writeln!(c, "  server s{i} {s} check{port} check-ssl verify none");
        }
        c.push('\n');
    }
    c
}

/// A running proxy: our child, plus (nginx) its workers, which we record with their start
/// times so that we never signal a pid the system has since given to someone else.
pub struct Proxy {
    pub name: &'static str,
    child: Option<Child>,
    workers: Vec<(u32, u64)>,
    pub log: PathBuf,
}

impl Proxy {
    pub fn start_nginx(node_netns: &str, dir: &Path, upstreams: &[Upstream]) -> Result<Proxy> {
        let conf = dir.join("nginx.conf");
        fs::write(&conf, nginx_conf(dir, upstreams))
            .with_context(|| format!("writing {}", conf.display()))?;
        let mut c = Command::new("nginx");
        c.arg("-p").arg(dir).arg("-c").arg(&conf).arg("-e").arg(dir.join("nginx-error.log"));
        Self::spawn("nginx", node_netns, dir, c, upstreams)
    }

    pub fn start_haproxy(node_netns: &str, dir: &Path, upstreams: &[Upstream]) -> Result<Proxy> {
        let cfg = dir.join("haproxy.cfg");
        fs::write(&cfg, haproxy_cfg(upstreams)).with_context(|| format!("writing {}", cfg.display()))?;
        let mut check = Command::new("haproxy");
        check.arg("-c").arg("-q").arg("-f").arg(&cfg);
        crate::cmd::status(check).context("haproxy rejected the generated config")?;
        let mut c = Command::new("haproxy");
        // -db: stay in the foreground, one process (threads: one per CPU, haproxy's default).
        c.arg("-db").arg("-f").arg(&cfg);
        Self::spawn("haproxy", node_netns, dir, c, upstreams)
    }

    fn spawn(
        name: &'static str,
        node_netns: &str,
        dir: &Path,
        mut c: Command,
        upstreams: &[Upstream],
    ) -> Result<Proxy> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        c.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = netns::spawn_in(node_netns, None, c).with_context(|| format!("starting {name}"))?;
        let mut p = Proxy { name, child: Some(child), workers: Vec::new(), log };
        let listens: Vec<SocketAddr> = upstreams.iter().map(|u| u.listen).collect();
        p.wait_listening(node_netns, &listens)?;
        if name == "nginx" {
            p.find_workers(2)?;
        }
        Ok(p)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_listening(&mut self, node_netns: &str, addrs: &[SocketAddr]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                bail!("{} exited ({st}) at start; its log:\n{}", self.name, self.log_text());
            }
            let addrs = addrs.to_vec();
            let up = netns::run_in(node_netns, move || {
                addrs
                    .iter()
                    .all(|a| std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
            })?;
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} does not listen on all of its addresses after 15 s; its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn find_workers(&mut self, want: usize) -> Result<()> {
        let master = self.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let w: Vec<(u32, u64)> = procfs::children(master)
                .into_iter()
                .filter_map(|p| Some((p, procfs::start_time(p)?)))
                .collect();
            if w.len() >= want {
                self.workers = w;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} started {} of {want} workers", self.name, w.len());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Every process of this proxy that still runs.
    pub fn pids(&self) -> Vec<u32> {
        let mut v = vec![self.pid()];
        v.extend(self.workers.iter().filter(|(p, st)| procfs::start_time(*p) == Some(*st)).map(|(p, _)| *p));
        v.retain(|&p| p != 0);
        v
    }

    pub fn cpu_ns(&self) -> u64 {
        self.pids().into_iter().filter_map(procfs::cpu_ns).sum()
    }

    pub fn rss_bytes(&self) -> u64 {
        self.pids().into_iter().filter_map(procfs::rss_bytes).sum()
    }

    /// Whether the main process is still running (a proxy that died makes its figures void).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM (fast shutdown for both), bounded wait, then SIGKILL for what is left.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: our own unreaped child: the pid cannot have been reused.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        for &(pid, st) in &self.workers {
            if procfs::start_time(pid) == Some(st) {
                // SAFETY: the pid still names the worker we recorded (same start time).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ups() -> Vec<Upstream> {
        vec![Upstream {
            name: "kube_apiserver".into(),
            listen: "127.0.0.1:16443".parse().unwrap(),
            servers: vec!["192.0.2.11:6443".parse().unwrap(), "192.0.2.12:6443".parse().unwrap()],
            check_port: None,
        }]
    }

    #[test]
    fn nginx_conf_is_kubesprays_stream_proxy() {
        let c = nginx_conf(Path::new("/tmp/x"), &ups());
        for want in [
            "worker_processes 2;",
            "least_conn;",
            "server 192.0.2.12:6443;",
            "listen        127.0.0.1:16443;",
            "proxy_timeout 10m;",
            "proxy_connect_timeout 1s;",
            "daemon off;",
            "pid /tmp/x/nginx.pid;",
        ] {
            assert!(c.contains(want), "{want} missing in\n{c}");
        }
    }

    #[test]
    fn haproxy_cfg_is_kubesprays_tcp_mode() {
        let mut u = ups();
        u[0].check_port = Some(6443);
        let c = haproxy_cfg(&u);
        for want in [
            "mode tcp",
            "balance leastconn",
            "option httpchk GET /healthz",
            "http-check expect status 200",
            "default-server inter 15s downinter 15s rise 2 fall 2 slowstart 60s maxconn 1000 maxqueue 256 weight 100",
            "server s1 192.0.2.12:6443 check port 6443 check-ssl verify none",
            "bind 127.0.0.1:16443",
            "timeout connect         30s",
        ] {
            assert!(c.contains(want), "{want} missing in\n{c}");
        }
    }
}
