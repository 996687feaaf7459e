//! Plain Task puts written together. A create, or a change tried without a lock
//! (`write::try_unlocked`), is one statement, `PUT_TASK`, needing no transaction around it.
//! Written one by one, each pays a round trip, the executor's start-up for a statement of ten
//! parts, and a commit with its WAL flush: most of a PostgreSQL backend's CPU per write
//! (BENCHMARKS.md, issue 15). Here the puts that wait while the group writers are busy are
//! written by one statement, `PUT_TASKS`, over arrays: each part runs once for the group, and
//! the group commits once, as SQLite's writer commits a group.
//!
//! Each put of a group is still decided alone: its Task row is written only if the Task is at
//! the version before it, and every other part of it reads the rows the upsert wrote, so a
//! put whose check fails writes nothing while the others are written. The statement returns
//! the ids it wrote. A group the server refuses as a whole (two puts to one id, which one
//! upsert cannot both write; a unique key) is written again one put at a time, each with its
//! own answer. A group whose answer was lost (the connection broke) is not: it may have been
//! committed, and each of its puts fails as a single write that lost its answer does.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;

use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::pg_text;
use super::recent::RecentTasks;
use super::tasks::{Put, put_one, put_version_guarded};
use crate::error::{Error, Result};
use crate::fhir::ids::{TaskId, Version};
use crate::fhir::search::Predicate;
use crate::store::CurrentTask;
use crate::store::write::{Deletion, Found, NewVersion, TaskTx, UnlockedChange};

/// `PUT_TASK` for a group: one element of each of `$1`–`$16` per put, in the order they
/// arrived (their change events take ascending `seq`s in that order); the index rows and the
/// AuditEvents as arrays of their own, each row naming its Task. `COLLATE "C"`: the ids are
/// compared with the `C` columns they are joined to. The old index rows are found by
/// `= ANY`, which reads `task_token_task` / `task_date_task` whatever the plan thinks of the
/// group's size (a join could scan the table).
const PUT_TASKS: &str = r#"WITH input AS (
       SELECT id COLLATE "C" AS id, version, last_updated COLLATE "C" AS last_updated,
         priority_rank, resource, interaction, existed, previous_version, status, owner,
         performer, performer_system, due_start, due_end, authored_on, traceparent, ord
       FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::text[],
         $7::boolean[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[],
         $13::text[], $14::text[], $15::text[], $16::text[])
         WITH ORDINALITY AS i(id, version, last_updated, priority_rank, resource, interaction,
           existed, previous_version, status, owner, performer, performer_system, due_start,
           due_end, authored_on, traceparent, ord)
     ), task_row AS (
       INSERT INTO task (id, version, last_updated, deleted, priority_rank, resource,
         status, owner, performer, performer_system, due_start, due_end, authored_on)
       SELECT id, version, last_updated, 0, priority_rank, resource, status, owner, performer,
         performer_system, due_start, due_end, authored_on FROM input
       ON CONFLICT (id) DO UPDATE SET version = excluded.version,
         last_updated = excluded.last_updated, deleted = 0,
         priority_rank = excluded.priority_rank, resource = excluded.resource,
         status = excluded.status, owner = excluded.owner, performer = excluded.performer,
         performer_system = excluded.performer_system, due_start = excluded.due_start,
         due_end = excluded.due_end, authored_on = excluded.authored_on
       WHERE task.version = excluded.version - 1
       RETURNING id
     ), written AS (
       SELECT input.* FROM input JOIN task_row USING (id)
     ), version_row AS (
       INSERT INTO task_version (id, version, last_updated, interaction, resource)
       SELECT id, version, last_updated, interaction, resource FROM written
     ), old_tokens AS (
       DELETE FROM task_token WHERE task_id = ANY (ARRAY(SELECT id FROM written WHERE existed))
     ), old_dates AS (
       DELETE FROM task_date WHERE task_id = ANY (ARRAY(SELECT id FROM written WHERE existed))
     ), tokens AS (
       INSERT INTO task_token (task_id, param, system, value)
       SELECT task_row.id, x.p, x.s, x.v
       FROM unnest($17::text[], $18::text[], $19::text[], $20::text[]) AS x(id, p, s, v)
       JOIN task_row ON task_row.id = x.id COLLATE "C"
     ), dates AS (
       INSERT INTO task_date (task_id, param, start_at, end_at)
       SELECT task_row.id, x.p, x.s, x.e
       FROM unnest($21::text[], $22::text[], $23::text[], $24::text[]) AS x(id, p, s, e)
       JOIN task_row ON task_row.id = x.id COLLATE "C"
     ), audit AS (
       INSERT INTO audit_event (recorded, type_code, subtype, outcome, agent, entity, resource)
       SELECT w.last_updated, 'rest', a.subtype, a.outcome, a.agent, a.entity, a.facts
       FROM unnest($25::text[], $26::text[], $27::text[], $28::text[], $29::text[],
         $30::text[]) AS a(id, subtype, outcome, agent, entity, facts)
       JOIN written w ON w.id = a.id COLLATE "C"
       ORDER BY w.ord
     )
     INSERT INTO change_event (resource_type, resource_id, version, previous_version,
       interaction, recorded_at, traceparent)
     SELECT 'Task', id, version, previous_version, interaction, last_updated, traceparent
     FROM written ORDER BY ord
     RETURNING resource_id"#;

/// A put waiting for its group, and where its answer goes: whether it was written.
struct Job {
    put: Put,
    done: oneshot::Sender<Result<bool>>,
}

/// The queue of puts and the group writers that empty it. Each writer takes every put waiting
/// (up to `most`) when it comes free, so groups grow with the load by themselves: one put
/// alone is written at once, as before.
pub(super) struct PutGroups {
    queue: mpsc::UnboundedSender<Job>,
}

impl PutGroups {
    /// Starts `writers` group writers on `pool` (a pool of their own, so that requests
    /// holding the serving pool's connections cannot keep them from one), each writing at most
    /// `most` puts at a time. They stop when the `PutGroups` is dropped.
    pub(super) fn start(pool: PgPool, writers: u32, most: usize) -> PutGroups {
        let (queue, waiting) = mpsc::unbounded_channel();
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..writers {
            tokio::spawn(write_groups(pool.clone(), waiting.clone(), most.max(1)));
        }
        PutGroups { queue }
    }

    /// Writes `put` in the next group: false, and nothing written, when its Task is no longer
    /// at the version before it (as `put_one`).
    pub(super) async fn put(&self, put: Put) -> Result<bool> {
        let (done, answer) = oneshot::channel();
        self.queue.send(Job { put, done }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> Error {
    Error::internal(
        "writing a Task",
        "the PostgreSQL group writers have stopped",
    )
}

/// One group writer: takes the waiting puts, writes them, answers each; until the queue closes.
async fn write_groups(
    pool: PgPool,
    waiting: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    most: usize,
) {
    loop {
        let group = {
            // Held while this writer waits for a put: the other writers are idle meanwhile.
            let mut waiting = waiting.lock().await;
            let Some(first) = waiting.recv().await else {
                return;
            };
            let mut group = vec![first];
            while group.len() < most {
                match waiting.try_recv() {
                    Ok(job) => group.push(job),
                    Err(_) => break,
                }
            }
            group
        };
        write_group(&pool, group).await;
    }
}

async fn write_group(pool: &PgPool, group: Vec<Job>) {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(e) => return fail_all(group, &Error::from(e)),
    };
    if group.len() > 1 {
        match put_group(&mut conn, &group).await {
            Ok(written) => {
                for job in group {
                    let _ = job.done.send(Ok(written.contains(job.put.id.as_str())));
                }
                return;
            }
            // Refused by the server: rolled back, nothing of it written; one by one below.
            Err(sqlx::Error::Database(e)) => {
                metrics::counter!("baton_store_put_groups_split_total").increment(1);
                tracing::debug!(error = %e, puts = group.len(), "a group of Task puts was refused; writing them one by one");
            }
            Err(e) => return fail_all(group, &Error::from(e)),
        }
    }
    for job in group {
        let _ = job.done.send(put_one(&mut conn, &job.put).await);
    }
}

fn fail_all(group: Vec<Job>, e: &Error) {
    for job in group {
        let _ = job.done.send(Err(e.for_another_request()));
    }
}

/// Writes a group with `PUT_TASKS`; the ids written.
async fn put_group(conn: &mut PgConnection, group: &[Job]) -> sqlx::Result<HashSet<String>> {
    let puts = || group.iter().map(|job| &job.put);
    let ids: Vec<&str> = puts().map(|p| p.id.as_str()).collect();
    let versions: Vec<Version> = puts().map(|p| p.version).collect();
    let instants: Vec<&str> = puts().map(|p| p.last_updated.as_str()).collect();
    let ranks: Vec<i64> = puts().map(|p| p.priority_rank).collect();
    let texts: Vec<&str> = puts().map(|p| &*p.text).collect();
    let interactions: Vec<&str> = puts().map(|p| p.interaction.as_str()).collect();
    let existed: Vec<bool> = puts().map(|p| p.existed).collect();
    let previous: Vec<Option<i64>> = puts()
        .map(|p| p.previous_version.map(Version::get))
        .collect();
    let column = |get: fn(&Put) -> Option<&str>| -> Vec<Option<Cow<str>>> {
        puts().map(|p| get(p).map(pg_text)).collect()
    };
    let status = column(|p| p.columns.status.as_deref());
    let owner = column(|p| p.columns.owner.as_deref());
    let performer = column(|p| p.columns.performer.as_deref());
    let performer_system = column(|p| p.columns.performer_system.as_deref());
    let due_start = column(|p| p.columns.due_start.as_deref());
    let due_end = column(|p| p.columns.due_end.as_deref());
    let authored_on = column(|p| p.columns.authored_on.as_deref());
    let traces: Vec<Option<&str>> = puts().map(|p| p.trace.as_deref()).collect();

    let tokens = || puts().flat_map(|p| p.index.tokens.iter().map(move |t| (p.id.as_str(), t)));
    let token_ids: Vec<&str> = tokens().map(|(id, _)| id).collect();
    let token_params: Vec<&str> = tokens().map(|(_, t)| t.param).collect();
    let token_systems: Vec<Option<Cow<str>>> = tokens()
        .map(|(_, t)| t.system.as_deref().map(pg_text))
        .collect();
    let token_values: Vec<Cow<str>> = tokens().map(|(_, t)| pg_text(&t.value)).collect();
    let dates = || puts().flat_map(|p| p.index.dates.iter().map(move |d| (p.id.as_str(), d)));
    let date_ids: Vec<&str> = dates().map(|(id, _)| id).collect();
    let date_params: Vec<&str> = dates().map(|(_, d)| d.param).collect();
    let date_starts: Vec<&str> = dates().map(|(_, d)| d.start.as_str()).collect();
    let date_ends: Vec<&str> = dates().map(|(_, d)| d.end.as_str()).collect();
    let audits = || puts().filter_map(|p| p.audit.as_ref().map(|a| (p.id.as_str(), a)));
    let audit_ids: Vec<&str> = audits().map(|(id, _)| id).collect();
    let subtypes: Vec<&str> = audits().map(|(_, a)| a.subtype.as_str()).collect();
    let outcomes: Vec<&str> = audits().map(|(_, a)| a.outcome).collect();
    let agents: Vec<Option<&str>> = audits().map(|(_, a)| a.agent.as_deref()).collect();
    let entities: Vec<Option<&str>> = audits().map(|(_, a)| a.entity.as_deref()).collect();
    let facts: Vec<&str> = audits().map(|(_, a)| a.facts.as_str()).collect();

    let written: Vec<String> = sqlx::query_scalar(PUT_TASKS)
        .bind(&ids)
        .bind(&versions)
        .bind(&instants)
        .bind(&ranks)
        .bind(&texts)
        .bind(&interactions)
        .bind(&existed)
        .bind(&previous)
        .bind(&status)
        .bind(&owner)
        .bind(&performer)
        .bind(&performer_system)
        .bind(&due_start)
        .bind(&due_end)
        .bind(&authored_on)
        .bind(&traces)
        .bind(&token_ids)
        .bind(&token_params)
        .bind(&token_systems)
        .bind(&token_values)
        .bind(&date_ids)
        .bind(&date_params)
        .bind(&date_starts)
        .bind(&date_ends)
        .bind(&audit_ids)
        .bind(&subtypes)
        .bind(&outcomes)
        .bind(&agents)
        .bind(&entities)
        .bind(&facts)
        .fetch_all(conn)
        .await?;
    Ok(written.into_iter().collect())
}

/// What `PostgresStore::write` runs a plain create or an unlocked change on: its puts go to the
/// group writers, its read of the Task to the serving pool, unless the node remembers the
/// version it wrote last (`recent`); anything else a write might ask runs on a serving
/// connection taken when first needed, outside any transaction, as a one-statement write runs.
pub(super) struct Grouped<'a> {
    pool: &'a PgPool,
    groups: &'a PutGroups,
    /// Told of every put written (remembered) and every put the Task had moved past
    /// (forgotten).
    recent: &'a RecentTasks,
    conn: Option<PoolConnection<Postgres>>,
}

impl<'a> Grouped<'a> {
    pub(super) fn new(
        pool: &'a PgPool,
        groups: &'a PutGroups,
        recent: &'a RecentTasks,
    ) -> Grouped<'a> {
        Grouped {
            pool,
            groups,
            recent,
            conn: None,
        }
    }

    async fn conn(&mut self) -> Result<&mut PgConnection> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(self.conn.insert(conn))
    }
}

impl TaskTx for Grouped<'_> {
    type Seen = ();

    async fn load_for_change(&mut self, id: &TaskId) -> Result<Option<CurrentTask>> {
        self.conn().await?.load_for_change(id).await
    }

    async fn recheck(&mut self, criteria: &[Predicate], seen: ()) -> Result<Found> {
        self.conn().await?.recheck(criteria, seen).await
    }

    async fn status_before_hold(&mut self, id: &TaskId) -> Result<Option<String>> {
        self.conn().await?.status_before_hold(id).await
    }

    async fn children_for_change(
        &mut self,
        parent: &TaskId,
        limit: usize,
    ) -> Result<Vec<CurrentTask>> {
        self.conn().await?.children_for_change(parent, limit).await
    }

    async fn put_version(&mut self, v: &NewVersion<'_>) -> Result<()> {
        put_version_guarded(self, v).await
    }

    async fn delete_version(&mut self, d: &Deletion<'_>) -> Result<()> {
        self.conn().await?.delete_version(d).await
    }
}

impl UnlockedChange for Grouped<'_> {
    async fn read_unlocked(&mut self, id: &TaskId) -> Result<Option<CurrentTask>> {
        super::read_current(self.pool, id).await
    }

    fn recent(&self, id: &TaskId) -> Option<CurrentTask> {
        self.recent.get(id)
    }

    async fn put_version_if_unchanged(&mut self, v: &NewVersion<'_>) -> Result<bool> {
        let put = Put::of(v);
        let text = Arc::clone(&put.text);
        let written = self.groups.put(put).await?;
        if written {
            self.recent.wrote(v.id, v.version, v.last_updated, text);
        } else {
            self.recent.forget(v.id);
        }
        Ok(written)
    }
}

/// Writes `puts` as one group at once, as a group writer would: their answers, in order.
#[cfg(test)]
pub(super) async fn write_now(pool: &PgPool, puts: Vec<Put>) -> Vec<Result<bool>> {
    let (group, answers): (Vec<Job>, Vec<_>) = puts
        .into_iter()
        .map(|put| {
            let (done, answer) = oneshot::channel();
            (Job { put, done }, answer)
        })
        .unzip();
    write_group(pool, group).await;
    let mut results = Vec::new();
    for answer in answers {
        results.push(answer.await.unwrap_or_else(|_| Err(stopped())));
    }
    results
}
