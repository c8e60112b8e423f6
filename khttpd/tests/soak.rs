//! A bounded soak (`cargo xtask soak -n 100000`): per fast-path mode (auto, off, on), 100,000
//! requests with a connection each and 100,000 on persistent connections, 1,000 connections in
//! flight; every answer good, and afterwards the server's fds, sockhash and per-connection map
//! entries, connection gauges and work items back at their baseline (xtask/src/soak.rs).

mod common;

use std::{
    io::Read,
    process::{Command, Stdio},
    time::Duration,
};

use common::{xtask_binary, KHTTPD};
use khttpd_harness::{process::wait_bounded, system::bpf_allowed};
use rustix::process::{Pid, Signal};

/// Well inside CI's time: the run takes about half a minute on two vCPUs.
const LIMIT: Duration = Duration::from_secs(240);

#[test]
fn a_bounded_soak_leaves_nothing_behind() {
    if !bpf_allowed() {
        return;
    }
    let mut soak = Command::new(xtask_binary())
        .args(["soak", "-n", "100000", "--khttpd", KHTTPD])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start xtask soak");
    // Drain stderr on the side so a chatty run cannot block on a full pipe.
    let mut stderr = soak.stderr.take().unwrap();
    let said = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdout = soak.stdout.take().unwrap();
    let table = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let Some(status) = wait_bounded(&mut soak, LIMIT) else {
        // xtask stops its server when it is dropped, which a signal would skip: stop the
        // server (xtask's child) first, by pid, then xtask.
        for server in children(soak.id()).into_iter().filter_map(Pid::from_raw) {
            // A process this test started (through xtask), by pid.
            let _ = rustix::process::kill_process(server, Signal::TERM);
        }
        std::thread::sleep(Duration::from_secs(5));
        let _ = soak.kill();
        let _ = soak.wait();
        panic!("xtask soak took over {LIMIT:?}:\n{}", said.join().unwrap());
    };
    let (table, said) = (table.join().unwrap(), said.join().unwrap());
    assert!(status.success(), "xtask soak {status}:\n{table}\n{said}");
    for mode in ["auto", "off", "on"] {
        for load in ["close per request", "keep-alive"] {
            assert!(
                table.contains(&format!("| {mode} | {load} | ")),
                "no {mode} / {load} row:\n{table}"
            );
        }
    }
    assert!(table.contains("No failure."), "{table}");
}

/// The child processes of `pid` (from /proc/<pid>/task/*/children).
fn children(pid: u32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|child| child.parse().ok())
                .collect::<Vec<i32>>()
        })
        .collect()
}
