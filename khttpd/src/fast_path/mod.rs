//! Loading and attaching the eBPF programs (khttpd-ebpf): the loader is here, the typed errors that
//! explain why it could not load them in [`error`], the maps it hands each service in [`maps`].
//!
//! The programs stay attached exactly as long as [`FastPath`] lives: nothing is pinned, so a crash
//! or `kill -9` detaches them too.

pub mod error;
pub mod maps;

use std::io;

use aya::{
    programs::{Program, ProgramError, SkMsg, SkSkb},
    Ebpf, EbpfLoader,
};
use khttpd_common::{echo, http, TcpOffsets};
use log::{debug, warn};

use self::{
    error::FastPathError,
    maps::{EchoMaps, HttpMaps},
};

/// The compiled programs, built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/khttpd"));

/// The loaded and attached programs. Dropping it detaches them.
pub struct FastPath {
    _ebpf: Ebpf,
    logger: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for FastPath {
    fn drop(&mut self) {
        if let Some(logger) = self.logger.take() {
            logger.abort();
        }
    }
}

impl FastPath {
    /// Loads the programs, attaches the echo verdict to the echo sockhash and the HTTP verdict and
    /// synthesizer to the HTTP sockhash, and starts forwarding the programs' aya-log records to
    /// this process's logger. With `access_log` the HTTP verdict sends a record of each answer
    /// ([`HttpMaps::access`]). Must run inside the tokio runtime.
    pub fn load(access_log: bool) -> Result<(FastPath, EchoMaps, HttpMaps), FastPathError> {
        // Programs skip log statements above this level without touching the ring buffer.
        let level = log::max_level() as u8;
        let mut secret = [0u8; 8];
        fill_random(&mut secret).map_err(|e| FastPathError::Other(format!("getrandom: {e}")))?;
        let secret = u64::from_ne_bytes(secret);
        let mut loader = EbpfLoader::new();
        if access_log {
            loader.map_max_entries(http::ACCESS_MAP, http::ACCESS_BYTES);
        }
        let mut ebpf = loader
            .override_global(aya_log::LEVEL, &level, true)
            .override_global(http::SECRET_GLOBAL, &secret, true)
            .override_global(http::TGID_GLOBAL, &std::process::id(), true)
            .override_global(http::ACCESS_LOG_GLOBAL, &u32::from(access_log), true)
            .override_global(khttpd_common::TCP_OFFSETS_GLOBAL, &tcp_offsets()?, true)
            .load(PROGRAMS)
            .map_err(|e| FastPathError::classify("loading the BPF object", &e))?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(tokio::spawn(forward_logs(logger))),
            Err(e) => {
                warn!("eBPF log records will not be shown: {e}");
                None
            }
        };

        let echo_maps = EchoMaps {
            sockets: take_map(&mut ebpf, echo::SOCKETS_MAP)?,
            detached: take_map(&mut ebpf, echo::DETACHED_MAP)?,
            connections: take_map(&mut ebpf, echo::CONNECTIONS_MAP)?,
            counters: take_map(&mut ebpf, echo::COUNTERS_MAP)?,
            handoffs: take_map(&mut ebpf, echo::HANDOFFS_MAP)?,
        };
        let http_maps = HttpMaps {
            sockets: take_map(&mut ebpf, http::SOCKETS_MAP)?,
            connections: take_map(&mut ebpf, http::CONNECTIONS_MAP)?,
            answered: take_map(&mut ebpf, http::ANSWERED_MAP)?,
            requests: take_map(&mut ebpf, http::REQUESTS_MAP)?,
            responses: take_map(&mut ebpf, http::RESPONSES_MAP)?,
            blocks: take_map(&mut ebpf, http::RESPONSE_BLOCKS_MAP)?,
            dates: take_map(&mut ebpf, http::DATES_MAP)?,
            date_index: take_map(&mut ebpf, http::DATE_INDEX_MAP)?,
            counters: take_map(&mut ebpf, http::COUNTERS_MAP)?,
            handoffs: take_map(&mut ebpf, http::HANDOFFS_MAP)?,
            access: take_map(&mut ebpf, http::ACCESS_MAP)?,
        };

        let program: &mut SkSkb = find_program(&mut ebpf, echo::VERDICT_PROGRAM)?;
        load_program(echo::VERDICT_PROGRAM, program.load())?;
        program.attach(echo_maps.sockets.fd()).map_err(|e| {
            FastPathError::classify("attaching echo_verdict to the echo sockhash", &e)
        })?;
        let program: &mut SkSkb = find_program(&mut ebpf, http::VERDICT_PROGRAM)?;
        load_program(http::VERDICT_PROGRAM, program.load())?;
        program.attach(http_maps.sockets.fd()).map_err(|e| {
            FastPathError::classify("attaching http_verdict to the HTTP sockhash", &e)
        })?;
        let program: &mut SkMsg = find_program(&mut ebpf, http::SYNTHESIZER_PROGRAM)?;
        load_program(http::SYNTHESIZER_PROGRAM, program.load())?;
        program.attach(http_maps.sockets.fd()).map_err(|e| {
            FastPathError::classify("attaching http_synthesize to the HTTP sockhash", &e)
        })?;

        Ok((
            FastPath {
                _ebpf: ebpf,
                logger,
            },
            echo_maps,
            http_maps,
        ))
    }
}

fn find_program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, FastPathError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| FastPathError::Other(format!("program {name} missing")))?
        .try_into()
        .map_err(|e: ProgramError| FastPathError::Other(e.to_string()))
}

/// Turns a program's load result into the error the user sees.
fn load_program(name: &'static str, loaded: Result<(), ProgramError>) -> Result<(), FastPathError> {
    loaded.map_err(|e| match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            if matches!(io_error.raw_os_error(), Some(libc::EPERM)) {
                return FastPathError::MissingCapability(format!("loading program {name}"));
            }
            let log = verifier_log.to_string();
            debug!("verifier log for {name}:\n{log}");
            let reason = log
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no log")
                .to_owned();
            FastPathError::VerifierRejected {
                program: name,
                reason: format!("{reason} ({io_error})"),
            }
        }
        other => FastPathError::classify(&format!("loading program {name}"), &other),
    })
}

/// Where the verdicts' `struct tcp_sock` fields live in this kernel, from its BTF.
fn tcp_offsets() -> Result<TcpOffsets, FastPathError> {
    let btf = crate::btf::Btf::of_kernel()
        .map_err(|e| FastPathError::Other(format!("reading the kernel's BTF: {e}")))?;
    let offset = |member| {
        btf.member_offset("tcp_sock", member).ok_or_else(|| {
            FastPathError::Other(format!("the kernel's BTF has no tcp_sock.{member}"))
        })
    };
    Ok(TcpOffsets {
        bytes_acked: offset("bytes_acked")?,
        write_seq: offset("write_seq")?,
        snd_una: offset("snd_una")?,
        sk_cookie: btf
            .member_offset("sock_common", "skc_cookie")
            .ok_or_else(|| {
                FastPathError::Other("the kernel's BTF has no sock_common.skc_cookie".to_owned())
            })?,
    })
}

fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let n = rustix::rand::getrandom(&mut *buf, rustix::rand::GetRandomFlags::empty())?;
    if n == buf.len() {
        Ok(())
    } else {
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T, FastPathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| FastPathError::Other(format!("map {name} missing from the BPF object")))?;
    T::try_from(map).map_err(|e| FastPathError::Other(format!("map {name}: {e}")))
}

async fn forward_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let Ok(mut logger) = crate::fd::async_readable(logger) else {
        warn!("cannot poll the eBPF log ring buffer");
        return;
    };
    loop {
        let Ok(mut ready) = logger.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names both sides share are written twice — as `khttpd-common` constants and as the
    /// literals aya-ebpf's `#[map(name = …)]` takes — so the object built from the eBPF crate must
    /// hold every map and program the constants name. (The globals are set with `must_exist`,
    /// which fails the load, and every BPF test, when one is missing.)
    #[test]
    fn every_shared_name_is_in_the_object() {
        let object = aya_obj::Object::parse(PROGRAMS).expect("the embedded object parses");
        for map in [
            echo::SOCKETS_MAP,
            echo::DETACHED_MAP,
            echo::CONNECTIONS_MAP,
            echo::COUNTERS_MAP,
            echo::HANDOFFS_MAP,
            http::SOCKETS_MAP,
            http::CONNECTIONS_MAP,
            http::ANSWERED_MAP,
            http::REQUESTS_MAP,
            http::RESPONSES_MAP,
            http::RESPONSE_BLOCKS_MAP,
            http::DATES_MAP,
            http::DATE_INDEX_MAP,
            http::COUNTERS_MAP,
            http::HANDOFFS_MAP,
            http::ACCESS_MAP,
        ] {
            assert!(object.maps.contains_key(map), "no map {map} in the object");
        }
        for program in [
            echo::VERDICT_PROGRAM,
            http::VERDICT_PROGRAM,
            http::SYNTHESIZER_PROGRAM,
        ] {
            assert!(
                object.programs.contains_key(program),
                "no program {program} in the object"
            );
        }
    }
}
