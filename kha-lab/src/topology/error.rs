//! What can go wrong building or driving a lab ([`LabError`]).

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use super::addresses::MAX_MASTERS;
use crate::mode::ControlError;
use crate::netns::NetnsError;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("building a lab needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")]
    NotRoot,
    #[error("invalid lab prefix {0:?}: use 1 to 40 characters from [A-Za-z0-9_.-]")]
    InvalidPrefix(String),
    #[error("a lab has 1 to {MAX_MASTERS} masters, not {0}")]
    MasterCount(usize),
    #[error("network namespace {0} already exists (left over from an earlier run? see Lab::cleanup_stale)")]
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
    MasterExited { name: String, status: ExitStatus, log: PathBuf, log_tail: String },
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

pub(super) fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LabError {
    let path = path.to_owned();
    move |source| LabError::Io { what, path, source }
}
