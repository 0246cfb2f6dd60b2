//! iter/tcp: writes one `TcpRecord` per TCP socket kha redirected (its cookie is in
//! `KHA_CONNS`), with the sequence numbers the agent needs to forge the RST that ends it
//! (see kha-user's `loader::reset`). Run by the agent from the served network namespace: a TCP
//! iterator walks the sockets of the namespace its reader opened it in.
//!
//! Fields are read at the offsets the agent found in the kernel's BTF (`KHA_ITER_OFFSETS`,
//! read-only global): Rust eBPF has no CO-RE to place them at load time.

use core::ffi::c_void;

use aya_ebpf::helpers::generated::{
    bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_seq_write, bpf_skc_to_tcp_sock,
};
use kha_common::{IterOffsets, TcpRecord};

use crate::maps::KHA_CONNS;

/// `struct bpf_iter_meta`: only the seq_file is used.
#[repr(C)]
pub struct IterMeta {
    seq: *mut c_void,
}

/// `struct bpf_iter__tcp`, the program's context.
#[repr(C)]
pub struct IterTcpCtx {
    meta: *const IterMeta,
    sk_common: *const c_void,
}

/// Set by the agent before loading (`EbpfLoader::set_global`); all 0 means "not set".
#[unsafe(no_mangle)]
static KHA_ITER_OFFSETS: IterOffsets = IterOffsets::UNSET;

pub fn try_iter_tcp(ctx: *const IterTcpCtx) -> Result<(), i64> {
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    // NULL once after the last socket (the end-of-iteration call).
    if sk.is_null() {
        return Ok(());
    }
    // Full TCP sockets only, not the request and time-wait minisockets the walk also meets.
    let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as *const u8;
    if tp.is_null() {
        return Ok(());
    }
    let cookie = unsafe { bpf_get_socket_cookie(sk as *mut c_void) };
    if unsafe { KHA_CONNS.get(&cookie) }.is_none() {
        return Ok(());
    }
    // Volatile: the compiler must not fold the zero initializer into the code.
    let off = unsafe { core::ptr::read_volatile(&KHA_ITER_OFFSETS) };
    if off.rcv_nxt == 0 {
        return Err(0);
    }
    let mut rec = TcpRecord::ZERO;
    rec.cookie = cookie;
    read(tp, off.v6_daddr, &raw mut rec.v6_daddr_be, 16)?;
    read(tp, off.v6_rcv_saddr, &raw mut rec.v6_rcv_saddr_be, 16)?;
    read(tp, off.daddr, &raw mut rec.daddr_be, 4)?;
    read(tp, off.rcv_saddr, &raw mut rec.rcv_saddr_be, 4)?;
    read(tp, off.dport, &raw mut rec.dport_be, 2)?;
    read(tp, off.num, &raw mut rec.num, 2)?;
    read(tp, off.family, &raw mut rec.family, 2)?;
    read(tp, off.state, &raw mut rec.state, 1)?;
    read(tp, off.rcv_nxt, &raw mut rec.rcv_nxt, 4)?;
    read(tp, off.snd_nxt, &raw mut rec.snd_nxt, 4)?;
    let seq = unsafe { (*meta).seq };
    let rc = unsafe {
        bpf_seq_write(seq.cast(), (&raw const rec).cast(), core::mem::size_of::<TcpRecord>() as u32)
    };
    if rc == 0 { Ok(()) } else { Err(rc) }
}

/// `len` bytes at `base + offset` into `dst`.
#[inline(always)]
fn read<T>(base: *const u8, offset: u32, dst: *mut T, len: u32) -> Result<(), i64> {
    let src = base.wrapping_add(offset as usize);
    let rc = unsafe { bpf_probe_read_kernel(dst.cast(), len, src.cast()) };
    if rc == 0 { Ok(()) } else { Err(rc) }
}
