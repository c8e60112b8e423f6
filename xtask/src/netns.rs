//! A test bed where a server has its own CPU: two network namespaces joined by a veth pair.
//!
//! Why: on shared loopback the load generator, the server and the kernel's receive processing all
//! compete for the same CPUs, so "CPU per request" mixes the client's cost into the server's. Here
//! the server side (its processes *and* the softirq work of its receive queue, steered with RPS) runs
//! on `server_cpus`, the client side on `client_cpus`, and each CPU's busy time in `/proc/stat` is
//! one side's cost. That is how a server with remote clients is deployed.
//!
//! Addresses stay in 127.0.0.0/8 although they cross a veth: `route_localnet=1` in both namespaces
//! lets 127/8 be routed, `lo` stays down there so 127/8 is not local, and each side has a /32
//! address plus a host route to the other. IPv6 is disabled in both namespaces before the veth
//! exists, so not even a link-local router solicitation leaves for another range.
//!
//! Clean-up: dropping the [`Testbed`] stops whatever still runs in the namespaces and deletes
//! them (the veth pair goes with them). An interrupt (SIGINT, SIGTERM, SIGHUP) does the same before
//! the process exits; every process started there also gets SIGKILL if this process dies
//! (`PR_SET_PDEATHSIG`, for as long as it keeps its user); namespaces left by a run that was killed
//! outright (SIGKILL) are deleted by the next run, found by the pid in their name.

use std::{
    fs::File,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Output, Stdio},
    sync::{Mutex, Once},
    thread,
};

use anyhow::{bail, Context as _};
use nix::{
    sched::{sched_setaffinity, setns, CloneFlags, CpuSet},
    sys::{prctl, signal::Signal},
    unistd::Pid,
};

/// Every namespace this bench makes is named `<PREFIX><pid>-<side>`.
const PREFIX: &str = "khttpd-cost-";

/// Namespaces that exist right now, for the interrupt handler.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Which end of the veth.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    Server,
    Client,
}

/// One namespace: its name, its end of the veth, its address and the CPUs that work for it.
struct End {
    name: String,
    veth: String,
    address: Ipv4Addr,
    cpus: Vec<usize>,
}

/// Two namespaces and the veth between them; dropped, both are deleted.
pub struct Testbed {
    server: End,
    client: End,
}

impl Testbed {
    /// Makes the namespaces, the veth pair, the addresses and routes, and steers each side's
    /// receive processing to its CPUs. Fails with a clear message where namespaces cannot be made.
    pub fn create(server_cpus: &[usize], client_cpus: &[usize]) -> anyhow::Result<Self> {
        install_interrupt_handler()?;
        remove_stale()?;
        let pid = std::process::id();
        let end = |side: &str, veth: &str, address, cpus: &[usize]| End {
            name: format!("{PREFIX}{pid}-{side}"),
            veth: format!("{veth}{pid}"),
            address,
            cpus: cpus.to_vec(),
        };
        let testbed = Self {
            server: end("srv", "kcs", Ipv4Addr::new(127, 1, 0, 1), server_cpus),
            client: end("cli", "kcc", Ipv4Addr::new(127, 1, 0, 2), client_cpus),
        };
        for end in [&testbed.server, &testbed.client] {
            ip(&["netns", "add", &end.name]).context(
                "cannot create a network namespace (this needs root: CAP_SYS_ADMIN and \
                 CAP_NET_ADMIN, and `ip` from iproute2)",
            )?;
            LIVE.lock().expect("not poisoned").push(end.name.clone());
            in_namespace(
                &end.name,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                    "net.ipv4.conf.all.route_localnet=1",
                    "net.ipv4.conf.default.route_localnet=1",
                ],
            )?;
        }
        let (server, client) = (&testbed.server, &testbed.client);
        ip(&[
            "link",
            "add",
            &server.veth,
            "netns",
            &server.name,
            "type",
            "veth",
            "peer",
            "name",
            &client.veth,
            "netns",
            &client.name,
        ])?;
        for (end, peer) in [(server, client), (client, server)] {
            let netns = ["-n", end.name.as_str()];
            let run = |args: &[&str]| ip(&[&netns[..], args].concat());
            run(&[
                "addr",
                "add",
                &format!("{}/32", end.address),
                "dev",
                &end.veth,
            ])?;
            run(&["link", "set", &end.veth, "up"])?;
            run(&[
                "route",
                "add",
                &format!("{}/32", peer.address),
                "dev",
                &end.veth,
            ])?;
            // The veth's one receive queue: packets arriving for this side are processed (softirq)
            // on this side's CPUs, whichever CPU sent them.
            in_namespace(
                &end.name,
                "sh",
                &[
                    "-c",
                    &format!(
                        "echo {} > /sys/class/net/{}/queues/rx-0/rps_cpus",
                        cpu_mask(&end.cpus),
                        end.veth
                    ),
                ],
            )?;
        }
        Ok(testbed)
    }

    fn end(&self, side: Side) -> &End {
        match side {
            Side::Server => &self.server,
            Side::Client => &self.client,
        }
    }

    /// The address of `side`'s end of the veth.
    pub fn address(&self, side: Side) -> Ipv4Addr {
        self.end(side).address
    }

    /// The name of `side`'s veth (the interface a server there listens on).
    pub fn veth(&self, side: Side) -> &str {
        &self.end(side).veth
    }

    /// The CPUs that work for `side`.
    pub fn cpus(&self, side: Side) -> &[usize] {
        &self.end(side).cpus
    }

    /// `program` to be run in `side`'s namespace on `side`'s CPUs, killed if this process dies.
    pub fn command(
        &self,
        side: Side,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        let end = self.end(side);
        let namespace = open_namespace(&end.name)?;
        let cpus = cpu_set(&end.cpus)?;
        let mut command = Command::new(program);
        // SAFETY: between fork and exec the closure only makes system calls (setns,
        // sched_setaffinity, prctl) on values prepared before the fork; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                setns(&namespace, CloneFlags::CLONE_NEWNET)?;
                sched_setaffinity(Pid::from_raw(0), &cpus)?;
                prctl::set_pdeathsig(Signal::SIGKILL)?;
                Ok(())
            });
        }
        Ok(command)
    }

    /// Runs `work` on a thread of this process that has joined `side`'s namespace and runs on
    /// `side`'s CPUs: sockets it opens are in that namespace.
    pub fn run_in<T: Send>(
        &self,
        side: Side,
        work: impl FnOnce() -> T + Send,
    ) -> anyhow::Result<T> {
        let end = self.end(side);
        let namespace = open_namespace(&end.name)?;
        let cpus = cpu_set(&end.cpus)?;
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    // A network namespace is per thread: only this one joins it.
                    setns(&namespace, CloneFlags::CLONE_NEWNET)
                        .context("cannot join the network namespace")?;
                    sched_setaffinity(Pid::from_raw(0), &cpus).context("cannot pin the thread")?;
                    Ok(work())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for end in [&self.server, &self.client] {
            delete(&end.name);
        }
    }
}

/// Deletes a namespace (its end of the veth goes with it, and with it the peer) and forgets it.
fn delete(name: &str) {
    stop_processes_in(name);
    if let Err(error) = ip(&["netns", "delete", name]) {
        eprintln!("cannot delete network namespace {name}: {error:#}");
    }
    LIVE.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .retain(|live| live != name);
}

/// Stops every process still in the namespace `name` — only this bench starts processes there:
/// SIGTERM (khttpd detaches its programs), up to 5 s, then SIGKILL. The parent-death signal is not
/// enough on its own: the kernel clears it when a process changes its user (khttpd's `--user`).
fn stop_processes_in(name: &str) {
    let pids = || -> Vec<Pid> {
        ip(&["netns", "pids", name])
            .map(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .map(Pid::from_raw)
                    .collect()
            })
            .unwrap_or_default()
    };
    for (signal, wait) in [(Signal::SIGTERM, 5), (Signal::SIGKILL, 5)] {
        let running = pids();
        if running.is_empty() {
            return;
        }
        for &pid in &running {
            let _ = nix::sys::signal::kill(pid, signal);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
        while !pids().is_empty() && std::time::Instant::now() < deadline {
            thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: stop what runs in the namespaces, delete them, then exit as
/// interrupted.
fn install_interrupt_handler() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = ctrlc::set_handler(|| {
            let live = LIVE
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            for name in live {
                delete(&name);
            }
            eprintln!("interrupted: network namespaces removed");
            std::process::exit(130);
        })
        .context("cannot install the interrupt handler");
    });
    result
}

/// Deletes namespaces of earlier runs whose process no longer exists (killed with SIGKILL).
fn remove_stale() -> anyhow::Result<()> {
    let listing = ip(&["netns", "list"])?;
    for name in String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
    {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            eprintln!("removing network namespace {name}, left by a run that was killed");
            delete(name);
        }
    }
    Ok(())
}

/// The names of the network namespaces this process made and has not deleted yet.
#[cfg(test)]
fn live() -> Vec<String> {
    LIVE.lock().expect("not poisoned").clone()
}

/// Whether a namespace of this name exists.
#[cfg(test)]
fn exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn open_namespace(name: &str) -> anyhow::Result<File> {
    let path = Path::new("/run/netns").join(name);
    File::open(&path).with_context(|| format!("cannot open {}", path.display()))
}

fn cpu_set(cpus: &[usize]) -> anyhow::Result<CpuSet> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).with_context(|| format!("no CPU {cpu}"))?;
    }
    Ok(set)
}

/// `rps_cpus`'s hexadecimal mask of `cpus`.
fn cpu_mask(cpus: &[usize]) -> String {
    let mask = cpus.iter().fold(0u128, |mask, &cpu| mask | 1 << cpu);
    format!("{mask:x}")
}

/// `program args…` inside the namespace `name` (`ip netns exec`, which also mounts that
/// namespace's /sys).
fn in_namespace(name: &str, program: &str, args: &[&str]) -> anyhow::Result<Output> {
    ip(&[&["netns", "exec", name, program][..], args].concat())
}

/// `ip args…`, an error with its stderr if it fails.
fn ip(args: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (iproute2)")?;
    if !output.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root is needed to make namespaces: outside CI these tests are skipped without it, under
    /// `CI=true` they fail.
    fn privileged() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            assert!(
                std::env::var_os("CI").is_none_or(|ci| ci != "true"),
                "CI=true: network namespace tests need root"
            );
            eprintln!("skipped: not root");
        }
        root
    }

    #[test]
    fn cpu_masks() {
        assert_eq!(cpu_mask(&[0]), "1");
        assert_eq!(cpu_mask(&[1]), "2");
        assert_eq!(cpu_mask(&[0, 1, 5]), "23");
    }

    #[test]
    fn the_sides_reach_each_other_and_nothing_is_left_after_a_failure() {
        if !privileged() {
            return;
        }
        let mut names = Vec::new();
        let failed: anyhow::Result<()> = (|| {
            let testbed = Testbed::create(&[0], &[0])?;
            names = live();
            assert_eq!(names.len(), 2);
            assert!(names.iter().all(|name| exists(name)));
            let server = testbed.address(Side::Server);
            // A listener in the server namespace, a client in the other.
            let listener = testbed.run_in(Side::Server, || {
                std::net::TcpListener::bind((server, 0)).map_err(anyhow::Error::from)
            })??;
            let port = listener.local_addr()?.port();
            testbed.run_in(Side::Client, || {
                std::net::TcpStream::connect((server, port)).map_err(anyhow::Error::from)
            })??;
            // Not reachable from this (the host's) namespace.
            assert!(std::net::TcpStream::connect((server, port)).is_err());
            // A process started there sees only the veth and the loopback that stays down.
            let output = testbed
                .command(Side::Server, "ip")?
                .args(["-o", "link"])
                .output()?;
            let links = String::from_utf8_lossy(&output.stdout);
            assert!(links.contains(testbed.veth(Side::Server)), "{links}");
            assert_eq!(links.lines().count(), 2, "{links}");
            bail!("a failure midway")
        })();
        assert!(failed.is_err());
        assert!(live().is_empty());
        for name in &names {
            assert!(!exists(name), "{name} is left");
        }
        let links = ip(&["-o", "link"]).unwrap();
        let pid = std::process::id().to_string();
        assert!(!String::from_utf8_lossy(&links.stdout).contains(&format!("kcs{pid}")));
    }

    /// Run by the test below in a child process: makes a test bed, says its names, waits.
    #[test]
    #[ignore = "a helper process of interrupted_runs_leave_nothing"]
    fn holds_a_testbed_until_interrupted() {
        let testbed = Testbed::create(&[0], &[0]).unwrap();
        // A process that changes its user, as khttpd does: the kernel clears its parent-death
        // signal, so only the interrupt handler can stop it.
        let server = testbed
            .command(Side::Server, "setpriv")
            .unwrap()
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "sleep",
                "30",
            ])
            .spawn()
            .unwrap();
        println!("server {}", server.id());
        println!("namespaces {}", live().join(" "));
        thread::sleep(std::time::Duration::from_secs(30));
    }

    #[test]
    fn interrupted_runs_leave_nothing() {
        if !privileged() {
            return;
        }
        use std::io::BufRead as _;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "--nocapture"])
            .arg("netns::tests::holds_a_testbed_until_interrupted")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        // Bounded: the child exits (and its stdout ends) within 30 s whatever happens.
        let mut lines = stdout.lines().map_while(Result::ok);
        let server: i32 = lines
            .find_map(|line| line.strip_prefix("server ")?.parse().ok())
            .expect("the child started a process in its namespace");
        let names: Vec<String> = lines
            .find_map(|line| {
                let names = line.strip_prefix("namespaces ")?;
                Some(names.split(' ').map(str::to_owned).collect())
            })
            .expect("the child made its namespaces");
        assert_eq!(names.len(), 2);
        assert!(names.iter().all(|name| exists(name)));
        nix::sys::signal::kill(
            Pid::from_raw(i32::try_from(child.id()).unwrap()),
            Signal::SIGINT,
        )
        .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "{status}");
        for name in &names {
            assert!(!exists(name), "{name} is left");
        }
        // Gone, or a zombie of the exited child waiting for init to reap it.
        let state = std::fs::read_to_string(format!("/proc/{server}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "the process started in the namespace still runs: {state}"
        );
    }
}
