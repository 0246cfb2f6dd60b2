//! The one harness every root test goes through: skip (or, under CI, fail) when the machine
//! cannot run them, and small helpers over the bed.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use std::{
    io::{BufRead as _, BufReader, Lines},
    process::ChildStdout,
    sync::mpsc,
};

use kha_lab::{
    bed::{Bed, ToolRun},
    netns::{self, KillOnDrop},
};
use serde_json::Value;

/// A bed with `masters` masters, or `None` (test skipped) when not root. With
/// `KHA_REQUIRE_BPF=1` (set in CI) a skip is a failure.
pub fn bed(masters: usize) -> Option<Bed> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let why = "end-to-end tests need root (cgroup BPF programs, network namespaces)";
        if std::env::var("KHA_REQUIRE_BPF").is_ok_and(|v| v == "1") {
            panic!("{why}, and KHA_REQUIRE_BPF=1 forbids skipping");
        }
        eprintln!("skipping: {why}");
        return None;
    }
    Some(Bed::create(masters).unwrap_or_else(|e| panic!("cannot build the test bed: {e}")))
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// `--backend` flags for every master's address as chosen by `pick`.
pub fn backends(bed: &Bed, pick: impl Fn(&kha_lab::topology::LabMaster) -> SocketAddr) -> Vec<String> {
    bed.lab.masters().iter().flat_map(|m| ["--backend".to_string(), pick(m).to_string()]).collect()
}

/// Starts the agent; unless the test chose otherwise, its probes trust the lab's CA, as a real
/// node's agent trusts the cluster CA.
pub fn start(bed: &mut Bed, extra: &[String]) {
    let mut args = extra.to_vec();
    if !args.iter().any(|a| a == "--no-health-checks" || a == "--ca-file") {
        args.extend(["--ca-file".to_string(), bed.pki.ca_cert.display().to_string()]);
    }
    // The host's own ports stay free unless a test asks for the endpoints.
    for flag in ["--metrics-addr", "--health-addr"] {
        if !args.iter().any(|a| a == flag) {
            args.extend([flag.to_string(), "none".to_string()]);
        }
    }
    bed.start_agent(&args).unwrap_or_else(|e| panic!("agent did not start: {e}\n{}", bed.agent_log_text()));
}

/// For backends on the plain identity port, which a TLS probe cannot check.
pub const NO_CHECKS: &str = "--no-health-checks";

/// `kha-lab connect` to `addr`, reading the identity line each listener sends.
pub fn connect(bed: &Bed, in_cgroup: bool, addr: &str, count: u32) -> ToolRun {
    let run = bed
        .run_lab_tool(
            in_cgroup,
            &args(&[
                "connect",
                "--addr",
                addr,
                "--count",
                &count.to_string(),
                "--read-ident",
                "--timeout-ms",
                "3000",
            ]),
        )
        .unwrap_or_else(|e| panic!("connect tool: {e}"));
    assert_eq!(run.summary["count"].as_u64(), Some(count as u64), "tool did not finish: {}", run.stderr);
    run
}

/// `kha-lab client` over TLS to `https://localhost:6443/version`, dialing `connect_addr`.
pub fn https(bed: &Bed, connect_addr: &str, count: u32) -> ToolRun {
    let ca = bed.pki.ca_cert.display().to_string();
    let run = bed
        .run_lab_tool(
            true,
            &args(&[
                "client",
                "--url",
                "https://localhost:6443/version",
                "--connect-addr",
                connect_addr,
                "--ca",
                &ca,
                "--count",
                &count.to_string(),
                "--new-connection-each",
            ]),
        )
        .unwrap_or_else(|e| panic!("client tool: {e}"));
    assert_eq!(run.summary["count"].as_u64(), Some(count as u64), "tool did not finish: {}", run.stderr);
    run
}

/// Every record's getpeername result.
pub fn peers(run: &ToolRun) -> Vec<String> {
    run.records.iter().map(|r| r["peer"].as_str().unwrap_or("none").to_string()).collect()
}

/// A plain TCP listener on `addr` inside `netns` that answers every connection with `name`,
/// standing for whatever else listens on a frontend address (an old nginx-proxy, a pod's own
/// service).
pub fn local_listener(bed: &Bed, netns: &str, name: &str, addr: &str) -> KillOnDrop {
    let m1 = &bed.pki.masters[0];
    let ready = bed.lab.workdir().join(format!("{name}.ready"));
    let mut c = Command::new(&bed.lab_bin);
    c.args(["master", "--name", name, "--listen", "127.0.0.1:0", "--ident-listen", addr])
        .arg("--cert")
        .arg(&m1.cert)
        .arg("--key")
        .arg(&m1.key)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = KillOnDrop(netns::spawn_in(netns, None, c).expect("spawn local listener"));
    wait_for(&format!("{name} ready"), Duration::from_secs(10), || {
        std::fs::read_to_string(&ready).is_ok_and(|s| s.starts_with("ready"))
    });
    child
}

/// A network namespace of the test's own (a stand-in for a pod), with loopback up.
pub struct ExtraNetns(pub String);

impl ExtraNetns {
    pub fn create(bed: &Bed, suffix: &str) -> Self {
        let name = format!("{}-{suffix}", bed.lab.prefix());
        netns::add(&name).expect("add netns");
        let ns = ExtraNetns(name);
        netns::ip(&["-n", &ns.0, "link", "set", "lo", "up"]).expect("lo up");
        ns
    }
}

impl Drop for ExtraNetns {
    fn drop(&mut self) {
        let _ = netns::del(&self.0);
    }
}

/// The status `kha status -o json` prints, read in-process through the agent library: the
/// waits poll it every 20 ms, and spawning the debug binary that often would cost more than
/// what is waited for. `None` while nothing is pinned.
pub fn status(bed: &Bed) -> Option<Value> {
    let s = kha::status::read(&kha::loader::PinDir::new(&bed.pin_dir)).ok()?;
    serde_json::to_value(s).ok()
}

pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// What bpftool says is attached to `cgroup` (empty when nothing is).
pub fn cgroup_programs(cgroup: &Path) -> String {
    let out = Command::new("bpftool").arg("cgroup").arg("show").arg(cgroup).output().expect("bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a BPF object with this id still exists (`kind` is `prog`, `map` or `link`).
pub fn bpf_object_exists(kind: &str, id: u64) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn config_file(bed: &Bed, name: &str, toml: &str) -> PathBuf {
    let path = bed.lab.workdir().join(name);
    std::fs::write(&path, toml).expect("write config");
    path
}

/// A keep-alive client making a request every 100 ms, read record by record as it runs.
pub struct LiveClient {
    _child: KillOnDrop,
    records: mpsc::Receiver<Value>,
}

impl LiveClient {
    pub fn start(bed: &Bed, count: u32) -> Self {
        Self::start_via(bed, count, "127.0.0.1:6443")
    }

    /// The same, connecting to `connect_addr` (a frontend).
    pub fn start_via(bed: &Bed, count: u32, connect_addr: &str) -> Self {
        Self::from_child(bed.spawn_lab_tool(true, &Self::args(bed, count, connect_addr)).unwrap())
    }

    /// The same to 127.0.0.1:6443 from `cgroup` (below the bed's), the lab tool run as `bin`
    /// (a link to it under another name, which its connects then carry as process name).
    pub fn start_in(bed: &Bed, cgroup: &Path, bin: &Path, count: u32) -> Self {
        let mut c = Command::new(bin);
        c.args(Self::args(bed, count, "127.0.0.1:6443"));
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        Self::from_child(bed.lab.spawn_in_node(Some(cgroup), c).unwrap())
    }

    fn args(bed: &Bed, count: u32, connect_addr: &str) -> Vec<String> {
        let ca = bed.pki.ca_cert.display().to_string();
        args(&[
            "client",
            "--url",
            "https://localhost:6443/version",
            "--connect-addr",
            connect_addr,
            "--ca",
            &ca,
            "--count",
            &count.to_string(),
            "--interval-ms",
            "100",
            "--keep-alive",
            "--timeout-ms",
            "30000",
            "--json",
        ])
    }

    fn from_child(mut child: std::process::Child) -> Self {
        let lines: Lines<BufReader<ChildStdout>> = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v.get("summary").is_none()
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        LiveClient { _child: KillOnDrop(child), records: rx }
    }

    pub fn next(&self) -> Value {
        self.records.recv_timeout(Duration::from_secs(40)).expect("a record from the client")
    }

    /// Every record the client wrote since the last call, without waiting.
    pub fn drain(&self) -> Vec<Value> {
        self.records.try_iter().collect()
    }

    /// The next failed request.
    pub fn next_failure(&self) -> Value {
        loop {
            let r = self.next();
            if !r["error"].is_null() {
                return r;
            }
        }
    }

    /// The next failed request, then the first answer after it, which must come from a master
    /// other than `victim`.
    pub fn failure_then_recovery(&self, victim: &str) -> (Value, Value) {
        let failure = self.next_failure();
        let recovered = loop {
            let r = self.next();
            if r["error"].is_null() {
                break r;
            }
        };
        assert_ne!(recovered["master"], victim, "answered by the frozen master");
        (failure, recovered)
    }
}

/// A `kha-lab connect --read-ident` loop in kha's cgroup, its output read as it comes (a full
/// pipe would stall the loop, and with it the overlap a test wants to show).
pub struct ConnectLoop {
    child: KillOnDrop,
    records: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    reader: Option<thread::JoinHandle<String>>,
}

impl ConnectLoop {
    pub fn start(bed: &Bed, addr: &str, count: u32) -> ConnectLoop {
        Self::start_with(bed, addr, count, true)
    }

    /// Without `--read-ident`: a connect and a close, for frontends whose backends do not send
    /// an identity line (the TLS ones); `by_master` stays empty.
    pub fn start_with(bed: &Bed, addr: &str, count: u32, read_ident: bool) -> ConnectLoop {
        let count = count.to_string();
        let mut list = vec!["connect", "--addr", addr, "--count", &count, "--json"];
        if read_ident {
            list.push("--read-ident");
        }
        let mut child = KillOnDrop(bed.spawn_lab_tool(true, &args(&list)).expect("connect loop"));
        let records = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stdout, seen) = (child.stdout.take().expect("stdout"), records.clone());
        let reader = thread::spawn(move || {
            let mut text = String::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        ConnectLoop { child, records, reader: Some(reader) }
    }

    /// Connects reported so far.
    pub fn records(&self) -> usize {
        self.records.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the loop's end; its summary.
    pub fn summary(mut self) -> Value {
        let text = self.reader.take().expect("reader").join().expect("reader thread");
        kha_lab::bed::parse_json_lines(&text).1
    }
}

/// A free port on 127.0.0.1 for an agent's endpoint.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on 127.0.0.1:`port` through hyper's client: (status code, body), or `None`
/// without a whole answer within 3 s.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use http_body_util::{BodyExt as _, Empty};
    use hyper::body::Bytes;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    rt.block_on(async {
        let get = async {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.ok()?;
            tokio::spawn(conn);
            let req =
                hyper::Request::get(path).header("host", "localhost").body(Empty::<Bytes>::new()).ok()?;
            let response = sender.send_request(req).await.ok()?;
            let code = response.status().as_u16();
            let body = response.into_body().collect().await.ok()?.to_bytes();
            Some((code, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(Duration::from_secs(3), get).await.ok().flatten()
    })
}
