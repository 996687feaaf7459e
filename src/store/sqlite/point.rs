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
//! Only short reads by key belong here; anything that scans (searches, start-up pages) stays
//! on the sqlx pool, whose worker threads keep the runtime free while they run.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use rusqlite::{Connection, OpenFlags};

use super::{BUSY_TIMEOUT, CACHE_SIZE};
use crate::error::Result;

/// Statements each connection keeps prepared: the few point reads there are.
const STATEMENT_CACHE: usize = 16;

/// A pool of read-only connections used on the caller's thread.
pub(super) struct PointReads {
    path: PathBuf,
    /// Connections not in use. A read takes one (or opens one when none is idle) and puts
    /// it back, so there are as many as reads ever ran at once, at most `max_idle` kept.
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
}

impl PointReads {
    pub(super) fn new(path: &Path, max_idle: usize) -> PointReads {
        PointReads {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
            max_idle,
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
            None => open(&self.path)?,
        };
        let result = read(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
        result
    }
}

fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.execute_batch(&format!("PRAGMA cache_size = {CACHE_SIZE};"))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}
