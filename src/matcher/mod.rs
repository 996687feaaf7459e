//! Matching Task changes to subscriptions: topic triggers and subscription filters, as pure
//! code with no IO.
//!
//! Active subscriptions live in an index keyed by one equality filter each (for example
//! `owner = Practitioner/7`). A change looks up only the keys its Task actually has, so the
//! cost of an event grows with the subscriptions that might match it, not with all of them.
//! Subscriptions without an indexable filter sit in a per-topic catch-all list.

pub mod fhirpath;
mod table;
pub mod topic;

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};

use serde_json::Value;

use crate::auth::{Principal, Reader};
use crate::fhir::ids::{ChangeSeq, SubscriptionId};
use crate::fhir::interaction::Interaction;
use crate::fhir::search::{Predicate, SystemMatch, TaskIndex, matches};
use table::Table;
use topic::{TaskState, Topic};

/// A subscription to put in the index: what the matcher needs to know about it. The index
/// keeps a compact form of it (see `SubscriptionIndex`).
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

/// The end of a chain of slots or filings.
const END: u32 = u32::MAX;

/// A subscription id as the index keeps it: the UUIDs the API assigns as their 16 bytes, any
/// other id (a client's, on update-as-create) as its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum CompactId {
    Uuid([u8; 16]),
    Text(Box<str>),
}

impl CompactId {
    fn of(id: &SubscriptionId) -> CompactId {
        let text = id.as_str();
        match uuid::Uuid::try_parse(text) {
            // Only the lower-case hyphenated form writes back as the same text.
            Ok(uuid)
                if uuid
                    .hyphenated()
                    .encode_lower(&mut uuid::Uuid::encode_buffer())
                    == text =>
            {
                CompactId::Uuid(uuid.into_bytes())
            }
            _ => CompactId::Text(text.into()),
        }
    }

    fn to_id(&self) -> Option<SubscriptionId> {
        match self {
            CompactId::Uuid(bytes) => SubscriptionId::parse(
                uuid::Uuid::from_bytes(*bytes)
                    .hyphenated()
                    .encode_lower(&mut uuid::Uuid::encode_buffer()),
            )
            .ok(),
            CompactId::Text(text) => SubscriptionId::parse(text).ok(),
        }
    }
}

/// One subscription in the index: 72 bytes, what most subscriptions need inline, the rest
/// behind one pointer.
#[derive(Debug)]
struct Slot {
    id: CompactId,
    /// The one value it is filed under, when it is filed under exactly one (the common case:
    /// `owner=Practitioner/7`), of the parameter `param`.
    key: Option<Box<str>>,
    /// What few subscriptions have: filters still to check, or several key values.
    rest: Option<Box<Rest>>,
    created_after_seq: ChangeSeq,
    /// What the read rule needs of its author: its number among the index's `readers`,
    /// shared by every subscription of that reader.
    reader: u32,
    topic: u32,
    /// Position in `KEY_PREFERENCE` of the parameter of its keys.
    param: u8,
}

/// The part of a slot most subscriptions do without.
#[derive(Debug)]
struct Rest {
    /// The filters still to check once a change has reached it. The filter it is filed under
    /// is left out when reaching it through that key already proves the filter holds.
    filters: Box<[Predicate]>,
    /// The values it is filed under, when there are several (`Slot::key` is then None).
    keys: Box<[Box<str>]>,
}

impl Slot {
    /// The values it is filed under; none for a catch-all.
    fn keys(&self) -> &[Box<str>] {
        match (&self.key, &self.rest) {
            (Some(key), _) => std::slice::from_ref(key),
            (None, Some(rest)) => &rest.keys,
            (None, None) => &[],
        }
    }

    fn filters(&self) -> &[Predicate] {
        self.rest.as_ref().map_or(&[], |rest| &rest.filters)
    }
}

/// A slot filed under one of its key values; the filings of one (topic, parameter, value)
/// are chained.
#[derive(Debug, Clone, Copy)]
struct Filing {
    slot: u32,
    /// Which of the slot's keys.
    value: u32,
    next: u32,
}

/// The readers of the subscriptions held, each once, numbered: a practitioner with many
/// subscriptions has one `Reader`, and each slot holds its 4-byte number.
#[derive(Debug, Default)]
struct Readers {
    /// Each reader with how many slots name it; None for a number free for reuse.
    entries: Vec<Option<(Reader, u32)>>,
    free: Vec<u32>,
    /// Reader numbers by the hash of their reader.
    table: Table,
}

impl Readers {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    fn get(&self, number: u32) -> &Reader {
        &self.entries[number as usize]
            .as_ref()
            .expect("slots name readers in use")
            .0
    }

    /// The number of `reader` (whose hash by `hasher` is `hash`), numbering it if it is new,
    /// counted as used once more.
    fn intern(&mut self, reader: Reader, hash: u64, hasher: &RandomState) -> u32 {
        let Readers {
            entries,
            free,
            table,
        } = self;
        let held = |number: u32| entries[number as usize].as_ref().expect("numbered readers");
        if let Some(bucket) = table.find(hash, |n| held(n).0 == reader) {
            let number = table.get(bucket);
            if let Some((_, uses)) = entries[number as usize].as_mut() {
                *uses += 1;
            }
            return number;
        }
        let number = match free.pop() {
            Some(number) => {
                entries[number as usize] = Some((reader, 1));
                number
            }
            None => {
                entries.push(Some((reader, 1)));
                index_of(entries.len() - 1)
            }
        };
        let entries = &*entries;
        table.insert(hash, number, |n| {
            hasher.hash_one(&entries[n as usize].as_ref().expect("numbered readers").0)
        });
        number
    }

    /// Room in the table for `additional` more readers (`SubscriptionIndex::reserve`). The
    /// entries are left to grow as they come: many subscriptions share a reader (one
    /// integration service writing them all), and a vector grows without rehashing.
    fn reserve(&mut self, additional: usize, hasher: &RandomState) {
        let entries = &self.entries;
        self.table.reserve(additional, |n| {
            hasher.hash_one(&entries[n as usize].as_ref().expect("numbered readers").0)
        });
    }

    fn shrink_to_fit(&mut self, hasher: &RandomState) {
        self.entries.shrink_to_fit();
        let entries = &self.entries;
        self.table.shrink_to_fit(|n| {
            hasher.hash_one(&entries[n as usize].as_ref().expect("numbered readers").0)
        });
    }

    /// One slot fewer names reader `number`; the last one frees it.
    fn release(&mut self, number: u32, hasher: &RandomState) {
        let Readers {
            entries,
            free,
            table,
        } = self;
        let Some((reader, uses)) = entries[number as usize].as_mut() else {
            return;
        };
        *uses -= 1;
        if *uses > 0 {
            return;
        }
        let hash = hasher.hash_one(&*reader);
        if let Some(bucket) = table.find(hash, |n| n == number) {
            let entries = &*entries;
            table.remove(bucket, |n| {
                hasher.hash_one(&entries[n as usize].as_ref().expect("numbered readers").0)
            });
        }
        entries[number as usize] = None;
        free.push(number);
    }
}

/// The index of active subscriptions.
///
/// Built to hold a million subscriptions in about 140 bytes each (230 when each has its own
/// author): each is one 72-byte `Slot` in a vector (its id inline when it is a UUID, its single
/// key value inline, its author a number into the interned `readers`), found by id through an
/// open-addressing `Table` of slot numbers, and by key through a `Table` of the first `Filing`
/// of each (topic, parameter, value)'s chain. The tables hold 4-byte numbers only: every probe
/// compares the real id or key value through the slot.
#[derive(Default)]
pub struct SubscriptionIndex {
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    filings: Vec<Filing>,
    free_filings: Vec<u32>,
    /// Slot numbers by the hash of their id.
    by_id: Table,
    /// The first filing of each (topic, parameter, value)'s chain, by the hash of that key.
    keyed: Table,
    /// Per topic, the subscriptions without an indexable filter.
    catch_all: Vec<Vec<u32>>,
    /// Per topic, how many subscriptions it has (topics without any are not evaluated).
    per_topic: Vec<u32>,
    /// The readers of the subscriptions held, each once.
    readers: Readers,
    hasher: RandomState,
    len: usize,
}

/// A subscription made ready for the index by its `preparer`: what `insert_new` works out from
/// a `Candidate` before it touches the index (its compact id, reader, keys and filters, and
/// the hashes they are found by), so that start-up can prepare a page on every core and
/// hold the index's lock only to link each in (`insert_prepared`).
pub struct Prepared {
    /// Its slot, but for the reader's number.
    slot: Slot,
    reader: Reader,
    id_hash: u64,
    reader_hash: u64,
    /// The hash of its first key, when it has one.
    first_key_hash: u64,
    /// The preparer's hasher's hash of `HASHER_MARK`, to check it was this index's.
    hasher_mark: u64,
}

/// What a hasher hashes to tell whether it is the index's.
const HASHER_MARK: u64 = 0x005e_ed15;

/// Prepares candidates for one index, on any thread (`SubscriptionIndex::preparer`).
#[derive(Clone)]
pub struct Preparer {
    /// The index's hasher.
    hasher: RandomState,
}

impl Preparer {
    pub fn prepare(&self, candidate: Candidate) -> Prepared {
        let Candidate {
            id,
            topic,
            mut filters,
            author,
            created_after_seq,
        } = candidate;
        let id = CompactId::of(&id);
        let reader = Reader::of(&author);
        let (param, mut keys) = match index_key(&filters) {
            Some((position, rank, codes)) => {
                let keys: Vec<Box<str>> = codes.into_iter().map(Box::from).collect();
                if implied_by_key(&filters[position]) {
                    filters.remove(position);
                }
                (rank as u8, keys)
            }
            None => (0, Vec::new()),
        };
        let key = match keys.as_slice() {
            [_] => keys.pop(),
            _ => None,
        };
        let rest = (!filters.is_empty() || !keys.is_empty()).then(|| {
            Box::new(Rest {
                filters: filters.into_boxed_slice(),
                keys: keys.into_boxed_slice(),
            })
        });
        let slot = Slot {
            id,
            key,
            rest,
            created_after_seq,
            reader: 0,
            topic: index_of(topic),
            param,
        };
        let hasher = &self.hasher;
        Prepared {
            id_hash: hasher.hash_one(&slot.id),
            reader_hash: hasher.hash_one(&reader),
            first_key_hash: slot
                .keys()
                .first()
                .map_or(0, |value| key_hash(hasher, slot.topic, slot.param, value)),
            hasher_mark: hasher.hash_one(HASHER_MARK),
            slot,
            reader,
        }
    }
}

/// The slot a chain or table leads to.
fn slot_in(slots: &[Option<Slot>], at: u32) -> &Slot {
    slots[at as usize]
        .as_ref()
        .expect("chains only lead to slots in use")
}

/// The (topic, parameter, value) a filing files its slot under.
fn filing_key(slots: &[Option<Slot>], filing: Filing) -> (u32, u8, &str) {
    let slot = slot_in(slots, filing.slot);
    (slot.topic, slot.param, &slot.keys()[filing.value as usize])
}

fn key_hash(hasher: &RandomState, topic: u32, param: u8, value: &str) -> u64 {
    hasher.hash_one((topic, param, value))
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

/// Chooses the filter a subscription is filed under: one positive token filter with codes on
/// a parameter of `KEY_PREFERENCE` (a Task can only match if it carries one of the codes).
/// Returns its position among the filters, the parameter's rank and the codes.
fn index_key(filters: &[Predicate]) -> Option<(usize, usize, Vec<&str>)> {
    let mut best: Option<(usize, usize, Vec<&str>)> = None;
    for (position, predicate) in filters.iter().enumerate() {
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
        let codes: Option<Vec<&str>> = any_of.iter().map(|v| v.code.as_deref()).collect();
        let Some(codes) = codes else { continue };
        if codes.is_empty() {
            continue;
        }
        if best.as_ref().is_none_or(|(_, r, _)| rank < *r) {
            best = Some((position, rank, codes));
        }
    }
    best
}

/// Whether reaching a subscription through one of this filter's codes proves the filter:
/// every value matches its code on any system, as the index's lookup does.
fn implied_by_key(filter: &Predicate) -> bool {
    matches!(filter, Predicate::Token { negated: false, any_of, .. }
        if any_of.iter().all(|v| v.system == SystemMatch::Any && v.code.is_some()))
}

/// The topic's view of one side of a change.
fn state<'a>(side: &Option<Side<'a>>) -> Option<TaskState<'a>> {
    side.as_ref().map(|s| TaskState {
        resource: s.resource,
        index: s.index,
    })
}

fn index_of(position: usize) -> u32 {
    u32::try_from(position).expect("fewer than 4 billion subscriptions")
}

impl SubscriptionIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, id: &SubscriptionId) -> bool {
        self.find(&CompactId::of(id)).is_some()
    }

    fn slot(&self, slot: u32) -> &Slot {
        slot_in(&self.slots, slot)
    }

    fn id_hash(&self, id: &CompactId) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The slot holding `id`.
    fn find(&self, id: &CompactId) -> Option<u32> {
        let bucket = self
            .by_id
            .find(self.id_hash(id), |at| self.slot(at).id == *id)?;
        Some(self.by_id.get(bucket))
    }

    /// The bucket of `keyed` holding the chain of (topic, parameter, value).
    fn chain(&self, topic: u32, param: u8, value: &str) -> Option<usize> {
        self.chain_hashed(
            key_hash(&self.hasher, topic, param, value),
            topic,
            param,
            value,
        )
    }

    /// `chain`, with the key's hash worked out already.
    fn chain_hashed(&self, hash: u64, topic: u32, param: u8, value: &str) -> Option<usize> {
        self.keyed.find(hash, |head| {
            filing_key(&self.slots, self.filings[head as usize]) == (topic, param, value)
        })
    }

    /// Makes room for `additional` more subscriptions, as if each were filed under one key of
    /// its own and had an author of its own: a start-up that knows how many it is about to put
    /// in grows each vector and table once, instead of moving (and, for a table, rehashing
    /// through every slot) what it holds at each doubling. `shrink_to_fit` gives back what the
    /// subscriptions put in did not use.
    pub fn reserve(&mut self, additional: usize) {
        self.slots
            .reserve_exact(additional.saturating_sub(self.free_slots.len()));
        self.filings
            .reserve_exact(additional.saturating_sub(self.free_filings.len()));
        let (slots, filings, hasher) = (&self.slots, &self.filings, &self.hasher);
        self.by_id.reserve(additional, |other| {
            hasher.hash_one(&slot_in(slots, other).id)
        });
        self.keyed.reserve(additional, |other| {
            let (topic, param, value) = filing_key(slots, filings[other as usize]);
            key_hash(hasher, topic, param, value)
        });
        self.readers.reserve(additional, hasher);
    }

    /// Gives back the room `reserve` made that the subscriptions put in since did not take
    /// (keys or authors they share, catch-alls filed under no key): the index then holds what
    /// inserting them one by one would have left.
    pub fn shrink_to_fit(&mut self) {
        self.slots.shrink_to_fit();
        self.filings.shrink_to_fit();
        let (slots, filings, hasher) = (&self.slots, &self.filings, &self.hasher);
        self.by_id
            .shrink_to_fit(|other| hasher.hash_one(&slot_in(slots, other).id));
        self.keyed.shrink_to_fit(|other| {
            let (topic, param, value) = filing_key(slots, filings[other as usize]);
            key_hash(hasher, topic, param, value)
        });
        self.readers.shrink_to_fit(hasher);
    }

    /// Adds or replaces a subscription.
    pub fn insert(&mut self, candidate: Candidate) {
        self.remove(&candidate.id);
        self.insert_new(candidate);
    }

    /// Adds a subscription whose id the index does not hold: what start-up files from a read
    /// of the store, where each id comes once, spares `insert`'s lookup for one to replace.
    /// An id held already would then be there twice (and matched twice), so `insert` is for
    /// anything else.
    pub fn insert_new(&mut self, candidate: Candidate) {
        let prepared = self.preparer().prepare(candidate);
        self.insert_prepared(prepared);
    }

    /// What prepares candidates for this index off its lock (`Prepared`).
    pub fn preparer(&self) -> Preparer {
        Preparer {
            hasher: self.hasher.clone(),
        }
    }

    /// Adds a subscription prepared by this index's `preparer`, whose id the index does not
    /// hold (as `insert_new`): all that is left to do is to find room for it and link it in.
    pub fn insert_prepared(&mut self, prepared: Prepared) {
        debug_assert!(
            self.hasher.hash_one(HASHER_MARK) == prepared.hasher_mark,
            "prepared by another index's preparer"
        );
        debug_assert!(
            self.find(&prepared.slot.id).is_none(),
            "insert_prepared with an id held"
        );
        let Prepared {
            mut slot,
            reader,
            id_hash,
            reader_hash,
            first_key_hash,
            hasher_mark: _,
        } = prepared;
        slot.reader = self.readers.intern(reader, reader_hash, &self.hasher);
        let topic = slot.topic as usize;
        let at = match self.free_slots.pop() {
            Some(at) => {
                self.slots[at as usize] = Some(slot);
                at
            }
            None => {
                self.slots.push(Some(slot));
                index_of(self.slots.len() - 1)
            }
        };
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_id.insert(id_hash, at, |other| {
            hasher.hash_one(&slot_in(slots, other).id)
        });
        if self.per_topic.len() <= topic {
            self.per_topic.resize(topic + 1, 0);
            self.catch_all.resize_with(topic + 1, Vec::new);
        }
        self.per_topic[topic] += 1;
        let count = self.slot(at).keys().len();
        if count == 0 {
            self.catch_all[topic].push(at);
        }
        for value in 0..count {
            let slot = self.slot(at);
            let key_text: &str = &slot.keys()[value];
            let hash = if value == 0 {
                first_key_hash
            } else {
                key_hash(&self.hasher, slot.topic, slot.param, key_text)
            };
            let head = self.chain_hashed(hash, slot.topic, slot.param, key_text);
            let filing = Filing {
                slot: at,
                value: index_of(value),
                next: head.map_or(END, |bucket| self.keyed.get(bucket)),
            };
            let filed = match self.free_filings.pop() {
                Some(free) => {
                    self.filings[free as usize] = filing;
                    free
                }
                None => {
                    self.filings.push(filing);
                    index_of(self.filings.len() - 1)
                }
            };
            match head {
                Some(bucket) => self.keyed.set(bucket, filed),
                None => {
                    let (slots, filings, hasher) = (&self.slots, &self.filings, &self.hasher);
                    self.keyed.insert(hash, filed, |other| {
                        let (topic, param, value) = filing_key(slots, filings[other as usize]);
                        key_hash(hasher, topic, param, value)
                    });
                }
            }
        }
        self.len += 1;
    }

    pub fn remove(&mut self, id: &SubscriptionId) {
        let id = CompactId::of(id);
        let Some(at) = self.find(&id) else {
            return;
        };
        // Out of its key chains, or the catch-all list, while its slot still names its keys.
        let (topic, param) = {
            let slot = self.slot(at);
            (slot.topic, slot.param)
        };
        if self.slot(at).keys().is_empty() {
            self.catch_all[topic as usize].retain(|&s| s != at);
        }
        for value in 0..self.slot(at).keys().len() {
            let key_text: Box<str> = self.slot(at).keys()[value].clone();
            // A slot filed twice under one value (`owner=a,a`) left that chain already.
            let Some(bucket) = self.chain(topic, param, &key_text) else {
                continue;
            };
            let mut previous = END;
            let mut filing = self.keyed.get(bucket);
            while filing != END {
                let Filing { slot: of, next, .. } = self.filings[filing as usize];
                if of == at {
                    if previous != END {
                        self.filings[previous as usize].next = next;
                    } else if next != END {
                        self.keyed.set(bucket, next);
                    } else {
                        let (slots, filings, hasher) = (&self.slots, &self.filings, &self.hasher);
                        self.keyed.remove(bucket, |other| {
                            let (topic, param, value) = filing_key(slots, filings[other as usize]);
                            key_hash(hasher, topic, param, value)
                        });
                    }
                    self.free_filings.push(filing);
                } else {
                    previous = filing;
                }
                filing = next;
            }
        }
        // Out of the id table.
        let id_hash = self.id_hash(&id);
        if let Some(bucket) = self.by_id.find(id_hash, |other| other == at) {
            let (slots, hasher) = (&self.slots, &self.hasher);
            self.by_id
                .remove(bucket, |other| hasher.hash_one(&slot_in(slots, other).id));
        }
        let slot = self.slots[at as usize]
            .take()
            .expect("found slots are in use");
        self.per_topic[topic as usize] -= 1;
        self.readers.release(slot.reader, &self.hasher);
        self.free_slots.push(at);
        self.len -= 1;
    }

    /// The subscriptions this change must be told to: the topic fires, every filter holds
    /// and the subscription's author may read the Task. Filters and the read rule look at the
    /// Task as it is after the change, or as it was before a delete.
    pub fn match_change(
        &self,
        topics: &[Topic],
        change: &Change<'_>,
        base_url: &str,
    ) -> Vec<SubscriptionId> {
        let subject = match change.interaction {
            Interaction::Delete => change.previous.as_ref(),
            _ => change.current.as_ref(),
        };
        let Some(subject) = subject else {
            return Vec::new();
        };
        let mut matched = Vec::new();
        let mut seen: HashSet<u32> = HashSet::new();
        for (position, count) in self.per_topic.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            let Some(topic) = topics.get(position) else {
                continue;
            };
            if !topic.fires(
                change.interaction,
                state(&change.previous),
                state(&change.current),
            ) {
                continue;
            }
            let position = index_of(position);
            let mut consider = |at: u32| {
                let slot = self.slot(at);
                if change.seq <= slot.created_after_seq || !seen.insert(at) {
                    return;
                }
                if matches(subject.index, slot.filters())
                    && self
                        .readers
                        .get(slot.reader)
                        .may_read_task(subject.resource, base_url)
                    && let Some(id) = slot.id.to_id()
                {
                    matched.push(id);
                }
            };
            for token in &subject.index.tokens {
                let Some(param) = KEY_PREFERENCE.iter().position(|p| *p == token.param) else {
                    continue;
                };
                let Some(bucket) = self.chain(position, param as u8, token.value.as_str()) else {
                    continue;
                };
                // A chain holds the filings of exactly this (topic, parameter, value).
                let mut filing = self.keyed.get(bucket);
                while filing != END {
                    let Filing { slot: at, next, .. } = self.filings[filing as usize];
                    consider(at);
                    filing = next;
                }
            }
            for &at in &self.catch_all[position as usize] {
                consider(at);
            }
        }
        matched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{self, Role};
    use crate::fhir::search::{Handling, SearchLimits, index_task, parse_query};
    use serde_json::json;
    use std::collections::HashMap;

    const BASE: &str = "http://h/fhir";

    fn filters(query: &str) -> Vec<Predicate> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
        let limits = SearchLimits {
            default_count: 10,
            max_count: 10,
            default_total: crate::fhir::search::TotalMode::Accurate,
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
            scopes: None,
            patient: None,
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
            .map(|id| id.to_string())
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
            scopes: None,
            patient: None,
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

    /// The index against the rule it implements, checked on every subscription one by one:
    /// random subscriptions (keyed, catch-all, several keys, keys with a system, UUID and other
    /// ids, shared and own authors) inserted, replaced and removed, then random Tasks.
    #[test]
    fn the_index_matches_exactly_what_checking_every_subscription_matches() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};

        let topics: Vec<Topic> = topic::builtin_topics(BASE)
            .unwrap()
            .into_iter()
            .filter(|t| t.id == "task-changed")
            .collect();
        let queries = [
            "",
            "owner=Practitioner/1",
            "owner=Practitioner/2",
            "owner=Practitioner/1,Practitioner/2",
            "owner=Practitioner/1&status=requested",
            "status=requested",
            "status=requested,completed&owner:missing=true",
            "status:not=requested",
            "code=http://sys|a",
            "code=a",
            "code=http://other|a,b",
        ];
        let practitioner = |n: u32| Principal {
            issuer: None,
            subject: format!("practitioner:Practitioner/{n}"),
            role: Role::Practitioner,
            fhir_user: Some(format!("Practitioner/{n}")),
            performer_types: Vec::new(),
            scopes: None,
            patient: None,
        };
        let mut rng = StdRng::seed_from_u64(15);
        let mut index = SubscriptionIndex::default();
        let mut expected: HashMap<SubscriptionId, Candidate> = HashMap::new();
        for round in 0..3000 {
            let n = rng.random_range(0..200u32);
            let id = if n % 3 == 0 {
                self::id(&format!("sub-{n}"))
            } else {
                self::id(&format!("00000000-0000-4000-8000-{n:012}"))
            };
            if rng.random_bool(0.2) {
                index.remove(&id);
                expected.remove(&id);
            } else {
                let author = match rng.random_range(0..3) {
                    0 => admin(),
                    _ => practitioner(rng.random_range(1..4)),
                };
                let query = queries[rng.random_range(0..queries.len())];
                let candidate = Candidate {
                    id: id.clone(),
                    topic: 0,
                    filters: filters(query),
                    author,
                    created_after_seq: ChangeSeq::new(rng.random_range(0..10)),
                };
                index.insert(candidate.clone());
                expected.insert(id, candidate);
            }
            assert_eq!(index.len(), expected.len());
            if round % 100 != 0 {
                continue;
            }
            for _ in 0..20 {
                let owner = rng.random_range(0..4);
                let status = ["requested", "completed", "accepted"][rng.random_range(0..3)];
                let code = ["a", "b", "c"][rng.random_range(0..3)];
                let system = ["http://sys", "http://other"][rng.random_range(0..2)];
                let mut task = json!({"resourceType": "Task", "id": "t1", "status": status,
                    "intent": "order", "code": {"coding": [{"system": system, "code": code}]},
                    "meta": {"lastUpdated": "2026-01-01T00:00:00.000Z"}});
                if owner > 0 {
                    task["owner"] = json!({"reference": format!("Practitioner/{owner}")});
                }
                let seq = rng.random_range(0..12);
                let task_index = index_task(&task, BASE);
                let mut want: Vec<String> = expected
                    .values()
                    .filter(|c| {
                        seq > c.created_after_seq.get()
                            && matches(&task_index, &c.filters)
                            && auth::may_read_task(&c.author, &task, BASE)
                    })
                    .map(|c| c.id.to_string())
                    .collect();
                want.sort();
                assert_eq!(matched(&index, &topics, seq, &task), want, "{task}");
            }
        }
        // Removing everything leaves nothing behind.
        for id in expected.keys() {
            index.remove(id);
        }
        assert!(index.is_empty());
        assert!(index.by_id.is_empty() && index.keyed.is_empty() && index.readers.is_empty());
        assert!(index.catch_all.iter().all(Vec::is_empty));
    }

    #[test]
    fn subscriptions_of_one_reader_share_it_and_the_last_one_frees_it() {
        let mut index = SubscriptionIndex::default();
        let practitioner = Principal {
            issuer: Some("https://idp".into()),
            subject: "p1".into(),
            role: Role::Practitioner,
            fhir_user: Some("Practitioner/1".into()),
            performer_types: Vec::new(),
            scopes: None,
            patient: None,
        };
        // An auditor reads what an admin reads: one reader for both.
        let auditor = Principal {
            role: Role::Auditor,
            ..admin()
        };
        index.insert(candidate("a", "owner=Practitioner/1", admin(), 0));
        index.insert(candidate("b", "owner=Practitioner/2", auditor, 0));
        index.insert(candidate("c", "", practitioner.clone(), 0));
        index.insert(candidate("d", "status=requested", practitioner, 0));
        assert_eq!(index.readers.len(), 2);
        let reader = |id: &str| {
            let at = index.find(&CompactId::of(&self::id(id))).unwrap();
            index.slot(at).reader
        };
        assert_eq!(reader("a"), reader("b"));
        assert_eq!(reader("c"), reader("d"));
        assert_ne!(reader("a"), reader("c"));
        index.remove(&id("c"));
        assert_eq!(index.readers.len(), 2, "d still reads as the practitioner");
        index.remove(&id("d"));
        assert_eq!(index.readers.len(), 1);
    }

    /// What each subscription costs inline (BENCHMARKS.md, "Subscription index and start-up").
    #[test]
    fn a_slot_stays_within_72_bytes() {
        assert!(std::mem::size_of::<Option<Slot>>() <= 72);
    }

    #[test]
    fn server_ids_are_kept_as_uuids_and_others_as_text_and_both_read_back() {
        for (text, is_uuid) in [
            ("0f8c3d1e-7a2b-4c5d-9e6f-123456789abc", true),
            ("0F8C3D1E-7A2B-4C5D-9E6F-123456789ABC", false),
            ("0f8c3d1e7a2b4c5d9e6f123456789abc", false),
            ("my-subscription", false),
        ] {
            let compact = CompactId::of(&id(text));
            assert_eq!(matches!(compact, CompactId::Uuid(_)), is_uuid, "{text}");
            assert_eq!(compact.to_id().unwrap().as_str(), text);
        }
    }
}
