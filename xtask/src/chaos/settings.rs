//! kha's settings in the soak and the detection windows derived from them.
//!
//! The soak runs kha with probes faster than its defaults (1 s interval and timeout, 3 s
//! drain) so that every event kind fits in a minute and a half; the windows are computed from
//! these numbers and the fixed constants of kha's lost-connection path (docs/health.md), plus
//! [`MARGIN_MS`] for the sampling (200 ms), `kha status` latency and a loaded 2-core machine.

use serde::Serialize;

/// Added to every window: sampling period, `kha status` latency, scheduling on a busy machine.
pub const MARGIN_MS: u64 = 1500;
/// Probe interval jitter (±20 %): the longest gap between two probes is 1.2 intervals.
const JITTER: f64 = 1.2;
/// TCP keepalive on the probe connection (idle 1 s, interval 1 s, 2 probes): measured 1.1 to
/// 2.0 s until an idle connection to a silent master is lost (docs/health.md).
const KEEPALIVE_MS: u64 = 2000;
/// `TCP_USER_TIMEOUT` of the probe connection: data unacknowledged this long loses it.
const USER_TIMEOUT_MS: u64 = 1500;
/// A SIGHUP is read, the config parsed and the maps written well within this.
const RELOAD_MS: u64 = 1000;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Settings {
    pub probe_interval_ms: u64,
    pub probe_timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    pub drain_s: u64,
}

/// How long after a fault begins kha may still send new connections to the master, per
/// fault; after it, one more is a violation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Windows {
    /// Killed: the probe connection is reset at once (suspect, out of the live set), and the
    /// kernel marks the master suspect on the first refused connect.
    pub kill_ms: u64,
    /// Hung (SIGSTOP, the kernel still ACKs): `fall` probes must time out, each started up
    /// to 1.2 intervals after the one before.
    pub hang_ms: u64,
    /// Blackholed: whichever comes last of the keepalive loss, a probe's data unacknowledged
    /// for `TCP_USER_TIMEOUT`, and `fall` timed-out probes (an upper bound on the first).
    pub blackhole_ms: u64,
    /// `/readyz` 500: `fall` failed probes (each answered at once) make it draining.
    pub not_ready_ms: u64,
    /// Removed from the config: the SIGHUP applied.
    pub removed_ms: u64,
    /// `--drain-time`: a draining or removed master keeps its sockets this long.
    pub drain_ms: u64,
    pub margin_ms: u64,
}

impl Settings {
    pub fn soak() -> Settings {
        Settings { probe_interval_ms: 1000, probe_timeout_ms: 1000, rise: 2, fall: 2, drain_s: 3 }
    }

    /// The agent's flags for them.
    pub fn args(&self) -> Vec<String> {
        [
            ("--probe-interval-ms", self.probe_interval_ms.to_string()),
            ("--probe-timeout-ms", self.probe_timeout_ms.to_string()),
            ("--rise", self.rise.to_string()),
            ("--fall", self.fall.to_string()),
            ("--drain-time", self.drain_s.to_string()),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f.to_string(), v])
        .collect()
    }

    pub fn windows(&self) -> Windows {
        let gap = (self.probe_interval_ms as f64 * JITTER) as u64;
        let fall = u64::from(self.fall);
        let probes_time_out = fall * (gap + self.probe_timeout_ms);
        Windows {
            kill_ms: MARGIN_MS,
            hang_ms: probes_time_out + MARGIN_MS,
            blackhole_ms: KEEPALIVE_MS.max(gap + USER_TIMEOUT_MS).max(probes_time_out) + MARGIN_MS,
            not_ready_ms: fall * gap + MARGIN_MS,
            removed_ms: RELOAD_MS + MARGIN_MS,
            drain_ms: self.drain_s * 1000,
            margin_ms: MARGIN_MS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_the_settings() {
        let w = Settings::soak().windows();
        // fall 2 × (1.2 s + 1 s) + 1.5 s.
        assert_eq!(w.hang_ms, 5900);
        assert_eq!(w.blackhole_ms, 5900);
        assert_eq!(w.not_ready_ms, 3900);
        assert_eq!(w.kill_ms, 1500);
        let slow = Settings { probe_interval_ms: 2000, probe_timeout_ms: 3000, ..Settings::soak() }.windows();
        assert!(slow.hang_ms > w.hang_ms && slow.not_ready_ms > w.not_ready_ms);
    }
}
