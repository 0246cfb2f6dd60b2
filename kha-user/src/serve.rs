//! The agent's HTTP endpoints: `/metrics` on `--metrics-addr`, `/healthz` and `/readyz` on
//! `--health-addr` (both localhost by default), and on both the streaming `/trace` for
//! `kha trace` (`trace`). Deliberately tiny: GET only, one request per connection, bounded in
//! size, time and number (`accept`; a trace by its own bounds). Answers are built on a
//! blocking thread: they read the pinned maps, and the runtime's threads are the probes'.

mod accept;
mod trace;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use kha_common::socket_addr;

use kha::{
    loader::{self, PinDir},
    maps::KhaMaps,
    observe::{self, Kernel, Recorders},
    table::BackendTable as _,
    top::{cgroups::Resolver, sampler::Sampler},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

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
        tokio::spawn(async move {
            let _ = handle(stream, slot, ep).await;
        });
    }));
    Ok(())
}

async fn handle(mut stream: TcpStream, mut slot: accept::Slot, ep: Endpoints) -> std::io::Result<()> {
    let Ok(head) = tokio::time::timeout(REQUEST_TIME, read_head(&mut stream, &mut slot)).await else {
        return Ok(());
    };
    let Some(head) = head? else { return Ok(()) };
    slot.answering();
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").to_string());
    if method == "GET" && (path == "/trace" || path.starts_with("/trace?")) {
        let query = path.split_once('?').map_or("", |(_, q)| q);
        return trace::stream(stream, query, ep.trace.clone(), ep.pins.clone()).await;
    }
    let _ = tokio::time::timeout(REQUEST_TIME, answer(stream, method, path, ep)).await;
    Ok(())
}

/// The request head; `None` when a newer connection needed the slot first.
async fn read_head(stream: &mut TcpStream, slot: &mut accept::Slot) -> std::io::Result<Option<String>> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        let read = tokio::select! {
            read = stream.read(&mut buf[n..]) => read?,
            // A newer connection needed the slot: this one had its chance.
            _ = &mut slot.evicted => return Ok(None),
        };
        if read == 0 {
            break;
        }
        n += read;
    }
    Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned()))
}

async fn answer(mut stream: TcpStream, method: &str, path: String, ep: Endpoints) -> std::io::Result<()> {
    let (code, content_type, body) = if method != "GET" {
        (405, "text/plain", "GET only\n".to_string())
    } else {
        tokio::task::spawn_blocking(move || route(&path, &ep))
            .await
            .unwrap_or_else(|_| (500, "text/plain", "internal error\n".into()))
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let response = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
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
