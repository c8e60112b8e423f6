//! Socket memory a kernel-path socket still has charged when it closes (issue 15).
//!
//! Why it exists: a skb the verdict passes while one of the kernel's own answers still waits in
//! the psock's queue is delivered by the psock's work item (`sk_psock_backlog` →
//! `sk_psock_skb_ingress_self` → `skb_set_owner_r` → `sk_mem_charge`), and that charge is a plain
//! read-modify-write of `sk_forward_alloc` made without the socket lock every other user of the
//! field holds. When it races with one of them (the socket's softirq taking a segment or an
//! acknowledgement, user space reading or writing), one update is lost and the socket's books are
//! off by that skb's size from then on. The kernel notices only at destruction, where what is left
//! over trips `WARN_ON_ONCE(sk_forward_alloc)` in `inet_sock_destruct` (once per boot, tainting the
//! kernel) and stays in TCP's memory total for good. docs/kernel-facts.md has the measurements.
//!
//! What user space can see: memory is charged to a socket in whole pages and given back byte by
//! byte, so on a socket whose books are right `sk_forward_alloc + sk_rmem_alloc + sk_wmem_queued`
//! is a multiple of the page size whenever no send is half done. [`check`] reads the three
//! (SO_MEMINFO) just before user space closes a socket that has been in a sockhash; a remainder is
//! what the kernel will still have charged once everything else is freed. Every such socket is
//! counted ([`closed_charged`], exported as `khttpd_sockets_closed_with_memory_charged_total`) and
//! logged with [`LOG_PHRASE`] in the line (the test harness collects those lines for
//! `cargo xtask leak-check`; no file is held open for it, the server may be confined to its
//! document root).

use std::{
    os::fd::RawFd,
    sync::atomic::{AtomicU64, Ordering},
};

use log::warn;

use crate::fd::{meminfo, socket_cookie};

/// In every log line about such a socket.
pub const LOG_PHRASE: &str = "bytes of socket memory still charged";

static CLOSED_CHARGED: AtomicU64 = AtomicU64::new(0);

/// Sockets closed so far with memory still charged.
pub fn closed_charged() -> u64 {
    CLOSED_CHARGED.load(Ordering::Relaxed)
}

/// Checks the books of connection `cookie` (socket `fd`, about to be closed by user space; `what`
/// names the service in the log line). Does nothing if `fd` is no longer that socket.
pub fn check(fd: RawFd, cookie: u64, what: &str) {
    if socket_cookie(fd).ok() != Some(cookie) {
        return;
    }
    let Some(left) = left_charged(fd) else {
        return;
    };
    CLOSED_CHARGED.fetch_add(1, Ordering::Relaxed);
    warn!(
        "{what}: connection {cookie} closes with {left} {LOG_PHRASE}: the kernel will never give \
         them back (a psock accounting race, see docs/kernel-facts.md)"
    );
}

/// The bytes the socket's books are off a page boundary, `None` when they balance (or cannot be
/// read steadily: the counters are read one by one, so two reads must agree).
fn left_charged(fd: RawFd) -> Option<u64> {
    let page = rustix::param::page_size() as i64;
    let off = |info: [u32; 9]| {
        let rmem = i64::from(info[libc::SK_MEMINFO_RMEM_ALLOC as usize]);
        // A signed int in the kernel: negative while charges run ahead of what was reserved.
        let forward = i64::from(info[libc::SK_MEMINFO_FWD_ALLOC as usize] as i32);
        let queued = i64::from(info[libc::SK_MEMINFO_WMEM_QUEUED as usize]);
        (rmem + forward + queued).rem_euclid(page)
    };
    for _ in 0..3 {
        let (Ok(first), Ok(second)) = (meminfo(fd), meminfo(fd)) else {
            return None;
        };
        if first == second {
            return match off(first) {
                0 => None,
                left => Some(left as u64),
            };
        }
    }
    None
}
