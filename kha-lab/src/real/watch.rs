//! `kha-watch`, the client-go watcher, run in the node namespace; what it printed, stamped on
//! arrival; and the figures tests and benches read from it: where its watch sits, how long
//! its watches were broken, how late it saw a write.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use super::RealError;
use crate::netns::{self, KillOnDrop};

type Records = Arc<Mutex<Vec<(Instant, Value)>>>;

/// A running kha-watch (killed on drop) and what it printed.
pub struct Watcher {
    _child: KillOnDrop,
    pub records: Records,
    node_netns: String,
}

impl Watcher {
    /// `kha-watch --kubeconfig KUBECONFIG` in `node_netns` (in `cgroup`, if given, so kha
    /// balances it) for `duration`.
    pub fn spawn(
        bin: &Path,
        node_netns: &str,
        cgroup: Option<&Path>,
        kubeconfig: &Path,
        duration: Duration,
    ) -> Result<Watcher, RealError> {
        let mut c = Command::new(bin);
        c.arg("--kubeconfig").arg(kubeconfig).arg(format!("--duration={}s", duration.as_secs().max(1)));
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = KillOnDrop(netns::spawn_in(node_netns, cgroup, c).map_err(|source| {
            RealError::Spawn { what: "kha-watch".into(), netns: node_netns.into(), source }
        })?);
        let records = Records::default();
        if let Some(out) = child.stdout.take() {
            let sink = records.clone();
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        sink.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), v));
                    }
                }
            });
        }
        Ok(Watcher { _child: child, records, node_netns: node_netns.into() })
    }

    fn recs(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, Value)>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn count(&self, event: &str) -> usize {
        self.recs().iter().filter(|(_, v)| v["event"] == event).count()
    }

    /// Records of `event` that arrived after `after`.
    pub fn count_after(&self, event: &str, after: Instant) -> usize {
        self.recs().iter().filter(|(t, v)| *t > after && v["event"] == event).count()
    }

    /// Lists after `after`, whether made as a list call or (client-go's WatchList, on by
    /// default) as a watch that sends the initial events: what a relist costs the apiserver.
    pub fn relists_after(&self, after: Instant) -> usize {
        self.recs()
            .iter()
            .filter(|(t, v)| {
                *t > after
                    && (v["event"] == "list"
                        || (v["event"] == "watch_start"
                            && v["options"].as_str().is_some_and(|o| o.contains("sendInitialEvents=true"))))
            })
            .count()
    }

    pub fn synced(&self) -> bool {
        self.count("synced") > 0
    }

    /// The real peer (as the kernel has it, not what getpeername reports through kha) of the
    /// newest connection this watcher dialed and has not closed, found by its local address in
    /// `ss`. (client-go dials several connections at start and keeps one for HTTP/2.)
    pub fn current_peer(&self) -> Option<String> {
        let local = {
            let recs = self.recs();
            let closed: Vec<&str> = recs
                .iter()
                .filter(|(_, v)| v["event"] == "conn_close")
                .filter_map(|(_, v)| v["local"].as_str())
                .collect();
            recs.iter()
                .rev()
                .filter(|(_, v)| v["event"] == "dial")
                .filter_map(|(_, v)| v["local"].as_str())
                .find(|l| !closed.contains(l))?
                .to_owned()
        };
        socket_peer(&self.node_netns, &local)
    }

    /// When the first record of `event` after `after` arrived.
    pub fn first_after(&self, event: &str, after: Instant) -> Option<Instant> {
        self.recs().iter().find(|(t, v)| *t > after && v["event"] == event).map(|(t, _)| *t)
    }

    /// When this watcher first saw `object` (`namespace/name`) at resourceVersion `rv` or
    /// later: the moment a write reached it. An informer that relisted meanwhile reports only
    /// the newest version, hence "or later". (Resource versions are etcd revisions: integers.)
    pub fn saw(&self, object: &str, rv: u64) -> Option<Instant> {
        self.recs().iter().find_map(|(t, v)| {
            let seen =
                v["object"] == object && v["rv"].as_str().and_then(|r| r.parse::<u64>().ok()) >= Some(rv);
            seen.then_some(*t)
        })
    }

    /// The longest time between a watch ending after `after` and the next one starting.
    pub fn longest_gap_after(&self, after: Instant) -> Duration {
        let recs = self.recs();
        let from = recs.iter().position(|(t, _)| *t > after).unwrap_or(recs.len());
        longest_gap(&recs[from..])
    }
}

fn longest_gap(recs: &[(Instant, Value)]) -> Duration {
    let mut longest = Duration::ZERO;
    let mut broken: Option<Instant> = None;
    for (t, v) in recs {
        match v["event"].as_str() {
            Some("watch_end" | "watch_stop" | "watch_error") if broken.is_none() => broken = Some(*t),
            Some("watch_start") => {
                if let Some(b) = broken.take() {
                    longest = longest.max(*t - b);
                }
            }
            _ => {}
        }
    }
    longest
}

/// The peer of the established TCP socket with local address `local` in `netns`.
pub fn socket_peer(netns: &str, local: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Htn", "state", "established"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Recv-Q Send-Q Local Peer
        (f.len() >= 4 && f[2] == local).then(|| f[3].to_owned())
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_longest_gap_runs_from_the_first_break_to_the_next_watch() {
        let t0 = Instant::now();
        let at = |ms, v| (t0 + Duration::from_millis(ms), v);
        let recs = vec![
            at(0, json!({"event": "watch_start"})),
            at(100, json!({"event": "watch_end"})),
            at(150, json!({"event": "watch_error"})),
            at(400, json!({"event": "watch_start"})),
            at(500, json!({"event": "watch_end"})),
            at(600, json!({"event": "watch_start"})),
            // Broken at the end: not counted, the watch may still come back.
            at(700, json!({"event": "watch_stop"})),
        ];
        assert_eq!(longest_gap(&recs), Duration::from_millis(300));
        assert_eq!(longest_gap(&recs[..1]), Duration::ZERO);
    }
}
