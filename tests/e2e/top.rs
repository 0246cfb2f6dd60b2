//! `kha top` against known clients: processes with known names in child cgroups of the bed's
//! cgroup, each making a known number of connects, some held open. The per-client map must
//! count exactly those, and `kha top -o json` must name their cgroups and processes.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use kha_lab::bed::{Bed, ChildCgroup};
use serde_json::Value;

use crate::{
    harness::{self, LiveClient, args, backends, free_port, http_get, start, wait_for},
    health::{all_up, probe_args},
};

/// A child cgroup of the bed's, removed on drop (before the bed's: declare it after the bed).
pub(crate) fn child_cgroup(bed: &Bed, name: &str) -> ChildCgroup {
    let parent = bed.cgroup.path.file_name().unwrap().to_str().unwrap();
    ChildCgroup::create(&format!("{parent}/{name}")).unwrap_or_else(|e| panic!("child cgroup {name}: {e}"))
}

/// The lab binary under another name, so its connects carry that process name (`comm` is the
/// name it was executed by).
fn renamed_lab(bed: &Bed, name: &str) -> PathBuf {
    let link = bed.lab.workdir().join(name);
    std::os::unix::fs::symlink(&bed.lab_bin, &link).expect("symlink the lab binary");
    link
}

pub(crate) fn spawn(bed: &Bed, cgroup: &Path, bin: &Path, list: &[&str]) -> std::process::Child {
    let mut c = Command::new(bin);
    c.args(list).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    bed.lab.spawn_in_node(Some(cgroup), c).expect("spawn in the node")
}

/// `kha top -o json` (two samples 0.1 s apart), with extra args.
pub(crate) fn top(bed: &Bed, extra: &[&str]) -> Value {
    let mut list = vec!["top", "-o", "json", "--interval", "0.1"];
    list.extend(extra);
    let out = bed.kha(&list);
    assert!(out.status.success(), "kha top: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("kha top JSON: {e}"))
}

/// The client whose cgroup path ends with `/<name>`.
pub(crate) fn client<'a>(view: &'a Value, name: &str) -> &'a Value {
    let suffix = format!("/{name}");
    let found = view["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cgroup"].as_str().is_some_and(|p| p.ends_with(&suffix)));
    found.unwrap_or_else(|| panic!("no client in cgroup {name}: {view:#}"))
}

fn route_sum(c: &Value, field: &str) -> u64 {
    c["routes"].as_array().unwrap().iter().map(|r| r[field].as_u64().unwrap()).sum()
}

#[test]
fn top_reports_known_clients_by_cgroup_process_connects_and_open_connections() {
    let Some(mut bed) = harness::bed(3) else { return };
    let metrics = free_port();
    let mut a = probe_args(&["--metrics-addr", &format!("127.0.0.1:{metrics}")]);
    a.extend(backends(&bed, |m| m.https_v4()));
    start(&mut bed, &a);
    all_up(&bed);
    let (cg_a, cg_b) = (child_cgroup(&bed, "top-a"), child_cgroup(&bed, "top-b"));

    // a: 7 connects, each closed.
    let conn_a = renamed_lab(&bed, "top-conn-a");
    let run =
        spawn(&bed, &cg_a.path, &conn_a, &["connect", "--addr", "127.0.0.1:6443", "--count", "7", "--json"]);
    let out = run.wait_with_output().expect("connect tool");
    let (_, summary) = kha_lab::bed::parse_json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!((summary["count"].as_u64(), summary["failed"].as_u64()), (Some(7), Some(0)), "{summary}");

    // b: two keep-alive clients, one connection each, held open while they run.
    let live_b = renamed_lab(&bed, "top-live-b");
    let held: Vec<LiveClient> =
        (0..2).map(|_| LiveClient::start_in(&bed, &cg_b.path, &live_b, 600)).collect();
    for c in &held {
        // Its first answer: the connection is up (and stays: keep-alive).
        let r = c.next();
        assert!(r["error"].is_null(), "{r}");
    }

    // The closes reach sock_ops when the sockets leave for TIME_WAIT.
    let settled = || {
        let v = top(&bed, &[]);
        let (ca, cb) = (client(&v, "top-a"), client(&v, "top-b"));
        ca["open"] == 0 && cb["open"] == 2
    };
    wait_for("the closed connections uncounted", Duration::from_secs(10), settled);
    let v = top(&bed, &[]);
    let clients = v["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2, "only our two cgroups connected through kha: {v:#}");
    let (a_, b_) = (client(&v, "top-a"), client(&v, "top-b"));
    assert_eq!(
        (a_["process"].as_str(), a_["connects"].as_u64(), a_["open"].as_u64()),
        (Some("top-conn-a"), Some(7), Some(0)),
        "{a_:#}"
    );
    assert_eq!(
        (b_["process"].as_str(), b_["connects"].as_u64(), b_["open"].as_u64()),
        (Some("top-live-b"), Some(2), Some(2)),
        "{b_:#}"
    );
    for c in [a_, b_] {
        assert_eq!(route_sum(c, "connects"), c["connects"].as_u64().unwrap(), "{c:#}");
        assert_eq!(route_sum(c, "open"), c["open"].as_u64().unwrap(), "{c:#}");
        let masters: Vec<String> = bed.lab.masters().iter().map(|m| m.https_v4().to_string()).collect();
        for r in c["routes"].as_array().unwrap() {
            assert_eq!(r["frontend"], "127.0.0.1:6443", "{c:#}");
            assert!(masters.contains(&r["backend"].as_str().unwrap().to_string()), "{c:#}");
        }
        assert!(c["pod"].is_null(), "not a kubepods path: {c:#}");
        let id = c["cgroup_id"].as_u64().unwrap();
        let path =
            bed.cgroup.path.parent().unwrap().join(c["cgroup"].as_str().unwrap().trim_start_matches('/'));
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()), id, "{c:#}");
    }

    // The metrics name them too (the top 10 by rate, here both).
    let (code, text) = http_get(metrics, "/metrics").expect("metrics answer");
    assert_eq!(code, 200, "{text}");
    let parent = bed.cgroup.path.file_name().unwrap().to_str().unwrap().to_owned();
    for line in [
        format!("kha_client_connections_open{{client=\"/{parent}/top-b\",process=\"top-live-b\"}} 2"),
        format!("kha_client_connections_open{{client=\"/{parent}/top-a\",process=\"top-conn-a\"}} 0"),
        "kha_clients_tracked 2".to_string(),
    ] {
        assert!(text.contains(&line), "missing {line:?} in:\n{text}");
    }

    // Top 1: the busier by open connections is shown, the other summed.
    let v = top(&bed, &["--top", "1"]);
    assert_eq!(v["clients"].as_array().unwrap().len(), 1, "{v:#}");
    assert_eq!(
        (v["other"]["clients"].as_u64(), v["other"]["connects"].as_u64()),
        (Some(1), Some(7)),
        "{v:#}"
    );

    // The table names both.
    let out = bed.kha(&["top", "--once", "--interval", "0.1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("top-conn-a") && text.contains("top-live-b"), "{text}");

    // When b's clients end, their connections are uncounted.
    drop(held);
    let closed = || client(&top(&bed, &[]), "top-b")["open"] == 0;
    wait_for("b's connections uncounted", Duration::from_secs(10), closed);
}

/// `kernel.bpf_stats_enabled` on while it lives, put back as it was when dropped.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn on() -> Self {
        let old = std::fs::read_to_string(BPF_STATS).expect("bpf_stats_enabled").trim().to_owned();
        std::fs::write(BPF_STATS, "1").expect("enable bpf stats");
        BpfStats(old)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.0);
    }
}

fn prog_show(id: u64) -> Value {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool");
    serde_json::from_slice(&out.stdout).expect("bpftool JSON")
}

/// (run_time_ns, run_cnt) of a program.
fn prog_stats(id: u64) -> (u64, u64) {
    let v = prog_show(id);
    (v["run_time_ns"].as_u64().unwrap_or(0), v["run_cnt"].as_u64().unwrap_or(0))
}

/// What the connect hook costs per run (kernel `bpf_stats`), over rounds of sequential
/// connects to a frontend: the figures in docs/benchmarks.md. `KHA_COST_BIN` measures another
/// build (e.g. main's, before `KHA_CLIENTS`). Checks that every connect ran connect4 once and
/// that `kha top` counted them (with this build).
#[test]
#[ignore = "a measurement: run alone on a quiet machine"]
fn connect_cost_per_run() {
    let Some(mut bed) = harness::bed(3) else { return };
    let other = std::env::var_os("KHA_COST_BIN");
    if let Some(bin) = &other {
        bed.kha_bin = bin.into();
    }
    let frontend = format!("127.0.0.1:{}", kha_lab::topology::IDENT_PORT);
    let mut a = args(&["--frontend", &frontend, harness::NO_CHECKS]);
    a.extend(backends(&bed, |m| m.ident_v4()));
    start(&mut bed, &a);
    let ids = bed.prog_ids();
    let named = |name: &str| *ids.iter().find(|id| prog_show(**id)["name"] == name).expect(name);
    let (connect4, sockops) = (named("kha_connect4"), named("kha_sockops"));
    let stats = BpfStats::on();
    let (rounds, n) = (5, 5000u64);
    for round in 0..rounds {
        let (t0, c0) = prog_stats(connect4);
        let (s0, r0) = prog_stats(sockops);
        let run = harness::connect(&bed, true, &frontend, n as u32);
        assert_eq!(run.failed(), 0, "{:?}", run.summary);
        let (t1, c1) = prog_stats(connect4);
        let (s1, r1) = prog_stats(sockops);
        assert_eq!(c1 - c0, n, "connect4 runs in round {round}");
        eprintln!(
            "round {round}: connect4 {:.0} ns/run ({} runs), sock_ops {:.0} ns/run ({:.1} runs/connect)",
            (t1 - t0) as f64 / (c1 - c0) as f64,
            c1 - c0,
            (s1 - s0) as f64 / (r1 - r0).max(1) as f64,
            (r1 - r0) as f64 / n as f64
        );
    }
    drop(stats);
    if other.is_none() {
        let v = top(&bed, &[]);
        let total: u64 =
            v["clients"].as_array().unwrap().iter().map(|c| c["connects"].as_u64().unwrap()).sum();
        assert_eq!(total, rounds * n, "{v:#}");
    }
}
