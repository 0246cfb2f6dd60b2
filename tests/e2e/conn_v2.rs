//! The upgrade that brought per-client attribution: `KHA_CONNS` layout 1 (no client cgroup)
//! to 2. The open connections an older kha redirected are translated, stay tracked and
//! counted; connects after the upgrade are attributed to their clients.

use std::time::Duration;

use serde_json::Value;

use crate::{
    conns::dump,
    harness::{self, LiveClient, wait_for},
    migration::{active_against_conns, record, start_tls},
    top::{child_cgroup, client, spawn, top},
};

#[test]
#[ignore = "needs KHA_V1_BIN: a kha whose KHA_CONNS has layout version 1 (main before KHA_CLIENTS)"]
fn an_upgrade_from_conn_layout_1_keeps_the_open_connections_and_attributes_new_ones() {
    let v1 = std::env::var_os("KHA_V1_BIN").expect("KHA_V1_BIN: a kha with KHA_CONNS layout 1");
    let Some(mut bed) = harness::bed(3) else { return };
    let new = std::mem::replace(&mut bed.kha_bin, v1.into());
    start_tls(&mut bed, &[]);
    assert!(!bed.pin_dir.join("maps/KHA_CLIENTS").exists(), "KHA_V1_BIN already has KHA_CLIENTS");
    assert_eq!(record(&bed, "KHA_CONNS")["version"], 1);
    let clients = [LiveClient::start(&bed, 900), LiveClient::start(&bed, 900)];
    let first: Vec<Value> = clients.iter().map(|c| c.next()).collect();
    assert!(first.iter().all(|r| r["error"].is_null()), "{first:?}");
    let before = active_against_conns(&bed);
    assert!(before.iter().all(|(_, active, open)| active == open), "{before:?}");

    assert_eq!(bed.stop_agent(libc::SIGTERM).unwrap().code(), Some(0));
    bed.kha_bin = new;
    start_tls(&mut bed, &[]);
    let log = bed.agent_log_text();
    assert!(log.contains("KHA_CONNS: migrated (Layout { from: 1, to: 2 }), 2 entries copied"), "{log}");
    assert!(log.contains("KHA_CLIENTS: created"), "{log}");
    wait_for("the old map set removed", Duration::from_secs(10), || !bed.pin_dir.join("maps-next").exists());
    assert_eq!(record(&bed, "KHA_CONNS")["version"], 2);

    // The same sockets go on, tracked and counted, with no client (version 1 had none).
    for (c, f) in clients.iter().zip(&first) {
        let r = c.next();
        assert!(r["error"].is_null() && r["reused"] == true && r["local"] == f["local"], "{f} then {r}");
    }
    let conns = dump(&bed, "KHA_CONNS");
    assert_eq!(conns.len(), 2, "{conns:?}");
    assert!(conns.iter().all(|c| c["formatted"]["value"]["client_cgroup_id"] == 0), "{conns:?}");
    assert_eq!(active_against_conns(&bed), before, "(backend id, active, open sockets) after the upgrade");

    // New connects are attributed; the carried connections are in no client's count.
    let cg = child_cgroup(&bed, "after-upgrade");
    let moved = spawn(
        &bed,
        &cg.path,
        &bed.lab_bin,
        &["connect", "--addr", "127.0.0.1:6443", "--count", "5", "--json"],
    );
    let out = moved.wait_with_output().expect("connect tool");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = top(&bed, &[]);
    let c = client(&v, "after-upgrade");
    assert_eq!((c["connects"].as_u64(), c["process"].as_str()), (Some(5), Some("kha-lab")), "{c:#}");
    assert_eq!(v["clients"].as_array().unwrap().len(), 1, "only the new connects are attributed: {v:#}");
    assert_eq!(harness::https(&bed, "127.0.0.1:6443", 3).failed(), 0, "the datapath after the upgrade");
}
