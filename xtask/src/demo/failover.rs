//! The demo's failover acts: a master fails while long-lived connections (one on each master,
//! as a node's watches) and a loop of calls run, and the timeline shows kha taking it out, the
//! long-lived connection on it moving, the loop running on, and the master getting calls again
//! once it is back. What went wrong is returned for the demo's verdict.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use kha_lab::bed::Bed;

use crate::masters::Masters;

use super::{
    DRAIN_S, DemoArgs,
    client::{self, Client, Kind, LONG_LIVED_INTERVAL_MS, LOOP_INTERVAL_MS, Rec},
    pause, stopped,
    timeline::{bad, good, tally},
    watch::Watch,
};

const TICK: Duration = Duration::from_millis(20);
/// Long-lived clients started at most to get one on every master.
const PLACE_TRIES: usize = 8;
/// Bound on the wait for a master to be back in use after the fault is undone.
const BACK_BOUND: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL: its kernel refuses connects and closes what was open.
    Kill,
    /// `/readyz` answers 500 while everything else still works, as in a graceful shutdown.
    NotReady,
}

impl Fault {
    pub fn title(self, real: bool) -> &'static str {
        match (self, real) {
            (Fault::Kill, false) => "a master is killed",
            (Fault::Kill, true) => "a kube-apiserver is killed",
            (Fault::NotReady, false) => "a master fails /readyz but still serves",
            (Fault::NotReady, true) => {
                "a master loses its etcd member: /readyz fails, the apiserver still serves"
            }
        }
    }

    fn apply(self, ms: &mut Masters, m: &str) -> Result<String> {
        let real = ms.real.is_some();
        match self {
            Fault::Kill => {
                ms.kill(m)?;
                Ok(if real {
                    format!("{m}'s kube-apiserver killed (SIGKILL)")
                } else {
                    format!("{m} killed (SIGKILL)")
                })
            }
            Fault::NotReady => {
                ms.not_ready(m)?;
                Ok(if real {
                    format!(
                        "{m}'s etcd member killed: its apiserver's /readyz fails on etcd, /version still answers"
                    )
                } else {
                    format!("{m}: /readyz answers 500 from now on; /version still answers 200")
                })
            }
        }
    }

    fn undo(self, ms: &mut Masters, m: &str) -> Result<String> {
        match self {
            Fault::Kill => {
                ms.restart(m)?;
                Ok(format!("{m} restarted, ready to serve"))
            }
            Fault::NotReady => {
                ms.ready(m)?;
                Ok(format!("{m}: /readyz answers 200 again"))
            }
        }
    }

    /// How long kha may take to move the long-lived connection before the demo calls it a
    /// failure. A real apiserver notices a lost etcd member only after its own health check
    /// times out.
    fn bound(self, real: bool) -> Duration {
        match (self, real) {
            (Fault::Kill, _) => Duration::from_secs(8),
            (Fault::NotReady, false) => Duration::from_secs(8 + DRAIN_S),
            (Fault::NotReady, true) => Duration::from_secs(20 + DRAIN_S),
        }
    }
}

/// What an act showed: the master failed, and what went wrong (empty: all as it should).
pub struct ActOutcome {
    pub victim: String,
    pub problems: Vec<String>,
}

/// Runs one failover act on a master not in `avoid`.
pub fn act(
    ms: &mut Masters,
    ca: &str,
    args: &DemoArgs,
    fault: Fault,
    avoid: &[String],
) -> Result<ActOutcome> {
    let real = ms.real.is_some();
    super::wait_all_up(ms.bed, Duration::from_secs(20))?;
    let budget = Duration::from_millis(args.warmup_ms + args.hold_ms) + fault.bound(real) + BACK_BOUND;
    let count = |interval_ms: u64| (budget.as_millis() as u64 + 5000) / interval_ms;

    let mut held = place(ms.bed, ca, count(LONG_LIVED_INTERVAL_MS))?;
    let on: Vec<&str> = held.iter().map(|(m, _)| m.as_str()).collect();
    println!(
        "   {} long-lived clients, each one request every {LONG_LIVED_INTERVAL_MS} ms on one kept-alive connection (as \
         kubelet's\n   and kube-proxy's watches); least-connections put them on {}",
        held.len(),
        on.join(", ")
    );
    let i =
        held.iter().position(|(m, _)| !avoid.contains(m)).context("no long-lived connection to follow")?;
    let (victim, followed) = held.remove(i);

    let mut lp = client::spawn(ms.bed, ca, Kind::Loop, "127.0.0.1:6443", count(LOOP_INTERVAL_MS))?;
    pause(Duration::from_millis(args.warmup_ms))?;
    lp.pull();
    if !lp.recs.iter().any(|r| r.r.ok) {
        bail!("the loop got no answer before the fault ({} records): {:?}", lp.recs.len(), lp.exited());
    }
    let before_failed = lp.recs.iter().filter(|r| !r.r.ok).count();
    println!(
        "   the loop, a new connection every {LOOP_INTERVAL_MS} ms: {} calls in {:.1} s, {} failed ({})",
        lp.recs.len(),
        args.warmup_ms as f64 / 1000.0,
        before_failed,
        tally(lp.recs.iter().filter_map(|r| r.master()))
    );
    println!("   {victim} is the master to fail; the long-lived connection on it is the one to follow");
    println!("   (kha's view is `kha status` polled every 50 ms: its times can be up to 50 ms late)\n");
    let mut w = Watch::new(ms.bed, victim.clone(), fault, lp, followed, held);
    if before_failed > 0 {
        w.problems.push(format!("{before_failed} loop calls failed before the fault"));
    }

    // The fault, then until kha has taken the master out, the long-lived connection has moved
    // and the loop has run on for the hold time after that.
    w.tl.t0 = Instant::now();
    let said = fault.apply(ms, &victim)?;
    w.tl.at(w.tl.t0, said);
    w.tl.flush();
    let hold = Duration::from_millis(args.hold_ms);
    let deadline = w.tl.t0 + fault.bound(real) + hold;
    while Instant::now() < deadline
        && !(w.taken_out.is_some() && w.moved.is_some_and(|t| t.elapsed() >= hold))
    {
        stopped()?;
        std::thread::sleep(TICK);
        w.step(ms.bed);
    }
    let t_undo = Instant::now();
    w.tl.flush();
    let during: Vec<&Rec> = w.lp.recs.iter().filter(|r| r.end >= w.tl.t0 && r.end < t_undo).collect();
    let failed = during.iter().filter(|r| !r.r.ok).count();
    let in_flight = during.iter().filter(|r| !r.r.ok && r.start() < w.tl.t0).count();
    let failed_text = match (failed, in_flight) {
        (0, _) => good("0 failed"),
        (f, k) if fault == Fault::Kill && k > 0 => format!("{f} failed, {k} of them in flight at the kill"),
        (f, _) => bad(format!("{f} failed")),
    };
    let last_victim = w.lp.recs.iter().rev().find(|r| r.r.ok && r.master() == Some(victim.as_str()));
    let last_text = last_victim.map_or(String::new(), |r| {
        let note = match w.taken_out {
            Some(t) if r.end >= w.tl.t0 => format!(" (kha took it out at {})", w.tl.secs(t)),
            _ => String::new(),
        };
        format!("; last answer from {victim} at {}{note}", w.tl.secs(r.end))
    });
    println!(
        "   the loop since the fault: {} calls, {failed_text} ({}){last_text}",
        during.len(),
        tally(during.iter().filter_map(|r| r.master())),
    );
    let secs = |t: Instant| (t - w.tl.t0).as_secs_f64();
    if w.taken_out.is_none() {
        w.problems.push(format!("kha did not take {victim} out within {:.0} s", secs(t_undo)));
    }
    if w.moved.is_none() {
        w.problems.push(format!(
            "the long-lived connection on {victim} was not moved to another master within {:.0} s",
            secs(t_undo)
        ));
    }

    // The master comes back: until the loop is answered by it again, and a little longer to
    // show where new connections go then.
    let said = fault.undo(ms, &victim)?;
    let back_from = Instant::now();
    w.undone = Some(back_from);
    w.tl.at(back_from, said);
    w.tl.flush();
    let deadline = back_from + BACK_BOUND;
    let linger = Duration::from_millis(args.hold_ms.min(1000));
    while Instant::now() < deadline && !w.back.is_some_and(|t| t.elapsed() >= linger) {
        stopped()?;
        std::thread::sleep(TICK);
        w.step(ms.bed);
    }
    w.tl.flush();
    if w.back.is_none() {
        w.problems
            .push(format!("{victim} got no call within {:.0} s of being back", BACK_BOUND.as_secs_f64()));
    }
    let since = w.kha_up.unwrap_or(back_from);
    let after: Vec<&Rec> = w.lp.recs.iter().filter(|r| r.start() >= since).collect();
    let failed = after.iter().filter(|r| !r.r.ok).count();
    let to_victim = after.iter().filter(|r| r.master() == Some(victim.as_str())).count();
    println!(
        "   the loop since kha had {victim} up again: {} calls, {} ({}){}",
        after.len(),
        if failed == 0 { good("0 failed") } else { bad(format!("{failed} failed")) },
        tally(after.iter().filter_map(|r| r.master())),
        if 2 * to_victim > after.len() {
            format!(
                "; least-connections prefers {victim}, which holds none of the long-lived connections now"
            )
        } else {
            String::new()
        }
    );
    let untouched =
        w.others.iter().all(|(m, c)| c.recs.iter().all(|r| r.r.ok && r.master() == Some(m.as_str())));
    if untouched && !w.others.is_empty() {
        let on: Vec<&str> = w.others.iter().map(|(m, _)| m.as_str()).collect();
        println!(
            "   the other long-lived connections ({}) were not touched: every request answered on them",
            on.join(", ")
        );
    }
    if let Some(e) = w.lp.exited() {
        w.problems.push(format!("the loop client ended early ({e})"));
    }
    Ok(ActOutcome { victim, problems: w.problems })
}

/// Long-lived clients, started one after the other until every master holds one (least-
/// connections puts each where none is yet); returns them with the master each is on.
fn place(bed: &Bed, ca: &str, count: u64) -> Result<Vec<(String, Client)>> {
    let masters = bed.lab.masters().len();
    let mut held: Vec<(String, Client)> = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..PLACE_TRIES {
        if held.len() == masters {
            break;
        }
        let mut c = client::spawn(bed, ca, Kind::LongLived, "127.0.0.1:6443", count)?;
        let first = c
            .first(Duration::from_secs(5), super::stopped)?
            .map(|r| (r.r.ok, r.r.master.clone(), r.r.error.clone()));
        seen.push(format!("{first:?}"));
        if let Some((true, Some(m), _)) = first
            && !held.iter().any(|(h, _)| *h == m)
        {
            held.push((m, c));
        }
        // Else `c` drops here: killed, its connection closed.
    }
    if held.is_empty() {
        bail!("no long-lived client got an answer (first records: {seen:?})");
    }
    Ok(held)
}
