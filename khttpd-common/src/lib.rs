//! Everything the eBPF programs and the control plane must agree on: map and program names, map
//! sizes, counter slots and the records the kernel sends to user space.
//!
//! It is `no_std` so the eBPF crate can use it; the `user` feature adds the `aya::Pod` impls the
//! control plane needs to read these types out of maps.
#![cfg_attr(not(test), no_std)]

pub mod echo;
pub mod http;

/// Sent on a service's hand-off ring buffer when the kernel left data in a socket's receive queue:
/// user space must take the connection over, or the data would never be answered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handoff {
    pub cookie: u64,
}

/// In every log line about a socket that user space closed with memory still charged (the test
/// harness collects those lines for `cargo xtask leak-check`).
pub const CHARGED_AT_CLOSE: &str = "bytes of socket memory still charged";

/// The global holding [`TcpOffsets`], shared by both services' verdicts.
pub const TCP_OFFSETS_GLOBAL: &str = "TCP_OFFSETS";

/// Byte offsets of the `struct tcp_sock` fields the verdicts read. They differ between kernel
/// builds and aya-ebpf emits no CO-RE relocations, so the control plane finds them in the running
/// kernel's BTF and sets them at load time; 0 means unknown (the HTTP verdict then answers
/// nothing, the echo verdict hands every connection to user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOffsets {
    /// `u64 bytes_acked`: our bytes the client acknowledged.
    pub bytes_acked: u32,
    /// `u32 write_seq`: sequence number after the last byte queued for sending.
    pub write_seq: u32,
    /// `u32 snd_una`: first unacknowledged sequence number.
    pub snd_una: u32,
    /// `atomic64_t skc_cookie` of `struct sock_common`, which starts every socket: the socket's
    /// cookie, for the sk_msg program (which has no cookie helper).
    pub sk_cookie: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Handoff {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for TcpOffsets {}
