//! The maps, BTF-defined so `bpftool map dump` prints field names, pinned by name so they
//! outlive the agent.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use kha_common::{
    BACKEND_ARRAY_LEN, BPF_F_NO_PREALLOC, Backend, BackendStats, CLIENTS_CAPACITY, CONNS_CAPACITY, ClientKey,
    ClientStats, Conn, DatapathConfig, LAYOUT_SLOTS, MAX_BACKENDS, MAX_BACKENDS_PER_FRONTEND, MAX_FRONTENDS,
    MapLayout, PassiveHealth, ProbeKey, ProbeStatus, SERVICES_CAPACITY, STATS_LEN, ServiceKey, ServiceValue,
};

/// Entries are allocated as the agent writes them (`BPF_F_NO_PREALLOC`, as kha-common's
/// `LAYOUTS` says): the capacity is for `MAX_FRONTENDS`, a node uses one or two, and a
/// preallocated map pins all of it. Lookups, all the datapath does, cost the same.
#[btf_map(pin_by_name)]
pub static KHA_SVC: HashMap<ServiceKey, ServiceValue, SERVICES_CAPACITY, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map(pin_by_name)]
pub static KHA_BACKENDS: HashMap<u32, Backend, MAX_BACKENDS, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

#[btf_map(pin_by_name)]
pub static KHA_CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map(pin_by_name)]
pub static KHA_STATS_V2: PerCpuArray<u64, STATS_LEN> = PerCpuArray::new();

#[btf_map(pin_by_name)]
pub static KHA_BE_STATS: Array<BackendStats, BACKEND_ARRAY_LEN> = Array::new();

#[btf_map(pin_by_name)]
pub static KHA_BE_HEALTH: Array<PassiveHealth, BACKEND_ARRAY_LEN> = Array::new();

#[btf_map(pin_by_name)]
pub static KHA_CONNS: LruHashMap<u64, Conn, CONNS_CAPACITY> = LruHashMap::new();

/// Connects and open sockets per client cgroup, frontend and backend (kha-common `client`).
#[btf_map(pin_by_name)]
pub static KHA_CLIENTS: LruHashMap<ClientKey, ClientStats, CLIENTS_CAPACITY> = LruHashMap::new();

/// Written by the agent for `kha status`; declared here so it is created and pinned with the
/// others. Not preallocated: most of its capacity is never used.
#[btf_map(pin_by_name)]
pub static KHA_PROBES: HashMap<
    ProbeKey,
    ProbeStatus,
    { MAX_FRONTENDS * MAX_BACKENDS_PER_FRONTEND },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// What each pinned map's layout is (kha-common `layout`). Written by the agent only.
#[btf_map(pin_by_name)]
pub static KHA_LAYOUT: Array<MapLayout, LAYOUT_SLOTS> = Array::new();

#[inline(always)]
pub fn count(stat: u32) {
    if let Some(c) = KHA_STATS_V2.get_ptr_mut(stat) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *c += 1 };
    }
}

/// Adds `delta` (two's complement for a decrement) to a shared counter. The result is unused,
/// so this compiles to BPF's atomic add on every BPF CPU version. (`AtomicU64` has no
/// `fetch_add` on the BPF target: it lacks compare-and-swap.)
#[inline(always)]
pub fn add(counter: *mut u64, delta: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta) };
}

#[inline(always)]
pub fn backend_stats(id: u32) -> Option<*mut BackendStats> {
    KHA_BE_STATS.get_ptr_mut(id)
}
