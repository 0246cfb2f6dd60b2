//! Carrying a map's entries from the old set to the new one: a first pass right before the
//! program swap, a second one after it for what the old programs wrote in between.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::{Array, HashMap, MapError, PerCpuArray, PerCpuValues};
use kha_common::{
    Backend, BackendStats, CONN_ESTABLISHED, CONN_SYN_SENT, CONN_UNSENT, Carry, Conn, ConnV1,
    MAP_BACKEND_STATS, MAP_BACKENDS, MAP_CONNS, MAP_STATS,
};

use super::{LoaderError, NOEXIST, info, map_err, open};
use crate::layout::{Action, Wanted};

/// Counter values as last carried over, so a later pass adds only their growth.
#[derive(Debug)]
enum Base {
    Stats(Vec<Vec<u64>>),
    BackendStats(Vec<BackendStats>),
    /// The cookies copied so far, with the state they were copied in.
    Conns(BTreeMap<u64, u32>),
}

/// A map whose entries are being carried from the old set to the new.
#[derive(Debug)]
pub(in crate::loader) struct Carried {
    pub map: &'static str,
    base: Base,
}

/// Entries written, per map.
pub(in crate::loader) type Counts = Vec<(&'static str, usize)>;

/// Copies the entries of every map the plan carries from `old` into `new`; returns what a
/// second pass after the swap needs, and how many entries each map got.
pub(in crate::loader) fn fill(
    old: &Path,
    new: &Path,
    plan: &[(Wanted, Action)],
) -> Result<(Vec<Carried>, Counts), LoaderError> {
    let mut carried = vec![];
    let mut copied = vec![];
    // Seeded maps were copied when the set was staged (`prefill`).
    let kept = |w: &Wanted| w.spec.carry == Carry::Kept;
    for (w, _) in plan.iter().filter(|(w, a)| kept(w) && matches!(a, Action::Migrate { copy: true, .. })) {
        let base = match w.spec.name {
            MAP_CONNS => Base::Conns(BTreeMap::new()),
            MAP_STATS => Base::Stats(vec![]),
            MAP_BACKEND_STATS => Base::BackendStats(vec![]),
            other => {
                return Err(LoaderError::Unsupported(format!(
                    "no way to carry {other}'s entries; the build is broken"
                )));
            }
        };
        let mut c = Carried { map: w.spec.name, base };
        copied.push((c.map, carry(old, new, &mut c, None)?));
        carried.push(c);
    }
    Ok((carried, copied))
}

/// Where the sockets are, for a pass that must tell open sockets from closed ones.
#[derive(Clone, Copy, Debug)]
pub(in crate::loader) struct Served<'a> {
    pub netns: Option<&'a Path>,
    /// Whether the first pass's copies are known, so missed closes can be uncounted (not in
    /// `recover`, which cannot tell a copy the new programs uncounted from a missed one).
    pub mend_counts: bool,
}

/// One pass of carrying `c` from `old` to `new`: connections missing from `new`, counters'
/// growth since the last pass. Returns the entries written. `served`: the pass after the
/// swap, which copies only connections whose socket is still open.
pub(in crate::loader) fn carry(
    old: &Path,
    new: &Path,
    c: &mut Carried,
    served: Option<Served<'_>>,
) -> Result<usize, LoaderError> {
    let (old, new) = (old.join(c.map), new.join(c.map));
    match &mut c.base {
        Base::Conns(copied) => copy_conns(&old, &new, copied, served),
        Base::Stats(base) => add_stats(&old, &new, base),
        Base::BackendStats(base) => add_backend_stats(&old, &new, base),
    }
}

/// Copies the connections missing from `new` (the first pass, before the swap: all of them).
///
/// The pass after the swap mends what the old programs did in between, from the old map as
/// they left it and the sockets sock_diag lists as open:
/// - copied, since closed by the old sock_ops (gone from the old map): deleted from `new`;
/// - copied, moved on by the old sock_ops (SYN sent, established, so counted in `active`):
///   that state is written over the copy, or its close would not be uncounted;
/// - redirected by the old connect hook after the copy, still open: copied (and checked
///   against a second listing, so one that closed meanwhile does not linger);
/// - counted by the old sock_ops, closed after the swap while `new` had no entry or an
///   uncounted one: the new sock_ops did not uncount it, so its backend's `active` is
///   decremented here. That is a read and a write of the counter, so a kernel add to the
///   same backend between the two is lost: a window of two syscalls per backend, against a
///   certain miscount without it.
pub(super) fn copy_conns(
    old_path: &Path,
    new_path: &Path,
    copied: &mut BTreeMap<u64, u32>,
    served: Option<Served<'_>>,
) -> Result<usize, LoaderError> {
    let open_now = |served: Served<'_>| match crate::loader::sockdiag::open_cookies(served.netns) {
        Ok(c) => Some(c),
        Err(e) => {
            log::warn!(
                "cannot list the open sockets ({e}); connections made during the map migration are carried over unchecked"
            );
            None
        }
    };
    let open_before = served.and_then(open_now);
    // Also for an entry the old programs left before its SYN: by now (milliseconds after the
    // swap) its socket either sent the SYN, under the new sock_ops, which found no entry and
    // so did not count it (copied as it is, the close is not uncounted either), or failed and
    // is gone.
    let is_open = |c: &u64| open_before.as_ref().is_none_or(|open| open.contains(c));
    let counted = |state: u32| state != CONN_UNSENT;
    let mut new: HashMap<_, u64, Conn> =
        HashMap::try_from(open(new_path)?).map_err(map_err(new_path, "not a hash"))?;
    let mut written = 0;
    let mut seen = BTreeSet::new();
    let mut inserted = vec![];
    let mut uncount: BTreeMap<u32, u64> = BTreeMap::new();
    let missing = |e: &MapError, errno| matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(errno));
    for entry in old_conns(old_path)? {
        let (cookie, conn) = match entry {
            Ok(e) => e,
            // The entry went between get_next_key and the lookup: its socket closed.
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(old_path, "cannot read")(e)),
        };
        if !seen.insert(cookie) {
            continue;
        }
        let open = is_open(&cookie);
        if let Some(&then) = copied.get(&cookie) {
            let missed_close = counted(conn.established) && !counted(then);
            if !open {
                // Closed after the swap: the new sock_ops deleted our copy, uncounted only
                // if the copy said counted.
                if missed_close {
                    *uncount.entry(conn.backend_id).or_default() += 1;
                }
                continue;
            }
            if progress(conn.established) > progress(then) {
                const EXIST: u64 = 2;
                match new.insert(&cookie, &conn, EXIST) {
                    Ok(()) => written += 1,
                    Err(e) if missing(&e, libc::ENOENT) && missed_close => {
                        *uncount.entry(conn.backend_id).or_default() += 1;
                    }
                    Err(e) if missing(&e, libc::ENOENT) => {}
                    Err(e) => return Err(map_err(new_path, "cannot write")(e)),
                }
            }
            continue;
        }
        if !open {
            if served.is_some_and(|s| s.mend_counts) && counted(conn.established) {
                *uncount.entry(conn.backend_id).or_default() += 1;
            }
            continue;
        }
        match new.insert(&cookie, &conn, NOEXIST) {
            Ok(()) => {
                written += 1;
                copied.insert(cookie, conn.established);
                inserted.push((cookie, conn));
            }
            Err(e) if missing(&e, libc::EEXIST) => {}
            Err(e) => return Err(map_err(new_path, "cannot write")(e)),
        }
    }
    let gone: Vec<u64> = copied.keys().filter(|c| !seen.contains(c)).copied().collect();
    for cookie in gone {
        copied.remove(&cookie);
        match new.remove(&cookie) {
            Ok(()) => written += 1,
            Err(e) if missing(&e, libc::ENOENT) => {}
            Err(e) => return Err(map_err(new_path, "cannot delete")(e)),
        }
    }
    if let Some(open) = open_before.is_some().then(|| served.and_then(open_now)).flatten() {
        for (cookie, conn) in inserted.iter().filter(|(c, _)| !open.contains(c)) {
            // Still in: it closed before it was in, unseen by the new sock_ops.
            match new.remove(cookie) {
                Ok(()) => *uncount.entry(conn.backend_id).or_default() += 1,
                Err(e) if missing(&e, libc::ENOENT) => {}
                Err(e) => return Err(map_err(new_path, "cannot delete")(e)),
            }
        }
    }
    if !uncount.is_empty() {
        let path = new_path.with_file_name(MAP_BACKEND_STATS);
        let mut stats: Array<_, BackendStats> =
            Array::try_from(open(&path)?).map_err(map_err(&path, "not an array"))?;
        for (id, n) in uncount {
            let mut s = stats.get(&id, 0).map_err(map_err(&path, "cannot read"))?;
            s.active = s.active.wrapping_sub(n);
            stats.set(id, &s, 0).map_err(map_err(&path, "cannot write"))?;
            written += 1;
        }
    }
    Ok(written)
}

/// Whether `old_conns` can read the conn map at `path` (this build's layout or version 1).
pub(super) fn conns_readable(path: &Path) -> Result<bool, LoaderError> {
    let i = info(path)?;
    let sizes = [size_of::<Conn>() as u32, size_of::<ConnV1>() as u32];
    Ok(i.key_size() == 8 && sizes.contains(&i.value_size()))
}

/// A conn map's entries as read, each a `(cookie, Conn)` or the error reading it.
type ConnEntries = Vec<Result<(u64, Conn), MapError>>;

/// The entries of a pinned conn map as this build's `Conn`, whatever layout it has (version
/// 1 entries, `ConnV1`, get no client cgroup). A key deleted while we walk restarts the walk
/// at the first key (get_next_key), so a busy map could be walked forever: bounded, and the
/// caller skips keys seen again.
fn old_conns(path: &Path) -> Result<ConnEntries, LoaderError> {
    let i = info(path)?;
    let bound = 2 * i.max_entries() as usize;
    if i.value_size() == size_of::<ConnV1>() as u32 {
        let old: HashMap<_, u64, ConnV1> =
            HashMap::try_from(open(path)?).map_err(map_err(path, "not a hash"))?;
        return Ok(old.iter().take(bound).map(|e| e.map(|(k, c)| (k, Conn::from(c)))).collect());
    }
    let old: HashMap<_, u64, Conn> = HashMap::try_from(open(path)?).map_err(map_err(path, "not a hash"))?;
    Ok(old.iter().take(bound).collect())
}

/// Copies a `Carry::Seeded` map into a staged set, before the agent syncs its desired table
/// into it: written by the agent only, so one copy is all, and it must come first. A sync into
/// an empty backend table would take every backend for a new one and reset its counters in the
/// shared `KHA_BE_STATS` (the open connections' `active` with them), and a copy after the sync
/// would bring back backends the sync removed. Returns the entries copied.
pub(in crate::loader) fn seed(old: &Path, new: &Path, map: &'static str) -> Result<usize, LoaderError> {
    match map {
        MAP_BACKENDS => copy_backends(&old.join(map), &new.join(map)),
        other => {
            Err(LoaderError::Unsupported(format!("no way to seed {other}'s entries; the build is broken")))
        }
    }
}

fn copy_backends(old_path: &Path, new_path: &Path) -> Result<usize, LoaderError> {
    let old: HashMap<_, u32, Backend> =
        HashMap::try_from(open(old_path)?).map_err(map_err(old_path, "not a hash"))?;
    let mut new: HashMap<_, u32, Backend> =
        HashMap::try_from(open(new_path)?).map_err(map_err(new_path, "not a hash"))?;
    let entries: Vec<(u32, Backend)> =
        old.iter().collect::<Result<_, _>>().map_err(map_err(old_path, "cannot read"))?;
    for (id, b) in &entries {
        new.insert(id, b, 0).map_err(map_err(new_path, "cannot write"))?;
    }
    Ok(entries.len())
}

/// How far a connect got, whatever the numbering of `Conn::established`.
fn progress(state: u32) -> u8 {
    match state {
        CONN_UNSENT => 0,
        CONN_SYN_SENT => 1,
        CONN_ESTABLISHED => 2,
        _ => 0,
    }
}

fn add_stats(old_path: &Path, new_path: &Path, base: &mut Vec<Vec<u64>>) -> Result<usize, LoaderError> {
    let old: PerCpuArray<_, u64> =
        PerCpuArray::try_from(open(old_path)?).map_err(map_err(old_path, "not a per-CPU array"))?;
    let mut new: PerCpuArray<_, u64> =
        PerCpuArray::try_from(open(new_path)?).map_err(map_err(new_path, "not a per-CPU array"))?;
    let mut written = 0;
    for i in 0..old.len().min(new.len()) {
        let now: Vec<u64> = old.get(&i, 0).map_err(map_err(old_path, "cannot read"))?.to_vec();
        let then = base.get(i as usize).cloned().unwrap_or_else(|| vec![0; now.len()]);
        if now != then {
            let mut sum: Vec<u64> = new.get(&i, 0).map_err(map_err(new_path, "cannot read"))?.to_vec();
            for (s, (n, t)) in sum.iter_mut().zip(now.iter().zip(&then)) {
                *s = s.wrapping_add(n.wrapping_sub(*t));
            }
            let values = PerCpuValues::try_from(sum)
                .map_err(|e| map_err(new_path, "cannot write")(MapError::IoError(e)))?;
            new.set(i, values, 0).map_err(map_err(new_path, "cannot write"))?;
            written += 1;
        }
        if base.len() <= i as usize {
            base.push(now);
        } else {
            base[i as usize] = now;
        }
    }
    Ok(written)
}

/// Adds the growth of the additive fields; `srtt_us` is taken from the old map while the new
/// one has no measurement yet. The kernel's adds to the new map between our read and write
/// of an entry are lost: one lookup and one update apart, while the copy runs.
fn add_backend_stats(
    old_path: &Path,
    new_path: &Path,
    base: &mut Vec<BackendStats>,
) -> Result<usize, LoaderError> {
    let old: Array<_, BackendStats> =
        Array::try_from(open(old_path)?).map_err(map_err(old_path, "not an array"))?;
    let mut new: Array<_, BackendStats> =
        Array::try_from(open(new_path)?).map_err(map_err(new_path, "not an array"))?;
    let mut written = 0;
    for i in 0..old.len().min(new.len()) {
        let now = old.get(&i, 0).map_err(map_err(old_path, "cannot read"))?;
        let then = base.get(i as usize).copied().unwrap_or_default();
        if now != then {
            let mut n = new.get(&i, 0).map_err(map_err(new_path, "cannot read"))?;
            let d = |a: u64, b: u64| a.wrapping_sub(b);
            n.chosen = n.chosen.wrapping_add(d(now.chosen, then.chosen));
            n.established = n.established.wrapping_add(d(now.established, then.established));
            n.active = n.active.wrapping_add(d(now.active, then.active));
            n.failed = n.failed.wrapping_add(d(now.failed, then.failed));
            n.rto = n.rto.wrapping_add(d(now.rto, then.rto));
            if n.srtt_us == 0 {
                n.srtt_us = now.srtt_us;
            }
            new.set(i, &n, 0).map_err(map_err(new_path, "cannot write"))?;
            written += 1;
        }
        if base.len() <= i as usize {
            base.push(now);
        } else {
            base[i as usize] = now;
        }
    }
    Ok(written)
}
