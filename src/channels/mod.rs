//! Notification channels: how a notification leaves the hub.

pub mod amqp;
pub mod rest_hook;
pub mod signature;
pub mod websocket;

use std::time::Duration;

/// Why a notification did not arrive.
#[derive(Debug, Clone, PartialEq)]
pub struct SendError {
    /// A short, PHI-free description for logs and `Subscription.error`; endpoint errors start
    /// with `HTTP <status>` so the status can be coded (`fhir::notification::error_code`).
    pub message: String,
    /// What the endpoint asked for in `Retry-After`.
    pub retry_after: Option<Duration>,
}
