//! Active health probes: is this master's apiserver alive, and is it ready to serve?
//!
//! The agent runs [`run`] as one tokio task per backend (on any runtime flavour). The task
//! keeps **one persistent TLS connection** to the backend and asks two questions on it, each
//! a small request rather than a handshake, so probing stays cheap at cluster scale:
//!
//! - **Alive?** Every [`ProbeSettings::interval`] (0.9 s by default, jittered by +-[`JITTER`])
//!   an `OPTIONS * HTTP/1.1`: Go's HTTP server answers it before any handler, without
//!   authentication, admission or etcd (83 us of kube-apiserver CPU against 402 us for a
//!   kept-alive `/readyz`, see docs/health.md), so its answer says only "the process serves",
//!   which is what finding a hung, paused or cut-off master needs, and a slow etcd can never
//!   delay it. Any complete HTTP response counts. Unanswered for [`SLOW_AFTER`] it is reported
//!   [`ProbeEvent::Slow`]; unanswered for [`SILENT_AFTER`], on this connection and on the
//!   reconnects after it, [`ProbeFailure::Silent`]: confirmed gone.
//! - **Ready?** `GET <path>` (`/readyz` by default, `/health` for etcd) at most every
//!   [`ProbeSettings::readiness_interval`] (1 s by default: every tick; large fleets set it
//!   longer), right after that tick's liveness answer, with [`ProbeSettings::timeout`]: a
//!   `/readyz` may take seconds while etcd is slow, and slow is not dead.
//!
//! Each result is sent as a [`ProbeEvent`], tagged with the caller's tag, on a channel the
//! probes of every backend may share; what to make of the results (rise/fall hysteresis, the
//! backend set) is the caller's business.
//!
//! - **Ready** means status 200. Anything else is [`ProbeEvent::Failed`] with the reason
//!   kept ([`ProbeFailure`]): refused, unreachable, timeout (and in which phase), reset, TLS
//!   error (with the certificate verification error), non-200 status (with the body line that
//!   says why, e.g. `[-]etcd failed: reason withheld`), malformed, oversized, closed, silent.
//! - **Verification**: the server certificate is checked against the CA of [`tls_config`]
//!   with the backend's IP address as the name (`ServerName::IpAddress`), never a DNS name.
//! - **Rotation**: the TLS config is taken from [`ProbeSettings::tls`] at each new connection,
//!   so a reloaded CA or client certificate (see [`TlsStore`]) is used from the next reconnect
//!   on; an established connection is kept (its certificate is checked against a new CA, and
//!   a warning logged if the next reconnect would fail).
//! - **Bounded**: a response (head and body) may not exceed
//!   [`ProbeSettings::max_response_bytes`]; every wait has a deadline. A slow, never-ending or
//!   garbage-spewing server costs at most one timeout and one buffer of that size.
//!   Content-Length, chunked and close-delimited bodies are read.
//! - **Losing the connection is news**: between requests the task keeps a read pending on the
//!   idle connection. A FIN or RST (the apiserver process died), a keepalive timeout or stray
//!   bytes are reported at once as [`ProbeEvent::ConnectionLost`]. The task then reconnects
//!   after [`LOST_RETRY_MIN`]..[`ProbeSettings::recheck`] (at most once per interval), and rides out
//!   [`SILENT_AFTER`] of silence, a fresh SYN every [`LOST_CONNECT_ATTEMPT`], before it reports
//!   [`ProbeFailure::Silent`]: a master paused for a moment is found alive again.
//! - **A failing master is asked again soon**, for [`DOWN_RETRY_FOR`], so a master that can
//!   serve again is found within a fraction of a second: after a failure without any answer
//!   (silent, timed out, unreachable) after [`DOWN_RETRY_MIN`]..[`DOWN_RETRY_MAX`]; a refused
//!   one (its process is restarting) or one that answered not ready after half to all of
//!   [`ProbeSettings::recheck`], which the fleet's size sets so that the restarted or
//!   recovering apiserver gets a bounded number of handshakes or `/readyz` a second from the
//!   whole fleet ([`cadence_for_fleet`]).
//! - **Clean closes are not failures**: a response with `Connection: close` (or a close within
//!   [`CLOSE_AFTER_RESPONSE_GRACE`] of a complete response) just makes the next probe
//!   reconnect. If a kept-alive connection turns out closed when a request is sent on it, the
//!   request is retried once on a new connection. A server that closes after every `OPTIONS *`
//!   gets no more of them: its readiness probes carry liveness alone.
//! - The socket is made by the caller's [`MakeSocket`] (so the agent can create it inside the
//!   network namespace it serves) and tuned here: TCP keepalive, `TCP_USER_TIMEOUT`,
//!   `TCP_NODELAY`.
//!
//! Timing of events: the first probe starts at once; each later tick an interval (jittered)
//! after the previous one. `latency` is the request's duration including connect and
//! handshake when it had to open a connection (the first probe, and after a loss).

mod conn;
mod failure;
mod files;
/// Public for the fuzz target `probe_response` (fuzz/); the agent uses it through [`run`].
pub mod http;
pub(crate) mod jitter;
mod prober;
mod reload;
pub mod socket;
mod tls;

#[cfg(test)]
pub(crate) mod test_events;
#[cfg(test)]
pub(crate) mod tests;

use std::time::Duration;

pub use failure::{Errno, Malformed, Phase, ProbeFailure, SNIPPET_BYTES, STATUS_LINE_CHARS};
pub use files::{MAX_PEM_BYTES, TlsDefaults, TlsFiles, TlsPem};
pub use jitter::JITTER;
pub use prober::{
    CLOSE_AFTER_RESPONSE_GRACE, CONFIRM_MAX, CONFIRM_MIN, DOWN_RETRY_FOR, DOWN_RETRY_MAX, DOWN_RETRY_MIN,
    HOLD_FOR, HOLD_SPREAD, LOST_CONNECT_ATTEMPT, LOST_RETRY_MIN, MIN_INTERVAL, UNACKED_CHECK,
    UNACKED_RETRANSMITS, run,
};
pub use reload::{Reload, TLS_CHECK_INTERVAL, TlsHandle, TlsPublisher, TlsStore};
pub use socket::{MakeSocket, default_socket};
pub use tls::{ProbeConfigError, ProbeTlsConfig, tls_config};

/// The path probed when a frontend does not name one: kube-apiserver's readiness endpoint,
/// which fails while the apiserver cannot serve (etcd unreachable, informers not synced,
/// graceful shutdown begun), unlike `/livez`.
pub const DEFAULT_PATH: &str = "/readyz";

/// Default time between liveness requests (before jitter), and so the bound on how late a
/// hung, paused or cut-off master is noticed: [`SLOW_AFTER`] after the first request it leaves
/// unanswered it takes no new connections, [`SILENT_AFTER`] after it its sockets move. 0.9 s
/// rather than 1 s so that the worst case, a master that hangs right after answering, is
/// moved within 3 s: the next request leaves at most 0.9 s (+[`JITTER`]) later, and a pause
/// of up to [`SILENT_AFTER`] must be ridden out from there. Each is an `OPTIONS *` on a
/// kept-alive connection: at 1,000 nodes 1,100 requests a second on each apiserver, at 83 us
/// each 0.09 of a core; a larger fleet sets it longer (`--fleet-size`, docs/health.md).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(900);

/// Default time between readiness requests (`/readyz`): every tick, so a master that stops
/// being ready (graceful shutdown, etcd gone) takes no new connections within about a second.
/// 402 us of apiserver CPU each: 0.45 of a core at 1,000 nodes; large fleets set it to 15 s,
/// haproxy's `inter`.
pub const DEFAULT_READINESS_INTERVAL: Duration = DEFAULT_INTERVAL;

/// Default [`ProbeSettings::recheck`]: a refused or not-ready master is asked again 0.15 to
/// 0.3 s after each failure, so it is back in use within 0.5 s of serving again (this wait,
/// the pass, and its confirmation within [`CONFIRM_MAX`]).
pub const DEFAULT_RECHECK: Duration = Duration::from_millis(300);

/// What each node adds to the fleet's [`ProbeSettings::recheck`] ([`cadence_for_fleet`]).
/// A node asks a failing master every 0.75 recheck on average, so this keeps one failing
/// master's rechecks from the whole fleet at about 1 / (0.75 x 0.4 ms) = 3,333 a second
/// beyond 750 nodes (fewer below). For a restarted apiserver that bounds the probes' TLS
/// handshakes (1-1.4 ms of its CPU each, docs/health.md) to about 4 cores while they last
/// (one recheck); for a not-ready one the `/readyz` (402 us) to about 1.3 cores, for
/// [`DOWN_RETRY_FOR`] at most.
pub const RECHECK_PER_NODE: Duration = Duration::from_micros(400);

/// Above this many nodes, [`cadence_for_fleet`] trades readiness detection for apiserver CPU.
pub const LARGE_FLEET: u32 = 1000;

/// How often a fleet's probes ask: the intervals and the recheck of a failing master.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    pub interval: Duration,
    pub readiness_interval: Duration,
    pub recheck: Duration,
}

impl Cadence {
    /// [`DEFAULT_INTERVAL`], [`DEFAULT_READINESS_INTERVAL`], [`DEFAULT_RECHECK`].
    pub const DEFAULT: Cadence = Cadence {
        interval: DEFAULT_INTERVAL,
        readiness_interval: DEFAULT_READINESS_INTERVAL,
        recheck: DEFAULT_RECHECK,
    };
}

/// The probe cadence for a cluster of `nodes` nodes, what `--fleet-size` sets: kha's
/// intervals up to [`LARGE_FLEET`]; above it a liveness request every 2 s and `/readyz` every
/// 15 s, haproxy's `inter`. Both proxies' costs grow with the node count alike, so the
/// comparison holds at any size: per node and apiserver that is 42 + 27 us of apiserver CPU a
/// second, against 70 us for kubespray's haproxy checks (a new TLS connection per `/readyz`
/// every 15 s), while a hung or cut-off master is still out of the live set within about
/// 2.5 s and its sockets moved within about 4.5 s (haproxy: 75 s). The recheck grows by
/// [`RECHECK_PER_NODE`] beyond 750 nodes: 2 s at 5,000. The figures are in docs/health.md.
pub fn cadence_for_fleet(nodes: u32) -> Cadence {
    let recheck = DEFAULT_RECHECK.max(RECHECK_PER_NODE * nodes);
    if nodes <= LARGE_FLEET {
        Cadence { recheck, ..Cadence::DEFAULT }
    } else {
        Cadence { interval: Duration::from_secs(2), readiness_interval: Duration::from_secs(15), recheck }
    }
}

/// Default bound on a readiness request, and on connect plus handshake when no silence is
/// being timed. Longer than
/// kube-apiserver's own etcd readiness check timeout (`--etcd-readycheck-timeout`, 2 s), so
/// that a slow etcd shows up as `HTTP 500: [-]etcd-readiness failed` rather than as a timeout;
/// short enough that a hung master is found within a few seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// Default bound on a response (status line, headers, body). A failing kube-apiserver
/// `/readyz` lists every check, about 2 KiB; 64 KiB leaves room without letting a broken
/// server grow the agent.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// How one backend is probed. All backends of a frontend usually share one.
#[derive(Clone, Debug)]
pub struct ProbeSettings {
    /// Request path, e.g. `/readyz`, or `/health` for etcd. Bytes not allowed in a request
    /// target are percent-encoded.
    pub path: String,
    /// Base time between ticks (a liveness request each); each wait is jittered by
    /// +-[`JITTER`]. At least [`MIN_INTERVAL`] is used.
    pub interval: Duration,
    /// Readiness (`path`) is asked on the first tick at least this long after the last time
    /// it was; at most `interval` means every tick.
    pub readiness_interval: Duration,
    /// Bound for each readiness request plus response, and for connect plus TLS handshake
    /// outside a silence (which [`SILENT_AFTER`] bounds).
    pub timeout: Duration,
    /// From [`tls_config`] (or any rustls client config offering ALPN `http/1.1` or none),
    /// or a [`TlsHandle`] that [`TlsStore`] reloads: read at each new connection.
    pub tls: TlsHandle,
    /// Bound on a response, head and body together; a larger one fails as
    /// [`ProbeFailure::Oversized`].
    pub max_response_bytes: usize,
    /// A master that refused the connection or answered not ready is asked again after half
    /// to all of this, for the first [`DOWN_RETRY_FOR`] of its failure; the first reconnect
    /// after a lost connection comes within it. See [`cadence_for_fleet`].
    pub recheck: Duration,
}

impl ProbeSettings {
    /// The defaults ([`DEFAULT_PATH`], [`Cadence::DEFAULT`], [`DEFAULT_TIMEOUT`],
    /// [`DEFAULT_MAX_RESPONSE_BYTES`]) with the given TLS config.
    pub fn new(tls: impl Into<TlsHandle>) -> Self {
        ProbeSettings {
            path: DEFAULT_PATH.to_owned(),
            interval: DEFAULT_INTERVAL,
            readiness_interval: DEFAULT_READINESS_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            tls: tls.into(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            recheck: DEFAULT_RECHECK,
        }
    }
}

/// What a probe task reports.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeEvent {
    /// The backend answered its readiness request 200.
    Ready { latency: Duration },
    /// A readiness request failed, or the master was silent for [`SILENT_AFTER`]
    /// ([`ProbeFailure::Silent`]), or a connect failed.
    Failed { failure: ProbeFailure, latency: Duration },
    /// The idle persistent connection was closed, reset, timed out (keepalive) or received
    /// stray bytes between requests. The backend was not asked anything: this says "the
    /// connection to it is gone", typically because its apiserver process died (FIN or RST)
    /// or it became unreachable (keepalive). A reconnecting probe follows shortly.
    ConnectionLost { failure: ProbeFailure },
    /// A request has had no answer for `waited` ([`SLOW_AFTER`], or half the timeout if that
    /// is shorter); its answer, [`ProbeEvent::Alive`], a timeout or [`ProbeFailure::Silent`]
    /// follows. A process that has not answered an `OPTIONS *` (or a `/readyz`) for that long
    /// is hung, stalled, or cut off; new connections should not wait to learn which.
    Slow { waited: Duration },
    /// A liveness request reported [`ProbeEvent::Slow`] was answered after all: the process
    /// serves (whatever its readiness, which the next readiness result says).
    Alive { latency: Duration },
}

/// See [`ProbeEvent::Slow`]. Go's HTTP server answers `OPTIONS *` in well under a millisecond
/// on a loaded apiserver; 0.4 s of silence plus the wait for the tick keeps a hung master's
/// new connections to at most 1.4 s with the 0.9 s default interval.
pub const SLOW_AFTER: Duration = Duration::from_millis(400);

/// How long a master may say nothing (no answer to a liveness request, none to the reconnects
/// after it) before it is [`ProbeFailure::Silent`], confirmed gone, and its sockets are
/// terminated. A master paused for less (a VM snapshot, a SIGSTOP, a bond failover) keeps
/// every socket; the line is 2 s, and a pause ends in an answer within milliseconds
/// of its end (a SIGSTOPped process answers the pending request at SIGCONT; after a blackout
/// the next fresh SYN, at most [`LOST_CONNECT_ATTEMPT`] later, gets through, so a cut-off link
/// rides out up to about 1.7 s).
pub const SILENT_AFTER: Duration = Duration::from_secs(2);

impl ProbeEvent {
    /// The failure, unless the backend was ready (or has not answered yet).
    pub fn failure(&self) -> Option<&ProbeFailure> {
        match self {
            ProbeEvent::Ready { .. } | ProbeEvent::Slow { .. } | ProbeEvent::Alive { .. } => None,
            ProbeEvent::Failed { failure, .. } | ProbeEvent::ConnectionLost { failure } => Some(failure),
        }
    }
}
