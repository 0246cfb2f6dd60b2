//! The TCP iterator's output: `TcpRecord`s back to back, turned into sockets with addresses.
//! Pure: the iterator's file is read elsewhere.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use kha_common::TcpRecord;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
pub const TCP_ESTABLISHED: u8 = 1;
const RECORD_LEN: usize = size_of::<TcpRecord>();

/// One socket kha redirected, as the iterator saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sock {
    pub cookie: u64,
    pub local: SocketAddr,
    /// The backend it is connected to; for an IPv6 socket to an IPv4 backend, v4-mapped.
    pub remote: SocketAddr,
    pub state: u8,
    pub rcv_nxt: u32,
    pub snd_nxt: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the TCP iterator wrote {len} bytes, not a whole number of {RECORD_LEN}-byte records; kha-ebpf and kha-user are from different builds"
)]
pub struct Truncated {
    pub len: usize,
}

/// Every record in `buf`; records of a family other than IPv4 and IPv6 are skipped.
pub fn parse(buf: &[u8]) -> Result<Vec<Sock>, Truncated> {
    if !buf.len().is_multiple_of(RECORD_LEN) {
        return Err(Truncated { len: buf.len() });
    }
    Ok(buf
        .as_chunks::<RECORD_LEN>()
        .0
        .iter()
        .filter_map(|c| {
            // SAFETY: RECORD_LEN bytes; TcpRecord is plain integers, any bit pattern is valid.
            let r: TcpRecord = unsafe { std::ptr::read_unaligned(c.as_ptr().cast()) };
            sock(&r)
        })
        .collect())
}

fn sock(r: &TcpRecord) -> Option<Sock> {
    let rport = u16::from_be(r.dport_be);
    let (local, remote) = match r.family {
        AF_INET => (
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(r.rcv_saddr_be.to_ne_bytes()), r.num)),
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(r.daddr_be.to_ne_bytes()), rport)),
        ),
        AF_INET6 => (
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(r.v6_rcv_saddr_be), r.num, 0, 0)),
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(r.v6_daddr_be), rport, 0, 0)),
        ),
        _ => return None,
    };
    Some(Sock { cookie: r.cookie, local, remote, state: r.state, rcv_nxt: r.rcv_nxt, snd_nxt: r.snd_nxt })
}

/// An address with a v4-mapped IPv6 address as the IPv4 one, so a socket's peer compares
/// equal to the backend kha recorded, whichever way each is written.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(r: &TcpRecord) -> Vec<u8> {
        // SAFETY: reading a plain #[repr(C)] value's bytes.
        unsafe { std::slice::from_raw_parts((r as *const TcpRecord).cast::<u8>(), RECORD_LEN) }.to_vec()
    }

    #[test]
    fn an_ipv4_record_reads_as_the_kernel_wrote_it() {
        let r = TcpRecord {
            cookie: 0x1122_3344_5566_7788,
            daddr_be: u32::from_ne_bytes([192, 0, 2, 11]),
            rcv_saddr_be: u32::from_ne_bytes([198, 51, 100, 2]),
            dport_be: 6443u16.to_be(),
            num: 40000,
            family: AF_INET,
            state: TCP_ESTABLISHED,
            rcv_nxt: 0xdead_beef,
            snd_nxt: 7,
            ..TcpRecord::ZERO
        };
        let s = parse(&bytes(&r)).unwrap();
        assert_eq!(
            s,
            [Sock {
                cookie: 0x1122_3344_5566_7788,
                local: "198.51.100.2:40000".parse().unwrap(),
                remote: "192.0.2.11:6443".parse().unwrap(),
                state: 1,
                rcv_nxt: 0xdead_beef,
                snd_nxt: 7,
            }]
        );
    }

    #[test]
    fn a_v6_socket_on_a_v4_backend_compares_equal_to_the_backend() {
        let mut r = TcpRecord { family: AF_INET6, dport_be: 6443u16.to_be(), num: 1, ..TcpRecord::ZERO };
        r.v6_daddr_be = "::ffff:192.0.2.11".parse::<Ipv6Addr>().unwrap().octets();
        r.v6_rcv_saddr_be = "::ffff:198.51.100.2".parse::<Ipv6Addr>().unwrap().octets();
        let mut two = bytes(&r);
        r.family = 17; // AF_PACKET: skipped
        two.extend(bytes(&r));
        let s = parse(&two).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(canonical(s[0].remote), "192.0.2.11:6443".parse().unwrap());
        assert!(matches!(s[0].remote, SocketAddr::V6(_)));
    }

    #[test]
    fn a_partial_record_is_an_error() {
        assert_eq!(parse(&[]), Ok(vec![]));
        assert_eq!(parse(&[0; 65]), Err(Truncated { len: 65 }));
    }
}
