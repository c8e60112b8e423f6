//! Least privilege. khttpd needs root for three things only, all done at start: loading and
//! attaching the BPF programs, binding its ports, raising its file limit. Afterwards it serves
//! through file descriptors it already holds (maps, programs, listening sockets), which need no
//! capability. So once they are open the process becomes `--user` (default `nobody`) with no
//! capabilities at all, confined to `--root` by chroot(2) when it serves a folder, and checks
//! that it really can no longer load a BPF program before it accepts a connection.

use std::{
    ffi::{CStr, CString},
    io,
    path::Path,
};

use log::info;

/// Whom the process runs as after the drop.
pub struct User {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
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
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Makes execve(2) unable to grant privileges (setuid binaries, file capabilities) to this
/// process and every thread it starts: called before the runtime starts its threads, as the flag
/// is per thread and inherited. khttpd never executes anything; this keeps it that way for an
/// attacker too.
pub fn forbid_new_privileges() {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        log::warn!("cannot set no_new_privs: {}", io::Error::last_os_error());
    }
}

/// Looks `name` up in the user database (before any chroot hides it).
pub fn lookup(name: &str) -> Result<User, Error> {
    let c_name = CString::new(name).map_err(|_| Error::UnknownUser(name.to_owned()))?;
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: every pointer is valid for the call; `buffer` outlives the use of `entry`.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(Error::Lookup(
            name.to_owned(),
            io::Error::from_raw_os_error(rc),
        ));
    }
    if found.is_null() {
        return Err(Error::UnknownUser(name.to_owned()));
    }
    Ok(User {
        name: name.to_owned(),
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    })
}

/// Confines the process to `jail` (if any), becomes `user` with no supplementary groups and no
/// capabilities, and verifies the result. Every thread changes at once: glibc applies set*id
/// and setgroups to all threads, the kernel clears the capabilities of each thread whose user
/// ids all leave 0, and chroot changes the filesystem root the threads share.
pub fn drop_to(user: &User, jail: Option<&Path>) -> Result<(), Error> {
    if let Some(jail) = jail {
        let path = CString::new(jail.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Step("chroot", io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: plain system calls on a valid C string.
        check("chroot", unsafe { libc::chroot(path.as_ptr()) })?;
        check("chdir /", unsafe { libc::chdir(c"/".as_ptr()) })?;
    }
    // SAFETY: plain system calls; an empty group list needs no pointer.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    check("setgid", unsafe {
        libc::setresgid(user.gid, user.gid, user.gid)
    })?;
    check("setuid", unsafe {
        libc::setresuid(user.uid, user.uid, user.uid)
    })?;
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

fn check(step: &'static str, rc: libc::c_int) -> Result<(), Error> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Step(step, io::Error::last_os_error()))
    }
}

/// The drop took: root cannot be regained, and the kernel refuses a BPF program (the one thing
/// an attacker who took over the process would most like to do here).
fn verify(user: &User) -> Result<(), Error> {
    // SAFETY: plain system calls.
    if user.uid != 0 && unsafe { libc::setuid(0) } == 0 {
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
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SK_SKB: u32 = 14;
    let attr = ProgLoad {
        prog_type: BPF_PROG_TYPE_SK_SKB,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
    };
    // SAFETY: `attr` points at valid memory of the size passed; the kernel only reads it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoad,
            std::mem::size_of::<ProgLoad>() as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: the fd was just returned to us.
        unsafe { libc::close(fd as libc::c_int) };
        return true;
    }
    false
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
