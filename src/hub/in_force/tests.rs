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
        scopes: None,
        patient: None,
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
        rewinds: 0,
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

/// Clears the matching form of the given rows, as if they were written before the column
/// existed (the store's API always writes one).
pub(crate) type ClearForms = Box<
    dyn Fn(Vec<SubscriptionId>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
>;

/// The scenario of `start_up_from_the_store_puts_in_force_what_one_by_one_does`, for any store.
pub(crate) async fn start_up_puts_in_force_what_one_by_one_does(
    store: Arc<dyn crate::store::Store>,
    clear_forms: ClearForms,
) {
    use crate::auth::Identity;
    use crate::fhir::interaction::Interaction;
    use crate::fhir::search::index_task;
    use crate::matcher::{Change, Side};
    use crate::outbox::tests::{BASE, subscription};

    let (reference, _) = Hub::for_tests(BASE, "reference");
    let mut cleared = Vec::new();
    let mut ids = Vec::new();
    for i in 0..60u32 {
        let filter = match i % 6 {
            0 => None,
            1 => Some(format!("Task?owner=Practitioner/{}", i % 4)),
            2 => Some("Task?owner=Practitioner/1,Practitioner/2&status=requested".into()),
            3 => Some("Task?status=requested".into()),
            4 => Some("Task?status:not=completed".into()),
            _ => Some("Task?code=http://sys|a".into()),
        };
        let mut record = subscription(filter.as_deref());
        let topic = if i % 11 == 5 {
            format!("{BASE}/SubscriptionTopic/no-such-topic")
        } else {
            format!("{BASE}/SubscriptionTopic/task-changed")
        };
        record.resource["criteria"] = json!(topic);
        record.topic_url = topic.clone();
        if i % 7 == 3 {
            record.resource["channel"]["endpoint"] = json!("http://receiver.test/hook");
            record.endpoint = Some("http://receiver.test/hook".into());
        }
        if i % 5 == 0 {
            record.resource["channel"]["extension"] = json!([{
                "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period",
                "valueUnsignedInt": 60,
            }]);
        }
        if i % 3 != 0 {
            let author = Principal {
                issuer: None,
                subject: format!("practitioner:Practitioner/{}", i % 4),
                role: Role::Practitioner,
                fhir_user: Some(format!("Practitioner/{}", i % 4)),
                performer_types: Vec::new(),
                scopes: None,
                patient: None,
            };
            record.author = serde_json::to_value(&author).unwrap();
            record.owner = Identity {
                issuer: None,
                subject: author.subject.clone(),
                role: Role::Practitioner,
                fhir_user: author.fhir_user.clone(),
            };
        }
        record.status = match i % 10 {
            9 => SubscriptionStatus::Off,
            8 => SubscriptionStatus::Requested,
            _ => SubscriptionStatus::Active,
        };
        record.resource["status"] = json!(record.status.as_str());
        // The form the hub writes; one naming the topic for a topic it does not have.
        let spec = |hub: &Hub, resource: &Value| {
            hub.parse_stored(resource)
                .ok()
                .and_then(|parsed| parsed.for_matching().ok())
        };
        let current = match spec(&reference, &record.resource) {
            Some(spec) => MatchingForm::of(&spec),
            None => MatchingForm {
                v: form::FORMAT,
                topic,
                filters: filter.into_iter().collect(),
                heartbeat: None,
                http: false,
                amqp: false,
            },
        };
        record.matching = match i % 8 {
            2 => json!({"v": form::FORMAT + 1, "topic": "written by a later version"}).to_string(),
            6 => "not a form".into(),
            _ => current.to_text(),
        };
        let id = store.create_subscription(record).await.unwrap().id;
        if i % 4 == 3 {
            cleared.push(id.clone());
        }
        ids.push(id);
    }
    clear_forms(cleared).await;

    // One by one, from each stored row, as `put_in_force` takes a subscription at start-up.
    let (one_by_one, mut told_one_by_one) = Hub::for_tests(BASE, "one-by-one");
    for id in &ids {
        let stored = store.read_subscription(id).await.unwrap().unwrap();
        if stored.status != SubscriptionStatus::Off {
            one_by_one.put_in_force(&stored, Occasion::StartUp);
        }
    }
    // In pages of 7, on an empty index, then again on the full one (which replaces each).
    let (paged, mut told_paged) = Hub::for_tests(BASE, "paged");
    let paged = Arc::new(paged);
    paged
        .put_live_in_force_in_pages(store.as_ref(), 7)
        .await
        .unwrap();
    let sorted = |commands: &mut Commands| {
        let mut told: Vec<String> = sent(commands).iter().map(|c| format!("{c:?}")).collect();
        told.sort();
        told
    };
    let told = sorted(&mut told_one_by_one);
    assert!(!told.is_empty(), "some rows cannot be delivered here");
    assert_eq!(sorted(&mut told_paged), told, "the scheduler");
    let sorted_heartbeats = |hub: &Hub| {
        let mut heartbeats = hub.heartbeats();
        heartbeats.sort();
        heartbeats
    };
    assert!(!sorted_heartbeats(&one_by_one).is_empty());
    assert_eq!(sorted_heartbeats(&paged), sorted_heartbeats(&one_by_one));
    assert_eq!(paged.specs.len(), 0, "nothing cached");

    let same_matches = |what: &str| {
        let expected = one_by_one.index.read().unwrap();
        let index = paged.index.read().unwrap();
        assert_eq!(index.len(), expected.len(), "{what}");
        assert!(expected.len() > 20, "{what}: most rows are in force");
        let mut heard = 0;
        for owner in [None, Some(0), Some(1), Some(2), Some(3)] {
            for status in ["requested", "completed"] {
                for code in ["a", "b"] {
                    let mut task = json!({"resourceType": "Task", "id": "t1", "status": status,
                        "intent": "order", "code": {"coding": [{"system": "http://sys", "code": code}]},
                        "meta": {"lastUpdated": "2026-01-01T00:00:00.000Z"}});
                    if let Some(owner) = owner {
                        task["owner"] = json!({"reference": format!("Practitioner/{owner}")});
                    }
                    let task_index = index_task(&task, BASE);
                    let change = Change {
                        seq: ChangeSeq::new(1_000_000),
                        interaction: Interaction::Update,
                        previous: None,
                        current: Some(Side {
                            resource: &task,
                            index: &task_index,
                        }),
                    };
                    let matched = |index: &crate::matcher::SubscriptionIndex| {
                        let mut ids = index.match_change(&one_by_one.topics, &change, BASE);
                        ids.sort();
                        ids
                    };
                    let want = matched(&expected);
                    heard += want.len();
                    assert_eq!(matched(&index), want, "{what}: {task}");
                }
            }
        }
        assert!(heard > 0, "{what}: the Tasks tried are heard");
    };
    same_matches("start-up");
    paged
        .put_live_in_force_in_pages(store.as_ref(), 7)
        .await
        .unwrap();
    same_matches("start-up again, on a full index");
    assert_eq!(sorted_heartbeats(&paged), sorted_heartbeats(&one_by_one));

    // Every live row whose resource names a topic of this hub now has a current form: the
    // rows without one, or with a form of another version, had theirs derived and written.
    let live = store.live_subscription_page(None, 1000).await.unwrap();
    assert_eq!(live.len(), 54, "the off rows are not read");
    for row in live {
        let stored = store.read_subscription(&row.id).await.unwrap().unwrap();
        let form = row.matching.as_deref().and_then(MatchingForm::read);
        let spec = reference
            .parse_stored(&stored.resource)
            .ok()
            .and_then(|parsed| parsed.for_matching().ok());
        match spec {
            Some(spec) => assert_eq!(form, Some(MatchingForm::of(&spec)), "{}", row.id),
            None => assert!(
                form.is_none_or(|form| form.topic.ends_with("/no-such-topic")),
                "{}",
                row.id
            ),
        }
    }
}

/// Start-up from a SQLite store (its one-pass read on a connection of its own) puts in force
/// exactly what putting each stored subscription in force one by one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_from_the_store_puts_in_force_what_one_by_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.db");
    let store = crate::outbox::tests::open_sqlite(&path).await;
    let clear_forms: ClearForms = Box::new(move |ids| {
        let path = path.clone();
        Box::pin(async move {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            for id in ids {
                conn.execute(
                    "UPDATE subscription SET matching = NULL WHERE id = ?",
                    [id.as_str()],
                )
                .unwrap();
            }
        })
    });
    start_up_puts_in_force_what_one_by_one_does(store.clone(), clear_forms).await;
    store.close().await;
}
