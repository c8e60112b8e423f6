//! The echo service against a real server process: real sockets on loopback, real BPF programs.

mod common;

use std::{
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use common::KHTTPD;
use khttpd_common::echo;
use khttpd_harness::{
    bpf::loaded_program_ids, eventually, process::wait_bounded, server::ALL_MODES,
    system::bpf_allowed, Mode, Server,
};
use rand::{Rng, RngCore, SeedableRng};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

const CLIENT_LIMIT: Duration = Duration::from_secs(60);

/// Sends `payload` while reading the echo concurrently (a large payload would otherwise fill both
/// directions' buffers), and returns what came back.
async fn echo(addr: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut reader, mut writer) = stream.into_split();
    let mut echoed = vec![0; payload.len()];
    let write = async {
        writer.write_all(payload).await?;
        Ok::<_, io::Error>(writer)
    };
    let read = reader.read_exact(&mut echoed);
    let (writer, _) = tokio::try_join!(write, read)?;
    drop(writer);
    Ok(echoed)
}

/// Random payloads from 1 B to 1 MiB, log-uniform so both tiny and huge sizes are common.
fn payloads(count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let len = 2f64.powf(rng.gen_range(0.0..=20.0)).round() as usize;
            let mut payload = vec![0; len.clamp(1, 1 << 20)];
            rng.fill_bytes(&mut payload);
            payload
        })
        .collect()
}

async fn echo_all_concurrently(addr: SocketAddr, payloads: &[Vec<u8>]) -> u64 {
    let mut clients = tokio::task::JoinSet::new();
    for (i, payload) in payloads.iter().enumerate() {
        let payload = payload.clone();
        clients.spawn(async move {
            let echoed = timeout(CLIENT_LIMIT, echo(addr, &payload))
                .await
                .expect("echo timed out")
                .expect("echo failed");
            assert!(
                echoed == payload,
                "client {i}: {} bytes came back different",
                payload.len()
            );
            payload.len() as u64
        });
    }
    let mut total = 0;
    while let Some(sent) = clients.join_next().await {
        total += sent.unwrap();
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_payloads_come_back_exactly_in_every_mode() {
    for mode in ALL_MODES {
        if mode == Mode::Kernel && !bpf_allowed() {
            continue;
        }
        let server = Server::start(KHTTPD, mode, &[]).unwrap();
        let sent = echo_all_concurrently(server.echo_addr(), &payloads(200, 7)).await;

        let metrics = server.metrics().unwrap();
        let kernel_bytes = metrics.get("khttpd_echo_kernel_bytes_total").unwrap_or(0);
        let user_bytes = metrics["khttpd_echo_user_bytes_total"];
        if mode == Mode::Kernel {
            // Proof the kernel answered: it accounts for every byte, user space read none.
            assert_eq!((kernel_bytes, user_bytes), (sent, 0), "{mode:?}");
            assert_eq!(metrics["khttpd_echo_kernel_passes_total"], 0);
            assert_eq!(
                metrics["khttpd_echo_connections_total{path=\"kernel\"}"],
                200
            );
        } else {
            assert_eq!(user_bytes, sent, "{mode:?}");
            assert_eq!(metrics["khttpd_echo_connections_total{path=\"user\"}"], 200);
        }
        assert_eq!(server.terminate().unwrap().code(), Some(0), "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_closed_clients_get_everything_back() {
    for mode in ALL_MODES {
        if mode == Mode::Kernel && !bpf_allowed() {
            continue;
        }
        let server = Server::start(KHTTPD, mode, &[]).unwrap();
        let payload = &payloads(1, 11)[0];
        let payload: Vec<u8> = payload.iter().chain(payload).copied().collect();
        let mut stream = TcpStream::connect(server.echo_addr()).await.unwrap();
        let exchange = async {
            let (mut reader, mut writer) = stream.split();
            let write = async {
                writer.write_all(&payload).await?;
                // Done sending; the server must still send everything back before closing.
                writer.shutdown().await
            };
            let mut echoed = Vec::new();
            let read = reader.read_to_end(&mut echoed);
            tokio::try_join!(write, read)?;
            Ok::<_, io::Error>(echoed)
        };
        let echoed = timeout(CLIENT_LIMIT, exchange)
            .await
            .expect("timed out")
            .unwrap();
        assert!(
            echoed == payload,
            "{mode:?}: got {} of {} bytes",
            echoed.len(),
            payload.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_send_right_after_connect_are_all_echoed() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    let addr = server.echo_addr();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        clients.spawn(async move {
            let message = format!("early bytes from client {i}\n");
            // No pause between connect and send: the bytes usually arrive before the server has
            // accepted the socket and put it in the sockhash.
            let echoed = timeout(Duration::from_secs(30), echo(addr, message.as_bytes())).await;
            (
                i,
                echoed.map(|r| r.map(|bytes| bytes == message.as_bytes())),
            )
        });
    }
    let mut failed = Vec::new();
    while let Some(result) = clients.join_next().await {
        let (i, outcome) = result.unwrap();
        if !matches!(outcome, Ok(Ok(true))) {
            failed.push((i, format!("{outcome:?}")));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 1000 clients not echoed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert_eq!(server.metrics().unwrap()["khttpd_echo_user_bytes_total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connections_leave_the_echo_maps_and_the_fd_table() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    // Settled: the start-up metrics scrape's socket may still be closing.
    let mut baseline_fds = server.fd_count().unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(100));
        let now = server.fd_count().unwrap();
        std::mem::replace(&mut baseline_fds, now) == now
    }));
    assert_eq!(server.map_entries(echo::SOCKETS_MAP).unwrap(), 0);

    let mut streams = Vec::new();
    for i in 0..300 {
        let mut stream = TcpStream::connect(server.echo_addr()).await.unwrap();
        let message = format!("hold {i}");
        stream.write_all(message.as_bytes()).await.unwrap();
        let mut echoed = vec![0; message.len()];
        timeout(CLIENT_LIMIT, stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        streams.push(stream);
    }
    // And three that fall behind: detached, echoed in user space (or, rarely, reset at once).
    let behind: Vec<_> = (0..3)
        .map(|_| send_until_held_back(server.echo_addr(), 64 * 1024))
        .filter(|(_, _, reset)| !reset)
        .map(|(stream, _, _)| stream)
        .collect();
    let held = behind.len();
    // A reset is rare (about 1 client in 10, issue 15): all three would leave nothing to check.
    assert!(held > 0, "all three clients that fell behind were reset");
    let maps = || {
        [echo::SOCKETS_MAP, echo::DETACHED_MAP, echo::CONNECTIONS_MAP]
            .map(|name| server.map_entries(name).unwrap())
    };
    assert!(
        eventually(Duration::from_secs(5), || maps() == [300, held, 300 + held]),
        "{:?}, {held} held",
        maps()
    );
    assert!(eventually(Duration::from_secs(5), || server
        .fd_count()
        .unwrap()
        == baseline_fds + 300 + held));

    drop(streams);
    drop(behind);
    let drained = eventually(Duration::from_secs(10), || {
        maps() == [0, 0, 0] && server.fd_count().unwrap() == baseline_fds
    });
    assert!(
        drained,
        "sockets, detached, records {:?}, fds {} (baseline {baseline_fds})",
        maps(),
        server.fd_count().unwrap()
    );
    assert_eq!(
        server.metrics().unwrap()["khttpd_echo_kernel_connections"],
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_detaches_every_program() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    // Open connections must not hold shutdown up.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(server.echo_addr()).await.unwrap());
    }
    let (programs, maps) = server.bpf_ids().unwrap();
    assert!(
        !programs.is_empty(),
        "a kernel-mode server holds its programs"
    );
    assert!(loaded_program_ids().iter().any(|id| programs.contains(id)));

    let status = server.terminate().unwrap();
    assert_eq!(status.code(), Some(0));
    // The kernel frees programs and maps shortly after the last reference goes (deferred work).
    let freed = eventually(Duration::from_secs(5), || {
        let loaded = loaded_program_ids();
        !programs.iter().any(|id| loaded.contains(id))
            && maps
                .iter()
                .all(|&id| aya::maps::MapInfo::from_id(id).is_err())
    });
    assert!(
        freed,
        "programs {programs:?} or maps {maps:?} still exist after exit"
    );
    // The connections were closed by the server.
    for mut stream in idle {
        let mut byte = [0u8; 1];
        let n = timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .unwrap();
        assert!(
            matches!(n, Ok(0) | Err(_)),
            "connection still open after shutdown"
        );
    }
}

#[tokio::test]
async fn ebpf_log_records_reach_the_server_log_at_verbose() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::Kernel, &["-v"]).unwrap();
    echo(server.echo_addr(), b"log me").await.unwrap();
    let record = "echo: peer closed, cookie";
    let log = server.log_with(&[record]).unwrap();
    assert!(
        log.contains(record),
        "no record from the eBPF program in:\n{log}"
    );
}

/// khttpd, optionally under a wrapper (`prefix`), with stderr captured, on ports the kernel
/// picks (port 0: never the default, which other servers may hold) unless `args` name the echo
/// port.
fn khttpd(prefix: &[&str], args: &[&str]) -> Command {
    let mut command = match prefix {
        [] => Command::new(KHTTPD),
        [program, rest @ ..] => {
            let mut command = Command::new(program);
            command.args(rest).arg(KHTTPD);
            command
        }
    };
    command
        .args(args)
        .args(["--port", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if !args.contains(&"--echo-port") {
        command.args(["--echo-port", "0"]);
    }
    command
}

/// Waits (bounded) for `child` to exit; returns its status and everything it wrote to stderr.
fn exit_and_stderr(child: &mut std::process::Child) -> (std::process::ExitStatus, String) {
    let status = wait_bounded(child, Duration::from_secs(20)).expect("khttpd should exit");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

/// Runs khttpd expecting it to fail at start-up; returns its one error line.
fn start_fails(prefix: &[&str], args: &[&str]) -> String {
    let (status, stderr) = exit_and_stderr(&mut khttpd(prefix, args).spawn().unwrap());
    assert!(
        !status.success(),
        "khttpd {args:?} should fail; stderr:\n{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    errors[0].to_owned()
}

#[test]
fn a_port_in_use_is_a_one_line_error() {
    // A port held by this test for as long as khttpd tries it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let error = start_fails(
        &[],
        &["--fast-path", "off", "--echo-port", &port.to_string()],
    );
    assert!(
        error.contains(&format!("cannot listen on 127.0.0.1:{port}")) && error.contains("in use"),
        "{error}"
    );
}

#[test]
fn an_unknown_interface_lists_the_real_ones() {
    let error = start_fails(&[], &["--fast-path", "off", "--iface", "nosuch0"]);
    assert!(
        error.contains("unknown interface `nosuch0`") && error.contains("lo"),
        "{error}"
    );
}

/// Runs khttpd as `nobody` with no capabilities.
const UNPRIVILEGED: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

#[test]
fn fast_path_on_without_capabilities_is_a_one_line_error() {
    if !bpf_allowed() {
        return;
    }
    let error = start_fails(UNPRIVILEGED, &["--fast-path", "on"]);
    assert!(
        error.contains("missing capability") && error.contains("CAP_BPF"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_auto_without_capabilities_serves_from_user_space() {
    if !bpf_allowed() {
        return;
    }
    // The default --fast-path (auto), as a process without capabilities.
    let command = match UNPRIVILEGED {
        [program, rest @ ..] => {
            let mut command = Command::new(program);
            command.args(rest).arg(KHTTPD);
            command
        }
        [] => unreachable!(),
    };
    let server = Server::start_command(command).unwrap();
    let echoed = timeout(
        Duration::from_secs(20),
        echo(server.echo_addr(), b"fallback"),
    )
    .await;
    assert_eq!(
        echoed.expect("no echo from the fallback server").ok(),
        Some(b"fallback".to_vec())
    );
    let stderr = server.log();
    assert_eq!(server.terminate().unwrap().code(), Some(0), "{stderr}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("missing capability"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning expected:\n{stderr}");
    assert!(warnings[0].contains("serving from user space"), "{stderr}");
}

/// A client that sends without reading. With sockmap, TCP's receive window never closes (the
/// verdict consumes every skb at once), so the kernel alone would queue its echo without bound
/// (1.2 GB in 4 s before the fix). The connection must move to user space, where TCP holds the
/// client back, and every byte must still come back in order once the client reads.
#[test]
fn clients_that_stop_reading_are_held_back_and_get_every_byte() {
    if !bpf_allowed() {
        return;
    }
    const MOST_HELD: u64 = 64 << 20;
    let server = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    for write_size in [64 * 1024, 100] {
        let (stream, sent, reset) = send_until_held_back(server.echo_addr(), write_size);
        assert!(
            sent < MOST_HELD,
            "{write_size} B writes: {sent} bytes taken from a client that does not read"
        );
        // The hand-over to user space loses nothing (issue 15: 4 resets in 30 runs before).
        let label = format!("{write_size} B writes");
        assert!(!read_back(stream, sent, reset, &label), "{label}: reset");
    }
    let metrics = server.metrics().unwrap();
    assert_eq!(
        metrics["khttpd_echo_kernel_detached_total"], 2,
        "{metrics:?}"
    );
    assert_eq!(metrics["khttpd_echo_kernel_passes_total"], 0, "{metrics:?}");
    assert!(metrics["khttpd_echo_kernel_bytes_total"] > 0, "{metrics:?}");
    assert_eq!(server.terminate().unwrap().code(), Some(0));
}

/// Many clients falling behind at once: each must get exactly what it sent. Before the detach
/// held TCP's wake-ups back (issue 15), now and then one was detached while the kernel was handing
/// it an skb, which the kernel then dropped (0–5 of 100 per run, reset after an exact prefix).
#[test]
fn clients_falling_behind_at_once_get_their_bytes_or_a_reset() {
    if !bpf_allowed() {
        return;
    }
    const CLIENTS: usize = 100;
    let server = Server::start(KHTTPD, Mode::Kernel, &[]).unwrap();
    let mut clients: Vec<(std::net::TcpStream, u64, Instant)> = (0..CLIENTS)
        .map(|_| {
            let stream = std::net::TcpStream::connect(server.echo_addr()).unwrap();
            stream.set_nodelay(true).unwrap();
            stream.set_nonblocking(true).unwrap();
            (stream, 0, Instant::now())
        })
        .collect();
    // Round-robin 64 KiB writes until every client is held back (500 ms without progress) or 10 s.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(10)
        && clients
            .iter()
            .any(|(_, _, progress)| progress.elapsed() < Duration::from_millis(500))
    {
        let mut moved = false;
        for (stream, sent, progress) in &mut clients {
            let chunk: Vec<u8> = (*sent..*sent + 64 * 1024).map(pattern_byte).collect();
            match stream.write(&chunk) {
                Ok(n) => {
                    *sent += n as u64;
                    *progress = Instant::now();
                    moved = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *progress = Instant::now() - Duration::from_secs(1), // reset, seen below
            }
        }
        sleep(Duration::from_millis(if moved { 1 } else { 10 }));
    }
    let resets = clients
        .into_iter()
        .enumerate()
        .filter(|(i, (stream, sent, _))| {
            stream.set_nonblocking(false).unwrap();
            read_back(
                stream.try_clone().unwrap(),
                *sent,
                false,
                &format!("client {i}"),
            )
        })
        .count();
    let detached = server.metrics().unwrap()["khttpd_echo_kernel_detached_total"];
    assert_eq!(detached, CLIENTS as u64);
    assert_eq!(
        resets, 0,
        "of {CLIENTS} clients, reset after a loss was found"
    );
    assert_eq!(server.terminate().unwrap().code(), Some(0));
}

/// Half-closes, reads everything the server sends back and checks it: all `sent` bytes in order,
/// or an exact prefix ended by a reset (`reset`: a write already met it, and reads then end as if
/// closed). Returns whether it was reset.
fn read_back(mut stream: std::net::TcpStream, sent: u64, reset: bool, label: &str) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let _ = stream.shutdown(Shutdown::Write);
    let mut echoed = Vec::new();
    let end = stream.read_to_end(&mut echoed);
    let first_wrong = (0..echoed.len()).find(|&i| echoed[i] != pattern_byte(i as u64));
    assert_eq!(
        first_wrong,
        None,
        "{label}: {} of {sent} bytes back",
        echoed.len()
    );
    match end {
        Ok(_) if reset => true,
        Ok(_) => {
            assert_eq!(echoed.len() as u64, sent, "{label}");
            false
        }
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Err(e) => panic!("{label}: {e} after {} of {sent} bytes", echoed.len()),
    }
}

/// The byte at `position` of what [`send_until_held_back`] sends.
fn pattern_byte(position: u64) -> u8 {
    (position % 251) as u8
}

/// Connects and sends `write_size`-byte writes without reading until the client is held back (no
/// byte taken for 500 ms), for at most 10 s or 512 MiB. Returns the connection, the bytes sent
/// and whether a write met a reset.
fn send_until_held_back(addr: SocketAddr, write_size: u64) -> (std::net::TcpStream, u64, bool) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream.set_nonblocking(true).unwrap();
    let (mut sent, started, mut progress) = (0u64, Instant::now(), Instant::now());
    while progress.elapsed() < Duration::from_millis(500)
        && started.elapsed() < Duration::from_secs(10)
        && sent < 512 << 20
    {
        let chunk: Vec<u8> = (sent..sent + write_size).map(pattern_byte).collect();
        match stream.write(&chunk) {
            Ok(n) => {
                sent += n as u64;
                progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => sleep(Duration::from_millis(1)),
            // Reset: the server found bytes lost as the connection left the kernel path.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (stream, sent, true),
            Err(e) => panic!("{write_size} B writes: {e} after {sent} bytes"),
        }
    }
    stream.set_nonblocking(false).unwrap();
    (stream, sent, false)
}
