//! A simulated kube-apiserver: TLS HTTP/1.1 with keep-alive serving the
//! health and version endpoints, plus an optional plain-TCP identity port.
//!
//! | request                              | answer                                        |
//! |--------------------------------------|-----------------------------------------------|
//! | `GET /readyz`, `/livez`, `/healthz`  | 200 `text/plain` `ok`                         |
//! | `GET /readyz` in mode `readyz-500`   | 500 `text/plain` [`READYZ_FAILED_BODY`]       |
//! | `GET /version`                       | 200 `application/json`, kube-apiserver's shape|
//! | `GET /bulk?bytes=N` (N <= [`MAX_BULK_BYTES`]) | 200 `application/octet-stream`, N bytes streamed (a large LIST or watch, for benchmarks) |
//! | `OPTIONS *`                          | 200, empty, in every mode that answers (as Go's server, before any handler) |
//! | other paths / other methods          | 404 / 405 with a JSON `Status` body           |
//!
//! Every response carries [`MASTER_HEADER`] (`X-Kha-Lab-Master: <name>`): a client going
//! through kha cannot tell the backend from the socket: getpeername reports
//! the frontend address it dialled. The identity port writes `<name>\n` on
//! accept and closes; it ignores the failure mode.
//!
//! Bounds: request heads (16 KiB) and bodies (64 KiB), a TLS handshake
//! deadline, an idle deadline for the next request on a kept-alive
//! connection, a write deadline, and a connection cap per listener.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, warn};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::http::{self, Limits, ReadError, Request, Response};
use crate::mode::FailureMode;

pub const MASTER_HEADER: &str = "X-Kha-Lab-Master";
pub const READYZ_FAILED_BODY: &str = "[-]etcd failed: reason withheld\nreadyz check failed";
/// The Kubernetes version the fake apiserver claims to be.
pub const GIT_VERSION: &str = "v1.31.0";
/// Largest body `/bulk` streams.
pub const MAX_BULK_BYTES: u64 = 64 << 30;
/// `/bulk` writes its body in pieces of this size.
const BULK_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub handshake: Duration,
    /// How long a connection may wait for (the rest of) its next request.
    pub idle: Duration,
    pub write: Duration,
    /// How long a hanging connection is held before it is dropped anyway.
    pub hang_max: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(30),
            write: Duration::from_secs(10),
            hang_max: Duration::from_secs(600),
        }
    }
}

#[derive(Clone)]
pub struct MasterConfig {
    pub name: String,
    /// TLS listeners; port 0 picks an ephemeral port (see `RunningMaster::https_addrs`).
    pub listen: Vec<SocketAddr>,
    /// Plain-TCP identity listeners.
    pub ident_listen: Vec<SocketAddr>,
    pub tls: Arc<ServerConfig>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub max_connections_per_listener: usize,
    pub initial_mode: FailureMode,
}

impl MasterConfig {
    pub fn new(name: impl Into<String>, tls: Arc<ServerConfig>) -> Self {
        MasterConfig {
            name: name.into(),
            listen: Vec::new(),
            ident_listen: Vec::new(),
            tls,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            max_connections_per_listener: 1024,
            initial_mode: FailureMode::Normal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("a master needs at least one TLS listen address")]
    NoListeners,
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// A started master. Dropping it stops all listeners and connections.
pub struct RunningMaster {
    name: String,
    https_addrs: Vec<SocketAddr>,
    ident_addrs: Vec<SocketAddr>,
    mode: watch::Sender<FailureMode>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningMaster {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound TLS addresses, in `MasterConfig::listen` order.
    pub fn https_addrs(&self) -> &[SocketAddr] {
        &self.https_addrs
    }

    pub fn ident_addrs(&self) -> &[SocketAddr] {
        &self.ident_addrs
    }

    pub fn mode(&self) -> FailureMode {
        *self.mode.borrow()
    }

    /// Takes effect for the next request on every connection.
    pub fn set_mode(&self, mode: FailureMode) {
        self.mode.send_replace(mode);
    }

    pub async fn shutdown(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for RunningMaster {
    fn drop(&mut self) {
        // Aborting an accept loop drops its JoinSet, which aborts its connections.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds every listener, then serves in background tasks. When this returns
/// all listeners accept connections: the master is ready.
pub async fn start(config: MasterConfig) -> Result<RunningMaster, MasterError> {
    if config.listen.is_empty() {
        return Err(MasterError::NoListeners);
    }
    let https = config.listen.iter().map(|a| bind(*a)).collect::<Result<Vec<_>, _>>()?;
    let ident = config.ident_listen.iter().map(|a| bind(*a)).collect::<Result<Vec<_>, _>>()?;
    let https_addrs = https.iter().map(|(_, a)| *a).collect();
    let ident_addrs = ident.iter().map(|(_, a)| *a).collect();

    let (mode_tx, mode_rx) = watch::channel(config.initial_mode);
    let shared = Arc::new(Shared {
        name: config.name.clone(),
        limits: config.limits,
        timeouts: config.timeouts,
        mode: mode_rx,
    });
    let acceptor = TlsAcceptor::from(config.tls.clone());
    let max = config.max_connections_per_listener;
    let mut tasks = Vec::new();
    for (listener, _) in https {
        let (shared, acceptor) = (shared.clone(), acceptor.clone());
        tasks.push(tokio::spawn(accept_loop(listener, max, move |sock| {
            serve_https(sock, acceptor.clone(), shared.clone())
        })));
    }
    for (listener, _) in ident {
        let shared = shared.clone();
        tasks.push(tokio::spawn(accept_loop(listener, max, move |sock| serve_ident(sock, shared.clone()))));
    }
    Ok(RunningMaster { name: config.name, https_addrs, ident_addrs, mode: mode_tx, tasks })
}

/// Runs a master until `shutdown` completes.
pub async fn serve(config: MasterConfig, shutdown: impl Future<Output = ()>) -> Result<(), MasterError> {
    let master = start(config).await?;
    shutdown.await;
    master.shutdown().await;
    Ok(())
}

/// Binds a listener; returns it with its actual address (port 0 resolved).
fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), MasterError> {
    let bind_err = |source| MasterError::Bind { addr, source };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(bind_err)?;
    // A restarted master must get its port back while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(bind_err)?;
    if addr.is_ipv6() {
        // Without V6ONLY, [::]:p would also claim 0.0.0.0:p and clash with a separate v4 listener.
        set_v6only(&socket).map_err(bind_err)?;
    }
    socket.bind(addr).map_err(bind_err)?;
    let listener = socket.listen(1024).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    Ok((listener, local))
}

fn set_v6only(socket: &TcpSocket) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: valid fd owned by `socket`; the option value is a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

struct Shared {
    name: String,
    limits: Limits,
    timeouts: Timeouts,
    mode: watch::Receiver<FailureMode>,
}

impl Shared {
    fn mode(&self) -> FailureMode {
        *self.mode.borrow()
    }
}

async fn accept_loop<F, Fut>(listener: TcpListener, max_connections: usize, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    if connections.len() >= max_connections {
                        debug!("dropping connection from {peer}: {max_connections} already open");
                        continue;
                    }
                    connections.spawn(handle(sock));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Reads and discards until the peer closes or `max` passes: a connection
/// that is accepted but never answered.
async fn hold<S: AsyncRead + Unpin>(stream: &mut S, max: Duration) {
    let _ = timeout(max, async {
        let mut sink = [0u8; 1024];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn serve_https(mut sock: TcpStream, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let _ = sock.set_nodelay(true);
    let t = shared.timeouts;
    if shared.mode() == FailureMode::Hang {
        hold(&mut sock, t.hang_max).await;
        return;
    }
    let mut tls = match timeout(t.handshake, acceptor.accept(sock)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!("{}: TLS handshake failed: {e}", shared.name);
            return;
        }
        Err(_) => return,
    };
    let mut buf = Vec::with_capacity(1024);
    loop {
        let request = match timeout(t.idle, http::read_request(&mut tls, &mut buf, &shared.limits)).await {
            Ok(Ok(Some(request))) => request,
            Ok(Err(ReadError::Head(e))) => {
                debug!("{}: bad request: {e}", shared.name);
                let reason = match e.status() {
                    413 => "RequestEntityTooLarge",
                    431 => "RequestHeaderFieldsTooLarge",
                    501 => "NotImplemented",
                    _ => "BadRequest",
                };
                let resp = status_response(e.status(), reason, &e.to_string(), &shared.name);
                let _ = timeout(t.write, tls.write_all(&resp.encode(false, true))).await;
                break;
            }
            // Idle timeout, clean close, or I/O error: nothing to answer.
            Err(_) | Ok(Ok(None)) | Ok(Err(_)) => break,
        };
        let mode = shared.mode();
        if mode == FailureMode::Hang {
            hold(&mut tls, t.hang_max).await;
            return;
        }
        if mode == FailureMode::Endless {
            let _ = timeout(t.hang_max, dribble(&mut tls, &shared.name)).await;
            return;
        }
        let keep_alive = request.keep_alive();
        if let Some(n) = bulk_bytes(&request) {
            if !stream_bulk(&mut tls, n, keep_alive, &shared).await {
                return;
            }
            if !keep_alive {
                break;
            }
            continue;
        }
        let bytes = route(&request, mode, &shared.name).encode(keep_alive, request.method != "HEAD");
        let written = timeout(t.write, async {
            tls.write_all(&bytes).await?;
            tls.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
        if !keep_alive {
            break;
        }
    }
    let _ = timeout(t.write, tls.shutdown()).await;
}

/// A 200 whose body never ends: one byte every 200 ms until the peer goes away.
async fn dribble<S: tokio::io::AsyncWrite + Unpin>(tls: &mut S, name: &str) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{MASTER_HEADER}: {name}\r\nContent-Length: {MAX_BULK_BYTES}\r\n\r\n"
    );
    if tls.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    loop {
        if tls.write_all(b"k").await.is_err() || tls.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `N` of a valid `GET /bulk?bytes=N`; anything else is left to [`route`].
fn bulk_bytes(request: &Request) -> Option<u64> {
    if request.method != "GET" || request.path() != "/bulk" {
        return None;
    }
    let (_, query) = request.target.split_once('?')?;
    let n: u64 = query.split('&').find_map(|kv| kv.strip_prefix("bytes="))?.parse().ok()?;
    (n <= MAX_BULK_BYTES).then_some(n)
}

/// Streams a `/bulk` answer of `n` bytes; false when the connection must be dropped.
async fn stream_bulk<S: tokio::io::AsyncWrite + Unpin>(
    tls: &mut S,
    n: u64,
    keep_alive: bool,
    shared: &Shared,
) -> bool {
    static CHUNK: [u8; BULK_CHUNK] = [b'k'; BULK_CHUNK];
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nCache-Control: no-cache, private\r\n\
         {MASTER_HEADER}: {}\r\nContent-Length: {n}\r\nConnection: {}\r\n\r\n",
        shared.name,
        if keep_alive { "keep-alive" } else { "close" },
    );
    let t = shared.timeouts.write;
    if !matches!(timeout(t, tls.write_all(head.as_bytes())).await, Ok(Ok(()))) {
        return false;
    }
    let mut left = n;
    while left > 0 {
        let len = left.min(BULK_CHUNK as u64) as usize;
        if !matches!(timeout(t, tls.write_all(&CHUNK[..len])).await, Ok(Ok(()))) {
            return false;
        }
        left -= len as u64;
    }
    matches!(timeout(t, tls.flush()).await, Ok(Ok(())))
}

async fn serve_ident(mut sock: TcpStream, shared: Arc<Shared>) {
    let line = format!("{}\n", shared.name);
    let _ = timeout(shared.timeouts.write, async {
        sock.write_all(line.as_bytes()).await?;
        sock.shutdown().await
    })
    .await;
}

/// The answer kube-apiserver would give `request` in `mode`.
pub fn route(request: &Request, mode: FailureMode, name: &str) -> Response {
    let response = if request.method == "OPTIONS" && request.target == "*" {
        // Go's HTTP server answers this itself, before any apiserver handler (kha's liveness
        // request): so does the simulated one, in every mode that answers at all.
        Response::new(200, "text/plain; charset=utf-8", "")
    } else if request.method != "GET" && request.method != "HEAD" {
        status_response(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            name,
        )
    } else {
        match request.path() {
            "/readyz" if mode == FailureMode::Readyz500 => {
                Response::new(500, "text/plain; charset=utf-8", READYZ_FAILED_BODY)
            }
            "/readyz" | "/livez" | "/healthz" => Response::new(200, "text/plain; charset=utf-8", "ok"),
            "/version" => Response::new(200, "application/json", version_body()),
            // A valid `/bulk?bytes=N` is streamed by `serve_https` before it gets here.
            "/bulk" => status_response(
                400,
                "BadRequest",
                &format!("/bulk needs ?bytes=N with N at most {MAX_BULK_BYTES}"),
                name,
            ),
            _ => status_response(404, "NotFound", "the server could not find the requested resource", name),
        }
    };
    with_common_headers(response, name)
}

fn with_common_headers(response: Response, name: &str) -> Response {
    if response.header(MASTER_HEADER).is_some() {
        return response;
    }
    response
        .with_header("Cache-Control", "no-cache, private")
        .with_header("X-Content-Type-Options", "nosniff")
        .with_header(MASTER_HEADER, name)
}

fn version_body() -> String {
    let version = serde_json::json!({
        "major": "1",
        "minor": "31",
        "gitVersion": GIT_VERSION,
        "gitCommit": "9edcffcde5595e8a5b1a35f88c421764e575afce",
        "gitTreeState": "clean",
        "buildDate": "2024-08-13T07:28:49Z",
        "goVersion": "go1.22.5",
        "compiler": "gc",
        "platform": "linux/amd64",
    });
    serde_json::to_string_pretty(&version).unwrap_or_default()
}

/// A `Status` object as kube-apiserver returns for failed requests.
fn status_response(code: u16, reason: &str, message: &str, name: &str) -> Response {
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {},
        "code": code,
    });
    with_common_headers(Response::new(code, "application/json", status.to_string()), name)
}
