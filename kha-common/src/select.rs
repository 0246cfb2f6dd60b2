//! Backend choice, shared with the kernel so the host tests the code the kernel runs.

/// Maps a random u32 onto a slot in `1..=count` without a division (Lemire's multiply-shift);
/// the bias is below `count / 2^32`. `count` must be non-zero (the caller rejects empty sets).
#[inline(always)]
pub fn random_slot(rand: u32, count: u16) -> u16 {
    (((rand as u64) * (count as u64)) >> 32) as u16 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_in_range_at_the_extremes() {
        for count in [1u16, 2, 3, 255, u16::MAX] {
            assert_eq!(random_slot(0, count), 1);
            assert_eq!(random_slot(u32::MAX, count), count);
        }
    }

    #[test]
    fn spreads_evenly_over_the_slots() {
        // A full sweep of evenly spaced inputs must land in every slot equally (±1).
        let count = 3u16;
        let mut hits = [0u32; 4];
        let n = 30_000u32;
        let step = u32::MAX / n;
        for i in 0..n {
            hits[random_slot(i * step, count) as usize] += 1;
        }
        assert_eq!(hits[0], 0);
        for h in &hits[1..] {
            assert!(h.abs_diff(n / 3) <= 1, "uneven spread {hits:?}");
        }
    }
}
