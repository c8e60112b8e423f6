//! `--config FILE`: the serving flags in a TOML file, so a deployment keeps its settings in one
//! place (`khttpd check --config FILE` validates it first, like `nginx -t`). Keys are the flags'
//! names without the dashes in front (`fast-path = "on"`, `idle-timeout = 30`); a flag given on
//! the command line overrides the file. Unknown keys and bad values are refused with the line and
//! key they are on (toml's errors), and the range checks are the flags' own ([`seconds`],
//! [`kernel_cache_max`]).

use std::{net::SocketAddr, path::Path, path::PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Deserializer, Serialize};

use crate::{access_log, http::Dispatch, server::FastPathMode, workqueue::Kind};

/// What a config file may set: every serving flag, each optional.
#[derive(Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct File {
    pub iface: Option<String>,
    pub port: Option<u16>,
    pub dispatch: Option<Dispatch>,
    pub echo_port: Option<u16>,
    pub backlog: Option<i32>,
    pub fast_path: Option<FastPathMode>,
    pub workqueue: Option<Kind>,
    pub max_active: Option<usize>,
    pub body: Option<PathBuf>,
    #[serde(default, deserialize_with = "checked_kernel_cache_max")]
    pub kernel_cache_max: Option<u32>,
    pub root: Option<PathBuf>,
    pub file_cache_max: Option<u64>,
    pub open_file_cache: Option<u64>,
    #[serde(default, deserialize_with = "checked_seconds")]
    pub idle_timeout: Option<u64>,
    #[serde(default, deserialize_with = "checked_seconds")]
    pub header_timeout: Option<u64>,
    pub max_connections: Option<usize>,
    pub access_log: Option<PathBuf>,
    pub access_log_format: Option<access_log::Format>,
    pub metrics: Option<SocketAddr>,
    pub user: Option<String>,
    pub verbose: Option<u8>,
    pub quiet: Option<u8>,
}

/// Reads and checks `path`.
pub fn read(path: &Path) -> anyhow::Result<File> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("--config {}", path.display()))?;
    toml::from_str(&text).map_err(|e| {
        // toml's message names the line, the column and the key, and quotes the line.
        anyhow::anyhow!("--config {}: {}", path.display(), e.to_string().trim_end())
    })
}

/// The effective configuration as a config file says it.
pub fn render(file: &File) -> String {
    toml::to_string(file).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
}

/// `--idle-timeout`, `--header-timeout`: whole seconds, at least 1.
pub fn seconds(value: u64) -> Result<u64, String> {
    match value {
        0 => Err("must be at least 1 second".to_owned()),
        secs => Ok(secs),
    }
}

/// `--kernel-cache-max`: at most the largest answer the kernel sends.
pub fn kernel_cache_max(value: u32) -> Result<u32, String> {
    let max = khttpd_common::http::MAX_RESPONSE;
    match value {
        bytes if bytes <= max => Ok(bytes),
        _ => Err(format!(
            "must be at most {max} (the largest answer the kernel sends)"
        )),
    }
}

/// [`seconds`] for a flag.
pub fn parse_seconds(text: &str) -> Result<u64, String> {
    seconds(text.parse().map_err(|e| format!("{e}"))?)
}

/// [`kernel_cache_max`] for a flag.
pub fn parse_kernel_cache_max(text: &str) -> Result<u32, String> {
    kernel_cache_max(text.parse().map_err(|e| format!("{e}"))?)
}

fn checked_seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    Option::<u64>::deserialize(deserializer)?
        .map(seconds)
        .transpose()
        .map_err(serde::de::Error::custom)
}

fn checked_kernel_cache_max<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    Option::<u32>::deserialize(deserializer)?
        .map(kernel_cache_max)
        .transpose()
        .map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<File, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn keys_are_the_flags() {
        let file = parse(
            "port = 80\nfast-path = \"on\"\nidle-timeout = 30\naccess-log = \"/var/log/a.log\"\naccess-log-format = \"json\"\nmetrics = \"127.0.0.1:9100\"\n",
        )
        .unwrap();
        assert_eq!(file.port, Some(80));
        assert_eq!(file.fast_path, Some(FastPathMode::On));
        assert_eq!(file.idle_timeout, Some(30));
        assert_eq!(file.access_log_format, Some(access_log::Format::Json));
        assert_eq!(file.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(parse(&render(&file)).unwrap(), file, "rendered back");
    }

    #[test]
    fn errors_name_the_line_and_key() {
        let unknown = parse("port = 80\nprot = 81\n").unwrap_err();
        assert!(
            unknown.contains("line 2") && unknown.contains("prot"),
            "{unknown}"
        );
        let zero = parse("\n\nidle-timeout = 0\n").unwrap_err();
        assert!(
            zero.contains("line 3") && zero.contains("at least 1"),
            "{zero}"
        );
        let kind = parse("fast-path = \"sometimes\"\n").unwrap_err();
        assert!(
            kind.contains("line 1") && kind.contains("fast-path"),
            "{kind}"
        );
        let big = parse("kernel-cache-max = 100000\n").unwrap_err();
        assert!(big.contains("at most 16384"), "{big}");
    }
}
