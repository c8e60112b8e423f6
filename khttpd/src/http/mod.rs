//! The HTTP/1.x service on `--port`: user space's answer to every request (the kernel fast path,
//! a later step, will answer the ones it can answer exactly and pass the rest here).
//!
//! Two dispatch modes serve a connection with the same [`session::Session`], so they send the
//! same bytes:
//! - `cmwq` (default): one work item per connection on the unbound work queue (khttpd after its
//!   move to CMWQ);
//! - `thread`: one OS thread per connection with blocking I/O (the original kthread khttpd).
//!
//! Closing is always a FIN after the last response is written, followed by reading until the
//! client closes (bounded): closing with unread bytes would make the kernel send a reset instead.

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

use log::debug;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::broadcast,
};

use crate::{fd::into_tokio, shutdown::Shutdown, workqueue::WorkQueue};
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
    pub connections: AtomicU64,
    notify_shutdown: broadcast::Sender<()>,
}

impl HttpService {
    pub fn new(
        queue: Arc<WorkQueue>,
        dispatch: Dispatch,
        notify_shutdown: broadcast::Sender<()>,
    ) -> Arc<Self> {
        Arc::new(HttpService {
            queue,
            dispatch,
            connections: AtomicU64::new(0),
            notify_shutdown,
        })
    }

    /// Serves one accepted connection.
    pub fn dispatch(&self, stream: std::net::TcpStream) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        match self.dispatch {
            Dispatch::Cmwq => {
                let shutdown = Shutdown::new(self.notify_shutdown.subscribe());
                if self
                    .queue
                    .queue_work(serve_async(stream, shutdown))
                    .is_err()
                {
                    debug!("http: shutting down, connection dropped");
                }
            }
            Dispatch::Thread => {
                let spawned = std::thread::Builder::new()
                    .name("khttpd-conn".into())
                    .spawn(move || serve_blocking(stream));
                if let Err(e) = spawned {
                    debug!("http: cannot start a connection thread: {e}");
                }
            }
        }
    }

    pub async fn stop(&self) {
        self.queue.destroy().await;
    }
}

/// The `cmwq` work item.
async fn serve_async(stream: std::net::TcpStream, mut shutdown: Shutdown) {
    let Ok(mut stream) = into_tokio(stream) else {
        return;
    };
    let mut session = Session::new();
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
fn serve_blocking(mut stream: std::net::TcpStream) {
    let mut session = Session::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut out = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let next = session.receive(&buf[..n], &mut out);
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
