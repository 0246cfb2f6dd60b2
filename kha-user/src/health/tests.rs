use std::collections::BTreeMap;

use super::*;
use crate::config::{Config, Frontend};
use crate::probe::test_events::{not_ready, ready, refused, timeout};

const H: Hysteresis = DEFAULT_HYSTERESIS;

fn lost() -> ProbeEvent {
    ProbeEvent::ConnectionLost { failure: ProbeFailure::Closed }
}

fn run(events: &[ProbeEvent]) -> (BackendHealth, Vec<Change>) {
    let mut b = BackendHealth::new(true, SystemTime::UNIX_EPOCH);
    let changes = events.iter().map(|e| b.observe(e, H, SystemTime::UNIX_EPOCH)).collect();
    (b, changes)
}

#[test]
fn the_first_result_decides_at_once() {
    assert_eq!(run(&[ready()]).0.state, State::Up);
    let (b, changes) = run(&[timeout()]);
    assert_eq!((b.state, changes[0]), (State::Down, Change::WentDown));
}

#[test]
fn one_failure_does_not_flap_two_do() {
    let (b, changes) = run(&[ready(), timeout()]);
    assert_eq!(b.state, State::Up);
    assert_eq!(changes, [Change::None, Change::None]);
    let (b, changes) = run(&[ready(), timeout(), ready(), timeout(), timeout()]);
    assert_eq!(b.state, State::Down);
    assert_eq!(changes[4], Change::WentDown);
}

#[test]
fn a_lost_probe_connection_is_suspect_until_the_reconnect_decides() {
    let (b, changes) = run(&[ready(), lost()]);
    assert_eq!((b.state, changes[1]), (State::Suspect, Change::WentSuspect));
    assert!(!b.state.serves());
    assert_eq!(b.state.code(), kha_common::PROBE_SUSPECT);
    assert_eq!(b.last_failure.as_deref(), Some(ProbeFailure::Closed.to_string().as_str()));
    // The reconnect is ready: up at once, the suspicion was unfounded.
    let (b, changes) = run(&[ready(), lost(), ready()]);
    assert_eq!((b.state, changes[2]), (State::Up, Change::WentUp));
    // The reconnect fails: down; or draining, if it answers not ready.
    let (b, changes) = run(&[ready(), lost(), refused()]);
    assert_eq!((b.state, changes[2]), (State::Down, Change::WentDown));
    assert_eq!(run(&[ready(), lost(), timeout()]).0.state, State::Down);
    assert_eq!(run(&[ready(), lost(), not_ready()]).0.state, State::Draining);
}

#[test]
fn a_connection_that_dies_under_a_probe_is_suspect_too() {
    use crate::probe::Phase;
    let abandoned = ProbeEvent::Failed {
        failure: ProbeFailure::Abandoned { phase: Phase::Response },
        latency: Duration::from_millis(1500),
    };
    let (b, changes) = run(&[ready(), abandoned]);
    assert_eq!((b.state, changes[1]), (State::Suspect, Change::WentSuspect));
    let reset = ProbeEvent::Failed { failure: ProbeFailure::Reset, latency: Duration::from_millis(1) };
    assert_eq!(run(&[ready(), reset.clone()]).0.state, State::Suspect);
    assert_eq!(run(&[ready(), reset, refused()]).0.state, State::Down);
    // A slow answer is not a death: it needs `fall` in a row.
    assert_eq!(run(&[ready(), timeout()]).0.state, State::Up);
}

#[test]
fn not_ready_but_answering_drains_then_a_death_is_down() {
    let (b, changes) = run(&[ready(), not_ready(), not_ready()]);
    assert_eq!((b.state, changes[2]), (State::Draining, Change::WentDraining));
    assert!(b.last_failure.as_deref().unwrap().contains("[-]etcd failed"), "{:?}", b.last_failure);
    let (b, changes) = run(&[ready(), not_ready(), not_ready(), lost()]);
    assert_eq!((b.state, changes[3]), (State::Down, Change::WentDown));
}

#[test]
fn recovery_needs_rise_successes() {
    let (b, changes) = run(&[ready(), lost(), refused(), ready()]);
    assert_eq!(b.state, State::Down, "one success is not enough");
    assert_eq!(changes[3], Change::None);
    let (b, changes) = run(&[ready(), lost(), refused(), ready(), ready()]);
    assert_eq!((b.state, changes[4]), (State::Up, Change::WentUp));
}

fn discovered(events: &[ProbeEvent]) -> (BackendHealth, Vec<Change>) {
    let mut b = BackendHealth::discovered(SystemTime::UNIX_EPOCH);
    let changes = events.iter().map(|e| b.observe(e, H, SystemTime::UNIX_EPOCH)).collect();
    (b, changes)
}

#[test]
fn a_discovered_backend_is_served_only_after_a_probe_passed() {
    let (b, _) = discovered(&[]);
    assert_eq!((b.state, b.state.serves(), b.vouched()), (State::Unproven, false, false));
    assert_eq!(b.state.code(), kha_common::PROBE_UNPROVEN);
    assert_eq!(kha_common::PROBE_STATE_NAMES[b.state.code() as usize], "unproven");
    // The first pass is the proof: up at once.
    let (b, changes) = discovered(&[ready()]);
    assert_eq!((b.state, changes[0], b.vouched()), (State::Up, Change::WentUp, true));
    assert!(b.proven());
    // A 401 is a verified handshake too.
    let unauthorized = ProbeEvent::Failed {
        failure: ProbeFailure::Status { code: 401, line: String::new() },
        latency: Duration::ZERO,
    };
    assert_eq!(discovered(&[unauthorized]).0.state, State::Up);
    // A failure first: down, still never vouched for; back only after `rise` passes.
    let (b, _) = discovered(&[timeout()]);
    assert_eq!((b.state, b.vouched()), (State::Down, false));
    assert_eq!(discovered(&[refused(), ready()]).0.state, State::Down);
    let (b, _) = discovered(&[refused(), ready(), ready()]);
    assert_eq!((b.state, b.vouched()), (State::Up, true));
    assert_eq!(discovered(&[not_ready()]).0.state, State::Draining);
    // An operator who names it vouches for it: unknown, served as any configured backend.
    let (mut b, _) = discovered(&[]);
    b.vouch();
    assert_eq!((b.state, b.state.serves(), b.vouched()), (State::Unknown, true, true));
}

#[test]
fn the_fallback_never_serves_a_backend_no_probe_vouched_for() {
    let a: SocketAddr = "192.0.2.11:6443".parse().unwrap();
    let forged: SocketAddr = "192.0.2.200:6443".parse().unwrap();
    let mut health = BTreeMap::new();
    health.insert(forged, BackendHealth::discovered(SystemTime::UNIX_EPOCH));
    assert_eq!(live_set(&[a, forged], &health, AllDown::Fallback), (vec![a], false));
    // Every one down: the fallback is the vouched ones only, the forged one never.
    let (down, _) = run(&[refused()]);
    health.insert(a, down);
    assert_eq!(live_set(&[a, forged], &health, AllDown::Fallback), (vec![a], true));
    let (forged_down, _) = discovered(&[refused()]);
    health.insert(forged, forged_down);
    assert_eq!(live_set(&[a, forged], &health, AllDown::Fallback), (vec![a], true));
    assert_eq!(live_set(&[forged], &health, AllDown::Fallback), (vec![], false), "nothing vouched");
    // Once it passed a probe it is like any other.
    let (recovered, _) = discovered(&[ready(), refused(), refused()]);
    assert_eq!(recovered.state, State::Down);
    health.insert(forged, recovered);
    assert_eq!(live_set(&[a, forged], &health, AllDown::Fallback), (vec![a, forged], true));
}

#[test]
fn discovery_asks_proven_masters_first_and_never_an_unvouched_one() {
    let mut config = Config::from_flags(
        &["127.0.0.1:6443".into(), "[::1]:6443".into()],
        &["192.0.2.11:6443".into(), "192.0.2.12:6443".into(), "192.0.2.13:6443".into()],
        &Default::default(),
    )
    .unwrap();
    let m = |i: u8| SocketAddr::from(([192, 0, 2, 10 + i], 6443));
    let path = |b: SocketAddr| ProbeTarget::new(b, "/readyz");
    // Not fed by discovery: none.
    assert!(api_candidates(&config, &BTreeMap::new(), 0).is_empty());
    config.frontends.iter_mut().for_each(|f| f.discover = true);
    assert_eq!(
        api_candidates(&config, &BTreeMap::new(), 0),
        vec![m(1), m(2), m(3)],
        "config order, once each"
    );
    config.frontends.iter_mut().for_each(|f| f.backends.push(m(4)));
    let mut health = BTreeMap::new();
    health.insert(path(m(1)), run(&[refused()]).0);
    health.insert(path(m(2)), BackendHealth::new(true, SystemTime::UNIX_EPOCH));
    health.insert(path(m(3)), run(&[ready()]).0);
    health.insert(path(m(4)), discovered(&[]).0);
    assert_eq!(api_candidates(&config, &health, 0), vec![m(3), m(2), m(1)]);
    health.insert(path(m(4)), discovered(&[ready()]).0);
    assert_eq!(api_candidates(&config, &health, 0), vec![m(3), m(4), m(2), m(1)]);
}

#[test]
fn each_node_starts_elsewhere_within_a_rank_and_ranks_still_come_first() {
    let config = Config {
        frontends: Config::from_flags(
            &["127.0.0.1:6443".into()],
            &["192.0.2.11:6443".into(), "192.0.2.12:6443".into(), "192.0.2.13:6443".into()],
            &Default::default(),
        )
        .unwrap()
        .frontends
        .into_iter()
        .map(|f| Frontend { discover: true, ..f })
        .collect(),
        ca_file: None,
        fleet_size: None,
    };
    let m = |i: u8| SocketAddr::from(([192, 0, 2, 10 + i], 6443));
    let proven = || run(&[ready()]).0;
    let all: BTreeMap<ProbeTarget, BackendHealth> =
        (1..=3).map(|i| (ProbeTarget::new(m(i), "/readyz"), proven())).collect();
    // Three nodes with spreads 0, 1, 2 ask three different masters first, and each has all.
    let firsts: Vec<Vec<SocketAddr>> = (0..3).map(|s| api_candidates(&config, &all, s)).collect();
    assert_eq!(firsts, [vec![m(1), m(2), m(3)], vec![m(2), m(3), m(1)], vec![m(3), m(1), m(2)]]);
    // m2 fails: the rotation is within the proven rank only; m2 comes last on every node.
    let mut health = all.clone();
    health.insert(ProbeTarget::new(m(2), "/readyz"), run(&[refused()]).0);
    for s in 0..4 {
        let c = api_candidates(&config, &health, s);
        assert_eq!(c.last(), Some(&m(2)), "spread {s}: {c:?}");
    }
    assert_eq!(api_candidates(&config, &health, 1)[0], m(3));
    // Over many nodes the first choice is spread about evenly.
    let mut count = BTreeMap::new();
    for node in 0..3000u32 {
        let spread = format!("node-{node}")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        *count.entry(api_candidates(&config, &all, spread)[0]).or_insert(0) += 1;
    }
    assert!(count.values().all(|n| (800..=1200).contains(n)), "{count:?}");
    assert_eq!(node_spread(), node_spread(), "the same across calls");
}

#[test]
fn a_slow_probe_makes_an_up_backend_suspect_and_failures_still_count_to_fall() {
    let slow = ProbeEvent::Slow { waited: Duration::from_secs(1) };
    let (b, changes) = run(&[ready(), slow.clone()]);
    assert_eq!((b.state, changes[1]), (State::Suspect, Change::WentSuspect));
    assert!(b.last_failure.as_deref().is_some_and(|r| r.contains("no answer")), "{:?}", b.last_failure);
    // Answered after all: up again at once.
    let (b, changes) = run(&[ready(), slow.clone(), ready()]);
    assert_eq!((b.state, changes[2]), (State::Up, Change::WentUp));
    // Timed out: still suspect after one failure, down after `fall` of them.
    let (b, _) = run(&[ready(), slow.clone(), timeout()]);
    assert_eq!(b.state, State::Suspect);
    let (b, changes) = run(&[ready(), slow.clone(), timeout(), slow.clone(), timeout()]);
    assert_eq!((b.state, changes[4]), (State::Down, Change::WentDown));
    // Slow says nothing about a backend that is not up (unknown, down, draining).
    let (b, changes) = run(std::slice::from_ref(&slow));
    assert_eq!((b.state, changes[0]), (State::Unknown, Change::None));
    let (b, _) = run(&[refused(), slow.clone()]);
    assert_eq!(b.state, State::Down);
    // A lost connection's suspicion is still confirmed by the first failure.
    let (b, _) = run(&[ready(), lost(), refused()]);
    assert_eq!(b.state, State::Down);
    // After a slow suspicion that cleared, a lost connection is a lost connection again.
    let (b, _) = run(&[ready(), slow, ready(), lost(), refused()]);
    assert_eq!(b.state, State::Down);
}

#[test]
fn a_confirmed_silence_is_down_at_once_whatever_came_before() {
    use crate::probe::test_events::{silent, slow};
    for before in [vec![ready()], vec![ready(), slow()], vec![ready(), lost()], vec![ready(), not_ready()]] {
        let mut events = before.clone();
        events.push(silent());
        let (b, changes) = run(&events);
        assert_eq!((b.state, *changes.last().unwrap()), (State::Down, Change::WentDown), "{before:?}");
    }
    // Back only by `rise` ready answers, as from any down.
    assert_eq!(run(&[ready(), silent(), ready()]).0.state, State::Down);
    assert_eq!(run(&[ready(), silent(), ready(), ready()]).0.state, State::Up);
}

#[test]
fn a_late_liveness_answer_clears_only_a_slow_suspicion() {
    use crate::probe::test_events::{alive, slow};
    let (b, changes) = run(&[ready(), slow(), alive()]);
    assert_eq!((b.state, changes[2]), (State::Up, Change::WentUp));
    assert_eq!(b.last_failure, None);
    // It says the process serves, not that it is ready or that the lost connection is back.
    assert_eq!(run(&[ready(), not_ready(), alive()]).0.state, State::Suspect);
    assert_eq!(run(&[ready(), lost(), alive()]).0.state, State::Suspect);
    assert_eq!(run(&[ready(), not_ready(), not_ready(), alive()]).0.state, State::Draining);
    assert_eq!(run(&[alive()]).0.state, State::Unknown);
}

#[test]
fn the_first_not_ready_answer_stops_new_connections_and_fall_makes_it_draining() {
    let (b, changes) = run(&[ready(), not_ready()]);
    assert_eq!((b.state, changes[1]), (State::Suspect, Change::WentSuspect));
    assert!(!b.state.serves());
    let (b, changes) = run(&[ready(), not_ready(), ready()]);
    assert_eq!((b.state, changes[2]), (State::Up, Change::WentUp), "one flap, then ready again");
    let (b, changes) = run(&[ready(), not_ready(), not_ready()]);
    assert_eq!((b.state, changes[2]), (State::Draining, Change::WentDraining));
    // A not-ready master whose connection is then lost is confirmed by the reconnect.
    assert_eq!(run(&[ready(), not_ready(), lost(), refused()]).0.state, State::Down);
}

#[test]
fn unchecked_backends_always_serve() {
    let b = BackendHealth::new(false, SystemTime::UNIX_EPOCH);
    assert!(b.state.serves());
    assert_eq!(b.state.code(), PROBE_UNCHECKED);
}

#[test]
fn live_set_falls_back_or_fails_closed_when_all_are_down() {
    let a: SocketAddr = "192.0.2.11:6443".parse().unwrap();
    let b: SocketAddr = "192.0.2.12:6443".parse().unwrap();
    let mut health = BTreeMap::new();
    let mut down = BackendHealth::new(true, SystemTime::UNIX_EPOCH);
    down.observe(
        &ProbeEvent::Failed { failure: ProbeFailure::Refused, latency: Duration::ZERO },
        H,
        SystemTime::UNIX_EPOCH,
    );
    health.insert(a, down.clone());
    assert_eq!(live_set(&[a, b], &health, AllDown::Fallback), (vec![b], false), "unknown serves");
    health.insert(b, down);
    assert_eq!(live_set(&[a, b], &health, AllDown::Fallback), (vec![a, b], true));
    assert_eq!(live_set(&[a, b], &health, AllDown::FailClosed), (vec![], false));
    assert_eq!(live_set(&[], &health, AllDown::Fallback), (vec![], false), "an empty config stays empty");
}
