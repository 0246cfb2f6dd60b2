//! The per-backend probe task: the schedule (a liveness request every tick, readiness when
//! due, quick retries after a loss or a failure) and the timing of a master's silence across
//! its reconnects. The connection itself is [`super::conn`].

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};

use super::conn::{self, Conn, ExchangeError};
use super::failure::{Malformed, Phase, ProbeFailure, classify, snippet};
use super::http::{self, Response};
use super::jitter::Rng;
use super::socket::{self, MakeSocket};
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

    /// `OPTIONS *` on the kept-alive connection, timed against the silence: [`SLOW_AFTER`]
    /// unanswered is reported slow, [`SILENT_AFTER`] since the silence began is reported
    /// silent, and a request the master's kernel has not acknowledged after
    /// [`UNACKED_RETRANSMITS`] retransmissions is reported unacknowledged, at once.
    ///
    /// A silent master whose kernel still acknowledges (a hung or stopped process) keeps this
    /// connection and its one pending request for about [`HOLD_FOR`]: no reconnects while it
    /// hangs, so when it thaws each node's probe costs it one `OPTIONS *` answer instead of a
    /// TLS handshake per reconnect queued in its accept backlog meanwhile.
    async fn liveness<T: Clone>(&mut self, mut conn: Conn, out: &Out<T>) -> Result<Liveness, Gone> {
        let sent = Instant::now();
        let since = *self.silent_since.get_or_insert(sent);
        let slow_at = sent + self.slow_after();
        let silent_at = since + SILENT_AFTER;
        let max = self.settings.max_response_bytes;
        let mut slowed = false;
        let mut silenced = false;
        let mut check = tokio::time::interval_at(slow_at, UNACKED_CHECK);
        let hold = self.rng.between(HOLD_FOR.mul_f64(1.0 - HOLD_SPREAD), HOLD_FOR.mul_f64(1.0 + HOLD_SPREAD));
        let result = {
            let tcp = conn.tls.get_ref().0.as_fd().try_clone_to_owned();
            let exchange =
                conn::send_and_read(&mut conn, &self.liveness_request, &mut self.buf, max, sent + hold);
            tokio::pin!(exchange);
            loop {
                tokio::select! {
                    r = &mut exchange => break r.map_err(|e| e.failure),
                    () = sleep_until(slow_at), if !slowed => {
                        slowed = true;
                        out.send(ProbeEvent::Slow { waited: sent.elapsed() }).await?;
                    }
                    () = sleep_until(silent_at), if !silenced => {
                        silenced = true;
                        self.failing_since.get_or_insert_with(Instant::now);
                        let failure = ProbeFailure::Silent { waited: since.elapsed() };
                        out.send(ProbeEvent::Failed { failure, latency: SILENT_AFTER }).await?;
                    }
                    _ = check.tick(), if !silenced => {
                        let retransmits = tcp.as_ref().ok().and_then(|fd| socket::unacknowledged(fd).ok().flatten());
                        if let Some(retransmits) = retransmits.filter(|&r| r >= UNACKED_RETRANSMITS) {
                            break Err(ProbeFailure::Unacknowledged { waited: sent.elapsed(), retransmits });
                        }
                    }
                }
            }
        };
        match result {
            Ok((response, leftover)) => {
                self.silent_since = None;
                if slowed && !silenced {
                    out.send(ProbeEvent::Alive { latency: sent.elapsed() }).await?;
                }
                if response.close {
                    self.pings = false;
                    log::warn!(
                        "probe {}: the server closes the connection after OPTIONS *; liveness is asked with readiness only from now on",
                        self.addr
                    );
                } else {
                    conn.last_response = Instant::now();
                    conn.leftover = leftover;
                    self.conn = Some(conn);
                }
                Ok(if silenced { Liveness::Revived } else { Liveness::Answered })
            }
            // Reported already: what follows is a reconnect, a regular one after a hold that ran
            // out (a master hung that long is asked once per interval from then on).
            Err(failure) if silenced => {
                self.silent_since = None;
                let retry = match failure {
                    ProbeFailure::Timeout { .. } => Retry::Regular,
                    failure => Retry::after(&ProbeEvent::Failed { failure, latency: Duration::ZERO }),
                };
                Ok(Liveness::Reported(retry))
            }
            Err(failure @ ProbeFailure::Unacknowledged { .. }) => {
                self.silent_since = None;
                Ok(Liveness::Silent(failure))
            }
            Err(failure) => Ok(Liveness::Died(failure)),
        }
    }

    /// After a TLS reload, the established connection is kept (see [`super::reload`]), but if
    /// the new CA does not trust this master's certificate the next reconnect will fail: say
    /// so now, while the probes still pass, rather than when the master suddenly goes down.
    fn recheck_trust(&mut self) {
        let Some(new) = self.settings.tls.take_changed() else { return };
        let (Some(conn), Some(verifier)) = (&self.conn, &new.verifier) else { return };
        let Some((end_entity, intermediates)) =
            conn.tls.get_ref().1.peer_certificates().and_then(|c| c.split_first())
        else {
            return;
        };
        match verifier.verify_server_cert(end_entity, intermediates, &self.server_name, &[], UnixTime::now())
        {
            Ok(_) => log::debug!("probe {}: the reloaded TLS config trusts this master too", self.addr),
            Err(e) => log::warn!(
                "probe {}: the reloaded CA does not trust this master's certificate ({e}); the established probe connection is kept, but the next reconnect will fail",
                self.addr
            ),
        }
    }

    /// Waits until `until` with a read pending on the idle connection, if there is one.
    /// `Some` if the connection was lost meanwhile (it is then dropped).
    async fn idle_until(&mut self, until: Instant) -> Option<ProbeFailure> {
        let Some(conn) = self.conn.as_mut() else {
            sleep_until(until).await;
            return None;
        };
        if let Some(leftover) = conn.leftover.take() {
            self.conn = None;
            return Some(ProbeFailure::Malformed(Malformed::UnexpectedData(leftover)));
        }
        // Cancel-safe: a read that has not completed consumed nothing.
        let read = tokio::select! {
            read = conn.tls.read(&mut self.buf) => read,
            () = sleep_until(until) => return None,
        };
        let since_response = conn.last_response.elapsed();
        self.conn = None;
        let failure = match read {
            Ok(0) => ProbeFailure::Closed,
            Ok(n) => ProbeFailure::Malformed(Malformed::UnexpectedData(snippet(&self.buf[..n]))),
            Err(e) => classify(&e, Phase::Idle),
        };
        if failure == ProbeFailure::Closed && since_response <= CLOSE_AFTER_RESPONSE_GRACE {
            log::debug!("probe {}: server closed after its response; reconnecting next probe", self.addr);
            sleep_until(until).await;
            return None;
        }
        Some(failure)
    }

    /// The readiness request: on the kept-alive connection if there is one, else on a new one,
    /// reported slow after [`SLOW_AFTER`]. The latency covers connect and handshake when it
    /// had to make a connection.
    async fn readiness<T: Clone>(&mut self, out: &Out<T>) -> Result<ProbeEvent, Gone> {
        let start = Instant::now();
        let slow_after = self.slow_after();
        let event = {
            let probe = self.ask_ready(start);
            tokio::pin!(probe);
            tokio::select! {
                e = &mut probe => e,
                () = tokio::time::sleep(slow_after) => {
                    out.send(ProbeEvent::Slow { waited: slow_after }).await?;
                    probe.await
                }
            }
        };
        Ok(event)
    }

    async fn ask_ready(&mut self, start: Instant) -> ProbeEvent {
        let reused = self.conn.is_some();
        let mut result = self.exchange().await;
        if reused && matches!(result, Err(ExchangeError { retry: true, .. })) {
            log::debug!("probe {}: kept-alive connection closed before the answer; retrying", self.addr);
            result = self.exchange().await;
        }
        let latency = start.elapsed();
        match result {
            Ok(Response { status: 200, .. }) => ProbeEvent::Ready { latency },
            Ok(Response { status, body, .. }) => ProbeEvent::Failed {
                failure: ProbeFailure::Status { code: status, line: http::reason_line(&body) },
                latency,
            },
            Err(e) => ProbeEvent::Failed { failure: e.failure, latency },
        }
    }

    /// Readiness request and response, connecting first if needed. The connection is kept
    /// only after a complete response that does not close it.
    async fn exchange(&mut self) -> Result<Response, ExchangeError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => Conn { tls: self.connect().await?, last_response: Instant::now(), leftover: None },
        };
        let deadline = Instant::now() + self.settings.timeout;
        let max = self.settings.max_response_bytes;
        let (response, leftover) =
            conn::send_and_read(&mut conn, &self.readiness_request, &mut self.buf, max, deadline).await?;
        if !response.close {
            conn.last_response = Instant::now();
            conn.leftover = leftover;
            self.conn = Some(conn);
        }
        Ok(response)
    }

    /// Connect and handshake. Inside a silence (a liveness request unanswered, or the
    /// reconnect after a loss) the deadline is the silence's end, and running into it is
    /// [`ProbeFailure::Silent`]; otherwise the probe timeout applies. A handshake that
    /// completes ends the silence: the process serves.
    async fn connect(
        &mut self,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ProbeFailure> {
        if std::mem::take(&mut self.reconnecting) {
            self.silent_since.get_or_insert_with(Instant::now);
        }
        let deadline = match self.silent_since {
            Some(since) => since + SILENT_AFTER,
            None => Instant::now() + self.settings.timeout,
        };
        let result =
            conn::connect(self.addr, &self.make_socket, &mut self.settings.tls, &self.server_name, deadline)
                .await;
        let Some(since) = self.silent_since else { return result };
        match result {
            // Silence to the end: nothing acknowledged, no route, no handshake.
            Err(
                ProbeFailure::Timeout { .. } | ProbeFailure::Unreachable(_) | ProbeFailure::Abandoned { .. },
            ) => {
                self.silent_since = None;
                Err(ProbeFailure::Silent { waited: since.elapsed() })
            }
            // Refused, reset, a TLS error: an answer of sorts, the silence is over.
            result => {
                self.silent_since = None;
                result
            }
        }
    }
}
