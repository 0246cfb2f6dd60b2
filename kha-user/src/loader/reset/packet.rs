//! The forged TCP RST segments, IPv4 and IPv6, with their checksums (RFC 1071, RFC 793's and
//! RFC 8200's pseudo-headers). Pure: tested against segments the kernel itself sent.
//!
//! By hand rather than with a packet crate: two fixed 20-byte headers and one checksum, less
//! code than the glue a crate would need, and nothing else in kha builds packets.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

const IPPROTO_TCP: u8 = 6;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_HDR_LEN: usize = 20;
pub const V4_LEN: usize = 20 + TCP_HDR_LEN;
pub const V6_LEN: usize = 40 + TCP_HDR_LEN;
const TTL: u8 = 64;

/// An RST|ACK from `from` to `to` with sequence number `seq` and acknowledgment `ack`, as the
/// IP packet a raw `IPPROTO_RAW` socket sends unchanged. `None` if the two addresses are not
/// of one family (a v4-mapped IPv6 address counts as IPv4).
pub fn rst(from: SocketAddr, to: SocketAddr, seq: u32, ack: u32) -> Option<Vec<u8>> {
    let tcp = |pseudo_sum: u32| {
        let mut t = [0u8; TCP_HDR_LEN];
        t[0..2].copy_from_slice(&from.port().to_be_bytes());
        t[2..4].copy_from_slice(&to.port().to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[8..12].copy_from_slice(&ack.to_be_bytes());
        t[12] = (TCP_HDR_LEN as u8 / 4) << 4;
        t[13] = TCP_RST | TCP_ACK;
        // Window 0 and no urgent pointer, as the kernel's own resets.
        let c = checksum(pseudo_sum, &t);
        t[16..18].copy_from_slice(&c.to_be_bytes());
        t
    };
    match (v4(from), v4(to)) {
        (Some(src), Some(dst)) => {
            let mut p = Vec::with_capacity(V4_LEN);
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&(V4_LEN as u16).to_be_bytes());
            ip[6] = 0x40; // DF, id 0: what the kernel sends for its resets
            ip[8] = TTL;
            ip[9] = IPPROTO_TCP;
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&dst.octets());
            let c = checksum(0, &ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend_from_slice(&ip);
            let pseudo = sum(&src.octets()) + sum(&dst.octets()) + IPPROTO_TCP as u32 + TCP_HDR_LEN as u32;
            p.extend_from_slice(&tcp(pseudo));
            Some(p)
        }
        (None, None) => {
            let (SocketAddr::V6(f), SocketAddr::V6(t)) = (from, to) else { return None };
            let (src, dst): (Ipv6Addr, Ipv6Addr) = (*f.ip(), *t.ip());
            let mut p = Vec::with_capacity(V6_LEN);
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(TCP_HDR_LEN as u16).to_be_bytes());
            ip[6] = IPPROTO_TCP;
            ip[7] = TTL;
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
            p.extend_from_slice(&ip);
            let pseudo = sum(&src.octets()) + sum(&dst.octets()) + TCP_HDR_LEN as u32 + IPPROTO_TCP as u32;
            p.extend_from_slice(&tcp(pseudo));
            Some(p)
        }
        _ => None,
    }
}

/// The IPv4 address of an IPv4 or v4-mapped IPv6 socket address.
pub fn v4(a: SocketAddr) -> Option<Ipv4Addr> {
    match a {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
    }
}

/// The sum of `data` as big-endian 16-bit words (odd length: a zero byte appended), not folded.
fn sum(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

/// The Internet checksum (RFC 1071) of `data` plus an unfolded `initial` sum.
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut s = initial as u64 + sum(data) as u64;
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn checksum_matches_rfc_1071_and_a_textbook_ipv4_header() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (folded).
        assert_eq!(checksum(0, &hex("0001f203f4f5f6f7")), !0xddf2);
        // The IPv4 header of the usual worked example (checksum b861).
        let h = hex("450000730000400040110000c0a80001c0a800c7");
        assert_eq!(checksum(0, &h), 0xb861);
        let with = hex("45000073000040004011b861c0a80001c0a800c7");
        assert_eq!(checksum(0, &with), 0, "a header with its checksum sums to zero");
        assert_eq!(checksum(0, &[0xff]), !0xff00, "odd length: padded with a zero byte");
    }

    /// The RST|ACK Linux 6.18 sent for a connect from 127.0.0.1:40000 to the closed port
    /// 127.0.0.1:1 (captured with an AF_PACKET socket on lo; the kernel computes a reset's
    /// checksum in software, so the capture holds the final value).
    const KERNEL_RST_V4: &str =
        "450000280000400040063cce7f0000017f00000100019c400000000025d50d7e50140000e2390000";
    /// Same for [::1]:40000 to [::1]:1. Its first 4 bytes hold a flow label, which we leave 0,
    /// and its checksum field only the pseudo-header's sum: IPv6 resets leave the rest to
    /// checksum offload (CHECKSUM_PARTIAL), which lo never completes.
    const KERNEL_RST_V6: &str = "60047a7600140640000000000000000000000000000000010000000000000000000000000000000100019c40000000001ac18fe250140000001c0000";

    #[test]
    fn an_ipv4_rst_is_byte_for_byte_the_kernels_own() {
        let from: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let to: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let p = rst(from, to, 0, 0x25d5_0d7e).unwrap();
        assert_eq!(p, hex(KERNEL_RST_V4));
        assert_eq!(checksum(0, &p[..20]), 0);
    }

    #[test]
    fn an_ipv6_rst_is_the_kernels_own_but_for_the_flow_label() {
        let from: SocketAddr = "[::1]:1".parse().unwrap();
        let to: SocketAddr = "[::1]:40000".parse().unwrap();
        let p = rst(from, to, 0, 0x1ac1_8fe2).unwrap();
        let k = hex(KERNEL_RST_V6);
        assert_eq!(p.len(), V6_LEN);
        assert_eq!(p[0] >> 4, 6);
        assert_eq!(&p[4..56], &k[4..56], "all but the flow label and the checksum");
        // The kernel's pseudo-header sum, completed over the TCP header as offload would.
        let partial = u32::from(u16::from_be_bytes([k[56], k[57]]));
        let mut tcp = p[40..].to_vec();
        tcp[16..18].fill(0);
        assert_eq!(checksum(partial, &tcp).to_be_bytes(), [p[56], p[57]]);
        let pseudo = sum(&p[8..24]) + sum(&p[24..40]) + 20 + 6;
        assert_eq!(checksum(pseudo, &p[40..]), 0);
    }

    #[test]
    fn a_v4_mapped_peer_gets_an_ipv4_packet_and_mixed_families_none() {
        let from: SocketAddr = "[::ffff:192.0.2.1]:6443".parse().unwrap();
        let to: SocketAddr = "[::ffff:198.51.100.7]:50000".parse().unwrap();
        let p = rst(from, to, 7, 9).unwrap();
        assert_eq!((p.len(), p[0]), (V4_LEN, 0x45));
        assert_eq!(&p[12..20], &[192, 0, 2, 1, 198, 51, 100, 7]);
        assert_eq!(u32::from_be_bytes(p[24..28].try_into().unwrap()), 7, "seq");
        let v6: SocketAddr = "[2001:db8::1]:6443".parse().unwrap();
        assert_eq!(rst(v6, to, 0, 0), None);
        assert_eq!(rst(to, v6, 0, 0), None);
    }

    #[test]
    fn the_tcp_checksum_covers_the_pseudo_header() {
        let a: SocketAddr = "192.0.2.1:6443".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:50000".parse().unwrap();
        let p = rst(a, b, 1, 2).unwrap();
        let pseudo = sum(&p[12..16]) + sum(&p[16..20]) + 6 + 20;
        assert_eq!(checksum(pseudo, &p[20..]), 0);
        let q = rst("192.0.2.3:6443".parse().unwrap(), b, 1, 2).unwrap();
        assert_ne!(p[36..38], q[36..38], "another source, another checksum");
    }
}
