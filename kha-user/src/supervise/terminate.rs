//! Terminating the sockets kha redirected, behind a trait: the decisions that call it are
//! tested with a fake, the real one needs root (sock_diag `SOCK_DESTROY`).

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use super::Pair;
use crate::{
    loader,
    maps::{KhaMaps, MapsError},
};

/// Where the sockets kha redirected can be found and destroyed.
pub trait Terminator {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Destroys the open sockets kha redirected from a pair's frontend to its backend, for
    /// every pair in `pairs`. Returns how many it destroyed.
    fn terminate(&mut self, pairs: &BTreeSet<Pair>) -> Result<usize, Self::Error>;

    /// The backends that open sockets kha redirected still point at.
    fn backends_in_use(&self) -> Result<BTreeSet<SocketAddr>, Self::Error>;
}

#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
    #[error("cannot list the sockets kha redirected")]
    List(#[source] MapsError),
    #[error("SOCK_DESTROY failed")]
    Destroy(#[source] std::io::Error),
}

/// The real one: sockets found in `KHA_CONNS` (by the addresses the connect hook recorded),
/// destroyed with sock_diag in the served network namespace, counted in `KHA_STATS`.
pub struct SockDestroy {
    maps: KhaMaps,
    netns: Option<PathBuf>,
}

impl SockDestroy {
    /// `maps`: a handle of its own on the pinned maps (the supervisor's table has the other).
    pub fn new(maps: KhaMaps, netns: Option<&Path>) -> Self {
        Self { maps, netns: netns.map(Path::to_path_buf) }
    }
}

impl Terminator for SockDestroy {
    type Error = TerminateError;

    fn terminate(&mut self, pairs: &BTreeSet<Pair>) -> Result<usize, TerminateError> {
        let conns = self.maps.conns().map_err(TerminateError::List)?;
        let cookies: BTreeSet<u64> =
            conns.into_iter().filter(|(_, f, b)| pairs.contains(&(*f, *b))).map(|(c, _, _)| c).collect();
        let n = loader::destroy_sockets(self.netns.as_deref(), &cookies).map_err(TerminateError::Destroy)?;
        if let Err(e) = self.maps.count_terminated(n as u64) {
            log::warn!("cannot count {n} terminated sockets for `kha status`: {e}");
        }
        Ok(n)
    }

    fn backends_in_use(&self) -> Result<BTreeSet<SocketAddr>, TerminateError> {
        let conns = self.maps.conns().map_err(TerminateError::List)?;
        Ok(conns.into_iter().map(|(_, _, b)| b).collect())
    }
}
