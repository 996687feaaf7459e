use time::macros::datetime;

use super::*;
use crate::auth::{Principal, Role};
use crate::fhir::ids::{ChangeSeq, ChannelType, Version};
use SubscriptionStatus::{Active, Error, Off, Requested};

const NOW: time::OffsetDateTime = datetime!(2026-01-01 12:00 UTC);

fn at(seconds_before_now: i64) -> StoredInstant {
    StoredInstant::at(NOW - time::Duration::seconds(seconds_before_now))
}

fn n(number: i64) -> EventNumber {
    EventNumber::new(number)
}

fn stored() -> StoredSubscription {
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
        id: SubscriptionId::parse("s1").unwrap(),
        version: Version::FIRST,
        last_updated: at(86_400),
        status: Active,
        topic_url: "http://baton.test/fhir/SubscriptionTopic/task-changed".into(),
        channel_type: ChannelType::RestHook,
        endpoint: Some("https://receiver.example.org/hook".into()),
        author: serde_json::to_value(&author).unwrap(),
        owner: author.identity(),
        resource: serde_json::json!({"resourceType": "Subscription"}),
        created_after_seq: ChangeSeq::ZERO,
        events_since_start: EventNumber::ZERO,
        delivered_through: EventNumber::ZERO,
        handshake_pending: false,
        failures: 0,
        failing_since: None,
        next_attempt_at: None,
        last_error: None,
        last_sent_at: None,
        rewinds: 0,
    }
}

type Change = fn(&mut StoredSubscription);
/// (name, what is owed, why the attempt runs, heartbeat period, what goes out)
type PayloadCase = (&'static str, Change, Attempt, Option<u32>, Option<Payload>);
/// (name, the run so far, how it stops, status written, failing since in seconds before now,
/// retry delay in seconds)
type FailureCase = (
    &'static str,
    Change,
    Stopping,
    SubscriptionStatus,
    i64,
    Option<u64>,
);

#[test]
fn what_an_attempt_sends() {
    // At most 5 events per notification.
    let cases: [PayloadCase; 11] = [
        ("nothing owed", |_| {}, Attempt::Work, Some(60), None),
        (
            "the handshake comes first",
            |s| {
                s.handshake_pending = true;
                s.events_since_start = n(3);
            },
            Attempt::Work,
            None,
            Some(Payload::Handshake),
        ),
        (
            "waiting events, up to max_count",
            |s| {
                s.delivered_through = n(3);
                s.events_since_start = n(10);
            },
            Attempt::Work,
            None,
            Some(Payload::Events {
                from: n(4),
                to: n(8),
            }),
        ),
        (
            "the last few events",
            |s| {
                s.delivered_through = n(3);
                s.events_since_start = n(5);
            },
            Attempt::Work,
            None,
            Some(Payload::Events {
                from: n(4),
                to: n(5),
            }),
        ),
        (
            "events rather than a heartbeat",
            |s| s.events_since_start = n(1),
            Attempt::Heartbeat,
            Some(60),
            Some(Payload::Events {
                from: n(1),
                to: n(1),
            }),
        ),
        (
            "a heartbeat due, nothing ever sent",
            |_| {},
            Attempt::Heartbeat,
            Some(60),
            Some(Payload::Heartbeat),
        ),
        (
            "a heartbeat due, the last notification a period ago",
            |s| s.last_sent_at = Some(at(60)),
            Attempt::Heartbeat,
            Some(60),
            Some(Payload::Heartbeat),
        ),
        (
            "a heartbeat due within the half second of slack",
            |s| {
                s.last_sent_at = Some(StoredInstant::at(
                    NOW - time::Duration::milliseconds(59_600),
                ))
            },
            Attempt::Heartbeat,
            Some(60),
            Some(Payload::Heartbeat),
        ),
        (
            "a heartbeat covered by a notification another node sent",
            |s| s.last_sent_at = Some(at(30)),
            Attempt::Heartbeat,
            Some(60),
            None,
        ),
        (
            "just inside the period",
            |s| {
                s.last_sent_at = Some(StoredInstant::at(
                    NOW - time::Duration::milliseconds(59_400),
                ))
            },
            Attempt::Heartbeat,
            Some(60),
            None,
        ),
        (
            "a work attempt sends no heartbeat",
            |s| s.last_sent_at = Some(at(600)),
            Attempt::Work,
            Some(60),
            None,
        ),
    ];
    for (name, change, attempt, period, expected) in cases {
        let mut sub = stored();
        change(&mut sub);
        assert_eq!(
            choose_payload(&sub, 5, period, attempt, NOW),
            expected,
            "{name}"
        );
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        schedule: vec![Duration::from_secs(10), Duration::from_secs(60)],
        jitter_ratio: 0.2,
        error_after_failures: 3,
        off_after: Duration::from_secs(3600),
    }
}

#[test]
fn what_a_failure_records() {
    let retry = Stopping::Retry(None);
    // Failures always count one more.
    let cases: [FailureCase; 12] = [
        ("a first failure", |_| {}, retry, Active, 0, Some(10)),
        (
            "a failed handshake is error at once",
            |s| {
                s.status = Requested;
                s.handshake_pending = true;
            },
            retry,
            Error,
            0,
            Some(10),
        ),
        (
            "a second failure keeps the run's start",
            |s| {
                s.failures = 1;
                s.failing_since = Some(at(10));
            },
            retry,
            Active,
            10,
            Some(60),
        ),
        (
            "the third failure marks error",
            |s| {
                s.failures = 2;
                s.failing_since = Some(at(70));
            },
            retry,
            Error,
            70,
            Some(60),
        ),
        (
            "the endpoint's Retry-After lengthens the delay",
            |_| {},
            Stopping::Retry(Some(Duration::from_secs(120))),
            Active,
            0,
            Some(120),
        ),
        (
            "error stays error while retrying",
            |s| {
                s.status = Error;
                s.failures = 7;
                s.failing_since = Some(at(1000));
            },
            retry,
            Error,
            1000,
            Some(60),
        ),
        (
            "error turns off past the retry horizon",
            |s| {
                s.status = Error;
                s.failures = 9;
                s.failing_since = Some(at(3541));
            },
            retry,
            Off,
            3541,
            None,
        ),
        (
            "a failed handshake past the horizon turns off",
            |s| {
                s.status = Error;
                s.handshake_pending = true;
                s.failures = 9;
                s.failing_since = Some(at(3595));
            },
            retry,
            Off,
            3595,
            None,
        ),
        (
            "a configuration that cannot serve the channel pauses it",
            |_| {},
            Stopping::Pause,
            Error,
            0,
            None,
        ),
        (
            "the end time turns it off",
            |_| {},
            Stopping::End,
            Off,
            0,
            None,
        ),
        (
            "a topic that is gone turns it off",
            |s| s.status = Requested,
            Stopping::TurnOff,
            Off,
            0,
            None,
        ),
        (
            "a failing_since that cannot be read starts a new run",
            |s| {
                s.failures = 1;
                // What a row whose text is not an instant reads back as.
                s.failing_since =
                    Some(serde_json::from_value(serde_json::json!("not an instant")).unwrap());
            },
            retry,
            Active,
            0,
            Some(60),
        ),
    ];
    for (name, change, stopping, status, since, retry) in cases {
        let mut sub = stored();
        change(&mut sub);
        let retry = retry.map(Duration::from_secs);
        // 0.5 is the centre of the jitter range: the delay is exactly the schedule's.
        let (report, decided) = failure_report(&sub, "HTTP 503", stopping, &policy(), NOW, 0.5);
        let expected = DeliveryReport::Failed {
            subscription_id: SubscriptionId::parse("s1").unwrap(),
            error: "HTTP 503".into(),
            failures: sub.failures + 1,
            failing_since: at(since),
            next_attempt_at: retry.map(|d| StoredInstant::at(NOW + d)),
            status,
        };
        assert_eq!((report, decided), (expected, retry), "{name}");
    }
}
