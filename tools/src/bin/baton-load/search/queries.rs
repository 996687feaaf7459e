//! The work-list queries of issue 16, their rotation over concrete values, and the checks of
//! their answers. Pure: a query is a function of its kind, its ordinal and the data set's
//! shape, and an answer is judged from its body alone.

use clap::ValueEnum;
use serde::Deserialize;

use super::data::{QUEUE_SYSTEM, QUEUES, Shape, day_text};

/// Page size of the listings that ask for one (`_count=20`).
pub const PAGE: usize = 20;

/// The page whose cost the paging measure compares with the first.
pub const FAR_PAGE: usize = 500;

/// A work-list query, numbered as in issue 16, plus the paging measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Kind {
    /// 1: `owner=Practitioner/p{k}&status:not=completed&_sort=-priority`
    Owner,
    /// 2: `owner:missing=true&performer={system}|{queue}&status=requested`
    RoleQueue,
    /// 3: `status=requested&_count=20`
    Requested,
    /// 4: `status:not=completed&due-date=lt{day}&_sort=due-date&_count=20`
    Due,
    /// 5: `patient=Patient/pt{k}`
    Patient,
    /// 6: `_count=20`, no filter.
    All,
    /// Paging: the first page of 20 of the unfiltered listing.
    #[value(name = "page-1")]
    Page1,
    /// Paging: page 500 of 20 of the same listing, as the server's `next` links reach it
    /// (found once at start-up; `_offset=9980` stands for it here).
    #[value(name = "page-500")]
    Page500,
}

/// The six work-list queries, the mix's default.
pub const WORK_LISTS: [Kind; 6] = [
    Kind::Owner,
    Kind::RoleQueue,
    Kind::Requested,
    Kind::Due,
    Kind::Patient,
    Kind::All,
];

/// The six and the paging measure, `--single`'s default.
pub const ALL_KINDS: [Kind; 8] = [
    Kind::Owner,
    Kind::RoleQueue,
    Kind::Requested,
    Kind::Due,
    Kind::Patient,
    Kind::All,
    Kind::Page1,
    Kind::Page500,
];

impl Kind {
    /// The name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Owner => "1-owner",
            Kind::RoleQueue => "2-role-queue",
            Kind::Requested => "3-requested",
            Kind::Due => "4-due",
            Kind::Patient => "5-patient",
            Kind::All => "6-all",
            Kind::Page1 => "page-1",
            Kind::Page500 => "page-500",
        }
    }
}

/// What every Task of an answer must satisfy, beyond being a Task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Owned by this reference, not completed, most urgent first.
    OpenFor(String),
    /// Unowned, requested, in this queue.
    Queued(&'static str),
    /// Requested.
    Requested,
    /// Not completed, due before this day, soonest first.
    DueBefore(String),
    /// For this patient.
    For(String),
    /// Anything.
    Any,
}

/// A concrete query: the query string after `Task?`, what its answer must hold, and how many
/// Tasks a page holds at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub kind: Kind,
    pub text: String,
    pub expect: Expect,
    pub max_entries: Option<usize>,
}

/// The `n`-th request of a run: the kinds take turns (round-robin), and each kind's values
/// rotate through its whole range (`scatter`), so successive requests of one kind ask for
/// different owners, queues, patients and cut-off days.
pub fn nth(kinds: &[Kind], n: u64, shape: &Shape) -> Query {
    let kind = kinds[(n % kinds.len() as u64) as usize];
    query(kind, n / kinds.len() as u64, shape)
}

/// The `ordinal`-th concrete query of `kind`.
pub fn query(kind: Kind, ordinal: u64, shape: &Shape) -> Query {
    let page = Some(PAGE);
    match kind {
        Kind::Owner => {
            let owner = format!("Practitioner/p{}", scatter(ordinal, shape.owners));
            Query {
                kind,
                text: format!("owner={owner}&status:not=completed&_sort=-priority"),
                expect: Expect::OpenFor(owner),
                max_entries: None,
            }
        }
        Kind::RoleQueue => {
            let queue = QUEUES[scatter(ordinal, QUEUES.len() as u64) as usize];
            Query {
                kind,
                text: format!(
                    "owner:missing=true&performer={QUEUE_SYSTEM}|{queue}&status=requested"
                ),
                expect: Expect::Queued(queue),
                max_entries: None,
            }
        }
        Kind::Requested => Query {
            kind,
            text: format!("status=requested&_count={PAGE}"),
            expect: Expect::Requested,
            max_entries: page,
        },
        Kind::Due => {
            let day = day_text(shape.day(scatter(ordinal, u64::from(shape.due_days))));
            Query {
                kind,
                text: format!("status:not=completed&due-date=lt{day}&_sort=due-date&_count={PAGE}"),
                expect: Expect::DueBefore(day),
                max_entries: page,
            }
        }
        Kind::Patient => {
            let patient = format!("Patient/pt{}", scatter(ordinal, shape.patients));
            Query {
                kind,
                text: format!("patient={patient}"),
                expect: Expect::For(patient),
                max_entries: None,
            }
        }
        Kind::All => Query {
            kind,
            text: format!("_count={PAGE}"),
            expect: Expect::Any,
            max_entries: page,
        },
        Kind::Page1 | Kind::Page500 => {
            let offset = if kind == Kind::Page1 {
                0
            } else {
                (FAR_PAGE - 1) * PAGE
            };
            Query {
                kind,
                text: format!("_count={PAGE}&_offset={offset}"),
                expect: Expect::Any,
                max_entries: page,
            }
        }
    }
}

/// The `ordinal`-th value of a range of `size`: multiplying by a large prime walks the whole
/// range in a scattered order, each value once per `size` ordinals (unless `size` is a
/// multiple of the prime).
pub fn scatter(ordinal: u64, size: u64) -> u64 {
    const STRIDE: u64 = 2_654_435_761;
    let size = size.max(1);
    ((u128::from(ordinal % size) * u128::from(STRIDE)) % u128::from(size)) as u64
}

/// What an answer held: its matches, and `Bundle.total` if given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub entries: usize,
    pub total: Option<u64>,
}

#[derive(Deserialize)]
struct Bundle {
    #[serde(rename = "resourceType")]
    resource_type: String,
    #[serde(rename = "type")]
    kind: String,
    total: Option<u64>,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    search: Option<SearchMode>,
    resource: Option<TaskView>,
}

#[derive(Deserialize)]
struct SearchMode {
    mode: Option<String>,
}

/// The few elements of a Task the checks read; the rest is skipped unread.
#[derive(Deserialize)]
struct TaskView {
    #[serde(rename = "resourceType")]
    resource_type: String,
    id: Option<String>,
    status: Option<String>,
    priority: Option<String>,
    owner: Option<Reference>,
    #[serde(rename = "for")]
    subject: Option<Reference>,
    #[serde(rename = "performerType", default)]
    performer_type: Vec<Concept>,
    restriction: Option<Restriction>,
}

#[derive(Deserialize)]
struct Reference {
    reference: Option<String>,
}

#[derive(Deserialize)]
struct Concept {
    #[serde(default)]
    coding: Vec<Coding>,
}

#[derive(Deserialize)]
struct Coding {
    system: Option<String>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct Restriction {
    period: Option<Period>,
}

#[derive(Deserialize)]
struct Period {
    end: Option<String>,
}

/// Urgency, as the server sorts `priority`: routine < urgent < asap < stat; none is least.
fn urgency(priority: Option<&str>) -> u8 {
    match priority {
        Some("routine") => 1,
        Some("urgent") => 2,
        Some("asap") => 3,
        Some("stat") => 4,
        _ => 0,
    }
}

/// Judges a 200 answer's body: a searchset Bundle whose matches are Tasks that satisfy the
/// query, in the order it asked for, no more than the page size. The error says what is wrong.
pub fn check(query: &Query, body: &[u8]) -> Result<Answer, String> {
    let bundle: Bundle =
        serde_json::from_slice(body).map_err(|e| format!("not a Bundle as JSON: {e}"))?;
    if bundle.resource_type != "Bundle" || bundle.kind != "searchset" {
        return Err(format!(
            "a {} of type {}, not a searchset Bundle",
            bundle.resource_type, bundle.kind
        ));
    }
    let matches: Vec<&TaskView> = bundle
        .entry
        .iter()
        .filter(|e| e.search.as_ref().and_then(|s| s.mode.as_deref()) == Some("match"))
        .filter_map(|e| e.resource.as_ref())
        .collect();
    if let Some(max) = query.max_entries
        && matches.len() > max
    {
        return Err(format!("{} matches on a page of {max}", matches.len()));
    }
    let mut previous: Option<&TaskView> = None;
    for task in &matches {
        let id = task.id.as_deref().unwrap_or("(no id)");
        if task.resource_type != "Task" {
            return Err(format!("a match is a {}", task.resource_type));
        }
        let status = task.status.as_deref().unwrap_or("");
        let owner = task.owner.as_ref().and_then(|r| r.reference.as_deref());
        let due = task
            .restriction
            .as_ref()
            .and_then(|r| r.period.as_ref())
            .and_then(|p| p.end.as_deref());
        let wrong = match &query.expect {
            Expect::OpenFor(expected) => {
                let out_of_order = previous.is_some_and(|p| {
                    urgency(p.priority.as_deref()) < urgency(task.priority.as_deref())
                });
                (owner != Some(expected.as_str()) || status == "completed" || out_of_order)
                    .then(|| format!("owner {owner:?}, status {status}, priority order"))
            }
            Expect::Queued(queue) => {
                let in_queue = task.performer_type.iter().any(|c| {
                    c.coding.iter().any(|coding| {
                        coding.system.as_deref() == Some(QUEUE_SYSTEM)
                            && coding.code.as_deref() == Some(queue)
                    })
                });
                (owner.is_some() || status != "requested" || !in_queue)
                    .then(|| format!("owner {owner:?}, status {status}, in queue {in_queue}"))
            }
            Expect::Requested => (status != "requested").then(|| format!("status {status}")),
            Expect::DueBefore(day) => {
                let out_of_order = previous.is_some_and(|p| {
                    let before = p.restriction.as_ref().and_then(|r| r.period.as_ref());
                    before.and_then(|p| p.end.as_deref()) > due
                });
                let before = due.is_some_and(|d| d < day.as_str());
                (status == "completed" || !before || out_of_order)
                    .then(|| format!("status {status}, due {due:?}, due-date order"))
            }
            Expect::For(patient) => {
                let subject = task.subject.as_ref().and_then(|r| r.reference.as_deref());
                (subject != Some(patient.as_str())).then(|| format!("for {subject:?}"))
            }
            Expect::Any => None,
        };
        if let Some(wrong) = wrong {
            return Err(format!("Task {id} does not match: {wrong}"));
        }
        previous = Some(task);
    }
    Ok(Answer {
        entries: matches.len(),
        total: bundle.total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::data::parse_day;
    use serde_json::{Value, json};

    fn shape() -> Shape {
        Shape {
            tasks: 1000,
            owners: 1000,
            patients: 200,
            rng_seed: 1,
            due_from: parse_day("2026-07-01").unwrap(),
            due_days: 365,
        }
    }

    #[test]
    fn kinds_take_turns_and_values_rotate_through_their_range() {
        let shape = shape();
        let kinds = WORK_LISTS;
        let queries: Vec<Query> = (0..6000).map(|n| nth(&kinds, n, &shape)).collect();
        for (n, q) in queries.iter().enumerate() {
            assert_eq!(q.kind, kinds[n % 6], "{n}");
        }
        let distinct = |kind: Kind| {
            let texts: std::collections::BTreeSet<&str> = queries
                .iter()
                .filter(|q| q.kind == kind)
                .map(|q| q.text.as_str())
                .collect();
            texts.len()
        };
        // 1000 requests of each kind: every owner once, every queue, every patient, every day.
        assert_eq!(distinct(Kind::Owner), 1000);
        assert_eq!(distinct(Kind::RoleQueue), 20);
        assert_eq!(distinct(Kind::Patient), 200);
        assert_eq!(distinct(Kind::Due), 365);
        assert_eq!(distinct(Kind::Requested), 1);
        // Neighbouring requests of a kind ask for far-apart values.
        assert_ne!(
            query(Kind::Owner, 0, &shape).text,
            query(Kind::Owner, 1, &shape).text
        );
        assert_ne!(
            scatter(1, 1000).abs_diff(scatter(2, 1000)),
            1,
            "scattered, not sequential"
        );
    }

    #[test]
    fn scatter_is_a_permutation() {
        for size in [1u64, 2, 7, 20, 365, 1000, 20_000] {
            let mut seen: Vec<u64> = (0..size).map(|o| scatter(o, size)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..size).collect::<Vec<_>>(), "{size}");
        }
    }

    #[test]
    fn query_texts_are_the_issues() {
        let shape = shape();
        let texts: Vec<String> = ALL_KINDS
            .iter()
            .map(|k| query(*k, 0, &shape).text)
            .collect();
        assert_eq!(
            texts,
            [
                "owner=Practitioner/p0&status:not=completed&_sort=-priority",
                &format!("owner:missing=true&performer={QUEUE_SYSTEM}|triage&status=requested"),
                "status=requested&_count=20",
                "status:not=completed&due-date=lt2026-07-01&_sort=due-date&_count=20",
                "patient=Patient/pt0",
                "_count=20",
                "_count=20&_offset=0",
                "_count=20&_offset=9980",
            ]
        );
    }

    fn bundle(tasks: &[Value]) -> Vec<u8> {
        let entries: Vec<Value> = tasks
            .iter()
            .map(|t| json!({ "fullUrl": "x", "resource": t, "search": { "mode": "match" } }))
            .collect();
        json!({ "resourceType": "Bundle", "type": "searchset", "total": 42, "entry": entries })
            .to_string()
            .into_bytes()
    }

    fn task(owner: Option<&str>, status: &str, priority: &str, due: &str) -> Value {
        let mut t = json!({
            "resourceType": "Task", "id": "t", "status": status, "priority": priority,
            "for": { "reference": "Patient/pt3" },
            "performerType": [{ "coding": [{ "system": QUEUE_SYSTEM, "code": "triage" }] }],
            "restriction": { "period": { "end": due } },
        });
        if let Some(owner) = owner {
            t["owner"] = json!({ "reference": owner });
        }
        t
    }

    #[test]
    fn answers_are_checked_against_their_query() {
        let p = Some("Practitioner/p1");
        let owner = Query {
            kind: Kind::Owner,
            text: String::new(),
            expect: Expect::OpenFor("Practitioner/p1".into()),
            max_entries: None,
        };
        let queued = Query {
            expect: Expect::Queued("triage"),
            ..owner.clone()
        };
        let requested = Query {
            expect: Expect::Requested,
            max_entries: Some(2),
            ..owner.clone()
        };
        let due = Query {
            expect: Expect::DueBefore("2027-03-15".into()),
            ..owner.clone()
        };
        let patient = Query {
            expect: Expect::For("Patient/pt3".into()),
            ..owner.clone()
        };
        let early = "2027-03-01T08:00:00Z";
        let late = "2027-03-16T08:00:00Z";
        let cases: Vec<(&Query, Vec<Value>, Result<usize, &str>)> = vec![
            (
                &owner,
                vec![
                    task(p, "requested", "stat", early),
                    task(p, "on-hold", "routine", early),
                ],
                Ok(2),
            ),
            (
                &owner,
                vec![task(p, "completed", "stat", early)],
                Err("does not match"),
            ),
            (
                &owner,
                vec![task(Some("Practitioner/p2"), "requested", "stat", early)],
                Err("does not match"),
            ),
            (
                &owner,
                vec![
                    task(p, "requested", "routine", early),
                    task(p, "requested", "stat", early),
                ],
                Err("priority order"),
            ),
            (&queued, vec![task(None, "requested", "stat", early)], Ok(1)),
            (
                &queued,
                vec![task(p, "requested", "stat", early)],
                Err("does not match"),
            ),
            (&requested, vec![task(p, "requested", "stat", early)], Ok(1)),
            (
                &requested,
                vec![task(p, "accepted", "stat", early)],
                Err("status accepted"),
            ),
            (
                &requested,
                vec![task(p, "requested", "stat", early); 3],
                Err("3 matches on a page of 2"),
            ),
            (
                &due,
                vec![
                    task(p, "requested", "stat", early),
                    task(p, "ready", "stat", "2027-03-14T17:00:00Z"),
                ],
                Ok(2),
            ),
            (
                &due,
                vec![task(p, "requested", "stat", late)],
                Err("does not match"),
            ),
            (
                &due,
                vec![
                    task(p, "requested", "stat", "2027-03-14T17:00:00Z"),
                    task(p, "ready", "stat", early),
                ],
                Err("due-date order"),
            ),
            (&patient, vec![task(None, "completed", "stat", late)], Ok(1)),
            (&owner, vec![], Ok(0)),
        ];
        for (i, (query, tasks, expected)) in cases.into_iter().enumerate() {
            let got = check(query, &bundle(&tasks));
            match (got, expected) {
                (Ok(answer), Ok(entries)) => {
                    assert_eq!(
                        answer,
                        Answer {
                            entries,
                            total: Some(42)
                        },
                        "case {i}"
                    )
                }
                (Err(e), Err(needle)) => assert!(e.contains(needle), "case {i}: {e}"),
                (got, expected) => panic!("case {i}: {got:?}, expected {expected:?}"),
            }
        }
        let not_searchset = json!({ "resourceType": "Bundle", "type": "history" }).to_string();
        assert!(check(&owner, not_searchset.as_bytes()).is_err());
        let outcome = json!({ "resourceType": "OperationOutcome" }).to_string();
        assert!(check(&owner, outcome.as_bytes()).is_err());
        assert!(check(&owner, b"<html>").is_err());
    }
}
