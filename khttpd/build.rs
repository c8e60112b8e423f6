//! Builds the eBPF programs (khttpd-ebpf) with the nightly toolchain for bpfel-unknown-none and puts
//! the object in OUT_DIR, where `fast_path.rs` embeds it. `cargo xtask run|test` install the
//! toolchain this needs before cargo gets here.
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../khttpd-ebpf");
    let package = aya_build::Package {
        name: "khttpd-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
