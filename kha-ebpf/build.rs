// Rebuild the programs when bpf-linker changes: it is not a cargo dependency, but the objects
// are its output.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
