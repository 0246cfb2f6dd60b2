//! The start-up check for `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`). Without it kha still
//! balances new connections, but cannot move the open ones off a failed or removed master:
//! they hang until TCP gives up, which is what kha exists to avoid. Nothing fails visibly
//! until that day, so the agent asks the kernel at start, on a socket of its own.

use std::{
    io,
    net::{Ipv4Addr, TcpListener},
    os::fd::AsRawFd,
    path::Path,
};

use super::{
    LoaderError,
    netns::in_netns_at,
    sockdiag::{self, NLM_F_ACK, NLM_F_REQUEST, SOCK_DESTROY, SOCKID_LEN},
};

const SO_COOKIE: libc::c_int = 57;

/// What the kernel answered to a `SOCK_DESTROY` of a socket the agent made for the purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestroySupport {
    Supported,
    /// EOPNOTSUPP: the kernel was built without `CONFIG_INET_DIAG_DESTROY`.
    Missing,
    /// EPERM: the agent lacks CAP_NET_ADMIN in the served namespace.
    NotPermitted,
    /// ENOENT or no NETLINK_SOCK_DIAG: no sock_diag for TCP (`inet_diag`/`tcp_diag`).
    NoSockDiag,
    /// Anything else, with its errno.
    Unknown(i32),
}

impl DestroySupport {
    /// `errno` is what the probe failed with, 0 for success.
    pub fn classify(errno: i32) -> Self {
        match errno {
            0 => Self::Supported,
            libc::EOPNOTSUPP => Self::Missing,
            libc::EPERM | libc::EACCES => Self::NotPermitted,
            // Our own socket exists, so ENOENT means the lookup had no TCP diag handler.
            libc::ENOENT | libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT => Self::NoSockDiag,
            e => Self::Unknown(e),
        }
    }

    pub fn supported(self) -> bool {
        self == Self::Supported
    }

    /// A short name for `kha status` and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Supported => "supported",
            Self::Missing => "missing",
            Self::NotPermitted => "not permitted",
            Self::NoSockDiag => "no sock_diag",
            Self::Unknown(_) => "unknown",
        }
    }

    /// The cause and the fix, when it is not supported.
    pub fn problem(self) -> Option<String> {
        let cause = match self {
            Self::Supported => return None,
            Self::Missing => "the kernel was built without CONFIG_INET_DIAG_DESTROY (SOCK_DESTROY answered EOPNOTSUPP); use a kernel with CONFIG_INET_DIAG_DESTROY=y".to_string(),
            Self::NotPermitted => "SOCK_DESTROY needs CAP_NET_ADMIN in the served network namespace (it answered EPERM); give the agent CAP_NET_ADMIN".to_string(),
            Self::NoSockDiag => "the kernel has no sock_diag for TCP (CONFIG_INET_DIAG, modules inet_diag and tcp_diag); enable or load them (modprobe tcp_diag)".to_string(),
            Self::Unknown(e) => format!("SOCK_DESTROY failed: {}", io::Error::from_raw_os_error(e)),
        };
        Some(format!(
            "cannot terminate sockets: {cause}. kha still balances new connections, but connections to a failed or removed master are not moved and hang until TCP gives up"
        ))
    }
}

/// Asks the kernel, in the namespace `netns` (or the agent's own), to destroy a loopback
/// listener made for the purpose, and tells what it answered.
pub fn sock_destroy_support(netns: Option<&Path>) -> DestroySupport {
    let errno = |r: io::Result<()>| r.err().map_or(0, |e| e.raw_os_error().unwrap_or(libc::EIO));
    DestroySupport::classify(errno(in_netns_at(netns, probe_here)))
}

fn probe_here() -> io::Result<()> {
    // A listener needs no traffic and no loopback link up, and is ours alone to destroy.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let port = listener.local_addr()?.port();
    let cookie = super::checks::getsockopt_u64(listener.as_raw_fd(), SO_COOKIE)?;
    let nl = sockdiag::open()?;
    sockdiag::send(
        &nl,
        SOCK_DESTROY,
        NLM_F_REQUEST | NLM_F_ACK,
        &sockdiag::request(libc::AF_INET as u8, &listener_id(port, cookie)),
    )?;
    match sockdiag::read_ack(&nl)? {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// `struct inet_diag_sockid` of a listener on 127.0.0.1:`port` (no peer), named by cookie so
/// that no other socket can match.
fn listener_id(port: u16, cookie: u64) -> [u8; SOCKID_LEN] {
    let mut id = [0u8; SOCKID_LEN];
    id[0..2].copy_from_slice(&port.to_be_bytes());
    id[4..8].copy_from_slice(&Ipv4Addr::LOCALHOST.octets());
    id[40..44].copy_from_slice(&(cookie as u32).to_ne_bytes());
    id[44..48].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    id
}

/// The start-up decision. Without SOCK_DESTROY, kha warns and runs: refusing would leave the
/// node without an API endpoint for the sake of a feature that only matters on the day a
/// master fails. `--require-sock-destroy` makes it fatal, for operators who would rather
/// know at rollout.
pub fn check_sock_destroy(support: DestroySupport, required: bool) -> Result<(), LoaderError> {
    let Some(problem) = support.problem() else { return Ok(()) };
    if required {
        return Err(LoaderError::Unsupported(format!(
            "{problem}. --require-sock-destroy refuses to start without it (drop the flag to run anyway)"
        )));
    }
    log::error!("{problem} (kha_sock_destroy_supported 0; --require-sock-destroy makes this fatal)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_are_classified() {
        assert_eq!(DestroySupport::classify(0), DestroySupport::Supported);
        assert_eq!(DestroySupport::classify(libc::EOPNOTSUPP), DestroySupport::Missing);
        assert_eq!(DestroySupport::classify(libc::EPERM), DestroySupport::NotPermitted);
        assert_eq!(DestroySupport::classify(libc::ENOENT), DestroySupport::NoSockDiag);
        assert_eq!(DestroySupport::classify(libc::EPROTONOSUPPORT), DestroySupport::NoSockDiag);
        assert_eq!(DestroySupport::classify(libc::EINVAL), DestroySupport::Unknown(libc::EINVAL));
        assert!(DestroySupport::Supported.supported() && DestroySupport::Supported.problem().is_none());
        let missing = DestroySupport::Missing.problem().unwrap();
        assert!(
            missing.contains("CONFIG_INET_DIAG_DESTROY=y") && missing.contains("still balances"),
            "{missing}"
        );
        assert!(DestroySupport::NotPermitted.problem().unwrap().contains("CAP_NET_ADMIN"));
        assert!(DestroySupport::Unknown(libc::EINVAL).problem().unwrap().contains("Invalid argument"));
    }

    #[test]
    fn missing_warns_unless_required() {
        assert!(check_sock_destroy(DestroySupport::Supported, true).is_ok());
        assert!(check_sock_destroy(DestroySupport::Missing, false).is_ok());
        let e = check_sock_destroy(DestroySupport::Missing, true).unwrap_err().to_string();
        assert!(e.contains("CONFIG_INET_DIAG_DESTROY") && e.contains("--require-sock-destroy"), "{e}");
        assert!(check_sock_destroy(DestroySupport::NotPermitted, true).is_err());
    }

    #[test]
    fn the_listener_id_names_port_address_and_cookie() {
        let id = listener_id(6443, 0x1122_3344_5566_7788);
        assert_eq!(&id[0..4], &[0x19, 0x2b, 0, 0]);
        assert_eq!(&id[4..8], &[127, 0, 0, 1]);
        assert_eq!(&id[20..40], &[0; 20]);
        assert_eq!(u32::from_ne_bytes(id[40..44].try_into().unwrap()), 0x5566_7788);
        assert_eq!(u32::from_ne_bytes(id[44..48].try_into().unwrap()), 0x1122_3344);
    }

    /// The probe is well formed: the kernel finds the listener (a wrong id would give ENOENT
    /// or EINVAL) and answers with support, its absence, or (unprivileged) EPERM.
    #[test]
    fn this_kernel_answers_the_probe() {
        let got = sock_destroy_support(None);
        // SAFETY: geteuid has no preconditions.
        let expected: &[DestroySupport] = if unsafe { libc::geteuid() } == 0 {
            &[DestroySupport::Supported, DestroySupport::Missing]
        } else {
            &[DestroySupport::Supported, DestroySupport::Missing, DestroySupport::NotPermitted]
        };
        assert!(expected.contains(&got), "{got:?}: {:?}", got.problem());
    }
}
