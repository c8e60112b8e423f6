//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` one after the other, each for a
//! bounded time, and fails on any crash, timeout, leak or out-of-memory with the reproducer's path.
//!
//! The xtask runs on stable; fuzzing needs nightly, so it shells out to `cargo +nightly fuzz`.
//! It first makes sure of what that needs: the eBPF toolchain (khttpd's build script builds the
//! eBPF object in the fuzz build too, see `toolchain`) and cargo-fuzz, installed with
//! `cargo install cargo-fuzz --locked` when missing. Everything lives under `target/fuzz/`: the
//! build (`build/`, its own target directory, so it never waits on the workspace's lock), one
//! corpus per target (`corpus/<target>/`, kept between runs and seeded each run from [`seeds`]),
//! crash reproducers (`artifacts/<target>/`) and libFuzzer's output (`logs/<target>.log`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Instant, SystemTime},
};

use anyhow::{bail, Context as _};

use crate::{toolchain, workspace_root};

/// The targets in `fuzz/fuzz_targets/`, in the order they run.
pub const TARGETS: &[&str] = &["classifier", "session"];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of fuzzing per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Run only this target (default: each of them, one after the other).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub target: Option<String>,
}

/// What one target's run did, from libFuzzer's final statistics.
struct Outcome {
    target: &'static str,
    executions: u64,
    per_second: u64,
    seconds: f64,
    corpus: usize,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    toolchain::ensure()?;
    ensure_cargo_fuzz()?;
    let targets: Vec<&'static str> = TARGETS
        .iter()
        .copied()
        .filter(|t| args.target.as_deref().is_none_or(|only| only == *t))
        .collect();
    let started = Instant::now();
    let mut build = cargo_fuzz("build");
    if let [only] = targets[..] {
        build.arg(only);
    }
    let status = build.status().context("cannot run cargo +nightly fuzz")?;
    if !status.success() {
        bail!("cargo +nightly fuzz build failed ({status})");
    }
    println!(
        "fuzz: targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let mut outcomes = Vec::new();
    for target in targets {
        outcomes.push(run_target(target, args)?);
    }
    println!(
        "fuzz: {:<12} {:>14} {:>9} {:>8} {:>7}",
        "target", "executions", "exec/s", "seconds", "corpus"
    );
    for o in &outcomes {
        println!(
            "fuzz: {:<12} {:>14} {:>9} {:>8.0} {:>7}",
            o.target, o.executions, o.per_second, o.seconds, o.corpus
        );
    }
    println!("fuzz: no crash, timeout or leak");
    println!("fuzz: {} passed, 0 failed", outcomes.len());
    Ok(())
}

fn run_target(target: &'static str, args: &Args) -> anyhow::Result<Outcome> {
    let root = workspace_root().join("target/fuzz");
    let corpus = root.join("corpus").join(target);
    let artifacts = root.join("artifacts").join(target);
    let logs = root.join("logs");
    for dir in [&corpus, &artifacts, &logs] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for (name, bytes) in seeds(target) {
        let path = corpus.join(format!("seed-{name}"));
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    println!(
        "fuzz: {target} for {} s (corpus {}, log {})",
        args.seconds,
        shown(&corpus),
        shown(&log_path)
    );
    let dictionary = workspace_root().join("fuzz/http.dict");
    let mut command = cargo_fuzz("run");
    command
        .arg(target)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={}", args.seconds))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-dict={}", dictionary.display()))
        // The trailing slash makes it a directory prefix.
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(log.try_clone()?)
        .stderr(log);
    let started = SystemTime::now();
    let clock = Instant::now();
    let status = command.status().context("cannot run cargo +nightly fuzz")?;
    let seconds = clock.elapsed().as_secs_f64();
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let found = new_artifacts(&artifacts, started);
    if !status.success() || !found.is_empty() {
        print_failure(&text);
        let mut message = format!(
            "fuzz target {target} failed ({status}); log: {}",
            shown(&log_path)
        );
        for artifact in &found {
            message.push_str(&format!(
                "\n  reproducer: {}\n  replay: cargo +nightly fuzz run --fuzz-dir fuzz --target-dir target/fuzz/build {target} {}\n  minimise: cargo +nightly fuzz tmin --fuzz-dir fuzz --target-dir target/fuzz/build {target} {}",
                artifact.display(),
                artifact.display(),
                artifact.display()
            ));
        }
        bail!(message);
    }
    let stat = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no stat::{name} in {}", shown(&log_path)))
    };
    let outcome = Outcome {
        target,
        executions: stat("number_of_executed_units")?,
        per_second: stat("average_exec_per_sec")?,
        seconds,
        corpus: fs::read_dir(&corpus).map_or(0, |d| d.count()),
    };
    println!(
        "fuzz: {target}: {} executions in {:.0} s ({} exec/s), corpus {} inputs, peak RSS {} MB",
        outcome.executions,
        seconds,
        outcome.per_second,
        outcome.corpus,
        stat("peak_rss_mb").unwrap_or(0)
    );
    Ok(outcome)
}

/// `cargo +nightly fuzz <subcommand>` on `fuzz/`, built in `target/fuzz/build`.
fn cargo_fuzz(subcommand: &str) -> Command {
    // The rustup proxy, which understands `+nightly` (the `cargo` running this xtask may be the
    // stable toolchain's own binary).
    let mut command = Command::new(cargo_home().join("bin/cargo"));
    command
        .args([
            "+nightly",
            "fuzz",
            subcommand,
            "--fuzz-dir",
            "fuzz",
            "--target-dir",
        ])
        .arg(workspace_root().join("target/fuzz/build"))
        .current_dir(workspace_root())
        // Set by the stable cargo that runs this xtask; the nightly one sets its own.
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN");
    command
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Installs cargo-fuzz when `cargo fuzz` is missing; a file check when it is there.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let binary = cargo_home().join("bin/cargo-fuzz");
    if binary.exists() {
        return Ok(());
    }
    let command = "cargo install cargo-fuzz --locked";
    eprintln!(
        "xtask: installing cargo-fuzz ({} is missing)",
        binary.display()
    );
    eprintln!("xtask: $ {command}");
    let started = Instant::now();
    let status = Command::new(env!("CARGO"))
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("`{command}` failed ({status})");
    }
    if !binary.exists() {
        bail!(
            "cargo-fuzz is still missing at {} after `{command}`",
            binary.display()
        );
    }
    eprintln!(
        "xtask: cargo-fuzz installed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Reproducers libFuzzer wrote since `since`.
fn new_artifacts(dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified >= since)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// The part of libFuzzer's output that says what went wrong: the panic or sanitizer report up to
/// its stack trace, and libFuzzer's summary lines.
fn print_failure(log: &str) {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .position(|l| {
            l.contains("panicked at")
                || l.contains("ERROR: AddressSanitizer")
                || l.contains("ERROR: LeakSanitizer")
                || l.contains("ERROR: libFuzzer")
                || l.contains("ALARM: working on the last Unit")
        })
        .unwrap_or(lines.len().saturating_sub(20));
    for line in lines[start..]
        .iter()
        .take_while(|l| !l.starts_with("stack backtrace:"))
        .take(40)
    {
        eprintln!("  {line}");
    }
    for line in &lines[start..] {
        if line.starts_with("SUMMARY:") || line.contains("Test unit written to") {
            eprintln!("  {line}");
        }
    }
}

fn shown(path: &Path) -> String {
    path.strip_prefix(workspace_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The seed inputs of a target, in its input layout (see the target's file).
pub fn seeds(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    let with = |prefix: &[u8], request: &[u8]| [prefix, request].concat();
    match target {
        // flags (which halves get `GET `/`HEAD `/CRLFCRLF/padding), split, bytes.
        "classifier" => vec![
            ("get", with(&[0, 255], b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n\r\n")),
            ("head", with(&[0, 255], b"HEAD /index.html HTTP/1.1\r\nHost: a\r\n\r\n")),
            (
                "two-equal",
                with(&[0, 18], b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\n\r\n"),
            ),
            ("decorated", with(&[0x5d, 3], b"/a HTTP/1.1")),
        ],
        // flags (bit 0: chunked run not learning, bit 1: head time-out, bit 2: expansion,
        // high nibble: chunk-size bytes), chunk sizes, the client's bytes.
        "session" => vec![
            ("get", with(&[0x00], b"GET / HTTP/1.1\r\nHost: localhost:8081\r\n\r\n")),
            ("head-1.0", with(&[0x10, 7], b"HEAD /index.html HTTP/1.0\r\n\r\n")),
            (
                "keep-alive-1.0",
                with(&[0x10, 16], b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
            ),
            (
                "pipelined",
                with(
                    &[0x20, 30, 5],
                    b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                ),
            ),
            (
                "chunked-post",
                with(
                    &[0x10, 3],
                    b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
                ),
            ),
            (
                "length-post",
                with(
                    &[0x10, 40],
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcHEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
                ),
            ),
            (
                "cl-and-te",
                with(
                    &[0x10, 127],
                    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                ),
            ),
            (
                "partial-head",
                with(&[0x12, 9], b"GET / HTTP/1.1\r\nHost: a\r\n"),
            ),
            // `0xff count len pattern`: 8448 `a`s of request target, past the 8 KiB limit.
            (
                "long-target",
                with(&[0x24, 0xbf, 0x90], b"GET /\xff\xc1\x00a HTTP/1.1\r\nHost: a\r\n\r\n"),
            ),
        ],
        _ => Vec::new(),
    }
}
