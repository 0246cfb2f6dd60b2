//! The probe's TCP socket: created by the caller (in the network namespace the agent serves),
//! then tuned here so that a master that silently disappears is noticed in 1 to 2 s.
//!
//! ## Why these numbers
//!
//! A blackholed master (its link down, or every packet dropped) sends neither FIN nor RST; an
//! idle TCP connection to it would look fine for hours, and one with unacknowledged data would
//! retransmit for about 15 minutes (`tcp_retries2`). Two kernel mechanisms bound that:
//!
//! - TCP keepalive, [`KEEPALIVE_IDLE`] = 1 s, [`KEEPALIVE_INTERVAL`] = 1 s: one second after
//!   the last segment received, the kernel sends an empty probe; a live master's kernel ACKs it
//!   (its apiserver process is not involved), which restarts the clock. Both are whole seconds
//!   in the kernel API, so 1 s is the shortest possible.
//! - `TCP_USER_TIMEOUT` = [`USER_TIMEOUT`] = 1500 ms: when keepalive is on, the kernel checks it
//!   at each keepalive tick and aborts the connection (`ETIMEDOUT`) once at least one probe is
//!   unanswered and nothing was received for that long. Data waiting for an ACK (a probe
//!   request sent into the blackhole) is bounded by the same 1.5 s, shorter than the probe
//!   timeout.
//!
//! Timeline on an idle connection, last ACK received at t = 0 and the master gone right after:
//! keepalive probe at t = 1 s (unanswered), next tick at t = 2 s finds 2 s >= 1.5 s with one
//! probe out and aborts. A master that disappears between 0 and 1 s is therefore noticed 1 to
//! 2 s later, with no HTTP traffic: the pending idle read returns `ETIMEDOUT` and the prober
//! reports [`ProbeEvent::ConnectionLost`](super::ProbeEvent) with
//! `Timeout { phase: Idle }`. A live master's ACK to the probe sent at t = 1 s only has to
//! arrive before the tick at t = 2 s, so round-trip times up to about 1 s are safe.
//!
//! Measured between two network namespaces joined by a veth pair, blackholing the master by
//! removing its address or setting its link down at 0 to 2.5 s after the last response:
//! `ConnectionLost(Timeout { phase: Idle })` after 1.07 to 2.03 s.
//!
//! `TCP_USER_TIMEOUT` also bounds SYN retransmissions, so the reconnect to a blackholed master
//! fails with `Timeout { phase: Connect }` after 1.5 s, before the probe timeout.
//!
//! [`KEEPALIVE_PROBES`] = 2 only matters if `TCP_USER_TIMEOUT` were ignored: then detection
//! would take 1 + 2 x 1 = 3 s.
//!
//! The cost: a lost keepalive probe or its ACK (one packet, on a lossy path) also aborts the
//! connection, which the prober reports as lost and then reconnects within a few hundred
//! milliseconds (see `run`); tolerating one loss would need 2 to 3 s detection, since the
//! kernel's keepalive tick is whole seconds. The load: between probes, one 66-byte keepalive
//! segment and its ACK per second per idle connection, handled entirely by the kernels; with
//! 5,000 nodes that is 5,000 small packets per second into and out of each apiserver.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

/// `TCP_KEEPIDLE`: idle time before the first keepalive probe. See the module docs.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(1);
/// `TCP_KEEPINTVL`: time between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// `TCP_KEEPCNT`: unanswered probes before the kernel gives up, if `TCP_USER_TIMEOUT` is not
/// in effect.
pub const KEEPALIVE_PROBES: u32 = 2;
/// `TCP_USER_TIMEOUT`: how long sent data (or a keepalive probe) may stay unacknowledged.
pub const USER_TIMEOUT: Duration = Duration::from_millis(1500);

/// Creates the (unconnected) TCP socket for a probe to the given backend. The agent's
/// version creates it inside the network namespace it serves (from a thread that entered it);
/// it is called once per connection attempt, from the probe task, so it must not block for
/// long. The prober sets the options itself (keepalive, user timeout, no delay, non-blocking),
/// so a factory only needs `Socket::new`.
pub type MakeSocket = Arc<dyn Fn(SocketAddr) -> io::Result<Socket> + Send + Sync>;

/// A [`MakeSocket`] that creates the socket in the calling thread's network namespace.
pub fn default_socket() -> MakeSocket {
    Arc::new(|addr: SocketAddr| {
        Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))
    })
}

/// Applies the probe's socket options (see the module docs) and makes it non-blocking.
pub(crate) fn tune(socket: &Socket) -> io::Result<()> {
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    // The request is one small write; do not let Nagle hold it behind an unacked segment.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)
}

/// Retransmissions of the oldest unacknowledged segment on `socket`, or `None` while nothing
/// sent is waiting for an acknowledgement (`TCP_INFO`'s `tcpi_unacked` and `tcpi_retransmits`,
/// the count of RTO expiries the kernel has not recovered from). Read while a liveness request
/// waits: it tells a master whose kernel still acknowledges (a paused or hung process, 0) from
/// one that receives nothing at all (link, network or machine gone).
pub(crate) fn unacknowledged(socket: &impl AsFd) -> io::Result<Option<u8>> {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is borrowed for the call; `info` and `len` describe a buffer of that size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.tcpi_unacked > 0).then_some(info.tcpi_retransmits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_with_everything_acknowledged_has_nothing_unacknowledged() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut &client, b"ping").unwrap();
        let mut got = [0u8; 4];
        std::io::Read::read_exact(&mut server, &mut got).unwrap();
        // The acknowledgement may be delayed a little; it comes (bounded wait, then the check).
        for _ in 0..200 {
            if unacknowledged(&client).unwrap().is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(unacknowledged(&client).unwrap(), None);
        let unconnected = default_socket()("127.0.0.1:1".parse().unwrap()).unwrap();
        assert_eq!(unacknowledged(&unconnected).unwrap(), None);
    }

    #[test]
    fn tuned_socket_has_the_documented_options() {
        let socket = default_socket()("127.0.0.1:6443".parse().unwrap()).unwrap();
        tune(&socket).unwrap();
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.nonblocking().unwrap());
        let v6 = default_socket()("[::1]:6443".parse().unwrap()).unwrap();
        assert_eq!(v6.domain().unwrap(), Domain::IPV6);
    }
}
