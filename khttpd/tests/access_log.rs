//! The access log (`--access-log`) against a real server: one line per request in every mode —
//! the kernel's answers included — with the status and body bytes the client got; a rotation
//! (rename + SIGUSR1) loses no line; a log that cannot keep up drops lines, counts them, and never
//! slows an answer.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use common::{htstress, report_number, KHTTPD};
use khttpd_harness::{eventually, system::bpf_allowed, system::temp_dir, Mode, Server};
use serde_json::Value;

/// Bytes of the greeting's body.
const GREETING: u64 = "Hello, World!\n".len() as u64;

fn logged(mode: Mode, log: &Path, format: &str) -> Server {
    let log = log.to_str().unwrap();
    Server::start(
        KHTTPD,
        mode,
        &["--access-log", log, "--access-log-format", format],
    )
    .unwrap()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn json_lines(path: &Path) -> Vec<Value> {
    lines(path)
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Sends `request` on a connection of its own and reads until the server closes: (client port,
/// status, body bytes).
fn ask_alone(addr: SocketAddr, request: &[u8]) -> (u16, u16, u64) {
    let mut stream = khttpd_harness::http::connect(addr).unwrap();
    let port = stream.local_addr().unwrap().port();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("a FIN, not a reset");
    let status = std::str::from_utf8(&answer[9..12])
        .unwrap()
        .parse()
        .unwrap();
    let head = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    (port, status, (answer.len() - head) as u64)
}

fn dropped(server: &Server) -> u64 {
    server
        .metrics()
        .unwrap()
        .sum("khttpd_access_log_dropped_total")
        .unwrap()
}

fn written(server: &Server) -> u64 {
    server
        .metrics()
        .unwrap()
        .sum("khttpd_access_log_lines_total")
        .unwrap()
}

#[test]
fn every_request_has_one_line_with_what_the_client_got() {
    const KEEP_ALIVE: u64 = 3000;
    const CLOSING: u64 = 300;
    // Each on a connection of its own, with answers of their own.
    let probes: [&[u8]; 4] = [
        b"HEAD / HTTP/1.1\r\nHost: a\r\nUser-Agent: probe/1\r\nReferer: http://r/x\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET /x HTTP/9.9\r\n\r\n",
        b"BAD\"REQUEST\r\n\r\n",
    ];
    for mode in [Mode::Kernel, Mode::Auto, Mode::UserUnbound] {
        if mode != Mode::UserUnbound && !bpf_allowed() {
            continue;
        }
        let dir = temp_dir("access-log").unwrap();
        let path = dir.path().join("access.log");
        let server = logged(mode, &path, "json");
        let keep_alive = htstress(
            server.http_addr(),
            &["--keep-alive", "-n", &KEEP_ALIVE.to_string(), "-c", "4"],
        );
        let closing = htstress(server.http_addr(), &["-n", &CLOSING.to_string(), "-c", "2"]);
        assert_eq!(report_number(&keep_alive, "good requests:"), KEEP_ALIVE);
        assert_eq!(report_number(&closing, "good requests:"), CLOSING);
        let asked: Vec<_> = probes
            .iter()
            .map(|request| ask_alone(server.http_addr(), request))
            .collect();

        let expected = (KEEP_ALIVE + CLOSING) as usize + probes.len();
        assert!(
            eventually(Duration::from_secs(10), || lines(&path).len() >= expected),
            "{mode:?}: {} lines, {expected} requests",
            lines(&path).len()
        );
        let lines = json_lines(&path);
        assert_eq!(lines.len(), expected, "{mode:?}: one line per request");
        let greetings = lines
            .iter()
            .filter(|line| {
                line["request"]
                    .as_str()
                    .unwrap()
                    .starts_with("GET / HTTP/1.")
                    && line["status"] == 200
                    && line["body_bytes_sent"] == GREETING
            })
            .count();
        assert_eq!(greetings as u64, KEEP_ALIVE + CLOSING, "{mode:?}");
        for ((port, status, body), request) in asked.iter().zip(probes) {
            let line = lines
                .iter()
                .find(|line| line["remote_port"] == *port)
                .unwrap_or_else(|| panic!("{mode:?}: no line for port {port}"));
            let request_line = String::from_utf8_lossy(request)
                .lines()
                .next()
                .unwrap()
                .to_owned();
            assert_eq!(line["request"], request_line.as_str(), "{mode:?}: {line}");
            assert_eq!(line["status"], *status, "{mode:?}: {line}");
            assert_eq!(line["body_bytes_sent"], *body, "{mode:?}: {line}");
            assert_eq!(line["remote_addr"], "127.0.0.1", "{mode:?}: {line}");
            assert_eq!(line["path"], "user", "{mode:?}: {line}");
        }
        let first = lines
            .iter()
            .find(|line| line["remote_port"] == asked[0].0)
            .unwrap();
        assert_eq!(first["user_agent"], "probe/1");
        assert_eq!(first["referer"], "http://r/x");

        let metrics = server.metrics().unwrap();
        let by_kernel = lines.iter().filter(|line| line["path"] == "kernel").count() as u64;
        assert_eq!(
            by_kernel,
            metrics
                .get("khttpd_http_kernel_responses_total")
                .unwrap_or(0),
            "{mode:?}: a line for every kernel answer"
        );
        assert_eq!(
            by_kernel, metrics["khttpd_access_log_lines_total{path=\"kernel\"}"],
            "{mode:?}"
        );
        match mode {
            Mode::Kernel => assert!(by_kernel > KEEP_ALIVE / 2, "{mode:?}: {by_kernel}"),
            Mode::Auto => assert!(by_kernel > 0, "{mode:?}"),
            _ => assert_eq!(by_kernel, 0, "{mode:?}"),
        }
        assert_eq!(dropped(&server), 0, "{mode:?}");
    }
}

/// The kernel path where BPF may be loaded (else user space), and a folder for the log.
fn kernel_if_allowed() -> (Mode, tempfile::TempDir, PathBuf) {
    let mode = match bpf_allowed() {
        true => Mode::Kernel,
        false => Mode::UserUnbound,
    };
    let dir = temp_dir("access-log").unwrap();
    let path = dir.path().join("access.log");
    (mode, dir, path)
}

#[test]
fn a_rotation_loses_no_line() {
    let (mode, dir, path) = kernel_if_allowed();
    let rotated = dir.path().join("access.log.1");
    let server = logged(mode, &path, "combined");
    let reopen = || {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(server.pid() as i32).unwrap(),
            rustix::process::Signal::USR1,
        )
        .unwrap();
    };
    let addr = server.http_addr();
    // Built (by cargo, once per test process) before the wait for its first answers starts.
    common::xtask_binary();
    let load =
        std::thread::spawn(move || htstress(addr, &["--keep-alive", "-n", "30000", "-c", "2"]));
    assert!(eventually(Duration::from_secs(10), || !lines(&path).is_empty()));
    std::fs::rename(&path, &rotated).unwrap();
    if rustix::process::geteuid().is_root() {
        // Running as nobody, the server cannot create a file in the root-owned folder: it says so
        // and goes on writing into the file it has.
        reopen();
        server
            .log_with(&["access log: cannot reopen"])
            .expect("the failed reopen is said");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    reopen();
    assert!(
        eventually(Duration::from_secs(10), || path.exists()),
        "reopened"
    );
    let during = load.join().unwrap();
    let after = htstress(
        server.http_addr(),
        &["--keep-alive", "-n", "1000", "-c", "2"],
    );
    let requests =
        report_number(&during, "good requests:") + report_number(&after, "good requests:");
    assert_eq!(requests, 31_000);
    let total = || (lines(&rotated).len() + lines(&path).len()) as u64;
    assert!(
        eventually(Duration::from_secs(10), || total() >= requests),
        "{} + {} lines for {requests} requests",
        lines(&rotated).len(),
        lines(&path).len()
    );
    assert_eq!(total(), requests, "no line lost or doubled");
    assert!(
        lines(&path).len() >= 1000,
        "the new file has the later lines"
    );
    assert_eq!(dropped(&server), 0);
}

#[test]
fn a_log_that_cannot_keep_up_drops_lines_and_never_slows_answers() {
    const REQUESTS: u64 = 200_000;
    // A pipe nobody reads: the writer blocks on its first 64 KiB.
    let (mode, _dir, path) = kernel_if_allowed();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .unwrap();
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&path)
        .unwrap();
    let server = logged(mode, &path, "json");
    let started = Instant::now();
    let report = htstress(
        server.http_addr(),
        &["--keep-alive", "-n", &REQUESTS.to_string(), "-c", "4"],
    );
    assert_eq!(report_number(&report, "good requests:"), REQUESTS);
    eprintln!(
        "{REQUESTS} answers in {:?} with the log stuck",
        started.elapsed()
    );
    // The user path's lines are dropped once the queue is full; the kernel's records wait in
    // their ring meanwhile, and the full ring drops them.
    let full = match mode {
        Mode::Kernel => "ring",
        _ => "queue",
    };
    let metrics = server.metrics().unwrap();
    assert!(
        metrics[&format!("khttpd_access_log_dropped_total{{where=\"{full}\"}}")] > 0,
        "{mode:?}: dropped where the {full} is full"
    );
    // Once read, everything not dropped is written: every request is a line or a drop.
    let mut read = 0u64;
    let mut buffer = vec![0; 1 << 20];
    let deadline = Instant::now() + Duration::from_secs(30);
    while written(&server) + dropped(&server) < REQUESTS || read < written(&server) {
        assert!(
            Instant::now() < deadline,
            "{read} lines read, {} written, {} dropped",
            written(&server),
            dropped(&server)
        );
        match reader.read(&mut buffer) {
            Ok(n) => read += buffer[..n].iter().filter(|&&b| b == b'\n').count() as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(written(&server) + dropped(&server), REQUESTS);
    assert_eq!(read, written(&server));
}

#[test]
fn a_stopped_server_has_logged_every_answer() {
    let (mode, _dir, path) = kernel_if_allowed();
    let server = logged(mode, &path, "combined");
    let report = htstress(
        server.http_addr(),
        &["--keep-alive", "-n", "20000", "-c", "4"],
    );
    assert_eq!(report_number(&report, "good requests:"), 20_000);
    // Stopped at once: the last answers' lines are written before it exits.
    assert!(server.terminate().unwrap().success());
    assert_eq!(lines(&path).len(), 20_000);
}
