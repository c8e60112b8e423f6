//! `cargo xtask bench http`: what each way of serving HTTP costs, against nginx as a yardstick.
//!
//! Why: khttpd serves HTTP from user space with a work item per connection (`cmwq`) or a thread
//! per connection (`thread`, the original kthread khttpd), and from the kernel fast path
//! (`kernel`, i.e. `--fast-path on`; `auto`, khttpd's default, on request). Whether each step pays
//! off shows only when every mode is measured the same way, on the same machine, in one run — and
//! next to a well-known server.
//!
//! Method: `--reps` rounds; in each, every mode in turn starts its own server on free loopback
//! ports (khttpd also gets its own echo and metrics ports; nginx gets a config written into a
//! temporary directory), checks that `GET /` answers `200` with `Hello, World!\n`, runs each load
//! once and stops it. A fresh server per round and modes alternating within one: a server
//! process can settle into a slower state for its lifetime (a connection per request, `-c 1`: about
//! 38k instead of 45k req/s, with or without an access log), and the medians should not depend on
//! which mode drew it. The loads:
//! 1. `htstress -n N -c 1 -t 4`: the seed's benchmark — a new connection per request, HTTP/1.0,
//!    the server closes; four connections in flight.
//! 2. `htstress -n N -c 25 -t 4`: the same with 100 connections in flight, enough to saturate
//!    both vCPUs of the machine this was written on (more only adds queueing).
//! 3. Keep-alive: `wrk -t2 -c100 -d5s --latency` (persistent HTTP/1.1 connections), or
//!    `htstress --keep-alive` for the same time when wrk is not installed (or with `--no-wrk`).
//!
//! htstress runs in this process; wrk is a child process. Around each run the whole machine's CPU
//! split is read from `/proc/stat`, load generator included (it shares the machine), and the
//! non-idle CPU time is divided by the answered requests: CPU-seconds per 100k requests. The
//! table shows medians over the repetitions and the totals of good, bad and failed requests, so a
//! single error in any run stays visible. Results go to stdout and `target/bench/http.md`, and as
//! grouped bar charts (requests/s and CPU-seconds per 100k requests) to `target/bench/http.png`.
//! Every run is bounded in requests and time; each server is stopped (and waited for) even when a
//! run fails.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _};
use clap::Parser as _;
use plotters::prelude::*;

use khttpd_harness::{http::answer_until_close, system::temp_dir, Metrics, Mode, Server};

use crate::{
    bench::{
        find_on_path, flagged, median, or_dash, register_font, thousands, write_results, CpuSplit,
        CpuTimes, GroupedBars, HELLO,
    },
    htstress,
    nginx::{find_nginx, Nginx, HELLO_LOCATION},
    wrk::{wrk, Counts, KEEP_ALIVE_THREADS},
};

#[derive(clap::Args)]
pub struct Args {
    /// Runs of each load per mode; the table shows their medians.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Requests per run of each htstress (close-per-request) load.
    #[arg(short = 'n', long, default_value_t = 100_000)]
    requests: u64,
    /// htstress threads (`-t`) in the close-per-request loads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Connections per htstress thread (`-c`) in the high-concurrency load.
    #[arg(long, default_value_t = 25)]
    concurrency: usize,
    /// Keep-alive load: length of each run in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Keep-alive load: persistent connections (over two client threads).
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Keep-alive load with `htstress --keep-alive` even when wrk is installed.
    #[arg(long)]
    no_wrk: bool,
    /// Modes to run, comma-separated, in this order [default: thread,cmwq,kernel,nginx; nginx
    /// only when installed].
    #[arg(long, value_delimiter = ',', value_enum)]
    modes: Vec<ModeName>,
    /// Access logs: none (`off`), every server writing one (`on`: khttpd `--access-log`, nginx
    /// `access_log … combined buffer=64k flush=1s`), or each mode both ways, one after the other
    /// (`both`: what logging costs).
    #[arg(long, value_enum, default_value_t = LogArg::Off)]
    access_log: LogArg,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogArg {
    Off,
    On,
    Both,
}

impl LogArg {
    fn variants(self) -> &'static [bool] {
        match self {
            LogArg::Off => &[false],
            LogArg::On => &[true],
            LogArg::Both => &[false, true],
        }
    }
}

/// A server as measured: its mode, with or without an access log.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Subject {
    mode: ModeName,
    log: bool,
}

impl Subject {
    fn label(self) -> String {
        match self.log {
            true => format!("{}+log", self.mode.label()),
            false => self.mode.label().to_owned(),
        }
    }

    fn description(self) -> String {
        match (self.log, self.mode.khttpd()) {
            (false, _) => self.mode.description(),
            (true, Some(_)) => format!("{} --access-log FILE (combined)", self.mode.description()),
            (true, None) => format!("{}, {NGINX_ACCESS_LOG}", self.mode.description()),
        }
    }
}

/// nginx's access log at its best: buffered, combined (the format khttpd writes by default).
const NGINX_ACCESS_LOG: &str = "access_log FILE combined buffer=64k flush=1s";

/// One way of serving HTTP.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ModeName {
    /// khttpd, one OS thread per connection.
    Thread,
    /// khttpd, one work item per connection on the work queue.
    Cmwq,
    /// khttpd with the kernel fast path required (`--fast-path on`): connections start in the
    /// kernel.
    Kernel,
    /// nginx with a one-line `return 200` location.
    Nginx,
    /// khttpd's default, `--fast-path auto`: connections start in user space (work queue) and
    /// move to the kernel after a keep-alive answer it has learned. Only when asked for.
    Auto,
}

impl ModeName {
    /// What runs without `--modes`.
    const DEFAULT: [Self; 4] = [Self::Thread, Self::Cmwq, Self::Kernel, Self::Nginx];

    fn label(self) -> &'static str {
        match self {
            Self::Thread => "thread",
            Self::Cmwq => "cmwq",
            Self::Kernel => "kernel",
            Self::Nginx => "nginx",
            Self::Auto => "auto",
        }
    }

    /// How the server is run, for the table's notes.
    fn description(self) -> String {
        match self.khttpd() {
            Some(mode) => format!("`khttpd {}`", mode.args().join(" ")),
            None => "nginx, `worker_processes auto`, `return 200`".to_owned(),
        }
    }

    /// khttpd's mode; `None` for nginx.
    fn khttpd(self) -> Option<Mode> {
        match self {
            Self::Thread => Some(Mode::Thread),
            Self::Cmwq => Some(Mode::UserUnbound),
            Self::Kernel => Some(Mode::Kernel),
            Self::Auto => Some(Mode::Auto),
            Self::Nginx => None,
        }
    }
}

/// One kind of load.
#[derive(Clone, Copy)]
enum Load {
    /// htstress, the seed's benchmark: `-c 1`.
    Close,
    /// htstress with `-c <concurrency>`.
    CloseConcurrent,
    /// wrk (or htstress --keep-alive) on persistent connections.
    KeepAlive,
}

const LOADS: [Load; 3] = [Load::Close, Load::CloseConcurrent, Load::KeepAlive];

/// How the load generators are run: the flags and whether wrk is used.
struct Plan<'a> {
    args: &'a Args,
    wrk: bool,
}

impl Plan<'_> {
    fn label(&self, load: Load) -> String {
        let args = self.args;
        match load {
            Load::Close | Load::CloseConcurrent => format!(
                "htstress -c {} -t {}",
                self.htstress_concurrency(load),
                args.threads
            ),
            Load::KeepAlive if self.wrk => format!(
                "wrk -t{KEEP_ALIVE_THREADS} -c{} -d{}s",
                args.connections, args.seconds
            ),
            Load::KeepAlive => format!(
                "htstress --keep-alive -c {} -t {KEEP_ALIVE_THREADS} --duration {}",
                self.keep_alive_per_thread(),
                args.seconds
            ),
        }
    }

    /// htstress's `-c` in the close-per-request loads.
    fn htstress_concurrency(&self, load: Load) -> usize {
        match load {
            Load::Close => 1,
            _ => self.args.concurrency,
        }
    }

    fn keep_alive_per_thread(&self) -> usize {
        self.args.connections.div_ceil(KEEP_ALIVE_THREADS)
    }

    /// One run of `load` against `url`, with the machine's CPU split over it.
    fn run(&self, load: Load, url: &str) -> anyhow::Result<Run> {
        let args = self.args;
        let before = CpuTimes::read()?;
        let counts = match load {
            Load::Close | Load::CloseConcurrent => htstress_counts(&[
                "-n",
                &args.requests.to_string(),
                "-c",
                &self.htstress_concurrency(load).to_string(),
                "-t",
                &args.threads.to_string(),
                url,
            ])?,
            Load::KeepAlive if self.wrk => wrk_counts(args, url)?,
            Load::KeepAlive => htstress_counts(&[
                "--keep-alive",
                "--duration",
                &args.seconds.to_string(),
                "-c",
                &self.keep_alive_per_thread().to_string(),
                "-t",
                &KEEP_ALIVE_THREADS.to_string(),
                url,
            ])?,
        };
        Ok(Run {
            counts,
            cpu: CpuSplit::between(&before, &CpuTimes::read()?),
        })
    }
}

/// One run: the load generator's counts and the machine's CPU over it.
struct Run {
    counts: Counts,
    cpu: CpuSplit,
}

impl Run {
    /// Non-idle CPU-seconds (whole machine) per 100,000 answered requests.
    fn cpu_seconds_per_100k(&self) -> Option<f64> {
        let answered = self.counts.good + self.counts.bad;
        (answered > 0).then(|| self.cpu.busy_seconds / answered as f64 * 100_000.0)
    }
}

/// htstress in this process, quiet, with `flags` (the URL last).
fn htstress_counts(flags: &[&str]) -> anyhow::Result<Counts> {
    let argv = ["htstress", "-q"].iter().chain(flags);
    let args = htstress::Args::try_parse_from(argv).context("bad htstress arguments")?;
    let report = htstress::load(&args)?;
    Ok(Counts {
        req_per_s: report.requests_per_sec(),
        p50_us: report.p50_us.map(f64::from),
        p99_us: report.p99_us.map(f64::from),
        good: report.good,
        bad: report.bad,
        errors: report.socket_errors,
    })
}

/// `wrk -t2 -c<connections> -d<seconds>s --latency`, killed if it overruns.
fn wrk_counts(args: &Args, url: &str) -> anyhow::Result<Counts> {
    wrk(args.connections, args.seconds, url, None)
}

/// A server under test.
enum Target {
    Khttpd(Server),
    Nginx(Nginx),
}

impl Target {
    fn http(&self) -> SocketAddr {
        match self {
            Self::Khttpd(server) => server.http_addr(),
            Self::Nginx(nginx) => nginx.http,
        }
    }

    /// khttpd's `/metrics`; nginx has none.
    fn metrics(&self) -> anyhow::Result<Option<Metrics>> {
        match self {
            Self::Khttpd(server) => server.metrics().map(Some),
            Self::Nginx(_) => Ok(None),
        }
    }

    /// One HTTP/1.0 `GET /` must be answered `200` with the expected body: every mode serves the
    /// same bytes, or the comparison means nothing.
    fn check_hello(&self) -> anyhow::Result<()> {
        let answer = answer_until_close(self.http(), b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
            .context("GET / failed")?;
        ensure!(
            answer.status == 200 && answer.body == HELLO.as_bytes(),
            "GET / was answered with:\n{}\n\n{}",
            answer.head,
            String::from_utf8_lossy(&answer.body)
        );
        Ok(())
    }
}

/// Everything measured for one mode: the runs of each load (in `LOADS` order) and what the
/// server's counters say happened meanwhile.
struct ModeReport {
    subject: Subject,
    loads: Vec<Vec<Run>>,
    notes: Vec<String>,
}

pub fn run(args: &Args, khttpd: &Path) -> anyhow::Result<()> {
    validate(args)?;
    let started = Instant::now();
    let nginx = find_nginx();
    let mut skipped = Vec::new();
    let modes: Vec<ModeName> = if args.modes.is_empty() {
        ModeName::DEFAULT
            .into_iter()
            .filter(|&mode| {
                let missing = mode == ModeName::Nginx && nginx.is_none();
                if missing {
                    skipped.push("nginx: not installed (no /usr/sbin/nginx, none on PATH)");
                }
                !missing
            })
            .collect()
    } else {
        ensure!(
            !args.modes.contains(&ModeName::Nginx) || nginx.is_some(),
            "--modes nginx: nginx is not installed (no /usr/sbin/nginx, none on PATH)"
        );
        args.modes.clone()
    };
    let plan = Plan {
        args,
        wrk: !args.no_wrk && find_on_path("wrk").is_some(),
    };
    if !plan.wrk && !args.no_wrk {
        skipped.push("wrk: not installed, the keep-alive load uses htstress --keep-alive");
    }
    for note in &skipped {
        eprintln!("{note}");
    }

    // A mode that fails is reported in the table and fails the bench at the end, but does not
    // keep the other modes from being measured.
    let subjects = modes.into_iter().flat_map(|mode| {
        args.access_log
            .variants()
            .iter()
            .map(move |&log| Subject { mode, log })
    });
    let mut results: Vec<ModeResult> = subjects
        .map(|subject| {
            let report = ModeReport {
                subject,
                loads: LOADS.iter().map(|_| Vec::new()).collect(),
                notes: Vec::new(),
            };
            (subject, Ok(report))
        })
        .collect();
    for round in 1..=args.reps {
        for (subject, result) in &mut results {
            let Ok(report) = result else { continue };
            match bench_mode(&plan, *subject, round, khttpd, nginx.as_deref()) {
                Ok(one) => {
                    for (runs, run) in report.loads.iter_mut().zip(one.loads) {
                        runs.extend(run);
                    }
                    // The last round's counters and log sizes.
                    report.notes = one.notes;
                }
                Err(error) => {
                    let error = format!("{error:#}").replace('\n', " / ");
                    eprintln!("[{}] failed: {error}", subject.label());
                    *result = Err(error);
                }
            }
        }
    }

    let table = render_table(&plan, &results, &skipped, started.elapsed());
    let reports: Vec<&ModeReport> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    write_results("http", &table, |path| plot(path, &plan, &reports))?;
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, result)| result.is_err())
        .map(|(subject, _)| subject.label())
        .collect();
    ensure!(failed.is_empty(), "failed modes: {}", failed.join(", "));
    Ok(())
}

/// A mode and what measuring it gave: its report, or why it could not be measured.
type ModeResult = (Subject, Result<ModeReport, String>);

fn validate(args: &Args) -> anyhow::Result<()> {
    ensure!(args.reps > 0, "--reps must be at least 1");
    ensure!(args.requests > 0, "-n must be at least 1");
    ensure!(args.threads > 0, "--threads must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    ensure!(args.seconds > 0, "--seconds must be at least 1");
    ensure!(
        args.connections >= KEEP_ALIVE_THREADS,
        "--connections must be at least {KEEP_ALIVE_THREADS} (one per client thread)"
    );
    Ok(())
}

/// One round of `subject`: a server of its own, each load once.
fn bench_mode(
    plan: &Plan,
    subject: Subject,
    round: usize,
    khttpd: &Path,
    nginx: Option<&Path>,
) -> anyhow::Result<ModeReport> {
    let progress = |what: &str| eprintln!("[{}] {what}", subject.label());
    progress("starting the server");
    // The log's folder outlives the server (declared first, dropped last).
    let logs = temp_dir("bench-http-log")?;
    let log = logs.path().join("access.log");
    let target = match (subject.mode.khttpd(), nginx) {
        (Some(khttpd_mode), _) => {
            let log = log.to_str().context("a temporary path that is not UTF-8")?;
            let flags: &[&str] = match subject.log {
                true => &["--access-log", log],
                false => &[],
            };
            Target::Khttpd(Server::start(khttpd, khttpd_mode, flags)?)
        }
        (None, Some(nginx)) => {
            let location = match subject.log {
                true => format!(
                    "{HELLO_LOCATION}\n            {};",
                    NGINX_ACCESS_LOG.replace("FILE", &log.display().to_string())
                ),
                false => HELLO_LOCATION.to_owned(),
            };
            Target::Nginx(Nginx::start(nginx, "", &location)?)
        }
        (None, None) => unreachable!("nginx mode without nginx"),
    };
    target.check_hello()?;
    let url = format!("http://{}/", target.http());
    let before = target.metrics()?;

    let reps = plan.args.reps;
    let mut loads = Vec::with_capacity(LOADS.len());
    for load in LOADS {
        let label = plan.label(load);
        let run = plan
            .run(load, &url)
            .with_context(|| format!("{label}, round {round}"))?;
        let c = &run.counts;
        progress(&format!(
            "{label} {round}/{reps}: {} req/s, good {} bad {} errors {}",
            thousands(c.req_per_s),
            c.good,
            c.bad,
            c.errors
        ));
        loads.push(vec![run]);
    }

    let mut notes = match (&target, before, target.metrics()?) {
        (Target::Khttpd(_), Some(before), Some(after)) => http_counter_deltas(&before, &after),
        (Target::Nginx(nginx), ..) => {
            let log = nginx.error_log();
            vec![if log.trim().is_empty() {
                "error log empty".to_owned()
            } else {
                format!("error log: {}", log.trim().replace('\n', " / "))
            }]
        }
        _ => Vec::new(),
    };
    progress("stopping the server");
    drop(target);
    if subject.log {
        let bytes = std::fs::metadata(&log).map_or(0, |m| m.len());
        notes.push(format!("access log {} bytes", thousands(bytes as f64)));
    }
    Ok(ModeReport {
        subject,
        loads,
        notes,
    })
}

/// Whether the kernel path was on, and how every `khttpd_http_*_total` series grew during the
/// loads: who answered, by khttpd's own count (a kernel HTTP path adds its counters here).
fn http_counter_deltas(before: &Metrics, after: &Metrics) -> Vec<String> {
    let mut notes: Vec<String> = after
        .samples()
        .filter(|(series, _)| series.starts_with("khttpd_fast_path_enabled"))
        .map(|(series, value)| format!("{series} {value}"))
        .collect();
    for (series, value) in after.samples() {
        let name = series.split('{').next().unwrap_or(series);
        if name.starts_with("khttpd_http_") && name.ends_with("_total") {
            let old = before
                .samples()
                .find_map(|(s, v)| (s == series).then_some(v))
                .unwrap_or(0);
            notes.push(format!(
                "{series} +{}",
                thousands(value.saturating_sub(old) as f64)
            ));
        }
    }
    notes
}

fn median_of(runs: &[Run], value: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    median(runs.iter().map(value))
}

fn render_table(
    plan: &Plan,
    results: &[ModeResult],
    skipped: &[&str],
    elapsed: Duration,
) -> String {
    let args = plan.args;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| mode | load | req/s | p50 µs | p99 µs | CPU user/sys/softirq/idle % | CPU-s per 100k req | good | bad | errors |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---|---:|---:|---:|---:|");
    for (subject, result) in results {
        let Ok(report) = result else {
            let _ = writeln!(
                out,
                "| {} | **failed** (see below) | – | – | – | – | – | – | – | – |",
                subject.label()
            );
            continue;
        };
        for (load, runs) in LOADS.iter().zip(&report.loads) {
            let m = |value: fn(&Run) -> Option<f64>| median_of(runs, value);
            let cpu = [
                m(|r| Some(r.cpu.user)),
                m(|r| Some(r.cpu.system)),
                m(|r| Some(r.cpu.softirq)),
                m(|r| Some(r.cpu.idle)),
            ]
            .map(|share| or_dash(share, |v| format!("{v:.0}")));
            let total = |count: fn(&Counts) -> u64| runs.iter().map(|r| count(&r.counts)).sum();
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                report.subject.label(),
                plan.label(*load),
                or_dash(m(|r| Some(r.counts.req_per_s)), thousands),
                or_dash(m(|r| r.counts.p50_us), thousands),
                or_dash(m(|r| r.counts.p99_us), thousands),
                cpu.join("/"),
                or_dash(m(Run::cpu_seconds_per_100k), |v| format!("{v:.2}")),
                thousands(total(|c| c.good) as f64),
                flagged(total(|c| c.bad)),
                flagged(total(|c| c.errors)),
            );
        }
    }

    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let _ = writeln!(
        out,
        "\nMedians of {} runs per row; good/bad/errors are totals over the runs (errors: socket \
         errors — refused, reset, timed out or truncated). htstress loads: -n {} per run, a new \
         HTTP/1.0 connection per request. Keep-alive: {} s per run, {} persistent connections. \
         p50/p99: per request, from connect (htstress) or send (keep-alive) to the response's end. \
         CPU: the whole machine ({cores} CPUs) over each run, load generator included; \
         CPU-s per 100k req = non-idle CPU time / answered requests × 100,000. \
         Total time {:.0} s.",
        args.reps,
        thousands(args.requests as f64),
        args.seconds,
        args.connections,
        elapsed.as_secs_f64(),
    );
    for (subject, _) in results {
        let _ = writeln!(out, "- {}: {}", subject.label(), subject.description());
    }
    for note in skipped {
        let _ = writeln!(out, "- skipped {note}");
    }
    for (subject, result) in results {
        let report = match result {
            Ok(report) => report,
            Err(error) => {
                let _ = writeln!(out, "- **{} failed**: {error}", subject.label());
                continue;
            }
        };
        for (load, runs) in LOADS.iter().zip(&report.loads) {
            let each: Vec<String> = runs.iter().map(|r| thousands(r.counts.req_per_s)).collect();
            let _ = writeln!(
                out,
                "- {}, {}: req/s per run {}",
                report.subject.label(),
                plan.label(*load),
                each.join(" / ")
            );
        }
        if !report.notes.is_empty() {
            let _ = writeln!(
                out,
                "- {}: {}",
                report.subject.label(),
                report.notes.join("; ")
            );
        }
    }
    out
}

/// Two grouped bar charts side by side, one group per load and one bar per mode: the median
/// requests/s, and the median CPU-seconds per 100k requests.
fn plot(path: &Path, plan: &Plan, reports: &[&ModeReport]) -> anyhow::Result<()> {
    let with_text = register_font();
    let root = BitMapBackend::new(path, (1600, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(800);
    let groups: Vec<String> = LOADS.iter().map(|&load| plan.label(load)).collect();
    let series = |value: fn(&Run) -> Option<f64>| -> Vec<(String, Vec<f64>)> {
        reports
            .iter()
            .map(|report| {
                let values = report
                    .loads
                    .iter()
                    .map(|runs| median_of(runs, value).unwrap_or(0.0))
                    .collect();
                (report.subject.label(), values)
            })
            .collect()
    };
    // Short enough to sit above a bar: 19.5k, 340k.
    let thousands_label = |v: f64| match v {
        v if v >= 100_000.0 => format!("{:.0}k", v / 1000.0),
        v if v >= 1000.0 => format!("{:.1}k", v / 1000.0),
        v => format!("{v:.0}"),
    };
    GroupedBars {
        caption: "HTTP requests/s (median; higher is better)",
        y_desc: "requests/s",
        groups: &groups,
        series: &series(|r| Some(r.counts.req_per_s)),
        value_label: &thousands_label,
    }
    .draw(&left, with_text)?;
    GroupedBars {
        caption: "CPU-seconds per 100k requests (whole machine; lower is better)",
        y_desc: "CPU-s per 100k requests",
        groups: &groups,
        series: &series(Run::cpu_seconds_per_100k),
        value_label: &|v| format!("{v:.2}"),
    }
    .draw(&right, with_text)?;
    root.present()?;
    Ok(())
}
