//! Upgrades that change the pinned maps (docs/maps.md, "Layout versions and upgrades"): a new
//! conn map capacity, a map recorded with an older layout version. The new maps are filled
//! beside the old ones and the programs swapped, so no connect fails and the open
//! connections kha redirected stay tracked; a layout it cannot carry over is refused.

use std::{process::Command, time::Duration};

use kha_lab::{bed::Bed, topology::IDENT_PORT};
use serde_json::Value;

use crate::{
    conns::dump,
    harness::{self, ConnectLoop, LiveClient, args, backends, connect, start, wait_for},
    health::{all_up, probe_args},
};

pub(crate) fn start_tls(bed: &mut Bed, extra: &[&str]) {
    let mut a = probe_args(&[]);
    a.extend(backends(bed, |m| m.https_v4()));
    a.extend(args(extra));
    start(bed, &a);
    all_up(bed);
}

fn start_ident(bed: &mut Bed) {
    let mut a = args(&["--frontend", &format!("127.0.0.1:{IDENT_PORT}"), harness::NO_CHECKS]);
    a.extend(backends(bed, |m| m.ident_v4()));
    start(bed, &a);
}

fn bpftool(list: &[&str]) -> Value {
    let out = Command::new("bpftool").arg("-j").args(list).output().expect("bpftool");
    assert!(out.status.success(), "bpftool {list:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

fn map_path(bed: &Bed, map: &str) -> String {
    bed.pin_dir.join("maps").join(map).display().to_string()
}

fn max_entries(bed: &Bed, map: &str) -> u64 {
    bpftool(&["map", "show", "pinned", &map_path(bed, map)])["max_entries"].as_u64().unwrap()
}

/// `KHA_LAYOUT`'s entries by map name: (index, raw value bytes, decoded value).
fn layout(bed: &Bed) -> Vec<(u32, Vec<u8>, Value)> {
    let hex = |v: &Value| -> Vec<u8> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|b| u8::from_str_radix(&b.as_str().unwrap()[2..], 16).unwrap())
            .collect()
    };
    dump(bed, "KHA_LAYOUT")
        .iter()
        .map(|e| {
            let key = hex(&e["key"]);
            (
                u32::from_le_bytes(key[..4].try_into().unwrap()),
                hex(&e["value"]),
                e["formatted"]["value"].clone(),
            )
        })
        .filter(|(_, raw, _)| raw[0] != 0)
        .collect()
}

fn name_of(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..16]).trim_end_matches('\0').to_string()
}

pub(crate) fn record(bed: &Bed, map: &str) -> Value {
    let all = layout(bed);
    let found = all.iter().find(|(_, raw, _)| name_of(raw) == map);
    found.unwrap_or_else(|| panic!("no KHA_LAYOUT entry for {map}: {all:?}")).2.clone()
}

/// Rewrites the version `KHA_LAYOUT` records for `map`, as an older (or unknown) build would
/// have recorded it.
fn claim_version(bed: &Bed, map: &str, version: u32) {
    let (index, mut raw, _) =
        layout(bed).into_iter().find(|(_, raw, _)| name_of(raw) == map).expect("a record of the map");
    raw[16..20].copy_from_slice(&version.to_le_bytes());
    let path = map_path(bed, "KHA_LAYOUT");
    let mut list: Vec<String> = args(&["map", "update", "pinned", &path, "key"]);
    list.extend(index.to_le_bytes().iter().map(|b| b.to_string()));
    list.push("value".into());
    list.extend(raw.iter().map(|b| b.to_string()));
    let out = Command::new("bpftool").args(&list).output().expect("bpftool");
    assert!(out.status.success(), "bpftool map update: {}", String::from_utf8_lossy(&out.stderr));
}

/// `active` of every backend id that has open sockets in `KHA_CONNS`, against how many
/// entries name it.
pub(crate) fn active_against_conns(bed: &Bed) -> Vec<(u64, u64, u64)> {
    let conns = dump(bed, "KHA_CONNS");
    let mut ids: Vec<u64> =
        conns.iter().map(|c| c["formatted"]["value"]["backend_id"].as_u64().unwrap()).collect();
    ids.sort();
    ids.dedup();
    ids.iter()
        .map(|id| {
            let key: Vec<String> = (*id as u32).to_le_bytes().iter().map(|b| b.to_string()).collect();
            let mut list = vec!["map", "lookup", "pinned"];
            let path = map_path(bed, "KHA_BE_STATS");
            list.push(&path);
            list.push("key");
            list.extend(key.iter().map(String::as_str));
            let active = bpftool(&list)["formatted"]["value"]["active"].as_u64().unwrap();
            let entries =
                conns.iter().filter(|c| c["formatted"]["value"]["backend_id"].as_u64() == Some(*id)).count();
            (*id, active, entries as u64)
        })
        .collect()
}

fn wait_for_records(client: &ConnectLoop, n: usize) {
    wait_for("the connect loop to run", Duration::from_secs(20), || client.records() > n);
}

#[test]
fn a_conn_capacity_change_migrates_under_a_connect_loop_and_keeps_open_connections() {
    let Some(mut bed) = harness::bed(3) else { return };
    start_tls(&mut bed, &["--max-conns", "2048"]);
    assert_eq!(max_entries(&bed, "KHA_CONNS"), 2048);
    assert_eq!(record(&bed, "KHA_CONNS")["max_entries"], 2048);
    // The default capacity: the pinned 2048-entry conn map must be migrated.
    upgrade_under_load(&mut bed, &[], 2048, kha_common::CONNS_CAPACITY as u64);
}

/// A build from before `KHA_LAYOUT` (`KHA_OLD_BIN`, e.g. main's `kha` before the record) pinned
/// the maps; this one takes them over, assumes version 1, and migrates the conn map to a
/// smaller capacity.
#[test]
#[ignore = "needs KHA_OLD_BIN: a kha built before KHA_LAYOUT"]
fn an_upgrade_from_a_build_before_the_layout_record_fails_no_connect() {
    let old = std::env::var_os("KHA_OLD_BIN").expect("KHA_OLD_BIN: a kha built before KHA_LAYOUT");
    let Some(mut bed) = harness::bed(3) else { return };
    let new = std::mem::replace(&mut bed.kha_bin, old.into());
    start_tls(&mut bed, &[]);
    assert!(!bed.pin_dir.join("maps/KHA_LAYOUT").exists(), "KHA_OLD_BIN already records layouts");
    bed.kha_bin = new;
    // 65536: the default of the builds before the record.
    upgrade_under_load(&mut bed, &["--max-conns", "32768"], 65536, 32768);
    for map in kha_common::LAYOUTS {
        assert_eq!(record(&bed, map.name)["version"], map.version, "{map:?}");
    }
}

/// A backend table migrated with the slots (here: slots recorded with an older version) keeps
/// every backend's counters, so the open connections' `active` stays exact. The agent's sync
/// into the staged set used to find its backend table empty, take every backend for a new
/// one and zero its counters in the shared `KHA_BE_STATS`.
#[test]
fn a_migrated_backend_table_keeps_the_open_connections_counted() {
    let Some(mut bed) = harness::bed(3) else { return };
    start_tls(&mut bed, &[]);
    let clients = [LiveClient::start(&bed, 900), LiveClient::start(&bed, 900)];
    let first: Vec<Value> = clients.iter().map(|c| c.next()).collect();
    assert!(first.iter().all(|r| r["error"].is_null()), "{first:?}");
    let before = active_against_conns(&bed);
    assert!(!before.is_empty() && before.iter().all(|(_, active, open)| active == open), "{before:?}");
    assert_eq!(bed.stop_agent(libc::SIGTERM).unwrap().code(), Some(0));
    claim_version(&bed, "KHA_SVC", 0);
    start_tls(&mut bed, &[]);
    wait_for("the old map set removed", Duration::from_secs(10), || !bed.pin_dir.join("maps-next").exists());
    for (c, f) in clients.iter().zip(&first) {
        let r = c.next();
        assert!(r["error"].is_null() && r["reused"] == true && r["local"] == f["local"], "{f} then {r}");
    }
    assert_eq!(active_against_conns(&bed), before, "(backend id, active, open sockets) after the migration");
    let log = bed.agent_log_text();
    assert!(log.contains("KHA_BACKENDS: migrated (Tied), 3 entries copied"), "{log}");
}

/// The build before the backend table stopped being preallocated (`KHA_PREV_BIN`, e.g. main's
/// `kha` from before `BPF_F_NO_PREALLOC`, whose conn map default was 65536) pinned the maps;
/// this one migrates `KHA_SVC` and `KHA_BACKENDS` to their new flags, the backends with their
/// ids (and `active`, which a sync into an empty staged table used to reset), and the conn map
/// to the new default capacity, with no connect failing.
#[test]
#[ignore = "needs KHA_PREV_BIN: a kha whose KHA_SVC and KHA_BACKENDS are preallocated"]
fn an_upgrade_to_unpreallocated_maps_fails_no_connect_and_keeps_backend_ids() {
    let prev = std::env::var_os("KHA_PREV_BIN").expect("KHA_PREV_BIN: a kha with preallocated maps");
    let Some(mut bed) = harness::bed(3) else { return };
    let new = std::mem::replace(&mut bed.kha_bin, prev.into());
    start_tls(&mut bed, &[]);
    let flags =
        |bed: &Bed, map: &str| bpftool(&["map", "show", "pinned", &map_path(bed, map)])["flags"].clone();
    assert_eq!(flags(&bed, "KHA_SVC"), 0, "KHA_PREV_BIN already leaves KHA_SVC unpreallocated");
    let ids = |bed: &Bed| {
        let mut v: Vec<String> =
            dump(bed, "KHA_BACKENDS").iter().map(|e| e["formatted"].to_string()).collect();
        v.sort();
        v
    };
    let before = ids(&bed);
    bed.kha_bin = new;
    upgrade_under_load(&mut bed, &[], 65536, kha_common::CONNS_CAPACITY as u64);
    let log = bed.agent_log_text();
    // KHA_SVC's capacity changed too (32 frontends, not 128): that is what its line says.
    for map in
        ["KHA_SVC: migrated (Capacity", "KHA_BACKENDS: migrated (Flags { from: 0, to: 1 }), 3 entries copied"]
    {
        assert!(log.contains(map), "{map} not in the log: {log}");
    }
    for spec in kha_common::LAYOUTS {
        assert_eq!(flags(&bed, spec.name), spec.map_flags, "{}", spec.name);
    }
    assert_eq!(ids(&bed), before, "the backends' ids and entries changed in the migration");
}

/// Two long-lived connections and a connect loop while the agent restarts with `restart`
/// args, which move the conn map from capacity `from` to `to`.
fn upgrade_under_load(bed: &mut Bed, restart: &[&str], from: u64, to: u64) {
    let clients = [LiveClient::start(bed, 900), LiveClient::start(bed, 900)];
    let first: Vec<Value> = clients.iter().map(|c| c.next()).collect();
    assert!(first.iter().all(|r| r["error"].is_null()), "{first:?}");

    let count: u32 = 20_000;
    let mut client = ConnectLoop::start_with(bed, "127.0.0.1:6443", count, false);
    wait_for_records(&client, 200);
    let before = client.records();
    let exit = bed.stop_agent(libc::SIGTERM).unwrap();
    assert!(exit.success(), "{exit}");
    start_tls(bed, restart);
    assert!(client.running(), "the connect loop finished before the migration; raise its count");
    assert!(client.records() > before, "no connect ran during the migration");
    let summary = client.summary();
    assert_eq!(summary["count"], count, "{summary}");
    assert_eq!(summary["failed"], 0, "connects failed during the migration: {summary}");

    let log = bed.agent_log_text();
    eprintln!("{}", log.lines().filter(|l| l.contains("maps:")).collect::<Vec<_>>().join("\n"));
    let migrated = format!("KHA_CONNS: migrated (Capacity {{ from: {from}, to: {to} }})");
    assert!(log.contains(&migrated), "{log}");
    wait_for("the old map set removed", Duration::from_secs(10), || !bed.pin_dir.join("maps-next").exists());
    assert_eq!(max_entries(bed, "KHA_CONNS"), to);
    assert_eq!(record(bed, "KHA_CONNS")["max_entries"], to);
    assert_eq!(record(bed, "KHA_CONNS")["version"], kha_common::layout_spec("KHA_CONNS").unwrap().version);

    // The long-lived connections go on over the same sockets, tracked in the new map.
    for (c, f) in clients.iter().zip(&first) {
        let r = c.next();
        assert!(r["error"].is_null() && r["reused"] == true && r["local"] == f["local"], "{f} then {r}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dump(bed, "KHA_CONNS").len() != clients.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left = dump(bed, "KHA_CONNS");
    assert_eq!(
        left.len(),
        clients.len(),
        "KHA_CONNS holds sockets other than the long-lived ones: {:?}; (id, active, entries): {:?}",
        left.iter().take(3).map(|e| e["formatted"].clone()).collect::<Vec<_>>(),
        active_against_conns(bed)
    );
    // `active` counts exactly them: sockets of the loop that the old programs counted and
    // that closed after the swap are uncounted too (loader/migrate.rs, `copy_conns`).
    let counts = active_against_conns(bed);
    eprintln!("(backend id, active, open sockets in KHA_CONNS): {counts:?}");
    assert!(counts.iter().all(|(_, active, entries)| active == entries), "(id, active, entries): {counts:?}");

    // And kha can still end them: a frozen master's connection is reset through the new map.
    let victim = clients[0].next()["master"].as_str().unwrap().to_string();
    bed.lab.stop_master(&victim).unwrap();
    let (failure, _) = clients[0].failure_then_recovery(&victim);
    assert!(failure["error"].as_str().unwrap().contains("ECONNRESET"), "not reset by kha: {failure}");
    bed.lab.cont_master(&victim).unwrap();
}

#[test]
fn an_older_layout_version_is_migrated_or_refused_with_the_fix() {
    let Some(mut bed) = harness::bed(3) else { return };
    let frontend = format!("127.0.0.1:{IDENT_PORT}");
    start_ident(&mut bed);
    assert_eq!(bed.stop_agent(libc::SIGTERM).unwrap().code(), Some(0));

    // An older build recorded the frontend slots with layout version 0: the new agent
    // rebuilds them in a new map, complete before its programs read it. It also drops m3,
    // which the old slots (read until the swap) still name in the shared backend map.
    claim_version(&bed, "KHA_SVC", 0);
    let count: u32 = 20_000;
    let mut client = ConnectLoop::start(&bed, &frontend, count);
    wait_for_records(&client, 200);
    let mut a = args(&["--frontend", &frontend, harness::NO_CHECKS]);
    for m in ["m1", "m2"] {
        a.extend(args(&["--backend", &bed.lab.master(m).unwrap().ident_v4().to_string()]));
    }
    start(&mut bed, &a);
    assert!(client.running(), "the connect loop finished before the migration; raise its count");
    let summary = client.summary();
    assert_eq!(summary["failed"], 0, "connects failed during the migration: {summary}");
    let served: u64 = ["m1", "m2", "m3"].iter().map(|m| summary["by_master"][m].as_u64().unwrap_or(0)).sum();
    assert_eq!(served, u64::from(count), "{summary}");
    let log = bed.agent_log_text();
    assert!(log.contains("KHA_SVC: migrated (Layout { from: 0, to: 1 }), rebuilt"), "{log}");
    // The backends move with the slots, ids kept: the three masters.
    assert!(log.contains("KHA_BACKENDS: migrated (Tied), 3 entries copied"), "{log}");
    wait_for("the old map set removed", Duration::from_secs(10), || !bed.pin_dir.join("maps-next").exists());
    assert_eq!(record(&bed, "KHA_SVC")["version"], 1);

    // A conn map from a version this build cannot translate: refused, nothing changed.
    assert_eq!(bed.stop_agent(libc::SIGTERM).unwrap().code(), Some(0));
    claim_version(&bed, "KHA_CONNS", 9);
    let progs = bed.prog_ids();
    let mut a = args(&[
        "--frontend",
        &frontend,
        harness::NO_CHECKS,
        "--metrics-addr",
        "none",
        "--health-addr",
        "none",
    ]);
    a.extend(backends(&bed, |m| m.ident_v4()));
    let out = bed.agent_command(&a).output().expect("kha run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pinned map KHA_CONNS has layout version 9, this kha has version 2")
            && stderr.contains("kha detach"),
        "{stderr}"
    );
    assert_eq!(bed.prog_ids(), progs, "a refused start swapped programs");
    assert!(!bed.pin_dir.join("maps-next").exists());
    assert_eq!(connect(&bed, true, &frontend, 10).failed(), 0, "the datapath stopped working");
}

#[test]
fn a_staging_set_an_agent_left_before_its_swap_is_dropped_at_the_next_start() {
    let Some(mut bed) = harness::bed(3) else { return };
    let frontend = format!("127.0.0.1:{IDENT_PORT}");
    start_ident(&mut bed);
    assert_eq!(bed.stop_agent(libc::SIGTERM).unwrap().code(), Some(0));
    // What an agent that died between filling its new maps and swapping its programs leaves:
    // a staging set newer than the live one, which no program uses.
    let staging = bed.pin_dir.join("maps-next");
    std::fs::create_dir(&staging).unwrap();
    let pin = staging.join("KHA_CONNS").display().to_string();
    bpftool(&[
        "map",
        "create",
        &pin,
        "type",
        "lru_hash",
        "key",
        "8",
        "value",
        "44",
        "entries",
        "1024",
        "name",
        "KHA_CONNS",
    ]);
    let live = bpftool(&["map", "show", "pinned", &map_path(&bed, "KHA_SVC")])["id"].clone();

    start_ident(&mut bed);
    let log = bed.agent_log_text();
    assert!(log.contains("an earlier migration: Dropped"), "{log}");
    assert!(!staging.exists(), "the staging set is still there");
    assert_eq!(
        bpftool(&["map", "show", "pinned", &map_path(&bed, "KHA_SVC")])["id"],
        live,
        "the live set was replaced"
    );
    assert_eq!(connect(&bed, true, &frontend, 10).failed(), 0);
}
