//! connect4/connect6: rewrite a connect() to a frontend into one of its backends.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_set_retval},
    programs::SockAddrContext,
};
use kha_common::{
    AddrBe, Backend, STAT_FOREIGN_NETNS, STAT_INCONSISTENT, STAT_NO_BACKEND, STAT_REWRITTEN, ServiceKey,
    ServiceValue, SockState, addr_from_words, is_v4_mapped, select::random_slot, v4_mapped, v4_of_mapped,
    words_from_addr,
};

use crate::{
    PROCEED,
    maps::{KHA_BACKENDS, KHA_CONFIG, KHA_SOCKS, KHA_SVC, count},
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

/// A connect kha handles: rewritten to a backend, or refused on purpose.
enum Verdict {
    To(u32, Backend),
    Refuse(u32),
}

pub fn try_connect4(ctx: &SockAddrContext) -> Result<i32, Skip> {
    let sa = unsafe { &mut *ctx.sock_addr };
    let key = frontend_key(sa, v4_mapped(sa.user_ip4))?;
    let (id, backend) = match choose(ctx, &key)? {
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

pub fn try_connect6(ctx: &SockAddrContext) -> Result<i32, Skip> {
    let sa = unsafe { &mut *ctx.sock_addr };
    // Four 4-byte loads: the verifier refuses wider reads of user_ip6.
    let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let key = frontend_key(sa, addr_from_words(words))?;
    let (id, backend) = match choose(ctx, &key)? {
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
fn choose(ctx: &SockAddrContext, key: &ServiceKey) -> Result<Verdict, Skip> {
    let frontend: ServiceValue = *unsafe { KHA_SVC.get(key) }.ok_or(Skip::NotAFrontend)?;
    let netns_ok = match KHA_CONFIG.get(0) {
        Some(cfg) => {
            cfg.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == cfg.netns_cookie
        }
        None => false,
    };
    if !netns_ok {
        // Not ours to touch: a pod's namespace reaching its own 127.0.0.1:6443.
        count(STAT_FOREIGN_NETNS);
        return Err(Skip::ForeignNetns);
    }
    if frontend.count == 0 {
        return Ok(Verdict::Refuse(STAT_NO_BACKEND));
    }
    let slot = frontend
        .base
        .wrapping_add(random_slot(unsafe { bpf_get_prandom_u32() }, frontend.count));
    let Some(slot) = (unsafe { KHA_SVC.get(&key.with_slot(slot)) }) else {
        return Ok(Verdict::Refuse(STAT_INCONSISTENT));
    };
    let id = slot.backend_id;
    match unsafe { KHA_BACKENDS.get(&id) } {
        Some(backend) => Ok(Verdict::To(id, *backend)),
        None => Ok(Verdict::Refuse(STAT_INCONSISTENT)),
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

/// Keeps what getpeername must report. Best effort: without socket storage the connect still
/// goes to the backend; getpeername then reports the backend.
#[inline(always)]
fn remember(ctx: &SockAddrContext, key: &ServiceKey, backend_id: u32, backend: &Backend) {
    count(STAT_REWRITTEN);
    let mut state = SockState {
        frontend_addr_be: key.addr_be,
        backend_addr_be: backend.addr_be,
        frontend_port_be: key.port_be,
        backend_port_be: backend.port_be,
        backend_id,
    };
    let slot = KHA_SOCKS.get_or_insert_ptr_mut(ctx, Some(&mut state));
    if !slot.is_null() {
        // The socket may have been connected through kha before (connect after a failed one).
        unsafe { *slot = state };
    }
}
