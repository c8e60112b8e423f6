//! Empty library target: it lets `khttpd` name this crate as a build dependency, so cargo rebuilds
//! the programs (built by khttpd's build script) when their sources change.
#![no_std]
