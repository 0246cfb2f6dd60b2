//! Carrying the pinned maps over to a build that wants another layout or capacity, with no
//! connect failing on the way (the plan comes from `crate::layout`).
//!
//! A migration builds the new map set beside the live one, in `<pin dir>/maps-next/`:
//! maps the plan reuses are hard links to the live ones (bpffs supports link(2)), the others
//! are created by the loader and filled (open connections and counters copied, the backend
//! table written by the agent's sync) before any program uses them. The new programs are then
//! swapped in under the pinned links (`BPF_LINK_UPDATE`), and `maps/` and `maps-next/` are
//! exchanged in one `renameat2(RENAME_EXCHANGE)`. What the old programs wrote between the copy
//! and the swap is carried over afterwards: connections missing from the new map, and the
//! counters' growth since the copy. Then the old set's pins go.
//!
//! A crash at any point leaves the links running one complete set, and `recover` finishes or
//! drops the job on the next start (see there).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::{Array, Map, MapData, MapError};
use kha_common::{Carry, LAYOUT_SLOTS, LAYOUTS, MAP_CONNS, MAP_LAYOUT, MapLayout};

mod carry;

use carry::copy_conns;
pub(super) use carry::{Carried, Counts, Served, carry, fill};

use super::{HOOKS, LoaderError, PinDir, setup_err, sys};
use crate::layout::{Action, Pinned, Wanted};

/// `BPF_NOEXIST`: never overwrite what the new programs already wrote.
const NOEXIST: u64 = 1;
/// `BPF_F_RDONLY`, `BPF_F_WRONLY`.
const BPF_F_RDONLY: u32 = 1 << 3;
const BPF_F_WRONLY: u32 = 1 << 4;

/// A map-level failure during a migration.
fn map_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(MapError) -> LoaderError + 'a {
    move |source| LoaderError::Migrate { path: path.to_owned(), what, source: Box::new(source) }
}

fn open(path: &Path) -> Result<Map, LoaderError> {
    let data = MapData::from_pin(path).map_err(map_err(path, "cannot open pinned map"))?;
    Map::from_map_data(data).map_err(map_err(path, "cannot open pinned map"))
}

fn info(path: &Path) -> Result<aya::maps::MapInfo, LoaderError> {
    aya::maps::MapInfo::from_pin(path)
        .map_err(|e| LoaderError::MapInfo { path: path.to_owned(), source: Box::new(e) })
}

/// The `KHA_LAYOUT` entries under `dir`, if the record is there in the layout this build
/// reads (a future record layout counts as no record).
fn read_record(dir: &Path) -> Result<Vec<MapLayout>, LoaderError> {
    let path = dir.join(MAP_LAYOUT);
    if !path.exists() {
        return Ok(vec![]);
    }
    let i = info(&path)?;
    if (i.key_size(), i.value_size()) != (4, size_of::<MapLayout>() as u32) {
        log::warn!("{}: a layout record this kha cannot read; the maps count as unrecorded", path.display());
        return Ok(vec![]);
    }
    let record: Array<_, MapLayout> =
        Array::try_from(open(&path)?).map_err(map_err(&path, "not an array"))?;
    let entries: Result<Vec<_>, _> = record.iter().collect();
    Ok(entries.map_err(map_err(&path, "cannot read"))?.into_iter().filter(|l| !l.name().is_empty()).collect())
}

/// Each map this build wants, with what is pinned under its name in `dir`.
pub(super) fn pinned_state(
    dir: &Path,
    wanted: &[Wanted],
) -> Result<Vec<(Option<Pinned>, Wanted)>, LoaderError> {
    let record = read_record(dir)?;
    wanted
        .iter()
        .map(|w| {
            let path = dir.join(w.spec.name);
            if !path.exists() {
                return Ok((None, *w));
            }
            let i = info(&path)?;
            let version = record.iter().find(|l| l.name() == w.spec.name).map(|l| l.version);
            let p = Pinned {
                // A type this aya does not know matches no layout.
                map_type: i.map_type().map_or(u32::MAX, |t| t as u32),
                key_size: i.key_size(),
                value_size: i.value_size(),
                max_entries: i.max_entries(),
                // As aya compares them: the access modes describe the descriptor, not the map.
                map_flags: i.map_flags() & !(BPF_F_RDONLY | BPF_F_WRONLY),
                version,
            };
            Ok((Some(p), *w))
        })
        .collect()
}

/// Writes the record of the maps under `dir` (whose `KHA_LAYOUT` the loader just created or
/// reused).
pub(super) fn write_record(dir: &Path, plan: &[(Wanted, Action)]) -> Result<(), LoaderError> {
    let path = dir.join(MAP_LAYOUT);
    let mut record: Array<_, MapLayout> =
        Array::try_from(open(&path)?).map_err(map_err(&path, "not an array"))?;
    for i in 0..LAYOUT_SLOTS {
        let entry = plan.get(i).map(|(w, _)| w.layout()).unwrap_or_default();
        record.set(i as u32, &entry, 0).map_err(map_err(&path, "cannot write"))?;
    }
    Ok(())
}

/// Removes a layout record in a layout this build cannot reuse, so the loader makes a new
/// one (only the agent reads it).
pub(super) fn drop_foreign_record(dir: &Path) -> Result<(), LoaderError> {
    let path = dir.join(MAP_LAYOUT);
    let readable =
        |i: aya::maps::MapInfo| (i.key_size(), i.value_size()) == (4, size_of::<MapLayout>() as u32);
    if path.exists() && !readable(info(&path)?) {
        fs::remove_file(&path).map_err(setup_err(&path, "cannot remove pin"))?;
    }
    Ok(())
}

/// An empty staging directory holding hard links to the maps the plan reuses.
pub(super) fn stage(pins: &PinDir, plan: &[(Wanted, Action)]) -> Result<(), LoaderError> {
    let staging = pins.staging();
    remove_set(&staging)?;
    fs::create_dir(&staging).map_err(setup_err(&staging, "cannot create staging directory"))?;
    for (w, _) in plan.iter().filter(|(_, a)| *a == Action::Reuse) {
        let (from, to) = (pins.maps().join(w.spec.name), staging.join(w.spec.name));
        fs::hard_link(&from, &to).map_err(setup_err(&to, "cannot link the reused map into staging"))?;
    }
    Ok(())
}

/// Copies the `Carry::Seeded` maps the plan copies into the staged set, right after the
/// loader created it and before the agent writes into it; returns the entries copied, per map.
pub(super) fn prefill(pins: &PinDir, plan: &[(Wanted, Action)]) -> Result<Counts, LoaderError> {
    plan.iter()
        .filter(|(w, a)| w.spec.carry == Carry::Seeded && matches!(a, Action::Migrate { copy: true, .. }))
        .map(|(w, _)| Ok((w.spec.name, carry::seed(&pins.maps(), &pins.staging(), w.spec.name)?)))
        .collect()
}

/// Removes every pin in a map set's directory, then the directory.
pub(super) fn remove_set(dir: &Path) -> Result<usize, LoaderError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(LoaderError::Setup { path: dir.to_owned(), what: "cannot read", source }),
    };
    let mut n = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        fs::remove_file(&path).map_err(setup_err(&path, "cannot remove pin"))?;
        n += 1;
    }
    fs::remove_dir(dir).map_err(setup_err(dir, "cannot remove staging directory"))?;
    Ok(n)
}

/// After the swap: the new set becomes `maps/`, the old one's late writes are carried over,
/// its pins go. Returns the entries carried in this pass, per map.
pub(super) fn commit(
    pins: &PinDir,
    carried: &mut [Carried],
    served: Served<'_>,
) -> Result<Counts, LoaderError> {
    let (maps, staging) = (pins.maps(), pins.staging());
    sys::rename_exchange(&maps, &staging).map_err(setup_err(&maps, "cannot exchange the map sets"))?;
    let late = carried
        .iter_mut()
        .map(|c| Ok((c.map, carry(&staging, &maps, c, Some(served))?)))
        .collect::<Result<Vec<_>, LoaderError>>()?;
    remove_set(&staging)?;
    Ok(late)
}

fn map_ids(dir: &Path) -> BTreeSet<u32> {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| aya::maps::MapInfo::from_pin(e.path()).ok())
        .map(|i| i.id())
        .collect()
}

/// The maps the programs under the pinned links use.
fn linked_map_ids(pins: &PinDir) -> BTreeSet<u32> {
    HOOKS
        .iter()
        .filter_map(|hook| sys::obj_get(&pins.link(hook)).ok())
        .filter_map(|fd| sys::link_info(fd.as_fd()).ok())
        .filter_map(|info| sys::prog_fd_by_id(info.prog_id).ok())
        .filter_map(|prog| sys::prog_map_ids(prog.as_fd()).ok())
        .flatten()
        .collect()
}

fn only(a: &BTreeSet<u32>, b: &BTreeSet<u32>) -> BTreeSet<u32> {
    a.difference(b).copied().collect()
}

/// Whether the links run programs that use a map only the staging set holds (the reused maps
/// are in both).
fn links_run_staged(live: &BTreeSet<u32>, staged: &BTreeSet<u32>, linked: &BTreeSet<u32>) -> bool {
    !only(staged, live).is_disjoint(linked)
}

/// Whether set `a` was created before set `b`: the kernel hands out map ids in increasing
/// order, so the maps only `a` holds have lower ids than those only `b` holds. (Ids wrap after
/// 2^31 maps; a wrong answer then drops a set that could have been carried, or carries
/// connections of a set that never ran, which the sock_diag check filters.)
fn is_older(a: &BTreeSet<u32>, b: &BTreeSet<u32>) -> bool {
    match (only(a, b).last(), only(b, a).last()) {
        (Some(x), Some(y)) => x < y,
        _ => false,
    }
}

/// What a start found of an earlier migration's staging directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovered {
    /// The links already ran the new set: it was made `maps/`, the old set's open
    /// connections were carried into it, the old set removed.
    Finished { conns: usize },
    /// The old set was still live: the unfinished new set was removed (this start plans
    /// afresh).
    Dropped,
}

/// Finishes or drops a migration an earlier agent did not complete (it crashed, or attach
/// failed). Run under the pin lock before the pinned state is read:
/// - the links run programs that use a map only `maps-next/` holds: the swap happened (all of
///   it or, after a crash in `attach`, part): exchange, so `maps/` is what runs;
/// - then `maps-next/` holds the other set. If it is the older one (map ids only grow: its own
///   maps have the lower ids), its programs ran until the swap: carry its open connections
///   over (counters written in that window are not), then remove it. If it is the newer,
///   never-live one, remove it.
pub(super) fn recover(pins: &PinDir, served: Served<'_>) -> Result<Option<Recovered>, LoaderError> {
    let (maps, staging) = (pins.maps(), pins.staging());
    if !staging.exists() {
        return Ok(None);
    }
    let linked = linked_map_ids(pins);
    if links_run_staged(&map_ids(&maps), &map_ids(&staging), &linked) {
        sys::rename_exchange(&maps, &staging).map_err(setup_err(&maps, "cannot exchange the map sets"))?;
    }
    let staged_is_older = is_older(&map_ids(&staging), &map_ids(&maps));
    let outcome = if staged_is_older {
        let (old, new) = (staging.join(MAP_CONNS), maps.join(MAP_CONNS));
        // `copy_conns` reads this build's layout of the old map and those it translates.
        let both = old.exists() && new.exists() && carry::conns_readable(&old)?;
        let mut none = BTreeMap::new();
        let served = Served { mend_counts: false, ..served };
        Recovered::Finished { conns: if both { copy_conns(&old, &new, &mut none, Some(served))? } else { 0 } }
    } else {
        Recovered::Dropped
    };
    remove_set(&staging)?;
    Ok(Some(outcome))
}

/// The spec of every map with the capacity asked for.
pub fn wanted(conns_capacity: u32) -> Vec<Wanted> {
    LAYOUTS
        .iter()
        .map(|spec| Wanted {
            spec: *spec,
            max_entries: if spec.name == MAP_CONNS { conns_capacity } else { spec.max_entries },
        })
        .collect()
}

pub(super) fn staging_dir(root: &Path) -> PathBuf {
    root.join("maps-next")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[u32]) -> BTreeSet<u32> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_staging_set_the_links_run_is_made_live_and_the_old_one_carried() {
        // Reused maps 1, 2 in both; the old set's own 3, the new set's own 10, 11.
        let (live, staged) = (set(&[1, 2, 3]), set(&[1, 2, 10, 11]));
        // Crash after the swap, before the exchange: links use 10.
        assert!(links_run_staged(&live, &staged, &set(&[1, 2, 10])));
        // After the exchange the staging dir holds the old set, which is older: carry it.
        assert!(is_older(&live, &staged));
    }

    #[test]
    fn a_staging_set_that_never_ran_is_dropped() {
        let (live, staged) = (set(&[1, 2, 3]), set(&[1, 2, 10, 11]));
        // Crash before the swap (or a failed attach): links use the live set only.
        assert!(!links_run_staged(&live, &staged, &set(&[1, 2, 3])));
        assert!(!is_older(&staged, &live), "the never-live set must not be carried");
    }

    #[test]
    fn a_crash_after_the_exchange_leaves_the_old_set_in_staging_to_carry() {
        // maps/ is the new set now (links run it), staging the old one.
        let (live, staged) = (set(&[1, 2, 10, 11]), set(&[1, 2, 3]));
        assert!(!links_run_staged(&live, &staged, &set(&[1, 2, 10])));
        assert!(is_older(&staged, &live));
    }

    #[test]
    fn hard_links_only_are_neither_live_nor_older() {
        let both = set(&[1, 2, 3]);
        assert!(!links_run_staged(&both, &both, &both));
        assert!(!is_older(&both, &both));
    }
}
