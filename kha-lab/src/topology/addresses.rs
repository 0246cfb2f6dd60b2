//! The lab's addresses and ports: the node's bridge, master `i`'s IPv4 and IPv6 addresses
//! (documentation prefixes only), the HTTPS and identity ports every master listens on.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const HTTPS_PORT: u16 = 6443;
pub const IDENT_PORT: u16 = 7000;
/// Keeps master addresses within 192.0.2.11..=192.0.2.99.
pub const MAX_MASTERS: usize = 89;

/// Master `i` (1-based) IPv4 address: 192.0.2.(10+i).
pub fn master_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// Master `i` (1-based) IPv6 address: 2001:db8::(10+i), the decimal digits
/// read as hex so master 1 is `2001:db8::11`, like its IPv4 address.
pub fn master_v6(i: usize) -> Ipv6Addr {
    let group = u16::from_str_radix(&(10 + i).to_string(), 16).unwrap_or(0);
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_documented_plan() {
        assert_eq!(master_v4(1), Ipv4Addr::new(192, 0, 2, 11));
        assert_eq!(master_v6(1).to_string(), "2001:db8::11");
        assert_eq!(master_v6(3).to_string(), "2001:db8::13");
        assert_eq!(master_v4(MAX_MASTERS), Ipv4Addr::new(192, 0, 2, 99));
        assert_eq!(master_v6(MAX_MASTERS).to_string(), "2001:db8::99");
    }
}
