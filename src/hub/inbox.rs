//! The delivery scheduler's inbox: what the rest of the node may ask of the scheduler.
//!
//! The hub and the outbox hold the sending half; `delivery::start` consumes the receiving
//! half. It lives here, below both, so that the hub can tell the scheduler about a
//! subscription without importing `delivery`, and `delivery` can read specs through the hub.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::fhir::ids::SubscriptionId;

/// Asks the scheduler to look at a subscription.
#[derive(Clone)]
pub struct DeliveryHandle {
    commands: mpsc::UnboundedSender<Command>,
}

/// What the scheduler is asked to do, per subscription id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// New events or a handshake owed: try now, unless a retry is pending.
    Wake(SubscriptionId),
    /// The subscription was created or replaced: a pending back-off belonged to the old
    /// version, so try now whatever it said.
    Changed(SubscriptionId),
    /// Start or stop heartbeats at this period.
    Heartbeat(SubscriptionId, Option<Duration>),
    /// The subscription is gone or off: drop every timer.
    Forget(SubscriptionId),
}

/// The scheduler's commands as it receives them.
pub type Commands = mpsc::UnboundedReceiver<Command>;

/// A new inbox: the handle to send with, and the commands for the scheduler to consume.
pub fn inbox() -> (DeliveryHandle, Commands) {
    let (commands, received) = mpsc::unbounded_channel();
    (DeliveryHandle { commands }, received)
}

impl DeliveryHandle {
    pub fn wake(&self, id: &SubscriptionId) {
        let _ = self.commands.send(Command::Wake(id.clone()));
    }

    pub fn changed(&self, id: &SubscriptionId) {
        let _ = self.commands.send(Command::Changed(id.clone()));
    }

    pub fn set_heartbeat(&self, id: &SubscriptionId, period: Option<Duration>) {
        let _ = self.commands.send(Command::Heartbeat(id.clone(), period));
    }

    pub fn forget(&self, id: &SubscriptionId) {
        let _ = self.commands.send(Command::Forget(id.clone()));
    }
}
