//! `cargo xtask bench site`: a generated folder served by khttpd with the kernel fast path
//! (`--fast-path auto`: small answers come from the kernel's content cache), by khttpd in user space
//! (`--fast-path off`), and by nginx (`root` + `autoindex`), under keep-alive loads that ask for
//! small files, large files, directory listings, and a mix. Reports requests/s, latency, CPU split
//! and, for the kernel path, the share of requests the kernel answered (the cache's hit ratio).

use std::{fmt::Write as _, fs, path::Path, time::Instant};

use anyhow::{ensure, Context as _};
use plotters::prelude::*;

use khttpd_harness::{system::temp_dir, Metrics, Server};

use crate::{
    bench::{
        find_on_path, median, register_font, thousands, write_results, CpuSplit, CpuTimes,
        GroupedBars,
    },
    nginx::{find_nginx, Nginx},
    wrk::{wrk, Counts},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs of each load per mode; the table shows their medians.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Length of each run in seconds.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Persistent connections (over two wrk threads).
    #[arg(long, default_value_t = 100)]
    connections: usize,
}

/// Small files (500 B – 8 KB: answered by the kernel once learned), large ones (1 MiB: user space,
/// sendfile), and folders to list.
const SMALL_FILES: usize = 200;
const LARGE_FILES: usize = 4;
const LARGE_SIZE: usize = 1 << 20;
const FOLDERS: usize = 10;

/// nginx at its best for this site (measured here with wrk -t2 -c100, 1 MiB files: `sendfile
/// off` 2.54k req/s, `sendfile on; tcp_nopush on` 2.41k, `sendfile on` 2.25k; `bench cost`
/// found the same for a 2,000-byte file): descriptors and metadata cached like khttpd's
/// open-file cache.
const NGINX_FILES: &str = "open_file_cache max=1000 inactive=60s;
    open_file_cache_valid 60s;
    sendfile off;";

#[derive(Clone, Copy)]
enum Load {
    Small,
    Large,
    Listings,
    /// 80% small files, 10% large, 10% listings.
    Mixed,
}

const LOADS: [Load; 4] = [Load::Small, Load::Large, Load::Listings, Load::Mixed];

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::Small => "small files",
            Load::Large => "1 MiB files",
            Load::Listings => "listings",
            Load::Mixed => "mix 80/10/10",
        }
    }

    fn paths(self) -> Vec<String> {
        let small = (0..SMALL_FILES).map(|i| format!("/small/f{i}.txt"));
        let large = (0..LARGE_FILES).map(|i| format!("/large/f{i}.bin"));
        let listings = (0..FOLDERS).map(|i| format!("/folders/d{i}/"));
        match self {
            Load::Small => small.collect(),
            Load::Large => large.collect(),
            Load::Listings => listings.collect(),
            Load::Mixed => {
                let (small, large, listings): (Vec<_>, Vec<_>, Vec<_>) =
                    (small.collect(), large.collect(), listings.collect());
                (0..100)
                    .map(|i| match i % 10 {
                        8 => large[i % large.len()].clone(),
                        9 => listings[i % listings.len()].clone(),
                        _ => small[i % small.len()].clone(),
                    })
                    .collect()
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Kernel,
    User,
    Nginx,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Kernel => "khttpd, fast path (auto)",
            Mode::User => "khttpd, user space",
            Mode::Nginx => "nginx",
        }
    }
}

struct Run {
    counts: Counts,
    cpu: CpuSplit,
    /// Share of answers the kernel sent (kernel mode only).
    hit_ratio: Option<f64>,
    /// Share of answers user space took from its file caches (khttpd only).
    cache_ratio: Option<f64>,
}

pub fn run(args: &Args, khttpd: &Path) -> anyhow::Result<()> {
    ensure!(
        args.reps > 0 && args.seconds > 0 && args.connections > 0,
        "every count must be at least 1"
    );
    ensure!(
        find_on_path("wrk").is_some(),
        "bench site needs wrk (apt-get install wrk)"
    );
    let started = Instant::now();
    let site = temp_dir("site")?;
    generate(site.path())?;
    let scripts = temp_dir("site-scripts")?;
    let mut modes = vec![Mode::Kernel, Mode::User];
    let nginx = find_nginx();
    if nginx.is_some() {
        modes.push(Mode::Nginx);
    }
    let mut results: Vec<(Mode, Vec<Vec<Run>>)> = Vec::new();
    for mode in modes {
        eprintln!("[{}] starting", mode.label());
        let root = site
            .path()
            .to_str()
            .context("temporary path is not UTF-8")?;
        let khttpd_mode = |mode| Server::start(khttpd, mode, &["--root", root]).map(Some);
        let (server, nginx_server) = match mode {
            Mode::Kernel => (khttpd_mode(khttpd_harness::Mode::Auto)?, None),
            Mode::User => (khttpd_mode(khttpd_harness::Mode::UserUnbound)?, None),
            Mode::Nginx => {
                let location = format!("root {root};\n            autoindex on;");
                let binary = nginx.as_deref().expect("nginx mode only when installed");
                (None, Some(Nginx::start(binary, NGINX_FILES, &location)?))
            }
        };
        let http = match (&server, &nginx_server) {
            (Some(server), _) => server.http_addr(),
            (_, Some(nginx)) => nginx.http,
            _ => unreachable!(),
        };
        let mut loads = Vec::new();
        for load in LOADS {
            let script = scripts
                .path()
                .join(format!("{}.lua", load.label().replace([' ', '/'], "-")));
            fs::write(&script, lua(&load.paths())).context("writing a wrk script")?;
            let mut runs = Vec::new();
            for rep in 1..=args.reps {
                let before = server.as_ref().map(Server::metrics).transpose()?;
                let cpu_before = CpuTimes::read()?;
                let counts = wrk(
                    args.connections,
                    args.seconds,
                    &format!("http://{http}/"),
                    Some(&script),
                )
                .with_context(|| format!("{}, run {rep}", load.label()))?;
                let cpu = CpuSplit::between(&cpu_before, &CpuTimes::read()?);
                let after = server.as_ref().map(Server::metrics).transpose()?;
                let share = |name| match (&before, &after) {
                    (Some(before), Some(after)) => share(name, before, after, &counts),
                    _ => None,
                };
                let hit_ratio = match mode {
                    Mode::Kernel => share("khttpd_http_kernel_responses_total"),
                    _ => None,
                };
                let cache_ratio = share("khttpd_http_file_cache_hits_total");
                eprintln!(
                    "[{}] {} {rep}/{}: {} req/s, bad {} errors {}",
                    mode.label(),
                    load.label(),
                    args.reps,
                    thousands(counts.req_per_s),
                    counts.bad,
                    counts.errors
                );
                runs.push(Run {
                    counts,
                    cpu,
                    hit_ratio,
                    cache_ratio,
                });
            }
            loads.push(runs);
        }
        results.push((mode, loads));
    }
    let table = render(args, &results, started.elapsed().as_secs());
    write_results("site", &table, |path| plot(path, &results))
}

/// The share of the answers during a run that the counter `name` counted (the kernel's, or the
/// file caches' hits).
fn share(name: &str, before: &Metrics, after: &Metrics, counts: &Counts) -> Option<f64> {
    let answered = (counts.good + counts.bad) as f64;
    let hits = after.sum(name)?.checked_sub(before.sum(name)?)? as f64;
    (answered > 0.0).then(|| (hits / answered).min(1.0))
}

/// A wrk script that asks for `paths` in turn.
fn lua(paths: &[String]) -> String {
    let list: Vec<String> = paths.iter().map(|p| format!("{p:?}")).collect();
    format!(
        "paths = {{ {} }}\ni = 0\nrequest = function()\n  i = i % #paths + 1\n  return wrk.format(\"GET\", paths[i])\nend\n",
        list.join(", ")
    )
}

fn generate(root: &Path) -> anyhow::Result<()> {
    let write = |path: &Path, bytes: &[u8]| -> anyhow::Result<()> {
        fs::create_dir_all(path.parent().expect("a parent"))?;
        fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    };
    for i in 0..SMALL_FILES {
        let size = 500 + (i * 7919) % 7_700;
        let text: Vec<u8> = (0..size).map(|j| b"khttpd small file\n"[j % 18]).collect();
        write(&root.join(format!("small/f{i}.txt")), &text)?;
    }
    for i in 0..LARGE_FILES {
        let bytes: Vec<u8> = (0..LARGE_SIZE).map(|j| (j * 31 + i) as u8).collect();
        write(&root.join(format!("large/f{i}.bin")), &bytes)?;
    }
    for d in 0..FOLDERS {
        for f in 0..20 {
            write(&root.join(format!("folders/d{d}/entry {f}.txt")), b"x\n")?;
        }
    }
    Ok(())
}

fn percent(ratio: Option<f64>) -> String {
    ratio.map_or("-".to_owned(), |h| format!("{:.1}%", h * 100.0))
}

fn render(args: &Args, results: &[(Mode, Vec<Vec<Run>>)], seconds: u64) -> String {
    let mut out = String::from(
        "| server | load | req/s | p50 µs | p99 µs | CPU user/sys/softirq/idle % | kernel answered | file caches answered | bad | errors |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|\n",
    );
    for (mode, loads) in results {
        for (load, runs) in LOADS.iter().zip(loads) {
            let med = |f: &dyn Fn(&Run) -> Option<f64>| median(runs.iter().map(f));
            let cpu = |f: &dyn Fn(&CpuSplit) -> f64| med(&|r| Some(f(&r.cpu))).unwrap_or(0.0);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.0} | {:.0} | {:.0}/{:.0}/{:.0}/{:.0} | {} | {} | {} | {} |",
                mode.label(),
                load.label(),
                thousands(med(&|r| Some(r.counts.req_per_s)).unwrap_or(0.0)),
                med(&|r| r.counts.p50_us).unwrap_or(0.0),
                med(&|r| r.counts.p99_us).unwrap_or(0.0),
                cpu(&|c| c.user),
                cpu(&|c| c.system),
                cpu(&|c| c.softirq),
                cpu(&|c| c.idle),
                percent(med(&|r| r.hit_ratio)),
                percent(med(&|r| r.cache_ratio)),
                runs.iter().map(|r| r.counts.bad).sum::<u64>(),
                runs.iter().map(|r| r.counts.errors).sum::<u64>(),
            );
        }
    }
    let _ = write!(
        out,
        "\nMedians of {} runs of `wrk -t2 -c{} -d{}s` per row, each asking for the load's paths in \
         turn on persistent connections. Site: {SMALL_FILES} files of 500 B–8 KB, {LARGE_FILES} of \
         1 MiB, {FOLDERS} folders of 20 entries. \"kernel answered\": the share of answers the \
         kernel sent (its content cache's hit ratio); \"file caches answered\": the share user \
         space took from its answer and open-file caches. nginx: `reuseport`, `open_file_cache`, \
         `sendfile off`, no access log. CPU: the whole machine, load generator included. Total \
         time {seconds} s.\n",
        args.reps, args.connections, args.seconds
    );
    out
}

fn plot(path: &Path, results: &[(Mode, Vec<Vec<Run>>)]) -> anyhow::Result<()> {
    let with_text = register_font();
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups: Vec<String> = LOADS.iter().map(|l| l.label().to_owned()).collect();
    let series: Vec<(String, Vec<f64>)> = results
        .iter()
        .map(|(mode, loads)| {
            let values = loads
                .iter()
                .map(|runs| median(runs.iter().map(|r| Some(r.counts.req_per_s))).unwrap_or(0.0))
                .collect();
            (mode.label().to_owned(), values)
        })
        .collect();
    GroupedBars {
        caption: "Serving a folder: requests/s (median; higher is better)",
        y_desc: "requests/s",
        groups: &groups,
        series: &series,
        value_label: &|v| thousands(v),
    }
    .draw(&root, with_text)?;
    root.present()?;
    Ok(())
}
