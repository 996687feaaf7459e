//! The parsed form of the stored subscriptions in use, kept per version.
//!
//! A delivery attempt, the outbox's catch-up and `$events` all need a stored subscription's
//! settings, and reading them from its JSON means checking the whole resource again (topic,
//! filters, channel, extensions). The resource of a given (id, version) never changes, so it
//! is parsed once while it is in use: a newer version is parsed afresh, a subscription
//! withdrawn is forgotten, and past `capacity` entries the least recently used eighth is
//! dropped (a million subscriptions must not mean a million parsed specs; the ones being
//! delivered to stay). Start-up does not fill it. Nodes of a cluster each keep their own;
//! the version in the key is what keeps one node's entry from outliving a write made on
//! another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{ClientError, Error, Result};
use crate::fhir::ids::{SubscriptionId, Version};
use crate::fhir::subscription::SubscriptionSpec;

/// A stored subscription's resource as this hub reads it.
#[derive(Debug)]
pub struct Parsed {
    /// Read with any channel the hub knows: what matching needs. A subscription whose
    /// channel this configuration cannot serve still counts its events.
    pub matching: Result<Arc<SubscriptionSpec>, Box<ClientError>>,
    /// Read with this configuration's channel policy: what delivery needs.
    pub delivery: Result<Arc<SubscriptionSpec>, Box<ClientError>>,
}

impl Parsed {
    pub fn for_matching(&self) -> Result<Arc<SubscriptionSpec>> {
        self.matching.clone().map_err(Error::Client)
    }

    pub fn for_delivery(&self) -> Result<Arc<SubscriptionSpec>> {
        self.delivery.clone().map_err(Error::Client)
    }
}

/// What a parse gave, with a refusal kept apart from an error of the hub itself: only the
/// first is a fact about the resource, and so only it is kept.
pub fn refusal_or_spec(
    parsed: Result<SubscriptionSpec>,
) -> Result<Result<Arc<SubscriptionSpec>, Box<ClientError>>> {
    match parsed {
        Ok(spec) => Ok(Ok(Arc::new(spec))),
        Err(Error::Client(refusal)) => Ok(Err(refusal)),
        Err(other) => Err(other),
    }
}

/// How many parsed subscriptions a hub keeps: far more than are delivered to at once.
pub const SPEC_CACHE_CAPACITY: usize = 16_384;

/// Parsed subscriptions by id, each with the version it was parsed from.
pub struct SpecCache {
    entries: Mutex<Entries>,
    capacity: usize,
}

#[derive(Default)]
struct Entries {
    by_id: HashMap<SubscriptionId, Entry>,
    /// Counts uses, so that entries can be ranked by their last one.
    clock: u64,
}

struct Entry {
    version: Version,
    parsed: Arc<Parsed>,
    last_used: u64,
}

impl Default for SpecCache {
    fn default() -> SpecCache {
        SpecCache::with_capacity(SPEC_CACHE_CAPACITY)
    }
}

impl SpecCache {
    pub fn with_capacity(capacity: usize) -> SpecCache {
        SpecCache {
            entries: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries().by_id.len()
    }

    /// The parsed form of version `version` of subscription `id`, parsed by `parse` unless
    /// this version was parsed before. An error from `parse` is returned and not kept.
    pub fn get_or_parse(
        &self,
        id: &SubscriptionId,
        version: Version,
        parse: impl FnOnce() -> Result<Parsed>,
    ) -> Result<Arc<Parsed>> {
        {
            let mut entries = self.entries();
            entries.clock += 1;
            let now = entries.clock;
            if let Some(entry) = entries.by_id.get_mut(id)
                && entry.version == version
            {
                entry.last_used = now;
                return Ok(entry.parsed.clone());
            }
        }
        // Parsed without the lock, so attempts for other subscriptions do not wait on it; two
        // attempts parsing the same version at once only do the work twice.
        let parsed = Arc::new(parse()?);
        let mut entries = self.entries();
        // Versions only grow: an attempt that loaded an older version just before a write
        // must not put it back over the newer one.
        if entries
            .by_id
            .get(id)
            .is_none_or(|entry| entry.version <= version)
        {
            if !entries.by_id.contains_key(id) && entries.by_id.len() >= self.capacity {
                entries.evict_least_recently_used();
            }
            let last_used = entries.clock;
            entries.by_id.insert(
                id.clone(),
                Entry {
                    version,
                    parsed: parsed.clone(),
                    last_used,
                },
            );
        }
        Ok(parsed)
    }

    /// Drops whatever is kept for `id` (deleted, or withdrawn from this node).
    pub fn forget(&self, id: &SubscriptionId) {
        self.entries().by_id.remove(id);
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Entries {
    /// Drops the least recently used eighth (at least one), so that the ranking, which visits
    /// every entry, runs once per that many new entries.
    fn evict_least_recently_used(&mut self) {
        let mut uses: Vec<u64> = self.by_id.values().map(|e| e.last_used).collect();
        let drop = (uses.len() / 8).max(1);
        let (_, cutoff, _) = uses.select_nth_unstable(drop - 1);
        let cutoff = *cutoff;
        let mut left = drop;
        self.by_id.retain(|_, entry| {
            if left > 0 && entry.last_used <= cutoff {
                left -= 1;
                false
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn refused(why: &str) -> Box<ClientError> {
        let Error::Client(refusal) = Error::invalid("Subscription.criteria", why) else {
            unreachable!("Error::invalid is a client error")
        };
        refusal
    }

    /// A stand-in for the parse: refuses with a diagnostic naming the version, so that each
    /// result shows which parse made it.
    fn parse_version(parses: &Cell<u32>, version: i64) -> impl FnOnce() -> Result<Parsed> {
        move || {
            parses.set(parses.get() + 1);
            Ok(Parsed {
                matching: Err(refused(&format!("version {version}"))),
                delivery: Err(refused(&format!("version {version}"))),
            })
        }
    }

    fn diagnostics(parsed: &Parsed) -> String {
        parsed.matching.as_ref().unwrap_err().diagnostics.clone()
    }

    fn s1() -> SubscriptionId {
        SubscriptionId::parse("s1").unwrap()
    }

    #[test]
    fn each_version_is_parsed_once_and_a_forgotten_id_again() {
        let cache = SpecCache::default();
        let parses = Cell::new(0);
        // (what happens, version asked for, parses so far afterwards, version the result is of)
        let steps: [(&str, Option<i64>, u32, i64); 7] = [
            ("first read", Some(1), 1, 1),
            ("same version again", Some(1), 1, 1),
            ("a changed version is parsed", Some(2), 2, 2),
            ("then kept", Some(2), 2, 2),
            ("deleted: forgotten", None, 2, 2),
            ("read after forgetting is parsed", Some(2), 3, 2),
            ("an older version loaded late is parsed", Some(1), 4, 1),
        ];
        for (what, version, expected_parses, of_version) in steps {
            match version {
                Some(version) => {
                    let parsed = cache
                        .get_or_parse(
                            &s1(),
                            Version::new(version),
                            parse_version(&parses, version),
                        )
                        .unwrap();
                    assert!(
                        diagnostics(&parsed).contains(&format!("version {of_version}")),
                        "{what}"
                    );
                }
                None => cache.forget(&s1()),
            }
            assert_eq!(parses.get(), expected_parses, "{what}");
        }
        // The late older version did not displace the newer one.
        let parsed = cache
            .get_or_parse(&s1(), Version::new(2), parse_version(&parses, 2))
            .unwrap();
        assert!(diagnostics(&parsed).contains("version 2"));
        assert_eq!(parses.get(), 4, "version 2 is still kept");
    }

    #[test]
    fn past_its_capacity_the_least_recently_used_are_dropped_and_parsed_again_alike() {
        let cache = SpecCache::with_capacity(16);
        let parses = Cell::new(0);
        let id = |n: u32| SubscriptionId::parse(&format!("s{n}")).unwrap();
        let get = |n: u32| {
            cache
                .get_or_parse(&id(n), Version::FIRST, parse_version(&parses, i64::from(n)))
                .unwrap()
        };
        for n in 0..16 {
            get(n);
        }
        assert_eq!(parses.get(), 16);
        // s0 and s1 in use again: s2 and s3 are now the least recently used.
        let first = get(0);
        get(1);
        assert_eq!(parses.get(), 16, "still kept");
        get(16);
        assert_eq!(cache.len(), 15, "two dropped (one eighth), one added");
        get(0);
        get(1);
        assert_eq!(parses.get(), 17, "the ones in use stayed");
        let again = get(2);
        assert_eq!(parses.get(), 18, "a dropped one is parsed again");
        assert_eq!(diagnostics(&again), diagnostics(&get(2)));
        assert!(diagnostics(&again).contains("version 2"));
        assert!(diagnostics(&first).contains("version 0"));
        assert!(cache.len() <= 16);
    }

    #[test]
    fn an_error_of_the_hub_itself_is_not_kept() {
        let cache = SpecCache::default();
        let parses = Cell::new(0);
        let failing = || {
            parses.set(parses.get() + 1);
            Err(Error::internal(
                "a parse failed",
                "not a fact about the resource",
            ))
        };
        assert!(cache.get_or_parse(&s1(), Version::FIRST, failing).is_err());
        cache
            .get_or_parse(&s1(), Version::FIRST, parse_version(&parses, 1))
            .unwrap();
        assert_eq!(parses.get(), 2, "the failed parse left nothing behind");
    }
}
