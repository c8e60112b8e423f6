//! `cargo xtask bench memory`: how much memory the server needs to hold many keep-alive
//! connections, with the fast path on, auto and off.
//!
//! For each mode and each count N (10,000 and 50,000 by default) this starts its own server
//! (`--max-connections` N + 1,024) with this process's original file-descriptor limit, so the
//! server has to raise its own limit as a real deployment would; then raises this process's limit
//! (soft and hard: root may go up to `/proc/sys/fs/nr_open`) to hold its end of N connections.
//! It opens N connections, each sending `GET / HTTP/1.1` and reading the whole answer
//! (`--requests-per-connection` times: `auto` moves a connection into the kernel after 32 answers
//! the kernel could send, so with the default of 1 `auto` holds them in user space), and keeps them
//! open. One source address on loopback has only ~28k ephemeral ports per destination, so the
//! client sockets are bound to 127.0.0.2, 127.0.0.3, … (5,000 each; all of 127/8 is on `lo`) with
//! IP_BIND_ADDRESS_NO_PORT (the port is chosen at connect, per 4-tuple). The client is one tokio
//! thread with non-blocking sockets, a bounded number of connects in flight.
//!
//! With the connections held (after `--settle-seconds`), it reads the server's `VmRSS`, its open
//! fds, the entries of its `HTTP_SOCKETS` sockhash, the kernel's TCP memory (`/proc/net/sockstat`
//! `mem`, pages; machine-wide, both ends of every loopback connection), the change of `Slab`
//! (`/proc/meminfo`) and the `memlock` of the server's BPF maps (`/proc/<pid>/fdinfo`). Then one
//! more request goes out on every connection (every one must be answered 200), `VmHWM` (the
//! server's peak RSS over its life) is read, and every connection is closed; the server must be
//! back to 0 open connections within 30 s. Output: `target/bench/memory.md` and `memory.png`.
//!
//! A count this process cannot hold its end of — the hard RLIMIT_NOFILE is lower and it lacks
//! CAP_SYS_RESOURCE to raise it (some containers drop it even for root) — is a "not run" row with
//! the reason, not a failure; a server that cannot raise its own limit says so in a warning (and
//! its "server fd limit" column shows it).

use std::{
    fmt::Write as _,
    fs, io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use plotters::prelude::*;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
    task::JoinSet,
};

use khttpd_harness::{bpf, system, Server};

use crate::{
    bench::{register_font, thousands, write_results, GroupedBars},
    htstress::with_timeout,
    soak::FastPath,
};

#[derive(clap::Args)]
pub struct Args {
    /// Keep-alive connections to hold, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000")]
    connections: Vec<usize>,
    /// Fast-path modes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "on,auto,off")]
    modes: Vec<FastPath>,
    /// Requests on each connection before it is held (auto moves a connection into the kernel
    /// after 32 answers the kernel could send).
    #[arg(long, default_value_t = 1)]
    requests_per_connection: usize,
    /// Connections being opened (or asked their second request) at once.
    #[arg(long, default_value_t = 512)]
    in_flight: usize,
    /// How long the connections sit open before memory is read.
    #[arg(long, default_value_t = 2)]
    settle_seconds: u64,
    /// The khttpd binary to measure (default: build the release one).
    #[arg(long)]
    pub khttpd: Option<std::path::PathBuf>,
}

/// `--max-connections` is N plus this (so none of the N gets a 503).
const MAX_CONNECTIONS_SLACK: usize = 1024;
/// Descriptors the client needs beyond one per connection.
const CLIENT_FD_SLACK: usize = 256;
/// Connections per client source address: well under the ~28k ephemeral ports per destination,
/// since the kernel's search for a free port slows down as the range fills (19,000 connections
/// from one address took 10 s to open, against 0.5 s for 10,000).
const PER_SOURCE: usize = 5_000;
/// How long the server may take to close every connection after the client closed them.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
const MIB: f64 = 1024.0 * 1024.0;

/// What one mode and count measured.
struct Case {
    mode: FastPath,
    connections: usize,
    result: Outcome,
}

enum Outcome {
    Measured(Measured),
    Failed(anyhow::Error),
    /// Not possible on this machine (the reason).
    Skipped(String),
}

struct Measured {
    /// The server's soft RLIMIT_NOFILE after it started (`/proc/<pid>/limits`).
    server_fd_limit: String,
    rss_start_kib: u64,
    rss_held_kib: u64,
    hwm_kib: u64,
    fds: u64,
    in_kernel: u64,
    tcp_mem_bytes: u64,
    tcp_mem_delta_bytes: i64,
    slab_delta_kib: i64,
    bpf_memlock: u64,
    second_answered: usize,
    closed_in: Duration,
    open_seconds: f64,
}

pub fn run(args: &Args, khttpd: &Path) -> anyhow::Result<()> {
    ensure!(
        !args.connections.is_empty()
            && !args.modes.is_empty()
            && args.connections.iter().all(|&n| n > 0)
            && args.in_flight > 0
            && args.requests_per_connection > 0,
        "--connections, --modes, --in-flight and --requests-per-connection must not be zero or empty"
    );
    ensure!(
        crate::is_root(),
        "bench memory loads BPF programs and raises the hard fd limit: run it as root"
    );
    let started = Instant::now();
    let original = system::fd_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut cases = Vec::new();
    for &mode in &args.modes {
        for &connections in &args.connections {
            eprintln!("[{} / {connections}]", mode.as_str());
            let result = if let Err(reason) = can_reach(original, connections + CLIENT_FD_SLACK) {
                eprintln!("[{} / {connections}] skipped: {reason}", mode.as_str());
                Outcome::Skipped(reason)
            } else {
                match measure(args, khttpd, &runtime, original, mode, connections) {
                    Ok(measured) => Outcome::Measured(measured),
                    Err(error) => {
                        eprintln!("[{} / {connections}] failed: {error:#}", mode.as_str());
                        Outcome::Failed(error)
                    }
                }
            };
            cases.push(Case {
                mode,
                connections,
                result,
            });
        }
    }
    // Give the shell's limit back (children started later inherit it).
    let _ = system::set_fd_limit(original.0, original.1);
    let table = render(args, &cases, &original, started.elapsed());
    write_results("memory", &table, |path| plot(path, args, &cases))?;
    let failed = cases
        .iter()
        .filter(|case| matches!(case.result, Outcome::Failed(_)))
        .count();
    if failed > 0 {
        bail!("{failed} of {} cases failed (see the table)", cases.len());
    }
    Ok(())
}

fn measure(
    args: &Args,
    khttpd: &Path,
    runtime: &tokio::runtime::Runtime,
    original: (u64, u64),
    mode: FastPath,
    connections: usize,
) -> anyhow::Result<Measured> {
    // The server inherits this process's limit: the original one, as from the shell.
    system::set_fd_limit(original.0, original.1).context("cannot restore the original fd limit")?;
    let max_connections = (connections + MAX_CONNECTIONS_SLACK).to_string();
    let server = Server::start(
        khttpd,
        mode.mode(),
        &["--max-connections", &max_connections],
    )?;
    let pid = server.pid();
    let server_fd_limit = fd_limit_of(pid)?;
    system::raise_fd_limit((connections + CLIENT_FD_SLACK) as u64)?;

    let rss_start_kib = server.vm_rss_kib()?;
    let (tcp_before, slab_before) = (tcp_mem_bytes()?, system::meminfo_kib("Slab")?);
    let opening = Instant::now();
    let streams = runtime.block_on(open_all(args, server.http_addr(), connections))?;
    let open_seconds = opening.elapsed().as_secs_f64();
    let open = open_connections(&server)?;
    ensure!(
        open == connections as u64,
        "the server counts {open} open connections, the client holds {connections}"
    );
    thread::sleep(Duration::from_secs(args.settle_seconds));

    let rss_held_kib = server.vm_rss_kib()?;
    let fds = server.fd_count()? as u64;
    let maps = bpf::maps_of(pid)?;
    let bpf_memlock = maps.iter().map(|map| map.memlock).sum();
    let sockets = khttpd_common::http::SOCKETS_MAP;
    let in_kernel = match bpf::find(&maps, sockets) {
        Ok(map) => map.entries()? as u64,
        Err(_) => 0,
    };
    let tcp_mem_bytes = tcp_mem_bytes()?;
    let slab_delta_kib = system::meminfo_kib("Slab")? as i64 - slab_before as i64;

    let (streams, second_answered) = runtime.block_on(ask_again(args, streams))?;
    ensure!(
        second_answered == connections,
        "only {second_answered} of {connections} connections answered their second request"
    );
    let hwm_kib = system::status_kib(pid, "VmHWM")?;

    let closing = Instant::now();
    drop(streams);
    loop {
        let open = open_connections(&server)?;
        if open == 0 {
            break;
        }
        if closing.elapsed() > CLOSE_TIMEOUT {
            bail!("{open} connections still open {CLOSE_TIMEOUT:?} after the client closed all");
        }
        thread::sleep(Duration::from_millis(100));
    }
    let closed_in = closing.elapsed();
    drop(server);
    Ok(Measured {
        server_fd_limit,
        rss_start_kib,
        rss_held_kib,
        hwm_kib,
        fds,
        in_kernel,
        tcp_mem_bytes,
        tcp_mem_delta_bytes: tcp_mem_bytes as i64 - tcp_before as i64,
        slab_delta_kib,
        bpf_memlock,
        second_answered,
        closed_in,
        open_seconds,
    })
}

fn open_connections(server: &Server) -> anyhow::Result<u64> {
    server.metrics()?.value("khttpd_http_open_connections")
}

/// The soft "Max open files" of a process, as `/proc/<pid>/limits` shows it.
fn fd_limit_of(pid: u32) -> anyhow::Result<String> {
    let path = format!("/proc/{pid}/limits");
    let limits = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .with_context(|| format!("no Max open files in {path}"))
}

/// The kernel's TCP memory (all sockets of the machine), from `/proc/net/sockstat`.
fn tcp_mem_bytes() -> anyhow::Result<u64> {
    let sockstat = fs::read_to_string("/proc/net/sockstat").context("cannot read sockstat")?;
    let pages: u64 = sockstat
        .lines()
        .find_map(|line| line.strip_prefix("TCP:"))
        .and_then(|fields| {
            let fields: Vec<&str> = fields.split_whitespace().collect();
            let at = fields.iter().position(|&field| field == "mem")?;
            fields.get(at + 1)?.parse().ok()
        })
        .context("no TCP mem in /proc/net/sockstat")?;
    Ok(pages * system::page_size())
}

/// Whether this process can raise its fd limit to `needed` (trying it, then restoring
/// `original`); the reason when it cannot.
fn can_reach(original: (u64, u64), needed: usize) -> Result<(), String> {
    let result = system::raise_fd_limit(needed as u64).map_err(|error| format!("{error:#}"));
    let _ = system::set_fd_limit(original.0, original.1);
    result
}

/// The source address of connection `index`: 127.0.0.2 for the first `PER_SOURCE`, then .3, …
fn source(index: usize) -> Ipv4Addr {
    let host = u32::try_from(2 + index / PER_SOURCE).expect("few sources");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 0)) + host)
}

/// Opens `count` connections, each answered `--requests-per-connection` times.
async fn open_all(args: &Args, server: SocketAddr, count: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut tasks = JoinSet::new();
    let mut streams = Vec::with_capacity(count);
    let mut started = 0;
    let requests = args.requests_per_connection;
    while streams.len() < count {
        while started < count && tasks.len() < args.in_flight {
            let from = source(started);
            tasks.spawn(async move {
                let mut stream = connect_from(from, server)
                    .await
                    .with_context(|| format!("connect from {from} to {server}"))?;
                let mut buffer = Vec::new();
                for _ in 0..requests {
                    exchange(&mut stream, &mut buffer).await?;
                }
                anyhow::Ok(stream)
            });
            started += 1;
        }
        let done = tasks.join_next().await.expect("tasks in flight")?;
        streams.push(done.with_context(|| {
            format!("connection {} of {count}", streams.len() + tasks.len() + 1)
        })?);
    }
    Ok(streams)
}

/// A connection from `from` (port chosen at connect time) to `to`.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )?;
    socket.bind(SocketAddr::V4(SocketAddrV4::new(from, 0)))?;
    with_timeout(socket.connect(to)).await
}

/// Sends one more request on every connection; returns them and how many were answered.
async fn ask_again(
    args: &Args,
    streams: Vec<TcpStream>,
) -> anyhow::Result<(Vec<TcpStream>, usize)> {
    let count = streams.len();
    let mut pending = streams.into_iter();
    let mut tasks = JoinSet::new();
    let mut kept = Vec::with_capacity(count);
    let mut errors = Vec::new();
    loop {
        while tasks.len() < args.in_flight {
            let Some(mut stream) = pending.next() else {
                break;
            };
            tasks.spawn(async move {
                let mut buffer = Vec::new();
                exchange(&mut stream, &mut buffer).await.map(|()| stream)
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        match done? {
            Ok(stream) => kept.push(stream),
            Err(error) => errors.push(error),
        }
    }
    if let Some(first) = errors.first() {
        eprintln!(
            "{} of {count} second requests failed; the first: {first:#}",
            errors.len()
        );
    }
    let answered = kept.len();
    Ok((kept, answered))
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench-memory\r\n\r\n";

/// One request and its whole answer, which must be a 200 that keeps the connection open.
async fn exchange(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
    with_timeout(stream.write_all(REQUEST)).await?;
    buffer.clear();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = response.parse(buffer)? {
            ensure!(response.code == Some(200), "answer {:?}", response.code);
            let header = |name: &str| {
                response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
            };
            ensure!(
                header("connection").as_deref() != Some("close"),
                "the server closes the connection"
            );
            let length: usize = header("content-length")
                .context("no Content-Length")?
                .parse()?;
            while buffer.len() < head + length {
                read_more(stream, buffer).await?;
            }
            ensure!(buffer.len() == head + length, "more bytes than the answer");
            return Ok(());
        }
        read_more(stream, buffer).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> anyhow::Result<()> {
    buffer.reserve(4096);
    if with_timeout(stream.read_buf(buffer)).await? == 0 {
        bail!("the server closed the connection");
    }
    Ok(())
}

fn render(args: &Args, cases: &[Case], original: &(u64, u64), elapsed: Duration) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# memory: keep-alive connections held open ({} request{} each, then one more)\n",
        args.requests_per_connection,
        if args.requests_per_connection == 1 {
            ""
        } else {
            "s"
        }
    );
    let _ = writeln!(
        out,
        "| fast path | conns | server fd limit | in kernel sockhash | VmRSS start MiB | VmRSS held MiB | VmHWM MiB | RSS per conn B | fds | TCP mem MiB (Δ) | slab Δ MiB | BPF memlock MiB | 2nd request answered | closed in s | opened in s |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    for case in cases {
        let n = thousands(case.connections as f64);
        match &case.result {
            Outcome::Measured(m) => {
                let per_conn = (m.rss_held_kib.saturating_sub(m.rss_start_kib) * 1024) as f64
                    / case.connections as f64;
                let _ = writeln!(
                    out,
                    "| {} | {n} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1} ({:+.1}) | {:.1} | {:.1} | {} | {:.1} | {:.1} |",
                    case.mode.as_str(),
                    m.server_fd_limit,
                    thousands(m.in_kernel as f64),
                    mib(m.rss_start_kib),
                    mib(m.rss_held_kib),
                    mib(m.hwm_kib),
                    thousands(per_conn),
                    thousands(m.fds as f64),
                    m.tcp_mem_bytes as f64 / MIB,
                    m.tcp_mem_delta_bytes as f64 / MIB,
                    m.slab_delta_kib as f64 / 1024.0,
                    m.bpf_memlock as f64 / MIB,
                    thousands(m.second_answered as f64),
                    m.closed_in.as_secs_f64(),
                    m.open_seconds,
                );
            }
            Outcome::Failed(error) => {
                let error = format!("{error:#}").replace(['\n', '|'], " ");
                let _ = writeln!(
                    out,
                    "| {} | {n} | **failed**: {error} |||||||||||||",
                    case.mode.as_str()
                );
            }
            Outcome::Skipped(reason) => {
                let _ = writeln!(
                    out,
                    "| {} | {n} | not run: {reason} |||||||||||||",
                    case.mode.as_str()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\nServer started with this process's original fd limit ({} soft, {} hard) and \
         `--max-connections` N + {MAX_CONNECTIONS_SLACK}; \"server fd limit\" is its soft limit after start-up. \
         VmHWM is the server's peak RSS over its life, read after the second request on every \
         connection. RSS per conn: (VmRSS held − VmRSS at start) / N. TCP mem: \
         /proc/net/sockstat, the whole machine, both ends of each loopback connection (Δ: since \
         before the connections were opened). Slab Δ: the same interval, /proc/meminfo. BPF \
         memlock: the sum over the server's maps (fdinfo). {:.0} s in all.",
        original.0,
        original.1,
        elapsed.as_secs_f64()
    );
    out
}

/// VmHWM per count, one bar per mode.
fn plot(path: &Path, args: &Args, cases: &[Case]) -> anyhow::Result<()> {
    let with_text = register_font();
    let root = BitMapBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    // Only the counts something was measured at.
    let counts: Vec<usize> = args
        .connections
        .iter()
        .copied()
        .filter(|&n| {
            cases
                .iter()
                .any(|case| case.connections == n && matches!(case.result, Outcome::Measured(_)))
        })
        .collect();
    let groups: Vec<String> = counts
        .iter()
        .map(|&n| format!("{} connections", thousands(n as f64)))
        .collect();
    let series: Vec<(String, Vec<f64>)> = args
        .modes
        .iter()
        .map(|&mode| {
            let values = counts
                .iter()
                .map(|&n| {
                    cases
                        .iter()
                        .find(|case| case.mode == mode && case.connections == n)
                        .and_then(|case| match &case.result {
                            Outcome::Measured(m) => Some(m.hwm_kib as f64 / 1024.0),
                            _ => None,
                        })
                        .unwrap_or(0.0)
                })
                .collect();
            (format!("fast path {}", mode.as_str()), values)
        })
        .collect();
    GroupedBars {
        caption: "khttpd peak RSS (VmHWM) with keep-alive connections held",
        y_desc: "MiB",
        groups: &groups,
        series: &series,
        value_label: &|v| format!("{v:.0}"),
    }
    .draw(&root, with_text)?;
    root.present()?;
    Ok(())
}
