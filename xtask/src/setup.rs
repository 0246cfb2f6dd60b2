//! `cargo xtask setup`: installs what is missing, quickly when nothing is. Every other
//! command runs it first, so a fresh machine needs nothing by hand.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Debian packages: LLVM 22 for bpf-linker (rustc 1.98 emits LLVM 22 bitcode), bpftool to
/// inspect maps and programs, iproute2 for the lab's namespaces.
const PACKAGES: [&str; 3] = ["llvm-22-dev", "bpftool", "iproute2"];
const BPF_LINKER: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// As in rust-toolchain.toml.
const TOOLCHAIN: &str = "1.98";

pub fn setup() -> Result<()> {
    packages()?;
    toolchain()?;
    bpf_linker()
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.into_iter().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cmd::is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them as root: apt-get install {}",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let mut update = Command::new("apt-get");
    update.args(["update", "-qq"]);
    cmd::status(update)?;
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd::status(install)
}

/// The toolchain named in rust-toolchain.toml, with rust-src for build-std. A no-op when
/// present; needed where rustup does not install toolchains on first use (RUSTUP_AUTO_INSTALL=0).
fn toolchain() -> Result<()> {
    let mut c = cmd::command("rustup");
    c.args(["toolchain", "install"]).stdout(std::process::Stdio::null());
    cmd::status(c).context("installing the pinned Rust toolchain")
}

fn bpf_linker() -> Result<()> {
    let version = cmd::command("bpf-linker").arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER)) {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER} against LLVM 22 (about a minute)");
    let mut c = cmd::command("cargo");
    c.args([
        "install",
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
}
