//! The backend table and the status records the health of the backends asks for.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::SystemTime,
};

use kha_common::{
    Backend, FRONTEND_FALLBACK, PROBE_REASON_LEN, PROBE_UNKNOWN, ProbeKey, ProbeStatus, ServiceKey,
};

use super::Desired;
use crate::{
    config::Config,
    health::{AllDown, BackendHealth, ProbeTarget, fallback_set, frontend_health, live_set},
};

/// The backend table and the status records for a config and the health of its backends.
///
/// Frontends in `held` stay on the all-down fallback although a backend serves again (the
/// supervisor's grace after all were down: see `supervise::fallback`).
pub fn desired_state(
    config: &Config,
    health: &BTreeMap<ProbeTarget, BackendHealth>,
    all_down: AllDown,
    held: &BTreeSet<SocketAddr>,
) -> (Desired, BTreeMap<ProbeKey, ProbeStatus>) {
    let mut desired = Desired::from_config(config);
    let mut statuses = BTreeMap::new();
    for f in &config.frontends {
        let by_addr = frontend_health(f, health);
        let (live, fallback) = match held.contains(&f.address) {
            true => (fallback_set(&f.backends, &by_addr), true),
            false => live_set(&f.backends, &by_addr, all_down),
        };
        let entry = desired.frontends.get_mut(&ServiceKey::at(f.address, 0)).expect("from the same config");
        entry.backends = live.iter().map(|b| Backend::from(*b)).collect();
        entry.flags = if fallback { FRONTEND_FALLBACK } else { 0 };
        for b in &f.backends {
            if !live.contains(b) {
                desired.keep.insert(Backend::from(*b));
            }
            let fk = ServiceKey::at(f.address, 0);
            let bk = Backend::from(*b);
            let key = ProbeKey {
                frontend_addr_be: fk.addr_be,
                backend_addr_be: bk.addr_be,
                frontend_port_be: fk.port_be,
                backend_port_be: bk.port_be,
            };
            statuses.insert(key, probe_status(by_addr.get(b), live.contains(b)));
        }
    }
    (desired, statuses)
}

fn probe_status(h: Option<&BackendHealth>, serving: bool) -> ProbeStatus {
    let mut reason = [0u8; PROBE_REASON_LEN];
    let (state, latency_us, since) = match h {
        Some(h) => {
            if let Some(r) = &h.last_failure {
                // Cut on a character boundary so status never shows half a character.
                let mut end = r.len().min(PROBE_REASON_LEN);
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                reason[..end].copy_from_slice(&r.as_bytes()[..end]);
            }
            let latency = h.last_latency.map_or(0, |l| l.as_micros().min(u32::MAX as u128) as u32);
            let since = h.since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            (h.state.code(), latency, since)
        }
        None => (PROBE_UNKNOWN, 0, 0),
    };
    ProbeStatus { state, serving: serving as u8, _pad: [0; 2], latency_us, since_unix_s: since, reason }
}
