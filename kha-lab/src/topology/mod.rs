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
//!
//! Here: [`LabSpec`], [`Lab`] and its creation; `addresses.rs` the address plan, `network.rs`
//! the namespaces and links, `masters.rs` the master processes, `cleanup.rs` the teardown,
//! `error.rs` [`LabError`].

mod addresses;
mod cleanup;
mod error;
mod masters;
mod network;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use self::addresses::{HTTPS_PORT, IDENT_PORT, MAX_MASTERS, NODE_V4, NODE_V6, master_v4, master_v6};
pub use self::error::LabError;
use self::error::io_err;
use self::masters::Launch;
pub use self::masters::{LabMaster, find_kha_lab_bin};
use crate::mode::FailureMode;
use crate::netns;
use crate::pki::MasterIdentity;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

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
        LabSpec { prefix: prefix.into(), masters, timeout: DEFAULT_TIMEOUT }
    }

    /// A prefix unique to this process and call: `kha-t<pid>-<n>`, the form
    /// [`Lab::cleanup_orphans`] recognizes.
    pub fn unique(masters: usize) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self::new(format!("kha-t{}-{n}", std::process::id()), masters)
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
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
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
        for ns in
            std::iter::once(node_netns.clone()).chain(names.iter().map(|m| format!("{}-{m}", spec.prefix)))
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
        let mut lab = Lab { spec, node_netns, masters, created: Vec::new(), workdir, launch: None };
        lab.build()?;
        let all: Vec<String> = names;
        lab.wait_reachable(&all)?;
        Ok(lab)
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
        self.masters.iter().find(|m| m.name == name).ok_or_else(|| LabError::UnknownMaster(name.to_owned()))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_validated() {
        assert!(valid_prefix("kha-t123-0"));
        assert!(!valid_prefix(""));
        assert!(!valid_prefix("a/b"));
        assert!(!valid_prefix(&"x".repeat(41)));
        assert!(LabSpec::unique(1).prefix.starts_with(&format!("kha-t{}-", std::process::id())));
    }
}
