//! sock_ops: per-backend connection counters and passive failure detection, for sockets kha
//! redirected only (the connect hook put their cookie in KHA_CONNS). No per-packet callback is
//! enabled: only the connect, established, state-change and retransmission-timeout events,
//! which happen a few times per connection.

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SockOpsContext,
};
use kha_common::{BackendStats, CONN_ESTABLISHED, CONN_SYN_SENT, CONN_UNSENT};

use crate::maps::{KHA_BE_HEALTH, KHA_CONNS, add, backend_stats};

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_RTO_CB: u32 = 8;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_RTO_CB_FLAG: i32 = 1 << 0;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const TCP_CLOSE: u32 = 7;

pub fn try_sockops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if !matches!(
        op,
        BPF_SOCK_OPS_TCP_CONNECT_CB
            | BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
            | BPF_SOCK_OPS_RTO_CB
            | BPF_SOCK_OPS_STATE_CB
    ) {
        return Ok(());
    }
    // Read the context fields used below unconditionally: the verifier refuses a context
    // access that LLVM merged across branches.
    let srtt_us = unsafe { (*ctx.ops).srtt_us } >> 3; // the kernel keeps srtt scaled by 8
    let new_state = ctx.arg(1);
    // Of the state changes (about five per connection) only the close counts: leave before any
    // map lookup for the others.
    if op == BPF_SOCK_OPS_STATE_CB && new_state != TCP_CLOSE {
        return Ok(());
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let conn = KHA_CONNS.get_ptr_mut(&cookie).ok_or(())?;
    let id = unsafe { (*conn).backend_id };
    let stats = backend_stats(id).ok_or(())?;
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            unsafe { (*conn).established = CONN_SYN_SENT };
            add(unsafe { &raw mut (*stats).active }, 1);
            crate::client::open_delta(conn, 1);
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            unsafe { (*conn).established = CONN_ESTABLISHED };
            add(unsafe { &raw mut (*stats).established }, 1);
            smooth_rtt(stats, srtt_us);
        }
        BPF_SOCK_OPS_RTO_CB => add(unsafe { &raw mut (*stats).rto }, 1),
        BPF_SOCK_OPS_STATE_CB if new_state == TCP_CLOSE => {
            let state = unsafe { (*conn).established };
            if state != CONN_UNSENT {
                // Before the remove: the entry is the client's key.
                crate::client::open_delta(conn, u64::MAX); // -1
            }
            let _ = KHA_CONNS.remove(&cookie);
            if state == CONN_UNSENT {
                // The callbacks stay armed on a socket after a failed connect; this close is of
                // a later connect on it that failed before its SYN (no free local port): never
                // counted, and no fault of the backend's.
                return Ok(());
            }
            add(unsafe { &raw mut (*stats).active }, u64::MAX); // -1
            if state == CONN_SYN_SENT {
                // Refused, reset or timed out before ESTABLISHED: avoid this backend for the
                // next connects until the agent's probe confirms or clears it.
                add(unsafe { &raw mut (*stats).failed }, 1);
                if let Some(h) = KHA_BE_HEALTH.get_ptr_mut(id) {
                    unsafe { (*h).suspect_ns = bpf_ktime_get_ns() };
                }
            } else {
                smooth_rtt(stats, srtt_us);
            }
        }
        _ => {}
    }
    Ok(())
}

/// EWMA with weight 1/8, like the kernel's own srtt. Racy between CPUs on purpose: a lost
/// sample changes nothing that matters.
#[inline(always)]
fn smooth_rtt(stats: *mut BackendStats, sample_us: u32) {
    if sample_us == 0 {
        return;
    }
    let s = unsafe { &mut *stats };
    s.srtt_us = if s.srtt_us == 0 { sample_us } else { s.srtt_us - (s.srtt_us >> 3) + (sample_us >> 3) };
}
