//! The kernel HTTP fast path is invisible: for the same bytes in, the same bytes come out (Date
//! aside) with the fast path on and off — whole, byte by byte, pipelined, under backpressure and
//! when requests on one connection alternate between the kernel and user space.

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{xtask_binary, KHTTPD};
use khttpd_harness::{
    eventually, http::blank_dates, system::bpf_allowed, system::temp_dir, Mode, Server,
};

/// Whether two answers (or streams of them) are the same apart from the values of their Dates.
fn same_but_date(a: &[u8], b: &[u8]) -> bool {
    blank_dates(a.to_vec()) == blank_dates(b.to_vec())
}

fn connect(server: &Server) -> TcpStream {
    khttpd_harness::http::connect(server.http_addr()).unwrap()
}

/// Sends one request on a new connection and reads until the server closes (a reset fails).
fn request_until_close(server: &Server, request: &[u8]) -> Vec<u8> {
    khttpd_harness::http::exchange(server.http_addr(), request).expect("FIN, not a reset")
}

#[test]
fn the_fast_path_is_invisible_for_a_corpus_and_random_requests() {
    if !bpf_allowed() {
        return;
    }
    // The comparison itself lives in xtask (`cargo xtask diff`): a corpus of 236 valid,
    // edge-case and hostile requests plus random ones, each whole, byte by byte and pipelined,
    // against `--fast-path on` and `off`; then the same and 468 requests for files against a
    // site served with the kernel and the user-space file caches and without either.
    let _lifetime = khttpd_harness::server::Lifetime::new("cargo xtask diff");
    let output = Command::new(xtask_binary())
        .args(["diff", "-n", "400", "--seconds", "240", "--khttpd", KHTTPD])
        .stdin(Stdio::null())
        .output()
        .expect("run xtask diff");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The diff checks that every request the kernel learned was answered by the kernel when sent
    // again; the corpus alone holds 8 such requests (GET and HEAD of `/` and `/index.html?q=1`,
    // HTTP/1.0 and 1.1), whatever the random ones add.
    let learned: u64 = stdout
        .split(" requests learned")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no learned count in {stdout}"));
    assert!(learned >= 8, "the kernel learned only {learned}: {stdout}");
}

const KNOWN: &[u8] = b"GET / HTTP/1.1\r\nHost: backpressure\r\n\r\n";

/// Teaches `server` the request `KNOWN` and returns its answer (as sent: with its Date).
fn teach(server: &Server) -> Vec<u8> {
    let mut stream = connect(server);
    stream.write_all(KNOWN).unwrap();
    let mut response = vec![0; 4096];
    let n = stream.read(&mut response).unwrap();
    response.truncate(n);
    response
}

#[test]
fn clients_that_stop_reading_get_exact_responses() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    let one = teach(&server);
    const REQUESTS: usize = 20_000;
    let mut stream = connect(&server);
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for i in 0..REQUESTS {
            writer.write_all(KNOWN).unwrap();
            // The first few hundred one per segment, spaced out, so the kernel sees lone requests
            // and answers until its unacknowledged bytes reach the limit; then as fast as possible.
            if i < 300 {
                thread::sleep(Duration::from_millis(1));
            }
        }
    });
    // Stop reading while megabytes of responses queue up.
    thread::sleep(Duration::from_secs(3));
    let want = one.len() * REQUESTS;
    let mut got = Vec::with_capacity(want + 4096);
    let mut buf = vec![0; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < want && Instant::now() < deadline {
        let n = stream.read(&mut buf).expect("no reset, no stall");
        assert!(n > 0, "closed after {} of {want} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    sender.join().unwrap();
    assert_eq!(got.len(), want, "byte count");
    for (i, response) in got.chunks(one.len()).enumerate() {
        assert!(
            same_but_date(response, &one),
            "response {i}: {:?}",
            String::from_utf8_lossy(response)
        );
    }
    let metrics = server.metrics().unwrap();
    let kernel = metrics["khttpd_http_kernel_responses_total"];
    let held_back = metrics["khttpd_http_passed_total{reason=\"backpressure\"}"];
    assert!(kernel > 0, "the kernel answered nothing");
    assert!(
        held_back > 0,
        "backpressure never held the kernel back: {metrics:?}"
    );
    assert_eq!(
        metrics["khttpd_http_kernel_errors_total{kind=\"synthesis\"}"],
        0
    );
}

#[test]
fn answers_stay_in_order_when_kernel_and_user_space_alternate() {
    if !bpf_allowed() {
        return;
    }
    // HEAD of a new path goes to user space (the kernel has not seen it); GET / is known.
    let sequence: Vec<Vec<u8>> = (0..300)
        .flat_map(|i| {
            [
                format!("HEAD /new/{i} HTTP/1.1\r\nHost: order\r\n\r\n").into_bytes(),
                b"GET / HTTP/1.1\r\nHost: order\r\n\r\n".to_vec(),
            ]
        })
        .collect();
    let run = |server: &Server| {
        let mut stream = connect(server);
        let mut writer = stream.try_clone().unwrap();
        let requests = sequence.clone();
        let sender = thread::spawn(move || {
            for request in requests {
                writer.write_all(&request).unwrap();
                thread::sleep(Duration::from_micros(100));
            }
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut got = Vec::new();
        stream.read_to_end(&mut got).expect("no reset");
        sender.join().unwrap();
        got
    };
    let user = Server::start(KHTTPD, Mode::UserUnbound, &[]).unwrap();
    let want = run(&user);
    let kernel = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    let _ = teach(&kernel);
    let got = run(&kernel);
    assert!(
        same_but_date(&got, &want),
        "kernel:\n{}\nuser:\n{}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    let metrics = kernel.metrics().unwrap();
    eprintln!(
        "kernel answered {}, user space {} hand-offs",
        metrics["khttpd_http_kernel_responses_total"], metrics["khttpd_http_handoffs_total"]
    );
    assert!(metrics["khttpd_http_handoffs_total"] > 0);
}

#[test]
fn closing_requests_are_answered_and_closed_by_user_space() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    let request = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n";
    for _ in 0..50 {
        let mut stream = connect(&server);
        stream.write_all(request).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("FIN, not a reset");
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nHello, World!\n"), "{text}");
    }
    assert!(server.metrics().unwrap()["khttpd_http_passed_total{reason=\"close\"}"] >= 40);
    // Every connection is gone from the sockhash and the kernel's tables once closed.
    assert!(
        eventually(Duration::from_secs(10), || server.metrics().unwrap()
            ["khttpd_http_kernel_sockets"]
            == 0),
        "sockhash entries left behind"
    );
}

#[test]
fn auto_moves_keep_alive_connections_to_the_kernel_and_leaves_closing_ones_alone() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::Auto, &[]).unwrap();
    // One request per connection: served and closed by user space, never installed.
    for _ in 0..50 {
        let response = request_until_close(&server, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n");
        assert!(response.ends_with(b"Hello, World!\n"));
    }
    let metrics = server.metrics().unwrap();
    assert_eq!(metrics["khttpd_http_kernel_responses_total"], 0);
    assert_eq!(metrics["khttpd_http_passed_total{reason=\"close\"}"], 0);
    // A keep-alive connection: the first answer comes from user space, which then hands the
    // connection to the kernel; the rest come from the kernel.
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut stream = connect(&server);
    let mut first = Vec::new();
    for i in 0..100 {
        stream.write_all(request).unwrap();
        let mut response = vec![0; 4096];
        let n = stream.read(&mut response).unwrap();
        response.truncate(n);
        if i == 0 {
            first = response;
        } else {
            assert!(same_but_date(&response, &first), "answer {i}");
        }
    }
    // User space answers the first 32 or so: auto waits for a streak of answers the kernel
    // could send before it moves a connection.
    let answered = server.metrics().unwrap()["khttpd_http_kernel_responses_total"];
    assert!(answered >= 60, "the kernel answered {answered} of 99");
}

#[test]
fn answers_up_to_16_kib_come_from_the_kernel_byte_exact() {
    if !bpf_allowed() {
        return;
    }
    // Response sizes around the kernel's limit (16 KiB with headers): the last one is too big
    // and must come from user space, with the same bytes.
    for (size, kernel_answers) in [
        (1_000, true),
        (4_000, true),
        (16_000, true),
        (17_000, false),
    ] {
        let dir = temp_dir(&format!("body-{size}")).unwrap();
        let path = dir.path().join("body");
        let body: Vec<u8> = (0..size)
            .map(|i| b"abcdefghijklmnopqrstuvwxyz\n"[i % 27])
            .collect();
        std::fs::write(&path, &body).unwrap();
        let body_arg = ["--body", path.to_str().unwrap()];
        let answers = |server: &Server| {
            let mut stream = connect(server);
            let request = b"GET /big HTTP/1.1\r\nHost: size\r\n\r\n";
            let mut answers = Vec::new();
            for _ in 0..20 {
                stream.write_all(request).unwrap();
                let mut answer = Vec::new();
                let mut buf = vec![0; 1 << 16];
                while !answer.ends_with(&body) {
                    let n = stream.read(&mut buf).unwrap();
                    assert!(n > 0, "closed early");
                    answer.extend_from_slice(&buf[..n]);
                }
                answers.push(answer);
            }
            // Nothing more: every request got exactly one answer.
            stream
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut extra = [0u8; 1];
            assert!(
                stream.read(&mut extra).is_err(),
                "{size} B: an extra answer"
            );
            answers
        };
        let user =
            answers(&Server::start(KHTTPD, Mode::UserUnbound, &body_arg).unwrap())[0].clone();
        let kernel = Server::start(KHTTPD, Mode::Kernel, &body_arg).unwrap();
        for (i, answer) in answers(&kernel).iter().enumerate() {
            assert!(same_but_date(answer, &user), "{size} B, answer {i}");
        }
        let answered = kernel.metrics().unwrap()["khttpd_http_kernel_responses_total"];
        if kernel_answers {
            assert!(
                answered >= 18,
                "{size} B: the kernel answered {answered} of 19; {:?}\n{}",
                kernel.metrics().unwrap(),
                kernel.log()
            );
        } else {
            assert_eq!(answered, 0, "{size} B: too big for the kernel");
        }
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn the_kernel_keeps_the_date_current() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    let request = b"GET /date HTTP/1.1\r\nHost: date\r\n\r\n";
    let date_of = |answer: &[u8]| {
        let text = String::from_utf8_lossy(answer).into_owned();
        let at = text.find("\r\nDate: ").expect("a Date header") + 8;
        text[at..at + 29].to_owned()
    };
    let mut stream = connect(&server);
    let mut ask = || {
        stream.write_all(request).unwrap();
        let mut answer = vec![0; 4096];
        let n = stream.read(&mut answer).unwrap();
        answer.truncate(n);
        (date_of(&answer), std::time::SystemTime::now())
    };
    let _ = ask(); // taught: user space answers this one
    let before = server.metrics().unwrap()["khttpd_http_kernel_responses_total"];
    for _ in 0..3 {
        let (date, now) = ask();
        // The kernel's Date names the current second (or the one before, at a boundary).
        let secs = now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(
            date == format_http_date(secs) || date == format_http_date(secs - 1),
            "kernel Date {date} at {secs}"
        );
        thread::sleep(Duration::from_millis(1100));
    }
    assert_eq!(
        server.metrics().unwrap()["khttpd_http_kernel_responses_total"] - before,
        3
    );
}

/// IMF-fixdate of a Unix time (the tests' own, to check the server's).
fn format_http_date(unix: u64) -> String {
    let output = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{unix}"),
            "+%a, %d %b %Y %H:%M:%S GMT",
        ])
        .env("LC_ALL", "C")
        .output()
        .expect("date(1)");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}
