//! The kernel echo path: install accepted sockets into the echo sockhash and close them when the
//! client is done. User space never reads these sockets.
//!
//! Two kernel behaviours shape this module (measured, see docs/kernel-facts.md):
//! - **Accept race.** Bytes that arrived before the socket was accepted and inserted are not run
//!   through the verdict on their own. One `recv(MSG_PEEK | MSG_DONTWAIT)` after the insert pushes
//!   them through (MSG_PEEK, because a consuming recv leaves a phantom Recv-Q).
//! - **Wake-ups.** Every redirected skb still wakes the socket's readers with EPOLLIN. tokio always
//!   registers for EPOLLIN, so the sockets are watched by a thread of our own whose epoll asks only
//!   for EPOLLRDHUP (EPOLLHUP and EPOLLERR are always reported).
//!
//! Closing: when the client shuts its side (EPOLLRDHUP) the socket is closed once every byte it sent
//! has been echoed and acknowledged (TCP_INFO: bytes acked == bytes received, which also counts the FIN's one sequence number), so a client that
//! half-closes still gets all its data back; a reset or error (EPOLLHUP/EPOLLERR) closes at once.
//! The kernel removes a closed socket from the sockhash by itself.

use std::{
    collections::HashMap,
    io,
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray, RingBuf, SockHash};
use khttpd_common::echo::{Counter, Handoff};
use log::{debug, warn};
use tokio::io::unix::AsyncFd;

use crate::{
    fast_path::EchoMaps,
    fd::{async_readable, cvt, epoll_ctl, socket_cookie, tcp_info},
};

/// How long a half-closed connection may take to get its last bytes acknowledged.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How often half-closed connections are re-checked.
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// epoll token of the wake-up eventfd; socket cookies start at 1.
const WAKE_TOKEN: u64 = 0;

pub struct KernelEcho {
    inner: Arc<Inner>,
    watcher: Mutex<Option<thread::JoinHandle<()>>>,
    handoffs: tokio::sync::Mutex<AsyncFd<RingBuf<MapData>>>,
}

struct Inner {
    sockets: Mutex<SockHash<MapData, u64>>,
    counters: PerCpuArray<MapData, u64>,
    /// Installed connections by socket cookie. Dropping one closes it.
    connections: Mutex<HashMap<u64, TcpStream>>,
    epoll: OwnedFd,
    wake: OwnedFd,
    stopping: AtomicBool,
}

impl KernelEcho {
    pub fn start(maps: EchoMaps) -> io::Result<KernelEcho> {
        // SAFETY: plain syscalls; the returned fds are owned below.
        let epoll = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
        let wake = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::eventfd(
                0,
                libc::EFD_CLOEXEC | libc::EFD_NONBLOCK,
            ))?)
        };
        epoll_ctl(
            &epoll,
            libc::EPOLL_CTL_ADD,
            wake.as_raw_fd(),
            libc::EPOLLIN as u32,
            WAKE_TOKEN,
        )?;
        let inner = Arc::new(Inner {
            sockets: Mutex::new(maps.sockets),
            counters: maps.counters,
            connections: Mutex::new(HashMap::new()),
            epoll,
            wake,
            stopping: AtomicBool::new(false),
        });
        let watcher = {
            let inner = Arc::clone(&inner);
            thread::Builder::new()
                .name("kecho-hangups".into())
                .spawn(move || inner.watch_hangups())?
        };
        Ok(KernelEcho {
            inner,
            watcher: Mutex::new(Some(watcher)),
            handoffs: tokio::sync::Mutex::new(async_readable(maps.handoffs)?),
        })
    }

    /// Hands `stream` to the kernel. Gives it back when it cannot be installed (sockhash full, or
    /// the socket is already gone), so the caller can serve it in user space.
    pub fn install(&self, stream: TcpStream) -> Result<(), TcpStream> {
        let fd = stream.as_raw_fd();
        let cookie = match socket_cookie(fd) {
            Ok(cookie) => cookie,
            Err(e) => {
                debug!("echo: no socket cookie ({e}); serving in user space");
                return Err(stream);
            }
        };
        // Hold the table while installing, so the watcher cannot close the socket half-way.
        let mut connections = self.inner.connections.lock().unwrap();
        let watch = libc::EPOLLRDHUP as u32;
        if let Err(e) = epoll_ctl(&self.inner.epoll, libc::EPOLL_CTL_ADD, fd, watch, cookie) {
            debug!("echo: cannot watch connection ({e}); serving in user space");
            return Err(stream);
        }
        if let Err(e) = self.inner.sockets.lock().unwrap().insert(cookie, fd, 0) {
            debug!("echo: sockhash insert failed ({e}); serving in user space");
            let _ = epoll_ctl(&self.inner.epoll, libc::EPOLL_CTL_DEL, fd, 0, cookie);
            return Err(stream);
        }
        // The accept-race kick: run bytes that arrived before the insert through the verdict.
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a stack byte.
        unsafe {
            libc::recv(
                fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        connections.insert(cookie, stream);
        Ok(())
    }

    /// Waits for the next connection the kernel handed back to user space (see khttpd-ebpf).
    pub async fn next_handoff(&self) -> io::Result<u64> {
        let mut ring = self.handoffs.lock().await;
        loop {
            let mut ready = ring.readable_mut().await?;
            if let Some(item) = ready.get_inner_mut().next() {
                if item.len() >= size_of::<Handoff>() {
                    // SAFETY: the program writes whole `Handoff` records; read unaligned to be safe.
                    let handoff: Handoff =
                        unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    return Ok(handoff.cookie);
                }
                continue;
            }
            ready.clear_ready();
        }
    }

    /// Takes a connection out of the kernel path.
    pub fn take_back(&self, cookie: u64) -> Option<TcpStream> {
        let stream = self.inner.connections.lock().unwrap().remove(&cookie)?;
        let _ = epoll_ctl(
            &self.inner.epoll,
            libc::EPOLL_CTL_DEL,
            stream.as_raw_fd(),
            0,
            cookie,
        );
        let _ = self.inner.sockets.lock().unwrap().remove(&cookie);
        Some(stream)
    }

    /// The kernel's per-CPU counter, summed.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.inner
            .counters
            .get(&(counter as u32), 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    /// Entries in the echo sockhash, counted by walking its keys.
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
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a u64 to our eventfd.
        unsafe { libc::write(self.inner.wake.as_raw_fd(), (&raw const one).cast(), 8) };
        if let Some(watcher) = self.watcher.lock().unwrap().take() {
            let _ = watcher.join();
        }
        self.inner.connections.lock().unwrap().clear();
    }
}

impl Inner {
    fn watch_hangups(&self) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        // Half-closed connections waiting for their last bytes to be acknowledged.
        let mut draining: HashMap<u64, Instant> = HashMap::new();
        loop {
            let timeout = if draining.is_empty() {
                -1
            } else {
                DRAIN_POLL.as_millis() as i32
            };
            // SAFETY: `events` has room for its length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    timeout,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                warn!("echo: epoll_wait failed: {e}; kernel connections are no longer closed");
                return;
            }
            for event in &events[..n as usize] {
                let (cookie, flags) = (event.u64, event.events);
                if cookie == WAKE_TOKEN {
                    if self.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                if flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                    draining.remove(&cookie);
                    self.close(cookie);
                } else if flags & libc::EPOLLRDHUP as u32 != 0 && !self.close_if_echoed(cookie) {
                    // Keep watching for a reset only; poll for the drain.
                    if let Some(stream) = self.connections.lock().unwrap().get(&cookie) {
                        let _ = epoll_ctl(
                            &self.epoll,
                            libc::EPOLL_CTL_MOD,
                            stream.as_raw_fd(),
                            0,
                            cookie,
                        );
                    }
                    draining.insert(cookie, Instant::now() + DRAIN_LIMIT);
                }
            }
            let now = Instant::now();
            draining.retain(|&cookie, deadline| {
                if *deadline <= now {
                    warn!("echo: connection {cookie} did not drain in {DRAIN_LIMIT:?}; closing it");
                    self.close(cookie);
                    return false;
                }
                !self.close_if_echoed(cookie)
            });
        }
    }

    /// Closes the connection if everything it sent has been echoed and acknowledged. Returns
    /// whether it is gone.
    fn close_if_echoed(&self, cookie: u64) -> bool {
        let mut connections = self.connections.lock().unwrap();
        let Some(stream) = connections.get(&cookie) else {
            return true;
        };
        match tcp_info(stream.as_raw_fd()) {
            // Only called after the FIN arrived, which counts one in bytes_received.
            Ok(info) if info.tcpi_bytes_acked + 1 < info.tcpi_bytes_received => false,
            _ => {
                connections.remove(&cookie);
                true
            }
        }
    }

    fn close(&self, cookie: u64) {
        self.connections.lock().unwrap().remove(&cookie);
    }
}
