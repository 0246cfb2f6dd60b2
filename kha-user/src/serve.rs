//! The agent's HTTP endpoints: `/metrics` on `--metrics-addr`, `/healthz` and `/readyz` on
//! `--health-addr` (both localhost by default), and on both the streaming `/trace` for
//! `kha trace` (`trace`). HTTP is hyper's (HTTP/1.1, one request per connection); what is ours
//! is the bounds: in number (`accept`), in size (hyper's buffer), in time (the request and,
//! except `/trace`, its answer within [`REQUEST_TIME`]; a trace by its own bounds). Answers are
//! built on a blocking thread: they read the pinned maps, and the runtime's threads are the
//! probes'.

mod accept;
mod trace;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use kha_common::socket_addr;

use kha::{
    loader::{self, PinDir},
    maps::KhaMaps,
    observe::{self, Kernel, Recorders},
    table::BackendTable as _,
    top::{cgroups::Resolver, sampler::Sampler},
};
use tokio::net::{TcpListener, TcpStream};

pub use accept::{MAX_CONNECTIONS, Slots};
pub use trace::TraceSlot;

/// What the agent loop publishes for the endpoints.
#[derive(Default)]
pub struct Shared {
    pub agent: observe::AgentState,
    pub last_loop: Option<Instant>,
}

#[derive(Clone)]
pub struct Endpoints {
    pub shared: Arc<Mutex<Shared>>,
    pub recorders: Recorders,
    pub pins: PinDir,
    /// The agent loop counts as stalled when it has not run for this long.
    pub stall_after: Duration,
    /// The start-up check found SOCK_DESTROY working.
    pub sock_destroy: bool,
    /// Shared by both listeners: one budget of descriptors.
    pub slots: Slots,
    /// The one `/trace` that may run.
    pub trace: TraceSlot,
    /// The client rates' previous sample and the cgroup paths seen (`kha_client_*`).
    pub clients: Arc<Mutex<ClientRates>>,
}

#[derive(Default)]
pub struct ClientRates {
    sampler: Sampler,
    paths: Option<Resolver>,
}

/// How long a request may take to arrive and, except `/trace`, to be answered.
const REQUEST_TIME: Duration = Duration::from_secs(5);

/// Binds before anything is attached, so a taken port fails the start with a clear error
/// and leaves nothing behind.
pub fn bind(addr: SocketAddr, what: &'static str) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} for {what}; pick another address, or `none`"))?;
    listener.set_nonblocking(true)?;
    log::info!("{what} on http://{addr}");
    Ok(listener)
}

/// Serves on a listener from `bind`, in the background.
pub fn start(listener: std::net::TcpListener, what: &'static str, ep: Endpoints) -> Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let slots = ep.slots.clone();
    tokio::spawn(accept::accept_loop(listener, slots, what, move |stream, slot| {
        let ep = ep.clone();
        tokio::spawn(handle(stream, slot, ep));
    }));
    Ok(())
}

/// An answer's body: whole (`text`) or, for `/trace`, streamed.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A whole answer; `/metrics` is the only one that is not plain text.
pub fn text(code: u16, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The request head's bound, hyper's smallest read buffer: a GET with a short query.
const MAX_HEAD: usize = 8192;

async fn handle(stream: TcpStream, mut slot: accept::Slot, ep: Endpoints) {
    let loopback = stream.peer_addr().is_ok_and(|a| a.ip().is_loopback());
    // Set when the request is `/trace`: its answer lasts as long as the trace.
    let streaming = Arc::new(AtomicBool::new(false));
    let answering = slot.answer_handle();
    let service = {
        let streaming = streaming.clone();
        service_fn(move |req: Request<Incoming>| {
            answering.answering();
            let (ep, streaming) = (ep.clone(), streaming.clone());
            async move { Ok::<_, Infallible>(respond(req, loopback, ep, &streaming).await) }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIME)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let deadline = tokio::time::sleep(REQUEST_TIME);
    tokio::pin!(deadline);
    let mut bounded = true;
    loop {
        tokio::select! {
            _ = &mut conn => return,
            // A newer connection needed the slot before this one sent its request.
            () = slot.until_evicted() => return,
            () = &mut deadline, if bounded => {
                if !streaming.load(Ordering::Relaxed) {
                    return;
                }
                bounded = false;
            }
        }
    }
}

async fn respond(
    req: Request<Incoming>,
    loopback: bool,
    ep: Endpoints,
    streaming: &AtomicBool,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if req.method() != Method::GET {
        return text(405, "text/plain", "GET only\n".into());
    }
    if path == "/trace" {
        streaming.store(true, Ordering::Relaxed);
        let query = req.uri().query().unwrap_or("");
        return trace::respond(loopback, query, ep.trace.clone(), ep.pins.clone(), ep.shared.clone()).await;
    }
    let (code, content_type, body) = tokio::task::spawn_blocking(move || route(&path, &ep))
        .await
        .unwrap_or_else(|_| (500, "text/plain", "internal error\n".into()));
    text(code, content_type, body)
}

fn route(path: &str, ep: &Endpoints) -> (u16, &'static str, String) {
    let agent = {
        let s = ep.shared.lock().unwrap_or_else(|p| p.into_inner());
        let alive = s.last_loop.is_some_and(|t| t.elapsed() < ep.stall_after);
        observe::AgentState { alive, ..s.agent.clone() }
    };
    let status = |(ok, text): (bool, String)| (if ok { 200 } else { 503 }, "text/plain", text);
    match path {
        "/metrics" => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            observe::render_metrics(&agent, &kernel(ep), &ep.recorders),
        ),
        "/healthz" | "/livez" => status(observe::healthz(&agent, &kernel(ep))),
        "/readyz" => status(observe::readyz(&agent)),
        _ => (404, "text/plain", "not found: /metrics, /healthz, /readyz, /trace\n".into()),
    }
}

/// The kernel's counters, read from the pinned maps at scrape time.
fn kernel(ep: &Endpoints) -> Kernel {
    let attached = loader::link_status(&ep.pins).len() == loader::HOOKS.len();
    let mut k = Kernel { attached, sock_destroy: ep.sock_destroy, ..Default::default() };
    let Ok(maps) = KhaMaps::open_pinned(&ep.pins.maps()) else { return k };
    if let Ok(snapshot) = maps.snapshot() {
        for (id, b) in &snapshot.backends {
            if let Ok(stats) = maps.backend_stats(*id) {
                k.backends.insert(socket_addr(&b.addr_be, b.port_be), stats);
            }
        }
    }
    let stats = maps.stats().unwrap_or_default();
    let stat = |name: &str| stats.iter().find(|(n, _)| *n == name).map_or(0, |(_, v)| *v);
    k.terminated = stat("terminated");
    k.terminated_reset = stat("terminated_reset");
    k.terminated_destroy = stat("terminated_destroy");
    // Maps pinned by a kha from before KHA_CLIENTS: no client series.
    if let Ok(samples) = kha::maps::clients::samples(&ep.pins.maps()) {
        let mut c = ep.clients.lock().unwrap_or_else(|p| p.into_inner());
        k.clients = c.sampler.clients(samples, Instant::now());
        if c.paths.is_none() {
            c.paths = kha_common::cgroup::cgroup2_mount().ok().flatten().map(Resolver::new);
        }
        if let Some(r) = &mut c.paths {
            k.client_paths = r.resolve(k.clients.iter().map(|c| c.cgroup_id));
        }
    }
    k
}
