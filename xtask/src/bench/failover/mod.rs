//! `cargo xtask bench failover`: what a client sees when a master fails, through kha (health
//! checks on, default probe settings), nginx and haproxy (kubespray's configurations).
//!
//! For each failure (process killed, blackholed, `/readyz` failing while still serving, hung)
//! one master is failed once for all three contenders at the same instant, while each
//! contender carries, in the lab's node namespace:
//!
//! - a **loop**: `kha-lab client`, one request per 20 ms, a new TCP + TLS connection each
//!   (`GET /version`, 5 s deadline per request);
//! - three **long-lived connections**: `kha-lab client --keep-alive`, one request per 100 ms
//!   on one connection, no deadline that matters (300 s), one on each master (as least-
//!   connections spreads a node's watches), so that the loop still spreads over all three
//!   masters; the one on the master that fails is the one observed.
//!
//! Every record is stamped when its line arrives (the end of the request); its start is that
//! minus its latency. Times are counted from `t0`, the instant before the fault is applied.
//! What is measured (see [`outcome`] and `docs/benchmarks.md`):
//!
//! - failed and stalled (answered after more than 1 s) requests of the loop among those that
//!   ended after `t0` and started before the end of the fault phase, and when they ended;
//! - **left after**: the start of the last loop request that was answered by the failed
//!   master or failed or stalled (a healthy master does neither), provided the loop then ran
//!   clean for the quiet time after that request ended; 0 when no request after the fault
//!   reached the failed master;
//! - **replaced after**: the first answer on a new connection from another master on the
//!   long-lived client that was connected to the failed master;
//! - **back after**: after the fault is undone (the undo call returned), the start of the first
//!   loop request that the recovered master answered.
//!
//! Every phase is bounded in time, every client in count and time; all processes are ours,
//! killed on drop (clients, proxies, agent, masters) with the lab's namespaces.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, atomic::Ordering, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::{FailureMode, bed::Bed, client::RequestRecord, netns::KillOnDrop};
use serde::{Deserialize, Serialize};

use super::{
    BenchArgs, machine,
    proxy::{Proxy, Upstream},
    run::STOP,
};

pub const JSON: &str = "failover.json";
pub const MARKDOWN: &str = "failover.md";

const MASTERS: usize = 3;
const LOOP_INTERVAL_MS: u64 = 20;
/// Deadline of one loop request, connect and handshake included.
const LOOP_TIMEOUT_MS: u64 = 5000;
/// A loop request answered after this long is a stall.
const STALL_MS: f64 = 1000.0;
const KEEP_INTERVAL_MS: u64 = 100;
/// Longer than any phase: a long-lived request is only ended by the load balancer or TCP,
/// as a watch is.
const KEEP_TIMEOUT_MS: u64 = 300_000;
/// Long-lived clients started per contender to get one on every master, beyond which one
/// on the master to fail is enough.
const PLACE_TRIES: usize = 15;
const KHA_PORT: u16 = 6443;
const NGINX_PORT: u16 = 16443;
const HAPROXY_PORT: u16 = 26443;
/// Records kept per loop in the JSON for bad requests (failed or stalled).
const MAX_BAD_LISTED: usize = 50;

/// How long each phase may last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub profile: String,
    /// Each failure is applied this many times (to a different master each time).
    pub rounds: usize,
    /// N: the fault phase lasts this long at most; what has not happened by then is "> N s".
    pub window_s: f64,
    /// The loop must run clean this long before the failed master counts as left. The fault
    /// phase ends early once every contender has left it and replaced the long-lived
    /// connection.
    pub quiet_s: f64,
    /// Bound on the wait for the recovered master to get traffic again.
    pub recovery_s: f64,
    /// Loops run this long before the fault.
    pub warmup_s: f64,
    /// Bound on the wait for every master to be served before a fault (kha: all `up`).
    pub settle_s: f64,
    /// Wait (up to `settle_s`) until each contender holds a long-lived connection on every
    /// master, i.e. serves every master again; else (--quick) one on the master to fail is
    /// enough after a few tries.
    pub spread: bool,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            profile: "full".into(),
            rounds: 2,
            window_s: 30.0,
            quiet_s: 10.0,
            recovery_s: 40.0,
            warmup_s: 3.0,
            settle_s: 60.0,
            spread: true,
        }
    }

    pub fn quick() -> Plan {
        Plan {
            profile: "quick".into(),
            rounds: 1,
            window_s: 10.0,
            quiet_s: 3.0,
            recovery_s: 5.0,
            warmup_s: 1.0,
            settle_s: 30.0,
            spread: false,
        }
    }

    fn d(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failure {
    /// SIGKILL: connects are refused, open connections closed by the master's kernel.
    #[default]
    Killed,
    /// The node-side link down: packets to and from the master are lost.
    Blackholed,
    /// `/readyz` answers 500, everything else (`/version`, `/healthz`) still works.
    NotReady,
    /// SIGSTOP: the kernel still accepts connections, nothing answers.
    Hung,
}

pub const FAILURES: [Failure; 4] = [Failure::Killed, Failure::Blackholed, Failure::NotReady, Failure::Hung];

impl Failure {
    pub fn id(self) -> &'static str {
        match self {
            Failure::Killed => "killed",
            Failure::Blackholed => "blackholed",
            Failure::NotReady => "readyz-500",
            Failure::Hung => "hung",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Failure::Killed => "process killed (refused)",
            Failure::Blackholed => "blackholed (link down)",
            Failure::NotReady => "`/readyz` 500, still serving",
            Failure::Hung => "hung (SIGSTOP)",
        }
    }

    fn apply(self, bed: &mut Bed, m: &str) -> Result<()> {
        let lab = &mut bed.lab;
        match self {
            Failure::Killed => lab.kill_master(m),
            Failure::Blackholed => lab.link_down(m),
            Failure::NotReady => lab.set_mode(m, FailureMode::Readyz500),
            Failure::Hung => lab.stop_master(m),
        }
        .with_context(|| format!("failing {m} ({})", self.id()))
    }

    /// Undoes the fault; returns once the master can serve again (restarted and ready,
    /// reachable, mode applied, continued).
    fn undo(self, bed: &mut Bed, m: &str) -> Result<()> {
        let lab = &mut bed.lab;
        match self {
            Failure::Killed => lab.restart_master(m),
            Failure::Blackholed => lab.link_up(m),
            Failure::NotReady => lab.set_mode(m, FailureMode::Normal),
            Failure::Hung => lab.cont_master(m),
        }
        .with_context(|| format!("undoing {} on {m}", self.id()))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contender {
    pub id: String,
    pub label: String,
    /// Where the clients connect (in the node namespace).
    pub connect: SocketAddr,
    /// The clients run in kha's cgroup.
    pub in_cgroup: bool,
}

pub fn contenders() -> Vec<Contender> {
    let c = |id: &str, port: u16, in_cgroup| Contender {
        id: id.into(),
        label: id.into(),
        connect: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        in_cgroup,
    };
    vec![c("kha", KHA_PORT, true), c("nginx", NGINX_PORT, false), c("haproxy", HAPROXY_PORT, false)]
}

/// One record of a client, stamped when its line arrived (the request's end).
struct Rec {
    end: Instant,
    r: RequestRecord,
}

impl Rec {
    fn start(&self) -> Instant {
        let lat = Duration::from_secs_f64((self.r.latency_ms / 1000.0).max(0.0));
        self.end.checked_sub(lat).unwrap_or(self.end)
    }

    fn bad(&self) -> bool {
        !self.r.ok || self.r.latency_ms > STALL_MS
    }
}

/// A running `kha-lab client --json`, its records read as they come.
struct Client {
    child: KillOnDrop,
    rx: mpsc::Receiver<Rec>,
    recs: Vec<Rec>,
    stderr: Arc<Mutex<String>>,
}

impl Client {
    fn spawn(bed: &Bed, ca: &str, c: &Contender, keep_alive: bool, count: u64) -> Result<Client> {
        let mut args: Vec<String> =
            ["client", "--url", "https://localhost:6443/version", "--ca", ca, "--json"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
        let (interval, timeout, reuse) = if keep_alive {
            (KEEP_INTERVAL_MS, KEEP_TIMEOUT_MS, "--keep-alive")
        } else {
            (LOOP_INTERVAL_MS, LOOP_TIMEOUT_MS, "--new-connection-each")
        };
        args.extend([
            "--connect-addr".into(),
            c.connect.to_string(),
            "--count".into(),
            count.clamp(1, 1_000_000).to_string(),
            "--interval-ms".into(),
            interval.to_string(),
            "--timeout-ms".into(),
            timeout.to_string(),
            reuse.into(),
        ]);
        let mut child =
            KillOnDrop(bed.spawn_lab_tool(c.in_cgroup, &args).context("starting kha-lab client")?);
        let stdout = child.stdout.take().context("client stdout")?;
        let stderr_pipe = child.stderr.take().context("client stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let end = Instant::now();
                // The summary line is no record; it does not parse as one.
                if let Ok(r) = serde_json::from_str::<RequestRecord>(&line)
                    && tx.send(Rec { end, r }).is_err()
                {
                    return;
                }
            }
        });
        // Drained so that the client never blocks on a full pipe; the start kept for errors.
        let stderr = Arc::new(Mutex::new(String::new()));
        let keep = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut pipe = stderr_pipe;
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    return;
                }
                if let Ok(mut s) = keep.lock()
                    && s.len() < 8192
                {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Ok(Client { child, rx, recs: Vec::new(), stderr })
    }

    fn pull(&mut self) {
        while let Ok(r) = self.rx.try_recv() {
            self.recs.push(r);
        }
    }

    /// The first record, waiting at most `timeout`; `None` when none came (the client
    /// exited or hangs).
    fn first(&mut self, timeout: Duration) -> Result<Option<&Rec>> {
        let deadline = Instant::now() + timeout;
        while self.recs.is_empty() {
            stopped()?;
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => self.recs.push(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => break,
                Err(_) => {}
            }
        }
        Ok(self.recs.first())
    }

    fn exited(&mut self) -> Option<String> {
        let st = self.child.try_wait().ok().flatten()?;
        let err = self.stderr.lock().map(|s| s.trim().to_owned()).unwrap_or_default();
        Some(format!("{st}: {err}"))
    }
}

fn stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Waits `d`, returning early with an error on Ctrl-C.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        stopped()?;
        thread::sleep((end - Instant::now()).min(Duration::from_millis(50)));
    }
    Ok(())
}

/// Seconds from `t0` to `t`, negative before it.
fn rel(t0: Instant, t: Instant) -> f64 {
    if t >= t0 { (t - t0).as_secs_f64() } else { -(t0 - t).as_secs_f64() }
}

/// What one contender showed for one fault. `None` times: not within the bound.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub contender: String,
    pub failure: Failure,
    pub round: usize,
    /// The master that was failed.
    pub master: String,
    /// Loop answers per master in the warm-up before the fault.
    pub before: BTreeMap<String, u64>,
    /// The long-lived connections at the fault, by master (one should be on each).
    pub long_lived_on: Vec<String>,
    /// Length of the fault phase (the window, or less when everything had settled).
    pub phase_s: f64,
    /// Loop requests that ended after the fault and started before the end of the phase.
    pub requests: u64,
    pub failed: u64,
    /// Answered, but after more than 1 s.
    pub stalled: u64,
    /// Failed loop requests by error key.
    pub errors: BTreeMap<String, u64>,
    /// When the bad (failed or stalled) requests ended, seconds after the fault.
    pub bad_first_s: Option<f64>,
    pub bad_last_s: Option<f64>,
    /// Each bad request: (end, latency in ms, error or "stall"), the first few.
    pub bad: Vec<(f64, f64, String)>,
    /// Start of the last loop request that went to the failed master (answered by it, or
    /// failed or stalled), seconds after the fault; `None` when there was none.
    pub last_to_failed_s: Option<f64>,
    /// When that request ended (the loop is sequential: a hung request holds it).
    pub last_to_failed_end_s: Option<f64>,
    /// When no request went to the failed master any more: `last_to_failed_s` (0 if none)
    /// if the loop then ran clean for the quiet time after that request ended, before the
    /// phase ended; else `None`.
    pub left_s: Option<f64>,
    /// The long-lived client on the failed master: its first failure after the fault...
    pub long_lived_error: Option<String>,
    pub long_lived_error_s: Option<f64>,
    /// ...and its first answer on a new connection from another master, within the phase.
    pub replaced_s: Option<f64>,
    pub replaced_by: Option<String>,
    /// After the undo: the first loop request answered by the recovered master (its start).
    pub back_s: Option<f64>,
    /// Failed loop requests after the undo, until the end of the recovery phase.
    pub failed_after_undo: u64,
    /// How long the undo itself took (a restart waits for the master to be ready).
    pub undo_s: f64,
    /// kha only: the failed backend's state in `kha status`, at each change: (seconds after
    /// the fault, state). Polled every 250 ms.
    pub kha_states: Vec<(f64, String)>,
}

/// Computes an outcome from the records. `t_end`: end of the fault phase; `t1`: the undo
/// returned.
#[allow(clippy::too_many_arguments)]
fn outcome(
    plan: &Plan,
    failure: Failure,
    round: usize,
    contender: &str,
    master: &str,
    looped: &[Rec],
    long_lived: &[Rec],
    t0: Instant,
    t_end: Instant,
    t1: Instant,
) -> Outcome {
    let mut o = Outcome {
        contender: contender.into(),
        failure,
        round,
        master: master.into(),
        phase_s: rel(t0, t_end),
        ..Outcome::default()
    };
    for r in looped.iter().filter(|r| r.end < t0) {
        if let Some(m) = &r.r.master {
            *o.before.entry(m.clone()).or_default() += 1;
        }
    }
    let during: Vec<&Rec> = looped.iter().filter(|r| r.end >= t0 && r.start() < t_end).collect();
    o.requests = during.len() as u64;
    for r in &during {
        let to_failed = r.bad() || r.r.master.as_deref() == Some(master);
        if to_failed {
            let s = rel(t0, r.start()).max(0.0);
            if o.last_to_failed_s.is_none_or(|l| s >= l) {
                o.last_to_failed_s = Some(s);
                o.last_to_failed_end_s = Some(rel(t0, r.end));
            }
        }
        if !r.bad() {
            continue;
        }
        let what = match &r.r.error {
            Some(e) => {
                o.failed += 1;
                *o.errors.entry(e.clone()).or_default() += 1;
                e.clone()
            }
            None if !r.r.ok => {
                o.failed += 1;
                "failed".into()
            }
            None => {
                o.stalled += 1;
                "stall".into()
            }
        };
        let e = rel(t0, r.end);
        o.bad_first_s.get_or_insert(e);
        o.bad_last_s = Some(e);
        if o.bad.len() < MAX_BAD_LISTED {
            o.bad.push((e, r.r.latency_ms, what));
        }
    }
    o.left_s = match (o.last_to_failed_s, o.last_to_failed_end_s) {
        (Some(l), Some(end)) if o.phase_s - end >= plan.quiet_s => Some(l),
        (Some(_), _) => None,
        (None, _) => Some(0.0),
    };
    for r in long_lived.iter().filter(|r| r.end >= t0 && r.end < t_end) {
        if !r.r.ok && o.long_lived_error.is_none() {
            o.long_lived_error = r.r.error.clone().or(Some("failed".into()));
            o.long_lived_error_s = Some(rel(t0, r.end));
        }
        if r.r.ok && !r.r.reused && r.r.master.as_deref().is_some_and(|m| m != master) {
            o.replaced_s = Some(rel(t0, r.end));
            o.replaced_by = r.r.master.clone();
            break;
        }
    }
    let after: Vec<&Rec> = looped.iter().filter(|r| r.start() >= t1).collect();
    o.failed_after_undo = after.iter().filter(|r| !r.r.ok).count() as u64;
    o.back_s =
        after.iter().find(|r| r.r.ok && r.r.master.as_deref() == Some(master)).map(|r| rel(t1, r.start()));
    o.undo_s = rel(t_end, t1);
    o
}

/// Whether a contender's figures for the fault phase are settled at `now`: its long-lived
/// connection was replaced, the loop has run clean for the quiet time since the last request
/// to the failed master ended, and is answering.
fn settled(plan: &Plan, master: &str, looped: &[Rec], long_lived: &[Rec], t0: Instant, now: Instant) -> bool {
    let replaced = long_lived
        .iter()
        .any(|r| r.end >= t0 && r.r.ok && !r.r.reused && r.r.master.as_deref().is_some_and(|m| m != master));
    let last_to_failed = looped
        .iter()
        .filter(|r| r.end >= t0 && (r.bad() || r.r.master.as_deref() == Some(master)))
        .map(|r| r.end)
        .max()
        .unwrap_or(t0);
    // A request in flight for long may be one that hangs: not settled while the loop is quiet.
    let answering = looped.last().is_some_and(|r| rel(r.end, now) < 0.5);
    replaced && answering && rel(last_to_failed, now) >= plan.quiet_s
}

/// The lab, the agent (health checks on) and the two proxies. Dropped in field order:
/// proxies, then the bed (agent, pins, masters, namespaces).
struct World {
    nginx: Proxy,
    haproxy: Proxy,
    bed: Bed,
    ca: String,
    masters: Vec<String>,
}

fn masters_https(bed: &Bed) -> Vec<SocketAddr> {
    bed.lab.masters().iter().map(|m| m.https_v4()).collect()
}

/// The default of `flag` as `kha run --help` prints it, e.g. `2000` for `--probe-interval-ms`.
fn help_default(help: &str, flag: &str) -> Option<String> {
    let start = help.find(&format!("{flag} "))?;
    let rest = &help[start + flag.len()..];
    // Up to the next option line.
    let end = rest.find("\n      --").unwrap_or(rest.len());
    let block = &rest[..end];
    let d = block.find("[default: ")?;
    let v = &block[d + "[default: ".len()..];
    Some(v[..v.find(']')?].to_owned())
}

/// kha's probe and policy settings, as the binary under test has them by default.
fn kha_settings(kha: &Path) -> Result<BTreeMap<String, String>> {
    let help = Command::new(kha)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .context("running kha run --help")?;
    if !help.contains("--ca-file") || !help.contains("--probe-interval-ms") {
        bail!("{} has no health checks (--ca-file, --probe-interval-ms): nothing to measure", kha.display());
    }
    let mut s = BTreeMap::new();
    for (flag, name, unit) in [
        ("--policy", "policy", ""),
        ("--probe-interval-ms", "probe interval", " ms (jittered)"),
        ("--probe-timeout-ms", "probe timeout", " ms"),
        ("--rise", "rise", ""),
        ("--fall", "fall", ""),
        ("--drain-time", "drain time", " s"),
        ("--all-down", "all down", ""),
        ("--health-path", "health path", ""),
    ] {
        s.insert(
            format!("kha {name}"),
            help_default(&help, flag).map_or("?".into(), |v| format!("{v}{unit}")),
        );
    }
    Ok(s)
}

impl World {
    fn create() -> Result<World> {
        let mut bed = Bed::create(MASTERS).context("building the lab")?;
        let work = bed.lab.workdir().join("failover");
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let servers = masters_https(&bed);
        let up = |port| {
            vec![Upstream {
                name: "kube_apiserver".into(),
                listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                servers: servers.clone(),
                check_port: None,
            }]
        };
        let node = bed.lab.node_netns().to_owned();
        let nginx = Proxy::start_nginx(&node, &work, &up(NGINX_PORT))?;
        let haproxy = Proxy::start_haproxy(&node, &work, &up(HAPROXY_PORT))?;
        // kha's defaults but for the CA (the lab's) and listening on nothing but the datapath.
        let frontend = SocketAddr::from((Ipv4Addr::LOCALHOST, KHA_PORT));
        let config = work.join("kha.toml");
        fs::write(&config, super::lab::kha_toml(&[(frontend, servers)], None))
            .context("writing kha's config")?;
        let ca = bed.pki.ca_cert.display().to_string();
        let args: Vec<String> = [
            "--config",
            &config.display().to_string(),
            "--ca-file",
            &ca,
            "--metrics-addr",
            "none",
            "--health-addr",
            "none",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        bed.start_agent(&args).context("starting kha with health checks")?;
        let masters = bed.lab.masters().iter().map(|m| m.name.clone()).collect();
        Ok(World { nginx, haproxy, bed, ca, masters })
    }

    fn addr_of(&self, master: &str) -> String {
        self.bed.lab.master(master).map(|m| m.https_v4().to_string()).unwrap_or_default()
    }

    /// The state of kha's backend `addr` (`up`, `down`, `draining`, ...).
    fn kha_state(&self, addr: &str) -> Option<String> {
        let s = self.bed.status()?;
        s["frontends"]
            .as_array()?
            .iter()
            .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
            .find_map(|b| {
                (b["address"].as_str() == Some(addr)).then(|| b["state"].as_str().unwrap_or("?").to_owned())
            })
    }

    /// Waits until kha has every master `up` and both proxies still run.
    fn settle(&mut self, bound: Duration) -> Result<()> {
        for p in [&mut self.nginx, &mut self.haproxy] {
            if !p.running() {
                bail!("{} exited during the bench; its log: {}", p.name, p.log.display());
            }
        }
        let deadline = Instant::now() + bound;
        loop {
            let states: Vec<(String, Option<String>)> =
                self.masters.iter().map(|m| (m.clone(), self.kha_state(&self.addr_of(m)))).collect();
            if states.iter().all(|(_, s)| s.as_deref() == Some("up")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kha did not have every master up within {bound:?}: {states:?}; agent log:\n{}",
                    self.bed.agent_log_text()
                );
            }
            pause(Duration::from_millis(100))?;
        }
    }

    /// Long-lived clients for `c`, one per master where possible; returns the one on
    /// `target`, the others, and the masters they are on.
    fn place(
        &self,
        c: &Contender,
        target: &str,
        count: u64,
        spread: bool,
        deadline: Instant,
    ) -> Result<(Client, Vec<Client>)> {
        let mut held: BTreeMap<String, Client> = BTreeMap::new();
        let mut tries = 0;
        let mut seen = Vec::new();
        while held.len() < self.masters.len() {
            if held.contains_key(target) && ((tries >= PLACE_TRIES && !spread) || Instant::now() > deadline) {
                eprintln!(
                    "xtask: bench failover: {}: long-lived connections only on {:?} after {tries} tries",
                    c.id,
                    held.keys().collect::<Vec<_>>()
                );
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no long-lived connection landed on {target} after {tries} tries (first answers: {seen:?})",
                    c.id
                );
            }
            if tries >= PLACE_TRIES {
                // The load balancer may not serve the target yet (haproxy's checks are slow).
                pause(Duration::from_millis(250))?;
            }
            tries += 1;
            let mut k = Client::spawn(&self.bed, &self.ca, c, true, count)?;
            let first =
                k.first(Duration::from_secs(5))?.map(|r| (r.r.ok, r.r.master.clone(), r.r.error.clone()));
            seen.push(
                first.clone().map_or("nothing".into(), |(_, m, e)| m.or(e).unwrap_or_else(|| "?".into())),
            );
            if let Some((true, Some(m), _)) = first
                && !held.contains_key(&m)
            {
                held.insert(m, k);
            }
            // Else `k` drops here: killed, its connection closed.
        }
        let on_target = held.remove(target).context("placed")?;
        Ok((on_target, held.into_values().collect()))
    }
}

/// Runs the failover bench; returns the directory written to.
pub fn run(args: &BenchArgs) -> Result<PathBuf> {
    let (bin, kind, out) = super::prepare(
        args,
        "the failover bench creates network namespaces, attaches eBPF programs and runs nginx and haproxy",
    )?;
    let mut plan = if args.quick { Plan::quick() } else { Plan::full() };
    if let Some(r) = args.rounds {
        plan.rounds = r as usize;
    }
    let mut settings = kha_settings(&bin.join("kha"))?;
    settings.insert("binaries".into(), kind.into());
    STOP.store(false, Ordering::SeqCst);
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, super::on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, super::on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    let load_before = super::loadavg();
    eprintln!(
        "xtask: bench failover: {} run, {} round(s) of {} failures, {kind} binaries; building the lab",
        plan.profile,
        plan.rounds,
        FAILURES.len()
    );
    let outcomes = {
        let mut world = World::create()?;
        let mut all = Vec::new();
        let mut k = 0;
        for round in 0..plan.rounds {
            for failure in FAILURES {
                // A different master each time: the one failed last may still be out of a
                // slow load balancer (haproxy) when the next fault comes.
                let target = world.masters[k % world.masters.len()].clone();
                k += 1;
                let t = Instant::now();
                eprintln!("xtask: bench failover: round {}, {} {target}", round + 1, failure.id());
                let o = fault(&mut world, &plan, failure, round, &target)?;
                for x in &o {
                    eprintln!("  {}", one_line(x, &plan));
                }
                eprintln!("xtask: bench failover: took {:.0} s", t.elapsed().as_secs_f64());
                all.extend(o);
            }
        }
        all
        // The world drops here: clients, proxies, agent, pins, masters, namespaces.
    };
    settings.insert("load average before".into(), load_before);
    settings.insert("load average after".into(), super::loadavg());
    let report = FailoverReport {
        plan,
        duration_s: started.elapsed().as_secs_f64(),
        machine: machine::describe(),
        settings,
        contenders: contenders(),
        failures: FAILURES.to_vec(),
        outcomes,
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    fs::write(out.join(JSON), serde_json::to_string_pretty(&report)?).context("writing failover.json")?;
    fs::write(out.join(MARKDOWN), report.markdown()).context("writing failover.md")?;
    Ok(out)
}

fn one_line(o: &Outcome, plan: &Plan) -> String {
    format!(
        "{:8} failed {} stalled {} | left {} | replaced {} ({}) | back {}",
        o.contender,
        o.failed,
        o.stalled,
        secs(o.left_s, plan.window_s - plan.quiet_s),
        secs(o.replaced_s, plan.window_s),
        o.long_lived_error.as_deref().unwrap_or("no error"),
        secs(o.back_s, plan.recovery_s),
    )
}

/// One fault for all contenders at once.
fn fault(w: &mut World, plan: &Plan, failure: Failure, round: usize, target: &str) -> Result<Vec<Outcome>> {
    w.settle(Plan::d(plan.settle_s))?;
    let total = plan.warmup_s + plan.window_s + plan.recovery_s + 30.0;
    let keep_count = (total * 1000.0 / KEEP_INTERVAL_MS as f64) as u64;
    let loop_count = (total * 1000.0 / LOOP_INTERVAL_MS as f64) as u64;
    let deadline = Instant::now() + Plan::d(plan.settle_s);
    let cs = contenders();
    // Long-lived connections first, so that the loops see one on every master.
    let mut long_lived = Vec::new();
    let mut others = Vec::new();
    let mut on = Vec::new();
    for c in &cs {
        let (k, rest) = w.place(c, target, keep_count, plan.spread, deadline)?;
        let mut masters: Vec<String> =
            rest.iter().chain([&k]).filter_map(|x| x.recs.first()?.r.master.clone()).collect();
        masters.sort();
        on.push(masters);
        long_lived.push(k);
        others.push(rest);
    }
    let mut loops = Vec::new();
    for c in &cs {
        loops.push(Client::spawn(&w.bed, &w.ca, c, false, loop_count)?);
    }
    pause(Plan::d(plan.warmup_s))?;
    for (c, l) in cs.iter().zip(&mut loops) {
        l.pull();
        if !l.recs.iter().any(|r| r.r.ok) {
            bail!("{}: no answer in the warm-up ({} records); client: {:?}", c.id, l.recs.len(), l.exited());
        }
    }
    let addr = w.addr_of(target);
    let mut kha_states: Vec<(f64, String)> = Vec::new();
    let poll_kha = |w: &World, t0: Instant, states: &mut Vec<(f64, String)>| {
        let s = w.kha_state(&addr).unwrap_or_else(|| "?".into());
        if states.last().is_none_or(|(_, last)| *last != s) {
            states.push((rel(t0, Instant::now()), s));
        }
    };
    // The fault.
    let t0 = Instant::now();
    failure.apply(&mut w.bed, target)?;
    let window_end = t0 + Plan::d(plan.window_s);
    let mut next_poll = Instant::now();
    let t_end = loop {
        stopped()?;
        thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        if now >= next_poll {
            poll_kha(w, t0, &mut kha_states);
            next_poll = now + Duration::from_millis(250);
        }
        for x in loops.iter_mut().chain(long_lived.iter_mut()) {
            x.pull();
        }
        if now >= window_end {
            break now;
        }
        let all =
            loops.iter().zip(&long_lived).all(|(l, k)| settled(plan, target, &l.recs, &k.recs, t0, now));
        if all {
            break now;
        }
    };
    failure.undo(&mut w.bed, target)?;
    let t1 = Instant::now();
    // Recovery: until every loop got an answer from the recovered master, bounded.
    let back_end = t1 + Plan::d(plan.recovery_s);
    loop {
        stopped()?;
        thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        if now >= next_poll {
            poll_kha(w, t0, &mut kha_states);
            next_poll = now + Duration::from_millis(250);
        }
        for x in loops.iter_mut().chain(long_lived.iter_mut()) {
            x.pull();
        }
        let back = loops.iter().all(|l| {
            l.recs.iter().any(|r| r.start() >= t1 && r.r.ok && r.r.master.as_deref() == Some(target))
        });
        if back || now >= back_end {
            break;
        }
    }
    // Where kha's state stands at the end (the last poll may predate its return to `up`).
    poll_kha(w, t0, &mut kha_states);
    for (c, l) in cs.iter().zip(&mut loops) {
        if let Some(e) = l.exited() {
            bail!("{}: the loop client ended early ({e})", c.id);
        }
    }
    let mut v = Vec::new();
    for (i, c) in cs.iter().enumerate() {
        let mut o =
            outcome(plan, failure, round, &c.id, target, &loops[i].recs, &long_lived[i].recs, t0, t_end, t1);
        o.long_lived_on = on[i].clone();
        if c.id == "kha" {
            o.kha_states = kha_states.clone();
        }
        v.push(o);
    }
    drop(others);
    Ok(v)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverReport {
    pub plan: Plan,
    pub duration_s: f64,
    pub machine: machine::Machine,
    pub settings: BTreeMap<String, String>,
    pub contenders: Vec<Contender>,
    pub failures: Vec<Failure>,
    pub outcomes: Vec<Outcome>,
}

/// Seconds with a bound: `None` is "> bound s".
fn secs(v: Option<f64>, bound: f64) -> String {
    match v {
        Some(s) => format!("{} s", super::report::num(s.max(0.0))),
        None => format!("> {} s", super::report::num(bound)),
    }
}

/// Median [min–max] over rounds, `None` counted as above every value.
fn cell(values: &[Option<f64>], bound: f64) -> String {
    if values.is_empty() {
        return "**missing**".into();
    }
    let mut v: Vec<f64> = values.iter().map(|x| x.unwrap_or(f64::INFINITY)).collect();
    v.sort_by(f64::total_cmp);
    let show = |x: f64| secs(x.is_finite().then_some(x), bound);
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
    if show(v[0]) == show(v[n - 1]) {
        show(median)
    } else {
        format!("{} [{}–{}]", show(median), show(v[0]), show(v[n - 1]))
    }
}

fn count_cell(values: &[u64]) -> String {
    if values.is_empty() {
        return "**missing**".into();
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let n = v.len();
    let median = if n % 2 == 1 { v[n / 2] as f64 } else { (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0 };
    if v[0] == v[n - 1] {
        format!("{}", v[0])
    } else if median.fract() == 0.0 {
        format!("{median} [{}–{}]", v[0], v[n - 1])
    } else {
        format!("{median:.1} [{}–{}]", v[0], v[n - 1])
    }
}

impl FailoverReport {
    fn cells(&self, f: Failure, c: &str) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.failure == f && o.contender == c).collect()
    }

    pub fn markdown(&self) -> String {
        let p = &self.plan;
        let mut m = String::new();
        let _ = writeln!(m, "# kha failover benchmark: {} run, {}\n", p.profile, self.machine.date);
        let _ = writeln!(m, "Machine: {}.\n", self.machine.one_line());
        let _ = writeln!(
            m,
            "{} round(s) of {} failures, {:.0} s. Each failure is applied to one master for all contenders at the same \
             instant (a different master each time); cells are per round, or the median [min–max] over rounds. The \
             loop: one request every {LOOP_INTERVAL_MS} ms on a new TCP + TLS connection, {LOOP_TIMEOUT_MS} ms deadline; \
             a stall is an answer after more than {} s. The long-lived connection: one request every \
             {KEEP_INTERVAL_MS} ms on one kept-alive connection (no deadline within the run), one such client on each \
             master; the one on the failed master is followed. Fault phase: at most {} s (N), ended early once every \
             contender has left the failed master for {} s and replaced the long-lived connection; recovery: at most {} s.\n",
            p.rounds,
            self.failures.len(),
            self.duration_s,
            super::report::num(STALL_MS / 1000.0),
            super::report::num(p.window_s),
            super::report::num(p.quiet_s),
            super::report::num(p.recovery_s),
        );
        let _ = writeln!(
            m,
            "Settings: {}. nginx: `least_conn`, `proxy_connect_timeout 1s`, `proxy_timeout 10m`, passive checks only \
             (`max_fails 1`, `fail_timeout 10s`, nginx's defaults, per worker). haproxy: `balance leastconn`, \
             `option httpchk GET /healthz`, `inter 15s downinter 15s rise 2 fall 2 slowstart 60s`, `retries 5`, \
             `option redispatch`; no `on-marked-down shutdown-sessions` (as kubespray).\n",
            self.settings.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        );
        let _ = writeln!(
            m,
            "| failure | contender | failed requests | stalled (> 1 s) | when (s after the fault) | no request to the failed master after | long-lived connection replaced after | back in use after the undo |\n|---|---|---|---|---|---|---|---|"
        );
        for f in &self.failures {
            for c in &self.contenders {
                let os = self.cells(*f, &c.id);
                let when: Vec<String> = os
                    .iter()
                    .map(|o| match (o.bad_first_s, o.bad_last_s) {
                        (Some(a), Some(b)) if (b - a).abs() < 0.005 => super::report::num(a),
                        (Some(a), Some(b)) => format!("{}–{}", super::report::num(a), super::report::num(b)),
                        _ => "–".into(),
                    })
                    .collect();
                let when = if when.iter().all(|w| w == "–") { "–".to_owned() } else { when.join("; ") };
                // Not replaced: the phase ran its whole window (it ends early only once every
                // contender has replaced it).
                let mut replaced = cell(&os.iter().map(|o| o.replaced_s).collect::<Vec<_>>(), p.window_s);
                let errors: std::collections::BTreeSet<&str> =
                    os.iter().filter_map(|o| o.long_lived_error.as_deref()).collect();
                if !errors.is_empty() {
                    let _ = write!(replaced, " ({})", errors.into_iter().collect::<Vec<_>>().join(", "));
                }
                let mut back = cell(&os.iter().map(|o| o.back_s).collect::<Vec<_>>(), p.recovery_s);
                let failed_after: u64 = os.iter().map(|o| o.failed_after_undo).sum();
                if failed_after > 0 {
                    let _ = write!(back, " ({failed_after} failed)");
                }
                let _ = writeln!(
                    m,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    f.label(),
                    c.label,
                    count_cell(&os.iter().map(|o| o.failed).collect::<Vec<_>>()),
                    count_cell(&os.iter().map(|o| o.stalled).collect::<Vec<_>>()),
                    when,
                    cell(&os.iter().map(|o| o.left_s).collect::<Vec<_>>(), p.window_s - p.quiet_s),
                    replaced,
                    back,
                );
            }
        }
        let _ = writeln!(
            m,
            "\n- *failed*, *stalled*: loop requests that ended after the fault and started before the end of the fault \
             phase; *when*: when they ended, per round.\n\
             - *no request to the failed master after*: the start of the last loop request that the failed master \
             answered or that failed or stalled, provided the loop then ran clean for {} s after it ended; 0: not one \
             request after the fault reached it; \"> {} s\": still within the last {} s of the window.\n\
             - *long-lived connection replaced after*: the first answer from another master on a new connection, on \
             the client whose kept-alive connection was on the failed master (in brackets: the error it got first); \
             \"> N s\": its request was still hanging or it was still served by the failed master at the end.\n\
             - *back in use after the undo*: from the undo's return (a killed master restarted and ready, the link up, \
             `/readyz` fixed, SIGCONT) to the start of the first loop request the master answered.",
            super::report::num(p.quiet_s),
            super::report::num(p.window_s - p.quiet_s),
            super::report::num(p.quiet_s),
        );
        let _ = writeln!(
            m,
            "\nkha's own view (`kha status`, polled every 250 ms): the failed backend's state, seconds after the fault.\n"
        );
        let _ = writeln!(m, "| failure | round | master | states |\n|---|---|---|---|");
        for o in self.outcomes.iter().filter(|o| o.contender == "kha") {
            let states: Vec<String> =
                o.kha_states.iter().map(|(t, s)| format!("{s} {}", super::report::num(t.max(0.0)))).collect();
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} (undo at {}) |",
                o.failure.label(),
                o.round + 1,
                o.master,
                states.join(" → "),
                super::report::num(o.phase_s + o.undo_s)
            );
        }
        let errors: BTreeMap<String, BTreeMap<String, u64>> =
            self.outcomes.iter().filter(|o| !o.errors.is_empty()).fold(BTreeMap::new(), |mut acc, o| {
                let e: &mut BTreeMap<String, u64> =
                    acc.entry(format!("{} / {}", o.failure.id(), o.contender)).or_default();
                for (k, n) in &o.errors {
                    *e.entry(k.clone()).or_default() += n;
                }
                acc
            });
        if !errors.is_empty() {
            let _ = writeln!(
                m,
                "\nFailed loop requests by error:\n\n| failure / contender | errors |\n|---|---|"
            );
            for (k, e) in &errors {
                let _ = writeln!(
                    m,
                    "| {k} | {} |",
                    e.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", ")
                );
            }
        }
        let _ = writeln!(m, "\nLoop answers per master before each fault (the failed master in bold):\n");
        let _ = writeln!(
            m,
            "| failure | round | contender | answers | long-lived connections on |\n|---|---|---|---|---|"
        );
        for o in &self.outcomes {
            let answers: Vec<String> = o
                .before
                .iter()
                .map(|(k, n)| if *k == o.master { format!("**{k} {n}**") } else { format!("{k} {n}") })
                .collect();
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} |",
                o.failure.id(),
                o.round + 1,
                o.contender,
                answers.join(", "),
                o.long_lived_on.join(", ")
            );
        }
        m
    }
}

/// Checks that every failure × contender cell was produced in every round: the loop ran
/// before and after the fault, a long-lived connection was on the failed master, and the
/// table was written. Never how fast anything was.
pub fn verify(dir: &Path) -> Result<()> {
    let text = fs::read_to_string(dir.join(JSON))
        .with_context(|| format!("reading {}", dir.join(JSON).display()))?;
    let r: FailoverReport = serde_json::from_str(&text).context("parsing failover.json")?;
    let mut missing = Vec::new();
    for f in FAILURES {
        for c in contenders() {
            let os = r.cells(f, &c.id);
            if os.len() != r.plan.rounds {
                missing.push(format!("{} / {}: {} of {} rounds", f.id(), c.id, os.len(), r.plan.rounds));
            }
            for o in os {
                if o.before.values().sum::<u64>() == 0 {
                    missing.push(format!(
                        "{} / {} round {}: no answer before the fault",
                        f.id(),
                        c.id,
                        o.round + 1
                    ));
                }
                if o.requests == 0 {
                    missing.push(format!(
                        "{} / {} round {}: no request after the fault",
                        f.id(),
                        c.id,
                        o.round + 1
                    ));
                }
                if !o.long_lived_on.contains(&o.master) {
                    missing.push(format!(
                        "{} / {} round {}: no long-lived connection on {}",
                        f.id(),
                        c.id,
                        o.round + 1,
                        o.master
                    ));
                }
                if c.id == "kha" && o.kha_states.is_empty() {
                    missing.push(format!("{} / kha round {}: kha's states not read", f.id(), o.round + 1));
                }
            }
        }
    }
    let md = fs::read_to_string(dir.join(MARKDOWN)).unwrap_or_default();
    if !md.contains("| failure | contender |") || md.contains("**missing**") {
        missing.push(format!("{MARKDOWN} not written or incomplete"));
    }
    if !missing.is_empty() {
        bail!("the failover bench did not produce every cell:\n  {}", missing.join("\n  "));
    }
    Ok(())
}

/// Runs `cargo xtask bench failover --quick` and checks that every failure × contender cell
/// was produced (never how fast). Needs root.
#[allow(dead_code, reason = "called by `cargo xtask test`")]
pub fn failover_quick_check() -> Result<()> {
    let dir = run(&BenchArgs { quick: true, ..BenchArgs::default() })?;
    verify(&dir)?;
    println!("bench failover --quick: every failure × contender cell produced ({})", dir.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        t0: Instant,
        end_s: f64,
        latency_ms: f64,
        master: Option<&str>,
        error: Option<&str>,
        reused: bool,
    ) -> Rec {
        Rec {
            end: t0 + Duration::from_secs_f64(end_s),
            r: RequestRecord {
                seq: 0,
                ok: error.is_none(),
                status: master.map(|_| 200),
                master: master.map(str::to_owned),
                peer: None,
                local: None,
                reused,
                latency_ms,
                error: error.map(str::to_owned),
                detail: None,
            },
        }
    }

    #[test]
    fn outcome_counts_failures_stalls_and_times_from_the_fault() {
        let plan = Plan::quick();
        let base = Instant::now();
        let t0 = base + Duration::from_secs(2);
        let at = |s: f64| 2.0 + s;
        let looped = vec![
            rec(base, at(-1.0), 5.0, Some("m1"), None, false),
            rec(base, at(-0.5), 5.0, Some("m2"), None, false),
            // Started before the fault, failed after it.
            rec(base, at(0.01), 20.0, None, Some("response:EOF"), false),
            rec(base, at(0.5), 5.0, Some("m1"), None, false),
            rec(base, at(2.0), 1500.0, Some("m2"), None, false),
            rec(base, at(3.0), 5.0, Some("m2"), None, false),
            // After the phase: not counted in it.
            rec(base, at(9.5), 5.0, Some("m2"), None, false),
            // After the undo (at 10 s): the failed master answers at 12 s.
            rec(base, at(11.0), 5.0, Some("m2"), None, false),
            rec(base, at(12.0), 5.0, Some("m1"), None, false),
        ];
        let long_lived = vec![
            rec(base, at(-0.1), 1.0, Some("m1"), None, true),
            rec(base, at(2.5), 2500.0, None, Some("response:ECONNABORTED"), true),
            rec(base, at(2.6), 3.0, Some("m1"), None, false),
            rec(base, at(2.7), 3.0, Some("m3"), None, false),
        ];
        let t_end = t0 + Duration::from_secs(9);
        let t1 = t0 + Duration::from_secs(10);
        let o = outcome(&plan, Failure::Hung, 0, "kha", "m1", &looped, &long_lived, t0, t_end, t1);
        assert_eq!(o.before.get("m1"), Some(&1));
        assert_eq!((o.requests, o.failed, o.stalled), (4, 1, 1));
        assert_eq!(o.errors.get("response:EOF"), Some(&1));
        assert!((o.bad_first_s.unwrap() - 0.01).abs() < 1e-6);
        assert!((o.bad_last_s.unwrap() - 2.0).abs() < 1e-6);
        // Last to m1 or bad: the stall started at 0.5 s; answered by m1 at 0.495 s.
        assert!((o.last_to_failed_s.unwrap() - 0.5).abs() < 1e-6, "{o:?}");
        assert!((o.left_s.unwrap() - 0.5).abs() < 1e-6);
        assert_eq!(o.long_lived_error.as_deref(), Some("response:ECONNABORTED"));
        // The new connection that went to m1 again does not count as replaced.
        assert!((o.replaced_s.unwrap() - 2.7).abs() < 1e-6);
        assert_eq!(o.replaced_by.as_deref(), Some("m3"));
        assert!((o.back_s.unwrap() - 1.995).abs() < 1e-6, "{o:?}");
        assert_eq!(o.failed_after_undo, 0);
    }

    #[test]
    fn a_master_still_picked_late_in_the_phase_has_not_been_left() {
        let plan = Plan::quick();
        let t0 = Instant::now();
        let looped =
            vec![rec(t0, 8.0, 5.0, Some("m1"), None, false), rec(t0, 8.5, 5.0, Some("m2"), None, false)];
        let t_end = t0 + Duration::from_secs(10);
        let o = outcome(&plan, Failure::NotReady, 0, "nginx", "m1", &looped, &[], t0, t_end, t_end);
        assert_eq!(o.left_s, None);
        assert_eq!(o.replaced_s, None);
        assert_eq!(o.back_s, None);
        let clean = outcome(&plan, Failure::NotReady, 0, "nginx", "m3", &looped, &[], t0, t_end, t_end);
        assert_eq!(clean.left_s, Some(0.0));
        // Picked at 1 s, hung until 9 s: the loop made no request meanwhile, it has not
        // shown that it left.
        let hung = vec![rec(t0, 9.0, 8000.0, None, Some("tls:ECONNABORTED"), false)];
        let o = outcome(&plan, Failure::Hung, 0, "kha", "m1", &hung, &[], t0, t_end, t_end);
        assert_eq!((o.last_to_failed_s, o.left_s), (Some(1.0), None));
    }

    #[test]
    fn cells_show_bounds_for_what_did_not_happen() {
        assert_eq!(cell(&[Some(1.25)], 30.0), "1.25 s");
        assert_eq!(cell(&[None], 30.0), "> 30.0 s");
        assert_eq!(cell(&[Some(1.0), None, Some(3.0)], 30.0), "3.00 s [1.00 s–> 30.0 s]");
        assert_eq!(count_cell(&[0, 2]), "1 [0–2]");
        assert_eq!(count_cell(&[1, 2]), "1.5 [1–2]");
        assert_eq!(count_cell(&[1, 1]), "1");
        assert_eq!(cell(&[None, None], 30.0), "> 30.0 s");
    }

    fn complete_report(rounds: usize) -> FailoverReport {
        let mut outcomes = Vec::new();
        for round in 0..rounds {
            for f in FAILURES {
                for c in contenders() {
                    outcomes.push(Outcome {
                        contender: c.id.clone(),
                        failure: f,
                        round,
                        master: "m1".into(),
                        before: [("m1".to_owned(), 10)].into(),
                        long_lived_on: vec!["m1".into(), "m2".into()],
                        requests: 100,
                        kha_states: vec![(0.0, "up".into())],
                        ..Outcome::default()
                    });
                }
            }
        }
        FailoverReport {
            plan: Plan { rounds, ..Plan::quick() },
            duration_s: 1.0,
            machine: machine::Machine::default(),
            settings: BTreeMap::new(),
            contenders: contenders(),
            failures: FAILURES.to_vec(),
            outcomes,
        }
    }

    #[test]
    fn verify_accepts_every_cell_and_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("kha-bench-failover-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let write = |r: &FailoverReport| {
            fs::write(dir.join(JSON), serde_json::to_string(r).unwrap()).unwrap();
            fs::write(dir.join(MARKDOWN), r.markdown()).unwrap();
        };
        let mut r = complete_report(2);
        write(&r);
        verify(&dir).unwrap();
        assert!(
            r.markdown()
                .contains("| hung (SIGSTOP) | haproxy | 0 | 0 | – | > 7.00 s | > 10.0 s | > 5.00 s |")
        );
        r.outcomes.retain(|o| !(o.failure == Failure::Hung && o.contender == "nginx" && o.round == 1));
        r.outcomes[0].long_lived_on = vec!["m2".into()];
        write(&r);
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("hung / nginx: 1 of 2 rounds"), "{err}");
        assert!(err.contains("killed / kha round 1: no long-lived connection on m1"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn help_defaults_are_read_per_flag() {
        let help = "      --probe-interval-ms <MS>\n          [default: 2000]\n\n      --rise <RISE>\n          Successful probes\n          \n          [default: 2]\n      --x\n";
        assert_eq!(help_default(help, "--probe-interval-ms").as_deref(), Some("2000"));
        assert_eq!(help_default(help, "--rise").as_deref(), Some("2"));
        assert_eq!(help_default(help, "--x"), None);
    }
}
