//! The Task versions this node wrote last, so that a change of one of them can be decided
//! without reading the Task first (`write::try_unlocked`), and written as one group statement
//! and one commit with the other puts of its group. A Task this node wrote is most of the
//! time still at that version: it is written again by the client that wrote it (a worker
//! moving its Task on), on the node the client talks to.
//!
//! Nothing here is trusted: a put decided on a remembered version is written only if the
//! Task is still at that version (the group statement's guard), and a version number is
//! never written twice for one id (`task_version`'s key), so a Task still at that version
//! still has the content remembered. When another node (or this node's locked path) wrote
//! the Task since, the guard writes nothing, the version is forgotten and the change is
//! decided again on the Task read from the database, as without this memory. Only a put is
//! taken from a remembered version: a refusal or a keep is decided again on the committed
//! version, which is what they are answered on.
//!
//! Bounded by two generations of at most half of `store.postgres_recent_tasks` each: when
//! the young one is full it becomes the old one and the old one is dropped, so the Tasks
//! written least recently go first, and neither a lookup nor a write ever walks the map.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::fhir::ids::{StoredInstant, TaskId, Version};
use crate::store::CurrentTask;

/// A version this node wrote, as written.
#[derive(Clone)]
struct Written {
    version: Version,
    last_updated: StoredInstant,
    /// The resource as stored (shared with the put that wrote it: nothing is copied).
    text: Arc<str>,
}

#[derive(Default)]
struct Generations {
    young: HashMap<TaskId, Written>,
    old: HashMap<TaskId, Written>,
}

pub(super) struct RecentTasks {
    /// The most entries of one generation; 0 remembers nothing.
    per_generation: usize,
    generations: Mutex<Generations>,
}

impl RecentTasks {
    /// Remembers at most `most` Tasks (0: none).
    pub(super) fn new(most: usize) -> RecentTasks {
        RecentTasks {
            per_generation: most.div_ceil(2),
            generations: Mutex::default(),
        }
    }

    /// The version of Task `id` this node wrote last, if it remembers one: not necessarily
    /// the Task's current version (see the module's comment).
    pub(super) fn get(&self, id: &TaskId) -> Option<CurrentTask> {
        if self.per_generation == 0 {
            return None;
        }
        let written = {
            let generations = self.lock();
            generations
                .young
                .get(id)
                .or_else(|| generations.old.get(id))
                .cloned()
        }?;
        // Parsed outside the lock, as a read parses the row it reads. A text that is not
        // JSON was never written (a put's text is serialised JSON): the read decides then.
        let resource = serde_json::from_str(&written.text).ok()?;
        Some(CurrentTask {
            id: id.clone(),
            version: written.version,
            last_updated: written.last_updated,
            deleted: false,
            resource,
        })
    }

    /// Remembers that this node committed `version` of Task `id` with `text`, unless it
    /// remembers a later version already (two writes of one Task answered out of order).
    pub(super) fn wrote(
        &self,
        id: &TaskId,
        version: Version,
        last_updated: &StoredInstant,
        text: Arc<str>,
    ) {
        if self.per_generation == 0 {
            return;
        }
        let mut generations = self.lock();
        let known = generations
            .young
            .get(id)
            .or_else(|| generations.old.get(id))
            .map(|w| w.version);
        if known.is_some_and(|known| known >= version) {
            return;
        }
        if generations.young.len() >= self.per_generation && !generations.young.contains_key(id) {
            generations.old = std::mem::take(&mut generations.young);
        }
        generations.old.remove(id);
        generations.young.insert(
            id.clone(),
            Written {
                version,
                last_updated: last_updated.clone(),
                text,
            },
        );
    }

    /// Forgets Task `id`: it was written elsewhere, or is being written in a transaction.
    pub(super) fn forget(&self, id: &TaskId) {
        if self.per_generation == 0 {
            return;
        }
        let mut generations = self.lock();
        generations.young.remove(id);
        generations.old.remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // The maps are consistent between any two statements: a panic elsewhere while the
        // lock was held leaves nothing half done.
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> TaskId {
        TaskId::parse(&format!("t{n}")).unwrap()
    }

    fn text(n: usize) -> Arc<str> {
        format!(r#"{{"resourceType":"Task","id":"t{n}"}}"#).into()
    }

    #[test]
    fn remembers_the_latest_version_written() {
        let recent = RecentTasks::new(8);
        let now = StoredInstant::now();
        assert!(recent.get(&id(1)).is_none());
        recent.wrote(&id(1), Version::new(2), &now, text(1));
        recent.wrote(&id(1), Version::new(1), &now, text(1));
        let got = recent.get(&id(1)).unwrap();
        assert_eq!((got.version, got.deleted), (Version::new(2), false));
        assert_eq!(got.resource["id"], "t1");
        recent.wrote(&id(1), Version::new(3), &now, text(1));
        assert_eq!(recent.get(&id(1)).unwrap().version, Version::new(3));
        recent.forget(&id(1));
        assert!(recent.get(&id(1)).is_none());
    }

    #[test]
    fn holds_at_most_its_bound_dropping_the_least_recent_first() {
        let recent = RecentTasks::new(4);
        let now = StoredInstant::now();
        for n in 0..5 {
            recent.wrote(&id(n), Version::new(1), &now, text(n));
        }
        // Two generations of two: 0 and 1 went with the first old generation.
        let kept: Vec<usize> = (0..5).filter(|&n| recent.get(&id(n)).is_some()).collect();
        assert_eq!(kept, [2, 3, 4]);
        let generations = recent.lock();
        assert!(generations.young.len() + generations.old.len() <= 4);
    }

    #[test]
    fn zero_remembers_nothing() {
        let recent = RecentTasks::new(0);
        recent.wrote(&id(1), Version::new(1), &StoredInstant::now(), text(1));
        assert!(recent.get(&id(1)).is_none());
    }
}
