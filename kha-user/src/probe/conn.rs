//! One probe connection: connect (a fresh SYN every [`LOST_CONNECT_ATTEMPT`] until a
//! deadline), TLS handshake, and one request/response exchange at a time on it.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use rustls::pki_types::ServerName;

use super::failure::{Phase, ProbeFailure, classify};
use super::http::{Response, ResponseParser};
use super::reload::TlsHandle;
use super::socket::{MakeSocket, tune};

/// A SYN the kernel would retransmit only after 1 s (and give up on after `TCP_USER_TIMEOUT`,
/// 1.5 s) is replaced by a fresh one this often while a connect waits: after a blackout the
/// first SYN that can get through leaves at most this long after the link is back.
pub const LOST_CONNECT_ATTEMPT: std::time::Duration = std::time::Duration::from_millis(250);

pub(super) struct Conn {
    pub tls: TlsStream<TcpStream>,
    /// When the last complete response arrived.
    pub last_response: Instant,
    /// Bytes that came after the last response, if any (reported at the next idle wait).
    pub leftover: Option<String>,
}

/// A failed request/response exchange. `retry`: the server closed or reset a kept-alive
/// connection before answering, which a new connection may not see (the server's idle
/// timeout racing our request).
pub(super) struct ExchangeError {
    pub failure: ProbeFailure,
    pub retry: bool,
}

impl From<ProbeFailure> for ExchangeError {
    fn from(failure: ProbeFailure) -> Self {
        ExchangeError { failure, retry: false }
    }
}

/// Connect plus TLS handshake, all before `deadline`; expiry is a timeout of the phase it
/// caught. Anything but silence (connected, refused, a local error) ends the SYN loop at once.
pub(super) async fn connect(
    addr: SocketAddr,
    make_socket: &MakeSocket,
    tls: &mut TlsHandle,
    server_name: &ServerName<'static>,
    deadline: Instant,
) -> Result<TlsStream<TcpStream>, ProbeFailure> {
    let tcp = loop {
        let attempt = (Instant::now() + LOST_CONNECT_ATTEMPT).min(deadline);
        match connect_tcp(addr, make_socket, attempt).await {
            Err(
                ProbeFailure::Timeout { phase: Phase::Connect }
                | ProbeFailure::Abandoned { phase: Phase::Connect }
                | ProbeFailure::Unreachable(_),
            ) if attempt < deadline => {
                log::debug!("probe {addr}: no answer to the connect yet; trying again");
                sleep_until(attempt).await;
            }
            result => break result?,
        }
    };
    // The config of the moment: a reloaded CA or client certificate applies from here on.
    let connector = TlsConnector::from(tls.for_connect().client.clone());
    match timeout_at(deadline, connector.connect(server_name.clone(), tcp)).await {
        Err(_elapsed) => Err(ProbeFailure::Timeout { phase: Phase::Handshake }),
        Ok(Err(e)) => Err(classify(&e, Phase::Handshake)),
        Ok(Ok(tls)) => Ok(tls),
    }
}

async fn connect_tcp(
    addr: SocketAddr,
    make_socket: &MakeSocket,
    deadline: Instant,
) -> Result<TcpStream, ProbeFailure> {
    let socket = make_socket(addr).map_err(|e| classify(&e, Phase::Connect))?;
    tune(&socket).map_err(|e| classify(&e, Phase::Connect))?;
    let socket = TcpSocket::from_std_stream(socket.into());
    match timeout_at(deadline, socket.connect(addr)).await {
        Err(_elapsed) => Err(ProbeFailure::Timeout { phase: Phase::Connect }),
        Ok(Err(e)) => Err(classify(&e, Phase::Connect)),
        Ok(Ok(tcp)) => Ok(tcp),
    }
}

/// Sends `request` and reads one response, all before `deadline`. Returns the response and a
/// snippet of any bytes that followed it.
pub(super) async fn send_and_read(
    conn: &mut Conn,
    request: &[u8],
    buf: &mut [u8],
    max_response_bytes: usize,
    deadline: Instant,
) -> Result<(Response, Option<String>), ExchangeError> {
    let nothing_received = |failure: ProbeFailure| {
        let retry = matches!(failure, ProbeFailure::Closed | ProbeFailure::Reset);
        ExchangeError { failure, retry }
    };
    let write = async {
        conn.tls.write_all(request).await?;
        conn.tls.flush().await
    };
    match timeout_at(deadline, write).await {
        Err(_elapsed) => return Err(ProbeFailure::Timeout { phase: Phase::Request }.into()),
        Ok(Err(e)) => return Err(nothing_received(classify(&e, Phase::Request))),
        Ok(Ok(())) => {}
    }
    let mut parser = ResponseParser::new(max_response_bytes);
    loop {
        let n = match timeout_at(deadline, conn.tls.read(buf)).await {
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
        if parser.feed(&buf[..n])? {
            return Ok((parser.response(), parser.leftover()));
        }
    }
}
