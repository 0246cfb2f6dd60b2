//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` (docs/testing.md, "Fuzzing") for
//! a bounded time each, with libFuzzer's limits on input size, per-input time, memory and any
//! single allocation, so a panic, a hang or an unbounded allocation fails the run.
//!
//! Corpora: `fuzz/corpus/TARGET` (in the repo, small real examples) is read, never written;
//! what a run finds goes to `target/fuzz/corpus/TARGET` and seeds the next run there. A crash
//! is written to `fuzz/artifacts/TARGET/` (cargo-fuzz's place), and the run fails naming it.

use std::{path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

/// Each target with the longest input it gets: a little over the largest real one, so the
/// fuzzer spends its time on structure rather than on size (the size limits in the code are
/// tested by the unit tests).
pub const TARGETS: [(&str, usize); 5] = [
    ("config", 8 * 1024),
    ("probe_response", 8 * 1024),
    ("kubespray_inventory", 8 * 1024),
    ("kubespray_vars", 4 * 1024),
    ("endpoint_slices", 16 * 1024),
];

/// One input may take this long (a slower one is a hang, or quadratic, and fails the run).
const INPUT_TIMEOUT_SECS: u32 = 10;
/// RSS of the whole fuzzing process, sanitizer included; inputs are a few KiB, so even this
/// is generous.
const RSS_LIMIT_MB: u32 = 2048;
/// Any single allocation over this is a crash: no input of a few KiB needs one.
const MALLOC_LIMIT_MB: u32 = 64;
/// `--quick`: every target, a few seconds each (CI).
const QUICK_SECS: u64 = 10;

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// Seconds per target.
    #[arg(long, default_value_t = 30, conflicts_with = "quick")]
    time: u64,
    /// Every target for 10 s: the bounded smoke run for CI.
    #[arg(long)]
    quick: bool,
    /// Only this target (default: every one): config, probe_response, kubespray_inventory,
    /// kubespray_vars, endpoint_slices.
    target: Option<String>,
}

impl FuzzArgs {
    /// What `cargo xtask test` runs: every target, [`QUICK_SECS`] each.
    pub fn quick() -> FuzzArgs {
        FuzzArgs { time: QUICK_SECS, quick: true, target: None }
    }
}

pub fn fuzz(args: FuzzArgs) -> Result<()> {
    let targets: Vec<(&str, usize)> = match args.target.as_deref() {
        None => TARGETS.to_vec(),
        Some(t) => match TARGETS.iter().find(|(name, _)| *name == t) {
            Some(found) => vec![*found],
            None => bail!("no fuzz target {t}; the targets are {}", TARGETS.map(|(name, _)| name).join(", ")),
        },
    };
    let secs = if args.quick { QUICK_SECS } else { args.time.max(1) };
    let started = Instant::now();
    // kha-user's build script builds the eBPF programs: the build's set-up first.
    setup::setup()?;
    setup::fuzz::ensure()?;
    let names: Vec<&str> = targets.iter().map(|(name, _)| *name).collect();
    build(&names)?;
    eprintln!("fuzz: set-up and build took {} s", started.elapsed().as_secs());
    for (name, max_len) in targets {
        run(name, max_len, secs)?;
    }
    eprintln!("fuzz: done in {} s, no crash", started.elapsed().as_secs());
    Ok(())
}

fn cargo_fuzz() -> Command {
    let mut c = cmd::command("cargo");
    c.arg("fuzz").env("RUSTUP_TOOLCHAIN", setup::fuzz::NIGHTLY);
    c
}

fn build(names: &[&str]) -> Result<()> {
    let first = !cmd::workspace_root().join("fuzz/target").exists();
    if first {
        eprintln!("fuzz: building the targets (the first build takes 5-10 minutes on 2 cores)");
    }
    // One cargo build for all of them (cargo-fuzz builds every target when none is named).
    let mut c = cargo_fuzz();
    c.arg("build");
    if let [one] = names {
        c.arg(one);
    }
    cmd::status(c)
}

fn run(name: &str, max_len: usize, secs: u64) -> Result<()> {
    let root = cmd::workspace_root();
    let found = cmd::target_dir().join("fuzz/corpus").join(name);
    std::fs::create_dir_all(&found).with_context(|| format!("creating {}", found.display()))?;
    let seeds: PathBuf = root.join("fuzz/corpus").join(name);
    eprintln!("fuzz: {name} for {secs} s ...");
    let mut c = cargo_fuzz();
    // The first corpus directory is the one libFuzzer adds to: never the repo's.
    c.args(["run", name])
        .arg(&found)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg(format!("-max_len={max_len}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg("-print_final_stats=1");
    let what = format!("{c:?}");
    let started = Instant::now();
    let out = c.output().with_context(|| format!("cannot start {what}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // The panic message, the sanitizer's verdict and where the input went; not the stacks.
        let frame = |l: &str| {
            let t = l.trim_start();
            t.starts_with('#')
                || t.starts_with("at ")
                || t.split_once(':').is_some_and(|(n, _)| n.parse::<u32>().is_ok())
        };
        let lines: Vec<&str> = log.lines().filter(|l| !frame(l)).collect();
        let input = log
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, f)| f.trim().to_owned()))
            .unwrap_or_else(|| format!("fuzz/artifacts/{name}/"));
        bail!(
            "fuzz target {name} failed after {} s ({}); the input is {input}, replay it with `cargo +{} fuzz run {name} {input}`:\n{}",
            started.elapsed().as_secs(),
            out.status,
            setup::fuzz::NIGHTLY,
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    let stat = |key: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{key}:")))
            .map_or("?".to_owned(), |v| v.trim().to_owned())
    };
    let corpus = std::fs::read_dir(&found).map_or(0, |d| d.count());
    eprintln!(
        "fuzz: {name}: {} execs in {} s ({}/s), peak RSS {} MB, {corpus} inputs in {}",
        stat("number_of_executed_units"),
        started.elapsed().as_secs(),
        stat("average_exec_per_sec"),
        stat("peak_rss_mb"),
        found.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every target in fuzz/Cargo.toml is run here, and has a seed corpus of a few KiB.
    #[test]
    fn every_target_is_listed_and_seeded() {
        let root = cmd::workspace_root();
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        let bins: Vec<&str> = manifest
            .lines()
            .filter_map(|l| l.strip_prefix("name = \""))
            .filter_map(|l| l.strip_suffix('"'))
            .filter(|n| *n != "kha-fuzz")
            .collect();
        let listed: Vec<&str> = TARGETS.map(|(name, _)| name).to_vec();
        assert_eq!(bins, listed, "fuzz/Cargo.toml [[bin]] names and fuzz::TARGETS");
        for (name, max_len) in TARGETS {
            let dir = root.join("fuzz/corpus").join(name);
            let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
            assert!(!files.is_empty(), "{} is empty", dir.display());
            let sizes: Vec<u64> = files.iter().map(|f| f.metadata().unwrap().len()).collect();
            assert!(sizes.iter().all(|s| *s <= max_len as u64), "{}: a seed over -max_len", dir.display());
            let size: u64 = sizes.iter().sum();
            assert!(size <= 8 * 1024, "{}: {size} bytes; keep seeds small", dir.display());
        }
    }
}
