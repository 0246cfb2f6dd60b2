//! The supervisor against a table and a set of sockets in memory, with paused time: what the
//! backend table serves and which sockets are terminated, when, after each probe event.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use kha_common::{Backend, ProbeKey, ProbeStatus, ServiceKey, socket_addr};
use tokio::time::{Instant, advance};

use super::*;
use crate::probe::test_events::{not_ready, ready, refused, timeout};
use crate::{
    config::Config,
    health::DEFAULT_HYSTERESIS,
    probe::{Phase, ProbeFailure},
    table::{Op, Snapshot},
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
    /// A client whose connection is ended reconnects at once, to the least loaded other
    /// backend of the frontend (least-connections, as the kernel would place it).
    reconnect: bool,
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
    fn terminate_oldest(&mut self, pair: &Pair, n: usize) -> Result<usize, Never> {
        let open = self.open.entry(*pair).or_insert(0);
        let n = n.min(*open);
        *open -= n;
        self.terminated.push((Instant::now(), *pair, n));
        if self.reconnect {
            let least =
                self.open.iter().filter(|((f, b), _)| *f == pair.0 && *b != pair.1).min_by_key(|(_, n)| **n);
            if let Some((p, _)) = least.map(|(p, n)| (*p, *n)) {
                *self.open.get_mut(&p).unwrap() += n;
            }
        }
        Ok(n)
    }
    fn open_per_pair(&self) -> Result<BTreeMap<Pair, usize>, Never> {
        Ok(self.open.clone())
    }
}

type Sup = Supervisor<FakeTable, FakeSockets>;

/// A supervisor for `config` whose table already serves it (as the binary's first sync does)
/// and whose every pair holds [`SOCKETS`] sockets.
fn supervisor(config: Config) -> Sup {
    supervisor_with(config, |_| {})
}

/// As [`supervisor`], with settings changed by `tune` (the default ones: no fallback grace,
/// no rebalancing).
fn supervisor_with(config: Config, tune: impl FnOnce(&mut Settings)) -> Sup {
    supervisor_after(&config.clone(), config, tune)
}

/// The table a previous run left for `previous`, every pair of it holding [`SOCKETS`] sockets.
fn left_by(previous: &Config) -> (FakeTable, FakeSockets) {
    let mut table = FakeTable::default();
    sync(&mut table, &Desired::from_config(previous)).unwrap();
    let sockets = FakeSockets {
        open: pairs_of(previous).into_iter().map(|p| (p, SOCKETS)).collect(),
        ..Default::default()
    };
    (table, sockets)
}

/// A supervisor for `config` taking over what a run of `previous` left.
fn supervisor_after(previous: &Config, config: Config, tune: impl FnOnce(&mut Settings)) -> Sup {
    let (table, sockets) = left_by(previous);
    let settings = Settings {
        checked: true,
        hysteresis: DEFAULT_HYSTERESIS,
        all_down: AllDown::Fallback,
        drain: DRAIN,
        fallback_grace: Duration::ZERO,
        rebalance: None,
        recorders: Recorders::default(),
    };
    let mut settings = settings;
    tune(&mut settings);
    Supervisor::new(settings, config, table, sockets)
}

fn feed(sup: &mut Sup, backend: SocketAddr, events: &[ProbeEvent]) {
    for e in events {
        sup.observe(ProbeTarget::new(backend, "/readyz"), e.clone());
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
    sup.health(&ProbeTarget::new(backend, "/readyz")).unwrap().state
}

/// The backends new connects to `frontend` go to.
fn live(sup: &Sup, frontend: &str) -> Vec<SocketAddr> {
    let set = sup.table().state.resolve(&ServiceKey::at(addr(frontend), 0)).unwrap();
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
    assert!(sup.table().state.backends.values().any(|b| *b == Backend::from(m(1))), "kept with its id");
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
    let id = *sup.table().state.backends.iter().find(|(_, b)| **b == Backend::from(m(1))).unwrap().0;
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
    sup.table().state.backends.iter().find(|(_, b)| **b == Backend::from(backend)).map(|(id, _)| *id)
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

fn slow() -> ProbeEvent {
    ProbeEvent::Slow { waited: Duration::from_secs(1) }
}

#[tokio::test(start_paused = true)]
async fn a_probe_that_goes_unanswered_stops_new_connections_and_terminates_nothing() {
    // A hung apiserver (or one answering slowly under load): after a second without an answer
    // no new connection goes there; a slow answer brings it back, a timeout counts towards
    // `fall`, and only `fall` failures in a row take it down and move its sockets.
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    feed(&mut sup, m(1), &[slow()]);
    assert_eq!(state(&sup, m(1)), State::Suspect);
    assert_eq!(live(&sup, F), [m(2), m(3)]);
    feed(&mut sup, m(1), &[ProbeEvent::Ready { latency: Duration::from_millis(1500) }]);
    assert_eq!(live(&sup, F), [m(1), m(2), m(3)], "a slow answer is not a dead master");
    feed(&mut sup, m(1), &[slow(), timeout()]);
    assert_eq!(state(&sup, m(1)), State::Suspect, "one timeout is not a verdict");
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert_eq!(terminated(&sup), []);
    feed(&mut sup, m(1), &[slow(), timeout()]);
    assert_eq!(state(&sup, m(1)), State::Down);
    assert_eq!(terminated(&sup), [(addr(F), m(1))]);
}

#[tokio::test(start_paused = true)]
async fn a_pause_keeps_every_socket_and_a_confirmed_silence_moves_them() {
    use crate::probe::test_events::{alive, silent};
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_up(&mut sup);
    // SIGSTOP for a second and a half: unanswered, then answered after all.
    feed(&mut sup, m(1), &[slow()]);
    assert_eq!(live(&sup, F), [m(2), m(3)], "no new connections while it says nothing");
    feed(&mut sup, m(1), &[alive()]);
    assert_eq!((state(&sup, m(1)), live(&sup, F)), (State::Up, vec![m(1), m(2), m(3)]));
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert_eq!(terminated(&sup), []);
    // Hung for good: the silence confirms it, and its sockets go at once, not after `fall`.
    feed(&mut sup, m(1), &[slow(), silent()]);
    assert_eq!(state(&sup, m(1)), State::Down);
    assert_eq!(terminated(&sup), [(addr(F), m(1))]);
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

// Rule 4: recovery after all were down. The fallback ends when most masters serve again, or a
// grace time after the first did; long-lived connections are rebalanced only if asked, one at a
// time.

const GRACE: Duration = Duration::from_secs(6);

fn all_down_then(sup: &mut Sup) {
    all_up(sup);
    for b in [m(1), m(2), m(3)] {
        feed(sup, b, &[refused(), refused()]);
    }
    assert!(sup.snapshot().fallback[&addr(F)], "all down: on the fallback");
}

#[tokio::test(start_paused = true)]
async fn the_first_master_back_after_all_were_down_does_not_end_the_fallback_alone() {
    let mut sup = supervisor_with(config(&[F], &[m(1), m(2), m(3)]), |s| s.fallback_grace = GRACE);
    all_down_then(&mut sup);
    let before = terminated(&sup);
    feed(&mut sup, m(1), &[ready(), ready()]);
    assert_eq!(state(&sup, m(1)), State::Up);
    let back = Instant::now();
    assert_eq!(live(&sup, F), [m(1), m(2), m(3)], "every node's clients would land on m1 alone");
    assert!(sup.snapshot().fallback[&addr(F)]);
    run_deadlines_for(&mut sup, GRACE - Duration::from_millis(1)).await;
    assert!(sup.snapshot().fallback[&addr(F)], "still within the grace");
    assert_eq!(terminated(&sup), before, "on the fallback a reconnect could land on a dead master");
    run_deadlines_for(&mut sup, Duration::from_millis(2)).await;
    assert_eq!(live(&sup, F), [m(1)], "the others had their chance");
    assert!(!sup.snapshot().fallback[&addr(F)]);
    let (at, pair, _) = *sup.terminator().terminated.last().unwrap();
    assert_eq!((pair, at - back), ((addr(F), m(3)), GRACE), "the sockets held on dead m3 move to m1 now");
}

#[tokio::test(start_paused = true)]
async fn a_majority_back_ends_the_fallback_at_once() {
    let mut sup = supervisor_with(config(&[F], &[m(1), m(2), m(3)]), |s| s.fallback_grace = GRACE);
    all_down_then(&mut sup);
    feed(&mut sup, m(1), &[ready(), ready()]);
    feed(&mut sup, m(2), &[ready(), ready()]);
    assert_eq!(live(&sup, F), [m(1), m(2)]);
    assert!(!sup.snapshot().fallback[&addr(F)]);
}

#[tokio::test(start_paused = true)]
async fn a_master_failing_again_within_the_grace_starts_it_afresh() {
    let mut sup = supervisor_with(config(&[F], &[m(1), m(2), m(3)]), |s| s.fallback_grace = GRACE);
    all_down_then(&mut sup);
    feed(&mut sup, m(1), &[ready(), ready()]);
    run_deadlines_for(&mut sup, GRACE / 2).await;
    feed(&mut sup, m(1), &[refused(), refused()]);
    feed(&mut sup, m(1), &[ready(), ready()]);
    run_deadlines_for(&mut sup, GRACE - Duration::from_millis(1)).await;
    assert!(sup.snapshot().fallback[&addr(F)], "a fresh grace from its second return");
    run_deadlines_for(&mut sup, Duration::from_millis(2)).await;
    assert_eq!(live(&sup, F), [m(1)]);
}

#[tokio::test(start_paused = true)]
async fn without_a_grace_the_fallback_ends_with_the_first_master_back() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_down_then(&mut sup);
    feed(&mut sup, m(1), &[ready(), ready()]);
    assert_eq!(live(&sup, F), [m(1)]);
}

const EVERY: Duration = Duration::from_secs(10);

/// m1 holds 8 sockets of `F`, m2 and m3 none, all up.
fn unbalanced(rebalance: Option<Duration>) -> Sup {
    let mut sup = supervisor_with(config(&[F], &[m(1), m(2), m(3)]), |s| s.rebalance = rebalance);
    all_up(&mut sup);
    let sockets = &mut sup.terminator;
    sockets.reconnect = true;
    sockets.open = [(m(1), 8), (m(2), 0), (m(3), 0)].into_iter().map(|(b, n)| ((addr(F), b), n)).collect();
    sup
}

#[tokio::test(start_paused = true)]
async fn rebalancing_is_off_unless_asked() {
    let mut sup = unbalanced(None);
    run_deadlines_for(&mut sup, EVERY * 10).await;
    assert!(sup.terminator().terminated.is_empty());
    assert_eq!(sup.settings.recorders.rebalanced.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn rebalancing_moves_one_connection_per_interval_until_even() {
    let mut sup = unbalanced(Some(EVERY));
    run_deadlines_for(&mut sup, EVERY * 20).await;
    let t = &sup.terminator().terminated;
    // 8,0,0 -> 7,1,0 -> 6,1,1 -> 5,2,1 -> 4,2,2 -> 3,3,2: five moves, each of one socket off
    // the most loaded master, and then nothing.
    let moved: Vec<(SocketAddr, usize)> = t.iter().map(|(_, (_, b), n)| (*b, *n)).collect();
    assert_eq!(moved, [(m(1), 1); 5], "{t:?}");
    let mut loads: Vec<usize> = sup.terminator().open.values().copied().collect();
    loads.sort();
    assert_eq!(loads, [2, 3, 3]);
    let gaps: Vec<Duration> = t.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(
        gaps.iter().all(|g| *g >= EVERY.mul_f64(0.8) && *g <= EVERY.mul_f64(1.2)),
        "one per interval: {gaps:?}"
    );
    assert_eq!(sup.settings.recorders.rebalanced.get(), 5);
}

#[tokio::test(start_paused = true)]
async fn rebalancing_waits_while_the_frontend_is_on_the_fallback() {
    let mut sup = unbalanced(Some(EVERY));
    for b in [m(1), m(2), m(3)] {
        feed(&mut sup, b, &[refused(), refused()]);
    }
    run_deadlines_for(&mut sup, EVERY * 5).await;
    assert_eq!(sup.settings.recorders.rebalanced.get(), 0, "nowhere better to go");
}

#[test]
fn rebalancing_never_sends_a_connection_towards_a_master_in_doubt() {
    let config = config(&[F], &[m(1), m(2), m(3)]);
    let target = |b| ProbeTarget::new(b, "/readyz");
    let mut health = BTreeMap::new();
    let now = std::time::SystemTime::UNIX_EPOCH;
    for b in [m(1), m(2), m(3)] {
        let mut h = BackendHealth::new(true, now);
        h.observe(&ready(), DEFAULT_HYSTERESIS, now);
        health.insert(target(b), h);
    }
    let open: BTreeMap<Pair, usize> =
        [(m(1), 6), (m(2), 0), (m(3), 1)].into_iter().map(|(b, n)| ((addr(F), b), n)).collect();
    let none = BTreeSet::new();
    let desired =
        |h: &BTreeMap<ProbeTarget, BackendHealth>| desired_state(&config, h, AllDown::Fallback, &none).0;
    let moves =
        |h: &BTreeMap<ProbeTarget, BackendHealth>| rebalance::moves(&config, h, &desired(h), &none, &open);
    let one = |toward, to| vec![rebalance::Move { pair: (addr(F), m(1)), from: 6, toward, to }];
    assert_eq!(moves(&health), one(m(2), 0));
    // m2's last probe failed (up, by hysteresis): in doubt, so the move goes to m3.
    health.get_mut(&target(m(2))).unwrap().observe(&timeout(), DEFAULT_HYSTERESIS, now);
    assert_eq!(state_of(&health, m(2)), State::Up);
    assert_eq!(moves(&health), one(m(3), 1));
    // m3 down as well: m1 is the only proven master left, nothing to move.
    health.get_mut(&target(m(3))).unwrap().observe(&refused(), DEFAULT_HYSTERESIS, now);
    health.get_mut(&target(m(3))).unwrap().observe(&refused(), DEFAULT_HYSTERESIS, now);
    assert_eq!(moves(&health), []);
    // On the fallback nothing moves, whatever the loads.
    let fallback: BTreeSet<SocketAddr> = [addr(F)].into();
    let d = desired(&health);
    assert_eq!(rebalance::moves(&config, &health, &d, &fallback, &open), []);
}

fn state_of(health: &BTreeMap<ProbeTarget, BackendHealth>, b: SocketAddr) -> State {
    health[&ProbeTarget::new(b, "/readyz")].state
}

#[tokio::test(start_paused = true)]
async fn sockets_a_previous_run_left_on_a_master_no_longer_configured_end_after_the_drain() {
    // The last run served m1..m3 and m4; m4 left the config while no agent ran. The binary's
    // first sync kept m4's entry (its sockets are in KHA_CONNS).
    let before = config(&[F], &[m(1), m(2), m(3), m(4)]);
    let (table, _) = left_by(&before);
    let id = table.state.backends.iter().find(|(_, b)| **b == Backend::from(m(4))).map(|(id, _)| *id);
    let mut sup = supervisor_after(&before, config(&[F], &[m(1), m(2), m(3)]), |_| {});
    assert_eq!(id_of(&sup, m(4)), id, "its id stays taken while its sockets live");
    assert!(!live(&sup, F).contains(&m(4)));
    all_up(&mut sup);
    let start = Instant::now();
    run_deadlines_for(&mut sup, DRAIN - Duration::from_millis(1)).await;
    assert_eq!(terminated(&sup), [], "the drain time first");
    run_deadlines_for(&mut sup, Duration::from_millis(2)).await;
    assert_eq!(terminated(&sup), [(addr(F), m(4))]);
    assert!(sup.terminator().terminated.last().unwrap().0 - start >= DRAIN);
}

#[tokio::test(start_paused = true)]
async fn a_master_on_its_way_back_keeps_its_sockets_when_another_comes_back_first() {
    // Every master hung at once, then all resumed: m1 is proven up first; m3's own probe has
    // passed too (rise not reached yet). Resetting m3's sockets onto m1 would, on every node,
    // pile the watches onto whichever master answered first.
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_down_then(&mut sup);
    let before = terminated(&sup);
    assert!(!before.contains(&(addr(F), m(3))), "held while all were down");
    feed(&mut sup, m(3), &[ready()]);
    feed(&mut sup, m(1), &[ready(), ready()]);
    assert_eq!(state(&sup, m(1)), State::Up);
    assert_eq!(terminated(&sup), before, "m3 is coming back: its sockets stay");
    feed(&mut sup, m(3), &[ready()]);
    assert_eq!(state(&sup, m(3)), State::Up);
    run_deadlines_for(&mut sup, DRAIN * 2).await;
    assert_eq!(terminated(&sup), before);
}

#[tokio::test(start_paused = true)]
async fn a_master_that_fails_again_on_its_way_back_loses_its_sockets() {
    let mut sup = supervisor(config(&[F], &[m(1), m(2), m(3)]));
    all_down_then(&mut sup);
    let before = terminated(&sup);
    feed(&mut sup, m(3), &[ready()]);
    feed(&mut sup, m(1), &[ready(), ready()]);
    assert_eq!(terminated(&sup), before);
    feed(&mut sup, m(3), &[refused()]);
    let mut want = before;
    want.push((addr(F), m(3)));
    assert_eq!(terminated(&sup), want, "the wait ends with a failed probe");
}
