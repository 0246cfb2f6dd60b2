//! The two clients, each as the prober would use it: one request at a time on one kept-alive
//! TLS connection, every exchange under a deadline, the response bounded at
//! [`DEFAULT_MAX_RESPONSE_BYTES`].
//!
//! - Hand-written: the request bytes made once (as `probe/http.rs` makes them), written, then
//!   reads of up to 8 KiB into the prober's buffer fed to [`ResponseParser`], as
//!   `probe/conn.rs::send_and_read` does.
//! - hyper: `client::conn::http1::handshake` over the same TLS stream, the connection driven
//!   by a spawned task, `SendRequest::send_request` with an empty body, the head bounded by
//!   `max_buf_size`, the body by `http_body_util::Limited`.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, CONNECTION, HOST, HeaderValue, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use kha::probe::DEFAULT_MAX_RESPONSE_BYTES;
use kha::probe::http::ResponseParser;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant, timeout_at};
use tokio_rustls::TlsConnector;

pub type Tls = Arc<rustls::ClientConfig>;
pub type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// The prober's per-exchange deadline (`DEFAULT_TIMEOUT`).
const DEADLINE: Duration = Duration::from_secs(3);
/// The prober's read buffer (`READ_CHUNK` in probe/prober.rs).
const READ_CHUNK: usize = 8 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    Hand,
    Hyper,
}

impl Client {
    pub const ALL: [Client; 2] = [Client::Hand, Client::Hyper];

    pub fn label(self) -> &'static str {
        match self {
            Client::Hand => "hand-written",
            Client::Hyper => "hyper 1.x http1",
        }
    }

    pub fn arg(self) -> &'static str {
        match self {
            Client::Hand => "hand",
            Client::Hyper => "hyper",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `OPTIONS *`, answered 200 with no body.
    Options,
    /// `GET /readyz`, answered `200 ok`.
    Ready,
    /// `GET /readyz-failing`, answered 500 with kube-apiserver's ~2 KiB check list.
    Failing,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Options, Kind::Ready, Kind::Failing];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Options => "`OPTIONS *` → 200, empty",
            Kind::Ready => "`GET /readyz` → 200 `ok`",
            Kind::Failing => "`GET /readyz` → 500, 2 KiB",
        }
    }

    pub fn arg(self) -> &'static str {
        match self {
            Kind::Options => "options",
            Kind::Ready => "ready",
            Kind::Failing => "failing",
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Kind::Options => "*",
            Kind::Ready => "/readyz",
            Kind::Failing => "/readyz-failing",
        }
    }

    fn expected(self) -> u16 {
        if self == Kind::Failing { 500 } else { 200 }
    }
}

pub async fn connect(addr: SocketAddr, tls: &Tls) -> Stream {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    TlsConnector::from(tls.clone()).connect(name, tcp).await.unwrap()
}

/// `probe/http.rs`'s request head, byte for byte.
pub fn head(method: &str, target: &str, addr: SocketAddr) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kha/{}\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes()
}

/// What a failed exchange was, as far as the client can tell.
#[derive(Debug)]
pub enum Failed {
    /// The connection ended before any byte of the answer (the prober retries once).
    NothingReceived(String),
    Other(String),
}

pub struct Answer {
    pub status: u16,
    pub close: bool,
}

pub enum Probe {
    Hand {
        /// Boxed as the prober's connection lives in its (heap) task.
        tls: Box<Stream>,
        buf: Box<[u8]>,
        requests: [Vec<u8>; 3],
    },
    Hyper {
        sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        conn: tokio::task::JoinHandle<Result<(), hyper::Error>>,
        host: HeaderValue,
        user_agent: HeaderValue,
    },
}

impl Probe {
    pub async fn new(c: Client, tls: Stream, addr: SocketAddr) -> Probe {
        match c {
            Client::Hand => Probe::Hand {
                tls: Box::new(tls),
                buf: vec![0; READ_CHUNK].into_boxed_slice(),
                requests: Kind::ALL
                    .map(|k| head(if k == Kind::Options { "OPTIONS" } else { "GET" }, k.path(), addr)),
            },
            Client::Hyper => {
                let (sender, conn) = hyper::client::conn::http1::Builder::new()
                    .max_buf_size(DEFAULT_MAX_RESPONSE_BYTES)
                    .handshake(TokioIo::new(tls))
                    .await
                    .unwrap();
                Probe::Hyper {
                    sender,
                    conn: tokio::spawn(conn),
                    host: HeaderValue::from_str(&addr.to_string()).unwrap(),
                    user_agent: HeaderValue::from_static(concat!("kha/", env!("CARGO_PKG_VERSION"))),
                }
            }
        }
    }

    /// Ends the connection and waits until what it held is freed (hyper's connection task
    /// ends only when polled after the sender is gone), so that no run frees another's memory.
    pub async fn close(self) {
        if let Probe::Hyper { sender, conn, .. } = self {
            drop(sender);
            let _ = tokio::time::timeout(DEADLINE, conn).await;
        }
    }

    /// One exchange that must succeed with the status `kind` is answered with.
    pub async fn exchange(&mut self, kind: Kind) {
        let answer = self.ask(kind, kind.path()).await.unwrap_or_else(|e| panic!("{kind:?}: {e:?}"));
        assert_eq!(answer.status, kind.expected());
    }

    pub async fn ask(&mut self, kind: Kind, path: &str) -> Result<Answer, Failed> {
        let deadline = Instant::now() + DEADLINE;
        match self {
            Probe::Hand { tls, buf, requests } => {
                let owned;
                let request = if path == kind.path() {
                    &requests[kind as usize]
                } else {
                    owned = head("GET", path, tls.get_ref().0.peer_addr().unwrap());
                    &owned
                };
                hand_exchange(tls, request, buf, deadline).await
            }
            Probe::Hyper { sender, host, user_agent, .. } => {
                let method = if kind == Kind::Options { Method::OPTIONS } else { Method::GET };
                let uri = match path {
                    "*" => Uri::from_static("*"),
                    "/readyz" => Uri::from_static("/readyz"),
                    "/readyz-failing" => Uri::from_static("/readyz-failing"),
                    other => Uri::try_from(other).unwrap(),
                };
                let mut request = Request::new(Empty::<Bytes>::new());
                *request.method_mut() = method;
                *request.uri_mut() = uri;
                let headers = request.headers_mut();
                headers.insert(HOST, host.clone());
                headers.insert(USER_AGENT, user_agent.clone());
                headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
                headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
                let exchange = async {
                    sender.ready().await.map_err(|e| Failed::NothingReceived(describe(&e)))?;
                    let response = sender.send_request(request).await.map_err(|e| {
                        if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
                            Failed::NothingReceived(describe(&e))
                        } else {
                            Failed::Other(describe(&e))
                        }
                    })?;
                    let status = response.status().as_u16();
                    let close = response
                        .headers()
                        .get(CONNECTION)
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    let body = Limited::new(response.into_body(), DEFAULT_MAX_RESPONSE_BYTES)
                        .collect()
                        .await
                        .map_err(|e| Failed::Other(format!("body: {e}")))?
                        .to_bytes();
                    std::hint::black_box(&body);
                    Ok(Answer { status, close })
                };
                timeout_at(deadline, exchange).await.unwrap_or_else(|_| Err(Failed::Other("timeout".into())))
            }
        }
    }
}

/// hyper's error and its chain (the io::Error kind, when there is one).
pub fn describe(e: &hyper::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

/// `probe/conn.rs::send_and_read` without the prober's failure classification.
async fn hand_exchange(
    tls: &mut Stream,
    request: &[u8],
    buf: &mut [u8],
    deadline: Instant,
) -> Result<Answer, Failed> {
    let write = async {
        tls.write_all(request).await?;
        tls.flush().await
    };
    match timeout_at(deadline, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Failed::NothingReceived(e.to_string())),
        Err(_) => return Err(Failed::Other("timeout".into())),
    }
    let mut parser = ResponseParser::new(DEFAULT_MAX_RESPONSE_BYTES);
    loop {
        let n = match timeout_at(deadline, tls.read(buf)).await {
            Err(_) => return Err(Failed::Other("timeout".into())),
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Ok(Err(e)) if parser.received_any() => return Err(Failed::Other(e.to_string())),
            Ok(Err(e)) => return Err(Failed::NothingReceived(e.to_string())),
        };
        if n == 0 {
            return match parser.eof() {
                Ok(()) => {
                    let r = parser.response();
                    Ok(Answer { status: r.status, close: r.close })
                }
                Err(failure) if parser.received_any() => Err(Failed::Other(failure.to_string())),
                Err(failure) => Err(Failed::NothingReceived(failure.to_string())),
            };
        }
        match parser.feed(&buf[..n]) {
            Ok(true) => {
                let r = parser.response();
                std::hint::black_box((&r.body, parser.leftover()));
                return Ok(Answer { status: r.status, close: r.close });
            }
            Ok(false) => {}
            Err(failure) => return Err(Failed::Other(failure.to_string())),
        }
    }
}
