//! `cargo xtask leak-check [-- COMMAND ARGS…]` (issue 15): runs a command with `KHTTPD_LEAK_LOG`
//! set and counts the kernel-path sockets its servers closed with memory still charged. khttpd logs
//! each (khttpd/src/socket_memory.rs says how it sees them); the test harness (khttpd/tests/common)
//! copies those lines of every server it stopped into the file the variable names, so COMMAND is a
//! test binary or a `cargo test` invocation. The default command is the HTTP and echo tests.
//! `cargo xtask test` runs its whole suite the same way and ends with the same line.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _};

use crate::workspace_root;

/// The variable the test harness reads.
pub const LOG_VARIABLE: &str = "KHTTPD_LEAK_LOG";

#[derive(clap::Args)]
pub struct Args {
    /// The command to run (default: `cargo test --release` of the http, http_fast_path and echo
    /// tests).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Where the servers record what they found.
pub fn log_path() -> std::path::PathBuf {
    workspace_root().join("target/leak-check.log")
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let log = log_path();
    let _ = fs::remove_file(&log);
    let mut command = match args.command.split_first() {
        Some((program, rest)) => {
            let mut command = Command::new(program);
            command.args(rest);
            command
        }
        None => {
            let mut command = Command::new(env!("CARGO"));
            command.current_dir(workspace_root()).args([
                "test",
                "--release",
                "--package",
                "khttpd",
                "--test",
                "http",
                "--test",
                "http_fast_path",
                "--test",
                "echo",
            ]);
            command
        }
    };
    let status = command
        .env(LOG_VARIABLE, &log)
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    let (found, report) = report(&log);
    eprint!("{report}");
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    if found > 0 {
        bail!("{found} socket(s) closed with memory still charged");
    }
    Ok(())
}

/// How many sockets `log` lists, and the report: one line per socket, then the total.
pub fn report(log: &Path) -> (usize, String) {
    let lines = fs::read_to_string(log).unwrap_or_default();
    let mut out = String::new();
    let mut found = 0;
    for line in lines.lines().filter(|line| !line.trim().is_empty()) {
        // "<test>\t<the server's log line>", as the harness writes it.
        let (test, said) = line.split_once('\t').unwrap_or(("?", line));
        out.push_str(&format!("  {test}: {said}\n"));
        found += 1;
    }
    out.push_str(&format!(
        "sockets closed with memory still charged: {found}\n"
    ));
    (found, out)
}
