//! The SQLite writer: one OS thread owns the only write connection and commits in groups.
//!
//! The thread (`baton-sqlite-writer`) owns a rusqlite `Connection` and blocks on the job
//! queue. It runs a group of the jobs waiting (up to `store.max_batch`) in one transaction
//! (`BEGIN IMMEDIATE`), each inside its own savepoint (plain creates queued together share
//! one, `Group::run_creates`, and so do the plain puts of changes queued together,
//! `Group::run_changes`), and commits once; every statement is a
//! call into SQLite on this thread, with no hand-off to another thread in between. Requests
//! (Task and subscription writes) go before the hub's bookkeeping and join a group that is
//! already running (`run_writer`), so a Task write never queues behind the fan-out. Task writes
//! follow the rules of `store::write` over this connection's statements (`tasks`),
//! subscription writes those of `store::subscriptions` (over `sqlite::subscriptions`); the
//! other hub writes run `hub`'s. The rules are async functions over the `TaskTx` and
//! `SubscriptionTx` traits; here they are driven to completion with `block_on`, since this
//! connection's implementations never wait for anything.
//!
//! Callers queue a `Job` from any task and await its oneshot answer. When the queue closes
//! (`SqliteStore::close`) the thread finishes what is queued, checkpoints the WAL into the
//! database file and ends; `start` returns the future that resolves when it has ended,
//! however it ended, for `supervise::watch_vital`.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;

use futures::executor::block_on;
use rusqlite::Connection;
use tokio::sync::{Notify, mpsc, oneshot};

use super::checkpoint::{Checkpointer, WRITER_AUTOCHECKPOINT_PAGES};
use super::hub;
use super::syncer::{Committed, Horizon, Syncer};
use super::texts::TextCache;
use super::{BUSY_TIMEOUT, CACHE_SIZE};
use crate::audit::{AuditRecord, RequestAudit};
use crate::config::Synchronous;
use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, EventNumber, StoredInstant, SubscriptionId, TaskId};
use crate::store::subscriptions;
use crate::store::write::{self, Decided, Prepared, TaskTx, TaskWrite};
use crate::store::{
    DeliveryReport, MatchBatch, MatchingFormRow, StoredSubscription, SubscriptionDecide,
    SubscriptionRecord, WriteOutcome,
};
use crate::supervise;
use crate::trace::{TraceContext, in_trace};

/// Statements kept prepared on the writer's connection. Every statement it runs is fixed
/// text (about 30, and the multi-row inserts of a transaction's creates in four sizes each,
/// `tasks::ROW_CHUNKS`), so all of them stay prepared.
const STATEMENT_CACHE: usize = 96;

/// A unit of work for the writer. Hub writes share the writer with Task writes so that
/// SQLite sees one writer and every kind of write benefits from group commit.
pub(super) enum Work {
    /// A Task write. A conditional create comes with what its criteria matched on the read
    /// pool (`SqliteStore::precheck`): nothing, up to an outbox position, so that the writer
    /// only looks again at the Tasks written since.
    Task(TaskWrite<ChangeSeq>),
    /// A transaction Bundle's writes, each with its Bundle entry: one job, so one savepoint
    /// holds them all and a failure in any entry rolls back the entries before it.
    Transaction(Vec<(usize, Prepared<ChangeSeq>)>),
    CreateSubscription(Box<SubscriptionRecord>),
    ReplaceSubscription(SubscriptionId, SubscriptionDecide),
    DeleteSubscription(SubscriptionId),
    /// One chunk of the outbox's matches (at most `hub.fanout_chunk`): a bounded job, so
    /// that Task writes queued behind it wait for one chunk, never for a whole fan-out.
    RecordMatches(MatchBatch),
    /// The results of many delivery attempts, in the order they were reported, and the
    /// attempts' AuditEvents: one job (one savepoint) for all the attempts whose results
    /// gathered while the previous one committed. The AuditEvents go in with the group's
    /// (`Group::audits`) once the results are written.
    RecordDeliveries(Vec<DeliveryReport>, Vec<AuditRecord>),
    FillMatchingForms(Vec<MatchingFormRow>),
    PruneEvents(StoredInstant),
    /// AuditEvents recorded after the requests they describe (reads, searches, refusals,
    /// Subscription changes): inserted with the group's (`Group::audits`).
    RecordAudits(Vec<AuditRecord>),
    /// Removes AuditEvents recorded before the instant.
    PruneAudit(StoredInstant),
    RestartDelivery {
        id: SubscriptionId,
        from: EventNumber,
    },
    MarkOverdue {
        task_id: TaskId,
        due_at: StoredInstant,
        now: StoredInstant,
    },
    /// Sent by the syncer when it has answered every group handed over, to a writer that
    /// holds a group open until then (`Group::await_sync`); no work.
    Wake,
}

/// What a unit of work produced.
pub(super) enum Done {
    Task(WriteOutcome),
    Transaction(Vec<WriteOutcome>),
    Subscription(Box<StoredSubscription>),
    Deleted(bool),
    Numbers(Vec<(SubscriptionId, EventNumber)>),
    Count(u64),
    Nothing,
}

pub(super) struct Job {
    pub(super) work: Work,
    pub(super) reply: oneshot::Sender<Result<Done>>,
    /// The trace of the request that submitted it: the change event it writes keeps it.
    pub(super) trace: Option<TraceContext>,
    /// The audit facts of the request that submitted it: a Task write's AuditEvents are
    /// made from them and its outcome, and committed with its change events in the group's
    /// audit insert (`Group::audits`).
    pub(super) audit: Option<Arc<RequestAudit>>,
}

/// Opens the write connection with the same settings as the read pool's (`SqliteStore::open`):
/// WAL, the busy timeout, the page cache, temporary tables in memory. The durability is set
/// per group by `run_writer` (`Durability`). The migrations have run already.
pub(super) fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // The checkpointer thread folds the WAL back (`checkpoint`); the writer's own automatic
    // checkpoint, far apart, restarts the WAL under writes that never pause.
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
         PRAGMA cache_size = {CACHE_SIZE}; PRAGMA temp_store = memory; PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = {WRITER_AUTOCHECKPOINT_PAGES};"
    ))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// How the writer makes a group durable before its answers go out.
pub(super) enum Durability {
    /// `store.synchronous = normal`: no sync at commit (a power loss may take the last
    /// commits, never the database's consistency).
    Normal,
    /// `store.synchronous = full`: every group is committed without a sync and answered by
    /// the syncer once its frames are synced (`syncer`); the deliveries, which read the hub's
    /// writes at once, wait for the same sync before they send (`syncer::Horizon`).
    Pipelined(Syncer),
}

impl Durability {
    /// `writer` is the writer's own queue, for the syncer's `Work::Wake`.
    pub(super) fn of(
        synchronous: Synchronous,
        path: &Path,
        committed: &Arc<Notify>,
        writer: mpsc::WeakSender<Job>,
    ) -> Result<Durability> {
        Ok(match synchronous {
            Synchronous::Normal => Durability::Normal,
            Synchronous::Full => {
                Durability::Pipelined(Syncer::start(path, committed.clone(), writer)?)
            }
        })
    }

    /// How far the committed groups are durable, where that is not at their commit.
    pub(super) fn horizon(&self) -> Option<Arc<Horizon>> {
        match self {
            Durability::Normal => None,
            Durability::Pipelined(syncer) => Some(syncer.horizon().clone()),
        }
    }
}

/// Who the writer tells of its commits.
pub(super) struct Told {
    /// Woken after a group that wrote a change event (the outbox consumer).
    pub committed: Arc<Notify>,
    /// The search pages' text cache, told of the Tasks each group wrote around its COMMIT.
    pub texts: Option<Arc<TextCache>>,
}

/// Starts the writer thread on `conn`, with `checkpointer` told of its commits. The future
/// returned resolves when the thread has ended, and panics with the thread's panic if it
/// panicked, so that `supervise::watch_vital` reports how it ended.
pub(super) fn start(
    conn: Connection,
    checkpointer: Checkpointer,
    durability: Durability,
    jobs: mpsc::Receiver<Job>,
    base_url: String,
    max_batch: usize,
    told: Told,
) -> Result<impl Future<Output = ()> + Send + 'static> {
    spawn_watched("baton-sqlite-writer", move || {
        run_writer(
            conn,
            checkpointer,
            durability,
            jobs,
            &base_url,
            max_batch,
            &told,
        );
    })
}

/// Runs `body` on a new OS thread named `name`, and returns a future that resolves when the
/// thread has ended, by return or by panic; a panic is raised again in the future.
fn spawn_watched(
    name: &str,
    body: impl FnOnce() + Send + 'static,
) -> Result<impl Future<Output = ()> + Send + 'static> {
    let (ended, on_end) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // Dropped when the thread ends, by return or by unwinding.
            let _ended = Ended(Some(ended));
            body();
        })
        .map_err(|e| Error::internal("starting the SQLite writer thread failed", e))?;
    Ok(async move {
        let _ = on_end.await;
        // The thread is past its last statement: joining it waits for no more than its exit.
        let joined = tokio::task::spawn_blocking(move || thread.join()).await;
        if let Ok(Err(panic)) = joined {
            std::panic::resume_unwind(panic);
        }
    })
}

/// Says that a watched thread ended, when dropped at its end.
struct Ended(Option<oneshot::Sender<()>>);

impl Drop for Ended {
    fn drop(&mut self) {
        if let Some(ended) = self.0.take() {
            let _ = ended.send(());
        }
    }
}

/// The jobs received and not yet run, in two lanes. A request waits on the `urgent` lane
/// (Task and subscription writes, answered to an API client); the hub's own bookkeeping
/// (match chunks, delivery results, overdue events, pruning) on `background`.
#[derive(Default)]
struct Waiting {
    urgent: VecDeque<Job>,
    background: VecDeque<Job>,
}

impl Waiting {
    fn push(&mut self, job: Job) {
        if matches!(job.work, Work::Wake) {
            return;
        }
        if job.work.is_urgent() {
            self.urgent.push_back(job);
        } else {
            self.background.push_back(job);
        }
    }

    fn is_empty(&self) -> bool {
        self.urgent.is_empty() && self.background.is_empty()
    }

    /// Takes every job that arrived since the last look, without waiting.
    fn take_arrived(&mut self, jobs: &mut mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.try_recv() {
            self.push(job);
        }
    }
}

impl Work {
    /// Whether an API client waits for this job's answer.
    pub(super) fn is_urgent(&self) -> bool {
        matches!(
            self,
            Work::Task(_)
                | Work::Transaction(_)
                | Work::CreateSubscription(_)
                | Work::ReplaceSubscription(..)
                | Work::DeleteSubscription(_)
        )
    }
}

/// Which lane a group starts with when both have jobs waiting: they take turns, so neither
/// Task writes nor the fan-out can hold the other back for more than one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Urgent,
    Background,
}

impl Lane {
    fn other(self) -> Lane {
        match self {
            Lane::Urgent => Lane::Background,
            Lane::Background => Lane::Urgent,
        }
    }
}

/// The lane a group starts with: the one whose `turn` it is, if it has jobs waiting, else the
/// one that has (at least one of the two has, or there would be no group).
fn first_lane(turn: Lane, urgent: usize, background: usize) -> Lane {
    match turn {
        Lane::Background if background > 0 => Lane::Background,
        _ if urgent > 0 => Lane::Urgent,
        _ => Lane::Background,
    }
}

/// The lane of a group's next job, after `ran` jobs, or None to commit: requests first
/// whenever one waits; background jobs only while the group holds no request (a request's
/// answer waits for the commit, so nothing more is put before it); never past `max_batch`.
fn next_lane(
    ran: usize,
    max_batch: usize,
    holds_request: bool,
    urgent: usize,
    background: usize,
) -> Option<Lane> {
    if ran >= max_batch {
        None
    } else if urgent > 0 {
        Some(Lane::Urgent)
    } else if holds_request || background == 0 {
        None
    } else {
        Some(Lane::Background)
    }
}

/// The writer loop: group commit of what is waiting, one transaction per group.
///
/// A group is filled while it runs, a job at a time: after each job the writer looks at what
/// arrived, and a request that arrives while a background job runs joins the open
/// transaction right after it. Once a group holds a request, only requests follow, and it
/// commits as soon as none is waiting, so a Task write waits at most for the background job
/// running when it arrived (one chunk of `hub.fanout_chunk` matches, or one batch of delivery
/// results) and one commit — never for a queue of fan-out work ahead of it.
///
/// With `Durability::Pipelined`, every group commits without a sync and the syncer answers
/// it once its frames are synced, while this thread runs the next group: a request never
/// waits on this thread for the fsync of a fan-out chunk or of delivery results. (That sync
/// once ran here, with SQLite's `synchronous = FULL`, because deliveries read the hub's
/// writes as soon as they commit; they now wait for the syncer instead, `syncer::Horizon`.)
fn run_writer(
    mut conn: Connection,
    checkpointer: Checkpointer,
    durability: Durability,
    mut jobs: mpsc::Receiver<Job>,
    base_url: &str,
    max_batch: usize,
    told: &Told,
) {
    let committed = &*told.committed;
    let texts = told.texts.as_deref();
    let mut waiting = Waiting::default();
    let mut turn = Lane::Urgent;
    // The syncer answers every group (the connection commits with `synchronous = NORMAL`,
    // `connect`).
    let syncer = match &durability {
        Durability::Pipelined(syncer) => Some(syncer),
        Durability::Normal => None,
    };
    loop {
        if waiting.is_empty() {
            match jobs.blocking_recv() {
                Some(job) => waiting.push(job),
                None => break,
            }
        }
        waiting.take_arrived(&mut jobs);
        let first = first_lane(turn, waiting.urgent.len(), waiting.background.len());
        // The other lane goes first next time, if it has anything waiting.
        turn = first.other();
        let started = std::time::Instant::now();
        let mut group = Group::new(
            &mut conn,
            &mut jobs,
            &mut waiting,
            base_url,
            max_batch,
            syncer,
            texts,
        );
        let committed_group = group.run(first);
        let Group {
            replies,
            wrote,
            lanes,
            number,
            ..
        } = group;
        let size = replies.len();
        let mut answered_here = true;
        match committed_group {
            Ok(outcomes) => {
                checkpointer.committed();
                match (syncer, number) {
                    (Some(syncer), Some(number)) => {
                        syncer.hand_over(Committed {
                            replies,
                            outcomes,
                            wrote,
                            number,
                        });
                        answered_here = false;
                    }
                    _ => {
                        for (reply, outcome) in replies.into_iter().zip(outcomes) {
                            let _ = reply.send(outcome);
                        }
                    }
                }
            }
            Err(e) => {
                // A full disk or an unavailable database was logged (sparingly) where it was
                // classified; anything else is a fault worth a line per batch.
                if e.as_client().is_none() {
                    tracing::error!(error = %crate::error::error_chain(&e), batch = size, "commit failed");
                }
                for reply in replies {
                    let _ = reply.send(Err(e.for_another_request()));
                }
                // A COMMIT that failed after the group was numbered: nothing of it is
                // visible, but the horizon must still pass its number.
                if let (Some(syncer), Some(number)) = (syncer, number) {
                    syncer.hand_over(Committed {
                        replies: Vec::new(),
                        outcomes: Vec::new(),
                        wrote: false,
                        number,
                    });
                }
            }
        }
        metrics::histogram!("baton_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("baton_store_commit_batch_size").record(size as f64);
        // Whether requests shared their commit with the hub's bookkeeping: a request in a
        // "both" group waited for a fan-out chunk or delivery results and their pages.
        let kind = match lanes {
            (true, true) => "both",
            (true, false) => "requests",
            (false, _) => "hub",
        };
        metrics::counter!("baton_writer_groups_total", "lanes" => kind).increment(1);
        // Task writes and overdue events feed the outbox consumer (woken by the syncer for
        // the groups it answers, once they are durable).
        if wrote && answered_here {
            committed.notify_one();
        }
    }
    // The queue is closed: answer what waits for a sync, then fold the WAL back into the
    // database so the file is self-contained, once the checkpointer has stopped.
    drop(durability);
    drop(checkpointer);
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
    drop(conn);
}

/// One group commit in the making.
struct Group<'a> {
    conn: &'a mut Connection,
    jobs: &'a mut mpsc::Receiver<Job>,
    waiting: &'a mut Waiting,
    base_url: &'a str,
    max_batch: usize,
    /// The syncer that will answer this group (`Durability::Pipelined`): a group holding
    /// requests stays open for more while the syncer is still syncing earlier groups.
    syncer: Option<&'a Syncer>,
    /// Where to answer each job run so far, in order.
    replies: Vec<oneshot::Sender<Result<Done>>>,
    /// The AuditEvents of the jobs that succeeded so far, in order: the Task writes', the
    /// delivery attempts', the audit queue's. They are inserted together, in a few multi-row
    /// INSERTs just before the commit and outside every job's savepoint, so that an
    /// AuditEvent costs its write neither a statement of its own nor the copies of the audit
    /// table's and indexes' pages into each job's statement journal (BENCHMARKS.md, "The
    /// audit trail's cost"). A job that failed was rolled back and adds none; an insert that
    /// fails fails the whole group, so a change never commits without its AuditEvent.
    audits: Vec<AuditRecord>,
    /// Whether a job wrote a change event (a Task write, an overdue event), which the outbox
    /// consumer is woken for once the group commits.
    wrote: bool,
    /// Whether the group ran a request, and whether it ran a hub job.
    lanes: (bool, bool),
    /// Its number for the syncer's horizon, taken just before its COMMIT.
    number: Option<u64>,
    /// The search pages' cache of Task texts, told of the Tasks the group wrote around its
    /// COMMIT (`TextCache::before_commit`, `after_commit`).
    texts: Option<&'a TextCache>,
    /// The Tasks the group wrote, once its COMMIT has been tried.
    written: Vec<TaskId>,
    /// Whether no job has run in the group's transaction yet, or only jobs that failed and
    /// were undone: the next job then needs no savepoint (`Group::guarded`).
    clean: bool,
}

impl<'a> Group<'a> {
    /// A group about to run on `conn`, taking jobs from `waiting` (and `jobs` as they
    /// arrive): nothing run, answered or written yet.
    fn new(
        conn: &'a mut Connection,
        jobs: &'a mut mpsc::Receiver<Job>,
        waiting: &'a mut Waiting,
        base_url: &'a str,
        max_batch: usize,
        syncer: Option<&'a Syncer>,
        texts: Option<&'a TextCache>,
    ) -> Group<'a> {
        Group {
            conn,
            jobs,
            waiting,
            base_url,
            max_batch,
            syncer,
            replies: Vec::with_capacity(max_batch),
            audits: Vec::new(),
            wrote: false,
            lanes: (false, false),
            number: None,
            texts,
            written: Vec::new(),
            clean: false,
        }
    }
}

impl Group<'_> {
    /// Runs the group in one transaction, starting with the `first` lane, and commits it;
    /// each job in its own savepoint, so one bad request does not undo the others.
    fn run(&mut self, first: Lane) -> Result<Vec<Result<Done>>> {
        let committed = self.run_jobs(first);
        if committed.is_err() && !self.conn.is_autocommit() {
            // Whatever failed — a statement between the jobs or the commit — no transaction
            // may stay open, or every later group would fail to begin. (SQLite ends the
            // transaction by itself on a full disk and on I/O errors.)
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        if let Some(texts) = self.texts
            && !self.written.is_empty()
        {
            texts.after_commit(&self.written);
        }
        committed
    }

    fn run_jobs(&mut self, first: Lane) -> Result<Vec<Result<Done>>> {
        execute(self.conn, "BEGIN IMMEDIATE")?;
        // What an earlier group wrote before it failed was rolled back.
        super::tasks::take_written();
        self.clean = true;
        let mut outcomes = Vec::new();
        let mut holds_request = false;
        let mut lane = Some(first);
        while let Some(next) = lane {
            let queue = match next {
                Lane::Urgent => &mut self.waiting.urgent,
                Lane::Background => &mut self.waiting.background,
            };
            let Some(job) = queue.pop_front() else { break };
            holds_request |= next == Lane::Urgent;
            match next {
                Lane::Urgent => self.lanes.0 = true,
                Lane::Background => self.lanes.1 = true,
            }
            let creates = self.plain_creates(job);
            if creates.len() > 1 {
                outcomes.extend(self.run_creates(creates)?);
            } else {
                for job in creates {
                    let changes = self.changes(job);
                    if changes.len() > 1 {
                        outcomes.extend(self.run_changes(changes)?);
                    } else {
                        for job in changes {
                            let outcome = self.run_one(job)?;
                            outcomes.push(outcome);
                        }
                    }
                }
            }
            self.waiting.take_arrived(self.jobs);
            lane = next_lane(
                self.replies.len(),
                self.max_batch,
                holds_request,
                self.waiting.urgent.len(),
                self.waiting.background.len(),
            );
            if lane.is_none() && holds_request && self.replies.len() < self.max_batch {
                lane = self.await_sync();
            }
        }
        super::tasks::insert_audits(self.conn, &self.audits)?;
        // Numbered before the COMMIT makes it visible: a reader that saw any of it and then
        // reads the horizon's count waits for this group's sync (`Horizon::reached`).
        self.number = self.syncer.map(|s| s.horizon().committing());
        // Every Task the group wrote (rolled-back jobs' too) leaves the text cache before the
        // COMMIT makes its new version visible, and again after it (`Group::run`).
        self.written = super::tasks::take_written();
        if let Some(texts) = self.texts
            && !self.written.is_empty()
        {
            texts.before_commit(&self.written);
        }
        execute(self.conn, "COMMIT")?;
        Ok(outcomes)
    }

    /// Runs one job in its own savepoint, and keeps its AuditEvents for the group's insert.
    fn run_one(&mut self, job: Job) -> Result<Result<Done>> {
        self.replies.push(job.reply);
        let mut work = job.work;
        let audits = match &mut work {
            Work::RecordDeliveries(_, attempts) => std::mem::take(attempts),
            Work::RecordAudits(records) => std::mem::take(records),
            _ => Vec::new(),
        };
        let outcome = self.run_job(work, job.trace)?;
        if let Ok(done) = &outcome {
            self.audits.extend(audits);
            if let Some(audit) = &job.audit {
                push_task_changes(&mut self.audits, audit, done);
            }
        }
        self.wrote |= matches!(
            outcome,
            Ok(Done::Task(WriteOutcome::Written(_)) | Done::Deleted(true))
        ) || matches!(&outcome, Ok(Done::Transaction(outcomes))
            if outcomes.iter().any(|o| matches!(o, WriteOutcome::Written(_))));
        Ok(outcome)
    }

    /// `job` and, when it is a request's plain create (`write::is_single_put`), the plain
    /// creates queued right behind it: the creates of a burst of POSTs, which `run_creates`
    /// writes together. Any other job comes alone.
    fn plain_creates(&mut self, job: Job) -> Vec<Job> {
        self.run_of(job, is_plain_create)
    }

    /// `job` and, when it is a request's change of one Task (`TaskWrite::Change`: an update,
    /// a patch, a delete), the changes queued right behind it: the writes of a burst of PUTs,
    /// which `run_changes` writes together. Any other job comes alone.
    fn changes(&mut self, job: Job) -> Vec<Job> {
        self.run_of(job, is_change)
    }

    /// `job` and, when it is of the kind `alike` tells, the jobs of that kind queued right
    /// behind it, in order, as far as the group has room.
    fn run_of(&mut self, job: Job, alike: fn(&Job) -> bool) -> Vec<Job> {
        let mut run = vec![job];
        if !alike(&run[0]) {
            return run;
        }
        self.waiting.take_arrived(self.jobs);
        while self.replies.len() + run.len() < self.max_batch {
            match self.waiting.urgent.pop_front() {
                Some(job) if alike(&job) => run.push(job),
                Some(other) => {
                    self.waiting.urgent.push_front(other);
                    break;
                }
                None => break,
            }
        }
        run
    }

    /// Runs requests' changes of single Tasks (two or more, in the order queued) as `run_one`
    /// would, one after another, except that the plain puts among them
    /// (`write::Decided::Plain`: an update that changes its Task alone) are written together
    /// under one savepoint (or none, `guarded`) rather than one each: a savepoint copies every page its job
    /// touches into the statement journal, and a run of updates touches mostly the same pages
    /// (the version, outbox and index tails), which on single PUTs was a fifth of the writer's
    /// time (BENCHMARKS.md, issue 15, tenth sitting).
    ///
    /// Each change is decided on its Task as it stands (reads only, outside any savepoint);
    /// a plain put is then held back with the others, and anything else — a delete, a put
    /// with effects on other Tasks, a refusal — first has the held puts written, then is
    /// written in a savepoint of its own, so every write still comes in queue order and sees
    /// the ones before it. A change of a Task whose put is held is decided once that put is
    /// written. Should the held puts fail together, their savepoint is rolled back and each
    /// is written alone in a savepoint of its own, as any job is, so that what fails one
    /// fails that one only.
    fn run_changes(&mut self, changes: Vec<Job>) -> Result<Vec<Result<Done>>> {
        let base_url = self.base_url;
        let mut outcomes: Vec<Option<Result<Done>>> = Vec::with_capacity(changes.len());
        let mut held: Vec<HeldPut> = Vec::new();
        for job in changes {
            self.replies.push(job.reply);
            let slot = outcomes.len();
            outcomes.push(None);
            let Work::Task(TaskWrite::Change { id, decide }) = job.work else {
                outcomes[slot] = Some(Err(not_a_change()));
                continue;
            };
            if held.iter().any(|h| h.next.id() == &id) {
                self.write_held(std::mem::take(&mut held), &mut outcomes)?;
            }
            let conn = &mut *self.conn;
            // Decided one by one: a bug that panics here fails its own request only.
            let decided = std::panic::catch_unwind(AssertUnwindSafe(|| {
                block_on(in_trace(
                    job.trace,
                    write::decide_change(conn, id, decide, base_url),
                ))
            }))
            .unwrap_or_else(|panic| Err(panicked(panic.as_ref())));
            match decided {
                Ok(Decided::Plain(next)) => held.push(HeldPut {
                    slot,
                    next,
                    trace: job.trace,
                    audit: job.audit,
                }),
                Ok(Decided::Other {
                    id,
                    current,
                    decision,
                }) => {
                    self.write_held(std::mem::take(&mut held), &mut outcomes)?;
                    let written = self.guarded(|conn| {
                        block_on(in_trace(
                            job.trace,
                            write::write_decided(conn, &id, current, decision, base_url),
                        ))
                    })?;
                    outcomes[slot] = Some(self.settle(written, job.audit.as_deref()));
                }
                Err(e) => {
                    if self.conn.is_autocommit() {
                        // SQLite ended the whole transaction: see `in_savepoint`.
                        return Err(e.for_another_request());
                    }
                    outcomes[slot] = Some(Err(e));
                }
            }
        }
        self.write_held(held, &mut outcomes)?;
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(not_a_change())))
            .collect())
    }

    /// Writes the held plain puts of `run_changes` under one savepoint, or, should that fail,
    /// each alone in a savepoint of its own; their outcomes go to their slots.
    fn write_held(
        &mut self,
        held: Vec<HeldPut>,
        outcomes: &mut [Option<Result<Done>>],
    ) -> Result<()> {
        if held.is_empty() {
            return Ok(());
        }
        let together = self.guarded(|conn| {
            for h in &held {
                // Each change event keeps its own request's trace.
                block_on(in_trace(h.trace, conn.put_version(&h.next.as_new())))?;
            }
            Ok(())
        })?;
        for h in held {
            let written = match &together {
                Ok(()) => Ok(()),
                Err(_) => self.guarded(|conn| {
                    block_on(in_trace(h.trace, conn.put_version(&h.next.as_new())))
                })?,
            };
            let outcome = written.map(|()| h.next.written());
            if let Some(slot) = outcomes.get_mut(h.slot) {
                *slot = Some(self.settle(outcome, h.audit.as_deref()));
            }
        }
        Ok(())
    }

    /// A Task write's outcome, its AuditEvents kept for the group's insert.
    fn settle(
        &mut self,
        outcome: Result<WriteOutcome>,
        audit: Option<&RequestAudit>,
    ) -> Result<Done> {
        let outcome = outcome.map(Done::Task);
        if let (Ok(done), Some(audit)) = (&outcome, audit) {
            push_task_changes(&mut self.audits, audit, done);
        }
        self.wrote |= matches!(outcome, Ok(Done::Task(WriteOutcome::Written(_))));
        outcome
    }

    /// Runs requests' plain creates (two or more, in the order queued) as a transaction's
    /// creates are run: each Task's version worked out, then all of their rows in the few
    /// multi-row INSERTs of `tasks::insert_new_tasks`, under one savepoint, instead of a
    /// savepoint and five or more statements for each (a savepoint copies every page a job
    /// touches into its journal; on single POSTs that and the statements were most of the
    /// writer's time, BENCHMARKS.md). Each change event keeps its own request's trace. Should
    /// the insert fail, its savepoint is rolled back and each create is written alone in a
    /// savepoint of its own, as any job is, so that what fails one create fails that one only.
    fn run_creates(&mut self, creates: Vec<Job>) -> Result<Vec<Result<Done>>> {
        let base_url = self.base_url;
        let mut made = Vec::with_capacity(creates.len());
        for job in creates {
            self.replies.push(job.reply);
            let Work::Task(write) = job.work else {
                made.push((Err(not_a_create()), job.trace, job.audit));
                continue;
            };
            // Worked out one by one: a bug that panics here fails its own request only.
            let version = std::panic::catch_unwind(AssertUnwindSafe(|| {
                write::first_version(write, base_url).map_err(|_| not_a_create())
            }))
            .unwrap_or_else(|panic| Err(panicked(panic.as_ref())));
            made.push((version, job.trace, job.audit));
        }
        let rows: Vec<_> = made
            .iter()
            .filter_map(|(version, trace, _)| {
                let next = version.as_ref().ok()?;
                Some((next.as_new(), trace.map(|t| t.header())))
            })
            .collect();
        let (versions, traces): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
        let together =
            self.guarded(|conn| super::tasks::insert_new_tasks(conn, &versions, &traces))?;
        drop(versions);
        let mut outcomes = Vec::with_capacity(made.len());
        for (version, trace, audit) in made {
            let outcome = match version {
                Err(e) => Err(e),
                Ok(next) => {
                    let written = match &together {
                        Ok(()) => Ok(()),
                        // Each alone, in the trace of its own request.
                        Err(_) => self.guarded(|conn| {
                            block_on(in_trace(trace, conn.put_version(&next.as_new())))
                        })?,
                    };
                    written.map(|()| Done::Task(next.written()))
                }
            };
            if let (Ok(done), Some(audit)) = (&outcome, &audit) {
                push_task_changes(&mut self.audits, audit, done);
            }
            self.wrote |= outcome.is_ok();
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Before a group of requests commits without a sync: while the syncer still syncs
    /// earlier groups, waits for it, taking in the requests that arrive meanwhile (`Some`
    /// lane: run them in this group). Committing at once would only queue this group behind
    /// that sync, and cut the next arrivals' group small: one commit, with its pages, for
    /// every request or two.
    fn await_sync(&mut self) -> Option<Lane> {
        let syncer = self.syncer?;
        // Until the syncer is done, sleep until a job arrives: a request (run it in this
        // group), hub work (it waits for the next group), or the syncer's `Work::Wake`.
        while !syncer.synced_or_wake_me() {
            let job = self.jobs.blocking_recv()?;
            self.waiting.push(job);
            self.waiting.take_arrived(self.jobs);
            if !self.waiting.urgent.is_empty() {
                return Some(Lane::Urgent);
            }
        }
        None
    }

    /// Runs one job in its own savepoint. The outer error is the transaction's (SQLite ended
    /// it); the inner one the job's alone, rolled back to its savepoint.
    fn run_job(&mut self, work: Work, trace: Option<TraceContext>) -> Result<Result<Done>> {
        let base_url = self.base_url;
        self.guarded(|conn| block_on(in_trace(trace, apply_work(conn, work, base_url))))
    }
}

impl Group<'_> {
    /// Runs `body`, one job of the group (or the jobs written together), so that what it
    /// writes is undone should it fail, without undoing the jobs before it: in a savepoint of
    /// its own (`in_savepoint`), or, while the transaction is clean (nothing run in it yet but
    /// jobs undone), without one, a failure then rolling the whole transaction back and
    /// beginning it again, which undoes nothing else. A savepoint copies every page its job
    /// changes into the statement journal first, which was a sixth of the writer's time on
    /// single creates and a fifth on single updates (BENCHMARKS.md, issue 15, tenth sitting);
    /// under load a group is mostly one job or one run of creates or changes written
    /// together, which now goes without it. The outer error is the transaction's.
    fn guarded<T>(&mut self, body: impl FnOnce(&mut Connection) -> Result<T>) -> Result<Result<T>> {
        if !self.clean {
            return in_savepoint(self.conn, body);
        }
        let conn = &mut *self.conn;
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| body(&mut *conn)))
            .unwrap_or_else(|panic| Err(panicked(panic.as_ref())));
        match &outcome {
            Ok(_) => self.clean = false,
            Err(e) => {
                if self.conn.is_autocommit() {
                    // SQLite ended the transaction itself (a full disk, an I/O error).
                    return Err(e.for_another_request());
                }
                execute(self.conn, "ROLLBACK")?;
                execute(self.conn, "BEGIN IMMEDIATE")?;
            }
        }
        Ok(outcome)
    }
}

/// Runs `body` in a savepoint of its own. The outer error is the transaction's (SQLite ended
/// it); the inner one `body`'s alone, whose writes were rolled back to the savepoint. A body
/// that panics (a bug in a decision or in building rows) fails alone in the same way, and the
/// writer goes on.
fn in_savepoint<T>(
    conn: &mut Connection,
    body: impl FnOnce(&mut Connection) -> Result<T>,
) -> Result<Result<T>> {
    execute(conn, "SAVEPOINT job")?;
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| body(&mut *conn)))
        .unwrap_or_else(|panic| Err(panicked(panic.as_ref())));
    if let Err(e) = &outcome {
        if conn.is_autocommit() {
            // SQLite ended the whole transaction (it may, on a full disk or an I/O error):
            // the jobs before this one are undone too, and share its answer.
            return Err(e.for_another_request());
        }
        execute(conn, "ROLLBACK TO job")?;
    }
    execute(conn, "RELEASE job")?;
    Ok(outcome)
}

/// The answer to a write that panicked, counted.
fn panicked(panic: &(dyn std::any::Any + Send)) -> Error {
    metrics::counter!("baton_write_job_panics_total").increment(1);
    Error::internal(
        "a write panicked and was rolled back",
        supervise::panic_message(panic),
    )
}

/// Whether a job is a request's plain create (`write::is_single_put`), which `run_creates`
/// writes together with its neighbours'.
fn is_plain_create(job: &Job) -> bool {
    matches!(&job.work, Work::Task(write) if write::is_single_put(write))
}

fn not_a_create() -> Error {
    Error::internal("writing creates together", "a job was not a plain create")
}

/// Whether a job is a request's change of one Task, which `run_changes` runs with its
/// neighbours'.
fn is_change(job: &Job) -> bool {
    matches!(&job.work, Work::Task(TaskWrite::Change { .. }))
}

fn not_a_change() -> Error {
    Error::internal(
        "writing changes together",
        "a job was not a change of one Task",
    )
}

/// A plain put of `Group::run_changes`, decided and held until the puts around it are
/// written together.
struct HeldPut {
    /// Its place among the run's outcomes.
    slot: usize,
    next: Box<write::NextVersion>,
    trace: Option<TraceContext>,
    audit: Option<Arc<RequestAudit>>,
}

/// The AuditEvents of the Task versions a job wrote (`done`), made from the facts of the
/// request that submitted it, in the order written.
fn push_task_changes(audits: &mut Vec<AuditRecord>, audit: &RequestAudit, done: &Done) {
    let written = match done {
        Done::Task(outcome) => std::slice::from_ref(outcome),
        Done::Transaction(outcomes) => outcomes.as_slice(),
        _ => return,
    };
    audits.extend(written.iter().filter_map(|outcome| match outcome {
        WriteOutcome::Written(v) => {
            Some(audit.task_change(&v.id, v.version, v.interaction, &v.last_updated))
        }
        WriteOutcome::Existing(_) | WriteOutcome::Unchanged => None,
    }));
}

/// Runs one of the writer's fixed statements (transaction control), prepared once.
fn execute(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

async fn apply_work(conn: &mut Connection, work: Work, base_url: &str) -> Result<Done> {
    match work {
        Work::Task(task) => write::apply(conn, task, base_url).await.map(Done::Task),
        Work::Transaction(writes) => write::apply_transaction(conn, writes, base_url)
            .await
            .map(Done::Transaction),
        Work::CreateSubscription(record) => subscriptions::create(conn, *record)
            .await
            .map(|s| Done::Subscription(Box::new(s))),
        Work::ReplaceSubscription(id, decide) => subscriptions::replace(conn, &id, decide)
            .await
            .map(|s| Done::Subscription(Box::new(s))),
        Work::DeleteSubscription(id) => subscriptions::delete(conn, &id).await.map(Done::Deleted),
        Work::RecordMatches(batch) => hub::record_matches(conn, batch).map(Done::Numbers),
        // The attempts' AuditEvents were taken for the group's audit insert.
        Work::RecordDeliveries(reports, _) => {
            hub::record_deliveries(conn, reports).map(|()| Done::Nothing)
        }
        Work::FillMatchingForms(forms) => {
            super::subscriptions::fill_matching_forms(conn, &forms).map(|()| Done::Nothing)
        }
        Work::PruneEvents(before) => hub::prune_events(conn, &before).map(Done::Count),
        // Its AuditEvents were taken for the group's audit insert.
        Work::RecordAudits(_) => Ok(Done::Nothing),
        Work::PruneAudit(before) => conn
            .prepare_cached("DELETE FROM audit_event WHERE recorded < ?")?
            .execute([&before])
            .map(|n| Done::Count(n as u64))
            .map_err(Into::into),
        Work::RestartDelivery { id, from } => {
            hub::restart_delivery(conn, &id, from).map(|restarted| match restarted {
                Some(stored) => Done::Subscription(Box::new(stored)),
                None => Done::Nothing,
            })
        }
        Work::MarkOverdue {
            task_id,
            due_at,
            now,
        } => hub::mark_overdue(conn, &task_id, &due_at, &now).map(Done::Deleted),
        // Never queued as work (`Waiting::push` drops it): only wakes the writer.
        Work::Wake => Ok(Done::Nothing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervise::{Health, TaskState};
    use tokio_util::sync::CancellationToken;

    #[test]
    fn a_group_starts_with_the_lane_whose_turn_it_is_if_it_has_work() {
        use Lane::{Background, Urgent};
        // (turn, urgent waiting, background waiting, first lane)
        let cases = [
            (Urgent, 3, 5, Urgent),
            (Background, 3, 5, Background),
            (Background, 3, 0, Urgent),
            (Urgent, 0, 5, Background),
            (Background, 0, 5, Background),
        ];
        for (turn, urgent, background, first) in cases {
            assert_eq!(
                first_lane(turn, urgent, background),
                first,
                "turn {turn:?}, {urgent} urgent, {background} background"
            );
        }
    }

    #[test]
    fn requests_join_a_running_group_and_nothing_is_put_before_their_commit() {
        use Lane::{Background, Urgent};
        // (name, jobs run, holds a request, urgent waiting, background waiting, next)
        let cases = [
            (
                "a request arriving during fan-out joins the group",
                1,
                false,
                1,
                9,
                Some(Urgent),
            ),
            (
                "requests keep joining while they arrive",
                2,
                true,
                1,
                9,
                Some(Urgent),
            ),
            (
                "a group with a request commits once none waits",
                2,
                true,
                0,
                9,
                None,
            ),
            (
                "background work fills a group without requests",
                1,
                false,
                0,
                9,
                Some(Background),
            ),
            ("an empty queue commits", 1, false, 0, 0, None),
            (
                "the batch bound commits whatever waits",
                64,
                false,
                5,
                9,
                None,
            ),
        ];
        for (name, ran, holds_request, urgent, background, next) in cases {
            assert_eq!(
                next_lane(ran, 64, holds_request, urgent, background),
                next,
                "{name}"
            );
        }
    }

    /// Plain creates queued together are written in one group as one (`run_creates`): each
    /// answered with its own version, their change events in queue order with each request's
    /// own trace. One that cannot be written (here a second create of one id) fails alone:
    /// the creates around it are written, and the Task it collided with is left as it was.
    #[tokio::test]
    async fn creates_queued_together_are_written_together_and_one_that_fails_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        use crate::store::Store;
        let store = super::super::SqliteStore::open(
            &path,
            "http://baton.test/fhir",
            &crate::config::StoreConfig::default(),
            Arc::new(Notify::new()),
            Arc::new(Health::default()),
        )
        .await
        .unwrap();
        store.close().await;
        let mut conn = connect(&path).unwrap();
        let (_sender, mut receiver) = mpsc::channel(1);
        let mut waiting = Waiting::default();
        let ids: Vec<TaskId> = (0..6).map(|_| TaskId::generate()).collect();
        // The fifth create reuses the second's id.
        let queued: Vec<(TaskId, TraceContext)> = (0..6)
            .map(|i| {
                let id = if i == 4 {
                    ids[1].clone()
                } else {
                    ids[i].clone()
                };
                (id, TraceContext::new_root())
            })
            .collect();
        let mut answers = Vec::new();
        for (i, (id, trace)) in queued.iter().enumerate() {
            let (reply, answer) = oneshot::channel();
            answers.push(answer);
            let resource = serde_json::json!({
                "resourceType": "Task", "status": "requested", "intent": "order",
                "description": format!("create {i}"),
            });
            waiting.urgent.push_back(Job {
                work: Work::Task(TaskWrite::Create {
                    id: id.clone(),
                    resource,
                    staged: None,
                }),
                reply,
                trace: Some(*trace),
                audit: None,
            });
        }
        let mut group = Group::new(
            &mut conn,
            &mut receiver,
            &mut waiting,
            "http://baton.test/fhir",
            256,
            None,
            None,
        );
        let outcomes = group.run(Lane::Urgent).expect("the group commits");
        assert!(group.wrote);
        assert_eq!(outcomes.len(), 6);
        for (i, outcome) in outcomes.iter().enumerate() {
            match (i, outcome) {
                (4, Err(_)) => {}
                (4, Ok(_)) => panic!("a second create of one id was written"),
                (_, Ok(Done::Task(WriteOutcome::Written(v)))) => {
                    assert_eq!(v.id, queued[i].0);
                    assert_eq!(v.version, crate::fhir::ids::Version::FIRST);
                }
                (_, other) => panic!("create {i} was not written: {:?}", other.as_ref().err()),
            }
        }
        // In queue order, each with its own request's trace; none for the failed create.
        let mut select = conn
            .prepare("SELECT resource_id, traceparent FROM change_event ORDER BY seq")
            .unwrap();
        let events: Vec<(String, Option<String>)> = select
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let expected: Vec<(String, Option<String>)> = queued
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 4)
            .map(|(_, (id, trace))| (id.to_string(), Some(trace.header())))
            .collect();
        assert_eq!(events, expected);
        let description: String = conn
            .query_row(
                "SELECT json_extract(resource, '$.description') FROM task WHERE id = ?",
                [ids[1].as_str()],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(
            description, "create 1",
            "the Task collided with is left as it was"
        );
    }

    /// Changes queued together are run in one group with their plain puts written together
    /// (`run_changes`), and each is answered as if it had run alone, in queue order: a second
    /// update of one Task sees the first, a refused change and a delete go as they would alone
    /// and a change of a Task that does not exist creates it, each change event in queue order
    /// with its own request's trace.
    #[tokio::test]
    async fn changes_queued_together_are_answered_as_each_alone() {
        use crate::store::{CurrentTask, Decide, Decision, Interaction, Store};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        let store = super::super::SqliteStore::open(
            &path,
            "http://baton.test/fhir",
            &crate::config::StoreConfig::default(),
            Arc::new(Notify::new()),
            Arc::new(Health::default()),
        )
        .await
        .unwrap();
        store.close().await;
        let mut conn = connect(&path).unwrap();
        let (_sender, mut receiver) = mpsc::channel(1);
        let ids: Vec<TaskId> = (0..4).map(|_| TaskId::generate()).collect();
        let task = |description: &str| {
            serde_json::json!({
                "resourceType": "Task", "status": "requested", "intent": "order",
                "description": description,
            })
        };
        let run = |conn: &mut Connection, receiver: &mut mpsc::Receiver<Job>, jobs: Vec<Job>| {
            let mut waiting = Waiting::default();
            waiting.urgent.extend(jobs);
            let mut group = Group::new(
                conn,
                receiver,
                &mut waiting,
                "http://baton.test/fhir",
                256,
                None,
                None,
            );
            group.run(Lane::Urgent).expect("the group commits")
        };
        let job = |work: Work, trace: Option<TraceContext>| Job {
            work,
            reply: oneshot::channel().0,
            trace,
            audit: None,
        };
        // Tasks 0, 1 and 2 exist; 3 does not.
        let creates = ids[..3]
            .iter()
            .map(|id| {
                let write = TaskWrite::Create {
                    id: id.clone(),
                    resource: task("v1"),
                    staged: None,
                };
                job(Work::Task(write), None)
            })
            .collect();
        run(&mut conn, &mut receiver, creates);
        let put = |description: &'static str| -> Decide {
            Box::new(move |current: Option<&CurrentTask>| {
                let mut resource = task(description);
                if let Some(current) = current {
                    resource["id"] = current.id.as_str().into();
                    // What it saw: the second update of a Task must see the first.
                    resource["note"] = serde_json::json!([{ "text": format!(
                        "after version {}", current.version
                    ) }]);
                }
                Ok(Decision::Put(Arc::new(resource)))
            })
        };
        let refuse: Decide =
            Box::new(|_| Err(crate::error::Error::precondition_failed("not this version")));
        let delete: Decide = Box::new(|_| Ok(Decision::Delete));
        let changes: Vec<(TaskId, Decide)> = vec![
            (ids[0].clone(), put("update 0")),
            (ids[1].clone(), put("update 1")),
            (ids[0].clone(), put("update 0 again")),
            (ids[2].clone(), refuse),
            (ids[1].clone(), delete),
            (ids[3].clone(), put("created by a put")),
            (ids[2].clone(), put("update 2")),
        ];
        let traces: Vec<TraceContext> = changes.iter().map(|_| TraceContext::new_root()).collect();
        let jobs = changes
            .into_iter()
            .zip(&traces)
            .map(|((id, decide), trace)| {
                job(Work::Task(TaskWrite::Change { id, decide }), Some(*trace))
            })
            .collect();
        let outcomes = run(&mut conn, &mut receiver, jobs);
        let expected = [
            (0, 2, Interaction::Update),
            (1, 2, Interaction::Update),
            (0, 3, Interaction::Update),
            (2, 0, Interaction::Update),
            (1, 3, Interaction::Delete),
            (3, 1, Interaction::Create),
            (2, 2, Interaction::Update),
        ];
        assert_eq!(outcomes.len(), expected.len());
        for (i, (outcome, (task, version, interaction))) in
            outcomes.iter().zip(expected).enumerate()
        {
            match outcome {
                Err(e) if i == 3 => {
                    assert_eq!(e.status(), axum::http::StatusCode::PRECONDITION_FAILED)
                }
                Ok(Done::Task(WriteOutcome::Written(v))) => {
                    assert_eq!(v.id, ids[task], "change {i}");
                    assert_eq!(v.version.get(), version, "change {i}");
                    assert_eq!(v.interaction, interaction, "change {i}");
                }
                other => panic!("change {i}: {:?}", other.as_ref().err()),
            }
        }
        let note: String = conn
            .query_row(
                "SELECT json_extract(resource, '$.note[0].text') FROM task WHERE id = ?",
                [ids[0].as_str()],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(note, "after version 2", "the second update saw the first");
        let mut select = conn
            .prepare("SELECT resource_id, version, traceparent FROM change_event WHERE traceparent IS NOT NULL ORDER BY seq")
            .unwrap();
        let events: Vec<(String, i64, String)> = select
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let written: Vec<(String, i64, String)> = expected
            .iter()
            .zip(&traces)
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, ((task, version, _), trace))| {
                (ids[*task].to_string(), *version, trace.header())
            })
            .collect();
        assert_eq!(events, written);
        let versions: i64 = conn
            .query_row("SELECT count(*) FROM task_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(versions, 3 + 6);
    }

    /// A writer thread that dies before the node stops is reported as a dead vital task, with
    /// its panic; one that ends with the shutdown is simply stopped.
    #[tokio::test]
    async fn the_end_of_a_watched_thread_reaches_its_supervisor() {
        let health = Arc::new(Health::default());
        let died = spawn_watched("doomed-writer", || panic!("the writer thread broke")).unwrap();
        supervise::watch_vital(health.clone(), "writer", CancellationToken::new(), died).await;
        let writer = health.snapshot()["writer"].clone();
        assert_eq!(writer.state, TaskState::Failed);
        assert!(
            writer
                .last_error
                .is_some_and(|e| e.contains("the writer thread broke")),
            "{:?}",
            health.snapshot()
        );

        let health = Arc::new(Health::default());
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let stopping = spawn_watched("stopping-writer", move || {
            let _ = wait.recv();
        })
        .unwrap();
        let stop = CancellationToken::new();
        let watched = tokio::spawn(supervise::watch_vital(
            health.clone(),
            "writer",
            stop.clone(),
            stopping,
        ));
        tokio::task::yield_now().await;
        assert!(!watched.is_finished(), "the future waits for the thread");
        stop.cancel();
        release.send(()).unwrap();
        watched.await.unwrap();
        assert_eq!(health.snapshot()["writer"].state, TaskState::Stopped);
    }
}
