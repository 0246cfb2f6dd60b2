//! `bench failover --real`, last phase: a rolling restart of every kube-apiserver (SIGTERM, the
//! graceful termination a kubelet or systemd gives it; started again and ready before the next),
//! once with no shutdown delay (kubeadm's default) and once with 15 s, while each contender
//! carries the loop and its watchers. What a cluster upgrade costs each node's clients.

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use super::{
    client::{self, bad},
    outcome::Watch,
    plan::{LOOP_INTERVAL_MS, contenders},
    wait::stopped,
    world::World,
};

/// The delays measured, in this order; each round restarts the apiservers with the next one.
pub(super) const DELAYS_S: [u64; 2] = [0, 15];

/// One contender over one rolling restart.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Rolling {
    pub contender: String,
    /// `--shutdown-delay-duration` of the apiservers terminated.
    pub shutdown_delay_s: u64,
    /// Length of the restart, from the first SIGTERM to the last apiserver ready.
    pub phase_s: f64,
    /// Loop requests that ended during the restart.
    pub requests: u64,
    pub failed: u64,
    pub stalled: u64,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub watch: Watch,
    /// The longest time one of the contender's watchers had no watch open.
    pub longest_gap_s: f64,
    /// Apiservers that had not exited a minute after SIGTERM (plus their delay): killed.
    #[serde(default)]
    pub not_exited: Vec<String>,
}

/// Restarts every apiserver in turn once per delay of [`DELAYS_S`]; the apiservers running
/// now were started with no delay.
pub(super) fn rolling_restarts(w: &mut World, settle: Duration) -> Result<Vec<Rolling>> {
    let mut out = Vec::new();
    for (i, delay) in DELAYS_S.iter().enumerate() {
        let next = Duration::from_secs(DELAYS_S.get(i + 1).copied().unwrap_or(0));
        eprintln!("xtask: bench failover: rolling restart, {delay} s shutdown delay");
        let t = Instant::now();
        let rs = restart_all(w, *delay, next, settle)?;
        for r in &rs {
            eprintln!(
                "  {:8} {} requests, failed {} stalled {} | longest write delay {} ({} writes), {} relists, longest watch gap {:.2} s",
                r.contender,
                r.requests,
                r.failed,
                r.stalled,
                r.watch.delay_s.map_or("never arrived".into(), |d| format!("{d:.2} s")),
                r.watch.writes,
                r.watch.relists,
                r.longest_gap_s
            );
        }
        eprintln!("xtask: bench failover: took {:.0} s", t.elapsed().as_secs_f64());
        out.extend(rs);
    }
    Ok(out)
}

fn restart_all(w: &mut World, delay: u64, next: Duration, settle: Duration) -> Result<Vec<Rolling>> {
    w.settle(settle)?;
    let cs = contenders();
    // Bounded: three restarts, each its delay, its drain and half a minute to start.
    let bound = 3 * (Duration::from_secs(delay + 30) + kha_lab::real::SHUTDOWN_DRAIN_MAX);
    let count = bound.as_millis() as u64 / LOOP_INTERVAL_MS;
    let mut loops = Vec::new();
    for c in &cs {
        loops.push(client::spawn(&w.bed, &w.ca, c, false, count)?);
    }
    // Writes go through whichever master is not being restarted.
    let masters = w.masters.clone();
    let writer = w.real.as_ref().context("the real control plane")?.writer(&w.bed, &masters)?;
    thread::sleep(Duration::from_secs(1));
    let t0 = Instant::now();
    let mut hung = Vec::new();
    for m in &masters {
        stopped()?;
        let real = w.real_mut()?;
        // An apiserver that does not finish its graceful termination is killed (the error
        // drops it) and reported: it is what the cluster's clients got.
        // How long it took says who kept it: its watches behind a proxy hold it until its
        // request timeout (`SHUTDOWN_DRAIN_MAX`).
        match real.cp.terminate_apiserver(m) {
            Ok(took) => {
                eprintln!("xtask: bench failover: {m}: exited {:.1} s after SIGTERM", took.as_secs_f64())
            }
            Err(e) => {
                eprintln!("xtask: bench failover: {m}: {}", e.to_string().lines().next().unwrap_or_default());
                hung.push(m.clone());
            }
        }
        real.cp.start_apiserver(m, next)?;
    }
    let t_end = Instant::now();
    // What was written last must have time to arrive.
    thread::sleep(Duration::from_secs(3));
    for l in &mut loops {
        l.pull();
    }
    let real = w.real_mut()?;
    let writes = writer.writes();
    let mut out = Vec::new();
    for (c, l) in cs.iter().zip(&loops) {
        let during: Vec<_> = l.recs.iter().filter(|r| r.end >= t0 && r.end <= t_end).collect();
        let mut errors = std::collections::BTreeMap::new();
        for r in during.iter().filter(|r| !r.r.ok) {
            *errors.entry(r.r.error.clone().unwrap_or_else(|| "?".into())).or_default() += 1;
        }
        out.push(Rolling {
            contender: c.id.clone(),
            shutdown_delay_s: delay,
            phase_s: (t_end - t0).as_secs_f64(),
            requests: during.len() as u64,
            failed: during.iter().filter(|r| !r.r.ok).count() as u64,
            stalled: during.iter().filter(|r| r.r.ok && bad(r)).count() as u64,
            errors,
            watch: real.figures(c, &writes, t0, t_end),
            longest_gap_s: real.longest_gap(c, t0).as_secs_f64(),
            not_exited: hung.clone(),
        });
    }
    Ok(out)
}
