//! The control plane of the kernel HTTP fast path: it installs connections into the HTTP sockhash,
//! teaches the kernel the requests user space has answered, keeps the kernel's response table and
//! its `Date` current, and moves connections between the kernel and user space.
//!
//! How a connection moves (the programs are in khttpd-ebpf/src/http.rs):
//! 1. accept (`--fast-path on`), or the first idle moment after a learned keep-alive answer
//!    (`auto`) → `install`: kernel state entries, sockhash, hang-up watcher;
//! 2. requests the kernel knows are answered there; user space does nothing;
//! 3. the first bytes the kernel does not answer are passed to the socket's receive queue and a
//!    hand-off record wakes user space, which takes the connection from the watcher
//!    ([`KernelConnections::take_back`]) and serves it like any other: before its first write it
//!    waits until the kernel's responses are in the send queue ([`KernelHttp::wait_for_kernel`]),
//!    so answers stay in order. The socket stays in the sockhash: removing it would discard the
//!    bytes the verdict passed, which sit in the psock's queue;
//! 4. when user space has answered everything it read with responses the kernel now knows, it
//!    publishes how much it read and wrote (before its last write: [`KernelHttp::publish`]) and
//!    parks the connection with the watcher again ([`KernelHttp::release`]); the kernel answers
//!    on it while nothing is owed.
//!
//! Learning ([`Table`]): user space reports each GET or HEAD it answered whole
//! ([`super::session::Learned`]); its exact bytes become a key of the kernel's request table and
//! the keep-alive answer goes into a response slot (one per distinct answer, the Date patched by
//! the kernel). Answers that close the connection are recorded so the kernel passes them with the
//! reason `close`. With `--root`, any change under the root forgets everything
//! ([`KernelHttp::forget_everything`]).

use std::{
    io,
    net::TcpStream,
    os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, RingBuf};
use khttpd_common::http::{
    self, Answered, Connection, Counter, HttpDate, RequestKey, Route, DATE_LEN,
};
use log::{debug, warn};

use super::{
    kernel_table::{ResponseSlot, Table},
    response,
    session::Learned,
    Slot,
};
use crate::{
    fast_path::maps::{Counters, HttpMaps},
    fd::tcp_info,
    sockmap::{wait_until_queued, KernelConnections, Service},
};

/// How long a taken-back connection waits for the kernel's responses to reach the send queue.
const ORDER_LIMIT: Duration = Duration::from_secs(30);
/// A learned request is re-sent to the kernel after this long (it may have left the LRU table).
const RELEARN_AFTER: Duration = Duration::from_secs(10);
/// Most requests remembered as already taught.
const TAUGHT_LIMIT: usize = http::MAX_REQUESTS as usize;

/// A connection while the kernel serves it, with what user space did on it before.
pub struct Parked {
    pub stream: TcpStream,
    pub answered: Answered,
    /// Its place under `--max-connections`.
    pub slot: Slot,
}

impl AsRawFd for Parked {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl AsFd for Parked {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// The kernel's per-connection state, seen from the connection watcher.
pub struct Http {
    connections: Mutex<HashMap<MapData, u64, Connection>>,
    answered: Mutex<HashMap<MapData, u64, Answered>>,
    idle_timeout: Duration,
}

impl Http {
    fn state(&self, cookie: u64) -> Option<Connection> {
        self.connections.lock().unwrap().get(&cookie, 0).ok()
    }

    fn publish(&self, cookie: u64, answered: Answered) -> io::Result<()> {
        self.answered
            .lock()
            .unwrap()
            .insert(cookie, answered, 0)
            .map_err(io::Error::other)
    }
}

impl Service for Http {
    const NAME: &'static str = "http";
    type Parked = Parked;

    fn prepare(&self, cookie: u64, parked: &Parked) -> io::Result<()> {
        self.publish(cookie, parked.answered)?;
        self.connections
            .lock()
            .unwrap()
            .insert(cookie, Connection::default(), 0)
            .map_err(io::Error::other)
    }

    fn drained(&self, parked: &Parked, cookie: u64) -> bool {
        match (self.state(cookie), tcp_info(parked.as_raw_fd())) {
            // A hand-off is on its way: user space will take the connection and answer.
            (Some(state), _) if state.passed_bytes != parked.answered.read_bytes => false,
            (Some(state), Ok(info)) => {
                info.tcpi_bytes_acked >= state.kernel_bytes + parked.answered.written_bytes
            }
            _ => true,
        }
    }

    fn forget(&self, cookie: u64) {
        let _ = self.connections.lock().unwrap().remove(&cookie);
        let _ = self.answered.lock().unwrap().remove(&cookie);
    }

    fn idle_timeout(&self) -> Option<Duration> {
        Some(self.idle_timeout)
    }
}

/// What became of a connection user space offered back to the kernel.
pub enum Release {
    /// The kernel serves it now; user space is done with it until the next hand-off.
    Parked,
    /// Bytes arrived meanwhile: keep serving it.
    Resumed(Parked),
    /// The hand-off loop took it meanwhile (and serves it).
    Gone,
}

pub struct KernelHttp {
    connections: KernelConnections<Http>,
    table: Mutex<Table>,
    /// Bumped by [`KernelHttp::forget_everything`]: answers computed before it are not taught.
    generation: AtomicU64,
    /// Largest answer taught (`--kernel-cache-max`).
    cache_max: usize,
    dates: Mutex<Dates>,
    counters: Counters,
    /// The verdict's records of its answers, until the access log takes them.
    access_records: Mutex<Option<RingBuf<MapData>>>,
}

/// The kernel's `Date` slots and which one is current.
struct Dates {
    slots: Array<MapData, HttpDate>,
    index: Array<MapData, u32>,
    current: u32,
    /// The last refresh failed: the kernel's Date is old, so it must answer nothing until one
    /// succeeds (everything taught was forgotten, nothing is taught meanwhile).
    stale: bool,
}

impl KernelHttp {
    /// `idle_timeout`: `--idle-timeout`, applied to the connections the kernel serves;
    /// `cache_max`: `--kernel-cache-max`, the largest answer taught.
    pub fn start(maps: HttpMaps, idle_timeout: Duration, cache_max: u32) -> io::Result<KernelHttp> {
        let service = Http {
            connections: Mutex::new(maps.connections),
            answered: Mutex::new(maps.answered),
            idle_timeout,
        };
        let kernel = KernelHttp {
            connections: KernelConnections::start(service, maps.sockets, maps.handoffs)?,
            table: Mutex::new(Table::new(maps.requests, maps.responses, maps.blocks)),
            generation: AtomicU64::new(0),
            cache_max: cache_max as usize,
            dates: Mutex::new(Dates {
                slots: maps.dates,
                index: maps.date_index,
                current: 0,
                stale: false,
            }),
            counters: maps.counters,
            access_records: Mutex::new(Some(maps.access)),
        };
        kernel.refresh_date()?;
        Ok(kernel)
    }

    /// Writes the current date into the spare slot and makes it current. Called every second.
    pub fn refresh_date(&self) -> io::Result<()> {
        let mut dates = self.dates.lock().unwrap();
        let next = (dates.current + 1) & 1;
        let mut date = HttpDate { bytes: [0; 32] };
        // The precise clock: this runs just after a second starts, when the coarse one that
        // `response::date` reads may still be in the last.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        date.bytes[..DATE_LEN].copy_from_slice(&response::date_of(now));
        let written = dates
            .slots
            .set(next, date, 0)
            .and_then(|()| dates.index.set(0, next, 0))
            .map_err(io::Error::other);
        match written {
            Ok(()) => {
                dates.current = next;
                dates.stale = false;
            }
            Err(_) if !dates.stale => {
                dates.stale = true;
                self.forget_everything();
            }
            Err(_) => {}
        }
        written
    }

    /// The table's generation, read before computing answers that may be taught.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Teaches the kernel requests user space just answered, unless the table was forgotten
    /// since `generation` (a file may have changed under those answers). Returns whether the
    /// kernel can now answer the last of them itself.
    /// `out` is the buffer the answers were written to (see [`Learned::response`]).
    pub fn learn(&self, learned: &[Learned], out: &[u8], generation: u64) -> bool {
        let Some(last) = learned.last() else {
            return false;
        };
        if self.dates.lock().unwrap().stale {
            return false;
        }
        let mut table = self.table.lock().unwrap();
        if generation != self.generation() {
            return false;
        }
        let now = Instant::now();
        for item in learned {
            let Some(response) = out.get(item.response.clone()) else {
                continue;
            };
            if let Err(e) = self.learn_one(&mut table, item, response, now) {
                debug!("http: cannot teach the kernel a request: {e}");
            }
        }
        last.keep_alive
            && table
                .taught
                .get(&last.request)
                .is_some_and(|(slot, _)| slot.is_some())
    }

    fn learn_one(
        &self,
        table: &mut Table,
        item: &Learned,
        response: &[u8],
        now: Instant,
    ) -> io::Result<()> {
        if table
            .taught
            .get(&item.request)
            .is_some_and(|(_, at)| now.duration_since(*at) < RELEARN_AFTER)
        {
            return Ok(());
        }
        let Some(key) = RequestKey::new(&item.request) else {
            return Ok(());
        };
        if key.is_candidate().is_err() {
            return Ok(());
        }
        if table.taught.len() >= TAUGHT_LIMIT {
            // The kernel's own table is an LRU map; this mirror is only trimmed.
            if let Some(oldest) = table.taught.keys().next().cloned() {
                table.forget_request(&oldest);
            }
        }
        let (route, slot) = if item.keep_alive {
            if response.len() > self.cache_max {
                return Ok(());
            }
            let Some(slot) = table.slot_for(response, now)? else {
                return Ok(());
            };
            (
                Route {
                    response: slot,
                    close: 0,
                },
                Some(slot),
            )
        } else {
            (
                Route {
                    response: 0,
                    close: 1,
                },
                None,
            )
        };
        table
            .requests
            .insert(key, route, 0)
            .map_err(io::Error::other)?;
        table.taught.insert(item.request.clone(), (slot, now));
        Ok(())
    }

    /// Forgets everything taught (a file under `--root` changed): requests leave the kernel's
    /// table at once, response slots rest before they are reused.
    pub fn forget_everything(&self) {
        let mut table = self.table.lock().unwrap();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let requests: Vec<Vec<u8>> = table.taught.keys().cloned().collect();
        for request in requests {
            table.forget_request(&request);
        }
        let now = Instant::now();
        for slot in 0..table.slots.len() as u32 {
            table.rest(slot, now);
        }
    }

    /// Requests the kernel may answer, and the bytes of the answers it holds.
    pub fn cache_size(&self) -> (u64, u64) {
        let table = self.table.lock().unwrap();
        let entries = table
            .taught
            .values()
            .filter(|(slot, _)| slot.is_some())
            .count();
        let bytes = table
            .slots
            .iter()
            .map(|slot| match slot {
                ResponseSlot::Used { response, .. } => response.len() as u64,
                _ => 0,
            })
            .sum();
        (entries as u64, bytes)
    }

    /// Waits until every response the kernel queued on the connection is in its send queue, so a
    /// response user space writes now cannot overtake one. `written` is what user space wrote on
    /// it so far. Returns false if that takes longer than `ORDER_LIMIT`.
    pub async fn wait_for_kernel(&self, cookie: u64, fd: RawFd, written: u64) -> bool {
        let Some(state) = self.connections.service().state(cookie) else {
            return true;
        };
        let owed = state.kernel_bytes + written;
        let ordered = wait_until_queued(fd, owed, Some(ORDER_LIMIT)).await;
        if !ordered {
            warn!("http: kernel responses on connection {cookie} not sent in {ORDER_LIMIT:?}");
        }
        ordered
    }

    /// Tells the kernel what user space has read and answered on a connection and how much it has
    /// written (or is about to write: the kernel checks the send queue before it answers).
    pub fn publish(&self, cookie: u64, answered: Answered) -> io::Result<()> {
        self.connections.service().publish(cookie, answered)
    }

    /// Offers a connection on which user space owes nothing back to the kernel: parks the socket
    /// with the watcher, then checks that no bytes were passed meanwhile (the verdict counts passed bytes before it reads what user space
    /// published, so one side always sees the other; see khttpd-ebpf/src/http.rs).
    /// `parked.answered` must have been published ([`KernelHttp::publish`]).
    pub fn release(&self, cookie: u64, parked: Parked) -> Release {
        let service = self.connections.service();
        let answered = parked.answered;
        if let Err(parked) = self.connections.park(cookie, parked) {
            return Release::Resumed(parked);
        }
        match service.state(cookie) {
            Some(state) if state.passed_bytes == answered.read_bytes => Release::Parked,
            _ => match self.connections.take_back(cookie) {
                Some(parked) => Release::Resumed(parked),
                None => Release::Gone,
            },
        }
    }

    /// Deletes the kernel's state of a connection user space has finished with.
    pub fn forget(&self, cookie: u64) {
        self.connections.service().forget(cookie);
    }

    /// The ring buffer of the verdict's [`khttpd_common::http::AccessRecord`]s (written only when
    /// the programs were loaded with an access log), once.
    pub fn take_access_records(&self) -> Option<RingBuf<MapData>> {
        self.access_records.lock().unwrap().take()
    }

    /// The kernel's per-CPU counter, summed.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters.sum(counter.slot())
    }

    /// The connections in the sockhash and their watcher (`sockmap.rs`): installing, parking,
    /// taking back, hand-offs.
    pub fn sockmap(&self) -> &KernelConnections<Http> {
        &self.connections
    }
}
