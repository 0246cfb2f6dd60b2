//! The world the scenarios share: a bed with empty master namespaces, the real control plane
//! in them, kha in front, and the real clients (kubectl, kha-watch) on the node.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use kha_lab::{
    bed::Bed,
    real::{RealControlPlane, RealOptions, User, watch::Watcher},
};

pub struct World {
    pub cp: RealControlPlane,
    pub bed: Bed,
    /// Node identity through kha's IPv4 and IPv6 frontends, verifying the name `localhost`.
    pub node_v4: PathBuf,
    pub node_v6: PathBuf,
    /// Admin identity through kha's IPv4 frontend (watchers need to list configmaps).
    pub admin_v4: PathBuf,
    /// How many masters (the first ones) kha is given as static backends.
    bootstrap: usize,
    agent_extra: Vec<String>,
}

/// How the world's kha runs, besides the usual flags.
#[derive(Default)]
pub struct AgentSetup {
    pub extra: Vec<String>,
    /// In the node's network namespace, as a DaemonSet with hostNetwork does (discovery's API
    /// client must reach the masters from there), instead of the bed's place for it.
    pub in_node: bool,
}

impl World {
    pub fn start() -> World {
        let options = RealOptions { anonymous_auth: false, ..RealOptions::default() };
        World::start_with(3, options, |_| AgentSetup::default())
    }

    /// A world of `masters` masters (the options' standby ones not started), kha set up by
    /// `agent(control plane)` besides the usual flags, its static backends the masters not on
    /// standby.
    pub fn start_with(
        masters: usize,
        options: RealOptions,
        agent: impl FnOnce(&RealControlPlane) -> AgentSetup,
    ) -> World {
        let mut bed = Bed::create_empty(masters).unwrap_or_else(|e| panic!("cannot build the bed: {e}"));
        let bootstrap = masters - options.standby;
        let cp = RealControlPlane::start(&bed.lab, options).unwrap_or_else(|e| panic!("control plane: {e}"));
        let AgentSetup { extra: agent_extra, in_node } = agent(&cp);
        bed.agent_in_node = in_node;
        let kc = |file: &str, user, server: &str| {
            cp.kubeconfig(file, user, server, Some("localhost")).unwrap_or_else(|e| panic!("kubeconfig: {e}"))
        };
        let node_v4 = kc("node-v4.kubeconfig", User::Node, "https://127.0.0.1:6443");
        let node_v6 = kc("node-v6.kubeconfig", User::Node, "https://[::1]:6443");
        let admin_v4 = kc("admin-v4.kubeconfig", User::Admin, "https://127.0.0.1:6443");
        let mut w = World { cp, bed, node_v4, node_v6, admin_v4, bootstrap, agent_extra };
        w.start_agent(true);
        w
    }

    /// `kha run` for both frontends and every master, probing with the node's client
    /// certificate when `with_cert`.
    pub fn start_agent(&mut self, with_cert: bool) {
        let mut args: Vec<String> =
            ["--frontend", "127.0.0.1:6443", "--frontend", "[::1]:6443"].map(String::from).to_vec();
        for m in &self.bed.lab.masters()[..self.bootstrap] {
            args.extend(["--backend".into(), m.https_v4().to_string()]);
        }
        args.extend(self.agent_extra.iter().cloned());
        args.extend(["--ca-file".into(), self.cp.files.pki.ca_cert.display().to_string()]);
        if with_cert {
            let n = &self.cp.files.node;
            args.extend(["--client-cert".into(), n.cert.display().to_string()]);
            args.extend(["--client-key".into(), n.key.display().to_string()]);
        }
        args.extend(["--metrics-addr", "none", "--health-addr", "none"].map(String::from));
        self.bed.start_agent(&args).unwrap_or_else(|e| panic!("starting kha: {e}"));
    }

    pub fn restart_agent(&mut self, with_cert: bool) {
        if self.bed.agent_pid().is_some() {
            self.bed.stop_agent(libc::SIGTERM).unwrap_or_else(|e| panic!("stopping kha: {e}"));
        }
        self.start_agent(with_cert);
    }

    /// After a failed scenario: every etcd and apiserver running, the agent as at the start.
    pub fn restore(&mut self) {
        for name in self.cp.names() {
            if !self.cp.etcd_running(&name) {
                self.cp.start_etcd(&name).unwrap_or_else(|e| panic!("{e}"));
            }
            if self.cp.apiserver_pid(&name).is_none() {
                self.cp.start_apiserver(&name, Duration::ZERO).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        self.restart_agent(true);
        self.wait_all_up(Duration::from_secs(30));
    }

    /// `kubectl ARGS` on the node inside kha's cgroup: through kha.
    pub fn kubectl(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        self.kubectl_runner().run(kubeconfig, args)
    }

    /// What running kubectl through kha takes, for a thread of its own.
    pub fn kubectl_runner(&self) -> KubectlRunner {
        KubectlRunner {
            bin: self.cp.bin("kubectl"),
            netns: self.bed.lab.node_netns().to_owned(),
            cgroup: self.bed.cgroup.path.clone(),
        }
    }

    /// The master a master address belongs to.
    pub fn master_of(&self, addr: &str) -> Option<String> {
        let ip = addr.parse::<SocketAddr>().ok()?.ip();
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.bed
            .lab
            .masters()
            .iter()
            .find(|m| m.https_v4().ip() == ip || m.https_v6().ip() == ip)
            .map(|m| m.name.clone())
    }

    /// kha's view of backend `addr` on the first frontend: (state, serving).
    pub fn backend(&self, addr: SocketAddr) -> Option<(String, bool, Option<String>)> {
        let s = self.bed.status()?;
        let b = s["frontends"][0]["backends"]
            .as_array()?
            .iter()
            .find(|b| b["address"] == addr.to_string())?
            .clone();
        Some((
            b["state"].as_str()?.to_string(),
            b["serving"].as_bool()?,
            b["reason"].as_str().map(String::from),
        ))
    }

    pub fn wait_all_up(&self, timeout: Duration) {
        let addrs: Vec<SocketAddr> =
            self.bed.lab.masters()[..self.bootstrap].iter().map(|m| m.https_v4()).collect();
        wait_for("every master up in kha", timeout, || {
            addrs.iter().all(|a| self.backend(*a).is_some_and(|(state, serving, _)| state == "up" && serving))
        });
    }

    /// Counter `name` of `kha status`.
    pub fn counter(&self, name: &str) -> u64 {
        let s = self.bed.status().unwrap_or_default();
        s["counters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .and_then(|c| c["value"].as_u64())
            .unwrap_or(0)
    }

    pub fn watcher(&self, duration: Duration) -> Watcher {
        Watcher::spawn(
            &self.cp.bin("kha-watch"),
            self.bed.lab.node_netns(),
            Some(&self.bed.cgroup.path),
            &self.admin_v4,
            duration,
        )
        .expect("spawn kha-watch")
    }
}

#[derive(Clone)]
pub struct KubectlRunner {
    bin: PathBuf,
    netns: String,
    cgroup: PathBuf,
}

impl KubectlRunner {
    pub fn run(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        let mut c = Command::new(&self.bin);
        c.arg("--kubeconfig").arg(kubeconfig).args(args).arg("--request-timeout=10s");
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = kha_lab::netns::spawn_in(&self.netns, Some(&self.cgroup), c).expect("spawn kubectl");
        child.wait_with_output().expect("kubectl")
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}
