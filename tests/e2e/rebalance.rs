//! Rebalancing (`--rebalance-interval-ms`): long-lived connections that piled onto the one
//! master left while the others were down spread again once they are back, one connection per
//! interval, and the moves stop once the masters are even.

use std::{collections::BTreeMap, time::Duration};

use crate::{
    harness::{self, LiveClient, backends, free_port, http_get, start, wait_for},
    health::{all_up, probe_args, wait_state},
};

const CLIENTS: usize = 6;

fn rebalanced(metrics: u16) -> u64 {
    let (_, text) = http_get(metrics, "/metrics").expect("/metrics answers");
    let line = text.lines().find(|l| l.starts_with("kha_rebalanced_connections_total "));
    line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no counter:\n{text}"))
}

#[test]
fn long_lived_connections_spread_again_after_masters_return() {
    let Some(mut bed) = harness::bed(3) else { return };
    let metrics = free_port();
    let m = format!("127.0.0.1:{metrics}");
    let mut a = probe_args(&["--rebalance-interval-ms", "300", "--metrics-addr", &m]);
    a.extend(backends(&bed, |m| m.https_v4()));
    start(&mut bed, &a);
    all_up(&bed);
    let names: Vec<String> = bed.lab.masters().iter().map(|m| m.name.clone()).collect();
    let addr = |bed: &kha_lab::bed::Bed, n: &str| bed.lab.master(n).unwrap().https_v4().to_string();
    for n in &names[1..] {
        bed.lab.kill_master(n).unwrap();
        wait_state(&bed, &addr(&bed, n), "down", false);
    }
    // 60 s of requests each, on one kept-alive connection (a new one after each reset).
    let clients: Vec<LiveClient> = (0..CLIENTS).map(|_| LiveClient::start(&bed, 600)).collect();
    for c in &clients {
        assert_eq!(c.next()["master"].as_str(), Some(names[0].as_str()), "only m1 is up");
    }
    assert_eq!(rebalanced(metrics), 0, "nothing to rebalance onto");
    for n in &names[1..] {
        bed.lab.restart_master(n).unwrap();
        wait_state(&bed, &addr(&bed, n), "up", true);
    }

    let mut last: Vec<String> = vec![names[0].clone(); CLIENTS];
    let mut failed = 0;
    let even = |last: &[String]| {
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        last.iter().for_each(|m| *per.entry(m).or_default() += 1);
        per.len() == 3 && per.values().all(|n| *n == CLIENTS / 3)
    };
    wait_for("the clients spread 2/2/2", Duration::from_secs(30), || {
        for (c, l) in clients.iter().zip(&mut last) {
            for r in c.drain() {
                match r["master"].as_str() {
                    Some(m) if r["error"].is_null() => *l = m.to_string(),
                    _ => failed += 1,
                }
            }
        }
        even(&last)
    });
    let moves = rebalanced(metrics);
    eprintln!("rebalanced: {moves} moves, {failed} failed requests, clients on {last:?}");
    assert!(moves >= 4, "6/0/0 to 2/2/2 takes four moves at least: {moves}");
    assert!(failed as u64 <= moves, "a move costs at most the one request in flight: {failed} > {moves}");
    // Even: no more moves (the interval is 300 ms, so ten rounds would have run).
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(rebalanced(metrics), moves, "moves went on after the masters were even");
    let log = bed.agent_log_text();
    assert!(log.contains("rebalance: moved 1 connection"), "the log says what moved:\n{log}");
}
