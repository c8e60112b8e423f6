//! `khttpd top`: a live view of a running server, read from its metrics endpoint (`--metrics`)
//! once per interval — who answers (kernel or user space) and how fast, why the kernel passed,
//! its answer cache, connections by path, the work queues, echo bytes, the access log. Rates are
//! differences between two readings. `q`, Esc or Ctrl-C quit; the terminal is restored however it
//! ends. Without a terminal it prints a view per interval.

use std::{
    collections::BTreeMap,
    io::{self, IsTerminal as _, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    execute, queue,
    terminal::{self, ClearType},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The server's metrics endpoint (its `--metrics`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9100")]
    metrics: SocketAddr,
    /// Seconds between readings.
    #[arg(long, value_name = "SECS", default_value_t = 1.0,
          value_parser = parse_interval)]
    interval: f64,
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.1..=60.0).contains(&secs) => Ok(secs),
        _ => Err("a number of seconds from 0.1 to 60".to_owned()),
    }
}

/// How long a reading may take.
const TIMEOUT: Duration = Duration::from_secs(2);

pub fn run(args: &Args) -> anyhow::Result<()> {
    let url = format!("http://{}/metrics", args.metrics);
    let first = read(args.metrics).with_context(|| {
        format!(
            "cannot read {url} (is khttpd running with --metrics {}?)",
            args.metrics
        )
    })?;
    let interval = Duration::from_secs_f64(args.interval);
    let terminal = io::stdout().is_terminal();
    let _screen = terminal.then(Screen::enter).transpose()?;
    let mut previous = (Instant::now(), first);
    let mut unreachable: Option<(Instant, String)> = None;
    loop {
        if wait_for_quit(interval, terminal)? {
            return Ok(());
        }
        let now = Instant::now();
        let view = match read(args.metrics) {
            Ok(current) => {
                unreachable = None;
                let seconds = now.duration_since(previous.0).as_secs_f64();
                let lines = View::new(&previous.1, &current, seconds).lines(&url);
                previous = (now, current);
                lines
            }
            Err(e) => {
                let since = unreachable.get_or_insert_with(|| (now, e.to_string())).0;
                vec![
                    format!("khttpd top — {url}"),
                    String::new(),
                    format!(
                        "NOT REACHABLE for {:.0} s: {e:#} — retrying every {:.1} s (q quits)",
                        now.duration_since(since).as_secs_f64(),
                        args.interval
                    ),
                ]
            }
        };
        show(&view, terminal)?;
    }
}

/// The metrics endpoint's samples, by series (`name{labels}`).
type Samples = BTreeMap<String, f64>;

fn read(addr: SocketAddr) -> anyhow::Result<Samples> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: khttpd\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("not an HTTP answer")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "answered {}",
        head.lines().next().unwrap_or("")
    );
    Ok(parse(body))
}

fn parse(body: &str) -> Samples {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Two readings `seconds` apart.
struct View<'a> {
    before: &'a Samples,
    now: &'a Samples,
    seconds: f64,
}

impl<'a> View<'a> {
    fn new(before: &'a Samples, now: &'a Samples, seconds: f64) -> View<'a> {
        View {
            before,
            now,
            seconds: seconds.max(1e-3),
        }
    }

    /// The value now (0 when absent).
    fn get(&self, series: &str) -> f64 {
        self.now.get(series).copied().unwrap_or(0.0)
    }

    /// Sum of every series of `name` now.
    fn sum(&self, name: &str) -> f64 {
        sum(self.now, name)
    }

    /// Per-second growth of every series of `name` (or of the one series it names), summed.
    fn rate(&self, name: &str) -> f64 {
        ((sum(self.now, name) - sum(self.before, name)) / self.seconds).max(0.0)
    }

    /// The values of label `label` of `name`'s series, in order.
    fn labels(&self, name: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .now
            .keys()
            .filter(|series| series.split('{').next() == Some(name))
            .filter_map(|series| label_value(series, label))
            .collect();
        values.dedup();
        values
    }

    fn lines(&self, url: &str) -> Vec<String> {
        let mut lines = vec![
            format!("khttpd top — {url} — every {:.1} s (q quits)", self.seconds),
            String::new(),
        ];
        let fast_path = match self.get("khttpd_fast_path_enabled") {
            v if v > 0.0 => "on",
            _ => "off",
        };
        let kernel = self.rate("khttpd_http_kernel_responses_total");
        let user = self.rate("khttpd_http_user_responses_total");
        lines.push(format!(
            "HTTP requests/s   kernel {:>10}   user space {:>10}   (fast path {fast_path})",
            count(kernel),
            count(user)
        ));
        let passes: Vec<String> = self
            .labels("khttpd_http_passed_total", "reason")
            .iter()
            .map(|reason| {
                let series = format!("khttpd_http_passed_total{{reason=\"{reason}\"}}");
                format!("{reason} {}", count(self.rate(&series)))
            })
            .collect();
        if !passes.is_empty() {
            lines.push(format!("kernel passes/s   {}", passes.join("  ")));
        }
        if self.now.contains_key("khttpd_http_kernel_cache_entries") {
            let unknown = self.rate("khttpd_http_passed_total{reason=\"unknown_request\"}");
            let ratio = match kernel + unknown {
                asked if asked > 0.0 => format!("{:.1}%", 100.0 * kernel / asked),
                _ => "–".to_owned(),
            };
            lines.push(format!(
                "kernel cache      {} answers, {} bytes, hit ratio {ratio}",
                count(self.get("khttpd_http_kernel_cache_entries")),
                count(self.get("khttpd_http_kernel_cache_bytes")),
            ));
        }
        let open = self.get("khttpd_http_open_connections");
        let in_kernel = self.get("khttpd_http_kernel_sockets");
        lines.push(format!(
            "HTTP connections  {} open: kernel {}, user space {} ({} idle)   accepted/s {}   rejected/s {}",
            count(open),
            count(in_kernel),
            count((open - in_kernel).max(0.0)),
            count(self.get("khttpd_http_idle_connections")),
            count(self.rate("khttpd_http_connections_total")),
            count(self.rate("khttpd_http_rejected_total")),
        ));
        for queue in self.labels("khttpd_workqueue_workers", "queue") {
            let series = |name: &str| self.sum_where(name, "queue", &queue);
            lines.push(format!(
                "work queue        {queue}: {} pending, {} active, {} workers ({} idle), {}/s done",
                count(series("khttpd_workqueue_pending")),
                count(series("khttpd_workqueue_active")),
                count(series("khttpd_workqueue_workers")),
                count(series("khttpd_workqueue_idle_workers")),
                count(self.rate_where("khttpd_workqueue_completed_total", "queue", &queue)),
            ));
        }
        lines.push(format!(
            "echo bytes/s      kernel {:>10}   user space {:>10}   connections: kernel {}",
            count(self.rate("khttpd_echo_kernel_bytes_total")),
            count(self.rate("khttpd_echo_user_bytes_total")),
            count(self.get("khttpd_echo_kernel_connections")),
        ));
        if self
            .now
            .contains_key("khttpd_access_log_dropped_total{where=\"queue\"}")
        {
            lines.push(format!(
                "access log        {} lines/s, {} dropped in all",
                count(self.rate("khttpd_access_log_lines_total")),
                count(self.sum("khttpd_access_log_dropped_total")),
            ));
        }
        lines
    }

    fn sum_where(&self, name: &str, label: &str, value: &str) -> f64 {
        sum_where(self.now, name, label, value)
    }

    fn rate_where(&self, name: &str, label: &str, value: &str) -> f64 {
        let grown =
            sum_where(self.now, name, label, value) - sum_where(self.before, name, label, value);
        (grown / self.seconds).max(0.0)
    }
}

/// Sum of every series of `name`, or the one series `name` names (`name{labels}`).
fn sum(samples: &Samples, name: &str) -> f64 {
    if name.contains('{') {
        return samples.get(name).copied().unwrap_or(0.0);
    }
    samples
        .iter()
        .filter(|(series, _)| series.split('{').next() == Some(name))
        .map(|(_, value)| value)
        .sum()
}

fn sum_where(samples: &Samples, name: &str, label: &str, value: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series.split('{').next() == Some(name)
                && label_value(series, label).as_deref() == Some(value)
        })
        .map(|(_, value)| value)
        .sum()
}

/// The value of `label` in `series` (`name{a="x",b="y"}`).
fn label_value(series: &str, label: &str) -> Option<String> {
    let labels = series.split_once('{')?.1.strip_suffix('}')?;
    labels.split(',').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name == label).then(|| value.trim_matches('"').to_owned())
    })
}

/// A count as a short reading: `987`, `12.3k`, `161k`, `1.23M`.
fn count(value: f64) -> String {
    let value = value.max(0.0);
    match value {
        v if v >= 100e6 => format!("{:.0}M", v / 1e6),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 100e3 => format!("{:.0}k", v / 1e3),
        v if v >= 10e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// The terminal in raw mode on the alternate screen, restored when dropped.
struct Screen;

impl Screen {
    fn enter() -> io::Result<Screen> {
        terminal::enable_raw_mode()?;
        let screen = Screen;
        execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = execute!(io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
        let _ = terminal::disable_raw_mode();
    }
}

/// Waits `interval`; on a terminal, returns early with `true` when q, Esc or Ctrl-C is pressed.
fn wait_for_quit(interval: Duration, terminal: bool) -> io::Result<bool> {
    if !terminal {
        std::thread::sleep(interval);
        return Ok(false);
    }
    let until = Instant::now() + interval;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || !event::poll(left)? {
            return Ok(false);
        }
        if let Event::Key(key) = event::read()? {
            let ctrl_c =
                key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
            if key.kind == KeyEventKind::Press
                && (ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc))
            {
                return Ok(true);
            }
        }
    }
}

fn show(lines: &[String], terminal: bool) -> io::Result<()> {
    let mut out = io::stdout().lock();
    if terminal {
        queue!(out, cursor::MoveTo(0, 0), terminal::Clear(ClearType::All))?;
        for line in lines {
            // Raw mode: the cursor goes back to the line's start only when told.
            write!(out, "{line}\r\n")?;
        }
    } else {
        for line in lines {
            writeln!(out, "{line}")?;
        }
        writeln!(out)?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_two_readings() {
        let before = parse(
            "# HELP x\nkhttpd_http_kernel_responses_total 100\nkhttpd_http_passed_total{reason=\"unknown_request\"} 10\nkhttpd_workqueue_workers{queue=\"khttpd_http\",kind=\"unbound\"} 2\n",
        );
        let now = parse(
            "khttpd_http_kernel_responses_total 2100\nkhttpd_http_passed_total{reason=\"unknown_request\"} 30\nkhttpd_http_kernel_cache_entries 3\nkhttpd_workqueue_workers{queue=\"khttpd_http\",kind=\"unbound\"} 4\n",
        );
        let view = View::new(&before, &now, 2.0);
        assert_eq!(view.rate("khttpd_http_kernel_responses_total"), 1000.0);
        assert_eq!(
            view.labels("khttpd_workqueue_workers", "queue"),
            ["khttpd_http"]
        );
        let text = view.lines("http://x/metrics").join("\n");
        assert!(text.contains("kernel       1000"), "{text}");
        assert!(text.contains("unknown_request 10"), "{text}");
        assert!(text.contains("hit ratio 99.0%"), "{text}");
        assert!(
            text.contains("khttpd_http: 0 pending, 0 active, 4 workers"),
            "{text}"
        );
        assert_eq!(
            [987.0, 12_345.0, 161_403.0, 1_234_567.0].map(count),
            ["987", "12.3k", "161k", "1.23M"]
        );
    }
}
