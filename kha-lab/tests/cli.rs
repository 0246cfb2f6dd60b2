//! The `kha-lab` binary as the lab runs it: master readiness announcement,
//! control file switching, and the client/connect JSON output. No root needed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kha_lab::mode::{self, FailureMode};
use kha_lab::pki::{MasterIdentity, Pki};

const BIN: &str = env!("CARGO_BIN_EXE_kha-lab");

struct Master {
    child: Child,
    dir: PathBuf,
    https: String,
    ident: String,
    ca: PathBuf,
    control: PathBuf,
}

impl Drop for Master {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start_master(tag: &str) -> Master {
    let dir = std::env::temp_dir().join(format!("kha-lab-cli-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let pki = Pki::generate(&[MasterIdentity::new("m1", ["192.0.2.11".parse().unwrap()])]).unwrap();
    let paths = pki.write_to(&dir).unwrap();
    let m1 = paths.master("m1").unwrap();
    let ready = dir.join("m1.ready");
    let control = dir.join("m1.control");
    let child = Command::new(BIN)
        .args(["master", "--name", "m1", "--listen", "127.0.0.1:0", "--ident-listen", "127.0.0.1:0"])
        .arg("--cert")
        .arg(&m1.cert)
        .arg("--key")
        .arg(&m1.key)
        .arg("--control-file")
        .arg(&control)
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn master");
    let mut master =
        Master { child, dir, https: String::new(), ident: String::new(), ca: paths.ca_cert, control };
    wait_for("ready file", || fs::read_to_string(&ready).is_ok_and(|s| s.starts_with("ready\n")));
    let text = fs::read_to_string(&ready).unwrap();
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("https", a)) => master.https = a.to_owned(),
            Some(("ident", a)) => master.ident = a.to_owned(),
            _ => {}
        }
    }
    assert!(!master.https.is_empty() && !master.ident.is_empty(), "{text}");
    assert_eq!(mode::read_applied(&master.control), Some(FailureMode::Normal));
    master
}

fn kha_lab(args: &[&str], ca: Option<&Path>) -> (Output, Vec<serde_json::Value>) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    let out = cmd.output().expect("run kha-lab");
    let lines = String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    (out, lines)
}

#[test]
fn client_json_reports_each_request_and_a_summary() {
    let m = start_master("client");
    let url = format!("https://localhost:{}/version", m.https.rsplit_once(':').unwrap().1);
    let (out, lines) = kha_lab(
        &["client", "--url", &url, "--connect-addr", &m.https, "--count", "3", "--keep-alive", "--json"],
        Some(&m.ca),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0]["master"], "m1");
    assert_eq!(lines[0]["peer"], m.https.as_str());
    assert_eq!(lines[2]["reused"], true);
    let summary = &lines[3]["summary"];
    assert_eq!(summary["ok"], 3);
    assert_eq!(summary["failed"], 0);
    assert_eq!(summary["by_master"]["m1"], 3);
    assert_eq!(summary["errors"], serde_json::json!({}));
}

#[test]
fn control_file_switches_modes_on_sighup() {
    let m = start_master("mode");
    let url = format!("https://127.0.0.1:{}/readyz", m.https.rsplit_once(':').unwrap().1);
    mode::write_control(&m.control, FailureMode::Readyz500).unwrap();
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(m.child.id() as i32, libc::SIGHUP) };
    wait_for("readyz-500 applied", || mode::read_applied(&m.control) == Some(FailureMode::Readyz500));
    let (out, lines) = kha_lab(&["client", "--url", &url, "--count", "1", "--json"], Some(&m.ca));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(lines[0]["status"], 500);
    assert_eq!(lines[1]["summary"]["errors"]["status:500"], 1);

    // Without a signal the poll picks the change up too.
    mode::write_control(&m.control, FailureMode::Normal).unwrap();
    wait_for("normal applied", || mode::read_applied(&m.control) == Some(FailureMode::Normal));
    let (out, _) = kha_lab(&["client", "--url", &url, "--count", "1", "--json"], Some(&m.ca));
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn connect_reads_identity_and_reports_refusals() {
    let m = start_master("connect");
    let (out, lines) =
        kha_lab(&["connect", "--addr", &m.ident, "--count", "2", "--read-ident", "--json"], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(lines[0]["master"], "m1");
    assert_eq!(lines[2]["summary"]["by_master"]["m1"], 2);
    assert_eq!(lines[2]["summary"]["by_peer"][&m.ident], 2);

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (out, lines) = kha_lab(&["connect", "--addr", &closed, "--count", "1", "--json"], None);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(lines[0]["error"], "connect:ECONNREFUSED");
    assert_eq!(lines[1]["summary"]["errors"]["connect:ECONNREFUSED"], 1);
}

#[test]
fn text_output_and_usage_errors() {
    let (out, _) = kha_lab(&["connect", "--addr", "127.0.0.1:1", "--count", "0"], None);
    assert_eq!(out.status.code(), Some(2), "count 0 must be a usage error");
    let out = Command::new(BIN).args(["connect", "--addr", "127.0.0.1:1", "--count", "1"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("error=connect:ECONNREFUSED") && text.contains("summary: count=1 ok=0 failed=1"),
        "{text}"
    );
}
