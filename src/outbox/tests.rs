//! The outbox consumer over a real store: fan-out recorded in bounded chunks that Task writes
//! interleave with (SQLite's single writer), recording that resumes inside a change after a
//! crash, and `$events` replaying runs exactly. The scenarios that are about the store take
//! a way to open it, so that `store::postgres::tests` runs them on PostgreSQL too.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;

use serde_json::json;

use super::*;
use crate::auth::{Identity, Principal, Role};
use crate::config::StoreConfig;
use crate::fhir::ids::{ChannelType, EventNumber, StoredInstant};
use crate::fhir::notification::SubscriptionStatus;
use crate::hub::{Command, Commands};
use crate::store::sqlite::SqliteStore;
use crate::store::{
    DeliveryReport, EventRecord, HandshakeOwed, SubscriptionRecord, WriteOutcome, WriteRequest,
};

pub(crate) const BASE: &str = "http://baton.test/fhir";
const NODE: &str = "node-a";

/// Opens the store under test again, on the same database.
pub(crate) type Open = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>>>;

/// A hub with the built-in topics and an empty index, and its scheduler's inbox.
fn hub() -> (Arc<Hub>, Commands) {
    let (hub, commands) = Hub::for_tests(BASE, NODE);
    (Arc::new(hub), commands)
}

fn outbox(store: Arc<dyn Store>, hub: Arc<Hub>, fanout_chunk: usize) -> Outbox {
    Outbox {
        store,
        signals: Arc::new(crate::signals::InProcess::new(hub.sockets.clone())),
        hub,
        node: NODE.into(),
        lease: Duration::from_secs(30),
        generation: 0,
        fanout_chunk,
        fanout_linger: Duration::ZERO,
    }
}

/// An active rest-hook subscription of an admin to `task-changed`, with `filter` if given.
pub(crate) fn subscription(filter: Option<&str>) -> SubscriptionRecord {
    let mut resource = json!({
        "resourceType": "Subscription",
        "status": "active",
        "reason": "fan-out test",
        "criteria": format!("{BASE}/SubscriptionTopic/task-changed"),
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://receiver.test/hook",
            "payload": "application/fhir+json",
        },
    });
    if let Some(filter) = filter {
        resource["_criteria"] = json!({ "extension": [{
            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
            "valueString": filter,
        }]});
    }
    let author = Principal {
        issuer: None,
        subject: "admin".into(),
        role: Role::Admin,
        fhir_user: None,
        performer_types: Vec::new(),
        scopes: None,
        patient: None,
    };
    SubscriptionRecord {
        resource,
        status: SubscriptionStatus::Active,
        topic_url: format!("{BASE}/SubscriptionTopic/task-changed"),
        channel_type: ChannelType::RestHook,
        endpoint: Some("https://receiver.test/hook".into()),
        author: serde_json::to_value(&author).unwrap(),
        owner: Identity {
            issuer: None,
            subject: "admin".into(),
            role: Role::Admin,
            fhir_user: None,
        },
        handshake_pending: false,
        // The matching form the hub writes beside the resource (`hub::in_force::form`).
        matching: json!({
            "v": 1,
            "topic": format!("{BASE}/SubscriptionTopic/task-changed"),
            "filters": filter.into_iter().collect::<Vec<_>>(),
        })
        .to_string(),
        live_quota: None,
    }
}

/// Creates a Task owned by `owner`; returns the `seq` of its change.
pub(crate) async fn write_task(store: &dyn Store, owner: &str) -> ChangeSeq {
    let resource = json!({
        "resourceType": "Task", "status": "requested", "intent": "order",
        "owner": { "reference": owner },
    });
    match store
        .write(WriteRequest::Create {
            id: None,
            resource,
            if_none_exist: None,
        })
        .await
        .expect("writing a Task")
    {
        WriteOutcome::Written(_) => store.last_change_seq().await.unwrap(),
        other => panic!("the create answered {other:?}"),
    }
}

pub(crate) async fn open_sqlite(path: &Path) -> Arc<dyn Store> {
    open_sqlite_waking(path, Arc::new(Notify::new())).await
}

/// Opens a SQLite store whose writer notifies `committed` after each commit that wrote a
/// change, as the server's outbox is woken.
async fn open_sqlite_waking(path: &Path, committed: Arc<Notify>) -> Arc<dyn Store> {
    let config = StoreConfig {
        max_batch: 64,
        read_connections: 4,
        synchronous: crate::config::Synchronous::Normal,
        ..StoreConfig::default()
    };
    Arc::new(
        SqliteStore::open(path, BASE, &config, committed, Default::default())
            .await
            .expect("opening the SQLite store"),
    )
}

fn sqlite_opener(path: &Path) -> Open {
    let path = path.to_path_buf();
    Box::new(move || {
        let path = path.clone();
        Box::pin(async move { open_sqlite(&path).await })
    })
}

/// Polls (bounded, in real time) until `check` holds; fails the test with `what` if it never
/// does. The bound is generous for a loaded machine and is never what a test asserts.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The events a subscription's log must replay: the changes it heard, numbered from 1, as
/// `change_event` holds them.
fn expected_events(changes: &[ChangeEvent], heard: &[ChangeSeq]) -> Vec<EventRecord> {
    heard
        .iter()
        .enumerate()
        .map(|(i, seq)| {
            let change = changes
                .iter()
                .find(|c| c.seq == *seq)
                .expect("the change exists");
            EventRecord {
                event_number: EventNumber::new(i as i64 + 1),
                change_seq: change.seq,
                task_id: change.resource_id.clone(),
                version: change.version,
                interaction: change.interaction,
                occurred_at: change.recorded_at.clone(),
                traceparent: None,
            }
        })
        .collect()
}

fn chunk(
    changes: &[ChangeSeq],
    matches: &[(&SubscriptionId, ChangeSeq)],
    resumed: Option<ChangeProgress>,
    progress: Option<ChangeProgress>,
) -> MatchBatch {
    MatchBatch {
        consumer: MATCHER.into(),
        holder: NODE.into(),
        changes: changes.to_vec(),
        matches: matches
            .iter()
            .map(|(id, seq)| MatchRow {
                subscription_id: (*id).clone(),
                change_seq: *seq,
            })
            .collect(),
        resumed,
        progress,
    }
}

/// Runs `store`'s outbox consumer until `done` holds, then stops it.
async fn consume_until<F, Fut>(outbox: Outbox, what: &str, done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let stop = CancellationToken::new();
    let running = tokio::spawn(outbox.run(Arc::new(Notify::new()), stop.clone()));
    eventually(what, done).await;
    stop.cancel();
    running.await.expect("the consumer ends cleanly");
}

/// `$events` over runs: a subscription that hears consecutive changes has them in one run, a
/// gap starts another; every range asked for replays exactly the events numbered, from
/// `change_event`, and pruning removes only runs wholly delivered.
pub(crate) async fn events_replay_runs_exactly(store: Arc<dyn Store>) {
    let all = store
        .create_subscription(subscription(None))
        .await
        .unwrap()
        .id;
    let some = store
        .create_subscription(subscription(None))
        .await
        .unwrap()
        .id;
    let mut seqs = Vec::new();
    for i in 0..6 {
        seqs.push(write_task(store.as_ref(), &format!("Practitioner/{i}")).await);
    }
    let changes = store
        .change_events_after(ChangeSeq::ZERO, 100)
        .await
        .unwrap();
    assert!(
        store
            .acquire_lease(MATCHER, NODE, Duration::from_secs(30))
            .await
            .unwrap()
    );
    let c = |i: usize| seqs[i];

    // `all` hears changes 0-2, then (after a gap at 3) 4-5; `some` hears 1, then 3-5.
    let first = store
        .record_matches(chunk(
            &[c(0), c(1), c(2)],
            &[(&all, c(0)), (&all, c(1)), (&some, c(1)), (&all, c(2))],
            None,
            None,
        ))
        .await
        .unwrap();
    assert_eq!(first.len(), 4);
    let second = store
        .record_matches(chunk(
            &[c(3), c(4), c(5)],
            &[
                (&some, c(3)),
                (&all, c(4)),
                (&some, c(4)),
                (&all, c(5)),
                (&some, c(5)),
            ],
            None,
            None,
        ))
        .await
        .unwrap();
    assert_eq!(
        second
            .iter()
            .map(|(id, n)| (id == &all, n.get()))
            .collect::<Vec<_>>(),
        [(false, 2), (true, 4), (false, 3), (true, 5), (false, 4)]
    );
    let all_heard = [c(0), c(1), c(2), c(4), c(5)];
    let some_heard = [c(1), c(3), c(4), c(5)];
    for (id, heard) in [(&all, &all_heard[..]), (&some, &some_heard[..])] {
        let expected = expected_events(&changes, heard);
        for from in 1..=heard.len() + 1 {
            for to in from..=heard.len() + 1 {
                let replayed = store
                    .subscription_events(
                        id,
                        EventNumber::new(from as i64),
                        EventNumber::new(to as i64),
                    )
                    .await
                    .unwrap();
                let wanted: Vec<EventRecord> = expected
                    .iter()
                    .filter(|e| (from as i64..=to as i64).contains(&e.event_number.get()))
                    .cloned()
                    .collect();
                assert_eq!(replayed, wanted, "events {from}..={to}");
            }
        }
        let row = store.read_subscription(id).await.unwrap().unwrap();
        assert_eq!(row.events_since_start.get(), heard.len() as i64);
    }

    // Delivered through 2 of the run 1..=3: nothing of it may go.
    let far_future = StoredInstant::parse("9999-12-31T23:59:59.999Z").unwrap();
    let deliver = |through: i64| DeliveryReport::Delivered {
        subscription_id: all.clone(),
        through: EventNumber::new(through),
        handshake: HandshakeOwed::Unchanged,
        status: SubscriptionStatus::Active,
        at: StoredInstant::parse("2026-01-01T00:00:00.000Z").unwrap(),
        rewinds: 0,
    };
    store.record_delivery(NODE, deliver(2)).await.unwrap();
    assert_eq!(store.prune_events(&far_future).await.unwrap(), 0);
    let everything = |id: &SubscriptionId| {
        let (store, id) = (store.clone(), id.clone());
        async move {
            store
                .subscription_events(&id, EventNumber::new(1), EventNumber::new(100))
                .await
                .unwrap()
        }
    };
    assert_eq!(
        everything(&all).await,
        expected_events(&changes, &all_heard)
    );
    // Delivered through 3: the first run goes, the one after it (undelivered) stays.
    store.record_delivery(NODE, deliver(3)).await.unwrap();
    assert_eq!(store.prune_events(&far_future).await.unwrap(), 1);
    assert_eq!(
        everything(&all).await,
        expected_events(&changes, &all_heard)[3..].to_vec()
    );
    assert_eq!(
        everything(&some).await,
        expected_events(&changes, &some_heard)
    );
}

/// A crash between two chunks of one change: recording resumes after the last subscription
/// recorded, so each subscription gets numbers 1..N exactly once. A subscription created
/// after the crash does not hear the old changes; one turned off is skipped.
pub(crate) async fn recording_resumes_inside_a_change(open: Open) {
    let store = open().await;
    let mut ids = Vec::new();
    for _ in 0..7 {
        ids.push(
            store
                .create_subscription(subscription(None))
                .await
                .unwrap()
                .id,
        );
    }
    ids.sort();
    let first = write_task(store.as_ref(), "Practitioner/1").await;
    let second = write_task(store.as_ref(), "Practitioner/2").await;
    let changes = store
        .change_events_after(ChangeSeq::ZERO, 100)
        .await
        .unwrap();
    assert!(
        store
            .acquire_lease(MATCHER, NODE, Duration::from_secs(30))
            .await
            .unwrap()
    );
    // The consumer recorded the first chunk of the first change, then the node died.
    let progress = ChangeProgress {
        seq: first,
        through: ids[2].clone(),
    };
    let numbered = store
        .record_matches(chunk(
            &[],
            &[(&ids[0], first), (&ids[1], first), (&ids[2], first)],
            None,
            Some(progress.clone()),
        ))
        .await
        .unwrap();
    assert_eq!(numbered.len(), 3);
    // A chunk that does not continue from the recorded progress is refused whole.
    let stale = store
        .record_matches(chunk(&[first], &[(&ids[0], first)], None, None))
        .await;
    assert!(
        stale.is_err(),
        "a chunk out of turn was recorded: {stale:?}"
    );
    store.close().await;
    drop(store);

    let store = open().await;
    assert_eq!(store.match_progress(MATCHER).await.unwrap(), Some(progress));
    // Meanwhile one subscription was turned off and one created.
    let off = ids[5].clone();
    store
        .replace_subscription(
            &off,
            Box::new(|_| {
                let mut record = subscription(None);
                record.status = SubscriptionStatus::Off;
                record.resource["status"] = json!("off");
                Ok(record)
            }),
        )
        .await
        .unwrap();
    let late = store
        .create_subscription(subscription(None))
        .await
        .unwrap()
        .id;
    let (hub, _commands) = hub();
    hub.put_live_in_force(store.as_ref()).await.unwrap();
    let consumer = outbox(store.clone(), hub, 2);
    let waiting = store.clone();
    let last = ids[6].clone();
    consume_until(consumer, "the rest of the fan-out is recorded", || {
        let (store, last) = (waiting.clone(), last.clone());
        async move {
            store
                .read_subscription(&last)
                .await
                .unwrap()
                .unwrap()
                .events_since_start
                == EventNumber::new(2)
        }
    })
    .await;

    assert_eq!(store.match_progress(MATCHER).await.unwrap(), None);
    for id in &ids {
        let events = store
            .subscription_events(id, EventNumber::new(1), EventNumber::new(100))
            .await
            .unwrap();
        let row = store.read_subscription(id).await.unwrap().unwrap();
        if *id == off {
            assert_eq!(row.events_since_start, EventNumber::ZERO, "{id}");
            assert!(events.is_empty(), "{id}: {events:?}");
        } else {
            assert_eq!(events, expected_events(&changes, &[first, second]), "{id}");
            assert_eq!(row.events_since_start, EventNumber::new(2), "{id}");
        }
    }
    let late_row = store.read_subscription(&late).await.unwrap().unwrap();
    assert_eq!(late_row.events_since_start, EventNumber::ZERO);
    store.close().await;
}

#[tokio::test]
async fn sqlite_events_replay_runs_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_sqlite(&dir.path().join("baton.db")).await;
    events_replay_runs_exactly(store.clone()).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_recording_resumes_inside_a_change() {
    let dir = tempfile::tempdir().unwrap();
    recording_resumes_inside_a_change(sqlite_opener(&dir.path().join("baton.db"))).await;
}

/// Copies subscription `template` under `count` new ids (`fan00001`, …) in one statement per
/// column set, on a connection of its own while no store has the file open: a fast way to
/// a hundred thousand stored subscriptions, each the template's row with its own id.
fn clone_subscriptions(
    path: &Path,
    template: &SubscriptionId,
    count: usize,
) -> Vec<SubscriptionId> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('subscription')")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<std::result::Result<_, _>>()
        .unwrap();
    let select: Vec<String> = columns
        .iter()
        .map(|c| match c.as_str() {
            "id" => "n.id".to_string(),
            "resource" => "json_set(s.resource, '$.id', n.id)".to_string(),
            other => format!("s.{other}"),
        })
        .collect();
    conn.execute_batch("BEGIN").unwrap();
    conn.execute(
        &format!(
            "INSERT INTO subscription ({}) SELECT {} FROM subscription s,
               (WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < ?2)
                SELECT printf('fan%05d', i) AS id FROM k) n
             WHERE s.id = ?1",
            columns.join(", "),
            select.join(", ")
        ),
        rusqlite::params![template.as_str(), count as i64],
    )
    .unwrap();
    conn.execute_batch("COMMIT").unwrap();
    (1..=count)
        .map(|i| SubscriptionId::parse(&format!("fan{i:05}")).unwrap())
        .collect()
}

/// A Task write is answered while a 100 000-match fan-out is being recorded: the consumer
/// sends it in bounded chunks, so the write waits for one chunk, not for the fan-out. What is
/// asserted is order, not time: when the write's answer arrives, the fan-out is still inside
/// its change (progress recorded, fewer events numbered than matched), and the delivery of
/// the subscriptions already recorded has been woken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_write_is_answered_between_chunks_of_a_large_fan_out() {
    const LISTENERS: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    let store = open_sqlite(&path).await;
    let template = store
        .create_subscription(subscription(Some("Task?owner=Practitioner/busy")))
        .await
        .unwrap()
        .id;
    store.close().await;
    drop(store);
    clone_subscriptions(&path, &template, LISTENERS - 1);

    let store = open_sqlite(&path).await;
    let (hub, mut commands) = hub();
    hub.put_live_in_force(store.as_ref()).await.unwrap();
    let heard = write_task(store.as_ref(), "Practitioner/busy").await;
    let stop = CancellationToken::new();
    let running =
        tokio::spawn(outbox(store.clone(), hub, 2000).run(Arc::new(Notify::new()), stop.clone()));
    let progress =
        |store: Arc<dyn Store>| async move { store.match_progress(MATCHER).await.unwrap() };
    eventually("the first chunk is recorded", || {
        let store = store.clone();
        async move { progress(store).await.is_some() }
    })
    .await;

    // Heard by nobody: it only has to get through the writer.
    write_task(store.as_ref(), "Practitioner/idle").await;
    let inside = progress(store.clone()).await;
    assert!(
        inside.as_ref().is_some_and(|p| p.seq == heard),
        "the write was answered after the fan-out's last chunk: {inside:?}"
    );
    // A chunk's subscriptions are woken once it commits, before the next chunk is sent: the
    // first wakes arrive while the fan-out is still inside the change. (They are waited for
    // rather than counted at the write's answer: the consumer may not have run since the
    // chunk committed.)
    let mut woken = 0;
    while woken == 0 {
        match tokio::time::timeout(Duration::from_secs(30), commands.recv()).await {
            Ok(Some(Command::Wake(_))) => woken += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("no delivery was woken during the fan-out"),
        }
    }
    while let Ok(command) = commands.try_recv() {
        woken += usize::from(matches!(command, Command::Wake(_)));
    }
    let still_inside = progress(store.clone()).await;
    assert!(
        woken < LISTENERS && still_inside.is_some(),
        "deliveries are woken chunk by chunk: {woken} woken, progress {still_inside:?}"
    );

    let last = SubscriptionId::parse(&format!("fan{:05}", LISTENERS - 1)).unwrap();
    eventually("the fan-out is recorded", || {
        let (store, last) = (store.clone(), last.clone());
        async move {
            store
                .read_subscription(&last)
                .await
                .unwrap()
                .unwrap()
                .events_since_start
                == EventNumber::new(1)
        }
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    assert_eq!(store.match_progress(MATCHER).await.unwrap(), None);
    // Every listener heard the change once, numbered 1.
    let (counted, numbered, first) = {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.query_row(
            "SELECT (SELECT count(*) FROM subscription WHERE events_since_start = 1),
                    (SELECT count(*) FROM subscription_event WHERE event_number = 1 AND events = 1),
                    (SELECT count(*) FROM subscription_event WHERE change_seq = ?1)",
            [heard],
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            },
        )
        .unwrap()
    };
    assert_eq!(
        (counted, numbered, first),
        (LISTENERS as i64, LISTENERS as i64, LISTENERS as i64)
    );
    store.close().await;
}

/// With no subscription in force a batch of changes is passed over without reading their
/// versions (none is kept for deliveries) and the cursor still moves past it; once a
/// subscription is in force, the next change's version is read, kept and numbered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_nobody_listens_to_are_passed_over_without_reading_their_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_sqlite(&dir.path().join("baton.db")).await;
    let (hub, _commands) = hub();
    let consumer = outbox(store.clone(), hub.clone(), 100);
    assert!(
        store
            .acquire_lease(MATCHER, NODE, Duration::from_secs(30))
            .await
            .unwrap()
    );
    let unheard = write_task(store.as_ref(), "Practitioner/nobody").await;
    let changes = store
        .change_events_after(ChangeSeq::ZERO, 10)
        .await
        .unwrap();
    let done = consumer.process(&changes, true, None).await.unwrap();
    assert_eq!((done.through, done.persisted), (unheard, true));
    assert_eq!(store.outbox_cursor(MATCHER).await.unwrap(), unheard);
    let key = (changes[0].resource_id.clone(), changes[0].version);
    assert!(
        hub.shared.version(&key).is_none(),
        "a change nobody listens to had its version read"
    );

    let listening = store
        .create_subscription(subscription(Some("Task?owner=Practitioner/heard")))
        .await
        .unwrap();
    hub.put_in_force(&listening, Occasion::Written);
    let heard = write_task(store.as_ref(), "Practitioner/heard").await;
    let changes = store.change_events_after(unheard, 10).await.unwrap();
    assert_eq!(
        consumer
            .process(&changes, true, None)
            .await
            .unwrap()
            .through,
        heard
    );
    let key = (changes[0].resource_id.clone(), changes[0].version);
    assert!(hub.shared.version(&key).is_some());
    let numbered = store
        .read_subscription(&listening.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(numbered.events_since_start, EventNumber::new(1));
    store.close().await;
}

/// After a broad fan-out the consumer lingers (`hub.fanout_linger_ms`) before reading again:
/// two changes committed meanwhile, each waking it, are recorded together, so each broad
/// listener gets one run for both instead of one run per commit. Without the linger the
/// first commit's wake-up records the first change alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broad_fan_out_the_next_changes_are_recorded_together() {
    const LISTENERS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    let committed = Arc::new(Notify::new());
    let store = open_sqlite_waking(&path, committed.clone()).await;
    let (hub, _commands) = hub();
    let mut listeners = Vec::new();
    for _ in 0..LISTENERS {
        let stored = store.create_subscription(subscription(None)).await.unwrap();
        hub.put_in_force(&stored, Occasion::Written);
        listeners.push(stored.id);
    }
    let mut consumer = outbox(store.clone(), hub, 2000);
    // Long enough that both later writes commit inside it even on a loaded machine; the test
    // never waits for it to pass before checking.
    consumer.fanout_linger = Duration::from_secs(5);
    let stop = CancellationToken::new();
    let running = tokio::spawn(consumer.run(committed, stop.clone()));
    let heard = |store: Arc<dyn Store>, id: SubscriptionId| async move {
        store
            .read_subscription(&id)
            .await
            .unwrap()
            .unwrap()
            .events_since_start
    };
    write_task(store.as_ref(), "Practitioner/a").await;
    eventually("the first change is recorded", || {
        let (store, first) = (store.clone(), listeners[0].clone());
        async move { heard(store, first).await == EventNumber::new(1) }
    })
    .await;
    write_task(store.as_ref(), "Practitioner/b").await;
    write_task(store.as_ref(), "Practitioner/c").await;
    eventually("the next two changes are recorded", || {
        let (store, first) = (store.clone(), listeners[0].clone());
        async move { heard(store, first).await == EventNumber::new(3) }
    })
    .await;
    stop.cancel();
    running.await.expect("the consumer ends cleanly");

    let db = rusqlite::Connection::open(&path).unwrap();
    for id in &listeners {
        let runs: Vec<(i64, i64)> = db
            .prepare(
                "SELECT event_number, events FROM subscription_event
                 WHERE subscription_id = ? ORDER BY event_number",
            )
            .unwrap()
            .query_map([id.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<std::result::Result<_, _>>()
            .unwrap();
        assert_eq!(
            runs,
            vec![(1, 1), (2, 2)],
            "{id}: the two changes after the broad fan-out were not recorded as one run"
        );
    }
    store.close().await;
}
