//! Building response bytes. Every response carries Date, Server, Content-Type, Content-Length and
//! Connection. Heads are copied together from pieces, not formatted (`core::fmt` showed in the
//! profile of every answer); the Date is formatted once per second on each thread.

use std::{
    cell::Cell,
    sync::OnceLock,
    time::{Duration, UNIX_EPOCH},
};

use khttpd_common::http::DATE_LEN;

pub const SERVER: &str = "khttpd";
/// The body of every GET/HEAD unless `--body` names a file.
pub const HELLO: &[u8] = b"Hello, World!\n";
/// Largest `--body` file.
pub const MAX_BODY_FILE: u64 = 1024 * 1024;
pub const ALLOW: &str = "GET, HEAD";
/// Room for a response head (the greeting's is 150 bytes).
const HEAD_CAPACITY: usize = 256;
/// The greeting and the error bodies are plain text.
const TEXT: &str = "text/plain; charset=utf-8";

/// The body of every `200` and its Content-Type: [`HELLO`], or the `--body` file's bytes.
static BODY: OnceLock<(Vec<u8>, &'static str)> = OnceLock::new();

/// Makes `bytes` the body of every `200` (once, at start-up): plain text if it is UTF-8,
/// `application/octet-stream` otherwise.
pub fn set_body(bytes: Vec<u8>) {
    let content_type = if std::str::from_utf8(&bytes).is_ok() {
        TEXT
    } else {
        "application/octet-stream"
    };
    let _ = BODY.set((bytes, content_type));
}

fn body() -> (&'static [u8], &'static str) {
    BODY.get()
        .map_or((HELLO, TEXT), |(bytes, content_type)| (bytes, content_type))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    PartialContent,
    MovedPermanently,
    NotModified,
    Forbidden,
    NotFound,
    RangeNotSatisfiable,
    BadRequest,
    RequestTimeout,
    PayloadTooLarge,
    UriTooLong,
    HeaderFieldsTooLarge,
    NotImplemented,
    ServiceUnavailable,
    VersionNotSupported,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::PartialContent => 206,
            Status::MovedPermanently => 301,
            Status::NotModified => 304,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::RangeNotSatisfiable => 416,
            Status::BadRequest => 400,
            Status::RequestTimeout => 408,
            Status::PayloadTooLarge => 413,
            Status::UriTooLong => 414,
            Status::HeaderFieldsTooLarge => 431,
            Status::NotImplemented => 501,
            Status::ServiceUnavailable => 503,
            Status::VersionNotSupported => 505,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::PartialContent => "Partial Content",
            Status::MovedPermanently => "Moved Permanently",
            Status::NotModified => "Not Modified",
            Status::Forbidden => "Forbidden",
            Status::NotFound => "Not Found",
            Status::RangeNotSatisfiable => "Range Not Satisfiable",
            Status::BadRequest => "Bad Request",
            Status::RequestTimeout => "Request Timeout",
            Status::PayloadTooLarge => "Content Too Large",
            Status::UriTooLong => "URI Too Long",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::NotImplemented => "Not Implemented",
            Status::ServiceUnavailable => "Service Unavailable",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// The status code and body length of a response this server wrote (`response`: its head and
/// as much of its body as was written with it), for the access log.
pub fn status_and_body(response: &[u8]) -> (u16, u64) {
    let status = response
        .get(9..12)
        .and_then(|code| std::str::from_utf8(code).ok()?.parse().ok())
        .unwrap_or(0);
    let head = head_len(response).unwrap_or(response.len());
    (status, (response.len() - head) as u64)
}

/// Bytes of the head at the start of an HTTP message, its blank line included; `None` while the
/// blank line has not come.
pub fn head_len(message: &[u8]) -> Option<usize> {
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|end| end + 4)
}

/// Appends a complete response to `out`. `head_only` (HEAD) keeps the headers, drops the body.
pub fn write(out: &mut Vec<u8>, status: Status, keep_alive: bool, head_only: bool) {
    let error_body;
    let (body, content_type) = if status == Status::Ok {
        body()
    } else {
        error_body = format!("{} {}\n", status.code(), status.reason());
        (error_body.as_bytes(), TEXT)
    };
    let allow = [("Allow", ALLOW)];
    let extra: &[(&str, &str)] = if status == Status::NotImplemented {
        &allow
    } else {
        &[]
    };
    out.reserve(HEAD_CAPACITY + body.len());
    write_head(
        out,
        status,
        keep_alive,
        Some((content_type, body.len() as u64)),
        extra,
    );
    if !head_only {
        out.extend_from_slice(body);
    }
}

/// Appends a response head: status line, Date, Server, `extra` headers, Content-Type and
/// Content-Length when there is a `content` (type, length), Connection.
pub fn write_head(
    out: &mut Vec<u8>,
    status: Status,
    keep_alive: bool,
    content: Option<(&str, u64)>,
    extra: &[(&str, &str)],
) {
    // One allocation for the whole head, not one per piece as the buffer grows.
    out.reserve(HEAD_CAPACITY);
    let mut code = itoa::Buffer::new();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(code.format(status.code()).as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.reason().as_bytes());
    out.extend_from_slice(b"\r\nDate: ");
    out.extend_from_slice(&date());
    out.extend_from_slice(b"\r\nServer: ");
    out.extend_from_slice(SERVER.as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some((content_type, length)) = content {
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(content_type.as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in extra {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
}

/// Where the Date value is in an answer [`write_head`] wrote (its second line, so the first match
/// is the header, never body bytes): the kernel's response table and the file cache patch it.
pub fn date_offset(answer: &[u8]) -> Option<usize> {
    const PREFIX: &[u8] = b"\r\nDate: ";
    let at = answer.windows(PREFIX.len()).position(|w| w == PREFIX)? + PREFIX.len();
    (at + DATE_LEN <= answer.len()).then_some(at)
}

/// The current time as an IMF-fixdate, formatted once per second on each thread. The clock read
/// is the coarse one (the kernel's last tick, a few ms behind; a precise read showed in the
/// profile of pipelined answers): a Date turns over at most a tick late.
pub fn date() -> [u8; DATE_LEN] {
    thread_local! {
        static CACHE: Cell<(u64, [u8; DATE_LEN])> = const { Cell::new((u64::MAX, [0; DATE_LEN])) };
    }
    let now =
        u64::try_from(rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse).tv_sec)
            .unwrap_or(0);
    CACHE.with(|cache| {
        let (second, date) = cache.get();
        if second == now {
            return date;
        }
        let date = date_of(now);
        cache.set((now, date));
        date
    })
}

/// `unix` (seconds) as an IMF-fixdate.
pub fn date_of(unix: u64) -> [u8; DATE_LEN] {
    let mut date = [0; DATE_LEN];
    date.copy_from_slice(format_imf_fixdate(unix).as_bytes());
    date
}

/// Parses an HTTP date into Unix seconds: an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) and
/// the two obsolete formats a recipient must also accept (RFC 9110 §5.6.7: RFC 850's
/// `Sunday, 06-Nov-94 08:49:37 GMT` and asctime's `Sun Nov  6 08:49:37 1994`).
pub fn parse_http_date(text: &str) -> Option<u64> {
    let time = httpdate::parse_http_date(text.trim()).ok()?;
    Some(time.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// `unix` (seconds) as an IMF-fixdate.
pub fn format_imf_fixdate(unix: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(unix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imf_fixdate() {
        assert_eq!(format_imf_fixdate(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            format_imf_fixdate(784_111_777),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(
            format_imf_fixdate(1_709_210_096),
            "Thu, 29 Feb 2024 12:34:56 GMT"
        );
    }

    #[test]
    fn imf_fixdate_round_trips() {
        for unix in [0, 784_111_777, 1_709_210_096, 1_795_706_729] {
            assert_eq!(parse_http_date(&format_imf_fixdate(unix)), Some(unix));
        }
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 25:49:37 GMT"), None);
        assert_eq!(parse_http_date("yesterday"), None);
    }

    /// RFC 9110 §5.6.7: a recipient must accept the obsolete formats too (a validator in one of
    /// them was ignored before).
    #[test]
    fn obsolete_date_formats_are_accepted() {
        for text in [
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            " Sun, 06 Nov 1994 08:49:37 GMT ",
        ] {
            assert_eq!(parse_http_date(text), Some(784_111_777), "{text:?}");
        }
    }

    #[test]
    fn content_length_matches_the_body() {
        for (status, head_only) in [
            (Status::Ok, false),
            (Status::NotImplemented, false),
            (Status::Ok, true),
        ] {
            let mut out = Vec::new();
            write(&mut out, status, true, head_only);
            let text = String::from_utf8(out).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(body.len(), if head_only { 0 } else { length });
        }
    }
}
