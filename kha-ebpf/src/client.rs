//! Per-client attribution (kha-common `client`): the connect hook counts a rewritten connect
//! under its cgroup, sock_ops counts the client's open sockets with the backend's `active`.
//! Best effort throughout: a full or racing map loses a count, never a connect.

use aya_ebpf::helpers::generated::{bpf_get_current_cgroup_id, bpf_get_current_comm};
use kha_common::{COMM_LEN, ClientKey, ClientStats, Conn, ServiceKey};

use crate::maps::{KHA_CLIENTS, add};

/// `BPF_NOEXIST`: a racing CPU's entry is counted into, not overwritten.
const NOEXIST: u64 = 1;

/// Counts a connect from the current task to `backend_id` through `frontend`; returns the
/// task's cgroup id for the connection's `Conn`. Only for connect hooks (process context).
#[inline(always)]
pub fn connected(frontend: &ServiceKey, backend_id: u32) -> u64 {
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let key = ClientKey::new(cgroup_id, frontend.addr_be, frontend.port_be, backend_id);
    let entry = match KHA_CLIENTS.get_ptr_mut(&key) {
        Some(e) => Some(e),
        // The first connect of this triple: insert zeros, then count as for any other (an
        // insert that lost a race counts into the winner's entry).
        None => {
            let _ = KHA_CLIENTS.insert(&key, &ClientStats::ZERO, NOEXIST);
            KHA_CLIENTS.get_ptr_mut(&key)
        }
    };
    if let Some(e) = entry {
        add(unsafe { &raw mut (*e).connects }, 1);
        // Straight into the map value; racy between CPUs on purpose (a name is a name).
        unsafe { bpf_get_current_comm((&raw mut (*e).comm).cast(), COMM_LEN as u32) };
    }
    cgroup_id
}

/// Adds `delta` (`u64::MAX` for -1) to the open count of the connection's client. Safe in
/// softirq: the client comes from the `Conn`, not from the current task. A client evicted
/// meanwhile is not made again.
// Unused in the kha-trace object, which has no sock_ops program.
#[allow(dead_code)]
#[inline(always)]
pub fn open_delta(conn: *const Conn, delta: u64) {
    let c = unsafe { &*conn };
    if c.client_cgroup_id == 0 {
        return;
    }
    let key = ClientKey::new(c.client_cgroup_id, c.frontend_addr_be, c.frontend_port_be, c.backend_id);
    if let Some(e) = KHA_CLIENTS.get_ptr_mut(&key) {
        add(unsafe { &raw mut (*e).open }, delta);
    }
}
