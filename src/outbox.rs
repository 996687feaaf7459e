//! The outbox consumer: reads committed Task changes in `seq` order right after each commit,
//! matches them against the subscription index, and records the matches with their event
//! numbers in one transaction together with the consumer's cursor. A crash between commits
//! replays from the persisted cursor, so no change is skipped and none is numbered twice.
//!
//! In a cluster exactly one node matches at a time: the one holding the `matcher` lease in
//! the store, renewed as it works. The store refuses a batch from a node that lost the lease,
//! so two nodes can never number the same change. Before matching a batch the consumer brings
//! its index up to the store's subscription generation, so a subscription written on another
//! node is in force for every change committed after it, whether or not its Redis notice came.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, error_chain};
use crate::fhir::ids::{ChangeSeq, SubscriptionId, TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::fhir::search::index_task;
use crate::hub::{Hub, Occasion};
use crate::matcher::{Change, Side};
use crate::store::{ChangeEvent, MatchBatch, MatchRow, Store};

/// The cursor name of the matcher in `outbox_cursor`.
pub const MATCHER: &str = "matcher";

/// How many changes are matched and recorded in one transaction.
const BATCH: usize = 512;

/// If a wake-up is ever missed, the consumer still looks this often.
const POLL: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Outbox {
    pub store: Arc<dyn Store>,
    /// The hub: the subscription index matched against, and the scheduler's inbox.
    pub hub: Arc<Hub>,
    /// This node's name in the matcher lease.
    pub node: String,
    /// How long the lease outlives a node that stops renewing it.
    pub lease: Duration,
    /// The subscription generation the index was loaded at.
    pub generation: i64,
}

impl Outbox {
    /// Runs until `shutdown`, woken by `wake` after Task commits (on any node).
    pub async fn run(mut self, wake: Arc<Notify>, shutdown: CancellationToken) {
        // Renewing at a third of the lease leaves two chances before it would expire.
        let renew_every = self.lease / 3;
        let pause = POLL.min(renew_every);
        let idle = async |shutdown: &CancellationToken| {
            tokio::select! {
                () = wake.notified() => true,
                () = tokio::time::sleep(pause) => true,
                () = shutdown.cancelled() => false,
            }
        };
        let mut leading: Option<std::time::Instant> = None;
        let mut cursor = ChangeSeq::ZERO;
        let mut last_persisted = std::time::Instant::now();
        while !shutdown.is_cancelled() {
            if leading.is_none_or(|renewed| renewed.elapsed() >= renew_every) {
                match self
                    .store
                    .acquire_lease(MATCHER, &self.node, self.lease)
                    .await
                {
                    Ok(true) => {
                        if leading.is_none() {
                            match self.store.outbox_cursor(MATCHER).await {
                                Ok(seq) => cursor = seq,
                                Err(e) => {
                                    tracing::error!(error = %error_chain(&e), "reading the outbox cursor failed; retrying");
                                    if !idle(&shutdown).await {
                                        break;
                                    }
                                    continue;
                                }
                            }
                            tracing::info!(cursor = cursor.get(), node = %self.node, "this node now matches changes");
                        }
                        leading = Some(std::time::Instant::now());
                        self.hub.matching.store(true, Ordering::Relaxed);
                    }
                    Ok(false) => {
                        if leading.take().is_some() {
                            tracing::warn!(node = %self.node, "the matcher lease passed to another node");
                        }
                        self.hub.matching.store(false, Ordering::Relaxed);
                        if !idle(&shutdown).await {
                            break;
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %error_chain(&e), "renewing the matcher lease failed");
                        leading = None;
                        self.hub.matching.store(false, Ordering::Relaxed);
                        if !idle(&shutdown).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            let changes = match self.store.change_events_after(cursor, BATCH).await {
                Ok(changes) => changes,
                Err(e) => {
                    tracing::error!(error = %error_chain(&e), "reading the outbox failed");
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            if changes.is_empty() {
                if !idle(&shutdown).await {
                    break;
                }
                continue;
            }
            // Read after the changes: every subscription committed before them is included.
            if let Err(e) = self.catch_up_subscriptions().await {
                tracing::error!(error = %error_chain(&e), "reading subscription changes failed; retrying");
                tokio::time::sleep(POLL).await;
                continue;
            }
            let persist = !self.store.outbox_in_commit_order() || last_persisted.elapsed() >= POLL;
            match self.process(&changes, persist).await {
                Ok((through, persisted)) => {
                    cursor = through;
                    self.note_lag(changes.len(), through).await;
                    if persisted {
                        last_persisted = std::time::Instant::now();
                    }
                }
                Err(e) => {
                    // Also how a node that lost the lease mid-batch learns it: the store
                    // refused the batch, and the next renewal fails.
                    tracing::error!(error = %error_chain(&e), "matching a batch of changes failed; retrying");
                    leading = None;
                    tokio::time::sleep(POLL).await;
                }
            }
        }
        self.hub.matching.store(false, Ordering::Relaxed);
        if leading.is_some() {
            // Hand over at once rather than after the lease runs out.
            let _ = self.store.release_lease(MATCHER, &self.node).await;
        }
    }

    /// Tells the store's back-pressure (and `/metrics`) how many committed changes wait to
    /// be matched: when a batch came back full, how far the newest change is beyond it;
    /// otherwise the batch was all there was when it was read.
    async fn note_lag(&self, read: usize, through: ChangeSeq) {
        let lag = if read < BATCH {
            0
        } else {
            match self.store.last_change_seq().await {
                Ok(last) => u64::try_from(last.get() - through.get()).unwrap_or(0),
                // Unknown this time: the last figure stands until the next batch.
                Err(_) => return,
            }
        };
        self.store.pressure().set_fanout_lag(lag);
    }

    /// Applies the subscriptions written since the index's generation (on any node).
    async fn catch_up_subscriptions(&mut self) -> Result<()> {
        let generation = self.store.subscription_generation().await?;
        if generation == self.generation {
            return Ok(());
        }
        let changes = self
            .store
            .subscription_changes_since(self.generation)
            .await?;
        for id in &changes.deleted {
            self.hub.withdraw(id, Occasion::CatchUp);
        }
        for stored in &changes.changed {
            self.hub.put_in_force(stored, Occasion::CatchUp);
        }
        tracing::debug!(
            from = self.generation,
            to = changes.generation,
            changed = changes.changed.len(),
            deleted = changes.deleted.len(),
            "subscription index caught up"
        );
        self.generation = changes.generation;
        Ok(())
    }

    /// Matches a batch of changes and records the result; returns the new cursor and whether
    /// it was persisted. A batch that matched nothing is not written unless `persist` asks:
    /// after a crash such changes are read again and, matched again, still match nothing (a
    /// subscription created since is gated by `created_after_seq`), so the persisted cursor
    /// may lag by up to `POLL` without skipping or repeating any event.
    #[tracing::instrument(
        name = "outbox.batch",
        skip_all,
        fields(
            change.from = changes.first().map_or(0, |c| c.seq.get()),
            change.to = changes.last().map_or(0, |c| c.seq.get()),
            changes = changes.len(),
        )
    )]
    async fn process(&self, changes: &[ChangeEvent], persist: bool) -> Result<(ChangeSeq, bool)> {
        let started = std::time::Instant::now();
        let mut keys = Vec::with_capacity(changes.len() * 2);
        for change in changes {
            if change.resource_type != "Task" {
                continue;
            }
            keys.push((change.resource_id.clone(), change.version));
            if let Some(previous) = change.previous_version {
                keys.push((change.resource_id.clone(), previous));
            }
        }
        let versions: HashMap<(TaskId, Version), Value> = self
            .store
            .versions(&keys)
            .await?
            .into_iter()
            .filter_map(|v| v.resource.map(|r| ((v.id, v.version), r)))
            .collect();
        self.hub.shared.keep_current(changes, &versions);

        let mut rows = Vec::new();
        {
            let index = self.hub.index.read().unwrap_or_else(|e| e.into_inner());
            for change in changes.iter().filter(|c| c.resource_type == "Task") {
                let current = versions.get(&(change.resource_id.clone(), change.version));
                let previous = change
                    .previous_version
                    .and_then(|v| versions.get(&(change.resource_id.clone(), v)));
                // A version the store could not read back (see `Store::versions`) cannot be
                // matched; the change is passed over, once and loudly, rather than holding up
                // every change behind it.
                let unreadable = (change.interaction != Interaction::Delete && current.is_none())
                    || (change.previous_version.is_some() && previous.is_none());
                if unreadable {
                    metrics::counter!("baton_changes_skipped_total", "reason" => "unreadable")
                        .increment(1);
                    tracing::error!(change.seq = change.seq.get(), task.id = %change.resource_id, task.version = change.version.get(), "a change refers to a Task version that cannot be read; it is not matched");
                    continue;
                }
                let current_index = current.map(|r| index_task(r, &self.hub.base_url));
                let previous_index = previous.map(|r| index_task(r, &self.hub.base_url));
                let view = Change {
                    seq: change.seq,
                    interaction: change.interaction,
                    previous: previous
                        .zip(previous_index.as_ref())
                        .map(|(resource, index)| Side { resource, index }),
                    current: current
                        .zip(current_index.as_ref())
                        .map(|(resource, index)| Side { resource, index }),
                };
                for subscription_id in
                    index.match_change(&self.hub.topics, &view, &self.hub.base_url)
                {
                    rows.push(MatchRow {
                        subscription_id,
                        change_seq: change.seq,
                        task_id: change.resource_id.clone(),
                        version: change.version,
                        interaction: change.interaction,
                        occurred_at: change.recorded_at.clone(),
                    });
                }
            }
        }
        let through = changes.last().map_or(ChangeSeq::ZERO, |c| c.seq);
        let matched = rows.len();
        if rows.is_empty() && !persist {
            metrics::counter!("baton_changes_matched_total").increment(changes.len() as u64);
            return Ok((through, false));
        }
        let numbered = self
            .store
            .record_matches(MatchBatch {
                consumer: MATCHER.to_string(),
                holder: self.node.clone(),
                changes: changes.iter().map(|c| c.seq).collect(),
                matches: rows,
            })
            .await?;
        let woken: BTreeSet<SubscriptionId> = numbered.into_iter().map(|(id, _)| id).collect();
        for id in woken {
            self.hub.delivery.wake(&id);
        }
        metrics::counter!("baton_changes_matched_total").increment(changes.len() as u64);
        metrics::counter!("baton_events_total").increment(matched as u64);
        metrics::histogram!("baton_match_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            changes = changes.len(),
            matched,
            through = through.get(),
            "matched a batch of changes"
        );
        Ok((through, true))
    }
}
