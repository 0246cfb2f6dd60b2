//! Addresses in the maps are 16 bytes, network order. IPv4 addresses are stored v4-mapped
//! (`::ffff:a.b.c.d`), so one map serves both families, and an IPv6 socket connecting to a
//! v4-mapped frontend matches the IPv4 frontend entry.

/// An IPv6 address (or a v4-mapped IPv4 address) as the 16 bytes it has on the wire.
pub type AddrBe = [u8; 16];

const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// `ip4_be` is the address as the kernel hands it over: network order in a native u32.
#[inline(always)]
pub fn v4_mapped(ip4_be: u32) -> AddrBe {
    let b = ip4_be.to_ne_bytes();
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]]
}

#[inline(always)]
pub fn is_v4_mapped(addr: &AddrBe) -> bool {
    addr[..12] == V4_MAPPED_PREFIX
}

/// The IPv4 address of a v4-mapped address, network order in a native u32.
#[inline(always)]
pub fn v4_of_mapped(addr: &AddrBe) -> u32 {
    u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]])
}

/// The four 32-bit words of `user_ip6`/`remote_ip6` (each network order) as bytes.
#[inline(always)]
pub fn addr_from_words(w: [u32; 4]) -> AddrBe {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        a[i * 4] = b[0];
        a[i * 4 + 1] = b[1];
        a[i * 4 + 2] = b[2];
        a[i * 4 + 3] = b[3];
        i += 1;
    }
    a
}

/// Inverse of [`addr_from_words`].
#[inline(always)]
pub fn words_from_addr(a: &AddrBe) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_round_trip() {
        let ip = u32::from_ne_bytes([127, 0, 0, 1]);
        let m = v4_mapped(ip);
        assert_eq!(m, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]);
        assert!(is_v4_mapped(&m));
        assert_eq!(v4_of_mapped(&m), ip);
    }

    #[test]
    fn native_v6_is_not_mapped() {
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        assert!(!is_v4_mapped(&loopback));
    }

    #[test]
    fn words_round_trip_keeps_wire_order() {
        let a: AddrBe = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
        let w = words_from_addr(&a);
        assert_eq!(u32::from_be(w[0]), 0x2001_0db8);
        assert_eq!(addr_from_words(w), a);
    }
}
