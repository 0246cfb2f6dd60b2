//! sock_release: forgets a redirected socket whose connect failed before any SYN was sent.
//!
//! The connect hook writes the socket's `KHA_CONNS` entry before the kernel routes the connect
//! and picks a local port; sock_ops removes it at TCP_CLOSE, but sock_ops hears of a socket
//! only from its first SYN (TCP_CONNECT_CB) on. A connect that fails in between (ENETUNREACH:
//! no route to the backend; EADDRNOTAVAIL: no free local port) never gets there, and without
//! this hook its entry would stay until the LRU evicted it, evicting live sockets' entries along
//! with the leaks. Every socket ends here when its last file reference goes: one that is in
//! TCP_CLOSE then has nothing left for sock_ops to do, so any entry it still has is stale.
//! Sockets still on their way (FIN_WAIT, TIME_WAIT after close()) keep theirs: sock_ops counts
//! their close and removes the entry then.

use aya_ebpf::{EbpfContext, helpers::generated::bpf_get_socket_cookie, programs::SockContext};

use crate::maps::KHA_CONNS;

const IPPROTO_TCP: u32 = 6;
const TCP_CLOSE: u32 = 7;

pub fn try_sock_release(ctx: &SockContext) -> Result<(), ()> {
    let sk = unsafe { &*ctx.sock };
    // Both read unconditionally (see sockops.rs on context accesses merged across branches).
    let (protocol, state) = (sk.protocol, sk.state);
    if protocol != IPPROTO_TCP || state != TCP_CLOSE {
        return Ok(());
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // No counter to mend: `active` counts from TCP_CONNECT_CB, which such a socket never saw,
    // and a socket that saw it reached TCP_CLOSE through sock_ops, which removed its entry.
    KHA_CONNS.remove(&cookie).map_err(drop)
}
