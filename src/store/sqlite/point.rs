//! Point reads on the caller's thread: the delivery path's per-attempt reads.
//!
//! Every delivery attempt reads its subscription's row and the events it is about to send,
//! thousands of times a second under a broad fan-out. sqlx's SQLite driver runs each query on
//! a worker thread of its own and hands the rows back, and for a lookup that takes
//! microseconds the two hand-offs cost more than the read (BENCHMARKS.md, issue 15: 27 % of
//! the samples in sqlx's worker threads and 15 % in the kernel's task switch). These reads
//! take a connection from a small pool and run on the calling thread instead: an indexed
//! lookup in a WAL database never waits for the writer, so the caller is held for the read
//! itself and no longer.
//!
//! Only short reads by key run on the caller's thread. Searches use a pool of their own
//! (`PointReads::for_searches`) from a blocking thread, one hand-off per search rather than
//! one per row: the sqlx pool's workers took half of a search mix's CPU, in SQLite's page
//! cache and copies of pages read by `pread` (BENCHMARKS.md, issue 16). Their connections may
//! map the database file (`store.search_mmap_mib`); by default they do not: SQLite unmaps a
//! connection's whole mapping whenever it starts reading after a commit
//! (`pagerBeginReadTransaction`), and under writes the `munmap`, its TLB flushes and the page
//! faults after it cost a search more than re-reading its pages by `pread` (BENCHMARKS.md,
//! issue 16, sixth sitting). The file is never truncated under them: Baton does not vacuum.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::{BUSY_TIMEOUT, CACHE_SIZE};
use crate::error::Result;

/// Statements each point-read connection keeps prepared: the few point reads there are.
const STATEMENT_CACHE: usize = 16;
/// Statements each search connection keeps prepared: a search's text depends on its
/// parameters, and a work list asks the same few shapes all day.
const SEARCH_STATEMENT_CACHE: usize = 128;
/// SQLite virtual-machine steps between two looks at the clock of a read with a budget
/// (`PointReads::run_within`): a few microseconds of work.
const PROGRESS_OPS: std::ffi::c_int = 1000;

/// A pool of read-only connections used on the caller's thread.
pub(super) struct PointReads {
    path: PathBuf,
    /// Connections not in use. A read takes one (or opens one when none is idle) and puts
    /// it back, so there are as many as reads ever ran at once, at most `max_idle` kept.
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
    statements: usize,
    /// `PRAGMA mmap_size` of each connection; 0 reads pages by system call.
    mmap_size: i64,
}

impl PointReads {
    pub(super) fn new(path: &Path, max_idle: usize) -> PointReads {
        PointReads {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            max_idle,
            statements: STATEMENT_CACHE,
            mmap_size: 0,
        }
    }

    /// The pool searches run on (see the module's documentation), each connection mapping
    /// `mmap_size` bytes of the database file (SQLite caps it at what it was built for, 2 GB,
    /// and reads the rest as usual; `store.search_mmap_mib`).
    pub(super) fn for_searches(path: &Path, max_idle: usize, mmap_size: i64) -> PointReads {
        PointReads {
            statements: SEARCH_STATEMENT_CACHE,
            mmap_size,
            ..PointReads::new(path, max_idle)
        }
    }

    /// Runs `read` on an idle connection (a new one if none is idle).
    pub(super) fn run<T>(&self, read: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.open()?,
        };
        let result = read(&conn);
        // A read that failed or was interrupted inside a transaction (a search page with its
        // text cache reads in one) leaves it open: ended here, or the connection dropped.
        if !conn.is_autocommit() && conn.execute_batch("ROLLBACK").is_err() {
            return result;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
        result
    }

    /// Runs `read` on an idle connection on the caller's thread, but only for `budget`:
    /// SQLite's progress handler interrupts the statement running when the budget is spent,
    /// and the answer is then `None` (nothing of it is kept; the caller runs the read again
    /// where it may take long). A search that ends within the budget, as a work list does,
    /// is answered without the hand-off to a blocking thread and back (see
    /// `SqliteStore::search`).
    pub(super) fn run_within<T>(
        &self,
        budget: Duration,
        read: impl FnOnce(&Connection) -> Result<T>,
    ) -> Result<Option<T>> {
        let spent = Arc::new(AtomicBool::new(false));
        self.run(|conn| {
            let deadline = Instant::now() + budget;
            let flag = spent.clone();
            conn.progress_handler(
                PROGRESS_OPS,
                Some(move || {
                    let over = Instant::now() >= deadline;
                    if over {
                        flag.store(true, Ordering::Relaxed);
                    }
                    over
                }),
            )?;
            let result = read(conn);
            conn.progress_handler(0, None::<fn() -> bool>)?;
            match result {
                _ if spent.load(Ordering::Relaxed) => Ok(None),
                Ok(answer) => Ok(Some(answer)),
                Err(e) => Err(e),
            }
        })
    }

    fn open(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch(&format!("PRAGMA cache_size = {CACHE_SIZE};"))?;
        if self.mmap_size > 0 {
            conn.pragma_update(None, "mmap_size", self.mmap_size)?;
        }
        conn.set_prepared_statement_cache_capacity(self.statements);
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read that outruns its budget is interrupted and answers `None`; the connection then
    /// serves reads without a budget to their end, and a short read within one answers.
    #[test]
    fn a_read_past_its_budget_is_interrupted_and_the_connection_serves_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reads.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (7);")
            .unwrap();
        let reads = PointReads::for_searches(&path, 1, 1 << 40);
        // Counting to ten million takes seconds; the budget is a millisecond.
        let long = |conn: &Connection| -> Result<i64> {
            Ok(conn.query_row(
                "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 10000000)
                 SELECT count(*) FROM c",
                [],
                |row| row.get(0),
            )?)
        };
        let started = Instant::now();
        let interrupted = reads.run_within(Duration::from_millis(1), long).unwrap();
        assert_eq!(interrupted, None);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the interrupt came late: {:?}",
            started.elapsed()
        );
        // The same (only) connection, its handler gone: a shorter walk runs to its end.
        let walked = reads
            .run(|conn| {
                Ok(conn.query_row(
                    "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 200000)
                     SELECT count(*) FROM c",
                    [],
                    |row| row.get::<_, i64>(0),
                )?)
            })
            .unwrap();
        assert_eq!(walked, 200_000);
        let short = reads
            .run_within(Duration::from_secs(5), |conn| {
                Ok(conn.query_row("SELECT x FROM t", [], |row| row.get::<_, i64>(0))?)
            })
            .unwrap();
        assert_eq!(short, Some(7));
    }
}
