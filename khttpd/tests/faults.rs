//! Faults: SIGTERM in the middle of a load finishes the answers in flight and exits 0; `kill -9`
//! leaves no program attached, and a new server on the same ports serves within a second.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::{bpf_allowed, eventually, loaded_program_ids, Mode, Server};

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: faults\r\n\r\n";

/// The length of the answer to `REQUEST` (it never changes: the Date has a fixed width).
fn answer_len(server: &Server) -> usize {
    let mut stream = TcpStream::connect(server.http_addr()).unwrap();
    stream.write_all(REQUEST).unwrap();
    let mut answer = vec![0; 4096];
    stream.read(&mut answer).unwrap()
}

/// Keep-alive clients asking in a loop until `stop`; counts whole answers, and answers cut short
/// (any byte of an answer without the rest), which must never happen.
fn load(
    server: &Server,
    clients: usize,
    stop: &Arc<AtomicBool>,
) -> (Vec<thread::JoinHandle<()>>, Arc<AtomicU64>, Arc<AtomicU64>) {
    let len = answer_len(server);
    let (whole, cut) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let addr = server.http_addr();
    let handles = (0..clients)
        .map(|_| {
            let (stop, whole, cut) = (Arc::clone(stop), Arc::clone(&whole), Arc::clone(&cut));
            thread::spawn(move || {
                let Ok(mut stream) = TcpStream::connect(addr) else {
                    return;
                };
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut answer = vec![0; len];
                while !stop.load(Ordering::Relaxed) {
                    if stream.write_all(REQUEST).is_err() {
                        return;
                    }
                    let mut got = 0;
                    while got < len {
                        match stream.read(&mut answer[got..]) {
                            Ok(0) => break,
                            Ok(n) => got += n,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    match got {
                        0 => return,
                        n if n == len => whole.fetch_add(1, Ordering::Relaxed),
                        _ => {
                            cut.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                }
            })
        })
        .collect();
    (handles, whole, cut)
}

#[test]
fn sigterm_under_load_finishes_answers_in_flight_and_exits_zero() {
    let mut modes = vec![(Mode::UserUnbound, "cmwq"), (Mode::UserUnbound, "thread")];
    if bpf_allowed() {
        modes.push((Mode::Kernel, "cmwq"));
    }
    for (mode, dispatch) in modes {
        let server = Server::start(mode, &["--dispatch", dispatch]);
        let stop = Arc::new(AtomicBool::new(false));
        let (clients, whole, cut) = load(&server, 16, &stop);
        thread::sleep(Duration::from_millis(500));
        let before = whole.load(Ordering::Relaxed);
        let started = Instant::now();
        let status = server.terminate();
        let stopped_in = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        for client in clients {
            client.join().unwrap();
        }
        assert_eq!(status.code(), Some(0), "{mode:?} {dispatch}");
        assert!(
            stopped_in < Duration::from_secs(5),
            "{mode:?} {dispatch}: {stopped_in:?}"
        );
        assert!(
            before > 100,
            "{mode:?} {dispatch}: only {before} answers before SIGTERM"
        );
        assert_eq!(
            cut.load(Ordering::Relaxed),
            0,
            "{mode:?} {dispatch}: answers cut short by the shutdown"
        );
    }
}

#[test]
fn kill_9_leaves_no_program_attached_and_a_restart_serves_within_a_second() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(Mode::Kernel, &[]);
    let (echo_port, http_port, metrics) = (server.echo_port, server.http_port, server.metrics_addr);
    let stop = Arc::new(AtomicBool::new(false));
    let (clients, whole, _) = load(&server, 8, &stop);
    thread::sleep(Duration::from_millis(300));
    assert!(server.metric("khttpd_http_kernel_responses_total") > 0);
    let (programs, _) = server.bpf_ids();
    assert!(!programs.is_empty());
    server.kill();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    assert!(whole.load(Ordering::Relaxed) > 0);
    // Nothing was pinned: the programs go with the process's file descriptors.
    let unloaded = || !loaded_program_ids().iter().any(|id| programs.contains(id));
    assert!(
        eventually(Duration::from_secs(5), unloaded),
        "programs {programs:?} still loaded after kill -9"
    );
    let restarted = Instant::now();
    let server = Server::start_on(Mode::Kernel, &[], echo_port, http_port, metrics);
    let mut stream = TcpStream::connect(server.http_addr()).unwrap();
    stream.write_all(REQUEST).unwrap();
    let mut answer = vec![0; 4096];
    let n = stream.read(&mut answer).unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK"));
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(1), "serving again took {took:?}");
}
