//! What `cargo xtask fuzz` needs beyond the build's set-up: a pinned nightly toolchain
//! (libFuzzer's coverage instrumentation and the address sanitizer are `-Z` flags) and
//! cargo-fuzz. Installed only when fuzzing is asked for, never by `cargo xtask setup`.

use anyhow::Result;

use crate::cmd;

/// The nightly of the 1.98 cycle (LLVM 22, as the pinned 1.98 and bpf-linker): the fuzz targets
/// build the same code with the same LLVM as the agent. Move it with rust-toolchain.toml.
pub const NIGHTLY: &str = "nightly-2026-07-01";
pub const CARGO_FUZZ: &str = "0.13.2";

pub fn ensure() -> Result<()> {
    nightly()?;
    cargo_fuzz()
}

fn nightly() -> Result<()> {
    let have = cmd::command("rustup").args(["run", NIGHTLY, "rustc", "--version"]).output();
    if have.is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    super::step(&format!("installing Rust {NIGHTLY} for fuzzing (rustup)"), "20 s", || {
        let mut c = cmd::command("rustup");
        c.args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]);
        cmd::status_quiet(c)
    })
}

fn cargo_fuzz() -> Result<()> {
    let version =
        cmd::command("cargo").args(["fuzz", "--version"]).env("RUSTUP_TOOLCHAIN", super::TOOLCHAIN).output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == format!("cargo-fuzz {CARGO_FUZZ}"))
    {
        return Ok(());
    }
    super::step(&format!("building cargo-fuzz {CARGO_FUZZ} (cargo install)"), "about 90 s on 2 cores", || {
        let mut c = cmd::command("cargo");
        c.args(["install", "--quiet", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ])
            .env("RUSTUP_TOOLCHAIN", super::TOOLCHAIN)
            .current_dir(std::env::temp_dir());
        cmd::status(c)
    })
}
