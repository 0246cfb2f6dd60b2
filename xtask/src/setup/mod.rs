//! `cargo xtask setup`: installs what is missing, quickly when nothing is. Every other
//! command runs it first, so a fresh machine needs nothing by hand. The pinned Rust toolchain
//! is the one thing it cannot install (cargo needs it to build this very program): `./x`
//! installs that first.
//!
//! A first run takes minutes, so every step says what it does and about how long it takes;
//! a later run says nothing unless something was missing.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

pub mod controlplane;
pub mod fuzz;

/// Debian packages: LLVM 22 for bpf-linker (rustc 1.98 emits LLVM 22 bitcode), bpftool to
/// inspect maps and programs, iproute2 for the lab's namespaces, musl-tools for the C parts of
/// the agent's static build (ring's, compiled with `musl-gcc`; see `cmd::build_dist`).
const PACKAGES: [&str; 4] = ["llvm-22-dev", "bpftool", "iproute2", "musl-tools"];
const BPF_LINKER: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// As in rust-toolchain.toml.
const TOOLCHAIN: &str = "1.98";
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

pub fn setup() -> Result<()> {
    debian_packages("the build", &PACKAGES, "about a minute")?;
    bpf_linker()?;
    musl_target()
}

/// The Rust standard library for the agent's static build, for this machine's architecture
/// (rust-toolchain.toml cannot say "the host's").
fn musl_target() -> Result<()> {
    let target = cmd::dist_target();
    let mut list = cmd::command("rustup");
    list.args(["target", "list", "--installed", "--toolchain", TOOLCHAIN]);
    let installed = list.output().with_context(|| "running rustup target list")?;
    if String::from_utf8_lossy(&installed.stdout).lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    step(&format!("adding the Rust target {target} (the agent's static build)"), "10-30 seconds", || {
        let mut add = cmd::command("rustup");
        add.args(["target", "add", "--toolchain", TOOLCHAIN, &target]);
        cmd::status_quiet(add)
    })
}

/// One step of the set-up: says what it does and its usual duration, runs, says how long it
/// took.
pub fn step<T>(what: &str, usual: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("setup: {what} (usually {usual}) ...");
    let started = Instant::now();
    let out = f().with_context(|| format!("setup: {what}"))?;
    eprintln!("setup: {what}: done in {}", secs(started.elapsed()));
    Ok(out)
}

fn secs(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the Debian packages of `packages` that are missing, for `purpose`. Their system
/// services must not start (the bench's nginx and haproxy would take ports): where no
/// `policy-rc.d` forbids it already, one is in place for the install and removed after.
pub fn debian_packages(purpose: &str, packages: &[&str], usual: &str) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if Command::new("dpkg-query").arg("--version").output().is_err() {
        bail!(
            "{purpose} needs the Debian packages {} and this is not a Debian-based system (no dpkg-query): install their equivalents by hand",
            missing.join(" ")
        );
    }
    if !cmd::is_root() {
        bail!(
            "{purpose} needs the Debian packages {}: run this as root, or install them first (apt-get install {})",
            missing.join(" "),
            missing.join(" ")
        );
    }
    step(&format!("installing Debian packages {} for {purpose}", missing.join(" ")), usual, || {
        let ours = !Path::new(POLICY_RC_D).exists();
        if ours {
            use std::os::unix::fs::PermissionsExt as _;
            fs::write(
                POLICY_RC_D,
                "#!/bin/sh\n# kha's set-up: no service starts while installing\nexit 101\n",
            )
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
            fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))?;
        }
        let result = (|| {
            let mut update = Command::new("apt-get");
            update.args(["update", "-qq"]);
            cmd::status_quiet(update)?;
            let mut install = Command::new("apt-get");
            install
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive");
            cmd::status_quiet(install)
        })();
        if ours {
            let _ = fs::remove_file(POLICY_RC_D);
        }
        result
    })
}

fn bpf_linker() -> Result<()> {
    let version = cmd::command("bpf-linker").arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER)) {
        return Ok(());
    }
    step(&format!("building bpf-linker {BPF_LINKER} against LLVM 22 (cargo install)"), "1-2 minutes", || {
        let mut c = cmd::command("cargo");
        c.args([
            "install",
            "--quiet",
            &format!("bpf-linker@{BPF_LINKER}"),
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        // /usr/bin/llvm-config may be another LLVM; point the build at 22.
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("RUSTUP_TOOLCHAIN", TOOLCHAIN)
        .current_dir(std::env::temp_dir());
        cmd::status(c)
    })
}
