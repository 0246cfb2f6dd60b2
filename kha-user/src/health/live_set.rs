//! Which backends a frontend serves, and which masters discovery asks, from their health.

use std::{collections::BTreeMap, net::SocketAddr};

use super::{AllDown, BackendHealth, ProbeTarget, State};
use crate::config::{Config, Frontend};

/// A frontend's live set from its configured backends and their health, and whether it fell
/// back to all of them because none is healthy. The fallback takes only vouched backends: one
/// that only discovery names and that never passed a probe is never served.
pub fn live_set(
    configured: &[SocketAddr],
    health: &BTreeMap<SocketAddr, BackendHealth>,
    all_down: AllDown,
) -> (Vec<SocketAddr>, bool) {
    let serving = serving(configured, health);
    if !serving.is_empty() || configured.is_empty() {
        return (serving, false);
    }
    let vouched = fallback_set(configured, health);
    match all_down {
        AllDown::Fallback if !vouched.is_empty() => (vouched, true),
        AllDown::Fallback | AllDown::FailClosed => (Vec::new(), false),
    }
}

fn serving(configured: &[SocketAddr], health: &BTreeMap<SocketAddr, BackendHealth>) -> Vec<SocketAddr> {
    configured.iter().copied().filter(|b| health.get(b).is_none_or(|h| h.state.serves())).collect()
}

/// What the all-down fallback serves: every vouched backend.
pub(crate) fn fallback_set(
    configured: &[SocketAddr],
    health: &BTreeMap<SocketAddr, BackendHealth>,
) -> Vec<SocketAddr> {
    configured.iter().copied().filter(|b| health.get(b).is_none_or(BackendHealth::vouched)).collect()
}

/// Whether most of a frontend's vouched backends serve again: then a frontend that was on the
/// all-down fallback leaves it at once, since the reconnecting clients spread over a majority.
pub fn quorum_serves(configured: &[SocketAddr], health: &BTreeMap<SocketAddr, BackendHealth>) -> bool {
    let vouched = fallback_set(configured, health);
    let serving = serving(configured, health).iter().filter(|b| vouched.contains(b)).count();
    serving * 2 > vouched.len()
}

/// The masters discovery may reach the API on directly, best first: the backends of the
/// frontends discovery feeds, proven up ones first, then up, then not yet probed, then the
/// failing ones (a probe can fail for reasons of its own; the API client verifies TLS anyway).
/// Never one that only discovery names and no probe vouched for: discovery must not learn the
/// next set from an address the last (perhaps forged) set brought in.
///
/// Within a rank the config order is rotated by `spread` (a per-node value, [`node_spread`]):
/// in the same order on every node, every node's watch would go to the same master, and when
/// it failed every node would move to the same next one in the same second.
pub fn api_candidates(
    config: &Config,
    health: &BTreeMap<ProbeTarget, BackendHealth>,
    spread: u64,
) -> Vec<SocketAddr> {
    let mut ranked: BTreeMap<SocketAddr, u8> = BTreeMap::new();
    let mut order = Vec::new();
    for f in config.frontends.iter().filter(|f| f.discover) {
        for b in &f.backends {
            let rank = match health.get(&ProbeTarget::of(f, *b)) {
                None => Some(2),
                Some(h) if !h.vouched => None,
                Some(h) if h.proven() => Some(0),
                Some(h) if h.state == State::Up => Some(1),
                Some(h) if h.state.serves() => Some(2),
                Some(_) => Some(3),
            };
            let Some(rank) = rank else { continue };
            match ranked.get_mut(b) {
                Some(r) => *r = (*r).min(rank),
                None => {
                    ranked.insert(*b, rank);
                    order.push(*b);
                }
            }
        }
    }
    // Stable: within a rank, in config order (static masters first), then rotated.
    order.sort_by_key(|b| ranked[b]);
    for group in order.chunk_by_mut(|a, b| ranked[a] == ranked[b]) {
        let k = group.len() as u64;
        group.rotate_left((spread % k) as usize);
    }
    order
}

/// A value of this node's own, the same across agent restarts: a hash (FNV-1a, fixed, unlike
/// std's per-process keys) of the host name, 0 if it cannot be read.
pub fn node_spread() -> u64 {
    let name = std::fs::read("/proc/sys/kernel/hostname").unwrap_or_default();
    name.trim_ascii()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

/// The health of a frontend's backends, by address.
pub fn frontend_health(
    f: &Frontend,
    health: &BTreeMap<ProbeTarget, BackendHealth>,
) -> BTreeMap<SocketAddr, BackendHealth> {
    f.backends.iter().filter_map(|b| Some((*b, health.get(&ProbeTarget::of(f, *b))?.clone()))).collect()
}
