//! Leaving the all-down fallback. When every master failed (etcd lost quorum, a network cut)
//! and they come back, the first to pass its probes would otherwise take every reconnecting
//! client of every node in the same second, and least-connections cannot undo that: those
//! connections live for hours. So a frontend stays on the fallback (which serves every vouched
//! master, the recovered ones among them) until most of its masters serve again, or for a
//! grace time after the first did, whichever comes first. A master that stays down does not
//! keep the node on the fallback for longer than the grace.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use tokio::time::{Duration, Instant};

use crate::{
    config::Config,
    health::{BackendHealth, ProbeTarget, frontend_health, quorum_serves},
};

#[derive(Debug)]
pub struct FallbackGrace {
    grace: Duration,
    /// Frontends held on the fallback, and until when.
    leaving: BTreeMap<SocketAddr, Instant>,
}

impl FallbackGrace {
    pub fn new(grace: Duration) -> Self {
        Self { grace, leaving: BTreeMap::new() }
    }

    /// The frontends to keep on the fallback at `now`: each that was on it (`on_fallback`) or
    /// is being held, has some backend serving again, and neither a majority serving nor its
    /// grace over.
    pub fn held(
        &mut self,
        now: Instant,
        config: &Config,
        health: &BTreeMap<ProbeTarget, BackendHealth>,
        on_fallback: impl Fn(SocketAddr) -> bool,
    ) -> BTreeSet<SocketAddr> {
        let mut held = BTreeSet::new();
        let mut leaving = BTreeMap::new();
        for f in &config.frontends {
            let was = self.leaving.get(&f.address).copied();
            if was.is_none() && !on_fallback(f.address) {
                continue;
            }
            let by_addr = frontend_health(f, health);
            let some_serve = f.backends.iter().any(|b| by_addr.get(b).is_none_or(|h| h.state.serves()));
            if !some_serve {
                // All down again (or still): the plain fallback, and a fresh grace next time.
                continue;
            }
            let until = was.unwrap_or(now + self.grace);
            if quorum_serves(&f.backends, &by_addr) || until <= now {
                log::info!("frontend {}: leaving the all-down fallback", f.address);
                continue;
            }
            if was.is_none() {
                log::warn!(
                    "frontend {}: a backend serves again after all had failed; staying on the fallback for up to {:?} so the others can come back before every client lands on it",
                    f.address,
                    self.grace
                );
            }
            leaving.insert(f.address, until);
            held.insert(f.address);
        }
        self.leaving = leaving;
        held
    }

    /// When a held frontend's grace ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.leaving.values().min().copied()
    }
}
