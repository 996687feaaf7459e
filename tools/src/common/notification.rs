//! The one reader of what the hub sends: a backport notification Bundle (rest-hook body,
//! websocket frame, AMQP message), or a `$status` / `$events` answer of the same shape. Entry 0
//! is the status `Parameters` (subscription, topic, status, type,
//! events-since-subscription-start, one `notification-event` per event with its number and
//! focus); each event then has an entry whose `fullUrl` names the Task and whose
//! `response.etag` gives the version the event is about.
//!
//! It reads typed structs that skip what the tools do not need: the load generators share the
//! cores with the server, and such a parse costs much less than a `serde_json::Value`.

use std::collections::HashSet;

use serde::Deserialize;

use crate::common::fhir::{etag_version, task_id};

/// The `type` of a notification or status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationType {
    Handshake,
    Heartbeat,
    EventNotification,
    /// A `$status` answer.
    QueryStatus,
    /// An `$events` answer.
    QueryEvent,
}

impl NotificationType {
    fn from_code(code: &str) -> Option<NotificationType> {
        Some(match code {
            "handshake" => NotificationType::Handshake,
            "heartbeat" => NotificationType::Heartbeat,
            "event-notification" => NotificationType::EventNotification,
            "query-status" => NotificationType::QueryStatus,
            "query-event" => NotificationType::QueryEvent,
            _ => return None,
        })
    }

    /// Whether Bundles of this type list events (a delivery or an `$events` answer).
    pub fn carries_events(self) -> bool {
        matches!(
            self,
            NotificationType::EventNotification | NotificationType::QueryEvent
        )
    }
}

/// What one notification Bundle says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub kind: NotificationType,
    /// The subscription's id (the last segment of its reference).
    pub subscription: String,
    /// The topic's canonical URL, when the hub sends it.
    pub topic: Option<String>,
    /// The subscription's status code (`active`, `error`, …).
    pub status: Option<String>,
    /// `events-since-subscription-start`: the highest event number the hub had assigned.
    pub events_since_start: Option<i64>,
    /// The events, in the Bundle's order (empty unless `kind.carries_events()`).
    pub events: Vec<NotificationEvent>,
}

/// One event of a notification: its number and the Task version it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationEvent {
    pub number: i64,
    /// The focus reference as sent, e.g. `http://h/fhir/Task/abc`.
    pub focus: String,
    pub task: String,
    pub version: u32,
}

/// Reads a notification Bundle; `None` for anything malformed: not JSON, no status
/// `Parameters`, an unknown type, no subscription, or an event without a number, a Task focus
/// or an entry that agrees with it and gives its version.
pub fn read_notification(body: &[u8]) -> Option<Notification> {
    let bundle: WireBundle = serde_json::from_slice(body).ok()?;
    let parameters = &bundle.entry.first()?.resource.as_ref()?.parameter;
    let named = |name: &str| parameters.iter().find(|p| p.name == name);
    let kind = NotificationType::from_code(named("type")?.value_code.as_deref()?)?;
    let subscription = named("subscription")?
        .value_reference
        .as_ref()?
        .reference
        .as_deref()?
        .rsplit('/')
        .next()?
        .to_string();
    let topic = named("topic").and_then(|p| p.value_canonical.clone());
    let status = named("status").and_then(|p| p.value_code.clone());
    let events_since_start = match named("events-since-subscription-start") {
        Some(p) => Some(p.value_string.as_deref()?.parse().ok()?),
        None => None,
    };
    let mut events = Vec::new();
    if kind.carries_events() {
        let numbered = parameters.iter().filter(|p| p.name == "notification-event");
        for (index, event) in numbered.enumerate() {
            events.push(read_event(event, bundle.entry.get(index + 1)?)?);
        }
    }
    Some(Notification {
        kind,
        subscription,
        topic,
        status,
        events_since_start,
        events,
    })
}

fn read_event(event: &WireParameter, entry: &WireEntry) -> Option<NotificationEvent> {
    let part = |name: &str| event.part.iter().find(|p| p.name == name);
    let number = part("event-number")?
        .value_string
        .as_deref()?
        .parse()
        .ok()?;
    let focus = part("focus")?.value_reference.as_ref()?.reference.clone()?;
    let task = task_id(&focus)?.to_string();
    if entry.full_url.as_deref()?.rsplit('/').next()? != task {
        return None;
    }
    let version = etag_version(entry.response.as_ref()?.etag.as_deref()?)?;
    Some(NotificationEvent {
        number,
        focus,
        task,
        version,
    })
}

/// What one subscription's event numbers, in arrival order, say about its stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NumberCheck {
    /// Numbers not above the one before them.
    pub out_of_order: u64,
    /// Numbers received more than once, beyond the first.
    pub repeated: u64,
    /// Numbers never received, from `first` (or the lowest received) to the highest.
    pub holes: u64,
}

impl NumberCheck {
    /// Checks `numbers`; holes count from `first` when the stream must start there (a
    /// subscription heard from its start), else from the lowest number received.
    pub fn of(numbers: &[i64], first: Option<i64>) -> NumberCheck {
        let distinct: HashSet<i64> = numbers.iter().copied().collect();
        let holes = match (
            first.or_else(|| distinct.iter().min().copied()),
            distinct.iter().max(),
        ) {
            (Some(low), Some(&high)) => (low..=high).filter(|n| !distinct.contains(n)).count(),
            _ => 0,
        };
        NumberCheck {
            out_of_order: numbers.windows(2).filter(|w| w[1] <= w[0]).count() as u64,
            repeated: (numbers.len() - distinct.len()) as u64,
            holes: holes as u64,
        }
    }
}

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
    value_canonical: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A Bundle as the hub builds it (`src/fhir/notification.rs`), with id-only entries.
    fn bundle(kind: &str, events: &[(i64, &str, u32)]) -> Value {
        let mut parameter = vec![
            json!({ "name": "subscription", "valueReference": { "reference": "http://h/fhir/Subscription/s1" } }),
            json!({ "name": "topic", "valueCanonical": "http://h/fhir/SubscriptionTopic/task-changed" }),
            json!({ "name": "status", "valueCode": "active" }),
            json!({ "name": "type", "valueCode": kind }),
            json!({ "name": "events-since-subscription-start", "valueString": "9" }),
        ];
        let mut entry = vec![Value::Null];
        for (number, task, version) in events {
            parameter.push(json!({ "name": "notification-event", "part": [
                { "name": "event-number", "valueString": number.to_string() },
                { "name": "timestamp", "valueInstant": "2026-01-01T00:00:00Z" },
                { "name": "focus", "valueReference": { "reference": format!("http://h/fhir/Task/{task}"), "type": "Task" } },
            ]}));
            entry.push(json!({
                "fullUrl": format!("http://h/fhir/Task/{task}"),
                "request": { "method": "PUT", "url": format!("Task/{task}") },
                "response": { "status": "200", "etag": format!("W/\"{version}\"") },
            }));
        }
        entry[0] = json!({ "fullUrl": "urn:uuid:1", "resource": { "resourceType": "Parameters", "parameter": parameter } });
        json!({ "resourceType": "Bundle", "type": "subscription-notification", "entry": entry })
    }

    fn read(bundle: &Value) -> Option<Notification> {
        read_notification(&serde_json::to_vec(bundle).unwrap())
    }

    fn event(number: i64, task: &str, version: u32) -> NotificationEvent {
        NotificationEvent {
            number,
            focus: format!("http://h/fhir/Task/{task}"),
            task: task.into(),
            version,
        }
    }

    #[test]
    fn types_and_events() {
        use NotificationType::*;
        // A Bundle and what it reads as (None: refused as malformed).
        type Case = (Value, Option<(NotificationType, Vec<NotificationEvent>)>);
        let cases: Vec<Case> = vec![
            (bundle("handshake", &[]), Some((Handshake, vec![]))),
            (bundle("heartbeat", &[]), Some((Heartbeat, vec![]))),
            (
                bundle("event-notification", &[(3, "a", 1), (4, "b", 2)]),
                Some((EventNotification, vec![event(3, "a", 1), event(4, "b", 2)])),
            ),
            (
                bundle("query-event", &[(7, "a", 5)]),
                Some((QueryEvent, vec![event(7, "a", 5)])),
            ),
            (bundle("query-status", &[]), Some((QueryStatus, vec![]))),
            (bundle("something-else", &[]), None),
        ];
        for (body, expected) in cases {
            let got = read(&body).map(|n| {
                assert_eq!(n.subscription, "s1");
                assert_eq!(
                    n.topic.as_deref(),
                    Some("http://h/fhir/SubscriptionTopic/task-changed")
                );
                assert_eq!(n.status.as_deref(), Some("active"));
                assert_eq!(n.events_since_start, Some(9));
                (n.kind, n.events)
            });
            assert_eq!(got, expected, "{body}");
        }
    }

    #[test]
    fn malformed_bundles() {
        let good = bundle("event-notification", &[(3, "a", 1)]);
        let broken = |path: &str, value: Value| {
            let mut b = good.clone();
            *b.pointer_mut(path).unwrap() = value;
            b
        };
        let cases = [
            (
                "no subscription",
                broken("/entry/0/resource/parameter/0/name", json!("x")),
            ),
            (
                "no type",
                broken("/entry/0/resource/parameter/3/name", json!("x")),
            ),
            (
                "a number that is not one",
                broken(
                    "/entry/0/resource/parameter/5/part/0/valueString",
                    json!("three"),
                ),
            ),
            (
                "a focus that is not a Task",
                broken(
                    "/entry/0/resource/parameter/5/part/2/valueReference/reference",
                    json!("http://h/fhir/Patient/a"),
                ),
            ),
            (
                "an entry for another Task",
                broken("/entry/1/fullUrl", json!("http://h/fhir/Task/b")),
            ),
            (
                "an entry without a version",
                broken("/entry/1/response/etag", json!("none")),
            ),
            (
                "a count that is not one",
                broken("/entry/0/resource/parameter/4/valueString", json!("many")),
            ),
            ("an event without its entry", {
                let mut b = good.clone();
                b["entry"].as_array_mut().unwrap().pop();
                b
            }),
        ];
        assert!(read(&good).is_some());
        for (name, body) in cases {
            assert_eq!(read(&body), None, "{name}");
        }
        assert_eq!(read_notification(b"not json"), None);
        // Optional parameters may be absent.
        let mut bare = good.clone();
        let parameters = bare["entry"][0]["resource"]["parameter"]
            .as_array_mut()
            .unwrap();
        parameters.retain(|p| {
            !["topic", "status", "events-since-subscription-start"]
                .contains(&p["name"].as_str().unwrap())
        });
        let n = read(&bare).expect("still a notification");
        assert_eq!(
            (n.topic, n.status, n.events_since_start),
            (None, None, None)
        );
    }

    #[test]
    fn number_checks() {
        let cases: [(&[i64], Option<i64>, NumberCheck); 6] = [
            (&[1, 2, 3], Some(1), NumberCheck::default()),
            (&[], Some(1), NumberCheck::default()),
            (
                &[2, 3],
                Some(1),
                NumberCheck {
                    holes: 1,
                    ..NumberCheck::default()
                },
            ),
            (&[2, 3], None, NumberCheck::default()),
            (
                &[1, 3, 2, 3],
                Some(1),
                NumberCheck {
                    out_of_order: 1,
                    repeated: 1,
                    holes: 0,
                },
            ),
            (
                &[5, 7],
                None,
                NumberCheck {
                    holes: 1,
                    ..NumberCheck::default()
                },
            ),
        ];
        for (numbers, first, expected) in cases {
            assert_eq!(
                NumberCheck::of(numbers, first),
                expected,
                "{numbers:?} from {first:?}"
            );
        }
    }
}
