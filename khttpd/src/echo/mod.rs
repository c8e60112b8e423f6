//! The echo service, kecho's twin: every byte a client sends comes back.
//!
//! A connection takes one of two paths, decided once when it is accepted:
//! - **kernel** ([`kernel`]): the socket goes into the echo sockhash, whose stream-verdict program
//!   sends each skb straight back; user space only waits for the connection to end.
//! - **user space** ([`user`]): the connection is one work item on the cmwq-style work queue, which
//!   reads and writes until the client closes (kecho's `echo_server_worker`).
//!
//! Connections fall back from the kernel path to user space when the sockhash is full, and move
//! there when the verdict asks: their client falls behind, and what waits for it in the kernel has
//! no other bound (see `khttpd_common::echo`).

pub mod kernel;
pub mod user;

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use log::{debug, warn};

use crate::{
    shutdown::{self, Shutdown},
    workqueue::WorkQueue,
};
use kernel::{Detached, KernelEcho};

/// Counters of the user-space side (the kernel keeps its own, see `KernelEcho::counters`).
#[derive(Default)]
pub struct UserCounters {
    pub bytes: AtomicU64,
    pub kernel_connections: AtomicU64,
    pub user_connections: AtomicU64,
}

pub struct EchoService {
    pub queue: Arc<WorkQueue>,
    pub kernel: Option<KernelEcho>,
    pub counters: Arc<UserCounters>,
    notify_shutdown: shutdown::Notify,
}

impl EchoService {
    pub fn new(
        queue: Arc<WorkQueue>,
        kernel: Option<KernelEcho>,
        notify_shutdown: shutdown::Notify,
    ) -> Arc<Self> {
        Arc::new(EchoService {
            queue,
            kernel,
            counters: Arc::default(),
            notify_shutdown,
        })
    }

    /// Serves one accepted connection.
    pub fn dispatch(&self, stream: std::net::TcpStream) {
        let stream = match &self.kernel {
            Some(kernel) => match kernel.sockmap().install(stream) {
                Ok(()) => {
                    self.counters
                        .kernel_connections
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(stream) => stream,
            },
            None => stream,
        };
        self.serve_in_user_space(stream, None);
    }

    fn serve_in_user_space(&self, stream: std::net::TcpStream, detached: Option<Detached>) {
        self.counters
            .user_connections
            .fetch_add(1, Ordering::Relaxed);
        let shutdown = Shutdown::new(&self.notify_shutdown);
        let work = user::echo(stream, detached, shutdown, Arc::clone(&self.counters));
        if self.queue.queue_work(work).is_err() {
            debug!("echo: shutting down, connection dropped");
        }
    }

    /// Moves the connections the verdict hands back to user space, until shutdown.
    pub async fn handoff_loop(self: Arc<Self>, shutdown: Shutdown) {
        let Some(kernel) = &self.kernel else { return };
        kernel
            .sockmap()
            .serve_handoffs(shutdown, |cookie, stream| {
                match kernel.detach(cookie, &stream) {
                    Ok(detached) => {
                        debug!("echo: connection {cookie} falls behind; echoing it in user space");
                        self.serve_in_user_space(stream, Some(detached));
                    }
                    Err(e) => {
                        // Still in the echo sockhash: the kernel goes on echoing it.
                        warn!("echo: cannot move connection {cookie} to user space: {e}");
                        let _ = kernel.sockmap().park(cookie, stream);
                    }
                }
            })
            .await;
    }

    /// Closes every connection and drains the work queue.
    pub async fn stop(&self) {
        if let Some(kernel) = &self.kernel {
            kernel.sockmap().stop();
        }
        self.queue.destroy().await;
    }
}
