//! The websocket and AMQP subscribers. Both reconnect on their own for as long as the campaign
//! runs, the way a real client must: the websocket listener binds again with a fresh token and
//! fills what it missed from `$events` (the README's reconnect recipe); the AMQP consumer
//! reconnects to the broker and acknowledges each message only after recording it, so a
//! message in flight when the broker stops is delivered again rather than lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use baton_tools::common::amqp::Topology;
use baton_tools::common::lock;
use baton_tools::common::notification::{NotificationEvent, NotificationType, read_notification};
use baton_tools::common::websocket::{BindDeadlines, bind};
use futures::StreamExt;
use lapin::{Connection, ConnectionProperties};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
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

    fn push_delivery(&self, connection: u32, events: Vec<NotificationEvent>) {
        lock(&self.notified_at).push(Instant::now());
        lock(&self.arrivals).extend(events.into_iter().map(|e| Arrival {
            number: e.number,
            task: e.task,
            version: e.version,
            via: Via::Delivery(connection),
        }));
    }
}

/// A killed node is back within tens of milliseconds: binding gives up soon and tries again.
const BIND_DEADLINES: BindDeadlines = BindDeadlines {
    connect: Some(Duration::from_secs(5)),
    handshake: Duration::from_secs(10),
};

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
            bound = bind(&api.client, &api.bearer, &base, &subscription, BIND_DEADLINES) => bound,
            () = stop.cancelled() => break,
        };
        let (mut socket, since_start) = match bound {
            Ok((socket, handshake)) => (socket, handshake.events_since_start.unwrap_or(0)),
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
                Some(Ok(Message::Text(text))) => match read_notification(text.as_bytes()) {
                    Some(notice) if notice.subscription != subscription => {
                        inbox.foreign.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(notice) if notice.kind.carries_events() => {
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

// ---------------------------------------------------------------------------------------------
// AMQP

/// The campaign's own topology on the broker, named after the run. If a run dies before
/// removing it, the queue expires by itself after an hour unused, and the exchange
/// (auto-delete) goes with its last binding.
pub struct AmqpTopology {
    pub url: String,
    pub topology: Topology,
}

impl AmqpTopology {
    pub fn new(url: String, run: &str) -> AmqpTopology {
        let name = format!("baton-fault-{run}");
        AmqpTopology {
            url,
            topology: Topology {
                exchange: name.clone(),
                queue: name,
                routing_key: "fault".into(),
                exchange_auto_delete: true,
                queue_expires: Duration::from_secs(3600),
            },
        }
    }

    pub async fn declare(&self) -> anyhow::Result<()> {
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to the broker at {}", self.url))?;
        let channel = connection.create_channel().await?;
        self.topology.declare(&channel).await?;
        let _ = connection.close(200, "OK".into()).await;
        Ok(())
    }

    /// Removes the queue and the exchange (best effort).
    pub async fn remove(&self) {
        let Ok(connection) = Connection::connect(&self.url, ConnectionProperties::default()).await
        else {
            return;
        };
        if let Ok(channel) = connection.create_channel().await {
            self.topology.remove(&channel).await;
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
        match read_notification(&delivery.data) {
            Some(notice) if wanted.as_deref().is_some_and(|s| s != notice.subscription) => {
                inbox.foreign.fetch_add(1, Ordering::Relaxed);
            }
            Some(notice) => match notice.kind {
                NotificationType::EventNotification | NotificationType::QueryEvent => {
                    inbox.push_delivery(connection_number, notice.events)
                }
                NotificationType::Handshake => {
                    inbox.handshakes.fetch_add(1, Ordering::Relaxed);
                }
                NotificationType::Heartbeat | NotificationType::QueryStatus => {}
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
