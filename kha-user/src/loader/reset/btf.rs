//! Finds the offsets of the socket fields the TCP iterator reads (`IterOffsets`) in the
//! running kernel's BTF (`/sys/kernel/btf/vmlinux`). Rust eBPF has no CO-RE relocations, so
//! this is done here, once, and the offsets are given to the program as a read-only global.
//! aya-obj parses BTF but keeps struct members private; the few kinds needed here are simple.

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;
/// Anonymous members nest a few levels deep in `struct sock_common`; more means a loop.
const MAX_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF data (bad magic or truncated header)")]
    Header,
    #[error("BTF type {id} is truncated or of unknown kind {kind}")]
    Type { id: u32, kind: u32 },
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(&'static str),
    #[error("struct {strukt} has no member {member} in the kernel's BTF")]
    NoMember { strukt: &'static str, member: &'static str },
    #[error("{strukt}.{member} is {found} bytes at bit {bit_offset}, not {want} byte-aligned bytes")]
    Shape { strukt: &'static str, member: &'static str, found: u32, want: u32, bit_offset: u32 },
}

#[derive(Clone, Copy)]
struct Ty {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    /// Offset of the kind-specific data after the 12-byte common part.
    data: usize,
}

impl Ty {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }
    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }
    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

pub struct Btf<'a> {
    types: Vec<Ty>,
    raw: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl<'a> Btf<'a> {
    /// Parses native-endian BTF (what the running kernel exports).
    pub fn parse(raw: &'a [u8]) -> Result<Self, BtfError> {
        let magic = raw.get(0..2).map(|m| u16::from_ne_bytes([m[0], m[1]]));
        if magic != Some(MAGIC) {
            return Err(BtfError::Header);
        }
        let hdr = |i: usize| u32_at(raw, 4 + 4 * i).map(|v| v as usize).ok_or(BtfError::Header);
        let (hdr_len, type_off, type_len, str_off, str_len) = (hdr(0)?, hdr(1)?, hdr(2)?, hdr(3)?, hdr(4)?);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Header)?;
            raw.get(start..start.checked_add(len).ok_or(BtfError::Header)?).ok_or(BtfError::Header)
        };
        let types_raw = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        // Type id 0 is `void`; ids count from 1 in order.
        let mut types = vec![Ty { name_off: 0, info: 0, size_or_type: 0, data: 0 }];
        let mut off = 0;
        while off < types_raw.len() {
            let id = types.len() as u32;
            let bad = |kind| BtfError::Type { id, kind };
            let (name_off, info, size_or_type) =
                match (u32_at(types_raw, off), u32_at(types_raw, off + 4), u32_at(types_raw, off + 8)) {
                    (Some(a), Some(b), Some(c)) => (a, b, c),
                    _ => return Err(bad(0)),
                };
            let ty = Ty { name_off, info, size_or_type, data: off + 12 };
            let extra = match ty.kind() {
                KIND_INT | 14 | 17 => 4, // INT, VAR, DECL_TAG
                2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | 12 | 16
                | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | 15 | KIND_ENUM64 => 12 * ty.vlen(), // + DATASEC
                KIND_ENUM | 13 => 8 * ty.vlen(),                               // + FUNC_PROTO
                k => return Err(bad(k)),
            };
            off = ty.data + extra;
            if off > types_raw.len() {
                return Err(bad(ty.kind()));
            }
            types.push(ty);
        }
        Ok(Self { types, raw: types_raw, strings })
    }

    fn name(&self, ty: &Ty) -> &[u8] {
        let s = self.strings.get(ty.name_off as usize..).unwrap_or(&[]);
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    fn ty(&self, id: u32) -> Option<&Ty> {
        self.types.get(id as usize)
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Ty> {
        for _ in 0..MAX_DEPTH {
            let ty = self.ty(id)?;
            match ty.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type
                }
                _ => return Some(ty),
            }
        }
        None
    }

    fn size(&self, id: u32) -> Option<u32> {
        let ty = self.resolve(id)?;
        match ty.kind() {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => Some(ty.size_or_type),
            KIND_ARRAY => {
                let elem = u32_at(self.raw, ty.data)?;
                let n = u32_at(self.raw, ty.data + 8)?;
                self.size(elem)?.checked_mul(n)
            }
            _ => None,
        }
    }

    /// (bit offset, type id) of the member named `name` of struct/union `ty`, looking into
    /// anonymous struct and union members.
    fn member(&self, ty: &Ty, name: &[u8], depth: usize) -> Option<(u32, u32)> {
        if depth > MAX_DEPTH || !matches!(ty.kind(), KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for i in 0..ty.vlen() {
            let m = ty.data + 12 * i;
            let (m_name, m_type, m_off) =
                (u32_at(self.raw, m)?, u32_at(self.raw, m + 4)?, u32_at(self.raw, m + 8)?);
            let bit = if ty.kind_flag() { m_off & 0x00ff_ffff } else { m_off };
            let probe = Ty { name_off: m_name, info: 0, size_or_type: 0, data: 0 };
            let m_name = self.name(&probe);
            if m_name == name {
                return Some((bit, m_type));
            }
            if m_name.is_empty() {
                let inner = self.resolve(m_type)?;
                if let Some((b, t)) = self.member(inner, name, depth + 1) {
                    return Some((bit + b, t));
                }
            }
        }
        None
    }

    fn find_struct(&self, name: &'static str) -> Result<&Ty, BtfError> {
        self.types
            .iter()
            .find(|t| t.kind() == KIND_STRUCT && t.vlen() > 0 && self.name(t) == name.as_bytes())
            .ok_or(BtfError::NoStruct(name))
    }

    /// Byte offset and size of `strukt.member` (byte-aligned).
    fn locate(&self, strukt: &'static str, member: &'static str) -> Result<(u32, u32), BtfError> {
        let ty = self.find_struct(strukt)?;
        let (bit, ty_id) =
            self.member(ty, member.as_bytes(), 0).ok_or(BtfError::NoMember { strukt, member })?;
        let found = self.size(ty_id).unwrap_or(0);
        if bit % 8 != 0 {
            return Err(BtfError::Shape { strukt, member, found, want: found, bit_offset: bit });
        }
        Ok((bit / 8, found))
    }

    /// Byte offset of `strukt.member`, checked to be `want` bytes wide and byte-aligned.
    pub fn offset(&self, strukt: &'static str, member: &'static str, want: u32) -> Result<u32, BtfError> {
        let (off, found) = self.locate(strukt, member)?;
        if found != want {
            return Err(BtfError::Shape { strukt, member, found, want, bit_offset: off * 8 });
        }
        Ok(off)
    }

    /// Everything the iterator reads, from the start of `struct tcp_sock`, whose `sock_common`
    /// is reached through `inet_connection_sock`, `inet_sock` and `sock`.
    pub fn iter_offsets(&self) -> Result<kha_common::IterOffsets, BtfError> {
        let mut common = 0;
        for (strukt, member) in [
            ("tcp_sock", "inet_conn"),
            ("inet_connection_sock", "icsk_inet"),
            ("inet_sock", "sk"),
            ("sock", "__sk_common"),
        ] {
            common += self.locate(strukt, member)?.0;
        }
        let sc = |m, w| self.offset("sock_common", m, w).map(|o| o + common);
        let offsets = kha_common::IterOffsets {
            daddr: sc("skc_daddr", 4)?,
            rcv_saddr: sc("skc_rcv_saddr", 4)?,
            dport: sc("skc_dport", 2)?,
            num: sc("skc_num", 2)?,
            family: sc("skc_family", 2)?,
            state: sc("skc_state", 1)?,
            v6_daddr: sc("skc_v6_daddr", 16)?,
            v6_rcv_saddr: sc("skc_v6_rcv_saddr", 16)?,
            rcv_nxt: self.offset("tcp_sock", "rcv_nxt", 4)?,
            snd_nxt: self.offset("tcp_sock", "snd_nxt", 4)?,
        };
        Ok(offsets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob: `int` (4 bytes), `char` (1), and
    /// `struct outer { int a; union { struct { char b; char c; }; int d; }; int e; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0char\0outer\0a\0b\0c\0d\0e\0";
        let s = |name: &str| {
            let pos = strings
                .windows(name.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0);
            (pos.unwrap() + 1) as u32
        };
        let mut t: Vec<u32> = Vec::new();
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        // 1: int
        t.extend([s("int"), info(KIND_INT, 0), 4, 32]);
        // 2: char
        t.extend([s("char"), info(KIND_INT, 0), 1, 8]);
        // 3: anonymous struct { char b; char c; }
        t.extend([0, info(KIND_STRUCT, 2), 2, s("b"), 2, 0, s("c"), 2, 8]);
        // 4: anonymous union { struct 3; int d; }
        t.extend([0, info(KIND_UNION, 2), 4, 0, 3, 0, s("d"), 1, 0]);
        // 5: typedef-free struct outer { int a; union 4 at 32; int e at 64; }
        t.extend([s("outer"), info(KIND_STRUCT, 3), 12, s("a"), 1, 0, 0, 4, 32, s("e"), 1, 64]);
        let types: Vec<u8> = t.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut b = Vec::new();
        b.extend(MAGIC.to_ne_bytes());
        b.extend([1u8, 0]);
        for v in [24u32, 0, types.len() as u32, types.len() as u32, strings.len() as u32] {
            b.extend(v.to_ne_bytes());
        }
        b.extend(types);
        b.extend(strings);
        b
    }

    #[test]
    fn members_are_found_through_anonymous_unions_and_structs() {
        let raw = blob();
        let btf = Btf::parse(&raw).unwrap();
        assert_eq!(btf.offset("outer", "a", 4), Ok(0));
        assert_eq!(btf.offset("outer", "b", 1), Ok(4));
        assert_eq!(btf.offset("outer", "c", 1), Ok(5));
        assert_eq!(btf.offset("outer", "d", 4), Ok(4));
        assert_eq!(btf.offset("outer", "e", 4), Ok(8));
    }

    #[test]
    fn a_wrong_size_or_a_missing_name_is_an_error_not_an_offset() {
        let raw = blob();
        let btf = Btf::parse(&raw).unwrap();
        assert!(matches!(btf.offset("outer", "a", 2), Err(BtfError::Shape { found: 4, want: 2, .. })));
        assert_eq!(btf.offset("outer", "z", 4), Err(BtfError::NoMember { strukt: "outer", member: "z" }));
        assert_eq!(btf.offset("inner", "a", 4), Err(BtfError::NoStruct("inner")));
    }

    #[test]
    fn truncated_or_foreign_data_is_refused_without_panicking() {
        let raw = blob();
        assert_eq!(Btf::parse(b"").err(), Some(BtfError::Header));
        assert_eq!(Btf::parse(&raw[..10]).err(), Some(BtfError::Header));
        for cut in 24..raw.len() {
            let _ = Btf::parse(&raw[..cut]); // any answer but a panic
        }
        let mut bad = raw.clone();
        bad[24 + 4 + 3] = 0x1f; // type 1 of kind 31
        assert!(matches!(Btf::parse(&bad), Err(BtfError::Type { id: 1, .. })));
    }

    /// The running kernel's BTF, when readable (it is world-readable; no root needed).
    #[test]
    fn the_running_kernels_socket_fields_are_found() {
        let Ok(raw) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux");
            return;
        };
        let off = Btf::parse(&raw).unwrap().iter_offsets().unwrap();
        // sock_common's first fields have had these offsets since Linux 4.x.
        assert_eq!((off.daddr, off.rcv_saddr, off.dport, off.num), (0, 4, 12, 14));
        assert!(off.rcv_nxt > off.v6_rcv_saddr && off.snd_nxt > off.v6_rcv_saddr, "{off:?}");
    }
}
