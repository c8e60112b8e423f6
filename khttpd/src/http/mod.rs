//! The HTTP/1.x service on `--port`. With the fast path on, a connection starts in the kernel
//! ([`kernel`]), which answers the requests user space has taught it and hands the connection back
//! here at the first byte it does not answer; without it, every connection is served here.
//!
//! Two dispatch modes serve a connection with the same [`session::Session`], so they send the
//! same bytes:
//! - `cmwq` (default): one work item per connection on the unbound work queue (khttpd after its
//!   move to CMWQ);
//! - `thread`: one OS thread per connection with blocking I/O (the original kthread khttpd).
//!
//! Closing is always a FIN after the last response is written, followed by reading until the
//! client closes (bounded): closing with unread bytes would make the kernel send a reset instead.

pub mod kernel;
pub mod response;
pub mod session;

use std::{
    io::{Read as _, Write as _},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use log::{debug, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::broadcast,
};

use crate::{fd::into_tokio, shutdown::Shutdown, workqueue::WorkQueue};
use kernel::KernelHttp;
use session::{Next, Session};

/// Bytes read per system call.
const READ_CHUNK: usize = 8 * 1024;
/// How long a closing connection waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes read (and dropped) while lingering.
const LINGER_BYTES: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dispatch {
    /// One work item per connection on the unbound work queue.
    Cmwq,
    /// One OS thread per connection, blocking I/O.
    Thread,
}

impl Dispatch {
    pub fn as_str(self) -> &'static str {
        match self {
            Dispatch::Cmwq => "cmwq",
            Dispatch::Thread => "thread",
        }
    }
}

pub struct HttpService {
    pub queue: Arc<WorkQueue>,
    pub dispatch: Dispatch,
    pub kernel: Option<KernelHttp>,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections the kernel handed to user space.
    pub handoffs: AtomicU64,
    notify_shutdown: broadcast::Sender<()>,
}

impl HttpService {
    pub fn new(
        queue: Arc<WorkQueue>,
        dispatch: Dispatch,
        kernel: Option<KernelHttp>,
        notify_shutdown: broadcast::Sender<()>,
    ) -> Arc<Self> {
        Arc::new(HttpService {
            queue,
            dispatch,
            kernel,
            connections: AtomicU64::new(0),
            handoffs: AtomicU64::new(0),
            notify_shutdown,
        })
    }

    /// Serves one accepted connection: in the kernel when it can be installed there.
    pub fn dispatch(self: &Arc<Self>, stream: std::net::TcpStream) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let stream = match &self.kernel {
            Some(kernel) => match kernel.install(stream) {
                Ok(()) => return,
                Err(stream) => stream,
            },
            None => stream,
        };
        self.serve_in_user_space(stream, None);
    }

    /// `cookie` names the kernel state to delete when the connection ends, if it has any.
    fn serve_in_user_space(self: &Arc<Self>, stream: std::net::TcpStream, cookie: Option<u64>) {
        let connection = UserConnection {
            service: Arc::clone(self),
            cookie,
        };
        match self.dispatch {
            Dispatch::Cmwq => {
                let shutdown = Shutdown::new(self.notify_shutdown.subscribe());
                if self
                    .queue
                    .queue_work(serve_async(stream, connection, shutdown))
                    .is_err()
                {
                    debug!("http: shutting down, connection dropped");
                }
            }
            Dispatch::Thread => {
                let spawned = std::thread::Builder::new()
                    .name("khttpd-conn".into())
                    .spawn(move || serve_blocking(stream, connection));
                if let Err(e) = spawned {
                    debug!("http: cannot start a connection thread: {e}");
                }
            }
        }
    }

    /// Serves in user space the connections the kernel hands back, until shutdown.
    pub async fn handoff_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        let Some(kernel) = &self.kernel else { return };
        loop {
            let cookie = tokio::select! {
                cookie = kernel.next_handoff() => cookie,
                () = shutdown.recv() => return,
            };
            let cookie = match cookie {
                Ok(cookie) => cookie,
                Err(e) => {
                    warn!("http: cannot read kernel hand-offs: {e}");
                    return;
                }
            };
            // Waiting for the kernel's responses to leave must not hold up other hand-offs.
            let service = Arc::clone(&self);
            tokio::spawn(async move {
                let Some(kernel) = &service.kernel else { return };
                match kernel.take_back(cookie).await {
                    Some(stream) => {
                        service.handoffs.fetch_add(1, Ordering::Relaxed);
                        service.serve_in_user_space(stream, Some(cookie));
                    }
                    None => kernel.forget(cookie),
                }
            });
        }
    }

    /// Keeps the kernel's `Date` current: refreshed just after each second starts.
    pub async fn date_loop(self: Arc<Self>, mut shutdown: Shutdown) {
        let Some(kernel) = &self.kernel else { return };
        loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let next_second = Duration::from_secs(1) - Duration::from_nanos(now.subsec_nanos().into());
            tokio::select! {
                () = tokio::time::sleep(next_second + Duration::from_millis(1)) => {}
                () = shutdown.recv() => return,
            }
            if let Err(e) = kernel.refresh_date() {
                warn!("http: cannot refresh the kernel's Date: {e}");
            }
        }
    }

    pub async fn stop(&self) {
        if let Some(kernel) = &self.kernel {
            kernel.stop();
        }
        self.queue.destroy().await;
    }
}

/// A connection served in user space: teaches the kernel what it answers, and deletes the
/// kernel's state of the connection when it ends.
struct UserConnection {
    service: Arc<HttpService>,
    cookie: Option<u64>,
}

impl UserConnection {
    fn session(&self) -> Session {
        if self.service.kernel.is_some() {
            Session::learning()
        } else {
            Session::new()
        }
    }

    fn learn(&self, session: &mut Session) {
        if let Some(kernel) = &self.service.kernel {
            kernel.learn(&session.take_learned());
        }
    }
}

impl Drop for UserConnection {
    fn drop(&mut self) {
        if let (Some(kernel), Some(cookie)) = (&self.service.kernel, self.cookie) {
            kernel.forget(cookie);
        }
    }
}

/// The `cmwq` work item.
async fn serve_async(
    stream: std::net::TcpStream,
    connection: UserConnection,
    mut shutdown: Shutdown,
) {
    let Ok(mut stream) = into_tokio(stream) else {
        return;
    };
    let mut session = connection.session();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    loop {
        let n = tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            () = shutdown.recv() => return,
        };
        let next = session.receive(&buf[..n], &mut out);
        connection.learn(&mut session);
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if next == Next::Close {
            let _ = stream.shutdown().await;
            let drain = async {
                let mut dropped = 0;
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    dropped += n;
                    if dropped > LINGER_BYTES {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
            return;
        }
    }
}

/// The `thread` connection: the same session, blocking I/O (accepted sockets start blocking).
fn serve_blocking(mut stream: std::net::TcpStream, connection: UserConnection) {
    let mut session = connection.session();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let next = session.receive(&buf[..n], &mut out);
        connection.learn(&mut session);
        if !out.is_empty() {
            if stream.write_all(&out).is_err() {
                return;
            }
            out.clear();
        }
        if next == Next::Close {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = stream.set_read_timeout(Some(LINGER));
            let mut dropped = 0;
            while let Ok(n @ 1..) = stream.read(&mut buf) {
                dropped += n;
                if dropped > LINGER_BYTES {
                    break;
                }
            }
            return;
        }
    }
}
