//! Which elements of a Task may be rewritten after creation, and by whom.
//!
//! The FHIR workflow guidance separates the party who asks for work (the placer, who writes
//! the request) from the party who does it (the fulfiller, who holds the baton). A Task's
//! request-side elements say what was asked, for whom and on whose authority; the fulfiller
//! reports on the work through status, business status, owner, execution period, notes and
//! outputs, and asks for anything else to change through a modification request Task. Two
//! elements change for nobody: `intent` ("proposals/plans/orders may be promoted to other
//! intents, but only by creating a new resource instance", R4 Request pattern) and
//! `authoredOn` (when the Task was created).
//!
//! Pure: the API decides the side of the caller and calls `check_rewrite` with the version
//! it replaces, inside the write's decision, so a rule cannot race a concurrent write.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::fhir::json;
use crate::fhir::normalize_reference;
use crate::fhir::workflow::{bidding, information};

/// The two parties of the workflow guidance, as a write's author is one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Whoever placed the request: an admin (a placer system) or the practitioner named in
    /// the Task's `requester`.
    Placer,
    /// Any other practitioner allowed to change the Task: its owner, or a colleague claiming
    /// it from a role queue.
    Fulfiller,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Placer => "the placer",
            Side::Fulfiller => "the fulfiller",
        }
    }
}

/// Elements no write may change once the Task exists.
pub const FIXED: &[&str] = &["intent", "authoredOn"];

/// Elements that state the request: only the placer may change them; a fulfiller who needs
/// one changed asks with a modification request Task.
pub const PLACER_ONLY: &[&str] = &[
    "instantiatesCanonical",
    "instantiatesUri",
    "basedOn",
    "groupIdentifier",
    "code",
    "priority",
    "focus",
    "for",
    "encounter",
    "requester",
    "reasonCode",
    "reasonReference",
    "insurance",
    "restriction",
    "input",
];

/// The side a caller takes on a Task whose current version is `current`: admins are the
/// placer, and so is the practitioner the Task names as its `requester`; every other
/// practitioner is a fulfiller.
pub fn side_of(admin: bool, fhir_user: Option<&str>, current: &Value, base_url: &str) -> Side {
    if admin {
        return Side::Placer;
    }
    let requester = json::at(current, "/requester/reference")
        .and_then(Value::as_str)
        .and_then(|r| normalize_reference(r, base_url));
    match (requester, fhir_user) {
        (Some(requester), Some(me)) if requester == me => Side::Placer,
        _ => Side::Fulfiller,
    }
}

/// The workflow kinds whose links the read rule trusts (`auth::may_read_task` through
/// `workflow::asked_by`): a bid is read by the `requester` it shares with its bidding Task, an
/// information request by the `requester` who sent it. For these Tasks the kind itself (the
/// `code` that makes them one), `requester` and a bid's `partOf` are fixed at creation, where
/// the store checked them, so that nobody, an admin included, can later widen who reads them.
fn workflow_kind(task: &Value) -> Option<&'static str> {
    if bidding::is_bid(task) {
        Some(bidding::BID)
    } else if bidding::is_bidding(task) {
        Some(bidding::BIDDING)
    } else if information::is_information_request(task) {
        Some(information::INFORMATION_REQUEST)
    } else {
        None
    }
}

/// The element of a workflow Task (`workflow_kind`) that may not change from `before` to
/// `after`, if one does.
fn workflow_fixed(before: &Value, after: &Value) -> Option<&'static str> {
    let kind = workflow_kind(before);
    if kind != workflow_kind(after) {
        return Some("code");
    }
    let changed = |element: &str| before.get(element) != after.get(element);
    match kind {
        None => None,
        Some(kind) if kind == bidding::BID && changed("partOf") => Some("partOf"),
        Some(_) => changed("requester").then_some("requester"),
    }
}

/// The first element, in the order of the tables above, that `side` may not change from
/// `before` to `after` (an element added or removed counts as changed).
pub fn forbidden_change(side: Side, before: &Value, after: &Value) -> Option<(&'static str, bool)> {
    let changed = |element: &str| before.get(element) != after.get(element);
    if let Some(element) = FIXED.iter().copied().find(|e| changed(e)) {
        return Some((element, true));
    }
    if let Some(element) = workflow_fixed(before, after) {
        return Some((element, true));
    }
    match side {
        Side::Placer => None,
        Side::Fulfiller => PLACER_ONLY
            .iter()
            .copied()
            .find(|e| changed(e))
            .map(|e| (e, false)),
    }
}

/// Refuses a write by `side` that changes an element it may not: 422 for an element fixed at
/// creation, 403 for a request-side element changed by the fulfiller. The OperationOutcome's
/// expression names the element.
pub fn check_rewrite(side: Side, before: &Value, after: &Value) -> Result<()> {
    match forbidden_change(side, before, after) {
        None => Ok(()),
        Some((element, true)) => Err(Error::business_rule(format!(
            "Task.{element} cannot change once the Task exists; {}",
            match element {
                "intent" => {
                    "a request with another intent is a new Task (FHIR R4 Request pattern: \
                     intent is immutable)"
                }
                "authoredOn" => "it records when the Task was created",
                _ => {
                    "on a bid, a bidding Task or an information request it decides who reads \
                     the Task, and was checked when the Task was created"
                }
            }
        ))
        .at(format!("Task.{element}"))),
        Some((element, false)) => Err(Error::forbidden(format!(
            "Task.{element} states the request, so only the placer (an admin, or the \
             practitioner in Task.requester) may change it, not {}; ask for the change with a \
             modification request Task (code 'change' in http://hl7.org/fhir/CodeSystem/task-code)",
            side.name()
        ))
        .at(format!("Task.{element}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "resourceType": "Task", "id": "t", "status": "requested", "intent": "order",
            "priority": "routine", "authoredOn": "2026-01-01",
            "requester": { "reference": "Practitioner/placer" },
            "owner": { "reference": "Practitioner/bob" },
            "for": { "reference": "Patient/p" },
        })
    }

    #[test]
    fn the_caller_side_follows_role_and_requester() {
        let t = base();
        const B: &str = "http://h/fhir";
        assert_eq!(side_of(true, None, &t, B), Side::Placer);
        assert_eq!(
            side_of(false, Some("Practitioner/placer"), &t, B),
            Side::Placer
        );
        assert_eq!(
            side_of(false, Some("Practitioner/bob"), &t, B),
            Side::Fulfiller
        );
        let mut absolute = t.clone();
        absolute["requester"] = json!({ "reference": "http://h/fhir/Practitioner/bob" });
        assert_eq!(
            side_of(false, Some("Practitioner/bob"), &absolute, B),
            Side::Placer
        );
        let mut none = t;
        none.as_object_mut().unwrap().remove("requester");
        assert_eq!(
            side_of(false, Some("Practitioner/bob"), &none, B),
            Side::Fulfiller
        );
    }

    /// The refusal a side gets: its expression and status, or None when allowed.
    type Expected = Option<(&'static str, StatusCode)>;

    #[test]
    fn each_element_is_held_for_the_right_sides() {
        use Side::{Fulfiller, Placer};
        let with = |f: &dyn Fn(&mut Value)| {
            let mut t = base();
            f(&mut t);
            t
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Value, Expected, Expected)> = vec![
            ("intent", with(&|t| t["intent"] = json!("plan")),
                Some(("Task.intent", StatusCode::UNPROCESSABLE_ENTITY)), Some(("Task.intent", StatusCode::UNPROCESSABLE_ENTITY))),
            ("authoredOn removed", with(&|t| { t.as_object_mut().unwrap().remove("authoredOn"); }),
                Some(("Task.authoredOn", StatusCode::UNPROCESSABLE_ENTITY)), Some(("Task.authoredOn", StatusCode::UNPROCESSABLE_ENTITY))),
            ("priority", with(&|t| t["priority"] = json!("stat")), None, Some(("Task.priority", StatusCode::FORBIDDEN))),
            ("for", with(&|t| t["for"] = json!({ "reference": "Patient/q" })), None, Some(("Task.for", StatusCode::FORBIDDEN))),
            ("requester", with(&|t| t["requester"] = json!({ "reference": "Practitioner/bob" })), None, Some(("Task.requester", StatusCode::FORBIDDEN))),
            ("basedOn added", with(&|t| t["basedOn"] = json!([{ "reference": "ServiceRequest/1" }])), None, Some(("Task.basedOn", StatusCode::FORBIDDEN))),
            ("input", with(&|t| t["input"] = json!([{ "type": { "text": "x" }, "valueString": "y" }])), None, Some(("Task.input", StatusCode::FORBIDDEN))),
            ("status", with(&|t| t["status"] = json!("in-progress")), None, None),
            ("businessStatus", with(&|t| t["businessStatus"] = json!({ "text": "waiting" })), None, None),
            ("output", with(&|t| t["output"] = json!([{ "type": { "text": "x" }, "valueString": "y" }])), None, None),
            ("note", with(&|t| t["note"] = json!([{ "text": "called the patient" }])), None, None),
            ("owner", with(&|t| { t.as_object_mut().unwrap().remove("owner"); }), None, None),
        ];
        for (label, after, placer, fulfiller) in cases {
            for (side, expected) in [(Placer, placer), (Fulfiller, fulfiller)] {
                let result = check_rewrite(side, &base(), &after);
                match expected {
                    None => assert!(result.is_ok(), "{label} by {side:?}: {result:?}"),
                    Some((expression, status)) => {
                        let error = result.expect_err(label);
                        let client = error.as_client().expect("a client error");
                        assert_eq!(client.status, status, "{label} by {side:?}");
                        assert_eq!(client.expression.as_deref(), Some(expression), "{label}");
                    }
                }
            }
        }
        // Nothing changed is never refused.
        assert!(check_rewrite(Fulfiller, &base(), &base()).is_ok());
    }

    #[test]
    fn who_reads_a_workflow_task_is_fixed_at_creation() {
        use Side::Placer;
        let kind = |code: &str| {
            let mut t = base();
            t["code"] = json!({ "coding": [{ "system": information::WORKFLOW_TASK_SYSTEM, "code": code }] });
            t["partOf"] = json!([{ "reference": "Task/bt" }]);
            t
        };
        let with = |mut t: Value, f: &dyn Fn(&mut Value)| {
            f(&mut t);
            t
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Value, Value, Option<&str>)> = vec![
            ("made a bid", base(), kind("bid"), Some("Task.code")),
            ("no longer a bid", kind("bid"), base(), Some("Task.code")),
            ("bid to information request", kind("bid"), kind("information-request"), Some("Task.code")),
            ("bid's requester", kind("bid"), with(kind("bid"), &|t| t["requester"] = json!({ "reference": "Practitioner/eve" })), Some("Task.requester")),
            ("bid's parent", kind("bid"), with(kind("bid"), &|t| t["partOf"] = json!([{ "reference": "Task/other" }])), Some("Task.partOf")),
            ("bidding's requester", kind("bidding"), with(kind("bidding"), &|t| { t.as_object_mut().unwrap().remove("requester"); }), Some("Task.requester")),
            ("question's asker", kind("information-request"), with(kind("information-request"), &|t| t["requester"] = json!({ "reference": "Practitioner/eve" })), Some("Task.requester")),
            ("a question's parent is not held", kind("information-request"), with(kind("information-request"), &|t| t["partOf"] = json!([])), None),
            ("a plain Task's requester", base(), with(base(), &|t| t["requester"] = json!({ "reference": "Practitioner/eve" })), None),
        ];
        for (label, before, after, expected) in cases {
            // Even the placer (an admin) may not change these.
            let result = check_rewrite(Placer, &before, &after);
            match expected {
                None => assert!(result.is_ok(), "{label}: {result:?}"),
                Some(expression) => {
                    let error = result.expect_err(label);
                    let client = error.as_client().expect("a client error");
                    assert_eq!(client.status, StatusCode::UNPROCESSABLE_ENTITY, "{label}");
                    assert_eq!(client.expression.as_deref(), Some(expression), "{label}");
                }
            }
        }
    }
}
