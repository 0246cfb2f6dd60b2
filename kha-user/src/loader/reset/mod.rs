//! Ending a socket kha redirected with a forged TCP RST, so its owner reads `ECONNRESET`
//! ("connection reset by peer"), as when a master's kernel resets it, rather than
//! SOCK_DESTROY's `ECONNABORTED`. client-go ends a watch quietly on the first and relists on the
//! second (docs/health.md, "How kha terminates"), so on a large cluster the difference is a
//! relist storm per failed master.
//!
//! The TCP iterator (kha-ebpf's `iter.rs`) lists kha's sockets in the served namespace with
//! their sequence numbers; for each socket to end, an RST from the master with `seq = rcv_nxt`
//! (exactly: RFC 5961 answers any other in-window value with a challenge ACK) goes to the
//! local socket, and one from the local socket with `seq = snd_nxt` to the master, so a live
//! master frees its side at once (as SOCK_DESTROY's own active reset does). Both through raw
//! sockets of the served namespace (CAP_NET_RAW). A socket the iterator still lists afterwards
//! is sent one more RST with its new numbers, then left to the caller's SOCK_DESTROY.
//!
//! Only sockets the iterator lists (their cookie is in `KHA_CONNS`), that the caller names and
//! whose peer is the backend kha recorded for them, are ever sent a packet.

mod btf;
mod packet;
mod records;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, io,
    io::Read as _,
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{Iter, ProgramError},
};
use kha_common::{ITER_OFFSETS_GLOBAL, ITER_PROGRAM, MAX_CONNS, TcpRecord};
use records::{Sock, TCP_ESTABLISHED, canonical};

use super::netns::in_netns;

const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// RST rounds per socket: the first, and one with fresh numbers if data arrived in between.
const ROUNDS: usize = 2;
/// How often, and how long apart, the iterator is re-run to see the reset sockets gone. A
/// reset is processed when the packet is sent, or when the socket's owner releases its lock.
const CHECKS: usize = 10;
const CHECK_EVERY: Duration = Duration::from_millis(2);
/// The iterator never lists more sockets than `KHA_CONNS` holds, at most `--max-conns`'s top.
const MAX_OUTPUT: u64 = (MAX_CONNS * size_of::<TcpRecord>()) as u64;

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("cannot read the kernel's BTF at {VMLINUX_BTF} (CONFIG_DEBUG_INFO_BTF=y is needed)")]
    Btf(#[source] io::Error),
    #[error("the kernel's BTF does not describe the socket fields kha's RST needs")]
    Offsets(#[source] btf::BtfError),
    #[error("cannot load kha's TCP iterator from its object (maps under {maps})")]
    Object {
        maps: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "the kernel refused kha's TCP iterator (iter/tcp needs Linux >= 5.9 and CAP_BPF with CAP_PERFMON)"
    )]
    Program(#[source] ProgramError),
    #[error("kha's object has no program {ITER_PROGRAM}; the build is broken")]
    Missing,
    #[error("cannot enter the served network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run the TCP iterator")]
    Run(#[source] io::Error),
    #[error(transparent)]
    Records(records::Truncated),
}

/// Why a socket was left to SOCK_DESTROY.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Leftover {
    /// The iterator did not list it: closed meanwhile, or a request or time-wait socket.
    NotListed,
    /// Its peer is not the backend kha recorded for it: never sent a forged packet.
    OtherPeer,
    /// Not established (e.g. SYN_SENT to a dead master): SOCK_DESTROY fails the connect.
    NotEstablished(u8),
    /// socket(SOCK_RAW) failed with this errno: without CAP_NET_RAW, EPERM.
    NoRawSocket(i32),
    /// sendto failed with this errno.
    Send(i32),
    /// Still listed after every RST: the kernel did not take them.
    StillOpen,
}

impl Leftover {
    /// Left for a reason an operator should hear of (once); the others are the normal course.
    pub fn worth_telling(self) -> bool {
        matches!(self, Self::NoRawSocket(_) | Self::Send(_) | Self::StillOpen | Self::OtherPeer)
    }
}

impl fmt::Display for Leftover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotListed => write!(f, "not listed by the TCP iterator (closed meanwhile)"),
            Self::OtherPeer => write!(f, "its peer is not the backend kha recorded for it"),
            Self::NotEstablished(s) => write!(f, "not established (TCP state {s})"),
            Self::NoRawSocket(e) => write!(
                f,
                "cannot open a raw socket: {} (grant CAP_NET_RAW, see docs/operations.md, \"Privileges\")",
                io::Error::from_raw_os_error(*e)
            ),
            Self::Send(e) => write!(f, "cannot send the RST: {}", io::Error::from_raw_os_error(*e)),
            Self::StillOpen => write!(f, "still open after {ROUNDS} RSTs (the kernel took neither)"),
        }
    }
}

/// What [`Resetter::reset`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Ended by an RST: gone from the namespace.
    pub reset: BTreeSet<u64>,
    /// Not ended, each with why: for SOCK_DESTROY.
    pub left: BTreeMap<u64, Leftover>,
}

/// kha's TCP iterator, loaded (a second load of kha's object, sharing its pinned maps).
pub struct Resetter {
    ebpf: Ebpf,
}

impl Resetter {
    pub fn load(maps_dir: &Path) -> Result<Self, ResetError> {
        let raw = std::fs::read(VMLINUX_BTF).map_err(ResetError::Btf)?;
        let offsets = btf::Btf::parse(&raw).and_then(|b| b.iter_offsets()).map_err(ResetError::Offsets)?;
        let mut loader = match super::pinned_conns_capacity(maps_dir) {
            // The conn map as it is pinned: aya refuses to reuse one of another capacity.
            Some(conns) => super::object_loader(maps_dir, conns),
            None => EbpfLoader::new(),
        };
        let mut ebpf = loader
            .default_map_pin_directory(maps_dir)
            .override_global(ITER_OFFSETS_GLOBAL, &offsets, true)
            .load(super::OBJECT)
            .map_err(|e| ResetError::Object { maps: maps_dir.to_owned(), source: Box::new(e) })?;
        let kernel = aya::Btf::from_sys_fs().map_err(|e| ResetError::Program(ProgramError::Btf(e)))?;
        let prog: &mut Iter = ebpf
            .program_mut(ITER_PROGRAM)
            .ok_or(ResetError::Missing)?
            .try_into()
            .map_err(ResetError::Program)?;
        prog.load("tcp", &kernel).map_err(ResetError::Program)?;
        Ok(Self { ebpf })
    }

    /// Resets the sockets `wanted` names (cookie -> the backend kha recorded for it), in the
    /// namespace `netns` (or the agent's own).
    pub fn reset(
        &mut self,
        netns: Option<&Path>,
        wanted: &BTreeMap<u64, SocketAddr>,
    ) -> Result<Outcome, ResetError> {
        let prog: &mut Iter = self
            .ebpf
            .program_mut(ITER_PROGRAM)
            .ok_or(ResetError::Missing)?
            .try_into()
            .map_err(ResetError::Program)?;
        let Some(path) = netns else { return reset_here(prog, wanted) };
        let netns_err = |source| ResetError::Netns { path: path.to_owned(), source };
        let ns = std::fs::File::open(path).map_err(netns_err)?;
        in_netns(Some(ns.as_fd()), || reset_here(prog, wanted)).map_err(netns_err)?
    }
}

/// The sockets of this thread's namespace that kha redirected.
fn list(prog: &mut Iter) -> Result<Vec<Sock>, ResetError> {
    let io_err = |e: &dyn std::error::Error| ResetError::Run(io::Error::other(e.to_string()));
    let id = prog.attach().map_err(ResetError::Program)?;
    let link = prog.take_link(id).map_err(ResetError::Program)?;
    // The file walks the namespace of the thread that creates it: this one.
    let file = link.into_file().map_err(|e| io_err(&e))?;
    let mut buf = Vec::new();
    file.take(MAX_OUTPUT).read_to_end(&mut buf).map_err(ResetError::Run)?;
    records::parse(&buf).map_err(ResetError::Records)
}

fn reset_here(prog: &mut Iter, wanted: &BTreeMap<u64, SocketAddr>) -> Result<Outcome, ResetError> {
    let mut out = Outcome::default();
    let listed: BTreeMap<u64, Sock> = list(prog)?.into_iter().map(|s| (s.cookie, s)).collect();
    let mut targets = BTreeMap::new();
    for (&cookie, &backend) in wanted {
        let why = match listed.get(&cookie) {
            None => Leftover::NotListed,
            Some(s) if canonical(s.remote) != canonical(backend) => Leftover::OtherPeer,
            Some(s) if s.state != TCP_ESTABLISHED => Leftover::NotEstablished(s.state),
            Some(s) => {
                targets.insert(cookie, *s);
                continue;
            }
        };
        out.left.insert(cookie, why);
    }
    if targets.is_empty() {
        return Ok(out);
    }
    let raw = match Raw::open() {
        Ok(r) => r,
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            out.left.extend(targets.keys().map(|c| (*c, Leftover::NoRawSocket(errno))));
            return Ok(out);
        }
    };
    for _ in 0..ROUNDS {
        targets.retain(|cookie, s| match raw.send_pair(s) {
            Ok(()) => true,
            Err(e) => {
                out.left.insert(*cookie, Leftover::Send(e.raw_os_error().unwrap_or(libc::EIO)));
                false
            }
        });
        let mut still = BTreeMap::new();
        for check in 0..CHECKS {
            let now: BTreeMap<u64, Sock> = list(prog)?.into_iter().map(|s| (s.cookie, s)).collect();
            still = targets.keys().filter_map(|c| now.get(c).map(|s| (*c, *s))).collect();
            if still.is_empty() || check + 1 == CHECKS {
                break;
            }
            std::thread::sleep(CHECK_EVERY);
        }
        out.reset.extend(targets.keys().filter(|c| !still.contains_key(c)));
        // The next round uses the numbers the iterator sees now.
        targets = still.into_iter().filter(|(_, s)| s.state == TCP_ESTABLISHED).collect();
        if targets.is_empty() {
            break;
        }
    }
    out.left.extend(targets.keys().map(|c| (*c, Leftover::StillOpen)));
    Ok(out)
}

/// Raw IPPROTO_RAW sockets (the IP header is ours) of this thread's namespace.
struct Raw {
    v4: OwnedFd,
    v6: Option<OwnedFd>,
}

impl Raw {
    fn open() -> io::Result<Self> {
        let open = |family| {
            // SAFETY: plain socket(2); owned right away.
            let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
            if fd < 0 { Err(io::Error::last_os_error()) } else { Ok(unsafe { OwnedFd::from_raw_fd(fd) }) }
        };
        // A kernel without IPv6 has no v6 sockets of kha's to reset either.
        Ok(Self { v4: open(libc::AF_INET)?, v6: open(libc::AF_INET6).ok() })
    }

    /// The RST that ends the local socket, then the one that frees the master's side. Only the
    /// first counts: the master may be unreachable, which is why it is being left.
    fn send_pair(&self, s: &Sock) -> io::Result<()> {
        self.send(s.remote, s.local, s.rcv_nxt, s.snd_nxt)?;
        if let Err(e) = self.send(s.local, s.remote, s.snd_nxt, s.rcv_nxt) {
            log::debug!("RST to {} for socket {:#x} not sent: {e}", s.remote, s.cookie);
        }
        Ok(())
    }

    fn send(&self, from: SocketAddr, to: SocketAddr, seq: u32, ack: u32) -> io::Result<()> {
        let pkt = packet::rst(from, to, seq, ack)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))?;
        let rc = match packet::v4(to) {
            Some(ip) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
                    sin_zero: [0; 8],
                };
                // SAFETY: our buffer and a sockaddr_in of the size given.
                unsafe {
                    libc::sendto(
                        self.v4.as_raw_fd(),
                        pkt.as_ptr().cast(),
                        pkt.len(),
                        0,
                        (&raw const sa).cast(),
                        size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                }
            }
            None => {
                let SocketAddr::V6(to) = to else { unreachable!("v4() covers every IPv4 address") };
                let fd = self.v6.as_ref().ok_or_else(|| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))?;
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr { s6_addr: to.ip().octets() },
                    sin6_scope_id: to.scope_id(),
                };
                // SAFETY: our buffer and a sockaddr_in6 of the size given.
                unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        pkt.as_ptr().cast(),
                        pkt.len(),
                        0,
                        (&raw const sa).cast(),
                        size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                }
            }
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}
