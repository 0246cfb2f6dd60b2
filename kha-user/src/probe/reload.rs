//! Certificate rotation: the probes' TLS files are re-read every [`TLS_CHECK_INTERVAL`] (and on
//! SIGHUP), and a changed set that builds is handed to the probes through their
//! [`TlsHandle`]s. The rules:
//!
//! - A changed set that cannot be used (half-written, not PEM, a key that is not the
//!   certificate's, a file gone) is refused with the file and the cause, and the config in
//!   use stays: probes are never left without one. The same bytes are not tried (nor logged)
//!   again; the next change is.
//! - A new config applies to new probe connections only. An established probe connection was
//!   verified at its handshake and keeps working: forcing every probe to reconnect would make a
//!   CA rolled out to every node a handshake storm on every master at once, and a wrong new CA
//!   would take every master down on every node in the same minute. The prober instead checks
//!   the established connection's certificate against the new CA and warns if it would fail.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use tokio::sync::watch;

use super::files::{TlsFiles, TlsPem};
use super::tls::{ProbeConfigError, ProbeTlsConfig, build};

/// How often the files are re-read. Reading three small local files is cheap; this bounds how
/// long a rotated kubelet certificate waits before new probe connections present it (kubelet
/// rotates at 70 to 90 % of the lifetime, so the old one stays valid for days meanwhile).
pub const TLS_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// A probe's view of its TLS config: read at each new connection, so a reload reaches the
/// next reconnect without restarting the probe.
#[derive(Clone, Debug)]
pub struct TlsHandle(watch::Receiver<Arc<ProbeTlsConfig>>);

/// The sending side of a [`TlsHandle`].
pub type TlsPublisher = watch::Sender<Arc<ProbeTlsConfig>>;

impl TlsHandle {
    pub fn channel(initial: Arc<ProbeTlsConfig>) -> (TlsPublisher, TlsHandle) {
        let (tx, rx) = watch::channel(initial);
        (tx, TlsHandle(rx))
    }

    /// The config for a new connection; marks it seen.
    pub(super) fn for_connect(&mut self) -> Arc<ProbeTlsConfig> {
        self.0.borrow_and_update().clone()
    }

    /// The config, if it changed since the last [`Self::for_connect`] or call of this.
    pub(super) fn take_changed(&mut self) -> Option<Arc<ProbeTlsConfig>> {
        match self.0.has_changed() {
            Ok(true) => Some(self.0.borrow_and_update().clone()),
            _ => None,
        }
    }
}

/// A fixed config (no reloads): what tests and callers without files pass.
impl From<Arc<ClientConfig>> for TlsHandle {
    fn from(client: Arc<ClientConfig>) -> Self {
        TlsHandle::channel(Arc::new(ProbeTlsConfig { client, verifier: None })).1
    }
}

impl From<Arc<ProbeTlsConfig>> for TlsHandle {
    fn from(config: Arc<ProbeTlsConfig>) -> Self {
        TlsHandle::channel(config).1
    }
}

/// What one file set looked like the last time it was refused, so the same failure is not
/// retried and logged every few seconds.
#[derive(Debug, PartialEq, Eq)]
enum Refused {
    Contents(TlsPem),
    Unreadable { path: PathBuf, kind: io::ErrorKind },
}

#[derive(Debug, Default)]
struct Entry {
    /// What `config` was built from.
    pem: Option<TlsPem>,
    config: Option<Arc<ProbeTlsConfig>>,
    refused: Option<Refused>,
}

/// What [`TlsStore::check`] found for one file set that changed.
#[derive(Debug)]
pub enum Reload {
    /// Rebuilt and in use for new connections.
    Reloaded(Arc<ProbeTlsConfig>),
    /// Refused: the previous config (if any) stays.
    Rejected(ProbeConfigError),
}

/// The config of every file set in use, each built from the bytes last seen good.
#[derive(Debug, Default)]
pub struct TlsStore {
    sets: BTreeMap<TlsFiles, Entry>,
}

impl TlsStore {
    /// The config for `files`, read and built the first time they are asked for. `Err(Some)`
    /// the first time they cannot be used (to be reported), `Err(None)` while that lasts.
    pub fn load(&mut self, files: &TlsFiles) -> Result<Arc<ProbeTlsConfig>, Option<ProbeConfigError>> {
        let entry = match self.sets.get_mut(files) {
            Some(entry) => entry,
            None => {
                let mut entry = Entry::default();
                let first = refresh(files, &mut entry);
                self.sets.insert(files.clone(), entry);
                if let Some(Reload::Rejected(e)) = first {
                    return Err(Some(e));
                }
                &self.sets[files]
            }
        };
        entry.config.clone().ok_or(None)
    }

    /// Forgets the file sets no probe uses any more.
    pub fn retain(&mut self, mut in_use: impl FnMut(&TlsFiles) -> bool) {
        self.sets.retain(|files, _| in_use(files));
    }

    /// Re-reads every file set; the ones that changed, with what came of it.
    pub fn check(&mut self) -> Vec<(TlsFiles, Reload)> {
        self.sets
            .iter_mut()
            .filter_map(|(files, entry)| Some((files.clone(), refresh(files, entry)?)))
            .collect()
    }

    /// The config in use for `files`, if they were ever usable.
    pub fn current(&self, files: &TlsFiles) -> Option<Arc<ProbeTlsConfig>> {
        self.sets.get(files)?.config.clone()
    }
}

/// Reads `files` and decides: `None` if nothing changed (or the same refused state is seen
/// again), else the new config or why it was refused.
fn refresh(files: &TlsFiles, entry: &mut Entry) -> Option<Reload> {
    let refused = |entry: &mut Entry, seen: Refused, e: ProbeConfigError| {
        let again = entry.refused.as_ref() == Some(&seen);
        entry.refused = Some(seen);
        (!again).then_some(Reload::Rejected(e))
    };
    let pem = match files.read() {
        Ok(pem) => pem,
        Err(e) => {
            let seen = match &e {
                ProbeConfigError::Read { path, source, .. } => {
                    Refused::Unreadable { path: path.clone(), kind: source.kind() }
                }
                // `read` fails only with `Read`; any other is refused every time it is seen.
                _ => return Some(Reload::Rejected(e)),
            };
            return refused(entry, seen, e);
        }
    };
    if entry.pem.as_ref() == Some(&pem) {
        // Back to what is in use (a refused change was undone).
        entry.refused = None;
        return None;
    }
    if matches!(&entry.refused, Some(Refused::Contents(refused)) if *refused == pem) {
        return None;
    }
    match build(files, &pem) {
        Ok(config) => {
            entry.pem = Some(pem);
            entry.config = Some(config.clone());
            entry.refused = None;
            Some(Reload::Reloaded(config))
        }
        Err(e) => refused(entry, Refused::Contents(pem), e),
    }
}

#[cfg(test)]
#[path = "reload_tests.rs"]
mod tests;
