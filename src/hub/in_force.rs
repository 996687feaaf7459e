//! Putting a subscription in force on this node, or withdrawing it: one path for the API's
//! writes, start-up, writes made on other nodes and the outbox's catch-up.
//!
//! At start-up a subscription is put in force from its matching form (`form`), the pre-parsed
//! part of it stored beside the resource, which is read only for a row without a form of the
//! current version (and that form is then written back).
//!
//! "In force" means the matcher index holds it, so changes committed from now on are matched
//! against it; and, for a subscription written just now, that the scheduler knows its
//! heartbeat and tries it at once. A subscription that is `off`, or whose topic or filters
//! this hub no longer understands, is withdrawn instead. The occasion says how far either
//! reaches beyond the index.

mod form;

use std::sync::Arc;
use std::time::Duration;

use super::{Hub, TopicNames, find_topic, topic_filters};
use crate::auth::Principal;
use crate::error::{Error, Result, error_chain};
use crate::fhir::ids::{ChangeSeq, SubscriptionId};
use crate::fhir::notification::SubscriptionStatus;
use crate::fhir::search::Predicate;
use crate::fhir::subscription::{SubscriptionSpec, TopicFilters, parse_filter_criteria};
use crate::matcher::Candidate;
use crate::matcher::topic::Topic;
use crate::store::{LiveSubscription, MatchingFormRow, Store, StoredSubscription};
use serde_json::Value;

pub use form::MatchingForm;

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
    /// `Occasion::StartUp` does one by one, but from each row's matching form: the page is read
    /// on every core, no spec is kept (delivery parses, and caches, what it delivers to), and
    /// the index takes the page under one lock. A row without a form of the current version
    /// must come with its resource; the forms derived from those are returned, for the store
    /// to write back. Blocking: call it off the async threads.
    pub fn put_in_force_at_start_up(
        &self,
        page: &[LiveSubscription],
    ) -> Result<Vec<MatchingFormRow>> {
        let topics: Vec<TopicFilters> = self.topics.iter().map(topic_filters).collect();
        let topics = &topics;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = page.len().div_ceil(threads).max(1);
        let loaded: Vec<Result<Vec<StartUp>>> = std::thread::scope(|scope| {
            let reading: Vec<_> = page
                .chunks(chunk)
                .map(|rows| {
                    scope.spawn(move || rows.iter().map(|row| self.start_up(row, topics)).collect())
                })
                .collect();
            reading
                .into_iter()
                .map(|thread| {
                    thread
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        let mut derived = Vec::new();
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for loaded in loaded {
            for StartUp {
                id,
                candidate,
                heartbeat,
                undeliverable,
                form,
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
                derived.extend(form);
            }
        }
        Ok(derived)
    }

    /// What start-up makes of one live subscription: from its matching form when it has one
    /// of the current version, else from its resource.
    fn start_up(&self, row: &LiveSubscription, topics: &[TopicFilters]) -> Result<StartUp> {
        match row.matching.as_deref().and_then(MatchingForm::read) {
            Some(form) => Ok(self.start_up_from_form(row, &form, topics)),
            None => self.start_up_from_resource(row),
        }
    }

    /// A live subscription put in force from its matching form: its topic found and its filters
    /// read with this hub's topics, as a parse of its resource would (`parse_stored`).
    fn start_up_from_form(
        &self,
        row: &LiveSubscription,
        form: &MatchingForm,
        topics: &[TopicFilters],
    ) -> StartUp {
        let matching: std::result::Result<(usize, Vec<Predicate>), String> =
            match find_topic(&self.topics, &form.topic, TopicNames::Stored) {
                None => Err(format!(
                    "its topic '{}' is not one of this hub's topics any more",
                    form.topic
                )),
                Some((topic, _)) => parse_filter_criteria(
                    &form.filters,
                    &topics[topic],
                    &self.search_limits,
                    &self.base_url,
                )
                .map(|filters| (topic, filters))
                .map_err(|e| error_chain(&e)),
            };
        let undeliverable = match &matching {
            Err(why) => Some(why.clone()),
            Ok(_) if !self.policy.allows(form.needs()) => Some(
                "its channel needs a plain http endpoint or an AMQP broker, which this \
                 configuration does not allow"
                    .to_string(),
            ),
            Ok(_) => None,
        };
        let in_force = matching
            .ok()
            .filter(|_| row.status != SubscriptionStatus::Off);
        let heartbeat = in_force.as_ref().and(form.heartbeat);
        let candidate = in_force.and_then(|(topic, filters)| {
            Some(Candidate {
                id: row.id.clone(),
                topic,
                filters,
                author: serde_json::from_str::<Principal>(&row.author).ok()?,
                created_after_seq: row.created_after_seq,
            })
        });
        StartUp {
            id: row.id.clone(),
            candidate,
            heartbeat,
            undeliverable,
            form: None,
        }
    }

    /// A live subscription without a matching form of the current version put in force from
    /// its resource, and the form derived from it.
    fn start_up_from_resource(&self, row: &LiveSubscription) -> Result<StartUp> {
        let Some(resource) = &row.resource else {
            // Deleted since its page was read (`with_resources_where_stale`): nothing to do.
            return Ok(StartUp {
                id: row.id.clone(),
                candidate: None,
                heartbeat: None,
                undeliverable: None,
                form: None,
            });
        };
        let resource: Value = serde_json::from_str(resource)
            .map_err(|e| Error::internal("a stored Subscription is not JSON", e))?;
        let parsed = self.parse_stored(&resource)?;
        let spec = parsed.for_matching().ok();
        let form = spec.as_ref().map(|spec| MatchingFormRow {
            id: row.id.clone(),
            version: row.version,
            matching: MatchingForm::of(spec).to_text(),
        });
        let spec = spec.filter(|_| row.status != SubscriptionStatus::Off);
        let candidate = spec.as_ref().and_then(|spec| {
            let author = serde_json::from_str::<Principal>(&row.author).ok();
            candidate(&self.topics, &row.id, author, row.created_after_seq, spec)
        });
        Ok(StartUp {
            id: row.id.clone(),
            candidate,
            heartbeat: spec.and_then(|spec| spec.heartbeat_period),
            undeliverable: parsed.for_delivery().err().map(|e| error_chain(&e)),
            form,
        })
    }

    /// Puts every live subscription in force (`Occasion::StartUp`), page by page, reading one
    /// page while the store reads the next. The forms derived for a page's rows that had none
    /// are written back before the page after it is read.
    pub async fn put_live_in_force(self: &Arc<Self>, store: &dyn Store) -> Result<()> {
        let started = std::time::Instant::now();
        let mut after: Option<SubscriptionId> = None;
        let mut reading: Option<tokio::task::JoinHandle<Result<Vec<MatchingFormRow>>>> = None;
        let mut derived = 0;
        let mut count = 0;
        loop {
            let mut page = store
                .live_subscription_page(after.as_ref(), START_UP_PAGE)
                .await?;
            if let Some(previous) = reading.take() {
                derived += write_back(store, previous).await?;
            }
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            count += page.len();
            let full = page.len() == START_UP_PAGE;
            with_resources_where_stale(store, &mut page).await?;
            let hub = self.clone();
            reading = Some(tokio::task::spawn_blocking(move || {
                hub.put_in_force_at_start_up(&page)
            }));
            if !full {
                break;
            }
        }
        if let Some(last) = reading {
            derived += write_back(store, last).await?;
        }
        tracing::info!(
            subscriptions = count,
            forms_derived = derived,
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
    /// Its matching form, when it had none of the current version and one was derived.
    form: Option<MatchingFormRow>,
}

/// Waits for a page to be put in force and writes back the forms it derived; returns how many.
async fn write_back(
    store: &dyn Store,
    page: tokio::task::JoinHandle<Result<Vec<MatchingFormRow>>>,
) -> Result<usize> {
    let forms = page
        .await
        .map_err(|e| Error::internal("reading stored subscriptions failed", e))??;
    let count = forms.len();
    if count > 0 {
        store.fill_matching_forms(forms).await?;
    }
    Ok(count)
}

/// Gives each row of a page whose matching form is of another version its resource (the store
/// sends the resource only with rows that have no form at all): after a change of `FORMAT`,
/// the rows written before it are read once more, one by one, and their forms written back.
async fn with_resources_where_stale(
    store: &dyn Store,
    page: &mut [LiveSubscription],
) -> Result<()> {
    for row in page.iter_mut() {
        let stale = row.resource.is_none()
            && row
                .matching
                .as_deref()
                .and_then(MatchingForm::read)
                .is_none();
        if stale && let Some(stored) = store.read_subscription(&row.id).await? {
            row.version = stored.version;
            row.resource = Some(stored.resource.to_string());
        }
    }
    Ok(())
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
