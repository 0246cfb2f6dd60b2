//! getpeername4/getpeername6: a socket kha rewrote reports the frontend it asked for, as it
//! would through a proxy, so clients that log or check their peer see what they configured.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_socket_cookie, programs::SockAddrContext};
use kha_common::{
    Conn, STAT_PEERNAME, addr_from_words, is_v4_mapped, v4_mapped, v4_of_mapped, words_from_addr,
};

use crate::{
    PROCEED,
    maps::{KHA_CONNS, count},
};

pub fn try_getpeername4(ctx: &SockAddrContext) -> Result<i32, ()> {
    let sa = unsafe { &mut *ctx.sock_addr };
    let state = rewritten(ctx, &v4_mapped(sa.user_ip4), sa.user_port as u16)?;
    if !is_v4_mapped(&state.frontend_addr_be) {
        return Err(());
    }
    sa.user_ip4 = v4_of_mapped(&state.frontend_addr_be);
    sa.user_port = state.frontend_port_be as u32;
    count(STAT_PEERNAME);
    Ok(PROCEED)
}

pub fn try_getpeername6(ctx: &SockAddrContext) -> Result<i32, ()> {
    let sa = unsafe { &mut *ctx.sock_addr };
    let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let state = rewritten(ctx, &addr_from_words(words), sa.user_port as u16)?;
    let w = words_from_addr(&state.frontend_addr_be);
    sa.user_ip6[0] = w[0];
    sa.user_ip6[1] = w[1];
    sa.user_ip6[2] = w[2];
    sa.user_ip6[3] = w[3];
    sa.user_port = state.frontend_port_be as u32;
    count(STAT_PEERNAME);
    Ok(PROCEED)
}

/// The socket's kha state, if kha rewrote it and it is still connected where kha sent it (a
/// socket may connect again elsewhere after a failed connect).
#[inline(always)]
fn rewritten(ctx: &SockAddrContext, peer: &[u8; 16], peer_port_be: u16) -> Result<Conn, ()> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let state = *unsafe { KHA_CONNS.get(&cookie) }.ok_or(())?;
    if state.backend_addr_be != *peer || state.backend_port_be != peer_port_be {
        return Err(());
    }
    Ok(state)
}
