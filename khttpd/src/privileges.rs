//! Least privilege. khttpd needs root for three things only, all done at start: loading and
//! attaching the BPF programs, binding its ports, raising its file limit. Afterwards it serves
//! through file descriptors it already holds (maps, programs, listening sockets), which need no
//! capability. So once they are open the process becomes `--user` (default `nobody`) with no
//! capabilities at all, confined to `--root` by chroot(2) when it serves a folder, and checks
//! that it really can no longer load a BPF program before it accepts a connection.

use std::{ffi::CStr, io, path::Path};

use log::info;
use nix::unistd::{self, Gid, Uid};

use crate::fd;

/// Whom the process runs as after the drop.
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug)]
pub enum Error {
    UnknownUser(String),
    Lookup(String, io::Error),
    Step(&'static str, io::Error),
    /// The drop ran but left the process able to do what it must not.
    StillPrivileged(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::UnknownUser(name) => write!(f, "--user {name}: no such user"),
            Error::Lookup(name, e) => write!(f, "--user {name}: cannot look it up: {e}"),
            Error::Step(step, e) => write!(f, "dropping privileges: {step}: {e}"),
            Error::StillPrivileged(what) => {
                write!(
                    f,
                    "dropping privileges failed: the process can still {what}"
                )
            }
        }
    }
}

impl std::error::Error for Error {}

/// Whether the process can drop privileges at all (it runs as root).
pub fn is_root() -> bool {
    unistd::geteuid().is_root()
}

/// Makes execve(2) unable to grant privileges (setuid binaries, file capabilities) to this
/// process and every thread it starts: called before the runtime starts its threads, as the flag
/// is per thread and inherited. khttpd never executes anything; this keeps it that way for an
/// attacker too.
pub fn forbid_new_privileges() {
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        log::warn!("cannot set no_new_privs: {}", io::Error::from(e));
    }
}

/// Looks `name` up in the user database (before any chroot hides it).
pub fn lookup(name: &str) -> Result<User, Error> {
    match unistd::User::from_name(name) {
        Ok(Some(entry)) => Ok(User {
            name: name.to_owned(),
            uid: entry.uid.as_raw(),
            gid: entry.gid.as_raw(),
        }),
        // (Also a name with a NUL byte: it cannot be in the database.)
        Ok(None) => Err(Error::UnknownUser(name.to_owned())),
        Err(e) => Err(Error::Lookup(name.to_owned(), e.into())),
    }
}

/// Confines the process to `jail` (if any), becomes `user` with no supplementary groups and no
/// capabilities, and verifies the result. Every thread changes at once: glibc applies set*id
/// and setgroups to all threads, the kernel clears the capabilities of each thread whose user
/// ids all leave 0, and chroot changes the filesystem root the threads share.
pub fn drop_to(user: &User, jail: Option<&Path>) -> Result<(), Error> {
    if let Some(jail) = jail {
        check("chroot", unistd::chroot(jail))?;
        check("chdir /", unistd::chdir("/"))?;
    }
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    check("setgroups", unistd::setgroups(&[]))?;
    check("setgid", unistd::setresgid(gid, gid, gid))?;
    check("setuid", unistd::setresuid(uid, uid, uid))?;
    verify(user)?;
    info!(
        "running as {} (uid {}, gid {}), no capabilities{}; loading BPF is refused",
        user.name,
        user.uid,
        user.gid,
        jail.map(|jail| format!(", confined to {}", jail.display()))
            .unwrap_or_default()
    );
    Ok(())
}

fn check(step: &'static str, result: nix::Result<()>) -> Result<(), Error> {
    result.map_err(|e| Error::Step(step, e.into()))
}

/// The drop took: root cannot be regained, and the kernel refuses a BPF program (the one thing
/// an attacker who took over the process would most like to do here).
fn verify(user: &User) -> Result<(), Error> {
    if user.uid != 0 && unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(Error::StillPrivileged("become root again"));
    }
    if user.uid != 0 && can_load_bpf() {
        return Err(Error::StillPrivileged("load BPF programs"));
    }
    Ok(())
}

/// Tries to load the smallest sk_skb program (`r0 = 1; exit`): a type that needs CAP_BPF and
/// CAP_NET_ADMIN whatever `kernel.unprivileged_bpf_disabled` says.
fn can_load_bpf() -> bool {
    // BPF_ALU64 | BPF_MOV | BPF_K into r0, then BPF_JMP | BPF_EXIT.
    let program: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
    let license: &CStr = c"GPL";
    /// The leading fields of `union bpf_attr` for BPF_PROG_LOAD; the kernel zero-fills the rest.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
    }
    const BPF_PROG_LOAD: u32 = 5;
    const BPF_PROG_TYPE_SK_SKB: u32 = 14;
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SK_SKB,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
    };
    // SAFETY: `insns` and `license` point at live memory of the sizes given; the kernel only
    // reads them.
    let loaded = unsafe { fd::bpf(BPF_PROG_LOAD, &attr) };
    // The program's fd, if any, is closed when the OwnedFd drops.
    loaded.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe itself works: as root the program loads (so a refusal after the drop means the
    /// drop worked, not a broken probe); as anyone else it is refused.
    #[test]
    fn the_bpf_probe_loads_only_with_privileges() {
        assert_eq!(can_load_bpf(), is_root());
    }

    #[test]
    fn unknown_users_are_named() {
        let error = lookup("no-such-user-khttpd").err().unwrap();
        assert_eq!(
            error.to_string(),
            "--user no-such-user-khttpd: no such user"
        );
        assert_eq!(lookup("root").unwrap().uid, 0);
    }
}
