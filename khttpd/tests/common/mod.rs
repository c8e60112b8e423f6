//! What every test binary of khttpd shares beyond the harness (`khttpd-harness`, shared with the
//! benches): the khttpd under test, the xtask binary of the same build (and an htstress run with
//! it), and one answer on a kept-alive connection as (status, body).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

pub const KHTTPD: &str = env!("CARGO_BIN_EXE_khttpd");

/// The xtask binary of the same profile as the khttpd under test, built (or found up to date) by
/// cargo once per test process, so the htstress it runs is never a stale one.
pub fn xtask_binary() -> &'static Path {
    static XTASK: OnceLock<PathBuf> = OnceLock::new();
    XTASK.get_or_init(|| {
        // target/<profile dir>/khttpd → build xtask into the same directory.
        let profile_dir = Path::new(KHTTPD).parent().unwrap();
        let target_dir = profile_dir.parent().unwrap();
        let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
            "debug" => "dev",
            other => other,
        };
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--package",
                "xtask",
                "--profile",
                profile,
            ])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace)
            .stdin(Stdio::null())
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo build --package xtask: {status}");
        profile_dir.join("xtask")
    })
}

/// Sends `request` on a kept-alive connection and reads one answer: (status, body).
pub fn ask(stream: &mut TcpStream, request: &[u8]) -> (u16, Vec<u8>) {
    let answer = khttpd_harness::http::ask(stream, request).expect("an answer");
    (answer.status, answer.body)
}

/// Runs `cargo xtask htstress -q <args> http://<addr>/` (bounded to 120 s) and returns its report;
/// panics unless it exits successfully.
pub fn htstress(addr: SocketAddr, args: &[&str]) -> String {
    // -q: no progress lines, so the report is all there is on stdout (and fits the pipe).
    let mut htstress = Command::new(xtask_binary())
        .args(["htstress", "-q"])
        .args(args)
        .arg(format!("http://{addr}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start xtask htstress");
    let Some(status) =
        khttpd_harness::process::wait_bounded(&mut htstress, Duration::from_secs(120))
    else {
        let _ = htstress.kill();
        let _ = htstress.wait();
        panic!("htstress {args:?} took over 120 s");
    };
    let mut report = String::new();
    htstress
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut report)
        .unwrap();
    assert!(status.success(), "htstress {args:?}: {status}:\n{report}");
    report
}

/// The number after `label` on its line of an htstress report (`good requests: 10000 [100%]`).
pub fn report_number(report: &str, label: &str) -> u64 {
    report
        .lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in:\n{report}"))
}
