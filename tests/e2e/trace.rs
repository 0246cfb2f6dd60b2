//! `kha trace` against a running agent: known connects from a known process in the test's
//! cgroup come out as trace lines with the right backend, reasons, process and cgroup, one
//! trace at a time, and kha's own programs are back under the links once the trace ends
//! (client gone, duration over, agent stopped).

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::MetadataExt as _,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use kha_lab::{bed::Bed, topology::IDENT_PORT};
use serde_json::Value;

use crate::harness::{self, ExtraNetns, args, connect, free_port, start, wait_for};

/// Refused: a frontend without backends.
const EMPTY: &str = "127.0.0.1:7443";

/// A `kha trace` child and its stdout, line by line.
struct TraceClient {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl TraceClient {
    fn start(bed: &Bed, port: u16, extra: &[&str]) -> Self {
        let mut child = Command::new(&bed.kha_bin)
            .args(["trace", "--agent", &format!("127.0.0.1:{port}"), "-o", "json"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kha trace");
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        TraceClient { child, lines }
    }

    fn next(&self) -> Value {
        self.lines.recv_timeout(Duration::from_secs(20)).expect("a trace line within 20 s")
    }

    /// Lines until one satisfies `pred` (at most 1000).
    fn until(&self, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..1000 {
            let v = self.next();
            if pred(&v) {
                return v;
            }
        }
        panic!("no matching trace line in 1000");
    }
}

impl Drop for TraceClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(bed: &mut Bed) -> (u16, String, String) {
    let frontend = format!("127.0.0.1:{IDENT_PORT}");
    let m1 = bed.lab.master("m1").unwrap().ident_v4().to_string();
    let toml = format!(
        "[[frontend]]\naddress = \"{frontend}\"\nbackends = [\"{m1}\"]\n\n[[frontend]]\naddress = \"{EMPTY}\"\nbackends = []\n"
    );
    let config = harness::config_file(bed, "trace.toml", &toml);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let list =
        args(&["--config", &config.display().to_string(), harness::NO_CHECKS, "--metrics-addr", &metrics]);
    start(bed, &list);
    (port, frontend, m1)
}

/// The connect4/connect6 program ids (the last two hooks) from `kha status`.
fn connect_progs(bed: &Bed) -> Vec<u64> {
    let ids = bed.prog_ids();
    assert_eq!(ids.len(), 6, "{ids:?}");
    ids[4..].to_vec()
}

fn programs_of(start: &Value) -> (Vec<u64>, Vec<u64>) {
    let p = start["programs"].as_array().unwrap();
    let col = |i: usize| p.iter().map(|h| h[i].as_u64().unwrap()).collect();
    (col(1), col(2))
}

#[test]
fn a_trace_shows_each_decision_and_leaves_the_untraced_programs_behind() {
    let Some(mut bed) = harness::bed(2) else { return };
    let (port, frontend, m1) = start_agent(&mut bed);
    let untraced = connect_progs(&bed);
    let cgroup_id = std::fs::metadata(&bed.cgroup.path).unwrap().ino();

    let trace = TraceClient::start(&bed, port, &["--duration", "2m"]);
    let first = trace.next();
    assert_eq!(first["type"], "start", "{first}");
    let (was, traced) = programs_of(&first);
    assert_eq!(was, untraced, "{first}");
    assert_eq!(connect_progs(&bed), traced, "the traced twins run under the links");
    assert!(traced.iter().all(|id| !untraced.contains(id)));

    // One at a time.
    let second = Command::new(&bed.kha_bin)
        .args(["trace", "--agent", &format!("127.0.0.1:{port}"), "--duration", "1s"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && stderr.contains("a trace is already running"), "{stderr}");

    assert_eq!(connect(&bed, true, &frontend, 2).by_master("m1"), 2);
    let run = connect(&bed, true, EMPTY, 1);
    assert_eq!(run.summary["errors"]["connect:EHOSTUNREACH"], 1, "{:?}", run.summary);
    // A master's own address is no frontend: passed through untouched.
    assert_eq!(connect(&bed, true, &m1, 1).by_master("m1"), 1);
    // A pod's namespace in kha's cgroup: left alone (nothing listens there; the try is enough).
    let pod = ExtraNetns::create(&bed, "pod");
    let mut c = Command::new(&bed.lab_bin);
    c.args(["connect", "--addr", &frontend, "--count", "1", "--timeout-ms", "3000", "--json"]);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    kha_lab::netns::spawn_in(&pod.0, Some(&bed.cgroup.path), c).unwrap().wait().unwrap();

    let ours = |v: &Value| v["type"] == "decision" && v["comm"] == "kha-lab";
    let rewritten = trace.until(|v| ours(v) && v["outcome"] == "rewritten");
    assert_eq!(rewritten["frontend"], frontend.as_str(), "{rewritten}");
    assert_eq!(rewritten["backend"], m1.as_str(), "{rewritten}");
    assert_eq!(rewritten["hook"], "connect4", "{rewritten}");
    assert_eq!(rewritten["policy"], "least-connections", "{rewritten}");
    assert_eq!(rewritten["backends"], 1, "{rewritten}");
    assert_eq!(rewritten["cgroup_id"], cgroup_id, "{rewritten}");
    assert!(rewritten["pid"].as_u64().unwrap() > 1, "{rewritten}");
    // The agent's view of the frontend's backends (health checks off here: unchecked, served).
    let candidates = serde_json::json!([{"backend": m1, "state": "unchecked", "serving": true}]);
    assert_eq!(rewritten["candidates"], candidates, "{rewritten}");
    let refused = trace.until(|v| ours(v) && v["outcome"] != "rewritten");
    assert_eq!(
        (&refused["outcome"], &refused["frontend"]),
        (&"no-backend".into(), &EMPTY.into()),
        "{refused}"
    );
    assert!(refused["backend"].is_null(), "{refused}");
    assert!(refused["candidates"].is_null(), "a frontend without backends has no candidates: {refused}");
    let alone = trace.until(ours);
    assert_eq!(
        (&alone["outcome"], &alone["frontend"]),
        (&"not-a-frontend".into(), &m1.as_str().into()),
        "{alone}"
    );
    assert!(alone["policy"].is_null() && alone["candidates"].is_null(), "{alone}");
    let foreign = trace.until(ours);
    assert_eq!(
        (&foreign["outcome"], &foreign["frontend"]),
        (&"foreign-netns".into(), &frontend.as_str().into())
    );
    assert_eq!(foreign["cgroup_id"], cgroup_id, "{foreign}");

    // The client goes: the agent swaps its own programs back.
    drop(trace);
    wait_for("the untraced programs back", Duration::from_secs(10), || connect_progs(&bed) == untraced);
    assert!(bed.agent_log_text().contains("trace: ended (ClientGone)"), "{}", bed.agent_log_text());

    // Over by its duration: the last line says so, and again the untraced programs run. With
    // `--frontend`s the kernel reports those destinations only (as many as its filter holds,
    // so the verifier has seen the longest filter): the agent filters nothing.
    let max = kha_common::TRACE_FILTER_MAX;
    let others: Vec<String> = (0..max).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
    let mut asked: Vec<&str> = others[..max - 1].iter().map(String::as_str).collect();
    asked.push(&frontend);
    let (decisions, end) = filtered_trace(&bed, port, &asked, &frontend, &m1);
    assert_eq!(end["reason"], "duration", "{end}");
    assert_eq!((end["lost"].as_u64(), end["dropped"].as_u64()), (Some(0), Some(0)), "{end}");
    assert_eq!(end["filtered"], 0, "the kernel sent records of other destinations: {end}");
    let only_ours = |d: &[Value]| !d.is_empty() && d.iter().all(|d| d["frontend"] == frontend.as_str());
    assert!(only_ours(&decisions), "{decisions:?}");
    assert_eq!(connect_progs(&bed), untraced);

    // More frontends than the kernel's filter holds: every connect comes up, the agent filters.
    let mut asked: Vec<&str> = others.iter().map(String::as_str).collect();
    asked.push(&frontend);
    let (decisions, end) = filtered_trace(&bed, port, &asked, &frontend, &m1);
    assert!(end["filtered"].as_u64().unwrap() >= 2, "the connects to {m1} and {EMPTY}: {end}");
    assert!(only_ours(&decisions), "{decisions:?}");
}

/// A 3 s trace of `frontends` while this test connects to `frontend`, to the empty frontend
/// and to master 1's own address: its decisions and its end line.
fn filtered_trace(bed: &Bed, port: u16, frontends: &[&str], frontend: &str, m1: &str) -> (Vec<Value>, Value) {
    let mut args = vec!["--duration", "3s"];
    frontends.iter().for_each(|f| args.extend(["--frontend", f]));
    let trace = TraceClient::start(bed, port, &args);
    assert_eq!(trace.next()["type"], "start");
    assert_eq!(connect(bed, true, m1, 1).by_master("m1"), 1);
    connect(bed, true, EMPTY, 1);
    assert_eq!(connect(bed, true, frontend, 1).by_master("m1"), 1);
    let mut decisions = vec![];
    loop {
        let v = trace.next();
        if v["type"] == "end" {
            return (decisions, v);
        }
        decisions.push(v);
    }
}

#[test]
fn an_agent_stopped_during_a_trace_swaps_the_untraced_programs_back() {
    let Some(mut bed) = harness::bed(1) else { return };
    let (port, frontend, _) = start_agent(&mut bed);
    let untraced = connect_progs(&bed);
    let trace = TraceClient::start(&bed, port, &["--duration", "2m"]);
    let (_, traced) = programs_of(&trace.next());
    assert_eq!(connect_progs(&bed), traced);
    let exit = bed.stop_agent(libc::SIGTERM).unwrap();
    assert!(exit.success(), "{exit}");
    assert_eq!(connect_progs(&bed), untraced, "{}", bed.agent_log_text());
    assert_eq!(connect(&bed, true, &frontend, 2).by_master("m1"), 2);

    // A killed agent cannot swap back; the next one puts its own programs in.
    let (port, ..) = start_agent(&mut bed);
    let trace = TraceClient::start(&bed, port, &["--duration", "2m"]);
    let (_, traced) = programs_of(&trace.next());
    bed.stop_agent(libc::SIGKILL).unwrap();
    assert_eq!(connect_progs(&bed), traced, "SIGKILL leaves the traced twins attached");
    start_agent(&mut bed);
    let now = connect_progs(&bed);
    assert!(now.iter().all(|id| !traced.contains(id)), "{now:?} {traced:?}");
    let log = bed.agent_log_text();
    assert!(log.contains("connect4, connect6: a trace's programs are still attached"), "{log}");
    drop(trace);
}
