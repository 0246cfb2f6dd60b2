//! A fake kube-apiserver for the discovery tests: HTTPS on 127.0.0.1, answering what kube-rs's
//! watcher asks of EndpointSlices in `default` (list, and `watch=true` as chunked JSON watch
//! events from a resource version), with failure and shutdown on demand. It runs on a thread
//! of its own with its own runtime, so it serves tokio tests and plain (root) tests alike.
//!
//! Not a general API server: one resource, label selectors of `k=v` terms, no field
//! selectors, no pagination (one page), no bookmarks; `/readyz` and `/livez` answer `ok` (so
//! kha's probes can vouch for it as a master); everything else gets 404. HTTP is hyper's;
//! a watch cut by a failure or a stop ends its connection without the last chunk, as a dying
//! apiserver's would.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response,
    body::{Bytes, Frame, Incoming},
    header::{CONNECTION, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{mpsc, watch},
};

pub const SLICES_PATH: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";

#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("no {what} in the PEM given")]
    Pem { what: &'static str },
    #[error("reading PEM")]
    PemIo(#[source] pem::Error),
    #[error("TLS server config")]
    Tls(#[source] rustls::Error),
    #[error("client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("starting the server")]
    Io(#[source] std::io::Error),
}

/// TLS material of the fake server, PEM.
pub struct FakeTls<'a> {
    pub cert_pem: &'a [u8],
    pub key_pem: &'a [u8],
    /// Require client certificates signed by this CA (as a kubelet's kubeconfig presents).
    pub client_ca_pem: Option<&'a [u8]>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Current objects by name.
    slices: BTreeMap<String, Value>,
    /// Every change, `(resourceVersion, type, object)`.
    events: Vec<(u64, &'static str, Value)>,
    failing: bool,
    stopped: bool,
    requests: Vec<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change; open watches wait on it.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

pub struct FakeApiserver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiserver {
    /// Listens on 127.0.0.1 on a free port (the certificate must name 127.0.0.1).
    pub fn start(tls: FakeTls<'_>) -> Result<Self, FakeError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&tls)?));
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(FakeError::Io)?;
        std_listener.set_nonblocking(true).map_err(FakeError::Io)?;
        let addr = std_listener.local_addr().map_err(FakeError::Io)?;
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), changed });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(FakeError::Io)?;
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                rt.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else { return };
                    serve(listener, acceptor, s).await
                });
                // Dropping the runtime drops every connection task: their sockets close.
            })
            .map_err(FakeError::Io)?;
        Ok(FakeApiserver { addr, shared, thread: Some(thread) })
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Creates or replaces the slice `name` of the `kubernetes` service: one ready endpoint per
    /// address, all on port `https` = the first address's port.
    pub fn set_masters(&self, name: &str, masters: &[SocketAddr]) {
        let port = masters.first().map_or(6443, |m| m.port());
        let family = if masters.first().is_some_and(|m| m.is_ipv6()) { "IPv6" } else { "IPv4" };
        let endpoints: Vec<Value> = masters
            .iter()
            .map(|m| json!({"addresses": [m.ip().to_string()], "conditions": {"ready": true}}))
            .collect();
        self.apply(json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": family,
            "endpoints": endpoints,
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }));
    }

    /// Creates or replaces an EndpointSlice given as JSON (its `metadata.name` names it).
    pub fn apply(&self, mut slice: Value) {
        let name = slice["metadata"]["name"].as_str().expect("metadata.name").to_string();
        let mut st = self.shared.lock();
        st.rv += 1;
        slice["apiVersion"] = json!("discovery.k8s.io/v1");
        slice["kind"] = json!("EndpointSlice");
        slice["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let kind = if st.slices.contains_key(&name) { "MODIFIED" } else { "ADDED" };
        st.slices.insert(name, slice.clone());
        let rv = st.rv;
        st.events.push((rv, kind, slice));
        drop(st);
        self.shared.bump();
    }

    pub fn delete(&self, name: &str) {
        let mut st = self.shared.lock();
        let Some(mut slice) = st.slices.remove(name) else { return };
        st.rv += 1;
        slice["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        let rv = st.rv;
        st.events.push((rv, "DELETED", slice));
        drop(st);
        self.shared.bump();
    }

    /// While failing, every request gets a 500 and open watches are cut.
    pub fn set_failing(&self, failing: bool) {
        self.shared.lock().failing = failing;
        self.shared.bump();
    }

    /// Request targets seen so far (`GET /apis/...?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Stops listening and closes every connection, as a dead apiserver.
    pub fn stop(&mut self) {
        self.shared.lock().stopped = true;
        self.shared.bump();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Writes a kubeconfig that points at this server and trusts `ca_file`; `client` is a
    /// `(certificate, key)` pair of files, which may be one file as the kubelet's is.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        ca_file: &Path,
        client: Option<(&Path, &Path)>,
    ) -> std::io::Result<PathBuf> {
        let q = |p: &Path| serde_json::to_string(&p.display().to_string()).expect("a string");
        let user = match client {
            Some((cert, key)) => format!("\n    client-certificate: {}\n    client-key: {}", q(cert), q(key)),
            None => " {}".to_string(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n    certificate-authority: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: node\ncurrent-context: fake\n\
             users:\n- name: node\n  user:{user}\n",
            self.url(),
            q(ca_file)
        );
        let mut f = std::fs::File::create(path)?;
        f.write_all(text.as_bytes())?;
        Ok(path.to_owned())
    }
}

impl Drop for FakeApiserver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn server_config(tls: &FakeTls<'_>) -> Result<rustls::ServerConfig, FakeError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(FakeError::PemIo)?;
    if certs.is_empty() {
        return Err(FakeError::Pem { what: "certificate" });
    }
    let key = match PrivateKeyDer::from_pem_slice(tls.key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => return Err(FakeError::Pem { what: "private key" }),
        Err(e) => return Err(FakeError::PemIo(e)),
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(FakeError::Tls)?;
    let builder = match tls.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem) {
                roots.add(c.map_err(FakeError::PemIo)?).map_err(FakeError::Tls)?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(FakeError::Verifier)?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(FakeError::Tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

async fn serve(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, shared: Arc<Shared>) {
    let mut changed = shared.changed.subscribe();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let (acceptor, shared) = (acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        connection(tls, shared).await;
                    }
                });
            }
            r = changed.changed() => {
                if r.is_err() || shared.lock().stopped {
                    return;
                }
            }
        }
    }
}

/// The `k=v` terms of a label selector, all of which an object's labels must have.
fn matches(selector: Option<&str>, object: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else { return true };
    selector.split(',').all(|term| {
        let (k, v) = term.split_once("==").or_else(|| term.split_once('=')).unwrap_or((term, ""));
        object["metadata"]["labels"][k.trim()].as_str() == Some(v.trim())
    })
}

fn query(target: &str) -> (String, BTreeMap<String, String>) {
    let (path, q) = target.split_once('?').unwrap_or((target, ""));
    (path.to_string(), form_urlencoded::parse(q.as_bytes()).into_owned().collect())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn json_response(code: u16, body: &Value, close: bool) -> Response<Body> {
    let body = serde_json::to_vec(body).expect("json");
    whole(code, "application/json", body, close)
}

fn whole(code: u16, content_type: &'static str, body: Vec<u8>, close: bool) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
    *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if close {
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

async fn connection<S>(stream: S, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(answer(&req, &shared)) }
    });
    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
}

fn answer(req: &Request<Incoming>, shared: &Arc<Shared>) -> Response<Body> {
    let target = req.uri().path_and_query().map_or_else(|| req.uri().to_string(), |p| p.to_string());
    let failing = {
        let mut st = shared.lock();
        st.requests.push(format!("{} {target}", req.method()));
        st.failing
    };
    if failing {
        return json_response(500, &status(500, "InternalError", "fake apiserver failing"), true);
    }
    let (path, params) = query(&target);
    if path == "/readyz" || path == "/livez" {
        return whole(200, "text/plain", b"ok".to_vec(), false);
    }
    if path != SLICES_PATH {
        let body = status(404, "NotFound", "the fake apiserver serves EndpointSlices only");
        return json_response(404, &body, false);
    }
    if req.method() != hyper::Method::GET {
        return json_response(405, &status(405, "MethodNotAllowed", "read only"), false);
    }
    let selector = params.get("labelSelector").cloned();
    if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from = params.get("resourceVersion").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let timeout = params.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(1800);
        return watch_response(shared.clone(), selector, from, Duration::from_secs(timeout));
    }
    let (items, rv) = {
        let st = shared.lock();
        let items: Vec<Value> =
            st.slices.values().filter(|o| matches(selector.as_deref(), o)).cloned().collect();
        (items, st.rv)
    };
    let list = json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                      "metadata": {"resourceVersion": rv.to_string()}, "items": items});
    json_response(200, &list, false)
}

/// A watch answer: its events come from a task of their own, through a channel of a few.
fn watch_response(
    shared: Arc<Shared>,
    selector: Option<String>,
    from: u64,
    timeout: Duration,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move { watch_events(&tx, &shared, selector.as_deref(), from, timeout).await });
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event: std::io::Result<Bytes>| (event.map(Frame::data), rx))
    });
    let mut r = Response::new(StreamBody::new(events).boxed_unsync());
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// JSON watch events after resource version `from` (`0`: every current object as ADDED
/// first), then live ones until the timeout (a clean end of the body: the connection stays
/// open for the next request) or a failure or stop (an error: hyper cuts the connection).
async fn watch_events(
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
    shared: &Shared,
    selector: Option<&str>,
    mut from: u64,
    timeout: Duration,
) {
    let mut changed = shared.changed.subscribe();
    let mut pending: Vec<Value> = Vec::new();
    if from == 0 {
        let st = shared.lock();
        pending.extend(st.slices.values().map(|o| json!({"type": "ADDED", "object": o})));
        from = st.rv;
    }
    let cut = || Err(std::io::Error::other("the fake apiserver cut the watch"));
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let down = {
            let st = shared.lock();
            for (_, kind, object) in st.events.iter().skip_while(|(rv, ..)| *rv <= from) {
                if matches(selector, object) {
                    pending.push(json!({"type": kind, "object": object}));
                }
            }
            from = st.rv;
            st.failing || st.stopped
        };
        if down {
            let _ = tx.send(cut()).await;
            return;
        }
        for event in pending.drain(..) {
            let mut line = serde_json::to_vec(&event).expect("json");
            line.push(b'\n');
            if tx.send(Ok(Bytes::from(line))).await.is_err() {
                return;
            }
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() {
                let _ = tx.send(cut()).await;
                return;
            },
            () = tokio::time::sleep_until(deadline) => return,
            () = tx.closed() => return,
        }
    }
}
