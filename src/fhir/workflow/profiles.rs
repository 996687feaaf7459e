//! The Task profiles of the workflow guidance that Baton checks when a Task declares them in
//! `meta.profile`: `coordination-task` (a Task that coordinates the fulfilment of a request)
//! and `cancellation-request-task` (a request to cancel one). A profile is recognised by its
//! canonical's last path segments, `…/StructureDefinition/<name>` (with or without
//! `|version`), e.g. `https://baton.dev/fhir/StructureDefinition/coordination-task`. Other
//! declared profiles are not checked. A Task that violates a declared profile is refused with
//! a 422 whose expression names the element and whose diagnostics name the rule.

use serde_json::Value;

use crate::error::{Error, IssueCode, Result};
use crate::fhir::json;
use crate::fhir::workflow::TASK_CODE_SYSTEM;

/// One rule of a profile.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// The element must be present (cardinality 1..).
    Required(&'static str),
    /// The element must have this code (a `code`, or a CodeableConcept with this coding).
    Fixed(&'static str, Option<&'static str>, &'static str),
}

/// The profiles Baton checks, with their rules.
const PROFILES: &[(&str, &[Rule])] = &[
    (
        "coordination-task",
        &[
            Rule::Fixed("code", Some(TASK_CODE_SYSTEM), "fulfill"),
            Rule::Fixed("intent", None, "order"),
            Rule::Required("focus"),
            Rule::Required("requester"),
        ],
    ),
    (
        "cancellation-request-task",
        &[
            Rule::Fixed("code", Some(TASK_CODE_SYSTEM), "abort"),
            Rule::Required("focus"),
            Rule::Required("requester"),
        ],
    ),
];

/// The name of a profile Baton checks that `canonical` names.
fn profile_name(canonical: &str) -> Option<&'static str> {
    let url = canonical.split('|').next().unwrap_or(canonical);
    let name = url
        .strip_suffix('/')
        .unwrap_or(url)
        .rsplit_once("/StructureDefinition/")?
        .1;
    PROFILES.iter().map(|(n, _)| *n).find(|n| *n == name)
}

fn holds(task: &Value, rule: Rule) -> bool {
    match rule {
        Rule::Required(element) => task
            .get(element)
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty())),
        Rule::Fixed(element, system, code) => match task.get(element) {
            Some(Value::String(value)) => value == code,
            Some(concept) => concept
                .get("coding")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|c| {
                    c.get("code").and_then(Value::as_str) == Some(code)
                        && (system.is_none() || c.get("system").and_then(Value::as_str) == system)
                }),
            None => false,
        },
    }
}

/// Checks a Task against every profile it declares that Baton knows.
pub fn check_declared(task: &Value) -> Result<()> {
    let declared = json::at(task, "/meta/profile")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(profile_name);
    for name in declared {
        let rules = PROFILES
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(&[][..], |(_, r)| *r);
        if let Some(rule) = rules.iter().copied().find(|r| !holds(task, *r)) {
            let (element, what) = match rule {
                Rule::Required(element) => (element, format!("Task.{element} is required (1..*)")),
                Rule::Fixed(element, system, code) => (
                    element,
                    format!(
                        "Task.{element} is fixed to {}{code}",
                        system.map_or_else(String::new, |s| format!("{s}|"))
                    ),
                ),
            };
            return Err(Error::client(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                IssueCode::Invariant,
                format!("the Task declares the {name} profile, whose rule says: {what}"),
            )
            .at(format!("Task.{element}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn coordination() -> Value {
        json!({ "resourceType": "Task", "status": "requested", "intent": "order",
                "meta": { "profile": ["https://baton.dev/fhir/StructureDefinition/coordination-task|1.0"] },
                "code": { "coding": [{ "system": TASK_CODE_SYSTEM, "code": "fulfill" }] },
                "focus": { "reference": "ServiceRequest/1" },
                "requester": { "reference": "Practitioner/placer" } })
    }

    #[test]
    fn declared_profiles_are_checked_rule_by_rule() {
        check_declared(&coordination()).unwrap();
        let with = |f: &dyn Fn(&mut Value)| {
            let mut t = coordination();
            f(&mut t);
            check_declared(&t)
                .unwrap_err()
                .as_client()
                .unwrap()
                .expression
                .clone()
                .unwrap()
        };
        assert_eq!(with(&|t| t["intent"] = json!("plan")), "Task.intent");
        assert_eq!(
            with(&|t| {
                t.as_object_mut().unwrap().remove("focus");
            }),
            "Task.focus"
        );
        assert_eq!(
            with(&|t| t["code"]["coding"][0]["code"] = json!("abort")),
            "Task.code"
        );
        assert_eq!(
            with(&|t| t["meta"]["profile"] =
                json!(["http://x/StructureDefinition/cancellation-request-task"])),
            "Task.code"
        );
        let mut cancel = coordination();
        cancel["meta"]["profile"] =
            json!(["http://x/StructureDefinition/cancellation-request-task"]);
        cancel["code"]["coding"][0]["code"] = json!("abort");
        cancel["intent"] = json!("proposal");
        check_declared(&cancel).unwrap();
        // Profiles Baton does not know are not checked, nor are undeclared ones.
        let mut other = json!({ "resourceType": "Task", "status": "requested", "intent": "plan" });
        check_declared(&other).unwrap();
        other["meta"] = json!({ "profile": ["http://x/StructureDefinition/something-else"] });
        check_declared(&other).unwrap();
    }
}
