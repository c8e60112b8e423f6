//! The `khttpd` command: parses the flags and runs `khttpd::server` until SIGINT or SIGTERM
//! (`khttpd top` instead shows a running server: `khttpd::top`). The modules it wires together
//! are in the library (`lib.rs` tells how a connection flows).

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{
    parser::ValueSource, ArgAction, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand,
};
use log::{info, warn};
use tokio::signal::unix;

use khttpd::{
    access_log::Format,
    config,
    http::{file_cache, Dispatch, Timeouts},
    privileges,
    server::{self, FastPathMode},
    top,
    workqueue::Kind,
};

/// An HTTP and echo server whose hot path runs inside the kernel (sockmap programs).
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A live view of a running server (requests/s by path, passes, kernel cache, connections,
    /// work queues, echo, access log), read from its --metrics endpoint; q quits.
    Top(top::Args),
    /// Check a config file and print the configuration it gives (exit 0), or say what is wrong
    /// with it, line and key (exit 1).
    Check {
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
    },
}

/// Serving (the flags without a command).
#[derive(Debug, clap::Args)]
struct Args {
    /// Read these settings from a TOML file first (keys are the flags' names: `port = 80`,
    /// `fast-path = "on"`); flags given here override it. `khttpd check --config FILE` checks it.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Network interface to listen on (all its addresses; the sockets are bound to it).
    #[arg(long, default_value = "lo")]
    iface: String,
    /// TCP port of the HTTP service.
    #[arg(long, default_value_t = 8081)]
    port: u16,
    /// How user space serves HTTP connections: work items on the work queue, or a thread each.
    #[arg(long, value_enum, default_value_t = Dispatch::Cmwq)]
    dispatch: Dispatch,
    /// TCP port of the echo service.
    #[arg(long, default_value_t = 12345)]
    echo_port: u16,
    /// Listen backlog of each listening socket.
    #[arg(long, default_value_t = 4096)]
    backlog: i32,
    /// Whether the kernel answers.
    #[arg(long, value_enum, default_value_t = FastPathMode::Auto)]
    fast_path: FastPathMode,
    /// Work queue for connections served in user space: one shared pool, or one pool per CPU.
    #[arg(long, value_enum, default_value_t = Kind::Unbound)]
    workqueue: Kind,
    /// Most connections user space serves at once per worker pool (each is one work item); more
    /// wait in the queue.
    #[arg(long, default_value_t = 65_536)]
    max_active: usize,
    /// Answer every GET with this file's contents (read once at start, at most 1 MiB) instead of
    /// "Hello, World!".
    #[arg(long, value_name = "FILE", conflicts_with = "root")]
    body: Option<std::path::PathBuf>,
    /// Largest answer (headers included) the kernel learns and sends itself; 0 turns learning off.
    #[arg(long, value_name = "BYTES", default_value_t = khttpd_common::http::MAX_RESPONSE,
          value_parser = config::parse_kernel_cache_max)]
    kernel_cache_max: u32,
    /// Serve the files under this directory (listings for directories without index.html).
    #[arg(long, value_name = "DIR")]
    root: Option<std::path::PathBuf>,
    /// With --root: bytes of complete answers (small files, listings, 304s, 404s) kept in memory
    /// for the next request that asks the same; 0 turns the answer cache off.
    #[arg(long, value_name = "BYTES", default_value_t = file_cache::Limits::DEFAULT.answer_bytes)]
    file_cache_max: u64,
    /// With --root: files too large for the answer cache kept open (with their answer's head)
    /// for the next request that asks the same; 0 turns the open-file cache off.
    #[arg(long, value_name = "N", default_value_t = file_cache::Limits::DEFAULT.open_files)]
    open_file_cache: u64,
    /// Close HTTP connections that send nothing for this many seconds between requests (also
    /// those the kernel serves: traffic it answers counts).
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = config::parse_seconds)]
    idle_timeout: u64,
    /// Answer 408 and close when a request head takes longer than this many seconds from its
    /// first byte (slow-header clients).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = config::parse_seconds)]
    header_timeout: u64,
    /// Most HTTP connections open at once (user space and kernel); past it new connections get
    /// `503 Service Unavailable` and are closed.
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    max_connections: usize,
    /// Write a line per HTTP request to this file (`-`: standard output), the kernel's answers
    /// included; SIGUSR1 reopens it (after logrotate's rename).
    #[arg(long, value_name = "PATH")]
    access_log: Option<std::path::PathBuf>,
    /// The access log's lines: nginx's `combined`, or one JSON object each.
    #[arg(long, value_enum, default_value_t = Format::Combined)]
    access_log_format: Format,
    /// Serve Prometheus metrics at http://<addr>/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Once the programs are loaded and the ports bound, run as this user, without capabilities,
    /// confined to --root (chroot) if given. `root` keeps every privilege (not recommended).
    #[arg(long, value_name = "NAME", default_value = "nobody")]
    user: String,
    /// More log output (-v debug, including the eBPF programs' logs; -vv trace).
    #[arg(short, long, action = ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Less log output (-q warnings and errors only, -qq errors only).
    #[arg(short, long, action = ArgAction::Count)]
    quiet: u8,
}

/// Every setting a config file may hold, once: how each is taken from a file (unless its flag was
/// given) and how the effective one is written back.
macro_rules! settings {
    (plain: $($plain:ident),*; optional: $($optional:ident),*) => {
        impl Args {
            /// Takes from `file` every setting whose flag `matches` did not get on the command line.
            fn apply(&mut self, file: config::File, matches: &ArgMatches) {
                let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
                $(if let Some(value) = file.$plain {
                    if !given(stringify!($plain)) {
                        self.$plain = value;
                    }
                })*
                $(if file.$optional.is_some() && !given(stringify!($optional)) {
                    self.$optional = file.$optional;
                })*
            }

            /// The effective settings, as a config file would say them.
            fn to_file(&self) -> config::File {
                config::File {
                    $($plain: Some(self.$plain.clone()),)*
                    $($optional: self.$optional.clone(),)*
                }
            }
        }
    };
}

settings!(
    plain: iface, port, dispatch, echo_port, backlog, fast_path, workqueue, max_active,
        kernel_cache_max, file_cache_max, open_file_cache, idle_timeout, header_timeout,
        max_connections, access_log_format, user, verbose, quiet;
    optional: body, root, access_log, metrics
);

impl Args {
    /// The flags of `matches`, over the settings of `--config` when given.
    fn from_matches(matches: &ArgMatches) -> anyhow::Result<Args> {
        let mut args = Args::from_arg_matches(matches)?;
        if let Some(path) = args.config.clone() {
            args.apply(config::read(&path)?, matches);
        }
        args.check()?;
        Ok(args)
    }

    /// What the flags' parsers cannot check alone.
    fn check(&self) -> anyhow::Result<()> {
        if self.body.is_some() && self.root.is_some() {
            anyhow::bail!(
                "body and root cannot both be set (--body answers every GET with one file)"
            );
        }
        if self.verbose > 0 && self.quiet > 0 {
            anyhow::bail!("verbose and quiet cannot both be set");
        }
        Ok(())
    }

    fn log_level(&self) -> log::LevelFilter {
        match (self.verbose, self.quiet) {
            (0, 0) => log::LevelFilter::Info,
            (1, _) => log::LevelFilter::Debug,
            (_, 0) => log::LevelFilter::Trace,
            (_, 1) => log::LevelFilter::Warn,
            _ => log::LevelFilter::Error,
        }
    }

    fn config(self) -> server::Config {
        server::Config {
            iface: self.iface,
            http_port: self.port,
            echo_port: self.echo_port,
            backlog: self.backlog,
            dispatch: self.dispatch,
            fast_path: self.fast_path,
            workqueue: self.workqueue,
            max_active: self.max_active,
            body: self.body,
            kernel_cache_max: self.kernel_cache_max,
            root: self.root,
            file_cache: file_cache::Limits {
                answer_bytes: self.file_cache_max,
                open_files: self.open_file_cache,
            },
            timeouts: Timeouts {
                idle: Duration::from_secs(self.idle_timeout),
                head: Duration::from_secs(self.header_timeout),
            },
            max_connections: self.max_connections,
            access_log: self.access_log,
            access_log_format: self.access_log_format,
            metrics: self.metrics,
            user: self.user,
        }
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match &cli.command {
        Some(Command::Top(top)) => return exit("khttpd top", top::run(top)),
        Some(Command::Check { config }) => return exit("khttpd check", check(config)),
        None => {}
    }
    let args = match Args::from_matches(&matches) {
        Ok(args) => args,
        Err(e) => return exit("khttpd", Err(e)),
    };
    let level = args.log_level();
    env_logger::Builder::new()
        .filter_level(level)
        // aya's own loader chatter (relocations, feature probes) only at -vv.
        .filter_module("aya", level.min(log::LevelFilter::Info))
        .filter_module("aya_obj", level.min(log::LevelFilter::Info))
        .format_target(false)
        .init();
    raise_fd_limit(args.max_connections);
    privileges::forbid_new_privileges();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("khttpd: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // One line, whatever the cause chain.
    exit("khttpd", runtime.block_on(run(args.config())))
}

/// `khttpd check --config FILE`: the file over the defaults, checked, printed as TOML.
fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let defaults = Cli::command().get_matches_from(["khttpd"]);
    let mut args = Args::from_arg_matches(&defaults)?;
    args.apply(config::read(path)?, &defaults);
    args.check()
        .with_context(|| format!("--config {}", path.display()))?;
    print!("{}", config::render(&args.to_file()));
    eprintln!(
        "khttpd check: {}: the configuration is valid",
        path.display()
    );
    Ok(())
}

/// The exit status of `result`, saying its error in one line.
fn exit(what: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: server::Config) -> anyhow::Result<()> {
    // Registered before anything is attached, so a signal during start-up still shuts down
    // cleanly (it is seen once the server serves).
    let mut sigterm = unix::signal(unix::SignalKind::terminate())?;
    let mut sigint = unix::signal(unix::SignalKind::interrupt())?;
    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("SIGINT: shutting down"),
        }
    };
    server::run(config, stop).await
}

/// File descriptors beyond one per HTTP connection: listeners, BPF objects, epoll and event fds,
/// files being sent under `--root`, connections lingering after a 503, echo connections.
const FD_SLACK: u64 = 4096;

/// Raises RLIMIT_NOFILE: the soft limit to the hard one (echo connections have no limit of their
/// own), and both to what `--max-connections` needs plus `FD_SLACK` when the hard limit is lower
/// and raising it is allowed (CAP_SYS_RESOURCE; at most /proc/sys/fs/nr_open). Never lowers it.
/// When the limit stays short, says so: past it accept fails with EMFILE and new connections wait
/// in the backlog instead of getting a 503.
fn raise_fd_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(FD_SLACK);
    // `None` is RLIM_INFINITY.
    let limit = getrlimit(Resource::Nofile);
    let (mut current, max) = (
        limit.current.unwrap_or(u64::MAX),
        limit.maximum.unwrap_or(u64::MAX),
    );
    // No process may have a higher limit than nr_open.
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(wanted);
    let both = wanted.min(ceiling).max(max);
    for attempt in [both, max] {
        if attempt <= current {
            continue;
        }
        let raised = Rlimit {
            current: Some(attempt),
            maximum: Some(attempt),
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            log::debug!("file descriptor limit raised to {attempt}");
            current = attempt;
            break;
        }
    }
    if current < wanted {
        warn!(
            "the file descriptor limit is {current} (hard limit {max}), below the {wanted} that \
             --max-connections {max_connections} needs (one per connection + {FD_SLACK}): once it \
             is reached, new connections wait unaccepted (EMFILE) instead of getting a 503; raise \
             it (ulimit -n, LimitNOFILE=) or lower --max-connections"
        );
    }
}
