//! Matching Task changes to subscriptions: topic triggers and subscription filters, as pure
//! code with no IO.
//!
//! Active subscriptions live in an index keyed by one equality filter each (for example
//! `owner = Practitioner/7`). A change looks up only the keys its Task actually has, so the
//! cost of an event grows with the subscriptions that might match it, not with all of them.
//! Subscriptions without an indexable filter sit in a per-topic catch-all list.

pub mod fhirpath;
pub mod topic;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use crate::auth::{self, Principal};
use crate::fhir::ids::{ChangeSeq, SubscriptionId};
use crate::fhir::interaction::Interaction;
use crate::fhir::search::{Predicate, TaskIndex, matches};
use topic::{TaskState, Topic};

/// What the matcher knows about one active subscription.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: SubscriptionId,
    /// Position of its topic in the topic list.
    pub topic: usize,
    pub filters: Vec<Predicate>,
    pub author: Principal,
    /// Changes at or before this outbox position predate the subscription.
    pub created_after_seq: ChangeSeq,
}

/// One side of a change: the Task content and its search index.
pub struct Side<'a> {
    pub resource: &'a Value,
    pub index: &'a TaskIndex,
}

/// A committed Task change, as the matcher sees it.
pub struct Change<'a> {
    pub seq: ChangeSeq,
    pub interaction: Interaction,
    pub previous: Option<Side<'a>>,
    pub current: Option<Side<'a>>,
}

#[derive(Default)]
struct Bucket {
    /// By parameter, then value: a lookup borrows the Task's value instead of copying it.
    keyed: HashMap<&'static str, HashMap<String, Vec<Arc<Candidate>>>>,
    catch_all: Vec<Arc<Candidate>>,
}

/// An index key: a search parameter and one of its values.
type Key = (&'static str, String);

/// The index of active subscriptions, per topic.
#[derive(Default)]
pub struct SubscriptionIndex {
    /// Each subscription with the keys it was filed under (None: the catch-all list).
    by_id: HashMap<SubscriptionId, (Arc<Candidate>, Option<Vec<Key>>)>,
    buckets: HashMap<usize, Bucket>,
}

/// The parameters worth indexing on, most selective first.
const KEY_PREFERENCE: &[&str] = &[
    "_id",
    "owner",
    "focus",
    "part-of",
    "patient",
    "subject",
    "identifier",
    "based-on",
    "requester",
    "performer",
    "code",
    "business-status",
    "status",
    "priority",
    "intent",
];

/// Chooses the key list of a subscription: the codes of one positive token filter. A Task can
/// only match if it carries one of them.
fn index_keys(filters: &[Predicate]) -> Option<Vec<Key>> {
    let mut best: Option<(usize, Vec<Key>)> = None;
    for predicate in filters {
        let Predicate::Token {
            param,
            negated: false,
            any_of,
        } = predicate
        else {
            continue;
        };
        let Some(rank) = KEY_PREFERENCE.iter().position(|p| p == param) else {
            continue;
        };
        let codes: Option<Vec<_>> = any_of
            .iter()
            .map(|v| v.code.clone().map(|c| (*param, c)))
            .collect();
        let Some(codes) = codes else { continue };
        if codes.is_empty() {
            continue;
        }
        if best.as_ref().is_none_or(|(r, _)| rank < *r) {
            best = Some((rank, codes));
        }
    }
    best.map(|(_, keys)| keys)
}

/// The topic's view of one side of a change.
fn state<'a>(side: &Option<Side<'a>>) -> Option<TaskState<'a>> {
    side.as_ref().map(|s| TaskState {
        resource: s.resource,
        index: s.index,
    })
}

impl SubscriptionIndex {
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn contains(&self, id: &SubscriptionId) -> bool {
        self.by_id.contains_key(id)
    }

    /// Adds or replaces a subscription.
    pub fn insert(&mut self, candidate: Candidate) {
        self.remove(&candidate.id);
        let candidate = Arc::new(candidate);
        let keys = index_keys(&candidate.filters);
        let bucket = self.buckets.entry(candidate.topic).or_default();
        match &keys {
            Some(keys) => {
                for (param, value) in keys {
                    bucket
                        .keyed
                        .entry(param)
                        .or_default()
                        .entry(value.clone())
                        .or_default()
                        .push(candidate.clone());
                }
            }
            None => bucket.catch_all.push(candidate.clone()),
        }
        self.by_id.insert(candidate.id.clone(), (candidate, keys));
    }

    pub fn remove(&mut self, id: &SubscriptionId) {
        let Some((candidate, keys)) = self.by_id.remove(id) else {
            return;
        };
        let Some(bucket) = self.buckets.get_mut(&candidate.topic) else {
            return;
        };
        match keys {
            Some(keys) => {
                for (param, value) in keys {
                    let Some(values) = bucket.keyed.get_mut(param) else {
                        continue;
                    };
                    if let Some(list) = values.get_mut(&value) {
                        list.retain(|c| &c.id != id);
                        if list.is_empty() {
                            values.remove(&value);
                        }
                    }
                    if values.is_empty() {
                        bucket.keyed.remove(param);
                    }
                }
            }
            None => bucket.catch_all.retain(|c| &c.id != id),
        }
    }

    /// The subscriptions this change must be told to: the topic fires, every filter holds
    /// and the subscription's author may read the Task. Filters and the read rule look at the
    /// Task as it is after the change, or as it was before a delete.
    pub fn match_change(
        &self,
        topics: &[Topic],
        change: &Change<'_>,
        base_url: &str,
    ) -> Vec<Arc<Candidate>> {
        let subject = match change.interaction {
            Interaction::Delete => change.previous.as_ref(),
            _ => change.current.as_ref(),
        };
        let Some(subject) = subject else {
            return Vec::new();
        };
        let mut matched = Vec::new();
        let mut seen: HashSet<&SubscriptionId> = HashSet::new();
        for (position, bucket) in &self.buckets {
            let Some(topic) = topics.get(*position) else {
                continue;
            };
            if !topic.fires(
                change.interaction,
                state(&change.previous),
                state(&change.current),
            ) {
                continue;
            }
            let keyed = subject
                .index
                .tokens
                .iter()
                .filter_map(|token| bucket.keyed.get(token.param)?.get(token.value.as_str()));
            let candidates = keyed.flatten().chain(bucket.catch_all.iter());
            for candidate in candidates {
                if change.seq <= candidate.created_after_seq || !seen.insert(&candidate.id) {
                    continue;
                }
                if matches(subject.index, &candidate.filters)
                    && auth::may_read_task(&candidate.author, subject.resource, base_url)
                {
                    matched.push(candidate.clone());
                }
            }
        }
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::fhir::search::{Handling, SearchLimits, index_task, parse_query};
    use serde_json::json;

    const BASE: &str = "http://h/fhir";

    fn filters(query: &str) -> Vec<Predicate> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
        let limits = SearchLimits {
            default_count: 10,
            max_count: 10,
        };
        parse_query(&pairs, &limits, BASE, Handling::Strict)
            .unwrap()
            .predicates
    }

    fn admin() -> Principal {
        Principal {
            issuer: None,
            subject: "admin".into(),
            role: Role::Admin,
            fhir_user: None,
            performer_types: Vec::new(),
        }
    }

    fn id(text: &str) -> SubscriptionId {
        SubscriptionId::parse(text).unwrap()
    }

    fn candidate(id: &str, query: &str, author: Principal, after: i64) -> Candidate {
        Candidate {
            id: self::id(id),
            topic: 0,
            filters: filters(query),
            author,
            created_after_seq: ChangeSeq::new(after),
        }
    }

    fn matched(index: &SubscriptionIndex, topics: &[Topic], seq: i64, task: &Value) -> Vec<String> {
        let task_index = index_task(task, BASE);
        let change = Change {
            seq: ChangeSeq::new(seq),
            interaction: Interaction::Create,
            previous: None,
            current: Some(Side {
                resource: task,
                index: &task_index,
            }),
        };
        let mut ids: Vec<String> = index
            .match_change(topics, &change, BASE)
            .iter()
            .map(|c| c.id.to_string())
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn the_index_finds_keyed_and_catch_all_subscriptions_and_forgets_removed_ones() {
        let topics: Vec<Topic> = topic::builtin_topics(BASE)
            .unwrap()
            .into_iter()
            .filter(|t| t.id == "task-changed")
            .collect();
        let task = json!({"resourceType": "Task", "id": "t1", "status": "requested", "intent": "order",
            "owner": {"reference": "Practitioner/1"}, "meta": {"lastUpdated": "2026-01-01T00:00:00.000Z"}});
        let bob = Principal {
            issuer: None,
            subject: "Practitioner/2".into(),
            role: Role::Practitioner,
            fhir_user: Some("Practitioner/2".into()),
            performer_types: Vec::new(),
        };
        let mut index = SubscriptionIndex::default();
        index.insert(candidate("owner-1", "owner=Practitioner/1", admin(), 0));
        index.insert(candidate("owner-2", "owner=Practitioner/2", admin(), 0));
        index.insert(candidate(
            "both",
            "owner=Practitioner/1,Practitioner/2&status=requested",
            admin(),
            0,
        ));
        index.insert(candidate(
            "done",
            "owner=Practitioner/1&status=completed",
            admin(),
            0,
        ));
        index.insert(candidate("all", "", admin(), 0));
        index.insert(candidate(
            "not-requested",
            "status:not=requested",
            admin(),
            0,
        ));
        index.insert(candidate("later", "", admin(), 5));
        index.insert(candidate("bobs-view", "", bob, 0));
        assert_eq!(index.len(), 8);
        assert_eq!(
            matched(&index, &topics, 3, &task),
            ["all", "both", "owner-1"]
        );
        assert_eq!(
            matched(&index, &topics, 6, &task),
            ["all", "both", "later", "owner-1"],
            "a subscription hears changes committed after it was created"
        );

        index.remove(&id("owner-1"));
        index.remove(&id("all"));
        index.remove(&id("missing"));
        assert_eq!(matched(&index, &topics, 3, &task), ["both"]);
        // Re-inserting an id replaces its filters.
        index.insert(candidate("both", "owner=Practitioner/3", admin(), 0));
        assert!(matched(&index, &topics, 3, &task).is_empty());
        assert_eq!(index.len(), 6);
        assert!(index.contains(&id("bobs-view")) && !index.contains(&id("owner-1")));
    }
}
