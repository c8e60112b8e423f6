//! Idle keep-alive connections, held without a work item.
//!
//! A work item waiting for its connection's next request costs the server more than the
//! connection itself: its future, the task that runs it and tokio's registration of the socket
//! (1,572 bytes per idle connection, `cargo xtask bench memory`). So a connection that waits
//! between requests leaves its work item and waits here, the way nginx keeps its idle keep-alive
//! connections: its socket and state machine in a map (280 bytes), its fd in an epoll set of our
//! own (one-shot, readable). When bytes (or the client's FIN, or a reset) arrive, the loop
//! serves it at once as far as it goes without waiting — as the accept loop does a new
//! connection — and a connection that then has to wait gets a work item (or, still new, parks
//! again).
//!
//! Who parks (`HttpService::wait` and the work item, `super::executor`): a connection answered at
//! accept that then waits, at once (most such never need a work item: one request, a
//! preconnect); any other after [`PARK_AFTER`](super::connection::PARK_AFTER) of silence, checked
//! again every [`PARK_RECHECK`](super::connection::PARK_RECHECK) while it is busy — so a busy
//! connection keeps its work item and the keep-alive path pays nothing for this. Parking and waking
//! cost four epoll_ctl calls. Not a connection in the sockhash: the kernel's answers wake its
//! readers.
//!
//! One loop ([`IdleConnections::run`]) wakes for those and checks the idle timeout lazily: each
//! connection has a due time (when it would have been silent for the timeout), and only a
//! connection whose due time has come has its silence read (TCP_INFO) — at most
//! [`CHECK_EVERY`] late. Shutdown closes them (a connection waiting between requests owes
//! nothing), answering first those whose next request has just arrived.

use std::{
    collections::HashMap,
    mem::MaybeUninit,
    net::TcpStream,
    os::fd::{AsRawFd, OwnedFd},
    sync::Mutex,
    time::{Duration, Instant},
};

use log::warn;
use rustix::event::epoll;
use tokio::io::unix::AsyncFd;

use super::connection::{Connection, Deadline};
use crate::{
    fd::{async_readable, silence, unread_bytes},
    shutdown::Shutdown,
};

/// The longest a parked connection's idle timeout may pass unnoticed.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Readiness events taken per epoll_wait.
const EVENTS: usize = 256;

pub struct IdleConnections {
    /// One-shot readable interest in every parked socket, keyed by its token.
    epoll: AsyncFd<OwnedFd>,
    state: Mutex<State>,
    /// Wakes the loop when a connection parks on an empty list (its due time is then the first).
    first_parked: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    /// Boxed: the map's spare capacity then costs a pointer per slot, not a connection.
    parked: HashMap<u64, Box<Idle>>,
    next_token: u64,
    /// Nothing parks any more: the loop has ended.
    closed: Option<Closed>,
}

/// Why the loop ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closed {
    /// Shutdown: a connection that would park closes instead.
    Shutdown,
    /// The epoll set failed: connections keep their work items.
    Failed,
}

/// A parked connection.
struct Idle {
    stream: TcpStream,
    connection: Connection,
    /// When its idle timeout is next checked.
    due: Instant,
}

impl IdleConnections {
    /// Needs a tokio runtime (the epoll set is registered with it).
    pub fn new() -> std::io::Result<IdleConnections> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        Ok(IdleConnections {
            epoll: async_readable(epoll)?,
            state: Mutex::default(),
            first_parked: tokio::sync::Notify::new(),
        })
    }

    /// Whether connections may park (the loop runs).
    pub fn is_open(&self) -> bool {
        self.state.lock().unwrap().closed.is_none()
    }

    /// Connections parked now.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap().parked.len()
    }

    /// Parks a connection that waits to read between requests (a [`Deadline::Silence`], and
    /// [`Connection::parkable`]) and has been `silent` so far. After shutdown it is dropped, which
    /// closes it. Gives it back if it is not such a connection or cannot be watched (the caller
    /// keeps serving it).
    #[allow(clippy::result_large_err)] // the connection itself, given back on a rare path
    pub(super) fn park(
        &self,
        stream: TcpStream,
        mut connection: Connection,
        silent: Duration,
    ) -> Result<(), (TcpStream, Connection)> {
        let quiet = match connection.deadline() {
            Deadline::Silence(quiet) if connection.parkable() => quiet,
            _ => return Err((stream, connection)),
        };
        let due = Instant::now() + quiet.saturating_sub(silent);
        let mut state = self.state.lock().unwrap();
        match state.closed {
            None => {}
            Some(Closed::Shutdown) => {
                drop(state);
                return Ok(());
            }
            Some(Closed::Failed) => {
                drop(state);
                return Err((stream, connection));
            }
        }
        let token = state.next_token;
        // Watched before it is in the map, under the lock: the loop takes the lock before it
        // looks a token up, so it always finds the connection.
        let watched = epoll::add(
            self.epoll.get_ref(),
            &stream,
            epoll::EventData::new_u64(token),
            epoll::EventFlags::IN | epoll::EventFlags::ONESHOT,
        );
        if let Err(e) = watched {
            drop(state);
            warn!("http: cannot park an idle connection ({e}); it keeps its work item");
            return Err((stream, connection));
        }
        state.next_token += 1;
        if state.parked.is_empty() {
            self.first_parked.notify_one();
        }
        let idle = Idle {
            stream,
            connection,
            due,
        };
        state.parked.insert(token, Box::new(idle));
        Ok(())
    }

    /// Until shutdown: hands every parked connection that becomes readable, or whose idle
    /// timeout passed (told so: [`Connection::deadline_passed`]), to `resume`, which serves it
    /// in a work item.
    pub async fn run(&self, resume: impl Fn(TcpStream, Connection), mut shutdown: Shutdown) {
        let mut check_at = Instant::now() + CHECK_EVERY;
        let closed = loop {
            let woken = tokio::select! {
                ready = self.epoll.readable() => match ready {
                    Ok(mut guard) => match self.take_ready() {
                        Ok((woken, drained)) => {
                            if drained {
                                guard.clear_ready();
                            }
                            woken
                        }
                        Err(e) => {
                            warn!("http: epoll_wait on idle connections failed ({e}); idle connections keep their work items from now on");
                            break Closed::Failed;
                        }
                    },
                    Err(e) => {
                        warn!("http: idle connections cannot be watched ({e}); they keep their work items from now on");
                        break Closed::Failed;
                    }
                },
                () = tokio::time::sleep_until(check_at.into()) => {
                    let (timed_out, first_due) = self.take_timed_out();
                    check_at = first_due.min(Instant::now() + CHECK_EVERY);
                    timed_out
                }
                () = self.first_parked.notified() => {
                    check_at = check_at.min(self.first_due());
                    Vec::new()
                }
                () = shutdown.recv() => break Closed::Shutdown,
            };
            for idle in woken {
                let Idle {
                    stream, connection, ..
                } = idle;
                // It may park again: epoll_ctl(ADD) would fail on a socket still in the set.
                let _ = epoll::delete(self.epoll.get_ref(), &stream);
                resume(stream, connection);
            }
        };
        let parked = {
            let mut state = self.state.lock().unwrap();
            state.closed = Some(closed);
            std::mem::take(&mut state.parked)
        };
        // At shutdown as a work item would: a request that has arrived is answered before the
        // connection closes (closing with unread bytes would send a reset); the others close
        // now. After a failure every one is served on (`resume` gives it a work item).
        for (_, idle) in parked {
            let Idle {
                stream, connection, ..
            } = *idle;
            let _ = epoll::delete(self.epoll.get_ref(), &stream);
            if closed == Closed::Failed || unread_bytes(stream.as_raw_fd()).is_ok_and(|n| n > 0) {
                resume(stream, connection);
            }
        }
    }

    /// The connections that became readable, and whether that was all of them (else the set
    /// stays ready).
    fn take_ready(&self) -> rustix::io::Result<(Vec<Idle>, bool)> {
        let mut events = [MaybeUninit::<epoll::Event>::uninit(); EVENTS];
        let zero = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let (ready, _) = match epoll::wait(self.epoll.get_ref(), &mut events, Some(&zero)) {
            Err(rustix::io::Errno::INTR) => return Ok((Vec::new(), false)),
            waited => waited?,
        };
        let drained = ready.len() < EVENTS;
        let mut state = self.state.lock().unwrap();
        let woken = ready
            .iter()
            .filter_map(|event| state.parked.remove(&event.data.u64()))
            .map(|idle| *idle)
            .collect();
        Ok((woken, drained))
    }

    /// The connections whose idle timeout passed (told so), and the first due time of those that
    /// stay.
    fn take_timed_out(&self) -> (Vec<Idle>, Instant) {
        let now = Instant::now();
        let mut first_due = now + CHECK_EVERY;
        let mut state = self.state.lock().unwrap();
        let mut timed_out: Vec<Idle> = state
            .parked
            .extract_if(|_, idle| {
                if idle.due <= now {
                    let Deadline::Silence(quiet) = idle.connection.deadline() else {
                        unreachable!("only connections waiting between requests park")
                    };
                    let silent = silence(idle.stream.as_raw_fd());
                    if silent >= quiet {
                        return true;
                    }
                    idle.due = now + (quiet - silent);
                }
                first_due = first_due.min(idle.due);
                false
            })
            .map(|(_, idle)| *idle)
            .collect();
        drop(state);
        for idle in &mut timed_out {
            idle.connection.deadline_passed();
        }
        (timed_out, first_due)
    }

    fn first_due(&self) -> Instant {
        let state = self.state.lock().unwrap();
        let later = Instant::now() + CHECK_EVERY;
        state
            .parked
            .values()
            .map(|idle| idle.due)
            .min()
            .unwrap_or(later)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parked connection costs its entry here (the map's slot is a pointer): keep it within
    /// budget. 280 bytes when parking came (`cargo xtask bench memory`: 325 bytes of RSS per idle
    /// connection, against 1,572 with a work item each).
    #[test]
    fn a_parked_connection_is_small() {
        assert!(size_of::<Idle>() <= 320, "{}", size_of::<Idle>());
    }
}
