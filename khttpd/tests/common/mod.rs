//! Starts a real khttpd process for a test and reads its state from the outside: /metrics, its
//! open file descriptors, and the BPF objects it holds (through /proc/<pid>/fdinfo and the bpf()
//! syscall, not through the server's own reports).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

pub const KHTTPD: &str = env!("CARGO_BIN_EXE_khttpd");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `--fast-path on`.
    Kernel,
    /// `--fast-path auto` where BPF is available.
    Auto,
    UserUnbound,
    UserBound,
}

pub const ALL_MODES: [Mode; 3] = [Mode::Kernel, Mode::UserUnbound, Mode::UserBound];

impl Mode {
    /// khttpd with this mode's flags.
    fn command(self) -> Command {
        let mut command = Command::new(KHTTPD);
        command.args(self.args());
        command
    }

    /// Whether the server should say the fast path is on.
    fn fast_path(self) -> bool {
        matches!(self, Mode::Kernel | Mode::Auto)
    }

    pub fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Kernel => &["--fast-path", "on"],
            Mode::Auto => &["--fast-path", "auto"],
            Mode::UserUnbound => &["--fast-path", "off", "--workqueue", "unbound"],
            Mode::UserBound => &["--fast-path", "off", "--workqueue", "bound"],
        }
    }
}

/// Whether this test may load BPF programs: as root, yes. Otherwise the test is skipped — except
/// under CI=true, where a missing capability is a failure.
pub fn bpf_allowed() -> bool {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: BPF tests must run as root"
    );
    eprintln!("skipped: not root, cannot load BPF programs");
    false
}

/// A folder of the test's own under the system's temp dir, removed when dropped; readable by
/// everyone, as the servers serving it drop to `nobody`.
pub fn temp_dir(name: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    tempfile::Builder::new()
        .prefix(&format!("khttpd-{name}-"))
        .permissions(std::fs::Permissions::from_mode(0o755))
        .tempdir()
        .expect("a temp dir")
}

pub struct Server {
    child: Child,
    pub echo_port: u16,
    pub http_port: u16,
    pub metrics_addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    /// Copies the server's log into `stderr` until the server exits.
    reader: Option<thread::JoinHandle<()>>,
    /// Dropped after the server stopped: records its lifetime.
    _lifetime: Lifetime,
}

/// Records when something that may touch the kernel ran, for `cargo xtask test`'s kernel-warning
/// report (issue 15: a WARNING in the psock code taints the kernel once per boot, and only its
/// dmesg timestamp says when). With `KHTTPD_LIFETIMES` set, appends one line per lifetime:
/// `<start> <end> <test> <what>`, both in seconds since boot (dmesg's clock).
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
        let Some(path) = std::env::var_os("KHTTPD_LIFETIMES") else {
            return;
        };
        let test = thread::current().name().unwrap_or("?").to_owned();
        let line = format!("{:.3} {:.3} {test} {}\n", self.start, uptime(), self.what);
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

/// Seconds since boot, as dmesg stamps its lines (CLOCK_BOOTTIME).
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

impl Server {
    /// Starts on ports the kernel picks (port 0), learnt from the server's log: no other
    /// process can take them in between, as one found free and bound later could be (the soak's
    /// clients open tens of thousands).
    pub fn start(mode: Mode, extra: &[&str]) -> Server {
        Server::start_command(mode.command(), extra, mode.fast_path())
    }

    /// Starts on the given ports (e.g. those of a server that just died).
    pub fn start_on(
        mode: Mode,
        extra: &[&str],
        echo_port: u16,
        http_port: u16,
        metrics_addr: SocketAddr,
    ) -> Server {
        let ports = [echo_port, http_port];
        Server::spawn(mode.command(), extra, ports, metrics_addr, mode.fast_path())
    }

    /// Starts with `command` (khttpd with its mode and whatever the test set up, e.g. a seccomp
    /// filter) and waits until it serves, with the fast path on or not as `fast_path` says.
    pub fn start_command(command: Command, extra: &[&str], fast_path: bool) -> Server {
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Server::spawn(command, extra, [0, 0], metrics_addr, fast_path)
    }

    /// Starts khttpd and waits until it serves (port 0: the one it says it listens on).
    fn spawn(
        mut command: Command,
        extra: &[&str],
        [echo_port, http_port]: [u16; 2],
        metrics_addr: SocketAddr,
        fast_path: bool,
    ) -> Server {
        let mut child = command
            .args(["--echo-port", &echo_port.to_string()])
            .args(["--port", &http_port.to_string()])
            .args(["--metrics", &metrics_addr.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn khttpd");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        let reader = thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut sink = sink.lock().unwrap();
                sink.push_str(&line);
                sink.push('\n');
            }
        });
        let what = format!("{:?}", command);
        let mut server = Server {
            child,
            echo_port,
            http_port,
            metrics_addr,
            stderr,
            reader: Some(reader),
            _lifetime: Lifetime::new(what),
        };
        if server.wait_ready(fast_path) {
            return server;
        }
        // It exited: everything it said is in once the pipe's reader has seen the end.
        if let Some(reader) = server.reader.take() {
            let _ = reader.join();
        }
        panic!("khttpd exited before serving:\n{}", server.stderr());
    }

    /// Fills in the ports given as 0 from the server's log lines `http: listening on
    /// 127.0.0.1:<port>`, `echo: …` and `metrics: http://127.0.0.1:<port>/metrics`; whether all
    /// are known.
    fn learn_ports(&mut self) -> bool {
        let log = self.stderr();
        let port_after = |prefix: &str| {
            let at = log.find(prefix)? + prefix.len();
            let digits: String = log[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u16>().ok()
        };
        if self.http_port == 0 {
            self.http_port = port_after("http: listening on 127.0.0.1:").unwrap_or(0);
        }
        if self.echo_port == 0 {
            self.echo_port = port_after("echo: listening on 127.0.0.1:").unwrap_or(0);
        }
        if self.metrics_addr.port() == 0 {
            let port = port_after("metrics: http://127.0.0.1:").unwrap_or(0);
            self.metrics_addr.set_port(port);
        }
        self.http_port != 0 && self.echo_port != 0 && self.metrics_addr.port() != 0
    }

    /// True once it serves (with the fast path as expected); false if it exited first.
    fn wait_ready(&mut self, fast_path: bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if !self.learn_ports() {
                assert!(
                    Instant::now() < deadline,
                    "khttpd did not say where it listens:\n{}",
                    self.stderr()
                );
                thread::sleep(Duration::from_millis(20));
                continue;
            }
            if let Ok(text) = self.try_metrics_text() {
                let enabled = format!("khttpd_fast_path_enabled {}", u8::from(fast_path));
                assert!(
                    text.contains(&enabled),
                    "expected {enabled}:\n{}",
                    self.stderr()
                );
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "khttpd did not start:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn echo_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.echo_port))
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The server's log once it holds every one of `needles`; fails the test if it does not
    /// within 10 s. A thread
    /// copies the log from the pipe, so a line written just before an answer was sent may not be
    /// in `stderr()` yet when the answer arrives.
    pub fn stderr_with(&self, needles: &[&str]) -> String {
        let said = eventually(Duration::from_secs(10), || {
            let log = self.stderr();
            needles.iter().all(|needle| log.contains(needle))
        });
        let log = self.stderr();
        assert!(said, "khttpd did not say {needles:?} within 10 s:\n{log}");
        log
    }

    fn try_metrics_text(&self) -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics_addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    }

    /// Every sample of /metrics, keyed by name with labels.
    pub fn metrics(&self) -> HashMap<String, u64> {
        let text = self.try_metrics_text().expect("metrics endpoint");
        let body = text.split("\r\n\r\n").nth(1).expect("metrics body");
        body.lines()
            .filter(|line| !line.starts_with('#') && !line.is_empty())
            .map(|line| {
                let (name, value) = line.rsplit_once(' ').unwrap();
                (name.to_owned(), value.parse().unwrap())
            })
            .collect()
    }

    pub fn metric(&self, name: &str) -> u64 {
        *self
            .metrics()
            .get(name)
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    /// Open file descriptors of the server process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Ids of the BPF programs and maps the server holds, read from /proc/<pid>/fdinfo.
    pub fn bpf_ids(&self) -> (Vec<u32>, Vec<u32>) {
        let (mut programs, mut maps) = (Vec::new(), Vec::new());
        for entry in std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid()))
            .unwrap()
            .flatten()
        {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            for line in info.lines() {
                if let Some(id) = line.strip_prefix("prog_id:") {
                    programs.push(id.trim().parse().unwrap());
                } else if let Some(id) = line.strip_prefix("map_id:") {
                    maps.push(id.trim().parse().unwrap());
                }
            }
        }
        programs.sort_unstable();
        programs.dedup();
        maps.sort_unstable();
        maps.dedup();
        (programs, maps)
    }

    /// Entries in the server's echo sockhash, read through the bpf() syscall by map id.
    pub fn sockhash_entries(&self) -> usize {
        self.echo_map_entries(khttpd_common::echo::SOCKETS_MAP)
    }

    /// Entries in one of the server's per-connection echo maps (`ECHO_SOCKETS`, `ECHO_DETACHED`,
    /// `ECHO_CONNECTIONS`; all keyed by socket cookie), read through bpf() by map id.
    pub fn echo_map_entries(&self, name: &str) -> usize {
        // The kernel keeps 15 bytes of a map's name.
        let kernel_name = &name[..name.len().min(15)];
        let (_, maps) = self.bpf_ids();
        for id in maps {
            let Ok(info) = aya::maps::MapInfo::from_id(id) else {
                continue;
            };
            if info.name_as_str() != Some(kernel_name) {
                continue;
            }
            let data = aya::maps::MapData::from_id(id).unwrap();
            let map = aya::maps::Map::from_map_data(data).unwrap();
            if matches!(map, aya::maps::Map::SockHash(_)) {
                let map: aya::maps::SockHash<_, u64> = map.try_into().unwrap();
                return map.keys().filter(Result::is_ok).count();
            }
            let map: aya::maps::HashMap<_, u64, khttpd_common::echo::Connection> =
                map.try_into().unwrap();
            return map.keys().filter(Result::is_ok).count();
        }
        panic!("server holds no {name} map");
    }

    /// SIGTERM, then the exit status (killed after 15 s).
    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) -> ExitStatus {
        signal(self.pid(), libc::SIGKILL);
        wait_bounded(&mut self.child, Duration::from_secs(15)).expect("SIGKILL ends khttpd")
    }

    pub fn terminate(mut self) -> ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        wait_bounded(&mut self.child, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("khttpd ignored SIGTERM:\n{}", self.stderr()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.pid(), libc::SIGTERM);
            if wait_bounded(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // The server is gone: its log is complete once the reader has seen the pipe's end.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        record_leaks(&self.stderr());
    }
}

/// For `cargo xtask leak-check` (issue 15): with `KHTTPD_LEAK_LOG` set, appends every line of a
/// stopped server's log that reports a socket closed with memory still charged to that file,
/// after the test's name and a tab.
fn record_leaks(log: &str) {
    let Some(path) = std::env::var_os("KHTTPD_LEAK_LOG") else {
        return;
    };
    let test = thread::current().name().unwrap_or("?").to_owned();
    let found: String = log
        .lines()
        .filter(|line| line.contains(khttpd::socket_memory::LOG_PHRASE))
        .map(|line| format!("{test}\t{line}\n"))
        .collect();
    if found.is_empty() {
        return;
    }
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = file.write_all(found.as_bytes());
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: signals our own child by pid.
    unsafe { libc::kill(pid as i32, sig) };
}

pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` until it is true or `limit` passes; returns the last result.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Ids of all BPF programs loaded on the machine.
pub fn loaded_program_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|info| info.id())
        .collect()
}

/// The xtask binary of the same profile as the khttpd under test, built (or found up to date) by
/// cargo once per test process, so the htstress it runs is never a stale one.
pub fn xtask_binary() -> &'static Path {
    static XTASK: OnceLock<PathBuf> = OnceLock::new();
    XTASK.get_or_init(|| {
        // target/<profile dir>/khttpd → build xtask into the same directory.
        let profile_dir = Path::new(KHTTPD).parent().unwrap();
        let target_dir = profile_dir.parent().unwrap();
        let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
            "debug" => "dev",
            other => other,
        };
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--package",
                "xtask",
                "--profile",
                profile,
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace)
            .stdin(Stdio::null())
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build --package xtask: {status}");
        profile_dir.join("xtask")
    })
}

impl Server {
    /// Freezes the server's map `name` (BPF_MAP_FREEZE): from then on every write to it from
    /// user space fails with EPERM while the programs' own writes go on — a map that refuses
    /// updates, injected from outside into the real server.
    pub fn freeze_map(&self, name: &str) {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        // The kernel keeps the first 15 bytes of a map's name.
        let kernel_name = &name[..name.len().min(15)];
        let (_, maps) = self.bpf_ids();
        for id in maps {
            let Ok(info) = aya::maps::MapInfo::from_id(id) else {
                continue;
            };
            if info.name_as_str() == Some(kernel_name) {
                let map = aya::maps::MapData::from_id(id).unwrap();
                let fd = map.fd().as_fd().as_raw_fd() as u32;
                const BPF_MAP_FREEZE: libc::c_long = 22;
                // SAFETY: the attribute is the map's fd, read by the kernel during the call.
                let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, &raw const fd, 4) };
                assert_eq!(
                    rc,
                    0,
                    "freezing {name}: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
        }
        panic!("server holds no map {name}");
    }
}

/// Sends `request` on a kept-alive connection and reads one answer: (status, body). The answer
/// must have a Content-Length (every answer of khttpd does, except to HEAD and 304).
pub fn ask(stream: &mut TcpStream, request: &[u8]) -> (u16, Vec<u8>) {
    stream.write_all(request).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("an answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("Content-Length: "))
        .map_or(0, |value| value.parse().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (head[9..12].parse().unwrap(), body)
}
