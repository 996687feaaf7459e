//! The HTTP calls the tools make as any client would: one keep-alive HTTP/1.1 client, and the
//! Subscription requests every tool needs (create, delete, a websocket binding token).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::Value;

use crate::common::fhir::FHIR_JSON;
use crate::common::{run_bounded, snippet};

/// One keep-alive HTTP/1.1 client for all of a tool's requests, as a typical integration
/// client would use: up to `idle_per_host` idle connections kept, each request bounded by
/// `timeout`.
pub fn http_client(idle_per_host: usize, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(idle_per_host)
        .timeout(timeout)
        .build()
        .context("building the HTTP client")
}

/// The body of a 2xx answer; any other status is an error naming `what` was being done, with
/// the start of the body.
pub async fn success_text(response: reqwest::Response, what: &str) -> anyhow::Result<String> {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{what}: HTTP {status}: {}", snippet(&text));
    }
    Ok(text)
}

/// Creates a subscription (`POST {base}/Subscription`) and returns its id.
pub async fn create_subscription(
    client: &reqwest::Client,
    bearer: &str,
    base: &str,
    body: &Value,
) -> anyhow::Result<String> {
    let response = client
        .post(format!("{base}/Subscription"))
        .header(AUTHORIZATION, bearer)
        .header(CONTENT_TYPE, FHIR_JSON)
        .body(body.to_string())
        .send()
        .await
        .context("creating a subscription")?;
    let text = success_text(response, "creating a subscription").await?;
    let created: Value = serde_json::from_str(&text).context("reading the subscription")?;
    created["id"]
        .as_str()
        .map(str::to_string)
        .context("the created subscription has no id")
}

/// Deletes a run's subscriptions, `concurrency` at a time; a failure is a warning, since the
/// run's figures are already out.
pub async fn delete_subscriptions(
    client: &reqwest::Client,
    bearer: &str,
    base: &str,
    ids: &[String],
    concurrency: usize,
) {
    let ids = Arc::new(ids.to_vec());
    let result = run_bounded(ids.len(), concurrency, |i| {
        let request = client
            .delete(format!("{base}/Subscription/{}", ids[i]))
            .header(AUTHORIZATION, bearer);
        async move {
            let response = request.send().await?;
            if !response.status().is_success() {
                bail!("HTTP {}", response.status());
            }
            Ok(())
        }
    })
    .await;
    if let Err(e) = result {
        eprintln!("warning: deleting the subscriptions failed: {e:#}");
    }
}

/// A single-use websocket binding token and the socket to present it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub token: String,
    pub websocket_url: String,
}

/// `GET {base}/Subscription/{id}/$get-ws-binding-token`.
pub async fn binding_token(
    client: &reqwest::Client,
    bearer: &str,
    base: &str,
    subscription: &str,
) -> anyhow::Result<Binding> {
    let response = client
        .get(format!(
            "{base}/Subscription/{subscription}/$get-ws-binding-token"
        ))
        .header(AUTHORIZATION, bearer)
        .send()
        .await
        .context("getting a binding token")?;
    let text = success_text(response, "getting a binding token").await?;
    let parameters: Value = serde_json::from_str(&text).context("reading the binding token")?;
    read_binding(&parameters).context("no token or websocket-url in the binding answer")
}

/// The `token` and `websocket-url` of a `$get-ws-binding-token` answer.
fn read_binding(parameters: &Value) -> Option<Binding> {
    let find = |name: &str, field: &str| {
        parameters["parameter"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)?[field]
            .as_str()
            .map(str::to_string)
    };
    Some(Binding {
        token: find("token", "valueString")?,
        websocket_url: find("websocket-url", "valueUrl")
            .or_else(|| find("websocket-url", "valueString"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn binding_answers() {
        let answer = |url_field: &str| {
            json!({ "resourceType": "Parameters", "parameter": [
                { "name": "token", "valueString": "t1" },
                { "name": "expiration", "valueDateTime": "2026-01-01T00:00:00Z" },
                { "name": "websocket-url", url_field: "ws://h/fhir/ws" },
            ]})
        };
        let expected = Some(Binding {
            token: "t1".into(),
            websocket_url: "ws://h/fhir/ws".into(),
        });
        assert_eq!(read_binding(&answer("valueUrl")), expected);
        assert_eq!(read_binding(&answer("valueString")), expected);
        assert_eq!(read_binding(&answer("valueCode")), None);
        assert_eq!(read_binding(&json!({})), None);
    }
}
