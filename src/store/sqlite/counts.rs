//! Capped counts (`_total=estimate`) of large match sets, kept while the writes since cannot
//! have brought them back under the cap.
//!
//! An estimate says the exact number of matches up to `search::ESTIMATE_LIMIT` and "more"
//! above it. Deciding "more" took a walk of a thousand and one index entries at every search
//! of a large work list ("status=requested", "open tasks due before …", the unfiltered list):
//! about a third of the search threads' CPU in the work-list mix (BENCHMARKS.md, issue 16).
//! The number of matches of a search changes by at most one per Task write (a write changes
//! one Task, which enters or leaves the matches or stays as it was), and every Task write
//! commits with one change event whose `seq` is larger than any committed before (one writer,
//! `AUTOINCREMENT`). So a search counted at `n` when the last `seq` was `s` has at least
//! `n - (s' - s)` matches when the last `seq` is `s'`: while that is over the cap, "more" is
//! still the exact answer and nothing is counted.
//!
//! A count that may be kept walks past the cap (`REACH` times it), so the answer holds through
//! that many writes before the search is counted again. Counts at or under the cap are
//! never kept: they are exact numbers that any write may change, and they are cheap (their
//! walk ends at the last match).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Mutex, PoisonError};

use rusqlite::{Connection, params_from_iter};

use crate::error::Result;

/// How far past the cap a count that may be kept walks: `REACH × cap` matches, so that
/// `(REACH - 1) × cap` writes can pass before the search is counted again.
pub(super) const REACH: u64 = 2;
/// Searches whose counts are kept at most; when full, the table starts again empty.
const CAPACITY: usize = 4096;

/// A count over the cap, and the outbox position it was counted at.
struct Known {
    statement: String,
    binds: Vec<String>,
    counted: u64,
    seq: i64,
}

/// The counts over their cap of the searches run on this node.
pub(super) struct CappedCounts {
    known: Mutex<HashMap<u64, Known>>,
    hasher: RandomState,
}

impl CappedCounts {
    pub(super) fn new() -> CappedCounts {
        CappedCounts {
            known: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
        }
    }

    /// The matches of `count` (a statement that counts up to `REACH × cap` and one more,
    /// `search_sql::page_sql` with `Counting::UpTo`), as `Counting::UpTo(cap)` answers: the
    /// exact number up to `cap`, `cap + 1` for "more". Counts only when no count kept from
    /// before still proves "more".
    pub(super) fn count_up_to(
        &self,
        conn: &Connection,
        count: &str,
        binds: &[String],
        cap: u64,
    ) -> Result<u64> {
        let key = self.key(count, binds);
        // The outbox position is read only when a count is kept to compare it with: a search
        // counted at or under its cap (an owner's list, a queue) is counted at once.
        if let Some((counted, counted_at)) = self.kept(key, count, binds) {
            let seq: i64 = conn
                .prepare_cached(LAST_SEQ)?
                .query_row([], |row| row.get(0))?;
            if at_least(counted, counted_at, seq).is_some_and(|at_least| at_least > cap) {
                return Ok(cap + 1);
            }
        }
        // The count and the outbox position it holds at, in one statement: one snapshot.
        let (seq, counted): (i64, i64) = conn
            .prepare_cached(&format!("SELECT ({LAST_SEQ}), ({count})"))?
            .query_row(params_from_iter(binds), |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
        let counted = u64::try_from(counted).unwrap_or(0);
        if counted > cap {
            self.keep(key, count, binds, counted, seq);
        } else {
            // Exact now: nothing to compare the outbox position with any more.
            self.forget(key);
        }
        Ok(counted.min(cap + 1))
    }

    fn key(&self, count: &str, binds: &[String]) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        count.hash(&mut hasher);
        binds.hash(&mut hasher);
        hasher.finish()
    }

    /// The kept count of this search over its cap, and the outbox position it was counted at.
    fn kept(&self, key: u64, count: &str, binds: &[String]) -> Option<(u64, i64)> {
        let known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known
            .get(&key)
            .filter(|k| k.statement == count && k.binds == binds)
            .map(|k| (k.counted, k.seq))
    }

    fn forget(&self, key: u64) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        known.remove(&key);
    }

    fn keep(&self, key: u64, count: &str, binds: &[String], counted: u64, seq: i64) {
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        if known.len() >= CAPACITY && !known.contains_key(&key) {
            known.clear();
        }
        known.insert(
            key,
            Known {
                statement: count.to_string(),
                binds: binds.to_vec(),
                counted,
                seq,
            },
        );
    }
}

/// The fewest matches a count of `counted` at outbox position `counted_at` proves at `seq`.
fn at_least(counted: u64, counted_at: i64, seq: i64) -> Option<u64> {
    // A position before the count's cannot happen with one writer; if it ever did, the
    // count proves nothing.
    let writes = u64::try_from(seq.checked_sub(counted_at)?).ok()?;
    Some(counted.saturating_sub(writes))
}

/// The outbox position of the reading snapshot: the last change event's `seq`.
const LAST_SEQ: &str = "SELECT coalesce(max(seq), 0) FROM change_event";

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of matches beside the outbox: rows of `t` match, `change_event` rows are
    /// writes. The tests change `t` without a change event on purpose, to see whether a count
    /// ran (a write always has one).
    fn database(rows: usize) -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE t (x TEXT NOT NULL);
             CREATE TABLE change_event (seq INTEGER PRIMARY KEY AUTOINCREMENT, note TEXT);",
        )
        .unwrap();
        insert(&conn, rows, "a");
        conn
    }

    fn insert(conn: &Connection, rows: usize, x: &str) {
        for _ in 0..rows {
            conn.execute("INSERT INTO t (x) VALUES (?)", [x]).unwrap();
        }
    }

    fn write(conn: &Connection) {
        conn.execute("INSERT INTO change_event (note) VALUES ('w')", [])
            .unwrap();
    }

    /// Counts up to `REACH × 3` and one more, as `page_sql` writes it for a cap of 3.
    const COUNT: &str = "SELECT count(*) FROM (SELECT 1 FROM t WHERE x = ? LIMIT 7) AS counted";

    fn count(counts: &CappedCounts, conn: &Connection, x: &str) -> u64 {
        counts
            .count_up_to(conn, COUNT, &[x.to_string()], 3)
            .unwrap()
    }

    #[test]
    fn a_count_over_the_cap_holds_until_the_writes_since_could_undo_it() {
        let conn = database(8);
        let counts = CappedCounts::new();
        assert_eq!(
            count(&counts, &conn, "a"),
            4,
            "eight matches are more than 3"
        );
        // Every match gone without a write recorded: the count kept (7) still answers, so no
        // count ran.
        conn.execute("DELETE FROM t", []).unwrap();
        assert_eq!(count(&counts, &conn, "a"), 4);
        // Three writes could have removed three of the seven: at least four remain.
        for _ in 0..3 {
            write(&conn);
        }
        assert_eq!(count(&counts, &conn, "a"), 4);
        // A fourth could leave three, which is not "more": counted again, exactly, and the
        // kept count is gone (the next search of it does not read the outbox position).
        write(&conn);
        assert_eq!(count(&counts, &conn, "a"), 0);
        assert_eq!(
            counts.kept(
                counts.key(COUNT, &["a".to_string()]),
                COUNT,
                &["a".to_string()]
            ),
            None
        );
        // Another search's count is not this one's.
        insert(&conn, 8, "b");
        assert_eq!(count(&counts, &conn, "b"), 4);
        assert_eq!(count(&counts, &conn, "a"), 0);
    }

    #[test]
    fn a_count_under_the_cap_is_never_kept() {
        let conn = database(2);
        let counts = CappedCounts::new();
        assert_eq!(count(&counts, &conn, "a"), 2);
        let a = ["a".to_string()];
        assert_eq!(counts.kept(counts.key(COUNT, &a), COUNT, &a), None);
        insert(&conn, 1, "a");
        assert_eq!(
            count(&counts, &conn, "a"),
            3,
            "three is exact, counted again"
        );
        insert(&conn, 5, "a");
        assert_eq!(count(&counts, &conn, "a"), 4);
    }
}
