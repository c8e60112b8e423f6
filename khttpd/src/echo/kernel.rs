//! The kernel echo path: accepted sockets go into the echo sockhash (see [`crate::sockmap`]) and
//! user space never reads them — unless the verdict asks it to take one over because its client
//! falls behind (see `khttpd_common::echo`): [`KernelEcho::detach`] then moves it out of the
//! verdict's reach without losing a byte, and user space echoes it after the kernel's bytes.
//!
//! A client that shuts its side is closed once every byte it sent has been echoed and
//! acknowledged: TCP_INFO's bytes acked + 1 == bytes received, because the FIN counts one sequence
//! number in `bytes_received` that nothing ever reads (measured, see docs/kernel-facts.md).

use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, MapData, SockHash};
use khttpd_common::echo::{Connection, Counter};

use crate::{
    fast_path::maps::{Counters, EchoMaps},
    fd::{fix_receive_buffer, set_receive_low_water, tcp_info, unread_bytes, TCP_CLOSE_WAIT},
    sockmap::{KernelConnections, Service},
};

/// The kernel's record of each connection (`ECHO_CONNECTIONS`).
type Records = Arc<Mutex<HashMap<MapData, u64, Connection>>>;

pub struct Echo {
    records: Records,
}

impl Service for Echo {
    const NAME: &'static str = "echo";
    type Parked = TcpStream;

    fn prepare(&self, cookie: u64, _stream: &TcpStream) -> io::Result<()> {
        self.records
            .lock()
            .unwrap()
            .insert(cookie, Connection::default(), 0)
            .map_err(io::Error::other)
    }

    fn drained(&self, stream: &TcpStream, _cookie: u64) -> bool {
        // Only asked after the FIN arrived, which counts one in bytes_received.
        tcp_info(stream.as_raw_fd()).map_or(true, |info| {
            info.tcpi_bytes_acked + 1 >= info.tcpi_bytes_received
        })
    }

    fn forget(&self, cookie: u64) {
        let _ = self.records.lock().unwrap().remove(&cookie);
    }
}

/// A connection moved to user space, while user space echoes it. Dropping it deletes the kernel's
/// record; the socket leaves `ECHO_DETACHED` when it closes.
pub struct Detached {
    cookie: u64,
    records: Records,
}

impl Detached {
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Bytes the kernel echoed on the connection (0 without a record). It can still grow for a
    /// moment after the detach, by an skb whose verdict was running meanwhile.
    pub fn kernel_echoed(&self) -> u64 {
        let records = self.records.lock().unwrap();
        records.get(&self.cookie, 0).map_or(0, |r| r.echoed_bytes)
    }

    /// How many bytes were lost while the socket left the echo sockhash, or `None` while bytes
    /// are still arriving (ask again). An skb the kernel was handing to the verdict at that moment
    /// finds no program and is dropped — after TCP acknowledged it (measured: 4 of 100 clients that
    /// fell behind at once lost 53 bytes each). So, before user space reads anything: every byte
    /// TCP received was echoed by the kernel or waits in the receive queue, or some were lost.
    /// `kernel_echoed` must be final (see the echo work item).
    pub fn lost_bytes(&self, fd: RawFd, kernel_echoed: u64) -> io::Result<Option<u64>> {
        let before = tcp_info(fd)?;
        let unread = unread_bytes(fd)?;
        let after = tcp_info(fd)?;
        if before.tcpi_bytes_received != after.tcpi_bytes_received {
            return Ok(None);
        }
        // A FIN counts one in bytes_received (docs/kernel-facts.md).
        let fin = u64::from(after.tcpi_state == TCP_CLOSE_WAIT);
        Ok(Some(
            after
                .tcpi_bytes_received
                .saturating_sub(kernel_echoed + unread + fin),
        ))
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        let _ = self.records.lock().unwrap().remove(&self.cookie);
    }
}

pub struct KernelEcho {
    connections: KernelConnections<Echo>,
    /// `ECHO_DETACHED`: no programs; keeps detached connections' psocks alive.
    detached: Mutex<SockHash<MapData, u64>>,
    counters: Counters,
}

impl KernelEcho {
    pub fn start(maps: EchoMaps) -> io::Result<KernelEcho> {
        let echo = Echo {
            records: Arc::new(Mutex::new(maps.connections)),
        };
        Ok(KernelEcho {
            connections: KernelConnections::start(echo, maps.sockets, maps.handoffs)?,
            detached: Mutex::new(maps.detached),
            counters: maps.counters,
        })
    }

    /// Moves a connection the verdict handed back out of its reach. The socket enters
    /// `ECHO_DETACHED` first: a socket keeps its psock while any sockmap holds it, so the skbs the
    /// kernel redirected and that still wait for room in the send queue are sent, not freed. Then
    /// it leaves the echo sockhash, and from then on its bytes stay in TCP's receive queue, where
    /// the receive window holds the client back while user space cannot write.
    ///
    /// Leaving the sockhash clears the psock's verdict program before it gives TCP its own
    /// `sk_data_ready` back (`sk_psock_stop_verdict`), so an skb a softirq is handing to the
    /// verdict meanwhile finds no program and is dropped — after TCP acknowledged it
    /// (docs/kernel-facts.md). TCP calls `sk_data_ready` only once the unread bytes reach the
    /// receive low-water mark (or the window is nearly full), so for the move it is raised as far
    /// as TCP lets it: the setsockopt takes the socket lock, which waits out a softirq already
    /// running the verdict, and until it is lowered again new bytes just wait in the receive queue.
    /// The receive buffer is fixed first, at its size so far: raising the mark would otherwise
    /// grow it to megabytes, and a client that does not read would be let send that much.
    pub fn detach(&self, cookie: u64, stream: &TcpStream) -> io::Result<Detached> {
        let fd = stream.as_raw_fd();
        fix_receive_buffer(fd)?;
        set_receive_low_water(fd, i32::MAX)?;
        let moved = self.move_out_of_reach(cookie, fd);
        // Back to TCP's default; this also wakes the reader if bytes wait.
        let lowered = set_receive_low_water(fd, 1);
        moved?;
        lowered?;
        Ok(Detached {
            cookie,
            records: Arc::clone(&self.connections.service().records),
        })
    }

    /// Into `ECHO_DETACHED`, then out of the echo sockhash (see [`KernelEcho::detach`]).
    fn move_out_of_reach(&self, cookie: u64, fd: RawFd) -> io::Result<()> {
        self.detached
            .lock()
            .unwrap()
            .insert(cookie, fd, 0)
            .map_err(io::Error::other)?;
        self.connections
            .leave_sockhash(cookie)
            .map_err(io::Error::other)
    }

    /// The kernel's per-CPU counter, summed.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters.sum(counter as u32)
    }

    /// The connections in the sockhash and their watcher (`sockmap.rs`): installing, parking,
    /// taking back, hand-offs.
    pub fn sockmap(&self) -> &KernelConnections<Echo> {
        &self.connections
    }
}
