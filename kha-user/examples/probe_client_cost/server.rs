//! The rustls server both clients talk to, on 127.0.0.1 in a thread and runtime of its own,
//! with a CA and a serving certificate made at start (rcgen, as the probe tests do). Answers
//! are kube-apiserver's, headers included; a few paths script the failures of [`super::behaviour`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Go's own answer to `OPTIONS *`.
const OPTIONS_OK: &str =
    "HTTP/1.1 200 OK\r\nDate: Fri, 04 Dec 2026 02:40:00 GMT\r\nContent-Length: 0\r\n\r\n";

/// The headers kube-apiserver sends with `/readyz` (audit id, priority and fairness).
const APISERVER_HEADERS: &str = "Audit-Id: 9a0e4b51-7c0d-4d1e-a7f3-2f6f3c1e8b42\r\nCache-Control: no-cache, private\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\nX-Kubernetes-Pf-Flowschema-Uid: 4c1c2c5b-8a55-4c39-9a36-0d4f3e54a1d7\r\nX-Kubernetes-Pf-Prioritylevel-Uid: 0f6e1e0a-2b77-4f7b-a4c6-9d0c8c3b6e15\r\nDate: Fri, 04 Dec 2026 02:40:00 GMT\r\n";

/// kube-apiserver 1.33's readiness checks, as a failing `/readyz` lists them.
const CHECKS: [&str; 48] = [
    "ping",
    "log",
    "etcd",
    "etcd-readiness",
    "kms-providers",
    "informer-sync",
    "shutdown",
    "poststarthook/start-apiserver-admission-initializer",
    "poststarthook/generic-apiserver-start-informers",
    "poststarthook/priority-and-fairness-config-consumer",
    "poststarthook/priority-and-fairness-filter",
    "poststarthook/storage-object-count-tracker-hook",
    "poststarthook/start-apiextensions-informers",
    "poststarthook/start-apiextensions-controllers",
    "poststarthook/crd-informer-synced",
    "poststarthook/start-system-namespaces-controller",
    "poststarthook/start-cluster-authentication-info-controller",
    "poststarthook/start-kube-apiserver-identity-lease-controller",
    "poststarthook/start-kube-apiserver-identity-lease-garbage-collector",
    "poststarthook/start-legacy-token-tracking-controller",
    "poststarthook/start-service-ip-repair-controllers",
    "poststarthook/rbac/bootstrap-roles",
    "poststarthook/scheduling/bootstrap-system-priority-classes",
    "poststarthook/priority-and-fairness-config-producer",
    "poststarthook/bootstrap-controller",
    "poststarthook/start-kubernetes-service-cidr-controller",
    "poststarthook/aggregator-reload-proxy-client-cert",
    "poststarthook/start-kube-aggregator-informers",
    "poststarthook/apiservice-status-local-available-controller",
    "poststarthook/apiservice-status-remote-available-controller",
    "poststarthook/apiservice-registration-controller",
    "poststarthook/apiservice-discovery-controller",
    "poststarthook/kube-apiserver-autoregistration",
    "autoregister-completion",
    "poststarthook/apiservice-openapi-controller",
    "poststarthook/apiservice-openapiv3-controller",
    "poststarthook/start-service-account-signing-key-controller",
    "poststarthook/start-kube-apiserver-admission-initializer",
    "poststarthook/start-apiserver-informers",
    "poststarthook/start-cluster-trust-bundle-controller",
    "poststarthook/start-node-authorizer-graph",
    "poststarthook/start-resourceclaim-device-status",
    "poststarthook/start-storage-version-migrator",
    "poststarthook/start-encryption-provider-config-automatic-reload",
    "poststarthook/start-deprecated-api-controller",
    "poststarthook/start-flowcontrol-apf-bootstrap",
    "poststarthook/start-legacy-sa-token-cleaner",
    "poststarthook/start-crd-openapi-controller",
];

fn response(status: &str, body: &str, extra: &str) -> Vec<u8> {
    format!("HTTP/1.1 {status}\r\n{APISERVER_HEADERS}{extra}Content-Length: {}\r\n\r\n{body}", body.len())
        .into_bytes()
}

/// The body of a failing `/readyz`: every check, etcd failed (about 2 KiB).
pub fn failing_body() -> String {
    let mut body = String::new();
    for check in CHECKS {
        if check == "etcd" {
            body.push_str("[-]etcd failed: reason withheld\n");
        } else {
            body.push_str(&format!("[+]{check} ok\n"));
        }
    }
    body.push_str("readyz check failed\n");
    body
}

struct Answers {
    ok: Vec<u8>,
    failing: Vec<u8>,
    closing: Vec<u8>,
}

pub struct Server {
    pub addr: SocketAddr,
    ca: CertificateDer<'static>,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Server {
    pub fn start() -> Server {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "probe-client-cost CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // No session tickets: each run's connection is a full handshake, and no ticket
        // stored by one run is freed by the next (which would blur the heap figures).
        config.send_tls13_tickets = 0;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let answers = Arc::new(Answers {
            ok: response("200 OK", "ok", ""),
            failing: response("500 Internal Server Error", &failing_body(), ""),
            closing: response("200 OK", "ok", "Connection: close\r\n"),
        });

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let tcp = tokio::select! {
                        accepted = listener.accept() => accepted.unwrap().0,
                        _ = &mut stopped => return,
                    };
                    tokio::spawn(serve(acceptor.clone(), tcp, answers.clone()));
                }
            });
        });
        Server { addr, ca: ca.der().clone(), stop, thread }
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        client_config(self.ca.clone())
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
        self.thread.join().unwrap();
    }

    /// For `one`: this server in this process, its address and CA (hex DER) on two lines of
    /// stdout, until stdin closes (bounded: [`SERVE_AT_MOST`]).
    pub fn serve_stdio() {
        let server = Server::start();
        let hex: String = server.ca.iter().map(|b| format!("{b:02x}")).collect();
        println!("{}\n{hex}", server.addr);
        let (done, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = std::io::Read::read(&mut std::io::stdin(), &mut [0u8; 1]);
            let _ = done.send(());
        });
        let _ = wait.recv_timeout(SERVE_AT_MOST);
        server.stop();
    }

    /// The other end of [`Server::serve_stdio`], started as a child of this process: the
    /// address and client config, and the child (which ends when its stdin closes).
    pub fn child() -> (SocketAddr, Arc<ClientConfig>, std::process::Child) {
        use std::io::BufRead as _;
        use std::process::{Command, Stdio};
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = lines.next().unwrap().unwrap().parse().unwrap();
        let hex = lines.next().unwrap().unwrap();
        let der: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        (addr, client_config(CertificateDer::from(der)), child)
    }
}

/// Bound on [`Server::serve_stdio`].
const SERVE_AT_MOST: Duration = Duration::from_secs(600);

fn client_config(ca: CertificateDer<'static>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca).unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // As the prober's (probe/tls.rs).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Bound on the requests of one connection (a run makes at most a million and some).
const MAX_REQUESTS: u64 = 2_000_000;

/// After an answer, how long a scripted failure waits on the idle connection.
const IDLE_THEN: Duration = Duration::from_millis(100);

async fn serve(acceptor: TlsAcceptor, tcp: tokio::net::TcpStream, answers: Arc<Answers>) {
    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    for _ in 0..MAX_REQUESTS {
        // One request head (the clients send no body).
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
        };
        let line_end = buf.iter().position(|&b| b == b'\r').unwrap_or(0);
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        buf.drain(..head_end);
        let path = line.split(' ').nth(1).unwrap_or("");
        let answer: &[u8] = match (line.starts_with("OPTIONS "), path) {
            (true, _) => OPTIONS_OK.as_bytes(),
            (false, "/readyz") => &answers.ok,
            (false, "/readyz-failing") => &answers.failing,
            (false, "/close-before-answer") => {
                let _ = tls.shutdown().await;
                return;
            }
            (false, "/half-then-close") => {
                let _ = tls.write_all(b"HTTP/1.1 20").await;
                let _ = tls.shutdown().await;
                return;
            }
            (false, "/answer-then-close") => {
                let _ = tls.write_all(&answers.closing).await;
                let _ = tls.shutdown().await;
                return;
            }
            (false, idle @ ("/fin-when-idle" | "/rst-when-idle" | "/stray-when-idle")) => {
                let _ = tls.write_all(&answers.ok).await;
                let _ = tls.flush().await;
                tokio::time::sleep(IDLE_THEN).await;
                match idle {
                    "/fin-when-idle" => {
                        let _ = tls.shutdown().await;
                    }
                    "/rst-when-idle" => {
                        let _ = socket2::SockRef::from(tls.get_ref().0).set_linger(Some(Duration::ZERO));
                    }
                    _ => {
                        let _ = tls.write_all(b"garbage\r\n").await;
                        let _ = tls.flush().await;
                        tokio::time::sleep(IDLE_THEN).await;
                    }
                }
                return;
            }
            (false, _) => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        };
        if tls.write_all(answer).await.is_err() || tls.flush().await.is_err() {
            return;
        }
    }
}
