//! The continuous view: a thread that every [`PERIOD`] reads `kha status` (per backend its
//! state and the kernel's `chosen` and `active`), the agent's fds and RSS, and every
//! [`CONNS_EVERY`]th time the size of `KHA_CONNS`. It reads only pins and /proc, so it keeps
//! sampling while the agent is down or being replaced.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::world::{BackendView, backends, conn_map, fds_rss, status};

pub const PERIOD: Duration = Duration::from_millis(200);
const CONNS_EVERY: u32 = 5;

#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Instant,
    /// Empty when `kha status` failed.
    pub backends: BTreeMap<String, BackendView>,
    pub fallback: bool,
    /// Agent pid, open fds, RSS in KiB.
    pub agent: Option<(u32, usize, u64)>,
    pub conns: Option<usize>,
}

pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    /// `pid` holds the running agent's pid (0: none); the caller updates it across restarts.
    pub fn start(kha: PathBuf, pins: PathBuf, pid: Arc<AtomicU32>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let mut v = Vec::new();
            let mut n = 0u32;
            while !flag.load(Ordering::SeqCst) {
                let at = Instant::now();
                let (backends, fallback) = status(&kha, &pins).map(|s| backends(&s)).unwrap_or_default();
                let p = pid.load(Ordering::SeqCst);
                let agent = (p != 0).then(|| fds_rss(p).map(|(f, r)| (p, f, r))).flatten();
                let conns =
                    n.is_multiple_of(CONNS_EVERY).then(|| conn_map(&pins).ok().map(|m| m.len())).flatten();
                n += 1;
                v.push(Sample { at, backends, fallback, agent, conns });
                thread::sleep(PERIOD.saturating_sub(at.elapsed()));
            }
            v
        });
        Sampler { stop, handle }
    }

    pub fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}
