//! Facts about this machine and its processes that tests and benches read, and the limits they
//! raise: root or not, descriptors and memory of a process, RLIMIT_NOFILE, a temp dir servers
//! can read.

use std::fs;

use anyhow::Context as _;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Whether this process may load BPF programs: as root, yes. Otherwise a test is skipped —
/// except under CI=true, where a missing capability is a failure.
pub fn bpf_allowed() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: BPF tests must run as root"
    );
    eprintln!("skipped: not root, cannot load BPF programs");
    false
}

/// A folder of its own under the system's temp dir, removed when dropped; readable by everyone,
/// as the servers serving it drop to `nobody` (and nginx's workers read it as theirs).
pub fn temp_dir(name: &str) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt as _;
    tempfile::Builder::new()
        .prefix(&format!("khttpd-{name}-"))
        .permissions(fs::Permissions::from_mode(0o755))
        .tempdir()
        .with_context(|| format!("cannot create a temporary directory for {name}"))
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> anyhow::Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&dir)
        .with_context(|| format!("cannot list {dir}"))?
        .count())
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`, …).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    kib_field(&status, field).with_context(|| format!("no {field} in {path}"))
}

/// A field of `/proc/meminfo` in KiB (`Slab`, …).
pub fn meminfo_kib(field: &str) -> anyhow::Result<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    kib_field(&meminfo, field).with_context(|| format!("no {field} in /proc/meminfo"))
}

/// The value of a `Name:   123 kB` line.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Bytes in a memory page.
pub fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// Clock ticks per second, the unit of `/proc/stat`.
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// This process's RLIMIT_NOFILE: (soft, hard).
pub fn fd_limit() -> (u64, u64) {
    let limit = getrlimit(Resource::Nofile);
    (
        limit.current.unwrap_or(u64::MAX),
        limit.maximum.unwrap_or(u64::MAX),
    )
}

/// Sets this process's RLIMIT_NOFILE (raising the hard limit needs CAP_SYS_RESOURCE). Between
/// fork and exec too: it is one system call.
pub fn set_fd_limit(soft: u64, hard: u64) -> std::io::Result<()> {
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(soft),
            maximum: Some(hard),
        },
    )
    .map_err(Into::into)
}

/// Raises this process's soft RLIMIT_NOFILE to at least `needed` (and the hard one, where
/// allowed); an error that says why when it cannot.
pub fn raise_fd_limit(needed: u64) -> anyhow::Result<()> {
    let (soft, hard) = fd_limit();
    if soft >= needed {
        return Ok(());
    }
    set_fd_limit(needed, hard.max(needed)).with_context(|| {
        format!(
            "{needed} file descriptors are needed, the hard limit is {hard} and this process \
             cannot raise it (no CAP_SYS_RESOURCE, or over /proc/sys/fs/nr_open: {})",
            fs::read_to_string("/proc/sys/fs/nr_open")
                .unwrap_or_default()
                .trim()
        )
    })
}
