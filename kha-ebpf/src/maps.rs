//! The maps, BTF-defined so `bpftool map dump` prints field names, pinned by name so they
//! outlive the agent.

use aya_ebpf::{
    btf_maps::{Array, HashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use kha_common::{
    Backend, DatapathConfig, MAX_BACKENDS, SERVICES_CAPACITY, STATS_LEN, ServiceKey, ServiceValue, SockState,
};

#[btf_map(pin_by_name)]
pub static KHA_SVC: HashMap<ServiceKey, ServiceValue, SERVICES_CAPACITY> = HashMap::new();

#[btf_map(pin_by_name)]
pub static KHA_BACKENDS: HashMap<u32, Backend, MAX_BACKENDS> = HashMap::new();

#[btf_map(pin_by_name)]
pub static KHA_CONFIG: Array<DatapathConfig, 1> = Array::new();

#[btf_map(pin_by_name)]
pub static KHA_SOCKS: SkStorage<SockState> = SkStorage::new();

#[btf_map(pin_by_name)]
pub static KHA_STATS: PerCpuArray<u64, STATS_LEN> = PerCpuArray::new();

#[inline(always)]
pub fn count(stat: u32) {
    if let Some(c) = KHA_STATS.get_ptr_mut(stat) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *c += 1 };
    }
}
