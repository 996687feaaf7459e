//! The rules of a Task write, once for both stores.
//!
//! What a `WriteRequest` means is decided here: a conditional create answered by the Task its
//! criteria find, the decision dispatch (put, delete, keep), and a request Task whose
//! completion changes its focal Task in the same transaction. Each backend supplies only its
//! statements, through `Precheck` (If-None-Exist evaluated before the write, outside any
//! transaction) and `TaskTx` (the reads and writes inside its transaction: SQLite's writer
//! savepoint, a PostgreSQL transaction with row locks). A rule changed here therefore holds
//! on both backends, and each keeps its own SQL and its own way of settling concurrency.

use std::sync::Arc;

use serde_json::Value;

use super::{
    CurrentTask, Decide, Decision, Interaction, StoredVersion, WriteOutcome, WriteRequest,
};
use super::{stamp, stamp_instant, stamp_with};
use crate::error::{Error, Result};
use crate::fhir::ids::{StoredInstant, TaskId, Version};
use crate::fhir::search::{Predicate, TaskColumns, TaskIndex, index_task, priority_rank};
use crate::fhir::workflow::bidding;
use crate::fhir::workflow::information::{self, Transition};
use crate::fhir::workflow::{self, RequestKind};

/// What If-None-Exist criteria matched. A search for them asks for two Tasks at most, since
/// two already mean "more than one".
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Found {
    Nothing,
    One(CurrentTask),
    Several,
}

impl Found {
    /// What a search for at most two matching Tasks returned.
    pub(crate) fn among(mut tasks: Vec<CurrentTask>) -> Found {
        match tasks.len() {
            0 => Found::Nothing,
            1 => tasks.pop().map_or(Found::Nothing, Found::One),
            _ => Found::Several,
        }
    }

    /// The answer a conditional create gets from its matches: the Task found (nothing is
    /// written), a 412 for several, or None when the create goes ahead.
    fn answer(self) -> Result<Option<WriteOutcome>> {
        match self {
            Found::Nothing => Ok(None),
            Found::One(task) => Ok(Some(WriteOutcome::Existing(task))),
            Found::Several => Err(Error::precondition_failed(
                "If-None-Exist matches more than one Task; make the criteria more selective",
            )),
        }
    }
}

/// How a backend evaluates If-None-Exist criteria before the write: a search costs more than
/// a write may hold the writer (or the conditional-create lock) for, and a create that finds
/// its Task (an idempotent retry, the common case) is then answered without writing at all.
pub(crate) trait Precheck {
    /// What the pre-check saw, for the re-check inside the transaction to build on (see
    /// `TaskTx::recheck`).
    type Seen: Send;

    /// The Tasks the criteria match now, and how far the check saw.
    async fn precheck(&self, criteria: &[Predicate]) -> Result<(Found, Self::Seen)>;

    /// The server's base URL, against which a Task's references are indexed.
    fn base_url(&self) -> &str;
}

/// What a backend does inside the transaction of one Task write, with its own SQL. Every
/// method takes the transaction (or connection) it runs on as `&mut self`, and nothing in the
/// signatures belongs to a database driver, so any SQLite or PostgreSQL client can implement
/// it.
pub(crate) trait TaskTx {
    /// What a conditional create's pre-check saw (see `Precheck::Seen`).
    type Seen: Send;

    /// The current state of a Task this transaction may change (None if the id never
    /// existed), held so that nothing changes it before the transaction ends: SQLite's single
    /// writer runs one write at a time; PostgreSQL locks the row.
    async fn load_for_change(&mut self, id: &TaskId) -> Result<Option<CurrentTask>>;

    /// Evaluates If-None-Exist criteria again inside the transaction, after the pre-check
    /// found nothing as far as `seen`: only what was written since can match now.
    async fn recheck(&mut self, criteria: &[Predicate], seen: Self::Seen) -> Result<Found>;

    /// The status a Task had before its current on-hold streak: the newest version that is
    /// not on hold, read from the history newest first. `None` when it was created on hold, or
    /// when the newest such version is a deletion (what came before belongs to a Task that was
    /// gone).
    async fn status_before_hold(&mut self, id: &TaskId) -> Result<Option<String>>;

    /// The live sub-tasks of a Task (`partOf` names it), at most `limit`, each held for change
    /// like `load_for_change`, in id order.
    async fn children_for_change(
        &mut self,
        parent: &TaskId,
        limit: usize,
    ) -> Result<Vec<CurrentTask>>;

    /// Writes one version of a Task: the current row, its history row, its search index rows
    /// (replacing any the id had) and its change event.
    async fn put_version(&mut self, version: &NewVersion<'_>) -> Result<()>;

    /// Writes several versions, each as `put_version` does, in the order given (so their
    /// change events take ascending `seq`s in that order): the plain creates of a transaction
    /// (`apply_transaction`), which a backend may write with fewer statements than a
    /// `put_version` each. Nothing may be read between them.
    async fn put_versions(&mut self, versions: &[NewVersion<'_>]) -> Result<()> {
        for version in versions {
            self.put_version(version).await?;
        }
        Ok(())
    }

    /// Deletes a Task: the row stays, marked deleted; the history gains a version without
    /// content; the index rows go; a change event records it.
    async fn delete_version(&mut self, deletion: &Deletion<'_>) -> Result<()>;
}

/// One version of a Task as both backends store it.
#[derive(Debug)]
pub(crate) struct NewVersion<'a> {
    pub id: &'a TaskId,
    pub version: Version,
    /// The live version this one replaces; None when it creates the Task (for the first time,
    /// or again after a delete).
    pub previous_version: Option<Version>,
    pub interaction: Interaction,
    pub last_updated: &'a StoredInstant,
    /// The resource as stored: compact JSON, with its id and meta set.
    pub text: &'a str,
    pub priority_rank: i64,
    /// The search index entries written as index rows: those the columns do not hold
    /// (`TaskColumns::rows_beside`).
    pub index: &'a TaskIndex,
    /// The work-list values kept on the Task row (derived from the Task's whole index).
    pub columns: &'a TaskColumns,
    /// Whether the id has rows already (a live or a deleted Task): a Task that never existed
    /// has no index rows to clear.
    pub existed: bool,
}

/// The deletion of a live Task, as both backends store it.
#[derive(Debug)]
pub(crate) struct Deletion<'a> {
    pub id: &'a TaskId,
    pub version: Version,
    /// The live version the deletion replaces.
    pub previous_version: Version,
    pub last_updated: &'a StoredInstant,
}

/// A Task write once any If-None-Exist pre-check is done: what the transaction applies.
///
/// A create's `Staged` work is boxed: it is several times the size of everything else here,
/// and a `TaskWrite` travels by value through the writer's queue (clippy `large_enum_variant`).
pub(crate) enum TaskWrite<S> {
    /// A create that changes no other Task (`is_single_change`), staged: everything its write
    /// needs is in `staged`, and its resource was let go on the request's own task (`prepare`)
    /// rather than carried to the writer and back. Its write answers with the stored text.
    PlainCreate { id: TaskId, staged: Box<Staged> },
    /// Create with a server-assigned id (assigned before the write, so that a transaction's
    /// entries can refer to each other).
    Create {
        id: TaskId,
        resource: Value,
        staged: Option<Box<Staged>>,
    },
    /// Create with a server-assigned id unless the criteria now match a Task; the pre-check
    /// found none, as far as `seen`.
    CreateUnlessFound {
        id: TaskId,
        resource: Value,
        staged: Option<Box<Staged>>,
        criteria: Vec<Predicate>,
        seen: S,
    },
    /// Update, patch, delete, or update-as-create of the Task with this id.
    Change { id: TaskId, decide: Decide },
}

/// A request after its pre-check.
pub(crate) enum Prepared<S> {
    /// The pre-check answered it; nothing is written.
    Answered(WriteOutcome),
    /// What the transaction must apply.
    Write(TaskWrite<S>),
}

/// The first version of a created Task, worked out before its transaction: its text, index
/// rows and columns, which depend on everything but the instant it is stored at. Only the
/// transaction knows that instant (versions are stamped in commit order), so the text carries
/// `LAST_UPDATED_MARK` in its place and `put` writes the instant over it and adds the one
/// index entry it makes. On SQLite every transaction runs on the one writer thread, where
/// serialising and indexing a Task were ~13 % of that thread's time on transaction Bundles
/// (BENCHMARKS.md, issue 17); staged, they run on the request's own task, in parallel.
#[derive(Debug)]
pub(crate) struct Staged {
    /// The resource as `put` stores it but for `meta.lastUpdated`, which holds the mark.
    text: String,
    /// Where the mark's JSON string, quotes included, is in `text`.
    mark: std::ops::Range<usize>,
    /// The index rows beside the columns (`_lastUpdated` is never one: it is the row's).
    rows: TaskIndex,
    columns: TaskColumns,
    priority_rank: i64,
}

/// What a staged text holds in place of `meta.lastUpdated`. The NULs make it a string no
/// client can send (FHIR strings refuse control characters, and a client's backslash is
/// written `\\`); `Staged::of` checks that it occurs once anyway, and stages nothing if not.
const LAST_UPDATED_MARK: &str = "\u{0}baton:last-updated\u{0}";

impl Staged {
    /// Stages the first version of Task `id`: stamps `resource` as `put` will (id, version 1,
    /// the mark as `meta.lastUpdated`) and works out its text and index. None if the mark is
    /// not found exactly once in the text; `put` then does it all itself.
    fn of(id: &TaskId, resource: &mut Value, base_url: &str) -> Option<Staged> {
        stamp_with(resource, id.as_str(), Version::FIRST, LAST_UPDATED_MARK);
        let text = compact_text(resource)?;
        let mark_json = serde_json::to_string(LAST_UPDATED_MARK).ok()?;
        let start = text.find(&mark_json)?;
        if text.rfind(&mark_json) != Some(start) {
            return None;
        }
        // The mark is no instant, so the index has everything but `_lastUpdated`.
        let (columns, rows) = TaskColumns::split(index_task(resource, base_url));
        Some(Staged {
            mark: start..start + mark_json.len(),
            rows,
            columns,
            priority_rank: priority_rank(resource),
            text,
        })
    }

    /// Stages the first version of a plain create (`TaskWrite::PlainCreate`), whose resource
    /// is dropped once staged, without stamping it: a resource with neither `id` nor `meta`
    /// (a create's, usually: the API takes out the client's id and the server's meta) would
    /// get both at its end from `stamp_with`, so they are written after its text instead,
    /// which spares four keyed inserts into the resource. None for any other resource (or one
    /// whose text holds the mark), which `of` stages.
    fn unstamped(id: &TaskId, resource: &Value, base_url: &str) -> Option<Staged> {
        let Value::Object(task) = resource else {
            return None;
        };
        if task.contains_key("id") || task.contains_key("meta") {
            return None;
        }
        let mark_json = serde_json::to_string(LAST_UPDATED_MARK).ok()?;
        let mut text = compact_text(resource)?;
        if text.pop() != Some('}') || text.contains(&mark_json) {
            return None;
        }
        if !task.is_empty() {
            text.push(',');
        }
        text.push_str(r#""id":"#);
        text.push_str(&serde_json::to_string(id.as_str()).ok()?);
        text.push_str(r#","meta":{"versionId":"#);
        text.push_str(&serde_json::to_string(&Version::FIRST.to_string()).ok()?);
        text.push_str(r#","lastUpdated":"#);
        let start = text.len();
        text.push_str(&mark_json);
        let mark = start..text.len();
        text.push_str("}}");
        // Without `id` and `meta.lastUpdated` the index lacks only the `_id` and `_lastUpdated`
        // entries, which are the row's own and never index rows (`split` leaves them out).
        let (columns, rows) = TaskColumns::split(index_task(resource, base_url));
        Some(Staged {
            mark,
            rows,
            columns,
            priority_rank: priority_rank(resource),
            text,
        })
    }

    /// The text, index rows, columns and priority rank of the version stored at `now`: what
    /// `put` works out of a stamped resource, byte for byte
    /// (`tests::a_staged_create_stores_what_an_unstaged_one_does`).
    fn at(mut self, now: &StoredInstant) -> (String, TaskIndex, TaskColumns, i64) {
        let instant = serde_json::to_string(now.as_str()).unwrap_or_default();
        self.text.replace_range(self.mark, &instant);
        (self.text, self.rows, self.columns, self.priority_rank)
    }
}

/// Runs the pre-check of a conditional create, which answers it when its criteria find a Task
/// (or several), and stages each create; every other request goes on to the transaction
/// unchanged.
pub(crate) async fn prepare<P: Precheck>(
    store: &P,
    request: WriteRequest,
) -> Result<Prepared<P::Seen>> {
    let base_url = store.base_url();
    let write = match request {
        WriteRequest::Create {
            id,
            mut resource,
            if_none_exist: None,
        } => {
            let id = id.unwrap_or_else(TaskId::generate);
            let plain = is_single_change(None, &resource);
            let unstamped = if plain {
                Staged::unstamped(&id, &resource, base_url)
            } else {
                None
            };
            match unstamped.or_else(|| Staged::of(&id, &mut resource, base_url)) {
                // Nothing of the resource is needed past here but its staged text, which is
                // what the response sends, so it is dropped now, on the request's task.
                Some(staged) if plain => TaskWrite::PlainCreate {
                    id,
                    staged: Box::new(staged),
                },
                staged => TaskWrite::Create {
                    id,
                    resource,
                    staged: staged.map(Box::new),
                },
            }
        }
        WriteRequest::Create {
            id,
            mut resource,
            if_none_exist: Some(criteria),
        } => {
            let (found, seen) = store.precheck(&criteria).await?;
            if let Some(outcome) = found.answer()? {
                return Ok(Prepared::Answered(outcome));
            }
            let id = id.unwrap_or_else(TaskId::generate);
            let staged = Staged::of(&id, &mut resource, base_url).map(Box::new);
            TaskWrite::CreateUnlessFound {
                id,
                resource,
                staged,
                criteria,
                seen,
            }
        }
        WriteRequest::Change { id, decide } => TaskWrite::Change { id, decide },
    };
    Ok(Prepared::Write(write))
}

/// Applies one Task write inside the backend's transaction: the decision sees the version it
/// replaces, and the write and its change event (and a completed request's change to its
/// focal Task) commit together or not at all.
pub(crate) async fn apply<T: TaskTx>(
    tx: &mut T,
    write: TaskWrite<T::Seen>,
    base_url: &str,
) -> Result<WriteOutcome> {
    match write {
        TaskWrite::PlainCreate { id, staged } => {
            let next = staged_version(id, *staged);
            tx.put_version(&next.as_new()).await?;
            Ok(next.written())
        }
        TaskWrite::Create {
            id,
            resource,
            staged,
        } => put_task(tx, &id, None, resource, staged, base_url).await,
        TaskWrite::CreateUnlessFound {
            id,
            resource,
            staged,
            criteria,
            seen,
        } => {
            if let Some(outcome) = tx.recheck(&criteria, seen).await?.answer()? {
                return Ok(outcome);
            }
            put_task(tx, &id, None, resource, staged, base_url).await
        }
        TaskWrite::Change { id, decide } => match decide_change(tx, id, decide, base_url).await? {
            Decided::Plain(next) => {
                tx.put_version(&next.as_new()).await?;
                Ok(next.written())
            }
            Decided::Other {
                id,
                current,
                decision,
            } => write_decided(tx, &id, current, decision, base_url).await,
        },
    }
}

/// A change of one Task (`TaskWrite::Change`) decided on the Task as it stands, before
/// anything of it is written (`decide_change`).
pub(crate) enum Decided {
    /// A put that changes this Task alone (`is_single_change`): the version it writes, whole,
    /// with `TaskTx::put_version`, as `put_task` would write it. The SQLite writer writes the
    /// plain puts of a group's queued changes together (`writer::Group::run_changes`).
    /// Boxed: it is twice the size of the other (clippy `large_enum_variant`).
    Plain(Box<NextVersion>),
    /// Anything else (a delete, a keep, a put with effects on other Tasks): written by
    /// `write_decided`.
    Other {
        id: TaskId,
        current: Option<CurrentTask>,
        decision: Decision,
    },
}

/// Loads Task `id` for change and runs the decision on it; reads only, nothing is written.
pub(crate) async fn decide_change<T: TaskTx>(
    tx: &mut T,
    id: TaskId,
    decide: Decide,
    base_url: &str,
) -> Result<Decided> {
    let current = tx.load_for_change(&id).await?;
    let decision = decide(current.as_ref());
    // Dropped before the content is taken out, so that it is not copied (`owned`).
    drop(decide);
    let previous = current.as_ref().filter(|c| !c.deleted).map(|c| &c.resource);
    match decision? {
        Decision::Put(resource) if is_single_change(previous, &resource) => {
            Ok(Decided::Plain(Box::new(next_version(
                id,
                current.as_ref(),
                owned(resource),
                None,
                base_url,
            ))))
        }
        decision => Ok(Decided::Other {
            id,
            current,
            decision,
        }),
    }
}

/// Writes what a change that is not a plain put (`Decided::Other`) was decided to be.
pub(crate) async fn write_decided<T: TaskTx>(
    tx: &mut T,
    id: &TaskId,
    current: Option<CurrentTask>,
    decision: Decision,
    base_url: &str,
) -> Result<WriteOutcome> {
    match decision {
        Decision::Put(resource) => {
            put_task(tx, id, current.as_ref(), owned(resource), None, base_url).await
        }
        Decision::Delete => match current {
            Some(current) if !current.deleted => delete(tx, &current).await,
            _ => Ok(WriteOutcome::Unchanged),
        },
        Decision::Keep => Ok(WriteOutcome::Unchanged),
    }
}

/// The content of a decision, taken out of its `Arc` (copied only when the decision that
/// shared it is still held, as it is on PostgreSQL's unlocked attempt).
fn owned(resource: Arc<Value>) -> Value {
    Arc::try_unwrap(resource).unwrap_or_else(|shared| (*shared).clone())
}

/// How a backend that holds a Task for change with a row lock (PostgreSQL) may instead try a
/// change without one: read the Task, decide, and write the version only if the Task is still
/// at the version read, all in fewer round trips than a transaction (BEGIN, the locking read,
/// the write, COMMIT). What the attempt writes is what the locked path would have written:
/// the decision was made on the version the write replaces.
pub(crate) trait UnlockedChange: TaskTx {
    /// The current state of a Task (None if the id never existed), committed, not held.
    async fn read_unlocked(&mut self, id: &TaskId) -> Result<Option<CurrentTask>>;

    /// A version of the Task this backend wrote itself and remembers, without reading it:
    /// likely, not certainly, still the current one. A put decided on it is written only if
    /// the Task is still at it (`put_version_if_unchanged`); nothing else decided on it is
    /// answered. None by default: every attempt reads.
    fn recent(&self, _id: &TaskId) -> Option<CurrentTask> {
        None
    }

    /// Writes a version as `TaskTx::put_version` does, atomically, and only if the Task is
    /// still at the version before it (does not exist, for a first version): false, and
    /// nothing written, if it has changed.
    async fn put_version_if_unchanged(&mut self, version: &NewVersion<'_>) -> Result<bool>;
}

/// What an unlocked attempt at a write came to.
pub(crate) enum Attempt<S> {
    /// Answered: written, or refused or left unchanged by a decision on a committed version.
    Answered(WriteOutcome),
    /// To be applied in a transaction (`apply`): a write that is not a plain change, or whose
    /// Task changed between the read and the write. Its decision runs again there.
    Locked(TaskWrite<S>),
}

/// Tries a change of one Task without holding it: the decision is made on the committed
/// version read now, and a put that changes no other Task (`is_single_change`) is written
/// only if the Task is still at that version. A decision that refuses (412, 403, 422…) or
/// keeps is answered as made: it was made on the newest committed version, as if the request
/// had run just before any write still in flight. Everything else — another kind of write, a
/// delete, a put with effects on other Tasks, a Task changed meanwhile — goes on to `apply`,
/// where the decision runs again on the locked version.
///
/// When the backend remembers a version of the Task it wrote itself (`recent`), the decision
/// is first made on that version, without the read: a plain put decided on it is written if
/// the Task is still at it, and is then the whole write. Anything else decided on it (a
/// refusal, a keep, a delete, a put with effects) and a put the Task has moved past are
/// decided again on the version read, as below: a remembered version may be stale, and only
/// the write's guard tells.
pub(crate) async fn try_unlocked<T: UnlockedChange>(
    conn: &mut T,
    write: TaskWrite<T::Seen>,
    base_url: &str,
) -> Result<Attempt<T::Seen>> {
    let TaskWrite::Change { id, decide } = write else {
        return Ok(Attempt::Locked(write));
    };
    if let Some(recent) = conn.recent(&id)
        && let Ok(Decision::Put(resource)) = decide(Some(&recent))
        && is_single_change((!recent.deleted).then_some(&recent.resource), &resource)
    {
        let next = next_version(id.clone(), Some(&recent), owned(resource), None, base_url);
        if conn.put_version_if_unchanged(&next.as_new()).await? {
            return Ok(Attempt::Answered(next.written()));
        }
    }
    let current = conn.read_unlocked(&id).await?;
    let resource = match decide(current.as_ref())? {
        Decision::Put(resource) => resource,
        Decision::Keep => return Ok(Attempt::Answered(WriteOutcome::Unchanged)),
        Decision::Delete => return Ok(Attempt::Locked(TaskWrite::Change { id, decide })),
    };
    let previous = current.as_ref().filter(|c| !c.deleted).map(|c| &c.resource);
    if !is_single_change(previous, &resource) {
        return Ok(Attempt::Locked(TaskWrite::Change { id, decide }));
    }
    // `decide` is still held (it may run again), so the content is copied here, on the
    // request's own task.
    let next = next_version(
        id.clone(),
        current.as_ref(),
        owned(resource),
        None,
        base_url,
    );
    if conn.put_version_if_unchanged(&next.as_new()).await? {
        Ok(Attempt::Answered(next.written()))
    } else {
        Ok(Attempt::Locked(TaskWrite::Change { id, decide }))
    }
}

/// Whether writing `resource` over `previous` (None: the Task is created) changes that Task
/// alone (see `put_task`): it completes no request, opens or closes no information request,
/// and is neither a bid nor a bidding Task.
fn is_single_change(previous: Option<&Value>, resource: &Value) -> bool {
    workflow::completes_request(previous, resource).is_none()
        && information::transition(previous, resource).is_none()
        && !bidding::is_bid(resource)
        && !bidding::is_bidding(resource)
}

/// Whether a write is one `TaskTx::put_version` and nothing else: a create without
/// If-None-Exist that completes no request (see `put_task`). A backend may run it without a
/// transaction of its own when that statement is atomic by itself.
pub(crate) fn is_single_put<S>(write: &TaskWrite<S>) -> bool {
    match write {
        TaskWrite::PlainCreate { .. } => true,
        TaskWrite::Create { resource, .. } => is_single_change(None, resource),
        TaskWrite::CreateUnlessFound { .. } | TaskWrite::Change { .. } => false,
    }
}

/// Runs the pre-checks of a transaction's writes, in order; the first that fails fails the
/// transaction, named by its Bundle entry. A conditional create's criteria were found to
/// match nothing when its entry was given an id; a match now fails it (see
/// `apply_transaction`).
pub(crate) async fn prepare_transaction<P: Precheck>(
    store: &P,
    entries: Vec<(usize, WriteRequest)>,
) -> Result<Vec<(usize, Prepared<P::Seen>)>> {
    let mut prepared = Vec::with_capacity(entries.len());
    for (entry, request) in entries {
        let done = prepare(store, request)
            .await
            .map_err(|e| e.in_entry(entry))?;
        if let Prepared::Answered(WriteOutcome::Existing(_)) = done {
            // The caller found no match for these criteria when it gave the entry its id.
            return Err(conditional_race().in_entry(entry));
        }
        prepared.push((entry, done));
    }
    Ok(prepared)
}

/// Applies a transaction's writes in one backend transaction, in the order given (so their
/// change events take ascending `seq`s in that order): every write and every change event
/// commit together, or — when one fails, the error naming its Bundle entry — the caller rolls
/// them all back. A conditional create whose criteria come to match a Task only inside the
/// transaction (one was written since its pre-check) fails it with a 409: the entries that
/// refer to the new Task were given its id, so the transaction cannot stand as prepared.
///
/// Consecutive plain creates (`is_single_put`: nothing to read, nothing else to change) are
/// worked out one by one and written together (`TaskTx::put_versions`), before any other
/// write and at the end: a write that reads (an update, a bid, a conditional create's
/// re-check) sees every entry before it, as if each had been written alone.
pub(crate) async fn apply_transaction<T: TaskTx>(
    tx: &mut T,
    writes: Vec<(usize, Prepared<T::Seen>)>,
    base_url: &str,
) -> Result<Vec<WriteOutcome>> {
    let mut outcomes = Vec::with_capacity(writes.len());
    // Each create worked out and not yet written, with the place of its outcome, which holds
    // `Unchanged` until it is written.
    let mut creates: Vec<(usize, NextVersion)> = Vec::new();
    for (entry, prepared) in writes {
        let outcome = match prepared {
            Prepared::Answered(outcome) => outcome,
            Prepared::Write(write) => match first_version(write, base_url) {
                Ok(next) => {
                    creates.push((outcomes.len(), next));
                    WriteOutcome::Unchanged
                }
                Err(write) => {
                    let write = *write;
                    put_all(tx, &mut creates, &mut outcomes).await?;
                    let conditional = matches!(write, TaskWrite::CreateUnlessFound { .. });
                    let outcome = apply(tx, write, base_url)
                        .await
                        .map_err(|e| e.in_entry(entry))?;
                    if conditional && matches!(outcome, WriteOutcome::Existing(_)) {
                        return Err(conditional_race().in_entry(entry));
                    }
                    outcome
                }
            },
        };
        outcomes.push(outcome);
    }
    put_all(tx, &mut creates, &mut outcomes).await?;
    Ok(outcomes)
}

/// A plain create (`is_single_put`) worked out as `apply` would write it: its first version,
/// not yet written (`NextVersion::written` is its outcome once it is). Any other write is
/// given back.
/// Worked out apart, plain creates can be written together (`TaskTx::put_versions`): a
/// transaction's, and on SQLite the single creates of a group commit.
pub(crate) fn first_version<S>(
    write: TaskWrite<S>,
    base_url: &str,
) -> std::result::Result<NextVersion, Box<TaskWrite<S>>> {
    if !is_single_put(&write) {
        return Err(Box::new(write));
    }
    match write {
        TaskWrite::PlainCreate { id, staged } => Ok(staged_version(id, *staged)),
        TaskWrite::Create {
            id,
            resource,
            staged,
        } => Ok(next_version(id, None, resource, staged, base_url)),
        other => Err(Box::new(other)),
    }
}

/// Writes the versions worked out and not yet written, in order, puts each one's outcome at
/// its place in `outcomes`, and empties the list. What fails here is the store (a full disk),
/// not an entry, so the error names none.
async fn put_all<T: TaskTx>(
    tx: &mut T,
    versions: &mut Vec<(usize, NextVersion)>,
    outcomes: &mut [WriteOutcome],
) -> Result<()> {
    if versions.is_empty() {
        return Ok(());
    }
    let rows: Vec<NewVersion<'_>> = versions.iter().map(|(_, next)| next.as_new()).collect();
    tx.put_versions(&rows).await?;
    drop(rows);
    for (place, next) in versions.drain(..) {
        if let Some(outcome) = outcomes.get_mut(place) {
            *outcome = next.written();
        }
    }
    Ok(())
}

fn conditional_race() -> Error {
    Error::conflict(
        "a Task matching this entry's conditional criteria was written while the transaction \
         was being prepared; retry the transaction",
    )
}

/// Writes a Task version and, when the write completes a request Task (abort, suspend,
/// resume), the change it asks of its focal Task: both versions, with their history and
/// change events, in one transaction, so subscribers hear of both or of neither. The focal
/// Task is loaded for change and judged here, inside the transaction, so a concurrent change
/// to it cannot slip between the check and the write; any refusal fails the request's write
/// too.
///
/// Every read comes first; the writes are the last statements of the transaction, the
/// request's and then the focal Task's, each carrying its change event, so the request's
/// change takes the lower `seq`.
async fn put_task<T: TaskTx>(
    tx: &mut T,
    id: &TaskId,
    current: Option<&CurrentTask>,
    resource: Value,
    staged: Option<Box<Staged>>,
    base_url: &str,
) -> Result<WriteOutcome> {
    let previous = current.filter(|c| !c.deleted).map(|c| &c.resource);
    let mut resource = resource;
    let effects = if let Some(kind) = workflow::completes_request(previous, &resource) {
        Effects {
            changes: vec![focal_change(tx, id, kind, &resource, base_url).await?],
            created: None,
            amended: false,
        }
    } else if let Some(transition) = information::transition(previous, &resource) {
        Effects {
            changes: coordination_change(tx, id, transition, &resource, base_url)
                .await?
                .into_iter()
                .collect(),
            created: None,
            amended: false,
        }
    } else {
        bidding_effects(tx, id, previous, &mut resource, base_url).await?
    };
    // A staged create was worked out from the resource as it came; one the effects amended
    // (a bid given its placer) is written from what it has become.
    let staged = staged.filter(|_| !effects.amended);
    let outcome = put(tx, id, current, resource, staged, base_url).await?;
    for (task, changed) in effects.changes {
        put(tx, &task.id, Some(&task), changed, None, base_url).await?;
    }
    if let Some((new_id, task)) = effects.created {
        put(tx, &new_id, None, task, None, base_url).await?;
    }
    Ok(outcome)
}

/// The focal Task of a request being completed (loaded for change), and the version the
/// request makes of it.
async fn focal_change<T: TaskTx>(
    tx: &mut T,
    request_id: &TaskId,
    kind: RequestKind,
    request: &Value,
    base_url: &str,
) -> Result<(CurrentTask, Value)> {
    let code = kind.code();
    let focal_id = workflow::focal_task(request, base_url)
        .filter(|focal_id| focal_id != request_id)
        .ok_or_else(|| {
            Error::business_rule(format!(
                "this {code} request names no other Task in Task.focus, so completing it would \
                 change nothing"
            ))
            .at("Task.focus")
        })?;
    let focal = tx
        .load_for_change(&focal_id)
        .await?
        .filter(|f| !f.deleted)
        .ok_or_else(|| {
            Error::conflict(format!(
                "Task/{focal_id}, the focal Task of this {code} request, no longer exists, so \
                 the request cannot be completed; reject or cancel it instead"
            ))
            .at("Task.focus")
        })?;
    workflow::check_addressee(request, &focal.resource, base_url)?;
    let before_hold = match kind {
        RequestKind::Resume => tx.status_before_hold(&focal_id).await?,
        RequestKind::Abort | RequestKind::Suspend | RequestKind::Change => None,
    };
    let changed = workflow::apply_request(
        kind,
        &focal.resource,
        focal.version,
        request,
        before_hold.as_deref(),
        base_url,
    )?;
    Ok((focal, changed))
}

/// The coordination Task an information request is about (loaded for change), and the
/// version its opening or closing makes of it; None when it stays as it is. Opening checks
/// the request against the coordination Task again, here where nothing can change it.
async fn coordination_change<T: TaskTx>(
    tx: &mut T,
    request_id: &TaskId,
    transition: Transition,
    request: &Value,
    base_url: &str,
) -> Result<Option<(CurrentTask, Value)>> {
    let Some(focal_id) = workflow::focal_task(request, base_url).filter(|f| f != request_id) else {
        return Err(Error::business_rule(
            "this information request names no other Task in Task.focus",
        )
        .at("Task.focus"));
    };
    let Some(coordination) = tx.load_for_change(&focal_id).await?.filter(|f| !f.deleted) else {
        return match transition {
            // A request about a Task deleted since may still be closed.
            Transition::Closed { .. } => Ok(None),
            Transition::Opened => Err(Error::not_found(format!(
                "Task/{focal_id}, the coordination Task of this information request, does not exist"
            ))
            .at("Task.focus")),
        };
    };
    if transition == Transition::Opened {
        information::check_against(request, &coordination.resource, base_url)?;
    }
    Ok(
        information::apply(transition, &coordination.resource, request)?
            .map(|changed| (coordination, changed)),
    )
}

/// What a write of a bidding Task or a bid checks and changes (`fhir::workflow::bidding`),
/// inside the transaction: a new bidding Task's coordination Task must be open and unowned; a
/// new bid is checked against its bidding Task, held for change, and the bids it has, so a
/// bid and an award cannot cross; closing a bidding Task writes the award to the
/// coordination Task and tells every open bid.
async fn bidding_effects<T: TaskTx>(
    tx: &mut T,
    id: &TaskId,
    previous: Option<&Value>,
    resource: &mut Value,
    base_url: &str,
) -> Result<Effects> {
    let open = |task: &Value| {
        !crate::fhir::task::is_terminal(crate::fhir::task::status(task).unwrap_or_default())
    };
    if bidding::is_bid(resource) && previous.is_none() {
        let parent_id = bidding::parse_bid(resource, base_url)?;
        let parent = tx
            .load_for_change(&parent_id)
            .await?
            .filter(|p| !p.deleted)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "Task.partOf names Task/{parent_id}, which does not exist"
                ))
                .at("Task.partOf")
            })?;
        let bids = tx
            .children_for_change(&parent_id, bidding::MAX_BIDS)
            .await?
            .into_iter()
            .filter(|b| &b.id != id)
            .map(|b| b.resource)
            .collect::<Vec<_>>();
        bidding::check_bid(resource, &parent.resource, &bids, base_url)?;
        let amended = bidding::settle_placer(resource, &parent.resource, base_url)?;
        return Ok(Effects {
            amended,
            ..Effects::default()
        });
    }
    if !bidding::is_bidding(resource) {
        return Ok(Effects::default());
    }
    let coordination_id = bidding::parse_bidding(resource, base_url)?;
    let coordination = match &coordination_id {
        Some(coordination_id) => tx
            .load_for_change(coordination_id)
            .await?
            .filter(|c| !c.deleted),
        None => None,
    };
    match previous {
        None => {
            if let Some(coordination_id) = &coordination_id {
                let coordination = coordination.ok_or_else(|| {
                    Error::not_found(format!(
                        "Task.focus names Task/{coordination_id}, which does not exist"
                    ))
                    .at("Task.focus")
                })?;
                bidding::check_coordination(&coordination.resource)?;
            }
            Ok(Effects::default())
        }
        Some(before) if open(before) && !open(resource) => {
            let chosen = match crate::fhir::task::status(resource) {
                Some("completed") => Some(bidding::awarded(resource, base_url)?),
                _ => None,
            };
            let bids = tx.children_for_change(id, bidding::MAX_BIDS).await?;
            let contents: Vec<Value> = bids.iter().map(|b| b.resource.clone()).collect();
            let focus = match &coordination_id {
                Some(_) => bidding::Focus::Named(coordination.as_ref().map(|c| &c.resource)),
                None => bidding::Focus::None,
            };
            let now = StoredInstant::now();
            let closing =
                bidding::close(chosen.as_ref(), resource, focus, &contents, now.as_str())?;
            let mut effects = Effects::default();
            match (coordination, closing.coordination) {
                (Some(coordination), Some(bidding::Coordination::Updated(changed))) => {
                    effects.changes.push((coordination, changed));
                }
                (_, Some(bidding::Coordination::Created(task))) => {
                    // The award names the Task it created among the bidding Task's outputs.
                    let new_id = TaskId::generate();
                    if let Some(outputs) = resource.get_mut("output").and_then(Value::as_array_mut)
                    {
                        outputs.push(bidding::coordination_output(&new_id));
                    }
                    effects.created = Some((new_id, task));
                    effects.amended = true;
                }
                _ => {}
            }
            for (i, changed) in closing.bids {
                effects.changes.push((bids[i].clone(), changed));
            }
            Ok(effects)
        }
        Some(_) => Ok(Effects::default()),
    }
}

/// What a write changes besides its own Task, in the same transaction: new versions of Tasks
/// it loaded for change, and a Task it creates (an award's coordination Task); `amended` when
/// it also changed the written Task itself (a bid's placer, an award's output).
#[derive(Default)]
struct Effects {
    changes: Vec<(CurrentTask, Value)>,
    created: Option<(TaskId, Value)>,
    amended: bool,
}

/// Stores `resource` as the next version of the Task (the first, if it never existed), from
/// its `staged` text and index when it was staged as a create and nothing stands at its id.
async fn put<T: TaskTx>(
    tx: &mut T,
    id: &TaskId,
    current: Option<&CurrentTask>,
    resource: Value,
    staged: Option<Box<Staged>>,
    base_url: &str,
) -> Result<WriteOutcome> {
    let next = next_version(id.clone(), current, resource, staged, base_url);
    tx.put_version(&next.as_new()).await?;
    Ok(next.written())
}

/// A version of a Task worked out and not yet written: what `NewVersion` borrows, and what
/// its write answers once written (`written`).
pub(crate) struct NextVersion {
    id: TaskId,
    version: Version,
    previous_version: Option<Version>,
    interaction: Interaction,
    last_updated: StoredInstant,
    text: String,
    priority_rank: i64,
    index: TaskIndex,
    columns: TaskColumns,
    existed: bool,
    /// The resource stamped, for the outcome; None for a staged plain create, which answers
    /// with its `text` alone.
    resource: Option<Value>,
}

impl NextVersion {
    /// The Task it is a version of.
    pub(crate) fn id(&self) -> &TaskId {
        &self.id
    }

    pub(crate) fn as_new(&self) -> NewVersion<'_> {
        NewVersion {
            id: &self.id,
            version: self.version,
            previous_version: self.previous_version,
            interaction: self.interaction,
            last_updated: &self.last_updated,
            text: &self.text,
            priority_rank: self.priority_rank,
            index: &self.index,
            columns: &self.columns,
            existed: self.existed,
        }
    }

    /// What the write of this version answers, once written: the version with the text
    /// stored (`StoredVersion::text`), moved rather than copied, so that the response sends
    /// it instead of serialising the resource again.
    pub(crate) fn written(self) -> WriteOutcome {
        WriteOutcome::Written(StoredVersion {
            id: self.id,
            version: self.version,
            last_updated: self.last_updated,
            interaction: self.interaction,
            resource: self.resource,
            text: Some(self.text),
        })
    }
}

/// The next version of Task `id` (the first, if it never existed) made of `resource`, stamped
/// now.
fn next_version(
    id: TaskId,
    current: Option<&CurrentTask>,
    mut resource: Value,
    staged: Option<Box<Staged>>,
    base_url: &str,
) -> NextVersion {
    let live = current.filter(|c| !c.deleted);
    let version = current.map_or(Version::FIRST, |c| c.version.next());
    let interaction = if live.is_some() {
        Interaction::Update
    } else {
        Interaction::Create
    };
    let now = StoredInstant::now();
    let (text, index, columns, priority_rank) = match staged.filter(|_| current.is_none()) {
        Some(staged) => {
            // `Staged::of` stamped this resource with its id and first version already; only
            // the instant is new (`tests::a_staged_create_stores_what_an_unstaged_one_does`).
            stamp_instant(&mut resource, &now);
            Staged::at(*staged, &now)
        }
        None => {
            stamp(&mut resource, id.as_str(), version, &now);
            unstaged(&resource, base_url)
        }
    };
    NextVersion {
        id,
        version,
        previous_version: live.map(|c| c.version),
        interaction,
        last_updated: now,
        text,
        priority_rank,
        index,
        columns,
        existed: current.is_some(),
        resource: Some(resource),
    }
}

/// The first version of a staged plain create (`TaskWrite::PlainCreate`), stored now: its
/// staged text with the instant written in, which is all its outcome carries of it.
fn staged_version(id: TaskId, staged: Staged) -> NextVersion {
    let now = StoredInstant::now();
    let (text, index, columns, priority_rank) = staged.at(&now);
    NextVersion {
        id,
        version: Version::FIRST,
        previous_version: None,
        interaction: Interaction::Create,
        last_updated: now,
        text,
        priority_rank,
        index,
        columns,
        existed: false,
        resource: None,
    }
}

/// The text, index rows, columns and priority rank of a stamped resource.
fn unstaged(resource: &Value, base_url: &str) -> (String, TaskIndex, TaskColumns, i64) {
    let (columns, rows) = TaskColumns::split(index_task(resource, base_url));
    (
        compact_text(resource).unwrap_or_else(|| resource.to_string()),
        rows,
        columns,
        priority_rank(resource),
    )
}

/// A resource as compact JSON text, as `Value::to_string` writes it, but straight into a
/// byte buffer rather than through `fmt::Write`, which cost twice as much on the hot path of
/// transaction Bundles (BENCHMARKS.md, issue 17, eighth sitting). None only if serialising
/// fails, which a `Value` does not.
fn compact_text(resource: &Value) -> Option<String> {
    serde_json::to_string(resource).ok()
}

async fn delete<T: TaskTx>(tx: &mut T, current: &CurrentTask) -> Result<WriteOutcome> {
    let version = current.version.next();
    let now = StoredInstant::now();
    tx.delete_version(&Deletion {
        id: &current.id,
        version,
        previous_version: current.version,
        last_updated: &now,
    })
    .await?;
    Ok(WriteOutcome::Written(StoredVersion {
        id: current.id.clone(),
        version,
        last_updated: now,
        interaction: Interaction::Delete,
        resource: None,
        text: None,
    }))
}

#[cfg(test)]
mod tests;
