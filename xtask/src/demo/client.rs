//! The demo's clients: `kha-lab client --json` in the node namespace and kha's cgroup
//! ([`crate::lab_client`]), as a watch (long-lived) or as the calls of a loop.

use anyhow::Result;
use kha_lab::bed::Bed;

pub use crate::lab_client::{Client, Rec};

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

/// Starts a client that dials `dial` (`127.0.0.1:6443` or `[::1]:6443`) `count` times.
/// `ca`: the lab's CA, or the real control plane's.
pub fn spawn(bed: &Bed, ca: &str, kind: Kind, dial: &str, count: u64) -> Result<Client> {
    let (interval, timeout, reuse) = match kind {
        Kind::LongLived => (LONG_LIVED_INTERVAL_MS, LONG_LIVED_TIMEOUT_MS, "--keep-alive"),
        Kind::Loop => (LOOP_INTERVAL_MS, LOOP_TIMEOUT_MS, "--new-connection-each"),
    };
    let args: Vec<String> = [
        "client",
        "--url",
        "https://localhost:6443/version",
        "--connect-addr",
        dial,
        "--ca",
        ca,
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
    Client::spawn(bed, true, &args)
}
