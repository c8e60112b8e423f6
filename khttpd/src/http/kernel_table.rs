//! The kernel's response table, mirrored in user space: which request bytes the kernel was
//! taught, which response slot answers each, and when a slot may be filled again. The kernel
//! reads the same maps (`HTTP_REQUESTS` → `HTTP_RESPONSES` + `HTTP_RESPONSE_BLOCKS`, in
//! khttpd-ebpf/src/http.rs); [`super::kernel::KernelHttp`] holds the one `Table` behind a lock.

use std::{
    collections::HashMap as StdHashMap,
    io,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData};
use khttpd_common::http::{
    self, RequestKey, ResponseBlock, ResponseMeta, Route, BLOCK, BLOCKS_PER_RESPONSE, DATE_LEN,
    MAX_RESPONSE,
};
use log::{error, warn};

use super::response;
use crate::fast_path::error::os_errors;

/// What the kernel has been taught, mirrored here so that entries can be evicted and forgotten.
pub(super) struct Table {
    pub(super) requests: HashMap<MapData, RequestKey, Route>,
    pub(super) meta: Array<MapData, ResponseMeta>,
    pub(super) blocks: Array<MapData, ResponseBlock>,
    /// Taught requests: their response slot (`None`: answered by closing, left to user space)
    /// and when they were taught.
    pub(super) taught: StdHashMap<Vec<u8>, (Option<u32>, Instant)>,
    /// Response bytes (Date blanked) → the slot holding them.
    pub(super) by_response: StdHashMap<Vec<u8>, u32>,
    pub(super) slots: Vec<ResponseSlot>,
}

pub(super) enum ResponseSlot {
    Free,
    Used {
        /// The answer, Date blanked (its key in `by_response`).
        response: Vec<u8>,
        last_taught: Instant,
    },
    /// Evicted or forgotten: requests naming it are gone from the kernel's table, but a request
    /// marked just before may still be synthesized from it, so it is not rewritten before
    /// [`SLOT_REST`] has passed.
    Resting(Instant),
    /// A request naming it could not be removed from the kernel's table: its length is 0 (the
    /// verdict passes such requests to user space) and it is never filled again.
    Disabled,
}

/// How long a slot rests between two contents (a marked request is synthesized within
/// microseconds; this is a wide margin).
const SLOT_REST: Duration = Duration::from_secs(1);
/// An answer taught this recently is not evicted to make room: when every slot is this warm, a
/// new answer is simply not cached (evicting would only make the table thrash).
const SLOT_WARM: Duration = Duration::from_secs(5);

impl Table {
    pub(super) fn new(
        requests: HashMap<MapData, RequestKey, Route>,
        meta: Array<MapData, ResponseMeta>,
        blocks: Array<MapData, ResponseBlock>,
    ) -> Table {
        Table {
            requests,
            meta,
            blocks,
            taught: StdHashMap::new(),
            by_response: StdHashMap::new(),
            slots: (0..http::MAX_RESPONSES)
                .map(|_| ResponseSlot::Free)
                .collect(),
        }
    }

    /// The slot holding `response`, filled (or found) now; `None` when every slot is busy.
    pub(super) fn slot_for(&mut self, response: &[u8], now: Instant) -> io::Result<Option<u32>> {
        if response.len() > MAX_RESPONSE as usize {
            return Ok(None);
        }
        let date_offset = match response::date_offset(response) {
            Some(at) if at + DATE_LEN <= BLOCK => at,
            _ => return Ok(None),
        };
        let mut key = response.to_vec();
        key[date_offset..date_offset + DATE_LEN].fill(b'-');
        if let Some(&slot) = self.by_response.get(&key) {
            if let ResponseSlot::Used { last_taught, .. } = &mut self.slots[slot as usize] {
                *last_taught = now;
            }
            return Ok(Some(slot));
        }
        let free = self.slots.iter().position(|slot| match slot {
            ResponseSlot::Free => true,
            ResponseSlot::Resting(since) => now.duration_since(*since) >= SLOT_REST,
            ResponseSlot::Used { .. } | ResponseSlot::Disabled => false,
        });
        let Some(slot) = free else {
            self.evict_least_recent(now);
            return Ok(None);
        };
        for (i, chunk) in response.chunks(BLOCK).enumerate() {
            let mut block = ResponseBlock { bytes: [0; BLOCK] };
            block.bytes[..chunk.len()].copy_from_slice(chunk);
            let index = slot as u32 * BLOCKS_PER_RESPONSE + i as u32;
            self.blocks.set(index, block, 0).map_err(io::Error::other)?;
        }
        let (status, body_bytes) = response::status_and_body(response);
        let meta = ResponseMeta {
            len: response.len() as u32,
            date_offset: date_offset as u32,
            status: u32::from(status),
            body_bytes: body_bytes as u32,
        };
        self.meta
            .set(slot as u32, meta, 0)
            .map_err(io::Error::other)?;
        self.by_response.insert(key.clone(), slot as u32);
        self.slots[slot] = ResponseSlot::Used {
            response: key,
            last_taught: now,
        };
        Ok(Some(slot as u32))
    }

    /// Makes room: the least recently taught response, unless it is still warm, and every
    /// request naming it leave.
    fn evict_least_recent(&mut self, now: Instant) {
        let victim = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| match slot {
                ResponseSlot::Used { last_taught, .. }
                    if now.duration_since(*last_taught) >= SLOT_WARM =>
                {
                    Some((*last_taught, i))
                }
                _ => None,
            })
            .min()
            .map(|(_, i)| i as u32);
        let Some(victim) = victim else { return };
        let requests: Vec<Vec<u8>> = self
            .taught
            .iter()
            .filter(|(_, (slot, _))| *slot == Some(victim))
            .map(|(request, _)| request.clone())
            .collect();
        for request in requests {
            self.forget_request(&request);
        }
        self.rest(victim, now);
    }

    pub(super) fn rest(&mut self, slot: u32, now: Instant) {
        self.retire(slot, ResponseSlot::Resting(now));
    }

    /// Replaces a slot's state (a disabled slot stays disabled).
    fn retire(&mut self, slot: u32, next: ResponseSlot) {
        let slot = &mut self.slots[slot as usize];
        if matches!(slot, ResponseSlot::Disabled) {
            return;
        }
        if let ResponseSlot::Used { response, .. } = std::mem::replace(slot, next) {
            self.by_response.remove(&response);
        }
    }

    /// Removes a taught request from the kernel's table. If the kernel may still hold it (the
    /// delete failed, and not because the LRU map already dropped it), the slot it names is
    /// disabled: the kernel must never answer it with that slot's next content, nor with stale
    /// content after a file changed.
    pub(super) fn forget_request(&mut self, request: &[u8]) {
        let slot = self.taught.remove(request).and_then(|(slot, _)| slot);
        let Some(key) = RequestKey::new(request) else {
            return;
        };
        match self.requests.remove(&key) {
            Ok(()) => {}
            Err(e) if os_errors(&e).next() == Some(libc::ENOENT) => {}
            Err(e) => {
                warn!("http: the kernel could not forget a request ({e}); its answer goes to user space");
                if let Some(slot) = slot {
                    self.disable(slot);
                }
            }
        }
    }

    fn disable(&mut self, slot: u32) {
        let off = ResponseMeta::default();
        if let Err(e) = self.meta.set(slot, off, 0) {
            error!("http: cannot disable kernel answer slot {slot} either ({e}): it may answer stale bytes");
        }
        self.retire(slot, ResponseSlot::Disabled);
    }
}
