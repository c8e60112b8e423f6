//! The kernel echo service (kecho): a stream-verdict program redirects every byte a client sends
//! back to the same socket's egress, so user space never reads it — while the client reads what
//! comes back.
//!
//! With sockmap, TCP has no receive flow control (measured, docs/kernel-facts.md): the verdict
//! consumes every skb as it arrives, so the receive window never closes, and redirected skbs wait in
//! the socket's psock queue for room in the send queue with no bound (a client that sent without
//! reading had 1.2 GB of kernel memory in 4 s). So once more than [`MAX_BACKLOG_BYTES`] or
//! [`MAX_BACKLOG_SKBS`] wait there, the verdict asks user space to detach the connection: it enters
//! [`DETACHED_MAP`] (keeping its psock and what waits in it) and leaves [`SOCKETS_MAP`]; from then
//! on its bytes stay in TCP's receive queue and user space echoes them, after the kernel's.

/// Sockhash of echo connections, keyed by socket cookie (`SO_COOKIE`). The cookie is the same number
/// in the kernel (`bpf_get_socket_cookie`) and in user space, so there is no port/IP byte-order
/// encoding to get wrong, and IPv4 and IPv6 share one key space.
pub const SOCKETS_MAP: &str = "ECHO_SOCKETS";
/// Upper bound on connections the kernel echoes at once; past it new connections are echoed in user
/// space.
pub const MAX_SOCKETS: u32 = 65_536;

/// Sockhash with no programs attached: a connection leaving [`SOCKETS_MAP`] is put here first, so
/// its psock (which a socket keeps while any sockmap holds it) and the skbs waiting in it survive.
/// The verdict also redirects through it, for an skb it handles while the socket moves.
pub const DETACHED_MAP: &str = "ECHO_DETACHED";

/// Hash of [`Connection`] by socket cookie. The control plane creates the entry before the socket
/// enters [`SOCKETS_MAP`] and deletes it when it is done with the connection; in between only the
/// kernel writes it.
pub const CONNECTIONS_MAP: &str = "ECHO_CONNECTIONS";

/// The most bytes the kernel lets wait for room in a connection's send queue (the send queue itself
/// is bounded by TCP, by the socket's send buffer).
pub const MAX_BACKLOG_BYTES: u64 = 1 << 20;
/// The most skbs that may wait: a small skb costs about a kilobyte of kernel memory whatever its
/// length, so bytes alone do not bound it.
pub const MAX_BACKLOG_SKBS: u32 = 1024;

/// The kernel's record of one echo connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    /// Bytes the verdict redirected back to the client. Before echoing, user space waits until TCP
    /// has taken all of them into the send queue.
    pub echoed_bytes: u64,
    /// skbs redirected since the verdict last saw nothing waiting: at least as many as wait now.
    pub waiting_skbs: u32,
    /// 1 once the verdict asked user space to detach the connection.
    pub detaching: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Connection {}

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
    /// skbs with data left to user space (a connection without a record, or a failed redirect).
    Passes = 2,
    /// Redirects the kernel refused; such skbs are passed to user space.
    RedirectFailures = 3,
    /// Connections the verdict asked user space to detach because their backlog was full.
    Detached = 4,
    /// Hand-off records the ring buffer had no room for (the verdict tries again on the next skb).
    HandoffsLost = 5,
}

impl Counter {
    pub const ALL: [Counter; 6] = [
        Counter::Messages,
        Counter::Bytes,
        Counter::Passes,
        Counter::RedirectFailures,
        Counter::Detached,
        Counter::HandoffsLost,
    ];
    /// Number of slots in [`COUNTERS_MAP`].
    pub const COUNT: u32 = Self::ALL.len() as u32;
}
