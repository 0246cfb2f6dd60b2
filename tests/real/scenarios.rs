//! The scenarios, in the order they run. Each leaves the world as it found it: every master
//! serving, the agent probing with the node's certificate.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use kha_lab::real::{RealOptions, User};

use kha_lab::real::watch::Watcher;

use crate::world::{AgentSetup, World, wait_for};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn chosen_total(w: &World) -> u64 {
    let s = w.bed.status().unwrap_or_default();
    s["frontends"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|f| f["backends"].as_array().into_iter().flatten())
        .filter_map(|b| b["kernel"]["chosen"].as_u64())
        .sum()
}

/// kubectl through both frontends with the node identity and full TLS verification of the
/// name `localhost`; the real `kubernetes` EndpointSlice; a client-go watcher seeing an object
/// created through kha.
pub fn clients_through_both_frontends(w: &mut World) {
    w.wait_all_up(Duration::from_secs(30));
    let before = chosen_total(w);
    for kc in [&w.node_v4, &w.node_v6] {
        let o = w.kubectl(kc, &["get", "--raw", "/readyz"]);
        assert!(o.status.success(), "{}: {}", kc.display(), String::from_utf8_lossy(&o.stderr));
        assert_eq!(stdout(&o).trim(), "ok");
        let o = w.kubectl(kc, &["version", "-o", "json"]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let server = v["serverVersion"]["gitVersion"].as_str().unwrap_or_default().to_owned();
        assert!(server.starts_with("v1.3"), "server version through kha: {v}");
        eprintln!("real: {} -> kube-apiserver {server}", kc.display());
    }
    assert!(chosen_total(w) >= before + 4, "the kubectl connections did not go through kha");

    // The lease reconciler keeps one endpoint per live apiserver; each apiserver adds itself
    // within its reconcile interval (10 s).
    let mut masters: Vec<String> =
        w.bed.lab.masters().iter().map(|m| m.https_v4().ip().to_string()).collect();
    masters.sort();
    let mut slice = Value::Null;
    let mut addrs: Vec<String> = Vec::new();
    wait_for("the kubernetes EndpointSlice to list every apiserver", Duration::from_secs(30), || {
        let o =
            w.kubectl(&w.admin_v4, &["get", "endpointslice", "-n", "default", "kubernetes", "-o", "json"]);
        slice = serde_json::from_slice(&o.stdout).unwrap_or_default();
        addrs = slice["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["addresses"][0].as_str().map(String::from))
            .collect();
        addrs.sort();
        addrs == masters
    });
    let labels = &slice["metadata"]["labels"];
    assert_eq!(labels["kubernetes.io/service-name"], "kubernetes", "{slice}");
    eprintln!(
        "real: the kubernetes EndpointSlice: {addrs:?}, managed by {}",
        labels["endpointslice.kubernetes.io/managed-by"]
    );

    let watcher = w.watcher(Duration::from_secs(40));
    wait_for("kha-watch synced through kha", Duration::from_secs(30), || watcher.synced());
    let name = format!("kha-real-{}", std::process::id());
    let o = w.kubectl(&w.admin_v4, &["create", "configmap", &name, "-n", "default", "--from-literal=k=v"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let object = format!("default/{name}");
    wait_for("the watcher sees the new configmap", Duration::from_secs(15), || {
        watcher
            .records
            .lock()
            .unwrap()
            .iter()
            .any(|(_, v)| v["event"] == "add" && v["object"] == object.as_str())
    });
    let peer = watcher.current_peer().expect("the watch connection in ss");
    assert!(w.master_of(&peer).is_some(), "the watch sits on a master ({peer}), not on the frontend");
    let _ = w.kubectl(&w.admin_v4, &["delete", "configmap", &name, "-n", "default"]);
}

pub fn probes_with_the_node_certificate(w: &mut World) {
    w.wait_all_up(Duration::from_secs(30));
    for m in w.bed.lab.masters() {
        let (state, serving, reason) = w.backend(m.https_v4()).expect("backend in status");
        assert_eq!((state.as_str(), serving), ("up", true), "{}: {reason:?}", m.name);
    }
}

/// `--anonymous-auth=false` and no client certificate: every probe gets 401. An apiserver that
/// answers 401 is alive; kha must not take it out, drain it or terminate its connections.
pub fn unauthorized_probes_keep_masters_up(w: &mut World) {
    let watcher = w.watcher(Duration::from_secs(60));
    wait_for("kha-watch synced", Duration::from_secs(30), || watcher.synced());
    let terminated = w.counter("terminated");
    w.restart_agent(false);
    let addrs: Vec<_> = w.bed.lab.masters().iter().map(|m| m.https_v4()).collect();
    // Several probe rounds (2 s apart by default): none may take a master out.
    let until = Instant::now() + Duration::from_secs(8);
    let mut reasons = Vec::new();
    while Instant::now() < until {
        for a in &addrs {
            if let Some((state, serving, reason)) = w.backend(*a) {
                assert!(serving, "{a} taken out on a 401 ({state}: {reason:?})");
                reasons.push(reason);
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        reasons.iter().flatten().any(|r| r.contains("401")),
        "the status should say the probes are not authorized: {:?}",
        reasons.last()
    );
    assert_eq!(w.counter("terminated"), terminated, "connections terminated on a 401");
    assert_eq!(watcher.count("watch_end") + watcher.count("watch_stop"), 0, "a watch was broken");
    w.restart_agent(true);
    w.wait_all_up(Duration::from_secs(30));
}

/// Watchers whose master is the one `peers` says `watcher` is on.
fn on_master(w: &World, watchers: &[Watcher], master: &str) -> Vec<usize> {
    (0..watchers.len())
        .filter(|i| watchers[*i].current_peer().and_then(|p| w.master_of(&p)).as_deref() == Some(master))
        .collect()
}

fn start_watchers(w: &World, n: usize, life: Duration) -> Vec<Watcher> {
    let ws: Vec<Watcher> = (0..n).map(|_| w.watcher(life)).collect();
    wait_for("every watcher synced", Duration::from_secs(45), || ws.iter().all(Watcher::synced));
    ws
}

/// SIGKILL of the apiserver that holds a watch: the watch moves to another master within
/// kha's detection window.
pub fn killed_apiserver_moves_watches(w: &mut World) {
    let (victim, moved, watchers, t0) =
        fail_a_watched_master(w, |w, m| w.cp.kill_apiserver(m).expect("kill"));
    report_moves(w, &victim, &moved, &watchers, t0, Duration::from_secs(10), "was killed");
    w.cp.start_apiserver(&victim, Duration::ZERO).expect("restart");
    w.wait_all_up(Duration::from_secs(30));
}

/// Figures of one run of the request loop and the watchers.
struct Figures {
    requests: u64,
    failed: u64,
    longest_gap: Duration,
    relists: usize,
}

fn longest_gap(watchers: &[Watcher], after: Instant) -> Duration {
    watchers.iter().map(|w| w.longest_gap_after(after)).max().unwrap_or_default()
}

/// SIGTERM to every apiserver in turn (kubeadm's default: no shutdown delay), while a loop of
/// kubectl runs (a new connection each) and three watchers run through kha.
pub fn rolling_restart_no_delay(w: &mut World) {
    let f = rolling_restart(w, Duration::ZERO);
    eprintln!(
        "real: rolling restart, no shutdown delay: {} requests, {} failed; longest watch gap {:.2} s; {} relists",
        f.requests,
        f.failed,
        f.longest_gap.as_secs_f64(),
        f.relists
    );
    assert!(f.requests >= 10, "the request loop barely ran: {} requests", f.requests);
    assert!(f.longest_gap < Duration::from_secs(30), "a watch stayed broken for {:?}", f.longest_gap);
}

/// Restarts every apiserver in turn with SIGTERM; the apiservers it starts again get
/// `delay` as their shutdown delay (the first round's processes have what they were started
/// with).
fn rolling_restart(w: &mut World, delay: Duration) -> Figures {
    w.wait_all_up(Duration::from_secs(30));
    let watchers = start_watchers(w, 3, Duration::from_secs(300));
    let t_start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let (requests, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let runner = w.kubectl_runner();
    let kubeconfig = w.node_v4.clone();
    let loop_thread = {
        let (stop, requests, failed) = (stop.clone(), requests.clone(), failed.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                // `/version`, not `/readyz`: an apiserver in its shutdown delay rightly answers
                // `/readyz` with 500 while it still serves everything else.
                let o = runner.run(&kubeconfig, &["get", "--raw", "/version"]);
                requests.fetch_add(1, Ordering::SeqCst);
                if !o.status.success() {
                    failed.fetch_add(1, Ordering::SeqCst);
                    eprintln!("real: request failed: {}", String::from_utf8_lossy(&o.stderr).trim());
                }
                thread::sleep(Duration::from_millis(300));
            }
        })
    };
    for name in w.cp.names() {
        let took = w.cp.terminate_apiserver(&name).expect("SIGTERM");
        eprintln!("real: {name}'s apiserver exited {:.1} s after SIGTERM", took.as_secs_f64());
        w.cp.start_apiserver(&name, delay).expect("start again");
        w.wait_all_up(Duration::from_secs(30));
    }
    // Let the watchers settle on the last restart.
    thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::SeqCst);
    loop_thread.join().expect("request loop");
    let relists = watchers.iter().map(|wt| wt.relists_after(t_start)).sum::<usize>();
    Figures {
        requests: requests.load(Ordering::SeqCst),
        failed: failed.load(Ordering::SeqCst),
        longest_gap: longest_gap(&watchers, t_start),
        relists,
    }
}

/// The same with a typical shutdown delay: `/readyz` fails while the apiserver still serves,
/// so kha can move every client before the listener closes.
pub fn rolling_restart_with_shutdown_delay(w: &mut World) {
    // The running apiservers were started without a delay: one round gives each the delay,
    // the measured round then terminates processes that have it.
    for name in w.cp.names() {
        w.cp.terminate_apiserver(&name).expect("SIGTERM");
        w.cp.start_apiserver(&name, SHUTDOWN_DELAY).expect("start with a shutdown delay");
    }
    let f = rolling_restart(w, Duration::ZERO);
    eprintln!(
        "real: rolling restart, {}s shutdown delay: {} requests, {} failed; longest watch gap {:.2} s; {} relists",
        SHUTDOWN_DELAY.as_secs(),
        f.requests,
        f.failed,
        f.longest_gap.as_secs_f64(),
        f.relists
    );
    assert!(f.requests >= 10, "the request loop barely ran: {} requests", f.requests);
    assert_eq!(f.failed, 0, "requests failed although every apiserver announced its shutdown");
    assert!(f.longest_gap < Duration::from_secs(30), "a watch stayed broken for {:?}", f.longest_gap);
}

/// kubespray and kubeadm users commonly set 15 s; kha needs the delay to exceed its detection
/// (two failed probes) plus its drain.
const SHUTDOWN_DELAY: Duration = Duration::from_secs(15);

/// The etcd member of the master holding a watch is killed: that apiserver's `/readyz` fails
/// on etcd while it still answers; kha drains it and the watch moves.
pub fn lost_etcd_member_moves_watches(w: &mut World) {
    let (victim, moved, watchers, t0) =
        fail_a_watched_master(w, |w, m| w.cp.kill_etcd(m).expect("kill etcd"));
    report_moves(w, &victim, &moved, &watchers, t0, Duration::from_secs(40), "lost its etcd member");
    w.cp.start_etcd(&victim).expect("restart etcd");
    w.wait_all_up(Duration::from_secs(60));
}

/// The master's link goes down: nothing answers, sockets hang; kha's probes time out and kha
/// terminates the hanging connections so the watch moves.
pub fn blackholed_master_moves_watches(w: &mut World) {
    let (victim, moved, watchers, t0) =
        fail_a_watched_master(w, |w, m| w.bed.lab.link_down(m).expect("link down"));
    report_moves(w, &victim, &moved, &watchers, t0, Duration::from_secs(40), "was blackholed");
    // kha ends the blackholed master's sockets with an RST: client-go reads "connection reset
    // by peer", a normal end of the watch, and resumes it from its resourceVersion. After
    // SOCK_DESTROY's ECONNABORTED every informer relisted (docs/health.md).
    for i in &moved {
        assert_eq!(watchers[*i].relists_after(t0), 0, "watcher {i} relisted after kha moved it off {victim}");
    }
    assert!(w.counter("terminated_reset") >= 1, "no socket reset");
    assert_eq!(w.counter("terminated_destroy"), 0, "a socket fell back to SOCK_DESTROY");
    w.bed.lab.link_up(&victim).expect("link up");
    w.wait_all_up(Duration::from_secs(60));
}

type Failed = (String, Vec<usize>, Vec<Watcher>, Instant);

fn fail_a_watched_master(w: &mut World, fail: impl FnOnce(&mut World, &str)) -> Failed {
    w.wait_all_up(Duration::from_secs(30));
    let watchers = start_watchers(w, 3, Duration::from_secs(120));
    let peer = watchers[0].current_peer().expect("peer");
    let victim = w.master_of(&peer).expect("victim master");
    let moved = on_master(w, &watchers, &victim);
    let t0 = Instant::now();
    fail(w, &victim);
    (victim, moved, watchers, t0)
}

fn report_moves(
    w: &World,
    victim: &str,
    moved: &[usize],
    watchers: &[Watcher],
    t0: Instant,
    bound: Duration,
    what: &str,
) {
    for i in moved {
        let wt = &watchers[*i];
        wait_for("the watch re-established on another master", bound, || {
            wt.first_after("watch_start", t0).is_some()
                && wt.current_peer().and_then(|p| w.master_of(&p)).is_some_and(|m| m != victim)
        });
        let gap = wt.first_after("watch_start", t0).expect("watch_start") - t0;
        eprintln!("real: watcher {i} moved off {victim}, which {what}, after {:.2} s", gap.as_secs_f64());
    }
}

/// kha with `--discover` and only a bootstrap list follows the real `kubernetes` EndpointSlice:
/// a fourth apiserver joins and is served; when it leaves (graceful termination: it takes
/// itself out of the slice and fails `/readyz` while it still serves), kha stops serving it
/// and moves its connections before the apiserver itself closes them.
pub fn discovery_follows_the_real_endpointslice() {
    let options = RealOptions { anonymous_auth: false, standby: 1, ..RealOptions::default() };
    let state_dir = std::env::temp_dir().join(format!("kha-real-discovery-{}", std::process::id()));
    let state = state_dir.clone();
    // The API client talks to a master it knows directly, not through kha's own frontend.
    let mut d = World::start_with(4, options, move |cp| {
        let kubeconfig = cp
            .kubeconfig("discovery.kubeconfig", User::Admin, "https://192.0.2.11:6443", None)
            .expect("kubeconfig");
        let extra = [
            "--discover",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--state-dir",
            &state.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        AgentSetup { extra, in_node: true }
    });
    d.wait_all_up(Duration::from_secs(30));
    let m4 = d.bed.lab.masters()[3].https_v4();
    let t_join = Instant::now();
    assert!(d.backend(m4).is_none(), "kha knew m4 before it joined");
    d.cp.start_apiserver("m4", SHUTDOWN_DELAY).expect("m4 joins");
    let ready = t_join.elapsed();
    wait_for("kha to serve the joined apiserver", Duration::from_secs(60), || {
        d.backend(m4).is_some_and(|(state, serving, _)| state == "up" && serving)
    });
    eprintln!(
        "real: m4 joined: its /readyz 200 after {:.1} s, served by kha after {:.1} s",
        ready.as_secs_f64(),
        t_join.elapsed().as_secs_f64()
    );

    // client-go dials one connection per informer at start and keeps one of them for HTTP/2,
    // whichever won the race: least-connections sends the first dial to m4, but the watch may
    // stay on another master. The watchers that land elsewhere stay open and load m1..m3, so
    // once each holds more than the dials one watcher makes (4 informers), every dial goes to
    // m4: 3 x 5 watchers bound the tries.
    let mut elsewhere = Vec::new();
    let mut on_m4 = None;
    for _ in 0..16 {
        let wt = d.watcher(Duration::from_secs(120));
        wait_for("kha-watch synced", Duration::from_secs(30), || wt.synced());
        if wt.current_peer().and_then(|p| d.master_of(&p)).as_deref() == Some("m4") {
            on_m4 = Some(wt);
            break;
        }
        elsewhere.push(wt);
    }
    let watcher = on_m4.unwrap_or_else(|| {
        let landed: Vec<Option<String>> =
            elsewhere.iter().map(|wt| wt.current_peer().and_then(|p| d.master_of(&p))).collect();
        panic!(
            "least-connections sent none of 16 watchers to the joined apiserver: they landed on {landed:?}; kha's backends: {}",
            d.bed.status().map(|s| s["frontends"][0]["backends"].to_string()).unwrap_or_default()
        )
    });

    let t0 = Instant::now();
    d.cp.sigterm_apiserver("m4").expect("SIGTERM m4");
    wait_for("kha to stop serving the apiserver that left", Duration::from_secs(30), || {
        d.backend(m4).is_none_or(|(_, serving, _)| !serving)
    });
    let out = t0.elapsed();
    wait_for("the watch moved off the apiserver that left", SHUTDOWN_DELAY, || {
        watcher.first_after("watch_start", t0).is_some()
            && watcher.current_peer().and_then(|p| d.master_of(&p)).is_some_and(|m| m != "m4")
    });
    let moved = t0.elapsed();
    eprintln!(
        "real: m4 left (SIGTERM, {} s shutdown delay): out of kha's set after {:.1} s, its watch moved after {:.1} s, before the apiserver closed it",
        SHUTDOWN_DELAY.as_secs(),
        out.as_secs_f64(),
        moved.as_secs_f64()
    );
    let o = d.kubectl(&d.admin_v4, &["get", "endpointslice", "-n", "default", "kubernetes", "-o", "json"]);
    let slice: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    assert!(!slice.to_string().contains("192.0.2.14"), "the slice still lists m4: {slice}");
    d.cp.terminate_apiserver("m4").expect("m4 exits");
    let _ = std::fs::remove_dir_all(&state_dir);
}
