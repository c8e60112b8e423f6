//! Makes sure the eBPF build can run: the nightly toolchain's rust-src, LLVM 22's development files
//! and bpf-linker 0.13 linked against LLVM 22. Installs what is missing when running as root;
//! otherwise stops with the exact commands. When everything is present this takes milliseconds.
//! Benches install the tools they run the same way ([`install`]).

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _};

const NIGHTLY: &str = "nightly";
const LLVM_CONFIG: &str = "/usr/lib/llvm-22/bin/llvm-config";
const LLVM_LIB: &str = "libLLVM.so.22";
const BPF_LINKER_VERSION: &str = "bpf-linker 0.13.";

/// Something a task needs: how to tell it is there, and the shell commands that install it.
pub struct Step {
    pub what: &'static str,
    pub present: fn() -> bool,
    pub commands: &'static [&'static str],
}

const STEPS: &[Step] = &[
    Step {
        what: "rust-src for the nightly toolchain",
        present: has_rust_src,
        commands: &["rustup component add rust-src --toolchain nightly"],
    },
    Step {
        what: "LLVM 22 development files (llvm-22-dev)",
        present: || std::path::Path::new(LLVM_CONFIG).exists(),
        commands: &["apt-get update", "DEBIAN_FRONTEND=noninteractive apt-get install -y llvm-22-dev"],
    },
    Step {
        what: "bpf-linker 0.13 built for LLVM 22",
        present: has_bpf_linker,
        commands: &[
            "PATH=/usr/lib/llvm-22/bin:$PATH cargo +stable install bpf-linker --locked --version '~0.13' --no-default-features --features llvm-22 --force",
        ],
    },
];

/// tmux, the terminal `khttpd top`'s test runs it in (khttpd/tests/top.rs).
pub const TMUX: Step = Step {
    what: "tmux (the terminal of the khttpd top test)",
    present: || crate::bench::find_on_path("tmux").is_some(),
    commands: &[
        "apt-get update",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y tmux",
    ],
};

pub fn ensure() -> anyhow::Result<()> {
    if !toolchain_installed(NIGHTLY) {
        bail!("the nightly Rust toolchain is not installed; run: rustup toolchain install nightly --component rust-src");
    }
    install("the eBPF build", STEPS)
}

/// Installs the `steps` that are missing for `purpose` when running as root; otherwise stops with
/// the exact commands.
pub fn install(purpose: &str, steps: &[Step]) -> anyhow::Result<()> {
    let missing: Vec<&Step> = steps.iter().filter(|step| !(step.present)()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        let commands: Vec<&str> = missing
            .iter()
            .flat_map(|step| step.commands.iter().copied())
            .collect();
        bail!(
            "missing for {purpose}: {}. As root, run:\n  {}",
            missing
                .iter()
                .map(|step| step.what)
                .collect::<Vec<_>>()
                .join(", "),
            commands.join("\n  ")
        );
    }
    for step in missing {
        eprintln!("xtask: installing {}", step.what);
        for command in step.commands {
            eprintln!("xtask: $ {command}");
            let status = Command::new("sh")
                .arg("-c")
                .arg(command)
                .status()
                .context("cannot run sh")?;
            if !status.success() {
                bail!("`{command}` failed ({status})");
            }
        }
        if !(step.present)() {
            bail!("{} is still missing after installing it", step.what);
        }
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn toolchain_installed(name: &str) -> bool {
    output("rustup", &["toolchain", "list"])
        .is_some_and(|list| list.lines().any(|l| l.starts_with(name)))
}

fn has_rust_src() -> bool {
    // Cheaper than `rustup component list`: look for the sources in the toolchain's sysroot.
    output("rustup", &["run", NIGHTLY, "rustc", "--print", "sysroot"]).is_some_and(|sysroot| {
        PathBuf::from(sysroot.trim())
            .join("lib/rustlib/src/rust/library/core/Cargo.toml")
            .exists()
    })
}

fn has_bpf_linker() -> bool {
    let Some(version) = output("bpf-linker", &["--version"]) else {
        return false;
    };
    if !version.starts_with(BPF_LINKER_VERSION) {
        return false;
    }
    // A linker built against another LLVM fails at link time with confusing errors.
    let Some(path) = output("sh", &["-c", "command -v bpf-linker"]) else {
        return false;
    };
    output("ldd", &[path.trim()]).is_some_and(|libs| libs.contains(LLVM_LIB))
}
