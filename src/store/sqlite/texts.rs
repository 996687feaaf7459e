//! The current Tasks' stored texts, kept in memory for search pages (`store.search_text_cache_mib`).
//!
//! A search page walks its index for the ids, sort values and row numbers of its Tasks
//! (`tasks::search_page`): the work-list indexes carry every column their filters and sorts
//! need, so the walk reads no table page. Each Task's version, instant and JSON then come from
//! here; only the Tasks missing are read from the table, by row number, in the same read
//! transaction, and kept for the next search. An owner's or a patient's Tasks lie scattered
//! over the table, a leaf page each, which every commit empties from every search
//! connection's page cache: reading them was most of SQLite's CPU per search at 1 000 000
//! Tasks (BENCHMARKS.md, issue 16).
//!
//! **Coherence.** A text served here is exactly the Task's text in the search's own snapshot,
//! never older and never newer:
//! - the writer removes the Tasks a group wrote just before its COMMIT (`before_commit`), and
//!   again after it, committed or not (`after_commit`); each call moves the generation on, and
//!   between the two a commit is in flight;
//! - a search reads the generation before its read transaction starts (`Fence`), and fills in
//!   what it read only if no commit was in flight then and the generation has not moved since:
//!   then its snapshot was the latest committed state throughout, and any later write of the
//!   Task removes the text before it commits;
//! - a search takes a text only if it was filled at or before the generation the search read
//!   (`Entry::filled`): a text filled later could be newer than the search's snapshot (a write
//!   committed between the snapshot and the fill). A text found is therefore the Task's
//!   state from its fill until now, a span the search's snapshot falls in.
//!
//! Bounded by bytes: past the budget the oldest fills go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fhir::ids::{StoredInstant, TaskId, Version};
use crate::store::ListedTask;

/// What an entry costs besides its text and id (the map's and the queue's slots, the instant).
const ENTRY_OVERHEAD: usize = 96;

/// The texts of current Tasks, shared by the writer and the search connections.
#[derive(Debug)]
pub(super) struct TextCache {
    inner: Mutex<Inner>,
    budget: usize,
    /// For each page statement seen, its `keys_only` form if its plan walks covering indexes
    /// only (`tasks::covering`), or `None`: a work list asks the same few shapes all day.
    plans: Mutex<HashMap<String, Option<Arc<str>>>>,
}

/// Page statements whose plans are kept; past it they are forgotten and looked at again.
const MAX_PLANS: usize = 1024;

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<TaskId, Entry>,
    /// The fills in order, oldest first, with the generation each was filled at: the
    /// eviction order. An id whose entry has since been removed or filled again is skipped.
    order: VecDeque<(TaskId, u64)>,
    bytes: usize,
    /// Moves on at each `before_commit` and `after_commit` that removes something.
    generation: u64,
    /// A group that wrote Tasks is between `before_commit` and `after_commit`.
    in_flight: bool,
}

#[derive(Debug)]
struct Entry {
    version: Version,
    last_updated: StoredInstant,
    json: Arc<str>,
    /// The generation it was filled at.
    filled: u64,
}

/// What a search read of the cache before its snapshot: the generation, and whether a commit
/// was in flight.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fence {
    generation: u64,
    in_flight: bool,
}

impl TextCache {
    /// A cache of at most `mib` MiB of texts; `None` for 0 (every row read from the table).
    pub(super) fn new(mib: u64) -> Option<TextCache> {
        (mib > 0).then(|| TextCache {
            inner: Mutex::new(Inner::default()),
            plans: Mutex::new(HashMap::new()),
            budget: usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-made entry (each change is one
        // map operation and its byte count), so a poisoned lock is used as it is.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The `keys_only` form of page statement `rows` if `covering` says its plan reads no
    /// table page, else `None`; decided once per statement text.
    pub(super) fn keyed(
        &self,
        rows: &str,
        covering: impl FnOnce(&str) -> crate::error::Result<bool>,
    ) -> crate::error::Result<Option<Arc<str>>> {
        let known = self
            .plans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(rows)
            .cloned();
        if let Some(known) = known {
            return Ok(known);
        }
        let keyed = super::tasks::keys_only(rows);
        let decided = covering(&keyed)?.then(|| Arc::from(keyed));
        let mut plans = self
            .plans
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if plans.len() >= MAX_PLANS {
            plans.clear();
        }
        plans.insert(rows.to_string(), decided.clone());
        Ok(decided)
    }

    /// Read by a search before its read transaction begins.
    pub(super) fn fence(&self) -> Fence {
        let inner = self.lock();
        Fence {
            generation: inner.generation,
            in_flight: inner.in_flight,
        }
    }

    /// The texts of `ids` that the search behind `fence` may take, in order (`None` where it
    /// must read the row).
    pub(super) fn lookup(
        &self,
        fence: Fence,
        ids: &[&TaskId],
    ) -> Vec<Option<(Version, StoredInstant, Arc<str>)>> {
        let inner = self.lock();
        let found: Vec<_> = ids
            .iter()
            .map(|id| {
                inner
                    .entries
                    .get(*id)
                    .filter(|e| e.filled <= fence.generation)
                    .map(|e| (e.version, e.last_updated.clone(), e.json.clone()))
            })
            .collect();
        drop(inner);
        let hits = found.iter().filter(|f| f.is_some()).count();
        metrics::counter!("baton_search_text_cache_hits_total").increment(hits as u64);
        metrics::counter!("baton_search_text_cache_misses_total")
            .increment((found.len() - hits) as u64);
        found
    }

    /// Keeps the Tasks a search read from the table in the snapshot behind `fence`, if that
    /// snapshot is still the latest committed state (see the module's comment).
    pub(super) fn fill(&self, fence: Fence, tasks: &[ListedTask]) {
        if tasks.is_empty() || fence.in_flight {
            return;
        }
        let mut inner = self.lock();
        if inner.generation != fence.generation || inner.in_flight {
            return;
        }
        for task in tasks {
            let cost = ENTRY_OVERHEAD + task.id.as_str().len() + task.json.len();
            let entry = Entry {
                version: task.version,
                last_updated: task.last_updated.clone(),
                json: Arc::from(task.json.as_str()),
                filled: fence.generation,
            };
            if let Some(old) = inner.entries.insert(task.id.clone(), entry) {
                inner.bytes -= ENTRY_OVERHEAD + task.id.as_str().len() + old.json.len();
            }
            inner.bytes += cost;
            inner.order.push_back((task.id.clone(), fence.generation));
        }
        while inner.bytes > self.budget {
            let Some((id, filled)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&id).is_some_and(|e| e.filled == filled) {
                inner.remove(&id);
            }
        }
        // The queue holds stale ids of entries removed by writes or filled again; past twice
        // the entries it is rebuilt from the map, so that it cannot grow without bound.
        if inner.order.len() > 2 * inner.entries.len() + 1024 {
            let mut live: Vec<(TaskId, u64)> = inner
                .entries
                .iter()
                .map(|(id, e)| (id.clone(), e.filled))
                .collect();
            live.sort_by_key(|(_, filled)| *filled);
            inner.order = live.into();
        }
    }

    /// The writer, just before the COMMIT of a group that wrote `ids`.
    pub(super) fn before_commit(&self, ids: &[TaskId]) {
        let mut inner = self.lock();
        for id in ids {
            inner.remove(id);
        }
        inner.generation += 1;
        inner.in_flight = true;
    }

    /// The writer, once the COMMIT of a group that wrote `ids` has succeeded or failed.
    pub(super) fn after_commit(&self, ids: &[TaskId]) {
        let mut inner = self.lock();
        for id in ids {
            inner.remove(id);
        }
        inner.generation += 1;
        inner.in_flight = false;
    }
}

#[cfg(test)]
impl TextCache {
    /// How many Tasks' texts are kept.
    pub(super) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

impl Inner {
    fn remove(&mut self, id: &TaskId) {
        if let Some(old) = self.entries.remove(id) {
            self.bytes -= ENTRY_OVERHEAD + id.as_str().len() + old.json.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, json: &str) -> ListedTask {
        ListedTask {
            id: TaskId::parse(id).unwrap(),
            version: Version::FIRST,
            last_updated: StoredInstant::parse("2026-12-08T04:00:00.000000Z").unwrap(),
            json: json.into(),
        }
    }

    fn found(cache: &TextCache, fence: Fence, id: &str) -> Option<String> {
        let id = TaskId::parse(id).unwrap();
        cache.lookup(fence, &[&id])[0]
            .as_ref()
            .map(|(_, _, json)| json.to_string())
    }

    #[test]
    fn a_fill_is_served_to_later_searches_and_removed_by_a_write() {
        let cache = TextCache::new(1).unwrap();
        let fence = cache.fence();
        cache.fill(fence, &[task("a", "{\"v\":1}")]);
        assert_eq!(
            found(&cache, cache.fence(), "a").as_deref(),
            Some("{\"v\":1}")
        );
        let a = TaskId::parse("a").unwrap();
        cache.before_commit(std::slice::from_ref(&a));
        assert_eq!(found(&cache, cache.fence(), "a"), None);
        cache.after_commit(std::slice::from_ref(&a));
        assert_eq!(found(&cache, cache.fence(), "a"), None);
    }

    #[test]
    fn no_fill_from_a_snapshot_a_commit_may_have_passed() {
        let cache = TextCache::new(1).unwrap();
        let a = TaskId::parse("a").unwrap();
        // A commit in flight when the search began: its snapshot may be before or after it.
        cache.before_commit(std::slice::from_ref(&a));
        let during = cache.fence();
        cache.fill(during, &[task("a", "{}")]);
        cache.after_commit(std::slice::from_ref(&a));
        cache.fill(during, &[task("a", "{}")]);
        assert_eq!(found(&cache, cache.fence(), "a"), None);
        // A commit that began after the search did.
        let before = cache.fence();
        cache.before_commit(&[]);
        cache.after_commit(&[]);
        cache.fill(before, &[task("a", "{}")]);
        assert_eq!(found(&cache, cache.fence(), "a"), None);
    }

    #[test]
    fn a_search_does_not_take_a_text_filled_after_it_began() {
        let cache = TextCache::new(1).unwrap();
        let old = cache.fence();
        cache.before_commit(&[]);
        cache.after_commit(&[]);
        cache.fill(cache.fence(), &[task("a", "{}")]);
        assert_eq!(found(&cache, old, "a"), None);
        assert!(found(&cache, cache.fence(), "a").is_some());
    }

    #[test]
    fn the_budget_evicts_the_oldest_fills() {
        let cache = TextCache::new(1).unwrap();
        let text = "x".repeat(100_000);
        for n in 0..20 {
            cache.fill(cache.fence(), &[task(&format!("t{n}"), &text)]);
        }
        assert!(cache.lock().bytes <= 1 << 20);
        assert_eq!(found(&cache, cache.fence(), "t0"), None);
        assert!(found(&cache, cache.fence(), "t19").is_some());
    }
}
