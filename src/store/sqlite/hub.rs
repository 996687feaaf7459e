//! SQLite statements for the event log, the delivery state, subscription searches and due
//! dates (a subscription's own writes are in `subscriptions`). The write functions run on the
//! writer thread's connection (rusqlite), inside its transaction; the read functions use the
//! read pool (sqlx).
//!
//! The statements both dialects share are `store::hub_sql`'s; their `$n` placeholders are
//! SQLite parameters numbered by first appearance, which both clients bind in order. What
//! stays here per dialect is how they run, with SQLite's `?` where a statement is built, and
//! the statements SQLite alone has (`record_matches` numbers matches one at a time, where
//! PostgreSQL numbers a batch in one statement).

use rusqlite::{Connection, OptionalExtension, params};
use sqlx::sqlite::SqlitePool;
use sqlx::{AssertSqlSafe, Row};

use crate::error::Result;
use crate::fhir::ids::{ChangeSeq, EventNumber, StoredInstant, SubscriptionId, TaskId, Version};
use crate::store::hub_sql;
use crate::store::rows::{event_from_row, subscription_from_row};
use crate::store::search_sql::Placeholder;
use crate::store::{
    DeliveryReport, EventRecord, HandshakeOwed, MatchRow, StoredSubscription, SubscriptionQuery,
};

pub(super) fn record_matches(
    conn: &Connection,
    consumer: &str,
    through_seq: ChangeSeq,
    matches: Vec<MatchRow>,
) -> Result<Vec<(SubscriptionId, EventNumber)>> {
    let mut count = conn.prepare_cached(
        "UPDATE subscription SET events_since_start = events_since_start + 1
         WHERE id = ? AND status != 'off' RETURNING events_since_start",
    )?;
    let mut log = conn.prepare_cached(
        "INSERT INTO subscription_event (subscription_id, event_number, change_seq, task_id, version, interaction, occurred_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )?;
    let mut numbered = Vec::with_capacity(matches.len());
    for m in matches {
        // The counter and the log row move together; a subscription deleted or turned off
        // since matching simply gets nothing.
        let number: Option<EventNumber> = count
            .query_row([&m.subscription_id], |row| row.get(0))
            .optional()?;
        let Some(number) = number else { continue };
        log.execute(params![
            &m.subscription_id,
            number,
            m.change_seq,
            &m.task_id,
            m.version,
            m.interaction.as_str(),
            &m.occurred_at,
        ])?;
        numbered.push((m.subscription_id, number));
    }
    conn.prepare_cached(
        "INSERT INTO outbox_cursor (consumer, seq) VALUES (?, ?)
         ON CONFLICT (consumer) DO UPDATE SET seq = max(seq, excluded.seq)",
    )?
    .execute(params![consumer, through_seq])?;
    Ok(numbered)
}

/// Each report in turn, with the same two cached statements: a batch of a thousand is a
/// thousand row updates in one savepoint, never a thousand jobs.
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
        } => {
            let settled = handshake == HandshakeOwed::Settled;
            conn.prepare_cached(
                "UPDATE subscription SET delivered_through = max(delivered_through, ?),
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

pub(super) fn prune_events(conn: &Connection, before: &StoredInstant) -> Result<u64> {
    let pruned = conn
        .prepare_cached(hub_sql::PRUNE_EVENTS)?
        .execute([before])?;
    Ok(pruned as u64)
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

pub(super) async fn subscription_events(
    reads: &SqlitePool,
    id: &SubscriptionId,
    from: EventNumber,
    to: EventNumber,
) -> Result<Vec<EventRecord>> {
    let rows = sqlx::query(hub_sql::SUBSCRIPTION_EVENTS)
        .bind(id)
        .bind(from)
        .bind(to)
        .fetch_all(reads)
        .await?;
    rows.iter().map(event_from_row).collect()
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
