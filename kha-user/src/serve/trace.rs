//! `GET /trace?duration=10s&frontend=IP:PORT`: runs one datapath trace and streams its
//! records, one JSON object a line (`kha::trace::Record`), until the duration is over, the
//! client goes or the agent stops. One trace at a time: a second request gets 409. Only to
//! clients on loopback, even where a listener is bound wider (a health port open to a load
//! balancer): the lines name the node's processes, and a trace costs every connect. Every way
//! out swaps kha's own programs back (`loader::Tracing` on drop; `TraceSlot::shutdown` on the
//! agent's way out, before the runtime goes).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, StreamBody};
use hyper::{
    Response,
    body::{Bytes, Frame},
    header::{CONTENT_TYPE, HeaderValue},
};
use kha::{
    loader::{PinDir, Tracing},
    trace::{EndReason, MAX_LINES_PER_SEC, RateBound, Record, Request},
};
use tokio::sync::{Notify, mpsc};

use super::Body;

/// What the agent loop publishes: the candidates' state on each line.
type Agent = Arc<Mutex<super::Shared>>;

/// Lines waiting for a slow client; beyond them `write_line` waits, up to [`WRITE_TIMEOUT`].
const LINES_BUFFERED: usize = 64;

type Lines = mpsc::Sender<Bytes>;

/// How often the ring buffer is read: at most this late, a line.
const READ_EVERY: Duration = Duration::from_millis(50);
/// Records taken from the ring at one read; more than the rate bound lets out in a second.
const READ_MAX: usize = 4096;
/// A client that reads nothing for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The one trace the agent runs at a time.
#[derive(Clone, Default)]
pub struct TraceSlot {
    state: Arc<Mutex<State>>,
    stopping: Arc<Notify>,
}

#[derive(Default)]
struct State {
    busy: bool,
    stopping: bool,
    tracing: Option<Tracing>,
}

impl TraceSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot, unless a trace runs or the agent is stopping.
    fn take(&self) -> Option<Busy> {
        let mut s = self.lock();
        if s.busy || s.stopping {
            return None;
        }
        s.busy = true;
        Some(Busy(self.clone()))
    }

    /// Keeps the running trace where `shutdown` finds it; `false` (and the trace ended,
    /// swapped back) if the agent began stopping meanwhile.
    fn hold(&self, tracing: Tracing) -> bool {
        let mut s = self.lock();
        if s.stopping {
            drop(s);
            drop(tracing);
            return false;
        }
        s.tracing = Some(tracing);
        true
    }

    fn lost(&self) -> u64 {
        self.lock().tracing.as_ref().map_or(0, Tracing::lost)
    }

    fn drain(&self) -> Option<Vec<kha_common::TraceEvent>> {
        self.lock().tracing.as_mut().map(|t| t.drain(READ_MAX))
    }

    /// The agent is on its way out: the running trace (if any) ends now, none starts after.
    pub fn shutdown(&self) {
        let tracing = {
            let mut s = self.lock();
            s.stopping = true;
            s.tracing.take()
        };
        if tracing.is_some() {
            log::info!("trace: ended by the agent stopping; untraced programs swapped back");
        }
        drop(tracing);
        self.stopping.notify_waiters();
    }
}

/// Marks the slot free again when the stream ends, however it ends.
struct Busy(TraceSlot);

impl Drop for Busy {
    fn drop(&mut self) {
        let tracing = {
            let mut s = self.0.lock();
            s.busy = false;
            s.tracing.take()
        };
        drop(tracing);
    }
}

fn refuse(code: u16, body: impl Into<String>) -> Response<Body> {
    super::text(code, "text/plain", body.into())
}

/// The answer to `GET /trace?query`: a refusal, or a stream of lines fed by a task of its own
/// that ends when the trace does.
pub async fn respond(
    loopback: bool,
    query: &str,
    slot: TraceSlot,
    pins: PinDir,
    agent: Agent,
) -> Response<Body> {
    if !loopback {
        return refuse(
            403,
            "/trace answers clients on this node's loopback only: run `kha trace` on the node\n",
        );
    }
    let req = match Request::parse(query) {
        Ok(r) => r,
        Err(e) => return refuse(400, format!("{e}\n")),
    };
    let Some(busy) = slot.take() else {
        if slot.lock().stopping {
            return refuse(503, "the agent is stopping\n");
        }
        return refuse(409, "a trace is already running; one at a time: wait for it to end\n");
    };
    // Loading runs the verifier (milliseconds): off the runtime's thread.
    let destinations = req.frontends.clone();
    let tracing = match tokio::task::spawn_blocking(move || Tracing::start(&pins, &destinations)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return refuse(500, format!("cannot start the trace: {}\n", kha::errors::chain(&e))),
        Err(_) => return refuse(500, "internal error\n"),
    };
    let programs: Vec<_> = tracing.prog_ids().into_iter().map(|(h, u, t)| (h.to_owned(), u, t)).collect();
    log::info!("trace: started for {:?} ({programs:?}: untraced -> traced program ids)", req.duration);
    if !slot.hold(tracing) {
        return refuse(503, "the agent is stopping\n");
    }
    let (tx, rx) = mpsc::channel(LINES_BUFFERED);
    tokio::spawn(async move {
        let start = Record::Start { duration_ms: req.duration.as_millis() as u64, programs };
        let Streamed { reason, lines, dropped, filtered } = run(&tx, &req, &slot, &agent, start).await;
        let lost = slot.lost();
        drop(busy); // swaps back before the last line says so
        log::info!(
            "trace: ended ({reason:?}), {lines} lines, {dropped} dropped, {lost} lost, {filtered} filtered here; untraced programs back"
        );
        let _ = write_line(&tx, &Record::End { reason, lines, dropped, lost, filtered }).await;
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok(Frame::data(line)), rx))
    });
    let mut r = Response::new(StreamBody::new(body).boxed_unsync());
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    r
}

async fn write_line(tx: &Lines, r: &Record) -> Result<(), ()> {
    let mut line = serde_json::to_vec(r).map_err(drop)?;
    line.push(b'\n');
    match tokio::time::timeout(WRITE_TIMEOUT, tx.send(Bytes::from(line))).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// How a trace's stream went.
struct Streamed {
    reason: EndReason,
    lines: u64,
    /// By the rate bound.
    dropped: u64,
    /// Records of other destinations the kernel sent (its filter takes at most
    /// `TRACE_FILTER_MAX`; beyond that the agent filters).
    filtered: u64,
}

/// Streams until the trace ends.
async fn run(tx: &Lines, req: &Request, slot: &TraceSlot, agent: &Agent, start: Record) -> Streamed {
    let began = Instant::now();
    let deadline = tokio::time::Instant::now() + req.duration;
    let mut rate = RateBound::new(MAX_LINES_PER_SEC, began);
    let (mut lines, mut filtered) = (0, 0);
    let end = |reason, lines, rate: &RateBound, filtered| Streamed {
        reason,
        lines,
        dropped: rate.dropped,
        filtered,
    };
    if write_line(tx, &start).await.is_err() {
        return end(EndReason::ClientGone, 0, &rate, 0);
    }
    let mut tick = tokio::time::interval(READ_EVERY);
    let stopping = slot.stopping.notified();
    tokio::pin!(stopping);
    loop {
        let mut last = false;
        tokio::select! {
            _ = tick.tick() => {}
            () = tokio::time::sleep_until(deadline) => last = true,
            () = &mut stopping => return end(EndReason::AgentStopping, lines, &rate, filtered),
            // hyper drops the body when the client's connection ends.
            () = tx.closed() => return end(EndReason::ClientGone, lines, &rate, filtered),
        }
        let Some(events) = slot.drain() else {
            return end(EndReason::AgentStopping, lines, &rate, filtered);
        };
        let pairs = if events.is_empty() {
            Vec::new()
        } else {
            agent.lock().unwrap_or_else(|p| p.into_inner()).agent.pairs.clone()
        };
        for e in &events {
            if !req.wants(e) {
                filtered += 1;
                continue;
            }
            if !rate.admit(Instant::now()) {
                continue;
            }
            let d = Record::Decision(Box::new(kha::trace::Decision::from_event(e).with_candidates(&pairs)));
            if write_line(tx, &d).await.is_err() {
                return end(EndReason::ClientGone, lines, &rate, filtered);
            }
            lines += 1;
        }
        if last {
            return end(EndReason::Duration, lines, &rate, filtered);
        }
    }
}
