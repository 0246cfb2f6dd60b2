//! `kha run --discover`: masters join and leave through the `kubernetes` service's
//! EndpointSlices, served by a fake API server in this test process. The agent runs in the
//! test's own namespace, outside the served cgroup, so its API connections reach the fake on
//! 127.0.0.1 directly (on a node the kubeconfig names kha's own frontend, https://localhost:6443,
//! and discovery asks a master it knows instead: the last test).

use std::{collections::BTreeSet, net::SocketAddr, path::Path, thread, time::Duration};

use kha_lab::{bed::Bed, fake_apiserver};

use crate::{
    harness::{self, https, start, wait_for},
    health::probe_args,
};

/// Frontend 0's backends from `kha status`: every address, and those serving and up.
fn backends(bed: &Bed) -> (BTreeSet<String>, BTreeSet<String>) {
    let Some(s) = harness::status(bed) else { return Default::default() };
    let list = s["frontends"][0]["backends"].as_array().cloned().unwrap_or_default();
    let all = list.iter().filter_map(|b| b["address"].as_str().map(String::from)).collect();
    let up = list
        .iter()
        .filter(|b| b["serving"] == true && b["state"] == "up")
        .filter_map(|b| b["address"].as_str().map(String::from))
        .collect();
    (all, up)
}

fn names(addrs: &[SocketAddr]) -> BTreeSet<String> {
    addrs.iter().map(|a| a.to_string()).collect()
}

/// Waits until frontend 0 has exactly `want`, all serving and up.
fn wait_backends(bed: &Bed, want: &[SocketAddr], what: &str) {
    let want = names(want);
    let mut last = Default::default();
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(what, Duration::from_secs(20), || {
            last = backends(bed);
            last.0 == want && last.1 == want
        })
    }));
    if ok.is_err() {
        panic!("{what}: want {want:?} all up, have {last:?}\nagent log:\n{}", bed.agent_log_text());
    }
}

fn persisted(state_dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(state_dir.join("discovered.json")).expect("the state file");
    serde_json::from_str(&text).expect("state file JSON")
}

/// The probe flags and `--discover` with `kubeconfig` and `state_dir`.
fn discover_args(kubeconfig: &std::path::Path, state_dir: &std::path::Path) -> Vec<String> {
    probe_args(&[
        "--discover",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--state-dir",
        &state_dir.display().to_string(),
    ])
}

#[test]
fn discovered_masters_join_and_leave_and_a_dead_api_changes_nothing() {
    let Some(mut bed) = harness::bed(3) else { return };
    let m: Vec<SocketAddr> = bed.lab.masters().iter().map(|m| m.https_v4()).collect();
    let workdir = bed.lab.workdir().to_path_buf();
    let state_dir = workdir.join("state");
    let (mut api, kubeconfig) = fake_apiserver::start_for_lab(&bed.pki, &workdir).expect("fake apiserver");
    api.set_masters("kubernetes", &m);

    // The static list names master 1 only; the API announces all three.
    let mut a = discover_args(&kubeconfig, &state_dir);
    // A resync every second, so that the wait below after the API dies spans two of them.
    a.extend(["--backend".to_string(), m[0].to_string(), "--resync-interval".into(), "1".into()]);
    start(&mut bed, &a);
    wait_backends(&bed, &m, "all three discovered masters serving");
    // Written once masters 2 and 3 (named only by discovery) passed their first probe.
    let all = serde_json::json!(m.iter().map(|a| a.to_string()).collect::<Vec<_>>());
    wait_for("the three masters persisted", Duration::from_secs(10), || {
        std::fs::read_to_string(state_dir.join("discovered.json"))
            .is_ok_and(|_| persisted(&state_dir)["backends"] == all)
    });

    // Master 1 leaves the service: it leaves the set although the static list names it.
    api.set_masters("kubernetes", &m[1..]);
    wait_backends(&bed, &m[1..], "master 1 removed");

    // The API dies: nothing changes.
    api.stop();
    wait_for("the agent to notice the dead API", Duration::from_secs(20), || {
        bed.agent_log_text().contains("discovery failed")
    });
    thread::sleep(Duration::from_secs(2)); // two resyncs
    let (all, up) = backends(&bed);
    assert_eq!((all, up), (names(&m[1..]), names(&m[1..])), "a dead API empties nothing");
    assert!(bed.agent_pid().is_some());

    // Restarted with the API still dead: the static list joined by the persisted set.
    bed.stop_agent(libc::SIGTERM).expect("agent stops");
    start(&mut bed, &a);
    wait_backends(&bed, &m, "static master 1 plus the persisted masters 2 and 3");
    assert!(bed.agent_log_text().contains("2 backends from the last run"), "{}", bed.agent_log_text());
}

/// Frontend 0's entry for `backend` in `kha status`: (state, serving).
fn entry(bed: &Bed, backend: &str) -> Option<(String, bool)> {
    let s = harness::status(bed)?;
    let b = s["frontends"][0]["backends"].as_array()?.iter().find(|b| b["address"] == backend)?.clone();
    Some((b["state"].as_str()?.to_string(), b["serving"].as_bool()?))
}

/// An address in the lab's subnet that nothing answers on.
const FORGED: &str = "192.0.2.200";

#[test]
fn an_endpoint_that_never_passed_a_probe_is_never_served() {
    let Some(mut bed) = harness::bed(3) else { return };
    let m: Vec<SocketAddr> = bed.lab.masters().iter().map(|m| m.https_v4()).collect();
    let workdir = bed.lab.workdir().to_path_buf();
    let (api, kubeconfig) = fake_apiserver::start_for_lab(&bed.pki, &workdir).expect("fake apiserver");
    api.set_masters("kubernetes", &m);
    let state_dir = workdir.join("state");
    let mut a = discover_args(&kubeconfig, &state_dir);
    for b in &m {
        a.extend(["--backend".to_string(), b.to_string()]);
    }
    start(&mut bed, &a);
    wait_backends(&bed, &m, "the three masters serving");
    let real = serde_json::json!(m.iter().map(|a| a.to_string()).collect::<Vec<_>>());
    wait_for("the masters persisted", Duration::from_secs(10), || {
        std::fs::read_to_string(state_dir.join("discovered.json"))
            .is_ok_and(|_| persisted(&state_dir)["backends"] == real)
    });

    // Whoever can write the slice adds an address with no apiserver behind it.
    let forged: SocketAddr = format!("{FORGED}:6443").parse().unwrap();
    let mut with_forged = m.clone();
    with_forged.push(forged);
    api.set_masters("kubernetes", &with_forged);
    let name = forged.to_string();
    let mut seen = Vec::new();
    let mut answered_by = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // From the moment it appears until its first probe failed: never serving, and every
    // connect through the frontend reaches a real master.
    loop {
        let e = entry(&bed, &name);
        if let Some(e) = &e {
            assert!(
                !e.1,
                "{name} served as {e:?} before any probe passed\nagent log:\n{}",
                bed.agent_log_text()
            );
            seen.push(e.0.clone());
        }
        let run = https(&bed, "127.0.0.1:6443", 3);
        for r in &run.records {
            assert!(r["error"].is_null(), "a connect failed: {r}\nagent log:\n{}", bed.agent_log_text());
            answered_by.insert(r["master"].as_str().unwrap_or("?").to_string());
        }
        if e.is_some_and(|e| e.0 == "down") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never probed down: {seen:?}\n{}",
            bed.agent_log_text()
        );
    }
    assert_eq!(seen.first().map(String::as_str), Some("unproven"), "{seen:?}");
    assert!(answered_by.iter().all(|m| bed.lab.master(m).is_ok()), "{answered_by:?}");
    let (all, up) = backends(&bed);
    assert!(all.contains(&name));
    assert_eq!(up, names(&m), "the real masters keep serving");
    // Never vouched for, so never written where the next start would trust it.
    thread::sleep(Duration::from_secs(1));
    assert_eq!(persisted(&state_dir)["backends"], real, "the state file took the forged address");
}

#[test]
fn discovery_asks_a_known_master_directly_not_kha_s_own_frontend() {
    let Some(mut bed) = harness::bed(1) else { return };
    let workdir = bed.lab.workdir().to_path_buf();
    let node = bed.lab.node_netns().to_string();
    // The agent in the node namespace, as a DaemonSet with hostNetwork, with an apiserver
    // there that serves both the probes and the EndpointSlices.
    bed.agent_in_node = true;
    let (api, fake_kubeconfig) =
        fake_apiserver::start_for_lab_in(Some(&node), &bed.pki, &workdir).expect("fake apiserver");
    let master = api.addr;
    let forged: SocketAddr = format!("{FORGED}:{}", master.port()).parse().unwrap();
    api.set_masters("kubernetes", &[master, forged]);
    // The node's kubeconfig names kha's own frontend. The agent is outside the cgroup kha
    // serves, so nothing answers there: asked through the frontend, discovery would fail
    // (on a node: the frontend serving a broken set would keep the node from the fix).
    let kubeconfig = workdir.join("kubelet.conf");
    let text = std::fs::read_to_string(&fake_kubeconfig).unwrap();
    std::fs::write(&kubeconfig, text.replace(&api.url(), "https://127.0.0.1:6443")).unwrap();
    let mut a = discover_args(&kubeconfig, &workdir.join("state"));
    a.extend(["--backend".to_string(), master.to_string()]);
    start(&mut bed, &a);
    let mut last = None;
    let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the slice discovered through the master itself", Duration::from_secs(20), || {
            last = Some((entry(&bed, &master.to_string()), entry(&bed, &forged.to_string())));
            matches!(&last, Some((Some((m, true)), Some((_, false)))) if m == "up")
        })
    }));
    if ok.is_err() {
        panic!(
            "want {master} up and {forged} listed, not serving; have {last:?}\nagent log:\n{}",
            bed.agent_log_text()
        );
    }
    assert!(
        api.requests().iter().any(|r| r.starts_with(&format!("GET {}?", fake_apiserver::SLICES_PATH))),
        "{:?}",
        api.requests()
    );
    let log = bed.agent_log_text();
    assert!(log.contains(&format!("asking master {master} directly")), "{log}");
}
