//! Re-run when bpf-linker changes, so a fixed or updated linker rebuilds the programs.
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found: run `cargo xtask run`, which installs it");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
