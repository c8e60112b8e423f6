//! Running khttpd, in three steps over a plain [`Config`]: [`Server::start`] does everything that
//! needs root (bind the ports, load and attach the programs, drop privileges) and builds the
//! services; [`Server::serve`] accepts until its `stop` future completes; then it shuts down
//! (stop accepting, close every connection, drain the work queues, detach the programs).
//!
//! `main.rs` only parses the flags into a `Config` and hands it over with the signals as `stop`;
//! a test runs the same server in its own process.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use clap::ValueEnum;
use log::{info, warn};

use crate::{
    access_log::{self, AccessLog},
    echo::{kernel::KernelEcho, EchoService},
    fast_path::{
        maps::{EchoMaps, HttpMaps},
        FastPath,
    },
    http::{self, file_cache, kernel::KernelHttp, site::Site, Dispatch, HttpService, Timeouts},
    listener, metrics,
    privileges::{self, User},
    shutdown::{self, Shutdown},
    workqueue::{self, Kind, WorkQueue},
};

/// Whether the kernel answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    /// Use the kernel path when the programs load; otherwise warn once and serve from user space.
    Auto,
    /// Require the kernel path; exit with an error when it cannot be set up.
    On,
    /// Serve everything from user space.
    Off,
}

/// Everything a server is started with (the flags of `khttpd --help`, already checked).
#[derive(Clone, Debug)]
pub struct Config {
    /// Interface whose addresses both services listen on.
    pub iface: String,
    /// TCP port of the HTTP service (0: one the kernel picks, per address).
    pub http_port: u16,
    /// TCP port of the echo service (0: one the kernel picks, per address).
    pub echo_port: u16,
    pub backlog: i32,
    pub dispatch: Dispatch,
    pub fast_path: FastPathMode,
    pub workqueue: Kind,
    pub max_active: usize,
    /// Answer every GET with this file's bytes instead of the greeting.
    pub body: Option<PathBuf>,
    pub kernel_cache_max: u32,
    /// Serve the files under this folder.
    pub root: Option<PathBuf>,
    pub file_cache: file_cache::Limits,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    /// Write a line per HTTP request here (`-`: standard output).
    pub access_log: Option<PathBuf>,
    pub access_log_format: access_log::Format,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
    /// Run as this user once everything that needs root is done (`root` keeps every privilege).
    pub user: String,
}

/// A started server: ports bound, programs attached, privileges dropped, nothing accepted yet.
pub struct Server {
    config: Config,
    /// Dropping it detaches the programs.
    fast_path: Option<FastPath>,
    http_listeners: Vec<std::net::TcpListener>,
    echo_listeners: Vec<std::net::TcpListener>,
    metrics_listener: Option<tokio::net::TcpListener>,
    http: Arc<HttpService>,
    echo: Arc<EchoService>,
    notify_shutdown: shutdown::Notify,
}

/// Starts a server with `config` and serves until `stop` completes: what `khttpd` does.
pub async fn run(config: Config, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    Server::start(config).await?.serve(stop).await
}

impl Server {
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        if let Some(path) = &config.body {
            http::response::set_body(read_body(path)?);
        }
        // Checked now, opened again after the privilege drop (which may make it the root).
        let site = match &config.root {
            Some(root) => Some(
                Site::new(root, config.file_cache)
                    .with_context(|| format!("--root {}", root.display()))?,
            ),
            None => None,
        };
        let user = user_to_become(&config.user)?;
        let echo_listeners = listener::bind(&config.iface, config.echo_port, config.backlog)?;
        let http_listeners = listener::bind(&config.iface, config.http_port, config.backlog)?;
        // Opened once the ports are ours (a server that cannot listen creates no file), before the
        // privilege drop; reopened (SIGUSR1) through its folder's descriptor.
        let access_log = match &config.access_log {
            Some(path) => Some(Arc::new(AccessLog::open(path, config.access_log_format)?)),
            None => None,
        };

        let (fast_path, kernel_echo, kernel_http) =
            match load_fast_path(config.fast_path, access_log.is_some())? {
                Some((fast_path, echo_maps, http_maps)) => (
                    Some(fast_path),
                    Some(KernelEcho::start(echo_maps).context("starting the kernel echo")?),
                    Some(
                        KernelHttp::start(http_maps, config.timeouts.idle, config.kernel_cache_max)
                            .context("starting the kernel HTTP path")?,
                    ),
                ),
                None => (None, None, None),
            };
        let metrics_listener = match config.metrics {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot serve metrics on {addr}"))?,
            ),
            None => None,
        };
        // Everything that needs root is done: programs loaded and attached, ports bound.
        if let Some(user) = &user {
            privileges::drop_to(user, site.as_ref().map(Site::root))?;
        }
        let site = match site {
            // Confined to the folder, it is the filesystem's root now; a folder only root may
            // read would answer 403 to everything: say so now.
            Some(site) if user.is_some() => {
                std::fs::read_dir("/").with_context(|| {
                    format!(
                        "--root {}: not readable as --user {}",
                        site.root().display(),
                        config.user
                    )
                })?;
                Some(Site::new(Path::new("/"), config.file_cache)?)
            }
            site => site,
        }
        .map(Arc::new);

        let queue = |name| {
            WorkQueue::alloc(workqueue::Config::new(
                name,
                config.workqueue,
                config.max_active,
            ))
            .context("allocating a work queue")
        };
        let notify_shutdown = shutdown::notify();
        let echo = EchoService::new(queue("khttpd_echo")?, kernel_echo, notify_shutdown.clone());
        let http = HttpService::new(
            queue("khttpd_http")?,
            kernel_http,
            http::Config {
                dispatch: config.dispatch,
                kernel_first: config.fast_path == FastPathMode::On,
                timeouts: config.timeouts,
                max_connections: config.max_connections,
                site,
                access_log,
            },
            notify_shutdown.clone(),
        )
        .context("starting the HTTP service")?;
        // What the caches and the kernel learned from files under --root is forgotten when any
        // of them changes.
        if let Some(site) = &http.site {
            let http = Arc::clone(&http);
            site.watch(move || {
                if let Some(kernel) = &http.kernel {
                    kernel.forget_everything();
                }
            })
            .context("watching --root for changes")?;
        }
        Ok(Server {
            config,
            fast_path,
            http_listeners,
            echo_listeners,
            metrics_listener,
            http,
            echo,
            notify_shutdown,
        })
    }

    /// The addresses the HTTP service listens on (one per address of the interface).
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        local_addrs(&self.http_listeners)
    }

    /// The addresses the echo service listens on.
    pub fn echo_addrs(&self) -> Vec<SocketAddr> {
        local_addrs(&self.echo_listeners)
    }

    /// Accepts and serves until `stop` completes, then shuts everything down.
    pub async fn serve(self, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            config,
            fast_path,
            http_listeners,
            echo_listeners,
            metrics_listener,
            http,
            echo,
            notify_shutdown,
        } = self;
        let shutdown = || Shutdown::new(&notify_shutdown);
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = metrics_listener {
            info!("metrics: http://{}/metrics", listener.local_addr()?);
            let services = Arc::new(metrics::Services {
                echo: echo.clone(),
                http: http.clone(),
            });
            tasks.spawn(metrics::serve(listener, services, shutdown()));
        }
        let path = if fast_path.is_some() {
            "kernel"
        } else {
            "user space"
        };
        for listener in http_listeners {
            info!(
                "http: listening on {} ({path}, {} dispatch)",
                listener.local_addr()?,
                config.dispatch.as_str()
            );
            let http = Arc::clone(&http);
            tasks.spawn(listener::accept_loop(
                listener,
                shutdown(),
                "http",
                move |stream, peer| http.dispatch(stream, peer),
            ));
        }
        for listener in echo_listeners {
            info!(
                "echo: listening on {} ({path}, {} work queue)",
                listener.local_addr()?,
                config.workqueue
            );
            let echo = Arc::clone(&echo);
            tasks.spawn(listener::accept_loop(
                listener,
                shutdown(),
                "echo",
                move |stream, _| echo.dispatch(stream),
            ));
        }
        tasks.spawn(echo.clone().handoff_loop(shutdown()));
        tasks.spawn(http.clone().handoff_loop(shutdown()));
        tasks.spawn(http.clone().date_loop(shutdown()));
        tasks.spawn(http.clone().idle_loop(shutdown()));
        // Stopped after every connection is closed, so it logs the kernel's last answers too.
        let access_stop = shutdown::notify();
        let access_loop = tokio::spawn(http.clone().access_loop(Shutdown::new(&access_stop)));
        if let Some(log) = &http.access_log {
            tasks.spawn(reopen_on_sigusr1(Arc::clone(log), shutdown())?);
        }

        stop.await;
        // Stop accepting, end user-space connections, close kernel ones, drain the queues.
        notify_shutdown.send_replace(true);
        while tasks.join_next().await.is_some() {}
        echo.stop().await;
        http.stop().await;
        access_stop.send_replace(true);
        let _ = access_loop.await;
        if let Some(log) = &http.access_log {
            log.flush();
        }
        // Dropping the programs' object detaches them.
        drop(fast_path);
        info!("stopped");
        Ok(())
    }
}

fn local_addrs(listeners: &[std::net::TcpListener]) -> Vec<SocketAddr> {
    listeners
        .iter()
        .filter_map(|listener| listener.local_addr().ok())
        .collect()
}

/// The user to become once everything that needs root is done: looked up before a chroot hides
/// the user database; none for `root`, or when not started as root (nothing to drop).
fn user_to_become(name: &str) -> anyhow::Result<Option<User>> {
    Ok(match privileges::lookup(name)? {
        user if user.uid == 0 => None,
        _ if !privileges::is_root() => {
            info!("not started as root: --user {name} not applied");
            None
        }
        user => Some(user),
    })
}

type Loaded = (FastPath, EchoMaps, HttpMaps);

/// Registered before it serves (a SIGUSR1 before then would end the process); reopens the access
/// log at each one.
fn reopen_on_sigusr1(
    log: Arc<AccessLog>,
    mut shutdown: Shutdown,
) -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut signals = signal(SignalKind::user_defined1()).context("handling SIGUSR1")?;
    Ok(async move {
        loop {
            tokio::select! {
                Some(()) = signals.recv() => {
                    info!("SIGUSR1: reopening the access log");
                    log.reopen();
                }
                () = shutdown.recv() => return,
            }
        }
    })
}

fn load_fast_path(mode: FastPathMode, access_log: bool) -> anyhow::Result<Option<Loaded>> {
    Ok(match mode {
        FastPathMode::Off => None,
        FastPathMode::On => Some(FastPath::load(access_log)?),
        FastPathMode::Auto => match FastPath::load(access_log) {
            Ok(loaded) => Some(loaded),
            Err(e) => {
                warn!("{e}; serving from user space");
                None
            }
        },
    })
}

fn read_body(path: &Path) -> anyhow::Result<Vec<u8>> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("--body {}", path.display()))?
        .len();
    if size > http::response::MAX_BODY_FILE {
        anyhow::bail!(
            "--body {}: {size} bytes; the limit is {} bytes",
            path.display(),
            http::response::MAX_BODY_FILE
        );
    }
    std::fs::read(path).with_context(|| format!("--body {}", path.display()))
}
