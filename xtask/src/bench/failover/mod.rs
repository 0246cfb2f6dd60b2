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
//! What is measured (see [`outcome`](mod@outcome) and `docs/benchmarks.md`):
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
//!
//! This file runs the bench and its phases (warm-up, fault, recovery); [`plan`] holds the
//! profiles, failures and contenders, [`world`] the lab, kha and the proxies, [`client`] the
//! client processes, [`outcome`](mod@outcome) the figures, [`report`] the JSON, markdown
//! and [`verify`], [`kha_defaults`] kha's settings read from its `--help`, [`wait`] the
//! Ctrl-C checks.

mod client;
mod goals;
mod kha_defaults;
mod outcome;
mod plan;
mod ratio;
mod real;
mod report;
mod rolling;
mod wait;
mod world;

use std::{
    fs,
    path::PathBuf,
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
pub use report::files;

use self::{
    kha_defaults::kha_settings,
    outcome::{Outcome, outcome, rel, settled},
    plan::{Failure, KEEP_INTERVAL_MS, LOOP_INTERVAL_MS, Plan, contenders},
    report::{FailoverReport, secs, verify},
    wait::{pause, stopped},
    world::World,
};
use super::{BenchArgs, machine, run::STOP};

/// The profile `args` ask for.
pub fn plan_for(args: &BenchArgs) -> Plan {
    let mut plan = match (args.long, args.quick) {
        (true, _) => Plan::long(),
        (false, true) => Plan::quick(),
        (false, false) => Plan::full(),
    };
    plan.real = args.real;
    if let Some(r) = args.rounds {
        plan.rounds = r as usize;
    }
    plan
}

/// Runs the failover bench; returns the directory written to.
pub fn run(args: &BenchArgs) -> Result<PathBuf> {
    let (kha, kind, out) = super::prepare(
        args,
        "the failover bench creates network namespaces, attaches eBPF programs and runs nginx and haproxy",
    )?;
    if args.real {
        let bins = crate::setup::controlplane::ensure()?;
        // SAFETY: no other thread runs yet; the control plane reads it to find its binaries.
        unsafe { std::env::set_var("KHA_CONTROLPLANE_BIN", bins) };
    }
    let plan = plan_for(args);
    let mut settings = kha_settings(&kha)?;
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
        "xtask: bench failover: {} run{}, {} round(s) of {} failures, {kind} binaries; building the lab",
        plan.profile,
        if plan.real { " against the real control plane" } else { "" },
        plan.rounds,
        plan.failures().len()
    );
    let outcomes = {
        let mut world = World::create(plan.real)?;
        let mut all = Vec::new();
        let mut k = 0;
        for round in 0..plan.rounds {
            for failure in plan.failures() {
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
        let rolling = if plan.real {
            rolling::rolling_restarts(&mut world, Plan::d(plan.settle_s))?
        } else {
            Vec::new()
        };
        (all, rolling)
        // The world drops here: clients, proxies, agent, pins, masters, namespaces.
    };
    let (outcomes, rolling) = outcomes;
    settings.insert("load average before".into(), load_before);
    settings.insert("load average after".into(), super::loadavg());
    let report = FailoverReport {
        failures: plan.failures(),
        plan,
        duration_s: started.elapsed().as_secs_f64(),
        machine: machine::describe(),
        settings,
        contenders: contenders(),
        outcomes,
        rolling,
    };
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let (json, md) = report::files(&report.plan);
    fs::write(out.join(json), serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {json}"))?;
    fs::write(out.join(md), report.markdown()).with_context(|| format!("writing {md}"))?;
    Ok(out)
}

fn one_line(o: &Outcome, plan: &Plan) -> String {
    format!(
        "{:8} failed {} stalled {} | left {} | replaced {} ({}) | back {}{}",
        o.contender,
        o.failed,
        o.stalled,
        secs(o.left_s, plan.window_s - plan.quiet_s),
        secs(o.replaced_s, plan.window_s),
        o.long_lived_error.as_deref().unwrap_or("no error"),
        secs(o.back_s, plan.recovery_s),
        o.watch.as_ref().map_or(String::new(), |w| format!(
            " | watch delay {} ({} writes), {} relists",
            secs(w.delay_s, plan.window_s + plan.recovery_s),
            w.writes,
            w.relists
        )),
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
        masters.dedup();
        on.push(masters);
        long_lived.push(k);
        others.push(rest);
    }
    let mut loops = Vec::new();
    for c in &cs {
        loops.push(client::spawn(&w.bed, &w.ca, c, false, loop_count)?);
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
    // Real: writes through a master that is not failed, for the watchers to see.
    let writer = match &w.real {
        Some(r) => {
            let others: Vec<String> = w.masters.iter().filter(|m| *m != target).cloned().collect();
            Some(r.writer(&w.bed, &others)?)
        }
        None => None,
    };
    // The fault.
    let t0 = Instant::now();
    w.apply(failure, target)?;
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
    w.undo(failure, target)?;
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
        if let (Some(r), Some(wr)) = (&w.real, &writer) {
            o.watch = Some(r.figures(c, &wr.writes(), t0, t_end));
        }
        if c.id == "kha" {
            o.kha_states = kha_states.clone();
        }
        v.push(o);
    }
    drop(others);
    Ok(v)
}

/// Runs `cargo xtask bench failover --quick` and checks that every failure × contender cell
/// was produced (never how fast). Needs root.
#[allow(dead_code, reason = "called by `cargo xtask test`")]
pub fn failover_quick_check(real: bool) -> Result<()> {
    let dir = run(&BenchArgs { quick: true, real, ..BenchArgs::default() })?;
    verify(&dir, real)?;
    let what = if real { "bench failover --quick --real" } else { "bench failover --quick" };
    println!("{what}: every failure × contender cell produced ({})", dir.display());
    Ok(())
}
