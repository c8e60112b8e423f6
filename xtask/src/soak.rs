//! `cargo xtask soak`: a long htstress run per fast-path mode, then a check that the server gave
//! back everything the connections held.
//!
//! For each mode (`--fast-path auto`, `off`, `on`) this starts the release server on its own
//! loopback ports, warms it up (a short close-per-request run and a keep-alive run long enough for
//! `auto` to move connections into the kernel), waits until it is idle and takes a **baseline**:
//!
//! - open file descriptors (`/proc/<pid>/fd`) and resident memory (`VmRSS`);
//! - the gauges of connections user space holds: `khttpd_http_open_connections` (user space and
//!   kernel), `khttpd_http_kernel_connections` (held open for the kernel path),
//!   `khttpd_http_kernel_sockets` (the server's own count of its sockhash), and the HTTP work
//!   queue's running and queued work items (one per user-space connection);
//! - the kernel's per-connection state, read from outside the server: the entries of the
//!   `HTTP_SOCKETS` sockhash and of the `HTTP_CONNECTIONS` and `HTTP_ANSWERED` hashes (all keyed
//!   by socket cookie). The maps are found through `/proc/<pid>/fdinfo` (`map_id:` of every BPF
//!   map fd the server holds), which names this server's maps only — other khttpd processes on the
//!   machine have maps of the same names, and this bpftool build cannot show which process holds a
//!   map. Each id is opened with `BPF_MAP_GET_FD_BY_ID`, named with `BPF_OBJ_GET_INFO_BY_FD`, and
//!   its keys counted with `BPF_MAP_GET_NEXT_KEY` — the bpf() syscall itself, no tool to parse;
//! - the server's TCP sockets on its HTTP port that are neither listening nor in TIME_WAIT
//!   (`/proc/net/tcp`, `tcp6`): a socket the server closed but the kernel still keeps.
//!
//! Then `htstress -n N -c 500 -t 2` (a connection per request) and the same with `--keep-alive`:
//! every request must be answered good (no bad answer, no socket error), and within
//! `--drain-seconds` of the end of each run every count above must be back at its baseline. RSS may
//! grow by at most `--rss-growth-mib` (allocators keep freed memory; a leak per connection would
//! show as tens of MiB over a million connections). The table goes to stdout and
//! `target/bench/soak.md`; any failure makes the command exit non-zero, naming what did not return.

use std::{
    fmt::Write as _,
    fs, io,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use clap::Parser as _;

use khttpd_harness::{bpf, system, Metrics, Mode, Server};

use crate::{
    bench::{flagged, thousands},
    htstress, workspace_root,
};

#[derive(clap::Args)]
pub struct Args {
    /// Requests per htstress run (each mode gets a close-per-request run and a keep-alive run).
    #[arg(short = 'n', long, default_value_t = 1_000_000)]
    requests: u64,
    /// htstress connections per thread.
    #[arg(short = 'c', long, default_value_t = 500)]
    concurrency: usize,
    /// htstress threads.
    #[arg(short = 't', long, default_value_t = 2)]
    threads: usize,
    /// Fast-path modes to soak, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "auto,off,on")]
    modes: Vec<FastPath>,
    /// Longest the server may take, after a run, to give everything back.
    #[arg(long, default_value_t = 10)]
    drain_seconds: u64,
    /// Most VmRSS may grow over the whole soak of one mode, in MiB.
    #[arg(long, default_value_t = 64)]
    rss_growth_mib: u64,
    /// Longest one htstress run may take; it stops starting requests then (and fails).
    #[arg(long, default_value_t = 900)]
    max_run_seconds: u64,
    /// The khttpd binary to soak (default: build the release one).
    #[arg(long)]
    pub khttpd: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FastPath {
    Auto,
    Off,
    On,
}

impl FastPath {
    /// The server's mode for this `--fast-path`.
    pub fn mode(self) -> Mode {
        match self {
            FastPath::Auto => Mode::Auto,
            FastPath::Off => Mode::UserUnbound,
            FastPath::On => Mode::Kernel,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FastPath::Auto => "auto",
            FastPath::Off => "off",
            FastPath::On => "on",
        }
    }
}

/// The warm-up before the baseline: enough keep-alive answers per connection (32 in a row) for
/// `auto` to move connections into the kernel, and enough of everything for lazily started
/// workers, learned answers and allocator arenas to exist before anything is counted.
const WARM_UP: [&[&str]; 2] = [
    &["-n", "20000", "-c", "50", "-t", "2"],
    &["--keep-alive", "-n", "50000", "-c", "50", "-t", "2"],
];
/// How often the drain is polled.
const POLL: Duration = Duration::from_millis(200);

/// What the server holds, read from outside it (and from its gauges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Snapshot {
    fds: u64,
    rss_kib: u64,
    /// `khttpd_http_open_connections`.
    open: u64,
    /// `khttpd_http_kernel_connections` (0 without the fast path).
    kernel_connections: u64,
    /// `khttpd_http_kernel_sockets`: the server's own count of its sockhash.
    kernel_sockets_gauge: u64,
    /// Running plus queued work items of the HTTP work queue.
    work_items: u64,
    /// Entries of HTTP_SOCKETS, HTTP_CONNECTIONS, HTTP_ANSWERED; `None` without the fast path.
    maps: Option<[u64; 3]>,
    /// Server-side TCP sockets on the HTTP port, neither listening nor in TIME_WAIT.
    tcp: u64,
}

/// The per-connection maps.
const CONNECTION_MAPS: [&str; 3] = [
    khttpd_common::http::SOCKETS_MAP,
    khttpd_common::http::CONNECTIONS_MAP,
    khttpd_common::http::ANSWERED_MAP,
];

impl Snapshot {
    fn take(server: &Server) -> anyhow::Result<Self> {
        let pid = server.pid();
        let metrics = server.metrics()?;
        let gauge = |name: &str| metrics.sum(name).unwrap_or(0);
        let maps = bpf::maps_of(pid)?;
        let per_connection = if maps.is_empty() {
            None
        } else {
            let mut counts = [0; 3];
            for (count, name) in counts.iter_mut().zip(CONNECTION_MAPS) {
                *count = bpf::find(&maps, name)?
                    .entries()
                    .with_context(|| format!("cannot count the entries of {name}"))?
                    as u64;
            }
            Some(counts)
        };
        Ok(Self {
            fds: system::fd_count(pid)? as u64,
            rss_kib: server.vm_rss_kib()?,
            open: gauge("khttpd_http_open_connections"),
            kernel_connections: gauge("khttpd_http_kernel_connections"),
            kernel_sockets_gauge: gauge("khttpd_http_kernel_sockets"),
            work_items: queue_gauge(&metrics, "khttpd_workqueue_active")
                + queue_gauge(&metrics, "khttpd_workqueue_pending"),
            maps: per_connection,
            tcp: tcp_sockets(server.http_addr().port())?,
        })
    }

    /// Every count that must return to its baseline, by name.
    fn counts(&self) -> Vec<(&'static str, u64)> {
        let mut counts = vec![
            ("open fds", self.fds),
            ("khttpd_http_open_connections", self.open),
            ("khttpd_http_kernel_connections", self.kernel_connections),
            ("khttpd_http_kernel_sockets", self.kernel_sockets_gauge),
            ("HTTP work items", self.work_items),
            ("TCP sockets (not TIME_WAIT)", self.tcp),
        ];
        if let Some(maps) = self.maps {
            counts.extend(CONNECTION_MAPS.into_iter().zip(maps));
        }
        counts
    }

    /// What is above `baseline` (name, baseline, now).
    fn above(&self, baseline: &Self) -> Vec<(&'static str, u64, u64)> {
        baseline
            .counts()
            .into_iter()
            .zip(self.counts())
            .filter(|((_, base), (_, now))| now > base)
            .map(|((name, base), (_, now))| (name, base, now))
            .collect()
    }
}

/// Sum of a work-queue gauge over the series of the HTTP queue.
fn queue_gauge(metrics: &Metrics, name: &str) -> u64 {
    metrics
        .sum_where(name, "queue=\"khttpd_http\"")
        .unwrap_or(0)
}

/// Sockets in `/proc/net/tcp` and `tcp6` whose local port is `port`, except listening and
/// TIME_WAIT ones.
fn tcp_sockets(port: u16) -> anyhow::Result<u64> {
    const TIME_WAIT: &str = "06";
    const LISTEN: &str = "0A";
    let port = format!(":{port:04X}");
    let mut count = 0;
    for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let table = match fs::read_to_string(path) {
            Ok(table) => table,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error).with_context(|| format!("cannot read {path}")),
        };
        count += table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let local = fields.nth(1)?;
                let state = fields.nth(1)?;
                Some((local, state))
            })
            .filter(|(local, state)| {
                local.ends_with(&port) && *state != TIME_WAIT && *state != LISTEN
            })
            .count() as u64;
    }
    Ok(count)
}

/// One htstress run and what it left behind.
struct Row {
    mode: FastPath,
    load: &'static str,
    report: htstress::Report,
    baseline: Snapshot,
    after: Snapshot,
    drained_in: Option<Duration>,
}

pub fn run(args: &Args, khttpd: &Path) -> anyhow::Result<()> {
    ensure!(
        args.requests > 0 && args.concurrency > 0 && args.threads > 0 && !args.modes.is_empty(),
        "-n, -c, -t and --modes must not be zero or empty"
    );
    ensure!(
        crate::is_root(),
        "the soak loads BPF programs and reads the server's maps: run it as root"
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for &mode in &args.modes {
        if let Err(error) = soak_mode(args, khttpd, mode, &mut rows, &mut failures) {
            let error = format!("{error:#}").replace('\n', " / ");
            eprintln!("[{}] failed: {error}", mode.as_str());
            failures.push(format!("{}: {error}", mode.as_str()));
        }
    }
    let table = render(args, &rows, &failures, started.elapsed());
    print!("{table}");
    let out_dir = workspace_root().join("target/bench");
    fs::create_dir_all(&out_dir)?;
    fs::write(out_dir.join("soak.md"), &table)?;
    println!("\nwrote {}", out_dir.join("soak.md").display());
    if !failures.is_empty() {
        bail!("soak failed:\n  {}", failures.join("\n  "));
    }
    Ok(())
}

fn soak_mode(
    args: &Args,
    khttpd: &Path,
    mode: FastPath,
    rows: &mut Vec<Row>,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let name = mode.as_str();
    let server = Server::start(khttpd, mode.mode(), &[])?;
    let fast_path = server.metrics()?.get("khttpd_fast_path_enabled");
    ensure!(
        fast_path == Some(u64::from(mode != FastPath::Off)),
        "khttpd_fast_path_enabled is {fast_path:?} with --fast-path {name}"
    );
    let url = format!("http://{}/", server.http_addr());
    eprintln!("[{name}] warm-up");
    for flags in WARM_UP {
        let report = htstress(flags, &url, args.max_run_seconds)?;
        ensure!(
            report.bad == 0 && report.socket_errors == 0,
            "warm-up htstress {}: {} bad, {} socket errors",
            flags.join(" "),
            report.bad,
            report.socket_errors
        );
    }
    let baseline = settle(&server, Duration::from_secs(args.drain_seconds))?;
    let (n, c, t) = (
        args.requests.to_string(),
        args.concurrency.to_string(),
        args.threads.to_string(),
    );
    let loads: [(&str, Vec<&str>); 2] = [
        ("close per request", vec!["-n", &n, "-c", &c, "-t", &t]),
        (
            "keep-alive",
            vec!["--keep-alive", "-n", &n, "-c", &c, "-t", &t],
        ),
    ];
    for (load, flags) in loads {
        eprintln!("[{name}] htstress {} {url}", flags.join(" "));
        let report = htstress(&flags, &url, args.max_run_seconds)?;
        eprintln!(
            "[{name}] {} good, {} bad, {} socket errors, {} req/s",
            report.good,
            report.bad,
            report.socket_errors,
            thousands(report.requests_per_sec())
        );
        let mut problems = Vec::new();
        if report.requests != args.requests || report.good != args.requests {
            problems.push(format!(
                "{} of {} requests good ({} bad, {} socket errors)",
                report.good, args.requests, report.bad, report.socket_errors
            ));
        }
        let (after, drained_in) =
            drain(&server, &baseline, Duration::from_secs(args.drain_seconds))?;
        if drained_in.is_none() {
            let left: Vec<String> = after
                .above(&baseline)
                .into_iter()
                .map(|(what, base, now)| format!("{what} {base} -> {now}"))
                .collect();
            problems.push(format!(
                "not back to baseline {}s after the run: {}",
                args.drain_seconds,
                left.join(", ")
            ));
        }
        let rss_limit = baseline.rss_kib + args.rss_growth_mib * 1024;
        if after.rss_kib > rss_limit {
            problems.push(format!(
                "VmRSS grew from {} to {} KiB (bound: +{} MiB)",
                baseline.rss_kib, after.rss_kib, args.rss_growth_mib
            ));
        }
        for problem in &problems {
            eprintln!("[{name}] {load}: {problem}");
            failures.push(format!("{name}, {load}: {problem}"));
        }
        rows.push(Row {
            mode,
            load,
            report,
            baseline,
            after,
            drained_in,
        });
    }
    Ok(())
}

/// htstress in this process, quiet, bounded in time.
fn htstress(flags: &[&str], url: &str, max_seconds: u64) -> anyhow::Result<htstress::Report> {
    let max_seconds = max_seconds.to_string();
    let argv = ["htstress", "-q", "--duration", &max_seconds]
        .into_iter()
        .chain(flags.iter().copied())
        .chain([url]);
    let args = htstress::Args::try_parse_from(argv).context("bad htstress arguments")?;
    htstress::load(&args)
}

/// Waits until the server holds no connection and its counts stop moving; returns the snapshot.
fn settle(server: &Server, limit: Duration) -> anyhow::Result<Snapshot> {
    let deadline = Instant::now() + limit;
    let mut last = Snapshot::take(server)?;
    loop {
        thread::sleep(POLL);
        let now = Snapshot::take(server)?;
        let idle = now.open == 0
            && now.work_items == 0
            && now.kernel_connections == 0
            && now.tcp == 0
            && now.maps.is_none_or(|maps| maps == [0; 3]);
        if idle && now.counts() == last.counts() {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            bail!("the server did not become idle after the warm-up within {limit:?}: {now:?}");
        }
        last = now;
    }
}

/// Polls until every count is back at (or below) `baseline`; the last snapshot, and how long it
/// took (`None` if it did not happen within `limit`).
fn drain(
    server: &Server,
    baseline: &Snapshot,
    limit: Duration,
) -> anyhow::Result<(Snapshot, Option<Duration>)> {
    let start = Instant::now();
    loop {
        let now = Snapshot::take(server)?;
        if now.above(baseline).is_empty() {
            return Ok((now, Some(start.elapsed())));
        }
        if start.elapsed() >= limit {
            return Ok((now, None));
        }
        thread::sleep(POLL);
    }
}

fn render(args: &Args, rows: &[Row], failures: &[String], elapsed: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# soak: htstress -n {} -c {} -t {}, close per request and keep-alive\n",
        thousands(args.requests as f64),
        args.concurrency,
        args.threads
    );
    let _ = writeln!(
        out,
        "| fast path | load | req/s | good | bad | errors | fds | open conns | kernel conns | work items | HTTP_SOCKETS | HTTP_CONNECTIONS | HTTP_ANSWERED | TCP (not TIME_WAIT) | VmRSS MiB | drained in |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---|---|---|---|---|---|---|---|---|---:|"
    );
    for row in rows {
        let (b, a) = (&row.baseline, &row.after);
        let map = |i: usize| match (b.maps, a.maps) {
            (Some(b), Some(a)) => change(b[i], a[i]),
            _ => "–".to_owned(),
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} → {:.1} | {} |",
            row.mode.as_str(),
            row.load,
            thousands(row.report.requests_per_sec()),
            thousands(row.report.good as f64),
            flagged(row.report.bad),
            flagged(row.report.socket_errors),
            change(b.fds, a.fds),
            change(b.open, a.open),
            change(b.kernel_connections, a.kernel_connections),
            change(b.work_items, a.work_items),
            map(0),
            map(1),
            map(2),
            change(b.tcp, a.tcp),
            mib(b.rss_kib),
            mib(a.rss_kib),
            row.drained_in
                .map_or_else(|| "**no**".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
        );
    }
    let _ = writeln!(
        out,
        "\nEach cell `a → b`: at the baseline (after warm-up, idle) → after the run and the drain \
         (≤ {} s). Maps are counted from outside the server (bpf() syscall on the ids in its \
         fdinfo). VmRSS may grow by at most {} MiB. {:.0} s in all.",
        args.drain_seconds,
        args.rss_growth_mib,
        elapsed.as_secs_f64()
    );
    if failures.is_empty() {
        let _ = writeln!(out, "\nNo failure.");
    } else {
        let _ = writeln!(out, "\n**Failures:**\n");
        for failure in failures {
            let _ = writeln!(out, "- {failure}");
        }
    }
    out
}

/// `a → b`, in bold when it grew.
fn change(before: u64, after: u64) -> String {
    if after > before {
        format!("**{before} → {after}**")
    } else {
        format!("{before} → {after}")
    }
}
