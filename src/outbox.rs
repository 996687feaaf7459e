//! The outbox consumer: reads committed Task changes in `seq` order right after each commit,
//! matches them against the subscription index, and records the matches with their event
//! numbers in one transaction together with the consumer's cursor. A crash between commits
//! replays from the persisted cursor, so no change is skipped and none is numbered twice.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::delivery::DeliveryHandle;
use crate::error::Result;
use crate::fhir::search::index_task;
use crate::matcher::topic::Topic;
use crate::matcher::{Change, Side, SubscriptionIndex};
use crate::store::{ChangeEvent, MatchRow, Store};

/// The cursor name of the matcher in `outbox_cursor`.
pub const MATCHER: &str = "matcher";

/// How many changes are matched and recorded in one transaction.
const BATCH: usize = 512;

/// If a wake-up is ever missed, the consumer still looks this often.
const POLL: Duration = Duration::from_secs(1);

pub struct Outbox {
    pub store: Arc<dyn Store>,
    pub topics: Arc<Vec<Topic>>,
    pub index: Arc<RwLock<SubscriptionIndex>>,
    pub delivery: DeliveryHandle,
    pub base_url: String,
}

impl Outbox {
    /// Runs until `shutdown`, woken by `committed` after each Task commit.
    pub async fn run(self, committed: Arc<Notify>, shutdown: CancellationToken) {
        let mut cursor = loop {
            match self.store.outbox_cursor(MATCHER).await {
                Ok(seq) => break seq,
                Err(e) => {
                    tracing::error!(error = %crate::error::error_chain(&e), "reading the outbox cursor failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(POLL) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        };
        tracing::info!(cursor, "outbox consumer started");
        let mut last_persisted = std::time::Instant::now();
        while !shutdown.is_cancelled() {
            let changes = match self.store.change_events_after(cursor, BATCH).await {
                Ok(changes) => changes,
                Err(e) => {
                    tracing::error!(error = %crate::error::error_chain(&e), "reading the outbox failed");
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            };
            if changes.is_empty() {
                tokio::select! {
                    () = committed.notified() => {}
                    () = tokio::time::sleep(POLL) => {}
                    () = shutdown.cancelled() => break,
                }
                continue;
            }
            let persist = last_persisted.elapsed() >= POLL;
            match self.process(&changes, persist).await {
                Ok((through, persisted)) => {
                    cursor = through;
                    if persisted {
                        last_persisted = std::time::Instant::now();
                    }
                }
                Err(e) => {
                    tracing::error!(error = %crate::error::error_chain(&e), "matching a batch of changes failed; retrying");
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }

    /// Matches a batch of changes and records the result; returns the new cursor and whether
    /// it was persisted. A batch that matched nothing is not written unless `persist` asks:
    /// after a crash such changes are read again and, matched again, still match nothing (a
    /// subscription created since is gated by `created_after_seq`), so the persisted cursor
    /// may lag by up to `POLL` without skipping or repeating any event.
    async fn process(&self, changes: &[ChangeEvent], persist: bool) -> Result<(i64, bool)> {
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
        let versions: HashMap<(String, i64), Value> = self
            .store
            .versions(&keys)
            .await?
            .into_iter()
            .filter_map(|v| v.resource.map(|r| ((v.id, v.version), r)))
            .collect();

        let mut rows = Vec::new();
        {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            for change in changes.iter().filter(|c| c.resource_type == "Task") {
                let current = versions.get(&(change.resource_id.clone(), change.version));
                let previous = change
                    .previous_version
                    .and_then(|v| versions.get(&(change.resource_id.clone(), v)));
                let current_index = current.map(|r| index_task(r, &self.base_url));
                let previous_index = previous.map(|r| index_task(r, &self.base_url));
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
                for candidate in index.match_change(&self.topics, &view, &self.base_url) {
                    rows.push(MatchRow {
                        subscription_id: candidate.id.clone(),
                        change_seq: change.seq,
                        task_id: change.resource_id.clone(),
                        version: change.version,
                        interaction: change.interaction,
                        occurred_at: change.recorded_at.clone(),
                    });
                }
            }
        }
        let through = changes.last().map_or(0, |c| c.seq);
        let matched = rows.len();
        if rows.is_empty() && !persist {
            metrics::counter!("baton_changes_matched_total").increment(changes.len() as u64);
            return Ok((through, false));
        }
        let numbered = self.store.record_matches(MATCHER, through, rows).await?;
        let woken: BTreeSet<String> = numbered.into_iter().map(|(id, _)| id).collect();
        for id in woken {
            self.delivery.wake(&id);
        }
        metrics::counter!("baton_changes_matched_total").increment(changes.len() as u64);
        metrics::counter!("baton_events_total").increment(matched as u64);
        metrics::histogram!("baton_match_batch_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            changes = changes.len(),
            matched,
            through,
            "matched a batch of changes"
        );
        Ok((through, true))
    }
}
