//! SQLite statements of a Task write: `store::write::TaskTx` on the writer thread's
//! connection (rusqlite), inside its transaction, and the If-None-Exist search the read pool
//! (sqlx) runs before it.
//!
//! Every statement of the writer is fixed text, prepared once and kept (`prepare_cached`). A
//! single write's rows go in one statement per row; a transaction's plain creates
//! (`put_versions`) go in multi-row INSERTs of a few fixed sizes, which cut the writer's CPU
//! per Task on 100-entry transaction Bundles by about a fifth (BENCHMARKS.md, issue 17).

use std::collections::HashMap;
use std::sync::LazyLock;

use rusqlite::{Connection, OptionalExtension, ToSql, params, params_from_iter};
use sqlx::sqlite::{SqliteConnection, SqliteExecutor};
// Every dynamic statement here is assembled from fixed fragments; values are always bound.
use sqlx::AssertSqlSafe;

use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, StoredInstant, TaskId, Version};
use crate::fhir::search::{
    self, DateEntry, Predicate, TaskColumns, TaskIndex, TokenEntry, task_param,
};
use crate::store::rows::{
    self, CURRENT_COLUMNS, TaskRow, current_from_row, read_sort_values_rusqlite,
};
use crate::store::search_sql::{PageSql, Placeholder, SqlFilter, where_clause};
use crate::store::write::{Deletion, Found, NewVersion, TaskTx};
use crate::store::{Collected, CurrentTask, Interaction, ListedTask, SearchPage, StoredVersion};
use crate::trace::current_trace;

use super::counts::CappedCounts;
use super::texts::{Fence, TextCache};

impl TaskTx for Connection {
    /// The outbox position up to which the read pool found no match (`SqliteStore::precheck`).
    type Seen = ChangeSeq;

    // The single writer runs one write at a time: what it loads cannot change under it.
    async fn load_for_change(&mut self, id: &TaskId) -> Result<Option<CurrentTask>> {
        load_by_id(self, id)
    }

    /// Looks only at the Tasks written after outbox position `seen`: those are the only Tasks
    /// whose match can have changed since the criteria found nothing on the read pool (the
    /// writer commits in `seq` order and every Task write has a change event), so the criteria
    /// are evaluated in memory (`search::matches`, the meaning the SQL has) over their index
    /// rows: the cost grows with the writes committed in between, never with the criteria's
    /// SQL or the size of the table.
    async fn recheck(&mut self, criteria: &[Predicate], seen: ChangeSeq) -> Result<Found> {
        let changed = indexes_written_after(self, seen)?;
        let found: Vec<TaskId> = changed
            .into_iter()
            .filter(|(_, index)| search::matches(index, criteria))
            .map(|(id, _)| id)
            .take(2)
            .collect();
        found_among(&found, async |id| load_by_id(self, id)).await
    }

    async fn children_for_change(
        &mut self,
        parent: &TaskId,
        limit: usize,
    ) -> Result<Vec<CurrentTask>> {
        // The limit is written into the text (one statement per limit: the callers use one),
        // since a bound LIMIT makes SQLite prepare the statement again at every run.
        let mut statement = self.prepare_cached(&format!("{} LIMIT {limit}", *LOAD_CHILDREN))?;
        let rows = statement.query_map(
            rusqlite::params![format!("Task/{parent}")],
            TaskRow::from_rusqlite,
        )?;
        rows.map(|row| row?.into_current()).collect()
    }

    async fn status_before_hold(&mut self, id: &TaskId) -> Result<Option<String>> {
        let status: Option<Option<String>> = self
            .prepare_cached(
                "SELECT json_extract(resource, '$.status') FROM task_version
                 WHERE id = ? AND (resource IS NULL OR json_extract(resource, '$.status') <> 'on-hold')
                 ORDER BY version DESC LIMIT 1",
            )?
            .query_row([id], |row| row.get(0))
            .optional()?;
        Ok(status.flatten())
    }

    async fn put_version(&mut self, v: &NewVersion<'_>) -> Result<()> {
        note_written(v.id);
        let c = v.columns;
        self.prepare_cached(
            "INSERT INTO task (id, version, last_updated, deleted, priority_rank, resource,
               status, owner, performer, performer_system, due_start, due_end, authored_on)
             VALUES (?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version,
               last_updated = excluded.last_updated, deleted = 0,
               priority_rank = excluded.priority_rank, resource = excluded.resource,
               status = excluded.status, owner = excluded.owner, performer = excluded.performer,
               performer_system = excluded.performer_system, due_start = excluded.due_start,
               due_end = excluded.due_end, authored_on = excluded.authored_on",
        )?
        .execute(params![
            v.id,
            v.version,
            v.last_updated,
            v.priority_rank,
            v.text,
            c.status,
            c.owner,
            c.performer,
            c.performer_system,
            c.due_start,
            c.due_end,
            c.authored_on
        ])?;
        insert_version(
            self,
            v.id,
            v.version,
            v.last_updated,
            v.interaction,
            Some(v.text),
        )?;
        // A Task that never existed has no index rows to replace.
        if v.existed {
            replace_index(self, v.id, v.index)?;
        } else {
            write_index(self, v.id, v.index)?;
        }
        insert_change(
            self,
            v.id,
            v.version,
            v.previous_version,
            v.interaction,
            v.last_updated,
        )
    }

    /// A transaction's plain creates: each table's rows in a few multi-row INSERTs
    /// (`insert_rows`) instead of a statement per row, the change events in the order given.
    /// A version of a Task that had rows (a create after a delete) takes `put_version`.
    async fn put_versions(&mut self, versions: &[NewVersion<'_>]) -> Result<()> {
        if versions.len() < 2 || versions.iter().any(|v| v.existed) {
            for version in versions {
                self.put_version(version).await?;
            }
            return Ok(());
        }
        // The writer runs a transaction in the trace of the request that submitted it.
        let trace = current_trace().map(|t| t.header());
        insert_new_tasks(self, versions, &vec![trace; versions.len()])
    }

    async fn delete_version(&mut self, d: &Deletion<'_>) -> Result<()> {
        note_written(d.id);
        self.prepare_cached(
            "UPDATE task SET version = ?, last_updated = ?, deleted = 1 WHERE id = ?",
        )?
        .execute(params![d.version, d.last_updated, d.id])?;
        insert_version(
            self,
            d.id,
            d.version,
            d.last_updated,
            Interaction::Delete,
            None,
        )?;
        clear_index(self, d.id)?;
        insert_change(
            self,
            d.id,
            d.version,
            Some(d.previous_version),
            Interaction::Delete,
            d.last_updated,
        )
    }
}

thread_local! {
    /// The Tasks the writer thread's open transaction wrote, for the text cache
    /// (`texts::TextCache::before_commit`): taken by the writer before its COMMIT.
    static WRITTEN: std::cell::RefCell<Vec<TaskId>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn note_written(id: &TaskId) {
    WRITTEN.with(|written| written.borrow_mut().push(id.clone()));
}

/// The Tasks written on this thread since the last call (the writer's, since its BEGIN).
pub(super) fn take_written() -> Vec<TaskId> {
    WRITTEN.with(|written| std::mem::take(&mut *written.borrow_mut()))
}

fn insert_version(
    conn: &Connection,
    id: &TaskId,
    version: Version,
    now: &StoredInstant,
    interaction: Interaction,
    resource: Option<&str>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO task_version (id, version, last_updated, interaction, resource) VALUES (?, ?, ?, ?, ?)",
    )?
    .execute(params![id, version, now, interaction.as_str(), resource])?;
    Ok(())
}

fn insert_change(
    conn: &Connection,
    id: &TaskId,
    version: Version,
    previous_version: Option<Version>,
    interaction: Interaction,
    now: &StoredInstant,
) -> Result<()> {
    // The writer runs each job in the trace of the request that submitted it.
    let trace = current_trace().map(|t| t.header());
    conn.prepare_cached(
        "INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at, traceparent)
         VALUES ('Task', ?, ?, ?, ?, ?, ?)",
    )?
    .execute(params![
        id,
        version,
        previous_version,
        interaction.as_str(),
        now,
        trace
    ])?;
    // Its AuditEvent is made by the writer from the write's outcome and inserted with the
    // group's (`writer::Group::audits`), in the same commit.
    Ok(())
}

/// Inserts AuditEvents on the writer's connection, inside the caller's transaction, in the
/// order given, in multi-row INSERTs (`insert_rows`).
pub(super) fn insert_audits(
    conn: &Connection,
    records: &[crate::audit::AuditRecord],
) -> Result<()> {
    insert_rows(conn, &AUDIT_ROWS, records.len(), |i, out| {
        let r = &records[i];
        out.extend_from_slice(&[
            &r.recorded as &dyn ToSql,
            &r.type_code,
            &r.subtype,
            &r.outcome,
            &r.agent,
            &r.entity,
            &r.facts,
        ]);
    })
}

/// A multi-row INSERT of one table: its text for each size of `ROW_CHUNKS`.
struct RowsInsert {
    /// The statement for `ROW_CHUNKS[i]` rows.
    sql: [String; ROW_CHUNKS.len()],
}

/// How many rows one INSERT of `insert_rows` carries: a batch goes out in the largest first,
/// so that a few fixed statement texts stay prepared (`writer::STATEMENT_CACHE`) whatever the
/// batch's size. 64 rows of the widest table bind 768 values, far below SQLite's limit.
const ROW_CHUNKS: [usize; 4] = [64, 16, 4, 1];

impl RowsInsert {
    /// `head` is `INSERT … VALUES`, `row` one row's placeholders, e.g. `(?, ?, 'x')`.
    fn new(head: &str, row: &str) -> RowsInsert {
        RowsInsert {
            sql: ROW_CHUNKS.map(|n| format!("{head} {}", vec![row; n].join(", "))),
        }
    }
}

/// Inserts `count` rows through `insert`, the values of row `i` pushed by `bind(i, …)` in the
/// order of its placeholders; the rows go in in order.
fn insert_rows<'a>(
    conn: &Connection,
    insert: &RowsInsert,
    count: usize,
    mut bind: impl FnMut(usize, &mut Vec<&'a dyn ToSql>),
) -> Result<()> {
    let mut done = 0;
    let mut values: Vec<&'a dyn ToSql> = Vec::new();
    for (size, sql) in ROW_CHUNKS.iter().zip(&insert.sql) {
        if count - done < *size {
            continue;
        }
        let mut statement = conn.prepare_cached(sql)?;
        while count - done >= *size {
            values.clear();
            for row in done..done + size {
                bind(row, &mut values);
            }
            statement.execute(values.as_slice())?;
            done += size;
        }
    }
    Ok(())
}

// `INSERT OR FAIL`: a multi-row INSERT that may abort would otherwise copy every page it
// touches into a statement journal first, to undo its own earlier rows; here a failure fails
// the whole transaction job, which its savepoint undoes.
static NEW_TASK_ROWS: LazyLock<RowsInsert> = LazyLock::new(|| {
    RowsInsert::new(
        "INSERT OR FAIL INTO task (id, version, last_updated, deleted, priority_rank, resource,
           status, owner, performer, performer_system, due_start, due_end, authored_on) VALUES",
        "(?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
});
static VERSION_ROWS: LazyLock<RowsInsert> = LazyLock::new(|| {
    RowsInsert::new(
        "INSERT OR FAIL INTO task_version (id, version, last_updated, interaction, resource) VALUES",
        "(?, ?, ?, ?, ?)",
    )
});
static TOKEN_ROWS: LazyLock<RowsInsert> = LazyLock::new(|| {
    RowsInsert::new(
        "INSERT OR FAIL INTO task_token (task_id, param, system, value) VALUES",
        "(?, ?, ?, ?)",
    )
});
static DATE_ROWS: LazyLock<RowsInsert> = LazyLock::new(|| {
    RowsInsert::new(
        "INSERT OR FAIL INTO task_date (task_id, param, start_at, end_at) VALUES",
        "(?, ?, ?, ?)",
    )
});
static CHANGE_ROWS: LazyLock<RowsInsert> = LazyLock::new(|| {
    RowsInsert::new(
        "INSERT OR FAIL INTO change_event (resource_type, resource_id, version, previous_version,
           interaction, recorded_at, traceparent) VALUES",
        "('Task', ?, ?, ?, ?, ?, ?)",
    )
});

// The writer inserts a group's AuditEvents after its jobs, outside their savepoints: an
// AuditEvent insert that fails fails the group (`writer::Group::audits`).
static AUDIT_ROWS: LazyLock<RowsInsert> = LazyLock::new(|| {
    RowsInsert::new(
        "INSERT OR FAIL INTO audit_event (recorded, type_code, subtype, outcome, agent, entity,
           resource) VALUES",
        "(?, ?, ?, ?, ?, ?, ?)",
    )
});

/// Writes versions of Tasks that have no rows yet, as `put_version` writes each: the rows of
/// each table together, the change events in the order given, so their `seq`s ascend in that
/// order, each with the traceparent of the request that wrote it (`traces`, one per version:
/// the writer's group of single creates holds several requests). `INSERT OR FAIL`: the caller
/// undoes the rows of a failed call with its savepoint.
pub(super) fn insert_new_tasks(
    conn: &Connection,
    versions: &[NewVersion<'_>],
    traces: &[Option<String>],
) -> Result<()> {
    if traces.len() != versions.len() {
        return Err(Error::internal(
            "writing new Tasks",
            format!("{} traces for {} versions", traces.len(), versions.len()),
        ));
    }
    for v in versions {
        note_written(v.id);
    }
    let interactions: Vec<&'static str> = versions.iter().map(|v| v.interaction.as_str()).collect();
    insert_rows(conn, &NEW_TASK_ROWS, versions.len(), |i, out| {
        let v = &versions[i];
        let c = v.columns;
        out.extend_from_slice(&[
            v.id as &dyn ToSql,
            &v.version,
            v.last_updated,
            &v.priority_rank,
            &v.text,
            &c.status,
            &c.owner,
            &c.performer,
            &c.performer_system,
            &c.due_start,
            &c.due_end,
            &c.authored_on,
        ]);
    })?;
    insert_rows(conn, &VERSION_ROWS, versions.len(), |i, out| {
        let v = &versions[i];
        out.extend_from_slice(&[
            v.id as &dyn ToSql,
            &v.version,
            v.last_updated,
            &interactions[i],
            &v.text,
        ]);
    })?;
    let tokens: Vec<(&TaskId, &TokenEntry)> = versions
        .iter()
        .flat_map(|v| v.index.tokens.iter().map(move |t| (v.id, t)))
        .collect();
    insert_rows(conn, &TOKEN_ROWS, tokens.len(), |i, out| {
        let (id, token) = tokens[i];
        out.extend_from_slice(&[id as &dyn ToSql, &token.param, &token.system, &token.value]);
    })?;
    let dates: Vec<(&TaskId, &DateEntry)> = versions
        .iter()
        .flat_map(|v| v.index.dates.iter().map(move |d| (v.id, d)))
        .collect();
    insert_rows(conn, &DATE_ROWS, dates.len(), |i, out| {
        let (id, date) = dates[i];
        out.extend_from_slice(&[id as &dyn ToSql, &date.param, &date.start, &date.end]);
    })?;
    insert_rows(conn, &CHANGE_ROWS, versions.len(), |i, out| {
        let v = &versions[i];
        out.extend_from_slice(&[
            v.id as &dyn ToSql,
            &v.version,
            &v.previous_version,
            &interactions[i],
            v.last_updated,
            &traces[i],
        ]);
    })?;
    // Their AuditEvents are made by the writer from the job's outcomes and inserted with
    // the group's (`writer::Group::audits`), in the same commit.
    Ok(())
}

fn clear_index(conn: &Connection, id: &TaskId) -> Result<()> {
    conn.prepare_cached("DELETE FROM task_token WHERE task_id = ?")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM task_date WHERE task_id = ?")?
        .execute([id])?;
    Ok(())
}

/// Makes the index rows of Task `id` those of `index`: the rows it has that `index` lacks go,
/// those it lacks are written, and the rows both have stay as they are. A new version mostly
/// keeps its predecessor's values (a status change touches none of them: the status is a
/// column), and a row kept costs a read of the Task's rows instead of an index entry removed
/// and put back in each of its table's B-trees (three for a token, three or four for a date).
fn replace_index(conn: &Connection, id: &TaskId, index: &TaskIndex) -> Result<()> {
    let mut tokens: Vec<Option<&TokenEntry>> = index.tokens.iter().map(Some).collect();
    let mut stale = Vec::new();
    {
        let mut select = conn.prepare_cached(
            "SELECT rowid, param, system, value FROM task_token WHERE task_id = ?",
        )?;
        let mut rows = select.query([id])?;
        while let Some(row) = rows.next()? {
            let (param, system, value): (String, Option<String>, String) =
                (row.get(1)?, row.get(2)?, row.get(3)?);
            let kept = tokens.iter_mut().find(|wanted| {
                wanted.is_some_and(|t| t.param == param && t.system == system && t.value == value)
            });
            match kept {
                Some(slot) => *slot = None,
                None => stale.push(row.get::<_, i64>(0)?),
            }
        }
    }
    if !stale.is_empty() {
        let mut delete = conn.prepare_cached("DELETE FROM task_token WHERE rowid = ?")?;
        for rowid in &stale {
            delete.execute([rowid])?;
        }
    }
    let mut dates: Vec<Option<&DateEntry>> = index.dates.iter().map(Some).collect();
    stale.clear();
    {
        let mut select = conn.prepare_cached(
            "SELECT rowid, param, start_at, end_at FROM task_date WHERE task_id = ?",
        )?;
        let mut rows = select.query([id])?;
        while let Some(row) = rows.next()? {
            let (param, start, end): (String, String, String) =
                (row.get(1)?, row.get(2)?, row.get(3)?);
            let kept = dates.iter_mut().find(|wanted| {
                wanted.is_some_and(|d| d.param == param && d.start == start && d.end == end)
            });
            match kept {
                Some(slot) => *slot = None,
                None => stale.push(row.get::<_, i64>(0)?),
            }
        }
    }
    if !stale.is_empty() {
        let mut delete = conn.prepare_cached("DELETE FROM task_date WHERE rowid = ?")?;
        for rowid in &stale {
            delete.execute([rowid])?;
        }
    }
    let missing = TaskIndex {
        tokens: tokens.into_iter().flatten().cloned().collect(),
        dates: dates.into_iter().flatten().cloned().collect(),
    };
    write_index(conn, id, &missing)
}

/// Writes the search index rows of one Task.
fn write_index(conn: &Connection, id: &TaskId, index: &TaskIndex) -> Result<()> {
    if !index.tokens.is_empty() {
        let mut insert = conn.prepare_cached(
            "INSERT INTO task_token (task_id, param, system, value) VALUES (?, ?, ?, ?)",
        )?;
        for token in &index.tokens {
            insert.execute(params![
                id,
                token.param,
                token.system.as_deref(),
                &token.value
            ])?;
        }
    }
    if !index.dates.is_empty() {
        let mut insert = conn.prepare_cached(
            "INSERT INTO task_date (task_id, param, start_at, end_at) VALUES (?, ?, ?, ?)",
        )?;
        for date in &index.dates {
            insert.execute(params![id, date.param, &date.start, &date.end])?;
        }
    }
    Ok(())
}

/// The statement that reads a current Task by id.
/// The live sub-tasks of a Task, through the `part-of` index rows.
static LOAD_CHILDREN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {CURRENT_COLUMNS} FROM task t WHERE t.deleted = 0 AND t.id IN
           (SELECT task_id FROM task_token WHERE param = 'part-of' AND value = ?)
         ORDER BY t.id"
    )
});

static LOAD_CURRENT: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {CURRENT_COLUMNS} FROM task t WHERE t.id = ?"));

/// The current state of a Task, read by id on a rusqlite connection: the writer's, inside its
/// transaction, or a point-read connection (`point`).
pub(super) fn load_by_id(conn: &Connection, id: &TaskId) -> Result<Option<CurrentTask>> {
    let row = conn
        .prepare_cached(&LOAD_CURRENT)?
        .query_row([id], TaskRow::from_rusqlite)
        .optional()?;
    row.map(TaskRow::into_current).transpose()
}

/// The versions asked for that exist, each by its key, on a point-read connection: the
/// outbox consumer's read of the versions a batch of changes needs (`Store::versions`). One
/// prepared lookup per key costs less than a statement of a different length per batch.
pub(super) fn versions(
    conn: &Connection,
    keys: &[(TaskId, Version)],
) -> Result<Vec<StoredVersion>> {
    let mut lookup = conn.prepare_cached(
        "SELECT last_updated, interaction, resource FROM task_version WHERE id = ?1 AND version = ?2",
    )?;
    let mut found = Vec::with_capacity(keys.len());
    for (id, version) in keys {
        let row = lookup
            .query_row(params![id, version], |row| {
                Ok((
                    row.get::<_, StoredInstant>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<String>>(2)?,
                ))
            })
            .optional()?;
        let Some((last_updated, interaction, resource)) = row else {
            continue;
        };
        let version = (|| {
            Ok(StoredVersion {
                id: id.clone(),
                version: *version,
                last_updated,
                interaction: rows::interaction(interaction, "unknown interaction in history")?,
                resource: resource
                    .map(|text| serde_json::from_str(&text))
                    .transpose()
                    .map_err(|e| Error::internal("a stored Task version is not valid JSON", e))?,
                text: None,
            })
        })();
        found.extend(crate::store::readable(version));
    }
    Ok(found)
}

/// The size and budget of a search page.
#[derive(Debug, Clone, Copy)]
pub(super) struct PageShape {
    pub count: usize,
    pub offset: usize,
    /// The page starts after a keyset cursor, not at `offset`.
    pub after_cursor: bool,
    pub max_bytes: usize,
    /// How many sort values follow the Task's columns in each row.
    pub sort_values: usize,
    /// `Counting::UpTo`'s cap, whose count statement walks `counts::REACH` times as far (see
    /// `counts`); `None` for a count of every match.
    pub count_cap: Option<u64>,
}

impl PageShape {
    /// The number of matches, when the page itself shows it (`Collected::total_shown`).
    fn total_shown(&self, collected: &Collected) -> Option<u64> {
        collected.total_shown(self.count, self.offset, self.after_cursor)
    }
}

/// A search page and its count (see `search_sql::page_sql`), on a search connection: blocking.
/// `rows` is the page's statement with its window written in (`PageSql::rows_with_window`).
/// The page is read first: when it holds the last match, its count is known without the
/// count statement (a patient's Tasks, a short queue).
pub(super) fn search_page(
    conn: &Connection,
    counts: &CappedCounts,
    texts: Option<&TextCache>,
    sql: &PageSql,
    rows: &str,
    shape: PageShape,
) -> Result<SearchPage> {
    let mut collected = Collected::new(shape.max_bytes, 1);
    // Only a page whose walk reads no table page gains from the cache: one that reads the
    // Task's row anyway (a patient's Tasks, sorted by the row's instant) takes its text there.
    let keyed = match texts {
        Some(texts) if shape.count > 0 => texts.keyed(rows, |keyed| covering(conn, keyed))?,
        _ => None,
    };
    if let (Some(texts), Some(keyed)) = (texts, keyed) {
        // Read before the snapshot is taken (at the transaction's first read), and the page,
        // the rows it misses and its count all in that one snapshot.
        let fence = texts.fence();
        conn.prepare_cached("BEGIN")?.execute([])?;
        page_with_texts(conn, texts, fence, &keyed, sql, shape, &mut collected)?;
        let total = page_total(conn, counts, sql, shape, &collected)?;
        conn.prepare_cached("COMMIT")?.execute([])?;
        return Ok(collected.into_page(total));
    }
    if shape.count > 0 {
        let mut statement = conn.prepare_cached(rows)?;
        let mut rows = statement.query(params_from_iter(&sql.binds))?;
        while let Some(row) = rows.next()? {
            let task = TaskRow::from_rusqlite(row)?.into_listed();
            let sort_values = read_sort_values_rusqlite(row, shape.sort_values)?;
            if !collected.take(task, Some(sort_values)) {
                break;
            }
        }
    }
    let total = page_total(conn, counts, sql, shape, &collected)?;
    Ok(collected.into_page(total))
}

/// The columns a page's statement selects with a text cache, in place of `CURRENT_COLUMNS`
/// (as many, so that the sort values follow at the same place): the id and the row number,
/// which every index carries, so that a walk of a work-list index reads no table page.
const KEY_COLUMNS: &str = "t.id, t.rowid, NULL, NULL, NULL";

/// A page's statement (`PageSql::rows`) selecting `KEY_COLUMNS` instead of the Task's columns.
pub(super) fn keys_only(rows: &str) -> String {
    rows.replace(
        &format!("SELECT {CURRENT_COLUMNS}"),
        &format!("SELECT {KEY_COLUMNS}"),
    )
}

/// Whether SQLite's plan for `statement` reads Tasks from covering indexes only: every step
/// that reads `task t` (`SCAN t`, `SEARCH t`) names a covering index.
fn covering(conn: &Connection, statement: &str) -> Result<bool> {
    let mut plan = conn.prepare(&format!("EXPLAIN QUERY PLAN {statement}"))?;
    // The plan does not depend on the values bound (SQLite plans before binding them here).
    let nulls = std::iter::repeat_n(rusqlite::types::Null, plan.parameter_count());
    let mut rows = plan.query(params_from_iter(nulls))?;
    let mut reads = 0;
    while let Some(row) = rows.next()? {
        let detail: String = row.get(3)?;
        if detail.starts_with("SCAN t ") || detail.starts_with("SEARCH t ") || detail == "SCAN t" {
            if !detail.contains("COVERING INDEX") {
                return Ok(false);
            }
            reads += 1;
        }
    }
    Ok(reads > 0)
}

/// A Task read by its row number, for a page whose text cache missed it.
static LOAD_BY_ROWID: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {CURRENT_COLUMNS} FROM task t WHERE t.rowid = ?"));

/// A page's Tasks: their ids, row numbers and sort values by `rows` (`keys_only`), their
/// texts from `texts`, and the rows it misses read by row number and kept for later searches.
fn page_with_texts(
    conn: &Connection,
    texts: &TextCache,
    fence: Fence,
    rows: &str,
    sql: &PageSql,
    shape: PageShape,
    collected: &mut Collected,
) -> Result<()> {
    let mut keys: Vec<(TaskId, i64, Vec<Option<String>>)> = Vec::with_capacity(shape.count);
    {
        let mut statement = conn.prepare_cached(rows)?;
        let mut rows = statement.query(params_from_iter(&sql.binds))?;
        while let Some(row) = rows.next()? {
            let id: TaskId = row.get(0)?;
            let rowid: i64 = row.get(1)?;
            keys.push((
                id,
                rowid,
                read_sort_values_rusqlite(row, shape.sort_values)?,
            ));
        }
    }
    let ids: Vec<&TaskId> = keys.iter().map(|(id, ..)| id).collect();
    let found = texts.lookup(fence, &ids);
    let mut read = Vec::new();
    for ((id, rowid, sort_values), hit) in keys.into_iter().zip(found) {
        let task = match hit {
            Some((version, last_updated, json)) => ListedTask {
                id,
                version,
                last_updated,
                json: String::from(&*json),
            },
            None => {
                let task = conn
                    .prepare_cached(&LOAD_BY_ROWID)?
                    .query_row([rowid], TaskRow::from_rusqlite)?
                    .into_listed();
                read.push(task.clone());
                task
            }
        };
        if !collected.take(task, Some(sort_values)) {
            break;
        }
    }
    texts.fill(fence, &read);
    Ok(())
}

/// A page's total: shown by the page itself, counted, or not asked for.
fn page_total(
    conn: &Connection,
    counts: &CappedCounts,
    sql: &PageSql,
    shape: PageShape,
    collected: &Collected,
) -> Result<Option<u64>> {
    let shown = (shape.count > 0)
        .then(|| shape.total_shown(collected))
        .flatten();
    Ok(match (&sql.count, shown) {
        (Some(_), Some(shown)) => Some(shown),
        (Some(count), None) => match shape.count_cap {
            Some(cap) => Some(counts.count_up_to(conn, count, &sql.count_binds, cap)?),
            None => {
                let counted: i64 = conn
                    .prepare_cached(count)?
                    .query_row(params_from_iter(&sql.count_binds), |row| row.get(0))?;
                Some(u64::try_from(counted).unwrap_or(0))
            }
        },
        (None, _) => None,
    })
}

/// The live sub-tasks of a search's `_revinclude` (see `search_sql::children_sql`), at most
/// `limit` and `max_bytes` of them, on a search connection: blocking.
pub(super) fn children(
    conn: &Connection,
    sql: &SqlFilter,
    limit: usize,
    max_bytes: usize,
) -> Result<SearchPage> {
    let limit = limit as i64;
    let mut binds: Vec<&dyn ToSql> = sql.binds.iter().map(|b| b as &dyn ToSql).collect();
    binds.push(&limit);
    let mut statement = conn.prepare_cached(&sql.sql)?;
    let mut rows = statement.query(binds.as_slice())?;
    let mut collected = Collected::new(max_bytes, 0);
    while let Some(row) = rows.next()? {
        if !collected.take(TaskRow::from_rusqlite(row)?.into_listed(), None) {
            break;
        }
    }
    Ok(collected.into_page(None))
}

/// The current state of a Task, read on the read pool.
pub(super) async fn load_current<'e>(
    executor: impl SqliteExecutor<'e>,
    id: &TaskId,
) -> Result<Option<CurrentTask>> {
    let row = sqlx::query(AssertSqlSafe(LOAD_CURRENT.as_str()))
        .bind(id)
        .fetch_optional(executor)
        .await?;
    row.as_ref().map(current_from_row).transpose()
}

/// The ids of at most `limit` live Tasks the criteria match, on the read pool.
pub(super) async fn find_ids(
    conn: &mut SqliteConnection,
    predicates: &[Predicate],
    limit: i64,
) -> Result<Vec<TaskId>> {
    let filter = where_clause(predicates, Placeholder::Question, 1);
    // The limit is Baton's own number, written into the text: a bound LIMIT makes SQLite
    // prepare the statement again at every run.
    let sql = format!(
        "SELECT t.id FROM task t WHERE t.deleted = 0 AND ({}) LIMIT {limit}",
        filter.sql
    );
    let mut query = sqlx::query_scalar::<_, TaskId>(AssertSqlSafe(sql));
    for bind in &filter.binds {
        query = query.bind(bind);
    }
    Ok(query.fetch_all(&mut *conn).await?)
}

/// What the ids of at most two matching Tasks found; the one Task is loaded with `load`
/// (on the read pool for the pre-check, in the writer's transaction for the re-check).
pub(super) async fn found_among(
    ids: &[TaskId],
    load: impl AsyncFnOnce(&TaskId) -> Result<Option<CurrentTask>>,
) -> Result<Found> {
    match ids {
        [] => Ok(Found::Nothing),
        [id] => {
            let current = load(id)
                .await?
                .ok_or_else(|| Error::internal("a matched Task vanished", "missing row"))?;
            Ok(Found::One(current))
        }
        _ => Ok(Found::Several),
    }
}

/// The live Tasks written after outbox position `seq`, each with its search index as stored:
/// its row's id, instant and work-list columns, and its index rows.
fn indexes_written_after(conn: &Connection, seq: ChangeSeq) -> Result<Vec<(TaskId, TaskIndex)>> {
    // The work-list values are on the row (`TaskColumns`), the rest in the index rows.
    let changed: Vec<(TaskId, StoredInstant, TaskColumns)> = conn
        .prepare_cached(
            "SELECT t.id, t.last_updated, t.status, t.owner, t.performer, t.performer_system,
               t.due_start, t.due_end, t.authored_on
             FROM task t WHERE t.deleted = 0
               AND t.id IN (SELECT DISTINCT resource_id FROM change_event WHERE seq > ?)
             ORDER BY t.id",
        )?
        .query_map([seq], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                TaskColumns {
                    status: row.get(2)?,
                    owner: row.get(3)?,
                    performer: row.get(4)?,
                    performer_system: row.get(5)?,
                    due_start: row.get(6)?,
                    due_end: row.get(7)?,
                    authored_on: row.get(8)?,
                },
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    if changed.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<TaskId> = changed.iter().map(|(id, ..)| id.clone()).collect();
    let mut indexes: HashMap<TaskId, TaskIndex> = changed
        .iter()
        .map(|(id, last_updated, columns)| {
            let mut index = TaskIndex::default();
            columns.add_entries(&mut index);
            search::add_row_entries(id.as_str(), last_updated.as_str(), &mut index);
            (id.clone(), index)
        })
        .collect();
    let mut tokens = conn.prepare_cached(
        "SELECT task_id, param, system, value FROM task_token
         WHERE task_id IN (SELECT DISTINCT resource_id FROM change_event WHERE seq > ?)",
    )?;
    let mut rows = tokens.query([seq])?;
    while let Some(row) = rows.next()? {
        let id: TaskId = row.get(0)?;
        let param: String = row.get(1)?;
        if let (Some(index), Some(def)) = (indexes.get_mut(&id), task_param(&param)) {
            index.tokens.push(TokenEntry {
                param: def.code,
                system: row.get(2)?,
                value: row.get(3)?,
            });
        }
    }
    let mut dates = conn.prepare_cached(
        "SELECT task_id, param, start_at, end_at FROM task_date
         WHERE task_id IN (SELECT DISTINCT resource_id FROM change_event WHERE seq > ?)",
    )?;
    let mut rows = dates.query([seq])?;
    while let Some(row) = rows.next()? {
        let id: TaskId = row.get(0)?;
        let param: String = row.get(1)?;
        if let (Some(index), Some(def)) = (indexes.get_mut(&id), task_param(&param)) {
            index.dates.push(DateEntry {
                param: def.code,
                start: row.get(2)?,
                end: row.get(3)?,
            });
        }
    }
    // In id order, so that which Task a double match reports does not depend on a hash.
    Ok(ids
        .into_iter()
        .filter_map(|id| indexes.remove(&id).map(|index| (id, index)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collected(tasks: usize, truncated: bool) -> Collected {
        let mut collected = Collected::new(usize::MAX, 1);
        for n in 0..tasks {
            let task = ListedTask {
                id: TaskId::parse(&format!("t{n}")).unwrap(),
                version: Version::FIRST,
                last_updated: StoredInstant::parse("2026-12-07T10:00:00.000000Z").unwrap(),
                json: "{}".into(),
            };
            collected.take(task, None);
        }
        collected.truncated = truncated;
        collected
    }

    /// A page gives its own total only where it must hold the last match: short of `_count`,
    /// not cut by the byte budget, reached by offset, and not an empty page past the end.
    #[test]
    fn a_page_shows_its_total_only_when_it_holds_the_last_match() {
        let shape = |offset, after_cursor| PageShape {
            count: 20,
            offset,
            after_cursor,
            max_bytes: usize::MAX,
            sort_values: 0,
            count_cap: None,
        };
        let cases = [
            (shape(0, false), collected(7, false), Some(7)),
            (shape(40, false), collected(7, false), Some(47)),
            (shape(0, false), collected(0, false), Some(0)),
            // A full page may have more after it.
            (shape(0, false), collected(20, false), None),
            // The byte budget ended the page, not the matches.
            (shape(0, false), collected(7, true), None),
            // Past the end: the matches may be fewer than the offset.
            (shape(40, false), collected(0, false), None),
            // A cursor's page says nothing of the Tasks before the cursor.
            (shape(0, true), collected(7, false), None),
        ];
        for (shape, collected, expected) in cases {
            assert_eq!(
                shape.total_shown(&collected),
                expected,
                "offset {} cursor {} tasks {} truncated {}",
                shape.offset,
                shape.after_cursor,
                collected.tasks.len(),
                collected.truncated
            );
        }
    }
}
