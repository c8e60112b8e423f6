//! Why the kernel path could not be set up, as the user reads it: `--fast-path auto` falls back to
//! user space on any of these errors, `--fast-path on` exits with its one-line message.

use std::{fmt, io};

/// Why the kernel path could not be set up.
#[derive(Debug)]
pub enum FastPathError {
    /// The process may not load BPF programs.
    MissingCapability(String),
    /// The verifier refused a program; `reason` is the last line of its log.
    VerifierRejected {
        program: &'static str,
        reason: String,
    },
    /// Anything else (missing kernel feature, map creation, attach).
    Other(String),
}

impl fmt::Display for FastPathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FastPathError::MissingCapability(what) => write!(
                f,
                "missing capability: {what} needs CAP_BPF and CAP_NET_ADMIN (run as root)"
            ),
            FastPathError::VerifierRejected { program, reason } => {
                write!(f, "the BPF verifier rejected program {program}: {reason}")
            }
            FastPathError::Other(what) => write!(f, "cannot set up the kernel fast path: {what}"),
        }
    }
}

impl std::error::Error for FastPathError {}

impl FastPathError {
    /// Classifies an aya error by its cause chain.
    pub(super) fn classify(what: &str, err: &(dyn std::error::Error + 'static)) -> Self {
        if os_errors(err).any(|errno| matches!(errno, libc::EPERM | libc::EACCES)) {
            return FastPathError::MissingCapability(what.to_owned());
        }
        FastPathError::Other(format!("{what}: {}", chain(err)))
    }
}

/// The errno of every `io::Error` in an error's cause chain (aya wraps the system call's).
pub fn os_errors<'a>(err: &'a (dyn std::error::Error + 'static)) -> impl Iterator<Item = i32> + 'a {
    std::iter::successors(Some(err), |e| e.source())
        .filter_map(|e| e.downcast_ref::<io::Error>()?.raw_os_error())
}

fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
