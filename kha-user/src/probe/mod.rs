//! Active health probes: is this master's apiserver ready to serve?
//!
//! The agent runs [`run`] as one tokio task per backend (on any runtime flavour). The task
//! keeps **one persistent TLS connection** to the backend and sends `GET <path> HTTP/1.1`
//! (`/readyz` by default, `/health` for etcd) on it every [`ProbeSettings::interval`],
//! jittered by +-20 %. A probe is a small request, not a handshake, so probing is cheap at
//! cluster scale. Each result is sent as a [`ProbeEvent`], tagged with the caller's tag, on a
//! channel the probes of every backend may share; what to make of the results (rise/fall
//! hysteresis, the backend set) is the caller's business.
//!
//! - **Ready** means status 200. Anything else is [`ProbeEvent::Failed`] with the reason
//!   kept ([`ProbeFailure`]): refused, unreachable, timeout (and in which phase), reset, TLS
//!   error (with the certificate verification error), non-200 status (with the body line that
//!   says why, e.g. `[-]etcd failed: reason withheld`), malformed, oversized, closed.
//! - **Verification**: the server certificate is checked against the CA of [`tls_config`]
//!   with the backend's IP address as the name (`ServerName::IpAddress`), never a DNS name.
//! - **Rotation**: the TLS config is taken from [`ProbeSettings::tls`] at each new connection,
//!   so a reloaded CA or client certificate (see [`TlsStore`]) is used from the next reconnect
//!   on; an established connection is kept (its certificate is checked against a new CA, and
//!   a warning logged if the next reconnect would fail).
//! - **Bounded**: connect plus TLS handshake, and request plus response, each have
//!   [`ProbeSettings::timeout`]; a response (head and body) may not exceed
//!   [`ProbeSettings::max_response_bytes`]. A slow, never-ending or garbage-spewing server
//!   costs at most one timeout and one buffer of that size, then the connection is dropped.
//!   Content-Length, chunked and close-delimited bodies are read.
//! - **Losing the connection is news**: between probes the task keeps a read pending on the
//!   idle connection. A FIN or RST (the apiserver process died), a keepalive timeout (the
//!   master is blackholed; see [`socket`] for the 1 to 2 s numbers) or stray
//!   bytes are reported at once as [`ProbeEvent::ConnectionLost`], without waiting for the
//!   next probe. The task then reconnects after [`LOST_RETRY_MIN`]..[`LOST_RETRY_MAX`] (at
//!   most once per interval; else after the normal interval), and that probe's result is the
//!   next event. The same goes for a probe whose connection died under it (reset, or
//!   abandoned by TCP). That reconnect rides out silence for [`LOST_RECONNECT_WINDOW`], a
//!   fresh SYN every [`LOST_CONNECT_ATTEMPT`]: a master paused for a moment is found ready
//!   again rather than reported as timed out.
//! - **Clean closes are not failures**: a response with `Connection: close` (or a close within
//!   [`CLOSE_AFTER_RESPONSE_GRACE`] of a complete response) just makes the next probe
//!   reconnect. If a kept-alive connection turns out closed when a probe is sent on it, the
//!   probe is retried once on a new connection.
//! - The socket is made by the caller's [`MakeSocket`] (so the agent can create it inside the
//!   network namespace it serves) and tuned here: TCP keepalive, `TCP_USER_TIMEOUT`,
//!   `TCP_NODELAY`.
//!
//! Timing of events: the first probe starts at once; each later one starts an interval
//! (jittered) after the previous event. `latency` is the probe's duration including connect
//! and handshake when it had to open a connection (the first probe, and after a loss).

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
    CLOSE_AFTER_RESPONSE_GRACE, CONFIRM_MAX, CONFIRM_MIN, LOST_CONNECT_ATTEMPT, LOST_RECONNECT_WINDOW,
    LOST_RETRY_MAX, LOST_RETRY_MIN, MIN_INTERVAL, run,
};
pub use reload::{Reload, TLS_CHECK_INTERVAL, TlsHandle, TlsPublisher, TlsStore};
pub use socket::{MakeSocket, default_socket};
pub use tls::{ProbeConfigError, ProbeTlsConfig, tls_config};

/// The path probed when a frontend does not name one: kube-apiserver's readiness endpoint,
/// which fails while the apiserver cannot serve (etcd unreachable, informers not synced,
/// graceful shutdown begun), unlike `/livez`.
pub const DEFAULT_PATH: &str = "/readyz";

/// Default time between probes (before jitter). Losing a master outright (process death,
/// blackhole) does not wait for it: that is seen on the persistent connection at once or
/// within 1 to 2 s. The interval bounds how late a master that still holds its connections
/// but stops being ready (`/readyz` 500 in graceful shutdown, etcd gone, hung process) is
/// noticed. Each probe is one small request on a kept-alive connection: 2 s means 2,500
/// requests per second on each apiserver from a 5,000-node cluster.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// Default bound on connect plus handshake, and on request plus response. Longer than
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
    /// Base time between probes; each wait is jittered by +-[`JITTER`]. At least
    /// [`MIN_INTERVAL`] is used.
    pub interval: Duration,
    /// Bound for connect plus TLS handshake, and for each request plus response.
    pub timeout: Duration,
    /// From [`tls_config`] (or any rustls client config offering ALPN `http/1.1` or none),
    /// or a [`TlsHandle`] that [`TlsStore`] reloads: read at each new connection.
    pub tls: TlsHandle,
    /// Bound on a response, head and body together; a larger one fails as
    /// [`ProbeFailure::Oversized`].
    pub max_response_bytes: usize,
}

impl ProbeSettings {
    /// The defaults ([`DEFAULT_PATH`], [`DEFAULT_INTERVAL`], [`DEFAULT_TIMEOUT`],
    /// [`DEFAULT_MAX_RESPONSE_BYTES`]) with the given TLS config.
    pub fn new(tls: impl Into<TlsHandle>) -> Self {
        ProbeSettings {
            path: DEFAULT_PATH.to_owned(),
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            tls: tls.into(),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// What a probe task reports.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeEvent {
    /// The backend answered 200.
    Ready { latency: Duration },
    /// A probe failed.
    Failed { failure: ProbeFailure, latency: Duration },
    /// The idle persistent connection was closed, reset, timed out (keepalive) or received
    /// stray bytes between probes. The backend was not asked anything: this says "the
    /// connection to it is gone", typically because its apiserver process died (FIN or RST)
    /// or it became unreachable (keepalive). A reconnecting probe follows shortly.
    ConnectionLost { failure: ProbeFailure },
    /// A probe has had no answer for `waited` ([`SLOW_AFTER`], or half the timeout if that is
    /// shorter); its answer or its timeout follows. An apiserver answers `/readyz` in
    /// milliseconds: one that says nothing for a second is hung, overloaded, or cut off, and
    /// new connections should not wait to learn which.
    Slow { waited: Duration },
}

/// See [`ProbeEvent::Slow`].
pub const SLOW_AFTER: Duration = Duration::from_secs(1);

impl ProbeEvent {
    /// The failure, unless the backend was ready (or has not answered yet).
    pub fn failure(&self) -> Option<&ProbeFailure> {
        match self {
            ProbeEvent::Ready { .. } | ProbeEvent::Slow { .. } => None,
            ProbeEvent::Failed { failure, .. } | ProbeEvent::ConnectionLost { failure } => Some(failure),
        }
    }
}
