//! Notification channels: how a notification leaves the hub.

pub mod rest_hook;
pub mod signature;
