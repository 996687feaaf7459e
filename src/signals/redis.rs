//! Signals between the nodes of a cluster, over Redis pub/sub, and binding tokens as Redis
//! keys with an expiry.
//!
//! Four channels under the cluster's prefix: `wake` (a node committed changes), `subscription`
//! (a subscription was written), `ws` (a websocket notification for sockets on other nodes)
//! and `deliver` (the matcher numbered events for subscriptions that prefer the node the
//! message names). Every message names the node it came from, and a node ignores its own. Publishing
//! never holds up a request: messages go through a bounded queue to one publisher task, and
//! what cannot be published while Redis is away is dropped — the store still has it, the
//! nodes poll, and websocket listeners catch up with `$events`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Signals;
use crate::channels::websocket::{BindingTokens, Grant, Registry, new_token};
use crate::error::{Error, Result};
use crate::fhir::ids::SubscriptionId;
use crate::hub::DeliveryHandle;
use crate::supervise::{self, Health};

/// How long a Redis command or connection attempt may take before the node gives up on it.
const TIMEOUT: Duration = Duration::from_secs(1);
/// After a failed connection, commands skip Redis for this long instead of waiting again.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// Messages waiting to be published; beyond this they are dropped (see the module comment).
const QUEUE: usize = 65_536;

#[derive(Serialize, Deserialize)]
struct Message {
    origin: String,
    #[serde(default)]
    subscription: Option<SubscriptionId>,
    #[serde(default)]
    text: Option<String>,
    /// `deliver`: the node asked to look at `subscriptions`.
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    subscriptions: Vec<SubscriptionId>,
}

#[derive(Serialize, Deserialize)]
struct StoredGrant {
    owner: crate::auth::Identity,
    subscriptions: Vec<SubscriptionId>,
    expires_at: i64,
}

pub struct RedisSignals {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    node: String,
    wake_channel: String,
    subscription_channel: String,
    ws_channel: String,
    deliver_channel: String,
    token_prefix: String,
    registry: Arc<Registry>,
    /// Tokens issued while Redis was away: they still work on this node.
    local_tokens: BindingTokens,
    commands: Mutex<Command>,
    outgoing: mpsc::Sender<(String, String)>,
    subscribed: AtomicBool,
    commands_ok: AtomicBool,
}

struct Command {
    connection: Option<MultiplexedConnection>,
    failed_at: Option<Instant>,
}

/// What `RedisSignals::start` needs.
pub struct RedisSetup {
    pub url: String,
    pub prefix: String,
    pub node: String,
    pub registry: Arc<Registry>,
    /// Notified by the store after each local commit that wrote changes.
    pub committed: Arc<Notify>,
    /// What the matcher waits on.
    pub matcher_wake: Arc<Notify>,
    /// Receives the ids of subscriptions written on other nodes.
    pub notices: mpsc::UnboundedSender<SubscriptionId>,
    /// This node's scheduler: woken for subscriptions that prefer this node when another
    /// node's matcher numbered events for them.
    pub delivery: DeliveryHandle,
}

impl RedisSignals {
    /// Starts the publisher and the subscriber; neither needs Redis to be up yet.
    pub fn start(
        setup: RedisSetup,
        stop: CancellationToken,
        tasks: &TaskTracker,
        health: &Arc<Health>,
    ) -> Result<RedisSignals> {
        let client = Client::open(setup.url.as_str())
            .map_err(|e| Error::internal("invalid configuration: BATON_REDIS_URL", e))?;
        let (outgoing, queued) = mpsc::channel(QUEUE);
        let prefix = setup.prefix;
        let inner = Arc::new(Inner {
            client,
            node: setup.node,
            wake_channel: format!("{prefix}:wake"),
            subscription_channel: format!("{prefix}:subscription"),
            ws_channel: format!("{prefix}:ws"),
            deliver_channel: format!("{prefix}:deliver"),
            token_prefix: format!("{prefix}:ws-token:"),
            registry: setup.registry,
            local_tokens: BindingTokens::default(),
            commands: Mutex::new(Command {
                connection: None,
                failed_at: None,
            }),
            outgoing,
            subscribed: AtomicBool::new(false),
            commands_ok: AtomicBool::new(true),
        });
        // Both reconnect by themselves; a panic would lose their queues, so it stops the node.
        supervise::vital(
            tasks,
            health.clone(),
            "redis-publisher",
            stop.clone(),
            publish(
                inner.clone(),
                setup.committed,
                setup.matcher_wake.clone(),
                queued,
                stop.clone(),
            ),
        );
        supervise::vital(
            tasks,
            health.clone(),
            "redis-listener",
            stop.clone(),
            listen(
                inner.clone(),
                setup.matcher_wake,
                setup.notices,
                setup.delivery,
                stop,
            ),
        );
        Ok(RedisSignals { inner })
    }
}

impl Inner {
    fn message(&self, subscription: Option<&SubscriptionId>, text: Option<&str>) -> String {
        serde_json::to_string(&Message {
            origin: self.node.clone(),
            subscription: subscription.cloned(),
            text: text.map(str::to_string),
            target: None,
            subscriptions: Vec::new(),
        })
        .unwrap_or_default()
    }

    /// The shared command connection, connecting if needed (but not again right after a
    /// failure, so a Redis outage does not slow every request by the connect timeout).
    async fn connection(&self) -> Option<MultiplexedConnection> {
        let mut command = self.commands.lock().await;
        if let Some(connection) = &command.connection {
            return Some(connection.clone());
        }
        if command
            .failed_at
            .is_some_and(|at| at.elapsed() < RECONNECT_PAUSE)
        {
            return None;
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(connection) => {
                command.connection = Some(connection.clone());
                command.failed_at = None;
                self.set_commands_ok(true);
                Some(connection)
            }
            Err(e) => {
                command.failed_at = Some(Instant::now());
                if self.set_commands_ok(false) {
                    tracing::warn!(error = %e, "Redis is unreachable; signals fall back to polling");
                }
                None
            }
        }
    }

    /// Runs one command; on failure drops the connection so the next call reconnects.
    async fn run<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Option<T> {
        let mut connection = self.connection().await?;
        match command.query_async::<T>(&mut connection).await {
            Ok(value) => Some(value),
            Err(e) => {
                let mut state = self.commands.lock().await;
                state.connection = None;
                state.failed_at = Some(Instant::now());
                if self.set_commands_ok(false) {
                    tracing::warn!(error = %e, "a Redis command failed; signals fall back to polling");
                }
                None
            }
        }
    }

    /// Records whether commands work; true when that is news.
    fn set_commands_ok(&self, ok: bool) -> bool {
        self.commands_ok.swap(ok, Ordering::Relaxed) != ok
    }

    fn enqueue(&self, channel: &str, payload: String) {
        if self
            .outgoing
            .try_send((channel.to_string(), payload))
            .is_err()
        {
            metrics::counter!("baton_signals_dropped_total").increment(1);
        }
    }
}

/// Publishes queued messages and, after local commits, a wake-up (many commits, one message).
async fn publish(
    inner: Arc<Inner>,
    committed: Arc<Notify>,
    matcher_wake: Arc<Notify>,
    mut queued: mpsc::Receiver<(String, String)>,
    stop: CancellationToken,
) {
    let wake = inner.message(None, None);
    loop {
        let (channel, payload) = tokio::select! {
            () = committed.notified() => {
                matcher_wake.notify_one();
                (inner.wake_channel.clone(), wake.clone())
            }
            next = queued.recv() => match next {
                Some(message) => message,
                None => return,
            },
            () = stop.cancelled() => return,
        };
        let mut command = redis::cmd("PUBLISH");
        command.arg(&channel).arg(&payload);
        if inner.run::<i64>(&command).await.is_none() {
            metrics::counter!("baton_signals_dropped_total").increment(1);
        }
    }
}

/// Listens to the cluster's channels, reconnecting with back-off. Each (re)connection wakes
/// the matcher, which catches up on whatever was committed while no wake-up could arrive.
async fn listen(
    inner: Arc<Inner>,
    matcher_wake: Arc<Notify>,
    notices: mpsc::UnboundedSender<SubscriptionId>,
    delivery: DeliveryHandle,
    stop: CancellationToken,
) {
    let mut pause = Duration::from_millis(250);
    while !stop.is_cancelled() {
        let connected = tokio::time::timeout(TIMEOUT * 2, async {
            let mut pubsub = inner.client.get_async_pubsub().await?;
            pubsub
                .subscribe(&[
                    inner.wake_channel.as_str(),
                    inner.subscription_channel.as_str(),
                    inner.ws_channel.as_str(),
                    inner.deliver_channel.as_str(),
                ])
                .await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(pubsub)) => pubsub,
            failed => {
                if inner.subscribed.swap(false, Ordering::Relaxed) || pause.as_millis() == 250 {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_string(),
                    };
                    tracing::warn!(%error, "cannot subscribe to Redis; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        pause = Duration::from_millis(250);
        inner.subscribed.store(true, Ordering::Relaxed);
        // Redis answers again: commands may try at once rather than after their pause.
        inner.set_commands_ok(true);
        inner.commands.lock().await.failed_at = None;
        tracing::info!("subscribed to the cluster's Redis channels");
        matcher_wake.notify_one();
        let mut messages = pubsub.into_on_message();
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                () = stop.cancelled() => return,
            };
            let Some(message) = message else { break };
            let Ok(body) = serde_json::from_slice::<Message>(message.get_payload_bytes()) else {
                continue;
            };
            if body.origin == inner.node {
                continue;
            }
            let channel = message.get_channel_name();
            if channel == inner.wake_channel {
                matcher_wake.notify_one();
            } else if channel == inner.subscription_channel {
                if let Some(id) = body.subscription {
                    let _ = notices.send(id);
                }
            } else if channel == inner.deliver_channel {
                if body.target.as_deref() == Some(inner.node.as_str()) {
                    for id in &body.subscriptions {
                        delivery.wake(id);
                    }
                }
            } else if channel == inner.ws_channel
                && let (Some(subscription), Some(text)) = (body.subscription, body.text)
            {
                inner.registry.push(&subscription, &text);
            }
        }
        inner.subscribed.store(false, Ordering::Relaxed);
        tracing::warn!("lost the Redis subscription; falling back to polling until it returns");
    }
}

#[async_trait]
impl Signals for RedisSignals {
    fn subscription_changed(&self, id: &SubscriptionId) {
        let payload = self.inner.message(Some(id), None);
        self.inner
            .enqueue(&self.inner.subscription_channel, payload);
    }

    fn push_websocket(&self, subscription: &SubscriptionId, text: &str) -> usize {
        let payload = self.inner.message(Some(subscription), Some(text));
        self.inner.enqueue(&self.inner.ws_channel, payload);
        self.inner.registry.push(subscription, text)
    }

    fn wake_delivery(&self, node: &str, subscriptions: Vec<SubscriptionId>) {
        let payload = serde_json::to_string(&Message {
            origin: self.inner.node.clone(),
            subscription: None,
            text: None,
            target: Some(node.to_string()),
            subscriptions,
        })
        .unwrap_or_default();
        self.inner.enqueue(&self.inner.deliver_channel, payload);
    }

    fn may_have_listeners(&self, _subscription: &SubscriptionId) -> bool {
        // Sockets on other nodes are not counted here; building the notification is cheap
        // next to asking every node.
        true
    }

    async fn issue_token(&self, grant: Grant) -> String {
        let token = new_token();
        let ttl = (grant.expires_at - time::OffsetDateTime::now_utc())
            .whole_seconds()
            .max(1);
        let stored = StoredGrant {
            owner: grant.owner.clone(),
            subscriptions: grant.subscriptions.clone(),
            expires_at: grant.expires_at.unix_timestamp(),
        };
        let mut command = redis::cmd("SET");
        command
            .arg(format!("{}{token}", self.inner.token_prefix))
            .arg(serde_json::to_string(&stored).unwrap_or_default())
            .arg("EX")
            .arg(ttl);
        match self.inner.run::<String>(&command).await {
            Some(_) => token,
            // Redis is away: the token works on this node only, which beats refusing it.
            None => self.inner.local_tokens.issue(grant),
        }
    }

    async fn redeem_token(&self, token: &str, now: time::OffsetDateTime) -> Option<Grant> {
        if let Some(grant) = self.inner.local_tokens.redeem(token, now) {
            return Some(grant);
        }
        let mut command = redis::cmd("GETDEL");
        command.arg(format!("{}{token}", self.inner.token_prefix));
        let stored: String = self.inner.run::<Option<String>>(&command).await??;
        let stored: StoredGrant = serde_json::from_str(&stored).ok()?;
        let expires_at = time::OffsetDateTime::from_unix_timestamp(stored.expires_at).ok()?;
        (expires_at > now).then_some(Grant {
            owner: stored.owner,
            subscriptions: stored.subscriptions,
            expires_at,
        })
    }

    fn redis_state(&self) -> Option<&'static str> {
        let ok = self.inner.subscribed.load(Ordering::Relaxed)
            && self.inner.commands_ok.load(Ordering::Relaxed);
        Some(if ok { "ok" } else { "unavailable" })
    }
}
