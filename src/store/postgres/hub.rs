//! PostgreSQL statements for subscription reads, the event log, the delivery state, due
//! dates, and the tables that let several nodes share the work: the matcher's lease,
//! delivery claims and the subscription changes since a generation (a subscription's own
//! writes, which take the generations, are in `subscriptions`). Functions taking a
//! connection run inside the caller's transaction; those taking the pool are one statement
//! or their own read transaction.
//!
//! The statements both dialects share are `store::hub_sql`'s. What stays here per dialect
//! is how they run (on the pool or in a transaction, text bound through `pg_text`) and the
//! statements PostgreSQL alone has: leases, claims, generations, row locks, and
//! `record_matches` numbering a chunk of matches in one statement over `unnest`ed arrays.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{AssertSqlSafe, Row};

use super::pg_text;
use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, EventNumber, StoredInstant, SubscriptionId, TaskId, Version};
use crate::store::hub_sql;
use crate::store::rows::{event_from_row, subscription_from_row};
use crate::store::search_sql::Placeholder;
use crate::store::{
    ChangeProgress, DeliveryReport, EventRecord, HandshakeOwed, MatchBatch, MatchRow,
    StoredSubscription, SubscriptionChanges, SubscriptionGauges, SubscriptionQuery,
};

/// A ttl as a bind value: whole microseconds, PostgreSQL's interval resolution.
fn micros(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX)
}

pub(super) async fn read_subscription(
    pool: &PgPool,
    id: &SubscriptionId,
) -> Result<Option<StoredSubscription>> {
    let row = sqlx::query("SELECT * FROM subscription WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(subscription_from_row).transpose()
}

/// Moves a live subscription's delivery position back to just before `from` and counts the
/// restart (see `Store::restart_delivery`); None if it is gone or `off`.
pub(super) async fn restart_delivery(
    pool: &PgPool,
    id: &SubscriptionId,
    from: EventNumber,
) -> Result<Option<StoredSubscription>> {
    let row = sqlx::query(
        "UPDATE subscription SET delivered_through = least(delivered_through, $2),
           rewinds = rewinds + 1
         WHERE id = $1 AND status <> 'off'
         RETURNING *",
    )
    .bind(id)
    .bind(from.get() - 1)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(subscription_from_row).transpose()
}

/// Records a chunk of matches in three statements, whatever its size. The first checks the
/// lease (locking its row until commit, so a node taking the lease over waits and this chunk
/// is recorded by the holder it names or not at all) and reads the progress inside a change
/// that the chunk must continue from; the second marks the changes the chunk completes
/// matched and moves the cursor and the progress; the third (`number_matches`) numbers and
/// logs the matches. Only the lease holder gets this far, and it holds the lease row, so no
/// two transactions lock several subscriptions at once.
pub(super) async fn record_matches(
    conn: &mut PgConnection,
    batch: MatchBatch,
) -> Result<Vec<(SubscriptionId, EventNumber)>> {
    let mut changes = batch.changes.clone();
    changes.sort_unstable();
    changes.dedup();
    let (held, partial_seq, partial_through): (bool, Option<ChangeSeq>, Option<SubscriptionId>) =
        sqlx::query_as(
            "WITH held AS (
               SELECT 1 FROM lease WHERE name = $1 AND holder = $2 AND expires_at > now() FOR UPDATE
             )
             SELECT EXISTS (SELECT 1 FROM held),
                    (SELECT partial_seq FROM outbox_cursor WHERE consumer = $1),
                    (SELECT partial_through FROM outbox_cursor WHERE consumer = $1)",
        )
        .bind(&batch.consumer)
        .bind(&batch.holder)
        .fetch_one(&mut *conn)
        .await?;
    if !held {
        return Err(Error::conflict(format!(
            "the {} lease was lost by {}: another node may be matching, so this batch was not \
             recorded; take the lease again and re-read the outbox",
            batch.consumer, batch.holder
        )));
    }
    let recorded = progress_from(partial_seq, partial_through);
    if recorded != batch.resumed {
        return Err(Error::conflict(format!(
            "the {} recorded progress {recorded:?} inside a change, but this chunk continues \
             from {:?}; nothing of it was recorded",
            batch.consumer, batch.resumed
        )));
    }
    let marked: i64 = sqlx::query_scalar(
        "WITH marked AS (
           UPDATE change_event SET matched = true WHERE seq = ANY($2) AND NOT matched
           RETURNING seq
         ), cursor AS (
           INSERT INTO outbox_cursor (consumer, seq, partial_seq, partial_through)
           SELECT $1, coalesce(max(seq), 0), $3, $4 FROM marked
           ON CONFLICT (consumer) DO UPDATE SET seq = greatest(outbox_cursor.seq, excluded.seq),
             partial_seq = excluded.partial_seq, partial_through = excluded.partial_through
         )
         SELECT count(*) FROM marked",
    )
    .bind(&batch.consumer)
    .bind(&changes)
    .bind(batch.progress.as_ref().map(|p| p.seq))
    .bind(batch.progress.as_ref().map(|p| p.through.as_str()))
    .fetch_one(&mut *conn)
    .await?;
    if marked != changes.len() as i64 {
        return Err(Error::conflict(format!(
            "{} of the batch's {} changes were already recorded (or do not exist), so another \
             node consumed them; nothing of this batch was recorded",
            changes.len() as i64 - marked,
            changes.len()
        )));
    }
    number_matches(conn, batch.matches).await
}

fn progress_from(
    seq: Option<ChangeSeq>,
    through: Option<SubscriptionId>,
) -> Option<ChangeProgress> {
    Some(ChangeProgress {
        seq: seq?,
        through: through?,
    })
}

/// The progress inside a change that `record_matches` last left for `consumer`.
pub(super) async fn match_progress(
    pool: &PgPool,
    consumer: &str,
) -> Result<Option<ChangeProgress>> {
    let row: Option<(Option<ChangeSeq>, Option<SubscriptionId>)> = sqlx::query_as(
        "SELECT partial_seq, partial_through FROM outbox_cursor WHERE consumer = $1",
    )
    .bind(consumer)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(seq, through)| progress_from(seq, through)))
}

/// Moves each matched subscription's counter once, by its number of matches, and logs the
/// chunk's runs (`hub_sql::plan_runs`) under the numbers that frees, in one statement. A
/// subscription deleted or turned off since matching gets nothing.
async fn number_matches(
    conn: &mut PgConnection,
    matches: Vec<MatchRow>,
) -> Result<Vec<(SubscriptionId, EventNumber)>> {
    if matches.is_empty() {
        return Ok(Vec::new());
    }
    let plan = hub_sql::plan_runs(&matches);
    let count_ids: Vec<&str> = plan.counts.iter().map(|(id, _)| id.as_str()).collect();
    let counts: Vec<i64> = plan.counts.iter().map(|(_, n)| *n).collect();
    let run_ids: Vec<&str> = plan
        .runs
        .iter()
        .map(|r| plan.counts[r.subscription].0.as_str())
        .collect();
    let offsets: Vec<i64> = plan.runs.iter().map(|r| r.offset).collect();
    let seqs: Vec<ChangeSeq> = plan.runs.iter().map(|r| r.change_seq).collect();
    let lengths: Vec<i64> = plan.runs.iter().map(|r| r.events).collect();
    let rows = sqlx::query(AssertSqlSafe(format!(
        "WITH w AS (
           SELECT * FROM unnest($1::text[], $2::bigint[]) AS w(subscription_id, n)
         ), bumped AS (
           UPDATE subscription s SET events_since_start = s.events_since_start + w.n
           FROM w WHERE s.id = w.subscription_id AND s.status <> 'off'
           RETURNING s.id, s.events_since_start - w.n AS before
         ), r AS (
           SELECT * FROM unnest($3::text[], $4::bigint[], $5::bigint[], $6::bigint[])
             AS r(subscription_id, start, change_seq, events)
         ), logged AS (
           INSERT INTO subscription_event (subscription_id, event_number, change_seq, events, occurred_at)
           SELECT r.subscription_id, b.before + r.start + 1, r.change_seq, r.events, {}
           FROM r JOIN bumped b ON b.id = r.subscription_id
         )
         SELECT id, before FROM bumped",
        hub_sql::RUN_OCCURRED_AT
    )))
    .bind(&count_ids)
    .bind(&counts)
    .bind(&run_ids)
    .bind(&offsets)
    .bind(&seqs)
    .bind(&lengths)
    .fetch_all(&mut *conn)
    .await?;
    let before: HashMap<SubscriptionId, i64> = rows
        .iter()
        .map(|row| Ok((row.try_get("id")?, row.try_get("before")?)))
        .collect::<Result<_>>()?;
    Ok(hub_sql::number_matches(matches, &before))
}

/// Records the results of many attempts in one transaction, one statement per kind of result
/// (`unnest` of the reports' columns), with the attempts' AuditEvents (one more statement);
/// each claim ends only if `holder` still has it (a node
/// whose claim expired and was taken over must not end the new holder's). One `UPDATE … FROM`
/// may change a row only once, so a subscription reported twice (two attempts whose results
/// gathered in one batch) is recorded in rounds, the k-th report of each subscription in the
/// k-th; rows are updated in id order, so two nodes never lock the same rows in opposite
/// orders.
pub(super) async fn record_deliveries(
    pool: &PgPool,
    holder: &str,
    reports: Vec<DeliveryReport>,
    attempts: Vec<crate::audit::AuditRecord>,
) -> Result<()> {
    if reports.is_empty() && attempts.is_empty() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    if !attempts.is_empty() {
        super::insert_audits(&mut tx, attempts).await?;
    }
    for round in rounds(reports) {
        let mut delivered = DeliveredColumns::default();
        let mut failed = FailedColumns::default();
        for report in &round {
            match report {
                DeliveryReport::Delivered {
                    subscription_id,
                    through,
                    handshake,
                    status,
                    at,
                    rewinds,
                } => {
                    delivered.ids.push(subscription_id.as_str());
                    delivered.rewinds.push(*rewinds);
                    delivered.through.push(through.get());
                    delivered.settled.push(*handshake == HandshakeOwed::Settled);
                    delivered.status.push(status.as_str());
                    delivered.at.push(at.as_str());
                }
                DeliveryReport::Failed {
                    subscription_id,
                    error,
                    failures,
                    failing_since,
                    next_attempt_at,
                    status,
                } => {
                    failed.ids.push(subscription_id.as_str());
                    failed.failures.push(*failures);
                    failed.failing_since.push(failing_since.as_str());
                    failed
                        .next_attempt_at
                        .push(next_attempt_at.as_ref().map(StoredInstant::as_str));
                    failed.errors.push(pg_text(error).into_owned());
                    failed.status.push(status.as_str());
                }
            }
        }
        if !delivered.ids.is_empty() {
            sqlx::query(
                "UPDATE subscription s SET delivered_through = CASE WHEN s.rewinds = r.rewinds
                     THEN greatest(s.delivered_through, r.through) ELSE s.delivered_through END,
                   handshake_pending = CASE WHEN r.settled THEN 0 ELSE s.handshake_pending END,
                   failures = 0, failing_since = NULL, next_attempt_at = NULL, last_error = NULL,
                   last_sent_at = r.at,
                   -- Off stays off; a row that owes a handshake (the subscription was replaced
                   -- while this attempt was in flight) keeps its status until the handshake.
                   status = CASE WHEN s.status = 'off' THEN 'off'
                     WHEN s.handshake_pending = 1 AND NOT r.settled THEN s.status ELSE r.status END,
                   lease_holder = CASE WHEN s.lease_holder = $1 THEN NULL ELSE s.lease_holder END,
                   lease_until = CASE WHEN s.lease_holder = $1 THEN NULL ELSE s.lease_until END
                 FROM unnest($2::text[], $3::bigint[], $4::bool[], $5::text[], $6::text[], $7::bigint[])
                   AS r(id, through, settled, status, at, rewinds)
                 WHERE s.id = r.id",
            )
            .bind(holder)
            .bind(&delivered.ids)
            .bind(&delivered.through)
            .bind(&delivered.settled)
            .bind(&delivered.status)
            .bind(&delivered.at)
            .bind(&delivered.rewinds)
            .execute(&mut *tx)
            .await?;
        }
        if !failed.ids.is_empty() {
            sqlx::query(
                "UPDATE subscription s SET failures = r.failures, failing_since = r.failing_since,
                   next_attempt_at = r.next_attempt_at, last_error = r.error,
                   status = CASE WHEN s.status = 'off' THEN 'off' ELSE r.status END,
                   lease_holder = CASE WHEN s.lease_holder = $1 THEN NULL ELSE s.lease_holder END,
                   lease_until = CASE WHEN s.lease_holder = $1 THEN NULL ELSE s.lease_until END
                 FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[])
                   AS r(id, failures, failing_since, next_attempt_at, error, status)
                 WHERE s.id = r.id",
            )
            .bind(holder)
            .bind(&failed.ids)
            .bind(&failed.failures)
            .bind(&failed.failing_since)
            .bind(&failed.next_attempt_at)
            .bind(&failed.errors)
            .bind(&failed.status)
            .execute(&mut *tx)
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The reports split so that no subscription appears twice in a round, the k-th report of
/// each subscription in round k (so each subscription's reports keep their order), each round
/// in subscription id order.
fn rounds(reports: Vec<DeliveryReport>) -> Vec<Vec<DeliveryReport>> {
    let mut seen: std::collections::HashMap<SubscriptionId, usize> =
        std::collections::HashMap::new();
    let mut rounds: Vec<Vec<DeliveryReport>> = Vec::new();
    for report in reports {
        let round = seen.entry(report.subscription_id().clone()).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(report);
        *round += 1;
    }
    for round in &mut rounds {
        round.sort_by(|a, b| a.subscription_id().cmp(b.subscription_id()));
    }
    rounds
}

#[derive(Default)]
struct DeliveredColumns<'a> {
    ids: Vec<&'a str>,
    through: Vec<i64>,
    settled: Vec<bool>,
    status: Vec<&'static str>,
    at: Vec<&'a str>,
    rewinds: Vec<i64>,
}

#[derive(Default)]
struct FailedColumns<'a> {
    ids: Vec<&'a str>,
    failures: Vec<i64>,
    failing_since: Vec<&'a str>,
    next_attempt_at: Vec<Option<&'a str>>,
    errors: Vec<String>,
    status: Vec<&'static str>,
}

pub(super) async fn prune_events(pool: &PgPool, before: &StoredInstant) -> Result<u64> {
    let done = sqlx::query(hub_sql::PRUNE_EVENTS)
        .bind(before)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}

pub(super) async fn subscription_gauges(
    pool: &PgPool,
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
    pool: &PgPool,
    query: &SubscriptionQuery,
    count: usize,
    offset: usize,
) -> Result<(Vec<StoredSubscription>, u64)> {
    let search = hub_sql::subscription_search(query, Placeholder::Dollar);
    let mut total = sqlx::query_scalar::<_, i64>(AssertSqlSafe(search.count));
    for bind in &search.binds {
        total = total.bind(pg_text(bind));
    }
    let total = total.fetch_one(pool).await?;
    let mut rows = sqlx::query(AssertSqlSafe(search.page));
    for bind in &search.binds {
        rows = rows.bind(pg_text(bind));
    }
    let rows = rows
        .bind(count as i64)
        .bind(offset as i64)
        .fetch_all(pool)
        .await?;
    let found = rows
        .iter()
        .map(subscription_from_row)
        .collect::<Result<_>>()?;
    Ok((found, total as u64))
}

pub(super) async fn subscription_events(
    pool: &PgPool,
    id: &SubscriptionId,
    from: EventNumber,
    to: EventNumber,
) -> Result<Vec<EventRecord>> {
    let rows = sqlx::query(hub_sql::SUBSCRIPTION_EVENTS)
        .bind(id)
        .bind(from)
        .bind(to)
        .fetch_all(pool)
        .await?;
    rows.iter().map(event_from_row).collect()
}

pub(super) async fn acquire_lease(
    pool: &PgPool,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<bool> {
    // Inserted, renewed by its holder, or taken over once expired; otherwise the conflict's
    // WHERE is false and no row comes back. The clock is the database's, shared by all nodes.
    let held: Option<String> = sqlx::query_scalar(
        "INSERT INTO lease (name, holder, expires_at)
         VALUES ($1, $2, now() + $3 * interval '1 microsecond')
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
           WHERE lease.holder = excluded.holder OR lease.expires_at < now()
         RETURNING holder",
    )
    .bind(name)
    .bind(holder)
    .bind(micros(ttl))
    .fetch_optional(pool)
    .await?;
    Ok(held.as_deref() == Some(holder))
}

pub(super) async fn release_lease(pool: &PgPool, name: &str, holder: &str) -> Result<()> {
    sqlx::query("DELETE FROM lease WHERE name = $1 AND holder = $2")
        .bind(name)
        .bind(holder)
        .execute(pool)
        .await?;
    Ok(())
}

/// The holders of the unexpired leases named `prefix…`, by the database's clock.
pub(super) async fn lease_holders(pool: &PgPool, prefix: &str) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT DISTINCT holder FROM lease
         WHERE starts_with(name, $1) AND expires_at > now() ORDER BY holder",
    )
    .bind(prefix)
    .fetch_all(pool)
    .await?)
}

pub(super) async fn claim_subscription(
    pool: &PgPool,
    id: &SubscriptionId,
    holder: &str,
    ttl: Duration,
) -> Result<Option<StoredSubscription>> {
    let row = sqlx::query(
        "UPDATE subscription SET lease_holder = $2, lease_until = now() + $3 * interval '1 microsecond'
         WHERE id = $1 AND (lease_holder IS NULL OR lease_holder = $2 OR lease_until < now())
         RETURNING *",
    )
    .bind(id)
    .bind(holder)
    .bind(micros(ttl))
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(subscription_from_row).transpose()
}

pub(super) async fn release_subscription(
    pool: &PgPool,
    id: &SubscriptionId,
    holder: &str,
) -> Result<()> {
    sqlx::query(
        "UPDATE subscription SET lease_holder = NULL, lease_until = NULL
         WHERE id = $1 AND lease_holder = $2",
    )
    .bind(id)
    .bind(holder)
    .execute(pool)
    .await?;
    Ok(())
}

/// Work waiting that no node has claimed, or whose claim expired.
pub(super) async fn due_subscriptions(
    pool: &PgPool,
    stale_before: &StoredInstant,
    limit: usize,
) -> Result<Vec<SubscriptionId>> {
    let sql = format!(
        "SELECT s.id FROM subscription s
         WHERE {} AND (s.lease_holder IS NULL OR s.lease_until < now())
         ORDER BY s.id LIMIT $2",
        hub_sql::WORK_WAITING
    );
    Ok(sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(stale_before)
        .bind(limit as i64)
        .fetch_all(pool)
        .await?)
}

pub(super) async fn subscription_generation(pool: &PgPool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT generation FROM subscription_generation")
            .fetch_one(pool)
            .await?,
    )
}

pub(super) async fn subscription_changes_since(
    pool: &PgPool,
    generation: i64,
) -> Result<SubscriptionChanges> {
    // One snapshot for the three reads, so that the generation returned covers exactly the
    // rows returned.
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let current: i64 = sqlx::query_scalar("SELECT generation FROM subscription_generation")
        .fetch_one(&mut *tx)
        .await?;
    let rows = sqlx::query("SELECT * FROM subscription WHERE generation > $1 ORDER BY generation")
        .bind(generation)
        .fetch_all(&mut *tx)
        .await?;
    let deleted: Vec<SubscriptionId> = sqlx::query_scalar(
        "SELECT id FROM subscription_tombstone WHERE generation > $1 ORDER BY generation",
    )
    .bind(generation)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(SubscriptionChanges {
        generation: current,
        changed: rows
            .iter()
            .map(subscription_from_row)
            .collect::<Result<_>>()?,
        deleted,
    })
}

pub(super) async fn overdue_tasks(
    pool: &PgPool,
    now: &StoredInstant,
    limit: usize,
) -> Result<Vec<(TaskId, StoredInstant)>> {
    let rows = sqlx::query(AssertSqlSafe(hub_sql::overdue_tasks()))
        .bind(now)
        .bind(limit as i64)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get("task_id")?, r.try_get("end_at")?)))
        .collect()
}

/// The Task row is share-locked by the check, so it cannot change before this commits, and
/// the event names its current version. Nodes racing to report the same due date wait on
/// the marker's key; the first to commit reports it, the others insert nothing.
pub(super) async fn mark_overdue(
    conn: &mut PgConnection,
    task_id: &TaskId,
    due_at: &StoredInstant,
    now: &StoredInstant,
) -> Result<bool> {
    let sql = hub_sql::overdue_version("FOR SHARE OF t");
    let version: Option<Version> = sqlx::query_scalar(AssertSqlSafe(sql))
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

pub(super) async fn next_due(pool: &PgPool, now: &StoredInstant) -> Result<Option<StoredInstant>> {
    Ok(sqlx::query_scalar(hub_sql::NEXT_DUE)
        .bind(now)
        .fetch_one(pool)
        .await?)
}
