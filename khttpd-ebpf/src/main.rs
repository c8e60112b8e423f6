//! khttpd's in-kernel data path: the echo service ([`echo`]) and the HTTP fast path ([`http`]).
#![no_std]
#![no_main]
// `atomic_xadd`: core's atomics have no read-modify-write operations on the BPF target.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod echo;
mod http;
mod tcp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
