//! An open-addressing hash table of 4-byte entries whose keys live elsewhere, the subscription
//! index's way of finding slots, filings and readers by a key without storing the key (or
//! its hash) a second time.
//!
//! A `std` map from a key's hash to an entry number takes 16 bytes per bucket (the `u64`
//! padded) plus a control byte, at a load that can fall to 44 %: about 36 bytes per
//! subscription at a million, for each of the index's maps. Here a bucket is 4 bytes (linear
//! probing, at most three quarters full, so 5.3–10.7 bytes per entry): the entry number in
//! its low 26 bits and, in its high 6, a tag taken from the top of the key's hash. A probe
//! asks the caller whether the entry is the one sought only when the tags agree (one bucket
//! in 64 otherwise), so a lookup, and above all one for a key that is not there (every new
//! subscription's id, key and reader), reads the bucket array and seldom the entries it
//! names: the keys live in slots all over memory, and a probe through each was a cache miss.
//! Growing and removing ask the caller for an entry's hash (the home bucket needs more bits
//! of it than the tag keeps), so a table filled with many entries at once is sized for them
//! first (`reserve`). Removal shifts the entries after it back, so no tombstones accumulate.

/// A bucket holding no entry.
const EMPTY: u32 = u32::MAX;
/// The bits of a bucket that hold its entry's number.
const ENTRY_BITS: u32 = 26;
const ENTRY_MASK: u32 = (1 << ENTRY_BITS) - 1;
/// The largest entry number a table holds: 67 million, below which every bucket but `EMPTY`
/// is distinct (`EMPTY` would be the largest number with the largest tag).
pub(super) const MAX_ENTRY: u32 = ENTRY_MASK - 1;

#[derive(Debug, Default)]
pub(super) struct Table {
    /// A power of two many buckets, or none before the first insert.
    buckets: Vec<u32>,
    len: usize,
}

/// The tag of a hash, in a bucket's high bits.
fn tag(hash: u64) -> u32 {
    ((hash >> (64 - (32 - ENTRY_BITS))) as u32) << ENTRY_BITS
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
    /// The tag's bits are left out, so that a tag says something the home bucket does not.
    fn home(&self, hash: u64) -> usize {
        let hash = hash & (u64::MAX >> (32 - ENTRY_BITS));
        (hash ^ (hash >> 32)) as usize & self.mask()
    }

    /// The bucket holding the entry for which `is` holds, among those whose key hashes to
    /// `hash`.
    pub(super) fn find(&self, hash: u64, is: impl Fn(u32) -> bool) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        let tag = tag(hash);
        let mut at = self.home(hash);
        loop {
            let bucket = self.buckets[at];
            if bucket == EMPTY {
                return None;
            }
            if bucket & !ENTRY_MASK == tag && is(bucket & ENTRY_MASK) {
                return Some(at);
            }
            at = (at + 1) & self.mask();
        }
    }

    /// The entry in a bucket `find` returned.
    pub(super) fn get(&self, bucket: usize) -> u32 {
        self.buckets[bucket] & ENTRY_MASK
    }

    /// Replaces the entry in a bucket `find` returned with another of the same key.
    pub(super) fn set(&mut self, bucket: usize, entry: u32) {
        debug_assert!(entry <= MAX_ENTRY);
        let tag = self.buckets[bucket] & !ENTRY_MASK;
        self.buckets[bucket] = tag | entry;
    }

    /// Makes room for `additional` more entries without growing on the way: a table about to
    /// take many entries at once (start-up) grows once instead of rehashing every entry at
    /// each doubling. `hash_of` gives the hash of an entry already held.
    pub(super) fn reserve(&mut self, additional: usize, hash_of: impl Fn(u32) -> u64) {
        let wanted = self.len.saturating_add(additional);
        if wanted * 4 > self.buckets.len() * 3 {
            let size = wanted
                .saturating_mul(4)
                .div_ceil(3)
                .next_power_of_two()
                .max(8);
            self.rehash(size, &hash_of);
        }
    }

    /// Gives back the buckets the entries held do not need: the table becomes the smallest
    /// that is at most three quarters full, the size inserting them one by one leaves.
    pub(super) fn shrink_to_fit(&mut self, hash_of: impl Fn(u32) -> u64) {
        let size = if self.len == 0 {
            0
        } else {
            (self.len * 4).div_ceil(3).next_power_of_two().max(8)
        };
        if size < self.buckets.len() {
            if size == 0 {
                self.buckets = Vec::new();
            } else {
                self.rehash(size, &hash_of);
            }
        }
    }

    /// Adds an entry (a number up to `MAX_ENTRY`) whose key is not in the table yet.
    /// `hash_of` gives the hash of an entry already held, for when the table grows.
    pub(super) fn insert(&mut self, hash: u64, entry: u32, hash_of: impl Fn(u32) -> u64) {
        assert!(
            entry <= MAX_ENTRY,
            "a subscription index holds at most {MAX_ENTRY} subscriptions, filings and readers"
        );
        if (self.len + 1) * 4 > self.buckets.len() * 3 {
            let size = (self.buckets.len() * 2).max(8);
            self.rehash(size, &hash_of);
        }
        self.place(tag(hash) | entry, self.home(hash));
        self.len += 1;
    }

    /// Puts a bucket's content in the first empty bucket from `home` on.
    fn place(&mut self, bucket: u32, home: usize) {
        let mut at = home;
        while self.buckets[at] != EMPTY {
            at = (at + 1) & self.mask();
        }
        self.buckets[at] = bucket;
    }

    fn rehash(&mut self, size: usize, hash_of: &impl Fn(u32) -> u64) {
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; size]);
        for bucket in old.into_iter().filter(|&b| b != EMPTY) {
            let home = self.home(hash_of(bucket & ENTRY_MASK));
            self.place(bucket, home);
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
            let home = self.home(hash_of(entry & ENTRY_MASK));
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

    /// A reserved table takes what was reserved without growing, finds each entry, and tells
    /// apart entries whose hashes differ only in the tag's bits, or only outside them.
    #[test]
    fn a_reserved_table_takes_its_entries_without_growing_and_tags_only_narrow_the_search() {
        // The top 6 bits (the tag) from one part of n, the rest from another: many entries
        // share a tag, many share a home, and each number has its own hash.
        let hash = |n: u32| (u64::from(n % 64) << 58) | u64::from(n / 64 % 16);
        let mut table = Table::default();
        table.insert(hash(5), 5, hash);
        table.reserve(3000, hash);
        let buckets = table.buckets.len();
        assert!(buckets * 3 >= 3001 * 4, "{buckets} buckets");
        for n in 6..3005 {
            table.insert(hash(n), n, hash);
        }
        assert_eq!(table.buckets.len(), buckets, "no growth after reserve");
        for n in 0..4000 {
            let found = table.find(hash(n), |e| e == n).map(|b| table.get(b));
            assert_eq!(found, (5..3005).contains(&n).then_some(n), "{n}");
        }
        // The largest number with the largest tag is not mistaken for an empty bucket.
        let mut table = Table::default();
        let top = u64::MAX;
        table.insert(top, MAX_ENTRY, |_| top);
        let bucket = table.find(top, |e| e == MAX_ENTRY).unwrap();
        assert_eq!(table.get(bucket), MAX_ENTRY);
        table.set(bucket, 3);
        assert_eq!(table.find(top, |e| e == 3).map(|b| table.get(b)), Some(3));
    }
}
