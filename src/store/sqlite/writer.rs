//! The SQLite writer: one task owns the only write connection and commits in groups.
//!
//! It takes every job waiting in its queue (up to `store.max_batch`), applies each inside its
//! own savepoint of one transaction, and commits once. Task writes follow the rules of
//! `store::write` over this connection's statements (`tasks`), subscription writes those of
//! `store::subscriptions` (over `sqlite::subscriptions`); the other hub writes run `hub`'s.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use sqlx::Connection;
use sqlx::sqlite::SqliteConnection;
use tokio::sync::{Notify, mpsc, oneshot};

use super::hub;
use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, EventNumber, StoredInstant, SubscriptionId, TaskId};
use crate::store::subscriptions;
use crate::store::write::{self, TaskWrite};
use crate::store::{
    DeliveryReport, MatchRow, StoredSubscription, SubscriptionDecide, SubscriptionRecord,
    WriteOutcome,
};
use crate::supervise;

/// A unit of work for the writer. Hub writes share the writer with Task writes so that
/// SQLite sees one writer and every kind of write benefits from group commit.
pub(super) enum Work {
    /// A Task write. A conditional create comes with what its criteria matched on the read
    /// pool (`SqliteStore::precheck`): nothing, up to an outbox position, so that the writer
    /// only looks again at the Tasks written since.
    Task(TaskWrite<ChangeSeq>),
    CreateSubscription(Box<SubscriptionRecord>),
    ReplaceSubscription(SubscriptionId, SubscriptionDecide),
    DeleteSubscription(SubscriptionId),
    RecordMatches {
        consumer: String,
        through_seq: ChangeSeq,
        matches: Vec<MatchRow>,
    },
    RecordDelivery(DeliveryReport),
    PruneEvents(StoredInstant),
    MarkOverdue {
        task_id: TaskId,
        due_at: StoredInstant,
        now: StoredInstant,
    },
    /// Placeholder left behind once a job's work has been taken.
    Taken,
}

/// What a unit of work produced.
pub(super) enum Done {
    Task(WriteOutcome),
    Subscription(Box<StoredSubscription>),
    Deleted(bool),
    Numbers(Vec<(SubscriptionId, EventNumber)>),
    Count(u64),
    Nothing,
}

pub(super) struct Job {
    pub(super) work: Work,
    pub(super) reply: oneshot::Sender<Result<Done>>,
}

/// The writer loop: group commit of everything queued, one transaction per group.
pub(super) async fn run_writer(
    mut conn: SqliteConnection,
    mut jobs: mpsc::Receiver<Job>,
    base_url: String,
    max_batch: usize,
    committed: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while jobs.recv_many(&mut batch, max_batch).await > 0 {
        let started = std::time::Instant::now();
        let size = batch.len();
        let results = commit_batch(&mut conn, &mut batch, &base_url).await;
        // Task writes and overdue events feed the outbox consumer, which is woken below.
        let wrote = matches!(&results, Ok(r) if r.iter().any(|o| matches!(
            o,
            Ok(Done::Task(WriteOutcome::Written(_)) | Done::Deleted(true))
        )));
        match results {
            Ok(outcomes) => {
                for (job, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
            Err(e) => {
                // A full disk or an unavailable database was logged (sparingly) where it was
                // classified; anything else is a fault worth a line per batch.
                if e.as_client().is_none() {
                    tracing::error!(error = %crate::error::error_chain(&e), batch = size, "commit failed");
                }
                for job in batch.drain(..) {
                    let _ = job.reply.send(Err(e.for_another_request()));
                }
            }
        }
        metrics::histogram!("baton_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("baton_store_commit_batch_size").record(size as f64);
        if wrote {
            committed.notify_one();
        }
    }
    // The queue is closed: fold the WAL back into the database so the file is self-contained.
    let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
}

/// Applies each job in its own savepoint so one bad request does not undo the others.
async fn commit_batch(
    conn: &mut SqliteConnection,
    batch: &mut [Job],
    base_url: &str,
) -> Result<Vec<Result<Done>>> {
    let committed = run_batch(conn, batch, base_url).await;
    if committed.is_err() {
        // Whatever failed — a statement between the jobs, the commit, or SQLite ending the
        // transaction by itself (it does on a full disk and on I/O errors) — no transaction
        // may stay open, or every later batch would fail to begin.
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    }
    committed
}

async fn run_batch(
    conn: &mut SqliteConnection,
    batch: &mut [Job],
    base_url: &str,
) -> Result<Vec<Result<Done>>> {
    sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
    // Every statement is a round trip to SQLite's thread, so a lone job goes without the
    // savepoint pair: its failure rolls back the whole (otherwise empty) transaction.
    let alone = batch.len() == 1;
    let mut outcomes = Vec::with_capacity(batch.len());
    for job in batch.iter_mut() {
        // The work is moved out: its closure runs once.
        let work = std::mem::replace(&mut job.work, Work::Taken);
        if !alone {
            sqlx::query("SAVEPOINT job").execute(&mut *conn).await?;
        }
        // A job that panics (a bug in its decision or in building its rows) fails alone: its
        // savepoint is rolled back like any failed job's, and the writer goes on.
        let outcome = AssertUnwindSafe(apply_work(conn, work, base_url))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let message = supervise::panic_message(panic.as_ref());
                metrics::counter!("baton_write_job_panics_total").increment(1);
                Err(Error::internal(
                    "a write panicked and was rolled back",
                    message,
                ))
            });
        if !alone {
            if outcome.is_ok() {
                sqlx::query("RELEASE job").execute(&mut *conn).await?;
            } else {
                sqlx::query("ROLLBACK TO job").execute(&mut *conn).await?;
                sqlx::query("RELEASE job").execute(&mut *conn).await?;
            }
        }
        outcomes.push(outcome);
    }
    if alone && outcomes.first().is_some_and(Result::is_err) {
        sqlx::query("ROLLBACK").execute(&mut *conn).await?;
        return Ok(outcomes);
    }
    sqlx::query("COMMIT").execute(&mut *conn).await?;
    Ok(outcomes)
}

async fn apply_work(conn: &mut SqliteConnection, work: Work, base_url: &str) -> Result<Done> {
    match work {
        Work::Task(task) => write::apply(conn, task, base_url).await.map(Done::Task),
        Work::CreateSubscription(record) => subscriptions::create(conn, *record)
            .await
            .map(|s| Done::Subscription(Box::new(s))),
        Work::ReplaceSubscription(id, decide) => subscriptions::replace(conn, &id, decide)
            .await
            .map(|s| Done::Subscription(Box::new(s))),
        Work::DeleteSubscription(id) => subscriptions::delete(conn, &id).await.map(Done::Deleted),
        Work::RecordMatches {
            consumer,
            through_seq,
            matches,
        } => hub::record_matches(conn, &consumer, through_seq, matches)
            .await
            .map(Done::Numbers),
        Work::RecordDelivery(report) => hub::record_delivery(conn, report)
            .await
            .map(|()| Done::Nothing),
        Work::PruneEvents(before) => hub::prune_events(conn, &before).await.map(Done::Count),
        Work::MarkOverdue {
            task_id,
            due_at,
            now,
        } => hub::mark_overdue(conn, &task_id, &due_at, &now)
            .await
            .map(Done::Deleted),
        Work::Taken => Err(Error::internal("a job ran twice", "work already taken")),
    }
}
