//! `--config FILE` and `khttpd check`: a server runs from its file with the flags given over it,
//! and the check prints the effective configuration or names the line and key that are wrong.

mod common;

use std::{process::Command, time::Duration};

use common::KHTTPD;
use khttpd_harness::{process::output_bounded, system::temp_dir, Mode, Server};

fn check(text: &str) -> (bool, String, String) {
    let dir = temp_dir("config").unwrap();
    let path = dir.path().join("khttpd.toml");
    std::fs::write(&path, text).unwrap();
    let output = output_bounded(
        Command::new(KHTTPD).arg("check").arg("--config").arg(&path),
        Duration::from_secs(10),
    )
    .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_prints_the_effective_configuration() {
    let (ok, stdout, stderr) =
        check("# a comment\nport = 8080\nfast-path = \"off\"\nidle-timeout = 30\n");
    assert!(ok, "{stderr}");
    assert!(stderr.contains("the configuration is valid"), "{stderr}");
    for line in [
        "port = 8080",
        "fast-path = \"off\"",
        "idle-timeout = 30",
        "header-timeout = 10",
        "iface = \"lo\"",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in:\n{stdout}"
        );
    }
    // What it prints is a config file that checks the same.
    let (again, printed, _) = check(&stdout);
    assert!(again);
    assert_eq!(printed, stdout);
}

#[test]
fn check_names_the_line_and_key_of_what_is_wrong() {
    for (text, needles) in [
        (
            "port = 80\nprot = 81\n",
            &["line 2", "unknown field `prot`"][..],
        ),
        (
            "\nidle-timeout = 0\n",
            &["line 2", "must be at least 1 second"],
        ),
        (
            "fast-path = \"sometimes\"\n",
            &["line 1", "unknown variant `sometimes`"],
        ),
        ("port = \"eighty\"\n", &["line 1", "port"]),
        ("port = 80\nport = 81\n", &["line 2", "duplicate key"]),
        (
            "root = \"/tmp\"\nbody = \"/etc/hostname\"\n",
            &["body and root cannot both be set"],
        ),
    ] {
        let (ok, stdout, stderr) = check(text);
        assert!(!ok, "{text:?} passed:\n{stdout}");
        assert!(
            stderr.starts_with("khttpd check: error: --config "),
            "{stderr}"
        );
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{text:?}: no {needle:?} in {stderr}"
            );
        }
    }
}

#[test]
fn a_server_runs_from_its_file_with_the_flags_over_it() {
    let dir = temp_dir("config").unwrap();
    let path = dir.path().join("khttpd.toml");
    // The harness gives --fast-path off (the mode) and ports of its own: those flags win; the
    // dispatch comes from the file.
    std::fs::write(
        &path,
        "fast-path = \"on\"\nport = 1\ndispatch = \"thread\"\n",
    )
    .unwrap();
    let server = Server::start(
        KHTTPD,
        Mode::UserUnbound,
        &["--config", path.to_str().unwrap()],
    )
    .unwrap();
    let (status, body) = common::ask(
        &mut khttpd_harness::http::connect(server.http_addr()).unwrap(),
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    );
    assert_eq!((status, body.as_slice()), (200, &b"Hello, World!\n"[..]));
    let metrics = server.metrics().unwrap();
    assert_eq!(
        metrics["khttpd_fast_path_enabled"], 0,
        "the flag overrides the file"
    );
    assert_eq!(
        metrics["khttpd_http_connections_total{dispatch=\"thread\"}"], 1,
        "the file's dispatch"
    );
}

#[test]
fn a_broken_file_stops_the_server_at_start_saying_why() {
    let dir = temp_dir("config").unwrap();
    let path = dir.path().join("khttpd.toml");
    std::fs::write(&path, "port = 8081\nmax-connection = 10\n").unwrap();
    let output = output_bounded(
        Command::new(KHTTPD).arg("--config").arg(&path),
        Duration::from_secs(10),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.starts_with("khttpd: error: --config ")
            && stderr.contains("line 2")
            && stderr.contains("max-connection"),
        "{stderr}"
    );
}
