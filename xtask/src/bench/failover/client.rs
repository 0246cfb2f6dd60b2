//! The bench's clients: `kha-lab client --json` processes in the lab's node namespace (the
//! loop and the long-lived connections), each record stamped as its line arrives ([`Rec`]).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use kha_lab::{bed::Bed, client::RequestRecord, netns::KillOnDrop};

use super::{
    plan::{Contender, KEEP_INTERVAL_MS, KEEP_TIMEOUT_MS, LOOP_INTERVAL_MS, LOOP_TIMEOUT_MS, STALL_MS},
    wait::stopped,
};

/// One record of a client, stamped when its line arrived (the request's end).
pub(super) struct Rec {
    pub(super) end: Instant,
    pub(super) r: RequestRecord,
}

impl Rec {
    pub(super) fn start(&self) -> Instant {
        let lat = Duration::from_secs_f64((self.r.latency_ms / 1000.0).max(0.0));
        self.end.checked_sub(lat).unwrap_or(self.end)
    }

    pub(super) fn bad(&self) -> bool {
        !self.r.ok || self.r.latency_ms > STALL_MS
    }
}

/// A running `kha-lab client --json`, its records read as they come.
pub(super) struct Client {
    child: KillOnDrop,
    rx: mpsc::Receiver<Rec>,
    pub(super) recs: Vec<Rec>,
    stderr: Arc<Mutex<String>>,
}

impl Client {
    pub(super) fn spawn(bed: &Bed, ca: &str, c: &Contender, keep_alive: bool, count: u64) -> Result<Client> {
        let mut args: Vec<String> =
            ["client", "--url", "https://localhost:6443/version", "--ca", ca, "--json"]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
        let (interval, timeout, reuse) = if keep_alive {
            (KEEP_INTERVAL_MS, KEEP_TIMEOUT_MS, "--keep-alive")
        } else {
            (LOOP_INTERVAL_MS, LOOP_TIMEOUT_MS, "--new-connection-each")
        };
        args.extend([
            "--connect-addr".into(),
            c.connect.to_string(),
            "--count".into(),
            count.clamp(1, 1_000_000).to_string(),
            "--interval-ms".into(),
            interval.to_string(),
            "--timeout-ms".into(),
            timeout.to_string(),
            reuse.into(),
        ]);
        let mut child =
            KillOnDrop(bed.spawn_lab_tool(c.in_cgroup, &args).context("starting kha-lab client")?);
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
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    return;
                }
                if let Ok(mut s) = keep.lock()
                    && s.len() < 8192
                {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Ok(Client { child, rx, recs: Vec::new(), stderr })
    }

    pub(super) fn pull(&mut self) {
        while let Ok(r) = self.rx.try_recv() {
            self.recs.push(r);
        }
    }

    /// The first record, waiting at most `timeout`; `None` when none came (the client
    /// exited or hangs).
    pub(super) fn first(&mut self, timeout: Duration) -> Result<Option<&Rec>> {
        let deadline = Instant::now() + timeout;
        while self.recs.is_empty() {
            stopped()?;
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(r) => self.recs.push(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() > deadline => break,
                Err(_) => {}
            }
        }
        Ok(self.recs.first())
    }

    pub(super) fn exited(&mut self) -> Option<String> {
        let st = self.child.try_wait().ok().flatten()?;
        let err = self.stderr.lock().map(|s| s.trim().to_owned()).unwrap_or_default();
        Some(format!("{st}: {err}"))
    }
}
