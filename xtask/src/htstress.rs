//! `cargo xtask htstress`: an HTTP load generator that measures like `htstress` from
//! sysprog21/khttpd, the tool khttpd's numbers are usually quoted in.
//!
//! It exists so the workspace needs no C tool fetched and built on the side, so benchmarks can run
//! it in-process (`load`), and so a stuck or dead server shows up as socket errors instead of a
//! hung or aborted run: every connect, read and write has a timeout, and a run is bounded by `-n`
//! and/or `--duration`. `--keep-alive` adds what htstress cannot measure: persistent connections.
//!
//! Without `--rate` the load is closed-loop, as in htstress: each connection sends its next request
//! when the last one is answered, so a slow server is sent less, and latencies start when a request
//! is actually sent. `--rate R` is open-loop instead (see `open_loop`): requests are due at a fixed
//! rate whatever the server does, and latencies start when a request was due.
//!
//! As in htstress, each request opens a connection, sends `GET <path> HTTP/1.0` and reads until the
//! server closes it (the response's length is never looked at); the first digit of the status code
//! says whether the request was good (2xx, 3xx) or bad (anything else).

mod open_loop;

use std::{
    cell::RefCell,
    fmt,
    future::Future,
    io,
    net::{SocketAddr, ToSocketAddrs as _},
    path::PathBuf,
    rc::Rc,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpStream, UnixStream},
    task::{JoinSet, LocalSet},
};

/// How long one connect, read or write may take before it counts as a socket error.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes asked for per read; responses are drained, not kept.
const READ_CHUNK: usize = 16 * 1024;
/// How much of a response's start is kept: enough for its status line.
const HEAD_KEPT: usize = 256;
/// Headers httparse can hold per response; more makes the response unparseable.
const MAX_HEADERS: usize = 64;

/// `htstress [-n N] [-c C] [-t T] [-u SOCK] [-h HOST] [-d] [-4|-6] [--keep-alive] [--duration SECS]
/// [--rate R] URL`
///
/// Benchmarks build these with `Args::try_parse_from(["htstress", "-n", "1000", url])`.
#[derive(clap::Parser)]
#[command(name = "htstress", disable_help_flag = true)]
pub struct Args {
    /// Total number of requests [default: 1, or no limit with --duration].
    #[arg(short = 'n', long = "number", value_name = "N")]
    pub requests: Option<u64>,
    /// Concurrent connections per thread.
    #[arg(short = 'c', long, value_name = "C", default_value_t = 1)]
    pub concurrency: usize,
    /// Threads (set this to the number of CPU cores).
    #[arg(short = 't', long, value_name = "T", default_value_t = 1)]
    pub threads: usize,
    /// Connect to this Unix socket instead of the URL's host and port.
    #[arg(short = 'u', long = "unix-socket", value_name = "SOCK")]
    pub unix_socket: Option<PathBuf>,
    /// Host header value [default: the URL's host and port as written].
    #[arg(short = 'h', long = "host", value_name = "HOST")]
    pub host_header: Option<String>,
    /// Print each response's status line (to stderr).
    #[arg(short = 'd', long)]
    pub debug: bool,
    /// Use the host's IPv4 address only.
    #[arg(short = '4', conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Use the host's IPv6 address only.
    #[arg(short = '6')]
    pub ipv6: bool,
    /// HTTP/1.1 requests on persistent connections (reconnecting when the server closes one).
    #[arg(long)]
    pub keep_alive: bool,
    /// Start no new request after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Open loop: R requests per second in all threads, each sent when due (or as soon as one of
    /// its thread's connections is free), its latency counted from when it was due. Needs
    /// --duration and/or -n.
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// No progress lines.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// `http://host[:port][/path]`; the scheme is optional, the port defaults to 80, the path to `/`.
    pub url: String,
    /// Print help (`-h` is the Host header, as in htstress).
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Requests started: good + bad + socket errors.
    pub requests: u64,
    /// Answered with a 2xx or 3xx status.
    pub good: u64,
    /// Answered with any other status, or with something that is not an HTTP status line.
    pub bad: u64,
    /// Not answered: connect failure, reset, timeout, empty or truncated response, or (with
    /// `--keep-alive`) a response whose end cannot be found, such as a chunked one.
    pub socket_errors: u64,
    /// `--rate`: requests still queued for a free connection when the run ended (10 s after the
    /// last was due): the server fell that far behind. Their wait so far is in the latencies.
    pub not_sent: u64,
    /// Wall-clock time of the whole run.
    pub seconds: f64,
    /// Median time from a request's start (its connect, or its send on a kept-alive connection;
    /// with `--rate`, when it was due) to the end of its response, in µs, over answered (good or
    /// bad) requests; none if none was.
    pub p50_us: Option<u32>,
    /// 99th percentile of the same.
    pub p99_us: Option<u32>,
    /// 99.9th percentile of the same.
    pub p999_us: Option<u32>,
    /// `--rate`: the requests per second the run was to send (open loop); none in closed loop.
    pub offered_rate: Option<f64>,
}

impl Report {
    /// Answered requests (good or bad) per second: socket errors are not served requests, and
    /// counting them would make a refused connection look fast.
    pub fn requests_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            (self.good + self.bad) as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Whole percent of all requests, truncated like htstress.
    fn percent(&self, count: u64) -> u64 {
        count * 100 / self.requests.max(1)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "requests:      {}", self.requests)?;
        writeln!(
            f,
            "good requests: {} [{}%]",
            self.good,
            self.percent(self.good)
        )?;
        writeln!(
            f,
            "bad requests:  {} [{}%]",
            self.bad,
            self.percent(self.bad)
        )?;
        writeln!(
            f,
            "socket errors: {} [{}%]",
            self.socket_errors,
            self.percent(self.socket_errors)
        )?;
        writeln!(f, "seconds:       {:.3}", self.seconds)?;
        writeln!(f, "requests/sec:  {:.3}", self.requests_per_sec())?;
        // Not in htstress: these follow its lines, which keep their order and format.
        writeln!(f, "latency p50:   {}", Micros(self.p50_us))?;
        writeln!(f, "latency p99:   {}", Micros(self.p99_us))?;
        write!(f, "latency p99.9: {}", Micros(self.p999_us))?;
        if let Some(rate) = self.offered_rate {
            writeln!(f)?;
            writeln!(f, "offered rate:  {rate} req/s")?;
            writeln!(f, "latency from:  scheduled send time")?;
            write!(f, "not sent:      {}", self.not_sent)?;
        }
        Ok(())
    }
}

/// A latency for the report: `123 us`, or `n/a` without samples.
struct Micros(Option<u32>);

impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(us) => write!(f, "{us} us"),
            None => f.write_str("n/a"),
        }
    }
}

/// `cargo xtask htstress`: runs the load and prints the report.
pub fn run(args: &Args) -> anyhow::Result<()> {
    println!("{}", load(args)?);
    Ok(())
}

/// Runs the load described by `args`: `-t` threads, each with its own single-threaded runtime
/// driving `-c` connections, like htstress's thread-per-core epoll loops (with `--rate`, each with
/// its own open-loop event loop instead).
pub fn load(args: &Args) -> anyhow::Result<Report> {
    let plan = Arc::new(Plan::new(args)?);
    let start = Instant::now();
    let latencies = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..args.threads)
            .map(|thread| {
                let plan = &plan;
                scope.spawn(move || match plan.rate {
                    Some(rate) => open_loop::drive(plan, rate, start, thread, args.threads),
                    None => drive_connections(plan),
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().expect("a load thread panicked"))
            .try_fold(new_latencies(), |mut all, latencies| {
                all.add(latencies?)
                    .context("cannot merge latency histograms")?;
                anyhow::Ok(all)
            })
    })?;
    Ok(Report {
        offered_rate: plan.rate,
        ..plan.tally.report(start.elapsed(), &latencies)
    })
}

/// Latencies of answered requests, in µs (saturating at `u32::MAX`), one histogram per thread.
type Latencies = Histogram<u64>;

/// An empty histogram: 3 significant digits (exact below 2048 µs), growing to fit what it records.
fn new_latencies() -> Latencies {
    Histogram::new(3).expect("3 significant digits are supported")
}

fn micros(since: Instant) -> u32 {
    u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX)
}

/// One thread's share of the load; returns the latencies of its answered requests.
fn drive_connections(plan: &Arc<Plan>) -> anyhow::Result<Latencies> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    // The thread's connection tasks share one histogram: one each would cost up to ~120 KB (for
    // latencies up to 10 s) per connection, at `-c 500`.
    let latencies = Rc::new(RefCell::new(new_latencies()));
    LocalSet::new().block_on(&runtime, async {
        let mut tasks = JoinSet::new();
        for _ in 0..plan.concurrency {
            let (plan, latencies) = (Arc::clone(plan), Rc::clone(&latencies));
            tasks.spawn_local(async move {
                if plan.keep_alive {
                    keep_alive_requests(&plan, &latencies).await;
                } else {
                    one_shot_requests(&plan, &latencies).await;
                }
            });
        }
        while let Some(task) = tasks.join_next().await {
            task.context("a connection task failed")?;
        }
        anyhow::Ok(())
    })?;
    Ok(Rc::into_inner(latencies)
        .expect("the connection tasks have ended")
        .into_inner())
}

/// What the connection tasks share: where and what to send, when to stop, and the counts.
struct Plan {
    target: Target,
    request: Vec<u8>,
    keep_alive: bool,
    debug: bool,
    /// Connections per thread.
    concurrency: usize,
    /// `--rate`: requests per second, open loop.
    rate: Option<f64>,
    budget: Budget,
    tally: Tally,
}

impl Plan {
    fn new(args: &Args) -> anyhow::Result<Self> {
        if args.requests == Some(0) {
            bail!("-n must be at least 1 (it is the total number of requests)");
        }
        if args.concurrency == 0 {
            bail!("-c must be at least 1 (it is the number of connections per thread)");
        }
        if args.threads == 0 {
            bail!("-t must be at least 1 (it is the number of threads)");
        }
        if let Some(rate) = args.rate {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--rate must be a positive number of requests per second");
            }
            if args.requests.is_none() && args.duration.is_none() {
                bail!("--rate needs --duration and/or -n: an open-loop run is bounded by them");
            }
            if args.unix_socket.is_some() {
                bail!("--rate does not support Unix sockets (-u)");
            }
        }
        let duration = args
            .duration
            .map(|secs| {
                Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|duration| !duration.is_zero())
                    .context("--duration must be a positive number of seconds")
            })
            .transpose()?;
        // Without either bound a run would never end: htstress's "-n 1" default applies then.
        let limit = args.requests.or(duration.is_none().then_some(1));

        let url = parse_url(&args.url)?;
        let target = match &args.unix_socket {
            Some(path) => Target::Unix(path.clone()),
            None => Target::Tcp(resolve(&url, args.ipv4, args.ipv6)?),
        };
        let host = args.host_header.as_deref().unwrap_or(&url.authority);
        Ok(Self {
            target,
            request: request(&url.path, host, args.keep_alive),
            keep_alive: args.keep_alive,
            debug: args.debug,
            concurrency: args.concurrency,
            rate: args.rate,
            budget: Budget {
                limit,
                deadline: duration.map(|d| Instant::now() + d),
                claimed: AtomicU64::new(0),
            },
            tally: Tally::new(if args.quiet { None } else { limit }),
        })
    }

    /// Classifies a response by its first line, printing that line with `-d`.
    fn judge(&self, head: &[u8]) -> Outcome {
        let status_line = first_line(head);
        if self.debug {
            eprintln!("{}", String::from_utf8_lossy(status_line));
        }
        classify(status_line)
    }
}

/// The request to send, HTTP/1.0 as htstress sends it, or HTTP/1.1 to keep connections open.
fn request(path: &str, host: &str, keep_alive: bool) -> Vec<u8> {
    let version = if keep_alive { "1.1" } else { "1.0" };
    format!("GET {path} HTTP/{version}\r\nHost: {host}\r\n\r\n").into_bytes()
}

/// Hands out permissions to start a request, so exactly `-n` are started across all threads, and
/// none after `--duration`.
struct Budget {
    limit: Option<u64>,
    deadline: Option<Instant>,
    claimed: AtomicU64,
}

impl Budget {
    fn claim(&self) -> bool {
        if self
            .deadline
            .is_some_and(|deadline| Instant::now() >= deadline)
        {
            return false;
        }
        self.limit
            .is_none_or(|limit| self.claimed.fetch_add(1, Relaxed) < limit)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Good,
    Bad,
    SocketError,
    /// `--rate`: still waiting for a free connection when the run ended. Not an error of the
    /// server's, but not an answer either; its wait so far is counted as its latency.
    NotSent,
}

/// Counts outcomes from every thread, and prints progress every tenth of `-n`.
struct Tally {
    good: AtomicU64,
    bad: AtomicU64,
    socket_errors: AtomicU64,
    not_sent: AtomicU64,
    finished: AtomicU64,
    /// The request count progress is reported against; none when quiet or bounded by time only.
    progress_of: Option<u64>,
}

impl Tally {
    fn new(progress_of: Option<u64>) -> Self {
        Self {
            good: AtomicU64::new(0),
            bad: AtomicU64::new(0),
            socket_errors: AtomicU64::new(0),
            not_sent: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            progress_of,
        }
    }

    /// Counts `outcome`; an answered request's latency goes to `latencies`.
    fn record(&self, outcome: Outcome, start: Instant, latencies: &mut Latencies) {
        if outcome != Outcome::SocketError {
            latencies
                .record(micros(start).into())
                .expect("the histogram grows to fit any u32");
        }
        let counter = match outcome {
            Outcome::Good => &self.good,
            Outcome::Bad => &self.bad,
            Outcome::SocketError => &self.socket_errors,
            Outcome::NotSent => &self.not_sent,
        };
        counter.fetch_add(1, Relaxed);
        let finished = self.finished.fetch_add(1, Relaxed) + 1;
        if let Some(total) = self.progress_of {
            let tenths = finished * 10 / total;
            if tenths > (finished - 1) * 10 / total {
                eprintln!("progress: {}% done", tenths * 10);
            }
        }
    }

    /// Read after every thread has been joined, so the relaxed counts are final.
    fn report(&self, elapsed: Duration, latencies: &Latencies) -> Report {
        let at = |quantile| {
            (!latencies.is_empty())
                .then(|| u32::try_from(latencies.value_at_quantile(quantile)).unwrap_or(u32::MAX))
        };
        let (good, bad, socket_errors, not_sent) = (
            self.good.load(Relaxed),
            self.bad.load(Relaxed),
            self.socket_errors.load(Relaxed),
            self.not_sent.load(Relaxed),
        );
        Report {
            requests: good + bad + socket_errors + not_sent,
            good,
            bad,
            socket_errors,
            not_sent,
            seconds: elapsed.as_secs_f64(),
            p50_us: at(0.50),
            p99_us: at(0.99),
            p999_us: at(0.999),
            offered_rate: None,
        }
    }
}

/// Good for a 2xx or 3xx status line, bad for any other answer.
fn classify(status_line: &[u8]) -> Outcome {
    match status_line.strip_prefix(b"HTTP/1.") {
        Some([_minor, b' ', b'2' | b'3', ..]) => Outcome::Good,
        _ => Outcome::Bad,
    }
}

/// The first line of `head`, without its line ending.
fn first_line(head: &[u8]) -> &[u8] {
    let end = head
        .iter()
        .position(|&byte| byte == b'\r' || byte == b'\n')
        .unwrap_or(head.len());
    &head[..end]
}

/// htstress's mode: a new connection per request, answered until the server closes it.
async fn one_shot_requests(plan: &Plan, latencies: &RefCell<Latencies>) {
    let mut buffer = Vec::with_capacity(READ_CHUNK);
    while plan.budget.claim() {
        let start = Instant::now();
        let outcome = match request_until_close(plan, &mut buffer).await {
            Ok(head) if !head.is_empty() => plan.judge(&head),
            // A response that never came, or came empty.
            _ => Outcome::SocketError,
        };
        plan.tally
            .record(outcome, start, &mut latencies.borrow_mut());
    }
}

/// Connects, sends the request and reads to EOF; returns the start of the response.
async fn request_until_close(plan: &Plan, buffer: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    let mut stream = plan.target.connect().await?;
    with_timeout(stream.write_all(&plan.request)).await?;
    let mut head = Vec::new();
    loop {
        buffer.clear();
        if read_more(&mut stream, buffer).await? == 0 {
            return Ok(head);
        }
        let wanted = HEAD_KEPT.saturating_sub(head.len()).min(buffer.len());
        head.extend_from_slice(&buffer[..wanted]);
    }
}

/// `--keep-alive`: requests one after another on a persistent connection, opening a new one when
/// there is none yet or the server closed (or will close) the last one.
async fn keep_alive_requests(plan: &Plan, latencies: &RefCell<Latencies>) {
    let mut buffer = Vec::with_capacity(READ_CHUNK);
    let mut idle: Option<Stream> = None;
    while plan.budget.claim() {
        let start = Instant::now();
        let outcome = match request_persistent(plan, idle.take(), &mut buffer).await {
            Ok(Answer {
                status_line,
                stream,
            }) => {
                idle = stream;
                plan.judge(&status_line)
            }
            Err(_) => Outcome::SocketError,
        };
        plan.tally
            .record(outcome, start, &mut latencies.borrow_mut());
    }
}

/// A response read on a persistent connection.
struct Answer {
    status_line: Vec<u8>,
    /// The connection, if the server keeps it open for the next request.
    stream: Option<Stream>,
}

/// Sends the request on `idle` if there is one, else (or if the server had closed it meanwhile,
/// which is its right with an idle connection) on a new connection.
async fn request_persistent(
    plan: &Plan,
    idle: Option<Stream>,
    buffer: &mut Vec<u8>,
) -> io::Result<Answer> {
    if let Some(stream) = idle {
        if let Some(answer) = exchange(plan, stream, buffer).await? {
            return Ok(answer);
        }
    }
    let stream = plan.target.connect().await?;
    exchange(plan, stream, buffer)
        .await?
        .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
}

/// One request and its response on a persistent connection; `None` if the server closed the
/// connection before sending any of the response.
async fn exchange(
    plan: &Plan,
    mut stream: Stream,
    buffer: &mut Vec<u8>,
) -> io::Result<Option<Answer>> {
    if let Err(error) = with_timeout(stream.write_all(&plan.request)).await {
        return if closed_by_peer(&error) {
            Ok(None)
        } else {
            Err(error)
        };
    }
    buffer.clear();
    let head = loop {
        if let Some(head) = parse_head(buffer)? {
            break head;
        }
        match read_more(&mut stream, buffer).await {
            Ok(0) if buffer.is_empty() => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(error) if buffer.is_empty() && closed_by_peer(&error) => return Ok(None),
            Err(error) => return Err(error),
        }
    };
    let body_received = (buffer.len() - head.length) as u64;
    let stream = match head.body {
        Body::Length(length) => {
            drain(&mut stream, buffer, length.saturating_sub(body_received)).await?;
            head.persistent.then_some(stream)
        }
        Body::UntilClose => {
            drain_until_close(&mut stream, buffer).await?;
            None
        }
    };
    Ok(Some(Answer {
        status_line: head.status_line,
        stream,
    }))
}

/// Errors that mean the server closed the connection (rather than being slow or unreachable).
fn closed_by_peer(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// What a response head says about the response.
#[derive(Debug, PartialEq)]
struct Head {
    /// Bytes of the head, up to and including the blank line.
    length: usize,
    status_line: Vec<u8>,
    body: Body,
    /// Whether the server keeps the connection open after this response.
    persistent: bool,
}

/// Where a response's body ends.
#[derive(Debug, PartialEq)]
enum Body {
    Length(u64),
    /// No length given: the body ends when the server closes the connection.
    UntilClose,
}

/// Parses a response head from the start of `bytes`; `None` if it is not complete yet.
fn parse_head(bytes: &[u8]) -> io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(length) = response.parse(bytes).map_err(invalid_data)? else {
        return Ok(None);
    };
    let code = response.code.unwrap_or_default();
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let body = if (100..200).contains(&code) || code == 204 || code == 304 {
        // These never have a body, whatever their headers say (RFC 9112, section 6.3).
        Body::Length(0)
    } else if header("transfer-encoding").is_some() {
        return Err(invalid_data(
            "chunked (or otherwise encoded) responses are not supported",
        ));
    } else if let Some(length) = header("content-length") {
        let length = std::str::from_utf8(length)
            .ok()
            .and_then(|length| length.trim().parse().ok());
        Body::Length(length.ok_or_else(|| invalid_data("bad Content-Length"))?)
    } else {
        Body::UntilClose
    };
    let connection = header("connection").unwrap_or_default();
    let persistent = if has_token(connection, "close") {
        false
    } else {
        // HTTP/1.1 connections persist unless closed; HTTP/1.0 ones only if the server says so.
        response.version == Some(1) || has_token(connection, "keep-alive")
    };
    Ok(Some(Head {
        length,
        status_line: first_line(bytes).to_vec(),
        body,
        persistent,
    }))
}

/// Whether a comma-separated header value such as `Connection: keep-alive, Upgrade` has `token`.
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&byte| byte == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

fn invalid_data(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Reads and discards `remaining` more bytes.
async fn drain(stream: &mut Stream, buffer: &mut Vec<u8>, mut remaining: u64) -> io::Result<()> {
    while remaining > 0 {
        buffer.clear();
        match read_more(stream, buffer).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            read => remaining = remaining.saturating_sub(read as u64),
        }
    }
    Ok(())
}

/// Reads and discards everything until the server closes the connection.
async fn drain_until_close(stream: &mut Stream, buffer: &mut Vec<u8>) -> io::Result<()> {
    loop {
        buffer.clear();
        if read_more(stream, buffer).await? == 0 {
            return Ok(());
        }
    }
}

/// Appends what one read returns to `buffer`; 0 at EOF.
async fn read_more(stream: &mut Stream, buffer: &mut Vec<u8>) -> io::Result<usize> {
    buffer.reserve(READ_CHUNK);
    with_timeout(stream.read_buf(buffer)).await
}

pub(crate) async fn with_timeout<T>(
    operation: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(IO_TIMEOUT, operation)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Where the requests go.
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A TCP or Unix stream; boxed so both modes share one code path.
type Stream = Box<dyn Connection>;
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

impl Target {
    async fn connect(&self) -> io::Result<Stream> {
        Ok(match self {
            Self::Tcp(address) => Box::new(with_timeout(TcpStream::connect(address)).await?),
            Self::Unix(path) => Box::new(with_timeout(UnixStream::connect(path)).await?),
        })
    }
}

/// The parts of the URL argument the requests need.
#[derive(Debug, PartialEq)]
struct Url {
    host: String,
    port: u16,
    path: String,
    /// `host[:port]` as written, the default Host header.
    authority: String,
}

/// Parses `[http://]host[:port][/path]` with the `url` crate; IPv6 hosts go in brackets, as in
/// `http://[::1]:8081/`. The path is sent as the URL crate normalises it (`/a/../b` is `/b`).
fn parse_url(argument: &str) -> anyhow::Result<Url> {
    // The scheme is optional, as in htstress.
    let written = if argument.contains("://") {
        argument.to_owned()
    } else {
        format!("http://{argument}")
    };
    let url = url::Url::parse(&written).with_context(|| format!("{argument}: not a URL"))?;
    if url.scheme() != "http" {
        bail!("{argument}: only http is supported");
    }
    // `host_str` keeps an IPv6 address in its brackets, as the Host header wants it.
    let bracketed = url
        .host_str()
        .with_context(|| format!("{argument}: no host"))?;
    let host = match url.host() {
        Some(url::Host::Ipv6(address)) => address.to_string(),
        _ => bracketed.to_owned(),
    };
    let authority = match url.port() {
        Some(port) => format!("{bracketed}:{port}"),
        None => bracketed.to_owned(),
    };
    let path = url[url::Position::BeforePath..url::Position::AfterQuery].to_owned();
    Ok(Url {
        host,
        port: url.port_or_known_default().unwrap_or(80),
        path,
        authority,
    })
}

/// The host's first address of the wanted family (any, or only IPv4 / IPv6).
fn resolve(url: &Url, only_ipv4: bool, only_ipv6: bool) -> anyhow::Result<SocketAddr> {
    let wanted =
        |address: &SocketAddr| !(only_ipv4 && address.is_ipv6() || only_ipv6 && address.is_ipv4());
    (url.host.as_str(), url.port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", url.host))?
        .find(wanted)
        .with_context(|| format!("{} has no address of the requested family", url.host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(host: &str, port: u16, path: &str, authority: &str) -> Url {
        Url {
            host: host.into(),
            port,
            path: path.into(),
            authority: authority.into(),
        }
    }

    #[test]
    fn parses_urls() {
        assert_eq!(
            parse_url("http://localhost:8081/path").unwrap(),
            url("localhost", 8081, "/path", "localhost:8081")
        );
        assert_eq!(
            parse_url("http://127.0.0.1").unwrap(),
            url("127.0.0.1", 80, "/", "127.0.0.1")
        );
        assert_eq!(
            parse_url("example.org/a/b?c=d").unwrap(),
            url("example.org", 80, "/a/b?c=d", "example.org")
        );
        assert_eq!(
            parse_url("http://[::1]:8080/x").unwrap(),
            url("::1", 8080, "/x", "[::1]:8080")
        );
        assert_eq!(
            parse_url("http://[::1]").unwrap(),
            url("::1", 80, "/", "[::1]")
        );
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "https://localhost/",
            "http://:80/",
            "http://host:port/",
            "http://host:70000/",
            "http://[::1/",
            "http://[::1]x/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn classifies_status_lines() {
        assert_eq!(classify(b"HTTP/1.1 200 OK"), Outcome::Good);
        assert_eq!(classify(b"HTTP/1.0 301 Moved Permanently"), Outcome::Good);
        assert_eq!(classify(b"HTTP/1.0 404 Not Found"), Outcome::Bad);
        assert_eq!(
            classify(b"HTTP/1.1 500 Internal Server Error"),
            Outcome::Bad
        );
        assert_eq!(classify(b"HTTP/1.1 101 Switching Protocols"), Outcome::Bad);
        assert_eq!(classify(b"hello"), Outcome::Bad);
        assert_eq!(
            classify(first_line(b"HTTP/1.1 204 No Content\r\n\r\n")),
            Outcome::Good
        );
    }

    #[test]
    fn finds_where_responses_end() {
        let head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhel")
            .unwrap()
            .unwrap();
        assert_eq!(
            (head.length, head.body, head.persistent),
            (38, Body::Length(6), true)
        );
        assert_eq!(head.status_line, b"HTTP/1.1 200 OK");

        let head = parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((head.body, head.persistent), (Body::UntilClose, false));
        let head = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!head.persistent);
        let head =
            parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(head.persistent);
        let head = parse_head(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.body, Body::Length(0));

        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn reports_like_htstress() {
        let report = Report {
            requests: 4,
            good: 2,
            bad: 1,
            socket_errors: 1,
            not_sent: 0,
            seconds: 0.5,
            p50_us: Some(120),
            p99_us: None,
            p999_us: Some(4100),
            offered_rate: None,
        };
        assert_eq!(
            report.to_string(),
            "requests:      4\n\
             good requests: 2 [50%]\n\
             bad requests:  1 [25%]\n\
             socket errors: 1 [25%]\n\
             seconds:       0.500\n\
             requests/sec:  6.000\n\
             latency p50:   120 us\n\
             latency p99:   n/a\n\
             latency p99.9: 4100 us"
        );
        let open_loop = Report {
            offered_rate: Some(2000.0),
            ..report
        };
        assert!(open_loop.to_string().ends_with(
            "latency p99.9: 4100 us\n\
             offered rate:  2000 req/s\n\
             latency from:  scheduled send time\n\
             not sent:      0"
        ));
    }
}
