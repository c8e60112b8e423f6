//! nginx as the benches run it: in its best configuration for the job, in the foreground, in a
//! temporary directory of its own, stopped when dropped.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::Context as _;
use khttpd_harness::{
    process::{Guarded, Signal},
    system::temp_dir,
};

use crate::bench::{accepts, find_on_path, free_ports};

/// nginx in the foreground on a free port, with its config, pid file and logs in its own temporary
/// directory; dropping it stops the master (SIGQUIT, then SIGTERM, each waited for) and then
/// removes the directory.
pub(crate) struct Nginx {
    // Declared first: dropped (stopped) before the directory it writes into is removed.
    process: Guarded,
    dir: tempfile::TempDir,
    pub http: SocketAddr,
}

/// The greeting every server under `bench http` answers.
pub(crate) const HELLO_LOCATION: &str = r#"default_type text/plain;
            return 200 "Hello, World!\n";"#;

impl Nginx {
    /// Starts nginx on a free loopback port with `http` (directives) in its `http` block and
    /// `location` as its only `location /` block, `worker_processes auto`, listening with
    /// `reuseport` (a listener per worker: its best for these loads).
    pub(crate) fn start(binary: &Path, http: &str, location: &str) -> anyhow::Result<Self> {
        let [port] = free_ports()?;
        let conf = NginxConf {
            workers: "auto".to_owned(),
            listen_options: "reuseport",
            http,
            location,
        };
        Self::launch(Command::new(binary), port, &conf, accepts)
    }

    /// Starts nginx (`command` runs the binary: where and how is the caller's) listening on
    /// `http` with `conf`, and waits until `reachable(http)`.
    pub(crate) fn launch(
        mut command: Command,
        http: SocketAddr,
        conf: &NginxConf,
        reachable: impl Fn(SocketAddr) -> bool,
    ) -> anyhow::Result<Self> {
        let dir = temp_dir("nginx")?;
        let conf_path = dir.path().join("nginx.conf");
        fs::write(&conf_path, nginx_conf(dir.path(), http, conf))
            .with_context(|| format!("cannot write {}", conf_path.display()))?;
        let error_log = dir.path().join("error.log");
        let child = command
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.path())
            // Start-up messages too go to the directory, not to the system's log.
            .arg("-e")
            .arg(&error_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start nginx")?;
        let mut nginx = Self {
            process: Guarded::new(child, "nginx", &[Signal::QUIT, Signal::TERM]),
            dir,
            http,
        };
        nginx
            .process
            .wait_until(&http.to_string(), || reachable(http))
            .with_context(|| {
                format!(
                    "nginx's error log:\n{}",
                    fs::read_to_string(&error_log).unwrap_or_default()
                )
            })?;
        Ok(nginx)
    }

    /// Errors nginx logged (warn and above), for the report.
    pub(crate) fn error_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// What varies between the nginx set-ups of the benches.
pub(crate) struct NginxConf<'a> {
    /// `worker_processes`: `auto` or a count.
    pub workers: String,
    /// Parameters of `listen` after the address, e.g. `reuseport`.
    pub listen_options: &'a str,
    /// Directives for the `http` block besides the common ones (e.g. `open_file_cache`).
    pub http: &'a str,
    /// The directives of the only `location /` block.
    pub location: &'a str,
}

/// The whole nginx config: one location, every path inside `dir`, no access log, and no
/// per-connection request limit (khttpd has none either).
fn nginx_conf(dir: &Path, listen: SocketAddr, conf: &NginxConf) -> String {
    let dir = dir.display();
    let NginxConf {
        workers,
        listen_options,
        http,
        location,
    } = conf;
    format!(
        r#"# Written by `cargo xtask bench`.
daemon off;
master_process on;
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    {http}

    server {{
        listen {listen} {listen_options};
        location / {{
            {location}
        }}
    }}
}}
"#
    )
}

/// `/usr/sbin/nginx`, else `nginx` on PATH.
pub(crate) fn find_nginx() -> Option<PathBuf> {
    let debian = Path::new("/usr/sbin/nginx");
    if debian.is_file() {
        return Some(debian.to_owned());
    }
    find_on_path("nginx")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_config_answers_like_khttpd() {
        let listen = "127.0.0.1:8080".parse().unwrap();
        let conf = NginxConf {
            workers: "auto".to_owned(),
            listen_options: "",
            http: "",
            location: HELLO_LOCATION,
        };
        let conf = nginx_conf(Path::new("/tmp/x"), listen, &conf);
        assert!(conf.contains("listen 127.0.0.1:8080 ;"));
        assert!(conf.contains(r#"return 200 "Hello, World!\n";"#));
        assert!(conf.contains("pid /tmp/x/nginx.pid;"));
    }
}
