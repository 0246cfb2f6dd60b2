//! What the pinned maps mean, recorded with them: one `MapLayout` per map in the pinned array
//! `KHA_LAYOUT`, so a new agent can tell whether it may reuse a pinned map, must migrate it
//! (new maps beside the old, entries carried over, programs swapped) or must refuse.
//!
//! Bump a map's `version` in `LAYOUTS` whenever what its key or value bytes mean changes, even
//! if the size does not (a field reused, units changed, an index renumbered). The test
//! `layouts_are_pinned` below fixes every (version, key size, value size): a size change
//! without a bump fails it. A new value in a field that old readers tolerate (as
//! `CONN_UNSENT` or `PROBE_SUSPECT` were) is not a new version.

use crate::{
    BACKEND_ARRAY_LEN, Backend, BackendStats, CLIENTS_CAPACITY, CONNS_CAPACITY, ClientKey, ClientStats, Conn,
    ConnV1, DatapathConfig, MAP_BACKEND_HEALTH, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CLIENTS, MAP_CONFIG,
    MAP_CONNS, MAP_PROBES, MAP_SERVICES, MAP_STATS, MAX_BACKENDS, MAX_BACKENDS_PER_FRONTEND, MAX_FRONTENDS,
    PassiveHealth, ProbeKey, ProbeStatus, SERVICES_CAPACITY, STATS_LEN, ServiceKey, ServiceValue,
};

/// The layout record: index i holds the `MapLayout` of one map (`LAYOUTS[i]` when written).
pub const MAP_LAYOUT: &str = "KHA_LAYOUT";
/// Room for maps to come; unused entries are all zero.
pub const LAYOUT_SLOTS: usize = 16;
/// The version assumed for a map pinned by a kha that predates `KHA_LAYOUT`: every map had
/// the layout that became its version 1.
pub const UNRECORDED_VERSION: u32 = 1;

/// Value of `KHA_LAYOUT[i]`, written by the agent once the maps it describes are in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapLayout {
    /// The map's pin name, NUL-padded (BPF_OBJ_NAME_LEN).
    pub name: [u8; 16],
    /// `MapSpec::version` of the build that created or last migrated the map.
    pub version: u32,
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<MapLayout>() == 40);

impl MapLayout {
    pub fn name(&self) -> &str {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        core::str::from_utf8(&self.name[..end]).unwrap_or("")
    }

    pub fn new(spec: &MapSpec, max_entries: u32) -> Self {
        let mut name = [0u8; 16];
        name[..spec.name.len()].copy_from_slice(spec.name.as_bytes());
        Self {
            name,
            version: spec.version,
            map_type: spec.map_type,
            key_size: spec.key_size,
            value_size: spec.value_size,
            max_entries,
            _pad: 0,
        }
    }
}

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// Hash entries allocated on update instead of all at creation: a map costs its buckets
/// plus the entries it holds, not its capacity. For maps only the agent writes (an update
/// may then fail with ENOMEM, which the agent reports; the datapath only reads them).
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// What a migration does with a map's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carry {
    /// Rebuilt by the agent before the programs switch (the slots from its config, the
    /// datapath settings, probe statuses) or safe to lose (suspicion marks): a new map
    /// starts empty.
    Rebuilt,
    /// Rebuilt by the agent on top of the entries it finds: the backend table, whose ids the
    /// counters and the open connections' entries refer to. Copied when the new set is
    /// staged, before the agent writes into it, wherever the layout allows; else rebuilt.
    Seeded,
    /// Copied entry by entry: the open sockets kha redirected and their counts, and the
    /// counters. Losing them loses the ability to terminate or count those sockets.
    Kept,
}

/// One map as this build defines it (kha-ebpf's `maps.rs` declares the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub version: u32,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// The capacity the kernel side is compiled with; only `KHA_CONNS`'s can be changed at
    /// load time (`--max-conns`).
    pub max_entries: u32,
    /// `BPF_F_*` creation flags; kha-ebpf's `maps.rs` passes the same. Not part of the
    /// layout: a map pinned with other flags is migrated as for another capacity.
    pub map_flags: u32,
    pub carry: Carry,
}

const fn spec<K, V>(
    name: &'static str,
    version: u32,
    map_type: u32,
    max_entries: usize,
    carry: Carry,
) -> MapSpec {
    MapSpec {
        name,
        version,
        map_type,
        key_size: core::mem::size_of::<K>() as u32,
        value_size: core::mem::size_of::<V>() as u32,
        max_entries: max_entries as u32,
        map_flags: 0,
        carry,
    }
}

const fn unpreallocated(s: MapSpec) -> MapSpec {
    MapSpec { map_flags: BPF_F_NO_PREALLOC, ..s }
}

/// Every map but `KHA_LAYOUT` itself, which is written anew with every migration.
pub const LAYOUTS: [MapSpec; 9] = [
    unpreallocated(spec::<ProbeKey, ProbeStatus>(
        MAP_PROBES,
        1,
        BPF_MAP_TYPE_HASH,
        MAX_FRONTENDS * MAX_BACKENDS_PER_FRONTEND,
        Carry::Rebuilt,
    )),
    unpreallocated(spec::<ServiceKey, ServiceValue>(
        MAP_SERVICES,
        1,
        BPF_MAP_TYPE_HASH,
        SERVICES_CAPACITY,
        Carry::Rebuilt,
    )),
    unpreallocated(spec::<u32, Backend>(MAP_BACKENDS, 1, BPF_MAP_TYPE_HASH, MAX_BACKENDS, Carry::Seeded)),
    spec::<u32, DatapathConfig>(MAP_CONFIG, 1, BPF_MAP_TYPE_ARRAY, 1, Carry::Rebuilt),
    spec::<u32, u64>(MAP_STATS, 1, BPF_MAP_TYPE_PERCPU_ARRAY, STATS_LEN, Carry::Kept),
    spec::<u32, BackendStats>(MAP_BACKEND_STATS, 1, BPF_MAP_TYPE_ARRAY, BACKEND_ARRAY_LEN, Carry::Kept),
    spec::<u32, PassiveHealth>(MAP_BACKEND_HEALTH, 1, BPF_MAP_TYPE_ARRAY, BACKEND_ARRAY_LEN, Carry::Rebuilt),
    // 2: `Conn::client_cgroup_id`; version 1 entries are translated (`TRANSLATED`).
    spec::<u64, Conn>(MAP_CONNS, 2, BPF_MAP_TYPE_LRU_HASH, CONNS_CAPACITY, Carry::Kept),
    // Attribution counters: a migration restarts them (`kha top` takes a drop for a restart).
    spec::<ClientKey, ClientStats>(MAP_CLIENTS, 1, BPF_MAP_TYPE_LRU_HASH, CLIENTS_CAPACITY, Carry::Rebuilt),
];

/// Older layouts of `Carry::Kept` maps whose entries this build translates when it migrates:
/// (map, version, key size, value size). Any other version of a kept map is refused.
pub const TRANSLATED: [(&str, u32, u32, u32); 1] = [(MAP_CONNS, 1, 8, core::mem::size_of::<ConnV1>() as u32)];

/// Whether a pinned map of `version` with these key and value sizes is one `TRANSLATED` names.
pub fn translated(name: &str, version: u32, key_size: u32, value_size: u32) -> bool {
    TRANSLATED.iter().any(|t| t.0 == name && (t.1, t.2, t.3) == (version, key_size, value_size))
}

pub fn layout_spec(name: &str) -> Option<&'static MapSpec> {
    LAYOUTS.iter().find(|s| s.name == name)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::MapLayout {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, version, key size, value size). A failure here means a map's layout changed:
    /// bump its version in `LAYOUTS` (and teach the agent to translate it, if its entries
    /// are `Carry::Kept`), then update this line.
    const PINNED: [(&str, u32, u32, u32); 9] = [
        ("KHA_PROBES", 1, 36, 128),
        ("KHA_SVC", 1, 20, 16),
        ("KHA_BACKENDS", 1, 4, 20),
        ("KHA_CONFIG", 1, 4, 16),
        ("KHA_STATS_V2", 1, 4, 8),
        ("KHA_BE_STATS", 1, 4, 48),
        ("KHA_BE_HEALTH", 1, 4, 8),
        ("KHA_CONNS", 2, 8, 56),
        ("KHA_CLIENTS", 1, 32, 32),
    ];

    #[test]
    fn layouts_are_pinned() {
        let have: [(&str, u32, u32, u32); 9] = LAYOUTS.map(|s| (s.name, s.version, s.key_size, s.value_size));
        assert_eq!(have, PINNED);
    }

    #[test]
    fn every_map_has_a_layout_and_the_record_has_room() {
        for name in crate::ALL_MAPS.iter().filter(|n| **n != MAP_LAYOUT) {
            assert!(layout_spec(name).is_some(), "{name} has no entry in LAYOUTS");
        }
        assert!(LAYOUTS.len() <= LAYOUT_SLOTS);
        assert!(MAP_LAYOUT.len() <= 15);
    }

    #[test]
    fn a_record_names_its_map() {
        let l = MapLayout::new(&LAYOUTS[7], 1024);
        assert_eq!(l.name(), "KHA_CONNS");
        assert_eq!((l.version, l.max_entries, l.key_size), (2, 1024, 8));
    }

    #[test]
    fn version_1_conns_are_translated_and_nothing_else() {
        assert!(translated(MAP_CONNS, 1, 8, 44));
        assert!(!translated(MAP_CONNS, 1, 8, 56));
        assert!(!translated(MAP_CONNS, 3, 8, 44));
        assert!(!translated(MAP_STATS, 1, 4, 8));
    }
}
