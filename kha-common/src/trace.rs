//! The live datapath trace (`kha trace`): one record per connect decision, written by the
//! traced twins of the connect programs (kha-ebpf's `kha-trace` object) into a ring buffer the
//! agent reads while a trace runs. The untraced programs never see this type.

use crate::addr::{AddrBe, words_from_addr};

/// The trace object's ring buffer. Not pinned: it lives as long as the agent's trace does.
pub const MAP_TRACE: &str = "KHA_TRACE";
/// Per-CPU count of the records the ring had no room for.
pub const MAP_TRACE_LOST: &str = "KHA_TRACE_LOST";
/// Ring buffer bytes: 256 KiB holds about 2,900 records (88 bytes + an 8-byte header) between
/// two reads of the agent.
pub const TRACE_RING_BYTES: usize = 256 * 1024;
/// The traced programs' names in the `kha-trace` object (visible in `bpftool prog show`).
pub const TRACE_PROG4: &str = "kha_trace4";
pub const TRACE_PROG6: &str = "kha_trace6";

/// The trace object's global naming the destinations to report (`kha trace --frontend`), set
/// by the agent before it loads the object for a trace. No entries: every connect.
pub const TRACE_FILTER_GLOBAL: &str = "KHA_TRACE_FILTER";
/// Destinations one trace filters on in the kernel. A trace asking for more reports every
/// connect from the kernel and leaves the filtering to the agent.
pub const TRACE_FILTER_MAX: usize = 8;

/// One destination of a [`TraceFilter`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceDestination {
    pub addr_be: AddrBe,
    pub port_be: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<TraceDestination>() == 24);

/// Which connects the traced programs report: without it, every connect the node makes
/// (almost all to non-frontends) would fill the ring and the rate bound of a trace that asked
/// for one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceFilter {
    /// Entries of `destinations` in use; 0: every connect.
    pub count: u32,
    pub _pad: u32,
    pub destinations: [TraceDestination; TRACE_FILTER_MAX],
}
const _: () = assert!(size_of::<TraceFilter>() == 8 + 24 * TRACE_FILTER_MAX);

impl TraceFilter {
    pub const ALL: Self = Self {
        count: 0,
        _pad: 0,
        destinations: [TraceDestination { addr_be: [0; 16], port_be: 0, _pad: [0; 6] }; TRACE_FILTER_MAX],
    };

    /// Whether a connect to `addr_be:port_be` is reported. A bounded loop and word compares,
    /// for the verifier (no memcmp in BPF).
    #[inline(always)]
    pub fn wants(&self, addr_be: &AddrBe, port_be: u16) -> bool {
        let n = self.count as usize;
        if n == 0 {
            return true;
        }
        let w = words_from_addr(addr_be);
        let mut i = 0;
        while i < TRACE_FILTER_MAX && i < n {
            let d = &self.destinations[i];
            let v = words_from_addr(&d.addr_be);
            if d.port_be == port_be && v[0] == w[0] && v[1] == w[1] && v[2] == w[2] && v[3] == w[3] {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Rewritten to `backend_*`.
pub const TRACE_REWRITTEN: u8 = 0;
/// Left alone: the destination is not a frontend.
pub const TRACE_NOT_A_FRONTEND: u8 = 1;
/// Left alone: a frontend, but the socket is in another network namespace.
pub const TRACE_FOREIGN_NETNS: u8 = 2;
/// Refused (EHOSTUNREACH): the frontend has no backend.
pub const TRACE_NO_BACKEND: u8 = 3;
/// Refused (EHOSTUNREACH): the maps disagree (a slot or backend missing, IPv6 for an IPv4 socket).
pub const TRACE_INCONSISTENT: u8 = 4;
/// Indexed by `TRACE_*` outcome; the names `kha trace` prints.
pub const TRACE_OUTCOMES: [&str; 5] =
    ["rewritten", "not-a-frontend", "foreign-netns", "no-backend", "inconsistent"];

/// `flags`: a suspect backend was passed over.
pub const TRACE_SKIPPED_SUSPECT: u8 = 1;
/// `flags`: every backend looked at was suspect; the chosen one was used anyway.
pub const TRACE_ALL_SUSPECT: u8 = 2;
/// `flags`: the chosen backend is itself marked suspect.
pub const TRACE_CHOSEN_SUSPECT: u8 = 4;

/// One decision. Fields the outcome does not reach are zero (e.g. no backend when refused).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// The connecting task's cgroup v2 id (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
    /// `tgid << 32 | tid` (`bpf_get_current_pid_tgid`).
    pub pid_tgid: u64,
    /// The chosen backend's open connections (sock_ops' count) when it was chosen.
    pub active: u64,
    /// `bpf_get_current_comm`: NUL-padded.
    pub comm: [u8; 16],
    /// Where the connect was going (the frontend, if it is one).
    pub dst_addr_be: AddrBe,
    pub backend_addr_be: AddrBe,
    pub dst_port_be: u16,
    pub backend_port_be: u16,
    pub backend_id: u32,
    /// Backends the frontend had.
    pub count: u16,
    /// 4 (connect4) or 6 (connect6).
    pub family: u8,
    /// `TRACE_*` outcome.
    pub outcome: u8,
    /// `POLICY_*` of the frontend; 0 where no frontend was found.
    pub policy: u8,
    /// `TRACE_SKIPPED_SUSPECT | TRACE_ALL_SUSPECT | TRACE_CHOSEN_SUSPECT`.
    pub flags: u8,
    pub _pad: u16,
}

const _: () = assert!(size_of::<TraceEvent>() == 88);

impl TraceEvent {
    pub const ZERO: Self = Self {
        cgroup_id: 0,
        pid_tgid: 0,
        active: 0,
        comm: [0; 16],
        dst_addr_be: [0; 16],
        backend_addr_be: [0; 16],
        dst_port_be: 0,
        backend_port_be: 0,
        backend_id: 0,
        count: 0,
        family: 0,
        outcome: 0,
        policy: 0,
        flags: 0,
        _pad: 0,
    };

    /// Reads a record as the ring buffer hands it over; `None` for one of another size.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != size_of::<Self>() {
            return None;
        }
        // SAFETY: the size matches and every bit pattern is a valid TraceEvent (integers and
        // byte arrays only); read_unaligned because the slice may not be 8-aligned.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }

    /// The process name up to its first NUL.
    pub fn comm(&self) -> &[u8] {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(self.comm.len());
        &self.comm[..end]
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::TraceFilter {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_takes_its_destinations_only_and_none_means_every_connect() {
        let a = crate::v4_mapped(u32::from_be_bytes([127, 0, 0, 1]));
        let (p, q) = (6443u16.to_be(), 2379u16.to_be());
        assert!(TraceFilter::ALL.wants(&a, p));
        let mut f = TraceFilter::ALL;
        f.count = 1;
        f.destinations[0] = TraceDestination { addr_be: a, port_be: p, _pad: [0; 6] };
        assert!(f.wants(&a, p));
        assert!(!f.wants(&a, q), "another port");
        let mut b = a;
        b[15] = 2;
        assert!(!f.wants(&b, p), "another address");
        // Entries beyond `count` are not looked at.
        f.destinations[1] = TraceDestination { addr_be: b, port_be: p, _pad: [0; 6] };
        assert!(!f.wants(&b, p));
        f.count = 2;
        assert!(f.wants(&b, p));
    }

    #[test]
    fn a_record_reads_back_from_its_bytes_and_other_sizes_are_refused() {
        let mut e = TraceEvent::ZERO;
        e.cgroup_id = 0x1122_3344_5566_7788;
        e.comm[..4].copy_from_slice(b"curl");
        e.backend_id = 7;
        e.outcome = TRACE_NO_BACKEND;
        // SAFETY: a plain-old-data struct viewed as bytes.
        let bytes = unsafe {
            core::slice::from_raw_parts((&e as *const TraceEvent).cast::<u8>(), size_of::<TraceEvent>())
        };
        let mut shifted = [0u8; 89];
        shifted[1..].copy_from_slice(bytes);
        assert_eq!(TraceEvent::from_bytes(&shifted[1..]), Some(e));
        assert_eq!(TraceEvent::from_bytes(&shifted), None);
        assert_eq!(TraceEvent::from_bytes(&shifted[2..]), None);
        assert_eq!(e.comm(), b"curl");
    }

    #[test]
    fn a_full_length_comm_has_no_nul_and_is_kept_whole() {
        let mut e = TraceEvent::ZERO;
        e.comm = *b"sixteen-bytes-xy";
        assert_eq!(e.comm(), b"sixteen-bytes-xy");
        assert_eq!(TRACE_OUTCOMES[TRACE_INCONSISTENT as usize], "inconsistent");
    }
}
