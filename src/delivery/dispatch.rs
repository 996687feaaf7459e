//! Channel dispatch: each kind of channel is one implementation of [`Channel`], and
//! [`channel_for`] is where a subscription's channel finds its implementation. The attempt
//! only asks a channel for its name and its guarantee and hands it the notification; adding a
//! channel means one new implementation and one line here.

use std::time::Duration;

use async_trait::async_trait;

use super::notify::{ClassicCall, Notification, Payload};
use crate::channels::SendError;
use crate::channels::amqp::{AmqpMessage, AmqpPublisher};
use crate::channels::rest_hook::{self, RestHook};
use crate::channels::signature::parse_secret;
use crate::fhir::ids::SubscriptionId;
use crate::fhir::subscription::{AmqpEndpoint, ChannelSpec, SubscriptionSpec};
use crate::hub::Hub;
use crate::signals::Signals;
use crate::store::StoredSubscription;

/// How a channel takes a notification, which decides what the attempt records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarantee {
    /// An endpoint must accept it (a 2xx answer, a broker's confirm); a failure is retried on
    /// the schedule and counts towards `error` and `off`.
    Confirmed,
    /// Live and best effort: handed to whoever listens now, never retried. What nobody heard
    /// is still in `$events`.
    BestEffort,
}

/// Whether a notification may have reached anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Nobody,
    Someone,
}

/// One notification on its way out.
pub struct Outgoing<'a> {
    pub sub: &'a StoredSubscription,
    pub spec: &'a SubscriptionSpec,
    pub payload: Payload,
    pub notification: Notification,
    /// How long a confirmed channel waits for the endpoint.
    pub timeout: Duration,
    pub now: time::OffsetDateTime,
}

/// A way for a notification to leave the hub.
#[async_trait]
pub trait Channel: Send + Sync {
    /// The channel's name in metrics.
    fn name(&self) -> &'static str;

    fn guarantee(&self) -> Guarantee;

    /// Whether anyone may take a notification now. A best-effort channel's notification is
    /// built only when someone may; a confirmed channel always has its endpoint.
    fn may_have_listeners(&self, _subscription: &SubscriptionId) -> bool {
        true
    }

    /// Sends one notification. A confirmed channel answers once its endpoint has it.
    async fn send(&self, out: Outgoing<'_>) -> Result<Reach, SendError>;
}

/// The implementation serving a subscription's channel.
pub fn channel_for<'a>(
    hub: &'a Hub,
    signals: &'a dyn Signals,
    channel: &'a ChannelSpec,
) -> Box<dyn Channel + 'a> {
    match channel {
        ChannelSpec::RestHook { endpoint, headers } => Box::new(RestHookTo {
            client: &hub.rest_hook,
            endpoint,
            headers,
        }),
        ChannelSpec::Message { endpoint } => Box::new(MessageTo {
            publisher: hub.amqp.as_ref(),
            endpoint,
        }),
        ChannelSpec::WebSocket => Box::new(Sockets { signals }),
    }
}

/// An HTTP POST to the subscription's endpoint, signed when it has a secret.
struct RestHookTo<'a> {
    client: &'a RestHook,
    endpoint: &'a str,
    headers: &'a [(String, String)],
}

#[async_trait]
impl Channel for RestHookTo<'_> {
    fn name(&self) -> &'static str {
        "rest-hook"
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::Confirmed
    }

    async fn send(&self, out: Outgoing<'_>) -> Result<Reach, SendError> {
        let secret = out.spec.signing_secret.as_deref().and_then(parse_secret);
        // A classic R4 notification: a ping without a body, or the Task put to or deleted
        // from `{endpoint}/Task/{id}` (R4's rest-hook rule, as HAPI FHIR sends it).
        let (method, endpoint, content_type) = match &out.notification.classic {
            None => (
                reqwest::Method::POST,
                self.endpoint.to_string(),
                Some(out.spec.content_type.as_str()),
            ),
            Some(ClassicCall::Withheld) => return Ok(Reach::Nobody),
            Some(ClassicCall::Ping) => (reqwest::Method::POST, self.endpoint.to_string(), None),
            Some(ClassicCall::Put(id)) => (
                reqwest::Method::PUT,
                resource_url(self.endpoint, id.as_str())?,
                Some(out.spec.content_type.as_str()),
            ),
            Some(ClassicCall::Delete(id)) => (
                reqwest::Method::DELETE,
                resource_url(self.endpoint, id.as_str())?,
                None,
            ),
        };
        self.client
            .send(
                rest_hook::Outgoing {
                    method,
                    endpoint: &endpoint,
                    content_type,
                    headers: self.headers,
                    body: out.notification.body,
                    message_id: &out.notification.message_id,
                    secret: secret.as_deref(),
                    timeout: out.timeout,
                    traceparent: &out.notification.trace.header(),
                },
                out.now.unix_timestamp(),
            )
            .await
            .map(|()| Reach::Someone)
    }
}

/// `{endpoint}/Task/{id}`: the Task's URL on the subscriber's FHIR base, with the endpoint's
/// query string kept.
fn resource_url(endpoint: &str, id: &str) -> Result<String, SendError> {
    let mut url = reqwest::Url::parse(endpoint).map_err(|_| SendError {
        message: "the endpoint is not a valid URL".into(),
        retry_after: None,
    })?;
    url.path_segments_mut()
        .map_err(|()| SendError {
            message: "the endpoint cannot be a FHIR base".into(),
            retry_after: None,
        })?
        .pop_if_empty()
        .push("Task")
        .push(id);
    Ok(url.into())
}

/// A persistent, mandatory publish to an exchange on the hub's broker, with a confirm.
struct MessageTo<'a> {
    /// None on a hub whose configuration lost the broker since the subscription was stored.
    publisher: Option<&'a AmqpPublisher>,
    endpoint: &'a AmqpEndpoint,
}

#[async_trait]
impl Channel for MessageTo<'_> {
    fn name(&self) -> &'static str {
        "message"
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::Confirmed
    }

    async fn send(&self, out: Outgoing<'_>) -> Result<Reach, SendError> {
        let Some(amqp) = self.publisher else {
            return Err(SendError {
                message: "the message (AMQP) channel is not configured on this hub".into(),
                retry_after: None,
            });
        };
        let (first_event, last_event) = out.payload.events();
        amqp.publish(
            self.endpoint,
            AmqpMessage {
                body: &out.notification.body,
                content_type: &out.spec.content_type,
                message_id: &out.notification.message_id,
                subscription_id: &out.sub.id,
                notification_type: out.payload.notification_type().as_str(),
                first_event,
                last_event,
                events_since_start: out.sub.events_since_start,
                timestamp_secs: out.now.unix_timestamp().max(0) as u64,
                traceparent: Some(&out.notification.trace.header()),
            },
            out.timeout,
        )
        .await
        .map(|()| Reach::Someone)
    }
}

/// The sockets bound to the subscription, on this node or (through the signals) another.
/// The registry queues without waiting, and closes a socket that cannot take the notification.
struct Sockets<'a> {
    signals: &'a dyn Signals,
}

#[async_trait]
impl Channel for Sockets<'_> {
    fn name(&self) -> &'static str {
        "websocket"
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::BestEffort
    }

    fn may_have_listeners(&self, subscription: &SubscriptionId) -> bool {
        self.signals.may_have_listeners(subscription)
    }

    async fn send(&self, out: Outgoing<'_>) -> Result<Reach, SendError> {
        if out.notification.classic == Some(ClassicCall::Withheld) {
            return Ok(Reach::Nobody);
        }
        let text = String::from_utf8(out.notification.body).unwrap_or_default();
        let took = self.signals.push_websocket(&out.sub.id, &text);
        let kind = out.payload.notification_type().as_str();
        metrics::counter!("baton_deliveries_total", "channel" => "websocket", "type" => kind, "result" => "ok")
            .increment(took as u64);
        // In a cluster the sockets may be on other nodes, reached through Redis.
        Ok(if took > 0 || self.signals.redis_state() == Some("ok") {
            Reach::Someone
        } else {
            Reach::Nobody
        })
    }
}

#[cfg(test)]
mod tests {
    use super::resource_url;

    #[test]
    fn a_classic_resource_goes_to_the_task_url_on_the_endpoint_base() {
        let cases = [
            (
                "https://r.example.org/fhir",
                "https://r.example.org/fhir/Task/t1",
            ),
            (
                "https://r.example.org/fhir/",
                "https://r.example.org/fhir/Task/t1",
            ),
            ("https://r.example.org", "https://r.example.org/Task/t1"),
            (
                "https://r.example.org/fhir?tenant=7",
                "https://r.example.org/fhir/Task/t1?tenant=7",
            ),
            (
                "http://127.0.0.1:9/a/b/?x=1&y=2",
                "http://127.0.0.1:9/a/b/Task/t1?x=1&y=2",
            ),
        ];
        for (endpoint, expected) in cases {
            assert_eq!(
                resource_url(endpoint, "t1").unwrap(),
                expected,
                "{endpoint}"
            );
        }
        assert!(resource_url("not a url", "t1").is_err());
    }
}
