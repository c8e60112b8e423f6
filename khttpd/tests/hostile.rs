//! Hostile requests against real servers — fast path on, fast path off (work queue) and thread
//! per connection, all serving the same folder: request smuggling shapes, broken framing and line
//! endings, oversize lines and headers, invalid bytes, absurd versions and methods, bad Host
//! values, path tricks. Each case is sent alone and again behind a valid request in the same write.
//! Every one must get the status an RFC 9110/9112 server owes it and leave the connection in the
//! right state (closed with a FIN after an error, open and serving after an answer); the three
//! servers must send the same bytes (Date aside); the kernel must never answer a request user
//! space refuses; and every server must still be up and serving at the end.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    time::Duration,
};

use common::KHTTPD;
use khttpd_harness::{http::blank_dates, system::bpf_allowed, system::temp_dir, Mode, Server};

/// A valid request, learned by the kernel before the cases run (and used to check that a
/// connection is still open after an answer).
const VALID: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
/// `index.html` of the test folder.
const INDEX: &[u8] = b"<p>index</p>\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    /// The server answered and keeps the connection: the next request is served.
    Open,
    /// The server answered and closed: a FIN follows the answer, nothing else.
    Closed,
}

struct Case {
    name: String,
    request: Vec<u8>,
    status: u16,
    after: After,
    /// The answer has no body (HEAD).
    head_only: bool,
}

fn case(name: impl Into<String>, request: impl AsRef<[u8]>, status: u16, after: After) -> Case {
    let request = request.as_ref().to_vec();
    Case {
        name: name.into(),
        head_only: request.starts_with(b"HEAD "),
        request,
        status,
        after,
    }
}

/// An error: status, then close.
fn refused(name: impl Into<String>, request: impl AsRef<[u8]>, status: u16) -> Case {
    case(name, request, status, After::Closed)
}

/// A request with these header lines (and `body`), HTTP/1.1 with a Host.
fn with_headers(method: &str, headers: &str, body: &str) -> String {
    format!("{method} / HTTP/1.1\r\nHost: a\r\n{headers}\r\n{body}")
}

/// Answer to a well-framed request of this method: GET and HEAD are served, others are not
/// implemented; both keep the connection.
fn served(method: &str) -> u16 {
    if method == "GET" || method == "HEAD" {
        200
    } else {
        501
    }
}

fn smuggling() -> Vec<Case> {
    let mut cases = Vec::new();
    for method in ["GET", "POST"] {
        // Both framings at once, in either order, any spelling: 400 and close.
        for (cl, te) in [
            ("Content-Length: 5", "Transfer-Encoding: chunked"),
            ("Content-Length: 0", "Transfer-Encoding: chunked"),
            ("content-length: 5", "TRANSFER-ENCODING: Chunked"),
            ("Content-Length: 5", "Transfer-Encoding: gzip, chunked"),
            ("Content-Length: 5", "Transfer-Encoding: identity"),
        ] {
            for (order, headers) in [
                ("CL first", format!("{cl}\r\n{te}\r\n")),
                ("TE first", format!("{te}\r\n{cl}\r\n")),
            ] {
                cases.push(refused(
                    format!("{method} {cl} + {te} ({order})"),
                    with_headers(method, &headers, "0\r\n\r\n"),
                    400,
                ));
            }
        }
        // Transfer-Encoding values.
        for (te, status) in [
            ("chunked, chunked", 400),
            ("gzip", 400),
            ("identity", 400),
            ("chunked;q=1", 400),
            ("chunked, gzip", 400),
            ("xchunked", 400),
            ("chunked\x0b", 400),
            ("gzip, chunked", 501),
            ("deflate,chunked", 501),
        ] {
            cases.push(refused(
                format!("{method} Transfer-Encoding: {te:?}"),
                with_headers(method, &format!("Transfer-Encoding: {te}\r\n"), "0\r\n\r\n"),
                status,
            ));
        }
        for te in ["chunked", "Chunked", " chunked ", "chunked,", ", chunked"] {
            cases.push(case(
                format!("{method} Transfer-Encoding: {te:?} (valid)"),
                with_headers(
                    method,
                    &format!("Transfer-Encoding: {te}\r\n"),
                    "5\r\nhello\r\n0\r\n\r\n",
                ),
                served(method),
                After::Open,
            ));
        }
        cases.push(refused(
            format!("{method} two Transfer-Encoding fields"),
            with_headers(
                method,
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            400,
        ));
        cases.push(refused(
            format!("{method} Transfer-Encoding in HTTP/1.0"),
            format!("{method} / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            400,
        ));
        cases.push(refused(
            format!("{method} space before the colon of Transfer-Encoding"),
            with_headers(method, "Transfer-Encoding : chunked\r\n", "0\r\n\r\n"),
            400,
        ));
        cases.push(refused(
            format!("{method} Transfer-Encoding folded onto the previous line"),
            with_headers(
                method,
                "X: 1\r\n Transfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            400,
        ));
        // Content-Length values that are not one decimal number.
        for cl in [
            "+5",
            "-5",
            "-0",
            "0x5",
            "5.0",
            "5 5",
            "5,5",
            "5, 6",
            "",
            "1e3",
            "five",
            "99999999999999999999999",
            "18446744073709551616",
            "5\x0b",
        ] {
            cases.push(refused(
                format!("{method} Content-Length: {cl:?}"),
                with_headers(method, &format!("Content-Length: {cl}\r\n"), "hello"),
                400,
            ));
        }
        for (headers, name) in [
            ("Content-Length: 5\r\nContent-Length: 6\r\n", "conflicting"),
            (
                "Content-Length: 5\r\nContent-Length: 05x\r\n",
                "second invalid",
            ),
            ("Content-Length : 5\r\n", "space before the colon"),
            (
                "Content-Length:\t5\r\nX: 1\r\n Content-Length: 6\r\n",
                "folded",
            ),
        ] {
            cases.push(refused(
                format!("{method} Content-Length {name}"),
                with_headers(method, headers, "hello"),
                400,
            ));
        }
        for (headers, name) in [
            ("Content-Length: 5\r\n", "plain"),
            ("Content-Length: 005\r\n", "leading zeros"),
            ("Content-Length:  5 \r\n", "padded"),
            (
                "Content-Length: 5\r\nContent-Length: 5\r\n",
                "repeated, equal",
            ),
        ] {
            cases.push(case(
                format!("{method} Content-Length {name} (valid)"),
                with_headers(method, headers, "hello"),
                served(method),
                After::Open,
            ));
        }
        cases.push(refused(
            format!("{method} Content-Length over 1 MiB"),
            with_headers(method, "Content-Length: 1048577\r\n", ""),
            413,
        ));
        // Chunked bodies with broken chunk lines.
        for (body, name) in [
            ("ffffffffffffffffffff\r\n", "chunk size overflows u64"),
            ("10000000000000000\r\n", "chunk size 2^64"),
            ("-1\r\nx\r\n0\r\n\r\n", "negative chunk size"),
            ("0x5\r\nhello\r\n0\r\n\r\n", "0x chunk size"),
            ("g\r\n", "chunk size not hex"),
            ("5\r\nhelloXX0\r\n\r\n", "chunk data longer than its size"),
            ("5\r\nhel\r\n0\r\n\r\n", "chunk data shorter than its size"),
            ("5\rhello\r\n0\r\n\r\n", "bare CR after the chunk size"),
            ("100001\r\n", "one chunk over 1 MiB"),
        ] {
            let status = if body.starts_with("100001") { 413 } else { 400 };
            cases.push(refused(
                format!("{method} chunked: {name}"),
                with_headers(method, "Transfer-Encoding: chunked\r\n", body),
                status,
            ));
        }
        for (body, name) in [
            ("5;ext=1\r\nhello\r\n0\r\n\r\n", "chunk extension"),
            ("5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n", "trailer field"),
            ("00005\r\nhello\r\n000\r\n\r\n", "zero-padded sizes"),
            ("A\r\n0123456789\r\n0\r\n\r\n", "upper-case hex"),
        ] {
            cases.push(case(
                format!("{method} chunked: {name} (valid)"),
                with_headers(method, "Transfer-Encoding: chunked\r\n", body),
                served(method),
                After::Open,
            ));
        }
    }
    cases
}

fn framing_and_bytes() -> Vec<Case> {
    let mut cases = vec![
        // Line endings and whitespace (RFC 9112 §2.2, §5.1, §5.2).
        refused(
            "bare CR in the request line",
            "GET /\rHTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        refused(
            "bare CR ending the request line",
            "GET / HTTP/1.1\rHost: a\r\n\r\n",
            400,
        ),
        refused(
            "bare CR in a header line",
            "GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
            400,
        ),
        refused(
            "bare CR in a header value",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            400,
        ),
        refused(
            "obs-fold with a space",
            "GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n",
            400,
        ),
        refused(
            "obs-fold with a tab",
            "GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\t2\r\n\r\n",
            400,
        ),
        refused(
            "fold before the first header",
            "GET / HTTP/1.1\r\n Host: a\r\n\r\n",
            400,
        ),
        refused(
            "space before the colon",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            400,
        ),
        refused(
            "tab before the colon",
            "GET / HTTP/1.1\r\nHost\t: a\r\n\r\n",
            400,
        ),
        refused(
            "header without a colon",
            "GET / HTTP/1.1\r\nHost a\r\n\r\n",
            400,
        ),
        refused(
            "empty header name",
            "GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n",
            400,
        ),
        refused(
            "space before the method",
            " GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        refused(
            "two spaces after the method",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        refused(
            "two spaces before the version",
            "GET /  HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        refused(
            "tabs as separators",
            "GET\t/\tHTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        refused(
            "space after the version",
            "GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
            400,
        ),
        refused("no target", "GET HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        refused("request line only a method", "GET\r\n\r\n", 400),
        case(
            "bare LF line endings",
            "GET / HTTP/1.1\nHost: a\n\n",
            200,
            After::Open,
        ),
        case(
            "mixed line endings",
            "GET / HTTP/1.1\r\nHost: a\n\r\n",
            200,
            After::Open,
        ),
        case(
            "empty lines before the request",
            "\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            200,
            After::Open,
        ),
        case(
            "tab after the colon",
            "GET / HTTP/1.1\r\nHost:\ta\r\n\r\n",
            200,
            After::Open,
        ),
        case(
            "no space after the colon",
            "GET / HTTP/1.1\r\nHost:a\r\n\r\n",
            200,
            After::Open,
        ),
        case(
            "trailing whitespace in a value",
            "GET / HTTP/1.1\r\nHost: a \t\r\n\r\n",
            200,
            After::Open,
        ),
        // Invalid bytes.
        refused(
            "NUL in the method",
            "GE\0T / HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        refused(
            "NUL in the target",
            "GET /\0 HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        refused(
            "NUL in a header name",
            "GET / HTTP/1.1\r\nHost: a\r\nX\0: 1\r\n\r\n",
            400,
        ),
        refused(
            "NUL in a header value",
            "GET / HTTP/1.1\r\nHost: a\r\nX: 1\x002\r\n\r\n",
            400,
        ),
        refused(
            "DEL in a header value",
            "GET / HTTP/1.1\r\nHost: a\r\nX: 1\x7f\r\n\r\n",
            400,
        ),
        refused(
            "control byte in a header value",
            "GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n",
            400,
        ),
        refused(
            "escape in the target",
            "GET /\x1b[31m HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        refused(
            "UTF-8 in the target",
            "GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        refused(
            "UTF-8 in a header name",
            "GET / HTTP/1.1\r\nHost: a\r\nH\u{f6}st: 1\r\n\r\n",
            400,
        ),
        refused(
            "separator in a header name",
            "GET / HTTP/1.1\r\nHost: a\r\nX(y): 1\r\n\r\n",
            400,
        ),
        refused(
            "slash in a header name",
            "GET / HTTP/1.1\r\nHost: a\r\nX/y: 1\r\n\r\n",
            400,
        ),
        case(
            "UTF-8 in a header value",
            "GET / HTTP/1.1\r\nHost: a\r\nX: caf\u{e9}\r\n\r\n",
            200,
            After::Open,
        ),
        refused(
            "TLS client hello",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            400,
        ),
        refused("SSH banner", "SSH-2.0-OpenSSH_9.2\r\n\r\n", 400),
        refused("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        refused(
            "a response instead of a request",
            "HTTP/1.1 200 OK\r\n\r\n",
            400,
        ),
        refused("all NUL", [0u8; 64], 400),
        refused("all 0xff", [0xffu8; 64], 400),
    ];
    cases.push(refused(
        "invalid UTF-8 in the target",
        b"GET /\xc3\x28 HTTP/1.1\r\nHost: a\r\n\r\n",
        400,
    ));
    cases.push(case(
        "obs-text in a header value",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \xe9\xff\r\n\r\n",
        200,
        After::Open,
    ));
    // Sizes (8 KiB request line, 8 KiB header section, 100 fields).
    let target = |len: usize| format!("/{}", "a".repeat(len - 1));
    let header = |len: usize| format!("X: {}\r\n", "b".repeat(len - 5));
    cases.extend([
        refused(
            "request line over 8 KiB",
            format!("GET {} HTTP/1.1\r\nHost: a\r\n\r\n", target(8200)),
            414,
        ),
        refused(
            "request line over 8 KiB, unfinished",
            format!("GET {}", target(9000)),
            414,
        ),
        refused(
            "method over 8 KiB",
            format!("{} / HTTP/1.1\r\nHost: a\r\n\r\n", "G".repeat(8300)),
            414,
        ),
        refused(
            "one header over 8 KiB",
            format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", header(8300)),
            431,
        ),
        refused(
            "header section over 8 KiB",
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
                header(100).repeat(90)
            ),
            431,
        ),
        refused(
            "header section over 8 KiB, unfinished",
            format!("GET / HTTP/1.1\r\nHost: a\r\n{}", header(1000).repeat(9)),
            431,
        ),
        refused(
            "request line over 8 KiB with a bad version",
            format!("GET {} HTTP/9\r\nHost: a\r\n\r\n", target(8200)),
            414,
        ),
        refused(
            "request line over 8 KiB with a NUL at its end",
            format!("GET {}\0 HTTP/1.1\r\nHost: a\r\n\r\n", target(8200)),
            414,
        ),
        refused(
            "chunk extension over 4 KiB",
            with_headers(
                "POST",
                "Transfer-Encoding: chunked\r\n",
                &format!("5;x={}\r\nhello\r\n0\r\n\r\n", "e".repeat(5000)),
            ),
            400,
        ),
        refused(
            "trailer line over 4 KiB",
            with_headers(
                "POST",
                "Transfer-Encoding: chunked\r\n",
                &format!("0\r\nT: {}\r\n\r\n", "t".repeat(5000)),
            ),
            400,
        ),
        refused(
            "101 header fields",
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
                "X: 1\r\n".repeat(100)
            ),
            431,
        ),
        // Within the limits: the long target is simply not a file.
        case(
            "request line just under 8 KiB",
            format!("GET {} HTTP/1.1\r\nHost: a\r\n\r\n", target(8000)),
            404,
            After::Open,
        ),
        case(
            "header section just under 8 KiB",
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
                header(100).repeat(80)
            ),
            200,
            After::Open,
        ),
        case(
            "100 header fields",
            format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", "X: 1\r\n".repeat(99)),
            200,
            After::Open,
        ),
    ]);
    cases
}

fn versions_methods_hosts() -> Vec<Case> {
    let mut cases = Vec::new();
    for (version, status) in [
        ("HTTP/1.2", 505),
        ("HTTP/2.0", 505),
        ("HTTP/3.0", 505),
        ("HTTP/0.9", 505),
        ("HTTP/9.9", 505),
        ("HTTP/1.10", 400),
        ("HTTP/1.01", 400),
        ("HTTP/11", 400),
        ("HTTP/1", 400),
        ("HTTP/1.x", 400),
        ("HTTP/", 400),
        ("HTTP", 400),
        ("http/1.1", 400),
        ("HTTPS/1.1", 400),
        ("HTTP/1.1.1", 400),
        ("HTTP/-1.1", 400),
        ("FOO", 400),
    ] {
        cases.push(refused(
            format!("version {version}"),
            format!("GET / {version}\r\nHost: a\r\n\r\n"),
            status,
        ));
    }
    for method in [
        "POST",
        "PUT",
        "DELETE",
        "PATCH",
        "TRACE",
        "BREW",
        "PROPFIND",
        "get",
        "Get",
        "GETT",
        "GET-",
        "X",
        "M-SEARCH",
        "A!#$%&'*+-.^_`|~",
    ] {
        cases.push(case(
            format!("method {method}"),
            format!("{method} / HTTP/1.1\r\nHost: a\r\n\r\n"),
            501,
            After::Open,
        ));
    }
    cases.push(case(
        "OPTIONS *",
        "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        501,
        After::Open,
    ));
    cases.push(case(
        "CONNECT authority",
        "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        501,
        After::Open,
    ));
    for method in ["G@T", "GE[T", "GET\"", "GE,T", "G(T", "{GET}", "G\u{c9}T"] {
        cases.push(refused(
            format!("method {method:?}"),
            format!("{method} / HTTP/1.1\r\nHost: a\r\n\r\n"),
            400,
        ));
    }
    for (headers, name) in [
        ("", "no Host in HTTP/1.1"),
        ("Host: a\r\nHost: a\r\n", "two equal Hosts"),
        ("Host: a\r\nHost: b\r\n", "two Hosts"),
        ("Host: a\r\nhost: b\r\n", "two Hosts, other case"),
        ("Host: a b\r\n", "Host with a space"),
        ("Host: a/b\r\n", "Host with a slash"),
        ("Host: user@a\r\n", "Host with userinfo"),
        ("Host: a:port\r\n", "Host with a named port"),
        ("Host: a:80:80\r\n", "Host with two ports"),
        ("Host: [::1\r\n", "Host with an open bracket"),
        ("Host: []\r\n", "Host with an empty literal"),
        ("Host: a\"b\r\n", "Host with a quote"),
        ("Host: a<b>\r\n", "Host with angle brackets"),
        ("Host: caf\u{e9}\r\n", "Host in UTF-8"),
    ] {
        cases.push(refused(
            name.to_string(),
            format!("GET / HTTP/1.1\r\n{headers}\r\n"),
            400,
        ));
    }
    for host in [
        "",
        "a:80",
        "[::1]",
        "[::1]:8081",
        "127.0.0.1",
        "xn--caf-dma.example",
        "a.b-c_d~e%41",
    ] {
        cases.push(case(
            format!("Host {host:?}"),
            format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"),
            200,
            After::Open,
        ));
    }
    cases.push(case(
        "HTTP/1.0 without Host",
        "GET / HTTP/1.0\r\n\r\n",
        200,
        After::Closed,
    ));
    cases.push(case(
        "HTTP/1.0 keep-alive",
        "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        200,
        After::Open,
    ));
    cases.push(case(
        "HTTP/1.1 Connection: close",
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        200,
        After::Closed,
    ));
    cases.push(case(
        "Connection: keep-alive, close",
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n",
        200,
        After::Closed,
    ));
    cases
}

fn targets() -> Vec<Case> {
    let mut cases = Vec::new();
    for (target, status) in [
        // Traversal in every encoding: 403 (logged), the connection stays open.
        ("/../secret.txt", 403),
        ("/..", 403),
        ("/../", 403),
        ("/a/../../secret.txt", 403),
        ("/dir/..", 403),
        ("/%2e%2e/secret.txt", 403),
        ("/%2E%2E/secret.txt", 403),
        ("/.%2e/secret.txt", 403),
        ("/%2e./secret.txt", 403),
        ("/..%2fsecret.txt", 403),
        ("/..%2Fsecret.txt", 403),
        ("/%2e%2e%2fsecret.txt", 403),
        ("/dir/%2e%2e/%2e%2e/secret.txt", 403),
        ("/./../secret.txt", 403),
        ("/dir/./../../secret.txt", 403),
        ("/dir/../a.txt", 403),
        // A symlink to a file outside the folder: the server runs confined to it (chroot, as
        // `--user nobody`), where the link's target does not exist.
        ("/out", 404),
        ("/out/", 404),
        // Not traversal: names that do not exist.
        ("//secret.txt", 404),
        ("/%2fsecret.txt", 404),
        ("/%2e%2e%5csecret.txt", 404),
        ("/..\\secret.txt", 404),
        ("/%c0%ae%c0%ae/secret.txt", 404),
        ("/%e0%80%ae%e0%80%ae/secret.txt", 404),
        ("/%00", 404),
        ("/a.txt%00", 404),
        ("/a.txt%00.html", 404),
        ("/%", 404),
        ("/%zz", 404),
        ("/%2", 404),
        ("/...", 404),
        ("/nonexistent", 404),
        ("/a.txt/", 404),
        ("/a.txt/x", 404),
        ("/proc/self/environ", 404),
        ("/etc/passwd", 404),
        // Served.
        ("/a.txt", 200),
        ("/./a.txt", 200),
        ("//a.txt", 200),
        ("/dir//b.txt", 200),
        ("/dir/./b.txt", 200),
        ("/%61.txt", 200),
        ("/a.txt?../../secret.txt", 200),
        ("/a.txt?x=%00", 200),
        ("/?", 200),
        ("/dir/", 200),
        ("/dir", 301),
        ("http://a/a.txt", 200),
        ("HTTP://a/a.txt", 200),
        ("https://a", 200),
        ("http://a:8081/dir/b.txt", 200),
        ("http://a/../secret.txt", 403),
        // Not a target at all: 400 and close.
        ("a.txt", 400),
        ("*", 400),
        ("?x", 400),
        ("ftp://a/a.txt", 400),
        ("http://", 400),
        ("http://a b/", 400),
        ("http://a?x", 400),
        ("/a.txt#frag", 400),
        ("#", 400),
        ("mailto:x@y", 400),
    ] {
        for method in ["GET", "HEAD"] {
            let request = format!("{method} {target} HTTP/1.1\r\nHost: a\r\n\r\n");
            let name = format!("{method} {target}");
            cases.push(if status == 400 {
                refused(name, request, status)
            } else {
                case(name, request, status, After::Open)
            });
        }
    }
    for (range, status) in [
        ("bytes=0-0", 206),
        ("bytes=-1", 206),
        ("bytes=2-", 206),
        ("bytes=0-99999999999999999999", 206),
        ("bytes=99999-", 416),
        ("bytes=6-", 416),
        ("bytes=0-1,2-3", 200),
        ("bytes=abc", 200),
        ("bytes=1-0", 200),
        ("bytes=-99999999999999999999", 206),
        ("bytes=--1", 200),
        ("lines=0-1", 200),
        ("bytes=\u{e9}", 200),
    ] {
        cases.push(case(
            format!("Range: {range}"),
            format!("GET /a.txt HTTP/1.1\r\nHost: a\r\nRange: {range}\r\n\r\n"),
            status,
            After::Open,
        ));
    }
    for (header, status) in [
        ("If-None-Match: *", 304),
        ("If-None-Match: \"nope\"", 200),
        ("If-None-Match: ,,,", 200),
        ("If-Modified-Since: yesterday", 200),
        ("If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT", 200),
        ("If-Modified-Since: Tue, 01 Jan 2999 00:00:00 GMT", 304),
        // The weekday does not match the date: not a valid HTTP-date, so ignored (RFC 9110 §13.1.3).
        ("If-Modified-Since: Sat, 01 Jan 2999 00:00:00 GMT", 200),
        ("If-Modified-Since: Sat, 01 Jan 99999 00:00:00 GMT", 200),
    ] {
        cases.push(case(
            header,
            format!("GET /a.txt HTTP/1.1\r\nHost: a\r\n{header}\r\n\r\n"),
            status,
            After::Open,
        ));
    }
    cases
}

/// The folder the servers serve, next to a file outside it that must never be served.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    /// `name`: one folder per test, as the tests of this file run at the same time.
    fn create(name: &str) -> Site {
        let dir = temp_dir(name).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("dir")).unwrap();
        std::fs::write(root.join("index.html"), INDEX).unwrap();
        std::fs::write(root.join("a.txt"), "alpha\n").unwrap();
        std::fs::write(root.join("dir/b.txt"), "beta\n").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "SECRET\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("out")).unwrap();
        Site { dir }
    }

    fn root(&self) -> String {
        self.dir.path().join("root").to_str().unwrap().to_owned()
    }
}

/// Reads responses off one connection.
struct Responses {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Responses {
    fn connect(server: &Server) -> Responses {
        let stream = TcpStream::connect(server.http_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(8)))
            .unwrap();
        Responses {
            stream,
            buffer: Vec::new(),
        }
    }

    fn fill(&mut self) -> Result<usize, String> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err("no answer within 8 s (hang)".into())
            }
            Err(e) => Err(format!("read failed: {e} (a reset instead of a FIN?)")),
        }
    }

    /// The next whole response: (status, its bytes).
    fn next(&mut self, head_only: bool) -> Result<(u16, Vec<u8>), String> {
        let head_end = loop {
            if let Some(end) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if self.fill()? == 0 {
                return Err(format!(
                    "closed before a whole response: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                ));
            }
        };
        let head = String::from_utf8_lossy(&self.buffer[..head_end]).into_owned();
        let status: u16 = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not a response: {head:?}"))?;
        let length: Option<usize> = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .and_then(|value| value.parse().ok());
        let body = match (head_only || status == 304, length) {
            (true, _) => 0,
            (false, Some(length)) => length,
            (false, None) => return Err(format!("no Content-Length: {head:?}")),
        };
        while self.buffer.len() < head_end + body {
            if self.fill()? == 0 {
                return Err("closed in the middle of a body".into());
            }
        }
        let response: Vec<u8> = self.buffer.drain(..head_end + body).collect();
        Ok((status, response))
    }

    /// After an answer that closes: a FIN and nothing more.
    fn expect_close(&mut self) -> Result<(), String> {
        while self.buffer.is_empty() {
            if self.fill()? == 0 {
                return Ok(());
            }
        }
        Err(format!(
            "bytes after the closing answer: {:?}",
            String::from_utf8_lossy(&self.buffer)
        ))
    }

    /// After an answer that keeps the connection: the next request is served.
    fn expect_open(&mut self) -> Result<(), String> {
        self.stream
            .write_all(VALID)
            .map_err(|e| format!("connection not open: {e}"))?;
        match self.next(false)? {
            (200, response) if response.ends_with(INDEX) => Ok(()),
            (status, _) => Err(format!("the next request got {status}, not 200")),
        }
    }
}

/// Sends `request` and checks the answers: `before` valid requests' 200s, then the case's.
/// Returns the case's answer with the Date blanked.
fn run(server: &Server, case: &Case, before: usize) -> Result<Vec<u8>, String> {
    let mut connection = Responses::connect(server);
    let mut bytes = VALID.repeat(before);
    bytes.extend_from_slice(&case.request);
    // The server may close (and refuse the rest) before it has read everything.
    if let Err(e) = connection.stream.write_all(&bytes) {
        if case.after == After::Open {
            return Err(format!("write failed: {e}"));
        }
    }
    for _ in 0..before {
        let (status, _) = connection.next(false)?;
        if status != 200 {
            return Err(format!("the valid request before the case got {status}"));
        }
    }
    let (status, response) = connection.next(case.head_only)?;
    if status != case.status {
        return Err(format!(
            "got {status}, want {}: {:?}",
            case.status,
            String::from_utf8_lossy(&response)
        ));
    }
    let closes = String::from_utf8_lossy(&response).contains("\r\nConnection: close\r\n");
    if closes != (case.after == After::Closed) {
        return Err(format!("Connection header says close: {closes}"));
    }
    match case.after {
        After::Closed => connection.expect_close()?,
        After::Open => connection.expect_open()?,
    }
    Ok(blank_dates(response))
}

fn all_cases() -> Vec<Case> {
    let mut cases = smuggling();
    cases.extend(framing_and_bytes());
    cases.extend(versions_methods_hosts());
    cases.extend(targets());
    cases
}

#[test]
fn hostile_requests_get_the_right_answer_and_connection_state() {
    if !bpf_allowed() {
        return;
    }
    let cases = all_cases();
    assert!(cases.len() >= 300, "only {} cases", cases.len());
    let site = Site::create("hostile-servers");
    let root = site.root();
    let common = ["--root", root.as_str(), "--header-timeout", "5"];
    let servers = [
        (
            "fast path on",
            Server::start(KHTTPD, Mode::Kernel, &common).unwrap(),
        ),
        (
            "fast path off",
            Server::start(KHTTPD, Mode::UserUnbound, &common).unwrap(),
        ),
        (
            "thread per connection",
            Server::start(
                KHTTPD,
                Mode::UserUnbound,
                &[&common[..], &["--dispatch", "thread"]].concat(),
            )
            .unwrap(),
        ),
    ];
    let kernel = &servers[0].1;
    let kernel_answers = || kernel.metrics().unwrap()["khttpd_http_kernel_responses_total"];
    // Teach the kernel the valid request, and check that it answers it.
    for _ in 0..3 {
        let mut connection = Responses::connect(kernel);
        connection.stream.write_all(VALID).unwrap();
        connection.next(false).unwrap();
    }
    assert!(
        kernel_answers() > 0,
        "the kernel answered nothing: the checks below prove nothing"
    );

    let mut failures = Vec::new();
    let mut answers: Vec<Vec<Vec<u8>>> = vec![Vec::new(); cases.len()];
    for (name, server) in &servers {
        for (case, answers) in cases.iter().zip(&mut answers) {
            for before in [0, 1] {
                let taught = if name == &servers[0].0 {
                    kernel_answers()
                } else {
                    0
                };
                match run(server, case, before) {
                    Ok(answer) => answers.push(answer),
                    Err(e) => {
                        failures.push(format!("{name}, {} (after {before} valid): {e}", case.name))
                    }
                }
                // A refused request is answered by user space only; alone on a connection, so
                // the kernel cannot have answered a valid neighbour either.
                if name == &servers[0].0
                    && before == 0
                    && case.after == After::Closed
                    && case.status >= 400
                {
                    let answered = kernel_answers() - taught;
                    if answered != 0 {
                        failures.push(format!(
                            "{name}, {}: the kernel answered {answered}",
                            case.name
                        ));
                    }
                }
            }
        }
    }
    for (case, answers) in cases.iter().zip(&answers) {
        if answers.windows(2).any(|pair| pair[0] != pair[1]) {
            failures.push(format!("{}: the servers' answers differ", case.name));
        }
    }
    for (name, server) in &servers {
        let mut connection = Responses::connect(server);
        connection.stream.write_all(VALID).unwrap();
        if let Err(e) = connection.next(false) {
            failures.push(format!("{name}: not serving after the suite: {e}"));
        }
        let log = server.log();
        if log.contains("panicked") {
            failures.push(format!("{name}: panicked:\n{log}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} exchanges failed:\n{}",
        failures.len(),
        cases.len() * 2 * servers.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} cases × 2 (alone, behind a valid request) × {} servers: all as expected",
        cases.len(),
        servers.len()
    );
}

/// The same cases through the session alone, sent whole and one byte at a time: the answers must
/// not depend on how the bytes arrive (the kernel answers whole segments, user space whatever
/// read returns).
#[test]
fn hostile_requests_get_the_same_answer_in_any_pieces() {
    use khttpd::http::{file_cache::Limits, session::Session, site::Site as Folder};
    let site = Site::create("hostile-session");
    let root = site.root();
    // With the caches: the whole request first, so the pieces are answered from them.
    let folder = Folder::new(std::path::Path::new(&root), Limits::DEFAULT).unwrap();
    let folder = std::sync::Arc::new(folder);
    let answer = |request: &[u8], piece: usize| {
        let mut session = Session::new().with_site(folder.clone());
        let mut out = Vec::new();
        for bytes in request.chunks(piece) {
            if session.receive(bytes, &mut out) == khttpd::http::session::Next::Close {
                break;
            }
        }
        blank_dates(out)
    };
    let mut failures = Vec::new();
    for case in all_cases() {
        let mut bytes = VALID.to_vec();
        bytes.extend_from_slice(&case.request);
        let whole = answer(&bytes, bytes.len());
        if answer(&bytes, 1) != whole || answer(&bytes, 7) != whole {
            failures.push(case.name);
        }
    }
    assert!(
        failures.is_empty(),
        "answers depend on the pieces: {failures:?}"
    );
}
