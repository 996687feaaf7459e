//! How stored rows read back, once for both stores: one `sqlx::FromRow` shape per stored
//! type, generic over the database, and one conversion into the store's own type. The rows
//! SQLite reads through rusqlite (the writer inside its transaction, the delivery path's point
//! reads) fill the same shapes (`from_rusqlite`) by position, from statements that name their
//! columns in the shape's order (`CURRENT_COLUMNS`, `SUBSCRIPTION_COLUMNS`,
//! `hub_sql::SUBSCRIPTION_EVENTS`): a lookup by name compares the name with every column's
//! for each value read, which under a broad fan-out was ~4 % of the server (BENCHMARKS.md,
//! issue 15). The two
//! schemas name and type their columns alike; the flags (`task.deleted`,
//! `subscription.handshake_pending`) are integers in both (SQLite `INTEGER`, PostgreSQL
//! `integer`) and are read here, as `i32`, into booleans. Ids, counters and instants decode
//! straight into their own types (`fhir::ids`, transparent for the driver); the codes (status,
//! channel type, interaction) are parsed here, an unknown one being an internal error.

use sqlx::{FromRow, Row};

use super::owner_from_columns;
use super::{
    ChangeEvent, CurrentTask, EventRecord, HistoryVersion, Interaction, ListedTask,
    LiveSubscription, StoredSubscription, StoredVersion,
};
use crate::error::{Error, Result};
use crate::fhir::ids::{
    ChangeSeq, ChannelType, EventNumber, StoredInstant, SubscriptionId, TaskId, Version,
};
use crate::fhir::notification::SubscriptionStatus;

/// The columns of the current Task (table `task t`) that `TaskRow` reads.
pub(crate) const CURRENT_COLUMNS: &str = "t.id, t.version, t.last_updated, t.deleted, t.resource";

/// How many columns `CURRENT_COLUMNS` names; a search page's sort values follow them.
const CURRENT_COLUMN_COUNT: usize = 5;

/// The columns of `subscription` that `SubscriptionRow` reads, in the order
/// `SubscriptionRow::from_rusqlite` reads them.
pub(crate) const SUBSCRIPTION_COLUMNS: &str = "id, version, last_updated, status, topic_url, \
     channel_type, endpoint, author, author_issuer, author_subject, author_role, \
     author_fhir_user, resource, created_after_seq, events_since_start, delivered_through, \
     handshake_pending, failures, failing_since, next_attempt_at, last_error, last_sent_at, \
     rewinds";

/// The sort values a search page's row read by rusqlite carries after the Task.
pub(crate) fn read_sort_values_rusqlite(
    row: &rusqlite::Row<'_>,
    count: usize,
) -> rusqlite::Result<Vec<Option<String>>> {
    (CURRENT_COLUMN_COUNT..CURRENT_COLUMN_COUNT + count)
        .map(|i| row.get::<_, Option<String>>(i))
        .collect()
}

/// The sort values a search page's row carries after the Task (`search_sql::page_sql`).
pub(crate) fn read_sort_values<R: Row>(row: &R, count: usize) -> Result<Vec<Option<String>>>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    (CURRENT_COLUMN_COUNT..CURRENT_COLUMN_COUNT + count)
        .map(|i| Ok(row.try_get::<Option<String>, _>(i)?))
        .collect()
}

/// A row of `task`.
#[derive(FromRow)]
pub(crate) struct TaskRow {
    id: TaskId,
    version: Version,
    last_updated: StoredInstant,
    deleted: i32,
    resource: String,
}

/// The current state of a Task.
pub(crate) fn current_from_row<R: Row>(row: &R) -> Result<CurrentTask>
where
    TaskRow: for<'r> FromRow<'r, R>,
{
    TaskRow::from_row(row)?.into_current()
}

/// A Task row of a search page, its JSON left as stored (see `ListedTask`).
pub(crate) fn listed_from_row<R: Row>(row: &R) -> Result<ListedTask>
where
    TaskRow: for<'r> FromRow<'r, R>,
{
    Ok(TaskRow::from_row(row)?.into_listed())
}

impl TaskRow {
    /// The same row read through rusqlite, by position: the columns in the order of
    /// `CURRENT_COLUMNS`.
    pub(crate) fn from_rusqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
        Ok(TaskRow {
            id: row.get(0)?,
            version: row.get(1)?,
            last_updated: row.get(2)?,
            deleted: row.get(3)?,
            resource: row.get(4)?,
        })
    }

    /// The Task of a search page, its JSON not parsed.
    pub(crate) fn into_listed(self) -> ListedTask {
        ListedTask {
            id: self.id,
            version: self.version,
            last_updated: self.last_updated,
            json: self.resource,
        }
    }

    /// The current state of the Task.
    pub(crate) fn into_current(self) -> Result<CurrentTask> {
        Ok(CurrentTask {
            id: self.id,
            version: self.version,
            last_updated: self.last_updated,
            deleted: self.deleted != 0,
            resource: serde_json::from_str(&self.resource)
                .map_err(|e| Error::internal("a stored Task is not valid JSON", e))?,
        })
    }
}

/// A row of `task_version`.
#[derive(FromRow)]
pub(crate) struct VersionRow {
    id: TaskId,
    version: Version,
    last_updated: StoredInstant,
    interaction: String,
    resource: Option<String>,
}

/// One version from a Task's history.
pub(crate) fn version_from_row<R: Row>(row: &R) -> Result<StoredVersion>
where
    VersionRow: for<'r> FromRow<'r, R>,
{
    let row = VersionRow::from_row(row)?;
    Ok(StoredVersion {
        id: row.id,
        version: row.version,
        last_updated: row.last_updated,
        interaction: interaction(row.interaction, "unknown interaction in history")?,
        resource: row
            .resource
            .map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| Error::internal("a stored Task version is not valid JSON", e))?,
        text: None,
    })
}

/// The content a deletion deleted, joined to it in the type-level history.
#[derive(FromRow)]
pub(crate) struct DeletedRow {
    deleted_resource: Option<String>,
}

/// One version of the type-level history (`search_sql::history_sql`).
pub(crate) fn history_from_row<R: Row>(row: &R) -> Result<HistoryVersion>
where
    VersionRow: for<'r> FromRow<'r, R>,
    DeletedRow: for<'r> FromRow<'r, R>,
{
    let version = version_from_row(row)?;
    let deleted = DeletedRow::from_row(row)?
        .deleted_resource
        .filter(|_| version.resource.is_none())
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| Error::internal("a stored Task version is not valid JSON", e))?;
    Ok(HistoryVersion { version, deleted })
}

/// A row of `change_event` (PostgreSQL's `matched` flag is not read).
#[derive(FromRow)]
pub(crate) struct ChangeRow {
    seq: ChangeSeq,
    resource_type: String,
    resource_id: TaskId,
    version: Version,
    previous_version: Option<Version>,
    interaction: String,
    recorded_at: StoredInstant,
    traceparent: Option<String>,
}

/// One change event of the outbox.
pub(crate) fn change_from_row<R: Row>(row: &R) -> Result<ChangeEvent>
where
    ChangeRow: for<'r> FromRow<'r, R>,
{
    let row = ChangeRow::from_row(row)?;
    Ok(ChangeEvent {
        seq: row.seq,
        resource_type: row.resource_type,
        resource_id: row.resource_id,
        version: row.version,
        previous_version: row.previous_version,
        interaction: interaction(row.interaction, "unknown interaction in outbox")?,
        recorded_at: row.recorded_at,
        traceparent: row.traceparent,
    })
}

/// A row of `subscription_event`.
#[derive(FromRow)]
pub(crate) struct EventRow {
    event_number: EventNumber,
    change_seq: ChangeSeq,
    task_id: TaskId,
    version: Version,
    interaction: String,
    occurred_at: StoredInstant,
    traceparent: Option<String>,
}

/// One entry of a subscription's event log.
pub(crate) fn event_from_row<R: Row>(row: &R) -> Result<EventRecord>
where
    EventRow: for<'r> FromRow<'r, R>,
{
    EventRow::from_row(row)?.into_record()
}

impl EventRow {
    /// The same row read on a rusqlite connection, by position: the columns in the order
    /// of `hub_sql::SUBSCRIPTION_EVENTS`.
    pub(crate) fn from_rusqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
        Ok(EventRow {
            event_number: row.get(0)?,
            change_seq: row.get(1)?,
            task_id: row.get(2)?,
            version: row.get(3)?,
            interaction: row.get(4)?,
            occurred_at: row.get(5)?,
            traceparent: row.get(6)?,
        })
    }

    pub(crate) fn into_record(self) -> Result<EventRecord> {
        Ok(EventRecord {
            event_number: self.event_number,
            change_seq: self.change_seq,
            task_id: self.task_id,
            version: self.version,
            interaction: interaction(self.interaction, "unknown interaction in the event log")?,
            occurred_at: self.occurred_at,
            traceparent: self.traceparent,
        })
    }
}

/// The columns of `subscription` start-up reads (`hub_sql::LIVE_COLUMNS`).
#[derive(FromRow)]
pub(crate) struct LiveRow {
    id: SubscriptionId,
    version: Version,
    status: String,
    author: String,
    matching: Option<String>,
    resource: Option<String>,
    created_after_seq: ChangeSeq,
}

/// A live subscription as start-up reads it.
pub(crate) fn live_from_row<R: Row>(row: &R) -> Result<LiveSubscription>
where
    LiveRow: for<'r> FromRow<'r, R>,
{
    LiveRow::from_row(row)?.into_live()
}

impl LiveRow {
    /// The same row read through rusqlite (SQLite's start-up read), by position: the columns
    /// in the order of `hub_sql::LIVE_COLUMNS`.
    pub(crate) fn from_rusqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<LiveRow> {
        Ok(LiveRow {
            id: row.get(0)?,
            version: row.get(1)?,
            status: row.get(2)?,
            author: row.get(3)?,
            matching: row.get(4)?,
            resource: row.get(5)?,
            created_after_seq: row.get(6)?,
        })
    }

    /// The live subscription this row holds.
    pub(crate) fn into_live(self) -> Result<LiveSubscription> {
        Ok(LiveSubscription {
            id: self.id,
            version: self.version,
            status: SubscriptionStatus::parse(&self.status).ok_or_else(|| {
                Error::internal("unknown subscription status in the store", self.status)
            })?,
            author: self.author,
            matching: self.matching,
            resource: self.resource,
            created_after_seq: self.created_after_seq,
        })
    }
}

/// A row of `subscription` (the columns both schemas have; PostgreSQL's generation and
/// delivery claim are not read).
#[derive(FromRow)]
pub(crate) struct SubscriptionRow {
    id: SubscriptionId,
    version: Version,
    last_updated: StoredInstant,
    status: String,
    topic_url: String,
    channel_type: String,
    endpoint: Option<String>,
    author: String,
    author_issuer: String,
    author_subject: String,
    author_role: String,
    author_fhir_user: String,
    resource: String,
    created_after_seq: ChangeSeq,
    events_since_start: EventNumber,
    delivered_through: EventNumber,
    handshake_pending: i32,
    failures: i64,
    failing_since: Option<StoredInstant>,
    next_attempt_at: Option<StoredInstant>,
    last_error: Option<String>,
    last_sent_at: Option<StoredInstant>,
    rewinds: i64,
}

/// A stored subscription.
pub(crate) fn subscription_from_row<R: Row>(row: &R) -> Result<StoredSubscription>
where
    SubscriptionRow: for<'r> FromRow<'r, R>,
{
    SubscriptionRow::from_row(row)?.into_subscription()
}

impl SubscriptionRow {
    /// The same row read through rusqlite, by position: the columns in the order of
    /// `SUBSCRIPTION_COLUMNS`.
    pub(crate) fn from_rusqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<SubscriptionRow> {
        Ok(SubscriptionRow {
            id: row.get(0)?,
            version: row.get(1)?,
            last_updated: row.get(2)?,
            status: row.get(3)?,
            topic_url: row.get(4)?,
            channel_type: row.get(5)?,
            endpoint: row.get(6)?,
            author: row.get(7)?,
            author_issuer: row.get(8)?,
            author_subject: row.get(9)?,
            author_role: row.get(10)?,
            author_fhir_user: row.get(11)?,
            resource: row.get(12)?,
            created_after_seq: row.get(13)?,
            events_since_start: row.get(14)?,
            delivered_through: row.get(15)?,
            handshake_pending: row.get(16)?,
            failures: row.get(17)?,
            failing_since: row.get(18)?,
            next_attempt_at: row.get(19)?,
            last_error: row.get(20)?,
            last_sent_at: row.get(21)?,
            rewinds: row.get(22)?,
        })
    }

    /// The stored subscription this row holds.
    pub(crate) fn into_subscription(self) -> Result<StoredSubscription> {
        let row = self;
        Ok(StoredSubscription {
            id: row.id,
            version: row.version,
            last_updated: row.last_updated,
            status: SubscriptionStatus::parse(&row.status).ok_or_else(|| {
                Error::internal("unknown subscription status in the store", row.status)
            })?,
            topic_url: row.topic_url,
            channel_type: ChannelType::parse(&row.channel_type).ok_or_else(|| {
                Error::internal(
                    "unknown subscription channel type in the store",
                    row.channel_type,
                )
            })?,
            endpoint: row.endpoint,
            author: serde_json::from_str(&row.author)
                .map_err(|e| Error::internal("a stored subscription author is not JSON", e))?,
            owner: owner_from_columns(
                row.author_issuer,
                row.author_subject,
                row.author_role,
                row.author_fhir_user,
            )?,
            resource: serde_json::from_str(&row.resource)
                .map_err(|e| Error::internal("a stored Subscription is not JSON", e))?,
            created_after_seq: row.created_after_seq,
            events_since_start: row.events_since_start,
            delivered_through: row.delivered_through,
            handshake_pending: row.handshake_pending != 0,
            failures: row.failures,
            failing_since: row.failing_since,
            next_attempt_at: row.next_attempt_at,
            last_error: row.last_error,
            last_sent_at: row.last_sent_at,
            rewinds: row.rewinds,
        })
    }
}

/// A stored interaction, or the internal error `problem` for one this version does not know.
pub(crate) fn interaction(text: String, problem: &'static str) -> Result<Interaction> {
    Interaction::parse(&text).ok_or_else(|| Error::internal(problem, text))
}
