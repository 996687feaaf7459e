//! AuditEvents that commit with nothing else — reads, searches, refusals, Subscription
//! changes, delivery attempts — queued and written in batches off the request path. A Task
//! write's AuditEvent is not one of them: it commits in the write's own transaction.
//!
//! A request hands its record to the queue and answers at once; the queue's loop writes
//! whatever gathered while the previous batch committed, as one store write (`record_audits`),
//! so a thousand audited searches cost one commit, not a thousand waits. Before answering an
//! AuditEvent search, the API flushes the queue, so a node's own trail is read back whole.
//! What a crash can lose is the records of the last batch not yet committed, never a Task
//! change's. A full queue (the database far behind) drops records, counted in
//! `baton_audit_dropped_total`, rather than slowing every request down.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::Store;
use crate::audit::AuditRecord;

/// Records waiting beyond this many are dropped (and counted).
const CAPACITY: usize = 65_536;
/// The most records written in one store write.
const MAX_BATCH: usize = 2_000;

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
    /// Starts the queue's writer; it ends when every sender is gone, after writing what is
    /// queued.
    pub fn start(store: Arc<dyn Store>) -> AuditQueue {
        let (sender, receiver) = mpsc::channel(CAPACITY);
        tokio::spawn(write_loop(store, receiver));
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

async fn write_loop(store: Arc<dyn Store>, mut receiver: mpsc::Receiver<Queued>) {
    while let Some(first) = receiver.recv().await {
        let mut batch = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(queued) = next.take() {
            match queued {
                Queued::Record(record) => batch.push(*record),
                Queued::Flush(done) => flushes.push(done),
            }
            if batch.len() < MAX_BATCH {
                next = receiver.try_recv().ok();
            }
        }
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
