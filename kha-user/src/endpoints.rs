//! The backend table as data: what the kernel should hold (`Desired`), what it holds
//! (`Snapshot`), and the ordered writes that turn one into the other (`plan`).
//!
//! The order: new backends first, then the frontend's unused slot region, then its slot 0
//! (count and region base, one atomic map write), then slots no connect can read any more, and
//! backends nobody references last. The kernel reads slot 0 and then only the region it names,
//! so after *every prefix* of a plan each frontend resolves to exactly its old set or exactly
//! its new one; and the region the old slot 0 named stays until the frontend's next flip, so a
//! connect that read slot 0 just before the flip still finds every slot and backend it reads.
//! `every_prefix_resolves_to_old_or_new` checks both.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use kha_common::{
    Backend, MAX_BACKENDS, MAX_BACKENDS_PER_FRONTEND, SLOT_BASES, ServiceKey, ServiceValue, is_v4_mapped,
    v4_of_mapped,
};

use crate::config::Config;

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

pub fn key_of(addr: SocketAddr, slot: u16) -> ServiceKey {
    ServiceKey::new(addr_bytes(addr.ip()), addr.port().to_be(), slot)
}

pub fn backend_of(addr: SocketAddr) -> Backend {
    Backend::new(addr_bytes(addr.ip()), addr.port().to_be())
}

fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The socket address a map entry stands for; v4-mapped entries read back as IPv4.
pub fn socket_addr(addr_be: &[u8; 16], port_be: u16) -> SocketAddr {
    let ip = if is_v4_mapped(addr_be) {
        IpAddr::V4(u32::from_be(v4_of_mapped(addr_be)).into())
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr_be))
    };
    SocketAddr::new(ip, u16::from_be(port_be))
}

impl Desired {
    pub fn from_config(config: &Config) -> Self {
        let frontends = config
            .frontends
            .iter()
            .map(|f| {
                let backends = f.backends.iter().map(|b| backend_of(*b)).collect();
                (key_of(f.address, 0), DesiredFrontend { policy: f.policy, flags: 0, backends })
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
fn read_by(v: &ServiceValue, slot: u16) -> bool {
    slot > v.base && slot - v.base <= v.count
}

/// The region (its base) `slot` lies in, if any.
fn region_of(slot: u16) -> Option<u16> {
    SLOT_BASES.into_iter().find(|b| slot > *b && slot - b <= MAX_BACKENDS_PER_FRONTEND as u16)
}

fn same_frontend(a: &ServiceKey, b: &ServiceKey) -> bool {
    a.addr_be == b.addr_be && a.port_be == b.port_be
}

#[cfg(test)]
mod tests {
    use super::*;
    use kha_common::POLICY_RANDOM;
    use proptest::{collection::vec, prelude::*};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn desired(frontends: &[(&str, &[&str])]) -> Desired {
        Desired {
            frontends: frontends
                .iter()
                .map(|(f, bs)| {
                    let backends = bs.iter().map(|b| backend_of(addr(b))).collect();
                    (key_of(addr(f), 0), DesiredFrontend { policy: POLICY_RANDOM, flags: 0, backends })
                })
                .collect(),
            keep: BTreeSet::new(),
        }
    }

    fn applied(current: &Snapshot, ops: &[Op]) -> Snapshot {
        let mut s = current.clone();
        ops.iter().for_each(|op| s.apply(op));
        s
    }

    /// Every frontend of `s` resolves to exactly its set in `old` or exactly its set in `new`.
    fn assert_old_or_new(s: &Snapshot, old: &Snapshot, new: &Desired, step: usize) {
        for (k, _) in s.frontends() {
            let now = s.resolve(k).unwrap_or_else(|| panic!("step {step}: {k:?} dangles in {s:?}"));
            let before = old.resolve(k);
            let after = new.frontends.get(k).map(|f| f.backends.clone());
            assert!(
                before.as_ref() == Some(&now) || after.as_ref() == Some(&now),
                "step {step}: {k:?} resolves to {now:?}, neither {before:?} nor {after:?}"
            );
        }
    }

    /// A connect that read a frontend's slot 0 in `old` and is still choosing among the slots
    /// that slot 0 names still finds every one of them, and the backends they name, in `s`.
    fn assert_old_readers_resolve(s: &Snapshot, old: &Snapshot, step: usize) {
        for (k, v) in old.frontends() {
            let Some(before) = old.resolve(k) else { continue }; // dangled already
            let now = s.resolve_as(k, v);
            assert_eq!(
                now.as_ref(),
                Some(&before),
                "step {step}: a reader of the old slot 0 of {k:?} ({v:?}) cannot resolve its slots in {s:?}"
            );
        }
    }

    fn check_all_prefixes(current: &Snapshot, want: &Desired) -> Snapshot {
        let ops = plan(current, want).unwrap();
        for n in 0..=ops.len() {
            let s = applied(current, &ops[..n]);
            assert_old_or_new(&s, current, want, n);
            assert_old_readers_resolve(&s, current, n);
        }
        let end = applied(current, &ops);
        for (k, f) in &want.frontends {
            assert_eq!(end.resolve(k).as_ref(), Some(&f.backends));
        }
        assert_eq!(end.frontends().count(), want.frontends.len());
        // Besides the live regions, only what a reader of an old slot 0 may read, or the
        // previous generation of a frontend that did not flip, is left.
        for (k, v) in end.services.iter().filter(|(k, _)| k.slot != 0) {
            assert!(end.backends.contains_key(&v.backend_id), "{k:?} names a missing backend");
            let f = k.with_slot(0);
            let live = end.services.get(&f).is_some_and(|v0| read_by(v0, k.slot));
            let read_before = current.services.get(&f).is_some_and(|v0| read_by(v0, k.slot));
            let base = |snap: &Snapshot| snap.services.get(&f).map(|v0| v0.base);
            let previous_generation = base(current) == base(&end)
                && current.services.get(k) == Some(v)
                && region_of(k.slot) != base(&end);
            assert!(live || read_before || previous_generation, "{k:?} is left over in {end:?}");
        }
        let named: BTreeSet<u32> =
            end.services.iter().filter(|(k, _)| k.slot != 0).map(|(_, v)| v.backend_id).collect();
        let wanted: BTreeSet<&Backend> =
            want.frontends.values().flat_map(|f| &f.backends).chain(&want.keep).collect();
        for (id, b) in &end.backends {
            assert!(named.contains(id) || wanted.contains(b), "backend {id} ({b:?}) is left over");
        }
        // The next plan only deletes what a removed frontend left for late readers; the one
        // after it is empty.
        let next = plan(&end, want).unwrap();
        for op in &next {
            let orphan = matches!(op, Op::DeleteSlot(k) if !want.frontends.contains_key(&k.with_slot(0)));
            assert!(orphan || matches!(op, Op::DeleteBackend(_)), "a second plan wrote {op:?}");
        }
        assert!(plan(&applied(&end, &next), want).unwrap().is_empty(), "a third plan must be empty");
        end
    }

    #[test]
    fn first_sync_writes_backends_then_slots_then_slot_zero() {
        let want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.12:6443"])]);
        let ops = plan(&Snapshot::default(), &want).unwrap();
        let f = key_of(addr("127.0.0.1:6443"), 0);
        assert_eq!(
            ops,
            vec![
                Op::PutBackend(1, backend_of(addr("192.0.2.11:6443"))),
                Op::PutBackend(2, backend_of(addr("192.0.2.12:6443"))),
                Op::PutSlot(f.with_slot(1), ServiceValue::slot(1)),
                Op::PutSlot(f.with_slot(2), ServiceValue::slot(2)),
                Op::PutSlot(f, ServiceValue::frontend(2, 0, POLICY_RANDOM)),
            ]
        );
    }

    #[test]
    fn change_fills_the_other_region_flips_and_keeps_the_old_until_the_next_flip() {
        let start = check_all_prefixes(
            &Snapshot::default(),
            &desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443"])]),
        );
        let want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.13:6443"])]);
        let ops = plan(&start, &want).unwrap();
        let f = key_of(addr("127.0.0.1:6443"), 0);
        let b = SLOT_BASES[1];
        // Slots 1..=3 and backend 2 stay: a connect that read the old slot 0 still reads them.
        assert_eq!(
            ops,
            vec![
                Op::PutSlot(f.with_slot(b + 1), ServiceValue::slot(1)),
                Op::PutSlot(f.with_slot(b + 2), ServiceValue::slot(3)),
                Op::PutSlot(f, ServiceValue::frontend(2, b, POLICY_RANDOM)),
            ]
        );
        let end = check_all_prefixes(&start, &want);
        assert_eq!(end.resolve_as(&f, &start.services[&f]), start.resolve(&f), "the old set still resolves");
        // The next change writes over the first region, deleting what lies beyond its new count,
        // and keeps the second, which the kernel read until this flip.
        let want = desired(&[("127.0.0.1:6443", &["192.0.2.12:6443"])]);
        assert_eq!(
            plan(&end, &want).unwrap(),
            vec![
                Op::PutSlot(f.with_slot(1), ServiceValue::slot(2)),
                Op::PutSlot(f, ServiceValue::frontend(1, 0, POLICY_RANDOM)),
                Op::DeleteSlot(f.with_slot(2)),
                Op::DeleteSlot(f.with_slot(3)),
            ]
        );
        let end = check_all_prefixes(&end, &want);
        assert_eq!(end.services[&f].base, SLOT_BASES[0]);
        // And the one after frees the backends only the second region named.
        let end = check_all_prefixes(&end, &desired(&[("127.0.0.1:6443", &["192.0.2.13:6443"])]));
        assert_eq!(
            end.backends.values().copied().collect::<Vec<_>>(),
            [backend_of(addr("192.0.2.12:6443")), backend_of(addr("192.0.2.13:6443"))]
        );
    }

    #[test]
    fn flipping_back_reuses_the_slots_the_region_still_holds() {
        let a = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.12:6443"])]);
        let b = desired(&[("127.0.0.1:6443", &["192.0.2.12:6443", "192.0.2.11:6443"])]);
        let start = check_all_prefixes(&check_all_prefixes(&Snapshot::default(), &a), &b);
        let f = key_of(addr("127.0.0.1:6443"), 0);
        assert_eq!(
            plan(&start, &a).unwrap(),
            vec![Op::PutSlot(f, ServiceValue::frontend(2, 0, POLICY_RANDOM))]
        );
    }

    #[test]
    fn shared_backends_keep_one_id() {
        let want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"]), ("[::1]:6443", &["192.0.2.11:6443"])]);
        let end = check_all_prefixes(&Snapshot::default(), &want);
        assert_eq!(end.backends.len(), 1);
    }

    #[test]
    fn removed_frontend_loses_slot_zero_first() {
        let start = check_all_prefixes(
            &Snapshot::default(),
            &desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"]), ("[::1]:6443", &["192.0.2.12:6443"])]),
        );
        let ops = plan(&start, &desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])])).unwrap();
        let v6 = key_of(addr("[::1]:6443"), 0);
        let gone = start.services[&v6.with_slot(1)].backend_id;
        assert_eq!(start.backends[&gone], backend_of(addr("192.0.2.12:6443")));
        // Its slot and backend stay for a connect that read its slot 0 just before; the next
        // plan deletes them.
        assert_eq!(ops, vec![Op::DeleteSlot(v6)]);
        let end = applied(&start, &ops);
        let want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])]);
        assert_eq!(
            plan(&end, &want).unwrap(),
            vec![Op::DeleteSlot(v6.with_slot(1)), Op::DeleteBackend(gone)]
        );
    }

    #[test]
    fn empty_set_keeps_the_frontend_with_count_zero() {
        let start =
            check_all_prefixes(&Snapshot::default(), &desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])]));
        let end = check_all_prefixes(&start, &desired(&[("127.0.0.1:6443", &[])]));
        let f = key_of(addr("127.0.0.1:6443"), 0);
        assert_eq!(end.services.get(&f).map(|v| v.count), Some(0));
        assert_eq!(end.backends.len(), 1, "kept for connects that read the old slot 0");
    }

    #[test]
    fn leftovers_of_an_interrupted_run_are_cleaned() {
        // Slots without a slot 0, a backend nobody uses, and a slot outside the live region.
        let f = key_of(addr("127.0.0.1:6443"), 0);
        let orphan = key_of(addr("127.0.0.1:7443"), 3);
        let mut current = Snapshot::default();
        current.backends.insert(7, backend_of(addr("192.0.2.11:6443")));
        current.backends.insert(9, backend_of(addr("198.51.100.1:6443")));
        current.services.insert(f.with_slot(1), ServiceValue::slot(7));
        current.services.insert(f.with_slot(2), ServiceValue::slot(7));
        current.services.insert(f, ServiceValue::frontend(1, 0, POLICY_RANDOM));
        current.services.insert(orphan, ServiceValue::slot(9));
        let want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.12:6443"])]);
        let end = check_all_prefixes(&current, &want);
        assert!(!end.services.contains_key(&orphan));
        assert!(!end.backends.contains_key(&9));
        assert_eq!(end.backends[&7], backend_of(addr("192.0.2.11:6443")), "kept backends keep their ids");
    }

    /// One desired table: per frontend, absent (a quarter of the time) or any subset of the
    /// backends, in either order.
    fn spec() -> impl Strategy<Value = Vec<Option<(Vec<bool>, bool)>>> {
        let frontend = (0..4u8, vec(any::<bool>(), BACKS.len()), any::<bool>())
            .prop_map(|(absent, pick, reversed)| (absent != 0).then_some((pick, reversed)));
        vec(frontend, FRONTS.len())
    }

    const FRONTS: [&str; 3] = ["127.0.0.1:6443", "[::1]:6443", "127.0.0.1:2379"];
    const BACKS: [&str; 5] =
        ["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443", "198.51.100.7:6443", "203.0.113.9:6443"];

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// Any sequence of tables, each planned from the one before: every prefix of every
        /// plan resolves each frontend to its old or its new set.
        #[test]
        fn every_prefix_resolves_to_old_or_new(steps in vec(spec(), 1..12)) {
            let mut current = Snapshot::default();
            for step in steps {
                let mut spec: Vec<(&str, Vec<&str>)> = Vec::new();
                for (f, chosen) in FRONTS.iter().zip(step) {
                    let Some((pick, reversed)) = chosen else { continue };
                    let mut bs: Vec<&str> = BACKS.iter().zip(pick).filter(|(_, p)| *p).map(|(b, _)| *b).collect();
                    if reversed {
                        bs.reverse();
                    }
                    spec.push((f, bs));
                }
                let refs: Vec<(&str, &[&str])> = spec.iter().map(|(f, b)| (*f, b.as_slice())).collect();
                current = check_all_prefixes(&current, &desired(&refs));
            }
        }
    }

    #[test]
    fn kept_backends_stay_in_the_table_with_their_ids() {
        let both = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.12:6443"])]);
        let start = check_all_prefixes(&Snapshot::default(), &both);
        let id12 =
            *start.backends.iter().find(|(_, b)| **b == backend_of(addr("192.0.2.12:6443"))).unwrap().0;
        let mut one = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])]);
        one.keep.insert(backend_of(addr("192.0.2.12:6443")));
        let end = check_all_prefixes(&start, &one);
        assert_eq!(end.backends.get(&id12), Some(&backend_of(addr("192.0.2.12:6443"))));
        assert_eq!(end.resolve(&key_of(addr("127.0.0.1:6443"), 0)).unwrap().len(), 1);
    }

    #[test]
    fn a_flag_change_alone_rewrites_slot_zero_only() {
        let mut want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])]);
        let start = check_all_prefixes(&Snapshot::default(), &want);
        let f = key_of(addr("127.0.0.1:6443"), 0);
        want.frontends.get_mut(&f).unwrap().flags = kha_common::FRONTEND_FALLBACK;
        let ops = plan(&start, &want).unwrap();
        assert_eq!(
            ops,
            vec![Op::PutSlot(
                f,
                ServiceValue::frontend(1, 0, POLICY_RANDOM).with_flags(kha_common::FRONTEND_FALLBACK)
            )]
        );
    }

    #[test]
    fn socket_addr_round_trips_both_families() {
        for s in ["127.0.0.1:6443", "[::1]:6443", "[2001:db8::11]:443", "192.0.2.11:1"] {
            let a = addr(s);
            let k = key_of(a, 0);
            assert_eq!(socket_addr(&k.addr_be, k.port_be), a);
        }
    }
}
