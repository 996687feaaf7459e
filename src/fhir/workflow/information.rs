//! The fulfiller needs more information: the owner of a coordination Task asks its placer a
//! question with an information request Task — `code` `information-request` of
//! `WORKFLOW_TASK_SYSTEM`, `focus` on the coordination Task, owned by the placer (the
//! coordination Task's `requester`), asked by the fulfiller (`requester`), the question in
//! `input` (e.g. a `valueCanonical` Questionnaire or a `valueString`).
//!
//! While it is open the coordination Task's `businessStatus` is `WAITING` (written in the
//! request's transaction). When the placer completes it, the answer in its `output` (e.g. a
//! QuestionnaireResponse reference) is added to the coordination Task's `input` — the placer
//! supplies what was missing, where the fulfiller reads it — and the business status the
//! coordination Task had before it waited is restored (kept meanwhile in
//! `BEFORE_WAITING_EXTENSION`; removed when it had none), in the same transaction; rejecting,
//! cancelling or failing it only restores the business status. The fulfiller who asked reads
//! its request and may withdraw it (`cancelled`, `check_withdrawal`).

use serde_json::{Value, json};

use crate::error::{Error, IssueCode, Result};
use crate::fhir::ids::TaskId;
use crate::fhir::json;
use crate::fhir::task as task_rules;
use crate::fhir::{normalize_reference, workflow::focal_task};

/// Baton's code system for the workflow Tasks FHIR's task-code does not name.
pub const WORKFLOW_TASK_SYSTEM: &str = "https://baton.dev/fhir/CodeSystem/workflow-task";

/// The code of an information request.
pub const INFORMATION_REQUEST: &str = "information-request";

/// The code system of Baton's business statuses.
pub const BUSINESS_STATUS_SYSTEM: &str = "https://baton.dev/fhir/CodeSystem/business-status";

/// The business status of a coordination Task waiting for an answer from its placer.
pub const WAITING: &str = "waiting-for-information";

/// Where a waiting coordination Task keeps the `businessStatus` it had before it began to
/// wait (a `valueCodeableConcept`), so that closing the information request puts it back.
/// It lives on the coordination Task itself, which only the parties that read that Task see;
/// the information request is the placer's, who may not read the fulfiller's business status.
pub const BEFORE_WAITING_EXTENSION: &str =
    "https://baton.dev/fhir/StructureDefinition/business-status-before-waiting";

/// Whether this Task is an information request (by its `code`).
pub fn is_information_request(task: &Value) -> bool {
    json::at(task, "/code/coding")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| {
            c.get("system").and_then(Value::as_str) == Some(WORKFLOW_TASK_SYSTEM)
                && c.get("code").and_then(Value::as_str) == Some(INFORMATION_REQUEST)
        })
}

/// Checks the shape of an information request (400 for what needs no database): a question
/// in `input`, and a `focus` on a Task here. Returns the coordination Task's id; `None` for a
/// Task that is not an information request.
pub fn parse(task: &Value, base_url: &str) -> Result<Option<TaskId>> {
    if !is_information_request(task) {
        return Ok(None);
    }
    if task
        .get("input")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        return Err(Error::bad_request(
            IssueCode::Required,
            "an information request carries its question in Task.input (e.g. a valueCanonical \
             naming a Questionnaire, or a valueString)",
        )
        .at("Task.input"));
    }
    match focal_task(task, base_url) {
        Some(id) => Ok(Some(id)),
        None => Err(Error::bad_request(
            IssueCode::Required,
            "Task.focus of an information request must reference the coordination Task on this \
             server that it asks about (Task/{id})",
        )
        .at("Task.focus")),
    }
}

/// Checks a write by the practitioner who asked for an information request (its
/// `requester`, not its owner): it may only withdraw it, moving it from an open status to
/// `cancelled`, with a `statusReason` and `lastModified` if it likes; anything else is a 403
/// naming the first element it changes (422 for a request already closed). Withdrawing
/// closes the request like a refusal (`Transition::Closed`), so the coordination Task stops
/// waiting.
pub fn check_withdrawal(before: &Value, after: &Value) -> Result<()> {
    let status = task_rules::status(before).unwrap_or_default();
    if task_rules::is_terminal(status) {
        return Err(Error::business_rule(format!(
            "this information request is already {status}, so there is nothing to withdraw"
        ))
        .at("Task.status"));
    }
    if task_rules::status(after) != Some("cancelled") {
        return Err(Error::forbidden(
            "the practitioner who asked for information may only withdraw its request: set \
             Task.status to cancelled; the placer, its owner, answers or refuses it",
        )
        .at("Task.status"));
    }
    const MAY_CHANGE: &[&str] = &["status", "statusReason", "lastModified", "meta"];
    let keys = |task: &Value| -> Vec<String> {
        task.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut elements = keys(before);
    elements.extend(keys(after));
    elements.sort();
    elements.dedup();
    let changed = elements
        .iter()
        .filter(|e| !MAY_CHANGE.contains(&e.as_str()))
        .find(|e| before.get(e.as_str()) != after.get(e.as_str()));
    let tags = |task: &Value| {
        task.get("meta")
            .and_then(Value::as_object)
            .map(|meta| {
                meta.iter()
                    .filter(|(k, _)| !matches!(k.as_str(), "versionId" | "lastUpdated"))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let changed = changed
        .cloned()
        .or_else(|| (tags(before) != tags(after)).then(|| "meta".to_string()));
    match changed {
        None => Ok(()),
        Some(element) => Err(Error::forbidden(format!(
            "the practitioner who asked for information may only withdraw its request \
             (Task.status cancelled, with a statusReason); it may not change Task.{element}"
        ))
        .at(format!("Task.{element}"))),
    }
}

fn reference<'a>(task: &'a Value, element: &str) -> Option<&'a str> {
    task.get(element)?.get("reference")?.as_str()
}

/// Checks an information request against its coordination Task: the coordination Task is
/// open and has a placer (`requester`), the request is owned by that placer and asked by the
/// coordination Task's owner (422 otherwise).
pub fn check_against(request: &Value, coordination: &Value, base_url: &str) -> Result<()> {
    let id = coordination
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("?");
    let status = task_rules::status(coordination).unwrap_or_default();
    if task_rules::is_terminal(status) {
        return Err(Error::business_rule(format!(
            "Task/{id} is already {status}, so there is nothing left to ask about"
        ))
        .at("Task.focus"));
    }
    let normal = |r: Option<&str>| r.and_then(|r| normalize_reference(r, base_url));
    let Some(placer) = normal(reference(coordination, "requester")) else {
        return Err(Error::business_rule(format!(
            "Task/{id} names no placer (Task.requester), so there is nobody to ask"
        ))
        .at("Task.focus"));
    };
    if normal(reference(request, "owner")).as_deref() != Some(placer.as_str()) {
        return Err(Error::business_rule(format!(
            "an information request is addressed to the placer: Task.owner must be {placer}, \
             the requester of Task/{id}"
        ))
        .at("Task.owner"));
    }
    let fulfiller = task_rules::owner(coordination, base_url);
    if fulfiller.is_none() || normal(reference(request, "requester")) != fulfiller {
        return Err(Error::business_rule(format!(
            "an information request is asked by the fulfiller: Task.requester must be {}, the \
             owner of Task/{id}",
            fulfiller.unwrap_or_else(|| "its owner (it has none)".into())
        ))
        .at("Task.requester"));
    }
    Ok(())
}

/// What a write of an information request does to its coordination Task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Created open: the coordination Task waits.
    Opened,
    /// Moved to a final state (or created in one): the waiting ends, and a completion hands
    /// the answer over.
    Closed { completed: bool },
}

/// The transition a write from `previous` to `next` makes, if `next` is an information request.
pub fn transition(previous: Option<&Value>, next: &Value) -> Option<Transition> {
    if !is_information_request(next) {
        return None;
    }
    let open =
        |task: &Value| !task_rules::is_terminal(task_rules::status(task).unwrap_or_default());
    match previous {
        None if open(next) => Some(Transition::Opened),
        Some(before) if !open(before) => None,
        _ if open(next) => None,
        _ => Some(Transition::Closed {
            completed: task_rules::status(next) == Some("completed"),
        }),
    }
}

fn is_waiting(task: &Value) -> bool {
    json::at(task, "/businessStatus/coding")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| {
            c.get("system").and_then(Value::as_str) == Some(BUSINESS_STATUS_SYSTEM)
                && c.get("code").and_then(Value::as_str) == Some(WAITING)
        })
}

/// The `businessStatus` a waiting coordination Task had before it began to wait, if it had
/// one, taking the extension that kept it off the Task.
fn take_before_waiting(task: &mut Value) -> Option<Value> {
    let extensions = task.get_mut("extension")?.as_array_mut()?;
    let at = extensions
        .iter()
        .position(|e| e.get("url").and_then(Value::as_str) == Some(BEFORE_WAITING_EXTENSION))?;
    let kept = extensions.remove(at);
    if extensions.is_empty()
        && let Some(object) = task.as_object_mut()
    {
        object.remove("extension");
    }
    kept.get("valueCodeableConcept").cloned()
}

/// The coordination Task as the transition leaves it; `None` when it stays as it is. Opening
/// keeps the business status it replaces in `BEFORE_WAITING_EXTENSION`; closing puts that
/// back (or removes the waiting status when there was none). If the fulfiller changed the
/// business status meanwhile, its own value stands and only the kept one goes.
pub fn apply(
    transition: Transition,
    coordination: &Value,
    request: &Value,
) -> Result<Option<Value>> {
    let mut changed = coordination.clone();
    match transition {
        Transition::Opened => {
            if is_waiting(coordination) {
                return Ok(None);
            }
            take_before_waiting(&mut changed);
            if let Some(before) = coordination.get("businessStatus") {
                let kept =
                    json!({ "url": BEFORE_WAITING_EXTENSION, "valueCodeableConcept": before });
                match changed.get_mut("extension").and_then(Value::as_array_mut) {
                    Some(extensions) => extensions.push(kept),
                    None => changed["extension"] = json!([kept]),
                }
            }
            changed["businessStatus"] = json!({
                "coding": [{ "system": BUSINESS_STATUS_SYSTEM, "code": WAITING,
                             "display": "Waiting for information" }],
                "text": "waiting for information from the placer",
            });
        }
        Transition::Closed { completed } => {
            let outputs = request.get("output").and_then(Value::as_array);
            if completed && outputs.is_none_or(Vec::is_empty) {
                return Err(Error::bad_request(
                    IssueCode::Required,
                    "completing an information request gives the answer in Task.output (e.g. a \
                     valueReference to a QuestionnaireResponse, or a valueString)",
                )
                .at("Task.output"));
            }
            let before = take_before_waiting(&mut changed);
            if is_waiting(coordination) {
                match (before, changed.as_object_mut()) {
                    (Some(before), _) => changed["businessStatus"] = before,
                    (None, Some(object)) => {
                        object.remove("businessStatus");
                    }
                    (None, None) => {}
                }
            }
            if completed {
                let inputs = changed
                    .as_object_mut()
                    .map(|o| o.entry("input").or_insert_with(|| json!([])));
                if let Some(Value::Array(inputs)) = inputs {
                    inputs.extend(outputs.into_iter().flatten().cloned());
                }
            }
            if changed == *coordination {
                return Ok(None);
            }
        }
    }
    Ok(Some(changed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: &str = "http://h/fhir";

    fn ask(status: &str) -> Value {
        json!({
            "resourceType": "Task", "status": status, "intent": "order",
            "code": { "coding": [{ "system": WORKFLOW_TASK_SYSTEM, "code": INFORMATION_REQUEST }] },
            "focus": { "reference": "Task/c1" },
            "owner": { "reference": "Practitioner/placer" },
            "requester": { "reference": "Practitioner/bob" },
            "input": [{ "type": { "text": "question" }, "valueCanonical": "http://q.example/Questionnaire/allergies" }],
        })
    }

    fn coordination() -> Value {
        json!({ "resourceType": "Task", "id": "c1", "status": "in-progress", "intent": "plan",
                "owner": { "reference": "Practitioner/bob" },
                "requester": { "reference": "Practitioner/placer" } })
    }

    #[test]
    fn requests_need_a_question_and_a_coordination_task() {
        assert_eq!(parse(&ask("requested"), B).unwrap().unwrap().as_str(), "c1");
        assert_eq!(parse(&coordination(), B).unwrap(), None);
        let mut no_question = ask("requested");
        no_question.as_object_mut().unwrap().remove("input");
        let e = parse(&no_question, B).unwrap_err();
        assert_eq!(
            e.as_client().unwrap().expression.as_deref(),
            Some("Task.input")
        );
        let mut no_focus = ask("requested");
        no_focus["focus"] = json!({ "reference": "ServiceRequest/1" });
        let e = parse(&no_focus, B).unwrap_err();
        assert_eq!(
            e.as_client().unwrap().expression.as_deref(),
            Some("Task.focus")
        );
    }

    #[test]
    fn requests_go_from_the_fulfiller_to_the_placer_of_an_open_task() {
        check_against(&ask("requested"), &coordination(), B).unwrap();
        let with = |f: &dyn Fn(&mut Value, &mut Value)| {
            let (mut a, mut c) = (ask("requested"), coordination());
            f(&mut a, &mut c);
            check_against(&a, &c, B)
                .unwrap_err()
                .as_client()
                .unwrap()
                .expression
                .clone()
                .unwrap()
        };
        assert_eq!(with(&|_, c| c["status"] = json!("completed")), "Task.focus");
        assert_eq!(
            with(&|_, c| {
                c.as_object_mut().unwrap().remove("requester");
            }),
            "Task.focus"
        );
        assert_eq!(
            with(&|a, _| a["owner"] = json!({ "reference": "Practitioner/bob" })),
            "Task.owner"
        );
        assert_eq!(
            with(&|a, _| a["requester"] = json!({ "reference": "Practitioner/carol" })),
            "Task.requester"
        );
    }

    /// The status and expression of a refusal, or None when allowed.
    type Refusal = Option<(u16, &'static str)>;

    #[test]
    fn the_asker_may_only_withdraw_its_open_request() {
        let with = |f: &dyn Fn(&mut Value)| {
            let mut t = ask("cancelled");
            f(&mut t);
            t
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Value, Value, Refusal)> = vec![
            ("withdrawn", ask("requested"), ask("cancelled"), None),
            ("with a reason", ask("in-progress"), with(&|t| t["statusReason"] = json!({ "text": "asked the GP instead" })), None),
            ("server meta differs", ask("requested"), with(&|t| t["meta"] = json!({ "versionId": "9" })), None),
            ("completed by the asker", ask("requested"), ask("completed"), Some((403, "Task.status"))),
            ("question rewritten", ask("requested"), with(&|t| t["input"] = json!([])), Some((403, "Task.input"))),
            ("owner changed", ask("requested"), with(&|t| { t.as_object_mut().unwrap().remove("owner"); }), Some((403, "Task.owner"))),
            ("tagged", ask("requested"), with(&|t| t["meta"] = json!({ "tag": [{ "code": "x" }] })), Some((403, "Task.meta"))),
            ("already closed", ask("rejected"), ask("cancelled"), Some((422, "Task.status"))),
        ];
        for (label, before, after, expected) in cases {
            let result = check_withdrawal(&before, &after);
            match expected {
                None => assert!(result.is_ok(), "{label}: {result:?}"),
                Some((status, expression)) => {
                    let error = result.expect_err(label);
                    let client = error.as_client().unwrap();
                    assert_eq!(client.status.as_u16(), status, "{label}");
                    assert_eq!(client.expression.as_deref(), Some(expression), "{label}");
                }
            }
        }
    }

    #[test]
    fn the_coordination_task_waits_while_the_request_is_open() {
        use Transition::*;
        assert_eq!(transition(None, &ask("requested")), Some(Opened));
        assert_eq!(
            transition(Some(&ask("requested")), &ask("in-progress")),
            None
        );
        assert_eq!(
            transition(Some(&ask("requested")), &ask("completed")),
            Some(Closed { completed: true })
        );
        assert_eq!(
            transition(Some(&ask("requested")), &ask("rejected")),
            Some(Closed { completed: false })
        );
        assert_eq!(transition(Some(&ask("completed")), &ask("completed")), None);
        assert_eq!(transition(None, &coordination()), None);

        let waiting = apply(Opened, &coordination(), &ask("requested"))
            .unwrap()
            .unwrap();
        assert_eq!(waiting["businessStatus"]["coding"][0]["code"], WAITING);
        assert_eq!(
            apply(Opened, &waiting, &ask("requested")).unwrap(),
            None,
            "already waiting"
        );

        let mut answered = ask("completed");
        answered["output"] = json!([{ "type": { "text": "answer" }, "valueReference": { "reference": "QuestionnaireResponse/r1" } }]);
        let done = apply(Closed { completed: true }, &waiting, &answered)
            .unwrap()
            .unwrap();
        assert!(done.get("businessStatus").is_none(), "{done}");
        assert_eq!(
            done["input"][0]["valueReference"]["reference"],
            "QuestionnaireResponse/r1"
        );
        let e = apply(Closed { completed: true }, &waiting, &ask("completed")).unwrap_err();
        assert_eq!(
            e.as_client().unwrap().expression.as_deref(),
            Some("Task.output")
        );
        let refused = apply(Closed { completed: false }, &waiting, &ask("rejected"))
            .unwrap()
            .unwrap();
        assert_eq!(refused, coordination());

        // A business status the coordination Task had comes back when the waiting ends.
        let mut scheduled = coordination();
        scheduled["businessStatus"] = json!({ "text": "scheduled for Tuesday" });
        scheduled["extension"] = json!([{ "url": "urn:other", "valueString": "kept" }]);
        let waiting = apply(Opened, &scheduled, &ask("requested"))
            .unwrap()
            .unwrap();
        assert_eq!(waiting["businessStatus"]["coding"][0]["code"], WAITING);
        assert_eq!(waiting["extension"][1]["url"], BEFORE_WAITING_EXTENSION);
        for closing in [Closed { completed: true }, Closed { completed: false }] {
            let mut answered = ask("completed");
            answered["output"] = json!([{ "type": { "text": "answer" }, "valueString": "none" }]);
            let done = apply(closing, &waiting, &answered).unwrap().unwrap();
            assert_eq!(
                done["businessStatus"], scheduled["businessStatus"],
                "{done}"
            );
            assert_eq!(done["extension"], scheduled["extension"], "{done}");
        }
        // Changed meanwhile by the fulfiller: its value stands, the kept one goes.
        let mut moved_on = waiting.clone();
        moved_on["businessStatus"] = json!({ "text": "operated" });
        let done = apply(Closed { completed: false }, &moved_on, &ask("rejected"))
            .unwrap()
            .unwrap();
        assert_eq!(done["businessStatus"]["text"], "operated");
        assert_eq!(done["extension"], scheduled["extension"]);
    }
}
