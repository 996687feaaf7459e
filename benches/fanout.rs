//! What one change heard by a hundred subscriptions costs to turn into their hundred
//! notification Bundles, built per subscription (the whole Bundle built and serialised for
//! each, as delivery did) against shared (the event's entry serialised once per change and
//! content level, and only each subscription's status `Parameters` built and spliced in, as
//! delivery does now through the hub's shared parts).
//!
//! Both produce the same bytes (`fhir::notification`'s tests hold it; `check` below looks
//! again outside the timing).
//!
//! Run with `cargo bench --bench fanout -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;

use baton::fhir::ids::{EventNumber, StoredInstant, SubscriptionId, TaskId, Version};
use baton::fhir::interaction::Interaction;
use baton::fhir::notification::{
    ContentLevel, NotificationEvent, NotificationType, StatusSnapshot, SubscriptionStatus,
    event_entry_bytes, notification_bundle_bytes, notification_bundle_with_status_id,
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

const BASE: &str = "https://hub.example.org/fhir";
const NOW: &str = "2025-06-01T10:15:04.512Z";
const TOPIC: &str = "https://hub.example.org/fhir/SubscriptionTopic/task-changed";
const BUNDLE_ID: &str = "3f6c1a52-0d7e-4b8e-9c1f-2a5b7d9e0c11";
const STATUS_ID: &str = "8a1d2c3b-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

/// Subscriptions hearing the one change.
const SUBSCRIPTIONS: usize = 100;

const CONTENTS: &[ContentLevel] = &[ContentLevel::IdOnly, ContentLevel::FullResource];

/// A Task of about 1.5 KB of JSON, like `bundles`' but smaller.
fn task() -> Value {
    json!({
        "resourceType": "Task",
        "id": "0f3c2a9e-5b7d-4c1e-9a8f-000000000001",
        "meta": { "versionId": "4", "lastUpdated": "2025-06-01T10:15:01.402Z" },
        "identifier": [{ "system": "http://lab.example.org/orders", "value": "LAB-2025-000001" }],
        "basedOn": [{ "reference": "ServiceRequest/sr-88213" }],
        "status": "in-progress",
        "businessStatus": { "text": "Specimen received" },
        "intent": "order",
        "priority": "urgent",
        "code": {
            "coding": [{ "system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill" }],
            "text": "Collect and analyse a blood sample"
        },
        "focus": { "reference": "ServiceRequest/sr-88213" },
        "for": { "reference": "Patient/p-55102", "display": "Ada Example" },
        "authoredOn": "2025-06-01T08:02:11Z",
        "lastModified": "2025-06-01T10:15:01Z",
        "requester": { "reference": "PractitionerRole/pr-7" },
        "owner": { "reference": "Practitioner/42", "display": "Alan Turing" },
        "note": [{ "time": "2025-06-01T08:05:00Z", "text": "Fasting sample; call the ward before collection." }],
        "input": [{ "type": { "text": "specimen" }, "valueReference": { "reference": "Specimen/sp-31337" } }]
    })
}

fn status(subscription: &SubscriptionId, n: usize) -> StatusSnapshot<'_> {
    StatusSnapshot {
        subscription_id: subscription,
        topic_url: TOPIC,
        status: SubscriptionStatus::Active,
        events_since_start: EventNumber::new(n as i64 + 1),
        notification_type: NotificationType::EventNotification,
        error: None,
        last_delivered: None,
    }
}

/// Each subscription's own view of the change: the same Task version under its own event
/// number.
fn event_for<'a>(
    task: &'a Value,
    task_id: &'a TaskId,
    at: &'a StoredInstant,
    n: usize,
) -> NotificationEvent<'a> {
    NotificationEvent {
        event_number: EventNumber::new(n as i64 + 1),
        timestamp: at,
        task_id,
        version: Version::new(4),
        interaction: Interaction::Update,
        resource: Some(task),
    }
}

fn fan_out(c: &mut Criterion) {
    let task = task();
    let task_id = TaskId::parse(task["id"].as_str().expect("an id")).expect("a task id");
    let at = StoredInstant::parse("2025-06-01T10:15:01.402Z").expect("an instant");
    let subscriptions: Vec<SubscriptionId> = (0..SUBSCRIPTIONS)
        .map(|n| SubscriptionId::parse(&format!("sub-{n:04}")).expect("an id"))
        .collect();

    let per_subscription = |content: ContentLevel| -> Vec<Vec<u8>> {
        subscriptions
            .iter()
            .enumerate()
            .map(|(n, sub)| {
                let events = [event_for(&task, &task_id, &at, n)];
                let bundle = notification_bundle_with_status_id(
                    BASE,
                    BUNDLE_ID,
                    NOW,
                    STATUS_ID,
                    &status(sub, n),
                    &events,
                    content,
                );
                serde_json::to_vec(&bundle).expect("a bundle serialises")
            })
            .collect()
    };
    let shared = |content: ContentLevel| -> Vec<Vec<u8>> {
        // Once per change and content level: the event's entry does not depend on the
        // subscription.
        let entry = event_entry_bytes(BASE, &event_for(&task, &task_id, &at, 0), content);
        subscriptions
            .iter()
            .enumerate()
            .map(|(n, sub)| {
                let events = [event_for(&task, &task_id, &at, n)];
                notification_bundle_bytes(
                    BASE,
                    BUNDLE_ID,
                    NOW,
                    STATUS_ID,
                    &status(sub, n),
                    &events,
                    content,
                    &[entry.as_slice()],
                )
            })
            .collect()
    };

    let mut group = c.benchmark_group("fan_out_100_notifications_of_one_change");
    for &content in CONTENTS {
        let (whole, spliced) = (per_subscription(content), shared(content));
        assert_eq!(whole, spliced, "both ways give the same bytes");
        eprintln!(
            "fanout: {} notification is {} bytes",
            content.as_str(),
            whole[0].len()
        );
        group.bench_with_input(
            BenchmarkId::new("per_subscription", content.as_str()),
            &content,
            |b, &content| b.iter(|| per_subscription(black_box(content))),
        );
        group.bench_with_input(
            BenchmarkId::new("shared", content.as_str()),
            &content,
            |b, &content| b.iter(|| shared(black_box(content))),
        );
    }
    group.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
