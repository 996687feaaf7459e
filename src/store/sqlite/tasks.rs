//! SQLite statements of a Task write: `store::write::TaskTx` on the writer's connection,
//! inside its transaction, and the If-None-Exist search the read pool runs before it.

use std::collections::HashMap;

use sqlx::sqlite::{SqliteConnection, SqliteExecutor};
// Every dynamic statement here is assembled from fixed fragments; values are always bound.
use sqlx::{AssertSqlSafe, Row};

use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, StoredInstant, TaskId, Version};
use crate::fhir::search::{self, DateEntry, Predicate, TaskIndex, TokenEntry, task_param};
use crate::store::rows::{CURRENT_COLUMNS, current_from_row};
use crate::store::search_sql::{Placeholder, where_clause};
use crate::store::write::{Deletion, Found, NewVersion, TaskTx};
use crate::store::{CurrentTask, Interaction};

impl TaskTx for SqliteConnection {
    /// The outbox position up to which the read pool found no match (`SqliteStore::precheck`).
    type Seen = ChangeSeq;

    // The single writer runs one write at a time: what it loads cannot change under it.
    async fn load_for_change(&mut self, id: &TaskId) -> Result<Option<CurrentTask>> {
        load_current(&mut *self, id).await
    }

    /// Looks only at the Tasks written after outbox position `seen`: those are the only Tasks
    /// whose match can have changed since the criteria found nothing on the read pool (the
    /// writer commits in `seq` order and every Task write has a change event), so the criteria
    /// are evaluated in memory (`search::matches`, the meaning the SQL has) over their index
    /// rows: the cost grows with the writes committed in between, never with the criteria's
    /// SQL or the size of the table.
    async fn recheck(&mut self, criteria: &[Predicate], seen: ChangeSeq) -> Result<Found> {
        let changed = indexes_written_after(self, seen).await?;
        let found: Vec<TaskId> = changed
            .into_iter()
            .filter(|(_, index)| search::matches(index, criteria))
            .map(|(id, _)| id)
            .take(2)
            .collect();
        found_among(self, &found).await
    }

    async fn status_before_hold(&mut self, id: &TaskId) -> Result<Option<String>> {
        let status: Option<Option<String>> = sqlx::query_scalar(
            "SELECT json_extract(resource, '$.status') FROM task_version
             WHERE id = ? AND (resource IS NULL OR json_extract(resource, '$.status') <> 'on-hold')
             ORDER BY version DESC LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&mut *self)
        .await?;
        Ok(status.flatten())
    }

    async fn put_version(&mut self, v: &NewVersion<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO task (id, version, last_updated, deleted, priority_rank, resource)
             VALUES (?, ?, ?, 0, ?, ?)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version,
               last_updated = excluded.last_updated, deleted = 0,
               priority_rank = excluded.priority_rank, resource = excluded.resource",
        )
        .bind(v.id)
        .bind(v.version)
        .bind(v.last_updated)
        .bind(v.priority_rank)
        .bind(v.text)
        .execute(&mut *self)
        .await?;
        insert_version(
            self,
            v.id,
            v.version,
            v.last_updated,
            v.interaction,
            Some(v.text),
        )
        .await?;
        // A Task that never existed has no index rows to clear.
        if v.existed {
            clear_index(self, v.id).await?;
        }
        write_index(self, v.id, v.index).await?;
        insert_change(
            self,
            v.id,
            v.version,
            v.previous_version,
            v.interaction,
            v.last_updated,
        )
        .await
    }

    async fn delete_version(&mut self, d: &Deletion<'_>) -> Result<()> {
        sqlx::query("UPDATE task SET version = ?, last_updated = ?, deleted = 1 WHERE id = ?")
            .bind(d.version)
            .bind(d.last_updated)
            .bind(d.id)
            .execute(&mut *self)
            .await?;
        insert_version(
            self,
            d.id,
            d.version,
            d.last_updated,
            Interaction::Delete,
            None,
        )
        .await?;
        clear_index(self, d.id).await?;
        insert_change(
            self,
            d.id,
            d.version,
            Some(d.previous_version),
            Interaction::Delete,
            d.last_updated,
        )
        .await
    }
}

async fn insert_version(
    conn: &mut SqliteConnection,
    id: &TaskId,
    version: Version,
    now: &StoredInstant,
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
    id: &TaskId,
    version: Version,
    previous_version: Option<Version>,
    interaction: Interaction,
    now: &StoredInstant,
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

async fn clear_index(conn: &mut SqliteConnection, id: &TaskId) -> Result<()> {
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
async fn write_index(conn: &mut SqliteConnection, id: &TaskId, index: &TaskIndex) -> Result<()> {
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

pub(super) async fn load_current<'e>(
    executor: impl SqliteExecutor<'e>,
    id: &TaskId,
) -> Result<Option<CurrentTask>> {
    let sql = format!("SELECT {CURRENT_COLUMNS} FROM task t WHERE t.id = ?");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(current_from_row).transpose()
}

pub(super) async fn find_ids(
    conn: &mut SqliteConnection,
    predicates: &[Predicate],
    limit: i64,
) -> Result<Vec<TaskId>> {
    let filter = where_clause(predicates, Placeholder::Question, 1);
    let sql = format!(
        "SELECT t.id FROM task t WHERE t.deleted = 0 AND ({}) LIMIT ?",
        filter.sql
    );
    let mut query = sqlx::query_scalar::<_, TaskId>(AssertSqlSafe(sql));
    for bind in &filter.binds {
        query = query.bind(bind);
    }
    Ok(query.bind(limit).fetch_all(&mut *conn).await?)
}

/// What the ids of at most two matching Tasks found; the one Task is loaded.
pub(super) async fn found_among(conn: &mut SqliteConnection, ids: &[TaskId]) -> Result<Found> {
    match ids {
        [] => Ok(Found::Nothing),
        [id] => {
            let current = load_current(&mut *conn, id)
                .await?
                .ok_or_else(|| Error::internal("a matched Task vanished", "missing row"))?;
            Ok(Found::One(current))
        }
        _ => Ok(Found::Several),
    }
}

/// The live Tasks written after outbox position `seq`, each with its search index as stored.
async fn indexes_written_after(
    conn: &mut SqliteConnection,
    seq: ChangeSeq,
) -> Result<Vec<(TaskId, TaskIndex)>> {
    const WRITTEN: &str = "SELECT DISTINCT resource_id FROM change_event WHERE seq > ?";
    let ids: Vec<TaskId> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT t.id FROM task t WHERE t.deleted = 0 AND t.id IN ({WRITTEN}) ORDER BY t.id"
    )))
    .bind(seq)
    .fetch_all(&mut *conn)
    .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut indexes: HashMap<TaskId, TaskIndex> = ids
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
        let id: TaskId = row.try_get("task_id")?;
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
        let id: TaskId = row.try_get("task_id")?;
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
