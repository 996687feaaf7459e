//! What the campaign sends to and reads from Baton: tokens, Task and Subscription bodies,
//! notification Bundles, and small parsing helpers. Pure functions, no IO.

use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use serde_json::{Value, json};

pub const FHIR_JSON: &str = "application/fhir+json";
const FILTER_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
const PAYLOAD_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
const TIMEOUT_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-timeout";
/// The code system that tags every Task of a run, so subscriptions hear only this run's Tasks.
pub const RUN_SYSTEM: &str = "https://baton.dev/fault-campaign";

/// An HS256 JWT with the claims Baton requires of an admin (`sub`, `exp`, `role`). Admins are
/// neither rate-limited nor held to a subscription quota, so the campaign measures faults,
/// not limits.
pub fn mint_admin_token(secret: &str) -> anyhow::Result<String> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::{Hmac, Mac};

    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 6 * 3600;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = json!({ "sub": "baton-fault", "exp": exp, "role": "admin" });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .context("the JWT secret cannot key HMAC-SHA256")?;
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{signing_input}.{signature}"))
}

/// A Task of this run. `marker` goes into `description`, so that each acknowledged write can
/// later be recognised in the Task's history.
pub fn task_body(id: Option<&str>, run: &str, owner: &str, marker: &str) -> Value {
    let mut task = json!({
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": { "coding": [{ "system": RUN_SYSTEM, "code": run }] },
        "owner": { "reference": owner },
        "description": marker,
    });
    if let Some(id) = id {
        task["id"] = json!(id);
    }
    task
}

/// How a subscription is delivered.
pub enum Channel<'a> {
    RestHook {
        endpoint: &'a str,
        timeout: Option<u32>,
    },
    WebSocket,
    Message {
        endpoint: &'a str,
    },
}

/// A `task-changed` subscription filtered on this run's code, with id-only content (each event
/// then names its Task and version, which is all the campaign checks).
pub fn subscription_body(base: &str, run: &str, reason: &str, channel: Channel<'_>) -> Value {
    let mut body = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": reason,
        "criteria": format!("{base}/SubscriptionTopic/task-changed"),
        "_criteria": { "extension": [{
            "url": FILTER_EXTENSION,
            "valueString": format!("code={RUN_SYSTEM}|{run}"),
        }]},
    });
    let payload = json!({ "extension": [{ "url": PAYLOAD_EXTENSION, "valueCode": "id-only" }] });
    body["channel"] = match channel {
        Channel::RestHook { endpoint, timeout } => {
            let mut channel = json!({
                "type": "rest-hook",
                "endpoint": endpoint,
                "payload": FHIR_JSON,
                "_payload": payload,
            });
            if let Some(seconds) = timeout {
                channel["extension"] =
                    json!([{ "url": TIMEOUT_EXTENSION, "valueUnsignedInt": seconds }]);
            }
            channel
        }
        Channel::WebSocket => json!({
            "type": "websocket",
            "payload": FHIR_JSON,
            "_payload": payload,
        }),
        Channel::Message { endpoint } => json!({
            "type": "message",
            "endpoint": endpoint,
            "payload": FHIR_JSON,
            "_payload": payload,
        }),
    };
    body
}

/// `W/"3"` → 3.
pub fn etag_version(text: &str) -> Option<u32> {
    text.trim_start_matches("W/").trim_matches('"').parse().ok()
}

/// Parses `20s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration such as 20s, 500ms or 2m"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit '{unit}' in '{text}'; use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{text}': {e}"))
}

/// The first characters of a response body, for error messages.
pub fn snippet(body: &str) -> String {
    body.chars().take(300).collect()
}

// ---------------------------------------------------------------------------------------------
// Notification Bundles, read with typed structs that skip what the campaign does not need.

#[derive(Deserialize)]
struct WireBundle {
    #[serde(default)]
    entry: Vec<WireEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEntry {
    full_url: Option<String>,
    resource: Option<WireParameters>,
    response: Option<WireResponse>,
}

#[derive(Deserialize)]
struct WireParameters {
    #[serde(default)]
    parameter: Vec<WireParameter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireParameter {
    name: String,
    value_code: Option<String>,
    value_string: Option<String>,
    value_reference: Option<WireReference>,
    #[serde(default)]
    part: Vec<WireParameter>,
}

#[derive(Deserialize)]
struct WireReference {
    reference: Option<String>,
}

#[derive(Deserialize)]
struct WireResponse {
    etag: Option<String>,
}

/// One event of a notification: its number and the Task version it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenEvent {
    pub number: i64,
    pub task: String,
    pub version: u32,
}

/// What a notification Bundle (or a `$events` / `$status` answer) says.
#[derive(Debug, PartialEq, Eq)]
pub struct Notice {
    pub kind: NoticeKind,
    pub subscription: String,
    /// `events-since-subscription-start`: the highest event number the hub had assigned.
    pub events_since_start: i64,
    pub status: String,
    pub events: Vec<SeenEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    Handshake,
    Heartbeat,
    /// `event-notification` (a delivery) or `query-event` (a `$events` answer).
    Events,
    QueryStatus,
}

/// Reads a backport notification Bundle, or a `$status` answer, whose first entry is the status
/// `Parameters` (type,
/// subscription, `notification-event`s), then one entry per event whose `fullUrl` names the
/// Task and whose `response.etag` gives the version. `None` for anything malformed.
pub fn parse_notice(text: &[u8]) -> Option<Notice> {
    let bundle: WireBundle = serde_json::from_slice(text).ok()?;
    let entries = &bundle.entry;
    let parameters = &entries.first()?.resource.as_ref()?.parameter;
    let named = |name: &str| parameters.iter().find(|p| p.name == name);
    let kind = match named("type")?.value_code.as_deref()? {
        "handshake" => NoticeKind::Handshake,
        "heartbeat" => NoticeKind::Heartbeat,
        "event-notification" | "query-event" => NoticeKind::Events,
        "query-status" => NoticeKind::QueryStatus,
        _ => return None,
    };
    let subscription = named("subscription")?
        .value_reference
        .as_ref()?
        .reference
        .as_deref()?
        .rsplit('/')
        .next()?
        .to_string();
    let events_since_start = named("events-since-subscription-start")?
        .value_string
        .as_deref()?
        .parse()
        .ok()?;
    let status = named("status")
        .and_then(|p| p.value_code.clone())
        .unwrap_or_default();
    let mut events = Vec::new();
    if kind == NoticeKind::Events {
        let numbered = parameters.iter().filter(|p| p.name == "notification-event");
        for (index, event) in numbered.enumerate() {
            let part = |name: &str| event.part.iter().find(|p| p.name == name);
            let number = part("event-number")?
                .value_string
                .as_deref()?
                .parse()
                .ok()?;
            let focus = part("focus")?
                .value_reference
                .as_ref()?
                .reference
                .as_deref()?;
            let task = focus.split("/Task/").nth(1)?.split('/').next()?.to_string();
            let entry = entries.get(index + 1)?;
            if entry.full_url.as_deref()?.rsplit('/').next()? != task {
                return None;
            }
            let version = etag_version(entry.response.as_ref()?.etag.as_deref()?)?;
            events.push(SeenEvent {
                number,
                task,
                version,
            });
        }
    }
    Some(Notice {
        kind,
        subscription,
        events_since_start,
        status,
        events,
    })
}

/// Whether a body is a FHIR OperationOutcome with at least one issue.
pub fn is_operation_outcome(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        v["resourceType"] == "OperationOutcome"
            && v["issue"].as_array().is_some_and(|i| !i.is_empty())
    })
}

/// The `token` and `websocket-url` of a `$get-ws-binding-token` answer.
pub fn binding(parameters: &Value) -> Option<(String, String)> {
    let find = |name: &str, field: &str| {
        parameters["parameter"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)?[field]
            .as_str()
            .map(str::to_string)
    };
    let token = find("token", "valueString")?;
    let url = find("websocket-url", "valueUrl").or_else(|| find("websocket-url", "valueString"))?;
    Some((token, url))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(kind: &str, events: &[(i64, &str, u32)]) -> Vec<u8> {
        let mut parameter = vec![
            json!({ "name": "subscription", "valueReference": { "reference": "http://h/fhir/Subscription/s1" } }),
            json!({ "name": "status", "valueCode": "active" }),
            json!({ "name": "type", "valueCode": kind }),
            json!({ "name": "events-since-subscription-start", "valueString": "9" }),
        ];
        let mut entry = vec![json!({})];
        for (number, task, version) in events {
            parameter.push(json!({ "name": "notification-event", "part": [
                { "name": "event-number", "valueString": number.to_string() },
                { "name": "focus", "valueReference": { "reference": format!("http://h/fhir/Task/{task}") } },
            ]}));
            entry.push(json!({
                "fullUrl": format!("http://h/fhir/Task/{task}"),
                "response": { "status": "200", "etag": format!("W/\"{version}\"") },
            }));
        }
        entry[0] = json!({ "resource": { "resourceType": "Parameters", "parameter": parameter } });
        serde_json::to_vec(&json!({ "resourceType": "Bundle", "entry": entry })).unwrap()
    }

    #[test]
    fn notices() {
        let seen = |n: i64, t: &str, v: u32| SeenEvent {
            number: n,
            task: t.into(),
            version: v,
        };
        // A Bundle and what it should read as (None: refused as malformed).
        type Case = (Vec<u8>, Option<(NoticeKind, Vec<SeenEvent>)>);
        let cases: Vec<Case> = vec![
            (
                bundle("handshake", &[]),
                Some((NoticeKind::Handshake, vec![])),
            ),
            (
                bundle("heartbeat", &[]),
                Some((NoticeKind::Heartbeat, vec![])),
            ),
            (
                bundle("event-notification", &[(3, "a", 1), (4, "b", 2)]),
                Some((NoticeKind::Events, vec![seen(3, "a", 1), seen(4, "b", 2)])),
            ),
            (
                bundle("query-event", &[(7, "a", 5)]),
                Some((NoticeKind::Events, vec![seen(7, "a", 5)])),
            ),
            (bundle("something-else", &[]), None),
            (b"not json".to_vec(), None),
        ];
        for (body, expected) in cases {
            let got = parse_notice(&body).map(|n| {
                assert_eq!(n.subscription, "s1");
                assert_eq!(n.events_since_start, 9);
                (n.kind, n.events)
            });
            assert_eq!(got, expected, "{}", String::from_utf8_lossy(&body));
        }
    }

    #[test]
    fn durations_and_etags() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3h").is_err());
        assert_eq!(etag_version("W/\"12\""), Some(12));
        assert_eq!(etag_version("nonsense"), None);
    }
}
