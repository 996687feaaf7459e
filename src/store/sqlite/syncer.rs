//! The syncer: a group of requests is made durable on a thread of its own while the writer
//! already runs the next group (a pipelined commit).
//!
//! With `store.synchronous = full`, SQLite would fsync the WAL inside every COMMIT, on the
//! writer thread, and every request queued behind the group would wait for that fsync too:
//! with one writer, a commit's fsync was most of a single create's wait. Instead the writer
//! commits a group of requests with SQLite's `synchronous = NORMAL` (the frames written to the
//! WAL, not synced) and hands the group's answers here. This thread syncs the WAL file (one
//! `fdatasync` for every group handed over meanwhile) and only then answers them and wakes
//! the outbox. The writer meanwhile runs the next group, whose frames follow in the WAL.
//!
//! Why every guarantee holds (ARCHITECTURE.md, "Durability"):
//! - **An acknowledged write survives power loss.** The WAL is append-only until a
//!   checkpoint has copied every frame into the database file and synced it; a sync begun
//!   after a group's COMMIT returned covers the group's frames and every frame before them.
//! - **Nothing leaves the node about a change that could still be lost.** A request's answer
//!   waits for the sync, and so does the outbox's wake-up. The hub's own groups (match chunks,
//!   delivery results) are synced here too, and the deliveries, which read what they send
//!   straight from the database, wait before each send until every group committed before it
//!   is synced (`Horizon`, `Store::until_durable`): what a notification carries was durable
//!   when it was read.
//! - **What another client may read before the sync** is a committed change whose writer has
//!   not been answered yet; a power loss in that window loses it together with every later
//!   commit, as the same loss with SQLite's own fsync would have lost it before its answer.
//!   A `kill -9` of the process loses nothing: the frames are in the operating system's cache.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{Notify, mpsc as queue, oneshot, watch};

use super::writer::{Done, Job, Work};
use crate::error::{Error, Result};

/// A committed group, waiting for its WAL frames to be synced before its answers.
pub(super) struct Committed {
    pub(super) replies: Vec<oneshot::Sender<Result<Done>>>,
    pub(super) outcomes: Vec<Result<Done>>,
    /// Whether the group wrote change events (the outbox is woken once they are durable).
    pub(super) wrote: bool,
    /// Its number from `Horizon::committing`: once synced, the horizon reaches it.
    pub(super) number: u64,
}

/// How far the committed groups are known durable, for readers that must not pass on what a
/// power cut could still take: the deliveries (`Store::until_durable`). The writer numbers
/// each group just before its COMMIT, so whatever a reader has seen was committed by a group
/// numbered at most `committing` as read after it; the syncer moves `synced` to a group's
/// number once a sync begun after that group's COMMIT has returned.
pub(crate) struct Horizon {
    committing: AtomicU64,
    synced: watch::Sender<u64>,
}

impl Default for Horizon {
    fn default() -> Horizon {
        Horizon {
            committing: AtomicU64::new(0),
            synced: watch::Sender::new(0),
        }
    }
}

impl Horizon {
    /// Numbers the group about to commit.
    pub(super) fn committing(&self) -> u64 {
        self.committing.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Every group numbered up to `number` is durable.
    fn synced_through(&self, number: u64) {
        self.synced.send_if_modified(|synced| {
            let moved = number > *synced;
            *synced = (*synced).max(number);
            moved
        });
    }

    /// Waits until every group committed before this call is durable: what the caller read
    /// before it may then leave the node.
    pub(crate) async fn reached(&self) {
        let target = self.committing.load(Ordering::SeqCst);
        if *self.synced.borrow() >= target {
            return;
        }
        // The sender lives as long as `self`: the wait ends only by reaching the target (or
        // with the caller's task, at shutdown).
        let _ = self.synced.subscribe().wait_for(|s| *s >= target).await;
    }
}

/// The syncer thread; dropping it answers every group handed over and waits for the thread.
pub(super) struct Syncer {
    groups: Option<mpsc::Sender<Committed>>,
    thread: Option<JoinHandle<()>>,
    pending: Arc<Pending>,
    horizon: Arc<Horizon>,
}

/// How many groups were handed over and are not answered yet, and whether the writer waits
/// to hear when none is.
#[derive(Default)]
struct Counts {
    groups: usize,
    writer_waits: bool,
}

struct Pending {
    counts: Mutex<Counts>,
    /// The writer's queue, where `Work::Wake` tells a waiting writer that none is pending.
    writer: Option<queue::WeakSender<Job>>,
}

impl Pending {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, groups: usize) {
        self.counts().groups += groups;
    }

    fn answered(&self, groups: usize) {
        let wake = {
            let mut counts = self.counts();
            counts.groups = counts.groups.saturating_sub(groups);
            counts.groups == 0 && std::mem::take(&mut counts.writer_waits)
        };
        if let Some(writer) = self
            .writer
            .as_ref()
            .filter(|_| wake)
            .and_then(|w| w.upgrade())
        {
            // A full queue wakes the writer anyway.
            let (reply, _) = oneshot::channel();
            let _ = writer.try_send(Job {
                work: Work::Wake,
                reply,
                trace: None,
                audit: None,
            });
        }
    }
}

impl Syncer {
    /// Starts the thread that syncs the WAL of the database at `database` (`<database>-wal`).
    /// `writer` is the writer's queue, for `synced_or_wake_me`.
    pub(super) fn start(
        database: &Path,
        committed: Arc<Notify>,
        writer: queue::WeakSender<Job>,
    ) -> Result<Syncer> {
        let mut wal = database.as_os_str().to_owned();
        wal.push("-wal");
        Syncer::with(wal_sync(PathBuf::from(wal)), committed, Some(writer))
    }

    /// Starts the thread with `sync` as the way to make the handed-over groups durable.
    fn with(
        sync: impl FnMut() -> io::Result<()> + Send + 'static,
        committed: Arc<Notify>,
        writer: Option<queue::WeakSender<Job>>,
    ) -> Result<Syncer> {
        let (groups, handed) = mpsc::channel();
        let pending = Arc::new(Pending {
            counts: Mutex::new(Counts::default()),
            writer,
        });
        let answered = pending.clone();
        let horizon = Arc::new(Horizon::default());
        let reached = horizon.clone();
        let thread = std::thread::Builder::new()
            .name("baton-sqlite-sync".into())
            .spawn(move || run(&handed, sync, &committed, &answered, &reached))
            .map_err(|e| Error::internal("starting the SQLite syncer thread failed", e))?;
        Ok(Syncer {
            groups: Some(groups),
            thread: Some(thread),
            pending,
            horizon,
        })
    }

    /// How far the groups handed over are durable.
    pub(super) fn horizon(&self) -> &Arc<Horizon> {
        &self.horizon
    }

    /// Hands over a committed group: it is answered once its frames are synced.
    pub(super) fn hand_over(&self, group: Committed) {
        self.pending.add(1);
        let undelivered = match &self.groups {
            Some(groups) => groups.send(group).err().map(|e| e.0),
            None => Some(group),
        };
        // The thread is gone only if it panicked: the answers say so rather than never come.
        if let Some(group) = undelivered {
            self.pending.answered(1);
            for reply in group.replies {
                let _ = reply.send(Err(Error::internal(
                    "the write was committed but not made durable",
                    "the SQLite syncer thread has ended",
                )));
            }
        }
    }
}

impl Syncer {
    /// Whether every group handed over is answered; if not, the syncer sends the writer's
    /// queue a `Work::Wake` once they are. The writer then sleeps on its queue, and wakes for
    /// a new request or for that.
    pub(super) fn synced_or_wake_me(&self) -> bool {
        let mut counts = self.pending.counts();
        if counts.groups == 0 {
            return true;
        }
        counts.writer_waits = true;
        false
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has answered what was handed over.
        self.groups.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Syncs the WAL file at `wal`, opened at the first sync (the writer's first commit created
/// it). The first sync also syncs the directory, so that the file's entry survives too, as
/// SQLite's own first sync of a new WAL would have.
fn wal_sync(wal: PathBuf) -> impl FnMut() -> io::Result<()> {
    let mut file: Option<File> = None;
    move || {
        if file.is_none() {
            let opened = File::open(&wal)?;
            if let Some(dir) = wal.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
            file = Some(opened);
        }
        match &file {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }
}

/// The thread: every group waiting is synced at once, then answered, in the order committed.
fn run(
    handed: &mpsc::Receiver<Committed>,
    mut sync: impl FnMut() -> io::Result<()>,
    committed: &Notify,
    pending: &Pending,
    horizon: &Horizon,
) {
    while let Ok(first) = handed.recv() {
        let mut groups = vec![first];
        groups.extend(handed.try_iter());
        let handed_now = groups.len();
        let started = std::time::Instant::now();
        let synced = sync();
        metrics::histogram!("baton_store_wal_sync_seconds").record(started.elapsed().as_secs_f64());
        match &synced {
            // Handed over in the order numbered: the last is the highest.
            Ok(()) => horizon.synced_through(groups.iter().map(|g| g.number).max().unwrap_or(0)),
            // The horizon stays: deliveries wait for a sync that succeeds.
            Err(e) => {
                tracing::error!(error = %e, groups = groups.len(), "syncing the WAL failed; the writes of these groups are committed but may not survive a power loss");
            }
        }
        let mut wrote = false;
        for group in groups {
            wrote |= group.wrote;
            match &synced {
                Ok(()) => {
                    for (reply, outcome) in group.replies.into_iter().zip(group.outcomes) {
                        let _ = reply.send(outcome);
                    }
                }
                Err(e) => {
                    for reply in group.replies {
                        let _ = reply.send(Err(Error::internal(
                            "the write was committed but not made durable",
                            e.to_string(),
                        )));
                    }
                }
            }
        }
        pending.answered(handed_now);
        // The changes are committed either way: the outbox matches what is in the database.
        if wrote {
            committed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A sync that says when it starts and waits to be let go, counting its calls.
    struct Gate {
        started: mpsc::Receiver<()>,
        release: mpsc::Sender<io::Result<()>>,
        syncs: Arc<AtomicUsize>,
    }

    fn gated() -> (Gate, impl FnMut() -> io::Result<()> + Send + 'static) {
        let (started_tx, started) = mpsc::channel();
        let (release, released) = mpsc::channel::<io::Result<()>>();
        let syncs = Arc::new(AtomicUsize::new(0));
        let counted = syncs.clone();
        let sync = move || {
            counted.fetch_add(1, Ordering::SeqCst);
            let _ = started_tx.send(());
            released.recv().unwrap_or(Ok(()))
        };
        (
            Gate {
                started,
                release,
                syncs,
            },
            sync,
        )
    }

    /// A group as the writer hands it over, numbered on `syncer`'s horizon.
    fn group(syncer: &Syncer, wrote: bool) -> (Committed, oneshot::Receiver<Result<Done>>) {
        let (reply, answer) = oneshot::channel();
        let group = Committed {
            replies: vec![reply],
            outcomes: vec![Ok(Done::Count(7))],
            wrote,
            number: syncer.horizon().committing(),
        };
        (group, answer)
    }

    /// A syncer on a gated sync, with one group (that wrote change events) handed over and
    /// its sync started: the gate holds it there.
    fn syncing_one(
        committed: Arc<Notify>,
        writer: Option<queue::WeakSender<Job>>,
    ) -> (Gate, Syncer, oneshot::Receiver<Result<Done>>) {
        let (gate, sync) = gated();
        let syncer = Syncer::with(sync, committed, writer).unwrap();
        let (first, answer) = group(&syncer, true);
        syncer.hand_over(first);
        gate.started.recv().unwrap();
        (gate, syncer, answer)
    }

    /// Whether `Horizon::reached` returns within a moment.
    async fn reached_now(horizon: &Horizon) -> bool {
        tokio::time::timeout(std::time::Duration::from_millis(50), horizon.reached())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn the_horizon_is_reached_only_once_every_group_committed_before_is_synced() {
        let (gate, syncer, answer) = syncing_one(Arc::new(Notify::new()), None);
        let horizon = syncer.horizon().clone();
        assert!(
            !reached_now(&horizon).await,
            "reached while the group's sync was still running"
        );
        // A group numbered during that sync is not covered by it.
        let (second, second_answer) = group(&syncer, false);
        gate.release.send(Ok(())).unwrap();
        assert!(answer.await.unwrap().is_ok());
        assert!(
            !reached_now(&horizon).await,
            "reached before a group committed later was synced"
        );
        syncer.hand_over(second);
        gate.started.recv().unwrap();
        gate.release.send(Ok(())).unwrap();
        assert!(second_answer.await.unwrap().is_ok());
        assert!(reached_now(&horizon).await, "not reached after both syncs");
        drop(syncer);
    }

    #[tokio::test]
    async fn a_failed_sync_leaves_the_horizon_until_a_sync_succeeds() {
        let (gate, syncer, answer) = syncing_one(Arc::new(Notify::new()), None);
        let horizon = syncer.horizon().clone();
        gate.release
            .send(Err(io::Error::other("disk went away")))
            .unwrap();
        assert!(answer.await.unwrap().is_err());
        assert!(
            !reached_now(&horizon).await,
            "reached although its sync failed"
        );
        let (next, next_answer) = group(&syncer, false);
        syncer.hand_over(next);
        gate.started.recv().unwrap();
        gate.release.send(Ok(())).unwrap();
        assert!(next_answer.await.unwrap().is_ok());
        assert!(reached_now(&horizon).await);
        drop(syncer);
    }

    #[tokio::test]
    async fn a_group_is_answered_only_after_its_sync_returned() {
        let committed = Arc::new(Notify::new());
        let (gate, syncer, mut answer) = syncing_one(committed.clone(), None);
        assert!(
            matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "answered while its sync was still running"
        );
        gate.release.send(Ok(())).unwrap();
        assert!(matches!(answer.await.unwrap(), Ok(Done::Count(7))));
        // The outbox is woken for the group's change events once they are durable.
        committed.notified().await;
        drop(syncer);
    }

    #[tokio::test]
    async fn groups_handed_over_during_a_sync_share_the_next_one() {
        let (gate, syncer, first_answer) = syncing_one(Arc::new(Notify::new()), None);
        let answers: Vec<_> = (0..3)
            .map(|_| {
                let (next, answer) = group(&syncer, false);
                syncer.hand_over(next);
                answer
            })
            .collect();
        gate.release.send(Ok(())).unwrap();
        gate.started.recv().unwrap();
        gate.release.send(Ok(())).unwrap();
        assert!(first_answer.await.unwrap().is_ok());
        for answer in answers {
            assert!(answer.await.unwrap().is_ok());
        }
        drop(syncer);
        assert_eq!(gate.syncs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_writer_waiting_for_the_sync_is_woken_on_its_queue() {
        let (writer, mut queue) = queue::channel::<Job>(4);
        let (gate, syncer, answer) = syncing_one(Arc::new(Notify::new()), Some(writer.downgrade()));
        assert!(!syncer.synced_or_wake_me());
        assert!(queue.try_recv().is_err(), "woken before the sync returned");
        gate.release.send(Ok(())).unwrap();
        let woken = tokio::time::timeout(std::time::Duration::from_secs(30), queue.recv())
            .await
            .expect("no wake-up came")
            .expect("the queue is open");
        assert!(matches!(woken.work, Work::Wake));
        assert!(answer.await.unwrap().is_ok());
        // Nothing pending any more: the writer may commit without waiting.
        assert!(syncer.synced_or_wake_me());
        drop(syncer);
    }

    #[tokio::test]
    async fn a_failed_sync_answers_its_groups_with_an_error() {
        let (gate, syncer, answer) = syncing_one(Arc::new(Notify::new()), None);
        gate.release
            .send(Err(io::Error::other("disk went away")))
            .unwrap();
        let error = answer.await.unwrap().err().expect("an error");
        assert!(
            error.as_client().is_none(),
            "a server fault, not the client's"
        );
        assert!(
            crate::error::error_chain(&error).contains("disk went away"),
            "{}",
            crate::error::error_chain(&error)
        );
        drop(syncer);
    }

    #[test]
    fn the_wal_file_is_synced_where_the_database_is() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("baton.db");
        let mut sync = wal_sync(dir.path().join("baton.db-wal"));
        // No WAL yet: the sync says so instead of syncing something else.
        assert_eq!(sync().unwrap_err().kind(), io::ErrorKind::NotFound);
        let conn = rusqlite::Connection::open(&database).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; CREATE TABLE t (x);
             INSERT INTO t VALUES (1);",
        )
        .unwrap();
        sync().unwrap();
        sync().unwrap();
    }
}
