//! The BPF objects a server holds, read from outside it: ids from `/proc/<pid>/fdinfo`, names,
//! charged memory and entries through aya by id (root only). Maps are found by the names
//! khttpd-common gives them and read with its value types, so a changed map changes this too.

use std::fs;

use anyhow::{bail, Context as _};
use aya::maps::{HashMap, Map, MapData, MapInfo, SockHash};
use khttpd_common::{echo, http};

/// A BPF map a process holds, with its name from the kernel.
pub struct HeldMap {
    pub id: u32,
    pub name: String,
    /// The kernel's `memlock` for the map: the memory it charges for it, in bytes.
    pub memlock: u64,
}

/// Ids of the BPF programs and maps `pid` holds descriptors of, sorted, once each.
pub fn ids_of(pid: u32) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
    let (mut programs, mut maps) = (Vec::new(), Vec::new());
    for (field, value) in fdinfo_fields(pid)?.into_iter().flatten() {
        match field {
            "prog_id" => programs.push(u32::try_from(value)?),
            "map_id" => maps.push(u32::try_from(value)?),
            _ => {}
        }
    }
    for ids in [&mut programs, &mut maps] {
        ids.sort_unstable();
        ids.dedup();
    }
    Ok((programs, maps))
}

/// Every BPF map `pid` holds a descriptor of, once each.
pub fn maps_of(pid: u32) -> anyhow::Result<Vec<HeldMap>> {
    let mut maps: Vec<HeldMap> = Vec::new();
    for fields in fdinfo_fields(pid)? {
        let field = |name| fields.iter().find(|(f, _)| *f == name).map(|&(_, v)| v);
        let (Some(id), Some(memlock)) = (field("map_id"), field("memlock")) else {
            continue;
        };
        let id = u32::try_from(id)?;
        if maps.iter().any(|map| map.id == id) {
            continue;
        }
        let info = MapInfo::from_id(id)
            .with_context(|| format!("cannot read BPF map {id} (needs root)"))?;
        maps.push(HeldMap {
            id,
            name: info.name_as_str().unwrap_or_default().to_owned(),
            memlock,
        });
    }
    Ok(maps)
}

/// The numeric `name: value` fields of each of `pid`'s `/proc/<pid>/fdinfo` entries (an fd
/// closed meanwhile is simply gone).
fn fdinfo_fields(pid: u32) -> anyhow::Result<Vec<Vec<(&'static str, u64)>>> {
    const FIELDS: [&str; 3] = ["prog_id", "map_id", "memlock"];
    let dir = format!("/proc/{pid}/fdinfo");
    let mut all = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let Ok(info) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        let fields = info
            .lines()
            .filter_map(|line| {
                let (name, value) = line.split_once(':')?;
                let name = FIELDS.into_iter().find(|&field| field == name)?;
                Some((name, value.trim().parse().ok()?))
            })
            .collect();
        all.push(fields);
    }
    Ok(all)
}

/// A map name as the kernel keeps it: at most `BPF_OBJ_NAME_LEN - 1` bytes.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// The map `name` (a khttpd-common name) among `maps`.
pub fn find<'a>(maps: &'a [HeldMap], name: &str) -> anyhow::Result<&'a HeldMap> {
    maps.iter()
        .find(|map| map.name == kernel_name(name))
        .with_context(|| format!("no {name} map among {} held", maps.len()))
}

impl HeldMap {
    /// The map itself, opened by id.
    pub fn open(&self) -> anyhow::Result<MapData> {
        MapData::from_id(self.id).with_context(|| format!("cannot open map {}", self.id))
    }

    /// Its entries, if it is one of the per-connection maps: the sockhashes and the connection
    /// maps of both services, all keyed by socket cookie.
    pub fn entries(&self) -> anyhow::Result<usize> {
        let map = Map::from_map_data(self.open()?)?;
        // The kernel's name: the first 15 bytes of the constant's.
        let is = |name: &str| self.name == kernel_name(name);
        let count = if is(http::SOCKETS_MAP) || is(echo::SOCKETS_MAP) || is(echo::DETACHED_MAP) {
            SockHash::<_, u64>::try_from(map)?
                .keys()
                .filter(Result::is_ok)
                .count()
        } else if is(http::CONNECTIONS_MAP) {
            hash_keys::<http::Connection>(map)?
        } else if is(http::ANSWERED_MAP) {
            hash_keys::<http::Answered>(map)?
        } else if is(echo::CONNECTIONS_MAP) {
            hash_keys::<echo::Connection>(map)?
        } else {
            bail!("{} is not a per-connection map", self.name);
        };
        Ok(count)
    }
}

/// Keys of a hash map by socket cookie with values of type `V`.
fn hash_keys<V: aya::Pod>(map: Map) -> anyhow::Result<usize> {
    Ok(HashMap::<_, u64, V>::try_from(map)?
        .keys()
        .filter(Result::is_ok)
        .count())
}

/// Freezes `pid`'s map `name` (BPF_MAP_FREEZE): from then on every write to it from user space
/// fails with EPERM while the programs' own writes go on — a map that refuses updates, injected
/// from outside into a real server. aya has no call for it: the one raw bpf(2) of the harness.
pub fn freeze(pid: u32, name: &str) -> anyhow::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_MAP_FREEZE: libc::c_long = 22;
    let map = find(&maps_of(pid)?, name)?.open()?;
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    // SAFETY: the attribute is the map's fd (union bpf_attr { __u32 map_fd; }), read by the
    // kernel during the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, &raw const fd, 4) };
    if rc != 0 {
        bail!("freezing {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Ids of all BPF programs loaded on the machine.
pub fn loaded_program_ids() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|info| info.id())
        .collect()
}
