//! The websocket and AMQP subscribers. Both reconnect on their own for as long as the campaign
//! runs, the way a real client must: the websocket listener binds again with a fresh token and
//! fills what it missed from `$events` (the README's reconnect recipe); the AMQP consumer
//! reconnects to the broker and acknowledges each message only after recording it, so a
//! message in flight when the broker stops is delivered again rather than lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::fhir::{NoticeKind, parse_notice};
use crate::receiver::lock;
use crate::verify::{Arrival, Via};

/// What a subscriber saw, shared between its task and the campaign.
#[derive(Default)]
pub struct Inbox {
    pub arrivals: Mutex<Vec<Arrival>>,
    /// Arrival time of each event notification, for recovery times.
    pub notified_at: Mutex<Vec<Instant>>,
    /// Connections made (the first one included).
    pub connections: AtomicU64,
    /// Time from losing a connection to being bound again, per reconnection.
    pub reconnect_gaps: Mutex<Vec<Duration>>,
    pub handshakes: AtomicU64,
    pub malformed: AtomicU64,
    /// Events the websocket listener fetched from `$events` after reconnecting.
    pub gap_filled: AtomicU64,
    /// Notifications for another subscription (there should be none).
    pub foreign: AtomicU64,
}

impl Inbox {
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.arrivals).clone()
    }

    pub fn first_notified_after(&self, since: Instant) -> Option<Instant> {
        lock(&self.notified_at)
            .iter()
            .copied()
            .find(|at| *at >= since)
    }

    fn push_delivery(&self, connection: u32, events: Vec<crate::fhir::SeenEvent>) {
        lock(&self.notified_at).push(Instant::now());
        lock(&self.arrivals).extend(events.into_iter().map(|e| Arrival {
            number: e.number,
            task: e.task,
            version: e.version,
            via: Via::Delivery(connection),
        }));
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Runs a websocket listener for one subscription until `stop`; returns at once.
pub fn start_websocket(
    api: Api,
    subscription: String,
    stop: CancellationToken,
) -> (Arc<Inbox>, tokio::task::JoinHandle<()>) {
    let inbox = Arc::new(Inbox::default());
    let task = tokio::spawn(run_websocket(api, subscription, stop, inbox.clone()));
    (inbox, task)
}

async fn run_websocket(api: Api, subscription: String, stop: CancellationToken, inbox: Arc<Inbox>) {
    let mut connection = 0u32;
    let mut lost_at: Option<Instant> = None;
    // The highest event number seen so far, live or replayed.
    let mut highest = 0i64;
    while !stop.is_cancelled() {
        // In a cluster, spread reconnections over the nodes.
        let base = api.bases[connection as usize % api.bases.len()].clone();
        let bound = tokio::select! {
            bound = bind(&api, &base, &subscription) => bound,
            () = stop.cancelled() => break,
        };
        let (mut socket, since_start) = match bound {
            Ok(bound) => bound,
            Err(_) => {
                // A killed node is back within tens of milliseconds: look again soon.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        connection += 1;
        inbox.connections.fetch_add(1, Ordering::Relaxed);
        inbox.handshakes.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = lost_at.take() {
            lock(&inbox.reconnect_gaps).push(at.elapsed());
        }
        // Fill what was missed while disconnected; a failure here is left to the final check,
        // which replays everything.
        if since_start > highest
            && let Ok(missed) = api.replay(&subscription, highest + 1, since_start).await
        {
            inbox
                .gap_filled
                .fetch_add(missed.len() as u64, Ordering::Relaxed);
            highest = highest.max(missed.iter().map(|a| a.number).max().unwrap_or(0));
            lock(&inbox.arrivals).extend(missed);
        }
        loop {
            let message = tokio::select! {
                message = socket.next() => message,
                () = stop.cancelled() => break,
            };
            match message {
                Some(Ok(Message::Text(text))) => match parse_notice(text.as_bytes()) {
                    Some(notice) if notice.subscription != subscription => {
                        inbox.foreign.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(notice) if notice.kind == NoticeKind::Events => {
                        highest =
                            highest.max(notice.events.iter().map(|e| e.number).max().unwrap_or(0));
                        inbox.push_delivery(connection, notice.events);
                    }
                    Some(_) => {}
                    None => {
                        inbox.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
        lost_at = Some(Instant::now());
        let _ = socket.close(None).await;
    }
}

/// Gets a binding token, connects, binds and waits for the handshake; returns the socket and
/// the handshake's `events-since-subscription-start`.
async fn bind(api: &Api, base: &str, subscription: &str) -> anyhow::Result<(Socket, i64)> {
    let (token, url) = api.binding_token(base, subscription).await?;
    let (mut socket, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .context("connecting the websocket timed out")?
    .context("connecting the websocket")?;
    socket
        .send(Message::text(format!("bind-with-token {token}")))
        .await
        .context("sending bind-with-token")?;
    let handshake = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Close(frame))) => anyhow::bail!("closed while binding: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => anyhow::bail!("reading the handshake: {e}"),
                None => anyhow::bail!("the socket ended while binding"),
            }
        }
    })
    .await
    .context("no handshake within 10 s")??;
    match parse_notice(handshake.as_bytes()) {
        Some(notice) if notice.kind == NoticeKind::Handshake => {
            Ok((socket, notice.events_since_start))
        }
        _ => anyhow::bail!("expected a handshake"),
    }
}

// ---------------------------------------------------------------------------------------------
// AMQP

/// The campaign's own topology on the broker: a durable direct exchange, a durable queue bound
/// to it, both named after the run. If a run dies before removing them, the queue expires by
/// itself after an hour unused, and the exchange (auto-delete) goes with its last binding.
pub struct AmqpTopology {
    pub url: String,
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
}

impl AmqpTopology {
    pub async fn declare(&self) -> anyhow::Result<()> {
        use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
        use lapin::types::{AMQPValue, FieldTable};
        use lapin::{Connection, ConnectionProperties, ExchangeKind};

        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to the broker at {}", self.url))?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring the exchange")?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(3_600_000));
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .context("declaring the queue")?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding the queue")?;
        let _ = connection.close(200, "OK".into()).await;
        Ok(())
    }

    /// Removes the queue and the exchange (best effort).
    pub async fn remove(&self) {
        use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
        use lapin::{Connection, ConnectionProperties};
        let Ok(connection) = Connection::connect(&self.url, ConnectionProperties::default()).await
        else {
            return;
        };
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = channel
                .exchange_delete(
                    self.exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let _ = connection.close(200, "OK".into()).await;
    }
}

/// Consumes the run's queue until `stop`, reconnecting whenever the broker goes away.
pub fn start_amqp(
    url: String,
    queue: String,
    subscription: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
) -> (Arc<Inbox>, tokio::task::JoinHandle<()>) {
    let inbox = Arc::new(Inbox::default());
    let task = tokio::spawn(run_amqp(url, queue, subscription, stop, inbox.clone()));
    (inbox, task)
}

async fn run_amqp(
    url: String,
    queue: String,
    subscription: Arc<Mutex<Option<String>>>,
    stop: CancellationToken,
    inbox: Arc<Inbox>,
) {
    let mut lost_at: Option<Instant> = None;
    while !stop.is_cancelled() {
        let consumed = tokio::select! {
            consumed = consume(&url, &queue, &subscription, &inbox, &mut lost_at) => consumed,
            () = stop.cancelled() => break,
        };
        if consumed.is_err() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        lost_at.get_or_insert_with(Instant::now);
    }
}

async fn consume(
    url: &str,
    queue: &str,
    subscription: &Mutex<Option<String>>,
    inbox: &Inbox,
    lost_at: &mut Option<Instant>,
) -> anyhow::Result<()> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties};

    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.basic_qos(500, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "baton-fault".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let connection_number = inbox.connections.fetch_add(1, Ordering::Relaxed) as u32 + 1;
    if let Some(at) = lost_at.take() {
        lock(&inbox.reconnect_gaps).push(at.elapsed());
    }
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let wanted = lock(subscription).clone();
        match parse_notice(&delivery.data) {
            Some(notice) if wanted.as_deref().is_some_and(|s| s != notice.subscription) => {
                inbox.foreign.fetch_add(1, Ordering::Relaxed);
            }
            Some(notice) => match notice.kind {
                NoticeKind::Events => inbox.push_delivery(connection_number, notice.events),
                NoticeKind::Handshake => {
                    inbox.handshakes.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            },
            None => {
                inbox.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Acknowledged only once recorded: a connection lost before this line means the
        // broker delivers the message again (a duplicate, never a loss).
        delivery.ack(BasicAckOptions::default()).await?;
    }
    anyhow::bail!("the consumer ended")
}
