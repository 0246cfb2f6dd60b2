//! Backend choice, shared with the kernel so the host tests the code the kernel runs.
//!
//! Every policy avoids backends marked suspect (a connect to them just failed) while any other
//! is left, and never refuses because of suspicion alone: if all are suspect, one is used,
//! since a wrong suspicion must not cut the node off.
//!
//! Written for the verifier: it walks every iteration of a bounded loop along every branch, so
//! a scan with a few data-dependent branches per slot exceeds its budget after a handful of
//! slots. Scans therefore rank slots by a branch-free cost (smaller is better; a suspect
//! backend costs more than any other) and keep the minimum with mask arithmetic; the only
//! branches are loop control and map misses. At most [`MAX_SCAN`] slots are looked at: with
//! up to 16 backends (every real control plane) a scan is exact; with more, it covers 16
//! consecutive slots from a random one.

use crate::maps::{POLICY_LEAST_CONN, POLICY_P2C, POLICY_ROUND_ROBIN};

/// Slots one choice looks at, at most.
pub const MAX_SCAN: u16 = 16;
const SUSPECT_COST: u64 = 1 << 62;

/// Maps a random u32 onto a slot in `1..=count` without a division (Lemire's multiply-shift);
/// the bias is below `count / 2^32`. `count` must be non-zero (the caller rejects empty sets).
#[inline(always)]
pub fn random_slot(rand: u32, count: u16) -> u16 {
    (((rand as u64) * (count as u64)) >> 32) as u16 + 1
}

/// What a policy knows of the backend in one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub backend_id: u32,
    /// Connections in flight, below 2^32 (see `BackendStats::active_count`).
    pub active: u64,
    pub srtt_us: u32,
    /// 1 if a failed connect marked the backend suspect, else 0 (a number, not a bool, so
    /// costs can be computed without branches).
    pub suspect: u64,
}

/// Read access to a frontend's live slots, `1..=count`. `None` means the slot or its backend
/// is missing.
pub trait SlotView {
    fn candidate(&self, index: u16) -> Option<Candidate>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    pub candidate: Candidate,
    /// A suspect backend was passed over.
    pub skipped_suspect: bool,
    /// Every backend looked at was suspect; this one was used anyway.
    pub all_suspect: bool,
}

/// The random inputs of one choice: two independent u32s and the frontend's round-robin
/// position (already advanced for this connect).
#[derive(Clone, Copy, Debug)]
pub struct Dice {
    pub a: u32,
    pub b: u32,
    pub rr: u32,
}

/// All ones if `a < b`, else zero; both below 2^63. No branch: BPF has no set-on-condition.
#[inline(always)]
fn lt_mask(a: u64, b: u64) -> u64 {
    opaque(0u64.wrapping_sub(a.wrapping_sub(b) >> 63))
}

#[inline(always)]
fn select(mask: u64, a: u64, b: u64) -> u64 {
    (a & mask) | (b & !mask)
}

/// 1 if `x != 0`, else 0, without a branch.
#[inline(always)]
pub fn nonzero(x: u64) -> u64 {
    opaque(x | x.wrapping_neg()) >> 63
}

/// `x`, hidden from the optimiser: LLVM would otherwise recognise the mask arithmetic above
/// as a select or a compare and emit the conditional jump this code exists to avoid.
#[inline(always)]
pub fn opaque(x: u64) -> u64 {
    let mut v = x;
    // SAFETY: a local's own address.
    unsafe {
        core::ptr::write_volatile(&mut v, x);
        core::ptr::read_volatile(&v)
    }
}

#[inline(always)]
fn wrap(start: u16, k: u16, count: u16) -> u16 {
    let i = start + k;
    if i > count { i - count } else { i }
}

/// Picks a backend for a frontend with `count > 0` live slots.
#[inline(always)]
pub fn choose(policy: u8, count: u16, dice: Dice, view: &impl SlotView) -> Option<Pick> {
    match policy {
        POLICY_LEAST_CONN => {
            let start = if count > MAX_SCAN { random_slot(dice.b, count) } else { 1 };
            scan(start, count, view, |c, k| (c.active << 24) | (mix(dice.a, k) as u64 & 0xff_ffff))
        }
        POLICY_P2C => p2c(count, dice, view),
        POLICY_ROUND_ROBIN => in_order_from(rem(dice.rr, count as u32) as u16 + 1, count, view),
        _ => in_order_from(random_slot(dice.a, count), count, view),
    }
}

/// The backend at `start`, or the next non-suspect one after it.
#[inline(always)]
fn in_order_from(start: u16, count: u16, view: &impl SlotView) -> Option<Pick> {
    let first = view.candidate(start)?;
    if first.suspect == 0 {
        return Some(Pick { candidate: first, skipped_suspect: false, all_suspect: false });
    }
    scan(start, count, view, |_, k| k as u64)
}

/// The slot of least `cost(candidate, k)` among up to [`MAX_SCAN`] slots from `start`, with
/// suspect backends ranked last. `cost` must stay below 2^62.
#[inline(always)]
fn scan(start: u16, count: u16, view: &impl SlotView, cost: impl Fn(&Candidate, u16) -> u64) -> Option<Pick> {
    let mut best_cost = u64::MAX >> 1;
    let mut best_index = start as u64;
    let mut suspects = 0u64;
    for k in 0..MAX_SCAN {
        if k >= count {
            break;
        }
        let index = wrap(start, k, count);
        let c = view.candidate(index)?;
        let cost = cost(&c, k) | (c.suspect * SUSPECT_COST);
        let better = lt_mask(cost, best_cost);
        best_cost = select(better, cost, best_cost);
        best_index = select(better, index as u64, best_index);
        suspects += c.suspect;
    }
    let candidate = view.candidate(best_index as u16)?;
    let all_suspect = candidate.suspect != 0;
    Some(Pick { candidate, skipped_suspect: suspects != 0 && !all_suspect, all_suspect })
}

/// `a % b` without the division-by-zero panic, which the kernel could not load (a panic path
/// ends the program without an exit instruction).
#[inline(always)]
fn rem(a: u32, b: u32) -> u32 {
    a.checked_rem(b).unwrap_or(0)
}

/// A cheap hash of one random word and a position (murmur3's finaliser), so every slot gets
/// its own tie-breaker.
#[inline(always)]
fn mix(r: u32, k: u16) -> u32 {
    let mut x = r ^ (k as u32).wrapping_mul(0x9e37_79b9);
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

/// Load estimate for p2c: connections in flight, weighted by how slow the backend answers.
/// Below 2^56: `active` is below 2^32 and the RTT is capped at 2^24 µs (16 s).
#[inline(always)]
pub fn p2c_cost(c: &Candidate) -> u64 {
    let rtt = (c.srtt_us as u64 & 0xff_ffff) | 1;
    (c.active + 1) * rtt
}

/// Power of two random choices: the cheaper of two distinct random backends.
#[inline(always)]
fn p2c(count: u16, dice: Dice, view: &impl SlotView) -> Option<Pick> {
    let i = random_slot(dice.a, count);
    if count == 1 {
        let c = view.candidate(i)?;
        return Some(Pick { candidate: c, skipped_suspect: false, all_suspect: c.suspect != 0 });
    }
    // A second slot among the other count-1, so the two always differ.
    let j = wrap(i, random_slot(dice.b, count - 1), count);
    let a = view.candidate(i)?;
    let b = view.candidate(j)?;
    if a.suspect != 0 && b.suspect != 0 {
        return in_order_from(i, count, view);
    }
    let cost_a = p2c_cost(&a) | (a.suspect * SUSPECT_COST);
    let cost_b = p2c_cost(&b) | (b.suspect * SUSPECT_COST);
    let pick_b = lt_mask(cost_b, cost_a) != 0;
    let candidate = if pick_b { b } else { a };
    Some(Pick { candidate, skipped_suspect: (a.suspect | b.suspect) != 0, all_suspect: false })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::POLICY_RANDOM;

    struct View<const N: usize>([Candidate; N]);

    impl<const N: usize> SlotView for View<N> {
        fn candidate(&self, index: u16) -> Option<Candidate> {
            self.0.get(index as usize - 1).copied()
        }
    }

    fn backends<const N: usize>(active: [u64; N], srtt: [u32; N], suspect: [bool; N]) -> View<N> {
        View(core::array::from_fn(|i| Candidate {
            backend_id: i as u32 + 1,
            active: active[i],
            srtt_us: srtt[i],
            suspect: suspect[i] as u64,
        }))
    }

    /// Counts picks per backend id over `n` evenly spread dice.
    fn histogram<const N: usize>(policy: u8, view: &View<N>, n: u32) -> [u32; N] {
        let mut hits = [0u32; N];
        let step = u32::MAX / n;
        for i in 0..n {
            let dice = Dice { a: i * step, b: (i * step).rotate_left(13) ^ 0x5bd1_e995, rr: i };
            let p = choose(policy, N as u16, dice, view).expect("a pick");
            hits[p.candidate.backend_id as usize - 1] += 1;
        }
        hits
    }

    #[test]
    fn random_slot_stays_in_range_at_the_extremes() {
        for count in [1u16, 2, 3, 255, u16::MAX] {
            assert_eq!(random_slot(0, count), 1);
            assert_eq!(random_slot(u32::MAX, count), count);
        }
    }

    #[test]
    fn random_and_round_robin_spread_evenly() {
        let v = backends([0; 3], [0; 3], [false; 3]);
        for policy in [POLICY_RANDOM, POLICY_ROUND_ROBIN] {
            let hits = histogram(policy, &v, 30_000);
            for h in hits {
                assert!(h.abs_diff(10_000) <= 1, "policy {policy}: {hits:?}");
            }
        }
    }

    #[test]
    fn round_robin_cycles_in_slot_order() {
        let v = backends([0; 3], [0; 3], [false; 3]);
        let ids: [u32; 6] = core::array::from_fn(|rr| {
            choose(POLICY_ROUND_ROBIN, 3, Dice { a: 0, b: 0, rr: rr as u32 }, &v)
                .unwrap()
                .candidate
                .backend_id
        });
        assert_eq!(ids, [1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn every_policy_avoids_a_suspect_backend() {
        let v = backends([0, 5, 0], [100, 100, 100], [false, false, true]);
        for policy in [POLICY_RANDOM, POLICY_ROUND_ROBIN, POLICY_LEAST_CONN, POLICY_P2C] {
            let hits = histogram(policy, &v, 3000);
            assert_eq!(hits[2], 0, "policy {policy} picked the suspect backend: {hits:?}");
        }
    }

    #[test]
    fn all_suspect_still_picks_one() {
        let v = backends([0; 3], [0; 3], [true; 3]);
        for policy in [POLICY_RANDOM, POLICY_ROUND_ROBIN, POLICY_LEAST_CONN, POLICY_P2C] {
            let p = choose(policy, 3, Dice { a: 7, b: 9, rr: 1 }, &v).unwrap();
            assert!(p.all_suspect, "policy {policy}");
        }
    }

    #[test]
    fn least_connections_takes_the_least_loaded_and_spreads_ties() {
        let v = backends([4, 1, 9], [0; 3], [false; 3]);
        assert_eq!(histogram(POLICY_LEAST_CONN, &v, 300), [0, 300, 0]);
        // A suspect backend loses even with no connections at all.
        let v = backends([4, 0, 9], [0; 3], [false, true, false]);
        assert_eq!(histogram(POLICY_LEAST_CONN, &v, 300), [300, 0, 0]);
        let tied = backends([2, 7, 2, 2], [0; 4], [false; 4]);
        let hits = histogram(POLICY_LEAST_CONN, &tied, 3000);
        assert_eq!(hits[1], 0);
        for h in [hits[0], hits[2], hits[3]] {
            assert!(h.abs_diff(1000) < 150, "ties must spread evenly: {hits:?}");
        }
    }

    #[test]
    fn p2c_weights_connections_by_rtt() {
        // Backend 3 is ten times slower: it must get far less than a third.
        let v = backends([1, 1, 1], [200, 200, 2000], [false; 3]);
        let hits = histogram(POLICY_P2C, &v, 30_000);
        assert!(hits[2] < 30_000 / 10, "{hits:?}");
        assert!(hits[0].abs_diff(hits[1]) < 1500, "{hits:?}");
        assert!(p2c_cost(&v.0[0]) < p2c_cost(&v.0[2]));
    }

    #[test]
    fn p2c_compares_two_distinct_backends() {
        // With two backends, the cheaper one must win every time.
        let v = backends([0, 3], [100, 100], [false; 2]);
        assert_eq!(histogram(POLICY_P2C, &v, 1000), [1000, 0]);
    }

    #[test]
    fn large_sets_are_scanned_in_a_random_window() {
        // 40 backends, the least loaded at slot 40: reachable only through a window that
        // wraps or starts late, so it must win some choices but not all.
        let mut active = [10u64; 40];
        active[39] = 0;
        let v = backends(active, [0; 40], [false; 40]);
        let hits = histogram(POLICY_LEAST_CONN, &v, 4000);
        assert!(hits[39] > 1000 && hits[39] < 4000, "{}", hits[39]);
    }

    #[test]
    fn a_single_backend_is_always_chosen() {
        let v = backends([3], [10], [false]);
        for policy in [POLICY_RANDOM, POLICY_ROUND_ROBIN, POLICY_LEAST_CONN, POLICY_P2C] {
            assert_eq!(histogram(policy, &v, 100), [100]);
        }
    }

    #[test]
    fn a_missing_slot_is_no_pick() {
        struct Broken;
        impl SlotView for Broken {
            fn candidate(&self, _: u16) -> Option<Candidate> {
                None
            }
        }
        for policy in [POLICY_RANDOM, POLICY_ROUND_ROBIN, POLICY_LEAST_CONN, POLICY_P2C] {
            assert_eq!(choose(policy, 3, Dice { a: 1, b: 2, rr: 3 }, &Broken), None);
        }
    }
}
