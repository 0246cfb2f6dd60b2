//! The in-process master over real TLS on 127.0.0.1 ephemeral ports, driven
//! by the lab client. No root needed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kha_lab::client::{self, ClientOptions, HttpsUrl, RequestRecord, Reuse};
use kha_lab::http::Limits;
use kha_lab::master::{self, MasterConfig, READYZ_FAILED_BODY, RunningMaster};
use kha_lab::pki::{CertAuthority, MasterIdentity, Pki};
use kha_lab::{FailureMode, tls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn identity() -> MasterIdentity {
    MasterIdentity::new("m1", ["192.0.2.11".parse().unwrap(), "2001:db8::11".parse().unwrap()])
}

async fn start_master(pki_cert: &kha_lab::pki::IssuedCert) -> RunningMaster {
    let tls = tls::server_config_from_pem(pki_cert.cert_pem.as_bytes(), pki_cert.key_pem.as_bytes())
        .expect("server tls");
    let mut config = MasterConfig::new("m1", tls);
    config.listen = vec!["127.0.0.1:0".parse().unwrap()];
    config.ident_listen = vec!["127.0.0.1:0".parse().unwrap()];
    master::start(config).await.expect("start master")
}

fn options(ca_pem: &str, addr: SocketAddr, path: &str, count: u64, reuse: Reuse) -> ClientOptions {
    ClientOptions {
        url: HttpsUrl::parse(&format!("https://localhost:{}{path}", addr.port())).expect("url"),
        connect_addr: Some(addr),
        count,
        interval: Duration::ZERO,
        timeout: Duration::from_millis(2000),
        reuse,
        tls: tls::client_config_from_ca_pem(ca_pem.as_bytes()).expect("client tls"),
        limits: Limits::default(),
        options_star: false,
    }
}

async fn run(opts: &ClientOptions) -> (Vec<RequestRecord>, client::RequestSummary) {
    let mut records = Vec::new();
    let summary = client::run(opts, |r| records.push(r.clone())).await;
    (records, summary)
}

#[tokio::test]
async fn version_is_json_and_names_the_master() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    let (records, summary) =
        run(&options(&pki.ca_cert_pem, addr, "/version", 1, Reuse::NewConnectionEach)).await;
    assert_eq!(summary.ok, 1, "{records:?}");
    assert_eq!(records[0].master.as_deref(), Some("m1"));
    assert_eq!(records[0].peer, Some(addr.to_string()));

    // Look at the body itself over a raw client connection.
    let body = raw_get(&pki.ca_cert_pem, addr, "/version").await;
    let (head, json) = body.split_once("\r\n\r\n").expect("head/body");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    assert!(head.contains("X-Kha-Lab-Master: m1"), "{head}");
    let v: serde_json::Value = serde_json::from_str(json).expect("json body");
    assert_eq!(v["major"], "1");
    assert_eq!(v["gitVersion"], "v1.31.0");
    assert_eq!(v["platform"], "linux/amd64");
}

/// A TLS connection to the master that trusts `ca_pem`.
async fn tls_connect(ca_pem: &str, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tls = tls::client_config_from_ca_pem(ca_pem.as_bytes()).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.expect("handshake")
}

/// One request with `Connection: close`, returning everything the server sent.
async fn raw_get(ca_pem: &str, addr: SocketAddr, path: &str) -> String {
    let mut s = tls_connect(ca_pem, addr).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out))
        .await
        .expect("response in time");
    String::from_utf8(out).expect("utf8")
}

#[tokio::test]
async fn health_endpoints_and_not_found() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    for path in ["/readyz", "/livez", "/healthz", "/readyz?verbose"] {
        let resp = raw_get(&pki.ca_cert_pem, addr, path).await;
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n") && resp.ends_with("\r\n\r\nok"), "{path}: {resp}");
    }
    let resp = raw_get(&pki.ca_cert_pem, addr, "/api/v1/pods").await;
    assert!(resp.starts_with("HTTP/1.1 404 "), "{resp}");
    assert!(resp.contains("X-Kha-Lab-Master: m1") && resp.contains("\"kind\":\"Status\""), "{resp}");
}

#[tokio::test]
async fn readyz_500_mode_fails_readyz_only() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    m.set_mode(FailureMode::Readyz500);
    let resp = raw_get(&pki.ca_cert_pem, addr, "/readyz").await;
    assert!(resp.starts_with("HTTP/1.1 500 "), "{resp}");
    assert!(resp.ends_with(&format!("\r\n\r\n{READYZ_FAILED_BODY}")), "{resp}");
    assert!(resp.contains("X-Kha-Lab-Master: m1"), "{resp}");
    let (records, summary) =
        run(&options(&pki.ca_cert_pem, addr, "/readyz", 2, Reuse::NewConnectionEach)).await;
    assert_eq!(summary.errors["status:500"], 2, "{records:?}");
    assert_eq!(summary.by_master["m1"], 2);
    assert!(raw_get(&pki.ca_cert_pem, addr, "/livez").await.ends_with("ok"));
    m.set_mode(FailureMode::Normal);
    assert!(raw_get(&pki.ca_cert_pem, addr, "/readyz").await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    let (records, summary) = run(&options(&pki.ca_cert_pem, addr, "/readyz", 4, Reuse::KeepAlive)).await;
    assert_eq!(summary.ok, 4, "{records:?}");
    assert!(!records[0].reused);
    assert!(records[1..].iter().all(|r| r.reused && r.local == records[0].local), "{records:?}");

    let (records, _) = run(&options(&pki.ca_cert_pem, addr, "/readyz", 3, Reuse::NewConnectionEach)).await;
    assert!(records.iter().all(|r| !r.reused));
    assert_ne!(records[0].local, records[1].local);
}

#[tokio::test]
async fn hang_mode_accepts_new_connections_but_never_handshakes() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    let mut opts = options(&pki.ca_cert_pem, addr, "/readyz", 2, Reuse::NewConnectionEach);
    opts.timeout = Duration::from_millis(300);
    m.set_mode(FailureMode::Hang);
    let (records, summary) = run(&opts).await;
    assert_eq!(summary.errors.get("tls:ETIMEDOUT"), Some(&2), "{records:?}");
    // The TCP connection itself was accepted.
    assert!(records.iter().all(|r| r.peer == Some(addr.to_string())), "{records:?}");
}

#[tokio::test]
async fn hang_mode_holds_requests_on_open_connections() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    let mut s = tls_connect(&pki.ca_cert_pem, addr).await;
    m.set_mode(FailureMode::Hang);
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
    assert!(read.is_err(), "hanging master answered: {read:?}");
}

#[tokio::test]
async fn wrong_ca_fails_the_handshake() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let other = CertAuthority::new("kha-lab other CA").expect("other CA");
    let foreign = other.issue_server(&identity()).expect("foreign cert");
    let m = start_master(&foreign).await;
    let (records, summary) =
        run(&options(&pki.ca_cert_pem, m.https_addrs()[0], "/readyz", 1, Reuse::NewConnectionEach)).await;
    assert_eq!(summary.errors.get("tls:unknown_issuer"), Some(&1), "{records:?}");
}

#[tokio::test]
async fn bad_requests_get_an_error_status_and_the_master_survives() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    let tls: Arc<rustls::ClientConfig> = tls::client_config_from_ca_pem(pki.ca_cert_pem.as_bytes()).unwrap();
    // hyper answers what it cannot parse; a chunked POST it parses, and the master refuses
    // the method as kube-apiserver would.
    let cases: [(&[u8], &str); 3] = [
        (b"GARBAGE\r\n\r\n", "400"),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
            "405",
        ),
        (&[b'A'; 20 * 1024], "431"),
    ];
    for (input, status) in cases {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, tcp).await.unwrap();
        s.write_all(input).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out))
            .await
            .expect("closed in time");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{status}: {text}");
        assert!(text.contains("Connection: close"), "{text}");
    }
    // Garbage that is not even TLS.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), raw.read_to_end(&mut sink)).await.expect("closed");
    assert!(raw_get(&pki.ca_cert_pem, addr, "/readyz").await.ends_with("ok"));
}

#[tokio::test]
async fn bulk_streams_exactly_the_bytes_asked_for_and_refuses_too_many() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    // Three pieces and a bit: the last one short.
    let n = 3 * 64 * 1024 + 5;
    let resp = raw_get(&pki.ca_cert_pem, addr, &format!("/bulk?bytes={n}")).await;
    let (head, body) = resp.split_once("\r\n\r\n").expect("head/body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains(&format!("Content-Length: {n}")) && head.contains("X-Kha-Lab-Master: m1"),
        "{head}"
    );
    assert_eq!(body.len(), n);
    assert!(body.bytes().all(|b| b == b'k'));
    let too_many =
        raw_get(&pki.ca_cert_pem, addr, &format!("/bulk?bytes={}", master::MAX_BULK_BYTES + 1)).await;
    assert!(too_many.starts_with("HTTP/1.1 400 ") && too_many.contains("BadRequest"), "{too_many}");
}

#[tokio::test]
async fn endless_mode_dribbles_a_body_that_never_ends() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    m.set_mode(FailureMode::Endless);
    let mut s = tls_connect(&pki.ca_cert_pem, addr).await;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    // 1.1 s: the first byte at once, then one every 200 ms (bounds loose enough for a busy
    // machine: more than one byte, far fewer than a stream that is not dribbling).
    let _ = tokio::time::timeout(Duration::from_millis(1100), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains(&format!("Content-Length: {}", master::MAX_BULK_BYTES)), "{head}");
    assert!((2..64).contains(&body.len()) && body.bytes().all(|b| b == b'k'), "{body:?}");
}

#[tokio::test]
async fn identity_port_sends_the_name() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let opts = kha_lab::connect::ConnectOptions {
        addr: m.ident_addrs()[0],
        count: 3,
        interval: Duration::ZERO,
        timeout: Duration::from_secs(2),
        read_ident: true,
    };
    let summary = kha_lab::connect::run(&opts, |_| {}).await;
    assert_eq!(summary.by_master["m1"], 3, "{summary:?}");
}

#[tokio::test]
async fn shutdown_closes_listeners() {
    let pki = Pki::generate(&[identity()]).expect("pki");
    let m = start_master(pki.master("m1").unwrap()).await;
    let addr = m.https_addrs()[0];
    m.shutdown().await;
    let err = TcpStream::connect(addr).await.expect_err("listener closed");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}
