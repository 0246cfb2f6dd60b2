//! `kha-lab client --json` processes in the lab's node namespace, as the demo and the failover
//! bench run them: each record is stamped as its line arrives (the client reports latencies,
//! not wall times), stderr is drained so the client never blocks on a full pipe, and the
//! process is killed when dropped, also on Ctrl-C or an error.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use kha_lab::{bed::Bed, client::RequestRecord, netns::KillOnDrop};

/// The start of stderr kept for error messages.
const STDERR_KEPT: usize = 8192;

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
    /// Runs `kha-lab ARGS` (`client ... --json`) in the node namespace, in kha's cgroup when
    /// `in_cgroup`.
    pub fn spawn(bed: &Bed, in_cgroup: bool, args: &[String]) -> Result<Client> {
        let mut child = KillOnDrop(bed.spawn_lab_tool(in_cgroup, args).context("starting kha-lab client")?);
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
        let stderr = Arc::new(Mutex::new(String::new()));
        let keep = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut pipe = stderr_pipe;
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                if let Ok(mut s) = keep.lock()
                    && s.len() < STDERR_KEPT
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

    /// The first record, waiting at most `timeout`; `None` when none came (the client exited
    /// or hangs). `stopped` ends the wait early with its error (Ctrl-C).
    pub fn first(&mut self, timeout: Duration, stopped: impl Fn() -> Result<()>) -> Result<Option<&Rec>> {
        let deadline = Instant::now() + timeout;
        while self.recs.is_empty() && !self.closed && Instant::now() < deadline {
            stopped()?;
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => self.recs.push(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => self.closed = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
        Ok(self.recs.first())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Why the client ended, when it did.
    pub fn exited(&mut self) -> Option<String> {
        let st = self.child.try_wait().ok().flatten()?;
        let err = self.stderr.lock().map(|s| s.trim().to_owned()).unwrap_or_default();
        Some(format!("{st}: {err}"))
    }
}
