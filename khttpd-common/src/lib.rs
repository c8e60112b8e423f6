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

#[cfg(feature = "user")]
unsafe impl aya::Pod for Handoff {}
