//! `cargo xtask demo`: kha in the built-in lab (3 simulated masters in network namespaces, a
//! node namespace and cgroup where kha runs), in three acts: calls through 127.0.0.1:6443 and
//! [::1]:6443 spread over the masters; a master killed under long-lived connections and a loop
//! of calls; a master whose /readyz fails while it still serves. Everything is removed on
//! exit, Ctrl-C or failure. Running kha on a real node is `cargo xtask run` (`kha run`).

mod client;
mod failover;
mod kha_view;
mod timeline;
mod watch;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use kha_lab::bed::Bed;

use crate::{
    cmd,
    masters::{self, Masters},
    setup,
};
use client::Kind;
use failover::Fault;
use timeline::{bad, good, tally};

#[derive(clap::Args)]
pub struct DemoArgs {
    // Fields are public so that `cargo xtask test` can run a short demo as a smoke test.
    /// Calls per frontend (127.0.0.1:6443, then [::1]:6443) in the first act.
    #[arg(long, default_value_t = 12)]
    pub calls: u32,
    /// How long the loop of calls runs before each fault, in ms.
    #[arg(long, default_value_t = 1500)]
    pub warmup_ms: u64,
    /// How long the loop keeps running once the long-lived connection has moved, in ms.
    #[arg(long, default_value_t = 2000)]
    pub hold_ms: u64,
    /// The same acts against the real control plane: an etcd member and a kube-apiserver in
    /// each master namespace (`./x setup --controlplane` builds them; the first time takes
    /// minutes).
    #[arg(long)]
    pub real: bool,
}

impl DemoArgs {
    /// The smoke test of `cargo xtask test`: every act, each shorter.
    pub fn quick() -> DemoArgs {
        DemoArgs { calls: 4, warmup_ms: 600, hold_ms: 500, real: false }
    }
}

/// The agent's drain time in the demo, shorter than the default (10 s) so that act 3 need not
/// wait; the probes keep their defaults, so what the acts show is what a node gets.
const DRAIN_S: u64 = 2;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM go to `handler`: [`on_signal`] or `SIG_IGN`.
fn on_signals(handler: libc::sighandler_t) {
    // SAFETY: on_signal only stores to an atomic; SIG_IGN has no code to run.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn stopped() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// `r`, unless Ctrl-C came meanwhile: then what failed was the processes it stopped.
fn interrupted_or<T>(r: Result<T>) -> Result<T> {
    stopped()?;
    r
}

/// Waits `d`, returning early with an error on Ctrl-C.
fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        stopped()?;
        thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    Ok(())
}

pub fn demo(args: DemoArgs) -> Result<()> {
    setup::setup()?;
    cmd::require_root("the demo lab creates network namespaces and attaches eBPF programs")?;
    cmd::build_debug()?;
    if args.real {
        let bins = setup::controlplane::ensure()?;
        // SAFETY: no other thread runs yet; the control plane reads it to find its binaries.
        unsafe { std::env::set_var("KHA_CONTROLPLANE_BIN", bins) };
    }
    STOP.store(false, Ordering::SeqCst);
    // Ctrl-C reaches the whole process group: clients, masters and agent stop by themselves,
    // and this process must live on to remove the lab.
    on_signals(on_signal as *const () as libc::sighandler_t);
    let started = Instant::now();
    if args.real {
        println!(
            "== building the lab: a node namespace and 3 masters, each an etcd member and a kube-apiserver"
        );
    } else {
        println!(
            "== building the lab: a node namespace and 3 masters (TLS, /readyz /livez /healthz /version)"
        );
    }
    let (mut bed, mut cp) = interrupted_or(masters::create(3, args.real))?;
    let result = acts(&mut Masters { bed: &mut bed, real: cp.as_mut() }, &args);
    println!("\n== removing the lab (kha detach, namespaces, cgroup)");
    // Another Ctrl-C now would kill the removal's own commands (`kha detach`, `ip netns del`)
    // half-way: they and this process ignore it until the lab is gone (an ignored signal stays
    // ignored across exec).
    on_signals(libc::SIG_IGN);
    drop(cp);
    drop(bed);
    on_signals(on_signal as *const () as libc::sighandler_t);
    println!("   done in {:.1} s", started.elapsed().as_secs_f64());
    let problems = result?;
    // Ctrl-C during the last `kha status`: the demo did not run to its end.
    stopped()?;
    if !problems.is_empty() {
        bail!("the demo did not go as it should:\n  {}", problems.join("\n  "));
    }
    println!("{}", good("every call of the loops was answered; each failed master was left and came back"));
    Ok(())
}

/// Everything between building the lab and removing it; returns what went wrong.
fn acts(ms: &mut Masters, args: &DemoArgs) -> Result<Vec<String>> {
    let bed = &*ms.bed;
    for m in bed.lab.masters() {
        println!("   {}  {:<16} {}", m.name, m.https_v4(), m.https_v6());
    }
    let mut agent_args: Vec<String> =
        ["--frontend", "127.0.0.1:6443", "--frontend", "[::1]:6443"].map(String::from).to_vec();
    for m in bed.lab.masters() {
        agent_args.extend(["--backend".into(), m.https_v4().to_string()]);
    }
    // The probes verify the masters against the lab's CA, as a node's agent does with the
    // cluster CA. Nothing listens on the host: the lab may run beside a real agent.
    let ca = ms.real.as_ref().map_or(&bed.pki.ca_cert, |cp| &cp.files.pki.ca_cert).display().to_string();
    agent_args.extend(["--ca-file".into(), ca.clone()]);
    if let Some(cp) = &ms.real {
        // The probes authenticate as the node, with kubelet's kind of client certificate.
        let n = &cp.files.node;
        agent_args.extend(["--client-cert".into(), n.cert.display().to_string()]);
        agent_args.extend(["--client-key".into(), n.key.display().to_string()]);
    }
    agent_args.extend(
        ["--drain-time", &DRAIN_S.to_string(), "--metrics-addr", "none", "--health-addr", "none"]
            .map(String::from),
    );
    println!("\n== starting kha: kha run {}", agent_args.join(" "));
    println!(
        "   (demo setting: --drain-time {DRAIN_S} instead of 10 s, so that act 3 need not wait; the probes keep \
         kha's defaults)"
    );
    interrupted_or(ms.bed.start_agent(&agent_args).context("starting kha"))?;
    let bed = &*ms.bed;
    wait_all_up(bed, Duration::from_secs(20))?;

    let mut problems = Vec::new();
    println!(
        "\n== act 1: a client on the node calls https://localhost:6443/version, a new connection each time"
    );
    let failed = spread(bed, &ca, args)?;
    if failed > 0 {
        problems.push(format!("{failed} calls failed in act 1"));
    }
    println!("\n== kha status");
    print_status(bed);

    let mut failed_masters = Vec::new();
    for (n, fault) in [(2, Fault::Kill), (3, Fault::NotReady)] {
        stopped()?;
        println!("\n== act {n}: {}", fault.title(args.real));
        let o = failover::act(ms, &ca, args, fault, &failed_masters)?;
        problems.extend(o.problems.into_iter().map(|p| format!("act {n}: {p}")));
        failed_masters.push(o.victim);
    }
    println!("\n== kha status at the end");
    print_status(ms.bed);
    Ok(problems)
}

/// Act 1: calls through each frontend, then how they spread; returns how many failed.
fn spread(bed: &Bed, ca: &str, args: &DemoArgs) -> Result<usize> {
    let mut all = Vec::new();
    let mut failed = 0;
    for dial in ["127.0.0.1:6443", "[::1]:6443"] {
        let mut c = client::spawn(bed, ca, Kind::Loop, dial, args.calls.into())?;
        while c.recs.len() < args.calls as usize && !c.closed {
            pause(Duration::from_millis(20))?;
            c.pull();
        }
        let answers: Vec<&str> = c.recs.iter().map(|r| r.master().unwrap_or("-")).collect();
        let mut peers: Vec<&str> = c.recs.iter().filter_map(|r| r.r.peer.as_deref()).collect();
        peers.dedup();
        println!("   dialing {dial:<15} answered by: {}", answers.join(" "));
        println!(
            "   {:<24} the client's getpeername says {}: kha rewrote only the connect",
            "",
            peers.join(", ")
        );
        for r in c.recs.iter().filter(|r| !r.r.ok) {
            println!(
                "   {}",
                bad(format!("call {} FAILED: {}", r.r.seq + 1, r.r.error.as_deref().unwrap_or("?")))
            );
            failed += 1;
        }
        if c.recs.len() < args.calls as usize {
            println!(
                "   {}",
                bad(format!("the client ended after {} calls: {:?}", c.recs.len(), c.exited()))
            );
            failed += args.calls as usize - c.recs.len();
        }
        all.extend(c.recs.into_iter().filter_map(|r| r.r.master));
    }
    println!("   how the {} calls spread: {}", all.len(), tally(all.iter().map(String::as_str)));
    let mut n: std::collections::BTreeMap<&str, usize> = Default::default();
    for m in &all {
        *n.entry(m).or_default() += 1;
    }
    for (m, k) in n {
        let pct = 100 * k / all.len().max(1);
        println!("   {m:<4} {k:>4}  {:<40} {pct}%", "#".repeat((pct * 40 / 100).max(1)));
    }
    Ok(failed)
}

fn print_status(bed: &Bed) {
    let out = bed.kha(&["status"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }
}

/// Waits until kha has probed every master `up`.
fn wait_all_up(bed: &Bed, bound: Duration) -> Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        let states: Vec<String> = bed
            .status()
            .and_then(|s| {
                s["frontends"].as_array().map(|f| {
                    f.iter()
                        .flat_map(|f| f["backends"].as_array().cloned().unwrap_or_default())
                        .map(|b| b["state"].as_str().unwrap_or("?").to_owned())
                        .collect()
                })
            })
            .unwrap_or_default();
        if !states.is_empty() && states.iter().all(|s| s == "up") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "kha did not have every master up within {bound:?}: {states:?}; agent log:\n{}",
                bed.agent_log_text()
            );
        }
        pause(Duration::from_millis(100))?;
    }
}
