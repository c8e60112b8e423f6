//! The access log's writer thread: every [`TICK`] (or when woken) it takes what is waiting and
//! writes it; it reopens the file by name through its folder's descriptor (SIGUSR1).

use std::{
    ffi::OsString,
    fs::File,
    io::{self, Write as _},
    os::fd::OwnedFd,
    path::Path,
    sync::{atomic::Ordering, Arc},
};

use log::{error, warn};
use rustix::fs::{Mode, OFlags};

use super::{Lines, Shared, TICK, WRITE_BUFFER};

/// Where the log goes.
pub(super) enum Destination {
    Stdout,
    File {
        file: File,
        /// Its folder, for reopening by name.
        folder: OwnedFd,
        name: OsString,
        shown: String,
    },
}

/// Opens the log file and its folder (to reopen it by name later).
pub(super) fn open_file(path: &Path) -> anyhow::Result<Destination> {
    let shown = path.display().to_string();
    let name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("--access-log {shown}: not a file name"))?
        .to_owned();
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let folder = rustix::fs::open(
        folder,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| anyhow::anyhow!("--access-log {shown}: cannot open its folder: {e}"))?;
    let file = open_in(&folder, &name).map_err(|e| anyhow::anyhow!("--access-log {shown}: {e}"))?;
    Ok(Destination::File {
        file,
        folder,
        name,
        shown,
    })
}

fn open_in(folder: &OwnedFd, name: &OsString) -> io::Result<File> {
    let fd = rustix::fs::openat(
        folder,
        name.as_os_str(),
        OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o640),
    )?;
    Ok(File::from(fd))
}

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) destination: Destination,
    pub(super) shared: Arc<Shared>,
    /// The last write failed (said once until one succeeds).
    pub(super) failing: bool,
}

impl Writer {
    /// Every [`TICK`] (or when woken), writes what is waiting; ends once the log is closed and
    /// everything is written.
    pub(super) fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let mut spare = Vec::new();
        loop {
            let state = shared.state.lock().unwrap();
            let (mut state, _) = shared
                .wake
                .wait_timeout_while(state, TICK, |state| {
                    state.waiting.bytes.len() < WRITE_BUFFER
                        && !state.reopen
                        && state.flushes_done == state.flushes_asked
                        && !state.closed
                })
                .unwrap();
            // Swapped for the spare buffer, so neither side allocates in the steady state.
            let lines = std::mem::replace(
                &mut state.waiting,
                Lines {
                    bytes: std::mem::take(&mut spare),
                    ..Lines::default()
                },
            );
            state.writing = lines.bytes.len();
            let reopen = std::mem::take(&mut state.reopen);
            let (flushes, closed) = (state.flushes_asked, state.closed);
            drop(state);

            spare = self.write(lines);
            if reopen {
                self.reopen_file();
            }
            let mut state = shared.state.lock().unwrap();
            state.writing = 0;
            state.flushes_done = flushes;
            let done = closed && state.waiting.bytes.is_empty();
            drop(state);
            shared.written.notify_all();
            shared.room.notify_one();
            if done {
                return;
            }
        }
    }

    /// Writes `lines`; returns their buffer, emptied.
    fn write(&mut self, lines: Lines) -> Vec<u8> {
        let mut bytes = lines.bytes;
        if bytes.is_empty() {
            return bytes;
        }
        let written = match &mut self.destination {
            Destination::Stdout => io::stdout().lock().write_all(&bytes),
            Destination::File { file, .. } => file.write_all(&bytes),
        };
        let shared = &self.shared;
        match written {
            Ok(()) => {
                self.failing = false;
                shared
                    .kernel_lines
                    .fetch_add(lines.kernel, Ordering::Relaxed);
                shared.user_lines.fetch_add(lines.user, Ordering::Relaxed);
            }
            Err(e) => {
                shared
                    .dropped_write
                    .fetch_add(lines.kernel + lines.user, Ordering::Relaxed);
                if !self.failing {
                    error!("access log: cannot write ({e}): lines are dropped until it can");
                    self.failing = true;
                }
            }
        }
        bytes.clear();
        bytes
    }

    fn reopen_file(&mut self) {
        let Destination::File {
            file,
            folder,
            name,
            shown,
        } = &mut self.destination
        else {
            return;
        };
        match open_in(folder, name) {
            Ok(reopened) => *file = reopened,
            Err(e) => warn!(
                "access log: cannot reopen {shown} ({e}; its folder must let this user create it): still writing to the file it was"
            ),
        }
    }
}
