//! The reload decisions against real files in a scratch directory: what counts as a change,
//! what is refused, and that a refusal leaves the config in use.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::ExtendedKeyUsagePurpose;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use super::*;
use crate::config::ProbeTls;
use crate::probe::tests::server::{Ca, Issued, TempDir};
use crate::probe::{MAX_PEM_BYTES, TlsDefaults};

fn ca_only(path: &Path) -> TlsFiles {
    TlsFiles { ca_file: Some(path.to_owned()), ..TlsFiles::default() }
}

fn with_client(ca: &Path, cert: &Path, key: &Path) -> TlsFiles {
    TlsFiles { client_cert: Some(cert.to_owned()), client_key: Some(key.to_owned()), ..ca_only(ca) }
}

/// Whether `config` verifies a server certificate for 127.0.0.1 issued by `ca`.
fn trusts(config: &ProbeTlsConfig, ca: &Ca) -> bool {
    let server: Issued = ca.localhost();
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let verifier = config.verifier.as_ref().expect("a verifying config");
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        verifier.as_ref(),
        &server.cert_der,
        &[],
        &name,
        &[],
        UnixTime::now(),
    )
    .is_ok()
}

/// The client certificate `config` presents.
fn client_cert(config: &ProbeTlsConfig) -> CertificateDer<'static> {
    let schemes = config.client.crypto_provider().signature_verification_algorithms.supported_schemes();
    let key = config.client.client_auth_cert_resolver.resolve(&[], &schemes).expect("a client certificate");
    key.cert[0].clone()
}

fn rejected(outcome: &[(TlsFiles, Reload)]) -> &ProbeConfigError {
    match outcome {
        [(_, Reload::Rejected(e))] => e,
        other => panic!("expected one rejection, got {other:?}"),
    }
}

fn reloaded(outcome: &[(TlsFiles, Reload)]) -> Arc<ProbeTlsConfig> {
    match outcome {
        [(_, Reload::Reloaded(c))] => c.clone(),
        other => panic!("expected one reload, got {other:?}"),
    }
}

/// Replaces `path` the way installers do: write a temporary file, rename it over.
fn replace(dir: &TempDir, path: &Path, contents: &str) {
    let tmp = dir.write("replacement.tmp", contents);
    std::fs::rename(tmp, path).unwrap();
}

#[test]
fn unchanged_files_are_not_rebuilt() {
    let (dir, a) = (TempDir::new(), Ca::new("A"));
    let files = ca_only(&dir.write("ca.crt", &a.pem()));
    let mut store = TlsStore::default();
    let first = store.load(&files).unwrap();
    assert!(store.check().is_empty());
    assert!(Arc::ptr_eq(&first, &store.load(&files).unwrap()));
}

#[test]
fn a_replaced_ca_is_reloaded() {
    let (dir, a, b) = (TempDir::new(), Ca::new("A"), Ca::new("B"));
    let path = dir.write("ca.crt", &a.pem());
    let files = ca_only(&path);
    let mut store = TlsStore::default();
    let old = store.load(&files).unwrap();
    assert!(trusts(&old, &a) && !trusts(&old, &b));
    replace(&dir, &path, &b.pem());
    let new = reloaded(&store.check());
    assert!(trusts(&new, &b) && !trusts(&new, &a));
    assert!(Arc::ptr_eq(&new, &store.current(&files).unwrap()));
    assert!(store.check().is_empty(), "one change, one reload");
}

#[test]
fn a_broken_replacement_is_refused_once_and_the_old_config_stays() {
    let (dir, a, b) = (TempDir::new(), Ca::new("A"), Ca::new("B"));
    let path = dir.write("ca.crt", &a.pem());
    let files = ca_only(&path);
    let mut store = TlsStore::default();
    let old = store.load(&files).unwrap();
    // Half-written: the first half of a PEM certificate.
    let pem = b.pem();
    std::fs::write(&path, &pem[..pem.len() / 2]).unwrap();
    let e = rejected(&store.check()).to_string();
    assert!(e.contains(&path.display().to_string()), "the message names the file: {e}");
    assert!(Arc::ptr_eq(&old, &store.current(&files).unwrap()), "the old config stays in use");
    assert!(store.check().is_empty(), "the same bytes are not refused (and logged) again");
    std::fs::write(&path, "not a certificate at all\n").unwrap();
    assert!(matches!(rejected(&store.check()), ProbeConfigError::NoCertificate { .. }));
    std::fs::write(&path, &pem).unwrap();
    assert!(trusts(&reloaded(&store.check()), &b));
}

#[test]
fn a_missing_file_is_refused_once_and_its_return_is_no_change() {
    let (dir, a) = (TempDir::new(), Ca::new("A"));
    let path = dir.write("ca.crt", &a.pem());
    let files = ca_only(&path);
    let mut store = TlsStore::default();
    let old = store.load(&files).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(rejected(&store.check()), ProbeConfigError::Read { .. }));
    assert!(store.check().is_empty());
    dir.write("ca.crt", &a.pem());
    assert!(store.check().is_empty(), "the same contents as in use: nothing to do");
    assert!(Arc::ptr_eq(&old, &store.current(&files).unwrap()));
    // And a later removal is reported again.
    std::fs::remove_file(&path).unwrap();
    assert_eq!(store.check().len(), 1);
}

#[test]
fn a_certificate_and_key_switch_only_as_a_pair() {
    let (dir, ca) = (TempDir::new(), Ca::new("A"));
    let (old, new) = (
        ca.issue(&["node-1"], ExtendedKeyUsagePurpose::ClientAuth),
        ca.issue(&["node-1"], ExtendedKeyUsagePurpose::ClientAuth),
    );
    let ca_file = dir.write("ca.crt", &ca.pem());
    let (cert, key) = (dir.write("client.crt", &old.cert_pem), dir.write("client.key", &old.key_pem));
    let files = with_client(&ca_file, &cert, &key);
    let mut store = TlsStore::default();
    assert_eq!(client_cert(&store.load(&files).unwrap()), old.cert_der);
    // The certificate first, the key a moment later.
    replace(&dir, &cert, &new.cert_pem);
    let outcome = store.check();
    let e = rejected(&outcome);
    assert!(matches!(e, ProbeConfigError::ClientAuth { .. }), "{e:?}");
    assert_eq!(client_cert(&store.current(&files).unwrap()), old.cert_der, "the old pair stays");
    replace(&dir, &key, &new.key_pem);
    assert_eq!(client_cert(&reloaded(&store.check())), new.cert_der);
}

#[cfg(unix)]
#[test]
fn a_kubelet_style_symlink_swap_is_seen() {
    let (dir, ca) = (TempDir::new(), Ca::new("A"));
    let ca_file = dir.write("ca.crt", &ca.pem());
    let pair = |name: &str| {
        let issued = ca.issue(&["system:node:node-1"], ExtendedKeyUsagePurpose::ClientAuth);
        (dir.write(name, &format!("{}{}", issued.cert_pem, issued.key_pem)), issued)
    };
    let (first, old) = pair("kubelet-client-2025-01-01.pem");
    let (second, new) = pair("kubelet-client-2025-06-01.pem");
    let current: PathBuf = dir.path().join("kubelet-client-current.pem");
    std::os::unix::fs::symlink(&first, &current).unwrap();
    let files = with_client(&ca_file, &current, &current);
    let mut store = TlsStore::default();
    assert_eq!(client_cert(&store.load(&files).unwrap()), old.cert_der);
    // kubelet: a new symlink beside the old, renamed over it.
    let tmp = dir.path().join("kubelet-client-current.pem.tmp");
    std::os::unix::fs::symlink(&second, &tmp).unwrap();
    std::fs::rename(&tmp, &current).unwrap();
    assert_eq!(client_cert(&reloaded(&store.check())), new.cert_der);
}

#[test]
fn a_set_that_never_loaded_is_reported_once_then_loaded_when_fixed() {
    let (dir, a) = (TempDir::new(), Ca::new("A"));
    let path = dir.write("ca.crt", "garbage\n");
    let files = ca_only(&path);
    let mut store = TlsStore::default();
    assert!(matches!(store.load(&files), Err(Some(ProbeConfigError::NoCertificate { .. }))));
    assert!(matches!(store.load(&files), Err(None)), "reported once");
    assert!(store.check().is_empty());
    std::fs::write(&path, a.pem()).unwrap();
    let config = reloaded(&store.check());
    assert!(Arc::ptr_eq(&config, &store.load(&files).unwrap()));
}

#[test]
fn an_oversized_file_is_refused_without_reading_it_all() {
    let dir = TempDir::new();
    let path = dir.write("ca.crt", &"x".repeat(MAX_PEM_BYTES as usize + 1));
    let e = ca_only(&path).load().unwrap_err();
    let ProbeConfigError::Read { source, .. } = &e else { panic!("{e:?}") };
    assert_eq!(source.kind(), std::io::ErrorKind::FileTooLarge);
}

#[test]
fn retain_forgets_unused_sets() {
    let (dir, a) = (TempDir::new(), Ca::new("A"));
    let files = ca_only(&dir.write("ca.crt", &a.pem()));
    let mut store = TlsStore::default();
    store.load(&files).unwrap();
    store.retain(|_| false);
    assert!(store.current(&files).is_none());
}

#[test]
fn a_handle_sees_a_new_config_once() {
    let (dir, a, b) = (TempDir::new(), Ca::new("A"), Ca::new("B"));
    let config_a = ca_only(&dir.write("a.crt", &a.pem())).load().unwrap();
    let config_b = ca_only(&dir.write("b.crt", &b.pem())).load().unwrap();
    let (tx, mut handle) = TlsHandle::channel(config_a.clone());
    assert!(Arc::ptr_eq(&handle.for_connect(), &config_a));
    assert!(handle.take_changed().is_none());
    tx.send_replace(config_b.clone());
    assert!(Arc::ptr_eq(&handle.take_changed().unwrap(), &config_b));
    assert!(handle.take_changed().is_none());
    drop(tx);
    assert!(Arc::ptr_eq(&handle.for_connect(), &config_b), "the last config outlives its sender");
}

#[test]
fn files_follow_flag_then_config_then_default_and_a_frontend_wins() {
    let p = |s: &str| Some(PathBuf::from(s));
    let mut d = TlsDefaults { default_ca: p("/etc/kubernetes/pki/ca.crt"), ..TlsDefaults::default() };
    let none = ProbeTls::default();
    assert_eq!(d.files_for(None, &none).ca_file, p("/etc/kubernetes/pki/ca.crt"));
    assert_eq!(
        d.files_for(Some(Path::new("/c.crt")), &none).ca_file,
        p("/c.crt"),
        "a SIGHUP'd ca_file counts"
    );
    d.ca_file = p("/flag.crt");
    assert_eq!(d.files_for(Some(Path::new("/c.crt")), &none).ca_file, p("/flag.crt"));
    d.client_cert = p("/kubelet.pem");
    d.client_key = p("/kubelet.pem");
    d.insecure_skip_verify = true;
    let global = d.files_for(None, &none);
    assert_eq!((global.client_cert, global.insecure_skip_verify), (p("/kubelet.pem"), true));
    let etcd = ProbeTls {
        ca_file: p("/etcd/ca.pem"),
        client_cert: p("/etcd/n.pem"),
        client_key: p("/etcd/n-key.pem"),
    };
    let own = d.files_for(None, &etcd);
    assert_eq!(
        (own.ca_file, own.client_key, own.insecure_skip_verify),
        (p("/etcd/ca.pem"), p("/etcd/n-key.pem"), false)
    );
}
