//! Per-client attribution: who opened the connections kha redirected. The connect hook counts
//! each rewritten connect under the client's cgroup (`bpf_get_current_cgroup_id`, the cgroup
//! v2 inode number), the frontend and the backend, and keeps the process name of the last
//! connect; sock_ops counts the open ones with `BackendStats::active` (SYN sent to close).
//!
//! Bounded: an LRU hash of `CLIENTS_CAPACITY` entries, so a node with many short-lived
//! cgroups (jobs, cron pods) evicts the least recently connecting client, never grows.

use crate::addr::AddrBe;

/// Clients: `ClientKey -> ClientStats`. Written by the kernel only.
pub const MAP_CLIENTS: &str = "KHA_CLIENTS";
/// Entries of `KHA_CLIENTS`: (cgroup, frontend, backend) triples. Only the host network
/// namespace is rewritten, so the clients are the node's own (kubelet, kube-proxy, agents,
/// host-network pods): tens, each using a few backends through one or two frontends. Each
/// entry pins about 136 bytes (LRU maps are preallocated), about 136 KiB in all (4096 took
/// 545 KiB of the agent's 10 MiB budget).
pub const CLIENTS_CAPACITY: usize = 1024;
/// `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;

/// Key of `KHA_CLIENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey {
    /// The connecting task's cgroup v2 id (the inode number of its cgroup directory).
    pub cgroup_id: u64,
    pub frontend_addr_be: AddrBe,
    pub frontend_port_be: u16,
    pub _pad: u16,
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<ClientKey>() == 32);

impl ClientKey {
    #[inline(always)]
    pub const fn new(
        cgroup_id: u64,
        frontend_addr_be: AddrBe,
        frontend_port_be: u16,
        backend_id: u32,
    ) -> Self {
        Self { cgroup_id, frontend_addr_be, frontend_port_be, _pad: 0, backend_id }
    }
}

/// Value of `KHA_CLIENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connects rewritten to this backend from this cgroup (atomic adds).
    pub connects: u64,
    /// Of those, sockets from SYN sent until closed, as `BackendStats::active`. Wraps if a
    /// close is missed (an entry evicted and made again while its sockets were open): read it
    /// with `open_count`.
    pub open: u64,
    /// The process name of the last connect (`bpf_get_current_comm`), NUL-padded.
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<ClientStats>() == 32);

impl ClientStats {
    pub const ZERO: Self = Self { connects: 0, open: 0, comm: [0; COMM_LEN] };

    /// `open` as a count: a missed close must not show a client with 2^64 connections.
    pub fn open_count(&self) -> u64 {
        if self.open > u32::MAX as u64 { 0 } else { self.open }
    }

    /// The process name, up to its first NUL; non-UTF-8 bytes replaced.
    #[cfg(feature = "user")]
    pub fn comm(&self) -> std::string::String {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        std::string::String::from_utf8_lossy(&self.comm[..end]).into_owned()
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::ClientStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_close_reads_as_no_open_connection() {
        let s = ClientStats { open: 0u64.wrapping_sub(1), ..ClientStats::ZERO };
        assert_eq!(s.open_count(), 0);
        assert_eq!(ClientStats { open: 3, ..ClientStats::ZERO }.open_count(), 3);
    }

    #[test]
    fn the_name_fits_the_kernel_limit() {
        assert!(MAP_CLIENTS.len() <= 15 && MAP_CLIENTS.starts_with("KHA_"));
    }
}
