//! Work lists (issue 16): random work-list searches over a few thousand random Tasks agree
//! with a plain in-memory evaluation of the same query (ids, order, total), and keyset paging
//! neither skips nor repeats a Task while others are written. On both backends
//! (`TEST_BACKEND=postgres`).

mod common;

use std::cmp::Ordering;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

use baton::fhir::search::{
    Handling, SearchLimits, SortKey, TaskColumns, TaskIndex, TotalMode, index_task, matches,
    parse_query, priority_rank,
};
use common::*;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

/// A small deterministic generator (splitmix64), so that a failure can be replayed.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, options: &[&'a str]) -> &'a str {
        options[self.below(options.len() as u64) as usize]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const STATUSES: &[&str] = &[
    "requested",
    "received",
    "accepted",
    "ready",
    "in-progress",
    "on-hold",
    "completed",
    "cancelled",
];
const QUEUES: &[&str] = &["q0", "q1", "q2", "q3", "q4"];
const QUEUE_SYSTEM: &str = "urn:baton-test:queue";

/// A random Task with every work-list element sometimes absent, owners by reference or by
/// display only, one or two performer types with and without a system, and due dates on the
/// hour over ten days (so that many share a due date and the tie-break decides).
fn random_task(draw: &mut Draw) -> Value {
    let mut task = json!({
        "resourceType": "Task",
        "status": draw.pick(STATUSES),
        "intent": "order",
        "for": { "reference": format!("Patient/pt{}", draw.below(30)) },
    });
    match draw.below(10) {
        0..=3 => {}
        4 => task["owner"] = json!({ "display": "the ward clerk" }),
        _ => task["owner"] = json!({ "reference": format!("Practitioner/p{}", draw.below(12)) }),
    }
    let coding = |draw: &mut Draw| {
        let code = draw.pick(QUEUES);
        if draw.chance(70) {
            json!({ "system": QUEUE_SYSTEM, "code": code })
        } else {
            json!({ "code": code })
        }
    };
    match draw.below(10) {
        0..=1 => {}
        2..=3 => {
            task["performerType"] =
                json!([{ "coding": [coding(draw)] }, { "coding": [coding(draw)] }]);
        }
        _ => task["performerType"] = json!([{ "coding": [coding(draw)] }]),
    }
    if draw.chance(80) {
        task["restriction"] = json!({ "period": { "end": format!(
            "2027-01-{:02}T{:02}:00:00Z",
            1 + draw.below(10),
            8 + draw.below(4)
        ) } });
    }
    if draw.chance(70) {
        task["authoredOn"] = json!(format!("2026-12-{:02}", 1 + draw.below(20)));
    }
    let priority = draw.pick(&["", "routine", "urgent", "asap", "stat"]);
    if !priority.is_empty() {
        task["priority"] = json!(priority);
    }
    task
}

/// A random work-list query: one to three criteria, zero to two sort keys, a page size.
fn random_query(draw: &mut Draw) -> String {
    let mut parts = Vec::new();
    for _ in 0..1 + draw.below(3) {
        parts.push(match draw.below(28) {
            0 => format!("status={}", draw.pick(STATUSES)),
            1 => format!("status={},{}", draw.pick(STATUSES), draw.pick(STATUSES)),
            2 => format!("status:not={}", draw.pick(&["completed", "cancelled"])),
            3 => format!("owner=Practitioner/p{}", draw.below(12)),
            4 => format!("owner:missing={}", draw.chance(50)),
            5 => format!("owner:not=Practitioner/p{}", draw.below(12)),
            6 => format!("performer={}", draw.pick(QUEUES)),
            7 => format!("performer={QUEUE_SYSTEM}|{}", draw.pick(QUEUES)),
            8 => format!("performer=|{}", draw.pick(QUEUES)),
            9 => format!(
                "due-date={}2027-01-{:02}",
                draw.pick(&["lt", "ge", "le", "gt", "eq", ""]),
                1 + draw.below(10)
            ),
            10 => format!("patient=Patient/pt{}", draw.below(30)),
            11 => format!("priority={}", draw.pick(&["stat", "urgent", "routine"])),
            // Every other form on the work-list columns (issue 16: no index rows behind them
            // but for a Task with several performer types).
            12 => format!(
                "status={}|{}",
                draw.pick(&["http://hl7.org/fhir/task-status", "", "urn:other"]),
                draw.pick(STATUSES)
            ),
            13 => format!(
                "status:not={},{}",
                draw.pick(STATUSES),
                draw.pick(&[
                    "completed",
                    "http://hl7.org/fhir/task-status|ready",
                    "|ready"
                ])
            ),
            14 => format!(
                "{}={}",
                draw.pick(&["status", "status:not", "performer", "performer:not"]),
                draw.pick(&["http://hl7.org/fhir/task-status|", "urn:baton-test:queue|"])
            ),
            15 => format!(
                "owner=Practitioner/p{},Practitioner/p{}",
                draw.below(12),
                draw.below(12)
            ),
            16 => format!("owner:Practitioner=p{}", draw.below(12)),
            17 => format!("owner=p{}", draw.below(12)),
            18 => format!(
                "owner:not=Practitioner/p{},p{}",
                draw.below(12),
                draw.below(12)
            ),
            19 => format!("performer:not={}", draw.pick(QUEUES)),
            20 => format!(
                "performer:not={}|{}",
                draw.pick(&[QUEUE_SYSTEM, ""]),
                draw.pick(QUEUES)
            ),
            21 => format!(
                "performer={},{QUEUE_SYSTEM}|{}",
                draw.pick(QUEUES),
                draw.pick(QUEUES)
            ),
            22 => format!(
                "{}:missing={}",
                draw.pick(&["performer", "due-date", "authored-on", "status"]),
                draw.chance(50)
            ),
            23 | 24 => format!(
                "authored-on={}2026-12-{:02}",
                draw.pick(&["lt", "ge", "le", "gt", "eq", "ne", "sa", "eb", "ap", ""]),
                1 + draw.below(20)
            ),
            25 => format!(
                "due-date={}2027-01-{:02}T{:02}:00:00Z",
                draw.pick(&["ne", "sa", "eb", "ap", "eq"]),
                1 + draw.below(10),
                8 + draw.below(4)
            ),
            26 => format!(
                "due-date=ge2027-01-{:02}&due-date=lt2027-01-{:02}",
                1 + draw.below(5),
                5 + draw.below(5)
            ),
            _ => format!("authored-on=2026-12-{:02},2026-12", 1 + draw.below(20)),
        });
    }
    let keys: Vec<String> = (0..draw.below(3))
        .map(|_| {
            let key = draw.pick(&[
                "priority",
                "due-date",
                "authored-on",
                "_lastUpdated",
                "status",
            ]);
            if draw.chance(50) {
                format!("-{key}")
            } else {
                key.to_string()
            }
        })
        .collect();
    if !keys.is_empty() {
        parts.push(format!("_sort={}", keys.join(",")));
    }
    parts.push(format!("_count={}", 7 + draw.below(90)));
    parts.join("&")
}

/// A created Task and what the in-memory evaluation reads of it.
struct Known {
    id: String,
    last_updated: String,
    status: String,
    rank: i64,
    columns: TaskColumns,
    index: TaskIndex,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Value_ {
    Rank(i64),
    Text(String),
}

fn sort_value(task: &Known, key: &SortKey) -> Option<Value_> {
    match key.param {
        "priority" => Some(Value_::Rank(task.rank)),
        "status" => Some(Value_::Text(task.status.clone())),
        "due-date" => task.columns.due_start.clone().map(Value_::Text),
        "authored-on" => task.columns.authored_on.clone().map(Value_::Text),
        "_lastUpdated" => Some(Value_::Text(task.last_updated.clone())),
        other => panic!("no in-memory sort for {other}"),
    }
}

/// The order a search answers in: each sort key (Tasks without a value last either way),
/// then the id; without keys, the oldest change first, then the id.
fn compare(a: &Known, b: &Known, sort: &[SortKey]) -> Ordering {
    for key in sort {
        let ordering = match (sort_value(a, key), sort_value(b, key)) {
            (Some(x), Some(y)) if key.descending => y.cmp(&x),
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        if ordering != Ordering::Equal {
            return ordering;
        }
    }
    if sort.is_empty() {
        a.last_updated
            .cmp(&b.last_updated)
            .then_with(|| a.id.cmp(&b.id))
    } else {
        a.id.cmp(&b.id)
    }
}

fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

/// Follows a search's `next` links to its end: every match in order, and the first page's
/// total.
async fn all_pages(server: &TestServer, query: &str) -> (Vec<String>, Option<u64>) {
    let token = server.admin();
    let (status, first) = server.get(&format!("/Task?{query}"), &token).await;
    assert_eq!(status, StatusCode::OK, "{query}: {first}");
    let total = first["total"].as_u64();
    let mut ids = match_ids(&first);
    let mut next = next_link(&first);
    while let Some(url) = next {
        let (status, page) = server.get(&url, &token).await;
        assert_eq!(status, StatusCode::OK, "{url}: {page}");
        ids.extend(match_ids(&page));
        next = next_link(&page);
    }
    (ids, total)
}

async fn create_all(server: &TestServer, tasks: Vec<Value>) -> Vec<Value> {
    futures::stream::iter(tasks)
        .map(|task| async move { server.create_task(&task).await })
        .buffer_unordered(16)
        .collect()
        .await
}

/// How many random queries the comparison runs.
const QUERIES: usize = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_work_list_queries_agree_with_an_in_memory_evaluation() {
    let server = TestServer::start().await;
    let mut draw = Draw(16);
    let tasks: Vec<Value> = (0..2000).map(|_| random_task(&mut draw)).collect();
    let created = create_all(&server, tasks).await;
    let known: Vec<Known> = created
        .iter()
        .map(|task| {
            let index = index_task(task, &server.base);
            Known {
                id: task["id"].as_str().unwrap().to_string(),
                last_updated: task["meta"]["lastUpdated"].as_str().unwrap().to_string(),
                status: task["status"].as_str().unwrap().to_string(),
                rank: priority_rank(task),
                columns: TaskColumns::from_index(&index),
                index,
            }
        })
        .collect();
    let limits = SearchLimits {
        default_count: 50,
        max_count: 1000,
        default_total: TotalMode::Accurate,
    };
    let mut nonempty = 0;
    for _ in 0..QUERIES {
        let query = random_query(&mut draw);
        let pairs: Vec<(String, String)> = query
            .split('&')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect();
        let parsed = parse_query(&pairs, &limits, &server.base, Handling::Strict).unwrap();
        let mut expected: Vec<&Known> = known
            .iter()
            .filter(|t| matches(&t.index, &parsed.predicates))
            .collect();
        expected.sort_by(|a, b| compare(a, b, &parsed.sort));
        let expected: Vec<String> = expected.iter().map(|t| t.id.clone()).collect();
        nonempty += usize::from(!expected.is_empty());
        // The query as a client sends it: `|` and the rest percent-encoded.
        let encoded = serde_urlencoded::to_string(&pairs).unwrap();
        let (found, total) = all_pages(&server, &format!("{encoded}&_total=accurate")).await;
        assert_eq!(found, expected, "{query}");
        assert_eq!(total, Some(expected.len() as u64), "{query}");
        // An estimate is the same total up to its limit (1 000), and no total past it.
        let (status, page) = server
            .get(&format!("/Task?{encoded}&_total=estimate"), &server.admin())
            .await;
        assert_eq!(status, StatusCode::OK);
        let estimate = Some(expected.len() as u64).filter(|n| *n <= 1000);
        assert_eq!(page["total"].as_u64(), estimate, "{query}");
    }
    // The queries must find something, or they could not catch a wrong translation.
    assert!(
        nonempty >= QUERIES * 2 / 3,
        "only {nonempty} of {QUERIES} queries matched a Task"
    );
    server.stop().await;
}

/// A client pages through 10 000 Tasks by due date while others create Tasks (with due dates
/// among them) and update and delete some: every Task that existed throughout appears exactly
/// once, and no Task twice. Paging by `_offset` could not promise this: a Task created before
/// the page being read shifts the rest by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyset_paging_neither_skips_nor_repeats_under_concurrent_writes() {
    const TASKS: u64 = 10_000;
    let server = Arc::new(TestServer::start().await);
    // Unique due dates, a minute apart, so that updates (which change only the description)
    // keep each Task's place in the order.
    let due = |minute: u64| {
        format!(
            "2027-02-{:02}T{:02}:{:02}:00Z",
            1 + minute / (24 * 60),
            minute / 60 % 24,
            minute % 60
        )
    };
    let tasks: Vec<Value> = (0..TASKS)
        .map(|i| {
            let mut task = task("requested", None);
            task["restriction"] = json!({ "period": { "end": due(i * 2) } });
            task
        })
        .collect();
    let created = create_all(&server, tasks).await;
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let server = server.clone();
        let done = done.clone();
        let created = created.clone();
        tokio::spawn(async move {
            let token = server.admin();
            let mut draw = Draw(7);
            let (mut written, mut deleted) = (0_u64, HashSet::new());
            while !done.load(AtomicOrdering::Relaxed) {
                // A new Task between two existing ones, one updated, now and then one deleted.
                let mut new = task("requested", None);
                new["restriction"] = json!({ "period": { "end": due(draw.below(TASKS) * 2 + 1) } });
                server.create_task(&new).await;
                let mut changed = created[draw.below(TASKS) as usize].clone();
                changed["description"] = json!(format!("changed {written}"));
                let id = changed["id"].as_str().unwrap().to_string();
                if !deleted.contains(&id) {
                    let (status, body) = server
                        .put_json(&format!("/Task/{id}"), &token, &changed)
                        .await;
                    assert_eq!(status, StatusCode::OK, "{body}");
                }
                if written.is_multiple_of(10) {
                    let victim = created[draw.below(TASKS) as usize]["id"]
                        .as_str()
                        .unwrap()
                        .to_string();
                    let response = server
                        .request(reqwest::Method::DELETE, &format!("/Task/{victim}"), &token)
                        .send()
                        .await
                        .unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                    deleted.insert(victim);
                }
                written += 1;
            }
            (written, deleted)
        })
    };
    let (seen, _) = all_pages(
        &server,
        "status=requested&_sort=due-date&_count=100&_total=none",
    )
    .await;
    done.store(true, AtomicOrdering::Relaxed);
    let (written, deleted) = writer.await.unwrap();
    assert!(written > 0, "the writer never wrote while the client paged");
    let mut once = HashSet::new();
    for id in &seen {
        assert!(once.insert(id.clone()), "Task/{id} came twice");
    }
    let missing: Vec<&str> = created
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .filter(|id| !deleted.contains(*id) && !once.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} Tasks that existed throughout were skipped ({written} writes meanwhile), e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    Arc::into_inner(server).unwrap().stop().await;
}
