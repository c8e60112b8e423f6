//! The one home of raw system calls: safe wrappers for what rustix, nix and socket2 do not offer
//! (bpf(2) commands aya has no call for, SO_COOKIE / SO_MEMINFO / TCP_INFO / SO_RCVLOWAT,
//! SIOCOUTQ, a `MSG_TRUNC` peek), and registering foreign fds with tokio. Elsewhere `libc` is
//! used for constants only.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use tokio::io::{unix::AsyncFd, Interest};

/// Registers an owned fd (listener, BPF ring buffer) with tokio for readability.
pub fn async_readable<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    register(inner, Interest::READABLE)
}

/// Registers an owned fd (a connection) with tokio for `interest`.
pub fn register<T: AsRawFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd, which stays open and the same for as long as the AsyncFd holds it.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|e| e.into_parts().1)
}

/// bpf(2) for the commands aya offers no call for; on success the fd the kernel returned, if the
/// command returns one (as BPF_PROG_LOAD does), else `None` (BPF_MAP_LOOKUP_ELEM returns 0).
///
/// # Safety
/// `attr` must be the leading fields of `union bpf_attr` for `cmd`; pointers in it must point at
/// memory valid for what the command reads or writes.
pub unsafe fn bpf<T>(cmd: u32, attr: &T) -> io::Result<Option<OwnedFd>> {
    // SAFETY: the caller's promise; the size passed is that of `T`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            libc::c_long::from(cmd),
            std::ptr::from_ref(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    match ret {
        ret if ret < 0 => Err(io::Error::last_os_error()),
        // SAFETY: a positive return of these commands is a new fd, ours to close.
        ret if ret > 0 => Ok(Some(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })),
        _ => Ok(None),
    }
}

fn cvt(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// SIOCOUTQ: bytes in the socket's send queue not yet acknowledged (sent or not).
pub fn unsent_bytes(fd: RawFd) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
    cvt(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) })?;
    Ok(outq as u64)
}

/// SO_COOKIE: the number `bpf_get_socket_cookie` returns for this socket in the kernel.
pub fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// SO_MEMINFO: the socket's memory counters, indexed by libc's `SK_MEMINFO_*` constants (the
/// kernel fills as many as it has, nine on 6.x).
pub fn meminfo(fd: RawFd) -> io::Result<[u32; 9]> {
    getsockopt(fd, libc::SOL_SOCKET, libc::SO_MEMINFO)
}

/// `tcpi_state` values (include/net/tcp_states.h): closed or reset, and the peer's FIN received.
pub const TCP_CLOSE: u8 = 7;
pub const TCP_CLOSE_WAIT: u8 = 8;

pub fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
    getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// How long the socket has received nothing (forever if it cannot say). TCP_INFO counts every
/// byte received, also those the kernel path answered without user space seeing them.
pub fn silence(fd: RawFd) -> Duration {
    tcp_info(fd).map_or(Duration::MAX, |info| {
        Duration::from_millis(info.tcpi_last_data_recv.into())
    })
}

/// Whether the socket received nothing for `idle` (see [`silence`]).
pub fn silent_for(fd: RawFd, idle: Duration) -> bool {
    silence(fd) >= idle
}

/// Bytes waiting in the socket's receive queue, counted without copying or consuming them
/// (`MSG_PEEK | MSG_TRUNC`: TCP then returns the length it would have copied).
pub fn unread_bytes(fd: RawFd) -> io::Result<u64> {
    // SAFETY: with MSG_TRUNC the kernel copies nothing into the (null) buffer.
    let n = unsafe {
        libc::recv(
            fd,
            std::ptr::null_mut(),
            1 << 30,
            libc::MSG_PEEK | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n >= 0 => Ok(n as u64),
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            e => Err(e),
        },
    }
}

/// SO_RCVLOWAT: how many unread bytes TCP waits for before it wakes the socket's reader (its
/// `sk_data_ready`, which for a socket in a sockhash runs the stream verdict). TCP caps it at half
/// the receive buffer once that is fixed ([`fix_receive_buffer`]), else at half of `tcp_rmem[2]`,
/// growing the buffer to match.
pub fn set_receive_low_water(fd: RawFd, bytes: i32) -> io::Result<()> {
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Fixes the receive buffer at the size TCP's autotuning has given it so far (SO_RCVBUF, which
/// the kernel doubles, so half of what SO_RCVBUF reads).
pub fn fix_receive_buffer(fd: RawFd) -> io::Result<()> {
    let size: i32 = getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF)?;
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, size / 2)
}

fn setsockopt<T: Copy>(fd: RawFd, level: i32, name: i32, value: T) -> io::Result<()> {
    // SAFETY: passes a valid `T` of the size given.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn getsockopt<T: Copy>(fd: RawFd, level: i32, name: i32) -> io::Result<T> {
    let mut value = std::mem::MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` has room for `len` bytes; the kernel writes at most that many.
    cvt(unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) })?;
    // SAFETY: zero-initialised plain data (integers only), partly overwritten by the kernel.
    Ok(unsafe { value.assume_init() })
}
