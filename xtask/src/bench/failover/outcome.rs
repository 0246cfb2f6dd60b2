//! What one contender showed for one fault, computed from its clients' records: failed and
//! stalled loop requests, when the failed master was left, when the long-lived connection
//! was replaced, when the recovered master was back in use. Pure: no clock read, no process.

use std::{collections::BTreeMap, time::Instant};

use serde::{Deserialize, Serialize};

use super::{
    client::{Rec, bad},
    plan::{Failure, Plan},
};

/// Records kept per loop in the JSON for bad requests (failed or stalled).
const MAX_BAD_LISTED: usize = 50;

/// Seconds from `t0` to `t`, negative before it.
pub(super) fn rel(t0: Instant, t: Instant) -> f64 {
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
    /// Real control plane only: what the contender's client-go watchers showed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<Watch>,
}

/// The watchers of one contender over one fault (`bench failover --real`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Watch {
    /// The longest a write made during the fault phase took to reach every watcher, seconds;
    /// `None`: one never reached one of them by the end of the recovery.
    pub delay_s: Option<f64>,
    /// Lists (or WatchList relists) of all the contender's watchers from the fault on.
    pub relists: u64,
    /// Writes made during the fault phase.
    pub writes: u64,
}

/// Computes an outcome from the records. `t_end`: end of the fault phase; `t1`: the undo
/// returned.
#[allow(clippy::too_many_arguments)]
pub(super) fn outcome(
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
        let to_failed = bad(r) || r.r.master.as_deref() == Some(master);
        if to_failed {
            let s = rel(t0, r.start()).max(0.0);
            if o.last_to_failed_s.is_none_or(|l| s >= l) {
                o.last_to_failed_s = Some(s);
                o.last_to_failed_end_s = Some(rel(t0, r.end));
            }
        }
        if !bad(r) {
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
pub(super) fn settled(
    plan: &Plan,
    master: &str,
    looped: &[Rec],
    long_lived: &[Rec],
    t0: Instant,
    now: Instant,
) -> bool {
    let replaced = long_lived
        .iter()
        .any(|r| r.end >= t0 && r.r.ok && !r.r.reused && r.r.master.as_deref().is_some_and(|m| m != master));
    let last_to_failed = looped
        .iter()
        .filter(|r| r.end >= t0 && (bad(r) || r.r.master.as_deref() == Some(master)))
        .map(|r| r.end)
        .max()
        .unwrap_or(t0);
    // A request in flight for long may be one that hangs: not settled while the loop is quiet.
    let answering = looped.last().is_some_and(|r| rel(r.end, now) < 0.5);
    replaced && answering && rel(last_to_failed, now) >= plan.quiet_s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kha_lab::client::RequestRecord;

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
}
