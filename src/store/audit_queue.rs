//! AuditEvents that commit with nothing else — reads, searches, refusals, Subscription
//! changes — queued and written in batches off the request path. A Task write's AuditEvent is
//! not one of them: it commits in the write's own transaction; nor is a delivery attempt's,
//! which commits with the attempt's result (`delivery::record`), unless that write failed.
//!
//! A request hands its record to the queue and answers at once; the queue's loop writes what
//! gathered over a window (`audit.batch_window_ms`, or until `MAX_BATCH` records) as one store write
//! (`record_audits`), so a thousand audited searches cost a few commits, not a thousand
//! waits. Before answering an AuditEvent search, the API flushes the queue (a flush is
//! written at once), so a node's own trail is read back whole. What a crash can lose is the
//! records of the last window not yet committed, never a Task change's. A full queue (the database far behind) drops records, counted in
//! `baton_audit_dropped_total`, rather than slowing every request down.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Store;
use crate::audit::AuditRecord;

/// Records waiting beyond this many are dropped (and counted).
const CAPACITY: usize = 65_536;
/// The most records written in one store write. A batch is one job of the SQLite writer's
/// background lane, and a Task write that arrives while it runs waits for it: at a few µs a
/// row, 256 rows keep that wait near a millisecond, where 2 000 held Task writes for ten or
/// more under a hub's load of delivery attempts (BENCHMARKS.md, "The audit trail's cost").
const MAX_BATCH: usize = 256;

/// The sending side of the node's audit queue; cheap to clone.
#[derive(Clone)]
pub struct AuditQueue {
    sender: Option<mpsc::Sender<Queued>>,
}

enum Queued {
    Record(Box<AuditRecord>),
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

impl AuditQueue {
    /// Starts the queue's writer, which gathers records for `window` after the first of a
    /// batch (`audit.batch_window_ms`); it ends when every sender is gone, after writing what
    /// is queued.
    pub fn start(store: Arc<dyn Store>, window: Duration) -> AuditQueue {
        let (sender, receiver) = mpsc::channel(CAPACITY);
        tokio::spawn(write_loop(store, receiver, window));
        AuditQueue {
            sender: Some(sender),
        }
    }

    /// A queue that writes nothing (unit tests of parts that hold one).
    pub fn disconnected() -> AuditQueue {
        AuditQueue { sender: None }
    }

    /// Queues a record without waiting.
    pub fn record(&self, record: AuditRecord) {
        let Some(sender) = &self.sender else {
            return;
        };
        if sender.try_send(Queued::Record(Box::new(record))).is_err() {
            metrics::counter!("baton_audit_dropped_total").increment(1);
        }
    }

    /// Waits until every record queued before this call is written (or failed).
    pub async fn flush(&self) {
        let Some(sender) = &self.sender else {
            return;
        };
        let (done, written) = oneshot::channel();
        if sender.send(Queued::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

async fn write_loop(store: Arc<dyn Store>, mut receiver: mpsc::Receiver<Queued>, window: Duration) {
    while let Some(first) = receiver.recv().await {
        let mut gathered = Gathered::default();
        gathered.take(first);
        // Gather for the window before writing, unless someone waits for the write: every
        // commit rewrites the trail's newest pages into the WAL, and makes each SQLite search
        // connection unmap the database file and fault its pages in again at its next
        // search (BENCHMARKS.md, "The audit trail's cost"), so fewer, fuller batches cost
        // far less than one per few records.
        let deadline = tokio::time::Instant::now() + window;
        while gathered.flushes.is_empty() && gathered.batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(queued)) => gathered.take(queued),
                Ok(None) | Err(_) => break,
            }
        }
        while gathered.batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(queued) => gathered.take(queued),
                Err(_) => break,
            }
        }
        let Gathered { batch, flushes } = gathered;
        if !batch.is_empty() {
            let count = batch.len();
            if let Err(e) = store.record_audits(batch).await {
                metrics::counter!("baton_audit_dropped_total").increment(count as u64);
                tracing::warn!(records = count, error = %crate::error::error_chain(&e), "writing AuditEvents failed; they are lost");
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// What the loop gathered for one write.
#[derive(Default)]
struct Gathered {
    batch: Vec<AuditRecord>,
    /// Answered once the batch is written.
    flushes: Vec<oneshot::Sender<()>>,
}

impl Gathered {
    fn take(&mut self, queued: Queued) {
        match queued {
            Queued::Record(record) => self.batch.push(*record),
            Queued::Flush(done) => self.flushes.push(done),
        }
    }
}
