//! What `cargo xtask test` says about kernel WARNINGs (issue 15): a WARNING in the psock code
//! (`inet_sock_destruct`, from `sk_psock_destroy`) taints the kernel, and since it is a
//! WARN_ON_ONCE only its first occurrence per boot is logged, with a dmesg timestamp and nothing
//! else. The test harness (khttpd/tests/common) records when each server and `cargo xtask diff`
//! ran; this report matches each new WARNING's timestamp against those lifetimes, so a fresh
//! machine (CI's) says which tests were running when it fired. It reports; it does not fail.

use std::{fs, path::Path, process::Command};

/// The state before the tests: taint flags and how much of the kernel log there was.
pub struct Before {
    tainted: Option<u64>,
    log_lines: usize,
}

pub fn before() -> Before {
    Before {
        tainted: tainted(),
        log_lines: kernel_log().lines().count(),
    }
}

/// The report after the tests, given the lifetimes file the harness wrote.
pub fn report(before: &Before, lifetimes: &Path) -> String {
    let after = tainted();
    let log = kernel_log();
    let warnings: Vec<&str> = log
        .lines()
        .skip(before.log_lines)
        .filter(|line| line.contains("WARNING:"))
        .collect();
    let show = |t: Option<u64>| t.map_or("unknown".to_owned(), |t| t.to_string());
    let mut out = format!(
        "kernel warnings: taint {} before the tests, {} after; {} WARNING line(s) logged meanwhile\n",
        show(before.tainted),
        show(after),
        warnings.len()
    );
    let lifetimes = fs::read_to_string(lifetimes).unwrap_or_default();
    for warning in warnings {
        out.push_str(&format!("  {warning}\n"));
        let Some(at) = timestamp(warning) else {
            continue;
        };
        // The warning fires when the last reference to a socket goes, in a work item a little
        // after its server closed it: lifetimes that ended up to 5 s before count.
        for line in lifetimes.lines() {
            let mut fields = line.splitn(4, ' ');
            let (Some(start), Some(end), Some(test), Some(what)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Ok(start), Ok(end)) = (start.parse::<f64>(), end.parse::<f64>()) else {
                continue;
            };
            if start <= at && at <= end + 5.0 {
                out.push_str(&format!("    running then: {test} ({what})\n"));
            }
        }
    }
    if before.tainted == Some(0) && after.is_some_and(|t| t != 0) && !out.contains("WARNING:") {
        out.push_str("  tainted without a WARNING line in the kernel log (dmesg unreadable?)\n");
    }
    out
}

fn tainted() -> Option<u64> {
    fs::read_to_string("/proc/sys/kernel/tainted")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The kernel log (dmesg; empty if it cannot be read).
fn kernel_log() -> String {
    Command::new("dmesg")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

/// Seconds since boot of a dmesg line: `[  672.986079] WARNING: …`.
fn timestamp(line: &str) -> Option<f64> {
    let inside = line.trim_start().strip_prefix('[')?;
    inside.split(']').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dmesg_timestamps() {
        assert_eq!(
            timestamp("[  672.986079] WARNING: CPU: 1 PID: 7649 at net/ipv4/af_inet.c:157"),
            Some(672.986079)
        );
        assert_eq!(timestamp("no stamp"), None);
    }
}
