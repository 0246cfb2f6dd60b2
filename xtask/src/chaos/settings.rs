//! kha's settings in the soak and the detection windows derived from them.
//!
//! The soak runs kha with a 1 s probe interval (the default is 0.9 s), a shorter timeout (1 s) and drain
//! (3 s), so that every event kind fits in a minute and a half; the windows are computed from
//! these numbers and the fixed constants of kha's detection (docs/health.md), plus
//! [`MARGIN_MS`] for the sampling (200 ms), `kha status` latency and a loaded 2-core machine.

use serde::Serialize;

/// Added to every window: sampling period, `kha status` latency, scheduling on a busy machine.
pub const MARGIN_MS: u64 = 1500;
/// The longest gap between two ticks, in intervals: kha jitters by ±5 %, this leaves room.
const JITTER: f64 = 1.1;
/// kha's `SLOW_AFTER`: a request unanswered this long (or half the probe timeout, if less)
/// makes an up master suspect, out of the live set (docs/health.md).
const SLOW_MS: u64 = 400;
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
    /// Hung (SIGSTOP, the kernel still ACKs): the next liveness request, up to 1.1 intervals
    /// later, goes unanswered for the slow time.
    pub hang_ms: u64,
    /// Blackholed: the same, nothing answers the next liveness request.
    pub blackhole_ms: u64,
    /// `/readyz` 500: the first not-ready answer, on the next tick, makes it suspect.
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
        let slow = SLOW_MS.min(self.probe_timeout_ms / 2);
        Windows {
            kill_ms: MARGIN_MS,
            hang_ms: gap + slow + MARGIN_MS,
            blackhole_ms: gap + slow + MARGIN_MS,
            not_ready_ms: gap + MARGIN_MS,
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
        // 1.1 s + 0.4 s + 1.5 s.
        assert_eq!(w.hang_ms, 3000);
        assert_eq!(w.blackhole_ms, 3000);
        assert_eq!(w.not_ready_ms, 2600);
        assert_eq!(w.kill_ms, 1500);
        let slow = Settings { probe_interval_ms: 2000, probe_timeout_ms: 3000, ..Settings::soak() }.windows();
        assert!(slow.hang_ms > w.hang_ms && slow.not_ready_ms > w.not_ready_ms);
    }
}
