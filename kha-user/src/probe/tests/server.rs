//! An in-process HTTPS server on 127.0.0.1 with certificates generated at test time, whose
//! answer is scripted per test, and which can "die" on demand.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub const FAILING_BODY: &str = "[-]etcd failed: reason withheld\nreadyz check failed";

/// kube-apiserver's answer to an anonymous request with `--anonymous-auth=false`.
const UNAUTHORIZED: &str = "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 128\r\n\r\n{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\",\"message\":\"Unauthorized\",\"reason\":\"Unauthorized\",\"code\":401}";
/// ... and when RBAC does not let the user read `/readyz`.
const FORBIDDEN: &str = "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 61\r\n\r\nforbidden: User \"system:anonymous\" cannot get path \"/readyz\"\n";

/// A certificate authority made at test time.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, as DER for a server config and PEM for files.
pub struct Issued {
    pub cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `sans` (strings that parse as IPs become IP SANs).
    pub fn issue(&self, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, sans.first().copied().unwrap_or("client"));
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for 127.0.0.1, as kube-apiserver's carries its own address.
    pub fn localhost(&self) -> Issued {
        self.issue(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config for `issued`; with `client_ca`, a client certificate from it is required.
pub fn server_config(issued: &Issued, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.cert.der().clone()).unwrap();
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(vec![issued.cert_der.clone()], issued.key()).unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// What the server does with each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// 200 with Content-Length.
    Ok,
    /// 200 with a chunked body.
    OkChunked,
    /// 500 with [`FAILING_BODY`].
    Failing,
    /// [`Reply::Failing`] to the server's first readiness request, 200 to every later one (a
    /// master whose etcd came back).
    FailingFirst,
    /// Reads the request, never answers.
    Silent,
    /// 200, then a chunked body that never ends.
    Endless,
    /// Bytes that are not HTTP.
    Garbage,
    /// 200 with `Connection: close`, then closes.
    OkThenClose,
    /// 200 (keep-alive as far as the headers go), then closes at once.
    OkThenCloseUnannounced,
    /// 200, then after 150 ms, on the idle connection, bytes nobody asked for.
    OkThenStrayBytes,
    /// 200 to the first request on a connection; closes on the second without answering (a
    /// server's idle timeout racing the client's next request).
    OnePerConnection,
    /// On the first connection, half a status line and then a reset (the master died in the
    /// middle of its answer); 200 on every later one.
    ResetMidResponseOnce,
    /// 401 with a JSON `Status` body, as kube-apiserver with `--anonymous-auth=false` answers a
    /// request without a client certificate.
    Unauthorized,
    /// 403, as kube-apiserver answers when RBAC denies the user `/readyz`.
    Forbidden,
    /// 200 after [`SLOW_READY`]: a `/readyz` waiting on a slow etcd (liveness is answered at once).
    SlowReady,
}

/// How long [`Reply::SlowReady`] takes: longer than the silence that confirms a master gone.
pub const SLOW_READY: Duration = Duration::from_millis(2500);

/// How [`Server::kill`] ends things.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    Alive,
    /// Close every connection (FIN, no TLS close_notify: what the kernel does for a killed
    /// process) and stop listening.
    Die,
    /// Reset every connection (RST), keep listening.
    ResetConnections,
}

pub struct Server {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    /// When each connection was accepted.
    accepted_at: Arc<Mutex<Vec<Instant>>>,
    kill: watch::Sender<Kill>,
    /// `false`: connections are left in the listen queue.
    accepting: watch::Sender<bool>,
    /// `true`: no answer is written (the process is stopped; its kernel still takes the bytes).
    frozen: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
}

impl Server {
    pub async fn start(config: Arc<ServerConfig>, reply: Reply) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Server::on(listener, config, reply)
    }

    /// A server whose listen queue holds a single connection, so that while it does not
    /// accept ([`Server::stop_accepting`]) and one connection waits, the kernel drops every
    /// further SYN: the silence of a paused or blackholed master, without root.
    pub async fn start_with_tiny_backlog(config: Arc<ServerConfig>, reply: Reply) -> Server {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Server::on(socket.listen(0).unwrap(), config, reply)
    }

    fn on(listener: TcpListener, config: Arc<ServerConfig>, reply: Reply) -> Server {
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let accepted_at = Arc::new(Mutex::new(Vec::new()));
        let (kill, mut kill_rx) = watch::channel(Kill::Alive);
        let (accepting, mut accepting_rx) = watch::channel(true);
        let (frozen, _) = watch::channel(false);
        let frozen2 = frozen.clone();
        let acceptor = TlsAcceptor::from(config);
        let (accepts2, requests2, kill2, at2) =
            (accepts.clone(), requests.clone(), kill.clone(), accepted_at.clone());
        let accept_task = tokio::spawn(async move {
            loop {
                let open = *accepting_rx.borrow_and_update();
                let tcp = tokio::select! {
                    accepted = listener.accept(), if open => match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(_) => return,
                    },
                    _ = accepting_rx.changed() => continue,
                    changed = kill_rx.changed() => match changed {
                        Ok(()) if *kill_rx.borrow() != Kill::Die => continue,
                        _ => return, // drops the listener: later connects are refused
                    },
                };
                let nth = accepts2.fetch_add(1, Ordering::SeqCst);
                at2.lock().unwrap().push(Instant::now());
                let mut kill = kill2.subscribe();
                kill.borrow_and_update();
                let frozen = frozen2.subscribe();
                tokio::spawn(serve(tcp, acceptor.clone(), reply, nth, requests2.clone(), kill, frozen));
            }
        });
        Server { addr, accepts, requests, accepted_at, kill, accepting, frozen, accept_task }
    }

    /// When each connection so far was accepted.
    pub fn accepted_at(&self) -> Vec<Instant> {
        self.accepted_at.lock().unwrap().clone()
    }

    pub fn stop_accepting(&self) {
        self.accepting.send_replace(false);
    }

    pub fn resume_accepting(&self) {
        self.accepting.send_replace(true);
    }

    /// TCP connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// SIGSTOP (`true`) and SIGCONT (`false`): nothing is accepted or answered meanwhile, the
    /// kernel still completes connections into the listen queue and takes the bytes; at the
    /// thaw every pending request is answered.
    pub fn freeze(&self, on: bool) {
        self.frozen.send_replace(on);
        self.accepting.send_replace(!on);
    }

    pub fn kill(&self, how: Kill) {
        self.kill.send_replace(how);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.kill.send_replace(Kill::Die);
    }
}

/// Serves one connection until the client leaves or the server is killed.
async fn serve(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    reply: Reply,
    nth_connection: usize,
    requests: Arc<AtomicUsize>,
    mut kill: watch::Receiver<Kill>,
    frozen: watch::Receiver<bool>,
) {
    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
    let reply = match reply {
        Reply::ResetMidResponseOnce if nth_connection > 0 => Reply::Ok,
        r => r,
    };
    tokio::select! {
        () = answer_requests(&mut tls, reply, &requests, frozen) => {}
        changed = kill.changed() => {
            if changed.is_ok() && *kill.borrow() == Kill::ResetConnections {
                socket2::SockRef::from(tls.get_ref().0).set_linger(Some(Duration::ZERO)).unwrap();
            }
        }
    }
    // Dropping the stream closes the socket without a TLS close_notify.
}

async fn answer_requests(
    tls: &mut TlsStream<TcpStream>,
    reply: Reply,
    requests: &AtomicUsize,
    mut frozen: watch::Receiver<bool>,
) {
    let mut nth = 0;
    loop {
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0; 1024];
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if head.starts_with(b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1:") {
            // The liveness request, answered as Go's server does, whatever the scripted reply
            // to readiness; a silent server answers nothing.
            if reply == Reply::Silent {
                std::future::pending::<()>().await;
            }
            let options = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
            if tls.write_all(options).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            continue;
        }
        assert!(head.starts_with(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1:"), "{}", head.escape_ascii());
        if reply == Reply::OnePerConnection && nth > 0 {
            return;
        }
        nth += 1;
        let first = requests.fetch_add(1, Ordering::SeqCst) == 0;
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
        let reply = match reply {
            Reply::FailingFirst if first => Reply::Failing,
            Reply::FailingFirst => Reply::Ok,
            r => r,
        };
        let written = match reply {
            Reply::Ok | Reply::OnePerConnection => tls.write_all(ok).await,
            Reply::OkChunked => {
                tls.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
                    .await
            }
            Reply::Failing => {
                let response = format!(
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{FAILING_BODY}",
                    FAILING_BODY.len()
                );
                tls.write_all(response.as_bytes()).await
            }
            Reply::Silent => std::future::pending().await,
            Reply::FailingFirst => unreachable!("resolved above"),
            Reply::Endless => {
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").await;
                let chunk = [&b"400\r\n"[..], &[b'x'; 0x400], b"\r\n"].concat();
                while tls.write_all(&chunk).await.is_ok() {}
                return;
            }
            Reply::Garbage => tls.write_all(b"\x00\xffSSH-2.0-garbage\r\n\r\n").await,
            Reply::OkThenClose => {
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                let _ = tls.shutdown().await;
                return;
            }
            Reply::OkThenCloseUnannounced => {
                let _ = tls.write_all(ok).await;
                let _ = tls.flush().await;
                return;
            }
            Reply::ResetMidResponseOnce => {
                let _ = tls.write_all(b"HTTP/1.1 200").await;
                let _ = tls.flush().await;
                socket2::SockRef::from(tls.get_ref().0).set_linger(Some(Duration::ZERO)).unwrap();
                return;
            }
            Reply::Unauthorized => tls.write_all(UNAUTHORIZED.as_bytes()).await,
            Reply::SlowReady => {
                tokio::time::sleep(SLOW_READY).await;
                tls.write_all(ok).await
            }
            Reply::Forbidden => tls.write_all(FORBIDDEN.as_bytes()).await,
            Reply::OkThenStrayBytes => {
                let _ = tls.write_all(ok).await;
                let _ = tls.flush().await;
                tokio::time::sleep(Duration::from_millis(150)).await;
                tls.write_all(b"surprise").await
            }
        };
        if written.is_err() || tls.flush().await.is_err() {
            return;
        }
    }
}

/// A scratch directory for PEM files, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("kha-probe-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
