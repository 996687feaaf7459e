//! The shared store for a cluster: PostgreSQL.
//!
//! Every write is one transaction on a connection from the pool; PostgreSQL, not a single
//! writer, settles concurrency. A change locks the Task it replaces (`SELECT … FOR UPDATE`,
//! and the focal Task of a request being completed), so decisions still see the version they
//! replace; conditional creates take one advisory lock so that two cannot both create. What
//! still collides (a unique key, a deadlock) answers 409 "retry" instead of a 500: the
//! decision closures run once, so the store does not retry them itself.
//!
//! Round trips are most of a write's cost, so a Task version (task row, history, search
//! index, change event) is written by one statement of data-modifying CTEs, with the index
//! rows as arrays; a plain create, being that one statement, runs without BEGIN and COMMIT.
//!
//! Outbox `seq` values are taken in one order and committed in another, so the outbox is
//! consumed by marking rows `matched` (see `hub::record_matches`), not by a position. The
//! work-sharing tables (the matcher's lease, delivery claims, the subscription generation)
//! live in `hub`.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
// Every dynamic statement here is assembled from fixed fragments; values are always bound.
use sqlx::{AssertSqlSafe, Postgres, Row, Transaction};
use tokio::sync::Notify;

use super::search_sql::{Placeholder, order_by, where_clause};
use super::{
    ChangeEvent, CurrentTask, Decision, DeliveryReport, EventRecord, MatchBatch, PageRequest,
    SearchPage, Store, StoredSubscription, StoredVersion, SubscriptionChanges, SubscriptionDecide,
    SubscriptionQuery, SubscriptionRecord, WriteOutcome, WriteRequest, collect_page, now_instant,
    stamp,
};
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::fhir::interaction::Interaction;
use crate::fhir::search::{Predicate, index_task, priority_rank};
use crate::fhir::workflow::{self, RequestKind};

mod hub;
#[cfg(test)]
mod tests;

/// The advisory lock every conditional create holds while it searches and creates, so that
/// two of them cannot both find nothing and both create. ("baton:if-none-exist", hashed by
/// hand: any fixed key that nothing else uses would do.)
const CONDITIONAL_CREATE_LOCK: i64 = 0x6261_746f_6e49_4e45;

pub struct PostgresStore {
    pool: PgPool,
    base_url: String,
    committed: Arc<Notify>,
}

impl PostgresStore {
    /// Connects (pool of `config.postgres_connections`), runs the migrations (sqlx's migrator
    /// takes a PostgreSQL advisory lock, so nodes starting together are safe), and returns the
    /// store. `committed` is notified (notify_one) after every commit that wrote change events
    /// (Task writes, deletes, overdue events).
    pub async fn open(
        url: &str,
        base_url: &str,
        config: &StoreConfig,
        committed: Arc<Notify>,
    ) -> Result<PostgresStore> {
        let options = PgConnectOptions::from_str(url)?.application_name("baton");
        // Migrations may rightly run long (an index over a large table); they run on a
        // connection of their own, without the statement timeout the serving pool has.
        let migrations = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("migrations/postgres")
            .run(&migrations)
            .await?;
        migrations.close().await;
        // A statement that runs past the timeout is cancelled by the server itself, so a
        // query whose client has gone (or that outgrew every cap) cannot run on for minutes.
        let options = options.options([(
            "statement_timeout",
            format!("{}s", config.statement_timeout_seconds),
        )]);
        let pool = PgPoolOptions::new()
            .max_connections(config.postgres_connections)
            .min_connections(1)
            // A request waits this long for a free connection, then fails rather than queueing
            // without bound behind a saturated pool.
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(PostgresStore {
            pool,
            base_url: base_url.to_string(),
            committed,
        })
    }

    /// Wakes the outbox consumer: a commit wrote change events.
    fn wrote_changes(&self) {
        self.committed.notify_one();
    }
}

/// Commits the transaction when the work succeeded, rolls it back otherwise.
async fn finish<T>(tx: Transaction<'static, Postgres>, result: Result<T>) -> Result<T> {
    match result {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(e) => {
            // Dropping the transaction would roll it back too, but only once the connection is
            // next used; saying so returns a clean connection to the pool now.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// Turns the database errors that mean "a concurrent transaction got there first" — a unique
/// violation, a serialization failure, a deadlock — into a 409 the client can retry, instead
/// of an opaque 500. `what` names what changed, e.g. "the Task".
fn concurrent(e: Error, what: &str) -> Error {
    let collided = match &e {
        Error::Internal { source, .. } => match source.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("23505" | "40001" | "40P01"))
            }
            _ => false,
        },
        Error::Client(_) => false,
    };
    if collided {
        Error::conflict(format!(
            "{what} changed concurrently with this request; retry the request"
        ))
    } else {
        e
    }
}

/// PostgreSQL text cannot hold U+0000, which JSON strings can (`\u0000`). Values that go into
/// text columns as they are — search index values, search values, error messages — carry the
/// replacement character instead, on the way in and in searches alike, so such a Task is
/// stored and found instead of failing with a 500. (Resources themselves are stored as JSON
/// text, where the character stays escaped.)
fn pg_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Whether a write is one statement, atomic on its own, so that it needs no transaction (and
/// no BEGIN and COMMIT round trips): a create without If-None-Exist that completes no request
/// (see `put_task`) is exactly one `put`. Every other write reads and locks before it writes.
fn single_statement(request: &WriteRequest) -> bool {
    matches!(
        request,
        WriteRequest::Create { resource, if_none_exist: None }
            if workflow::completes_request(None, resource).is_none()
    )
}

async fn apply(
    conn: &mut PgConnection,
    request: WriteRequest,
    base_url: &str,
) -> Result<WriteOutcome> {
    match request {
        WriteRequest::Create {
            resource,
            if_none_exist,
        } => {
            if let Some(predicates) = if_none_exist {
                // Held until commit: the next conditional create searches after this one's
                // Task is visible. A statement of its own: a statement's snapshot is taken
                // when it starts, so a search in the lock's statement would miss a Task
                // committed while the lock was awaited. `PostgresStore::write` already found
                // no match outside the transaction; this is the re-check under the lock. Its
                // cost is bounded by the criteria caps of `fhir::search`, and it delays only
                // other conditional creates: PostgreSQL has no single writer.
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(CONDITIONAL_CREATE_LOCK)
                    .execute(&mut *conn)
                    .await?;
                if let Some(outcome) = existing(matching_tasks(&mut *conn, &predicates).await?)? {
                    return Ok(outcome);
                }
            }
            let id = uuid::Uuid::new_v4().to_string();
            put_task(conn, &id, None, resource, base_url).await
        }
        WriteRequest::Change { id, decide } => {
            let current = lock_current(conn, &id).await?;
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
/// change events, in one transaction, so subscribers hear of both or of neither. The focal
/// Task is locked and judged here, so a concurrent change to it cannot slip between the check
/// and the write; any refusal fails the request's write too.
///
/// Every read comes first; the writes are the last statements of the transaction, the
/// request's and then the focal Task's, each carrying its change event, so the request's
/// change takes the lower `seq`.
async fn put_task(
    conn: &mut PgConnection,
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

/// The focal Task of a request being completed (locked), and the version the request makes
/// of it.
async fn focal_change(
    conn: &mut PgConnection,
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
    let focal = lock_current(conn, &focal_id)
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
async fn status_before_hold(conn: &mut PgConnection, id: &str) -> Result<Option<String>> {
    // `json`, not `jsonb`: it accepts every string JSON allows, `\u0000` included.
    let status: Option<Option<String>> = sqlx::query_scalar(
        "SELECT resource::json ->> 'status' FROM task_version
         WHERE id = $1 AND (resource IS NULL OR (resource::json ->> 'status') <> 'on-hold')
         ORDER BY version DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(status.flatten())
}

/// Writes a version of a Task, its history row, its search index and its change event in one
/// statement (a round trip each is most of a write's cost). Sub-statements of one WITH all
/// run against the statement's snapshot and cannot see one another's rows, so the deletes of
/// the old index rows never see, and never remove, the rows inserted beside them. The
/// change event is inserted by the last statement of the write, so its `seq` is taken as
/// close to the commit as possible: the fewer transactions hold a lower `seq` uncommitted,
/// the fewer changes the matcher sees out of order.
///
/// Two first writes to one new id both find nothing to lock; the second waits here for the
/// first, and its history row (same id, version 1) then fails as a unique violation: 409.
const PUT_TASK: &str = "WITH task_row AS (
       INSERT INTO task (id, version, last_updated, deleted, priority_rank, resource)
       VALUES ($1, $2, $3, 0, $4, $5)
       ON CONFLICT (id) DO UPDATE SET version = excluded.version,
         last_updated = excluded.last_updated, deleted = 0,
         priority_rank = excluded.priority_rank, resource = excluded.resource
     ), version_row AS (
       INSERT INTO task_version (id, version, last_updated, interaction, resource)
       VALUES ($1, $2, $3, $6, $5)
     ), old_tokens AS (
       DELETE FROM task_token WHERE $7 AND task_id = $1
     ), old_dates AS (
       DELETE FROM task_date WHERE $7 AND task_id = $1
     ), tokens AS (
       INSERT INTO task_token (task_id, param, system, value)
       SELECT $1, p, s, v FROM unnest($8::text[], $9::text[], $10::text[]) AS x(p, s, v)
     ), dates AS (
       INSERT INTO task_date (task_id, param, start_at, end_at)
       SELECT $1, p, s, e FROM unnest($11::text[], $12::text[], $13::text[]) AS x(p, s, e)
     )
     INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at)
     VALUES ('Task', $1, $2, $14, $6, $3)";

/// Deletes a Task as one statement, as `PUT_TASK` writes one: the row is kept, marked
/// deleted; the history gains a version without a resource; the index rows go.
const DELETE_TASK: &str = "WITH task_row AS (
       UPDATE task SET version = $2, last_updated = $3, deleted = 1 WHERE id = $1
     ), version_row AS (
       INSERT INTO task_version (id, version, last_updated, interaction, resource)
       VALUES ($1, $2, $3, $5, NULL)
     ), old_tokens AS (
       DELETE FROM task_token WHERE task_id = $1
     ), old_dates AS (
       DELETE FROM task_date WHERE task_id = $1
     )
     INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at)
     VALUES ('Task', $1, $2, $4, $5, $3)";

/// Writes a Task version with `PUT_TASK`: one statement (`single_statement` relies on it).
async fn put(
    conn: &mut PgConnection,
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
    let index = index_task(&resource, base_url);
    let token_params: Vec<&str> = index.tokens.iter().map(|t| t.param).collect();
    let token_systems: Vec<Option<Cow<str>>> = index
        .tokens
        .iter()
        .map(|t| t.system.as_deref().map(pg_text))
        .collect();
    let token_values: Vec<Cow<str>> = index.tokens.iter().map(|t| pg_text(&t.value)).collect();
    let date_params: Vec<&str> = index.dates.iter().map(|d| d.param).collect();
    let date_starts: Vec<&str> = index.dates.iter().map(|d| d.start.as_str()).collect();
    let date_ends: Vec<&str> = index.dates.iter().map(|d| d.end.as_str()).collect();
    sqlx::query(PUT_TASK)
        .bind(id)
        .bind(version)
        .bind(&now)
        .bind(priority_rank(&resource))
        .bind(&text)
        .bind(interaction.as_str())
        // A Task that never existed has no index rows to clear.
        .bind(current.is_some())
        .bind(&token_params)
        .bind(&token_systems)
        .bind(&token_values)
        .bind(&date_params)
        .bind(&date_starts)
        .bind(&date_ends)
        .bind(live.map(|c| c.version))
        .execute(&mut *conn)
        .await?;
    Ok(WriteOutcome::Written(StoredVersion {
        id: id.to_string(),
        version,
        last_updated: now,
        interaction,
        resource: Some(resource),
    }))
}

async fn delete(conn: &mut PgConnection, current: &CurrentTask) -> Result<WriteOutcome> {
    let version = current.version + 1;
    let now = now_instant();
    sqlx::query(DELETE_TASK)
        .bind(&current.id)
        .bind(version)
        .bind(&now)
        .bind(current.version)
        .bind(Interaction::Delete.as_str())
        .execute(&mut *conn)
        .await?;
    Ok(WriteOutcome::Written(StoredVersion {
        id: current.id.clone(),
        version,
        last_updated: now,
        interaction: Interaction::Delete,
        resource: None,
    }))
}

const CURRENT_COLUMNS: &str = "t.id, t.version, t.last_updated, t.deleted, t.resource";

fn current_from_row(row: &PgRow) -> Result<CurrentTask> {
    let text: String = row.try_get("resource")?;
    Ok(CurrentTask {
        id: row.try_get("id")?,
        version: row.try_get("version")?,
        last_updated: row.try_get("last_updated")?,
        deleted: row.try_get::<i32, _>("deleted")? != 0,
        resource: serde_json::from_str(&text)
            .map_err(|e| Error::internal("a stored Task is not valid JSON", e))?,
    })
}

/// A Task row and the length of its stored JSON, for `collect_page`.
fn sized_current_from_row(row: &PgRow) -> Result<(CurrentTask, usize)> {
    let size = row.try_get::<&str, _>("resource")?.len();
    Ok((current_from_row(row)?, size))
}

fn version_from_row(row: &PgRow) -> Result<StoredVersion> {
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

fn change_from_row(row: &PgRow) -> Result<ChangeEvent> {
    let interaction: String = row.try_get("interaction")?;
    Ok(ChangeEvent {
        seq: row.try_get("seq")?,
        resource_type: row.try_get("resource_type")?,
        resource_id: row.try_get("resource_id")?,
        version: row.try_get("version")?,
        previous_version: row.try_get("previous_version")?,
        interaction: Interaction::parse(&interaction)
            .ok_or_else(|| Error::internal("unknown interaction in outbox", interaction))?,
        recorded_at: row.try_get("recorded_at")?,
    })
}

/// The current state of a Task, locked until the transaction ends: a concurrent change waits
/// here, then sees this one's result.
async fn lock_current(conn: &mut PgConnection, id: &str) -> Result<Option<CurrentTask>> {
    let row = sqlx::query(
        "SELECT t.id, t.version, t.last_updated, t.deleted, t.resource FROM task t
         WHERE t.id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.as_ref().map(current_from_row).transpose()
}

async fn read_current<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    id: &str,
) -> Result<Option<CurrentTask>> {
    let row = sqlx::query(
        "SELECT t.id, t.version, t.last_updated, t.deleted, t.resource FROM task t WHERE t.id = $1",
    )
    .bind(id)
    .fetch_optional(executor)
    .await?;
    row.as_ref().map(current_from_row).transpose()
}

/// The Tasks (at most two) that If-None-Exist criteria match, read by the statement that
/// evaluates them, so that a Task deleted meanwhile cannot be reported.
async fn matching_tasks<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    predicates: &[Predicate],
) -> Result<Vec<CurrentTask>> {
    let filter = where_clause(predicates, Placeholder::Dollar, 1);
    let sql = format!(
        "SELECT {CURRENT_COLUMNS} FROM task t WHERE t.deleted = 0 AND ({}) LIMIT 2",
        filter.sql
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    for bind in &filter.binds {
        query = query.bind(pg_text(bind));
    }
    let rows = query.fetch_all(executor).await?;
    rows.iter().map(current_from_row).collect()
}

/// What the Tasks If-None-Exist criteria match mean: nothing to say (none), the Task found
/// (one), or a 412 (more).
fn existing(mut found: Vec<CurrentTask>) -> Result<Option<WriteOutcome>> {
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(WriteOutcome::Existing)),
        _ => Err(Error::precondition_failed(
            "If-None-Exist matches more than one Task; make the criteria more selective",
        )),
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn write(&self, request: WriteRequest) -> Result<WriteOutcome> {
        // If-None-Exist criteria are evaluated first on the pool, outside any transaction and
        // lock: a create that finds its Task (an idempotent retry, the common case) is
        // answered without writing, and a double match without waiting for the lock.
        if let WriteRequest::Create {
            if_none_exist: Some(predicates),
            ..
        } = &request
            && let Some(outcome) = existing(matching_tasks(&self.pool, predicates).await?)?
        {
            return Ok(outcome);
        }
        let started = Instant::now();
        let result = if single_statement(&request) {
            let mut conn = self.pool.acquire().await?;
            apply(&mut conn, request, &self.base_url).await
        } else {
            let mut tx = self.pool.begin().await?;
            let result = apply(&mut tx, request, &self.base_url).await;
            finish(tx, result).await
        };
        let outcome = result.map_err(|e| concurrent(e, "the Task"))?;
        metrics::histogram!("baton_store_commit_seconds").record(started.elapsed().as_secs_f64());
        if matches!(outcome, WriteOutcome::Written(_)) {
            self.wrote_changes();
        }
        Ok(outcome)
    }

    async fn read(&self, id: &str) -> Result<Option<CurrentTask>> {
        read_current(&self.pool, id).await
    }

    async fn read_version(&self, id: &str, version: i64) -> Result<Option<StoredVersion>> {
        let row = sqlx::query(
            "SELECT id, version, last_updated, interaction, resource FROM task_version
             WHERE id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
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
             WHERE id = $1 ORDER BY version DESC LIMIT $2 OFFSET $3",
        )
        .bind(id)
        .bind(count as i64)
        .bind(offset as i64)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM task_version WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        let versions = rows.iter().map(version_from_row).collect::<Result<_>>()?;
        Ok((versions, total as u64))
    }

    async fn search(&self, page: PageRequest<'_>) -> Result<SearchPage> {
        let filter = where_clause(page.predicates, Placeholder::Dollar, 1);
        let total = if page.with_total {
            let sql = format!(
                "SELECT count(*) FROM task t WHERE t.deleted = 0 AND ({})",
                filter.sql
            );
            let mut query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql));
            for bind in &filter.binds {
                query = query.bind(pg_text(bind));
            }
            Some(query.fetch_one(&self.pool).await? as u64)
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
            let next = filter.binds.len() + 1;
            let sql = format!(
                "SELECT {CURRENT_COLUMNS} FROM task t WHERE t.deleted = 0 AND ({}) ORDER BY {}
                 LIMIT ${} OFFSET ${}",
                filter.sql,
                order_by(page.sort),
                next,
                next + 1
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for bind in &filter.binds {
                query = query.bind(pg_text(bind));
            }
            let rows = query
                .bind(page.count as i64)
                .bind(page.offset as i64)
                .fetch(&self.pool);
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
        let filter = where_clause(scope, Placeholder::Dollar, 2);
        let sql = format!(
            "SELECT {CURRENT_COLUMNS} FROM task t WHERE t.deleted = 0
               AND t.id IN (SELECT task_id FROM task_token WHERE param = 'part-of' AND value = ANY($1))
               AND ({}) ORDER BY t.last_updated, t.id LIMIT ${}",
            filter.sql,
            filter.binds.len() + 2
        );
        let parents: Vec<Cow<str>> = parents.iter().map(|p| pg_text(p)).collect();
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(&parents);
        for bind in &filter.binds {
            query = query.bind(pg_text(bind));
        }
        let rows = query.bind(limit as i64).fetch(&self.pool);
        let collected = collect_page(rows, max_bytes, 0, sized_current_from_row).await?;
        Ok(collected.into_page(None))
    }

    async fn change_events_after(&self, _seq: i64, limit: usize) -> Result<Vec<ChangeEvent>> {
        // Not after a position: a change with a lower `seq` may commit after a higher one was
        // matched, so every change not yet recorded is returned (see `outbox_in_commit_order`).
        let rows = sqlx::query(
            "SELECT seq, resource_type, resource_id, version, previous_version, interaction, recorded_at
             FROM change_event WHERE NOT matched ORDER BY seq LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    fn outbox_in_commit_order(&self) -> bool {
        // Concurrent transactions take `seq` values in one order and commit in another.
        false
    }

    async fn last_change_seq(&self) -> Result<i64> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM change_event")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq.unwrap_or(0))
    }

    async fn versions(&self, keys: &[(String, i64)]) -> Result<Vec<StoredVersion>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
        let versions: Vec<i64> = keys.iter().map(|(_, version)| *version).collect();
        let rows = sqlx::query(
            "SELECT v.id, v.version, v.last_updated, v.interaction, v.resource
             FROM task_version v JOIN unnest($1::text[], $2::bigint[]) AS k(id, version)
               ON v.id = k.id AND v.version = k.version",
        )
        .bind(&ids)
        .bind(&versions)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|row| super::readable(version_from_row(row)))
            .collect())
    }

    async fn create_subscription(&self, record: SubscriptionRecord) -> Result<StoredSubscription> {
        let mut tx = self.pool.begin().await?;
        let result = hub::create_subscription(&mut tx, record).await;
        finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the subscription table"))
    }

    async fn replace_subscription(
        &self,
        id: &str,
        decide: SubscriptionDecide,
    ) -> Result<StoredSubscription> {
        let mut tx = self.pool.begin().await?;
        let result = hub::replace_subscription(&mut tx, id, decide).await;
        finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the subscription"))
    }

    async fn delete_subscription(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let result = hub::delete_subscription(&mut tx, id).await;
        finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the subscription"))
    }

    async fn read_subscription(&self, id: &str) -> Result<Option<StoredSubscription>> {
        hub::read_subscription(&self.pool, id).await
    }

    async fn search_subscriptions(
        &self,
        query: &SubscriptionQuery,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredSubscription>, u64)> {
        hub::search_subscriptions(&self.pool, query, count, offset).await
    }

    async fn live_subscriptions(&self) -> Result<Vec<StoredSubscription>> {
        hub::live_subscriptions(&self.pool).await
    }

    async fn outbox_cursor(&self, consumer: &str) -> Result<i64> {
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM outbox_cursor WHERE consumer = $1")
                .bind(consumer)
                .fetch_optional(&self.pool)
                .await?;
        Ok(seq.unwrap_or(0))
    }

    async fn record_matches(&self, batch: MatchBatch) -> Result<Vec<(String, i64)>> {
        let mut tx = self.pool.begin().await?;
        let result = hub::record_matches(&mut tx, batch).await;
        finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the outbox"))
    }

    async fn subscription_events(&self, id: &str, from: i64, to: i64) -> Result<Vec<EventRecord>> {
        hub::subscription_events(&self.pool, id, from, to).await
    }

    async fn record_delivery(&self, holder: &str, report: DeliveryReport) -> Result<()> {
        hub::record_delivery(&self.pool, holder, report).await
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        hub::acquire_lease(&self.pool, name, holder, ttl).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        hub::release_lease(&self.pool, name, holder).await
    }

    async fn claim_subscription(
        &self,
        id: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<StoredSubscription>> {
        hub::claim_subscription(&self.pool, id, holder, ttl).await
    }

    async fn release_subscription(&self, id: &str, holder: &str) -> Result<()> {
        hub::release_subscription(&self.pool, id, holder).await
    }

    async fn due_subscriptions(&self, stale_before: &str, limit: usize) -> Result<Vec<String>> {
        hub::due_subscriptions(&self.pool, stale_before, limit).await
    }

    async fn subscription_generation(&self) -> Result<i64> {
        hub::subscription_generation(&self.pool).await
    }

    async fn subscription_changes_since(&self, generation: i64) -> Result<SubscriptionChanges> {
        hub::subscription_changes_since(&self.pool, generation).await
    }

    async fn prune_events(&self, before: &str) -> Result<u64> {
        hub::prune_events(&self.pool, before).await
    }

    async fn overdue_tasks(&self, now: &str, limit: usize) -> Result<Vec<(String, String)>> {
        hub::overdue_tasks(&self.pool, now, limit).await
    }

    async fn mark_overdue(&self, task_id: &str, due_at: &str, now: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let result = hub::mark_overdue(&mut tx, task_id, due_at, now).await;
        let reported = finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the Task"))?;
        if reported {
            self.wrote_changes();
        }
        Ok(reported)
    }

    async fn next_due(&self, now: &str) -> Result<Option<String>> {
        hub::next_due(&self.pool, now).await
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        // Every write is its own transaction, finished before its caller returns: closing the
        // pool waits for the connections in use and closes them all.
        self.pool.close().await;
    }
}
