//! What both benchmarks do to the server: this run's Tasks (created, then updated), and what
//! the server says about itself (`/metrics`, `/proc/<pid>/status`).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use baton_tools::common::api::{http_client, success_text};
use baton_tools::common::fhir::{FHIR_JSON, etag_version, task_body};
use baton_tools::common::run_bounded;
use baton_tools::common::target::Target;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, ETAG};

use crate::ADMIN;

/// The ids and owners of one run's Tasks: `fo-<run>-<i>` owned by `Practitioner/fo-<run>-<i mod owners>`.
pub struct Names {
    pub run: String,
}

impl Names {
    pub fn new() -> Names {
        Names {
            run: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        }
    }

    pub fn task(&self, i: usize) -> String {
        format!("fo-{}-{i}", self.run)
    }

    pub fn owner(&self, i: usize) -> String {
        format!("Practitioner/fo-{}-{i}", self.run)
    }

    /// The index of one of this run's Tasks, from its id.
    pub fn task_index(&self, id: &str) -> Option<u32> {
        id.strip_prefix("fo-")?
            .strip_prefix(self.run.as_str())?
            .strip_prefix('-')?
            .parse()
            .ok()
    }
}

/// The server, and how many requests at once set a run up: flattened into every subcommand.
#[derive(clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub target: Target,
    /// Concurrent requests while creating Tasks and Subscriptions and binding sockets.
    #[arg(long, default_value_t = 32)]
    pub setup_concurrency: usize,
}

/// Requests to one server as one admin.
#[derive(Clone)]
pub struct Server {
    pub client: reqwest::Client,
    pub bearer: Arc<String>,
    pub base: Arc<String>,
    /// Where `/metrics` is.
    pub root: Arc<String>,
}

impl Server {
    /// The target's server, called with up to `connections` at once (requests time out
    /// after a minute).
    pub fn new(target: &Target, connections: usize) -> anyhow::Result<Server> {
        Ok(Server {
            client: http_client(connections, Duration::from_secs(60))?,
            bearer: Arc::new(target.bearer(&ADMIN)?),
            base: Arc::new(target.base().to_string()),
            root: Arc::new(target.root().to_string()),
        })
    }

    /// Creates Task i (PUT to a new id) for i in 0..n, owned by owner `owner_of(i)`.
    pub async fn create_tasks(
        &self,
        names: &Names,
        n: usize,
        owner_of: impl Fn(usize) -> usize,
        concurrency: usize,
    ) -> anyhow::Result<()> {
        run_bounded(n, concurrency, |i| {
            let id = names.task(i);
            let body = task_body(&names.owner(owner_of(i)), Some(&id), Some("fan-out"));
            let request = self
                .client
                .put(format!("{}/Task/{id}", self.base))
                .header(AUTHORIZATION, self.bearer.as_str())
                .header(CONTENT_TYPE, FHIR_JSON)
                .body(body.to_string());
            async move {
                let response = request.send().await.context("creating a Task")?;
                success_text(response, "creating a Task").await?;
                Ok(())
            }
        })
        .await?;
        Ok(())
    }

    /// One Task update (PUT); returns its version, or why it did not count.
    pub async fn update_task(
        &self,
        names: &Names,
        task: usize,
        owner: usize,
        k: u64,
    ) -> Result<u32, String> {
        let id = names.task(task);
        let body = task_body(&names.owner(owner), Some(&id), Some(&format!("update {k}")));
        let response = self
            .client
            .put(format!("{}/Task/{id}", self.base))
            .header(AUTHORIZATION, self.bearer.as_str())
            .header(CONTENT_TYPE, FHIR_JSON)
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "transport: timeout".to_string()
                } else {
                    "transport: error".to_string()
                }
            })?;
        let status = response.status();
        let version = response
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(etag_version);
        let _ = response.bytes().await;
        match (status.is_success(), version) {
            (true, Some(version)) => Ok(version),
            (true, None) => Err("2xx without ETag".into()),
            _ => Err(format!("HTTP {}", status.as_u16())),
        }
    }

    /// Lines of the server's /metrics that concern these channels.
    pub async fn metrics_lines(&self, channel: &str) -> Vec<String> {
        let Ok(response) = self
            .client
            .get(format!("{}/metrics", self.root))
            .send()
            .await
        else {
            return vec!["(metrics unavailable)".into()];
        };
        let text = response.text().await.unwrap_or_default();
        let channel_label = format!("channel=\"{channel}\"");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.starts_with("baton_websocket")
                    || (l.starts_with("baton_deliveries_total") && l.contains(&channel_label))
                    || l.starts_with("baton_events_total")
                    || l.starts_with("baton_events_withheld_total")
            })
            .map(str::to_string)
            .collect()
    }
}

/// A metric's value from `metrics_lines`, summed over its label sets.
pub fn metric_sum(lines: &[String], name: &str) -> Option<f64> {
    let values: Vec<f64> = lines
        .iter()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A line of `/proc/<pid>/status` in KiB, e.g. `VmRSS`.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_metrics() {
        let names = Names { run: "r1".into() };
        assert_eq!(names.task(7), "fo-r1-7");
        assert_eq!(names.owner(7), "Practitioner/fo-r1-7");
        assert_eq!(names.task_index("fo-r1-7"), Some(7));
        assert_eq!(names.task_index("fo-r2-7"), None);
        let lines: Vec<String> = [
            "baton_events_total 12",
            "baton_deliveries_total{channel=\"websocket\",outcome=\"ok\"} 3",
            "baton_deliveries_total{channel=\"websocket\",outcome=\"failed\"} 1",
            "baton_events_total_other 99",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(metric_sum(&lines, "baton_events_total"), Some(12.0));
        assert_eq!(metric_sum(&lines, "baton_deliveries_total"), Some(4.0));
        assert_eq!(metric_sum(&lines, "baton_websocket_connections"), None);
    }
}
