//! The backend table: config and health become a `Desired` table (`desired`), the kernel's
//! maps are read back as a `Snapshot`, `plan` orders the writes from one to the other, and
//! `sync` applies them through a `BackendTable` (the pinned maps, or memory in tests).
//!
//! The order: new backends first, then the frontend's unused slot region, then its slot 0
//! (count and region base, one atomic map write), then slots no connect can read any more, and
//! backends nobody references last. The kernel reads slot 0 and then only the region it names,
//! so after *every prefix* of a plan each frontend resolves to exactly its old set or exactly
//! its new one; and the region the old slot 0 named stays until the frontend's next flip, so a
//! connect that read slot 0 just before the flip still finds every slot and backend it reads.
//! `every_prefix_resolves_to_old_or_new` checks both.

use std::collections::{BTreeMap, BTreeSet};

use kha_common::{Backend, ServiceKey, ServiceValue};

use crate::config::Config;

mod desired;
mod plan;
mod sync;
#[cfg(test)]
mod tests;

pub use desired::desired_state;
pub use plan::plan;
pub use sync::{BackendTable, SyncError, SyncReport, sync};

/// A frontend's target state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub policy: u8,
    /// `FRONTEND_*` flags shown by `kha status`.
    pub flags: u8,
    /// The live set: what connects are balanced over.
    pub backends: Vec<Backend>,
}

/// Frontends keyed by their slot-0 key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<ServiceKey, DesiredFrontend>,
    /// Backends kept in the backend table although no live set has them (configured but
    /// down), so their ids and kernel counters survive until they come back.
    pub keep: BTreeSet<Backend>,
}

/// The maps' contents as read back from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
}

/// One map write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    PutSlot(ServiceKey, ServiceValue),
    DeleteSlot(ServiceKey),
    DeleteBackend(u32),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("no free backend id: the table holds {max} backends already")]
    BackendIdsExhausted { max: usize },
}

impl Desired {
    pub fn from_config(config: &Config) -> Self {
        let frontends = config
            .frontends
            .iter()
            .map(|f| {
                let backends = f.backends.iter().map(|b| Backend::from(*b)).collect();
                (
                    ServiceKey::at(f.address, 0),
                    DesiredFrontend { policy: f.policy.code(), flags: 0, backends },
                )
            })
            .collect();
        Desired { frontends, keep: BTreeSet::new() }
    }
}

impl Snapshot {
    /// A frontend's backends as the kernel resolves them now, in slot order, or `None` if the
    /// key is not a frontend or one of its live slots dangles.
    pub fn resolve(&self, frontend: &ServiceKey) -> Option<Vec<Backend>> {
        self.resolve_as(frontend, self.services.get(frontend)?)
    }

    /// The backends a connect that read slot 0 value `f` of `frontend` (now or earlier) finds
    /// in this table, or `None` if one of the slots it names, or their backends, is missing.
    pub fn resolve_as(&self, frontend: &ServiceKey, f: &ServiceValue) -> Option<Vec<Backend>> {
        (1..=f.count)
            .map(|i| {
                let id = self.services.get(&frontend.with_slot(f.base.checked_add(i)?))?.backend_id;
                self.backends.get(&id).copied()
            })
            .collect()
    }

    /// Slot-0 keys, in key order.
    pub fn frontends(&self) -> impl Iterator<Item = (&ServiceKey, &ServiceValue)> {
        self.services.iter().filter(|(k, _)| k.slot == 0)
    }

    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            Op::PutSlot(k, v) => {
                self.services.insert(*k, *v);
            }
            Op::DeleteSlot(k) => {
                self.services.remove(k);
            }
            Op::DeleteBackend(id) => {
                self.backends.remove(id);
            }
        }
    }
}
