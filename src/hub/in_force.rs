//! Putting a subscription in force on this node, or withdrawing it: one path for the API's
//! writes, start-up, writes made on other nodes and the outbox's catch-up.
//!
//! "In force" means the matcher index holds it, so changes committed from now on are matched
//! against it; and, for a subscription written just now, that the scheduler knows its
//! heartbeat and tries it at once. A subscription that is `off`, or whose topic or filters
//! this hub no longer understands, is withdrawn instead. The occasion says how far either
//! reaches beyond the index.

use std::time::Duration;

use super::{Hub, TopicNames, find_topic};
use crate::auth::Principal;
use crate::error::error_chain;
use crate::fhir::ids::SubscriptionId;
use crate::fhir::notification::SubscriptionStatus;
use crate::fhir::subscription::SubscriptionSpec;
use crate::matcher::Candidate;
use crate::matcher::topic::Topic;
use crate::store::{Store, StoredSubscription};

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
        if occasion == Occasion::Written {
            self.delivery.forget(id);
            self.sockets.unbind_subscription(id);
        }
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
        match candidate(&self.topics, stored, spec) {
            Some(candidate) => index.insert(candidate),
            None => index.remove(&stored.id),
        }
    }
}

/// What the matcher index holds for a subscription; None if its topic is gone or its
/// author unreadable.
fn candidate(
    topics: &[Topic],
    stored: &StoredSubscription,
    spec: &SubscriptionSpec,
) -> Option<Candidate> {
    let (topic, _) = find_topic(topics, &spec.topic_url, TopicNames::Stored)?;
    let author = serde_json::from_value::<Principal>(stored.author.clone()).ok()?;
    Some(Candidate {
        id: stored.id.clone(),
        topic,
        filters: spec.filters.clone(),
        author,
        created_after_seq: stored.created_after_seq,
    })
}

#[cfg(test)]
mod tests;
