//! The kernel HTTP fast path is invisible: for the same bytes in, the same bytes come out (Date
//! aside) with the fast path on and off — whole, byte by byte, pipelined, under backpressure and
//! when requests on one connection alternate between the kernel and user space.

mod common;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    thread,
    time::{Duration, Instant},
};

use common::{bpf_allowed, eventually, Mode, Server};
use khttpd_common::http::RequestKey;

/// `Date: ` followed by an IMF-fixdate, replaced by a fixed string before comparing.
fn without_dates(mut bytes: Vec<u8>) -> Vec<u8> {
    const PREFIX: &[u8] = b"\r\nDate: ";
    let mut at = 0;
    while let Some(found) = bytes[at..].windows(PREFIX.len()).position(|w| w == PREFIX) {
        let start = at + found + PREFIX.len();
        let end = (start + 29).min(bytes.len());
        bytes.splice(start..end, *b"<date>");
        at = start;
    }
    bytes
}

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.http_addr()).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// How a request is written.
#[derive(Clone, Copy, Debug)]
enum Send {
    Whole,
    ByteByByte,
}

/// Writes `request`, shuts the write side and reads until the server closes.
fn exchange(server: &Server, request: &[u8], send: Send) -> Vec<u8> {
    let mut stream = connect(server);
    match send {
        Send::Whole => stream.write_all(request).unwrap(),
        Send::ByteByByte => {
            for byte in request {
                // The server may close after an error response before every byte is written.
                if stream.write_all(&[*byte]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .unwrap_or_else(|e| panic!("{e} after {:?}", String::from_utf8_lossy(request)));
    without_dates(response)
}

/// Valid, edge-case and hostile requests: every method × version × header set, plus oddities.
fn corpus() -> Vec<Vec<u8>> {
    let methods = ["GET", "HEAD", "POST", "get", "OPTIONS"];
    let targets = ["/", "/index.html?q=1"];
    let versions = ["HTTP/1.0", "HTTP/1.1", "HTTP/1.2", "HTTP/2.0"];
    let header_sets: [&[u8]; 11] = [
        b"",
        b"Host: localhost\r\n",
        b"Host: localhost\r\nConnection: close\r\n",
        b"Host: localhost\r\nConnection: keep-alive\r\n",
        b"Host: a\r\nHost: b\r\n",
        b"Host: x\r\nContent-Length: 0\r\n",
        b"Host: x\r\nContent-Length: 5\r\n\r\nhello",
        b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",
        b"Host: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"Host: x\r\nX-Folded: a\r\n b\r\n",
        b"Host : x\r\n",
    ];
    let mut corpus = Vec::new();
    for method in methods {
        for version in versions {
            for (i, headers) in header_sets.iter().enumerate() {
                let target = targets[i % targets.len()];
                let mut request = format!("{method} {target} {version}\r\n").into_bytes();
                request.extend_from_slice(headers);
                // Header sets with a body carry their own blank line.
                if !headers.windows(4).any(|w| w == b"\r\n\r\n") {
                    request.extend_from_slice(b"\r\n");
                }
                corpus.push(request);
            }
        }
    }
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(300));
    let huge_header = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "b".repeat(9000));
    let oddities: [&[u8]; 14] = [
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00\x00\x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"GET",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ];
    corpus.extend(oddities.iter().map(|r| r.to_vec()));
    corpus.push(long_target.into_bytes());
    corpus.push(huge_header.into_bytes());
    corpus
}

/// Every corpus request's answer from `server`: whole and byte by byte, then in pipelined
/// batches of eight.
fn answers(server: &Server, corpus: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut answers = Vec::new();
    for send in [Send::Whole, Send::ByteByByte] {
        for request in corpus {
            answers.push(exchange(server, request, send));
        }
    }
    for batch in corpus.chunks(8) {
        answers.push(exchange(server, &batch.concat(), Send::Whole));
    }
    answers
}

#[test]
fn the_fast_path_is_invisible_for_a_corpus_of_requests() {
    if !bpf_allowed() {
        return;
    }
    let corpus = corpus();
    assert!(corpus.len() >= 200, "{}", corpus.len());
    let user = Server::start(Mode::UserUnbound, &[]);
    let expected = answers(&user, &corpus);
    let kernel = Server::start(Mode::Kernel, &[]);
    // The first round teaches the kernel the requests it may answer; both rounds must match.
    for round in 0..2 {
        let got = answers(&kernel, &corpus);
        for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
            assert!(
                got == want,
                "round {round}, answer {i} differs:\nkernel: {:?}\nuser:   {:?}",
                String::from_utf8_lossy(got),
                String::from_utf8_lossy(want)
            );
        }
    }
    // Half-closed connections whose FIN arrives before the accept cannot enter the sockhash
    // (sockmap takes established sockets only), so send each request the kernel can answer once
    // more on a connection that stays open, and check the kernel answered every one of them.
    let eligible: Vec<(&Vec<u8>, &Vec<u8>)> = corpus
        .iter()
        .zip(&expected)
        .filter(|(request, answer)| {
            answer.starts_with(b"HTTP/1.1 200 ")
                && answer.windows(24).any(|w| w == b"\r\nConnection: keep-alive")
                && RequestKey::new(request).is_some_and(|key| key.is_candidate().is_ok())
                && request.windows(4).filter(|w| *w == b"\r\n\r\n").count() == 1
        })
        .collect();
    assert!(eligible.len() >= 5, "only {} kernel-answerable requests", eligible.len());
    let before = kernel.metric("khttpd_http_kernel_responses_total");
    for (request, want) in &eligible {
        let mut stream = connect(&kernel);
        // Let the server accept and install the socket before the request arrives.
        thread::sleep(Duration::from_millis(20));
        stream.write_all(request).unwrap();
        // The answer as sent is 23 bytes longer: a 29-byte date instead of `<date>`.
        let mut got = vec![0; want.len() + 23];
        stream.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&without_dates(got)), String::from_utf8_lossy(want));
    }
    let answered = kernel.metric("khttpd_http_kernel_responses_total") - before;
    assert_eq!(answered, eligible.len() as u64, "kernel answers of taught requests");
    assert_eq!(kernel.metric("khttpd_http_kernel_errors_total{kind=\"synthesis\"}"), 0);
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
    let server = Server::start(Mode::Kernel, &[]);
    let one = teach(&server);
    let sent_len = one.len();
    let one = without_dates(one);
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
    let want = sent_len * REQUESTS;
    let mut got = Vec::with_capacity(want + 4096);
    let mut buf = vec![0; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < want && Instant::now() < deadline {
        let n = stream.read(&mut buf).expect("no reset, no stall");
        assert!(n > 0, "closed after {} of {want} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    sender.join().unwrap();
    let got = without_dates(got);
    assert_eq!(got.len(), one.len() * REQUESTS, "byte count");
    for (i, response) in got.chunks(one.len()).enumerate() {
        assert!(
            response == one.as_slice(),
            "response {i}: {:?}",
            String::from_utf8_lossy(response)
        );
    }
    let metrics = server.metrics();
    let kernel = metrics["khttpd_http_kernel_responses_total"];
    let held_back = metrics["khttpd_http_passed_total{reason=\"backpressure\"}"];
    assert!(kernel > 0, "the kernel answered nothing");
    assert!(held_back > 0, "backpressure never held the kernel back");
    assert_eq!(metrics["khttpd_http_kernel_errors_total{kind=\"synthesis\"}"], 0);
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
        without_dates(got)
    };
    let user = Server::start(Mode::UserUnbound, &[]);
    let want = run(&user);
    let kernel = Server::start(Mode::Kernel, &[]);
    let _ = teach(&kernel);
    let got = run(&kernel);
    assert!(
        got == want,
        "kernel:\n{}\nuser:\n{}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&want)
    );
    let metrics = kernel.metrics();
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
    let server = Server::start(Mode::Kernel, &[]);
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
    assert!(server.metric("khttpd_http_passed_total{reason=\"close\"}") >= 40);
    // Every connection is gone from the sockhash and the kernel's tables once closed.
    assert!(
        eventually(Duration::from_secs(10), || server
            .metric("khttpd_http_kernel_sockets")
            == 0),
        "sockhash entries left behind"
    );
}

#[test]
fn auto_moves_keep_alive_connections_to_the_kernel_and_leaves_closing_ones_alone() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(Mode::Auto, &[]);
    // One request per connection: served and closed by user space, never installed.
    for _ in 0..50 {
        let response = exchange(&server, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", Send::Whole);
        assert!(response.ends_with(b"Hello, World!\n"));
    }
    let metrics = server.metrics();
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
        let response = without_dates(response);
        if i == 0 {
            first = response;
        } else {
            assert_eq!(response, first, "answer {i}");
        }
    }
    let answered = server.metric("khttpd_http_kernel_responses_total");
    assert!(answered >= 95, "the kernel answered {answered} of 99");
}
