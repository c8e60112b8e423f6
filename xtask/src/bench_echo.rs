//! `cargo xtask bench echo`: does answering in the kernel pay off against the user-space echo?
//!
//! Why: khttpd's claim is that a sockmap stream verdict echoing inside the kernel beats reading and
//! writing every byte from user space. That holds only if the numbers say so, measured the same way
//! for every mode, against the same binary, on the same machine, in one run.
//!
//! Method: for each mode (kernel fast path; user space on the unbound work queue; user space on the
//! bound, per-CPU work queue) this starts its own `khttpd` on free ports, waits until the echo port
//! accepts and `/metrics` answers, then measures:
//! 1. Latency, as kecho's `bench` does: N clients, each on its own connection, are released together
//!    by a barrier, send one message and time the full echo. Repeated for R rounds (new connections
//!    each round); the per-slot average (slot = client index) is plotted like kecho's `bench.txt`,
//!    p50/p99 are over all N × R samples.
//! 2. Throughput: C connections ping-pong fixed-size messages for S seconds, driven by a tokio runtime
//!    with one worker per core, so the load generator is not the bottleneck it can avoid being.
//! 3. The CPU split of the whole machine (`/proc/stat`) during the throughput run — the load
//!    generator shares the machine, so this says where time goes, not what the server alone costs.
//! 4. Memory: the server's VmRSS with many idle connections open, and the change of the kernel's
//!    Slab (`/proc/meminfo`), which counts the sockets of both ends of each loopback connection.
//!
//! `/metrics` before and after the throughput run tells who answered (kernel vs user-space bytes).
//! Results go to stdout as a markdown table, to `target/bench/echo.md`, and as a per-slot latency
//! plot to `target/bench/echo.png`. Every wait is bounded, so a stuck server fails the bench instead
//! of hanging it, and each server is stopped (SIGTERM, then waited for) even when a phase fails.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context as _};
use plotters::prelude::*;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    runtime::Runtime,
    sync::{Barrier, Semaphore},
    task::JoinSet,
};

use khttpd_harness::{system, Metrics, Mode, Server, IO_TIMEOUT};

use crate::bench::{percentile, register_font, write_results, CpuSplit, CpuTimes, PALETTE};

#[derive(clap::Args)]
pub struct Args {
    /// Latency: concurrent clients per round, each with its own connection.
    #[arg(long, default_value_t = 500)]
    clients: usize,
    /// Latency: rounds (each with new connections).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Throughput: connections doing ping-pong at once.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Throughput: length of the run in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Memory: idle connections held open while the server's RSS is read.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Bytes per message, in the latency and the throughput runs.
    #[arg(long, default_value_t = 64)]
    message_size: usize,
    /// The khttpd binary to measure (default: build the release one).
    #[arg(long)]
    pub khttpd: Option<std::path::PathBuf>,
}

/// The ways of running the server, in the order they run.
const MODES: [Mode; 3] = [Mode::Kernel, Mode::UserUnbound, Mode::UserBound];

/// Connects in flight at once, well under the server's listen backlog: an overflowing backlog drops
/// SYNs, and each drop costs a one-second retransmit that would pollute the measurement.
const CONNECT_CONCURRENCY: usize = 256;
/// How long idle connections sit before memory is read, so lazily allocated state is in place.
const SETTLE: Duration = Duration::from_secs(1);
/// File descriptors the bench needs besides its connections (runtime, scrapes, stdio).
const FD_HEADROOM: usize = 64;
const KIB_PER_MIB: f64 = 1024.0;

pub fn run(args: &Args, khttpd: &Path) -> anyhow::Result<()> {
    validate(args)?;
    let needed = args
        .idle_connections
        .max(args.clients)
        .max(args.connections)
        + FD_HEADROOM;
    system::raise_fd_limit(needed as u64).context("lower --idle-connections")?;
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_io()
        .enable_time()
        .build()
        .context("cannot start the load generator's runtime")?;

    let mut reports = Vec::with_capacity(MODES.len());
    for mode in MODES {
        let report = bench_mode(&runtime, args, khttpd, mode)
            .with_context(|| format!("{} mode", mode.label()))?;
        reports.push(report);
    }

    let table = render_table(args, &reports);
    write_results("echo", &table, |path| plot(path, args, &reports))?;
    Ok(())
}

fn validate(args: &Args) -> anyhow::Result<()> {
    ensure!(args.clients > 0, "--clients must be at least 1");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(args.seconds > 0, "--seconds must be at least 1");
    ensure!(args.message_size > 0, "--message-size must be at least 1");
    Ok(())
}

/// Everything measured for one mode.
struct ModeReport {
    mode: &'static str,
    latency: Latency,
    req_per_s: f64,
    cpu: CpuSplit,
    idle_rss_mib: f64,
    slab_delta_mib: f64,
    echoed: EchoedBytes,
}

fn bench_mode(
    runtime: &Runtime,
    args: &Args,
    khttpd: &Path,
    mode: Mode,
) -> anyhow::Result<ModeReport> {
    let progress = |phase: &str| eprintln!("[{}] {phase}", mode.label());
    progress("starting the server");
    let server = Server::start(khttpd, mode, &[])?;
    let message: Arc<[u8]> = dummy_message(args.message_size).into();

    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        progress(&format!("latency round {round}/{}", args.rounds));
        let samples =
            runtime.block_on(latency_round(server.echo_addr(), args.clients, &message))?;
        rounds.push(samples);
    }
    let latency = Latency::from_rounds(&rounds);

    progress(&format!(
        "throughput: {} connections for {} s",
        args.connections, args.seconds
    ));
    let streams = runtime.block_on(connect_all(server.echo_addr(), args.connections))?;
    let metrics_before = server.metrics()?;
    let cpu_before = CpuTimes::read()?;
    let duration = Duration::from_secs(args.seconds);
    let (messages, elapsed) = runtime.block_on(ping_pong(streams, duration, &message))?;
    let cpu = CpuSplit::between(&cpu_before, &CpuTimes::read()?);
    let echoed = EchoedBytes::between(&metrics_before, &server.metrics()?)?;

    progress(&format!(
        "memory: {} idle connections",
        args.idle_connections
    ));
    let (idle_rss_kib, slab_delta_kib) = idle_memory(runtime, &server, args.idle_connections)?;

    progress("stopping the server");
    drop(server);
    Ok(ModeReport {
        mode: mode.label(),
        latency,
        req_per_s: messages as f64 / elapsed.as_secs_f64(),
        cpu,
        idle_rss_mib: idle_rss_kib as f64 / KIB_PER_MIB,
        slab_delta_mib: slab_delta_kib as f64 / KIB_PER_MIB,
        echoed,
    })
}

/// kecho's bench sends "dummy message"; this repeats it to the requested size.
pub(crate) fn dummy_message(size: usize) -> Vec<u8> {
    b"dummy message "
        .iter()
        .copied()
        .cycle()
        .take(size)
        .collect()
}

/// Bytes echoed during the throughput run, by who echoed them.
struct EchoedBytes {
    /// `None` when the server has no kernel path.
    kernel: Option<u64>,
    user: u64,
}

impl EchoedBytes {
    fn between(before: &Metrics, after: &Metrics) -> anyhow::Result<Self> {
        let delta = |name| Some(after.sum(name)?.saturating_sub(before.sum(name)?));
        Ok(Self {
            kernel: delta("khttpd_echo_kernel_bytes_total"),
            user: delta("khttpd_echo_user_bytes_total")
                .context("/metrics has no khttpd_echo_user_bytes_total")?,
        })
    }
}

/// Opens `count` connections to `addr`, a bounded number at a time, in the order they were asked for.
pub(crate) async fn connect_all(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<TcpStream>> {
    let in_flight = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = JoinSet::new();
    for index in 0..count {
        let in_flight = Arc::clone(&in_flight);
        tasks.spawn(async move {
            let _permit = in_flight.acquire_owned().await?;
            let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
                .await
                .map_err(|_| anyhow!("connect to {addr} timed out"))?
                .with_context(|| format!("cannot connect to {addr}"))?;
            // Each message is written whole; waiting to coalesce would only add latency.
            stream.set_nodelay(true)?;
            anyhow::Ok((index, stream))
        });
    }
    let mut streams: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (index, stream) = joined??;
        streams[index] = Some(stream);
    }
    Ok(streams.into_iter().flatten().collect())
}

/// Sends `message` and waits for all of it to come back unchanged.
async fn round_trip(
    stream: &mut TcpStream,
    message: &[u8],
    reply: &mut [u8],
) -> anyhow::Result<()> {
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(message).await?;
        stream.read_exact(reply).await
    })
    .await
    .map_err(|_| anyhow!("no echo within {IO_TIMEOUT:?}"))?
    .context("echo failed")?;
    ensure!(reply == message, "the echo differs from the message");
    Ok(())
}

/// One kecho-style round: every client connects, all are released at once, each times one echo.
/// Returns the latency per slot (client index).
async fn latency_round(
    echo: SocketAddr,
    clients: usize,
    message: &Arc<[u8]>,
) -> anyhow::Result<Vec<Duration>> {
    // Connecting before the barrier means no client can fail before it and leave the others waiting.
    let streams = connect_all(echo, clients).await?;
    let start_together = Arc::new(Barrier::new(clients));
    let mut tasks = JoinSet::new();
    for (slot, mut stream) in streams.into_iter().enumerate() {
        let start_together = Arc::clone(&start_together);
        let message = Arc::clone(message);
        tasks.spawn(async move {
            let mut reply = vec![0; message.len()];
            start_together.wait().await;
            let start = Instant::now();
            round_trip(&mut stream, &message, &mut reply).await?;
            anyhow::Ok((slot, start.elapsed()))
        });
    }
    let mut latencies = vec![Duration::ZERO; clients];
    while let Some(joined) = tasks.join_next().await {
        let (slot, latency) = joined??;
        latencies[slot] = latency;
    }
    Ok(latencies)
}

/// Every stream echoes `message` back and forth until `duration` is over.
/// Returns the messages echoed and the time it took.
pub(crate) async fn ping_pong(
    streams: Vec<TcpStream>,
    duration: Duration,
    message: &Arc<[u8]>,
) -> anyhow::Result<(u64, Duration)> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for mut stream in streams {
        let message = Arc::clone(message);
        tasks.spawn(async move {
            let mut reply = vec![0; message.len()];
            let mut echoed = 0u64;
            while Instant::now() < deadline {
                round_trip(&mut stream, &message, &mut reply).await?;
                echoed += 1;
            }
            anyhow::Ok(echoed)
        });
    }
    let mut total = 0;
    while let Some(joined) = tasks.join_next().await {
        total += joined??;
    }
    Ok((total, start.elapsed()))
}

/// Holds `count` idle connections open and returns the server's VmRSS (KiB) and the growth of the
/// kernel's Slab (KiB) meanwhile.
fn idle_memory(runtime: &Runtime, server: &Server, count: usize) -> anyhow::Result<(u64, i64)> {
    let slab_before = system::meminfo_kib("Slab")?;
    let accepted_before = accepted(server)?;
    let idle = runtime.block_on(connect_all(server.echo_addr(), count))?;
    wait_accepted(server, accepted_before + count as u64)?;
    thread::sleep(SETTLE);
    let rss = server.vm_rss_kib()?;
    let slab_delta = system::meminfo_kib("Slab")? as i64 - slab_before as i64;
    drop(idle);
    Ok((rss, slab_delta))
}

/// Connections the server has accepted so far, on either path.
fn accepted(server: &Server) -> anyhow::Result<u64> {
    server
        .metrics()?
        .sum("khttpd_echo_connections_total")
        .context("/metrics has no khttpd_echo_connections_total")
}

/// Waits until the server has accepted `target` connections, so its RSS covers all of them.
fn wait_accepted(server: &Server, target: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let now = accepted(server)?;
        if now >= target {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the server accepted only {now} of {target} connections within {IO_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Latency summary over all rounds.
struct Latency {
    /// Average over the rounds, per client slot, in µs.
    per_slot_avg_us: Vec<f64>,
    p50_us: f64,
    p99_us: f64,
}

impl Latency {
    fn from_rounds(rounds: &[Vec<Duration>]) -> Self {
        let micros = |d: &Duration| d.as_secs_f64() * 1e6;
        let slots = rounds.first().map_or(0, Vec::len);
        let per_slot_avg_us = (0..slots)
            .map(|slot| {
                rounds.iter().map(|round| micros(&round[slot])).sum::<f64>() / rounds.len() as f64
            })
            .collect();
        let mut all: Vec<f64> = rounds.iter().flatten().map(micros).collect();
        all.sort_by(f64::total_cmp);
        Self {
            per_slot_avg_us,
            p50_us: percentile(&all, 0.50),
            p99_us: percentile(&all, 0.99),
        }
    }
}

fn render_table(args: &Args, reports: &[ModeReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| mode | req/s | p50 µs | p99 µs | CPU user/sys/softirq/idle % | RSS at {} idle conns (MiB) | slab delta (MiB) |",
        args.idle_connections
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---|---:|---:|");
    for r in reports {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0}/{:.0}/{:.0}/{:.0} | {:.1} | {:.1} |",
            r.mode,
            r.req_per_s,
            r.latency.p50_us,
            r.latency.p99_us,
            r.cpu.user,
            r.cpu.system,
            r.cpu.softirq,
            r.cpu.idle,
            r.idle_rss_mib,
            r.slab_delta_mib,
        );
    }
    let _ = writeln!(
        out,
        "\nLatency: {} concurrent clients × {} rounds, one {}-byte message each. Throughput: {} connections \
         ping-pong {}-byte messages for {} s. CPU: whole machine during the throughput run, load generator \
         included. Slab delta: both ends of each loopback connection.",
        args.clients, args.rounds, args.message_size, args.connections, args.message_size, args.seconds
    );
    for r in reports {
        let kernel = r
            .echoed
            .kernel
            .map_or("no kernel path".to_owned(), |b| format!("kernel {b} B"));
        let _ = writeln!(
            out,
            "- {}: bytes echoed during the throughput run: {kernel}, user space {} B",
            r.mode, r.echoed.user
        );
    }
    out
}

/// Per-slot average latency, one line per mode, like kecho's `bench.txt` plot.
fn plot(path: &Path, args: &Args, reports: &[ModeReport]) -> anyhow::Result<()> {
    let with_text = register_font();
    let root = BitMapBackend::new(path, (1280, 720)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_us = reports
        .iter()
        .flat_map(|r| r.latency.per_slot_avg_us.iter().copied())
        .fold(1.0, f64::max);

    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    // Axes and their labels live in the label areas: without a font there are none, so no text.
    if with_text {
        builder
            .caption(plot_title(args, reports), ("sans-serif", 20))
            .x_label_area_size(50)
            .y_label_area_size(80);
    }
    let last_slot = (args.clients - 1).max(1);
    let mut chart = builder.build_cartesian_2d(0..last_slot, 0.0..max_us * 1.1)?;
    chart
        .configure_mesh()
        .x_desc("client slot")
        .y_desc("average latency (µs)")
        .y_label_formatter(&|us| format!("{us:.0}"))
        .draw()?;

    for (report, &color) in reports.iter().zip(&PALETTE) {
        let points = report.latency.per_slot_avg_us.iter().copied().enumerate();
        let series = chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
        if with_text {
            series.label(report.mode).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if with_text {
        crate::bench::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    }
    root.present()?;
    Ok(())
}

fn plot_title(args: &Args, reports: &[ModeReport]) -> String {
    let throughput: Vec<String> = reports
        .iter()
        .map(|r| format!("{} {:.0}", r.mode, r.req_per_s))
        .collect();
    format!(
        "Echo latency per slot ({} clients × {} rounds) — req/s: {}",
        args.clients,
        args.rounds,
        throughput.join(", ")
    )
}
