//! No single request or stored row can stop the node: a write that panics fails alone and the
//! writer goes on; a change whose Task version cannot be read back is passed over without
//! holding up the changes after it; a subscription the hub can no longer deliver says why in
//! its status; a corrected endpoint is tried at once; `/readyz` shows every supervised task.

mod common;

use std::sync::Arc;

use baton::auth::{Identity, Role};
use baton::config::StoreConfig;
use baton::fhir::ids::{ChannelType, EventNumber, StoredInstant, Version};
use baton::fhir::notification::SubscriptionStatus;
use baton::store::postgres::PostgresStore;
use baton::store::sqlite::SqliteStore;
use baton::store::{
    Decision, DeliveryReport, HandshakeOwed, Store, SubscriptionRecord, WriteOutcome, WriteRequest,
};
use baton::supervise::{Health, TaskState};
use common::receiver::Receiver;
use common::{TestServer, eventually, subscription, task};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The store of the backend under test, opened directly, with the health it reports to.
async fn open_store(dir: &std::path::Path) -> (Arc<dyn Store>, Arc<Health>) {
    let health = Arc::new(Health::default());
    let committed = Arc::new(tokio::sync::Notify::new());
    let (url, _) = common::database_url_for(dir).await;
    let config = StoreConfig::default();
    let store: Arc<dyn Store> = match url.strip_prefix("sqlite://") {
        Some(path) => Arc::new(
            SqliteStore::open(
                std::path::Path::new(path),
                "http://baton.test/fhir",
                &config,
                committed,
                health.clone(),
            )
            .await
            .expect("the SQLite store opens"),
        ),
        None => Arc::new(
            PostgresStore::open(&url, "http://baton.test/fhir", &config, committed)
                .await
                .expect("the PostgreSQL store opens"),
        ),
    };
    (store, health)
}

fn create(status: &str) -> WriteRequest {
    WriteRequest::Create {
        id: None,
        resource: task(status, None),
        if_none_exist: None,
    }
}

#[tokio::test]
async fn a_panicking_write_fails_alone_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (store, health) = open_store(dir.path()).await;
    let written = store.write(create("requested")).await.unwrap();
    let WriteOutcome::Written(first) = written else {
        panic!("expected a write, got {written:?}");
    };

    // Several writes queued together, one of whose decisions panics: the others commit.
    let mut handles = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        let id = first.id.clone();
        handles.push(tokio::spawn(async move {
            if i == 3 {
                let decide = Box::new(
                    |_: Option<&baton::store::CurrentTask>| -> baton::Result<Decision> {
                        panic!("a bug in a decision")
                    },
                );
                // On PostgreSQL the decision runs in the caller's task, so the panic is the
                // caller's (the HTTP layer answers it with a 500); on SQLite the writer
                // catches it and answers with an error.
                let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                    store.write(WriteRequest::Change { id, decide }),
                ))
                .await;
                assert!(
                    !matches!(outcome, Ok(Ok(_))),
                    "the panicking write was committed"
                );
                None
            } else {
                Some(store.write(create("requested")).await)
            }
        }));
    }
    for handle in handles {
        if let Some(outcome) = handle.await.unwrap() {
            assert!(
                matches!(outcome, Ok(WriteOutcome::Written(_))),
                "a batch-mate of the panicking write failed: {outcome:?}"
            );
        }
    }
    // The writer goes on: later writes commit, the first Task is unchanged, nothing failed.
    assert!(matches!(
        store.write(create("accepted")).await,
        Ok(WriteOutcome::Written(_))
    ));
    let current = store.read(&first.id).await.unwrap().unwrap();
    assert_eq!(current.version, Version::FIRST);
    store.ping().await.expect("the store is healthy");
    assert!(health.fatal_reason().is_none());
    assert!(
        health
            .snapshot()
            .values()
            .all(|t| t.state == TaskState::Running),
        "{:?}",
        health.snapshot()
    );
    store.close().await;
    common::forget_database(dir.path());
}

#[tokio::test]
async fn a_delivery_that_was_not_the_handshake_never_activates_a_subscription_that_owes_one() {
    // An events attempt that was in flight while its subscription was replaced (a new
    // version, which owes a new handshake) must not mark the new version `active`.
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_store(dir.path()).await;
    let owner = Identity {
        issuer: None,
        subject: "admin-cli".into(),
        role: Role::Admin,
        fhir_user: None,
    };
    let stored = store
        .create_subscription(SubscriptionRecord {
            resource: json!({"resourceType": "Subscription", "status": "requested"}),
            status: SubscriptionStatus::Requested,
            topic_url: "http://baton.test/fhir/SubscriptionTopic/task-changed".into(),
            channel_type: ChannelType::RestHook,
            endpoint: Some("https://receiver.example/hook".into()),
            author: json!({"subject": "admin-cli", "role": "admin", "performer_types": []}),
            owner,
            handshake_pending: true,
            matching: r#"{"v":1,"topic":"http://baton.test/fhir/SubscriptionTopic/task-changed"}"#
                .into(),
            live_quota: None,
        })
        .await
        .unwrap();
    let delivered = |handshake| DeliveryReport::Delivered {
        subscription_id: stored.id.clone(),
        through: EventNumber::ZERO,
        handshake,
        status: SubscriptionStatus::Active,
        at: StoredInstant::parse("2026-01-01T00:00:00.000Z").unwrap(),
        rewinds: 0,
    };
    store
        .record_delivery("node", delivered(HandshakeOwed::Unchanged))
        .await
        .unwrap();
    let after = store.read_subscription(&stored.id).await.unwrap().unwrap();
    assert_eq!(after.status, SubscriptionStatus::Requested);
    assert!(after.handshake_pending);
    store
        .record_delivery("node", delivered(HandshakeOwed::Settled))
        .await
        .unwrap();
    let after = store.read_subscription(&stored.id).await.unwrap().unwrap();
    assert_eq!(after.status, SubscriptionStatus::Active);
    assert!(!after.handshake_pending);
    store.close().await;
    common::forget_database(dir.path());
}

/// A Task version the JSON parser cannot read back (nested deeper than its limit), as a
/// version written before the API refused such content would be.
fn too_deep_task(id: &str) -> String {
    let mut nested = json!({"url": "http://example.org/leaf", "valueString": "x"});
    for _ in 0..200 {
        nested = json!({"url": "http://example.org/nested", "extension": [nested]});
    }
    json!({
        "resourceType": "Task", "id": id, "status": "requested", "intent": "order",
        "meta": {"versionId": "2", "lastUpdated": "2026-01-01T00:00:00.000Z"},
        "extension": [nested],
    })
    .to_string()
}

/// Writes version 2 of `id` with unreadable content and its change event, directly in the
/// database of a stopped server.
async fn plant_unreadable_version(dir: &std::path::Path, id: &str) {
    use sqlx::Connection;
    let (url, _) = common::database_url_for(dir).await;
    let content = too_deep_task(id);
    let now = "2026-01-01T00:00:00.000Z";
    if let Some(path) = url.strip_prefix("sqlite://") {
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{path}"))
            .await
            .unwrap();
        sqlx::query("INSERT INTO task_version (id, version, last_updated, interaction, resource) VALUES (?, 2, ?, 'update', ?)")
            .bind(id).bind(now).bind(&content).execute(&mut conn).await.unwrap();
        sqlx::query("INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at) VALUES ('Task', ?, 2, 1, 'update', ?)")
            .bind(id).bind(now).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    } else {
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("INSERT INTO task_version (id, version, last_updated, interaction, resource) VALUES ($1, 2, $2, 'update', $3)")
            .bind(id).bind(now).bind(&content).execute(&mut conn).await.unwrap();
        sqlx::query("INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at) VALUES ('Task', $1, 2, 1, 'update', $2)")
            .bind(id).bind(now).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
    }
}

#[tokio::test]
async fn an_unreadable_change_is_passed_over_and_matching_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let hub = |c: &mut baton::Config| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
    };
    let server = TestServer::start_in(dir.path(), hub).await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let (status, created) = server
        .post_json(
            "/Subscription",
            &admin,
            &subscription(&server.base, "task-changed", &[], &receiver.url, "id-only"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let sub = created["id"].as_str().unwrap().to_string();
    let poisoned = server.create_task(&task("requested", None)).await;
    let poisoned = poisoned["id"].as_str().unwrap().to_string();
    receiver
        .wait_for("the first event", |_| receiver.event_numbers(&sub) == [1])
        .await;
    server.stop().await;

    plant_unreadable_version(dir.path(), &poisoned).await;

    let server = TestServer::start_in(dir.path(), hub).await;
    let after = server.create_task(&task("requested", None)).await;
    let after_id = after["id"].as_str().unwrap();
    // The change behind the unreadable one is delivered; the unreadable one is not numbered.
    let received = receiver
        .wait_for("the event after the unreadable change", |_| {
            receiver.event_numbers(&sub).len() >= 2
        })
        .await;
    assert_eq!(receiver.event_numbers(&sub), vec![1, 2]);
    let last = received
        .iter()
        .rev()
        .find(|r| r.kind() == "event-notification")
        .unwrap();
    assert!(
        last.body.to_string().contains(after_id),
        "the second event is about the Task written after the unreadable change"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("baton_changes_skipped_total") && !l.ends_with(" 0")),
        "the skipped change is counted:\n{metrics}"
    );
    server.stop().await;
    common::forget_database(dir.path());
}

async fn subscription_status(server: &TestServer, id: &str) -> (String, Option<String>) {
    let (status, body) = server
        .get(&format!("/Subscription/{id}"), &server.admin())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    (
        body["status"].as_str().unwrap_or_default().to_string(),
        body["error"].as_str().map(str::to_string),
    )
}

fn status_parameter(bundle: &Value, name: &str) -> Value {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_subscription_the_configuration_no_longer_serves_says_why_and_keeps_counting() {
    let dir = tempfile::tempdir().unwrap();
    let relaxed = |c: &mut baton::Config| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
    };
    let server = TestServer::start_in(dir.path(), relaxed).await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let (status, created) = server
        .post_json(
            "/Subscription",
            &admin,
            &subscription(&server.base, "task-changed", &[], &receiver.url, "id-only"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    eventually("active", || async {
        (subscription_status(&server, &id).await.0 == "active").then_some(())
    })
    .await;
    server.stop().await;

    // Restarted with a stricter policy: plain http is no longer allowed.
    let strict = |c: &mut baton::Config| {
        c.allow_http_endpoints = false;
        c.allow_private_endpoints = true;
    };
    let server = TestServer::start_in(dir.path(), strict).await;
    let (_, error) = eventually("error with a reason", || async {
        let (status, error) = subscription_status(&server, &id).await;
        (status == "error").then_some((status, error))
    })
    .await;
    let error = error.expect("the reason is shown");
    assert!(error.contains("not deliverable"), "{error}");
    let (_, bundle) = server
        .get(&format!("/Subscription/{id}/$status"), &admin)
        .await;
    assert_eq!(status_parameter(&bundle, "status")["valueCode"], "error");
    // Events still count while it cannot be delivered; nothing reaches the endpoint.
    let before = receiver.received().len();
    server.create_task(&task("requested", None)).await;
    eventually("the event counted", || async {
        let (_, bundle) = server
            .get(&format!("/Subscription/{id}/$status"), &admin)
            .await;
        let count = status_parameter(&bundle, "events-since-subscription-start");
        (count["valueString"] == "1" || count["valueUnsignedInt"] == 1).then_some(())
    })
    .await;
    assert_eq!(receiver.received().len(), before);
    server.stop().await;

    // Back on a configuration that serves it: the waiting event goes out, `active` again.
    let server = TestServer::start_in(dir.path(), relaxed).await;
    receiver
        .wait_for("the event that waited", |_| {
            receiver.event_numbers(&id) == [1]
        })
        .await;
    eventually("active again", || async {
        (subscription_status(&server, &id).await.0 == "active").then_some(())
    })
    .await;
    server.stop().await;
    common::forget_database(dir.path());
}

#[tokio::test]
async fn a_subscription_whose_topic_is_gone_is_turned_off_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let topics = tempfile::tempdir().unwrap();
    let mut topic: Value =
        serde_json::from_str(include_str!("../config/topics/task-changed.json")).unwrap();
    topic["id"] = json!("ward-changed");
    topic["name"] = json!("WardChanged");
    std::fs::write(topics.path().join("ward-changed.json"), topic.to_string()).unwrap();
    let topics_dir = topics.path().to_path_buf();
    let server = TestServer::start_in(dir.path(), |c| c.topics_dir = Some(topics_dir)).await;
    let mut body = subscription(
        &server.base,
        "task-changed",
        &[],
        "wss://unused.example/",
        "id-only",
    );
    body["criteria"] = json!(format!("{}/SubscriptionTopic/ward-changed", server.base));
    body["channel"] = json!({"type": "websocket", "payload": "application/fhir+json"});
    let (status, created) = server
        .post_json("/Subscription", &server.admin(), &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    server.stop().await;

    // The operator removed the topic: the subscription can never match again.
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    let (_, error) = eventually("off with a reason", || async {
        let (status, error) = subscription_status(&server, &id).await;
        (status == "off").then_some((status, error))
    })
    .await;
    let error = error.expect("the reason is shown");
    assert!(error.contains("not deliverable"), "{error}");
    server.stop().await;
    common::forget_database(dir.path());
}

#[tokio::test]
async fn a_corrected_endpoint_is_tried_at_once_not_after_the_old_back_off() {
    // Retries an hour apart: only an immediate attempt can reach the new endpoint in time.
    let server = TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.delivery.retry_schedule_seconds = vec![3600];
        c.delivery.jitter_ratio = 0.0;
    })
    .await;
    let failing = Receiver::start().await;
    failing.fail_with(Some(500));
    let working = Receiver::start().await;
    let admin = server.admin();
    let body = subscription(&server.base, "task-changed", &[], &failing.url, "id-only");
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    eventually("the failed handshake", || async {
        (subscription_status(&server, &id).await.0 == "error").then_some(())
    })
    .await;

    let mut corrected = created.clone();
    corrected["channel"]["endpoint"] = json!(working.url);
    corrected["status"] = json!("requested");
    let (status, replaced) = server
        .put_json(&format!("/Subscription/{id}"), &admin, &corrected)
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    working
        .wait_for("the handshake at the corrected endpoint", |r| {
            r.iter().any(|r| r.kind() == "handshake")
        })
        .await;
    eventually("active", || async {
        (subscription_status(&server, &id).await.0 == "active").then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn readiness_shows_every_supervised_task() {
    let server = TestServer::start().await;
    let response = server
        .client
        .get(format!("{}/readyz", server.root))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    let tasks = body["tasks"].as_object().expect("tasks are listed");
    let mut expected = vec!["matcher", "scheduler", "membership", "overdue", "pruning"];
    if !common::postgres_backend() {
        expected.push("writer");
    }
    for name in expected {
        assert_eq!(tasks[name]["state"], "running", "{name}: {body}");
    }
    server.stop().await;
}
