//! Start-up's read of every live subscription, on SQLite: one pass over the table on a
//! read-only rusqlite connection of its own, on a blocking thread, in one read transaction.
//!
//! Read through the sqlx pool, page by page in id order, each row went to sqlx's worker
//! thread, was decoded value by value there and sent over a channel to the runtime, which woke
//! per row; walking the id index also visited the table's pages in id order, at random. Here
//! the rows are decoded where SQLite steps through them, in the table's own order (no
//! `ORDER BY`: the pages are read front to back), and handed on a page at a time. One
//! transaction is one snapshot, so each id comes once, which lets start-up file them without
//! first looking for one to replace. WAL lets the read run beside the writer.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;

use super::BUSY_TIMEOUT;
use crate::error::Result;
use crate::store::LiveSubscription;
use crate::store::hub_sql;
use crate::store::rows::LiveRow;

/// How much of the database file the read maps (`PRAGMA mmap_size`; SQLite caps it).
const MMAP_SIZE: i64 = 1 << 40;

/// Reads every subscription that is not `off` and sends them to `pages`, `page` rows at a
/// time; stops early, without error, when the receiver is gone. Blocking.
pub(super) fn read_live(
    path: &Path,
    page: usize,
    pages: &mpsc::Sender<Vec<LiveSubscription>>,
) -> Result<()> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // The file mapped rather than read a page per system call and copied: a third of this
    // thread's time went to `pread`. SQLite maps at most what it was built to (2 GB) and reads
    // the rest as usual.
    conn.pragma_update(None, "mmap_size", MMAP_SIZE)?;
    // `NOT INDEXED`: the table front to back, not through `subscription_by_status`.
    let sql = format!(
        "{} NOT INDEXED WHERE status <> 'off'",
        hub_sql::LIVE_COLUMNS
    );
    // A statement's reads are one snapshot in WAL mode; no explicit transaction is needed.
    let mut statement = conn.prepare(&sql)?;
    let mut rows = statement.query([])?;
    let mut batch = Vec::with_capacity(page);
    while let Some(row) = rows.next()? {
        batch.push(LiveRow::from_rusqlite(row)?.into_live()?);
        if batch.len() == page {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(page));
            if pages.blocking_send(full).is_err() {
                return Ok(());
            }
        }
    }
    if !batch.is_empty() {
        // A receiver gone at the end wants nothing more either.
        let _ = pages.blocking_send(batch);
    }
    Ok(())
}
