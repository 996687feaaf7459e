//! SQLite statements for the event log, the delivery state, subscription searches and due
//! dates (a subscription's own writes are in `subscriptions`). The write functions run
//! inside the writer's transaction; the read functions use the read pool.
//!
//! The statements both dialects share are `store::hub_sql`'s. What stays here per dialect
//! is how they run: on the writer's connection or the read pool, with SQLite's `?` where a
//! statement is built, and the statements SQLite alone has (`record_matches` numbers matches
//! one at a time, where PostgreSQL numbers a batch in one statement).

use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{AssertSqlSafe, Row};

use crate::error::Result;
use crate::fhir::ids::{ChangeSeq, EventNumber, StoredInstant, SubscriptionId, TaskId, Version};
use crate::store::hub_sql;
use crate::store::rows::{event_from_row, subscription_from_row};
use crate::store::search_sql::Placeholder;
use crate::store::{
    DeliveryReport, EventRecord, HandshakeOwed, MatchRow, StoredSubscription, SubscriptionQuery,
};

pub(super) async fn record_matches(
    conn: &mut SqliteConnection,
    consumer: &str,
    through_seq: ChangeSeq,
    matches: Vec<MatchRow>,
) -> Result<Vec<(SubscriptionId, EventNumber)>> {
    let mut numbered = Vec::with_capacity(matches.len());
    for m in matches {
        // The counter and the log row move together; a subscription deleted or turned off
        // since matching simply gets nothing.
        let number: Option<EventNumber> = sqlx::query_scalar(
            "UPDATE subscription SET events_since_start = events_since_start + 1
             WHERE id = ? AND status != 'off' RETURNING events_since_start",
        )
        .bind(&m.subscription_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(number) = number else { continue };
        sqlx::query(
            "INSERT INTO subscription_event (subscription_id, event_number, change_seq, task_id, version, interaction, occurred_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&m.subscription_id)
        .bind(number)
        .bind(m.change_seq)
        .bind(&m.task_id)
        .bind(m.version)
        .bind(m.interaction.as_str())
        .bind(&m.occurred_at)
        .execute(&mut *conn)
        .await?;
        numbered.push((m.subscription_id, number));
    }
    sqlx::query(
        "INSERT INTO outbox_cursor (consumer, seq) VALUES (?, ?)
         ON CONFLICT (consumer) DO UPDATE SET seq = max(seq, excluded.seq)",
    )
    .bind(consumer)
    .bind(through_seq)
    .execute(&mut *conn)
    .await?;
    Ok(numbered)
}

pub(super) async fn record_delivery(
    conn: &mut SqliteConnection,
    report: DeliveryReport,
) -> Result<()> {
    match report {
        DeliveryReport::Delivered {
            subscription_id,
            through,
            handshake,
            status,
            at,
        } => {
            sqlx::query(
                "UPDATE subscription SET delivered_through = max(delivered_through, ?),
                   handshake_pending = CASE WHEN ? THEN 0 ELSE handshake_pending END,
                   failures = 0, failing_since = NULL, next_attempt_at = NULL, last_error = NULL,
                   last_sent_at = ?,
                   -- Off stays off; a row that owes a handshake (the subscription was replaced
                   -- while this attempt was in flight) keeps its status until the handshake.
                   status = CASE WHEN status = 'off' THEN 'off'
                     WHEN handshake_pending = 1 AND NOT ? THEN status ELSE ? END
                 WHERE id = ?",
            )
            .bind(through)
            .bind(handshake == HandshakeOwed::Settled)
            .bind(&at)
            .bind(handshake == HandshakeOwed::Settled)
            .bind(status.as_str())
            .bind(&subscription_id)
            .execute(&mut *conn)
            .await?;
        }
        DeliveryReport::Failed {
            subscription_id,
            error,
            failures,
            failing_since,
            next_attempt_at,
            status,
        } => {
            sqlx::query(
                "UPDATE subscription SET failures = ?, failing_since = ?, next_attempt_at = ?,
                   last_error = ?, status = CASE WHEN status = 'off' THEN 'off' ELSE ? END
                 WHERE id = ?",
            )
            .bind(failures)
            .bind(&failing_since)
            .bind(&next_attempt_at)
            .bind(&error)
            .bind(status.as_str())
            .bind(&subscription_id)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

pub(super) async fn prune_events(
    conn: &mut SqliteConnection,
    before: &StoredInstant,
) -> Result<u64> {
    let done = sqlx::query(hub_sql::PRUNE_EVENTS)
        .bind(before)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected())
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
pub(super) async fn mark_overdue(
    conn: &mut SqliteConnection,
    task_id: &TaskId,
    due_at: &StoredInstant,
    now: &StoredInstant,
) -> Result<bool> {
    let version: Option<Version> = sqlx::query_scalar(AssertSqlSafe(hub_sql::overdue_version("")))
        .bind(due_at)
        .bind(task_id)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(version) = version else {
        return Ok(false);
    };
    let marked = sqlx::query(hub_sql::MARK_OVERDUE)
        .bind(task_id)
        .bind(due_at)
        .execute(&mut *conn)
        .await?;
    if marked.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(hub_sql::OVERDUE_EVENT)
        .bind(task_id)
        .bind(version)
        .bind(now)
        .execute(&mut *conn)
        .await?;
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
