//! `--root`: a generated site served and fetched over real sockets — bytes, MIME types,
//! listings whose links work, validators (304), ranges (206/416), and requests that try to leave
//! the root, in both dispatch modes and with the fast path on.

mod common;

use std::{fs, net::TcpStream, os::unix::fs::symlink, path::Path, time::Duration};

use common::KHTTPD;
use khttpd_harness::{
    eventually,
    http::{answer_until_close, Answer},
    system::bpf_allowed,
    system::temp_dir,
    Mode, Server,
};

/// A throw-away document root with nested folders, odd names, an empty and a large file, and
/// symlinks that stay inside or leave the root.
struct TestSite {
    /// The root, removed when the site is dropped.
    dir: tempfile::TempDir,
    files: Vec<(String, Vec<u8>)>,
}

impl TestSite {
    fn new(name: &str) -> TestSite {
        let dir = temp_dir(&format!("site-{name}")).unwrap();
        let root = dir.path();
        let large: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let files: Vec<(&str, Vec<u8>)> = vec![
            ("index.txt", b"plain text\n".to_vec()),
            ("page.html", b"<h1>page</h1>\n".to_vec()),
            ("style.css", b"body{}\n".to_vec()),
            ("empty.txt", Vec::new()),
            ("large.bin", large),
            ("with space/inner file.txt", b"inner\n".to_vec()),
            ("with space/deeper/data.json", b"{\"a\":1}\n".to_vec()),
            (
                "\u{fc}ber%20/caf\u{e9}.txt",
                b"utf-8 and percent\n".to_vec(),
            ),
            ("<b>&'\"/x.txt", b"escaped\n".to_vec()),
            ("has-index/index.html", b"<p>index</p>\n".to_vec()),
        ];
        for (path, bytes) in &files {
            let path = root.join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
        }
        symlink("with space/inner file.txt", root.join("link-inside")).unwrap();
        symlink("/etc/hostname", root.join("link-outside")).unwrap();
        let files = files
            .into_iter()
            .map(|(path, bytes)| (path.to_owned(), bytes))
            .collect();
        TestSite { dir, files }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn server(&self, mode: Mode, dispatch: &str) -> Server {
        self.server_as(mode, dispatch, "nobody")
    }

    /// `user`: `root` keeps the server unconfined, so only its own checks keep it in the root.
    fn server_as(&self, mode: Mode, dispatch: &str, user: &str) -> Server {
        let root = self.root().to_str().unwrap();
        Server::start(
            KHTTPD,
            mode,
            &["--root", root, "--dispatch", dispatch, "--user", user],
        )
        .unwrap()
    }
}

/// A request target for a path under the root: each byte outside unreserved characters encoded.
fn target(path: &str) -> String {
    let mut out = String::from("/");
    for byte in path.bytes() {
        match byte {
            b'/' | b'-' | b'_' | b'.' | b'~' | b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// `GET target` with `headers`.
fn request(target: &str, headers: &[&str]) -> Vec<u8> {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: site\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request.into_bytes()
}

fn get(server: &Server, target: &str, headers: &[&str]) -> Answer {
    get_at(server.http_addr(), target, headers)
}

fn get_at(addr: std::net::SocketAddr, target: &str, headers: &[&str]) -> Answer {
    let mut headers = headers.to_vec();
    headers.push("Connection: close");
    let answer = answer_until_close(addr, &request(target, &headers)).expect("a FIN, not a reset");
    if let Some(length) = answer.header("Content-Length") {
        assert_eq!(
            length.parse::<usize>().unwrap(),
            answer.body.len(),
            "{target}"
        );
    }
    answer
}

#[test]
fn files_listings_validators_and_ranges() {
    let site = TestSite::new("files");
    for dispatch in ["cmwq", "thread"] {
        let server = site.server(Mode::UserUnbound, dispatch);
        for (path, bytes) in &site.files {
            let answer = get(&server, &target(path), &[]);
            assert_eq!(answer.status, 200, "{dispatch} {path}");
            assert!(answer.body == *bytes, "{dispatch} {path}: wrong bytes");
        }
        let mime = |path| {
            get(&server, path, &[])
                .header("Content-Type")
                .unwrap()
                .to_owned()
        };
        assert_eq!(mime("/page.html"), "text/html");
        assert_eq!(mime("/style.css"), "text/css");
        assert_eq!(mime("/large.bin"), "application/octet-stream");
        assert_eq!(mime("/with%20space/deeper/data.json"), "application/json");
        // A directory with index.html serves it; one without is listed; no slash redirects.
        assert_eq!(get(&server, "/has-index/", &[]).body, b"<p>index</p>\n");
        let moved = get(&server, "/with%20space", &[]);
        assert_eq!(moved.status, 301);
        assert_eq!(moved.header("Location"), Some("/with%20space/"));
        // The listing escapes names and every link in it works.
        let listing = get(&server, "/", &[]);
        let html = String::from_utf8(listing.body).unwrap();
        assert!(html.contains("&lt;b&gt;&amp;&#39;&quot;/"), "{html}");
        assert!(!html.contains("<b>&"), "{html}");
        let links: Vec<&str> = html
            .split("href=\"")
            .skip(1)
            .map(|rest| &rest[..rest.find('"').unwrap()])
            .collect();
        assert!(links.len() >= 10, "{html}");
        for link in links.iter().filter(|l| **l != "link-outside") {
            let answer = get(&server, &format!("/{link}"), &[]);
            assert_eq!(answer.status, 200, "{dispatch}: link {link}");
        }
        // Validators.
        let first = get(&server, "/page.html", &[]);
        let etag = first.header("ETag").unwrap().to_owned();
        let modified = first.header("Last-Modified").unwrap().to_owned();
        let unchanged = get(&server, "/page.html", &[&format!("If-None-Match: {etag}")]);
        assert_eq!((unchanged.status, unchanged.body.len()), (304, 0));
        let since = get(
            &server,
            "/page.html",
            &[&format!("If-Modified-Since: {modified}")],
        );
        assert_eq!(since.status, 304);
        // The same date in asctime's obsolete format, which RFC 9110 says a recipient must accept.
        let fields: Vec<&str> = modified.split(' ').collect();
        let (weekday, day, month, year, time) =
            (fields[0], fields[1], fields[2], fields[3], fields[4]);
        let day: u32 = day.parse().unwrap();
        let asctime = format!("{} {month} {day:>2} {time} {year}", &weekday[..3]);
        let since = get(
            &server,
            "/page.html",
            &[&format!("If-Modified-Since: {asctime}")],
        );
        assert_eq!(since.status, 304, "{asctime}");
        let other = get(&server, "/page.html", &["If-None-Match: \"other\""]);
        assert_eq!(other.status, 200);
        // Ranges: one range → 206, out of the file → 416, several → the whole file.
        let large = &site.files.iter().find(|(p, _)| p == "large.bin").unwrap().1;
        let part = get(&server, "/large.bin", &["Range: bytes=1000-1999999"]);
        assert_eq!(part.status, 206);
        assert_eq!(
            part.header("Content-Range"),
            Some("bytes 1000-1999999/3000000")
        );
        assert!(part.body == large[1000..2_000_000]);
        let tail = get(&server, "/large.bin", &["Range: bytes=-10"]);
        assert!(tail.status == 206 && tail.body == large[large.len() - 10..]);
        let beyond = get(&server, "/large.bin", &["Range: bytes=3000000-"]);
        assert_eq!(beyond.status, 416);
        assert_eq!(beyond.header("Content-Range"), Some("bytes */3000000"));
        assert_eq!(
            get(&server, "/large.bin", &["Range: bytes=0-1,5-6"]).status,
            200
        );
    }
}

#[test]
fn nothing_outside_the_root_is_served() {
    let site = TestSite::new("confined");
    // Its own checks first: unconfined (`--user root`), where a path outside could be opened.
    let server = site.server_as(Mode::UserUnbound, "cmwq", "root");
    // Twice: a refusal is decided (and logged) again each time, never served from a cache.
    for (attempt, status) in [
        ("/../etc/hostname", 403),
        ("/%2e%2e/etc/hostname", 403),
        ("/with%20space/..%2f..%2fetc/hostname", 403),
        ("/%2E%2E%2F%2E%2E%2Fetc/hostname", 403),
        ("/link-outside", 403),
        ("/page.html%00.txt", 404),
        ("//etc/hostname", 404),
        ("/no-such-file", 404),
    ]
    .iter()
    .cycle()
    .take(16)
    {
        let answer = get(&server, attempt, &[]);
        assert_eq!(answer.status, *status, "{attempt}");
        assert!(!answer.body.is_empty() || *status == 404, "{attempt}");
    }
    assert_eq!(get(&server, "/link-inside", &[]).body, b"inner\n");
    // Absolute-form and other targets that are not a path.
    assert_eq!(get(&server, "*", &[]).status, 400);
    let reasons = [
        "would leave the document root",
        "outside the document root",
        "NUL byte",
    ];
    let log = server.log_with(&reasons).unwrap();
    for reason in reasons {
        assert!(log.contains(reason), "{reason}: {log}");
    }
    // Each refused attempt once per round: 4 leave by `..`, 1 by a link, 1 has a NUL.
    for (reason, times) in [(reasons[0], 8), (reasons[1], 2), (reasons[2], 2)] {
        eventually(Duration::from_secs(10), || {
            server.log().matches(reason).count() >= times
        });
        let seen = server.log().matches(reason).count();
        assert_eq!(seen, times, "{reason}: {}", server.log());
    }
    // Confined to the root (the default, `--user nobody`), a link out leads nowhere.
    let server = site.server(Mode::UserUnbound, "cmwq");
    assert_eq!(get(&server, "/link-outside", &[]).status, 404);
    assert_eq!(get(&server, "/../etc/hostname", &[]).status, 403);
    assert_eq!(get(&server, "/link-inside", &[]).body, b"inner\n");
}

#[test]
fn the_fast_path_changes_nothing_on_a_site() {
    if !bpf_allowed() {
        return;
    }
    let site = TestSite::new("differential");
    let user = site.server(Mode::UserUnbound, "cmwq");
    let kernel = site.server(Mode::Kernel, "cmwq");
    let mut targets: Vec<String> = site.files.iter().map(|(p, _)| target(p)).collect();
    targets.extend(["/", "/with%20space/", "/has-index/", "/nope", "/../x"].map(String::from));
    for round in 0..2 {
        for target in &targets {
            let (a, b) = (get(&user, target, &[]), get(&kernel, target, &[]));
            assert_eq!(a.status, b.status, "round {round} {target}");
            assert!(a.body == b.body, "round {round} {target}");
            for name in ["Content-Type", "Content-Length", "ETag", "Last-Modified"] {
                assert_eq!(
                    a.header(name),
                    b.header(name),
                    "round {round} {target} {name}"
                );
            }
        }
    }
}

/// Asks for `target` on a kept-open connection; returns the status and body.
fn ask(stream: &mut TcpStream, target: &str, headers: &[&str]) -> (u16, Vec<u8>) {
    common::ask(stream, &request(target, headers))
}

#[test]
fn small_files_are_answered_by_the_kernel_and_follow_changes_within_a_second() {
    if !bpf_allowed() {
        return;
    }
    let site = TestSite::new("cache");
    let server = site.server(Mode::Kernel, "cmwq");
    let kernel_answers = || server.metrics().unwrap()["khttpd_http_kernel_responses_total"];
    let mut stream = TcpStream::connect(server.http_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            ask(&mut stream, "/page.html", &[]),
            (200, b"<h1>page</h1>\n".to_vec())
        );
    }
    let before = kernel_answers();
    assert!(before >= 3, "the kernel answered {before} of 4");
    assert!(server.metrics().unwrap()["khttpd_http_kernel_cache_entries"] >= 1);
    // A 304 to a conditional request is answered there too.
    let etag = get(&server, "/page.html", &[])
        .header("ETag")
        .unwrap()
        .to_owned();
    let conditional = format!("If-None-Match: {etag}");
    for _ in 0..3 {
        assert_eq!(ask(&mut stream, "/page.html", &[&conditional]).0, 304);
    }
    assert!(kernel_answers() >= before + 2);
    // Large files never are.
    let large = kernel_answers();
    for _ in 0..3 {
        assert_eq!(ask(&mut stream, "/large.bin", &[]).1.len(), 3_000_000);
    }
    assert_eq!(kernel_answers(), large);
    follows_changes_within_a_second(&site, &server, &mut stream);
}

/// After `/page.html`, `/style.css`, `/new.txt` and `/large.bin` were asked for on `stream`: a
/// change, a deletion, a new file and a rewritten large file show within a second.
fn follows_changes_within_a_second(site: &TestSite, server: &Server, stream: &mut TcpStream) {
    let seen = || server.metrics().unwrap()["khttpd_http_site_changes_total"];
    let before = seen();
    fs::write(site.root().join("page.html"), b"<h1>changed</h1>\n").unwrap();
    fs::remove_file(site.root().join("style.css")).unwrap();
    fs::write(site.root().join("new.txt"), b"new\n").unwrap();
    fs::write(site.root().join("large.bin"), vec![7; 100_000]).unwrap();
    // Once one batch of these changes was seen, everything cached before is forgotten (and this
    // test asked for nothing since its first change).
    assert!(
        eventually(Duration::from_secs(1), || seen() > before),
        "the changes were not seen within a second"
    );
    for _ in 0..3 {
        assert_eq!(
            ask(stream, "/page.html", &[]),
            (200, b"<h1>changed</h1>\n".to_vec())
        );
        assert_eq!(ask(stream, "/style.css", &[]).0, 404);
        assert_eq!(ask(stream, "/new.txt", &[]), (200, b"new\n".to_vec()));
        assert_eq!(ask(stream, "/large.bin", &[]), (200, vec![7; 100_000]));
    }
}

#[test]
fn user_space_keeps_answers_and_open_files_and_follows_changes_within_a_second() {
    let site = TestSite::new("user-cache");
    let server = site.server(Mode::UserUnbound, "cmwq");
    let hits = |cache: &str| {
        server.metrics().unwrap()
            [&format!("khttpd_http_file_cache_hits_total{{cache=\"{cache}\"}}")]
    };
    let mut stream = TcpStream::connect(server.http_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let large = &site.files.iter().find(|(p, _)| p == "large.bin").unwrap().1;
    for _ in 0..3 {
        assert_eq!(
            ask(&mut stream, "/page.html", &[]),
            (200, b"<h1>page</h1>\n".to_vec())
        );
        assert_eq!(ask(&mut stream, "/style.css", &[]).0, 200);
        assert_eq!(ask(&mut stream, "/new.txt", &[]).0, 404);
        assert!(ask(&mut stream, "/large.bin", &[]).1 == *large);
    }
    // Small answers (a 404 too) come from the answer cache, the large file from an open one.
    assert!(hits("answers") >= 6, "{}", hits("answers"));
    assert!(hits("open_files") >= 2, "{}", hits("open_files"));
    // A cached answer carries the current Date.
    let first = get(&server, "/page.html", &[]);
    let date = first.header("Date").unwrap().to_owned();
    let ticks = eventually(Duration::from_secs(3), || {
        get(&server, "/page.html", &[]).header("Date") != Some(date.as_str())
    });
    assert!(ticks, "a cached answer kept the Date {date}");
    follows_changes_within_a_second(&site, &server, &mut stream);
    // Turned off, nothing is kept.
    let root = site.root().to_str().unwrap();
    let caches_off = ["--root", root, "--file-cache-max=0", "--open-file-cache=0"];
    let off = Server::start(KHTTPD, Mode::UserUnbound, &caches_off).unwrap();
    for _ in 0..3 {
        assert_eq!(get(&off, "/page.html", &[]).status, 200);
        assert_eq!(get(&off, "/large.bin", &[]).body.len(), 100_000);
    }
    for cache in ["answers", "open_files"] {
        let name = format!("khttpd_http_file_cache_hits_total{{cache=\"{cache}\"}}");
        assert_eq!(off.metrics().unwrap()[&name], 0, "{cache}");
    }
}

#[test]
fn unreadable_files_are_403() {
    use std::os::unix::fs::PermissionsExt;
    let site = TestSite::new("unreadable");
    let secret = site.root().join("secret.txt");
    fs::write(&secret, b"secret\n").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads every file; the server runs as nobody once started (the default `--user`).
    let server = site.server(Mode::UserUnbound, "cmwq");
    assert_eq!(get(&server, "/secret.txt", &[]).status, 403);
    assert_eq!(get(&server, "/page.html", &[]).status, 200);
}

#[test]
fn answers_over_the_cache_limit_stay_in_user_space() {
    if !bpf_allowed() {
        return;
    }
    let site = TestSite::new("limit");
    let root = site.root().to_str().unwrap();
    let server = Server::start(
        KHTTPD,
        Mode::Kernel,
        &["--root", root, "--kernel-cache-max", "64"],
    )
    .unwrap();
    let mut stream = TcpStream::connect(server.http_addr()).unwrap();
    for _ in 0..4 {
        assert_eq!(ask(&mut stream, "/page.html", &[]).0, 200);
    }
    assert_eq!(
        server.metrics().unwrap()["khttpd_http_kernel_responses_total"],
        0
    );
    assert_eq!(
        server.metrics().unwrap()["khttpd_http_kernel_cache_entries"],
        0
    );
}
