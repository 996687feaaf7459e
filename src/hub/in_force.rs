//! Putting a subscription in force on this node, or withdrawing it: one path for the API's
//! writes, start-up, writes made on other nodes and the outbox's catch-up.
//!
//! "In force" means the matcher index holds it, so changes committed from now on are matched
//! against it; and, for a subscription written just now, that the scheduler knows its
//! heartbeat and tries it at once. A subscription that is `off`, or whose topic or filters
//! this hub no longer understands, is withdrawn instead. The occasion says how far either
//! reaches beyond the index.

use std::sync::Arc;
use std::time::Duration;

use super::{Hub, TopicNames, find_topic};
use crate::auth::Principal;
use crate::error::{Error, Result, error_chain};
use crate::fhir::ids::{ChangeSeq, SubscriptionId};
use crate::fhir::notification::SubscriptionStatus;
use crate::fhir::subscription::SubscriptionSpec;
use crate::matcher::Candidate;
use crate::matcher::topic::Topic;
use crate::store::{LiveSubscription, Store, StoredSubscription};
use serde_json::Value;

/// How many live subscriptions start-up reads at a time.
const START_UP_PAGE: usize = 20_000;

/// Why the hub looks at a subscription, which decides how far putting it in force or
/// withdrawing it reaches on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Occasion {
    /// Written just now: created, replaced or deleted through this node's API, or on another
    /// node and heard of through its notice. Reaches the matcher index, the scheduler and the
    /// sockets: in force, the scheduler takes its heartbeat and tries it at once (a back-off
    /// of its previous version, say a failing endpoint that was just corrected, does not
    /// apply to this one); withdrawn, the scheduler drops its timers and its sockets are
    /// unbound.
    Written,
    /// Loaded at start-up, before the first change is matched. Reaches the matcher index; the
    /// scheduler loads its own work from the store. Only a subscription this configuration
    /// cannot deliver (a stricter endpoint policy, no AMQP broker, a topic gone) is woken, so
    /// that its attempt records why in its status (`error`, or `off` when it can never match
    /// again) instead of leaving it `active` and silent.
    StartUp,
    /// Seen by the outbox catching its index up to the subscription generation. Reaches the
    /// matcher index only: the scheduler and sockets heard of the write itself or of its
    /// notice, and telling them again would cut short a back-off the write's attempt began.
    CatchUp,
}

/// Where a subscription stands once the hub has looked at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InForce {
    /// In the matcher index.
    Indexed,
    /// Out of the matcher index: off, or not understood.
    Withdrawn,
}

impl Hub {
    /// Puts a stored subscription in force on this node, or withdraws it when it is `off` or
    /// its topic and filters cannot be read.
    pub fn put_in_force(&self, stored: &StoredSubscription, occasion: Occasion) -> InForce {
        let parsed = self.parsed(stored);
        let spec = match &parsed {
            Ok(parsed) => parsed.for_matching().ok(),
            Err(_) => None,
        };
        let in_force = match spec.filter(|_| stored.status != SubscriptionStatus::Off) {
            Some(spec) => {
                self.file(stored, &spec);
                self.set_heartbeat(&stored.id, spec.heartbeat_period);
                if occasion == Occasion::Written {
                    self.delivery.set_heartbeat(
                        &stored.id,
                        spec.heartbeat_period.map(|p| Duration::from_secs(p.into())),
                    );
                    self.delivery.changed(&stored.id);
                }
                InForce::Indexed
            }
            None => {
                self.withdraw(&stored.id, occasion);
                InForce::Withdrawn
            }
        };
        if occasion == Occasion::StartUp {
            let undeliverable = match &parsed {
                Ok(parsed) => parsed.for_delivery().err().map(|e| error_chain(&e)),
                Err(e) => Some(error_chain(e)),
            };
            if let Some(why) = undeliverable {
                tracing::warn!(subscription.id = %stored.id, error = %why, "a stored subscription cannot be delivered with this configuration; its status will say why");
                self.delivery.wake(&stored.id);
            }
        }
        in_force
    }

    /// Withdraws a subscription from this node: deleted, `off`, or no longer understood.
    pub fn withdraw(&self, id: &SubscriptionId, occasion: Occasion) {
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        self.specs.forget(id);
        self.set_heartbeat(id, None);
        if occasion == Occasion::Written {
            self.delivery.forget(id);
            self.sockets.unbind_subscription(id);
        }
    }

    /// Puts a page of the live subscriptions read at start-up in force, as `put_in_force` with
    /// `Occasion::StartUp` does one by one: the page is parsed on every core, the specs are
    /// not kept (delivery parses again, and caches, what it delivers to), and the index takes
    /// the page under one lock. Blocking: call it off the async threads.
    pub fn put_in_force_at_start_up(&self, page: &[LiveSubscription]) -> Result<()> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = page.len().div_ceil(threads).max(1);
        let loaded: Vec<Result<Vec<StartUp>>> = std::thread::scope(|scope| {
            let parsing: Vec<_> = page
                .chunks(chunk)
                .map(|rows| {
                    scope.spawn(move || rows.iter().map(|row| self.start_up(row)).collect())
                })
                .collect();
            parsing
                .into_iter()
                .map(|thread| {
                    thread
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for loaded in loaded {
            for StartUp {
                id,
                candidate,
                heartbeat,
                undeliverable,
            } in loaded?
            {
                if let Some(candidate) = candidate {
                    index.insert(candidate);
                }
                self.set_heartbeat(&id, heartbeat);
                if let Some(why) = undeliverable {
                    tracing::warn!(subscription.id = %id, error = %why, "a stored subscription cannot be delivered with this configuration; its status will say why");
                    self.delivery.wake(&id);
                }
            }
        }
        Ok(())
    }

    /// What start-up makes of one live subscription.
    fn start_up(&self, row: &LiveSubscription) -> Result<StartUp> {
        let resource: Value = serde_json::from_str(&row.resource)
            .map_err(|e| Error::internal("a stored Subscription is not JSON", e))?;
        let parsed = self.parse_stored(&resource);
        let spec = match &parsed {
            Ok(parsed) => parsed.for_matching().ok(),
            Err(_) => None,
        };
        let spec = spec.filter(|_| row.status != SubscriptionStatus::Off);
        let candidate = spec.as_ref().and_then(|spec| {
            let author = serde_json::from_str::<Principal>(&row.author).ok();
            candidate(&self.topics, &row.id, author, row.created_after_seq, spec)
        });
        let undeliverable = match &parsed {
            Ok(parsed) => parsed.for_delivery().err().map(|e| error_chain(&e)),
            Err(e) => Some(error_chain(e)),
        };
        Ok(StartUp {
            id: row.id.clone(),
            candidate,
            heartbeat: spec.and_then(|spec| spec.heartbeat_period),
            undeliverable,
        })
    }

    /// Puts every live subscription in force (`Occasion::StartUp`), page by page, parsing one page
    /// while the store reads the next.
    pub async fn put_live_in_force(self: &Arc<Self>, store: &dyn Store) -> Result<()> {
        let started = std::time::Instant::now();
        let mut after: Option<SubscriptionId> = None;
        let mut parsing: Option<tokio::task::JoinHandle<Result<()>>> = None;
        let mut count = 0;
        loop {
            let page = store
                .live_subscription_page(after.as_ref(), START_UP_PAGE)
                .await?;
            if let Some(previous) = parsing.take() {
                previous
                    .await
                    .map_err(|e| Error::internal("parsing stored subscriptions failed", e))??;
            }
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            count += page.len();
            let full = page.len() == START_UP_PAGE;
            let hub = self.clone();
            parsing = Some(tokio::task::spawn_blocking(move || {
                hub.put_in_force_at_start_up(&page)
            }));
            if !full {
                break;
            }
        }
        if let Some(last) = parsing {
            last.await
                .map_err(|e| Error::internal("parsing stored subscriptions failed", e))??;
        }
        tracing::info!(
            subscriptions = count,
            duration_ms = started.elapsed().as_millis() as u64,
            "live subscriptions in force"
        );
        Ok(())
    }

    /// Follows a subscription written on another node: this node's index, scheduler and
    /// sockets take it as if it had been written here.
    pub async fn apply_remote_change(&self, store: &dyn Store, id: &SubscriptionId) {
        match store.read_subscription(id).await {
            Ok(Some(stored)) => {
                self.put_in_force(&stored, Occasion::Written);
            }
            Ok(None) => self.withdraw(id, Occasion::Written),
            Err(e) => {
                tracing::warn!(subscription.id = %id, error = %error_chain(&e), "reading a subscription changed on another node failed")
            }
        }
    }

    /// Files a subscription in the matcher index, in place of whatever it held for that id. One
    /// whose author cannot be read back matches nothing, so it is taken out.
    fn file(&self, stored: &StoredSubscription, spec: &SubscriptionSpec) {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        let author = serde_json::from_value::<Principal>(stored.author.clone()).ok();
        match candidate(
            &self.topics,
            &stored.id,
            author,
            stored.created_after_seq,
            spec,
        ) {
            Some(candidate) => index.insert(candidate),
            None => index.remove(&stored.id),
        }
    }
}

/// What start-up makes of one live subscription.
struct StartUp {
    id: SubscriptionId,
    /// What the index takes; None when it is not in force.
    candidate: Option<Candidate>,
    heartbeat: Option<u32>,
    /// Why this configuration cannot deliver to it, if it cannot.
    undeliverable: Option<String>,
}

/// What the matcher index holds for a subscription; None if its topic is gone or its
/// author unreadable.
/// Written subscriptions and start-up's pages both come here, each with its author as read
/// back from its own row format.
fn candidate(
    topics: &[Topic],
    id: &SubscriptionId,
    author: Option<Principal>,
    created_after_seq: ChangeSeq,
    spec: &SubscriptionSpec,
) -> Option<Candidate> {
    let (topic, _) = find_topic(topics, &spec.topic_url, TopicNames::Stored)?;
    Some(Candidate {
        id: id.clone(),
        topic,
        filters: spec.filters.clone(),
        author: author?,
        created_after_seq,
    })
}

#[cfg(test)]
mod tests;
