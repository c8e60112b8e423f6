//! The access log (`--access-log PATH|-`): one line per HTTP request, in the combined format of
//! nginx and Apache or as JSON — the requests the kernel answered included, which never reach
//! user space as requests.
//!
//! - User space: the session records each request it answers (head bytes, status, body length:
//!   `http::session::Logged`); the connection turns them into lines ([`AccessLog::log`]) with its
//!   peer address and id, one batch per read.
//! - Kernel: the verdict sends a [`AccessRecord`] of each answer on a ring buffer (only while a
//!   log is open: `http::ACCESS_LOG_GLOBAL`); [`AccessLog::kernel_loop`] turns them into lines.
//!   A record carries the request's exact bytes and the client's address, so a line does not
//!   depend on the connection still being open when it is read.
//!
//! Lines are appended to one shared buffer, which a writer thread writes out every 20 ms (or as
//! soon as it holds 256 KiB), and the kernel's ring is read on the same tick — so logging costs
//! no wake-up per request: the verdict sends its records without waking anyone
//! (`BPF_RB_NO_WAKEUP`), and a line costs its formatting and a short-held lock. Answering never
//! waits for the log: past 8 MiB of lines not yet written, lines are dropped, the kernel's records
//! wait in their ring, and a record the ring has no room for is dropped by the kernel — all
//! counted (`khttpd_access_log_dropped_total`, by where).
//!
//! SIGUSR1 reopens the file (logrotate's convention): by name, relative to a descriptor of its
//! folder opened at start — so it works after the privilege drop and inside the `--root`
//! confinement, as long as the folder lets `--user` create the file; when it cannot, one error
//! line, and the log goes on into the old file.

use std::{
    ffi::OsString,
    fs::File,
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use khttpd_common::http::AccessRecord;
use log::{error, warn};
use rustix::fs::{Mode, OFlags};

use crate::shutdown::Shutdown;

/// Bytes of lines not yet written; past it lines are dropped (and the kernel's records are left
/// in their ring, which then drops them itself): about 100 ms of the kernel path's fastest
/// answering, a stall a disk may take.
const QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// Written out at once when this many bytes are waiting.
const WRITE_BUFFER: usize = 256 * 1024;
/// How often the writer writes what is waiting, and the kernel's ring is read: the ring
/// (`http::ACCESS_BYTES`, about 27,000 records) holds 80 ms of the kernel path's fastest answering.
const TICK: Duration = Duration::from_millis(20);
/// Room the queue must have for the kernel's records to be read: more than a batch of lines
/// (at most about 600 bytes each), so a batch read is a batch queued.
const KERNEL_HEADROOM: usize = 2 * 1024 * 1024;
/// Records read from the kernel's ring per batch of lines.
const RECORDS_PER_BATCH: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// nginx's and Apache's `combined`: `addr - - [time] "request" status bytes "referer"
    /// "user agent"`.
    Combined,
    /// One JSON object per line: the same fields, plus which path answered, the request time
    /// and the connection's id.
    Json,
}

/// Which path answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answered {
    Kernel,
    User,
}

impl Answered {
    fn label(self) -> &'static str {
        match self {
            Answered::Kernel => "kernel",
            Answered::User => "user",
        }
    }
}

/// One request, as its log line tells it.
pub struct Entry<'a> {
    pub time: SystemTime,
    pub peer: SocketAddr,
    /// The request head as received (or as much of it as there was).
    pub head: &'a [u8],
    pub status: u16,
    /// Bytes of body the answer carries (0 for HEAD and 304).
    pub body_bytes: u64,
    pub answered: Answered,
    /// From the first byte of the request (or of the read it came in) to its answer.
    pub request_time: Duration,
    /// The connection's socket cookie.
    pub connection: u64,
}

/// Where the log goes.
enum Destination {
    Stdout,
    File {
        file: File,
        /// Its folder, for reopening by name.
        folder: OwnedFd,
        name: OsString,
        shown: String,
    },
}

/// Lines of both paths, counted by path.
#[derive(Default)]
struct Lines {
    bytes: Vec<u8>,
    kernel: u64,
    user: u64,
}

/// What the handles and the writer share, under [`Shared::state`].
#[derive(Default)]
struct State {
    /// Lines not yet taken by the writer.
    waiting: Lines,
    /// Bytes the writer is writing now (they count against [`QUEUE_BYTES`] too).
    writing: usize,
    reopen: bool,
    /// Flushes asked for and done, counted.
    flushes_asked: u64,
    flushes_done: u64,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer before its tick (a full buffer, a reopen, a flush, the end).
    wake: Condvar,
    /// Tells [`AccessLog::flush`] the writer has written.
    written: Condvar,
    /// Tells the kernel loop there is room again.
    room: tokio::sync::Notify,
    /// Lines written, by path.
    kernel_lines: AtomicU64,
    user_lines: AtomicU64,
    /// Lines dropped because the queue was full, or because a write failed.
    dropped_queue: AtomicU64,
    dropped_write: AtomicU64,
}

/// The open access log. Dropping it ends the writer after it wrote everything.
pub struct AccessLog {
    format: Format,
    shared: Arc<Shared>,
}

/// What the log counts, for /metrics.
pub struct Counts {
    pub kernel_lines: u64,
    pub user_lines: u64,
    pub dropped_queue: u64,
    pub dropped_write: u64,
}

impl AccessLog {
    /// Opens `path` (`-`: standard output) for appending and starts the writer.
    pub fn open(path: &Path, format: Format) -> anyhow::Result<AccessLog> {
        let destination = if path == Path::new("-") {
            Destination::Stdout
        } else {
            open_file(path)?
        };
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            destination,
            shared: Arc::clone(&shared),
            failing: false,
        };
        std::thread::Builder::new()
            .name("khttpd-log".into())
            .spawn(move || writer.run())?;
        Ok(AccessLog { format, shared })
    }

    /// Appends the lines of `entries`; never waits (but for the lock, held for a copy).
    pub fn log<'a>(&self, entries: impl IntoIterator<Item = Entry<'a>>) {
        let mut lines = Lines::default();
        for entry in entries {
            self.format(&mut lines, &entry);
        }
        self.append(lines);
    }

    fn format(&self, lines: &mut Lines, entry: &Entry<'_>) {
        match entry.answered {
            Answered::Kernel => lines.kernel += 1,
            Answered::User => lines.user += 1,
        }
        match self.format {
            Format::Combined => combined(&mut lines.bytes, entry),
            Format::Json => json(&mut lines.bytes, entry),
        }
    }

    /// Queues `lines` for the writer, or drops them when the queue is full.
    fn append(&self, lines: Lines) {
        let count = lines.kernel + lines.user;
        if count == 0 {
            return;
        }
        let mut state = self.shared.state.lock().unwrap();
        let writing = state.writing;
        let waiting = &mut state.waiting;
        if waiting.bytes.len() + writing + lines.bytes.len() > QUEUE_BYTES {
            drop(state);
            self.shared
                .dropped_queue
                .fetch_add(count, Ordering::Relaxed);
            return;
        }
        let was_short = waiting.bytes.len() < WRITE_BUFFER;
        waiting.bytes.extend_from_slice(&lines.bytes);
        waiting.kernel += lines.kernel;
        waiting.user += lines.user;
        let full = was_short && waiting.bytes.len() >= WRITE_BUFFER;
        drop(state);
        if full {
            self.shared.wake.notify_one();
        }
    }

    pub fn counts(&self) -> Counts {
        let shared = &self.shared;
        Counts {
            kernel_lines: shared.kernel_lines.load(Ordering::Relaxed),
            user_lines: shared.user_lines.load(Ordering::Relaxed),
            dropped_queue: shared.dropped_queue.load(Ordering::Relaxed),
            dropped_write: shared.dropped_write.load(Ordering::Relaxed),
        }
    }

    /// Reopens the file by its name (SIGUSR1), after the lines already logged.
    pub fn reopen(&self) {
        self.shared.state.lock().unwrap().reopen = true;
        self.shared.wake.notify_one();
    }

    /// Waits (at most 5 s) until every line logged so far is written.
    pub fn flush(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.flushes_asked += 1;
        let asked = state.flushes_asked;
        self.shared.wake.notify_one();
        let _ = self
            .shared
            .written
            .wait_timeout_while(state, Duration::from_secs(5), |state| {
                state.flushes_done < asked
            });
    }

    /// Until shutdown: turns the kernel's records of what it answered into lines, every
    /// [`TICK`]. While the queue is full it stops reading, so the ring fills and the kernel counts
    /// what it cannot record (rather than this loop making lines only to drop them).
    pub async fn kernel_loop(self: Arc<Self>, mut ring: RingBuf<MapData>, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.recv() => return,
            }
            loop {
                if self.queued() > QUEUE_BYTES - KERNEL_HEADROOM {
                    tokio::select! {
                        () = self.shared.room.notified() => continue,
                        () = shutdown.recv() => return,
                    }
                }
                let clock = Clock::now();
                let mut lines = Lines::default();
                let mut read = 0;
                while read < RECORDS_PER_BATCH {
                    let Some(item) = ring.next() else { break };
                    read += 1;
                    if item.len() >= size_of::<AccessRecord>() {
                        // SAFETY: the verdict writes whole records; read unaligned to be safe.
                        let record: AccessRecord =
                            unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                        self.format(&mut lines, &clock.entry(&record));
                    }
                }
                self.append(lines);
                if read < RECORDS_PER_BATCH {
                    break;
                }
            }
        }
    }

    /// Bytes logged and not yet written.
    fn queued(&self) -> usize {
        let state = self.shared.state.lock().unwrap();
        state.waiting.bytes.len() + state.writing
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().closed = true;
        self.shared.wake.notify_one();
    }
}

/// Wall-clock time of the kernel's monotonic timestamps.
struct Clock {
    wall: SystemTime,
    monotonic: Duration,
}

impl Clock {
    fn now() -> Clock {
        let monotonic = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        Clock {
            wall: SystemTime::now(),
            monotonic: Duration::new(monotonic.tv_sec as u64, monotonic.tv_nsec as u32),
        }
    }

    fn entry<'a>(&self, record: &'a AccessRecord) -> Entry<'a> {
        let ago = self
            .monotonic
            .saturating_sub(Duration::from_nanos(record.time_ns));
        let ip = if record.family == libc::AF_INET6 as u32 {
            let bytes: Vec<u8> = record
                .remote_ip
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect();
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(bytes).unwrap_or_default(),
            ))
        } else {
            IpAddr::V4(Ipv4Addr::from(record.remote_ip[0].to_ne_bytes()))
        };
        let len = (record.request.len as usize).min(record.request.bytes.len());
        Entry {
            time: self.wall - ago,
            peer: SocketAddr::new(ip, record.port()),
            head: &record.request.bytes[..len],
            status: record.status as u16,
            body_bytes: u64::from(record.body_bytes),
            answered: Answered::Kernel,
            request_time: Duration::ZERO,
            connection: record.cookie,
        }
    }
}

/// Opens the log file and its folder (to reopen it by name later).
fn open_file(path: &Path) -> anyhow::Result<Destination> {
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("--access-log {shown}: not a file name"))?
        .to_owned();
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let folder = rustix::fs::open(
        folder,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| anyhow::anyhow!("--access-log {shown}: cannot open its folder: {e}"))?;
    let file = open_in(&folder, &name).map_err(|e| anyhow::anyhow!("--access-log {shown}: {e}"))?;
    Ok(Destination::File {
        file,
        folder,
        name,
        shown,
    })
}

fn open_in(folder: &OwnedFd, name: &OsString) -> io::Result<File> {
    let fd = rustix::fs::openat(
        folder,
        name.as_os_str(),
        OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o640),
    )?;
    Ok(File::from(fd))
}

/// The writer thread's state.
struct Writer {
    destination: Destination,
    shared: Arc<Shared>,
    /// The last write failed (said once until one succeeds).
    failing: bool,
}

impl Writer {
    /// Every [`TICK`] (or when woken), writes what is waiting; ends once the log is closed and
    /// everything is written.
    fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let mut spare = Vec::new();
        loop {
            let state = shared.state.lock().unwrap();
            let (mut state, _) = shared
                .wake
                .wait_timeout_while(state, TICK, |state| {
                    state.waiting.bytes.len() < WRITE_BUFFER
                        && !state.reopen
                        && state.flushes_done == state.flushes_asked
                        && !state.closed
                })
                .unwrap();
            // Swapped for the spare buffer, so neither side allocates in the steady state.
            let lines = std::mem::replace(
                &mut state.waiting,
                Lines {
                    bytes: std::mem::take(&mut spare),
                    ..Lines::default()
                },
            );
            state.writing = lines.bytes.len();
            let reopen = std::mem::take(&mut state.reopen);
            let (flushes, closed) = (state.flushes_asked, state.closed);
            drop(state);

            spare = self.write(lines);
            if reopen {
                self.reopen_file();
            }
            let mut state = shared.state.lock().unwrap();
            state.writing = 0;
            state.flushes_done = flushes;
            let done = closed && state.waiting.bytes.is_empty();
            drop(state);
            shared.written.notify_all();
            shared.room.notify_one();
            if done {
                return;
            }
        }
    }

    /// Writes `lines`; returns their buffer, emptied.
    fn write(&mut self, lines: Lines) -> Vec<u8> {
        let mut bytes = lines.bytes;
        if bytes.is_empty() {
            return bytes;
        }
        let written = match &mut self.destination {
            Destination::Stdout => io::stdout().lock().write_all(&bytes),
            Destination::File { file, .. } => file.write_all(&bytes),
        };
        let shared = &self.shared;
        match written {
            Ok(()) => {
                self.failing = false;
                shared
                    .kernel_lines
                    .fetch_add(lines.kernel, Ordering::Relaxed);
                shared.user_lines.fetch_add(lines.user, Ordering::Relaxed);
            }
            Err(e) => {
                shared
                    .dropped_write
                    .fetch_add(lines.kernel + lines.user, Ordering::Relaxed);
                if !self.failing {
                    error!("access log: cannot write ({e}): lines are dropped until it can");
                    self.failing = true;
                }
            }
        }
        bytes.clear();
        bytes
    }

    fn reopen_file(&mut self) {
        let Destination::File {
            file,
            folder,
            name,
            shown,
        } = &mut self.destination
        else {
            return;
        };
        match open_in(folder, name) {
            Ok(reopened) => *file = reopened,
            Err(e) => warn!(
                "access log: cannot reopen {shown} ({e}; its folder must let this user create it): still writing to the file it was"
            ),
        }
    }
}

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
fn combined(out: &mut Vec<u8>, entry: &Entry<'_>) {
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
fn json(out: &mut Vec<u8>, entry: &Entry<'_>) {
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

/// A user-space connection's part in the log: who it is, and when the request being answered
/// began.
pub struct ConnectionLog {
    pub log: Arc<AccessLog>,
    pub peer: SocketAddr,
    /// Its socket cookie.
    pub id: u64,
    pub started: Option<Instant>,
}

impl ConnectionLog {
    /// The entry of a request this connection answered now.
    pub fn entry<'a>(
        &self,
        head: &'a [u8],
        status: u16,
        body_bytes: u64,
        request_time: Duration,
    ) -> Entry<'a> {
        Entry {
            time: SystemTime::now(),
            peer: self.peer,
            head,
            status,
            body_bytes,
            answered: Answered::User,
            request_time,
            connection: self.id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(head: &[u8]) -> Entry<'_> {
        Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_765_366_123),
            peer: "127.0.0.1:40000".parse().unwrap(),
            head,
            status: 200,
            body_bytes: 12,
            answered: Answered::Kernel,
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
