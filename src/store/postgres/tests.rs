//! What only the PostgreSQL store does, against a real server: concurrent writes, an outbox
//! that commits out of order, leases, claims and the subscription generation. Each test has
//! its own database, dropped at the end (even when the test fails).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection, Executor, PgConnection};

use super::PostgresStore;
use crate::auth::{Identity, Role};
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::fhir::ids::{
    ChangeSeq, ChannelType, EventNumber, StoredInstant, SubscriptionId, TaskId, Version,
};
use crate::fhir::interaction::Interaction;
use crate::fhir::notification::SubscriptionStatus;
use crate::fhir::search::{
    Handling, Predicate, SearchLimits, SystemMatch, TokenValue, parse_query,
};
use crate::store::{
    CurrentTask, Decision, DeliveryReport, HandshakeOwed, MatchBatch, MatchRow, PageRequest, Store,
    SubscriptionQuery, SubscriptionRecord, WriteOutcome, WriteRequest,
};

const BASE: &str = "http://baton.test/fhir";
const MATCHER: &str = "matcher";

/// A database of its own for one test.
struct TestDb {
    admin: String,
    name: String,
    url: String,
}

impl TestDb {
    /// None (after saying why) when no PostgreSQL answers, except on CI, where that fails.
    async fn create() -> Option<TestDb> {
        let admin = std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let mut conn = match PgConnection::connect(&admin).await {
            Ok(conn) => conn,
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("PostgreSQL at {admin} is unreachable: {e}")
            }
            Err(e) => {
                eprintln!(
                    "skipped: PostgreSQL at {admin} is unreachable ({e}); set CI=true to fail instead"
                );
                return None;
            }
        };
        let name = format!("baton_unit_{}", uuid::Uuid::new_v4().simple());
        conn.execute(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("creating the test database");
        let _ = conn.close().await;
        let url = database_url(&admin, &name);
        Some(TestDb { admin, name, url })
    }

    async fn open(&self) -> Arc<PostgresStore> {
        let config = StoreConfig {
            postgres_connections: 16,
            ..StoreConfig::default()
        };
        let store = PostgresStore::open(&self.url, BASE, &config, Arc::new(Default::default()))
            .await
            .expect("opening the store");
        Arc::new(store)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await, and may run while the test's runtime is unwinding: a thread with a
        // runtime of its own drops the database.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for dropping the test database");
            runtime.block_on(async {
                if let Ok(mut conn) = PgConnection::connect(&admin).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    if let Err(e) = conn.execute(AssertSqlSafe(sql)).await {
                        eprintln!("dropping {name} failed: {e}");
                    }
                }
            });
        })
        .join();
    }
}

/// The admin URL with its database replaced by `name`.
fn database_url(admin: &str, name: &str) -> String {
    let (base, query) = match admin.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (admin, None),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

macro_rules! test_db {
    () => {
        match TestDb::create().await {
            Some(db) => db,
            None => return,
        }
    };
}

fn seq(number: i64) -> ChangeSeq {
    ChangeSeq::new(number)
}

fn n(number: i64) -> EventNumber {
    EventNumber::new(number)
}

fn v(number: i64) -> Version {
    Version::new(number)
}

fn sid(text: &str) -> SubscriptionId {
    SubscriptionId::parse(text).unwrap()
}

fn task(status: &str) -> Value {
    json!({ "resourceType": "Task", "status": status, "intent": "order" })
}

async fn create(store: &PostgresStore, resource: Value) -> TaskId {
    match store
        .write(WriteRequest::Create {
            id: None,
            resource,
            if_none_exist: None,
        })
        .await
        .expect("creating a Task")
    {
        WriteOutcome::Written(version) => version.id,
        other => panic!("create answered {other:?}"),
    }
}

async fn change(
    store: &PostgresStore,
    id: &TaskId,
    decide: impl Fn(Option<&CurrentTask>) -> Result<Decision> + Send + 'static,
) -> Result<WriteOutcome> {
    store
        .write(WriteRequest::Change {
            id: id.clone(),
            decide: Box::new(decide),
        })
        .await
}

/// A change as the store applies one it cannot settle without the lock: in a transaction
/// that holds the Task (`SELECT … FOR UPDATE`) while the decision runs.
async fn change_locked(
    store: &PostgresStore,
    id: &TaskId,
    decide: impl Fn(Option<&CurrentTask>) -> Result<Decision> + Send + 'static,
) -> Result<WriteOutcome> {
    let write = crate::store::write::TaskWrite::Change {
        id: id.clone(),
        decide: Box::new(decide),
    };
    let mut tx = store.pool.begin().await?;
    let result = crate::store::write::apply(&mut *tx, write, BASE).await;
    super::finish(tx, result)
        .await
        .map_err(|e| super::concurrent(e, "the Task"))
}

/// The decision of an If-Match update that appends `mark` to the description.
fn append_if_match(
    current: Option<&CurrentTask>,
    expected: Option<i64>,
    mark: &str,
) -> Result<Decision> {
    let current = current.expect("the Task exists");
    if expected.is_some_and(|v| v != current.version.get()) {
        return Err(Error::precondition_failed(format!(
            "If-Match {expected:?}, current {}",
            current.version
        )));
    }
    let mut resource = current.resource.clone();
    let before = resource["description"].as_str().unwrap_or("").to_string();
    resource["description"] = json!(format!("{before}{mark}"));
    Ok(Decision::Put(resource.into()))
}

fn subscription_record(status: SubscriptionStatus) -> SubscriptionRecord {
    SubscriptionRecord {
        resource: json!({
            "resourceType": "Subscription",
            "status": status.as_str(),
            "criteria": "http://baton.test/SubscriptionTopic/task-created",
            "channel": { "type": "rest-hook", "endpoint": "https://receiver.test/hook" },
        }),
        status,
        topic_url: "http://baton.test/SubscriptionTopic/task-created".into(),
        channel_type: ChannelType::RestHook,
        endpoint: Some("https://receiver.test/hook".into()),
        author: json!({ "subject": "Practitioner/author", "role": "practitioner" }),
        owner: author_identity("Practitioner/author"),
        handshake_pending: true,
        matching: r#"{"v":1,"topic":"http://baton.test/SubscriptionTopic/task-created"}"#.into(),
        live_quota: None,
    }
}

fn author_identity(subject: &str) -> Identity {
    Identity {
        issuer: None,
        subject: subject.into(),
        role: Role::Practitioner,
        fhir_user: None,
    }
}

async fn subscribe(store: &PostgresStore) -> SubscriptionId {
    store
        .create_subscription(subscription_record(SubscriptionStatus::Requested))
        .await
        .expect("creating a subscription")
        .id
}

fn matched(subscription_id: &SubscriptionId, change_seq: i64) -> MatchRow {
    MatchRow {
        subscription_id: subscription_id.clone(),
        change_seq: seq(change_seq),
    }
}

fn batch(holder: &str, changes: &[i64], matches: Vec<MatchRow>) -> MatchBatch {
    MatchBatch {
        consumer: MATCHER.into(),
        holder: holder.into(),
        changes: changes.iter().copied().map(seq).collect(),
        matches,
        resumed: None,
        progress: None,
    }
}

async fn unmatched_seqs(store: &PostgresStore) -> Vec<i64> {
    store
        .change_events_after(seq(i64::MAX), 100)
        .await
        .unwrap()
        .iter()
        .map(|c| c.seq.get())
        .collect()
}

async fn event_seqs(store: &PostgresStore, subscription: &SubscriptionId) -> Vec<(i64, i64)> {
    store
        .subscription_events(subscription, n(1), n(100))
        .await
        .unwrap()
        .iter()
        .map(|e| (e.event_number.get(), e.change_seq.get()))
        .collect()
}

fn assert_conflict<T: std::fmt::Debug>(result: Result<T>, what: &str) {
    match result {
        Err(e) => assert_eq!(e.status(), StatusCode::CONFLICT, "{what}: {e}"),
        Ok(value) => panic!("{what} succeeded: {value:?}"),
    }
}

/// A change in a transaction holds the Task while its decision runs; the changes tried
/// meanwhile without the lock (the store's first attempt) find the Task changed when they
/// write, and are decided again on its new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_to_one_task_lose_nothing() {
    let db = test_db!();
    let store = db.open().await;
    let id = create(&store, task("requested")).await;

    // The first update holds the Task while its decision runs; the others start meanwhile.
    let (inside, entered) = std::sync::mpsc::channel();
    let first = tokio::spawn({
        let (store, id) = (store.clone(), id.clone());
        async move {
            change_locked(&store, &id, move |current| {
                inside.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                append_if_match(current, Some(1), "a")
            })
            .await
        }
    });
    tokio::task::spawn_blocking(move || entered.recv().unwrap())
        .await
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let second = tokio::spawn({
        let (store, id, seen) = (store.clone(), id.clone(), seen.clone());
        async move {
            change(&store, &id, move |current| {
                *seen.lock().unwrap() = current.map(|c| c.version.get());
                append_if_match(current, None, "b")
            })
            .await
        }
    });
    // Also waiting: an If-Match on the version the first update replaces.
    let stale = tokio::spawn({
        let (store, id) = (store.clone(), id.clone());
        async move {
            change(&store, &id, |current| {
                append_if_match(current, Some(1), "c")
            })
            .await
        }
    });

    let first = first.await.unwrap().expect("the first update");
    let second = second.await.unwrap().expect("the second update");
    let stale = stale.await.unwrap();
    let version = |outcome: &WriteOutcome| match outcome {
        WriteOutcome::Written(v) => v.version.get(),
        other => panic!("{other:?}"),
    };
    assert_eq!((version(&first), version(&second)), (2, 3));
    assert_eq!(
        *seen.lock().unwrap(),
        Some(2),
        "the second decision saw the first's result"
    );
    assert_eq!(
        stale.expect_err("If-Match 1 after version 2").status(),
        StatusCode::PRECONDITION_FAILED
    );
    let current = store.read(&id).await.unwrap().unwrap();
    assert_eq!(current.version, v(3));
    assert_eq!(current.resource["description"], "ab");
    assert_eq!(current.resource["meta"]["versionId"], "3");
    let changes = store
        .change_events_after(ChangeSeq::ZERO, 10)
        .await
        .unwrap();
    let versions: Vec<(i64, Option<i64>)> = changes
        .iter()
        .map(|c| (c.version.get(), c.previous_version.map(Version::get)))
        .collect();
    assert_eq!(versions, [(1, None), (2, Some(1)), (3, Some(2))]);
}

#[tokio::test]
async fn unmatched_changes_are_returned_even_below_a_matched_one() {
    let db = test_db!();
    let store = db.open().await;
    create(&store, task("requested")).await;
    // Another node's transaction has taken the next `seq` and not committed yet.
    let mut other = PgConnection::connect(&db.url).await.unwrap();
    let mut open = other.begin().await.unwrap();
    let gap: i64 = sqlx::query_scalar(
        "INSERT INTO change_event (resource_type, resource_id, version, interaction, recorded_at)
         VALUES ('Task', 'slow', 1, 'create', '2024-01-01T00:00:00.000Z') RETURNING seq",
    )
    .fetch_one(&mut *open)
    .await
    .unwrap();
    assert_eq!(gap, 2);
    create(&store, task("requested")).await;
    assert_eq!(unmatched_seqs(&store).await, [1, 3]);
    assert!(
        store
            .acquire_lease(MATCHER, "A", Duration::from_secs(30))
            .await
            .unwrap()
    );

    // The newest change is recorded first; the position passed in is ignored.
    store
        .record_matches(batch("A", &[3], vec![]))
        .await
        .unwrap();
    assert_eq!(store.outbox_cursor(MATCHER).await.unwrap(), seq(3));
    let after = store.change_events_after(seq(3), 10).await.unwrap();
    assert_eq!(after.iter().map(|c| c.seq).collect::<Vec<_>>(), [seq(1)]);

    open.commit().await.unwrap();
    assert_eq!(unmatched_seqs(&store).await, [1, 2]);
    assert_eq!(store.last_change_seq().await.unwrap(), seq(3));
    store
        .record_matches(batch("A", &[1, 2], vec![]))
        .await
        .unwrap();
    assert!(unmatched_seqs(&store).await.is_empty());
    assert_eq!(store.outbox_cursor(MATCHER).await.unwrap(), seq(3));
    assert!(!store.outbox_in_commit_order());
}

#[tokio::test]
async fn record_matches_refuses_a_batch_without_the_lease() {
    let db = test_db!();
    let store = db.open().await;
    create(&store, task("requested")).await;
    let subscription = subscribe(&store).await;
    let ten = Duration::from_secs(10);
    assert!(store.acquire_lease(MATCHER, "A", ten).await.unwrap());
    assert!(
        store.acquire_lease(MATCHER, "A", ten).await.unwrap(),
        "renewed"
    );
    assert!(!store.acquire_lease(MATCHER, "B", ten).await.unwrap());

    let nothing_recorded = |store: Arc<PostgresStore>, subscription: SubscriptionId| async move {
        let s = store
            .read_subscription(&subscription)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.events_since_start, EventNumber::ZERO);
        assert!(event_seqs(&store, &subscription).await.is_empty());
        assert_eq!(unmatched_seqs(&store).await, [1]);
    };
    let foreign = store
        .record_matches(batch("B", &[1], vec![matched(&subscription, 1)]))
        .await;
    assert_conflict(foreign, "a batch from a node without the lease");
    nothing_recorded(store.clone(), subscription.clone()).await;

    // A's lease runs out: its batch is refused even before anyone else takes it.
    assert!(
        store
            .acquire_lease(MATCHER, "A", Duration::from_millis(100))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let expired = store
        .record_matches(batch("A", &[1], vec![matched(&subscription, 1)]))
        .await;
    assert_conflict(expired, "a batch under an expired lease");
    nothing_recorded(store.clone(), subscription.clone()).await;

    assert!(
        store.acquire_lease(MATCHER, "B", ten).await.unwrap(),
        "taken over"
    );
    let late = store
        .record_matches(batch("A", &[1], vec![matched(&subscription, 1)]))
        .await;
    assert_conflict(late, "a batch from the former holder");
    nothing_recorded(store.clone(), subscription.clone()).await;
    let numbers = store
        .record_matches(batch("B", &[1], vec![matched(&subscription, 1)]))
        .await
        .unwrap();
    assert_eq!(numbers, [(subscription.clone(), n(1))]);

    store.release_lease(MATCHER, "A").await.unwrap();
    assert!(
        !store.acquire_lease(MATCHER, "A", ten).await.unwrap(),
        "B still holds it"
    );
    store.release_lease(MATCHER, "B").await.unwrap();
    assert!(store.acquire_lease(MATCHER, "A", ten).await.unwrap());
}

#[tokio::test]
async fn recording_changes_twice_fails_and_numbers_stay_contiguous() {
    let db = test_db!();
    let store = db.open().await;
    create(&store, task("requested")).await;
    create(&store, task("requested")).await;
    let subscription = subscribe(&store).await;
    assert!(
        store
            .acquire_lease(MATCHER, "A", Duration::from_secs(30))
            .await
            .unwrap()
    );

    let first = store
        .record_matches(batch("A", &[1], vec![matched(&subscription, 1)]))
        .await
        .unwrap();
    assert_eq!(first, [(subscription.clone(), n(1))]);
    let again = store
        .record_matches(batch("A", &[1], vec![matched(&subscription, 1)]))
        .await;
    assert_conflict(again, "recording change 1 twice");
    // One change of the batch was consumed already: the other is not marked either.
    let partly = store
        .record_matches(batch(
            "A",
            &[1, 2],
            vec![matched(&subscription, 1), matched(&subscription, 2)],
        ))
        .await;
    assert_conflict(partly, "a batch overlapping a recorded one");
    assert_eq!(unmatched_seqs(&store).await, [2]);
    assert_eq!(
        store
            .read_subscription(&subscription)
            .await
            .unwrap()
            .unwrap()
            .events_since_start,
        n(1)
    );

    let second = store
        .record_matches(batch("A", &[2], vec![matched(&subscription, 2)]))
        .await
        .unwrap();
    assert_eq!(second, [(subscription.clone(), n(2))]);
    assert_eq!(event_seqs(&store, &subscription).await, [(1, 1), (2, 2)]);
}

#[tokio::test]
async fn numbers_are_contiguous_per_subscription_and_skip_off_ones() {
    let db = test_db!();
    let store = db.open().await;
    for _ in 0..4 {
        create(&store, task("requested")).await;
    }
    let (s1, s2) = (subscribe(&store).await, subscribe(&store).await);
    let off = subscribe(&store).await;
    store
        .replace_subscription(
            &off,
            Box::new(|_| Ok(subscription_record(SubscriptionStatus::Off))),
        )
        .await
        .unwrap();
    assert!(
        store
            .acquire_lease(MATCHER, "A", Duration::from_secs(30))
            .await
            .unwrap()
    );

    let matches = vec![
        matched(&s1, 1),
        matched(&s2, 1),
        matched(&off, 1),
        matched(&s1, 2),
        matched(&sid("no-such-subscription"), 2),
        matched(&s2, 3),
        matched(&s1, 3),
    ];
    let numbers = store
        .record_matches(batch("A", &[1, 2, 3], matches))
        .await
        .unwrap();
    let expected = [
        (s1.clone(), n(1)),
        (s2.clone(), n(1)),
        (s1.clone(), n(2)),
        (s2.clone(), n(2)),
        (s1.clone(), n(3)),
    ];
    assert_eq!(numbers, expected);
    assert_eq!(event_seqs(&store, &s1).await, [(1, 1), (2, 2), (3, 3)]);
    assert_eq!(event_seqs(&store, &s2).await, [(1, 1), (2, 3)]);
    assert!(event_seqs(&store, &off).await.is_empty());
    let off_row = store.read_subscription(&off).await.unwrap().unwrap();
    assert_eq!(off_row.events_since_start, EventNumber::ZERO);

    let numbers = store
        .record_matches(batch("A", &[4], vec![matched(&s2, 4), matched(&s1, 4)]))
        .await
        .unwrap();
    assert_eq!(numbers, [(s2.clone(), n(3)), (s1.clone(), n(4))]);
    for (id, count) in [(&s1, 4), (&s2, 3)] {
        let row = store.read_subscription(id).await.unwrap().unwrap();
        assert_eq!(row.events_since_start, n(count));
    }
}

#[tokio::test]
async fn claims_keep_other_nodes_out_until_released_or_expired() {
    let db = test_db!();
    let store = db.open().await;
    let subscription = subscribe(&store).await;
    let now = StoredInstant::now();
    let ten = Duration::from_secs(10);
    assert_eq!(
        store.due_subscriptions(&now, 10).await.unwrap(),
        std::slice::from_ref(&subscription)
    );

    let claimed = store
        .claim_subscription(&subscription, "A", ten)
        .await
        .unwrap();
    assert_eq!(claimed.map(|s| s.id), Some(subscription.clone()));
    assert!(
        store
            .claim_subscription(&subscription, "B", ten)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store.due_subscriptions(&now, 10).await.unwrap().is_empty(),
        "claimed work is not due"
    );
    assert!(
        store
            .claim_subscription(&subscription, "A", ten)
            .await
            .unwrap()
            .is_some(),
        "renewed"
    );
    assert!(
        store
            .claim_subscription(&sid("no-such-id"), "A", ten)
            .await
            .unwrap()
            .is_none()
    );

    // A report from a node without the claim records its result but leaves A's claim alone.
    let failed = DeliveryReport::Failed {
        subscription_id: subscription.clone(),
        error: "connection refused\0".into(),
        failures: 1,
        failing_since: now.clone(),
        next_attempt_at: None,
        status: SubscriptionStatus::Requested,
    };
    store.record_delivery("B", failed).await.unwrap();
    assert!(
        store
            .claim_subscription(&subscription, "B", ten)
            .await
            .unwrap()
            .is_none()
    );

    let delivered = DeliveryReport::Delivered {
        subscription_id: subscription.clone(),
        through: EventNumber::ZERO,
        handshake: HandshakeOwed::Settled,
        status: SubscriptionStatus::Active,
        at: now.clone(),
        rewinds: 0,
    };
    store.record_delivery("A", delivered).await.unwrap();
    let row = store
        .read_subscription(&subscription)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, SubscriptionStatus::Active);
    assert!(!row.handshake_pending);
    assert_eq!(row.failures, 0);

    let short = Duration::from_millis(100);
    assert!(
        store
            .claim_subscription(&subscription, "B", short)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .claim_subscription(&subscription, "A", ten)
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        store
            .claim_subscription(&subscription, "A", ten)
            .await
            .unwrap()
            .is_some(),
        "expired"
    );
    store
        .release_subscription(&subscription, "B")
        .await
        .unwrap();
    assert!(
        store
            .claim_subscription(&subscription, "B", ten)
            .await
            .unwrap()
            .is_none()
    );
    store
        .release_subscription(&subscription, "A")
        .await
        .unwrap();
    assert!(
        store
            .claim_subscription(&subscription, "B", ten)
            .await
            .unwrap()
            .is_some()
    );
}

#[tokio::test]
async fn the_generation_moves_with_subscription_writes_only() {
    let db = test_db!();
    let store = db.open().await;
    assert_eq!(store.subscription_generation().await.unwrap(), 0);
    let first = subscribe(&store).await;
    assert_eq!(store.subscription_generation().await.unwrap(), 1);
    let since = store.subscription_changes_since(0).await.unwrap();
    assert_eq!(since.generation, 1);
    assert_eq!(
        since.changed.iter().map(|s| &s.id).collect::<Vec<_>>(),
        [&first]
    );

    store
        .replace_subscription(
            &first,
            Box::new(|_| Ok(subscription_record(SubscriptionStatus::Requested))),
        )
        .await
        .unwrap();
    assert_eq!(store.subscription_generation().await.unwrap(), 2);
    // Delivery bookkeeping does not move it.
    create(&store, task("requested")).await;
    assert!(
        store
            .acquire_lease(MATCHER, "A", Duration::from_secs(30))
            .await
            .unwrap()
    );
    store
        .record_matches(batch("A", &[1], vec![matched(&first, 1)]))
        .await
        .unwrap();
    store
        .claim_subscription(&first, "A", Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    let delivered = DeliveryReport::Delivered {
        subscription_id: first.clone(),
        through: n(1),
        handshake: HandshakeOwed::Settled,
        status: SubscriptionStatus::Active,
        at: StoredInstant::now(),
        rewinds: 0,
    };
    store.record_delivery("A", delivered).await.unwrap();
    assert_eq!(store.subscription_generation().await.unwrap(), 2);
    let missing = store
        .replace_subscription(&sid("no-such-id"), Box::new(|_| unreachable!()))
        .await;
    assert_eq!(missing.unwrap_err().status(), StatusCode::NOT_FOUND);
    assert_eq!(store.subscription_generation().await.unwrap(), 2);

    let second = subscribe(&store).await;
    let since = store.subscription_changes_since(1).await.unwrap();
    assert_eq!(since.generation, 3);
    let changed: Vec<(&str, i64)> = since
        .changed
        .iter()
        .map(|s| (s.id.as_str(), s.version.get()))
        .collect();
    assert_eq!(changed, [(first.as_str(), 2), (second.as_str(), 1)]);
    assert!(since.deleted.is_empty());
    assert!(
        store
            .subscription_changes_since(3)
            .await
            .unwrap()
            .changed
            .is_empty()
    );

    assert!(store.delete_subscription(&first).await.unwrap());
    assert!(!store.delete_subscription(&first).await.unwrap());
    assert_eq!(store.subscription_generation().await.unwrap(), 4);
    let since = store.subscription_changes_since(3).await.unwrap();
    assert_eq!(since.generation, 4);
    assert!(since.changed.is_empty());
    assert_eq!(since.deleted, std::slice::from_ref(&first));
    let all = store.subscription_changes_since(0).await.unwrap();
    assert_eq!(
        all.changed.iter().map(|s| &s.id).collect::<Vec<_>>(),
        [&second]
    );
    assert_eq!(all.deleted, std::slice::from_ref(&first));
    assert!(
        store
            .subscription_events(&first, n(1), n(10))
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_conditional_creates_create_one_task() {
    let db = test_db!();
    let store = db.open().await;
    let predicate = || {
        vec![Predicate::Token {
            param: "identifier",
            negated: false,
            any_of: vec![TokenValue {
                system: SystemMatch::Exact("urn:race".into()),
                code: Some("one".into()),
            }],
        }]
    };
    let start = Arc::new(tokio::sync::Barrier::new(10));
    let racers: Vec<_> = (0..10)
        .map(|_| {
            let (store, start, if_none_exist) = (store.clone(), start.clone(), predicate());
            tokio::spawn(async move {
                let mut resource = task("requested");
                resource["identifier"] = json!([{ "system": "urn:race", "value": "one" }]);
                start.wait().await;
                store
                    .write(WriteRequest::Create {
                        id: None,
                        resource,
                        if_none_exist: Some(if_none_exist),
                    })
                    .await
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut found = Vec::new();
    for racer in racers {
        match racer.await.unwrap().expect("a conditional create") {
            WriteOutcome::Written(version) => created.push(version.id),
            WriteOutcome::Existing(current) => found.push(current.id),
            WriteOutcome::Unchanged => panic!("a create answered Unchanged"),
        }
    }
    assert_eq!(created.len(), 1, "created {created:?}");
    assert_eq!(found.len(), 9);
    assert!(found.iter().all(|id| *id == created[0]));
    let predicates = predicate();
    let page = store
        .search(PageRequest {
            predicates: &predicates,
            sort: &[],
            count: 10,
            offset: 0,
            after: None,
            counting: crate::store::Counting::All,
            max_bytes: usize::MAX,
        })
        .await
        .unwrap();
    assert_eq!(page.total, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdue_is_reported_once_by_racing_nodes() {
    let db = test_db!();
    let (node_a, node_b) = (db.open().await, db.open().await);
    let mut resource = task("in-progress");
    resource["restriction"] = json!({ "period": { "end": "2020-01-01" } });
    let id = create(&node_a, resource).await;
    let now = StoredInstant::now();
    let due = node_a.overdue_tasks(&now, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    let (task_id, due_at) = due[0].clone();
    assert_eq!(task_id, id);
    let (a, b) = tokio::join!(
        node_a.mark_overdue(&task_id, &due_at, &now),
        node_b.mark_overdue(&task_id, &due_at, &now)
    );
    let reported = [a.unwrap(), b.unwrap()];
    assert_eq!(reported.iter().filter(|r| **r).count(), 1, "{reported:?}");
    assert!(node_a.overdue_tasks(&now, 10).await.unwrap().is_empty());
    let changes = node_a
        .change_events_after(ChangeSeq::ZERO, 10)
        .await
        .unwrap();
    let overdue: Vec<_> = changes
        .iter()
        .filter(|c| c.interaction == Interaction::Overdue)
        .collect();
    assert_eq!(overdue.len(), 1);
    assert_eq!(
        (&overdue[0].resource_id, overdue[0].version),
        (&id, Version::FIRST)
    );
}

/// Not concurrency: that the SQL of the other operations runs on PostgreSQL and answers as
/// the SQLite store does, on a few Tasks.
#[tokio::test]
async fn reads_searches_and_workflow_run_on_postgres() {
    let db = test_db!();
    let store = db.open().await;
    // Creates a millisecond apart at least, so that `_lastUpdated` orders them.
    let create = |resource: Value| {
        let store = store.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            create(&store, resource).await
        }
    };
    let parent = create(task("in-progress")).await;
    let mut child = task("ready");
    child["partOf"] = json!([{ "reference": format!("Task/{parent}") }]);
    child["priority"] = json!("urgent");
    // U+0000 cannot be stored in PostgreSQL text; such a value is still indexed and found.
    child["identifier"] = json!([{ "system": "urn:ids", "value": "nul\u{0}byte" }]);
    let first_child = create(child.clone()).await;
    child["status"] = json!("draft");
    child["priority"] = json!("routine");
    let second_child = create(child).await;

    let limits = SearchLimits {
        default_count: 10,
        max_count: 100,
        default_total: crate::fhir::search::TotalMode::Accurate,
    };
    let search = |query: &str| {
        let pairs: Vec<(String, String)> = query
            .split('&')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        parse_query(&pairs, &limits, BASE, Handling::Strict).unwrap()
    };
    let ids =
        |tasks: &[crate::store::ListedTask]| tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
    let run = |query: &str, offset: usize| {
        let parsed = search(query);
        let store = store.clone();
        async move {
            store
                .search(PageRequest {
                    predicates: &parsed.predicates,
                    sort: &parsed.sort,
                    count: 2,
                    offset,
                    after: None,
                    counting: crate::store::Counting::All,
                    max_bytes: usize::MAX,
                })
                .await
                .unwrap()
        }
    };
    let page = run("status=ready,draft&_sort=-priority", 0).await;
    assert_eq!(page.total, Some(2));
    assert_eq!(
        ids(&page.tasks),
        [first_child.clone(), second_child.clone()]
    );
    let page = run("_sort=-_lastUpdated", 1).await;
    assert_eq!(page.total, Some(3));
    assert_eq!(ids(&page.tasks), [first_child.clone(), parent.clone()]);
    let page = run("identifier=urn:ids|nul\u{0}byte&status:not=draft", 0).await;
    assert_eq!(ids(&page.tasks), std::slice::from_ref(&first_child));

    let scope = search("status=ready").predicates;
    let children = store
        .children_of(&[format!("Task/{parent}")], &scope, 10, usize::MAX)
        .await
        .unwrap();
    assert_eq!(ids(&children.tasks), std::slice::from_ref(&first_child));
    let both = [format!("Task/{parent}"), "Task/other".into()];
    let children = store.children_of(&both, &[], 10, usize::MAX).await.unwrap();
    assert_eq!(
        ids(&children.tasks),
        [first_child.clone(), second_child.clone()]
    );
    assert!(!children.truncated);
    // A byte budget that holds one child ends the rows after it; a page of matches always
    // takes its first Task, however small the budget.
    let one = children.tasks[0].json.len();
    let children = store.children_of(&both, &[], 10, one).await.unwrap();
    assert_eq!(ids(&children.tasks), std::slice::from_ref(&first_child));
    assert!(children.truncated);
    assert_eq!(children.bytes, one);
    let all = search("_sort=_lastUpdated").predicates;
    let page = store
        .search(PageRequest {
            predicates: &all,
            sort: &[],
            count: 10,
            offset: 0,
            after: None,
            counting: crate::store::Counting::Skip,
            max_bytes: 1,
        })
        .await
        .unwrap();
    assert_eq!(page.tasks.len(), 1);
    assert!(page.truncated);

    // A suspend and a resume request change the focal Task in their own transactions; the
    // resume finds the status before the hold in the history.
    for code in ["suspend", "resume"] {
        let mut request = task("completed");
        request["code"] = json!({ "coding": [{
            "system": "http://hl7.org/fhir/CodeSystem/task-code", "code": code }] });
        request["focus"] = json!({ "reference": format!("Task/{parent}") });
        create(request).await;
    }
    let (history, total) = store.history(&parent, 10, 0).await.unwrap();
    assert_eq!(total, 3);
    let statuses: Vec<&str> = history
        .iter()
        .map(|v| v.resource.as_ref().unwrap()["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["in-progress", "on-hold", "in-progress"]);

    let keys = [
        (parent.clone(), v(2)),
        (parent.clone(), v(9)),
        (first_child.clone(), v(1)),
    ];
    let mut found: Vec<(TaskId, Version)> = store
        .versions(&keys)
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v.id, v.version))
        .collect();
    found.sort();
    let mut expected = vec![(parent.clone(), v(2)), (first_child.clone(), v(1))];
    expected.sort();
    assert_eq!(found, expected);
    let second = store.read_version(&parent, v(2)).await.unwrap().unwrap();
    assert_eq!(second.resource.unwrap()["status"], "on-hold");

    let deleted = change(&store, &second_child, |_| Ok(Decision::Delete))
        .await
        .unwrap();
    assert!(matches!(deleted, WriteOutcome::Written(v) if v.interaction == Interaction::Delete));
    assert!(store.read(&second_child).await.unwrap().unwrap().deleted);
    assert_eq!(run("status=ready,draft", 0).await.total, Some(1));

    let subscription = subscribe(&store).await;
    let query = SubscriptionQuery {
        author: Some(author_identity("Practitioner/author")),
        status: Some(vec!["requested".into(), "active".into()]),
        endpoint: Some("https://receiver.test/hook".into()),
        ids: Some(vec![subscription.to_string()]),
    };
    let (found, total) = store.search_subscriptions(&query, 10, 0).await.unwrap();
    assert_eq!((ids_of(&found), total), (vec![subscription.clone()], 1));
    let nobody = SubscriptionQuery {
        author: Some(author_identity("Practitioner/other")),
        ..SubscriptionQuery::default()
    };
    assert_eq!(
        store.search_subscriptions(&nobody, 10, 0).await.unwrap().1,
        0
    );
    let no_ids = SubscriptionQuery {
        ids: Some(vec![]),
        ..SubscriptionQuery::default()
    };
    assert_eq!(
        store.search_subscriptions(&no_ids, 10, 0).await.unwrap().1,
        0
    );
    assert_eq!(
        store
            .live_subscription_page(None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<_>>(),
        [subscription]
    );
    store.ping().await.unwrap();
    store.close().await;
}

fn ids_of(subscriptions: &[crate::store::StoredSubscription]) -> Vec<SubscriptionId> {
    subscriptions.iter().map(|s| s.id.clone()).collect()
}

#[test]
fn database_url_replaces_only_the_database() {
    assert_eq!(
        database_url("postgres://postgres@127.0.0.1:5432/postgres", "x"),
        "postgres://postgres@127.0.0.1:5432/x"
    );
    assert_eq!(
        database_url("postgres://u:p@h/db?sslmode=disable", "x"),
        "postgres://u:p@h/x?sslmode=disable"
    );
    assert_eq!(
        database_url("postgres://h:5432", "x"),
        "postgres://h:5432/x"
    );
}

/// A `task_token` row of a Task: param, system, value.
type TokenRow = (String, Option<String>, String);
/// A `task_date` row of a Task: param, start, end.
type DateRow = (String, String, String);
/// The work-list columns of a Task row, in `TaskColumns`' order.
type ColumnRow = (
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
);

/// The rows a Task write leaves: the current row, the history, the search index of the
/// current version only, and the outbox.
struct TaskRows {
    task: (i64, i32),
    /// The work-list columns (`TaskColumns`) of the row.
    columns: crate::fhir::search::TaskColumns,
    versions: Vec<(i64, String, bool)>,
    tokens: Vec<TokenRow>,
    dates: Vec<DateRow>,
    changes: Vec<(i64, Option<i64>, String)>,
}

async fn task_rows(db: &TestDb, id: &TaskId) -> TaskRows {
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let task = sqlx::query_as("SELECT version, deleted FROM task WHERE id = $1")
        .bind(id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let columns: ColumnRow = sqlx::query_as(
        "SELECT status, owner, performer, performer_system, due_start, due_end, authored_on
         FROM task WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let columns = crate::fhir::search::TaskColumns {
        status: columns.0,
        owner: columns.1,
        performer: columns.2,
        performer_system: columns.3,
        due_start: columns.4,
        due_end: columns.5,
        authored_on: columns.6,
    };
    let versions = sqlx::query_as(
        "SELECT version, interaction, resource IS NOT NULL FROM task_version
         WHERE id = $1 ORDER BY version",
    )
    .bind(id)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let tokens = sqlx::query_as(
        "SELECT param, system, value FROM task_token WHERE task_id = $1
         ORDER BY param, system, value",
    )
    .bind(id)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let dates = sqlx::query_as(
        "SELECT param, start_at, end_at FROM task_date WHERE task_id = $1
         ORDER BY param, start_at, end_at",
    )
    .bind(id)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let changes = sqlx::query_as(
        "SELECT version, previous_version, interaction FROM change_event
         WHERE resource_type = 'Task' AND resource_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    TaskRows {
        task,
        columns,
        versions,
        tokens,
        dates,
        changes,
    }
}

/// The index rows the store should hold for a stored version, as `task_rows` reads them
/// (U+0000 stored as U+FFFD): those its work-list columns do not hold.
fn expected_index(resource: &Value) -> (Vec<TokenRow>, Vec<DateRow>) {
    let whole = crate::fhir::search::index_task(resource, BASE);
    let index = crate::fhir::search::TaskColumns::from_index(&whole).rows_beside(&whole);
    let mut tokens: Vec<_> = index
        .tokens
        .iter()
        .map(|t| {
            (
                t.param.to_string(),
                t.system.as_deref().map(|s| super::pg_text(s).into_owned()),
                super::pg_text(&t.value).into_owned(),
            )
        })
        .collect();
    tokens.sort();
    let mut dates: Vec<_> = index
        .dates
        .iter()
        .map(|d| (d.param.to_string(), d.start.clone(), d.end.clone()))
        .collect();
    dates.sort();
    // `_lastUpdated` has no row (`fhir::search::ON_THE_ROW`): a Task without other dates
    // has none, but every Task has a token row (its `intent`).
    assert!(!tokens.is_empty());
    assert!(!tokens.iter().any(|t| t.0 == "_id") && !dates.iter().any(|d| d.0 == "_lastUpdated"));
    (tokens, dates)
}

fn written(outcome: WriteOutcome) -> crate::store::StoredVersion {
    match outcome {
        WriteOutcome::Written(version) => version,
        other => panic!("expected a written version, got {other:?}"),
    }
}

/// Each write is one statement that replaces the index rows beside the inserts: the rows
/// after a create, an update, a delete and a create over the deleted Task are exactly those
/// of the version written, and each write has its history row and change event.
#[tokio::test]
async fn each_write_leaves_exactly_its_rows() {
    let db = test_db!();
    let store = db.open().await;
    let mut resource = task("in-progress");
    resource["identifier"] = json!([
        { "system": "urn:ids", "value": "a" },
        { "system": "urn:ids\u{0}x", "value": "b\u{0}" },
    ]);
    resource["authoredOn"] = json!("2024-01-01");
    resource["restriction"] = json!({ "period": { "end": "2030-01-01" } });
    let created = written(
        store
            .write(WriteRequest::Create {
                id: None,
                resource,
                if_none_exist: None,
            })
            .await
            .unwrap(),
    );
    let id = created.id.clone();
    let rows = task_rows(&db, &id).await;
    let (tokens, dates) = expected_index(&created.content().unwrap());
    assert_eq!((rows.tokens, rows.dates), (tokens, dates));
    let whole = crate::fhir::search::index_task(&created.content().unwrap(), BASE);
    assert_eq!(
        rows.columns,
        crate::fhir::search::TaskColumns::from_index(&whole)
    );
    assert!(rows.columns.authored_on.is_some() && rows.columns.due_end.is_some());
    assert_eq!(rows.task, (1, 0));
    assert_eq!(rows.versions, [(1, "create".into(), true)]);
    assert_eq!(rows.changes, [(1, None, "create".into())]);

    let updated = written(
        change(&store, &id, |current| {
            let mut resource = current.unwrap().resource.clone();
            resource["identifier"] = json!([{ "system": "urn:ids", "value": "c" }]);
            resource["authoredOn"] = json!("2025-02-02");
            resource["status"] = json!("on-hold");
            Ok(Decision::Put(resource.into()))
        })
        .await
        .unwrap(),
    );
    let rows = task_rows(&db, &id).await;
    let (tokens, dates) = expected_index(updated.resource.as_ref().unwrap());
    assert!(tokens.iter().any(|t| t.2 == "c") && !tokens.iter().any(|t| t.2 == "a"));
    assert_eq!((rows.tokens, rows.dates), (tokens, dates));
    assert_eq!(rows.task, (2, 0));
    assert_eq!(rows.versions[1], (2, "update".into(), true));
    assert_eq!(rows.changes[1], (2, Some(1), "update".into()));

    written(change(&store, &id, |_| Ok(Decision::Delete)).await.unwrap());
    let rows = task_rows(&db, &id).await;
    assert!(rows.tokens.is_empty() && rows.dates.is_empty());
    assert_eq!(rows.task, (3, 1));
    assert_eq!(rows.versions[2], (3, "delete".into(), false));
    assert_eq!(rows.changes[2], (3, Some(2), "delete".into()));
    // Deleting what is deleted writes nothing.
    let again = change(&store, &id, |_| Ok(Decision::Delete)).await.unwrap();
    assert!(matches!(again, WriteOutcome::Unchanged));

    let recreated = written(
        change(&store, &id, |_| Ok(Decision::Put(task("ready").into())))
            .await
            .unwrap(),
    );
    let rows = task_rows(&db, &id).await;
    let (tokens, dates) = expected_index(recreated.resource.as_ref().unwrap());
    assert_eq!((rows.tokens, rows.dates), (tokens, dates));
    assert_eq!(rows.columns.status.as_deref(), Some("ready"));
    assert_eq!(rows.columns.authored_on, None);
    assert_eq!(rows.task, (4, 0));
    assert_eq!(rows.versions.len(), 4);
    assert_eq!(rows.versions[3], (4, "create".into(), true));
    assert_eq!(rows.changes[3], (4, None, "create".into()));

    // A completed request writes itself, then its focal Task: two versions, two change
    // events, the request's first.
    let mut request = task("completed");
    request["code"] = json!({ "coding": [{
        "system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "suspend" }] });
    request["focus"] = json!({ "reference": format!("Task/{id}") });
    let request_id = create(&store, request).await;
    let changes = store
        .change_events_after(ChangeSeq::ZERO, 100)
        .await
        .unwrap();
    let last: Vec<(&str, i64, Option<i64>)> = changes[changes.len() - 2..]
        .iter()
        .map(|c| {
            let previous = c.previous_version.map(Version::get);
            (c.resource_id.as_str(), c.version.get(), previous)
        })
        .collect();
    assert_eq!(
        last,
        [(request_id.as_str(), 1, None), (id.as_str(), 5, Some(4))]
    );
    let rows = task_rows(&db, &id).await;
    assert_eq!(rows.columns.status.as_deref(), Some("on-hold"));
}

/// Two first writes to one new id in transactions both find nothing to lock: one writes
/// version 1, the other finds the row there when it writes and answers 409, leaving no row
/// of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_locked_first_writes_to_one_id_answer_409() {
    let db = test_db!();
    let store = db.open().await;
    let id = TaskId::generate();
    // Both decisions run (having found nothing) before either writes.
    let both_decided = Arc::new(std::sync::Barrier::new(2));
    let racers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|mark| {
            let (store, id, both_decided) = (store.clone(), id.clone(), both_decided.clone());
            tokio::spawn(async move {
                change_locked(&store, &id, move |current| {
                    assert!(current.is_none());
                    // Off the worker, so that the other racer's task still runs.
                    tokio::task::block_in_place(|| both_decided.wait());
                    let mut resource = task("requested");
                    resource["description"] = json!(mark);
                    Ok(Decision::Put(resource.into()))
                })
                .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(racer.await.unwrap());
    }
    let (won, lost): (Vec<_>, Vec<_>) = outcomes.into_iter().partition(|o| o.is_ok());
    assert_eq!((won.len(), lost.len()), (1, 1), "{won:?} {lost:?}");
    assert_conflict(lost.into_iter().next().unwrap(), "the second first write");
    let winner = written(won.into_iter().next().unwrap().unwrap());
    assert_eq!(winner.version, Version::FIRST);
    let rows = task_rows(&db, &id).await;
    assert_eq!(rows.task, (1, 0));
    assert_eq!(rows.versions, [(1, "create".into(), true)]);
    assert_eq!(rows.changes, [(1, None, "create".into())]);
    let (tokens, _) = expected_index(winner.resource.as_ref().unwrap());
    assert_eq!(rows.tokens, tokens);
    let current = store.read(&id).await.unwrap().unwrap();
    assert_eq!(current.resource, winner.resource.unwrap());
}

/// Two first writes to one new id through the store both decide on finding nothing; the
/// one that writes second finds the row there, writes nothing, and is decided again, under
/// the lock, on the version the other wrote: both land, as versions 1 and 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_first_writes_to_one_id_are_both_written() {
    let db = test_db!();
    let store = db.open().await;
    let id = TaskId::generate();
    let both_decided = Arc::new(std::sync::Barrier::new(2));
    let racers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|mark| {
            let (store, id, both_decided) = (store.clone(), id.clone(), both_decided.clone());
            let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
            tokio::spawn(async move {
                let decisions = seen.clone();
                let outcome = change(&store, &id, move |current| {
                    let mut seen = decisions.lock().unwrap();
                    seen.push(current.map(|c| c.version.get()));
                    if seen.len() == 1 {
                        // Both first decisions run (having found nothing) before either writes.
                        tokio::task::block_in_place(|| both_decided.wait());
                    }
                    let mut resource = task("requested");
                    resource["description"] = json!(mark);
                    Ok(Decision::Put(resource.into()))
                })
                .await;
                let seen = seen.lock().unwrap().clone();
                (written(outcome.expect("each write lands")), seen)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(racer.await.unwrap());
    }
    outcomes.sort_by_key(|(version, _)| version.version);
    let [(first, first_seen), (second, second_seen)] = &outcomes[..] else {
        panic!("two outcomes")
    };
    assert_eq!((first.version, second.version), (v(1), v(2)));
    assert_eq!(first_seen, &[None], "the first write was decided once");
    assert_eq!(
        second_seen,
        &[None, Some(1)],
        "the second was decided again on the first's version"
    );
    let rows = task_rows(&db, &id).await;
    assert_eq!(rows.task, (2, 0));
    assert_eq!(
        rows.versions,
        [(1, "create".into(), true), (2, "update".into(), true)]
    );
    assert_eq!(
        rows.changes,
        [(1, None, "create".into()), (2, Some(1), "update".into())]
    );
    let current = store.read(&id).await.unwrap().unwrap();
    assert_eq!(Some(current.resource), second.resource.clone());
}

/// A change decided on a version that another write replaces before it is written writes
/// nothing of its own (no history row, no index rows, no change event): it is decided again
/// on the new version, and an If-Match on the replaced version is then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_overtaken_before_its_write_is_decided_again() {
    let db = test_db!();
    let store = db.open().await;
    let id = create(&store, task("requested")).await;
    let (decided, wait_decided) = std::sync::mpsc::channel();
    let (go, wait_go) = std::sync::mpsc::channel::<()>();
    let wait_go = Arc::new(std::sync::Mutex::new(wait_go));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let slow = tokio::spawn({
        let (store, id, seen) = (store.clone(), id.clone(), seen.clone());
        async move {
            change(&store, &id, move |current| {
                let first = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(current.map(|c| c.version.get()));
                    seen.len() == 1
                };
                if first {
                    decided.send(()).unwrap();
                    let wait_go = wait_go.clone();
                    tokio::task::block_in_place(move || wait_go.lock().unwrap().recv().unwrap());
                }
                append_if_match(current, None, "a")
            })
            .await
        }
    });
    tokio::task::spawn_blocking(move || wait_decided.recv().unwrap())
        .await
        .unwrap();
    // Meanwhile another update lands: version 2.
    let other = change(&store, &id, |current| {
        append_if_match(current, Some(1), "b")
    })
    .await
    .expect("the other update");
    assert_eq!(written(other).version, v(2));
    go.send(()).unwrap();
    let slow = written(slow.await.unwrap().expect("the overtaken update"));
    assert_eq!(slow.version, v(3));
    assert_eq!(*seen.lock().unwrap(), [Some(1), Some(2)]);
    let current = store.read(&id).await.unwrap().unwrap();
    assert_eq!(current.resource["description"], "ba");
    let rows = task_rows(&db, &id).await;
    assert_eq!(rows.task, (3, 0));
    assert_eq!(rows.versions.len(), 3);
    assert_eq!(
        rows.changes,
        [
            (1, None, "create".into()),
            (2, Some(1), "update".into()),
            (3, Some(2), "update".into())
        ]
    );
    let (tokens, dates) = expected_index(&current.resource);
    assert_eq!((rows.tokens, rows.dates), (tokens, dates));
    let stale = change(&store, &id, |current| {
        append_if_match(current, Some(2), "c")
    })
    .await;
    assert_eq!(
        stale.expect_err("If-Match 2 after version 3").status(),
        StatusCode::PRECONDITION_FAILED
    );
}

/// The guarded statement itself: written only over the version before it, else nothing.
#[tokio::test]
async fn a_version_is_written_only_over_the_one_before_it() {
    use crate::store::write::{NewVersion, UnlockedChange};
    let db = test_db!();
    let store = db.open().await;
    let id = create(&store, task("requested")).await;
    let before = task_rows(&db, &id).await;
    let resource = task("in-progress");
    let whole = crate::fhir::search::index_task(&resource, BASE);
    let columns = crate::fhir::search::TaskColumns::from_index(&whole);
    let index = columns.rows_beside(&whole);
    let now = StoredInstant::now();
    let text = resource.to_string();
    let mut conn = store.pool.acquire().await.unwrap();
    for (version, previous, written) in [(3, Some(2), false), (1, None, false), (2, Some(1), true)]
    {
        let new = NewVersion {
            id: &id,
            version: v(version),
            previous_version: previous.map(v),
            interaction: if version == 1 {
                Interaction::Create
            } else {
                Interaction::Update
            },
            last_updated: &now,
            text: &text,
            priority_rank: 0,
            index: &index,
            columns: &columns,
            existed: version > 1,
        };
        let done = conn.put_version_if_unchanged(&new).await.unwrap();
        assert_eq!(done, written, "version {version}");
        if !written {
            let rows = task_rows(&db, &id).await;
            assert_eq!(
                (
                    rows.task,
                    rows.versions,
                    rows.tokens,
                    rows.dates,
                    rows.changes
                ),
                (
                    before.task,
                    before.versions.clone(),
                    before.tokens.clone(),
                    before.dates.clone(),
                    before.changes.clone()
                ),
                "version {version} wrote nothing"
            );
        }
    }
    let rows = task_rows(&db, &id).await;
    assert_eq!(rows.task, (2, 0));
    assert_eq!(rows.changes.len(), 2);
}

/// `$events` over runs on PostgreSQL (the scenario is `outbox::tests`').
#[tokio::test]
async fn events_replay_runs_exactly() {
    let db = test_db!();
    let store: Arc<dyn Store> = db.open().await;
    crate::outbox::tests::events_replay_runs_exactly(store).await;
}

/// Recording resumes inside a change after a crash between chunks, on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_resumes_inside_a_change() {
    let db = test_db!();
    let url = db.url.clone();
    crate::outbox::tests::recording_resumes_inside_a_change(Box::new(move || {
        let url = url.clone();
        Box::pin(async move {
            let config = StoreConfig {
                postgres_connections: 4,
                ..StoreConfig::default()
            };
            let store: Arc<dyn Store> = Arc::new(
                PostgresStore::open(&url, BASE, &config, Arc::new(Default::default()))
                    .await
                    .expect("opening the store"),
            );
            store
        })
    }))
    .await;
}

/// Start-up from PostgreSQL (the default page-by-page read) puts in force exactly what
/// putting each stored subscription in force one by one does (the scenario is
/// `hub::in_force::tests`').
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_puts_in_force_what_one_by_one_does() {
    let db = test_db!();
    let store: Arc<dyn Store> = db.open().await;
    let url = db.url.clone();
    let clear_forms: crate::hub::ClearForms = Box::new(move |ids| {
        let url = url.clone();
        Box::pin(async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            for id in ids {
                sqlx::query("UPDATE subscription SET matching = NULL WHERE id = $1")
                    .bind(id.as_str())
                    .execute(&mut conn)
                    .await
                    .unwrap();
            }
            conn.close().await.unwrap();
        })
    });
    crate::hub::start_up_puts_in_force_what_one_by_one_does(store.clone(), clear_forms).await;
    store.close().await;
}

/// A put as a group writer receives it: version `version` of Task `id` made of `resource`
/// (the one before it being `previous`), with an AuditEvent.
fn put_of(id: &TaskId, version: i64, previous: Option<i64>, resource: &Value) -> super::tasks::Put {
    let whole = crate::fhir::search::index_task(resource, BASE);
    let columns = crate::fhir::search::TaskColumns::from_index(&whole);
    let index = columns.rows_beside(&whole);
    let now = StoredInstant::now();
    let text = resource.to_string();
    let interaction = if previous.is_some() {
        Interaction::Update
    } else {
        Interaction::Create
    };
    let mut put = super::tasks::Put::of(&crate::store::write::NewVersion {
        id,
        version: v(version),
        previous_version: previous.map(v),
        interaction,
        last_updated: &now,
        text: &text,
        priority_rank: 0,
        index: &index,
        columns: &columns,
        existed: previous.is_some(),
    });
    put.audit = Some(crate::audit::AuditRecord {
        type_code: "rest",
        recorded: now,
        subtype: interaction.as_str().into(),
        outcome: "0",
        agent: Some("Practitioner/p".into()),
        entity: Some(format!("Task/{id}")),
        facts: "{}".into(),
    });
    put
}

fn answered(results: Vec<Result<bool>>) -> Vec<bool> {
    results
        .into_iter()
        .map(|r| r.expect("a put answered"))
        .collect()
}

/// One group statement writes each of its puts only over the version before it, each alone:
/// a stale put beside others writes nothing (no history, index, event or AuditEvent), the
/// others are written whole, an update's old index rows replaced, and their change events
/// follow the group's order.
#[tokio::test]
async fn a_group_writes_each_put_over_the_version_before_it_alone() {
    let db = test_db!();
    let store = db.open().await;
    let stale = create(&store, task("requested")).await;
    let mut before = task("requested");
    before["identifier"] = json!([{ "system": "urn:ids", "value": "old" }]);
    let changed = create(&store, before).await;
    let (first, second) = (TaskId::generate(), TaskId::generate());
    let mut update = task("in-progress");
    update["identifier"] = json!([{ "system": "urn:ids", "value": "new" }]);
    let mut dated = task("in-progress");
    dated["authoredOn"] = json!("2024-01-01");
    dated["identifier"] = json!([{ "system": "urn:ids", "value": "d" }]);
    let last = |table: &'static str| {
        let pool = store.pool.clone();
        async move {
            let sql = format!("SELECT coalesce(max(seq), 0) FROM {table}");
            let seq: i64 = sqlx::query_scalar(AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap();
            seq
        }
    };
    let (changes_before, audits_before) = (last("change_event").await, last("audit_event").await);

    let results = super::groups::write_now(
        &store.group_pool,
        vec![
            put_of(&first, 1, None, &task("requested")),
            put_of(&stale, 3, Some(2), &task("completed")),
            put_of(&changed, 2, Some(1), &update),
            put_of(&second, 1, None, &dated),
        ],
    )
    .await;
    assert_eq!(answered(results), [true, false, true, true]);

    let rows = task_rows(&db, &stale).await;
    assert_eq!(rows.task, (1, 0));
    assert_eq!(rows.versions, [(1, "create".into(), true)]);
    assert_eq!(rows.changes, [(1, None, "create".into())]);
    assert_eq!(rows.columns.status.as_deref(), Some("requested"));
    let rows = task_rows(&db, &changed).await;
    assert_eq!(rows.task, (2, 0));
    assert_eq!(rows.versions.len(), 2);
    assert_eq!(rows.changes[1], (2, Some(1), "update".into()));
    assert_eq!((rows.tokens, rows.dates), expected_index(&update));
    assert_eq!(rows.columns.status.as_deref(), Some("in-progress"));
    for (id, resource) in [(&first, task("requested")), (&second, dated)] {
        let rows = task_rows(&db, id).await;
        assert_eq!(rows.task, (1, 0));
        assert_eq!(rows.versions, [(1, "create".into(), true)]);
        assert_eq!(rows.changes, [(1, None, "create".into())]);
        assert_eq!((rows.tokens, rows.dates), expected_index(&resource));
    }
    let order: Vec<String> =
        sqlx::query_scalar("SELECT resource_id FROM change_event WHERE seq > $1 ORDER BY seq")
            .bind(changes_before)
            .fetch_all(&store.pool)
            .await
            .unwrap();
    assert_eq!(order, [first.as_str(), changed.as_str(), second.as_str()]);
    let audits: Vec<String> =
        sqlx::query_scalar("SELECT entity FROM audit_event WHERE seq > $1 ORDER BY seq")
            .bind(audits_before)
            .fetch_all(&store.pool)
            .await
            .unwrap();
    assert_eq!(
        audits,
        [first.as_str(), changed.as_str(), second.as_str()].map(|id| format!("Task/{id}"))
    );
}

/// Two puts to one id cannot be one upsert: the group is written one put at a time, and the
/// second, no longer over the version before it, is answered false with nothing written.
#[tokio::test]
async fn a_group_with_two_puts_to_one_id_is_written_one_by_one() {
    let db = test_db!();
    let store = db.open().await;
    let (twice, other) = (TaskId::generate(), TaskId::generate());
    let results = super::groups::write_now(
        &store.group_pool,
        vec![
            put_of(&twice, 1, None, &task("requested")),
            put_of(&other, 1, None, &task("requested")),
            put_of(&twice, 1, None, &task("accepted")),
        ],
    )
    .await;
    assert_eq!(answered(results), [true, true, false]);
    let rows = task_rows(&db, &twice).await;
    assert_eq!(rows.versions, [(1, "create".into(), true)]);
    assert_eq!(rows.changes, [(1, None, "create".into())]);
    assert_eq!(rows.columns.status.as_deref(), Some("requested"));
    assert_eq!(task_rows(&db, &other).await.versions.len(), 1);
}

/// Creates and changes of many Tasks at once, as a busy node receives them (written in
/// groups): every one is written, each Task ends with exactly its rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_and_changes_of_many_tasks_are_each_written() {
    let db = test_db!();
    let store = db.open().await;
    let creates = (0..48).map(|_| {
        let store = store.clone();
        tokio::spawn(async move { create(&store, task("requested")).await })
    });
    let mut ids = Vec::new();
    for created in creates {
        ids.push(created.await.unwrap());
    }
    let changes = ids.iter().map(|id| {
        let (store, id) = (store.clone(), id.clone());
        tokio::spawn(async move {
            written(
                change(&store, &id, |c| append_if_match(c, Some(1), "x"))
                    .await
                    .unwrap(),
            )
        })
    });
    for changed in changes {
        assert_eq!(changed.await.unwrap().version, v(2));
    }
    for id in &ids {
        let rows = task_rows(&db, id).await;
        assert_eq!(rows.task, (2, 0));
        assert_eq!(rows.versions.len(), 2);
        assert_eq!(
            rows.changes,
            [(1, None, "create".into()), (2, Some(1), "update".into())]
        );
        assert_eq!(rows.tokens.len(), 1);
    }
}

/// A change is decided first on the version this node wrote last, without reading the Task
/// (`recent`). When another node (here a second store on the same database) wrote the Task
/// since, the guarded write writes nothing, the version is forgotten and the change is decided
/// again on the version read: an If-Match refused on the remembered version is not answered
/// from it, a state rule passed on it is judged again on the Task as it is, and no version,
/// history row or change event is lost or written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_decided_on_a_remembered_version_is_decided_again_if_another_node_wrote() {
    let db = test_db!();
    let here = db.open().await;
    let there = db.open().await;
    let id = create(&here, task("requested")).await;
    assert_eq!(here.recent.get(&id).map(|t| t.version), Some(v(1)));
    assert!(there.recent.get(&id).is_none());
    // The decisions a change runs, by the version each was made on.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let noting = |seen: &Arc<std::sync::Mutex<Vec<i64>>>,
                  decide: fn(Option<&CurrentTask>) -> Result<Decision>| {
        seen.lock().unwrap().clear();
        let seen = seen.clone();
        move |current: Option<&CurrentTask>| {
            seen.lock()
                .unwrap()
                .push(current.map_or(0, |c| c.version.get()));
            decide(current)
        }
    };
    let decisions = |seen: &Arc<std::sync::Mutex<Vec<i64>>>| seen.lock().unwrap().clone();

    // The other node reads (it remembers nothing of this Task) and writes version 2.
    let b = change(
        &there,
        &id,
        noting(&seen, |c| append_if_match(c, Some(1), "b")),
    );
    assert_eq!(written(b.await.unwrap()).version, v(2));
    assert_eq!(decisions(&seen), [1]);
    // Here, If-Match 2 fails on the remembered version 1: decided again on version 2, read.
    let c = change(
        &here,
        &id,
        noting(&seen, |c| append_if_match(c, Some(2), "c")),
    );
    assert_eq!(written(c.await.unwrap()).version, v(3));
    assert_eq!(decisions(&seen), [1, 2]);
    // There, version 2 is remembered and stale: the guarded write fails, then version 3 read.
    let d = change(
        &there,
        &id,
        noting(&seen, |c| append_if_match(c, None, "d")),
    );
    assert_eq!(written(d.await.unwrap()).version, v(4));
    assert_eq!(decisions(&seen), [2, 3]);
    // Remembered and current: one decision, written.
    let done = change(
        &there,
        &id,
        noting(&seen, |c| {
            let mut resource = c.expect("the Task exists").resource.clone();
            resource["status"] = json!("completed");
            Ok(Decision::Put(resource.into()))
        }),
    );
    assert_eq!(written(done.await.unwrap()).version, v(5));
    assert_eq!(decisions(&seen), [4]);
    // Here, version 3 (requested) passes the rule; the Task is completed: refused when
    // decided again on version 5, and nothing written.
    let refused = change(
        &here,
        &id,
        noting(&seen, |c| {
            let current = c.expect("the Task exists");
            if current.resource["status"] == "completed" {
                return Err(Error::business_rule("a completed Task cannot start again"));
            }
            let mut resource = current.resource.clone();
            resource["status"] = json!("in-progress");
            Ok(Decision::Put(resource.into()))
        }),
    )
    .await;
    assert_eq!(
        refused
            .expect_err("a completed Task started again")
            .status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(decisions(&seen), [3, 5]);
    assert!(here.recent.get(&id).is_none());

    let current = here.read(&id).await.unwrap().unwrap();
    assert_eq!(current.resource["description"], "bcd");
    assert_eq!(current.resource["status"], "completed");
    let rows = task_rows(&db, &id).await;
    assert_eq!(rows.task, (5, 0));
    assert_eq!(rows.versions.len(), 5);
    let mut expected = vec![(1, None, "create".to_string())];
    expected.extend((2..=5).map(|n| (n, Some(n - 1), "update".to_string())));
    assert_eq!(rows.changes, expected);
    let (tokens, dates) = expected_index(&current.resource);
    assert_eq!((rows.tokens, rows.dates), (tokens, dates));
}

/// A change that goes on to the locked path (a delete) forgets the remembered version, and
/// the next change reads the Task: a create over the deleted Task, from version 2.
#[tokio::test]
async fn a_locked_change_forgets_the_remembered_version() {
    let db = test_db!();
    let store = db.open().await;
    let id = create(&store, task("requested")).await;
    assert!(store.recent.get(&id).is_some());
    change(&store, &id, |_| Ok(Decision::Delete))
        .await
        .expect("the delete");
    assert!(store.recent.get(&id).is_none());
    let again = change(&store, &id, |current| {
        assert!(current.expect("the deleted Task").deleted);
        Ok(Decision::Put(Arc::new(task("requested"))))
    })
    .await
    .expect("the create over the deleted Task");
    let again = written(again);
    assert_eq!(
        (again.version, again.interaction),
        (v(3), Interaction::Create)
    );
    assert_eq!(store.recent.get(&id).map(|t| t.version), Some(v(3)));
}
