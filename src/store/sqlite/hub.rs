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
             RETURNING subscription.id, subscription.events_since_start",
        )?;
        // The counter after the chunk, less the chunk's matches: the counter before it. A
        // subscription deleted or turned off since matching is not returned and gets nothing.
        let mut before: HashMap<SubscriptionId, i64> = HashMap::with_capacity(counts.len());
        let mut rows = bump.query([as_json(&counts)?])?;
        while let Some(row) = rows.next()? {
            before.insert(row.get(0)?, row.get(1)?);
        }
        for (id, n) in &plan.counts {
            if let Some(count) = before.get_mut(id) {
                *count -= n;
            }
        }
        let runs: Vec<(&str, i64, ChangeSeq, i64)> = plan
            .runs
            .iter()
            .filter_map(|run| {
                let id = &plan.counts[run.subscription].0;
                let start = before.get(id)?;
                Some((
                    id.as_str(),
                    start + run.offset + 1,
                    run.change_seq,
                    run.events,
                ))
            })
            .collect();
        if !runs.is_empty() {
            conn.prepare_cached(&format!(
                "INSERT INTO subscription_event (subscription_id, event_number, change_seq, events, occurred_at)
                 SELECT r.subscription_id, r.event_number, r.change_seq, r.events, {}
                 FROM (SELECT value ->> 0 AS subscription_id, value ->> 1 AS event_number,
                              value ->> 2 AS change_seq, value ->> 3 AS events
                       FROM json_each(?1)) AS r",
                hub_sql::RUN_OCCURRED_AT
            ))?
            .execute([as_json(&runs)?])?;
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
        .prepare_cached(hub_sql::PRUNE_EVENTS)?
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
        sqlx::query_scalar::<_, Option<StoredInstant>>(hub_sql::OLDEST_UNDELIVERED)
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
    let mut statement = conn.prepare_cached(hub_sql::SUBSCRIPTION_EVENTS)?;
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
        hub_sql::WORK_WAITING
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
