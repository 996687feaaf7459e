//! Work shared across the fan-out of one change: what every subscription hearing about it
//! would otherwise load or build again.
//!
//! A change heard by a hundred subscriptions is one Task version and, per content level, one
//! Bundle entry: the same for all of them. `SharedParts` keeps, for the most recent changes,
//! - the Task versions events refer to (`version`), which the outbox fills as it loads them
//!   to match (`keep_current`) and delivery fills with whatever it had to load itself;
//! - each event's Bundle entry, serialised (`entry`), per (Task, version, interaction,
//!   content level, whether the version was found), built by the first notification that
//!   needs it.
//!
//! Only what does not depend on the subscription is shared: the read rule is applied per
//! subscription before an entry is used, and the status `Parameters` (event numbers,
//! counters, status) is built for each notification. A Task version never changes once
//! written, so an entry never goes stale; both maps are bounded, oldest first out, since
//! deliveries follow the changes they are about closely (a subscription behind by more than
//! the bound loads and builds for itself, as before).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::fhir::ids::{TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::fhir::notification::ContentLevel;
use crate::store::ChangeEvent;

/// How many recent Task versions are kept (a few MB of JSON).
pub const SHARED_VERSIONS: usize = 4096;

/// How many serialised event entries are kept: one or two per recent version.
pub const SHARED_ENTRIES: usize = 8192;

/// What one event's Bundle entry depends on, besides the hub's base URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntryKey {
    pub task_id: TaskId,
    pub version: Version,
    pub interaction: Interaction,
    pub content: ContentLevel,
    /// Whether the version's content was found (a `full-resource` entry carries it).
    pub with_resource: bool,
}

/// The recent Task versions and event entries, shared by every delivery on this node.
pub struct SharedParts {
    versions: Mutex<Bounded<(TaskId, Version), Arc<Value>>>,
    entries: Mutex<Bounded<EntryKey, Arc<[u8]>>>,
}

impl Default for SharedParts {
    fn default() -> SharedParts {
        SharedParts::with_capacity(SHARED_VERSIONS, SHARED_ENTRIES)
    }
}

impl SharedParts {
    pub fn with_capacity(versions: usize, entries: usize) -> SharedParts {
        SharedParts {
            versions: Mutex::new(Bounded::new(versions)),
            entries: Mutex::new(Bounded::new(entries)),
        }
    }

    /// The version `key`, if kept.
    pub fn version(&self, key: &(TaskId, Version)) -> Option<Arc<Value>> {
        lock(&self.versions).get(key)
    }

    /// Keeps a version loaded for a notification.
    pub fn keep_version(&self, key: (TaskId, Version), resource: Arc<Value>) {
        lock(&self.versions).insert(key, resource);
    }

    /// Keeps the version each change produced, from the versions the outbox loaded to match
    /// them: the deliveries that follow find them here instead of in the store.
    pub fn keep_current(
        &self,
        changes: &[ChangeEvent],
        loaded: &HashMap<(TaskId, Version), Value>,
    ) {
        let mut versions = lock(&self.versions);
        for change in changes {
            let key = (change.resource_id.clone(), change.version);
            if let Some(resource) = loaded.get(&key)
                && versions.get(&key).is_none()
            {
                versions.insert(key, Arc::new(resource.clone()));
            }
        }
    }

    /// The serialised entry for `key`, built by `build` unless it is kept.
    pub fn entry(&self, key: EntryKey, build: impl FnOnce() -> Vec<u8>) -> Arc<[u8]> {
        if let Some(entry) = lock(&self.entries).get(&key) {
            return entry;
        }
        // Built without the lock; two notifications building the same entry at once only do
        // the work twice, with the same result.
        let entry: Arc<[u8]> = build().into();
        lock(&self.entries).insert(key, entry.clone());
        entry
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A map that forgets its oldest entries past `capacity`.
struct Bounded<K, V> {
    map: HashMap<K, V>,
    /// Keys in the order they were inserted.
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Clone + Eq + Hash, V: Clone> Bounded<K, V> {
    fn new(capacity: usize) -> Bounded<K, V> {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.map.get(key).cloned()
    }

    fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.map.remove(&oldest);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(task: &str, version: i64) -> (TaskId, Version) {
        (TaskId::parse(task).unwrap(), Version::new(version))
    }

    #[test]
    fn the_oldest_versions_leave_first_and_an_entry_is_built_once() {
        let shared = SharedParts::with_capacity(2, 2);
        for n in 1..=3 {
            shared.keep_version(key("t", n), Arc::new(json!({ "n": n })));
        }
        assert!(shared.version(&key("t", 1)).is_none(), "the oldest left");
        assert_eq!(shared.version(&key("t", 3)).unwrap()["n"], 3);
        let entry_key = EntryKey {
            task_id: TaskId::parse("t").unwrap(),
            version: Version::new(3),
            interaction: Interaction::Update,
            content: ContentLevel::IdOnly,
            with_resource: true,
        };
        let mut builds = 0;
        for _ in 0..3 {
            let entry = shared.entry(entry_key.clone(), || {
                builds += 1;
                b"{}".to_vec()
            });
            assert_eq!(&*entry, b"{}");
        }
        assert_eq!(
            builds, 1,
            "built by the first notification, reused by the others"
        );
    }
}
