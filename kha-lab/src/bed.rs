//! The test bed: a [`Lab`] with running masters, a child cgroup of kha's own, and a `kha run`
//! agent serving the node namespace. The demo, the end-to-end tests and the benchmarks all
//! stand on it. Everything it makes is named `kha-t<pid>-<n>` and removed on drop, also after
//! a panic; [`Bed::cleanup_orphans`] removes what a killed run left.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    Lab, LabSpec, Pki,
    netns::{self, KillOnDrop},
    pki::PkiPaths,
    topology::{LabError, find_kha_lab_bin},
};

#[derive(Debug, thiserror::Error)]
pub enum BedError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no cgroup v2 mount to make a child cgroup in (mount one: mount -t cgroup2 none /sys/fs/cgroup)")]
    NoCgroup,
    #[error("reading /proc/mounts")]
    Mounts(#[source] std::io::Error),
    #[error("binary {0} not found: build it first (cargo xtask build)")]
    MissingBinary(String),
    #[error("generating certificates")]
    Pki(#[from] crate::pki::PkiError),
    #[error("{what} did not happen within {timeout:?}; agent log:\n{log}")]
    Timeout { what: String, timeout: Duration, log: String },
    #[error("kha agent exited ({status}); its log:\n{log}")]
    AgentExited { status: ExitStatus, log: String },
}

/// A cgroup v2 directory this process made; removed on drop.
pub struct ChildCgroup {
    pub path: PathBuf,
}

impl ChildCgroup {
    pub fn create(name: &str) -> Result<Self, BedError> {
        let root =
            kha_common::cgroup::cgroup2_mount().map_err(BedError::Mounts)?.ok_or(BedError::NoCgroup)?;
        let path = root.join(name);
        fs::create_dir(&path).map_err(|source| BedError::Io {
            what: "creating cgroup",
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        // Processes of ours that just exited may still be leaving the cgroup: retry, bounded.
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        log::warn!("cannot remove cgroup {}", self.path.display());
    }
}

pub struct Bed {
    /// Declared first so it drops (killing the agent) before the datapath is detached.
    agent: Option<KillOnDrop>,
    pub kha_bin: PathBuf,
    pub lab_bin: PathBuf,
    pub pin_dir: PathBuf,
    pub agent_log: PathBuf,
    pub pki: PkiPaths,
    pub cgroup: ChildCgroup,
    pub lab: Lab,
    /// Run the agent inside the node namespace rather than beside it (as a DaemonSet with
    /// hostNetwork runs it): its own connections (discovery's API client) then reach the
    /// masters.
    pub agent_in_node: bool,
}

/// Programs kha attaches, each under its own pinned link.
pub const HOOK_COUNT: usize = kha_common::HOOK_COUNT;

/// Where `kha` is: `$KHA_BIN`, else next to `kha-lab`.
pub fn find_kha_bin(lab_bin: &Path) -> PathBuf {
    std::env::var_os("KHA_BIN").map(PathBuf::from).unwrap_or_else(|| lab_bin.with_file_name("kha"))
}

impl Bed {
    /// A lab with `masters` running (simulated) masters, a fresh cgroup and pin dir; no agent
    /// yet.
    pub fn create(masters: usize) -> Result<Self, BedError> {
        Self::build(masters, true)
    }

    /// As [`Bed::create`], but the master namespaces are left empty for a real control plane
    /// ([`crate::real`]).
    pub fn create_empty(masters: usize) -> Result<Self, BedError> {
        Self::build(masters, false)
    }

    fn build(masters: usize, simulated: bool) -> Result<Self, BedError> {
        Self::cleanup_orphans();
        let lab_bin = find_kha_lab_bin().ok_or_else(|| BedError::MissingBinary("kha-lab".into()))?;
        let kha_bin = find_kha_bin(&lab_bin);
        if !kha_bin.is_file() {
            return Err(BedError::MissingBinary(kha_bin.display().to_string()));
        }
        let mut lab = Lab::create(LabSpec::unique(masters))?;
        let pki = Pki::generate(&lab.identities())?;
        let dir = lab.workdir().join("pki");
        let pki = pki.write_to(&dir)?;
        if simulated {
            lab.start_masters(&lab_bin, &pki)?;
        }
        let cgroup = ChildCgroup::create(lab.prefix())?;
        let pin_dir = Path::new("/sys/fs/bpf").join(lab.prefix());
        let agent_log = lab.workdir().join("agent.log");
        Ok(Bed { agent: None, kha_bin, lab_bin, pin_dir, agent_log, pki, cgroup, lab, agent_in_node: false })
    }

    /// `kha run` for this bed's namespace, cgroup and pin dir, plus `args` (backends, ...).
    pub fn agent_command(&self, args: &[String]) -> Command {
        let mut c = Command::new(&self.kha_bin);
        c.arg("run")
            .arg("--netns")
            .arg(netns::netns_path(self.lab.node_netns()))
            .arg("--cgroup")
            .arg(&self.cgroup.path)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(args);
        c
    }

    /// Starts the agent and waits until it has attached its own programs (new program ids on
    /// every link), so a restarted agent is not mistaken for the previous one.
    pub fn start_agent(&mut self, args: &[String]) -> Result<(), BedError> {
        let before = self.prog_ids();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.agent_log)
            .map_err(|source| BedError::Io { what: "opening", path: self.agent_log.clone(), source })?;
        let err_log = log.try_clone().map_err(|source| BedError::Io {
            what: "opening",
            path: self.agent_log.clone(),
            source,
        })?;
        let mut cmd = self.agent_command(args);
        cmd.stdout(log).stderr(err_log).stdin(Stdio::null());
        let child = if self.agent_in_node {
            self.lab.spawn_in_node(None, cmd)?
        } else {
            cmd.spawn().map_err(|source| BedError::Io {
                what: "starting",
                path: self.kha_bin.clone(),
                source,
            })?
        };
        self.agent = Some(KillOnDrop(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.agent.as_mut().and_then(|a| a.try_wait().ok().flatten()) {
                self.agent = None;
                return Err(BedError::AgentExited { status, log: self.agent_log_text() });
            }
            let now = self.prog_ids();
            if now.len() == HOOK_COUNT && now.iter().all(|id| !before.contains(id)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BedError::Timeout {
                    what: "agent attach".into(),
                    timeout: Duration::from_secs(20),
                    log: self.agent_log_text(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the agent and waits (bounded) for it to exit.
    pub fn stop_agent(&mut self, signal: i32) -> Result<ExitStatus, BedError> {
        let Some(mut agent) = self.agent.take() else {
            return Err(BedError::Timeout {
                what: "stop of an agent that is not running".into(),
                timeout: Duration::ZERO,
                log: String::new(),
            });
        };
        // SAFETY: our own child's pid.
        unsafe { libc::kill(agent.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = agent.try_wait() {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        Err(BedError::Timeout {
            what: format!("agent exit after signal {signal}"),
            timeout: Duration::from_secs(10),
            log: self.agent_log_text(),
        })
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.id())
    }

    pub fn agent_log_text(&self) -> String {
        fs::read_to_string(&self.agent_log).unwrap_or_default()
    }

    /// Runs the `kha` CLI (`status`, `detach`, ...) against this bed's pin dir.
    pub fn kha(&self, args: &[&str]) -> Output {
        Command::new(&self.kha_bin)
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.kha_bin.display()))
    }

    /// `kha status -o json`, or `None` while nothing is pinned.
    pub fn status(&self) -> Option<Value> {
        let out = self.kha(&["status", "-o", "json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    /// Program ids of the pinned links, in hook order.
    pub fn prog_ids(&self) -> Vec<u64> {
        self.status()
            .and_then(|s| {
                s["links"].as_array().map(|l| l.iter().filter_map(|l| l["prog_id"].as_u64()).collect())
            })
            .unwrap_or_default()
    }

    /// `kha-lab ARGS` in the node namespace, inside kha's cgroup when `in_cgroup`.
    pub fn spawn_lab_tool(&self, in_cgroup: bool, args: &[String]) -> Result<Child, BedError> {
        let mut c = Command::new(&self.lab_bin);
        c.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let cg = in_cgroup.then_some(self.cgroup.path.as_path());
        Ok(self.lab.spawn_in_node(cg, c)?)
    }

    /// Runs a `kha-lab client`/`connect` with `--json` to completion and returns its records
    /// and its summary.
    pub fn run_lab_tool(&self, in_cgroup: bool, args: &[String]) -> Result<ToolRun, BedError> {
        let mut args = args.to_vec();
        args.push("--json".into());
        let child = self.spawn_lab_tool(in_cgroup, &args)?;
        let out = child.wait_with_output().map_err(|source| BedError::Io {
            what: "waiting for",
            path: self.lab_bin.clone(),
            source,
        })?;
        Ok(ToolRun::parse(&out))
    }

    /// Removes what runs killed before they could clean up: labs, cgroups and pin dirs named
    /// `kha-t<pid>-*` whose process is gone.
    pub fn cleanup_orphans() {
        let _ = Lab::cleanup_orphans();
        let orphan = |name: &str| {
            let Some(rest) = name.strip_prefix("kha-t") else {
                return false;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            !pid.is_empty() && !Path::new("/proc").join(&pid).exists()
        };
        let dirs = |root: &Path| -> Vec<PathBuf> {
            fs::read_dir(root)
                .map(|d| {
                    d.flatten()
                        .filter(|e| orphan(&e.file_name().to_string_lossy()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default()
        };
        let kha_bin = find_kha_lab_bin().map(|lab| find_kha_bin(&lab));
        for pins in dirs(Path::new("/sys/fs/bpf")) {
            if let Some(kha) = &kha_bin {
                let _ = detach(kha, &pins);
            }
        }
        if let Ok(Some(root)) = kha_common::cgroup::cgroup2_mount() {
            for cg in dirs(&root) {
                let _ = fs::remove_dir(cg);
            }
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        drop(self.agent.take());
        if self.pin_dir.exists()
            && let Err(e) = detach(&self.kha_bin, &self.pin_dir)
        {
            log::warn!("bed cleanup: detaching {}: {e}", self.pin_dir.display());
        }
    }
}

/// `kha detach --pin-dir PINS`: what the agent pinned there is removed by the agent's own code.
fn detach(kha_bin: &Path, pins: &Path) -> Result<(), String> {
    let out = Command::new(kha_bin)
        .arg("detach")
        .arg("--pin-dir")
        .arg(pins)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", kha_bin.display()))?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()) }
}

/// The per-request records and the summary (`Null` if missing) of `kha-lab ... --json` output.
pub fn parse_json_lines(stdout: &str) -> (Vec<Value>, Value) {
    let mut records = Vec::new();
    let mut summary = Value::Null;
    for line in stdout.lines() {
        match serde_json::from_str::<Value>(line) {
            Ok(v) if v.get("summary").is_some() => summary = v["summary"].clone(),
            Ok(v) => records.push(v),
            Err(_) => {}
        }
    }
    (records, summary)
}

/// The JSON lines of a `kha-lab client`/`connect` run.
#[derive(Debug, Clone)]
pub struct ToolRun {
    pub records: Vec<Value>,
    pub summary: Value,
    pub exit: ExitStatus,
    pub stderr: String,
}

impl ToolRun {
    pub fn parse(out: &Output) -> Self {
        let (records, summary) = parse_json_lines(&String::from_utf8_lossy(&out.stdout));
        ToolRun {
            records,
            summary,
            exit: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn ok(&self) -> u64 {
        self.summary["ok"].as_u64().unwrap_or(0)
    }
    pub fn failed(&self) -> u64 {
        self.summary["failed"].as_u64().unwrap_or(0)
    }
    /// How many answers came from `master`.
    pub fn by_master(&self, master: &str) -> u64 {
        self.summary["by_master"][master].as_u64().unwrap_or(0)
    }
}
