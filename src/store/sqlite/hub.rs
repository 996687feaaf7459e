//! SQLite statements for the event log, the delivery state, subscription searches and due
//! dates (a subscription's own writes are in `subscriptions`). The write functions run
//! inside the writer's transaction; the read functions use the read pool.

use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{AssertSqlSafe, Row};

use crate::error::Result;
use crate::store::owner_columns;
use crate::store::rows::{event_from_row, subscription_from_row};
use crate::store::{DeliveryReport, EventRecord, MatchRow, StoredSubscription, SubscriptionQuery};

pub(super) async fn record_matches(
    conn: &mut SqliteConnection,
    consumer: &str,
    through_seq: i64,
    matches: Vec<MatchRow>,
) -> Result<Vec<(String, i64)>> {
    let mut numbered = Vec::with_capacity(matches.len());
    for m in matches {
        // The counter and the log row move together; a subscription deleted or turned off
        // since matching simply gets nothing.
        let number: Option<i64> = sqlx::query_scalar(
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
            at,
        } => {
            sqlx::query(
                "UPDATE subscription SET delivered_through = max(delivered_through, ?),
                   handshake_pending = CASE WHEN ? THEN 0 ELSE handshake_pending END,
                   failures = 0, failing_since = NULL, next_attempt_at = NULL, last_error = NULL,
                   last_sent_at = ?,
                   status = CASE WHEN status = 'error' OR (status = 'requested' AND ?) THEN 'active' ELSE status END
                 WHERE id = ?",
            )
            .bind(through)
            .bind(handshake)
            .bind(&at)
            .bind(handshake)
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

pub(super) async fn prune_events(conn: &mut SqliteConnection, before: &str) -> Result<u64> {
    // Undelivered events are kept whatever their age: the queue must never lose them.
    let done = sqlx::query(
        "DELETE FROM subscription_event WHERE occurred_at < ? AND event_number <=
           (SELECT s.delivered_through FROM subscription s WHERE s.id = subscription_event.subscription_id)",
    )
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
    let mut conditions = vec!["1 = 1".to_string()];
    let mut binds: Vec<String> = Vec::new();
    if let Some(author) = &query.author {
        conditions.push(
            "author_subject = ? AND author_role = ? AND author_fhir_user = ? AND author_issuer = ?"
                .into(),
        );
        let [issuer, subject, role, fhir_user] = owner_columns(author);
        binds.extend([subject, role, fhir_user, issuer].map(str::to_string));
    }
    if let Some(statuses) = &query.status {
        conditions.push(format!(
            "status IN ({})",
            vec!["?"; statuses.len()].join(", ")
        ));
        binds.extend(statuses.iter().cloned());
    }
    if let Some(endpoint) = &query.endpoint {
        conditions.push("endpoint = ?".into());
        binds.push(endpoint.clone());
    }
    if let Some(ids) = &query.ids {
        conditions.push(format!(
            "id IN ({})",
            vec!["?"; ids.len().max(1)].join(", ")
        ));
        if ids.is_empty() {
            binds.push(String::new());
        }
        binds.extend(ids.iter().cloned());
    }
    let filter = conditions.join(" AND ");
    let count_sql = format!("SELECT count(*) FROM subscription WHERE {filter}");
    let mut total = sqlx::query_scalar::<_, i64>(AssertSqlSafe(count_sql));
    for b in &binds {
        total = total.bind(b);
    }
    let total = total.fetch_one(reads).await?;
    let sql = format!(
        "SELECT * FROM subscription WHERE {filter} ORDER BY last_updated, id LIMIT ? OFFSET ?"
    );
    let mut rows = sqlx::query(AssertSqlSafe(sql));
    for b in &binds {
        rows = rows.bind(b);
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
    id: &str,
    from: i64,
    to: i64,
) -> Result<Vec<EventRecord>> {
    let rows = sqlx::query(
        "SELECT event_number, change_seq, task_id, version, interaction, occurred_at
         FROM subscription_event WHERE subscription_id = ? AND event_number BETWEEN ? AND ?
         ORDER BY event_number",
    )
    .bind(id)
    .bind(from)
    .bind(to)
    .fetch_all(reads)
    .await?;
    rows.iter().map(event_from_row).collect()
}

/// The terminal statuses, as bound SQL values: an overdue Task is one still open.
const TERMINAL: &str = "'completed', 'cancelled', 'failed', 'rejected', 'entered-in-error'";

pub(super) async fn overdue_tasks(
    reads: &SqlitePool,
    now: &str,
    limit: usize,
) -> Result<Vec<(String, String)>> {
    let sql = format!(
        "SELECT d.task_id, d.end_at FROM task_date d JOIN task t ON t.id = d.task_id
         WHERE d.param = 'due-date' AND d.end_at <= ? AND t.deleted = 0
           AND t.id NOT IN (SELECT task_id FROM task_token WHERE param = 'status' AND value IN ({TERMINAL}))
           AND NOT EXISTS (SELECT 1 FROM task_overdue o WHERE o.task_id = d.task_id AND o.due_at = d.end_at)
         ORDER BY d.end_at LIMIT ?"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(now)
        .bind(limit as i64)
        .fetch_all(reads)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("task_id")?, r.try_get("end_at")?)))
        .collect()
}

pub(super) async fn mark_overdue(
    conn: &mut SqliteConnection,
    task_id: &str,
    due_at: &str,
    now: &str,
) -> Result<bool> {
    // Checked again inside the transaction: the Task may have been completed or given a new
    // due date since it was found.
    let sql = format!(
        "SELECT t.version FROM task t JOIN task_date d ON d.task_id = t.id AND d.param = 'due-date' AND d.end_at = ?
         WHERE t.id = ? AND t.deleted = 0 AND d.end_at <= ?
           AND t.id NOT IN (SELECT task_id FROM task_token WHERE param = 'status' AND value IN ({TERMINAL}))"
    );
    let version: Option<i64> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(due_at)
        .bind(task_id)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(version) = version else {
        return Ok(false);
    };
    let marked = sqlx::query("INSERT OR IGNORE INTO task_overdue (task_id, due_at) VALUES (?, ?)")
        .bind(task_id)
        .bind(due_at)
        .execute(&mut *conn)
        .await?;
    if marked.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at)
         VALUES ('Task', ?, ?, NULL, 'overdue', ?)",
    )
    .bind(task_id)
    .bind(version)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

pub(super) async fn due_subscriptions(
    reads: &SqlitePool,
    stale_before: &str,
    limit: usize,
) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT s.id FROM subscription s
         WHERE s.status != 'off'
           AND ((s.handshake_pending != 0 AND s.last_updated <= ?1)
             OR (s.delivered_through < s.events_since_start
                 AND coalesce(s.next_attempt_at,
                       (SELECT e.occurred_at FROM subscription_event e
                        WHERE e.subscription_id = s.id
                          AND e.event_number = s.delivered_through + 1)) <= ?1))
         ORDER BY s.id LIMIT ?2",
    )
    .bind(stale_before)
    .bind(limit as i64)
    .fetch_all(reads)
    .await?)
}

pub(super) async fn next_due(reads: &SqlitePool, now: &str) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT min(end_at) FROM task_date WHERE param = 'due-date' AND end_at > ?",
    )
    .bind(now)
    .fetch_one(reads)
    .await?)
}
