//! The agent's memory as operators run it (`cargo xtask bench memory`): the `dist` build with
//! discovery on, against the real control plane (three etcd members and kube-apiservers,
//! `kha_lab::real`), idle and under c=128 HTTPS through kha's frontend. The figure is the main
//! bench's (the agent's RSS plus what its maps and programs pin), here with the Kubernetes
//! client running, split into anonymous and file-backed pages and into maps by name, so a
//! change shows where it moved memory.

use std::{
    fmt::Write as _,
    fs,
    io::Read as _,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::{
    bed::Bed,
    real::{RealControlPlane, RealOptions, User},
};
use serde::Serialize;

use super::{BenchArgs, machine, procfs};

/// The goal of the detection issue: RSS plus memlock.
pub const GOAL_MIB: f64 = 10.0;
const CONCURRENCY: usize = 128;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Bound on discovery serving every master, and on the load tool beyond its own deadline.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
const TOOL_SLACK: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub seconds: f64,
    /// Highest RSS sampled, and its anonymous and file-backed parts at that sample.
    pub peak_rss: u64,
    pub peak_anon: u64,
    pub peak_file: u64,
    /// Maps' and programs' memlock at the phase's end.
    pub pinned: u64,
    /// The load through kha's frontend meanwhile: requests answered, failed.
    pub ok: u64,
    pub failed: u64,
}

impl Phase {
    pub fn total_mib(&self) -> f64 {
        mib(self.peak_rss + self.pinned)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: machine::Machine,
    pub binary: String,
    pub binary_bytes: u64,
    pub masters_served: usize,
    pub phases: Vec<Phase>,
    /// Memlock per map and of the programs, at the end.
    pub maps: std::collections::BTreeMap<String, u64>,
    pub programs: u64,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

pub fn run(args: &BenchArgs) -> Result<PathBuf> {
    let (kha, kind, out) = super::prepare(
        args,
        "the memory bench creates network namespaces, attaches eBPF programs and runs the real control plane",
    )?;
    let bins = crate::setup::controlplane::ensure()?;
    // SAFETY: no other thread runs yet; the control plane reads it to find its binaries.
    unsafe { std::env::set_var("KHA_CONTROLPLANE_BIN", bins) };
    let (idle_s, load_ms) = if args.quick { (3, 3000) } else { (30, 20_000) };
    eprintln!(
        "xtask: bench memory: kha {}, {kind} lab client; starting 3 etcd members and kube-apiservers",
        kha.display()
    );
    let mut bed = Bed::create_empty(3).context("building the lab")?;
    // Discovery's API client reaches the masters from the node's namespace, as on a node.
    bed.agent_in_node = true;
    let cp = RealControlPlane::start(&bed.lab, RealOptions::default())
        .context("starting the real control plane")?;
    let state_dir = std::env::temp_dir().join(format!("kha-bench-memory-{}", std::process::id()));
    let result = measure(&mut bed, &cp, &state_dir, Duration::from_secs(idle_s), load_ms);
    let _ = fs::remove_dir_all(&state_dir);
    drop(cp);
    drop(bed);
    let (masters_served, phases, pinned) = result?;
    let report = Report {
        machine: machine::describe(),
        binary: kha.display().to_string(),
        binary_bytes: fs::metadata(&kha).map(|m| m.len()).unwrap_or(0),
        masters_served,
        phases,
        maps: pinned.maps,
        programs: pinned.programs,
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    fs::write(out.join("memory.json"), serde_json::to_string_pretty(&report)?)?;
    fs::write(out.join("memory.md"), markdown(&report))?;
    Ok(out)
}

/// Checks a run of the memory bench produced every figure (never how much memory it was).
pub fn verify(dir: &std::path::Path) -> Result<()> {
    let text = fs::read_to_string(dir.join("memory.json")).context("reading memory.json")?;
    let r: serde_json::Value = serde_json::from_str(&text).context("parsing memory.json")?;
    let phases = r["phases"].as_array().context("no phases")?;
    let mut missing = vec![];
    if r["masters_served"] != 3 {
        missing.push(format!("discovery served {} masters, not 3", r["masters_served"]));
    }
    for p in phases {
        if p["peak_rss"].as_u64().unwrap_or(0) == 0 || p["pinned"].as_u64().unwrap_or(0) == 0 {
            missing.push(format!("{}: no memory sampled", p["name"]));
        }
    }
    if phases.len() != 2 || phases[1]["ok"].as_u64().unwrap_or(0) == 0 {
        missing.push("no request answered under load".into());
    }
    if r["maps"].as_object().is_none_or(|m| !m.contains_key("KHA_PROBES")) {
        missing.push("the agent-only maps are not counted".into());
    }
    if !missing.is_empty() {
        bail!("the memory bench is incomplete:\n  {}", missing.join("\n  "));
    }
    Ok(())
}

type Measured = (usize, Vec<Phase>, procfs::KhaPinned);

fn measure(
    bed: &mut Bed,
    cp: &RealControlPlane,
    state_dir: &std::path::Path,
    idle: Duration,
    load_ms: u64,
) -> Result<Measured> {
    let masters: Vec<String> = bed.lab.masters().iter().map(|m| m.https_v4().to_string()).collect();
    // One static backend: discovery brings the others, as on a node that knows one master.
    let kubeconfig = cp
        .kubeconfig("discovery.kubeconfig", User::Admin, &format!("https://{}", masters[0]), None)
        .context("writing discovery's kubeconfig")?;
    let ca = cp.files.pki.ca_cert.display().to_string();
    let n = &cp.files.node;
    let args: Vec<String> = [
        "--frontend",
        "127.0.0.1:6443",
        "--frontend",
        "[::1]:6443",
        "--backend",
        &masters[0],
        "--discover",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--state-dir",
        &state_dir.display().to_string(),
        "--ca-file",
        &ca,
        "--client-cert",
        &n.cert.display().to_string(),
        "--client-key",
        &n.key.display().to_string(),
        "--metrics-addr",
        "none",
        "--health-addr",
        "none",
    ]
    .map(String::from)
    .to_vec();
    bed.start_agent(&args).context("starting kha")?;
    let served = wait_served(bed, &masters)?;
    let pid = bed.agent_pid().context("the agent's pid")?;

    let idle_phase = sample(bed, pid, "idle, discovery on", None, idle)?;
    let load: Vec<String> = [
        "load",
        "https",
        "--target",
        "127.0.0.1:6443",
        "--ca",
        &ca,
        "--path",
        "/readyz",
        "--concurrency",
        &CONCURRENCY.to_string(),
        "--count",
        "5000000",
        "--duration-ms",
        &load_ms.to_string(),
        "--timeout-ms",
        "10000",
    ]
    .map(String::from)
    .to_vec();
    let child = kha_lab::netns::KillOnDrop(bed.spawn_lab_tool(true, &load)?);
    let load_phase =
        sample(bed, pid, "c=128 HTTPS /readyz through kha", Some(child), Duration::from_millis(load_ms))?;
    let pinned = procfs::kha_pinned(bed)?;
    Ok((served, vec![idle_phase, load_phase], pinned))
}

/// Waits until kha serves every master on its first frontend; returns how many it serves.
fn wait_served(bed: &Bed, masters: &[String]) -> Result<usize> {
    let started = Instant::now();
    loop {
        let up = bed.status().map_or(0, |s| {
            s["frontends"][0]["backends"].as_array().map_or(0, |b| {
                b.iter()
                    .filter(|b| masters.iter().any(|m| b["address"] == m.as_str()))
                    .filter(|b| b["state"] == "up" && b["serving"] == true)
                    .count()
            })
        });
        if up == masters.len() {
            return Ok(up);
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            bail!(
                "kha served {up} of {} masters after {SETTLE_TIMEOUT:?}: discovery did not bring them",
                masters.len()
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

/// Samples the agent's RSS for `length`, or while `load` runs (bounded by `length` and some
/// slack); the load's report gives the requests answered.
fn sample(
    bed: &Bed,
    pid: u32,
    name: &'static str,
    mut load: Option<kha_lab::netns::KillOnDrop>,
    length: Duration,
) -> Result<Phase> {
    let started = Instant::now();
    let (mut peak_rss, mut peak_anon, mut peak_file) = (0, 0, 0);
    loop {
        let rss = procfs::rss_bytes(pid).context("the agent exited")?;
        if rss > peak_rss {
            peak_rss = rss;
            peak_anon = procfs::status_bytes(pid, "RssAnon").unwrap_or(0);
            peak_file = procfs::status_bytes(pid, "RssFile").unwrap_or(0);
        }
        let done = match load.as_mut() {
            Some(child) => child.try_wait()?.is_some(),
            None => started.elapsed() >= length,
        };
        if done {
            break;
        }
        if started.elapsed() > length + TOOL_SLACK {
            bail!("the load tool did not finish in time");
        }
        thread::sleep(SAMPLE_EVERY);
    }
    let (ok, failed) = match load {
        Some(mut child) => load_counts(&mut child)?,
        None => (0, 0),
    };
    let pinned = procfs::kha_pinned(bed)?.total();
    let p = Phase {
        name,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss,
        peak_anon,
        peak_file,
        pinned,
        ok,
        failed,
    };
    eprintln!(
        "  {name}: RSS {:.1} MiB (anon {:.1}, file {:.1}) + pinned {:.1} MiB = {:.1} MiB; {ok} requests, {failed} failed",
        mib(peak_rss),
        mib(peak_anon),
        mib(peak_file),
        mib(pinned),
        p.total_mib()
    );
    Ok(p)
}

fn load_counts(child: &mut kha_lab::netns::KillOnDrop) -> Result<(u64, u64)> {
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    let line = out.lines().rev().find(|l| l.starts_with('{')).context("no report from kha-lab load")?;
    let v: serde_json::Value = serde_json::from_str(line).context("parsing the load report")?;
    Ok((v["ok"].as_u64().unwrap_or(0), v["failed"].as_u64().unwrap_or(0)))
}

fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# The agent's memory with discovery on, {}\n", r.machine.date);
    let _ = writeln!(m, "Machine: {}.\n", r.machine.one_line());
    let _ = writeln!(
        m,
        "kha: `{}` ({:.1} MB), discovery on against 3 real kube-apiservers (it serves {} of them), probes on.\n",
        r.binary,
        r.binary_bytes as f64 / 1e6,
        r.masters_served
    );
    let _ = writeln!(
        m,
        "| phase | RSS (MiB) | of it anonymous | of it file-backed | maps + programs (MiB) | total (MiB) | at most {GOAL_MIB} MiB |\n|---|---|---|---|---|---|---|"
    );
    for p in &r.phases {
        let met = if p.total_mib() <= GOAL_MIB { "met" } else { "not met" };
        let _ = writeln!(
            m,
            "| {}{} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {met} |",
            p.name,
            if p.ok + p.failed > 0 {
                format!(" ({} answered, {} failed)", p.ok, p.failed)
            } else {
                String::new()
            },
            mib(p.peak_rss),
            mib(p.peak_anon),
            mib(p.peak_file),
            mib(p.pinned),
            p.total_mib()
        );
    }
    let _ = writeln!(m, "\n| pinned | KiB |\n|---|---|");
    for (name, bytes) in &r.maps {
        let _ = writeln!(m, "| {name} | {:.0} |", *bytes as f64 / 1024.0);
    }
    let _ = writeln!(m, "| programs | {:.0} |", r.programs as f64 / 1024.0);
    m
}
