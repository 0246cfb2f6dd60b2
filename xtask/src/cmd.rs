//! Running child processes with the environment the build needs.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// PATH with cargo's bin directory first: bpf-linker lives there and rustc must find it.
pub fn path_with_cargo_bin() -> String {
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_else(|_| "/root".into())));
    format!("{home}/bin:{}", std::env::var("PATH").unwrap_or_default())
}

pub fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    c.current_dir(workspace_root()).env("PATH", path_with_cargo_bin());
    c
}

pub fn status(mut c: Command) -> Result<()> {
    let what = format!("{c:?}");
    let st = c.status().with_context(|| format!("cannot start {what}"))?;
    if !st.success() {
        bail!("{what} failed: {st}");
    }
    Ok(())
}

/// As [`status`], but the output is shown only when the command fails (apt's hundreds of
/// lines say nothing a user needs when all goes well).
pub fn status_quiet(mut c: Command) -> Result<()> {
    let what = format!("{c:?}");
    let out = c.output().with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn cargo(args: &[&str]) -> Result<()> {
    cargo_env(args, &[])
}

pub fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let mut c = command(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    status(c)
}

/// The debug build the demo and the tests use. The first one compiles a few hundred crates
/// and the eBPF programs: say so, and let cargo show its progress.
pub fn build_debug() -> Result<()> {
    let first = !target_dir().join("debug/kha").exists();
    if first {
        eprintln!(
            "build: the agent, its eBPF programs and the lab (debug; the first build takes 2-4 minutes on 2 cores)"
        );
    }
    let quiet: &[&str] = if first { &[] } else { &["--quiet"] };
    cargo(&[&["build", "-p", "kha-user", "-p", "kha-lab"], quiet].concat())
}

/// The target of the agent's static build on this machine.
pub fn dist_target() -> String {
    format!("{}-unknown-linux-musl", std::env::consts::ARCH)
}

/// The agent as operators run it: the `dist` profile (LTO, one codegen unit, no symbols,
/// abort on panic), linked statically against musl, which leaves no shared C library mapped
/// (2 MB of the dynamic build's 7 MB resident). About 4 minutes on 2 cores from scratch;
/// returns its path.
pub fn build_dist() -> Result<PathBuf> {
    let target = dist_target();
    let bin = target_dir().join(&target).join("dist/kha");
    if !bin.exists() {
        eprintln!(
            "build: the agent as operators run it (dist profile, static; the first build takes about 4 minutes on 2 cores)"
        );
    }
    // cc-rs looks for `<arch>-linux-musl-gcc`; Debian's musl-tools calls it `musl-gcc`.
    let cc = format!("CC_{}", target.replace('-', "_"));
    cargo_env(
        &["build", "--quiet", "--profile", "dist", "--target", &target, "-p", "kha-user"],
        &[(&cc, "musl-gcc")],
    )?;
    Ok(bin)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("{why} and needs root: run it as root (sudo -E cargo xtask ...)");
    }
    Ok(())
}

/// Runs `program args` in the foreground and returns its failure as an error.
pub fn exec(program: &Path, args: &[String]) -> Result<()> {
    let mut c = command(program);
    c.args(args);
    status(c)
}
