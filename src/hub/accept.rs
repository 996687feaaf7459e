//! Accepting a client's Subscription: whether this hub can deliver to it, and the record the
//! store keeps of it.

use serde_json::Value;

use super::Hub;
use crate::auth::{Principal, Role};
use crate::error::{Error, Result};
use crate::fhir::notification::SubscriptionStatus;
use crate::fhir::subscription::{ChannelSpec, SubscriptionSpec};
use crate::store::SubscriptionRecord;

impl Hub {
    /// Checks what this version of the hub can deliver, and the endpoint policy.
    pub async fn check_deliverable(&self, spec: &SubscriptionSpec) -> Result<()> {
        match &spec.channel {
            ChannelSpec::RestHook { endpoint, .. } => self
                .rest_hook
                .check_endpoint(endpoint)
                .await
                .map_err(|why| Error::invalid("Subscription.channel.endpoint", why)),
            ChannelSpec::WebSocket => Ok(()),
            ChannelSpec::Message { endpoint } => match &self.amqp {
                Some(amqp) => amqp
                    .check_endpoint(endpoint)
                    .map_err(|why| Error::invalid("Subscription.channel.endpoint", why)),
                None => Err(Error::not_supported(
                    "the message (AMQP) channel is not configured on this hub",
                )
                .at("Subscription.channel.type")),
            },
        }
    }
}

/// The most live subscriptions an author with this role may hold, given
/// `limits.subscriptions_per_author`: admins (placer systems, integration engines) have no
/// quota, nor does anyone when the limit is 0.
pub fn live_quota(limit: usize, role: Role) -> Option<usize> {
    (role != Role::Admin && limit > 0).then_some(limit)
}

/// What the store keeps of a subscription a client sent: its status to start with, the
/// columns searched and compared, and whether a handshake is owed.
pub fn record_for(
    spec: &SubscriptionSpec,
    resource: Value,
    author: &Principal,
    live_quota: Option<usize>,
) -> SubscriptionRecord {
    let off = spec.requested_status == SubscriptionStatus::Off;
    // rest-hook and message subscriptions start `requested` and become `active` after the
    // handshake; a websocket subscription is active at once and handshakes on each bind. A
    // classic R4 subscription has no handshake (R4 defines none): the hub sets it `active` as
    // soon as it is stored, as HAPI FHIR does, and a failing endpoint then moves it to `error`
    // through the retry policy like any other.
    let immediate = matches!(spec.channel, ChannelSpec::WebSocket) || spec.form.is_classic();
    let status = match (off, immediate) {
        (true, _) => SubscriptionStatus::Off,
        (false, true) => SubscriptionStatus::Active,
        (false, false) => SubscriptionStatus::Requested,
    };
    SubscriptionRecord {
        resource,
        status,
        topic_url: spec.topic_url.clone(),
        channel_type: spec.channel.channel_type(),
        endpoint: match &spec.channel {
            ChannelSpec::RestHook { endpoint, .. } => Some(endpoint.clone()),
            _ => None,
        },
        author: serde_json::to_value(author).unwrap_or(Value::Null),
        owner: author.identity(),
        handshake_pending: !off && !immediate,
        matching: super::MatchingForm::of(spec).to_text(),
        live_quota,
    }
}
