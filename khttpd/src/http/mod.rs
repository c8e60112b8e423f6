//! The HTTP/1.x service on `--port`. With the fast path on, a connection starts in the kernel
//! ([`kernel`]), which answers the requests user space has taught it and hands the connection back
//! here at the first byte it does not answer; without it, every connection is served here.
//!
//! Two dispatch modes serve a connection with the same [`session::Session`], so they send the
//! same bytes:
//! - `cmwq` (default): one work item per connection on the unbound work queue (khttpd after its
//!   move to CMWQ);
//! - `thread`: one OS thread per connection with blocking I/O (the original kthread khttpd).
//!
//! Closing is always a FIN after the last response is written, followed by reading until the
//! client closes (bounded): closing with unread bytes would make the kernel send a reset instead.

pub mod kernel;
pub mod response;
pub mod session;
pub mod site;

use std::{
    io::{self, Read as _, Write as _},
    os::fd::{AsRawFd, RawFd},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use log::{debug, warn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    fd::{into_tokio, silent_for},
    shutdown::{self, Shutdown},
    workqueue::WorkQueue,
};
use kernel::{KernelHttp, Parked, Release};
use khttpd_common::http::Answered;
use session::{Next, Session};
use site::{FileBody, Site};

/// Answers in a row the kernel could send before a connection moves into the kernel (`auto`).
const PROMOTE_AFTER: u32 = 32;
/// Bytes read per system call.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes read (and dropped) while lingering.
const LINGER_BYTES: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dispatch {
    /// One work item per connection on the unbound work queue.
    Cmwq,
    /// One OS thread per connection, blocking I/O.
    Thread,
}

impl Dispatch {
    pub fn as_str(self) -> &'static str {
        match self {
            Dispatch::Cmwq => "cmwq",
            Dispatch::Thread => "thread",
        }
    }
}

/// How long a connection may stay silent: between requests (`--idle-timeout`), and while a
/// request head is arriving (`--header-timeout`, counted from its first byte, so a client that
/// trickles a byte every few seconds is still cut off).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub idle: Duration,
    pub head: Duration,
}

/// When the next read on a connection is due.
#[derive(Default)]
struct ReadClock {
    head_started: Option<Instant>,
}

impl ReadClock {
    /// The deadline for the next read, and whether it is the head timeout.
    fn deadline(&mut self, session: &Session, timeouts: Timeouts) -> (Instant, bool) {
        if session.reading_head() {
            let started = *self.head_started.get_or_insert_with(Instant::now);
            (started + timeouts.head, true)
        } else {
            self.head_started = None;
            (Instant::now() + timeouts.idle, false)
        }
    }
}

/// How the service runs (from the command line; see the fields of [`HttpService`]).
pub struct Config {
    pub dispatch: Dispatch,
    pub kernel_first: bool,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    pub site: Option<Arc<Site>>,
}

pub struct HttpService {
    pub queue: Arc<WorkQueue>,
    pub dispatch: Dispatch,
    pub kernel: Option<KernelHttp>,
    /// `--fast-path on`: connections start in the kernel. Otherwise (auto) they start in user
    /// space and move to the kernel after a run of answers it could send ([`PROMOTE_AFTER`]):
    /// a connection that closes after one request (htstress) never pays for the kernel path,
    /// which cannot close it (see the README's measurements).
    kernel_first: bool,
    pub timeouts: Timeouts,
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--root`.
    pub site: Option<Arc<Site>>,
    /// Connections open now (user space and kernel).
    pub open: Arc<AtomicUsize>,
    /// Connections turned away with 503 because `max_connections` were open.
    pub rejected: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections the kernel handed to user space.
    pub handoffs: AtomicU64,
    notify_shutdown: shutdown::Notify,
    /// For connection threads that wait on the kernel path.
    runtime: tokio::runtime::Handle,
}

impl HttpService {
    pub fn new(
        queue: Arc<WorkQueue>,
        kernel: Option<KernelHttp>,
        config: Config,
        notify_shutdown: shutdown::Notify,
    ) -> Arc<Self> {
        Arc::new(HttpService {
            queue,
            dispatch: config.dispatch,
            kernel,
            kernel_first: config.kernel_first,
            timeouts: config.timeouts,
            max_connections: config.max_connections,
            site: config.site,
            open: Arc::default(),
            rejected: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            handoffs: AtomicU64::new(0),
            notify_shutdown,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Serves one accepted connection, or turns it away when `max_connections` are open.
    pub fn dispatch(self: &Arc<Self>, stream: std::net::TcpStream) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = self.take_slot() else {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(reject(stream));
            return;
        };
        let (stream, slot) = match &self.kernel {
            Some(kernel) if self.kernel_first => {
                no_delay(&stream);
                let parked = Parked {
                    stream,
                    answered: Answered::default(),
                    slot,
                };
                match kernel.install(parked) {
                    Ok(()) => return,
                    Err(parked) => (parked.stream, parked.slot),
                }
            }
            _ => (stream, slot),
        };
        self.serve_in_user_space(stream, slot, None, 0);
    }

    fn take_slot(&self) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(Arc::clone(&self.open)))
    }

    /// `written`: bytes user space wrote on the connection before.
    fn serve_in_user_space(
        self: &Arc<Self>,
        stream: std::net::TcpStream,
        slot: Slot,
        link: Option<Link>,
        written: u64,
    ) {
        let connection = UserConnection {
            service: Arc::clone(self),
            link,
            written,
            slot: Some(slot),
            generation: 0,
            answerable_streak: 0,
            sent_file: false,
        };
        match self.dispatch {
            Dispatch::Cmwq => {
                let mut connection = connection;
                let mut exchange = Exchange::new(&connection);
                // A new client usually has its request queued by the time it is accepted
                // (htstress writes right after connect): answer it here, before anything is
                // registered with epoll or queued. Only a connection that has to wait becomes a
                // work item.
                if connection.link.is_none() {
                    let mut buf = [0u8; READ_CHUNK];
                    match answer_at_once(&stream, &mut connection, &mut exchange, &mut buf) {
                        Ok(true) | Err(_) => return,
                        Ok(false) => {}
                    }
                }
                no_delay(&stream);
                let shutdown = Shutdown::new(&self.notify_shutdown);
                if self
                    .queue
                    .queue_work(serve_async(stream, connection, exchange, shutdown))
                    .is_err()
                {
                    debug!("http: shutting down, connection dropped");
                }
            }
            Dispatch::Thread => {
                let spawned = std::thread::Builder::new()
                    .name("khttpd-conn".into())
                    .spawn(move || serve_blocking(stream, connection));
                if let Err(e) = spawned {
                    debug!("http: cannot start a connection thread: {e}");
                }
            }
        }
    }

    /// Serves in user space the connections the kernel hands over, until shutdown.
    pub async fn handoff_loop(self: Arc<Self>, shutdown: Shutdown) {
        let Some(kernel) = &self.kernel else { return };
        kernel
            .serve_handoffs(shutdown, |cookie, parked| {
                self.handoffs.fetch_add(1, Ordering::Relaxed);
                let link = Link {
                    cookie,
                    published: Some(parked.answered),
                    read_bytes: parked.answered.read_bytes,
                    ordered: false,
                };
                let written = parked.answered.written_bytes;
                self.serve_in_user_space(parked.stream, parked.slot, Some(link), written);
            })
            .await;
    }

    /// Keeps the kernel's `Date` current: refreshed just after each second starts.
    pub async fn date_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        let Some(kernel) = &self.kernel else { return };
        loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let next_second =
                Duration::from_secs(1) - Duration::from_nanos(now.subsec_nanos().into());
            tokio::select! {
                () = tokio::time::sleep(next_second + Duration::from_millis(1)) => {}
                () = shutdown.recv() => return,
            }
            if let Err(e) = kernel.refresh_date() {
                warn!("http: cannot refresh the kernel's Date ({e}): user space answers everything until it can");
            }
        }
    }

    pub async fn stop(&self) {
        if let Some(kernel) = &self.kernel {
            kernel.stop();
        }
        self.queue.destroy().await;
    }
}

/// One of `--max-connections`, held by whoever holds the connection (a work item, a thread or
/// the kernel path's watcher) and given back when it is dropped with the connection.
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Turns a connection away: `503`, FIN, and reading what the client still sends (bounded), so
/// the close is not a reset.
async fn reject(stream: std::net::TcpStream) {
    let Ok(mut stream) = into_tokio(stream) else {
        return;
    };
    let mut out = Vec::new();
    response::write(&mut out, response::Status::ServiceUnavailable, false, false);
    if stream.write_all(&out).await.is_err() {
        return;
    }
    close_gracefully(stream, &mut [0u8; 1024]).await;
}

/// FIN, then reads and drops what the client still sends until it closes (bounded), so the
/// close is never a reset.
async fn close_gracefully(mut stream: tokio::net::TcpStream, buf: &mut [u8]) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut dropped = 0;
        while let Ok(n @ 1..) = stream.read(buf).await {
            dropped += n;
            if dropped > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// A connection in the HTTP sockhash that user space serves for now.
struct Link {
    cookie: u64,
    /// What the kernel was last told (see [`UserConnection::publish`]).
    published: Option<Answered>,
    /// Bytes user space read since the socket entered the sockhash (all of them passed by the
    /// kernel).
    read_bytes: u64,
    /// Whether the kernel's responses are known to be in the send queue.
    ordered: bool,
}

/// A connection served in user space: teaches the kernel what it answers and, when it came from
/// the kernel path, keeps the kernel's books on it (and deletes its kernel state when it ends).
struct UserConnection {
    service: Arc<HttpService>,
    link: Option<Link>,
    /// Bytes user space wrote on the connection.
    written: u64,
    /// Its place under `--max-connections` (handed on when the kernel takes the connection).
    slot: Option<Slot>,
    /// The kernel table's generation when the answers being learned were computed.
    generation: u64,
    /// Answers in a row the kernel could have sent itself.
    answerable_streak: u32,
    /// Whether a file body went out with sendfile on this connection.
    sent_file: bool,
}

impl UserConnection {
    fn session(&self) -> Session {
        let session = if self.service.kernel.is_some() {
            Session::learning()
        } else {
            Session::new()
        };
        match &self.service.site {
            Some(site) => session.with_site(Arc::clone(site)),
            None => session,
        }
    }

    /// Called with each read, before the session answers what was read.
    fn received(&mut self, n: usize) {
        if let Some(link) = &mut self.link {
            link.read_bytes += n as u64;
        }
        if let Some(kernel) = &self.service.kernel {
            self.generation = kernel.generation();
        }
    }

    fn wrote(&mut self, n: usize) {
        self.written += n as u64;
    }

    /// Teaches the kernel what the session just answered. Returns whether handing the connection
    /// to the kernel is worth it: the kernel can answer the last request itself and, for a
    /// connection not in the sockhash yet, it has asked only for such answers for a while and
    /// never for a file sent with sendfile. Large sends on a socket in the sockhash cost much more
    /// CPU (they pass through the sk_msg path: measured 2.4k vs 3.7k 1 MiB answers/s with 20
    /// connections), and a socket cannot leave the sockhash safely while it lives.
    fn learn(&mut self, session: &mut Session, out: &[u8]) -> bool {
        let Some(kernel) = &self.service.kernel else {
            return false;
        };
        let answerable = kernel.learn(&session.take_learned(), out, self.generation);
        self.answerable_streak = if answerable {
            self.answerable_streak + 1
        } else {
            0
        };
        answerable
            && (self.link.is_some() || (!self.sent_file && self.answerable_streak >= PROMOTE_AFTER))
    }

    /// Before writing: waits until the kernel's responses on the connection are queued.
    async fn wait_for_kernel(&mut self, fd: RawFd) -> bool {
        let (Some(kernel), Some(link)) = (&self.service.kernel, &mut self.link) else {
            return true;
        };
        if !link.ordered {
            link.ordered = kernel.wait_for_kernel(link.cookie, fd, self.written).await;
        }
        link.ordered
    }

    /// Before the write that answers the last request read, when the connection goes back to the
    /// kernel afterwards: tells the kernel now, so a client that sends its next request the moment
    /// it has this answer finds the kernel ready. The kernel answers only once these `pending`
    /// bytes are in the send queue.
    fn announce(&mut self, pending: usize) {
        self.publish(self.written + pending as u64);
    }

    /// Tells the kernel what user space read and wrote on a linked connection (once per change).
    /// `None` if the connection is not linked or the kernel could not be told.
    fn publish(&mut self, written: u64) -> Option<Answered> {
        let (Some(kernel), Some(link)) = (&self.service.kernel, &mut self.link) else {
            return None;
        };
        let answered = Answered {
            read_bytes: link.read_bytes,
            written_bytes: written,
        };
        if link.published != Some(answered) {
            if let Err(e) = kernel.publish(link.cookie, answered) {
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

    /// Hands the connection (idle, owing nothing) to the kernel; returns the socket if user space
    /// keeps serving it.
    fn release(&mut self, stream: std::net::TcpStream) -> Option<std::net::TcpStream> {
        let service = Arc::clone(&self.service);
        let Some(kernel) = &service.kernel else {
            return Some(stream);
        };
        let Some(slot) = self.slot.take() else {
            return Some(stream);
        };
        let Some(link) = &self.link else {
            // Not in the sockhash yet: install it. Every byte it gets from now on passes the
            // verdict, so the kernel's count of passed bytes and ours both start at zero.
            let parked = Parked {
                stream,
                answered: Answered {
                    read_bytes: 0,
                    written_bytes: self.written,
                },
                slot,
            };
            return match kernel.install(parked) {
                Ok(()) => None,
                Err(parked) => {
                    self.slot = Some(parked.slot);
                    Some(parked.stream)
                }
            };
        };
        let cookie = link.cookie;
        let Some(answered) = self.publish(self.written) else {
            self.slot = Some(slot);
            return Some(stream);
        };
        let parked = Parked {
            stream,
            answered,
            slot,
        };
        match kernel.release(cookie, parked) {
            Release::Resumed(parked) => {
                if let Some(link) = &mut self.link {
                    link.ordered = false;
                }
                self.slot = Some(parked.slot);
                Some(parked.stream)
            }
            Release::Parked | Release::Gone => {
                // The kernel path owns its state again.
                self.link = None;
                None
            }
        }
    }
}

impl Drop for UserConnection {
    fn drop(&mut self) {
        if let (Some(kernel), Some(link)) = (&self.service.kernel, &self.link) {
            kernel.forget(link.cookie);
        }
    }
}

/// The `cmwq` work item.
async fn serve_async(
    stream: std::net::TcpStream,
    mut connection: UserConnection,
    exchange: Exchange,
    mut shutdown: Shutdown,
) {
    let Exchange {
        mut session,
        mut out,
        mut next,
        mut reusable,
    } = exchange;
    let mut clock = ReadClock::default();
    let Ok(mut stream) = into_tokio(stream) else {
        return;
    };
    'serve: loop {
        if !out.is_empty() {
            if !connection.wait_for_kernel(stream.as_raw_fd()).await {
                return;
            }
            if reusable && next == Next::Read && session.is_idle() {
                connection.announce(out.len());
            }
            if stream.write_all(&out).await.is_err() {
                return;
            }
            connection.wrote(out.len());
            out.clear();
            // An idle connection keeps no large buffer (see `READ_BUFFER`).
            out.shrink_to(KEPT_OUTPUT);
        }
        if let Some(mut file) = session.take_file() {
            let len = file.len;
            if send_file_async(&stream, &mut file).await.is_err() {
                return;
            }
            connection.wrote(len as usize);
            connection.sent_file = true;
            if next == Next::Read {
                // Answer what was pipelined behind the file.
                next = session.receive(&[], &mut out);
                reusable = connection.learn(&mut session, &out);
                continue;
            }
        }
        if next == Next::Close {
            if may_close_at_once(&session, stream.as_raw_fd()) {
                return;
            }
            close_gracefully(stream, &mut [0u8; 1024]).await;
            return;
        }
        if reusable && session.is_idle() {
            let Ok(std_stream) = stream.into_std() else {
                return;
            };
            match connection.release(std_stream).map(into_tokio) {
                Some(Ok(resumed)) => stream = resumed,
                _ => return,
            }
        }
        let timeouts = connection.service.timeouts;
        let (deadline, head) = clock.deadline(&session, timeouts);
        // Readiness can be stale: wait again until a read returns bytes (or the end).
        loop {
            tokio::select! {
                ready = stream.readable() => if ready.is_err() {
                    return;
                },
                () = tokio::time::sleep_until(deadline.into()) => {
                    if head {
                        session.head_timed_out(&mut out);
                        next = Next::Close;
                    } else if silent_for(stream.as_raw_fd(), timeouts.idle) {
                        return;
                    }
                    continue 'serve;
                }
                () = shutdown.recv() => return,
            }
            let read = READ_BUFFER.with_borrow_mut(|buf| match stream.try_read(buf) {
                Ok(0) => Err(()),
                Ok(n) => {
                    connection.received(n);
                    next = session.receive(&buf[..n], &mut out);
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(_) => Err(()),
            });
            match read {
                Ok(true) => break,
                Ok(false) => {}
                Err(()) => return,
            }
        }
        reusable = connection.learn(&mut session, &out);
    }
}

thread_local! {
    /// The work items' read buffer, one per runtime thread: a work item waits for readability
    /// without a buffer and reads only when bytes are there, so an idle keep-alive connection
    /// costs its socket and session, not 8 KiB more (measured: 10.7 KB per idle connection
    /// before, with `cargo xtask bench memory`).
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK]);
}

/// Output buffer capacity a connection keeps between answers.
const KEPT_OUTPUT: usize = 1024;

/// A connection's protocol state between reads.
struct Exchange {
    session: Session,
    /// Answers not written yet.
    out: Vec<u8>,
    /// What the last answer asked for.
    next: Next,
    /// Whether the connection may be handed to the kernel once idle.
    reusable: bool,
}

impl Exchange {
    fn new(connection: &UserConnection) -> Exchange {
        Exchange {
            session: connection.session(),
            out: Vec::new(),
            next: Next::Read,
            reusable: false,
        }
    }
}

/// Reads what is already there and answers it without waiting. Returns true when the connection
/// is answered and closed; otherwise `exchange` holds where it stands (including answers that
/// could not be written at once).
fn answer_at_once(
    mut stream: &std::net::TcpStream,
    connection: &mut UserConnection,
    exchange: &mut Exchange,
    buf: &mut [u8],
) -> io::Result<bool> {
    stream.set_nonblocking(true)?;
    let n = match stream.read(buf) {
        Ok(0) => return Ok(true),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(e),
    };
    connection.received(n);
    exchange.next = exchange.session.receive(&buf[..n], &mut exchange.out);
    exchange.reusable = connection.learn(&mut exchange.session, &exchange.out);
    let written = match stream.write(&exchange.out) {
        Ok(written) => written,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    connection.wrote(written);
    exchange.out.drain(..written);
    // Closing with an empty receive queue sends a FIN.
    Ok(exchange.out.is_empty()
        && !exchange.session.owes_file()
        && exchange.next == Next::Close
        && may_close_at_once(&exchange.session, stream.as_raw_fd()))
}

/// Sends a file body with sendfile(2) as the socket takes it.
async fn send_file_async(stream: &tokio::net::TcpStream, file: &mut FileBody) -> io::Result<()> {
    while file.len > 0 {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            send_file_once(stream.as_raw_fd(), file)
        }) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One sendfile(2) call: file bytes go from the page cache to the socket without a copy through
/// user space.
fn send_file_once(fd: RawFd, file: &mut FileBody) -> io::Result<usize> {
    let mut offset = file.offset as libc::off_t;
    let count = file.len.min(1 << 30) as usize;
    // SAFETY: both fds are open; the kernel updates `offset`.
    let sent = unsafe { libc::sendfile(fd, file.file.as_raw_fd(), &mut offset, count) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent == 0 {
        // The file shrank under us: the promised length can no longer be sent.
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    file.offset = offset as u64;
    file.len -= sent as u64;
    Ok(sent as usize)
}

/// For a connection that stays open: answers go out as soon as they are written (like nginx's
/// `tcp_nodelay on`). With Nagle, a small answer behind unacknowledged bytes — a kernel answer or
/// the end of a large file — waits for the client's delayed ACK, about 40 ms. (A connection
/// answered and closed at accept never needs it, and saves the system call.)
fn no_delay(stream: &std::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// After the last answer: whether the connection may close now without lingering — the client
/// said it is done and nothing more has arrived, so closing sends a FIN, not a reset.
fn may_close_at_once(session: &Session, fd: RawFd) -> bool {
    let mut pending: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    session.client_is_done()
        && unsafe { libc::ioctl(fd, libc::FIONREAD, &mut pending) } == 0
        && pending == 0
}

/// The `thread` connection: the same session, blocking I/O.
fn serve_blocking(mut stream: std::net::TcpStream, mut connection: UserConnection) {
    // Sockets coming back from the kernel path were last owned by tokio, which made them
    // non-blocking.
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    no_delay(&stream);
    let runtime = connection.service.runtime.clone();
    let mut session = connection.session();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    let mut clock = ReadClock::default();
    loop {
        let timeouts = connection.service.timeouts;
        let (deadline, head) = clock.deadline(&session, timeouts);
        let wait = deadline.saturating_duration_since(Instant::now());
        if stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .is_err()
        {
            return;
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if head {
                    session.head_timed_out(&mut out);
                    let _ = stream.write_all(&out);
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    linger_blocking(&mut stream, &mut buf);
                    return;
                }
                if silent_for(stream.as_raw_fd(), timeouts.idle) {
                    return;
                }
                continue;
            }
            Err(_) => return,
        };
        connection.received(n);
        let mut next = session.receive(&buf[..n], &mut out);
        let mut reusable = connection.learn(&mut session, &out);
        // Write the answers; after a file body, answer what was pipelined behind it.
        loop {
            if !out.is_empty() {
                if !runtime.block_on(connection.wait_for_kernel(stream.as_raw_fd())) {
                    return;
                }
                if reusable && next == Next::Read && session.is_idle() {
                    connection.announce(out.len());
                }
                if stream.write_all(&out).is_err() {
                    return;
                }
                connection.wrote(out.len());
                out.clear();
            }
            let Some(mut file) = session.take_file() else {
                break;
            };
            let len = file.len;
            while file.len > 0 {
                if send_file_once(stream.as_raw_fd(), &mut file).is_err() {
                    return;
                }
            }
            connection.wrote(len as usize);
            connection.sent_file = true;
            if next == Next::Close {
                break;
            }
            next = session.receive(&[], &mut out);
            reusable = connection.learn(&mut session, &out);
        }
        if next == Next::Close {
            if may_close_at_once(&session, stream.as_raw_fd()) {
                return;
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
            linger_blocking(&mut stream, &mut buf);
            return;
        }
        if reusable && session.is_idle() {
            match connection.release(stream) {
                Some(resumed) => stream = resumed,
                None => return,
            }
        }
    }
}

/// After our FIN: reads and drops what the client still sends, until it closes (bounded), so the
/// close is not a reset.
fn linger_blocking(stream: &mut std::net::TcpStream, buf: &mut [u8]) {
    let _ = stream.set_read_timeout(Some(LINGER));
    let mut dropped = 0;
    while let Ok(n @ 1..) = stream.read(buf) {
        dropped += n;
        if dropped > LINGER_BYTES {
            break;
        }
    }
}
