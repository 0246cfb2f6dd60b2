//! The kernel half of `kha trace`: loads the `kha-trace` object (the traced twins of the
//! connect programs) against the pinned maps, swaps its programs in under the pinned connect
//! links with `BPF_LINK_UPDATE`, hands over the records of its ring buffer, and swaps kha's
//! own programs back when the trace ends: when it is dropped. Pure handling of the records is
//! in `crate::trace`.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{CgroupSockAddr, ProgramError},
};
use std::net::SocketAddr;

use kha_common::{
    MAP_TRACE, MAP_TRACE_LOST, TRACE_FILTER_GLOBAL, TRACE_PROG4, TRACE_PROG6, TraceEvent, TraceFilter,
};

use super::{HOOKS, PinDir, sys};

/// The traced object, built from kha-ebpf's `traced.rs` by build.rs.
static TRACE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kha-trace"));

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{path}: no pinned link ({source}); is the agent attached with this --pin-dir?")]
    NotAttached {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot load the traced programs against the maps under {maps}: {source}")]
    Object {
        maps: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("the kernel refused the traced program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the trace object's {MAP_TRACE} is not a ring buffer; the build is broken")]
    Ring(#[source] aya::maps::MapError),
    #[error(
        "{hook}: cannot swap the traced program in under the pinned link: {source}{}",
        swap_hint(.source)
    )]
    Swap {
        hook: &'static str,
        #[source]
        source: io::Error,
    },
}

fn swap_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::EOPNOTSUPP) => {
            " (the kernel lacks BPF_LINK_UPDATE for cgroup links: Linux >= 5.7 needed)"
        }
        Some(libc::EPERM) => " (the link's program changed under us: another kha swapped it)",
        _ => "",
    }
}

/// One connect link with both its programs.
struct Swap {
    hook: &'static str,
    link: OwnedFd,
    untraced: OwnedFd,
    traced: OwnedFd,
    prog_ids: (u32, u32),
}

/// A running trace: the traced programs are attached until it is dropped.
pub struct Tracing {
    swaps: Vec<Swap>,
    ring: RingBuf<MapData>,
    /// Holds the traced programs and the lost-record count.
    ebpf: Ebpf,
}

impl Tracing {
    /// Loads and verifies the traced programs, then swaps them in: connect4 first, then
    /// connect6. If the second swap fails the first is undone. The kernel reports connects to
    /// `destinations` only (every connect when empty, or when more than it can filter on).
    pub fn start(pins: &PinDir, destinations: &[SocketAddr]) -> Result<Self, TraceError> {
        let maps_dir = pins.maps();
        let mut loader = match super::pinned_conns_capacity(&maps_dir) {
            Some(conns) => super::object_loader(&maps_dir, conns),
            None => {
                let path = maps_dir.join(kha_common::MAP_CONNS);
                let source = io::Error::from(io::ErrorKind::NotFound);
                return Err(TraceError::NotAttached { path, source });
            }
        };
        let filter = TraceFilter::of(destinations);
        let mut ebpf = loader
            .override_global(TRACE_FILTER_GLOBAL, &filter, true)
            .load(TRACE_OBJECT)
            .map_err(|e| TraceError::Object { maps: maps_dir.clone(), source: Box::new(e) })?;
        let ring = ebpf
            .take_map(MAP_TRACE)
            .ok_or(aya::maps::MapError::InvalidName { name: MAP_TRACE.into() })
            .and_then(RingBuf::try_from)
            .map_err(TraceError::Ring)?;
        let mut swaps = Vec::new();
        for (program, link) in [(TRACE_PROG4, "connect4"), (TRACE_PROG6, "connect6")] {
            let hook = HOOKS.iter().find(|h| h.link == link).expect("a connect hook");
            let prog_err = |source| TraceError::Program { program, source };
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(program)
                .ok_or(ProgramError::NotLoaded)
                .and_then(TryInto::try_into)
                .map_err(prog_err)?;
            prog.load().map_err(prog_err)?;
            let traced = prog.fd().map_err(prog_err)?.as_fd().try_clone_to_owned();
            let path = pins.link(hook);
            let attached = |source| TraceError::NotAttached { path: path.clone(), source };
            let link = sys::obj_get(&path).map_err(attached)?;
            let info = sys::link_info(link.as_fd()).map_err(attached)?;
            let untraced = sys::prog_fd_by_id(info.prog_id).map_err(attached)?;
            let traced = traced.map_err(|source| TraceError::Swap { hook: hook.link, source })?;
            let traced_id = sys::prog_id_name(traced.as_fd()).map_or(0, |(id, _)| id);
            swaps.push(Swap { hook: hook.link, link, untraced, traced, prog_ids: (info.prog_id, traced_id) });
        }
        for (i, s) in swaps.iter().enumerate() {
            if let Err(source) = sys::link_update(s.link.as_fd(), s.traced.as_fd(), s.untraced.as_fd()) {
                for done in swaps[..i].iter().rev() {
                    swap_back(done);
                }
                return Err(TraceError::Swap { hook: s.hook, source });
            }
        }
        Ok(Self { swaps, ring, ebpf })
    }

    /// (untraced, traced) program ids per connect hook, for the log.
    pub fn prog_ids(&self) -> Vec<(&'static str, u32, u32)> {
        self.swaps.iter().map(|s| (s.hook, s.prog_ids.0, s.prog_ids.1)).collect()
    }

    /// Records the kernel could not put in the ring (full), over all CPUs; 0 if unreadable.
    pub fn lost(&self) -> u64 {
        let Some(map) = self.ebpf.map(MAP_TRACE_LOST) else { return 0 };
        let Ok(lost) = PerCpuArray::<_, u64>::try_from(map) else { return 0 };
        lost.get(&0, 0).map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    /// Takes up to `max` records out of the ring buffer without waiting.
    pub fn drain(&mut self, max: usize) -> Vec<TraceEvent> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.ring.next() else { break };
            if let Some(e) = TraceEvent::from_bytes(&item) {
                out.push(e);
            }
        }
        out
    }
}

/// The connect hooks whose pinned link runs a traced program: left by an agent that could not
/// swap back (killed during a trace). The next `attach` replaces them like any other program.
pub fn left_attached(pins: &PinDir) -> Vec<&'static str> {
    let traced = |hook: &super::Hook| {
        let link = sys::obj_get(&pins.link(hook)).ok()?;
        let prog = sys::prog_fd_by_id(sys::link_info(link.as_fd()).ok()?.prog_id).ok()?;
        let (_, name) = sys::prog_id_name(prog.as_fd()).ok()?;
        [TRACE_PROG4, TRACE_PROG6].contains(&name.as_str()).then_some(hook.link)
    };
    HOOKS.iter().filter_map(traced).collect()
}

/// Puts the untraced program back, but only if the traced one still runs there
/// (`BPF_F_REPLACE`): an agent that swapped in its own programs since is left alone.
fn swap_back(s: &Swap) {
    if let Err(e) = sys::link_update(s.link.as_fd(), s.untraced.as_fd(), s.traced.as_fd()) {
        log::error!("trace: cannot swap the untraced program back under {}: {e}", s.hook);
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        for s in self.swaps.iter().rev() {
            swap_back(s);
        }
    }
}
