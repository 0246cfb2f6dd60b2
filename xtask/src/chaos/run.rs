//! One soak: the world, the load, the sampler, then event after event (each followed by a
//! settle and the quiet-point checks) until the plan or the duration ends; then the
//! invariants over everything recorded, and the report.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use super::{
    events::{self, Fault, Span},
    invariants::{self, ACTIVE, LEAK, Run, Violation},
    plan::{Event, Planner, Rng},
    quiet,
    report::{Report, Row, Totals},
    sampler::Sampler,
    settings::Settings,
    wait::pause,
    world::{KEEP_INTERVAL_MS, LONG_LIVED, LOOP_INTERVAL_MS, MASTERS, World, backends, fd_kinds},
};
use crate::lab_client::Client;

/// Every master `up` and served again after an event, at most this long.
const SETTLE_BOUND: Duration = Duration::from_secs(20);
/// The whole run may overrun its duration by the last event and this.
const OVERRUN: Duration = Duration::from_secs(120);

pub struct Options {
    pub seed: u64,
    pub quick: bool,
    pub duration: Duration,
}

pub fn soak(o: &Options) -> Result<Report> {
    let settings = Settings::soak();
    let w8 = settings.windows();
    let mut planner = Planner::new(o.seed, MASTERS, w8);
    let mut gaps = Rng::new(o.seed ^ 0x5eed);
    let started = Instant::now();
    let mut world = World::create(&settings)?;
    let pid = Arc::new(AtomicU32::new(world.bed.agent_pid().unwrap_or(0)));
    let sampler = Sampler::start(world.bed.kha_bin.clone(), world.bed.pin_dir.clone(), pid.clone());
    // Counts that outlast the run; each client is bounded in count and time.
    let bound_s = o.duration.as_secs_f64() + OVERRUN.as_secs_f64() + 120.0;
    let mut long = Vec::new();
    for _ in 0..LONG_LIVED {
        let mut c = world.client(true, (bound_s * 1000.0 / KEEP_INTERVAL_MS as f64) as u64)?;
        if c.first(Duration::from_secs(10), super::wait::stopped)?.is_none_or(|r| !r.r.ok) {
            bail!("a long-lived client got no first answer: {:?}", c.exited());
        }
        long.push(c);
    }
    let mut lp = world.client(false, (bound_s * 1000.0 / LOOP_INTERVAL_MS as f64) as u64)?;
    pause(Duration::from_secs(1))?;
    let pids: BTreeSet<u32> = long.iter().chain([&lp]).map(Client::pid).collect();
    let long_pids: BTreeSet<u32> = long.iter().map(Client::pid).collect();

    let t0 = started;
    let mut spans: Vec<Span> = Vec::new();
    let mut rows = Vec::new();
    let mut starts = Vec::new();
    let mut live_violations: Vec<Violation> = Vec::new();
    let mut quiet_checks = 0;
    // Each agent's fds by kind at its first and its latest quiet point, to tell a leak's kind.
    let mut fd_seen: std::collections::BTreeMap<u32, (_, _)> = std::collections::BTreeMap::new();
    let mut queue: Vec<Event> = planner.round();
    queue.reverse();
    let soak_start = Instant::now();
    let mut idx = 0;
    loop {
        let ev = match queue.pop() {
            Some(e) => e,
            None if !o.quick && soak_start.elapsed() < o.duration => planner.any(),
            None => break,
        };
        if soak_start.elapsed() > o.duration + OVERRUN {
            bail!("the soak overran its duration by more than {OVERRUN:?}");
        }
        let t = Instant::now();
        starts.push(t);
        let target = ev.master().map_or("-".to_string(), |m| world.names[m].clone());
        eprintln!(
            "xtask: chaos: {:>6.1} s #{idx} {} {target} ({})",
            (t - t0).as_secs_f64(),
            ev.kind(),
            ev.params()
        );
        let note = events::apply(&mut world, &ev, idx, &mut spans)?;
        pid.store(world.bed.agent_pid().unwrap_or(0), Ordering::SeqCst);
        let settled = settle(&world)?;
        let q = quiet::check(&world, &pids, &long_pids)?;
        quiet_checks += 1;
        if let Some(p) = world.bed.agent_pid() {
            let kinds = fd_kinds(p);
            fd_seen
                .entry(p)
                .and_modify(|e: &mut (_, _)| e.1 = kinds.clone())
                .or_insert((kinds.clone(), kinds));
        }
        let at = Instant::now();
        let mut vio = 0;
        if settled.is_none() {
            vio += 1;
            live_violations.push(Violation {
                invariant: invariants::SETTLE,
                t_s: (at - t0).as_secs_f64(),
                event: Some(idx),
                detail: format!(
                    "not every master up and served within {SETTLE_BOUND:?}: {:?}",
                    states(&world)
                ),
            });
        }
        for (inv, list) in [(LEAK, &q.leaks), (ACTIVE, &q.active)] {
            for d in list {
                vio += 1;
                live_violations.push(Violation {
                    invariant: inv,
                    t_s: (at - t0).as_secs_f64(),
                    event: Some(idx),
                    detail: d.clone(),
                });
            }
        }
        for c in long.iter_mut().chain([&mut lp]) {
            c.pull();
            if let Some(e) = c.exited() {
                bail!("a client ended early ({e})");
            }
        }
        let outcome = format!(
            "{}{}settled in {}; quiet: {} entries, {} sockets{}",
            note,
            if note.is_empty() { "" } else { "; " },
            settled.map_or("**never**".into(), |s| format!("{s:.1} s")),
            q.map,
            q.live,
            if q.leaks.is_empty() && q.active.is_empty() { " (exact)" } else { " **mismatch**" }
        );
        rows.push(Row {
            idx,
            t_s: (t - t0).as_secs_f64(),
            took_s: t.elapsed().as_secs_f64(),
            kind: ev.kind(),
            target,
            params: ev.params(),
            outcome,
            violations: vio,
        });
        idx += 1;
        pause(Duration::from_millis(gaps.range(300, 1500)))?;
    }
    let samples = sampler.finish();
    for c in long.iter_mut().chain([&mut lp]) {
        c.pull();
    }
    let long_recs: Vec<Vec<crate::lab_client::Rec>> =
        long.iter_mut().map(|c| std::mem::take(&mut c.recs)).collect();
    let run = Run {
        t0,
        samples: &samples,
        spans: &spans,
        event_starts: &starts,
        loop_recs: &lp.recs,
        long: &long_recs,
        names: &world.names,
        addrs: &world.addrs,
        w: w8,
    };
    let (mut violations, notes) = run.check();
    violations.extend(live_violations);
    violations.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    for r in &mut rows {
        r.violations = violations.iter().filter(|v| v.event == Some(r.idx)).count();
        r.outcome = format!("{}; {}", outcome_of(&run, &spans, r.idx), r.outcome);
    }
    let totals = Totals {
        loop_requests: lp.recs.len(),
        loop_failed: lp.recs.iter().filter(|r| !r.r.ok).count(),
        long_lived_requests: long_recs.iter().map(Vec::len).sum(),
        long_lived_errors: long_recs.iter().flatten().filter(|r| !r.r.ok).count(),
        conn_map_max: samples.iter().filter_map(|s| s.conns).max().unwrap_or(0),
        samples: samples.len(),
        quiet_checks,
    };
    let agents = run.agent_flat().0;
    let agent_fds = agents
        .iter()
        .max_by(|a, b| a.secs.total_cmp(&b.secs))
        .and_then(|a| fd_seen.remove(&a.pid).map(|(f, l)| vec![(a.pid, f), (a.pid, l)]))
        .unwrap_or_default();
    Ok(Report {
        seed: o.seed,
        profile: if o.quick { "quick" } else { "full" },
        duration_s: started.elapsed().as_secs_f64(),
        settings,
        windows: w8,
        events: rows,
        violations,
        notes,
        agents,
        agent_fds,
        totals,
    })
    // The world drops here: clients, agent, pins, masters, namespaces.
}

/// Waits until every configured master is `up` and served; returns how long it took.
fn settle(w: &World) -> Result<Option<f64>> {
    let t = Instant::now();
    while t.elapsed() < SETTLE_BOUND {
        if let Some(s) = w.status() {
            let (b, fallback) = backends(&s);
            if !fallback && w.addrs.iter().all(|a| b.get(a).is_some_and(|b| b.state == "up" && b.serving)) {
                return Ok(Some(t.elapsed().as_secs_f64()));
            }
        }
        pause(Duration::from_millis(100))?;
    }
    Ok(None)
}

fn states(w: &World) -> Vec<(String, String)> {
    let b = w.status().map(|s| backends(&s).0).unwrap_or_default();
    w.addrs.iter().map(|a| (a.clone(), b.get(a).map_or("absent".into(), |b| b.state.clone()))).collect()
}

/// What kha and the clients did during event `idx`: the target's states as sampled, the
/// long-lived errors and the loop's failed requests.
fn outcome_of(run: &Run, spans: &[Span], idx: usize) -> String {
    let from = run.event_starts[idx];
    let to = run.event_starts.get(idx + 1).copied().unwrap_or_else(Instant::now);
    let mut parts = Vec::new();
    let path = |m: usize| {
        let mut seq: Vec<(f64, String)> = Vec::new();
        for s in run.samples.iter().filter(|s| s.at >= from && s.at < to) {
            let st = s.backends.get(&run.addrs[m]).map_or("absent".to_string(), |b| b.state.clone());
            if seq.last().is_none_or(|(_, l)| *l != st) {
                seq.push(((s.at - from).as_secs_f64(), st));
            }
        }
        seq.iter().map(|(t, s)| format!("{s}@{t:.1}")).collect::<Vec<_>>().join("→")
    };
    match spans.iter().find(|s| s.event == idx) {
        Some(Span { master: Some(m), .. }) => parts.push(format!("kha: {}", path(*m))),
        Some(Span { fault: Fault::AllHung | Fault::AllNotReady, .. }) => {
            let all: Vec<String> =
                (0..run.names.len()).map(|m| format!("{} {}", run.names[m], path(m))).collect();
            parts.push(format!("kha: {}", all.join(", ")));
        }
        _ => {}
    }
    let long_err = run.long.iter().flatten().filter(|r| !r.r.ok && r.end >= from && r.end < to).count();
    let loop_err = run.loop_recs.iter().filter(|r| !r.r.ok && r.start() >= from && r.start() < to).count();
    parts.push(format!("long-lived errors {long_err}, loop failures {loop_err}"));
    parts.join("; ")
}
