//! Per-backend health from probe events: rise/fall hysteresis, and the live set each frontend
//! serves (`live_set`). Pure: the agent feeds events in, and `table::desired` turns the health
//! into the backend table and the status records.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use kha_common::{
    PROBE_DOWN, PROBE_DRAINING, PROBE_SUSPECT, PROBE_UNCHECKED, PROBE_UNKNOWN, PROBE_UNPROVEN, PROBE_UP,
};

use crate::{
    config::Frontend,
    probe::{ProbeEvent, ProbeFailure},
};

mod live_set;
#[cfg(test)]
mod tests;

pub(crate) use live_set::fallback_set;
pub use live_set::{api_candidates, frontend_health, live_set, node_spread, quorum_serves};

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

/// A configured backend as the probes see it: its address and the path probed on it (one
/// backend may serve two frontends with different paths).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeTarget {
    pub backend: SocketAddr,
    /// The readiness path asked (`/readyz`; etcd: `/health`).
    pub path: String,
}

impl ProbeTarget {
    pub fn new(backend: SocketAddr, path: impl Into<String>) -> Self {
        ProbeTarget { backend, path: path.into() }
    }

    /// `frontend`'s probe of `backend`.
    pub fn of(frontend: &Frontend, backend: SocketAddr) -> Self {
        ProbeTarget::new(backend, frontend.health_path.clone())
    }
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
