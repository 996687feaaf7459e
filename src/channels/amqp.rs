//! The AMQP 0-9-1 channel (RabbitMQ): publishing notification Bundles with publisher confirms.
//!
//! The hub keeps one long-lived connection to the broker named by `BATON_AMQP_URL`. A supervisor
//! task owns it: it connects in the background, notices when the connection is lost (a broker
//! restart, `rabbitmqctl close_connection`, a network failure, missed heartbeats) and reconnects
//! with capped exponential backoff and jitter, so that many hubs do not hammer a broker that is
//! coming back. Start-up never waits for the broker: AMQP deliveries simply fail, and wait in the
//! durable delivery queue, until it is reachable.
//!
//! Publishing uses a small pool of channels in confirm mode. A publish holds one channel from
//! `basic.publish` until the broker's `basic.ack`, so the channel never has two messages in
//! flight and a `basic.return` can only belong to the message being published. That is what
//! makes an unroutable message (published `mandatory`) a failed attempt rather than a silent
//! loss. A success means the broker has taken the message; for a persistent message routed to a
//! durable queue RabbitMQ confirms only once it has been written to disk. Per-subscription order
//! needs nothing from this module: the delivery queue starts a subscription's next notification
//! only after the previous one was confirmed, and by then the previous one is already queued.
//!
//! A channel that failed in any way (closed by the broker, for example `404 NOT_FOUND` for a
//! missing exchange, or left waiting for a confirm past the timeout) is dropped rather than
//! reused, because a late confirm or return on it could otherwise be taken for a later
//! message's. The next publish opens a fresh one.
//!
//! Which broker an endpoint names: an `amqp://HOST[:PORT]/VHOST?...` endpoint is served when its
//! host, port and virtual host equal those of `BATON_AMQP_URL`. Hosts are compared as written,
//! ignoring ASCII case and without resolving names, so `localhost` and `127.0.0.1` are different
//! brokers: a check that resolved names would make a subscription's validity depend on DNS at
//! the moment it is checked, whereas a literal comparison is something an operator can read off
//! the configuration. A missing port means 5672 and an empty path means the vhost `/`, on both
//! sides.
//!
//! The message format, as the README documents it for consumers:
//! - body: the notification Bundle, exactly as a rest-hook would receive it;
//! - properties: `content_type` (the subscription's `channel.payload`), `message_id` (stable per
//!   notification, so consumers can drop duplicates of an at-least-once delivery), `timestamp`
//!   (seconds since the Unix epoch), `app_id` `baton`, `delivery_mode` 2 (persistent);
//! - headers: `subscription-id` (string), `notification-type` (string: `handshake`,
//!   `heartbeat`, `event-notification`, ...), `first-event` and `last-event` (64-bit integers,
//!   present only when the notification carries events) and `events-since-subscription-start`
//!   (64-bit integer).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind, Event,
};
use tokio::sync::{Mutex, MutexGuard, Notify, watch};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::SendError;
use crate::fhir::ids::{EventNumber, SubscriptionId};
use crate::fhir::subscription::{AmqpEndpoint, DEFAULT_AMQP_PORT};

/// How long one connection attempt (TCP, AMQP handshake, authentication) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the supervisor looks at the connection even when no event woke it, as a backstop.
const HEALTH_CHECK: Duration = Duration::from_secs(5);
/// A connection that lived this long counts as having worked: losing it resets the backoff and
/// publishes wait for the prompt reconnect instead of failing.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// The backoff before the first retry after a failed attempt; it doubles per failure.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest backoff between connection attempts: a connection attempt costs the broker
/// little, and a broker restart should be noticed within seconds (events wait meanwhile).
const MAX_RETRY: Duration = Duration::from_secs(5);
/// How long shutdown waits for publishes in flight to get their confirms.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the broker to acknowledge closing the connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The AMQP `delivery_mode` of a message that survives a broker restart in a durable queue.
const PERSISTENT: u8 = 2;
/// The `app_id` property of every message, and the name of the connection on the broker.
const APP_ID: &str = "baton";

/// The hub's publisher to its one configured broker. Cheap to clone: clones share the
/// connection and its channels.
#[derive(Clone)]
pub struct AmqpPublisher {
    inner: Arc<Inner>,
}

/// One notification on its way to an exchange.
pub struct AmqpMessage<'a> {
    /// The notification Bundle, serialised as it would be for a rest-hook.
    pub body: &'a [u8],
    /// The subscription's `channel.payload`, parameters included.
    pub content_type: &'a str,
    /// Stable per notification, so consumers can drop duplicates.
    pub message_id: &'a str,
    pub subscription_id: &'a SubscriptionId,
    /// `handshake`, `heartbeat`, `event-notification`, ...
    pub notification_type: &'a str,
    /// The first event number carried, when the notification carries events.
    pub first_event: Option<EventNumber>,
    /// The last event number carried, when the notification carries events.
    pub last_event: Option<EventNumber>,
    pub events_since_start: EventNumber,
    /// When the notification was built, in seconds since the Unix epoch.
    pub timestamp_secs: u64,
    /// The W3C trace context the notification continues, sent as the `traceparent` header.
    pub traceparent: Option<&'a str>,
}

struct Inner {
    broker: Broker,
    /// The state of the connection, written only by the supervisor.
    link: watch::Sender<Link>,
    /// The channel pool. A slot's lock is held for a whole publish, which is what serialises
    /// publishes per channel; an empty slot opens a channel on its next use.
    slots: Vec<Mutex<Option<OpenChannel>>>,
    /// Picks the slot to queue on when every channel is busy.
    next_slot: AtomicUsize,
    /// Wakes the supervisor when a publish finds the connection gone, so that reconnecting does
    /// not wait for the next health check.
    lost: Notify,
    /// Cancelled once the supervisor has closed the connection for good.
    closed: CancellationToken,
}

/// A confirm-mode channel and the connection it was opened on.
struct OpenChannel {
    channel: Channel,
    generation: u64,
}

#[derive(Clone)]
enum Link {
    /// A connection attempt is under way, or about to be after a connection that had been
    /// working was lost. Publishes wait for it (within their timeout).
    Connecting,
    /// Connected. `generation` counts connections, so that a channel from an earlier one is never
    /// reused.
    Up {
        connection: Arc<Connection>,
        generation: u64,
    },
    /// The last attempt failed and the supervisor is backing off. Publishes fail at once rather
    /// than hold a delivery worker for the whole backoff.
    Down { reason: String },
    /// Shutdown has begun; nothing is published any more.
    Stopped,
}

/// The broker identity that endpoints are compared with: no credentials, so it can be logged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Broker {
    /// Lower-cased, IPv6 addresses without brackets, as `parse_amqp_endpoint` writes them.
    host: String,
    port: u16,
    /// Decoded; `/` when the URL gives none.
    vhost: String,
}

impl Broker {
    fn serves(&self, endpoint: &AmqpEndpoint) -> bool {
        self.host.eq_ignore_ascii_case(&endpoint.host)
            && self.port == endpoint.port
            && self.vhost == endpoint.vhost
    }
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{} vhost '{}'", self.host, self.port, self.vhost)
        } else {
            write!(f, "{}:{} vhost '{}'", self.host, self.port, self.vhost)
        }
    }
}

impl AmqpPublisher {
    /// Starts connecting in the background and returns at once; start-up never waits for, or
    /// fails because of, the broker. `url` is `BATON_AMQP_URL`, credentials included. The only
    /// error is a URL that can never work (malformed, no host, or `amqps`, for which this build
    /// has no TLS support); it never repeats the URL, which holds a password.
    ///
    /// Must be called inside the Tokio runtime. Cancelling `shutdown` stops reconnecting, lets
    /// publishes in flight finish (up to ten seconds) and closes the connection; `closed()`
    /// resolves when that is done. Until then the background task keeps the publisher alive.
    pub fn start(
        url: &str,
        channels: usize,
        shutdown: CancellationToken,
        health: Arc<crate::supervise::Health>,
    ) -> Result<AmqpPublisher, String> {
        let (uri, broker) = parse_hub_url(url)?;
        let inner = Arc::new(Inner {
            broker,
            link: watch::Sender::new(Link::Connecting),
            slots: (0..channels.max(1)).map(|_| Mutex::new(None)).collect(),
            next_slot: AtomicUsize::new(0),
            lost: Notify::new(),
            closed: CancellationToken::new(),
        });
        // The connection loop reconnects by itself; if it ever panicked, publishing would
        // stop for good, so that stops the node.
        tokio::spawn(crate::supervise::watch_vital(
            health,
            "amqp",
            shutdown.clone(),
            supervise(inner.clone(), uri, shutdown),
        ));
        Ok(AmqpPublisher { inner })
    }

    /// Whether `endpoint` names the broker this hub is configured for: host (ignoring ASCII case,
    /// not resolved, so `localhost` is not `127.0.0.1`), port and virtual host all equal.
    pub fn serves(&self, endpoint: &AmqpEndpoint) -> bool {
        self.inner.broker.serves(endpoint)
    }

    /// The check for `Subscription.channel.endpoint` at creation: `Err` is a sentence about the
    /// endpoint that names the broker the hub does publish to (never its credentials).
    pub fn check_endpoint(&self, endpoint: &AmqpEndpoint) -> Result<(), String> {
        if self.serves(endpoint) {
            Ok(())
        } else {
            Err(format!(
                "names a broker this hub does not publish to; this hub publishes to {} \
                 (host names are compared as written, not resolved)",
                self.inner.broker
            ))
        }
    }

    /// Publishes one notification to `endpoint`'s exchange with its routing key: persistent,
    /// `mandatory`, and confirmed by the broker within `timeout` (which covers waiting for a
    /// connection and a free channel too). `Ok` means the broker confirmed the message and routed
    /// it to at least one queue. An unroutable message, a nack, a missing exchange, a timeout, no
    /// connection or an endpoint naming another broker are `Err` with a short, PHI-free message
    /// for `Subscription.error`. A channel or connection that failed is replaced for the next
    /// call.
    pub async fn publish(
        &self,
        endpoint: &AmqpEndpoint,
        message: AmqpMessage<'_>,
        timeout: Duration,
    ) -> Result<(), SendError> {
        if !self.serves(endpoint) {
            return Err(failure(
                "the endpoint names a broker this hub is not configured for".into(),
            ));
        }
        let deadline = Instant::now() + timeout;
        let properties = message_properties(&message)?;
        let exchange = short_string(&endpoint.exchange, "the exchange name")?;
        let routing_key = short_string(&endpoint.routing_key, "the routing key")?;
        let mut slot = self.inner.claim_slot(deadline, timeout).await?;
        let (connection, generation) = self.inner.connection(deadline, timeout).await?;
        let channel = match slot.take() {
            Some(open) if open.generation == generation && open.channel.status().connected() => {
                open.channel
            }
            // A channel from an earlier connection, or one the broker closed, is dropped here.
            _ => match timeout_at(deadline, open_channel(&connection)).await {
                Ok(Ok(channel)) => channel,
                Ok(Err(e)) => {
                    self.inner.notice_if_lost(&connection);
                    return Err(failure(describe(&e)));
                }
                Err(_) => {
                    return Err(failure(format!(
                        "could not open an AMQP channel within {timeout:?}"
                    )));
                }
            },
        };
        let confirmation = timeout_at(deadline, async {
            channel
                .basic_publish(
                    exchange,
                    routing_key,
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    message.body,
                    properties,
                )
                .await?
                .await
        })
        .await;
        // In the early returns below the channel is dropped (and so closed), not put back.
        let confirmation = match confirmation {
            Ok(Ok(confirmation)) => confirmation,
            Ok(Err(e)) => {
                self.inner.notice_if_lost(&connection);
                return Err(failure(describe(&e)));
            }
            Err(_) => {
                return Err(failure(format!(
                    "the broker did not confirm the message within {timeout:?}"
                )));
            }
        };
        match confirmation {
            Confirmation::Ack(None) => {
                *slot = Some(OpenChannel {
                    channel,
                    generation,
                });
                Ok(())
            }
            // The broker answered for this message and nothing else is pending on the channel,
            // so it stays usable.
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                *slot = Some(OpenChannel {
                    channel,
                    generation,
                });
                Err(failure(unroutable(endpoint, &returned)))
            }
            Confirmation::Nack(None) => {
                *slot = Some(OpenChannel {
                    channel,
                    generation,
                });
                Err(failure(
                    "the broker refused the message (basic.nack)".into(),
                ))
            }
            Confirmation::NotRequested => Err(failure(
                "the AMQP channel was not in confirm mode, so the message is unconfirmed".into(),
            )),
        }
    }

    /// Whether the hub is connected to its broker now, for `/readyz`.
    pub fn is_connected(&self) -> bool {
        matches!(
            &*self.inner.link.borrow(),
            Link::Up { connection, .. } if connection.status().connected()
        )
    }

    /// Resolves once shutdown has closed the connection (after the `shutdown` token passed to
    /// `start` was cancelled).
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await;
    }
}

impl Inner {
    /// Takes a channel slot for one publish: a free one if there is one, otherwise the next in
    /// turn, waited for within the deadline.
    async fn claim_slot(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<MutexGuard<'_, Option<OpenChannel>>, SendError> {
        for slot in &self.slots {
            if let Ok(guard) = slot.try_lock() {
                return Ok(guard);
            }
        }
        let index = self.next_slot.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        timeout_at(deadline, self.slots[index].lock())
            .await
            .map_err(|_| {
                failure(format!(
                    "no AMQP channel became free within {timeout:?}; the broker is slow to confirm"
                ))
            })
    }

    /// The live connection, waiting within the deadline while one is being made. A connection
    /// found dead is reported to the supervisor and its replacement waited for, so a publish
    /// right after the broker dropped the connection still goes out.
    async fn connection(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(Arc<Connection>, u64), SendError> {
        let mut link = self.link.subscribe();
        let mut dead = None;
        loop {
            let settled = timeout_at(
                deadline,
                link.wait_for(|state| match state {
                    Link::Connecting => false,
                    Link::Up { generation, .. } => Some(*generation) != dead,
                    Link::Down { .. } | Link::Stopped => true,
                }),
            )
            .await
            .map(|waited| waited.map(|state| state.clone()));
            match settled {
                Ok(Ok(Link::Up {
                    connection,
                    generation,
                })) => {
                    if connection.status().connected() {
                        return Ok((connection, generation));
                    }
                    dead = Some(generation);
                    self.lost.notify_one();
                }
                Ok(Ok(Link::Down { reason })) => {
                    return Err(failure(format!(
                        "no connection to the AMQP broker: {reason}"
                    )));
                }
                Ok(Ok(Link::Stopped | Link::Connecting) | Err(_)) => {
                    return Err(failure("the AMQP publisher has shut down".into()));
                }
                Err(_) => {
                    return Err(failure(format!(
                        "could not connect to the AMQP broker within {timeout:?}"
                    )));
                }
            }
        }
    }

    /// Wakes the supervisor if a failed operation was due to the connection going away.
    fn notice_if_lost(&self, connection: &Connection) {
        if !connection.status().connected() {
            self.lost.notify_one();
        }
    }
}

/// Owns the connection for the publisher's lifetime: connects, watches, reconnects, and closes
/// it on shutdown.
async fn supervise(inner: Arc<Inner>, uri: AMQPUri, shutdown: CancellationToken) {
    let broker = inner.broker.to_string();
    let mut failures: u32 = 0;
    let mut generation: u64 = 0;
    loop {
        inner.link.send_replace(Link::Connecting);
        let attempt = tokio::select! {
            () = shutdown.cancelled() => break,
            attempt = timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri.clone(), connection_properties())) => attempt,
        };
        let reason = match attempt {
            Ok(Ok(connection)) => {
                let connection = Arc::new(connection);
                generation += 1;
                let connected_at = Instant::now();
                tracing::info!(amqp.broker = %broker, "connected to the AMQP broker");
                inner.link.send_replace(Link::Up {
                    connection: connection.clone(),
                    generation,
                });
                let Some(reason) = watch_connection(&inner, &connection, &shutdown).await else {
                    shut_down(&inner, Some(connection)).await;
                    return;
                };
                // A connection that worked for a while resets the backoff, so that a broker
                // restart is followed by a prompt reconnect; one that keeps dropping right after
                // connecting backs off like a failed attempt.
                failures = if connected_at.elapsed() >= STABLE_CONNECTION {
                    0
                } else {
                    failures.saturating_add(1)
                };
                tracing::warn!(amqp.broker = %broker, error = %reason, "lost the connection to the AMQP broker; reconnecting");
                reason
            }
            Ok(Err(e)) => {
                failures = failures.saturating_add(1);
                describe(&e)
            }
            Err(_) => {
                failures = failures.saturating_add(1);
                format!("the broker did not answer within {CONNECT_TIMEOUT:?}")
            }
        };
        let delay = reconnect_delay(failures, rand::random());
        if failures == 0 {
            // The reconnect is imminent, so publishes wait for it rather than fail.
            inner.link.send_replace(Link::Connecting);
        } else {
            tracing::warn!(
                amqp.broker = %broker,
                attempt = failures,
                retry_in_ms = delay.as_millis() as u64,
                error = %reason,
                "no connection to the AMQP broker; retrying after a backoff"
            );
            // Publishes fail at once until the next attempt, rather than hold a delivery worker
            // for the whole backoff.
            inner.link.send_replace(Link::Down { reason });
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    shut_down(&inner, None).await;
}

/// Waits until the connection is lost (returning why) or shutdown begins (returning `None`).
async fn watch_connection(
    inner: &Inner,
    connection: &Connection,
    shutdown: &CancellationToken,
) -> Option<String> {
    let mut events = connection.events_listener();
    let mut check = tokio::time::interval(HEALTH_CHECK);
    loop {
        if !connection.status().connected() {
            return Some("the connection is no longer open".into());
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            event = events.next() => match event {
                // Channel errors (such as a missing exchange) arrive here too; only a connection
                // that is no longer connected counts as lost.
                Some(Event::Error(e)) if !connection.status().connected() => return Some(describe(&e)),
                Some(Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(amqp.broker = %inner.broker, reason, "the AMQP broker blocked publishing; publishes time out until it unblocks");
                }
                Some(Event::ConnectionUnblocked) => {
                    tracing::info!(amqp.broker = %inner.broker, "the AMQP broker unblocked publishing");
                }
                Some(_) => {}
                None => return Some("the connection's event stream ended".into()),
            },
            () = inner.lost.notified() => {}
            _ = check.tick() => {}
        }
    }
}

/// Stops publishing, lets publishes in flight finish, and closes the connection.
async fn shut_down(inner: &Inner, connection: Option<Arc<Connection>>) {
    inner.link.send_replace(Link::Stopped);
    // Taking every slot waits for the publishes holding them (each bounded by its own timeout)
    // and closes the channels; publishes arriving later find the link stopped. Each channel is
    // closed and its close awaited: a channel merely dropped closes in the background, and
    // closing the connection under it makes lapin log an error for a clean shutdown.
    let drained = timeout(DRAIN_TIMEOUT, async {
        for slot in &inner.slots {
            let taken = slot.lock().await.take();
            if let Some(open) = taken
                && open.channel.status().connected()
                && let Err(e) = open
                    .channel
                    .close(200, "Baton is shutting down".into())
                    .await
            {
                tracing::debug!(error = %e, "closing an AMQP channel at shutdown failed");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "AMQP publishes still waiting for confirms at shutdown were cut off; they will be retried"
        );
    }
    if let Some(connection) = connection
        && connection.status().connected()
    {
        match timeout(
            CLOSE_TIMEOUT,
            connection.close(200, "Baton is shutting down".into()),
        )
        .await
        {
            Ok(Ok(())) => tracing::info!(amqp.broker = %inner.broker, "closed the AMQP connection"),
            Ok(Err(e)) => {
                tracing::warn!(amqp.broker = %inner.broker, error = %e, "closing the AMQP connection failed")
            }
            Err(_) => {
                tracing::warn!(amqp.broker = %inner.broker, "the AMQP broker did not acknowledge closing the connection")
            }
        }
    }
    inner.closed.cancel();
}

fn connection_properties() -> ConnectionProperties {
    // lapin's own retries and recovery stay off: the supervisor reconnects, so that backoff,
    // jitter and the publishers' view of the link are decided in one place.
    ConnectionProperties::default().with_connection_name(APP_ID.into())
}

async fn open_channel(connection: &Connection) -> lapin::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The backoff before the next connection attempt after `failures` failures in a row (0 after
/// a working connection was lost): exponential from `FIRST_RETRY`, capped at `MAX_RETRY`, with
/// the upper half jittered by `random` in [0, 1) so that hubs restarted together spread out.
/// After a lost working connection the delay is only jitter, up to `FIRST_RETRY`.
fn reconnect_delay(failures: u32, random: f64) -> Duration {
    let random = random.clamp(0.0, 1.0);
    if failures == 0 {
        return FIRST_RETRY.mul_f64(random);
    }
    let exponent = (failures - 1).min(16);
    let base = FIRST_RETRY.saturating_mul(1 << exponent).min(MAX_RETRY);
    base / 2 + (base / 2).mul_f64(random)
}

/// Reads `BATON_AMQP_URL` into what lapin connects to and the broker identity endpoints are
/// compared with. Errors never repeat the URL, which holds a password.
fn parse_hub_url(url: &str) -> Result<(AMQPUri, Broker), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("BATON_AMQP_URL is not a valid URL: {e}"))?;
    match parsed.scheme() {
        "amqp" => {}
        "amqps" => {
            return Err(
                "BATON_AMQP_URL uses amqps, but this build of Baton has no TLS support for AMQP; \
                 use amqp://"
                    .into(),
            );
        }
        other => {
            return Err(format!(
                "BATON_AMQP_URL must start with amqp://, not {other}:"
            ));
        }
    }
    // lapin's parser would repeat the whole URL in this error.
    if parsed.cannot_be_a_base() {
        return Err("BATON_AMQP_URL must look like amqp://USER:PASSWORD@HOST[:PORT]/VHOST".into());
    }
    let host = match parsed.host_str() {
        Some(host) if !host.is_empty() => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase(),
        _ => return Err("BATON_AMQP_URL names no broker host".into()),
    };
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|e: String| format!("BATON_AMQP_URL is not a valid AMQP URL: {e}"))?;
    // lapin reads an IPv6 address as no host at all (and so `localhost`); the address without
    // brackets is what the socket address lookup expects.
    uri.authority.host = host.clone();
    // As in `parse_amqp_endpoint`: the empty vhost of `amqp://host/` exists on no broker, and
    // whoever writes it means the default one.
    if uri.vhost.is_empty() {
        uri.vhost = "/".into();
    }
    let port = parsed.port().unwrap_or(DEFAULT_AMQP_PORT);
    uri.authority.port = port;
    let broker = Broker {
        host,
        port,
        vhost: uri.vhost.clone(),
    };
    Ok((uri, broker))
}

fn message_properties(message: &AmqpMessage<'_>) -> Result<BasicProperties, SendError> {
    let mut headers = FieldTable::default();
    headers.insert(
        "subscription-id".into(),
        AMQPValue::LongString(message.subscription_id.as_str().into()),
    );
    headers.insert(
        "notification-type".into(),
        AMQPValue::LongString(message.notification_type.into()),
    );
    if let Some(first) = message.first_event {
        headers.insert("first-event".into(), AMQPValue::LongLongInt(first.get()));
    }
    if let Some(traceparent) = message.traceparent {
        headers.insert(
            "traceparent".into(),
            AMQPValue::LongString(traceparent.into()),
        );
    }
    if let Some(last) = message.last_event {
        headers.insert("last-event".into(), AMQPValue::LongLongInt(last.get()));
    }
    headers.insert(
        "events-since-subscription-start".into(),
        AMQPValue::LongLongInt(message.events_since_start.get()),
    );
    Ok(BasicProperties::default()
        .with_content_type(short_string(message.content_type, "the content type")?)
        .with_message_id(short_string(message.message_id, "the message id")?)
        .with_timestamp(message.timestamp_secs)
        .with_app_id(APP_ID.into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers))
}

/// An AMQP short string; lapin's `From` conversions panic beyond 255 bytes.
fn short_string(text: &str, what: &str) -> Result<ShortString, SendError> {
    ShortString::try_new(text)
        .map_err(|_| failure(format!("{what} is longer than AMQP's 255 bytes")))
}

fn unroutable(endpoint: &AmqpEndpoint, returned: &BasicReturnMessage) -> String {
    format!(
        "the message was unroutable: no queue is bound to exchange '{}' for routing key '{}' \
         ({} {})",
        endpoint.exchange, endpoint.routing_key, returned.reply_code, returned.reply_text
    )
}

/// A short text for a lapin error. The broker's reply text (such as `NOT_FOUND - no exchange
/// 'x' in vhost '/'`) names only the destination, never message content.
fn describe(error: &lapin::Error) -> String {
    match error.kind() {
        ErrorKind::ProtocolError(e) if error.is_amqp_soft_error() => {
            format!("the broker closed the channel: {}", e.get_message())
        }
        ErrorKind::ProtocolError(e) => {
            format!("the broker closed the connection: {}", e.get_message())
        }
        _ => format!("the AMQP connection failed: {error}"),
    }
}

fn failure(message: String) -> SendError {
    SendError {
        message,
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(host: &str, port: u16, vhost: &str) -> AmqpEndpoint {
        AmqpEndpoint {
            host: host.into(),
            port,
            vhost: vhost.into(),
            exchange: "baton".into(),
            routing_key: String::new(),
        }
    }

    #[test]
    fn the_hub_url_names_the_broker_without_credentials() {
        let cases = [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "127.0.0.1",
                5672,
                "/",
            ),
            ("amqp://u:p@Rabbit.Example", "rabbit.example", 5672, "/"),
            ("amqp://u:p@rabbit/", "rabbit", 5672, "/"),
            ("amqp://u:p@rabbit:5673/prod", "rabbit", 5673, "prod"),
            (
                "amqp://u:p@rabbit/a%2Fb?heartbeat=10",
                "rabbit",
                5672,
                "a/b",
            ),
            ("amqp://u:p@[::1]:5672/%2F", "::1", 5672, "/"),
        ];
        for (url, host, port, vhost) in cases {
            let (uri, broker) = parse_hub_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            let expected = Broker {
                host: host.into(),
                port,
                vhost: vhost.into(),
            };
            assert_eq!(broker, expected, "{url}");
            assert_eq!(uri.authority.host, host, "{url}");
            assert_eq!(uri.authority.port, port, "{url}");
            assert_eq!(uri.vhost, vhost, "{url}");
            assert!(!broker.to_string().contains("guest:"), "{url}");
        }
    }

    #[test]
    fn hub_urls_that_cannot_work_are_refused_without_repeating_them() {
        let cases = [
            ("amqps://u:secret@rabbit/", "TLS"),
            ("http://u:secret@rabbit/", "must start with amqp://"),
            ("amqp:u:secret@rabbit", "must look like"),
            ("amqp:///vhost", "no broker host"),
            (
                "amqp://u:secret@rabbit/?heartbeat=often",
                "not a valid AMQP URL",
            ),
            ("not a url secret", "not a valid URL"),
        ];
        for (url, expected) in cases {
            let error = parse_hub_url(url)
                .err()
                .unwrap_or_else(|| panic!("{url} passed"));
            assert!(error.contains(expected), "{url}: {error}");
            assert!(!error.contains("secret"), "{url} leaked: {error}");
        }
    }

    #[test]
    fn endpoints_are_served_only_by_the_same_host_port_and_vhost() {
        let broker = Broker {
            host: "rabbit.example".into(),
            port: 5672,
            vhost: "/".into(),
        };
        let cases = [
            (endpoint("rabbit.example", 5672, "/"), true),
            (endpoint("RABBIT.example", 5672, "/"), true),
            (endpoint("rabbit.example", 5673, "/"), false),
            (endpoint("rabbit.example", 5672, "prod"), false),
            (endpoint("other.example", 5672, "/"), false),
            // Names are not resolved: an alias of the same machine is another broker.
            (endpoint("rabbit", 5672, "/"), false),
        ];
        for (endpoint, served) in cases {
            assert_eq!(broker.serves(&endpoint), served, "{endpoint:?}");
        }
        let loopback = Broker {
            host: "localhost".into(),
            port: 5672,
            vhost: "/".into(),
        };
        assert!(!loopback.serves(&endpoint("127.0.0.1", 5672, "/")));
    }

    #[test]
    fn reconnect_delays_grow_to_a_cap_with_jitter() {
        let ms = Duration::from_millis;
        let cases = [
            (0, 0.0, ms(0)),
            (0, 0.999_999, ms(249)),
            (1, 0.0, ms(125)),
            (1, 1.0, ms(250)),
            (2, 0.0, ms(250)),
            (3, 1.0, ms(1000)),
            (5, 1.0, ms(4_000)),
            (8, 1.0, ms(5_000)),
            (8, 0.0, ms(2_500)),
            (u32::MAX, 0.5, ms(3_750)),
            // Out-of-range randomness is clamped rather than trusted.
            (1, 7.0, ms(250)),
            (1, -1.0, ms(125)),
        ];
        for (failures, random, expected) in cases {
            let delay = reconnect_delay(failures, random);
            assert_eq!(
                delay.as_millis(),
                expected.as_millis(),
                "failures {failures}, random {random}"
            );
        }
    }

    #[test]
    fn properties_carry_the_message_format() {
        let subscription = SubscriptionId::parse("sub-1").unwrap();
        let message = AmqpMessage {
            body: b"{}",
            content_type: "application/fhir+json;fhirVersion=4.0",
            message_id: "sub-1/7",
            subscription_id: &subscription,
            notification_type: "event-notification",
            first_event: Some(EventNumber::new(5)),
            last_event: Some(EventNumber::new(7)),
            events_since_start: EventNumber::new(7),
            timestamp_secs: 1_700_000_000,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        };
        let properties = message_properties(&message).unwrap();
        assert_eq!(
            properties.content_type().as_ref().map(|s| s.as_str()),
            Some("application/fhir+json;fhirVersion=4.0")
        );
        assert_eq!(
            properties.message_id().as_ref().map(|s| s.as_str()),
            Some("sub-1/7")
        );
        assert_eq!(*properties.delivery_mode(), Some(2));
        assert_eq!(*properties.timestamp(), Some(1_700_000_000));
        assert_eq!(
            properties.app_id().as_ref().map(|s| s.as_str()),
            Some("baton")
        );
        let headers = properties.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get("first-event"), Some(&AMQPValue::LongLongInt(5)));
        assert_eq!(headers.get("last-event"), Some(&AMQPValue::LongLongInt(7)));
        assert_eq!(
            headers.get("traceparent"),
            Some(&AMQPValue::LongString(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()
            ))
        );

        let heartbeat = AmqpMessage {
            notification_type: "heartbeat",
            first_event: None,
            last_event: None,
            ..message
        };
        let headers = message_properties(&heartbeat)
            .unwrap()
            .headers()
            .clone()
            .unwrap();
        assert!(!headers.contains_key("first-event"));
        assert!(!headers.contains_key("last-event"));
        assert_eq!(
            headers.inner().get("events-since-subscription-start"),
            Some(&AMQPValue::LongLongInt(7))
        );

        let long = "x".repeat(256);
        let oversized = AmqpMessage {
            content_type: &long,
            ..heartbeat
        };
        let error = message_properties(&oversized).unwrap_err();
        assert!(error.message.contains("255 bytes"), "{}", error.message);
    }
}
