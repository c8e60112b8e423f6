//! Everything the eBPF programs and the control plane must agree on: map and program names, map
//! sizes, counter slots and the records the kernel sends to user space.
//!
//! It is `no_std` so the eBPF crate can use it; the `user` feature adds the `aya::Pod` impls the
//! control plane needs to read these types out of maps.
#![no_std]

pub mod echo;
