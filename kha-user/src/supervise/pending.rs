//! Sockets waiting to be terminated, per (frontend, backend) pair, and when: the drain timers
//! and the terminations held back because no other backend could take the sockets.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::{Duration, Instant};

use super::Pair;

/// Why a pair's sockets are to go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// The backend is down: its sockets are stuck on a dead master.
    Down,
    /// The backend answers but is not ready: its sockets get the drain time to finish.
    Draining,
    /// The pair left the config (or discovery): its sockets get the drain time too.
    Removed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum When {
    /// As soon as another backend can take the sockets.
    Now,
    /// At the deadline, if another backend can take the sockets then.
    At(Instant),
    /// The deadline passed while no other backend could take them: the drain restarts once one
    /// can. Their owner may well have recovered by then, and the drain is what lets their
    /// requests finish.
    Deferred,
}

/// What may be done with a pair's sockets at the moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Another backend of the frontend is up: terminating makes the clients reconnect there.
    Move,
    /// None is: terminating would bring the clients straight back to the same masters.
    Hold,
    /// The frontend is gone: nothing would take the clients' reconnects, leave them be.
    Forget,
}

/// What [`Pending::settle`] did, for the log.
#[derive(Debug, Default)]
pub struct Settled {
    pub terminate: BTreeSet<Pair>,
    /// Due, but held back (each reported once).
    pub held: Vec<(Pair, Why)>,
    /// Held drains that restarted now that another backend is up.
    pub restarted: Vec<(Pair, Why)>,
    pub forgotten: Vec<(Pair, Why)>,
}

/// The pairs whose sockets are to be terminated.
#[derive(Debug, Default)]
pub struct Pending {
    /// `bool`: held back, and said so in the log.
    pairs: BTreeMap<Pair, (Why, When, bool)>,
}

impl Pending {
    /// Terminate as soon as another backend can take the sockets; replaces a drain.
    pub fn now(&mut self, pair: Pair, why: Why) {
        self.pairs.insert(pair, (why, When::Now, false));
    }

    /// Terminate at `at`; a termination that is due now stays due now.
    pub fn at(&mut self, pair: Pair, why: Why, at: Instant) {
        if self.pairs.get(&pair).is_none_or(|(_, w, _)| *w != When::Now) {
            self.pairs.insert(pair, (why, When::At(at), false));
        }
    }

    pub fn cancel(&mut self, pair: &Pair) {
        self.pairs.remove(pair);
    }

    /// Cancels what is pending for `pair` for this reason only.
    pub fn cancel_if(&mut self, pair: &Pair, why: Why) {
        if self.pairs.get(pair).is_some_and(|(w, _, _)| *w == why) {
            self.pairs.remove(pair);
        }
    }

    /// The earliest drain deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pairs.values().filter_map(|(_, w, _)| if let When::At(t) = w { Some(*t) } else { None }).min()
    }

    /// Takes the pairs that are due at `now` and may be terminated (`verdict`), holds back the
    /// rest, and restarts held drains that may go ahead now.
    pub fn settle(&mut self, now: Instant, drain: Duration, verdict: impl Fn(&Pair) -> Verdict) -> Settled {
        let mut out = Settled::default();
        for (pair, (why, when, told)) in &mut self.pairs {
            let due = match *when {
                When::Now => true,
                When::At(t) => t <= now,
                When::Deferred => false,
            };
            match (verdict(pair), due, *when) {
                (Verdict::Forget, true, _) | (Verdict::Forget, _, When::Deferred) => {
                    out.forgotten.push((*pair, *why))
                }
                (Verdict::Move, true, _) => {
                    out.terminate.insert(*pair);
                }
                (Verdict::Move, false, When::Deferred) => {
                    *when = When::At(now + drain);
                    *told = false;
                    out.restarted.push((*pair, *why));
                }
                (Verdict::Hold, true, _) => {
                    if let When::At(_) = when {
                        *when = When::Deferred;
                    }
                    if !*told {
                        *told = true;
                        out.held.push((*pair, *why));
                    }
                }
                _ => {}
            }
        }
        let gone: BTreeSet<Pair> =
            out.terminate.iter().copied().chain(out.forgotten.iter().map(|(p, _)| *p)).collect();
        self.pairs.retain(|p, _| !gone.contains(p));
        out
    }
}
