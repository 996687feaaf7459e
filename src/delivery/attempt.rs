//! One delivery attempt for one subscription, in stages: claim it, choose what to send, send
//! it on its channel, record the result. The attempt frees its delivery slot as soon as its
//! send is done, and records the result through the `Recorder`, which writes the results of
//! many attempts at once; the attempt ends (and its subscription may be tried again) once
//! its result is committed — or at once, for a plain websocket delivery on SQLite, which
//! runs ahead of its record (`record`).
//!
//! The attempt reads the clock at its two edges, when it starts and when a send has failed,
//! and hands the instant to the pure decisions: what to send (`choose_payload`), what a
//! failure records (`failure_report`) and the status either way (`status::next_status`).

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::field::Empty;

use super::Deliverer;
use super::dispatch::{Channel, Guarantee, Outgoing, Reach, channel_for};
use super::notify::{Notification, Payload, Subject, build};
use super::record;
use super::retry::{AfterFailure, RetryPolicy, after_failure};
use super::scheduler::{Attempt, Outcome};
use super::status::{Happened, next_status};
use crate::error::Result;
use crate::fhir::datetime::{DateKind, parse_range};
use crate::fhir::ids::{EventNumber, StoredInstant, SubscriptionId};
use crate::fhir::notification::SubscriptionStatus;
use crate::fhir::subscription::SubscriptionSpec;
use crate::store::{DeliveryReport, HandshakeOwed, StoredSubscription};
use crate::telemetry;
use crate::trace::TraceContext;

/// How long to wait before trying again after an attempt that failed inside the hub (a store
/// error, a panic) rather than at the endpoint.
pub const HUB_FAILURE_RETRY: Duration = Duration::from_secs(5);

/// One delivery attempt for one subscription.
pub async fn attempt(
    deliverer: &Deliverer,
    id: &SubscriptionId,
    attempt: Attempt,
    slot: Slot,
) -> Outcome {
    match try_attempt(deliverer, id, attempt, slot).await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::error!(subscription.id = %id, error = %crate::error::error_chain(&e), "delivery attempt failed inside the hub");
            Outcome::RetryAt(HUB_FAILURE_RETRY)
        }
    }
}

/// This node's claim on a subscription for one attempt. Recording the attempt's result ends
/// the claim in the same statement; an attempt that records nothing ends it explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    Held,
    Ended,
}

/// A failed attempt's consequence for its subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopping {
    /// The channel did not take it: retry on the schedule (`error` after repeated failures,
    /// `off` past the horizon), no sooner than the endpoint's `Retry-After`.
    Retry(Option<Duration>),
    /// The hub cannot deliver it as configured: `error` with no retry; it is tried again when
    /// it is changed, woken by new events, or the node restarts with another configuration.
    Pause,
    /// It reached its end time: `off`.
    End,
    /// Its topic or filters are gone, so it can never match again: `off`.
    TurnOff,
}

impl Stopping {
    /// The reason in `baton_subscriptions_undeliverable_total`.
    fn as_str(self) -> &'static str {
        match self {
            Stopping::Retry(_) => "retry",
            Stopping::Pause => "configuration",
            Stopping::End => "end",
            Stopping::TurnOff => "topic",
        }
    }
}

/// A subscription this node has claimed, and what the attempt's stages share.
struct Claimed<'a> {
    deliverer: &'a Deliverer,
    sub: StoredSubscription,
    claim: Claim,
    /// Released once the send is done: recording the result needs no slot.
    slot: Slot,
    /// What the channel promises: only a best-effort channel's deliveries may run ahead of
    /// their record (`record`); a confirmed channel's wait, so that a crash re-sends at most
    /// the one notification whose result was being recorded.
    guarantee: Guarantee,
    /// The AuditEvent of the send just made (a confirmed channel's, when attempts are
    /// audited), written with the attempt's result by `record`.
    audited: Option<crate::audit::AuditRecord>,
}

#[tracing::instrument(
    name = "delivery.attempt",
    skip_all,
    fields(subscription.id = %id, attempt = Empty, event.from = Empty, event.to = Empty, trace_id = Empty)
)]
async fn try_attempt(
    deliverer: &Deliverer,
    id: &SubscriptionId,
    attempt: Attempt,
    slot: Slot,
) -> Result<Outcome> {
    let default_timeout = Duration::from_secs(deliverer.config.default_timeout_seconds);
    let node = deliverer.hub.node.as_str();
    // What an earlier attempt sent ahead of its record (this node alone serves the store),
    // looked up before the row is read: the recorder forgets a position only once a record
    // reaching it has committed, so either this finds it or the row read next counts it.
    // (Looked up after the read, a commit in between would leave the row read stale and
    // the position forgotten, and the events would be sent twice.)
    let sent_ahead = deliverer.recorder.sent_through(id);
    let Some(mut sub) = deliverer
        .store
        .claim_subscription(id, node, deliverer.lease + default_timeout)
        .await?
    else {
        return Ok(match deliverer.store.read_subscription(id).await? {
            Some(sub) if sub.status != SubscriptionStatus::Off => {
                metrics::counter!("baton_delivery_claims_busy_total").increment(1);
                Outcome::Busy
            }
            _ => Outcome::Gone,
        });
    };
    // A position past the subscription's last event belongs to a deleted subscription whose
    // id was used again: it is not this one's.
    if let Some(sent) = sent_ahead
        && sent <= sub.events_since_start
    {
        sub.delivered_through = sub.delivered_through.max(sent);
    }
    let mut claimed = Claimed {
        deliverer,
        sub,
        claim: Claim::Held,
        slot,
        guarantee: Guarantee::Confirmed,
        audited: None,
    };
    let outcome = claimed.deliver(attempt, default_timeout).await;
    // Not every attempt records a result (nothing to send, a hub-side error); ending the claim
    // here then means no other node ever waits for it to expire while its holder is alive.
    if claimed.claim == Claim::Held
        && let Err(e) = deliverer.store.release_subscription(id, node).await
    {
        tracing::warn!(subscription.id = %id, error = %crate::error::error_chain(&e), "releasing a delivery claim failed; it expires by itself");
    }
    outcome
}

impl Claimed<'_> {
    /// The attempt proper, on a subscription this node has claimed.
    async fn deliver(&mut self, attempt: Attempt, default_timeout: Duration) -> Result<Outcome> {
        if self.sub.status == SubscriptionStatus::Off {
            return Ok(Outcome::Gone);
        }
        let now = time::OffsetDateTime::now_utc();
        let deliverer = self.deliverer;
        let hub = &deliverer.hub;
        let spec = match hub.spec_for_delivery(&self.sub) {
            Ok(spec) => spec,
            Err(e) => {
                let why = crate::error::error_chain(&e);
                // A channel this configuration cannot serve (plain http no longer allowed, no
                // AMQP broker): `error`, events still counted, until a configuration serves it
                // again. A topic or filter the hub no longer understands can never match: `off`.
                let stopping = match hub.spec_for_matching(&self.sub) {
                    Ok(_) => Stopping::Pause,
                    Err(_) => Stopping::TurnOff,
                };
                tracing::warn!(subscription.id = %self.sub.id, error = %why, "a stored subscription cannot be delivered with this hub's configuration");
                metrics::counter!("baton_subscriptions_undeliverable_total", "reason" => stopping.as_str()).increment(1);
                let error = format!("not deliverable with this hub's configuration: {why}");
                self.record_failure(&error, stopping, now).await?;
                return Ok(Outcome::Gone);
            }
        };
        if let Some(end) = spec
            .end
            .as_deref()
            .and_then(|e| parse_range(e, DateKind::DateTime).ok())
            && end.start <= now
        {
            self.record_failure("the subscription reached its end time", Stopping::End, now)
                .await?;
            return Ok(Outcome::Gone);
        }
        // A classic R4 ping or resource carries one event, so it goes out one at a time.
        let max_count = if spec.form.sends_requests_per_event() {
            1
        } else {
            i64::from(spec.max_count.unwrap_or(deliverer.config.default_max_count))
        };
        let Some(payload) =
            choose_payload(&self.sub, max_count, spec.heartbeat_period, attempt, now)
        else {
            return Ok(Outcome::Idle);
        };
        let span = tracing::Span::current();
        span.record("attempt", payload.notification_type().as_str());
        if let (Some(from), Some(to)) = payload.events() {
            span.record("event.from", from.get())
                .record("event.to", to.get());
        }
        let timeout = spec
            .timeout
            .map_or(default_timeout, |t| Duration::from_secs(t.into()));
        let sending = Sending {
            spec: &spec,
            payload,
            timeout,
            default_timeout,
            now,
        };
        let channel = channel_for(hub, deliverer.signals.as_ref(), &spec.channel);
        self.guarantee = channel.guarantee();
        match self.guarantee {
            Guarantee::Confirmed => self.send_confirmed(channel.as_ref(), &sending).await,
            Guarantee::BestEffort => self.offer(channel.as_ref(), &sending).await,
        }
    }

    /// Sends on a channel whose endpoint must accept the notification, and records either
    /// the delivery or the failure.
    async fn send_confirmed(
        &mut self,
        channel: &dyn Channel,
        sending: &Sending<'_>,
    ) -> Result<Outcome> {
        let deliverer = self.deliverer;
        let Sending { payload, now, .. } = *sending;
        let notification = build(&self.subject(sending)).await?;
        tracing::Span::current().record("trace_id", notification.trace.trace_id());
        if sending.timeout > sending.default_timeout {
            // The claim must outlast this subscription's longer timeout.
            deliverer
                .store
                .claim_subscription(
                    &self.sub.id,
                    &deliverer.hub.node,
                    deliverer.lease + sending.timeout,
                )
                .await?;
        }
        // What the notification carries was read from commits that may still wait for their
        // sync: nothing of it leaves the node before they are durable.
        deliverer.store.until_durable().await;
        let started = std::time::Instant::now();
        let started_at = std::time::SystemTime::now();
        let (trace, caused_by) = (notification.trace, notification.caused_by);
        let sent = channel.send(self.outgoing(sending, notification)).await;
        self.slot.release();
        let name = channel.name();
        let kind = payload.notification_type().as_str();
        metrics::histogram!("baton_delivery_seconds", "channel" => name)
            .record(started.elapsed().as_secs_f64());
        if telemetry::exporting() {
            export_attempt(AttemptSpan {
                sub: &self.sub,
                channel: name,
                payload,
                trace,
                caused_by,
                started_at,
                elapsed: started.elapsed(),
                error: sent.as_ref().err().map(|f| f.message.clone()),
            });
        }
        if deliverer.audit {
            self.audited =
                Some(self.audit_attempt(sending, name, started.elapsed(), sent.as_ref().err()));
        }
        match sent {
            Ok(_) => {
                metrics::counter!("baton_deliveries_total", "channel" => name, "type" => kind, "result" => "ok").increment(1);
                let (happened, handshake) = match payload {
                    Payload::Handshake => (Happened::HandshakeDelivered, HandshakeOwed::Settled),
                    Payload::Events { .. } | Payload::Heartbeat => {
                        (Happened::Delivered, HandshakeOwed::Unchanged)
                    }
                };
                let through = payload.through(&self.sub);
                self.record_delivered(through, handshake, happened, now)
                    .await?;
                // Events that arrived during the attempt wake the scheduler again by themselves.
                Ok(if through < self.sub.events_since_start {
                    Outcome::More
                } else {
                    Outcome::Sent
                })
            }
            Err(failure) => {
                metrics::counter!("baton_deliveries_total", "channel" => name, "type" => kind, "result" => "failed").increment(1);
                tracing::warn!(subscription.id = %self.sub.id, attempt.kind = kind, error = %failure.message, "delivery failed");
                let failed_at = time::OffsetDateTime::now_utc();
                let retry = self
                    .record_failure(
                        &failure.message,
                        Stopping::Retry(failure.retry_after),
                        failed_at,
                    )
                    .await?;
                Ok(retry.map_or(Outcome::Gone, Outcome::RetryAt))
            }
        }
    }

    /// Live, best-effort delivery (the sockets bound to a websocket subscription). With
    /// nobody listening the events are only marked as passed: a listener that comes back reads
    /// them with `$events`.
    async fn offer(&mut self, channel: &dyn Channel, sending: &Sending<'_>) -> Result<Outcome> {
        let through = sending.payload.through(&self.sub);
        let mut reach = Reach::Nobody;
        if channel.may_have_listeners(&self.sub.id) {
            let notification = build(&self.subject(sending)).await?;
            tracing::Span::current().record("trace_id", notification.trace.trace_id());
            let (trace, caused_by) = (notification.trace, notification.caused_by);
            // As for a confirmed send: only what is durable leaves the node.
            self.deliverer.store.until_durable().await;
            let started = std::time::Instant::now();
            let started_at = std::time::SystemTime::now();
            let sent = channel.send(self.outgoing(sending, notification)).await;
            if telemetry::exporting() {
                // A push to the sockets is an attempt like a POST or a publish: the same span,
                // in the trace of the change it reports.
                export_attempt(AttemptSpan {
                    sub: &self.sub,
                    channel: channel.name(),
                    payload: sending.payload,
                    trace,
                    caused_by,
                    started_at,
                    elapsed: started.elapsed(),
                    error: sent.as_ref().err().map(|f| f.message.clone()),
                });
            }
            reach = sent.unwrap_or(Reach::Nobody);
        }
        self.slot.release();
        // A heartbeat that went out is recorded too: its time tells the other nodes' heartbeat
        // timers that this period is covered.
        if through > self.sub.delivered_through || reach == Reach::Someone {
            self.record_delivered(
                through,
                HandshakeOwed::Unchanged,
                Happened::Delivered,
                sending.now,
            )
            .await?;
        }
        Ok(if through < self.sub.events_since_start {
            Outcome::More
        } else if reach == Reach::Someone {
            Outcome::Sent
        } else {
            Outcome::Idle
        })
    }

    /// The AuditEvent of a confirmed send, for the delivery ledger: `record` writes it in the
    /// same store write as the attempt's result, so it costs no write of its own.
    fn audit_attempt(
        &self,
        sending: &Sending<'_>,
        channel: &str,
        took: Duration,
        failure: Option<&crate::channels::SendError>,
    ) -> crate::audit::AuditRecord {
        let endpoint_host = match &sending.spec.channel {
            crate::fhir::subscription::ChannelSpec::RestHook { endpoint, .. } => {
                reqwest::Url::parse(endpoint)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_string))
            }
            crate::fhir::subscription::ChannelSpec::Message { endpoint } => {
                Some(endpoint.host.clone())
            }
            crate::fhir::subscription::ChannelSpec::WebSocket => None,
        };
        let events = match sending.payload.events() {
            (Some(from), Some(to)) => Some((from.get(), to.get())),
            _ => None,
        };
        let subscription = self.sub.id.to_string();
        let facts = crate::audit::DeliveryFacts {
            node: &self.deliverer.hub.node,
            subscription: &subscription,
            kind: sending.payload.notification_type().as_str(),
            events,
            channel,
            endpoint_host: endpoint_host.as_deref(),
            duration_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            error: failure.map(|f| f.message.as_str()),
        };
        crate::audit::delivery_attempt(&facts, &StoredInstant::now())
    }

    fn subject<'s>(&'s self, sending: &Sending<'s>) -> Subject<'s> {
        Subject {
            store: self.deliverer.store.as_ref(),
            base_url: &self.deliverer.hub.base_url,
            shared: &self.deliverer.hub.shared,
            sub: &self.sub,
            spec: sending.spec,
            payload: sending.payload,
            now: sending.now,
        }
    }

    fn outgoing<'s>(&'s self, sending: &Sending<'s>, notification: Notification) -> Outgoing<'s> {
        Outgoing {
            sub: &self.sub,
            spec: sending.spec,
            payload: sending.payload,
            notification,
            timeout: sending.timeout,
            now: sending.now,
        }
    }

    async fn record_delivered(
        &mut self,
        through: EventNumber,
        handshake: HandshakeOwed,
        happened: Happened,
        now: time::OffsetDateTime,
    ) -> Result<()> {
        let status = next_status(self.sub.status, happened);
        self.record(DeliveryReport::Delivered {
            subscription_id: self.sub.id.clone(),
            through,
            handshake,
            status,
            at: StoredInstant::at(now),
            rewinds: self.sub.rewinds,
        })
        .await
    }

    /// Records a failed attempt; returns when to retry, or None when there is no retry (the
    /// subscription is now off, or waits for a configuration that serves it).
    async fn record_failure(
        &mut self,
        error: &str,
        stopping: Stopping,
        now: time::OffsetDateTime,
    ) -> Result<Option<Duration>> {
        let policy = &self.deliverer.retry;
        let (report, retry) = failure_report(
            &self.sub,
            error,
            stopping,
            policy,
            now,
            rand::random::<f64>(),
        );
        self.record(report).await?;
        Ok(retry)
    }

    /// Writes the attempt's result, with its AuditEvent if it is audited, which ends the
    /// claim: waiting for it to commit, or, for a plain delivery on a best-effort channel
    /// where this node alone serves the store, running ahead of it (see `record`).
    async fn record(&mut self, report: DeliveryReport) -> Result<()> {
        let status = match &report {
            DeliveryReport::Delivered { status, .. } | DeliveryReport::Failed { status, .. } => {
                *status
            }
        };
        if status != self.sub.status {
            tracing::info!(subscription.id = %self.sub.id, from = self.sub.status.as_str(), to = status.as_str(), "subscription status changed");
        }
        let recorder = &self.deliverer.recorder;
        let audited = self.audited.take();
        if self.guarantee == Guarantee::BestEffort
            && self.deliverer.store.serves_one_node()
            && record::runs_ahead(&report, self.sub.status, self.sub.failures)
        {
            // Only a confirmed send is audited; were a best-effort one, its AuditEvent would
            // go through the audit queue rather than hold this report back.
            if let Some(audited) = audited {
                self.deliverer.hub.audits.record(audited);
            }
            recorder.record_ahead(report)?;
        } else {
            recorder.record(report, audited).await?;
        }
        self.claim = Claim::Ended;
        Ok(())
    }
}

/// What the send stage needs besides the claimed subscription.
struct Sending<'a> {
    spec: &'a SubscriptionSpec,
    payload: Payload,
    /// This subscription's timeout, or the configured default.
    timeout: Duration,
    /// The configured default timeout, which the claim already covers.
    default_timeout: Duration,
    now: time::OffsetDateTime,
}

/// What an attempt sends: the handshake while one is owed, then waiting events (at most
/// An attempt's delivery slot: released when its send is done, so that the next subscription
/// can send while this one's result is being recorded.
pub struct Slot {
    id: SubscriptionId,
    /// None once released.
    released: Option<mpsc::UnboundedSender<SubscriptionId>>,
}

impl Slot {
    /// The slot the scheduler's loop gives an attempt of `id`; releasing it tells the loop.
    pub fn new(id: SubscriptionId, released: mpsc::UnboundedSender<SubscriptionId>) -> Slot {
        Slot {
            id,
            released: Some(released),
        }
    }

    /// Frees the slot (once; later calls do nothing). The attempt still counts as its
    /// subscription's one attempt until it ends.
    pub fn release(&mut self) {
        if let Some(released) = self.released.take() {
            let _ = released.send(self.id.clone());
        }
    }
}

/// What an exported `delivery.attempt` span says.
struct AttemptSpan<'a> {
    sub: &'a StoredSubscription,
    channel: &'static str,
    payload: Payload,
    /// The span the notification was sent as (its `traceparent`).
    trace: TraceContext,
    /// The request span that made the change, when the notification continues one.
    caused_by: Option<TraceContext>,
    started_at: std::time::SystemTime,
    elapsed: Duration,
    error: Option<String>,
}

/// Exports a delivery attempt as a span of the trace of the change it reports: a client span
/// for a rest-hook POST, a producer span for a publish or a push to sockets.
fn export_attempt(span: AttemptSpan<'_>) {
    use opentelemetry::KeyValue;
    let mut attributes = vec![
        KeyValue::new("baton.subscription.id", span.sub.id.to_string()),
        KeyValue::new("baton.channel", span.channel),
        KeyValue::new(
            "baton.notification.type",
            span.payload.notification_type().as_str(),
        ),
    ];
    if let (Some(first), Some(last)) = span.payload.events() {
        attributes.push(KeyValue::new("baton.events.first", first.get()));
        attributes.push(KeyValue::new("baton.events.last", last.get()));
    }
    telemetry::export(telemetry::FinishedSpan {
        name: "delivery.attempt".into(),
        kind: if span.channel == "rest-hook" {
            opentelemetry::trace::SpanKind::Client
        } else {
            opentelemetry::trace::SpanKind::Producer
        },
        context: span.trace,
        parent: span.caused_by.map(|c| telemetry::Parent {
            span_id: c.parts().1,
            remote: false,
        }),
        start: span.started_at,
        end: span.started_at + span.elapsed,
        attributes,
        error: span.error,
    });
}

/// `max_count` per notification), else a heartbeat if one is due and nothing went out within
/// the period (in seconds); None when there is nothing to send.
fn choose_payload(
    sub: &StoredSubscription,
    max_count: i64,
    heartbeat_period: Option<u32>,
    attempt: Attempt,
    now: time::OffsetDateTime,
) -> Option<Payload> {
    if sub.handshake_pending {
        Some(Payload::Handshake)
    } else if sub.delivered_through < sub.events_since_start {
        let from = sub.delivered_through.next();
        Some(Payload::Events {
            from,
            to: from
                .saturating_add(max_count - 1)
                .min(sub.events_since_start),
        })
    } else if attempt == Attempt::Heartbeat && !sent_within_heartbeat(sub, heartbeat_period, now) {
        Some(Payload::Heartbeat)
    } else {
        None
    }
}

/// Whether a notification went out within the heartbeat period, from this node or another:
/// a heartbeat timer on one node must not add to what another node just sent.
fn sent_within_heartbeat(
    sub: &StoredSubscription,
    heartbeat_period: Option<u32>,
    now: time::OffsetDateTime,
) -> bool {
    let (Some(period), Some(last)) = (
        heartbeat_period,
        sub.last_sent_at.as_ref().and_then(StoredInstant::datetime),
    ) else {
        return false;
    };
    // A little slack, so timers that fire on the dot are not skipped for a few milliseconds.
    now - last < time::Duration::seconds(i64::from(period)) - time::Duration::milliseconds(500)
}

/// What a failed attempt records, and when to retry (None: no retry). `random_unit` is the
/// retry jitter's draw, passed in so tests can fix it.
fn failure_report(
    sub: &StoredSubscription,
    error: &str,
    stopping: Stopping,
    policy: &RetryPolicy,
    now: time::OffsetDateTime,
    random_unit: f64,
) -> (DeliveryReport, Option<Duration>) {
    let failing_since = sub
        .failing_since
        .as_ref()
        .and_then(StoredInstant::datetime)
        .unwrap_or(now);
    let failures = sub.failures + 1;
    let failing_for = Duration::try_from(now - failing_since).unwrap_or_default();
    let (happened, retry) = match stopping {
        Stopping::Retry(retry_after) => {
            let decision = after_failure(
                policy,
                failures as u32,
                failing_for,
                retry_after,
                random_unit,
            );
            let retry = match decision {
                AfterFailure::RetryAt { delay, .. } => Some(delay),
                AfterFailure::TurnOff => None,
            };
            let happened = if sub.handshake_pending {
                Happened::HandshakeFailed(decision)
            } else {
                Happened::Failed(decision)
            };
            (happened, retry)
        }
        Stopping::Pause => (Happened::Paused, None),
        Stopping::End => (Happened::Ended, None),
        Stopping::TurnOff => (Happened::TurnedOff, None),
    };
    let report = DeliveryReport::Failed {
        subscription_id: sub.id.clone(),
        error: error.to_string(),
        failures,
        failing_since: StoredInstant::at(failing_since),
        next_attempt_at: retry.map(|delay| StoredInstant::at(now + delay)),
        status: next_status(sub.status, happened),
    };
    (report, retry)
}

#[cfg(test)]
mod tests;
