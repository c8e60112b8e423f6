//! The HTTP/1.x service on `--port`. With the fast path on, a connection starts in the kernel
//! ([`kernel`]), which answers the requests user space has taught it and hands the connection back
//! here at the first byte it does not answer; without it, every connection is served here.
//!
//! In user space a connection is one [`connection::Connection`] — the state machine around the
//! HTTP [`session::Session`] — run by one of two executors ([`executor`]), so both dispatch modes
//! send the same bytes:
//! - `cmwq` (default): served at accept as far as it goes without waiting, then one work item on
//!   the unbound work queue (khttpd after its move to CMWQ) while it is busy; between requests it
//!   waits on the idle list ([`idle`]) without one;
//! - `thread`: one OS thread per connection with blocking I/O (the original kthread khttpd).
//!
//! Closing is always a FIN after the last response is written, followed by reading until the
//! client closes (bounded): closing with unread bytes would make the kernel send a reset instead.
//!
//! A request's hops, in order:
//! - user space: `listener::accept_loop` → [`HttpService::dispatch`] → `serve_in_user_space`
//!   (answered at once as far as it goes: `executor::answer_at_once`) → a work item running
//!   `executor::serve_async` (or a thread running `executor::serve_blocking`), which asks the
//!   [`connection::Connection`] for its next action: read → [`session::Session`] parses and
//!   answers ([`response`], [`site`] with `--root`) → write; between requests `idle` holds it.
//! - kernel: [`HttpService::dispatch`] (`--fast-path on`) or `Connection::release` (`auto`, once
//!   an answer was learned: [`kernel::KernelHttp::learn`], table in `kernel_table`) →
//!   `kernel.sockmap().install` (`sockmap.rs`: sockhash + watcher) → the verdict program answers
//!   (khttpd-ebpf/src/http.rs) → at a request it cannot answer, a hand-off record →
//!   [`HttpService::handoff_loop`] → `serve_in_user_space` as above.

pub mod connection;
mod executor;
pub mod file_cache;
mod idle;
pub mod kernel;
mod kernel_table;
pub mod response;
pub mod session;
pub mod site;

use std::{
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use log::{debug, warn};

use crate::{
    access_log::{AccessLog, ConnectionLog},
    shutdown::{self, Shutdown},
    workqueue::WorkQueue,
};
pub use connection::Timeouts;
use connection::{Connection, Link};
use executor::{Wait, WentIdle};
use idle::IdleConnections;
use kernel::{KernelHttp, Parked};
use khttpd_common::http::Answered;
use site::Site;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
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

/// How the service runs (from the command line; see the fields of [`HttpService`]).
pub struct Config {
    pub dispatch: Dispatch,
    pub kernel_first: bool,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    pub site: Option<Arc<Site>>,
    pub access_log: Option<Arc<AccessLog>>,
}

pub struct HttpService {
    pub queue: Arc<WorkQueue>,
    pub dispatch: Dispatch,
    pub kernel: Option<KernelHttp>,
    /// `--fast-path on`: connections start in the kernel. Otherwise (auto) they start in user
    /// space and move to the kernel after a run of answers it could send ([`PROMOTE_AFTER`]):
    /// a connection that closes after one request (htstress) never pays for the kernel path,
    /// which cannot close it (see docs/benchmarks.md).
    kernel_first: bool,
    pub timeouts: Timeouts,
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--root`.
    pub site: Option<Arc<Site>>,
    /// `--access-log`.
    pub access_log: Option<Arc<AccessLog>>,
    /// Connections open now (user space and kernel).
    pub open: Arc<AtomicUsize>,
    /// Connections turned away with 503 because `max_connections` were open.
    pub rejected: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections the kernel handed to user space.
    pub handoffs: AtomicU64,
    /// Requests answered in user space.
    pub user_responses: Arc<crate::metrics::Shards>,
    /// User-space connections waiting between requests without a work item.
    pub idle: IdleConnections,
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
    ) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(HttpService {
            queue,
            dispatch: config.dispatch,
            kernel,
            kernel_first: config.kernel_first,
            timeouts: config.timeouts,
            max_connections: config.max_connections,
            site: config.site,
            access_log: config.access_log,
            open: Arc::default(),
            rejected: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            handoffs: AtomicU64::new(0),
            user_responses: Arc::default(),
            idle: IdleConnections::new()?,
            notify_shutdown,
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    /// Serves one accepted connection (from `peer`, as accept said), or turns it away when
    /// `max_connections` are open.
    pub fn dispatch(self: &Arc<Self>, stream: std::net::TcpStream, peer: Option<SocketAddr>) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let Some(slot) = self.take_slot() else {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            let shutdown = Shutdown::new(&self.notify_shutdown);
            let log = self.connection_log(&stream, peer, None);
            let connection = Connection::rejecting(self, log);
            tokio::spawn(reject(stream, connection, shutdown));
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
                match kernel.sockmap().install(parked) {
                    Ok(()) => return,
                    Err(parked) => (parked.stream, parked.slot),
                }
            }
            _ => (stream, slot),
        };
        self.serve_in_user_space(stream, peer, slot, None, 0);
    }

    /// With `--access-log`: the connection's peer (asked for when not known) and id (its socket
    /// cookie, asked for when not known).
    fn connection_log(
        &self,
        stream: &std::net::TcpStream,
        peer: Option<SocketAddr>,
        cookie: Option<u64>,
    ) -> Option<Box<ConnectionLog>> {
        let log = self.access_log.as_ref()?;
        let peer = peer
            .or_else(|| stream.peer_addr().ok())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let id = cookie
            .or_else(|| crate::fd::socket_cookie(stream.as_raw_fd()).ok())
            .unwrap_or(0);
        Some(Box::new(ConnectionLog {
            log: Arc::clone(log),
            peer,
            id,
            started: None,
        }))
    }

    fn take_slot(&self) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(Arc::clone(&self.open)))
    }

    /// `peer`: the client, when known; `written`: bytes user space wrote on the connection before.
    fn serve_in_user_space(
        self: &Arc<Self>,
        stream: std::net::TcpStream,
        peer: Option<SocketAddr>,
        slot: Slot,
        link: Option<Link>,
        written: u64,
    ) {
        let log = self.connection_log(&stream, peer, link.as_ref().map(|link| link.cookie));
        let mut connection = Connection::of_service(self, slot, link, written, log);
        match self.dispatch {
            Dispatch::Cmwq => {
                // A connection the kernel hands over reads what it passed here too; the machine
                // waits for the kernel's answers to leave before it writes (a work item's wait).
                let wait = executor::answer_at_once(&stream, &mut connection);
                if let Wait::End = wait {
                    return;
                }
                no_delay(&stream);
                self.wait(stream, connection, wait);
            }
            Dispatch::Thread => {
                no_delay(&stream);
                let runtime = self.runtime.clone();
                let spawned = std::thread::Builder::new()
                    .name("khttpd-conn".into())
                    .spawn(move || executor::serve_blocking(stream, connection, &runtime));
                if let Err(e) = spawned {
                    debug!("http: cannot start a connection thread: {e}");
                }
            }
        }
    }

    /// A connection served as far as it went without waiting waits for what `wait` says: on the
    /// idle list if it is new and waits for a request ([`Connection::is_fresh`]), else in a work
    /// item.
    fn wait(self: &Arc<Self>, stream: std::net::TcpStream, connection: Connection, wait: Wait) {
        let (stream, connection) = match wait {
            Wait::Readable if connection.is_fresh() => {
                match self.idle.park(stream, connection, Duration::ZERO) {
                    Ok(()) => return,
                    Err(back) => back,
                }
            }
            _ => (stream, connection),
        };
        self.queue_work(stream, connection, wait);
    }

    /// The connection's work item, from where `wait` says; a connection that goes idle moves to
    /// the idle list ([`idle`]).
    fn queue_work(
        self: &Arc<Self>,
        stream: std::net::TcpStream,
        connection: Connection,
        wait: Wait,
    ) {
        let shutdown = Shutdown::new(&self.notify_shutdown);
        let service = Arc::clone(self);
        let may_park = self.idle.is_open();
        let work = async move {
            let went_idle =
                executor::serve_async(stream, connection, wait, shutdown, may_park).await;
            if let Some(WentIdle {
                stream,
                connection,
                silent,
            }) = went_idle
            {
                if let Err((stream, connection)) = service.idle.park(stream, connection, silent) {
                    service.queue_work(stream, connection, Wait::Readable);
                }
            }
        };
        if self.queue.queue_work(work).is_err() {
            debug!("http: shutting down, connection dropped");
        }
    }

    /// Until shutdown: serves the idle connections that wake (or time out) in new work items.
    pub async fn idle_loop(self: Arc<Self>, shutdown: Shutdown) {
        let resume = |stream: std::net::TcpStream, mut connection: Connection| {
            match executor::answer_at_once(&stream, &mut connection) {
                Wait::End => {}
                wait => self.wait(stream, connection, wait),
            }
        };
        self.idle.run(resume, shutdown).await;
    }

    /// Serves in user space the connections the kernel hands over, until shutdown.
    pub async fn handoff_loop(self: Arc<Self>, shutdown: Shutdown) {
        let Some(kernel) = &self.kernel else { return };
        kernel
            .sockmap()
            .serve_handoffs(shutdown, |cookie, parked| {
                self.handoffs.fetch_add(1, Ordering::Relaxed);
                let link = Link {
                    cookie,
                    published: Some(parked.answered),
                    read_bytes: parked.answered.read_bytes,
                    ordered: false,
                };
                let written = parked.answered.written_bytes;
                self.serve_in_user_space(parked.stream, None, parked.slot, Some(link), written);
            })
            .await;
    }

    /// With `--access-log` and the kernel path: logs what the kernel answered, until shutdown.
    pub async fn access_loop(self: Arc<Self>, shutdown: Shutdown) {
        let (Some(kernel), Some(log)) = (&self.kernel, &self.access_log) else {
            return;
        };
        if let Some(records) = kernel.take_access_records() {
            Arc::clone(log).kernel_loop(records, shutdown).await;
        }
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
            kernel.sockmap().stop();
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
async fn reject(stream: std::net::TcpStream, mut connection: Connection, shutdown: Shutdown) {
    let wait = executor::answer_at_once(&stream, &mut connection);
    // Never idle: it closes after the 503.
    let _ = executor::serve_async(stream, connection, wait, shutdown, false).await;
}

/// For a connection that stays open: answers go out as soon as they are written (like nginx's
/// `tcp_nodelay on`). With Nagle, a small answer behind unacknowledged bytes — a kernel answer or
/// the end of a large file — waits for the client's delayed ACK, about 40 ms. (A connection
/// answered and closed at accept never needs it, and saves the system call.)
fn no_delay(stream: &std::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}
