//! One HTTP/1.x connection as a state machine without I/O: bytes in, response bytes out, and
//! whether to close. Both dispatch modes (work queue and thread per connection) drive the same
//! `Session`, so they send the same bytes for the same input.
//!
//! Persistence follows RFC 9112 §9.3: HTTP/1.1 stays open unless either side says `close`; HTTP/1.0
//! closes unless the request asks for `keep-alive`. Pipelined requests are answered in order. A
//! request's response is produced once its body (if any) has been read and discarded.

use khttpd_common::http::REQUEST_KEY_BYTES;

use std::sync::Arc;

use super::{
    response::{self, Status},
    site::{self, FileBody, Site},
};

/// Longest request line (method, target, version).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Largest header section after the request line.
pub const MAX_HEADER_SECTION: usize = 8 * 1024;
/// Most header fields in one request.
const MAX_HEADERS: usize = 100;
/// Largest request body read (and discarded); larger ones get 413.
pub const MAX_BODY: u64 = 1024 * 1024;
/// Longest chunk-size line or trailer line of a chunked body, line ending included: one cut
/// after this many bytes is refused, and so is one that arrives whole.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// What the connection does after the bytes in `out` are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Read more.
    Read,
    /// Close (after writing everything, with a FIN).
    Close,
}

#[derive(Default)]
pub struct Session {
    /// Received bytes not consumed yet.
    input: Vec<u8>,
    /// The request whose body is being discarded, if any (boxed: rare, and an idle connection
    /// should not carry its size).
    body: Option<Box<Body>>,
    /// Requests the kernel may answer from now on, when the fast path is on.
    learned: Option<Vec<Learned>>,
    /// The connection closes because a complete request without a body, and nothing after it,
    /// asked for it (see [`Session::client_is_done`]).
    asked_to_close: bool,
    /// Answers written since the driver last asked ([`Session::take_answered`]).
    answered: u32,
    /// `--root`: GET and HEAD are answered from it instead of the greeting.
    site: Option<Arc<Site>>,
    /// File bytes the last answer still owes, sent by the driver before anything else.
    pending_file: Option<FileBody>,
    /// With `--access-log` (boxed: a connection without one should not carry its size).
    log: Option<Box<SessionLog>>,
}

/// What was answered since the driver last cleared it, in buffers kept for the next requests.
#[derive(Default)]
struct SessionLog {
    /// The answered requests' heads, one after the other.
    heads: Vec<u8>,
    /// Each answer: where its request's head is in `heads`, its status and body length.
    answered: Vec<(std::ops::Range<usize>, u16, u64)>,
    /// The head of the request whose body is being read.
    body_head: Option<Vec<u8>>,
}

/// What the access log says of an answered request (`crate::access_log`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Logged<'a> {
    /// The request head as received (for an error, what had arrived of it).
    pub head: &'a [u8],
    pub status: u16,
    /// Bytes of body the answer carries, file bytes included.
    pub body_bytes: u64,
}

/// A request whose answer depends on its bytes alone (a GET or HEAD without a body, answered
/// whole), so the kernel may send the same answer for the same bytes (see `super::kernel`; with
/// `--root` the answer also depends on the files, and the kernel forgets everything it learned
/// when one changes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    /// The request head, exactly as received.
    pub request: Vec<u8>,
    /// Where the answer is in the output buffer the session wrote it to (the driver teaches the
    /// kernel before it writes and clears that buffer, so nothing is copied for answers the
    /// kernel already knows).
    pub response: std::ops::Range<usize>,
    pub keep_alive: bool,
}

struct Body {
    framing: Framing,
    /// Bytes of body seen so far.
    total: u64,
    /// The request head, answered once the body is done (its `framing` taken out).
    head: Head,
}

enum Framing {
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
}

/// A parsed request head, reduced to what decides the response.
struct Head {
    status: Status,
    keep_alive: bool,
    head_only: bool,
    framing: Option<Framing>,
    /// Filled when a site answers GET and HEAD.
    site_request: Option<site::Request>,
}

impl Session {
    pub fn new() -> Session {
        Session::default()
    }

    /// Answers GET and HEAD from `site` instead of with the greeting.
    pub fn with_site(mut self, site: Arc<Site>) -> Session {
        self.site = Some(site);
        self
    }

    /// File bytes to send (with sendfile) before anything else this session wrote after them.
    /// The session stops answering pipelined requests until this is taken and
    /// `receive(&[], ..)` called again.
    pub fn take_file(&mut self) -> Option<FileBody> {
        self.pending_file.take()
    }

    /// Whether an answer still owes file bytes (see [`Session::take_file`]).
    pub fn owes_file(&self) -> bool {
        self.pending_file.is_some()
    }

    /// A session that also records the requests it answers that the kernel could answer.
    pub fn learning() -> Session {
        Session {
            learned: Some(Vec::new()),
            ..Session::default()
        }
    }

    /// A session that also records what it answers for the access log ([`Session::logged`]).
    pub fn with_log(mut self) -> Session {
        self.log = Some(Box::default());
        self
    }

    /// How many answers were written since the last call (for `khttpd_http_user_responses_total`).
    pub fn take_answered(&mut self) -> u32 {
        std::mem::take(&mut self.answered)
    }

    /// Requests answered since [`Session::clear_logged`] (none unless [`Session::with_log`]).
    pub fn logged(&self) -> impl Iterator<Item = Logged<'_>> {
        self.log.iter().flat_map(|log| {
            log.answered
                .iter()
                .map(|(head, status, body_bytes)| Logged {
                    head: &log.heads[head.clone()],
                    status: *status,
                    body_bytes: *body_bytes,
                })
        })
    }

    /// Forgets what [`Session::logged`] returned (keeping the buffers).
    pub fn clear_logged(&mut self) {
        if let Some(log) = &mut self.log {
            log.heads.clear();
            log.answered.clear();
        }
    }

    /// Turns the connection away before reading a request: answers 503 (the connection closes).
    pub fn turn_away(&mut self, out: &mut Vec<u8>) {
        let start = out.len();
        response::write(out, Status::ServiceUnavailable, false, false);
        self.record(&[], &out[start..]);
    }

    /// Counts the answer `response` just written (to the request at the start of `input`) and
    /// records it for the access log.
    fn record(&mut self, input: &[u8], response: &[u8]) {
        self.answered += 1;
        let Some(log) = &mut self.log else {
            return;
        };
        let start = log.heads.len();
        match log.body_head.take() {
            Some(head) => log.heads.extend_from_slice(&head),
            None => {
                let input = &input[..input.len().min(MAX_REQUEST_LINE + MAX_HEADER_SECTION)];
                let end = response::head_len(input).unwrap_or(input.len());
                log.heads.extend_from_slice(&input[..end]);
            }
        }
        let (status, body_bytes) = response::status_and_body(response);
        let file = self.pending_file.as_ref().map_or(0, |file| file.len);
        let head = start..log.heads.len();
        log.answered.push((head, status, body_bytes + file));
    }

    /// After [`Next::Close`]: whether the client is done sending, so the connection may close at
    /// once when nothing more has arrived. Otherwise (errors, bodies, bytes after the request)
    /// the closing side must read what the client still sends, or the close would be a reset.
    pub fn client_is_done(&self) -> bool {
        self.asked_to_close
    }

    /// Writes the answer to a request head: from the site when there is one, else the greeting
    /// (or the error the head calls for).
    fn answer(&mut self, head: &Head, out: &mut Vec<u8>) {
        match (&self.site, &head.site_request) {
            (Some(site), Some(request)) => {
                self.pending_file = site.answer(request, head.keep_alive, head.head_only, out);
            }
            _ => response::write(out, head.status, head.keep_alive, head.head_only),
        }
    }

    /// The step after answering a request of `len` bytes on a connection that stays open: on to
    /// the next request, or a pause while the answer still owes file bytes.
    fn answered(&self, len: usize) -> Step {
        if self.pending_file.is_some() {
            Step::Paused(len)
        } else {
            Step::Consumed(len)
        }
    }

    /// True while part of a request head has arrived and the rest has not.
    pub fn reading_head(&self) -> bool {
        !self.input.is_empty() && self.body.is_none()
    }

    /// The client took too long to send a request head: answers 408 (the connection closes).
    pub fn head_timed_out(&mut self, out: &mut Vec<u8>) {
        let input = std::mem::take(&mut self.input);
        let start = out.len();
        response::write(out, Status::RequestTimeout, false, false);
        self.record(&input, &out[start..]);
    }

    /// True between requests: nothing buffered, no body being read.
    pub fn is_idle(&self) -> bool {
        self.input.is_empty() && self.body.is_none()
    }

    /// Requests recorded since the last call (always empty unless [`Session::learning`]).
    pub fn take_learned(&mut self) -> Vec<Learned> {
        self.learned
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Takes bytes from the client and appends every response they complete to `out`.
    pub fn receive(&mut self, data: &[u8], out: &mut Vec<u8>) -> Next {
        if self.input.is_empty() {
            // The usual case, nothing left over from before: the requests are parsed where they
            // were read, and only what is not answered yet is kept.
            let (consumed, next) = self.answer_all(data, out);
            self.input.extend_from_slice(&data[consumed..]);
            return next;
        }
        let mut input = std::mem::take(&mut self.input);
        input.extend_from_slice(data);
        let (consumed, next) = self.answer_all(&input, out);
        input.drain(..consumed);
        // Between requests (most of a keep-alive connection's life) no buffer is held.
        if input.is_empty() {
            input = Vec::new();
        }
        self.input = input;
        next
    }

    /// Answers the requests at the start of `input`; returns how many bytes they took.
    fn answer_all(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Next) {
        let mut consumed = 0;
        let next = loop {
            let start = out.len();
            let step = self.step(&input[consumed..], out);
            if out.len() > start {
                self.record(&input[consumed..], &out[start..]);
            }
            match step {
                Step::Consumed(0) => break Next::Read,
                Step::Consumed(n) => consumed += n,
                Step::Paused(n) => {
                    consumed += n;
                    break Next::Read;
                }
                Step::Close => break Next::Close,
            }
        };
        (consumed, next)
    }

    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Step {
        if self.body.is_some() {
            return self.discard_body(input, out);
        }
        if input.is_empty() {
            return Step::Consumed(0);
        }
        // Not initialised first: httparse fills what it uses (a zeroed array is 3.2 KB of stores
        // per request).
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        let parsed = request.parse_with_uninit_headers(input, &mut headers);
        match parsed {
            Ok(httparse::Status::Partial) => match oversize(input) {
                Some(status) => fail(out, status, is_head(input)),
                None => Step::Consumed(0),
            },
            Ok(httparse::Status::Complete(len)) => {
                if let Some(status) = oversize(&input[..len]) {
                    return fail(out, status, is_head(input));
                }
                let head = evaluate(&request, self.site.is_some());
                match head.framing {
                    None => {
                        let start = out.len();
                        self.answer(&head, out);
                        let whole = self.pending_file.is_none();
                        if let Some(learned) = &mut self.learned {
                            if head.status == Status::Ok && whole && len <= REQUEST_KEY_BYTES {
                                learned.push(Learned {
                                    request: input[..len].to_vec(),
                                    response: start..out.len(),
                                    keep_alive: head.keep_alive,
                                });
                            }
                        }
                        if head.keep_alive {
                            self.answered(len)
                        } else {
                            // The client asked to close (or spoke HTTP/1.0) after a request it
                            // sent whole: it has nothing more to send.
                            self.asked_to_close = head.status == Status::Ok && len == input.len();
                            Step::Close
                        }
                    }
                    Some(framing) => {
                        if let Some(log) = &mut self.log {
                            log.body_head = Some(input[..len].to_vec());
                        }
                        self.body = Some(Box::new(Body {
                            framing,
                            total: 0,
                            head: Head {
                                framing: None,
                                ..head
                            },
                        }));
                        Step::Consumed(len)
                    }
                }
            }
            Err(error) => {
                // Had the head come in pieces, one ending before the error could already have
                // been over a limit: answer what that would have, so the answer does not depend
                // on how the bytes arrived. (Only the bytes before the error say it is a HEAD.)
                let valid = &input[..valid_prefix(input)];
                let head_only = is_head(valid);
                if let Some(status) = oversize(valid) {
                    return fail(out, status, head_only);
                }
                let status = match error {
                    httparse::Error::Version => match version_error(input) {
                        Some(status) => status,
                        // The line cannot grow past its limit while we wait.
                        None if input.len() > MAX_REQUEST_LINE => Status::UriTooLong,
                        // Which error depends on the rest of the line: wait for it.
                        None => return Step::Consumed(0),
                    },
                    httparse::Error::TooManyHeaders => Status::HeaderFieldsTooLarge,
                    _ => Status::BadRequest,
                };
                fail(out, status, head_only)
            }
        }
    }

    /// Reads and drops body bytes; answers when the body is complete.
    fn discard_body(&mut self, input: &[u8], out: &mut Vec<u8>) -> Step {
        let body = self.body.as_mut().expect("a body is being read");
        let head_only = body.head.head_only;
        let (consumed, framing) = match body.framing {
            Framing::Length(remaining) => {
                let n = remaining.min(input.len() as u64);
                (
                    n as usize,
                    (remaining > n).then_some(Framing::Length(remaining - n)),
                )
            }
            Framing::ChunkSize => match httparse::parse_chunk_size(input) {
                // A line is too long whether it arrives whole or cut (see MAX_CHUNK_LINE).
                Ok(httparse::Status::Complete((len, _))) if len > MAX_CHUNK_LINE => {
                    return fail(out, Status::BadRequest, head_only)
                }
                Ok(httparse::Status::Complete((len, 0))) => (len, Some(Framing::Trailers)),
                Ok(httparse::Status::Complete((len, size))) => {
                    body.total = body.total.saturating_add(size);
                    if body.total > MAX_BODY {
                        return fail(out, Status::PayloadTooLarge, head_only);
                    }
                    (len, Some(Framing::ChunkData(size)))
                }
                Ok(httparse::Status::Partial) if input.len() <= MAX_CHUNK_LINE => {
                    return Step::Consumed(0)
                }
                _ => return fail(out, Status::BadRequest, head_only),
            },
            Framing::ChunkData(remaining) => {
                let n = remaining.min(input.len() as u64);
                let next = if remaining > n {
                    Framing::ChunkData(remaining - n)
                } else {
                    Framing::ChunkDataEnd
                };
                (n as usize, Some(next))
            }
            Framing::ChunkDataEnd => match input {
                [b'\r', b'\n', ..] => (2, Some(Framing::ChunkSize)),
                [b'\r'] | [] => return Step::Consumed(0),
                _ => return fail(out, Status::BadRequest, head_only),
            },
            // Trailer fields are ignored; the body ends at the empty line.
            Framing::Trailers => match input.windows(2).position(|w| w == b"\r\n") {
                Some(end) if end + 2 > MAX_CHUNK_LINE => {
                    return fail(out, Status::BadRequest, head_only)
                }
                Some(0) => (2, None),
                Some(end) => (end + 2, Some(Framing::Trailers)),
                None if input.len() <= MAX_CHUNK_LINE => return Step::Consumed(0),
                None => return fail(out, Status::BadRequest, head_only),
            },
        };
        match framing {
            Some(framing) => {
                body.framing = framing;
                Step::Consumed(consumed)
            }
            None => {
                let body = self.body.take().expect("a body is being read");
                self.answer(&body.head, out);
                if body.head.keep_alive {
                    // Every framing ends by consuming at least one byte, so this is progress.
                    self.answered(consumed)
                } else {
                    Step::Close
                }
            }
        }
    }
}

enum Step {
    /// This many input bytes were used; 0 means more input is needed.
    Consumed(usize),
    /// This many bytes were used, and the answer owes file bytes: stop until they are sent.
    Paused(usize),
    /// A final response was written; the connection closes.
    Close,
}

fn fail(out: &mut Vec<u8>, status: Status, head_only: bool) -> Step {
    response::write(out, status, false, head_only);
    Step::Close
}

/// Whether the request is a HEAD, for an error answer: decided on the bytes (httparse may not
/// have got to the method) and on no more than the bytes any limit is checked on, so the answer
/// is the same however they arrive.
fn is_head(input: &[u8]) -> bool {
    let input = &input[..input.len().min(MAX_REQUEST_LINE + 1)];
    let start = input
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(input.len());
    input[start..].starts_with(b"HEAD ")
}

/// The longest prefix of `input` that httparse still takes for the start of a head (the bytes
/// before the one it refuses); found by bisection, only on the way to an error answer.
fn valid_prefix(input: &[u8]) -> usize {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut partial = |len: usize| {
        matches!(
            httparse::Request::new(&mut headers).parse(&input[..len]),
            Ok(httparse::Status::Partial)
        )
    };
    let (mut good, mut bad) = (0, input.len());
    while bad - good > 1 {
        let middle = good + (bad - good) / 2;
        if partial(middle) {
            good = middle;
        } else {
            bad = middle;
        }
    }
    good
}

/// 414 or 431 when an incomplete (or complete) head is already over a limit.
fn oversize(head: &[u8]) -> Option<Status> {
    match head.iter().position(|&b| b == b'\n') {
        None if head.len() > MAX_REQUEST_LINE => Some(Status::UriTooLong),
        Some(line_end) if line_end > MAX_REQUEST_LINE => Some(Status::UriTooLong),
        Some(line_end) if head.len() - line_end > MAX_HEADER_SECTION => {
            Some(Status::HeaderFieldsTooLarge)
        }
        _ => None,
    }
}

fn evaluate(request: &httparse::Request<'_, '_>, for_site: bool) -> Head {
    let http11 = request.version == Some(1);
    let method = request.method.unwrap_or("");
    let head_only = method == "HEAD";
    let Some(path) = origin_form(method, request.path.unwrap_or("").as_bytes()) else {
        return refuse(Status::BadRequest, head_only);
    };
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding: Option<&[u8]> = None;
    let (mut close, mut keep_alive, mut hosts) = (false, false, 0);
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            // Digits only: no sign, no spaces inside, no list. Repeats must agree.
            let Some(value) = parse_length(header.value) else {
                return refuse(Status::BadRequest, head_only);
            };
            if content_length.is_some_and(|existing| existing != value) {
                return refuse(Status::BadRequest, head_only);
            }
            content_length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if transfer_encoding.is_some() {
                return refuse(Status::BadRequest, head_only);
            }
            transfer_encoding = Some(header.value);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case("host") {
            if !is_host(header.value) {
                return refuse(Status::BadRequest, head_only);
            }
            hosts += 1;
        }
    }
    // RFC 9112 §3.2: an HTTP/1.1 request needs exactly one Host.
    if hosts > 1 || (http11 && hosts == 0) {
        return refuse(Status::BadRequest, head_only);
    }
    let framing = match (content_length, transfer_encoding) {
        // Both framings at once is the classic smuggling shape: refuse it.
        (Some(_), Some(_)) => return refuse(Status::BadRequest, head_only),
        // HTTP/1.0 has no transfer codings (RFC 9112 §6.1: the framing is faulty).
        (None, Some(_)) if !http11 => return refuse(Status::BadRequest, head_only),
        (None, Some(te)) => match transfer_codings(te) {
            Ok(()) => Some(Framing::ChunkSize),
            Err(status) => return refuse(status, head_only),
        },
        (Some(length), None) if length > MAX_BODY => {
            return refuse(Status::PayloadTooLarge, head_only)
        }
        (Some(0), None) | (None, None) => None,
        (Some(length), None) => Some(Framing::Length(length)),
    };
    let keep_alive = if http11 { !close } else { keep_alive && !close };
    let status = if method == "GET" || head_only {
        Status::Ok
    } else {
        Status::NotImplemented
    };
    let site_request = (for_site && status == Status::Ok).then(|| {
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        site::Request {
            target: path.to_vec(),
            if_none_match: header("if-none-match"),
            if_modified_since: header("if-modified-since"),
            range: header("range"),
        }
    });
    Head {
        status,
        keep_alive,
        head_only,
        framing,
        site_request,
    }
}

/// An error answer: no body is read and the connection closes.
fn refuse(status: Status, head_only: bool) -> Head {
    Head {
        status,
        keep_alive: false,
        head_only,
        framing: None,
        site_request: None,
    }
}

/// 505 for a well-formed version this server does not speak (`HTTP/2.0`, `HTTP/0.9`), 400 for
/// anything else httparse refused as a version (`http/1.1`, `HTTP/1.10`, none at all); `None`
/// until the request line is complete (httparse refuses `HTTP/2` before the line ends).
fn version_error(input: &[u8]) -> Option<Status> {
    let line = &input[..input.iter().position(|&b| b == b'\n')?];
    if line.len() > MAX_REQUEST_LINE {
        // What a cut of this line would have got while it was still arriving (see `oversize`).
        return Some(Status::UriTooLong);
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some([b'H', b'T', b'T', b'P', b'/', major, b'.', minor]), None)
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Some(Status::VersionNotSupported)
        }
        _ => Some(Status::BadRequest),
    }
}

/// The origin-form target (`/path?query`) of a request (RFC 9112 §3.2): as sent, or the path
/// of an absolute-form target (`http://host/path`, which servers must accept), `/` when it has
/// none; CONNECT's authority-form as sent (it gets 501). `None` for anything else — a target that
/// is not a path, `*` other than for OPTIONS, a fragment, or bytes outside visible ASCII
/// (httparse lets UTF-8 through) — which gets 400.
fn origin_form<'a>(method: &str, target: &'a [u8]) -> Option<&'a [u8]> {
    if !target.iter().all(|&b| b.is_ascii_graphic() && b != b'#') {
        return None;
    }
    if target.first() == Some(&b'/')
        || (target == b"*" && method == "OPTIONS")
        || method == "CONNECT"
    {
        return Some(target);
    }
    let scheme_end = target.windows(3).position(|w| w == b"://")?;
    let scheme = &target[..scheme_end];
    if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let authority_end = rest
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .unwrap_or(rest.len());
    if authority_end == 0 || !is_host(&rest[..authority_end]) {
        return None;
    }
    match &rest[authority_end..] {
        [] => Some(b"/"),
        path if path[0] == b'?' => None,
        path => Some(path),
    }
}

/// A Host value: `uri-host [":" port]` (RFC 9110 §7.2), empty allowed. Servers must answer 400
/// to an invalid one (RFC 9112 §3.2); names are only checked for their characters.
fn is_host(value: &[u8]) -> bool {
    let (host, port) = match value.iter().rposition(|&b| b == b':') {
        Some(colon) if !value[colon..].contains(&b']') => (&value[..colon], &value[colon + 1..]),
        _ => (value, &b""[..]),
    };
    let host_ok = match host {
        [b'[', literal @ .., b']'] => {
            !literal.is_empty()
                && literal
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        }
        name => name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b)),
    };
    host_ok && port.iter().all(u8::is_ascii_digit)
}

/// A request's `Transfer-Encoding` list: only `chunked`, once, is understood. The body of a list
/// whose last coding is not chunked has no knowable end (400, RFC 9112 §6.3); any other coding
/// before a final chunked is one this server does not implement (501, RFC 9112 §6.1).
fn transfer_codings(value: &[u8]) -> Result<(), Status> {
    let codings: Vec<&[u8]> = value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty())
        .collect();
    let is_chunked = |coding: &&[u8]| coding.eq_ignore_ascii_case(b"chunked");
    match codings.split_last() {
        Some((last, others)) if is_chunked(last) && !others.iter().any(is_chunked) => {
            if others.is_empty() {
                Ok(())
            } else {
                Err(Status::NotImplemented)
            }
        }
        _ => Err(Status::BadRequest),
    }
}

fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in chunks of `chunk` bytes; returns (status codes, Connection values, body
    /// lengths) of the responses and whether the session asked to close.
    fn run(input: &[u8], chunk: usize) -> (Vec<u16>, Vec<String>, bool) {
        let mut session = Session::new();
        let mut out = Vec::new();
        let mut closed = false;
        for piece in input.chunks(chunk.max(1)) {
            if session.receive(piece, &mut out) == Next::Close {
                closed = true;
                break;
            }
        }
        let text = String::from_utf8(out).unwrap();
        let mut codes = Vec::new();
        let mut connections = Vec::new();
        for head in text.split("HTTP/1.1 ").skip(1) {
            codes.push(head[..3].parse().unwrap());
            let connection = head
                .lines()
                .find_map(|l| l.strip_prefix("Connection: "))
                .unwrap();
            connections.push(connection.to_owned());
        }
        (codes, connections, closed)
    }

    fn whole_and_bytewise(input: &[u8]) -> (Vec<u16>, Vec<String>, bool) {
        let whole = run(input, input.len());
        assert_eq!(
            run(input, 1),
            whole,
            "byte-at-a-time differs for {:?}",
            String::from_utf8_lossy(input)
        );
        whole
    }

    #[test]
    fn persistence_follows_rfc_9112() {
        let cases: [(&[u8], &str, bool); 6] = [
            (b"GET / HTTP/1.0\r\n\r\n", "close", true),
            (
                b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
                "keep-alive",
                false,
            ),
            (
                b"GET / HTTP/1.0\r\nConnection: Keep-Alive, close\r\n\r\n",
                "close",
                true,
            ),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "keep-alive", false),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                "close",
                true,
            ),
            (
                b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: foo, CLOSE\r\n\r\n",
                "close",
                true,
            ),
        ];
        for (request, connection, closes) in cases {
            let (codes, connections, closed) = whole_and_bytewise(request);
            assert_eq!(
                (codes, connections, closed),
                (vec![200], vec![connection.to_owned()], closes)
            );
        }
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_and_stop_at_close() {
        let input = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcHEAD /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\nT: 1\r\n\r\nGET /d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\nHost: a\r\n\r\n";
        let (codes, connections, closed) = whole_and_bytewise(input);
        assert_eq!(codes, [200, 501, 200, 200]);
        assert_eq!(
            connections,
            ["keep-alive", "keep-alive", "keep-alive", "close"]
        );
        assert!(closed);
    }

    #[test]
    fn head_has_headers_but_no_body() {
        let mut out = Vec::new();
        Session::new().receive(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("Content-Length: 14\r\n") && text.ends_with("\r\n\r\n"),
            "{text}"
        );
    }

    #[test]
    fn bad_input_gets_the_right_status_and_closes() {
        let long_target = format!(
            "GET /{} HTTP/1.1\r\nHost: a\r\n\r\n",
            "a".repeat(MAX_REQUEST_LINE)
        );
        let big_headers = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "b".repeat(MAX_HEADER_SECTION)
        );
        let too_big_body = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (b"GARBAGE\r\n\r\n".to_vec(), 400),
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), 400), // no Host
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n".to_vec(), 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n".to_vec(), 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(), 400),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), 400),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\n".to_vec(), 400),
            (b"GET / HTTP/2.0\r\n\r\n".to_vec(), 505),
            (long_target.into_bytes(), 414),
            (big_headers.into_bytes(), 431),
            (too_big_body.into_bytes(), 413),
        ];
        for (request, status) in cases {
            let (codes, connections, closed) = whole_and_bytewise(&request);
            let shown = String::from_utf8_lossy(&request[..request.len().min(80)]).into_owned();
            assert_eq!(
                (codes, connections, closed),
                (vec![status], vec!["close".to_owned()], true),
                "{shown}"
            );
        }
    }

    #[test]
    fn chunked_bodies_over_the_limit_get_413() {
        let mut request =
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..3 {
            request.extend_from_slice(format!("{:x}\r\n", MAX_BODY / 2).as_bytes());
            request.extend(std::iter::repeat_n(b'x', (MAX_BODY / 2) as usize));
            request.extend_from_slice(b"\r\n");
        }
        let (codes, _, closed) = run(&request, 64 * 1024);
        assert_eq!((codes, closed), (vec![413], true));
    }

    #[test]
    fn a_line_with_a_bad_version_waits_for_its_end_only_up_to_the_limit() {
        let mut request = b"GET / HTTP/2".to_vec();
        request.extend(std::iter::repeat_n(b'x', MAX_REQUEST_LINE));
        let (codes, _, closed) = run(&request, 1024);
        assert_eq!((codes, closed), (vec![414], true));
        let (codes, _, closed) = run(b"GET / HTTP/2.0", 1);
        assert!(codes.is_empty() && !closed);
    }

    #[test]
    fn a_partial_request_waits_for_more() {
        let (codes, _, closed) = run(b"GET / HTTP/1.1\r\nHost: a\r\n", 1);
        assert!(codes.is_empty() && !closed);
    }
}
