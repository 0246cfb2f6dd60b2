//! Builds kha-ebpf for bpfel with the pinned toolchain and embeds the object (see loader.rs).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Where `cargo xtask setup` (and the Containerfile) put LLVM 22, which bpf-linker needs too.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir).parent().expect("kha-user lives in the workspace");
    let ebpf_dir = root.join("kha-ebpf");
    // kha-ebpf includes kha-common; aya-build only watches the eBPF crate itself.
    println!("cargo::rerun-if-changed={}", root.join("kha-common/src").display());
    // build-std=core needs unstable cargo flags; RUSTC_BOOTSTRAP here reaches only the child
    // cargo that builds the eBPF crate, so the rest of the workspace stays on plain stable.
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "kha-ebpf",
            root_dir: ebpf_dir.to_str().expect("UTF-8 path"),
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("1.98"),
    )?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    strip_dwarf(&out.join("kha"))?;
    strip_dwarf(&out.join("kha-trace"))
}

/// The object keeps BTF (map field names, the verifier's line info) and loses the DWARF that
/// bpf-linker made it from: 400 KB of its 500, which the agent would map and page in.
fn strip_dwarf(object: &Path) -> anyhow::Result<()> {
    let objcopy = Path::new(LLVM_BIN).join("llvm-objcopy");
    let status = Command::new(&objcopy).arg("--strip-debug").arg(object).status().with_context(|| {
        format!("running {} (LLVM 22: `cargo xtask setup` installs it)", objcopy.display())
    })?;
    if !status.success() {
        bail!("{} --strip-debug {} failed: {status}", objcopy.display(), object.display());
    }
    Ok(())
}
