//! The user-space HTTP state machine (`khttpd::http::session::Session`), fed the same bytes twice:
//! in one piece and in pieces the fuzzer chooses. Checks that it never panics; that what it writes
//! is a sequence of whole HTTP/1.1 responses, each framed by its Content-Length; that nothing
//! follows a `Connection: close` answer; that both runs write the same bytes (Date values aside:
//! the kernel fast path answers the same bytes with the same bytes, whatever the segmentation);
//! that every learned request, sent alone to a new session, gets exactly the answer it was
//! learned with — which is what the kernel will send for those bytes — and leaves it idle; and
//! that idle means between requests (user space then lets the kernel answer what comes next): a
//! new session given the rest of the input answers it as the session did; and that the access
//! log's records (`Session::with_log`) are exactly the answers, with their status and body length.
//!
//! The same pieces also drive the connection machine around the session
//! (`khttpd::http::connection::Connection`, as both executors run it), its writes cut to the
//! same chunk sizes: it writes exactly what the session wrote, then closes as the session said —
//! at once only when the client is done, else with a FIN and a linger.
//!
//! Input layout: `flags`, then `flags >> 4` chunk-size bytes, then the client's bytes.
//! - flags bit 0: the chunked run uses `Session::new()` (not learning); bit 1: a head still being
//!   read at the end times out (`head_timed_out`) in both runs; bit 2: the client's bytes are
//!   expanded (see [`expand`]) so short inputs reach the 4 and 8 KiB limits.
//! - chunk-size byte `b`: `b` bytes when `b < 0x80` (0 is an empty `receive`), else
//!   `(b - 0x7f) * 128`; the sizes repeat. With none, the first bytes go one at a time.
//! - After `MAX_CALLS` pieces, the rest goes in one piece.
#![no_main]

use std::ops::Range;

use khttpd::http::{
    connection::{Action, Connection, Deadline, Timeouts},
    response::{self, HELLO},
    session::{Learned, Logged, Next, Session},
};
use khttpd_common::http::{RequestKey, REQUEST_KEY_BYTES};
use libfuzzer_sys::fuzz_target;

/// Largest expanded input: past the 8 KiB request line and 8 KiB header section limits.
const MAX_EXPANDED: usize = 18 * 1024;
/// `receive` calls of the chunked run; the rest of the input then goes in one piece (each call
/// parses the buffered head again, so many tiny pieces of a long head cost quadratic time).
const MAX_CALLS: usize = 96;
const DATE_LEN: usize = khttpd_common::http::DATE_LEN;

/// `0xff count len pattern[len % 16 + 1]` stands for the pattern repeated: `count + 1` times when
/// `count < 0x80`, else `(count - 0x7f) * 128` times. Other bytes stand for themselves.
fn expand(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() && out.len() < MAX_EXPANDED {
        match input[i..] {
            [0xff, count, len, ref rest @ ..] => {
                let times = if count < 0x80 {
                    usize::from(count) + 1
                } else {
                    usize::from(count - 0x7f) * 128
                };
                let pattern = &rest[..(usize::from(len) % 16 + 1).min(rest.len())];
                for _ in 0..times {
                    if out.len() >= MAX_EXPANDED {
                        break;
                    }
                    out.extend_from_slice(pattern);
                }
                i += 3 + pattern.len();
            }
            _ => {
                out.push(input[i]);
                i += 1;
            }
        }
    }
    out.truncate(MAX_EXPANDED);
    out
}

/// The pieces the chunked run receives.
fn pieces<'a>(input: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut rest = input;
    let mut i = 0;
    while !rest.is_empty() {
        let size = if pieces.len() + 1 >= MAX_CALLS {
            rest.len()
        } else if sizes.is_empty() {
            if input.len() - rest.len() < MAX_CALLS {
                1
            } else {
                rest.len()
            }
        } else {
            let b = sizes[i % sizes.len()];
            i += 1;
            size_of_byte(b)
        };
        let (piece, after) = rest.split_at(size.min(rest.len()));
        pieces.push(piece);
        rest = after;
    }
    if pieces.is_empty() {
        pieces.push(&[][..]);
    }
    pieces
}

/// One response found in the output.
#[derive(Debug)]
struct Response {
    range: Range<usize>,
    code: u16,
    keep_alive: bool,
    /// Bytes of body.
    body: usize,
}

fn lossy(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(600)]).into_owned();
    if bytes.len() > 600 {
        format!("{text}… ({} bytes)", bytes.len())
    } else {
        text
    }
}

/// Parses `out[from..]` as whole responses, checking each one's head and framing. `heads`: the
/// input has `HEAD` in it, so answers without a body may be there.
fn responses(out: &[u8], from: usize, heads: bool) -> Vec<Response> {
    let mut list = Vec::new();
    let mut at = from;
    while at < out.len() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut parsed = httparse::Response::new(&mut headers);
        let head_len = match parsed.parse(&out[at..]) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!("no response at {at}: {other:?} in {:?}", lossy(&out[at..])),
        };
        assert_eq!(parsed.version, Some(1), "not HTTP/1.1");
        let code = parsed.code.expect("a status code");
        let reason = parsed.reason.expect("a reason phrase");
        let one = |name: &str| -> &[u8] {
            let mut found = parsed
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name));
            let header = found
                .next()
                .unwrap_or_else(|| panic!("no {name} in {:?}", lossy(&out[at..])));
            assert!(found.next().is_none(), "two {name} headers");
            header.value
        };
        let date = std::str::from_utf8(one("Date")).expect("an ASCII Date");
        assert_eq!(date.len(), DATE_LEN, "Date {date:?}");
        assert!(
            response::parse_http_date(date)
                .map(response::format_imf_fixdate)
                .as_deref()
                == Some(date),
            "Date {date:?} is not an IMF-fixdate"
        );
        assert_eq!(one("Server"), response::SERVER.as_bytes());
        one("Content-Type");
        let length: usize = std::str::from_utf8(one("Content-Length"))
            .ok()
            .and_then(|l| l.parse().ok())
            .expect("a decimal Content-Length");
        let keep_alive = match one("Connection") {
            b"keep-alive" => true,
            b"close" => false,
            other => panic!("Connection: {:?}", lossy(other)),
        };
        if code == 501 {
            assert_eq!(one("Allow"), response::ALLOW.as_bytes());
        }
        let rest = &out[at + head_len..];
        // A HEAD answer ends with its head (RFC 9112 §6.3). Which request an answer is for is the
        // session's to know; here a bodiless answer is one followed by nothing or by the next
        // status line (no body here starts with one), and only when some request may be a HEAD.
        let head_only = heads && (rest.is_empty() || rest.starts_with(b"HTTP/1.1 "));
        let body_len = if head_only { 0 } else { length };
        assert!(
            rest.len() >= body_len,
            "Content-Length {length} but {} bytes follow",
            rest.len()
        );
        let body = &rest[..body_len];
        match code {
            200 | 400 | 408 | 413 | 414 | 431 | 501 | 505 => {}
            _ => panic!("unexpected status {code}"),
        }
        if !head_only {
            if code == 200 {
                assert_eq!(body, HELLO, "200 body");
            } else {
                assert_eq!(body, format!("{code} {reason}\n").as_bytes(), "error body");
            }
        }
        if !matches!(code, 200 | 501) {
            assert!(!keep_alive, "{code} keeps the connection open");
        }
        let end = at + head_len + body_len;
        list.push(Response {
            range: at..end,
            code,
            keep_alive,
            body: body_len,
        });
        at = end;
    }
    list
}

/// Where `needle` first occurs in `haystack`. (Comparing every window would be one intercepted
/// `memcmp` per byte, which costs most of the execution time under libFuzzer.)
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut at = 0;
    while let Some(i) = haystack.get(at..)?.iter().position(|&b| b == first) {
        let start = at + i;
        if haystack[start + 1..].starts_with(rest) {
            return Some(start);
        }
        at = start + 1;
    }
    None
}

/// The Date values replaced by `#`s: the only bytes that may differ between two runs.
fn blank_dates(out: &[u8]) -> Vec<u8> {
    const DATE: &[u8] = b"\r\nDate: ";
    let mut blank = out.to_vec();
    let mut at = 0;
    while let Some(found) = find(&blank[at..], DATE) {
        let start = at + found + DATE.len();
        let end = (start + DATE_LEN).min(blank.len());
        blank[start..end].fill(b'#');
        at = end;
    }
    blank
}

struct Run {
    out: Vec<u8>,
    responses: Vec<Response>,
    next: Next,
    learned: Vec<Learned>,
    idle: bool,
    /// Still reading a head after the last piece (before any time-out).
    reading_head: bool,
    client_done: bool,
    /// The last point inside the input where the session was idle: (input bytes fed, output
    /// bytes written). User space lets the kernel answer the next bytes from there.
    idle_at: Option<(usize, usize)>,
}

fn run(pieces: &[&[u8]], learning: bool, time_out: bool, heads: bool) -> Run {
    // Always with the access log's records: each answer must have one, with its status and body.
    let mut session = if learning {
        Session::learning()
    } else {
        Session::new()
    }
    .with_log();
    let mut out = Vec::new();
    let mut found = Vec::new();
    let mut learned = Vec::new();
    let mut next = Next::Read;
    let mut idle_at = None;
    let mut fed = 0;
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    for piece in pieces {
        let from = out.len();
        next = session.receive(piece, &mut out);
        fed += piece.len();
        if next == Next::Read && session.is_idle() && fed > 0 && fed < total {
            idle_at = Some((fed, out.len()));
        }
        // Each call writes whole responses; all but a closing one's last keep the connection open.
        let new = responses(&out, from, heads);
        for (i, response) in new.iter().enumerate() {
            let last = i + 1 == new.len();
            assert!(
                response.keep_alive || (last && next == Next::Close),
                "response {i} of {} says close, receive said {next:?}",
                new.len()
            );
        }
        if next == Next::Close {
            assert!(
                new.last().is_some_and(|r| !r.keep_alive),
                "Next::Close without a closing response"
            );
        }
        same_as_logged(&session.logged().collect::<Vec<_>>(), &new);
        session.clear_logged();
        found.extend(new);
        let taken = session.take_learned();
        assert!(learning || taken.is_empty(), "learned without learning");
        learned.extend(taken);
        assert!(!session.owes_file() && session.take_file().is_none());
        if next == Next::Close {
            break;
        }
    }
    assert!(!(session.is_idle() && session.reading_head()));
    let reading_head = session.reading_head();
    if next == Next::Read && time_out && reading_head {
        let from = out.len();
        session.head_timed_out(&mut out);
        let new = responses(&out, from, heads);
        assert!(
            matches!(&new[..], [r] if r.code == 408 && !r.keep_alive),
            "head_timed_out wrote {new:?}"
        );
        same_as_logged(&session.logged().collect::<Vec<_>>(), &new);
        session.clear_logged();
        found.extend(new);
    }
    Run {
        idle: session.is_idle(),
        reading_head,
        client_done: session.client_is_done(),
        idle_at,
        out,
        responses: found,
        next,
        learned,
    }
}

/// The access log's records of a `receive` are its answers, one each, with their status and body
/// length (none here has a file body).
fn same_as_logged(logged: &[Logged<'_>], answers: &[Response]) {
    assert_eq!(logged.len(), answers.len(), "{logged:?} for {answers:?}");
    for (logged, answer) in logged.iter().zip(answers) {
        assert_eq!(logged.status, answer.code, "{logged:?} for {answer:?}");
        assert_eq!(
            logged.body_bytes, answer.body as u64,
            "{logged:?} for {answer:?}"
        );
    }
}

/// How the machine's connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// Still reading when the client stopped sending (or closed for silence after it).
    Open,
    /// Closed at once: the client was done and sent nothing more.
    AtOnce,
    /// A FIN, then what the client still sent read and dropped.
    Lingered,
}

/// The size a chunk-size byte stands for (see the input layout).
fn size_of_byte(b: u8) -> usize {
    if b < 0x80 {
        usize::from(b)
    } else {
        usize::from(b - 0x7f) * 128
    }
}

/// Feeds `pieces` to a connection machine (no kernel, no site) the way an executor does, each
/// write taking at most the next of `sizes` bytes (at least one); when the pieces run out and
/// `time_out`, the read deadline passes. `reading_head`: whether the session is still reading a
/// head after all pieces (so the deadline is a fixed one). Returns what it wrote and how it ended.
fn drive(pieces: &[&[u8]], sizes: &[u8], time_out: bool, reading_head: bool) -> (Vec<u8>, Ending) {
    let timeouts = Timeouts {
        idle: std::time::Duration::from_secs(60),
        head: std::time::Duration::from_secs(10),
    };
    let mut connection = Connection::new(Session::new(), timeouts);
    let mut pieces = pieces.iter().peekable();
    let mut written = Vec::new();
    let mut writes = 0;
    let mut timed_out = false;
    let mut fin = false;
    loop {
        match connection.next_action() {
            Action::Read => {
                let deadline = connection.deadline();
                match pieces.next() {
                    Some(piece) => connection.received(piece),
                    None if fin => return (written, Ending::Lingered),
                    None if time_out && !timed_out => {
                        assert_eq!(
                            matches!(deadline, Deadline::At(_)),
                            reading_head,
                            "{deadline:?}"
                        );
                        timed_out = true;
                        connection.deadline_passed();
                    }
                    None => return (written, Ending::Open),
                }
            }
            Action::Write => {
                let output = connection.output();
                assert!(!output.is_empty(), "asked to write nothing");
                let size = match sizes {
                    [] => output.len(),
                    _ => size_of_byte(sizes[writes % sizes.len()]).max(1),
                };
                writes += 1;
                let n = size.min(output.len());
                written.extend_from_slice(&output[..n]);
                connection.wrote(n);
            }
            Action::CloseIfQuiet => {
                // Like the executor's check of the receive queue.
                while pieces.next_if(|piece| piece.is_empty()).is_some() {}
                if pieces.peek().is_none() {
                    return (written, Ending::AtOnce);
                }
                connection.not_quiet();
            }
            Action::Shutdown => {
                assert!(!fin, "two FINs");
                fin = true;
            }
            Action::Close => {
                assert!(
                    fin || timed_out,
                    "closed without a FIN while the client may send"
                );
                return (written, if fin { Ending::Lingered } else { Ending::Open });
            }
            action => panic!("{action:?} without a kernel or a site"),
        }
    }
}

/// Each learned request: part of the input, in order; its range is one 200 response of the output
/// that keeps the connection open as it says; and a new session answers those bytes alone with
/// the same bytes (Date aside), consuming all of them — as the kernel will.
fn check_learned(input: &[u8], whole: &Run) {
    let mut from = 0;
    for item in &whole.learned {
        let len = item.request.len();
        assert!(
            (1..=REQUEST_KEY_BYTES).contains(&len),
            "learned {len} bytes"
        );
        assert!(RequestKey::new(&item.request).is_some());
        let found = find(&input[from..], &item.request)
            .unwrap_or_else(|| panic!("learned {:?} is not in the input", lossy(&item.request)));
        from += found + len;
        let answer = &whole.out[item.response.clone()];
        let parsed = whole
            .responses
            .iter()
            .find(|r| r.range == item.response)
            .unwrap_or_else(|| panic!("learned range {:?} is not one response", item.response));
        assert_eq!(parsed.code, 200);
        assert_eq!(parsed.keep_alive, item.keep_alive);

        let mut session = Session::learning();
        let mut out = Vec::new();
        let next = session.receive(&item.request, &mut out);
        assert_eq!(
            blank_dates(&out),
            blank_dates(answer),
            "{:?} alone gets another answer",
            lossy(&item.request)
        );
        assert_eq!(
            next,
            if item.keep_alive {
                Next::Read
            } else {
                Next::Close
            }
        );
        if item.keep_alive {
            assert!(session.is_idle(), "bytes left after a learned request");
        }
        assert_eq!(
            session.take_learned(),
            vec![Learned {
                request: item.request.clone(),
                response: 0..out.len(),
                keep_alive: item.keep_alive,
            }]
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (sizes, input) = rest.split_at(usize::from(flags >> 4).min(rest.len()));
    let expanded;
    let input = if flags & 4 != 0 {
        expanded = expand(input);
        &expanded[..]
    } else {
        input
    };
    let time_out = flags & 2 != 0;

    let heads = find(input, b"HEAD").is_some();
    let whole = run(&[input], true, time_out, heads);
    let chunked = run(&pieces(input, sizes), flags & 1 == 0, time_out, heads);

    let (a, b) = (blank_dates(&whole.out), blank_dates(&chunked.out));
    if a != b {
        let same = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let start = same.saturating_sub(200);
        panic!(
            "whole and chunked outputs differ at byte {same}:\nwhole:   {:?}\nchunked: {:?}",
            lossy(&a[start..]),
            lossy(&b[start..])
        );
    }
    // Idle means between requests: a new session given the rest answers as this one did.
    if let Some((fed, written)) = chunked.idle_at {
        let rest = run(&[&input[fed..]], true, time_out, heads);
        assert!(
            blank_dates(&rest.out) == blank_dates(&whole.out[written..]),
            "idle after {fed} bytes, but a new session answers the rest otherwise"
        );
        assert_eq!(rest.next, whole.next);
    }
    // The connection machine writes what the session wrote, and closes as it said.
    let (written, ending) = drive(&pieces(input, sizes), sizes, time_out, chunked.reading_head);
    assert!(
        blank_dates(&written) == a,
        "the machine wrote {:?}, the session {:?}",
        lossy(&written),
        lossy(&whole.out)
    );
    let timed_out_head = time_out && whole.next == Next::Read && whole.reading_head;
    let expected = match whole.next {
        Next::Close if whole.client_done => Ending::AtOnce,
        Next::Close => Ending::Lingered,
        Next::Read if timed_out_head => Ending::Lingered,
        Next::Read => Ending::Open,
    };
    assert_eq!(ending, expected);
    assert_eq!(whole.next, chunked.next);
    assert_eq!(whole.idle, chunked.idle);
    assert_eq!(whole.reading_head, chunked.reading_head);
    if flags & 1 == 0 {
        assert_eq!(whole.learned, chunked.learned);
    }
    for run in [&whole, &chunked] {
        if run.client_done {
            assert_eq!(run.next, Next::Close);
            assert!(matches!(run.responses.last(), Some(r) if r.code == 200 && !r.keep_alive));
        }
    }
    check_learned(input, &whole);
});
