//! What every worker draws from: the seeded [`Rng`] that picks a target for each operation
//! and the shared [`Budget`] (count and deadline) that says when to stop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// xorshift64*: cheap, seeded, good enough to spread connects.
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n.max(1)
    }
}

/// Shared stop conditions: a budget of operations and a deadline.
pub(super) struct Budget {
    pub(super) issued: AtomicU64,
    pub(super) count: u64,
    pub(super) deadline: Instant,
}

impl Budget {
    /// Claims one operation, or says stop.
    pub(super) fn take(&self) -> bool {
        Instant::now() < self.deadline && self.issued.fetch_add(1, Ordering::Relaxed) < self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_spreads_over_all_targets() {
        let mut rng = Rng::new(1);
        let mut seen = [0u32; 3];
        for _ in 0..3000 {
            seen[rng.below(3)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
