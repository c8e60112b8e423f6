//! Graceful shutdown, the mini-redis way: one broadcast channel announces it, every long-lived task
//! holds a [`Shutdown`] and returns when it fires.

use tokio::sync::broadcast;

/// Listens for the server's shutdown signal.
#[derive(Debug)]
pub struct Shutdown {
    is_shutdown: bool,
    notify: broadcast::Receiver<()>,
}

impl Shutdown {
    pub fn new(notify: broadcast::Receiver<()>) -> Shutdown {
        Shutdown {
            is_shutdown: false,
            notify,
        }
    }

    /// Waits for the shutdown notice; returns at once if it was already received.
    pub async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        // Only one value is ever sent; a lagged or closed channel means shutdown too.
        let _ = self.notify.recv().await;
        self.is_shutdown = true;
    }
}
