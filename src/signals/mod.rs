//! How a node tells the others what they must hear quickly: that changes were committed (so
//! the matcher does not wait for its poll), that a subscription changed, a websocket
//! notification for sockets held elsewhere, and binding tokens minted on one node and redeemed
//! on another.
//!
//! Two implementations, chosen once at start-up: `InProcess` for a single node and `Redis`
//! for a cluster. Signals are only ever a shortcut: everything that must not be lost is in the
//! store, every node still polls it, and websocket listeners catch up with `$events`. So a
//! Redis outage costs latency, never data; `/readyz` reports it.

pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::channels::websocket::{BindingTokens, Grant, Registry};
use crate::fhir::ids::SubscriptionId;

#[async_trait]
pub trait Signals: Send + Sync + 'static {
    /// Tells every node that a subscription was created, replaced or deleted.
    fn subscription_changed(&self, id: &SubscriptionId);
    /// Queues a notification on the sockets bound to `subscription`, on this node and every
    /// other; returns how many sockets on this node took it.
    fn push_websocket(&self, subscription: &SubscriptionId, text: &str) -> usize;
    /// Asks `node` to look at these subscriptions' waiting work: the matcher numbered events
    /// for them, and `node` is the live node they prefer (`hub::nodes`). Only a shortcut: when
    /// it is lost, that node's scan finds the work.
    fn wake_delivery(&self, node: &str, subscriptions: Vec<SubscriptionId>);
    /// Whether some node may have a socket bound to `subscription`.
    fn may_have_listeners(&self, subscription: &SubscriptionId) -> bool;
    /// Keeps a binding token where any node can redeem it.
    async fn issue_token(&self, grant: Grant) -> String;
    /// Takes a token: it works once, on any node, and only before it expires.
    async fn redeem_token(&self, token: &str, now: time::OffsetDateTime) -> Option<Grant>;
    /// `Some("ok")` or `Some("unavailable")` for Redis; None when this node does not use it.
    fn redis_state(&self) -> Option<&'static str>;
}

/// A single node: wake-ups are the store's own commit notices, and tokens and sockets live in
/// this process.
pub struct InProcess {
    registry: Arc<Registry>,
    tokens: BindingTokens,
}

impl InProcess {
    pub fn new(registry: Arc<Registry>) -> InProcess {
        InProcess {
            registry,
            tokens: BindingTokens::default(),
        }
    }
}

#[async_trait]
impl Signals for InProcess {
    fn subscription_changed(&self, _id: &SubscriptionId) {
        // The API updates this node's index and scheduler itself; nobody else needs telling.
    }

    fn push_websocket(&self, subscription: &SubscriptionId, text: &str) -> usize {
        self.registry.push(subscription, text)
    }

    fn wake_delivery(&self, _node: &str, _subscriptions: Vec<SubscriptionId>) {
        // One node prefers itself for everything: there is nobody else to wake.
    }

    fn may_have_listeners(&self, subscription: &SubscriptionId) -> bool {
        self.registry.listeners(subscription) > 0
    }

    async fn issue_token(&self, grant: Grant) -> String {
        self.tokens.issue(grant)
    }

    async fn redeem_token(&self, token: &str, now: time::OffsetDateTime) -> Option<Grant> {
        self.tokens.redeem(token, now)
    }

    fn redis_state(&self) -> Option<&'static str> {
        None
    }
}

/// What the matcher waits on: notified after local commits and, in a cluster, after commits
/// on other nodes.
pub type MatcherWake = Arc<Notify>;
