//! kha's pinned maps, opened from bpffs: the backend table (`BackendTable`), the datapath
//! settings and the counters. One of the two modules that touch the kernel.

pub mod clients;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use kha_common::{
    Backend, BackendStats, Conn, DatapathConfig, MAP_BACKEND_HEALTH, MAP_BACKEND_STATS, MAP_BACKENDS,
    MAP_CONFIG, MAP_CONNS, MAP_LAYOUT, MAP_PROBES, MAP_SERVICES, MAP_STATS, MapLayout, PassiveHealth,
    ProbeKey, ProbeStatus, STAT_NAMES, STAT_TERMINATED, STAT_TERMINATED_DESTROY, STAT_TERMINATED_RESET,
    ServiceKey, ServiceValue, socket_addr,
};

use crate::{
    supervise::Datapath,
    table::{BackendTable, Op, Snapshot},
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
    dir: PathBuf,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    config: Array<MapData, DatapathConfig>,
    stats: PerCpuArray<MapData, u64>,
    backend_stats: Array<MapData, BackendStats>,
    backend_health: Array<MapData, PassiveHealth>,
    // An LRU hash; aya reads it through the same type as a plain one.
    conns: HashMap<MapData, u64, Conn>,
    probes: HashMap<MapData, ProbeKey, ProbeStatus>,
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
            dir: maps_dir.to_owned(),
            services: HashMap::try_from(open(maps_dir, MAP_SERVICES)?).map_err(typed(MAP_SERVICES))?,
            backends: HashMap::try_from(open(maps_dir, MAP_BACKENDS)?).map_err(typed(MAP_BACKENDS))?,
            config: Array::try_from(open(maps_dir, MAP_CONFIG)?).map_err(typed(MAP_CONFIG))?,
            stats: PerCpuArray::try_from(open(maps_dir, MAP_STATS)?).map_err(typed(MAP_STATS))?,
            backend_stats: Array::try_from(open(maps_dir, MAP_BACKEND_STATS)?)
                .map_err(typed(MAP_BACKEND_STATS))?,
            backend_health: Array::try_from(open(maps_dir, MAP_BACKEND_HEALTH)?)
                .map_err(typed(MAP_BACKEND_HEALTH))?,
            conns: HashMap::try_from(open(maps_dir, MAP_CONNS)?).map_err(typed(MAP_CONNS))?,
            probes: HashMap::try_from(open(maps_dir, MAP_PROBES)?).map_err(typed(MAP_PROBES))?,
        })
    }

    /// The directory the maps are pinned in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Adds to the `terminated` counters (the agent's own, kept with the kernel's so `kha
    /// status` shows them without an agent): `reset` sockets ended by an RST, `destroyed` by
    /// SOCK_DESTROY, and both to the total.
    pub fn count_terminated(&mut self, reset: u64, destroyed: u64) -> Result<(), MapsError> {
        for (stat, n) in [
            (STAT_TERMINATED, reset + destroyed),
            (STAT_TERMINATED_RESET, reset),
            (STAT_TERMINATED_DESTROY, destroyed),
        ] {
            if n > 0 {
                self.add_stat(stat, n)?;
            }
        }
        Ok(())
    }

    fn add_stat(&mut self, stat: u32, n: u64) -> Result<(), MapsError> {
        let read = |source| MapsError::Read { map: MAP_STATS, source };
        let mut values: Vec<u64> = self.stats.get(&stat, 0).map_err(read)?.iter().copied().collect();
        if let Some(first) = values.first_mut() {
            *first += n;
        }
        let values = aya::maps::PerCpuValues::try_from(values)
            .map_err(|e| MapsError::Write { map: MAP_STATS, source: MapError::IoError(e) })?;
        self.stats.set(stat, values, 0).map_err(|source| MapsError::Write { map: MAP_STATS, source })
    }

    /// The kernel's counters for one backend id.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats, MapsError> {
        self.backend_stats.get(&id, 0).map_err(|source| MapsError::Read { map: MAP_BACKEND_STATS, source })
    }

    /// Whether a failed connect marked the backend suspect.
    pub fn suspect(&self, id: u32) -> Result<bool, MapsError> {
        let h = self
            .backend_health
            .get(&id, 0)
            .map_err(|source| MapsError::Read { map: MAP_BACKEND_HEALTH, source })?;
        Ok(h.suspect_ns != 0)
    }

    /// Lifts the kernel's suspicion once a probe shows the backend ready.
    pub fn clear_suspect(&mut self, id: u32) -> Result<(), MapsError> {
        self.backend_health
            .set(id, &PassiveHealth::default(), 0)
            .map_err(|source| MapsError::Write { map: MAP_BACKEND_HEALTH, source })
    }

    /// The open sockets kha redirected: cookie, frontend and backend of each, as the connect
    /// hook recorded them. By address rather than backend id: an id is freed when its backend
    /// leaves the table, while the sockets that carry it live on.
    pub fn conns(&self) -> Result<Vec<(u64, SocketAddr, SocketAddr)>, MapsError> {
        self.conns
            .iter()
            .map(|entry| {
                let (cookie, c) = entry.map_err(|source| MapsError::Read { map: MAP_CONNS, source })?;
                let frontend = socket_addr(&c.frontend_addr_be, c.frontend_port_be);
                Ok((cookie, frontend, socket_addr(&c.backend_addr_be, c.backend_port_be)))
            })
            .collect()
    }

    pub fn probe_statuses(&self) -> Result<BTreeMap<ProbeKey, ProbeStatus>, MapsError> {
        self.probes
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|source| MapsError::Read { map: MAP_PROBES, source })
    }

    /// Replaces the probe statuses with `want`: writes what changed, deletes what is gone.
    pub fn set_probe_statuses(&mut self, want: &BTreeMap<ProbeKey, ProbeStatus>) -> Result<(), MapsError> {
        let have = self.probe_statuses()?;
        let write = |source| MapsError::Write { map: MAP_PROBES, source };
        for (k, v) in want {
            if have.get(k) != Some(v) {
                self.probes.insert(k, v, 0).map_err(write)?;
            }
        }
        for k in have.keys().filter(|k| !want.contains_key(k)) {
            self.probes.remove(k).map_err(write)?;
        }
        Ok(())
    }

    pub fn datapath_config(&self) -> Result<DatapathConfig, MapsError> {
        self.config.get(&0, 0).map_err(|source| MapsError::Read { map: MAP_CONFIG, source })
    }

    pub fn set_datapath_config(&mut self, cfg: &DatapathConfig) -> Result<(), MapsError> {
        self.config.set(0, cfg, 0).map_err(|source| MapsError::Write { map: MAP_CONFIG, source })
    }

    /// `KHA_LAYOUT`'s entries, empty if the maps were pinned by a kha from before the record.
    pub fn layout(&self) -> Result<Vec<MapLayout>, MapsError> {
        let path = self.dir.join(MAP_LAYOUT);
        if !path.exists() {
            return Ok(vec![]);
        }
        let read = |source| MapsError::Read { map: MAP_LAYOUT, source };
        let record: Array<MapData, MapLayout> =
            Array::try_from(open(&self.dir, MAP_LAYOUT)?).map_err(read)?;
        let entries: Vec<MapLayout> = record.iter().collect::<Result<_, _>>().map_err(read)?;
        Ok(entries.into_iter().filter(|l| !l.name().is_empty()).collect())
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
            Op::PutBackend(id, b) => {
                // A new id starts with clean counters and no suspicion, whoever had it before.
                if !matches!(self.backends.get(id, 0), Ok(old) if old == *b) {
                    let zero = (self.backend_stats.set(*id, &BackendStats::default(), 0))
                        .and_then(|()| self.backend_health.set(*id, &PassiveHealth::default(), 0));
                    zero.map_err(|source| MapsError::Write { map: MAP_BACKEND_STATS, source })?;
                }
                (MAP_BACKENDS, self.backends.insert(id, b, 0))
            }
            Op::DeleteBackend(id) => (MAP_BACKENDS, self.backends.remove(id)),
            Op::PutSlot(k, v) => (MAP_SERVICES, self.services.insert(k, v, 0)),
            Op::DeleteSlot(k) => (MAP_SERVICES, self.services.remove(k)),
        };
        result.map_err(|source| MapsError::Write { map, source })
    }
}

impl Datapath for KhaMaps {
    fn lift_suspicion(&mut self, id: u32) -> Result<bool, MapsError> {
        let suspect = self.suspect(id)?;
        if suspect {
            self.clear_suspect(id)?;
        }
        Ok(suspect)
    }

    fn set_probe_statuses(&mut self, want: &BTreeMap<ProbeKey, ProbeStatus>) -> Result<(), MapsError> {
        KhaMaps::set_probe_statuses(self, want)
    }
}
