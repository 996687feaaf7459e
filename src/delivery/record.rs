//! Delivery bookkeeping off the critical path: the results of many attempts, of many
//! subscriptions, recorded in one store write.
//!
//! An attempt hands its `DeliveryReport` to the `Recorder` and waits for it to be committed,
//! but it no longer holds a delivery slot while it waits (`run` frees the slot when the send
//! completes). The recorder's loop takes every report that gathered while the previous write
//! committed and records them together with `Store::record_deliveries` (SQLite: one writer
//! job, one savepoint, the same two cached statements per report; PostgreSQL: one `unnest`
//! statement per kind of result, one transaction). So a thousand deliveries cost one commit,
//! not a thousand.
//!
//! Order and exactly-once: the scheduler starts no new attempt for a subscription until its
//! previous attempt has ended, and an attempt ends only once its report is committed. The
//! next attempt therefore reads, from the store, a `delivered_through` that already counts
//! what was sent, on this node or (PostgreSQL, where the claim ends in the same statement)
//! any other; nothing is kept in memory that another node could not see. The wait costs the
//! subscription one commit between two sends, during which its new events gather and go out
//! together (up to `maxCount`) in the next notification: a websocket listener with a backlog
//! gets one `delivered_through` update per commit, however many events it was sent.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::store::{DeliveryReport, Store};

/// The most reports recorded in one write: a bound on one transaction's size, far above what
/// gathers in one commit at the rates the hub is built for.
pub const MAX_REPORTS_PER_WRITE: usize = 4096;

/// Gathers delivery reports and records them in batches.
pub struct Recorder {
    queue: mpsc::UnboundedSender<Recording>,
}

/// A report waiting to be recorded, and where to say that it was.
struct Recording {
    report: DeliveryReport,
    recorded: oneshot::Sender<Result<()>>,
}

impl Recorder {
    /// Starts the recording loop for this node (`holder`, whose claims the reports end). The
    /// loop ends when the recorder is dropped, after recording what was queued.
    pub fn start(store: Arc<dyn Store>, holder: String) -> Recorder {
        let (queue, received) = mpsc::unbounded_channel();
        tokio::spawn(record_loop(store, holder, received));
        Recorder { queue }
    }

    /// Records one attempt's result together with whatever else is waiting; answers once it
    /// is committed (or failed with its batch).
    pub async fn record(&self, report: DeliveryReport) -> Result<()> {
        let (recorded, answer) = oneshot::channel();
        self.queue
            .send(Recording { report, recorded })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> Error {
    Error::unavailable("delivery bookkeeping has stopped on this node", 5)
}

/// Records batches until the queue closes: each batch is whatever gathered while the previous
/// one was being written.
async fn record_loop(
    store: Arc<dyn Store>,
    holder: String,
    mut received: mpsc::UnboundedReceiver<Recording>,
) {
    let mut batch = Vec::with_capacity(64);
    while received.recv_many(&mut batch, MAX_REPORTS_PER_WRITE).await > 0 {
        let (reports, answers): (Vec<DeliveryReport>, Vec<_>) = batch
            .drain(..)
            .map(|recording| (recording.report, recording.recorded))
            .unzip();
        metrics::histogram!("baton_delivery_reports_per_write").record(reports.len() as f64);
        // A panic in the store must not end bookkeeping for the node: the batch fails like
        // any failed write, and its attempts are retried.
        let written = AssertUnwindSafe(store.record_deliveries(&holder, reports))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                Err(Error::internal(
                    "recording delivery results panicked",
                    "rolled back",
                ))
            });
        match written {
            Ok(()) => {
                for answer in answers {
                    let _ = answer.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::error_chain(&e), reports = answers.len(), "recording delivery results failed; their attempts are retried");
                for answer in answers {
                    let _ = answer.send(Err(e.for_another_request()));
                }
            }
        }
    }
}
