//! Whether a new agent may reuse each pinned map, must migrate it, or must refuse to start:
//! the pinned map as the kernel and `KHA_LAYOUT` describe it against the map this build
//! wants (kha-common `layout`). Pure; the loader carries the plan out.

use kha_common::{Carry, MAP_BACKENDS, MAP_SERVICES, MapLayout, MapSpec, UNRECORDED_VERSION, translated};

/// A pinned map as found: its shape from the kernel, its version from `KHA_LAYOUT` (`None`
/// when no record names it: a kha from before the record pinned it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub map_flags: u32,
    pub version: Option<u32>,
}

impl Pinned {
    fn version(&self) -> u32 {
        self.version.unwrap_or(UNRECORDED_VERSION)
    }
}

/// The map this agent wants: the build's spec with the capacity asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub spec: MapSpec,
    pub max_entries: u32,
}

impl Wanted {
    pub fn layout(&self) -> MapLayout {
        MapLayout::new(&self.spec, self.max_entries)
    }
}

/// What to do with one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Not pinned: the loader creates it.
    Create,
    /// Pinned with this build's layout and capacity: the new programs use it as it is.
    Reuse,
    /// A new map beside the old one; `copy`: the entries are carried over, else it starts
    /// empty (the agent rebuilds it before the programs switch).
    Migrate { copy: bool, why: Why },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Same layout, another capacity (`--max-conns`).
    Capacity { from: u32, to: u32 },
    /// Same layout and entries, other creation flags (e.g. a map no longer preallocated).
    Flags { from: u32, to: u32 },
    /// Migrated because the other half of the backend table is (`KHA_SVC` and
    /// `KHA_BACKENDS` move together).
    Tied,
    /// Another layout version, or a shape that does not match the recorded version.
    Layout { from: u32, to: u32 },
}

/// A pinned map this build cannot take over without losing what it holds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "pinned map {map} has layout version {pinned}, this kha has version {wanted} and cannot translate its entries (the open connections kha redirected or their counts). Fix: run a kha build that knows version {pinned} until those connections are gone, or `kha detach` first (it drops their tracking: they are no longer counted or terminated by kha)"
    )]
    Version { map: &'static str, pinned: u32, wanted: u32 },
    #[error(
        "pinned map {map} claims layout version {version}, but its type/key/value sizes are {found:?} where that version has {wanted:?}: a foreign or broken build pinned it. Fix: `kha detach` first, or use another --pin-dir"
    )]
    Shape { map: &'static str, version: u32, found: (u32, u32, u32), wanted: (u32, u32, u32) },
}

/// The decision for one map.
pub fn decide(pinned: Option<&Pinned>, want: &Wanted) -> Result<Action, Refusal> {
    let Some(p) = pinned else { return Ok(Action::Create) };
    let spec = &want.spec;
    let found = (p.map_type, p.key_size, p.value_size);
    let shape = (spec.map_type, spec.key_size, spec.value_size);
    let kept = spec.carry == Carry::Kept;
    if p.version() != spec.version || found != shape {
        let why = Why::Layout { from: p.version(), to: spec.version };
        return match (kept, p.version() == spec.version) {
            // Rebuilt and seeded maps lose nothing by starting empty, whatever was pinned.
            (false, _) => Ok(Action::Migrate { copy: false, why }),
            // An older layout this build translates entry by entry.
            (true, false) if translated(spec.name, p.version(), p.key_size, p.value_size) => {
                Ok(Action::Migrate { copy: true, why })
            }
            (true, false) => {
                Err(Refusal::Version { map: spec.name, pinned: p.version(), wanted: spec.version })
            }
            (true, true) => {
                Err(Refusal::Shape { map: spec.name, version: p.version(), found, wanted: shape })
            }
        };
    }
    // Same layout: the entries can be copied as they are.
    let copy = spec.carry != Carry::Rebuilt;
    if p.max_entries != want.max_entries {
        return Ok(Action::Migrate {
            copy,
            why: Why::Capacity { from: p.max_entries, to: want.max_entries },
        });
    }
    if p.map_flags != spec.map_flags {
        return Ok(Action::Migrate { copy, why: Why::Flags { from: p.map_flags, to: spec.map_flags } });
    }
    Ok(Action::Reuse)
}

/// The decision for every map, or the first refusal.
///
/// The slots and the backends they name move together: until the swap the old programs read
/// the old pair, from it the new programs the new pair, so the agent's sync into the new set
/// cannot make either half name what the other lacks. A backend map migrated only for that
/// keeps its entries (same layout), so every backend keeps its id, which the per-backend
/// counters and the open connections' entries refer to.
pub fn plan<'a>(
    maps: impl IntoIterator<Item = (Option<&'a Pinned>, Wanted)>,
) -> Result<Vec<(Wanted, Action)>, Refusal> {
    let mut plan: Vec<(Wanted, Action)> =
        maps.into_iter().map(|(p, w)| decide(p, &w).map(|a| (w, a))).collect::<Result<_, _>>()?;
    let moves = |plan: &[(Wanted, Action)], name| {
        plan.iter().any(|(w, a)| w.spec.name == name && matches!(a, Action::Migrate { .. }))
    };
    if moves(&plan, MAP_SERVICES) || moves(&plan, MAP_BACKENDS) {
        for (w, a) in &mut plan {
            if *a == Action::Reuse && [MAP_SERVICES, MAP_BACKENDS].contains(&w.spec.name) {
                *a = Action::Migrate { copy: w.spec.carry == Carry::Seeded, why: Why::Tied };
            }
        }
    }
    Ok(plan)
}

/// Whether the plan needs new maps (and so a staging directory and a program swap).
pub fn migrates(plan: &[(Wanted, Action)]) -> bool {
    plan.iter().any(|(_, a)| matches!(a, Action::Migrate { .. }))
}

#[cfg(test)]
mod tests {
    use kha_common::{LAYOUTS, MAP_CONNS, MAP_PROBES, layout_spec};

    use super::*;

    fn want(name: &str) -> Wanted {
        let spec = *layout_spec(name).unwrap();
        Wanted { spec, max_entries: spec.max_entries }
    }

    fn pinned_as(w: &Wanted, version: Option<u32>) -> Pinned {
        Pinned {
            map_type: w.spec.map_type,
            key_size: w.spec.key_size,
            value_size: w.spec.value_size,
            max_entries: w.max_entries,
            map_flags: w.spec.map_flags,
            version,
        }
    }

    #[test]
    fn absent_maps_are_created_and_identical_ones_reused() {
        for spec in LAYOUTS {
            let w = want(spec.name);
            assert_eq!(decide(None, &w), Ok(Action::Create));
            assert_eq!(decide(Some(&pinned_as(&w, Some(spec.version))), &w), Ok(Action::Reuse));
        }
    }

    #[test]
    fn maps_from_before_the_record_count_as_version_1() {
        let w = want(MAP_PROBES);
        assert_eq!(decide(Some(&pinned_as(&w, None)), &w), Ok(Action::Reuse));
        let w = want(MAP_CONNS);
        let newer = Wanted { spec: MapSpec { version: 3, ..w.spec }, ..w };
        assert_eq!(
            decide(Some(&pinned_as(&w, None)), &newer),
            Err(Refusal::Version { map: MAP_CONNS, pinned: 1, wanted: 3 })
        );
    }

    /// `KHA_CONNS` of version 1 (no client cgroup) is translated, with or without a record.
    #[test]
    fn version_1_conns_are_carried_into_version_2() {
        let w = want(MAP_CONNS);
        assert_eq!(w.spec.version, 2);
        let v1 = Pinned { value_size: 44, ..pinned_as(&w, None) };
        let why = Why::Layout { from: 1, to: 2 };
        assert_eq!(decide(Some(&v1), &w), Ok(Action::Migrate { copy: true, why }));
        let recorded = Pinned { version: Some(1), ..v1 };
        assert_eq!(decide(Some(&recorded), &w), Ok(Action::Migrate { copy: true, why }));
        // Version 1 claimed, but not its shape: refused as any unknown version.
        let odd = Pinned { value_size: 48, ..v1 };
        assert!(matches!(decide(Some(&odd), &w), Err(Refusal::Version { pinned: 1, .. })));
    }

    #[test]
    fn a_capacity_change_copies_kept_maps_and_rebuilds_the_rest() {
        let w = want(MAP_CONNS);
        let bigger = Wanted { max_entries: w.max_entries * 2, ..w };
        assert_eq!(
            decide(Some(&pinned_as(&w, Some(2))), &bigger),
            Ok(Action::Migrate {
                copy: true,
                why: Why::Capacity { from: w.max_entries, to: 2 * w.max_entries }
            })
        );
        let w = want(MAP_SERVICES);
        let bigger = Wanted { max_entries: w.max_entries + 1, ..w };
        assert!(matches!(
            decide(Some(&pinned_as(&w, Some(1))), &bigger),
            Ok(Action::Migrate { copy: false, .. })
        ));
    }

    /// KHA_SVC and KHA_BACKENDS as a kha before `BPF_F_NO_PREALLOC` pinned them.
    #[test]
    fn other_flags_migrate_and_the_backends_keep_their_ids() {
        let preallocated = |name| {
            let w = want(name);
            assert_eq!(w.spec.map_flags, kha_common::BPF_F_NO_PREALLOC, "{name}");
            (Pinned { map_flags: 0, ..pinned_as(&w, Some(1)) }, w)
        };
        let (svc, backends) = (preallocated(MAP_SERVICES), preallocated(MAP_BACKENDS));
        let flags = Why::Flags { from: 0, to: kha_common::BPF_F_NO_PREALLOC };
        assert_eq!(decide(Some(&svc.0), &svc.1), Ok(Action::Migrate { copy: false, why: flags }));
        assert_eq!(decide(Some(&backends.0), &backends.1), Ok(Action::Migrate { copy: true, why: flags }));
        let conns = want(MAP_CONNS);
        let plan = plan([(Some(&svc.0), svc.1), (Some(&backends.0), backends.1), (None, conns)]).unwrap();
        assert_eq!(
            plan.iter().map(|(w, a)| (w.spec.name, *a)).collect::<Vec<_>>(),
            [
                (MAP_SERVICES, Action::Migrate { copy: false, why: flags }),
                (MAP_BACKENDS, Action::Migrate { copy: true, why: flags }),
                (MAP_CONNS, Action::Create),
            ]
        );
    }

    #[test]
    fn another_version_rebuilds_a_rebuilt_map_and_refuses_a_kept_one() {
        for spec in LAYOUTS {
            let w = want(spec.name);
            let old = pinned_as(&w, Some(spec.version + 1));
            let got = decide(Some(&old), &w);
            match spec.carry {
                Carry::Rebuilt | Carry::Seeded => assert_eq!(
                    got,
                    Ok(Action::Migrate {
                        copy: false,
                        why: Why::Layout { from: spec.version + 1, to: spec.version }
                    })
                ),
                Carry::Kept => assert!(matches!(got, Err(Refusal::Version { .. })), "{got:?}"),
            }
        }
    }

    #[test]
    fn a_shape_that_contradicts_its_version_is_refused_for_kept_maps() {
        let w = want(MAP_CONNS);
        let odd = Pinned { value_size: 40, ..pinned_as(&w, Some(2)) };
        let err = decide(Some(&odd), &w).unwrap_err();
        assert!(matches!(err, Refusal::Shape { found: (9, 8, 40), wanted: (9, 8, 56), .. }), "{err:?}");
        assert!(err.to_string().contains("kha detach"), "{err}");
        let w = want(MAP_SERVICES);
        let odd = Pinned { key_size: 16, ..pinned_as(&w, Some(1)) };
        assert!(matches!(decide(Some(&odd), &w), Ok(Action::Migrate { copy: false, .. })));
    }

    #[test]
    fn the_slots_and_the_backends_move_together() {
        let pinned: Vec<_> = LAYOUTS
            .iter()
            .map(|s| {
                let w = want(s.name);
                let version = if s.name == MAP_SERVICES { 0 } else { s.version };
                (Some(pinned_as(&w, Some(version))), w)
            })
            .collect();
        let p = plan(pinned.iter().map(|(p, w)| (p.as_ref(), *w))).unwrap();
        let action = |name: &str| p.iter().find(|(w, _)| w.spec.name == name).unwrap().1;
        assert!(matches!(action(MAP_SERVICES), Action::Migrate { copy: false, why: Why::Layout { .. } }));
        assert_eq!(action(MAP_BACKENDS), Action::Migrate { copy: true, why: Why::Tied });
        assert_eq!(action(MAP_CONNS), Action::Reuse);
        // A capacity change elsewhere leaves them alone.
        let mut grown = pinned.clone();
        for (p, w) in &mut grown {
            p.as_mut().unwrap().version = Some(w.spec.version);
            if w.spec.name == MAP_CONNS {
                w.max_entries = 1 << 20;
            }
        }
        let p = plan(grown.iter().map(|(p, w)| (p.as_ref(), *w))).unwrap();
        assert!(p.iter().all(|(w, a)| *a == Action::Reuse || w.spec.name == MAP_CONNS), "{p:?}");
    }

    #[test]
    fn a_plan_migrates_if_any_map_does() {
        let reuse: Vec<_> = LAYOUTS
            .iter()
            .map(|s| {
                let w = want(s.name);
                (Some(pinned_as(&w, Some(s.version))), w)
            })
            .collect();
        let p = plan(reuse.iter().map(|(p, w)| (p.as_ref(), *w))).unwrap();
        assert!(!migrates(&p));
        let mut grown = reuse.clone();
        grown.last_mut().unwrap().1.max_entries = 1 << 20;
        let p = plan(grown.iter().map(|(p, w)| (p.as_ref(), *w))).unwrap();
        assert!(migrates(&p));
        let mut broken = reuse;
        let conns = broken.iter_mut().find(|(_, w)| w.spec.name == MAP_CONNS).unwrap();
        conns.0.as_mut().unwrap().version = Some(7);
        assert!(plan(broken.iter().map(|(p, w)| (p.as_ref(), *w))).is_err());
    }
}
