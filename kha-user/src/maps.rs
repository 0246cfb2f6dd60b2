//! kha's pinned maps, opened from bpffs: the backend table (`BackendTable`), the datapath
//! settings and the counters. One of the two modules that touch the kernel.

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use kha_common::{
    Backend, DatapathConfig, MAP_BACKENDS, MAP_CONFIG, MAP_SERVICES, MAP_STATS, STAT_NAMES, ServiceKey,
    ServiceValue,
};

use crate::{
    endpoints::{Op, Snapshot},
    sync::BackendTable,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("cannot open pinned map {path}; is kha attached with this --pin-dir? (`kha run` creates it)")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("reading map {map} failed")]
    Read {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("writing map {map} failed")]
    Write {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

pub struct KhaMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    config: Array<MapData, DatapathConfig>,
    stats: PerCpuArray<MapData, u64>,
}

fn open(dir: &Path, name: &'static str) -> Result<Map, MapsError> {
    let path = dir.join(name);
    let open_err = |source| MapsError::Open { path: path.clone(), source };
    Map::from_map_data(MapData::from_pin(&path).map_err(open_err)?).map_err(open_err)
}

impl KhaMaps {
    pub fn open_pinned(maps_dir: &Path) -> Result<Self, MapsError> {
        let typed = |name: &'static str| {
            let path = maps_dir.join(name);
            move |source| MapsError::Open { path, source }
        };
        Ok(Self {
            services: HashMap::try_from(open(maps_dir, MAP_SERVICES)?).map_err(typed(MAP_SERVICES))?,
            backends: HashMap::try_from(open(maps_dir, MAP_BACKENDS)?).map_err(typed(MAP_BACKENDS))?,
            config: Array::try_from(open(maps_dir, MAP_CONFIG)?).map_err(typed(MAP_CONFIG))?,
            stats: PerCpuArray::try_from(open(maps_dir, MAP_STATS)?).map_err(typed(MAP_STATS))?,
        })
    }

    pub fn datapath_config(&self) -> Result<DatapathConfig, MapsError> {
        self.config.get(&0, 0).map_err(|source| MapsError::Read { map: MAP_CONFIG, source })
    }

    pub fn set_datapath_config(&mut self, cfg: &DatapathConfig) -> Result<(), MapsError> {
        self.config.set(0, cfg, 0).map_err(|source| MapsError::Write { map: MAP_CONFIG, source })
    }

    /// Counters summed over CPUs, by name.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, MapsError> {
        STAT_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let per_cpu = self
                    .stats
                    .get(&(i as u32), 0)
                    .map_err(|source| MapsError::Read { map: MAP_STATS, source })?;
                Ok((*name, per_cpu.iter().sum()))
            })
            .collect()
    }
}

impl BackendTable for KhaMaps {
    type Error = MapsError;

    fn snapshot(&self) -> Result<Snapshot, MapsError> {
        let services = self
            .services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| MapsError::Read { map: MAP_SERVICES, source })?;
        let backends = self
            .backends
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| MapsError::Read { map: MAP_BACKENDS, source })?;
        Ok(Snapshot { services, backends })
    }

    fn apply(&mut self, op: &Op) -> Result<(), MapsError> {
        let (map, result) = match op {
            Op::PutBackend(id, b) => (MAP_BACKENDS, self.backends.insert(id, b, 0)),
            Op::DeleteBackend(id) => (MAP_BACKENDS, self.backends.remove(id)),
            Op::PutSlot(k, v) => (MAP_SERVICES, self.services.insert(k, v, 0)),
            Op::DeleteSlot(k) => (MAP_SERVICES, self.services.remove(k)),
        };
        result.map_err(|source| MapsError::Write { map, source })
    }
}
