//! The maps each service takes out of the loaded object (so the echo and HTTP modules own theirs),
//! and the per-CPU counter arrays both read.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, RingBuf, SockHash};
use khttpd_common::{echo, http};

/// The echo service's maps, taken out of the loaded object so the echo module owns them.
pub struct EchoMaps {
    pub sockets: SockHash<MapData, u64>,
    pub detached: SockHash<MapData, u64>,
    pub connections: HashMap<MapData, u64, echo::Connection>,
    pub counters: Counters,
    pub handoffs: RingBuf<MapData>,
}

/// The HTTP fast path's maps (see `khttpd_common::http`).
pub struct HttpMaps {
    pub sockets: SockHash<MapData, u64>,
    pub connections: HashMap<MapData, u64, http::Connection>,
    pub answered: HashMap<MapData, u64, http::Answered>,
    pub requests: HashMap<MapData, http::RequestKey, http::Route>,
    pub responses: Array<MapData, http::ResponseMeta>,
    pub blocks: Array<MapData, http::ResponseBlock>,
    pub dates: Array<MapData, http::HttpDate>,
    pub date_index: Array<MapData, u32>,
    pub counters: Counters,
    pub handoffs: RingBuf<MapData>,
    /// The verdict's [`http::AccessRecord`]s (written only with access logging on).
    pub access: RingBuf<MapData>,
}

/// A program's per-CPU array of u64 counters, read summed over the CPUs. Read with a bpf() call of
/// its own: aya's PerCpuArray looks the number of CPUs up in /sys on each thread's first read,
/// which the process can no longer do once it is confined to `--root` (see `privileges`).
pub struct Counters {
    map: MapData,
    cpus: usize,
}

impl TryFrom<Map> for Counters {
    type Error = MapError;

    fn try_from(map: Map) -> Result<Counters, MapError> {
        let Map::PerCpuArray(map) = map else {
            return Err(MapError::IoError(io::Error::other("not a per-CPU array")));
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| MapError::IoError(e))?;
        Ok(Counters { map, cpus })
    }
}

impl Counters {
    /// The counter at `index`, summed over the CPUs (0 if it cannot be read).
    pub fn sum(&self, index: u32) -> u64 {
        /// The fields of `union bpf_attr` for BPF_MAP_LOOKUP_ELEM.
        #[repr(C)]
        struct Lookup {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        const BPF_MAP_LOOKUP_ELEM: u32 = 1;
        // The kernel writes one 8-byte value per possible CPU.
        let mut values = vec![0u64; self.cpus];
        let attr = Lookup {
            map_fd: self.map.fd().as_fd().as_raw_fd() as u32,
            _pad: 0,
            key: &raw const index as u64,
            value: values.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` points at a key and a buffer of the map's per-CPU value size, both
        // alive for the call.
        match unsafe { crate::fd::bpf(BPF_MAP_LOOKUP_ELEM, &attr) } {
            Ok(_) => values.iter().sum(),
            Err(_) => 0,
        }
    }
}
