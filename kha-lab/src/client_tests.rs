use super::*;

#[test]
fn the_master_is_read_from_a_serving_certificate_of_the_lab() {
    use crate::pki::{CertAuthority, MasterIdentity};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let ca = CertAuthority::new("test CA").unwrap();
    let cert = ca.issue_server(&MasterIdentity::new("m2", ["192.0.2.12".parse().unwrap()])).unwrap();
    let der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap();
    assert_eq!(master_of_cert(&der).as_deref(), Some("m2"));
    // Not one of the lab's serving certificates: no master.
    let client = ca.issue_client("kha-admin", &[]).unwrap();
    let der = CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap();
    assert_eq!(master_of_cert(&der), None);
    assert_eq!(master_of_cert(b"not DER"), None);
}

#[test]
fn parses_urls_with_ipv6_ports_and_paths() {
    let u = HttpsUrl::parse("https://localhost:6443/version").unwrap();
    assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("localhost", 6443, "/version"));
    assert_eq!(u.authority(), "localhost:6443");
    let u = HttpsUrl::parse("https://[::1]:6443/readyz?verbose").unwrap();
    assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("::1", 6443, "/readyz?verbose"));
    assert_eq!(u.authority(), "[::1]:6443");
    let u = HttpsUrl::parse("https://kubernetes.default.svc").unwrap();
    assert_eq!((u.port, u.path.as_str(), u.authority().as_str()), (443, "/", "kubernetes.default.svc"));
    assert!(matches!(HttpsUrl::parse("http://x/"), Err(UrlError::Scheme(_))));
    assert!(matches!(HttpsUrl::parse("https://x:0/"), Err(UrlError::Port(_))));
    assert!(matches!(HttpsUrl::parse("https://x:99999/"), Err(UrlError::Port(_))));
    assert!(matches!(HttpsUrl::parse("https://:6443/"), Err(UrlError::Host(_))));
    assert!(matches!(HttpsUrl::parse("https://[::1/"), Err(UrlError::Host(_))));
}

#[test]
fn summary_counts_masters_statuses_and_errors() {
    let mut s = RequestSummary::default();
    let base = RequestRecord {
        seq: 0,
        ok: true,
        status: Some(200),
        master: Some("m1".into()),
        peer: None,
        local: None,
        reused: false,
        latency_ms: 1.0,
        error: None,
        detail: None,
    };
    s.add(&base);
    s.add(&RequestRecord { ok: false, status: Some(500), error: Some("status:500".into()), ..base.clone() });
    s.add(&RequestRecord {
        ok: false,
        status: None,
        master: None,
        error: Some("connect:ECONNREFUSED".into()),
        ..base
    });
    assert_eq!((s.count, s.ok, s.failed), (3, 1, 2));
    assert_eq!(s.by_master["m1"], 2);
    assert_eq!(s.errors["connect:ECONNREFUSED"], 1);
    let json = serde_json::to_value(serde_json::json!({ "summary": s })).unwrap();
    assert_eq!(json["summary"]["by_status"]["500"], 1);
}
