//! Cgroup ids to paths: a cgroup v2 id is the inode number of its directory, so a walk of the
//! cgroup2 mount finds each one (`/sys/fs/cgroup` on real nodes, `/sys/fs/cgroup/unified` on
//! hybrid hosts). Bounded in depth and entries; walked again only when an unknown id appears.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Directories deeper than this are not looked into (kubelet's are 4-5 deep).
const MAX_DEPTH: usize = 16;
/// Directories visited per walk at most.
const MAX_DIRS: usize = 200_000;

pub struct Resolver {
    mount: PathBuf,
    paths: BTreeMap<u64, String>,
    /// Ids the last walk did not find: gone cgroups, which do not make every refresh walk.
    missing: BTreeSet<u64>,
}

impl Resolver {
    pub fn new(mount: PathBuf) -> Self {
        Self { mount, paths: BTreeMap::new(), missing: BTreeSet::new() }
    }

    /// The path of each id (relative to the mount, `/` for the root); `None` for a cgroup that
    /// is gone (its client entry outlives it).
    pub fn resolve(&mut self, ids: impl IntoIterator<Item = u64>) -> BTreeMap<u64, Option<String>> {
        let ids: Vec<u64> = ids.into_iter().collect();
        let new = |id: &u64| !self.paths.contains_key(id) && !self.missing.contains(id);
        if ids.iter().any(new) {
            self.paths = walk(&self.mount);
            self.missing = ids.iter().filter(|id| !self.paths.contains_key(id)).copied().collect();
        }
        ids.into_iter().map(|id| (id, self.paths.get(&id).cloned())).collect()
    }
}

fn walk(mount: &Path) -> BTreeMap<u64, String> {
    let mut found = BTreeMap::new();
    let mut todo = vec![(mount.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = todo.pop() {
        if found.len() >= MAX_DIRS {
            break;
        }
        let Ok(meta) = std::fs::metadata(&dir) else { continue };
        let rel = dir.strip_prefix(mount).map(|p| format!("/{}", p.display())).unwrap_or_default();
        found.insert(meta.ino(), rel);
        if depth >= MAX_DEPTH {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push((e.path(), depth + 1));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_directories_by_inode_and_forgets_removed_ones() {
        let root = std::env::temp_dir().join(format!("kha-cgroups-test-{}", std::process::id()));
        let sub = root.join("a/b");
        std::fs::create_dir_all(&sub).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let (root_ino, sub_ino) = (ino(&root), ino(&sub));
        let mut r = Resolver::new(root.clone());
        let got = r.resolve([root_ino, sub_ino]);
        assert_eq!(got[&root_ino].as_deref(), Some("/"));
        assert_eq!(got[&sub_ino].as_deref(), Some("/a/b"));
        assert_eq!(r.resolve([u64::MAX])[&u64::MAX], None);
        // Known ids and known misses do not walk again; a new id does.
        let other = root.join("c");
        std::fs::create_dir(&other).unwrap();
        std::fs::remove_dir_all(&sub).unwrap();
        assert_eq!(r.resolve([sub_ino, u64::MAX])[&sub_ino].as_deref(), Some("/a/b"));
        assert_eq!(r.resolve([ino(&other)])[&ino(&other)].as_deref(), Some("/c"));
        assert_eq!(r.resolve([sub_ino])[&sub_ino], None, "walked again: the directory is gone");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
