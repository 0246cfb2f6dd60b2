//! The ordered map writes between two tables (see the module above for why the order is safe).

use std::collections::{BTreeMap, BTreeSet};

use kha_common::{Backend, MAX_BACKENDS, MAX_BACKENDS_PER_FRONTEND, SLOT_BASES, ServiceKey, ServiceValue};

use super::{Desired, Op, PlanError, Snapshot};

/// The writes that take `current` to `desired`, in an order that is safe at every step.
/// Writes that would not change a value are left out, so a plan for an up-to-date table is
/// empty (after the one that follows a removed frontend, see below).
///
/// What a plan never removes: the slots a connect may be reading while the plan runs. A connect
/// reads slot 0 and then, a moment later, the slots and backends it names; if the agent flips
/// slot 0 and deletes the old region in between, that connect misses its slot and fails with
/// EHOSTUNREACH. So the region every current slot 0 names, and the backends its slots name,
/// stay through the whole plan: a flipped frontend keeps its previous region until its next
/// flip, which writes over it (deleting only what lies beyond the new count); a removed
/// frontend keeps its last region until the next plan, which deletes it as an orphan.
pub fn plan(current: &Snapshot, desired: &Desired) -> Result<Vec<Op>, PlanError> {
    let mut ops = Vec::new();

    // Backends are shared by frontends and keep their ids, so unchanged slots stay unchanged.
    let mut id_of: BTreeMap<Backend, u32> = BTreeMap::new();
    for (id, b) in current.backends.iter().rev() {
        id_of.insert(*b, *id); // lowest id wins if a backend appears twice
    }
    // An id some slot still names is never given to another backend, even if its backend entry
    // is missing: a late reader of that slot must not land on a stranger.
    let mut used: BTreeSet<u32> = current.backends.keys().copied().collect();
    used.extend(current.services.iter().filter(|(k, _)| k.slot != 0).map(|(_, v)| v.backend_id));
    let mut next_free = 1u32;
    for b in desired.frontends.values().flat_map(|f| &f.backends).chain(&desired.keep) {
        if id_of.contains_key(b) {
            continue;
        }
        while used.contains(&next_free) {
            next_free += 1;
        }
        if next_free as usize > MAX_BACKENDS {
            return Err(PlanError::BackendIdsExhausted { max: MAX_BACKENDS });
        }
        used.insert(next_free);
        id_of.insert(*b, next_free);
        ops.push(Op::PutBackend(next_free, *b));
    }

    for (fkey, f) in &desired.frontends {
        let live = current.services.get(fkey).copied();
        let unchanged =
            live.is_some_and(|v| v.policy == f.policy) && current.resolve(fkey).as_ref() == Some(&f.backends);
        let base = match live {
            Some(v) if unchanged => v.base,
            // Write the region the kernel is not reading, then flip slot 0 to it.
            Some(v) if v.base == SLOT_BASES[0] => SLOT_BASES[1],
            _ => SLOT_BASES[0],
        };
        let slot0 = ServiceValue::frontend(f.backends.len() as u16, base, f.policy).with_flags(f.flags);
        if !unchanged {
            for (i, b) in f.backends.iter().enumerate() {
                let (k, v) = (fkey.with_slot(base + i as u16 + 1), ServiceValue::slot(id_of[b]));
                // The region may still hold this very slot from the generation before last.
                if current.services.get(&k) != Some(&v) {
                    ops.push(Op::PutSlot(k, v));
                }
            }
            ops.push(Op::PutSlot(*fkey, slot0));
        } else if live.is_some_and(|v| v.flags != f.flags) {
            // Same set, only what status shows changed: rewriting slot 0 in place is atomic.
            ops.push(Op::PutSlot(*fkey, slot0));
        }
        let new_region = base + 1..=base + f.backends.len() as u16;
        let kept = |slot: u16| {
            new_region.contains(&slot)
                || live.is_some_and(|v| read_by(&v, slot))
                // Not flipped: the other region is the previous generation, kept until the next flip.
                || (unchanged && region_of(slot).is_some_and(|r| r != base))
        };
        let stale =
            current.services.keys().filter(|k| same_frontend(k, fkey) && k.slot != 0 && !kept(k.slot));
        ops.extend(stale.map(|k| Op::DeleteSlot(*k)));
    }

    // Frontends no longer wanted: slot 0 first, so the kernel stops matching; the region it
    // named stays for connects that read it just before (the next plan deletes it). Slots
    // without a slot 0 (left by the previous plan or an interrupted run) go now.
    let gone = |k: &ServiceKey| !desired.frontends.contains_key(&k.with_slot(0));
    ops.extend(current.services.keys().filter(|k| k.slot == 0 && gone(k)).map(|k| Op::DeleteSlot(*k)));
    let read_now = |k: &ServiceKey| current.services.get(&k.with_slot(0)).is_some_and(|v| read_by(v, k.slot));
    ops.extend(
        current
            .services
            .keys()
            .filter(|k| k.slot != 0 && gone(k) && !read_now(k))
            .map(|k| Op::DeleteSlot(*k)),
    );

    // Backends go last, and only once neither the desired state nor any slot left in the table
    // names them.
    let mut wanted: BTreeSet<u32> =
        desired.frontends.values().flat_map(|f| &f.backends).chain(&desired.keep).map(|b| id_of[b]).collect();
    let mut end = current.clone();
    ops.iter().for_each(|op| end.apply(op));
    wanted.extend(end.services.iter().filter(|(k, _)| k.slot != 0).map(|(_, v)| v.backend_id));
    ops.extend(current.backends.keys().filter(|id| !wanted.contains(id)).map(|id| Op::DeleteBackend(*id)));
    Ok(ops)
}

/// Whether a connect that read slot 0 value `v` may read `slot`.
pub(super) fn read_by(v: &ServiceValue, slot: u16) -> bool {
    slot > v.base && slot - v.base <= v.count
}

/// The region (its base) `slot` lies in, if any.
pub(super) fn region_of(slot: u16) -> Option<u16> {
    SLOT_BASES.into_iter().find(|b| slot > *b && slot - b <= MAX_BACKENDS_PER_FRONTEND as u16)
}

fn same_frontend(a: &ServiceKey, b: &ServiceKey) -> bool {
    a.addr_be == b.addr_be && a.port_be == b.port_be
}
