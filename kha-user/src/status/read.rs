//! The status as the pinned maps and links hold it now: what `kha status` prints, and what
//! the end-to-end tests read in-process instead of running `kha status` every few ms.

use std::{collections::BTreeMap, path::PathBuf};

use super::{Inputs, Status, build};
use crate::{
    loader::{self, PinDir},
    maps::{KhaMaps, MapsError},
    table::BackendTable as _,
};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("nothing under {0}: kha is not attached with this --pin-dir")]
    NotAttached(PathBuf),
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// Reads the maps and links under `pins`; works while no agent runs.
pub fn read(pins: &PinDir) -> Result<Status, StatusError> {
    if !pins.root.exists() {
        return Err(StatusError::NotAttached(pins.root.clone()));
    }
    let maps = KhaMaps::open_pinned(&pins.maps())?;
    let snapshot = maps.snapshot()?;
    let mut backends = BTreeMap::new();
    for id in snapshot.backends.keys() {
        backends.insert(*id, (maps.backend_stats(*id)?, maps.suspect(*id)?));
    }
    let pin_dir = pins.root.display().to_string();
    Ok(build(Inputs {
        pin_dir: &pin_dir,
        snapshot: &snapshot,
        config: &maps.datapath_config()?,
        links: loader::link_status(pins),
        counters: maps.stats()?,
        probes: &maps.probe_statuses()?,
        backends: &backends,
        layout: maps.layout()?,
        // A kernel property: asked here, in the namespace the caller runs in.
        sock_destroy: loader::sock_destroy_support(None),
    }))
}
