//! Spreading probes in time. A cheap PRNG (SplitMix64) per task is enough: the point is only
//! that thousands of nodes started together (or every backend of one node) do not probe in
//! lockstep; nothing here needs to be unpredictable to an attacker.

use std::hash::{BuildHasher, Hash, Hasher};
use std::time::Duration;

/// Each wait between probes is the interval times a factor drawn uniformly from
/// `[1 - JITTER, 1 + JITTER]`, so the mean rate is the configured one. 5 % is enough to keep
/// nodes from drifting into step (each tick moves a node's phase by up to 45 ms at 0.9 s) and
/// keeps the longest wait, which bounds how late a hang is found, at 0.945 s.
pub const JITTER: f64 = 0.05;

pub(crate) struct Rng(u64);

impl Rng {
    /// Seeded from std's per-process random hash keys and `salt` (the backend address), so two
    /// tasks, or two agents on two nodes, get different sequences.
    pub fn seeded(salt: impl Hash) -> Self {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        salt.hash(&mut hasher);
        std::time::SystemTime::now().hash(&mut hasher);
        Rng(hasher.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `base` +- [`JITTER`].
    pub fn jitter(&mut self, base: Duration) -> Duration {
        base.mul_f64(1.0 - JITTER + 2.0 * JITTER * self.unit())
    }

    /// Uniform in `[low, high]` (`low` if `high < low`).
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        low + high.saturating_sub(low).mul_f64(self.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range_and_spreads() {
        let mut rng = Rng::seeded("192.0.2.11:6443");
        let base = Duration::from_secs(2);
        let draws: Vec<Duration> = (0..1000).map(|_| rng.jitter(base)).collect();
        assert!(draws.iter().all(|d| *d >= base.mul_f64(1.0 - JITTER) && *d <= base.mul_f64(1.0 + JITTER)));
        let mean = draws.iter().sum::<Duration>() / 1000;
        assert!(mean > base.mul_f64(0.98) && mean < base.mul_f64(1.02), "{mean:?}");
        let low = draws.iter().filter(|d| **d < base.mul_f64(1.0 - JITTER / 2.0)).count();
        let high = draws.iter().filter(|d| **d > base.mul_f64(1.0 + JITTER / 2.0)).count();
        assert!(low > 150 && high > 150, "{low} {high}");
    }

    #[test]
    fn two_tasks_differ() {
        let mut a = Rng::seeded(1);
        let mut b = Rng::seeded(1);
        assert_ne!((a.next_u64(), a.next_u64()), (b.next_u64(), b.next_u64()));
    }

    #[test]
    fn between_bounds() {
        let mut rng = Rng::seeded(0);
        let (lo, hi) = (Duration::from_millis(50), Duration::from_millis(250));
        assert!((0..1000).map(|_| rng.between(lo, hi)).all(|d| d >= lo && d <= hi));
        assert_eq!(rng.between(hi, lo), hi);
    }
}
