//! What the chaos soak does, decided up front from `--seed`: the events, their targets and
//! their hold times. Nothing here looks at the clock or the lab, so a seed names one sequence
//! and a failing run can be replayed with the same `--seed` (the timing of the machine still
//! differs between runs; the sequence does not).

use serde::Serialize;

use super::settings::Windows;

/// splitmix64: small, seedable, and the same on every machine (no dependency for it).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is irrelevant at these sizes).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo) + 1)
    }
}

/// One event. Master indices are into the lab's masters (0-based).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Event {
    /// SIGKILL the master, restart it after `hold_ms`.
    Kill { master: usize, hold_ms: u64 },
    /// SIGSTOP for `hold_ms` (longer than the hang detection window), then SIGCONT.
    Hang { master: usize, hold_ms: u64 },
    /// The master's link down for `hold_ms`, then up.
    Blackhole { master: usize, hold_ms: u64 },
    /// SIGSTOP shorter than 2 s: kha must not terminate a single socket for it.
    ShortPause { master: usize, pause_ms: u64 },
    /// `/readyz` 500 for `hold_ms`, past the drain time: the master drains, then its sockets go.
    NotReady { master: usize, hold_ms: u64 },
    /// `/readyz` 500 for `bad_ms`, then 200 for `good_ms`, `flaps` times.
    ReadyzFlap { master: usize, flaps: u32, bad_ms: u64, good_ms: u64 },
    /// Every master hung (`hang`) or not ready at once for `hold_ms`: nothing may be
    /// terminated, there is nowhere better to go.
    AllDown { hang: bool, hold_ms: u64 },
    /// SIGKILL the agent, start it again after `down_ms`.
    AgentKill { down_ms: u64 },
    /// SIGHUP with the master removed from the config, SIGHUP with it back after `hold_ms`.
    SighupRemove { master: usize, hold_ms: u64 },
    /// SIGHUP with another balancing policy.
    SighupPolicy { policy: String },
    /// SIGTERM and start again: the new agent replaces the programs under the pinned links
    /// (the same build: what is exercised is the replacement, not a new version).
    Upgrade,
}

/// Every kind, in a fixed order; `--quick` runs each once.
pub const KINDS: [&str; 11] = [
    "kill",
    "hang",
    "blackhole",
    "short-pause",
    "not-ready",
    "readyz-flap",
    "all-down",
    "agent-kill",
    "sighup-remove",
    "sighup-policy",
    "upgrade",
];

pub const POLICIES: [&str; 4] = ["least-connections", "round-robin", "random", "p2c"];

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Kill { .. } => "kill",
            Event::Hang { .. } => "hang",
            Event::Blackhole { .. } => "blackhole",
            Event::ShortPause { .. } => "short-pause",
            Event::NotReady { .. } => "not-ready",
            Event::ReadyzFlap { .. } => "readyz-flap",
            Event::AllDown { .. } => "all-down",
            Event::AgentKill { .. } => "agent-kill",
            Event::SighupRemove { .. } => "sighup-remove",
            Event::SighupPolicy { .. } => "sighup-policy",
            Event::Upgrade => "upgrade",
        }
    }

    /// The master it is done to, if one.
    pub fn master(&self) -> Option<usize> {
        match self {
            Event::Kill { master, .. }
            | Event::Hang { master, .. }
            | Event::Blackhole { master, .. }
            | Event::ShortPause { master, .. }
            | Event::NotReady { master, .. }
            | Event::ReadyzFlap { master, .. }
            | Event::SighupRemove { master, .. } => Some(*master),
            _ => None,
        }
    }

    /// Parameters for the report, e.g. `hold 6.2 s`.
    pub fn params(&self) -> String {
        let s = |ms: &u64| format!("{:.1} s", *ms as f64 / 1000.0);
        match self {
            Event::Kill { hold_ms, .. }
            | Event::Hang { hold_ms, .. }
            | Event::Blackhole { hold_ms, .. }
            | Event::NotReady { hold_ms, .. }
            | Event::SighupRemove { hold_ms, .. } => format!("hold {}", s(hold_ms)),
            Event::ShortPause { pause_ms, .. } => format!("pause {}", s(pause_ms)),
            Event::ReadyzFlap { flaps, bad_ms, good_ms, .. } => {
                format!("{flaps} × (500 for {}, 200 for {})", s(bad_ms), s(good_ms))
            }
            Event::AllDown { hang, hold_ms } => {
                format!("{} for {}", if *hang { "all hung" } else { "all /readyz 500" }, s(hold_ms))
            }
            Event::AgentKill { down_ms } => format!("down {}", s(down_ms)),
            Event::SighupPolicy { policy } => format!("policy {policy}"),
            Event::Upgrade => "same build".into(),
        }
    }
}

/// Makes events of each kind with random targets and hold times. Hold times of the faults
/// whose detection is checked exceed their window, so that the check has a stretch to judge.
pub struct Planner {
    rng: Rng,
    masters: usize,
    w: Windows,
    policy: usize,
}

impl Planner {
    pub fn new(seed: u64, masters: usize, w: Windows) -> Planner {
        Planner { rng: Rng::new(seed), masters, w, policy: 0 }
    }

    /// One of each kind, in a random order.
    pub fn round(&mut self) -> Vec<Event> {
        let mut kinds: Vec<&str> = KINDS.to_vec();
        // Fisher-Yates.
        for i in (1..kinds.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            kinds.swap(i, j);
        }
        kinds.into_iter().map(|k| self.event(k)).collect()
    }

    /// A random kind; agent restarts and upgrades a third as often as the others, so that
    /// some agents live long enough for their fds and memory to be judged.
    pub fn any(&mut self) -> Event {
        let weight = |k: &str| if matches!(k, "agent-kill" | "upgrade") { 1 } else { 3 };
        let total: u64 = KINDS.iter().map(|k| weight(k)).sum();
        let mut pick = self.rng.below(total);
        let k = KINDS
            .iter()
            .find(|k| {
                let w = weight(k);
                if pick < w {
                    return true;
                }
                pick -= w;
                false
            })
            .copied()
            .unwrap_or("upgrade");
        self.event(k)
    }

    fn event(&mut self, kind: &str) -> Event {
        let master = self.rng.below(self.masters as u64) as usize;
        let w = self.w;
        let r = &mut self.rng;
        match kind {
            "kill" => Event::Kill { master, hold_ms: w.kill_ms + r.range(500, 3000) },
            "hang" => Event::Hang { master, hold_ms: w.hang_ms + r.range(1000, 3000) },
            "blackhole" => Event::Blackhole { master, hold_ms: w.blackhole_ms + r.range(1000, 3000) },
            "short-pause" => Event::ShortPause { master, pause_ms: r.range(300, 1800) },
            "not-ready" => {
                Event::NotReady { master, hold_ms: w.not_ready_ms + w.drain_ms + r.range(1000, 2000) }
            }
            "readyz-flap" => Event::ReadyzFlap {
                master,
                flaps: r.range(2, 3) as u32,
                bad_ms: r.range(200, 800),
                good_ms: r.range(1500, 2500),
            },
            "all-down" => Event::AllDown { hang: r.below(2) == 0, hold_ms: r.range(4000, 7000) },
            "agent-kill" => Event::AgentKill { down_ms: r.range(0, 2000) },
            "sighup-remove" => Event::SighupRemove { master, hold_ms: w.drain_ms + r.range(1000, 3000) },
            "sighup-policy" => {
                self.policy =
                    (self.policy + 1 + r.below(POLICIES.len() as u64 - 1) as usize) % POLICIES.len();
                Event::SighupPolicy { policy: POLICIES[self.policy].into() }
            }
            _ => Event::Upgrade,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planner(seed: u64) -> Planner {
        Planner::new(seed, 3, super::super::settings::Settings::soak().windows())
    }

    #[test]
    fn a_seed_names_one_sequence() {
        let (mut a, mut b) = (planner(7), planner(7));
        assert_eq!(a.round(), b.round());
        assert_eq!(
            (0..50).map(|_| a.any()).collect::<Vec<_>>(),
            (0..50).map(|_| b.any()).collect::<Vec<_>>()
        );
        assert_ne!(planner(7).round(), planner(8).round());
    }

    #[test]
    fn a_round_has_every_kind_once_and_faults_outlast_their_window() {
        for seed in 0..200 {
            let mut p = planner(seed);
            let w = p.w;
            let round = p.round();
            let mut kinds: Vec<&str> = round.iter().map(Event::kind).collect();
            kinds.sort();
            let mut all = KINDS.to_vec();
            all.sort();
            assert_eq!(kinds, all, "seed {seed}");
            for e in &round {
                match e {
                    Event::Hang { hold_ms, .. } => assert!(*hold_ms > w.hang_ms),
                    Event::Blackhole { hold_ms, .. } => assert!(*hold_ms > w.blackhole_ms),
                    Event::Kill { hold_ms, .. } => assert!(*hold_ms > w.kill_ms),
                    Event::NotReady { hold_ms, .. } => assert!(*hold_ms > w.not_ready_ms + w.drain_ms),
                    Event::ShortPause { pause_ms, .. } => assert!(*pause_ms < 2000),
                    Event::SighupPolicy { policy } => {
                        assert_ne!(policy, POLICIES[0], "seed {seed}: no change")
                    }
                    _ => {}
                }
                assert!(e.master().is_none_or(|m| m < 3));
            }
        }
    }

    #[test]
    fn policy_changes_always_change_the_policy() {
        let mut p = planner(3);
        let mut last = POLICIES[0].to_string();
        for _ in 0..100 {
            if let Event::SighupPolicy { policy } = p.event("sighup-policy") {
                assert_ne!(policy, last);
                last = policy;
            }
        }
    }
}
