//! Map names, capacities and layouts.
//!
//! The service map follows Cilium's `lb4_services`: one key per (frontend, slot). Slot 0 is the
//! frontend itself and holds the number of backends and where their slots start; slots
//! `base+1..=base+count` each name a backend id. Unlike Cilium, each frontend has two slot
//! regions and a new set is written into the unused one before slot 0 flips to it, so a
//! concurrent connect sees exactly the old set or exactly the new one, never a mix: the agent
//! writes backends, then the new region's slots, then slot 0, then deletes the old region
//! (see `kha-user`'s `endpoints::plan`).

use crate::addr::AddrBe;

/// Frontend slots: `(frontend, slot) -> ServiceValue`.
pub const MAP_SERVICES: &str = "KHA_SVC";
/// Backends: `backend id -> Backend`.
pub const MAP_BACKENDS: &str = "KHA_BACKENDS";
/// The agent's settings for the kernel side: index 0 -> `DatapathConfig`.
pub const MAP_CONFIG: &str = "KHA_CONFIG";
/// Per-socket state (socket storage) for sockets kha rewrote: `SockState`.
pub const MAP_SOCKS: &str = "KHA_SOCKS";
/// Per-CPU counters, indexed by the `STAT_*` constants.
pub const MAP_STATS: &str = "KHA_STATS";

/// All maps, in the order `kha detach` and `kha status` walk them.
pub const ALL_MAPS: [&str; 5] = [MAP_SERVICES, MAP_BACKENDS, MAP_CONFIG, MAP_SOCKS, MAP_STATS];

pub const MAX_FRONTENDS: usize = 128;
pub const MAX_BACKENDS_PER_FRONTEND: usize = 255;
pub const MAX_BACKENDS: usize = 4096;
/// The two slot regions of a frontend start after these bases.
pub const SLOT_BASES: [u16; 2] = [0, MAX_BACKENDS_PER_FRONTEND as u16];
/// Every frontend may hold its slot 0 plus two full regions (the live one and the next).
pub const SERVICES_CAPACITY: usize = MAX_FRONTENDS * (1 + 2 * MAX_BACKENDS_PER_FRONTEND);

/// Connects rewritten to a backend.
pub const STAT_REWRITTEN: u32 = 0;
/// Connects to a frontend with an empty backend set, failed with EHOSTUNREACH.
pub const STAT_NO_BACKEND: u32 = 1;
/// Connects that found a slot or backend missing (a bug or a foreign writer), failed with
/// EHOSTUNREACH rather than sent to whatever listens on the frontend address.
pub const STAT_INCONSISTENT: u32 = 2;
/// getpeername calls answered with the frontend address.
pub const STAT_PEERNAME: u32 = 3;
/// Connects to a frontend address from another network namespace, left untouched.
pub const STAT_FOREIGN_NETNS: u32 = 4;
pub const STATS_LEN: usize = 8;
pub const STAT_NAMES: [&str; 5] = [
    "rewritten",
    "no_backend",
    "inconsistent",
    "peername",
    "foreign_netns",
];

/// Key of `KHA_SVC`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr_be: AddrBe,
    pub port_be: u16,
    /// 0: the frontend entry; `base+1..=base+count`: backend slots.
    pub slot: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

impl ServiceKey {
    #[inline(always)]
    pub const fn new(addr_be: AddrBe, port_be: u16, slot: u16) -> Self {
        Self {
            addr_be,
            port_be,
            slot,
        }
    }

    #[inline(always)]
    pub const fn with_slot(&self, slot: u16) -> Self {
        Self {
            addr_be: self.addr_be,
            port_be: self.port_be,
            slot,
        }
    }
}

/// Value of `KHA_SVC`. In slot 0 `count`, `base` and `policy` are set and `backend_id` is 0;
/// in backend slots only `backend_id` is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    /// The live region: backend slots are `base+1..=base+count`. One of `SLOT_BASES`.
    pub base: u16,
    /// `POLICY_*`; only `POLICY_RANDOM` exists so far.
    pub policy: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);

pub const POLICY_RANDOM: u8 = 0;

impl ServiceValue {
    pub const fn frontend(count: u16, base: u16, policy: u8) -> Self {
        Self {
            backend_id: 0,
            count,
            base,
            policy,
            _pad: [0; 3],
        }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self {
            backend_id,
            count: 0,
            base: 0,
            policy: 0,
            _pad: [0; 3],
        }
    }
}

/// Value of `KHA_BACKENDS`. IPv4 backends are v4-mapped.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr_be: AddrBe,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 20);

impl Backend {
    pub const fn new(addr_be: AddrBe, port_be: u16) -> Self {
        Self {
            addr_be,
            port_be,
            _pad: 0,
        }
    }
}

/// Value of `KHA_CONFIG[0]`, written by the agent before it attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Only sockets of this network namespace are rewritten. 0 (never written) matches none.
    pub netns_cookie: u64,
    /// The cgroup the programs are attached to (its inode number), so a restarted agent can
    /// tell whether the pinned links are the ones it was asked for.
    pub cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 16);

/// Socket storage of a socket kha rewrote: what getpeername must answer and what it replaced.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    pub frontend_addr_be: AddrBe,
    pub backend_addr_be: AddrBe,
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockState>() == 40);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::SockState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL; longer names are silently truncated.
        for name in ALL_MAPS {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
            assert!(name.starts_with("KHA_"));
        }
    }

    #[test]
    fn every_stat_has_a_name_and_fits() {
        assert!(STAT_NAMES.len() <= STATS_LEN);
        assert_eq!(STAT_NAMES[STAT_FOREIGN_NETNS as usize], "foreign_netns");
    }

    #[test]
    fn capacities_cover_a_full_table() {
        // Both regions' slot numbers fit the u16 slot field.
        assert!(2 * MAX_BACKENDS_PER_FRONTEND < u16::MAX as usize);
        assert_eq!(SERVICES_CAPACITY, 128 * 511);
    }
}
