use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::super::{Command, Commands, Hub, InForce, Occasion};
use super::{MatchingForm, form};
use crate::auth::{Principal, Role};
use crate::fhir::ids::{
    ChangeSeq, ChannelType, EventNumber, StoredInstant, SubscriptionId, Version,
};
use crate::fhir::notification::SubscriptionStatus;
use crate::store::{MatchingFormRow, StoredSubscription};

const BASE: &str = "http://hub.test/fhir";
const ID: &str = "s1";

fn id() -> SubscriptionId {
    SubscriptionId::parse(ID).unwrap()
}

/// A hub that allows neither plain http endpoints nor AMQP, and its scheduler's inbox.
fn hub() -> (Hub, Commands) {
    Hub::for_tests(BASE, "test-node")
}

/// What a stored subscription's resource says.
#[derive(Debug, Clone, Copy)]
enum Resource {
    /// Deliverable here, with a heartbeat every 60 s.
    Deliverable,
    /// Understood for matching, but its plain http endpoint is not allowed here.
    HttpEndpoint,
    /// Names a topic this hub does not have.
    UnknownTopic,
}

fn resource(kind: Resource) -> Value {
    let (criteria, endpoint) = match kind {
        Resource::Deliverable => ("task-changed", "https://receiver.test/hook"),
        Resource::HttpEndpoint => ("task-changed", "http://receiver.test/hook"),
        Resource::UnknownTopic => ("no-such-topic", "https://receiver.test/hook"),
    };
    json!({
        "resourceType": "Subscription",
        "id": ID,
        "status": "requested",
        "reason": "unit test",
        "criteria": format!("{BASE}/SubscriptionTopic/{criteria}"),
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "extension": [{
                "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period",
                "valueUnsignedInt": 60,
            }],
        },
    })
}

fn stored(version: i64, status: SubscriptionStatus, kind: Resource) -> StoredSubscription {
    let author = Principal {
        issuer: None,
        subject: "practitioner:Practitioner/1".into(),
        role: Role::Practitioner,
        fhir_user: Some("Practitioner/1".into()),
        performer_types: Vec::new(),
    };
    StoredSubscription {
        id: id(),
        version: Version::new(version),
        last_updated: StoredInstant::parse("2026-01-01T00:00:00.000Z").unwrap(),
        status,
        topic_url: format!("{BASE}/SubscriptionTopic/task-changed"),
        channel_type: ChannelType::RestHook,
        endpoint: None,
        author: serde_json::to_value(&author).unwrap(),
        owner: author.identity(),
        resource: resource(kind),
        created_after_seq: ChangeSeq::ZERO,
        events_since_start: EventNumber::ZERO,
        delivered_through: EventNumber::ZERO,
        handshake_pending: true,
        failures: 0,
        failing_since: None,
        next_attempt_at: None,
        last_error: None,
        last_sent_at: None,
    }
}

fn sent(commands: &mut Commands) -> Vec<Command> {
    std::iter::from_fn(|| commands.try_recv().ok()).collect()
}

#[test]
fn a_subscription_is_in_force_unless_off_or_not_understood() {
    use Occasion::{CatchUp, StartUp, Written};
    use Resource::{Deliverable, HttpEndpoint, UnknownTopic};
    use SubscriptionStatus::{Active, Error, Off, Requested};
    let heartbeat = || Command::Heartbeat(id(), Some(Duration::from_secs(60)));
    let changed = || Command::Changed(id());
    let forget = || Command::Forget(id());
    let wake = || Command::Wake(id());
    // (status, resource, occasion, where it stands, what the scheduler is told)
    let table = [
        (
            Active,
            Deliverable,
            Written,
            InForce::Indexed,
            vec![heartbeat(), changed()],
        ),
        (
            Requested,
            Deliverable,
            Written,
            InForce::Indexed,
            vec![heartbeat(), changed()],
        ),
        (
            Error,
            Deliverable,
            Written,
            InForce::Indexed,
            vec![heartbeat(), changed()],
        ),
        (
            Off,
            Deliverable,
            Written,
            InForce::Withdrawn,
            vec![forget()],
        ),
        (
            Active,
            UnknownTopic,
            Written,
            InForce::Withdrawn,
            vec![forget()],
        ),
        // Matched, and delivery records why it cannot send.
        (
            Error,
            HttpEndpoint,
            Written,
            InForce::Indexed,
            vec![heartbeat(), changed()],
        ),
        // At start-up the scheduler loads its own work; only what cannot be delivered here is
        // woken, so that its attempt says why.
        (Active, Deliverable, StartUp, InForce::Indexed, vec![]),
        (
            Requested,
            HttpEndpoint,
            StartUp,
            InForce::Indexed,
            vec![wake()],
        ),
        (
            Active,
            UnknownTopic,
            StartUp,
            InForce::Withdrawn,
            vec![wake()],
        ),
        // Catching up touches the index only.
        (Requested, Deliverable, CatchUp, InForce::Indexed, vec![]),
        (Error, HttpEndpoint, CatchUp, InForce::Indexed, vec![]),
        (Off, Deliverable, CatchUp, InForce::Withdrawn, vec![]),
        (Active, UnknownTopic, CatchUp, InForce::Withdrawn, vec![]),
    ];
    for (status, kind, occasion, expected, told) in table {
        let (hub, mut commands) = hub();
        // Version 1 was in force: version 2 replaces it, or withdrawing takes it out.
        hub.put_in_force(&stored(1, Active, Deliverable), CatchUp);
        assert!(hub.index.read().unwrap().contains(&id()));
        let case = format!("{status:?} {kind:?} {occasion:?}");
        assert_eq!(
            hub.put_in_force(&stored(2, status, kind), occasion),
            expected,
            "{case}"
        );
        assert_eq!(
            hub.index.read().unwrap().contains(&id()),
            expected == InForce::Indexed,
            "{case}: the matcher index"
        );
        assert_eq!(sent(&mut commands), told, "{case}: the scheduler");
    }
}

#[test]
fn a_withdrawn_subscription_is_parsed_afresh() {
    let (hub, _commands) = hub();
    let first = stored(1, SubscriptionStatus::Active, Resource::Deliverable);
    let spec = hub.spec_for_delivery(&first).unwrap();
    assert!(
        Arc::ptr_eq(&spec, &hub.spec_for_matching(&first).unwrap()),
        "one parse serves matching and delivery"
    );
    hub.withdraw(&id(), Occasion::Written);
    assert!(
        !Arc::ptr_eq(&spec, &hub.spec_for_delivery(&first).unwrap()),
        "deleted: forgotten"
    );
    // Version 2 moved to a plain http endpoint: matched still, not delivered to.
    let second = stored(2, SubscriptionStatus::Active, Resource::HttpEndpoint);
    assert!(hub.spec_for_matching(&second).is_ok());
    let refusal = hub.spec_for_delivery(&second).unwrap_err();
    assert!(
        refusal.to_string().contains("https"),
        "the refusal says why: {refusal}"
    );
}

/// Start-up's page at a time gives, for each subscription, what `put_in_force` with
/// `Occasion::StartUp` gives: the same index, the same scheduler commands, the heartbeat kept
/// for the scheduler's start, and no spec left in the cache. So it does whether the row comes
/// with its matching form (as written with the resource; for a topic that is gone, a form
/// naming it) or only with its resource (a row written before the form existed), whose form
/// it then derives for the store to write back.
#[test]
fn a_start_up_page_puts_in_force_what_start_up_one_by_one_does() {
    use Resource::{Deliverable, HttpEndpoint, UnknownTopic};
    use SubscriptionStatus::{Active, Error, Off, Requested};
    for status in [Active, Requested, Error, Off] {
        for kind in [Deliverable, HttpEndpoint, UnknownTopic] {
            let row = stored(3, status, kind);
            let (one_by_one, mut told_one_by_one) = hub();
            let expected = one_by_one.put_in_force(&row, Occasion::StartUp);
            let told_expected = sent(&mut told_one_by_one);
            let form = match one_by_one.spec_for_matching(&row) {
                Ok(spec) => MatchingForm::of(&spec),
                Err(_) => MatchingForm {
                    v: form::FORMAT,
                    topic: format!("{BASE}/SubscriptionTopic/no-such-topic"),
                    filters: vec!["owner=Practitioner/1".into()],
                    heartbeat: Some(60),
                    http: false,
                    amqp: false,
                },
            };
            for with_form in [true, false] {
                let case = format!("{status:?} {kind:?}, form: {with_form}");
                let (paged, mut told_paged) = hub();
                let live = crate::store::LiveSubscription {
                    id: row.id.clone(),
                    version: row.version,
                    status: row.status,
                    author: row.author.to_string(),
                    matching: with_form.then(|| form.to_text()),
                    resource: (!with_form).then(|| row.resource.to_string()),
                    created_after_seq: row.created_after_seq,
                };
                let derived = paged.put_in_force_at_start_up(&[live]).unwrap();
                assert_eq!(
                    paged.index.read().unwrap().contains(&id()),
                    expected == InForce::Indexed,
                    "{case}: the matcher index"
                );
                assert_eq!(
                    sent(&mut told_paged),
                    told_expected,
                    "{case}: the scheduler"
                );
                assert_eq!(paged.heartbeats(), one_by_one.heartbeats(), "{case}");
                let heartbeat = status != Off && !matches!(kind, UnknownTopic);
                assert_eq!(
                    paged.heartbeats(),
                    if heartbeat { vec![(id(), 60)] } else { vec![] },
                    "{case}"
                );
                assert_eq!(paged.specs.len(), 0, "{case}: nothing cached");
                let expected_derived = match (with_form, kind) {
                    (false, Deliverable | HttpEndpoint) => vec![MatchingFormRow {
                        id: id(),
                        version: Version::new(3),
                        matching: form.to_text(),
                    }],
                    _ => vec![],
                };
                assert_eq!(derived, expected_derived, "{case}: the forms to write back");
            }
        }
    }
}

/// A form read at start-up gives the index the filters of the resource it was made from.
#[test]
fn a_subscription_in_force_from_its_form_matches_what_its_resource_matches() {
    use crate::fhir::interaction::Interaction;
    use crate::fhir::search::index_task;
    use crate::matcher::{Change, Side};
    let mut row = stored(1, SubscriptionStatus::Active, Resource::Deliverable);
    row.resource["_criteria"] = json!({"extension": [{
        "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
        "valueString": "Task?status=requested",
    }]});
    let (written, _c1) = hub();
    written.put_in_force(&row, Occasion::Written);
    let (started, _c2) = hub();
    let form = MatchingForm::of(&written.spec_for_matching(&row).unwrap());
    assert_eq!(form.filters, ["Task?status=requested"]);
    let live = crate::store::LiveSubscription {
        id: row.id.clone(),
        version: row.version,
        status: row.status,
        author: row.author.to_string(),
        matching: Some(form.to_text()),
        resource: None,
        created_after_seq: row.created_after_seq,
    };
    started.put_in_force_at_start_up(&[live]).unwrap();
    for (status, heard) in [("requested", true), ("completed", false)] {
        let task = json!({"resourceType": "Task", "id": "t1", "status": status, "intent": "order",
            "owner": {"reference": "Practitioner/1"}, "meta": {"lastUpdated": "2026-01-01T00:00:00.000Z"}});
        let index = index_task(&task, BASE);
        let change = Change {
            seq: ChangeSeq::new(1),
            interaction: Interaction::Update,
            previous: None,
            current: Some(Side {
                resource: &task,
                index: &index,
            }),
        };
        for hub in [&written, &started] {
            let matched = hub
                .index
                .read()
                .unwrap()
                .match_change(&hub.topics, &change, BASE);
            assert_eq!(matched == [id()], heard, "{status}");
        }
    }
}
