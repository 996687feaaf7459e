//! SQLite statements of a subscription write: `store::subscriptions::SubscriptionTx` on the
//! writer thread's connection (rusqlite), inside its transaction. The single writer runs one
//! job at a time, so nothing can slip in between a job's reads (the row it replaces, a quota
//! count) and its writes: there is no lock to take and no turn to wait for.

use std::sync::LazyLock;

use rusqlite::{Connection, OptionalExtension, params};

use crate::auth::Identity;
use crate::error::Result;
use crate::fhir::ids::{ChangeSeq, SubscriptionId};
use crate::store::owner_columns;
use crate::store::rows::{SUBSCRIPTION_COLUMNS, SubscriptionRow};
use crate::store::subscriptions::{Failures, NewSubscription, SubscriptionTx, SubscriptionUpdate};
use crate::store::{MatchingFormRow, StoredSubscription};

impl SubscriptionTx for Connection {
    /// Nothing: the single writer is one line already.
    type Turn = ();

    async fn load_for_replace(
        &mut self,
        id: &SubscriptionId,
    ) -> Result<Option<StoredSubscription>> {
        load(self, id)
    }

    async fn take_turn(&mut self) -> Result<()> {
        Ok(())
    }

    async fn count_live(&mut self, owner: &Identity) -> Result<i64> {
        let [issuer, subject, role, fhir_user] = owner_columns(owner);
        Ok(self
            .prepare_cached(
                "SELECT count(*) FROM subscription
                 WHERE author_subject = ? AND author_role = ? AND author_fhir_user = ?
                   AND author_issuer = ? AND status <> 'off'",
            )?
            .query_row(params![subject, role, fhir_user, issuer], |row| row.get(0))?)
    }

    async fn last_change_seq(&mut self) -> Result<ChangeSeq> {
        Ok(self
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM change_event")?
            .query_row([], |row| row.get(0))?)
    }

    async fn insert(&mut self, row: &NewSubscription<'_>, _turn: ()) -> Result<()> {
        let c = &row.columns;
        let [issuer, subject, role, fhir_user] = owner_columns(row.owner);
        self.prepare_cached(
            "INSERT INTO subscription (id, version, last_updated, status, topic_url, channel_type, endpoint,
               author, resource, created_after_seq, handshake_pending,
               author_issuer, author_subject, author_role, author_fhir_user, matching)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?
        .execute(params![
            c.id,
            c.version,
            c.last_updated,
            c.status.as_str(),
            c.topic_url,
            c.channel_type.as_str(),
            c.endpoint,
            c.author,
            c.resource,
            row.created_after_seq,
            c.handshake_pending,
            issuer,
            subject,
            role,
            fhir_user,
            c.matching,
        ])?;
        Ok(())
    }

    async fn update(&mut self, row: &SubscriptionUpdate<'_>, _turn: ()) -> Result<()> {
        let c = &row.columns;
        let cleared = row.failures == Failures::Cleared;
        self.prepare_cached(
            "UPDATE subscription SET version = ?, last_updated = ?, status = ?, topic_url = ?,
               channel_type = ?, endpoint = ?, resource = ?, matching = ?, author = ?,
               handshake_pending = ?,
               failures = CASE WHEN ? THEN 0 ELSE failures END,
               failing_since = CASE WHEN ? THEN NULL ELSE failing_since END,
               next_attempt_at = CASE WHEN ? THEN NULL ELSE next_attempt_at END
             WHERE id = ?",
        )?
        .execute(params![
            c.version,
            c.last_updated,
            c.status.as_str(),
            c.topic_url,
            c.channel_type.as_str(),
            c.endpoint,
            c.resource,
            c.matching,
            c.author,
            c.handshake_pending,
            cleared,
            cleared,
            cleared,
            c.id,
        ])?;
        Ok(())
    }

    async fn reload(&mut self, id: &SubscriptionId) -> Result<Option<StoredSubscription>> {
        load(self, id)
    }

    async fn delete_row(&mut self, id: &SubscriptionId) -> Result<bool> {
        let deleted = self
            .prepare_cached("DELETE FROM subscription WHERE id = ?")?
            .execute([id])?;
        Ok(deleted > 0)
    }

    async fn delete_events(&mut self, id: &SubscriptionId) -> Result<()> {
        self.prepare_cached("DELETE FROM subscription_event WHERE subscription_id = ?")?
            .execute([id])?;
        Ok(())
    }

    /// Nothing: the only node updates its subscription index in-process (see
    /// `SqliteStore::subscription_changes_since`).
    async fn note_deletion(&mut self, _id: &SubscriptionId, _turn: ()) -> Result<()> {
        Ok(())
    }
}

/// Writes matching forms derived at start-up, each only onto the version it was derived from.
pub(super) fn fill_matching_forms(conn: &Connection, forms: &[MatchingFormRow]) -> Result<()> {
    let mut update =
        conn.prepare_cached("UPDATE subscription SET matching = ? WHERE id = ? AND version = ?")?;
    for form in forms {
        update.execute(params![form.matching, form.id, form.version])?;
    }
    Ok(())
}

static LOAD: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscription WHERE id = ?"));

/// A subscription by id, on the writer's connection or a point-read connection.
pub(super) fn load(conn: &Connection, id: &SubscriptionId) -> Result<Option<StoredSubscription>> {
    let row = conn
        .prepare_cached(&LOAD)?
        .query_row([id], SubscriptionRow::from_rusqlite)
        .optional()?;
    row.map(SubscriptionRow::into_subscription).transpose()
}
