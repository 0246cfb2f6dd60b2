//! The invariants judged over the whole run, from the samples, the spans and the clients'
//! records (all stamped on one clock). Each violation is counted with its time and event;
//! nothing stops at the first. The quiet-point checks (leaks, `active`) read the live world
//! and are in [`super::quiet`].

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{
    events::{Fault, Span},
    sampler::Sample,
    settings::Windows,
    world::LOOP_TIMEOUT_MS,
};
use crate::lab_client::Rec;

pub const NEW_CONNECTION: &str = "new-connection-after-window";
pub const DESTROYED: &str = "destroyed-with-nowhere-better";
pub const PAUSE: &str = "short-pause-destroyed";
pub const FAILED_CONNECT: &str = "failed-connect";
pub const UNEXPLAINED: &str = "unexplained-failure";
pub const LEAK: &str = "conn-map-leak";
pub const ACTIVE: &str = "active-mismatch";
pub const AGENT_FLAT: &str = "agent-fds-rss-flat";
pub const SETTLE: &str = "settle";
/// Not a violation: a long-lived socket on a master still `down` in kha's view, reset when
/// the first master was proven up after an all-down, although its own master had recovered
/// too (kha's deferred terminations, docs/health.md). Listed so that it is seen.
pub const DEFERRED: &str = "note: reset-after-all-down";
/// A termination decided just before the fault ended may reach the client this much later.
const IN_FLIGHT: Duration = Duration::from_millis(200);
pub const ALL: [&str; 9] =
    [NEW_CONNECTION, DESTROYED, PAUSE, FAILED_CONNECT, UNEXPLAINED, LEAK, ACTIVE, AGENT_FLAT, SETTLE];

/// Agent growth allowed after warm-up: fds (a probe reconnect briefly holds two sockets per
/// master; the iterator and raw sockets come and go) and RSS (allocator arenas of a debug
/// build settling).
pub const FD_SLACK: usize = 16;
pub const RSS_SLACK_KB: u64 = 16 * 1024;
/// Not a violation: an agent's fds or RSS above the slack for a while, back within it at the
/// end (see [`Run::agent_flat`]).
pub const PEAK: &str = "note: agent-transient-peak";
/// Samples (200 ms apart) whose smallest value is the level an agent ends at.
const TAIL: usize = 10;
/// An incarnation of the agent is judged from this long after its first sample on.
pub const WARMUP: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub t_s: f64,
    pub event: Option<usize>,
    pub detail: String,
}

/// Everything the run recorded.
pub struct Run<'a> {
    pub t0: Instant,
    pub samples: &'a [Sample],
    pub spans: &'a [Span],
    /// Start of each event, in order.
    pub event_starts: &'a [Instant],
    pub loop_recs: &'a [Rec],
    pub long: &'a [Vec<Rec>],
    pub names: &'a [String],
    pub addrs: &'a [String],
    pub w: Windows,
}

impl Run<'_> {
    pub fn rel(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.t0).as_secs_f64()
    }

    pub fn event_at(&self, t: Instant) -> Option<usize> {
        self.event_starts.iter().rposition(|s| *s <= t)
    }

    fn v(&self, invariant: &'static str, t: Instant, detail: String) -> Violation {
        Violation { invariant, t_s: self.rel(t), event: self.event_at(t), detail }
    }

    fn label(&self, s: &Span) -> String {
        format!("{:?} of {}", s.fault, s.master.map_or("all", |m| self.names[m].as_str()))
    }

    /// The violations, and the notes (see [`DEFERRED`]).
    pub fn check(&self) -> (Vec<Violation>, Vec<Violation>) {
        let mut v = self.new_connections();
        let (long, notes) = self.long_lived();
        v.extend(long);
        v.extend(self.loop_failures());
        v.extend(self.agent_flat().1);
        let mut notes = notes;
        notes.extend(self.agent_levels(true).1);
        (v, notes)
    }

    /// After a fault's window and until its undo, no new connection may reach the master:
    /// the kernel's `chosen` of that backend must not grow between two samples of the same
    /// agent (an agent restart starts every backend `unknown`, i.e. served), and no new
    /// connection (loop, or a long-lived client's reconnect) may be answered by it.
    fn new_connections(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        for sp in self.spans {
            let (Some(m), Some(win)) = (sp.master, window(&self.w, sp.fault)) else { continue };
            let from = sp.start + Duration::from_millis(win);
            if from >= sp.undo {
                continue;
            }
            let (addr, name) = (&self.addrs[m], &self.names[m]);
            let inside: Vec<&Sample> = self
                .samples
                .iter()
                .filter(|s| s.at >= from && s.at <= sp.undo && !s.backends.is_empty())
                .collect();
            for pair in inside.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                let same_agent = a.agent.map(|x| x.0) == b.agent.map(|x| x.0);
                if !same_agent || a.fallback || b.fallback {
                    continue;
                }
                if let (Some(x), Some(y)) = (a.backends.get(addr), b.backends.get(addr))
                    && y.chosen > x.chosen
                {
                    out.push(self.v(
                        NEW_CONNECTION,
                        b.at,
                        format!(
                            "{}: {} new connection(s) to {addr} (state {}) {:.1} s after the fault, window {:.1} s",
                            self.label(sp),
                            y.chosen - x.chosen,
                            y.state,
                            (b.at - sp.start).as_secs_f64(),
                            win as f64 / 1000.0
                        ),
                    ));
                }
            }
            let new_conn = |r: &&Rec| !r.r.reused && r.master() == Some(name.as_str());
            for r in self.loop_recs.iter().chain(self.long.iter().flatten()).filter(new_conn) {
                if r.start() >= from && r.start() <= sp.undo {
                    out.push(self.v(
                        NEW_CONNECTION,
                        r.start(),
                        format!("{}: a new connection answered by {name} after the window", self.label(sp)),
                    ));
                }
            }
        }
        out
    }

    /// Long-lived clients: an error while every master was down (all hung or all not ready,
    /// until the fault ended) is a socket kha destroyed with nowhere better to go; one on a master paused for less
    /// than 2 s is a socket destroyed for a pause; one explained by a fault of its own
    /// master (killed: its kernel ends it; hung, blackholed, not ready, removed: kha ends it
    /// once another is up) is expected; any other is unexplained.
    fn long_lived(&self) -> (Vec<Violation>, Vec<Violation>) {
        let mut out = Vec::new();
        let mut notes = Vec::new();
        let margin = Duration::from_millis(self.w.margin_ms);
        for (i, recs) in self.long.iter().enumerate() {
            let mut on: Option<&str> = None;
            for r in recs {
                if r.r.ok {
                    on = r.master();
                    continue;
                }
                let e = r.end;
                let err = r.r.error.as_deref().unwrap_or("?");
                let master = on.and_then(|n| self.names.iter().position(|x| x == n));
                let during = |s: &Span, after: Duration| e >= s.start && e <= s.end + after;
                let all_down = self.spans.iter().find(|s| {
                    matches!(s.fault, Fault::AllHung | Fault::AllNotReady)
                        && e >= s.start
                        && e <= s.undo + IN_FLIGHT
                });
                if let Some(s) = all_down {
                    out.push(self.v(
                        DESTROYED,
                        e,
                        format!(
                            "long-lived client {i} on {}: {err} during {}",
                            on.unwrap_or("?"),
                            self.label(s)
                        ),
                    ));
                    continue;
                }
                // A fault of its own master that had begun by then (killed right after a
                // pause: its kernel ends the socket) explains it before the pause can.
                let own = self.spans.iter().any(|s| {
                    let win = window(&self.w, s.fault);
                    s.master.is_some()
                        && s.master == master
                        && win.is_some_and(|win| {
                            during(s, Duration::from_millis(win + self.w.drain_ms) + margin)
                        })
                });
                let paused = self.spans.iter().find(|s| {
                    s.fault == Fault::Pause && s.master == master && master.is_some() && during(s, margin * 2)
                });
                let paused = paused.filter(|_| !own);
                if let Some(s) = paused {
                    out.push(self.v(
                        PAUSE,
                        e,
                        format!(
                            "long-lived client {i} on {}: {err} after a {:.1} s pause",
                            on.unwrap_or("?"),
                            (s.undo - s.start).as_secs_f64()
                        ),
                    ));
                    continue;
                }
                // After an all-down the first master proven up takes the sockets of those
                // still `down` (docs/health.md, deferred terminations), although their masters
                // may be back already: by design, so a note, not a violation.
                let deferred = self.spans.iter().find(|s| {
                    matches!(s.fault, Fault::AllHung | Fault::AllNotReady)
                        && e > s.undo
                        && e <= s.end + Duration::from_millis(self.w.hang_ms) + margin
                });
                if let (false, Some(s)) = (own, deferred) {
                    notes.push(self.v(
                        DEFERRED,
                        e,
                        format!(
                            "long-lived client {i} on {}: {err} {:.1} s after every master was back",
                            on.unwrap_or("?"),
                            (e - s.undo).as_secs_f64()
                        ),
                    ));
                } else if !own {
                    out.push(self.v(
                        UNEXPLAINED,
                        e,
                        format!(
                            "long-lived client {i} on {}: {err} with no fault on its master",
                            on.unwrap_or("?")
                        ),
                    ));
                }
            }
        }
        (out, notes)
    }

    /// The connect loop. A failed request is explained by a fault only if it started while
    /// kha could not know yet: from one request timeout before the fault (a request in
    /// flight) until the fault's window, on a fault that fails requests (killed: refused or
    /// reset; hung: timed out; blackholed: unreachable or timed out); or at any time during
    /// an all-hung (every master is stuck, the fallback serves them). Not-ready, removed,
    /// flapping and paused masters still answer `/version`, and agent restarts, upgrades and
    /// policy changes leave the datapath serving: none of them explains a failure. An
    /// unexplained failure in the connect phase (EHOSTUNREACH: no slots; ECONNREFUSED: a
    /// dead backend kept in the set) is a failed connect from a set change; any other is
    /// unexplained.
    fn loop_failures(&self) -> Vec<Violation> {
        let before = Duration::from_millis(LOOP_TIMEOUT_MS);
        let mut out = Vec::new();
        for r in self.loop_recs.iter().filter(|r| !r.r.ok) {
            let s = r.start();
            let explained = self.spans.iter().any(|sp| match sp.fault {
                Fault::Kill | Fault::Hang | Fault::Blackhole => {
                    let win = Duration::from_millis(window(&self.w, sp.fault).unwrap_or(0));
                    s + before >= sp.start && s <= sp.start + win
                }
                Fault::AllHung => s + before >= sp.start && s <= sp.undo,
                _ => false,
            });
            if explained {
                continue;
            }
            let err = r.r.error.as_deref().unwrap_or("?");
            let which = if err.starts_with("connect:") { FAILED_CONNECT } else { UNEXPLAINED };
            out.push(self.v(
                which,
                s,
                format!("connect loop: {err} ({})", r.r.detail.as_deref().unwrap_or("")),
            ));
        }
        out
    }

    /// Per agent incarnation: fds and RSS first (after warm-up), last and max, and the
    /// level it ends at: the smallest of its last [`TAIL`] samples. Flat means that level is
    /// within the slack of the first; a peak that comes back down (the agent loads its TCP
    /// iterator and the kernel's BTF at its first termination: measured +18 MiB for a moment
    /// in a debug build) is no leak, and is listed as a note with its height.
    pub fn agent_flat(&self) -> (Vec<Incarnation>, Vec<Violation>) {
        self.agent_levels(false)
    }

    fn agent_levels(&self, notes: bool) -> (Vec<Incarnation>, Vec<Violation>) {
        let mut runs: Vec<(u32, Vec<&Sample>)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.agent.is_some()) {
            let pid = s.agent.map_or(0, |a| a.0);
            match runs.last_mut() {
                Some((p, v)) if *p == pid => v.push(s),
                _ => runs.push((pid, vec![s])),
            }
        }
        let mut incs = Vec::new();
        let mut out = Vec::new();
        for (pid, v) in runs {
            let since = v[0].at;
            let judged: Vec<(Instant, usize, u64)> = v
                .iter()
                .filter(|s| s.at >= since + WARMUP)
                .filter_map(|s| s.agent.map(|(_, f, r)| (s.at, f, r)))
                .collect();
            let (Some(first), Some(last)) = (judged.first(), judged.last()) else { continue };
            let tail = &judged[judged.len().saturating_sub(TAIL)..];
            let level =
                (tail.iter().map(|x| x.1).min().unwrap_or(0), tail.iter().map(|x| x.2).min().unwrap_or(0));
            let max = (
                judged.iter().map(|x| x.1).max().unwrap_or(0),
                judged.iter().map(|x| x.2).max().unwrap_or(0),
            );
            let grew = |l: (usize, u64)| l.0 > first.1 + FD_SLACK || l.1 > first.2 + RSS_SLACK_KB;
            let violated = grew(level);
            if violated && !notes {
                out.push(self.v(
                    AGENT_FLAT,
                    last.0,
                    format!(
                        "agent {pid}: ends at {} fds, {} KiB RSS after {} fds, {} KiB at warm-up",
                        level.0, level.1, first.1, first.2
                    ),
                ));
            } else if !violated && grew(max) && notes {
                let at = judged.iter().find(|x| grew((x.1, x.2))).map_or(last.0, |x| x.0);
                out.push(self.v(
                    PEAK,
                    at,
                    format!(
                        "agent {pid}: peak {} fds, {} KiB RSS over {} fds, {} KiB at warm-up; back to {} fds, {} KiB",
                        max.0, max.1, first.1, first.2, level.0, level.1
                    ),
                ));
            }
            incs.push(Incarnation {
                pid,
                first: (first.1, first.2),
                last: (last.1, last.2),
                max,
                level,
                secs: (last.0 - since).as_secs_f64(),
                violated,
            });
        }
        (incs, out)
    }
}

/// One agent process's fds and RSS (KiB) from warm-up on.
#[derive(Debug, Clone, Serialize)]
pub struct Incarnation {
    pub pid: u32,
    pub first: (usize, u64),
    pub last: (usize, u64),
    pub max: (usize, u64),
    /// The smallest of the last samples: what it ends at, peaks aside.
    pub level: (usize, u64),
    /// Seconds from its first sample to its last.
    pub secs: f64,
    pub violated: bool,
}

/// The detection window of a single-master fault whose new connections are judged.
pub fn window(w: &Windows, f: Fault) -> Option<u64> {
    match f {
        Fault::Kill => Some(w.kill_ms),
        Fault::Hang => Some(w.hang_ms),
        Fault::Blackhole => Some(w.blackhole_ms),
        Fault::NotReady => Some(w.not_ready_ms),
        Fault::Removed => Some(w.removed_ms),
        _ => None,
    }
}

#[cfg(test)]
#[path = "invariants_tests.rs"]
mod tests;
