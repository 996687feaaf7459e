//! SQLite statements for the event log, the delivery state, subscription searches and due
//! dates (a subscription's own writes are in `subscriptions`). The write functions run on the
//! writer thread's connection (rusqlite), inside its transaction; the read functions use the
//! read pool (sqlx).
//!
//! The statements both dialects share are `store::hub_sql`'s; their `$n` placeholders are
//! SQLite parameters numbered by first appearance, which both clients bind in order. What
//! stays here per dialect is how they run, with SQLite's `?` where a statement is built, and
//! the statements SQLite alone has (`record_matches` walks the chunk as JSON with
//! `json_each`, where PostgreSQL binds arrays to `unnest`).

use rusqlite::{Connection, OptionalExtension, params};
use sqlx::sqlite::SqlitePool;
use sqlx::{AssertSqlSafe, Row};

use std::collections::HashMap;
use std::sync::LazyLock;

use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, EventNumber, StoredInstant, SubscriptionId, TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::store::hub_sql;
use crate::store::rows::{EventRow, subscription_from_row};
use crate::store::search_sql::Placeholder;
use crate::store::{
    ChangeEvent, ChangeProgress, DeliveryReport, EventRecord, HandshakeOwed, MatchBatch,
    StoredSubscription, SubscriptionGauges, SubscriptionQuery,
};

/// Events `?2..=?3` of subscription `?1`'s log, oldest first, expanded from its runs as
/// `hub_sql::SUBSCRIPTION_EVENTS` expands them, found through the log's layout by change
/// (migration 0018): the subscription's marks from the latest one at or before `?2` up to
/// `?3`, each by one seek on `subscription_event_marks`, and after each mark that is not
/// followed at once by the next one (events between them are in unmarked runs), the log's
/// changes from the mark up to the next mark and at most `MARK_SPAN` changes on, by the key.
static SUBSCRIPTION_EVENTS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH marks AS (
           SELECT change_seq, event_number, events,
                  lead(event_number) OVER w AS next_number, lead(change_seq) OVER w AS next_seq
           FROM subscription_event
           WHERE subscription_id = ?1 AND marked <> 0
             AND event_number >= coalesce((SELECT max(f.event_number) FROM subscription_event f
                                           WHERE f.subscription_id = ?1 AND f.marked <> 0
                                             AND f.event_number <= ?2), 0)
             AND event_number <= ?3
           WINDOW w AS (ORDER BY event_number)),
         runs AS (
           SELECT change_seq, event_number, events FROM marks
           UNION ALL
           SELECT e.change_seq, e.event_number, e.events
           FROM marks m JOIN subscription_event e
             ON e.change_seq > m.change_seq AND e.change_seq < m.change_seq + {MARK_SPAN}
            AND e.change_seq < coalesce(m.next_seq, m.change_seq + {MARK_SPAN})
            AND e.subscription_id = ?1
           WHERE m.event_number + m.events < coalesce(m.next_number, ?3 + 1)
             AND e.marked = 0 AND e.event_number <= ?3 AND e.event_number + e.events > ?2)
         SELECT r.event_number + (c.seq - r.change_seq) AS event_number, c.seq AS change_seq,
                c.resource_id AS task_id, c.version, c.interaction, c.recorded_at AS occurred_at,
                c.traceparent
         FROM runs r
         JOIN change_event c ON c.seq BETWEEN r.change_seq AND r.change_seq + r.events - 1
         WHERE r.event_number + (c.seq - r.change_seq) BETWEEN ?2 AND ?3
         ORDER BY 1"
    )
});

/// The `seq` of the change of subscription `s`'s first undelivered event (`hub_sql`'s rule):
/// found in the log by change from the subscription's latest mark at or before it, within
/// `MARK_SPAN` changes of it.
fn first_undelivered_seq() -> String {
    let mark = "(SELECT f.change_seq FROM subscription_event f
                 WHERE f.subscription_id = s.id AND f.marked <> 0
                   AND f.event_number <= s.delivered_through + 1
                 ORDER BY f.event_number DESC LIMIT 1)";
    format!(
        "(SELECT e.change_seq + (s.delivered_through + 1 - e.event_number)
          FROM subscription_event e
          WHERE e.change_seq >= {mark} AND e.change_seq < {mark} + {MARK_SPAN}
            AND e.subscription_id = s.id AND e.event_number <= s.delivered_through + 1
          ORDER BY e.change_seq DESC LIMIT 1)"
    )
}

/// `hub_sql::WORK_WAITING` on the log by change.
static WORK_WAITING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "s.status <> 'off'
       AND ((s.handshake_pending <> 0 AND s.last_updated <= $1)
         OR (s.delivered_through < s.events_since_start
             AND coalesce(s.next_attempt_at,
                   (SELECT c.recorded_at FROM change_event c WHERE c.seq = {})) <= $1))",
        first_undelivered_seq()
    )
});

/// `hub_sql::OLDEST_UNDELIVERED` on the log by change.
static OLDEST_UNDELIVERED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT min(c.recorded_at) FROM subscription s
         JOIN change_event c ON c.seq = {}
         WHERE s.delivered_through < s.events_since_start",
        first_undelivered_seq()
    )
});

/// `hub_sql::PRUNE_EVENTS` on the log by change: the runs of events that all happened before
/// `?1` and were all delivered, but a marked run only if the subscription's next mark goes
/// too. Every run kept then keeps the latest mark before it: the runs between a mark and the
/// next happened before the next, and their events come before its (a run with an
/// undelivered event keeps every mark before it). (Pruning by time takes the clock to move
/// forward, as it always has: runs out of time order could be kept without their mark.)
const PRUNE_EVENTS: &str = "DELETE FROM subscription_event
     WHERE occurred_at < ?1 AND event_number + events - 1 <=
       (SELECT s.delivered_through FROM subscription s WHERE s.id = subscription_event.subscription_id)
       AND (marked = 0 OR EXISTS (
         SELECT 1 FROM subscription_event n
         WHERE n.subscription_id = subscription_event.subscription_id AND n.marked <> 0
           AND n.event_number > subscription_event.event_number AND n.occurred_at < ?1
           AND n.event_number + n.events - 1 <=
             (SELECT s.delivered_through FROM subscription s WHERE s.id = n.subscription_id)))";

/// Records a chunk of matches in four statements, whatever its size: the progress check,
/// one `UPDATE … FROM json_each` that moves each matched subscription's counter once (by its
/// number of matches), one `INSERT … SELECT FROM json_each` of the chunk's runs
/// (`hub_sql::plan_runs`), and the cursor with the progress inside a change. The chunk's
/// JSON is bound as one text value: SQLite walks it without a statement per match.
pub(super) fn record_matches(
    conn: &Connection,
    batch: MatchBatch,
) -> Result<Vec<(SubscriptionId, EventNumber)>> {
    let recorded = match_progress(conn, &batch.consumer)?;
    if recorded != batch.resumed {
        return Err(Error::conflict(format!(
            "the {} recorded progress {recorded:?} inside a change, but this chunk continues \
             from {:?}; nothing of it was recorded",
            batch.consumer, batch.resumed
        )));
    }
    let before = if batch.matches.is_empty() {
        HashMap::new()
    } else {
        let plan = hub_sql::plan_runs(&batch.matches);
        let counts: Vec<(&str, i64)> = plan
            .counts
            .iter()
            .map(|(id, n)| (id.as_str(), *n))
            .collect();
        let mut bump = conn.prepare_cached(
            "UPDATE subscription SET events_since_start = events_since_start + m.n
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS n FROM json_each(?1)) AS m
             WHERE subscription.id = m.id AND subscription.status <> 'off'
             RETURNING subscription.id, subscription.events_since_start, subscription.mark_seq",
        )?;
        // The counter after the chunk, less the chunk's matches: the counter before it. A
        // subscription deleted or turned off since matching is not returned and gets nothing.
        let mut before: HashMap<SubscriptionId, i64> = HashMap::with_capacity(counts.len());
        let mut marks: HashMap<SubscriptionId, Option<i64>> =
            HashMap::with_capacity(counts.len());
        let mut rows = bump.query([as_json(&counts)?])?;
        while let Some(row) = rows.next()? {
            let id: SubscriptionId = row.get(0)?;
            marks.insert(id.clone(), row.get(2)?);
            before.insert(id, row.get(1)?);
        }
        for (id, n) in &plan.counts {
            if let Some(count) = before.get_mut(id) {
                *count -= n;
            }
        }
        // Which runs are marked (see migration 0018): a subscription's run is marked when it
        // starts `MARK_SPAN` changes or more after its latest mark, or it has none yet.
        let mut moved: Vec<&SubscriptionId> = Vec::new();
        let runs: Vec<(&str, i64, ChangeSeq, i64, bool)> = plan
            .runs
            .iter()
            .filter_map(|run| {
                let id = &plan.counts[run.subscription].0;
                let start = before.get(id)?;
                let mark = marks.get_mut(id)?;
                let marked = mark_run(mark, run.change_seq.get());
                if marked {
                    moved.push(id);
                }
                Some((
                    id.as_str(),
                    start + run.offset + 1,
                    run.change_seq,
                    run.events,
                    marked,
                ))
            })
            .collect();
        if !runs.is_empty() {
            conn.prepare_cached(&format!(
                "INSERT INTO subscription_event (change_seq, subscription_id, event_number, events, occurred_at, marked)
                 SELECT r.change_seq, r.subscription_id, r.event_number, r.events, {}, r.marked
                 FROM (SELECT value ->> 0 AS subscription_id, value ->> 1 AS event_number,
                              value ->> 2 AS change_seq, value ->> 3 AS events,
                              value ->> 4 AS marked
                       FROM json_each(?1)) AS r",
                hub_sql::RUN_OCCURRED_AT
            ))?
            .execute([as_json(&runs)?])?;
        }
        if !moved.is_empty() {
            moved.sort_unstable();
            moved.dedup();
            let moved: Vec<(&str, Option<i64>)> = moved
                .into_iter()
                .map(|id| (id.as_str(), marks.get(id).copied().flatten()))
                .collect();
            conn.prepare_cached(
                "UPDATE subscription SET mark_seq = m.seq
                 FROM (SELECT value ->> 0 AS id, value ->> 1 AS seq FROM json_each(?1)) AS m
                 WHERE subscription.id = m.id",
            )?
            .execute([as_json(&moved)?])?;
        }
        before
    };
    let (partial_seq, partial_through) = match &batch.progress {
        Some(p) => (Some(p.seq), Some(p.through.as_str())),
        None => (None, None),
    };
    conn.prepare_cached(
        "INSERT INTO outbox_cursor (consumer, seq, partial_seq, partial_through) VALUES (?, ?, ?, ?)
         ON CONFLICT (consumer) DO UPDATE SET seq = max(seq, excluded.seq),
           partial_seq = excluded.partial_seq, partial_through = excluded.partial_through",
    )?
    .execute(params![
        &batch.consumer,
        batch.changes.iter().max().copied().unwrap_or(ChangeSeq::ZERO),
        partial_seq,
        partial_through,
    ])?;
    Ok(hub_sql::number_matches(batch.matches, &before))
}

/// A subscription's marked runs are at most this many changes apart from the unmarked runs
/// after them (migration 0018): reading a subscription's log from a mark scans at most this
/// many changes of the log, and a subscription that hears every change gets one mark (one
/// entry in `subscription_event_marks`, one page written) per this many changes instead of
/// one per chunk.
pub(crate) const MARK_SPAN: i64 = 512;

/// Whether a run starting at change `seq` is marked, given the subscription's latest mark
/// (moved to `seq` if so): its first run, or one `MARK_SPAN` changes or more after the mark.
fn mark_run(mark: &mut Option<i64>, seq: i64) -> bool {
    let marked = mark.is_none_or(|m| seq.saturating_sub(m) >= MARK_SPAN);
    if marked {
        *mark = Some(seq);
    }
    marked
}

/// A chunk's values as one JSON text, for `json_each`.
fn as_json(values: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(values).map_err(|e| Error::internal("encoding a chunk of matches", e))
}

/// The progress inside a change that `record_matches` last left for `consumer`.
pub(super) fn match_progress(conn: &Connection, consumer: &str) -> Result<Option<ChangeProgress>> {
    let row: Option<(Option<ChangeSeq>, Option<SubscriptionId>)> = conn
        .prepare_cached(
            "SELECT partial_seq, partial_through FROM outbox_cursor WHERE consumer = ?",
        )?
        .query_row([consumer], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    Ok(match row {
        Some((Some(seq), Some(through))) => Some(ChangeProgress { seq, through }),
        _ => None,
    })
}

/// Each report in turn, with the same two cached statements: a batch of a thousand is a
/// thousand row updates in one savepoint, never a thousand jobs. The attempts' AuditEvents go
/// in the same commit (the writer's group audit insert), so the delivery ledger costs no job
/// or commit of its own.
pub(super) fn record_deliveries(conn: &Connection, reports: Vec<DeliveryReport>) -> Result<()> {
    for report in reports {
        record_delivery(conn, report)?;
    }
    Ok(())
}

fn record_delivery(conn: &Connection, report: DeliveryReport) -> Result<()> {
    match report {
        DeliveryReport::Delivered {
            subscription_id,
            through,
            handshake,
            status,
            at,
            rewinds,
        } => {
            let settled = handshake == HandshakeOwed::Settled;
            conn.prepare_cached(
                // The position moves only if delivery was not restarted since the attempt
                // read the row (`$resend`): an attempt in flight cannot undo a restart.
                "UPDATE subscription SET delivered_through = CASE WHEN rewinds = ?
                     THEN max(delivered_through, ?) ELSE delivered_through END,
                   handshake_pending = CASE WHEN ? THEN 0 ELSE handshake_pending END,
                   failures = 0, failing_since = NULL, next_attempt_at = NULL, last_error = NULL,
                   last_sent_at = ?,
                   -- Off stays off; a row that owes a handshake (the subscription was replaced
                   -- while this attempt was in flight) keeps its status until the handshake.
                   status = CASE WHEN status = 'off' THEN 'off'
                     WHEN handshake_pending = 1 AND NOT ? THEN status ELSE ? END
                 WHERE id = ?",
            )?
            .execute(params![
                rewinds,
                through,
                settled,
                &at,
                settled,
                status.as_str(),
                &subscription_id,
            ])?;
        }
        DeliveryReport::Failed {
            subscription_id,
            error,
            failures,
            failing_since,
            next_attempt_at,
            status,
        } => {
            conn.prepare_cached(
                "UPDATE subscription SET failures = ?, failing_since = ?, next_attempt_at = ?,
                   last_error = ?, status = CASE WHEN status = 'off' THEN 'off' ELSE ? END
                 WHERE id = ?",
            )?
            .execute(params![
                failures,
                &failing_since,
                &next_attempt_at,
                &error,
                status.as_str(),
                &subscription_id,
            ])?;
        }
    }
    Ok(())
}

/// Moves a live subscription's delivery position back to just before `from` and counts the
/// restart (see `Store::restart_delivery`); None if it is gone or `off`.
pub(super) fn restart_delivery(
    conn: &Connection,
    id: &SubscriptionId,
    from: EventNumber,
) -> Result<Option<StoredSubscription>> {
    let restarted = conn
        .prepare_cached(
            "UPDATE subscription SET delivered_through = min(delivered_through, ?),
               rewinds = rewinds + 1
             WHERE id = ? AND status <> 'off'",
        )?
        .execute(params![from.get() - 1, id])?;
    if restarted == 0 {
        return Ok(None);
    }
    super::subscriptions::load(conn, id)
}

pub(super) fn prune_events(conn: &Connection, before: &StoredInstant) -> Result<u64> {
    let pruned = conn
        .prepare_cached(PRUNE_EVENTS)?
        .execute([before])?;
    Ok(pruned as u64)
}

pub(super) async fn subscription_gauges(
    pool: &SqlitePool,
    max_backlogs: usize,
) -> Result<SubscriptionGauges> {
    let by_status = sqlx::query_as::<_, (String, i64)>(hub_sql::SUBSCRIPTIONS_BY_STATUS)
        .fetch_all(pool)
        .await?;
    let backlogs = sqlx::query_as::<_, (SubscriptionId, i64)>(hub_sql::LARGEST_BACKLOGS)
        .bind(i64::try_from(max_backlogs).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await?;
    let oldest_undelivered =
        sqlx::query_scalar::<_, Option<StoredInstant>>(AssertSqlSafe(OLDEST_UNDELIVERED.as_str()))
            .fetch_one(pool)
            .await?;
    Ok(SubscriptionGauges {
        by_status,
        backlogs,
        oldest_undelivered,
    })
}

pub(super) async fn search_subscriptions(
    reads: &SqlitePool,
    query: &SubscriptionQuery,
    count: usize,
    offset: usize,
) -> Result<(Vec<StoredSubscription>, u64)> {
    let search = hub_sql::subscription_search(query, Placeholder::Question);
    let mut total = sqlx::query_scalar::<_, i64>(AssertSqlSafe(search.count));
    for bind in &search.binds {
        total = total.bind(bind);
    }
    let total = total.fetch_one(reads).await?;
    let mut rows = sqlx::query(AssertSqlSafe(search.page));
    for bind in &search.binds {
        rows = rows.bind(bind);
    }
    let rows = rows
        .bind(count as i64)
        .bind(offset as i64)
        .fetch_all(reads)
        .await?;
    let found = rows
        .iter()
        .map(subscription_from_row)
        .collect::<Result<_>>()?;
    Ok((found, total as u64))
}

/// A subscription's events `from..=to`, read on the caller's thread (`point`).
pub(super) fn subscription_events(
    conn: &Connection,
    id: &SubscriptionId,
    from: EventNumber,
    to: EventNumber,
) -> Result<Vec<EventRecord>> {
    let mut statement = conn.prepare_cached(&SUBSCRIPTION_EVENTS)?;
    let rows = statement.query_map(params![id, from, to], EventRow::from_rusqlite)?;
    rows.map(|row| row?.into_record()).collect()
}

pub(super) async fn overdue_tasks(
    reads: &SqlitePool,
    now: &StoredInstant,
    limit: usize,
) -> Result<Vec<(TaskId, StoredInstant)>> {
    let rows = sqlx::query(AssertSqlSafe(hub_sql::overdue_tasks()))
        .bind(now)
        .bind(limit as i64)
        .fetch_all(reads)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("task_id")?, r.try_get("end_at")?)))
        .collect()
}

/// Checked, marked and recorded inside the writer's transaction; the single writer runs one
/// job at a time, so the Task cannot change in between.
pub(super) fn mark_overdue(
    conn: &Connection,
    task_id: &TaskId,
    due_at: &StoredInstant,
    now: &StoredInstant,
) -> Result<bool> {
    let version: Option<Version> = conn
        .prepare_cached(&hub_sql::overdue_version(""))?
        .query_row(params![due_at, task_id, now], |row| row.get(0))
        .optional()?;
    let Some(version) = version else {
        return Ok(false);
    };
    let marked = conn
        .prepare_cached(hub_sql::MARK_OVERDUE)?
        .execute(params![task_id, due_at])?;
    if marked == 0 {
        return Ok(false);
    }
    conn.prepare_cached(hub_sql::OVERDUE_EVENT)?
        .execute(params![task_id, version, now])?;
    Ok(true)
}

/// One node has no claims: work waiting is all there is to it.
pub(super) async fn due_subscriptions(
    reads: &SqlitePool,
    stale_before: &StoredInstant,
    limit: usize,
) -> Result<Vec<SubscriptionId>> {
    let sql = format!(
        "SELECT s.id FROM subscription s WHERE {} ORDER BY s.id LIMIT $2",
        WORK_WAITING.as_str()
    );
    Ok(sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(stale_before)
        .bind(limit as i64)
        .fetch_all(reads)
        .await?)
}

pub(super) async fn next_due(
    reads: &SqlitePool,
    now: &StoredInstant,
) -> Result<Option<StoredInstant>> {
    Ok(sqlx::query_scalar(hub_sql::NEXT_DUE)
        .bind(now)
        .fetch_one(reads)
        .await?)
}

/// The committed changes after `seq`, oldest first, at most `limit`, on a point-read
/// connection: what the outbox consumer reads after every commit.
pub(super) fn change_events_after(
    conn: &Connection,
    seq: ChangeSeq,
    limit: usize,
) -> Result<Vec<ChangeEvent>> {
    // The limit is written into the text: SQLite re-prepares a statement at every run whose
    // LIMIT is bound (BENCHMARKS.md, issue 16), and the consumer asks one limit all day.
    let mut read = conn.prepare_cached(&format!(
        "SELECT seq, resource_type, resource_id, version, previous_version, interaction,
                recorded_at, traceparent
         FROM change_event WHERE seq > ?1 ORDER BY seq LIMIT {limit}"
    ))?;
    let found = read.query_map(params![seq], |row| {
        let interaction: String = row.get(5)?;
        Ok(ChangeEvent {
            seq: row.get(0)?,
            resource_type: row.get(1)?,
            resource_id: row.get(2)?,
            version: row.get(3)?,
            previous_version: row.get(4)?,
            interaction: Interaction::parse(&interaction).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    5,
                    rusqlite::types::Type::Text,
                    format!("unknown interaction in outbox: {interaction}").into(),
                )
            })?,
            recorded_at: row.get(6)?,
            traceparent: row.get(7)?,
        })
    })?;
    Ok(found.collect::<rusqlite::Result<_>>()?)
}
