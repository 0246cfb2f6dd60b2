//! An HTTPS client that reports which master answered each request.
//!
//! It runs in the node namespace and dials `https://localhost:6443` (or any
//! URL) through kha. Since kha makes getpeername report the address the client
//! dialled, the backend is only known from the [`MASTER_HEADER`] response
//! header; the record keeps both so tests can check each.
//!
//! # JSON output (`kha-lab client --json`)
//! One object per request, then one summary object, each on its own line:
//! ```text
//! {"seq":0,"ok":true,"status":200,"master":"m1","peer":"127.0.0.1:6443","local":"127.0.0.1:40112",
//!  "reused":false,"latency_ms":1.93,"error":null,"detail":null}
//! {"summary":{"count":1,"ok":1,"failed":0,"by_master":{"m1":1},"by_status":{"200":1},"errors":{}}}
//! ```
//! - `seq`: 0-based request number. `ok`: a response with a 2xx status arrived.
//! - `status`, `master`: status code and the `X-Kha-Lab-Master` value (else the master the
//!   serving certificate names: real apiservers), `null` without a response.
//! - `peer`/`local`: getpeername/getsockname of the TCP socket used, `null` if not connected.
//! - `reused`: the request went over a kept-alive connection.
//! - `latency_ms`: from the start of the request (connect included when a new
//!   connection was made) to the last body byte or the failure.
//! - `error`: `null` or `"<phase>:<reason>"`; `detail`: human-readable text.
//!   Phases: `resolve`, `connect`, `tls`, `request` (writing), `response`
//!   (reading), `status`. Reasons: an errno name (`ECONNREFUSED`,
//!   `EHOSTUNREACH`, `ECONNRESET`, ...), `ETIMEDOUT` (also when our own
//!   per-request deadline expired in that phase), `EOF` (peer closed early),
//!   a TLS reason (`unknown_issuer`, `not_valid_for_name`, `alert_received`,
//!   `handshake`, ...), `malformed`, or for `status` the code (`status:500`).
//! - summary: `count` = `ok` + `failed`; `by_master` counts every response
//!   (any status) per master; `by_status` per status code; `errors` per
//!   `error` key.
//!
//! A request with `Reuse::KeepAlive` that fails drops its connection; the next
//! request opens a new one. There is no retry: every failure is reported.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::errno::io_error_key;
use crate::http::{self, Limits, ReadError};
pub use crate::master::MASTER_HEADER;
use crate::pki::SERVING_CN_PREFIX;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(2000);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("URL {0:?} does not start with https://")]
    Scheme(String),
    #[error("URL {0:?} has no host")]
    Host(String),
    #[error("URL {0:?} has an invalid port")]
    Port(String),
}

/// An `https://host[:port][/path]` URL; `host` has no brackets for IPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpsUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let rest = url.strip_prefix("https://").ok_or_else(|| UrlError::Scheme(url.to_owned()))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| UrlError::Host(url.to_owned()))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.contains(['@', ' ', '[', ']']) {
            return Err(UrlError::Host(url.to_owned()));
        }
        let port = match port {
            None => 443,
            Some(p) => p.parse().ok().filter(|p| *p != 0).ok_or_else(|| UrlError::Port(url.to_owned()))?,
        };
        Ok(HttpsUrl { host: host.to_owned(), port, path })
    }

    /// The `Host` header value.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == 443 { host } else { format!("{host}:{}", self.port) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// One TCP+TLS connection per request (what spreads load across masters).
    NewConnectionEach,
    KeepAlive,
}

#[derive(Clone)]
pub struct ClientOptions {
    pub url: HttpsUrl,
    /// TCP destination instead of resolving the URL host; SNI and
    /// certificate verification still use the URL host.
    pub connect_addr: Option<SocketAddr>,
    pub count: u64,
    /// Pause between requests (not after the last).
    pub interval: Duration,
    /// Deadline for each whole request, connect and handshake included.
    pub timeout: Duration,
    pub reuse: Reuse,
    pub tls: Arc<ClientConfig>,
    pub limits: Limits,
    /// `OPTIONS *` instead of `GET` of the URL's path: Go's net/http answers it itself, before
    /// any handler (kube-apiserver's filters included), so it says only that the server's
    /// process answers, at about the cost of the TLS record.
    pub options_star: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub seq: u64,
    pub ok: bool,
    pub status: Option<u16>,
    pub master: Option<String>,
    pub peer: Option<String>,
    pub local: Option<String>,
    pub reused: bool,
    pub latency_ms: f64,
    pub error: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSummary {
    pub count: u64,
    pub ok: u64,
    pub failed: u64,
    pub by_master: BTreeMap<String, u64>,
    pub by_status: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
}

impl RequestSummary {
    pub fn add(&mut self, r: &RequestRecord) {
        self.count += 1;
        if r.ok {
            self.ok += 1
        } else {
            self.failed += 1
        }
        if let Some(m) = &r.master {
            *self.by_master.entry(m.clone()).or_default() += 1;
        }
        if let Some(s) = r.status {
            *self.by_status.entry(s.to_string()).or_default() += 1;
        }
        if let Some(e) = &r.error {
            *self.errors.entry(e.clone()).or_default() += 1;
        }
    }
}

impl fmt::Display for RequestRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        write!(f, "#{} ", self.seq)?;
        if let Some(status) = self.status {
            write!(f, "status={status} master={} ", or_dash(&self.master))?;
        }
        write!(
            f,
            "peer={} local={} reused={} latency={:.2}ms",
            or_dash(&self.peer),
            or_dash(&self.local),
            self.reused,
            self.latency_ms
        )?;
        if let Some(e) = &self.error {
            write!(f, " error={e} ({})", or_dash(&self.detail))?;
        }
        Ok(())
    }
}

impl fmt::Display for RequestSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "summary: count={} ok={} failed={}", self.count, self.ok, self.failed)?;
        write_tally(f, "by_master", &self.by_master)?;
        write_tally(f, "by_status", &self.by_status)?;
        write_tally(f, "errors", &self.errors)
    }
}

pub(crate) fn write_tally(
    f: &mut fmt::Formatter<'_>,
    label: &str,
    map: &BTreeMap<String, u64>,
) -> fmt::Result {
    write!(f, " {label}:")?;
    if map.is_empty() {
        return write!(f, " -");
    }
    map.iter().try_for_each(|(k, v)| write!(f, " {k}={v}"))
}

/// A failed phase: the `error` key and the detail text.
struct Failure {
    key: String,
    detail: String,
}

impl Failure {
    fn new(phase: &str, reason: impl fmt::Display, detail: impl fmt::Display) -> Self {
        Failure { key: format!("{phase}:{reason}"), detail: detail.to_string() }
    }

    fn deadline(phase: &str) -> Self {
        Failure::new(phase, "ETIMEDOUT", "request deadline expired")
    }

    fn io(phase: &str, err: &io::Error) -> Self {
        Failure::new(phase, io_or_tls_key(err), err)
    }
}

/// tokio-rustls reports TLS failures as io::Error wrapping a rustls::Error.
fn io_or_tls_key(err: &io::Error) -> String {
    match err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(tls_err) => crate::tls::error_key(tls_err).to_owned(),
        None => io_error_key(err),
    }
}

struct Conn {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    /// The master the serving certificate names, for masters that send no lab header (real
    /// apiservers): under kha and behind a proxy the peer address does not tell.
    cert_master: Option<String>,
}

/// Runs `opts.count` requests, calling `on_record` after each.
pub async fn run(opts: &ClientOptions, mut on_record: impl FnMut(&RequestRecord)) -> RequestSummary {
    let mut summary = RequestSummary::default();
    let mut conn = None;
    for seq in 0..opts.count {
        if seq > 0 && !opts.interval.is_zero() {
            tokio::time::sleep(opts.interval).await;
        }
        let record = request_once(opts, &mut conn, seq).await;
        summary.add(&record);
        on_record(&record);
    }
    summary
}

async fn request_once(opts: &ClientOptions, slot: &mut Option<Conn>, seq: u64) -> RequestRecord {
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let reused = slot.is_some();
    let mut record = RequestRecord {
        seq,
        ok: false,
        status: None,
        master: None,
        peer: None,
        local: None,
        reused,
        latency_ms: 0.0,
        error: None,
        detail: None,
    };
    let conn = match slot.take() {
        Some(conn) => Ok(conn),
        None => connect(opts, deadline).await,
    };
    let result = match conn {
        Ok(mut conn) => {
            record.peer = conn.peer.map(|a| a.to_string());
            record.local = conn.local.map(|a| a.to_string());
            let cert_master = conn.cert_master.clone();
            let result = exchange(opts, &mut conn, deadline).await;
            if let Ok((_, true)) = &result
                && opts.reuse == Reuse::KeepAlive
            {
                *slot = Some(conn);
            }
            result.map(|(resp, _)| (resp, cert_master))
        }
        Err((failure, peer, local)) => {
            record.peer = peer.map(|a| a.to_string());
            record.local = local.map(|a| a.to_string());
            Err(failure)
        }
    };
    record.latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok((resp, cert_master)) => {
            record.status = Some(resp.status);
            record.master = resp.header(MASTER_HEADER).map(str::to_owned).or(cert_master);
            record.ok = (200..300).contains(&resp.status);
            if !record.ok {
                record.error = Some(format!("status:{}", resp.status));
                record.detail = Some(String::from_utf8_lossy(&resp.body).chars().take(200).collect());
            }
        }
        Err(f) => {
            record.error = Some(f.key);
            record.detail = Some(f.detail);
        }
    }
    record
}

/// `m1` from a serving certificate whose subject is `CN=kube-apiserver m1`, as the lab's PKI
/// issues them to simulated and real masters alike.
fn master_of_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    cn.strip_prefix(SERVING_CN_PREFIX).map(str::to_owned)
}

type ConnectFailure = (Failure, Option<SocketAddr>, Option<SocketAddr>);

async fn connect(opts: &ClientOptions, deadline: Instant) -> Result<Conn, ConnectFailure> {
    let no_addr = |f| (f, None, None);
    let addrs: Vec<SocketAddr> = match opts.connect_addr {
        Some(a) => vec![a],
        None => match timeout_at(deadline, tokio::net::lookup_host((opts.url.host.as_str(), opts.url.port)))
            .await
        {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(e)) => return Err(no_addr(Failure::io("resolve", &e))),
            Err(_) => return Err(no_addr(Failure::deadline("resolve"))),
        },
    };
    // Try each resolved address in turn, as `localhost` may give ::1 and 127.0.0.1.
    let mut last = Failure::new("resolve", "no_address", format!("{} resolved to nothing", opts.url.host));
    let mut tcp = None;
    for addr in addrs {
        match timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some(s);
                break;
            }
            Ok(Err(e)) => last = Failure::io("connect", &e),
            Err(_) => {
                last = Failure::deadline("connect");
                break;
            }
        }
    }
    let Some(tcp) = tcp else {
        return Err(no_addr(last));
    };
    let _ = tcp.set_nodelay(true);
    // getpeername/getsockname right after connect: under kha the peer is the
    // frontend the client dialled, not the master.
    let peer = tcp.peer_addr().ok();
    let local = tcp.local_addr().ok();
    let name = match ServerName::try_from(opts.url.host.clone()) {
        Ok(n) => n,
        Err(e) => return Err((Failure::new("tls", "invalid_server_name", e), peer, local)),
    };
    let connector = TlsConnector::from(opts.tls.clone());
    match timeout_at(deadline, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => {
            let cert_master = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| master_of_cert(c));
            Ok(Conn { stream, buf: Vec::new(), peer, local, cert_master })
        }
        Ok(Err(e)) => Err((Failure::io("tls", &e), peer, local)),
        Err(_) => Err((Failure::deadline("tls"), peer, local)),
    }
}

/// Sends one request (GET, or `OPTIONS *`) and reads the response; also says whether the connection
/// may be reused.
async fn exchange(
    opts: &ClientOptions,
    conn: &mut Conn,
    deadline: Instant,
) -> Result<(http::Response, bool), Failure> {
    let close = opts.reuse == Reuse::NewConnectionEach;
    let (method, target) = if opts.options_star { ("OPTIONS", "*") } else { ("GET", opts.url.path.as_str()) };
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kha-lab\r\nAccept: */*\r\n{}\r\n",
        opts.url.authority(),
        if close { "Connection: close\r\n" } else { "" },
    );
    let written = timeout_at(deadline, async {
        conn.stream.write_all(request.as_bytes()).await?;
        conn.stream.flush().await
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Failure::io("request", &e)),
        Err(_) => return Err(Failure::deadline("request")),
    }
    let response = match timeout_at(
        deadline,
        http::read_response(&mut conn.stream, &mut conn.buf, &opts.limits),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(ReadError::Io(e))) => return Err(Failure::io("response", &e)),
        Ok(Err(ReadError::UnexpectedEof)) => {
            return Err(Failure::new("response", "EOF", "connection closed before a full response"));
        }
        Ok(Err(ReadError::Head(e))) => return Err(Failure::new("response", "malformed", e)),
        Err(_) => return Err(Failure::deadline("response")),
    };
    let server_closes = response
        .header("connection")
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
    if close || server_closes {
        // Best effort close_notify; the response is already complete.
        let _ = timeout_at(deadline, conn.stream.shutdown()).await;
    }
    Ok((response, !close && !server_closes))
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
