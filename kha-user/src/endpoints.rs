//! The backend table as data: what the kernel should hold (`Desired`), what it holds
//! (`Snapshot`), and the ordered writes that turn one into the other (`plan`).
//!
//! The order: new backends first, then the frontend's unused slot region, then its slot 0
//! (count and region base, one atomic map write), then the old region's slots, and backends
//! nobody references last. The kernel reads slot 0 and then only the region it names, so after
//! *every prefix* of a plan each frontend resolves to exactly its old set or exactly its new
//! one. `every_prefix_resolves_to_old_or_new` checks exactly that.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
};

use kha_common::{Backend, MAX_BACKENDS, SLOT_BASES, ServiceKey, ServiceValue, is_v4_mapped, v4_of_mapped};

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
        let f = self.services.get(frontend)?;
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
/// empty.
pub fn plan(current: &Snapshot, desired: &Desired) -> Result<Vec<Op>, PlanError> {
    let mut ops = Vec::new();

    // Backends are shared by frontends and keep their ids, so unchanged slots stay unchanged.
    let mut id_of: BTreeMap<Backend, u32> = BTreeMap::new();
    for (id, b) in current.backends.iter().rev() {
        id_of.insert(*b, *id); // lowest id wins if a backend appears twice
    }
    let mut used: BTreeSet<u32> = current.backends.keys().copied().collect();
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
                ops.push(Op::PutSlot(fkey.with_slot(base + i as u16 + 1), ServiceValue::slot(id_of[b])));
            }
            ops.push(Op::PutSlot(*fkey, slot0));
        } else if live.is_some_and(|v| v.flags != f.flags) {
            // Same set, only what status shows changed: rewriting slot 0 in place is atomic.
            ops.push(Op::PutSlot(*fkey, slot0));
        }
        let live_range = base + 1..=base + f.backends.len() as u16;
        let stale = current
            .services
            .keys()
            .filter(|k| same_frontend(k, fkey) && k.slot != 0 && !live_range.contains(&k.slot));
        ops.extend(stale.map(|k| Op::DeleteSlot(*k)));
    }

    // Frontends no longer wanted: slot 0 first, so the kernel stops matching before the slots
    // it would read go away. Slots without a slot 0 (left by an interrupted run) go too.
    let gone = |k: &ServiceKey| !desired.frontends.contains_key(&k.with_slot(0));
    ops.extend(current.services.keys().filter(|k| k.slot == 0 && gone(k)).map(|k| Op::DeleteSlot(*k)));
    ops.extend(current.services.keys().filter(|k| k.slot != 0 && gone(k)).map(|k| Op::DeleteSlot(*k)));

    let wanted: BTreeSet<u32> =
        desired.frontends.values().flat_map(|f| &f.backends).chain(&desired.keep).map(|b| id_of[b]).collect();
    ops.extend(current.backends.keys().filter(|id| !wanted.contains(id)).map(|id| Op::DeleteBackend(*id)));
    Ok(ops)
}

fn same_frontend(a: &ServiceKey, b: &ServiceKey) -> bool {
    a.addr_be == b.addr_be && a.port_be == b.port_be
}

#[cfg(test)]
mod tests {
    use super::*;
    use kha_common::POLICY_RANDOM;

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

    fn check_all_prefixes(current: &Snapshot, want: &Desired) -> Snapshot {
        let ops = plan(current, want).unwrap();
        for n in 0..=ops.len() {
            assert_old_or_new(&applied(current, &ops[..n]), current, want, n);
        }
        let end = applied(current, &ops);
        for (k, f) in &want.frontends {
            assert_eq!(end.resolve(k).as_ref(), Some(&f.backends));
        }
        assert_eq!(end.frontends().count(), want.frontends.len());
        let live: usize = want.frontends.values().map(|f| 1 + f.backends.len()).sum();
        assert_eq!(end.services.len(), live, "only live slots remain");
        assert!(plan(&end, want).unwrap().is_empty(), "a second plan must be empty");
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
    fn change_fills_the_other_region_flips_then_deletes_the_old() {
        let start = check_all_prefixes(
            &Snapshot::default(),
            &desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.12:6443", "192.0.2.13:6443"])]),
        );
        let want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.13:6443"])]);
        let ops = plan(&start, &want).unwrap();
        let f = key_of(addr("127.0.0.1:6443"), 0);
        let b = SLOT_BASES[1];
        assert_eq!(
            ops,
            vec![
                Op::PutSlot(f.with_slot(b + 1), ServiceValue::slot(1)),
                Op::PutSlot(f.with_slot(b + 2), ServiceValue::slot(3)),
                Op::PutSlot(f, ServiceValue::frontend(2, b, POLICY_RANDOM)),
                Op::DeleteSlot(f.with_slot(1)),
                Op::DeleteSlot(f.with_slot(2)),
                Op::DeleteSlot(f.with_slot(3)),
                Op::DeleteBackend(2),
            ]
        );
        let end = check_all_prefixes(&start, &want);
        // And back to the first region on the next change.
        let end = check_all_prefixes(&end, &desired(&[("127.0.0.1:6443", &["192.0.2.12:6443"])]));
        assert_eq!(end.services[&f].base, SLOT_BASES[0]);
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
        assert_eq!(ops, vec![Op::DeleteSlot(v6), Op::DeleteSlot(v6.with_slot(1)), Op::DeleteBackend(gone)]);
    }

    #[test]
    fn empty_set_keeps_the_frontend_with_count_zero() {
        let start =
            check_all_prefixes(&Snapshot::default(), &desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])]));
        let end = check_all_prefixes(&start, &desired(&[("127.0.0.1:6443", &[])]));
        let f = key_of(addr("127.0.0.1:6443"), 0);
        assert_eq!(end.services.get(&f).map(|v| v.count), Some(0));
        assert!(end.backends.is_empty());
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

    #[test]
    fn every_prefix_resolves_to_old_or_new() {
        // A small deterministic generator: no dependency, same cases on every run.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let fronts = ["127.0.0.1:6443", "[::1]:6443", "127.0.0.1:2379"];
        let backs = [
            "192.0.2.11:6443",
            "192.0.2.12:6443",
            "192.0.2.13:6443",
            "198.51.100.7:6443",
            "203.0.113.9:6443",
        ];
        let mut current = Snapshot::default();
        for _ in 0..300 {
            let mut spec: Vec<(&str, Vec<&str>)> = Vec::new();
            for f in fronts {
                if next(4) == 0 {
                    continue;
                }
                let mut bs: Vec<&str> = backs.iter().copied().filter(|_| next(2) == 0).collect();
                if next(2) == 0 {
                    bs.reverse();
                }
                spec.push((f, bs));
            }
            let refs: Vec<(&str, &[&str])> = spec.iter().map(|(f, b)| (*f, b.as_slice())).collect();
            current = check_all_prefixes(&current, &desired(&refs));
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
