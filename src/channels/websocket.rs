//! The websocket channel: live notifications to bound sockets.
//!
//! A listener obtains a short-lived, single-use binding token (`$get-ws-binding-token`),
//! opens a socket and sends `bind-with-token <token>` (also `bind-with-token: <token>` and
//! `{"type":"bind-with-token","payload":{"token":"…"}}`). One socket may carry several
//! subscriptions, bound together or one after another.
//!
//! The `Registry` is the one owner of the connection table. Each socket has a bounded outbox;
//! pushing never waits: a socket whose outbox is full is closed as too slow (1008) and counted,
//! so one slow listener never delays the hub or any other listener. Delivery is live and best
//! effort; a listener that reconnects fills its gap with `$events`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::config::WebSocketConfig;
use crate::error::IssueCode;
use crate::fhir::datetime::format_instant;
use crate::fhir::notification::{
    ContentLevel, NotificationType, StatusSnapshot, SubscriptionStatus, notification_bundle,
};
use crate::signals::Signals;
use crate::store::Store;

/// Close code for policy problems: a bad token, or a listener too slow to keep up.
const POLICY: u16 = 1008;
/// Close code for a server going away.
const GOING_AWAY: u16 = 1001;
/// Why a socket that never bound is closed.
const UNBOUND: &str =
    "no subscription was bound in time: send bind-with-token right after connecting";

/// What a redeemed binding token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The whole identity the token was issued to; a subscription binds only if this is still
    /// exactly its owner.
    pub owner: Identity,
    pub subscriptions: Vec<String>,
    pub expires_at: time::OffsetDateTime,
}

/// A fresh, unguessable binding token (192 random bits, hex).
pub fn new_token() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Single-use binding tokens, kept in memory on this node.
#[derive(Default)]
pub struct BindingTokens {
    grants: Mutex<HashMap<String, Grant>>,
}

impl BindingTokens {
    /// Issues a token for these subscriptions, valid until `expires_at`.
    pub fn issue(&self, grant: Grant) -> String {
        let token = new_token();
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        // Expired tokens are dropped as new ones are issued, so the table stays small.
        let now = time::OffsetDateTime::now_utc();
        grants.retain(|_, g| g.expires_at > now);
        grants.insert(token.clone(), grant);
        token
    }

    /// Takes a token: it works once, and only before it expires.
    pub fn redeem(&self, token: &str, now: time::OffsetDateTime) -> Option<Grant> {
        let grant = self
            .grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token)?;
        (grant.expires_at > now).then_some(grant)
    }
}

enum Outbound {
    Text(Utf8Bytes),
    /// Send a close frame after everything queued before it.
    Close(u16, &'static str),
}

struct SocketHandle {
    outbox: mpsc::Sender<Outbound>,
    /// Cancelled to close the socket; the reason goes in the close frame.
    close: CancellationToken,
    bound: HashSet<String>,
}

/// The table of open sockets and which subscriptions each carries.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Tables>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Tables {
    sockets: HashMap<u64, SocketHandle>,
    by_subscription: HashMap<String, HashSet<u64>>,
}

impl Tables {
    fn drop_socket(&mut self, id: u64) -> Option<SocketHandle> {
        let handle = self.sockets.remove(&id)?;
        for subscription in &handle.bound {
            if let Some(set) = self.by_subscription.get_mut(subscription) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_subscription.remove(subscription);
                }
            }
        }
        Some(handle)
    }
}

impl Registry {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, outbox: mpsc::Sender<Outbound>, close: CancellationToken) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut tables = self.tables();
        tables.sockets.insert(
            id,
            SocketHandle {
                outbox,
                close,
                bound: HashSet::new(),
            },
        );
        metrics::gauge!("baton_websocket_connections").set(tables.sockets.len() as f64);
        id
    }

    fn remove(&self, id: u64) {
        let mut tables = self.tables();
        tables.drop_socket(id);
        metrics::gauge!("baton_websocket_connections").set(tables.sockets.len() as f64);
    }

    fn bind(&self, socket: u64, subscription: &str) -> bool {
        let mut tables = self.tables();
        let Some(handle) = tables.sockets.get_mut(&socket) else {
            return false;
        };
        handle.bound.insert(subscription.to_string());
        tables
            .by_subscription
            .entry(subscription.to_string())
            .or_default()
            .insert(socket);
        true
    }

    /// How many sockets carry this subscription.
    pub fn listeners(&self, subscription: &str) -> usize {
        self.tables()
            .by_subscription
            .get(subscription)
            .map_or(0, HashSet::len)
    }

    /// Stops delivering a subscription (deleted or turned off) to every socket.
    pub fn unbind_subscription(&self, subscription: &str) {
        let mut tables = self.tables();
        if let Some(sockets) = tables.by_subscription.remove(subscription) {
            for id in sockets {
                if let Some(handle) = tables.sockets.get_mut(&id) {
                    handle.bound.remove(subscription);
                }
            }
        }
    }

    /// Queues a notification on every socket bound to the subscription, without waiting.
    /// A socket whose outbox is full is closed as too slow. Returns how many took it.
    pub fn push(&self, subscription: &str, text: &str) -> usize {
        let text = Utf8Bytes::from(text.to_string());
        let mut tables = self.tables();
        let Some(sockets) = tables.by_subscription.get(subscription).cloned() else {
            return 0;
        };
        let mut delivered = 0;
        for id in sockets {
            let Some(handle) = tables.sockets.get(&id) else {
                continue;
            };
            match handle.outbox.try_send(Outbound::Text(text.clone())) {
                Ok(()) => delivered += 1,
                Err(_) => {
                    if let Some(handle) = tables.drop_socket(id) {
                        handle.close.cancel();
                        metrics::counter!("baton_websocket_closed_slow_total").increment(1);
                        tracing::warn!(socket.id = id, "closing a websocket that cannot keep up");
                    }
                }
            }
        }
        metrics::gauge!("baton_websocket_connections").set(tables.sockets.len() as f64);
        delivered
    }
}

/// What a socket needs from the rest of the hub.
pub struct WebSocketHub {
    pub registry: Arc<Registry>,
    /// Binding tokens live here, so that any node can redeem them.
    pub signals: Arc<dyn Signals>,
    pub store: Arc<dyn Store>,
    pub base_url: String,
    pub config: WebSocketConfig,
    /// Cancelled at shutdown: every socket gets a close frame.
    pub shutdown: CancellationToken,
    /// A socket that has bound no subscription this long after opening is closed (1008): it
    /// would only hold a connection (`limits.websocket_bind_timeout_seconds`).
    pub bind_timeout: Duration,
}

/// The bind frames a socket understands, for the refusal of anything else.
const BIND_SPELLINGS: &str = "expected 'bind-with-token <token>', 'bind-with-token: <token>' or {\"type\":\"bind-with-token\",\"payload\":{\"token\":\"…\"}}";

/// Extracts the token from any of the accepted bind spellings; the error is the diagnostic
/// for the client. A JSON frame is read like any client JSON: a repeated key is refused
/// rather than resolved, so that `type` or `token` cannot mean two things.
pub fn parse_bind(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.starts_with('{') {
        let value = crate::fhir::json::parse(text.as_bytes()).map_err(|e| match e {
            crate::fhir::json::JsonError::DuplicateKey { .. } => {
                format!("the bind frame repeats a JSON key: {e}")
            }
            _ => BIND_SPELLINGS.to_string(),
        })?;
        if value["type"] != "bind-with-token" {
            return Err(BIND_SPELLINGS.to_string());
        }
        return value["payload"]["token"]
            .as_str()
            .map(str::to_string)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| BIND_SPELLINGS.to_string());
    }
    let rest = text
        .strip_prefix("bind-with-token")
        .ok_or_else(|| BIND_SPELLINGS.to_string())?;
    let token = rest.strip_prefix(':').unwrap_or(rest).trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(BIND_SPELLINGS.to_string());
    }
    Ok(token.to_string())
}

fn outcome_frame(code: IssueCode, diagnostics: &str) -> Utf8Bytes {
    Utf8Bytes::from(crate::error::operation_outcome("error", code, diagnostics, None).to_string())
}

/// Serves one socket until it closes, the hub shuts down, or it falls behind.
pub async fn serve_socket(socket: WebSocket, hub: Arc<WebSocketHub>) {
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut queued) = mpsc::channel::<Outbound>(hub.config.outbox_capacity);
    let close = CancellationToken::new();
    let id = hub.registry.add(outbox.clone(), close.clone());
    tracing::debug!(socket.id = id, "websocket opened");

    // The writer owns the sink: queued notifications, pings, and the close frame.
    let writer_close = close.clone();
    let shutdown = hub.shutdown.clone();
    let ping_every = Duration::from_secs(hub.config.ping_interval_seconds);
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        const TOO_SLOW: (u16, &str) = (POLICY, "too slow: notifications were not read in time");
        const SHUTTING_DOWN: (u16, &str) = (GOING_AWAY, "server shutting down");
        let (code, reason) = loop {
            // Closing comes first: at shutdown the reader drops the queue too, and a closed
            // queue must not win the race and end the socket without its 1001.
            let message = tokio::select! {
                biased;
                () = writer_close.cancelled() => break TOO_SLOW,
                () = shutdown.cancelled() => break SHUTTING_DOWN,
                next = queued.recv() => match next {
                    Some(Outbound::Text(text)) => Message::Text(text),
                    Some(Outbound::Close(code, reason)) => break (code, reason),
                    None => return,
                },
                _ = ping.tick() => Message::Ping(Default::default()),
            };
            // A peer that stops reading blocks the send; the close signal must still win.
            tokio::select! {
                sent = sink.send(message) => if sent.is_err() { return },
                () = writer_close.cancelled() => break TOO_SLOW,
                () = shutdown.cancelled() => break SHUTTING_DOWN,
            }
        };
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        // A peer that reads nothing can hold the sink; the close frame gets a short deadline.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    });

    // Once a subscription is bound the socket lives on its pings; until then, on this deadline.
    let bind_deadline = tokio::time::sleep(hub.bind_timeout);
    let mut bind_deadline = std::pin::pin!(bind_deadline);
    let mut ever_bound = false;
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            () = close.cancelled() => break,
            () = hub.shutdown.cancelled() => break,
            () = &mut bind_deadline, if !ever_bound => {
                metrics::counter!("baton_websocket_closed_unbound_total").increment(1);
                tracing::debug!(socket.id = id, "closing a websocket that bound nothing in time");
                let _ = outbox.try_send(Outbound::Close(POLICY, UNBOUND));
                break;
            }
        };
        let Some(Ok(message)) = message else { break };
        match message {
            Message::Text(text) => {
                let token = match parse_bind(text.as_str()) {
                    Ok(token) => token,
                    Err(why) => {
                        let frame = outcome_frame(IssueCode::NotSupported, &why);
                        if outbox.try_send(Outbound::Text(frame)).is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let bound_before = hub
                    .registry
                    .tables()
                    .sockets
                    .get(&id)
                    .is_some_and(|h| !h.bound.is_empty());
                let bound = bind(&hub, id, &token, &outbox).await;
                ever_bound |= bound;
                if !bound && !bound_before {
                    // A socket with nothing bound has no use: after the error frame it is
                    // closed with 1008, so the client cannot mistake silence for success.
                    let _ = outbox
                        .try_send(Outbound::Close(POLICY, "invalid or expired binding token"));
                    break;
                }
            }
            Message::Close(_) => break,
            Message::Binary(_) => {
                let frame =
                    outcome_frame(IssueCode::NotSupported, "binary frames are not supported");
                let _ = outbox.try_send(Outbound::Text(frame));
            }
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
    hub.registry.remove(id);
    drop(outbox);
    let _ = writer.await;
    tracing::debug!(socket.id = id, "websocket closed");
}

/// Redeems a token and binds its subscriptions, sending one handshake each. Returns false
/// (after sending an error frame) when the token is not usable.
async fn bind(
    hub: &WebSocketHub,
    socket: u64,
    token: &str,
    outbox: &mpsc::Sender<Outbound>,
) -> bool {
    let now = time::OffsetDateTime::now_utc();
    let Some(grant) = hub.signals.redeem_token(token, now).await else {
        let frame = outcome_frame(
            IssueCode::Security,
            "the binding token is unknown, already used or expired; get a new one with $get-ws-binding-token",
        );
        let _ = outbox.try_send(Outbound::Text(frame));
        return false;
    };
    let mut bound = 0;
    for subscription_id in &grant.subscriptions {
        let stored = match hub.store.read_subscription(subscription_id).await {
            Ok(Some(s)) => s,
            _ => continue,
        };
        // The subscription must still be a live websocket subscription of the same author.
        let same_author = stored.owner == grant.owner;
        if stored.channel_type != "websocket"
            || stored.status == SubscriptionStatus::Off
            || !same_author
        {
            continue;
        }
        if !hub.registry.bind(socket, subscription_id) {
            return false;
        }
        bound += 1;
        let snapshot = StatusSnapshot {
            subscription_id: &stored.id,
            topic_url: &stored.topic_url,
            status: stored.status,
            events_since_start: stored.events_since_start,
            notification_type: NotificationType::Handshake,
            error: None,
        };
        let bundle = notification_bundle(
            &hub.base_url,
            &uuid::Uuid::new_v4().to_string(),
            &format_instant(now),
            &snapshot,
            &[],
            ContentLevel::IdOnly,
        );
        if outbox
            .try_send(Outbound::Text(Utf8Bytes::from(bundle.to_string())))
            .is_err()
        {
            return false;
        }
        tracing::info!(socket.id = socket, subscription.id = %stored.id, "websocket bound");
    }
    if bound == 0 {
        let frame = outcome_frame(
            IssueCode::NotFound,
            "none of the token's subscriptions can be bound any more",
        );
        let _ = outbox.try_send(Outbound::Text(frame));
        return false;
    }
    true
}

/// The `websocket-url` clients connect to, derived from the FHIR base URL.
pub fn websocket_url(base_url: &str) -> String {
    let url = base_url
        .strip_prefix("https://")
        .map(|rest| format!("wss://{rest}"))
        .or_else(|| {
            base_url
                .strip_prefix("http://")
                .map(|rest| format!("ws://{rest}"))
        })
        .unwrap_or_else(|| base_url.to_string());
    format!("{url}/ws")
}

/// The `$get-ws-binding-token` result.
pub fn binding_parameters(
    token: &str,
    expires_at: time::OffsetDateTime,
    subscriptions: &[String],
    url: &str,
) -> Value {
    let mut parameter = vec![
        json!({ "name": "token", "valueString": token }),
        json!({ "name": "expiration", "valueDateTime": format_instant(expires_at) }),
    ];
    parameter.extend(
        subscriptions
            .iter()
            .map(|s| json!({ "name": "subscription", "valueString": s })),
    );
    parameter.push(json!({ "name": "websocket-url", "valueUrl": url }));
    json!({ "resourceType": "Parameters", "parameter": parameter })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_spellings() {
        let cases = [
            ("bind-with-token abc123", Some("abc123")),
            ("bind-with-token: abc123", Some("abc123")),
            ("  bind-with-token:abc123 ", Some("abc123")),
            (
                r#"{"type":"bind-with-token","payload":{"token":"abc123"}}"#,
                Some("abc123"),
            ),
            (r#"{"type":"unbind","payload":{"token":"abc123"}}"#, None),
            ("bind-with-token", None),
            ("bind-with-token a b", None),
            ("bind abc123", None),
            ("", None),
            (r#"{"type":"bind-with-token","payload":{"token":""}}"#, None),
            (r#"{"type":"bind-with-token","#, None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_bind(text).ok().as_deref(), expected, "{text}");
        }
    }

    #[test]
    fn bind_frames_with_repeated_keys_are_refused_by_name() {
        let cases = [
            (
                r#"{"type":"unbind","type":"bind-with-token","payload":{"token":"a"}}"#,
                "'type' occurs twice in the top-level object",
            ),
            (
                r#"{"type":"bind-with-token","payload":{"token":"a","token":"b"}}"#,
                "'token' occurs twice in the object at payload",
            ),
        ];
        for (text, expected) in cases {
            let why = parse_bind(text).unwrap_err();
            assert!(why.contains(expected), "{text}: {why}");
        }
        assert!(
            parse_bind("nonsense")
                .unwrap_err()
                .contains("bind-with-token <token>")
        );
    }

    #[test]
    fn tokens_work_once_and_expire() {
        let tokens = BindingTokens::default();
        let now = time::OffsetDateTime::now_utc();
        let grant = Grant {
            owner: Identity {
                issuer: None,
                subject: "u".into(),
                role: crate::auth::Role::Auditor,
                fhir_user: None,
            },
            subscriptions: vec!["s".into()],
            expires_at: now + time::Duration::seconds(60),
        };
        let token = tokens.issue(grant.clone());
        assert_eq!(tokens.redeem(&token, now), Some(grant.clone()));
        assert_eq!(tokens.redeem(&token, now), None, "single use");
        let late = tokens.issue(grant);
        assert_eq!(
            tokens.redeem(&late, now + time::Duration::seconds(61)),
            None,
            "expired"
        );
    }

    #[test]
    fn websocket_urls_follow_the_base() {
        assert_eq!(
            websocket_url("https://h.example/fhir"),
            "wss://h.example/fhir/ws"
        );
        assert_eq!(
            websocket_url("http://127.0.0.1:8080/fhir"),
            "ws://127.0.0.1:8080/fhir/ws"
        );
    }

    #[tokio::test]
    async fn a_full_outbox_closes_only_that_socket() {
        let registry = Registry::default();
        let (slow_tx, _slow_rx) = mpsc::channel(1);
        let (fast_tx, mut fast_rx) = mpsc::channel(16);
        let slow_close = CancellationToken::new();
        let slow = registry.add(slow_tx, slow_close.clone());
        let fast = registry.add(fast_tx, CancellationToken::new());
        registry.bind(slow, "s");
        registry.bind(fast, "s");
        assert_eq!(registry.push("s", "1"), 2);
        assert_eq!(
            registry.push("s", "2"),
            1,
            "the slow socket is full and dropped"
        );
        assert!(slow_close.is_cancelled());
        assert_eq!(registry.listeners("s"), 1);
        assert_eq!(registry.push("s", "3"), 1);
        let mut got = Vec::new();
        while let Ok(Outbound::Text(t)) = fast_rx.try_recv() {
            got.push(t.to_string());
        }
        assert_eq!(fast_rx.try_recv().ok().map(|_| ()), None);
        assert_eq!(got, ["1", "2", "3"]);
    }
}
