//! The durable, ordered, per-subscription delivery queue.
//!
//! The queue itself is data in the store: each subscription row says which event numbers are
//! delivered, whether a handshake is owed, and when the next retry is due. This module
//! delivers from it, in stages, each in its own file:
//! - `scheduler`: which subscription to try next and when, as plain synchronous decisions
//!   (one attempt per subscription at a time, a bounded number overall, the retry and
//!   heartbeat timers in one heap);
//! - `run`: the async loop that feeds the scheduler (the hub's inbox, finished attempts, its
//!   timers, the scan) and starts the attempts it says are due;
//! - `attempt`: one attempt — claim the subscription, choose what to send, send it, record
//!   the result;
//! - `record`: the results of many attempts written together, while the attempts' slots are
//!   already free for others;
//! - `notify`: building the notification (its Bundle, message id, and the read rule applied
//!   once more to each event);
//! - `dispatch`: one implementation per channel (rest-hook, AMQP, websocket);
//! - `status` and `retry`: the pure decisions of what a result does to the subscription's
//!   status, and when a failure is tried again.
//!
//! Attempts carry only the subscription id: each loads what it needs when it runs, so a
//! subscription turned off or deleted meanwhile is simply not delivered to.
//!
//! In a cluster every node runs a scheduler, and an attempt starts by claiming the
//! subscription in the store: only one node works on a subscription at a time, which is what
//! keeps its events in order across nodes. A claim ends with the attempt, or expires when its
//! node dies; each node also scans the store for work no node holds, so what a dead node left
//! is finished by the others.

mod attempt;
mod dispatch;
mod notify;
mod record;
pub mod retry;
mod run;
mod scheduler;
mod status;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, DeliveryConfig};
use crate::hub::{Commands, Hub};
use crate::signals::Signals;
use crate::store::Store;
use crate::supervise::{self, Health};
use retry::RetryPolicy;

pub use notify::{load_versions, readable_events};

/// Everything an attempt needs.
pub struct Deliverer {
    store: Arc<dyn Store>,
    /// Websocket notifications go out through the signals, to the node holding the socket.
    signals: Arc<dyn Signals>,
    /// The hub: each subscription's settings (parsed once per version), the rest-hook and
    /// AMQP clients, the base URL and this node's name in delivery claims.
    hub: Arc<Hub>,
    config: DeliveryConfig,
    /// The retry policy `config` describes.
    retry: RetryPolicy,
    /// How long a claim outlives a node that dies, on top of the attempt's timeout.
    lease: Duration,
    /// How often to look for work that no node holds.
    scan_every: Duration,
    /// Writes the attempts' results in batches.
    recorder: record::Recorder,
    /// Whether each rest-hook and AMQP attempt leaves an AuditEvent (`audit.enabled` and
    /// `audit.delivery_attempts`).
    audit: bool,
}

impl Deliverer {
    pub fn new(
        store: Arc<dyn Store>,
        signals: Arc<dyn Signals>,
        hub: Arc<Hub>,
        config: &Config,
    ) -> Deliverer {
        Deliverer {
            recorder: record::Recorder::start(
                store.clone(),
                hub.node.clone(),
                Duration::from_millis(config.delivery.position_record_ms),
                hub.audits.clone(),
            ),
            store,
            signals,
            hub,
            config: config.delivery.clone(),
            retry: RetryPolicy::from(&config.delivery),
            lease: Duration::from_secs(config.cluster.lease_seconds),
            scan_every: Duration::from_secs(config.cluster.scan_seconds),
            audit: config.audit.enabled && config.audit.delivery_attempts,
        }
    }
}

/// Starts the scheduler under supervision, taking its commands from the hub's inbox: each
/// incarnation (the first, and any after a panic) picks up the work waiting in the store, so
/// nothing is owed to memory alone.
pub fn start(
    deliverer: Arc<Deliverer>,
    commands: Commands,
    health: Arc<Health>,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) {
    let commands = Arc::new(tokio::sync::Mutex::new(commands));
    let stop = shutdown.clone();
    supervise::restartable(tasks, health, "scheduler", shutdown, move || {
        let deliverer = deliverer.clone();
        let commands = commands.clone();
        let stop = stop.clone();
        async move {
            let mut commands = commands.lock().await;
            match run::load(&deliverer).await {
                Ok(scheduler) => run::run(deliverer, scheduler, &mut commands, stop).await,
                Err(e) => {
                    tracing::error!(error = %crate::error::error_chain(&e), "loading the delivery queue failed");
                }
            }
        }
    });
}
