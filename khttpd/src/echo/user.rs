//! The user-space echo work item: one per connection, like kecho's `echo_server_worker`. It also
//! takes over connections detached from the kernel path, once the kernel's echo is on its way.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use log::{debug, warn};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::{kernel::Detached, UserCounters};
use crate::{shutdown::Shutdown, socket_memory, sockmap::wait_until_queued};

/// How long a detached connection waits for a verdict running during the detach to finish
/// before it reads the kernel's count (see `Detached::lost_bytes`); also the pause between tries
/// while bytes are still arriving.
const DETACH_GRACE: Duration = Duration::from_millis(20);

/// Bytes read per system call. The buffer only exists while data is flowing, so an idle connection
/// costs its socket and a small future, not a buffer.
const CHUNK: usize = 16 * 1024;

/// Echoes until the client closes, an error, or shutdown. A connection `detached` from the kernel
/// path is echoed once everything the kernel echoed on it is in the send queue, so nothing
/// overtakes it; that waits for as long as the client does not read, as a blocked write would.
pub async fn echo(
    stream: std::net::TcpStream,
    detached: Option<Detached>,
    mut shutdown: Shutdown,
    counters: Arc<UserCounters>,
) {
    // Registering here, not in the acceptor, ties the socket to the runtime this work runs on
    // (a bound queue's per-CPU runtime). `listener::accept_loop` hands out non-blocking sockets.
    let mut stream = match tokio::net::TcpStream::from_std(stream) {
        Ok(stream) => stream,
        Err(e) => {
            debug!("echo: cannot register connection: {e}");
            return;
        }
    };
    let result = tokio::select! {
        result = async {
            if let Some(detached) = &detached {
                // Let an skb the kernel was handing to the verdict during the detach settle: after
                // that the kernel's count is final (should it still grow, `lost_bytes` sees bytes
                // it cannot account for, and the connection is reset rather than reordered).
                tokio::time::sleep(DETACH_GRACE).await;
                let owed = detached.kernel_echoed();
                if !wait_until_queued(stream.as_raw_fd(), owed, None).await {
                    return Ok(()); // closed meanwhile
                }
                let lost = loop {
                    match detached.lost_bytes(stream.as_raw_fd(), owed)? {
                        Some(lost) => break lost,
                        None => tokio::time::sleep(DETACH_GRACE).await,
                    }
                };
                if lost > 0 {
                    // Echoing on would send a stream with a hole: a reset says it plainly.
                    warn!(
                        "echo: {lost} bytes were lost as connection {} left the kernel path; \
                         resetting it",
                        detached.cookie()
                    );
                    return socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                }
            }
            echo_until_eof(&mut stream, &counters).await
        } => result,
        () = shutdown.recv() => Ok(()),
    };
    if let Err(e) = result {
        debug!("echo: connection ended: {e}");
    }
    if let Some(detached) = &detached {
        socket_memory::check(stream.as_raw_fd(), detached.cookie(), "echo");
    }
}

async fn echo_until_eof(stream: &mut TcpStream, counters: &UserCounters) -> io::Result<()> {
    loop {
        stream.readable().await?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stream.try_read(&mut buf) {
                Ok(0) => {
                    // The client is done sending; everything read was written back.
                    return stream.shutdown().await;
                }
                Ok(n) => {
                    stream.write_all(&buf[..n]).await?;
                    counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}
