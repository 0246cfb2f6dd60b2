//! The agent's own side under abuse: the SOCK_DESTROY start-up check as reported, a flood of
//! idle connections to the endpoints, and accept failing with EMFILE.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    thread,
    time::Duration,
};

use kha_lab::bed::Bed;

use crate::harness::{self, NO_CHECKS, args, free_port, http_get, wait_for};

/// kha-user's `serve::MAX_CONNECTIONS`.
const MAX_CONNECTIONS: usize = 64;

/// An agent with both endpoints on free local ports: (metrics port, health port).
fn start(bed: &mut Bed, extra: &[&str]) -> (u16, u16) {
    let (metrics, health) = (free_port(), free_port());
    let m1 = bed.lab.master("m1").unwrap().https_v4().to_string();
    let (m, h) = (format!("127.0.0.1:{metrics}"), format!("127.0.0.1:{health}"));
    let mut list = args(&["--backend", &m1, NO_CHECKS, "--metrics-addr", &m, "--health-addr", &h]);
    list.extend(args(extra));
    harness::start(bed, &list);
    wait_for("/healthz 200", Duration::from_secs(20), || {
        http_get(health, "/healthz").is_some_and(|r| r.0 == 200)
    });
    (metrics, health)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// User plus system CPU time of every thread of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After `(comm)`: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

/// Lowers the agent's soft descriptor limit to `soft`; returns the old limit.
fn limit_fds(pid: u32, soft: u64) -> libc::rlimit {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: reading a limit into our own struct.
    assert_eq!(unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) }, 0);
    let new = libc::rlimit { rlim_cur: soft, rlim_max: old.rlim_max };
    // SAFETY: setting a limit of our own child from a valid struct.
    assert_eq!(unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) }, 0);
    old
}

fn restore_fds(pid: u32, old: libc::rlimit) {
    // SAFETY: as in limit_fds.
    unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &old, std::ptr::null_mut()) };
}

/// `count` connections to `port` that never send a request (those that could connect).
fn idle_connections(port: u16, count: usize) -> Vec<TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    (0..count).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()).collect()
}

#[test]
fn sock_destroy_support_is_reported_in_metrics_and_status() {
    let Some(mut bed) = harness::bed(1) else { return };
    // This kernel has CONFIG_INET_DIAG_DESTROY, so even the strict flag starts.
    let (metrics, _) = start(&mut bed, &["--require-sock-destroy"]);
    let (code, text) = http_get(metrics, "/metrics").expect("metrics answer");
    assert_eq!(code, 200);
    assert!(text.contains("kha_sock_destroy_supported 1"), "{text}");
    let status = bed.status().expect("status");
    assert_eq!(status["sock_destroy"]["supported"], true, "{status}");
    assert_eq!(status["sock_destroy"]["state"], "supported", "{status}");
    let out = bed.kha(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("sock_destroy: supported"), "{text}");
    assert!(!bed.agent_log_text().contains("cannot terminate sockets"), "{}", bed.agent_log_text());
}

#[test]
fn idle_connections_beyond_the_cap_do_not_starve_healthz() {
    let Some(mut bed) = harness::bed(1) else { return };
    let (_, health) = start(&mut bed, &[]);
    let pid = bed.agent_pid().unwrap();
    let base = open_fds(pid);
    // Room for the cap and the map handles a scrape opens, not for a flood.
    let old = limit_fds(pid, (base + MAX_CONNECTIONS + 32) as u64);
    let flood = idle_connections(health, MAX_CONNECTIONS + 64);
    assert!(flood.len() > MAX_CONNECTIONS + 32, "only {} flood connections", flood.len());
    thread::sleep(Duration::from_millis(300));
    let held = open_fds(pid);
    let answer = http_get(health, "/healthz");
    restore_fds(pid, old);
    eprintln!("flood of {}: agent held {held} descriptors ({base} before)", flood.len());
    assert!(
        held <= base + MAX_CONNECTIONS + 8,
        "the agent holds {held} descriptors ({base} before the flood)"
    );
    let (code, body) = answer.expect("no /healthz answer while idle connections fill every slot");
    assert_eq!(code, 200, "{body}");
    // The oldest idle connections were closed to make room: they read EOF, not a timeout.
    let mut closed = 0;
    for mut s in flood {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        if matches!(s.read(&mut [0u8; 16]), Ok(0)) {
            closed += 1;
        }
    }
    assert!(closed >= 32, "only {closed} idle connections beyond the cap were closed");
}

#[test]
fn accept_errors_back_off_instead_of_spinning() {
    let Some(mut bed) = harness::bed(1) else { return };
    let (_, health) = start(&mut bed, &[]);
    let pid = bed.agent_pid().unwrap();
    let old = limit_fds(pid, (open_fds(pid) + 4) as u64);
    let flood = idle_connections(health, 32);
    let before = cpu_ticks(pid);
    // The held connections time out after 5 s: measure well within that, while accept fails.
    thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    let log = bed.agent_log_text();
    restore_fds(pid, old);
    drop(flood);
    eprintln!("{used} CPU ticks (of {} a second) in 2 s of EMFILE", clock_ticks_per_second());
    // A spinning accept loop burns the whole 2 s; backing off, next to nothing.
    assert!(used * 4 < 2 * clock_ticks_per_second(), "{used} ticks of CPU in 2 s of EMFILE");
    assert!(log.contains("cannot accept connections") && log.contains("LimitNOFILE"), "{log}");
    wait_for("/healthz after EMFILE", Duration::from_secs(10), || {
        http_get(health, "/healthz").is_some_and(|r| r.0 == 200)
    });
}
