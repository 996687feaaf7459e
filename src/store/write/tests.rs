//! The write rules against an in-memory `TaskTx`: what each request reads and writes, in
//! order, without a database. The stores' own tests and the integration suite hold the SQL.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::*;
use crate::fhir::workflow::TASK_CODE_SYSTEM;

const BASE: &str = "http://baton.test/fhir";
const OWNER: &str = "Practitioner/1";

/// One statement the rules asked of the backend, with its ids and versions as bare values.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Load(String),
    Recheck(u64),
    BeforeHold(String),
    Put {
        id: String,
        version: i64,
        previous_version: Option<i64>,
        interaction: Interaction,
        existed: bool,
    },
    Delete {
        id: String,
        version: i64,
        previous_version: i64,
    },
    /// `put_versions`: the ids written together, in order.
    PutTogether(Vec<String>),
}

/// A backend that keeps Tasks in memory and records each statement asked of it.
#[derive(Default)]
struct Fake {
    tasks: BTreeMap<String, CurrentTask>,
    /// What `status_before_hold` answers per Task.
    before_hold: BTreeMap<String, String>,
    /// What the re-check of a conditional create finds.
    recheck: Option<Found>,
    steps: Vec<Step>,
}

impl Fake {
    fn with(tasks: impl IntoIterator<Item = CurrentTask>) -> Fake {
        Fake {
            tasks: tasks.into_iter().map(|t| (t.id.to_string(), t)).collect(),
            ..Fake::default()
        }
    }

    /// The Tasks written, in order, without the reads.
    fn writes(&self) -> Vec<&Step> {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Put { .. } | Step::Delete { .. }))
            .collect()
    }
}

impl TaskTx for Fake {
    type Seen = u64;

    async fn load_for_change(&mut self, id: &TaskId) -> Result<Option<CurrentTask>> {
        self.steps.push(Step::Load(id.to_string()));
        Ok(self.tasks.get(id.as_str()).cloned())
    }

    async fn recheck(&mut self, _criteria: &[Predicate], seen: u64) -> Result<Found> {
        self.steps.push(Step::Recheck(seen));
        Ok(self.recheck.take().unwrap_or(Found::Nothing))
    }

    async fn status_before_hold(&mut self, id: &TaskId) -> Result<Option<String>> {
        self.steps.push(Step::BeforeHold(id.to_string()));
        Ok(self.before_hold.get(id.as_str()).cloned())
    }

    async fn children_for_change(
        &mut self,
        parent: &TaskId,
        limit: usize,
    ) -> Result<Vec<CurrentTask>> {
        let parent = format!("Task/{parent}");
        let mut children: Vec<CurrentTask> = self
            .tasks
            .values()
            .filter(|t| !t.deleted)
            .filter(|t| {
                t.resource["partOf"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|r| r["reference"] == parent.as_str()))
            })
            .cloned()
            .collect();
        children.sort_by(|a, b| a.id.as_str().cmp(b.id.as_str()));
        children.truncate(limit);
        Ok(children)
    }

    async fn put_version(&mut self, v: &NewVersion<'_>) -> Result<()> {
        self.steps.push(Step::Put {
            id: v.id.to_string(),
            version: v.version.get(),
            previous_version: v.previous_version.map(Version::get),
            interaction: v.interaction,
            existed: v.existed,
        });
        let task = CurrentTask {
            id: v.id.clone(),
            version: v.version,
            last_updated: v.last_updated.clone(),
            deleted: false,
            resource: serde_json::from_str(v.text).unwrap(),
        };
        self.tasks.insert(task.id.to_string(), task);
        Ok(())
    }

    async fn put_versions(&mut self, versions: &[NewVersion<'_>]) -> Result<()> {
        self.steps.push(Step::PutTogether(
            versions.iter().map(|v| v.id.to_string()).collect(),
        ));
        for v in versions {
            assert!(!v.existed && v.previous_version.is_none(), "{v:?}");
            self.put_version(v).await?;
            // Counted once, as the `PutTogether` above.
            self.steps.pop();
        }
        Ok(())
    }

    async fn delete_version(&mut self, d: &Deletion<'_>) -> Result<()> {
        self.steps.push(Step::Delete {
            id: d.id.to_string(),
            version: d.version.get(),
            previous_version: d.previous_version.get(),
        });
        let task = self.tasks.get_mut(d.id.as_str()).unwrap();
        task.version = d.version;
        task.deleted = true;
        Ok(())
    }
}

/// A pre-check that finds what it is told to, having seen the outbox up to `seen`.
struct Reads {
    found: Found,
    seen: u64,
}

impl Precheck for Reads {
    type Seen = u64;

    async fn precheck(&self, _criteria: &[Predicate]) -> Result<(Found, u64)> {
        Ok((self.found.clone(), self.seen))
    }

    fn base_url(&self) -> &str {
        BASE
    }
}

fn task(id: &str, version: i64, status: &str) -> CurrentTask {
    CurrentTask {
        id: TaskId::parse(id).unwrap(),
        version: Version::new(version),
        last_updated: StoredInstant::parse("2024-01-01T00:00:00Z").unwrap(),
        deleted: false,
        resource: json!({
            "resourceType": "Task", "id": id, "status": status, "intent": "order",
            "owner": { "reference": OWNER },
        }),
    }
}

fn deleted(id: &str, version: i64) -> CurrentTask {
    CurrentTask {
        deleted: true,
        ..task(id, version, "requested")
    }
}

/// A request Task asking `code` of Task/`focus`, completed, addressed to `owner`.
fn request(code: &str, focus: &str, owner: &str) -> Value {
    json!({
        "resourceType": "Task", "status": "completed", "intent": "order",
        "code": { "coding": [{ "system": TASK_CODE_SYSTEM, "code": code }] },
        "focus": { "reference": format!("Task/{focus}") },
        "owner": { "reference": owner },
    })
}

fn put_step(id: &str, version: i64, previous: Option<i64>, existed: bool) -> Step {
    Step::Put {
        id: id.to_string(),
        version,
        previous_version: previous,
        interaction: if previous.is_some() {
            Interaction::Update
        } else {
            Interaction::Create
        },
        existed,
    }
}

fn change(id: &str, decision: fn() -> Result<Decision>) -> TaskWrite<u64> {
    TaskWrite::Change {
        id: TaskId::parse(id).unwrap(),
        decide: Box::new(move |_| decision()),
    }
}

fn status_of(outcome: &Result<WriteOutcome>) -> Option<StatusCode> {
    outcome.as_ref().err().map(Error::status)
}

/// The decision dispatch: put, delete and keep, against a Task that is missing, live or
/// deleted.
#[tokio::test]
async fn each_decision_writes_what_it_says() {
    fn put() -> Result<Decision> {
        Ok(Decision::Put(
            json!({
                "resourceType": "Task", "status": "requested", "intent": "order",
            })
            .into(),
        ))
    }
    fn delete() -> Result<Decision> {
        Ok(Decision::Delete)
    }
    fn keep() -> Result<Decision> {
        Ok(Decision::Keep)
    }
    fn refuse() -> Result<Decision> {
        Err(Error::precondition_failed("stale If-Match"))
    }
    struct Case {
        name: &'static str,
        stored: Option<CurrentTask>,
        decision: fn() -> Result<Decision>,
        steps: Vec<Step>,
        error: Option<StatusCode>,
    }
    let load = || Step::Load("a".into());
    let case = |name, stored, decision, steps, error| Case {
        name,
        stored,
        decision,
        steps,
        error,
    };
    #[rustfmt::skip]
    let cases = [
        case("put on a new id creates version 1", None, put,
            vec![load(), put_step("a", 1, None, false)], None),
        case("put on a live Task updates it", Some(task("a", 3, "requested")), put,
            vec![load(), put_step("a", 4, Some(3), true)], None),
        case("put on a deleted Task creates it again", Some(deleted("a", 4)), put,
            vec![load(), put_step("a", 5, None, true)], None),
        case("delete of a live Task", Some(task("a", 2, "requested")), delete,
            vec![load(), Step::Delete { id: "a".into(), version: 3, previous_version: 2 }], None),
        case("delete of a deleted Task writes nothing", Some(deleted("a", 3)), delete,
            vec![load()], None),
        case("delete of a missing Task writes nothing", None, delete, vec![load()], None),
        case("keep writes nothing", Some(task("a", 1, "requested")), keep, vec![load()], None),
        case("a refusal writes nothing", Some(task("a", 1, "requested")), refuse,
            vec![load()], Some(StatusCode::PRECONDITION_FAILED)),
        case("a refusal of a missing Task writes nothing", None, refuse,
            vec![load()], Some(StatusCode::PRECONDITION_FAILED)),
    ];
    for Case {
        name,
        stored,
        decision,
        steps,
        error,
    } in cases
    {
        let mut tx = Fake::with(stored);
        let outcome = apply(&mut tx, change("a", decision), BASE).await;
        assert_eq!(tx.steps, steps, "{name}");
        assert_eq!(status_of(&outcome), error, "{name}");
        let written = tx.writes().len();
        match outcome {
            Ok(WriteOutcome::Written(version)) => {
                assert_eq!(written, 1, "{name}");
                assert_eq!(tx.tasks["a"].version, version.version, "{name}");
                if let Some(resource) = &version.resource {
                    assert_eq!(resource["id"], "a", "{name}: stamped");
                    assert_eq!(resource["meta"]["versionId"], version.version.to_string());
                }
            }
            Ok(other) => assert_eq!((written, other), (0, WriteOutcome::Unchanged), "{name}"),
            Err(_) => assert_eq!(written, 0, "{name}"),
        }
    }
}

/// A conditional create is answered by its pre-check when that finds a Task or several, and
/// otherwise by the re-check inside the transaction, which is told what the pre-check saw.
#[tokio::test]
async fn conditional_creates_are_answered_by_the_first_check_that_finds() {
    enum Expect {
        Existing(&'static str),
        Created,
        Refused(StatusCode),
    }
    let found = |id: &str| Found::One(task(id, 1, "requested"));
    #[rustfmt::skip]
    let cases = [
        ("the pre-check finds one", found("a"), Found::Nothing, Expect::Existing("a"), vec![]),
        ("the pre-check finds several", Found::Several, Found::Nothing,
            Expect::Refused(StatusCode::PRECONDITION_FAILED), vec![]),
        ("neither finds any", Found::Nothing, Found::Nothing, Expect::Created,
            vec![Step::Recheck(7)]),
        ("the re-check finds one written since", Found::Nothing, found("b"),
            Expect::Existing("b"), vec![Step::Recheck(7)]),
        ("the re-check finds several", Found::Nothing, Found::Several,
            Expect::Refused(StatusCode::PRECONDITION_FAILED), vec![Step::Recheck(7)]),
    ];
    for (name, pre, re, expect, reads) in cases {
        let request = WriteRequest::Create {
            id: None,
            resource: json!({ "resourceType": "Task", "status": "requested", "intent": "order" }),
            if_none_exist: Some(Vec::new()),
        };
        let mut tx = Fake {
            recheck: Some(re),
            ..Fake::default()
        };
        let outcome = match prepare(
            &Reads {
                found: pre,
                seen: 7,
            },
            request,
        )
        .await
        {
            Ok(Prepared::Answered(outcome)) => Ok(outcome),
            Ok(Prepared::Write(write)) => apply(&mut tx, write, BASE).await,
            Err(e) => Err(e),
        };
        let steps: Vec<Step> = tx
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Recheck(_)))
            .cloned()
            .collect();
        assert_eq!(steps, reads, "{name}");
        match (expect, outcome) {
            (Expect::Existing(id), Ok(WriteOutcome::Existing(t))) => assert_eq!(t.id.as_str(), id),
            (Expect::Created, Ok(WriteOutcome::Written(v))) => {
                assert_eq!(v.interaction, Interaction::Create, "{name}");
                assert_eq!(
                    tx.writes(),
                    [&put_step(v.id.as_str(), 1, None, false)],
                    "{name}"
                );
            }
            (Expect::Refused(status), Err(e)) => assert_eq!(e.status(), status, "{name}"),
            (_, outcome) => panic!("{name}: {outcome:?}"),
        }
        if !matches!(tx.steps.last(), Some(Step::Put { .. })) {
            assert!(tx.writes().is_empty(), "{name}: nothing written");
        }
    }
}

/// Completing a request Task changes its focal Task in the same write, after every read:
/// the request's version first, then the focal Task's; a refusal writes neither.
#[tokio::test]
async fn completing_a_request_changes_its_focal_task() {
    enum Expect {
        /// The focal Task's status after the write.
        Focal(&'static str),
        Refused(StatusCode),
    }
    let on_hold = || task("f", 2, "on-hold");
    #[rustfmt::skip]
    let cases = [
        ("abort cancels", Some(task("f", 2, "in-progress")), request("abort", "f", OWNER),
            Expect::Focal("cancelled")),
        ("suspend puts on hold", Some(task("f", 2, "in-progress")), request("suspend", "f", OWNER),
            Expect::Focal("on-hold")),
        ("resume returns to the status before the hold", Some(on_hold()),
            request("resume", "f", OWNER), Expect::Focal("in-progress")),
        ("a focal Task that is gone", Some(deleted("f", 2)), request("abort", "f", OWNER),
            Expect::Refused(StatusCode::CONFLICT)),
        ("a focal Task that never existed", None, request("abort", "f", OWNER),
            Expect::Refused(StatusCode::CONFLICT)),
        ("a request naming itself", Some(task("f", 2, "in-progress")),
            request("abort", "r", OWNER), Expect::Refused(StatusCode::UNPROCESSABLE_ENTITY)),
        ("a request to someone else", Some(task("f", 2, "in-progress")),
            request("abort", "f", "Practitioner/2"),
            Expect::Refused(StatusCode::UNPROCESSABLE_ENTITY)),
        ("a focal Task already final", Some(task("f", 2, "completed")),
            request("abort", "f", OWNER), Expect::Refused(StatusCode::UNPROCESSABLE_ENTITY)),
    ];
    for (name, focal, resource, expect) in cases {
        let mut tx = Fake::with(focal);
        tx.before_hold.insert("f".into(), "in-progress".into());
        let write = TaskWrite::Change {
            id: TaskId::parse("r").unwrap(),
            decide: Box::new(move |_| Ok(Decision::Put(resource.clone().into()))),
        };
        let outcome = apply(&mut tx, write, BASE).await;
        match (expect, outcome) {
            (Expect::Focal(status), Ok(WriteOutcome::Written(v))) => {
                assert_eq!(
                    v.id.as_str(),
                    "r",
                    "{name}: the request's version is the answer"
                );
                assert_eq!(
                    tx.writes(),
                    [
                        &put_step("r", 1, None, false),
                        &put_step("f", 3, Some(2), true)
                    ],
                    "{name}"
                );
                assert_eq!(tx.tasks["f"].resource["status"], status, "{name}");
                let reads_hold = tx.steps.contains(&Step::BeforeHold("f".into()));
                assert_eq!(reads_hold, status == "in-progress", "{name}");
            }
            (Expect::Refused(status), Err(e)) => {
                assert_eq!(e.status(), status, "{name}");
                assert!(tx.writes().is_empty(), "{name}: nothing written");
            }
            (_, outcome) => panic!("{name}: {outcome:?}"),
        }
    }
}

/// A request that was completed already, or is not completed by this write, changes nothing
/// else; nor does a resume of a Task created on hold go through.
#[tokio::test]
async fn only_the_write_that_completes_a_request_acts_on_its_focal_task() {
    let completed = CurrentTask {
        resource: request("abort", "f", OWNER),
        ..task("r", 1, "completed")
    };
    let mut tx = Fake::with([completed, task("f", 2, "in-progress")]);
    let again = request("abort", "f", OWNER);
    let write = TaskWrite::Change {
        id: TaskId::parse("r").unwrap(),
        decide: Box::new(move |_| Ok(Decision::Put(again.clone().into()))),
    };
    apply(&mut tx, write, BASE).await.unwrap();
    assert_eq!(tx.writes(), [&put_step("r", 2, Some(1), true)]);

    let mut tx = Fake::with([task("f", 2, "on-hold")]);
    let write = TaskWrite::<u64>::Create {
        id: TaskId::generate(),
        resource: request("resume", "f", OWNER),
        staged: None,
    };
    let error = apply(&mut tx, write, BASE).await.unwrap_err();
    assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(tx.writes().is_empty());
}

/// Only a create that completes no request is a single put.
#[test]
fn single_puts_are_plain_creates() {
    let plain = json!({ "resourceType": "Task", "status": "requested", "intent": "order" });
    let cases: [(&str, TaskWrite<u64>, bool); 4] = [
        (
            "a plain create",
            TaskWrite::Create {
                id: TaskId::generate(),
                resource: plain.clone(),
                staged: None,
            },
            true,
        ),
        (
            "a create that completes a request",
            TaskWrite::Create {
                id: TaskId::generate(),
                resource: request("abort", "f", OWNER),
                staged: None,
            },
            false,
        ),
        (
            "a conditional create",
            TaskWrite::CreateUnlessFound {
                id: TaskId::generate(),
                resource: plain,
                staged: None,
                criteria: Vec::new(),
                seen: 0,
            },
            false,
        ),
        ("a change", change("a", || Ok(Decision::Keep)), false),
    ];
    for (name, write, single) in cases {
        assert_eq!(is_single_put(&write), single, "{name}");
    }
}

/// A transaction's consecutive plain creates are written together, after what came before
/// them and before any write that reads, so that every read sees the entries before it and
/// the change events follow entry order; the outcomes come in entry order.
#[tokio::test]
async fn a_transaction_writes_its_plain_creates_together_between_its_reads() {
    let create = |id: &str| {
        Prepared::Write(TaskWrite::Create {
            id: TaskId::parse(id).unwrap(),
            resource: json!({
                "resourceType": "Task", "status": "requested", "intent": "order",
                "owner": { "reference": OWNER },
            }),
            staged: None,
        })
    };
    fn put() -> Result<Decision> {
        Ok(Decision::Put(
            json!({
                "resourceType": "Task", "status": "in-progress", "intent": "order",
            })
            .into(),
        ))
    }
    let writes = vec![
        (0, create("n1")),
        (1, create("n2")),
        (2, Prepared::Write(change("a", put))),
        (3, create("n3")),
        (4, Prepared::Answered(WriteOutcome::Unchanged)),
        (5, create("n4")),
        (6, create("n5")),
    ];
    let mut tx = Fake::with([task("a", 1, "requested")]);
    let outcomes = apply_transaction(&mut tx, writes, BASE).await.unwrap();
    let together = |ids: &[&str]| Step::PutTogether(ids.iter().map(|id| id.to_string()).collect());
    assert_eq!(
        tx.steps,
        [
            together(&["n1", "n2"]),
            Step::Load("a".into()),
            put_step("a", 2, Some(1), true),
            together(&["n3", "n4", "n5"]),
        ]
    );
    let answered: Vec<Option<(String, i64)>> = outcomes
        .iter()
        .map(|o| match o {
            WriteOutcome::Written(v) => Some((v.id.to_string(), v.version.get())),
            _ => None,
        })
        .collect();
    let written = |id: &str, v| Some((id.to_string(), v));
    assert_eq!(
        answered,
        [
            written("n1", 1),
            written("n2", 1),
            written("a", 2),
            written("n3", 1),
            None,
            written("n4", 1),
            written("n5", 1),
        ]
    );
    assert_eq!(tx.tasks["n5"].resource["meta"]["versionId"], "1");
}

/// A plain create is staged and its resource let go before its transaction (so nothing of it
/// travels to the writer and back); its write answers with the text it stored, which is the
/// resource as an unstaged create stamps it. A transaction's writes, creates and changes,
/// each answer with the text stored for it, in entry order.
#[tokio::test]
async fn writes_answer_with_the_text_they_stored() {
    let plain = json!({
        "resourceType": "Task", "status": "requested", "intent": "order",
        "description": "quotes \" and é",
    });
    let reads = Reads {
        found: Found::Nothing,
        seen: 0,
    };
    let create = || WriteRequest::Create {
        id: None,
        resource: plain.clone(),
        if_none_exist: None,
    };
    let Ok(Prepared::Write(write)) = prepare(&reads, create()).await else {
        panic!("a create is written");
    };
    assert!(matches!(write, TaskWrite::PlainCreate { .. }));
    assert!(is_single_put(&write));
    let mut tx = Fake::default();
    let Ok(WriteOutcome::Written(v)) = apply(&mut tx, write, BASE).await else {
        panic!("the create is written");
    };
    assert_eq!(v.resource, None);
    let mut expected = plain.clone();
    stamp(
        &mut expected,
        v.id.as_str(),
        Version::FIRST,
        &v.last_updated,
    );
    assert_eq!(v.text.as_deref(), Some(expected.to_string().as_str()));
    assert_eq!(tx.tasks[v.id.as_str()].resource, expected);
    assert_eq!(v.content().as_deref(), Some(&expected));

    // A create that does more than create (here, completes a request) keeps its resource.
    let completing = WriteRequest::Create {
        id: None,
        resource: request("abort", "f", OWNER),
        if_none_exist: None,
    };
    let Ok(Prepared::Write(write)) = prepare(&reads, completing).await else {
        panic!("a create is written");
    };
    assert!(matches!(
        write,
        TaskWrite::Create {
            staged: Some(_),
            ..
        }
    ));

    fn put() -> Result<Decision> {
        Ok(Decision::Put(
            json!({ "resourceType": "Task", "status": "in-progress", "intent": "order" }).into(),
        ))
    }
    let entries = vec![
        (0, create()),
        (
            1,
            WriteRequest::Change {
                id: TaskId::parse("a").unwrap(),
                decide: Box::new(|_| put()),
            },
        ),
        (2, create()),
    ];
    let writes = prepare_transaction(&reads, entries).await.unwrap();
    let mut tx = Fake::with([task("a", 1, "requested")]);
    let outcomes = apply_transaction(&mut tx, writes, BASE).await.unwrap();
    assert_eq!(outcomes.len(), 3);
    for (i, outcome) in outcomes.iter().enumerate() {
        let WriteOutcome::Written(v) = outcome else {
            panic!("entry {i} is written");
        };
        let stored = &tx.tasks[v.id.as_str()].resource;
        let text: Value = serde_json::from_str(v.text.as_deref().unwrap()).unwrap();
        assert_eq!(&text, stored, "entry {i}");
        assert_eq!(
            v.resource.is_some(),
            i == 1,
            "entry {i}: only the change keeps it"
        );
        assert_eq!(v.content().as_deref(), Some(stored), "entry {i}");
    }
}

/// A create staged before its transaction is stored byte for byte as one worked out inside
/// it: text, index rows (with `_lastUpdated`, first of the dates), columns, priority rank and
/// the resource returned.
#[test]
fn a_staged_create_stores_what_an_unstaged_one_does() {
    let tasks = [
        json!({ "resourceType": "Task", "status": "requested", "intent": "order" }),
        json!({
            "resourceType": "Task", "id": "client-chose-this", "status": "in-progress",
            "intent": "order", "priority": "stat",
            "meta": { "profile": ["http://example.org/p"], "lastUpdated": "2020-01-01T00:00:00Z",
                      "versionId": "7" },
            "owner": { "reference": "Practitioner/17" },
            "performerType": [{ "coding": [{ "system": "http://snomed.info/sct", "code": "223366009" }] }],
            "for": { "reference": "Patient/pt42" },
            "restriction": { "period": { "end": "2027-03-15T10:00:00+01:00" } },
            "authoredOn": "2026-12-01",
            "description": "quotes \" and backslashes \\ and é",
            "code": { "coding": [{ "system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill" }] },
        }),
        json!({
            "resourceType": "Task", "status": "requested", "intent": "plan",
            "performerType": [{ "text": "several" }, { "coding": [{ "code": "a" }] }, { "coding": [{ "code": "b" }] }],
            "note": [{ "text": "the mark's name without its NULs: baton:last-updated" }],
        }),
    ];
    for task in tasks {
        let id = TaskId::generate();
        let mut resource = task.clone();
        let staged = Staged::of(&id, &mut resource, BASE).expect("the mark occurs once");
        let now = StoredInstant::now();
        // What the writer does to a staged create's resource: only its instant is new.
        stamp_instant(&mut resource, &now);
        let mut expected = task.clone();
        stamp(&mut expected, id.as_str(), Version::FIRST, &now);
        assert_eq!(resource, expected);
        assert_eq!(
            resource.to_string(),
            expected.to_string(),
            "key order included"
        );
        let (text, rows, columns, rank) = staged.at(&now);
        let (want_text, want_rows, want_columns, want_rank) = unstaged(&expected, BASE);
        assert_eq!(text, want_text);
        assert_eq!(
            text,
            expected.to_string(),
            "the text `Value::to_string` writes"
        );
        assert_eq!(rows, want_rows);
        // The row's own instant, never an index row (`fhir::search::ON_THE_ROW`).
        assert!(!rows.dates.iter().any(|d| d.param == "_lastUpdated"));
        assert!(!rows.tokens.iter().any(|t| t.param == "_id"));
        assert_eq!(columns, want_columns);
        assert_eq!(rank, want_rank);
        // A plain create staged without stamping its resource (it has no id or meta) stores
        // the same, byte for byte.
        let has_id_or_meta = task.get("id").is_some() || task.get("meta").is_some();
        match Staged::unstamped(&id, &task, BASE) {
            None => assert!(has_id_or_meta, "{task}"),
            Some(unstamped) => {
                assert!(!has_id_or_meta, "{task}");
                let (text, rows, columns, rank) = unstamped.at(&now);
                assert_eq!(text, want_text);
                assert_eq!(
                    (rows, columns, rank),
                    (want_rows.clone(), want_columns.clone(), want_rank)
                );
            }
        }
    }
}

/// A Task that carries the mark itself (which validation refuses, as a control character) is
/// not staged, and `put` works it out itself.
#[test]
fn a_task_holding_the_mark_is_not_staged() {
    let mut task = json!({
        "resourceType": "Task", "status": "requested", "intent": "order",
        "description": LAST_UPDATED_MARK,
    });
    assert!(Staged::of(&TaskId::generate(), &mut task, BASE).is_none());
}
