//! Probe failures on this node's side (out of descriptors, memory, ports): counted, never held
//! against a master, and logged at most once a minute per backend.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use tokio::time::Instant;

use crate::probe::ProbeFailure;

/// How often a backend's probe may log a local error: a node out of descriptors fails every
/// probe, and a log line per probe would add to its trouble.
const LOCAL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The last local-error warning per backend and how many were held back since.
#[derive(Default)]
pub struct LocalWarnings(BTreeMap<SocketAddr, (Instant, u64)>);

impl LocalWarnings {
    pub fn warn(&mut self, backend: SocketAddr, f: &ProbeFailure, now: Instant) {
        match self.0.get_mut(&backend) {
            Some((last, held)) if now.duration_since(*last) < LOCAL_WARNING_EVERY => *held += 1,
            entry => {
                let held = entry.map_or(0, |(_, held)| *held);
                log::warn!(
                    "probe of {backend} failed on this node ({f}; {held} more since the last warning): not counted against the backend; the node is short of descriptors, memory or ports"
                );
                self.0.insert(backend, (now, 0));
            }
        }
    }
}
