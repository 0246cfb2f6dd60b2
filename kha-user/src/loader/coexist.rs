//! Other programs on kha's hooks (Cilium's socket LB, Calico's connect-time LB, ...). kha's
//! links are always BPF_F_ALLOW_MULTI, which the kernel lets attach beside multi programs
//! anywhere in the hierarchy. It refuses them (EPERM) under a program attached without multi to
//! the same cgroup, or with flags 0 to an ancestor; and under an ancestor's program attached
//! with BPF_F_ALLOW_OVERRIDE it accepts them, but that program then stops running for every
//! socket in kha's cgroup (`compute_effective_progs` skips a non-multi ancestor once a
//! descendant has programs). Both are found here before anything is attached, so the agent
//! can name the program, where it sits and the fix, rather than report a bare EPERM or
//! silently switch another vendor's program off.

use std::{
    fmt,
    fs::File,
    io,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use super::{Hook, sys};

const ALLOW_OVERRIDE: u32 = 1;
const ALLOW_MULTI: u32 = 2;

/// A program attached so that kha's link for `hook` cannot (or must not) go beside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocker {
    /// bpftool's name of the hook (`connect4`, `sock_ops`, ...).
    pub hook: &'static str,
    /// Where the program is attached.
    pub at: PathBuf,
    /// `at` is an ancestor of kha's cgroup, not the cgroup itself.
    pub ancestor: bool,
    pub flags: u32,
    pub prog_ids: Vec<u32>,
}

impl Blocker {
    /// The kernel would accept kha's link, and the program would stop running below it.
    pub fn overridden(&self) -> bool {
        self.ancestor && self.flags & ALLOW_OVERRIDE != 0
    }
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<String> = self.prog_ids.iter().map(u32::to_string).collect();
        let mode = if self.flags & ALLOW_OVERRIDE != 0 { "BPF_F_ALLOW_OVERRIDE" } else { "flags 0" };
        let place = if self.ancestor { "an ancestor of kha's cgroup" } else { "kha's cgroup itself" };
        write!(
            f,
            "{hook} of {at} ({place}) runs program id {ids} attached without BPF_F_ALLOW_MULTI ({mode}), so ",
            hook = self.hook,
            at = self.at.display(),
            ids = ids.join(", "),
        )?;
        if self.overridden() {
            write!(f, "kha's program would replace it for every socket in kha's cgroup")
        } else {
            write!(f, "the kernel lets no other program attach there or below (EPERM)")
        }
    }
}

/// bpftool's name for the hook, for the command the error suggests.
fn bpftool_name(hook: &Hook) -> &'static str {
    match hook.attach_type {
        3 => "sock_ops",
        _ => hook.link,
    }
}

/// One level of the hierarchy: a cgroup, its attach flags for the hook, its programs' ids.
pub(crate) type Level = (PathBuf, u32, Vec<u32>);

/// What the kernel's `hierarchy_allows_attach` and the same-cgroup flag check make of a multi
/// link at `levels[0]`, its ancestors following nearest first.
pub(crate) fn classify(hook: &'static str, levels: &[Level]) -> Option<Blocker> {
    let blocker = |(at, flags, ids): &Level, ancestor| Blocker {
        hook,
        at: at.clone(),
        ancestor,
        flags: *flags,
        prog_ids: ids.clone(),
    };
    let (own, ancestors) = levels.split_first()?;
    if !own.2.is_empty() && own.1 & ALLOW_MULTI == 0 {
        return Some(blocker(own, false));
    }
    for level in ancestors {
        if level.1 & ALLOW_MULTI != 0 {
            // The kernel stops here: what is above is already overridden by this level.
            return None;
        }
        if !level.2.is_empty() {
            return Some(blocker(level, true));
        }
    }
    None
}

/// `cgroup` and its ancestors up to the root of its cgroup v2 mount, nearest first.
fn hierarchy(cgroup: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = vec![cgroup.canonicalize()?];
    // Bounded by the path's depth; the root is where the parent is on another file system.
    while let Some(parent) = out.last().and_then(|p| p.parent()).map(Path::to_path_buf) {
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
        if dev(&parent)? != dev(out.last().expect("one"))? {
            break;
        }
        out.push(parent);
    }
    Ok(out)
}

/// The programs that keep kha's links for `hooks` off `cgroup`, or would be switched off by
/// them, one per hook at most.
pub fn blockers(cgroup: &Path, hooks: &[Hook]) -> io::Result<Vec<Blocker>> {
    if hooks.is_empty() {
        return Ok(vec![]);
    }
    let dirs = hierarchy(cgroup)?;
    let files = dirs.iter().map(File::open).collect::<io::Result<Vec<_>>>()?;
    let mut found = Vec::new();
    for hook in hooks {
        let levels = dirs
            .iter()
            .zip(&files)
            .map(|(dir, f)| {
                sys::prog_query(f.as_fd(), hook.attach_type).map(|(fl, ids)| (dir.clone(), fl, ids))
            })
            .collect::<io::Result<Vec<Level>>>()?;
        found.extend(classify(bpftool_name(hook), &levels));
    }
    Ok(found)
}

/// The root of the hierarchy `cgroup` is in, for `bpftool cgroup tree ROOT`.
pub fn root_of(cgroup: &Path) -> PathBuf {
    hierarchy(cgroup).ok().and_then(|h| h.last().cloned()).unwrap_or_else(|| cgroup.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(at: &str, flags: u32, ids: &[u32]) -> Level {
        (PathBuf::from(at), flags, ids.to_vec())
    }

    #[test]
    fn multi_programs_anywhere_leave_room() {
        let levels = [level("/cg/kha", ALLOW_MULTI, &[7]), level("/cg", ALLOW_MULTI, &[8])];
        assert_eq!(classify("connect4", &levels), None);
        assert_eq!(classify("connect4", &[level("/cg", 0, &[])]), None);
    }

    #[test]
    fn a_non_multi_program_on_the_same_cgroup_refuses() {
        for flags in [0, ALLOW_OVERRIDE] {
            let b = classify("connect4", &[level("/cg", flags, &[7])]).expect("a blocker");
            assert!(!b.ancestor && !b.overridden());
            assert_eq!((b.at.as_path(), b.prog_ids.as_slice()), (Path::new("/cg"), &[7][..]));
            assert!(b.to_string().contains("kha's cgroup itself"), "{b}");
            assert!(b.to_string().contains("EPERM"), "{b}");
        }
    }

    #[test]
    fn ancestors_refuse_with_flags_0_and_are_overridden_with_allow_override() {
        let exclusive = [level("/cg/kha", 0, &[]), level("/cg", 0, &[]), level("/", 0, &[9])];
        let b = classify("connect4", &exclusive).expect("a blocker");
        assert!(b.ancestor && !b.overridden() && b.at == Path::new("/"));
        let overridable = [level("/cg/kha", 0, &[]), level("/cg", ALLOW_OVERRIDE, &[9])];
        let b = classify("connect4", &overridable).expect("a blocker");
        assert!(b.overridden(), "{b}");
        assert!(b.to_string().contains("would replace it"), "{b}");
    }

    #[test]
    fn the_nearest_multi_ancestor_ends_the_walk() {
        // Above a multi level, a non-multi program is already overridden by that level.
        let levels = [level("/cg/kha", 0, &[]), level("/cg", ALLOW_MULTI, &[8]), level("/", 0, &[9])];
        assert_eq!(classify("connect4", &levels), None);
    }
}
