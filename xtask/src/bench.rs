//! What only the benchmarks share (the server guard, metrics, clients and processes are in
//! `khttpd-harness`, shared with the tests): free ports for servers other than khttpd, the
//! machine's CPU split from `/proc/stat`, percentiles, and the plot and output helpers.

use std::{
    collections::VecDeque,
    env, fs,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::ChildStderr,
    thread,
};

use anyhow::{bail, ensure, Context as _};
use plotters::{
    coord::Shift,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use crate::workspace_root;

const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// One colour per mode, in the order the modes are run.
pub const PALETTE: [RGBColor; 6] = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];

/// What every server under test answers to `GET /`.
pub(crate) const HELLO: &str = "Hello, World!\n";

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
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
    std::net::TcpStream::connect_timeout(&addr, khttpd_harness::IO_TIMEOUT).is_ok()
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
        let ticks_per_second = khttpd_harness::system::clock_ticks_per_second().max(1) as f64;
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

/// The median of the values that exist.
pub(crate) fn median(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let mut values: Vec<f64> = values.into_iter().flatten().collect();
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[mid]),
        _ => Some((values[mid - 1] + values[mid]) / 2.0),
    }
}

/// `1234567.8` as `1,234,568`.
pub(crate) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A count, in bold when it is not zero: bad answers and errors must stand out.
pub(crate) fn flagged(count: u64) -> String {
    if count == 0 {
        "0".to_owned()
    } else {
        format!("**{}**", thousands(count as f64))
    }
}

pub(crate) fn or_dash(value: Option<f64>, show: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "–".to_owned(), show)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_numbers() {
        assert_eq!(median([Some(3.0), None, Some(1.0), Some(2.0)]), Some(2.0));
        assert_eq!(median([Some(4.0), Some(1.0)]), Some(2.5));
        assert_eq!(median([None]), None);
        assert_eq!(thousands(1_234_567.6), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(flagged(0), "0");
        assert_eq!(flagged(1200), "**1,200**");
    }
}
