//! Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on unified hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones. The agent attaches there by default; the lab makes
//! its child cgroups there.

use std::path::PathBuf;

/// The first cgroup2 mount in `/proc/mounts`; `Ok(None)` when none is mounted.
pub fn cgroup2_mount() -> std::io::Result<Option<PathBuf>> {
    Ok(parse_cgroup2_mount(&std::fs::read_to_string("/proc/mounts")?))
}

/// The first cgroup2 mount point in the text of `/proc/mounts`.
pub fn parse_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(parse_cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_mount("tmpfs /tmp tmpfs rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_spaces() {
        assert_eq!(parse_cgroup2_mount("none /a\\040b cgroup2 rw 0 0\n"), Some(PathBuf::from("/a b")));
    }
}
