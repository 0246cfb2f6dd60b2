use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::SystemTime,
};

use kha_common::{Backend, PROBE_DRAINING, PROBE_UNKNOWN, ProbeStatus, SLOT_BASES, ServiceKey, ServiceValue};

use super::{
    plan::{read_by, region_of},
    *,
};
use crate::{
    config::Config,
    health::{AllDown, BackendHealth, DEFAULT_HYSTERESIS, ProbeTarget},
    probe::test_events::not_ready,
};
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
                let backends = bs.iter().map(|b| Backend::from(addr(b))).collect();
                (ServiceKey::at(addr(f), 0), DesiredFrontend { policy: POLICY_RANDOM, flags: 0, backends })
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
    let f = ServiceKey::at(addr("127.0.0.1:6443"), 0);
    assert_eq!(
        ops,
        vec![
            Op::PutBackend(1, Backend::from(addr("192.0.2.11:6443"))),
            Op::PutBackend(2, Backend::from(addr("192.0.2.12:6443"))),
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
    let f = ServiceKey::at(addr("127.0.0.1:6443"), 0);
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
        [Backend::from(addr("192.0.2.12:6443")), Backend::from(addr("192.0.2.13:6443"))]
    );
}

#[test]
fn flipping_back_reuses_the_slots_the_region_still_holds() {
    let a = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.12:6443"])]);
    let b = desired(&[("127.0.0.1:6443", &["192.0.2.12:6443", "192.0.2.11:6443"])]);
    let start = check_all_prefixes(&check_all_prefixes(&Snapshot::default(), &a), &b);
    let f = ServiceKey::at(addr("127.0.0.1:6443"), 0);
    assert_eq!(plan(&start, &a).unwrap(), vec![Op::PutSlot(f, ServiceValue::frontend(2, 0, POLICY_RANDOM))]);
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
    let v6 = ServiceKey::at(addr("[::1]:6443"), 0);
    let gone = start.services[&v6.with_slot(1)].backend_id;
    assert_eq!(start.backends[&gone], Backend::from(addr("192.0.2.12:6443")));
    // Its slot and backend stay for a connect that read its slot 0 just before; the next
    // plan deletes them.
    assert_eq!(ops, vec![Op::DeleteSlot(v6)]);
    let end = applied(&start, &ops);
    let want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])]);
    assert_eq!(plan(&end, &want).unwrap(), vec![Op::DeleteSlot(v6.with_slot(1)), Op::DeleteBackend(gone)]);
}

#[test]
fn empty_set_keeps_the_frontend_with_count_zero() {
    let start =
        check_all_prefixes(&Snapshot::default(), &desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])]));
    let end = check_all_prefixes(&start, &desired(&[("127.0.0.1:6443", &[])]));
    let f = ServiceKey::at(addr("127.0.0.1:6443"), 0);
    assert_eq!(end.services.get(&f).map(|v| v.count), Some(0));
    assert_eq!(end.backends.len(), 1, "kept for connects that read the old slot 0");
}

#[test]
fn leftovers_of_an_interrupted_run_are_cleaned() {
    // Slots without a slot 0, a backend nobody uses, and a slot outside the live region.
    let f = ServiceKey::at(addr("127.0.0.1:6443"), 0);
    let orphan = ServiceKey::at(addr("127.0.0.1:7443"), 3);
    let mut current = Snapshot::default();
    current.backends.insert(7, Backend::from(addr("192.0.2.11:6443")));
    current.backends.insert(9, Backend::from(addr("198.51.100.1:6443")));
    current.services.insert(f.with_slot(1), ServiceValue::slot(7));
    current.services.insert(f.with_slot(2), ServiceValue::slot(7));
    current.services.insert(f, ServiceValue::frontend(1, 0, POLICY_RANDOM));
    current.services.insert(orphan, ServiceValue::slot(9));
    let want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443", "192.0.2.12:6443"])]);
    let end = check_all_prefixes(&current, &want);
    assert!(!end.services.contains_key(&orphan));
    assert!(!end.backends.contains_key(&9));
    assert_eq!(end.backends[&7], Backend::from(addr("192.0.2.11:6443")), "kept backends keep their ids");
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
    let id12 = *start.backends.iter().find(|(_, b)| **b == Backend::from(addr("192.0.2.12:6443"))).unwrap().0;
    let mut one = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])]);
    one.keep.insert(Backend::from(addr("192.0.2.12:6443")));
    let end = check_all_prefixes(&start, &one);
    assert_eq!(end.backends.get(&id12), Some(&Backend::from(addr("192.0.2.12:6443"))));
    assert_eq!(end.resolve(&ServiceKey::at(addr("127.0.0.1:6443"), 0)).unwrap().len(), 1);
}

#[test]
fn a_flag_change_alone_rewrites_slot_zero_only() {
    let mut want = desired(&[("127.0.0.1:6443", &["192.0.2.11:6443"])]);
    let start = check_all_prefixes(&Snapshot::default(), &want);
    let f = ServiceKey::at(addr("127.0.0.1:6443"), 0);
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
fn desired_state_serves_the_healthy_keeps_the_rest_and_reports_all() {
    let config = Config::from_flags(
        &["127.0.0.1:6443".into()],
        &["192.0.2.11:6443".into(), "192.0.2.12:6443".into()],
        &Default::default(),
    )
    .unwrap();
    let a: SocketAddr = "192.0.2.11:6443".parse().unwrap();
    let mut health = BTreeMap::new();
    let mut down = BackendHealth::new(true, SystemTime::UNIX_EPOCH);
    down.observe(&not_ready(), DEFAULT_HYSTERESIS, SystemTime::UNIX_EPOCH);
    health.insert(ProbeTarget::new(a, "/readyz"), down);
    let (desired, statuses) = desired_state(&config, &health, AllDown::Fallback, &BTreeSet::new());
    let f = desired.frontends.values().next().unwrap();
    assert_eq!(f.backends, vec![Backend::from(addr("192.0.2.12:6443"))]);
    assert_eq!(f.flags, 0);
    assert!(desired.keep.contains(&Backend::from(a)));
    let st: Vec<&ProbeStatus> = statuses.values().collect();
    assert_eq!(st.len(), 2);
    let down = st.iter().find(|s| s.state == PROBE_DRAINING).expect("a draining entry");
    assert_eq!(down.serving, 0);
    assert!(String::from_utf8_lossy(&down.reason).contains("[-]etcd failed"));
    let unknown = st.iter().find(|s| s.state == PROBE_UNKNOWN).unwrap();
    assert_eq!(unknown.serving, 1);
}
