//! The embedded store: SQLite in WAL mode with one writer that commits in groups.
//!
//! All writes go through a single writer task that owns the only write connection. It takes
//! every request waiting in its queue (up to `store.max_batch`), applies each inside its own
//! savepoint of one transaction, and commits once. With `synchronous = FULL` each commit is
//! one fsync of the WAL, so the cost of durability is shared by every write in the group:
//! an acknowledged write survives a killed process and a power cut alike. Reads use a pool of
//! read-only connections, which WAL lets run beside the writer.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
// Every dynamic statement here is assembled from fixed fragments; values are always bound.
use futures::FutureExt;
use sqlx::{AssertSqlSafe, Connection, Row};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::search_sql::{Placeholder, order_by, where_clause};
use super::{
    ChangeEvent, CurrentTask, Decision, DeliveryReport, EventRecord, MatchBatch, MatchRow,
    PageRequest, SearchPage, Store, StoredSubscription, StoredVersion, SubscriptionChanges,
    SubscriptionDecide, SubscriptionQuery, SubscriptionRecord, WriteOutcome, WriteRequest,
    collect_page, now_instant, stamp,
};
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::fhir::interaction::Interaction;
use crate::fhir::search::{
    self, DateEntry, Predicate, TaskIndex, TokenEntry, index_task, priority_rank, task_param,
};
use crate::fhir::workflow::{self, RequestKind};
use crate::supervise::{self, Health};

mod hub;

/// A unit of work for the writer. Hub writes share the writer with Task writes so that
/// SQLite sees one writer and every kind of write benefits from group commit.
enum Work {
    Task(WriteRequest),
    /// A create with If-None-Exist whose criteria matched no Task up to outbox position
    /// `checked_through` (evaluated on the read pool, see `SqliteStore::precheck`): the writer
    /// only looks again at the Tasks written since.
    ConditionalCreate {
        resource: Value,
        predicates: Vec<Predicate>,
        checked_through: i64,
    },
    CreateSubscription(Box<SubscriptionRecord>),
    ReplaceSubscription(String, SubscriptionDecide),
    DeleteSubscription(String),
    RecordMatches {
        consumer: String,
        through_seq: i64,
        matches: Vec<MatchRow>,
    },
    RecordDelivery(DeliveryReport),
    PruneEvents(String),
    MarkOverdue {
        task_id: String,
        due_at: String,
        now: String,
    },
    /// Placeholder left behind once a job's work has been taken.
    Taken,
}

/// What a unit of work produced.
enum Done {
    Task(WriteOutcome),
    Subscription(Box<StoredSubscription>),
    Deleted(bool),
    Numbers(Vec<(String, i64)>),
    Count(u64),
    Nothing,
}

struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Done>>,
}

pub struct SqliteStore {
    reads: SqlitePool,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Cancelled by `close`: the writer's end is then expected, not a failure of the node.
    closing: CancellationToken,
    /// Where a full disk is noted, so that `/readyz` says why writes are refused.
    health: Arc<Health>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, runs the migrations and starts the writer.
    /// `committed` is notified after every commit that wrote change events.
    /// The writer runs under `health` as a vital task: if it ever stops before `close`, the
    /// node reports it and stops (see `supervise`).
    pub async fn open(
        path: &Path,
        base_url: &str,
        config: &StoreConfig,
        committed: Arc<Notify>,
        health: Arc<Health>,
    ) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::internal("creating the data directory failed", e))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match config.synchronous {
                crate::config::Synchronous::Full => SqliteSynchronous::Full,
                crate::config::Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-32000")
            .pragma("temp_store", "memory");
        // Migrations run through a one-connection pool: `Migrator::run` on a bare connection
        // does not produce a `Send` future.
        let migrations = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&migrations).await?;
        migrations.close().await;
        let writer = SqliteConnection::connect_with(&options).await?;
        let reads = SqlitePoolOptions::new()
            .max_connections(config.read_connections)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await?;
        let (tx, rx) = mpsc::channel(config.max_batch * 4);
        let base_url = base_url.to_string();
        let max_batch = config.max_batch;
        let closing = CancellationToken::new();
        let handle = tokio::spawn(supervise::watch_vital(
            health.clone(),
            "writer",
            closing.clone(),
            run_writer(writer, rx, base_url, max_batch, committed),
        ));
        Ok(SqliteStore {
            reads,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            closing,
            health,
        })
    }
}

/// The writer loop: group commit of everything queued, one transaction per group.
async fn run_writer(
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
        Work::Task(request) => apply(conn, request, base_url).await.map(Done::Task),
        Work::ConditionalCreate {
            resource,
            predicates,
            checked_through,
        } => create_unless_written(conn, resource, &predicates, checked_through, base_url)
            .await
            .map(Done::Task),
        Work::CreateSubscription(record) => hub::create_subscription(conn, *record)
            .await
            .map(|s| Done::Subscription(Box::new(s))),
        Work::ReplaceSubscription(id, decide) => hub::replace_subscription(conn, &id, decide)
            .await
            .map(|s| Done::Subscription(Box::new(s))),
        Work::DeleteSubscription(id) => {
            hub::delete_subscription(conn, &id).await.map(Done::Deleted)
        }
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

async fn apply(
    conn: &mut SqliteConnection,
    request: WriteRequest,
    base_url: &str,
) -> Result<WriteOutcome> {
    match request {
        // A conditional create never gets here with its criteria: `SqliteStore::write` checks
        // them on the read pool and hands the writer a `Work::ConditionalCreate`.
        WriteRequest::Create { resource, .. } => {
            let id = uuid::Uuid::new_v4().to_string();
            put_task(conn, &id, None, resource, base_url).await
        }
        WriteRequest::Change { id, decide } => {
            let current = load_current(conn, &id).await?;
            match decide(current.as_ref())? {
                Decision::Put(resource) => {
                    put_task(conn, &id, current.as_ref(), resource, base_url).await
                }
                Decision::Delete => match current {
                    Some(current) if !current.deleted => delete(conn, &current).await,
                    _ => Ok(WriteOutcome::Unchanged),
                },
                Decision::Keep => Ok(WriteOutcome::Unchanged),
            }
        }
    }
}

/// Writes a Task version and, when the write completes a request Task (abort, suspend,
/// resume), the change it asks of its focal Task: both versions, with their history and
/// change events, in this job's savepoint, so subscribers hear of both or of neither. The
/// focal Task is loaded and judged here, inside the transaction, so a concurrent change to it
/// cannot slip between the check and the write; any refusal fails the request's write too.
async fn put_task(
    conn: &mut SqliteConnection,
    id: &str,
    current: Option<&CurrentTask>,
    resource: Value,
    base_url: &str,
) -> Result<WriteOutcome> {
    let previous = current.filter(|c| !c.deleted).map(|c| &c.resource);
    let effect = match workflow::completes_request(previous, &resource) {
        Some(kind) => Some(focal_change(conn, id, kind, &resource, base_url).await?),
        None => None,
    };
    let outcome = put(conn, id, current, resource, base_url).await?;
    if let Some((focal, changed)) = effect {
        put(conn, &focal.id, Some(&focal), changed, base_url).await?;
    }
    Ok(outcome)
}

/// The focal Task of a request being completed, and the version the request makes of it.
async fn focal_change(
    conn: &mut SqliteConnection,
    request_id: &str,
    kind: RequestKind,
    request: &Value,
    base_url: &str,
) -> Result<(CurrentTask, Value)> {
    let code = kind.code();
    let focal_id = workflow::focal_task(request, base_url)
        .filter(|focal_id| focal_id != request_id)
        .ok_or_else(|| {
            Error::business_rule(format!(
                "this {code} request names no other Task in Task.focus, so completing it would \
                 change nothing"
            ))
            .at("Task.focus")
        })?;
    let focal = load_current(conn, &focal_id)
        .await?
        .filter(|f| !f.deleted)
        .ok_or_else(|| {
            Error::conflict(format!(
                "Task/{focal_id}, the focal Task of this {code} request, no longer exists, so \
                 the request cannot be completed; reject or cancel it instead"
            ))
            .at("Task.focus")
        })?;
    workflow::check_addressee(request, &focal.resource, base_url)?;
    let before_hold = match kind {
        RequestKind::Resume => status_before_hold(conn, &focal_id).await?,
        RequestKind::Abort | RequestKind::Suspend => None,
    };
    let changed = workflow::apply_request(kind, &focal.resource, request, before_hold.as_deref())?;
    Ok((focal, changed))
}

/// The status a Task had before its current on-hold streak: the newest version that is not
/// on hold, read from the history newest first. `None` when it was created on hold, or when
/// the newest such version is a deletion (what came before belongs to a Task that was gone).
async fn status_before_hold(conn: &mut SqliteConnection, id: &str) -> Result<Option<String>> {
    let status: Option<Option<String>> = sqlx::query_scalar(
        "SELECT json_extract(resource, '$.status') FROM task_version
         WHERE id = ? AND (resource IS NULL OR json_extract(resource, '$.status') <> 'on-hold')
         ORDER BY version DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(status.flatten())
}

async fn put(
    conn: &mut SqliteConnection,
    id: &str,
    current: Option<&CurrentTask>,
    mut resource: Value,
    base_url: &str,
) -> Result<WriteOutcome> {
    let live = current.filter(|c| !c.deleted);
    let version = current.map_or(1, |c| c.version + 1);
    let interaction = if live.is_some() {
        Interaction::Update
    } else {
        Interaction::Create
    };
    let now = now_instant();
    stamp(&mut resource, id, version, &now);
    let text = resource.to_string();
    sqlx::query(
        "INSERT INTO task (id, version, last_updated, deleted, priority_rank, resource)
         VALUES (?, ?, ?, 0, ?, ?)
         ON CONFLICT (id) DO UPDATE SET version = excluded.version,
           last_updated = excluded.last_updated, deleted = 0,
           priority_rank = excluded.priority_rank, resource = excluded.resource",
    )
    .bind(id)
    .bind(version)
    .bind(&now)
    .bind(priority_rank(&resource))
    .bind(&text)
    .execute(&mut *conn)
    .await?;
    insert_version(conn, id, version, &now, interaction, Some(&text)).await?;
    // A Task that never existed has no index rows to clear.
    if current.is_some() {
        clear_index(conn, id).await?;
    }
    write_index(conn, id, &resource, base_url).await?;
    insert_change(
        conn,
        id,
        version,
        live.map(|c| c.version),
        interaction,
        &now,
    )
    .await?;
    Ok(WriteOutcome::Written(StoredVersion {
        id: id.to_string(),
        version,
        last_updated: now,
        interaction,
        resource: Some(resource),
    }))
}

async fn delete(conn: &mut SqliteConnection, current: &CurrentTask) -> Result<WriteOutcome> {
    let version = current.version + 1;
    let now = now_instant();
    sqlx::query("UPDATE task SET version = ?, last_updated = ?, deleted = 1 WHERE id = ?")
        .bind(version)
        .bind(&now)
        .bind(&current.id)
        .execute(&mut *conn)
        .await?;
    insert_version(conn, &current.id, version, &now, Interaction::Delete, None).await?;
    clear_index(conn, &current.id).await?;
    insert_change(
        conn,
        &current.id,
        version,
        Some(current.version),
        Interaction::Delete,
        &now,
    )
    .await?;
    Ok(WriteOutcome::Written(StoredVersion {
        id: current.id.clone(),
        version,
        last_updated: now,
        interaction: Interaction::Delete,
        resource: None,
    }))
}

async fn insert_version(
    conn: &mut SqliteConnection,
    id: &str,
    version: i64,
    now: &str,
    interaction: Interaction,
    resource: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO task_version (id, version, last_updated, interaction, resource) VALUES (?, ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(version)
    .bind(now)
    .bind(interaction.as_str())
    .bind(resource)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn insert_change(
    conn: &mut SqliteConnection,
    id: &str,
    version: i64,
    previous_version: Option<i64>,
    interaction: Interaction,
    now: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at)
         VALUES ('Task', ?, ?, ?, ?, ?)",
    )
    .bind(id)
    .bind(version)
    .bind(previous_version)
    .bind(interaction.as_str())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn clear_index(conn: &mut SqliteConnection, id: &str) -> Result<()> {
    sqlx::query("DELETE FROM task_token WHERE task_id = ?")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    sqlx::query("DELETE FROM task_date WHERE task_id = ?")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Writes the search index rows of one Task, one multi-row insert per table.
async fn write_index(
    conn: &mut SqliteConnection,
    id: &str,
    resource: &Value,
    base_url: &str,
) -> Result<()> {
    let index = index_task(resource, base_url);
    if !index.tokens.is_empty() {
        let sql = format!(
            "INSERT INTO task_token (task_id, param, system, value) VALUES {}",
            vec!["(?, ?, ?, ?)"; index.tokens.len()].join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for token in &index.tokens {
            query = query
                .bind(id)
                .bind(token.param)
                .bind(token.system.as_deref())
                .bind(&token.value);
        }
        query.execute(&mut *conn).await?;
    }
    if !index.dates.is_empty() {
        let sql = format!(
            "INSERT INTO task_date (task_id, param, start_at, end_at) VALUES {}",
            vec!["(?, ?, ?, ?)"; index.dates.len()].join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for date in &index.dates {
            query = query
                .bind(id)
                .bind(date.param)
                .bind(&date.start)
                .bind(&date.end);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

const CURRENT_COLUMNS: &str = "t.id, t.version, t.last_updated, t.deleted, t.resource";

fn current_from_row(row: &SqliteRow) -> Result<CurrentTask> {
    let text: String = row.try_get("resource")?;
    Ok(CurrentTask {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        last_updated: row.try_get("last_updated")?,
        deleted: row.try_get::<i64, _>("deleted")? != 0,
        resource: serde_json::from_str(&text)
            .map_err(|e| Error::internal("a stored Task is not valid JSON", e))?,
    })
}

/// A Task row and the length of its stored JSON, for `collect_page`.
fn sized_current_from_row(row: &SqliteRow) -> Result<(CurrentTask, usize)> {
    let size = row.try_get::<&str, _>("resource")?.len();
    Ok((current_from_row(row)?, size))
}

fn version_from_row(row: &SqliteRow) -> Result<StoredVersion> {
    let interaction: String = row.try_get("interaction")?;
    let text: Option<String> = row.try_get("resource")?;
    Ok(StoredVersion {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        last_updated: row.try_get("last_updated")?,
        interaction: Interaction::parse(&interaction)
            .ok_or_else(|| Error::internal("unknown interaction in history", interaction))?,
        resource: text
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| Error::internal("a stored Task version is not valid JSON", e))?,
    })
}

async fn load_current(conn: &mut SqliteConnection, id: &str) -> Result<Option<CurrentTask>> {
    let sql = format!("SELECT {CURRENT_COLUMNS} FROM task t WHERE t.id = ?");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(current_from_row).transpose()
}

async fn find_ids(
    conn: &mut SqliteConnection,
    predicates: &[Predicate],
    limit: i64,
) -> Result<Vec<String>> {
    let filter = where_clause(predicates, Placeholder::Question, 1);
    let sql = format!(
        "SELECT t.id FROM task t WHERE t.deleted = 0 AND ({}) LIMIT ?",
        filter.sql
    );
    let mut query = sqlx::query_scalar::<_, String>(AssertSqlSafe(sql));
    for bind in &filter.binds {
        query = query.bind(bind);
    }
    Ok(query.bind(limit).fetch_all(&mut *conn).await?)
}

/// What one or two matches of If-None-Exist criteria mean: the Task found, or a 412.
async fn existing(conn: &mut SqliteConnection, found: &[String]) -> Result<Option<WriteOutcome>> {
    match found {
        [] => Ok(None),
        [id] => {
            let current = load_current(conn, id)
                .await?
                .ok_or_else(|| Error::internal("a matched Task vanished", "missing row"))?;
            Ok(Some(WriteOutcome::Existing(current)))
        }
        _ => Err(Error::precondition_failed(
            "If-None-Exist matches more than one Task; make the criteria more selective",
        )),
    }
}

/// Inside the writer: creates the Task unless a Task written after outbox position
/// `checked_through` now matches the criteria. Those are the only Tasks whose match can have
/// changed since the criteria found nothing on the read pool (the writer commits in `seq`
/// order and every Task write has a change event), so the criteria are evaluated in memory
/// (`search::matches`, the meaning the SQL has) over their index rows: the cost grows with the
/// writes committed in between, never with the criteria's SQL or the size of the table.
async fn create_unless_written(
    conn: &mut SqliteConnection,
    resource: Value,
    predicates: &[Predicate],
    checked_through: i64,
    base_url: &str,
) -> Result<WriteOutcome> {
    let changed = indexes_written_after(conn, checked_through).await?;
    let found: Vec<String> = changed
        .into_iter()
        .filter(|(_, index)| search::matches(index, predicates))
        .map(|(id, _)| id)
        .take(2)
        .collect();
    if let Some(outcome) = existing(conn, &found).await? {
        return Ok(outcome);
    }
    let id = uuid::Uuid::new_v4().to_string();
    put_task(conn, &id, None, resource, base_url).await
}

/// The live Tasks written after outbox position `seq`, each with its search index as stored.
async fn indexes_written_after(
    conn: &mut SqliteConnection,
    seq: i64,
) -> Result<Vec<(String, TaskIndex)>> {
    const WRITTEN: &str = "SELECT DISTINCT resource_id FROM change_event WHERE seq > ?";
    let ids: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT t.id FROM task t WHERE t.deleted = 0 AND t.id IN ({WRITTEN}) ORDER BY t.id"
    )))
    .bind(seq)
    .fetch_all(&mut *conn)
    .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut indexes: HashMap<String, TaskIndex> = ids
        .iter()
        .map(|id| (id.clone(), TaskIndex::default()))
        .collect();
    let tokens = sqlx::query(AssertSqlSafe(format!(
        "SELECT task_id, param, system, value FROM task_token WHERE task_id IN ({WRITTEN})"
    )))
    .bind(seq)
    .fetch_all(&mut *conn)
    .await?;
    for row in tokens {
        let id: String = row.try_get("task_id")?;
        let param: String = row.try_get("param")?;
        if let (Some(index), Some(def)) = (indexes.get_mut(&id), task_param(&param)) {
            index.tokens.push(TokenEntry {
                param: def.code,
                system: row.try_get("system")?,
                value: row.try_get("value")?,
            });
        }
    }
    let dates = sqlx::query(AssertSqlSafe(format!(
        "SELECT task_id, param, start_at, end_at FROM task_date WHERE task_id IN ({WRITTEN})"
    )))
    .bind(seq)
    .fetch_all(&mut *conn)
    .await?;
    for row in dates {
        let id: String = row.try_get("task_id")?;
        let param: String = row.try_get("param")?;
        if let (Some(index), Some(def)) = (indexes.get_mut(&id), task_param(&param)) {
            index.dates.push(DateEntry {
                param: def.code,
                start: row.try_get("start_at")?,
                end: row.try_get("end_at")?,
            });
        }
    }
    // In id order, so that which Task a double match reports does not depend on a hash.
    Ok(ids
        .into_iter()
        .filter_map(|id| indexes.remove(&id).map(|index| (id, index)))
        .collect())
}

/// The answer of If-None-Exist criteria on the read pool.
enum Precheck {
    /// Exactly one Task matches: the create is answered with it, and nothing is written.
    Found(CurrentTask),
    /// Nothing matched in the snapshot that ends at this outbox position.
    NoneThrough(i64),
}

impl SqliteStore {
    /// Evaluates If-None-Exist criteria on the read pool, so that their cost (a search) is
    /// paid beside the writer rather than inside it. The outbox position and the search are
    /// read in one transaction, hence one snapshot: what the search did not see is exactly
    /// what was written after that position.
    async fn precheck(&self, predicates: &[Predicate]) -> Result<Precheck> {
        let mut conn = self.reads.acquire().await?;
        let mut tx = conn.begin().await?;
        let seq: i64 = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM change_event")
            .fetch_one(&mut *tx)
            .await?;
        let found = find_ids(&mut tx, predicates, 2).await?;
        let outcome = existing(&mut tx, &found).await?;
        tx.rollback().await?;
        Ok(match outcome {
            Some(WriteOutcome::Existing(current)) => Precheck::Found(current),
            _ => Precheck::NoneThrough(seq),
        })
    }
}

impl SqliteStore {
    /// Queues work for the writer and waits for its commit.
    async fn submit(&self, work: Work) -> Result<Done> {
        let (reply, answer) = oneshot::channel();
        let sender = self.jobs.lock().await.clone().ok_or_else(writer_gone)?;
        sender
            .send(Job { work, reply })
            .await
            .map_err(|_| writer_gone())?;
        let done = answer.await.map_err(|_| writer_gone())?;
        if let Err(e) = &done
            && e.status() == axum::http::StatusCode::INSUFFICIENT_STORAGE
        {
            self.health.note("disk-full");
        }
        done
    }
}

/// The answer to a write when the writer is gone: the node is shutting down, or stopping
/// because the writer died; another node, or this one restarted, will take it.
fn writer_gone() -> Error {
    Error::unavailable(
        "this node cannot write now (its database writer has stopped); retry shortly",
        5,
    )
}

fn unexpected() -> Error {
    Error::internal(
        "the writer answered with the wrong kind of result",
        "mismatch",
    )
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self, request: WriteRequest) -> Result<WriteOutcome> {
        let work = match request {
            WriteRequest::Create {
                resource,
                if_none_exist: Some(predicates),
            } => match self.precheck(&predicates).await? {
                Precheck::Found(current) => return Ok(WriteOutcome::Existing(current)),
                Precheck::NoneThrough(checked_through) => Work::ConditionalCreate {
                    resource,
                    predicates,
                    checked_through,
                },
            },
            request => Work::Task(request),
        };
        match self.submit(work).await? {
            Done::Task(outcome) => Ok(outcome),
            _ => Err(unexpected()),
        }
    }

    async fn versions(&self, keys: &[(String, i64)]) -> Result<Vec<StoredVersion>> {
        let mut found = Vec::with_capacity(keys.len());
        // Chunks keep the statement under SQLite's bound-parameter limit.
        for chunk in keys.chunks(400) {
            let sql = format!(
                "SELECT id, version, last_updated, interaction, resource FROM task_version WHERE (id, version) IN (VALUES {})",
                vec!["(?, ?)"; chunk.len()].join(", ")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for (id, version) in chunk {
                query = query.bind(id).bind(version);
            }
            for row in query.fetch_all(&self.reads).await? {
                found.extend(super::readable(version_from_row(&row)));
            }
        }
        Ok(found)
    }

    async fn create_subscription(&self, record: SubscriptionRecord) -> Result<StoredSubscription> {
        match self
            .submit(Work::CreateSubscription(Box::new(record)))
            .await?
        {
            Done::Subscription(s) => Ok(*s),
            _ => Err(unexpected()),
        }
    }

    async fn replace_subscription(
        &self,
        id: &str,
        decide: SubscriptionDecide,
    ) -> Result<StoredSubscription> {
        match self
            .submit(Work::ReplaceSubscription(id.to_string(), decide))
            .await?
        {
            Done::Subscription(s) => Ok(*s),
            _ => Err(unexpected()),
        }
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool> {
        match self
            .submit(Work::DeleteSubscription(id.to_string()))
            .await?
        {
            Done::Deleted(found) => Ok(found),
            _ => Err(unexpected()),
        }
    }

    async fn read_subscription(&self, id: &str) -> Result<Option<StoredSubscription>> {
        let row = sqlx::query("SELECT * FROM subscription WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.reads)
            .await?;
        row.as_ref().map(hub::subscription_from_row).transpose()
    }

    async fn search_subscriptions(
        &self,
        query: &SubscriptionQuery,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredSubscription>, u64)> {
        hub::search_subscriptions(&self.reads, query, count, offset).await
    }

    async fn live_subscriptions(&self) -> Result<Vec<StoredSubscription>> {
        let rows = sqlx::query("SELECT * FROM subscription WHERE status != 'off'")
            .fetch_all(&self.reads)
            .await?;
        rows.iter().map(hub::subscription_from_row).collect()
    }

    async fn outbox_cursor(&self, consumer: &str) -> Result<i64> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM outbox_cursor WHERE consumer = ?")
                .bind(consumer)
                .fetch_optional(&self.reads)
                .await?;
        Ok(seq.unwrap_or(0))
    }

    async fn record_matches(&self, batch: MatchBatch) -> Result<Vec<(String, i64)>> {
        // One process owns the database file, so the lease holder is always this one and the
        // cursor (changes commit in `seq` order here) says what was consumed.
        let work = Work::RecordMatches {
            consumer: batch.consumer,
            through_seq: batch.changes.last().copied().unwrap_or(0),
            matches: batch.matches,
        };
        match self.submit(work).await? {
            Done::Numbers(numbers) => Ok(numbers),
            _ => Err(unexpected()),
        }
    }

    async fn subscription_events(&self, id: &str, from: i64, to: i64) -> Result<Vec<EventRecord>> {
        hub::subscription_events(&self.reads, id, from, to).await
    }

    async fn record_delivery(&self, _holder: &str, report: DeliveryReport) -> Result<()> {
        match self.submit(Work::RecordDelivery(report)).await? {
            Done::Nothing => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn overdue_tasks(&self, now: &str, limit: usize) -> Result<Vec<(String, String)>> {
        hub::overdue_tasks(&self.reads, now, limit).await
    }

    async fn mark_overdue(&self, task_id: &str, due_at: &str, now: &str) -> Result<bool> {
        let work = Work::MarkOverdue {
            task_id: task_id.to_string(),
            due_at: due_at.to_string(),
            now: now.to_string(),
        };
        match self.submit(work).await? {
            Done::Deleted(reported) => Ok(reported),
            _ => Err(unexpected()),
        }
    }

    async fn next_due(&self, now: &str) -> Result<Option<String>> {
        hub::next_due(&self.reads, now).await
    }

    async fn prune_events(&self, before: &str) -> Result<u64> {
        match self.submit(Work::PruneEvents(before.to_string())).await? {
            Done::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    async fn read(&self, id: &str) -> Result<Option<CurrentTask>> {
        let sql = format!("SELECT {CURRENT_COLUMNS} FROM task t WHERE t.id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.reads)
            .await?;
        row.as_ref().map(current_from_row).transpose()
    }

    async fn read_version(&self, id: &str, version: i64) -> Result<Option<StoredVersion>> {
        let row = sqlx::query(
            "SELECT id, version, last_updated, interaction, resource FROM task_version WHERE id = ? AND version = ?",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(version_from_row).transpose()
    }

    async fn history(
        &self,
        id: &str,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredVersion>, u64)> {
        let rows = sqlx::query(
            "SELECT id, version, last_updated, interaction, resource FROM task_version
             WHERE id = ? ORDER BY version DESC LIMIT ? OFFSET ?",
        )
        .bind(id)
        .bind(count as i64)
        .bind(offset as i64)
        .fetch_all(&self.reads)
        .await?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM task_version WHERE id = ?")
            .bind(id)
            .fetch_one(&self.reads)
            .await?;
        let versions = rows.iter().map(version_from_row).collect::<Result<_>>()?;
        Ok((versions, total as u64))
    }

    async fn search(&self, page: PageRequest<'_>) -> Result<SearchPage> {
        let filter = where_clause(page.predicates, Placeholder::Question, 1);
        let total = if page.with_total {
            let sql = format!(
                "SELECT count(*) FROM task t WHERE t.deleted = 0 AND ({})",
                filter.sql
            );
            let mut query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql));
            for bind in &filter.binds {
                query = query.bind(bind);
            }
            Some(query.fetch_one(&self.reads).await? as u64)
        } else {
            None
        };
        if page.count == 0 {
            return Ok(SearchPage {
                tasks: Vec::new(),
                total,
                truncated: false,
                bytes: 0,
            });
        }
        {
            let sql = format!(
                "SELECT {CURRENT_COLUMNS} FROM task t WHERE t.deleted = 0 AND ({}) ORDER BY {} LIMIT ? OFFSET ?",
                filter.sql,
                order_by(page.sort)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for bind in &filter.binds {
                query = query.bind(bind);
            }
            let rows = query
                .bind(page.count as i64)
                .bind(page.offset as i64)
                .fetch(&self.reads);
            let collected = collect_page(rows, page.max_bytes, 1, sized_current_from_row).await?;
            Ok(collected.into_page(total))
        }
    }

    async fn children_of(
        &self,
        parents: &[String],
        scope: &[Predicate],
        limit: usize,
        max_bytes: usize,
    ) -> Result<SearchPage> {
        if parents.is_empty() {
            return Ok(SearchPage {
                tasks: Vec::new(),
                total: None,
                truncated: false,
                bytes: 0,
            });
        }
        let filter = where_clause(scope, Placeholder::Question, 1);
        let sql = format!(
            "SELECT {CURRENT_COLUMNS} FROM task t WHERE t.deleted = 0
               AND t.id IN (SELECT task_id FROM task_token WHERE param = 'part-of' AND value IN ({}))
               AND ({}) ORDER BY t.last_updated, t.id LIMIT ?",
            vec!["?"; parents.len()].join(", "),
            filter.sql
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for parent in parents {
            query = query.bind(parent);
        }
        for bind in &filter.binds {
            query = query.bind(bind);
        }
        let rows = query.bind(limit as i64).fetch(&self.reads);
        let collected = collect_page(rows, max_bytes, 0, sized_current_from_row).await?;
        Ok(collected.into_page(None))
    }

    fn outbox_in_commit_order(&self) -> bool {
        // One writer, one transaction at a time: `seq` order is commit order.
        true
    }

    // A SQLite database serves one process (`run` opens it for one node), so the leases that
    // share work between nodes are this process's own: granted, and claims are plain reads.
    async fn acquire_lease(&self, _name: &str, _holder: &str, _ttl: Duration) -> Result<bool> {
        Ok(true)
    }

    async fn release_lease(&self, _name: &str, _holder: &str) -> Result<()> {
        Ok(())
    }

    async fn claim_subscription(
        &self,
        id: &str,
        _holder: &str,
        _ttl: Duration,
    ) -> Result<Option<StoredSubscription>> {
        self.read_subscription(id).await
    }

    async fn release_subscription(&self, _id: &str, _holder: &str) -> Result<()> {
        Ok(())
    }

    async fn due_subscriptions(&self, stale_before: &str, limit: usize) -> Result<Vec<String>> {
        hub::due_subscriptions(&self.reads, stale_before, limit).await
    }

    // The subscription index of the only node is updated in-process by the API, so there is
    // nothing to catch up on: the generation stays at 0.
    async fn subscription_generation(&self) -> Result<i64> {
        Ok(0)
    }

    async fn subscription_changes_since(&self, _generation: i64) -> Result<SubscriptionChanges> {
        Ok(SubscriptionChanges::default())
    }

    async fn change_events_after(&self, seq: i64, limit: usize) -> Result<Vec<ChangeEvent>> {
        let rows = sqlx::query(
            "SELECT seq, resource_type, resource_id, version, previous_version, interaction, recorded_at
             FROM change_event WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(seq)
        .bind(limit as i64)
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|row| {
                let interaction: String = row.try_get("interaction")?;
                Ok(ChangeEvent {
                    seq: row.try_get("seq")?,
                    resource_type: row.try_get("resource_type")?,
                    resource_id: row.try_get("resource_id")?,
                    version: row.try_get("version")?,
                    previous_version: row.try_get("previous_version")?,
                    interaction: Interaction::parse(&interaction).ok_or_else(|| {
                        Error::internal("unknown interaction in outbox", interaction)
                    })?,
                    recorded_at: row.try_get("recorded_at")?,
                })
            })
            .collect()
    }

    async fn last_change_seq(&self) -> Result<i64> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM change_event")
            .fetch_one(&self.reads)
            .await?;
        Ok(seq.unwrap_or(0))
    }

    async fn ping(&self) -> Result<()> {
        if self
            .writer
            .lock()
            .await
            .as_ref()
            .is_none_or(|w| w.is_finished())
        {
            return Err(writer_gone());
        }
        sqlx::query("SELECT 1").execute(&self.reads).await?;
        Ok(())
    }

    async fn close(&self) {
        // Dropping the sender lets the writer finish what is queued, then close.
        self.closing.cancel();
        self.jobs.lock().await.take();
        if let Some(handle) = self.writer.lock().await.take() {
            let _ = handle.await;
        }
        self.reads.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::search::{Handling, SearchLimits, parse_query};
    use serde_json::json;

    const BASE: &str = "http://baton.test/fhir";

    async fn open(dir: &Path) -> SqliteStore {
        let config = StoreConfig {
            max_batch: 16,
            read_connections: 2,
            postgres_connections: 1,
            synchronous: crate::config::Synchronous::Normal,
            ..StoreConfig::default()
        };
        SqliteStore::open(
            &dir.join("baton.db"),
            BASE,
            &config,
            Arc::new(Notify::new()),
            Default::default(),
        )
        .await
        .unwrap()
    }

    fn criteria(query: &str) -> Vec<Predicate> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
        let limits = SearchLimits {
            default_count: 10,
            max_count: 10,
        };
        parse_query(&pairs, &limits, BASE, Handling::Strict)
            .unwrap()
            .predicates
    }

    fn order(value: &str) -> Value {
        json!({
            "resourceType": "Task", "status": "requested", "intent": "order",
            "identifier": [{ "system": "urn:orders", "value": value }],
        })
    }

    async fn create(store: &SqliteStore, resource: Value) -> String {
        let request = WriteRequest::Create {
            resource,
            if_none_exist: None,
        };
        match store.write(request).await.unwrap() {
            WriteOutcome::Written(version) => version.id,
            other => panic!("not created: {other:?}"),
        }
    }

    /// A conditional create as the writer gets it, after a read-pool check that saw the
    /// outbox up to `checked_through`.
    async fn conditional(
        store: &SqliteStore,
        value: &str,
        checked_through: i64,
    ) -> Result<WriteOutcome> {
        let work = Work::ConditionalCreate {
            resource: order(value),
            predicates: criteria(&format!("identifier=urn:orders|{value}")),
            checked_through,
        };
        match store.submit(work).await? {
            Done::Task(outcome) => Ok(outcome),
            _ => Err(unexpected()),
        }
    }

    fn existing_id(outcome: &WriteOutcome) -> Option<&str> {
        match outcome {
            WriteOutcome::Existing(current) => Some(&current.id),
            _ => None,
        }
    }

    /// The writer's re-check looks only at Tasks written after the position the read-pool
    /// check saw: a match written since is found, deleted ones are not, and two are a 412.
    #[tokio::test]
    async fn the_writer_rechecks_what_was_written_after_the_precheck() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let before = store.last_change_seq().await.unwrap();
        let a1 = create(&store, order("A-1")).await;
        // Written after `before`: found.
        let outcome = conditional(&store, "A-1", before).await.unwrap();
        assert_eq!(existing_id(&outcome), Some(a1.as_str()));
        // Checked through the present: the writer looks at nothing and creates (the read-pool
        // check, which would have found A-1, is what guards that case).
        let now = store.last_change_seq().await.unwrap();
        let outcome = conditional(&store, "A-1", now).await.unwrap();
        assert!(matches!(outcome, WriteOutcome::Written(_)), "{outcome:?}");
        // Two written since: 412.
        let error = conditional(&store, "A-1", before).await.unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::PRECONDITION_FAILED);
        // A match deleted since no longer counts.
        let b1 = create(&store, order("B-1")).await;
        let decide: crate::store::Decide = Box::new(|_| Ok(Decision::Delete));
        store
            .write(WriteRequest::Change { id: b1, decide })
            .await
            .unwrap();
        let outcome = conditional(&store, "B-1", before).await.unwrap();
        assert!(matches!(outcome, WriteOutcome::Written(_)), "{outcome:?}");
        store.close().await;
    }

    /// Through `Store::write`: none, one and two matches on the read pool.
    #[tokio::test]
    async fn conditional_creates_find_none_one_or_two() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let write = |value: &'static str| {
            store.write(WriteRequest::Create {
                resource: order(value),
                if_none_exist: Some(criteria(&format!("identifier=urn:orders|{value}"))),
            })
        };
        let first = write("C-1").await.unwrap();
        let WriteOutcome::Written(first) = first else {
            panic!("not created: {first:?}");
        };
        let again = write("C-1").await.unwrap();
        assert_eq!(existing_id(&again), Some(first.id.as_str()));
        create(&store, order("C-1")).await;
        let error = write("C-1").await.unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::PRECONDITION_FAILED);
        store.close().await;
    }
}
