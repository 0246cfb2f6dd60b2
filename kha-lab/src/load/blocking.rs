//! The `connect` and `first-byte` modes: blocking syscalls on plain threads, so that the
//! time measured is the syscall's and not a scheduler's.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use super::report::Tally;
use super::worker::{Budget, Rng};
use super::{LoadError, LoadOptions, Mode};
use crate::errno::io_error_key;

pub(super) fn run_threads(opts: &LoadOptions) -> Result<(Tally, Option<Duration>), LoadError> {
    let budget = Arc::new(Budget {
        issued: AtomicU64::new(0),
        count: opts.count,
        deadline: Instant::now() + opts.duration,
    });
    let mut handles = Vec::new();
    for w in 0..opts.concurrency {
        let (opts, budget) = (opts.clone(), budget.clone());
        let h = std::thread::Builder::new()
            .name(format!("load-{w}"))
            .spawn(move || {
                let mut rng = Rng::new(opts.seed.wrapping_add(w as u64));
                let mut t = Tally::default();
                while budget.take() {
                    let target = opts.targets[rng.below(opts.targets.len())];
                    match connect_once(target, opts.timeout, opts.mode == Mode::FirstByte) {
                        Ok((took, master)) => {
                            t.ok += 1;
                            t.samples.push(took.as_nanos() as u64);
                            t.answered_by(master);
                        }
                        Err(key) => t.fail(key),
                    }
                }
                t
            })
            .map_err(LoadError::Thread)?;
        handles.push(h);
    }
    let mut all = Tally::default();
    for h in handles {
        // A worker only panics on a bug; count it rather than lose the others' results.
        match h.join() {
            Ok(t) => all.merge(t),
            Err(_) => all.fail("worker:panic".into()),
        }
    }
    Ok((all, None))
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: fd is open; value points to a T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn errno_key(phase: &str, err: &io::Error) -> String {
    // A blocking connect whose SO_SNDTIMEO expires returns EINPROGRESS; a read, EAGAIN.
    let reason = match err.raw_os_error() {
        Some(libc::EINPROGRESS) | Some(libc::EAGAIN) => "ETIMEDOUT".to_owned(),
        _ => io_error_key(err),
    };
    format!("{phase}:{reason}")
}

/// One blocking connect (and identity read); returns the time it took and the name read.
fn connect_once(
    addr: SocketAddr,
    deadline: Duration,
    first_byte: bool,
) -> Result<(Duration, Option<String>), String> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall; the fd is owned right after.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(errno_key("socket", &io::Error::last_os_error()));
    }
    // SAFETY: raw is a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval {
        tv_sec: deadline.as_secs() as libc::time_t,
        tv_usec: deadline.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
        setsockopt(&fd, libc::SOL_SOCKET, opt, &tv).map_err(|e| errno_key("socket", &e))?;
    }
    let (ss, len) = sockaddr(&addr);
    let t0 = Instant::now();
    // SAFETY: ss holds a sockaddr of `len` bytes for this family.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        return Err(errno_key("connect", &io::Error::last_os_error()));
    }
    if !first_byte {
        let took = t0.elapsed();
        // Close with RST: no TIME_WAIT, so long runs do not run out of ports.
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        let _ = setsockopt(&fd, libc::SOL_SOCKET, libc::SO_LINGER, &linger);
        return Ok((took, None));
    }
    let mut buf = [0u8; 256];
    let mut got = 0;
    let mut first = None;
    while got < buf.len() && !buf[..got].contains(&b'\n') {
        // SAFETY: reading into the unused tail of buf.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        if n < 0 {
            return Err(errno_key("ident", &io::Error::last_os_error()));
        }
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| t0.elapsed());
        got += n as usize;
    }
    let Some(took) = first else { return Err("ident:EOF".into()) };
    let line = String::from_utf8_lossy(&buf[..got]);
    let name = line.split('\n').next().unwrap_or("").trim().to_owned();
    Ok((took, (!name.is_empty()).then_some(name)))
}
