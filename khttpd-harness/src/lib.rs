//! What khttpd's tests (`khttpd/tests`) and benches (`xtask`) share, written once: a khttpd
//! process that is stopped when dropped and read from the outside ([`Server`]: its ports, log,
//! `/metrics`, descriptors and BPF maps), the ways of running it ([`Mode`]), child processes
//! stopped when dropped ([`process`]), small HTTP clients and Date blanking ([`http`]), and the
//! machine facts a measurement needs ([`system`]).
//!
//! Everything here waits a bounded time: a stuck server fails a test or a bench, never hangs it.
//! Errors are `anyhow` with the server's own words attached; tests `unwrap` them.

pub mod bpf;
pub mod http;
pub mod metrics;
pub mod process;
pub mod server;
pub mod system;

use std::{
    thread,
    time::{Duration, Instant},
};

pub use metrics::Metrics;
pub use server::{Mode, Server};

/// Longest any single connect, write or read may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `check` until it is true or `limit` passes; returns the last result.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}
