//! The control plane of the kernel HTTP fast path: it installs connections into the HTTP sockhash,
//! teaches the kernel the requests user space has answered, keeps the kernel's response table and
//! its `Date` current, and moves connections between the kernel and user space.
//!
//! How a connection moves (the programs are in khttpd-ebpf/src/http.rs):
//! 1. accept → [`KernelHttp::install`]: kernel state entries, sockhash, hang-up watcher;
//! 2. requests the kernel knows are answered there; user space does nothing;
//! 3. the first bytes the kernel does not answer are passed to the socket's receive queue and a
//!    hand-off record wakes user space, which takes the connection from the watcher
//!    ([`KernelConnections::take_back`]) and serves it like any other: before its first write it
//!    waits until the kernel's responses are in the send queue ([`KernelHttp::wait_for_kernel`]),
//!    so answers stay in order. The socket stays in the sockhash: removing it would discard the
//!    bytes the verdict passed, which sit in the psock's queue;
//! 4. when user space has answered everything it read with responses the kernel now knows, it
//!    publishes how much it read and wrote and parks the connection with the watcher again
//!    ([`KernelHttp::release`]); the kernel answers on it while nothing is owed.
//!
//! Learning: user space reports each request it answered with a `200` and no body
//! ([`super::session::Learned`]); its exact bytes become a key of the kernel's request table and
//! the keep-alive response (its Date patched by the kernel) goes into a response slot.

use std::{
    collections::HashMap as StdHashMap,
    io,
    net::TcpStream,
    ops::Deref,
    os::fd::{AsRawFd, RawFd},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use khttpd_common::http::{
    self, Answered, Connection, Counter, HttpDate, PassReason, RequestKey, ResponseBlock,
    ResponseMeta, Route, BLOCK, BLOCKS_PER_RESPONSE, DATE_LEN, MAX_RESPONSE,
};
use log::{debug, warn};

use super::{
    response::{self, Status},
    session::Learned,
    Slot,
};
use crate::{
    fast_path::HttpMaps,
    fd::tcp_info,
    sockmap::{KernelConnections, Service},
};

/// How long a taken-back connection waits for the kernel's responses to reach the send queue.
const ORDER_LIMIT: Duration = Duration::from_secs(30);
/// A learned request is re-sent to the kernel after this long (it may have left the LRU table).
const RELEARN_AFTER: Duration = Duration::from_secs(10);
/// Most requests remembered as already taught.
const TAUGHT_LIMIT: usize = 4 * http::MAX_REQUESTS as usize;

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

/// Which response slot holds what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ResponseKind {
    status: Status,
    head_only: bool,
}

pub struct KernelHttp {
    connections: KernelConnections<Http>,
    requests: Mutex<HashMap<MapData, RequestKey, Route>>,
    responses: Mutex<Responses>,
    dates: Mutex<Dates>,
    counters: PerCpuArray<MapData, u64>,
    /// Requests already taught, and when.
    taught: Mutex<StdHashMap<Vec<u8>, Instant>>,
}

/// The kernel's two `Date` slots and which one is current.
struct Dates {
    slots: Array<MapData, HttpDate>,
    index: Array<MapData, u32>,
    current: u32,
}

struct Responses {
    meta: Array<MapData, ResponseMeta>,
    blocks: Array<MapData, ResponseBlock>,
    slots: Vec<ResponseKind>,
}

impl KernelHttp {
    /// `idle_timeout`: `--idle-timeout`, applied to the connections the kernel serves.
    pub fn start(maps: HttpMaps, idle_timeout: Duration) -> io::Result<KernelHttp> {
        let service = Http {
            connections: Mutex::new(maps.connections),
            answered: Mutex::new(maps.answered),
            idle_timeout,
        };
        let kernel = KernelHttp {
            connections: KernelConnections::start(service, maps.sockets, maps.handoffs)?,
            requests: Mutex::new(maps.requests),
            responses: Mutex::new(Responses {
                meta: maps.responses,
                blocks: maps.blocks,
                slots: Vec::new(),
            }),
            dates: Mutex::new(Dates {
                slots: maps.dates,
                index: maps.date_index,
                current: 0,
            }),
            counters: maps.counters,
            taught: Mutex::new(StdHashMap::new()),
        };
        kernel.refresh_date()?;
        Ok(kernel)
    }

    /// Writes the current date into the spare slot and makes it current. Called every second.
    pub fn refresh_date(&self) -> io::Result<()> {
        let mut dates = self.dates.lock().unwrap();
        let next = (dates.current + 1) & 1;
        let mut date = HttpDate { bytes: [0; 32] };
        date.bytes[..DATE_LEN].copy_from_slice(response::http_date().as_bytes());
        dates.slots.set(next, date, 0).map_err(io::Error::other)?;
        dates.index.set(0, next, 0).map_err(io::Error::other)?;
        dates.current = next;
        Ok(())
    }

    /// Teaches the kernel requests user space just answered.
    pub fn learn(&self, learned: &[Learned]) {
        for item in learned {
            if let Err(e) = self.learn_one(item) {
                debug!("http: cannot teach the kernel a request: {e}");
            }
        }
    }

    fn learn_one(&self, item: &Learned) -> io::Result<()> {
        let now = Instant::now();
        {
            let mut taught = self.taught.lock().unwrap();
            if taught
                .get(&item.request)
                .is_some_and(|at| now.duration_since(*at) < RELEARN_AFTER)
            {
                return Ok(());
            }
            if taught.len() >= TAUGHT_LIMIT {
                taught.clear();
            }
            taught.insert(item.request.clone(), now);
        }
        let Some(key) = RequestKey::new(&item.request) else {
            return Ok(());
        };
        if key.is_candidate().is_err() {
            return Ok(());
        }
        let route = if item.keep_alive {
            let kind = ResponseKind {
                status: item.status,
                head_only: item.head_only,
            };
            let Some(response) = self.slot(kind)? else {
                return Ok(());
            };
            Route { response, close: 0 }
        } else {
            Route {
                response: 0,
                close: 1,
            }
        };
        self.requests
            .lock()
            .unwrap()
            .insert(key, route, 0)
            .map_err(io::Error::other)
    }

    /// The slot holding the keep-alive response of `kind`, filled on first use.
    fn slot(&self, kind: ResponseKind) -> io::Result<Option<u32>> {
        let mut responses = self.responses.lock().unwrap();
        if let Some(slot) = responses.slots.iter().position(|k| *k == kind) {
            return Ok(Some(slot as u32));
        }
        if responses.slots.len() >= http::MAX_RESPONSES as usize {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        response::write(&mut bytes, kind.status, true, kind.head_only);
        if bytes.len() > MAX_RESPONSE as usize {
            return Ok(None);
        }
        let date_offset = match bytes.windows(8).position(|w| w == b"\r\nDate: ") {
            Some(at) if at + 8 + DATE_LEN <= BLOCK => (at + 8) as u32,
            _ => return Ok(None),
        };
        let slot = responses.slots.len() as u32;
        for (i, chunk) in bytes.chunks(BLOCK).enumerate() {
            let mut block = ResponseBlock { bytes: [0; BLOCK] };
            block.bytes[..chunk.len()].copy_from_slice(chunk);
            responses
                .blocks
                .set(slot * BLOCKS_PER_RESPONSE + i as u32, block, 0)
                .map_err(io::Error::other)?;
        }
        let meta = ResponseMeta {
            len: bytes.len() as u32,
            date_offset,
        };
        responses
            .meta
            .set(slot, meta, 0)
            .map_err(io::Error::other)?;
        responses.slots.push(kind);
        Ok(Some(slot))
    }

    /// Waits until every response the kernel queued on the connection is in its send queue, so a
    /// response user space writes now cannot overtake one. `written` is what user space wrote on
    /// it so far. Returns false if that takes longer than `ORDER_LIMIT`.
    pub async fn wait_for_kernel(&self, cookie: u64, fd: RawFd, written: u64) -> bool {
        let Some(state) = self.connections.service().state(cookie) else {
            return true;
        };
        let owed = state.kernel_bytes + written;
        let deadline = Instant::now() + ORDER_LIMIT;
        let mut pause = Duration::from_micros(50);
        while queued_bytes(fd).is_ok_and(|queued| queued < owed) {
            if Instant::now() > deadline {
                warn!("http: kernel responses on connection {cookie} not sent in {ORDER_LIMIT:?}");
                return false;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        true
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

    /// The kernel's per-CPU counter, summed.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters
            .get(&(counter as u32), 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }

    pub fn passed(&self, reason: PassReason) -> u64 {
        self.counter(reason.counter())
    }
}

impl Deref for KernelHttp {
    type Target = KernelConnections<Http>;

    fn deref(&self) -> &Self::Target {
        &self.connections
    }
}

/// Every byte ever written to the socket's send queue: acknowledged ones plus those still queued.
fn queued_bytes(fd: RawFd) -> io::Result<u64> {
    let info = tcp_info(fd)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    crate::fd::cvt(unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) })?;
    Ok(info.tcpi_bytes_acked + outq as u64)
}
