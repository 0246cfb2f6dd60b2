//! kha beside another vendor's cgroup programs (Cilium's socket LB, Calico's connect-time LB),
//! played by `other_prog`'s stand-in: a connect4 that rewrites its own service address
//! (`OTHER_SVC`) to a listener of the test's, and a getpeername4 that reports the service back.
//! It is attached with each attach flag to kha's cgroup and to an ancestor, before kha starts
//! and after, and each rewrite is checked by who answers and what getpeername says.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use kha_lab::{
    bed::{Bed, ChildCgroup, HOOK_COUNT, ToolRun},
    netns::{self, KillOnDrop},
    topology::IDENT_PORT,
};

use crate::{
    harness::{self, args, backends, cgroup_programs, local_listener},
    other_prog::{Attachment, Flags, Hook, Prog},
};

/// kha's frontend; the bed's master answers it with its name (`m1`).
fn kha_frontend() -> SocketAddrV4 {
    SocketAddrV4::new([127, 0, 0, 1].into(), IDENT_PORT)
}
/// The other program's service, and the listener it sends that service to.
const OTHER_SVC: &str = "127.0.0.9:7100";
const OTHER_TARGET: &str = "127.0.0.1:7101";
const OTHER_NAME: &str = "other";

/// The stand-in's pair of programs for `OTHER_SVC`.
struct Other {
    connect: Prog,
    peer: Prog,
}

impl Other {
    fn load() -> Other {
        let (svc, target) = (OTHER_SVC.parse().unwrap(), OTHER_TARGET.parse().unwrap());
        Other {
            connect: Prog::load(Hook::Connect4, svc, target),
            peer: Prog::load(Hook::Getpeername4, target, svc),
        }
    }

    /// Both attached to `cgroup` with `flags` (getpeername first, as kha does, so no socket
    /// is rewritten without being reported back).
    fn attach(&self, cgroup: &Path, flags: Flags) -> (Attachment, Attachment) {
        let peer = self.peer.attach(cgroup, flags).expect("attach the stand-in's getpeername4");
        let connect = self.connect.attach(cgroup, flags).expect("attach the stand-in's connect4");
        (peer, connect)
    }
}

/// The listener the stand-in rewrites to, in the node namespace.
fn other_listener(bed: &Bed) -> KillOnDrop {
    let node = bed.lab.node_netns().to_owned();
    local_listener(bed, &node, OTHER_NAME, OTHER_TARGET)
}

/// `kha-lab connect --read-ident` from a process in `cgroup` (node namespace), bounded by its
/// per-connect timeout.
fn connect_in(bed: &Bed, cgroup: &Path, addr: &str, count: u32) -> ToolRun {
    let mut c = Command::new(&bed.lab_bin);
    c.args(["connect", "--addr", addr, "--count", &count.to_string(), "--read-ident"])
        .args(["--timeout-ms", "3000", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = bed.lab.spawn_in_node(Some(cgroup), c).expect("connect tool").wait_with_output().unwrap();
    let run = ToolRun::parse(&out);
    assert_eq!(run.summary["count"].as_u64(), Some(count as u64), "tool did not finish: {}", run.stderr);
    run
}

/// Every connect to kha's frontend from `cgroup` reached the master and reported the frontend.
fn assert_kha_serves(bed: &Bed, cgroup: &Path) {
    let fe = kha_frontend().to_string();
    let run = connect_in(bed, cgroup, &fe, 10);
    assert_eq!(run.by_master("m1"), 10, "kha's rewrite: {:?}", run.summary);
    assert_eq!(run.summary["by_peer"][&fe], 10, "kha's getpeername: {:?}", run.summary);
}

/// Every connect to the other service from `cgroup` reached its listener and reported the
/// service.
fn assert_other_serves(bed: &Bed, cgroup: &Path) {
    let run = connect_in(bed, cgroup, OTHER_SVC, 5);
    assert_eq!(run.by_master(OTHER_NAME), 5, "the other rewrite: {:?}", run.summary);
    assert_eq!(run.summary["by_peer"][OTHER_SVC], 5, "the other getpeername: {:?}", run.summary);
}

/// The other program does not run for `cgroup`: its service address is dialed as it is, and
/// nothing listens there.
fn assert_other_absent(bed: &Bed, cgroup: &Path) {
    let run = connect_in(bed, cgroup, OTHER_SVC, 3);
    assert_eq!(run.summary["errors"]["connect:ECONNREFUSED"], 3, "{:?}", run.summary);
}

fn kha_args(bed: &Bed) -> Vec<String> {
    let mut a = args(&["--frontend", &kha_frontend().to_string(), harness::NO_CHECKS]);
    a.extend(backends(bed, |m| m.ident_v4()));
    a.extend(args(&["--metrics-addr", "none", "--health-addr", "none"]));
    a
}

/// `kha run` on `cgroup` (not necessarily the bed's), the bed's namespace and pin dir.
fn kha_command(bed: &Bed, cgroup: &Path) -> Command {
    let mut c = Command::new(&bed.kha_bin);
    c.arg("run")
        .arg("--netns")
        .arg(netns::netns_path(bed.lab.node_netns()))
        .arg("--cgroup")
        .arg(cgroup)
        .arg("--pin-dir")
        .arg(&bed.pin_dir)
        .args(kha_args(bed))
        .stdin(Stdio::null());
    c
}

/// Starts kha on `cgroup` and waits (20 s at most) until every hook is attached.
fn start_kha(bed: &Bed, cgroup: &Path) -> KillOnDrop {
    let log = std::fs::File::create(bed.lab.workdir().join("coexist-agent.log")).unwrap();
    let mut c = kha_command(bed, cgroup);
    c.stdout(log.try_clone().unwrap()).stderr(log);
    let mut agent = KillOnDrop(c.spawn().expect("start kha"));
    let log_text =
        || std::fs::read_to_string(bed.lab.workdir().join("coexist-agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while bed.prog_ids().len() < HOOK_COUNT {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!("kha exited ({status}):\n{}", log_text());
        }
        assert!(Instant::now() < deadline, "kha did not attach within 20 s:\n{}", log_text());
        thread::sleep(Duration::from_millis(20));
    }
    agent
}

/// Runs kha on `cgroup`, expecting it to refuse within 20 s; its stderr.
fn kha_refused(bed: &Bed, cgroup: &Path) -> String {
    let mut c = kha_command(bed, cgroup);
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut agent = KillOnDrop(c.spawn().expect("run kha"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "kha started instead of refusing");
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(agent.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "kha must fail: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Nothing of kha is attached to any of `cgroups`, and nothing is pinned.
fn assert_no_trace_of_kha(bed: &Bed, cgroups: &[&Path]) {
    for cg in cgroups {
        let shown = cgroup_programs(cg);
        assert!(!shown.contains("kha_"), "kha left a program on {}:\n{shown}", cg.display());
    }
    assert!(!bed.pin_dir.exists(), "kha left pins: {}", bed.pin_dir.display());
}

/// A child of the bed's cgroup, for kha (or the stand-in) to sit below the other.
fn child_cgroup(bed: &Bed) -> ChildCgroup {
    ChildCgroup::create(&format!("{}/inner", bed.lab.prefix())).expect("child cgroup")
}

/// A connect4 that touches nothing the tests dial: a multi program of a third vendor, to ask
/// the kernel whether one may go somewhere.
fn unrelated() -> Prog {
    let a: SocketAddrV4 = "127.0.0.10:1".parse().unwrap();
    Prog::load(Hook::Connect4, a, SocketAddrV4::new(*a.ip(), 2))
}

fn errno(r: std::io::Result<Attachment>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn multi_beside_kha_on_its_cgroup_before_and_after_it_starts() {
    let Some(bed) = harness::bed(1) else { return };
    let _listener = other_listener(&bed);
    let cg = bed.cgroup.path.clone();
    let other = Other::load();

    // Before kha: both rewrites and both getpeernames hold.
    let before = other.attach(&cg, Flags::Multi);
    let agent = start_kha(&bed, &cg);
    assert_kha_serves(&bed, &cg);
    assert_other_serves(&bed, &cg);

    // Detaching the other leaves kha intact; attaching it again after kha works as before.
    before.0.detach().unwrap();
    before.1.detach().unwrap();
    assert_other_absent(&bed, &cg);
    assert_kha_serves(&bed, &cg);
    let _after = other.attach(&cg, Flags::Multi);
    assert_other_serves(&bed, &cg);
    assert_kha_serves(&bed, &cg);

    // Detaching kha leaves the other intact.
    drop(agent);
    let out = bed.kha(&["detach"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_other_serves(&bed, &cg);
    let fe = kha_frontend().to_string();
    let run = connect_in(&bed, &cg, &fe, 3);
    assert_eq!(run.summary["errors"]["connect:ECONNREFUSED"], 3, "kha still rewrites: {:?}", run.summary);
}

#[test]
fn multi_on_an_ancestor_before_and_after_kha_starts() {
    let Some(bed) = harness::bed(1) else { return };
    let _listener = other_listener(&bed);
    let inner = child_cgroup(&bed);
    let other = Other::load();

    let before = other.attach(&bed.cgroup.path, Flags::Multi);
    let agent = start_kha(&bed, &inner.path);
    assert_kha_serves(&bed, &inner.path);
    assert_other_serves(&bed, &inner.path);
    // kha is not on the ancestor: only the other serves there.
    assert_other_serves(&bed, &bed.cgroup.path);

    drop(before);
    assert_other_absent(&bed, &inner.path);
    assert_kha_serves(&bed, &inner.path);
    let _after = other.attach(&bed.cgroup.path, Flags::Multi);
    assert_other_serves(&bed, &inner.path);
    assert_kha_serves(&bed, &inner.path);

    drop(agent);
    assert!(bed.kha(&["detach"]).status.success());
    assert_other_serves(&bed, &inner.path);
}

/// The error names the cgroup, the hook, the program and the fix.
fn assert_names_the_blocker(stderr: &str, at: &Path, prog: &Prog, why: &str) {
    for want in [
        &format!("connect4 of {} ", at.display()),
        &format!("program id {} ", prog.id()),
        "without BPF_F_ALLOW_MULTI",
        why,
        "bpftool cgroup tree",
        "Re-attach each with BPF_F_ALLOW_MULTI",
        "or detach it",
        "Nothing of kha was attached",
    ] {
        assert!(stderr.contains(want), "expected {want:?} in: {stderr}");
    }
}

#[test]
fn a_non_multi_program_on_kha_s_cgroup_refuses_kha_and_nothing_stays() {
    let Some(bed) = harness::bed(1) else { return };
    let cg = bed.cgroup.path.clone();
    let probe = unrelated();
    for flags in [Flags::Exclusive, Flags::Override] {
        let other = Prog::load(Hook::Connect4, OTHER_SVC.parse().unwrap(), OTHER_TARGET.parse().unwrap());
        let attached = other.attach(&cg, flags).unwrap();
        // What the kernel does with a multi attach there (a link is one): EPERM.
        assert_eq!(errno(probe.attach(&cg, Flags::Multi)), Some(libc::EPERM), "{flags:?}");
        let stderr = kha_refused(&bed, &cg);
        assert_names_the_blocker(&stderr, &cg, &other, "kha's cgroup itself");
        assert!(stderr.contains("EPERM"), "{stderr}");
        assert_no_trace_of_kha(&bed, &[&cg]);
        drop(attached);
    }
}

#[test]
fn a_non_multi_program_cannot_join_kha_s_cgroup_afterwards() {
    let Some(bed) = harness::bed(1) else { return };
    let _listener = other_listener(&bed);
    let cg = bed.cgroup.path.clone();
    let _agent = start_kha(&bed, &cg);
    let other = Other::load();
    for flags in [Flags::Exclusive, Flags::Override] {
        assert_eq!(errno(other.connect.attach(&cg, flags)), Some(libc::EPERM), "{flags:?}");
    }
    assert_kha_serves(&bed, &cg);
}

#[test]
fn an_ancestor_with_flags_0_refuses_kha_and_allow_override_is_refused_by_kha() {
    let Some(bed) = harness::bed(1) else { return };
    let _listener = other_listener(&bed);
    let inner = child_cgroup(&bed);
    let outer = bed.cgroup.path.clone();
    let probe = unrelated();

    // Flags 0 on the ancestor: the kernel refuses every attach below it.
    let other = Other::load();
    let attached = other.attach(&outer, Flags::Exclusive);
    assert_eq!(errno(probe.attach(&inner.path, Flags::Multi)), Some(libc::EPERM));
    let stderr = kha_refused(&bed, &inner.path);
    assert_names_the_blocker(&stderr, &outer, &other.connect, "an ancestor of kha's cgroup");
    assert!(stderr.contains("EPERM"), "{stderr}");
    assert_no_trace_of_kha(&bed, &[&inner.path, &outer]);
    drop(attached);

    // BPF_F_ALLOW_OVERRIDE on the ancestor: the kernel accepts a multi attach below it, and
    // the ancestor's program then stops running there. kha refuses to do that to it.
    let attached = other.attach(&outer, Flags::Override);
    assert_other_serves(&bed, &inner.path);
    let below = probe.attach(&inner.path, Flags::Multi).expect("the kernel accepts it");
    assert_other_absent(&bed, &inner.path);
    drop(below);
    assert_other_serves(&bed, &inner.path);
    let stderr = kha_refused(&bed, &inner.path);
    assert_names_the_blocker(&stderr, &outer, &other.connect, "would replace it");
    assert_no_trace_of_kha(&bed, &[&inner.path, &outer]);
    assert_other_serves(&bed, &inner.path);
    drop(attached);
}

#[test]
fn a_non_multi_program_attached_to_an_ancestor_after_kha_does_not_run_below_kha() {
    let Some(bed) = harness::bed(1) else { return };
    let _listener = other_listener(&bed);
    let inner = child_cgroup(&bed);
    let outer = bed.cgroup.path.clone();
    let agent = start_kha(&bed, &inner.path);
    let other = Other::load();
    for flags in [Flags::Exclusive, Flags::Override] {
        // The kernel checks only the ancestors of where a program goes, so this is accepted;
        // below kha's multi links, a non-multi ancestor is skipped.
        let attached = other.attach(&outer, flags);
        assert_other_serves(&bed, &outer);
        assert_other_absent(&bed, &inner.path);
        assert_kha_serves(&bed, &inner.path);
        drop(attached);
    }
    // A restarted kha swaps its programs under its pinned links: no attach, so no refusal.
    let attached = other.attach(&outer, Flags::Exclusive);
    drop(agent);
    let agent = start_kha_again(&bed, &inner.path);
    assert_kha_serves(&bed, &inner.path);
    // Once kha is detached, the ancestor's program runs below again.
    drop(agent);
    assert!(bed.kha(&["detach"]).status.success());
    assert_other_serves(&bed, &inner.path);
    drop(attached);
}

/// Starts kha where its links are pinned already and waits for its new programs.
fn start_kha_again(bed: &Bed, cgroup: &Path) -> KillOnDrop {
    let before = bed.prog_ids();
    let mut c = kha_command(bed, cgroup);
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let mut agent = KillOnDrop(c.spawn().expect("start kha"));
    harness::wait_for("the restarted kha's programs", Duration::from_secs(20), || {
        assert!(agent.try_wait().unwrap().is_none(), "the restarted kha exited");
        let now = bed.prog_ids();
        now.len() == HOOK_COUNT && now.iter().all(|id| !before.contains(id))
    });
    agent
}

/// With both programs rewriting kha's frontend, the one that runs first sees the address the
/// client dialed and the other sees its rewrite: the answer says which ran first.
fn first_rewrite(bed: &Bed, cgroup: &Path) -> &'static str {
    let run = connect_in(bed, cgroup, &kha_frontend().to_string(), 5);
    match (run.by_master("m1"), run.by_master(OTHER_NAME)) {
        (5, 0) => "kha",
        (0, 5) => "other",
        _ => panic!("mixed answers: {:?}", run.summary),
    }
}

#[test]
fn which_rewrite_sees_the_dialed_address() {
    let Some(bed) = harness::bed(1) else { return };
    let _listener = other_listener(&bed);
    let inner = child_cgroup(&bed);
    let outer: PathBuf = bed.cgroup.path.clone();
    let grab = Prog::load(Hook::Connect4, kha_frontend(), OTHER_TARGET.parse().unwrap());

    // Attached before kha: one on the ancestor, one on kha's cgroup.
    let _up = grab.attach(&outer, Flags::Multi).unwrap();
    let first = grab.attach(&inner.path, Flags::Multi).unwrap();
    let agent = start_kha(&bed, &inner.path);
    // Within a cgroup, programs run in attach order.
    assert_eq!(first_rewrite(&bed, &inner.path), "other", "attached to kha's cgroup before kha");
    // An ancestor's program runs after the descendant's, although attached first.
    drop(first);
    assert_eq!(first_rewrite(&bed, &inner.path), "kha", "on the ancestor");
    let _later = grab.attach(&inner.path, Flags::Multi).unwrap();
    assert_eq!(first_rewrite(&bed, &inner.path), "kha", "attached to kha's cgroup after kha");
    drop(agent);
}
