//! Map names, capacities and layouts.
//!
//! The service map follows Cilium's `lb4_services`: one key per (frontend, slot). Slot 0 is the
//! frontend itself and holds the number of backends and where their slots start; slots
//! `base+1..=base+count` each name a backend id. Unlike Cilium, each frontend has two slot
//! regions and a new set is written into the unused one before slot 0 flips to it, so a
//! concurrent connect sees exactly the old set or exactly the new one, never a mix: the agent
//! writes backends, then the new region's slots, then slot 0, then deletes the old region
//! (see `kha-user`'s `table::plan`).

use crate::addr::AddrBe;

/// Frontend slots: `(frontend, slot) -> ServiceValue`.
pub const MAP_SERVICES: &str = "KHA_SVC";
/// Backends: `backend id -> Backend`.
pub const MAP_BACKENDS: &str = "KHA_BACKENDS";
/// The agent's settings for the kernel side: index 0 -> `DatapathConfig`.
pub const MAP_CONFIG: &str = "KHA_CONFIG";
/// Per-CPU counters, indexed by the `STAT_*` constants. `_V2`: 16 slots where `KHA_STATS` had
/// 8 (the per-way termination counters did not fit).
pub const MAP_STATS: &str = "KHA_STATS_V2";
/// Maps of earlier layouts that a newer kha no longer uses; `kha detach` removes their pins.
pub const RETIRED_MAPS: [&str; 1] = ["KHA_STATS"];
/// Per-backend connection counters kept by sock_ops: `backend id -> BackendStats`.
pub const MAP_BACKEND_STATS: &str = "KHA_BE_STATS";
/// Per-backend passive health: `backend id -> PassiveHealth`. The kernel marks a backend
/// suspect on a failed connect; the agent clears the mark once a probe says it is ready.
pub const MAP_BACKEND_HEALTH: &str = "KHA_BE_HEALTH";
/// Sockets kha redirected and that are not closed yet: `socket cookie -> Conn`. getpeername
/// answers from it, sock_ops counts per backend with it, and the agent finds the sockets to
/// terminate in it. sock_ops removes an entry at TCP_CLOSE, sock_release that of a socket whose
/// connect failed before its SYN. (Socket storage would free itself with the socket, but
/// creating it cost 0.9 µs per connect, more than everything else kha does there.)
pub const MAP_CONNS: &str = "KHA_CONNS";

/// What the agent's probes say of each configured (frontend, backend) pair, for `kha status`:
/// `ProbeKey -> ProbeStatus`. Written only by the agent; the kernel never reads it.
pub const MAP_PROBES: &str = "KHA_PROBES";

/// All maps, in the order `kha detach` and `kha status` walk them.
pub const ALL_MAPS: [&str; 10] = [
    MAP_PROBES,
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_CONFIG,
    MAP_STATS,
    MAP_BACKEND_STATS,
    MAP_BACKEND_HEALTH,
    MAP_CONNS,
    crate::client::MAP_CLIENTS,
    crate::layout::MAP_LAYOUT,
];

/// The programs kha attaches, each under a pinned link of its own (the agent's
/// `loader::HOOKS`; the lab waits for this many links).
pub const HOOK_COUNT: usize = 6;

/// Frontends per node: a node has one or two (`127.0.0.1:6443`, `[::1]:6443`), a few with a
/// service VIP or a second control plane. The slot and probe maps' bucket arrays scale with it
/// (16 bytes per entry of capacity, about 380 KiB at 32; 1.5 MiB at 128).
pub const MAX_FRONTENDS: usize = 32;
pub const MAX_BACKENDS_PER_FRONTEND: usize = 255;
/// Backend ids are `1..=MAX_BACKENDS`; per-backend arrays have `MAX_BACKENDS + 1` entries.
pub const MAX_BACKENDS: usize = 4096;
pub const BACKEND_ARRAY_LEN: usize = MAX_BACKENDS + 1;
/// Redirected sockets tracked at once by default (LRU: the oldest entry goes when it is
/// full). A node opens tens to hundreds of connections to its apiservers (kubelet, kube-proxy,
/// the CNI and other host-network agents); each entry pins about 120 bytes whether used or
/// not, so the default is ample rather than vast, and `--max-conns` raises it.
pub const CONNS_CAPACITY: usize = 16384;
/// The range `--max-conns` accepts.
pub const MIN_CONNS: usize = 1024;
pub const MAX_CONNS: usize = 1 << 24;
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
/// Choices that passed over a backend marked suspect by a failed connect.
pub const STAT_SUSPECT_SKIPPED: u32 = 5;
/// Choices where every backend was suspect, so one was used anyway.
pub const STAT_ALL_SUSPECT: u32 = 6;
/// Sockets the agent terminated because their backend failed or was removed, either way.
/// Written by the agent, not the kernel.
pub const STAT_TERMINATED: u32 = 7;
/// Of those, sockets ended by a forged TCP RST (the client reads ECONNRESET, which client-go
/// takes for the normal end of a watch). Written by the agent.
pub const STAT_TERMINATED_RESET: u32 = 8;
/// Of those, sockets ended by sock_diag SOCK_DESTROY (the client reads ECONNABORTED): the
/// fallback when no RST could be sent or one did not end the socket. Written by the agent.
pub const STAT_TERMINATED_DESTROY: u32 = 9;
/// Room for counters to come without another layout change (`KHA_STATS_V2` has 16 slots).
pub const STATS_LEN: usize = 16;
pub const STAT_NAMES: [&str; 10] = [
    "rewritten",
    "no_backend",
    "inconsistent",
    "peername",
    "foreign_netns",
    "suspect_skipped",
    "all_suspect",
    "terminated",
    "terminated_reset",
    "terminated_destroy",
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
        Self { addr_be, port_be, slot }
    }

    #[inline(always)]
    pub const fn with_slot(&self, slot: u16) -> Self {
        Self { addr_be: self.addr_be, port_be: self.port_be, slot }
    }
}

/// Value of `KHA_SVC`. In slot 0 `count`, `base`, `policy` and `rr` are used and `backend_id`
/// is 0; in backend slots only `backend_id` is set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    /// Round-robin position, advanced atomically by the kernel; the agent writes 0.
    pub rr: u32,
    pub count: u16,
    /// The live region: backend slots are `base+1..=base+count`. One of `SLOT_BASES`.
    pub base: u16,
    /// `POLICY_*`.
    pub policy: u8,
    /// Slot 0: `FRONTEND_*` flags, for `kha status`; the kernel ignores them.
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// Every backend of the frontend failed its probes, so all configured backends are served
/// (the fallback that keeps a broken probe, e.g. a wrong CA, from cutting the node off).
pub const FRONTEND_FALLBACK: u8 = 1;
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

pub const POLICY_RANDOM: u8 = 0;
pub const POLICY_ROUND_ROBIN: u8 = 1;
pub const POLICY_LEAST_CONN: u8 = 2;
pub const POLICY_P2C: u8 = 3;
/// Indexed by `POLICY_*`; these are the names in configs and `kha status`.
pub const POLICY_NAMES: [&str; 4] = ["random", "round-robin", "least-connections", "p2c"];

impl ServiceValue {
    pub const fn frontend(count: u16, base: u16, policy: u8) -> Self {
        Self { backend_id: 0, rr: 0, count, base, policy, flags: 0, _pad: [0; 2] }
    }

    pub const fn with_flags(self, flags: u8) -> Self {
        Self { flags, ..self }
    }

    pub const fn slot(backend_id: u32) -> Self {
        Self { backend_id, rr: 0, count: 0, base: 0, policy: 0, flags: 0, _pad: [0; 2] }
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
        Self { addr_be, port_be, _pad: 0 }
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

/// Value of `KHA_BE_STATS[id]`, written only by the kernel (atomic adds); the agent zeroes an
/// entry when it gives its id to a new backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Connects rewritten to this backend.
    pub chosen: u64,
    /// Connects that reached ESTABLISHED.
    pub established: u64,
    /// Sockets from SYN sent until closed. Wraps if a close is missed; read it with
    /// `active_count`.
    pub active: u64,
    /// Connects closed before ESTABLISHED (refused, timed out, reset).
    pub failed: u64,
    /// Retransmission timeouts on this backend's connections.
    pub rto: u64,
    /// Smoothed RTT (µs) over handshakes and closes, EWMA 1/8; 0 until measured.
    pub srtt_us: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 48);

impl BackendStats {
    /// `active` as a count: a missed close must not make a backend look infinitely loaded.
    pub fn active_count(&self) -> u64 {
        if self.active > u32::MAX as u64 { 0 } else { self.active }
    }
}

/// Value of `KHA_BE_HEALTH[id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassiveHealth {
    /// `bpf_ktime_get_ns` of the failed connect that made this backend suspect; 0 = not
    /// suspect. Set by the kernel, cleared by the agent.
    pub suspect_ns: u64,
}
const _: () = assert!(core::mem::size_of::<PassiveHealth>() == 8);

/// Value of `KHA_CONNS[cookie]`: what getpeername must report and what it replaced, and whose
/// it is. Layout version 2 (`client_cgroup_id` added); version 1 is `ConnV1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub frontend_addr_be: AddrBe,
    pub backend_addr_be: AddrBe,
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
    pub backend_id: u32,
    /// Where the connect is: `CONN_UNSENT`, `CONN_SYN_SENT` or `CONN_ESTABLISHED`.
    pub established: u32,
    pub _pad: u32,
    /// The connecting task's cgroup, as in its `KHA_CLIENTS` key: the close path (softirq,
    /// where the current task is anyone's) finds the client's entry by it. 0: not known
    /// (carried over from version 1), so no client entry is counted.
    pub client_cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<Conn>() == 56);

/// `KHA_CONNS` values of layout version 1, as a migration reads them.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnV1 {
    pub frontend_addr_be: AddrBe,
    pub backend_addr_be: AddrBe,
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
    pub backend_id: u32,
    pub established: u32,
}
const _: () = assert!(core::mem::size_of::<ConnV1>() == 44);

impl From<ConnV1> for Conn {
    fn from(c: ConnV1) -> Self {
        Self {
            frontend_addr_be: c.frontend_addr_be,
            backend_addr_be: c.backend_addr_be,
            frontend_port_be: c.frontend_port_be,
            backend_port_be: c.backend_port_be,
            backend_id: c.backend_id,
            established: c.established,
            _pad: 0,
            client_cgroup_id: 0,
        }
    }
}

/// `Conn::established` from the SYN on: counted in `BackendStats::active` until the close.
pub const CONN_SYN_SENT: u32 = 0;
/// `Conn::established` once ESTABLISHED (still counted in `active`).
pub const CONN_ESTABLISHED: u32 = 1;
/// `Conn::established` as the connect hook writes it: no SYN yet, so not counted; the connect
/// may still fail before one (no route, no free local port). After 0 and 1 so that entries
/// written before this state existed keep their meaning.
pub const CONN_UNSENT: u32 = 2;

/// Key of `KHA_PROBES`.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbeKey {
    pub frontend_addr_be: AddrBe,
    pub backend_addr_be: AddrBe,
    pub frontend_port_be: u16,
    pub backend_port_be: u16,
}
const _: () = assert!(core::mem::size_of::<ProbeKey>() == 36);

pub const PROBE_UNKNOWN: u8 = 0;
pub const PROBE_UP: u8 = 1;
pub const PROBE_DOWN: u8 = 2;
/// Failing readiness but still answering: no new connections, existing ones end after the
/// drain time.
pub const PROBE_DRAINING: u8 = 3;
/// Health checks are off: always served.
pub const PROBE_UNCHECKED: u8 = 4;
/// The probe connection was lost: no new connections, existing ones kept, until the immediate
/// reconnect finds it ready again (up) or confirms the failure (down). A new value in the same
/// `u8`, not a new layout: a `kha status` from before shows it as `?`.
pub const PROBE_SUSPECT: u8 = 5;
/// Named only by discovery (not configured, not in the last run's set) and no probe has passed
/// yet: not served, not even by the all-down fallback. A new value in the same `u8`, as
/// `PROBE_SUSPECT`.
pub const PROBE_UNPROVEN: u8 = 6;
/// Indexed by `PROBE_*`.
pub const PROBE_STATE_NAMES: [&str; 7] =
    ["unknown", "up", "down", "draining", "unchecked", "suspect", "unproven"];
pub const PROBE_REASON_LEN: usize = 112;

/// Value of `KHA_PROBES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeStatus {
    /// `PROBE_*`.
    pub state: u8,
    /// 1 if the backend is in the frontend's live set.
    pub serving: u8,
    pub _pad: [u8; 2],
    /// Latency of the last probe, µs (0: none yet).
    pub latency_us: u32,
    /// Unix time of the last state change, seconds.
    pub since_unix_s: u64,
    /// The last failure, UTF-8, NUL-padded.
    pub reason: [u8; PROBE_REASON_LEN],
}
const _: () = assert!(core::mem::size_of::<ProbeStatus>() == 128);

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::ProbeKey {}
    unsafe impl aya::Pod for super::ProbeStatus {}
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::PassiveHealth {}
    unsafe impl aya::Pod for super::Conn {}
    unsafe impl aya::Pod for super::ConnV1 {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::DatapathConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_names_fit_the_kernel_limit() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL; longer names are silently truncated.
        for name in ALL_MAPS.iter().chain(&RETIRED_MAPS) {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
            assert!(name.starts_with("KHA_"));
        }
    }

    #[test]
    fn every_stat_has_a_name_and_fits() {
        assert!(STAT_NAMES.len() <= STATS_LEN);
        assert_eq!(STAT_NAMES[STAT_FOREIGN_NETNS as usize], "foreign_netns");
        assert_eq!(STAT_NAMES[STAT_ALL_SUSPECT as usize], "all_suspect");
        assert_eq!(POLICY_NAMES[POLICY_P2C as usize], "p2c");
        assert_eq!(STAT_NAMES[STAT_TERMINATED_RESET as usize], "terminated_reset");
        assert_eq!(STAT_NAMES[STAT_TERMINATED_DESTROY as usize], "terminated_destroy");
    }

    #[test]
    fn capacities_cover_a_full_table() {
        // Both regions' slot numbers fit the u16 slot field.
        assert!(2 * MAX_BACKENDS_PER_FRONTEND < u16::MAX as usize);
        assert_eq!(SERVICES_CAPACITY, 32 * 511);
    }
}
