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
//!
//! Files: this one (the handle, the kernel's records, a connection's part), `writer.rs` (the
//! writer thread and the file), `format.rs` (the two line formats).

mod format;
mod writer;

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use khttpd_common::http::AccessRecord;

use crate::shutdown::Shutdown;
use writer::{open_file, Destination, Writer};

/// Bytes of lines not yet written; past it lines are dropped (and the kernel's records are left
/// in their ring, which then drops them itself): about 100 ms of the kernel path's fastest
/// answering, a stall a disk may take.
const QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// Written out at once when this many bytes are waiting.
const WRITE_BUFFER: usize = 256 * 1024;
/// How often the writer writes what is waiting, and the kernel's ring is read: the ring
/// (`http::ACCESS_BYTES`) holds about 200 ms of the kernel path's fastest answering.
const TICK: Duration = Duration::from_millis(20);
/// Room the queue must have for the kernel's records to be read: more than a batch of lines
/// (at most about 600 bytes each), so a batch read is a batch queued.
const KERNEL_HEADROOM: usize = 2 * 1024 * 1024;
/// Records read from the kernel's ring per batch of lines.
const RECORDS_PER_BATCH: usize = 1024;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
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
pub enum AnsweredBy {
    Kernel,
    User,
}

impl AnsweredBy {
    fn label(self) -> &'static str {
        match self {
            AnsweredBy::Kernel => "kernel",
            AnsweredBy::User => "user",
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
    pub answered: AnsweredBy,
    /// From the first byte of the request (or of the read it came in) to its answer.
    pub request_time: Duration,
    /// The connection's socket cookie.
    pub connection: u64,
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
        // Formatted into a buffer each thread keeps, then copied under the lock.
        thread_local! {
            static LINES: std::cell::RefCell<Lines> = Default::default();
        }
        LINES.with_borrow_mut(|lines| {
            for entry in entries {
                self.format(lines, &entry);
            }
            self.append(lines);
            lines.bytes.clear();
            (lines.kernel, lines.user) = (0, 0);
        });
    }

    fn format(&self, lines: &mut Lines, entry: &Entry<'_>) {
        match entry.answered {
            AnsweredBy::Kernel => lines.kernel += 1,
            AnsweredBy::User => lines.user += 1,
        }
        match self.format {
            Format::Combined => format::combined(&mut lines.bytes, entry),
            Format::Json => format::json(&mut lines.bytes, entry),
        }
    }

    /// Queues `lines` for the writer, or drops them when the queue is full.
    fn append(&self, lines: &Lines) {
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
        'serving: loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.recv() => break 'serving,
            }
            loop {
                if self.queued() > QUEUE_BYTES - KERNEL_HEADROOM {
                    tokio::select! {
                        () = self.shared.room.notified() => continue,
                        () = shutdown.recv() => break 'serving,
                    }
                }
                if self.read_records(&mut ring) < RECORDS_PER_BATCH {
                    break;
                }
            }
        }
        // What the kernel answered before the shutdown (which comes once every connection is
        // closed), as far as the queue takes it.
        while self.read_records(&mut ring) == RECORDS_PER_BATCH {}
    }

    /// Turns up to [`RECORDS_PER_BATCH`] of the ring's records into lines; returns how many.
    fn read_records(&self, ring: &mut RingBuf<MapData>) -> usize {
        let clock = Clock::now();
        let mut lines = Lines::default();
        let mut read = 0;
        while read < RECORDS_PER_BATCH {
            let Some(item) = ring.next() else { break };
            read += 1;
            // The verdict sends a record up to the end of its request's bytes.
            let len = item.len().min(size_of::<AccessRecord>());
            if len >= AccessRecord::sent_len(0) {
                // SAFETY: plain data; a zeroed record is a valid one, and `len` bytes of the item
                // are copied over it.
                let record = unsafe {
                    let mut record: AccessRecord = std::mem::zeroed();
                    std::ptr::copy_nonoverlapping(
                        item.as_ptr(),
                        (&raw mut record).cast::<u8>(),
                        len,
                    );
                    record
                };
                self.format(&mut lines, &clock.entry(&record));
            }
        }
        self.append(&lines);
        read
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
        let len = (record.request.len as usize).min(record.request.bytes.len());
        Entry {
            time: self.wall - ago,
            peer: record.remote(),
            head: &record.request.bytes[..len],
            status: record.status as u16,
            body_bytes: u64::from(record.body_bytes),
            answered: AnsweredBy::Kernel,
            request_time: Duration::ZERO,
            connection: record.cookie,
        }
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
        time: SystemTime,
    ) -> Entry<'a> {
        Entry {
            time,
            peer: self.peer,
            head,
            status,
            body_bytes,
            answered: AnsweredBy::User,
            request_time,
            connection: self.id,
        }
    }
}
