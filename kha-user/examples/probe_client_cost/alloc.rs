//! A global allocator that counts, per thread, allocations, bytes asked for, live bytes and
//! their peak: the client thread reads its own figures, untouched by the server thread's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub allocs: u64,
    pub bytes: u64,
    pub live: i64,
    pub peak: i64,
}

thread_local! {
    // Const-initialised and without Drop: usable from inside the allocator, at any time.
    static STATS: Cell<Stats> = const { Cell::new(Stats { allocs: 0, bytes: 0, live: 0, peak: 0 }) };
}

fn account(new: usize, freed: usize, counts: bool) {
    let _ = STATS.try_with(|s| {
        let mut v = s.get();
        if counts {
            v.allocs += 1;
            v.bytes += new as u64;
        }
        v.live += new as i64 - freed as i64;
        v.peak = v.peak.max(v.live);
        s.set(v);
    });
}

pub struct Counting;

// SAFETY: every call is passed on to `System` unchanged; the counting touches no heap.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        account(layout.size(), 0, true);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        account(layout.size(), 0, true);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        account(0, layout.size(), false);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        account(new_size, layout.size(), true);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// This thread's figures so far.
pub fn thread_stats() -> Stats {
    STATS.with(Cell::get)
}

/// Starts this thread's peak again from its live bytes now.
pub fn reset_peak() {
    STATS.with(|s| {
        let mut v = s.get();
        v.peak = v.live;
        s.set(v);
    });
}
