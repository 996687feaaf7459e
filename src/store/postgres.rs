//! The shared store for a cluster: PostgreSQL.
//!
//! Every write is one transaction on a connection from the pool; PostgreSQL, not a single
//! writer, settles concurrency. A change locks the Task it replaces (`SELECT … FOR UPDATE`,
//! and the focal Task of a request being completed), so decisions still see the version they
//! replace; conditional creates take one advisory lock so that two cannot both create. What
//! still collides (a unique key, a deadlock) answers 409 "retry" instead of a 500: the
//! decision closures run once, so the store does not retry them itself.
//!
//! Round trips are most of a write's cost, so a Task version (task row, history, search
//! index, change event) is written by one statement of data-modifying CTEs, with the index
//! rows as arrays; a plain create, being that one statement, runs without BEGIN and COMMIT.
//! These statements are in `tasks`, run under the rules of `store::write`.
//!
//! Outbox `seq` values are taken in one order and committed in another, so the outbox is
//! consumed by marking rows `matched` (see `hub::record_matches`), not by a position. The
//! work-sharing tables (the matcher's lease, delivery claims, the subscription generation)
//! live in `hub`; a subscription write runs under the rules of `store::subscriptions` over
//! the statements in `subscriptions`, which take the generation.
//!
//! The reads build their search statements with `search_sql` and read rows with `rows`, as
//! SQLite's do; what stays per dialect is the `$n` placeholder, the pool, text bound through
//! `pg_text`, and `unnest` for the version keys of `versions`.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
// Every dynamic statement here is assembled from fixed fragments; values are always bound.
use sqlx::{AssertSqlSafe, Postgres, Transaction};
use tokio::sync::Notify;

use super::hub_sql;
use super::pressure::{Pressure, WriteKind};
use super::rows::history_from_row;
use super::rows::read_sort_values;
use super::rows::{
    change_from_row, current_from_row, listed_from_row, live_from_row, version_from_row,
};
use super::search_sql::{
    PageSpec, Placeholder, children_sql, history_sql, page_sql, sort_value_count,
};
use super::write::{self, Attempt, Found, Precheck, Prepared, TaskWrite};
use super::{
    ChangeEvent, CurrentTask, DeliveryReport, EventRecord, HistoryRequest, HistoryVersion,
    LiveSubscription, MatchBatch, MatchingFormRow, PageRequest, PendingDelivery, SearchPage, Store,
    StoredSubscription, StoredVersion, SubscriptionChanges, SubscriptionDecide, SubscriptionQuery,
    SubscriptionRecord, WriteOutcome, WriteRequest, collect_page,
};
use super::{ChangeProgress, SubscriptionGauges};
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, EventNumber, StoredInstant, SubscriptionId, TaskId, Version};
use crate::fhir::search::Predicate;

mod groups;
mod hub;
mod recent;
mod subscriptions;
mod tasks;
#[cfg(test)]
mod tests;

pub struct PostgresStore {
    pool: PgPool,
    /// The connections of the group writers (`groups`), apart from the serving pool.
    group_pool: PgPool,
    groups: groups::PutGroups,
    /// The Task versions this node wrote last: a change of one is decided without reading it
    /// first (`recent`, `store.postgres_recent_tasks`).
    recent: recent::RecentTasks,
    base_url: String,
    committed: Arc<Notify>,
    /// The client writes in flight on this node and the fan-out lag they are admitted
    /// against.
    pressure: Pressure,
}

impl PostgresStore {
    /// Connects (pool of `config.postgres_connections`), runs the migrations (sqlx's migrator
    /// takes a PostgreSQL advisory lock, so nodes starting together are safe), and returns the
    /// store. `committed` is notified (notify_one) after every commit that wrote change events
    /// (Task writes, deletes, overdue events).
    pub async fn open(
        url: &str,
        base_url: &str,
        config: &StoreConfig,
        committed: Arc<Notify>,
    ) -> Result<PostgresStore> {
        let options = PgConnectOptions::from_str(url)?.application_name("baton");
        // Migrations may rightly run long (an index over a large table); they run on a
        // connection of their own, without the statement timeout the serving pool has.
        let migrations = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("migrations/postgres")
            .run(&migrations)
            .await?;
        migrations.close().await;
        // A statement that runs past the timeout is cancelled by the server itself, so a
        // query whose client has gone (or that outgrew every cap) cannot run on for minutes.
        let options = options.options([(
            "statement_timeout",
            format!("{}s", config.statement_timeout_seconds),
        )]);
        let pool = PgPoolOptions::new()
            .max_connections(config.postgres_connections)
            .min_connections(1)
            // A request waits this long for a free connection, then fails rather than queueing
            // without bound behind a saturated pool.
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        // The group statement's arrays change length with every group; a custom plan, made
        // for each execution by default while it looks cheaper, would plan it every time
        // (BENCHMARKS.md: h/pg2's planning trap). Its generic plan does as well for any size.
        let group_pool = PgPoolOptions::new()
            .max_connections(config.postgres_group_writers)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.options([("plan_cache_mode", "force_generic_plan")]))
            .await?;
        Ok(PostgresStore {
            groups: groups::PutGroups::start(
                group_pool.clone(),
                config.postgres_group_writers,
                config.max_batch,
            ),
            group_pool,
            pool,
            recent: recent::RecentTasks::new(config.postgres_recent_tasks),
            base_url: base_url.to_string(),
            committed,
            pressure: Pressure::new(config.max_queue, config.max_fanout_lag),
        })
    }

    /// Wakes the outbox consumer: a commit wrote change events.
    fn wrote_changes(&self) {
        self.committed.notify_one();
    }
}

/// Commits the transaction when the work succeeded, rolls it back otherwise.
async fn finish<T>(tx: Transaction<'_, Postgres>, result: Result<T>) -> Result<T> {
    match result {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(e) => {
            // Dropping the transaction would roll it back too, but only once the connection is
            // next used; saying so returns a clean connection to the pool now.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// Turns the database errors that mean "a concurrent transaction got there first" — a unique
/// violation, a serialization failure, a deadlock — into a 409 the client can retry, instead
/// of an opaque 500. `what` names what changed, e.g. "the Task".
fn concurrent(e: Error, what: &str) -> Error {
    let collided = match &e {
        Error::Internal { source, .. } => match source.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("23505" | "40001" | "40P01"))
            }
            _ => false,
        },
        Error::Client(_) => false,
    };
    if collided {
        Error::conflict(format!(
            "{what} changed concurrently with this request; retry the request"
        ))
    } else {
        e
    }
}

/// PostgreSQL text cannot hold U+0000, which JSON strings can (`\u0000`). Values that go into
/// text columns as they are — search index values, search values, error messages — carry the
/// replacement character instead, on the way in and in searches alike, so such a Task is
/// stored and found instead of failing with a 500. (Resources themselves are stored as JSON
/// text, where the character stays escaped.)
fn pg_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

async fn read_current<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    id: &TaskId,
) -> Result<Option<CurrentTask>> {
    let row = sqlx::query(
        "SELECT t.id, t.version, t.last_updated, t.deleted, t.resource FROM task t WHERE t.id = $1",
    )
    .bind(id)
    .fetch_optional(executor)
    .await?;
    row.as_ref().map(current_from_row).transpose()
}

impl Precheck for PostgresStore {
    type Seen = ();

    /// On the pool, outside any transaction and lock: a create that finds its Task is answered
    /// without writing, and a double match without waiting for the conditional-create lock.
    async fn precheck(&self, criteria: &[Predicate]) -> Result<(Found, ())> {
        let found = tasks::matching_tasks(&self.pool, criteria).await?;
        Ok((Found::among(found), ()))
    }

    fn base_url(&self) -> &str {
        &self.base_url
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn write(&self, request: WriteRequest) -> Result<WriteOutcome> {
        self.pressure.admit(WriteKind::Task)?;
        let _queued = self.pressure.enter();
        let write = match write::prepare(self, request).await? {
            Prepared::Answered(outcome) => return Ok(outcome),
            Prepared::Write(write) => write,
        };
        let started = Instant::now();
        // A write that is one statement is atomic on its own: it needs no transaction, and no
        // BEGIN and COMMIT round trips, and it is written with the others waiting beside it
        // (`groups`). A change is first tried as a read and one such statement that writes
        // only if the Task is still as read (as this node last wrote it, when it remembers:
        // `recent`, no read at all); what that cannot settle reads and locks before it
        // writes, in a transaction.
        let result = if write::is_single_put(&write) {
            let mut grouped = groups::Grouped::new(&self.pool, &self.groups, &self.recent);
            write::apply(&mut grouped, write, &self.base_url).await
        } else {
            let attempt = {
                let mut grouped = groups::Grouped::new(&self.pool, &self.groups, &self.recent);
                write::try_unlocked(&mut grouped, write, &self.base_url).await
            };
            match attempt {
                Ok(Attempt::Answered(outcome)) => Ok(outcome),
                Ok(Attempt::Locked(write)) => {
                    if let TaskWrite::Change { id, .. } = &write {
                        metrics::counter!("baton_store_locked_changes_total").increment(1);
                        // Written (or deleted) below, in a transaction that may yet roll back:
                        // the next change reads it.
                        self.recent.forget(id);
                    }
                    let mut tx = self.pool.begin().await?;
                    let result = write::apply(&mut *tx, write, &self.base_url).await;
                    finish(tx, result).await
                }
                Err(e) => Err(e),
            }
        };
        let outcome = result.map_err(|e| concurrent(e, "the Task"))?;
        metrics::histogram!("baton_store_commit_seconds").record(started.elapsed().as_secs_f64());
        if matches!(outcome, WriteOutcome::Written(_)) {
            self.wrote_changes();
        }
        Ok(outcome)
    }

    async fn transaction(&self, entries: Vec<(usize, WriteRequest)>) -> Result<Vec<WriteOutcome>> {
        self.pressure.admit(WriteKind::Task)?;
        let _queued = self.pressure.enter();
        let writes = write::prepare_transaction(self, entries).await?;
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let result = write::apply_transaction(&mut *tx, writes, &self.base_url).await;
        let outcomes = finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "a Task of this transaction"))?;
        // The versions a transaction wrote are not remembered: the next change reads them.
        for outcome in &outcomes {
            if let WriteOutcome::Written(version) = outcome {
                self.recent.forget(&version.id);
            }
        }
        metrics::histogram!("baton_store_commit_seconds").record(started.elapsed().as_secs_f64());
        if outcomes
            .iter()
            .any(|o| matches!(o, WriteOutcome::Written(_)))
        {
            self.wrote_changes();
        }
        Ok(outcomes)
    }

    async fn read(&self, id: &TaskId) -> Result<Option<CurrentTask>> {
        read_current(&self.pool, id).await
    }

    async fn read_version(&self, id: &TaskId, version: Version) -> Result<Option<StoredVersion>> {
        let row = sqlx::query(
            "SELECT id, version, last_updated, interaction, resource FROM task_version
             WHERE id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(version_from_row).transpose()
    }

    async fn history(
        &self,
        id: &TaskId,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredVersion>, u64)> {
        let rows = sqlx::query(
            "SELECT id, version, last_updated, interaction, resource FROM task_version
             WHERE id = $1 ORDER BY version DESC LIMIT $2 OFFSET $3",
        )
        .bind(id)
        .bind(count as i64)
        .bind(offset as i64)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM task_version WHERE id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        let versions = rows.iter().map(version_from_row).collect::<Result<_>>()?;
        Ok((versions, total as u64))
    }

    async fn task_history(&self, request: &HistoryRequest) -> Result<Vec<HistoryVersion>> {
        let (sql, binds) = history_sql(request, Placeholder::Dollar);
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for bind in binds {
            query = query.bind(bind);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(history_from_row).collect()
    }

    async fn search(&self, page: PageRequest<'_>) -> Result<SearchPage> {
        let sql = page_sql(
            PageSpec {
                predicates: page.predicates,
                sort: page.sort,
                after: page.after,
                counting: page.counting,
            },
            Placeholder::Dollar,
        )?;
        // The page first: when it holds the last match, its count is known without the
        // count statement (a patient's Tasks, a short queue), as on SQLite.
        let collected = if page.count == 0 {
            None
        } else {
            let mut query = sqlx::query(AssertSqlSafe(sql.rows));
            for bind in &sql.binds {
                query = query.bind(pg_text(bind));
            }
            let rows = query
                .bind(page.count as i64)
                .bind(page.offset as i64)
                .fetch(&self.pool);
            let sort_values = sort_value_count(page.sort);
            let read = |row: &sqlx::postgres::PgRow| {
                Ok((
                    listed_from_row(row)?,
                    Some(read_sort_values(row, sort_values)?),
                ))
            };
            Some(collect_page(rows, page.max_bytes, 1, read).await?)
        };
        let shown = collected
            .as_ref()
            .and_then(|c| c.total_shown(page.count, page.offset, page.after.is_some()));
        let total = match (sql.count, shown) {
            (Some(_), Some(shown)) => Some(shown),
            (Some(count), None) => {
                let mut query = sqlx::query_scalar::<_, i64>(AssertSqlSafe(count));
                for bind in &sql.count_binds {
                    query = query.bind(pg_text(bind));
                }
                Some(query.fetch_one(&self.pool).await? as u64)
            }
            (None, _) => None,
        };
        Ok(match collected {
            Some(collected) => collected.into_page(total),
            None => SearchPage::empty(total),
        })
    }

    async fn children_of(
        &self,
        parents: &[String],
        scope: &[Predicate],
        limit: usize,
        max_bytes: usize,
    ) -> Result<SearchPage> {
        if parents.is_empty() {
            return Ok(SearchPage::empty(None));
        }
        let sql = children_sql(parents, scope, Placeholder::Dollar);
        let mut query = sqlx::query(AssertSqlSafe(sql.sql));
        for bind in &sql.binds {
            query = query.bind(pg_text(bind));
        }
        let rows = query.bind(limit as i64).fetch(&self.pool);
        let collected = collect_page(rows, max_bytes, 0, |row| {
            listed_from_row(row).map(|task| (task, None))
        })
        .await?;
        Ok(collected.into_page(None))
    }

    async fn change_events_after(&self, _seq: ChangeSeq, limit: usize) -> Result<Vec<ChangeEvent>> {
        // Not after a position: a change with a lower `seq` may commit after a higher one was
        // matched, so every change not yet recorded is returned (see `outbox_in_commit_order`).
        let rows = sqlx::query(
            "SELECT seq, resource_type, resource_id, version, previous_version, interaction, recorded_at,
                    traceparent
             FROM change_event WHERE NOT matched ORDER BY seq LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    fn outbox_in_commit_order(&self) -> bool {
        // Concurrent transactions take `seq` values in one order and commit in another.
        false
    }

    fn serves_one_node(&self) -> bool {
        // Any number of nodes may share the database.
        false
    }

    async fn last_change_seq(&self) -> Result<ChangeSeq> {
        let seq: Option<ChangeSeq> = sqlx::query_scalar("SELECT max(seq) FROM change_event")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq.unwrap_or(ChangeSeq::ZERO))
    }

    async fn versions(&self, keys: &[(TaskId, Version)]) -> Result<Vec<StoredVersion>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
        let versions: Vec<Version> = keys.iter().map(|(_, version)| *version).collect();
        let rows = sqlx::query(
            "SELECT v.id, v.version, v.last_updated, v.interaction, v.resource
             FROM task_version v JOIN unnest($1::text[], $2::bigint[]) AS k(id, version)
               ON v.id = k.id AND v.version = k.version",
        )
        .bind(&ids)
        .bind(&versions)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|row| super::readable(version_from_row(row)))
            .collect())
    }

    async fn create_subscription(&self, record: SubscriptionRecord) -> Result<StoredSubscription> {
        self.pressure.admit(WriteKind::Subscription)?;
        let _queued = self.pressure.enter();
        let mut tx = self.pool.begin().await?;
        let result = super::subscriptions::create(&mut *tx, record).await;
        finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the subscription table"))
    }

    async fn replace_subscription(
        &self,
        id: &SubscriptionId,
        decide: SubscriptionDecide,
    ) -> Result<StoredSubscription> {
        self.pressure.admit(WriteKind::Subscription)?;
        let _queued = self.pressure.enter();
        let mut tx = self.pool.begin().await?;
        let result = super::subscriptions::replace(&mut *tx, id, decide).await;
        finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the subscription"))
    }

    async fn delete_subscription(&self, id: &SubscriptionId) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let result = super::subscriptions::delete(&mut *tx, id).await;
        finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the subscription"))
    }

    async fn read_subscription(&self, id: &SubscriptionId) -> Result<Option<StoredSubscription>> {
        hub::read_subscription(&self.pool, id).await
    }

    async fn search_subscriptions(
        &self,
        query: &SubscriptionQuery,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredSubscription>, u64)> {
        hub::search_subscriptions(&self.pool, query, count, offset).await
    }

    async fn subscription_gauges(&self, max_backlogs: usize) -> Result<SubscriptionGauges> {
        hub::subscription_gauges(&self.pool, max_backlogs).await
    }

    async fn live_subscription_page(
        &self,
        after: Option<&SubscriptionId>,
        limit: usize,
    ) -> Result<Vec<LiveSubscription>> {
        let sql = hub_sql::live_page("$1", "$2");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after.map_or("", SubscriptionId::as_str))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(live_from_row).collect()
    }

    async fn live_subscription_count(&self) -> Result<usize> {
        let count: i64 = sqlx::query_scalar(hub_sql::COUNT_LIVE)
            .fetch_one(&self.pool)
            .await?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    async fn fill_matching_forms(&self, forms: Vec<MatchingFormRow>) -> Result<()> {
        subscriptions::fill_matching_forms(&self.pool, forms).await
    }

    async fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>> {
        Ok(sqlx::query_as(hub_sql::PENDING_DELIVERIES)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn outbox_cursor(&self, consumer: &str) -> Result<ChangeSeq> {
        let seq: Option<ChangeSeq> =
            sqlx::query_scalar("SELECT seq FROM outbox_cursor WHERE consumer = $1")
                .bind(consumer)
                .fetch_optional(&self.pool)
                .await?;
        Ok(seq.unwrap_or(ChangeSeq::ZERO))
    }

    async fn match_progress(&self, consumer: &str) -> Result<Option<ChangeProgress>> {
        hub::match_progress(&self.pool, consumer).await
    }

    async fn record_matches(
        &self,
        batch: MatchBatch,
    ) -> Result<Vec<(SubscriptionId, EventNumber)>> {
        let mut tx = self.pool.begin().await?;
        let result = hub::record_matches(&mut tx, batch).await;
        finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the outbox"))
    }

    async fn subscription_events(
        &self,
        id: &SubscriptionId,
        from: EventNumber,
        to: EventNumber,
    ) -> Result<Vec<EventRecord>> {
        hub::subscription_events(&self.pool, id, from, to).await
    }

    async fn restart_delivery(
        &self,
        id: &SubscriptionId,
        from: EventNumber,
    ) -> Result<Option<StoredSubscription>> {
        hub::restart_delivery(&self.pool, id, from).await
    }

    async fn record_deliveries(
        &self,
        holder: &str,
        reports: Vec<DeliveryReport>,
        attempts: Vec<crate::audit::AuditRecord>,
    ) -> Result<()> {
        hub::record_deliveries(&self.pool, holder, reports, attempts).await
    }

    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        hub::acquire_lease(&self.pool, name, holder, ttl).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<()> {
        hub::release_lease(&self.pool, name, holder).await
    }

    async fn lease_holders(&self, prefix: &str) -> Result<Vec<String>> {
        hub::lease_holders(&self.pool, prefix).await
    }

    async fn claim_subscription(
        &self,
        id: &SubscriptionId,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<StoredSubscription>> {
        hub::claim_subscription(&self.pool, id, holder, ttl).await
    }

    async fn release_subscription(&self, id: &SubscriptionId, holder: &str) -> Result<()> {
        hub::release_subscription(&self.pool, id, holder).await
    }

    async fn due_subscriptions(
        &self,
        stale_before: &StoredInstant,
        limit: usize,
    ) -> Result<Vec<SubscriptionId>> {
        hub::due_subscriptions(&self.pool, stale_before, limit).await
    }

    async fn subscription_generation(&self) -> Result<i64> {
        hub::subscription_generation(&self.pool).await
    }

    async fn subscription_changes_since(&self, generation: i64) -> Result<SubscriptionChanges> {
        hub::subscription_changes_since(&self.pool, generation).await
    }

    async fn prune_events(&self, before: &StoredInstant) -> Result<u64> {
        hub::prune_events(&self.pool, before).await
    }

    async fn record_audits(&self, records: Vec<crate::audit::AuditRecord>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await?;
        insert_audits(&mut conn, records).await
    }

    async fn search_audit(
        &self,
        query: &super::audit_sql::AuditQuery,
    ) -> Result<Vec<super::audit_sql::AuditRow>> {
        let (sql, binds) = super::audit_sql::search_sql(query, Placeholder::Dollar);
        let mut q = sqlx::query_as::<_, super::audit_sql::AuditRow>(AssertSqlSafe(sql));
        for bind in binds {
            q = q.bind(pg_text(&bind).into_owned());
        }
        Ok(q.fetch_all(&self.pool).await?)
    }

    async fn read_audit(&self, id: &str) -> Result<Option<String>> {
        let lookup = super::audit_sql::IdLookup::of(id);
        let (sql, bind) = lookup.sql(Placeholder::Dollar);
        let rows = sqlx::query_as::<_, super::audit_sql::AuditRow>(AssertSqlSafe(sql))
            .bind(pg_text(&bind).into_owned())
            .fetch_all(&self.pool)
            .await?;
        lookup.found(rows)
    }

    async fn prune_audit(&self, before: &StoredInstant) -> Result<u64> {
        let done = sqlx::query("DELETE FROM audit_event WHERE recorded < $1")
            .bind(before)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn overdue_tasks(
        &self,
        now: &StoredInstant,
        limit: usize,
    ) -> Result<Vec<(TaskId, StoredInstant)>> {
        hub::overdue_tasks(&self.pool, now, limit).await
    }

    async fn mark_overdue(
        &self,
        task_id: &TaskId,
        due_at: &StoredInstant,
        now: &StoredInstant,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let result = hub::mark_overdue(&mut tx, task_id, due_at, now).await;
        let reported = finish(tx, result)
            .await
            .map_err(|e| concurrent(e, "the Task"))?;
        if reported {
            self.wrote_changes();
        }
        Ok(reported)
    }

    async fn next_due(&self, now: &StoredInstant) -> Result<Option<StoredInstant>> {
        hub::next_due(&self.pool, now).await
    }

    fn pressure(&self) -> &Pressure {
        &self.pressure
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        // Every write is its own transaction, finished before its caller returns: closing the
        // pools waits for the connections in use and closes them all.
        self.pool.close().await;
        self.group_pool.close().await;
    }
}

/// Inserts AuditEvents in one statement, in the order given (the `seq` order), on `conn`: the
/// node's audit queue's batches on their own, and delivery attempts' inside the transaction
/// that records their results (`hub::record_deliveries`).
pub(super) async fn insert_audits(
    conn: &mut sqlx::PgConnection,
    records: Vec<crate::audit::AuditRecord>,
) -> Result<()> {
    let mut columns = AuditColumns::default();
    for r in records {
        columns.recorded.push(r.recorded.as_str().to_string());
        columns.type_codes.push(r.type_code);
        columns.subtypes.push(r.subtype);
        columns.outcomes.push(r.outcome);
        columns.agents.push(r.agent);
        columns.entities.push(r.entity);
        columns.facts.push(r.facts);
    }
    sqlx::query(
        "INSERT INTO audit_event (recorded, type_code, subtype, outcome, agent, entity, resource)
         SELECT recorded, type_code, subtype, outcome, agent, entity, resource
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[])
           WITH ORDINALITY AS r(recorded, type_code, subtype, outcome, agent, entity, resource, n)
         ORDER BY n",
    )
    .bind(&columns.recorded)
    .bind(&columns.type_codes)
    .bind(&columns.subtypes)
    .bind(&columns.outcomes)
    .bind(&columns.agents)
    .bind(&columns.entities)
    .bind(&columns.facts)
    .execute(conn)
    .await?;
    Ok(())
}

/// A batch of AuditEvent rows as columns, for one `unnest` insert.
#[derive(Default)]
struct AuditColumns {
    recorded: Vec<String>,
    type_codes: Vec<&'static str>,
    subtypes: Vec<String>,
    outcomes: Vec<&'static str>,
    agents: Vec<Option<String>>,
    entities: Vec<Option<String>>,
    /// Each AuditEvent's stored facts, for the `resource` column (`crate::audit::StoredFacts`).
    facts: Vec<String>,
}
