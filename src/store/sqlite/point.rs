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
//! cache and copies of pages read by `pread` (BENCHMARKS.md, issue 16). Their connections map
//! the database file instead (`mmap_size`), so every connection reads the operating system's
//! one cached copy of a page. The file is never truncated under them: Baton does not vacuum.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use rusqlite::{Connection, OpenFlags};

use super::{BUSY_TIMEOUT, CACHE_SIZE};
use crate::error::Result;

/// Statements each point-read connection keeps prepared: the few point reads there are.
const STATEMENT_CACHE: usize = 16;
/// Statements each search connection keeps prepared: a search's text depends on its
/// parameters, and a work list asks the same few shapes all day.
const SEARCH_STATEMENT_CACHE: usize = 128;
/// How much of the database file a search connection maps (SQLite caps it at what it was built
/// for, 2 GB, and reads the rest as usual).
const SEARCH_MMAP_SIZE: i64 = 1 << 40;

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

    /// The pool searches run on, from a blocking thread (see the module's documentation).
    pub(super) fn for_searches(path: &Path, max_idle: usize) -> PointReads {
        PointReads {
            statements: SEARCH_STATEMENT_CACHE,
            mmap_size: SEARCH_MMAP_SIZE,
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
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
        result
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
