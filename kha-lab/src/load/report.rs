//! What a load run reports: [`LoadReport`] (the JSON of `kha-lab load --json`) with its
//! [`Latency`] percentiles, and the [`Tally`] each worker gathers on the way and that is
//! merged into it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Latency summary in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub n: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Nearest-rank percentiles of samples given in nanoseconds.
    pub fn from_nanos(mut samples: Vec<u64>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        let at = |p: f64| {
            let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
            samples[rank - 1] as f64 / 1000.0
        };
        let mean = samples.iter().map(|&s| s as f64).sum::<f64>() / n as f64 / 1000.0;
        Some(Latency { n: n as u64, mean, p50: at(0.50), p90: at(0.90), p99: at(0.99), max: at(1.0) })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub mode: String,
    pub targets: Vec<String>,
    pub concurrency: usize,
    pub ok: u64,
    pub failed: u64,
    /// `<phase>:<reason>` -> count, as in `kha-lab client`.
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Successful operations per second.
    pub rate_per_s: f64,
    pub latency_us: Option<Latency>,
    /// TLS handshakes made, and how many of them resumed a session.
    pub handshakes: u64,
    pub resumed: u64,
    /// Body bytes received (`bulk`) and the rate they came at.
    pub bytes: u64,
    pub throughput_mib_s: f64,
    /// Answers per master (`X-Kha-Lab-Master`, or the identity line).
    pub by_master: BTreeMap<String, u64>,
}

/// What one worker gathered.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) samples: Vec<u64>,
    pub(super) ok: u64,
    pub(super) failed: u64,
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) handshakes: u64,
    pub(super) resumed: u64,
    pub(super) bytes: u64,
    pub(super) by_master: BTreeMap<String, u64>,
}

impl Tally {
    pub(super) fn fail(&mut self, key: String) {
        self.failed += 1;
        *self.errors.entry(key).or_default() += 1;
    }

    pub(super) fn answered_by(&mut self, master: Option<String>) {
        if let Some(m) = master {
            *self.by_master.entry(m).or_default() += 1;
        }
    }

    pub(super) fn merge(&mut self, other: Tally) {
        self.samples.extend(other.samples);
        self.ok += other.ok;
        self.failed += other.failed;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.handshakes += other.handshakes;
        self.resumed += other.resumed;
        self.bytes += other.bytes;
        for (k, v) in other.by_master {
            *self.by_master.entry(k).or_default() += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::from_nanos((1..=100).map(|i| i * 1000).collect()).unwrap();
        assert_eq!((l.n, l.p50, l.p90, l.p99, l.max), (100, 50.0, 90.0, 99.0, 100.0));
        assert_eq!(l.mean, 50.5);
        assert_eq!(Latency::from_nanos(vec![7000]).unwrap().p99, 7.0);
        assert!(Latency::from_nanos(Vec::new()).is_none());
    }
}
