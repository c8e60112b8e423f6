//! `khttpd top` in a real terminal (tmux, which `cargo xtask test` installs when missing) against
//! a real server: it shows what the server's metrics say, quits on `q`, and fails clearly when
//! there is no server.

mod common;

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use common::{htstress, KHTTPD};
use khttpd_harness::{eventually, process::output_bounded, Mode, Server};

/// tmux, or `None` (outside CI only) when it is not installed.
fn tmux(args: &[&str]) -> Option<Output> {
    match output_bounded(Command::new("tmux").args(args), Duration::from_secs(10)) {
        Ok(output) => Some(output),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: tmux is needed ({e:#})"
            );
            eprintln!("skipped: no tmux ({e:#})");
            None
        }
    }
}

/// A tmux session, killed when dropped.
struct Session(String);

impl Session {
    fn screen(&self) -> String {
        let output = tmux(&["capture-pane", "-p", "-t", &self.0]).unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        tmux(&["has-session", "-t", &self.0]).is_some_and(|output| output.status.success())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = tmux(&["kill-session", "-t", &self.0]);
    }
}

/// The number after `label` on the screen's line that starts with `line`.
fn number_after(screen: &str, line: &str, label: &str) -> Option<u64> {
    let text = screen.lines().find(|l| l.starts_with(line))?;
    let rest = text.split_once(label)?.1.trim_start();
    let digits: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[test]
fn top_shows_a_running_server_and_quits_on_q() {
    let Some(_) = tmux(&["-V"]) else { return };
    let server = Server::start(KHTTPD, Mode::UserUnbound, &[]).unwrap();
    let name = format!("khttpd-top-{}", std::process::id());
    let command = format!(
        "{KHTTPD} top --metrics {} --interval 0.2",
        server.metrics_addr()
    );
    let created = tmux(&[
        "new-session",
        "-d",
        "-s",
        &name,
        "-x",
        "150",
        "-y",
        "30",
        &command,
    ])
    .unwrap();
    assert!(created.status.success(), "{created:?}");
    let session = Session(name);
    // Requests while it watches: user space answers them, and the view says so.
    common::xtask_binary();
    let addr = server.http_addr();
    let load =
        std::thread::spawn(move || htstress(addr, &["--keep-alive", "--duration", "3", "-c", "4"]));
    let mut screen = String::new();
    let shown = eventually(Duration::from_secs(20), || {
        screen = session.screen();
        number_after(&screen, "HTTP requests/s", "user space").is_some_and(|rate| rate > 0)
    });
    load.join().unwrap();
    assert!(shown, "no user-space requests/s on the screen:\n{screen}");
    for line in [
        "khttpd top — http://",
        "HTTP requests/s   kernel",
        "HTTP connections  ",
        "work queue        khttpd_http: ",
        "echo bytes/s      kernel",
    ] {
        assert!(
            screen.contains(line),
            "no {line:?} on the screen:\n{screen}"
        );
    }
    assert!(session.alive());
    tmux(&["send-keys", "-t", &session.0, "q"]).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !session.alive()),
        "q did not quit:\n{}",
        session.screen()
    );
}

#[test]
fn top_without_a_server_says_so() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = output_bounded(
        Command::new(KHTTPD)
            .args(["top", "--metrics", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null()),
        Duration::from_secs(10),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{output:?}");
    assert!(
        stderr.contains(&format!(
            "khttpd top: error: cannot read http://127.0.0.1:{port}/metrics (is khttpd running with --metrics 127.0.0.1:{port}?)"
        )),
        "{stderr}"
    );
}
