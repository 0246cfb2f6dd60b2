//! The supervisor against a table and a set of sockets in memory, with paused time: what the
//! backend table serves and which sockets are terminated, when, after each probe event.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use kha_common::{ProbeKey, ProbeStatus};
use tokio::time::{Instant, advance};

use super::*;
use crate::probe::test_events::{not_ready, ready, refused, timeout};
use crate::{
    config::Config,
    endpoints::{Op, Snapshot, key_of},
    health::DEFAULT_HYSTERESIS,
    probe::{Phase, ProbeFailure},
};

const F: &str = "127.0.0.1:6443";
const F6: &str = "[::1]:6443";
const DRAIN: Duration = Duration::from_secs(10);
/// Sockets each pair holds at the start.
const SOCKETS: usize = 2;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `m1`.. `m3`: 192.0.2.11:6443 ..
fn m(n: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 10 + n], 6443))
}

fn config(frontends: &[&str], backends: &[SocketAddr]) -> Config {
    let f: Vec<String> = frontends.iter().map(|s| s.to_string()).collect();
    let b: Vec<String> = backends.iter().map(|s| s.to_string()).collect();
    Config::from_flags(&f, &b, &Default::default()).unwrap()
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

/// The backend table, the kernel's suspicion marks and the probe statuses, in memory.
#[derive(Default)]
struct FakeTable {
    state: Snapshot,
    suspect: BTreeSet<u32>,
    statuses: BTreeMap<ProbeKey, ProbeStatus>,
}

impl BackendTable for FakeTable {
    type Error = Never;
    fn snapshot(&self) -> Result<Snapshot, Never> {
        Ok(self.state.clone())
    }
    fn apply(&mut self, op: &Op) -> Result<(), Never> {
        if let Op::PutBackend(id, _) = op {
            self.suspect.remove(id);
        }
        self.state.apply(op);
        Ok(())
    }
}

impl Datapath for FakeTable {
    fn lift_suspicion(&mut self, id: u32) -> Result<bool, Never> {
        Ok(self.suspect.remove(&id))
    }
    fn set_probe_statuses(&mut self, statuses: &BTreeMap<ProbeKey, ProbeStatus>) -> Result<(), Never> {
        self.statuses = statuses.clone();
        Ok(())
    }
}

/// Open sockets per pair, and every termination with its time.
#[derive(Default)]
struct FakeSockets {
    open: BTreeMap<Pair, usize>,
    terminated: Vec<(Instant, Pair, usize)>,
}

impl Terminator for FakeSockets {
    type Error = Never;
    fn terminate(&mut self, pairs: &BTreeSet<Pair>) -> Result<usize, Never> {
        let mut total = 0;
        for p in pairs {
            let n = self.open.remove(p).unwrap_or(0);
            self.terminated.push((Instant::now(), *p, n));
            total += n;
        }
        Ok(total)
    }
    fn backends_in_use(&self) -> Result<BTreeSet<SocketAddr>, Never> {
        Ok(self.open.iter().filter(|(_, n)| **n > 0).map(|((_, b), _)| *b).collect())
    }
}

type Sup = Supervisor<FakeTable, FakeSockets>;

/// A supervisor for `config` whose table already serves it (as the binary's first sync does)
/// and whose every pair holds [`SOCKETS`] sockets.
fn supervisor(config: Config) -> Sup {
    let mut table = FakeTable::default();
    sync(&mut table, &Desired::from_config(&config)).unwrap();
    let sockets = FakeSockets {
        open: pairs_of(&config).into_iter().map(|p| (p, SOCKETS)).collect(),
        ..Default::default()
    };
    let settings = Settings {
        checked: true,
        hysteresis: DEFAULT_HYSTERESIS,
        all_down: AllDown::Fallback,
        drain: DRAIN,
        recorders: Recorders::default(),
    };
    Supervisor::new(settings, config, table, sockets)
}

fn feed(sup: &mut Sup, backend: SocketAddr, events: &[ProbeEvent]) {
    for e in events {
        sup.observe((backend, "/readyz".into()), e.clone());
    }
}

/// Every backend of `config` probed ready once: all up.
fn all_up(sup: &mut Sup) {
    let backends: BTreeSet<SocketAddr> = pairs_of(sup.config()).into_iter().map(|(_, b)| b).collect();
    for b in backends {
        feed(sup, b, &[ready()]);
    }
}

fn state(sup: &Sup, backend: SocketAddr) -> State {
    sup.health(&(backend, "/readyz".into())).unwrap().state
}

/// The backends new connects to `frontend` go to.
fn live(sup: &Sup, frontend: &str) -> Vec<SocketAddr> {
    let set = sup.table().state.resolve(&key_of(addr(frontend), 0)).unwrap();
    set.iter().map(|b| socket_addr(&b.addr_be, b.port_be)).collect()
}

/// Pairs terminated so far, in order.
fn terminated(sup: &Sup) -> Vec<Pair> {
    sup.terminator().terminated.iter().filter(|(_, _, n)| *n > 0).map(|(_, p, _)| *p).collect()
}

/// Runs the supervisor's deadline arm as the agent's loop does: sleeps (paused time jumps)
/// until the next deadline and handles it, if that comes before `limit` from now.
async fn run_deadlines_for(sup: &mut Sup, limit: Duration) {
    let end = Instant::now() + limit;
    while let Some(at) = sup.next_deadline().filter(|at| *at <= end) {
        sleep_until(Some(at)).await;
        sup.on_deadline();
    }
    tokio::time::sleep_until(end).await;
}

#[tokio::test(start_paused = true)]
async fn a_down_backend_leaves_the_set_and_loses_its_sockets_at_once() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    feed(&mut sup, m(1), &[refused()]);
    assert_eq!(state(&sup, m(1)), State::Up, "one failure does not flap");
    assert!(terminated(&sup).is_empty());
    feed(&mut sup, m(1), &[refused()]);
    assert_eq!(state(&sup, m(1)), State::Down);
    assert_eq!(live(&sup, F), [m(2), m(3)]);
    assert_eq!(terminated(&sup), [(addr(F), m(1))]);
    assert!(sup.table().state.backends.values().any(|b| *b == backend_of(m(1))), "kept with its id");
}

#[tokio::test(start_paused = true)]
async fn a_draining_backend_keeps_its_sockets_for_the_drain_time() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    let start = Instant::now();
    feed(&mut sup, m(2), &[not_ready(), not_ready()]);
    assert_eq!(state(&sup, m(2)), State::Draining);
    assert_eq!(live(&sup, F), [m(1), m(3)], "no new connections");
    run_deadlines_for(&mut sup, DRAIN - Duration::from_millis(1)).await;
    assert!(terminated(&sup).is_empty(), "not before the drain time");
    run_deadlines_for(&mut sup, Duration::from_secs(1)).await;
    let t = &sup.terminator().terminated;
    assert_eq!((t.len(), t[0].1, t[0].0 - start), (1, (addr(F), m(2)), DRAIN), "{t:?}");
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_recovers_within_the_drain_time_keeps_its_sockets() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    feed(&mut sup, m(2), &[not_ready(), not_ready()]);
    advance(Duration::from_secs(4)).await;
    feed(&mut sup, m(2), &[ready(), ready()]);
    assert_eq!(state(&sup, m(2)), State::Up);
    assert_eq!(live(&sup, F), [m(1), m(2), m(3)]);
    assert_eq!(sup.next_deadline(), None);
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert!(terminated(&sup).is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_draining_backend_that_dies_is_terminated_without_waiting() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    feed(&mut sup, m(2), &[not_ready(), not_ready()]);
    advance(Duration::from_secs(1)).await;
    feed(&mut sup, m(2), &[refused()]);
    assert_eq!(state(&sup, m(2)), State::Down);
    assert_eq!(terminated(&sup), [(addr(F), m(2))]);
}

#[tokio::test(start_paused = true)]
async fn terminations_are_per_frontend_and_probe_path() {
    let mut sup = supervisor(config(&[F, F6], &[m(1), m(2)]));
    all_up(&mut sup);
    feed(&mut sup, m(1), &[timeout(), timeout()]);
    assert_eq!(state(&sup, m(1)), State::Down);
    let t: BTreeSet<Pair> = terminated(&sup).into_iter().collect();
    assert_eq!(t, [(addr(F), m(1)), (addr(F6), m(1))].into());
    assert_eq!(sup.terminator().open.get(&(addr(F), m(2))), Some(&SOCKETS), "others untouched");
}

#[tokio::test(start_paused = true)]
async fn a_ready_probe_lifts_the_kernels_suspicion() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2)]));
    all_up(&mut sup);
    let id = *sup.table().state.backends.iter().find(|(_, b)| **b == backend_of(m(1))).unwrap().0;
    sup.table.suspect.insert(id);
    feed(&mut sup, m(1), &[ready()]);
    assert!(sup.table().suspect.is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_and_statuses_show_state_and_serving() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2)]));
    all_up(&mut sup);
    feed(&mut sup, m(1), &[refused(), refused()]);
    let snap = sup.snapshot();
    let p1 = snap.pairs.iter().find(|p| p.backend == m(1)).unwrap();
    assert_eq!((p1.state, p1.serving), (State::Down, false));
    assert_eq!(snap.fallback.get(&addr(F)), Some(&false));
    let codes: Vec<u8> = sup.table().statuses.values().map(|s| s.state).collect();
    assert_eq!(codes.len(), 2);
    assert!(codes.contains(&kha_common::PROBE_DOWN) && codes.contains(&kha_common::PROBE_UP), "{codes:?}");
}

// Rule 1: sockets are terminated only if another backend of their frontend is up to take them.

#[tokio::test(start_paused = true)]
async fn every_master_not_ready_terminates_nothing() {
    // etcd trouble: every /readyz says 500. The fallback serves the very same masters, so
    // moving the connections would only make every kubelet of the cluster relist at once.
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    for b in [m(1), m(2), m(3)] {
        feed(&mut sup, b, &[not_ready(), not_ready()]);
    }
    assert_eq!(live(&sup, F), [m(1), m(2), m(3)], "fallback");
    run_deadlines_for(&mut sup, DRAIN * 3).await;
    assert_eq!(terminated(&sup), [], "drained into the same masters");
}

#[tokio::test(start_paused = true)]
async fn every_master_down_terminates_nothing() {
    // Every probe fails, as when the node's own network is broken: the probes of the three
    // masters fail in turn, so m1 reaches `fall` while m2 and m3 are still up, but failing.
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    for _ in 0..2 {
        for b in [m(1), m(2), m(3)] {
            feed(&mut sup, b, &[timeout()]);
        }
    }
    assert_eq!(state(&sup, m(3)), State::Down);
    run_deadlines_for(&mut sup, DRAIN * 3).await;
    assert_eq!(terminated(&sup), []);
}

#[tokio::test(start_paused = true)]
async fn a_failing_peer_is_no_alternative_until_it_answers_again() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2)]));
    all_up(&mut sup);
    feed(&mut sup, m(2), &[timeout()]);
    feed(&mut sup, m(1), &[refused(), refused()]);
    assert_eq!((state(&sup, m(1)), state(&sup, m(2))), (State::Down, State::Up));
    assert_eq!(terminated(&sup), [], "m2's last probe failed too");
    feed(&mut sup, m(2), &[ready()]);
    assert_eq!(terminated(&sup), [(addr(F), m(1))]);
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_fails_while_its_only_peer_is_unproven_keeps_its_sockets_until_one_is_up() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2)]));
    // Agent start: m2 not probed yet (unknown, served), m1 down.
    feed(&mut sup, m(1), &[refused()]);
    assert_eq!(state(&sup, m(1)), State::Down);
    assert_eq!(terminated(&sup), [], "an unprobed backend is not known to take them");
    feed(&mut sup, m(2), &[ready()]);
    assert_eq!(terminated(&sup), [(addr(F), m(1))], "stuck on a dead master: moved once m2 is up");
}

#[tokio::test(start_paused = true)]
async fn deferred_terminations_resume_when_a_master_comes_back() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    for b in [m(1), m(2)] {
        feed(&mut sup, b, &[not_ready(), not_ready()]);
    }
    feed(&mut sup, m(3), &[refused(), refused()]);
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert_eq!(terminated(&sup), []);
    // m1 recovers: m3 is dead, its sockets move at once; m2 only answers "not ready", so its
    // sockets get a whole drain time from now (the deferred drain helped nobody).
    feed(&mut sup, m(1), &[ready(), ready()]);
    assert_eq!(state(&sup, m(1)), State::Up);
    let back = Instant::now();
    assert_eq!(terminated(&sup), [(addr(F), m(3))]);
    run_deadlines_for(&mut sup, DRAIN - Duration::from_millis(1)).await;
    assert_eq!(terminated(&sup), [(addr(F), m(3))]);
    run_deadlines_for(&mut sup, Duration::from_secs(1)).await;
    let t = &sup.terminator().terminated;
    assert_eq!((t.last().unwrap().1, t.last().unwrap().0 - back), ((addr(F), m(2)), DRAIN), "{t:?}");
}

// Rule 5: a master removed from the config (or from discovery) loses its sockets after the
// drain time, and keeps its backend id until none refers to it.

fn id_of(sup: &Sup, backend: SocketAddr) -> Option<u32> {
    sup.table().state.backends.iter().find(|(_, b)| **b == backend_of(backend)).map(|(id, _)| *id)
}

#[tokio::test(start_paused = true)]
async fn a_removed_master_loses_its_sockets_after_the_drain_time() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    let removed = Instant::now();
    sup.replace_config(config(&[F], &[m(1), m(2)]));
    assert_eq!(live(&sup, F), [m(1), m(2)]);
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    let t = &sup.terminator().terminated;
    assert_eq!(
        t.iter().map(|(at, p, n)| (*at - removed, *p, *n)).collect::<Vec<_>>(),
        [(DRAIN, (addr(F), m(3)), SOCKETS)]
    );
}

#[tokio::test(start_paused = true)]
async fn a_master_removed_and_added_back_within_the_drain_time_keeps_its_sockets() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    sup.replace_config(config(&[F], &[m(1), m(2)]));
    advance(Duration::from_secs(3)).await;
    sup.replace_config(config(&[F], &[m(1), m(2), m(3)]));
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert_eq!(terminated(&sup), []);
}

#[tokio::test(start_paused = true)]
async fn removed_masters_keep_their_sockets_until_a_new_one_is_up() {
    // Every master replaced at once; the new one has not been probed when the drain ends.
    let mut sup = supervisor(config(&[F], &[m(1), m(2)]));
    all_up(&mut sup);
    sup.replace_config(config(&[F], &[m(3)]));
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert_eq!(terminated(&sup), []);
    feed(&mut sup, m(3), &[ready()]);
    let up = Instant::now();
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    let t: BTreeSet<(Duration, Pair)> =
        sup.terminator().terminated.iter().map(|(at, p, _)| (*at - up, *p)).collect();
    assert_eq!(t, [(DRAIN, (addr(F), m(1))), (DRAIN, (addr(F), m(2)))].into());
}

#[tokio::test(start_paused = true)]
async fn a_removed_frontend_leaves_its_sockets_alone() {
    // Nothing would take the reconnects: the frontend address is no longer served.
    let mut sup = supervisor(config(&[F, F6], &[m(1), m(2)]));
    all_up(&mut sup);
    sup.replace_config(config(&[F], &[m(1), m(2)]));
    run_deadlines_for(&mut sup, DRAIN * 3).await;
    assert_eq!(terminated(&sup), []);
    assert_eq!(sup.next_deadline(), None, "nothing left pending");
}

#[tokio::test(start_paused = true)]
async fn a_removed_masters_id_is_not_reused_while_its_sockets_live() {
    // sock_ops counts a socket's close against the backend id the connect hook recorded; a
    // new backend given that id would inherit the old sockets' decrements.
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    let old = id_of(&sup, m(3)).unwrap();
    sup.replace_config(config(&[F], &[m(1), m(2)]));
    sup.resync();
    assert_eq!(id_of(&sup, m(3)), Some(old), "kept while its sockets are open");
    // Two more changes: no slot names the old id any more either.
    sup.replace_config(config(&[F], &[m(1), m(2), m(4)]));
    sup.replace_config(config(&[F], &[m(1), m(2), m(4), m(5)]));
    assert_eq!(id_of(&sup, m(3)), Some(old));
    assert!(![id_of(&sup, m(4)), id_of(&sup, m(5))].contains(&Some(old)));
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert_eq!(terminated(&sup), [(addr(F), m(3))]);
    sup.resync();
    assert_eq!(id_of(&sup, m(3)), None, "freed once no socket refers to it");
}

// Rule 2: one lost probe connection is a suspicion, not a verdict: the backend takes no new
// connections, and the immediate reconnect decides.

fn lost() -> ProbeEvent {
    ProbeEvent::ConnectionLost { failure: ProbeFailure::Abandoned { phase: Phase::Idle } }
}
fn connect_timeout() -> ProbeEvent {
    ProbeEvent::Failed {
        failure: ProbeFailure::Timeout { phase: Phase::Connect },
        latency: Duration::from_millis(2250),
    }
}

#[tokio::test(start_paused = true)]
async fn one_lost_probe_connection_terminates_nothing() {
    // A 2 s VM pause or a bond failover: every node of the cluster loses its probe connection
    // to this master in the same second.
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    feed(&mut sup, m(1), &[lost()]);
    assert_eq!(state(&sup, m(1)), State::Suspect);
    assert_eq!(live(&sup, F), [m(2), m(3)], "no new connections while suspect");
    assert_eq!(terminated(&sup), []);
    let shown: Vec<u8> = sup.table().statuses.values().map(|s| s.state).collect();
    assert!(shown.contains(&kha_common::PROBE_SUSPECT), "kha status shows it: {shown:?}");
    let p1 = sup.snapshot().pairs.into_iter().find(|p| p.backend == m(1)).unwrap();
    assert_eq!((p1.state, p1.serving), (State::Suspect, false), "and so do the metrics");
    // The reconnect finds it ready again: back at once, not after `rise` probes.
    feed(&mut sup, m(1), &[ready()]);
    assert_eq!(state(&sup, m(1)), State::Up);
    assert_eq!(live(&sup, F), [m(1), m(2), m(3)]);
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert_eq!(terminated(&sup), []);
}

#[tokio::test(start_paused = true)]
async fn a_failed_reconnect_confirms_the_loss() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    feed(&mut sup, m(1), &[lost()]);
    assert_eq!(terminated(&sup), []);
    feed(&mut sup, m(1), &[connect_timeout()]);
    assert_eq!(state(&sup, m(1)), State::Down);
    assert_eq!(terminated(&sup), [(addr(F), m(1))]);
}

#[tokio::test(start_paused = true)]
async fn a_probe_whose_connection_dies_under_it_is_a_suspicion_too() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2)]));
    all_up(&mut sup);
    let reset = ProbeEvent::Failed { failure: ProbeFailure::Reset, latency: Duration::from_millis(1) };
    feed(&mut sup, m(1), &[reset]);
    assert_eq!(live(&sup, F), [m(2)]);
    assert_eq!(terminated(&sup), []);
    feed(&mut sup, m(1), &[refused()]);
    assert_eq!(terminated(&sup), [(addr(F), m(1))], "the reconnect was refused: the process is dead");
}

// Rule 3: the agent's own resource errors are not the master's fault.

fn local(errno: i32) -> ProbeEvent {
    let failure = ProbeFailure::Io {
        kind: std::io::Error::from_raw_os_error(errno).kind(),
        errno: Some(crate::probe::Errno(errno)),
    };
    ProbeEvent::Failed { failure, latency: Duration::from_micros(10) }
}

#[tokio::test(start_paused = true)]
async fn local_resource_errors_change_no_state() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2)]));
    feed(&mut sup, m(2), &[local(libc::EMFILE)]);
    assert_eq!(state(&sup, m(2)), State::Unknown, "not even a first result");
    all_up(&mut sup);
    for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM, libc::EADDRNOTAVAIL] {
        feed(&mut sup, m(1), &[local(e), local(e)]);
    }
    assert_eq!(state(&sup, m(1)), State::Up);
    assert_eq!(live(&sup, F), [m(1), m(2)]);
    assert_eq!(terminated(&sup), []);
    let counted = |error: &str| {
        let labels = crate::observe::LocalErrorLabels { backend: m(1).to_string(), error: error.into() };
        sup.settings.recorders.probe_local_errors.get_or_create(&labels).get()
    };
    assert_eq!(
        (counted("EMFILE"), counted("EADDRNOTAVAIL")),
        (2, 2),
        "counted in kha_probe_local_errors_total"
    );
    // Nor do they count towards `fall` between two real failures.
    feed(&mut sup, m(1), &[timeout(), local(libc::EMFILE), ready()]);
    assert_eq!(state(&sup, m(1)), State::Up);
    // A suspect stays suspect: the reconnect did not happen, nothing is known.
    feed(&mut sup, m(1), &[lost(), local(libc::EADDRNOTAVAIL)]);
    assert_eq!(live(&sup, F), [m(2)]);
    assert_eq!(terminated(&sup), []);
}

// Rule 9-5: 401 means the apiserver is alive and serving; only /readyz is unreadable.

#[tokio::test(start_paused = true)]
async fn masters_that_refuse_anonymous_probes_are_served_as_up_and_say_why() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2)]));
    let unauthorized = ProbeEvent::Failed {
        failure: ProbeFailure::Status { code: 401, line: "{\"kind\":\"Status\"".into() },
        latency: Duration::from_millis(2),
    };
    for _ in 0..3 {
        feed(&mut sup, m(1), std::slice::from_ref(&unauthorized));
        feed(&mut sup, m(2), std::slice::from_ref(&unauthorized));
    }
    assert_eq!((state(&sup, m(1)), state(&sup, m(2))), (State::Up, State::Up));
    assert_eq!(live(&sup, F), [m(1), m(2)]);
    assert_eq!(sup.snapshot().fallback.get(&addr(F)), Some(&false));
    let st = sup.table().statuses.values().next().unwrap();
    let reason = String::from_utf8_lossy(&st.reason);
    assert!(reason.starts_with("probe not authorized (401): "), "kha status shows why: {reason}");
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert_eq!(terminated(&sup), []);
}

#[tokio::test(start_paused = true)]
async fn a_backend_only_discovery_names_is_served_after_its_first_passed_probe() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2)]));
    all_up(&mut sup);
    // Discovery adds m3 (named by nobody else) and m4, which the operator vouches for.
    let only: BTreeSet<SocketAddr> = [m(3)].into();
    sup.replace_config_from(config(&[F], &[m(1), m(2), m(3), m(4)]), &only);
    assert_eq!(state(&sup, m(3)), State::Unproven);
    assert_eq!(state(&sup, m(4)), State::Unknown);
    assert_eq!(live(&sup, F), vec![m(1), m(2), m(4)], "not served before a probe passed");
    let shown: Vec<(u8, u8)> = sup.table().statuses.values().map(|s| (s.state, s.serving)).collect();
    assert!(shown.contains(&(kha_common::PROBE_UNPROVEN, 0)), "kha status shows it: {shown:?}");
    assert!(!sup.api_candidates().contains(&m(3)), "discovery does not ask it either");
    // Every vouched backend down: the fallback serves them, not the unproven one.
    for b in [m(1), m(2), m(4)] {
        feed(&mut sup, b, &[refused(), refused()]);
    }
    assert_eq!(live(&sup, F), vec![m(1), m(2), m(4)]);
    assert!(sup.snapshot().fallback[&addr(F)]);
    // Its first probe passes: served, and the fallback is over.
    feed(&mut sup, m(3), &[ready()]);
    assert_eq!(state(&sup, m(3)), State::Up);
    assert_eq!(live(&sup, F), vec![m(3)]);
    // The same config again (a repeated discovery) changes nothing for it.
    sup.replace_config_from(config(&[F], &[m(1), m(2), m(3), m(4)]), &only);
    assert_eq!(state(&sup, m(3)), State::Up);
}
