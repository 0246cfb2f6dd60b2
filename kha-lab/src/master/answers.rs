//! What the simulated master answers (the table in `master`), as hyper responses: kube-apiserver's
//! routes and `Status` bodies, the streamed `/bulk` and the never-ending `endless` body.

use std::convert::Infallible;
use std::time::Duration;

use futures::{Stream, StreamExt as _, stream};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};

use super::{BULK_CHUNK, GIT_VERSION, MASTER_HEADER, MAX_BULK_BYTES, READYZ_FAILED_BODY, Shared};
use crate::http::Response;
use crate::mode::FailureMode;

/// An answer's body: whole, or streamed (`/bulk`, `endless`).
pub(super) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The service's error: the connection is dropped without an answer (`hang`).
#[derive(Debug, thiserror::Error)]
#[error("hung up without an answer")]
pub(super) struct HungUp;

/// The answer to one request, in the mode the master is in when it arrives.
pub(super) async fn answer(
    req: hyper::Request<Incoming>,
    shared: &Shared,
) -> Result<hyper::Response<Body>, HungUp> {
    match shared.mode() {
        FailureMode::Hang => {
            // hyper still reads meanwhile: a peer that goes ends the connection.
            tokio::time::sleep(shared.timeouts.hang_max).await;
            return Err(HungUp);
        }
        FailureMode::Endless => return Ok(endless(&shared.name)),
        FailureMode::Normal | FailureMode::Readyz500 => {}
    }
    let target = req.uri().to_string();
    if let Some(n) = bulk_bytes(req.method().as_str(), &target) {
        return Ok(bulk(n, &shared.name));
    }
    Ok(into_hyper(route(req.method().as_str(), &target, shared.mode(), &shared.name)))
}

fn into_hyper(r: Response) -> hyper::Response<Body> {
    let mut builder = hyper::Response::builder().status(r.status);
    for (name, value) in &r.headers {
        builder = builder.header(name, value);
    }
    builder.body(Full::new(Bytes::from(r.body)).boxed_unsync()).unwrap_or_else(|e| {
        let mut r = hyper::Response::new(Full::new(Bytes::from(format!("{e}\n"))).boxed_unsync());
        *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// A 200 of `length` bytes streamed from `pieces`.
fn streamed<S>(name: &str, content_type: &'static str, length: u64, pieces: S) -> hyper::Response<Body>
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    let mut r = hyper::Response::new(StreamBody::new(pieces.map(|b| Ok(Frame::data(b)))).boxed_unsync());
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CONTENT_LENGTH, HeaderValue::from(length));
    h.insert("cache-control", HeaderValue::from_static("no-cache, private"));
    if let Ok(v) = HeaderValue::from_str(name) {
        h.insert(MASTER_HEADER, v);
    }
    r
}

/// A 200 whose body never ends: one byte every 200 ms until the peer goes away (or
/// [`MAX_BULK_BYTES`] of them, which no test waits for).
fn endless(name: &str) -> hyper::Response<Body> {
    let ticks = stream::unfold((), |()| async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Some((Bytes::from_static(b"k"), ()))
    });
    // The first byte at once, as a stuck stream that started well.
    let first = stream::once(async { Bytes::from_static(b"k") });
    streamed(name, "text/plain", MAX_BULK_BYTES, first.chain(ticks))
}

/// `N` of a valid `GET /bulk?bytes=N`; anything else is left to [`route`].
fn bulk_bytes(method: &str, target: &str) -> Option<u64> {
    if method != "GET" || path(target) != "/bulk" {
        return None;
    }
    let (_, query) = target.split_once('?')?;
    let n: u64 = query.split('&').find_map(|kv| kv.strip_prefix("bytes="))?.parse().ok()?;
    (n <= MAX_BULK_BYTES).then_some(n)
}

/// A `/bulk` answer of `n` bytes, streamed in [`BULK_CHUNK`] pieces of one static buffer.
fn bulk(n: u64, name: &str) -> hyper::Response<Body> {
    static CHUNK: [u8; BULK_CHUNK] = [b'k'; BULK_CHUNK];
    let pieces = stream::unfold(n, |left| async move {
        let len = left.min(BULK_CHUNK as u64) as usize;
        (len > 0).then(|| (Bytes::from_static(&CHUNK[..len]), left - len as u64))
    });
    streamed(name, "application/octet-stream", n, pieces)
}

/// The target without its query string.
fn path(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

/// The answer kube-apiserver would give `method target` in `mode`.
pub fn route(method: &str, target: &str, mode: FailureMode, name: &str) -> Response {
    let response = if method == "OPTIONS" && target == "*" {
        // Go's HTTP server answers this itself, before any apiserver handler (kha's liveness
        // request): so does the simulated one, in every mode that answers at all.
        Response::new(200, "text/plain; charset=utf-8", "")
    } else if method != "GET" && method != "HEAD" {
        status_response(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            name,
        )
    } else {
        match path(target) {
            "/readyz" if mode == FailureMode::Readyz500 => {
                Response::new(500, "text/plain; charset=utf-8", READYZ_FAILED_BODY)
            }
            "/readyz" | "/livez" | "/healthz" => Response::new(200, "text/plain; charset=utf-8", "ok"),
            "/version" => Response::new(200, "application/json", version_body()),
            // A valid `/bulk?bytes=N` is streamed by `answer` before it gets here.
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
