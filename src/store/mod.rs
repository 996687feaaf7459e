//! Durable storage of Tasks, their history and the change-event outbox.
//!
//! The API talks to the `Store` trait only; `sqlite` is the embedded implementation (a
//! PostgreSQL one follows for cluster mode). Writes are described as data plus a decision
//! closure (`WriteRequest`) that the store runs inside its transaction against the current
//! version, so If-Match checks, the state machine and the role rules see exactly the version
//! they replace, and a Task write and its change event always commit together.

pub mod search_sql;
pub mod sqlite;

use async_trait::async_trait;
use serde_json::Value;

use crate::error::Result;
use crate::fhir::search::{Predicate, SortKey};

/// What a stored version records about how it came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Create,
    Update,
    Delete,
}

impl Interaction {
    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
        }
    }

    pub fn parse(text: &str) -> Option<Interaction> {
        match text {
            "create" => Some(Interaction::Create),
            "update" => Some(Interaction::Update),
            "delete" => Some(Interaction::Delete),
            _ => None,
        }
    }
}

/// The current state of a Task, including a tombstone when it was deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct CurrentTask {
    pub id: String,
    pub version: i64,
    pub last_updated: String,
    pub deleted: bool,
    /// The current content; for a deleted Task, the content before the delete.
    pub resource: Value,
}

/// One version from the history.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVersion {
    pub id: String,
    pub version: i64,
    pub last_updated: String,
    pub interaction: Interaction,
    /// `None` for a delete.
    pub resource: Option<Value>,
}

/// What the decision closure of a change wants done.
#[derive(Debug)]
pub enum Decision {
    /// Store this content as the next version (or the first, if the Task does not exist).
    Put(Value),
    /// Delete the Task.
    Delete,
    /// Nothing to write (e.g. deleting what is already deleted).
    Keep,
}

/// Runs inside the store's transaction with the current state (None if the id never existed).
pub type Decide = Box<dyn FnOnce(Option<&CurrentTask>) -> Result<Decision> + Send>;

pub enum WriteRequest {
    /// Create with a server-assigned id; with `if_none_exist`, only when no Task matches.
    Create {
        resource: Value,
        if_none_exist: Option<Vec<Predicate>>,
    },
    /// Update, patch, delete, or update-as-create of the Task with this id.
    Change { id: String, decide: Decide },
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
    pub seq: i64,
    pub resource_type: String,
    pub resource_id: String,
    pub version: i64,
    pub previous_version: Option<i64>,
    pub interaction: Interaction,
    pub recorded_at: String,
}

/// A page of search results.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchPage {
    pub tasks: Vec<CurrentTask>,
    pub total: Option<u64>,
}

/// What a search asks the store for.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<'a> {
    pub predicates: &'a [Predicate],
    pub sort: &'a [SortKey],
    pub count: usize,
    pub offset: usize,
    pub with_total: bool,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies one write in a transaction together with its history row and change event.
    async fn write(&self, request: WriteRequest) -> Result<WriteOutcome>;
    async fn read(&self, id: &str) -> Result<Option<CurrentTask>>;
    async fn read_version(&self, id: &str, version: i64) -> Result<Option<StoredVersion>>;
    /// Versions newest first, and how many there are in all.
    async fn history(
        &self,
        id: &str,
        count: usize,
        offset: usize,
    ) -> Result<(Vec<StoredVersion>, u64)>;
    async fn search(&self, page: PageRequest<'_>) -> Result<SearchPage>;
    /// Live Tasks whose `partOf` names one of `parents` (as `Task/id`) and that match `scope`.
    async fn children_of(
        &self,
        parents: &[String],
        scope: &[Predicate],
        limit: usize,
    ) -> Result<Vec<CurrentTask>>;
    /// Outbox rows after `seq`, oldest first.
    async fn change_events_after(&self, seq: i64, limit: usize) -> Result<Vec<ChangeEvent>>;
    /// The highest committed outbox `seq`, 0 when empty.
    async fn last_change_seq(&self) -> Result<i64>;
    /// Checks that the database answers, for `/readyz`.
    async fn ping(&self) -> Result<()>;
    /// Finishes queued writes and closes the database cleanly.
    async fn close(&self);
}
