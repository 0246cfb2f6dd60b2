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
//! Here: the options, their bounds and [`run`]; `blocking.rs` runs `connect` and `first-byte`,
//! `tls_modes.rs` the TLS modes, `worker.rs` what their workers share, `report.rs` what they
//! gather and report.
//!
//! # JSON (`kha-lab load ... --json`)
//! ```text
//! {"mode":"https","targets":["127.0.0.1:6443"],"concurrency":16,"ok":5120,"failed":0,
//!  "errors":{},"elapsed_s":2.0,"rate_per_s":2560.0,"latency_us":{"n":5120,"mean":6150.2,
//!  "p50":5900.1,"p90":7400.0,"p99":9800.3,"max":15000.0},"handshakes":5120,"resumed":1701,
//!  "bytes":0,"throughput_mib_s":0.0,"by_master":{"m1":1700,"m2":1710,"m3":1710}}
//! ```

mod blocking;
mod report;
mod tls_modes;
mod worker;

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ClientConfig;
use serde::{Deserialize, Serialize};

use self::blocking::run_threads;
pub use self::report::{Latency, LoadReport};
use self::tls_modes::run_tls;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::{self, MasterConfig};
    use crate::pki::{MasterIdentity, Pki};
    use crate::tls;

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
