//! The durable, ordered, per-subscription delivery queue.
//!
//! The queue itself is data in the store: each subscription row says which event numbers are
//! delivered, whether a handshake is owed, and when the next retry is due. This module is the
//! in-memory scheduler over that data. It runs at most one attempt per subscription at a time
//! (that is what keeps events in order), at most `delivery.max_concurrent` attempts overall
//! (so one dead endpoint cannot hold up the others), and keeps timers for retries and
//! heartbeats in a single binary heap rather than a sleeping task per subscription.
//! Attempts carry only the subscription id: each loads what it needs when it runs, so a
//! subscription turned off or deleted meanwhile is simply not delivered to.
//!
//! In a cluster every node runs a scheduler, and an attempt starts by claiming the
//! subscription in the store: only one node works on a subscription at a time, which is what
//! keeps its events in order across nodes. A claim ends with the attempt, or expires when its
//! node dies; each node also scans the store for work no node holds, so what a dead node left
//! is finished by the others.

pub mod retry;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::{self, Principal};
use crate::channels::SendError;
use crate::channels::amqp::{AmqpMessage, AmqpPublisher};
use crate::channels::rest_hook::{Outgoing, RestHook};
use crate::channels::signature::parse_secret;
use crate::config::DeliveryConfig;
use crate::error::Result;
use crate::fhir::datetime::{format_instant, parse_instant};
use crate::fhir::notification::{
    ContentLevel, NotificationEvent, NotificationType, StatusSnapshot, SubscriptionStatus,
    notification_bundle,
};
use crate::fhir::subscription::{ChannelSpec, SubscriptionSpec};
use crate::hub::{Command, Commands, Hub};
use crate::signals::Signals;
use crate::store::{DeliveryReport, EventRecord, Store, StoredSubscription};
use crate::supervise::{self, Health};
use retry::{AfterFailure, RetryPolicy, after_failure};
use tokio_util::task::TaskTracker;

/// Everything an attempt needs.
pub struct Deliverer {
    pub store: Arc<dyn Store>,
    pub rest_hook: RestHook,
    /// The AMQP publisher, when `BATON_AMQP_URL` is set.
    pub amqp: Option<AmqpPublisher>,
    /// Websocket notifications go out through the signals, to the node holding the socket.
    pub signals: Arc<dyn Signals>,
    pub base_url: String,
    pub config: DeliveryConfig,
    /// The hub: each subscription's settings, parsed once per version.
    pub hub: Arc<Hub>,
    /// This node's name in delivery claims.
    pub node: String,
    /// How long a claim outlives a node that dies, on top of the attempt's timeout.
    pub lease: Duration,
    /// How often to look for work that no node holds.
    pub scan_every: Duration,
}

/// What an attempt found and did.
#[derive(Debug)]
enum Outcome {
    /// Sent; more is waiting.
    More,
    /// Sent, or nothing to send.
    Idle { sent: bool },
    /// Failed; try again at this time.
    RetryAt(Duration),
    /// Deleted, off, or not a channel this queue serves.
    Gone,
    /// Another node is working on it; look again shortly, in case it leaves work behind.
    Busy,
}

/// This node's claim on a subscription for one attempt. Recording the attempt's result ends
/// the claim in the same statement; an attempt that records nothing ends it explicitly.
struct Claim {
    ended: bool,
}

/// How soon to look again at a subscription another node was working on.
const BUSY_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Retry,
    Heartbeat,
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
            match Scheduler::load(deliverer).await {
                Ok(scheduler) => scheduler.run(&mut commands, stop).await,
                Err(e) => {
                    tracing::error!(error = %crate::error::error_chain(&e), "loading the delivery queue failed");
                }
            }
        }
    });
}

impl Scheduler {
    /// A scheduler holding the work left in the store: handshakes owed, undelivered events,
    /// retry times and heartbeats.
    async fn load(deliverer: Arc<Deliverer>) -> Result<Scheduler> {
        let live = deliverer.store.live_subscriptions().await?;
        let now_wall = time::OffsetDateTime::now_utc();
        let mut scheduler = Scheduler::new(deliverer.clone());
        for sub in &live {
            let Ok(spec) = deliverer.hub.spec_for_matching(sub) else {
                continue;
            };
            if let Some(period) = spec.heartbeat_period {
                scheduler
                    .heartbeats
                    .insert(sub.id.clone(), Duration::from_secs(period.into()));
                scheduler.arm_heartbeat(&sub.id);
            }
            let pending = sub.handshake_pending || sub.delivered_through < sub.events_since_start;
            if !pending {
                continue;
            }
            // Honour a retry time recorded before the restart.
            let wait = sub
                .next_attempt_at
                .as_deref()
                .and_then(parse_instant)
                .map(|at| (at - now_wall).max(time::Duration::ZERO))
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default();
            scheduler.schedule(&sub.id, Instant::now() + wait, TimerKind::Retry);
        }
        tracing::info!(subscriptions = live.len(), "delivery scheduler started");
        Ok(scheduler)
    }
}

struct Scheduler {
    deliverer: Arc<Deliverer>,
    timers: BinaryHeap<Reverse<(Instant, TimerKind, String)>>,
    /// The retry time currently in force per subscription (older heap entries are stale).
    retry_at: HashMap<String, Instant>,
    heartbeats: HashMap<String, Duration>,
    last_sent: HashMap<String, Instant>,
    ready: VecDeque<(String, bool)>,
    queued: HashSet<String>,
    in_flight: HashSet<String>,
    /// Woken while in flight: look again when the attempt ends.
    rerun: HashSet<String>,
    attempts: JoinSet<(String, Outcome)>,
}

impl Scheduler {
    fn new(deliverer: Arc<Deliverer>) -> Scheduler {
        Scheduler {
            deliverer,
            timers: BinaryHeap::new(),
            retry_at: HashMap::new(),
            heartbeats: HashMap::new(),
            last_sent: HashMap::new(),
            ready: VecDeque::new(),
            queued: HashSet::new(),
            in_flight: HashSet::new(),
            rerun: HashSet::new(),
            attempts: JoinSet::new(),
        }
    }

    fn schedule(&mut self, id: &str, at: Instant, kind: TimerKind) {
        if kind == TimerKind::Retry {
            self.retry_at.insert(id.to_string(), at);
        }
        self.timers.push(Reverse((at, kind, id.to_string())));
    }

    fn arm_heartbeat(&mut self, id: &str) {
        if let Some(period) = self.heartbeats.get(id).copied() {
            let since = self.last_sent.get(id).copied().unwrap_or_else(Instant::now);
            self.timers.push(Reverse((
                since + period,
                TimerKind::Heartbeat,
                id.to_string(),
            )));
        }
    }

    /// Puts a subscription in the ready queue unless it is already queued or in flight.
    fn make_ready(&mut self, id: &str, heartbeat: bool) {
        if self.in_flight.contains(id) {
            if !heartbeat {
                self.rerun.insert(id.to_string());
            }
            return;
        }
        if self.queued.insert(id.to_string()) {
            self.ready.push_back((id.to_string(), heartbeat));
        }
    }

    async fn run(
        mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut scan = tokio::time::interval(self.deliverer.scan_every);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (found_tx, mut found) = mpsc::unbounded_channel::<Vec<String>>();
        let mut scanning = false;
        loop {
            while self.attempts.len() < self.deliverer.config.max_concurrent {
                let Some((id, heartbeat)) = self.ready.pop_front() else {
                    break;
                };
                self.queued.remove(&id);
                self.in_flight.insert(id.clone());
                let deliverer = self.deliverer.clone();
                self.attempts.spawn(async move {
                    // A panic must not leave the subscription marked in flight forever: it
                    // becomes a failed attempt, retried like any other.
                    let guarded = std::panic::AssertUnwindSafe(attempt(&deliverer, &id, heartbeat));
                    let outcome = futures::FutureExt::catch_unwind(guarded).await.unwrap_or_else(|_| {
                        tracing::error!(subscription.id = %id, "a delivery attempt panicked; retrying later");
                        Outcome::RetryAt(Duration::from_secs(5))
                    });
                    (id, outcome)
                });
            }
            let next_timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Wake(id)) => {
                        // New work overrides nothing while a retry is pending: order and
                        // back-off both hold, the new events simply wait with the old ones.
                        if !self.retry_at.contains_key(&id) {
                            self.make_ready(&id, false);
                        }
                    }
                    Some(Command::Changed(id)) => {
                        self.retry_at.remove(&id);
                        self.make_ready(&id, false);
                    }
                    Some(Command::Heartbeat(id, period)) => match period {
                        Some(period) => {
                            self.heartbeats.insert(id.clone(), period);
                            self.arm_heartbeat(&id);
                        }
                        None => { self.heartbeats.remove(&id); }
                    },
                    Some(Command::Forget(id)) => {
                        self.retry_at.remove(&id);
                        self.heartbeats.remove(&id);
                        self.last_sent.remove(&id);
                        self.rerun.remove(&id);
                    }
                    None => break,
                },
                Some(joined) = self.attempts.join_next(), if !self.attempts.is_empty() => {
                    let Ok((id, outcome)) = joined else { continue };
                    self.in_flight.remove(&id);
                    let rerun = self.rerun.remove(&id);
                    match outcome {
                        Outcome::More => {
                            self.last_sent.insert(id.clone(), Instant::now());
                            self.make_ready(&id, false);
                        }
                        Outcome::Idle { sent } => {
                            if sent {
                                self.last_sent.insert(id.clone(), Instant::now());
                                self.arm_heartbeat(&id);
                            }
                            if rerun {
                                self.make_ready(&id, false);
                            }
                        }
                        Outcome::RetryAt(delay) => self.schedule(&id, Instant::now() + delay, TimerKind::Retry),
                        Outcome::Busy => {
                            metrics::counter!("baton_delivery_claims_busy_total").increment(1);
                            if !self.retry_at.contains_key(&id) {
                                self.schedule(&id, Instant::now() + BUSY_RETRY, TimerKind::Retry);
                            }
                        }
                        Outcome::Gone => {
                            self.heartbeats.remove(&id);
                            self.last_sent.remove(&id);
                        }
                    }
                }
                () = sleep_until(next_timer) => {
                    let now = Instant::now();
                    while let Some(Reverse((at, _, _))) = self.timers.peek() {
                        if *at > now { break; }
                        let Some(Reverse((at, kind, id))) = self.timers.pop() else { break };
                        match kind {
                            TimerKind::Retry => {
                                if self.retry_at.get(&id) == Some(&at) {
                                    self.retry_at.remove(&id);
                                    self.make_ready(&id, false);
                                }
                            }
                            TimerKind::Heartbeat => {
                                let Some(period) = self.heartbeats.get(&id).copied() else { continue };
                                // While a retry is pending the endpoint is failing: a heartbeat
                                // attempt would only send the waiting events early, around the
                                // back-off. The next success re-arms the heartbeat.
                                if self.retry_at.contains_key(&id) {
                                    continue;
                                }
                                let last = self.last_sent.get(&id).copied();
                                if last.is_some_and(|l| now < l + period) {
                                    continue; // Something was sent since; a newer timer exists.
                                }
                                self.last_sent.insert(id.clone(), now);
                                self.arm_heartbeat(&id);
                                self.make_ready(&id, true);
                            }
                        }
                    }
                }
                _ = scan.tick(), if !scanning => {
                    // Work that no node holds and that has waited a whole scan interval: left
                    // by a node that died, or whose wake-up never came. Fresher work belongs
                    // to the node that matched it; taking it would only make that node wait.
                    // The query runs beside the loop, which must not wait on it.
                    scanning = true;
                    let store = self.deliverer.store.clone();
                    let found_tx = found_tx.clone();
                    let grace = self.deliverer.scan_every;
                    tokio::spawn(async move {
                        let stale_before = format_instant(time::OffsetDateTime::now_utc() - grace);
                        let due = store.due_subscriptions(&stale_before, 1000).await.unwrap_or_else(|e| {
                            tracing::warn!(error = %crate::error::error_chain(&e), "looking for unclaimed deliveries failed");
                            Vec::new()
                        });
                        let _ = found_tx.send(due);
                    });
                }
                Some(due) = found.recv() => {
                    scanning = false;
                    for id in due {
                        if !self.retry_at.contains_key(&id) {
                            self.make_ready(&id, false);
                        }
                    }
                }
                () = shutdown.cancelled() => break,
            }
        }
        // In-flight attempts finish (their results are recorded) or are cut at the deadline;
        // anything unfinished is still owed in the store and resumes at the next start.
        let drain = async { while self.attempts.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One delivery attempt for one subscription.
async fn attempt(deliverer: &Deliverer, id: &str, heartbeat_due: bool) -> Outcome {
    match try_attempt(deliverer, id, heartbeat_due).await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::error!(subscription.id = %id, error = %crate::error::error_chain(&e), "delivery attempt failed inside the hub");
            Outcome::RetryAt(Duration::from_secs(5))
        }
    }
}

/// What a notification carries.
enum Payload {
    Handshake,
    Events { from: i64, to: i64 },
    Heartbeat,
}

async fn try_attempt(deliverer: &Deliverer, id: &str, heartbeat_due: bool) -> Result<Outcome> {
    let default_timeout = Duration::from_secs(deliverer.config.default_timeout_seconds);
    let node = deliverer.node.as_str();
    let Some(sub) = deliverer
        .store
        .claim_subscription(id, node, deliverer.lease + default_timeout)
        .await?
    else {
        return Ok(match deliverer.store.read_subscription(id).await? {
            Some(sub) if sub.status != SubscriptionStatus::Off => Outcome::Busy,
            _ => Outcome::Gone,
        });
    };
    let mut claim = Claim { ended: false };
    let outcome = claimed_attempt(deliverer, sub, heartbeat_due, default_timeout, &mut claim).await;
    // Not every attempt records a result (nothing to send, a hub-side error); ending the claim
    // here then means no other node ever waits for it to expire while its holder is alive.
    if !claim.ended
        && let Err(e) = deliverer.store.release_subscription(id, node).await
    {
        tracing::warn!(subscription.id = %id, error = %crate::error::error_chain(&e), "releasing a delivery claim failed; it expires by itself");
    }
    outcome
}

/// The attempt proper, on a subscription this node has claimed.
async fn claimed_attempt(
    deliverer: &Deliverer,
    sub: StoredSubscription,
    heartbeat_due: bool,
    default_timeout: Duration,
    claim: &mut Claim,
) -> Result<Outcome> {
    let id = sub.id.as_str();
    if sub.status == SubscriptionStatus::Off {
        return Ok(Outcome::Gone);
    }
    let spec = match deliverer.hub.spec_for_delivery(&sub) {
        Ok(spec) => spec,
        Err(e) => {
            let why = crate::error::error_chain(&e);
            // A channel this configuration cannot serve (plain http no longer allowed, no AMQP
            // broker): `error`, events still counted, until a configuration serves it again.
            // A topic or filter the hub no longer understands can never match: `off`.
            let stopping = match deliverer.hub.spec_for_matching(&sub) {
                Ok(_) => Stopping::Pause,
                Err(_) => Stopping::TurnOff,
            };
            tracing::warn!(subscription.id = %id, error = %why, "a stored subscription cannot be delivered with this hub's configuration");
            metrics::counter!("baton_subscriptions_undeliverable_total", "reason" => stopping.as_str()).increment(1);
            record_failure(
                deliverer,
                claim,
                &sub,
                &format!("not deliverable with this hub's configuration: {why}"),
                stopping,
                None,
            )
            .await?;
            return Ok(Outcome::Gone);
        }
    };
    let now = time::OffsetDateTime::now_utc();
    if let Some(end) = spec.end.as_deref().and_then(|e| {
        crate::fhir::datetime::parse_range(e, crate::fhir::datetime::DateKind::DateTime).ok()
    }) && end.start <= now
    {
        record_failure(
            deliverer,
            claim,
            &sub,
            "the subscription reached its end time",
            Stopping::TurnOff,
            None,
        )
        .await?;
        return Ok(Outcome::Gone);
    }
    let max_count = i64::from(spec.max_count.unwrap_or(deliverer.config.default_max_count));
    let payload = if sub.handshake_pending {
        Payload::Handshake
    } else if sub.delivered_through < sub.events_since_start {
        let from = sub.delivered_through + 1;
        Payload::Events {
            from,
            to: (from + max_count - 1).min(sub.events_since_start),
        }
    } else if heartbeat_due && !sent_within_heartbeat(&sub, &spec, now) {
        Payload::Heartbeat
    } else {
        return Ok(Outcome::Idle { sent: false });
    };

    let kind = match payload {
        Payload::Handshake => "handshake",
        Payload::Events { .. } => "event-notification",
        Payload::Heartbeat => "heartbeat",
    };
    if matches!(spec.channel, ChannelSpec::WebSocket) {
        return push_to_sockets(deliverer, &sub, &spec, payload, kind, now, claim).await;
    }
    let (body, message_id, through) = build(deliverer, &sub, &spec, &payload, now).await?;
    let timeout = spec
        .timeout
        .map_or(default_timeout, |t| Duration::from_secs(t.into()));
    if timeout > default_timeout {
        // The claim must outlast this subscription's longer timeout.
        deliverer
            .store
            .claim_subscription(id, &deliverer.node, deliverer.lease + timeout)
            .await?;
    }
    let started = std::time::Instant::now();
    let (channel, sent) = match &spec.channel {
        ChannelSpec::RestHook { endpoint, headers } => {
            let secret = spec.signing_secret.as_deref().and_then(parse_secret);
            let sent = deliverer
                .rest_hook
                .send(
                    Outgoing {
                        endpoint,
                        content_type: &spec.content_type,
                        headers,
                        body,
                        message_id: &message_id,
                        secret: secret.as_deref(),
                        timeout,
                    },
                    now.unix_timestamp(),
                )
                .await;
            ("rest-hook", sent)
        }
        ChannelSpec::Message { endpoint } => {
            let (first_event, last_event) = match payload {
                Payload::Events { from, to } => (Some(from), Some(to)),
                Payload::Handshake | Payload::Heartbeat => (None, None),
            };
            let sent = match &deliverer.amqp {
                Some(amqp) => {
                    amqp.publish(
                        endpoint,
                        AmqpMessage {
                            body: &body,
                            content_type: &spec.content_type,
                            message_id: &message_id,
                            subscription_id: &sub.id,
                            notification_type: kind,
                            first_event,
                            last_event,
                            events_since_start: sub.events_since_start,
                            timestamp_secs: now.unix_timestamp().max(0) as u64,
                        },
                        timeout,
                    )
                    .await
                }
                // A stored message subscription on a hub whose configuration lost the broker.
                None => Err(SendError {
                    message: "the message (AMQP) channel is not configured on this hub".into(),
                    retry_after: None,
                }),
            };
            ("message", sent)
        }
        ChannelSpec::WebSocket => return Ok(Outcome::Gone),
    };
    metrics::histogram!("baton_delivery_seconds", "channel" => channel)
        .record(started.elapsed().as_secs_f64());
    match sent {
        Ok(()) => {
            metrics::counter!("baton_deliveries_total", "channel" => channel, "type" => kind, "result" => "ok").increment(1);
            deliverer
                .store
                .record_delivery(
                    &deliverer.node,
                    DeliveryReport::Delivered {
                        subscription_id: sub.id.clone(),
                        through,
                        handshake: matches!(payload, Payload::Handshake),
                        at: format_instant(now),
                    },
                )
                .await?;
            claim.ended = true;
            // Events that arrived during the attempt wake the scheduler again by themselves.
            let more = through < sub.events_since_start;
            Ok(if more {
                Outcome::More
            } else {
                Outcome::Idle { sent: true }
            })
        }
        Err(failure) => {
            metrics::counter!("baton_deliveries_total", "channel" => channel, "type" => kind, "result" => "failed").increment(1);
            tracing::warn!(subscription.id = %sub.id, attempt.kind = kind, error = %failure.message, "delivery failed");
            let retry = record_failure(
                deliverer,
                claim,
                &sub,
                &failure.message,
                Stopping::Retry,
                failure.retry_after,
            )
            .await?;
            Ok(retry.map_or(Outcome::Gone, Outcome::RetryAt))
        }
    }
}

/// Whether a notification went out within the heartbeat period, from this node or another:
/// a heartbeat timer on one node must not add to what another node just sent.
fn sent_within_heartbeat(
    sub: &StoredSubscription,
    spec: &SubscriptionSpec,
    now: time::OffsetDateTime,
) -> bool {
    let (Some(period), Some(last)) = (
        spec.heartbeat_period,
        sub.last_sent_at.as_deref().and_then(parse_instant),
    ) else {
        return false;
    };
    // A little slack, so timers that fire on the dot are not skipped for a few milliseconds.
    now - last < time::Duration::seconds(i64::from(period)) - time::Duration::milliseconds(500)
}

/// The exact Task versions a batch of events is about, unless the content level needs none.
pub async fn load_versions(
    store: &dyn Store,
    events: &[EventRecord],
    content: ContentLevel,
) -> Result<HashMap<(String, i64), Value>> {
    if content == ContentLevel::Empty || events.is_empty() {
        return Ok(HashMap::new());
    }
    let keys: Vec<(String, i64)> = events
        .iter()
        .map(|e| (e.task_id.clone(), e.version))
        .collect();
    Ok(store
        .versions(&keys)
        .await?
        .into_iter()
        .filter_map(|v| v.resource.map(|r| ((v.id, v.version), r)))
        .collect())
}

/// The events of a notification, with the read rule applied once more when it is sent or
/// replayed: an event whose Task version the author may not read is left out altogether
/// (its number is then missing from the Bundle, never its content disclosed). Matching
/// already applied the same rule to the same version, so this only bites if the rule or the
/// author's rights changed in between. Deletes carry no content and pass.
pub fn readable_events<'a>(
    events: &'a [EventRecord],
    versions: &'a HashMap<(String, i64), Value>,
    author: Option<&Principal>,
    base_url: &str,
) -> Vec<NotificationEvent<'a>> {
    let Some(author) = author else {
        return Vec::new();
    };
    events
        .iter()
        .filter_map(|e| {
            let resource = versions.get(&(e.task_id.clone(), e.version));
            if resource.is_some_and(|r| !auth::may_read_task(author, r, base_url)) {
                metrics::counter!("baton_events_withheld_total").increment(1);
                return None;
            }
            Some(NotificationEvent {
                event_number: e.event_number,
                timestamp: &e.occurred_at,
                task_id: &e.task_id,
                version: e.version,
                interaction: e.interaction,
                resource,
            })
        })
        .collect()
}

/// Live, best-effort delivery to the sockets bound to a websocket subscription. With nobody
/// listening the events are only marked as passed: a listener that comes back reads them with
/// `$events`. A socket that cannot take the notification is closed by the registry.
async fn push_to_sockets(
    deliverer: &Deliverer,
    sub: &StoredSubscription,
    spec: &SubscriptionSpec,
    payload: Payload,
    kind: &'static str,
    now: time::OffsetDateTime,
    claim: &mut Claim,
) -> Result<Outcome> {
    let through = match payload {
        Payload::Events { to, .. } => to,
        Payload::Handshake | Payload::Heartbeat => sub.delivered_through,
    };
    let mut sent = false;
    if deliverer.signals.may_have_listeners(&sub.id) {
        let (body, _, _) = build(deliverer, sub, spec, &payload, now).await?;
        let text = String::from_utf8(body).unwrap_or_default();
        let took = deliverer.signals.push_websocket(&sub.id, &text);
        // In a cluster the sockets may be on other nodes, reached through Redis.
        sent = took > 0 || deliverer.signals.redis_state() == Some("ok");
        metrics::counter!("baton_deliveries_total", "channel" => "websocket", "type" => kind, "result" => "ok")
            .increment(took as u64);
    }
    // A heartbeat that went out is recorded too: its time tells the other nodes' heartbeat
    // timers that this period is covered.
    if through > sub.delivered_through || sent {
        deliverer
            .store
            .record_delivery(
                &deliverer.node,
                DeliveryReport::Delivered {
                    subscription_id: sub.id.clone(),
                    through,
                    handshake: false,
                    at: format_instant(now),
                },
            )
            .await?;
        claim.ended = true;
    }
    Ok(if through < sub.events_since_start {
        Outcome::More
    } else {
        Outcome::Idle { sent }
    })
}

/// Records a failed attempt; returns when to retry, or None when the subscription is now off.
/// What a failure does to a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    /// An attempt failed: retry on the schedule (`error` after repeated failures, `off` past
    /// the horizon).
    Retry,
    /// The hub cannot deliver it as configured: `error` with no retry; it is tried again when
    /// it is changed, woken by new events, or the node restarts with another configuration.
    Pause,
    /// It can never be delivered again (ended, or its topic is gone): `off`.
    TurnOff,
}

impl Stopping {
    fn as_str(self) -> &'static str {
        match self {
            Stopping::Retry => "retry",
            Stopping::Pause => "configuration",
            Stopping::TurnOff => "topic",
        }
    }
}

async fn record_failure(
    deliverer: &Deliverer,
    claim: &mut Claim,
    sub: &StoredSubscription,
    error: &str,
    stopping: Stopping,
    retry_after: Option<Duration>,
) -> Result<Option<Duration>> {
    let now = time::OffsetDateTime::now_utc();
    let failing_since = sub
        .failing_since
        .as_deref()
        .and_then(parse_instant)
        .unwrap_or(now);
    let failures = sub.failures + 1;
    let policy = RetryPolicy {
        schedule: deliverer
            .config
            .retry_schedule_seconds
            .iter()
            .map(|s| Duration::from_secs(*s))
            .collect(),
        jitter_ratio: deliverer.config.jitter_ratio,
        error_after_failures: deliverer.config.error_after_failures,
        off_after: Duration::from_secs(deliverer.config.off_after_seconds),
    };
    let failing_for = Duration::try_from(now - failing_since).unwrap_or_default();
    let decision = match stopping {
        Stopping::Retry => Some(after_failure(
            &policy,
            failures as u32,
            failing_for,
            retry_after,
            rand::random::<f64>(),
        )),
        Stopping::Pause => None,
        Stopping::TurnOff => Some(AfterFailure::TurnOff),
    };
    let (status, next, retry) = match decision {
        Some(AfterFailure::RetryAt { delay, mark_error }) => {
            // A failed handshake means the endpoint is not verified: `error` at once (IG).
            let status = if mark_error || sub.handshake_pending {
                SubscriptionStatus::Error
            } else {
                sub.status
            };
            (status, Some(format_instant(now + delay)), Some(delay))
        }
        Some(AfterFailure::TurnOff) => (SubscriptionStatus::Off, None, None),
        None => (SubscriptionStatus::Error, None, None),
    };
    if status != sub.status {
        tracing::info!(subscription.id = %sub.id, from = sub.status.as_str(), to = status.as_str(), "subscription status changed");
    }
    deliverer
        .store
        .record_delivery(
            &deliverer.node,
            DeliveryReport::Failed {
                subscription_id: sub.id.clone(),
                error: error.to_string(),
                failures,
                failing_since: format_instant(failing_since),
                next_attempt_at: next,
                status,
            },
        )
        .await?;
    claim.ended = true;
    Ok(retry)
}

/// Builds the notification body; returns it with its message id and the highest event number
/// it carries (the current `delivered_through` for handshakes and heartbeats).
async fn build(
    deliverer: &Deliverer,
    sub: &StoredSubscription,
    spec: &SubscriptionSpec,
    payload: &Payload,
    now: time::OffsetDateTime,
) -> Result<(Vec<u8>, String, i64)> {
    let author: Option<Principal> = serde_json::from_value(sub.author.clone()).ok();
    let (kind, events, through, message_id) = match payload {
        Payload::Handshake => (
            NotificationType::Handshake,
            Vec::new(),
            sub.delivered_through,
            format!("{}-handshake-{}", sub.id, sub.version),
        ),
        Payload::Heartbeat => (
            NotificationType::Heartbeat,
            Vec::new(),
            sub.delivered_through,
            format!("{}-heartbeat-{}", sub.id, uuid::Uuid::new_v4()),
        ),
        Payload::Events { from, to } => {
            let records = deliverer
                .store
                .subscription_events(&sub.id, *from, *to)
                .await?;
            (
                NotificationType::EventNotification,
                records,
                *to,
                format!("{}-events-{from}-{to}", sub.id),
            )
        }
    };
    let versions = load_versions(deliverer.store.as_ref(), &events, spec.content).await?;
    let notification_events =
        readable_events(&events, &versions, author.as_ref(), &deliverer.base_url);
    let status = StatusSnapshot {
        subscription_id: &sub.id,
        topic_url: &sub.topic_url,
        status: if matches!(payload, Payload::Handshake) {
            sub.status
        } else if sub.status == SubscriptionStatus::Requested {
            SubscriptionStatus::Active
        } else {
            sub.status
        },
        events_since_start: sub.events_since_start,
        notification_type: kind,
        error: None,
    };
    let bundle = notification_bundle(
        &deliverer.base_url,
        &uuid::Uuid::new_v4().to_string(),
        &format_instant(now),
        &status,
        &notification_events,
        spec.content,
    );
    Ok((
        serde_json::to_vec(&bundle).unwrap_or_default(),
        message_id,
        through,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::fhir::interaction::Interaction;
    use serde_json::json;

    fn event(number: i64, task: &str, interaction: Interaction) -> EventRecord {
        EventRecord {
            event_number: number,
            change_seq: number,
            task_id: task.into(),
            version: 1,
            interaction,
            occurred_at: "2026-01-01T00:00:00.000Z".into(),
        }
    }

    #[test]
    fn events_the_author_may_not_read_are_left_out_at_send_time() {
        let alice = Principal {
            issuer: None,
            subject: "Practitioner/alice".into(),
            role: Role::Practitioner,
            fhir_user: Some("Practitioner/alice".into()),
            performer_types: Vec::new(),
        };
        let owned_by = |owner: &str| json!({"resourceType": "Task", "status": "requested", "intent": "order", "owner": {"reference": owner}});
        let events = vec![
            event(1, "mine", Interaction::Update),
            event(2, "theirs", Interaction::Update),
            event(3, "gone", Interaction::Delete),
        ];
        let versions = HashMap::from([
            (("mine".to_string(), 1), owned_by("Practitioner/alice")),
            (("theirs".to_string(), 1), owned_by("Practitioner/bob")),
        ]);
        let kept: Vec<i64> = readable_events(&events, &versions, Some(&alice), "http://h/fhir")
            .iter()
            .map(|e| e.event_number)
            .collect();
        assert_eq!(
            kept,
            [1, 3],
            "bob's Task is withheld; a delete carries nothing to withhold"
        );
        assert!(
            readable_events(&events, &versions, None, "http://h/fhir").is_empty(),
            "no author, nothing"
        );
    }
}
