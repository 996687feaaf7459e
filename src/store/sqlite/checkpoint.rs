//! The checkpointer: folds the WAL back into the database file on a thread of its own, so
//! that the writer's commits never do it.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL past 1 000 pages,
//! on the committing connection: here the writer thread, while every request of its group
//! waits for its answer. On transaction Bundles that was ~5 % of the writer's time (the
//! writer's profile in BENCHMARKS.md, issue 17). The writer now only tells this thread that it
//! committed; the thread runs a PASSIVE checkpoint (which never blocks the writer or a reader)
//! at most every `PACE`, on its own connection with the same durability. The writer keeps a
//! far higher automatic threshold (`WRITER_AUTOCHECKPOINT_PAGES`), which also restarts the
//! WAL while writes never pause: the WAL cannot grow without bound either way.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::BUSY_TIMEOUT;
use crate::config::Synchronous;
use crate::error::{Error, Result};

/// How often the checkpointer runs at most: the commits of this long are folded in at once.
const PACE: Duration = Duration::from_millis(100);

/// The writer's own automatic checkpoint (SQLite's default is 1 000 pages). It is also what
/// restarts the WAL from its start while writes never pause: SQLite restarts it only when a
/// write transaction begins with every frame folded in, which a checkpoint on another thread,
/// racing the writer's next commit, rarely leaves it. That checkpoint runs inside a COMMIT on the writer thread and ends with
/// an fsync of the database file; beside the websocket fan-out (~6 000 WAL pages a second)
/// 10 000 pages brought it every 1.3-1.5 s, and every request queued behind it waited 10-60
/// ms (BENCHMARKS.md, "a Task PUT beside the fan-out", eighth sitting). At 100 000 pages (a
/// WAL of ~400 MB at most) it comes every ~16 s of such a load, and the checkpointer has
/// folded in nearly every frame by then, so it copies little.
pub(super) const WRITER_AUTOCHECKPOINT_PAGES: u32 = 100_000;

/// The checkpointer thread; dropping it stops the thread and waits for it.
pub(super) struct Checkpointer {
    wake: Option<mpsc::SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens the checkpointer's connection to the database at `path` (migrated, in WAL mode)
    /// and starts its thread.
    pub(super) fn start(path: &Path, synchronous: Synchronous) -> Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.execute_batch(&format!("PRAGMA synchronous = {};", synchronous.pragma()))?;
        // One wake-up waiting is enough: a checkpoint folds in every commit before it.
        let (wake, woken) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("baton-sqlite-ckpt".into())
            .spawn(move || run(&conn, &woken))
            .map_err(|e| Error::internal("starting the SQLite checkpointer thread failed", e))?;
        Ok(Checkpointer {
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Says that the writer committed: a checkpoint follows within `PACE`.
    pub(super) fn committed(&self) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the checkpoint it may be running.
        self.wake.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, woken: &mpsc::Receiver<()>) {
    while woken.recv().is_ok() {
        std::thread::sleep(PACE);
        // A commit that came while this thread slept is in the WAL already: this checkpoint
        // folds it in too.
        while woken.try_recv().is_ok() {}
        if let Err(e) = checkpoint(conn) {
            tracing::warn!(error = %e, "a WAL checkpoint failed; the next commit tries again");
        }
    }
}

/// A PASSIVE checkpoint: as much of the WAL as no reader still needs, copied into the
/// database file and synced; the writer restarts the WAL from its start once all of it is.
fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}
