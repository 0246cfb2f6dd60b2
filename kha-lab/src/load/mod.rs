//! Load generators for `cargo xtask bench` (`kha-lab load MODE ...`): bounded in count and in
//! time, one JSON [`LoadReport`] at the end.
//!
//! | mode         | one operation                                                              | latency measured            |
//! |--------------|----------------------------------------------------------------------------|-----------------------------|
//! | `connect`    | `socket()` + blocking `connect()`, then close with RST (no TIME_WAIT)       | the `connect()` call        |
//! | `first-byte` | `connect()` to an identity port, read until the master's `<name>\n` line   | `connect()` to first bytes  |
//! | `https`      | new TCP + TLS connection, `GET PATH` with `Connection: close`, full answer  | connect to last body byte   |
//! | `keepalive`  | `GET PATH` on a connection kept open (one per worker)                      | request to last body byte   |
//! | `bulk`       | one TLS connection, `GET /bulk?bytes=N`, read N bytes                      | request to last body byte   |
//!
//! Each operation dials one of `targets`, chosen at random (seeded), the way kha's default
//! policy does. `connect` and `first-byte` run on plain threads with blocking syscalls, so the
//! time is the syscall's and not a scheduler's; the TLS modes run on tokio. `https` makes
//! every handshake full unless `resume` is set: then one process-wide rustls session cache is
//! shared, as in a long-lived client, and [`LoadReport::resumed`] counts the handshakes that
//! resumed. A ticket is only good at the master that issued it, so spreading over masters
//! defeats resumption, which the count shows.
//!
//! Latency percentiles are exact: every sample is kept (the counts are bounded).
//!
//! # JSON (`kha-lab load ... --json`)
//! ```text
//! {"mode":"https","targets":["127.0.0.1:6443"],"concurrency":16,"ok":5120,"failed":0,
//!  "errors":{},"elapsed_s":2.0,"rate_per_s":2560.0,"latency_us":{"n":5120,"mean":6150.2,
//!  "p50":5900.1,"p90":7400.0,"p99":9800.3,"max":15000.0},"handshakes":5120,"resumed":1701,
//!  "bytes":0,"throughput_mib_s":0.0,"by_master":{"m1":1700,"m2":1710,"m3":1710}}
//! ```

use std::collections::BTreeMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::errno::io_error_key;
use crate::http::{self, BodyLength, Limits, ReadError};
use crate::master::MASTER_HEADER;

/// Upper bounds, so a typo cannot start an endless or unbounded run.
pub const MAX_COUNT: u64 = 10_000_000;
pub const MAX_DURATION: Duration = Duration::from_secs(600);
pub const MAX_CONCURRENCY: usize = 1024;
pub const MAX_BULK: u64 = crate::master::MAX_BULK_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Connect,
    FirstByte,
    Https,
    Keepalive,
    Bulk,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Connect => "connect",
            Mode::FirstByte => "first-byte",
            Mode::Https => "https",
            Mode::Keepalive => "keepalive",
            Mode::Bulk => "bulk",
        }
    }

    fn uses_tls(self) -> bool {
        matches!(self, Mode::Https | Mode::Keepalive | Mode::Bulk)
    }
}

#[derive(Clone)]
pub struct LoadOptions {
    pub mode: Mode,
    pub targets: Vec<SocketAddr>,
    /// Workers, each doing one operation at a time (`bulk` uses one).
    pub concurrency: usize,
    /// Stop after this many operations in all...
    pub count: u64,
    /// ... or after this long, whichever comes first.
    pub duration: Duration,
    /// Deadline for one operation (`bulk`: the whole transfer).
    pub timeout: Duration,
    /// TLS server name (SNI and verification) for every target.
    pub server_name: String,
    /// Request path for `https` and `keepalive`.
    pub path: String,
    /// `https`: keep a session cache and resume.
    pub resume: bool,
    /// `bulk`: body size.
    pub bytes: u64,
    /// Trusts the lab CA; required for the TLS modes.
    pub tls: Option<Arc<ClientConfig>>,
    pub seed: u64,
    /// Run on this CPU only (every thread), for steadier latencies.
    pub cpu: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no target address given")]
    NoTargets,
    #[error("{what} {value} is out of range (at most {max})")]
    Range { what: &'static str, value: u64, max: u64 },
    #[error("mode {0} needs a CA (TLS client config)")]
    NoTls(&'static str),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("starting the tokio runtime")]
    Runtime(#[source] io::Error),
    #[error("starting a worker thread")]
    Thread(#[source] io::Error),
    #[error("pinning to CPU {cpu}")]
    Affinity {
        cpu: usize,
        #[source]
        source: io::Error,
    },
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub n: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Nearest-rank percentiles of samples given in nanoseconds.
    pub fn from_nanos(mut samples: Vec<u64>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        let at = |p: f64| {
            let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
            samples[rank - 1] as f64 / 1000.0
        };
        let mean = samples.iter().map(|&s| s as f64).sum::<f64>() / n as f64 / 1000.0;
        Some(Latency { n: n as u64, mean, p50: at(0.50), p90: at(0.90), p99: at(0.99), max: at(1.0) })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub mode: String,
    pub targets: Vec<String>,
    pub concurrency: usize,
    pub ok: u64,
    pub failed: u64,
    /// `<phase>:<reason>` -> count, as in `kha-lab client`.
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Successful operations per second.
    pub rate_per_s: f64,
    pub latency_us: Option<Latency>,
    /// TLS handshakes made, and how many of them resumed a session.
    pub handshakes: u64,
    pub resumed: u64,
    /// Body bytes received (`bulk`) and the rate they came at.
    pub bytes: u64,
    pub throughput_mib_s: f64,
    /// Answers per master (`X-Kha-Lab-Master`, or the identity line).
    pub by_master: BTreeMap<String, u64>,
}

/// What one worker gathered.
#[derive(Default)]
struct Tally {
    samples: Vec<u64>,
    ok: u64,
    failed: u64,
    errors: BTreeMap<String, u64>,
    handshakes: u64,
    resumed: u64,
    bytes: u64,
    by_master: BTreeMap<String, u64>,
}

impl Tally {
    fn fail(&mut self, key: String) {
        self.failed += 1;
        *self.errors.entry(key).or_default() += 1;
    }

    fn answered_by(&mut self, master: Option<String>) {
        if let Some(m) = master {
            *self.by_master.entry(m).or_default() += 1;
        }
    }

    fn merge(&mut self, other: Tally) {
        self.samples.extend(other.samples);
        self.ok += other.ok;
        self.failed += other.failed;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.handshakes += other.handshakes;
        self.resumed += other.resumed;
        self.bytes += other.bytes;
        for (k, v) in other.by_master {
            *self.by_master.entry(k).or_default() += v;
        }
    }
}

/// xorshift64*: cheap, seeded, good enough to spread connects.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// Shared stop conditions: a budget of operations and a deadline.
struct Budget {
    issued: AtomicU64,
    count: u64,
    deadline: Instant,
}

impl Budget {
    /// Claims one operation, or says stop.
    fn take(&self) -> bool {
        Instant::now() < self.deadline && self.issued.fetch_add(1, Ordering::Relaxed) < self.count
    }
}

pub fn validate(opts: &LoadOptions) -> Result<(), LoadError> {
    if opts.targets.is_empty() {
        return Err(LoadError::NoTargets);
    }
    let check = |what, value: u64, max: u64| {
        if value > max || value == 0 { Err(LoadError::Range { what, value, max }) } else { Ok(()) }
    };
    check("count", opts.count, MAX_COUNT)?;
    check("duration (ms)", opts.duration.as_millis() as u64, MAX_DURATION.as_millis() as u64)?;
    check("timeout (ms)", opts.timeout.as_millis() as u64, MAX_DURATION.as_millis() as u64)?;
    check("concurrency", opts.concurrency as u64, MAX_CONCURRENCY as u64)?;
    if opts.mode == Mode::Bulk {
        check("bytes", opts.bytes, MAX_BULK)?;
    }
    if opts.mode.uses_tls() && opts.tls.is_none() {
        return Err(LoadError::NoTls(opts.mode.name()));
    }
    Ok(())
}

/// Runs the load to completion (bounded by count, duration and per-operation timeouts).
pub fn run(opts: &LoadOptions) -> Result<LoadReport, LoadError> {
    validate(opts)?;
    if let Some(cpu) = opts.cpu {
        pin_to(cpu)?;
    }
    let start = Instant::now();
    let (tally, elapsed) = match opts.mode {
        Mode::Connect | Mode::FirstByte => run_threads(opts)?,
        Mode::Https | Mode::Keepalive | Mode::Bulk => run_tls(opts)?,
    };
    let elapsed = elapsed.unwrap_or_else(|| start.elapsed()).as_secs_f64();
    let throughput = if opts.mode == Mode::Bulk && elapsed > 0.0 {
        tally.bytes as f64 / elapsed / (1024.0 * 1024.0)
    } else {
        0.0
    };
    Ok(LoadReport {
        mode: opts.mode.name().to_owned(),
        targets: opts.targets.iter().map(ToString::to_string).collect(),
        concurrency: if opts.mode == Mode::Bulk { 1 } else { opts.concurrency },
        ok: tally.ok,
        failed: tally.failed,
        errors: tally.errors,
        elapsed_s: elapsed,
        rate_per_s: if elapsed > 0.0 { tally.ok as f64 / elapsed } else { 0.0 },
        latency_us: Latency::from_nanos(tally.samples),
        handshakes: tally.handshakes,
        resumed: tally.resumed,
        bytes: tally.bytes,
        throughput_mib_s: throughput,
        by_master: tally.by_master,
    })
}

/// Pins the calling thread, and so every thread it starts later, to one CPU.
fn pin_to(cpu: usize) -> Result<(), LoadError> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (cpu is checked against its size).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = zeroed();
        if cpu >= 8 * size_of::<libc::cpu_set_t>() {
            return Err(LoadError::Affinity { cpu, source: io::Error::from_raw_os_error(libc::EINVAL) });
        }
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(LoadError::Affinity { cpu, source: io::Error::last_os_error() });
    }
    Ok(())
}

// ---- connect and first-byte: blocking syscalls on plain threads ----

fn run_threads(opts: &LoadOptions) -> Result<(Tally, Option<Duration>), LoadError> {
    let budget = Arc::new(Budget {
        issued: AtomicU64::new(0),
        count: opts.count,
        deadline: Instant::now() + opts.duration,
    });
    let mut handles = Vec::new();
    for w in 0..opts.concurrency {
        let (opts, budget) = (opts.clone(), budget.clone());
        let h = std::thread::Builder::new()
            .name(format!("load-{w}"))
            .spawn(move || {
                let mut rng = Rng::new(opts.seed.wrapping_add(w as u64));
                let mut t = Tally::default();
                while budget.take() {
                    let target = opts.targets[rng.below(opts.targets.len())];
                    match connect_once(target, opts.timeout, opts.mode == Mode::FirstByte) {
                        Ok((took, master)) => {
                            t.ok += 1;
                            t.samples.push(took.as_nanos() as u64);
                            t.answered_by(master);
                        }
                        Err(key) => t.fail(key),
                    }
                }
                t
            })
            .map_err(LoadError::Thread)?;
        handles.push(h);
    }
    let mut all = Tally::default();
    for h in handles {
        // A worker only panics on a bug; count it rather than lose the others' results.
        match h.join() {
            Ok(t) => all.merge(t),
            Err(_) => all.fail("worker:panic".into()),
        }
    }
    Ok((all, None))
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: fd is open; value points to a T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn errno_key(phase: &str, err: &io::Error) -> String {
    // A blocking connect whose SO_SNDTIMEO expires returns EINPROGRESS; a read, EAGAIN.
    let reason = match err.raw_os_error() {
        Some(libc::EINPROGRESS) | Some(libc::EAGAIN) => "ETIMEDOUT".to_owned(),
        _ => io_error_key(err),
    };
    format!("{phase}:{reason}")
}

/// One blocking connect (and identity read); returns the time it took and the name read.
fn connect_once(
    addr: SocketAddr,
    deadline: Duration,
    first_byte: bool,
) -> Result<(Duration, Option<String>), String> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall; the fd is owned right after.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(errno_key("socket", &io::Error::last_os_error()));
    }
    // SAFETY: raw is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval {
        tv_sec: deadline.as_secs() as libc::time_t,
        tv_usec: deadline.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
        setsockopt(&fd, libc::SOL_SOCKET, opt, &tv).map_err(|e| errno_key("socket", &e))?;
    }
    let (ss, len) = sockaddr(&addr);
    let t0 = Instant::now();
    // SAFETY: ss holds a sockaddr of `len` bytes for this family.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        return Err(errno_key("connect", &io::Error::last_os_error()));
    }
    if !first_byte {
        let took = t0.elapsed();
        // Close with RST: no TIME_WAIT, so long runs do not run out of ports.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        let _ = setsockopt(&fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
        return Ok((took, None));
    }
    let mut buf = [0u8; 256];
    let mut got = 0;
    let mut first = None;
    while got < buf.len() && !buf[..got].contains(&b'\n') {
        // SAFETY: reading into the unused tail of buf.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 {
            return Err(errno_key("ident", &io::Error::last_os_error()));
        }
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| t0.elapsed());
        got += n as usize;
    }
    let Some(took) = first else { return Err("ident:EOF".into()) };
    let line = String::from_utf8_lossy(&buf[..got]);
    let name = line.split('\n').next().unwrap_or("").trim().to_owned();
    Ok((took, (!name.is_empty()).then_some(name)))
}

// ---- TLS modes on tokio ----

fn run_tls(opts: &LoadOptions) -> Result<(Tally, Option<Duration>), LoadError> {
    let Some(base) = &opts.tls else { return Err(LoadError::NoTls(opts.mode.name())) };
    let mut config = (**base).clone();
    if opts.mode == Mode::Https && !opts.resume {
        // As separate kubectl processes: nothing to resume, every handshake full.
        config.resumption = Resumption::disabled();
    }
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(opts.server_name.clone())
        .map_err(|_| LoadError::ServerName(opts.server_name.clone()))?;
    let workers = if opts.mode == Mode::Bulk { 1 } else { opts.concurrency };
    let runtime = if workers == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    }
    .map_err(LoadError::Runtime)?;
    let budget = Arc::new(Budget {
        issued: AtomicU64::new(0),
        count: opts.count,
        deadline: Instant::now() + opts.duration,
    });
    let result = runtime.block_on(async {
        if opts.mode == Mode::Bulk {
            let (t, took) = bulk(opts, &connector, name).await;
            return (t, took);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers {
            let (opts, budget, connector, name) =
                (opts.clone(), budget.clone(), connector.clone(), name.clone());
            tasks.spawn(async move {
                let rng = Rng::new(opts.seed.wrapping_add(w as u64));
                match opts.mode {
                    Mode::Keepalive => keepalive_worker(&opts, &budget, &connector, name, rng).await,
                    _ => https_worker(&opts, &budget, &connector, name, rng).await,
                }
            });
        }
        let mut all = Tally::default();
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(t) => all.merge(t),
                Err(_) => all.fail("worker:panic".into()),
            }
        }
        (all, None)
    });
    Ok(result)
}

/// tokio-rustls reports TLS failures as io::Error wrapping a rustls::Error.
fn io_key(phase: &str, err: &io::Error) -> String {
    let reason = match err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        Some(tls) => crate::tls::error_key(tls).to_owned(),
        None => io_error_key(err),
    };
    format!("{phase}:{reason}")
}

fn read_key(err: ReadError) -> String {
    match err {
        ReadError::Io(e) => io_key("response", &e),
        ReadError::UnexpectedEof => "response:EOF".into(),
        ReadError::Head(_) => "response:malformed".into(),
    }
}

async fn dial(
    target: SocketAddr,
    connector: &TlsConnector,
    name: ServerName<'static>,
) -> Result<(TlsStream<TcpStream>, bool), String> {
    let tcp = TcpStream::connect(target).await.map_err(|e| io_key("connect", &e))?;
    let _ = tcp.set_nodelay(true);
    let tls = connector.connect(name, tcp).await.map_err(|e| io_key("tls", &e))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    Ok((tls, resumed))
}

fn request(path: &str, server_name: &str, close: bool) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {server_name}\r\nUser-Agent: kha-lab-load\r\nAccept: */*\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// Sends a request and reads the answer; the master that answered, on a 2xx.
async fn exchange(
    stream: &mut TlsStream<TcpStream>,
    buf: &mut Vec<u8>,
    req: &str,
) -> Result<Option<String>, String> {
    stream.write_all(req.as_bytes()).await.map_err(|e| io_key("request", &e))?;
    stream.flush().await.map_err(|e| io_key("request", &e))?;
    let resp = http::read_response(stream, buf, &Limits::default()).await.map_err(read_key)?;
    if !(200..300).contains(&resp.status) {
        return Err(format!("status:{}", resp.status));
    }
    Ok(resp.header(MASTER_HEADER).map(str::to_owned))
}

async fn https_worker(
    opts: &LoadOptions,
    budget: &Budget,
    connector: &TlsConnector,
    name: ServerName<'static>,
    mut rng: Rng,
) -> Tally {
    let req = request(&opts.path, &opts.server_name, true);
    let mut t = Tally::default();
    while budget.take() {
        let target = opts.targets[rng.below(opts.targets.len())];
        let t0 = Instant::now();
        let one = async {
            let (mut stream, resumed) = dial(target, connector, name.clone()).await?;
            let master = exchange(&mut stream, &mut Vec::new(), &req).await;
            // Best-effort close_notify; the answer is complete.
            let _ = stream.shutdown().await;
            master.map(|m| (m, resumed))
        };
        match timeout(opts.timeout, one).await {
            Ok(Ok((master, resumed))) => {
                t.ok += 1;
                t.handshakes += 1;
                t.resumed += u64::from(resumed);
                t.samples.push(t0.elapsed().as_nanos() as u64);
                t.answered_by(master);
            }
            Ok(Err(key)) => t.fail(key),
            Err(_) => t.fail("request:ETIMEDOUT".into()),
        }
    }
    t
}

async fn keepalive_worker(
    opts: &LoadOptions,
    budget: &Budget,
    connector: &TlsConnector,
    name: ServerName<'static>,
    mut rng: Rng,
) -> Tally {
    let req = request(&opts.path, &opts.server_name, false);
    let mut t = Tally::default();
    let mut conn: Option<(TlsStream<TcpStream>, Vec<u8>)> = None;
    while budget.take() {
        if conn.is_none() {
            // The connection is made outside the timed part: only requests are measured.
            let target = opts.targets[rng.below(opts.targets.len())];
            match timeout(opts.timeout, dial(target, connector, name.clone())).await {
                Ok(Ok((stream, resumed))) => {
                    t.handshakes += 1;
                    t.resumed += u64::from(resumed);
                    conn = Some((stream, Vec::new()));
                }
                Ok(Err(key)) => {
                    t.fail(key);
                    continue;
                }
                Err(_) => {
                    t.fail("connect:ETIMEDOUT".into());
                    continue;
                }
            }
        }
        let Some((stream, buf)) = conn.as_mut() else { continue };
        let t0 = Instant::now();
        match timeout(opts.timeout, exchange(stream, buf, &req)).await {
            Ok(Ok(master)) => {
                t.ok += 1;
                t.samples.push(t0.elapsed().as_nanos() as u64);
                t.answered_by(master);
            }
            Ok(Err(key)) => {
                t.fail(key);
                conn = None;
            }
            Err(_) => {
                t.fail("request:ETIMEDOUT".into());
                conn = None;
            }
        }
    }
    if let Some((mut stream, _)) = conn {
        let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
    }
    t
}

/// One `GET /bulk?bytes=N` on one connection; the time from request to last byte.
async fn bulk(
    opts: &LoadOptions,
    connector: &TlsConnector,
    name: ServerName<'static>,
) -> (Tally, Option<Duration>) {
    let mut t = Tally::default();
    let target = opts.targets[Rng::new(opts.seed).below(opts.targets.len())];
    let req = request(&format!("/bulk?bytes={}", opts.bytes), &opts.server_name, true);
    let one = async {
        let (mut stream, resumed) = dial(target, connector, name).await?;
        let t0 = Instant::now();
        stream.write_all(req.as_bytes()).await.map_err(|e| io_key("request", &e))?;
        stream.flush().await.map_err(|e| io_key("request", &e))?;
        let limits = Limits { max_head: http::DEFAULT_MAX_HEAD, max_body: usize::MAX };
        let mut buf = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 256 * 1024];
        let (resp, head_len, body) = loop {
            if let Some(parsed) =
                http::parse_response_head(&buf, &limits).map_err(|_| "response:malformed".to_owned())?
            {
                break parsed;
            }
            let n = stream.read(&mut chunk).await.map_err(|e| io_key("response", &e))?;
            if n == 0 {
                return Err("response:EOF".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        if resp.status != 200 {
            return Err(format!("status:{}", resp.status));
        }
        let BodyLength::Exactly(want) = body else { return Err("response:malformed".to_owned()) };
        let mut got = (buf.len() - head_len) as u64;
        while got < want as u64 {
            let n = stream.read(&mut chunk).await.map_err(|e| io_key("response", &e))?;
            if n == 0 {
                return Err("response:EOF".to_owned());
            }
            got += n as u64;
        }
        let took = t0.elapsed();
        let _ = stream.shutdown().await;
        Ok((got, took, resumed, resp.header(MASTER_HEADER).map(str::to_owned)))
    };
    match timeout(opts.timeout, one).await {
        Ok(Ok((got, took, resumed, master))) => {
            t.ok = 1;
            t.handshakes = 1;
            t.resumed = u64::from(resumed);
            t.bytes = got;
            t.samples.push(took.as_nanos() as u64);
            t.answered_by(master);
            (t, Some(took))
        }
        Ok(Err(key)) => {
            t.fail(key);
            (t, None)
        }
        Err(_) => {
            t.fail("response:ETIMEDOUT".into());
            (t, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::{self, MasterConfig};
    use crate::pki::{MasterIdentity, Pki};
    use crate::tls;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::from_nanos((1..=100).map(|i| i * 1000).collect()).unwrap();
        assert_eq!((l.n, l.p50, l.p90, l.p99, l.max), (100, 50.0, 90.0, 99.0, 100.0));
        assert_eq!(l.mean, 50.5);
        assert_eq!(Latency::from_nanos(vec![7000]).unwrap().p99, 7.0);
        assert!(Latency::from_nanos(Vec::new()).is_none());
    }

    #[test]
    fn rng_spreads_over_all_targets() {
        let mut rng = Rng::new(1);
        let mut seen = [0u32; 3];
        for _ in 0..3000 {
            seen[rng.below(3)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    fn options(mode: Mode, targets: Vec<SocketAddr>, tls: Option<Arc<ClientConfig>>) -> LoadOptions {
        LoadOptions {
            mode,
            targets,
            concurrency: 2,
            count: 20,
            duration: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            server_name: "localhost".into(),
            path: "/version".into(),
            resume: false,
            bytes: 3 << 20,
            tls,
            seed: 7,
            cpu: None,
        }
    }

    #[test]
    fn bounds_are_checked() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut o = options(Mode::Connect, vec![a], None);
        o.count = MAX_COUNT + 1;
        assert!(matches!(validate(&o), Err(LoadError::Range { what: "count", .. })));
        let o = options(Mode::Https, vec![a], None);
        assert!(matches!(validate(&o), Err(LoadError::NoTls(_))));
        let o = options(Mode::Connect, vec![], None);
        assert!(matches!(validate(&o), Err(LoadError::NoTargets)));
    }

    /// Every mode against an in-process master on 127.0.0.1.
    #[test]
    fn every_mode_runs_against_a_master() {
        let identity = MasterIdentity::new("m1", ["127.0.0.1".parse().unwrap()]);
        let pki = Pki::generate(&[identity]).unwrap();
        let cert = pki.master("m1").unwrap();
        let server = tls::server_config_from_pem(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).unwrap();
        let client = tls::client_config_from_ca_pem(pki.ca_cert_pem.as_bytes()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let m = rt.block_on(async {
            let mut config = MasterConfig::new("m1", server);
            config.listen = vec!["127.0.0.1:0".parse().unwrap()];
            config.ident_listen = vec!["127.0.0.1:0".parse().unwrap()];
            master::start(config).await.unwrap()
        });
        let (https, ident) = (m.https_addrs()[0], m.ident_addrs()[0]);

        let mut o = options(Mode::Connect, vec![ident], None);
        o.cpu = Some(0);
        let r = run(&o).unwrap();
        assert_eq!((r.ok, r.failed), (20, 0), "{r:?}");
        let r = run(&options(Mode::FirstByte, vec![ident], None)).unwrap();
        assert_eq!((r.ok, r.by_master.get("m1")), (20, Some(&20)), "{r:?}");

        let r = run(&options(Mode::Https, vec![https], Some(client.clone()))).unwrap();
        assert_eq!((r.ok, r.handshakes, r.resumed), (20, 20, 0), "{r:?}");
        let mut o = options(Mode::Https, vec![https], Some(client.clone()));
        o.resume = true;
        let r = run(&o).unwrap();
        assert_eq!(r.ok, 20, "{r:?}");
        assert!(r.resumed > 10, "one master resumes nearly every session: {r:?}");

        let r = run(&options(Mode::Keepalive, vec![https], Some(client.clone()))).unwrap();
        assert_eq!((r.ok, r.handshakes), (20, 2), "one connection per worker: {r:?}");

        let r = run(&options(Mode::Bulk, vec![https], Some(client))).unwrap();
        assert_eq!((r.ok, r.bytes), (1, 3 << 20), "{r:?}");
        assert!(r.throughput_mib_s > 0.0);
        drop(m);
    }
}
