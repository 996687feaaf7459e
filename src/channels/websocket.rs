//! The websocket channel: the connection registry and the binding tokens.
//!
//! The `Registry` is the one owner of the connection table: which sockets are open and which
//! subscriptions each carries. Each socket has a bounded outbox; pushing never waits: a socket
//! whose outbox is full is closed as too slow (1008) and counted, so one slow listener never
//! delays the hub or any other listener. Delivery is live and best effort; a listener that
//! reconnects fills its gap with `$events`.
//!
//! Binding tokens (`$get-ws-binding-token`) are short-lived and single-use: `BindingTokens`
//! keeps them for a single node, and in a cluster `signals` keeps them in Redis so that any
//! node can redeem them. The session that runs on each socket (reading bind frames, writing
//! what the registry queues) is HTTP and lives in `api::websocket`.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::Utf8Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::fhir::datetime::format_instant;
use crate::fhir::ids::SubscriptionId;

/// What a redeemed binding token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The whole identity the token was issued to; a subscription binds only if this is still
    /// exactly its owner.
    pub owner: Identity,
    pub subscriptions: Vec<SubscriptionId>,
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

/// What the registry queues for a socket's writer (the session in `api::websocket`).
pub(crate) enum Outbound {
    Text(Utf8Bytes),
    /// Send a close frame after everything queued before it.
    Close(u16, &'static str),
}

struct SocketHandle {
    outbox: mpsc::Sender<Outbound>,
    /// Cancelled to close the socket; the reason goes in the close frame.
    close: CancellationToken,
    bound: HashSet<SubscriptionId>,
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
    by_subscription: HashMap<SubscriptionId, HashSet<u64>>,
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

    /// Registers a newly opened socket by its outbox and close signal; returns its id.
    pub(crate) fn add(&self, outbox: mpsc::Sender<Outbound>, close: CancellationToken) -> u64 {
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

    /// Forgets a closed socket and its bindings.
    pub(crate) fn remove(&self, id: u64) {
        let mut tables = self.tables();
        tables.drop_socket(id);
        metrics::gauge!("baton_websocket_connections").set(tables.sockets.len() as f64);
    }

    /// Carries a subscription on a socket from now on; false when the socket is gone (closed
    /// as too slow meanwhile), so the session stops binding.
    pub(crate) fn bind(&self, socket: u64, subscription: &SubscriptionId) -> bool {
        let mut tables = self.tables();
        let Some(handle) = tables.sockets.get_mut(&socket) else {
            return false;
        };
        handle.bound.insert(subscription.clone());
        tables
            .by_subscription
            .entry(subscription.clone())
            .or_default()
            .insert(socket);
        true
    }

    /// Whether this socket carries any subscription yet.
    pub(crate) fn carries_any(&self, socket: u64) -> bool {
        self.tables()
            .sockets
            .get(&socket)
            .is_some_and(|h| !h.bound.is_empty())
    }

    /// How many sockets carry this subscription.
    pub fn listeners(&self, subscription: &SubscriptionId) -> usize {
        self.tables()
            .by_subscription
            .get(subscription)
            .map_or(0, HashSet::len)
    }

    /// Stops delivering a subscription (deleted or turned off) to every socket.
    pub fn unbind_subscription(&self, subscription: &SubscriptionId) {
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
    pub fn push(&self, subscription: &SubscriptionId, text: &str) -> usize {
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
    subscriptions: &[SubscriptionId],
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
            subscriptions: vec![SubscriptionId::parse("s").unwrap()],
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
        let s = SubscriptionId::parse("s").unwrap();
        registry.bind(slow, &s);
        registry.bind(fast, &s);
        assert_eq!(registry.push(&s, "1"), 2);
        assert_eq!(
            registry.push(&s, "2"),
            1,
            "the slow socket is full and dropped"
        );
        assert!(slow_close.is_cancelled());
        assert_eq!(registry.listeners(&s), 1);
        assert_eq!(registry.push(&s, "3"), 1);
        let mut got = Vec::new();
        while let Ok(Outbound::Text(t)) = fast_rx.try_recv() {
            got.push(t.to_string());
        }
        assert_eq!(fast_rx.try_recv().ok().map(|_| ()), None);
        assert_eq!(got, ["1", "2", "3"]);
    }
}
