//! Project tasks: `cargo xtask run`, `cargo xtask test`, `cargo xtask bench
//! cost|echo|http|site|memory`, `cargo xtask htstress`, `cargo xtask floor`, `cargo xtask diff`,
//! `cargo xtask soak`, `cargo xtask fuzz`, `cargo xtask leak-check`.
//!
//! `run` and `test` first make sure the eBPF toolchain is installed (see `toolchain`), so a fresh
//! clone on a fresh machine needs nothing but these two commands.

mod bench;
mod bench_cost;
mod bench_echo;
mod bench_http;
mod bench_memory;
mod bench_site;
mod differential;
mod floor;
mod fuzz;
mod htstress;
mod kernel_warnings;
mod leak_check;
mod netns;
mod nginx;
mod soak;
mod toolchain;
mod wrk;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "khttpd's build, test and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the eBPF build needs (if missing), build khttpd (release) and run it as root.
    Run {
        /// Arguments for khttpd, e.g. `-- --iface lo --metrics 127.0.0.1:9100`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install what the eBPF build needs (if missing), then run every test (as root: real BPF).
    Test {
        /// Extra arguments for `cargo test`, e.g. `-- --nocapture`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks that start the server themselves in each mode.
    #[command(subcommand)]
    Bench(Bench),
    /// Only check (and install) the eBPF toolchain.
    Toolchain,
    /// HTTP load generator compatible with htstress (sysprog21/khttpd).
    Htstress(htstress::Args),
    /// The fast path is invisible: the same requests against `--fast-path on` and `off` must get
    /// the same bytes back (Date aside).
    Diff {
        #[command(flatten)]
        args: differential::Args,
        /// The khttpd binary to test (default: build the release one).
        #[arg(long)]
        khttpd: Option<PathBuf>,
    },
    /// The floor: a minimal HTTP and echo responder (no parsing, no checks) that shows the least
    /// any user-space server can spend per request on this machine. Used by `bench cost`.
    Floor(floor::Args),
    /// Run each fuzz target (fuzz/, cargo-fuzz on nightly; installed if missing) for a bounded time.
    Fuzz(fuzz::Args),
    /// htstress -n N (close per request, then keep-alive) per fast-path mode; every fd, sockhash
    /// entry and connection gauge must return to its baseline.
    Soak(soak::Args),
    /// Run a command (default: the HTTP and echo tests) and count the kernel-path sockets its
    /// servers closed with memory still charged; fails if there are any (issue 15).
    LeakCheck(leak_check::Args),
}

#[derive(Subcommand)]
enum Bench {
    /// Echo: kernel fast path vs user space on the unbound and bound work queues.
    Echo(bench_echo::Args),
    /// What a request costs the server on its own CPU (two network namespaces), and latency at
    /// fixed offered rates: khttpd's paths vs nginx vs a minimal responder (the floor).
    Cost(bench_cost::Args),
    /// HTTP: thread per connection vs work queue vs kernel fast path vs nginx, under htstress and wrk.
    Http(bench_http::Args),
    /// A generated folder (`--root`): kernel fast path vs user space vs nginx, with wrk.
    Site(bench_site::Args),
    /// Server memory with 10k and 50k keep-alive connections open, fast path on, auto and off.
    Memory(bench_memory::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Toolchain => toolchain::ensure(),
        Task::Htstress(args) => htstress::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Floor(args) => floor::run(&args),
        Task::LeakCheck(args) => {
            toolchain::ensure()?;
            leak_check::run(&args)
        }
        Task::Diff { args, khttpd } => {
            let khttpd = match khttpd {
                Some(path) => path,
                None => {
                    toolchain::ensure()?;
                    build_khttpd()?
                }
            };
            differential::run(&args, &khttpd)
        }
        Task::Run { args } => {
            toolchain::ensure()?;
            let khttpd = build_khttpd()?;
            let mut command = if is_root() {
                Command::new(&khttpd)
            } else {
                eprintln!("khttpd loads BPF programs: running it with sudo");
                let mut sudo = Command::new("sudo");
                sudo.arg(&khttpd);
                sudo
            };
            Err(command.args(args).exec()).context("cannot start khttpd")
        }
        Task::Test { args } => {
            toolchain::ensure()?;
            if is_root() {
                toolchain::install("the tests", &[toolchain::TMUX])?;
            } else {
                eprintln!("warning: not root: tests that load BPF programs will be skipped (CI=true makes them fail)");
            }
            // Where the harness records its servers' lifetimes, for the kernel-warning report.
            let lifetimes = workspace_root().join("target/test-lifetimes.txt");
            let _ = std::fs::remove_file(&lifetimes);
            // And where they record sockets closed with memory still charged (issue 15).
            let leaks = leak_check::log_path();
            let _ = std::fs::remove_file(&leaks);
            let before = kernel_warnings::before();
            let tested = cargo_with_env(
                &[
                    "test",
                    "--release",
                    "--workspace",
                    "--exclude",
                    "khttpd-ebpf",
                ],
                &args,
                &[
                    ("KHTTPD_LIFETIMES", lifetimes.as_os_str()),
                    (leak_check::LOG_VARIABLE, leaks.as_os_str()),
                ],
            );
            let mut report = kernel_warnings::report(&before, &lifetimes);
            let (leaked, leaks) = leak_check::report(&leaks);
            report.push_str(&leaks);
            eprint!("{report}");
            let _ = std::fs::write(workspace_root().join("target/kernel-warnings.txt"), &report);
            tested?;
            if leaked > 0 {
                bail!("{leaked} socket(s) closed with memory still charged (see above)");
            }
            Ok(())
        }
        Task::Bench(Bench::Echo(args)) => {
            let khttpd = release_khttpd(args.khttpd.clone())?;
            bench_echo::run(&args, &khttpd)
        }
        Task::Bench(Bench::Cost(args)) => {
            let khttpd = release_khttpd(args.khttpd.clone())?;
            if cfg!(debug_assertions) {
                // The load generators and the floor are this binary: measure the optimised one.
                return exec_release_xtask();
            }
            bench_cost::run(&args, &khttpd)
        }
        Task::Bench(Bench::Site(args)) => {
            toolchain::ensure()?;
            bench_site::run(&args, &build_khttpd()?)
        }
        Task::Soak(args) => {
            let khttpd = release_khttpd(args.khttpd.clone())?;
            if cfg!(debug_assertions) {
                // htstress runs in this process, as in `bench http`.
                return exec_release_xtask();
            }
            soak::run(&args, &khttpd)
        }
        Task::Bench(Bench::Memory(args)) => {
            let khttpd = release_khttpd(args.khttpd.clone())?;
            if cfg!(debug_assertions) {
                return exec_release_xtask();
            }
            bench_memory::run(&args, &khttpd)
        }
        Task::Bench(Bench::Http(args)) => {
            toolchain::ensure()?;
            let khttpd = build_khttpd()?;
            if cfg!(debug_assertions) {
                // htstress runs in this process and shares the CPUs with the server: an
                // unoptimised load generator would cost the servers about a fifth of their rate.
                return exec_release_xtask();
            }
            bench_http::run(&args, &khttpd)
        }
    }
}

pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
}

/// `path` if given, else the release server, built.
fn release_khttpd(path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match path {
        Some(path) => Ok(path),
        None => {
            toolchain::ensure()?;
            build_khttpd()
        }
    }
}

/// Builds the release server and returns its path.
pub fn build_khttpd() -> anyhow::Result<PathBuf> {
    cargo(&["build", "--release", "--package", "khttpd"], &[])?;
    Ok(workspace_root().join("target/release/khttpd"))
}

/// Replaces this (debug) process with the release build of xtask, same arguments.
fn exec_release_xtask() -> anyhow::Result<()> {
    cargo(&["build", "--release", "--package", "xtask"], &[])?;
    let xtask = workspace_root().join("target/release/xtask");
    Err(Command::new(&xtask)
        .args(std::env::args_os().skip(1))
        .exec())
    .with_context(|| format!("cannot run {}", xtask.display()))
}

fn cargo(args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    cargo_with_env(args, extra, &[])
}

fn cargo_with_env(
    args: &[&str],
    extra: &[String],
    env: &[(&str, &std::ffi::OsStr)],
) -> anyhow::Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .args(extra)
        .envs(env.iter().copied())
        .current_dir(workspace_root())
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
