//! The hub run's rest-hook receiver: one route for every subscription, recording each
//! notification with its arrival time. The analysis happens after the run (`verify`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use baton_tools::common::lock;
use baton_tools::common::notification::{NotificationEvent, NotificationType, read_notification};

/// One notification POST that carried events.
pub struct Arrival {
    pub at: Instant,
    pub subscription_id: String,
    pub events: Vec<NotificationEvent>,
}

/// What the receiver collects.
#[derive(Default)]
pub struct Inbox {
    pub handshakes: Mutex<HashSet<String>>,
    pub arrivals: Mutex<Vec<Arrival>>,
    pub posts: AtomicU64,
    pub heartbeats: AtomicU64,
    /// Bodies that were not a notification Bundle this tool understands.
    pub malformed: AtomicU64,
    /// Events received so far (cheap progress for the drain wait).
    pub events: AtomicU64,
    /// Answer every Nth event notification with 503 (0: never).
    pub reject_every: u64,
    pub event_posts: AtomicU64,
    pub rejected: AtomicU64,
}

impl Inbox {
    /// How many of `ids` have had their handshake.
    pub fn handshaken(&self, ids: &[String]) -> usize {
        let handshakes = lock(&self.handshakes);
        ids.iter().filter(|id| handshakes.contains(*id)).count()
    }
}

/// Serves `POST /hook/{n}` on 127.0.0.1:`port` (0: any free port) into `inbox`.
pub async fn start(
    port: u16,
    inbox: Arc<Inbox>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .context("binding the receiver (--receivers-port)")?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route("/hook/{n}", post(receive))
        .with_state(inbox);
    Ok((
        address,
        tokio::spawn(async move { axum::serve(listener, app).await }),
    ))
}

async fn receive(
    State(inbox): State<Arc<Inbox>>,
    Path(_hook): Path<u32>,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    inbox.posts.fetch_add(1, Ordering::Relaxed);
    let Some(notification) = read_notification(&body) else {
        inbox.malformed.fetch_add(1, Ordering::Relaxed);
        return StatusCode::OK;
    };
    match notification.kind {
        NotificationType::Handshake => {
            lock(&inbox.handshakes).insert(notification.subscription);
        }
        NotificationType::Heartbeat => {
            inbox.heartbeats.fetch_add(1, Ordering::Relaxed);
        }
        NotificationType::EventNotification => {
            let nth = inbox.event_posts.fetch_add(1, Ordering::Relaxed) + 1;
            if inbox.reject_every > 0 && nth % inbox.reject_every == 0 {
                inbox.rejected.fetch_add(1, Ordering::Relaxed);
                return StatusCode::SERVICE_UNAVAILABLE;
            }
            let events = notification.events;
            inbox
                .events
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            lock(&inbox.arrivals).push(Arrival {
                at,
                subscription_id: notification.subscription,
                events,
            });
        }
        // Status and `$events` answers are never pushed.
        NotificationType::QueryStatus | NotificationType::QueryEvent => {
            inbox.malformed.fetch_add(1, Ordering::Relaxed);
        }
    }
    StatusCode::OK
}
