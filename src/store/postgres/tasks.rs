//! PostgreSQL statements of a Task write: `store::write::TaskTx` on a connection, inside its
//! transaction (or alone, for a write that is one statement), and the If-None-Exist search.
//! A change locks the Task it replaces (`SELECT … FOR UPDATE`), so decisions see the version
//! they replace; conditional creates take one advisory lock so that two cannot both create.

use std::borrow::Cow;
use std::sync::Arc;

use sqlx::postgres::PgConnection;
// Every dynamic statement here is assembled from fixed fragments; values are always bound.
use sqlx::AssertSqlSafe;

use super::pg_text;
use crate::audit::AuditRecord;
use crate::error::{Error, Result};
use crate::fhir::ids::{StoredInstant, TaskId, Version};
use crate::fhir::search::{Predicate, TaskColumns, TaskIndex};
use crate::store::rows::{CURRENT_COLUMNS, current_from_row};
use crate::store::search_sql::{Placeholder, where_clause};
use crate::store::write::{Deletion, Found, NewVersion, TaskTx, UnlockedChange};
use crate::store::{CurrentTask, Interaction};
use crate::trace::current_trace;

/// The advisory lock every conditional create holds while it searches and creates, so that
/// two of them cannot both find nothing and both create. ("baton:if-none-exist", hashed by
/// hand: any fixed key that nothing else uses would do.)
const CONDITIONAL_CREATE_LOCK: i64 = 0x6261_746f_6e49_4e45;

/// Writes a version of a Task, its history row, its search index (the work-list columns on the
/// row, the other values as index rows) and its change event in one
/// statement (a round trip each is most of a write's cost). Sub-statements of one WITH all
/// run against the statement's snapshot and cannot see one another's rows, so the deletes of
/// the old index rows never see, and never remove, the rows inserted beside them. The
/// change event is inserted by the last statement of the write, so its `seq` is taken as
/// close to the commit as possible: the fewer transactions hold a lower `seq` uncommitted,
/// the fewer changes the matcher sees out of order.
///
/// The row is written only if the Task is still at the version before this one (`$2 - 1`;
/// no row at all for a first version): the upsert locks the row it finds, waiting for any
/// transaction that holds it, and checks the version it then sees. Every other part reads
/// `task_row`, so when the check fails nothing is written and the statement reports no row
/// (`UnlockedChange::put_version_if_unchanged`). Under the row lock of `load_for_change` the
/// check always holds; two first writes to one new id both find nothing to lock, and the
/// second then writes nothing (409 there).
const PUT_TASK: &str = "WITH task_row AS (
       INSERT INTO task (id, version, last_updated, deleted, priority_rank, resource,
         status, owner, performer, performer_system, due_start, due_end, authored_on)
       VALUES ($1, $2, $3, 0, $4, $5, $15, $16, $17, $18, $19, $20, $21)
       ON CONFLICT (id) DO UPDATE SET version = excluded.version,
         last_updated = excluded.last_updated, deleted = 0,
         priority_rank = excluded.priority_rank, resource = excluded.resource,
         status = excluded.status, owner = excluded.owner, performer = excluded.performer,
         performer_system = excluded.performer_system, due_start = excluded.due_start,
         due_end = excluded.due_end, authored_on = excluded.authored_on
       WHERE task.version = excluded.version - 1
       RETURNING 1
     ), version_row AS (
       INSERT INTO task_version (id, version, last_updated, interaction, resource)
       SELECT $1, $2, $3, $6, $5 FROM task_row
     ), old_tokens AS (
       DELETE FROM task_token WHERE $7 AND task_id = $1 AND EXISTS (SELECT FROM task_row)
     ), old_dates AS (
       DELETE FROM task_date WHERE $7 AND task_id = $1 AND EXISTS (SELECT FROM task_row)
     ), tokens AS (
       INSERT INTO task_token (task_id, param, system, value)
       SELECT $1, p, s, v FROM task_row, unnest($8::text[], $9::text[], $10::text[]) AS x(p, s, v)
     ), dates AS (
       INSERT INTO task_date (task_id, param, start_at, end_at)
       SELECT $1, p, s, e FROM task_row, unnest($11::text[], $12::text[], $13::text[]) AS x(p, s, e)
     ), audit AS (
       INSERT INTO audit_event (recorded, type_code, subtype, outcome, agent, entity, resource)
       SELECT $3, 'rest', $23::text, $24::text, $25::text, $26::text, $27::text FROM task_row
       WHERE $27::text IS NOT NULL
     )
     INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at, traceparent)
     SELECT 'Task', $1, $2, $14, $6, $3, $22 FROM task_row";

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
     ), audit AS (
       INSERT INTO audit_event (recorded, type_code, subtype, outcome, agent, entity, resource)
       SELECT $3, 'rest', $7::text, $8::text, $9::text, $10::text, $11::text
       WHERE $11::text IS NOT NULL
     )
     INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at, traceparent)
     VALUES ('Task', $1, $2, $4, $5, $3, $6)";

impl TaskTx for PgConnection {
    /// Nothing: the re-check searches again, under the conditional-create lock.
    type Seen = ();

    /// The current state of a Task, locked until the transaction ends: a concurrent change
    /// waits here, then sees this one's result.
    async fn load_for_change(&mut self, id: &TaskId) -> Result<Option<CurrentTask>> {
        let row = sqlx::query(
            "SELECT t.id, t.version, t.last_updated, t.deleted, t.resource FROM task t
             WHERE t.id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *self)
        .await?;
        row.as_ref().map(current_from_row).transpose()
    }

    async fn recheck(&mut self, criteria: &[Predicate], _seen: ()) -> Result<Found> {
        // Held until commit: the next conditional create searches after this one's Task is
        // visible. A statement of its own: a statement's snapshot is taken when it starts, so
        // a search in the lock's statement would miss a Task committed while the lock was
        // awaited. `PostgresStore::precheck` already found no match outside the transaction;
        // this is the re-check under the lock. Its cost is bounded by the criteria caps of
        // `fhir::search`, and it delays only other conditional creates: PostgreSQL has no
        // single writer.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CONDITIONAL_CREATE_LOCK)
            .execute(&mut *self)
            .await?;
        Ok(Found::among(matching_tasks(&mut *self, criteria).await?))
    }

    async fn children_for_change(
        &mut self,
        parent: &TaskId,
        limit: usize,
    ) -> Result<Vec<CurrentTask>> {
        let rows = sqlx::query(
            "SELECT t.id, t.version, t.last_updated, t.deleted, t.resource FROM task t
             WHERE t.deleted = 0 AND t.id IN
               (SELECT task_id FROM task_token WHERE param = 'part-of' AND value = $1)
             ORDER BY t.id LIMIT $2 FOR UPDATE",
        )
        .bind(format!("Task/{parent}"))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *self)
        .await?;
        rows.iter().map(current_from_row).collect()
    }

    async fn status_before_hold(&mut self, id: &TaskId) -> Result<Option<String>> {
        // `json`, not `jsonb`: it accepts every string JSON allows, `\u0000` included.
        let status: Option<Option<String>> = sqlx::query_scalar(
            "SELECT resource::json ->> 'status' FROM task_version
             WHERE id = $1 AND (resource IS NULL OR (resource::json ->> 'status') <> 'on-hold')
             ORDER BY version DESC LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&mut *self)
        .await?;
        Ok(status.flatten())
    }

    /// One statement, `PUT_TASK` (`write::is_single_put` relies on it).
    async fn put_version(&mut self, v: &NewVersion<'_>) -> Result<()> {
        put_version_guarded(self, v).await
    }

    async fn delete_version(&mut self, d: &Deletion<'_>) -> Result<()> {
        let audit = audit_of(d.id, d.version, Interaction::Delete, d.last_updated);
        sqlx::query(DELETE_TASK)
            .bind(d.id)
            .bind(d.version)
            .bind(d.last_updated)
            .bind(d.previous_version)
            .bind(Interaction::Delete.as_str())
            .bind(current_trace().map(|t| t.header()))
            .bind_audit(audit.as_ref())
            .execute(&mut *self)
            .await?;
        Ok(())
    }
}

impl UnlockedChange for PgConnection {
    async fn read_unlocked(&mut self, id: &TaskId) -> Result<Option<CurrentTask>> {
        super::read_current(&mut *self, id).await
    }

    /// `PUT_TASK`, alone: atomic without a transaction around it.
    async fn put_version_if_unchanged(&mut self, v: &NewVersion<'_>) -> Result<bool> {
        put_one(self, &Put::of(v)).await
    }
}

/// `TaskTx::put_version` as one guarded statement (`put_version_if_unchanged`): a Task no
/// longer at the version before `v` answers 409, which cannot happen under the row lock of
/// `load_for_change`, and only to the second of two first writes to one new id without it.
pub(super) async fn put_version_guarded<T: UnlockedChange>(
    conn: &mut T,
    v: &NewVersion<'_>,
) -> Result<()> {
    if conn.put_version_if_unchanged(v).await? {
        Ok(())
    } else {
        Err(written_concurrently(v.id))
    }
}

/// A Task version to write, owned, so that it can wait for a group (`groups`): what
/// `NewVersion` borrows, with the request's trace and AuditEvent, which are the request's
/// task-local state, taken where the request runs.
pub(super) struct Put {
    pub id: TaskId,
    pub version: Version,
    pub previous_version: Option<Version>,
    pub interaction: Interaction,
    pub last_updated: StoredInstant,
    /// Shared with `recent::RecentTasks`, which remembers it once it is written.
    pub text: Arc<str>,
    pub priority_rank: i64,
    pub index: TaskIndex,
    pub columns: TaskColumns,
    pub existed: bool,
    pub trace: Option<String>,
    pub audit: Option<AuditRecord>,
}

impl Put {
    pub(super) fn of(v: &NewVersion<'_>) -> Put {
        Put {
            id: v.id.clone(),
            version: v.version,
            previous_version: v.previous_version,
            interaction: v.interaction,
            last_updated: v.last_updated.clone(),
            text: Arc::from(v.text),
            priority_rank: v.priority_rank,
            index: v.index.clone(),
            columns: v.columns.clone(),
            existed: v.existed,
            trace: current_trace().map(|t| t.header()),
            audit: audit_of(v.id, v.version, v.interaction, v.last_updated),
        }
    }
}

/// Writes `put` with `PUT_TASK`: false, and nothing written, when the Task is no longer at the
/// version before it.
pub(super) async fn put_one(conn: &mut PgConnection, put: &Put) -> Result<bool> {
    let token_params: Vec<&str> = put.index.tokens.iter().map(|t| t.param).collect();
    let token_systems: Vec<Option<Cow<str>>> = put
        .index
        .tokens
        .iter()
        .map(|t| t.system.as_deref().map(pg_text))
        .collect();
    let token_values: Vec<Cow<str>> = put.index.tokens.iter().map(|t| pg_text(&t.value)).collect();
    let date_params: Vec<&str> = put.index.dates.iter().map(|d| d.param).collect();
    let date_starts: Vec<&str> = put.index.dates.iter().map(|d| d.start.as_str()).collect();
    let date_ends: Vec<&str> = put.index.dates.iter().map(|d| d.end.as_str()).collect();
    let c = &put.columns;
    let done = sqlx::query(PUT_TASK)
        .bind(&put.id)
        .bind(put.version)
        .bind(&put.last_updated)
        .bind(put.priority_rank)
        .bind(&*put.text)
        .bind(put.interaction.as_str())
        // A Task that never existed has no index rows to clear.
        .bind(put.existed)
        .bind(&token_params)
        .bind(&token_systems)
        .bind(&token_values)
        .bind(&date_params)
        .bind(&date_starts)
        .bind(&date_ends)
        .bind(put.previous_version)
        .bind(c.status.as_deref().map(pg_text))
        .bind(c.owner.as_deref().map(pg_text))
        .bind(c.performer.as_deref().map(pg_text))
        .bind(c.performer_system.as_deref().map(pg_text))
        .bind(c.due_start.as_deref())
        .bind(c.due_end.as_deref())
        .bind(c.authored_on.as_deref())
        .bind(put.trace.as_deref())
        .bind_audit(put.audit.as_ref())
        .execute(conn)
        .await?;
    // The change event, the statement's own row, is written exactly when the rest is.
    Ok(done.rows_affected() == 1)
}

/// The answer to a put whose Task moved on before it was written.
pub(super) fn written_concurrently(id: &TaskId) -> Error {
    Error::conflict(format!(
        "Task/{id} was written concurrently with this request; retry the request"
    ))
}

/// The AuditEvent of a Task version, when the request writing it is audited.
fn audit_of(
    id: &TaskId,
    version: Version,
    interaction: Interaction,
    recorded: &StoredInstant,
) -> Option<AuditRecord> {
    crate::audit::current().map(|audit| audit.task_change(id, version, interaction, recorded))
}

/// Binds an AuditEvent's columns (all NULL when there is none, and nothing is inserted).
trait BindAudit<'q> {
    fn bind_audit(self, record: Option<&'q AuditRecord>) -> Self;
}

impl<'q> BindAudit<'q> for sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn bind_audit(self, record: Option<&'q AuditRecord>) -> Self {
        match record {
            Some(r) => self
                .bind(r.subtype.as_str())
                .bind(r.outcome)
                .bind(r.agent.as_deref())
                .bind(r.entity.as_deref())
                .bind(r.facts.as_str()),
            None => self
                .bind(None::<String>)
                .bind(None::<String>)
                .bind(None::<String>)
                .bind(None::<String>)
                .bind(None::<String>),
        }
    }
}

/// The Tasks (at most two) that If-None-Exist criteria match, read by the statement that
/// evaluates them, so that a Task deleted meanwhile cannot be reported.
pub(super) async fn matching_tasks<'e>(
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
