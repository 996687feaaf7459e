//! What one delivery pays to build its notification Bundle and serialise it to bytes, for
//! `id-only` and `full-resource` payloads, with one event and with a full batch of twenty
//! (a subscription's `maxCount`).
//!
//! The timed part mirrors delivery: a fresh bundle id, `notification_bundle`, then
//! `serde_json::to_vec`. A second group leaves out the serialisation to show how the cost
//! divides between the two.
//!
//! Run with `cargo bench --bench bundles -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use baton::fhir::ids::{EventNumber, StoredInstant, SubscriptionId, TaskId, Version};
use baton::fhir::interaction::Interaction;
use baton::fhir::notification::{
    ContentLevel, NotificationEvent, NotificationType, StatusSnapshot, SubscriptionStatus,
    notification_bundle,
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

const BASE: &str = "https://hub.example.org/fhir";
const NOW: &str = "2025-06-01T10:15:04.512Z";
const SUBSCRIPTION: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
const TOPIC: &str = "https://hub.example.org/fhir/SubscriptionTopic/task-changed";

/// Events per bundle: a single notification, and a full batch.
const BATCHES: &[usize] = &[1, 20];

const CONTENTS: &[ContentLevel] = &[ContentLevel::IdOnly, ContentLevel::FullResource];

/// A realistic Task version: identifiers, code, owner, for, requester, performerType, note
/// and input, about 2 KB of JSON.
fn task(n: usize) -> Value {
    json!({
        "resourceType": "Task",
        "id": format!("0f3c2a9e-5b7d-4c1e-9a8f-{n:012}"),
        "meta": { "versionId": "4", "lastUpdated": "2025-06-01T10:15:01.402Z" },
        "identifier": [
            { "system": "http://lab.example.org/orders", "value": format!("LAB-2025-{n:06}") },
            { "system": "urn:ietf:rfc:3986", "value": "urn:uuid:6f1d1c1e-8d0c-4a8e-b2a4-1f0e3b9d5c21" }
        ],
        "basedOn": [{ "reference": "ServiceRequest/sr-88213" }],
        "status": "in-progress",
        "businessStatus": { "text": "Specimen received" },
        "intent": "order",
        "priority": "urgent",
        "code": {
            "coding": [{
                "system": "http://hl7.org/fhir/CodeSystem/task-code",
                "code": "fulfill",
                "display": "Fulfill the focal request"
            }],
            "text": "Collect and analyse a blood sample"
        },
        "focus": { "reference": "ServiceRequest/sr-88213" },
        "for": { "reference": "Patient/p-55102", "display": "Ada Example" },
        "authoredOn": "2025-06-01T08:02:11Z",
        "lastModified": "2025-06-01T10:15:01Z",
        "requester": {
            "reference": "PractitionerRole/pr-7",
            "display": "Dr. Grace Hopper, Internal Medicine"
        },
        "performerType": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/task-performer-type",
                "code": "performer",
                "display": "Performer"
            }]
        }],
        "owner": { "reference": "Practitioner/42", "display": "Alan Turing" },
        "restriction": { "period": { "end": "2025-06-03T17:00:00Z" } },
        "note": [
            {
                "authorReference": { "reference": "Practitioner/7" },
                "time": "2025-06-01T08:05:00Z",
                "text": "Fasting sample; call the ward before collection."
            },
            {
                "authorReference": { "reference": "Practitioner/42" },
                "time": "2025-06-01T10:14:40Z",
                "text": "Patient on anticoagulants, apply pressure for five minutes."
            }
        ],
        "input": [
            {
                "type": { "text": "specimen" },
                "valueReference": { "reference": "Specimen/sp-31337" }
            },
            {
                "type": {
                    "coding": [{ "system": "http://loinc.org", "code": "2345-7", "display": "Glucose [Mass/volume] in Serum or Plasma" }]
                },
                "valueString": "fasting"
            }
        ]
    })
}

fn status(subscription: &SubscriptionId, events_since_start: i64) -> StatusSnapshot<'_> {
    StatusSnapshot {
        subscription_id: subscription,
        topic_url: TOPIC,
        status: SubscriptionStatus::Active,
        events_since_start: EventNumber::new(events_since_start),
        notification_type: NotificationType::EventNotification,
        error: None,
        last_delivered: None,
    }
}

/// What delivery does for one notification: a bundle with a fresh id, as bytes.
fn bundle_bytes(
    status: &StatusSnapshot,
    events: &[NotificationEvent],
    content: ContentLevel,
) -> Vec<u8> {
    let bundle = build(status, events, content);
    serde_json::to_vec(&bundle).expect("a bundle serialises")
}

fn build(status: &StatusSnapshot, events: &[NotificationEvent], content: ContentLevel) -> Value {
    let bundle_id = uuid::Uuid::new_v4().to_string();
    notification_bundle(BASE, &bundle_id, NOW, status, events, content)
}

/// Checks, outside the timing, that the bundle holds what the bench claims to measure.
fn check(bundle: &Value, batch: usize, content: ContentLevel) {
    let entries = bundle["entry"].as_array().expect("entries");
    assert_eq!(
        entries.len(),
        1 + batch,
        "the status and one entry per event"
    );
    let notified = entries[0]["resource"]["parameter"]
        .as_array()
        .expect("status parameters")
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .count();
    assert_eq!(notified, batch);
    for entry in &entries[1..] {
        let has_resource = entry.get("resource").is_some();
        assert_eq!(has_resource, content == ContentLevel::FullResource);
    }
}

fn notification_bundles(c: &mut Criterion) {
    let tasks: Vec<Value> = (0..BATCHES.iter().copied().max().unwrap_or(0))
        .map(task)
        .collect();
    let subscription = SubscriptionId::parse(SUBSCRIPTION).expect("a subscription id");
    let timestamps: Vec<StoredInstant> = (0..tasks.len())
        .map(|n| format!("2025-06-01T10:{:02}:{:02}Z", 15 + n / 60, n % 60))
        .map(|text| StoredInstant::parse(&text).expect("an instant"))
        .collect();
    let task_ids: Vec<TaskId> = tasks
        .iter()
        .map(|task| TaskId::parse(task["id"].as_str().expect("a task id")).expect("an id"))
        .collect();
    let events: Vec<NotificationEvent> = tasks
        .iter()
        .zip(timestamps.iter().zip(&task_ids))
        .enumerate()
        .map(|(n, (task, (timestamp, task_id)))| NotificationEvent {
            event_number: EventNumber::new(100 + n as i64),
            timestamp,
            task_id,
            version: Version::new(4),
            interaction: Interaction::Update,
            resource: Some(task),
        })
        .collect();
    eprintln!(
        "bundles: one Task is {} bytes of JSON",
        serde_json::to_vec(&tasks[0]).expect("a task").len()
    );

    let mut serialised = c.benchmark_group("notification_bundle");
    for &content in CONTENTS {
        for &batch in BATCHES {
            let events = &events[..batch];
            let status = status(&subscription, 100 + batch as i64);
            let bundle = build(&status, events, content);
            check(&bundle, batch, content);
            eprintln!(
                "bundles: {}/{batch} is {} bytes",
                content.as_str(),
                bundle_bytes(&status, events, content).len()
            );
            serialised.bench_with_input(
                BenchmarkId::new(content.as_str(), batch),
                &events,
                |b, events| {
                    b.iter(|| bundle_bytes(black_box(&status), black_box(events), content));
                },
            );
        }
    }
    serialised.finish();

    let mut build_only = c.benchmark_group("notification_bundle_build_only");
    for &content in CONTENTS {
        for &batch in BATCHES {
            let events = &events[..batch];
            let status = status(&subscription, 100 + batch as i64);
            build_only.bench_with_input(
                BenchmarkId::new(content.as_str(), batch),
                &events,
                |b, events| {
                    b.iter(|| build(black_box(&status), black_box(events), content));
                },
            );
        }
    }
    build_only.finish();
}

criterion_group!(benches, notification_bundles);
criterion_main!(benches);
