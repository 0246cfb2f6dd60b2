//! A real control plane in the lab: in every master namespace of a [`Lab`] an etcd member and a
//! kube-apiserver on `:6443`, built from the Go modules pinned in `kha-lab/controlplane/`
//! (`cargo xtask setup` puts them in `target/controlplane/bin`). Nothing here imitates an
//! apiserver: `/readyz`, graceful termination, the `kubernetes` EndpointSlice and the
//! authentication answers are the real ones. The simulated masters stay for what a real
//! apiserver cannot be made to do on demand.
//!
//! Apiservers start slowly on 2 cores (tens of seconds), so a test group starts one control
//! plane and runs its scenarios against it. Every process is killed when this is dropped,
//! and the lab's namespaces go with the [`Lab`].

pub mod certs;
pub mod flags;
pub mod watch;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

pub use certs::{Files, NODE_NAME, User};

use crate::{
    Lab,
    netns::{self, KillOnDrop},
    pki::PkiError,
    topology::LabMaster,
};

/// Where the binaries are: `$KHA_CONTROLPLANE_BIN`, else `target/controlplane/bin` beside the
/// profile directory of the running binary (`target/debug/..`).
pub fn find_bins() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KHA_CONTROLPLANE_BIN") {
        return Some(PathBuf::from(d));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().map(|a| a.join("controlplane/bin")).find(|d| d.join("kube-apiserver").is_file())
}

#[derive(Debug, thiserror::Error)]
pub enum RealError {
    #[error(
        "the real control plane's binaries are not in {0}: build them with `./x setup --controlplane` (or set KHA_CONTROLPLANE_BIN)"
    )]
    NoBinaries(PathBuf),
    #[error("generating the control plane's certificates")]
    Pki(#[from] PkiError),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {what} in {netns}")]
    Spawn {
        what: String,
        netns: String,
        #[source]
        source: netns::NetnsError,
    },
    #[error("{what} did not happen within {timeout:?}; end of {}:\n{tail}", log.display())]
    Timeout { what: String, timeout: Duration, log: PathBuf, tail: String },
    #[error("{what} exited ({status}); end of {}:\n{tail}", log.display())]
    Exited { what: String, status: std::process::ExitStatus, log: PathBuf, tail: String },
    #[error("no master {0:?} in the control plane")]
    UnknownMaster(String),
}

/// How long a terminating apiserver may take after its shutdown delay. Once it stops
/// listening it waits for its open connections in `http.Server.Shutdown`, up to its request
/// timeout (`--request-timeout`, 60 s): a connection that still carries a watch keeps it
/// alive that long. Behind nginx or haproxy every watch stays on it (they never move a
/// connection), so it exits at that deadline; behind kha alone its connections are moved
/// (the refused reconnect marks it down at once) and it exits in about a second. 15 s of
/// margin beyond the deadline, for the rest of its shutdown on a busy machine.
pub const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(60 + 15);

#[derive(Debug, Clone)]
pub struct RealOptions {
    pub anonymous_auth: bool,
    pub shutdown_delay: Duration,
    /// Bound on each start (etcd quorum, apiserver `/readyz`).
    pub start_timeout: Duration,
    /// The last `standby` masters start with nothing running: no etcd member ever, and an
    /// apiserver only on [`RealControlPlane::start_apiserver`], using the first master's etcd
    /// (a master joining the cluster).
    pub standby: usize,
}

impl Default for RealOptions {
    fn default() -> Self {
        RealOptions {
            anonymous_auth: true,
            shutdown_delay: Duration::ZERO,
            start_timeout: Duration::from_secs(120),
            standby: 0,
        }
    }
}

struct Member {
    name: String,
    netns: String,
    ip: std::net::Ipv4Addr,
    dir: PathBuf,
    etcd: Option<KillOnDrop>,
    apiserver: Option<KillOnDrop>,
    /// The `--shutdown-delay-duration` the running apiserver was started with.
    shutdown_delay: Duration,
    /// A standby master has no etcd member; its apiserver uses the first master's.
    has_etcd: bool,
}

pub struct RealControlPlane {
    bins: PathBuf,
    pub files: Files,
    pub options: RealOptions,
    node_netns: String,
    dir: PathBuf,
    members: Vec<Member>,
}

impl RealControlPlane {
    /// Certificates, then an etcd member in every master namespace, then the apiservers; returns
    /// once every apiserver's `/readyz` is 200.
    pub fn start(lab: &Lab, options: RealOptions) -> Result<Self, RealError> {
        let bins =
            find_bins().ok_or_else(|| RealError::NoBinaries(PathBuf::from("target/controlplane/bin")))?;
        if !bins.join("kube-apiserver").is_file() {
            return Err(RealError::NoBinaries(bins));
        }
        let dir = lab.workdir().join("real");
        let files = certs::generate(&lab.identities(), &dir.join("pki"))?;
        let members = lab.masters().iter().map(|m| member(m, &dir)).collect::<Result<_, _>>()?;
        let mut cp =
            RealControlPlane { bins, files, options, node_netns: lab.node_netns().to_owned(), dir, members };
        let names = cp.names();
        let running = names.len().saturating_sub(cp.options.standby);
        for m in &mut cp.members[running..] {
            m.has_etcd = false;
        }
        let names = &names[..running];
        for n in names {
            cp.start_etcd(n)?;
        }
        let delay = cp.options.shutdown_delay;
        for n in names {
            cp.spawn_apiserver(n, delay)?;
        }
        for n in names {
            cp.wait_ready(n)?;
        }
        Ok(cp)
    }

    pub fn names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    /// A kubeconfig file for `user` against `server`, written under the control plane's dir.
    pub fn kubeconfig(
        &self,
        file: &str,
        user: User,
        server: &str,
        sni: Option<&str>,
    ) -> Result<PathBuf, RealError> {
        Ok(self.files.write_kubeconfig(&self.dir.join(file), user, server, sni)?)
    }

    pub fn apiserver_log(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("apiserver.log")
    }

    pub fn apiserver_pid(&self, name: &str) -> Option<u32> {
        self.members.iter().find(|m| m.name == name)?.apiserver.as_ref().map(|c| c.id())
    }

    pub fn etcd_running(&self, name: &str) -> bool {
        self.member(name).is_ok_and(|m| m.etcd.is_some())
    }

    pub fn start_etcd(&mut self, name: &str) -> Result<(), RealError> {
        let all: Vec<_> = self
            .members
            .iter()
            .filter(|m| m.has_etcd)
            .map(|m| (m.name.clone(), m.ip, m.dir.join("etcd")))
            .collect();
        let peers: Vec<flags::EtcdMember> =
            all.iter().map(|(n, ip, d)| flags::EtcdMember { name: n, ip: *ip, data_dir: d }).collect();
        let me =
            peers.iter().find(|p| p.name == name).ok_or_else(|| RealError::UnknownMaster(name.into()))?;
        let args = flags::etcd(me, &peers);
        let child = self.spawn(name, "etcd", &args)?;
        self.member_mut(name)?.etcd = Some(child);
        Ok(())
    }

    /// SIGKILL of the master's etcd member: its apiserver stays up, its `/readyz` fails.
    pub fn kill_etcd(&mut self, name: &str) -> Result<(), RealError> {
        drop(self.member_mut(name)?.etcd.take());
        Ok(())
    }

    /// Starts the master's apiserver with `shutdown_delay` and waits for its `/readyz`.
    pub fn start_apiserver(&mut self, name: &str, shutdown_delay: Duration) -> Result<(), RealError> {
        self.spawn_apiserver(name, shutdown_delay)?;
        self.wait_ready(name)
    }

    fn spawn_apiserver(&mut self, name: &str, shutdown_delay: Duration) -> Result<(), RealError> {
        let m = self.member(name)?;
        let f = &self.files;
        let cert = f.pki.master(name).ok_or_else(|| RealError::UnknownMaster(name.into()))?;
        let etcd = if m.has_etcd { std::net::Ipv4Addr::LOCALHOST } else { self.members[0].ip };
        let args = flags::apiserver(&flags::Apiserver {
            advertise: m.ip,
            etcd,
            dir: &m.dir,
            ca: &f.pki.ca_cert,
            cert: &cert.cert,
            key: &cert.key,
            service_account_key: &f.service_account_key,
            service_account_pub: &f.service_account_pub,
            anonymous_auth: self.options.anonymous_auth,
            shutdown_delay,
        });
        let child = self.spawn(name, "kube-apiserver", &args)?;
        let m = self.member_mut(name)?;
        m.apiserver = Some(child);
        m.shutdown_delay = shutdown_delay;
        Ok(())
    }

    /// SIGKILL: the process is gone at once, its kernel answers new connects with a reset.
    pub fn kill_apiserver(&mut self, name: &str) -> Result<(), RealError> {
        drop(self.member_mut(name)?.apiserver.take());
        Ok(())
    }

    /// SIGTERM, the graceful termination a kubelet or systemd gives it; returns when the
    /// process has exited, bounded by its shutdown delay and [`SHUTDOWN_DRAIN_MAX`].
    pub fn terminate_apiserver(&mut self, name: &str) -> Result<Duration, RealError> {
        let log = self.apiserver_log(name);
        let m = self.member_mut(name)?;
        let bound = m.shutdown_delay + SHUTDOWN_DRAIN_MAX;
        let Some(mut child) = m.apiserver.take() else { return Ok(Duration::ZERO) };
        let started = Instant::now();
        // SAFETY: our own child's pid (a second SIGTERM after `sigterm_apiserver` is harmless).
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        while started.elapsed() < bound {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(RealError::Timeout {
            what: format!("{name}'s apiserver to exit after SIGTERM"),
            timeout: bound,
            tail: tail(&log),
            log,
        })
    }

    /// SIGSTOP (`stop`) or SIGCONT: a hung apiserver whose kernel still accepts connections.
    pub fn freeze_apiserver(&self, name: &str, stop: bool) -> Result<(), RealError> {
        let pid = self
            .apiserver_pid(name)
            .ok_or_else(|| RealError::UnknownMaster(format!("{name} (no apiserver running)")))?;
        // SAFETY: our own child's pid, not yet reaped.
        unsafe { libc::kill(pid as i32, if stop { libc::SIGSTOP } else { libc::SIGCONT }) };
        Ok(())
    }

    /// SIGTERM without waiting: the graceful termination runs while the caller watches; end it
    /// with [`RealControlPlane::terminate_apiserver`].
    pub fn sigterm_apiserver(&self, name: &str) -> Result<(), RealError> {
        if let Some(pid) = self.apiserver_pid(name) {
            // SAFETY: our own child's pid, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        Ok(())
    }

    /// Polls the apiserver's `/readyz` directly (not through kha) with the admin identity.
    pub fn wait_ready(&mut self, name: &str) -> Result<(), RealError> {
        let timeout = self.options.start_timeout;
        let started = Instant::now();
        let log = self.apiserver_log(name);
        let m = self.member(name)?;
        let kubeconfig = self.kubeconfig(
            &format!("admin-{name}.kubeconfig"),
            User::Admin,
            &format!("https://{}:6443", m.ip),
            None,
        )?;
        loop {
            if let Some(status) =
                self.member_mut(name)?.apiserver.as_mut().and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(RealError::Exited {
                    what: format!("{name}'s apiserver"),
                    status,
                    tail: tail(&log),
                    log,
                });
            }
            if self.kubectl(&kubeconfig, &["get", "--raw", "/readyz"]).is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(RealError::Timeout {
                    what: format!("{name}'s /readyz = 200"),
                    timeout,
                    tail: tail(&log),
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `kubectl ARGS` in the node namespace, outside kha's cgroup (so it is never balanced).
    pub fn kubectl(&self, kubeconfig: &Path, args: &[&str]) -> std::io::Result<std::process::Output> {
        let mut c = Command::new(self.bin("kubectl"));
        c.arg("--kubeconfig").arg(kubeconfig).args(args).arg("--request-timeout=5s");
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = netns::spawn_in(&self.node_netns, None, c).map_err(std::io::Error::other)?;
        child.wait_with_output()
    }

    fn spawn(&self, name: &str, program: &str, args: &[String]) -> Result<KillOnDrop, RealError> {
        let m = self.member(name)?;
        let log_path = m.dir.join(format!("{}.log", program.trim_start_matches("kube-")));
        let open = || {
            fs::File::options().create(true).append(true).open(&log_path).map_err(|source| RealError::Io {
                what: "opening log",
                path: log_path.clone(),
                source,
            })
        };
        let mut c = Command::new(self.bin(program));
        c.args(args).stdin(Stdio::null()).stdout(open()?).stderr(open()?);
        let child = netns::spawn_in(&m.netns, None, c).map_err(|source| RealError::Spawn {
            what: program.into(),
            netns: m.netns.clone(),
            source,
        })?;
        Ok(KillOnDrop(child))
    }

    fn member(&self, name: &str) -> Result<&Member, RealError> {
        self.members.iter().find(|m| m.name == name).ok_or_else(|| RealError::UnknownMaster(name.into()))
    }

    fn member_mut(&mut self, name: &str) -> Result<&mut Member, RealError> {
        self.members.iter_mut().find(|m| m.name == name).ok_or_else(|| RealError::UnknownMaster(name.into()))
    }
}

impl Drop for RealControlPlane {
    fn drop(&mut self) {
        // Apiservers first: an apiserver whose etcd vanished logs for a while before exiting.
        for m in &mut self.members {
            drop(m.apiserver.take());
        }
        for m in &mut self.members {
            drop(m.etcd.take());
        }
    }
}

fn member(m: &LabMaster, dir: &Path) -> Result<Member, RealError> {
    let dir = dir.join(&m.name);
    fs::create_dir_all(&dir).map_err(|source| RealError::Io {
        what: "creating",
        path: dir.clone(),
        source,
    })?;
    Ok(Member {
        name: m.name.clone(),
        netns: m.netns.clone(),
        ip: m.ipv4,
        dir,
        etcd: None,
        apiserver: None,
        shutdown_delay: Duration::ZERO,
        has_etcd: true,
    })
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
