//! Graceful shutdown, the mini-redis way: one channel announces it, every long-lived task holds a
//! [`Shutdown`] and returns when it fires.
//!
//! The channel is a `watch` holding "shutting down?", not a broadcast: a connection accepted in
//! the instant of shutdown subscribes after the announcement, and a broadcast receiver made then
//! would never hear it (the work item would wait for its idle timeout, holding the exit up; seen
//! as a flaky `khttpd ignored SIGTERM` in faults.rs). A watch receiver sees the value whenever it
//! was made.

use tokio::sync::watch;

/// Announces the shutdown: `send_replace(true)`.
pub type Notify = watch::Sender<bool>;

/// A new announcer, nothing announced yet.
pub fn notify() -> Notify {
    watch::Sender::new(false)
}

/// Listens for the server's shutdown signal.
#[derive(Debug)]
pub struct Shutdown {
    notify: watch::Receiver<bool>,
}

impl Shutdown {
    pub fn new(notify: &Notify) -> Shutdown {
        Shutdown {
            notify: notify.subscribe(),
        }
    }

    /// Waits for the shutdown notice; returns at once if it was announced already, also before
    /// this listener existed. A closed channel means shutdown too.
    pub async fn recv(&mut self) {
        let _ = self.notify.wait_for(|&shutting_down| shutting_down).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn heard(listener: &mut Shutdown) {
        tokio::time::timeout(Duration::from_secs(1), listener.recv())
            .await
            .expect("the shutdown is heard");
    }

    #[test]
    fn listeners_made_before_or_after_the_announcement_hear_it() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let notify = notify();
            let mut early = Shutdown::new(&notify);
            let quiet = tokio::time::timeout(Duration::from_millis(20), early.recv()).await;
            assert!(quiet.is_err(), "nothing announced yet");
            notify.send_replace(true);
            // A connection accepted in the instant of shutdown subscribes now.
            let mut late = Shutdown::new(&notify);
            heard(&mut early).await;
            heard(&mut late).await;
            // Asked again, it returns at once again.
            heard(&mut late).await;
        });
    }
}
