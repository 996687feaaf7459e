//! An open-addressing hash table of 4-byte entries whose keys live elsewhere, the subscription
//! index's way of finding slots, filings and readers by a key without storing the key (or
//! its hash) a second time.
//!
//! A `std` map from a key's hash to an entry number takes 16 bytes per bucket (the `u64`
//! padded) plus a control byte, at a load that can fall to 44 %: about 36 bytes per
//! subscription at a million, for each of the index's maps. Here a bucket is the entry
//! number alone (linear probing, at most three quarters full, so 5.3–10.7 bytes per entry);
//! each probe asks the caller whether the entry is the one sought, and growing or removing
//! asks it for an entry's hash. Removal shifts the entries after it back, so no tombstones
//! accumulate.

/// A bucket holding no entry.
const EMPTY: u32 = u32::MAX;

#[derive(Debug, Default)]
pub(super) struct Table {
    /// A power of two many buckets, or none before the first insert.
    buckets: Vec<u32>,
    len: usize,
}

impl Table {
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mask(&self) -> usize {
        self.buckets.len() - 1
    }

    /// The bucket where probing for `hash` starts: its low bits with the high ones folded in.
    fn home(&self, hash: u64) -> usize {
        (hash ^ (hash >> 32)) as usize & self.mask()
    }

    /// The bucket holding the entry for which `is` holds, among those whose key hashes to
    /// `hash`.
    pub(super) fn find(&self, hash: u64, is: impl Fn(u32) -> bool) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        let mut at = self.home(hash);
        loop {
            let entry = self.buckets[at];
            if entry == EMPTY {
                return None;
            }
            if is(entry) {
                return Some(at);
            }
            at = (at + 1) & self.mask();
        }
    }

    /// The entry in a bucket `find` returned.
    pub(super) fn get(&self, bucket: usize) -> u32 {
        self.buckets[bucket]
    }

    /// Replaces the entry in a bucket `find` returned with another of the same key.
    pub(super) fn set(&mut self, bucket: usize, entry: u32) {
        self.buckets[bucket] = entry;
    }

    /// Adds an entry whose key is not in the table yet. `hash_of` gives the hash of an entry
    /// already held, for when the table grows.
    pub(super) fn insert(&mut self, hash: u64, entry: u32, hash_of: impl Fn(u32) -> u64) {
        debug_assert_ne!(entry, EMPTY);
        if (self.len + 1) * 4 > self.buckets.len() * 3 {
            self.grow(&hash_of);
        }
        let mut at = self.home(hash);
        while self.buckets[at] != EMPTY {
            at = (at + 1) & self.mask();
        }
        self.buckets[at] = entry;
        self.len += 1;
    }

    fn grow(&mut self, hash_of: &impl Fn(u32) -> u64) {
        let size = (self.buckets.len() * 2).max(8);
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; size]);
        for entry in old.into_iter().filter(|&e| e != EMPTY) {
            let mut at = self.home(hash_of(entry));
            while self.buckets[at] != EMPTY {
                at = (at + 1) & self.mask();
            }
            self.buckets[at] = entry;
        }
    }

    /// Empties a bucket `find` returned, moving back the entries after it that would no
    /// longer be found past the hole. `hash_of` gives the hash of an entry held.
    pub(super) fn remove(&mut self, bucket: usize, hash_of: impl Fn(u32) -> u64) {
        let mask = self.mask();
        let mut hole = bucket;
        let mut at = (bucket + 1) & mask;
        loop {
            let entry = self.buckets[at];
            if entry == EMPTY {
                break;
            }
            let home = self.home(hash_of(entry));
            // The entry may move into the hole if its home is not in (hole, at], cyclically.
            let stays = if hole <= at {
                hole < home && home <= at
            } else {
                hole < home || home <= at
            };
            if !stays {
                self.buckets[hole] = entry;
                hole = at;
            }
            at = (at + 1) & mask;
        }
        self.buckets[hole] = EMPTY;
        self.len -= 1;
        if self.len == 0 {
            // Nothing held: give the buckets back.
            self.buckets = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::collections::HashSet;

    /// Random inserts and removals of numbers, with hashes made to collide often (few distinct
    /// values), against a `HashSet`.
    #[test]
    fn the_table_holds_exactly_what_was_inserted_and_not_removed() {
        let hash = |n: u32| u64::from(n % 37).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = StdRng::seed_from_u64(7);
        let mut table = Table::default();
        let mut expected = HashSet::new();
        for _ in 0..20_000 {
            let n = rng.random_range(0..500u32);
            let found = table.find(hash(n), |e| e == n);
            assert_eq!(found.is_some(), expected.contains(&n), "{n}");
            match found {
                Some(bucket) if rng.random_bool(0.5) => {
                    assert_eq!(table.get(bucket), n);
                    table.remove(bucket, hash);
                    expected.remove(&n);
                }
                Some(_) => {}
                None => {
                    table.insert(hash(n), n, hash);
                    expected.insert(n);
                }
            }
            assert_eq!(table.len(), expected.len());
        }
        for n in 0..500 {
            assert_eq!(
                table.find(hash(n), |e| e == n).is_some(),
                expected.contains(&n)
            );
        }
        for n in expected.clone() {
            let bucket = table.find(hash(n), |e| e == n).unwrap();
            table.remove(bucket, hash);
        }
        assert!(table.is_empty() && table.buckets.is_empty());
    }
}
