//! Delivery bookkeeping off the critical path: the results of many attempts, of many
//! subscriptions, recorded in one store write.
//!
//! An attempt hands its `DeliveryReport` to the `Recorder`. The recorder's loop takes every
//! report that gathered while the previous write committed and records them together with
//! `Store::record_deliveries` (SQLite: one writer job, one savepoint, the same two cached
//! statements per report; PostgreSQL: one `unnest` statement per kind of result, one
//! transaction). So a thousand deliveries cost one commit, not a thousand. A confirmed
//! attempt's AuditEvent (the delivery ledger) travels with its report and is written in the
//! same write, so the ledger adds rows to those commits, never writes of its own. Within a write, a
//! subscription's successive plain deliveries (no handshake settled) are coalesced into the
//! last one: `delivered_through` only ever grows, so the last says all the others did.
//!
//! An attempt either waits for its report to commit (`record`) or runs ahead of it
//! (`record_ahead`). Reports that only run ahead are gathered for up to
//! `delivery.position_record_ms` before they are written (`gather`): a broad websocket
//! fan-out then costs the writer a few jobs a second, each one row per subscription, instead
//! of one job per commit, and a Task write meets the hub's bookkeeping in the writer that
//! much less often. A report that an attempt waits for ends the gathering at once.
//! - **Waiting** is the rule where nodes share the store (PostgreSQL: the result ends the
//!   node's claim in the same statement, and the next attempt, on any node, reads a
//!   `delivered_through` that counts what was sent) and for any result that changes more than
//!   the delivery position: a handshake settled, a status or failure count changed. The wait
//!   costs the subscription one commit between two sends, during which its new events gather
//!   and go out together (up to `maxCount`) in the next notification.
//! - **Running ahead** is allowed for a best-effort channel (the websocket: live listeners,
//!   who catch up with `$events`) where the store serves this node alone (SQLite), for a
//!   plain successful delivery of an active subscription: the recorder keeps the highest event
//!   number sent per subscription until its report commits (`sent_through`), and the next
//!   attempt starts from there instead of from the stored position. A listener with a backlog
//!   is then served at the rate of its sends, not of the writer's commits. Order holds (one
//!   attempt per subscription at a time, each starting after the last one sent); what a crash
//!   loses is only the record of sends that went out. A confirmed channel (rest-hook, AMQP)
//!   always waits, so that a crash re-sends at most the one notification whose result was
//!   being recorded (`tests/crash.rs` holds that bound).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::audit::AuditRecord;
use crate::error::{Error, Result};
use crate::fhir::ids::{EventNumber, SubscriptionId};
use crate::fhir::notification::SubscriptionStatus;
use crate::store::audit_queue::AuditQueue;
use crate::store::{DeliveryReport, HandshakeOwed, Store};

/// The most reports recorded in one write: a bound on one transaction's size, far above what
/// gathers in one commit at the rates the hub is built for.
pub const MAX_REPORTS_PER_WRITE: usize = 4096;

/// Gathers delivery reports and records them in batches.
pub struct Recorder {
    queue: mpsc::UnboundedSender<Recording>,
    /// Per subscription, the highest event number sent by an attempt that ran ahead of its
    /// report, until a report saying so has committed.
    ahead: Arc<Ahead>,
}

/// The delivery positions sent and not yet committed.
#[derive(Default)]
struct Ahead(Mutex<HashMap<SubscriptionId, EventNumber>>);

impl Ahead {
    fn note(&self, id: &SubscriptionId, through: EventNumber) {
        let mut ahead = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = ahead.entry(id.clone()).or_insert(through);
        *entry = (*entry).max(through);
    }

    fn get(&self, id: &SubscriptionId) -> Option<EventNumber> {
        let ahead = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        ahead.get(id).copied()
    }

    /// A report up to `through` committed: the stored position has caught up with what was
    /// sent, unless a later send has gone further meanwhile.
    fn committed(&self, id: &SubscriptionId, through: EventNumber) {
        let mut ahead = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Entry::Occupied(entry) = ahead.entry(id.clone())
            && *entry.get() <= through
        {
            entry.remove();
        }
    }

    fn forget(&self, id: &SubscriptionId) {
        let mut ahead = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        ahead.remove(id);
    }
}

/// A report waiting to be recorded, and where to say that it was (None when its attempt ran
/// ahead).
struct Recording {
    report: DeliveryReport,
    /// The attempt's AuditEvent, when it is audited.
    attempt: Option<AuditRecord>,
    recorded: Option<oneshot::Sender<Result<()>>>,
}

impl Recorder {
    /// Starts the recording loop for this node (`holder`, whose claims the reports end). The
    /// loop ends when the recorder is dropped, after recording what was queued.
    /// Reports that only ran ahead are gathered for up to `gather_ahead` before they are
    /// written. `audits` takes the AuditEvents of attempts whose results failed to record: the
    /// attempts happened, so the ledger keeps them even when their bookkeeping is retried.
    pub fn start(
        store: Arc<dyn Store>,
        holder: String,
        gather_ahead: Duration,
        audits: AuditQueue,
    ) -> Recorder {
        let (queue, received) = mpsc::unbounded_channel();
        let ahead = Arc::new(Ahead::default());
        tokio::spawn(record_loop(
            store,
            holder,
            received,
            ahead.clone(),
            gather_ahead,
            audits,
        ));
        Recorder { queue, ahead }
    }

    /// Records one attempt's result, and its AuditEvent if it is audited, together with
    /// whatever else is waiting; answers once it is committed (or failed with its batch).
    pub async fn record(&self, report: DeliveryReport, attempt: Option<AuditRecord>) -> Result<()> {
        let (recorded, answer) = oneshot::channel();
        self.queue
            .send(Recording {
                report,
                attempt,
                recorded: Some(recorded),
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Queues a plain successful delivery (`runs_ahead` says which may) without waiting for
    /// it to commit: the subscription's next attempt starts from `sent_through`.
    pub fn record_ahead(&self, report: DeliveryReport) -> Result<()> {
        if let DeliveryReport::Delivered {
            subscription_id,
            through,
            ..
        } = &report
        {
            self.ahead.note(subscription_id, *through);
        }
        self.queue
            .send(Recording {
                report,
                attempt: None,
                recorded: None,
            })
            .map_err(|_| stopped())
    }

    /// The highest event number sent to `id` whose record has not committed yet, if any.
    pub fn sent_through(&self, id: &SubscriptionId) -> Option<EventNumber> {
        self.ahead.get(id)
    }

    /// The subscription was replaced or deleted: what was sent ahead belonged to the old one,
    /// and the next attempt reads the stored position (at worst sending again what an
    /// uncommitted report covered).
    pub fn forget(&self, id: &SubscriptionId) {
        self.ahead.forget(id);
    }
}

/// Whether an attempt may run ahead of this report: a plain delivery of events or a
/// heartbeat that changes nothing but the delivery position and the time of the last send
/// (no handshake settled, the status as it was, no failures to clear).
pub fn runs_ahead(
    report: &DeliveryReport,
    status_before: SubscriptionStatus,
    failures_before: i64,
) -> bool {
    matches!(
        report,
        DeliveryReport::Delivered {
            handshake: HandshakeOwed::Unchanged,
            status,
            ..
        } if *status == status_before
    ) && failures_before == 0
}

fn stopped() -> Error {
    Error::unavailable("delivery bookkeeping has stopped on this node", 5)
}

/// Records batches until the queue closes: each batch is whatever gathered while the previous
/// one was being written, and, when all of it ran ahead, for up to `gather_ahead` more.
async fn record_loop(
    store: Arc<dyn Store>,
    holder: String,
    mut received: mpsc::UnboundedReceiver<Recording>,
    ahead: Arc<Ahead>,
    gather_ahead: Duration,
    audits: AuditQueue,
) {
    let mut batch = Vec::with_capacity(64);
    while received.recv_many(&mut batch, MAX_REPORTS_PER_WRITE).await > 0 {
        gather(&mut received, &mut batch, gather_ahead).await;
        let mut attempts = Vec::new();
        let (reports, answers): (Vec<DeliveryReport>, Vec<_>) = batch
            .drain(..)
            .map(|recording| {
                attempts.extend(recording.attempt);
                (recording.report, recording.recorded)
            })
            .unzip();
        let reports = coalesce(reports);
        let positions: Vec<(SubscriptionId, EventNumber)> = reports
            .iter()
            .filter_map(|report| match report {
                DeliveryReport::Delivered {
                    subscription_id,
                    through,
                    ..
                } => Some((subscription_id.clone(), *through)),
                DeliveryReport::Failed { .. } => None,
            })
            .collect();
        metrics::histogram!("baton_delivery_reports_per_write").record(reports.len() as f64);
        // A panic in the store must not end bookkeeping for the node: the batch fails like
        // any failed write, and its attempts are retried.
        let written = AssertUnwindSafe(store.record_deliveries(&holder, reports, attempts.clone()))
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
                for (id, through) in &positions {
                    ahead.committed(id, *through);
                }
                for answer in answers.into_iter().flatten() {
                    let _ = answer.send(Ok(()));
                }
            }
            Err(e) => {
                // Sends that ran ahead keep their place in `ahead` (they did go out); their
                // record waits for the subscription's next report, or is re-sent after a
                // restart.
                tracing::warn!(error = %crate::error::error_chain(&e), reports = answers.len(), "recording delivery results failed; their attempts are retried");
                for attempt in attempts {
                    audits.record(attempt);
                }
                for answer in answers.into_iter().flatten() {
                    let _ = answer.send(Err(e.for_another_request()));
                }
            }
        }
    }
}

/// While every report in `batch` ran ahead (nobody waits for its record), adds what arrives
/// for up to `window`; stops at once when a report that an attempt waits for arrives, when
/// the batch is full, or when the queue closes.
async fn gather(
    received: &mut mpsc::UnboundedReceiver<Recording>,
    batch: &mut Vec<Recording>,
    window: Duration,
) {
    let waited_for = |recordings: &[Recording]| recordings.iter().any(|r| r.recorded.is_some());
    if window.is_zero() || waited_for(batch) {
        return;
    }
    let deadline = tokio::time::Instant::now() + window;
    while batch.len() < MAX_REPORTS_PER_WRITE {
        let before = batch.len();
        let room = MAX_REPORTS_PER_WRITE - before;
        tokio::select! {
            arrived = received.recv_many(batch, room) => {
                if arrived == 0 || waited_for(&batch[before..]) {
                    return;
                }
            }
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// The same reports with each subscription's successive plain deliveries (no handshake
/// settled) folded into the last of them, which carries the highest position, the latest
/// status and time. A failure, or a delivery that settles a handshake, ends a run: what
/// comes after it is kept apart, so every row ends as the reports in order would leave it.
fn coalesce(reports: Vec<DeliveryReport>) -> Vec<DeliveryReport> {
    let mut kept: Vec<Option<DeliveryReport>> = Vec::with_capacity(reports.len());
    // Per subscription, the index in `kept` of its open run of plain deliveries.
    let mut open: HashMap<SubscriptionId, usize> = HashMap::new();
    for report in reports {
        match &report {
            DeliveryReport::Delivered {
                subscription_id,
                handshake: HandshakeOwed::Unchanged,
                ..
            } => {
                if let Some(&at) = open.get(subscription_id)
                    && let Some(DeliveryReport::Delivered {
                        through: earlier,
                        rewinds: earlier_rewinds,
                        ..
                    }) = &kept[at]
                    && Some(*earlier_rewinds) == rewinds_of(&report)
                {
                    let earlier = *earlier;
                    let mut later = report;
                    if let DeliveryReport::Delivered { through, .. } = &mut later {
                        *through = (*through).max(earlier);
                    }
                    kept[at] = Some(later);
                    continue;
                }
                open.insert(subscription_id.clone(), kept.len());
            }
            DeliveryReport::Delivered {
                subscription_id, ..
            }
            | DeliveryReport::Failed {
                subscription_id, ..
            } => {
                open.remove(subscription_id);
            }
        }
        kept.push(Some(report));
    }
    kept.into_iter().flatten().collect()
}

/// The restart count a delivery was made under; None for a failure.
fn rewinds_of(report: &DeliveryReport) -> Option<i64> {
    match report {
        DeliveryReport::Delivered { rewinds, .. } => Some(*rewinds),
        DeliveryReport::Failed { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::ids::StoredInstant;

    fn id(text: &str) -> SubscriptionId {
        SubscriptionId::parse(text).unwrap()
    }

    /// An instant `second` seconds into the minute, for telling reports apart.
    fn at(second: u8) -> StoredInstant {
        StoredInstant::parse(&format!("2026-12-06T10:00:{second:02}Z")).unwrap()
    }

    fn delivered(sub: &str, through: i64, handshake: HandshakeOwed, second: u8) -> DeliveryReport {
        DeliveryReport::Delivered {
            subscription_id: id(sub),
            through: EventNumber::new(through),
            handshake,
            status: SubscriptionStatus::Active,
            at: at(second),
            rewinds: 0,
        }
    }

    /// The same delivery made after one restart (`$resend`).
    fn restarted(mut report: DeliveryReport) -> DeliveryReport {
        if let DeliveryReport::Delivered { rewinds, .. } = &mut report {
            *rewinds += 1;
        }
        report
    }

    fn failed(sub: &str, failures: i64) -> DeliveryReport {
        DeliveryReport::Failed {
            subscription_id: id(sub),
            error: "refused".into(),
            failures,
            failing_since: at(0),
            next_attempt_at: None,
            status: SubscriptionStatus::Active,
        }
    }

    fn describe(reports: &[DeliveryReport]) -> Vec<String> {
        reports
            .iter()
            .map(|r| match r {
                DeliveryReport::Delivered {
                    subscription_id,
                    through,
                    handshake,
                    at,
                    ..
                } => format!("{subscription_id} delivered {through} {handshake:?} {at}"),
                DeliveryReport::Failed {
                    subscription_id,
                    failures,
                    ..
                } => format!("{subscription_id} failed {failures}"),
            })
            .collect()
    }

    #[test]
    fn coalescing_keeps_what_the_reports_in_order_would_leave() {
        use HandshakeOwed::{Settled, Unchanged};
        let cases: Vec<(&str, Vec<DeliveryReport>, Vec<&str>)> = vec![
            (
                "one subscription's successive deliveries become the last",
                vec![
                    delivered("a", 20, Unchanged, 1),
                    delivered("a", 40, Unchanged, 2),
                    delivered("a", 60, Unchanged, 3),
                ],
                vec!["a delivered 60 Unchanged 2026-12-06T10:00:03.000Z"],
            ),
            (
                "other subscriptions in between keep their own reports",
                vec![
                    delivered("a", 20, Unchanged, 1),
                    delivered("b", 5, Unchanged, 2),
                    delivered("a", 40, Unchanged, 3),
                ],
                vec![
                    "a delivered 40 Unchanged 2026-12-06T10:00:03.000Z",
                    "b delivered 5 Unchanged 2026-12-06T10:00:02.000Z",
                ],
            ),
            (
                "a failure ends the run: the delivery after it stays after it",
                vec![
                    delivered("a", 20, Unchanged, 1),
                    failed("a", 1),
                    delivered("a", 40, Unchanged, 3),
                ],
                vec![
                    "a delivered 20 Unchanged 2026-12-06T10:00:01.000Z",
                    "a failed 1",
                    "a delivered 40 Unchanged 2026-12-06T10:00:03.000Z",
                ],
            ),
            (
                "a settled handshake is never folded away",
                vec![
                    delivered("a", 0, Settled, 1),
                    delivered("a", 20, Unchanged, 2),
                    delivered("a", 40, Unchanged, 3),
                ],
                vec![
                    "a delivered 0 Settled 2026-12-06T10:00:01.000Z",
                    "a delivered 40 Unchanged 2026-12-06T10:00:03.000Z",
                ],
            ),
            (
                "a later report with a lower position keeps the higher one",
                vec![
                    delivered("a", 40, Unchanged, 1),
                    delivered("a", 30, Unchanged, 2),
                ],
                vec!["a delivered 40 Unchanged 2026-12-06T10:00:02.000Z"],
            ),
            (
                "a delivery after a restart ($resend) is not folded into one before it",
                vec![
                    delivered("a", 40, Unchanged, 1),
                    restarted(delivered("a", 2, Unchanged, 2)),
                ],
                vec![
                    "a delivered 40 Unchanged 2026-12-06T10:00:01.000Z",
                    "a delivered 2 Unchanged 2026-12-06T10:00:02.000Z",
                ],
            ),
        ];
        for (name, reports, expected) in cases {
            assert_eq!(describe(&coalesce(reports)), expected, "{name}");
        }
    }

    #[test]
    fn only_plain_deliveries_of_a_settled_subscription_run_ahead() {
        use SubscriptionStatus::{Active, Error as Erroring, Requested};
        let plain = delivered("a", 20, HandshakeOwed::Unchanged, 0);
        assert!(runs_ahead(&plain, Active, 0));
        assert!(!runs_ahead(&plain, Requested, 0), "the status changes");
        assert!(!runs_ahead(&plain, Erroring, 0), "the status changes");
        assert!(!runs_ahead(&plain, Active, 2), "failures are cleared");
        let handshake = delivered("a", 0, HandshakeOwed::Settled, 0);
        assert!(!runs_ahead(&handshake, Active, 0));
        assert!(!runs_ahead(&failed("a", 1), Active, 0));
    }

    /// A SQLite store at `path` with one subscription, and a recorder over it that writes
    /// every batch at once and whose audit queue writes nothing.
    async fn recorder_with_subscription(
        path: &std::path::Path,
    ) -> (Arc<dyn Store>, crate::store::StoredSubscription, Recorder) {
        let store = crate::outbox::tests::open_sqlite(path).await;
        let sub = store
            .create_subscription(crate::outbox::tests::subscription(None))
            .await
            .unwrap();
        let recorder = Recorder::start(
            store.clone(),
            "node-a".into(),
            Duration::ZERO,
            AuditQueue::disconnected(),
        );
        (store, sub, recorder)
    }

    /// With the database locked by another connection, so that nothing the recorder writes
    /// can commit: a delivery that runs ahead is queued at once and its position is known to
    /// the next attempt; once the lock goes, the record commits and the position is the
    /// stored one again.
    #[tokio::test]
    async fn a_delivery_run_ahead_is_known_before_its_record_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        let (store, sub, recorder) = recorder_with_subscription(&path).await;
        let lock = rusqlite::Connection::open(&path).unwrap();
        lock.execute_batch("BEGIN IMMEDIATE").unwrap();

        let report = DeliveryReport::Delivered {
            subscription_id: sub.id.clone(),
            through: EventNumber::new(5),
            handshake: HandshakeOwed::Unchanged,
            status: sub.status,
            at: StoredInstant::now(),
            rewinds: sub.rewinds,
        };
        recorder.record_ahead(report).unwrap();
        assert_eq!(recorder.sent_through(&sub.id), Some(EventNumber::new(5)));
        let stored = store.read_subscription(&sub.id).await.unwrap().unwrap();
        assert_eq!(
            stored.delivered_through,
            EventNumber::ZERO,
            "not committed yet"
        );

        lock.execute_batch("ROLLBACK").unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while recorder.sent_through(&sub.id).is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the record never committed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let stored = store.read_subscription(&sub.id).await.unwrap().unwrap();
        assert_eq!(stored.delivered_through, EventNumber::new(5));
    }

    /// An attempt's AuditEvent is written in the write that records its result: once
    /// `record` answers, both are in the database, though this recorder's audit queue writes
    /// nothing (a disconnected one).
    #[tokio::test]
    async fn an_attempts_audit_event_is_recorded_with_its_result() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        let (_, sub, recorder) = recorder_with_subscription(&path).await;
        let subscription = sub.id.to_string();
        let facts = crate::audit::DeliveryFacts {
            node: "node-a",
            subscription: &subscription,
            kind: "event-notification",
            events: Some((1, 3)),
            channel: "rest-hook",
            endpoint_host: Some("receiver.example"),
            duration_ms: 4,
            error: None,
        };
        let attempt = crate::audit::delivery_attempt(&facts, &StoredInstant::now());
        let report = DeliveryReport::Delivered {
            subscription_id: sub.id.clone(),
            through: EventNumber::new(3),
            handshake: HandshakeOwed::Unchanged,
            status: sub.status,
            at: StoredInstant::now(),
            rewinds: sub.rewinds,
        };
        recorder.record(report, Some(attempt)).await.unwrap();

        let db = rusqlite::Connection::open(&path).unwrap();
        let (ledger, through): (i64, i64) = db
            .query_row(
                "SELECT (SELECT count(*) FROM audit_event WHERE type_code = 'transmit' AND entity = ?),
                        (SELECT delivered_through FROM subscription WHERE id = ?)",
                [format!("Subscription/{subscription}"), subscription.clone()],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!((ledger, through), (1, 3));
    }

    fn ahead_only(sub: &str, through: i64) -> Recording {
        Recording {
            report: delivered(sub, through, HandshakeOwed::Unchanged, 0),
            attempt: None,
            recorded: None,
        }
    }

    fn waited_for(sub: &str) -> Recording {
        Recording {
            report: failed(sub, 1),
            attempt: None,
            recorded: Some(oneshot::channel().0),
        }
    }

    fn subscriptions(batch: &[Recording]) -> Vec<String> {
        batch
            .iter()
            .map(|r| match &r.report {
                DeliveryReport::Delivered {
                    subscription_id, ..
                }
                | DeliveryReport::Failed {
                    subscription_id, ..
                } => subscription_id.to_string(),
            })
            .collect()
    }

    /// Positions sent ahead wait for more to gather; a report an attempt waits for ends the
    /// gathering at once (the window here is an hour: a test that passes did not wait it).
    #[tokio::test]
    async fn positions_sent_ahead_gather_until_a_report_is_waited_for() {
        let hour = Duration::from_secs(3600);
        let guard = Duration::from_secs(60);
        let (queue, mut received) = mpsc::unbounded_channel();
        let mut batch = vec![ahead_only("a", 1)];
        let sender = tokio::spawn(async move {
            queue.send(ahead_only("b", 1)).unwrap();
            tokio::task::yield_now().await;
            queue.send(ahead_only("a", 2)).unwrap();
            tokio::task::yield_now().await;
            queue.send(waited_for("c")).unwrap();
            queue
        });
        tokio::time::timeout(guard, gather(&mut received, &mut batch, hour))
            .await
            .expect("a waited-for report ends the gathering");
        assert_eq!(subscriptions(&batch), ["a", "b", "a", "c"]);
        let queue = sender.await.unwrap();

        // A batch that holds a waited-for report is written as it is.
        let mut batch = vec![ahead_only("a", 3), waited_for("d")];
        queue.send(ahead_only("b", 2)).unwrap();
        gather(&mut received, &mut batch, hour).await;
        assert_eq!(subscriptions(&batch), ["a", "d"]);

        // No window: as before, whatever gathered while the last write committed.
        let mut batch = vec![ahead_only("b", 2)];
        gather(&mut received, &mut batch, Duration::ZERO).await;
        assert_eq!(subscriptions(&batch), ["b"]);

        // The queue closes (the node stops): what gathered is written without waiting.
        let mut batch = received.recv().await.into_iter().collect::<Vec<_>>();
        drop(queue);
        tokio::time::timeout(guard, gather(&mut received, &mut batch, hour))
            .await
            .expect("a closed queue ends the gathering");
        assert_eq!(subscriptions(&batch), ["b"]);
    }

    #[test]
    fn a_position_sent_ahead_is_kept_until_a_report_reaching_it_commits() {
        let ahead = Ahead::default();
        let a = id("a");
        ahead.note(&a, EventNumber::new(20));
        ahead.note(&a, EventNumber::new(40));
        ahead.committed(&a, EventNumber::new(20));
        assert_eq!(ahead.get(&a), Some(EventNumber::new(40)));
        ahead.committed(&a, EventNumber::new(40));
        assert_eq!(ahead.get(&a), None);
        ahead.note(&a, EventNumber::new(60));
        ahead.forget(&a);
        assert_eq!(ahead.get(&a), None);
    }
}
