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
use crate::matcher::topic::Topic;
use crate::matcher::{Candidate, Prepared, Preparer};
use crate::store::{LiveSubscription, MatchingFormRow, Store, StoredSubscription};
use serde_json::Value;
use tokio::sync::mpsc;

pub use form::MatchingForm;

/// How many live subscriptions start-up hands on at a time: small enough that the threads
/// preparing pages start soon after the read and finish soon after it, large enough that the
/// index's lock is taken some hundred times for a million.
const START_UP_PAGE: usize = 8_192;

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

    /// What every thread preparing start-up rows shares: each topic's filters, and the index's
    /// preparer (what a candidate needs to be made ready off the index lock).
    fn start_up_parts(&self) -> (Vec<TopicFilters>, Preparer) {
        let topics = self.topics.iter().map(topic_filters).collect();
        let preparer = self
            .index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .preparer();
        (topics, preparer)
    }

    /// Puts a page of the live subscriptions read at start-up in force, as `put_in_force` with
    /// `Occasion::StartUp` does one by one, but from each row's matching form: the page is read
    /// on every core, no spec is kept (delivery parses, and caches, what it delivers to), and
    /// the index takes the page under one lock. A row without a form of the current version
    /// must come with its resource (one that comes without is taken as deleted since it was
    /// read); the forms derived from those are returned, for the store to write back.
    /// Blocking: call it off the async threads.
    pub fn put_in_force_at_start_up(
        &self,
        page: &[LiveSubscription],
    ) -> Result<Vec<MatchingFormRow>> {
        let (topics, preparer) = self.start_up_parts();
        let (topics, preparer) = (&topics, &preparer);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let chunk = page.len().div_ceil(threads).max(1);
        let loaded: Vec<Result<Vec<StartUp>>> = std::thread::scope(|scope| {
            let reading: Vec<_> = page
                .chunks(chunk)
                .map(|rows| {
                    scope.spawn(move || {
                        let mut reading = Reading::new(topics, preparer);
                        rows.iter()
                            .filter_map(|row| self.start_up(row, &mut reading).transpose())
                            .collect()
                    })
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
        for loaded in loaded {
            derived.extend(self.file_start_up(loaded?, Fresh::No));
        }
        Ok(derived)
    }

    /// Puts in force the pages of live subscriptions start-up reads, as they come: each page
    /// is prepared (its forms read, its candidates made ready for the index) on one of as many
    /// threads as there are cores, and this thread files the prepared pages in the order they
    /// were read, each under one lock of the index. What it cannot finish alone goes `back`:
    /// the forms derived from rows that had none, to be written, and the rows whose form is
    /// of another version and that came without their resource, to be read again and put in
    /// force once they have it. Returns how many rows it filed. Blocking.
    fn put_pages_in_force(
        &self,
        pages: mpsc::Receiver<Vec<LiveSubscription>>,
        back: &mpsc::UnboundedSender<Returned>,
        fresh: Fresh,
    ) -> Result<usize> {
        let (topics, preparer) = self.start_up_parts();
        let (topics, preparer) = (&topics, &preparer);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        // The pages, numbered as they are taken, so that they are filed in the order read.
        let pages = std::sync::Mutex::new((pages, 0usize));
        let pages = &pages;
        std::thread::scope(|scope| {
            let (prepared_tx, prepared) =
                std::sync::mpsc::sync_channel::<(usize, Result<ReadyPage>)>(threads);
            for _ in 0..threads {
                let prepared_tx = prepared_tx.clone();
                scope.spawn(move || {
                    let mut reading = Reading::new(topics, preparer);
                    loop {
                        let (number, page) = {
                            let mut pages = pages.lock().unwrap_or_else(|e| e.into_inner());
                            let Some(page) = pages.0.blocking_recv() else {
                                return;
                            };
                            pages.1 += 1;
                            (pages.1 - 1, page)
                        };
                        let page = self.prepare_page(page, &mut reading);
                        if prepared_tx.send((number, page)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(prepared_tx);
            // Returning early drops `prepared`: the threads then stop at their next page,
            // and the read at its next send.
            let mut waiting = std::collections::BTreeMap::new();
            let mut next = 0;
            let mut filed = 0;
            for (number, page) in prepared {
                waiting.insert(number, page);
                while let Some(page) = waiting.remove(&next) {
                    next += 1;
                    let ReadyPage { loaded, stale } = page?;
                    filed += loaded.len();
                    let derived = self.file_start_up(loaded, fresh);
                    for returned in [Returned::Forms(derived), Returned::Stale(stale)] {
                        let empty = match &returned {
                            Returned::Forms(forms) => forms.is_empty(),
                            Returned::Stale(rows) => rows.is_empty(),
                        };
                        if !empty && back.send(returned).is_err() {
                            // Whoever writes them back failed, and says why.
                            return Ok(filed);
                        }
                    }
                }
            }
            Ok(filed)
        })
    }

    /// A page of start-up made ready to file: what each row comes to, but those whose form
    /// is stale and that came without their resource.
    fn prepare_page(
        &self,
        page: Vec<LiveSubscription>,
        reading: &mut Reading<'_>,
    ) -> Result<ReadyPage> {
        let mut loaded = Vec::with_capacity(page.len());
        let mut stale = Vec::new();
        for row in page {
            match self.start_up(&row, reading)? {
                Some(start_up) => loaded.push(start_up),
                None => stale.push(row),
            }
        }
        Ok(ReadyPage { loaded, stale })
    }

    /// Files a prepared page in the index under one lock, then its heartbeats under one
    /// more, and wakes the scheduler for what this configuration cannot deliver. On a `Fresh`
    /// index the ids are new: nothing is looked for to replace or take out. Returns the forms
    /// derived.
    fn file_start_up(&self, loaded: Vec<StartUp>, fresh: Fresh) -> Vec<MatchingFormRow> {
        let mut rest = Vec::with_capacity(loaded.len());
        {
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            for StartUp {
                id,
                candidate,
                heartbeat,
                undeliverable,
                form,
            } in loaded
            {
                match (candidate, fresh) {
                    (Some(candidate), Fresh::Yes) => index.insert_prepared(candidate),
                    (Some(candidate), Fresh::No) => {
                        index.remove(&id);
                        index.insert_prepared(candidate);
                    }
                    (None, Fresh::Yes) => {}
                    (None, Fresh::No) => index.remove(&id),
                }
                rest.push((id, heartbeat, undeliverable, form));
            }
        }
        {
            let mut heartbeats = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
            for (id, heartbeat, _, _) in &rest {
                match (heartbeat, fresh) {
                    (Some(period), _) => {
                        heartbeats.insert(id.clone(), *period);
                    }
                    (None, Fresh::Yes) => {}
                    (None, Fresh::No) => {
                        heartbeats.remove(id);
                    }
                }
            }
        }
        let mut derived = Vec::new();
        for (id, _, undeliverable, form) in rest {
            if let Some(why) = undeliverable {
                tracing::warn!(subscription.id = %id, error = %why, "a stored subscription cannot be delivered with this configuration; its status will say why");
                self.delivery.wake(&id);
            }
            derived.extend(form);
        }
        derived
    }

    /// What start-up makes of one live subscription: from its matching form when it has one
    /// of the current version, else from its resource; None when it has neither (its form is
    /// of another version and its resource was not read with it).
    fn start_up(
        &self,
        row: &LiveSubscription,
        reading: &mut Reading<'_>,
    ) -> Result<Option<StartUp>> {
        match row.matching.as_deref().and_then(MatchingForm::read) {
            Some(form) => Ok(Some(self.start_up_from_form(row, &form, reading))),
            None => match &row.resource {
                Some(resource) => self
                    .start_up_from_resource(row, resource, reading.preparer)
                    .map(Some),
                None => Ok(None),
            },
        }
    }

    /// A live subscription put in force from its matching form: its topic found and its filters
    /// read with this hub's topics, as a parse of its resource would (`parse_stored`).
    fn start_up_from_form(
        &self,
        row: &LiveSubscription,
        form: &MatchingForm,
        reading: &mut Reading<'_>,
    ) -> StartUp {
        // Nearly every row names the same topic, by the same URL: it is looked up once.
        let found = match &reading.last_topic {
            Some((url, found)) if *url == form.topic => *found,
            _ => {
                let found = find_topic(&self.topics, &form.topic, TopicNames::Stored)
                    .map(|(topic, _)| topic);
                reading.last_topic = Some((form.topic.clone(), found));
                found
            }
        };
        let matching: std::result::Result<(usize, Vec<Predicate>), String> = match found {
            None => Err(format!(
                "its topic '{}' is not one of this hub's topics any more",
                form.topic
            )),
            Some(topic) => parse_filter_criteria(
                &form.filters,
                &reading.topics[topic],
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
            candidate: candidate.map(|candidate| reading.preparer.prepare(candidate)),
            heartbeat,
            undeliverable,
            form: None,
        }
    }

    /// A live subscription without a matching form of the current version put in force from
    /// its resource, and the form derived from it.
    fn start_up_from_resource(
        &self,
        row: &LiveSubscription,
        resource: &str,
        preparer: &Preparer,
    ) -> Result<StartUp> {
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
            candidate: candidate.map(|candidate| preparer.prepare(candidate)),
            heartbeat: spec.and_then(|spec| spec.heartbeat_period),
            undeliverable: parsed.for_delivery().err().map(|e| error_chain(&e)),
            form,
        })
    }

    /// Puts every live subscription in force (`Occasion::StartUp`). The store reads them in
    /// pages (SQLite in one pass on a thread of its own) while they are prepared on every core
    /// and filed (`put_pages_in_force`); the index is first given room for as many as the
    /// store counts. The forms derived for rows that had none are written back as they come;
    /// rows whose form is of another version are read again, whole, and put in force last.
    pub async fn put_live_in_force(self: &Arc<Self>, store: &dyn Store) -> Result<()> {
        self.put_live_in_force_in_pages(store, START_UP_PAGE).await
    }

    /// `put_live_in_force`, with pages of `page` rows (tests use small ones).
    pub(crate) async fn put_live_in_force_in_pages(
        self: &Arc<Self>,
        store: &dyn Store,
        page: usize,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let expected = store.live_subscription_count().await?;
        let fresh = {
            let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
            index.reserve(expected);
            if index.is_empty() {
                Fresh::Yes
            } else {
                Fresh::No
            }
        };
        // A page or two read ahead of the threads preparing them.
        let (pages_tx, pages) = mpsc::channel(2);
        let (back, mut returned) = mpsc::unbounded_channel();
        let hub = self.clone();
        let filing =
            tokio::task::spawn_blocking(move || hub.put_pages_in_force(pages, &back, fresh));
        let reading = store.read_live_subscriptions(page, pages_tx);
        // It owns `returned`: if a write-back fails, filing's next hand-back fails too, and it
        // stops there.
        let writing_back = async move {
            let mut derived = 0;
            let mut stale = Vec::new();
            while let Some(returned) = returned.recv().await {
                match returned {
                    Returned::Forms(forms) => {
                        derived += forms.len();
                        store.fill_matching_forms(forms).await?;
                    }
                    Returned::Stale(rows) => stale.extend(rows),
                }
            }
            Ok::<_, Error>((derived, stale))
        };
        let (read, written, filed) = tokio::join!(reading, writing_back, filing);
        let filed =
            filed.map_err(|e| Error::internal("putting subscriptions in force failed", e))??;
        read?;
        let (mut derived, mut stale) = written?;
        let count = filed + stale.len();
        if !stale.is_empty() {
            with_resources(store, &mut stale).await?;
            let hub = self.clone();
            let forms = tokio::task::spawn_blocking(move || hub.put_in_force_at_start_up(&stale))
                .await
                .map_err(|e| Error::internal("putting subscriptions in force failed", e))??;
            derived += forms.len();
            if !forms.is_empty() {
                store.fill_matching_forms(forms).await?;
            }
        }
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .shrink_to_fit();
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
    /// What the index takes, made ready for it; None when it is not in force.
    candidate: Option<Prepared>,
    heartbeat: Option<u32>,
    /// Why this configuration cannot deliver to it, if it cannot.
    undeliverable: Option<String>,
    /// Its matching form, when it had none of the current version and one was derived.
    form: Option<MatchingFormRow>,
}

/// What a thread reading start-up's rows keeps from one row to the next.
struct Reading<'a> {
    /// The topics, as the filter parser checks criteria against them.
    topics: &'a [TopicFilters],
    preparer: &'a Preparer,
    /// The topic URL of the row before, and where it was found.
    last_topic: Option<(String, Option<usize>)>,
}

impl<'a> Reading<'a> {
    fn new(topics: &'a [TopicFilters], preparer: &'a Preparer) -> Reading<'a> {
        Reading {
            topics,
            preparer,
            last_topic: None,
        }
    }
}

/// A start-up page made ready to file.
struct ReadyPage {
    loaded: Vec<StartUp>,
    /// The rows whose form is of another version, which came without their resource.
    stale: Vec<LiveSubscription>,
}

/// What filing start-up's pages hands back to be done on the async side.
enum Returned {
    /// Forms derived from rows that had none, to write back.
    Forms(Vec<MatchingFormRow>),
    /// Rows to read whole (`ReadyPage::stale`).
    Stale(Vec<LiveSubscription>),
}

/// Whether start-up files into an empty index, where every id it reads is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fresh {
    Yes,
    No,
}

/// Gives each row its resource and current version, read whole (the store sends the resource
/// only with rows that have no form at all): after a change of `FORMAT`, the rows written
/// before it are read once more, one by one, and their forms written back. A row deleted
/// meanwhile is left out.
async fn with_resources(store: &dyn Store, rows: &mut Vec<LiveSubscription>) -> Result<()> {
    let mut read = Vec::with_capacity(rows.len());
    for mut row in rows.drain(..) {
        if let Some(stored) = store.read_subscription(&row.id).await? {
            row.version = stored.version;
            row.resource = Some(stored.resource.to_string());
            read.push(row);
        }
    }
    *rows = read;
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
pub(crate) mod tests;
