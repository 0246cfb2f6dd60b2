//! What a load balancer costs, read from the kernel: CPU time and resident memory of
//! processes (`/proc`), and for kha the kernel's own count of time spent in its programs
//! and the memory its maps and programs pin (`bpftool`).

use std::{collections::BTreeMap, fs, process::Command};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// Fields of `/proc/<pid>/stat` after the `(comm)`, counted from 0 (field 3 of proc(5) is 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

pub fn parent(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// Start time in clock ticks after boot: with the pid, it names one process for good.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// CPU time a process has used, all threads, in nanoseconds: the scheduler's per-thread
/// count (`schedstat`, exact) where the kernel has it, else utime + stime from `stat`
/// (clock ticks, 10 ms).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sum = 0u64;
    let mut all = true;
    for t in tasks.flatten() {
        match fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            Some(ns) => sum += ns,
            None => all = false,
        }
    }
    if all && sum > 0 {
        return Some(sum);
    }
    let f = stat_fields(pid)?;
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000_000 / hz)
}

/// VmRSS in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS")
}

/// A `/proc/<pid>/status` size field (`VmRSS`, `RssAnon`, `RssFile`) in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Direct children of `pid` (nginx's workers), found by scanning `/proc`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent(p) == Some(pid))
        .collect()
}

fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool").arg("-j").args(args).output().context("running bpftool")?;
    if !out.status.success() {
        bail!("bpftool {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing bpftool {} output", args.join(" ")))
}

/// Per-program figures from `bpftool prog show id N`.
#[derive(Debug, Clone, Default)]
pub struct ProgInfo {
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub memlock: u64,
    pub map_ids: Vec<u64>,
}

pub fn prog_info(id: u64) -> Result<ProgInfo> {
    let v = bpftool_json(&["prog", "show", "id", &id.to_string()])?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(ProgInfo {
        name: v["name"].as_str().unwrap_or("?").to_owned(),
        run_time_ns: n("run_time_ns"),
        run_cnt: n("run_cnt"),
        memlock: n("bytes_memlock"),
        map_ids: v["map_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default(),
    })
}

/// The id of the map pinned at `path`.
fn pinned_map_id(path: &std::path::Path) -> Result<u64> {
    let info = bpftool_json(&["map", "show", "pinned", &path.display().to_string()])?;
    info["id"].as_u64().with_context(|| format!("bpftool shows no id for {}", path.display()))
}

/// What kha pins in the kernel: its programs' memlock, and each map's by name.
#[derive(Debug, Clone, Default)]
pub struct KhaPinned {
    pub programs: u64,
    pub maps: BTreeMap<String, u64>,
}

impl KhaPinned {
    pub fn total(&self) -> u64 {
        self.programs + self.maps.values().sum::<u64>()
    }
}

/// The programs of the bed's pinned links, the maps they use and those only the agent uses
/// (`KHA_PROBES`, `KHA_LAYOUT`: pinned under the bed's pin dir), each once.
pub fn kha_pinned(bed: &kha_lab::bed::Bed) -> Result<KhaPinned> {
    let mut out = KhaPinned::default();
    let mut ids = std::collections::BTreeSet::new();
    for id in bed.prog_ids() {
        let p = prog_info(id)?;
        out.programs += p.memlock;
        ids.extend(p.map_ids);
    }
    let dir = bed.pin_dir.join("maps");
    for pin in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        ids.insert(pinned_map_id(&pin?.path())?);
    }
    for id in ids {
        let m = bpftool_json(&["map", "show", "id", &id.to_string()])?;
        let name = m["name"].as_str().unwrap_or("?").to_owned();
        out.maps.insert(name, m["bytes_memlock"].as_u64().unwrap_or(0));
    }
    Ok(out)
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled`: switched on only while kha's CPU is measured (the counters
/// cost two clock reads per program run), and put back as it was when dropped, also on
/// failure and Ctrl-C.
pub struct BpfStats {
    old: String,
}

impl BpfStats {
    pub fn new() -> Result<Self> {
        let old =
            fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?.trim().to_owned();
        Ok(BpfStats { old })
    }

    pub fn set(&self, on: bool) -> Result<()> {
        let v = if on { "1" } else { self.old.as_str() };
        fs::write(BPF_STATS, v).with_context(|| format!("writing {v} to {BPF_STATS}"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS, &self.old) {
            eprintln!("xtask: bench: cannot restore {BPF_STATS} to {}: {e}", self.old);
        }
    }
}

/// CPU time of every user-space process outside the bench, so that a run disturbed by other
/// work on the machine (a build, a test run) can be told apart and repeated. Per process
/// (pid and start time): utime + stime + cutime + cstime in clock ticks; the children's
/// fields catch short-lived processes (compilers, linkers) once their parent reaps them.
#[derive(Debug, Clone, Default)]
pub struct Foreign(std::collections::BTreeMap<(u32, u64), u64>);

const PF_KTHREAD: u64 = 0x0020_0000;

impl Foreign {
    /// Everything but `ours` and its descendants, and kernel threads.
    pub fn snapshot(ours: u32) -> Foreign {
        let Ok(dir) = fs::read_dir("/proc") else { return Foreign::default() };
        let mut procs = Vec::new();
        let mut parent_of = std::collections::BTreeMap::new();
        for pid in dir.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
            let Some(f) = stat_fields(pid) else { continue };
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            parent_of.insert(pid, num(1) as u32);
            if num(6) & PF_KTHREAD != 0 || pid == ours {
                continue;
            }
            procs.push((pid, num(19), num(11) + num(12) + num(13) + num(14)));
        }
        let descends = |mut p: u32| {
            for _ in 0..64 {
                match parent_of.get(&p) {
                    Some(&pp) if pp == ours => return true,
                    Some(&pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        };
        Foreign(procs.into_iter().filter(|(p, ..)| !descends(*p)).map(|(p, st, t)| ((p, st), t)).collect())
    }

    /// CPU nanoseconds used outside the bench between `self` (earlier) and `later`.
    pub fn ns_until(&self, later: &Foreign) -> u64 {
        let ticks: u64 =
            later.0.iter().map(|(k, &t)| t.saturating_sub(self.0.get(k).copied().unwrap_or(0))).sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        ticks * 1_000_000_000 / hz
    }
}
