//! Per-backend health from probe events: rise/fall hysteresis, and the live set each frontend
//! serves. Pure: the agent feeds events in and applies what comes out.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use kha_common::{
    FRONTEND_FALLBACK, PROBE_DOWN, PROBE_DRAINING, PROBE_REASON_LEN, PROBE_SUSPECT, PROBE_UNCHECKED,
    PROBE_UNKNOWN, PROBE_UNPROVEN, PROBE_UP, ProbeKey, ProbeStatus,
};

use crate::{
    config::{Config, Frontend},
    endpoints::{Desired, backend_of, key_of},
    probe::{ProbeEvent, ProbeFailure},
};

/// Hysteresis: how many probes in a row turn a backend up or down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    pub rise: u32,
    pub fall: u32,
}

/// Two in a row, as kubespray's haproxy (`rise 2 fall 2`): one lost probe does not flap the
/// set, and with 2 s probes a failing master leaves within about 4 s even without the faster
/// paths (a lost probe connection, a failed connect marked in the kernel).
pub const DEFAULT_HYSTERESIS: Hysteresis = Hysteresis { rise: 2, fall: 2 };

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// No probe result yet: served, so a (re)starting agent never shrinks the set on its own.
    Unknown,
    Up,
    /// Failing in a way that says the process or the path is gone: sockets are terminated now.
    Down,
    /// Answering, but not ready (graceful shutdown, etcd trouble): no new connections, and
    /// existing ones are terminated after the drain time.
    Draining,
    /// Up until a moment ago, and then its probe connection was lost (closed, reset, or
    /// abandoned by TCP), a request went unanswered for a moment, or it answered "not ready"
    /// once: no new connections, existing ones kept. A ready answer (for a silence, any
    /// answer) makes it up again; a failed reconnect, a confirmed silence or `--fall` failures
    /// confirm it down or draining. One lost keepalive or a pause (a VM paused for a second,
    /// a bond failover) is seen by every node in the same second: a verdict on it alone would
    /// terminate every socket to that master cluster-wide.
    Suspect,
    /// Health checks are off.
    Unchecked,
    /// Named only by discovery (neither configured nor in the set the last run persisted) and
    /// no probe has passed yet: not served, and not part of the all-down fallback either.
    /// Whoever can write an EndpointSlice must not be able to steer a single connection to an
    /// address that never answered a verified TLS probe. The first result decides, as for
    /// `Unknown`: a pass is up at once (the probe verified the cluster CA's certificate for
    /// that very address, which is what a newcomer has to prove; waiting `rise` probes would
    /// only delay a joining master), a failure is down, and from down `rise` passes bring it up.
    Unproven,
}

impl State {
    pub fn code(self) -> u8 {
        match self {
            State::Unknown => PROBE_UNKNOWN,
            State::Up => PROBE_UP,
            State::Down => PROBE_DOWN,
            State::Draining => PROBE_DRAINING,
            State::Suspect => PROBE_SUSPECT,
            State::Unchecked => PROBE_UNCHECKED,
            State::Unproven => PROBE_UNPROVEN,
        }
    }

    pub fn serves(self) -> bool {
        matches!(self, State::Unknown | State::Up | State::Unchecked)
    }
}

/// What a probe event changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// Left the live set; terminate its sockets now.
    WentDown,
    /// Left the live set but still answers; terminate its sockets after the drain time.
    WentDraining,
    /// Left the live set on a lost probe connection; keep its sockets until the reconnect says.
    WentSuspect,
    WentUp,
}

/// Why a backend is [`State::Suspect`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Suspicion {
    /// Its probe connection was lost: the reconnect's result decides.
    Lost,
    /// A request went unanswered for a while ([`ProbeEvent::Slow`]): any answer clears it
    /// ([`ProbeEvent::Alive`] too), failures count towards `fall` as usual, and only a
    /// confirmed silence ([`ProbeFailure::Silent`]) takes it down at once. A slow answer is
    /// not a dead master, and one probe timeout must not terminate a socket.
    Slow,
    /// It answered "not ready" once: a ready answer clears it, `fall` of them in a row make
    /// it draining. An apiserver in graceful shutdown says so at once (its `/readyz` fails
    /// before it stops serving), and new connections should go elsewhere from that answer on.
    NotReady,
}

#[derive(Clone, Debug)]
pub struct BackendHealth {
    pub state: State,
    successes: u32,
    failures: u32,
    pub last_failure: Option<String>,
    pub last_latency: Option<Duration>,
    pub since: SystemTime,
    /// The last probe was answered 401 (counted as up, readiness unknown).
    pub unauthorized: Option<u16>,
    /// Configured, persisted by the last run, or passed a probe since: may be served by the
    /// all-down fallback. A backend only discovery names is not, until a probe passed.
    vouched: bool,
    /// Why it is suspect, while it is.
    suspect: Option<Suspicion>,
}

impl BackendHealth {
    pub fn new(checked: bool, now: SystemTime) -> Self {
        let state = if checked { State::Unknown } else { State::Unchecked };
        Self {
            state,
            successes: 0,
            failures: 0,
            last_failure: None,
            last_latency: None,
            since: now,
            unauthorized: None,
            vouched: true,
            suspect: None,
        }
    }

    /// A backend only discovery names: [`State::Unproven`] until a probe passes.
    pub fn discovered(now: SystemTime) -> Self {
        Self { state: State::Unproven, vouched: false, ..Self::new(true, now) }
    }

    /// Configured, persisted, or it passed a probe: the all-down fallback may serve it.
    pub fn vouched(&self) -> bool {
        self.vouched
    }

    /// The operator now names it (a SIGHUP put a discovered master into the static list): it
    /// is treated as configured from here on.
    pub fn vouch(&mut self) {
        self.vouched = true;
        if self.state == State::Unproven {
            self.state = State::Unknown;
        }
    }

    /// Up (or unchecked) and its last probe passed: proven able to take over connections.
    /// An up backend whose last probe failed may be failing with the others (a broken
    /// network on this node fails them all, one after the other).
    pub fn proven(&self) -> bool {
        matches!(self.state, State::Up | State::Unchecked) && self.failures == 0
    }

    /// Down or draining, and its last probe passed: on its way back (`rise` not reached yet).
    pub fn recovering(&self) -> bool {
        matches!(self.state, State::Down | State::Draining) && self.successes > 0
    }

    /// Applies one probe event. The first result decides at once; after that `rise`/`fall`
    /// results in a row are needed, except that a lost probe connection (the master's process
    /// died, or it went silent) makes an up backend suspect at once, and the next result (the
    /// prober's immediate reconnect) decides: ready is up again, a failure is down (or
    /// draining, if it answers not ready).
    pub fn observe(&mut self, event: &ProbeEvent, h: Hysteresis, now: SystemTime) -> Change {
        let (failure, latency) = match event {
            ProbeEvent::Slow { waited } => {
                // An up backend whose probe says nothing takes no new connections until the
                // answer or the silence says more; its sockets are kept either way.
                if self.state != State::Up {
                    return Change::None;
                }
                self.last_failure = Some(format!("no answer to its probe for {:.1} s", waited.as_secs_f64()));
                return self.become_suspect(Suspicion::Slow, now);
            }
            ProbeEvent::Alive { .. } => {
                // The process answered after all; readiness has its own results.
                if self.suspect != Some(Suspicion::Slow) {
                    return Change::None;
                }
                self.last_failure = None;
                return self.transition(State::Up, now);
            }
            ProbeEvent::Ready { latency } => (None, Some(*latency)),
            ProbeEvent::Failed { failure, latency } => (Some(failure), Some(*latency)),
            ProbeEvent::ConnectionLost { failure } => (Some(failure), None),
        };
        if let Some(f) = failure.filter(|f| f.is_local()) {
            // This node ran short of descriptors, memory or ports: nothing was learnt about the
            // master, so nothing changes (a node in trouble must not take masters out).
            self.last_failure = Some(format!("on this node, not the master: {f}"));
            return Change::None;
        }
        self.unauthorized = failure.and_then(ProbeFailure::not_authorized);
        if let Some(code) = self.unauthorized {
            // Alive and serving: up for the purpose of health, with the reason in sight.
            self.last_failure = Some(not_authorized_reason(code));
            return self.succeeded(h, latency, now);
        }
        let Some(failure) = failure else { return self.succeeded(h, latency, now) };
        self.last_failure = Some(failure.to_string());
        if latency.is_some() {
            self.last_latency = latency;
        }
        self.failures += 1;
        self.successes = 0;
        let down = if still_answers(failure) { State::Draining } else { State::Down };
        let lost = matches!(event, ProbeEvent::ConnectionLost { .. }) || failure.connection_died();
        let silent = failure.confirms_gone();
        let counting = matches!(self.suspect, Some(Suspicion::Slow | Suspicion::NotReady));
        let next = match self.state {
            State::Unknown | State::Unproven => down,
            // Confirmed gone: nothing answered for the whole silence.
            _ if silent => State::Down,
            State::Up if lost => return self.become_suspect(Suspicion::Lost, now),
            State::Up if self.failures >= h.fall => down,
            State::Up if down == State::Draining => return self.become_suspect(Suspicion::NotReady, now),
            // Slow or not ready, then failed: counts towards `fall` like any failed probe.
            State::Suspect if counting && self.failures < h.fall => State::Suspect,
            // The reconnect failed too: confirmed.
            State::Suspect => down,
            // A draining master whose process then dies is down: stop waiting for the drain.
            State::Draining if down == State::Down => State::Down,
            s => s,
        };
        self.transition(next, now)
    }

    fn become_suspect(&mut self, why: Suspicion, now: SystemTime) -> Change {
        let change = self.transition(State::Suspect, now);
        self.suspect = Some(why);
        change
    }

    fn succeeded(&mut self, h: Hysteresis, latency: Option<Duration>, now: SystemTime) -> Change {
        if latency.is_some() {
            self.last_latency = latency;
        }
        self.successes += 1;
        self.failures = 0;
        // A verified TLS handshake with this address (a 401 too: the server certificate was
        // checked before the answer was read).
        self.vouched = true;
        let next = match self.state {
            // A suspect was up until a moment ago: one good reconnect clears it. A newcomer's
            // first pass is the proof it had to give.
            State::Unknown | State::Suspect | State::Unproven => State::Up,
            State::Down | State::Draining if self.successes >= h.rise => State::Up,
            s => s,
        };
        self.transition(next, now)
    }

    fn transition(&mut self, next: State, now: SystemTime) -> Change {
        if next == self.state {
            return Change::None;
        }
        let was_serving = self.state.serves();
        if next != State::Suspect {
            self.suspect = None;
        }
        self.state = next;
        self.since = now;
        match next {
            State::Up if !was_serving => Change::WentUp,
            State::Down => Change::WentDown,
            State::Draining => Change::WentDraining,
            State::Suspect => Change::WentSuspect,
            _ => Change::None,
        }
    }
}

/// The reason `kha status` shows for a 401 answer (at most `PROBE_REASON_LEN` bytes).
fn not_authorized_reason(code: u16) -> String {
    format!(
        "probe not authorized ({code}): readiness unchecked; give it a client cert (client_cert/--client-cert)"
    )
}

/// An answer that is not "ready" but is an answer: the process is alive and serving.
fn still_answers(f: &ProbeFailure) -> bool {
    matches!(f, ProbeFailure::Status { .. })
}

/// A frontend's live set from its configured backends and their health, and whether it fell
/// back to all of them because none is healthy. The fallback takes only vouched backends: one
/// that only discovery names and that never passed a probe is never served.
pub fn live_set(
    configured: &[SocketAddr],
    health: &BTreeMap<SocketAddr, BackendHealth>,
    all_down: AllDown,
) -> (Vec<SocketAddr>, bool) {
    let serving = serving(configured, health);
    if !serving.is_empty() || configured.is_empty() {
        return (serving, false);
    }
    let vouched = fallback_set(configured, health);
    match all_down {
        AllDown::Fallback if !vouched.is_empty() => (vouched, true),
        AllDown::Fallback | AllDown::FailClosed => (Vec::new(), false),
    }
}

fn serving(configured: &[SocketAddr], health: &BTreeMap<SocketAddr, BackendHealth>) -> Vec<SocketAddr> {
    configured.iter().copied().filter(|b| health.get(b).is_none_or(|h| h.state.serves())).collect()
}

/// What the all-down fallback serves: every vouched backend.
fn fallback_set(configured: &[SocketAddr], health: &BTreeMap<SocketAddr, BackendHealth>) -> Vec<SocketAddr> {
    configured.iter().copied().filter(|b| health.get(b).is_none_or(BackendHealth::vouched)).collect()
}

/// Whether most of a frontend's vouched backends serve again: then a frontend that was on the
/// all-down fallback leaves it at once, since the reconnecting clients spread over a majority.
pub fn quorum_serves(configured: &[SocketAddr], health: &BTreeMap<SocketAddr, BackendHealth>) -> bool {
    let vouched = fallback_set(configured, health);
    let serving = serving(configured, health).iter().filter(|b| vouched.contains(b)).count();
    serving * 2 > vouched.len()
}

/// The masters discovery may reach the API on directly, best first: the backends of the
/// frontends discovery feeds, proven up ones first, then up, then not yet probed, then the
/// failing ones (a probe can fail for reasons of its own; the API client verifies TLS anyway).
/// Never one that only discovery names and no probe vouched for: discovery must not learn the
/// next set from an address the last (perhaps forged) set brought in.
///
/// Within a rank the config order is rotated by `spread` (a per-node value, [`node_spread`]):
/// in the same order on every node, every node's watch would go to the same master, and when
/// it failed every node would move to the same next one in the same second.
pub fn api_candidates(
    config: &Config,
    health: &BTreeMap<ProbeTarget, BackendHealth>,
    spread: u64,
) -> Vec<SocketAddr> {
    let mut ranked: BTreeMap<SocketAddr, u8> = BTreeMap::new();
    let mut order = Vec::new();
    for f in config.frontends.iter().filter(|f| f.discover) {
        for b in &f.backends {
            let rank = match health.get(&(*b, f.health_path.clone())) {
                None => Some(2),
                Some(h) if !h.vouched => None,
                Some(h) if h.proven() => Some(0),
                Some(h) if h.state == State::Up => Some(1),
                Some(h) if h.state.serves() => Some(2),
                Some(_) => Some(3),
            };
            let Some(rank) = rank else { continue };
            match ranked.get_mut(b) {
                Some(r) => *r = (*r).min(rank),
                None => {
                    ranked.insert(*b, rank);
                    order.push(*b);
                }
            }
        }
    }
    // Stable: within a rank, in config order (static masters first), then rotated.
    order.sort_by_key(|b| ranked[b]);
    for group in order.chunk_by_mut(|a, b| ranked[a] == ranked[b]) {
        let k = group.len() as u64;
        group.rotate_left((spread % k) as usize);
    }
    order
}

/// A value of this node's own, the same across agent restarts: a hash (FNV-1a, fixed, unlike
/// std's per-process keys) of the host name, 0 if it cannot be read.
pub fn node_spread() -> u64 {
    let name = std::fs::read("/proc/sys/kernel/hostname").unwrap_or_default();
    name.trim_ascii()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100_0000_01b3))
}

/// A configured backend as the probes see it: its address and the path probed on it (one
/// backend may serve two frontends with different paths).
pub type ProbeTarget = (SocketAddr, String);

/// The health of a frontend's backends, by address.
pub fn frontend_health(
    f: &Frontend,
    health: &BTreeMap<ProbeTarget, BackendHealth>,
) -> BTreeMap<SocketAddr, BackendHealth> {
    f.backends.iter().filter_map(|b| Some((*b, health.get(&(*b, f.health_path.clone()))?.clone()))).collect()
}

/// The backend table and the status records for a config and the health of its backends.
///
/// Frontends in `held` stay on the all-down fallback although a backend serves again (the
/// supervisor's grace after all were down: see `supervise::fallback`).
pub fn desired_state(
    config: &Config,
    health: &BTreeMap<ProbeTarget, BackendHealth>,
    all_down: AllDown,
    held: &BTreeSet<SocketAddr>,
) -> (Desired, BTreeMap<ProbeKey, ProbeStatus>) {
    let mut desired = Desired::from_config(config);
    let mut statuses = BTreeMap::new();
    for f in &config.frontends {
        let by_addr = frontend_health(f, health);
        let (live, fallback) = match held.contains(&f.address) {
            true => (fallback_set(&f.backends, &by_addr), true),
            false => live_set(&f.backends, &by_addr, all_down),
        };
        let entry = desired.frontends.get_mut(&key_of(f.address, 0)).expect("from the same config");
        entry.backends = live.iter().map(|b| backend_of(*b)).collect();
        entry.flags = if fallback { FRONTEND_FALLBACK } else { 0 };
        for b in &f.backends {
            if !live.contains(b) {
                desired.keep.insert(backend_of(*b));
            }
            let fk = key_of(f.address, 0);
            let bk = backend_of(*b);
            let key = ProbeKey {
                frontend_addr_be: fk.addr_be,
                backend_addr_be: bk.addr_be,
                frontend_port_be: fk.port_be,
                backend_port_be: bk.port_be,
            };
            statuses.insert(key, probe_status(by_addr.get(b), live.contains(b)));
        }
    }
    (desired, statuses)
}

fn probe_status(h: Option<&BackendHealth>, serving: bool) -> ProbeStatus {
    let mut reason = [0u8; PROBE_REASON_LEN];
    let (state, latency_us, since) = match h {
        Some(h) => {
            if let Some(r) = &h.last_failure {
                // Cut on a character boundary so status never shows half a character.
                let mut end = r.len().min(PROBE_REASON_LEN);
                while !r.is_char_boundary(end) {
                    end -= 1;
                }
                reason[..end].copy_from_slice(&r.as_bytes()[..end]);
            }
            let latency = h.last_latency.map_or(0, |l| l.as_micros().min(u32::MAX as u128) as u32);
            let since = h.since.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            (h.state.code(), latency, since)
        }
        None => (PROBE_UNKNOWN, 0, 0),
    };
    ProbeStatus { state, serving: serving as u8, _pad: [0; 2], latency_us, since_unix_s: since, reason }
}

/// What a frontend serves when every backend is unhealthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AllDown {
    /// All configured backends: a broken probe (a wrong CA, a network policy) must not cut the
    /// node off from the API.
    Fallback,
    /// None: connects fail at once with EHOSTUNREACH.
    FailClosed,
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let path = |b: SocketAddr| (b, "/readyz".to_string());
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
            (1..=3).map(|i| ((m(i), "/readyz".to_string()), proven())).collect();
        // Three nodes with spreads 0, 1, 2 ask three different masters first, and each has all.
        let firsts: Vec<Vec<SocketAddr>> = (0..3).map(|s| api_candidates(&config, &all, s)).collect();
        assert_eq!(firsts, [vec![m(1), m(2), m(3)], vec![m(2), m(3), m(1)], vec![m(3), m(1), m(2)]]);
        // m2 fails: the rotation is within the proven rank only; m2 comes last on every node.
        let mut health = all.clone();
        health.insert((m(2), "/readyz".to_string()), run(&[refused()]).0);
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
        for before in
            [vec![ready()], vec![ready(), slow()], vec![ready(), lost()], vec![ready(), not_ready()]]
        {
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
        down.observe(&not_ready(), H, SystemTime::UNIX_EPOCH);
        health.insert((a, "/readyz".to_string()), down);
        let (desired, statuses) = desired_state(&config, &health, AllDown::Fallback, &BTreeSet::new());
        let f = desired.frontends.values().next().unwrap();
        assert_eq!(f.backends, vec![backend_of("192.0.2.12:6443".parse().unwrap())]);
        assert_eq!(f.flags, 0);
        assert!(desired.keep.contains(&backend_of(a)));
        let st: Vec<&ProbeStatus> = statuses.values().collect();
        assert_eq!(st.len(), 2);
        let down = st.iter().find(|s| s.state == PROBE_DRAINING).expect("a draining entry");
        assert_eq!(down.serving, 0);
        assert!(String::from_utf8_lossy(&down.reason).contains("[-]etcd failed"));
        let unknown = st.iter().find(|s| s.state == PROBE_UNKNOWN).unwrap();
        assert_eq!(unknown.serving, 1);
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
}
