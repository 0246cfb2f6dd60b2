//! Terminating the sockets kha redirected, behind a trait: the decisions that call it are
//! tested with a fake, the real one needs root.
//!
//! The real one ends a socket with a forged TCP RST first (`loader::Resetter`: the client reads
//! ECONNRESET, which client-go takes for the normal end of a watch), and with sock_diag
//! SOCK_DESTROY (ECONNABORTED: client-go relists) every socket the RST did not end: not
//! established, no CAP_NET_RAW, an iterator the kernel refused, a sequence number that moved.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use super::Pair;
use crate::errors::chain;
use crate::{
    loader::{self, Leftover, ResetError, Resetter},
    maps::{KhaMaps, MapsError},
};

/// Where the sockets kha redirected can be found and destroyed.
pub trait Terminator {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Destroys the open sockets kha redirected from a pair's frontend to its backend, for
    /// every pair in `pairs`. Returns how many it destroyed.
    fn terminate(&mut self, pairs: &BTreeSet<Pair>) -> Result<usize, Self::Error>;

    /// Ends the `n` oldest open sockets of `pair` (the lowest socket cookies: the kernel
    /// hands them out in order). Returns how many it ended.
    fn terminate_oldest(&mut self, pair: &Pair, n: usize) -> Result<usize, Self::Error>;

    /// The open sockets kha redirected, per pair.
    fn open_per_pair(&self) -> Result<BTreeMap<Pair, usize>, Self::Error>;

    /// The backends that open sockets kha redirected still point at.
    fn backends_in_use(&self) -> Result<BTreeSet<SocketAddr>, Self::Error> {
        Ok(self.open_per_pair()?.into_iter().filter(|(_, n)| *n > 0).map(|((_, b), _)| b).collect())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
    #[error("cannot list the sockets kha redirected")]
    List(#[source] MapsError),
    #[error("SOCK_DESTROY failed")]
    Destroy(#[source] std::io::Error),
}

/// The RST way's state: tried on first use, given up for good if the kernel refuses it.
enum Reset {
    Untried,
    Ready(Resetter),
    Off,
}

/// The real one: sockets found in `KHA_CONNS` (by the addresses the connect hook recorded),
/// reset or destroyed in the served network namespace, counted in `KHA_STATS_V2`.
pub struct SockDestroy {
    maps: KhaMaps,
    netns: Option<PathBuf>,
    reset: Reset,
    /// Fallback reasons already logged at warn level (each once; later ones at debug).
    told: BTreeSet<String>,
}

impl SockDestroy {
    /// `maps`: a handle of its own on the pinned maps (the supervisor's table has the other).
    pub fn new(maps: KhaMaps, netns: Option<&Path>) -> Self {
        Self { maps, netns: netns.map(Path::to_path_buf), reset: Reset::Untried, told: BTreeSet::new() }
    }

    fn tell_once(&mut self, kind: String, message: impl FnOnce() -> String) {
        if self.told.insert(kind) {
            log::warn!("{}; those sockets are ended by SOCK_DESTROY (clients read ECONNABORTED)", message());
        } else {
            log::debug!("{}", message());
        }
    }

    fn resetter(&mut self) -> Option<&mut Resetter> {
        if matches!(self.reset, Reset::Untried) {
            self.reset = match Resetter::load(self.maps.dir()) {
                Ok(r) => Reset::Ready(r),
                Err(e) => {
                    self.tell_once("load".into(), || {
                        format!("cannot reset sockets with a TCP RST: {}", chain(&e))
                    });
                    Reset::Off
                }
            };
        }
        match &mut self.reset {
            Reset::Ready(r) => Some(r),
            _ => None,
        }
    }

    /// The RST way; returns the sockets it ended and those left for SOCK_DESTROY.
    fn reset(&mut self, wanted: &BTreeMap<u64, SocketAddr>) -> (usize, BTreeSet<u64>) {
        let netns = self.netns.clone();
        let Some(r) = self.resetter() else { return (0, wanted.keys().copied().collect()) };
        match r.reset(netns.as_deref(), wanted) {
            Ok(out) => {
                for why in out.left.values().filter(|w| w.worth_telling()).collect::<BTreeSet<_>>() {
                    let kind = match why {
                        Leftover::NoRawSocket(_) => "raw".to_string(),
                        w => format!("{w:?}"),
                    };
                    self.tell_once(kind, || format!("cannot reset some sockets with a TCP RST: {why}"));
                }
                (out.reset.len(), out.left.into_keys().collect())
            }
            Err(e) => {
                let text = chain(&e);
                self.tell_once(format!("run {}", error_kind(&e)), || {
                    format!("cannot reset sockets with a TCP RST: {text}")
                });
                (0, wanted.keys().copied().collect())
            }
        }
    }
}

fn error_kind(e: &ResetError) -> &'static str {
    match e {
        ResetError::Netns { .. } => "netns",
        ResetError::Run(_) | ResetError::Records(_) => "run",
        _ => "load",
    }
}

impl Terminator for SockDestroy {
    type Error = TerminateError;

    fn terminate(&mut self, pairs: &BTreeSet<Pair>) -> Result<usize, TerminateError> {
        let conns = self.maps.conns().map_err(TerminateError::List)?;
        let wanted: BTreeMap<u64, SocketAddr> =
            conns.into_iter().filter(|(_, f, b)| pairs.contains(&(*f, *b))).map(|(c, _, b)| (c, b)).collect();
        self.end(&wanted)
    }

    fn terminate_oldest(&mut self, pair: &Pair, n: usize) -> Result<usize, TerminateError> {
        let conns = self.maps.conns().map_err(TerminateError::List)?;
        let mut of_pair: Vec<(u64, SocketAddr)> =
            conns.into_iter().filter(|(_, f, b)| (*f, *b) == *pair).map(|(c, _, b)| (c, b)).collect();
        of_pair.sort_unstable();
        self.end(&of_pair.into_iter().take(n).collect())
    }

    fn open_per_pair(&self) -> Result<BTreeMap<Pair, usize>, TerminateError> {
        let mut open = BTreeMap::new();
        for (_, f, b) in self.maps.conns().map_err(TerminateError::List)? {
            *open.entry((f, b)).or_insert(0) += 1;
        }
        Ok(open)
    }
}

impl SockDestroy {
    /// Ends the sockets `wanted` names (cookie to backend): RST first, SOCK_DESTROY for the rest.
    fn end(&mut self, wanted: &BTreeMap<u64, SocketAddr>) -> Result<usize, TerminateError> {
        if wanted.is_empty() {
            return Ok(0);
        }
        let (reset, left) = self.reset(wanted);
        // Counted before SOCK_DESTROY runs: the resets happened whether or not it works.
        let destroyed = loader::destroy_sockets(self.netns.as_deref(), &left);
        let n_destroyed = *destroyed.as_ref().unwrap_or(&0);
        if let Err(e) = self.maps.count_terminated(reset as u64, n_destroyed as u64) {
            log::warn!(
                "cannot count {reset} reset and {n_destroyed} destroyed sockets for `kha status`: {e}"
            );
        }
        let destroyed = destroyed.map_err(TerminateError::Destroy)?;
        Ok(reset + destroyed)
    }
}
