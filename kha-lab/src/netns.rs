//! Named network namespaces (`ip netns`, i.e. bind mounts under `/run/netns`)
//! and running code or processes inside them. Needs root.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

pub const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {name:?}")]
    Open {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("opening {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spawning {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {name:?}")]
    Setns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("running `ip {args}`")]
    IpSpawn {
        args: String,
        #[source]
        source: io::Error,
    },
    #[error("`ip {args}` failed ({status}): {stderr}")]
    IpFailed { args: String, status: ExitStatus, stderr: String },
    #[error("listing {NETNS_DIR}")]
    List {
        #[source]
        source: io::Error,
    },
    #[error("a thread running inside network namespace {name:?} panicked")]
    ThreadPanicked { name: String },
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `ip ARGS...` and returns its stdout; a non-zero exit is an error
/// carrying ip's stderr.
pub fn ip<S: AsRef<str>>(args: &[S]) -> Result<String, NetnsError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::IpSpawn { args: joined.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(NetnsError::IpFailed { args: joined, status: out.status, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

pub fn add(name: &str) -> Result<(), NetnsError> {
    ip(&["netns", "add", name]).map(drop)
}

/// Deletes the name; the namespace itself lives on while processes are in it.
pub fn del(name: &str) -> Result<(), NetnsError> {
    ip(&["netns", "del", name]).map(drop)
}

/// Names of all named network namespaces.
pub fn list() -> Result<Vec<String>, NetnsError> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(NetnsError::List { source }),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NetnsError::List { source })?;
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Pids of the processes whose network namespace is `name`.
pub fn pids(name: &str) -> Result<Vec<i32>, NetnsError> {
    Ok(ip(&["netns", "pids", name])?.split_whitespace().filter_map(|p| p.parse().ok()).collect())
}

/// Spawns `cmd` inside network namespace `netns` and, if given, cgroup v2
/// directory `cgroup`.
///
/// Both are joined in the child between fork and exec. The cgroup must be
/// joined before the program runs because a socket takes the cgroup of the
/// process that creates it, once, at creation: cgroup/connect4 programs see
/// `sk`'s cgroup, so moving a process later leaves its earlier sockets (and
/// any created in the race) outside kha's cgroup. The same holds for the
/// network namespace. The namespace and `cgroup.procs` files are opened
/// before fork, since only async-signal-safe calls (write, setns) are
/// allowed after it; they are close-on-exec, so the program does not inherit
/// them.
pub fn spawn_in(netns: &str, cgroup: Option<&Path>, mut cmd: Command) -> Result<Child, NetnsError> {
    let ns = File::open(netns_path(netns))
        .map_err(|source| NetnsError::Open { name: netns.to_owned(), source })?;
    let procs = match cgroup {
        Some(dir) => {
            let path = dir.join("cgroup.procs");
            Some(
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|source| NetnsError::Cgroup { path, source })?,
            )
        }
        None => None,
    };
    let ns_fd = ns.as_raw_fd();
    let procs_fd = procs.as_ref().map(AsRawFd::as_raw_fd);
    // SAFETY: the closure only calls write(2) and setns(2), both
    // async-signal-safe, on fds that stay open until spawn() returns.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd {
                // "0" means the writing process: the child itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd.spawn().map_err(|source| NetnsError::Spawn { program, source })?;
    drop((ns, procs));
    Ok(child)
}

/// Runs `f` on a new thread that has entered network namespace `netns`, so
/// sockets it creates live there; the calling thread is unaffected.
pub fn run_in<T, F>(netns: &str, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = File::open(netns_path(netns))
        .map_err(|source| NetnsError::Open { name: netns.to_owned(), source })?;
    let name = netns.to_owned();
    let thread = std::thread::spawn(move || {
        // SAFETY: plain syscall on an fd owned by `ns`. setns(CLONE_NEWNET)
        // only changes this thread, which ends when `f` returns.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        drop(ns);
        Ok(f())
    });
    match thread.join() {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(NetnsError::Setns { name, source }),
        Err(_) => Err(NetnsError::ThreadPanicked { name }),
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, for
/// processes a test spawns into a lab namespace.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // kill() on an exited-but-unreaped child is harmless: its pid is still ours.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}
