//! The agent with only the capabilities deploy/ grants it (the static pod, the DaemonSet and
//! the systemd unit), run the way a hostNetwork pod runs it: root, every capability set cut
//! down to the grant (bounding, permitted, effective; nothing inheritable or ambient),
//! no_new_privs (`allowPrivilegeEscalation: false`), already inside the node's network
//! namespace and without `--netns`, so it never calls setns. The bed's own `agent_command`
//! passes `--netns`, which needs CAP_SYS_ADMIN for setns whatever the grant, so these tests
//! build the command themselves.
//!
//! With the grant the agent attaches, balances, terminates the sockets of a failed master and
//! takes over from a previous agent, also from a read-only mount namespace of its own as the
//! systemd unit's `ProtectSystem=strict` gives it. Without a member, something named fails:
//! the tests take each away in turn (docs/operations.md, "Privileges", lists them).

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    ptr, thread,
    time::{Duration, Instant},
};

use kha_lab::{
    bed::{Bed, HOOK_COUNT},
    netns::{self, KillOnDrop},
};

use crate::{
    harness::{self, LiveClient, args, backends, https, wait_for},
    health::{all_up, probe_args, wait_state},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cap {
    bit: u32,
    name: &'static str,
}

const NET_ADMIN: Cap = Cap { bit: 12, name: "CAP_NET_ADMIN" };
const NET_RAW: Cap = Cap { bit: 13, name: "CAP_NET_RAW" };
const SYS_ADMIN: Cap = Cap { bit: 21, name: "CAP_SYS_ADMIN" };
const PERFMON: Cap = Cap { bit: 38, name: "CAP_PERFMON" };
const BPF: Cap = Cap { bit: 39, name: "CAP_BPF" };

/// What deploy/ grants; xtask/tests/manifests.rs holds the manifests and the unit to the same
/// five.
const GRANTED: [Cap; 5] = [BPF, PERFMON, NET_ADMIN, NET_RAW, SYS_ADMIN];

fn without(drop: &[Cap]) -> Vec<Cap> {
    GRANTED.iter().copied().filter(|c| !drop.contains(c)).collect()
}

fn mask(caps: &[Cap]) -> u64 {
    caps.iter().fold(0, |m, c| m | 1 << c.bit)
}

/// `struct __user_cap_header_struct` and `__user_cap_data_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// An agent started by [`start`]: killed on drop, before the bed (declare it after the bed).
struct Capped {
    child: KillOnDrop,
    log: PathBuf,
}

impl Capped {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> ExitStatus {
        // SAFETY: our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent ignored SIGTERM:\n{}", self.log_text());
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Every mount point but the API file systems, with the remount flags that make it read-only
/// and keep its other per-mount flags: what systemd's `ProtectSystem=strict` does in the
/// service's own mount namespace (a slave of the host's).
fn protect_system_strict() -> Vec<(CString, libc::c_ulong)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut out: Vec<(CString, libc::c_ulong)> = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (point, options) = (fields[4], fields[5]);
        let api =
            ["/dev", "/proc", "/sys"].iter().any(|a| point == *a || point.starts_with(&format!("{a}/")));
        // Points with octal escapes (`\040` for a space) are skipped: none is kha's.
        if api || point.contains('\\') || out.iter().any(|(p, _)| p.as_bytes() == point.as_bytes()) {
            continue;
        }
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
        for (name, flag) in [
            ("nosuid", libc::MS_NOSUID),
            ("nodev", libc::MS_NODEV),
            ("noexec", libc::MS_NOEXEC),
            ("noatime", libc::MS_NOATIME),
            ("nodiratime", libc::MS_NODIRATIME),
            ("relatime", libc::MS_RELATIME),
        ] {
            if options.split(',').any(|o| o == name) {
                flags |= flag;
            }
        }
        out.push((CString::new(point).unwrap(), flags));
    }
    out
}

/// `kha run ARGS` for the bed's cgroup and pin dir, in the node namespace, with only `caps`;
/// with `protect_system`, in a read-only mount namespace of its own as `ProtectSystem=strict`
/// (deploy/kha.service) gives it.
fn command(bed: &Bed, caps: &[Cap], protect_system: bool, args: &[String], log: &PathBuf) -> (Command, File) {
    let mut c = Command::new(&bed.kha_bin);
    c.arg("run").arg("--cgroup").arg(&bed.cgroup.path).arg("--pin-dir").arg(&bed.pin_dir).args(args);
    for flag in ["--metrics-addr", "--health-addr"] {
        c.args([flag, "none"]);
    }
    let out = File::options().create(true).append(true).open(log).expect("agent log");
    c.stdout(out.try_clone().unwrap()).stderr(out).stdin(Stdio::null());

    let ns = File::open(netns::netns_path(bed.lab.node_netns())).expect("open the node namespace");
    let ns_fd = ns.as_raw_fd();
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .expect("cap_last_cap")
        .trim()
        .parse()
        .expect("a number");
    let keep = mask(caps);
    let remounts = if protect_system { protect_system_strict() } else { Vec::new() };
    let data = [
        CapData { effective: keep as u32, permitted: keep as u32, inheritable: 0 },
        CapData { effective: (keep >> 32) as u32, permitted: (keep >> 32) as u32, inheritable: 0 },
    ];
    // SAFETY: the closure only makes system calls (setns, unshare, mount, prctl, capset) on
    // values computed before the fork and an fd that `ns` keeps open until spawn() returns.
    unsafe {
        c.pre_exec(move || {
            let check = |rc: libc::c_long| if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
            // First, while CAP_SYS_ADMIN is still there: as a hostNetwork pod starts, in the
            // node's namespace.
            check(libc::setns(ns_fd, libc::CLONE_NEWNET) as libc::c_long)?;
            if protect_system {
                check(libc::unshare(libc::CLONE_NEWNS) as libc::c_long)?;
                let root = c"/";
                let slave = libc::MS_SLAVE | libc::MS_REC;
                check(
                    libc::mount(ptr::null(), root.as_ptr(), ptr::null(), slave, ptr::null()) as libc::c_long
                )?;
                for (point, flags) in &remounts {
                    // Some (covered, or of another owner) refuse; the root is checked later.
                    libc::mount(ptr::null(), point.as_ptr(), ptr::null(), *flags, ptr::null());
                }
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as libc::c_long)?;
            for bit in (0..=last_cap).filter(|b| keep & (1 << b) == 0) {
                check(libc::prctl(libc::PR_CAPBSET_DROP, bit as libc::c_ulong, 0, 0, 0) as libc::c_long)?;
            }
            check(
                libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0)
                    as libc::c_long,
            )?;
            // Root's exec makes its bounding set permitted and effective; cut those here too,
            // as the runtimes do, so the agent starts with exactly the grant.
            let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
            check(libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()))
        });
    }
    (c, ns)
}

/// Starts a capability-cut agent and waits until its programs are attached (new ids on every
/// pinned link); `Err` with the exit status and log if it exits first.
fn start(bed: &Bed, caps: &[Cap], args: &[String]) -> Result<Capped, (ExitStatus, String)> {
    start_with(bed, caps, false, args)
}

fn start_with(
    bed: &Bed,
    caps: &[Cap],
    protect_system: bool,
    args: &[String],
) -> Result<Capped, (ExitStatus, String)> {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = bed.lab.workdir().join(format!("capped-agent-{n}.log"));
    let before = bed.prog_ids();
    let (mut c, ns) = command(bed, caps, protect_system, args, &log);
    let child = KillOnDrop(c.spawn().expect("spawn kha"));
    drop(ns);
    let mut agent = Capped { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = agent.child.try_wait().expect("wait") {
            return Err((status, agent.log_text()));
        }
        let now = bed.prog_ids();
        if now.len() == HOOK_COUNT && now.iter().all(|id| !before.contains(id)) {
            assert_caps(&agent, caps);
            return Ok(agent);
        }
        assert!(Instant::now() < deadline, "agent did not attach:\n{}", agent.log_text());
        thread::sleep(Duration::from_millis(20));
    }
}

fn started(bed: &Bed, caps: &[Cap], args: &[String]) -> Capped {
    start(bed, caps, args).unwrap_or_else(|(status, log)| panic!("agent exited ({status}):\n{log}"))
}

/// Runs an agent with `caps` to its exit, which must be a failure.
fn refused(bed: &Bed, caps: &[Cap], args: &[String]) -> String {
    match start(bed, caps, args) {
        Ok(agent) => panic!("the agent attached with only {caps:?}:\n{}", agent.log_text()),
        Err((status, log)) => {
            assert_eq!(status.code(), Some(1), "{log}");
            assert!(!log.contains("panicked"), "{log}");
            log
        }
    }
}

/// The running agent has exactly `caps`, in every set, and no_new_privs: what was granted is
/// what it ran with.
fn assert_caps(agent: &Capped, caps: &[Cap]) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).expect("status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("no {name}"));
        u64::from_str_radix(line.trim(), 16).unwrap_or_else(|e| panic!("{name} {line}: {e}"))
    };
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(set), mask(caps), "{set} of the agent, for {caps:?}");
    }
    for set in ["CapInh:", "CapAmb:"] {
        assert_eq!(field(set), 0, "{set} of the agent");
    }
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "no_new_privs not set");
}

/// Checked frontend 127.0.0.1:6443 over the three masters, probes trusting the lab CA.
fn checked_args(bed: &Bed) -> Vec<String> {
    let mut a = probe_args(&[]);
    a.extend(backends(bed, |m| m.https_v4()));
    a.extend(["--ca-file".to_string(), bed.pki.ca_cert.display().to_string()]);
    a
}

fn terminated(bed: &Bed) -> u64 {
    crate::terminate::counter(bed, "terminated")
}

/// Freezes the master a long-lived client landed on (SIGSTOP: its sockets stay open, so only
/// kha can end the client's connection), returns the master and the client.
fn freeze_a_used_master(bed: &Bed) -> (String, String, LiveClient) {
    let client = LiveClient::start(bed, 600);
    let victim = client.next()["master"].as_str().expect("a first answer").to_string();
    let addr = bed.lab.master(&victim).unwrap().https_v4().to_string();
    bed.lab.stop_master(&victim).unwrap();
    (victim, addr, client)
}

#[test]
fn with_only_the_granted_capabilities_the_agent_balances_terminates_and_takes_over() {
    let Some(bed) = harness::bed(3) else { return };
    let agent = started(&bed, &GRANTED, &checked_args(&bed));
    all_up(&bed);

    let run = https(&bed, "127.0.0.1:6443", 30);
    assert_eq!(run.failed(), 0, "{:?}", run.summary);
    assert!(["m1", "m2", "m3"].iter().filter(|m| run.by_master(m) > 0).count() >= 2, "{:?}", run.summary);

    // A forged RST (CAP_NET_RAW): the client's connection to the frozen master is reset once
    // the probes take it out, and its next request is answered by another master.
    let (victim, addr, client) = freeze_a_used_master(&bed);
    let (failure, _) = client.failure_then_recovery(&victim);
    assert!(failure["latency_ms"].as_f64().unwrap() < 15_000.0, "the request hung: {failure}");
    assert!(failure["error"].as_str().unwrap().contains("ECONNRESET"), "{failure}");
    wait_state(&bed, &addr, "down", false);
    assert!(terminated(&bed) >= 1, "no socket terminated:\n{}", agent.log_text());
    bed.lab.cont_master(&victim).unwrap();
    wait_state(&bed, &addr, "up", true);

    // A restart (rolling update, upgrade) swaps the programs under the pinned links: opening
    // the running programs by id needs CAP_SYS_ADMIN.
    assert!(agent.stop().success());
    let agent = started(&bed, &GRANTED, &checked_args(&bed));
    assert!(agent.log_text().contains("Replaced"), "{}", agent.log_text());
    let run = https(&bed, "127.0.0.1:6443", 20);
    assert_eq!(run.failed(), 0, "{:?}", run.summary);
}

#[test]
fn without_cap_net_admin_the_sockets_of_a_failed_master_are_still_reset() {
    let Some(bed) = harness::bed(3) else { return };
    // CAP_SYS_ADMIN stands in for CAP_NET_ADMIN in bpf(2)'s checks, so it attaches...
    let agent = started(&bed, &without(&[NET_ADMIN]), &checked_args(&bed));
    all_up(&bed);
    assert_eq!(https(&bed, "127.0.0.1:6443", 10).failed(), 0);
    // ...and sock_diag's SOCK_DESTROY asks for CAP_NET_ADMIN itself, but the RST needs only
    // CAP_NET_RAW: an established connection is ended all the same.
    let (victim, addr, _client) = freeze_a_used_master(&bed);
    wait_state(&bed, &addr, "down", false);
    wait_for("a reset socket", Duration::from_secs(15), || {
        crate::terminate::counter(&bed, "terminated_reset") >= 1
    });
    let log = agent.log_text();
    assert_eq!(crate::terminate::counter(&bed, "terminated_destroy"), 0, "{log}");
    assert!(!log.contains("SOCK_DESTROY failed"), "{log}");
    bed.lab.cont_master(&victim).unwrap();
}

#[test]
fn without_cap_net_raw_the_sockets_of_a_failed_master_are_destroyed_instead() {
    let Some(bed) = harness::bed(3) else { return };
    let agent = started(&bed, &without(&[NET_RAW]), &checked_args(&bed));
    all_up(&bed);
    // No raw socket: SOCK_DESTROY ends the connection (ECONNABORTED) and the log says why once.
    let (victim, addr, client) = freeze_a_used_master(&bed);
    let failure = client.next_failure();
    assert!(failure["latency_ms"].as_f64().unwrap() < 15_000.0, "the request hung: {failure}");
    assert!(failure["error"].as_str().unwrap().contains("ECONNABORTED"), "{failure}");
    wait_state(&bed, &addr, "down", false);
    let log = agent.log_text();
    assert!(crate::terminate::counter(&bed, "terminated_destroy") >= 1, "{log}");
    assert_eq!(crate::terminate::counter(&bed, "terminated_reset"), 0, "{log}");
    assert!(
        log.contains("cannot open a raw socket: Operation not permitted (os error 1) (grant CAP_NET_RAW"),
        "{log}"
    );
    bed.lab.cont_master(&victim).unwrap();
}

#[test]
fn without_cap_sys_admin_the_first_agent_attaches_but_no_later_one_takes_over() {
    let Some(bed) = harness::bed(3) else { return };
    let no_checks = || {
        let mut a = args(&["--frontend", "127.0.0.1:6443", harness::NO_CHECKS]);
        a.extend(backends(&bed, |m| m.https_v4()));
        a
    };
    let agent = started(&bed, &without(&[SYS_ADMIN]), &no_checks());
    let first = bed.prog_ids();
    assert!(agent.stop().success());

    // BPF_PROG_GET_FD_BY_ID, for the BPF_F_REPLACE swap under the pinned links, is
    // CAP_SYS_ADMIN only. The refused agent leaves the running datapath as it was.
    let log = refused(&bed, &without(&[SYS_ADMIN]), &no_checks());
    assert!(log.contains("getpeername4: cannot open the running program: Operation not permitted"), "{log}");
    assert_eq!(bed.prog_ids(), first, "the refused agent changed the datapath");
    assert_eq!(https(&bed, "127.0.0.1:6443", 10).failed(), 0);

    let agent = started(&bed, &GRANTED, &no_checks());
    assert!(agent.log_text().contains("Replaced"), "{}", agent.log_text());
}

#[test]
fn without_cap_sys_admin_loading_needs_cap_bpf_cap_perfmon_and_cap_net_admin() {
    let Some(bed) = harness::bed(1) else { return };
    let a = {
        let mut a = args(&["--frontend", "127.0.0.1:6443", harness::NO_CHECKS]);
        a.extend(backends(&bed, |m| m.https_v4()));
        a
    };
    // CAP_SYS_ADMIN passes every one of these checks on its own; without it each is needed.
    for (missing, expect) in [
        // BPF_MAP_CREATE.
        (BPF, "failed to create map `KHA_"),
        // The verifier treats a loader without CAP_PERFMON as unprivileged (Spectre v1
        // hardening) and rejects the connect programs' pointer arithmetic.
        (PERFMON, "pointer arithmetic with it prohibited for !root"),
        // BPF_PROG_LOAD of cgroup socket and sock_ops programs.
        (
            NET_ADMIN,
            "the kernel refused program kha_peername4: the BPF_PROG_LOAD syscall returned Operation not permitted",
        ),
    ] {
        let log = refused(&bed, &without(&[SYS_ADMIN, missing]), &a);
        assert!(
            log.contains(expect),
            "without {} and CAP_SYS_ADMIN: expected {expect:?} in:\n{log}",
            missing.name
        );
        assert!(log.contains("Operation not permitted") || log.contains("Permission denied"), "{log}");
        assert!(bed.prog_ids().is_empty(), "attached without {}", missing.name);
        // A failed load may leave maps pinned: every case starts from nothing.
        let out = bed.kha(&["detach"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // The three together are enough to attach.
    let agent = started(&bed, &without(&[SYS_ADMIN]), &a);
    assert!(agent.stop().success());
}

/// The host's bpffs at /sys/fs/bpf, as systemd mounts it at boot (deploy/ requires it); a
/// machine without systemd (this VM) gets the mount an agent in the host namespace would make.
fn host_bpffs() {
    let bpf = std::path::Path::new("/sys/fs/bpf");
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .lines()
        .any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf") && l.split(' ').nth(2) == Some("bpf"));
    if !mounted {
        let c = |s: &str| CString::new(s).unwrap();
        let (src, dst, fstype, opts) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"), c("mode=0700"));
        assert!(bpf.is_dir(), "no /sys/fs/bpf");
        // SAFETY: valid C strings.
        let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), 0, opts.as_ptr().cast()) };
        assert_eq!(rc, 0, "mounting the host's bpffs: {}", io::Error::last_os_error());
    }
}

#[test]
fn under_protect_system_strict_the_pins_are_the_hosts() {
    let Some(bed) = harness::bed(3) else { return };
    host_bpffs();
    let a = {
        let mut a = args(&["--frontend", "127.0.0.1:6443", harness::NO_CHECKS]);
        a.extend(backends(&bed, |m| m.https_v4()));
        a
    };
    for round in 0..2 {
        let agent = start_with(&bed, &GRANTED, true, &a)
            .unwrap_or_else(|(status, log)| panic!("agent exited ({status}):\n{log}"));
        let pid = agent.child.id();
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("mount namespace");
        assert_ne!(ns(&pid.to_string()), ns("self"), "the agent shares the test's mount namespace");
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
        let root = mounts.lines().map(|l| l.split(' ').collect::<Vec<_>>()).find(|f| f[4] == "/").unwrap();
        assert!(root[5].split(',').any(|o| o == "ro"), "the agent's / is not read-only: {root:?}");
        if round == 1 {
            assert!(agent.log_text().contains("Replaced"), "{}", agent.log_text());
        }
        assert!(agent.stop().success());
        // The agent and its namespace are gone; the pins, links and programs are the host's.
        assert_eq!(bed.prog_ids().len(), HOOK_COUNT, "the datapath went with the namespace");
        assert_eq!(https(&bed, "127.0.0.1:6443", 10).failed(), 0);
    }
}
