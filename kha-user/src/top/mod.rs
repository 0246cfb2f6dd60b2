//! `kha top`: the clients of the apiserver on this node, from the kernel's per-client
//! counters (`KHA_CLIENTS`, kha-common `client`). Pure parts: what a cgroup path says of its
//! pod (`pod`), rates from two samples (`rate`), top-N with the rest as "other" (`rank`), the
//! table and JSON (`render`). `cgroups` resolves cgroup ids to paths from the cgroup2 mount;
//! `live` is the command, reading the maps through `crate::maps::clients`.

pub mod cgroups;
pub mod live;
pub mod metrics;
pub mod pod;
pub mod rank;
pub mod rate;
pub mod render;
pub mod sampler;

/// One `KHA_CLIENTS` entry as read: a client cgroup's connects through one frontend to one
/// backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub cgroup_id: u64,
    pub frontend: String,
    /// The backend's address, or `#<id>` for an id no longer in the backend table.
    pub backend: String,
    pub backend_id: u32,
    pub connects: u64,
    pub open: u64,
    /// The process name of the last connect to this backend.
    pub process: String,
}

impl Sample {
    fn key(&self) -> (u64, &str, u32) {
        (self.cgroup_id, &self.frontend, self.backend_id)
    }
}
