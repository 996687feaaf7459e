//! What recording one fan-out chunk of 2 000 matches costs the SQLite writer, in the two
//! shapes issue 15 names: 100 catch-all subscriptions × 20 changes (each catch-all gets one
//! run), and 2 000 owner subscriptions × 1 change (2 000 runs of one).
//!
//! `set_based` goes through `Store::record_matches` on a real `SqliteStore` (the writer
//! thread, its transaction and savepoint, the reply), so it measures what the outbox waits
//! for per chunk. `per_match` is the shape it replaced — an `UPDATE … RETURNING` and an
//! `INSERT` of a full row per match into the old event-log layout — run directly on a
//! rusqlite connection in one transaction, without the writer's queue, savepoint or reply:
//! the comparison leaves the new shape the extra work, never the old one. Both files use
//! `synchronous = NORMAL`, so that an fsync per commit does not hide the statements' cost.
//!
//! Run with `cargo bench --bench recording -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use baton::auth::{Identity, Principal, Role};
use baton::config::{StoreConfig, Synchronous};
use baton::fhir::ids::{ChangeSeq, ChannelType, SubscriptionId};
use baton::fhir::notification::SubscriptionStatus;
use baton::store::sqlite::SqliteStore;
use baton::store::{MatchBatch, MatchRow, Store, SubscriptionRecord, WriteRequest};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::json;
use tokio::sync::Notify;

const BASE: &str = "https://hub.example.org/fhir";
const CATCH_ALLS: usize = 100;
const CHANGES: usize = 20;
const OWNERS: usize = 2_000;

fn record() -> SubscriptionRecord {
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
        resource: json!({
            "resourceType": "Subscription", "status": "active", "reason": "bench",
            "criteria": format!("{BASE}/SubscriptionTopic/task-changed"),
            "channel": { "type": "rest-hook", "endpoint": "https://receiver.test/hook",
                         "payload": "application/fhir+json" },
        }),
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
        // The matching form the hub writes beside the resource: the topic, no filter.
        matching: json!({ "v": 1, "topic": format!("{BASE}/SubscriptionTopic/task-changed"), "filters": [] })
            .to_string(),
        live_quota: None,
    }
}

/// A store with `CATCH_ALLS + OWNERS` subscriptions and `CHANGES` Task changes.
async fn store(path: &Path) -> (Arc<dyn Store>, Vec<SubscriptionId>, Vec<ChangeSeq>) {
    let config = StoreConfig {
        synchronous: Synchronous::Normal,
        ..StoreConfig::default()
    };
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(
            path,
            BASE,
            &config,
            Arc::new(Notify::new()),
            Default::default(),
        )
        .await
        .expect("opening the store"),
    );
    let mut ids = Vec::new();
    for _ in 0..CATCH_ALLS + OWNERS {
        ids.push(store.create_subscription(record()).await.unwrap().id);
    }
    let mut seqs = Vec::new();
    for i in 0..CHANGES {
        let resource = json!({ "resourceType": "Task", "status": "requested", "intent": "order",
                               "owner": { "reference": format!("Practitioner/{i}") } });
        store
            .write(WriteRequest::Create {
                id: None,
                resource,
                if_none_exist: None,
            })
            .await
            .unwrap();
        seqs.push(store.last_change_seq().await.unwrap());
    }
    (store, ids, seqs)
}

/// The two chunks measured, as (subscription, change) pairs in the order numbered.
fn shapes(ids: &[SubscriptionId], seqs: &[ChangeSeq]) -> Vec<(&'static str, Vec<MatchRow>)> {
    let catch_alls = seqs
        .iter()
        .flat_map(|seq| {
            ids[..CATCH_ALLS].iter().map(|id| MatchRow {
                subscription_id: id.clone(),
                change_seq: *seq,
            })
        })
        .collect();
    let owners = ids[CATCH_ALLS..]
        .iter()
        .map(|id| MatchRow {
            subscription_id: id.clone(),
            change_seq: seqs[0],
        })
        .collect();
    vec![
        ("100 catch-alls x 20 changes", catch_alls),
        ("2000 owners x 1 change", owners),
    ]
}

/// The event log and statements before set-based recording (migrations/sqlite/0002).
fn per_match_connection(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         CREATE TABLE subscription (id TEXT PRIMARY KEY, status TEXT NOT NULL,
           events_since_start INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE subscription_event (subscription_id TEXT NOT NULL,
           event_number INTEGER NOT NULL, change_seq INTEGER NOT NULL, task_id TEXT NOT NULL,
           version INTEGER NOT NULL, interaction TEXT NOT NULL, occurred_at TEXT NOT NULL,
           PRIMARY KEY (subscription_id, event_number));
         CREATE INDEX subscription_event_by_time ON subscription_event (occurred_at);",
    )
    .unwrap();
    conn
}

fn record_per_match(conn: &mut rusqlite::Connection, matches: &[MatchRow]) {
    let tx = conn.transaction().unwrap();
    {
        let mut count = tx
            .prepare_cached(
                "UPDATE subscription SET events_since_start = events_since_start + 1
                 WHERE id = ? AND status != 'off' RETURNING events_since_start",
            )
            .unwrap();
        let mut log = tx
            .prepare_cached(
                "INSERT INTO subscription_event (subscription_id, event_number, change_seq, task_id, version, interaction, occurred_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?)",
            )
            .unwrap();
        for m in matches {
            let number: i64 = count
                .query_row([m.subscription_id.as_str()], |row| row.get(0))
                .unwrap();
            log.execute(rusqlite::params![
                m.subscription_id.as_str(),
                number,
                m.change_seq.get(),
                "0198c0de-0000-7000-8000-000000000000",
                1,
                "update",
                "2026-12-06T15:50:00.000Z",
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

fn recording(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (store, ids, seqs) = runtime.block_on(store(&dir.path().join("baton.db")));
    let mut old = per_match_connection(&dir.path().join("per-match.db"));
    {
        let tx = old.transaction().unwrap();
        for id in &ids {
            tx.execute(
                "INSERT INTO subscription (id, status) VALUES (?, 'active')",
                [id.as_str()],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }

    let mut group = c.benchmark_group("record_2000_matches");
    for (shape, matches) in shapes(&ids, &seqs) {
        group.bench_with_input(BenchmarkId::new("set_based", shape), &matches, |b, m| {
            b.iter(|| {
                let batch = MatchBatch {
                    consumer: "bench".into(),
                    holder: "bench".into(),
                    changes: Vec::new(),
                    matches: m.clone(),
                    resumed: None,
                    progress: None,
                };
                black_box(runtime.block_on(store.record_matches(batch)).unwrap())
            })
        });
        group.bench_with_input(BenchmarkId::new("per_match", shape), &matches, |b, m| {
            b.iter(|| record_per_match(&mut old, black_box(m)))
        });
    }
    group.finish();
    runtime.block_on(store.close());
}

criterion_group!(benches, recording);
criterion_main!(benches);
