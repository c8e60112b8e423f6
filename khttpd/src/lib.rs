//! khttpd: an echo and web server whose hot path runs inside the Linux kernel.
//!
//! Following a connection:
//! 1. `listener` binds the interface's addresses; `listener::accept_loop` accepts and hands each
//!    socket to its service's dispatcher.
//! 2. With the fast path (`fast_path`), the socket goes into the service's sockhash (`sockmap`):
//!    `echo::kernel` echoes every byte in the kernel; `http::kernel` answers the requests user
//!    space has taught it and hands the connection back at the first one it cannot answer.
//! 3. Otherwise (and after a hand-off) the connection is one work item on the cmwq-style
//!    `workqueue` (`echo::user`, `http::executor`), or a thread (`--dispatch thread`).
//! 4. `access_log` writes a line per request, the kernel's answers included (`--access-log`);
//!    `metrics` reports both sides; `shutdown` stops everything on SIGINT/SIGTERM.
//!
//! `config` reads `--config` (the flags in a TOML file); `server` runs all of it: start (bind, load, drop privileges), serve, shut down; `top` shows a
//! running server from its metrics.
//!
//! Before the first accept, `privileges` drops root: the process keeps only the descriptors it
//! opened (programs, maps, listening sockets) and, with `--root`, sees only that folder.

pub mod access_log;
pub mod btf;
pub mod config;
pub mod echo;
pub mod fast_path;
pub mod fd;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod privileges;
pub mod server;
pub mod shutdown;
pub mod socket_memory;
pub mod sockmap;
pub mod top;
pub mod workqueue;
