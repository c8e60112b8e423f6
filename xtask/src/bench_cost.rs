//! `cargo xtask bench cost`: what a request costs the server when it has its CPU to itself, and
//! the latency it gives at fixed offered rates — khttpd's paths against nginx and against a floor.
//!
//! Why: every other bench runs the load generator and the server on the same CPUs over loopback,
//! where the client's cost and the kernel path's kworker wake-ups compete with the server. Here the
//! server runs in its own network namespace on `--server-cpus` (its receive processing steered there
//! too, see `netns`), the load generators in another namespace on `--client-cpus`, joined by a veth
//! pair, as a server with remote clients is deployed. The server's cost is then the busy time of its
//! CPUs (user + system + irq + softirq, from `/proc/stat`) divided by the requests answered.
//! `--setup loopback` (or `both`, side by side) runs the same servers and loads the usual way, on
//! the host's loopback with every CPU shared, where only the whole machine's cost can be read.
//!
//! Against what: nginx in its best configuration for each job (one worker per server CPU,
//! `reuseport`, `access_log off`; `return 200` for the greeting; `open_file_cache` and, measured
//! faster for a small file here, `sendfile off`), and the floor (`cargo xtask floor`): a responder that accepts, reads
//! to the end of a head and writes a fixed answer, the least any user-space server can spend. Every
//! row shows its cost as a multiple of the floor's and of nginx's under the same load.
//!
//! Loads, each `--seconds` long, from the client side:
//! - keep-alive, closed loop: `wrk` on 100 persistent connections;
//! - a connection per request, closed loop: `htstress -c 25` (HTTP/1.0, the seed's shape);
//! - pipelined: `h2load --h1 -c 50 -m 10`;
//! - open loop at fixed rates (`htstress --rate`, keep-alive and connection per request): latency
//!   from each request's *scheduled* send time, so a server that falls behind shows its queueing;
//! - echo: 100 connections ping-ponging 64-byte messages (the kernel echo path is the sockmap
//!   redirect alone, so its cost says what the HTTP fast path pays beyond it).
//!
//! Every server is started, checked (the same answer everywhere) and stopped by the bench, in
//! rounds (`--rounds`), each round going through every server once, so slow drifts of the machine
//! touch all of them alike; the table shows medians. Any bad answer or socket error in any run fails
//! the bench, after the table is written. Output: `target/bench/cost.md`, `target/bench/cost.png`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use plotters::prelude::*;

use khttpd_harness::{
    http::answer_until_close,
    process::{output_bounded, Guarded, Signal},
    system::temp_dir,
    Metrics, IO_TIMEOUT,
};

use crate::{
    bench::{
        accepts, find_on_path, forward_stderr, free_ports, median, or_dash, register_font,
        thousands, write_results, CpuSplit, CpuTimes, GroupedBars, HELLO, PALETTE,
    },
    bench_echo::{connect_all, dummy_message, ping_pong},
    netns::{Side, Testbed},
    nginx::{find_nginx, Nginx, NginxConf, HELLO_LOCATION},
    toolchain::Step,
    wrk::parse_wrk,
};

#[derive(clap::Args)]
pub struct Args {
    /// A first look in under two minutes: one round, 1-second loads, two rates each.
    #[arg(long)]
    quick: bool,
    /// Rounds through every server [default: 2; 1 with --quick].
    #[arg(long)]
    rounds: Option<usize>,
    /// Length of each load, in seconds [default: 5; 1 with --quick].
    #[arg(long)]
    seconds: Option<u64>,
    /// CPUs of the server side: its processes and its receive processing.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    server_cpus: Vec<usize>,
    /// CPUs of the load generators and their receive processing.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    client_cpus: Vec<usize>,
    /// Offered rates (requests/s) of the open-loop keep-alive load
    /// [default: 20000,50000,80000; 30000,90000 with --quick].
    #[arg(long, value_delimiter = ',')]
    rates: Vec<u32>,
    /// Offered rates of the open-loop connection-per-request load
    /// [default: 4000,8000,12000; 10000 with --quick].
    #[arg(long, value_delimiter = ',')]
    close_rates: Vec<u32>,
    /// Where to run: `isolated` (the server on its own CPUs, two network namespaces), `loopback`
    /// (the host's loopback, both sides sharing every CPU, as the other benches), or `both`, side
    /// by side in each round.
    #[arg(long, value_enum, default_value = "isolated")]
    setup: SetupArg,
    /// The khttpd binary to measure (default: build the release one).
    #[arg(long)]
    pub khttpd: Option<PathBuf>,
    /// Only these servers (comma-separated) [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    servers: Vec<Kind>,
    /// Also measure this khttpd binary with `--fast-path off` (`khttpd off, baseline`), side by
    /// side with the one measured: a before/after in one run, where drift between runs cannot
    /// pass for a change.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Only these loads (comma-separated) [default: all].
    #[arg(long, value_delimiter = ',', value_enum)]
    loads: Vec<LoadArg>,
}

/// The loads `--loads` names.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum LoadArg {
    /// wrk, keep-alive, closed loop.
    KeepAlive,
    /// htstress, a connection per request, closed loop.
    Close,
    /// h2load, pipelined.
    Pipelined,
    /// Open loop, keep-alive, at `--rates`.
    Rate,
    /// Open loop, a connection per request, at `--close-rates`.
    CloseRate,
}

/// Where the server listens, on its side of the veth (on loopback: free ports).
const ISOLATED_PORTS: Ports = Ports {
    http: 8081,
    echo: 12345,
    metrics: 9100,
};
/// Size of the file served in the file loads.
const FILE_SIZE: usize = 2000;
const FILE_PATH: &str = "/file.txt";
/// Connections of the keep-alive loads (closed and open loop), over all client threads.
const KEEP_ALIVE_CONNECTIONS: usize = 100;
/// htstress `-c` per client thread of the closed connection-per-request load.
const CLOSE_CONCURRENCY: usize = 25;
/// Connections in flight at most per client thread in the open-loop connection-per-request load.
const CLOSE_RATE_IN_FLIGHT: usize = 100;
/// h2load: connections and requests in flight per connection.
const PIPELINE_CONNECTIONS: usize = 50;
const PIPELINE_DEPTH: usize = 10;
/// Echo: connections and message size.
const ECHO_CONNECTIONS: usize = 100;
const ECHO_MESSAGE: usize = 64;
/// How long a load tool may run past its load before it is killed (an open-loop run drains what it
/// scheduled for up to 10 s).
const LOAD_GRACE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SetupArg {
    Isolated,
    Loopback,
    Both,
}

/// One way of placing the server and the load generators.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Setup {
    /// Each side in its own network namespace on its own CPUs.
    Isolated,
    /// The host's loopback, every CPU shared.
    Loopback,
}

impl Setup {
    fn label(self) -> &'static str {
        match self {
            Self::Isolated => "own CPU",
            Self::Loopback => "shared loopback",
        }
    }
}

/// Where a set-up runs things: a test bed of two namespaces, or this host's loopback.
enum Place {
    Isolated(Testbed),
    Loopback { cpus: Vec<usize> },
}

impl Place {
    fn create(setup: Setup, args: &Args) -> anyhow::Result<Self> {
        Ok(match setup {
            Setup::Isolated => Self::Isolated(
                Testbed::create(&args.server_cpus, &args.client_cpus)
                    .context("bench cost needs two network namespaces joined by a veth pair")?,
            ),
            Setup::Loopback => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                Self::Loopback {
                    cpus: (0..cores).collect(),
                }
            }
        })
    }

    fn setup(&self) -> Setup {
        match self {
            Self::Isolated(_) => Setup::Isolated,
            Self::Loopback { .. } => Setup::Loopback,
        }
    }

    /// `program`, to run on `side`: in its namespace and on its CPUs, or as is.
    fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> anyhow::Result<Command> {
        match self {
            Self::Isolated(testbed) => testbed.command(side, program),
            Self::Loopback { .. } => Ok(Command::new(program)),
        }
    }

    /// Runs `work` where `side`'s sockets live.
    fn run_in<T: Send>(&self, side: Side, work: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        match self {
            Self::Isolated(testbed) => testbed.run_in(side, work),
            Self::Loopback { .. } => Ok(work()),
        }
    }

    fn server_ip(&self) -> std::net::Ipv4Addr {
        match self {
            Self::Isolated(testbed) => testbed.address(Side::Server),
            Self::Loopback { .. } => std::net::Ipv4Addr::LOCALHOST,
        }
    }

    /// The interface khttpd listens on.
    fn iface(&self) -> &str {
        match self {
            Self::Isolated(testbed) => testbed.veth(Side::Server),
            Self::Loopback { .. } => "lo",
        }
    }

    /// The CPUs whose busy time is `side`'s (on loopback: every CPU, both sides).
    fn cpus(&self, side: Side) -> &[usize] {
        match self {
            Self::Isolated(testbed) => testbed.cpus(side),
            Self::Loopback { cpus } => cpus,
        }
    }

    fn ports(&self) -> anyhow::Result<Ports> {
        Ok(match self {
            Self::Isolated(_) => ISOLATED_PORTS,
            Self::Loopback { .. } => {
                let [http, echo, metrics] = free_ports()?.map(|addr| addr.port());
                Ports {
                    http,
                    echo,
                    metrics,
                }
            }
        })
    }
}

/// The server's ports.
#[derive(Clone, Copy)]
struct Ports {
    http: u16,
    echo: u16,
    metrics: u16,
}

/// Who answers.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, clap::ValueEnum)]
enum Kind {
    /// khttpd `--fast-path on`: connections start in the kernel.
    On,
    /// khttpd `--fast-path auto` (the default).
    Auto,
    /// khttpd `--fast-path off`: user space only.
    Off,
    /// The `--baseline` binary, `--fast-path off`.
    Baseline,
    /// khttpd's user-space echo on the bound (per-CPU) work queue; echo only.
    Bound,
    Nginx,
    Floor,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::On => "khttpd on",
            Self::Auto => "khttpd auto",
            Self::Off => "khttpd off",
            Self::Baseline => "khttpd off, baseline",
            Self::Bound => "khttpd off, bound",
            Self::Nginx => "nginx",
            Self::Floor => "floor",
        }
    }
}

/// What is asked for.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Content {
    /// `GET /`: `Hello, World!\n`.
    Greeting,
    /// `GET /file.txt`: a 2,000-byte file (`--root` for khttpd, `root` for nginx).
    File,
    /// The echo service.
    Echo,
}

impl Content {
    fn label(self) -> &'static str {
        match self {
            Self::Greeting => "greeting",
            Self::File => "2,000-byte file",
            Self::Echo => "echo 64 B",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::File => FILE_PATH,
            _ => "/",
        }
    }
}

/// A server set up for one content.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct Subject {
    content: Content,
    kind: Kind,
}

/// One load.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Load {
    KeepAlive,
    Close,
    Pipelined,
    /// Open loop on persistent connections at this many requests/s.
    RateKeepAlive(u32),
    /// Open loop, a connection per request, at this many requests/s.
    RateClose(u32),
    PingPong,
}

impl Load {
    /// The offered rate of an open-loop load on persistent connections (`keep_alive`) or with a
    /// connection per request.
    fn offered_rate(self, keep_alive: bool) -> Option<u32> {
        match (self, keep_alive) {
            (Self::RateKeepAlive(rate), true) | (Self::RateClose(rate), false) => Some(rate),
            _ => None,
        }
    }

    /// The load, without its client threads (one per client CPU).
    fn label(self) -> String {
        match self {
            Self::KeepAlive => format!("wrk -c{KEEP_ALIVE_CONNECTIONS}"),
            Self::Close => format!("htstress -c {CLOSE_CONCURRENCY}"),
            Self::Pipelined => {
                format!("h2load --h1 -c {PIPELINE_CONNECTIONS} -m {PIPELINE_DEPTH}")
            }
            Self::RateKeepAlive(rate) => format!("keep-alive at {} req/s", thousands(rate.into())),
            Self::RateClose(rate) => format!("conn/request at {} req/s", thousands(rate.into())),
            Self::PingPong => format!("ping-pong, {ECHO_CONNECTIONS} conns"),
        }
    }
}

/// The settings a run goes by, `--quick` applied.
struct Plan {
    rounds: usize,
    seconds: u64,
    rates: Vec<u32>,
    close_rates: Vec<u32>,
    subjects: Vec<Subject>,
    loads: Vec<LoadArg>,
}

impl Plan {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let pick = |given: &[u32], full: &[u32], quick: &[u32]| match (given, args.quick) {
            ([], false) => full.to_vec(),
            ([], true) => quick.to_vec(),
            (given, _) => given.to_vec(),
        };
        let plan = Self {
            rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 2 }),
            seconds: args.seconds.unwrap_or(if args.quick { 1 } else { 5 }),
            rates: pick(&args.rates, &[20_000, 50_000, 80_000], &[30_000, 90_000]),
            close_rates: pick(&args.close_rates, &[4_000, 8_000, 12_000], &[10_000]),
            subjects: subjects(&args.servers, args.baseline.is_some()),
            loads: args.loads.clone(),
        };
        ensure!(plan.rounds > 0, "--rounds must be at least 1");
        ensure!(plan.seconds > 0, "--seconds must be at least 1");
        ensure!(
            plan.rates.iter().chain(&plan.close_rates).all(|&r| r > 0),
            "rates must be positive"
        );
        ensure!(!plan.subjects.is_empty(), "no server to measure");
        Ok(plan)
    }

    fn loads(&self, content: Content) -> Vec<Load> {
        if content == Content::Echo {
            return vec![Load::PingPong];
        }
        let wanted = |load: LoadArg| self.loads.is_empty() || self.loads.contains(&load);
        let mut loads = Vec::new();
        for (arg, load) in [
            (LoadArg::KeepAlive, Load::KeepAlive),
            (LoadArg::Close, Load::Close),
            (LoadArg::Pipelined, Load::Pipelined),
        ] {
            if wanted(arg) {
                loads.push(load);
            }
        }
        if wanted(LoadArg::Rate) {
            loads.extend(self.rates.iter().map(|&rate| Load::RateKeepAlive(rate)));
        }
        if wanted(LoadArg::CloseRate) {
            loads.extend(self.close_rates.iter().map(|&rate| Load::RateClose(rate)));
        }
        loads
    }
}

/// Every server for every content it serves, in the order they are measured.
fn subjects(only: &[Kind], baseline: bool) -> Vec<Subject> {
    let http = [
        Kind::On,
        Kind::Auto,
        Kind::Off,
        Kind::Baseline,
        Kind::Nginx,
        Kind::Floor,
    ];
    let echo = [Kind::On, Kind::Off, Kind::Bound, Kind::Floor];
    let wanted = |kind: &Kind| {
        (only.is_empty() || only.contains(kind)) && (*kind != Kind::Baseline || baseline)
    };
    let mut subjects = Vec::new();
    for content in [Content::Greeting, Content::File] {
        subjects.extend(
            http.iter()
                .filter(|kind| wanted(kind))
                .map(|&kind| Subject { content, kind }),
        );
    }
    subjects.extend(
        echo.iter()
            .filter(|kind| wanted(kind))
            .map(|&kind| Subject {
                content: Content::Echo,
                kind,
            }),
    );
    subjects
}

/// What one run of one load against one server gave: the load tool's report and both sides' CPU.
struct Sample {
    tally: Tally,
    server: CpuSplit,
    client: CpuSplit,
}

impl Sample {
    /// Busy time of the server's CPUs per answered request, in µs.
    fn server_us(&self) -> Option<f64> {
        let answered = self.tally.answered;
        (answered > 0).then(|| self.server.busy_seconds * 1e6 / answered as f64)
    }
}

/// Every run, by set-up, server and load.
type Samples = BTreeMap<(Setup, Subject, Load), Vec<Sample>>;

/// What a load tool reported.
struct Tally {
    answered: u64,
    bad: u64,
    errors: u64,
    /// Open loop: requests still queued when the run ended (the server fell that far behind).
    not_sent: u64,
    req_per_s: f64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    p999_us: Option<f64>,
}

pub fn run(args: &Args, khttpd: &Path) -> anyhow::Result<()> {
    let plan = Plan::new(args)?;
    let started = Instant::now();
    let tools = Tools::find()?;
    let setups: &[Setup] = match args.setup {
        SetupArg::Isolated => &[Setup::Isolated],
        SetupArg::Loopback => &[Setup::Loopback],
        SetupArg::Both => &[Setup::Isolated, Setup::Loopback],
    };
    let places = setups
        .iter()
        .map(|&setup| Place::create(setup, args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let site = temp_dir("cost-site")?;
    let file: Vec<u8> = (0..FILE_SIZE)
        .map(|i| b"khttpd cost bench\n"[i % 18])
        .collect();
    fs::write(site.path().join(&FILE_PATH[1..]), &file).context("cannot write the served file")?;
    let benches = places
        .iter()
        .map(|place| {
            Ok(Bench {
                plan: &plan,
                place,
                ports: place.ports()?,
                tools: &tools,
                khttpd,
                baseline: args.baseline.as_deref(),
                site: site.path(),
                file: &file,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut samples = Samples::new();
    let mut failures: Vec<String> = Vec::new();
    for round in 1..=plan.rounds {
        for bench in &benches {
            for &subject in &plan.subjects {
                let name = format!(
                    "[{}, {}/{}, round {round}/{}]",
                    bench.place.setup().label(),
                    subject.kind.label(),
                    subject.content.label(),
                    plan.rounds
                );
                if let Err(error) = bench.subject(subject, &name, &mut samples) {
                    let error = format!("{name} {error:#}").replace('\n', " / ");
                    eprintln!("{error}");
                    failures.push(error);
                }
            }
        }
    }
    for ((setup, subject, load), runs) in &samples {
        for run in runs {
            if run.tally.bad + run.tally.errors > 0 {
                failures.push(format!(
                    "{} {} {} {}: {} bad answers, {} socket errors",
                    setup.label(),
                    subject.kind.label(),
                    subject.content.label(),
                    load.label(),
                    run.tally.bad,
                    run.tally.errors
                ));
            }
        }
    }
    let table = render(args, &plan, setups, &samples, &failures, started.elapsed());
    write_results("cost", &table, |path| {
        plot(path, &plan, setups[0], &samples)
    })?;
    drop(places);
    if !failures.is_empty() {
        bail!("{} runs failed:\n{}", failures.len(), failures.join("\n"));
    }
    Ok(())
}

/// The load tools and servers this bench runs.
struct Tools {
    wrk: PathBuf,
    h2load: PathBuf,
    nginx: PathBuf,
    /// This program: `htstress` and `floor` are its subcommands.
    xtask: PathBuf,
}

impl Tools {
    /// Finds every tool, installing the missing Debian packages when root (as the eBPF toolchain
    /// is installed), else naming the commands.
    fn find() -> anyhow::Result<Self> {
        crate::toolchain::install(
            "bench cost",
            &[Step {
                what: "wrk, h2load and nginx (wrk, nghttp2-client, nginx-light)",
                present: || {
                    find_on_path("wrk").is_some()
                        && find_on_path("h2load").is_some()
                        && find_nginx().is_some()
                },
                commands: &[
                    "apt-get update",
                    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                     wrk nghttp2-client nginx-light",
                ],
            }],
        )?;
        let on_path = |tool| find_on_path(tool).with_context(|| format!("{tool} not found"));
        Ok(Self {
            wrk: on_path("wrk")?,
            h2load: on_path("h2load")?,
            nginx: find_nginx().context("nginx not found")?,
            xtask: std::env::current_exe().context("cannot find this program")?,
        })
    }
}

/// A server running for the bench; dropped, it is stopped.
enum Running {
    Process(Guarded),
    Nginx(Nginx),
}

/// Everything a run needs.
struct Bench<'a> {
    plan: &'a Plan,
    place: &'a Place,
    ports: Ports,
    tools: &'a Tools,
    khttpd: &'a Path,
    baseline: Option<&'a Path>,
    site: &'a Path,
    file: &'a [u8],
}

impl Bench<'_> {
    fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.place.server_ip(), port))
    }

    fn url(&self, content: Content) -> String {
        format!(
            "http://{}{}",
            self.server_addr(self.ports.http),
            content.path()
        )
    }

    fn client_threads(&self) -> usize {
        self.place.cpus(Side::Client).len()
    }

    /// Whether `addr` accepts a connection from the client side.
    fn reachable(&self, addr: SocketAddr) -> bool {
        self.place
            .run_in(Side::Client, || accepts(addr))
            .unwrap_or(false)
    }

    /// Starts `subject`, checks its answer, runs every load, stops it.
    fn subject(&self, subject: Subject, name: &str, samples: &mut Samples) -> anyhow::Result<()> {
        eprintln!("{name} starting");
        let running = self.start(subject)?;
        let metrics = self.metrics(&running).context("cannot scrape /metrics")?;
        self.check(subject).context("the answer check")?;
        if subject.content != Content::Echo {
            // Not measured: the first answers (which khttpd's kernel path learns from), nginx's
            // workers and caches, the client side's page cache.
            self.htstress(&["--keep-alive", "-n", "2000", "-c", "10"], subject.content)
                .context("warm-up")?;
        }
        for load in self.plan.loads(subject.content) {
            let label = load.label();
            let sample = self
                .measure(load, subject.content)
                .with_context(|| label.clone())?;
            eprintln!(
                "{name} {label}: {} req/s, server {:.1} µs/req ({:.0}% busy), client {:.0}% busy, p99 {} µs, bad {} errors {}",
                thousands(sample.tally.req_per_s),
                sample.server_us().unwrap_or(0.0),
                100.0 - sample.server.idle,
                100.0 - sample.client.idle,
                sample.tally.p99_us.map_or("–".to_owned(), thousands),
                sample.tally.bad,
                sample.tally.errors,
            );
            samples
                .entry((self.place.setup(), subject, load))
                .or_default()
                .push(sample);
        }
        if let (Some(before), Running::Process(_)) = (metrics, &running) {
            if let Some(after) = self.metrics(&running)? {
                let kernel = |m: &Metrics| m.sum("khttpd_http_kernel_responses_total").unwrap_or(0);
                eprintln!(
                    "{name} the kernel answered {} HTTP requests",
                    thousands(kernel(&after).saturating_sub(kernel(&before)) as f64)
                );
            }
        }
        if let Running::Nginx(nginx) = &running {
            let log = nginx.error_log();
            if !log.trim().is_empty() {
                eprintln!(
                    "{name} nginx's error log: {}",
                    log.trim().replace('\n', " / ")
                );
            }
        }
        eprintln!("{name} stopping");
        drop(running);
        Ok(())
    }

    /// khttpd's `/metrics` from the client side; `None` for the others.
    fn metrics(&self, running: &Running) -> anyhow::Result<Option<Metrics>> {
        match running {
            Running::Process(process) if process.name() == "khttpd" => {
                let addr = self.server_addr(self.ports.metrics);
                self.place
                    .run_in(Side::Client, || Metrics::fetch(addr))?
                    .map(Some)
            }
            _ => Ok(None),
        }
    }

    fn start(&self, subject: Subject) -> anyhow::Result<Running> {
        let http = self.server_addr(self.ports.http);
        let echo = self.server_addr(self.ports.echo);
        let server_cpus = self.place.cpus(Side::Server).len();
        let (mut command, name) = match subject.kind {
            Kind::Nginx => {
                let root = self.site.display();
                let location = match subject.content {
                    // Its best for a 2,000-byte file over the veth, measured (wrk -t1 -c100, one server
                    // CPU): `sendfile off` 46.3k req/s, `sendfile on` 31.6k, with `tcp_nopush on`
                    // 16.0k. Headers and body in one write beat a write and a sendfile.
                    Content::File => format!(
                        "root {root};\n            open_file_cache max=1000 inactive=60s;\n            \
                         open_file_cache_valid 60s;\n            sendfile off;"
                    ),
                    _ => HELLO_LOCATION.to_owned(),
                };
                let conf = NginxConf {
                    workers: server_cpus.to_string(),
                    listen_options: "reuseport",
                    http: "",
                    location: &location,
                };
                let command = self.place.command(Side::Server, &self.tools.nginx)?;
                let nginx = Nginx::launch(command, http, &conf, |addr| self.reachable(addr))?;
                return Ok(Running::Nginx(nginx));
            }
            Kind::Floor => {
                let mut command = self.place.command(Side::Server, &self.tools.xtask)?;
                command.arg("floor").arg("--http").arg(http.to_string());
                command.arg("--echo").arg(echo.to_string());
                command.arg("--threads").arg(server_cpus.to_string());
                if subject.content == Content::File {
                    command.arg("--body-size").arg(FILE_SIZE.to_string());
                }
                (command, "floor")
            }
            kind => {
                let binary = match (kind, self.baseline) {
                    (Kind::Baseline, Some(baseline)) => baseline,
                    _ => self.khttpd,
                };
                let mut command = self.place.command(Side::Server, binary)?;
                let fast_path = match kind {
                    Kind::On => "on",
                    Kind::Auto => "auto",
                    _ => "off",
                };
                command.args(["--fast-path", fast_path, "-q"]);
                command.arg("--iface").arg(self.place.iface());
                command.arg("--port").arg(self.ports.http.to_string());
                command.arg("--echo-port").arg(self.ports.echo.to_string());
                command
                    .arg("--metrics")
                    .arg(self.server_addr(self.ports.metrics).to_string());
                if kind == Kind::Bound {
                    command.args(["--workqueue", "bound"]);
                }
                if subject.content == Content::File {
                    command.arg("--root").arg(self.site);
                }
                (command, "khttpd")
            }
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let said = forward_stderr(child.stderr.take().expect("piped stderr"));
        let mut process = Guarded::new(child, name, &[Signal::TERM]);
        // khttpd serves /metrics last.
        let metrics = (name == "khttpd").then(|| self.server_addr(self.ports.metrics));
        if let Err(error) = process.wait_until(&format!("{http} and {echo}"), || {
            self.reachable(http)
                && self.reachable(echo)
                && metrics.is_none_or(|m| self.reachable(m))
        }) {
            drop(process);
            let said = said.join().unwrap_or_default();
            return Err(error.context(format!("{name} said: {}", said.trim_end())));
        }
        Ok(Running::Process(process))
    }

    /// The same answer from every server: the greeting, the file's bytes, an echo.
    fn check(&self, subject: Subject) -> anyhow::Result<()> {
        if subject.content == Content::Echo {
            let echo = self.server_addr(self.ports.echo);
            return self.place.run_in(Side::Client, || {
                use std::io::{Read as _, Write as _};
                let mut stream = std::net::TcpStream::connect(echo)?;
                stream.set_read_timeout(Some(IO_TIMEOUT))?;
                stream.write_all(b"ping")?;
                let mut reply = [0; 4];
                stream.read_exact(&mut reply)?;
                ensure!(&reply == b"ping", "the echo differs");
                Ok(())
            })?;
        }
        let http = self.server_addr(self.ports.http);
        let request = format!(
            "GET {} HTTP/1.0\r\nHost: bench\r\n\r\n",
            subject.content.path()
        );
        let answer = self
            .place
            .run_in(Side::Client, || {
                answer_until_close(http, request.as_bytes())
            })?
            .with_context(|| format!("GET {}", subject.content.path()))?;
        let body = &answer.body;
        let expected: &[u8] = match subject.content {
            Content::Greeting => HELLO.as_bytes(),
            _ => self.file,
        };
        // The floor's file is a pattern of the right length: no server reads a file faster than
        // one that never opens it.
        let same = match subject.kind {
            Kind::Floor if subject.content == Content::File => body.len() == expected.len(),
            _ => body == expected,
        };
        ensure!(
            answer.status == 200 && same,
            "GET {} was answered with:\n{}\n\n{}",
            subject.content.path(),
            answer.head,
            String::from_utf8_lossy(body)
        );
        Ok(())
    }

    /// One run of `load`, with both sides' CPU time around it.
    fn measure(&self, load: Load, content: Content) -> anyhow::Result<Sample> {
        let (server_cpus, client_cpus) =
            (self.place.cpus(Side::Server), self.place.cpus(Side::Client));
        let server_before = CpuTimes::read_cpus(server_cpus)?;
        let client_before = CpuTimes::read_cpus(client_cpus)?;
        let seconds = self.plan.seconds.to_string();
        let tally = match load {
            Load::KeepAlive => self.wrk(content)?,
            Load::Close => self.htstress(
                &["--duration", &seconds, "-c", &CLOSE_CONCURRENCY.to_string()],
                content,
            )?,
            Load::Pipelined => self.h2load(content)?,
            Load::RateKeepAlive(rate) => self.htstress(
                &[
                    "--keep-alive",
                    "--rate",
                    &rate.to_string(),
                    "--duration",
                    &seconds,
                    "-c",
                    &KEEP_ALIVE_CONNECTIONS
                        .div_ceil(self.client_threads())
                        .to_string(),
                ],
                content,
            )?,
            Load::RateClose(rate) => self.htstress(
                &[
                    "--rate",
                    &rate.to_string(),
                    "--duration",
                    &seconds,
                    "-c",
                    &CLOSE_RATE_IN_FLIGHT.to_string(),
                ],
                content,
            )?,
            Load::PingPong => self.ping_pong()?,
        };
        Ok(Sample {
            tally,
            server: CpuSplit::between(&server_before, &CpuTimes::read_cpus(server_cpus)?),
            client: CpuSplit::between(&client_before, &CpuTimes::read_cpus(client_cpus)?),
        })
    }

    /// Runs a load tool on the client side, bounded in time; its stdout.
    fn client_tool(&self, program: &Path, args: &[String]) -> anyhow::Result<String> {
        let mut command = self.place.command(Side::Client, program)?;
        command.args(args);
        let limit = Duration::from_secs(self.plan.seconds) + LOAD_GRACE;
        let output = output_bounded(&mut command, limit)
            .with_context(|| format!("{} {}", program.display(), args.join(" ")))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        ensure!(
            output.status.success(),
            "{} {} failed ({}): {}{}",
            program.display(),
            args.join(" "),
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(stdout)
    }

    fn wrk(&self, content: Content) -> anyhow::Result<Tally> {
        let args = [
            format!("-t{}", self.client_threads()),
            format!("-c{KEEP_ALIVE_CONNECTIONS}"),
            format!("-d{}s", self.plan.seconds),
            "--latency".to_owned(),
            "--timeout".to_owned(),
            "10s".to_owned(),
            self.url(content),
        ];
        let stdout = self.client_tool(&self.tools.wrk, &args)?;
        let counts =
            parse_wrk(&stdout).with_context(|| format!("cannot read wrk's report:\n{stdout}"))?;
        Ok(Tally {
            answered: counts.good + counts.bad,
            bad: counts.bad,
            errors: counts.errors,
            not_sent: 0,
            req_per_s: counts.req_per_s,
            p50_us: counts.p50_us,
            p99_us: counts.p99_us,
            p999_us: None,
        })
    }

    /// `xtask htstress -q -t <client threads> <flags> URL` on the client side.
    fn htstress(&self, flags: &[&str], content: Content) -> anyhow::Result<Tally> {
        let mut args: Vec<String> = ["htstress", "-q", "-t"].map(str::to_owned).into();
        args.push(self.client_threads().to_string());
        args.extend(flags.iter().map(|&flag| flag.to_owned()));
        args.push(self.url(content));
        let stdout = self.client_tool(&self.tools.xtask, &args)?;
        parse_htstress(&stdout).with_context(|| format!("cannot read htstress's report:\n{stdout}"))
    }

    fn h2load(&self, content: Content) -> anyhow::Result<Tally> {
        let args = [
            "--h1".to_owned(),
            "-D".to_owned(),
            self.plan.seconds.to_string(),
            "-t".to_owned(),
            self.client_threads().to_string(),
            "-c".to_owned(),
            PIPELINE_CONNECTIONS.to_string(),
            "-m".to_owned(),
            PIPELINE_DEPTH.to_string(),
            self.url(content),
        ];
        let stdout = self.client_tool(&self.tools.h2load, &args)?;
        parse_h2load(&stdout).with_context(|| format!("cannot read h2load's report:\n{stdout}"))
    }

    /// Echo connections ping-ponging small messages, driven from a thread in the client namespace.
    fn ping_pong(&self) -> anyhow::Result<Tally> {
        let echo = self.server_addr(self.ports.echo);
        let duration = Duration::from_secs(self.plan.seconds);
        let threads = self.client_threads();
        let (messages, elapsed) = self.place.run_in(Side::Client, || {
            // One worker per client CPU; threads started here inherit the namespace and CPUs.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
                .context("cannot start a runtime")?;
            runtime.block_on(async {
                let streams = connect_all(echo, ECHO_CONNECTIONS).await?;
                let message: Arc<[u8]> = dummy_message(ECHO_MESSAGE).into();
                ping_pong(streams, duration, &message).await
            })
        })??;
        Ok(Tally {
            answered: messages,
            bad: 0,
            errors: 0,
            not_sent: 0,
            req_per_s: messages as f64 / elapsed.as_secs_f64(),
            p50_us: None,
            p99_us: None,
            p999_us: None,
        })
    }
}

/// Reads `cargo xtask htstress`'s report: its `good requests:`, `bad requests:`, `socket
/// errors:`, `requests/sec:` and `latency p50/p99/p99.9:` lines.
fn parse_htstress(text: &str) -> Option<Tally> {
    let value = |prefix: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))?
            .split_whitespace()
            .next()
    };
    let count = |prefix| value(prefix)?.parse::<u64>().ok();
    let latency = |prefix| value(prefix).and_then(|us| us.parse::<f64>().ok());
    let good = count("good requests:")?;
    let bad = count("bad requests:")?;
    Some(Tally {
        answered: good + bad,
        bad,
        errors: count("socket errors:")?,
        not_sent: count("not sent:").unwrap_or(0),
        req_per_s: value("requests/sec:")?.parse().ok()?,
        p50_us: latency("latency p50:"),
        p99_us: latency("latency p99:"),
        p999_us: latency("latency p99.9:"),
    })
}

/// Reads h2load's `finished in 5.00s, 1234.50 req/s, …`, `requests: … N succeeded, N failed, N
/// errored, N timeout` and `status codes: N 2xx, N 3xx, N 4xx, N 5xx` lines.
fn parse_h2load(text: &str) -> Option<Tally> {
    let line = |prefix: &str| text.lines().find_map(|line| line.strip_prefix(prefix));
    // "N word" items separated by commas.
    let item = |list: &str, word: &str| {
        list.split(',').find_map(|item| {
            let (count, name) = item.trim().split_once(' ')?;
            (name.trim() == word).then(|| count.parse::<u64>().ok())?
        })
    };
    let finished = line("finished in ")?;
    let req_per_s = finished
        .split(',')
        .nth(1)?
        .trim()
        .strip_suffix(" req/s")?
        .parse()
        .ok()?;
    let requests = line("requests: ")?;
    let statuses = line("status codes: ")?;
    let good = item(statuses, "2xx")? + item(statuses, "3xx")?;
    let bad = item(statuses, "4xx")? + item(statuses, "5xx")?;
    let unanswered = item(requests, "errored")? + item(requests, "timeout")?;
    Some(Tally {
        answered: good + bad,
        bad,
        errors: unanswered,
        not_sent: 0,
        req_per_s,
        p50_us: None,
        p99_us: None,
        p999_us: None,
    })
}

/// Medians of a row's runs.
struct Row<'a> {
    setup: Setup,
    subject: Subject,
    load: Load,
    runs: &'a [Sample],
}

impl Row<'_> {
    fn median(&self, value: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
        median(self.runs.iter().map(value))
    }

    fn cost(&self) -> Option<f64> {
        self.median(Sample::server_us)
    }

    /// Set-up, server, content and load.
    fn labels(&self) -> [String; 4] {
        [
            self.setup.label().to_owned(),
            self.subject.kind.label().to_owned(),
            self.subject.content.label().to_owned(),
            self.load.label(),
        ]
    }
}

fn render(
    args: &Args,
    plan: &Plan,
    setups: &[Setup],
    samples: &Samples,
    failures: &[String],
    elapsed: Duration,
) -> String {
    let rows: Vec<Row> = setups
        .iter()
        .flat_map(|&setup| plan.subjects.iter().map(move |&subject| (setup, subject)))
        .flat_map(|(setup, subject)| {
            plan.loads(subject.content)
                .into_iter()
                .map(move |load| (setup, subject, load))
        })
        .filter_map(|(setup, subject, load)| {
            let runs = samples.get(&(setup, subject, load))?;
            Some(Row {
                setup,
                subject,
                load,
                runs,
            })
        })
        .collect();
    let cost_of = |kind: Kind, like: &Row| {
        rows.iter()
            .find(|row| {
                row.subject.kind == kind
                    && row.setup == like.setup
                    && row.subject.content == like.subject.content
                    && row.load == like.load
            })
            .and_then(Row::cost)
    };
    let ratio = |cost: Option<f64>, base: Option<f64>| match (cost, base) {
        (Some(cost), Some(base)) if base > 0.0 => format!("{:.2}×", cost / base),
        _ => "–".to_owned(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| set-up | server | content | load | req/s | server CPU % (usr/sys/irq) | client CPU % | server µs/req | × floor | × nginx | p50 µs | p99 µs | p99.9 µs | errors |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in &rows {
        let m = |value: fn(&Sample) -> Option<f64>| row.median(value);
        let busy = |split: fn(&Sample) -> CpuSplit| {
            row.median(|s| Some(100.0 - split(s).idle)).unwrap_or(0.0)
        };
        let server_split = [
            row.median(|s| Some(s.server.user)),
            row.median(|s| Some(s.server.system)),
            row.median(|s| Some(s.server.softirq)),
        ]
        .map(|share| or_dash(share, |v| format!("{v:.0}")));
        let cost = row.cost();
        let failed: u64 = row.runs.iter().map(|s| s.tally.bad + s.tally.errors).sum();
        let not_sent: u64 = row.runs.iter().map(|s| s.tally.not_sent).sum();
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} ({}) | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.labels().join(" | "),
            or_dash(m(|s| Some(s.tally.req_per_s)), thousands),
            busy(|s| s.server),
            server_split.join("/"),
            // On loopback both sides are the same CPUs.
            match row.setup {
                Setup::Isolated => format!("{:.0}", busy(|s| s.client)),
                Setup::Loopback => "=".to_owned(),
            },
            or_dash(cost, |v| format!("{v:.1}")),
            ratio(cost, cost_of(Kind::Floor, row)),
            ratio(cost, cost_of(Kind::Nginx, row)),
            or_dash(m(|s| s.tally.p50_us), thousands),
            or_dash(m(|s| s.tally.p99_us), thousands),
            or_dash(m(|s| s.tally.p999_us), thousands),
            match (failed, not_sent) {
                (0, 0) => "0".to_owned(),
                (0, not_sent) => format!("0 ({} not sent)", thousands(not_sent as f64)),
                (failed, _) => format!("**{failed}**"),
            },
        );
    }
    let _ = writeln!(
        out,
        "\nMedians of {} rounds, {} s per load. own CPU: server on CPU {:?} in its own network \
         namespace (receive processing steered there with RPS), load generators on CPU {:?} in \
         another, joined by a veth; server µs/req = busy time of the server's CPUs (user + system \
         + irq + softirq) / answered requests. shared loopback: server and load generators on \
         every CPU over loopback, as the other benches; server µs/req is then the whole \
         machine's busy time, load generator included. × floor and × nginx compare it with the \
         same set-up's and load's row. One client thread per client CPU. Open-loop rows (`at N \
         req/s`, htstress --rate): latency from each request's scheduled send time. wrk reports \
         no p99.9; h2load and the echo load report no percentiles. `not sent`: open-loop requests \
         still waiting for a connection 10 s after the last was due (the server fell that far \
         behind; their wait so far is in the percentiles). Total time {:.0} s.",
        plan.rounds,
        plan.seconds,
        args.server_cpus,
        args.client_cpus,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "- khttpd on / auto / off: `--fast-path on|auto|off` (default `--dispatch cmwq`); file: \
         `--root`; `khttpd off, bound`: `--workqueue bound` (echo)."
    );
    let _ = writeln!(
        out,
        "- nginx: one worker per server CPU, `listen … reuseport`, `access_log off`; greeting \
         `return 200`; file: `open_file_cache`, `sendfile off` (faster here than `sendfile on`, \
         with or without `tcp_nopush`: 46k vs 32k vs 16k req/s)."
    );
    let _ = writeln!(
        out,
        "- floor: `cargo xtask floor` (reads to the end of each head, writes a fixed answer; no \
         parsing; the file's bytes are in memory)."
    );
    for failure in failures {
        let _ = writeln!(out, "- **failed**: {failure}");
    }
    let _ = writeln!(out, "- `server µs/req` per run:");
    for row in &rows {
        let each: Vec<String> = row
            .runs
            .iter()
            .map(|s| or_dash(s.server_us(), |v| format!("{v:.1}")))
            .collect();
        let _ = writeln!(out, "  - {}: {}", row.labels().join(", "), each.join(" / "));
    }
    out
}

/// Left: the server's µs per request under each closed-loop load as a multiple of the floor's
/// (bars, one per server; echo: `khttpd on` is the kernel echo, `off` the user-space one). Middle
/// and right: p99 latency against offered rate, keep-alive and a connection per request, for the
/// greeting (one line per server, logarithmic).
fn plot(path: &Path, plan: &Plan, setup: Setup, samples: &Samples) -> anyhow::Result<()> {
    let with_text = register_font();
    let root = BitMapBackend::new(path, (2100, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let kinds: Vec<Kind> = {
        let mut kinds: Vec<Kind> = plan
            .subjects
            .iter()
            .filter(|s| s.content != Content::Echo)
            .map(|s| s.kind)
            .collect();
        kinds.sort();
        kinds.dedup();
        kinds
    };
    let cost = |subject: Subject, load: Load| {
        samples
            .get(&(setup, subject, load))
            .and_then(|runs| median(runs.iter().map(Sample::server_us)))
    };
    let closed = [
        (Content::Greeting, Load::KeepAlive, "hello, keep-alive"),
        (Content::Greeting, Load::Close, "hello, conn/req"),
        (Content::Greeting, Load::Pipelined, "hello, pipelined"),
        (Content::File, Load::KeepAlive, "file, keep-alive"),
        (Content::File, Load::Close, "file, conn/req"),
        (Content::File, Load::Pipelined, "file, pipelined"),
        (Content::Echo, Load::PingPong, "echo"),
    ];
    let groups: Vec<String> = closed
        .iter()
        .map(|(_, _, label)| (*label).to_owned())
        .collect();
    let series: Vec<(String, Vec<f64>)> = kinds
        .iter()
        .map(|&kind| {
            let values = closed
                .iter()
                .map(|&(content, load, _)| {
                    let floor = cost(
                        Subject {
                            content,
                            kind: Kind::Floor,
                        },
                        load,
                    );
                    match (cost(Subject { content, kind }, load), floor) {
                        (Some(cost), Some(floor)) if floor > 0.0 => cost / floor,
                        _ => 0.0,
                    }
                })
                .collect();
            (kind.label().to_owned(), values)
        })
        .collect();
    GroupedBars {
        caption: &format!(
            "Server CPU per request ÷ the floor's ({}; lower is better)",
            setup.label()
        ),
        y_desc: "× the floor's µs per request",
        groups: &groups,
        series: &series,
        value_label: &|v| format!("{v:.2}"),
    }
    .draw(&panels[0], with_text)?;

    let rated = [
        (
            format!(
                "Greeting, keep-alive, {}: p99 µs vs offered req/s",
                setup.label()
            ),
            true,
            &plan.rates,
        ),
        (
            format!(
                "Greeting, conn/request, {}: p99 µs vs offered req/s",
                setup.label()
            ),
            false,
            &plan.close_rates,
        ),
    ];
    for ((caption, keep_alive, rates), area) in rated.into_iter().zip(&panels[1..]) {
        let lines: Vec<(Kind, Vec<(f64, f64)>)> = kinds
            .iter()
            .map(|&kind| {
                let points = samples
                    .iter()
                    .filter(|((at, subject, _), _)| {
                        *at == setup
                            && *subject
                                == Subject {
                                    content: Content::Greeting,
                                    kind,
                                }
                    })
                    .filter_map(|((_, _, load), runs)| {
                        let rate = load.offered_rate(keep_alive)?;
                        let p99 = median(runs.iter().map(|s| s.tally.p99_us))?;
                        Some((f64::from(rate), p99.max(1.0)))
                    })
                    .collect();
                (kind, points)
            })
            .collect();
        let max_rate = rates.iter().copied().max().unwrap_or(1) as f64 * 1.1;
        let max_latency = lines
            .iter()
            .flat_map(|(_, points)| points.iter().map(|&(_, p99)| p99))
            .fold(10.0, f64::max)
            * 2.0;
        let mut builder = ChartBuilder::on(area);
        builder.margin(20);
        if with_text {
            builder
                .caption(&caption, ("sans-serif", 18))
                .x_label_area_size(40)
                .y_label_area_size(70);
        }
        let mut chart =
            builder.build_cartesian_2d(0.0..max_rate, (10.0..max_latency).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("offered requests/s")
            .y_desc("p99 µs (from scheduled send)")
            .x_label_formatter(&|x| format!("{:.0}k", x / 1000.0))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for ((kind, points), color) in lines.iter().zip(PALETTE.iter().cycle()) {
            chart.draw_series(
                points
                    .iter()
                    .map(|&point| Circle::new(point, 4, color.filled())),
            )?;
            let drawn = chart.draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?;
            if with_text {
                drawn.label(kind.label()).legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            }
        }
        if with_text {
            crate::bench::draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_h2load_reports() {
        let report = "finished in 5.00s, 230512.40 req/s, 31.21MB/s
requests: 1152562 total, 1153062 started, 1152562 done, 1152560 succeeded, 2 failed, 0 errored, 1 timeout
status codes: 1152560 2xx, 0 3xx, 2 4xx, 0 5xx
";
        let tally = parse_h2load(report).unwrap();
        assert_eq!(tally.req_per_s, 230512.40);
        assert_eq!((tally.answered, tally.bad, tally.errors), (1152562, 2, 1));
        assert!(parse_h2load("no report").is_none());
    }

    #[test]
    fn reads_htstress_reports() {
        // What htstress prints, so the two cannot drift apart.
        let report = crate::htstress::Report {
            requests: 13,
            good: 9,
            bad: 0,
            socket_errors: 1,
            not_sent: 3,
            seconds: 1.0,
            p50_us: Some(120),
            p99_us: None,
            p999_us: Some(900),
            offered_rate: Some(13.0),
        };
        let tally = parse_htstress(&report.to_string()).unwrap();
        assert_eq!(
            (tally.answered, tally.bad, tally.errors, tally.not_sent),
            (9, 0, 1, 3)
        );
        assert_eq!(
            (tally.p50_us, tally.p99_us, tally.p999_us),
            (Some(120.0), None, Some(900.0))
        );
        assert_eq!(tally.req_per_s, 9.0);
    }

    #[test]
    fn every_server_serves_every_content_it_can() {
        let all = subjects(&[], false);
        assert_eq!(all.len(), 14);
        assert!(!all.iter().any(|s| s.kind == Kind::Baseline));
        // With --baseline: the baseline binary serves the greeting and the file.
        assert_eq!(subjects(&[], true).len(), 16);
        assert_eq!(subjects(&[Kind::Baseline], false).len(), 0);
        assert!(!all.contains(&Subject {
            content: Content::Greeting,
            kind: Kind::Bound
        }));
        assert!(all.contains(&Subject {
            content: Content::Echo,
            kind: Kind::Floor
        }));
        assert!(!all
            .iter()
            .any(|s| s.content == Content::Echo && s.kind == Kind::Nginx));
        assert_eq!(subjects(&[Kind::Floor], false).len(), 3);
    }
}
