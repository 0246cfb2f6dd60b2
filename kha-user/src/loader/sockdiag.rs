//! Terminating sockets with netlink sock_diag `SOCK_DESTROY`, as `ss -K` does, so clients of
//! a failed master reconnect at once (to a healthy one) instead of hanging until TCP gives
//! up. Only sockets whose cookie the caller names are touched: the ones kha redirected.

use std::{
    collections::BTreeSet,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use super::netns::in_netns_at;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
pub(super) const SOCK_DESTROY: u16 = 21;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const IPPROTO_TCP: u8 = 6;
/// Every TCP state, SYN_SENT included: a connect still waiting on a dead master is aborted
/// too, so its caller fails fast and retries.
const ALL_STATES: u32 = 0xfff;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
pub(super) const SOCKID_LEN: usize = 48;
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_msg` up to and including the socket id.
const MSG_ID_END: usize = 4 + SOCKID_LEN;

/// Destroys the TCP sockets, in the namespace `netns` (or the agent's own), whose cookies are
/// in `cookies`. Returns how many the kernel destroyed.
pub fn destroy(netns: Option<&Path>, cookies: &BTreeSet<u64>) -> io::Result<usize> {
    if cookies.is_empty() {
        return Ok(0);
    }
    in_netns_at(netns, || destroy_here(cookies))
}

/// Every TCP state but TIME_WAIT and CLOSE: sockets whose close sock_ops has not seen yet.
const OPEN_STATES: u32 = ALL_STATES & !(1 << 6) & !(1 << 7);

/// The cookies of the TCP sockets in `netns` (or the agent's own) that are not closed yet
/// (TIME_WAIT counts as closed: sock_ops saw TCP_CLOSE on the way there).
pub fn open_cookies(netns: Option<&Path>) -> io::Result<BTreeSet<u64>> {
    in_netns_at(netns, || {
        let nl = open()?;
        let mut all = BTreeSet::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            for id in dump_ids(&nl, family, OPEN_STATES)? {
                all.insert(cookie_of(&id));
            }
        }
        Ok(all)
    })
}

fn dump_ids(nl: &OwnedFd, family: u8, states: u32) -> io::Result<Vec<[u8; SOCKID_LEN]>> {
    let mut ids = Vec::new();
    let mut req = request(family, &[0; SOCKID_LEN]);
    req[4..8].copy_from_slice(&states.to_ne_bytes());
    send(nl, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)?;
    read_until_done(nl, |msg| {
        if msg.len() >= MSG_ID_END {
            ids.push(msg[4..MSG_ID_END].try_into().expect("length checked"));
        }
    })?;
    Ok(ids)
}

fn destroy_here(cookies: &BTreeSet<u64>) -> io::Result<usize> {
    let nl = open()?;
    let mut destroyed = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let mut ids = dump_ids(&nl, family, ALL_STATES)?;
        ids.retain(|id| cookies.contains(&cookie_of(id)));
        for id in ids {
            send(&nl, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &request(family, &id))?;
            // ENOENT: it closed meanwhile, which is what we wanted anyway.
            match read_ack(&nl)? {
                0 => destroyed += 1,
                e if e == -libc::ENOENT => {}
                e => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
    }
    Ok(destroyed)
}

/// The kernel stores the 64-bit cookie as two native-order u32s, low half first.
fn cookie_of(id: &[u8; SOCKID_LEN]) -> u64 {
    let lo = u32::from_ne_bytes(id[40..44].try_into().expect("4 bytes")) as u64;
    let hi = u32::from_ne_bytes(id[44..48].try_into().expect("4 bytes")) as u64;
    lo | (hi << 32)
}

pub(super) fn request(family: u8, id: &[u8; SOCKID_LEN]) -> [u8; REQ_LEN] {
    let mut r = [0u8; REQ_LEN];
    r[0] = family;
    r[1] = IPPROTO_TCP;
    r[4..8].copy_from_slice(&ALL_STATES.to_ne_bytes());
    r[8..].copy_from_slice(id);
    r
}

pub(super) fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); owned right away.
    let fd =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Bounded waits: a netlink answer that never comes must not stall the agent.
    let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
    // SAFETY: a timeval for SO_RCVTIMEO.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(fd)
}

pub(super) fn send(nl: &OwnedFd, msg_type: u16, flags: u16, body: &[u8]) -> io::Result<()> {
    let len = NLMSG_HDRLEN + body.len();
    let mut buf = Vec::with_capacity(len);
    buf.extend_from_slice(&(len as u32).to_ne_bytes());
    buf.extend_from_slice(&msg_type.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&[0u8; 8]); // seq, pid
    buf.extend_from_slice(body);
    // SAFETY: sending our own buffer to the kernel (netlink socket, no address needed).
    let n = unsafe { libc::send(nl.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Reads netlink messages, calling `each` with every payload, until NLMSG_DONE.
fn read_until_done(nl: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(nl, &mut buf)?;
        let mut off = 0;
        while off + NLMSG_HDRLEN <= n {
            let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
            if len < NLMSG_HDRLEN || off + len > n {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed netlink message"));
            }
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let e = error_code(&buf[off + NLMSG_HDRLEN..off + len]);
                    return Err(io::Error::from_raw_os_error(-e));
                }
                _ => each(&buf[off + NLMSG_HDRLEN..off + len]),
            }
            off += (len + 3) & !3;
        }
    }
}

pub(super) fn read_ack(nl: &OwnedFd) -> io::Result<i32> {
    let mut buf = [0u8; 1024];
    let n = recv(nl, &mut buf)?;
    let ty = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
    if n < NLMSG_HDRLEN + 4 || ty != NLMSG_ERROR {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "expected a netlink ack"));
    }
    Ok(error_code(&buf[NLMSG_HDRLEN..n]))
}

fn error_code(payload: &[u8]) -> i32 {
    payload.get(..4).map_or(-libc::EIO, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

fn recv(nl: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receiving into our own buffer.
    let n = unsafe { libc::recv(nl.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_halves_are_low_then_high() {
        let mut id = [0u8; SOCKID_LEN];
        id[40..44].copy_from_slice(&0x1122_3344u32.to_ne_bytes());
        id[44..48].copy_from_slice(&0x5566_7788u32.to_ne_bytes());
        assert_eq!(cookie_of(&id), 0x5566_7788_1122_3344);
    }

    #[test]
    fn request_asks_for_tcp_in_every_state() {
        let r = request(libc::AF_INET6 as u8, &[7; SOCKID_LEN]);
        assert_eq!((r[0], r[1]), (libc::AF_INET6 as u8, IPPROTO_TCP));
        assert_eq!(u32::from_ne_bytes(r[4..8].try_into().unwrap()), ALL_STATES);
        assert_eq!(&r[8..], &[7; SOCKID_LEN]);
    }
}
