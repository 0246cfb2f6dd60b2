//! Bad input is refused before anything is attached, with the cause named.

use std::process::Command;

use kha_lab::bed::Bed;

use crate::harness::{self, cgroup_programs};

/// Runs `kha run ARGS` on the bed's cgroup and pin dir and expects a refusal mentioning
/// `expect`, with nothing attached or pinned afterwards.
fn refused(bed: &Bed, args: &[&str], expect: &str) {
    let mut c = bed.agent_command(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let out = c.output().expect("run kha");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "kha run {args:?} must fail: {stderr}");
    assert!(stderr.contains(expect), "kha run {args:?}: expected {expect:?} in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(cgroup_programs(&bed.cgroup.path).trim(), "", "something was attached: {args:?}");
    assert!(
        !bed.pin_dir.join("links").exists()
            || std::fs::read_dir(bed.pin_dir.join("links")).unwrap().next().is_none()
    );
}

#[test]
fn bad_configs_are_refused_before_anything_is_attached() {
    let Some(bed) = harness::bed(1) else { return };
    refused(
        &bed,
        &["--backend", "192.0.2.300:6443"],
        "--backend: `192.0.2.300:6443` is not an IP:PORT address",
    );
    refused(&bed, &["--backend", "192.0.2.11:0"], "port 0");
    refused(&bed, &["--frontend", "127.0.0.1:6443", "--backend", "127.0.0.1:6443"], "is also a frontend");
    refused(&bed, &["--backend", "192.0.2.11:6443", "--backend", "192.0.2.11:6443"], "listed twice");
    refused(
        &bed,
        &["--frontend", "127.0.0.1:6443", "--backend", "[2001:db8::11]:6443"],
        "is IPv6 but frontend `127.0.0.1:6443` is IPv4",
    );
    refused(&bed, &[], "no backend given");
    let bad =
        harness::config_file(&bed, "bad.toml", "[[frontend]]\naddress = \"127.0.0.1:6443\"\nbackendz = []\n");
    refused(&bed, &["--config", &bad.display().to_string()], "unknown field `backendz`");
}

#[test]
fn a_cgroup_that_is_not_cgroup_v2_is_refused() {
    let Some(bed) = harness::bed(1) else { return };
    let out = Command::new(&bed.kha_bin)
        .args(["run", "--backend", "192.0.2.11:6443", "--no-health-checks", "--cgroup", "/tmp", "--pin-dir"])
        .arg(&bed.pin_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--cgroup /tmp: not a cgroup v2 directory"), "{stderr}");
    assert!(!bed.pin_dir.exists(), "pin dir created although the cgroup was refused");
}

#[test]
fn pinned_links_of_another_cgroup_are_not_taken_over() {
    let Some(mut bed) = harness::bed(1) else { return };
    let m1 = bed.lab.master("m1").unwrap().https_v4().to_string();
    bed.start_agent(&["--backend".into(), m1.clone(), "--no-health-checks".into()]).unwrap();
    bed.stop_agent(libc::SIGTERM).unwrap();
    let other = kha_lab::bed::ChildCgroup::create(&format!("{}-other", bed.lab.prefix())).unwrap();
    let out = Command::new(&bed.kha_bin)
        .args(["run", "--backend", &m1, "--no-health-checks", "--cgroup"])
        .arg(&other.path)
        .arg("--pin-dir")
        .arg(&bed.pin_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("kha detach --pin-dir"), "{stderr}");
    assert_eq!(cgroup_programs(&other.path).trim(), "");
}
