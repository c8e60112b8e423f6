//! The HTTP service against a real server process, in both dispatch modes: persistence, closing
//! with a FIN (never a reset), agreement with curl, and a clean `cargo xtask htstress` run.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use common::{htstress, report_number, KHTTPD};
use khttpd_harness::{eventually, system::bpf_allowed, system::temp_dir, Mode, Server};

const DISPATCH_MODES: [&str; 2] = ["cmwq", "thread"];

fn connect(server: &Server) -> TcpStream {
    khttpd_harness::http::connect(server.http_addr()).unwrap()
}

/// Sends `request` and reads until the server closes; a reset fails the test.
fn exchange_until_close(server: &Server, request: &[u8]) -> String {
    let response = khttpd_harness::http::exchange(server.http_addr(), request)
        .expect("the server must close with a FIN, not a reset or a hang");
    String::from_utf8(response).unwrap()
}

fn status_lines(response: &str) -> Vec<&str> {
    // Bodies end in '\n' and the next response starts right after, so split on '\n'.
    response
        .lines()
        .filter(|line| line.starts_with("HTTP/1.1 "))
        .collect()
}

#[test]
fn htstress_style_requests_end_with_the_server_closing() {
    for dispatch in DISPATCH_MODES {
        let server = Server::start(KHTTPD, Mode::UserUnbound, &["--dispatch", dispatch]).unwrap();
        for _ in 0..200 {
            let response =
                exchange_until_close(&server, b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n");
            assert!(
                response.starts_with("HTTP/1.1 200 OK\r\n"),
                "{dispatch}: {response}"
            );
            assert!(
                response.contains("\r\nConnection: close\r\n")
                    && response.ends_with("\r\n\r\nHello, World!\n"),
                "{dispatch}: {response}"
            );
        }
        assert_eq!(
            server.metrics().unwrap()
                [&format!("khttpd_http_connections_total{{dispatch=\"{dispatch}\"}}")],
            200
        );
    }
}

#[test]
fn keep_alive_and_pipelining_on_one_connection() {
    for dispatch in DISPATCH_MODES {
        let server = Server::start(KHTTPD, Mode::UserUnbound, &["--dispatch", dispatch]).unwrap();
        let request = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nHEAD /2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\nDELETE /3 HTTP/1.1\r\nHost: a\r\n\r\nGET /4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let response = exchange_until_close(&server, request);
        assert_eq!(
            status_lines(&response),
            [
                "HTTP/1.1 200 OK",
                "HTTP/1.1 200 OK",
                "HTTP/1.1 501 Not Implemented",
                "HTTP/1.1 200 OK"
            ],
            "{dispatch}"
        );
    }
}

#[test]
fn errors_close_cleanly_even_with_unread_bytes() {
    for dispatch in DISPATCH_MODES {
        let server = Server::start(KHTTPD, Mode::UserUnbound, &["--dispatch", dispatch]).unwrap();
        // The bytes after the bad request are never read as requests, but must not turn the
        // close into a reset.
        let mut request = b"BAD\x01REQUEST\r\n\r\n".to_vec();
        request.extend(std::iter::repeat_n(b'x', 64 * 1024));
        let response = exchange_until_close(&server, &request);
        assert_eq!(
            status_lines(&response),
            ["HTTP/1.1 400 Bad Request"],
            "{dispatch}"
        );

        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(10_000));
        let response = exchange_until_close(&server, long.as_bytes());
        assert_eq!(
            status_lines(&response),
            ["HTTP/1.1 414 URI Too Long"],
            "{dispatch}"
        );
    }
}

#[test]
fn a_client_sending_one_byte_at_a_time_gets_its_answer() {
    for dispatch in DISPATCH_MODES {
        let server = Server::start(KHTTPD, Mode::UserUnbound, &["--dispatch", dispatch]).unwrap();
        let mut stream = connect(&server);
        stream.set_nodelay(true).unwrap();
        for byte in b"GET / HTTP/1.0\r\nHost: a\r\n\r\n" {
            stream.write_all(&[*byte]).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200 OK"),
            "{dispatch}: {response}"
        );
    }
}

#[test]
fn curl_agrees() {
    for dispatch in DISPATCH_MODES {
        let server = Server::start(KHTTPD, Mode::UserUnbound, &["--dispatch", dispatch]).unwrap();
        let url = format!("http://{}/", server.http_addr());
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-i", &url, &url])
            .output()
            .expect("curl is installed");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "{dispatch}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Two requests on one kept-alive connection, each a full response with the right length.
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert_eq!(text.matches("Content-Length: 14").count(), 2, "{text}");
        let head = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-I", &url])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&head.stdout).starts_with("HTTP/1.1 200 OK"));
    }
}

#[test]
fn htstress_gets_only_good_answers() {
    const REQUESTS: u64 = 10_000;
    for dispatch in DISPATCH_MODES {
        let server = Server::start(KHTTPD, Mode::UserUnbound, &["--dispatch", dispatch]).unwrap();
        let report = htstress(
            server.http_addr(),
            &["-n", &REQUESTS.to_string(), "-c", "8", "-t", "2"],
        );
        let count = |label| report_number(&report, label);
        assert_eq!(count("requests:"), REQUESTS, "{dispatch}:\n{report}");
        assert_eq!(count("good requests:"), REQUESTS, "{dispatch}:\n{report}");
        assert!(
            report.contains(&format!("good requests: {REQUESTS} [100%]")),
            "{dispatch}:\n{report}"
        );
        assert_eq!(count("bad requests:"), 0, "{dispatch}:\n{report}");
        assert_eq!(count("socket errors:"), 0, "{dispatch}:\n{report}");
        // The latency lines htstress adds after the seed's lines: p50 ≤ p99.
        assert!(
            count("latency p50:") <= count("latency p99:"),
            "{dispatch}:\n{report}"
        );
        // Every request was a connection to this server, not to some other one.
        assert_eq!(
            server.metrics().unwrap()
                [&format!("khttpd_http_connections_total{{dispatch=\"{dispatch}\"}}")],
            REQUESTS,
            "{dispatch}"
        );
    }
}

/// Reads until the server closes; returns what came and how long it took.
fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, Duration) {
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    stream
        .read_to_end(&mut got)
        .expect("the server closes with a FIN");
    (got, started.elapsed())
}

/// Asks `GET /` on `stream` `times` times, `pause` apart, checking each answer.
fn ask_apart(stream: &mut TcpStream, times: usize, pause: Duration) {
    let request = b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n";
    for i in 0..times {
        stream.write_all(request).unwrap();
        let mut answer = [0u8; 4096];
        let n = stream.read(&mut answer).unwrap();
        assert!(
            answer[..n].ends_with(b"Hello, World!\n"),
            "request {i} got {:?}",
            String::from_utf8_lossy(&answer[..n])
        );
        std::thread::sleep(pause);
    }
}

/// The idle deadline is armed once per connection and checked when it fires: a connection busy
/// past several timeouts stays open, and closes one timeout after its last request.
#[test]
fn idle_keep_alive_connections_are_closed() {
    for dispatch in DISPATCH_MODES {
        let server = Server::start(
            KHTTPD,
            Mode::UserUnbound,
            &["--dispatch", dispatch, "--idle-timeout", "1"],
        )
        .unwrap();
        let mut stream = connect(&server);
        // 3.2 s of requests, more than three timeouts; 400 ms of the last wait pass in here.
        ask_apart(&mut stream, 8, Duration::from_millis(400));
        let (got, after) = read_until_closed(&mut stream);
        assert!(got.is_empty(), "{dispatch}");
        assert!(
            after >= Duration::from_millis(500) && after < Duration::from_secs(3),
            "{dispatch}: closed {after:?} after the last wait"
        );
    }
}

/// Idle keep-alive connections wait on the idle list without a work item (`http/idle.rs`): new
/// ones at once after their first answer, busier ones after 100 ms of silence. They are woken by
/// their next request and answered exactly as before, and a shutdown closes them with a FIN.
#[test]
fn idle_connections_wait_without_a_work_item_and_wake_for_their_next_request() {
    const CONNECTIONS: usize = 20;
    let server = Server::start(KHTTPD, Mode::UserUnbound, &[]).unwrap();
    let request = b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n";
    let parked = || server.metrics().unwrap()["khttpd_http_idle_connections"] as usize;
    let working = || {
        let metrics = server.metrics().unwrap();
        let active = metrics.sum_where("khttpd_workqueue_active", "khttpd_http");
        active.expect("the HTTP work queue's active items")
    };
    let mut streams: Vec<TcpStream> = (0..CONNECTIONS).map(|_| connect(&server)).collect();
    for stream in &mut streams {
        assert_eq!(common::ask(stream, request).0, 200);
    }
    let all_parked = || {
        assert!(
            eventually(Duration::from_secs(5), || parked() == CONNECTIONS
                && working() == 0),
            "parked {}, work items {}",
            parked(),
            working()
        )
    };
    all_parked();
    // Woken by the next requests: a few quick ones each (a work item serves those), then silent
    // again, they park once more.
    for stream in &mut streams {
        for _ in 0..3 {
            let (status, body) = common::ask(stream, request);
            assert_eq!((status, &body[..]), (200, &b"Hello, World!\n"[..]));
        }
    }
    all_parked();
    assert_eq!(
        server.metrics().unwrap()["khttpd_http_open_connections"],
        CONNECTIONS as u64
    );
    assert!(server.terminate().unwrap().success());
    for stream in &mut streams {
        let (got, _) = read_until_closed(stream);
        assert!(got.is_empty());
    }
}

/// A client that stops reading is given up one idle timeout after it last took a byte, like one
/// that stops sending; before, it held its connection (and the answers it owed) until shutdown.
#[test]
fn clients_that_stop_reading_are_closed_after_the_idle_timeout() {
    let dir = temp_dir("http-stalled").unwrap();
    let root = dir.path();
    std::fs::write(root.join("large.bin"), vec![7u8; 4 << 20]).unwrap();
    for dispatch in DISPATCH_MODES {
        let args = ["--dispatch", dispatch, "--idle-timeout", "1"];
        let server = Server::start(
            KHTTPD,
            Mode::UserUnbound,
            &[&args[..], &["--root", root.to_str().unwrap()]].concat(),
        )
        .unwrap();
        let open = || server.metrics().unwrap()["khttpd_http_open_connections"];
        let mut stream = connect(&server);
        // Eight answers of 4 MiB, far more than both sockets' buffers hold; never read.
        let request = b"GET /large.bin HTTP/1.1\r\nHost: x\r\n\r\n".repeat(8);
        let sent = Instant::now();
        stream.write_all(&request).unwrap();
        assert!(
            eventually(Duration::from_secs(5), || open() == 1),
            "{dispatch}"
        );
        let closed = eventually(Duration::from_secs(10), || open() == 0);
        assert!(closed, "{dispatch}: still open {:?} after", sent.elapsed());
        assert!(
            sent.elapsed() >= Duration::from_millis(900),
            "{dispatch}: closed {:?} after the requests, before a timeout",
            sent.elapsed()
        );
    }
}

#[test]
fn the_idle_timer_counts_requests_the_kernel_answered() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::Kernel, &["--idle-timeout", "2"]).unwrap();
    let mut stream = connect(&server);
    // 4 s of traffic, twice the timeout: the kernel answers all but the first request.
    ask_apart(&mut stream, 8, Duration::from_millis(500));
    assert!(server.metrics().unwrap()["khttpd_http_kernel_responses_total"] >= 6);
    let (got, after) = read_until_closed(&mut stream);
    assert!(got.is_empty());
    assert!(
        after >= Duration::from_millis(1000) && after < Duration::from_secs(5),
        "closed {after:?} after the last request"
    );
}

#[test]
fn slow_header_clients_get_408_while_others_are_served() {
    for (dispatch, clients) in [("cmwq", 1000), ("thread", 200)] {
        let server = Server::start(
            KHTTPD,
            Mode::UserUnbound,
            &["--dispatch", dispatch, "--header-timeout", "2"],
        )
        .unwrap();
        let mut slow: Vec<TcpStream> = (0..clients)
            .map(|_| {
                let mut stream = connect(&server);
                stream.write_all(b"GET / HTTP/1.1\r\nHost: slow").unwrap();
                stream
            })
            .collect();
        let started = std::time::Instant::now();
        // Trickle a header byte every half second; a normal client is served meanwhile.
        let mut served = 0;
        while started.elapsed() < Duration::from_millis(1500) {
            for stream in &mut slow {
                let _ = stream.write_all(b"x");
            }
            let response = exchange_until_close(&server, b"GET / HTTP/1.0\r\n\r\n");
            assert!(
                response.ends_with("Hello, World!\n"),
                "{dispatch}: {response}"
            );
            served += 1;
            std::thread::sleep(Duration::from_millis(500));
        }
        assert!(served >= 3, "{dispatch}");
        for (i, stream) in slow.iter_mut().enumerate() {
            let (got, _) = read_until_closed(stream);
            let text = String::from_utf8_lossy(&got);
            assert!(
                text.starts_with("HTTP/1.1 408 Request Timeout\r\n")
                    && text.contains("\r\nConnection: close\r\n"),
                "{dispatch}: client {i}: {text}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{dispatch}: slow clients took {:?} to be closed",
            started.elapsed()
        );
    }
}

#[test]
fn past_max_connections_new_clients_get_503_and_the_others_keep_being_served() {
    for (mode, dispatch) in [
        (Mode::UserUnbound, "cmwq"),
        (Mode::UserUnbound, "thread"),
        (Mode::Auto, "cmwq"),
    ] {
        if mode == Mode::Auto && !bpf_allowed() {
            continue;
        }
        let server = Server::start(
            KHTTPD,
            mode,
            &["--dispatch", dispatch, "--max-connections", "10"],
        )
        .unwrap();
        let request = b"GET / HTTP/1.1\r\nHost: limit\r\n\r\n";
        let ask = |stream: &mut TcpStream| {
            stream.write_all(request).unwrap();
            let mut answer = [0u8; 4096];
            let n = stream.read(&mut answer).unwrap();
            String::from_utf8_lossy(&answer[..n]).into_owned()
        };
        let mut held: Vec<TcpStream> = (0..10).map(|_| connect(&server)).collect();
        for stream in &mut held {
            assert!(
                ask(stream).starts_with("HTTP/1.1 200 OK"),
                "{mode:?} {dispatch}"
            );
        }
        for _ in 0..20 {
            let answer = exchange_until_close(&server, request);
            assert!(
                answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
                    && answer.contains("\r\nConnection: close\r\n"),
                "{mode:?} {dispatch}: {answer}"
            );
        }
        for stream in &mut held {
            assert!(
                ask(stream).starts_with("HTTP/1.1 200 OK"),
                "{mode:?} {dispatch}"
            );
        }
        assert_eq!(server.metrics().unwrap()["khttpd_http_rejected_total"], 20);
        assert_eq!(
            server.metrics().unwrap()["khttpd_http_open_connections"],
            10
        );
        // Closing some makes room again.
        held.truncate(5);
        assert!(
            eventually(Duration::from_secs(5), || server.metrics().unwrap()
                ["khttpd_http_open_connections"]
                == 5),
            "{mode:?} {dispatch}: slots not given back"
        );
        let answer = exchange_until_close(&server, b"GET / HTTP/1.0\r\n\r\n");
        assert!(
            answer.starts_with("HTTP/1.1 200 OK"),
            "{mode:?} {dispatch}: {answer}"
        );
    }
}

/// The server as a library: started, served and stopped inside the test's own process (user
/// space only, ports the kernel picks), as `khttpd` runs it.
#[test]
fn the_server_runs_in_process_and_stops_when_told() {
    use khttpd::{http, server, workqueue};
    let config = server::Config {
        iface: "lo".into(),
        http_port: 0,
        echo_port: 0,
        backlog: 128,
        dispatch: http::Dispatch::Cmwq,
        fast_path: server::FastPathMode::Off,
        workqueue: workqueue::Kind::Unbound,
        max_active: 64,
        body: None,
        kernel_cache_max: 0,
        root: None,
        file_cache: http::file_cache::Limits::DEFAULT,
        timeouts: http::Timeouts {
            idle: Duration::from_secs(60),
            head: Duration::from_secs(10),
        },
        max_connections: 100,
        access_log: None,
        access_log_format: khttpd::access_log::Format::Combined,
        metrics: None,
        // Nothing to drop: the test keeps its privileges.
        user: "root".into(),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let server = server::Server::start(config)
            .await
            .expect("the server starts");
        let (http_addr, echo_addr) = (server.http_addrs()[0], server.echo_addrs()[0]);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server.serve(async {
            let _ = stopped.await;
        }));
        let (mut kept_alive, mut echo) = tokio::task::spawn_blocking(move || {
            let mut stream = TcpStream::connect(http_addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            for _ in 0..3 {
                let (status, body) = common::ask(&mut stream, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
                assert_eq!((status, body.as_slice()), (200, &b"Hello, World!\n"[..]));
            }
            let mut echo = TcpStream::connect(echo_addr).unwrap();
            echo.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            echo.write_all(b"ping").unwrap();
            let mut back = [0u8; 4];
            echo.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"ping");
            (stream, echo)
        })
        .await
        .unwrap();
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("the server stops within 10 s")
            .unwrap()
            .expect("and returns Ok");
        // Both connections were closed with a FIN, and nothing listens any more.
        tokio::task::spawn_blocking(move || {
            let mut rest = Vec::new();
            kept_alive
                .read_to_end(&mut rest)
                .expect("a FIN, not a reset");
            assert!(rest.is_empty());
            echo.read_to_end(&mut rest).expect("a FIN, not a reset");
            assert!(rest.is_empty());
            assert!(TcpStream::connect(http_addr).is_err());
        })
        .await
        .unwrap();
    });
}
