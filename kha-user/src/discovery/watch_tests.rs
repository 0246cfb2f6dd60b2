//! The watcher task against the fake API server over TLS: kube-rs's real requests, added and
//! removed masters, failures, and a kubelet-style client certificate.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tokio::sync::mpsc;

use kha_lab::fake_apiserver::{FakeApiserver, FakeTls, SLICES_PATH};

use super::{
    Feed, Update, state,
    watch::{DiscoveryError, Route, WatchSettings, spawn},
};
use crate::config::{Config, FrontendDefaults};

struct Pki {
    dir: PathBuf,
    ca_file: PathBuf,
    ca_pem: String,
    server_cert: String,
    server_key: String,
    /// A kubelet-style client certificate: certificate and key in one file.
    client_file: PathBuf,
}

fn pki(name: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("kha-discovery-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "kubernetes");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let issue = |sans: Vec<String>, cn: &str, usage| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue(
        vec!["127.0.0.1".into(), "localhost".into()],
        "kube-apiserver",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = issue(vec![], "system:node:node-1", ExtendedKeyUsagePurpose::ClientAuth);
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let client_file = dir.join("kubelet-client-current.pem");
    std::fs::write(&client_file, format!("{client_cert}{client_key}")).unwrap();
    Pki { dir, ca_file, ca_pem: ca.pem(), server_cert, server_key, client_file }
}

fn fake(p: &Pki, client_ca: bool) -> FakeApiserver {
    FakeApiserver::start(FakeTls {
        cert_pem: p.server_cert.as_bytes(),
        key_pem: p.server_key.as_bytes(),
        client_ca_pem: client_ca.then_some(p.ca_pem.as_bytes()),
    })
    .unwrap()
}

fn settings(kubeconfig: PathBuf, state_dir: &Path) -> WatchSettings {
    let mut s = WatchSettings::new(kubeconfig, Some(state_dir.to_owned()));
    s.watch_timeout = Duration::from_secs(1);
    s
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn set(v: &[&str]) -> BTreeSet<SocketAddr> {
    v.iter().map(|s| sa(s)).collect()
}

fn masters(v: &[&str]) -> Vec<SocketAddr> {
    v.iter().map(|s| sa(s)).collect()
}

async fn next(rx: &mut mpsc::Receiver<Update>) -> Update {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("an update within 30 s")
        .expect("the watcher task runs")
}

async fn discovered(rx: &mut mpsc::Receiver<Update>) -> BTreeSet<SocketAddr> {
    match next(rx).await {
        Update::Discovered(s) => s,
        Update::Failed(e) => panic!("discovery failed: {}", super::chain(&e)),
    }
}

async fn failed(rx: &mut mpsc::Receiver<Update>) -> DiscoveryError {
    match next(rx).await {
        Update::Failed(e) => e,
        Update::Discovered(s) => panic!("expected a failure, discovered {s:?}"),
    }
}

const M1: &str = "192.0.2.11:6443";
const M2: &str = "192.0.2.12:6443";
const M3: &str = "192.0.2.13:6443";

#[tokio::test]
async fn added_and_removed_masters_are_followed_and_persisted() {
    let p = pki("follow");
    let server = fake(&p, false);
    server.set_masters("kubernetes", &masters(&[M1, M2]));
    // Another service's slice in the same namespace must not count.
    server.apply(serde_json::json!({
        "metadata": {"name": "other-abcde", "labels": {"kubernetes.io/service-name": "other"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.0.2.99"]}],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
    }));
    let kubeconfig = server.write_kubeconfig(&p.dir.join("kubeconfig"), &p.ca_file, None).unwrap();
    let state_dir = p.dir.join("state");
    let mut rx = spawn(settings(kubeconfig, &state_dir));
    assert_eq!(discovered(&mut rx).await, set(&[M1, M2]));

    server.set_masters("kubernetes", &masters(&[M1, M2, M3]));
    assert_eq!(discovered(&mut rx).await, set(&[M1, M2, M3]));
    // Another slice labelled for the kubernetes service is not the apiservers' own: whoever
    // wrote it cannot add masters (the next change shows only the real slice's endpoints).
    server.set_masters("kubernetes-forged", &masters(&["[2001:db8::14]:6443", "192.0.2.99:6443"]));
    server.set_masters("kubernetes", &masters(&[M1, M3]));
    assert_eq!(discovered(&mut rx).await, set(&[M1, M3]));
    assert_eq!(state::load(&state_dir).unwrap(), Some(set(&[M1, M3])), "persisted");

    // After a watch timeout (1 s here) the watcher goes on from where it was.
    let watches = || server.requests().iter().filter(|r| r.contains("watch=true")).count();
    tokio::time::timeout(Duration::from_secs(10), async {
        while watches() < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a second watch after the first timed out");
    server.set_masters("kubernetes", &masters(&[M3]));
    assert_eq!(discovered(&mut rx).await, set(&[M3]));

    // What kube-rs asked: a list and watches of the one resource, by the service's label.
    let requests = server.requests();
    let label = "labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes";
    assert!(
        requests.iter().all(|r| r.starts_with(&format!("GET {SLICES_PATH}?")) && r.contains(label)),
        "{requests:#?}"
    );
    assert!(requests.iter().any(|r| !r.contains("watch=true")), "a list: {requests:#?}");
    assert!(
        requests.iter().filter(|r| r.contains("watch=true") && r.contains("resourceVersion=")).count() >= 2
    );
    let _ = std::fs::remove_dir_all(&p.dir);
}

#[tokio::test]
async fn failures_keep_the_last_set_and_recovery_follows() {
    let p = pki("failure");
    let mut server = fake(&p, false);
    server.set_masters("kubernetes", &masters(&[M1, M2]));
    let kubeconfig = server.write_kubeconfig(&p.dir.join("kubeconfig"), &p.ca_file, None).unwrap();
    let state_dir = p.dir.join("state");
    let mut rx = spawn(settings(kubeconfig, &state_dir));
    let base = Config::from_flags(&[], &[M1.to_string()], &FrontendDefaults::default()).unwrap();
    let mut base = base;
    base.frontends.iter_mut().for_each(|f| f.discover = true);
    let mut feed = Feed::new(base, BTreeSet::new());
    let served = |feed: &Feed| feed.effective().frontends[0].backends.clone();

    assert!(feed.update(Update::Discovered(discovered(&mut rx).await)).is_some());
    assert_eq!(served(&feed), masters(&[M1, M2]));

    // The apiserver answers 500 and cuts the watch: reported, and nothing changes.
    server.set_failing(true);
    let e = failed(&mut rx).await;
    assert!(matches!(e, DiscoveryError::Watch(_)), "{e:?}");
    assert!(feed.update(Update::Failed(e)).is_none());
    assert_eq!(served(&feed), masters(&[M1, M2]));

    // Back, with a change made meanwhile: picked up after the backoff.
    server.set_masters("kubernetes", &masters(&[M2, M3]));
    server.set_failing(false);
    let c = feed.update(Update::Discovered(discovered(&mut rx).await)).unwrap();
    assert_eq!(c.frontends[0].backends, masters(&[M2, M3]));

    // The server dies: the set stays, and so does the state file.
    server.stop();
    let e = failed(&mut rx).await;
    assert!(feed.update(Update::Failed(e)).is_none());
    assert_eq!(served(&feed), masters(&[M2, M3]));
    assert_eq!(state::load(&state_dir).unwrap(), Some(set(&[M2, M3])));
    let _ = std::fs::remove_dir_all(&p.dir);
}

#[tokio::test]
async fn an_empty_service_is_reported_but_never_persisted() {
    let p = pki("empty");
    let server = fake(&p, false);
    server.set_masters("kubernetes", &masters(&[M1]));
    let kubeconfig = server.write_kubeconfig(&p.dir.join("kubeconfig"), &p.ca_file, None).unwrap();
    let state_dir = p.dir.join("state");
    let mut rx = spawn(settings(kubeconfig, &state_dir));
    assert_eq!(discovered(&mut rx).await, set(&[M1]));
    server.delete("kubernetes");
    assert_eq!(discovered(&mut rx).await, set(&[]));
    assert_eq!(state::load(&state_dir).unwrap(), Some(set(&[M1])), "the last good set stays on disk");
    let _ = std::fs::remove_dir_all(&p.dir);
}

#[tokio::test]
async fn kubelet_style_client_certificate_in_one_file() {
    let p = pki("client-cert");
    let server = fake(&p, true);
    server.set_masters("kubernetes", &masters(&[M1]));
    let with = server
        .write_kubeconfig(&p.dir.join("kubelet.conf"), &p.ca_file, Some((&p.client_file, &p.client_file)))
        .unwrap();
    let mut rx = spawn(settings(with, &p.dir.join("state")));
    assert_eq!(discovered(&mut rx).await, set(&[M1]));

    let without = server.write_kubeconfig(&p.dir.join("anonymous.conf"), &p.ca_file, None).unwrap();
    let mut rx = spawn(settings(without, &p.dir.join("state2")));
    assert!(matches!(failed(&mut rx).await, DiscoveryError::Watch(_)));
    let _ = std::fs::remove_dir_all(&p.dir);
}

#[tokio::test]
async fn a_missing_kubeconfig_is_a_failure_not_a_crash() {
    let dir = std::env::temp_dir().join(format!("kha-discovery-{}-missing", std::process::id()));
    let mut rx = spawn(WatchSettings::new(dir.join("nonexistent.conf"), None));
    let e = failed(&mut rx).await;
    assert!(matches!(e, DiscoveryError::Kubeconfig { .. }), "{e:?}");
    assert!(super::chain(&e).contains("nonexistent.conf"), "{}", super::chain(&e));
}

#[tokio::test]
async fn the_kubeconfig_is_read_again_when_failures_last() {
    // As when the kubelet's client certificate was rotated, or the kubeconfig moved to another
    // endpoint: the client is built anew from the file.
    let p = pki("rebuild");
    let mut old = fake(&p, false);
    old.set_masters("kubernetes", &masters(&[M1]));
    let path = p.dir.join("kubeconfig");
    old.write_kubeconfig(&path, &p.ca_file, None).unwrap();
    let mut s = settings(path.clone(), &p.dir.join("state"));
    s.rebuild_after_errors = Duration::from_secs(1);
    let mut rx = spawn(s);
    assert_eq!(discovered(&mut rx).await, set(&[M1]));
    old.stop();
    failed(&mut rx).await;
    let new = fake(&p, false);
    new.set_masters("kubernetes", &masters(&[M2]));
    new.write_kubeconfig(&path, &p.ca_file, None).unwrap();
    assert_eq!(discovered(&mut rx).await, set(&[M2]));
    let _ = std::fs::remove_dir_all(&p.dir);
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test]
async fn through_kha_s_own_frontend_discovery_asks_the_known_masters_directly() {
    // The kubeconfig names https://localhost:PORT, which is kha's frontend, and nothing
    // answers there (on a node: the frontend serves a broken set). The masters the agent
    // knows are asked instead, best first; when one fails, the next.
    let p = pki("direct");
    let mut a = fake(&p, false);
    a.set_masters("kubernetes", &masters(&[M1]));
    let b = fake(&p, false);
    b.set_masters("kubernetes", &masters(&[M2]));
    let frontend = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let dead = SocketAddr::from(([127, 0, 0, 1], closed_port()));
    let path = p.dir.join("kubelet.conf");
    let text = std::fs::read_to_string(a.write_kubeconfig(&path, &p.ca_file, None).unwrap()).unwrap();
    std::fs::write(&path, text.replace(&a.url(), &format!("https://localhost:{}", frontend.port()))).unwrap();
    let (tx, known) = tokio::sync::watch::channel(Route {
        frontends: [frontend, sa("[::1]:6443")].into(),
        masters: vec![dead, a.addr, b.addr],
    });
    let mut s = settings(path, &p.dir.join("state"));
    s.known = Some(known);
    let mut rx = spawn(s);
    // The dead master's failure is reported (once), then the next one answers.
    assert!(matches!(failed(&mut rx).await, DiscoveryError::Watch(_)));
    assert_eq!(discovered(&mut rx).await, set(&[M1]), "the dead master skipped, the next one asked");
    assert!(a.requests().iter().any(|r| r.starts_with(&format!("GET {SLICES_PATH}?"))));
    // Master a dies: the watcher moves on to b.
    a.stop();
    assert!(matches!(failed(&mut rx).await, DiscoveryError::Watch(_)));
    assert_eq!(discovered(&mut rx).await, set(&[M2]));
    // The agent no longer lists b (it went down): the watcher leaves it, and with no master
    // known at all it tries the kubeconfig's server (kha's frontend), which fails here.
    tx.send_modify(|r| r.masters.clear());
    assert!(matches!(failed(&mut rx).await, DiscoveryError::Watch(_)));
    let _ = std::fs::remove_dir_all(&p.dir);
}

#[test]
fn the_kubeconfig_server_is_kha_s_frontend_when_it_names_one() {
    use super::watch::{redirect, via_frontend};
    let frontends: BTreeSet<SocketAddr> = [sa("127.0.0.1:6443"), sa("[::1]:6443")].into();
    let config = |url: &str| kube::Config::new(url.parse().unwrap());
    for url in
        ["https://localhost:6443", "https://127.0.0.1:6443", "https://[::1]:6443", "https://LOCALHOST:6443"]
    {
        assert!(via_frontend(&config(url), &frontends), "{url}");
    }
    for url in
        ["https://localhost:6444", "https://192.0.2.11:6443", "https://lb.example:6443", "https://localhost"]
    {
        assert!(!via_frontend(&config(url), &frontends), "{url}");
    }
    // Redirected: the master's address, the kubeconfig's name to verify.
    let mut c = config("https://localhost:6443");
    assert!(redirect(&mut c, sa("[2001:db8::12]:6443")));
    assert_eq!(c.cluster_url.to_string(), "https://[2001:db8::12]:6443/");
    assert_eq!(c.tls_server_name.as_deref(), Some("localhost"));
    let mut c = config("https://[::1]:6443");
    assert!(redirect(&mut c, sa(M1)));
    assert_eq!(c.tls_server_name.as_deref(), Some("::1"));
    // A tls-server-name of the kubeconfig's own wins.
    let mut c = config("https://127.0.0.1:6443");
    c.tls_server_name = Some("kubernetes".into());
    assert!(redirect(&mut c, sa(M1)));
    assert_eq!(c.tls_server_name.as_deref(), Some("kubernetes"));
}
