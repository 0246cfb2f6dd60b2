//! The checks at a quiet point (every master up again after an event): `KHA_CONNS` holds
//! exactly the live sockets kha redirected, and each backend's `active` equals its live
//! sockets. The connect loop keeps running, so one reading may catch a socket between its
//! connect and its close: a check passes if any of [`ATTEMPTS`] readings is exact, and a
//! real leak, which persists, fails every one.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::Result;

use super::{
    wait::pause,
    world::{World, backends, conn_map, sockets},
};

const ATTEMPTS: usize = 12;

/// What the last reading found wrong: leaks, then `active` mismatches; both empty when one
/// reading was exact. Also the map size and the live socket count of that reading.
pub struct Quiet {
    pub leaks: Vec<String>,
    pub active: Vec<String>,
    pub map: usize,
    pub live: usize,
}

pub fn check(w: &World, pids: &BTreeSet<u32>, long_pids: &BTreeSet<u32>) -> Result<Quiet> {
    let mut last = Quiet { leaks: Vec::new(), active: Vec::new(), map: 0, live: 0 };
    for _ in 0..ATTEMPTS {
        last = reading(w, pids, long_pids)?;
        if last.leaks.is_empty() && last.active.is_empty() {
            break;
        }
        pause(Duration::from_millis(150))?;
    }
    Ok(last)
}

fn reading(w: &World, pids: &BTreeSet<u32>, long_pids: &BTreeSet<u32>) -> Result<Quiet> {
    let pins = &w.bed.pin_dir;
    let s1 = w.status().map(|s| backends(&s).0).unwrap_or_default();
    let a = conn_map(pins)?;
    let socks = sockets(w.bed.lab.node_netns(), pids)?;
    let b = conn_map(pins)?;
    let s2 = w.status().map(|s| backends(&s).0).unwrap_or_default();
    let live: BTreeSet<u64> = socks.iter().map(|s| s.cookie).collect();
    let mut leaks = Vec::new();
    // In both dumps, so alive while ss ran, had its entry been right.
    for (cookie, be) in a.iter().filter(|(c, _)| b.contains_key(c) && !live.contains(c)) {
        leaks.push(format!("KHA_CONNS entry {cookie:#x} (backend {be}) has no live socket"));
    }
    for s in socks.iter().filter(|s| long_pids.contains(&s.pid) && w.addrs.contains(&s.peer)) {
        if !a.contains_key(&s.cookie) && !b.contains_key(&s.cookie) {
            leaks.push(format!(
                "long-lived socket {:#x} to {} (pid {}) has no KHA_CONNS entry",
                s.cookie, s.peer, s.pid
            ));
        }
    }
    let mut per: BTreeMap<&str, u64> = BTreeMap::new();
    for s in &socks {
        *per.entry(s.peer.as_str()).or_default() += 1;
    }
    let mut active = Vec::new();
    for addr in &w.addrs {
        let (x, y) = (s1.get(addr).map(|b| b.active), s2.get(addr).map(|b| b.active));
        let n = per.get(addr.as_str()).copied().unwrap_or(0);
        if x != y || x != Some(n) {
            active.push(format!("{addr}: active {x:?} then {y:?}, {n} live sockets"));
        }
    }
    Ok(Quiet { leaks, active, map: b.len(), live: live.len() })
}
