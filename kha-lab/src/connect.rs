//! Raw TCP connects without TLS, to observe what kha does to connect():
//! the errno a client gets, and what getpeername/getsockname report.
//!
//! # JSON output (`kha-lab connect --json`)
//! One object per attempt, then a summary, each on its own line:
//! ```text
//! {"seq":0,"ok":true,"peer":"127.0.0.1:7000","local":"127.0.0.1:41234","master":"m2",
//!  "latency_ms":0.41,"error":null,"detail":null}
//! {"summary":{"count":1,"ok":1,"failed":0,"by_peer":{"127.0.0.1:7000":1},"by_master":{"m2":1},"errors":{}}}
//! ```
//! - `ok`: connect succeeded (and, with `--read-ident`, a name was read).
//! - `peer`/`local`: getpeername/getsockname after connect; `null` when not connected.
//! - `master`: the line read from an identity port (`--read-ident`), else `null`.
//! - `error`: `null` or `"<phase>:<reason>"` with phase `connect` or `ident`
//!   and reason an errno name (`ECONNREFUSED`, `EHOSTUNREACH`, `ETIMEDOUT`
//!   also for our own deadline, `EPERM`, ...) or `EOF` (closed before a line).
//! - summary: `by_peer` counts successful connects per getpeername address;
//!   `by_master` counts identity lines (empty without `--read-ident`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crate::client::write_tally;
use crate::errno::io_error_key;

/// Longest identity line accepted; a master name is short.
const MAX_IDENT: usize = 256;

#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub addr: SocketAddr,
    pub count: u64,
    pub interval: Duration,
    /// Deadline for each attempt (connect plus identity read).
    pub timeout: Duration,
    pub read_ident: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectRecord {
    pub seq: u64,
    pub ok: bool,
    pub peer: Option<String>,
    pub local: Option<String>,
    pub master: Option<String>,
    pub latency_ms: f64,
    pub error: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectSummary {
    pub count: u64,
    pub ok: u64,
    pub failed: u64,
    pub by_peer: BTreeMap<String, u64>,
    pub by_master: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
}

impl ConnectSummary {
    pub fn add(&mut self, r: &ConnectRecord) {
        self.count += 1;
        if r.ok {
            self.ok += 1
        } else {
            self.failed += 1
        }
        if let (true, Some(p)) = (r.ok, &r.peer) {
            *self.by_peer.entry(p.clone()).or_default() += 1;
        }
        if let Some(m) = &r.master {
            *self.by_master.entry(m.clone()).or_default() += 1;
        }
        if let Some(e) = &r.error {
            *self.errors.entry(e.clone()).or_default() += 1;
        }
    }
}

impl fmt::Display for ConnectRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        write!(f, "#{} peer={} local={}", self.seq, or_dash(&self.peer), or_dash(&self.local))?;
        if let Some(m) = &self.master {
            write!(f, " master={m}")?;
        }
        write!(f, " latency={:.2}ms", self.latency_ms)?;
        if let Some(e) = &self.error {
            write!(f, " error={e} ({})", or_dash(&self.detail))?;
        }
        Ok(())
    }
}

impl fmt::Display for ConnectSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "summary: count={} ok={} failed={}", self.count, self.ok, self.failed)?;
        write_tally(f, "by_peer", &self.by_peer)?;
        write_tally(f, "by_master", &self.by_master)?;
        write_tally(f, "errors", &self.errors)
    }
}

/// Runs `opts.count` attempts, calling `on_record` after each.
pub async fn run(opts: &ConnectOptions, mut on_record: impl FnMut(&ConnectRecord)) -> ConnectSummary {
    let mut summary = ConnectSummary::default();
    for seq in 0..opts.count {
        if seq > 0 && !opts.interval.is_zero() {
            tokio::time::sleep(opts.interval).await;
        }
        let record = attempt(opts, seq).await;
        summary.add(&record);
        on_record(&record);
    }
    summary
}

async fn attempt(opts: &ConnectOptions, seq: u64) -> ConnectRecord {
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut record = ConnectRecord {
        seq,
        ok: false,
        peer: None,
        local: None,
        master: None,
        latency_ms: 0.0,
        error: None,
        detail: None,
    };
    let outcome = match timeout_at(deadline, TcpStream::connect(opts.addr)).await {
        Ok(Ok(mut stream)) => {
            record.peer = stream.peer_addr().ok().map(|a| a.to_string());
            record.local = stream.local_addr().ok().map(|a| a.to_string());
            if opts.read_ident {
                read_ident(&mut stream, deadline).await.map(|name| record.master = Some(name))
            } else {
                Ok(())
            }
        }
        Ok(Err(e)) => Err((format!("connect:{}", io_error_key(&e)), e.to_string())),
        Err(_) => Err(("connect:ETIMEDOUT".to_owned(), "connect deadline expired".to_owned())),
    };
    record.latency_ms = start.elapsed().as_secs_f64() * 1000.0;
    match outcome {
        Ok(()) => record.ok = true,
        Err((key, detail)) => {
            record.error = Some(key);
            record.detail = Some(detail);
        }
    }
    record
}

/// Reads the `<name>\n` an identity port sends.
async fn read_ident(stream: &mut TcpStream, deadline: Instant) -> Result<String, (String, String)> {
    let mut line = Vec::new();
    let read = timeout_at(deadline, async {
        let mut chunk = [0u8; 64];
        while !line.contains(&b'\n') && line.len() < MAX_IDENT {
            match stream.read(&mut chunk).await? {
                0 => break,
                n => line.extend_from_slice(&chunk[..n]),
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    match read {
        Err(_) => {
            return Err(("ident:ETIMEDOUT".to_owned(), "no identity line before the deadline".to_owned()));
        }
        Ok(Err(e)) => return Err((format!("ident:{}", io_error_key(&e)), e.to_string())),
        Ok(Ok(())) => {}
    }
    let text = String::from_utf8_lossy(&line);
    match text.split('\n').next().map(str::trim) {
        Some(name) if !name.is_empty() && text.contains('\n') => Ok(name.to_owned()),
        _ => Err(("ident:EOF".to_owned(), format!("no identity line in {:?}", text))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    fn opts(addr: SocketAddr, read_ident: bool) -> ConnectOptions {
        ConnectOptions {
            addr,
            count: 2,
            interval: Duration::ZERO,
            timeout: Duration::from_secs(2),
            read_ident,
        }
    }

    #[tokio::test]
    async fn reads_identity_lines_and_reports_peers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (mut s, _) = listener.accept().await.unwrap();
                s.write_all(b"m7\n").await.unwrap();
            }
        });
        let summary = run(&opts(addr, true), |_| {}).await;
        server.await.unwrap();
        assert_eq!((summary.ok, summary.failed), (2, 0), "{summary:?}");
        assert_eq!(summary.by_master["m7"], 2);
        assert_eq!(summary.by_peer[&addr.to_string()], 2);
    }

    #[tokio::test]
    async fn refused_connects_are_named_by_errno() {
        // Bind then drop to get a loopback port that is (almost surely) closed.
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let mut records = Vec::new();
        let summary = run(&opts(addr, false), |r| records.push(r.clone())).await;
        assert_eq!(summary.errors["connect:ECONNREFUSED"], 2, "{summary:?}");
        assert!(records.iter().all(|r| !r.ok && r.peer.is_none()));
    }
}
