//! What TCP says about the server's side of a connection, read by both verdicts: the HTTP verdict
//! to keep its answers in order behind user space's, the echo verdict to bound what waits for a
//! client that does not read. And the socket's cookie, for the HTTP sk_msg program.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock},
    helpers::{bpf_probe_read_kernel, bpf_skc_to_tcp_sock},
};
use khttpd_common::TcpOffsets;

/// Where the verdicts find what they read in `struct tcp_sock` (set at load time).
#[unsafe(no_mangle)]
static TCP_OFFSETS: TcpOffsets = TcpOffsets {
    bytes_acked: 0,
    write_seq: 0,
    snd_una: 0,
    sk_cookie: 0,
};

pub struct TcpCounts {
    /// Bytes the client acknowledged (`tcp_sock.bytes_acked`).
    pub acked: u64,
    /// Bytes ever queued for sending: acknowledged ones plus `write_seq - snd_una`.
    pub queued: u64,
}

/// `None` when the offsets are unknown or the socket cannot be read.
pub fn tcp_counts(skb: *mut __sk_buff) -> Option<TcpCounts> {
    // SAFETY: a global the loader fills in; volatile so it is not folded to its initial zeros.
    let offsets = unsafe { read_volatile(&TCP_OFFSETS) };
    if offsets.bytes_acked == 0 || offsets.write_seq == 0 || offsets.snd_una == 0 {
        return None;
    }
    // SAFETY: the socket pointer comes from the context.
    let field = tcp_sock(unsafe { (*skb).__bindgen_anon_2.sk })?;
    // SAFETY: the reads go through bpf_probe_read_kernel, which cannot fault.
    unsafe {
        let acked: u64 = bpf_probe_read_kernel(field(offsets.bytes_acked).cast()).ok()?;
        let write_seq: u32 = bpf_probe_read_kernel(field(offsets.write_seq).cast()).ok()?;
        let snd_una: u32 = bpf_probe_read_kernel(field(offsets.snd_una).cast()).ok()?;
        Some(TcpCounts {
            acked,
            queued: acked + u64::from(write_seq.wrapping_sub(snd_una)),
        })
    }
}

/// The socket's cookie (what `bpf_get_socket_cookie` returns), read from `struct sock_common`;
/// `None` when its offset is unknown or the socket cannot be read.
pub fn socket_cookie(sk: *mut bpf_sock) -> Option<u64> {
    // SAFETY: a global the loader fills in, read as above.
    let offset = unsafe { read_volatile(&TCP_OFFSETS) }.sk_cookie;
    if offset == 0 {
        return None;
    }
    let field = tcp_sock(sk)?;
    // SAFETY: read through bpf_probe_read_kernel, which cannot fault.
    unsafe { bpf_probe_read_kernel(field(offset).cast::<u64>()).ok() }
}

/// The address of the field at a byte offset in `sk`'s `struct tcp_sock` (which starts with
/// `struct sock_common`), for `bpf_probe_read_kernel`; `None` if `sk` is not a TCP socket.
fn tcp_sock(sk: *mut bpf_sock) -> Option<impl Fn(u32) -> *const u8> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper checks the pointer it is given.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) }.cast::<u8>();
    if tcp.is_null() {
        return None;
    }
    Some(move |offset: u32| tcp.wrapping_add(offset as usize).cast_const())
}
