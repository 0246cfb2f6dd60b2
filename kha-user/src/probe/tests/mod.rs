//! The prober against a real rustls server on 127.0.0.1 (see `server.rs`): no root, no fixed
//! sleeps except where a real socket needs time to pass (the clean-close grace).

pub(crate) mod server;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rcgen::ExtendedKeyUsagePurpose;
use rustls::{AlertDescription, CertificateError};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::*;
use server::{Ca, Kill, Reply, Server, TempDir, server_config};

/// Longest any single expected event may take before a test fails.
const PATIENCE: Duration = Duration::from_secs(5);

/// A CA, a 127.0.0.1 server certificate from it, and the CA in a file.
struct Fixture {
    ca: Ca,
    dir: TempDir,
    ca_file: std::path::PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let ca = Ca::new("kha test CA");
        let dir = TempDir::new();
        let ca_file = dir.write("ca.crt", &ca.pem());
        Fixture { ca, dir, ca_file }
    }

    fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        tls_config(Some(&self.ca_file), None, None, false).unwrap()
    }

    async fn server(&self, reply: Reply) -> Server {
        Server::start(server_config(&self.ca.localhost(), None), reply).await
    }

    fn settings(&self) -> ProbeSettings {
        ProbeSettings {
            interval: Duration::from_millis(20),
            readiness_interval: Duration::from_millis(20),
            timeout: Duration::from_secs(2),
            ..ProbeSettings::new(self.client_tls())
        }
    }
}

/// A running probe task.
struct Probe {
    events: mpsc::Receiver<((), ProbeEvent)>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Probe {
    fn spawn(addr: SocketAddr, settings: ProbeSettings) -> Probe {
        Probe::spawn_with(addr, settings, default_socket())
    }

    fn spawn_with(addr: SocketAddr, settings: ProbeSettings, make_socket: MakeSocket) -> Probe {
        let (tx, events) = mpsc::channel(16);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(addr, settings, make_socket, tx, (), stopped));
        Probe { events, stop: Some(stop), task }
    }

    /// The next event that is an outcome: [`ProbeEvent::Slow`] (which a loaded test machine
    /// can cause) is skipped; [`Probe::next_any`] sees it.
    async fn next(&mut self) -> ProbeEvent {
        loop {
            match self.next_any().await {
                ProbeEvent::Slow { .. } => continue,
                e => return e,
            }
        }
    }

    async fn next_any(&mut self) -> ProbeEvent {
        match tokio::time::timeout(PATIENCE, self.events.recv()).await {
            Ok(Some(((), event))) => event,
            Ok(None) => panic!("probe task ended"),
            Err(_) => panic!("no probe event within {PATIENCE:?}"),
        }
    }

    async fn next_failure(&mut self) -> ProbeFailure {
        match self.next().await {
            ProbeEvent::Failed { failure, .. } => failure,
            other => panic!("expected a failed probe, got {other:?}"),
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(PATIENCE, self.task).await.expect("probe task stops").unwrap();
    }
}

fn is_ready(event: &ProbeEvent) -> bool {
    matches!(event, ProbeEvent::Ready { .. })
}

#[tokio::test]
async fn ready_on_200() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let started = std::time::Instant::now();
    let mut probe = Probe::spawn(server.addr, fx.settings());
    let event = probe.next().await;
    let ProbeEvent::Ready { latency } = event else { panic!("{event:?}") };
    // The prober's own measure of the exchange: something, and no more than the test saw.
    assert!(latency > Duration::ZERO && latency <= started.elapsed(), "{latency:?}");
    probe.stop().await;
}

#[tokio::test]
async fn chunked_200_is_ready() {
    let fx = Fixture::new();
    let server = fx.server(Reply::OkChunked).await;
    let mut probe = Probe::spawn(server.addr, fx.settings());
    for _ in 0..3 {
        let event = probe.next().await;
        assert!(is_ready(&event), "{event:?}");
    }
    assert_eq!(server.accepts(), 1);
    probe.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_carries_all_probes_on_one_connection() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let mut probe = Probe::spawn(server.addr, fx.settings());
    for _ in 0..5 {
        let event = probe.next().await;
        assert!(is_ready(&event), "{event:?}");
    }
    assert_eq!(server.accepts(), 1, "one TLS connection for all probes");
    assert!(server.requests() >= 5);
    probe.stop().await;
}

#[tokio::test]
async fn status_500_keeps_the_failed_check_and_the_connection() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Failing).await;
    let mut probe = Probe::spawn(server.addr, fx.settings());
    for _ in 0..2 {
        let failure = probe.next_failure().await;
        assert_eq!(
            failure,
            ProbeFailure::Status { code: 500, line: "[-]etcd failed: reason withheld".into() }
        );
        assert_eq!(failure.to_string(), "HTTP 500: [-]etcd failed: reason withheld");
    }
    assert_eq!(server.accepts(), 1, "a complete 500 leaves the connection usable");
    probe.stop().await;
}

/// A master that answered not ready is asked again within the recheck, not an interval (here a
/// minute) later: it is back in use within the recheck plus the confirmation of its pass.
#[tokio::test]
async fn a_not_ready_master_is_asked_again_within_the_recheck() {
    let fx = Fixture::new();
    let server = fx.server(Reply::FailingFirst).await;
    let recheck = Duration::from_millis(400);
    let settings = ProbeSettings { interval: Duration::from_secs(60), recheck, ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    assert!(matches!(probe.next_failure().await, ProbeFailure::Status { code: 500, .. }));
    let failed = Instant::now();
    assert!(is_ready(&probe.next().await), "asked again");
    let again = failed.elapsed();
    assert!(again >= recheck / 2 - Duration::from_millis(20), "{again:?}: sooner than half the recheck");
    assert!(again < recheck + Duration::from_millis(300), "{again:?}");
    assert!(is_ready(&probe.next().await), "confirmed");
    assert!(failed.elapsed() < recheck + CONFIRM_MAX + Duration::from_millis(300), "{:?}", failed.elapsed());
    assert_eq!(server.accepts(), 1, "on the kept-alive connection");
    probe.stop().await;
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Silent).await;
    let timeout = Duration::from_millis(300);
    let mut probe = Probe::spawn(server.addr, ProbeSettings { timeout, ..fx.settings() });
    let sent = Instant::now();
    // Half the timeout without an answer: slow, said before the timeout.
    assert_eq!(probe.next_any().await, ProbeEvent::Slow { waited: timeout / 2 });
    assert!(sent.elapsed() >= timeout / 2 && sent.elapsed() < timeout, "{:?}", sent.elapsed());
    let event = probe.next_any().await;
    let ProbeEvent::Failed { failure, latency } = event else { panic!("{event:?}") };
    assert_eq!(failure, ProbeFailure::Timeout { phase: Phase::Response });
    assert!(latency >= timeout && latency < timeout * 3, "{latency:?}");
    // The hung connection is dropped; the next probe connects again and times out again.
    assert_eq!(probe.next_failure().await, ProbeFailure::Timeout { phase: Phase::Response });
    assert_eq!(server.accepts(), 2);
    probe.stop().await;
}

#[tokio::test]
async fn a_server_that_never_speaks_tls_times_out_in_the_handshake() {
    let fx = Fixture::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut probe =
        Probe::spawn(addr, ProbeSettings { timeout: Duration::from_millis(200), ..fx.settings() });
    // The kernel completes the TCP handshake from the backlog; nobody ever answers the hello.
    assert_eq!(probe.next_failure().await, ProbeFailure::Timeout { phase: Phase::Handshake });
    probe.stop().await;
    drop(listener);
}

#[tokio::test]
async fn an_endless_body_is_oversized() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Endless).await;
    let settings = ProbeSettings { max_response_bytes: 16 * 1024, ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    let failure = probe.next_failure().await;
    assert_eq!(failure, ProbeFailure::Oversized { limit: 16 * 1024 });
    assert_eq!(failure.to_string(), "response larger than 16384 bytes");
    probe.stop().await;
}

#[tokio::test]
async fn garbage_is_malformed() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Garbage).await;
    let mut probe = Probe::spawn(server.addr, fx.settings());
    let failure = probe.next_failure().await;
    let ProbeFailure::Malformed(Malformed::StatusLine(snippet)) = &failure else { panic!("{failure:?}") };
    assert!(snippet.starts_with("\\x00\\xffSSH-2.0"), "{snippet}");
    probe.stop().await;
}

/// kube-apiserver with `--anonymous-auth=false` answers a probe without a client certificate
/// with 401: alive and serving, only readiness cannot be read. Counting that as not ready would
/// drain every master of such a cluster. A 403 is what a starting apiserver answers an
/// anonymous probe before its RBAC roles exist: not ready.
#[tokio::test]
async fn unauthorized_is_up_with_a_reason_that_says_what_to_do_and_forbidden_is_not_ready() {
    use crate::health::{BackendHealth, DEFAULT_HYSTERESIS, State};
    let fx = Fixture::new();
    for (reply, code, want) in
        [(Reply::Unauthorized, 401, State::Up), (Reply::Forbidden, 403, State::Draining)]
    {
        let server = fx.server(reply).await;
        let mut probe = Probe::spawn(server.addr, fx.settings());
        let mut health = BackendHealth::new(true, std::time::SystemTime::UNIX_EPOCH);
        for _ in 0..3 {
            let event = probe.next().await;
            health.observe(&event, DEFAULT_HYSTERESIS, std::time::SystemTime::UNIX_EPOCH);
        }
        assert_eq!(health.state, want, "{code}");
        let reason = health.last_failure.clone().unwrap_or_default();
        if code == 401 {
            assert!(reason.starts_with("probe not authorized (401): "), "{reason}");
            assert!(
                reason.contains("--client-cert") && reason.len() <= kha_common::PROBE_REASON_LEN,
                "{reason}"
            );
        } else {
            assert!(reason.contains("403"), "{reason}");
        }
        assert_eq!(server.accepts(), 1, "the connection is kept");
        probe.stop().await;
    }
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_a_tls_failure_naming_the_unknown_issuer() {
    let fx = Fixture::new();
    let other = Ca::new("some other CA");
    let server = Server::start(server_config(&other.localhost(), None), Reply::Ok).await;
    let mut probe = Probe::spawn(server.addr, fx.settings());
    let failure = probe.next_failure().await;
    assert_eq!(
        failure,
        ProbeFailure::Tls(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
    );
    assert!(failure.to_string().contains("UnknownIssuer"), "{failure}");
    assert_eq!(server.requests(), 0);
    probe.stop().await;
}

#[tokio::test]
async fn the_certificate_must_name_the_backend_ip() {
    let fx = Fixture::new();
    let cert = fx.ca.issue(&["127.0.0.2", "localhost"], ExtendedKeyUsagePurpose::ServerAuth);
    let server = Server::start(server_config(&cert, None), Reply::Ok).await;
    let mut probe = Probe::spawn(server.addr, fx.settings());
    let failure = probe.next_failure().await;
    assert!(
        matches!(
            failure,
            ProbeFailure::Tls(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
        ),
        "{failure:?}"
    );
    probe.stop().await;
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_certificate() {
    let fx = Fixture::new();
    let other = Ca::new("some other CA");
    let server = Server::start(server_config(&other.localhost(), None), Reply::Ok).await;
    let tls = tls_config(None, None, None, true).unwrap();
    let mut probe = Probe::spawn(server.addr, ProbeSettings { tls: tls.into(), ..fx.settings() });
    let event = probe.next().await;
    assert!(is_ready(&event), "{event:?}");
    probe.stop().await;
}

#[tokio::test]
async fn nothing_listening_is_refused() {
    let fx = Fixture::new();
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut probe = Probe::spawn(addr, fx.settings());
    let failure = probe.next_failure().await;
    assert_eq!(failure, ProbeFailure::Refused);
    assert_eq!(failure.to_string(), "connection refused");
    probe.stop().await;
}

/// The server closes the idle persistent connection and stops listening, as a killed
/// apiserver does. The interval is a minute, so only the pending idle read can explain a
/// prompt event; the quick reconnect then finds the port refused.
#[tokio::test]
async fn a_dying_server_is_reported_at_once_as_connection_lost() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let settings = ProbeSettings { interval: Duration::from_secs(60), ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    assert!(is_ready(&probe.next().await));
    // A close right after a response would be a clean close-after-response.
    tokio::time::sleep(CLOSE_AFTER_RESPONSE_GRACE * 2).await;
    let killed = Instant::now();
    server.kill(Kill::Die);
    assert_eq!(probe.next().await, ProbeEvent::ConnectionLost { failure: ProbeFailure::Closed });
    assert!(killed.elapsed() < Duration::from_secs(1), "{:?}", killed.elapsed());
    assert_eq!(probe.next_failure().await, ProbeFailure::Refused);
    let retried = killed.elapsed();
    assert!(retried < DEFAULT_RECHECK + Duration::from_secs(1), "{retried:?}");
    probe.stop().await;
}

/// A ready answer after a failure is confirmed within `CONFIRM_MAX`, not an interval (here a
/// minute) later: with rise 2 a master that can serve again is back in use about 0.2 s after
/// its first pass. The next one after that waits the interval again.
#[tokio::test]
async fn a_pass_after_a_failure_is_confirmed_at_once_not_an_interval_later() {
    let fx = Fixture::new();
    let server = fx.server(Reply::ResetMidResponseOnce).await;
    let settings = ProbeSettings { interval: Duration::from_secs(60), ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    assert!(probe.next().await.failure().is_some(), "the first answer dies half-way");
    assert!(is_ready(&probe.next().await), "the quick reconnect passes");
    let first_pass = Instant::now();
    assert!(is_ready(&probe.next().await), "confirmed");
    let confirmed = first_pass.elapsed();
    assert!(confirmed < CONFIRM_MAX + Duration::from_millis(200), "{confirmed:?}");
    assert!(tokio::time::timeout(Duration::from_secs(2), probe.next()).await.is_err(), "then the interval");
    probe.stop().await;
}

/// RST on the idle connection (server still listening): lost, then the reconnect is ready.
#[tokio::test]
async fn a_reset_idle_connection_is_lost_then_reconnected() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let settings = ProbeSettings { interval: Duration::from_secs(60), ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    assert!(is_ready(&probe.next().await));
    server.kill(Kill::ResetConnections);
    assert_eq!(probe.next().await, ProbeEvent::ConnectionLost { failure: ProbeFailure::Reset });
    let event = probe.next().await;
    assert!(is_ready(&event), "{event:?}");
    assert_eq!(server.accepts(), 2);
    probe.stop().await;
}

/// After a lost connection the probe reconnects within the recheck (spread, since every
/// node lost its connection to the same master at once), not an interval (here a minute) later.
#[tokio::test]
async fn the_reconnect_after_a_loss_comes_within_the_spread_not_an_interval_later() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let settings = ProbeSettings { interval: Duration::from_secs(60), ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    assert!(is_ready(&probe.next().await));
    server.kill(Kill::ResetConnections);
    assert_eq!(probe.next().await, ProbeEvent::ConnectionLost { failure: ProbeFailure::Reset });
    let lost = Instant::now();
    let event = probe.next().await;
    assert!(is_ready(&event), "{event:?}");
    let reconnect = server.accepted_at()[1] - lost;
    assert!(reconnect < DEFAULT_RECHECK + Duration::from_millis(200), "{reconnect:?}");
    probe.stop().await;
}

/// A master silent for a moment (a paused VM, a bond failover, a lost keepalive): the
/// reconnect after the loss keeps sending SYNs for a reconnect window rather than
/// failing when the first one goes unanswered for `TCP_USER_TIMEOUT`.
#[tokio::test]
async fn the_reconnect_after_a_loss_rides_out_a_short_silence() {
    let fx = Fixture::new();
    let config = server_config(&fx.ca.localhost(), None);
    let server = Server::start_with_tiny_backlog(config, Reply::Ok).await;
    let settings = ProbeSettings { interval: Duration::from_secs(60), ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    assert!(is_ready(&probe.next().await));
    server.stop_accepting();
    // Let the accept task see it before a connection waits in the queue.
    tokio::time::sleep(Duration::from_millis(20)).await;
    // One connection waiting fills the queue: the kernel drops every SYN after it.
    let _waiting = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    server.kill(Kill::ResetConnections);
    assert_eq!(probe.next().await, ProbeEvent::ConnectionLost { failure: ProbeFailure::Reset });
    // Longer than TCP_USER_TIMEOUT (1.5 s): a single connect attempt gives up before this.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    server.resume_accepting();
    let event = probe.next().await;
    assert!(is_ready(&event), "{event:?}");
    probe.stop().await;
}

/// A reset in the middle of an answer is a lost connection too: reconnect at once rather
/// than an interval later.
#[tokio::test]
async fn a_connection_that_dies_under_a_probe_is_retried_at_once() {
    let fx = Fixture::new();
    let server = fx.server(Reply::ResetMidResponseOnce).await;
    let settings = ProbeSettings { interval: Duration::from_secs(60), ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    assert_eq!(probe.next_failure().await, ProbeFailure::Reset);
    let event = probe.next().await;
    assert!(is_ready(&event), "{event:?}");
    probe.stop().await;
}

#[tokio::test]
async fn stray_bytes_on_the_idle_connection_are_a_lost_connection() {
    let fx = Fixture::new();
    let server = fx.server(Reply::OkThenStrayBytes).await;
    let settings = ProbeSettings { interval: Duration::from_secs(60), ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    assert!(is_ready(&probe.next().await));
    let expected = ProbeFailure::Malformed(Malformed::UnexpectedData("surprise".into()));
    assert_eq!(probe.next().await, ProbeEvent::ConnectionLost { failure: expected });
    probe.stop().await;
}

/// Three probes against `reply`, each of which must be ready; returns how many connections
/// the server accepted for them.
async fn three_ready_probes(reply: Reply) -> usize {
    let fx = Fixture::new();
    let server = fx.server(reply).await;
    let mut probe = Probe::spawn(server.addr, fx.settings());
    for _ in 0..3 {
        let event = probe.next().await;
        assert!(is_ready(&event), "{event:?}");
    }
    let accepts = server.accepts();
    probe.stop().await;
    accepts
}

#[tokio::test]
async fn connection_close_reconnects_without_a_failure() {
    assert_eq!(three_ready_probes(Reply::OkThenClose).await, 3);
}

#[tokio::test]
async fn an_unannounced_close_right_after_the_response_is_clean() {
    assert!(three_ready_probes(Reply::OkThenCloseUnannounced).await >= 3);
}

/// A kept-alive connection found closed when the next request goes out is retried once on a
/// new connection, not reported.
#[tokio::test]
async fn a_kept_alive_connection_closed_under_the_request_is_retried() {
    assert_eq!(three_ready_probes(Reply::OnePerConnection).await, 3);
}

#[tokio::test]
async fn client_certificate_when_the_server_requires_one() {
    let fx = Fixture::new();
    let server = Server::start(server_config(&fx.ca.localhost(), Some(&fx.ca)), Reply::Ok).await;
    let client = fx.ca.issue(&["kha-probe"], ExtendedKeyUsagePurpose::ClientAuth);
    let cert = fx.dir.write("client.crt", &client.cert_pem);
    let key = fx.dir.write("client.key", &client.key_pem);
    let tls = tls_config(Some(&fx.ca_file), Some(&cert), Some(&key), false).unwrap();
    let mut with_cert = Probe::spawn(server.addr, ProbeSettings { tls: tls.into(), ..fx.settings() });
    let event = with_cert.next().await;
    assert!(is_ready(&event), "{event:?}");
    with_cert.stop().await;

    let mut without = Probe::spawn(server.addr, fx.settings());
    let failure = without.next_failure().await;
    // TLS 1.3: the client finishes first and hears the server's alert on its first read.
    assert_eq!(
        failure,
        ProbeFailure::Tls(rustls::Error::AlertReceived(AlertDescription::CertificateRequired))
    );
    without.stop().await;
}

/// A reloaded TLS config (certificate rotation) reaches the next new connection; the
/// established connection is not torn down for it and keeps carrying the probes.
#[tokio::test]
async fn a_reloaded_config_applies_to_reconnects_not_to_the_established_connection() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let other = fx.dir.write("other-ca.crt", &Ca::new("another CA").pem());
    let good = TlsFiles { ca_file: Some(fx.ca_file.clone()), ..TlsFiles::default() }.load().unwrap();
    let wrong = TlsFiles { ca_file: Some(other), ..TlsFiles::default() }.load().unwrap();
    let (publish, handle) = TlsHandle::channel(good.clone());
    let mut probe = Probe::spawn(server.addr, ProbeSettings { tls: handle, ..fx.settings() });
    assert!(is_ready(&probe.next().await));
    // A CA that no longer trusts this master: the working connection stays.
    publish.send_replace(wrong);
    for _ in 0..3 {
        let event = probe.next().await;
        assert!(is_ready(&event), "{event:?}");
    }
    assert_eq!(server.accepts(), 1, "a reload forces no reconnect");
    // The next connection is made with the new config, and fails by it.
    server.kill(Kill::ResetConnections);
    let unknown = ProbeFailure::Tls(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
    let mut seen = Vec::new();
    while !seen.contains(&Some(unknown.clone())) {
        assert!(seen.len() < 5, "no verification failure after the reset: {seen:?}");
        seen.push(probe.next().await.failure().cloned());
    }
    // And a config that trusts it again is taken by the next reconnect.
    publish.send_replace(good);
    let mut events = Vec::new();
    while !events.last().is_some_and(is_ready) {
        assert!(events.len() < 5, "not ready again: {events:?}");
        events.push(probe.next().await);
    }
    probe.stop().await;
}

#[tokio::test]
async fn make_socket_is_used_and_its_errors_reported() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let inner = default_socket();
    let make: MakeSocket = Arc::new(move |addr| {
        counted.fetch_add(1, Ordering::SeqCst);
        inner(addr)
    });
    let mut probe = Probe::spawn_with(server.addr, fx.settings(), make);
    assert!(is_ready(&probe.next().await));
    assert!(is_ready(&probe.next().await));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    probe.stop().await;

    let failing: MakeSocket = Arc::new(|_| Err(io::Error::from_raw_os_error(libc::EMFILE)));
    let mut probe = Probe::spawn_with(server.addr, fx.settings(), failing);
    let failure = probe.next_failure().await;
    assert_eq!(failure.to_string(), "I/O error: EMFILE");
    probe.stop().await;
}

#[tokio::test]
async fn shutdown_stops_a_probe_stuck_on_a_silent_server() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Silent).await;
    let probe =
        Probe::spawn(server.addr, ProbeSettings { timeout: Duration::from_secs(60), ..fx.settings() });
    let asked = async {
        while server.requests() == 0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, asked).await.expect("the probe sent its request");
    probe.stop().await;
}

#[tokio::test]
async fn the_task_ends_when_nobody_listens() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let Probe { events, stop, task } = Probe::spawn(server.addr, fx.settings());
    drop(events);
    tokio::time::timeout(PATIENCE, task).await.expect("task ends").unwrap();
    drop(stop);
}

#[test]
fn tls_config_errors_name_the_file() {
    let fx = Fixture::new();
    let missing = fx.dir.path().join("no-such-ca.crt");
    let err = tls_config(Some(&missing), None, None, false).unwrap_err();
    assert!(matches!(err, ProbeConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-ca.crt"), "{err}");
    let source = std::error::Error::source(&err).unwrap().downcast_ref::<io::Error>().unwrap();
    assert_eq!(source.kind(), io::ErrorKind::NotFound);

    let garbage = fx.dir.write("garbage.crt", "this is not a certificate\n");
    let err = tls_config(Some(&garbage), None, None, false).unwrap_err();
    assert!(matches!(err, ProbeConfigError::NoCertificate { .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("CA file {} contains no PEM certificate", garbage.display()));

    let bad_pem = fx.dir.write("bad.crt", "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
    let err = tls_config(Some(&bad_pem), None, None, false).unwrap_err();
    assert!(
        matches!(err, ProbeConfigError::Pem { .. } | ProbeConfigError::BadCaCertificate { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("bad.crt"), "{err}");

    let err = tls_config(None, None, None, false).unwrap_err();
    assert!(matches!(err, ProbeConfigError::NoCaFile), "{err:?}");
}

#[test]
fn tls_config_client_certificate_errors() {
    let fx = Fixture::new();
    let client = fx.ca.issue(&["kha-probe"], ExtendedKeyUsagePurpose::ClientAuth);
    let other = fx.ca.issue(&["someone-else"], ExtendedKeyUsagePurpose::ClientAuth);
    let cert = fx.dir.write("client.crt", &client.cert_pem);
    let key = fx.dir.write("client.key", &client.key_pem);
    let wrong_key = fx.dir.write("other.key", &other.key_pem);

    let err = tls_config(Some(&fx.ca_file), Some(&cert), Some(&wrong_key), false).unwrap_err();
    assert!(matches!(err, ProbeConfigError::ClientAuth { .. }), "{err:?}");
    assert!(err.to_string().contains("other.key"), "{err}");

    let err = tls_config(Some(&fx.ca_file), Some(&cert), None, false).unwrap_err();
    assert!(matches!(err, ProbeConfigError::CertWithoutKey { .. }), "{err:?}");
    let err = tls_config(Some(&fx.ca_file), None, Some(&key), false).unwrap_err();
    assert!(matches!(err, ProbeConfigError::KeyWithoutCert { .. }), "{err:?}");

    // A certificate where the key should be.
    let err = tls_config(Some(&fx.ca_file), Some(&cert), Some(&cert), false).unwrap_err();
    assert!(matches!(err, ProbeConfigError::NoPrivateKey { .. }), "{err:?}");
    assert!(err.to_string().contains("client.crt"), "{err}");

    tls_config(Some(&fx.ca_file), Some(&cert), Some(&key), false).unwrap();
}

/// A probe whose interval is `tick` and whose readiness comes only once a minute: everything
/// between readiness results is the liveness request's doing.
fn liveness_only(fx: &Fixture, tick: Duration) -> ProbeSettings {
    ProbeSettings { interval: tick, readiness_interval: Duration::from_secs(60), ..fx.settings() }
}

/// A master whose process stops (SIGSTOP: its kernel still takes the bytes) is slow after
/// `SLOW_AFTER` and confirmed silent `SILENT_AFTER` after the liveness request it left
/// unanswered, although readiness is not due for a minute.
#[tokio::test]
async fn a_stopped_master_is_slow_then_confirmed_silent() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let tick = Duration::from_millis(200);
    let mut probe = Probe::spawn(server.addr, liveness_only(&fx, tick));
    assert!(is_ready(&probe.next().await));
    server.freeze(true);
    let frozen = Instant::now();
    let slow = probe.next_any().await;
    assert!(matches!(slow, ProbeEvent::Slow { .. }), "{slow:?}");
    let slow_at = frozen.elapsed();
    assert!(slow_at >= SLOW_AFTER && slow_at < SLOW_AFTER + tick * 2, "{slow_at:?}");
    let failure = probe.next_failure().await;
    let silent_at = frozen.elapsed();
    assert!(matches!(failure, ProbeFailure::Silent { .. }), "{failure:?}");
    assert!(failure.to_string().starts_with("no answer for 2.0 s"), "{failure}");
    assert!(silent_at >= SILENT_AFTER && silent_at < SILENT_AFTER + tick * 2, "{silent_at:?}");
    probe.stop().await;
}

/// A pause shorter than `SILENT_AFTER` is slow, then alive again: no failure at all, and the
/// kept-alive connection is still the one in use.
#[tokio::test]
async fn a_pause_shorter_than_the_silence_is_ridden_out() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let mut probe = Probe::spawn(server.addr, liveness_only(&fx, Duration::from_millis(200)));
    assert!(is_ready(&probe.next().await));
    server.freeze(true);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    server.freeze(false);
    assert!(matches!(probe.next_any().await, ProbeEvent::Slow { .. }));
    let alive = probe.next_any().await;
    assert!(matches!(alive, ProbeEvent::Alive { latency } if latency >= Duration::from_secs(1)), "{alive:?}");
    let later = tokio::time::timeout(Duration::from_secs(1), probe.next_any()).await;
    assert!(later.is_err(), "nothing more while it answers: {later:?}");
    assert_eq!(server.accepts(), 1);
    probe.stop().await;
}

/// A `/readyz` that takes longer than the silence (a slow etcd) is slow, not silent: the
/// liveness answer before it said the process serves, and readiness has its own timeout.
#[tokio::test]
async fn a_slow_readiness_answer_is_not_a_silence() {
    let fx = Fixture::new();
    let server = fx.server(Reply::SlowReady).await;
    let settings = ProbeSettings { timeout: Duration::from_secs(4), ..fx.settings() };
    let mut probe = Probe::spawn(server.addr, settings);
    assert!(matches!(probe.next_any().await, ProbeEvent::Slow { .. }));
    let event = probe.next_any().await;
    assert!(matches!(event, ProbeEvent::Ready { latency } if latency >= server::SLOW_READY), "{event:?}");
    probe.stop().await;
}

/// A hung master (its kernel still acknowledging) is held on the one connection whose
/// liveness request it left unanswered: reported silent on time, never reconnected to while it
/// hangs (a reconnect would leave one more TLS handshake in its accept queue per retry, all
/// served at the thaw), and found ready at the thaw on that same connection.
#[tokio::test]
async fn a_hung_master_is_held_on_one_connection_and_found_ready_at_the_thaw() {
    let fx = Fixture::new();
    let server = fx.server(Reply::Ok).await;
    let mut probe = Probe::spawn(server.addr, liveness_only(&fx, Duration::from_millis(300)));
    assert!(is_ready(&probe.next().await));
    server.freeze(true);
    assert!(matches!(probe.next_failure().await, ProbeFailure::Silent { .. }));
    // Long enough for several quick retries (DOWN_RETRY_MAX) had it reconnected.
    tokio::time::sleep(DOWN_RETRY_MAX * 4).await;
    server.freeze(false);
    let event = probe.next().await;
    assert!(is_ready(&event), "{event:?}");
    assert_eq!(server.accepts(), 1, "a reconnect was queued while the master hung");
    probe.stop().await;
}

/// The fleet's rechecks of one failing master stay near 3,333 a second at any size beyond 750
/// nodes: the default recheck up to 750 nodes, longer beyond.
#[test]
fn the_recheck_grows_with_the_fleet_beyond_750_nodes() {
    let per_sec = |nodes: u32| f64::from(nodes) / (0.75 * cadence_for_fleet(nodes).recheck.as_secs_f64());
    assert_eq!(cadence_for_fleet(10).recheck, DEFAULT_RECHECK);
    assert_eq!(cadence_for_fleet(750).recheck, DEFAULT_RECHECK);
    assert!(cadence_for_fleet(751).recheck > DEFAULT_RECHECK);
    assert_eq!(cadence_for_fleet(5000).recheck, Duration::from_secs(2));
    for nodes in [750, 1000, 5000, 10_000, 100_000] {
        let rate = per_sec(nodes);
        assert!((rate - 3333.3).abs() < 1.0, "{nodes}: {rate}");
    }
    assert_eq!(cadence_for_fleet(1000).interval, DEFAULT_INTERVAL);
    assert_eq!(cadence_for_fleet(1001).readiness_interval, Duration::from_secs(15));
}
