//! Reading `KHA_CLIENTS` for `kha top` and the metrics: every entry, with its backend id
//! resolved to an address through `KHA_BACKENDS` (an id whose backend left the table shows as
//! `#<id>`; a later backend given the same id inherits the old entry's counts).

use std::{collections::BTreeSet, path::Path};

use aya::maps::{HashMap, MapError};
use kha_common::{Backend, CLIENTS_CAPACITY, ClientKey, ClientStats, MAP_BACKENDS, MAP_CLIENTS, socket_addr};

use super::{MapsError, open};
use crate::top::Sample;

/// Every client entry now.
pub fn samples(maps_dir: &Path) -> Result<Vec<Sample>, MapsError> {
    let typed = |name: &'static str| {
        let path = maps_dir.join(name);
        move |source| MapsError::Open { path, source }
    };
    let clients: HashMap<_, ClientKey, ClientStats> =
        HashMap::try_from(open(maps_dir, MAP_CLIENTS)?).map_err(typed(MAP_CLIENTS))?;
    let backends: HashMap<_, u32, Backend> =
        HashMap::try_from(open(maps_dir, MAP_BACKENDS)?).map_err(typed(MAP_BACKENDS))?;
    let mut seen = BTreeSet::new();
    let mut out = vec![];
    // The kernel adds and evicts entries while we walk, and a deleted key restarts the walk
    // (get_next_key): bounded, keys seen again skipped.
    for entry in clients.iter().take(2 * CLIENTS_CAPACITY) {
        let (k, v) = match entry {
            Ok(e) => e,
            Err(MapError::KeyNotFound) => continue,
            Err(source) => return Err(MapsError::Read { map: MAP_CLIENTS, source }),
        };
        if !seen.insert(k) {
            continue;
        }
        let backend = match backends.get(&k.backend_id, 0) {
            Ok(b) => socket_addr(&b.addr_be, b.port_be).to_string(),
            Err(_) => format!("#{}", k.backend_id),
        };
        out.push(Sample {
            cgroup_id: k.cgroup_id,
            frontend: socket_addr(&k.frontend_addr_be, k.frontend_port_be).to_string(),
            backend,
            backend_id: k.backend_id,
            connects: v.connects,
            open: v.open_count(),
            process: v.comm(),
        });
    }
    Ok(out)
}
