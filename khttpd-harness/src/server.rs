//! A khttpd process for a test or a bench, read from the outside: it starts on ports the kernel
//! picks (port 0, learnt from its log) unless told others, is ready once `/metrics` answers with
//! the fast path as its flags asked, keeps its whole log (and passes warnings on to stderr), and
//! is stopped when dropped (SIGTERM, so it detaches its programs itself; SIGKILL if it does not
//! exit).
//!
//! For `cargo xtask test`, a stopped server also leaves two records (only where the variables are
//! set): its lifetime ([`LIFETIMES_VARIABLE`]) for the kernel-warning report, and every log line
//! about a socket closed with memory still charged ([`LEAK_LOG_VARIABLE`]).

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::Path,
    process::{ChildStderr, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::{
    bpf,
    metrics::Metrics,
    process::{Guarded, Signal},
    system,
};

/// Appends `<start> <end> <test> <what>` per server lifetime, in seconds since boot.
pub const LIFETIMES_VARIABLE: &str = "KHTTPD_LIFETIMES";
/// Appends `<test>\t<line>` per log line about a socket closed with memory still charged.
pub const LEAK_LOG_VARIABLE: &str = "KHTTPD_LEAK_LOG";

/// One way of running khttpd, by its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--fast-path on`: connections start in the kernel.
    Kernel,
    /// `--fast-path auto` (the default): user space first, keep-alive connections move in.
    Auto,
    /// `--fast-path off`, the unbound work queue (cmwq).
    UserUnbound,
    /// `--fast-path off`, the bound (per-CPU) work queue.
    UserBound,
    /// `--fast-path off`, a thread per connection.
    Thread,
}

/// The modes every service must behave the same in.
pub const ALL_MODES: [Mode; 3] = [Mode::Kernel, Mode::UserUnbound, Mode::UserBound];

impl Mode {
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Kernel => &["--fast-path", "on"],
            Mode::Auto => &["--fast-path", "auto"],
            Mode::UserUnbound => &["--fast-path", "off", "--workqueue", "unbound"],
            Mode::UserBound => &["--fast-path", "off", "--workqueue", "bound"],
            Mode::Thread => &["--fast-path", "off", "--dispatch", "thread"],
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::Auto => "auto",
            Mode::UserUnbound => "user-unbound",
            Mode::UserBound => "user-bound",
            Mode::Thread => "thread",
        }
    }

    /// khttpd with this mode's flags.
    pub fn command(self, khttpd: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(khttpd);
        command.args(self.args());
        command
    }
}

/// A running khttpd; dropped, it is stopped.
pub struct Server {
    process: Guarded,
    echo: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
    log: Arc<Mutex<String>>,
    /// Copies the server's log into `log` until the server exits.
    reader: Option<thread::JoinHandle<()>>,
    /// Dropped after the server stopped: records its lifetime.
    _lifetime: Lifetime,
}

impl Server {
    /// Starts `khttpd` in `mode` with `extra` flags.
    pub fn start(khttpd: impl AsRef<OsStr>, mode: Mode, extra: &[&str]) -> anyhow::Result<Self> {
        let mut command = mode.command(khttpd);
        command.args(extra);
        Self::start_command(command)
    }

    /// Starts `command` (khttpd with its flags and whatever the caller set up, e.g. a seccomp
    /// filter or a limit) and waits until it serves. `--port`, `--echo-port` and `--metrics` are
    /// added as 0 where the command has none.
    pub fn start_command(mut command: Command) -> anyhow::Result<Self> {
        let given: Vec<&OsStr> = command.get_args().collect();
        let has = |flag: &str| given.iter().any(|arg| *arg == flag);
        let fast_path = given
            .iter()
            .position(|arg| *arg == "--fast-path")
            .and_then(|at| given.get(at + 1)?.to_str())
            .map(str::to_owned);
        let missing: Vec<[&str; 2]> = [
            ["--port", "0"],
            ["--echo-port", "0"],
            ["--metrics", "127.0.0.1:0"],
        ]
        .into_iter()
        .filter(|[flag, _]| !has(flag))
        .collect();
        command.args(missing.into_iter().flatten());
        let what = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {:?}", command.get_program()))?;
        let log = Arc::new(Mutex::new(String::new()));
        let reader = keep_log(child.stderr.take().expect("piped stderr"), Arc::clone(&log));
        let mut server = Self {
            process: Guarded::new(child, "khttpd", &[Signal::TERM]),
            echo: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            reader: Some(reader),
            _lifetime: Lifetime::new(what),
        };
        if let Err(error) = server.wait_ready(fast_path.as_deref()) {
            // Stopped, its log is complete once the reader has seen the pipe's end.
            let _ = server.process.stop();
            if let Some(reader) = server.reader.take() {
                let _ = reader.join();
            }
            return Err(error.context(format!("khttpd said:\n{}", server.log())));
        }
        Ok(server)
    }

    /// Waits until the log says where it listens (`http: listening on 127.0.0.1:<port>`, `echo: …`,
    /// `metrics: http://127.0.0.1:<port>/metrics`) and `/metrics` answers, then checks it says the
    /// fast path is on (`on`) or off (`off`) as asked.
    fn wait_ready(&mut self, fast_path: Option<&str>) -> anyhow::Result<()> {
        let log = Arc::clone(&self.log);
        let mut ports = None;
        self.process.wait_until("its log and /metrics", || {
            ports = ports_in(&log.lock().unwrap());
            ports.is_some_and(|[_, _, metrics]| {
                Metrics::fetch(SocketAddr::from(([127, 0, 0, 1], metrics))).is_ok()
            })
        })?;
        let [http, echo, metrics] = ports.expect("known once ready");
        self.http.set_port(http);
        self.echo.set_port(echo);
        self.metrics.set_port(metrics);
        let enabled = self.metrics()?.value("khttpd_fast_path_enabled")?;
        let expected = match fast_path {
            Some("on") => Some(1),
            Some("off") => Some(0),
            _ => None,
        };
        if expected.is_some_and(|expected| expected != enabled) {
            bail!(
                "asked for --fast-path {fast_path:?}, it says khttpd_fast_path_enabled {enabled}"
            );
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn echo_addr(&self) -> SocketAddr {
        self.echo
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The server's log once it holds every one of `needles`; an error if it does not within
    /// 10 s. A thread copies the log from the pipe, so a line written just before an answer was
    /// sent may not be in [`Server::log`] yet when the answer arrives.
    pub fn log_with(&self, needles: &[&str]) -> anyhow::Result<String> {
        let said = crate::eventually(Duration::from_secs(10), || {
            let log = self.log();
            needles.iter().all(|needle| log.contains(needle))
        });
        let log = self.log();
        if !said {
            bail!("khttpd did not say {needles:?} within 10 s:\n{log}");
        }
        Ok(log)
    }

    /// Its `/metrics` now.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        Metrics::fetch(self.metrics)
    }

    /// Open file descriptors of the server process.
    pub fn fd_count(&self) -> anyhow::Result<usize> {
        system::fd_count(self.pid())
    }

    /// Its resident set size, in KiB.
    pub fn vm_rss_kib(&self) -> anyhow::Result<u64> {
        system::status_kib(self.pid(), "VmRSS")
    }

    /// Ids of the BPF programs and maps it holds.
    pub fn bpf_ids(&self) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
        bpf::ids_of(self.pid())
    }

    /// Entries in its per-connection map `name` ([`bpf::HeldMap::entries`]).
    pub fn map_entries(&self, name: &str) -> anyhow::Result<usize> {
        bpf::find(&bpf::maps_of(self.pid())?, name)?.entries()
    }

    /// SIGTERM, then the exit status; an error if it ignored SIGTERM (it is killed then).
    pub fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        self.process.stop().with_context(|| self.log())
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) -> anyhow::Result<ExitStatus> {
        self.process
            .signal_and_wait(Signal::KILL, crate::process::STOP_TIMEOUT)
            .context("SIGKILL did not end khttpd")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.process.stop();
        // The server is gone: its log is complete once the reader has seen the pipe's end.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        record_leaks(&self.log());
    }
}

/// The HTTP, echo and metrics ports a log says the server listens on, once it says all three.
fn ports_in(log: &str) -> Option<[u16; 3]> {
    let port_after = |prefix: &str| {
        let at = log.find(prefix)? + prefix.len();
        let digits: String = log[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u16>().ok()
    };
    Some([
        port_after("http: listening on 127.0.0.1:")?,
        port_after("echo: listening on 127.0.0.1:")?,
        port_after("metrics: http://127.0.0.1:")?,
    ])
}

/// Copies the server's log into `log`, line by line, until it ends; passes on every line that
/// is not at INFO level (or below) to this process's stderr.
fn keep_log(pipe: ChildStderr, log: Arc<Mutex<String>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            // `[<time> LEVEL] message`, as env_logger writes it.
            let level = line.split_whitespace().nth(1).unwrap_or_default();
            if !matches!(
                level,
                "INFO" | "INFO]" | "DEBUG" | "DEBUG]" | "TRACE" | "TRACE]"
            ) {
                eprintln!("khttpd: {line}");
            }
            let mut log = log.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    })
}

/// Records when something that may touch the kernel ran, for `cargo xtask test`'s kernel-warning
/// report (issue 15: a WARNING in the psock code taints the kernel once per boot, and only its
/// dmesg timestamp says when). With [`LIFETIMES_VARIABLE`] set, appends one line per lifetime.
pub struct Lifetime {
    start: f64,
    what: String,
}

impl Lifetime {
    pub fn new(what: impl Into<String>) -> Lifetime {
        Lifetime {
            start: uptime(),
            what: what.into(),
        }
    }
}

impl Drop for Lifetime {
    fn drop(&mut self) {
        let test = thread::current().name().unwrap_or("?").to_owned();
        let line = format!("{:.3} {:.3} {test} {}\n", self.start, uptime(), self.what);
        append(LIFETIMES_VARIABLE, &line);
    }
}

/// Seconds since boot, as dmesg stamps its lines (CLOCK_BOOTTIME).
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// With [`LEAK_LOG_VARIABLE`] set, appends every line of a stopped server's log that reports a
/// socket closed with memory still charged, after the test's name and a tab.
fn record_leaks(log: &str) {
    let test = thread::current().name().unwrap_or("?").to_owned();
    let found: String = log
        .lines()
        .filter(|line| line.contains(khttpd_common::CHARGED_AT_CLOSE))
        .map(|line| format!("{test}\t{line}\n"))
        .collect();
    if !found.is_empty() {
        append(LEAK_LOG_VARIABLE, &found);
    }
}

/// Appends `text` to the file the environment variable `variable` names, if it is set.
fn append(variable: &str, text: &str) {
    let Some(path) = std::env::var_os(variable) else {
        return;
    };
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(Path::new(&path))
    {
        let _ = file.write_all(text.as_bytes());
    }
}
