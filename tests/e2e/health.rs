//! Failures of a master, and recovery, with health checks on: traffic leaves the failed
//! master, long-lived connections to it are moved, and it comes back once healthy. Bounds are
//! generous (correctness); `cargo xtask bench failover` measures the times.

use std::time::Duration;

use kha_lab::{FailureMode, bed::Bed};
use serde_json::Value;

use crate::harness::{self, LiveClient, args, backends, free_port, http_get, https, start, wait_for};

/// Fast probes so failures show within a second or two.
pub fn probe_args(extra: &[&str]) -> Vec<String> {
    let mut a = args(&[
        "--frontend",
        "127.0.0.1:6443",
        "--probe-interval-ms",
        "300",
        "--probe-timeout-ms",
        "1000",
        "--drain-time",
        "2",
    ]);
    a.extend(args(extra));
    a
}

pub fn start_checked(bed: &mut Bed, extra: &[&str]) {
    let mut a = probe_args(extra);
    a.extend(backends(bed, |m| m.https_v4()));
    start(bed, &a);
}

/// The probe state of `backend` under the first frontend, as `kha status -o json` has it.
fn state_of(bed: &Bed, backend: &str) -> Option<(String, bool, Option<String>)> {
    let s = harness::status(bed)?;
    let b = s["frontends"][0]["backends"].as_array()?.iter().find(|b| b["address"] == backend)?.clone();
    Some((b["state"].as_str()?.to_string(), b["serving"].as_bool()?, b["reason"].as_str().map(String::from)))
}

pub fn wait_state(bed: &Bed, backend: &str, state: &str, serving: bool) {
    wait_for(&format!("{backend} {state}"), Duration::from_secs(15), || {
        state_of(bed, backend).is_some_and(|(s, v, _)| s == state && v == serving)
    });
}

pub fn all_up(bed: &Bed) {
    for m in bed.lab.masters() {
        wait_state(bed, &m.https_v4().to_string(), "up", true);
    }
}

/// The first failure seen after a fault, and the first success after it from a master other
/// than `failed`.
fn failover(bed: &Bed, client: &LiveClient, failed: &str) -> (Value, Value) {
    let others: Vec<&str> =
        bed.lab.masters().iter().map(|m| m.name.as_str()).filter(|n| *n != failed).collect();
    loop {
        let r = client.next();
        if r["error"].is_null() {
            continue;
        }
        let failure = r;
        loop {
            let r = client.next();
            if r["error"].is_null() {
                let by = r["master"].as_str().unwrap_or_default();
                assert!(
                    others.contains(&by),
                    "answered by {by:?}, not one of the other masters {others:?}: {r}"
                );
                return (failure, r);
            }
        }
    }
}

/// A checked bed with every master up and a keep-alive client on one of them: the bed, the
/// client, the master it landed on, and that master's address.
fn watched() -> Option<(Bed, LiveClient, String, String)> {
    let mut bed = harness::bed(3)?;
    start_checked(&mut bed, &[]);
    all_up(&bed);
    let client = LiveClient::start(&bed, 400);
    let victim = client.next()["master"].as_str().expect("a first answer").to_string();
    let addr = bed.lab.master(&victim).unwrap().https_v4().to_string();
    Some((bed, client, victim, addr))
}

#[test]
fn blackholed_master_leaves_and_its_long_lived_connection_moves() {
    let Some((bed, client, victim, addr)) = watched() else { return };
    bed.lab.link_down(&victim).unwrap();

    // The client's connection would hang for its whole 30 s timeout (TCP would retry for
    // minutes); kha notices the silence in about 2 s and aborts it.
    let (failure, recovered) = failover(&bed, &client, &victim);
    eprintln!("blackhole: failed request {failure}, then {recovered}");
    assert!(failure["latency_ms"].as_f64().unwrap() < 15_000.0, "the request hung: {failure}");
    assert!(!failure["error"].as_str().unwrap().contains("ETIMEDOUT"), "{failure}");
    let (state, serving, reason) = state_of(&bed, &addr).unwrap();
    assert_eq!((state.as_str(), serving), ("down", false), "{reason:?}");
    // Told from a hung process by its kernel's silence: confirmed without the pause grace.
    assert!(reason.as_deref().is_some_and(|r| r.contains("unacknowledged")), "{reason:?}");
    let st = bed.status().unwrap();
    let terminated = st["counters"].as_array().unwrap().iter().find(|c| c["name"] == "terminated").unwrap();
    assert!(terminated["value"].as_u64().unwrap() >= 1, "{st}");

    bed.lab.link_up(&victim).unwrap();
    wait_state(&bed, &addr, "up", true);
}

#[test]
fn killed_master_costs_at_most_a_few_connects_and_comes_back() {
    let Some(mut bed) = harness::bed(3) else { return };
    start_checked(&mut bed, &[]);
    all_up(&bed);
    bed.lab.kill_master("m2").unwrap();
    let addr = bed.lab.master("m2").unwrap().https_v4().to_string();
    // Connection refused: the probe connection dies at once, and a failed connect makes the
    // kernel avoid the master before any probe runs.
    let run = https(&bed, "127.0.0.1:6443", 60);
    assert!(run.failed() <= 5, "too many failed requests after a kill: {:?}", run.summary);
    assert_eq!(run.by_master("m2"), 0);
    wait_state(&bed, &addr, "down", false);

    bed.lab.restart_master("m2").unwrap();
    wait_state(&bed, &addr, "up", true);
    let run = https(&bed, "127.0.0.1:6443", 60);
    assert_eq!(run.failed(), 0, "{:?}", run.summary);
    assert!(run.by_master("m2") > 0, "m2 did not get traffic back: {:?}", run.summary);
}

#[test]
fn not_ready_master_drains_then_returns() {
    let Some((mut bed, client, victim, addr)) = watched() else { return };
    bed.lab.set_mode(&victim, FailureMode::Readyz500).unwrap();
    wait_state(&bed, &addr, "draining", false);
    let (_, _, reason) = state_of(&bed, &addr).unwrap();
    assert!(reason.as_deref().is_some_and(|r| r.contains("[-]etcd failed")), "{reason:?}");
    // No new connection goes there while it drains...
    let run = https(&bed, "127.0.0.1:6443", 30);
    assert_eq!((run.failed(), run.by_master(&victim)), (0, 0), "{:?}", run.summary);
    // ...and the long-lived one is moved after the drain time (2 s here).
    failover(&bed, &client, &victim);

    bed.lab.set_mode(&victim, FailureMode::Normal).unwrap();
    wait_state(&bed, &addr, "up", true);
}

#[test]
fn hung_master_is_taken_out_and_its_connection_moves() {
    let Some((mut bed, client, victim, addr)) = watched() else { return };
    // Accepts and never answers: the probe times out, the client's request would hang.
    bed.lab.set_mode(&victim, FailureMode::Hang).unwrap();
    let (failure, _) = failover(&bed, &client, &victim);
    assert!(failure["latency_ms"].as_f64().unwrap() < 15_000.0, "the request hung: {failure}");
    wait_state(&bed, &addr, "down", false);
    bed.lab.set_mode(&victim, FailureMode::Normal).unwrap();
    wait_state(&bed, &addr, "up", true);
}

#[test]
fn a_wrong_ca_falls_back_to_every_master_or_fails_closed() {
    let Some(mut bed) = harness::bed(3) else { return };
    let other = kha_lab::pki::CertAuthority::new("another CA").unwrap();
    let wrong = bed.lab.workdir().join("wrong-ca.pem");
    std::fs::write(&wrong, other.cert_pem()).unwrap();
    let wrong = wrong.display().to_string();
    start_checked(&mut bed, &["--ca-file", &wrong]);
    let m1 = bed.lab.master("m1").unwrap().https_v4().to_string();
    wait_state(&bed, &m1, "down", true);
    let st = bed.status().unwrap();
    assert_eq!(st["frontends"][0]["fallback"], true, "{st}");
    let (_, _, reason) = state_of(&bed, &m1).unwrap();
    assert!(reason.as_deref().is_some_and(|r| r.contains("UnknownIssuer")), "{reason:?}");
    // A broken probe must not cut the node off.
    let run = https(&bed, "127.0.0.1:6443", 30);
    assert_eq!(run.failed(), 0, "{:?}", run.summary);

    bed.stop_agent(libc::SIGTERM).unwrap();
    start_checked(&mut bed, &["--ca-file", &wrong, "--all-down", "fail-closed"]);
    wait_state(&bed, &m1, "down", false);
    let run = harness::connect(&bed, true, "127.0.0.1:6443", 3);
    assert_eq!(run.summary["errors"]["connect:EHOSTUNREACH"], 3, "{:?}", run.summary);
}

#[test]
fn least_connections_spreads_long_lived_connections_evenly() {
    let Some(mut bed) = harness::bed(3) else { return };
    start_checked(&mut bed, &["--policy", "least-connections"]);
    all_up(&bed);
    // Nine watch-like connections, opened one after the other: least-connections must put
    // exactly three on each master (random would do so only 8.5 % of the time).
    let clients: Vec<LiveClient> = (0..9)
        .map(|_| {
            let c = LiveClient::start(&bed, 100);
            let first = c.next();
            assert!(first["error"].is_null(), "{first}");
            c
        })
        .collect();
    let st = bed.status().unwrap();
    let active: Vec<u64> = st["frontends"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["kernel"]["active"].as_u64().unwrap())
        .collect();
    assert_eq!(active, vec![3, 3, 3], "active connections per master from sock_ops: {st}");
    drop(clients);
}

#[test]
fn every_master_down_then_recovery() {
    let Some(mut bed) = harness::bed(3) else { return };
    start_checked(&mut bed, &[]);
    all_up(&bed);
    for m in ["m1", "m2", "m3"] {
        bed.lab.kill_master(m).unwrap();
    }
    let addr = |bed: &Bed, m: &str| bed.lab.master(m).unwrap().https_v4().to_string();
    // Fallback: all are served again (connects are refused by the dead masters, not by kha).
    wait_state(&bed, &addr(&bed, "m1"), "down", true);
    assert_eq!(bed.status().unwrap()["frontends"][0]["fallback"], true);
    let run = harness::connect(&bed, true, "127.0.0.1:6443", 3);
    assert_eq!(run.summary["errors"]["connect:ECONNREFUSED"], 3, "{:?}", run.summary);
    for m in ["m1", "m2", "m3"] {
        bed.lab.restart_master(m).unwrap();
    }
    all_up(&bed);
    assert_eq!(bed.status().unwrap()["frontends"][0]["fallback"], false);
    let run = https(&bed, "127.0.0.1:6443", 30);
    assert_eq!(run.failed(), 0, "{:?}", run.summary);
}

#[test]
fn metrics_and_health_endpoints_report_the_real_state() {
    let Some(mut bed) = harness::bed(3) else { return };
    let (metrics, health) = (free_port(), free_port());
    let (m, h) = (format!("127.0.0.1:{metrics}"), format!("127.0.0.1:{health}"));
    start_checked(&mut bed, &["--metrics-addr", &m, "--health-addr", &h]);
    all_up(&bed);
    assert_eq!(http_get(health, "/healthz").expect("an answer").0, 200);
    assert_eq!(http_get(health, "/readyz").expect("an answer").0, 200);
    assert_eq!(https(&bed, "127.0.0.1:6443", 12).failed(), 0);

    let m1 = bed.lab.master("m1").unwrap().https_v4().to_string();
    let (code, text) = http_get(metrics, "/metrics").expect("an answer");
    assert_eq!(code, 200);
    assert!(
        text.contains(&format!("kha_backend_up{{frontend=\"127.0.0.1:6443\",backend=\"{m1}\"}} 1")),
        "{text}"
    );
    let chosen: u64 = text
        .lines()
        .filter(|l| l.starts_with("kha_connections_chosen_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(chosen >= 12, "kernel counters in /metrics: {text}");
    assert!(text.contains("kha_probe_duration_seconds_count{"), "{text}");

    bed.lab.kill_master("m1").unwrap();
    wait_state(&bed, &m1, "down", false);
    let (_, text) = http_get(metrics, "/metrics").expect("an answer");
    assert!(
        text.contains(&format!("kha_backend_up{{frontend=\"127.0.0.1:6443\",backend=\"{m1}\"}} 0")),
        "{text}"
    );
    assert!(text.contains(&format!("backend=\"{m1}\",state=\"down\"}} 1")), "{text}");

    for name in ["m2", "m3"] {
        bed.lab.kill_master(name).unwrap();
    }
    let m3 = bed.lab.master("m3").unwrap().https_v4().to_string();
    wait_state(&bed, &m3, "down", true);
    let (code, body) = http_get(health, "/readyz").expect("an answer");
    assert_eq!(code, 503, "{body}");
    assert_eq!(http_get(health, "/healthz").expect("an answer").0, 200, "the agent itself is fine");
    let (_, text) = http_get(metrics, "/metrics").expect("an answer");
    assert!(text.contains("kha_frontend_fallback{frontend=\"127.0.0.1:6443\"} 1"), "{text}");
}

#[test]
fn a_frontend_may_bring_its_own_ca() {
    let Some(mut bed) = harness::bed(3) else { return };
    let other = kha_lab::pki::CertAuthority::new("another CA").unwrap();
    let wrong = bed.lab.workdir().join("wrong-ca.pem");
    std::fs::write(&wrong, other.cert_pem()).unwrap();
    let backends: Vec<String> = bed.lab.masters().iter().map(|m| format!("\"{}\"", m.https_v4())).collect();
    // The global CA (--ca-file) is wrong; the frontend's own (as etcd's would be) is right.
    let config = harness::config_file(
        &bed,
        "own-ca.toml",
        &format!(
            "[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [{}]\nca_file = \"{}\"\n",
            backends.join(", "),
            bed.pki.ca_cert.display()
        ),
    );
    let wrong = wrong.display().to_string();
    let config = config.display().to_string();
    start(&mut bed, &args(&["--config", &config, "--ca-file", &wrong, "--probe-interval-ms", "300"]));
    all_up(&bed);
    // And without it, the same probes fail: the frontend's CA is what made them pass.
    bed.stop_agent(libc::SIGTERM).unwrap();
    let plain = harness::config_file(
        &bed,
        "global-ca.toml",
        &format!("[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackends = [{}]\n", backends.join(", ")),
    );
    let plain = plain.display().to_string();
    start(&mut bed, &args(&["--config", &plain, "--ca-file", &wrong, "--probe-interval-ms", "300"]));
    let m1 = bed.lab.master("m1").unwrap().https_v4().to_string();
    wait_state(&bed, &m1, "down", true);
}

#[test]
fn a_never_ending_response_takes_the_master_out() {
    let Some(mut bed) = harness::bed(3) else { return };
    start_checked(&mut bed, &[]);
    all_up(&bed);
    let victim = "m2";
    let addr = bed.lab.master(victim).unwrap().https_v4().to_string();
    // 200 and then one byte every 200 ms, forever. The probe refuses it by its bounds (the
    // announced length, else its deadline) instead of waiting on it.
    bed.lab.set_mode(victim, FailureMode::Endless).unwrap();
    wait_state(&bed, &addr, "down", false);
    let (_, _, reason) = state_of(&bed, &addr).unwrap();
    assert!(
        reason.as_deref().is_some_and(|r| r.contains("larger than") || r.to_lowercase().contains("time")),
        "{reason:?}"
    );
    let run = https(&bed, "127.0.0.1:6443", 30);
    assert_eq!((run.failed(), run.by_master(victim)), (0, 0), "{:?}", run.summary);
    bed.lab.set_mode(victim, FailureMode::Normal).unwrap();
    wait_state(&bed, &addr, "up", true);
}

/// Certificate rotation: the agent re-reads its CA file by itself (no SIGHUP). It starts with
/// a CA that did not sign the masters (all down, served by fallback); the file is replaced by
/// the right CA and the masters come up. A broken replacement after that is refused and
/// logged, and the config in use stays, for established and new probe connections alike.
#[test]
fn a_rotated_ca_file_is_picked_up_without_sighup_and_a_broken_one_is_ignored() {
    let Some(mut bed) = harness::bed(3) else { return };
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let other = kha_lab::pki::CertAuthority::new("another CA").unwrap();
    let ca = bed.lab.workdir().join("rotating-ca.pem");
    std::fs::write(&ca, other.cert_pem()).unwrap();
    let ca_arg = ca.display().to_string();
    start_checked(&mut bed, &["--ca-file", &ca_arg, "--metrics-addr", &metrics_addr]);
    let m1 = bed.lab.master("m1").unwrap().https_v4().to_string();
    wait_state(&bed, &m1, "down", true);

    // As an installer replaces it: a new file renamed over the old, no signal.
    let right = std::fs::read_to_string(&bed.pki.ca_cert).unwrap();
    let tmp = bed.lab.workdir().join("rotating-ca.pem.tmp");
    std::fs::write(&tmp, &right).unwrap();
    std::fs::rename(&tmp, &ca).unwrap();
    all_up(&bed);
    assert!(bed.agent_log_text().contains("probe TLS reloaded"), "{}", bed.agent_log_text());

    // Half-written, in place.
    std::fs::write(&ca, &right[..right.len() / 2]).unwrap();
    wait_for("the broken CA file refused", Duration::from_secs(20), || {
        bed.agent_log_text().contains("cannot be used, keeping the config in use")
    });
    let log = bed.agent_log_text();
    let line = log.lines().find(|l| l.contains("cannot be used")).unwrap();
    assert!(line.contains(&ca_arg), "the log line names the file: {line}");
    let (_, text) = http_get(metrics, "/metrics").expect("an answer");
    for series in [
        "kha_probe_tls_reloads_total{result=\"reloaded\"} 1",
        "kha_probe_tls_reloads_total{result=\"rejected\"} 1",
    ] {
        assert!(text.contains(series), "missing {series}: {text}");
    }
    // A new probe connection still gets the config in use: m1 dies and comes back.
    bed.lab.kill_master("m1").unwrap();
    wait_state(&bed, &m1, "down", false);
    bed.lab.restart_master("m1").unwrap();
    all_up(&bed);
    let run = https(&bed, "127.0.0.1:6443", 12);
    assert_eq!(run.failed(), 0, "{:?}", run.summary);
}
