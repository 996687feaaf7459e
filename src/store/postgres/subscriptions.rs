//! PostgreSQL statements of a subscription write: `store::subscriptions::SubscriptionTx` on a
//! connection, inside the caller's transaction. Concurrent writes are ordered by two locks,
//! always taken in the same order so that no two writes wait on each other: the row a
//! replace or delete changes first, then the subscription generation (`take_turn`), which
//! every subscription write takes and holds until commit.

use sqlx::postgres::PgConnection;

use super::pg_text;
use crate::auth::Identity;
use crate::error::Result;
use crate::fhir::ids::{ChangeSeq, SubscriptionId};
use crate::store::owner_columns;
use crate::store::rows::subscription_from_row;
use crate::store::subscriptions::{Failures, NewSubscription, SubscriptionTx, SubscriptionUpdate};
use crate::store::{MatchingFormRow, StoredSubscription};

impl SubscriptionTx for PgConnection {
    /// The subscription generation the write takes, which its rows carry: a node catching up
    /// on subscription writes reads those numbered above the generation it has seen.
    type Turn = i64;

    /// The subscription, locked until the transaction ends: a concurrent write waits here,
    /// then sees this one's result.
    async fn load_for_replace(
        &mut self,
        id: &SubscriptionId,
    ) -> Result<Option<StoredSubscription>> {
        load(
            self,
            "SELECT * FROM subscription WHERE id = $1 FOR UPDATE",
            id,
        )
        .await
    }

    /// Takes the next subscription generation. The row stays locked until the transaction
    /// ends, so subscription writes commit in generation order: a node that has read
    /// generation `g` has seen every write numbered `g` or below.
    async fn take_turn(&mut self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "UPDATE subscription_generation SET generation = generation + 1 RETURNING generation",
        )
        .fetch_one(&mut *self)
        .await?)
    }

    /// Counted under the generation's row lock (`take_turn`), which every subscription write
    /// holds until it ends, so writes are counted one after another: under READ COMMITTED
    /// this statement sees every write that held the lock before, and none can commit until
    /// this one ends.
    async fn count_live(&mut self, owner: &Identity) -> Result<i64> {
        let [issuer, subject, role, fhir_user] = owner_columns(owner).map(pg_text);
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM subscription
             WHERE author_subject = $1 AND author_role = $2 AND author_fhir_user = $3
               AND author_issuer = $4 AND status <> 'off'",
        )
        .bind(subject.as_ref())
        .bind(role.as_ref())
        .bind(fhir_user.as_ref())
        .bind(issuer.as_ref())
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

    async fn insert(&mut self, row: &NewSubscription<'_>, generation: i64) -> Result<()> {
        let c = &row.columns;
        let [issuer, subject, role, fhir_user] = owner_columns(row.owner).map(pg_text);
        sqlx::query(
            "INSERT INTO subscription (id, version, last_updated, status, topic_url, channel_type, endpoint,
               author, resource, created_after_seq, handshake_pending, generation,
               author_issuer, author_subject, author_role, author_fhir_user, matching)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
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
        .bind(c.handshake_pending as i32)
        .bind(generation)
        .bind(issuer.as_ref())
        .bind(subject.as_ref())
        .bind(role.as_ref())
        .bind(fhir_user.as_ref())
        .bind(c.matching)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn update(&mut self, row: &SubscriptionUpdate<'_>, generation: i64) -> Result<()> {
        let c = &row.columns;
        sqlx::query(
            "UPDATE subscription SET version = $1, last_updated = $2, status = $3, topic_url = $4,
               channel_type = $5, endpoint = $6, resource = $7, handshake_pending = $8,
               failures = CASE WHEN $9 THEN 0 ELSE failures END,
               failing_since = CASE WHEN $9 THEN NULL ELSE failing_since END,
               next_attempt_at = CASE WHEN $9 THEN NULL ELSE next_attempt_at END,
               generation = $10, author = $12, matching = $13
             WHERE id = $11",
        )
        .bind(c.version)
        .bind(c.last_updated)
        .bind(c.status.as_str())
        .bind(c.topic_url)
        .bind(c.channel_type.as_str())
        .bind(c.endpoint)
        .bind(c.resource)
        .bind(c.handshake_pending as i32)
        .bind(row.failures == Failures::Cleared)
        .bind(generation)
        .bind(c.id)
        .bind(c.author)
        .bind(c.matching)
        .execute(&mut *self)
        .await?;
        Ok(())
    }

    async fn reload(&mut self, id: &SubscriptionId) -> Result<Option<StoredSubscription>> {
        load(self, "SELECT * FROM subscription WHERE id = $1", id).await
    }

    async fn delete_row(&mut self, id: &SubscriptionId) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM subscription WHERE id = $1")
            .bind(id)
            .execute(&mut *self)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn delete_events(&mut self, id: &SubscriptionId) -> Result<()> {
        sqlx::query("DELETE FROM subscription_event WHERE subscription_id = $1")
            .bind(id)
            .execute(&mut *self)
            .await?;
        Ok(())
    }

    /// A tombstone numbered with the deletion's generation, which `subscription_changes_since`
    /// reports.
    async fn note_deletion(&mut self, id: &SubscriptionId, generation: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO subscription_tombstone (id, generation) VALUES ($1, $2)
             ON CONFLICT (id) DO UPDATE SET generation = excluded.generation",
        )
        .bind(id)
        .bind(generation)
        .execute(&mut *self)
        .await?;
        Ok(())
    }
}

/// Writes matching forms derived at start-up in one statement, each only onto the version it
/// was derived from.
pub(super) async fn fill_matching_forms(
    pool: &sqlx::PgPool,
    forms: Vec<MatchingFormRow>,
) -> Result<()> {
    let mut ids = Vec::with_capacity(forms.len());
    let mut versions = Vec::with_capacity(forms.len());
    let mut texts = Vec::with_capacity(forms.len());
    for form in forms {
        ids.push(form.id.as_str().to_owned());
        versions.push(form.version.get());
        texts.push(form.matching);
    }
    sqlx::query(
        "UPDATE subscription s SET matching = f.matching
         FROM unnest($1::text[], $2::bigint[], $3::text[]) AS f(id, version, matching)
         WHERE s.id = f.id AND s.version = f.version",
    )
    .bind(ids)
    .bind(versions)
    .bind(texts)
    .execute(pool)
    .await?;
    Ok(())
}

/// The subscription `select` finds by id (`$1`).
async fn load(
    conn: &mut PgConnection,
    select: &'static str,
    id: &SubscriptionId,
) -> Result<Option<StoredSubscription>> {
    let row = sqlx::query(select)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.as_ref().map(subscription_from_row).transpose()
}
