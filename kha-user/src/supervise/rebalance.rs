//! Rebalancing long-lived connections. After a master comes back (above all after every master
//! was down), the clients that reconnected meanwhile stay where they landed: kubelet's and
//! kube-proxy's connections live for hours and least-connections only places new ones. None of
//! the proxies in use today rebalances; kube-apiserver's own `--goaway-chance` exists because
//! of this. kha can: every interval (jittered, so a fleet's agents do not move in step) it ends
//! one connection of each frontend whose most loaded proven master holds at least two more
//! than its least loaded one, so the client reconnects and least-connections places it.
//!
//! Off by default: ending a connection is abrupt (a forged RST: client-go resumes its watches
//! without a relist, but a request in flight on that connection fails and is retried by its
//! client). At 5,000 nodes and one connection per node every 10 s, a returned master receives
//! about 500 reconnects/s until the fleet is even, and the rate falls as the imbalance does.
//! The oldest connection is the one moved: short requests end and rebalance on their own.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use kha_common::{Backend, ServiceKey};
use tokio::time::{Duration, Instant};

use super::Pair;
use crate::{
    config::Config,
    health::{BackendHealth, ProbeTarget},
    probe::jitter::Rng,
    table::Desired,
};

/// When the next round is due.
pub struct Rebalance {
    interval: Option<Duration>,
    next: Option<Instant>,
    rng: Rng,
}

impl Rebalance {
    /// `None`: off. The first round comes at a random point of the first interval.
    pub fn new(interval: Option<Duration>, now: Instant) -> Self {
        let mut rng = Rng::seeded("rebalance");
        let next = interval.map(|i| now + rng.between(Duration::ZERO, i));
        Self { interval, next, rng }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.next
    }

    /// Whether a round is due at `now`; if so, the next one is scheduled.
    pub fn due(&mut self, now: Instant) -> bool {
        match (self.interval, self.next) {
            (Some(i), Some(t)) if t <= now => {
                self.next = Some(now + self.rng.jitter(i));
                true
            }
            _ => false,
        }
    }
}

/// One connection to move: from the most loaded backend of a frontend (with `from` open)
/// towards the least loaded one (with `to` open).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub pair: Pair,
    pub from: usize,
    pub toward: SocketAddr,
    pub to: usize,
}

/// The moves of one round. Only frontends served normally (not on the fallback) and only
/// among backends the live set serves and whose last probe passed: a connection is never sent
/// towards a master in doubt, and those of a failing master are the drain's business.
pub fn moves(
    config: &Config,
    health: &BTreeMap<ProbeTarget, BackendHealth>,
    desired: &Desired,
    on_fallback: &BTreeSet<SocketAddr>,
    open: &BTreeMap<Pair, usize>,
) -> Vec<Move> {
    let mut out = Vec::new();
    for f in config.frontends.iter().filter(|f| !on_fallback.contains(&f.address)) {
        let served = desired.frontends.get(&ServiceKey::at(f.address, 0));
        let eligible = |b: &&SocketAddr| {
            let proven = health.get(&ProbeTarget::of(f, **b)).is_some_and(BackendHealth::proven);
            proven && served.is_some_and(|s| s.backends.contains(&Backend::from(**b)))
        };
        let loads: Vec<(SocketAddr, usize)> = f
            .backends
            .iter()
            .filter(eligible)
            .map(|b| (*b, open.get(&(f.address, *b)).copied().unwrap_or(0)))
            .collect();
        // Ties go to the first configured, so the choice is stable from round to round.
        let Some(&(most, from)) = loads.iter().rev().max_by_key(|(_, n)| *n) else { continue };
        let Some(&(least, to)) = loads.iter().min_by_key(|(_, n)| *n) else { continue };
        if from >= to + 2 {
            out.push(Move { pair: (f.address, most), from, toward: least, to });
        }
    }
    out
}
