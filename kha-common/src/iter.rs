//! The TCP iterator's contract: where the kernel's socket fields are (`IterOffsets`, found by
//! the agent in the running kernel's BTF and handed to the program as a read-only global) and
//! what it writes per socket (`TcpRecord`, read back from the iterator's file).
//!
//! Rust eBPF gets no CO-RE relocations, and `struct tcp_sock` changes with every kernel and
//! config, so the program reads no field at a compiled-in offset: it reads
//! `base + offsets.field` with `bpf_probe_read_kernel`, where `base` is the socket (a
//! `tcp_sock` starts with its `sock_common`).

/// Name of the read-only global the agent sets before loading the iterator.
pub const ITER_OFFSETS_GLOBAL: &str = "KHA_ITER_OFFSETS";
/// Name of the iterator program in the object.
pub const ITER_PROGRAM: &str = "kha_iter_tcp";

/// Byte offsets of the fields the iterator reads, from the start of `struct tcp_sock`.
/// All 0 (never set): the program emits nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IterOffsets {
    /// `sock_common.skc_daddr` (`__be32`).
    pub daddr: u32,
    /// `sock_common.skc_rcv_saddr` (`__be32`).
    pub rcv_saddr: u32,
    /// `sock_common.skc_dport` (`__be16`).
    pub dport: u32,
    /// `sock_common.skc_num` (`__u16`, host order).
    pub num: u32,
    /// `sock_common.skc_family` (`unsigned short`).
    pub family: u32,
    /// `sock_common.skc_state` (`unsigned char`).
    pub state: u32,
    /// `sock_common.skc_v6_daddr` (`struct in6_addr`).
    pub v6_daddr: u32,
    /// `sock_common.skc_v6_rcv_saddr` (`struct in6_addr`).
    pub v6_rcv_saddr: u32,
    /// `tcp_sock.rcv_nxt` (`u32`, host order): the next sequence number the socket expects.
    pub rcv_nxt: u32,
    /// `tcp_sock.snd_nxt` (`u32`, host order): the next sequence number it sends.
    pub snd_nxt: u32,
}
const _: () = assert!(core::mem::size_of::<IterOffsets>() == 40);

impl IterOffsets {
    pub const UNSET: Self = Self {
        daddr: 0,
        rcv_saddr: 0,
        dport: 0,
        num: 0,
        family: 0,
        state: 0,
        v6_daddr: 0,
        v6_rcv_saddr: 0,
        rcv_nxt: 0,
        snd_nxt: 0,
    };
}

/// One socket kha redirected (its cookie is in `KHA_CONNS`), as the iterator writes it with
/// `bpf_seq_write`: the kernel's fields raw, both address families, so the kernel side makes no
/// choice (the agent picks by `family` and by whether the v6 peer is v4-mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpRecord {
    pub cookie: u64,
    pub v6_daddr_be: [u8; 16],
    pub v6_rcv_saddr_be: [u8; 16],
    /// Network order in a native u32, as the kernel keeps it.
    pub daddr_be: u32,
    pub rcv_saddr_be: u32,
    pub dport_be: u16,
    /// The local port, host order (`skc_num`).
    pub num: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// `TCP_ESTABLISHED` = 1, ...
    pub state: u8,
    pub _pad: u8,
    pub rcv_nxt: u32,
    pub snd_nxt: u32,
}
const _: () = assert!(core::mem::size_of::<TcpRecord>() == 64);

impl TcpRecord {
    pub const ZERO: Self = Self {
        cookie: 0,
        v6_daddr_be: [0; 16],
        v6_rcv_saddr_be: [0; 16],
        daddr_be: 0,
        rcv_saddr_be: 0,
        dport_be: 0,
        num: 0,
        family: 0,
        state: 0,
        _pad: 0,
        rcv_nxt: 0,
        snd_nxt: 0,
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::IterOffsets {}
}
