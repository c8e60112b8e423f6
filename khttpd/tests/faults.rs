//! Faults: SIGTERM in the middle of a load finishes the answers in flight and exits 0; `kill -9`
//! leaves no program attached, and a new server on the same ports serves within a second.

mod common;

use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use common::{ask, KHTTPD};
use khttpd_harness::{
    bpf::loaded_program_ids, eventually, process::wait_bounded, system::bpf_allowed,
    system::temp_dir, Mode, Server,
};

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
        let server = Server::start(KHTTPD, mode, &["--dispatch", dispatch]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (clients, whole, cut) = load(&server, 16, &stop);
        // Under load: the clients have been answered for a while.
        let loaded = eventually(Duration::from_secs(10), || {
            whole.load(Ordering::Relaxed) >= 500
        });
        assert!(loaded, "{mode:?}/{dispatch}: no load");
        let before = whole.load(Ordering::Relaxed);
        let started = Instant::now();
        let status = server.terminate().unwrap();
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
    let server = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    let ports = [
        ("--echo-port", server.echo_addr().port().to_string()),
        ("--port", server.http_addr().port().to_string()),
        ("--metrics", server.metrics_addr().to_string()),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let (clients, whole, _) = load(&server, 8, &stop);
    let answered = eventually(Duration::from_secs(10), || {
        server.metrics().unwrap()["khttpd_http_kernel_responses_total"] > 0
    });
    assert!(answered, "the kernel answered nothing");
    let (programs, _) = server.bpf_ids().unwrap();
    assert!(!programs.is_empty());
    server.kill().unwrap();
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
    let mut khttpd = Mode::Kernel.command(KHTTPD);
    for (flag, value) in &ports {
        khttpd.arg(flag).arg(value);
    }
    let server = Server::start_command(khttpd).unwrap();
    let mut stream = TcpStream::connect(server.http_addr()).unwrap();
    stream.write_all(REQUEST).unwrap();
    let mut answer = vec![0; 4096];
    let n = stream.read(&mut answer).unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK"));
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(1), "serving again took {took:?}");
}

/// A khttpd whose kernel refuses it BPF: a seccomp filter makes bpf(2) — every command, or only
/// `command` — fail with `errno`, as a kernel built without BPF (ENOSYS), a container that forbids
/// it, or a kernel that refuses program loads (BPF_PROG_LOAD: EACCES) would.
fn khttpd_refused_bpf(mode: Mode, command: Option<u32>, errno: i32) -> Command {
    use std::os::unix::process::CommandExt as _;
    let filter = refuse_bpf_filter(command, errno);
    let mut khttpd = Command::new(KHTTPD);
    khttpd.args(mode.args());
    // SAFETY: between fork and exec only prctl runs (no allocation): the filter was built before.
    unsafe {
        khttpd.pre_exec(move || {
            let program = SockFprog {
                len: filter.len() as u16,
                filter: filter.as_ptr(),
            };
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            // SECCOMP_MODE_FILTER; the kernel copies the program during the call.
            if libc::prctl(libc::PR_SET_SECCOMP, 2, &raw const program) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    khttpd
}

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

/// A classic-BPF seccomp program: bpf(2) (with `command` as its first argument, if given) fails
/// with `errno`; everything else is allowed.
fn refuse_bpf_filter(command: Option<u32>, errno: i32) -> Vec<SockFilter> {
    const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const AUDIT_ARCH: u32 = 0xc000_00b7;
    let op = |code, k| SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    // seccomp_data: the syscall number at 0, the architecture at 4, args[0] (low half) at 16.
    // Each test falls through when it matches and jumps to the final ALLOW when it does not.
    let mut filter = vec![
        op(LOAD_WORD, 4),
        op(JUMP_IF_EQUAL, AUDIT_ARCH),
        op(LOAD_WORD, 0),
        op(JUMP_IF_EQUAL, libc::SYS_bpf as u32),
    ];
    if let Some(command) = command {
        filter.extend([op(LOAD_WORD, 16), op(JUMP_IF_EQUAL, command)]);
    }
    filter.push(op(RETURN, 0x0005_0000 | errno as u32)); // SECCOMP_RET_ERRNO
    filter.push(op(RETURN, 0x7fff_0000)); // SECCOMP_RET_ALLOW
    let allow = filter.len() - 1;
    for (at, instruction) in filter.iter_mut().enumerate() {
        if instruction.code == JUMP_IF_EQUAL {
            instruction.jf = (allow - at - 1) as u8;
        }
    }
    filter
}

#[test]
fn a_kernel_that_refuses_bpf_means_user_space_or_one_clear_error() {
    if !bpf_allowed() {
        return;
    }
    const BPF_PROG_LOAD: u32 = 5;
    let refusals = [
        (
            "no bpf(2) at all",
            None,
            libc::ENOSYS,
            "Function not implemented",
        ),
        // Every program load refused, aya's own feature probes included, so the object fails
        // before the verifier would see the programs.
        (
            "program loads refused",
            Some(BPF_PROG_LOAD),
            libc::EACCES,
            "loading the BPF object",
        ),
    ];
    for (refusal, command, errno, reason) in refusals {
        // --fast-path on: exit at once, one line saying why.
        let mut on = khttpd_refused_bpf(Mode::Kernel, command, errno);
        on.args(["--port", "0"])
            .args(["--echo-port", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = on.spawn().unwrap();
        let status = wait_bounded(&mut child, Duration::from_secs(20)).expect("exits");
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("khttpd: error:"))
            .collect();
        assert!(!status.success(), "{refusal}: {stderr}");
        assert!(
            errors.len() == 1 && errors[0].contains(reason),
            "{refusal}: {stderr}"
        );
        // --fast-path auto: one warning, and both services from user space.
        let khttpd = khttpd_refused_bpf(Mode::Auto, command, errno);
        let server = Server::start_command(khttpd).unwrap();
        let mut stream = TcpStream::connect(server.http_addr()).unwrap();
        assert_eq!(
            ask(&mut stream, REQUEST),
            (200, b"Hello, World!\n".to_vec()),
            "{refusal}"
        );
        let mut echo = TcpStream::connect(server.echo_addr()).unwrap();
        echo.write_all(b"still here").unwrap();
        let mut back = [0u8; 10];
        echo.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"still here");
        let log = server.log();
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("serving from user space"))
            .collect();
        assert!(
            warnings.len() == 1 && warnings[0].contains(reason),
            "{refusal}: {log}"
        );
        assert!(server.terminate().unwrap().success(), "{refusal}");
    }
}

/// A folder with `count` small files, each naming its version.
struct Folder(tempfile::TempDir);

impl Folder {
    fn create(name: &str, count: usize) -> Folder {
        let folder = Folder(temp_dir(name).unwrap());
        for i in 0..count {
            folder.write(i, 1);
        }
        folder
    }

    fn write(&self, file: usize, version: u32) {
        std::fs::write(
            self.0.path().join(format!("{file}.txt")),
            Folder::content(file, version),
        )
        .unwrap();
    }

    fn content(file: usize, version: u32) -> Vec<u8> {
        format!("file {file}, version {version}\n").into_bytes()
    }

    fn root(&self) -> &str {
        self.0.path().to_str().unwrap()
    }
}

fn get(file: usize) -> Vec<u8> {
    format!("GET /{file}.txt HTTP/1.1\r\nHost: faults\r\n\r\n").into_bytes()
}

/// Maps that refuse updates (frozen from outside while the server runs): the kernel cannot learn,
/// cannot be told what user space answered, cannot take new connections, cannot forget — and
/// every answer is still the current file, from user space where the kernel cannot be trusted.
#[test]
fn failing_map_updates_degrade_to_user_space_never_to_a_wrong_answer() {
    if !bpf_allowed() {
        return;
    }
    use khttpd_common::http::{
        ANSWERED_MAP, CONNECTIONS_MAP, DATES_MAP, REQUESTS_MAP, RESPONSES_MAP,
    };
    for frozen in [
        REQUESTS_MAP,
        ANSWERED_MAP,
        CONNECTIONS_MAP,
        RESPONSES_MAP,
        DATES_MAP,
    ] {
        let folder = Folder::create("frozen", 2);
        let server = Server::start(KHTTPD, Mode::Kernel, &["--root", folder.root()]).unwrap();
        let mut early = TcpStream::connect(server.http_addr()).unwrap();
        early
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for _ in 0..5 {
            assert_eq!(ask(&mut early, &get(0)), (200, Folder::content(0, 1)));
        }
        let taught = server.metrics().unwrap()["khttpd_http_kernel_responses_total"];
        assert!(
            taught >= 3,
            "{frozen}: the kernel answered {taught} of 5 before the fault"
        );
        khttpd_harness::bpf::freeze(server.pid(), frozen).unwrap();
        // A change the kernel must forget, a file it never learned, connections old and new.
        let changes = server.metrics().unwrap()["khttpd_http_site_changes_total"];
        folder.write(0, 2);
        assert!(
            eventually(Duration::from_secs(5), || {
                server.metrics().unwrap()["khttpd_http_site_changes_total"] > changes
            }),
            "{frozen}: the change was not seen"
        );
        let mut late = TcpStream::connect(server.http_addr()).unwrap();
        late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for round in 0..20 {
            for stream in [&mut early, &mut late] {
                assert_eq!(
                    ask(stream, &get(0)),
                    (200, Folder::content(0, 2)),
                    "{frozen}, round {round}"
                );
                assert_eq!(
                    ask(stream, &get(1)),
                    (200, Folder::content(1, 1)),
                    "{frozen}, round {round}"
                );
            }
        }
        if frozen == DATES_MAP {
            // Its Date would be old: the kernel answers nothing once a refresh has failed.
            server
                .log_with(&["cannot refresh the kernel's Date"])
                .unwrap();
            let before = server.metrics().unwrap()["khttpd_http_kernel_responses_total"];
            for _ in 0..10 {
                assert_eq!(ask(&mut late, &get(1)), (200, Folder::content(1, 1)));
            }
            let after = server.metrics().unwrap()["khttpd_http_kernel_responses_total"];
            assert_eq!(
                after, before,
                "the kernel answered with a Date it could not refresh"
            );
        }
        let log = server.log();
        assert!(!log.contains("panicked"), "{frozen}: {log}");
        assert!(server.terminate().unwrap().success(), "{frozen}");
    }
}

/// More distinct answers than the kernel has slots (256): the rest come from user space, all exact.
#[test]
fn a_full_kernel_table_sends_the_rest_from_user_space() {
    if !bpf_allowed() {
        return;
    }
    let files = 400;
    let folder = Folder::create("full", files);
    let server = Server::start(KHTTPD, Mode::Kernel, &["--root", folder.root()]).unwrap();
    let mut stream = TcpStream::connect(server.http_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..3 {
        for file in 0..files {
            assert_eq!(
                ask(&mut stream, &get(file)),
                (200, Folder::content(file, 1))
            );
        }
    }
    let metrics = server.metrics().unwrap();
    let entries = metrics["khttpd_http_kernel_cache_entries"];
    let kernel = metrics["khttpd_http_kernel_responses_total"];
    let unknown = metrics["khttpd_http_passed_total{reason=\"unknown_request\"}"];
    assert!((200..=256).contains(&entries), "{entries} cached");
    assert!(kernel >= 200, "the kernel answered {kernel}");
    assert!(
        unknown >= (files - 256) as u64,
        "user space answered {unknown} misses"
    );
}

/// Out of file descriptors (the server started with a limit of 64): connections past it wait in
/// the backlog while those open are served without delay, and are answered once descriptors are
/// free again; the warning is not repeated ten times a second.
#[test]
fn out_of_descriptors_newcomers_wait_and_the_others_are_served() {
    use std::os::unix::process::CommandExt as _;
    let mut khttpd = Mode::UserUnbound.command(KHTTPD);
    // SAFETY: only setrlimit (one system call) between fork and exec.
    unsafe {
        khttpd.pre_exec(|| khttpd_harness::system::set_fd_limit(64, 64));
    }
    let server = Server::start_command(khttpd).unwrap();
    let connect = || {
        let stream = TcpStream::connect(server.http_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    };
    let mut held: Vec<TcpStream> = (0..30).map(|_| connect()).collect();
    for stream in &mut held {
        assert_eq!(ask(stream, REQUEST).0, 200);
    }
    // More than the descriptors left: some of these cannot be accepted.
    let mut waiting: Vec<TcpStream> = (0..40).map(|_| connect()).collect();
    for stream in &mut waiting {
        stream.write_all(REQUEST).unwrap();
    }
    server
        .log_with(&["accept failed: Too many open files"])
        .unwrap();
    let unanswered = waiting
        .iter()
        .filter(|stream| {
            stream.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            let waits =
                matches!(stream.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock);
            stream.set_nonblocking(false).unwrap();
            waits
        })
        .count();
    assert!(
        unanswered > 0,
        "every newcomer was answered: the limit was not reached"
    );
    let started = Instant::now();
    for stream in &mut held {
        assert_eq!(ask(stream, REQUEST).0, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "open connections stalled"
    );
    drop(held);
    for stream in &mut waiting {
        let mut answer = vec![0u8; 4096];
        let n = stream
            .read(&mut answer)
            .expect("answered once descriptors are free");
        assert!(answer[..n].starts_with(b"HTTP/1.1 200 OK"));
    }
    let log = server.log_with(&["accept failed"]).unwrap();
    let warnings = log.lines().filter(|l| l.contains("accept failed")).count();
    assert!((1..=2).contains(&warnings), "{warnings} warnings:\n{log}");
}
