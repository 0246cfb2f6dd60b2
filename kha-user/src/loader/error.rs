//! What loading, attaching and detaching can fail with, each naming its cause and the fix.

use std::{
    io,
    path::{Path, PathBuf},
};

use super::Blocker;
use crate::layout::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{path}: {what}")]
    Setup {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Layout(#[from] Refusal),
    #[error("{path}: cannot read the pinned map's kernel info")]
    MapInfo {
        path: PathBuf,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("{path}: {what} (while migrating the pinned maps)")]
    Migrate {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error(
        "cannot load kha's eBPF object (maps under {maps}): {source}. If a pinned map has another layout than its record in KHA_LAYOUT says, a foreign build made it: run `kha detach` first"
    )]
    Object {
        maps: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "the kernel refused program {program}: {source}. kha needs Linux >= 5.18 with CONFIG_CGROUP_BPF=y and BTF; the verifier log is in the error above"
    )]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "{path} is a kha link, but attached to cgroup id {found}, not {wanted} ({cgroup}). Run `kha detach --pin-dir {pin_dir}` first, or use another --pin-dir"
    )]
    ForeignLink { path: PathBuf, found: u64, wanted: u64, cgroup: PathBuf, pin_dir: PathBuf },
    #[error("{path} is not a cgroup link for {hook}; remove it or use another --pin-dir")]
    NotOurLink { path: PathBuf, hook: &'static str },
    #[error(
        "cannot attach to {cgroup}: other programs on its hooks are in the way: {}. See them with `bpftool cgroup tree {root}`. Re-attach each with BPF_F_ALLOW_MULTI (as a bpf_link, or `bpftool cgroup attach CGROUP HOOK id ID multi`) or detach it (`bpftool cgroup detach CGROUP HOOK id ID`), then start kha again. Nothing of kha was attached",
        blocker_list(.blockers)
    )]
    Blocked { cgroup: PathBuf, root: PathBuf, blockers: Vec<Blocker> },
    #[error("{hook}: {what}")]
    Link {
        hook: &'static str,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn blocker_list(blockers: &[Blocker]) -> String {
    blockers.iter().map(Blocker::to_string).collect::<Vec<_>>().join("; ")
}

pub(crate) fn setup_err<'a>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(io::Error) -> LoaderError + 'a {
    move |source| LoaderError::Setup { path: path.to_owned(), what, source }
}
