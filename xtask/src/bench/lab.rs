//! The bench's world: the test bed (3 masters, node namespace, kha's cgroup and agent),
//! extra identity listeners on the masters for the scaling figures, and the two proxies.
//!
//! Addresses (all inside the lab's namespaces):
//!
//! | service                     | direct                      | kha (in its cgroup) | nginx           | haproxy         |
//! |-----------------------------|-----------------------------|---------------------|-----------------|-----------------|
//! | apiserver (TLS)             | 192.0.2.1{1,2,3}:6443       | 127.0.0.1:6443      | 127.0.0.1:16443 | 127.0.0.1:26443 |
//! | identity (`<name>\n`)       | 192.0.2.1{1,2,3}:7000       | 127.0.0.1:7000      | 127.0.0.1:17000 | 127.0.0.1:27000 |
//! | scaling frontend g (0..=34) | its backends                | 127.0.0.1:8000+g    | 127.0.0.1:18000+g | 127.0.0.1:28000+g |
//!
//! Scaling backends are identity listeners on ports 7101..=7122 of each master, served by
//! a second `kha-lab master` process per master namespace. Backend k of a frontend is on
//! master `k % 3 + 1`, port `7101 + k / 3` (64 backends use ports up to 7122).

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::{bed::Bed, netns, netns::KillOnDrop};

use super::{
    figures::{Contender, Lb, POLICIES, ScaleShape, scale_shapes},
    proxy::{Proxy, Upstream},
};

const MASTERS: usize = 3;
const SINK_FIRST_PORT: u16 = 7101;
const SINK_PORTS: u16 = 22;
const KHA_SCALE_BASE: u16 = 8000;
const NGINX_BASE: u16 = 10000;
const HAPROXY_BASE: u16 = 20000;

fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// One scaling case: its shape and the backends of each of its frontends.
#[derive(Debug, Clone)]
pub struct ScaleCase {
    pub shape: ScaleShape,
    /// Global index of its first frontend (listener ports are based on it).
    pub first: u16,
    pub backends: Vec<Vec<SocketAddr>>,
}

fn sink(master: usize, port_index: u16) -> SocketAddr {
    SocketAddr::from((kha_lab::topology::master_v4(master), SINK_FIRST_PORT + port_index))
}

pub fn scale_cases() -> Vec<ScaleCase> {
    let mut first = 0u16;
    scale_shapes()
        .into_iter()
        .map(|shape| {
            let backends: Vec<Vec<SocketAddr>> = (0..shape.frontends)
                .map(|j| {
                    (0..shape.backends)
                        .map(|k| {
                            // One frontend: spread its backends over masters and ports. Many
                            // frontends: each gets its own port on every master.
                            if shape.frontends == 1 {
                                sink(k % MASTERS + 1, (k / MASTERS) as u16)
                            } else {
                                sink(k % MASTERS + 1, j as u16 % SINK_PORTS)
                            }
                        })
                        .collect()
                })
                .collect();
            let case = ScaleCase { shape, first, backends };
            first += case.backends.len() as u16;
            case
        })
        .collect()
}

/// What kha's agent is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KhaConfig {
    /// 127.0.0.1:6443 and 127.0.0.1:7000, each over the 3 masters.
    Main,
    /// Only the frontends of scaling case i.
    Scale(usize),
}

/// Which service of the lab a load goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Https,
    Ident,
    /// The masters' identity ports themselves, whoever the contender is (kha's client then
    /// dials addresses that are not frontends: the hook's miss path).
    MastersIdent,
    Scale(usize),
}

/// What the `kha` binary under test supports, from `kha run --help`: the bench runs the
/// committed agent as well as one that has grown policies and health checks.
#[derive(Debug, Clone, Copy, Default)]
pub struct AgentCaps {
    /// `policy` per frontend in the config file.
    pub policy: bool,
    /// Health checks (`--ca-file`, `--no-health-checks`).
    pub health: bool,
    pub metrics_addr: bool,
    pub health_addr: bool,
}

impl AgentCaps {
    fn probe(kha: &std::path::Path) -> AgentCaps {
        let help = Command::new(kha)
            .args(["run", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        AgentCaps {
            policy: help.contains("--policy"),
            health: help.contains("--no-health-checks") && help.contains("--ca-file"),
            metrics_addr: help.contains("--metrics-addr"),
            health_addr: help.contains("--health-addr"),
        }
    }
}

pub struct BenchLab {
    // Dropped in this order: proxies, scaling listeners, then the bed (agent, pins, lab).
    pub nginx: Proxy,
    pub haproxy: Proxy,
    _sinks: Vec<KillOnDrop>,
    pub bed: Bed,
    pub cases: Vec<ScaleCase>,
    pub dir: PathBuf,
    pub caps: AgentCaps,
    kha_config: Option<(KhaConfig, String)>,
}

impl BenchLab {
    pub fn create() -> Result<BenchLab> {
        let bed = Bed::create(MASTERS).context("building the lab")?;
        let dir = bed.lab.workdir().join("bench");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        tune_node(bed.lab.node_netns())?;
        let sinks = start_sinks(&bed, &dir)?;
        let cases = scale_cases();
        let mut lab = BenchLab {
            nginx: Proxy::start_nginx(bed.lab.node_netns(), &dir, &upstreams(&bed, &cases, NGINX_BASE))?,
            haproxy: Proxy::start_haproxy(
                bed.lab.node_netns(),
                &dir,
                &upstreams(&bed, &cases, HAPROXY_BASE),
            )?,
            _sinks: sinks,
            bed,
            cases,
            dir,
            caps: AgentCaps::default(),
            kha_config: None,
        };
        lab.caps = AgentCaps::probe(&lab.bed.kha_bin);
        lab.write_kha_config(KhaConfig::Main)?;
        let args = lab.agent_args(KhaConfig::Main);
        lab.bed.start_agent(&args).context("starting kha")?;
        lab.set_kha(KhaConfig::Main)?;
        Ok(lab)
    }

    /// `kha run` flags besides the bed's own. Health checks are off: the identity-port
    /// backends are plain TCP, which a TLS `/readyz` probe takes for dead (kha has no probe
    /// port per backend, as haproxy's `check port`). Probes are the agent's work, off the
    /// data path; they would add a few TLS handshakes a second to the agent's CPU.
    fn agent_args(&self, _which: KhaConfig) -> Vec<String> {
        let mut a = vec!["--config".to_owned(), self.kha_config_path().display().to_string()];
        if self.caps.health {
            a.push("--no-health-checks".into());
        }
        // Nothing listens besides the datapath: the bench runs beside other labs.
        if self.caps.metrics_addr {
            a.extend(["--metrics-addr".into(), "none".into()]);
        }
        if self.caps.health_addr {
            a.extend(["--health-addr".into(), "none".into()]);
        }
        a
    }

    fn kha_config_path(&self) -> PathBuf {
        self.dir.join("kha.toml")
    }

    fn masters(&self, port: u16) -> Vec<SocketAddr> {
        masters(&self.bed, port)
    }

    fn kha_frontends(&self, which: KhaConfig) -> Vec<(SocketAddr, Vec<SocketAddr>)> {
        match which {
            KhaConfig::Main => {
                vec![(localhost(6443), self.masters(6443)), (localhost(7000), self.masters(7000))]
            }
            KhaConfig::Scale(i) => {
                let c = &self.cases[i];
                c.backends
                    .iter()
                    .enumerate()
                    .map(|(j, b)| (localhost(KHA_SCALE_BASE + c.first + j as u16), b.clone()))
                    .collect()
            }
        }
    }

    fn write_kha_config(&mut self, which: KhaConfig) -> Result<String> {
        // The policy is written out when the agent knows policies (see figures::POLICIES).
        let text = kha_toml(&self.kha_frontends(which), self.caps.policy.then_some(POLICIES[0]));
        fs::write(self.kha_config_path(), &text).context("writing kha's config")?;
        Ok(text)
    }

    /// Switches kha to `which`: SIGHUP, or a restart when the agent's flags change (health
    /// checks on or off); then waits until `kha status` shows exactly it, every backend
    /// serving.
    pub fn set_kha(&mut self, which: KhaConfig) -> Result<()> {
        if self.kha_config.as_ref().is_some_and(|(w, _)| *w == which) {
            return Ok(());
        }
        let text = self.write_kha_config(which)?;
        let flags_change =
            self.kha_config.as_ref().is_some_and(|(w, _)| self.agent_args(*w) != self.agent_args(which));
        if flags_change {
            self.bed.stop_agent(libc::SIGTERM).context("stopping kha")?;
            let args = self.agent_args(which);
            self.bed.start_agent(&args).context("restarting kha")?;
        } else {
            let pid = self.bed.agent_pid().context("kha's agent is not running")?;
            // SAFETY: our own child's pid (the bed holds it unreaped).
            unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        }
        let want: BTreeSet<(String, usize)> =
            self.kha_frontends(which).iter().map(|(f, b)| (f.to_string(), b.len())).collect();
        // Probed backends start unknown and come up after `rise` probes.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.bed.status().unwrap_or_default();
            let fronts = status["frontends"].as_array().cloned().unwrap_or_default();
            let have: BTreeSet<(String, usize)> = fronts
                .iter()
                .map(|f| {
                    (
                        f["address"].as_str().unwrap_or("").to_owned(),
                        f["backends"].as_array().map_or(0, Vec::len),
                    )
                })
                .collect();
            let serving = fronts
                .iter()
                .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
                .all(|b| !matches!(b["state"].as_str(), Some("down" | "unknown" | "draining")));
            if have == want && serving {
                self.kha_config = Some((which, text));
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kha did not apply {which:?} within 30 s; status:\n{status:#}\nagent log:\n{}",
                    self.bed.agent_log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where `c`'s client dials for `service`.
    pub fn targets(&self, c: &Contender, service: Service) -> Vec<SocketAddr> {
        let (https, ident) = match c.lb {
            Lb::None => {
                let (mut h, mut i) = (self.masters(6443), self.masters(7000));
                if c.single_master {
                    h.truncate(1);
                    i.truncate(1);
                }
                (h, i)
            }
            Lb::Kha => (vec![localhost(6443)], vec![localhost(7000)]),
            Lb::Nginx => (vec![localhost(NGINX_BASE + 6443)], vec![localhost(NGINX_BASE + 7000)]),
            Lb::Haproxy => (vec![localhost(HAPROXY_BASE + 6443)], vec![localhost(HAPROXY_BASE + 7000)]),
        };
        match service {
            Service::Https => https,
            Service::Ident => ident,
            Service::MastersIdent => self.masters(7000),
            Service::Scale(i) => {
                let case = &self.cases[i];
                let fronts = |base: u16| {
                    (0..case.backends.len() as u16).map(|j| localhost(base + case.first + j)).collect()
                };
                match c.lb {
                    Lb::None => {
                        let all: BTreeSet<SocketAddr> = case.backends.iter().flatten().copied().collect();
                        all.into_iter().collect()
                    }
                    Lb::Kha => fronts(KHA_SCALE_BASE),
                    Lb::Nginx => fronts(NGINX_BASE + KHA_SCALE_BASE),
                    Lb::Haproxy => fronts(HAPROXY_BASE + KHA_SCALE_BASE),
                }
            }
        }
    }

    pub fn proxy(&self, lb: Lb) -> Option<&Proxy> {
        match lb {
            Lb::Nginx => Some(&self.nginx),
            Lb::Haproxy => Some(&self.haproxy),
            _ => None,
        }
    }

    /// Both proxies still run (one that died would void its figures).
    pub fn check_proxies(&mut self) -> Result<()> {
        for p in [&mut self.nginx, &mut self.haproxy] {
            if !p.running() {
                bail!("{} exited during the bench; its log: {}", p.name, p.log.display());
            }
        }
        Ok(())
    }
}

fn masters(bed: &Bed, port: u16) -> Vec<SocketAddr> {
    bed.lab.masters().iter().map(|m| SocketAddr::from((m.ipv4, port))).collect()
}

/// kha's config file; `policy` only for an agent that knows policies.
pub fn kha_toml(frontends: &[(SocketAddr, Vec<SocketAddr>)], policy: Option<&str>) -> String {
    let mut t = String::new();
    for (f, backends) in frontends {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        let _ = writeln!(t, "[[frontend]]\naddress = \"{f}\"\nbackends = [{}]", list.join(", "));
        if let Some(p) = policy {
            let _ = writeln!(t, "policy = \"{p}\"");
        }
        t.push('\n');
    }
    t
}

/// The proxies' services: the apiserver, the identity port, every scaling frontend.
fn upstreams(bed: &Bed, cases: &[ScaleCase], base: u16) -> Vec<Upstream> {
    let mut v = vec![
        Upstream {
            name: "kube_apiserver".into(),
            listen: localhost(base + 6443),
            servers: masters(bed, 6443),
            check_port: None,
        },
        Upstream {
            name: "ident".into(),
            listen: localhost(base + 7000),
            servers: masters(bed, 7000),
            check_port: Some(6443),
        },
    ];
    for c in cases {
        for (j, servers) in c.backends.iter().enumerate() {
            let g = c.first + j as u16;
            v.push(Upstream {
                name: format!("scale{g}"),
                listen: localhost(base + KHA_SCALE_BASE + g),
                servers: servers.clone(),
                check_port: Some(6443),
            });
        }
    }
    v
}

/// The node namespace only (these sysctls are per namespace): a wider ephemeral port range,
/// above every port the bench listens on, and TIME_WAIT reuse, so that tens of thousands of
/// short connections per round do not run out of ports.
fn tune_node(node: &str) -> Result<()> {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        node,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=30000 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ]);
    crate::cmd::status(c).context("tuning the node namespace")
}

/// A second `kha-lab master` per master namespace with the scaling identity ports.
fn start_sinks(bed: &Bed, dir: &std::path::Path) -> Result<Vec<KillOnDrop>> {
    let mut sinks = Vec::new();
    let mut ready = Vec::new();
    for m in bed.lab.masters() {
        let paths = bed.pki.master(&m.name).with_context(|| format!("no certificate for {}", m.name))?;
        let ready_file = dir.join(format!("sink-{}.ready", m.name));
        let log = fs::File::create(dir.join(format!("sink-{}.log", m.name)))?;
        let mut c = Command::new(&bed.lab_bin);
        c.args(["master", "--name", &m.name, "--listen"]).arg(SocketAddr::from((m.ipv4, 0)).to_string());
        for p in 0..SINK_PORTS {
            c.arg("--ident-listen").arg(SocketAddr::from((m.ipv4, SINK_FIRST_PORT + p)).to_string());
        }
        c.arg("--cert").arg(&paths.cert).arg("--key").arg(&paths.key).arg("--ready-file").arg(&ready_file);
        c.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        sinks.push(KillOnDrop(netns::spawn_in(&m.netns, None, c).context("starting a scaling listener")?));
        ready.push(ready_file);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ready.iter().all(|f| fs::read_to_string(f).is_ok_and(|s| s.starts_with("ready"))) {
        for s in &mut sinks {
            if let Ok(Some(st)) = s.try_wait() {
                bail!("a scaling listener exited at start ({st}); logs in {}", dir.display());
            }
        }
        if Instant::now() > deadline {
            bail!("scaling listeners not ready after 15 s; logs in {}", dir.display());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(sinks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_cases_have_distinct_backends_on_existing_ports() {
        let cases = scale_cases();
        assert_eq!(cases.iter().map(|c| c.backends.len()).sum::<usize>(), 35);
        for c in &cases {
            for b in &c.backends {
                assert_eq!(b.len(), c.shape.backends);
                let distinct: BTreeSet<_> = b.iter().collect();
                assert_eq!(distinct.len(), b.len(), "{}", c.shape.id);
                assert!(
                    b.iter().all(|a| (SINK_FIRST_PORT..SINK_FIRST_PORT + SINK_PORTS).contains(&a.port()))
                );
            }
        }
        assert_eq!(cases[3].first, 3);
    }

    #[test]
    fn kha_toml_lists_each_frontend() {
        let f = [(localhost(6443), vec!["192.0.2.11:6443".parse().unwrap()])];
        assert_eq!(
            kha_toml(&f, None),
            "[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [\"192.0.2.11:6443\"]\n\n"
        );
        assert!(
            kha_toml(&f, Some("random")).contains("backends = [\"192.0.2.11:6443\"]\npolicy = \"random\"\n")
        );
    }
}
