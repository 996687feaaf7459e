//! The outbox consumer: reads committed Task changes in `seq` order right after each commit,
//! matches them against the subscription index, and records the matches with their event
//! numbers together with the consumer's cursor, in chunks of at most `hub.fanout_chunk`
//! matches, one store transaction each, awaited one after the other: on SQLite each chunk is
//! one writer job, so Task writes queued behind a large fan-out commit between its chunks.
//! A change's matches are recorded in subscription-id order, and a chunk that ends inside a
//! change persists how far it got (`ChangeProgress`) with the cursor. A crash between
//! commits replays from the persisted cursor and progress, so no change is skipped, none is
//! numbered twice, and a change half recorded resumes after the last subscription recorded.
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
use crate::signals::Signals;
use crate::store::{ChangeEvent, ChangeProgress, MatchBatch, MatchRow, Store};
use crate::telemetry;
use crate::trace::TraceContext;

/// The cursor name of the matcher in `outbox_cursor`.
pub const MATCHER: &str = "matcher";

/// How many changes are matched and recorded in one transaction.
const BATCH: usize = 512;

/// If a wake-up is ever missed, the consumer still looks this often.
const POLL: Duration = Duration::from_secs(1);

/// Matches per change from which a batch counts as a broad fan-out, after which the consumer
/// lingers (`hub.fanout_linger_ms`) before reading the next batch.
const BROAD_MATCHES_PER_CHANGE: usize = 16;

/// What `Outbox::process` did with a batch of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Processed {
    /// The last change of the batch: the cursor from now on.
    pub through: ChangeSeq,
    /// Whether the cursor was written to the store with the batch.
    pub persisted: bool,
    /// Matches recorded, over all the batch's changes.
    pub matched: usize,
}

/// Whether the consumer waits `linger` before reading the next batch, after one of `read`
/// changes with `matched` matches: only after a broad fan-out (a change heard by many
/// subscriptions), and never while changes are backlogged (a full batch). A broad listener
/// matches every change, so the changes gathered while waiting extend its run in the event
/// log rather than start another: the same rows and pages are written once per batch instead
/// of once per commit, which is what the SQLite writer spends its time on beside such a
/// fan-out (BENCHMARKS.md, "a Task PUT beside the websocket fan-out").
fn lingers(linger: Duration, read: usize, matched: usize) -> bool {
    !linger.is_zero() && read < BATCH && matched >= BROAD_MATCHES_PER_CHANGE * read.max(1)
}

#[derive(Clone)]
pub struct Outbox {
    pub store: Arc<dyn Store>,
    /// The hub: the subscription index matched against, the scheduler's inbox, and which
    /// node each subscription's deliveries prefer.
    pub hub: Arc<Hub>,
    /// How the other nodes are woken for the subscriptions that prefer them.
    pub signals: Arc<dyn Signals>,
    /// This node's name in the matcher lease.
    pub node: String,
    /// How long the lease outlives a node that stops renewing it.
    pub lease: Duration,
    /// The subscription generation the index was loaded at.
    pub generation: i64,
    /// Most matches recorded in one store transaction (`hub.fanout_chunk`).
    pub fanout_chunk: usize,
    /// How long to wait after a broad fan-out before reading the next batch
    /// (`hub.fanout_linger_ms`; zero: never).
    pub fanout_linger: Duration,
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
        // Where recording stopped inside a change, read with the cursor on taking the lease.
        let mut resume: Option<ChangeProgress> = None;
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
                            let read = async {
                                Ok::<_, crate::error::Error>((
                                    self.store.outbox_cursor(MATCHER).await?,
                                    self.store.match_progress(MATCHER).await?,
                                ))
                            };
                            match read.await {
                                Ok((seq, progress)) => {
                                    cursor = seq;
                                    resume = progress;
                                }
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
            match self.process(&changes, persist, resume.clone()).await {
                Ok(done) => {
                    cursor = done.through;
                    resume = None;
                    self.note_lag(changes.len(), done.through).await;
                    if done.persisted {
                        last_persisted = std::time::Instant::now();
                    }
                    if lingers(self.fanout_linger, changes.len(), done.matched) {
                        tokio::select! {
                            () = tokio::time::sleep(self.fanout_linger) => {}
                            () = shutdown.cancelled() => break,
                        }
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

    /// Matches a batch of changes and records the matches in chunks of at most
    /// `fanout_chunk`, each awaited before the next is sent, so that Task writes queued
    /// meanwhile commit between chunks; returns the new cursor and whether anything was
    /// written. A change's matches are recorded in subscription-id order, and a chunk that
    /// ends inside a change records how far it got (`ChangeProgress`) in its transaction:
    /// after a crash the change is matched again and recording resumes after that id (a
    /// subscription created since is gated by `created_after_seq`; one deleted or `off` is
    /// skipped when numbered), so no number is repeated or skipped. `resume` is that progress
    /// as read from the store when this node took the lease.
    ///
    /// A batch that matched nothing is not written unless `persist` asks: after a crash such
    /// changes are read again and, matched again, still match nothing, so the persisted
    /// cursor may lag by up to `POLL` without skipping or repeating any event.
    #[tracing::instrument(
        name = "outbox.batch",
        skip_all,
        fields(
            change.from = changes.first().map_or(0, |c| c.seq.get()),
            change.to = changes.last().map_or(0, |c| c.seq.get()),
            changes = changes.len(),
        )
    )]
    async fn process(
        &self,
        changes: &[ChangeEvent],
        persist: bool,
        resume: Option<ChangeProgress>,
    ) -> Result<Processed> {
        let started = std::time::Instant::now();
        let started_at = std::time::SystemTime::now();
        // With no subscription in force (read after the catch-up, so every subscription
        // committed before these changes counts) nothing can match: the versions are not read,
        // parsed nor indexed, and a Task write costs the hub a cursor step. A subscription
        // put in force after this look was committed after these changes, and its
        // `created_after_seq` keeps them from it anyway.
        let nobody_listens = self
            .hub
            .index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        let versions = if nobody_listens {
            HashMap::new()
        } else {
            let versions = self.load_versions(changes).await?;
            self.hub.shared.keep_current(changes, &versions);
            versions
        };
        let chunk_size = self.fanout_chunk.max(1);
        let mut chunk = Chunk {
            matches: Vec::with_capacity(chunk_size),
            changes: Vec::new(),
            resumed: resume.clone(),
        };
        let mut written = false;
        let mut matched = 0;
        // Per change made in a trace, how many subscriptions it matched: a span each once
        // they are recorded (only when spans are exported).
        let mut traced: Vec<(TraceContext, ChangeSeq, usize)> = Vec::new();
        for change in changes {
            let mut ids = match nobody_listens {
                true => Vec::new(),
                false => self.match_change(change, &versions),
            };
            if let Some(resume) = resume.as_ref().filter(|r| r.seq == change.seq) {
                ids.retain(|id| *id > resume.through);
            }
            matched += ids.len();
            if telemetry::exporting()
                && let Some(trace) = change.traceparent.as_deref().and_then(TraceContext::parse)
            {
                traced.push((trace, change.seq, ids.len()));
            }
            let mut recorded = 0;
            loop {
                let room = chunk_size.saturating_sub(chunk.matches.len()).max(1);
                let end = ids.len().min(recorded + room);
                chunk
                    .matches
                    .extend(ids[recorded..end].iter().map(|id| MatchRow {
                        subscription_id: id.clone(),
                        change_seq: change.seq,
                    }));
                recorded = end;
                let Some(through) = ids[..recorded].last().filter(|_| recorded < ids.len()) else {
                    chunk.changes.push(change.seq);
                    break;
                };
                // The chunk is full inside this change: recorded up to `through`.
                let progress = ChangeProgress {
                    seq: change.seq,
                    through: through.clone(),
                };
                self.record_chunk(&mut chunk, Some(progress)).await?;
                written = true;
            }
            if chunk.matches.len() >= chunk_size {
                self.record_chunk(&mut chunk, None).await?;
                written = true;
            }
        }
        let through = changes.last().map_or(ChangeSeq::ZERO, |c| c.seq);
        if !chunk.matches.is_empty() || (persist && !chunk.changes.is_empty()) {
            self.record_chunk(&mut chunk, None).await?;
            written = true;
        }
        let ended_at = std::time::SystemTime::now();
        for (trace, seq, matches) in traced {
            telemetry::export(telemetry::FinishedSpan {
                name: "outbox.match".into(),
                kind: opentelemetry::trace::SpanKind::Internal,
                context: trace.child(),
                parent: Some(telemetry::Parent {
                    span_id: trace.parts().1,
                    remote: false,
                }),
                start: started_at,
                end: ended_at,
                attributes: vec![
                    opentelemetry::KeyValue::new("baton.change.seq", seq.get()),
                    opentelemetry::KeyValue::new(
                        "baton.subscriptions.matched",
                        i64::try_from(matches).unwrap_or(i64::MAX),
                    ),
                ],
                error: None,
            });
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
        Ok(Processed {
            through,
            persisted: written,
            matched,
        })
    }

    /// The Task versions a batch of changes needs to be matched (each change's version and
    /// the one before it), read in one call.
    async fn load_versions(
        &self,
        changes: &[ChangeEvent],
    ) -> Result<HashMap<(TaskId, Version), Value>> {
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
        Ok(self
            .store
            .versions(&keys)
            .await?
            .into_iter()
            .filter_map(|v| v.resource.map(|r| ((v.id, v.version), r)))
            .collect())
    }

    /// The subscriptions one change matches, in id order: the order they are numbered and
    /// recorded in, which `ChangeProgress` counts on. The index is read-locked only for this
    /// change, never across a store call.
    fn match_change(
        &self,
        change: &ChangeEvent,
        versions: &HashMap<(TaskId, Version), Value>,
    ) -> Vec<SubscriptionId> {
        if change.resource_type != "Task" {
            return Vec::new();
        }
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
            metrics::counter!("baton_changes_skipped_total", "reason" => "unreadable").increment(1);
            tracing::error!(change.seq = change.seq.get(), task.id = %change.resource_id, task.version = change.version.get(), "a change refers to a Task version that cannot be read; it is not matched");
            return Vec::new();
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
        let mut ids = {
            let index = self.hub.index.read().unwrap_or_else(|e| e.into_inner());
            index.match_change(&self.hub.topics, &view, &self.hub.base_url)
        };
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Records a chunk (one store transaction), ending at `progress` inside a change or at a
    /// change boundary, and wakes the delivery of every subscription it numbered events for:
    /// on the node each prefers (`hub::nodes`), this one's scheduler directly, another's
    /// through the signals while Redis carries them (otherwise here).
    async fn record_chunk(
        &self,
        chunk: &mut Chunk,
        progress: Option<ChangeProgress>,
    ) -> Result<()> {
        let batch = MatchBatch {
            consumer: MATCHER.to_string(),
            holder: self.node.clone(),
            changes: std::mem::take(&mut chunk.changes),
            matches: std::mem::replace(
                &mut chunk.matches,
                Vec::with_capacity(self.fanout_chunk.max(1)),
            ),
            resumed: chunk.resumed.take(),
            progress: progress.clone(),
        };
        let numbered = self.store.record_matches(batch).await?;
        chunk.resumed = progress;
        metrics::counter!("baton_fanout_chunks_total").increment(1);
        let woken: BTreeSet<SubscriptionId> = numbered.into_iter().map(|(id, _)| id).collect();
        // Without Redis (a cluster may run without it, or it is down) another node would only
        // find the work at its next scan: this node delivers it then, as the claims allow.
        let others_hear = self.signals.redis_state() == Some("ok");
        for (node, ids) in self.hub.nodes.by_node(woken) {
            if node == self.hub.node || !others_hear {
                for id in &ids {
                    self.hub.delivery.wake(id);
                }
            } else {
                self.signals.wake_delivery(&node, ids);
            }
        }
        Ok(())
    }
}

/// Matches gathered for the next store transaction.
struct Chunk {
    matches: Vec<MatchRow>,
    /// The changes whose matches are all recorded once these are.
    changes: Vec<ChangeSeq>,
    /// The progress inside a change the previous chunk ended at.
    resumed: Option<ChangeProgress>,
}

#[cfg(test)]
pub(crate) mod tests;
