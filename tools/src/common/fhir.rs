//! The FHIR the tools write: Task bodies, backport Subscriptions and their channels, and the
//! small readings of what comes back (ETag versions, Task ids in URLs). Pure, no IO.

use serde_json::{Value, json};

pub const FHIR_JSON: &str = "application/fhir+json";
const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";

/// `W/"3"` → 3.
pub fn etag_version(text: &str) -> Option<u32> {
    text.trim_start_matches("W/").trim_matches('"').parse().ok()
}

/// The Task id in a reference, `fullUrl` or `Location`: `…/Task/{id}`, `…/Task/{id}/_history/3`
/// or `Task/{id}`.
pub fn task_id(url: &str) -> Option<&str> {
    let after = url
        .strip_prefix("Task/")
        .or_else(|| url.split_once("/Task/").map(|(_, after)| after))?;
    after.split('/').next().filter(|id| !id.is_empty())
}

/// A `requested` order Task owned by `owner`; with `id` for a PUT, with `description` to tell
/// versions apart.
pub fn task_body(owner: &str, id: Option<&str>, description: Option<&str>) -> Value {
    let mut task = json!({
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "owner": { "reference": owner },
    });
    if let Some(id) = id {
        task["id"] = json!(id);
    }
    if let Some(description) = description {
        task["description"] = json!(description);
    }
    task
}

/// How a subscription is delivered. Every channel carries id-only content: each event then
/// names its Task and version, which is all the tools check.
pub enum Channel<'a> {
    RestHook {
        endpoint: &'a str,
        /// `backport-timeout` in seconds (the hub's default without it).
        timeout: Option<u32>,
    },
    WebSocket,
    Message {
        endpoint: &'a str,
        /// `backport-max-count` (the hub's `delivery.default_max_count` without it).
        max_count: Option<u32>,
    },
}

impl Channel<'_> {
    fn json(&self) -> Value {
        let payload = json!({ "extension": [{ "url": format!("{BACKPORT}/backport-payload-content"), "valueCode": "id-only" }] });
        let (kind, endpoint, extension) = match self {
            Channel::RestHook { endpoint, timeout } => (
                "rest-hook",
                Some(endpoint),
                timeout.map(|t| ("backport-timeout", json!({ "valueUnsignedInt": t }))),
            ),
            Channel::WebSocket => ("websocket", None, None),
            Channel::Message {
                endpoint,
                max_count,
            } => (
                "message",
                Some(endpoint),
                max_count.map(|n| ("backport-max-count", json!({ "valuePositiveInt": n }))),
            ),
        };
        let mut channel = json!({ "type": kind });
        if let Some(endpoint) = endpoint {
            channel["endpoint"] = json!(endpoint);
        }
        channel["payload"] = json!(FHIR_JSON);
        channel["_payload"] = payload;
        if let Some((name, mut value)) = extension {
            value["url"] = json!(format!("{BACKPORT}/{name}"));
            channel["extension"] = json!([value]);
        }
        channel
    }
}

/// A `task-changed` Subscription on `base`'s own topic, optionally filtered
/// (`backport-filter-criteria`, e.g. `owner=Practitioner/7`).
pub fn subscription_body(
    base: &str,
    reason: &str,
    filter: Option<&str>,
    channel: Channel<'_>,
) -> Value {
    let mut body = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": reason,
        "criteria": format!("{base}/SubscriptionTopic/task-changed"),
    });
    if let Some(filter) = filter {
        body["_criteria"] = json!({ "extension": [{
            "url": format!("{BACKPORT}/backport-filter-criteria"),
            "valueString": filter,
        }]});
    }
    body["channel"] = channel.json();
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_task_ids() {
        assert_eq!(etag_version("W/\"12\""), Some(12));
        assert_eq!(etag_version("\"3\""), Some(3));
        assert_eq!(etag_version("nonsense"), None);
        let cases = [
            ("http://h/fhir/Task/abc", Some("abc")),
            ("http://h/fhir/Task/abc/_history/2", Some("abc")),
            ("Task/abc", Some("abc")),
            ("http://h/fhir/Task/", None),
            ("http://h/fhir/Subscription/abc", None),
        ];
        for (url, expected) in cases {
            assert_eq!(task_id(url), expected, "{url}");
        }
    }

    #[test]
    fn subscriptions() {
        let rest = subscription_body(
            "http://h/fhir",
            "why",
            Some("owner=Practitioner/1"),
            Channel::RestHook {
                endpoint: "http://r/hook",
                timeout: Some(2),
            },
        );
        assert_eq!(
            rest["criteria"],
            "http://h/fhir/SubscriptionTopic/task-changed"
        );
        assert_eq!(
            rest["_criteria"]["extension"][0]["valueString"],
            "owner=Practitioner/1"
        );
        assert_eq!(rest["channel"]["type"], "rest-hook");
        assert_eq!(rest["channel"]["endpoint"], "http://r/hook");
        assert_eq!(
            rest["channel"]["_payload"]["extension"][0]["valueCode"],
            "id-only"
        );
        assert_eq!(
            rest["channel"]["extension"][0],
            json!({ "valueUnsignedInt": 2, "url": format!("{BACKPORT}/backport-timeout") })
        );
        let socket = subscription_body("http://h/fhir", "why", None, Channel::WebSocket);
        assert!(socket.get("_criteria").is_none());
        assert!(socket["channel"].get("endpoint").is_none());
        assert!(socket["channel"].get("extension").is_none());
        let message = subscription_body(
            "http://h/fhir",
            "why",
            None,
            Channel::Message {
                endpoint: "amqp://b/%2f?exchange=x",
                max_count: Some(1),
            },
        );
        assert_eq!(message["channel"]["type"], "message");
        assert_eq!(message["channel"]["extension"][0]["valuePositiveInt"], 1);
    }
}
