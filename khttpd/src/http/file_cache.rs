//! `--root`'s caches in user space, so that a request for a file answered before costs the
//! receive and the send only — no path resolution, no `statx`, `open`, `pread` or `close`:
//!
//! - the **answer cache** holds complete answers (head and body) of small files, listings, 304s,
//!   206s and 404s, bounded in bytes (`--file-cache-max`);
//! - the **open-file cache** holds, for files sent with sendfile, the head and the open file
//!   (nginx's `open_file_cache`), bounded in entries (`--open-file-cache`).
//!
//! Both are keyed by everything that decides an answer: the raw request target, the
//! conditionals and the Range, the method (GET or HEAD) and whether the connection stays open. A
//! hit copies the answer and writes the current Date into it. Answers the site refused (a path
//! leaving the root, an unreadable file) are never cached: each refusal is decided and logged
//! again. Any change under the root (the site's inotify watcher) forgets everything: entries
//! carry the generation they were computed in, and one computed while a change was being noticed
//! is never served.

use std::{
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use quick_cache::{sync::Cache, Equivalent, Weighter};

use khttpd_common::http::DATE_LEN;

use super::{
    response,
    site::{FileBody, Request},
};

/// What decides an answer, owned (the cache's key).
#[derive(PartialEq, Eq)]
struct Asked {
    request: Request,
    keep_alive: bool,
    head_only: bool,
}

/// What decides an answer, borrowed from the request being answered (for lookups).
pub struct Asking<'a> {
    pub request: &'a Request,
    pub keep_alive: bool,
    pub head_only: bool,
}

impl Hash for Asked {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_asking().hash(state);
    }
}

impl Hash for Asking<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.request.hash(state);
        self.keep_alive.hash(state);
        self.head_only.hash(state);
    }
}

impl Asked {
    fn as_asking(&self) -> Asking<'_> {
        Asking {
            request: &self.request,
            keep_alive: self.keep_alive,
            head_only: self.head_only,
        }
    }
}

impl Equivalent<Asked> for Asking<'_> {
    fn equivalent(&self, key: &Asked) -> bool {
        *self.request == key.request
            && self.keep_alive == key.keep_alive
            && self.head_only == key.head_only
    }
}

/// A cached answer: `bytes` (the whole answer, or the head of one whose body is `file`).
struct Answer {
    bytes: Box<[u8]>,
    /// Where the Date value is in `bytes`.
    date_at: Option<usize>,
    /// The body still to send, as it was when the answer was computed (its file shared).
    file: Option<FileBody>,
    generation: u64,
}

/// What a cache bounds.
#[derive(Clone, Copy)]
enum Weigh {
    /// Bytes: an answer weighs its bytes and its key's.
    Bytes,
    /// Entries (each holds a file descriptor).
    Entries,
}

impl Weighter<Asked, Arc<Answer>> for Weigh {
    fn weight(&self, key: &Asked, answer: &Arc<Answer>) -> u64 {
        match self {
            Weigh::Bytes => (weight_of(&key.request) + answer.bytes.len()) as u64,
            Weigh::Entries => 1,
        }
    }
}

fn weight_of(request: &Request) -> usize {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    request.target.len()
        + text(&request.if_none_match)
        + text(&request.if_modified_since)
        + text(&request.range)
}

/// One of the two caches, with its counters.
struct Counted {
    cache: Option<Cache<Asked, Arc<Answer>, Weigh>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Counted {
    /// `capacity` 0: no cache (every lookup a miss, nothing counted).
    fn new(items: usize, capacity: u64, weigh: Weigh) -> Counted {
        Counted {
            cache: (capacity > 0).then(|| Cache::with_weighter(items, capacity, weigh)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.cache.as_ref().map_or(0, |c| c.len() as u64),
            bytes: self.cache.as_ref().map_or(0, Cache::weight),
        }
    }
}

/// What `/metrics` shows of one cache.
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub entries: u64,
    pub bytes: u64,
}

/// Sizes of the two caches (0 turns one off).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes of answers (heads, bodies and keys).
    pub answer_bytes: u64,
    /// Open files.
    pub open_files: u64,
}

impl Limits {
    /// `--file-cache-max` and `--open-file-cache` unless told otherwise.
    pub const DEFAULT: Limits = Limits {
        answer_bytes: 32 << 20,
        open_files: 1000,
    };
}

pub struct FileCache {
    answers: Counted,
    open_files: Counted,
    /// Bumped by [`FileCache::forget_everything`].
    generation: AtomicU64,
    /// The largest answer the answer cache takes (an eighth of it: one big listing must not
    /// push out everything else).
    largest: usize,
}

/// An answer found in the cache or computed to be cached: see [`FileCache::answer`].
pub struct Computed {
    /// The file bytes still to send after what was written to `out`.
    pub file: Option<FileBody>,
    /// Whether the answer may be served again for the same request (false for refusals, which
    /// are decided and logged each time).
    pub cacheable: bool,
}

impl FileCache {
    pub fn new(limits: Limits) -> FileCache {
        FileCache {
            answers: Counted::new(1024, limits.answer_bytes, Weigh::Bytes),
            open_files: Counted::new(
                limits.open_files as usize,
                limits.open_files,
                Weigh::Entries,
            ),
            generation: AtomicU64::new(0),
            largest: (limits.answer_bytes / 8) as usize,
        }
    }

    /// Appends the answer to `asking` to `out`: the cached one, or what `compute` writes
    /// (cached for next time when it may be). Returns the file bytes still to send.
    pub fn answer(
        &self,
        asking: Asking<'_>,
        out: &mut Vec<u8>,
        compute: impl FnOnce(&mut Vec<u8>) -> Computed,
    ) -> Option<FileBody> {
        if self.answers.cache.is_none() && self.open_files.cache.is_none() {
            return compute(out).file;
        }
        let generation = self.generation.load(Ordering::Acquire);
        for counted in [&self.answers, &self.open_files] {
            let Some(cache) = &counted.cache else {
                continue;
            };
            if let Some(answer) = cache.get(&asking) {
                if answer.generation == generation {
                    counted.hits.fetch_add(1, Ordering::Relaxed);
                    return send(&answer, out);
                }
            }
        }
        let start = out.len();
        let computed = compute(out);
        let written = &out[start..];
        let counted = match computed.file {
            None => &self.answers,
            Some(_) => &self.open_files,
        };
        counted.misses.fetch_add(1, Ordering::Relaxed);
        let fits = computed.file.is_some() || written.len() <= self.largest;
        if let (Some(cache), true, true) = (&counted.cache, computed.cacheable, fits) {
            let key = Asked {
                request: asking.request.clone(),
                keep_alive: asking.keep_alive,
                head_only: asking.head_only,
            };
            let answer = Answer {
                bytes: written.into(),
                date_at: response::date_offset(written),
                file: computed.file.clone(),
                generation,
            };
            cache.insert(key, Arc::new(answer));
        }
        computed.file
    }

    /// Called by the watcher on any change under the root.
    pub fn forget_everything(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        for counted in [&self.answers, &self.open_files] {
            if let Some(cache) = &counted.cache {
                cache.clear();
            }
        }
    }

    /// The answer cache's and the open-file cache's counters.
    pub fn stats(&self) -> [CacheStats; 2] {
        [self.answers.stats(), self.open_files.stats()]
    }
}

/// Writes a cached answer with the current Date.
fn send(answer: &Answer, out: &mut Vec<u8>) -> Option<FileBody> {
    let start = out.len();
    out.extend_from_slice(&answer.bytes);
    if let Some(at) = answer.date_at {
        out[start + at..start + at + DATE_LEN].copy_from_slice(&response::date());
    }
    answer.file.clone()
}
