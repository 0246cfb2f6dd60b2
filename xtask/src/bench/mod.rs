//! `cargo xtask bench`: kha against the userspace proxies it replaces (nginx and haproxy as
//! kubespray configures them) and against the client dialing the masters itself, on the
//! same masters and the same client, in one run of interleaved rounds.
//!
//! - [`figures`]: contenders and the catalog of figures.
//! - [`lab`]: the bed (masters, kha's agent), scaling listeners, the proxies' services.
//! - [`proxy`]: nginx and haproxy: install, config (kubespray's), start, stop.
//! - [`run`]: the rounds; each load is a `kha-lab load` process (`kha_lab::load`).
//! - [`procfs`]: CPU and memory of a load balancer; kha's program run time.
//! - [`report`], [`plot`], [`machine`]: `target/bench/results.{json,md,svg}`.
//! - [`failover`]: `cargo xtask bench failover`, `target/bench/failover.{json,md}`.
//! - [`memory`]: `cargo xtask bench memory`, the agent with discovery on against the real
//!   control plane, `target/bench/memory.{json,md}`.
//! - [`probe_client`]: `cargo xtask bench probe-client`, the probe's HTTP/1.1 client against
//!   hyper's, `target/bench/probe-client.md`.
//!
//! How to read and reproduce the results: `docs/benchmarks.md`.

mod failover;
mod figures;
mod lab;
mod machine;
mod memory;
mod plot;
mod probe_client;
mod probe_cost;
mod procfs;
mod proxy;
mod report;
mod run;

use std::{collections::BTreeMap, path::PathBuf, sync::atomic::Ordering, time::Instant};

use anyhow::{Context as _, Result};

use crate::{cmd, setup};

#[allow(unused_imports, reason = "called by `cargo xtask test`")]
pub use failover::failover_quick_check;

/// What `cargo xtask bench` runs.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// Failed masters: failed requests, time until traffic and long-lived connections leave
    /// (kha with health checks, nginx, haproxy).
    Failover,
    /// What probing costs a real kube-apiserver (kept-alive `/readyz` against a new TLS
    /// connection each, as haproxy does), and the fleet model built on it.
    ProbeCost,
    /// The agent's memory with discovery on against the real control plane, idle and under
    /// c=128 HTTPS, by part (anonymous, file-backed, each map).
    Memory,
    /// The probe's hand-written HTTP/1.1 client against hyper's: CPU, heap and instructions
    /// per exchange on one kept-alive TLS connection (no root).
    ProbeClient,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct BenchArgs {
    /// `failover`: the failover bench instead of the main figures.
    #[arg(value_enum)]
    pub suite: Option<Suite>,
    /// Everything with small counts, in about a minute: checks the harness; the figures
    /// mean little.
    #[arg(long)]
    pub quick: bool,
    /// `failover`: against the real control plane (kube-apiserver, etcd, client-go watchers;
    /// `./x setup --controlplane` builds them) instead of simulated masters.
    #[arg(long)]
    pub real: bool,
    /// `failover`: one round of the failures the proxies leave connections on (blackholed,
    /// hung), each with a 180 s window: how long they really do, against kha (about 10 min;
    /// not in CI). Writes failover-long.{json,md}.
    #[arg(long, conflicts_with_all = ["quick", "real"])]
    pub long: bool,
    /// Rounds (default: 5; --quick: 2; failover: 2, --quick: 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub rounds: Option<u64>,
    /// Use release builds of kha and kha-lab also with --quick (a full run always does).
    #[arg(long)]
    pub release: bool,
    /// Where to write results.{json,md,svg} or failover.{json,md} (default: target/bench,
    /// --quick: target/bench/quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Counts and durations of one kind of run.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: &'static str,
    pub rounds: usize,
    /// Connects per contender and round (connect, first byte), bounded by `connect_ms`.
    pub connect_count: u64,
    pub connect_ms: u64,
    /// Connects per contender, case and round in the scaling figures.
    pub scale_count: u64,
    /// Length of each HTTPS rate run and of the kept-alive latency run.
    pub https_ms: u64,
    pub keepalive_ms: u64,
    /// Upper bound on requests of a time-bound run.
    pub max_count: u64,
    pub bulk_bytes: u64,
    pub bulk_timeout_ms: u64,
}

impl Profile {
    pub fn full() -> Self {
        Profile {
            name: "full",
            rounds: 5,
            connect_count: 5000,
            connect_ms: 10_000,
            scale_count: 3000,
            https_ms: 2000,
            keepalive_ms: 2000,
            max_count: 5_000_000,
            bulk_bytes: 1 << 30,
            bulk_timeout_ms: 120_000,
        }
    }

    pub fn quick() -> Self {
        Profile {
            name: "quick",
            rounds: 2,
            connect_count: 300,
            connect_ms: 2000,
            scale_count: 200,
            https_ms: 250,
            keepalive_ms: 250,
            max_count: 1_000_000,
            bulk_bytes: 16 << 20,
            bulk_timeout_ms: 30_000,
        }
    }

    fn settings(&self, binaries: &str) -> BTreeMap<String, String> {
        let mut s = BTreeMap::new();
        s.insert("binaries".into(), binaries.into());
        s.insert("connects per run".into(), self.connect_count.to_string());
        s.insert("scaling connects per run".into(), self.scale_count.to_string());
        s.insert("HTTPS run".into(), format!("{} ms", self.https_ms));
        s.insert("kept-alive run".into(), format!("{} ms", self.keepalive_ms));
        s.insert("bulk".into(), format!("{} MiB", self.bulk_bytes >> 20));
        s
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    run::STOP.store(true, Ordering::SeqCst);
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.suite == Some(Suite::Failover) {
        let dir = failover::run(&args)?;
        let (json, md) = failover::files(&failover::plan_for(&args));
        println!("{}", std::fs::read_to_string(dir.join(md)).unwrap_or_default());
        println!("written: {}/{{{json},{md}}}", dir.display());
        return Ok(());
    }
    if args.suite == Some(Suite::ProbeCost) {
        let dir = probe_cost::run(&args)?;
        println!("{}", std::fs::read_to_string(dir.join("probe-cost.md")).unwrap_or_default());
        println!("written: {}/probe-cost.{{json,md}}", dir.display());
        return Ok(());
    }
    if args.suite == Some(Suite::Memory) {
        let dir = memory::run(&args)?;
        println!("{}", std::fs::read_to_string(dir.join("memory.md")).unwrap_or_default());
        println!("written: {}/memory.{{json,md}}", dir.display());
        return Ok(());
    }
    if args.suite == Some(Suite::ProbeClient) {
        let dir = probe_client::run(&args)?;
        println!("{}", std::fs::read_to_string(dir.join("probe-client.md")).unwrap_or_default());
        println!("written: {}/probe-client.md", dir.display());
        return Ok(());
    }
    let dir = run_bench(&args)?;
    let md = std::fs::read_to_string(dir.join(report::MARKDOWN)).unwrap_or_default();
    println!("{md}");
    println!("written: {}/{{{},{},{}}}", dir.display(), report::JSON, report::MARKDOWN, report::PLOT);
    Ok(())
}

/// Runs `cargo xtask bench memory --quick` and checks that it measured both phases with
/// discovery serving every master (never how much memory it was). Needs root.
#[allow(dead_code, reason = "called by `cargo xtask test`")]
pub fn memory_quick_check() -> Result<()> {
    let dir = memory::run(&BenchArgs { quick: true, suite: Some(Suite::Memory), ..BenchArgs::default() })?;
    memory::verify(&dir)?;
    println!(
        "bench memory --quick: both phases measured, discovery serving every master ({})",
        dir.display()
    );
    Ok(())
}

/// Runs `cargo xtask bench --quick` and checks that every figure was produced for every
/// contender in every round (never how fast anything was). Needs root.
#[allow(dead_code, reason = "called by `cargo xtask test`")]
pub fn quick_check() -> Result<()> {
    let dir = run_bench(&BenchArgs { quick: true, ..BenchArgs::default() })?;
    report::verify(&dir)?;
    println!("bench --quick: every figure produced for every contender ({})", dir.display());
    Ok(())
}

/// What the benches do first: set-up, root, the builds they measure (kha as operators run it,
/// the `dist` build; the lab release for real figures: a debug TLS stack in the masters and
/// the client would be what is measured; --quick only checks the harness and uses the
/// lab's debug build), the binaries' paths for the bed, the proxies, and the output
/// directory. Returns (the agent's binary, the lab's "release"/"debug", out).
pub(crate) fn prepare(args: &BenchArgs, why: &str) -> Result<(PathBuf, &'static str, PathBuf)> {
    setup::setup()?;
    cmd::require_root(why)?;
    let release = args.release || !args.quick;
    let kind = if release { "release" } else { "debug" };
    if release {
        cmd::cargo(&["build", "--quiet", "--release", "-p", "kha-lab"])?;
    } else {
        cmd::build_debug()?;
    }
    let bin = cmd::target_dir().join(kind);
    // The agent as operators run it, also with --quick: its memory is one of the figures,
    // and its static build must keep working.
    let kha = cmd::build_dist()?;
    // SAFETY: no other thread runs yet; the bed reads these to find the binaries.
    unsafe {
        std::env::set_var("KHA_LAB_BIN", bin.join("kha-lab"));
        std::env::set_var("KHA_BIN", &kha);
    }
    proxy::ensure_installed()?;
    let out = args.out.clone().unwrap_or_else(|| {
        let d = cmd::target_dir().join("bench");
        if args.quick { d.join("quick") } else { d }
    });
    Ok((kha, kind, out))
}

fn run_bench(args: &BenchArgs) -> Result<PathBuf> {
    let (_, kind, out) = prepare(
        args,
        "the bench creates network namespaces, attaches eBPF programs and runs nginx and haproxy",
    )?;
    let mut profile = if args.quick { Profile::quick() } else { Profile::full() };
    if let Some(r) = args.rounds {
        profile.rounds = r as usize;
    }
    run::STOP.store(false, Ordering::SeqCst);
    // Ctrl-C reaches the whole process group: the load tool, masters and proxies stop by
    // themselves, and this process lives on to remove the lab and restore the sysctl.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let load_before = loadavg();
    let started = Instant::now();
    eprintln!(
        "xtask: bench: {} run, {} rounds, {kind} binaries; building the lab",
        profile.name, profile.rounds
    );
    let values = {
        let mut lab = lab::BenchLab::create().context("setting up the bench")?;
        run::run(&mut lab, &profile)?
        // The lab drops here: proxies, listeners, agent, pins, namespaces, cgroup.
    };
    let mut settings = profile.settings(&format!("kha dist (static), lab {kind}"));
    // Other work on the machine moves the figures: say how busy it was.
    settings.insert("load average before".into(), load_before);
    settings.insert("load average after".into(), loadavg());
    let report = report::Report::build(
        profile.name,
        profile.rounds,
        started.elapsed().as_secs_f64(),
        machine::describe(),
        settings,
        &values,
        run::spread_text(&values),
    );
    report.write(&out)?;
    Ok(out)
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
