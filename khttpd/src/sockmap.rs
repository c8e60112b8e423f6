//! Connections served by a sockmap program: installing accepted sockets into a service's sockhash,
//! closing them when the client is done, and handing them back to user space when the kernel asks.
//! The echo service and the HTTP fast path both use it; a [`Service`] says what differs.
//!
//! Two kernel behaviours shape this module (measured, see docs/kernel-facts.md):
//! - **Accept race.** Bytes that arrived before the socket was accepted and inserted are not run
//!   through the verdict on their own. One `recv(MSG_PEEK | MSG_DONTWAIT)` after the insert pushes
//!   them through (MSG_PEEK, because a consuming recv leaves a phantom Recv-Q).
//! - **Wake-ups.** Every redirected skb still wakes the socket's readers with EPOLLIN. tokio always
//!   registers for EPOLLIN, so the sockets are watched by a thread of our own whose epoll asks only
//!   for EPOLLRDHUP (EPOLLHUP and EPOLLERR are always reported).
//!
//! Closing: when the client shuts its side (EPOLLRDHUP) the socket is closed once the service says
//! everything it owes was delivered ([`Service::drained`]), so a client that half-closes still gets
//! its answers; a reset or error (EPOLLHUP/EPOLLERR) closes at once. The kernel removes a closed
//! socket from the sockhash by itself.

use std::{
    collections::HashMap,
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{MapData, MapError, RingBuf, SockHash};
use khttpd_common::Handoff;
use log::{debug, warn};
use rustix::event::{epoll, eventfd, EventfdFlags};
use tokio::io::unix::AsyncFd;

use crate::{
    fd::{async_readable, silent_for, socket_cookie, tcp_info, unsent_bytes, TCP_CLOSE},
    shutdown::Shutdown,
    socket_memory,
};

/// How long a half-closed connection may take to get its last bytes acknowledged.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How often half-closed connections are re-checked.
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// How often connections are checked for the idle timeout.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// epoll token of the wake-up eventfd; socket cookies start at 1.
const WAKE_TOKEN: u64 = 0;

/// What a service adds to the shared connection handling.
pub trait Service: Send + Sync + 'static {
    /// Used in log lines and the watcher thread's name.
    const NAME: &'static str;
    /// What is kept of a connection while the kernel serves it: its socket, and whatever the
    /// service needs when it takes the connection back.
    type Parked: AsFd + AsRawFd + Send + 'static;
    /// Runs before the socket enters the sockhash (e.g. to create the kernel's per-connection
    /// state); an error keeps the connection in user space.
    fn prepare(&self, _cookie: u64, _parked: &Self::Parked) -> io::Result<()> {
        Ok(())
    }
    /// Whether everything the kernel owes a client that has shut its side has been delivered.
    fn drained(&self, parked: &Self::Parked, cookie: u64) -> bool;
    /// Runs when the connection leaves the kernel path, closed or taken back.
    fn forget(&self, _cookie: u64) {}
    /// Connections that received nothing for this long are closed (TCP_INFO counts the bytes the
    /// kernel answered, which user space never sees).
    fn idle_timeout(&self) -> Option<Duration> {
        None
    }
}

pub struct KernelConnections<S: Service> {
    inner: Arc<Inner<S>>,
    watcher: Mutex<Option<thread::JoinHandle<()>>>,
    handoffs: tokio::sync::Mutex<AsyncFd<RingBuf<MapData>>>,
}

struct Inner<S: Service> {
    service: S,
    sockets: Mutex<SockHash<MapData, u64>>,
    /// Connections the kernel serves, by socket cookie. Dropping one closes it.
    connections: Mutex<HashMap<u64, S::Parked>>,
    epoll: OwnedFd,
    wake: OwnedFd,
    stopping: AtomicBool,
}

impl<S: Service> KernelConnections<S> {
    pub fn start(
        service: S,
        sockets: SockHash<MapData, u64>,
        handoffs: RingBuf<MapData>,
    ) -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        epoll::add(
            &epoll,
            &wake,
            epoll::EventData::new_u64(WAKE_TOKEN),
            epoll::EventFlags::IN,
        )?;
        let inner = Arc::new(Inner {
            service,
            sockets: Mutex::new(sockets),
            connections: Mutex::new(HashMap::new()),
            epoll,
            wake,
            stopping: AtomicBool::new(false),
        });
        let watcher = {
            let inner = Arc::clone(&inner);
            thread::Builder::new()
                .name(format!("{}-hangups", S::NAME))
                .spawn(move || inner.watch_hangups())?
        };
        Ok(KernelConnections {
            inner,
            watcher: Mutex::new(Some(watcher)),
            handoffs: tokio::sync::Mutex::new(async_readable(handoffs)?),
        })
    }

    pub fn service(&self) -> &S {
        &self.inner.service
    }

    /// Hands a connection to the kernel. Gives it back when it cannot be installed (sockhash full,
    /// or the socket is no longer established), so the caller can serve it in user space.
    pub fn install(&self, stream: S::Parked) -> Result<(), S::Parked> {
        let fd = stream.as_raw_fd();
        let name = S::NAME;
        let cookie = match socket_cookie(fd) {
            Ok(cookie) => cookie,
            Err(e) => {
                debug!("{name}: no socket cookie ({e}); serving in user space");
                return Err(stream);
            }
        };
        if let Err(e) = self.inner.service.prepare(cookie, &stream) {
            debug!("{name}: no kernel state for the connection ({e}); serving in user space");
            return Err(stream);
        }
        // Hold the table while installing, so the watcher cannot close the socket half-way.
        let mut connections = self.inner.connections.lock().unwrap();
        if let Err(e) = self.inner.watch(&stream, cookie) {
            debug!("{name}: cannot watch connection ({e}); serving in user space");
            self.inner.service.forget(cookie);
            return Err(stream);
        }
        if let Err(e) = self.inner.sockets.lock().unwrap().insert(cookie, fd, 0) {
            debug!("{name}: sockhash insert failed ({e}); serving in user space");
            let _ = epoll::delete(&self.inner.epoll, &stream);
            self.inner.service.forget(cookie);
            return Err(stream);
        }
        // The accept-race kick: run bytes that arrived before the insert through the verdict.
        let _ = rustix::net::recv(
            &stream,
            &mut [0u8; 1],
            rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
        );
        connections.insert(cookie, stream);
        Ok(())
    }

    /// Gives `serve` every connection the kernel hands to user space, until shutdown. A hand-off
    /// for a connection the watcher does not hold (user space already serves it, or it closed)
    /// is skipped.
    pub async fn serve_handoffs(
        &self,
        mut shutdown: Shutdown,
        mut serve: impl FnMut(u64, S::Parked),
    ) {
        loop {
            let cookie = tokio::select! {
                cookie = self.next_handoff() => cookie,
                () = shutdown.recv() => return,
            };
            match cookie {
                Ok(cookie) => {
                    if let Some(parked) = self.take_back(cookie) {
                        serve(cookie, parked);
                    }
                }
                Err(e) => {
                    warn!("{}: cannot read kernel hand-offs: {e}", S::NAME);
                    return;
                }
            }
        }
    }

    /// Waits for the next connection the kernel handed back to user space.
    async fn next_handoff(&self) -> io::Result<u64> {
        let mut ring = self.handoffs.lock().await;
        loop {
            let mut ready = ring.readable_mut().await?;
            if let Some(item) = ready.get_inner_mut().next() {
                if item.len() >= size_of::<Handoff>() {
                    // SAFETY: the programs write whole `Handoff` records; read unaligned to be safe.
                    let handoff: Handoff =
                        unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    return Ok(handoff.cookie);
                }
                continue;
            }
            ready.clear_ready();
        }
    }

    /// Gives a taken-back connection (still in the sockhash) back to the watcher.
    pub fn park(&self, cookie: u64, parked: S::Parked) -> Result<(), S::Parked> {
        let mut connections = self.inner.connections.lock().unwrap();
        if let Err(e) = self.inner.watch(&parked, cookie) {
            debug!("{}: cannot watch connection ({e})", S::NAME);
            return Err(parked);
        }
        connections.insert(cookie, parked);
        Ok(())
    }

    /// Takes a connection out of the watcher's hands. It stays in the sockhash (the caller decides
    /// when it may leave: see [`KernelConnections::leave_sockhash`]). `None` when the watcher does
    /// not hold it (closed, or already taken).
    pub fn take_back(&self, cookie: u64) -> Option<S::Parked> {
        let stream = self.inner.connections.lock().unwrap().remove(&cookie)?;
        let _ = epoll::delete(&self.inner.epoll, &stream);
        Some(stream)
    }

    /// Removes a taken-back connection from the sockhash: its program no longer sees its bytes,
    /// which stay in TCP's receive queue. The socket's psock, and the skbs still waiting in it, are
    /// freed with it unless another sockmap holds the socket too.
    pub fn leave_sockhash(&self, cookie: u64) -> Result<(), MapError> {
        self.inner.sockets.lock().unwrap().remove(&cookie)
    }

    /// Entries in the sockhash, counted by walking its keys.
    pub fn sockhash_entries(&self) -> usize {
        self.inner
            .sockets
            .lock()
            .unwrap()
            .keys()
            .filter(Result::is_ok)
            .count()
    }

    /// Connections user space holds open for the kernel path.
    pub fn connections(&self) -> usize {
        self.inner.connections.lock().unwrap().len()
    }

    /// Stops the watcher and closes every connection.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        let _ = rustix::io::write(&self.inner.wake, &1u64.to_ne_bytes());
        if let Some(watcher) = self.watcher.lock().unwrap().take() {
            let _ = watcher.join();
        }
        let mut connections = self.inner.connections.lock().unwrap();
        for (cookie, parked) in connections.drain() {
            self.inner.closing(cookie, &parked);
        }
    }
}

/// Waits until `owed` bytes have entered the socket's send queue (TCP_INFO's bytes acked plus
/// SIOCOUTQ), so that what user space writes next cannot overtake bytes a program sent on the
/// connection before. False if `limit` passes first or the connection is closed (nothing drains
/// then); true on an error reading the socket's state (the write will report it).
pub async fn wait_until_queued(fd: RawFd, owed: u64, limit: Option<Duration>) -> bool {
    let deadline = limit.map(|limit| Instant::now() + limit);
    let mut pause = Duration::from_micros(50);
    loop {
        let Ok(info) = tcp_info(fd) else { return true };
        if info.tcpi_state == TCP_CLOSE {
            return false;
        }
        let Ok(unsent) = unsent_bytes(fd) else {
            return true;
        };
        if info.tcpi_bytes_acked + unsent >= owed {
            return true;
        }
        if deadline.is_some_and(|deadline| Instant::now() > deadline) {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

impl<S: Service> Inner<S> {
    /// Adds a connection to the watcher's epoll set: hang-ups only (EPOLLHUP and EPOLLERR come
    /// unasked), never EPOLLIN, which every redirected skb raises.
    fn watch(&self, socket: &impl AsFd, cookie: u64) -> rustix::io::Result<()> {
        epoll::add(
            &self.epoll,
            socket,
            epoll::EventData::new_u64(cookie),
            epoll::EventFlags::RDHUP,
        )
    }

    fn watch_hangups(&self) {
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); 256];
        // Half-closed connections waiting for their last bytes to be acknowledged.
        let mut draining: HashMap<u64, Instant> = HashMap::new();
        let idle = self.service.idle_timeout();
        let mut idle_checked = Instant::now();
        loop {
            let timeout = match (draining.is_empty(), idle) {
                (false, _) => Some(DRAIN_POLL),
                (true, Some(_)) => Some(IDLE_POLL),
                (true, None) => None,
            };
            let timeout = timeout.map(|timeout| rustix::time::Timespec {
                tv_sec: timeout.as_secs() as i64,
                tv_nsec: i64::from(timeout.subsec_nanos()),
            });
            let ready = match epoll::wait(&self.epoll, &mut events, timeout.as_ref()) {
                Ok((ready, _)) => ready,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    warn!(
                        "{}: epoll_wait failed: {e}; kernel connections are no longer closed",
                        S::NAME
                    );
                    return;
                }
            };
            for event in ready.iter() {
                let (cookie, flags) = (event.data.u64(), event.flags);
                if cookie == WAKE_TOKEN {
                    if self.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                if flags.intersects(epoll::EventFlags::HUP | epoll::EventFlags::ERR) {
                    draining.remove(&cookie);
                    self.close(cookie);
                } else if flags.contains(epoll::EventFlags::RDHUP) && !self.close_if_drained(cookie)
                {
                    // Keep watching for a reset only; poll for the drain.
                    if let Some(stream) = self.connections.lock().unwrap().get(&cookie) {
                        let _ = epoll::modify(
                            &self.epoll,
                            stream,
                            epoll::EventData::new_u64(cookie),
                            epoll::EventFlags::empty(),
                        );
                    }
                    draining.insert(cookie, Instant::now() + DRAIN_LIMIT);
                }
            }
            let now = Instant::now();
            draining.retain(|&cookie, deadline| {
                if *deadline <= now {
                    warn!(
                        "{}: connection {cookie} did not drain in {DRAIN_LIMIT:?}; closing it",
                        S::NAME
                    );
                    self.close(cookie);
                    return false;
                }
                !self.close_if_drained(cookie)
            });
            if let Some(idle) = idle {
                if now.duration_since(idle_checked) >= IDLE_POLL {
                    idle_checked = now;
                    self.close_idle(idle);
                }
            }
        }
    }

    /// Closes every connection that received nothing for `idle`.
    fn close_idle(&self, idle: Duration) {
        let mut connections = self.connections.lock().unwrap();
        connections.retain(|&cookie, parked| {
            let silent = silent_for(parked.as_raw_fd(), idle);
            if silent {
                debug!(
                    "{}: connection {cookie} idle for {idle:?}; closing it",
                    S::NAME
                );
                self.closing(cookie, parked);
            }
            !silent
        });
    }

    /// Closes the connection if the kernel delivered everything it owes. Returns whether it is
    /// gone (also when user space took it back meanwhile).
    fn close_if_drained(&self, cookie: u64) -> bool {
        let mut connections = self.connections.lock().unwrap();
        let Some(stream) = connections.get(&cookie) else {
            return true;
        };
        if !self.service.drained(stream, cookie) {
            return false;
        }
        if let Some(parked) = connections.remove(&cookie) {
            self.closing(cookie, &parked);
        }
        true
    }

    fn close(&self, cookie: u64) {
        if let Some(parked) = self.connections.lock().unwrap().remove(&cookie) {
            self.closing(cookie, &parked);
        }
    }

    /// What closing a connection the watcher holds involves before its socket is dropped.
    fn closing(&self, cookie: u64, parked: &S::Parked) {
        socket_memory::check(parked.as_raw_fd(), cookie, S::NAME);
        self.service.forget(cookie);
    }
}
