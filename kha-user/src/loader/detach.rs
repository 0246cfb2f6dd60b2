//! The pinned links as `kha status` shows them, and `kha detach`: everything kha pinned removed.

use std::{io, os::fd::AsFd, path::PathBuf};

use super::{HOOKS, LoaderError, PinDir, checks, migrate, setup_err, sys};

/// A pinned link as `kha status` reports it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinkStatus {
    pub hook: &'static str,
    pub link_id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
}

pub fn link_status(pins: &PinDir) -> Vec<LinkStatus> {
    HOOKS
        .iter()
        .filter_map(|hook| {
            let fd = sys::obj_get(&pins.link(hook)).ok()?;
            let info = sys::link_info(fd.as_fd()).ok()?;
            Some(LinkStatus {
                hook: hook.link,
                link_id: info.id,
                prog_id: info.prog_id,
                cgroup_id: info.cgroup_id,
            })
        })
        .collect()
}

/// What `detach` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detached {
    pub links: usize,
    pub maps: usize,
    /// The pin dir, left in place because it is a mount point (a bpffs mounted there, or
    /// `/sys/fs/bpf` itself): the mount may be the host's or hold other programs' pins.
    pub kept_mount: Option<PathBuf>,
}

/// Detaches every kha link and removes every pin under `pins`, then the directories, except a
/// pin dir that is a mount point. Programs and maps are freed by the kernel once nothing
/// refers to them.
pub fn detach(pins: &PinDir) -> Result<Detached, LoaderError> {
    let mut report = Detached::default();
    for hook in HOOKS.iter().rev() {
        let path = pins.link(hook);
        if !path.exists() {
            continue;
        }
        if let Ok(fd) = sys::obj_get(&path) {
            sys::link_detach(fd.as_fd()).map_err(|source| LoaderError::Link {
                hook: hook.link,
                what: "cannot detach",
                source,
            })?;
        }
        std::fs::remove_file(&path).map_err(setup_err(&path, "cannot remove pin"))?;
        report.links += 1;
    }
    // Pins an older kha left in a layout this one no longer uses go too.
    for name in kha_common::ALL_MAPS.iter().chain(&kha_common::RETIRED_MAPS) {
        let path = pins.maps().join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(setup_err(&path, "cannot remove pin"))?;
            report.maps += 1;
        }
    }
    // A migration an agent did not finish leaves its staging set.
    report.maps += migrate::remove_set(&pins.staging())?;
    for dir in [pins.links(), pins.maps(), pins.root.clone()] {
        if dir == pins.root && checks::is_mount_point(&dir) {
            report.kept_mount = Some(dir);
            continue;
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LoaderError::Setup {
                    path: dir,
                    what: "cannot remove directory (something else is pinned in it?)",
                    source,
                });
            }
        }
    }
    Ok(report)
}
