//! The subscription write rules against an in-memory `SubscriptionTx`: what each write reads
//! and writes, in order, without a database. The stores' own tests and the integration suite
//! (`tests/identity.rs` for the quota) hold the SQL.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde_json::json;

use super::*;
use crate::auth::Role;
use crate::fhir::ids::EventNumber;

/// One statement the rules asked of the backend, with its ids and versions as bare values.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    LoadForReplace(String),
    /// The turn taken, numbered from 1.
    Turn(u32),
    CountLive(String),
    LastChangeSeq,
    Insert {
        turn: u32,
    },
    Update {
        turn: u32,
        version: i64,
        failures: Failures,
    },
    Reload(String),
    DeleteRow(String),
    DeleteEvents(String),
    NoteDeletion {
        id: String,
        turn: u32,
    },
}

/// A backend that keeps subscriptions in memory and records each statement asked of it.
#[derive(Default)]
struct Fake {
    subscriptions: BTreeMap<String, StoredSubscription>,
    /// Event log rows per subscription id.
    events: BTreeMap<String, usize>,
    turns: u32,
    last_seq: i64,
    steps: Vec<Step>,
}

impl Fake {
    fn with(subscriptions: impl IntoIterator<Item = StoredSubscription>) -> Fake {
        Fake {
            subscriptions: subscriptions
                .into_iter()
                .map(|s| (s.id.to_string(), s))
                .collect(),
            ..Fake::default()
        }
    }

    /// The statements that wrote, in order.
    fn writes(&self) -> Vec<&Step> {
        self.steps
            .iter()
            .filter(|s| {
                matches!(
                    s,
                    Step::Insert { .. }
                        | Step::Update { .. }
                        | Step::DeleteRow(_)
                        | Step::DeleteEvents(_)
                        | Step::NoteDeletion { .. }
                )
            })
            .collect()
    }

    fn counted(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::CountLive(_)))
    }
}

impl SubscriptionTx for Fake {
    type Turn = u32;

    async fn load_for_replace(
        &mut self,
        id: &SubscriptionId,
    ) -> Result<Option<StoredSubscription>> {
        self.steps.push(Step::LoadForReplace(id.to_string()));
        Ok(self.subscriptions.get(id.as_str()).cloned())
    }

    async fn take_turn(&mut self) -> Result<u32> {
        self.turns += 1;
        self.steps.push(Step::Turn(self.turns));
        Ok(self.turns)
    }

    async fn count_live(&mut self, owner: &Identity) -> Result<i64> {
        self.steps.push(Step::CountLive(owner.subject.clone()));
        let live = self
            .subscriptions
            .values()
            .filter(|s| &s.owner == owner && s.status != SubscriptionStatus::Off)
            .count();
        Ok(live as i64)
    }

    async fn last_change_seq(&mut self) -> Result<ChangeSeq> {
        self.steps.push(Step::LastChangeSeq);
        Ok(ChangeSeq::new(self.last_seq))
    }

    async fn insert(&mut self, row: &NewSubscription<'_>, turn: u32) -> Result<()> {
        self.steps.push(Step::Insert { turn });
        let c = &row.columns;
        let stored = StoredSubscription {
            owner: row.owner.clone(),
            created_after_seq: row.created_after_seq,
            events_since_start: EventNumber::ZERO,
            delivered_through: EventNumber::ZERO,
            failures: 0,
            failing_since: None,
            next_attempt_at: None,
            last_error: None,
            last_sent_at: None,
            rewinds: 0,
            ..from_columns(c)
        };
        self.subscriptions.insert(stored.id.to_string(), stored);
        Ok(())
    }

    async fn update(&mut self, row: &SubscriptionUpdate<'_>, turn: u32) -> Result<()> {
        let c = &row.columns;
        self.steps.push(Step::Update {
            turn,
            version: c.version.get(),
            failures: row.failures,
        });
        let current = self.subscriptions.get_mut(c.id.as_str()).unwrap();
        let delivery = current.clone();
        *current = StoredSubscription {
            owner: delivery.owner.clone(),
            created_after_seq: delivery.created_after_seq,
            events_since_start: delivery.events_since_start,
            delivered_through: delivery.delivered_through,
            last_error: delivery.last_error.clone(),
            last_sent_at: delivery.last_sent_at.clone(),
            rewinds: delivery.rewinds,
            ..from_columns(c)
        };
        if row.failures == Failures::Kept {
            current.failures = delivery.failures;
            current.failing_since = delivery.failing_since;
            current.next_attempt_at = delivery.next_attempt_at;
        }
        Ok(())
    }

    async fn reload(&mut self, id: &SubscriptionId) -> Result<Option<StoredSubscription>> {
        self.steps.push(Step::Reload(id.to_string()));
        Ok(self.subscriptions.get(id.as_str()).cloned())
    }

    async fn delete_row(&mut self, id: &SubscriptionId) -> Result<bool> {
        self.steps.push(Step::DeleteRow(id.to_string()));
        Ok(self.subscriptions.remove(id.as_str()).is_some())
    }

    async fn delete_events(&mut self, id: &SubscriptionId) -> Result<()> {
        self.steps.push(Step::DeleteEvents(id.to_string()));
        self.events.remove(id.as_str());
        Ok(())
    }

    async fn note_deletion(&mut self, id: &SubscriptionId, turn: u32) -> Result<()> {
        self.steps.push(Step::NoteDeletion {
            id: id.to_string(),
            turn,
        });
        Ok(())
    }
}

/// A stored subscription with the written columns and no delivery state.
fn from_columns(c: &SubscriptionColumns<'_>) -> StoredSubscription {
    StoredSubscription {
        id: c.id.clone(),
        version: c.version,
        last_updated: c.last_updated.clone(),
        status: c.status,
        topic_url: c.topic_url.to_string(),
        channel_type: c.channel_type,
        endpoint: c.endpoint.map(str::to_string),
        author: serde_json::from_str(c.author).unwrap(),
        owner: identity("nobody"),
        resource: serde_json::from_str(c.resource).unwrap(),
        created_after_seq: ChangeSeq::ZERO,
        events_since_start: EventNumber::ZERO,
        delivered_through: EventNumber::ZERO,
        handshake_pending: c.handshake_pending,
        failures: 0,
        failing_since: None,
        next_attempt_at: None,
        last_error: None,
        last_sent_at: None,
        rewinds: 0,
    }
}

fn identity(subject: &str) -> Identity {
    Identity {
        issuer: None,
        subject: subject.to_string(),
        role: Role::Practitioner,
        fhir_user: Some(format!("Practitioner/{subject}")),
    }
}

/// What the API hands the store: a rest-hook subscription by `subject`, owing a handshake
/// unless it is `off`.
fn record(subject: &str, status: SubscriptionStatus, quota: Option<usize>) -> SubscriptionRecord {
    SubscriptionRecord {
        resource: json!({
            "resourceType": "Subscription", "status": "requested", "reason": "test",
            "criteria": "http://baton.test/SubscriptionTopic/task-changed",
            "channel": { "type": "rest-hook", "endpoint": "https://example.org/hook" },
        }),
        status,
        topic_url: "http://baton.test/SubscriptionTopic/task-changed".into(),
        channel_type: ChannelType::RestHook,
        endpoint: Some("https://example.org/hook".into()),
        author: json!({ "sub": subject }),
        owner: identity(subject),
        handshake_pending: status != SubscriptionStatus::Off,
        matching: format!(
            r#"{{"v":1,"topic":"http://baton.test/SubscriptionTopic/task-changed","filters":["owner={subject}"]}}"#
        ),
        live_quota: quota,
    }
}

/// A stored subscription of `subject` at `version`, with a delivery history: events
/// numbered and delivered, and failures on record.
fn stored(id: &str, subject: &str, version: i64, status: SubscriptionStatus) -> StoredSubscription {
    StoredSubscription {
        id: sid(id),
        version: Version::new(version),
        last_updated: instant("2024-01-01T00:00:00Z"),
        status,
        topic_url: "http://baton.test/SubscriptionTopic/task-changed".into(),
        channel_type: ChannelType::RestHook,
        endpoint: Some("https://example.org/hook".into()),
        author: json!({ "sub": subject }),
        owner: identity(subject),
        resource: json!({ "resourceType": "Subscription", "id": id }),
        created_after_seq: ChangeSeq::new(5),
        events_since_start: EventNumber::new(9),
        delivered_through: EventNumber::new(7),
        handshake_pending: false,
        failures: 3,
        failing_since: Some(instant("2024-01-01T00:00:00Z")),
        next_attempt_at: Some(instant("2024-01-01T00:05:00Z")),
        last_error: Some("503".into()),
        last_sent_at: Some(instant("2024-01-01T00:00:00Z")),
        rewinds: 0,
    }
}

fn sid(id: &str) -> SubscriptionId {
    SubscriptionId::parse(id).unwrap()
}

fn instant(text: &str) -> StoredInstant {
    StoredInstant::parse(text).unwrap()
}

/// `count` live subscriptions of `subject`.
fn live(subject: &str, count: usize) -> Vec<StoredSubscription> {
    (0..count)
        .map(|n| {
            stored(
                &format!("{subject}-{n}"),
                subject,
                1,
                SubscriptionStatus::Active,
            )
        })
        .collect()
}

fn status_of<T>(outcome: &Result<T>) -> Option<StatusCode> {
    outcome.as_ref().err().map(Error::status)
}

/// The decision a replace makes: the record it is given, whatever the stored subscription.
fn replace_with(record: SubscriptionRecord) -> SubscriptionDecide {
    Box::new(move |_| Ok(record))
}

/// A create takes its turn, counts the author's live subscriptions only when it takes a live
/// slot under a quota, and is refused with nothing written when the author holds the quota.
#[tokio::test]
async fn a_create_is_counted_against_its_authors_quota() {
    use SubscriptionStatus::{Active, Off, Requested};
    #[rustfmt::skip]
    let cases = [
        ("no quota, nothing counted", None, 5, Requested, false, None),
        ("under the quota", Some(2), 1, Requested, true, None),
        ("a websocket subscription, active at once, counts too", Some(2), 1, Active, true, None),
        ("at the quota", Some(2), 2, Requested, true, Some(StatusCode::TOO_MANY_REQUESTS)),
        ("past the quota", Some(2), 3, Active, true, Some(StatusCode::TOO_MANY_REQUESTS)),
        ("an off subscription takes no slot", Some(2), 2, Off, false, None),
    ];
    for (name, quota, held, status, counts, error) in cases {
        let mut tx = Fake::with(live("alice", held));
        // Another author's subscriptions do not count against alice.
        tx.subscriptions
            .extend(live("bob", 3).into_iter().map(|s| (s.id.to_string(), s)));
        let outcome = create(&mut tx, record("alice", status, quota)).await;
        assert_eq!(status_of(&outcome), error, "{name}");
        assert_eq!(tx.counted(), counts, "{name}");
        assert_eq!(tx.steps[0], Step::Turn(1), "{name}: the turn comes first");
        match outcome {
            Ok(created) => assert_eq!(
                tx.writes(),
                [&Step::Insert { turn: 1 }],
                "{name}: {created:?}"
            ),
            Err(_) => assert!(tx.writes().is_empty(), "{name}: nothing written"),
        }
    }
}

/// A create stamps the resource (id, version 1, status), keeps the author's identity and
/// starts after every change already committed.
#[tokio::test]
async fn a_create_stamps_the_resource_and_records_its_owner() {
    let mut tx = Fake {
        last_seq: 41,
        ..Fake::default()
    };
    let created = create(
        &mut tx,
        record("alice", SubscriptionStatus::Requested, Some(3)),
    )
    .await
    .unwrap();
    assert_eq!(
        tx.steps,
        [
            Step::Turn(1),
            Step::CountLive("alice".into()),
            Step::LastChangeSeq,
            Step::Insert { turn: 1 },
            Step::Reload(created.id.to_string()),
        ]
    );
    assert!(
        uuid::Uuid::parse_str(created.id.as_str()).is_ok(),
        "{}",
        created.id
    );
    assert_eq!(created.version, Version::FIRST);
    assert_eq!(created.resource["id"], created.id.as_str());
    assert_eq!(created.resource["meta"]["versionId"], "1");
    assert_eq!(
        created.resource["meta"]["lastUpdated"],
        created.last_updated.as_str()
    );
    assert_eq!(created.resource["status"], "requested");
    assert_eq!(created.owner, identity("alice"));
    assert_eq!(created.author, json!({ "sub": "alice" }));
    assert_eq!(created.created_after_seq, ChangeSeq::new(41));
    assert!(created.handshake_pending);
}

/// A replace bumps the version and stamps the resource; it is counted against the quota only
/// when it takes a new live slot (turning an `off` subscription back on), and a subscription
/// owing a handshake starts a fresh run without its failures.
#[tokio::test]
async fn a_replace_bumps_the_version_and_counts_a_reactivation() {
    use SubscriptionStatus::{Active, Error as Failing, Off, Requested};
    struct Case {
        name: &'static str,
        before: SubscriptionStatus,
        after: SubscriptionStatus,
        /// Other live subscriptions of the same owner.
        held: usize,
        counts: bool,
        failures: Failures,
        error: Option<StatusCode>,
    }
    let case = |name, before, after, held, counts, failures, error| Case {
        name,
        before,
        after,
        held,
        counts,
        failures,
        error,
    };
    use Failures::{Cleared, Kept};
    #[rustfmt::skip]
    let cases = [
        case("active, updated: a handshake again, at the quota", Active, Requested, 2, false, Cleared, None),
        case("error back to requested: a fresh run", Failing, Requested, 2, false, Cleared, None),
        case("turned off", Active, Off, 2, false, Kept, None),
        case("a websocket stays active: no handshake, failures kept", Active, Active, 2, false,
            Kept, None),
        case("off stays off", Off, Off, 2, false, Kept, None),
        case("off back on, under the quota", Off, Requested, 1, true, Cleared, None),
        case("off back on, at the quota", Off, Requested, 2, true, Cleared,
            Some(StatusCode::TOO_MANY_REQUESTS)),
        case("off back on as a websocket, at the quota", Off, Active, 2, true, Kept,
            Some(StatusCode::TOO_MANY_REQUESTS)),
    ];
    for Case {
        name,
        before,
        after,
        held,
        counts,
        failures,
        error,
    } in cases
    {
        let mut tx = Fake::with(live("alice", held));
        tx.subscriptions
            .insert("s".into(), stored("s", "alice", 3, before));
        let mut next = record("alice", after, Some(2));
        // A websocket subscription is active at once and owes no handshake.
        next.handshake_pending = after == Requested;
        let outcome = replace(&mut tx, &sid("s"), replace_with(next)).await;
        assert_eq!(status_of(&outcome), error, "{name}");
        assert_eq!(tx.counted(), counts, "{name}");
        let Ok(replaced) = outcome else {
            assert!(tx.writes().is_empty(), "{name}: nothing written");
            assert_eq!(tx.subscriptions["s"].version, Version::new(3), "{name}");
            continue;
        };
        assert_eq!(
            tx.writes(),
            [&Step::Update {
                turn: 1,
                version: 4,
                failures
            }],
            "{name}"
        );
        assert_eq!(replaced.version, Version::new(4), "{name}");
        assert_eq!(replaced.resource["id"], "s", "{name}");
        assert_eq!(replaced.resource["meta"]["versionId"], "4", "{name}");
        assert_eq!(replaced.resource["status"], after.as_str(), "{name}");
        assert_eq!(replaced.status, after, "{name}");
        // The event counters and the delivered position are the subscription's queue.
        assert_eq!(
            (replaced.events_since_start, replaced.delivered_through),
            (EventNumber::new(9), EventNumber::new(7)),
            "{name}"
        );
        let failures_left = (replaced.failures, replaced.next_attempt_at.is_some());
        match failures {
            Cleared => assert_eq!(failures_left, (0, false), "{name}"),
            Kept => assert_eq!(failures_left, (3, true), "{name}"),
        }
    }
}

/// A replace keeps the owner it was created with, whoever the record names, and counts the
/// quota against that owner.
#[tokio::test]
async fn a_replace_keeps_the_owner() {
    let mut tx = Fake::with(live("alice", 2));
    tx.subscriptions
        .insert("s".into(), stored("s", "alice", 1, SubscriptionStatus::Off));
    // An admin turns alice's subscription back on; the record names the admin.
    let mut next = record("admin", SubscriptionStatus::Requested, Some(5));
    next.author = json!({ "sub": "admin" });
    let replaced = replace(&mut tx, &sid("s"), replace_with(next))
        .await
        .unwrap();
    assert!(tx.steps.contains(&Step::CountLive("alice".into())));
    assert_eq!(replaced.owner, identity("alice"));
    // The author's principal is what the decision chose (the API keeps the stored one unless
    // the author itself updates).
    assert_eq!(replaced.author, json!({ "sub": "admin" }));
}

/// A replace of a subscription that does not exist is a 404, and a refused decision writes
/// nothing; neither takes a turn.
#[tokio::test]
async fn a_refused_or_missing_replace_writes_nothing() {
    let refuse: SubscriptionDecide =
        Box::new(|_| Err(Error::precondition_failed("stale If-Match")));
    #[rustfmt::skip]
    let cases: [(&str, Option<StoredSubscription>, SubscriptionDecide, StatusCode); 2] = [
        ("missing", None, replace_with(record("alice", SubscriptionStatus::Requested, None)),
            StatusCode::NOT_FOUND),
        ("refused", Some(stored("s", "alice", 2, SubscriptionStatus::Active)), refuse,
            StatusCode::PRECONDITION_FAILED),
    ];
    for (name, current, decide, status) in cases {
        let mut tx = Fake::with(current);
        let outcome = replace(&mut tx, &sid("s"), decide).await;
        assert_eq!(status_of(&outcome), Some(status), "{name}");
        assert_eq!(tx.steps, [Step::LoadForReplace("s".into())], "{name}");
    }
}

/// A delete removes the row, then its event log, then records the deletion in turn; a
/// subscription that does not exist is left at that.
#[tokio::test]
async fn a_delete_takes_the_event_log_and_is_noted_in_turn() {
    let mut tx = Fake::with([stored("s", "alice", 2, SubscriptionStatus::Active)]);
    tx.events.insert("s".into(), 9);
    assert!(delete(&mut tx, &sid("s")).await.unwrap());
    assert_eq!(
        tx.steps,
        [
            Step::DeleteRow("s".into()),
            Step::DeleteEvents("s".into()),
            Step::Turn(1),
            Step::NoteDeletion {
                id: "s".into(),
                turn: 1
            },
        ]
    );
    assert!(tx.events.is_empty() && tx.subscriptions.is_empty());

    let mut tx = Fake::default();
    assert!(!delete(&mut tx, &sid("s")).await.unwrap());
    assert_eq!(tx.steps, [Step::DeleteRow("s".into())]);
}

/// Which writes take a new live slot.
#[test]
fn live_slots() {
    use SubscriptionStatus::{Active, Error as Failing, Off, Requested};
    #[rustfmt::skip]
    let cases = [
        (None, Requested, true), (None, Active, true), (None, Off, false),
        (Some(Off), Requested, true), (Some(Off), Active, true), (Some(Off), Off, false),
        (Some(Active), Requested, false), (Some(Failing), Requested, false),
        (Some(Requested), Off, false),
    ];
    for (before, after, takes) in cases {
        assert_eq!(
            takes_live_slot(before, after),
            takes,
            "{before:?} -> {after:?}"
        );
    }
}
