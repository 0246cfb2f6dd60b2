//! The live datapath trace (`kha trace`): one record per connect decision, written by the
//! traced twins of the connect programs (kha-ebpf's `kha-trace` object) into a ring buffer the
//! agent reads while a trace runs. The untraced programs never see this type.

use crate::addr::AddrBe;

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

#[cfg(test)]
mod tests {
    use super::*;

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
