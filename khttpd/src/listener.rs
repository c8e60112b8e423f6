//! Listening sockets bound to one network interface: every address the interface has, each socket
//! also tied to the device with SO_BINDTODEVICE so it only accepts traffic that arrived there.

use std::{
    ffi::CStr,
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream},
    time::Duration,
};

use log::{debug, warn};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{fd::async_readable, shutdown::Shutdown};

#[derive(Debug)]
pub enum ListenError {
    UnknownInterface { name: String, known: Vec<String> },
    NoAddress { name: String },
    Interfaces(io::Error),
    Bind { addr: SocketAddr, source: io::Error },
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::UnknownInterface { name, known } => {
                write!(
                    f,
                    "unknown interface `{name}`; interfaces: {}",
                    known.join(", ")
                )
            }
            ListenError::NoAddress { name } => write!(f, "interface `{name}` has no IP address"),
            ListenError::Interfaces(e) => write!(f, "cannot list network interfaces: {e}"),
            ListenError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
        }
    }
}

impl std::error::Error for ListenError {}

/// Binds a non-blocking listener on `port` for every address of `iface`.
pub fn bind(iface: &str, port: u16, backlog: i32) -> Result<Vec<TcpListener>, ListenError> {
    let interfaces = interfaces().map_err(ListenError::Interfaces)?;
    let Some((_, addrs)) = interfaces.iter().find(|(name, _)| name == iface) else {
        return Err(ListenError::UnknownInterface {
            name: iface.to_owned(),
            known: interfaces.into_iter().map(|(name, _)| name).collect(),
        });
    };
    if addrs.is_empty() {
        return Err(ListenError::NoAddress {
            name: iface.to_owned(),
        });
    }
    addrs
        .iter()
        .map(|&addr| {
            let addr = match addr {
                SocketAddr::V4(a) => SocketAddr::new(IpAddr::V4(*a.ip()), port),
                SocketAddr::V6(a) => {
                    SocketAddr::V6(SocketAddrV6::new(*a.ip(), port, 0, a.scope_id()))
                }
            };
            listen(iface, addr, backlog).map_err(|source| ListenError::Bind { addr, source })
        })
        .collect()
}

fn listen(iface: &str, addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind_device(Some(iface.as_bytes()))?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Every interface with its addresses (port 0; IPv6 link-local ones carry their scope), in the
/// order getifaddrs lists them.
pub fn interfaces() -> io::Result<Vec<(String, Vec<SocketAddr>)>> {
    let mut list: Vec<(String, Vec<SocketAddr>)> = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` walks the list getifaddrs returned; each node and its name are valid
        // until freeifaddrs.
        let ifa = unsafe { &*cursor };
        cursor = ifa.ifa_next;
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        let index = list
            .iter()
            .position(|(n, _)| *n == name)
            .unwrap_or_else(|| {
                list.push((name, Vec::new()));
                list.len() - 1
            });
        // SAFETY: the address's family says which sockaddr type it points to.
        if let Some(addr) = unsafe { socket_addr(ifa.ifa_addr) } {
            list[index].1.push(addr);
        }
    }
    // SAFETY: `head` came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(list)
}

unsafe fn socket_addr(addr: *const libc::sockaddr) -> Option<SocketAddr> {
    if addr.is_null() {
        return None;
    }
    match i32::from(unsafe { (*addr).sa_family }) {
        libc::AF_INET => {
            let sin = unsafe { &*addr.cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), 0))
        }
        libc::AF_INET6 => {
            let sin6 = unsafe { &*addr.cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                0,
                0,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Accepts connections until shutdown and hands each (non-blocking, not registered with tokio) to
/// `dispatch`. The accept queue is drained on every wake-up: one epoll event, many connections.
/// `accept4` makes them non-blocking (and close-on-exec) in the same call.
pub async fn accept_loop(
    listener: TcpListener,
    mut shutdown: Shutdown,
    service: &'static str,
    mut dispatch: impl FnMut(TcpStream),
) {
    let listener = match async_readable(listener) {
        Ok(listener) => listener,
        Err(e) => return warn!("{service}: cannot poll the listener: {e}"),
    };
    // Out-of-descriptor warnings: the first, then one per interval with how many were held back.
    let mut starved = Starved::default();
    loop {
        let mut ready = tokio::select! {
            ready = listener.readable() => match ready {
                Ok(ready) => ready,
                Err(e) => return warn!("{service}: listener failed: {e}"),
            },
            () = shutdown.recv() => return,
        };
        loop {
            let accepted = socket2::SockRef::from(ready.get_inner())
                .accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
            match accepted {
                Ok((stream, peer)) => {
                    debug!("{service}: accepted {:?}", peer.as_socket());
                    dispatch(TcpStream::from(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    // Out of descriptors or memory: back off instead of spinning; the backlog
                    // holds the waiting clients.
                    starved.warn(service, &e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
                Err(e) => debug!("{service}: accept failed: {e}"),
            }
        }
    }
}

/// Rate limit for the accept loop's "out of descriptors" warning, which would otherwise repeat ten
/// times a second for as long as the limit is reached.
#[derive(Default)]
struct Starved {
    last: Option<std::time::Instant>,
    held_back: u64,
}

impl Starved {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn warn(&mut self, service: &str, error: &io::Error) {
        let now = std::time::Instant::now();
        if self.last.is_some_and(|last| now - last < Starved::INTERVAL) {
            self.held_back += 1;
            return;
        }
        let repeats = match self.held_back {
            0 => String::new(),
            n => format!(" ({n} more times since the last warning)"),
        };
        warn!("{service}: accept failed: {error}; new connections wait in the backlog, retrying every 100 ms{repeats}");
        self.last = Some(now);
        self.held_back = 0;
    }
}
