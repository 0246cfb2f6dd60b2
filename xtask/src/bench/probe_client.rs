//! `cargo xtask bench probe-client`: the probe's hand-written HTTP/1.1 client against hyper's
//! (issue 11). The measurement is kha-user's example `probe_client_cost` (xtask must not
//! depend on kha-user, whose build needs the eBPF toolchain), built as operators run the agent
//! (`dist` profile, static musl). Its table gives the client thread's CPU time and heap; then
//! each client and request runs alone under callgrind at two lengths, and the difference
//! over the extra exchanges is the client's instructions per exchange, which other load on
//! the machine does not change. Writes `probe-client.md`. No root needed.

use std::{fmt::Write as _, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use super::BenchArgs;
use crate::cmd;

const EXAMPLE: &str = "probe_client_cost";
const CLIENTS: [&str; 2] = ["hand", "hyper"];
const KINDS: [(&str, &str); 3] = [
    ("options", "`OPTIONS *` → 200"),
    ("ready", "`GET /readyz` → 200"),
    ("failing", "`GET /readyz` → 500, 2 KiB"),
];
/// Bound on each child process (coreutils `timeout`).
const CHILD_TIMEOUT: &str = "600";

pub fn run(args: &BenchArgs) -> Result<PathBuf> {
    let out = args.out.clone().unwrap_or_else(|| {
        let d = cmd::target_dir().join("bench");
        if args.quick { d.join("quick") } else { d }
    });
    fs::create_dir_all(&out)?;
    let target = cmd::dist_target();
    eprintln!("xtask: bench probe-client: building the example {EXAMPLE} (dist profile, {target})");
    let cc = format!("CC_{}", target.replace('-', "_"));
    cmd::cargo_env(
        &[
            "build",
            "--quiet",
            "--profile",
            "dist",
            "--target",
            &target,
            "-p",
            "kha-user",
            "--example",
            EXAMPLE,
        ],
        &[(&cc, "musl-gcc")],
    )?;
    let bin = cmd::target_dir().join(&target).join("dist/examples").join(EXAMPLE);

    let (exchanges, rounds) = if args.quick { (2000, 1) } else { (20_000, args.rounds.unwrap_or(5)) };
    eprintln!("xtask: bench probe-client: {exchanges} exchanges per run, {rounds} rounds");
    let mut md = output(
        Command::new("timeout")
            .arg(CHILD_TIMEOUT)
            .arg(&bin)
            .args([exchanges.to_string(), rounds.to_string()]),
    )?;

    let (short, long, repeats) = if args.quick { (200u64, 600u64, 1) } else { (1000, 3000, 3) };
    if Command::new("valgrind").arg("--version").output().is_err() {
        md.push_str("\n(valgrind not found: no instruction counts)\n");
    } else {
        writeln!(
            md,
            "\n### Instructions per exchange (callgrind, client process only)\n\n\
             Mean (min–max) of {} runs of ({long} − {short} exchanges) each, the server in a child process callgrind does not follow.\n\n\
             | request | hand-written | hyper 1.x http1 | hyper ÷ hand-written |\n|---|---|---|---|",
            repeats
        )?;
        for (kind, label) in KINDS {
            let mut per = [Vec::new(), Vec::new()];
            for (i, client) in CLIENTS.into_iter().enumerate() {
                for _ in 0..repeats {
                    let a = instructions(&bin, &out, client, kind, short)?;
                    let b = instructions(&bin, &out, client, kind, long)?;
                    per[i].push(b.saturating_sub(a) as f64 / (long - short) as f64);
                }
                eprintln!("xtask: bench probe-client: callgrind {client} {kind}: {:?}", per[i]);
            }
            let spread = |v: &[f64]| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(0.0, f64::max);
                format!("{:.0} ({lo:.0}–{hi:.0})", v.iter().sum::<f64>() / v.len() as f64)
            };
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            writeln!(
                md,
                "| {label} | {} | {} | ×{:.2} |",
                spread(&per[0]),
                spread(&per[1]),
                mean(&per[1]) / mean(&per[0])
            )?;
        }
    }
    fs::write(out.join("probe-client.md"), &md)?;
    Ok(out)
}

/// Instructions of the client process for one run of `n` exchanges.
fn instructions(
    bin: &std::path::Path,
    out: &std::path::Path,
    client: &str,
    kind: &str,
    n: u64,
) -> Result<u64> {
    let file = out.join(format!("callgrind.probe-client.{client}.{kind}.{n}"));
    output(Command::new("timeout").arg(CHILD_TIMEOUT).args([
        "valgrind".into(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}", file.display()),
        bin.display().to_string(),
        "one".into(),
        client.into(),
        kind.into(),
        n.to_string(),
    ]))?;
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let _ = fs::remove_file(&file);
    text.lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|t| t.trim().parse().ok())
        .with_context(|| format!("no totals in {}", file.display()))
}

fn output(c: &mut Command) -> Result<String> {
    let what = format!("{c:?}");
    let out = c.output().with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
