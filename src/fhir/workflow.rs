//! Request Tasks with effect: the FHIR workflow pattern in which one party asks the owner of a
//! Task to stop, pause or continue it by creating a second Task. Such a request Task has a
//! `code` from `http://hl7.org/fhir/CodeSystem/task-code` (`abort`, `suspend` or `resume`) and
//! a `focus` naming the Task it is about, the focal Task. It is addressed to the focal Task's
//! owner, so its own `owner` is the focal Task's owner. When the owner completes it, the store
//! applies the change to the focal Task in the same transaction; when the owner rejects it,
//! nothing else happens.
//!
//! Everything here is pure: the store and the API load the Tasks and call these functions,
//! so the same rules decide at creation (for a clear answer to the placer) and, again, inside
//! the transaction that completes the request (where they cannot race another write).

pub mod bidding;
pub mod change;
pub mod elements;
pub mod information;
pub mod profiles;

use serde_json::Value;

use crate::error::{Error, IssueCode, Result};
use crate::fhir::ids::{TaskId, Version};
use crate::fhir::json;
use crate::fhir::task::{self as task_rules};
use crate::fhir::{MULTI_FOCUS_EXTENSION, normalize_reference};

/// The codes (of `information::WORKFLOW_TASK_SYSTEM`) of the workflow Tasks a practitioner
/// reads because it asked for them (`asked_by`).
pub const ASKED_FOR_CODES: &[&str] = &[bidding::BID, information::INFORMATION_REQUEST];

/// Who asked for this Task, when it is one of the workflow Tasks whose asker reads it without
/// owning it: a bid, which its bidding Task's placer reads (the store keeps a bid's
/// `requester` equal to its bidding Task's, and neither changes), and an information request,
/// which the fulfiller who sent it reads (and may withdraw). The normalised `requester`
/// reference; `None` for any other Task, or one without a `requester`.
pub fn asked_by(task: &Value, base_url: &str) -> Option<String> {
    if !bidding::is_bid(task) && !information::is_information_request(task) {
        return None;
    }
    let reference = json::at(task, "/requester/reference")?.as_str()?;
    normalize_reference(reference, base_url)
}

/// The code system of the request codes (http://hl7.org/fhir/CodeSystem/task-code).
pub const TASK_CODE_SYSTEM: &str = "http://hl7.org/fhir/CodeSystem/task-code";

/// What a request Task asks of its focal Task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Stop for good: the focal Task becomes `cancelled`.
    Abort,
    /// Pause: the focal Task becomes `on-hold`.
    Suspend,
    /// Continue: the focal Task returns to the status it had before it was put on hold.
    Resume,
    /// Modify: the edits in the request's inputs are applied to the focal Task
    /// (`workflow::change`).
    Change,
}

impl RequestKind {
    /// The `task-code` code that asks for this change.
    pub fn code(self) -> &'static str {
        match self {
            RequestKind::Abort => "abort",
            RequestKind::Suspend => "suspend",
            RequestKind::Resume => "resume",
            RequestKind::Change => "change",
        }
    }

    fn from_code(code: &str) -> Option<RequestKind> {
        match code {
            "abort" => Some(RequestKind::Abort),
            "suspend" => Some(RequestKind::Suspend),
            "resume" => Some(RequestKind::Resume),
            "change" => Some(RequestKind::Change),
            _ => None,
        }
    }
}

/// A well-formed request Task: what it asks, and of which Task (by id, on this server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub focal_id: TaskId,
}

/// Every request code among `code.coding`, in order.
fn request_kinds(task: &Value) -> impl Iterator<Item = RequestKind> + '_ {
    json::at(task, "/code/coding")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|coding| coding.get("system").and_then(Value::as_str) == Some(TASK_CODE_SYSTEM))
        .filter_map(|coding| RequestKind::from_code(coding.get("code")?.as_str()?))
}

/// What this Task asks of its focal Task, if it is a request Task (judged by `code` alone).
pub fn request_kind(task: &Value) -> Option<RequestKind> {
    request_kinds(task).next()
}

/// The id of the Task that `focus` references, when it references a Task on this server
/// (`Task/1`, `{base_url}/Task/1`, or either with `/_history/N`).
pub fn focal_task(task: &Value, base_url: &str) -> Option<TaskId> {
    let reference = json::at(task, "/focus/reference")?.as_str()?;
    let local = normalize_reference(reference, base_url)?;
    TaskId::parse(local.strip_prefix("Task/")?).ok()
}

/// Checks the shape of a request Task: `Ok(None)` for a Task that is not a request, the
/// request for one whose `focus` names a Task here, and a 400 OperationOutcome otherwise.
/// It needs no database, so it runs before anything is loaded.
pub fn parse_request(task: &Value, base_url: &str) -> Result<Option<Request>> {
    let mut kinds = request_kinds(task);
    let Some(kind) = kinds.next() else {
        return Ok(None);
    };
    if let Some(other) = kinds.find(|k| *k != kind) {
        return Err(Error::invalid(
            "Task.code",
            format!(
                "Task.code asks for both {} and {}; a request Task asks for one change",
                kind.code(),
                other.code()
            ),
        ));
    }
    let code = kind.code();
    // A request acts on exactly one Task. Grouped focus would make one completion change
    // several Tasks, which Baton does not do, so it is refused rather than half honoured.
    let grouped = task
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|e| e.get("url").and_then(Value::as_str) == Some(MULTI_FOCUS_EXTENSION));
    if grouped {
        return Err(Error::not_supported(format!(
            "this {code} request acts on the one Task in Task.focus; the multi-focus extension \
             ({MULTI_FOCUS_EXTENSION}) is not supported on request Tasks"
        ))
        .at("Task.extension"));
    }
    let Some(focus) = task.get("focus") else {
        return Err(Error::bad_request(
            IssueCode::Required,
            format!("Task.focus is required on this {code} request: it names the Task to {code}"),
        )
        .at("Task.focus"));
    };
    if kind == RequestKind::Change {
        change::parse_edits(task)?;
        if let Some(Err(e)) = change::pinned_version(task) {
            return Err(e);
        }
    }
    match focal_task(task, base_url) {
        Some(focal_id) => Ok(Some(Request { kind, focal_id })),
        None => {
            let named = focus
                .get("reference")
                .and_then(Value::as_str)
                .map_or_else(|| "no literal reference".to_string(), |r| format!("'{r}'"));
            Err(Error::bad_request(
                IssueCode::Value,
                format!(
                    "Task.focus of this {code} request must reference the Task on this server that \
                     it asks to {code} (Task/{{id}}), not {named}"
                ),
            )
            .at("Task.focus.reference"))
        }
    }
}

/// The request whose effect a write must apply: `Some` when `next` is a request Task that
/// this write moves to `completed` (creating it completed counts too).
pub fn completes_request(previous: Option<&Value>, next: &Value) -> Option<RequestKind> {
    let completed = |task: &Value| task_rules::status(task) == Some("completed");
    let kind = request_kind(next)?;
    (completed(next) && !previous.is_some_and(completed)).then_some(kind)
}

/// Checks that the focal Task is in a state the request can act on: abort and suspend need an
/// open Task (suspend one not already on hold), resume needs a Task on hold. 422 otherwise.
pub fn check_request(kind: RequestKind, focal: &Value) -> Result<()> {
    let id = task_id(focal);
    let status = task_rules::status(focal).unwrap_or_default();
    let code = kind.code();
    let problem = if task_rules::is_terminal(status) {
        Some(format!(
            "Task/{id} is already {status}, a final state, so there is nothing left to {code}"
        ))
    } else {
        match kind {
            RequestKind::Suspend if status == "on-hold" => Some(format!(
                "Task/{id} is already on hold; it cannot be suspended twice"
            )),
            RequestKind::Resume if status != "on-hold" => Some(format!(
                "Task/{id} is {status}, not on hold; only a Task on hold can be resumed"
            )),
            _ => None,
        }
    };
    match problem {
        Some(problem) => Err(Error::business_rule(problem).at("Task.focus")),
        None => Ok(()),
    }
}

/// Checks that the request is addressed to the focal Task's owner: both have the same owner,
/// or neither has one. Whoever may complete the request is then someone who may change the
/// focal Task, so completing a request never grants more than the role rules already do.
pub fn check_addressee(request: &Value, focal: &Value, base_url: &str) -> Result<()> {
    let addressee = task_rules::owner(request, base_url);
    let owner = task_rules::owner(focal, base_url);
    if addressee == owner {
        return Ok(());
    }
    let id = task_id(focal);
    let problem = match (addressee, owner) {
        (_, Some(owner)) => format!(
            "a request is addressed to the owner of its focal Task: Task.owner must be {owner}, \
             who owns Task/{id}"
        ),
        (addressee, None) => format!(
            "Task/{id} has no owner, so a request about it has none either: leave out \
             Task.owner (it is {})",
            addressee.unwrap_or_default()
        ),
    };
    Err(Error::business_rule(problem).at("Task.owner"))
}

/// The focal Task as the completed request leaves it: abort → `cancelled`, suspend →
/// `on-hold`, resume → `status_before_hold` (the status before the current on-hold streak),
/// change → the request's edits applied (`change::apply_change`, made against
/// `focal_version` if the request names a version). For a status change, the request's
/// `statusReason` replaces the focal Task's, which explained a status it no longer has;
/// without one, the old reason is removed. The result passes the state machine.
pub fn apply_request(
    kind: RequestKind,
    focal: &Value,
    focal_version: Version,
    request: &Value,
    status_before_hold: Option<&str>,
    base_url: &str,
) -> Result<Value> {
    check_request(kind, focal)?;
    let id = task_id(focal);
    let current = task_rules::status(focal).unwrap_or_default();
    let next = match kind {
        RequestKind::Change => {
            change::check_pinned(request, focal_version)?;
            return change::apply_change(focal, request, base_url);
        }
        RequestKind::Abort => "cancelled",
        RequestKind::Suspend => "on-hold",
        RequestKind::Resume => match status_before_hold {
            Some(status) if !task_rules::is_terminal(status) => status,
            Some(status) => {
                return Err(Error::business_rule(format!(
                    "Task/{id} was {status} before it was put on hold, a final state it cannot \
                     resume to"
                ))
                .at("Task.focus"));
            }
            None => {
                return Err(Error::business_rule(format!(
                    "Task/{id} has been on hold since it was created, so there is no earlier \
                     status to resume"
                ))
                .at("Task.focus"));
            }
        },
    };
    task_rules::check_transition(Some(current), next).map_err(|e| {
        Error::business_rule(format!("Task/{id} cannot be changed as requested: {e}"))
            .at("Task.focus")
    })?;
    let mut changed = focal.clone();
    changed["status"] = Value::from(next);
    match (request.get("statusReason"), changed.as_object_mut()) {
        (Some(reason), _) => changed["statusReason"] = reason.clone(),
        (None, Some(object)) => {
            object.remove("statusReason");
        }
        (None, None) => {}
    }
    Ok(changed)
}

fn task_id(task: &Value) -> &str {
    task.get("id").and_then(Value::as_str).unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use serde_json::json;

    const BASE: &str = "http://h/fhir";

    fn request(code: &str, focus: Option<&str>) -> Value {
        let mut t = json!({
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "code": { "coding": [{ "system": TASK_CODE_SYSTEM, "code": code }] },
        });
        if let Some(focus) = focus {
            t["focus"] = json!({ "reference": focus });
        }
        t
    }

    fn focal(status: &str) -> Value {
        json!({ "resourceType": "Task", "id": "f1", "status": status, "intent": "order" })
    }

    fn client_error(result: Result<impl std::fmt::Debug>) -> (StatusCode, IssueCode, String) {
        let error = result.expect_err("expected a refusal");
        let client = error.as_client().expect("a client error");
        (
            client.status,
            client.code,
            client.expression.clone().unwrap_or_default(),
        )
    }

    #[test]
    fn request_kinds_come_from_the_task_code_system_only() {
        let cases: &[(Value, Option<RequestKind>)] = &[
            (request("abort", None), Some(RequestKind::Abort)),
            (request("suspend", None), Some(RequestKind::Suspend)),
            (request("resume", None), Some(RequestKind::Resume)),
            (request("fulfill", None), None),
            (
                json!({ "code": { "coding": [{ "system": "http://example.org", "code": "abort" }] } }),
                None,
            ),
            (json!({ "code": { "coding": [{ "code": "abort" }] } }), None),
            (json!({ "code": { "text": "abort" } }), None),
            (json!({ "status": "requested" }), None),
            (
                json!({ "code": { "coding": [
                    { "system": "http://loinc.org", "code": "1975-2" },
                    { "system": TASK_CODE_SYSTEM, "code": "suspend" },
                ] } }),
                Some(RequestKind::Suspend),
            ),
        ];
        for (task, expected) in cases {
            assert_eq!(request_kind(task), *expected, "{task}");
        }
    }

    #[test]
    fn focal_tasks_are_local_task_references() {
        let cases: &[(Option<&str>, Option<&str>)] = &[
            (Some("Task/f1"), Some("f1")),
            (Some("http://h/fhir/Task/f1"), Some("f1")),
            (Some("Task/f1/_history/3"), Some("f1")),
            (Some("https://other.example/fhir/Task/f1"), None),
            (Some("ServiceRequest/f1"), None),
            (Some("#f1"), None),
            (Some("not a reference"), None),
            (None, None),
        ];
        for (focus, expected) in cases {
            let task = request("abort", *focus);
            assert_eq!(
                focal_task(&task, BASE).as_ref().map(TaskId::as_str),
                *expected,
                "{focus:?}"
            );
        }
    }

    #[test]
    fn malformed_requests_are_refused_before_any_lookup() {
        use IssueCode::{Invalid, NotSupported, Required, Value as Val};
        let two_kinds = {
            let mut t = request("abort", Some("Task/f1"));
            t["code"]["coding"]
                .as_array_mut()
                .unwrap()
                .push(json!({ "system": TASK_CODE_SYSTEM, "code": "resume" }));
            t
        };
        let grouped = {
            let mut t = request("abort", Some("Task/f1"));
            t["extension"] = json!([{ "url": MULTI_FOCUS_EXTENSION, "valueReference": { "reference": "Task/f2" } }]);
            t
        };
        let identifier_only = {
            let mut t = request("suspend", None);
            t["focus"] = json!({ "identifier": { "value": "f1" } });
            t
        };
        #[rustfmt::skip]
        let cases: &[(&str, Value, IssueCode, &str)] = &[
            ("no focus", request("abort", None), Required, "Task.focus"),
            ("focus not a Task", request("abort", Some("ServiceRequest/1")), Val, "Task.focus.reference"),
            ("focus on another server", request("resume", Some("https://other/fhir/Task/1")), Val, "Task.focus.reference"),
            ("focus without a reference", identifier_only, Val, "Task.focus.reference"),
            ("two kinds", two_kinds, Invalid, "Task.code"),
            ("grouped focus", grouped, NotSupported, "Task.extension"),
        ];
        for (label, task, code, expression) in cases {
            let (status, issue, at) = client_error(parse_request(task, BASE));
            assert_eq!(status, StatusCode::BAD_REQUEST, "{label}");
            assert_eq!((issue, at.as_str()), (*code, *expression), "{label}");
        }
        assert_eq!(
            parse_request(&request("abort", Some("Task/f1")), BASE).unwrap(),
            Some(Request {
                kind: RequestKind::Abort,
                focal_id: TaskId::parse("f1").unwrap()
            })
        );
        assert_eq!(parse_request(&focal("requested"), BASE).unwrap(), None);
    }

    #[test]
    fn only_the_move_to_completed_applies_a_request() {
        let with_status = |task: &Value, status: &str| {
            let mut t = task.clone();
            t["status"] = json!(status);
            t
        };
        let abort = request("abort", Some("Task/f1"));
        let plain = focal("in-progress");
        #[rustfmt::skip]
        let cases: &[(&str, Option<Value>, Value, Option<RequestKind>)] = &[
            ("completed", Some(with_status(&abort, "in-progress")), with_status(&abort, "completed"), Some(RequestKind::Abort)),
            ("created completed", None, with_status(&abort, "completed"), Some(RequestKind::Abort)),
            ("already completed", Some(with_status(&abort, "completed")), with_status(&abort, "completed"), None),
            ("rejected", Some(abort.clone()), with_status(&abort, "rejected"), None),
            ("accepted", Some(abort.clone()), with_status(&abort, "accepted"), None),
            ("not a request", Some(plain.clone()), with_status(&plain, "completed"), None),
        ];
        for (label, previous, next, expected) in cases {
            assert_eq!(
                completes_request(previous.as_ref(), next),
                *expected,
                "{label}"
            );
        }
    }

    #[test]
    fn requests_need_a_focal_task_they_can_act_on() {
        use RequestKind::{Abort, Resume, Suspend};
        #[rustfmt::skip]
        let cases: &[(RequestKind, &str, bool)] = &[
            (Abort, "requested", true), (Abort, "in-progress", true), (Abort, "on-hold", true),
            (Abort, "completed", false), (Abort, "cancelled", false), (Abort, "entered-in-error", false),
            (Suspend, "in-progress", true), (Suspend, "accepted", true),
            (Suspend, "on-hold", false), (Suspend, "failed", false), (Suspend, "rejected", false),
            (Resume, "on-hold", true),
            (Resume, "in-progress", false), (Resume, "completed", false),
        ];
        for (kind, status, allowed) in cases {
            let result = check_request(*kind, &focal(status));
            assert_eq!(result.is_ok(), *allowed, "{kind:?} on {status}");
            if !allowed {
                let (code, issue, at) = client_error(result);
                assert_eq!(
                    code,
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "{kind:?} on {status}"
                );
                assert_eq!(
                    (issue, at.as_str()),
                    (IssueCode::BusinessRule, "Task.focus")
                );
            }
        }
    }

    #[test]
    fn requests_are_addressed_to_the_focal_owner() {
        let owned = |status: &str, owner: Option<&str>| {
            let mut t = focal(status);
            if let Some(owner) = owner {
                t["owner"] = json!({ "reference": owner });
            }
            t
        };
        #[rustfmt::skip]
        let cases: &[(Option<&str>, Option<&str>, bool)] = &[
            (Some("Practitioner/bob"), Some("Practitioner/bob"), true),
            (Some("http://h/fhir/Practitioner/bob"), Some("Practitioner/bob"), true),
            (None, None, true),
            (Some("Practitioner/alice"), Some("Practitioner/bob"), false),
            (None, Some("Practitioner/bob"), false),
            (Some("Practitioner/alice"), None, false),
        ];
        for (addressee, owner, allowed) in cases {
            let mut r = request("abort", Some("Task/f1"));
            if let Some(addressee) = addressee {
                r["owner"] = json!({ "reference": addressee });
            }
            let result = check_addressee(&r, &owned("in-progress", *owner), BASE);
            assert_eq!(result.is_ok(), *allowed, "{addressee:?} → {owner:?}");
            if !allowed {
                let (code, _, at) = client_error(result);
                assert_eq!(
                    (code, at.as_str()),
                    (StatusCode::UNPROCESSABLE_ENTITY, "Task.owner")
                );
            }
        }
    }

    #[test]
    fn applying_a_request_changes_status_and_reason() {
        use RequestKind::{Abort, Resume, Suspend};
        #[rustfmt::skip]
        let cases: &[(RequestKind, &str, Option<&str>, Option<&str>)] = &[
            (Abort, "in-progress", None, Some("cancelled")),
            (Abort, "on-hold", None, Some("cancelled")),
            (Abort, "requested", None, Some("cancelled")),
            (Suspend, "in-progress", None, Some("on-hold")),
            (Suspend, "ready", None, Some("on-hold")),
            (Resume, "on-hold", Some("in-progress"), Some("in-progress")),
            (Resume, "on-hold", Some("accepted"), Some("accepted")),
            // No status before the hold, one the state machine forbids, or a final one.
            (Resume, "on-hold", None, None),
            (Resume, "on-hold", Some("draft"), None),
            (Resume, "on-hold", Some("completed"), None),
            // The focal Task is in the wrong state.
            (Abort, "completed", None, None),
            (Suspend, "on-hold", None, None),
            (Resume, "in-progress", Some("in-progress"), None),
        ];
        let mut r = request("abort", Some("Task/f1"));
        r["statusReason"] = json!({ "text": "patient transferred" });
        for (kind, status, before_hold, expected) in cases {
            let mut f = focal(status);
            f["statusReason"] = json!({ "text": "old reason" });
            let result = apply_request(*kind, &f, Version::FIRST, &r, *before_hold, BASE);
            match expected {
                Some(next) => {
                    let changed = result.unwrap();
                    assert_eq!(changed["status"], *next, "{kind:?} on {status}");
                    assert_eq!(changed["statusReason"], r["statusReason"]);
                    assert_eq!(changed["id"], "f1");
                    task_rules::check_transition(Some(status), next).unwrap();
                }
                None => {
                    let (code, _, at) = client_error(result);
                    assert_eq!(
                        (code, at.as_str()),
                        (StatusCode::UNPROCESSABLE_ENTITY, "Task.focus"),
                        "{kind:?} on {status} after {before_hold:?}"
                    );
                }
            }
        }
        // Without a reason on the request, the focal Task's old reason goes.
        let changed = apply_request(
            Suspend,
            &{
                let mut f = focal("in-progress");
                f["statusReason"] = json!({ "text": "old" });
                f
            },
            Version::FIRST,
            &request("suspend", Some("Task/f1")),
            None,
            BASE,
        )
        .unwrap();
        assert!(changed.get("statusReason").is_none(), "{changed}");
    }
}
