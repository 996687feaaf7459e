//! The FHIR calls the campaign makes besides the load itself: subscriptions, `$status`,
//! `$events`, binding tokens, and reading back what the store holds after recovery.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_tools::common::api::{create_subscription, http_client};
use baton_tools::common::fhir::etag_version;
use baton_tools::common::notification::{NotificationType, read_notification};
use baton_tools::common::snippet;
use serde_json::Value;

use crate::fhir::RUN_SYSTEM;
use crate::verify::{Arrival, Truth, Via};

/// Most events one `$events` call returns (the hub's page size).
const EVENTS_PAGE: i64 = 100;

#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    /// `Bearer …` of an admin token.
    pub bearer: String,
    /// The FHIR base of each node; set-up and checks use the first one that answers.
    pub bases: Vec<String>,
    /// This run's code: every Task of the run carries it.
    pub run: String,
}

impl Api {
    pub fn new(bearer: String, bases: Vec<String>, run: String) -> anyhow::Result<Api> {
        let client = http_client(usize::MAX, Duration::from_secs(10))?;
        Ok(Api {
            client,
            bearer,
            bases,
            run,
        })
    }

    pub fn base(&self) -> &str {
        &self.bases[0]
    }

    async fn get_json(&self, url: &str) -> anyhow::Result<(reqwest::StatusCode, Vec<u8>)> {
        let response = self
            .client
            .get(url)
            .header(reqwest::header::AUTHORIZATION, &self.bearer)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .context("reading a response")?
            .to_vec();
        Ok((status, body))
    }

    /// Retries a read until it succeeds or `within` passes: the checks run right after faults,
    /// while a node may still be coming back.
    async fn get_ok(&self, url: &str, within: Duration) -> anyhow::Result<Vec<u8>> {
        let deadline = Instant::now() + within;
        loop {
            let outcome = self.get_json(url).await;
            match outcome {
                Ok((status, body)) if status.is_success() => return Ok(body),
                Ok((status, body)) if Instant::now() >= deadline => {
                    bail!(
                        "GET {url}: HTTP {status}: {}",
                        snippet(&String::from_utf8_lossy(&body))
                    )
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Creates a subscription and returns its id.
    pub async fn create_subscription(&self, body: &Value) -> anyhow::Result<String> {
        create_subscription(&self.client, &self.bearer, self.base(), body).await
    }

    /// The subscription's `$status`: its status code and `events-since-subscription-start`.
    pub async fn status(&self, subscription: &str) -> anyhow::Result<(String, i64)> {
        let url = format!("{}/Subscription/{subscription}/$status", self.base());
        let body = self.get_ok(&url, Duration::from_secs(30)).await?;
        let status = read_notification(&body)
            .filter(|n| n.kind == NotificationType::QueryStatus)
            .and_then(|n| Some((n.status.unwrap_or_default(), n.events_since_start?)));
        status.with_context(|| {
            format!(
                "unexpected $status answer: {}",
                snippet(&String::from_utf8_lossy(&body))
            )
        })
    }

    /// Waits until a subscription is `active` (its handshake was accepted).
    pub async fn wait_active(&self, subscription: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let (status, _) = self.status(subscription).await?;
            if status == "active" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("Subscription/{subscription} still '{status}' after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Events `since..=until` from the durable event log (`$events`), in pages.
    pub async fn replay(
        &self,
        subscription: &str,
        since: i64,
        until: i64,
    ) -> anyhow::Result<Vec<Arrival>> {
        let mut arrivals = Vec::new();
        let mut from = since.max(1);
        while from <= until {
            let to = (from + EVENTS_PAGE - 1).min(until);
            let url = format!(
                "{}/Subscription/{subscription}/$events?eventsSinceNumber={from}&eventsUntilNumber={to}&content=id-only",
                self.base()
            );
            let body = self.get_ok(&url, Duration::from_secs(30)).await?;
            let notice = read_notification(&body).with_context(|| {
                format!(
                    "unexpected $events answer: {}",
                    snippet(&String::from_utf8_lossy(&body))
                )
            })?;
            arrivals.extend(notice.events.into_iter().map(|e| Arrival {
                number: e.number,
                task: e.task,
                version: e.version,
                via: Via::Replay,
            }));
            from = to + 1;
        }
        Ok(arrivals)
    }

    /// Every Task of the run and its current version, by search.
    pub async fn truth(&self) -> anyhow::Result<Truth> {
        let mut truth = Truth::default();
        let mut url = Some(format!(
            "{}/Task?code={RUN_SYSTEM}|{}&_count=500",
            self.base(),
            self.run
        ));
        while let Some(next) = url.take() {
            let body = self.get_ok(&next, Duration::from_secs(30)).await?;
            let page: Value = serde_json::from_slice(&body).context("reading a search page")?;
            for entry in page["entry"].as_array().into_iter().flatten() {
                let resource = &entry["resource"];
                let (Some(id), Some(version)) = (
                    resource["id"].as_str(),
                    resource["meta"]["versionId"]
                        .as_str()
                        .and_then(|v| v.parse().ok()),
                ) else {
                    bail!("a search entry without id or versionId: {entry}");
                };
                truth.versions.insert(id.to_string(), version);
            }
            url = next_page(&page);
        }
        Ok(truth)
    }

    /// Each version of a Task and the marker (`description`) it holds.
    pub async fn history(&self, task: &str) -> anyhow::Result<BTreeMap<u32, String>> {
        let mut versions = BTreeMap::new();
        let mut url = Some(format!("{}/Task/{task}/_history?_count=1000", self.base()));
        while let Some(next) = url.take() {
            let body = self.get_ok(&next, Duration::from_secs(30)).await?;
            let page: Value = serde_json::from_slice(&body).context("reading a history page")?;
            for entry in page["entry"].as_array().into_iter().flatten() {
                let resource = &entry["resource"];
                let version = resource["meta"]["versionId"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .or_else(|| entry["response"]["etag"].as_str().and_then(etag_version));
                if let Some(version) = version {
                    let marker = resource["description"].as_str().unwrap_or_default();
                    versions.insert(version, marker.to_string());
                }
            }
            url = next_page(&page);
        }
        Ok(versions)
    }

    /// `/readyz` of one node, as JSON (`None` when it does not answer).
    pub async fn readyz(&self, root: &str) -> Option<(u16, Value)> {
        let response = self
            .client
            .get(format!("{root}/readyz"))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        Some((status, body))
    }
}

/// The `next` link of a search or history Bundle.
fn next_page(page: &Value) -> Option<String> {
    page["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")?["url"]
        .as_str()
        .map(str::to_string)
}
