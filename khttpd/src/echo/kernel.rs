//! The kernel echo path: accepted sockets go into the echo sockhash (see [`crate::sockmap`]) and
//! user space never reads them.
//!
//! A client that shuts its side is closed once every byte it sent has been echoed and
//! acknowledged: TCP_INFO's bytes acked + 1 == bytes received, because the FIN counts one sequence
//! number in `bytes_received` that nothing ever reads (measured, see docs/kernel-facts.md).

use std::{io, net::TcpStream, ops::Deref, os::fd::AsRawFd};

use khttpd_common::echo::Counter;

use crate::{
    fast_path::{Counters, EchoMaps},
    fd::tcp_info,
    sockmap::{KernelConnections, Service},
};

pub struct Echo;

impl Service for Echo {
    const NAME: &'static str = "echo";
    type Parked = TcpStream;

    fn drained(&self, stream: &TcpStream, _cookie: u64) -> bool {
        // Only asked after the FIN arrived, which counts one in bytes_received.
        tcp_info(stream.as_raw_fd()).map_or(true, |info| {
            info.tcpi_bytes_acked + 1 >= info.tcpi_bytes_received
        })
    }
}

pub struct KernelEcho {
    connections: KernelConnections<Echo>,
    counters: Counters,
}

impl KernelEcho {
    pub fn start(maps: EchoMaps) -> io::Result<KernelEcho> {
        Ok(KernelEcho {
            connections: KernelConnections::start(Echo, maps.sockets, maps.handoffs)?,
            counters: maps.counters,
        })
    }

    /// The kernel's per-CPU counter, summed.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters.sum(counter as u32)
    }
}

impl Deref for KernelEcho {
    type Target = KernelConnections<Echo>;

    fn deref(&self) -> &Self::Target {
        &self.connections
    }
}
