//! How long the matcher takes to find the subscriptions one Task change must be told to, and
//! whether that cost stays flat as the number of subscriptions grows.
//!
//! Each index holds N subscriptions that each filter on their own owner
//! (`owner=Practitioner/{i}`), five catch-alls without filters and five on
//! `status=in-progress`, all on one topic. The change is an update of a Task owned by
//! `Practitioner/42` from `accepted` to `in-progress`, so it must match exactly eleven
//! subscriptions whatever N is: Practitioner/42's own, the catch-alls and the status ones.
//!
//! Run with `cargo bench --bench matching -- --warm-up-time 1 --measurement-time 3`.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::time::Instant;

use baton::auth::{Principal, Role};
use baton::fhir::ids::{ChangeSeq, SubscriptionId};
use baton::fhir::interaction::Interaction;
use baton::fhir::search::{
    Handling, Predicate, SearchLimits, SystemMatch, TaskIndex, TokenValue, index_task, parse_query,
};
use baton::matcher::topic::{Topic, builtin_topics};
use baton::matcher::{Candidate, Change, Side, SubscriptionIndex};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

const BASE: &str = "https://hub.example.org/fhir";

/// The index sizes measured: a small deployment, a large one, and a stress case.
const SIZES: &[usize] = &[10, 10_000, 1_000_000];

/// The topics measured: one whose trigger evaluates FHIRPath on both versions, and one that
/// fires on every change.
const TOPICS: &[&str] = &["task-status-changed", "task-changed"];

/// Owner subscriptions are numbered from here, so that even the smallest index holds the
/// subscription of Practitioner/42, the owner of the changed Task, and every size does the
/// same matching work.
const FIRST_PRACTITIONER: usize = 40;
const TASK_OWNER: usize = 42;

const CATCH_ALLS: usize = 5;
const STATUS_SUBSCRIPTIONS: usize = 5;

/// The outbox position of the measured change; every subscription predates it.
const CHANGE_SEQ: ChangeSeq = ChangeSeq::new(1_000);

/// A subscription id shaped like the UUIDs the API assigns, so that the index's memory is
/// representative.
fn subscription_id(kind: u8, n: usize) -> SubscriptionId {
    SubscriptionId::parse(&format!("00000000-0000-4000-8{kind:03x}-{n:012}")).expect("an id")
}

fn admin() -> Principal {
    Principal {
        issuer: None,
        subject: "admin@hub.example.org".to_string(),
        role: Role::Admin,
        fhir_user: None,
        performer_types: vec![],
        scopes: None,
        patient: None,
    }
}

/// A practitioner watching their own Tasks, the usual author of an owner subscription; the
/// read rule then has to compare the Task's owner with the author.
fn practitioner(n: usize) -> Principal {
    Principal {
        issuer: None,
        subject: format!("practitioner-{n}"),
        role: Role::Practitioner,
        fhir_user: Some(format!("Practitioner/{n}")),
        performer_types: vec![],
        scopes: None,
        patient: None,
    }
}

/// `owner=Practitioner/{n}` built directly: parsing a million query strings would dominate
/// the set-up. `check_owner_filter` proves it is what the API's parser produces.
fn owner_filter(n: usize) -> Predicate {
    Predicate::Token {
        param: "owner",
        negated: false,
        any_of: vec![TokenValue {
            system: SystemMatch::Any,
            code: Some(format!("Practitioner/{n}")),
        }],
    }
}

/// The filters the API builds from a subscription criteria query such as `status=completed`.
fn parse_filters(param: &str, value: &str) -> Vec<Predicate> {
    let pairs = [(param.to_string(), value.to_string())];
    let limits = SearchLimits {
        default_count: 50,
        max_count: 1000,
        default_total: baton::fhir::search::TotalMode::Accurate,
    };
    parse_query(&pairs, &limits, BASE, Handling::Strict)
        .expect("a valid filter")
        .predicates
}

fn check_owner_filter() {
    for n in [FIRST_PRACTITIONER, TASK_OWNER, 999_999] {
        assert_eq!(
            parse_filters("owner", &format!("Practitioner/{n}")),
            vec![owner_filter(n)],
            "the hand-built owner filter must equal the parsed one"
        );
    }
}

/// The index for one topic: `owners` owner subscriptions, the catch-alls and the status ones.
fn build_index(topic: usize, owners: usize) -> SubscriptionIndex {
    let mut index = SubscriptionIndex::default();
    for n in FIRST_PRACTITIONER..FIRST_PRACTITIONER + owners {
        index.insert(Candidate {
            id: subscription_id(1, n),
            topic,
            filters: vec![owner_filter(n)],
            author: practitioner(n),
            created_after_seq: ChangeSeq::ZERO,
        });
    }
    for n in 0..CATCH_ALLS {
        index.insert(Candidate {
            id: subscription_id(2, n),
            topic,
            filters: vec![],
            author: admin(),
            created_after_seq: ChangeSeq::ZERO,
        });
    }
    let in_progress = parse_filters("status", "in-progress");
    for n in 0..STATUS_SUBSCRIPTIONS {
        index.insert(Candidate {
            id: subscription_id(3, n),
            topic,
            filters: in_progress.clone(),
            author: admin(),
            created_after_seq: ChangeSeq::ZERO,
        });
    }
    index
}

/// The ids the change must match, whatever the index size.
fn expected_matches() -> BTreeSet<SubscriptionId> {
    let mut ids = BTreeSet::from([subscription_id(1, TASK_OWNER)]);
    ids.extend((0..CATCH_ALLS).map(|n| subscription_id(2, n)));
    ids.extend((0..STATUS_SUBSCRIPTIONS).map(|n| subscription_id(3, n)));
    ids
}

/// A realistic Task in one of its versions.
fn task(version: u32, status: &str, last_updated: &str) -> Value {
    json!({
        "resourceType": "Task",
        "id": "0f3c2a9e-5b7d-4c1e-9a8f-2d6b4e1c7a90",
        "meta": { "versionId": version.to_string(), "lastUpdated": last_updated },
        "identifier": [
            { "system": "http://lab.example.org/orders", "value": "LAB-2025-000417" },
            { "system": "urn:ietf:rfc:3986", "value": "urn:uuid:6f1d1c1e-8d0c-4a8e-b2a4-1f0e3b9d5c21" }
        ],
        "status": status,
        "businessStatus": { "text": "Specimen received" },
        "intent": "order",
        "priority": "urgent",
        "code": {
            "coding": [{
                "system": "http://hl7.org/fhir/CodeSystem/task-code",
                "code": "fulfill",
                "display": "Fulfill the focal request"
            }]
        },
        "focus": { "reference": "ServiceRequest/sr-88213" },
        "for": { "reference": "Patient/p-55102", "display": "Ada Example" },
        "authoredOn": "2025-06-01T08:02:11Z",
        "lastModified": last_updated,
        "requester": { "reference": "PractitionerRole/pr-7" },
        "performerType": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/task-performer-type",
                "code": "performer"
            }]
        }],
        "owner": { "reference": format!("Practitioner/{TASK_OWNER}") },
        "restriction": { "period": { "end": "2025-06-03T17:00:00Z" } },
        "note": [{ "text": "Fasting sample; call the ward before collection." }],
        "input": [{
            "type": { "text": "specimen" },
            "valueReference": { "reference": "Specimen/sp-31337" }
        }]
    })
}

fn change<'a>(
    previous: &'a Value,
    previous_index: &'a TaskIndex,
    current: &'a Value,
    current_index: &'a TaskIndex,
) -> Change<'a> {
    Change {
        seq: CHANGE_SEQ,
        interaction: Interaction::Update,
        previous: Some(Side {
            resource: previous,
            index: previous_index,
        }),
        current: Some(Side {
            resource: current,
            index: current_index,
        }),
    }
}

/// The resident set size of this process in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

fn match_change(c: &mut Criterion) {
    check_owner_filter();
    let topics: Vec<Topic> = builtin_topics(BASE).expect("the built-in topics");
    let previous = task(3, "accepted", "2025-06-01T09:14:52.118Z");
    let current = task(4, "in-progress", "2025-06-01T10:15:01.402Z");
    let previous_index = index_task(&previous, BASE);
    let current_index = index_task(&current, BASE);
    let expected = expected_matches();

    let mut group = c.benchmark_group("match_change");
    for &size in SIZES {
        for &topic_id in TOPICS {
            let topic = topics
                .iter()
                .position(|t| t.id == topic_id)
                .expect("a built-in topic");

            // Only the first large build reads true: memory freed with an earlier index stays
            // with the allocator and is reused, so later deltas come out smaller.
            let rss_before = rss_kib();
            let started = Instant::now();
            let index = build_index(topic, size);
            let took = started.elapsed();
            let rss_after = rss_kib();
            let total = size + CATCH_ALLS + STATUS_SUBSCRIPTIONS;
            assert_eq!(index.len(), total);
            eprintln!(
                "match_change/{topic_id}/{size}: built {total} subscriptions in {took:.2?}; \
                 VmRSS {rss_before} KiB -> {rss_after} KiB (+{} MiB, {} bytes per subscription)",
                rss_after.saturating_sub(rss_before) / 1024,
                rss_after.saturating_sub(rss_before) * 1024 / total as u64,
            );

            // The bench must measure the real work: exactly the expected subscriptions match.
            let change_now = change(&previous, &previous_index, &current, &current_index);
            let matched: BTreeSet<SubscriptionId> = index
                .match_change(&topics, &change_now, BASE)
                .into_iter()
                .collect();
            assert_eq!(matched, expected, "{topic_id} with {size} subscriptions");

            group.bench_with_input(BenchmarkId::new(topic_id, size), &index, |b, index| {
                let change = change(&previous, &previous_index, &current, &current_index);
                b.iter(|| index.match_change(black_box(&topics), black_box(&change), BASE));
            });
            group.bench_with_input(
                BenchmarkId::new(format!("{topic_id}+indexing"), size),
                &index,
                |b, index| {
                    b.iter(|| {
                        let previous_index = index_task(black_box(&previous), BASE);
                        let current_index = index_task(black_box(&current), BASE);
                        let change = change(&previous, &previous_index, &current, &current_index);
                        index.match_change(black_box(&topics), &change, BASE)
                    });
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, match_change);
criterion_main!(benches);
