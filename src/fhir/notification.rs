//! Subscription notification shapes (R4 Backport IG 1.1.0): the `Parameters` status resource
//! and the `history` Bundles for handshakes, heartbeats, events, `$status` and `$events`.

/// `channel.payload` content levels (backport-payload-content).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentLevel {
    Empty,
    IdOnly,
    FullResource,
}

impl ContentLevel {
    pub fn parse(code: &str) -> Option<ContentLevel> {
        match code {
            "empty" => Some(ContentLevel::Empty),
            "id-only" => Some(ContentLevel::IdOnly),
            "full-resource" => Some(ContentLevel::FullResource),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ContentLevel::Empty => "empty",
            ContentLevel::IdOnly => "id-only",
            ContentLevel::FullResource => "full-resource",
        }
    }
}

/// `subscription-notification-type` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotificationType {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryStatus,
    QueryEvent,
}

impl NotificationType {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationType::Handshake => "handshake",
            NotificationType::Heartbeat => "heartbeat",
            NotificationType::EventNotification => "event-notification",
            NotificationType::QueryStatus => "query-status",
            NotificationType::QueryEvent => "query-event",
        }
    }
}

/// R4 `Subscription.status` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubscriptionStatus {
    Requested,
    Active,
    Error,
    Off,
}

impl SubscriptionStatus {
    pub fn parse(code: &str) -> Option<SubscriptionStatus> {
        match code {
            "requested" => Some(SubscriptionStatus::Requested),
            "active" => Some(SubscriptionStatus::Active),
            "error" => Some(SubscriptionStatus::Error),
            "off" => Some(SubscriptionStatus::Off),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Requested => "requested",
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Error => "error",
            SubscriptionStatus::Off => "off",
        }
    }
}

use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::fhir::ids::{EventNumber, StoredInstant, SubscriptionId, TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::fhir::json::write_json;

/// The profile every status `Parameters` claims, so validators check it against the backport IG.
pub const STATUS_PROFILE: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4";

/// On a status's `error` parameter: when something last reached the endpoint (handshake,
/// heartbeat or events), absent if nothing ever did.
pub const LAST_DELIVERED_EXTENSION: &str =
    "https://baton.dev/fhir/StructureDefinition/last-delivered";

/// On a `$status` answer's `events-since-subscription-start` parameter: how many of those
/// events have reached the endpoint (rest-hook and AMQP; the position delivery has
/// confirmed), so that the backlog is the difference. Left out of notifications, whose
/// receiver is the endpoint itself.
pub const EVENTS_DELIVERED_EXTENSION: &str =
    "https://baton.dev/fhir/StructureDefinition/events-delivered";

/// The code system of the `error` parameter's coding.
pub const SUBSCRIPTION_ERROR_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/subscription-error";

/// What a notification says about its subscription at the moment it is generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSnapshot<'a> {
    pub subscription_id: &'a SubscriptionId,
    pub topic_url: &'a str,
    pub status: SubscriptionStatus,
    /// Events generated since the subscription started, delivered or not. Handshakes,
    /// heartbeats and queries never increment it.
    pub events_since_start: EventNumber,
    pub notification_type: NotificationType,
    /// The last delivery error as a short text. See [`error_code`] for how the text is coded.
    pub error: Option<&'a str>,
    /// When something last reached the subscription's endpoint (an instant), told with the
    /// error so that an operator sees how long it has been failing.
    pub last_delivered: Option<&'a str>,
}

/// One event of the subscription's event log, as a notification reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NotificationEvent<'a> {
    pub event_number: EventNumber,
    /// The instant the Task change was recorded, which is a FHIR `instant` as stored.
    pub timestamp: &'a StoredInstant,
    pub task_id: &'a TaskId,
    /// The Task version the event produced (for a delete, the tombstone's version).
    pub version: Version,
    pub interaction: Interaction,
    /// The Task version the event is about; `None` for deletes or when it was not loaded.
    pub resource: Option<&'a Value>,
}

/// Builds the R4 status resource (a `Parameters` with the `backport-subscription-status-r4`
/// profile) for `status` and `events`.
///
/// Handshakes and heartbeats carry no `notification-event`, whatever `events` holds, because
/// the Inferno kit and most receivers treat an event in them as a delivered event. `empty`
/// leaves out the topic and every focus, because either may reveal PHI on a channel that was
/// only trusted with "something changed".
pub fn status_parameters(
    base_url: &str,
    status: &StatusSnapshot,
    events: &[NotificationEvent],
    content: ContentLevel,
) -> Value {
    let topic = content != ContentLevel::Empty;
    build_parameters(base_url, None, status, events, content, topic)
}

/// Builds a notification Bundle (R4 backport: type `history`, the status `Parameters` first)
/// for handshakes, heartbeats, event notifications and `$events` answers.
///
/// Every entry carries `request` and `response`, because R4 history Bundles require both
/// (`bdl-3`, `bdl-4`) and the Inferno kit fails a notification without them. When several events
/// concern the same Task, each keeps its own entry so that every version is reported.
pub fn notification_bundle(
    base_url: &str,
    bundle_id: &str,
    now: &str,
    status: &StatusSnapshot,
    events: &[NotificationEvent],
    content: ContentLevel,
) -> Value {
    let status_id = Uuid::new_v4().to_string();
    notification_bundle_with_status_id(
        base_url, bundle_id, now, &status_id, status, events, content,
    )
}

/// `notification_bundle` with the status entry's id given (`notification_bundle` draws a
/// random one), so that two ways of building the same notification can be compared.
pub fn notification_bundle_with_status_id(
    base_url: &str,
    bundle_id: &str,
    now: &str,
    status_id: &str,
    status: &StatusSnapshot,
    events: &[NotificationEvent],
    content: ContentLevel,
) -> Value {
    let base = base_url.trim_end_matches('/');
    let mut entries = vec![status_entry(base, status_id, status, events, content)];
    if lists_event_entries(status, content) {
        entries.extend(events.iter().map(|event| event_entry(base, event, content)));
    }
    json!({
        "resourceType": "Bundle",
        "id": bundle_id,
        "type": "history",
        "timestamp": now,
        "entry": entries,
    })
}

/// One event's Bundle entry, serialised: what `notification_bundle` puts in its `entry` for
/// it, and what [`notification_bundle_bytes`] takes. It does not depend on the subscription,
/// so one change heard by many subscriptions needs it built once per content level.
pub fn event_entry_bytes(
    base_url: &str,
    event: &NotificationEvent,
    content: ContentLevel,
) -> Vec<u8> {
    let base = base_url.trim_end_matches('/');
    serde_json::to_vec(&event_entry(base, event, content)).unwrap_or_default()
}

/// The notification Bundle serialised, byte for byte what `serde_json::to_vec` gives for
/// [`notification_bundle_with_status_id`] with the same arguments, but with each event's
/// entry given already serialised (`entries[i]` is [`event_entry_bytes`] of `events[i]`):
/// only the status entry, which is the subscription's own, is written here, straight to
/// bytes (`write_status_entry`).
#[allow(clippy::too_many_arguments)]
pub fn notification_bundle_bytes(
    base_url: &str,
    bundle_id: &str,
    now: &str,
    status_id: &str,
    status: &StatusSnapshot,
    events: &[NotificationEvent],
    content: ContentLevel,
    entries: &[&[u8]],
) -> Vec<u8> {
    let base = base_url.trim_end_matches('/');
    let listed = if lists_event_entries(status, content) {
        entries
    } else {
        &[]
    };
    let mut out = Vec::with_capacity(1024 + listed.iter().map(|e| e.len() + 1).sum::<usize>());
    // The same keys, in the same order, as `notification_bundle_with_status_id`'s `json!`
    // (serde_json keeps insertion order here: the `preserve_order` feature).
    out.extend_from_slice(br#"{"resourceType":"Bundle","id":"#);
    write_json(&mut out, &bundle_id);
    out.extend_from_slice(br#","type":"history","timestamp":"#);
    write_json(&mut out, &now);
    out.extend_from_slice(br#","entry":["#);
    write_status_entry(&mut out, base, status_id, status, events, content);
    for entry in listed {
        out.push(b',');
        out.extend_from_slice(entry);
    }
    out.extend_from_slice(b"]}");
    out
}

/// Writes what `serde_json` writes for [`status_entry`], without building it as a `Value`.
///
/// Under a broad fan-out every notification needs its own status entry (its subscription,
/// counter and event numbers), and building it as a `Value` (a map per object, a `String`
/// per key) and then serialising it was the largest part of a notification's CPU
/// (BENCHMARKS.md, issue 15: ~8 % of the server beside the websocket fan-out). The keys come
/// in the same order as the `json!` of `status_entry` and `build_parameters`;
/// `tests::the_status_entry_is_written_as_serde_json_writes_it` holds the two together.
fn write_status_entry(
    out: &mut Vec<u8>,
    base: &str,
    status_id: &str,
    status: &StatusSnapshot,
    events: &[NotificationEvent],
    content: ContentLevel,
) {
    let base = base.trim_end_matches('/');
    let subscription = format!("{base}/Subscription/{}", status.subscription_id);
    out.extend_from_slice(br#"{"fullUrl":"#);
    write_json(out, &format_args!("urn:uuid:{status_id}"));
    out.extend_from_slice(br#","resource":{"resourceType":"Parameters","id":"#);
    write_json(out, &status_id);
    out.extend_from_slice(br#","meta":{"profile":["#);
    write_json(out, &STATUS_PROFILE);
    out.extend_from_slice(
        br#"]},"parameter":[{"name":"subscription","valueReference":{"reference":"#,
    );
    write_json(out, &subscription);
    out.extend_from_slice(b"}}");
    if content != ContentLevel::Empty {
        out.extend_from_slice(br#",{"name":"topic","valueCanonical":"#);
        write_json(out, &status.topic_url);
        out.push(b'}');
    }
    out.extend_from_slice(br#",{"name":"status","valueCode":"#);
    write_json(out, &status.status.as_str());
    out.extend_from_slice(br#"},{"name":"type","valueCode":"#);
    write_json(out, &status.notification_type.as_str());
    out.extend_from_slice(br#"},{"name":"events-since-subscription-start","valueString":"#);
    write_json(out, &format_args!("{}", status.events_since_start));
    out.push(b'}');
    if carries_events(status.notification_type) {
        for event in events {
            out.extend_from_slice(
                br#",{"name":"notification-event","part":[{"name":"event-number","valueString":"#,
            );
            write_json(out, &format_args!("{}", event.event_number));
            out.extend_from_slice(br#"},{"name":"timestamp","valueInstant":"#);
            write_json(out, event.timestamp);
            out.push(b'}');
            if content != ContentLevel::Empty {
                out.extend_from_slice(br#",{"name":"focus","valueReference":{"reference":"#);
                write_json(out, &format_args!("{base}/Task/{}", event.task_id));
                out.extend_from_slice(br#","type":"Task"}}"#);
            }
            out.extend_from_slice(b"]}");
        }
    }
    if let Some(text) = status.error {
        out.extend_from_slice(br#",{"name":"error","valueCodeableConcept":{"coding":[{"system":"#);
        write_json(out, &SUBSCRIPTION_ERROR_SYSTEM);
        out.extend_from_slice(br#","code":"#);
        write_json(out, &error_code(text));
        out.extend_from_slice(br#"}],"text":"#);
        write_json(out, &text);
        out.push(b'}');
        if let Some(at) = status.last_delivered {
            out.extend_from_slice(br#","extension":[{"url":"#);
            write_json(out, &LAST_DELIVERED_EXTENSION);
            out.extend_from_slice(br#","valueInstant":"#);
            write_json(out, &at);
            out.extend_from_slice(b"}]");
        }
        out.push(b'}');
    }
    out.extend_from_slice(br#"]},"request":{"method":"GET","url":"#);
    write_json(out, &format_args!("{subscription}/$status"));
    out.extend_from_slice(br#"},"response":{"status":"200"}}"#);
}

/// Whether a notification lists its events as Bundle entries. The IG forbids any entry
/// besides the status for `empty`, and the status of a handshake or heartbeat lists no
/// events, so an entry there would describe nothing.
fn lists_event_entries(status: &StatusSnapshot, content: ContentLevel) -> bool {
    content != ContentLevel::Empty && carries_events(status.notification_type)
}

/// The notification's first entry: the status `Parameters`, as a `$status` read.
fn status_entry(
    base: &str,
    status_id: &str,
    status: &StatusSnapshot,
    events: &[NotificationEvent],
    content: ContentLevel,
) -> Value {
    let topic = content != ContentLevel::Empty;
    let parameters = build_parameters(base, Some(status_id), status, events, content, topic);
    json!({
        "fullUrl": format!("urn:uuid:{status_id}"),
        "resource": parameters,
        "request": {
            "method": "GET",
            "url": format!("{base}/Subscription/{}/$status", status.subscription_id),
        },
        "response": { "status": "200" },
    })
}

/// Builds the `$status` answer: a `searchset` Bundle with one `query-status` `Parameters` per
/// subscription.
///
/// The type is always `query-status`, whatever the snapshots say, because that is what `$status`
/// returns by definition. The topic is included: the caller asked the FHIR API directly, with
/// its own credentials, so the reason to hide it on an `empty` channel does not apply.
pub fn status_search_bundle(
    base_url: &str,
    bundle_id: &str,
    now: &str,
    statuses: &[StatusSnapshot],
) -> Value {
    let entries: Vec<Value> = statuses
        .iter()
        .map(|snapshot| {
            let snapshot = StatusSnapshot {
                notification_type: NotificationType::QueryStatus,
                ..*snapshot
            };
            let id = Uuid::new_v4().to_string();
            let parameters = build_parameters(
                base_url,
                Some(&id),
                &snapshot,
                &[],
                ContentLevel::Empty,
                true,
            );
            json!({
                "fullUrl": format!("urn:uuid:{id}"),
                "resource": parameters,
                "search": { "mode": "match" },
            })
        })
        .collect();
    json!({
        "resourceType": "Bundle",
        "id": bundle_id,
        "type": "searchset",
        "timestamp": now,
        "total": entries.len(),
        "entry": entries,
    })
}

/// Adds to each status of a `$status` Bundle (in the order of `delivered`, which is the
/// order of its snapshots) the events delivered so far, as the
/// [`EVENTS_DELIVERED_EXTENSION`] on `events-since-subscription-start`. A string, like the
/// count it qualifies, since both are 64-bit.
pub fn add_events_delivered(bundle: &mut Value, delivered: &[EventNumber]) {
    let Some(entries) = bundle["entry"].as_array_mut() else {
        return;
    };
    for (entry, delivered) in entries.iter_mut().zip(delivered) {
        let Some(parameters) = entry["resource"]["parameter"].as_array_mut() else {
            continue;
        };
        if let Some(since) = parameters
            .iter_mut()
            .find(|p| p["name"] == "events-since-subscription-start")
        {
            since["extension"] = json!([{
                "url": EVENTS_DELIVERED_EXTENSION,
                "valueString": delivered.to_string(),
            }]);
        }
    }
}

/// The `subscription-error` code for a delivery error text.
///
/// Delivery records errors as short texts, so the code is read from their agreed shape: a text
/// that starts with `HTTP ` (such as `HTTP 503 Service Unavailable`) means the endpoint answered
/// with an error; one that mentions DNS means its name did not resolve; anything else (a timeout,
/// a refused connection, a TLS failure, a broker that did not confirm) means no usable response.
pub fn error_code(text: &str) -> &'static str {
    if text.starts_with("HTTP ") {
        "error-response"
    } else if text.to_ascii_lowercase().contains("dns") {
        "dns-resolution-error"
    } else {
        "no-response"
    }
}

/// Whether a notification of this type lists events. Handshakes and heartbeats may in principle
/// repeat past events, but Baton never does: a receiver would take them for new ones.
fn carries_events(notification_type: NotificationType) -> bool {
    !matches!(
        notification_type,
        NotificationType::Handshake | NotificationType::Heartbeat
    )
}

fn build_parameters(
    base_url: &str,
    id: Option<&str>,
    status: &StatusSnapshot,
    events: &[NotificationEvent],
    content: ContentLevel,
    topic: bool,
) -> Value {
    let base = base_url.trim_end_matches('/');
    let mut parameter = vec![json!({
        "name": "subscription",
        "valueReference": {
            "reference": format!("{base}/Subscription/{}", status.subscription_id),
        },
    })];
    if topic {
        parameter.push(json!({ "name": "topic", "valueCanonical": status.topic_url }));
    }
    parameter.push(json!({ "name": "status", "valueCode": status.status.as_str() }));
    parameter.push(json!({ "name": "type", "valueCode": status.notification_type.as_str() }));
    parameter.push(json!({
        "name": "events-since-subscription-start",
        "valueString": status.events_since_start.to_string(),
    }));
    if carries_events(status.notification_type) {
        for event in events {
            let mut part = vec![
                json!({ "name": "event-number", "valueString": event.event_number.to_string() }),
                json!({ "name": "timestamp", "valueInstant": event.timestamp }),
            ];
            if content != ContentLevel::Empty {
                part.push(json!({
                    "name": "focus",
                    "valueReference": {
                        "reference": format!("{base}/Task/{}", event.task_id),
                        "type": "Task",
                    },
                }));
            }
            parameter.push(json!({ "name": "notification-event", "part": part }));
        }
    }
    if let Some(text) = status.error {
        let mut error = json!({
            "name": "error",
            "valueCodeableConcept": {
                "coding": [{ "system": SUBSCRIPTION_ERROR_SYSTEM, "code": error_code(text) }],
                "text": text,
            },
        });
        if let Some(at) = status.last_delivered {
            error["extension"] = json!([{ "url": LAST_DELIVERED_EXTENSION, "valueInstant": at }]);
        }
        parameter.push(error);
    }
    let mut resource = Map::new();
    resource.insert("resourceType".into(), json!("Parameters"));
    if let Some(id) = id {
        // The IG examples give the status the same id as its `urn:uuid` fullUrl, which keeps
        // validators from reporting a fullUrl that disagrees with the resource id.
        resource.insert("id".into(), json!(id));
    }
    resource.insert("meta".into(), json!({ "profile": [STATUS_PROFILE] }));
    resource.insert("parameter".into(), Value::Array(parameter));
    Value::Object(resource)
}

/// The Bundle entry for one event: the Task's URL, the interaction as a history request and
/// response, and for `full-resource` the Task version itself.
fn event_entry(base: &str, event: &NotificationEvent, content: ContentLevel) -> Value {
    let task = event.task_id;
    let (method, url, status) = match event.interaction {
        Interaction::Create => ("POST", "Task".to_string(), "201"),
        Interaction::Update => ("PUT", format!("Task/{task}"), "200"),
        Interaction::Delete => ("DELETE", format!("Task/{task}"), "204"),
        // An overdue event changes nothing: the entry points at the version that went overdue.
        Interaction::Overdue => ("GET", format!("Task/{task}"), "200"),
    };
    let mut entry = Map::new();
    entry.insert("fullUrl".into(), json!(format!("{base}/Task/{task}")));
    // A delete has no content to show; a resource the caller could not load is reported
    // through request and response alone, as the IG allows.
    if content == ContentLevel::FullResource
        && event.interaction != Interaction::Delete
        && let Some(resource) = event.resource
    {
        entry.insert("resource".into(), resource.clone());
    }
    entry.insert("request".into(), json!({ "method": method, "url": url }));
    entry.insert(
        "response".into(),
        json!({ "status": status, "etag": format!("W/\"{}\"", event.version) }),
    );
    Value::Object(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "https://hub.example.org/fhir";
    const SUB: &str = "sub-7";
    const TOPIC: &str = "https://hub.example.org/fhir/SubscriptionTopic/task-changed";
    const NOW: &str = "2025-06-01T10:15:04Z";

    /// A fixture that lives as long as the test run, as the snapshots' borrows want.
    fn fixed<T>(value: T) -> &'static T {
        Box::leak(Box::new(value))
    }

    fn task_id(id: &str) -> &'static TaskId {
        fixed(TaskId::parse(id).unwrap())
    }

    fn at(instant: &str) -> &'static StoredInstant {
        fixed(StoredInstant::parse(instant).unwrap())
    }

    fn sub_id(id: &str) -> &'static SubscriptionId {
        fixed(SubscriptionId::parse(id).unwrap())
    }

    fn task(id: &str, version: i64) -> Value {
        json!({
            "resourceType": "Task",
            "id": id,
            "meta": { "versionId": version.to_string() },
            "status": "requested",
            "intent": "order",
        })
    }

    /// Three events: task-a created and then updated (two versions of the same Task), and
    /// task-b deleted.
    fn events<'a>(a1: &'a Value, a2: &'a Value, b4: &'a Value) -> [NotificationEvent<'a>; 3] {
        [
            NotificationEvent {
                event_number: EventNumber::new(7),
                timestamp: at("2025-06-01T10:15:01Z"),
                task_id: task_id("task-a"),
                version: Version::new(1),
                interaction: Interaction::Create,
                resource: Some(a1),
            },
            NotificationEvent {
                event_number: EventNumber::new(8),
                timestamp: at("2025-06-01T10:15:02Z"),
                task_id: task_id("task-a"),
                version: Version::new(2),
                interaction: Interaction::Update,
                resource: Some(a2),
            },
            // A caller that hands over the last version for a delete must still not see it sent.
            NotificationEvent {
                event_number: EventNumber::new(9),
                timestamp: at("2025-06-01T10:15:03Z"),
                task_id: task_id("task-b"),
                version: Version::new(4),
                interaction: Interaction::Delete,
                resource: Some(b4),
            },
        ]
    }

    /// The status each notification type is checked against, as the Inferno kit expects:
    /// `requested` for handshakes and `active` for events; the others vary to cover `error`.
    fn snapshot(notification_type: NotificationType) -> StatusSnapshot<'static> {
        let (status, since, error) = match notification_type {
            NotificationType::Handshake => (SubscriptionStatus::Requested, 0, None),
            NotificationType::QueryEvent => (
                SubscriptionStatus::Error,
                9,
                Some("HTTP 503 Service Unavailable"),
            ),
            _ => (SubscriptionStatus::Active, 9, None),
        };
        StatusSnapshot {
            subscription_id: sub_id(SUB),
            topic_url: TOPIC,
            status,
            events_since_start: EventNumber::new(since),
            notification_type,
            error,
            last_delivered: None,
        }
    }

    fn named<'v>(parameters: &'v Value, name: &str) -> Vec<&'v Value> {
        parameters["parameter"]
            .as_array()
            .expect("parameter array")
            .iter()
            .filter(|p| p["name"] == name)
            .collect()
    }

    fn part<'v>(event: &'v Value, name: &str) -> Option<&'v Value> {
        event["part"].as_array()?.iter().find(|p| p["name"] == name)
    }

    /// The shared building (event entries serialised once, spliced into each subscription's
    /// Bundle) gives byte for byte the Bundle built whole, for every content level and
    /// notification type, with a create, an update, a delete that was handed its last
    /// version, and an event whose version was not found; and one set of entries serves
    /// two subscriptions with different statuses.
    #[test]
    fn shared_event_entries_give_byte_identical_notifications() {
        let (a1, a2, b4) = (task("task-a", 1), task("task-a", 2), task("task-b", 4));
        let mut events = events(&a1, &a2, &b4).to_vec();
        events.push(NotificationEvent {
            event_number: EventNumber::new(10),
            timestamp: at("2025-06-01T10:15:04Z"),
            task_id: task_id("task-c"),
            version: Version::new(1),
            interaction: Interaction::Overdue,
            resource: None,
        });
        let types = [
            NotificationType::Handshake,
            NotificationType::Heartbeat,
            NotificationType::EventNotification,
            NotificationType::QueryEvent,
        ];
        for content in [
            ContentLevel::Empty,
            ContentLevel::IdOnly,
            ContentLevel::FullResource,
        ] {
            // Built once per content level, as the hub's shared parts keep them.
            let shared: Vec<Vec<u8>> = events
                .iter()
                .map(|e| event_entry_bytes(&format!("{BASE}/"), e, content))
                .collect();
            let shared: Vec<&[u8]> = shared.iter().map(Vec::as_slice).collect();
            for notification_type in types {
                for subscription in [SUB, "another-subscription"] {
                    let status = StatusSnapshot {
                        subscription_id: sub_id(subscription),
                        ..snapshot(notification_type)
                    };
                    let whole = serde_json::to_vec(&notification_bundle_with_status_id(
                        BASE, "bundle-1", NOW, "status-1", &status, &events, content,
                    ))
                    .unwrap();
                    let spliced = notification_bundle_bytes(
                        BASE, "bundle-1", NOW, "status-1", &status, &events, content, &shared,
                    );
                    assert_eq!(
                        String::from_utf8(spliced).unwrap(),
                        String::from_utf8(whole).unwrap(),
                        "{} {} {subscription}",
                        content.as_str(),
                        notification_type.as_str()
                    );
                }
            }
        }
    }

    /// Applies what the Inferno kit's `notification_verification` and its per-content-level
    /// conformance tests check, plus the entry shapes Baton promises, to one notification.
    fn check_notification(content: ContentLevel, notification_type: NotificationType) {
        let (a1, a2, b4) = (task("task-a", 1), task("task-a", 2), task("task-b", 4));
        let events = events(&a1, &a2, &b4);
        let status = snapshot(notification_type);
        let bundle = notification_bundle(BASE, "bundle-1", NOW, &status, &events, content);
        let label = format!("{} {}", content.as_str(), notification_type.as_str());

        assert_eq!(bundle["resourceType"], "Bundle", "{label}");
        assert_eq!(bundle["id"], "bundle-1", "{label}");
        assert_eq!(bundle["type"], "history", "{label}");
        assert_eq!(bundle["timestamp"], NOW, "{label}");
        let entries = bundle["entry"].as_array().expect("entries");
        assert!(!entries.is_empty(), "{label}");
        for entry in entries {
            assert!(entry["request"].is_object(), "{label}: request on {entry}");
            assert!(
                entry["response"].is_object(),
                "{label}: response on {entry}"
            );
        }

        // Entry 0: the status, addressed as a `$status` read.
        let first = &entries[0];
        assert_eq!(first["request"]["method"], "GET", "{label}");
        let url = first["request"]["url"].as_str().unwrap();
        assert!(
            url.ends_with(&format!("Subscription/{SUB}/$status")),
            "{label}: {url}"
        );
        assert_eq!(url, format!("{BASE}/Subscription/{SUB}/$status"), "{label}");
        assert_eq!(first["response"]["status"], "200", "{label}");
        let parameters = &first["resource"];
        assert_eq!(parameters["resourceType"], "Parameters", "{label}");
        assert_eq!(
            parameters["meta"]["profile"],
            json!([STATUS_PROFILE]),
            "{label}"
        );
        let full_url = first["fullUrl"].as_str().unwrap();
        let uuid = full_url
            .strip_prefix("urn:uuid:")
            .expect("urn:uuid fullUrl");
        assert!(Uuid::parse_str(uuid).is_ok(), "{label}: {full_url}");
        assert_eq!(parameters["id"], uuid, "{label}");

        // The parameters the kit reads: subscription, type, status and the counter.
        let subscription = named(parameters, "subscription");
        assert_eq!(subscription.len(), 1, "{label}");
        let reference = subscription[0]["valueReference"]["reference"]
            .as_str()
            .unwrap();
        assert_eq!(reference, format!("{BASE}/Subscription/{SUB}"), "{label}");
        assert_eq!(reference.rsplit('/').next(), Some(SUB), "{label}");
        let code = |name: &str| {
            named(parameters, name)
                .first()
                .map(|p| p["valueCode"].clone())
        };
        assert_eq!(
            code("type"),
            Some(json!(notification_type.as_str())),
            "{label}"
        );
        assert_eq!(
            code("status"),
            Some(json!(status.status.as_str())),
            "{label}"
        );
        let since = named(parameters, "events-since-subscription-start");
        assert_eq!(since.len(), 1, "{label}");
        assert_eq!(
            since[0]["valueString"],
            status.events_since_start.to_string(),
            "{label}"
        );
        let all = serde_json::to_string(&bundle).unwrap();
        assert!(
            !all.contains("eventsInNotification") && !all.contains("events-in-notification"),
            "{label}"
        );

        let errors = named(parameters, "error");
        match status.error {
            Some(text) => {
                assert_eq!(errors.len(), 1, "{label}");
                let concept = &errors[0]["valueCodeableConcept"];
                assert_eq!(concept["text"], text, "{label}");
                assert_eq!(
                    concept["coding"][0]["system"], SUBSCRIPTION_ERROR_SYSTEM,
                    "{label}"
                );
                assert_eq!(concept["coding"][0]["code"], "error-response", "{label}");
            }
            None => assert!(errors.is_empty(), "{label}"),
        }

        let topic = named(parameters, "topic");
        if content == ContentLevel::Empty {
            assert!(
                topic.is_empty(),
                "{label}: empty SHOULD NOT reveal the topic"
            );
        } else {
            assert_eq!(topic.len(), 1, "{label}");
            assert_eq!(topic[0]["valueCanonical"], TOPIC, "{label}");
        }

        // Events: none for handshakes and heartbeats, one per event otherwise.
        let notified = named(parameters, "notification-event");
        let lists_events = !matches!(
            notification_type,
            NotificationType::Handshake | NotificationType::Heartbeat
        );
        if !lists_events {
            assert!(notified.is_empty(), "{label}");
            assert_eq!(entries.len(), 1, "{label}: no event entries");
            return;
        }
        assert_eq!(notified.len(), events.len(), "{label}");
        for (event, expected) in notified.iter().zip(&events) {
            let number = part(event, "event-number").expect("event-number");
            assert_eq!(
                number["valueString"],
                expected.event_number.to_string(),
                "{label}"
            );
            let timestamp = part(event, "timestamp").expect("timestamp");
            assert_eq!(
                timestamp["valueInstant"],
                expected.timestamp.as_str(),
                "{label}"
            );
            assert!(part(event, "additional-context").is_none(), "{label}");
            let focus = part(event, "focus");
            if content == ContentLevel::Empty {
                assert!(focus.is_none(), "{label}: empty SHALL NOT have a focus");
                continue;
            }
            let focus = &focus.expect("focus SHALL be present")["valueReference"];
            assert_eq!(focus["type"], "Task", "{label}");
            let focus = focus["reference"].as_str().unwrap();
            assert_eq!(
                focus,
                format!("{BASE}/Task/{}", expected.task_id),
                "{label}"
            );
            // id-only: the focus is one of the entries' fullUrls. full-resource: the kit's rule,
            // that the reference contains `Type/id` of an included resource (deletes excepted,
            // since a deleted Task has no content to include).
            assert!(
                entries.iter().any(|e| e["fullUrl"] == focus),
                "{label}: {focus}"
            );
            if content == ContentLevel::FullResource && expected.interaction != Interaction::Delete
            {
                assert!(
                    entries.iter().any(|e| {
                        let r = &e["resource"];
                        r["resourceType"].is_string()
                            && focus.contains(&format!(
                                "{}/{}",
                                r["resourceType"].as_str().unwrap(),
                                r["id"].as_str().unwrap_or("")
                            ))
                    }),
                    "{label}: focus {focus} resolves to no resource"
                );
            }
        }

        // Event entries: none for empty; otherwise one per event, in order, even for the same Task.
        let extra = &entries[1..];
        if content == ContentLevel::Empty {
            assert!(extra.is_empty(), "{label}: empty SHALL NOT add entries");
            return;
        }
        assert_eq!(extra.len(), events.len(), "{label}");
        let expected_shapes = [
            ("POST", "Task", "201", "W/\"1\""),
            ("PUT", "Task/task-a", "200", "W/\"2\""),
            ("DELETE", "Task/task-b", "204", "W/\"4\""),
        ];
        for ((entry, event), (method, url, code, etag)) in
            extra.iter().zip(&events).zip(expected_shapes)
        {
            let full_url = entry["fullUrl"].as_str().unwrap_or("");
            assert_eq!(
                full_url,
                format!("{BASE}/Task/{}", event.task_id),
                "{label}"
            );
            assert_eq!(entry["request"]["method"], method, "{label}");
            assert_eq!(entry["request"]["url"], url, "{label}");
            assert_eq!(entry["response"]["status"], code, "{label}");
            assert_eq!(entry["response"]["etag"], etag, "{label}");
            let has_resource = entry.get("resource").is_some();
            match (content, event.interaction) {
                (ContentLevel::FullResource, Interaction::Delete) | (ContentLevel::IdOnly, _) => {
                    assert!(!has_resource, "{label}: {entry}");
                }
                _ => assert_eq!(entry["resource"], *event.resource.unwrap(), "{label}"),
            }
        }
    }

    macro_rules! notification_tests {
        ($($name:ident: $content:ident, $kind:ident;)*) => {$(
            #[test]
            fn $name() {
                check_notification(ContentLevel::$content, NotificationType::$kind);
            }
        )*};
    }

    notification_tests! {
        empty_handshake: Empty, Handshake;
        empty_heartbeat: Empty, Heartbeat;
        empty_event_notification: Empty, EventNotification;
        empty_query_status: Empty, QueryStatus;
        empty_query_event: Empty, QueryEvent;
        id_only_handshake: IdOnly, Handshake;
        id_only_heartbeat: IdOnly, Heartbeat;
        id_only_event_notification: IdOnly, EventNotification;
        id_only_query_status: IdOnly, QueryStatus;
        id_only_query_event: IdOnly, QueryEvent;
        full_resource_handshake: FullResource, Handshake;
        full_resource_heartbeat: FullResource, Heartbeat;
        full_resource_event_notification: FullResource, EventNotification;
        full_resource_query_status: FullResource, QueryStatus;
        full_resource_query_event: FullResource, QueryEvent;
    }

    #[test]
    fn a_resource_that_was_not_loaded_leaves_request_and_response() {
        let event = NotificationEvent {
            event_number: EventNumber::new(1),
            timestamp: at("2025-06-01T10:15:01Z"),
            task_id: task_id("task-c"),
            version: Version::new(3),
            interaction: Interaction::Update,
            resource: None,
        };
        let status = StatusSnapshot {
            events_since_start: EventNumber::new(1),
            ..snapshot(NotificationType::EventNotification)
        };
        let bundle = notification_bundle(
            BASE,
            "b",
            NOW,
            &status,
            &[event],
            ContentLevel::FullResource,
        );
        let entry = &bundle["entry"][1];
        assert_eq!(entry["fullUrl"], format!("{BASE}/Task/task-c"));
        assert!(entry.get("resource").is_none());
        assert_eq!(
            entry["request"],
            json!({ "method": "PUT", "url": "Task/task-c" })
        );
        assert_eq!(
            entry["response"],
            json!({ "status": "200", "etag": "W/\"3\"" })
        );
    }

    #[test]
    fn status_parameters_stand_alone_without_an_id() {
        let (a1, a2, b4) = (task("task-a", 1), task("task-a", 2), task("task-b", 4));
        let events = events(&a1, &a2, &b4);
        let status = snapshot(NotificationType::EventNotification);
        // A trailing slash on the base URL must not double up in references.
        let with_topic =
            status_parameters(&format!("{BASE}/"), &status, &events, ContentLevel::IdOnly);
        assert!(with_topic.get("id").is_none());
        assert_eq!(
            named(&with_topic, "subscription")[0]["valueReference"]["reference"],
            format!("{BASE}/Subscription/{SUB}")
        );
        assert_eq!(named(&with_topic, "notification-event").len(), 3);
        let names: Vec<&str> = with_topic["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "subscription",
                "topic",
                "status",
                "type",
                "events-since-subscription-start",
                "notification-event",
                "notification-event",
                "notification-event",
            ]
        );
        let empty = status_parameters(BASE, &status, &events, ContentLevel::Empty);
        assert!(named(&empty, "topic").is_empty());
    }

    #[test]
    fn every_notification_gets_a_fresh_status_uuid() {
        let status = snapshot(NotificationType::Heartbeat);
        let one = notification_bundle(BASE, "b", NOW, &status, &[], ContentLevel::Empty);
        let two = notification_bundle(BASE, "b", NOW, &status, &[], ContentLevel::Empty);
        assert_ne!(one["entry"][0]["fullUrl"], two["entry"][0]["fullUrl"]);
    }

    #[test]
    fn status_search_bundle_lists_one_query_status_per_subscription() {
        let statuses = [
            StatusSnapshot {
                subscription_id: sub_id("sub-1"),
                ..snapshot(NotificationType::EventNotification)
            },
            StatusSnapshot {
                subscription_id: sub_id("sub-2"),
                status: SubscriptionStatus::Error,
                error: Some("connection refused"),
                last_delivered: Some("2026-12-06T09:58:00.000Z"),
                ..snapshot(NotificationType::Heartbeat)
            },
        ];
        let bundle = status_search_bundle(BASE, "search-1", NOW, &statuses);
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["id"], "search-1");
        assert_eq!(bundle["type"], "searchset");
        assert_eq!(bundle["timestamp"], NOW);
        assert_eq!(bundle["total"], 2);
        let entries = bundle["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        for (entry, expected) in entries.iter().zip(&statuses) {
            assert_eq!(entry["search"], json!({ "mode": "match" }));
            let uuid = entry["fullUrl"]
                .as_str()
                .unwrap()
                .strip_prefix("urn:uuid:")
                .unwrap();
            assert!(Uuid::parse_str(uuid).is_ok());
            let parameters = &entry["resource"];
            assert_eq!(parameters["id"], uuid);
            assert_eq!(parameters["meta"]["profile"], json!([STATUS_PROFILE]));
            let reference = named(parameters, "subscription")[0]["valueReference"]["reference"]
                .as_str()
                .unwrap();
            assert!(reference.ends_with(&format!("/Subscription/{}", expected.subscription_id)));
            assert_eq!(named(parameters, "type")[0]["valueCode"], "query-status");
            assert_eq!(
                named(parameters, "status")[0]["valueCode"],
                expected.status.as_str()
            );
            assert_eq!(named(parameters, "topic")[0]["valueCanonical"], TOPIC);
            assert_eq!(
                named(parameters, "events-since-subscription-start")[0]["valueString"],
                "9"
            );
            assert!(named(parameters, "notification-event").is_empty());
        }
        let error = &named(&entries[1]["resource"], "error")[0]["valueCodeableConcept"];
        assert_eq!(error["text"], "connection refused");
        assert_eq!(error["coding"][0]["code"], "no-response");
        let error = named(&entries[1]["resource"], "error")[0];
        assert_eq!(error["extension"][0]["url"], LAST_DELIVERED_EXTENSION);
        assert_eq!(
            error["extension"][0]["valueInstant"],
            "2026-12-06T09:58:00.000Z"
        );
        assert!(named(&entries[0]["resource"], "error").is_empty());

        let none = status_search_bundle(BASE, "search-2", NOW, &[]);
        assert_eq!(none["total"], 0);
        assert_eq!(none["entry"], json!([]));
    }

    #[test]
    fn status_answers_say_how_many_events_were_delivered() {
        let statuses = [
            StatusSnapshot {
                subscription_id: sub_id("sub-1"),
                ..snapshot(NotificationType::QueryStatus)
            },
            StatusSnapshot {
                subscription_id: sub_id("sub-2"),
                ..snapshot(NotificationType::QueryStatus)
            },
        ];
        let mut bundle = status_search_bundle(BASE, "search-1", NOW, &statuses);
        add_events_delivered(
            &mut bundle,
            &[EventNumber::ZERO.saturating_add(7), EventNumber::ZERO],
        );
        let delivered: Vec<Value> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let since = named(&e["resource"], "events-since-subscription-start")[0];
                assert_eq!(since["valueString"], "9");
                assert_eq!(since["extension"][0]["url"], EVENTS_DELIVERED_EXTENSION);
                since["extension"][0]["valueString"].clone()
            })
            .collect();
        assert_eq!(delivered, [json!("7"), json!("0")]);
    }

    #[test]
    fn error_texts_map_to_subscription_error_codes() {
        let cases = [
            ("HTTP 500 Internal Server Error", "error-response"),
            ("HTTP 410", "error-response"),
            (
                "dns error: failed to lookup address information",
                "dns-resolution-error",
            ),
            ("DNS resolution failed", "dns-resolution-error"),
            ("timed out after 10s", "no-response"),
            ("connection refused", "no-response"),
            ("", "no-response"),
        ];
        for (text, code) in cases {
            assert_eq!(error_code(text), code, "{text}");
        }
    }

    /// Base URL, subscription id, status id, topic, error, last delivered, events since
    /// start, events (number, Task id), and the picks of status, type and content level.
    type StatusEntryInputs = (
        String,
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        i64,
        Vec<(i64, String)>,
        (usize, usize, usize),
    );

    /// Every input the status entry depends on, drawn at random, with text that needs
    /// escaping (quotes, backslashes, control characters, non-ASCII) wherever text goes.
    fn any_status_entry() -> impl proptest::strategy::Strategy<Value = StatusEntryInputs> {
        use proptest::prelude::*;
        (
            "https://[a-z.]{1,12}/fhir/{0,2}",
            "[A-Za-z0-9][A-Za-z0-9.-]{0,63}",
            "[a-f0-9-]{1,36}",
            ".{0,40}",
            proptest::option::of(prop_oneof![
                Just("HTTP 503 \"busy\"".to_string()),
                ".{0,40}"
            ]),
            proptest::option::of(".{0,30}"),
            0i64..i64::MAX,
            proptest::collection::vec((0i64..i64::MAX, "[A-Za-z0-9][A-Za-z0-9.-]{0,63}"), 0..5),
            (0usize..4, 0usize..5, 0usize..3),
        )
    }

    proptest::proptest! {
        /// The status entry written straight to bytes is byte for byte what `serde_json`
        /// writes for the `Value` built by `status_entry`, over every status, type and
        /// content level, with and without an error, events and escaping.
        #[test]
        fn the_status_entry_is_written_as_serde_json_writes_it(
            (base, subscription, status_id, topic, error, last_delivered, since, events, picks)
                in any_status_entry()
        ) {
            let statuses = [
                SubscriptionStatus::Requested,
                SubscriptionStatus::Active,
                SubscriptionStatus::Error,
                SubscriptionStatus::Off,
            ];
            let types = [
                NotificationType::Handshake,
                NotificationType::Heartbeat,
                NotificationType::EventNotification,
                NotificationType::QueryStatus,
                NotificationType::QueryEvent,
            ];
            let contents = [ContentLevel::Empty, ContentLevel::IdOnly, ContentLevel::FullResource];
            let subscription = SubscriptionId::parse(&subscription).unwrap();
            let timestamp = StoredInstant::parse("2025-06-01T10:15:01.123Z").unwrap();
            let task_ids: Vec<TaskId> =
                events.iter().map(|(_, id)| TaskId::parse(id).unwrap()).collect();
            let events: Vec<NotificationEvent> = events
                .iter()
                .zip(&task_ids)
                .map(|((number, _), task_id)| NotificationEvent {
                    event_number: EventNumber::new(*number),
                    timestamp: &timestamp,
                    task_id,
                    version: Version::new(1),
                    interaction: Interaction::Update,
                    resource: None,
                })
                .collect();
            let status = StatusSnapshot {
                subscription_id: &subscription,
                topic_url: &topic,
                status: statuses[picks.0],
                events_since_start: EventNumber::new(since),
                notification_type: types[picks.1],
                error: error.as_deref(),
                last_delivered: last_delivered.as_deref(),
            };
            let content = contents[picks.2];
            let trimmed = base.trim_end_matches('/');
            let built = serde_json::to_vec(
                &status_entry(trimmed, &status_id, &status, &events, content),
            )
            .unwrap();
            let mut written = Vec::new();
            write_status_entry(&mut written, &base, &status_id, &status, &events, content);
            proptest::prop_assert_eq!(
                String::from_utf8(written).unwrap(),
                String::from_utf8(built).unwrap()
            );
        }
    }
}
