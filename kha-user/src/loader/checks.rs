//! Checks and look-ups done before anything is attached, each failing with the cause and the
//! fix: cgroup v2, bpffs, kernel version, the namespace to serve, one agent per pin dir.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsFd as _, AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

use super::{LoaderError, netns::in_netns, setup_err};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const SO_NETNS_COOKIE: libc::c_int = 71;
/// bpf_set_retval in cgroup programs (5.18) is the newest feature kha's programs use.
pub const MIN_KERNEL: (u32, u32) = (5, 18);

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and a zeroed statfs to fill.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// The cgroup v2 mount point, from /proc/mounts: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn default_cgroup() -> Result<PathBuf, LoaderError> {
    let mounts = Path::new("/proc/mounts");
    let found = kha_common::cgroup::cgroup2_mount().map_err(setup_err(mounts, "cannot read mounts"))?;
    found.ok_or_else(|| {
        LoaderError::Unsupported(
            "no cgroup v2 hierarchy is mounted; kha attaches to a cgroup v2 directory. Mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or pass --cgroup".into(),
        )
    })
}

/// The cgroup's id (its inode number), after checking it is a cgroup v2 directory.
pub fn cgroup_id(path: &Path) -> Result<u64, LoaderError> {
    let magic = fs_magic(path).map_err(setup_err(path, "cannot use as --cgroup"))?;
    if magic != CGROUP2_SUPER_MAGIC {
        return Err(LoaderError::Unsupported(format!(
            "--cgroup {}: not a cgroup v2 directory (cgroup v1 cannot run socket programs for a whole hierarchy). Give the cgroup v2 mount point, e.g. {}",
            path.display(),
            default_cgroup().map(|p| p.display().to_string()).unwrap_or_else(|_| "/sys/fs/cgroup".into()),
        )));
    }
    Ok(std::fs::metadata(path).map_err(setup_err(path, "cannot stat cgroup"))?.ino())
}

/// Makes sure `pin_dir` is on a bpffs, mounting one at /sys/fs/bpf if that is where it
/// belongs and nothing is mounted there yet (some hosts do not mount it at boot).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoaderError> {
    let mut probe = pin_dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if fs_magic(&probe).map_err(setup_err(&probe, "cannot statfs"))? == BPF_FS_MAGIC {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default) && default.is_dir() {
        let c = |s: &str| CString::new(s).expect("no NUL");
        let (src, dst, fstype, opts) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"), c("mode=0700"));
        // SAFETY: valid C strings.
        let rc = unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fstype.as_ptr(), 0, opts.as_ptr().cast()) };
        if rc != 0 {
            return Err(
                setup_err(default, "no bpffs mounted and mounting one failed (needs CAP_SYS_ADMIN)")(
                    io::Error::last_os_error(),
                ),
            );
        }
        log::info!("mounted bpffs at /sys/fs/bpf");
        return Ok(());
    }
    Err(LoaderError::Unsupported(format!(
        "--pin-dir {}: not on a bpffs, so pins cannot outlive the agent. Mount one: mount -t bpf bpf {}",
        pin_dir.display(),
        probe.display()
    )))
}

/// Whether `dir` is where a file system is mounted (it lives on another device than its
/// parent). A mount point cannot be removed (EBUSY), and a bpffs there is not kha's to take.
pub fn is_mount_point(dir: &Path) -> bool {
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
    match (dev(dir), dev(&dir.join(".."))) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

/// Refuses kernels older than [`MIN_KERNEL`], naming the feature, before a verifier error can
/// say it less clearly.
pub fn kernel_supported() -> Result<(), LoaderError> {
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a zeroed utsname to fill.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Ok(()); // let the load itself tell
    }
    let release: String = uts.release.iter().take_while(|c| **c != 0).map(|c| *c as u8 as char).collect();
    match parse_release(&release) {
        Some(v) if v < MIN_KERNEL => Err(LoaderError::Unsupported(format!(
            "kernel {release} is older than {}.{}: kha needs bpf_set_retval in cgroup programs (5.18), bpf_link for cgroups (5.7) and getpeername hooks (5.8). Upgrade the kernel",
            MIN_KERNEL.0, MIN_KERNEL.1
        ))),
        _ => Ok(()),
    }
}

fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The netns cookie of the namespace whose sockets kha rewrites: the agent's own, or the one
/// at `netns` (e.g. /run/netns/NAME), read on a socket made inside it by a short-lived thread
/// (setns affects only the calling thread).
pub fn netns_cookie(netns: Option<&Path>) -> Result<u64, LoaderError> {
    let Some(path) = netns else {
        return socket_cookie()
            .map_err(setup_err(Path::new("/proc/self/ns/net"), "cannot read netns cookie"));
    };
    let ns = File::open(path).map_err(setup_err(path, "cannot open --netns"))?;
    in_netns(Some(ns.as_fd()), socket_cookie)
        .map_err(setup_err(path, "not a network namespace (setns failed)"))?
        .map_err(setup_err(path, "cannot read netns cookie"))
}

fn socket_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    getsockopt_u64(fd.as_raw_fd(), SO_NETNS_COOKIE)
}

/// A `SOL_SOCKET` option whose value is a `u64` (the socket's or its namespace's cookie).
pub(super) fn getsockopt_u64(fd: std::os::fd::RawFd, option: libc::c_int) -> io::Result<u64> {
    let mut value = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: an 8-byte buffer for an 8-byte option, on a descriptor the caller holds open.
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, option, (&mut value as *mut u64).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// An unconnected TCP socket for `addr`, created inside the namespace `ns` by a short-lived
/// thread (setns affects only the calling thread; the socket stays in the namespace it was
/// made in). The probes use it so that they reach the masters the way the node's clients do.
pub fn socket_in_netns(ns: &File, addr: std::net::SocketAddr) -> io::Result<socket2::Socket> {
    in_netns(Some(ns.as_fd()), || {
        socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
    })?
}

/// Held while an agent owns a pin dir, so two agents never write the same maps.
pub struct PinLock(#[allow(dead_code)] File);

pub fn lock_pin_dir(pin_dir: &Path) -> Result<PinLock, LoaderError> {
    let dir = File::open(pin_dir).map_err(setup_err(pin_dir, "cannot open pin dir"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LoaderError::Unsupported(format!(
                "another kha agent is running with --pin-dir {}; stop it first (two agents would overwrite each other's maps)",
                pin_dir.display()
            )));
        }
        return Err(setup_err(pin_dir, "cannot lock pin dir")(e));
    }
    Ok(PinLock(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_release("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn tells_mount_points_from_plain_directories() {
        assert!(is_mount_point(Path::new("/proc")));
        let plain = std::env::temp_dir().join(format!("kha-mnt-test-{}", std::process::id()));
        std::fs::create_dir_all(&plain).unwrap();
        assert!(!is_mount_point(&plain));
        std::fs::remove_dir(&plain).unwrap();
        assert!(!is_mount_point(Path::new("/no/such/dir")));
    }

    #[test]
    fn a_plain_directory_is_not_a_cgroup() {
        let e = cgroup_id(Path::new("/tmp")).unwrap_err();
        assert!(e.to_string().contains("not a cgroup v2 directory"), "{e}");
    }
}
