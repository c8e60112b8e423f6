//! `htstress --rate R`: an open-loop load, and the event loop that drives it.
//!
//! Open loop: request `j` of the run is due at `start + j / R`, whatever the server does. Thread
//! `i` of `t` sends the requests with `j % t == i` (so the threads take turns instead of sending
//! in lockstep), each on one of its `-c` connections: at once if one is free, else as soon as one
//! frees up, oldest first. A request's latency runs from when it was due to the end of its
//! response, so the time it waited for a busy server counts, as it would for a user. A closed loop
//! (htstress, or this tool without `--rate`) sends a connection's next request only once the
//! server has answered the last one, and so leaves out the very waits an overloaded server causes
//! ("coordinated omission"; wrk2 avoids it the same way).
//!
//! Why not tokio, like the closed loop: its timer counts in whole milliseconds, as does
//! `epoll_wait`'s timeout (and so mio's `Poll::poll` timeout), and a request woken up to 1 ms late
//! would carry up to 1 ms of latency the server did not cause, on responses that take 50–500 µs.
//! So each thread runs a mio `Poll` that waits without a timeout, woken by a timerfd armed at the
//! next due time, an absolute CLOCK_MONOTONIC time in nanoseconds: requests are never sent early,
//! and late only by the kernel's wake-up latency (tens of µs in a VM), which their latencies then
//! include. Timer slack (50 µs per thread by default) delays `nanosleep` and poll timeouts but not
//! timerfd expiries, so it is left as it is.

use std::{
    io::{self, Read as _, Write as _},
    net::SocketAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mio::{net::TcpStream, unix::SourceFd, Events, Interest, Poll, Registry, Token};
use nix::{
    sys::{
        time::TimeSpec,
        timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
    },
    time::{clock_gettime, ClockId as Clock},
};

use super::{
    closed_by_peer, new_latencies, parse_head, Body, Latencies, Outcome, Plan, Target, HEAD_KEPT,
    IO_TIMEOUT, READ_CHUNK,
};

/// The timerfd's token; a connection's token is its slot's index.
const TIMER: Token = Token(usize::MAX);
/// How often requests in flight are checked for having made no progress for `IO_TIMEOUT`.
const SWEEP: Duration = Duration::from_secs(1);

/// Thread `thread` of `threads`' share of an open-loop run at `rate` requests per second in all,
/// from `start`; returns the latencies of its answered requests.
pub(super) fn drive(
    plan: &Plan,
    rate: f64,
    start: Instant,
    thread: usize,
    threads: usize,
) -> anyhow::Result<Latencies> {
    let Target::Tcp(address) = plan.target else {
        unreachable!("Plan::new refuses -u with --rate");
    };
    let mut schedule = Schedule::new(plan, rate, start, thread, threads);
    let mut poll = Poll::new().context("cannot create an epoll instance")?;
    let mut timer = Timer::new(poll.registry())?;
    let registry = poll.registry().try_clone()?;
    let mut connections = Connections::new(plan, address, registry);
    let mut events = Events::with_capacity(1024);
    let mut next_sweep = Instant::now() + SWEEP;
    loop {
        let now = Instant::now();
        let next_due = schedule.catch_up(now);
        if now >= next_sweep {
            connections.fail(|exchange| exchange.deadline <= now);
            next_sweep = now + SWEEP;
        }
        connections.send_waiting(&mut schedule);
        let wake = match next_due {
            Some(due) => due,
            // Scheduling is over: the run ends when every request is answered (all slots free
            // means none is waiting either), or when waiting any longer is pointless.
            None if connections.idle() || now >= schedule.end() => break,
            None => schedule.end(),
        };
        timer.set(wake.min(next_sweep))?;
        match poll.poll(&mut events, None) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            result => result.context("epoll_wait failed")?,
        }
        for event in &events {
            match event.token() {
                TIMER => timer.fired(),
                Token(slot) => connections.drive(slot),
            }
        }
    }
    // Whatever was sent and is unanswered now counts as a socket error; what never left the queue
    // is counted apart, its wait so far as its latency.
    connections.fail(|_| true);
    while let Some(due) = schedule.take_waiting() {
        plan.tally
            .record(Outcome::NotSent, due, &mut connections.latencies);
    }
    Ok(connections.latencies)
}

/// Which requests one thread sends, and when each is due.
struct Schedule {
    start: Instant,
    rate: f64,
    /// The number of threads: a thread's requests are this far apart in the run's sequence.
    step: u64,
    /// `-n`: requests in the whole run.
    limit: Option<u64>,
    /// `--duration`: no request is due from then on.
    deadline: Option<Instant>,
    /// The thread's first request (its index in the run) that is not due yet.
    next_due: u64,
    /// Its first request not sent yet: those from here to `next_due` wait for a free connection.
    next_send: u64,
    /// When its latest due request was due.
    last_due: Option<Instant>,
}

impl Schedule {
    fn new(plan: &Plan, rate: f64, start: Instant, thread: usize, threads: usize) -> Self {
        Self {
            start,
            rate,
            step: threads as u64,
            limit: plan.budget.limit,
            deadline: plan.budget.deadline,
            next_due: thread as u64,
            next_send: thread as u64,
            last_due: None,
        }
    }

    /// When request `index` of the run is due; none if that is past what an `Instant` can hold.
    fn due_time(&self, index: u64) -> Option<Instant> {
        let offset = Duration::try_from_secs_f64(index as f64 / self.rate).ok()?;
        self.start.checked_add(offset)
    }

    /// Puts the requests due by `now` in the queue; returns when the next will be due, or none
    /// once scheduling has stopped (at `-n` requests or at `--duration`, whichever comes first).
    fn catch_up(&mut self, now: Instant) -> Option<Instant> {
        loop {
            if self.limit.is_some_and(|limit| self.next_due >= limit) {
                return None;
            }
            let due = self
                .due_time(self.next_due)
                .filter(|&due| self.deadline.is_none_or(|deadline| due < deadline))?;
            if due > now {
                return Some(due);
            }
            self.last_due = Some(due);
            self.next_due += self.step;
        }
    }

    /// Takes the oldest request from the queue; returns when it was due.
    fn take_waiting(&mut self) -> Option<Instant> {
        if self.next_send >= self.next_due {
            return None;
        }
        let due = self.due_time(self.next_send)?;
        self.next_send += self.step;
        Some(due)
    }

    /// When the thread's run ends at the latest: `IO_TIMEOUT` after its last request was due.
    fn end(&self) -> Instant {
        self.last_due.unwrap_or(self.start) + IO_TIMEOUT
    }
}

/// A timerfd in the thread's `Poll`, armed at absolute CLOCK_MONOTONIC times. That is the clock
/// `Instant` reads on Linux, so an `Instant` converts by its distance from a moment read as both.
struct Timer {
    fd: TimerFd,
    /// One moment, as an `Instant` and as a CLOCK_MONOTONIC time.
    epoch: (Instant, TimeSpec),
    /// When it is set to fire, until its event comes.
    armed: Option<Instant>,
}

impl Timer {
    fn new(registry: &Registry) -> anyhow::Result<Self> {
        let fd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC)
            .context("cannot create a timerfd")?;
        registry.register(
            &mut SourceFd(&fd.as_fd().as_raw_fd()),
            TIMER,
            Interest::READABLE,
        )?;
        let epoch = (Instant::now(), clock_gettime(Clock::CLOCK_MONOTONIC)?);
        Ok(Self {
            fd,
            epoch,
            armed: None,
        })
    }

    /// Makes the timer fire at `at`, or at once if that has passed.
    fn set(&mut self, at: Instant) -> anyhow::Result<()> {
        if self.armed != Some(at) {
            let (instant, monotonic) = self.epoch;
            let expiry = monotonic + TimeSpec::from_duration(at.saturating_duration_since(instant));
            self.fd
                .set(
                    Expiration::OneShot(expiry),
                    TimerSetTimeFlags::TFD_TIMER_ABSTIME,
                )
                .context("cannot set the timerfd")?;
            self.armed = Some(at);
        }
        Ok(())
    }

    /// Its event came, so it is no longer armed. It is never read: arming it again clears it.
    fn fired(&mut self) {
        self.armed = None;
    }
}

/// A thread's `-c` connection slots and the requests in flight on them.
struct Connections<'a> {
    plan: &'a Plan,
    address: SocketAddr,
    registry: Registry,
    slots: Vec<Slot>,
    /// The slots with no request in flight, the latest freed last (the likeliest to have a
    /// connection still open).
    free: Vec<usize>,
    /// Where each read lands before its bytes are looked at.
    scratch: Vec<u8>,
    latencies: Latencies,
}

#[derive(Default)]
struct Slot {
    /// The connection; with `--keep-alive`, kept between requests while the server keeps it open.
    stream: Option<TcpStream>,
    /// The request in flight.
    exchange: Option<Exchange>,
}

impl<'a> Connections<'a> {
    fn new(plan: &'a Plan, address: SocketAddr, registry: Registry) -> Self {
        Self {
            plan,
            address,
            registry,
            slots: (0..plan.concurrency).map(|_| Slot::default()).collect(),
            free: (0..plan.concurrency).rev().collect(),
            scratch: vec![0; READ_CHUNK],
            latencies: new_latencies(),
        }
    }

    /// Whether no request is in flight.
    fn idle(&self) -> bool {
        self.free.len() == self.slots.len()
    }

    /// Sends the queued requests, oldest first, while a slot is free.
    fn send_waiting(&mut self, schedule: &mut Schedule) {
        while let Some(&slot) = self.free.last() {
            let Some(due) = schedule.take_waiting() else {
                return;
            };
            self.free.pop();
            self.start(slot, due);
        }
    }

    /// Starts the request due at `due` on `slot`: on its kept-alive connection if it has one,
    /// else on a new one.
    fn start(&mut self, slot: usize, due: Instant) {
        let reused = self.slots[slot].stream.is_some();
        if !reused {
            match self.connect(slot) {
                Ok(stream) => self.slots[slot].stream = Some(stream),
                Err(_) => return self.finish(slot, due, Outcome::SocketError, false),
            }
        }
        self.slots[slot].exchange = Some(Exchange::new(due, reused));
        self.drive(slot);
    }

    fn connect(&self, slot: usize) -> io::Result<TcpStream> {
        let mut stream = TcpStream::connect(self.address)?;
        self.registry.register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok(stream)
    }

    /// Moves the request on `slot` on as far as its socket allows; called on each of its events.
    fn drive(&mut self, slot: usize) {
        let Slot {
            stream: Some(stream),
            exchange: Some(exchange),
        } = &mut self.slots[slot]
        else {
            // An idle connection (if the server closed it, its next request finds out, as in the
            // closed loop), or an event for a connection closed since.
            return;
        };
        let due = exchange.due;
        match exchange.advance(self.plan, stream, &mut self.scratch) {
            Step::Wait => {}
            Step::Retry => {
                self.slots[slot] = Slot::default();
                self.start(slot, due);
            }
            Step::Done { outcome, keep } => self.finish(slot, due, outcome, keep),
        }
    }

    /// Counts the request on `slot` and frees the slot, closing its connection unless `keep`
    /// (closing a socket also takes it out of the `Poll`).
    fn finish(&mut self, slot: usize, due: Instant, outcome: Outcome, keep: bool) {
        self.plan.tally.record(outcome, due, &mut self.latencies);
        let Slot { stream, exchange } = &mut self.slots[slot];
        *exchange = None;
        if !keep {
            *stream = None;
        }
        self.free.push(slot);
    }

    /// Counts the requests in flight that `which` picks as socket errors, closing their
    /// connections.
    fn fail(&mut self, which: impl Fn(&Exchange) -> bool) {
        for slot in 0..self.slots.len() {
            if let Some(due) = self.slots[slot]
                .exchange
                .as_ref()
                .filter(|exchange| which(exchange))
                .map(|exchange| exchange.due)
            {
                self.finish(slot, due, Outcome::SocketError, false);
            }
        }
    }
}

/// A request, from when it was due to the end of its response.
struct Exchange {
    due: Instant,
    /// Whether its connection served a response before, so the server may have closed it since
    /// (its right with an idle connection): then the request goes again on a new connection.
    reused: bool,
    phase: Phase,
    /// The response so far: with `--keep-alive`, until its head is complete; else its first
    /// `HEAD_KEPT` bytes.
    received: Vec<u8>,
    /// It is a socket error if it has not moved on by then.
    deadline: Instant,
}

enum Phase {
    Connecting,
    /// The request's bytes written so far.
    Sending(usize),
    /// Waiting for the response (with `--keep-alive`, for the rest of its head).
    Receiving,
    /// `--keep-alive`, after the head: the body bytes still to come (none: until the server
    /// closes the connection) and whether the connection stays open after them.
    Body {
        status_line: Vec<u8>,
        remaining: Option<u64>,
        persistent: bool,
    },
}

/// Where driving an exchange got to.
enum Step {
    /// Nothing more until its socket's next event.
    Wait,
    /// The server closed a reused connection before answering: send the request again, on a new
    /// connection.
    Retry,
    /// Answered or failed; `keep`: the connection stays open for the next request.
    Done { outcome: Outcome, keep: bool },
}

impl Exchange {
    fn new(due: Instant, reused: bool) -> Self {
        Self {
            due,
            reused,
            phase: if reused {
                Phase::Sending(0)
            } else {
                Phase::Connecting
            },
            received: Vec::new(),
            deadline: Instant::now() + IO_TIMEOUT,
        }
    }

    /// Connects, sends and reads as far as `stream` allows without blocking. The outcomes are the
    /// closed loop's: `one_shot_requests` without `--keep-alive`, else `keep_alive_requests`.
    fn advance(&mut self, plan: &Plan, stream: &mut TcpStream, scratch: &mut [u8]) -> Step {
        match self.try_advance(plan, stream, scratch) {
            Ok(step) => step,
            // Reset before any of the response came: closed, as in the closed loop's `exchange`.
            Err(error) if self.received.is_empty() && closed_by_peer(&error) => self.closed(),
            Err(_) => Step::Done {
                outcome: Outcome::SocketError,
                keep: false,
            },
        }
    }

    fn try_advance(
        &mut self,
        plan: &Plan,
        stream: &mut TcpStream,
        scratch: &mut [u8],
    ) -> io::Result<Step> {
        if let Phase::Connecting = self.phase {
            // As mio's `TcpStream::connect` says: a failed connect shows in `take_error`, a
            // pending one as `peer_addr` failing with ENOTCONN (or EINPROGRESS).
            if let Some(error) = stream.take_error()? {
                return Err(error);
            }
            match stream.peer_addr() {
                Ok(_) => self.moved_on(Phase::Sending(0)),
                Err(error)
                    if error.kind() == io::ErrorKind::NotConnected
                        || error.raw_os_error() == Some(nix::errno::Errno::EINPROGRESS as i32) =>
                {
                    return Ok(Step::Wait)
                }
                Err(error) => return Err(error),
            }
        }
        while let Phase::Sending(written) = self.phase {
            match stream.write(&plan.request[written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(wrote) if written + wrote == plan.request.len() => {
                    self.moved_on(Phase::Receiving)
                }
                Ok(wrote) => self.moved_on(Phase::Sending(written + wrote)),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return wait_or(error),
            }
        }
        loop {
            match stream.read(scratch) {
                Ok(0) => return self.ended(plan),
                Ok(read) => {
                    self.deadline = Instant::now() + IO_TIMEOUT;
                    if let Some(step) = self.received(plan, &scratch[..read])? {
                        return Ok(step);
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return wait_or(error),
            }
        }
    }

    fn moved_on(&mut self, phase: Phase) {
        self.phase = phase;
        self.deadline = Instant::now() + IO_TIMEOUT;
    }

    /// Takes in one read's bytes; the outcome once the response is complete.
    fn received(&mut self, plan: &Plan, bytes: &[u8]) -> io::Result<Option<Step>> {
        match &mut self.phase {
            // htstress's way: the response ends when the server closes the connection.
            Phase::Receiving if !plan.keep_alive => {
                let wanted = HEAD_KEPT
                    .saturating_sub(self.received.len())
                    .min(bytes.len());
                self.received.extend_from_slice(&bytes[..wanted]);
            }
            Phase::Receiving => {
                self.received.extend_from_slice(bytes);
                if let Some(head) = parse_head(&self.received)? {
                    let body_received = (self.received.len() - head.length) as u64;
                    self.phase = Phase::Body {
                        status_line: head.status_line,
                        remaining: match head.body {
                            Body::Length(length) => Some(length.saturating_sub(body_received)),
                            Body::UntilClose => None,
                        },
                        persistent: head.persistent,
                    };
                }
            }
            Phase::Body {
                remaining: Some(remaining),
                ..
            } => *remaining = remaining.saturating_sub(bytes.len() as u64),
            Phase::Body {
                remaining: None, ..
            } => {}
            Phase::Connecting | Phase::Sending(_) => unreachable!("reads start once sent"),
        }
        Ok(match &self.phase {
            Phase::Body {
                status_line,
                remaining: Some(0),
                persistent,
            } => Some(Step::Done {
                outcome: plan.judge(status_line),
                keep: *persistent,
            }),
            _ => None,
        })
    }

    /// The server closed the connection (a read returned 0).
    fn ended(&self, plan: &Plan) -> io::Result<Step> {
        let outcome = match &self.phase {
            _ if self.received.is_empty() => return Ok(self.closed()),
            Phase::Receiving if !plan.keep_alive => plan.judge(&self.received),
            Phase::Body {
                status_line,
                remaining: None,
                ..
            } => plan.judge(status_line),
            // A truncated head or body.
            _ => return Err(io::ErrorKind::UnexpectedEof.into()),
        };
        Ok(Step::Done {
            outcome,
            keep: false,
        })
    }

    /// The server closed the connection before any of the response came.
    fn closed(&self) -> Step {
        if self.reused {
            Step::Retry
        } else {
            Step::Done {
                outcome: Outcome::SocketError,
                keep: false,
            }
        }
    }
}

/// `Wait` if an operation would block, else its error.
fn wait_or(error: io::Error) -> io::Result<Step> {
    if error.kind() == io::ErrorKind::WouldBlock {
        Ok(Step::Wait)
    } else {
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::BufReader,
        net::{TcpListener, TcpStream},
        sync::{Arc, Mutex},
        thread,
    };

    use clap::Parser as _;

    use super::super::{load, Args, Report};
    use super::*;

    /// When each request reached a test server.
    type Arrivals = Arc<Mutex<Vec<Instant>>>;

    /// A test server on 127.0.0.1 that answers every request on `connection` (called once per
    /// accepted connection, on a thread of its own); returns its URL and the requests' arrivals.
    fn server(
        connection: impl Fn(TcpStream, &Arrivals) -> io::Result<()> + Send + Sync + 'static,
    ) -> (String, Arrivals) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let arrivals = Arrivals::default();
        let (connection, served) = (Arc::new(connection), Arc::clone(&arrivals));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let (connection, arrivals) = (Arc::clone(&connection), Arc::clone(&served));
                thread::spawn(move || {
                    let stream = stream?;
                    // No test waits for these threads; this only keeps them from outliving it.
                    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                    connection(stream, &arrivals)
                });
            }
        });
        (url, arrivals)
    }

    /// Reads one request's head; false at EOF.
    fn read_request(reader: &mut impl io::BufRead, arrivals: &Arrivals) -> io::Result<bool> {
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(false);
            }
            if line == "\r\n" {
                arrivals.lock().unwrap().push(Instant::now());
                return Ok(true);
            }
        }
    }

    /// HTTP/1.1 on persistent connections, each request answered `delay` after it came, one at a
    /// time over all connections (so the server's capacity is one request per `delay`).
    fn keep_alive_server(delay: Duration) -> (String, Arrivals) {
        let turn = Mutex::new(());
        server(move |mut stream, arrivals| {
            let mut reader = BufReader::new(stream.try_clone()?);
            while read_request(&mut reader, arrivals)? {
                let _turn = turn.lock().unwrap();
                thread::sleep(delay);
                stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
            }
            Ok(())
        })
    }

    /// HTTP/1.0 as htstress expects it: one answer per connection, which the server then closes.
    fn closing_server() -> (String, Arrivals) {
        server(|mut stream, arrivals| {
            if read_request(&mut BufReader::new(stream.try_clone()?), arrivals)? {
                stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nok")?;
            }
            Ok(())
        })
    }

    fn args(flags: &[&str], url: &str) -> Args {
        let argv = ["htstress", "-q"].into_iter().chain(flags.iter().copied());
        Args::try_parse_from(argv.chain([url])).unwrap()
    }

    fn run(flags: &[&str], url: &str) -> Report {
        let report = load(&args(flags, url)).unwrap();
        eprintln!("htstress {flags:?}:\n{report}");
        report
    }

    fn assert_near(what: &str, value: f64, expected: f64, tolerance: f64) {
        assert!(
            (value - expected).abs() <= expected * tolerance,
            "{what}: {value}, expected {expected} ± {}%",
            tolerance * 100.0
        );
    }

    /// `flags` (a `--rate` of `rate` for 2 s) against `(url, arrivals)`: every request sent and
    /// answered, at the rate asked, evenly over the 2 s.
    fn assert_holds_rate(flags: &[&str], rate: f64, (url, arrivals): (String, Arrivals)) {
        let began = Instant::now();
        let report = run(flags, &url);
        assert_eq!(report.offered_rate, Some(rate));
        assert_near("requests", report.requests as f64, 2.0 * rate, 0.05);
        assert_eq!(report.good, report.requests, "all answered: {report:?}");
        // It took about 2 s: requests were not sent late, in a rush at the end, or after.
        assert!((1.95..2.5).contains(&report.seconds), "{report:?}");
        let arrivals = arrivals.lock().unwrap();
        assert_near("server's requests", arrivals.len() as f64, 2.0 * rate, 0.05);
        let first_second = arrivals
            .iter()
            .filter(|&&at| at < began + Duration::from_secs(1))
            .count();
        // Sent evenly, not in bursts (10%: a stall of the busy test machine that spans the end of
        // the first second moves requests past it).
        assert_near(
            "requests in the 1st second",
            first_second as f64,
            rate,
            0.10,
        );
    }

    #[test]
    fn holds_its_rate_with_keep_alive() {
        assert_holds_rate(
            &[
                "--rate",
                "2000",
                "--duration",
                "2",
                "-c",
                "4",
                "-t",
                "1",
                "--keep-alive",
            ],
            2000.0,
            keep_alive_server(Duration::ZERO),
        );
    }

    #[test]
    fn holds_its_rate_with_a_connection_per_request() {
        assert_holds_rate(
            &["--rate", "500", "--duration", "2", "-c", "4", "-t", "2"],
            500.0,
            closing_server(),
        );
    }

    #[test]
    fn counts_latency_from_the_scheduled_time() {
        // The server takes 20 ms per request, one at a time: 50 requests per second at most.
        const DELAY_US: u32 = 20_000;
        let (url, _) = keep_alive_server(Duration::from_micros(DELAY_US.into()));
        let p50 = |report: &Report| report.p50_us.expect("answered requests");

        // Below its capacity, a request waits only for its own answer.
        let below = run(
            &["--rate", "20", "--duration", "1", "-c", "1", "--keep-alive"],
            &url,
        );
        assert_eq!(below.good, 20);
        assert!((DELAY_US..2 * DELAY_US).contains(&p50(&below)), "{below:?}");

        // At twice its capacity, requests queue: the one due at 10·k ms is answered at
        // 20·(k + 1) ms, so its latency is 10·k + 20 ms and the median about 0.5 s.
        let over = run(
            &[
                "--rate",
                "100",
                "--duration",
                "1",
                "-c",
                "1",
                "--keep-alive",
            ],
            &url,
        );
        assert_eq!(over.good, 100);
        assert!(p50(&over) > 5 * DELAY_US, "{over:?}");

        // The closed loop against the same server only sends when it has been answered, so it
        // sees the server's 20 ms and none of the queueing.
        let closed = run(&["-n", "20", "-c", "1", "--keep-alive"], &url);
        assert_eq!((closed.good, closed.offered_rate), (20, None));
        assert!(
            (DELAY_US..2 * DELAY_US).contains(&p50(&closed)),
            "{closed:?}"
        );
    }

    #[test]
    fn reconnects_when_the_server_closes_idle_connections() {
        // One HTTP/1.1 answer per connection, then the server closes it without saying so: each
        // next request on it finds it closed and goes again on a new connection.
        let (url, arrivals) = server(|mut stream, arrivals| {
            if read_request(&mut BufReader::new(stream.try_clone()?), arrivals)? {
                stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
            }
            Ok(())
        });
        let report = run(
            &["--rate", "200", "-n", "100", "-c", "2", "--keep-alive"],
            &url,
        );
        assert_eq!((report.requests, report.good), (100, 100), "{report:?}");
        assert_eq!(arrivals.lock().unwrap().len(), 100);
    }

    #[test]
    fn refuses_unbounded_or_zero_rates() {
        for (flags, complaint) in [
            (&["--rate", "100"][..], "--rate needs --duration and/or -n"),
            (
                &["--rate", "0", "-n", "10"],
                "--rate must be a positive number",
            ),
            (
                &["--rate", "inf", "--duration", "1"],
                "--rate must be a positive number",
            ),
            (
                &["--rate", "100", "-n", "1", "-u", "/dev/null"],
                "Unix sockets",
            ),
        ] {
            let error = load(&args(flags, "http://127.0.0.1:9/")).unwrap_err();
            assert!(error.to_string().contains(complaint), "{flags:?}: {error}");
        }
    }
}
