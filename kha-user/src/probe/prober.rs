//! The per-backend probe task: one persistent TLS connection, a request per interval, and a
//! read kept pending in between so that a dead or vanished master is reported at once.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::failure::{Malformed, Phase, ProbeFailure, classify, snippet};
use super::http::{self, Response, ResponseParser};
use super::jitter::Rng;
use super::socket::{MakeSocket, tune};
use super::{ProbeEvent, ProbeSettings, SLOW_AFTER};

/// A clean close (FIN or TLS close_notify) this soon after a complete response is the server
/// closing after the response, as HTTP/1.1 allows even unannounced: the next probe reconnects
/// and nothing is reported. A close later than this on the idle connection is reported as
/// [`ProbeEvent::ConnectionLost`]. A server closing right after its response sends the FIN
/// right behind it, so it arrives within this; the price is that a master dying within 50 ms
/// after a probe (2.5 % of a 2 s interval) is noticed by the next probe instead of at once.
pub const CLOSE_AFTER_RESPONSE_GRACE: Duration = Duration::from_millis(50);

/// After a lost connection ([`ProbeEvent::ConnectionLost`], or a probe whose connection died
/// under it: [`ProbeFailure::connection_died`]) the reconnect (and its probe) comes after a
/// random delay in `[LOST_RETRY_MIN, LOST_RETRY_MAX]` rather than a whole interval: the health
/// logic holds the backend as *suspect* (no new connections, none terminated) until this
/// reconnect says "ready again" or confirms the failure. The spread is a second because every
/// node loses its probe connection to a restarting apiserver in the same instant: 5,000 nodes
/// reconnecting within 50 ms would be 100,000 TLS handshakes a second on the apiserver that
/// just came back; over a second it is 5,000. A suspect costs nothing meanwhile (the other
/// masters take the new connections). At most one such quick retry per interval, so a server
/// that accepts and then drops every connection is not hammered; otherwise the normal
/// jittered interval applies.
pub const LOST_RETRY_MIN: Duration = Duration::from_millis(5);
/// See [`LOST_RETRY_MIN`].
pub const LOST_RETRY_MAX: Duration = Duration::from_millis(1000);

/// How long the reconnect after a lost connection keeps trying while the master is silent
/// (connect timeouts, no route), sending a fresh SYN every [`LOST_CONNECT_ATTEMPT`]. A lost
/// keepalive is noticed 1 to 2 s after the master went quiet (see [`super::socket`]); the
/// last SYN leaves 2 s after the loss, so a master paused (a VM snapshot, a bond failover,
/// a lost keepalive ACK) for less than 3 s is found ready again and no socket of it is
/// terminated. The price: a master that really vanished is confirmed down 2.25 s after the
/// loss, 3.3 to 4.3 s after it went quiet. A refused connect (the process is dead) or any
/// answer ends the wait at once.
pub const LOST_RECONNECT_WINDOW: Duration = Duration::from_millis(2250);
/// See [`LOST_RECONNECT_WINDOW`]: a SYN the kernel would retransmit only after 1 s (and give up
/// on after `TCP_USER_TIMEOUT`, 1.5 s) is replaced by a fresh one this often.
pub const LOST_CONNECT_ATTEMPT: Duration = Duration::from_millis(250);

/// A ready answer right after a failure is confirmed by the next probe after a random delay in
/// `[CONFIRM_MIN, CONFIRM_MAX]`, not an interval later: `--rise` still needs that many passes
/// in a row, but a master that can serve again is back in use about 0.2 s after its first
/// pass instead of an interval (2 s) after it. It costs one kept-alive probe per node and
/// recovery; the nodes' first passes are already spread over their probe phases.
pub const CONFIRM_MIN: Duration = Duration::from_millis(100);
/// See [`CONFIRM_MIN`].
pub const CONFIRM_MAX: Duration = Duration::from_millis(300);

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
    tokio::select! {
        _ = shutdown => {}
        () = prober.run(events, tag) => {}
    }
}

struct Conn {
    tls: TlsStream<TcpStream>,
    /// When the last complete response arrived.
    last_response: Instant,
    /// Bytes that came after the last response, if any (reported at the next idle wait).
    leftover: Option<String>,
}

/// A failed request/response exchange. `retry`: the server closed or reset a kept-alive
/// connection before answering, which a new connection may not see (the server's idle
/// timeout racing our request).
struct ExchangeError {
    failure: ProbeFailure,
    retry: bool,
}

impl From<ProbeFailure> for ExchangeError {
    fn from(failure: ProbeFailure) -> Self {
        ExchangeError { failure, retry: false }
    }
}

struct Prober {
    addr: SocketAddr,
    settings: ProbeSettings,
    interval: Duration,
    make_socket: MakeSocket,
    server_name: ServerName<'static>,
    request_bytes: Vec<u8>,
    rng: Rng,
    conn: Option<Conn>,
    /// The connection was lost: the next connect rides out [`LOST_RECONNECT_WINDOW`] of silence.
    reconnecting: bool,
    buf: Box<[u8]>,
}

impl Prober {
    fn new(addr: SocketAddr, settings: ProbeSettings, make_socket: MakeSocket) -> Self {
        Prober {
            addr,
            interval: settings.interval.max(MIN_INTERVAL),
            // The backend's IP, never a DNS name: that is what its certificate must carry.
            server_name: ServerName::IpAddress(addr.ip().into()),
            request_bytes: http::request(&settings.path, addr),
            settings,
            make_socket,
            rng: Rng::seeded(addr),
            conn: None,
            reconnecting: false,
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
        }
    }

    async fn run<T: Clone>(mut self, events: mpsc::Sender<(T, ProbeEvent)>, tag: T) {
        let mut next = Instant::now();
        let mut last_quick_retry: Option<Instant> = None;
        let mut failing = false;
        loop {
            self.recheck_trust();
            let (event, lost) = match self.idle_until(next).await {
                Some(failure) => (ProbeEvent::ConnectionLost { failure }, true),
                None => {
                    let slow_after = SLOW_AFTER.min(self.settings.timeout / 2);
                    let probe = self.probe();
                    tokio::pin!(probe);
                    let event = tokio::select! {
                        e = &mut probe => e,
                        () = tokio::time::sleep(slow_after) => {
                            if events.send((tag.clone(), ProbeEvent::Slow { waited: slow_after })).await.is_err() {
                                return;
                            }
                            probe.await
                        }
                    };
                    let died = event.failure().is_some_and(ProbeFailure::connection_died);
                    (event, died)
                }
            };
            let (recovered, failed) =
                (failing && matches!(event, ProbeEvent::Ready { .. }), event.failure().is_some());
            failing = failed;
            if events.send((tag.clone(), event)).await.is_err() {
                return;
            }
            let now = Instant::now();
            let regular = self.rng.jitter(self.interval);
            let quick = lost && last_quick_retry.is_none_or(|at| now.duration_since(at) >= self.interval);
            next = now
                + if quick {
                    last_quick_retry = Some(now);
                    self.reconnecting = true;
                    self.rng.between(LOST_RETRY_MIN, LOST_RETRY_MAX).min(regular)
                } else if recovered {
                    self.rng.between(CONFIRM_MIN, CONFIRM_MAX).min(regular)
                } else {
                    regular
                };
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

    /// One probe: on the kept-alive connection if there is one, else on a new one. The
    /// latency covers connect and handshake when the probe had to make a connection.
    async fn probe(&mut self) -> ProbeEvent {
        let start = Instant::now();
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

    /// Request and response, connecting first if needed. The connection is kept only after a
    /// complete response that does not close it.
    async fn exchange(&mut self) -> Result<Response, ExchangeError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let tls = self.connect(Instant::now() + self.settings.timeout).await?;
                Conn { tls, last_response: Instant::now(), leftover: None }
            }
        };
        let deadline = Instant::now() + self.settings.timeout;
        let (response, leftover) = self.send_and_read(&mut conn, deadline).await?;
        if !response.close {
            conn.last_response = Instant::now();
            conn.leftover = leftover;
            self.conn = Some(conn);
        }
        Ok(response)
    }

    async fn connect(&mut self, deadline: Instant) -> Result<TlsStream<TcpStream>, ProbeFailure> {
        let (tcp, deadline) = if std::mem::take(&mut self.reconnecting) {
            // The handshake gets its whole timeout, however long the master stayed silent.
            let tcp = self.reconnect_tcp().await?;
            (tcp, Instant::now() + self.settings.timeout)
        } else {
            (self.connect_tcp(deadline).await?, deadline)
        };
        // The config of the moment: a reloaded CA or client certificate applies from here on.
        let connector = TlsConnector::from(self.settings.tls.for_connect().client.clone());
        match timeout_at(deadline, connector.connect(self.server_name.clone(), tcp)).await {
            Err(_elapsed) => Err(ProbeFailure::Timeout { phase: Phase::Handshake }),
            Ok(Err(e)) => Err(classify(&e, Phase::Handshake)),
            Ok(Ok(tls)) => Ok(tls),
        }
    }

    async fn connect_tcp(&self, deadline: Instant) -> Result<TcpStream, ProbeFailure> {
        let socket = (self.make_socket)(self.addr).map_err(|e| classify(&e, Phase::Connect))?;
        tune(&socket).map_err(|e| classify(&e, Phase::Connect))?;
        let socket = TcpSocket::from_std_stream(socket.into());
        match timeout_at(deadline, socket.connect(self.addr)).await {
            Err(_elapsed) => Err(ProbeFailure::Timeout { phase: Phase::Connect }),
            Ok(Err(e)) => Err(classify(&e, Phase::Connect)),
            Ok(Ok(tcp)) => Ok(tcp),
        }
    }

    /// The connect after a lost connection: a fresh attempt every [`LOST_CONNECT_ATTEMPT`]
    /// while the master stays silent or unreachable, for [`LOST_RECONNECT_WINDOW`]. Anything
    /// else (connected, refused, a local error) ends it at once.
    async fn reconnect_tcp(&self) -> Result<TcpStream, ProbeFailure> {
        let window = Instant::now() + LOST_RECONNECT_WINDOW;
        loop {
            let next = Instant::now() + LOST_CONNECT_ATTEMPT;
            if next >= window {
                return self.connect_tcp(window).await;
            }
            match self.connect_tcp(next).await {
                Err(
                    ProbeFailure::Timeout { phase: Phase::Connect }
                    | ProbeFailure::Abandoned { phase: Phase::Connect }
                    | ProbeFailure::Unreachable(_),
                ) => {
                    log::debug!("probe {}: no answer to the reconnect yet; trying again", self.addr);
                    sleep_until(next).await;
                }
                result => return result,
            }
        }
    }

    /// Sends the request and reads one response, all before `deadline`. Returns the response
    /// and a snippet of any bytes that followed it.
    async fn send_and_read(
        &mut self,
        conn: &mut Conn,
        deadline: Instant,
    ) -> Result<(Response, Option<String>), ExchangeError> {
        let nothing_received = |failure: ProbeFailure| {
            let retry = matches!(failure, ProbeFailure::Closed | ProbeFailure::Reset);
            ExchangeError { failure, retry }
        };
        let write = async {
            conn.tls.write_all(&self.request_bytes).await?;
            conn.tls.flush().await
        };
        match timeout_at(deadline, write).await {
            Err(_elapsed) => return Err(ProbeFailure::Timeout { phase: Phase::Request }.into()),
            Ok(Err(e)) => return Err(nothing_received(classify(&e, Phase::Request))),
            Ok(Ok(())) => {}
        }
        let mut parser = ResponseParser::new(self.settings.max_response_bytes);
        loop {
            let n = match timeout_at(deadline, conn.tls.read(&mut self.buf)).await {
                Err(_elapsed) => return Err(ProbeFailure::Timeout { phase: Phase::Response }.into()),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => match classify(&e, Phase::Response) {
                    // TCP ended without TLS close_notify: an end of stream all the same.
                    ProbeFailure::Closed => 0,
                    failure if parser.received_any() => return Err(failure.into()),
                    failure => return Err(nothing_received(failure)),
                },
            };
            if n == 0 {
                return match parser.eof() {
                    Ok(()) => Ok((parser.response(), None)),
                    Err(failure) if parser.received_any() => Err(failure.into()),
                    Err(failure) => Err(nothing_received(failure)),
                };
            }
            if parser.feed(&self.buf[..n])? {
                return Ok((parser.response(), parser.leftover()));
            }
        }
    }
}
