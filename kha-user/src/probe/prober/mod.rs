//! The per-backend probe task: the schedule (a liveness request every tick, readiness when
//! due, quick retries after a loss or a failure) and the timing of a master's silence across
//! its reconnects. The requests are in [`liveness`] and [`readiness`], the connection itself
//! in [`super::conn`].

mod liveness;
mod readiness;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::conn::Conn;
use super::failure::{Phase, ProbeFailure};
use super::http;
use super::jitter::Rng;
use super::socket::MakeSocket;
use super::{ProbeEvent, ProbeSettings, SILENT_AFTER, SLOW_AFTER};

pub use super::conn::LOST_CONNECT_ATTEMPT;

/// A clean close (FIN or TLS close_notify) this soon after a complete response is the server
/// closing after the response, as HTTP/1.1 allows even unannounced: the next probe reconnects
/// and nothing is reported. A close later than this on the idle connection is reported as
/// [`ProbeEvent::ConnectionLost`]. A server closing right after its response sends the FIN
/// right behind it, so it arrives within this; the price is that a master dying within 50 ms
/// after an answer (5 % of a 1 s tick) is noticed by the next tick instead of at once.
pub const CLOSE_AFTER_RESPONSE_GRACE: Duration = Duration::from_millis(50);

/// After a lost connection ([`ProbeEvent::ConnectionLost`]) the reconnect (and its readiness
/// request) comes after a random delay between this and [`ProbeSettings::recheck`] rather
/// than a whole interval: the health logic holds the backend as *suspect* (no new
/// connections, none terminated) until this reconnect says "ready again" or confirms the
/// failure. It is spread because every node loses its probe connection to a restarting
/// apiserver in the same instant: 5,000 nodes reconnecting within 50 ms would be 100,000 TLS
/// handshakes a second on the apiserver that just came back; the fleet's recheck
/// ([`super::cadence_for_fleet`]) keeps it at a few thousand a second. At most one such
/// quick retry per interval after a loss, so a server that accepts and then drops every
/// connection is not hammered.
pub const LOST_RETRY_MIN: Duration = Duration::from_millis(5);

/// After a failure without any answer other than a refusal (silent, timed out, unreachable,
/// reset) the next attempt comes this soon, not an interval later, so that a master that can
/// serve again (its link back, SIGCONT) is found within a fraction of a second. It costs the
/// master nothing while it stays silent (a SYN nobody answers), and when it comes back every
/// node's attempt is spread over this range and its own phase. With the confirmation
/// ([`CONFIRM_MAX`]) it is back in use within 0.45 s.
pub const DOWN_RETRY_MIN: Duration = Duration::from_millis(150);
/// See [`DOWN_RETRY_MIN`].
pub const DOWN_RETRY_MAX: Duration = Duration::from_millis(300);
/// Quick retries of a failing master last this long; after that it is asked once per interval
/// (the back-off for a master that stays down: a node's retries of it fall from 4 a second to 1).
pub const DOWN_RETRY_FOR: Duration = Duration::from_secs(30);

/// A ready answer right after a failure is confirmed by the next probe after a random delay in
/// `[CONFIRM_MIN, CONFIRM_MAX]`, not an interval later: `--rise` still needs that many passes
/// in a row, but a master that can serve again is back in use about 0.1 s after its first
/// pass instead of an interval after it. It costs one kept-alive probe per node and
/// recovery; the nodes' first passes are already spread over their probe phases.
pub const CONFIRM_MIN: Duration = Duration::from_millis(50);
/// See [`CONFIRM_MIN`].
pub const CONFIRM_MAX: Duration = Duration::from_millis(150);

/// A liveness request still unacknowledged by the master's kernel after this many
/// retransmissions (the kernel's own RTO expiries: at least 0.2 s, then 0.4 s, so about 0.6 s
/// after the send on a LAN) confirms the master gone without waiting for [`SILENT_AFTER`]: a
/// paused or hung process cannot cause it (its kernel acknowledges), so the 2 s grace for a
/// pause is not needed. One lost segment is recovered by the first retransmission; this needs
/// the request and both retransmissions lost. The price: a whole-machine stall (a VM frozen
/// for a snapshot or a migration) or a network outage longer than about 0.6 s after a request
/// counts as gone; the sockets on it are terminated and move.
pub const UNACKED_RETRANSMITS: u8 = 2;

/// How often the kernel's view of a waiting liveness request is read (one `getsockopt`),
/// from [`SLOW_AFTER`] on.
pub const UNACKED_CHECK: Duration = Duration::from_millis(50);

/// How long a silent master's connection is held with its one request pending, while its
/// kernel keeps acknowledging (see `liveness`). A stopped process (SIGSTOP, a frozen cgroup)
/// answers the pending request the moment it runs again; a master that serves new
/// connections but never answers this one (a wedged connection, the lab's `hang` mode) is
/// found by the reconnects after the hold. Most hangs are shorter than this, and cost the
/// thawed apiserver no queued handshake; after it the master is asked on new connections as
/// any failing master is. Each hold lasts this +-[`HOLD_SPREAD`]: every node's hold of a
/// hung master began within a tick of the others', and the new connections after it should
/// reach the still-hung master (and its accept queue) spread over seconds, not in one.
pub const HOLD_FOR: Duration = Duration::from_secs(10);
/// See [`HOLD_FOR`]: holds last 7 to 13 s.
pub const HOLD_SPREAD: f64 = 0.3;

/// Shortest interval honoured, so a zero interval cannot spin.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Bytes asked of the connection per read.
const READ_CHUNK: usize = 8 * 1024;

/// Probes the backend at `addr` until `shutdown` completes or the receiver of `events` is
/// dropped. Each event goes out as `(tag, event)`, so the probes of every backend can share
/// one channel. See the module documentation for the events and their timing.
pub async fn run<T: Clone>(
    addr: SocketAddr,
    settings: ProbeSettings,
    make_socket: MakeSocket,
    events: mpsc::Sender<(T, ProbeEvent)>,
    tag: T,
    shutdown: impl Future,
) {
    let prober = Prober::new(addr, settings, make_socket);
    let out = Out { events, tag };
    tokio::select! {
        _ = shutdown => {}
        _ = prober.run(&out) => {}
    }
}

/// Where events go; `Err(Gone)` once nobody listens, which ends the task.
struct Out<T> {
    events: mpsc::Sender<(T, ProbeEvent)>,
    tag: T,
}

struct Gone;

impl<T: Clone> Out<T> {
    async fn send(&self, event: ProbeEvent) -> Result<(), Gone> {
        self.events.send((self.tag.clone(), event)).await.map_err(|_| Gone)
    }
}

/// How a liveness request went.
enum Liveness {
    /// Answered: the connection is kept (unless the answer closed it).
    Answered,
    /// Answered after its silence had been reported: ask readiness at once, a recovery.
    Revived,
    /// The connection died or closed under it: a loss, as on the idle connection.
    Died(ProbeFailure),
    /// Confirmed gone, to be reported: its kernel acknowledged nothing.
    Silent(ProbeFailure),
    /// Its silence was reported during the wait; then the held connection ended.
    Reported(Retry),
}

/// What a tick ended with, for the schedule of the next one.
enum Outcome {
    /// Nothing new (a liveness answer).
    Quiet,
    /// The connection was lost: reconnect soon, with the spread.
    Lost,
    /// A readiness result or a confirmed silence.
    Result { ready: bool, retry: Retry },
}

/// When a failing master is asked again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// An interval later: it answered (not ready, a TLS error, garbage), so asking sooner
    /// would cost it a request or a handshake per node for nothing new; or the failure was
    /// this node's own.
    Regular,
    /// After [`DOWN_RETRY_MIN`]..[`DOWN_RETRY_MAX`]: nothing answered, which costs it nothing.
    Quick,
    /// After half to all of the recheck: refused, its process is (re)starting.
    Spread,
    /// Readiness after half to all of the recheck: it answered not ready (etcd lost, starting
    /// up, shutting down), and the moment it is ready again is what matters.
    NotReady,
    /// The connection died (on the idle connection, or under a request: reset, or abandoned
    /// by TCP): reconnect after [`LOST_RETRY_MIN`] to the recheck, once per interval, and time
    /// the silence from that reconnect.
    Lost,
}

impl Retry {
    fn after(event: &ProbeEvent) -> Retry {
        match event.failure() {
            Some(f) if f.connection_died() => Retry::Lost,
            Some(ProbeFailure::Refused) => Retry::Spread,
            Some(ProbeFailure::Status { .. }) => Retry::NotReady,
            Some(
                ProbeFailure::Silent { .. }
                | ProbeFailure::Unacknowledged { .. }
                | ProbeFailure::Unreachable(_)
                | ProbeFailure::Timeout { phase: Phase::Connect | Phase::Handshake }
                | ProbeFailure::Abandoned { phase: Phase::Connect | Phase::Handshake },
            ) => Retry::Quick,
            _ => Retry::Regular,
        }
    }
}

struct Prober {
    addr: SocketAddr,
    settings: ProbeSettings,
    interval: Duration,
    make_socket: MakeSocket,
    server_name: ServerName<'static>,
    readiness_request: Vec<u8>,
    liveness_request: Vec<u8>,
    /// The server keeps its connection across `OPTIONS *`; one that closes it after the answer
    /// is asked readiness alone (a handshake per tick would cost more than it tells).
    pings: bool,
    rng: Rng,
    conn: Option<Conn>,
    /// When the current silence began: the send of the first liveness request still
    /// unanswered, or the start of the reconnect after a lost connection. `None` while the
    /// master answers. Connects inside a silence have its end as their deadline.
    silent_since: Option<Instant>,
    /// The connection was lost: the next connect starts a silence (rides out [`SILENT_AFTER`]).
    reconnecting: bool,
    /// When the current failure was first reported (a failed readiness result, a confirmed
    /// silence); `None` while the master passes. A pass while it is set is a recovery.
    failing_since: Option<Instant>,
    buf: Box<[u8]>,
}

impl Prober {
    fn new(addr: SocketAddr, settings: ProbeSettings, make_socket: MakeSocket) -> Self {
        Prober {
            addr,
            interval: settings.interval.max(MIN_INTERVAL),
            // The backend's IP, never a DNS name: that is what its certificate must carry.
            server_name: ServerName::IpAddress(addr.ip().into()),
            readiness_request: http::request(&settings.path, addr),
            liveness_request: http::options_request(addr),
            pings: true,
            settings,
            make_socket,
            rng: Rng::seeded(addr),
            conn: None,
            silent_since: None,
            reconnecting: false,
            failing_since: None,
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
        }
    }

    fn slow_after(&self) -> Duration {
        SLOW_AFTER.min(self.settings.timeout / 2)
    }

    async fn run<T: Clone>(mut self, out: &Out<T>) -> Result<(), Gone> {
        let mut next = Instant::now();
        let mut ready_at = Instant::now();
        let mut last_quick_retry: Option<Instant> = None;
        loop {
            self.recheck_trust();
            let outcome = match self.idle_until(next).await {
                Some(failure) => {
                    out.send(ProbeEvent::ConnectionLost { failure }).await?;
                    Outcome::Lost
                }
                // Readiness is due half a tick early, so that "as often as the interval" means
                // every tick whatever the jitter.
                None => self.tick(out, Instant::now() + self.interval / 2 >= ready_at).await?,
            };
            let now = Instant::now();
            let regular = self.rng.jitter(self.interval);
            let (ready, retry) = match outcome {
                Outcome::Quiet => {
                    next = now + regular;
                    continue;
                }
                Outcome::Lost => (false, Retry::Lost),
                Outcome::Result { ready, retry } => {
                    ready_at = now + self.settings.readiness_interval;
                    (ready, retry)
                }
            };
            let recovered = ready && self.failing_since.is_some();
            if ready {
                self.failing_since = None;
            } else {
                self.failing_since.get_or_insert(now);
            }
            let soon = self.failing_since.is_some_and(|since| now.duration_since(since) < DOWN_RETRY_FOR);
            let quick_retry_allowed =
                last_quick_retry.is_none_or(|at| now.duration_since(at) >= self.interval);
            let recheck = self.settings.recheck;
            let wait = match retry {
                _ if recovered => {
                    ready_at = now;
                    self.rng.between(CONFIRM_MIN, CONFIRM_MAX)
                }
                Retry::Lost if quick_retry_allowed => {
                    last_quick_retry = Some(now);
                    self.reconnecting = true;
                    self.rng.between(LOST_RETRY_MIN, recheck)
                }
                Retry::Spread if soon => self.rng.between(recheck / 2, recheck),
                Retry::NotReady if soon => {
                    ready_at = now;
                    self.rng.between(recheck / 2, recheck)
                }
                Retry::Quick if soon => self.rng.between(DOWN_RETRY_MIN, DOWN_RETRY_MAX),
                _ => regular,
            }
            .min(regular);
            next = now + wait;
        }
    }

    /// One tick: a liveness request on the kept-alive connection, then the readiness request
    /// if it is due, or at once on a new connection if there is none (or it died).
    async fn tick<T: Clone>(&mut self, out: &Out<T>, ready_due: bool) -> Result<Outcome, Gone> {
        if self.pings
            && let Some(conn) = self.conn.take()
        {
            match self.liveness(conn, out).await? {
                Liveness::Answered if !ready_due && self.conn.is_some() => return Ok(Outcome::Quiet),
                Liveness::Answered | Liveness::Revived => {}
                Liveness::Reported(retry) => return Ok(Outcome::Result { ready: false, retry }),
                Liveness::Died(failure @ (ProbeFailure::Abandoned { .. } | ProbeFailure::Unreachable(_))) => {
                    // TCP gave up on the request, or the route to the master went away (a
                    // link down, a bond failing over): the silence goes on, and the reconnect
                    // (at once, within its end) decides.
                    log::debug!("probe {}: liveness request abandoned ({failure}); reconnecting", self.addr);
                }
                Liveness::Died(failure) => {
                    // A FIN or RST is an answer: the reconnect times a silence of its own.
                    self.silent_since = None;
                    out.send(ProbeEvent::ConnectionLost { failure }).await?;
                    return Ok(Outcome::Lost);
                }
                Liveness::Silent(failure) => {
                    let latency = match failure {
                        ProbeFailure::Unacknowledged { waited, .. } => waited,
                        _ => SILENT_AFTER,
                    };
                    let event = ProbeEvent::Failed { failure, latency };
                    let retry = Retry::after(&event);
                    out.send(event).await?;
                    return Ok(Outcome::Result { ready: false, retry });
                }
            }
        }
        let event = self.readiness(out).await?;
        let outcome = Outcome::Result { ready: event.failure().is_none(), retry: Retry::after(&event) };
        out.send(event).await?;
        Ok(outcome)
    }
}
