//! Map addresses as `SocketAddr`, for the agent: the kernel never converts, it compares bytes.

use core::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::{
    AddrBe, Backend, ServiceKey, TRACE_FILTER_MAX, TraceDestination, TraceFilter, is_v4_mapped, v4_of_mapped,
};

/// The map form of an address: IPv4 stored v4-mapped (see [`crate::addr`]).
pub fn addr_be_of(ip: IpAddr) -> AddrBe {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The socket address a map entry stands for; v4-mapped entries read back as IPv4.
pub fn socket_addr(addr_be: &AddrBe, port_be: u16) -> SocketAddr {
    let ip = if is_v4_mapped(addr_be) {
        IpAddr::V4(u32::from_be(v4_of_mapped(addr_be)).into())
    } else {
        IpAddr::V6(Ipv6Addr::from(*addr_be))
    };
    SocketAddr::new(ip, u16::from_be(port_be))
}

impl From<SocketAddr> for Backend {
    fn from(addr: SocketAddr) -> Self {
        Backend::new(addr_be_of(addr.ip()), addr.port().to_be())
    }
}

impl From<&Backend> for SocketAddr {
    fn from(b: &Backend) -> Self {
        socket_addr(&b.addr_be, b.port_be)
    }
}

impl ServiceKey {
    /// The key of `frontend`'s `slot` (0: the frontend entry).
    pub fn at(frontend: SocketAddr, slot: u16) -> Self {
        ServiceKey::new(addr_be_of(frontend.ip()), frontend.port().to_be(), slot)
    }
}

/// The frontend a key belongs to, whatever its slot.
impl From<&ServiceKey> for SocketAddr {
    fn from(k: &ServiceKey) -> Self {
        socket_addr(&k.addr_be, k.port_be)
    }
}

impl TraceFilter {
    /// The kernel's filter for a trace of `destinations`: every connect when there are none,
    /// or more than the kernel's filter holds (the agent filters those itself).
    pub fn of(destinations: &[SocketAddr]) -> Self {
        let mut f = TraceFilter::ALL;
        if destinations.len() > TRACE_FILTER_MAX {
            return f;
        }
        for (d, a) in f.destinations.iter_mut().zip(destinations) {
            *d = TraceDestination { addr_be: addr_be_of(a.ip()), port_be: a.port().to_be(), _pad: [0; 6] };
        }
        f.count = destinations.len() as u32;
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_round_trip_through_the_map_forms() {
        for a in ["127.0.0.1:6443", "[::1]:6443", "[2001:db8::7]:443", "192.0.2.9:1"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(SocketAddr::from(&Backend::from(a)), a);
            assert_eq!(SocketAddr::from(&ServiceKey::at(a, 9)), a);
            assert_eq!(ServiceKey::at(a, 9).slot, 9);
        }
    }

    #[test]
    fn ipv4_is_stored_v4_mapped_in_network_order() {
        let b = Backend::from("192.0.2.1:6443".parse::<SocketAddr>().unwrap());
        assert_eq!(b.addr_be, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]);
        assert_eq!(b.port_be, 6443u16.to_be());
    }

    #[test]
    fn a_trace_filter_holds_up_to_eight_destinations_in_map_form() {
        let a: SocketAddr = "127.0.0.1:6443".parse().unwrap();
        let b: SocketAddr = "[::1]:6443".parse().unwrap();
        let f = TraceFilter::of(&[a, b]);
        assert_eq!(f.count, 2);
        assert!(f.wants(&addr_be_of(b.ip()), 6443u16.to_be()));
        assert!(!f.wants(&addr_be_of(a.ip()), 7443u16.to_be()));
        assert_eq!(TraceFilter::of(&[]), TraceFilter::ALL);
        assert_eq!(TraceFilter::of(&[a; TRACE_FILTER_MAX + 1]), TraceFilter::ALL, "the agent filters");
    }
}
