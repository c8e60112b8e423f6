//! Listening sockets bound to one network interface: every address the interface has, each socket
//! also tied to the device with SO_BINDTODEVICE so it only accepts traffic that arrived there.

use std::{
    fmt, io,
    net::{IpAddr, SocketAddr, SocketAddrV6, TcpListener, TcpStream},
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
    for ifa in nix::ifaddrs::getifaddrs()? {
        let index = list
            .iter()
            .position(|(name, _)| *name == ifa.interface_name)
            .unwrap_or_else(|| {
                list.push((ifa.interface_name.clone(), Vec::new()));
                list.len() - 1
            });
        let Some(addr) = ifa.address else { continue };
        if let Some(sin) = addr.as_sockaddr_in() {
            list[index].1.push(SocketAddr::new(IpAddr::V4(sin.ip()), 0));
        } else if let Some(sin6) = addr.as_sockaddr_in6() {
            list[index].1.push(SocketAddr::V6(SocketAddrV6::new(
                sin6.ip(),
                0,
                0,
                sin6.scope_id(),
            )));
        }
    }
    Ok(list)
}

/// Accepts connections until shutdown and hands each (non-blocking, not registered with tokio),
/// with its peer's address, to `dispatch`. The accept queue is drained on every wake-up: one epoll event, many connections.
/// `accept4` makes them non-blocking (and close-on-exec) in the same call.
pub async fn accept_loop(
    listener: TcpListener,
    mut shutdown: Shutdown,
    service: &'static str,
    mut dispatch: impl FnMut(TcpStream, Option<SocketAddr>),
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
                    let peer = peer.as_socket();
                    debug!("{service}: accepted {peer:?}");
                    dispatch(TcpStream::from(stream), peer);
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
