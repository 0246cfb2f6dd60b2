//! A simulated cluster in network namespaces: one node and N masters.
//!
//! ```text
//!  <prefix>-node                                <prefix>-m1 ... <prefix>-mN
//!  lo 127.0.0.1 ::1 (clients dial localhost)
//!  br0 192.0.2.1/24 2001:db8::1/64
//!   ├── m1 (veth) ─────────────────────────────── eth0 192.0.2.11/24 2001:db8::11/64
//!   └── mN (veth) ─────────────────────────────── eth0 192.0.2.(10+N)  2001:db8::(10+N)
//! ```
//! Only documentation prefixes (RFC 5737, RFC 3849) are used, and all of them
//! live inside the lab's namespaces: nothing is added to the host namespace.
//! Veths are created from inside the node namespace with their peer directly
//! in the master's, so interface names (`br0`, `mI`, `eth0`) never meet the
//! host's. Link down/up acts on the node-side veth, which carries no address:
//! on the master side Linux would flush the IPv6 address on down.
//!
//! Every wait is bounded by `LabSpec::timeout`; polling waits check a
//! condition every few milliseconds instead of sleeping a fixed time.
//! `Drop` kills the processes the lab started and deletes its namespaces.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use log::warn;

use crate::mode::{self, ControlError, FailureMode};
use crate::netns::{self, NetnsError};
use crate::pki::{MasterIdentity, PkiPaths};

pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const HTTPS_PORT: u16 = 6443;
pub const IDENT_PORT: u16 = 7000;
/// Keeps master addresses within 192.0.2.11..=192.0.2.99.
pub const MAX_MASTERS: usize = 89;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const BRIDGE: &str = "br0";
const POLL: Duration = Duration::from_millis(10);
/// Port probed for reachability: nothing listens there, so a RST
/// (ECONNREFUSED) proves the path works both ways.
const PROBE_PORT: u16 = 9;

/// Master `i` (1-based) IPv4 address: 192.0.2.(10+i).
pub fn master_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// Master `i` (1-based) IPv6 address: 2001:db8::(10+i), the decimal digits
/// read as hex so master 1 is `2001:db8::11`, like its IPv4 address.
pub fn master_v6(i: usize) -> Ipv6Addr {
    let group = u16::from_str_radix(&(10 + i).to_string(), 16).unwrap_or(0);
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, group)
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("building a lab needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")]
    NotRoot,
    #[error("invalid lab prefix {0:?}: use 1 to 40 characters from [A-Za-z0-9_.-]")]
    InvalidPrefix(String),
    #[error("a lab has 1 to {MAX_MASTERS} masters, not {0}")]
    MasterCount(usize),
    #[error(
        "network namespace {0} already exists (left over from an earlier run? see Lab::cleanup_stale)"
    )]
    NamespaceExists(String),
    #[error("network namespace operation failed")]
    Netns(#[from] NetnsError),
    #[error("no master named {0:?} in this lab")]
    UnknownMaster(String),
    #[error("master {0} was never started (call start_masters first)")]
    NotStarted(String),
    #[error("master {0} is not running")]
    NotRunning(String),
    #[error("no certificate for master {0:?} in the PKI paths")]
    MissingCert(String),
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("master {name} exited before it was ready ({status}); end of {}:\n{log_tail}", log.display())]
    MasterExited {
        name: String,
        status: ExitStatus,
        log: PathBuf,
        log_tail: String,
    },
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout { what: String, timeout: Duration },
    #[error("sending signal {signal} to master {name} (pid {pid})")]
    Signal {
        name: String,
        pid: u32,
        signal: i32,
        #[source]
        source: io::Error,
    },
    #[error("switching failure mode")]
    Control(#[from] ControlError),
}

#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Namespace name prefix, e.g. `kha-t1234-0` (see [`LabSpec::unique`]).
    pub prefix: String,
    pub masters: usize,
    /// Bound for each wait: reachability, readiness, a mode switch.
    pub timeout: Duration,
}

impl LabSpec {
    pub fn new(prefix: impl Into<String>, masters: usize) -> Self {
        LabSpec {
            prefix: prefix.into(),
            masters,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// A prefix unique to this process and call: `kha-t<pid>-<n>`, the form
    /// [`Lab::cleanup_orphans`] recognizes.
    pub fn unique(masters: usize) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self::new(format!("kha-t{}-{n}", std::process::id()), masters)
    }
}

/// What `start_masters` needs to (re)start a master process.
#[derive(Debug, Clone)]
struct Launch {
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
    mode: FailureMode,
    process: Option<Child>,
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
        MasterIdentity::new(
            self.name.clone(),
            [IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)],
        )
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

pub struct Lab {
    spec: LabSpec,
    node_netns: String,
    masters: Vec<LabMaster>,
    /// Namespaces this lab created, in creation order; only these are deleted.
    created: Vec<String>,
    workdir: PathBuf,
    launch: Option<Launch>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn valid_prefix(prefix: &str) -> bool {
    (1..=40).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LabError {
    let path = path.to_owned();
    move |source| LabError::Io { what, path, source }
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
            return Err(LabError::Timeout {
                what: what(),
                timeout,
            });
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
    /// Creates the namespaces, links and addresses, then waits (bounded) until
    /// the node reaches every master over IPv4 and IPv6.
    pub fn create(spec: LabSpec) -> Result<Lab, LabError> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        if !valid_prefix(&spec.prefix) {
            return Err(LabError::InvalidPrefix(spec.prefix));
        }
        if !(1..=MAX_MASTERS).contains(&spec.masters) {
            return Err(LabError::MasterCount(spec.masters));
        }
        let node_netns = format!("{}-node", spec.prefix);
        let names: Vec<String> = (1..=spec.masters).map(|i| format!("m{i}")).collect();
        for ns in std::iter::once(node_netns.clone())
            .chain(names.iter().map(|m| format!("{}-{m}", spec.prefix)))
        {
            if netns::exists(&ns) {
                return Err(LabError::NamespaceExists(ns));
            }
        }
        let workdir = std::env::temp_dir().join(&spec.prefix);
        fs::create_dir_all(&workdir).map_err(io_err("creating work directory", &workdir))?;
        let masters = names
            .iter()
            .enumerate()
            .map(|(i, name)| LabMaster {
                name: name.clone(),
                netns: format!("{}-{name}", spec.prefix),
                ipv4: master_v4(i + 1),
                ipv6: master_v6(i + 1),
                node_ifname: name.clone(),
                control_file: workdir.join(format!("{name}.control")),
                ready_file: workdir.join(format!("{name}.ready")),
                log_file: workdir.join(format!("{name}.log")),
                mode: FailureMode::Normal,
                process: None,
            })
            .collect();
        // From here on, an early return drops `lab`, which undoes what was built.
        let mut lab = Lab {
            spec,
            node_netns,
            masters,
            created: Vec::new(),
            workdir,
            launch: None,
        };
        lab.build()?;
        let all: Vec<String> = names;
        lab.wait_reachable(&all)?;
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<(), LabError> {
        netns::add(name)?;
        self.created.push(name.to_owned());
        netns::ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build(&mut self) -> Result<(), LabError> {
        let node = self.node_netns.clone();
        self.add_netns(&node)?;
        let n = |args: &[&str]| -> Result<(), NetnsError> {
            let mut full = vec!["-n", node.as_str()];
            full.extend_from_slice(args);
            netns::ip(&full).map(drop)
        };
        // STP stays off (the default), so bridge ports forward as soon as they are up.
        n(&["link", "add", BRIDGE, "type", "bridge"])?;
        n(&["link", "set", BRIDGE, "up"])?;
        n(&["addr", "add", &format!("{NODE_V4}/24"), "dev", BRIDGE])?;
        n(&[
            "addr",
            "add",
            &format!("{NODE_V6}/64"),
            "dev",
            BRIDGE,
            "nodad",
        ])?;
        for i in 0..self.masters.len() {
            let (ns, ifname, v4, v6) = {
                let m = &self.masters[i];
                (m.netns.clone(), m.node_ifname.clone(), m.ipv4, m.ipv6)
            };
            self.add_netns(&ns)?;
            n(&[
                "link", "add", &ifname, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            n(&["link", "set", &ifname, "master", BRIDGE, "up"])?;
            let m = |args: &[&str]| -> Result<(), NetnsError> {
                let mut full = vec!["-n", ns.as_str()];
                full.extend_from_slice(args);
                netns::ip(&full).map(drop)
            };
            m(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            m(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            m(&["link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    pub fn prefix(&self) -> &str {
        &self.spec.prefix
    }

    pub fn node_netns(&self) -> &str {
        &self.node_netns
    }

    pub fn masters(&self) -> &[LabMaster] {
        &self.masters
    }

    pub fn master(&self, name: &str) -> Result<&LabMaster, LabError> {
        self.masters
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| LabError::UnknownMaster(name.to_owned()))
    }

    fn master_mut(&mut self, name: &str) -> Result<&mut LabMaster, LabError> {
        self.masters
            .iter_mut()
            .find(|m| m.name == name)
            .ok_or_else(|| LabError::UnknownMaster(name.to_owned()))
    }

    /// Identities to generate certificates for (see `Pki::generate`).
    pub fn identities(&self) -> Vec<MasterIdentity> {
        self.masters.iter().map(LabMaster::identity).collect()
    }

    /// Temporary directory for control, ready and log files; removed on drop.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// Waits until the node reaches each named master over IPv4 and IPv6: a
    /// connect to a closed port is refused (not unreachable, not timed out).
    pub fn wait_reachable(&self, names: &[String]) -> Result<(), LabError> {
        let mut targets = Vec::new();
        for name in names {
            let m = self.master(name)?;
            targets.push(SocketAddr::new(m.ipv4.into(), PROBE_PORT));
            targets.push(SocketAddr::new(m.ipv6.into(), PROBE_PORT));
        }
        let timeout = self.spec.timeout;
        let pending = netns::run_in(&self.node_netns, move || {
            let deadline = Instant::now() + timeout;
            let mut pending = targets;
            while !pending.is_empty() && Instant::now() < deadline {
                pending.retain(|addr| {
                    match std::net::TcpStream::connect_timeout(addr, Duration::from_millis(100)) {
                        Ok(_) => false,
                        Err(e) => e.kind() != io::ErrorKind::ConnectionRefused,
                    }
                });
                if !pending.is_empty() {
                    std::thread::sleep(POLL);
                }
            }
            pending
        })?;
        if pending.is_empty() {
            Ok(())
        } else {
            let list: Vec<String> = pending.iter().map(|a| a.ip().to_string()).collect();
            Err(LabError::Timeout {
                what: format!("the node to reach {}", list.join(", ")),
                timeout,
            })
        }
    }

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
        self.launch = Some(Launch {
            bin: bin.to_owned(),
            pki: pki.clone(),
        });
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
        let launch = self
            .launch
            .clone()
            .ok_or_else(|| LabError::NotStarted(name.to_owned()))?;
        let paths = launch
            .pki
            .master(name)
            .ok_or_else(|| LabError::MissingCert(name.to_owned()))?
            .clone();
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
        let log2 = log
            .try_clone()
            .map_err(io_err("duplicating", &m.log_file))?;
        let mut cmd = Command::new(&launch.bin);
        cmd.arg("master").arg("--name").arg(&m.name);
        for addr in [m.https_v4(), m.https_v6()] {
            cmd.arg("--listen").arg(addr.to_string());
        }
        for addr in [m.ident_v4(), m.ident_v6()] {
            cmd.arg("--ident-listen").arg(addr.to_string());
        }
        cmd.arg("--cert")
            .arg(&paths.cert)
            .arg("--key")
            .arg(&paths.key);
        cmd.arg("--control-file")
            .arg(&m.control_file)
            .arg("--ready-file")
            .arg(&m.ready_file);
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
                let child = m
                    .process
                    .as_mut()
                    .ok_or_else(|| LabError::NotRunning(m.name.clone()))?;
                if let Some(status) = child
                    .try_wait()
                    .map_err(io_err("waiting for", &m.log_file))?
                {
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
        let pid = m
            .pid()
            .ok_or_else(|| LabError::NotRunning(name.to_owned()))?;
        // The pid is our unreaped child, so it cannot name another process.
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            let source = io::Error::last_os_error();
            return Err(LabError::Signal {
                name: name.to_owned(),
                pid,
                signal,
                source,
            });
        }
        Ok(())
    }

    /// SIGKILL and reap the master's process.
    pub fn kill_master(&mut self, name: &str) -> Result<(), LabError> {
        let m = self.master_mut(name)?;
        let mut child = m
            .process
            .take()
            .ok_or_else(|| LabError::NotRunning(name.to_owned()))?;
        let _ = child.kill();
        child
            .wait()
            .map_err(io_err("reaping master", &m.log_file))?;
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

    /// Takes the node-side link to a master down: packets to it are lost.
    pub fn link_down(&self, name: &str) -> Result<(), LabError> {
        let m = self.master(name)?;
        netns::ip(&[
            "-n",
            &self.node_netns,
            "link",
            "set",
            &m.node_ifname,
            "down",
        ])?;
        Ok(())
    }

    /// Brings the link back and waits until the master is reachable again.
    pub fn link_up(&self, name: &str) -> Result<(), LabError> {
        let m = self.master(name)?;
        netns::ip(&["-n", &self.node_netns, "link", "set", &m.node_ifname, "up"])?;
        self.wait_reachable(&[name.to_owned()])
    }

    /// Spawns `cmd` in the node namespace (and cgroup), see [`netns::spawn_in`].
    /// The caller owns the child; wrap it in [`netns::KillOnDrop`] to have it
    /// killed with the test.
    pub fn spawn_in_node(&self, cgroup: Option<&Path>, cmd: Command) -> Result<Child, LabError> {
        Ok(netns::spawn_in(&self.node_netns, cgroup, cmd)?)
    }

    /// Deletes every namespace whose name starts with `prefix`, first killing
    /// the processes inside it (left-over masters of a crashed run). Only pass
    /// a prefix no live lab uses: this does not know which labs are alive.
    pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>, LabError> {
        if !valid_prefix(prefix) {
            return Err(LabError::InvalidPrefix(prefix.to_owned()));
        }
        let stale: Vec<String> = netns::list()?
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect();
        for name in &stale {
            remove_netns(name)?;
        }
        Ok(stale)
    }

    /// Deletes labs named by [`LabSpec::unique`] (`kha-t<pid>-...`) whose
    /// creating process no longer exists; safe while other test processes
    /// run their own labs.
    pub fn cleanup_orphans() -> Result<Vec<String>, LabError> {
        let orphaned = |name: &str| {
            let Some(rest) = name.strip_prefix("kha-t") else {
                return false;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            !pid.is_empty()
                && rest[pid.len()..].starts_with('-')
                && !Path::new("/proc").join(&pid).exists()
        };
        let stale: Vec<String> = netns::list()?.into_iter().filter(|n| orphaned(n)).collect();
        for name in &stale {
            remove_netns(name)?;
        }
        Ok(stale)
    }
}

fn remove_netns(name: &str) -> Result<(), LabError> {
    for pid in netns::pids(name)? {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    netns::del(name)?;
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        for m in &mut self.masters {
            if let Some(mut child) = m.process.take() {
                // SIGCONT is not needed: SIGKILL also ends stopped processes.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Master namespaces first: deleting one also deletes its veth pair.
        for ns in self.created.iter().rev() {
            if let Err(e) = netns::del(ns) {
                warn!("lab cleanup: deleting namespace {ns}: {e}");
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.workdir) {
            warn!("lab cleanup: removing {}: {e}", self.workdir.display());
        }
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
    [dir.join("kha-lab"), dir.parent()?.join("kha-lab")]
        .into_iter()
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_documented_plan() {
        assert_eq!(master_v4(1), Ipv4Addr::new(192, 0, 2, 11));
        assert_eq!(master_v6(1).to_string(), "2001:db8::11");
        assert_eq!(master_v6(3).to_string(), "2001:db8::13");
        assert_eq!(master_v4(MAX_MASTERS), Ipv4Addr::new(192, 0, 2, 99));
        assert_eq!(master_v6(MAX_MASTERS).to_string(), "2001:db8::99");
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(valid_prefix("kha-t123-0"));
        assert!(!valid_prefix(""));
        assert!(!valid_prefix("a/b"));
        assert!(!valid_prefix(&"x".repeat(41)));
        assert!(
            LabSpec::unique(1)
                .prefix
                .starts_with(&format!("kha-t{}-", std::process::id()))
        );
    }
}
