//! Builds kha-ebpf for bpfel with the pinned toolchain and embeds the object (see loader.rs).
use std::path::Path;

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
    )
}
