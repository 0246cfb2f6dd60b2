//! The masters: [`LabMaster`] (a master's names, addresses and files) and the `kha-lab
//! master` processes in their namespaces: start, restart, kill, stop and continue, switch
//! the failure mode; and where the `kha-lab` binary is found.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::addresses::{HTTPS_PORT, IDENT_PORT};
use super::error::io_err;
use super::{Lab, LabError, POLL};
use crate::mode::{self, FailureMode};
use crate::netns;
use crate::pki::{MasterIdentity, PkiPaths};

/// What `start_masters` needs to (re)start a master process.
#[derive(Debug, Clone)]
pub(super) struct Launch {
    bin: PathBuf,
    pki: PkiPaths,
}

#[derive(Debug)]
pub struct LabMaster {
    /// `m1`..`mN`: the master's name, certificate name and header value.
    pub name: String,
    pub netns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The veth in the node namespace that leads to this master.
    pub node_ifname: String,
    pub control_file: PathBuf,
    pub ready_file: PathBuf,
    pub log_file: PathBuf,
    pub(super) mode: FailureMode,
    pub(super) process: Option<Child>,
}

impl LabMaster {
    pub fn https_v4(&self) -> SocketAddr {
        SocketAddr::new(self.ipv4.into(), HTTPS_PORT)
    }
    pub fn https_v6(&self) -> SocketAddr {
        SocketAddr::new(self.ipv6.into(), HTTPS_PORT)
    }
    pub fn ident_v4(&self) -> SocketAddr {
        SocketAddr::new(self.ipv4.into(), IDENT_PORT)
    }
    pub fn ident_v6(&self) -> SocketAddr {
        SocketAddr::new(self.ipv6.into(), IDENT_PORT)
    }
    pub fn identity(&self) -> MasterIdentity {
        MasterIdentity::new(self.name.clone(), [IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)])
    }
    /// Pid of the running `kha-lab master` process, if started and not killed.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }
    /// The failure mode last set through the lab.
    pub fn mode(&self) -> FailureMode {
        self.mode
    }
}

/// Polls `cond` every few milliseconds until it is true or `timeout` passes.
fn wait_until(
    what: impl FnOnce() -> String,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool, LabError>,
) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LabError::Timeout { what: what(), timeout });
        }
        std::thread::sleep(POLL);
    }
}

/// The last `max` bytes of a log file, for error messages.
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

impl Lab {
    /// Starts `kha-lab master` (the binary at `bin`, e.g.
    /// `env!("CARGO_BIN_EXE_kha-lab")` or [`find_kha_lab_bin`]) in every
    /// master namespace, listening for HTTPS on port 6443 and identity on
    /// port 7000, over IPv4 and IPv6, and waits until each reports ready.
    pub fn start_masters(&mut self, bin: &Path, pki: &PkiPaths) -> Result<(), LabError> {
        for m in &self.masters {
            if pki.master(&m.name).is_none() {
                return Err(LabError::MissingCert(m.name.clone()));
            }
        }
        self.launch = Some(Launch { bin: bin.to_owned(), pki: pki.clone() });
        let names: Vec<String> = self.masters.iter().map(|m| m.name.clone()).collect();
        // Spawn all, then wait for all: startups overlap.
        for name in &names {
            self.spawn_master(name)?;
        }
        for name in &names {
            self.wait_ready(name)?;
        }
        Ok(())
    }

    /// Starts one master again (after `kill_master`), with its current mode.
    pub fn restart_master(&mut self, name: &str) -> Result<(), LabError> {
        if self.master(name)?.process.is_some() {
            self.kill_master(name)?;
        }
        self.spawn_master(name)?;
        self.wait_ready(name)
    }

    fn spawn_master(&mut self, name: &str) -> Result<(), LabError> {
        let launch = self.launch.clone().ok_or_else(|| LabError::NotStarted(name.to_owned()))?;
        let paths = launch.pki.master(name).ok_or_else(|| LabError::MissingCert(name.to_owned()))?.clone();
        let m = self.master_mut(name)?;
        for stale in [m.ready_file.clone(), mode::applied_path(&m.control_file)] {
            match fs::remove_file(&stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err("removing", &stale)(e));
                }
                _ => {}
            }
        }
        mode::write_control(&m.control_file, m.mode)?;
        let log = File::create(&m.log_file).map_err(io_err("creating", &m.log_file))?;
        let log2 = log.try_clone().map_err(io_err("duplicating", &m.log_file))?;
        let mut cmd = Command::new(&launch.bin);
        cmd.arg("master").arg("--name").arg(&m.name);
        for addr in [m.https_v4(), m.https_v6()] {
            cmd.arg("--listen").arg(addr.to_string());
        }
        for addr in [m.ident_v4(), m.ident_v6()] {
            cmd.arg("--ident-listen").arg(addr.to_string());
        }
        cmd.arg("--cert").arg(&paths.cert).arg("--key").arg(&paths.key);
        cmd.arg("--control-file").arg(&m.control_file).arg("--ready-file").arg(&m.ready_file);
        cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
        m.process = Some(netns::spawn_in(&m.netns, None, cmd)?);
        Ok(())
    }

    fn wait_ready(&mut self, name: &str) -> Result<(), LabError> {
        let timeout = self.spec.timeout;
        let m = self.master_mut(name)?;
        let ready_file = m.ready_file.clone();
        let result = wait_until(
            || format!("master {name} to become ready"),
            timeout,
            || {
                let child = m.process.as_mut().ok_or_else(|| LabError::NotRunning(m.name.clone()))?;
                if let Some(status) = child.try_wait().map_err(io_err("waiting for", &m.log_file))? {
                    m.process = None;
                    return Err(LabError::MasterExited {
                        name: m.name.clone(),
                        status,
                        log: m.log_file.clone(),
                        log_tail: tail(&m.log_file, 2000),
                    });
                }
                Ok(fs::read_to_string(&ready_file).is_ok_and(|s| s.starts_with("ready")))
            },
        );
        if result.is_err()
            && let Some(mut child) = m.process.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        result
    }

    fn signal(&self, name: &str, signal: i32) -> Result<(), LabError> {
        let m = self.master(name)?;
        let pid = m.pid().ok_or_else(|| LabError::NotRunning(name.to_owned()))?;
        // The pid is our unreaped child, so it cannot name another process.
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            let source = io::Error::last_os_error();
            return Err(LabError::Signal { name: name.to_owned(), pid, signal, source });
        }
        Ok(())
    }

    /// SIGKILL and reap the master's process.
    pub fn kill_master(&mut self, name: &str) -> Result<(), LabError> {
        let m = self.master_mut(name)?;
        let mut child = m.process.take().ok_or_else(|| LabError::NotRunning(name.to_owned()))?;
        let _ = child.kill();
        child.wait().map_err(io_err("reaping master", &m.log_file))?;
        Ok(())
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing (the
    /// kernel still completes TCP handshakes into the listen backlog).
    pub fn stop_master(&self, name: &str) -> Result<(), LabError> {
        self.signal(name, libc::SIGSTOP)
    }

    /// SIGCONT after `stop_master`.
    pub fn cont_master(&self, name: &str) -> Result<(), LabError> {
        self.signal(name, libc::SIGCONT)
    }

    /// Switches a master's failure mode and, if it is running, waits until it
    /// has applied the mode. A stopped (SIGSTOP) master cannot acknowledge:
    /// set modes while it runs. A master that is not running picks the mode
    /// up when restarted.
    pub fn set_mode(&mut self, name: &str, new: FailureMode) -> Result<(), LabError> {
        let timeout = self.spec.timeout;
        let m = self.master_mut(name)?;
        m.mode = new;
        mode::write_control(&m.control_file, new)?;
        if m.process.is_none() {
            return Ok(());
        }
        let control = m.control_file.clone();
        // SIGHUP makes the master re-read at once instead of at its next poll.
        self.signal(name, libc::SIGHUP)?;
        wait_until(
            || format!("master {name} to apply mode {new}"),
            timeout,
            || Ok(mode::read_applied(&control) == Some(new)),
        )
    }
}

/// Finds the `kha-lab` binary: `$KHA_LAB_BIN`, else next to the current
/// executable, else one directory up (test binaries live in `target/*/deps`).
pub fn find_kha_lab_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KHA_LAB_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("kha-lab"), dir.parent()?.join("kha-lab")].into_iter().find(|p| p.is_file())
}
