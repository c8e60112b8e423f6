//! The two executors of a [`Connection`]: they carry out its [`Action`]s on a socket and report
//! back. Everything but waiting is shared ([`perform`]); they differ in how they wait:
//! - [`answer_at_once`] + [`serve_async`] (`cmwq`): non-blocking calls; a new connection is
//!   first served right at accept, and only one that has to wait is registered with tokio and
//!   becomes a work item. A read that returned less than the buffer emptied the receive queue, so
//!   the next read waits for readiness instead of trying (and failing) first. One timer per
//!   connection, re-armed only when its deadline changes, and one shutdown listener. Between
//!   requests the timer first fires after [`PARK_AFTER`], then every [`PARK_RECHECK`] while the
//!   connection is busy; once it finds it quiet the work item ends and gives the connection back
//!   ([`WentIdle`]) for the idle list (`super::idle`).
//! - [`serve_blocking`] (`thread`): blocking calls, the read deadline as `SO_RCVTIMEO`.

use std::{
    future::Future as _,
    io::{self, Read as _, Write as _},
    os::fd::AsRawFd,
    task::Poll,
    time::{Duration, Instant},
};

use tokio::io::{unix::AsyncFdReadyGuard, Interest};

use super::{
    connection::{Action, Connection, Deadline, PARK_AFTER, PARK_RECHECK},
    site::FileBody,
};
use crate::{
    fd::{register, silence, unread_bytes},
    shutdown::Shutdown,
    socket_memory,
};

/// Bytes read per system call.
const READ_CHUNK: usize = 8 * 1024;

thread_local! {
    /// The work items' read buffer, one per runtime thread: a work item waits for readability
    /// without a buffer and reads only when bytes are there, so an idle keep-alive connection
    /// costs its socket and session, not 8 KiB more (measured: 10.7 KB per idle connection
    /// before, with `cargo xtask bench memory`).
    static READ_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK]);
}

/// How an action went.
enum Step {
    /// Done; ask for the next action.
    Done,
    /// The socket cannot take (or give) more now.
    WouldBlock,
    /// The connection is over: drop the socket.
    End,
}

/// Carries out the actions both executors do the same way (whether they wait is the socket's
/// blocking mode): everything but reading, the kernel's order and the hand-off.
/// `file_share`: the most file bytes one sendfile sends.
fn perform(
    stream: &std::net::TcpStream,
    connection: &mut Connection,
    action: Action,
    file_share: usize,
) -> Step {
    let result = match action {
        Action::Write => (&*stream)
            .write(connection.output())
            .map(|n| connection.wrote(n)),
        Action::SendFile => {
            send_file_once(stream, connection.file(), file_share).map(|n| connection.sent_file(n))
        }
        Action::CloseIfQuiet => {
            // Closing with an empty receive queue sends a FIN; with bytes in it, a reset.
            match unread_bytes(stream.as_raw_fd()) {
                Ok(0) => {
                    closing(stream, connection);
                    return Step::End;
                }
                _ => connection.not_quiet(),
            }
            Ok(())
        }
        Action::Shutdown => {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            Ok(())
        }
        Action::Close => {
            closing(stream, connection);
            return Step::End;
        }
        Action::Read | Action::WaitForKernel | Action::Release => {
            unreachable!("{action:?} is the executor's")
        }
    };
    match result {
        Ok(()) => Step::Done,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::WouldBlock,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Done,
        Err(_) => Step::End,
    }
}

/// Before the executor closes the socket: one still in the sockhash has its memory books checked
/// (`crate::socket_memory`).
fn closing(stream: &std::net::TcpStream, connection: &Connection) {
    if let Some(cookie) = connection.sockhash_cookie() {
        socket_memory::check(stream.as_raw_fd(), cookie, "http");
    }
}

/// One read into `buf`, handed to the machine. `Ok(true)`: the read took everything there was
/// (it returned less than the buffer), so the next one would only find the queue empty.
fn read_once(
    stream: &std::net::TcpStream,
    connection: &mut Connection,
    buf: &mut [u8],
) -> io::Result<bool> {
    match (&*stream).read(buf)? {
        0 => {
            closing(stream, connection);
            Err(io::ErrorKind::UnexpectedEof.into())
        }
        n => {
            connection.received(&buf[..n]);
            Ok(n < buf.len())
        }
    }
}

/// What a work item's wait ended with.
enum Woke {
    /// The socket is ready.
    Ready,
    /// The read deadline's timer fired.
    Timer,
    /// Shutdown, or the socket's registration failed.
    Gone,
}

/// A readiness the socket reported, cleared: the read or write that follows finds out what made
/// it ready, or says "would block" and the wait starts over.
fn cleared(ready: io::Result<AsyncFdReadyGuard<'_, std::net::TcpStream>>) -> Woke {
    match ready {
        Ok(mut guard) => {
            guard.clear_ready();
            Woke::Ready
        }
        Err(_) => Woke::Gone,
    }
}

/// What stopped [`advance`].
pub(super) enum Wait {
    /// For the socket to become readable.
    Readable,
    /// For the socket to take more bytes.
    Writable,
    /// For the kernel's answers to leave ([`Action::WaitForKernel`]: only the work item waits so).
    Kernel,
    /// To offer the connection to the kernel ([`Action::Release`], the work item's to do).
    Release,
    /// For the other work items on this thread to run: this one sent a share of a file
    /// ([`FILE_TURN`]).
    Turn,
    /// The connection is over.
    End,
}

/// File bytes a work item sends with one sendfile before it lets the other work items on its
/// thread run ([`Wait::Turn`]). Into a socket whose reader keeps up (loopback, a fast client)
/// sendfile seldom blocks, and a work item that sent a whole 1 MiB file at once kept the small
/// answers of other connections waiting behind it. Measured (wrk -t2 -c100, `--fast-path off`,
/// the `bench site` folder; req/s of the 80/10/10 mix and of 1 MiB files): the whole file at
/// once 18.4–19.2k and 2.2–2.8k; 256 KiB per turn 20.0–27.3k and 2.0–5.0k; 64 KiB 25.2–28.8k
/// and 2.3–3.8k; 48 KiB 29.9–36.1k and 5.7–6.3k; 32 KiB 29.3–33.6k and 5.6–6.1k; 16 KiB 22.3k
/// and 3.5k (nginx, `sendfile off`: 27.7–29.1k and 3.2k). The same 48 KiB without the turn
/// between them: 20.6–24.3k and 2.2–2.8k — the turn is what matters.
const FILE_TURN: usize = 48 * 1024;

/// Runs the machine with non-blocking calls until it has to wait. `readable`: whether the
/// receive queue may hold bytes (cleared by a read that emptied it).
fn advance(stream: &std::net::TcpStream, connection: &mut Connection, readable: &mut bool) -> Wait {
    let mut sent_file = false;
    loop {
        let action = connection.next_action();
        let step = match action {
            Action::Read if !*readable => return Wait::Readable,
            Action::Read => {
                match READ_BUFFER.with_borrow_mut(|buf| read_once(stream, connection, buf)) {
                    Ok(emptied) => *readable = !emptied,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => *readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Wait::End,
                }
                continue;
            }
            Action::WaitForKernel => return Wait::Kernel,
            Action::Release => return Wait::Release,
            Action::SendFile if sent_file => return Wait::Turn,
            action => {
                sent_file |= matches!(action, Action::SendFile);
                perform(stream, connection, action, FILE_TURN)
            }
        };
        match step {
            Step::Done => {}
            Step::WouldBlock => return Wait::Writable,
            Step::End => return Wait::End,
        }
    }
}

/// Serves a connection as far as it goes without waiting, before anything is registered with
/// epoll or queued: a new client usually has its request queued by the time it is accepted
/// (htstress writes right after connect), and one the kernel hands over has the bytes it passed.
/// Returns what it waits for; the socket must be non-blocking.
pub(super) fn answer_at_once(stream: &std::net::TcpStream, connection: &mut Connection) -> Wait {
    advance(stream, connection, &mut true)
}

/// A connection that has waited [`PARK_AFTER`] between requests, out of its work item: for the
/// idle list (`super::idle`).
pub(super) struct WentIdle {
    pub stream: std::net::TcpStream,
    pub connection: Connection,
    /// How long it has received nothing.
    pub silent: Duration,
}

/// The `cmwq` work item: serves the connection from where [`answer_at_once`] stopped (`wait`)
/// until it ends, the kernel takes it, it goes idle ([`WentIdle`], only if it `may_park`) or the
/// server shuts down. (An
/// `async` block rather than an `async fn`: the latter keeps a second copy of its arguments in
/// the future, and the future is what a waiting connection costs.)
pub(super) fn serve_async(
    stream: std::net::TcpStream,
    mut connection: Connection,
    mut wait: Wait,
    mut shutdown: Shutdown,
    may_park: bool,
) -> impl std::future::Future<Output = Option<WentIdle>> + Send {
    async move {
        let interest = Interest::READABLE | Interest::WRITABLE;
        let Ok(mut socket) = register(stream, interest) else {
            return None;
        };
        let stopped = shutdown.recv();
        tokio::pin!(stopped);
        // The read deadline's timer, and the deadline it is armed for.
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<Deadline> = None;
        let mut readable = false;
        loop {
            match wait {
                Wait::Readable => {
                    let deadline = connection.deadline();
                    // Between requests the timer first fires to park the connection.
                    let park_after = match deadline {
                        Deadline::Silence(quiet)
                            if may_park && connection.parkable() && PARK_AFTER < quiet =>
                        {
                            Some(PARK_AFTER)
                        }
                        _ => None,
                    };
                    if armed != Some(deadline) {
                        let at = match deadline {
                            Deadline::Silence(quiet) => {
                                Instant::now() + park_after.unwrap_or(quiet)
                            }
                            Deadline::At(at) => at,
                        };
                        timer.as_mut().reset(at.into());
                        armed = Some(deadline);
                    }
                    // Polled in place (`poll_read_ready` keeps the waker in the socket's own
                    // slot): no readiness future in the work item, no waiter list per request.
                    let woke = std::future::poll_fn(|cx| {
                        if let Poll::Ready(ready) = socket.poll_read_ready(cx) {
                            return Poll::Ready(cleared(ready));
                        }
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Woke::Timer);
                        }
                        stopped.as_mut().poll(cx).map(|()| Woke::Gone)
                    })
                    .await;
                    match woke {
                        Woke::Ready => readable = true,
                        Woke::Timer => match deadline {
                            Deadline::Silence(quiet) => {
                                let silent = silence(socket.as_raw_fd());
                                if silent >= quiet {
                                    connection.deadline_passed();
                                } else if park_after.is_some_and(|park| silent >= park) {
                                    return Some(WentIdle {
                                        stream: socket.into_inner(),
                                        connection,
                                        silent,
                                    });
                                } else {
                                    // Bytes came after the timer was armed: it fires again when
                                    // the connection has been quiet long enough, or (to park)
                                    // a while later.
                                    let left = quiet - silent;
                                    let next = match park_after {
                                        Some(_) => left.min(PARK_RECHECK),
                                        None => left,
                                    };
                                    timer.as_mut().reset((Instant::now() + next).into());
                                }
                            }
                            Deadline::At(_) => connection.deadline_passed(),
                        },
                        Woke::Gone => return None,
                    }
                }
                Wait::Writable => {
                    // The client has this long to take a byte (only a backed-up connection
                    // waits here, so a timer reset per wait costs the others nothing).
                    timer
                        .as_mut()
                        .reset((Instant::now() + connection.send_timeout()).into());
                    armed = None;
                    let woke = std::future::poll_fn(|cx| {
                        if let Poll::Ready(ready) = socket.poll_write_ready(cx) {
                            return Poll::Ready(cleared(ready));
                        }
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Woke::Timer);
                        }
                        stopped.as_mut().poll(cx).map(|()| Woke::Gone)
                    })
                    .await;
                    match woke {
                        Woke::Ready => {}
                        Woke::Timer => connection.send_timed_out(),
                        Woke::Gone => return None,
                    }
                }
                Wait::Kernel => {
                    // Boxed: rare, and the future's size is what every idle connection costs.
                    if !Box::pin(connection.wait_for_kernel(socket.as_raw_fd())).await {
                        return None;
                    }
                }
                Wait::Release => {
                    match connection.release(socket.into_inner()) {
                        Some(stream) => match register(stream, interest) {
                            Ok(resumed) => socket = resumed,
                            Err(_) => return None,
                        },
                        None => return None,
                    }
                    // It came back because bytes arrived.
                    readable = true;
                }
                Wait::Turn => tokio::task::yield_now().await,
                Wait::End => return None,
            }
            wait = advance(socket.get_ref(), &mut connection, &mut readable);
        }
    }
}

/// The `thread` connection: the same machine, blocking I/O.
pub(super) fn serve_blocking(
    mut stream: std::net::TcpStream,
    mut connection: Connection,
    runtime: &tokio::runtime::Handle,
) {
    // Accepted sockets are non-blocking, and so are those coming back from the kernel path.
    if stream.set_nonblocking(false).is_err() {
        return;
    }
    // A write that blocks this long without the client taking a byte fails with EAGAIN.
    if stream
        .set_write_timeout(Some(connection.send_timeout()))
        .is_err()
    {
        return;
    }
    let mut buf = vec![0u8; READ_CHUNK];
    // SO_RCVTIMEO as set: a silence deadline is set once; a fixed one before each read.
    let mut read_timeout: Option<Duration> = None;
    // After a timeout that found the connection not quiet enough: the time still to wait.
    let mut quiet_left: Option<Duration> = None;
    loop {
        let step = match connection.next_action() {
            Action::Read => {
                let deadline = connection.deadline();
                let wait = match deadline {
                    Deadline::Silence(quiet) => quiet_left.take().unwrap_or(quiet),
                    Deadline::At(at) => at.saturating_duration_since(Instant::now()),
                };
                // Zero would mean no timeout at all.
                let wait = wait.max(Duration::from_millis(1));
                if read_timeout != Some(wait) {
                    if stream.set_read_timeout(Some(wait)).is_err() {
                        return;
                    }
                    read_timeout = Some(wait);
                }
                match read_once(&stream, &mut connection, &mut buf) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        match deadline {
                            Deadline::Silence(quiet) => {
                                let silent = silence(stream.as_raw_fd());
                                if silent >= quiet {
                                    connection.deadline_passed();
                                } else {
                                    quiet_left = Some(quiet - silent);
                                }
                            }
                            Deadline::At(at) if Instant::now() < at => {}
                            Deadline::At(_) => connection.deadline_passed(),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
                Step::Done
            }
            Action::WaitForKernel => {
                if !runtime.block_on(connection.wait_for_kernel(stream.as_raw_fd())) {
                    return;
                }
                Step::Done
            }
            Action::Release => match connection.release(stream) {
                Some(resumed) => {
                    stream = resumed;
                    Step::Done
                }
                None => return,
            },
            // No one else shares the thread: the whole file at once.
            action => perform(&stream, &mut connection, action, 1 << 30),
        };
        match step {
            Step::Done => {}
            // A blocking socket says "would block" only when its send timeout passed.
            Step::WouldBlock => connection.send_timed_out(),
            Step::End => return,
        }
    }
}

/// One sendfile(2) call of at most `most` bytes of `file`: file bytes go from the page cache to
/// the socket without a copy through user space.
fn send_file_once(
    socket: &std::net::TcpStream,
    file: &mut FileBody,
    most: usize,
) -> io::Result<usize> {
    let mut offset = file.offset;
    let count = file.len.min(most as u64) as usize;
    let sent = rustix::fs::sendfile(socket, &file.file, Some(&mut offset), count)?;
    if sent == 0 {
        // The file shrank under us: the promised length can no longer be sent.
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    file.offset = offset;
    file.len -= sent as u64;
    Ok(sent as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{session::Session, Timeouts};

    /// What an idle keep-alive connection costs the server is mostly its work item's future
    /// (`cargo xtask bench memory`): keep it within budget. It was 1,600 bytes before the
    /// arguments stopped being stored twice, the rare parts (a body being read, the kernel's
    /// books, the wait for the kernel's answers) were boxed and readiness was polled in place
    /// (688 then).
    #[test]
    fn an_idle_connection_is_small() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let timeouts = Timeouts {
            idle: Duration::from_secs(1),
            head: Duration::from_secs(1),
        };
        let connection = Connection::new(Session::new(), timeouts);
        assert!(
            size_of_val(&connection) <= 320,
            "{}",
            size_of_val(&connection)
        );
        let notify = crate::shutdown::notify();
        let work = serve_async(
            stream,
            connection,
            Wait::Readable,
            Shutdown::new(&notify),
            true,
        );
        assert!(size_of_val(&work) <= 768, "{}", size_of_val(&work));
    }
}
