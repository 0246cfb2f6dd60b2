//! The namespace topology with real `kha-lab master` processes. Needs root;
//! skips with a message otherwise. No kha involved: the node talks to the
//! masters' own addresses.

use std::process::{Command, Stdio};

use kha_lab::netns::{self, KillOnDrop};
use kha_lab::topology::{Lab, LabSpec};
use kha_lab::{FailureMode, Pki};

const BIN: &str = env!("CARGO_BIN_EXE_kha-lab");

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `kha-lab ARGS --json` in the node namespace; returns the JSON lines.
fn in_node(lab: &Lab, args: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--json").stdout(Stdio::piped()).stderr(Stdio::inherit());
    let child = KillOnDrop(lab.spawn_in_node(None, cmd).expect("spawn in node"));
    let mut child = child;
    let mut stdout = child.stdout.take().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"))).collect()
}

fn summary(lines: &[serde_json::Value]) -> &serde_json::Value {
    &lines.last().expect("output")["summary"]
}

#[test]
fn lab_masters_answer_from_the_node_and_fail_on_demand() {
    if !is_root() {
        eprintln!("skipping lab_masters_answer_from_the_node_and_fail_on_demand: needs root");
        return;
    }
    let _ = Lab::cleanup_orphans();
    let spec = LabSpec::unique(2);
    let prefix = spec.prefix.clone();
    {
        let mut lab = Lab::create(spec).expect("create lab");
        let pki = Pki::generate(&lab.identities()).expect("pki");
        let paths = pki.write_to(&lab.workdir().join("pki")).expect("write pki");
        lab.start_masters(BIN.as_ref(), &paths).expect("start masters");
        let ca = paths.ca_cert.to_str().unwrap().to_owned();

        // Each master over v4 and v6, name verified against the URL's IP.
        for m in lab.masters() {
            for addr in [m.https_v4(), m.https_v6()] {
                let url = format!("https://{addr}/version");
                let lines = in_node(&lab, &["client", "--url", &url, "--ca", &ca, "--count", "2"]);
                assert_eq!(summary(&lines)["by_master"][&m.name], 2, "{url}: {lines:?}");
                assert_eq!(lines[0]["peer"], addr.to_string());
            }
            let ident = m.ident_v6().to_string();
            let lines = in_node(&lab, &["connect", "--addr", &ident, "--count", "1", "--read-ident"]);
            assert_eq!(summary(&lines)["by_master"][&m.name], 1, "{lines:?}");
        }

        let m1 = lab.masters()[0].https_v4().to_string();
        let m1_url = format!("https://{m1}/readyz");
        lab.set_mode("m1", FailureMode::Readyz500).expect("readyz-500");
        let lines = in_node(&lab, &["client", "--url", &m1_url, "--ca", &ca, "--count", "1"]);
        assert_eq!(summary(&lines)["errors"]["status:500"], 1, "{lines:?}");
        lab.set_mode("m1", FailureMode::Normal).expect("normal");

        // Link down: no answer within the deadline. Link up: back.
        lab.link_down("m1").expect("link down");
        let lines = in_node(&lab, &["connect", "--addr", &m1, "--count", "1", "--timeout-ms", "300"]);
        let errors = &summary(&lines)["errors"];
        assert!(errors["connect:ETIMEDOUT"] == 1 || errors["connect:EHOSTUNREACH"] == 1, "{lines:?}");
        lab.link_up("m1").expect("link up");

        // Killed master: refused; restarted: answers.
        lab.kill_master("m1").expect("kill");
        let lines = in_node(&lab, &["connect", "--addr", &m1, "--count", "1"]);
        assert_eq!(summary(&lines)["errors"]["connect:ECONNREFUSED"], 1, "{lines:?}");
        lab.restart_master("m1").expect("restart");
        let lines = in_node(&lab, &["client", "--url", &m1_url, "--ca", &ca, "--count", "1"]);
        assert_eq!(summary(&lines)["ok"], 1, "{lines:?}");
    }
    let left: Vec<String> = netns::list().unwrap().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

#[test]
fn lab_cleans_up_after_a_panic_and_stopped_masters() {
    if !is_root() {
        eprintln!("skipping lab_cleans_up_after_a_panic_and_stopped_masters: needs root");
        return;
    }
    let spec = LabSpec::unique(1);
    let prefix = spec.prefix.clone();
    let mut pid = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::create(spec).expect("create lab");
        let pki = Pki::generate(&lab.identities()).expect("pki");
        let paths = pki.write_to(&lab.workdir().join("pki")).expect("write pki");
        lab.start_masters(BIN.as_ref(), &paths).expect("start masters");
        pid = lab.masters()[0].pid();

        // Stopped: the kernel still completes the TCP handshake, nobody writes.
        lab.stop_master("m1").expect("SIGSTOP");
        let ident = lab.masters()[0].ident_v4().to_string();
        let lines = in_node(
            &lab,
            &["connect", "--addr", &ident, "--count", "1", "--read-ident", "--timeout-ms", "300"],
        );
        assert_eq!(summary(&lines)["errors"]["ident:ETIMEDOUT"], 1, "{lines:?}");
        lab.cont_master("m1").expect("SIGCONT");
        let lines = in_node(&lab, &["connect", "--addr", &ident, "--count", "1", "--read-ident"]);
        assert_eq!(summary(&lines)["by_master"]["m1"], 1, "{lines:?}");

        lab.stop_master("m1").expect("SIGSTOP again");
        panic!("deliberate panic with a stopped master");
    }));
    assert!(result.is_err());
    let left: Vec<String> = netns::list().unwrap().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let pid = pid.expect("master pid");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "master {pid} still running");
}
