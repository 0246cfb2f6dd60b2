//! What the connect and getpeername hooks do on the real kernel.

use kha_lab::{bed::ToolRun, topology::IDENT_PORT};

use crate::harness::{self, ExtraNetns, args, backends, connect, https, local_listener, peers, start};

/// No failure, at least two masters answered, and getpeername reported `dialed` every time.
fn assert_balanced(run: &ToolRun, dialed: &str) {
    assert_eq!(run.failed(), 0, "{:?}", run.summary);
    assert!(["m1", "m2", "m3"].iter().filter(|m| run.by_master(m) > 0).count() >= 2, "{:?}", run.summary);
    assert!(peers(run).iter().all(|p| p == dialed), "{:?}", peers(run));
}

#[test]
fn v4_frontend_spreads_tls_sessions_over_every_master() {
    let Some(mut bed) = harness::bed(3) else { return };
    let mut a = args(&["--frontend", "127.0.0.1:6443"]);
    a.extend(backends(&bed, |m| m.https_v4()));
    start(&mut bed, &a);

    let run = https(&bed, "127.0.0.1:6443", 90);
    assert_eq!(run.failed(), 0, "{:?}", run.summary);
    for m in ["m1", "m2", "m3"] {
        // Expected 30 each; below 10 has a probability under 1e-5 for a fair random choice.
        assert!(run.by_master(m) >= 10, "{m} got too few of 90: {:?}", run.summary);
    }
    // getpeername reports the frontend the client dialed, not the master.
    assert!(peers(&run).iter().all(|p| p == "127.0.0.1:6443"), "{:?}", peers(&run));

    let status = bed.status().expect("status");
    assert_eq!(status["attached"], true);
    assert_eq!(status["frontends"][0]["address"], "127.0.0.1:6443");
    assert_eq!(status["frontends"][0]["backends"].as_array().unwrap().len(), 3);
    // Maps are BTF-defined: bpftool prints field names, not hex.
    for (map, field) in [("KHA_SVC", "slot"), ("KHA_BACKENDS", "addr_be"), ("KHA_CONFIG", "netns_cookie")] {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(bed.pin_dir.join("maps").join(map))
            .output()
            .unwrap();
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        // With BTF, bpftool -j adds a "formatted" object with the named fields.
        let first = &dump[0]["formatted"];
        assert!(
            first["key"].get(field).is_some() || first["value"].get(field).is_some(),
            "{map}: no field {field} in {dump}"
        );
    }
    let rewritten = status["counters"].as_array().unwrap().iter().find(|c| c["name"] == "rewritten").unwrap();
    assert!(rewritten["value"].as_u64().unwrap() >= 90, "{status}");
}

#[test]
fn v6_frontend_reaches_v6_masters() {
    let Some(mut bed) = harness::bed(3) else { return };
    let mut a = args(&["--frontend", "[::1]:6443"]);
    a.extend(backends(&bed, |m| m.https_v6()));
    start(&mut bed, &a);

    assert_balanced(&https(&bed, "[::1]:6443", 30), "[::1]:6443");
}

#[test]
fn v6_frontend_reaches_v4_masters_through_v4_mapped_addresses() {
    let Some(mut bed) = harness::bed(3) else { return };
    let mut a = args(&["--frontend", "[::1]:6443"]);
    a.extend(backends(&bed, |m| m.https_v4()));
    start(&mut bed, &a);

    assert_balanced(&https(&bed, "[::1]:6443", 30), "[::1]:6443");
}

#[test]
fn v6_socket_dialing_a_v4_mapped_frontend_is_balanced_too() {
    let Some(mut bed) = harness::bed(3) else { return };
    let mut a = args(&["--frontend", &format!("127.0.0.1:{IDENT_PORT}"), harness::NO_CHECKS]);
    a.extend(backends(&bed, |m| m.ident_v4()));
    start(&mut bed, &a);

    // An AF_INET6 socket connecting to ::ffff:127.0.0.1 (Java and others do this).
    let dial = format!("[::ffff:127.0.0.1]:{IDENT_PORT}");
    assert_balanced(&connect(&bed, true, &dial, 30), &dial);
}

#[test]
fn other_namespaces_and_other_cgroups_are_untouched() {
    let Some(mut bed) = harness::bed(3) else { return };
    let frontend = format!("127.0.0.1:{IDENT_PORT}");
    let mut a = args(&["--frontend", &frontend, harness::NO_CHECKS]);
    a.extend(backends(&bed, |m| m.ident_v4()));
    start(&mut bed, &a);

    // Something else listens on the frontend address in the node namespace and in a "pod".
    let node_ns = bed.lab.node_netns().to_owned();
    let _node_local = local_listener(&bed, &node_ns, "node-local", &frontend);
    let pod = ExtraNetns::create(&bed, "pod");
    let _pod_local = local_listener(&bed, &pod.0, "pod-local", &frontend);

    // Node namespace, kha's cgroup: balanced to the masters.
    let served = connect(&bed, true, &frontend, 20);
    assert_eq!(served.failed(), 0, "{:?}", served.summary);
    assert_eq!(served.by_master("node-local"), 0, "{:?}", served.summary);

    // Node namespace, another cgroup (the test's own): untouched.
    let other_cgroup = connect(&bed, false, &frontend, 10);
    assert_eq!(other_cgroup.by_master("node-local"), 10, "{:?}", other_cgroup.summary);

    // A pod's namespace, even inside kha's cgroup: untouched.
    let mut c = std::process::Command::new(&bed.lab_bin);
    c.args(["connect", "--addr", &frontend, "--count", "10", "--read-ident", "--json"])
        .stdout(std::process::Stdio::piped());
    let out =
        kha_lab::netns::spawn_in(&pod.0, Some(&bed.cgroup.path), c).unwrap().wait_with_output().unwrap();
    let run = kha_lab::bed::ToolRun::parse(&out);
    assert_eq!(run.by_master("pod-local"), 10, "{:?}", run.summary);

    let status = bed.status().unwrap();
    let foreign =
        status["counters"].as_array().unwrap().iter().find(|c| c["name"] == "foreign_netns").unwrap();
    assert!(foreign["value"].as_u64().unwrap() >= 10, "{status}");
}

#[test]
fn empty_backend_set_fails_connects_at_once_with_ehostunreach() {
    let Some(mut bed) = harness::bed(1) else { return };
    let frontend = format!("127.0.0.1:{IDENT_PORT}");
    let config = harness::config_file(
        &bed,
        "empty.toml",
        &format!("[[frontend]]\naddress = \"{frontend}\"\nbackends = []\n"),
    );
    start(&mut bed, &args(&["--config", &config.display().to_string(), harness::NO_CHECKS]));
    // A listener on the frontend must not be reached by falling through.
    let node_ns = bed.lab.node_netns().to_owned();
    let _local = local_listener(&bed, &node_ns, "node-local", &frontend);

    let run = connect(&bed, true, &frontend, 5);
    assert_eq!(run.summary["errors"]["connect:EHOSTUNREACH"], 5, "{:?}", run.summary);
    assert_eq!(run.by_master("node-local"), 0);
}
