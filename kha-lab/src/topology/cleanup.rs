//! Taking labs down: this lab's processes, namespaces and work directory on drop, and the
//! namespaces left over by crashed runs ([`Lab::cleanup_stale`], [`Lab::cleanup_orphans`]).

use std::fs;
use std::path::Path;

use log::warn;

use super::{Lab, LabError, valid_prefix};
use crate::netns;

impl Lab {
    /// Deletes every namespace whose name starts with `prefix`, first killing
    /// the processes inside it (left-over masters of a crashed run). Only pass
    /// a prefix no live lab uses: this does not know which labs are alive.
    pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>, LabError> {
        if !valid_prefix(prefix) {
            return Err(LabError::InvalidPrefix(prefix.to_owned()));
        }
        let stale: Vec<String> = netns::list()?.into_iter().filter(|n| n.starts_with(prefix)).collect();
        for name in &stale {
            remove_netns(name)?;
        }
        Ok(stale)
    }

    /// Deletes labs named by [`LabSpec::unique`](super::LabSpec::unique) (`kha-t<pid>-...`) whose
    /// creating process no longer exists; safe while other test processes
    /// run their own labs.
    pub fn cleanup_orphans() -> Result<Vec<String>, LabError> {
        let orphaned = |name: &str| {
            let Some(rest) = name.strip_prefix("kha-t") else {
                return false;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            !pid.is_empty() && rest[pid.len()..].starts_with('-') && !Path::new("/proc").join(&pid).exists()
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
