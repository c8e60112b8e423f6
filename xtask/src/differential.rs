//! `cargo xtask diff`: the fast path is invisible. Starts khttpd twice — `--fast-path on` and
//! `--fast-path off` — sends both the same requests and compares the answers byte for byte with
//! the `Date` values blanked: first a fixed corpus of valid, edge-case and hostile requests, then
//! random ones from a grammar. Each request is sent whole (twice, so the kernel has learned it
//! before the second copy), byte by byte, and in pipelined batches; a request the kernel learned
//! from the first copy must be answered by the kernel the second time. Then the same for a site
//! (`--root`): `--fast-path on` with the user-space file caches against `--fast-path off` without
//! them, on requests for its files with every conditional and Range, the corpus and random
//! requests. The server with everything on also writes an access log, which must then hold a line
//! for every answer the kernel sent. Bounded by a request count and a time limit. The test suite runs it
//! (khttpd/tests/http_fast_path.rs).

use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

use khttpd_harness::{eventually, http::blank_dates, system::temp_dir, Mode, Server, IO_TIMEOUT};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Requests to generate.
    #[arg(short = 'n', long, default_value_t = 2_000)]
    pub requests: usize,
    /// Seed of the generator (default: from the clock; printed so a failure can be replayed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this many seconds even if requests remain.
    #[arg(long, default_value_t = 120)]
    pub seconds: u64,
}

pub fn run(args: &Args, khttpd: &Path) -> anyhow::Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!(
        "diff: corpus + {} random requests, seed {seed}",
        args.requests
    );
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut random = StdRng::seed_from_u64(seed);
    // The greeting: the kernel's answers against user space's.
    let greeting = Phase::start(khttpd, &[], &[], seed, deadline)?;
    let mut requests = corpus();
    requests.extend((0..args.requests).map(|_| generate(&mut random)));
    greeting.compare_all("greeting", requests, &mut random)?;
    greeting.check_log("greeting")?;
    drop(greeting);
    // A site: the kernel's and both user-space caches' answers against user space without any.
    let site = site_folder()?;
    let root = site.path().to_str().context("temporary folder name")?;
    let caches_off = ["--file-cache-max=0", "--open-file-cache=0"];
    let site_phase = Phase::start(
        khttpd,
        &["--root", root],
        &[&["--root", root][..], &caches_off].concat(),
        seed,
        deadline,
    )?;
    let mut requests = site_corpus();
    requests.extend(corpus());
    requests.extend((0..args.requests / 2).map(|_| generate(&mut random)));
    site_phase.compare_all("site", requests, &mut random)?;
    site_phase.check_log("site")?;
    let kernel = &site_phase.kernel;
    let hits = kernel
        .metrics()?
        .sum("khttpd_http_file_cache_hits_total")
        .context("no khttpd_http_file_cache_hits_total in /metrics")?;
    println!("diff (site): the file caches answered {hits}");
    if hits == 0 {
        bail!("the file caches answered nothing: the comparison proved nothing about them");
    }
    Ok(())
}

/// One server with everything on (an access log too) and one without, compared on the same
/// requests.
struct Phase {
    kernel: Server,
    user: Server,
    seed: u64,
    deadline: Instant,
    /// The kernel server's access log folder (removed after the server stopped).
    _logs: tempfile::TempDir,
}

impl Phase {
    fn start(
        khttpd: &Path,
        kernel_args: &[&str],
        user_args: &[&str],
        seed: u64,
        deadline: Instant,
    ) -> anyhow::Result<Phase> {
        let logs = temp_dir("diff-log")?;
        let log = logs.path().join("access.log");
        let log = log.to_str().context("temporary folder name")?;
        let kernel_args = [kernel_args, &["--access-log", log]].concat();
        Ok(Phase {
            kernel: Server::start(khttpd, Mode::Kernel, &kernel_args)?,
            user: Server::start(khttpd, Mode::UserUnbound, user_args)?,
            seed,
            deadline,
            _logs: logs,
        })
    }

    /// Every answer the kernel sent has its access log line (within 5 s), none dropped.
    fn check_log(&self, name: &str) -> anyhow::Result<()> {
        let (mut answered, mut logged, mut dropped) = (0, 0, 0);
        let settled = eventually(Duration::from_secs(5), || {
            let Ok(metrics) = self.kernel.metrics() else {
                return false;
            };
            let count = |series: &str| metrics.get(series).unwrap_or(0);
            answered = count("khttpd_http_kernel_responses_total");
            logged = count("khttpd_access_log_lines_total{path=\"kernel\"}");
            dropped = metrics.sum("khttpd_access_log_dropped_total").unwrap_or(0);
            dropped > 0 || logged == answered
        });
        if dropped > 0 {
            bail!("diff ({name}): {dropped} access log lines dropped");
        }
        if !settled {
            bail!("diff ({name}): the kernel answered {answered}, its access log has {logged}");
        }
        println!("diff ({name}): the access log has all {answered} kernel answers");
        Ok(())
    }

    /// Sends each request whole (twice), byte by byte and in pipelined batches to both servers.
    fn compare_all(
        &self,
        name: &str,
        requests: Vec<Vec<u8>>,
        random: &mut StdRng,
    ) -> anyhow::Result<()> {
        let (kernel, seed) = (&self.kernel, self.seed);
        let (_, before) = kernel_counts(kernel)?;
        let total = requests.len();
        let (mut compared, mut sent, mut learned) = (0usize, 0usize, 0usize);
        let mut batch = Vec::new();
        for request in requests {
            if Instant::now() >= self.deadline {
                bail!("{name}: time limit reached after {sent} of {total} requests");
            }
            sent += 1;
            // Whole: user space answers and, if the kernel can answer it exactly, teaches it.
            let (entries, _) = kernel_counts(kernel)?;
            self.compare(&request, Send::Whole, "whole")?;
            let (entries_after, answers) = kernel_counts(kernel)?;
            let taught = entries_after > entries && is_one_head(&request);
            // Whole, again: a request just taught (and nothing after it: the kernel answers a
            // segment only if it is exactly a learned request) must now be answered by the
            // kernel — else the comparison would only show that user space agrees with itself.
            self.compare(&request, Send::Whole, "whole, again")?;
            if taught {
                learned += 1;
                if kernel_counts(kernel)?.1 == answers {
                    bail!(
                        "{name}: the kernel learned {:?} but did not answer it the second time \
                         (seed {seed})",
                        String::from_utf8_lossy(&request)
                    );
                }
            }
            self.compare(&request, Send::ByteByByte, "byte by byte")?;
            compared += 3;
            batch.push(request);
            if batch.len() == 1 + random.gen_range(0..5) {
                self.compare(&batch.concat(), Send::Whole, "pipelined")?;
                compared += 1;
                batch.clear();
            }
        }
        let answered = kernel_counts(kernel)?.1 - before;
        println!(
            "diff ({name}): {sent} requests, {compared} exchanges identical; \
             {learned} requests learned, each answered by the kernel when sent again; \
             the kernel answered {answered}"
        );
        if answered == 0 {
            bail!("{name}: the kernel answered nothing: the comparison proved nothing");
        }
        Ok(())
    }

    fn compare(&self, request: &[u8], send: Send, how: &str) -> anyhow::Result<()> {
        let got = exchange(self.kernel.http_addr(), request, send)?;
        let want = exchange(self.user.http_addr(), request, send)?;
        if got != want {
            bail!(
                "answers differ ({how}, seed {}) for {:?}\nwith:    {:?}\nwithout: {:?}",
                self.seed,
                String::from_utf8_lossy(request),
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            );
        }
        Ok(())
    }
}

/// The folder the site phase serves: names the request grammar produces (`a`, `b/`, `~`),
/// files on both sides of the inline limit, a folder with an index and one without.
fn site_folder() -> anyhow::Result<tempfile::TempDir> {
    let dir = temp_dir("diff-site")?;
    let files: [(&str, Vec<u8>); 7] = [
        ("a", b"a file named a\n".to_vec()),
        ("b/a", b"b/a\n".to_vec()),
        (
            "b/index.txt",
            b"no index.html here: b/ is a listing\n".to_vec(),
        ),
        ("~", b"tilde\n".to_vec()),
        (
            "file.txt",
            (0..2000u32).map(|i| b'a' + (i % 26) as u8).collect(),
        ),
        (
            "big.bin",
            (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect(),
        ),
        ("with-index/index.html", b"<p>index</p>\n".to_vec()),
    ];
    for (path, bytes) in files {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().expect("a parent"))?;
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// Requests for the site's files: each method, version and conditional or Range header.
fn site_corpus() -> Vec<Vec<u8>> {
    let targets = [
        "/",
        "/a",
        "/b",
        "/b/",
        "/b/a",
        "/~",
        "/file.txt",
        "/big.bin",
        "/with-index/",
        "/missing",
        "/a/",
        "/file.txt?x=1",
        "/%61",
    ];
    let heads = [
        ("GET", "HTTP/1.1", ""),
        ("HEAD", "HTTP/1.1", ""),
        ("GET", "HTTP/1.0", ""),
        ("GET", "HTTP/1.1", "Connection: close\r\n"),
    ];
    let extras = [
        "",
        "If-None-Match: *\r\n",
        "If-None-Match: \"nope\"\r\n",
        "If-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\r\n",
        "If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT\r\n",
        "Range: bytes=0-9\r\n",
        "Range: bytes=-5\r\n",
        "Range: bytes=100000-\r\n",
        "Range: bytes=999999-\r\n",
    ];
    let mut corpus = Vec::new();
    for target in targets {
        for (method, version, connection) in heads {
            for extra in extras {
                corpus.push(
                    format!("{method} {target} {version}\r\nHost: x\r\n{connection}{extra}\r\n")
                        .into_bytes(),
                );
            }
        }
    }
    corpus
}

/// Whether `request` is one request head and nothing more.
fn is_one_head(request: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    matches!(
        httparse::Request::new(&mut headers).parse(request),
        Ok(httparse::Status::Complete(n)) if n == request.len()
    )
}

/// The kernel's learned requests and its answers so far, from one scrape.
fn kernel_counts(server: &Server) -> anyhow::Result<(u64, u64)> {
    let metrics = server.metrics()?;
    Ok((
        metrics.value("khttpd_http_kernel_cache_entries")?,
        metrics.value("khttpd_http_kernel_responses_total")?,
    ))
}

#[derive(Clone, Copy)]
enum Send {
    Whole,
    ByteByByte,
}

/// Sends `request` on a new connection (after the server had time to install it), half-closes,
/// reads until the server closes, and blanks the dates.
fn exchange(addr: SocketAddr, request: &[u8], send: Send) -> anyhow::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    // A socket whose FIN arrives before it is installed cannot enter the sockhash.
    thread::sleep(Duration::from_millis(2));
    match send {
        Send::Whole => stream.write_all(request)?,
        Send::ByteByByte => {
            for byte in request {
                // The server closes after an error answer; the rest may not be writable.
                if stream.write_all(&[*byte]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).with_context(|| {
        format!(
            "reading the answer to {:?}",
            String::from_utf8_lossy(request)
        )
    })?;
    Ok(blank_dates(answer))
}

/// Valid, edge-case and hostile requests: every method × version × header set, plus oddities.
fn corpus() -> Vec<Vec<u8>> {
    let methods = ["GET", "HEAD", "POST", "get", "OPTIONS"];
    let targets = ["/", "/index.html?q=1"];
    let versions = ["HTTP/1.0", "HTTP/1.1", "HTTP/1.2", "HTTP/2.0"];
    let header_sets: [&[u8]; 11] = [
        b"",
        b"Host: localhost\r\n",
        b"Host: localhost\r\nConnection: close\r\n",
        b"Host: localhost\r\nConnection: keep-alive\r\n",
        b"Host: a\r\nHost: b\r\n",
        b"Host: x\r\nContent-Length: 0\r\n",
        b"Host: x\r\nContent-Length: 5\r\n\r\nhello",
        b"Host: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",
        b"Host: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"Host: x\r\nX-Folded: a\r\n b\r\n",
        b"Host : x\r\n",
    ];
    let mut corpus = Vec::new();
    for method in methods {
        for version in versions {
            for (i, headers) in header_sets.iter().enumerate() {
                let target = targets[i % targets.len()];
                let mut request = format!("{method} {target} {version}\r\n").into_bytes();
                request.extend_from_slice(headers);
                // Header sets with a body carry their own blank line.
                if !headers.windows(4).any(|w| w == b"\r\n\r\n") {
                    request.extend_from_slice(b"\r\n");
                }
                corpus.push(request);
            }
        }
    }
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(300));
    let huge_header = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
        "b".repeat(9000)
    );
    let oddities: [&[u8]; 14] = [
        b"GET / HTTP/1.1\nHost: x\n\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00\x00\x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"GET",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ];
    corpus.extend(oddities.iter().map(|r| r.to_vec()));
    corpus.push(long_target.into_bytes());
    corpus.push(huge_header.into_bytes());
    corpus
}

fn pick<'a>(random: &mut StdRng, items: &[&'a str]) -> &'a str {
    items.choose(random).expect("a choice")
}

/// A request from a grammar that is mostly valid (so the kernel gets to answer) and sometimes
/// hostile: odd methods, versions, targets, line endings, framing and header syntax.
fn generate(random: &mut StdRng) -> Vec<u8> {
    let method = pick(
        random,
        &[
            "GET", "GET", "GET", "GET", "GET", "HEAD", "HEAD", "POST", "PUT", "get", "G3T", "",
        ],
    );
    let version = pick(
        random,
        &[
            "HTTP/1.1",
            "HTTP/1.1",
            "HTTP/1.1",
            "HTTP/1.1",
            "HTTP/1.0",
            "HTTP/1.2",
            "HTTP/2.0",
            "HTTP/1.1 ",
            "http/1.1",
        ],
    );
    let mut target = String::from("/");
    for _ in 0..random.gen_range(0..12) {
        let piece = pick(
            random,
            &[
                "a", "b/", "%20", "%2e%2e/", "..", "?", "=", "&x", "~", "%", "\u{e9}",
            ],
        );
        target.push_str(piece);
    }
    if random.gen_range(0..100) < 3 {
        target = pick(random, &["*", "http://a/b", "", "/\t/"]).to_owned();
    }
    let eol: &str = if random.gen_range(0..100) < 5 {
        "\n"
    } else {
        "\r\n"
    };
    let mut request = format!("{method} {target} {version}{eol}").into_bytes();
    let mut body = Vec::new();
    if random.gen_range(0..100) < 85 {
        request.extend_from_slice(format!("Host: localhost{eol}").as_bytes());
    }
    for _ in 0..random.gen_range(0..3) {
        let header = match random.gen_range(0..14) {
            0 => "Connection: close".to_owned(),
            1 => "Connection: keep-alive".to_owned(),
            2 => "Connection: Keep-Alive, Upgrade".to_owned(),
            3 => "Host: other".to_owned(),
            4 => {
                let len = random.gen_range(0..8);
                body = vec![b'x'; len];
                format!("Content-Length: {len}")
            }
            5 => "Content-Length: +5".to_owned(),
            6 => {
                body = b"3\r\nabc\r\n0\r\n\r\n".to_vec();
                "Transfer-Encoding: chunked".to_owned()
            }
            7 => "X-Folded: a\r\n b".to_owned(),
            8 => "Bad Header: x".to_owned(),
            9 => "X-Empty:".to_owned(),
            10 | 11 => format!("User-Agent: test/{}", random.gen_range(0..1000)),
            _ => "Accept: */*".to_owned(),
        };
        request.extend_from_slice(header.as_bytes());
        request.extend_from_slice(eol.as_bytes());
    }
    request.extend_from_slice(eol.as_bytes());
    request.extend_from_slice(&body);
    request
}
