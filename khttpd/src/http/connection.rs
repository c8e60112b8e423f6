//! One user-space connection's life, as a state machine without socket I/O: it says what to do
//! next ([`Action`]) and is told what happened. The [`Session`] inside turns request bytes into
//! response bytes; this machine adds what a connection needs around it — writing those bytes
//! (partly, when the socket is full), sending file bodies, the read deadlines, closing with a FIN
//! and a bounded linger so that a close is never a reset, and, with the fast path, the kernel's
//! books: teaching it answers, waiting for its answers to leave before writing, and handing the
//! connection to it.
//!
//! Two executors in `super::executor` run it — tokio (the work queue, and the answer at accept)
//! and blocking I/O (a thread per connection) — so both send the same bytes, and an
//! optimisation is made once.

use std::{
    os::fd::RawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use log::debug;

use crate::access_log::ConnectionLog;

use super::{
    kernel::{KernelHttp, Parked, Release},
    session::{Next, Session},
    site::FileBody,
    HttpService, Slot,
};
use khttpd_common::http::Answered;

/// Answers in a row the kernel could send before a connection moves into the kernel (`auto`).
const PROMOTE_AFTER: u32 = 32;
/// How long a connection waiting between requests keeps its work item before it waits on the
/// idle list instead (`super::idle`), where it costs its socket and this machine only. A client
/// that asks again within it (every benchmark, every busy client) never pays for parking.
pub const PARK_AFTER: Duration = Duration::from_millis(100);
/// How much later a connection found busy at [`PARK_AFTER`] is checked again (so it parks within
/// about a second of going quiet). Checking every 100 ms instead looked 5% dearer on keep-alive
/// (`bench cost`, wrk -c100, server on its own CPU, four rounds each: 5.75 against 5.45 µs per
/// request without a park timer, inside the rounds' ±8% spread); with this, 5.65 against 5.7.
pub const PARK_RECHECK: Duration = Duration::from_secs(1);
/// How long a closing connection waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes read (and dropped) while lingering.
const LINGER_BYTES: usize = 256 * 1024;

/// How long a connection may stay silent: between requests (`--idle-timeout`), and while a
/// request head is arriving (`--header-timeout`, counted from its first byte, so a client that
/// trickles a byte every few seconds is still cut off).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub idle: Duration,
    pub head: Duration,
}

/// What the executor does next; it then reports back with the method named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Read what the client sends, waiting until [`Connection::deadline`]: then
    /// [`Connection::received`], or [`Connection::deadline_passed`]. The end of the stream (or an
    /// error) ends the connection: the executor drops the socket.
    Read,
    /// Write [`Connection::output`], then [`Connection::wrote`].
    Write,
    /// Send [`Connection::file`] with sendfile(2), then [`Connection::sent_file`].
    SendFile,
    /// Wait until the kernel's answers on the connection are in the send queue:
    /// [`Connection::wait_for_kernel`].
    WaitForKernel,
    /// Offer the idle connection to the kernel: [`Connection::release`].
    Release,
    /// The client is done: close now if nothing more has arrived (closing with unread bytes
    /// would send a reset), else [`Connection::not_quiet`].
    CloseIfQuiet,
    /// Send a FIN (shut down the write side); the machine then reads and drops what the client
    /// still sends until it closes, for a bounded time.
    Shutdown,
    /// Close the connection now.
    Close,
}

/// When a read must have returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// When the connection has received nothing for this long (counted by the socket, so bytes
    /// the kernel path answered count too). Executors arm a timer once and check the socket's
    /// silence when it fires, so a request costs no timer.
    Silence(Duration),
    /// At this instant.
    At(Instant),
}

enum Phase {
    Serving,
    /// The last answer is written and the client may still send: a FIN next.
    Closing,
    /// After our FIN: reading and dropping until the client closes.
    Draining {
        until: Instant,
        dropped: usize,
    },
    Done,
}

pub struct Connection {
    session: Session,
    phase: Phase,
    /// Answers not written yet start at `out[out_sent..]`.
    out: Vec<u8>,
    out_sent: usize,
    /// Whether the kernel's order and announcement were seen to for the answers in `out`.
    out_checked: bool,
    /// The file body being sent, after the answers in `out` before it.
    file: Option<FileBody>,
    /// What the last answer asked for.
    next: Next,
    /// Whether the connection may be handed to the kernel once idle.
    reusable: bool,
    timeouts: Timeouts,
    /// When the request head being read must be complete.
    head_deadline: Option<Instant>,
    /// Bytes written on the connection (counted from its first byte, kernel answers aside).
    written: u64,
    /// Reads that completed at least one request (saturating): see [`Connection::is_fresh`].
    answered_reads: u8,
    /// Its place under `--max-connections`.
    slot: Option<Slot>,
    /// With the fast path: the kernel's books on this connection (boxed: a connection without
    /// one should not carry its size).
    kernel: Option<Box<KernelBooks>>,
    /// With `--access-log`.
    log: Option<Box<ConnectionLog>>,
    /// Its service's count of user-space answers.
    answers: Option<Arc<crate::metrics::Shards>>,
}

impl Connection {
    /// A connection served with `session` (no fast path).
    pub fn new(session: Session, timeouts: Timeouts) -> Connection {
        Connection {
            session,
            phase: Phase::Serving,
            out: Vec::new(),
            out_sent: 0,
            out_checked: false,
            file: None,
            next: Next::Read,
            reusable: false,
            timeouts,
            head_deadline: None,
            written: 0,
            answered_reads: 0,
            slot: None,
            kernel: None,
            log: None,
            answers: None,
        }
    }

    /// A connection of `service`, holding its `slot`; `link` when it comes from the kernel path,
    /// after user space wrote `written` bytes on it before; `log` with `--access-log`.
    pub(super) fn of_service(
        service: &Arc<HttpService>,
        slot: Slot,
        link: Option<Link>,
        written: u64,
        log: Option<Box<ConnectionLog>>,
    ) -> Connection {
        let session = if service.kernel.is_some() {
            Session::learning()
        } else {
            Session::new()
        };
        let session = match &service.site {
            Some(site) => session.with_site(Arc::clone(site)),
            None => session,
        };
        let mut connection = Connection::new(session, service.timeouts).accounted(service, log);
        connection.slot = Some(slot);
        connection.written = written;
        connection.kernel = service.kernel.is_some().then(|| {
            Box::new(KernelBooks {
                service: Arc::clone(service),
                link,
                generation: 0,
                answerable_streak: 0,
                sent_file: false,
            })
        });
        connection
    }

    /// A connection turned away: `503` (counted and logged as an answer), then the close.
    pub(super) fn rejecting(service: &HttpService, log: Option<Box<ConnectionLog>>) -> Connection {
        let mut connection =
            Connection::new(Session::new(), service.timeouts).accounted(service, log);
        connection.session.turn_away(&mut connection.out);
        connection.record_answers();
        connection.next = Next::Close;
        connection
    }

    /// Counts its answers in `service`'s total and, with `log`, writes them to the access log.
    fn accounted(mut self, service: &HttpService, log: Option<Box<ConnectionLog>>) -> Connection {
        if log.is_some() {
            self.session = std::mem::take(&mut self.session).with_log();
        }
        self.log = log;
        self.answers = Some(Arc::clone(&service.user_responses));
        self
    }

    pub fn next_action(&mut self) -> Action {
        match self.phase {
            Phase::Serving => {}
            Phase::Closing => {
                self.phase = Phase::Draining {
                    until: Instant::now() + LINGER,
                    dropped: 0,
                };
                return Action::Shutdown;
            }
            Phase::Draining { .. } => return Action::Read,
            Phase::Done => return Action::Close,
        }
        if self.out_sent < self.out.len() {
            if !self.out_checked {
                if let Some(kernel) = &mut self.kernel {
                    if kernel.must_wait() {
                        return Action::WaitForKernel;
                    }
                    if self.reusable && self.next == Next::Read && self.session.is_idle() {
                        // Tells the kernel now, so a client that sends its next request the
                        // moment it has this answer finds the kernel ready (it answers only once
                        // these bytes are in the send queue).
                        let pending = (self.out.len() - self.out_sent) as u64;
                        kernel.publish(self.written + pending);
                    }
                }
                self.out_checked = true;
            }
            return Action::Write;
        }
        if self.file.is_none() {
            self.file = self.session.take_file();
        }
        if self.file.is_some() {
            return Action::SendFile;
        }
        if self.next == Next::Close {
            if self.session.client_is_done() {
                return Action::CloseIfQuiet;
            }
            self.phase = Phase::Closing;
            return self.next_action();
        }
        if self.reusable && self.session.is_idle() && self.kernel.is_some() {
            // Offered once per answer: if the kernel declines, the connection reads on.
            self.reusable = false;
            return Action::Release;
        }
        Action::Read
    }

    /// When the read asked for must have returned.
    pub fn deadline(&mut self) -> Deadline {
        match self.phase {
            Phase::Draining { until, .. } => Deadline::At(until),
            _ if self.session.reading_head() => Deadline::At(
                *self
                    .head_deadline
                    .get_or_insert_with(|| Instant::now() + self.timeouts.head),
            ),
            _ => {
                self.head_deadline = None;
                Deadline::Silence(self.timeouts.idle)
            }
        }
    }

    /// Whether the connection, while it waits between requests ([`Deadline::Silence`]), may wait
    /// on the idle list after [`PARK_AFTER`]: not while its socket is in the sockhash, where the
    /// kernel's answers wake the socket's readers and would wake it for nothing.
    pub fn parkable(&self) -> bool {
        self.kernel
            .as_ref()
            .is_none_or(|kernel| kernel.link.is_none())
    }

    /// Whether at most one read so far completed a request. Such a connection, when it waits for
    /// its next request, waits on the idle list at once: most clients this new ask once or not
    /// at all (one request, a preconnect), and one that asks again gets a work item then.
    pub fn is_fresh(&self) -> bool {
        self.answered_reads <= 1
    }

    /// How long a write may wait for the client to take a byte: the idle timeout, so a client
    /// that stops reading is given up like one that stops sending (else it would hold its
    /// connection, and the answer it owes, until shutdown).
    pub fn send_timeout(&self) -> Duration {
        self.timeouts.idle
    }

    /// A write waited [`Connection::send_timeout`] and the client took nothing: the connection
    /// ends (closing sends what the kernel still holds, then a FIN).
    pub fn send_timed_out(&mut self) {
        self.phase = Phase::Done;
    }

    /// The [`Connection::deadline`] passed without a read returning.
    pub fn deadline_passed(&mut self) {
        match self.phase {
            Phase::Serving if self.session.reading_head() => {
                self.session.head_timed_out(&mut self.out);
                self.record_answers();
                self.next = Next::Close;
                self.out_checked = false;
            }
            _ => self.phase = Phase::Done,
        }
    }

    /// Bytes the client sent.
    pub fn received(&mut self, data: &[u8]) {
        if let Phase::Draining { dropped, .. } = &mut self.phase {
            *dropped += data.len();
            if *dropped > LINGER_BYTES {
                self.phase = Phase::Done;
            }
            return;
        }
        if let Some(kernel) = &mut self.kernel {
            kernel.received(data.len());
        }
        if let Some(log) = &mut self.log {
            if self.session.is_idle() {
                log.started = Some(Instant::now());
            }
        }
        let before = self.out.len();
        let next = self.session.receive(data, &mut self.out);
        if self.out.len() > before {
            self.answered_reads = self.answered_reads.saturating_add(1);
        }
        self.record_answers();
        self.answers_ready(next);
    }

    /// Counts what the session answered and hands it to the access log.
    fn record_answers(&mut self) {
        if let Some(answers) = &self.answers {
            match self.session.take_answered() {
                0 => {}
                n => answers.add(u64::from(n)),
            }
        }
        let Some(log) = &mut self.log else {
            return;
        };
        if self.session.logged().next().is_none() {
            return;
        }
        let took = log
            .started
            .map_or(Duration::ZERO, |started| started.elapsed());
        let now = std::time::SystemTime::now();
        log.log.log(
            self.session
                .logged()
                .map(|logged| log.entry(logged.head, logged.status, logged.body_bytes, took, now)),
        );
        self.session.clear_logged();
        if self.session.is_idle() {
            log.started = None;
        }
    }

    /// What to write.
    pub fn output(&self) -> &[u8] {
        &self.out[self.out_sent..]
    }

    /// `n` bytes of [`Connection::output`] were written.
    pub fn wrote(&mut self, n: usize) {
        self.out_sent += n;
        self.written += n as u64;
        if self.out_sent == self.out.len() {
            // An idle connection holds no buffer (the next answer allocates one).
            self.out = Vec::new();
            self.out_sent = 0;
        }
    }

    /// The file body to send (while the action is [`Action::SendFile`]).
    pub fn file(&mut self) -> &mut FileBody {
        self.file.as_mut().expect("a file is being sent")
    }

    /// `n` bytes of the file were sent (the executor advanced [`Connection::file`]).
    pub fn sent_file(&mut self, n: usize) {
        self.written += n as u64;
        if self.file.as_ref().is_some_and(|file| file.len == 0) {
            self.file = None;
            if let Some(kernel) = &mut self.kernel {
                kernel.sent_file = true;
            }
            if self.next == Next::Read {
                // Answer what was pipelined behind the file.
                let next = self.session.receive(&[], &mut self.out);
                self.record_answers();
                self.answers_ready(next);
            }
        }
    }

    /// The connection's cookie while its socket is in the sockhash (user space serving it for
    /// now), for the executor's check before it closes the socket (`crate::socket_memory`).
    pub fn sockhash_cookie(&self) -> Option<u64> {
        Some(self.kernel.as_ref()?.link.as_ref()?.cookie)
    }

    /// After [`Action::CloseIfQuiet`]: bytes arrived after all; close with a linger.
    pub fn not_quiet(&mut self) {
        self.phase = Phase::Closing;
    }

    /// [`Action::WaitForKernel`]: waits (bounded) until the kernel's answers on the connection
    /// are in the send queue of `fd`. The one wait that is not on the socket's readiness: it
    /// polls the send queue (see `sockmap::wait_until_queued`). False: give up the connection.
    pub async fn wait_for_kernel(&mut self, fd: RawFd) -> bool {
        let Some(kernel) = &mut self.kernel else {
            return true;
        };
        let ordered = kernel.wait_for_kernel(fd, self.written).await;
        if !ordered {
            self.phase = Phase::Done;
        }
        ordered
    }

    /// [`Action::Release`]: hands the connection (idle, owing nothing) to the kernel; returns the
    /// socket if user space keeps serving it.
    pub fn release(&mut self, stream: std::net::TcpStream) -> Option<std::net::TcpStream> {
        let Some(kernel) = &mut self.kernel else {
            return Some(stream);
        };
        let Some(slot) = self.slot.take() else {
            return Some(stream);
        };
        match kernel.release(stream, slot, self.written) {
            Ok(()) => {
                self.phase = Phase::Done;
                None
            }
            Err(parked) => {
                self.slot = Some(parked.slot);
                Some(parked.stream)
            }
        }
    }

    /// The session answered: `out` holds the answers, `next` says what follows them.
    fn answers_ready(&mut self, next: Next) {
        self.next = next;
        self.out_checked = false;
        self.reusable = match &mut self.kernel {
            Some(kernel) => kernel.learn(&mut self.session, &self.out),
            None => false,
        };
    }
}

/// A connection in the HTTP sockhash that user space serves for now.
pub(super) struct Link {
    pub cookie: u64,
    /// What the kernel was last told (see [`KernelBooks::publish`]).
    pub published: Option<Answered>,
    /// Bytes user space read since the socket entered the sockhash (all of them passed by the
    /// kernel).
    pub read_bytes: u64,
    /// Whether the kernel's responses are known to be in the send queue.
    pub ordered: bool,
}

/// With the fast path: teaches the kernel what user space answers and, when the connection came
/// from the kernel path, keeps the kernel's books on it (and deletes its kernel state when it
/// ends).
struct KernelBooks {
    service: Arc<HttpService>,
    link: Option<Link>,
    /// The kernel table's generation when the answers being learned were computed.
    generation: u64,
    /// Answers in a row the kernel could have sent itself.
    answerable_streak: u32,
    /// Whether a file body went out with sendfile on this connection.
    sent_file: bool,
}

/// The kernel path of a service that keeps books (only services with one do).
fn kernel_of(service: &HttpService) -> &KernelHttp {
    service
        .kernel
        .as_ref()
        .expect("books are kept with a kernel path")
}

impl KernelBooks {
    /// Called with each read, before the session answers what was read.
    fn received(&mut self, n: usize) {
        if let Some(link) = &mut self.link {
            link.read_bytes += n as u64;
        }
        self.generation = kernel_of(&self.service).generation();
    }

    /// Teaches the kernel what the session just answered (`out`). Returns whether handing the
    /// connection to the kernel is worth it: the kernel can answer the last request itself and,
    /// for a connection not in the sockhash yet, it has asked only for such answers for a while
    /// and never for a file sent with sendfile. Large sends on a socket in the sockhash cost much
    /// more CPU (they pass through the sk_msg path: measured 2.4k vs 3.7k 1 MiB answers/s with
    /// 20 connections), and a socket cannot leave the sockhash safely while it lives.
    ///
    /// A client that pipelines (several answers from one read) stays in user space while it does:
    /// the kernel passes a segment with several requests to user space after its verdict has run,
    /// and that costs more than user space answering alone (`bench cost`, `h2load -m 10`: 4.4 µs
    /// per request for `auto` against 2.4 for `off` before this rule).
    /// Nor is it taught what it asks then (a connection that sends those requests one at a time
    /// will teach them): looking each one up in the table costs a pipelining client more than the
    /// kernel could save it.
    fn learn(&mut self, session: &mut Session, out: &[u8]) -> bool {
        let learned = session.take_learned();
        if learned.len() > 1 {
            self.answerable_streak = 0;
            return false;
        }
        let answerable = kernel_of(&self.service).learn(&learned, out, self.generation);
        self.answerable_streak = if answerable {
            self.answerable_streak + 1
        } else {
            0
        };
        answerable
            && (self.link.is_some() || (!self.sent_file && self.answerable_streak >= PROMOTE_AFTER))
    }

    /// Whether the kernel's answers may still be ahead of what user space writes next.
    fn must_wait(&self) -> bool {
        self.link.as_ref().is_some_and(|link| !link.ordered)
    }

    async fn wait_for_kernel(&mut self, fd: RawFd, written: u64) -> bool {
        let KernelBooks { service, link, .. } = self;
        let Some(link) = link else {
            return true;
        };
        if !link.ordered {
            link.ordered = kernel_of(service)
                .wait_for_kernel(link.cookie, fd, written)
                .await;
        }
        link.ordered
    }

    /// Tells the kernel what user space read and wrote on a linked connection (once per change).
    /// `None` if the connection is not linked or the kernel could not be told.
    fn publish(&mut self, written: u64) -> Option<Answered> {
        let KernelBooks { service, link, .. } = self;
        let link = link.as_mut()?;
        let answered = Answered {
            read_bytes: link.read_bytes,
            written_bytes: written,
        };
        if link.published != Some(answered) {
            if let Err(e) = kernel_of(service).publish(link.cookie, answered) {
                debug!(
                    "http: cannot publish connection {}'s state ({e})",
                    link.cookie
                );
                return None;
            }
            link.published = Some(answered);
        }
        Some(answered)
    }

    /// Hands the connection to the kernel: `Ok` if it took it, else the socket and slot back.
    fn release(
        &mut self,
        stream: std::net::TcpStream,
        slot: Slot,
        written: u64,
    ) -> Result<(), Parked> {
        let Some(cookie) = self.link.as_ref().map(|link| link.cookie) else {
            // Not in the sockhash yet: install it. Every byte it gets from now on passes the
            // verdict, so the kernel's count of passed bytes and ours both start at zero.
            let parked = Parked {
                stream,
                answered: Answered {
                    read_bytes: 0,
                    written_bytes: written,
                },
                slot,
            };
            return kernel_of(&self.service).sockmap().install(parked);
        };
        let Some(answered) = self.publish(written) else {
            return Err(Parked {
                stream,
                answered: Answered::default(),
                slot,
            });
        };
        let parked = Parked {
            stream,
            answered,
            slot,
        };
        match kernel_of(&self.service).release(cookie, parked) {
            Release::Resumed(parked) => {
                if let Some(link) = &mut self.link {
                    link.ordered = false;
                }
                Err(parked)
            }
            Release::Parked | Release::Gone => {
                // The kernel path owns its state again.
                self.link = None;
                Ok(())
            }
        }
    }
}

impl Drop for KernelBooks {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            kernel_of(&self.service).forget(link.cookie);
        }
    }
}
