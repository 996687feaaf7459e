//! The scheduler's async loop. It owns the clock and the running attempts and decides
//! nothing: it waits for whatever comes first — a command from the hub's inbox, an attempt
//! whose send is done (its slot is free while its result is recorded), a finished attempt,
//! the scheduler's next wake, the scan for work no node holds — tells the `Scheduler`, and
//! starts the attempts it says are due.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Deliverer;
use super::attempt::{HUB_FAILURE_RETRY, Slot, attempt};
use super::scheduler::{Attempt, Outcome, Scheduler};
use crate::error::Result;
use crate::fhir::ids::{StoredInstant, SubscriptionId};
use crate::hub::Command;

/// How long in-flight attempts may take to finish at shutdown; anything unfinished is still
/// owed in the store and resumes at the next start.
const DRAIN: Duration = Duration::from_secs(5);

/// The scheduler's clock. Tokio's, so that tests with a paused runtime clock see it paused.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// A scheduler holding the work left in the store: handshakes owed, undelivered events,
/// retry times and heartbeats.
pub async fn load(deliverer: &Deliverer) -> Result<Scheduler> {
    let now_wall = time::OffsetDateTime::now_utc();
    let now = now();
    let mut scheduler = Scheduler::new(deliverer.config.max_concurrent);
    // The hub knows the heartbeats of the subscriptions in force; the store knows which of
    // them are owed something.
    let heartbeats = deliverer.hub.heartbeats();
    for (id, period) in &heartbeats {
        scheduler.set_heartbeat(id, Some(Duration::from_secs((*period).into())), now);
    }
    let pending = deliverer.store.pending_deliveries().await?;
    for sub in &pending {
        // Honour a retry time recorded before the restart.
        let wait = sub
            .next_attempt_at
            .as_ref()
            .and_then(StoredInstant::datetime)
            .map(|at| (at - now_wall).max(time::Duration::ZERO))
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or_default();
        scheduler.resume(&sub.id, now + wait);
    }
    tracing::info!(
        heartbeats = heartbeats.len(),
        pending = pending.len(),
        "delivery scheduler started"
    );
    Ok(scheduler)
}

/// Runs the scheduler until its inbox closes or shutdown, then lets in-flight attempts finish
/// for a moment.
pub async fn run(
    deliverer: Arc<Deliverer>,
    mut scheduler: Scheduler,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    shutdown: CancellationToken,
) {
    let mut attempts: JoinSet<(SubscriptionId, Outcome)> = JoinSet::new();
    let mut scan = tokio::time::interval(deliverer.scan_every);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (found_tx, mut found) = mpsc::unbounded_channel::<Vec<SubscriptionId>>();
    let mut scanning = false;
    let (released_tx, mut released) = mpsc::unbounded_channel::<SubscriptionId>();
    loop {
        for (id, kind) in scheduler.due(now()) {
            let slot = Slot::new(id.clone(), released_tx.clone());
            start_attempt(&mut attempts, &deliverer, id, kind, slot);
        }
        let next_wake = scheduler.next_wake();
        tokio::select! {
            // In this order: an attempt's slot is released before its end is taken (its
            // message was sent first), so a release is never taken for the next attempt of
            // the same subscription; shutdown and finished attempts are never starved by a
            // flood of wake-ups (timers fire in `due` on every turn of the loop anyway).
            biased;
            () = shutdown.cancelled() => break,
            Some(id) = released.recv() => scheduler.slot_released(&id),
            Some(joined) = attempts.join_next(), if !attempts.is_empty() => {
                let Ok((id, outcome)) = joined else { continue };
                scheduler.attempt_finished(&id, outcome, now());
            }
            _ = scan.tick(), if !scanning => {
                scanning = true;
                start_scan(&deliverer, &found_tx, deliverer.scan_every);
            }
            // A node left the cluster: the subscriptions it was preferred for prefer another
            // node now, which looks for their waiting work at once rather than at its next
            // scan.
            () = deliverer.hub.nodes.departed.notified(), if !scanning => {
                scanning = true;
                start_scan(&deliverer, &found_tx, Duration::ZERO);
            }
            Some(due) = found.recv() => {
                scanning = false;
                for id in due {
                    scheduler.wake(&id);
                }
            }
            command = commands.recv() => match command {
                Some(Command::Wake(id)) => scheduler.wake(&id),
                Some(Command::Changed(id)) => {
                    deliverer.recorder.forget(&id);
                    scheduler.changed(&id);
                }
                Some(Command::Heartbeat(id, period)) => scheduler.set_heartbeat(&id, period, now()),
                Some(Command::Forget(id)) => {
                    deliverer.recorder.forget(&id);
                    scheduler.forget(&id);
                }
                None => break,
            },
            // The timers that came due are fired by `due` at the top of the loop.
            () = sleep_until(next_wake) => {}
        }
    }
    // In-flight attempts finish (their results are recorded) or are cut at the deadline;
    // anything unfinished is still owed in the store and resumes at the next start.
    let drain = async { while attempts.join_next().await.is_some() {} };
    let _ = tokio::time::timeout(DRAIN, drain).await;
}

/// Most subscriptions one scan wakes.
const SCAN_LIMIT: usize = 1000;

/// Looks for waiting work that no node holds, beside the loop (which must not wait on it),
/// and sends what this node should take to `found`:
/// - the subscriptions that prefer this node (`hub::nodes`) whose work has waited `grace`:
///   their wake-up from the matcher was lost, or never came because this node just became
///   their preferred one when another left (that scan runs with no grace). The regular scan
///   leaves work younger than one scan interval alone, as the wake-up for it may be on its way;
/// - in a cluster, any subscription whose work has waited a whole lease: the node it prefers
///   is not getting to it (overloaded, or stuck). Fresher work of other nodes is theirs;
///   taking it would only make them wait for this node's claim.
fn start_scan(
    deliverer: &Arc<Deliverer>,
    found: &mpsc::UnboundedSender<Vec<SubscriptionId>>,
    grace: Duration,
) {
    let deliverer = deliverer.clone();
    let found = found.clone();
    tokio::spawn(async move {
        let now = time::OffsetDateTime::now_utc();
        let store = &deliverer.store;
        let failed = |e: crate::error::Error| {
            tracing::warn!(error = %crate::error::error_chain(&e), "looking for unclaimed deliveries failed");
            Vec::new()
        };
        let mut due: Vec<SubscriptionId> = store
            .due_subscriptions(&StoredInstant::at(now - grace), SCAN_LIMIT)
            .await
            .unwrap_or_else(failed)
            .into_iter()
            .filter(|id| deliverer.hub.nodes.delivers_here(id))
            .collect();
        if deliverer.hub.nodes.live().len() > 1 {
            let stale_before = StoredInstant::at(now - deliverer.lease);
            due.extend(
                store
                    .due_subscriptions(&stale_before, SCAN_LIMIT)
                    .await
                    .unwrap_or_else(failed),
            );
        }
        let _ = found.send(due);
    });
}

fn start_attempt(
    attempts: &mut JoinSet<(SubscriptionId, Outcome)>,
    deliverer: &Arc<Deliverer>,
    id: SubscriptionId,
    kind: Attempt,
    slot: Slot,
) {
    let deliverer = deliverer.clone();
    attempts.spawn(async move {
        // A panic must not leave the subscription marked in flight forever: it becomes a
        // failed attempt, retried like any other.
        let guarded = std::panic::AssertUnwindSafe(attempt(&deliverer, &id, kind, slot));
        let outcome = futures::FutureExt::catch_unwind(guarded)
            .await
            .unwrap_or_else(|_| {
                tracing::error!(subscription.id = %id, "a delivery attempt panicked; retrying later");
                Outcome::RetryAt(HUB_FAILURE_RETRY)
            });
        (id, outcome)
    });
}

async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}
