//! What the benchmarks share: starting and stopping the server (and other servers) on free ports,
//! scraping `/metrics`, the machine's CPU split from `/proc/stat`, percentiles, and the plot and
//! output helpers. Every wait here is bounded, so a stuck server fails a bench instead of hanging it.

use std::{
    collections::VecDeque,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Child, ChildStderr, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use plotters::{
    coord::Shift,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use crate::workspace_root;

/// Longest any single connect, write+read or scrape may take before the bench gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a server may take to load its programs and start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a server may take to exit after each stop signal before the next (finally SIGKILL).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// One colour per mode, in the order the modes are run.
pub const PALETTE: [RGBColor; 6] = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];

/// A directory for a bench's site or configuration, removed when dropped. Readable by all: khttpd
/// serves it as `nobody` and nginx's workers read it as theirs.
pub fn temp_dir(name: &str) -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt as _;
    tempfile::Builder::new()
        .prefix(&format!("xtask-{name}-"))
        .permissions(fs::Permissions::from_mode(0o755))
        .tempdir()
        .with_context(|| format!("cannot create a temporary directory for {name}"))
}

/// A child process that is stopped when dropped: each signal of `stop` in turn, each followed by a
/// bounded wait, then SIGKILL as a last resort. Only this child is ever signalled, by its pid.
pub struct Guarded {
    child: Child,
    name: &'static str,
    stop: &'static [libc::c_int],
}

impl Guarded {
    pub fn new(child: Child, name: &'static str, stop: &'static [libc::c_int]) -> Self {
        Self { child, name, stop }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// An error if the process has exited (it should be serving).
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited during start-up ({status})", self.name);
        }
        Ok(())
    }

    fn wait_bounded(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) => thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        for &signal in self.stop {
            if let Ok(pid) = libc::pid_t::try_from(self.pid()) {
                // SAFETY: signals only the child this guard started, which is not yet reaped.
                unsafe { libc::kill(pid, signal) };
            }
            if self.wait_bounded(STOP_TIMEOUT) {
                return;
            }
            eprintln!("{} (pid {}) ignored signal {signal}", self.name, self.pid());
        }
        eprintln!("killing {} (pid {})", self.name, self.pid());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A khttpd child process on its own free loopback ports; dropping it stops the server (SIGTERM,
/// so it detaches its programs itself; SIGKILL if it does not exit).
pub struct Server {
    process: Guarded,
    pub echo: SocketAddr,
    pub http: SocketAddr,
    pub metrics: SocketAddr,
}

impl Server {
    /// Starts `khttpd` with `server_args` and waits until both services accept and `/metrics`
    /// answers. The ports are always the bench's own, so a server on 8081 or 12345 cannot interfere.
    pub fn start(khttpd: &Path, server_args: &[&str]) -> anyhow::Result<Self> {
        let [echo, http, metrics] = free_ports()?;
        let mut child = Command::new(khttpd)
            .args(server_args)
            .arg("--echo-port")
            .arg(echo.port().to_string())
            .arg("--port")
            .arg(http.port().to_string())
            .arg("--metrics")
            .arg(metrics.to_string())
            .arg("-q")
            .stdin(Stdio::null())
            // Keep stdout for the table; the server's warnings still reach stderr, through
            // `forward_stderr`, which keeps the last lines for the error if start-up fails.
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", khttpd.display()))?;
        let said = forward_stderr(child.stderr.take().expect("piped stderr"));
        // From here on the guard stops the server whatever happens.
        let mut server = Self {
            process: Guarded::new(child, "khttpd", &[libc::SIGTERM]),
            echo,
            http,
            metrics,
        };
        if let Err(error) = server.wait_ready() {
            // Stopped, so its stderr ends and the forwarder returns what it said.
            drop(server);
            let said = said.join().unwrap_or_default();
            return Err(error.context(format!("khttpd said: {}", said.trim_end())));
        }
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let (echo, http, metrics) = (self.echo, self.http, self.metrics);
        wait_until(&mut self.process, &format!("{echo} and {http}"), || {
            accepts(echo) && accepts(http) && get_metrics(metrics).is_ok()
        })
    }

    /// The `/metrics` body.
    pub fn scrape(&self) -> anyhow::Result<Metrics> {
        get_metrics(self.metrics)
            .with_context(|| format!("cannot scrape http://{}/metrics", self.metrics))
    }

    /// The server's resident set size, in KiB.
    pub fn vm_rss_kib(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        kib_field(&status, "VmRSS").with_context(|| format!("no VmRSS in {path}"))
    }
}

/// Copies a child's stderr to ours, line by line, until it ends; returns its last lines.
pub fn forward_stderr(pipe: ChildStderr) -> thread::JoinHandle<String> {
    const KEPT: usize = 10;
    thread::spawn(move || {
        let mut last = VecDeque::with_capacity(KEPT);
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if last.len() == KEPT {
                last.pop_front();
            }
            last.push_back(line);
        }
        Vec::from(last).join("\n")
    })
}

/// Whether `addr` accepts a connection within `IO_TIMEOUT`.
pub fn accepts(addr: SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, IO_TIMEOUT).is_ok()
}

/// Polls `ready` until it holds, the process exits, or `START_TIMEOUT` passes.
pub fn wait_until(
    process: &mut Guarded,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        process.ensure_running()?;
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not answer on {what} within {START_TIMEOUT:?}",
                process.name
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// One request over its own connection, bounded by `IO_TIMEOUT` per step; returns the response's
/// head (status line first) and body.
pub fn http_get(addr: SocketAddr, request: &str) -> anyhow::Result<(String, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("truncated response")?;
    Ok((head.to_owned(), body.to_owned()))
}

/// One `GET /metrics` over HTTP/1.1.
pub fn get_metrics(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let (head, body) = http_get(
        addr,
        &format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "{}",
        head.lines().next().unwrap_or("")
    );
    Ok(Metrics(body))
}

/// Distinct ports free on 127.0.0.1 and, where the host has IPv6, on ::1 too (khttpd listens on
/// every address of `lo`); all are held until every one is found, so none is handed out twice.
pub fn free_ports<const N: usize>() -> anyhow::Result<[SocketAddr; N]> {
    const ATTEMPTS: usize = 100;
    let ipv6 = TcpListener::bind("[::1]:0").is_ok();
    let mut held = Vec::with_capacity(2 * N);
    let mut addrs = Vec::with_capacity(N);
    for _ in 0..ATTEMPTS {
        if addrs.len() == N {
            break;
        }
        let v4 = TcpListener::bind("127.0.0.1:0")?;
        let addr = v4.local_addr()?;
        held.push(v4);
        if ipv6 {
            match TcpListener::bind(("::1", addr.port())) {
                Ok(v6) => held.push(v6),
                Err(_) => continue,
            }
        }
        addrs.push(addr);
    }
    addrs
        .try_into()
        .map_err(|_| anyhow::anyhow!("no {N} ports free on both 127.0.0.1 and ::1"))
}

/// A `/metrics` body in the Prometheus text format.
pub struct Metrics(String);

impl Metrics {
    /// Every sample: the series (name with labels) and its value; unparseable values are skipped.
    pub fn samples(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| line.rsplit_once(' '))
            .filter_map(|(series, value)| Some((series, value.parse().ok()?)))
    }

    /// The sum of every series of `name` (all label sets), or `None` when the metric is absent.
    pub fn sum(&self, name: &str) -> Option<u64> {
        self.samples()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, value)| value)
            .reduce(|a, b| a + b)
    }
}

/// The value of a `Name:   123 kB` line.
pub fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time from `/proc/stat`, in clock ticks: of the whole machine, or of some CPUs.
pub struct CpuTimes {
    user: u64,
    system: u64,
    softirq: u64,
    idle: u64,
    total: u64,
}

impl CpuTimes {
    /// The whole machine (the aggregate `cpu` line).
    pub fn read() -> anyhow::Result<Self> {
        Self::read_lines(|name| name == "cpu")
    }

    /// The sum of the `cpuN` lines of `cpus`.
    pub fn read_cpus(cpus: &[usize]) -> anyhow::Result<Self> {
        Self::read_lines(|name| {
            name.strip_prefix("cpu")
                .and_then(|n| n.parse().ok())
                .is_some_and(|n: usize| cpus.contains(&n))
        })
    }

    fn read_lines(wanted: impl Fn(&str) -> bool) -> anyhow::Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
        let mut sum = Self {
            user: 0,
            system: 0,
            softirq: 0,
            idle: 0,
            total: 0,
        };
        let mut found = false;
        for line in stat.lines() {
            let mut words = line.split_whitespace();
            if !words.next().is_some_and(&wanted) {
                continue;
            }
            let fields: Vec<u64> = words
                .map(str::parse)
                .collect::<Result<_, _>>()
                .context("malformed cpu line in /proc/stat")?;
            // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
            let [user, nice, system, idle, iowait, irq, softirq, steal, ..] = fields[..] else {
                bail!("short cpu line in /proc/stat");
            };
            sum.user += user + nice;
            sum.system += system;
            sum.softirq += softirq + irq;
            sum.idle += idle + iowait;
            sum.total += user + nice + system + idle + iowait + irq + softirq + steal;
            found = true;
        }
        ensure!(found, "no such cpu line in /proc/stat");
        Ok(sum)
    }
}

/// Shares of CPU time, in percent, and the CPU time that was not idle, over an interval.
#[derive(Clone, Copy)]
pub struct CpuSplit {
    pub user: f64,
    pub system: f64,
    pub softirq: f64,
    pub idle: f64,
    /// Non-idle CPU time of all CPUs together, in seconds.
    pub busy_seconds: f64,
}

impl CpuSplit {
    pub fn between(before: &CpuTimes, after: &CpuTimes) -> Self {
        let total = after.total.saturating_sub(before.total).max(1) as f64;
        let share = |a: u64, b: u64| a.saturating_sub(b) as f64 * 100.0 / total;
        let idle_ticks = after.idle.saturating_sub(before.idle) as f64;
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Self {
            user: share(after.user, before.user),
            system: share(after.system, before.system),
            softirq: share(after.softirq, before.softirq),
            idle: share(after.idle, before.idle),
            busy_seconds: (total - idle_ticks).max(0.0) / ticks_per_second,
        }
    }
}

/// Nearest-rank percentile of sorted samples (the default value when there are none).
pub fn percentile<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1))
        .copied()
        .unwrap_or_default()
}

/// Runs `command` to completion with its stdout captured, killing it after `limit`.
pub fn output_bounded(command: &mut Command, limit: Duration) -> anyhow::Result<Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    // Read both pipes while waiting, so a chatty child cannot block on a full pipe.
    let out = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {limit:?}: killed");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Prints `table`, writes it to `target/bench/<name>.md` and the plot to `target/bench/<name>.png`.
pub fn write_results(
    name: &str,
    table: &str,
    plot: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    print!("{table}");
    let out_dir = workspace_root().join("target/bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let table_path = out_dir.join(format!("{name}.md"));
    fs::write(&table_path, table)
        .with_context(|| format!("cannot write {}", table_path.display()))?;
    let plot_path = out_dir.join(format!("{name}.png"));
    plot(&plot_path).with_context(|| format!("cannot plot {}", plot_path.display()))?;
    println!(
        "\nwrote {}\nwrote {}",
        table_path.display(),
        plot_path.display()
    );
    Ok(())
}

/// Makes DejaVu Sans the plot's sans-serif font; false when it is not installed.
pub fn register_font() -> bool {
    let Ok(bytes) = fs::read(FONT_PATH) else {
        eprintln!("{FONT_PATH} not found: the plot will have no text");
        return false;
    };
    // plotters keeps fonts for the life of the process.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .is_ok()
}

/// A grouped bar chart: one group per entry of `groups`, one bar per series in each, coloured from
/// `PALETTE`, with each bar's value written above it (when there is a font).
pub struct GroupedBars<'a> {
    pub caption: &'a str,
    pub y_desc: &'a str,
    pub groups: &'a [String],
    /// Series name and one value per group.
    pub series: &'a [(String, Vec<f64>)],
    pub value_label: &'a dyn Fn(f64) -> String,
}

impl GroupedBars<'_> {
    pub fn draw(
        &self,
        area: &DrawingArea<BitMapBackend<'_>, Shift>,
        with_text: bool,
    ) -> anyhow::Result<()> {
        let max = self
            .series
            .iter()
            .flat_map(|(_, values)| values.iter().copied())
            .fold(0.0, f64::max)
            .max(f64::MIN_POSITIVE);
        // Integer coordinates (plotters formats key points of integer axes only): group i spans
        // [i * GROUP, (i + 1) * GROUP), its bars fill the middle 80%.
        const GROUP: i32 = 100;
        let groups = i32::try_from(self.groups.len().max(1))?;
        let mut builder = ChartBuilder::on(area);
        builder.margin(20);
        if with_text {
            builder
                .caption(self.caption, ("sans-serif", 20))
                .x_label_area_size(40)
                .y_label_area_size(80);
        }
        let x = (0..groups * GROUP)
            .with_key_points((0..groups).map(|i| i * GROUP + GROUP / 2).collect());
        // Headroom above the tallest bar for its label and the legend.
        let mut chart = builder.build_cartesian_2d(x, 0.0..max * 1.45)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|x| {
                self.groups
                    .get(usize::try_from(x / GROUP).unwrap_or(usize::MAX))
                    .cloned()
                    .unwrap_or_default()
            })
            .y_desc(self.y_desc)
            .y_label_formatter(&|y| (self.value_label)(*y))
            .draw()?;

        let width = GROUP * 8 / 10 / i32::try_from(self.series.len().max(1))?;
        for (index, ((name, values), color)) in
            (0..).zip(self.series.iter().zip(PALETTE.iter().cycle()))
        {
            let left = |group: usize| {
                i32::try_from(group).unwrap_or(0) * GROUP + GROUP / 10 + index * width
            };
            let bars = values.iter().enumerate().map(|(group, &value)| {
                Rectangle::new(
                    [(left(group), 0.0), (left(group) + width * 9 / 10, value)],
                    color.filled(),
                )
            });
            let drawn = chart.draw_series(bars)?;
            if with_text {
                drawn.label(name.as_str()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled())
                });
                chart.draw_series(values.iter().enumerate().map(|(group, &value)| {
                    // Centred above the bar.
                    Text::new(
                        (self.value_label)(value),
                        (left(group) + width * 9 / 20, value + max * 0.01),
                        TextStyle::from(("sans-serif", 12).into_font())
                            .pos(Pos::new(HPos::Center, VPos::Bottom)),
                    )
                }))?;
            }
        }
        if with_text {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        Ok(())
    }
}

/// The benches' legend: the series' labels in a framed, half-transparent box at `position`.
pub fn draw_legend<'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}
