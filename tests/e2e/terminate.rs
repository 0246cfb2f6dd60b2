//! How kha ends the connections of a failed master: with a forged TCP RST, so the client reads
//! ECONNRESET ("connection reset by peer", which client-go takes for the normal end of a
//! watch), not SOCK_DESTROY's ECONNABORTED (after which client-go relists). SOCK_DESTROY stays
//! the fallback (tests/e2e/privileges.rs takes CAP_NET_RAW away).

use std::net::SocketAddr;

use kha_lab::bed::Bed;

use crate::{
    harness::{self, LiveClient, backends, start},
    health::{all_up, probe_args, wait_state},
};

pub fn counter(bed: &Bed, name: &str) -> u64 {
    let st = bed.status().expect("kha status");
    let c = st["counters"].as_array().unwrap().iter().find(|c| c["name"] == name);
    c.unwrap_or_else(|| panic!("no counter {name}: {st}"))["value"].as_u64().unwrap()
}

/// A long-lived client through `frontend` on a master that is then frozen (SIGSTOP: its
/// kernel keeps the connection open, so only kha can end it): the client reads ECONNRESET.
fn frozen_master_resets(frontend: &str, backend: impl Fn(&kha_lab::topology::LabMaster) -> SocketAddr) {
    let Some(mut bed) = harness::bed(3) else { return };
    let mut a = probe_args(&[]);
    a[1] = frontend.to_string();
    a.extend(backends(&bed, backend));
    start(&mut bed, &a);
    all_up(&bed);
    let client = LiveClient::start_via(&bed, 400, frontend);
    let victim = client.next()["master"].as_str().expect("a first answer").to_string();
    let addr = bed.lab.master(&victim).unwrap().https_v4().to_string();
    bed.lab.stop_master(&victim).unwrap();

    let (failure, _) = client.failure_then_recovery(&victim);
    eprintln!("frozen {victim}: {failure}");
    let error = failure["error"].as_str().unwrap();
    assert!(error.contains("ECONNRESET"), "not reset by kha's RST: {failure}");
    assert!(failure["latency_ms"].as_f64().unwrap() < 15_000.0, "the request hung: {failure}");
    wait_state(&bed, &addr, "down", false);
    assert!(counter(&bed, "terminated_reset") >= 1);
    assert_eq!(counter(&bed, "terminated_destroy"), 0, "a socket fell back to SOCK_DESTROY");
    assert_eq!(counter(&bed, "terminated"), counter(&bed, "terminated_reset"));
    let log = bed.agent_log_text();
    assert!(!log.contains("SOCK_DESTROY (clients read ECONNABORTED)"), "a fallback:\n{log}");
    bed.lab.cont_master(&victim).unwrap();
    wait_state(&bed, &addr, "up", true);
}

#[test]
fn a_frozen_masters_long_lived_connection_is_reset_not_aborted() {
    frozen_master_resets("127.0.0.1:6443", |m| m.https_v4());
}

/// connect6 sends `[::1]:6443` to a v4-mapped backend: an IPv6 socket on an IPv4 connection,
/// whose RST must be an IPv4 packet.
#[test]
fn an_ipv6_socket_on_an_ipv4_master_is_reset_too() {
    frozen_master_resets("[::1]:6443", |m| m.https_v4());
}

/// A master removed from the config while no agent ran: the restarted agent finds the last
/// run's sockets to it in `KHA_CONNS` and ends them after the drain time (2 s here), as for a
/// removal while it runs. Before, they stayed on that master until their clients closed them.
#[test]
fn a_master_removed_while_no_agent_ran_loses_its_connections_after_the_drain() {
    let Some(mut bed) = harness::bed(3) else { return };
    let addr = |n: &str| bed.lab.master(n).unwrap().https_v4().to_string();
    let (m1, m2, m3) = (addr("m1"), addr("m2"), addr("m3"));
    let mut a = probe_args(&[]);
    a.extend(["--backend".to_string(), m1.clone()]);
    start(&mut bed, &a);
    wait_state(&bed, &m1, "up", true);
    let client = LiveClient::start(&bed, 400);
    assert_eq!(client.next()["master"], "m1");
    bed.stop_agent(libc::SIGTERM).unwrap();
    let mut a = probe_args(&[]);
    a.extend(["--backend".to_string(), m2.clone(), "--backend".to_string(), m3.clone()]);
    let restarted = std::time::Instant::now();
    start(&mut bed, &a);
    let (failure, recovered) = client.failure_then_recovery("m1");
    let after = restarted.elapsed();
    eprintln!("removed while down: ended after {after:?}: {failure} then {recovered}");
    assert!(failure["error"].as_str().unwrap().contains("ECONNRESET"), "{failure}");
    assert!(after >= std::time::Duration::from_secs(2), "before the drain time: {after:?}");
    let log = bed.agent_log_text();
    assert!(log.contains("from the last run go to a backend this config does not name"), "{log}");
}
