//! The access log's two line formats: nginx's `combined` and JSON.

use std::{io::Write as _, net::IpAddr, time::SystemTime};

use super::{Entry, Format};

/// The head's request line and the Referer and User-Agent values.
struct Fields<'a> {
    request_line: &'a [u8],
    referer: Option<&'a [u8]>,
    user_agent: Option<&'a [u8]>,
}

fn fields(head: &[u8]) -> Fields<'_> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    // Empty lines before the request line are allowed (RFC 9112 §2.2).
    let request_line = lines.by_ref().find(|line| !line.is_empty()).unwrap_or(&[]);
    let mut fields = Fields {
        request_line,
        referer: None,
        user_agent: None,
    };
    for line in lines.take_while(|line| !line.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        let name = &line[..colon];
        if name.eq_ignore_ascii_case(b"referer") {
            fields.referer.get_or_insert(value);
        } else if name.eq_ignore_ascii_case(b"user-agent") {
            fields.user_agent.get_or_insert(value);
        }
    }
    fields
}

/// `$remote_addr - - [$time_local] "$request" $status $body_bytes_sent "$http_referer"
/// "$http_user_agent"`, with nginx's escaping (`"`, `\` and bytes outside printable ASCII as
/// `\xHH`) and `-` for what is missing. Times are UTC.
pub(super) fn combined(out: &mut Vec<u8>, entry: &Entry<'_>) {
    let _ = write!(out, "{} - - [", entry.peer.ip());
    with_second(entry.time, Format::Combined, |second| {
        out.extend_from_slice(second.as_bytes());
    });
    out.extend_from_slice(b"] ");
    // The rest depends on the request head and the answer only: a thread that logs the same
    // request again (a benchmark, a health check, the kernel's repeated answers) copies it.
    thread_local! {
        static LAST: std::cell::RefCell<(Vec<u8>, u16, u64, Vec<u8>)> = Default::default();
    }
    LAST.with_borrow_mut(|(head, status, body_bytes, tail)| {
        let same =
            *status == entry.status && *body_bytes == entry.body_bytes && head[..] == *entry.head;
        if !same {
            head.clear();
            head.extend_from_slice(entry.head);
            (*status, *body_bytes) = (entry.status, entry.body_bytes);
            tail.clear();
            combined_tail(tail, entry);
        }
        out.extend_from_slice(tail);
    });
}

/// `"request" status bytes "referer" "user agent"` and the line's end.
fn combined_tail(out: &mut Vec<u8>, entry: &Entry<'_>) {
    let fields = fields(entry.head);
    out.push(b'"');
    escaped(out, fields.request_line);
    out.extend_from_slice(b"\" ");
    out.extend_from_slice(itoa::Buffer::new().format(entry.status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(itoa::Buffer::new().format(entry.body_bytes).as_bytes());
    out.extend_from_slice(b" \"");
    escaped(out, fields.referer.unwrap_or(b"-"));
    out.extend_from_slice(b"\" \"");
    escaped(out, fields.user_agent.unwrap_or(b"-"));
    out.extend_from_slice(b"\"\n");
}

fn escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_empty() {
        out.push(b'-');
    }
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

/// Calls `f` with the second of `time` as `format` writes it (UTC): formatted once per second and
/// thread, not once per line.
fn with_second<T>(time: SystemTime, format: Format, f: impl FnOnce(&str) -> T) -> T {
    thread_local! {
        static SECONDS: std::cell::RefCell<[(u64, String); 2]> = Default::default();
    }
    let second = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    SECONDS.with_borrow_mut(|seconds| {
        let (pattern, cached) = match format {
            Format::Combined => ("%d/%b/%Y:%H:%M:%S +0000", &mut seconds[0]),
            Format::Json => ("%Y-%m-%dT%H:%M:%S", &mut seconds[1]),
        };
        if cached.0 != second || cached.1.is_empty() {
            let timestamp =
                jiff::Timestamp::from_second(second as i64).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
            *cached = (second, timestamp.strftime(pattern).to_string());
        }
        f(&cached.1)
    })
}

/// One JSON object: `time` (RFC 3339, UTC, milliseconds), `remote_addr`, `remote_port`,
/// `request`, `status`, `body_bytes_sent`, `referer`, `user_agent` (null when absent), `path`
/// (`kernel` or `user`), `request_time` (seconds), `connection`.
pub(super) fn json(out: &mut Vec<u8>, entry: &Entry<'_>) {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        time: String,
        remote_addr: IpAddr,
        remote_port: u16,
        request: std::borrow::Cow<'a, str>,
        status: u16,
        body_bytes_sent: u64,
        referer: Option<std::borrow::Cow<'a, str>>,
        user_agent: Option<std::borrow::Cow<'a, str>>,
        path: &'static str,
        request_time: f64,
        connection: u64,
    }
    let fields = fields(entry.head);
    let millis = entry
        .time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_millis());
    let line = Line {
        time: with_second(entry.time, Format::Json, |second| {
            format!("{second}.{millis:03}Z")
        }),
        remote_addr: entry.peer.ip(),
        remote_port: entry.peer.port(),
        request: String::from_utf8_lossy(fields.request_line),
        status: entry.status,
        body_bytes_sent: entry.body_bytes,
        referer: fields.referer.map(String::from_utf8_lossy),
        user_agent: fields.user_agent.map(String::from_utf8_lossy),
        path: entry.answered.label(),
        request_time: entry.request_time.as_secs_f64(),
        connection: entry.connection,
    };
    if serde_json::to_writer(&mut *out, &line).is_ok() {
        out.push(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::access_log::AnsweredBy;

    fn entry(head: &[u8]) -> Entry<'_> {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_765_366_123),
            peer: "127.0.0.1:40000".parse().unwrap(),
            head,
            status: 200,
            body_bytes: 12,
            answered: AnsweredBy::Kernel,
            request_time: Duration::from_micros(15),
            connection: 7,
        }
    }

    #[test]
    fn combined_lines_are_nginx_s() {
        let mut out = Vec::new();
        let head = b"GET /a?b=\"c\" HTTP/1.1\r\nHost: x\r\nUser-Agent: curl/8\r\nreferer:  http://r/ \r\n\r\n";
        combined(&mut out, &entry(head));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "127.0.0.1 - - [03/Dec/2025:12:36:06 +0000] \"GET /a?b=\\x22c\\x22 HTTP/1.1\" 200 12 \"http://r/\" \"curl/8\"\n"
        );
        let mut out = Vec::new();
        combined(&mut out, &entry(b"\r\nBAD\xff\r\n"));
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("\"BAD\\xFF\" 200 12 \"-\" \"-\"\n"),
            "missing fields are -, bytes escaped"
        );
    }

    #[test]
    fn a_repeated_request_gets_its_own_line_back() {
        let a: &[u8] = b"GET /a HTTP/1.1\r\nUser-Agent: a\r\n\r\n";
        let b: &[u8] = b"GET /a HTTP/1.1\r\nUser-Agent: b\r\n\r\n";
        let line = |head, status| {
            let mut out = Vec::new();
            combined(
                &mut out,
                &Entry {
                    status,
                    ..entry(head)
                },
            );
            String::from_utf8(out).unwrap()
        };
        let first = line(a, 200);
        assert!(
            first.ends_with("\"GET /a HTTP/1.1\" 200 12 \"-\" \"a\"\n"),
            "{first}"
        );
        assert!(line(b, 200).ends_with("\"-\" \"b\"\n"));
        assert!(line(b, 404).contains("\" 404 12 "));
        assert_eq!(line(a, 200), first);
    }

    #[test]
    fn json_lines_parse_back() {
        let mut out = Vec::new();
        json(
            &mut out,
            &entry(b"HEAD / HTTP/1.0\r\nUser-Agent: a\"b\r\n\r\n"),
        );
        assert_eq!(out.last(), Some(&b'\n'));
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["time"], "2025-12-03T12:36:06.123Z");
        assert_eq!(line["remote_addr"], "127.0.0.1");
        assert_eq!(line["remote_port"], 40000);
        assert_eq!(line["request"], "HEAD / HTTP/1.0");
        assert_eq!(line["status"], 200);
        assert_eq!(line["body_bytes_sent"], 12);
        assert_eq!(line["referer"], serde_json::Value::Null);
        assert_eq!(line["user_agent"], "a\"b");
        assert_eq!(line["path"], "kernel");
        assert_eq!(line["connection"], 7);
    }
}
