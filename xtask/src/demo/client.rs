//! The demo's clients: `kha-lab client --json` in the node namespace and kha's cgroup, its
//! records read as they come and stamped on arrival, so that the demo can say when each call
//! ended. Each is killed when dropped, also on Ctrl-C or an error.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use kha_lab::{bed::Bed, client::RequestRecord, netns::KillOnDrop};

/// One request every 200 ms on one connection: what a watch looks like to a load balancer.
pub const LONG_LIVED_INTERVAL_MS: u64 = 200;
/// A new TCP + TLS connection every 100 ms: the calls an operator sees fail or not.
pub const LOOP_INTERVAL_MS: u64 = 100;
/// A loop call that takes longer than this fails.
const LOOP_TIMEOUT_MS: u64 = 2000;
/// Longer than the demo: a long-lived connection is only ended by kha or TCP, as a watch is.
const LONG_LIVED_TIMEOUT_MS: u64 = 120_000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    LongLived,
    Loop,
}

/// One record, stamped when its line arrived (the end of the request).
pub struct Rec {
    pub end: Instant,
    pub r: RequestRecord,
}

impl Rec {
    pub fn start(&self) -> Instant {
        let lat = Duration::from_secs_f64((self.r.latency_ms / 1000.0).max(0.0));
        self.end.checked_sub(lat).unwrap_or(self.end)
    }

    pub fn master(&self) -> Option<&str> {
        self.r.master.as_deref()
    }
}

pub struct Client {
    child: KillOnDrop,
    rx: mpsc::Receiver<Rec>,
    pub recs: Vec<Rec>,
    /// The client's stdout ended: it exited.
    pub closed: bool,
    stderr: Arc<Mutex<String>>,
}

impl Client {
    /// Starts a client that dials `dial` (`127.0.0.1:6443` or `[::1]:6443`) `count` times.
    pub fn spawn(bed: &Bed, kind: Kind, dial: &str, count: u64) -> Result<Client> {
        let (interval, timeout, reuse) = match kind {
            Kind::LongLived => (LONG_LIVED_INTERVAL_MS, LONG_LIVED_TIMEOUT_MS, "--keep-alive"),
            Kind::Loop => (LOOP_INTERVAL_MS, LOOP_TIMEOUT_MS, "--new-connection-each"),
        };
        let ca = bed.pki.ca_cert.display().to_string();
        let args: Vec<String> = [
            "client",
            "--url",
            "https://localhost:6443/version",
            "--connect-addr",
            dial,
            "--ca",
            &ca,
            "--count",
            &count.clamp(1, 100_000).to_string(),
            "--interval-ms",
            &interval.to_string(),
            "--timeout-ms",
            &timeout.to_string(),
            reuse,
            "--json",
        ]
        .map(String::from)
        .to_vec();
        let mut child = KillOnDrop(bed.spawn_lab_tool(true, &args).context("starting kha-lab client")?);
        let stdout = child.stdout.take().context("client stdout")?;
        let stderr_pipe = child.stderr.take().context("client stderr")?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let end = Instant::now();
                // The summary line is no record; it does not parse as one.
                if let Ok(r) = serde_json::from_str::<RequestRecord>(&line)
                    && tx.send(Rec { end, r }).is_err()
                {
                    return;
                }
            }
        });
        // Drained so that the client never blocks on a full pipe; the start kept for errors.
        let stderr = Arc::new(Mutex::new(String::new()));
        let keep = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut pipe = stderr_pipe;
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                if let Ok(mut s) = keep.lock()
                    && s.len() < 4096
                {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Ok(Client { child, rx, recs: Vec::new(), closed: false, stderr })
    }

    /// Takes in the records that arrived; returns the index of the first new one.
    pub fn pull(&mut self) -> usize {
        let from = self.recs.len();
        loop {
            match self.rx.try_recv() {
                Ok(r) => self.recs.push(r),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.closed = true;
                    break;
                }
            }
        }
        from
    }

    /// The first record, waiting at most `timeout`; `None` when none came.
    pub fn first(&mut self, timeout: Duration) -> Result<Option<&Rec>> {
        let deadline = Instant::now() + timeout;
        while self.recs.is_empty() && !self.closed && Instant::now() < deadline {
            super::stopped()?;
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => self.recs.push(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => self.closed = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        Ok(self.recs.first())
    }

    /// Why the client ended, when it did.
    pub fn exited(&mut self) -> Option<String> {
        let st = self.child.try_wait().ok().flatten()?;
        let err = self.stderr.lock().map(|s| s.trim().to_owned()).unwrap_or_default();
        Some(format!("{st}: {err}"))
    }
}
