//! kha's kernel side. Entry points are thin: they call a `try_*` body and turn any error into
//! "proceed untouched", so a bug or a map miss never rejects a connect by accident. Rejections
//! happen only on purpose, in the body, with an errno set through `bpf_set_retval`.
#![no_std]
#![no_main]
// Atomic adds: the eBPF crate is built with RUSTC_BOOTSTRAP (see kha-user/build.rs).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod client;
mod connect;
mod iter;
mod maps;
mod object;
mod peername;
mod release;
mod sockops;

use aya_ebpf::{
    macros::{cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};

/// Return value of a cgroup sock_addr program that lets the syscall proceed.
const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn kha_connect4(ctx: SockAddrContext) -> i32 {
    connect::try_connect4::<connect::Untraced>(&ctx).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(connect6)]
pub fn kha_connect6(ctx: SockAddrContext) -> i32 {
    connect::try_connect6::<connect::Untraced>(&ctx).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(getpeername4)]
pub fn kha_peername4(ctx: SockAddrContext) -> i32 {
    peername::try_getpeername4(&ctx).unwrap_or(PROCEED)
}

#[cgroup_sock_addr(getpeername6)]
pub fn kha_peername6(ctx: SockAddrContext) -> i32 {
    peername::try_getpeername6(&ctx).unwrap_or(PROCEED)
}

#[sock_ops]
pub fn kha_sockops(ctx: SockOpsContext) -> u32 {
    let _ = sockops::try_sockops(&ctx);
    1
}

/// Runs for every socket of the cgroup when it is released (closed for the last time).
#[cgroup_sock(sock_release)]
pub fn kha_release(ctx: SockContext) -> i32 {
    let _ = release::try_sock_release(&ctx);
    1
}

/// iter/tcp, run by the agent (not attached to the cgroup): lists the sockets kha redirected
/// with what it needs to reset them. No aya-ebpf macro for iterators: the section by hand.
#[unsafe(link_section = "iter/tcp")]
#[unsafe(no_mangle)]
pub fn kha_iter_tcp(ctx: *mut iter::IterTcpCtx) -> i32 {
    let _ = iter::try_iter_tcp(ctx);
    0
}
