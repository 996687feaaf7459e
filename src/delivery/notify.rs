//! Building a notification: what it carries, its body and message id, and the read rule applied
//! once more to each event as it goes out.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::auth::{self, Principal, Reader};
use crate::error::Result;
use crate::fhir::datetime::format_instant;
use crate::fhir::ids::{EventNumber, TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::fhir::notification::{
    ContentLevel, NotificationEvent, NotificationType, StatusSnapshot, SubscriptionStatus,
    event_entry_bytes, notification_bundle_bytes,
};
use crate::fhir::subscription::{ChannelSpec, ClassicPayload, SubscriptionForm, SubscriptionSpec};
use crate::hub::{EntryKey, SharedParts};
use crate::store::{EventRecord, Store, StoredSubscription};
use crate::trace::TraceContext;

/// What a notification carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Handshake,
    Events { from: EventNumber, to: EventNumber },
    Heartbeat,
}

impl Payload {
    pub fn notification_type(self) -> NotificationType {
        match self {
            Payload::Handshake => NotificationType::Handshake,
            Payload::Events { .. } => NotificationType::EventNotification,
            Payload::Heartbeat => NotificationType::Heartbeat,
        }
    }

    /// The first and last event numbers carried, if any.
    pub fn events(self) -> (Option<EventNumber>, Option<EventNumber>) {
        match self {
            Payload::Events { from, to } => (Some(from), Some(to)),
            Payload::Handshake | Payload::Heartbeat => (None, None),
        }
    }

    /// The highest event number delivered once this has gone out: its last event, or the
    /// current `delivered_through` for handshakes and heartbeats.
    pub fn through(self, sub: &StoredSubscription) -> EventNumber {
        match self {
            Payload::Events { to, .. } => to,
            Payload::Handshake | Payload::Heartbeat => sub.delivered_through,
        }
    }
}

/// A notification ready to send.
pub struct Notification {
    /// The Bundle, as JSON.
    pub body: Vec<u8>,
    /// The same for every copy of the same notification, so endpoints can drop duplicates:
    /// handshakes per subscription version, events per range, heartbeats each new.
    pub message_id: String,
    /// What the notification continues: the trace of the request that made its first event's
    /// change, else a trace of its own. Sent on as a `traceparent` header.
    pub trace: TraceContext,
    /// The span that made the change `trace` continues (the request's), if any.
    pub caused_by: Option<TraceContext>,
    /// How a classic R4 notification that is not a Bundle goes out (None: `body` is the
    /// notification Bundle).
    pub classic: Option<ClassicCall>,
}

/// One classic R4 notification (`SubscriptionForm::sends_requests_per_event`): one event, sent
/// as R4 and HAPI FHIR send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClassicCall {
    /// A POST with no body to the endpoint (no `channel.payload`); `ping <id>` on a socket.
    Ping,
    /// A PUT of the Task (the body) to `{endpoint}/Task/{id}`.
    Put(TaskId),
    /// A DELETE of `{endpoint}/Task/{id}`: the Task was deleted.
    Delete(TaskId),
    /// Nothing goes out: the read rule withheld the event at send time.
    Withheld,
}

/// What a notification is about, and when it is made.
pub struct Subject<'a> {
    pub store: &'a dyn Store,
    /// The FHIR base URL, for the Bundle's references and the read rule.
    pub base_url: &'a str,
    /// The Task versions and event entries every notification about the same change shares.
    pub shared: &'a SharedParts,
    pub sub: &'a StoredSubscription,
    pub spec: &'a SubscriptionSpec,
    pub payload: Payload,
    pub now: time::OffsetDateTime,
}

/// Builds the notification body and its message id.
///
/// What depends on the subscription is made here: which events it gets (its own event
/// numbers, and the read rule applied for its author) and its status `Parameters`. What does
/// not — each event's Task version and its serialised Bundle entry — comes from the hub's
/// shared parts, loaded and built once per change by whichever notification needed it first.
/// The bytes are those `notification_bundle` would give (`fhir::notification`'s tests hold
/// it).
pub async fn build(subject: &Subject<'_>) -> Result<Notification> {
    let Subject {
        store,
        base_url,
        shared,
        sub,
        spec,
        payload,
        now,
    } = *subject;
    let author: Option<Principal> = serde_json::from_value(sub.author.clone()).ok();
    let (events, message_id) = match payload {
        Payload::Handshake => (Vec::new(), format!("{}-handshake-{}", sub.id, sub.version)),
        Payload::Heartbeat => (
            Vec::new(),
            format!("{}-heartbeat-{}", sub.id, uuid::Uuid::new_v4()),
        ),
        Payload::Events { from, to } => {
            let records = store.subscription_events(&sub.id, from, to).await?;
            (records, format!("{}-events-{from}-{to}", sub.id))
        }
    };
    // The Task versions serve the resource a full-resource notification carries and the read
    // rule. An author who reads every Task (admin, auditor) of an id-only or empty
    // notification needs neither: the events go out without loading a version, however far
    // behind the shared parts this subscription is.
    let versions = if spec.content != ContentLevel::FullResource
        && author.as_ref().map(Reader::of) == Some(Reader::Everything)
    {
        HashMap::new()
    } else {
        load_shared_versions(store, Some(shared), &events, spec.content).await?
    };
    let notification_events = readable_events(&events, &versions, author.as_ref(), base_url);
    if spec.form.sends_requests_per_event() {
        return Ok(classic_notification(
            sub,
            spec,
            &events,
            &notification_events,
            message_id,
        ));
    }
    let status = StatusSnapshot {
        subscription_id: &sub.id,
        topic_url: &sub.topic_url,
        status: if matches!(payload, Payload::Handshake) {
            sub.status
        } else if sub.status == SubscriptionStatus::Requested {
            SubscriptionStatus::Active
        } else {
            sub.status
        },
        events_since_start: sub.events_since_start,
        notification_type: payload.notification_type(),
        error: None,
        last_delivered: None,
    };
    let content = spec.content;
    let entries: Vec<Arc<[u8]>> = notification_events
        .iter()
        .map(|event| {
            let key = EntryKey {
                task_id: event.task_id.clone(),
                version: event.version,
                interaction: event.interaction,
                content,
                with_resource: event.resource.is_some(),
            };
            shared.entry(key, || event_entry_bytes(base_url, event, content))
        })
        .collect();
    let entries: Vec<&[u8]> = entries.iter().map(|e| &e[..]).collect();
    let body = notification_bundle_bytes(
        base_url,
        &uuid::Uuid::new_v4().to_string(),
        &format_instant(now),
        &uuid::Uuid::new_v4().to_string(),
        &status,
        &notification_events,
        content,
        &entries,
    );
    // A span of its own in the trace of the change it reports, or a trace of its own.
    let caused_by = events
        .iter()
        .find_map(|e| e.traceparent.as_deref().and_then(TraceContext::parse));
    let trace = caused_by.map_or_else(TraceContext::new_root, |change| change.child());
    Ok(Notification {
        body,
        message_id,
        trace,
        caused_by,
        classic: None,
    })
}

/// A classic R4 notification of one event (the attempt asks for one at a time): a ping, or
/// the Task put or deleted at `{endpoint}/Task/{id}`; on a socket, `ping <id>` whatever the
/// payload (R4's websocket protocol has nothing else).
fn classic_notification(
    sub: &StoredSubscription,
    spec: &SubscriptionSpec,
    events: &[EventRecord],
    readable: &[NotificationEvent<'_>],
    message_id: String,
) -> Notification {
    let caused_by = events
        .iter()
        .find_map(|e| e.traceparent.as_deref().and_then(TraceContext::parse));
    let trace = caused_by.map_or_else(TraceContext::new_root, |change| change.child());
    let websocket = matches!(spec.channel, ChannelSpec::WebSocket);
    let (call, body) = match (readable.first(), spec.form) {
        (None, _) => (ClassicCall::Withheld, Vec::new()),
        (Some(_), _) if websocket => (ClassicCall::Ping, format!("ping {}", sub.id).into_bytes()),
        (Some(event), SubscriptionForm::Classic(ClassicPayload::Resource)) => {
            match (event.interaction, event.resource) {
                (Interaction::Delete, _) => {
                    (ClassicCall::Delete(event.task_id.clone()), Vec::new())
                }
                (_, Some(resource)) => (
                    ClassicCall::Put(event.task_id.clone()),
                    serde_json::to_vec(resource).unwrap_or_default(),
                ),
                // The version is gone (pruned with its Task): nothing left to put.
                (_, None) => (ClassicCall::Withheld, Vec::new()),
            }
        }
        (Some(_), _) => (ClassicCall::Ping, Vec::new()),
    };
    Notification {
        body,
        message_id,
        trace,
        caused_by,
        classic: Some(call),
    }
}

/// The exact Task versions a batch of events is about, unless the content level needs none
/// (for `$events`, whose old events the shared parts would not hold).
pub async fn load_versions(
    store: &dyn Store,
    events: &[EventRecord],
    content: ContentLevel,
) -> Result<HashMap<(TaskId, Version), Arc<Value>>> {
    load_shared_versions(store, None, events, content).await
}

/// `load_versions`, taking what `shared` holds and loading only the rest from the store (in
/// one read), which it then keeps for the other subscriptions hearing of the same changes.
async fn load_shared_versions(
    store: &dyn Store,
    shared: Option<&SharedParts>,
    events: &[EventRecord],
    content: ContentLevel,
) -> Result<HashMap<(TaskId, Version), Arc<Value>>> {
    if content == ContentLevel::Empty || events.is_empty() {
        return Ok(HashMap::new());
    }
    let mut found = HashMap::with_capacity(events.len());
    let mut missing: Vec<(TaskId, Version)> = Vec::new();
    for event in events {
        let key = (event.task_id.clone(), event.version);
        if found.contains_key(&key) {
            continue;
        }
        match shared.and_then(|shared| shared.version(&key)) {
            Some(resource) => {
                found.insert(key, resource);
            }
            None => missing.push(key),
        }
    }
    if !missing.is_empty() {
        for version in store.versions(&missing).await? {
            if let Some(resource) = version.resource {
                let key = (version.id, version.version);
                let resource = Arc::new(resource);
                if let Some(shared) = shared {
                    shared.keep_version(key.clone(), resource.clone());
                }
                found.insert(key, resource);
            }
        }
    }
    Ok(found)
}

/// The events of a notification, with the read rule applied once more when it is sent or
/// replayed: an event whose Task version the author may not read is left out altogether
/// (its number is then missing from the Bundle, never its content disclosed). Matching
/// already applied the same rule to the same version, so this only bites if the rule or the
/// author's rights changed in between. Deletes carry no content and pass.
pub fn readable_events<'a>(
    events: &'a [EventRecord],
    versions: &'a HashMap<(TaskId, Version), Arc<Value>>,
    author: Option<&Principal>,
    base_url: &str,
) -> Vec<NotificationEvent<'a>> {
    let Some(author) = author else {
        return Vec::new();
    };
    events
        .iter()
        .filter_map(|e| {
            let resource = versions.get(&(e.task_id.clone(), e.version)).map(|r| &**r);
            if resource.is_some_and(|r| !auth::may_read_task(author, r, base_url)) {
                metrics::counter!("baton_events_withheld_total").increment(1);
                return None;
            }
            Some(NotificationEvent {
                event_number: e.event_number,
                timestamp: &e.occurred_at,
                task_id: &e.task_id,
                version: e.version,
                interaction: e.interaction,
                resource,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::fhir::ids::{ChangeSeq, StoredInstant};
    use crate::fhir::interaction::Interaction;
    use serde_json::json;

    fn task_id(id: &str) -> TaskId {
        TaskId::parse(id).unwrap()
    }

    fn event(number: i64, task: &str, interaction: Interaction) -> EventRecord {
        EventRecord {
            event_number: EventNumber::new(number),
            change_seq: ChangeSeq::new(number),
            task_id: task_id(task),
            version: Version::FIRST,
            interaction,
            occurred_at: StoredInstant::parse("2026-01-01T00:00:00.000Z").unwrap(),
            traceparent: None,
        }
    }

    #[test]
    fn events_the_author_may_not_read_are_left_out_at_send_time() {
        let alice = Principal {
            issuer: None,
            subject: "Practitioner/alice".into(),
            role: Role::Practitioner,
            fhir_user: Some("Practitioner/alice".into()),
            performer_types: Vec::new(),
            scopes: None,
            patient: None,
        };
        let owned_by = |owner: &str| json!({"resourceType": "Task", "status": "requested", "intent": "order", "owner": {"reference": owner}});
        let events = vec![
            event(1, "mine", Interaction::Update),
            event(2, "theirs", Interaction::Update),
            event(3, "gone", Interaction::Delete),
        ];
        let versions = HashMap::from([
            (
                (task_id("mine"), Version::FIRST),
                Arc::new(owned_by("Practitioner/alice")),
            ),
            (
                (task_id("theirs"), Version::FIRST),
                Arc::new(owned_by("Practitioner/bob")),
            ),
        ]);
        let kept: Vec<i64> = readable_events(&events, &versions, Some(&alice), "http://h/fhir")
            .iter()
            .map(|e| e.event_number.get())
            .collect();
        assert_eq!(
            kept,
            [1, 3],
            "bob's Task is withheld; a delete carries nothing to withhold"
        );
        assert!(
            readable_events(&events, &versions, None, "http://h/fhir").is_empty(),
            "no author, nothing"
        );
    }
}
