//! Loading, pinning and attaching kha's programs: one of the two modules that touch the
//! kernel (the other is `maps`).
//!
//! Pins live under one directory (default `/sys/fs/bpf/kha`): `maps/KHA_*` and
//! `links/{getpeername4,getpeername6,sockops,sock_release,connect4,connect6}`. Links are
//! bpf_links, pinned, so the programs stay attached while no agent runs; a new agent swaps its
//! programs in under the same links with `BPF_LINK_UPDATE`, which no connect can observe
//! half-done. A build whose maps differ from the pinned ones migrates them through
//! `maps-next/` (see `migrate`).

mod checks;
mod coexist;
mod destroy_check;
mod detach;
mod error;
mod migrate;
mod netns;
mod reset;
mod sockdiag;
mod sys;
mod trace;

use std::{
    fs::File,
    io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, Program, ProgramError,
        links::{FdLink, LinkError, PinnedLink},
    },
    sys::SyscallError,
};
use aya_obj::generated::bpf_attach_type::{
    BPF_CGROUP_INET_SOCK_RELEASE, BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET4_GETPEERNAME,
    BPF_CGROUP_INET6_CONNECT, BPF_CGROUP_INET6_GETPEERNAME, BPF_CGROUP_SOCK_OPS,
};
use kha_common::MAP_CONNS;

use crate::layout::{self, Action};
pub use checks::{
    PinLock, cgroup_id, default_cgroup, ensure_bpffs, kernel_supported, lock_pin_dir, netns_cookie,
    socket_in_netns,
};
pub use coexist::Blocker;
pub use destroy_check::{DestroySupport, check_sock_destroy, sock_destroy_support};
pub use detach::{Detached, LinkStatus, detach, link_status};
pub use error::LoaderError;
pub(crate) use error::setup_err;
pub use migrate::{Recovered, wanted};
pub use reset::{Leftover, Outcome as ResetOutcome, ResetError, Resetter};
pub use sockdiag::destroy as destroy_sockets;
pub use sys::LinkInfo;
pub use trace::{TraceError, Tracing, left_attached as traced_left_attached};

/// The eBPF object built from kha-ebpf by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kha"));

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/kha";

/// A program, the hook it attaches to, and the name its link is pinned under.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    pub program: &'static str,
    pub link: &'static str,
    pub attach_type: u32,
}

/// In attach order: getpeername, sock_ops and sock_release first, so every socket the connect
/// hooks rewrite is answered, counted and forgotten from its first connect; in detach order the
/// reverse.
pub const HOOKS: [Hook; kha_common::HOOK_COUNT] = [
    Hook { program: "kha_peername4", link: "getpeername4", attach_type: at(BPF_CGROUP_INET4_GETPEERNAME) },
    Hook { program: "kha_peername6", link: "getpeername6", attach_type: at(BPF_CGROUP_INET6_GETPEERNAME) },
    Hook { program: "kha_sockops", link: "sockops", attach_type: at(BPF_CGROUP_SOCK_OPS) },
    Hook { program: "kha_release", link: "sock_release", attach_type: at(BPF_CGROUP_INET_SOCK_RELEASE) },
    Hook { program: "kha_connect4", link: "connect4", attach_type: at(BPF_CGROUP_INET4_CONNECT) },
    Hook { program: "kha_connect6", link: "connect6", attach_type: at(BPF_CGROUP_INET6_CONNECT) },
];

#[derive(Clone, Debug)]
pub struct PinDir {
    pub root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    /// Where a migration builds the new map set (see `migrate`).
    pub fn staging(&self) -> PathBuf {
        migrate::staging_dir(&self.root)
    }
    pub fn link(&self, hook: &Hook) -> PathBuf {
        self.links().join(hook.link)
    }
    pub fn create(&self) -> Result<(), LoaderError> {
        for dir in [self.root.clone(), self.maps(), self.links()] {
            std::fs::create_dir_all(&dir).map_err(setup_err(&dir, "cannot create pin directory"))?;
        }
        Ok(())
    }
}

/// The object with every program verified and loaded, not yet attached, and its maps: the
/// pinned ones reused, or (a migration) a new set filled in `pins.staging()`.
pub struct Loaded {
    ebpf: Ebpf,
    maps_dir: PathBuf,
    /// In a migration: the plan until `attach` copies the entries, then what the pass after
    /// the swap needs.
    plan: Option<Vec<(layout::Wanted, Action)>>,
    carried: Option<Vec<migrate::Carried>>,
    pub report: LoadReport,
}

/// What `load` found and did with the pinned maps, for the start-up log.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub recovered: Option<Recovered>,
    /// Every map with what the plan did, and the entries copied into a new map.
    pub maps: Vec<(&'static str, Action, usize)>,
}

impl LoadReport {
    pub fn lines(&self) -> Vec<String> {
        let mut out: Vec<String> =
            self.recovered.iter().map(|r| format!("an earlier migration: {r:?}")).collect();
        for (map, action, copied) in &self.maps {
            match action {
                Action::Create => out.push(format!("{map}: created")),
                Action::Reuse => {}
                Action::Migrate { copy, why } => out.push(format!(
                    "{map}: migrated ({why:?}), {}",
                    if *copy { format!("{copied} entries copied") } else { "rebuilt".to_owned() }
                )),
            }
        }
        out
    }
}

/// The loader for kha's object with its maps under `dir`, the conn map at `conns` entries.
fn object_loader(dir: &Path, conns: u32) -> EbpfLoader<'static> {
    let mut l = EbpfLoader::new();
    l.default_map_pin_directory(dir).map_max_entries(MAP_CONNS, conns);
    l
}

/// The capacity of the pinned conn map under `dir`, for a second load of the object (the
/// iterator) that must reuse it as it is.
pub(crate) fn pinned_conns_capacity(dir: &Path) -> Option<u32> {
    Some(aya::maps::MapInfo::from_pin(dir.join(MAP_CONNS)).ok()?.max_entries())
}

/// Loads kha's programs against maps of the layout this build has, with `conns_capacity`
/// entries in the conn map (`netns`: where the redirected sockets are, the served namespace): pinned maps are reused where they match and migrated where they
/// do not (see `migrate`); a pinned map that cannot be carried over is refused before
/// anything changes.
pub fn load(pins: &PinDir, conns_capacity: u32, netns: Option<&Path>) -> Result<Loaded, LoaderError> {
    let recovered = migrate::recover(pins, migrate::Served { netns, mend_counts: false })?;
    let wanted = migrate::wanted(conns_capacity);
    let state = migrate::pinned_state(&pins.maps(), &wanted)?;
    let plan = layout::plan(state.iter().map(|(p, w)| (p.as_ref(), *w)))?;
    let migrating = layout::migrates(&plan);
    let maps_dir = if migrating {
        migrate::stage(pins, &plan)?;
        pins.staging()
    } else {
        migrate::drop_foreign_record(&pins.maps())?;
        pins.maps()
    };
    let mut ebpf = object_loader(&maps_dir, conns_capacity)
        .load(OBJECT)
        .map_err(|source| LoaderError::Object { maps: maps_dir.clone(), source: Box::new(source) })?;
    for hook in HOOKS {
        let result = match program(&mut ebpf, hook)? {
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::SockOps(p) => p.load(),
            _ => return Err(missing(hook)),
        };
        result.map_err(|source| LoaderError::Program { program: hook.program, source })?;
    }
    migrate::write_record(&maps_dir, &plan)?;
    let prefilled = if migrating { migrate::prefill(pins, &plan)? } else { vec![] };
    let count = |name| prefilled.iter().find(|(m, _)| *m == name).map_or(0, |(_, n)| *n);
    let maps = plan.iter().map(|(w, a)| (w.spec.name, *a, count(w.spec.name))).collect();
    Ok(Loaded {
        ebpf,
        maps_dir,
        plan: migrating.then_some(plan),
        carried: None,
        report: LoadReport { recovered, maps },
    })
}

use sys::attach_type as at;

fn missing(hook: Hook) -> LoaderError {
    LoaderError::Unsupported(format!("program {} missing from the object; the build is broken", hook.program))
}

fn program(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut Program, LoaderError> {
    ebpf.program_mut(hook.program).ok_or_else(|| missing(hook))
}

/// A pinned link found on disk, checked to be ours and on the right cgroup.
struct Existing {
    fd: OwnedFd,
    info: LinkInfo,
}

/// Reads the pinned links and refuses any that are not kha's links on `cgroup_id`, before
/// anything is written.
fn existing_links(
    pins: &PinDir,
    cgroup: &Path,
    cgroup_id: u64,
) -> Result<Vec<Option<Existing>>, LoaderError> {
    HOOKS
        .iter()
        .map(|hook| {
            let path = pins.link(hook);
            if !path.exists() {
                return Ok(None);
            }
            let fd = sys::obj_get(&path).map_err(setup_err(&path, "cannot open pinned link"))?;
            let info = sys::link_info(fd.as_fd()).map_err(setup_err(&path, "cannot read pinned link"))?;
            if info.link_type != sys::BPF_LINK_TYPE_CGROUP || info.attach_type != hook.attach_type {
                return Err(LoaderError::NotOurLink { path, hook: hook.link });
            }
            if info.cgroup_id != cgroup_id {
                return Err(LoaderError::ForeignLink {
                    path,
                    found: info.cgroup_id,
                    wanted: cgroup_id,
                    cgroup: cgroup.to_owned(),
                    pin_dir: pins.root.clone(),
                });
            }
            Ok(Some(Existing { fd, info }))
        })
        .collect()
}

/// What `attach` did per hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attached {
    Created { hook: &'static str },
    Replaced { hook: &'static str, old_prog_id: u32 },
}

impl Loaded {
    /// Where the maps the loaded programs use are pinned until `commit`: the agent writes
    /// its backend table there before `attach`.
    pub fn maps_dir(&self) -> &Path {
        &self.maps_dir
    }

    /// After `attach`: in a migration, makes the new map set `pins.maps()`, carries over what
    /// the old programs wrote since the copy, and removes the old set (see `migrate`).
    /// Returns the entries carried in that last pass, per map; nothing without a migration.
    pub fn commit(
        &mut self,
        pins: &PinDir,
        netns: Option<&Path>,
    ) -> Result<Vec<(&'static str, usize)>, LoaderError> {
        let Some(carried) = self.carried.as_mut() else { return Ok(vec![]) };
        let late = migrate::commit(pins, carried, migrate::Served { netns, mend_counts: true })?;
        self.carried = None;
        self.maps_dir = pins.maps();
        Ok(late)
    }

    /// Checks the pinned links before anything is written (see `existing_links`).
    pub fn preflight(&self, pins: &PinDir, cgroup: &Path, cgroup_id: u64) -> Result<(), LoaderError> {
        existing_links(pins, cgroup, cgroup_id).map(drop)
    }

    /// Attaches every program to `cgroup`: pinned links get the new program swapped in, hooks
    /// without a link get a new pinned one. All or nothing: on failure, swapped links get
    /// their old program back and new links are dropped before they are pinned.
    pub fn attach(
        &mut self,
        pins: &PinDir,
        cgroup: &Path,
        cgroup_id: u64,
    ) -> Result<Vec<Attached>, LoaderError> {
        let existing = existing_links(pins, cgroup, cgroup_id)?;
        // No link pinned: nothing of kha serves from this pin dir yet, so a failure below
        // removes the maps `load` pinned too, leaving no trace.
        let fresh = existing.iter().all(Option::is_none);
        let result = self.attach_links(pins, cgroup, existing);
        if result.is_err()
            && fresh
            && let Err(e) = detach(pins)
        {
            log::warn!("removing the pins after the failed attach: {e}");
        }
        result
    }

    fn attach_links(
        &mut self,
        pins: &PinDir,
        cgroup: &Path,
        existing: Vec<Option<Existing>>,
    ) -> Result<Vec<Attached>, LoaderError> {
        let to_create: Vec<Hook> =
            HOOKS.iter().zip(&existing).filter(|(_, e)| e.is_none()).map(|(h, _)| *h).collect();
        blocked(cgroup, &to_create)?;
        if let Some(plan) = self.plan.take() {
            // As late as possible: what the old programs write after this copy and before
            // the swap is what `commit` must carry over, and less of it is better.
            let (carried, copied) = migrate::fill(&pins.maps(), &self.maps_dir, &plan)?;
            for (map, _, n) in &mut self.report.maps {
                if let Some((_, c)) = copied.iter().find(|(m, _)| m == map) {
                    *n = *c;
                }
            }
            self.carried = Some(carried);
        }
        let cg = File::open(cgroup).map_err(setup_err(cgroup, "cannot open cgroup"))?;
        let mut swapped: Vec<(OwnedFd, OwnedFd, OwnedFd)> = Vec::new(); // (link, old prog, new prog)
        let mut created: Vec<(Hook, FdLink)> = Vec::new();
        let mut pinned: Vec<PinnedLink> = Vec::new();
        let mut done = Vec::new();
        let result = (|| {
            for (hook, found) in HOOKS.into_iter().zip(existing) {
                let prog = program(&mut self.ebpf, hook)?;
                let prog_fd =
                    prog.fd().map_err(|source| LoaderError::Program { program: hook.program, source })?;
                match found {
                    Some(Existing { fd, info }) => {
                        // Kept for the rollback: the swap's new program, by fd.
                        let new = prog_fd
                            .as_fd()
                            .try_clone_to_owned()
                            .map_err(setup_err(cgroup, "cannot dup program fd"))?;
                        let old = sys::prog_fd_by_id(info.prog_id).map_err(|source| LoaderError::Link {
                            hook: hook.link,
                            what: "cannot open the running program",
                            source,
                        })?;
                        sys::link_update(fd.as_fd(), new.as_fd(), old.as_fd()).map_err(|source| {
                            LoaderError::Link {
                                hook: hook.link,
                                what: "cannot swap the program under the pinned link",
                                source,
                            }
                        })?;
                        done.push(Attached::Replaced { hook: hook.link, old_prog_id: info.prog_id });
                        swapped.push((fd, old, new));
                    }
                    None => {
                        let link = create_link(&mut self.ebpf, hook, &cg).map_err(|source| {
                            // Attached by someone else since the check: name it all the same.
                            let refused = matches!(source.raw_os_error(), Some(libc::EPERM | libc::EEXIST));
                            match blocked(cgroup, &[hook]) {
                                Err(e) if refused => e,
                                _ => LoaderError::Link {
                                    hook: hook.link,
                                    what: "cannot attach to the cgroup",
                                    source,
                                },
                            }
                        })?;
                        created.push((hook, link));
                        done.push(Attached::Created { hook: hook.link });
                    }
                }
            }
            for (hook, link) in created.drain(..) {
                let path = pins.link(&hook);
                let link = link.pin(&path).map_err(|e| LoaderError::Setup {
                    path: path.clone(),
                    what: "cannot pin link",
                    source: io::Error::other(e),
                })?;
                pinned.push(link);
            }
            Ok(())
        })();
        if let Err(e) = result {
            for (link, old, new) in swapped.iter().rev() {
                if let Err(err) = sys::link_update(link.as_fd(), old.as_fd(), new.as_fd()) {
                    log::error!("rolling back a program swap failed: {err}");
                }
            }
            // The last reference to a new link goes with its pin and its fd: it detaches.
            for link in pinned {
                if let Err(err) = link.unpin() {
                    log::error!("removing a new link's pin after the failed attach: {err}");
                }
            }
            drop(created);
            return Err(e);
        }
        Ok(done)
    }
}

/// A new link for `hook`'s program on `cgroup`, through aya (`attach`, `take_link`): a
/// bpf_link, so it can be pinned, swapped under and detached. The kernel makes every cgroup
/// bpf_link multi-attach itself, beside other programs, so the mode is aya's default.
fn create_link(ebpf: &mut Ebpf, hook: Hook, cgroup: &File) -> Result<FdLink, io::Error> {
    let mode = CgroupAttachMode::default();
    // aya's cgroup program types share `attach` and `take_link` by name, not by a trait.
    macro_rules! attached {
        ($p:expr) => {{
            let id = $p.attach(cgroup, mode).map_err(io_error)?;
            $p.take_link(id).map_err(io_error)?.try_into()
        }};
    }
    let link: Result<FdLink, LinkError> = match program(ebpf, hook).map_err(io::Error::other)? {
        Program::CgroupSockAddr(p) => attached!(p),
        Program::SockOps(p) => attached!(p),
        Program::CgroupSock(p) => attached!(p),
        other => {
            return Err(io::Error::other(format!(
                "{}: unexpected program type {:?}",
                hook.program,
                other.prog_type()
            )));
        }
    };
    // Only kernels before 5.7 attach without a bpf_link, and kha refuses those at start.
    link.map_err(io::Error::other)
}

/// The system call's own error where there is one (EPERM, EEXIST tell who is in the way).
fn io_error(e: ProgramError) -> io::Error {
    match e {
        ProgramError::SyscallError(SyscallError { io_error, .. }) => io_error,
        e => io::Error::other(e),
    }
}

/// Refuses, with what is in the way, when other programs on `cgroup` or its ancestors keep
/// kha's links for `hooks` off, or would be switched off by them (see `coexist`). A query the
/// kernel refuses is logged and passed: the attach itself then says what is wrong.
fn blocked(cgroup: &Path, hooks: &[Hook]) -> Result<(), LoaderError> {
    match coexist::blockers(cgroup, hooks) {
        Ok(blockers) if blockers.is_empty() => Ok(()),
        Ok(blockers) => {
            Err(LoaderError::Blocked { cgroup: cgroup.to_owned(), root: coexist::root_of(cgroup), blockers })
        }
        Err(e) => {
            log::warn!("cannot list the other programs on {}: {e}", cgroup.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use kha_common::{LAYOUTS, MAP_LAYOUT};

    /// The layout check compares pinned maps with `LAYOUTS`; the object must define the same
    /// maps, or aya would refuse a map the plan called reusable.
    #[test]
    fn the_object_defines_the_maps_layouts_describes() {
        let obj = aya_obj::Object::parse(super::OBJECT).expect("kha's object parses");
        for spec in LAYOUTS {
            let m = obj.maps.get(spec.name).unwrap_or_else(|| panic!("{} not in the object", spec.name));
            assert_eq!(
                (m.map_type(), m.key_size(), m.value_size(), m.max_entries(), m.map_flags()),
                (spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.map_flags),
                "{}",
                spec.name
            );
        }
        // Besides the global data sections (`.rodata`), only the record itself has no layout.
        let named: Vec<_> = obj.maps.keys().filter(|n| !n.starts_with('.')).collect();
        assert!(obj.maps.contains_key(MAP_LAYOUT));
        assert_eq!(named.len(), LAYOUTS.len() + 1, "a map without a layout: {named:?}");
    }
}
