//! The embedded store: SQLite in WAL mode with one writer that commits in groups.
//!
//! All writes go through a single writer, a dedicated OS thread (`baton-sqlite-writer`)
//! that owns the only write connection, a rusqlite `Connection`. Async callers queue jobs
//! on a bounded tokio channel and await each job's oneshot answer; the thread blocks on the
//! channel, takes every job waiting (up to `store.max_batch`), applies each inside its own
//! savepoint of one `BEGIN IMMEDIATE` transaction, and commits once, calling into SQLite
//! directly, with no hop to another thread per statement. With `store.synchronous = full`
//! each group is made durable by one fsync of the WAL on the syncer thread (`syncer`) before
//! its answers, so the cost of durability is shared by every write in the group: an
//! acknowledged write survives a killed process and a power cut alike. The thread
//! is a vital task (`supervise::watch_vital`): if it ends before `close`, the node says so
//! and stops. `close` closes the queue; the thread finishes what is queued, checkpoints the
//! WAL and ends, and `close` waits for it.
//!
//! Reads use a pool of read-only sqlx connections, which WAL lets run beside the writer:
//! they never queue behind it. Start-up's one pass over the live subscriptions (`live`) has
//! a read-only rusqlite connection of its own, on a blocking thread, instead: a million rows
//! through sqlx's per-row channel cost more than putting them in force. The migrations run
//! through sqlx before the writer starts.
//!
//! The writer thread is in `writer`; the statements of a Task write, which it runs under the
//! rules of `store::write`, in `tasks`; those of a subscription write, under the rules of
//! `store::subscriptions`, in `subscriptions`; the rest of the hub's in `hub`.
//!
//! The reads below build their search statements with `search_sql` and read rows with
//! `rows`, as PostgreSQL's do; what stays per dialect is the `?` placeholder, the executor
//! (the read pool) and, for `versions`, SQLite's `(id, version) IN (VALUES …)` in chunks
//! under its bound-parameter limit.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
// Every dynamic statement here is assembled from fixed fragments; values are always bound.
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::{Mutex, Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::hub_sql;
use super::pressure::{Pressure, WriteKind};
use super::rows::history_from_row;
use super::rows::{live_from_row, version_from_row};
use super::search_sql::{
    PageSpec, Placeholder, children_sql, history_sql, page_sql, sort_value_count,
};
use super::write::{self, Found, Precheck, Prepared};
use super::{
    ChangeEvent, Counting, CurrentTask, DeliveryReport, EventRecord, HistoryRequest,
    HistoryVersion, LiveSubscription, MatchBatch, MatchingFormRow, PageRequest, PendingDelivery,
    SearchPage, Store, StoredSubscription, StoredVersion, SubscriptionChanges, SubscriptionDecide,
    SubscriptionQuery, SubscriptionRecord, WriteOutcome, WriteRequest,
};
use super::{ChangeProgress, SubscriptionGauges};
use crate::config::StoreConfig;
use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, EventNumber, StoredInstant, SubscriptionId, TaskId, Version};
use crate::fhir::search::Predicate;
use crate::supervise::{self, Health};
use crate::trace::current_trace;
use writer::{Done, Job, Work};

mod checkpoint;
mod counts;
mod hub;
mod live;
mod point;
mod subscriptions;
mod syncer;
mod tasks;
mod texts;
mod writer;

/// How long a connection waits for a lock another holds (a checkpoint, a reader starting).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a search may run on the API runtime's thread before it is interrupted and run
/// again on a blocking thread (`point::PointReads::run_within`). A work-list page and its
/// count take 0.1–0.3 ms of CPU at a million Tasks (BENCHMARKS.md, issue 16); handing each
/// search to a blocking thread and its answer back cost more than that in thread wake-ups.
/// The budget bounds how long one search holds a runtime thread, and what an overrun
/// wastes.
const INLINE_SEARCH_BUDGET: Duration = Duration::from_millis(1);
/// SQLite's page cache per connection (`PRAGMA cache_size`; negative: in KiB).
const CACHE_SIZE: &str = "-32000";

pub struct SqliteStore {
    reads: SqlitePool,
    /// The server's base URL (`Precheck::base_url`); the writer has its own copy.
    base_url: String,
    /// The database file, which start-up's read of the live subscriptions (`live`) opens
    /// on a connection of its own.
    path: std::path::PathBuf,
    /// The delivery path's reads by key, on the caller's thread (`point`).
    point: point::PointReads,
    /// Searches, each on a blocking thread (`point::PointReads::for_searches`).
    searches: Arc<point::PointReads>,
    /// The searches' capped counts that are still "more than the cap" (`counts`).
    counts: Arc<counts::CappedCounts>,
    /// The current Tasks' texts for search pages (`store.search_text_cache_mib`; `texts`).
    texts: Option<Arc<texts::TextCache>>,
    /// How long a search runs on the caller's thread before it moves to a blocking one
    /// (`INLINE_SEARCH_BUDGET`).
    inline_budget: Duration,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Cancelled by `close`: the writer's end is then expected, not a failure of the node.
    closing: CancellationToken,
    /// Where a full disk is noted, so that `/readyz` says why writes are refused.
    health: Arc<Health>,
    /// The writer's queue depth (every job, the hub's too) and the fan-out lag that client
    /// writes are admitted against.
    pressure: Pressure,
    /// How far the commits are durable (`store.synchronous = full`; `Store::until_durable`).
    horizon: Option<Arc<syncer::Horizon>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, runs the migrations and starts the writer
    /// thread.
    /// `committed` is notified after every commit that wrote change events.
    /// The writer runs under `health` as a vital task: if it ever stops before `close`, the
    /// node reports it and stops (see `supervise`).
    pub async fn open(
        path: &Path,
        base_url: &str,
        config: &StoreConfig,
        committed: Arc<Notify>,
        health: Arc<Health>,
    ) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::internal("creating the data directory failed", e))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match config.synchronous {
                crate::config::Synchronous::Full => SqliteSynchronous::Full,
                crate::config::Synchronous::Normal => SqliteSynchronous::Normal,
            })
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("cache_size", CACHE_SIZE)
            .pragma("temp_store", "memory");
        // Migrations run through a one-connection pool: `Migrator::run` on a bare connection
        // does not produce a `Send` future.
        let migrations = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&migrations).await?;
        migrations.close().await;
        let writer = writer::connect(path)?;
        let checkpointer = checkpoint::Checkpointer::start(path, config.synchronous)?;
        let reads = SqlitePoolOptions::new()
            .max_connections(config.read_connections)
            .min_connections(1)
            .connect_with(options.read_only(true))
            .await?;
        let (tx, rx) = mpsc::channel(config.max_batch * 4);
        let durability =
            writer::Durability::of(config.synchronous, path, &committed, tx.downgrade())?;
        let horizon = durability.horizon();
        let max_batch = config.max_batch;
        let closing = CancellationToken::new();
        let texts = texts::TextCache::new(config.search_text_cache_mib).map(Arc::new);
        let ended = writer::start(
            writer,
            checkpointer,
            durability,
            rx,
            base_url.to_string(),
            max_batch,
            writer::Told {
                committed,
                texts: texts.clone(),
            },
        )?;
        let handle = tokio::spawn(supervise::watch_vital(
            health.clone(),
            "writer",
            closing.clone(),
            ended,
        ));
        Ok(SqliteStore {
            reads,
            base_url: base_url.to_string(),
            path: path.to_path_buf(),
            point: point::PointReads::new(path, config.read_connections as usize),
            searches: Arc::new(point::PointReads::for_searches(
                path,
                config.read_connections as usize,
                i64::try_from(config.search_mmap_mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX),
            )),
            counts: Arc::new(counts::CappedCounts::new()),
            texts,
            inline_budget: INLINE_SEARCH_BUDGET,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
            closing,
            health,
            pressure: Pressure::new(config.max_queue, config.max_fanout_lag),
            horizon,
        })
    }
}

impl SqliteStore {
    /// Runs a search's reads on a search connection, on a blocking thread: a search may read
    /// thousands of rows, which must not hold a runtime thread.
    async fn search_reads<T: Send + 'static>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let searches = self.searches.clone();
        tokio::task::spawn_blocking(move || searches.run(read))
            .await
            .map_err(|e| Error::internal("a search's thread failed", e))?
    }
}

impl Precheck for SqliteStore {
    /// The outbox position the pre-check's snapshot ends at.
    type Seen = ChangeSeq;

    /// Evaluates If-None-Exist criteria on the read pool, so that their cost (a search) is
    /// paid beside the writer rather than inside it. The outbox position and the search are
    /// read in one transaction, hence one snapshot: what the search did not see is exactly
    /// what was written after that position.
    async fn precheck(&self, criteria: &[Predicate]) -> Result<(Found, ChangeSeq)> {
        let mut conn = self.reads.acquire().await?;
        let mut tx = conn.begin().await?;
        let seq: ChangeSeq = sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM change_event")
            .fetch_one(&mut *tx)
            .await?;
        let ids = tasks::find_ids(&mut tx, criteria, 2).await?;
        let found =
            tasks::found_among(&ids, async |id| tasks::load_current(&mut *tx, id).await).await?;
        tx.rollback().await?;
        Ok((found, seq))
    }

    fn base_url(&self) -> &str {
        &self.base_url
    }
}

impl SqliteStore {
    /// Queues work for the writer and waits for its commit.
    async fn submit(&self, work: Work) -> Result<Done> {
        let _queued = self.pressure.enter();
        let queued = std::time::Instant::now();
        let lane = if work.is_urgent() { "request" } else { "hub" };
        let (reply, answer) = oneshot::channel();
        let sender = self.jobs.lock().await.clone().ok_or_else(writer_gone)?;
        let audit = crate::audit::current();
        if let Some(audit) = &audit
            && matches!(work, Work::Task(_) | Work::Transaction(_))
        {
            // What the write's AuditEvents share is built here, not on the writer's thread.
            audit.prepare_task_changes();
        }
        sender
            .send(Job {
                work,
                reply,
                trace: current_trace(),
                audit,
            })
            .await
            .map_err(|_| writer_gone())?;
        let done = answer.await.map_err(|_| writer_gone())?;
        metrics::histogram!("baton_store_write_wait_seconds", "lane" => lane)
            .record(queued.elapsed().as_secs_f64());
        if let Err(e) = &done
            && e.status() == axum::http::StatusCode::INSUFFICIENT_STORAGE
        {
            self.health.note("disk-full");
        }
        done
    }
}

/// The answer to a write when the writer is gone: the node is shutting down, or stopping
/// because the writer died; another node, or this one restarted, will take it.
fn writer_gone() -> Error {
    Error::unavailable(
        "this node cannot write now (its database writer has stopped); retry shortly",
        5,
    )
}

fn unexpected() -> Error {
    Error::internal(
        "the writer answered with the wrong kind of result",
        "mismatch",
    )
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self, request: WriteRequest) -> Result<WriteOutcome> {
        self.pressure.admit(WriteKind::Task)?;
        let work = match write::prepare(self, request).await? {
            Prepared::Answered(outcome) => return Ok(outcome),
            Prepared::Write(write) => Work::Task(write),
        };
        match self.submit(work).await? {
            Done::Task(outcome) => Ok(outcome),
            _ => Err(unexpected()),
        }
    }

    async fn transaction(&self, entries: Vec<(usize, WriteRequest)>) -> Result<Vec<WriteOutcome>> {
        self.pressure.admit(WriteKind::Task)?;
        let writes = write::prepare_transaction(self, entries).await?;
        match self.submit(Work::Transaction(writes)).await? {
            Done::Transaction(outcomes) => Ok(outcomes),
            _ => Err(unexpected()),
        }
    }

    async fn versions(&self, keys: &[(TaskId, Version)]) -> Result<Vec<StoredVersion>> {
        self.point.run(|conn| tasks::versions(conn, keys))
    }

    async fn create_subscription(&self, record: SubscriptionRecord) -> Result<StoredSubscription> {
        self.pressure.admit(WriteKind::Subscription)?;
        match self
            .submit(Work::CreateSubscription(Box::new(record)))
            .await?
        {
            Done::Subscription(s) => Ok(*s),
            _ => Err(unexpected()),
        }
    }

    async fn replace_subscription(
        &self,
        id: &SubscriptionId,
        decide: SubscriptionDecide,
    ) -> Result<StoredSubscription> {
        self.pressure.admit(WriteKind::Subscription)?;
        match self
            .submit(Work::ReplaceSubscription(id.clone(), decide))
            .await?
        {
            Done::Subscription(s) => Ok(*s),
            _ => Err(unexpected()),
        }
    }

    async fn delete_subscription(&self, id: &SubscriptionId) -> Result<bool> {
        match self.submit(Work::DeleteSubscription(id.clone())).await? {
            Done::Deleted(found) => Ok(found),
            _ => Err(unexpected()),
        }
    }

    async fn read_subscription(&self, id: &SubscriptionId) -> Result<Option<StoredSubscription>> {
        self.point.run(|conn| subscriptions::load(conn, id))
    }

    async fn search_subscriptions(
        &self,
        query: &SubscriptionQuery,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredSubscription>, u64)> {
        hub::search_subscriptions(&self.reads, query, count, offset).await
    }

    async fn subscription_gauges(&self, max_backlogs: usize) -> Result<SubscriptionGauges> {
        hub::subscription_gauges(&self.reads, max_backlogs).await
    }

    async fn live_subscription_page(
        &self,
        after: Option<&SubscriptionId>,
        limit: usize,
    ) -> Result<Vec<LiveSubscription>> {
        let sql = hub_sql::live_page("?", "?");
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(after.map_or("", SubscriptionId::as_str))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.reads)
            .await?;
        rows.iter().map(live_from_row).collect()
    }

    async fn live_subscription_count(&self) -> Result<usize> {
        let count: i64 = sqlx::query_scalar(hub_sql::COUNT_LIVE)
            .fetch_one(&self.reads)
            .await?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    async fn read_live_subscriptions(
        &self,
        page: usize,
        pages: mpsc::Sender<Vec<LiveSubscription>>,
    ) -> Result<()> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || live::read_live(&path, page, &pages))
            .await
            .map_err(|e| Error::internal("reading the live subscriptions failed", e))?
    }

    async fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>> {
        Ok(sqlx::query_as(hub_sql::PENDING_DELIVERIES)
            .fetch_all(&self.reads)
            .await?)
    }

    async fn outbox_cursor(&self, consumer: &str) -> Result<ChangeSeq> {
        let seq: Option<ChangeSeq> =
            sqlx::query_scalar("SELECT seq FROM outbox_cursor WHERE consumer = ?")
                .bind(consumer)
                .fetch_optional(&self.reads)
                .await?;
        Ok(seq.unwrap_or(ChangeSeq::ZERO))
    }

    async fn match_progress(&self, consumer: &str) -> Result<Option<ChangeProgress>> {
        let row: Option<(Option<ChangeSeq>, Option<SubscriptionId>)> = sqlx::query_as(
            "SELECT partial_seq, partial_through FROM outbox_cursor WHERE consumer = ?",
        )
        .bind(consumer)
        .fetch_optional(&self.reads)
        .await?;
        Ok(match row {
            Some((Some(seq), Some(through))) => Some(ChangeProgress { seq, through }),
            _ => None,
        })
    }

    async fn record_matches(
        &self,
        batch: MatchBatch,
    ) -> Result<Vec<(SubscriptionId, EventNumber)>> {
        // One process owns the database file, so the lease holder is always this one and the
        // cursor (changes commit in `seq` order here) says what was consumed.
        match self.submit(Work::RecordMatches(batch)).await? {
            Done::Numbers(numbers) => Ok(numbers),
            _ => Err(unexpected()),
        }
    }

    async fn subscription_events(
        &self,
        id: &SubscriptionId,
        from: EventNumber,
        to: EventNumber,
    ) -> Result<Vec<EventRecord>> {
        self.point
            .run(|conn| hub::subscription_events(conn, id, from, to))
    }

    async fn fill_matching_forms(&self, forms: Vec<MatchingFormRow>) -> Result<()> {
        match self.submit(Work::FillMatchingForms(forms)).await? {
            Done::Nothing => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn restart_delivery(
        &self,
        id: &SubscriptionId,
        from: EventNumber,
    ) -> Result<Option<StoredSubscription>> {
        match self
            .submit(Work::RestartDelivery {
                id: id.clone(),
                from,
            })
            .await?
        {
            Done::Subscription(stored) => Ok(Some(*stored)),
            Done::Nothing => Ok(None),
            _ => Err(unexpected()),
        }
    }

    async fn record_deliveries(
        &self,
        _holder: &str,
        reports: Vec<DeliveryReport>,
        attempts: Vec<crate::audit::AuditRecord>,
    ) -> Result<()> {
        if reports.is_empty() && attempts.is_empty() {
            return Ok(());
        }
        match self
            .submit(Work::RecordDeliveries(reports, attempts))
            .await?
        {
            Done::Nothing => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn overdue_tasks(
        &self,
        now: &StoredInstant,
        limit: usize,
    ) -> Result<Vec<(TaskId, StoredInstant)>> {
        hub::overdue_tasks(&self.reads, now, limit).await
    }

    async fn mark_overdue(
        &self,
        task_id: &TaskId,
        due_at: &StoredInstant,
        now: &StoredInstant,
    ) -> Result<bool> {
        let work = Work::MarkOverdue {
            task_id: task_id.clone(),
            due_at: due_at.clone(),
            now: now.clone(),
        };
        match self.submit(work).await? {
            Done::Deleted(reported) => Ok(reported),
            _ => Err(unexpected()),
        }
    }

    async fn next_due(&self, now: &StoredInstant) -> Result<Option<StoredInstant>> {
        hub::next_due(&self.reads, now).await
    }

    async fn prune_events(&self, before: &StoredInstant) -> Result<u64> {
        match self.submit(Work::PruneEvents(before.clone())).await? {
            Done::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    async fn record_audits(&self, records: Vec<crate::audit::AuditRecord>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        match self.submit(Work::RecordAudits(records)).await? {
            Done::Nothing => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn search_audit(
        &self,
        query: &super::audit_sql::AuditQuery,
    ) -> Result<Vec<super::audit_sql::AuditRow>> {
        let (sql, binds) = super::audit_sql::search_sql(query, Placeholder::Question);
        let mut q = sqlx::query_as::<_, super::audit_sql::AuditRow>(sqlx::AssertSqlSafe(sql));
        for bind in binds {
            q = q.bind(bind);
        }
        Ok(q.fetch_all(&self.reads).await?)
    }

    async fn read_audit(&self, id: &str) -> Result<Option<String>> {
        let lookup = super::audit_sql::IdLookup::of(id);
        let (sql, bind) = lookup.sql(Placeholder::Question);
        let rows = sqlx::query_as::<_, super::audit_sql::AuditRow>(sqlx::AssertSqlSafe(sql))
            .bind(bind)
            .fetch_all(&self.reads)
            .await?;
        lookup.found(rows)
    }

    async fn prune_audit(&self, before: &StoredInstant) -> Result<u64> {
        match self.submit(Work::PruneAudit(before.clone())).await? {
            Done::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    async fn read(&self, id: &TaskId) -> Result<Option<CurrentTask>> {
        self.point.run(|conn| tasks::load_by_id(conn, id))
    }

    async fn read_version(&self, id: &TaskId, version: Version) -> Result<Option<StoredVersion>> {
        let row = sqlx::query(
            "SELECT id, version, last_updated, interaction, resource FROM task_version WHERE id = ? AND version = ?",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(version_from_row).transpose()
    }

    async fn history(
        &self,
        id: &TaskId,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredVersion>, u64)> {
        // The window is written into the text, not bound: SQLite re-prepares a statement
        // whose bound LIMIT changes at every run (see `PageSql::rows_with_window`). Both
        // numbers are Baton's (the capped `_count`, the offset).
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, version, last_updated, interaction, resource FROM task_version
             WHERE id = ? ORDER BY version DESC LIMIT {count} OFFSET {offset}"
        )))
        .bind(id)
        .fetch_all(&self.reads)
        .await?;
        let total: i64 = sqlx::query_scalar("SELECT count(*) FROM task_version WHERE id = ?")
            .bind(id)
            .fetch_one(&self.reads)
            .await?;
        let versions = rows.iter().map(version_from_row).collect::<Result<_>>()?;
        Ok((versions, total as u64))
    }

    async fn task_history(&self, request: &HistoryRequest) -> Result<Vec<HistoryVersion>> {
        let (sql, binds) = history_sql(request, Placeholder::Question);
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for bind in binds {
            query = query.bind(bind);
        }
        let rows = query.fetch_all(&self.reads).await?;
        rows.iter().map(history_from_row).collect()
    }

    async fn search(&self, page: PageRequest<'_>) -> Result<SearchPage> {
        // A capped count walks past its cap, so that what it proves can be kept (`counts`).
        let (counting, count_cap) = match page.counting {
            Counting::UpTo(cap) => (Counting::UpTo(cap.saturating_mul(counts::REACH)), Some(cap)),
            counting => (counting, None),
        };
        let sql = page_sql(
            PageSpec {
                predicates: page.predicates,
                sort: page.sort,
                after: page.after,
                counting,
            },
            Placeholder::Question,
        )?;
        let rows = sql.rows_with_window(page.count, page.offset)?;
        let shape = tasks::PageShape {
            count: page.count,
            offset: page.offset,
            after_cursor: page.after.is_some(),
            max_bytes: page.max_bytes,
            sort_values: sort_value_count(page.sort),
            count_cap,
        };
        // On this thread first, for as long as a work list takes; a search that takes longer
        // is interrupted and run again on a blocking thread.
        let inline = self.searches.run_within(self.inline_budget, |conn| {
            tasks::search_page(
                conn,
                &self.counts,
                self.texts.as_deref(),
                &sql,
                &rows,
                shape,
            )
        })?;
        if let Some(page) = inline {
            return Ok(page);
        }
        metrics::counter!("baton_search_inline_overruns_total").increment(1);
        let counts = self.counts.clone();
        let texts = self.texts.clone();
        self.search_reads(move |conn| {
            tasks::search_page(conn, &counts, texts.as_deref(), &sql, &rows, shape)
        })
        .await
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
        let sql = children_sql(parents, scope, Placeholder::Question);
        self.search_reads(move |conn| tasks::children(conn, &sql, limit, max_bytes))
            .await
    }

    fn outbox_in_commit_order(&self) -> bool {
        // One writer, one transaction at a time: `seq` order is commit order.
        true
    }

    fn serves_one_node(&self) -> bool {
        // One process owns the database file and its writer.
        true
    }

    async fn until_durable(&self) {
        if let Some(horizon) = &self.horizon {
            horizon.reached().await;
        }
    }

    // A SQLite database serves one process (`run` opens it for one node), so the leases that
    // share work between nodes are this process's own: granted, and claims are plain reads.
    async fn acquire_lease(&self, _name: &str, _holder: &str, _ttl: Duration) -> Result<bool> {
        Ok(true)
    }

    async fn release_lease(&self, _name: &str, _holder: &str) -> Result<()> {
        Ok(())
    }

    async fn lease_holders(&self, _prefix: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    async fn claim_subscription(
        &self,
        id: &SubscriptionId,
        _holder: &str,
        _ttl: Duration,
    ) -> Result<Option<StoredSubscription>> {
        self.read_subscription(id).await
    }

    async fn release_subscription(&self, _id: &SubscriptionId, _holder: &str) -> Result<()> {
        Ok(())
    }

    async fn due_subscriptions(
        &self,
        stale_before: &StoredInstant,
        limit: usize,
    ) -> Result<Vec<SubscriptionId>> {
        hub::due_subscriptions(&self.reads, stale_before, limit).await
    }

    // The subscription index of the only node is updated in-process by the API, so there is
    // nothing to catch up on: the generation stays at 0.
    async fn subscription_generation(&self) -> Result<i64> {
        Ok(0)
    }

    async fn subscription_changes_since(&self, _generation: i64) -> Result<SubscriptionChanges> {
        Ok(SubscriptionChanges::default())
    }

    async fn change_events_after(&self, seq: ChangeSeq, limit: usize) -> Result<Vec<ChangeEvent>> {
        self.point
            .run(|conn| hub::change_events_after(conn, seq, limit))
    }

    async fn last_change_seq(&self) -> Result<ChangeSeq> {
        let seq: Option<ChangeSeq> = sqlx::query_scalar("SELECT max(seq) FROM change_event")
            .fetch_one(&self.reads)
            .await?;
        Ok(seq.unwrap_or(ChangeSeq::ZERO))
    }

    fn pressure(&self) -> &Pressure {
        &self.pressure
    }

    async fn ping(&self) -> Result<()> {
        if self
            .writer
            .lock()
            .await
            .as_ref()
            .is_none_or(|w| w.is_finished())
        {
            return Err(writer_gone());
        }
        sqlx::query("SELECT 1").execute(&self.reads).await?;
        Ok(())
    }

    async fn close(&self) {
        // Dropping the sender lets the writer thread finish what is queued, checkpoint and
        // end; the supervising task resolves once it has.
        self.closing.cancel();
        self.jobs.lock().await.take();
        if let Some(handle) = self.writer.lock().await.take() {
            let _ = handle.await;
        }
        self.reads.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::search::{Handling, SearchLimits, parse_query};
    use crate::store::Decision;
    use serde_json::{Value, json};

    const BASE: &str = "http://baton.test/fhir";

    async fn open(dir: &Path) -> SqliteStore {
        open_with(dir, crate::config::Synchronous::Normal).await
    }

    async fn open_with(dir: &Path, synchronous: crate::config::Synchronous) -> SqliteStore {
        let config = StoreConfig {
            max_batch: 16,
            read_connections: 2,
            postgres_connections: 1,
            synchronous,
            ..StoreConfig::default()
        };
        SqliteStore::open(
            &dir.join("baton.db"),
            BASE,
            &config,
            Arc::new(Notify::new()),
            Default::default(),
        )
        .await
        .unwrap()
    }

    fn criteria(query: &str) -> Vec<Predicate> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
        let limits = SearchLimits {
            default_count: 10,
            max_count: 10,
            default_total: crate::fhir::search::TotalMode::Accurate,
        };
        parse_query(&pairs, &limits, BASE, Handling::Strict)
            .unwrap()
            .predicates
    }

    fn order(value: &str) -> Value {
        json!({
            "resourceType": "Task", "status": "requested", "intent": "order",
            "identifier": [{ "system": "urn:orders", "value": value }],
        })
    }

    async fn create(store: &SqliteStore, resource: Value) -> TaskId {
        let request = WriteRequest::Create {
            id: None,
            resource,
            if_none_exist: None,
        };
        match store.write(request).await.unwrap() {
            WriteOutcome::Written(version) => version.id,
            other => panic!("not created: {other:?}"),
        }
    }

    /// A conditional create as the writer gets it, after a read-pool check that saw the
    /// outbox up to `checked_through`.
    async fn conditional(
        store: &SqliteStore,
        value: &str,
        checked_through: ChangeSeq,
    ) -> Result<WriteOutcome> {
        let work = Work::Task(write::TaskWrite::CreateUnlessFound {
            id: TaskId::generate(),
            resource: order(value),
            staged: None,
            criteria: criteria(&format!("identifier=urn:orders|{value}")),
            seen: checked_through,
        });
        match store.submit(work).await? {
            Done::Task(outcome) => Ok(outcome),
            _ => Err(unexpected()),
        }
    }

    fn existing_id(outcome: &WriteOutcome) -> Option<&TaskId> {
        match outcome {
            WriteOutcome::Existing(current) => Some(&current.id),
            _ => None,
        }
    }

    /// The writer's re-check looks only at Tasks written after the position the read-pool
    /// check saw: a match written since is found, deleted ones are not, and two are a 412.
    #[tokio::test]
    async fn the_writer_rechecks_what_was_written_after_the_precheck() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let before = store.last_change_seq().await.unwrap();
        let a1 = create(&store, order("A-1")).await;
        // Written after `before`: found.
        let outcome = conditional(&store, "A-1", before).await.unwrap();
        assert_eq!(existing_id(&outcome), Some(&a1));
        // Checked through the present: the writer looks at nothing and creates (the read-pool
        // check, which would have found A-1, is what guards that case).
        let now = store.last_change_seq().await.unwrap();
        let outcome = conditional(&store, "A-1", now).await.unwrap();
        assert!(matches!(outcome, WriteOutcome::Written(_)), "{outcome:?}");
        // Two written since: 412.
        let error = conditional(&store, "A-1", before).await.unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::PRECONDITION_FAILED);
        // A match deleted since no longer counts.
        let b1 = create(&store, order("B-1")).await;
        let decide: crate::store::Decide = Box::new(|_| Ok(Decision::Delete));
        store
            .write(WriteRequest::Change { id: b1, decide })
            .await
            .unwrap();
        let outcome = conditional(&store, "B-1", before).await.unwrap();
        assert!(matches!(outcome, WriteOutcome::Written(_)), "{outcome:?}");
        store.close().await;
    }

    /// A search page takes its Tasks' texts from the text cache once a search has read them,
    /// and a write of a Task is seen by the next search: a new version's text, a deletion.
    #[tokio::test]
    async fn search_pages_show_each_write_through_the_text_cache() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        assert!(store.texts.is_some(), "the text cache is on by default");
        let a = create(&store, order("T-1")).await;
        let b = create(&store, order("T-2")).await;
        let predicates = criteria("status=requested,ready");
        let page = async || {
            store
                .search(PageRequest {
                    predicates: &predicates,
                    sort: &[],
                    count: 10,
                    offset: 0,
                    counting: Counting::All,
                    after: None,
                    max_bytes: usize::MAX,
                })
                .await
                .unwrap()
        };
        let status_of = |page: &SearchPage, id: &TaskId| {
            page.tasks
                .iter()
                .find(|t| &t.id == id)
                .map(|t| serde_json::from_str::<Value>(&t.json).unwrap()["status"].clone())
        };
        // Read from the table, then from the cache: the same page.
        let first = page().await;
        assert_eq!(first.total, Some(2));
        assert_eq!(
            store.texts.as_ref().unwrap().len(),
            2,
            "the page walked a covering index and kept the texts it read"
        );
        assert_eq!(page().await.tasks, first.tasks);
        let decide: crate::store::Decide = Box::new(|current| {
            let mut resource = current.unwrap().resource.clone();
            resource["status"] = json!("ready");
            Ok(Decision::Put(Arc::new(resource)))
        });
        store
            .write(WriteRequest::Change {
                id: a.clone(),
                decide,
            })
            .await
            .unwrap();
        let after = page().await;
        assert_eq!(status_of(&after, &a), Some(json!("ready")));
        assert_eq!(
            after.tasks.iter().find(|t| t.id == a).unwrap().version,
            Version::FIRST.next()
        );
        assert_eq!(page().await.tasks, after.tasks);
        let decide: crate::store::Decide = Box::new(|_| Ok(Decision::Delete));
        store
            .write(WriteRequest::Change {
                id: b.clone(),
                decide,
            })
            .await
            .unwrap();
        let last = page().await;
        assert_eq!((last.tasks.len(), last.total), (1, Some(1)));
        assert_eq!(status_of(&last, &b), None);
        store.close().await;
    }

    /// `_id` and `_lastUpdated` are the Task row's own `id` and `last_updated`: no write puts
    /// an index row for them (a create, an update, a transaction's creates), and searches and
    /// the writer's re-check (which rebuilds each Task's index from what is stored) still
    /// find Tasks by them.
    #[tokio::test]
    async fn the_row_key_and_instant_have_no_index_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let before = store.last_change_seq().await.unwrap();
        let a = create(&store, order("R-1")).await;
        let decide: crate::store::Decide = Box::new(|current| {
            let mut resource = current.unwrap().resource.clone();
            resource["status"] = json!("ready");
            Ok(Decision::Put(Arc::new(resource)))
        });
        store
            .write(WriteRequest::Change {
                id: a.clone(),
                decide,
            })
            .await
            .unwrap();
        let entries = (0..3)
            .map(|n| {
                let request = WriteRequest::Create {
                    id: None,
                    resource: order(&format!("R-tx-{n}")),
                    if_none_exist: None,
                };
                (n, request)
            })
            .collect();
        store.transaction(entries).await.unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("baton.db")).unwrap();
        let rows: i64 = conn
            .query_row(
                "SELECT (SELECT count(*) FROM task_token WHERE param = '_id')
                   + (SELECT count(*) FROM task_date WHERE param = '_lastUpdated')",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(rows, 0);
        let stored = store.read(&a).await.unwrap().unwrap();
        let instant = stored.last_updated.as_str().to_string();

        let found = |query: String| {
            let store = &store;
            async move {
                let predicates = criteria(&query);
                let page = store
                    .search(PageRequest {
                        predicates: &predicates,
                        sort: &[],
                        count: 10,
                        offset: 0,
                        counting: Counting::Skip,
                        after: None,
                        max_bytes: usize::MAX,
                    })
                    .await
                    .unwrap();
                page.tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>()
            }
        };
        assert_eq!(found(format!("_id={a}")).await, std::slice::from_ref(&a));
        assert_eq!(
            found(format!("_id={a}&_lastUpdated={instant}")).await,
            std::slice::from_ref(&a)
        );
        assert_eq!(
            found(format!("_id={a}&_lastUpdated=gt{instant}")).await,
            Vec::<TaskId>::new()
        );
        assert_eq!(
            found(format!("_id={a}&_lastUpdated=ge{instant}")).await,
            std::slice::from_ref(&a)
        );
        assert_eq!(
            found(format!("_id:not={a}&identifier=urn:orders|R-1")).await,
            []
        );

        // The re-check of a conditional create on `_id`, over the Tasks written since.
        let work = Work::Task(write::TaskWrite::CreateUnlessFound {
            id: TaskId::generate(),
            resource: order("R-2"),
            staged: None,
            criteria: criteria(&format!("_id={a}&_lastUpdated={instant}")),
            seen: before,
        });
        let Done::Task(outcome) = store.submit(work).await.unwrap() else {
            panic!("not a Task write's answer");
        };
        assert_eq!(existing_id(&outcome), Some(&a));
        store.close().await;
    }

    /// An update replaces only the index rows whose values changed: a status change (a
    /// column) leaves every row where it was, a new identifier replaces that row alone, and
    /// the rows are always exactly those of the version written.
    #[tokio::test]
    async fn an_update_keeps_the_index_rows_it_does_not_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let mut resource = order("K-1");
        resource["code"] = json!({ "coding": [{ "system": "urn:c", "code": "x" }] });
        resource["authoredOn"] = json!("2024-02-01");
        resource["lastModified"] = json!("2024-02-02");
        let id = create(&store, resource).await;
        let conn = rusqlite::Connection::open(dir.path().join("baton.db")).unwrap();
        let rows = |conn: &rusqlite::Connection| -> Vec<(String, i64)> {
            let mut statement = conn
                .prepare(
                    "SELECT 'token ' || param || ' ' || coalesce(system, '-') || ' ' || value, rowid
                     FROM task_token WHERE task_id = ?1
                     UNION ALL SELECT 'date ' || param || ' ' || start_at || ' ' || end_at, rowid
                     FROM task_date WHERE task_id = ?1 ORDER BY 1",
                )
                .unwrap();
            statement
                .query_map([&id], |row| Ok((row.get(0)?, row.get(1)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        let update = |change: fn(&mut Value)| {
            let decide: crate::store::Decide = Box::new(move |current| {
                let mut resource = current.unwrap().resource.clone();
                change(&mut resource);
                Ok(Decision::Put(Arc::new(resource)))
            });
            store.write(WriteRequest::Change {
                id: id.clone(),
                decide,
            })
        };
        // The rows the version written should have, as `(text, _)`.
        let expected = |outcome: WriteOutcome| -> Vec<String> {
            let WriteOutcome::Written(version) = outcome else {
                panic!("not written: {outcome:?}");
            };
            let whole = crate::fhir::search::index_task(&version.content().unwrap(), BASE);
            let index = crate::fhir::search::TaskColumns::from_index(&whole).rows_beside(&whole);
            let mut expected: Vec<String> = index
                .tokens
                .iter()
                .map(|t| {
                    let system = t.system.as_deref().unwrap_or("-");
                    format!("token {} {system} {}", t.param, t.value)
                })
                .chain(
                    index
                        .dates
                        .iter()
                        .map(|d| format!("date {} {} {}", d.param, d.start, d.end)),
                )
                .collect();
            expected.sort();
            expected
        };
        let texts = |rows: &[(String, i64)]| rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
        let before = rows(&conn);
        assert!(before.len() >= 5, "{before:?}");

        let outcome = update(|r| r["status"] = json!("ready")).await.unwrap();
        let after = rows(&conn);
        assert_eq!(texts(&after), expected(outcome));
        assert_eq!(after, before, "a status change rewrote index rows");

        let outcome = update(|r| {
            r["identifier"] = json!([{ "system": "urn:orders", "value": "K-2" }]);
            r["lastModified"] = json!("2024-03-03");
        })
        .await
        .unwrap();
        let changed = rows(&conn);
        assert_eq!(texts(&changed), expected(outcome));
        let kept: Vec<_> = changed.iter().filter(|row| before.contains(row)).collect();
        assert_eq!(kept.len(), before.len() - 2, "{before:?} -> {changed:?}");
        store.close().await;
    }

    /// `close` waits for the writer thread, which commits what was queued before it ends;
    /// after it, a write is refused as "cannot write now" rather than lost or hung, and what
    /// was acknowledged is there when the database is opened again.
    /// With `store.synchronous = full` the hub's own writes (here an audit job, on the hub's
    /// lane like fan-out chunks and delivery results) commit without a sync on the writer
    /// thread and are answered by the syncer: once the answer is in, the horizon the
    /// deliveries wait for (`until_durable`) has passed them, and a Task write's likewise.
    #[tokio::test]
    async fn hub_writes_are_answered_once_durable_and_deliveries_wait_for_that() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let store = open_with(dir.path(), crate::config::Synchronous::Full).await;
        assert!(
            store.horizon.is_some(),
            "no horizon with synchronous = full"
        );
        for round in 0..20 {
            create(&store, order(&format!("r{round}"))).await;
            assert!(
                store.until_durable().now_or_never().is_some(),
                "a Task write answered before it was durable"
            );
            assert!(matches!(
                store.submit(Work::RecordAudits(Vec::new())).await,
                Ok(Done::Nothing)
            ));
            assert!(
                store.until_durable().now_or_never().is_some(),
                "a hub write answered before it was durable"
            );
        }
        store.close().await;
        // Without the pipelined commit every commit is final when it returns.
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        assert!(store.horizon.is_none());
        store.close().await;
    }

    #[tokio::test]
    async fn close_drains_the_writer_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let queued: Vec<_> = (0..20)
            .map(|n| {
                store.write(WriteRequest::Create {
                    id: None,
                    resource: order(&format!("E-{n}")),
                    if_none_exist: None,
                })
            })
            .collect();
        // The writes are queued first (`join!` polls in order), then the queue is closed.
        let (written, ()) = tokio::join!(futures::future::join_all(queued), store.close());
        let error = store.ping().await.unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        let refused = store
            .write(WriteRequest::Create {
                id: None,
                resource: order("E-late"),
                if_none_exist: None,
            })
            .await
            .unwrap_err();
        assert_eq!(
            refused.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );

        let reopened = open(dir.path()).await;
        for outcome in written {
            let Ok(WriteOutcome::Written(version)) = outcome else {
                panic!("not written: {outcome:?}");
            };
            assert!(reopened.read(&version.id).await.unwrap().is_some());
        }
        reopened.close().await;
    }

    /// Through `Store::write`: none, one and two matches on the read pool.
    #[tokio::test]
    async fn conditional_creates_find_none_one_or_two() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let write = |value: &'static str| {
            store.write(WriteRequest::Create {
                id: None,
                resource: order(value),
                if_none_exist: Some(criteria(&format!("identifier=urn:orders|{value}"))),
            })
        };
        let first = write("C-1").await.unwrap();
        let WriteOutcome::Written(first) = first else {
            panic!("not created: {first:?}");
        };
        let again = write("C-1").await.unwrap();
        assert_eq!(existing_id(&again), Some(&first.id));
        create(&store, order("C-1")).await;
        let error = write("C-1").await.unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::PRECONDITION_FAILED);
        store.close().await;
    }

    /// The writer's commits leave the WAL to the checkpointer, which folds it into the
    /// database file soon after: the file grows while the WAL holds far fewer pages than the
    /// writer's own automatic checkpoint needs.
    #[tokio::test]
    async fn the_checkpointer_folds_the_wal_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let file = dir.path().join("baton.db");
        let before = std::fs::metadata(&file).unwrap().len();
        for i in 0..200 {
            create(&store, order(&format!("W-{i}"))).await;
        }
        let wal = std::fs::metadata(dir.path().join("baton.db-wal"))
            .unwrap()
            .len();
        assert!(
            wal < u64::from(checkpoint::WRITER_AUTOCHECKPOINT_PAGES) * 4096,
            "the writer's own checkpoint would not have run: {wal} bytes of WAL"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::metadata(&file).unwrap().len() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint copied the WAL into the database within 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        store.close().await;
    }

    /// A search that outruns its time on the caller's thread is run again on a blocking
    /// thread and answers what it answers within its time: the same Tasks, in the same
    /// order, with the same totals (a zero budget interrupts every statement at its first
    /// look at the clock).
    #[tokio::test]
    async fn a_search_past_its_inline_budget_answers_the_same_from_a_blocking_thread() {
        use crate::store::Counting;
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path()).await;
        for n in 0..60 {
            create(&store, order(&format!("B-{n}"))).await;
        }
        let predicates = criteria("status=requested");
        let mut answers = Vec::new();
        for budget in [INLINE_SEARCH_BUDGET, Duration::ZERO] {
            store.inline_budget = budget;
            for counting in [Counting::All, Counting::UpTo(10), Counting::UpTo(100)] {
                let page = store
                    .search(PageRequest {
                        predicates: &predicates,
                        sort: &[],
                        count: 50,
                        offset: 0,
                        after: None,
                        counting,
                        max_bytes: usize::MAX,
                    })
                    .await
                    .unwrap();
                let ids: Vec<String> = page.tasks.iter().map(|t| t.id.to_string()).collect();
                answers.push((budget, counting, ids, page.total));
            }
        }
        let (inline, blocking) = answers.split_at(3);
        for (a, b) in inline.iter().zip(blocking) {
            assert_eq!((&a.1, &a.2, a.3), (&b.1, &b.2, b.3));
            assert_eq!(a.2.len(), 50);
        }
        let totals: Vec<Option<u64>> = inline.iter().map(|a| a.3).collect();
        assert_eq!(totals, [Some(60), Some(11), Some(60)]);
        store.close().await;
    }

    /// A search's page statement is prepared once per connection and then reused as it is.
    /// With its LIMIT and OFFSET as bound parameters, SQLite expired the cached statement at
    /// every bind and prepared it again at its first step (the "before" arm shows that this
    /// is what SQLite does); with them in the text (`PageSql::rows_with_window`) it does not.
    #[tokio::test]
    async fn a_search_page_statement_is_not_prepared_again_for_each_search() {
        use crate::store::Counting;
        use rusqlite::StatementStatus;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        for n in 0..3 {
            create(&store, order(&format!("R-{n}"))).await;
        }
        let predicates = criteria("status=requested");
        let sql = page_sql(
            PageSpec {
                predicates: &predicates,
                sort: &[],
                after: None,
                counting: Counting::UpTo(1000),
            },
            Placeholder::Question,
        )
        .unwrap();
        let windowed = sql.rows_with_window(2, 0).unwrap();
        let counts = store.counts.clone();
        let reprepared = store
            .searches
            .run(move |conn| {
                let shape = || tasks::PageShape {
                    count: 2,
                    offset: 0,
                    after_cursor: false,
                    max_bytes: usize::MAX,
                    sort_values: 0,
                    count_cap: None,
                };
                for _ in 0..3 {
                    let page = tasks::search_page(conn, &counts, None, &sql, &windowed, shape())?;
                    assert_eq!((page.tasks.len(), page.total), (2, Some(3)));
                }
                let after = conn
                    .prepare_cached(&windowed)?
                    .get_status(StatementStatus::RePrepare);
                // The statement as it was bound before: page size and offset as parameters.
                let mut bound = conn.prepare_cached(&sql.rows)?;
                for _ in 0..3 {
                    let binds = sql.binds.iter().map(|b| b as &dyn rusqlite::ToSql);
                    let window: [&dyn rusqlite::ToSql; 2] = [&2_i64, &0_i64];
                    let mut rows = bound.query(rusqlite::params_from_iter(binds.chain(window)))?;
                    while rows.next()?.is_some() {}
                }
                let before = bound.get_status(StatementStatus::RePrepare);
                Ok((before, after))
            })
            .unwrap();
        assert_eq!(reprepared.1, 0, "the windowed statement was prepared again");
        assert!(
            reprepared.0 >= 2,
            "SQLite no longer re-prepares a statement whose LIMIT is bound: {reprepared:?}"
        );
        store.close().await;
    }
    /// A transaction's creates, written with multi-row INSERTs of every chunk size
    /// (`tasks::ROW_CHUNKS`), store the rows a single create stores, id and instant aside, and
    /// their change events follow entry order.
    #[tokio::test]
    async fn a_transaction_of_creates_stores_the_rows_single_creates_do() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let resource = |n: usize| {
            let mut task = order(&format!("T-{n}"));
            task["owner"] = json!({ "reference": format!("Practitioner/{}", n % 3) });
            if n.is_multiple_of(2) {
                task["authoredOn"] = json!("2026-12-01");
                task["for"] = json!({ "reference": "Patient/p1" });
            }
            task
        };
        let single = create(&store, resource(0)).await;
        // 64 + 16 + 4 + 1 + 1 + 1 Tasks, and a different number of token rows.
        let entries: Vec<(usize, WriteRequest)> = (0..87)
            .map(|n| {
                let request = WriteRequest::Create {
                    id: Some(TaskId::generate()),
                    resource: resource(n),
                    if_none_exist: None,
                };
                (n, request)
            })
            .collect();
        let outcomes = store.transaction(entries).await.unwrap();
        let ids: Vec<TaskId> = outcomes
            .iter()
            .map(|o| match o {
                WriteOutcome::Written(v) => v.id.clone(),
                other => panic!("not created: {other:?}"),
            })
            .collect();
        let conn = rusqlite::Connection::open(dir.path().join("baton.db")).unwrap();
        // Each Task's rows, with its id and instant written as placeholders.
        let rows_of = |id: &TaskId| -> Vec<String> {
            let instant: String = conn
                .query_row("SELECT last_updated FROM task WHERE id = ?", [id], |r| {
                    r.get(0)
                })
                .unwrap();
            let queries = [
                "SELECT 'task', version, deleted, priority_rank, resource, status, owner,
                   performer, performer_system, due_start, due_end, authored_on
                 FROM task WHERE id = ?1",
                "SELECT 'version', version, last_updated, interaction, resource
                 FROM task_version WHERE id = ?1",
                "SELECT 'token', param, system, value FROM task_token WHERE task_id = ?1",
                "SELECT 'date', param, start_at, end_at FROM task_date WHERE task_id = ?1",
                "SELECT 'change', resource_type, version, previous_version, interaction,
                   recorded_at FROM change_event WHERE resource_id = ?1",
            ];
            let mut rows = Vec::new();
            for sql in queries {
                let mut statement = conn.prepare(sql).unwrap();
                let found = statement
                    .query_map([id], |row| {
                        let values: Vec<String> = (0..row.as_ref().column_count())
                            .map(|i| {
                                row.get::<_, rusqlite::types::Value>(i)
                                    .map(|v| format!("{v:?}"))
                            })
                            .collect::<rusqlite::Result<_>>()?;
                        Ok(values.join("|"))
                    })
                    .unwrap()
                    .collect::<rusqlite::Result<Vec<String>>>()
                    .unwrap();
                rows.extend(found);
            }
            rows.sort();
            rows.iter()
                .map(|row| {
                    row.replace(id.as_str(), "{id}")
                        .replace(&instant, "{instant}")
                })
                .collect()
        };
        // A single create of the same resource: the same rows.
        assert_eq!(rows_of(&ids[0]), rows_of(&single));
        for (n, id) in ids.iter().enumerate() {
            let rows = rows_of(id);
            let tasks = rows
                .iter()
                .filter(|r| r.starts_with("Text(\"task\")"))
                .count();
            assert_eq!(tasks, 1, "{rows:?}");
            assert!(
                rows.iter().any(|r| r.contains(&format!("T-{n}"))),
                "{n}: {rows:?}"
            );
            assert_eq!(rows.len(), rows_of(&ids[n % 2]).len(), "{n}");
        }
        // The change events in entry order, right after the single create's.
        let order: Vec<String> = conn
            .prepare("SELECT resource_id FROM change_event ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let mut expected = vec![single.to_string()];
        expected.extend(ids.iter().map(TaskId::to_string));
        assert_eq!(order, expected);
        store.close().await;
    }

    /// A Task write's AuditEvent is made by the writer from the write's outcome and inserted
    /// with its group's just before the commit: it is stored with the change, a write that
    /// changed nothing has none, and when the insert fails the write fails with it and nothing
    /// of it is stored.
    #[tokio::test]
    async fn a_task_writes_audit_event_commits_with_it_or_neither_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        let audited = || {
            Some(Arc::new(crate::audit::RequestAudit::new(
                "node-1".into(),
                None,
                false,
            )))
        };
        let principal = crate::auth::Principal {
            issuer: None,
            subject: "admin-1".into(),
            role: crate::auth::Role::Admin,
            fhir_user: Some("Practitioner/a1".into()),
            performer_types: Vec::new(),
            scopes: None,
            patient: None,
        };
        let as_caller = |audit| {
            let principal = principal.clone();
            let store = &store;
            crate::audit::in_request(audit, async move {
                crate::audit::note_principal(&principal);
                store
                    .write(WriteRequest::Create {
                        id: None,
                        resource: order("AU-1"),
                        if_none_exist: Some(criteria("identifier=urn:orders|AU-1")),
                    })
                    .await
            })
        };
        let created = match as_caller(audited()).await.unwrap() {
            WriteOutcome::Written(version) => version.id,
            other => panic!("not created: {other:?}"),
        };
        // The same conditional create again finds it: nothing written, nothing audited.
        let again = as_caller(audited()).await.unwrap();
        assert_eq!(existing_id(&again), Some(&created));
        let conn = rusqlite::Connection::open(dir.path().join("baton.db")).unwrap();
        let audits = |conn: &rusqlite::Connection| -> Vec<(String, String, String)> {
            conn.prepare("SELECT subtype, entity, agent FROM audit_event ORDER BY seq")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        assert_eq!(
            audits(&conn),
            [(
                "create".to_string(),
                format!("Task/{created}"),
                "Practitioner/a1".to_string()
            )]
        );
        // A transaction's creates: one AuditEvent each, in entry order.
        let outcomes = crate::audit::in_request(audited(), async {
            crate::audit::note_principal(&principal);
            let create = |value: &str| WriteRequest::Create {
                id: None,
                resource: order(value),
                if_none_exist: None,
            };
            store
                .transaction(vec![(0, create("AU-T1")), (1, create("AU-T2"))])
                .await
        })
        .await
        .unwrap();
        let mut expected = vec![(
            "create".to_string(),
            format!("Task/{created}"),
            "Practitioner/a1".to_string(),
        )];
        for outcome in &outcomes {
            let WriteOutcome::Written(version) = outcome else {
                panic!("not created: {outcome:?}");
            };
            expected.push((
                "create".to_string(),
                format!("Task/{}", version.id),
                "Practitioner/a1".to_string(),
            ));
        }
        assert_eq!(audits(&conn), expected);
        // An AuditEvent that cannot be inserted fails its write, which leaves nothing behind.
        conn.execute_batch(
            "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_event
             BEGIN SELECT RAISE(FAIL, 'refused'); END",
        )
        .unwrap();
        let count = |conn: &rusqlite::Connection, table: &str| -> i64 {
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        let (tasks, changes) = (count(&conn, "task"), count(&conn, "change_event"));
        let refused = crate::audit::in_request(audited(), async {
            crate::audit::note_principal(&principal);
            store
                .write(WriteRequest::Create {
                    id: None,
                    resource: order("AU-2"),
                    if_none_exist: None,
                })
                .await
        })
        .await;
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(count(&conn, "task"), tasks);
        assert_eq!(count(&conn, "change_event"), changes);
        assert_eq!(audits(&conn).len(), 3);
        // Without audit facts (auditing off) a write needs no AuditEvent.
        conn.execute_batch("DROP TRIGGER refuse_audit").unwrap();
        create(&store, order("AU-3")).await;
        assert_eq!(count(&conn, "task"), tasks + 1);
        assert_eq!(audits(&conn).len(), 3);
        store.close().await;
    }
}
