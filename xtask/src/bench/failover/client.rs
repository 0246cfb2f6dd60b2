//! The bench's clients: `kha-lab client --json` processes in the lab's node namespace (the
//! loop and the long-lived connections), records stamped as they arrive ([`crate::lab_client`]).

use anyhow::Result;
use kha_lab::bed::Bed;

pub(super) use crate::lab_client::{Client, Rec};

use super::plan::{
    Contender, KEEP_INTERVAL_MS, KEEP_TIMEOUT_MS, LOOP_INTERVAL_MS, LOOP_TIMEOUT_MS, STALL_MS,
};

/// A request that failed or stalled.
pub(super) fn bad(r: &Rec) -> bool {
    !r.r.ok || r.r.latency_ms > STALL_MS
}

pub(super) fn spawn(bed: &Bed, ca: &str, c: &Contender, keep_alive: bool, count: u64) -> Result<Client> {
    let mut args: Vec<String> = ["client", "--url", "https://localhost:6443/version", "--ca", ca, "--json"]
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
    Client::spawn(bed, c.in_cgroup, &args)
}
