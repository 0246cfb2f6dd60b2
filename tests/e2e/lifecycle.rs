//! The datapath outliving the agent, restarts, program replacement, and detach.

use std::time::Duration;

use kha_lab::{bed::Bed, topology::IDENT_PORT};

use crate::harness::{
    self, ConnectLoop, args, backends, bpf_object_exists, cgroup_programs, connect, start, wait_for,
};

fn ident_frontend() -> String {
    format!("127.0.0.1:{IDENT_PORT}")
}

fn start_ident(bed: &mut Bed) {
    let mut a = args(&["--frontend", &ident_frontend(), harness::NO_CHECKS]);
    a.extend(backends(bed, |m| m.ident_v4()));
    start(bed, &a);
}

#[test]
fn sigkilled_agent_leaves_a_working_datapath_and_a_restart_takes_control() {
    let Some(mut bed) = harness::bed(3) else { return };
    start_ident(&mut bed);
    let before = bed.prog_ids();
    bed.stop_agent(libc::SIGKILL).unwrap();

    let run = connect(&bed, true, &ident_frontend(), 30);
    assert_eq!(run.failed(), 0, "{:?}", run.summary);
    assert!(["m1", "m2", "m3"].iter().filter(|m| run.by_master(m) > 0).count() >= 2, "{:?}", run.summary);

    // A new agent with another backend set reuses the pins and takes over.
    let m2 = bed.lab.master("m2").unwrap().ident_v4().to_string();
    start(&mut bed, &args(&["--frontend", &ident_frontend(), "--backend", &m2, harness::NO_CHECKS]));
    let after = bed.prog_ids();
    assert!(after.iter().all(|id| !before.contains(id)), "programs were not replaced: {before:?} {after:?}");
    let run = connect(&bed, true, &ident_frontend(), 20);
    assert_eq!(run.by_master("m2"), 20, "{:?}", run.summary);
    assert!(bed.agent_log_text().contains("Replaced"), "{}", bed.agent_log_text());
}

#[test]
fn program_replacement_under_a_connect_loop_fails_no_connect() {
    let Some(mut bed) = harness::bed(3) else { return };
    start_ident(&mut bed);
    let count: u32 = 20_000;
    let mut client = ConnectLoop::start(&bed, &ident_frontend(), count);
    let before = client.records();
    let mut swaps = 0;
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGTERM] {
        let exit = bed.stop_agent(signal).unwrap();
        assert!(exit.success(), "signal {signal} must stop the agent cleanly: {exit}");
        start_ident(&mut bed);
        swaps += 1;
    }
    assert!(client.running(), "the client finished before {swaps} swaps; raise its count");
    let during = client.records() - before;
    assert!(during > 0, "no connect ran while the programs were swapped");
    let summary = client.summary();
    assert_eq!(summary["count"], count, "{summary}");
    assert_eq!(summary["failed"], 0, "connects failed during program replacement: {summary}");
    assert_eq!(
        summary["by_master"]["m1"].as_u64().unwrap()
            + summary["by_master"]["m2"].as_u64().unwrap()
            + summary["by_master"]["m3"].as_u64().unwrap(),
        u64::from(count)
    );
}

#[test]
fn sigterm_keeps_the_datapath_and_detach_removes_everything() {
    let Some(mut bed) = harness::bed(3) else { return };
    start_ident(&mut bed);
    let status = bed.stop_agent(libc::SIGTERM).unwrap();
    assert!(status.success(), "SIGTERM must be a clean exit: {status}");
    assert_eq!(connect(&bed, true, &ident_frontend(), 10).failed(), 0);

    let prog_ids = bed.prog_ids();
    let st = bed.status().unwrap();
    let link_ids: Vec<u64> =
        st["links"].as_array().unwrap().iter().map(|l| l["link_id"].as_u64().unwrap()).collect();
    let map_ids: Vec<u64> = kha_common_maps(&bed);
    assert_eq!(prog_ids.len(), kha_lab::bed::HOOK_COUNT, "every hook has a pinned link");
    assert_eq!(map_ids.len(), kha_common::ALL_MAPS.len(), "every map is pinned");
    assert!(!cgroup_programs(&bed.cgroup.path).trim().is_empty());

    let out = bed.kha(&["detach"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!bed.pin_dir.exists(), "pin dir left behind");
    assert_eq!(cgroup_programs(&bed.cgroup.path).trim(), "", "programs still attached to the cgroup");
    // The kernel frees programs, maps and links once nothing refers to them (after an RCU
    // grace period).
    wait_for("kha's programs, links and maps freed", Duration::from_secs(10), || {
        prog_ids.iter().all(|id| !bpf_object_exists("prog", *id))
            && link_ids.iter().all(|id| !bpf_object_exists("link", *id))
            && map_ids.iter().all(|id| !bpf_object_exists("map", *id))
    });
    // Connects now go where they went before kha: nothing listens, so refused.
    let run = connect(&bed, true, &ident_frontend(), 3);
    assert_eq!(run.summary["errors"]["connect:ECONNREFUSED"], 3, "{:?}", run.summary);
}

/// Ids of the maps pinned under the bed's pin dir.
fn kha_common_maps(bed: &Bed) -> Vec<u64> {
    let dir = bed.pin_dir.join("maps");
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(e.path())
                .output()
                .ok()?;
            serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["id"].as_u64()
        })
        .collect()
}

/// A bpffs this test mounted; unmounted and removed on drop, also after a failed assertion.
struct BpffsMount(std::path::PathBuf);

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn detach_leaves_a_bpffs_mount_point_it_pinned_into() {
    let Some(mut bed) = harness::bed(3) else { return };
    let mount = BpffsMount(bed.lab.workdir().join("bpffs"));
    std::fs::create_dir_all(&mount.0).unwrap();
    let st = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&mount.0).status().unwrap();
    assert!(st.success(), "mount -t bpf failed: {st}");
    bed.pin_dir = mount.0.clone();
    start_ident(&mut bed);
    bed.stop_agent(libc::SIGTERM).unwrap();
    let prog_ids = bed.prog_ids();
    assert_eq!(prog_ids.len(), kha_lab::bed::HOOK_COUNT, "pinned into the mount point");

    let out = bed.kha(&["detach"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "detach failed: {}{}", stdout, String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("it is a mount point"), "detach must say it kept the mount: {stdout}");
    assert!(mount.0.is_dir(), "the mount point itself stays");
    // A fresh bpffs holds the kernel's own `maps.debug` and `progs.debug` (BPF preload).
    let left: Vec<_> = std::fs::read_dir(&mount.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".debug"))
        .collect();
    assert!(left.is_empty(), "kha's pins left in the mount: {left:?}");
    assert_eq!(cgroup_programs(&bed.cgroup.path).trim(), "", "programs still attached to the cgroup");
    wait_for("kha's programs freed", Duration::from_secs(10), || {
        prog_ids.iter().all(|id| !bpf_object_exists("prog", *id))
    });
}
