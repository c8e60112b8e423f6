//! `cargo xtask floor`: the least a user-space server can spend per request on this machine.
//!
//! `bench cost` puts khttpd's request paths and nginx next to this floor, so a number reads as "so
//! much above what any server here must pay". For each request the floor does only what no server
//! can skip: accept, read until the end of a head (`\r\n\r\n`), write a fixed answer built once at
//! start, and close when HTTP/1.0 asks for it. Heads pipelined in one read get all their answers
//! in one write. The echo service writes back what it reads.
//!
//! It is not a server, and deliberately so: it never parses a request (any head gets the same
//! `200`, whatever its method, path or syntax), checks nothing, has no timers (an idle or
//! half-sent connection stays open forever), formats no Date (its answer carries a fixed one, to
//! be as long as khttpd's), logs no request, does not honour
//! `Connection: close` on HTTP/1.1 (it leaves when the client closes), reads a head only if it
//! ends in `\r\n\r\n` and fits in [`INPUT`] bytes (a longer one ends the connection), and ignores
//! request bodies (their bytes are scanned as if they were heads).
//!
//! Each `--threads` thread runs its own mio event loop over the same listening sockets.

use std::{
    convert::Infallible,
    io::{self, ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr},
    num::NonZeroUsize,
    sync::{mpsc, Arc},
    thread,
};

use anyhow::{anyhow, Context as _};
use mio::{
    net::{TcpListener, TcpStream},
    Events, Interest, Poll, Registry, Token,
};

/// The default body, the same as khttpd's.
const HELLO: &[u8] = b"Hello, World!\n";
/// Each connection's read buffer: the longest head served, and the most echoed per read.
const INPUT: usize = 16 * 1024;
/// Listen backlog: SOMAXCONN, 4096, khttpd's default. std and mio listen with 128, and a burst of
/// connects that overflows it drops SYNs, each costing the client a one-second retransmit.
const BACKLOG: nix::sys::socket::Backlog = nix::sys::socket::Backlog::MAXCONN;
/// Poll tokens of the listeners; a connection's token is its slot's index.
const HTTP: Token = Token(usize::MAX);
const ECHO: Token = Token(usize::MAX - 1);

/// `floor --http ADDR [--echo ADDR] [--body-size N] [--threads N]`
#[derive(clap::Args)]
pub struct Args {
    /// Answer HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    pub http: SocketAddr,
    /// Echo on this address.
    #[arg(long, value_name = "ADDR")]
    pub echo: Option<SocketAddr>,
    /// Body of N bytes (repeated "Hello, World!\n") [default: "Hello, World!\n", 14 bytes].
    #[arg(long, value_name = "N")]
    pub body_size: Option<usize>,
    /// Event loops, one thread each, sharing the listening sockets.
    #[arg(long, value_name = "N", default_value_t = NonZeroUsize::MIN)]
    pub threads: NonZeroUsize,
}

/// Binds, says so on stderr, and serves until killed. SIGTERM's default action ends the process,
/// which is all the clean-up there is: the kernel closes the sockets.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let floor = Floor::bind(args)?;
    match floor.echo_addr() {
        Some(echo) => eprintln!("floor: http on {}, echo on {echo}", floor.http_addr()),
        None => eprintln!("floor: http on {}", floor.http_addr()),
    }
    floor.serve()
}

/// The listening sockets and the answers, ready to [`serve`](Floor::serve).
pub struct Floor {
    http: std::net::TcpListener,
    http_addr: SocketAddr,
    echo: Option<(std::net::TcpListener, SocketAddr)>,
    threads: NonZeroUsize,
    answers: Arc<Answers>,
}

impl Floor {
    /// Listens on `args.http` and `args.echo` (port 0 picks a free port).
    pub fn bind(args: &Args) -> anyhow::Result<Floor> {
        let (http, http_addr) = listen(args.http)?;
        let echo = args.echo.map(listen).transpose()?;
        let body = match args.body_size {
            Some(size) => HELLO.iter().copied().cycle().take(size).collect(),
            None => HELLO.to_vec(),
        };
        Ok(Floor {
            http,
            http_addr,
            echo,
            threads: args.threads,
            answers: Arc::new(Answers {
                keep_alive: response("keep-alive", &body),
                close: response("close", &body),
            }),
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn echo_addr(&self) -> Option<SocketAddr> {
        self.echo.as_ref().map(|(_, addr)| *addr)
    }

    /// Starts the threads and blocks; returns only if one of them fails.
    pub fn serve(self) -> anyhow::Result<()> {
        let (done, failed) = mpsc::channel();
        for i in 0..self.threads.get() {
            let worker = Worker::new(&self).context("floor: cannot start an event loop")?;
            let done = done.clone();
            thread::Builder::new()
                .name(format!("floor-{i}"))
                .spawn(move || done.send(worker.run()))
                .context("floor: cannot start a thread")?;
        }
        drop(done);
        match failed.recv() {
            Ok(Err(error)) => Err(anyhow!("floor: event loop failed: {error}")),
            Err(_) => Err(anyhow!("floor: every thread panicked")),
        }
    }
}

/// A non-blocking listener on `addr`, and the address it got.
fn listen(addr: SocketAddr) -> anyhow::Result<(std::net::TcpListener, SocketAddr)> {
    let fail = |error: io::Error| anyhow!("floor: cannot listen on {addr}: {error}");
    let listener = std::net::TcpListener::bind(addr).map_err(fail)?;
    // listen on a listening socket only resizes its backlog.
    nix::sys::socket::listen(&listener, BACKLOG).map_err(|e| fail(e.into()))?;
    listener.set_nonblocking(true).map_err(fail)?;
    let local = listener.local_addr().map_err(fail)?;
    Ok((listener, local))
}

/// The two answers, whole: head and body.
struct Answers {
    keep_alive: Vec<u8>,
    close: Vec<u8>,
}

/// The `200` with `body`, saying `Connection: <connection>`, with the header fields of khttpd's
/// answer, so that both put the same bytes on the wire. With fewer bytes, ten pipelined answers
/// fit in one 1,448-byte segment where khttpd's need two, and the client then sends its next
/// requests in one segment instead of two: the floor's pipelined cost was half khttpd's for that
/// alone (`nstat` in the server's namespace: 0.1 against 0.2 segments per request each way). The
/// Date is a fixed value of the right shape (formatting one is work the floor leaves out; no load
/// tool reads it).
fn response(connection: &str, body: &[u8]) -> Vec<u8> {
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\nServer: floor\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body);
    answer
}

/// One thread's event loop.
struct Worker {
    poll: Poll,
    http: TcpListener,
    echo: Option<TcpListener>,
    conns: Conns,
    answers: Arc<Answers>,
}

impl Worker {
    /// Registers clones of the listening sockets in a poll of its own. Every thread's poll wakes
    /// on a connect and the first to accept takes it; the others' accept would block, which ends
    /// their accept loop.
    fn new(floor: &Floor) -> io::Result<Worker> {
        let poll = Poll::new()?;
        // The clones share the original's O_NONBLOCK, which mio needs.
        let mut http = TcpListener::from_std(floor.http.try_clone()?);
        poll.registry()
            .register(&mut http, HTTP, Interest::READABLE)?;
        let echo = match &floor.echo {
            Some((listener, _)) => {
                let mut echo = TcpListener::from_std(listener.try_clone()?);
                poll.registry()
                    .register(&mut echo, ECHO, Interest::READABLE)?;
                Some(echo)
            }
            None => None,
        };
        Ok(Worker {
            poll,
            http,
            echo,
            conns: Conns::default(),
            answers: Arc::clone(&floor.answers),
        })
    }

    /// Serves until polling fails (or registering a socket does).
    fn run(mut self) -> io::Result<Infallible> {
        let mut events = Events::with_capacity(1024);
        loop {
            match self.poll.poll(&mut events, None) {
                Ok(()) => {}
                // A stop and continue (a debugger, say) interrupts the wait.
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
            for event in &events {
                match event.token() {
                    HTTP => accept(&self.http, false, self.poll.registry(), &mut self.conns)?,
                    ECHO => {
                        if let Some(echo) = &self.echo {
                            accept(echo, true, self.poll.registry(), &mut self.conns)?;
                        }
                    }
                    Token(i) => self.ready(i)?,
                }
            }
        }
    }

    /// Serves connection `i` until its socket would block, then waits for what it waits for.
    fn ready(&mut self, i: usize) -> io::Result<()> {
        // An event already fetched for a connection closed meanwhile finds a free slot (or a new
        // connection there, which then merely tries a read).
        let Some(conn) = self.conns.slots.get_mut(i).and_then(Option::as_mut) else {
            return Ok(());
        };
        match conn.drive(&self.answers) {
            Some(interest) if interest != conn.interest => {
                let registry = self.poll.registry();
                registry.reregister(&mut conn.stream, Token(i), interest)?;
                conn.interest = interest;
            }
            Some(_) => {}
            None => self.conns.close(i),
        }
        Ok(())
    }
}

/// Accepts until the backlog is empty (mio is edge-triggered: a connect left queued brings no new
/// event); each connection starts waiting to read.
fn accept(
    listener: &TcpListener,
    echo: bool,
    registry: &Registry,
    conns: &mut Conns,
) -> io::Result<()> {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if error.kind() == ErrorKind::WouldBlock => return Ok(()),
            // Out of descriptors, say: what is queued waits for the next connect's event.
            Err(error) => {
                eprintln!("floor: accept: {error}");
                return Ok(());
            }
        };
        // Answers go out as soon as they are written. A socket broken already fails its first read.
        let _ = stream.set_nodelay(true);
        let (i, conn) = conns.insert(stream, echo);
        registry.register(&mut conn.stream, Token(i), Interest::READABLE)?;
    }
}

/// One thread's connections: slot `i` is `Token(i)`. A closed connection's buffers wait in `spare`
/// for the next one, so accepting allocates nothing once the thread has seen its peak.
#[derive(Default)]
struct Conns {
    slots: Vec<Option<Conn>>,
    free: Vec<usize>,
    spare: Vec<Buffers>,
}

impl Conns {
    fn insert(&mut self, stream: TcpStream, echo: bool) -> (usize, &mut Conn) {
        let conn = Conn {
            stream,
            echo,
            close: false,
            interest: Interest::READABLE,
            buf: self.spare.pop().unwrap_or_else(|| Buffers {
                input: vec![0; INPUT].into_boxed_slice(),
                filled: 0,
                output: Vec::new(),
                sent: 0,
            }),
        };
        let i = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        (i, self.slots[i].insert(conn))
    }

    /// Closes connection `i` (closing its socket also removes it from the poll).
    fn close(&mut self, i: usize) {
        if let Some(conn) = self.slots[i].take() {
            let mut buf = conn.buf;
            buf.filled = 0;
            buf.output.clear();
            buf.sent = 0;
            self.spare.push(buf);
            self.free.push(i);
        }
    }
}

struct Conn {
    stream: TcpStream,
    echo: bool,
    /// Close once the output is written (an HTTP/1.0 request without keep-alive was answered).
    close: bool,
    /// What the poll waits for: reading, or writing while output is pending.
    interest: Interest,
    buf: Buffers,
}

struct Buffers {
    /// HTTP: the start of a head not yet complete. Echo: bytes read and not yet written back.
    input: Box<[u8]>,
    filled: usize,
    /// HTTP: answers not yet written.
    output: Vec<u8>,
    /// How much of the pending output (HTTP: `output`; echo: `input[..filled]`) is written.
    sent: usize,
}

impl Conn {
    /// Writes what is pending, then reads and answers, until the socket would block (mio is
    /// edge-triggered: readiness left unused brings no new event). Returns what to wait for
    /// next, or None when the connection is done: end of stream, an error, or closing.
    fn drive(&mut self, answers: &Answers) -> Option<Interest> {
        let buf = &mut self.buf;
        loop {
            // Nothing is read while output is pending, which bounds it by one read's worth.
            loop {
                let pending = if self.echo {
                    &buf.input[buf.sent..buf.filled]
                } else {
                    &buf.output[buf.sent..]
                };
                if pending.is_empty() {
                    break;
                }
                match self.stream.write(pending) {
                    Ok(n) => buf.sent += n,
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {
                        return Some(Interest::WRITABLE)
                    }
                    Err(_) => return None,
                }
            }
            buf.sent = 0;
            buf.output.clear();
            if self.echo {
                buf.filled = 0;
            }
            if self.close {
                // The client reads the answer until this end of stream.
                let _ = self.stream.shutdown(Shutdown::Write);
                return None;
            }
            // A partial head that fills the whole buffer makes this an empty read, which ends the
            // connection as the end of stream would.
            match self.stream.read(&mut buf.input[buf.filled..]) {
                Ok(0) => return None,
                Ok(n) => buf.filled += n,
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    return Some(Interest::READABLE)
                }
                Err(_) => return None,
            }
            if !self.echo {
                self.close = buf.answer(answers);
            }
        }
    }
}

impl Buffers {
    /// Appends an answer for each complete head in the input and keeps what follows the last one.
    /// True if the connection closes after these answers (what follows is then dropped).
    fn answer(&mut self, answers: &Answers) -> bool {
        let mut start = 0;
        while let Some(len) = head_len(&self.input[start..self.filled]) {
            let head = &self.input[start..start + len];
            start += len;
            if closes(head) {
                self.output.extend_from_slice(&answers.close);
                self.filled = 0;
                return true;
            }
            self.output.extend_from_slice(&answers.keep_alive);
        }
        self.input.copy_within(start..self.filled, 0);
        self.filled -= start;
        false
    }
}

/// The length of the head at the start of `input`, `\r\n\r\n` included, if it is complete.
fn head_len(input: &[u8]) -> Option<usize> {
    input
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// Whether the connection closes after answering `head`: its request line ends in `HTTP/1.0` and
/// no `keep-alive` (any case) appears anywhere in it; no header is parsed.
fn closes(head: &[u8]) -> bool {
    head.iter()
        .position(|&b| b == b'\r')
        .is_some_and(|end| head[..end].ends_with(b"HTTP/1.0"))
        && !head
            .windows(10)
            .any(|w| w.eq_ignore_ascii_case(b"keep-alive"))
}

#[cfg(test)]
mod tests {
    use std::{net::TcpStream, time::Duration};

    use super::*;

    /// Every read and write in these tests; a hung floor fails the test instead of hanging it.
    const TIMEOUT: Duration = Duration::from_secs(5);
    const GET_1_1: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    const GET_1_0: &[u8] = b"GET / HTTP/1.0\r\n\r\n";

    fn args() -> Args {
        Args {
            http: "127.0.0.1:0".parse().unwrap(),
            echo: Some("127.0.0.1:0".parse().unwrap()),
            body_size: None,
            threads: NonZeroUsize::MIN,
        }
    }

    /// Binds, serves on a thread of its own (left running), returns the HTTP and echo addresses.
    fn start(args: &Args) -> (SocketAddr, SocketAddr) {
        let floor = Floor::bind(args).unwrap();
        let addrs = (floor.http_addr(), floor.echo_addr().unwrap());
        thread::spawn(move || floor.serve());
        addrs
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        got
    }

    fn read_exact(stream: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        stream.read_exact(&mut got).unwrap();
        got
    }

    fn keep_alive() -> Vec<u8> {
        response("keep-alive", HELLO)
    }

    fn close() -> Vec<u8> {
        response("close", HELLO)
    }

    // Tests that count answers end with an HTTP/1.0 request and read to the end of stream: any
    // answer too many would show in the bytes read.

    #[test]
    fn pipelined_heads_get_one_answer_each() {
        let (http, _) = start(&args());
        let mut stream = connect(http);
        stream.write_all(&GET_1_1.repeat(3)).unwrap();
        assert_eq!(
            read_exact(&mut stream, 3 * keep_alive().len()),
            keep_alive().repeat(3)
        );
        stream.write_all(GET_1_0).unwrap();
        assert_eq!(read_to_end(&mut stream), close());
    }

    #[test]
    fn head_split_inside_its_end_gets_one_answer() {
        let (http, _) = start(&args());
        let mut stream = connect(http);
        let (first, second) = GET_1_1.split_at(GET_1_1.len() - 2);
        stream.write_all(first).unwrap();
        // Long enough for the floor to read the first piece on its own.
        thread::sleep(Duration::from_millis(50));
        stream.write_all(second).unwrap();
        assert_eq!(read_exact(&mut stream, keep_alive().len()), keep_alive());
        stream.write_all(GET_1_0).unwrap();
        assert_eq!(read_to_end(&mut stream), close());
    }

    #[test]
    fn http_1_0_gets_the_close_answer_then_end_of_stream() {
        let (http, _) = start(&args());
        let mut stream = connect(http);
        stream.write_all(GET_1_0).unwrap();
        assert_eq!(read_to_end(&mut stream), close());
    }

    #[test]
    fn http_1_0_with_keep_alive_stays_open() {
        let (http, _) = start(&args());
        let mut stream = connect(http);
        let request = b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
        for _ in 0..2 {
            stream.write_all(request).unwrap();
            assert_eq!(read_exact(&mut stream, keep_alive().len()), keep_alive());
        }
    }

    #[test]
    fn body_size_sets_body_and_content_length() {
        let (http, _) = start(&Args {
            body_size: Some(2000),
            ..args()
        });
        let mut stream = connect(http);
        stream.write_all(GET_1_0).unwrap();
        let got = read_to_end(&mut stream);
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head_len) = response.parse(&got).unwrap() else {
            panic!("incomplete head: {got:?}");
        };
        assert_eq!(response.code, Some(200));
        let content_length = response.headers.iter().find(|h| h.name == "Content-Length");
        assert_eq!(content_length.unwrap().value, b"2000");
        assert_eq!(got[head_len..], HELLO.repeat(143)[..2000]);
    }

    #[test]
    fn echo_returns_everything_in_order() {
        let (_, echo) = start(&args());
        let mut stream = connect(echo);
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut writer = stream.try_clone().unwrap();
        let data = sent.clone();
        // Written while the answer is read, so neither side's buffers need to hold it all.
        let writing = thread::spawn(move || {
            let mut rest = &data[..];
            for size in [1, 7, 1000, 4096, 20_000].iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, tail) = rest.split_at((*size).min(rest.len()));
                writer.write_all(piece).unwrap();
                rest = tail;
            }
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let got = read_to_end(&mut stream);
        writing.join().unwrap();
        assert!(
            got == sent,
            "echoed {} bytes, not the 100000 sent",
            got.len()
        );
    }

    #[test]
    fn two_threads_serve_http_and_echo() {
        let (http, echo) = start(&Args {
            threads: NonZeroUsize::new(2).unwrap(),
            ..args()
        });
        // All open at once, so both threads' polls see the connects.
        let mut https: Vec<_> = (0..8).map(|_| connect(http)).collect();
        let mut echos: Vec<_> = (0..8).map(|_| connect(echo)).collect();
        for stream in &mut https {
            stream.write_all(GET_1_0).unwrap();
            assert_eq!(read_to_end(stream), close());
        }
        for stream in &mut echos {
            stream.write_all(b"ping").unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            assert_eq!(read_to_end(stream), b"ping");
        }
    }

    #[test]
    fn an_address_in_use_is_one_line_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let Err(error) = Floor::bind(&Args {
            http: addr,
            ..args()
        }) else {
            panic!("bound {addr} twice");
        };
        // No cause chain: `main` prints the message alone (and a backtrace if one is asked for).
        assert_eq!(error.chain().count(), 1);
        let message = error.to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }
}
