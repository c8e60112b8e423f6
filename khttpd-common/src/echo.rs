//! The kernel echo service (kecho): a stream-verdict program redirects every byte a client sends
//! back to the same socket's egress, so user space never reads it.

/// Sockhash of echo connections, keyed by socket cookie (`SO_COOKIE`). The cookie is the same number
/// in the kernel (`bpf_get_socket_cookie`) and in user space, so there is no port/IP byte-order
/// encoding to get wrong, and IPv4 and IPv6 share one key space.
pub const SOCKETS_MAP: &str = "ECHO_SOCKETS";
/// Upper bound on connections the kernel echoes at once; past it new connections are echoed in user
/// space.
pub const MAX_SOCKETS: u32 = 65_536;

/// Per-CPU array of `u64` counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "ECHO_COUNTERS";

/// Ring buffer of [`crate::Handoff`] records.
pub const HANDOFFS_MAP: &str = "ECHO_HANDOFFS";
/// Size of [`HANDOFFS_MAP`] in bytes (a power of two and a multiple of the page size).
pub const HANDOFFS_BYTES: u32 = 64 * 1024;

/// Name of the stream-verdict program (its function name in khttpd-ebpf).
pub const VERDICT_PROGRAM: &str = "echo_verdict";

/// Slots of [`COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// skbs redirected back to their sender.
    Messages = 0,
    /// Bytes in those skbs.
    Bytes = 1,
    /// skbs with data left to user space (each one also causes a [`crate::Handoff`]).
    Passes = 2,
    /// Redirects the kernel refused; such skbs are passed to user space.
    RedirectFailures = 3,
}

impl Counter {
    pub const ALL: [Counter; 4] = [
        Counter::Messages,
        Counter::Bytes,
        Counter::Passes,
        Counter::RedirectFailures,
    ];
    /// Number of slots in [`COUNTERS_MAP`].
    pub const COUNT: u32 = Self::ALL.len() as u32;
}
