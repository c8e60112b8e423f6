//! `/metrics` in the Prometheus text format (version 0.0.4), served on `--metrics <addr>`.
//!
//! Values are read when scraped — the kernel's per-CPU counters, the work queue's pools, the
//! sockhash — so nothing on the data path pays for metrics.

use std::{fmt::Write as _, sync::atomic::Ordering, sync::Arc, time::Duration};

use khttpd_common::{
    echo::Counter,
    http::{Counter as HttpCounter, PassReason},
};
use log::debug;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    echo::EchoService,
    http::HttpService,
    shutdown::Shutdown,
    workqueue::{Stats, WorkQueue},
};

/// A counter that many threads add to without sharing a cache line: each thread adds to a shard
/// of its own (of [`Shards::COUNT`]), a scrape sums them. For counts made on every request.
#[derive(Default)]
pub struct Shards {
    shards: [Shard; Shards::COUNT],
}

#[derive(Default)]
#[repr(align(128))]
struct Shard(std::sync::atomic::AtomicU64);

impl Shards {
    const COUNT: usize = 16;

    pub fn add(&self, n: u64) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % Shards::COUNT;
        }
        let shard = SHARD.with(|shard| *shard);
        self.shards[shard].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn sum(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| shard.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// Everything /metrics reports on.
pub struct Services {
    pub echo: Arc<EchoService>,
    pub http: Arc<HttpService>,
}

/// Largest request head the endpoint reads.
const MAX_REQUEST: usize = 8 * 1024;
/// A scraper that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, services: Arc<Services>, mut shutdown: Shutdown) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.recv() => return,
        };
        let services = Arc::clone(&services);
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &services).await {
                debug!("metrics: {e}");
            }
        });
    }
}

async fn answer(mut stream: TcpStream, services: &Services) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let parsed = loop {
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timed out")
            })??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {
                break Some((
                    request.method.unwrap_or("").to_owned(),
                    request.path.unwrap_or("").to_owned(),
                ))
            }
            Ok(httparse::Status::Partial) if head.len() < MAX_REQUEST => continue,
            _ => break None,
        }
    };
    let (status, body) = match parsed {
        None => ("400 Bad Request", "bad request\n".to_owned()),
        Some((method, _)) if method != "GET" => ("405 Method Not Allowed", "only GET\n".to_owned()),
        Some((_, path)) if path == "/metrics" => ("200 OK", render(services)),
        Some(_) => ("404 Not Found", "see /metrics\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Renders every metric.
pub fn render(services: &Services) -> String {
    let mut out = String::new();
    render_echo(&mut out, &services.echo);
    let http = &services.http;
    metric(
        &mut out,
        "khttpd_http_connections_total",
        "counter",
        "HTTP connections accepted.",
        &[(
            &format!("dispatch=\"{}\"", http.dispatch.as_str()),
            http.connections.load(Ordering::Relaxed),
        )],
    );
    metric(
        &mut out,
        "khttpd_http_user_responses_total",
        "counter",
        "HTTP requests answered in user space (errors and 503s included).",
        &[("", http.user_responses.sum())],
    );
    metric(
        &mut out,
        "khttpd_http_open_connections",
        "gauge",
        "HTTP connections open now, in user space and in the kernel (limit: --max-connections).",
        &[("", http.open.load(Ordering::Relaxed) as u64)],
    );
    metric(
        &mut out,
        "khttpd_http_idle_connections",
        "gauge",
        "User-space HTTP connections waiting between requests on the idle list (no work item).",
        &[("", http.idle.len() as u64)],
    );
    metric(
        &mut out,
        "khttpd_http_rejected_total",
        "counter",
        "HTTP connections turned away with 503 because --max-connections were open.",
        &[("", http.rejected.load(Ordering::Relaxed))],
    );
    metric(
        &mut out,
        "khttpd_sockets_closed_with_memory_charged_total",
        "counter",
        "Kernel-path sockets whose memory books were off when they closed (a psock accounting race: \
         the kernel keeps that memory charged; see docs/kernel-facts.md).",
        &[("", crate::socket_memory::closed_charged())],
    );
    render_file_caches(&mut out, http);
    render_http_kernel(&mut out, http);
    render_access_log(&mut out, http);
    render_queues(&mut out, &[&services.echo.queue, &http.queue]);
    out
}

/// `--root`'s answer and open-file caches (`http::file_cache`).
fn render_file_caches(out: &mut String, http: &HttpService) {
    let Some(site) = &http.site else { return };
    metric(
        out,
        "khttpd_http_site_changes_total",
        "counter",
        "Batches of changes seen under --root; each made the caches and the kernel forget every answer.",
        &[("", site.changes_seen())],
    );
    let [answers, open_files] = site.cache_stats();
    let series = |pick: fn(&crate::http::file_cache::CacheStats) -> u64| {
        [
            ("cache=\"answers\"", pick(&answers)),
            ("cache=\"open_files\"", pick(&open_files)),
        ]
    };
    metric(
        out,
        "khttpd_http_file_cache_hits_total",
        "counter",
        "--root requests answered from a user-space cache, by cache.",
        &series(|s| s.hits),
    );
    metric(
        out,
        "khttpd_http_file_cache_misses_total",
        "counter",
        "--root requests a user-space cache did not hold, by the cache their answer belongs to.",
        &series(|s| s.misses),
    );
    metric(
        out,
        "khttpd_http_file_cache_entries",
        "gauge",
        "Answers held by each user-space cache (for open_files: open files).",
        &series(|s| s.entries),
    );
    metric(
        out,
        "khttpd_http_file_cache_bytes",
        "gauge",
        "Bytes held by the answer cache (bounded by --file-cache-max; the open-file cache is bounded in entries).",
        &[("cache=\"answers\"", answers.bytes)],
    );
}

fn render_access_log(out: &mut String, http: &HttpService) {
    let Some(log) = &http.access_log else { return };
    let counts = log.counts();
    metric(
        out,
        "khttpd_access_log_lines_total",
        "counter",
        "Access log lines written, by the path that answered.",
        &[
            ("path=\"kernel\"", counts.kernel_lines),
            ("path=\"user\"", counts.user_lines),
        ],
    );
    let ring = http
        .kernel
        .as_ref()
        .map_or(0, |kernel| kernel.counter(HttpCounter::AccessRecordsLost));
    metric(
        out,
        "khttpd_access_log_dropped_total",
        "counter",
        "Requests left out of the access log because it fell behind: the kernel's ring buffer was full, the writer's queue was, or a write failed.",
        &[
            ("where=\"ring\"", ring),
            ("where=\"queue\"", counts.dropped_queue),
            ("where=\"write\"", counts.dropped_write),
        ],
    );
}

fn render_http_kernel(out: &mut String, http: &HttpService) {
    let Some(kernel) = &http.kernel else { return };
    metric(
        out,
        "khttpd_http_kernel_responses_total",
        "counter",
        "HTTP requests answered in the kernel.",
        &[("", kernel.counter(HttpCounter::KernelResponses))],
    );
    let passed: Vec<(String, u64)> = PassReason::ALL
        .iter()
        .map(|reason| {
            (
                format!("reason=\"{}\"", reason.label()),
                kernel.counter(HttpCounter::Passed(*reason)),
            )
        })
        .collect();
    let passed: Vec<(&str, u64)> = passed.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        out,
        "khttpd_http_passed_total",
        "counter",
        "skbs of HTTP data the kernel passed to user space, by reason.",
        &passed,
    );
    metric(
        out,
        "khttpd_http_kernel_errors_total",
        "counter",
        "Kernel fast-path failures, by kind (a synthesis error drops the request).",
        &[
            (
                "kind=\"synthesis\"",
                kernel.counter(HttpCounter::SynthesisErrors),
            ),
            (
                "kind=\"redirect\"",
                kernel.counter(HttpCounter::RedirectFailures),
            ),
            (
                "kind=\"handoff_lost\"",
                kernel.counter(HttpCounter::HandoffsLost),
            ),
        ],
    );
    let (entries, bytes) = kernel.cache_size();
    metric(
        out,
        "khttpd_http_kernel_cache_entries",
        "gauge",
        "Requests the kernel can answer (learned from user space's answers).",
        &[("", entries)],
    );
    metric(
        out,
        "khttpd_http_kernel_cache_bytes",
        "gauge",
        "Bytes of the answers the kernel holds.",
        &[("", bytes)],
    );
    metric(
        out,
        "khttpd_http_handoffs_total",
        "counter",
        "HTTP connections the kernel handed to user space.",
        &[("", http.handoffs.load(Ordering::Relaxed))],
    );
    metric(
        out,
        "khttpd_http_kernel_sockets",
        "gauge",
        "Entries in the HTTP sockhash.",
        &[("", kernel.sockmap().sockhash_entries() as u64)],
    );
    metric(
        out,
        "khttpd_http_kernel_connections",
        "gauge",
        "HTTP connections the kernel serves while user space holds them open.",
        &[("", kernel.sockmap().connections() as u64)],
    );
}

fn render_echo(out: &mut String, echo: &EchoService) {
    let user = &echo.counters;
    let fast_path = echo.kernel.is_some();
    metric(
        out,
        "khttpd_fast_path_enabled",
        "gauge",
        "1 when the kernel fast path is attached.",
        &[("", u64::from(fast_path))],
    );
    metric(
        out,
        "khttpd_echo_connections_total",
        "counter",
        "Echo connections accepted, by the path that served them.",
        &[
            (
                "path=\"kernel\"",
                user.kernel_connections.load(Ordering::Relaxed),
            ),
            (
                "path=\"user\"",
                user.user_connections.load(Ordering::Relaxed),
            ),
        ],
    );
    metric(
        out,
        "khttpd_echo_user_bytes_total",
        "counter",
        "Bytes echoed by user space.",
        &[("", user.bytes.load(Ordering::Relaxed))],
    );
    if let Some(kernel) = &echo.kernel {
        let kernel_counters = [
            (
                Counter::Messages,
                "khttpd_echo_kernel_messages_total",
                "skbs echoed by the kernel.",
            ),
            (
                Counter::Bytes,
                "khttpd_echo_kernel_bytes_total",
                "Bytes echoed by the kernel.",
            ),
            (
                Counter::Passes,
                "khttpd_echo_kernel_passes_total",
                "skbs the kernel left to user space.",
            ),
            (
                Counter::RedirectFailures,
                "khttpd_echo_kernel_redirect_failures_total",
                "Redirects the kernel refused.",
            ),
            (
                Counter::Detached,
                "khttpd_echo_kernel_detached_total",
                "Connections moved to user space because their client fell behind.",
            ),
            (
                Counter::HandoffsLost,
                "khttpd_echo_kernel_handoffs_lost_total",
                "Hand-off records the ring buffer had no room for.",
            ),
        ];
        for (counter, name, help) in kernel_counters {
            metric(out, name, "counter", help, &[("", kernel.counter(counter))]);
        }
        metric(
            out,
            "khttpd_echo_kernel_sockets",
            "gauge",
            "Entries in the echo sockhash.",
            &[("", kernel.sockmap().sockhash_entries() as u64)],
        );
        metric(
            out,
            "khttpd_echo_kernel_connections",
            "gauge",
            "Kernel-path connections user space holds open.",
            &[("", kernel.sockmap().connections() as u64)],
        );
    }
}

/// A metric family: name, type, help, and how to read it from a queue's statistics.
type Family = (&'static str, &'static str, &'static str, fn(&Stats) -> u64);

/// One family per statistic, one sample per queue (a family's samples must stay together).
fn render_queues(out: &mut String, queues: &[&WorkQueue]) {
    let samples: Vec<(String, Stats)> = queues
        .iter()
        .map(|queue| {
            (
                format!("queue=\"{}\",kind=\"{}\"", queue.name(), queue.kind()),
                queue.stats(),
            )
        })
        .collect();
    let by = |value: fn(&Stats) -> u64| -> Vec<(&str, u64)> {
        samples
            .iter()
            .map(|(labels, stats)| (labels.as_str(), value(stats)))
            .collect()
    };
    let families: [Family; 5] = [
        (
            "khttpd_workqueue_pending",
            "gauge",
            "Work items queued and not started.",
            |s| s.pending as u64,
        ),
        (
            "khttpd_workqueue_active",
            "gauge",
            "Work items running.",
            |s| s.active as u64,
        ),
        ("khttpd_workqueue_workers", "gauge", "Workers alive.", |s| {
            s.workers as u64
        }),
        (
            "khttpd_workqueue_idle_workers",
            "gauge",
            "Workers waiting for work.",
            |s| s.idle as u64,
        ),
        (
            "khttpd_workqueue_completed_total",
            "counter",
            "Work items finished.",
            |s| s.completed,
        ),
    ];
    for (name, kind, help, value) in families {
        metric(out, name, kind, help, &by(value));
    }
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}
