//! `kha run --discover`: masters join and leave through the `kubernetes` service's
//! EndpointSlices, served by a fake API server in this test process. The agent runs in the
//! test's own namespace, outside the served cgroup, so its API connections reach the fake on
//! 127.0.0.1 directly (on a node they go through kha itself, to https://localhost:6443).

use std::{collections::BTreeSet, net::SocketAddr, path::Path, thread, time::Duration};

use kha_lab::{bed::Bed, fake_apiserver};

use crate::{
    harness::{self, start, wait_for},
    health::probe_args,
};

/// Frontend 0's backends from `kha status`: every address, and those serving and up.
fn backends(bed: &Bed) -> (BTreeSet<String>, BTreeSet<String>) {
    let Some(s) = bed.status() else { return Default::default() };
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

#[test]
fn discovered_masters_join_and_leave_and_a_dead_api_changes_nothing() {
    let Some(mut bed) = harness::bed(3) else { return };
    let m: Vec<SocketAddr> = bed.lab.masters().iter().map(|m| m.https_v4()).collect();
    let workdir = bed.lab.workdir().to_path_buf();
    let state_dir = workdir.join("state");
    let (mut api, kubeconfig) = fake_apiserver::start_for_lab(&bed.pki, &workdir).expect("fake apiserver");
    api.set_masters("kubernetes", &m);

    // The static list names master 1 only; the API announces all three.
    let mut a = probe_args(&[
        "--discover",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--state-dir",
        &state_dir.display().to_string(),
    ]);
    a.extend(["--backend".to_string(), m[0].to_string()]);
    start(&mut bed, &a);
    wait_backends(&bed, &m, "all three discovered masters serving");
    assert_eq!(
        persisted(&state_dir)["backends"],
        serde_json::json!(m.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    );

    // Master 1 leaves the service: it leaves the set although the static list names it.
    api.set_masters("kubernetes", &m[1..]);
    wait_backends(&bed, &m[1..], "master 1 removed");

    // The API dies: nothing changes.
    api.stop();
    wait_for("the agent to notice the dead API", Duration::from_secs(20), || {
        bed.agent_log_text().contains("discovery failed")
    });
    thread::sleep(Duration::from_secs(2));
    let (all, up) = backends(&bed);
    assert_eq!((all, up), (names(&m[1..]), names(&m[1..])), "a dead API empties nothing");
    assert!(bed.agent_pid().is_some());

    // Restarted with the API still dead: the static list joined by the persisted set.
    bed.stop_agent(libc::SIGTERM).expect("agent stops");
    start(&mut bed, &a);
    wait_backends(&bed, &m, "static master 1 plus the persisted masters 2 and 3");
    assert!(bed.agent_log_text().contains("2 backends from the last run"), "{}", bed.agent_log_text());
}
