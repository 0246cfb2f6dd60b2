//! connect4/connect6: rewrite a connect() to a frontend into one of its backends.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use kha_common::{
    AddrBe, Backend, CONN_UNSENT, Conn, STAT_ALL_SUSPECT, STAT_FOREIGN_NETNS, STAT_INCONSISTENT,
    STAT_NO_BACKEND, STAT_REWRITTEN, STAT_SUSPECT_SKIPPED, ServiceKey, TRACE_ALL_SUSPECT,
    TRACE_CHOSEN_SUSPECT, TRACE_FOREIGN_NETNS, TRACE_INCONSISTENT, TRACE_NO_BACKEND, TRACE_NOT_A_FRONTEND,
    TRACE_REWRITTEN, TRACE_SKIPPED_SUSPECT, TraceEvent, addr_from_words, is_v4_mapped,
    select::{Candidate, Dice, SlotView, choose, nonzero},
    v4_mapped, v4_of_mapped, words_from_addr,
};

use crate::{
    PROCEED,
    maps::{KHA_BACKENDS, KHA_BE_HEALTH, KHA_CONFIG, KHA_CONNS, KHA_SVC, add, backend_stats, count},
};

const IPPROTO_TCP: u32 = 6;
const EHOSTUNREACH: i32 = 113;
const REJECT: i32 = 0;

/// Why a connect is not rewritten; every variant means "leave it alone".
pub enum Skip {
    NotTcp,
    NotAFrontend,
    ForeignNetns,
}

/// Where each decision is reported: nowhere in kha's own programs (`Untraced`, which compiles
/// to nothing, so they are the same instructions as without tracing), to a ring buffer in the
/// traced twins of the `kha-trace` object (`traced.rs`). `event` is only called when traced;
/// reporting never changes a verdict.
pub trait Trace {
    fn decided(ctx: &SockAddrContext, event: impl FnOnce() -> TraceEvent);
}

// Unused in the kha-trace object, which builds the same module.
#[allow(dead_code)]
pub struct Untraced;

impl Trace for Untraced {
    #[inline(always)]
    fn decided(_: &SockAddrContext, _: impl FnOnce() -> TraceEvent) {}
}

/// A trace record of what is known at a decision; the trace fills in the task.
#[inline(always)]
fn event(key: &ServiceKey, outcome: u8, policy: u8, count: u16) -> TraceEvent {
    TraceEvent {
        dst_addr_be: key.addr_be,
        dst_port_be: key.port_be,
        outcome,
        policy,
        count,
        ..TraceEvent::ZERO
    }
}

/// A connect kha handles: rewritten to a backend, or refused on purpose.
enum Verdict {
    To(u32, Backend),
    Refuse(u32),
}

pub fn try_connect4<T: Trace>(ctx: &SockAddrContext) -> Result<i32, Skip> {
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = frontend_key(sa, v4_mapped(sa.user_ip4))?;
    let (id, backend) = match choose_backend::<T>(ctx, &key)? {
        // An IPv4 socket cannot reach an IPv6 backend; the agent never writes such a set.
        Verdict::To(id, b) if is_v4_mapped(&b.addr_be) => (id, b),
        Verdict::To(..) => return Ok(refuse(STAT_INCONSISTENT)),
        Verdict::Refuse(stat) => return Ok(refuse(stat)),
    };
    sa.user_ip4 = v4_of_mapped(&backend.addr_be);
    sa.user_port = backend.port_be as u32;
    remember(ctx, &key, id, &backend);
    Ok(PROCEED)
}

pub fn try_connect6<T: Trace>(ctx: &SockAddrContext) -> Result<i32, Skip> {
    let sa = unsafe { &mut *ctx.sock_addr };
    // Four 4-byte loads: the verifier refuses wider reads of user_ip6.
    let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let key = frontend_key(sa, addr_from_words(words))?;
    let (id, backend) = match choose_backend::<T>(ctx, &key)? {
        Verdict::To(id, b) => (id, b),
        Verdict::Refuse(stat) => return Ok(refuse(stat)),
    };
    // A v4-mapped backend is written as is: the kernel connects the IPv6 socket over IPv4.
    let w = words_from_addr(&backend.addr_be);
    sa.user_ip6[0] = w[0];
    sa.user_ip6[1] = w[1];
    sa.user_ip6[2] = w[2];
    sa.user_ip6[3] = w[3];
    sa.user_port = backend.port_be as u32;
    remember(ctx, &key, id, &backend);
    Ok(PROCEED)
}

#[inline(always)]
fn frontend_key(sa: &bpf_sock_addr, addr_be: AddrBe) -> Result<ServiceKey, Skip> {
    if sa.protocol != IPPROTO_TCP {
        return Err(Skip::NotTcp);
    }
    // user_port holds the network-order port in its low 16 bits.
    Ok(ServiceKey::new(addr_be, sa.user_port as u16, 0))
}

/// The frontend lookup comes first: almost no connect is to a frontend, so the netns check
/// and everything else only run for the few that are.
#[inline(always)]
fn choose_backend<T: Trace>(ctx: &SockAddrContext, key: &ServiceKey) -> Result<Verdict, Skip> {
    let frontend = KHA_SVC
        .get_ptr_mut(key)
        .ok_or(Skip::NotAFrontend)
        .inspect_err(|_| T::decided(ctx, || event(key, TRACE_NOT_A_FRONTEND, 0, 0)))?;
    let netns_ok = match KHA_CONFIG.get(0) {
        Some(cfg) => {
            cfg.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.netns_cookie
        }
        None => false,
    };
    if !netns_ok {
        // Not ours to touch: a pod's namespace reaching its own 127.0.0.1:6443.
        count(STAT_FOREIGN_NETNS);
        T::decided(ctx, || event(key, TRACE_FOREIGN_NETNS, 0, 0));
        return Err(Skip::ForeignNetns);
    }
    let (count_, base, policy, rr) = unsafe {
        let f = &mut *frontend;
        // Racy on purpose: a lost round-robin step between CPUs costs nothing.
        let rr = f.rr;
        f.rr = rr.wrapping_add(1);
        (f.count, f.base, f.policy, rr)
    };
    if count_ == 0 {
        T::decided(ctx, || event(key, TRACE_NO_BACKEND, policy, 0));
        return Ok(Verdict::Refuse(STAT_NO_BACKEND));
    }
    let dice = unsafe { Dice { a: bpf_get_prandom_u32(), b: bpf_get_prandom_u32(), rr } };
    let Some(pick) = choose(policy, count_, dice, &Slots { key, base }) else {
        T::decided(ctx, || event(key, TRACE_INCONSISTENT, policy, count_));
        return Ok(Verdict::Refuse(STAT_INCONSISTENT));
    };
    if pick.skipped_suspect {
        count(STAT_SUSPECT_SKIPPED);
    }
    if pick.all_suspect {
        count(STAT_ALL_SUSPECT);
    }
    let id = pick.candidate.backend_id;
    match unsafe { KHA_BACKENDS.get(&id) } {
        Some(backend) => {
            // The trace tells an IPv6 backend for an IPv4 socket (refused by try_connect4).
            T::decided(ctx, move || {
                let suspect = if pick.candidate.suspect != 0 { TRACE_CHOSEN_SUSPECT } else { 0 };
                TraceEvent {
                    backend_addr_be: backend.addr_be,
                    backend_port_be: backend.port_be,
                    backend_id: id,
                    active: pick.candidate.active,
                    flags: suspect
                        | if pick.skipped_suspect { TRACE_SKIPPED_SUSPECT } else { 0 }
                        | if pick.all_suspect { TRACE_ALL_SUSPECT } else { 0 },
                    ..event(key, TRACE_REWRITTEN, policy, count_)
                }
            });
            Ok(Verdict::To(id, *backend))
        }
        None => {
            T::decided(ctx, || event(key, TRACE_INCONSISTENT, policy, count_));
            Ok(Verdict::Refuse(STAT_INCONSISTENT))
        }
    }
}

/// The live region of one frontend, as the selection policies see it.
struct Slots<'a> {
    key: &'a ServiceKey,
    base: u16,
}

impl SlotView for Slots<'_> {
    #[inline(always)]
    fn candidate(&self, index: u16) -> Option<Candidate> {
        let slot = unsafe { KHA_SVC.get(&self.key.with_slot(self.base.wrapping_add(index))) }?;
        let id = slot.backend_id;
        // Both arrays cover every backend id, so these lookups only fail for a corrupt id.
        // Treating that as a missing slot (not as "idle, healthy") keeps one path per slot,
        // which is what keeps the verifier's walk of the scan loops small.
        let stats = backend_stats(id)?;
        let (active, srtt_us) = unsafe { ((*stats).active, (*stats).srtt_us) };
        let suspect = nonzero(KHA_BE_HEALTH.get(id)?.suspect_ns);
        // A missed close wraps `active` below zero: count that as idle, not as overloaded.
        let active = active & nonzero(active >> 32).wrapping_sub(1);
        Some(Candidate { backend_id: id, active, srtt_us, suspect })
    }
}

/// Fails the connect with EHOSTUNREACH at once: never a hang, never a fall-through to
/// whatever listens on the frontend address.
#[inline(always)]
fn refuse(stat: u32) -> i32 {
    count(stat);
    unsafe { bpf_set_retval(-EHOSTUNREACH) };
    REJECT
}

/// Keeps what getpeername must report and what sock_ops counts by. Best effort: if the
/// entry cannot be written the connect still goes to the backend; getpeername then reports the
/// backend and sock_ops does not count it.
#[inline(always)]
fn remember(ctx: &SockAddrContext, key: &ServiceKey, backend_id: u32, backend: &Backend) {
    count(STAT_REWRITTEN);
    if let Some(stats) = backend_stats(backend_id) {
        add(unsafe { &raw mut (*stats).chosen }, 1);
    }
    let client_cgroup_id = crate::client::connected(key, backend_id);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Overwrites the entry of a socket that connects again after a failed connect. Not counted
    // in `active` until sock_ops sees the SYN: the connect may still fail before one.
    let conn = Conn {
        frontend_addr_be: key.addr_be,
        backend_addr_be: backend.addr_be,
        frontend_port_be: key.port_be,
        backend_port_be: backend.port_be,
        backend_id,
        established: CONN_UNSENT,
        _pad: 0,
        client_cgroup_id,
    };
    let _ = KHA_CONNS.insert(&cookie, &conn, 0);
}
