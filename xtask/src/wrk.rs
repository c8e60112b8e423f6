//! wrk, the keep-alive load of the HTTP benches: one bounded run and its `--latency` report.

use std::{path::Path, process::Command, time::Duration};

use anyhow::Context as _;
use khttpd_harness::process::output_bounded;

/// Client threads of the keep-alive load (wrk's `-t`, htstress's `-t`).
pub(crate) const KEEP_ALIVE_THREADS: usize = 2;
/// How long wrk may run past its `-d` before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(30);

/// What one run of a load generator reported.
pub(crate) struct Counts {
    pub req_per_s: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub good: u64,
    pub bad: u64,
    pub errors: u64,
}

/// `wrk -t2 -c<connections> -d<seconds>s --latency [-s script] url`, killed if it overruns.
pub(crate) fn wrk(
    connections: usize,
    seconds: u64,
    url: &str,
    script: Option<&Path>,
) -> anyhow::Result<Counts> {
    let mut command = Command::new("wrk");
    command.args([
        format!("-t{KEEP_ALIVE_THREADS}"),
        format!("-c{connections}"),
        format!("-d{seconds}s"),
        "--latency".to_owned(),
        "--timeout".to_owned(),
        "10s".to_owned(),
    ]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let output = output_bounded(command.arg(url), Duration::from_secs(seconds) + WRK_GRACE)
        .context("wrk failed")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    parse_wrk(&stdout).with_context(|| {
        format!(
            "cannot read wrk's report (exit: {}):\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// Reads wrk's `--latency` report: `Requests/sec`, the 50% and 99% lines, `N requests in`,
/// `Socket errors: connect A, read B, write C, timeout D` and `Non-2xx or 3xx responses: N`
/// (the last two only appear when non-zero).
pub(crate) fn parse_wrk(text: &str) -> Option<Counts> {
    let line_after = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(prefix))
            .map(str::trim)
    };
    let latency = |prefix| wrk_duration_us(line_after(prefix)?);
    let responses: u64 = text
        .lines()
        .find(|line| line.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let errors = match line_after("Socket errors:") {
        // "connect 0, read 12, write 0, timeout 3"
        Some(list) => list
            .split(',')
            .map(|item| item.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<Option<u64>>()?,
        None => 0,
    };
    let bad = match line_after("Non-2xx or 3xx responses:") {
        Some(count) => count.parse().ok()?,
        None => 0,
    };
    Some(Counts {
        req_per_s: line_after("Requests/sec:")?.parse().ok()?,
        p50_us: Some(latency("50%")?),
        p99_us: Some(latency("99%")?),
        good: responses.checked_sub(bad)?,
        bad,
        errors,
    })
}

/// wrk's durations (`251.00us`, `4.13ms`, `1.20s`, `2.00m`) in µs.
fn wrk_duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_REPORT: &str = "Running 5s test @ http://127.0.0.1:18081/
  2 threads and 100 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   653.25us    0.87ms  10.42ms   86.95%
    Req/Sec    97.29k     6.07k  110.30k    75.00%
  Latency Distribution
     50%  251.00us
     75%  701.00us
     90%    1.83ms
     99%    4.13ms
  970165 requests in 5.01s, 158.21MB read
  Socket errors: connect 0, read 7, write 0, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec: 193469.27
Transfer/sec:     31.55MB
";

    #[test]
    fn reads_wrk_reports() {
        let counts = parse_wrk(WRK_REPORT).unwrap();
        assert_eq!(counts.req_per_s, 193469.27);
        assert_eq!(counts.p50_us, Some(251.0));
        assert_eq!(counts.p99_us, Some(4130.0));
        assert_eq!((counts.good, counts.bad, counts.errors), (970160, 5, 9));

        let clean: String = WRK_REPORT
            .lines()
            .filter(|line| !line.contains("errors") && !line.contains("Non-2xx"))
            .map(|line| format!("{line}\n"))
            .collect();
        let counts = parse_wrk(&clean).unwrap();
        assert_eq!((counts.good, counts.bad, counts.errors), (970165, 0, 0));

        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused").is_none());
        assert_eq!(wrk_duration_us("1.50s"), Some(1.5e6));
        assert_eq!(wrk_duration_us("12"), None);
    }
}
