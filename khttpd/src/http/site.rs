//! `--root <dir>`: files and directory listings under a document root, with the validators and
//! ranges a browser or a cache expects. Nothing outside the root is ever served: the request path
//! is decoded once, `..` segments and NUL bytes are refused, and the resolved path (symlinks
//! followed) must still lie under the root.
//!
//! Small files go into the response buffer; larger ones are sent by the connection's driver with
//! sendfile(2), so their bytes never pass through user space ([`FileBody`]). Answers are kept
//! for the next request that asks the same ([`super::file_cache`]) until anything under the root
//! changes.

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use percent_encoding::{percent_decode, AsciiSet, NON_ALPHANUMERIC};

use super::{
    file_cache::{Asking, Computed, FileCache, Limits},
    response::{self, format_imf_fixdate, parse_http_date, Status},
};

/// Files up to this size are copied into the response; larger ones go out with sendfile.
const INLINE_LIMIT: u64 = 64 * 1024;

/// Bytes a file response still owes after its head: `len` bytes of `file` from `offset`.
#[derive(Clone)]
pub struct FileBody {
    /// Shared with the open-file cache.
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
}

/// What a request asked for, as far as the site cares.
#[derive(Default, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    /// The request target, raw.
    pub target: Vec<u8>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    pub range: Option<String>,
}

pub struct Site {
    /// Canonical (symlinks resolved).
    root: PathBuf,
    cache: Arc<FileCache>,
    /// Batches of changes under the root seen by [`Site::watch`], each forgetting everything.
    changes: Arc<AtomicU64>,
}

/// Why there is no file to serve: the status, and whether the same request may get the same
/// refusal from the cache (not when it was worth a log line: each attempt is logged).
struct Refusal {
    status: Status,
    cacheable: bool,
}

impl Refusal {
    fn cached(status: Status) -> Refusal {
        Refusal {
            status,
            cacheable: true,
        }
    }

    fn each_time(status: Status) -> Refusal {
        Refusal {
            status,
            cacheable: false,
        }
    }

    /// Writes the refusal's answer.
    fn answer(self, keep_alive: bool, head_only: bool, out: &mut Vec<u8>) -> Computed {
        response::write(out, self.status, keep_alive, head_only);
        Computed {
            file: None,
            cacheable: self.cacheable,
        }
    }
}

/// An answer written whole to the output, that the same request may get again from the cache.
const WRITTEN: Computed = Computed {
    file: None,
    cacheable: true,
};

/// Characters left as they are in listing links (the rest is percent-encoded).
const LINK: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

impl Site {
    pub fn new(root: &Path, limits: Limits) -> io::Result<Site> {
        let root = fs::canonicalize(root)?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(Site {
            root,
            cache: Arc::new(FileCache::new(limits)),
            changes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Batches of changes seen under the root so far; each made the caches and the kernel
    /// forget everything before it was counted.
    pub fn changes_seen(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// The caches' counters: answers, then open files.
    pub fn cache_stats(&self) -> [super::file_cache::CacheStats; 2] {
        self.cache.stats()
    }

    /// The folder served, canonical.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Forgets every cached answer and calls `changed` (on a thread of its own) whenever
    /// something under the root is written, created, removed, moved or has its attributes
    /// changed, for the rest of the process's life. inotify directly, with a mask without IN_OPEN: a watcher woken by every file the
    /// server opens cost a fifth of the user-space path's throughput (measured with the notify
    /// crate, whose mask always has it).
    pub fn watch(&self, changed: impl Fn() + Send + 'static) -> io::Result<()> {
        use inotify::{EventMask, Inotify, WatchMask};
        let mask = WatchMask::ATTRIB
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::CLOSE_WRITE
            | WatchMask::MODIFY
            | WatchMask::MOVED_FROM
            | WatchMask::MOVED_TO
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF;
        let mut inotify = Inotify::init()?;
        let mut dirs = HashMap::new();
        watch_tree(&mut inotify, &mut dirs, &self.root, mask);
        let cache = self.cache.clone();
        let changes = Arc::clone(&self.changes);
        std::thread::Builder::new()
            .name("site-watch".into())
            .spawn(move || {
                let mut buffer = [0u8; 16 * 1024];
                loop {
                    let Ok(events) = inotify.read_events_blocking(&mut buffer) else {
                        return;
                    };
                    let mut new_dirs = Vec::new();
                    for event in events {
                        let is_new_dir = event.mask.contains(EventMask::ISDIR)
                            && event
                                .mask
                                .intersects(EventMask::CREATE | EventMask::MOVED_TO);
                        if let (true, Some(name), Some(parent)) =
                            (is_new_dir, event.name, dirs.get(&event.wd))
                        {
                            new_dirs.push(parent.join(name));
                        }
                    }
                    for dir in new_dirs {
                        watch_tree(&mut inotify, &mut dirs, &dir, mask);
                    }
                    // Anything at all (an overflow too): forgetting is always safe.
                    cache.forget_everything();
                    changed();
                    changes.fetch_add(1, Ordering::AcqRel);
                }
            })?;
        Ok(())
    }

    /// Appends the answer to `request` to `out`; returns the file bytes still to send after it.
    pub fn answer(
        &self,
        request: &Request,
        keep_alive: bool,
        head_only: bool,
        out: &mut Vec<u8>,
    ) -> Option<FileBody> {
        let asking = Asking {
            request,
            keep_alive,
            head_only,
        };
        self.cache.answer(asking, out, |out| {
            self.compute(request, keep_alive, head_only, out)
        })
    }

    /// The answer to `request` from the files, as [`Site::answer`] (without the cache).
    fn compute(
        &self,
        request: &Request,
        keep_alive: bool,
        head_only: bool,
        out: &mut Vec<u8>,
    ) -> Computed {
        let refuse =
            |refusal: Refusal, out: &mut Vec<u8>| refusal.answer(keep_alive, head_only, out);
        let path = match self.resolve(&request.target) {
            Ok(path) => path,
            Err(refusal) => return refuse(refusal, out),
        };
        let Ok(meta) = fs::metadata(&path) else {
            return refuse(Refusal::cached(Status::NotFound), out);
        };
        let target = path_part(&request.target);
        if !meta.is_dir() && target.ends_with(b"/") {
            // `/file.txt/` names a folder that does not exist (open(2) says ENOTDIR).
            return refuse(Refusal::cached(Status::NotFound), out);
        }
        if meta.is_dir() {
            if !target.ends_with(b"/") {
                let mut location = String::from_utf8_lossy(target).into_owned();
                location.push('/');
                let header = ("Location", location.as_str());
                empty(out, Status::MovedPermanently, keep_alive, header);
                return WRITTEN;
            }
            let index = path.join("index.html");
            if index.is_file() {
                return self.file(&index, request, keep_alive, head_only, out);
            }
            return self.listing(&path, target, keep_alive, head_only, out);
        }
        self.file(&path, request, keep_alive, head_only, out)
    }

    /// The file a request target names, or why there is none.
    fn resolve(&self, target: &[u8]) -> Result<PathBuf, Refusal> {
        let raw = path_part(target);
        if raw.first() != Some(&b'/') {
            return Err(Refusal::cached(Status::BadRequest));
        }
        let decoded: Vec<u8> = percent_decode(raw).collect();
        let shown = String::from_utf8_lossy(&decoded);
        if decoded.contains(&0) {
            warn!("http: refused {shown:?}: NUL byte in the path");
            return Err(Refusal::each_time(Status::NotFound));
        }
        let mut path = self.root.clone();
        for segment in decoded.split(|&b| b == b'/') {
            match segment {
                b"" | b"." => {}
                b".." => {
                    warn!("http: refused {shown:?}: `..` would leave the document root");
                    return Err(Refusal::each_time(Status::Forbidden));
                }
                name => path.push(std::ffi::OsStr::from_bytes(name)),
            }
        }
        match fs::canonicalize(&path) {
            Ok(real) if real.starts_with(&self.root) => Ok(real),
            Ok(real) => {
                warn!(
                    "http: refused {shown:?}: resolves to {}, outside the document root",
                    real.display()
                );
                Err(Refusal::each_time(Status::Forbidden))
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                Err(Refusal::each_time(Status::Forbidden))
            }
            Err(_) => Err(Refusal::cached(Status::NotFound)),
        }
    }

    fn file(
        &self,
        path: &Path,
        request: &Request,
        keep_alive: bool,
        head_only: bool,
        out: &mut Vec<u8>,
    ) -> Computed {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) => {
                let refusal = if e.kind() == io::ErrorKind::PermissionDenied {
                    info!("http: cannot read {}: {e}", path.display());
                    Refusal::each_time(Status::Forbidden)
                } else {
                    Refusal::cached(Status::NotFound)
                };
                return refusal.answer(keep_alive, head_only, out);
            }
        };
        let Ok(meta) = file.metadata() else {
            return Refusal::cached(Status::NotFound).answer(keep_alive, head_only, out);
        };
        let size = meta.len();
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let etag = format!("\"{modified:x}-{size:x}\"");
        let last_modified = format_imf_fixdate(modified);
        let content_type = mime_guess::from_path(path)
            .first_or_octet_stream()
            .essence_str()
            .to_owned();
        let validators = [
            ("ETag", etag.as_str()),
            ("Last-Modified", last_modified.as_str()),
            ("Accept-Ranges", "bytes"),
        ];
        if not_modified(request, &etag, modified) {
            response::write_head(out, Status::NotModified, keep_alive, None, &validators);
            return WRITTEN;
        }
        let (status, start, len, content_range) = match request.range.as_deref() {
            Some(range) if !head_only => match byte_range(range, size) {
                Some(Ok((start, end))) => (
                    Status::PartialContent,
                    start,
                    end - start + 1,
                    Some(format!("bytes {start}-{end}/{size}")),
                ),
                Some(Err(())) => {
                    let unsatisfiable = format!("bytes */{size}");
                    let header = ("Content-Range", unsatisfiable.as_str());
                    empty(out, Status::RangeNotSatisfiable, keep_alive, header);
                    return WRITTEN;
                }
                None => (Status::Ok, 0, size, None),
            },
            _ => (Status::Ok, 0, size, None),
        };
        let mut headers = validators.to_vec();
        if let Some(content_range) = &content_range {
            headers.push(("Content-Range", content_range));
        }
        response::write_head(
            out,
            status,
            keep_alive,
            Some((&content_type, len)),
            &headers,
        );
        if head_only || len == 0 {
            return WRITTEN;
        }
        if len <= INLINE_LIMIT {
            let mut body = vec![0; len as usize];
            if std::os::unix::fs::FileExt::read_exact_at(&file, &mut body, start).is_ok() {
                out.extend_from_slice(&body);
                return WRITTEN;
            }
        }
        Computed {
            file: Some(FileBody {
                file: Arc::new(file),
                offset: start,
                len,
            }),
            cacheable: true,
        }
    }

    fn listing(
        &self,
        dir: &Path,
        target: &[u8],
        keep_alive: bool,
        head_only: bool,
        out: &mut Vec<u8>,
    ) -> Computed {
        let Ok(entries) = fs::read_dir(dir) else {
            return Refusal::each_time(Status::Forbidden).answer(keep_alive, head_only, out);
        };
        let mut rows: Vec<(Vec<u8>, bool, u64, u64)> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                // Symlinks are listed as what they point to (the link itself if that is gone).
                let meta = fs::metadata(entry.path())
                    .or_else(|_| entry.metadata())
                    .ok()?;
                let modified = meta
                    .modified()
                    .unwrap_or(SystemTime::UNIX_EPOCH)
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                Some((
                    entry.file_name().as_bytes().to_vec(),
                    meta.is_dir(),
                    meta.len(),
                    modified,
                ))
            })
            .collect();
        rows.sort();
        let title = escape(&String::from_utf8_lossy(
            &percent_decode(target).collect::<Vec<_>>(),
        ));
        let mut html = format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Index of {title}</title></head>\n<body><h1>Index of {title}</h1>\n<table>\n<tr><th>Name</th><th>Size</th><th>Modified</th></tr>\n"
        );
        if target != b"/" {
            html.push_str("<tr><td><a href=\"../\">../</a></td><td></td><td></td></tr>\n");
        }
        for (name, is_dir, size, modified) in rows {
            let slash = if is_dir { "/" } else { "" };
            let href = percent_encoding::percent_encode(&name, LINK).to_string();
            let shown = escape(&String::from_utf8_lossy(&name));
            let size = if is_dir {
                "-".to_owned()
            } else {
                size.to_string()
            };
            html.push_str(&format!(
                "<tr><td><a href=\"{href}{slash}\">{shown}{slash}</a></td><td>{size}</td><td>{}</td></tr>\n",
                format_imf_fixdate(modified)
            ));
        }
        html.push_str("</table></body></html>\n");
        response::write_head(
            out,
            Status::Ok,
            keep_alive,
            Some(("text/html; charset=utf-8", html.len() as u64)),
            &[],
        );
        if !head_only {
            out.extend_from_slice(html.as_bytes());
        }
        WRITTEN
    }
}

/// An answer with an empty body and one extra header.
fn empty(out: &mut Vec<u8>, status: Status, keep_alive: bool, header: (&str, &str)) {
    let content = Some(("text/plain; charset=utf-8", 0));
    response::write_head(out, status, keep_alive, content, &[header]);
}

/// Watches `top` and every directory under it, remembering which watch is which directory.
fn watch_tree(
    inotify: &mut inotify::Inotify,
    dirs: &mut HashMap<inotify::WatchDescriptor, PathBuf>,
    top: &Path,
    mask: inotify::WatchMask,
) {
    let mut pending = vec![top.to_path_buf()];
    while let Some(dir) = pending.pop() {
        if let Ok(wd) = inotify.watches().add(&dir, mask) {
            dirs.insert(wd, dir.clone());
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            pending.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

/// The path of a request target: before any `?` or `#`.
fn path_part(target: &[u8]) -> &[u8] {
    target
        .split(|&b| b == b'?' || b == b'#')
        .next()
        .unwrap_or(target)
}

/// Whether the client's copy is current: `If-None-Match` decides when present (RFC 9110
/// §13.1.2), `If-Modified-Since` otherwise.
fn not_modified(request: &Request, etag: &str, modified: u64) -> bool {
    if let Some(tags) = &request.if_none_match {
        return tags
            .split(',')
            .map(|tag| tag.trim().trim_start_matches("W/"))
            .any(|tag| tag == "*" || tag == etag);
    }
    request
        .if_modified_since
        .as_deref()
        .and_then(parse_http_date)
        .is_some_and(|since| modified <= since)
}

/// A single `bytes=` range: `Some(Ok((first, last)))`, `Some(Err(()))` when unsatisfiable, `None`
/// when the header is not one range this server honours (the whole file is sent).
/// A byte position of a Range: digits only (no sign), and a number past `u64` is just very large
/// (it is clamped to the file like any other).
fn position(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(digits.parse().unwrap_or(u64::MAX))
}

fn byte_range(header: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let range = match (first.is_empty(), last.is_empty()) {
        (true, false) => {
            let suffix = position(last)?;
            if suffix == 0 || size == 0 {
                return Some(Err(()));
            }
            (size.saturating_sub(suffix), size - 1)
        }
        (false, _) => {
            let first = position(first)?;
            let last = if last.is_empty() {
                size.saturating_sub(1)
            } else {
                position(last)?
            };
            if first >= size {
                return Some(Err(()));
            }
            if last < first {
                return None;
            }
            (first, last.min(size - 1))
        }
        (true, true) => return None,
    };
    Some(Ok(range))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(byte_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(byte_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(byte_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(byte_range("bytes=95-200", 100), Some(Ok((95, 99))));
        assert_eq!(byte_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(byte_range("bytes=999-", 12), Some(Err(())));
        assert_eq!(byte_range("bytes=-0", 100), Some(Err(())));
        assert_eq!(byte_range("bytes=0-1,5-6", 100), None);
        assert_eq!(byte_range("bytes=9-1", 100), None);
        assert_eq!(byte_range("items=0-1", 100), None);
        assert_eq!(
            byte_range("bytes=0-99999999999999999999", 100),
            Some(Ok((0, 99)))
        );
        assert_eq!(
            byte_range("bytes=-99999999999999999999", 100),
            Some(Ok((0, 99)))
        );
        assert_eq!(byte_range("bytes=+1-2", 100), None);
    }

    #[test]
    fn listing_names_are_escaped() {
        assert_eq!(escape("<a&b>\"'"), "&lt;a&amp;b&gt;&quot;&#39;");
    }
}
