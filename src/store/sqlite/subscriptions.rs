//! SQLite statements of a subscription write: `store::subscriptions::SubscriptionTx` on the
//! writer's connection, inside its transaction. The single writer runs one job at a time, so
//! nothing can slip in between a job's reads (the row it replaces, a quota count) and its
//! writes: there is no lock to take and no turn to wait for.

use sqlx::sqlite::SqliteConnection;

use crate::auth::Identity;
use crate::error::Result;
use crate::fhir::ids::{ChangeSeq, SubscriptionId};
use crate::store::StoredSubscription;
use crate::store::owner_columns;
use crate::store::rows::subscription_from_row;
use crate::store::subscriptions::{Failures, NewSubscription, SubscriptionTx, SubscriptionUpdate};

impl SubscriptionTx for SqliteConnection {
    /// Nothing: the single writer is one line already.
    type Turn = ();

    async fn load_for_replace(
        &mut self,
        id: &SubscriptionId,
    ) -> Result<Option<StoredSubscription>> {
        load(self, id).await
    }

    async fn take_turn(&mut self) -> Result<()> {
        Ok(())
    }

    async fn count_live(&mut self, owner: &Identity) -> Result<i64> {
        let [issuer, subject, role, fhir_user] = owner_columns(owner);
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM subscription
             WHERE author_subject = ? AND author_role = ? AND author_fhir_user = ?
               AND author_issuer = ? AND status <> 'off'",
        )
        .bind(subject)
        .bind(role)
        .bind(fhir_user)
        .bind(issuer)
        .fetch_one(&mut *self)
        .await?)
    }

    async fn last_change_seq(&mut self) -> Result<ChangeSeq> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM change_event")
                .fetch_one(&mut *self)
                .await?,
        )
    }

    async fn insert(&mut self, row: &NewSubscription<'_>, _turn: ()) -> Result<()> {
        let c = &row.columns;
        let [issuer, subject, role, fhir_user] = owner_columns(row.owner);
        sqlx::query(
            "INSERT INTO subscription (id, version, last_updated, status, topic_url, channel_type, endpoint,
               author, resource, created_after_seq, handshake_pending,
               author_issuer, author_subject, author_role, author_fhir_user)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(c.id)
        .bind(c.version)
        .bind(c.last_updated)
        .bind(c.status.as_str())
        .bind(c.topic_url)
        .bind(c.channel_type.as_str())
        .bind(c.endpoint)
        .bind(c.author)
        .bind(c.resource)
        .bind(row.created_after_seq)
        .bind(c.handshake_pending as i64)
        .bind(issuer)
        .bind(subject)
        .bind(role)
        .bind(fhir_user)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn update(&mut self, row: &SubscriptionUpdate<'_>, _turn: ()) -> Result<()> {
        let c = &row.columns;
        let cleared = row.failures == Failures::Cleared;
        sqlx::query(
            "UPDATE subscription SET version = ?, last_updated = ?, status = ?, topic_url = ?,
               channel_type = ?, endpoint = ?, resource = ?, author = ?, handshake_pending = ?,
               failures = CASE WHEN ? THEN 0 ELSE failures END,
               failing_since = CASE WHEN ? THEN NULL ELSE failing_since END,
               next_attempt_at = CASE WHEN ? THEN NULL ELSE next_attempt_at END
             WHERE id = ?",
        )
        .bind(c.version)
        .bind(c.last_updated)
        .bind(c.status.as_str())
        .bind(c.topic_url)
        .bind(c.channel_type.as_str())
        .bind(c.endpoint)
        .bind(c.resource)
        .bind(c.author)
        .bind(c.handshake_pending as i64)
        .bind(cleared)
        .bind(cleared)
        .bind(cleared)
        .bind(c.id)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn reload(&mut self, id: &SubscriptionId) -> Result<Option<StoredSubscription>> {
        load(self, id).await
    }

    async fn delete_row(&mut self, id: &SubscriptionId) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM subscription WHERE id = ?")
            .bind(id)
            .execute(&mut *self)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn delete_events(&mut self, id: &SubscriptionId) -> Result<()> {
        sqlx::query("DELETE FROM subscription_event WHERE subscription_id = ?")
            .bind(id)
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    /// Nothing: the only node updates its subscription index in-process (see
    /// `SqliteStore::subscription_changes_since`).
    async fn note_deletion(&mut self, _id: &SubscriptionId, _turn: ()) -> Result<()> {
        Ok(())
    }
}

async fn load(
    conn: &mut SqliteConnection,
    id: &SubscriptionId,
) -> Result<Option<StoredSubscription>> {
    let row = sqlx::query("SELECT * FROM subscription WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(subscription_from_row).transpose()
}
