//! The rules of a subscription write, once for both stores.
//!
//! What creating, replacing and deleting a subscription mean is decided here: the author's
//! live quota counted inside the write, the server-owned parts of the resource stamped (id,
//! meta, status), the version bumped, a re-activation starting a fresh run, the owner fixed
//! at creation, the event log going with the subscription. Each backend supplies only its
//! statements, through `SubscriptionTx`, and its own way of ordering concurrent writes:
//! SQLite's single writer runs one at a time; PostgreSQL locks the row a replace changes and
//! then the subscription generation, which every subscription write takes before it counts
//! or writes. A rule changed here therefore holds on both backends.

use serde_json::json;

use super::{StoredSubscription, SubscriptionDecide, SubscriptionRecord, stamp};
use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::fhir::ids::{ChangeSeq, ChannelType, StoredInstant, SubscriptionId, Version};
use crate::fhir::notification::SubscriptionStatus;

/// What a backend does inside the transaction of one subscription write, with its own SQL.
/// Every method takes the transaction (or connection) it runs on as `&mut self`, and nothing
/// in the signatures belongs to a database driver, so any SQLite or PostgreSQL client can
/// implement it.
pub(crate) trait SubscriptionTx {
    /// A write's place in the order of subscription writes (see `take_turn`), which its
    /// statements carry.
    type Turn: Send;

    /// The subscription a replace changes (None if it does not exist), held so that nothing
    /// changes it before the transaction ends: SQLite's single writer runs one write at a
    /// time; PostgreSQL locks the row.
    async fn load_for_replace(&mut self, id: &SubscriptionId)
    -> Result<Option<StoredSubscription>>;

    /// Puts this write in line behind every subscription write before it. Every write takes
    /// its turn before it counts an owner's live subscriptions and before it writes, and
    /// holds it until its transaction ends, so quota counts never overlap: PostgreSQL takes
    /// the next subscription generation, whose row stays locked until commit; SQLite's single
    /// writer is one line already.
    async fn take_turn(&mut self) -> Result<Self::Turn>;

    /// How many live (not `off`) subscriptions `owner` holds, compared on every part of the
    /// identity.
    async fn count_live(&mut self, owner: &Identity) -> Result<i64>;

    /// The highest outbox `seq` committed so far, 0 when there is none.
    async fn last_change_seq(&mut self) -> Result<ChangeSeq>;

    /// Writes a new subscription row, with delivery state at its start (no events, no
    /// failures).
    async fn insert(&mut self, row: &NewSubscription<'_>, turn: Self::Turn) -> Result<()>;

    /// Replaces a subscription's columns. The owner columns, event counters and delivered
    /// position are left alone.
    async fn update(&mut self, row: &SubscriptionUpdate<'_>, turn: Self::Turn) -> Result<()>;

    /// A subscription as this transaction sees it after its write.
    async fn reload(&mut self, id: &SubscriptionId) -> Result<Option<StoredSubscription>>;

    /// Deletes a subscription's row; false if there was none.
    async fn delete_row(&mut self, id: &SubscriptionId) -> Result<bool>;

    /// Deletes a subscription's event log.
    async fn delete_events(&mut self, id: &SubscriptionId) -> Result<()>;

    /// Records, in turn, that a subscription was deleted, for nodes that catch up on
    /// subscription writes (PostgreSQL's tombstone); a store that serves one node has nothing
    /// to record.
    async fn note_deletion(&mut self, id: &SubscriptionId, turn: Self::Turn) -> Result<()>;
}

/// The columns a create or a replace writes, as both backends store them.
#[derive(Debug)]
pub(crate) struct SubscriptionColumns<'a> {
    pub id: &'a SubscriptionId,
    pub version: Version,
    pub last_updated: &'a StoredInstant,
    pub status: SubscriptionStatus,
    pub topic_url: &'a str,
    pub channel_type: ChannelType,
    pub endpoint: Option<&'a str>,
    /// The author's principal, as JSON text.
    pub author: &'a str,
    /// The resource as stored: JSON text, with its id, meta and status set.
    pub resource: &'a str,
    /// The hub's matching form of `resource`, written with it so that start-up reads what
    /// is stored.
    pub matching: &'a str,
    pub handshake_pending: bool,
}

/// A subscription being created.
#[derive(Debug)]
pub(crate) struct NewSubscription<'a> {
    pub columns: SubscriptionColumns<'a>,
    /// Who owns it, for good (see `owner_columns`).
    pub owner: &'a Identity,
    /// Changes at or below this outbox position happened before the subscription existed.
    pub created_after_seq: ChangeSeq,
}

/// A subscription being replaced.
#[derive(Debug)]
pub(crate) struct SubscriptionUpdate<'a> {
    pub columns: SubscriptionColumns<'a>,
    /// What becomes of the failures of earlier delivery attempts.
    pub failures: Failures,
}

/// What a replace does with the delivery failures a subscription has on record: its
/// `failures`, `failing_since` and `next_attempt_at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failures {
    Kept,
    /// Cleared: the subscription starts a fresh run.
    Cleared,
}

/// The refusal of a subscription write that would take its author past its quota. Waiting
/// frees nothing, so there is no `Retry-After`.
pub(crate) fn quota_exceeded(quota: usize) -> Error {
    Error::client(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        crate::error::IssueCode::Throttled,
        format!(
            "the author already holds {quota} live subscriptions, the most one author may \
             hold (limits.subscriptions_per_author); delete one of them, or set one's status \
             to off, to free a slot"
        ),
    )
}

/// Whether a write that leaves a subscription `after` (coming from `before`, None on create)
/// takes one more live slot of its owner's quota.
pub(crate) fn takes_live_slot(
    before: Option<SubscriptionStatus>,
    after: SubscriptionStatus,
) -> bool {
    after != SubscriptionStatus::Off && before.is_none_or(|b| b == SubscriptionStatus::Off)
}

/// Creates a subscription from what the API made of a client's resource.
pub(crate) async fn create<T: SubscriptionTx>(
    tx: &mut T,
    mut record: SubscriptionRecord,
) -> Result<StoredSubscription> {
    let id = SubscriptionId::generate();
    let now = StoredInstant::now();
    stamp_record(&mut record, &id, Version::FIRST, &now);
    let turn = tx.take_turn().await?;
    check_quota(tx, &record.owner, &record, None).await?;
    // Changes already committed belong to the past of this subscription: the matcher skips them.
    let created_after_seq = tx.last_change_seq().await?;
    let (author, resource) = (record.author.to_string(), record.resource.to_string());
    let row = NewSubscription {
        columns: columns(&record, &id, Version::FIRST, &now, &author, &resource),
        owner: &record.owner,
        created_after_seq,
    };
    tx.insert(&row, turn).await?;
    reloaded(tx, &id, "a created subscription vanished").await
}

/// Replaces a subscription with what `decide` makes of the stored one, inside the
/// transaction, so that its If-Match and ownership checks see the version they replace.
pub(crate) async fn replace<T: SubscriptionTx>(
    tx: &mut T,
    id: &SubscriptionId,
    decide: SubscriptionDecide,
) -> Result<StoredSubscription> {
    let current = tx
        .load_for_replace(id)
        .await?
        .ok_or_else(|| Error::not_found(format!("Subscription/{id} does not exist")))?;
    let mut record = decide(&current)?;
    let version = current.version.next();
    let now = StoredInstant::now();
    stamp_record(&mut record, id, version, &now);
    let turn = tx.take_turn().await?;
    // A subscription never changes hands: the slot it takes is its stored owner's, and the
    // owner columns are not written.
    check_quota(tx, &current.owner, &record, Some(current.status)).await?;
    // A re-activation starts a fresh run: a new handshake, no inherited failures.
    let failures = if record.handshake_pending {
        Failures::Cleared
    } else {
        Failures::Kept
    };
    let (author, resource) = (record.author.to_string(), record.resource.to_string());
    let row = SubscriptionUpdate {
        columns: columns(&record, id, version, &now, &author, &resource),
        failures,
    };
    tx.update(&row, turn).await?;
    reloaded(tx, id, "a replaced subscription vanished").await
}

/// Deletes a subscription and its event log; false if it did not exist. The row goes first,
/// as a replace locks it first, so that two writes to one subscription cannot wait on each
/// other.
pub(crate) async fn delete<T: SubscriptionTx>(tx: &mut T, id: &SubscriptionId) -> Result<bool> {
    if !tx.delete_row(id).await? {
        return Ok(false);
    }
    tx.delete_events(id).await?;
    let turn = tx.take_turn().await?;
    tx.note_deletion(id, turn).await?;
    Ok(true)
}

/// Sets the server-owned parts of the resource: id, meta, and the status the hub gave it.
fn stamp_record(
    record: &mut SubscriptionRecord,
    id: &SubscriptionId,
    version: Version,
    now: &StoredInstant,
) {
    stamp(&mut record.resource, id.as_str(), version, now);
    record.resource["status"] = json!(record.status.as_str());
}

/// Refuses the write when it would take `owner` past the record's quota: only a write that
/// takes a new live slot is counted, and the count runs in the write's turn (see
/// `SubscriptionTx::take_turn`), so concurrent writes cannot overshoot it.
async fn check_quota<T: SubscriptionTx>(
    tx: &mut T,
    owner: &Identity,
    record: &SubscriptionRecord,
    before: Option<SubscriptionStatus>,
) -> Result<()> {
    let Some(quota) = record.live_quota else {
        return Ok(());
    };
    if !takes_live_slot(before, record.status) {
        return Ok(());
    }
    if tx.count_live(owner).await? >= i64::try_from(quota).unwrap_or(i64::MAX) {
        return Err(quota_exceeded(quota));
    }
    Ok(())
}

fn columns<'a>(
    record: &'a SubscriptionRecord,
    id: &'a SubscriptionId,
    version: Version,
    now: &'a StoredInstant,
    author: &'a str,
    resource: &'a str,
) -> SubscriptionColumns<'a> {
    SubscriptionColumns {
        id,
        version,
        last_updated: now,
        status: record.status,
        topic_url: &record.topic_url,
        channel_type: record.channel_type,
        endpoint: record.endpoint.as_deref(),
        author,
        resource,
        matching: &record.matching,
        handshake_pending: record.handshake_pending,
    }
}

async fn reloaded<T: SubscriptionTx>(
    tx: &mut T,
    id: &SubscriptionId,
    problem: &'static str,
) -> Result<StoredSubscription> {
    tx.reload(id)
        .await?
        .ok_or_else(|| Error::internal(problem, "missing row"))
}

#[cfg(test)]
mod tests;
