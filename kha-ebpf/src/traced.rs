//! The `kha-trace` object: twins of kha's connect4/connect6 programs that also report each
//! decision into a ring buffer, for `kha trace`. The same `connect` code, built with a tracer
//! where kha's own object has none (`connect::Untraced`). The agent loads this object only
//! while a trace runs, against the pinned maps, and swaps these programs in under the pinned
//! connect links (and back) with BPF_LINK_UPDATE: when no trace runs, nothing of it is loaded.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod client;
mod connect;
// Every pinned map is declared, as in kha's object; the connect programs use some of them.
#[allow(dead_code)]
mod maps;
mod object;

use aya_ebpf::{
    btf_maps::{PerCpuArray, RingBuf},
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::{btf_map, cgroup_sock_addr},
    programs::SockAddrContext,
};
use kha_common::{
    TRACE_INCONSISTENT, TRACE_REWRITTEN, TRACE_RING_BYTES, TraceEvent, TraceFilter, is_v4_mapped,
};

/// Return value of a cgroup sock_addr program that lets the syscall proceed.
const PROCEED: i32 = 1;
const AF_INET: u32 = 2;

/// Not pinned: the agent's handle is the only one, and it goes with the trace.
#[btf_map]
static KHA_TRACE: RingBuf<TraceEvent, TRACE_RING_BYTES> = RingBuf::new();

/// Records the ring had no room for (no reader keeping up); the trace's last line says how many.
#[btf_map]
static KHA_TRACE_LOST: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Set by the agent before it loads this object (`override_global`): the destinations of the
/// trace (`kha trace --frontend`); `ALL` reports every connect.
#[unsafe(no_mangle)]
static KHA_TRACE_FILTER: TraceFilter = TraceFilter::ALL;

/// The filter as loaded. Through a pointer read volatile, so the compiler cannot fold the
/// `ALL` initializer into the code (the agent's value replaces it at load time).
#[inline(always)]
fn filter() -> &'static TraceFilter {
    let p: *const TraceFilter = &raw const KHA_TRACE_FILTER;
    unsafe { &*core::ptr::read_volatile(&p) }
}

pub struct Traced;

impl connect::Trace for Traced {
    #[inline(always)]
    fn decided(ctx: &SockAddrContext, event: impl FnOnce() -> TraceEvent) {
        let mut e = event();
        if !filter().wants(&e.dst_addr_be, e.dst_port_be) {
            return;
        }
        let family = unsafe { (*ctx.sock_addr).user_family };
        e.family = if family == AF_INET { 4 } else { 6 };
        // try_connect4 refuses an IPv6 backend after the choice: say so here.
        if e.family == 4 && e.outcome == TRACE_REWRITTEN && !is_v4_mapped(&e.backend_addr_be) {
            e.outcome = TRACE_INCONSISTENT;
        }
        e.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        e.pid_tgid = bpf_get_current_pid_tgid();
        e.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        // Best effort: a full ring loses the record, counted; the verdict is the same.
        if KHA_TRACE.output(&e, 0).is_err()
            && let Some(lost) = KHA_TRACE_LOST.get_ptr_mut(0)
        {
            // Per-CPU slot: no other writer can race this increment.
            unsafe { *lost += 1 };
        }
    }
}

#[cgroup_sock_addr(connect4)]
pub fn kha_trace4(ctx: SockAddrContext) -> i32 {
    connect::try_connect4::<Traced>(&ctx).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(connect6)]
pub fn kha_trace6(ctx: SockAddrContext) -> i32 {
    connect::try_connect6::<Traced>(&ctx).unwrap_or(PROCEED)
}
