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
//! HTTP is hyper's (HTTP/1.1, keep-alive, header names in Go's canonical case, as
//! kube-apiserver writes them); what is ours is the failure modes and the bounds: request
//! heads (16 KiB; hyper answers 431 beyond), request bodies never read (no endpoint takes
//! one), a TLS handshake deadline, a deadline for the next request head on a kept-alive
//! connection, and a connection cap per listener. A peer that stops reading a `/bulk` or
//! `endless` answer holds its connection until it goes: hyper has no write deadline, and the
//! cap bounds how many can.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;

use crate::http::Limits;
use crate::mode::FailureMode;

mod answers;

use answers::answer;
pub use answers::route;

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
    /// How long a connection may wait for (the rest of) its next request's head.
    pub idle: Duration,
    /// The identity port's write.
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
    let tls = match timeout(t.handshake, acceptor.accept(sock)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!("{}: TLS handshake failed: {e}", shared.name);
            return;
        }
        Err(_) => return,
    };
    let max_head = shared.limits.max_head.max(HYPER_MIN_BUF);
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { answer(req, &shared).await }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(t.idle)
        .max_buf_size(max_head)
        .title_case_headers(true)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = served {
        debug!("connection ended: {e}");
    }
}

/// hyper's smallest read buffer, which bounds the request head.
const HYPER_MIN_BUF: usize = 8192;

async fn serve_ident(mut sock: TcpStream, shared: Arc<Shared>) {
    let line = format!("{}\n", shared.name);
    let _ = timeout(shared.timeouts.write, async {
        sock.write_all(line.as_bytes()).await?;
        sock.shutdown().await
    })
    .await;
}
