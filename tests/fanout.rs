//! The fan-out's delivery side end to end: results recorded in batches still give every
//! event once and in order across a restart, and notifications built from shared parts still
//! apply the read rule per subscription at send time.

mod common;

use common::receiver::Receiver;
use common::{TestServer, eventually, subscription, task};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn hub(config: &mut baton::Config) {
    config.allow_http_endpoints = true;
    config.allow_private_endpoints = true;
    config.delivery.retry_schedule_seconds = vec![1];
    config.delivery.jitter_ratio = 0.0;
}

async fn subscribe(server: &TestServer, token: &str, body: &Value) -> String {
    let (status, created) = server.post_json("/Subscription", token, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["id"].as_str().unwrap().to_string()
}

/// `events-since-subscription-start` as `$status` reports it.
async fn events_since_start(server: &TestServer, id: &str) -> i64 {
    let (status, bundle) = server
        .get(&format!("/Subscription/{id}/$status"), &server.admin())
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    common::receiver::parameter(&bundle, "events-since-subscription-start")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no event count in {bundle}"))
}

/// Eight subscriptions hear every Task written by four writers while the server is
/// stopped mid-stream (its in-flight attempts finish and their results are recorded in
/// batches) and started again on the same database: every subscription then has received
/// each of its event numbers exactly once, 1..=N with no gap, in increasing order — the
/// attempts that followed a batched record never re-sent what it covered, and none skipped
/// anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_bookkeeping_delivers_each_event_once_in_order_across_a_restart() {
    const SUBSCRIPTIONS: usize = 8;
    /// Tasks each writer writes at most, so that the backlog stays small on a busy machine.
    const WRITES: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = TestServer::start_in(dir.path(), hub).await;
    let admin = server.admin();
    let mut ids = Vec::new();
    for n in 0..SUBSCRIPTIONS {
        // Small notifications, so that there are many attempts, and many results to record.
        let mut body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
        body["channel"]["extension"] = json!([{
            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count",
            "valuePositiveInt": 1 + n % 3,
        }]);
        ids.push(subscribe(&server, &admin, &body).await);
    }
    receiver
        .wait_for("every handshake", |r| r.len() >= SUBSCRIPTIONS)
        .await;

    // Four writers, until they are done or the server stops under them.
    let mut writers = Vec::new();
    for _ in 0..4 {
        let client = server.client.clone();
        let base = server.base.clone();
        let admin = admin.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = 0usize;
            for _ in 0..WRITES {
                let sent = client
                    .post(format!("{base}/Task"))
                    .bearer_auth(&admin)
                    .header("content-type", "application/fhir+json")
                    .body(task("requested", None).to_string())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == StatusCode::CREATED => acknowledged += 1,
                    _ => break,
                }
            }
            acknowledged
        }));
    }
    receiver
        .wait_for("deliveries under way", |r| r.len() > SUBSCRIPTIONS + 80)
        .await;
    server.stop().await;
    let mut acknowledged = 0;
    for writer in writers {
        acknowledged += writer.await.unwrap();
    }
    assert!(acknowledged > 0);

    let server = TestServer::start_in(dir.path(), hub).await;
    let mut last = Value::Null;
    for _ in 0..10 {
        last = server.create_task(&task("requested", None)).await;
    }
    // Each subscription's queue is in change order: once the last Task written has reached
    // every subscription, everything before it has too.
    let last_url = format!("{}/Task/{}", server.base, last["id"].as_str().unwrap());
    receiver
        .wait_for("the last Task at every subscription", |received| {
            ids.iter().all(|id| {
                received.iter().any(|r| {
                    r.subscription_id() == *id
                        && r.body["entry"]
                            .as_array()
                            .is_some_and(|e| e.iter().any(|e| e["fullUrl"] == last_url.as_str()))
                })
            })
        })
        .await;
    for id in &ids {
        let count = events_since_start(&server, id).await;
        assert!(
            count >= acknowledged as i64 + 10,
            "every acknowledged Task is an event for every subscription"
        );
        let numbers = receiver.event_numbers(id);
        let wanted: Vec<i64> = (1..=count).collect();
        assert_eq!(
            numbers, wanted,
            "subscription {id}: each event once, in order, none skipped"
        );
    }
    server.stop().await;
    common::forget_database(dir.path());
}

/// An admin's catch-all and a practitioner's broad subscription hear the same queued Task
/// in full; the admin's notification builds the shared entry (the Task in full). Before the
/// practitioner's endpoint takes its notification, she updates her subscription with a token
/// that no longer works that queue: at send time the event is withheld from her — no entry,
/// no Task content, not even its id — although the shared entry is there, and the admin
/// keeps getting the Task.
#[tokio::test]
async fn the_read_rule_applies_per_subscription_at_send_time_with_shared_parts() {
    // One failure puts a subscription in `error`, so that `$status` shows when carol's
    // attempt has failed (and ended).
    let server = TestServer::start_with(|config| {
        hub(config);
        config.delivery.error_after_failures = 1;
    })
    .await;
    let admins = Receiver::start().await;
    let hers = Receiver::start().await;
    let admin = server.admin();
    let lab = "http://example.org/roles|lab";
    let with_queue = server.practitioner_with_types("Practitioner/carol", &[lab]);
    let without_queue = server.practitioner("Practitioner/carol");
    let catch_all = subscribe(
        &server,
        &admin,
        &subscription(
            &server.base,
            "task-changed",
            &[],
            &admins.url,
            "full-resource",
        ),
    )
    .await;
    let carols = subscribe(
        &server,
        &with_queue,
        &subscription(
            &server.base,
            "task-changed",
            &[],
            &hers.url,
            "full-resource",
        ),
    )
    .await;
    admins
        .wait_for("the admin's handshake", |r| !r.is_empty())
        .await;
    hers.wait_for("carol's handshake", |r| !r.is_empty()).await;
    // Carol's endpoint is down: her notification waits in her queue.
    hers.fail_with(Some(503));

    let mut queued = task("requested", None);
    queued["performerType"] =
        json!([{ "coding": [{ "system": "http://example.org/roles", "code": "lab" }] }]);
    let queued = server.create_task(&queued).await;
    let queued_id = queued["id"].as_str().unwrap().to_string();
    let to_admin = admins
        .wait_for("the admin's notification", |_| {
            !admins.event_numbers(&catch_all).is_empty()
        })
        .await;
    let in_full = to_admin
        .iter()
        .find(|r| r.kind() == "event-notification")
        .unwrap();
    assert_eq!(
        in_full.body["entry"][1]["resource"]["id"],
        queued_id.as_str()
    );
    // Her attempt, made with the rights she had, has failed and ended: the next one loads
    // her subscription afresh. (An attempt already under way when her rights change sends
    // with the rights it loaded.)
    eventually("carol's attempt failed", || async {
        let (_, bundle) = server
            .get(&format!("/Subscription/{carols}/$status"), &admin)
            .await;
        let failed = common::receiver::parameter(&bundle, "status").as_deref() == Some("error");
        (failed && events_since_start(&server, &carols).await == 1).then_some(())
    })
    .await;

    // Carol's rights change before her notification goes out.
    let (status, mut current) = server
        .get(&format!("/Subscription/{carols}"), &without_queue)
        .await;
    assert_eq!(status, StatusCode::OK);
    current["reason"] = json!("no longer on the lab rota");
    // Back to `requested`: a re-handshake, then it resumes from its first undelivered event.
    current["status"] = json!("requested");
    let (status, _) = server
        .put_json(&format!("/Subscription/{carols}"), &without_queue, &current)
        .await;
    assert_eq!(status, StatusCode::OK);
    hers.fail_with(None);
    // Her queue drains in order: once her own next Task reaches her, event 1 has gone by.
    let unqueued = server
        .create_task(&task("requested", Some("Practitioner/carol")))
        .await;
    let unqueued_id = unqueued["id"].as_str().unwrap().to_string();
    hers.wait_for("carol's own Task", |r| {
        r.iter().any(|n| {
            n.kind() == "event-notification"
                && n.body["entry"].as_array().is_some_and(|entries| {
                    entries
                        .iter()
                        .any(|e| e["resource"]["id"] == unqueued_id.as_str())
                })
        })
    })
    .await;
    for notification in hers.received() {
        let raw = String::from_utf8_lossy(&notification.raw);
        assert!(
            !raw.contains(&queued_id),
            "the queued Task reached carol after she left the queue: {raw}"
        );
    }
    assert!(
        !hers.event_numbers(&carols).contains(&1),
        "event 1 was withheld, not sent"
    );
    // The admin still gets what it may read, from the same shared parts.
    server
        .put_json(&format!("/Task/{queued_id}"), &admin, &{
            let mut again = queued.clone();
            again["status"] = json!("cancelled");
            again
        })
        .await;
    admins
        .wait_for("the admin hears the update", |_| {
            admins.event_numbers(&catch_all).len() >= 3
        })
        .await;
    server.stop().await;
}
