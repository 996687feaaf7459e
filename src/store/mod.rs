//! Durable storage of Tasks, their history and the change-event outbox.
//!
//! The API talks to the `Store` trait only; `sqlite` is the embedded implementation for one
//! node and `postgres` the shared one for a cluster. Writes are described as data plus a decision
//! closure (`WriteRequest`) that the store runs inside its transaction against the current
//! version, so If-Match checks, the state machine and the role rules see exactly the version
//! they replace, and a Task write and its change event always commit together. The rules of
//! a Task write are written once, in `write`, and those of a subscription write in
//! `subscriptions`, over the statements each backend supplies; `rows` reads stored rows back
//! for both.

pub mod audit_queue;
pub mod audit_sql;
mod hub_sql;
pub mod postgres;
pub mod pressure;
mod rows;
pub mod search_sql;
pub mod sqlite;
mod subscriptions;
mod write;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::fhir::ids::{
    ChangeSeq, ChannelType, EventNumber, StoredInstant, SubscriptionId, TaskId, Version,
};
use crate::fhir::interaction::Interaction;
use crate::fhir::notification::SubscriptionStatus;
use crate::fhir::search::{Predicate, SortKey};

/// Sets the server-owned parts of a resource: its id and `meta.versionId`/`meta.lastUpdated`.
pub(crate) fn stamp(resource: &mut Value, id: &str, version: Version, now: &StoredInstant) {
    stamp_with(resource, id, version, now.as_str());
}

/// `stamp` with any text as `meta.lastUpdated` (a create is staged with a mark in its place,
/// `write::Staged`).
///
/// Each key is looked up before it is set, and a value that is already the one to set is
/// left alone: `value["key"] = …` allocates the key's `String` on every assignment, and a
/// create is stamped twice (staged with the mark, then with its instant on the writer), which
/// made this ~5 % of the server's samples on transaction Bundles (BENCHMARKS.md, issue 17,
/// seventh sitting).
pub(crate) fn stamp_with(resource: &mut Value, id: &str, version: Version, last_updated: &str) {
    if resource.is_null() {
        *resource = Value::Object(serde_json::Map::new());
    }
    let Value::Object(task) = resource else {
        // Not a resource at all (the API refuses these before any write): what
        // `value["key"] = …` would do, panic included.
        resource["id"] = Value::from(id);
        return;
    };
    set_text(task, "id", id);
    if !task.get("meta").is_some_and(Value::is_object) {
        task.insert("meta".to_owned(), Value::Object(serde_json::Map::new()));
    }
    let Some(Value::Object(meta)) = task.get_mut("meta") else {
        return;
    };
    set_text(meta, "versionId", &version.to_string());
    set_text(meta, "lastUpdated", last_updated);
}

/// Sets `meta.lastUpdated` of a resource `stamp_with` has stamped already, as `stamp` would
/// with the same id and version: a staged create (`write::Staged`) carries its id and first
/// version from the request's own task, and only its instant is set on the writer.
pub(crate) fn stamp_instant(resource: &mut Value, now: &StoredInstant) {
    if let Some(Value::Object(meta)) = resource.get_mut("meta") {
        set_text(meta, "lastUpdated", now.as_str());
    }
}

/// Sets `object[key]` to the string `text`, allocating only what changes.
fn set_text(object: &mut serde_json::Map<String, Value>, key: &str, text: &str) {
    match object.get_mut(key) {
        Some(Value::String(old)) if old == text => {}
        Some(Value::String(old)) => text.clone_into(old),
        Some(other) => *other = Value::from(text),
        None => {
            object.insert(key.to_owned(), Value::from(text));
        }
    }
}

/// A version read for the pipeline, or nothing if its stored content cannot be parsed (too
/// deep for the JSON parser, say, from before the API refused such content): one unreadable
/// row must not stop matching for every change after it. It is logged and counted here.
pub(crate) fn readable(version: Result<StoredVersion>) -> Option<StoredVersion> {
    match version {
        Ok(version) => Some(version),
        Err(e) => {
            metrics::counter!("baton_unreadable_versions_total").increment(1);
            tracing::error!(error = %crate::error::error_chain(&e), "a stored Task version cannot be read");
            None
        }
    }
}

/// The current state of a Task, including a tombstone when it was deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentTask {
    pub id: TaskId,
    pub version: Version,
    pub last_updated: StoredInstant,
    pub deleted: bool,
    /// The current content; for a deleted Task, the content before the delete.
    pub resource: Value,
}

/// One version from the history.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    pub id: TaskId,
    pub version: Version,
    pub last_updated: StoredInstant,
    pub interaction: Interaction,
    /// `None` for a delete, and for the first version of a plain create the store staged
    /// (`write::TaskWrite::PlainCreate`): its resource was let go before its transaction, and
    /// the write answers with its `text` alone.
    pub resource: Option<Value>,
    /// The resource exactly as stored (compact JSON), when the write that made this version
    /// gives it back: what a response sends rather than serialising `resource` again (which
    /// is the same JSON). None for a version read from the store and for a delete.
    pub text: Option<String>,
}

#[cfg(test)]
impl StoredVersion {
    /// The resource, parsed from the stored `text` when the write answered with that alone:
    /// what the store's tests compare (the API sends the text itself).
    pub fn content(&self) -> Option<std::borrow::Cow<'_, Value>> {
        match (&self.resource, &self.text) {
            (Some(resource), _) => Some(std::borrow::Cow::Borrowed(resource)),
            (None, Some(text)) => serde_json::from_str(text).ok().map(std::borrow::Cow::Owned),
            (None, None) => None,
        }
    }
}

/// Where a version stands in the type-level history: newest first by `last_updated`, then
/// id, then version, all descending. A page's `next` link carries the key of the last version
/// it looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryKey {
    pub last_updated: StoredInstant,
    pub id: TaskId,
    pub version: Version,
}

/// What a page of the type-level history (`GET /fhir/Task/_history`) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRequest {
    /// `_since`: versions written at or after this instant.
    pub since: Option<StoredInstant>,
    /// `_at`: versions that were current at some time in `[start, end)` (store keys).
    pub at: Option<(String, String)>,
    /// Versions ordered after this one (older, or the same instant with a lower id or
    /// version).
    pub after: Option<HistoryKey>,
    pub limit: usize,
}

/// One version of the type-level history. A deletion carries the content it deleted, so
/// that the read rule can judge it without another read.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryVersion {
    pub version: StoredVersion,
    pub deleted: Option<Value>,
}

impl HistoryVersion {
    pub fn key(&self) -> HistoryKey {
        HistoryKey {
            last_updated: self.version.last_updated.clone(),
            id: self.version.id.clone(),
            version: self.version.version,
        }
    }
}

/// What the decision closure of a change wants done.
#[derive(Debug)]
pub enum Decision {
    /// Store this content as the next version (or the first, if the Task does not exist).
    /// Shared, so that a decision that runs more than once hands out its content without
    /// copying it (see `Decide`).
    Put(Arc<Value>),
    /// Delete the Task.
    Delete,
    /// Nothing to write (e.g. deleting what is already deleted).
    Keep,
}

/// Decides a change from the current state of its Task (None if the id never existed). The
/// decision that is written is the one made on the version it replaces, held for change (see
/// `store::write`); a store may also decide on an unlocked read first and write only if the
/// Task is still at that version (PostgreSQL, `write::try_unlocked`), so a decision may run
/// more than once and must depend on nothing but `current` and what it captured.
pub type Decide = Box<dyn Fn(Option<&CurrentTask>) -> Result<Decision> + Send>;

pub enum WriteRequest {
    /// Create with a server-assigned id; with `if_none_exist`, only when no Task matches.
    /// `id` is the id chosen beforehand (a transaction's entries refer to each other by it);
    /// None: the store generates one.
    Create {
        id: Option<TaskId>,
        resource: Value,
        if_none_exist: Option<Vec<Predicate>>,
    },
    /// Update, patch, delete, or update-as-create of the Task with this id.
    Change { id: TaskId, decide: Decide },
}

#[derive(Debug, Clone, PartialEq)]
pub enum WriteOutcome {
    /// A new version was committed.
    Written(StoredVersion),
    /// Conditional create found this Task; nothing was written.
    Existing(CurrentTask),
    /// The decision was `Keep`.
    Unchanged,
}

/// A row of the outbox: one committed Task write.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub seq: ChangeSeq,
    /// Always `Task`: Tasks are the only resources whose changes are recorded.
    pub resource_type: String,
    pub resource_id: TaskId,
    pub version: Version,
    pub previous_version: Option<Version>,
    pub interaction: Interaction,
    pub recorded_at: StoredInstant,
    /// The `traceparent` of the request that made the change, if one did.
    pub traceparent: Option<String>,
}

/// A live Task of a search page, with its JSON as stored. A page is passed on as it was
/// stored, never parsed and written again: that was most of a search's cost (BENCHMARKS.md,
/// issue 16).
#[derive(Debug, Clone, PartialEq)]
pub struct ListedTask {
    pub id: TaskId,
    pub version: Version,
    pub last_updated: StoredInstant,
    /// The stored resource: a JSON object, stamped with its id and meta when it was written.
    pub json: String,
}

impl ListedTask {
    /// The Task as a JSON value, for the few callers that look inside it.
    pub fn resource(&self) -> Result<Value> {
        serde_json::from_str(&self.json)
            .map_err(|e| Error::internal("a stored Task is not valid JSON", e))
    }
}

/// A page of search results.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchPage {
    pub tasks: Vec<ListedTask>,
    /// The matches counted, as `PageRequest::counting` asked (at most one over its limit).
    pub total: Option<u64>,
    /// The sort values of the last Task of the page, in the order of
    /// `search_sql::sort_terms`: where the next page starts (see `PageRequest::after`).
    pub last_sort_values: Option<Vec<Option<String>>>,
    /// The byte budget ended the page before the Tasks asked for: more may follow.
    pub truncated: bool,
    /// Bytes of stored JSON of `tasks`.
    pub bytes: usize,
}

/// What a search asks the store for.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<'a> {
    pub predicates: &'a [Predicate],
    pub sort: &'a [SortKey],
    pub count: usize,
    pub offset: usize,
    /// Start after the Task with these sort values (a keyset cursor: `SearchPage::
    /// last_sort_values` of the page before), rather than at the first match.
    pub after: Option<&'a [Option<String>]>,
    pub counting: Counting,
    /// Most bytes of stored resources the page may hold (see `collect_page`).
    pub max_bytes: usize,
}

/// How a search counts its matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// Not at all (`_total=none`).
    Skip,
    /// Up to this many and one more, so that the caller can tell "exactly n" from "more than
    /// n" (`_total=estimate`): the count stops where it reaches the limit.
    UpTo(u64),
    /// Every match (`_total=accurate`).
    All,
}

/// Tasks read from rows, and how much of the byte budget they took.
pub(crate) struct Collected {
    pub tasks: Vec<ListedTask>,
    /// The budget ended the rows before the stream did.
    pub truncated: bool,
    pub bytes: usize,
    /// The sort values of the last Task taken.
    pub last_sort_values: Option<Vec<Option<String>>>,
    /// The first `at_least` Tasks are taken whatever their size.
    at_least: usize,
    max_bytes: usize,
}

impl Collected {
    /// Nothing collected yet: Tasks are taken until the next would take them past
    /// `max_bytes` of stored JSON, except that the first `at_least` are always taken (a page of
    /// matches takes one, so that paging always moves on).
    pub fn new(max_bytes: usize, at_least: usize) -> Collected {
        Collected {
            tasks: Vec::new(),
            truncated: false,
            bytes: 0,
            last_sort_values: None,
            at_least,
            max_bytes,
        }
    }

    /// Takes the next Task, or says (false) that the budget is spent and the rows should stop.
    pub fn take(&mut self, task: ListedTask, sort_values: Option<Vec<Option<String>>>) -> bool {
        let bytes = self.bytes.saturating_add(task.json.len());
        if self.tasks.len() >= self.at_least && bytes > self.max_bytes {
            self.truncated = true;
            return false;
        }
        self.bytes = bytes;
        self.tasks.push(task);
        self.last_sort_values = sort_values;
        true
    }
}

/// Reads Tasks from a stream of rows until it ends or the budget of `Collected` is spent. The
/// rows not read are never decoded and the stream is dropped, so a page of large Tasks costs
/// the budget, not `_count` times the largest Task. `read` turns a row into a Task and its
/// sort values.
pub(crate) async fn collect_page<R>(
    rows: impl futures::Stream<Item = std::result::Result<R, sqlx::Error>>,
    max_bytes: usize,
    at_least: usize,
    read: impl Fn(&R) -> Result<(ListedTask, Option<Vec<Option<String>>>)>,
) -> Result<Collected> {
    use futures::TryStreamExt;
    let mut rows = std::pin::pin!(rows);
    let mut collected = Collected::new(max_bytes, at_least);
    while let Some(row) = rows.try_next().await? {
        let (task, sort_values) = read(&row)?;
        if !collected.take(task, sort_values) {
            break;
        }
    }
    Ok(collected)
}

impl SearchPage {
    /// A page without Tasks (none asked for, or nothing to look in), with the total if any.
    pub fn empty(total: Option<u64>) -> SearchPage {
        SearchPage {
            tasks: Vec::new(),
            total,
            last_sort_values: None,
            truncated: false,
            bytes: 0,
        }
    }
}

impl Collected {
    /// The number of matches, when this page of `count` from `offset` shows it: a page that
    /// stops short of `count` without the byte budget ending it holds the last match, so the
    /// matches are the `offset` before it and its own. Only for a page reached by offset (a
    /// cursor's page says nothing of the Tasks before the cursor), and not for an empty page
    /// past the end. Either store then leaves its count statement out.
    pub fn total_shown(&self, count: usize, offset: usize, after_cursor: bool) -> Option<u64> {
        let shown = self.tasks.len();
        let last_page =
            !after_cursor && !self.truncated && shown < count && (shown > 0 || offset == 0);
        last_page.then(|| (offset + shown) as u64)
    }

    pub fn into_page(self, total: Option<u64>) -> SearchPage {
        SearchPage {
            tasks: self.tasks,
            total,
            last_sort_values: self.last_sort_values,
            truncated: self.truncated,
            bytes: self.bytes,
        }
    }
}

/// A stored subscription: the resource, who made it, its event counter and its delivery state.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSubscription {
    pub id: SubscriptionId,
    pub version: Version,
    pub last_updated: StoredInstant,
    pub status: SubscriptionStatus,
    pub topic_url: String,
    pub channel_type: ChannelType,
    pub endpoint: Option<String>,
    /// The author's principal (JSON of `auth::Principal`): what its notifications may carry.
    pub author: Value,
    /// Who owns it: the author's whole identity, fixed at creation. Only a caller with exactly
    /// this identity acts as the author.
    pub owner: Identity,
    /// The Subscription resource as its author sent it, with id and meta set.
    pub resource: Value,
    /// Changes at or below this outbox position happened before the subscription existed.
    pub created_after_seq: ChangeSeq,
    /// The number of the last event matched, 0 before the first.
    pub events_since_start: EventNumber,
    pub delivered_through: EventNumber,
    pub handshake_pending: bool,
    pub failures: i64,
    pub failing_since: Option<StoredInstant>,
    pub next_attempt_at: Option<StoredInstant>,
    pub last_error: Option<String>,
    pub last_sent_at: Option<StoredInstant>,
    /// How many times delivery was restarted from an earlier event (`$resend`). A delivery
    /// report carries the count its attempt read, and moves `delivered_through` only if it
    /// is still the stored one: an attempt in flight during a restart cannot undo it.
    pub rewinds: i64,
}

/// What `/metrics` tells of the subscriptions. It is read from the store, so every node of a
/// cluster reports the same figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriptionGauges {
    /// How many subscriptions have each status (statuses without any are left out).
    pub by_status: Vec<(String, i64)>,
    /// The largest backlogs (events counted and not delivered), largest first.
    pub backlogs: Vec<(SubscriptionId, i64)>,
    /// When the oldest undelivered event happened; None when every event is delivered.
    pub oldest_undelivered: Option<StoredInstant>,
}

/// A live subscription as start-up reads it: what the matcher index and the hub's start-up
/// checks need, the resource and author as the stored JSON text (the hub parses them, on all
/// cores, and keeps only what it needs).
#[derive(Debug, Clone)]
pub struct LiveSubscription {
    pub id: SubscriptionId,
    pub version: Version,
    pub status: SubscriptionStatus,
    /// JSON of `auth::Principal`.
    pub author: String,
    /// The matching form written with this version (`SubscriptionRecord::matching`); None
    /// for a row written before the column existed.
    pub matching: Option<String>,
    /// The Subscription resource, JSON: only when `matching` is None, so that start-up can
    /// derive the form once.
    pub resource: Option<String>,
    pub created_after_seq: ChangeSeq,
}

/// A matching form derived at start-up for a row that had none, written back under the
/// version it was derived from (a row replaced meanwhile keeps its own).
#[derive(Debug, Clone, PartialEq)]
pub struct MatchingFormRow {
    pub id: SubscriptionId,
    pub version: Version,
    pub matching: String,
}

/// A live subscription with something owed (its handshake, or events not yet delivered),
/// for the scheduler's start. Read straight from `hub_sql::PENDING_DELIVERIES`' columns.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PendingDelivery {
    pub id: SubscriptionId,
    /// A retry time recorded before the restart.
    pub next_attempt_at: Option<StoredInstant>,
}

/// What the API hands the store to create or replace a subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionRecord {
    pub resource: Value,
    pub status: SubscriptionStatus,
    pub topic_url: String,
    pub channel_type: ChannelType,
    pub endpoint: Option<String>,
    /// The author's principal (JSON of `auth::Principal`).
    pub author: Value,
    /// The author's identity. A replace does not read it: a subscription keeps the owner it
    /// was created with.
    pub owner: Identity,
    pub handshake_pending: bool,
    /// What matching needs of this subscription, pre-parsed by the hub from the resource it
    /// stores with it (`hub::MatchingForm`): start-up reads it instead of the resource. The
    /// store keeps it as opaque text.
    pub matching: String,
    /// The most live (not `off`) subscriptions `owner` may hold, checked inside the write so
    /// that concurrent writes cannot overshoot it; None: no quota. A write that would take a
    /// new live slot past it fails with 429 (`subscriptions::quota_exceeded`).
    pub live_quota: Option<usize>,
}

/// An owner as the subscription table stores it: `author_issuer`, `author_subject`,
/// `author_role`, `author_fhir_user`, with '' for "none" (see the migration that added them).
pub(crate) fn owner_columns(owner: &Identity) -> [&str; 4] {
    [
        owner.issuer.as_deref().unwrap_or(""),
        &owner.subject,
        owner.role.as_str(),
        owner.fhir_user.as_deref().unwrap_or(""),
    ]
}

/// The owner stored in those four columns.
pub(crate) fn owner_from_columns(
    issuer: String,
    subject: String,
    role: String,
    fhir_user: String,
) -> Result<Identity> {
    let role = crate::auth::Role::parse(&role).ok_or_else(|| {
        crate::error::Error::internal("unknown subscription author role in the store", role)
    })?;
    Ok(Identity {
        issuer: Some(issuer).filter(|i| !i.is_empty()),
        subject,
        role,
        fhir_user: Some(fhir_user).filter(|u| !u.is_empty()),
    })
}

/// Decides, inside the transaction, how a subscription is replaced.
pub type SubscriptionDecide =
    Box<dyn FnOnce(&StoredSubscription) -> Result<SubscriptionRecord> + Send>;

/// One subscription matched by one change; the store gives it the next event number. The
/// event log refers to the change by its `seq` (`change_event` is never pruned), so a match
/// carries nothing else.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchRow {
    pub subscription_id: SubscriptionId,
    pub change_seq: ChangeSeq,
}

/// How far recording has got inside one change whose matches span several chunks: its
/// matches are recorded in subscription-id order, up to and including `through`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeProgress {
    pub seq: ChangeSeq,
    pub through: SubscriptionId,
}

/// An entry of a subscription's event log.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub event_number: EventNumber,
    pub change_seq: ChangeSeq,
    pub task_id: TaskId,
    pub version: Version,
    pub interaction: Interaction,
    pub occurred_at: StoredInstant,
    /// The `traceparent` of the request that made the change, if one did.
    pub traceparent: Option<String>,
}

/// The result of one delivery attempt, to be recorded with the subscription.
#[derive(Debug, Clone, PartialEq)]
/// Either way `status` is written as given (delivery's status machine decides it), except
/// that a subscription `off` in the row stays `off`.
pub enum DeliveryReport {
    Delivered {
        subscription_id: SubscriptionId,
        /// Highest event number now delivered (unchanged for handshakes and heartbeats).
        through: EventNumber,
        /// Whether this was the handshake, which settles the handshake owed.
        handshake: HandshakeOwed,
        status: SubscriptionStatus,
        at: StoredInstant,
        /// The restart count the attempt read (`StoredSubscription::rewinds`): the position
        /// moves only if delivery was not restarted since.
        rewinds: i64,
    },
    Failed {
        subscription_id: SubscriptionId,
        error: String,
        failures: i64,
        failing_since: StoredInstant,
        next_attempt_at: Option<StoredInstant>,
        status: SubscriptionStatus,
    },
}

impl DeliveryReport {
    /// The subscription the report is about.
    pub fn subscription_id(&self) -> &SubscriptionId {
        match self {
            DeliveryReport::Delivered {
                subscription_id, ..
            }
            | DeliveryReport::Failed {
                subscription_id, ..
            } => subscription_id,
        }
    }
}

/// What a delivery did to the handshake its subscription owes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeOwed {
    /// The handshake itself went out: none is owed any longer.
    Settled,
    /// Events or a heartbeat went out: whatever was owed still is.
    Unchanged,
}

/// A chunk of matched changes, recorded in one transaction. The outbox sends at most
/// `hub.fanout_chunk` matches per chunk, so one change heard by many subscriptions is
/// recorded in several chunks, and the store persists how far inside that change it got.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchBatch {
    /// The outbox consumer (`outbox::MATCHER`), which is also the name of its lease.
    pub consumer: String,
    /// The node that holds the consumer's lease; a store shared by several nodes refuses the
    /// batch when the lease is no longer this node's.
    pub holder: String,
    /// The outbox `seq` of every change whose matches this chunk completes, ascending.
    pub changes: Vec<ChangeSeq>,
    /// The matches, in the order they are numbered: by change, then by subscription id.
    pub matches: Vec<MatchRow>,
    /// The progress inside a change this chunk continues from, as the previous chunk left it
    /// (None: it starts at a change boundary). The store refuses the chunk unless this is the
    /// progress it holds, so a chunk can never be recorded twice or out of turn.
    pub resumed: Option<ChangeProgress>,
    /// The progress inside a change this chunk ends in (None: it ends at a change boundary).
    pub progress: Option<ChangeProgress>,
}

/// Subscriptions written since a generation of the subscription table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriptionChanges {
    /// The generation these changes bring the reader to.
    pub generation: i64,
    /// Created or replaced (including turned `off`), current state.
    pub changed: Vec<StoredSubscription>,
    /// Deleted ids.
    pub deleted: Vec<SubscriptionId>,
}

/// Filters of a subscription search; `None` means any.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SubscriptionQuery {
    /// Only the subscriptions this identity owns (compared on every part).
    pub author: Option<Identity>,
    pub status: Option<Vec<String>>,
    pub endpoint: Option<String>,
    /// Ids as a client wrote them in a search: one that is not an id matches nothing.
    pub ids: Option<Vec<String>>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies one write in a transaction together with its history row and change event.
    async fn write(&self, request: WriteRequest) -> Result<WriteOutcome>;
    /// Applies several writes (each with the number of the Bundle entry it comes from) in one
    /// transaction, in the order given: all of them and their change events commit, or none
    /// does. An entry's client error fails the whole and names the entry (`Error::in_entry`).
    async fn transaction(&self, entries: Vec<(usize, WriteRequest)>) -> Result<Vec<WriteOutcome>>;
    async fn read(&self, id: &TaskId) -> Result<Option<CurrentTask>>;
    async fn read_version(&self, id: &TaskId, version: Version) -> Result<Option<StoredVersion>>;
    /// Versions newest first, and how many there are in all.
    async fn history(
        &self,
        id: &TaskId,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredVersion>, u64)>;
    /// The versions of every Task, newest first, within the request's bounds: at most
    /// `limit` of them.
    async fn task_history(&self, request: &HistoryRequest) -> Result<Vec<HistoryVersion>>;
    async fn search(&self, page: PageRequest<'_>) -> Result<SearchPage>;
    /// Live Tasks whose `partOf` names one of `parents` (as `Task/id`) and that match `scope`:
    /// at most `limit`, and no more than `max_bytes` of stored JSON (none may be taken).
    async fn children_of(
        &self,
        parents: &[String],
        scope: &[Predicate],
        limit: usize,
        max_bytes: usize,
    ) -> Result<SearchPage>;
    /// Changes the matcher has not consumed, oldest first. A store that commits in `seq` order
    /// (see `outbox_in_commit_order`) returns those after `seq`, the caller's position; one
    /// that does not returns every change not yet recorded by `record_matches`.
    async fn change_events_after(&self, seq: ChangeSeq, limit: usize) -> Result<Vec<ChangeEvent>>;
    /// Whether changes become visible in `seq` order, so that the matcher may keep its
    /// position in memory and persist it lazily. False where concurrent transactions commit
    /// out of `seq` order (PostgreSQL): there every batch is recorded.
    fn outbox_in_commit_order(&self) -> bool;
    /// Whether this store serves one process only (SQLite): then no other node delivers, and
    /// a node may send a subscription's next events before the result of the previous send
    /// has committed (`delivery::record`). False where nodes share the store (PostgreSQL):
    /// there each attempt's claim and result go through the store before the next.
    fn serves_one_node(&self) -> bool;
    /// Returns once everything committed before the call is durable (as `store.synchronous`
    /// promises it), so that what the caller read may leave the node: a delivery calls it
    /// before it sends. Immediate where a commit is durable when it returns (PostgreSQL,
    /// SQLite with `synchronous = normal`); with SQLite's pipelined commit, it waits for the
    /// syncer (`sqlite::syncer`).
    async fn until_durable(&self) {}
    /// The highest committed outbox `seq`, 0 when empty.
    async fn last_change_seq(&self) -> Result<ChangeSeq>;
    /// Several versions at once, in no particular order; missing ones are left out, and so
    /// are ones whose content cannot be read back (see `readable`).
    async fn versions(&self, keys: &[(TaskId, Version)]) -> Result<Vec<StoredVersion>>;

    // Subscriptions, the event log and the delivery state.
    async fn create_subscription(&self, record: SubscriptionRecord) -> Result<StoredSubscription>;
    async fn replace_subscription(
        &self,
        id: &SubscriptionId,
        decide: SubscriptionDecide,
    ) -> Result<StoredSubscription>;
    /// Deletes a subscription and its event log; false if it did not exist.
    async fn delete_subscription(&self, id: &SubscriptionId) -> Result<bool>;
    async fn read_subscription(&self, id: &SubscriptionId) -> Result<Option<StoredSubscription>>;
    async fn search_subscriptions(
        &self,
        query: &SubscriptionQuery,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredSubscription>, u64)>;
    /// What `/metrics` tells of the subscriptions, with at most `max_backlogs` backlogs.
    async fn subscription_gauges(&self, max_backlogs: usize) -> Result<SubscriptionGauges>;
    /// Up to `limit` subscriptions that are not `off`, in id order after `after`: start-up
    /// reads them page by page, so that a million never sit in memory at once.
    async fn live_subscription_page(
        &self,
        after: Option<&SubscriptionId>,
        limit: usize,
    ) -> Result<Vec<LiveSubscription>>;
    /// How many subscriptions are not `off`: what start-up makes room for in the matcher
    /// index before it reads them. A hint: rows written meanwhile may make it off by a few.
    async fn live_subscription_count(&self) -> Result<usize>;
    /// Sends every subscription that is not `off` to `pages`, about `page` rows at a time,
    /// each once (so no id comes twice), and returns when all are sent, or as soon as the
    /// receiver is gone. By default it reads them `live_subscription_page` by page; a store
    /// may read them in one pass (SQLite reads them in one transaction on a thread of its own).
    async fn read_live_subscriptions(
        &self,
        page: usize,
        pages: tokio::sync::mpsc::Sender<Vec<LiveSubscription>>,
    ) -> Result<()> {
        let mut after: Option<SubscriptionId> = None;
        loop {
            let rows = self.live_subscription_page(after.as_ref(), page).await?;
            let Some(last) = rows.last() else {
                return Ok(());
            };
            after = Some(last.id.clone());
            let full = rows.len() == page;
            if pages.send(rows).await.is_err() || !full {
                return Ok(());
            }
        }
    }
    /// Writes the matching forms start-up derived for rows that had none, each only if its row
    /// is still at the version it was derived from.
    async fn fill_matching_forms(&self, forms: Vec<MatchingFormRow>) -> Result<()>;
    /// The live subscriptions with a handshake or events owed, for the scheduler's start.
    async fn pending_deliveries(&self) -> Result<Vec<PendingDelivery>>;
    /// Where an outbox consumer stopped reading.
    async fn outbox_cursor(&self, consumer: &str) -> Result<ChangeSeq>;
    /// Where recording stopped inside a change whose matches span several chunks (see
    /// `MatchBatch::progress`); None at a change boundary.
    async fn match_progress(&self, consumer: &str) -> Result<Option<ChangeProgress>>;
    /// Numbers the matches (in order) and marks the changes consumed, in one transaction,
    /// with a handful of statements whatever the number of matches (`hub_sql::plan_runs`).
    /// Returns `(subscription id, event number)` per recorded match; a subscription deleted
    /// or `off` gets none. Fails, recording nothing, when the batch's holder lost the
    /// consumer's lease, another node already consumed one of its changes, or the progress
    /// it resumes from is not the one recorded.
    async fn record_matches(&self, batch: MatchBatch)
    -> Result<Vec<(SubscriptionId, EventNumber)>>;
    /// Events `from..=to` of a subscription's log, oldest first.
    async fn subscription_events(
        &self,
        id: &SubscriptionId,
        from: EventNumber,
        to: EventNumber,
    ) -> Result<Vec<EventRecord>>;
    /// Restarts a subscription's delivery at event `from` (`$resend`): its position moves
    /// back to just before `from` (never forward) and the restart is counted, so that an
    /// attempt in flight cannot move the position on again (`DeliveryReport::Delivered`'s
    /// `rewinds`). None if the subscription is gone or `off`.
    async fn restart_delivery(
        &self,
        id: &SubscriptionId,
        from: EventNumber,
    ) -> Result<Option<StoredSubscription>>;
    /// Records an attempt's result and ends `holder`'s claim on the subscription.
    async fn record_delivery(&self, holder: &str, report: DeliveryReport) -> Result<()> {
        self.record_deliveries(holder, vec![report], Vec::new())
            .await
    }
    /// Records the results of many attempts (of many subscriptions) in one transaction, in
    /// the order given, each ending `holder`'s claim on its subscription, together with the
    /// attempts' AuditEvents (`attempts`, the delivery ledger): delivery's bookkeeping is one
    /// write per commit, not one per attempt, and a ledger entry costs no write of its own.
    /// All or none are recorded.
    async fn record_deliveries(
        &self,
        holder: &str,
        reports: Vec<DeliveryReport>,
        attempts: Vec<crate::audit::AuditRecord>,
    ) -> Result<()>;

    // Work sharing between nodes.
    /// Takes or renews the named lease for `holder` until `ttl` from now; false when another
    /// holder's lease has not yet expired. A store that serves a single process grants it.
    async fn acquire_lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool>;
    /// Gives up the named lease if `holder` has it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<()>;
    /// The holders of the unexpired leases whose names start with `prefix`, sorted: the live
    /// nodes, from their presence leases (`hub::nodes`). A store that serves a single process
    /// keeps no leases and returns none.
    async fn lease_holders(&self, prefix: &str) -> Result<Vec<String>>;
    /// Claims a subscription's delivery for `holder` until `ttl` from now and returns it;
    /// None when it does not exist or another node's claim has not expired.
    async fn claim_subscription(
        &self,
        id: &SubscriptionId,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<StoredSubscription>>;
    /// Ends `holder`'s claim without recording anything (the attempt found nothing to send).
    async fn release_subscription(&self, id: &SubscriptionId, holder: &str) -> Result<()>;
    /// Live subscriptions that no node has claimed and whose work has waited since before
    /// `stale_before`: a handshake owed since then, or an oldest undelivered event (or a retry
    /// time) that old. A node's scan asks for all waiting work (`stale_before` now) to take
    /// what it is preferred for, and for work waiting a lease or longer to take anything a
    /// live node is not getting to (`delivery::run`).
    async fn due_subscriptions(
        &self,
        stale_before: &StoredInstant,
        limit: usize,
    ) -> Result<Vec<SubscriptionId>>;
    /// The generation of the subscription table: it moves with every subscription write.
    async fn subscription_generation(&self) -> Result<i64>;
    /// What changed in the subscription table after `generation`.
    async fn subscription_changes_since(&self, generation: i64) -> Result<SubscriptionChanges>;
    /// Removes delivered events that happened before `before`; returns how many.
    async fn prune_events(&self, before: &StoredInstant) -> Result<u64>;

    // The audit trail.
    /// Records AuditEvents on their own, in one write (a Task write's is written with the
    /// write; the others come through `audit_queue::AuditQueue`).
    async fn record_audits(&self, records: Vec<crate::audit::AuditRecord>) -> Result<()>;
    /// One page of an AuditEvent search.
    async fn search_audit(&self, query: &audit_sql::AuditQuery)
    -> Result<Vec<audit_sql::AuditRow>>;
    /// One AuditEvent by id, as stored.
    async fn read_audit(&self, id: &str) -> Result<Option<String>>;
    /// Removes AuditEvents recorded before `before`; returns how many.
    async fn prune_audit(&self, before: &StoredInstant) -> Result<u64>;

    // Due dates.
    /// Live, non-terminal Tasks whose due date passed by `now` and was not yet reported, as
    /// `(task id, due date)`.
    async fn overdue_tasks(
        &self,
        now: &StoredInstant,
        limit: usize,
    ) -> Result<Vec<(TaskId, StoredInstant)>>;
    /// Reports one Task overdue for one due date — a marker and an `overdue` change event in
    /// one transaction — unless already reported or no longer overdue. True if reported.
    async fn mark_overdue(
        &self,
        task_id: &TaskId,
        due_at: &StoredInstant,
        now: &StoredInstant,
    ) -> Result<bool>;
    /// The earliest unreported due date after `now`, to know when to look again.
    async fn next_due(&self, now: &StoredInstant) -> Result<Option<StoredInstant>>;

    /// The depths this store's writes are admitted against (see `pressure`).
    fn pressure(&self) -> &pressure::Pressure;
    /// Checks that the database answers, for `/readyz`.
    async fn ping(&self) -> Result<()>;
    /// Finishes queued writes and closes the database cleanly.
    async fn close(&self);
}

#[cfg(test)]
mod stamp_tests {
    use super::*;
    use serde_json::json;

    /// What `stamp_with` did with `value["key"] = …` before it looked keys up first.
    fn stamped_by_index(mut resource: Value, id: &str, version: Version, at: &str) -> Value {
        resource["id"] = json!(id);
        if !resource.get("meta").is_some_and(Value::is_object) {
            resource["meta"] = json!({});
        }
        resource["meta"]["versionId"] = json!(version.to_string());
        resource["meta"]["lastUpdated"] = json!(at);
        resource
    }

    /// The stamp is the one assignment by index made, key order included (the stored text
    /// and a staged create's mark depend on it), whatever the resource held before.
    #[test]
    fn stamp_with_sets_what_assignment_by_index_set() {
        let resources = [
            Value::Null,
            json!({}),
            json!({"resourceType": "Task", "status": "requested"}),
            json!({"id": "old", "resourceType": "Task", "meta": {"lastUpdated": "x", "tag": []}}),
            json!({"resourceType": "Task", "meta": "not an object", "id": 7}),
            json!({"resourceType": "Task", "meta": {"versionId": "1", "lastUpdated": "t"}, "id": "a"}),
        ];
        for resource in resources {
            for (version, at) in [(Version::FIRST, "t"), (Version::FIRST.next(), "u")] {
                let mut stamped = resource.clone();
                stamp_with(&mut stamped, "a", version, at);
                let expected = stamped_by_index(resource.clone(), "a", version, at);
                assert_eq!(stamped.to_string(), expected.to_string(), "{resource}");
            }
        }
    }
}
