//! The SQLite writer: one OS thread owns the only write connection and commits in groups.
//!
//! The thread (`baton-sqlite-writer`) owns a rusqlite `Connection` and blocks on the job
//! queue. It takes every job waiting (up to `store.max_batch`), runs `BEGIN IMMEDIATE`,
//! applies each job inside its own savepoint, and commits once; every statement is a call
//! into SQLite on this thread, with no hand-off to another thread in between. Task writes
//! follow the rules of `store::write` over this connection's statements (`tasks`),
//! subscription writes those of `store::subscriptions` (over `sqlite::subscriptions`); the
//! other hub writes run `hub`'s. The rules are async functions over the `TaskTx` and
//! `SubscriptionTx` traits; here they are driven to completion with `block_on`, since this
//! connection's implementations never wait for anything.
//!
//! Callers queue a `Job` from any task and await its oneshot answer. When the queue closes
//! (`SqliteStore::close`) the thread finishes what is queued, checkpoints the WAL into the
//! database file and ends; `start` returns the future that resolves when it has ended,
//! however it ended, for `supervise::watch_vital`.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use futures::executor::block_on;
use rusqlite::Connection;
use tokio::sync::{Notify, mpsc, oneshot};

use super::hub;
use super::{BUSY_TIMEOUT, CACHE_SIZE};
use crate::config::Synchronous;
use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, EventNumber, StoredInstant, SubscriptionId, TaskId};
use crate::store::subscriptions;
use crate::store::write::{self, TaskWrite};
use crate::store::{
    DeliveryReport, MatchBatch, MatchingFormRow, StoredSubscription, SubscriptionDecide,
    SubscriptionRecord, WriteOutcome,
};
use crate::supervise;

/// Statements kept prepared on the writer's connection. Every statement it runs is fixed
/// text (there are about 30), so all of them stay prepared.
const STATEMENT_CACHE: usize = 64;

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
    /// One chunk of the outbox's matches (at most `hub.fanout_chunk`): a bounded job, so
    /// that Task writes queued behind it wait for one chunk, never for a whole fan-out.
    RecordMatches(MatchBatch),
    /// The results of many delivery attempts, in the order they were reported: one job (one
    /// savepoint) for all the attempts whose results gathered while the previous one
    /// committed.
    RecordDeliveries(Vec<DeliveryReport>),
    FillMatchingForms(Vec<MatchingFormRow>),
    PruneEvents(StoredInstant),
    MarkOverdue {
        task_id: TaskId,
        due_at: StoredInstant,
        now: StoredInstant,
    },
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

/// Opens the write connection with the same settings as the read pool's (`SqliteStore::open`):
/// WAL, the configured durability, the busy timeout, the page cache, temporary tables in
/// memory. The migrations have run already.
pub(super) fn connect(path: &Path, synchronous: Synchronous) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let synchronous = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
         PRAGMA cache_size = {CACHE_SIZE}; PRAGMA temp_store = memory; PRAGMA foreign_keys = ON;"
    ))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Starts the writer thread on `conn`. The future returned resolves when the thread has
/// ended, and panics with the thread's panic if it panicked, so that `supervise::watch_vital`
/// reports how it ended.
pub(super) fn start(
    conn: Connection,
    jobs: mpsc::Receiver<Job>,
    base_url: String,
    max_batch: usize,
    committed: Arc<Notify>,
) -> Result<impl Future<Output = ()> + Send + 'static> {
    spawn_watched("baton-sqlite-writer", move || {
        run_writer(conn, jobs, &base_url, max_batch, &committed);
    })
}

/// Runs `body` on a new OS thread named `name`, and returns a future that resolves when the
/// thread has ended, by return or by panic; a panic is raised again in the future.
fn spawn_watched(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> Result<impl Future<Output = ()> + Send + 'static> {
    let (ended, on_end) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // Dropped when the thread ends, by return or by unwinding.
            let _ended = Ended(Some(ended));
            body();
        })
        .map_err(|e| Error::internal("starting the SQLite writer thread failed", e))?;
    Ok(async move {
        let _ = on_end.await;
        // The thread is past its last statement: joining it waits for no more than its exit.
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        if let Ok(Err(panic)) = joined {
            std::panic::resume_unwind(panic);
        }
    })
}

/// Says that a watched thread ended, when dropped at its end.
struct Ended(Option<oneshot::Sender<()>>);

impl Drop for Ended {
    fn drop(&mut self) {
        if let Some(ended) = self.0.take() {
            let _ = ended.send(());
        }
    }
}

/// The writer loop: group commit of everything queued, one transaction per group.
fn run_writer(
    mut conn: Connection,
    mut jobs: mpsc::Receiver<Job>,
    base_url: &str,
    max_batch: usize,
    committed: &Notify,
) {
    let mut batch = Vec::with_capacity(max_batch);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let size = batch.len();
        let (works, replies): (Vec<Work>, Vec<_>) =
            batch.drain(..).map(|job| (job.work, job.reply)).unzip();
        let results = commit_batch(&mut conn, works, base_url);
        // Task writes and overdue events feed the outbox consumer, which is woken below.
        let wrote = matches!(&results, Ok(r) if r.iter().any(|o| matches!(
            o,
            Ok(Done::Task(WriteOutcome::Written(_)) | Done::Deleted(true))
        )));
        match results {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                // A full disk or an unavailable database was logged (sparingly) where it was
                // classified; anything else is a fault worth a line per batch.
                if e.as_client().is_none() {
                    tracing::error!(error = %crate::error::error_chain(&e), batch = size, "commit failed");
                }
                for reply in replies {
                    let _ = reply.send(Err(e.for_another_request()));
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
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    drop(conn);
}

/// Applies each job in its own savepoint so one bad request does not undo the others.
fn commit_batch(
    conn: &mut Connection,
    works: Vec<Work>,
    base_url: &str,
) -> Result<Vec<Result<Done>>> {
    let committed = run_batch(conn, works, base_url);
    if committed.is_err() && !conn.is_autocommit() {
        // Whatever failed — a statement between the jobs or the commit — no transaction may
        // stay open, or every later batch would fail to begin. (SQLite ends the transaction
        // by itself on a full disk and on I/O errors.)
        let _ = conn.execute_batch("ROLLBACK");
    }
    committed
}

fn run_batch(conn: &mut Connection, works: Vec<Work>, base_url: &str) -> Result<Vec<Result<Done>>> {
    execute(conn, "BEGIN IMMEDIATE")?;
    let mut outcomes = Vec::with_capacity(works.len());
    for work in works {
        execute(conn, "SAVEPOINT job")?;
        // A job that panics (a bug in its decision or in building its rows) fails alone: its
        // savepoint is rolled back like any failed job's, and the writer goes on.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            block_on(apply_work(conn, work, base_url))
        }))
        .unwrap_or_else(|panic| {
            let message = supervise::panic_message(panic.as_ref());
            metrics::counter!("baton_write_job_panics_total").increment(1);
            Err(Error::internal(
                "a write panicked and was rolled back",
                message,
            ))
        });
        if let Err(e) = &outcome {
            if conn.is_autocommit() {
                // SQLite ended the whole transaction (it may, on a full disk or an I/O
                // error): the jobs before this one are undone too, and share its answer.
                return Err(e.for_another_request());
            }
            execute(conn, "ROLLBACK TO job")?;
        }
        execute(conn, "RELEASE job")?;
        outcomes.push(outcome);
    }
    execute(conn, "COMMIT")?;
    Ok(outcomes)
}

/// Runs one of the writer's fixed statements (transaction control), prepared once.
fn execute(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

async fn apply_work(conn: &mut Connection, work: Work, base_url: &str) -> Result<Done> {
    match work {
        Work::Task(task) => write::apply(conn, task, base_url).await.map(Done::Task),
        Work::CreateSubscription(record) => subscriptions::create(conn, *record)
            .await
            .map(|s| Done::Subscription(Box::new(s))),
        Work::ReplaceSubscription(id, decide) => subscriptions::replace(conn, &id, decide)
            .await
            .map(|s| Done::Subscription(Box::new(s))),
        Work::DeleteSubscription(id) => subscriptions::delete(conn, &id).await.map(Done::Deleted),
        Work::RecordMatches(batch) => hub::record_matches(conn, batch).map(Done::Numbers),
        Work::RecordDeliveries(reports) => {
            hub::record_deliveries(conn, reports).map(|()| Done::Nothing)
        }
        Work::FillMatchingForms(forms) => {
            super::subscriptions::fill_matching_forms(conn, &forms).map(|()| Done::Nothing)
        }
        Work::PruneEvents(before) => hub::prune_events(conn, &before).map(Done::Count),
        Work::MarkOverdue {
            task_id,
            due_at,
            now,
        } => hub::mark_overdue(conn, &task_id, &due_at, &now).map(Done::Deleted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervise::{Health, TaskState};
    use tokio_util::sync::CancellationToken;

    /// A writer thread that dies before the node stops is reported as a dead vital task, with
    /// its panic; one that ends with the shutdown is simply stopped.
    #[tokio::test]
    async fn the_end_of_a_watched_thread_reaches_its_supervisor() {
        let health = Arc::new(Health::default());
        let died = spawn_watched("doomed-writer", || panic!("the writer thread broke")).unwrap();
        supervise::watch_vital(health.clone(), "writer", CancellationToken::new(), died).await;
        let writer = health.snapshot()["writer"].clone();
        assert_eq!(writer.state, TaskState::Failed);
        assert!(
            writer
                .last_error
                .is_some_and(|e| e.contains("the writer thread broke")),
            "{:?}",
            health.snapshot()
        );

        let health = Arc::new(Health::default());
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let stopping = spawn_watched("stopping-writer", move || {
            let _ = wait.recv();
        })
        .unwrap();
        let stop = CancellationToken::new();
        let watched = tokio::spawn(supervise::watch_vital(
            health.clone(),
            "writer",
            stop.clone(),
            stopping,
        ));
        tokio::task::yield_now().await;
        assert!(!watched.is_finished(), "the future waits for the thread");
        stop.cancel();
        release.send(()).unwrap();
        watched.await.unwrap();
        assert_eq!(health.snapshot()["writer"].state, TaskState::Stopped);
    }
}
