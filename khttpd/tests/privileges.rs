//! Least privilege, read from the outside (/proc/<pid>): once started, the server is `nobody`
//! with no capabilities, confined to its document root, unable to gain privileges through
//! execve — and the kernel fast path still works, through the descriptors it opened as root.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use common::{ask, KHTTPD};
use khttpd_harness::{
    bpf::loaded_program_ids, eventually, system::bpf_allowed, system::temp_dir, Mode, Server,
};

/// The value of a `Name:\tvalue` line of /proc/<pid>/status.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

struct Folder(tempfile::TempDir);

impl Folder {
    fn create(name: &str) -> Folder {
        let folder = temp_dir(name).unwrap();
        let dir = folder.path();
        std::fs::create_dir_all(dir.join("root")).unwrap();
        std::fs::write(dir.join("root/page.txt"), "page\n").unwrap();
        std::fs::write(dir.join("outside.txt"), "outside\n").unwrap();
        std::os::unix::fs::symlink(dir.join("outside.txt"), dir.join("root/out")).unwrap();
        Folder(folder)
    }

    fn root(&self) -> std::path::PathBuf {
        self.0.path().join("root")
    }
}

/// `requests` keep-alive GETs of `path` on one connection; the statuses.
fn statuses(server: &Server, path: &str, requests: usize) -> Vec<u16> {
    let mut stream = khttpd_harness::http::connect(server.http_addr()).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n");
    (0..requests)
        .map(|_| ask(&mut stream, request.as_bytes()).0)
        .collect()
}

#[test]
fn after_start_the_server_is_nobody_without_capabilities_confined_to_the_root() {
    if !bpf_allowed() {
        return;
    }
    let folder = Folder::create("privileges");
    let root = folder.root();
    let server = Server::start(KHTTPD, Mode::Kernel, &["--root", root.to_str().unwrap()]).unwrap();
    let pid = server.pid();
    let nobody = "65534\t65534\t65534\t65534";
    assert_eq!(status_field(pid, "Uid"), nobody);
    assert_eq!(status_field(pid, "Gid"), nobody);
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Every thread, not only the one that dropped.
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
        assert!(status.contains(&format!("Uid:\t{nobody}")), "{status}");
    }
    // Its filesystem is the document root, and it holds no file outside it open: no path it
    // can name leads out, and without CAP_SYS_CHROOT it cannot leave.
    let jail = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
    assert_eq!(jail, std::fs::canonicalize(&root).unwrap());
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap();
        let target = target.to_string_lossy();
        let harmless = ["socket:", "anon_inode:", "pipe:", "/dev/null"];
        assert!(
            harmless.iter().any(|prefix| target.starts_with(prefix)),
            "fd {:?} → {target}",
            fd.file_name()
        );
    }
    // It checked that the kernel refuses it a BPF program (the probe loads as root: unit test).
    let dropped = [
        "running as nobody (uid 65534, gid 65534), no capabilities, confined to",
        "loading BPF is refused",
    ];
    let log = server.log_with(&dropped).unwrap();
    assert!(dropped.iter().all(|line| log.contains(line)), "{log}");
    // A file outside the root through a symlink: not there for the server.
    assert_eq!(statuses(&server, "/out", 1), [404]);
    // The fast path works through what was opened as root: new connections go into the
    // sockhash, answers are taught, the kernel answers, counters are read.
    let before = server.metrics().unwrap()["khttpd_http_kernel_responses_total"];
    assert!(statuses(&server, "/page.txt", 40).iter().all(|&s| s == 200));
    let answered = server.metrics().unwrap()["khttpd_http_kernel_responses_total"] - before;
    assert!(answered >= 30, "the kernel answered {answered} of 40");
    let mut echo = TcpStream::connect(server.echo_addr()).unwrap();
    echo.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    echo.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    assert!(server.metrics().unwrap()["khttpd_echo_kernel_bytes_total"] >= 4);
    // And it still cleans up: exit 0, none of its programs left.
    let (programs, _) = server.bpf_ids().unwrap();
    assert!(!programs.is_empty());
    assert!(server.terminate().unwrap().success());
    // The kernel frees programs after their last descriptor closes, not at once.
    let unloaded = || !loaded_program_ids().iter().any(|id| programs.contains(id));
    assert!(
        eventually(Duration::from_secs(5), unloaded),
        "programs {programs:?} still loaded"
    );
}

/// Starts khttpd expecting it to fail; its last stderr line.
fn start_fails(args: &[&str]) -> String {
    let output = Command::new(KHTTPD)
        .args(["--fast-path", "off"])
        .args(["--port", "0"])
        .args(["--echo-port", "0"])
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr.lines().last().unwrap_or_default().to_owned()
}

#[test]
fn user_root_keeps_privileges_and_unknown_users_or_closed_roots_are_refused() {
    if !bpf_allowed() {
        return;
    }
    let server = Server::start(KHTTPD, Mode::UserUnbound, &["--user", "root"]).unwrap();
    assert!(status_field(server.pid(), "Uid").starts_with("0\t"));
    drop(server);
    assert_eq!(
        start_fails(&["--user", "no-such-user-khttpd"]),
        "khttpd: error: --user no-such-user-khttpd: no such user"
    );
    // A folder only root may read: refused at start rather than 403 for everything.
    let folder = Folder::create("closed");
    let root = folder.root();
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let error = start_fails(&["--root", root.to_str().unwrap()]);
    assert!(
        error.ends_with("not readable as --user nobody: Permission denied (os error 13)"),
        "{error}"
    );
}
