//! khttpd's `/metrics` (the Prometheus text format), fetched and parsed once for tests and benches.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{ensure, Context as _};

/// Every sample of one `/metrics` answer: the series (name with labels) and its value.
#[derive(Clone, Debug, Default)]
pub struct Metrics(BTreeMap<String, u64>);

impl Metrics {
    /// One `GET /metrics` over its own connection.
    pub fn fetch(addr: SocketAddr) -> anyhow::Result<Self> {
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let answer = crate::http::answer_until_close(addr, request.as_bytes())
            .with_context(|| format!("cannot scrape http://{addr}/metrics"))?;
        ensure!(
            answer.status == 200,
            "/metrics: {}",
            answer.head.lines().next().unwrap_or("")
        );
        Ok(Self::parse(&String::from_utf8_lossy(&answer.body)))
    }

    /// The samples of a body; comments and unparseable values are skipped.
    pub fn parse(body: &str) -> Self {
        Self(
            body.lines()
                .filter(|line| !line.starts_with('#'))
                .filter_map(|line| line.rsplit_once(' '))
                .filter_map(|(series, value)| Some((series.to_owned(), value.parse().ok()?)))
                .collect(),
        )
    }

    /// Every sample, by series.
    pub fn samples(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0
            .iter()
            .map(|(series, &value)| (series.as_str(), value))
    }

    /// The value of one series (`name` or `name{label="…"}`, exactly as the server writes it).
    pub fn get(&self, series: &str) -> Option<u64> {
        self.0.get(series).copied()
    }

    /// The value of one series; an error naming it when the server has none.
    pub fn value(&self, series: &str) -> anyhow::Result<u64> {
        self.get(series)
            .with_context(|| format!("/metrics has no {series}"))
    }

    /// The sum of every series of `name` whose labels contain `label` (all of them for ""), or
    /// `None` when there is none.
    pub fn sum_where(&self, name: &str, label: &str) -> Option<u64> {
        self.samples()
            .filter(|(series, _)| series.split('{').next() == Some(name) && series.contains(label))
            .map(|(_, value)| value)
            .reduce(|a, b| a + b)
    }

    /// The sum of every series of `name` (all label sets), or `None` when the metric is absent.
    pub fn sum(&self, name: &str) -> Option<u64> {
        self.sum_where(name, "")
    }
}

impl std::ops::Index<&str> for Metrics {
    type Output = u64;

    /// The value of one series; panics naming it when the server has none (for tests).
    fn index(&self, series: &str) -> &u64 {
        self.0
            .get(series)
            .unwrap_or_else(|| panic!("/metrics has no {series}"))
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn series_values_and_sums() {
        let metrics = Metrics::parse(
            "# HELP a_total x\na_total{queue=\"q\"} 2\na_total{queue=\"r\"} 3\nb 7\nc NaN\n",
        );
        assert_eq!(metrics.get("b"), Some(7));
        assert_eq!(metrics["a_total{queue=\"q\"}"], 2);
        assert_eq!(metrics.sum("a_total"), Some(5));
        assert_eq!(metrics.sum_where("a_total", "queue=\"r\""), Some(3));
        assert_eq!(metrics.get("c"), None);
        assert!(metrics.value("d").is_err());
    }
}
