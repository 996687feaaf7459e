//! The subscription status machine: `requested` → `active` → `error` → `off`, and back.
//!
//! One pure function decides every status change delivery makes, from the status an attempt
//! found and what happened to it. The stores only write the status they are given, keeping
//! one guard of their own: a subscription that is `off` in the row stays `off`, since a client
//! may have switched it off while the attempt ran.

use crate::fhir::notification::SubscriptionStatus;

use super::retry::AfterFailure;

/// What happened to a subscription during a delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Happened {
    /// The handshake reached the endpoint: the endpoint is verified.
    HandshakeDelivered,
    /// The handshake did not arrive, and the retry policy decided what next.
    HandshakeFailed(AfterFailure),
    /// Events or a heartbeat reached the endpoint (or were passed to its sockets).
    Delivered,
    /// Events or a heartbeat did not arrive, and the retry policy decided what next.
    Failed(AfterFailure),
    /// This hub's configuration cannot serve the subscription's channel (plain http no longer
    /// allowed, no AMQP broker). Its events are still counted, and it is tried again when it
    /// changes, new events wake it, or the node restarts with another configuration.
    Paused,
    /// The subscription reached its end time.
    Ended,
    /// Its topic or filters are gone: it can never match again.
    TurnedOff,
}

/// The status a subscription moves to from `current` after what happened.
pub fn next_status(current: SubscriptionStatus, happened: Happened) -> SubscriptionStatus {
    use SubscriptionStatus::{Active, Error, Off, Requested};
    match (current, happened) {
        // Only the client turns a subscription back on, by writing it again.
        (Off, _) => Off,
        (_, Happened::HandshakeDelivered) => Active,
        // A subscription still `requested` is waiting for its handshake, which events do not
        // replace; one in `error` has recovered.
        (Requested, Happened::Delivered) => Requested,
        (Active | Error, Happened::Delivered) => Active,
        // A failed handshake means the endpoint is not verified: `error` at once (IG).
        (_, Happened::HandshakeFailed(AfterFailure::RetryAt { .. })) => Error,
        (
            _,
            Happened::Failed(AfterFailure::RetryAt {
                mark_error: true, ..
            }),
        ) => Error,
        (
            current,
            Happened::Failed(AfterFailure::RetryAt {
                mark_error: false, ..
            }),
        ) => current,
        (_, Happened::HandshakeFailed(AfterFailure::TurnOff))
        | (_, Happened::Failed(AfterFailure::TurnOff)) => Off,
        (_, Happened::Paused) => Error,
        (_, Happened::Ended | Happened::TurnedOff) => Off,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use SubscriptionStatus::{Active, Error, Off, Requested};

    const RETRY: AfterFailure = AfterFailure::RetryAt {
        delay: Duration::from_secs(30),
        mark_error: false,
    };
    const RETRY_IN_ERROR: AfterFailure = AfterFailure::RetryAt {
        delay: Duration::from_secs(30),
        mark_error: true,
    };
    const PAST_HORIZON: AfterFailure = AfterFailure::TurnOff;

    #[test]
    fn every_transition() {
        // (status found, what happened, status written)
        let cases = [
            // The handshake verifies the endpoint, whatever came before.
            (Requested, Happened::HandshakeDelivered, Active),
            (Active, Happened::HandshakeDelivered, Active),
            (Error, Happened::HandshakeDelivered, Active),
            // A failed handshake is `error` at once; past the horizon `off`.
            (Requested, Happened::HandshakeFailed(RETRY), Error),
            (Active, Happened::HandshakeFailed(RETRY), Error),
            (Error, Happened::HandshakeFailed(RETRY), Error),
            (Requested, Happened::HandshakeFailed(RETRY_IN_ERROR), Error),
            (Requested, Happened::HandshakeFailed(PAST_HORIZON), Off),
            (Error, Happened::HandshakeFailed(PAST_HORIZON), Off),
            // Events delivered: `error` → `active` on a later success; `requested` waits for
            // its handshake.
            (Requested, Happened::Delivered, Requested),
            (Active, Happened::Delivered, Active),
            (Error, Happened::Delivered, Active),
            // A failure keeps the status until the policy marks `error`.
            (Requested, Happened::Failed(RETRY), Requested),
            (Active, Happened::Failed(RETRY), Active),
            (Error, Happened::Failed(RETRY), Error),
            (Requested, Happened::Failed(RETRY_IN_ERROR), Error),
            (Active, Happened::Failed(RETRY_IN_ERROR), Error),
            (Error, Happened::Failed(RETRY_IN_ERROR), Error),
            // `error` → `off` past the retry horizon, and likewise from any live status.
            (Requested, Happened::Failed(PAST_HORIZON), Off),
            (Active, Happened::Failed(PAST_HORIZON), Off),
            (Error, Happened::Failed(PAST_HORIZON), Off),
            // A configuration that cannot serve the channel: `error`, waiting for one that can.
            (Requested, Happened::Paused, Error),
            (Active, Happened::Paused, Error),
            (Error, Happened::Paused, Error),
            // The end time, or a topic that is gone: `off`.
            (Requested, Happened::Ended, Off),
            (Active, Happened::Ended, Off),
            (Error, Happened::Ended, Off),
            (Requested, Happened::TurnedOff, Off),
            (Active, Happened::TurnedOff, Off),
            (Error, Happened::TurnedOff, Off),
            // Nothing delivery sees turns a subscription back on.
            (Off, Happened::HandshakeDelivered, Off),
            (Off, Happened::HandshakeFailed(RETRY), Off),
            (Off, Happened::Delivered, Off),
            (Off, Happened::Failed(RETRY_IN_ERROR), Off),
            (Off, Happened::Paused, Off),
            (Off, Happened::Ended, Off),
            (Off, Happened::TurnedOff, Off),
        ];
        for (current, happened, expected) in cases {
            assert_eq!(
                next_status(current, happened),
                expected,
                "{current:?} after {happened:?}"
            );
        }
    }
}
