//! Modification request Tasks: the `change` code of the task-code system. Either side asks
//! for a change to the focal Task — its priority, restriction period, description or one of
//! its inputs — and the other side approves by completing the request, which applies the
//! change to the focal Task in the same transaction, or refuses by rejecting it.
//!
//! The change travels in the request's `input`: each input whose `type` carries a coding of
//! `CHANGE_SYSTEM` sets the element its code names to the input's `value[x]`:
//!
//! | code | value | effect on the focal Task |
//! |---|---|---|
//! | `priority` | `valueCode` (routine, urgent, asap, stat) | `priority` |
//! | `restriction-period` | `valuePeriod` | `restriction.period` |
//! | `description` | `valueString` | `description` |
//! | `input` | any `value[x]`; `type` also carries the coding of the input to set | the focal input with that coding replaced, or one added |
//!
//! A request whose `focus` names a version (`Task/1/_history/3`) was made against that version
//! and applies only while the focal Task is still at it (409 otherwise: the focal Task changed
//! since, so the request is rejected and asked again).

use serde_json::{Map, Value};

use crate::error::{Error, IssueCode, Result};
use crate::fhir::ids::Version;
use crate::fhir::json;
use crate::fhir::task as task_rules;
use crate::fhir::workflow::elements;

/// The code system naming the element an input of a modification request sets.
pub const CHANGE_SYSTEM: &str = "https://baton.dev/fhir/CodeSystem/task-change";

/// What one input of a modification request sets.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    Priority(String),
    RestrictionPeriod(Value),
    Description(String),
    /// The focal input whose `type` has this coding (system, code) gets this `value[x]`.
    Input {
        system: Option<String>,
        code: String,
        value_key: String,
        value: Value,
    },
}

const PRIORITIES: &[&str] = &["routine", "urgent", "asap", "stat"];

/// The edits a modification request asks for, refusing any it cannot honour: an element that
/// is fixed at creation (422), one a modification request does not set (400), a value of the
/// wrong type (400), or no edit at all (400). Each error names the request's input.
pub fn parse_edits(request: &Value) -> Result<Vec<Edit>> {
    let mut edits = Vec::new();
    let inputs = request.get("input").and_then(Value::as_array);
    for (i, input) in inputs.into_iter().flatten().enumerate() {
        let at = format!("Task.input[{i}]");
        let codings = json::at(input, "/type/coding").and_then(Value::as_array);
        let mut codings = codings.into_iter().flatten();
        let Some(element) = codings
            .clone()
            .find(|c| c.get("system").and_then(Value::as_str) == Some(CHANGE_SYSTEM))
            .and_then(|c| c.get("code").and_then(Value::as_str))
        else {
            continue;
        };
        let (value_key, value) = value_of(input).ok_or_else(|| {
            Error::bad_request(
                IssueCode::Required,
                format!("{at} asks to change {element} but has no value[x] to set it to"),
            )
            .at(format!("{at}.value[x]"))
        })?;
        let wrong_type = |expected: &str| {
            Error::invalid(
                format!("{at}.{value_key}"),
                format!("{at} sets Task.{element}, which takes {expected}, not {value_key}"),
            )
        };
        let edit = match element {
            "priority" => match (value_key.as_str(), value.as_str()) {
                ("valueCode", Some(code)) if PRIORITIES.contains(&code) => {
                    Edit::Priority(code.to_string())
                }
                _ => return Err(wrong_type("a valueCode of routine, urgent, asap or stat")),
            },
            "restriction-period" if value_key == "valuePeriod" && value.is_object() => {
                Edit::RestrictionPeriod(value.clone())
            }
            "restriction-period" => return Err(wrong_type("a valuePeriod")),
            "description" => match value.as_str() {
                Some(text) if value_key == "valueString" => Edit::Description(text.to_string()),
                _ => return Err(wrong_type("a valueString")),
            },
            "input" => {
                let target = codings
                    .find(|c| c.get("system").and_then(Value::as_str) != Some(CHANGE_SYSTEM))
                    .and_then(|c| {
                        Some((
                            c.get("system").and_then(Value::as_str).map(String::from),
                            c.get("code")?.as_str()?.to_string(),
                        ))
                    });
                let Some((system, code)) = target else {
                    return Err(Error::bad_request(
                        IssueCode::Required,
                        format!(
                            "{at} sets an input of the focal Task: its type needs, besides the \
                             {CHANGE_SYSTEM} coding, the coding (system and code) of the input \
                             to set"
                        ),
                    )
                    .at(format!("{at}.type")));
                };
                Edit::Input {
                    system,
                    code,
                    value_key,
                    value: value.clone(),
                }
            }
            fixed if elements::FIXED.contains(&fixed) => {
                return Err(Error::business_rule(format!(
                    "{at} asks to change Task.{fixed}, which cannot change once the Task exists; \
                     a modification request cannot change it either"
                ))
                .at(at));
            }
            other => {
                return Err(Error::bad_request(
                    IssueCode::NotSupported,
                    format!(
                        "{at} asks to change '{other}', which a modification request does not \
                         set; it sets priority, restriction-period, description and input (the \
                         status and owner change through the Task itself, abort, suspend and \
                         resume requests)"
                    ),
                )
                .at(format!("{at}.type")));
            }
        };
        edits.push(edit);
    }
    if edits.is_empty() {
        return Err(Error::bad_request(
            IssueCode::Required,
            format!(
                "a modification request (code 'change') needs at least one Task.input whose type \
                 has a {CHANGE_SYSTEM} coding naming the element to change"
            ),
        )
        .at("Task.input"));
    }
    Ok(edits)
}

/// The `value[x]` of an input: its key and value.
fn value_of(input: &Value) -> Option<(String, &Value)> {
    input
        .as_object()?
        .iter()
        .find(|(key, _)| key.starts_with("value"))
        .map(|(key, value)| (key.clone(), value))
}

/// The version the request's `focus` names (`Task/1/_history/3`), if it names one.
pub fn pinned_version(request: &Value) -> Option<Result<Version>> {
    let reference = json::at(request, "/focus/reference")?.as_str()?;
    let (_, version) = reference.split_once("/_history/")?;
    Some(version.parse::<Version>().map_err(|_| {
        Error::invalid(
            "Task.focus.reference",
            format!("'{version}' in Task.focus is not a version number"),
        )
    }))
}

/// Refuses a request made against another version of the focal Task (409).
pub fn check_pinned(request: &Value, focal_version: Version) -> Result<()> {
    match pinned_version(request) {
        None => Ok(()),
        Some(Err(e)) => Err(e),
        Some(Ok(pinned)) if pinned == focal_version => Ok(()),
        Some(Ok(pinned)) => Err(Error::conflict(format!(
            "this modification request was made against version {pinned} of its focal Task, \
             which is now at version {focal_version}; reject it and ask again against the \
             current version"
        ))
        .at("Task.focus")),
    }
}

/// Who may write a modification request, and how. A modification request is owned by the
/// focal Task's owner (the fulfiller) whichever side asks, like every request Task; its
/// `requester` says who asked. The side that asked never answers: a request whose requester
/// is its owner was asked by the fulfiller, so only the placer (an admin) may complete or
/// reject it, and the fulfiller may only withdraw it (`cancelled`); one asked by the placer
/// is answered by the fulfiller. So that the direction cannot be turned around:
/// a practitioner creates a modification request only in its own name (`requester` = its
/// FHIR user), and nobody changes a modification request's `requester` afterwards.
pub fn check_request_write(
    admin: bool,
    fhir_user: Option<&str>,
    before: Option<&Value>,
    after: &Value,
    base_url: &str,
) -> Result<()> {
    let is_change = |task: &Value| super::request_kind(task) == Some(super::RequestKind::Change);
    if !is_change(after) && !before.is_some_and(is_change) {
        return Ok(());
    }
    let requester = |task: &Value| {
        json::at(task, "/requester/reference")
            .and_then(Value::as_str)
            .and_then(|r| crate::fhir::normalize_reference(r, base_url))
    };
    match before {
        Some(before) if requester(before) != requester(after) => {
            return Err(Error::business_rule(
                "Task.requester of a modification request says who asked for the change, so it \
                 cannot change; withdraw the request (cancelled) and ask anew",
            )
            .at("Task.requester"));
        }
        None if !admin && requester(after).as_deref() != fhir_user => {
            return Err(Error::forbidden(format!(
                "a practitioner asks for a change in its own name: Task.requester must be {}",
                fhir_user.unwrap_or_default()
            ))
            .at("Task.requester"));
        }
        _ => {}
    }
    let answered =
        |task: &Value| matches!(task_rules::status(task), Some("completed" | "rejected"));
    let answers_now = answered(after) && !before.is_some_and(answered);
    let asked_by_owner =
        requester(after).is_some() && requester(after) == task_rules::owner(after, base_url);
    if answers_now && asked_by_owner && !admin {
        return Err(Error::forbidden(
            "this modification request was asked by the focal Task's owner, so the placer \
             answers it (completed applies the change, rejected refuses it); the asker may only \
             withdraw it by setting status to cancelled",
        )
        .at("Task.status"));
    }
    Ok(())
}

/// The focal Task with the request's edits applied, checked as a Task Baton stores.
pub fn apply_change(focal: &Value, request: &Value, base_url: &str) -> Result<Value> {
    let edits = parse_edits(request)?;
    let mut changed = focal.clone();
    let Some(task) = changed.as_object_mut() else {
        return Err(Error::internal(
            "apply_change",
            "the focal Task is not an object",
        ));
    };
    for edit in edits {
        match edit {
            Edit::Priority(code) => {
                task.insert("priority".into(), Value::from(code));
            }
            Edit::Description(text) => {
                task.insert("description".into(), Value::from(text));
            }
            Edit::RestrictionPeriod(period) => {
                let restriction = task
                    .entry("restriction")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !restriction.is_object() {
                    *restriction = Value::Object(Map::new());
                }
                restriction["period"] = period;
            }
            Edit::Input {
                system,
                code,
                value_key,
                value,
            } => {
                let inputs = task
                    .entry("input")
                    .or_insert_with(|| Value::Array(Vec::new()));
                let Some(inputs) = inputs.as_array_mut() else {
                    return Err(Error::internal(
                        "apply_change",
                        "Task.input is not an array",
                    ));
                };
                let has_coding = |input: &Value| {
                    json::at(input, "/type/coding")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .any(|c| {
                            c.get("code").and_then(Value::as_str) == Some(code.as_str())
                                && c.get("system").and_then(Value::as_str) == system.as_deref()
                        })
                };
                let mut coding = Map::new();
                if let Some(system) = &system {
                    coding.insert("system".into(), Value::from(system.as_str()));
                }
                coding.insert("code".into(), Value::from(code.as_str()));
                let mut new_input = Map::new();
                new_input.insert(
                    "type".into(),
                    serde_json::json!({ "coding": [Value::Object(coding)] }),
                );
                new_input.insert(value_key, value);
                match inputs.iter_mut().find(|i| has_coding(i)) {
                    Some(existing) => {
                        // The input keeps its own type (and any text or other codings); only
                        // its value is replaced.
                        if let Some(object) = existing.as_object_mut() {
                            object.retain(|key, _| !key.starts_with("value"));
                            for (key, value) in new_input.into_iter().filter(|(k, _)| k != "type") {
                                object.insert(key, value);
                            }
                        }
                    }
                    None => inputs.push(Value::Object(new_input)),
                }
            }
        }
    }
    task_rules::validate_task(&changed, base_url).map_err(|e| {
        Error::business_rule(format!(
            "the focal Task would not be a valid Task with this change: {}",
            e.as_client()
                .map_or_else(String::new, |c| c.diagnostics.clone())
        ))
        .at("Task.input")
    })?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use serde_json::json;

    fn change(inputs: Value) -> Value {
        json!({ "resourceType": "Task", "status": "requested", "intent": "order",
                "focus": { "reference": "Task/f1" }, "input": inputs })
    }

    fn edit(code: &str, value: Value) -> Value {
        let mut input =
            json!({ "type": { "coding": [{ "system": CHANGE_SYSTEM, "code": code }] } });
        for (k, v) in value.as_object().unwrap() {
            input[k] = v.clone();
        }
        input
    }

    #[test]
    fn edits_are_read_from_the_change_inputs() {
        let request = change(json!([
            { "type": { "text": "ignored" }, "valueString": "not a change" },
            edit("priority", json!({ "valueCode": "stat" })),
            edit("restriction-period", json!({ "valuePeriod": { "end": "2026-05-01" } })),
            {
                "type": { "coding": [
                    { "system": CHANGE_SYSTEM, "code": "input" },
                    { "system": "http://loinc.org", "code": "1975-2" },
                ] },
                "valueString": "fasting",
            },
        ]));
        assert_eq!(
            parse_edits(&request).unwrap(),
            vec![
                Edit::Priority("stat".into()),
                Edit::RestrictionPeriod(json!({ "end": "2026-05-01" })),
                Edit::Input {
                    system: Some("http://loinc.org".into()),
                    code: "1975-2".into(),
                    value_key: "valueString".into(),
                    value: json!("fasting"),
                },
            ]
        );
    }

    #[test]
    fn edits_that_cannot_be_honoured_are_refused_naming_the_input() {
        #[rustfmt::skip]
        let cases: Vec<(Value, StatusCode, &str)> = vec![
            (json!([]), StatusCode::BAD_REQUEST, "Task.input"),
            (json!([edit("intent", json!({ "valueCode": "plan" }))]), StatusCode::UNPROCESSABLE_ENTITY, "Task.input[0]"),
            (json!([edit("authoredOn", json!({ "valueDateTime": "2026-01-01" }))]), StatusCode::UNPROCESSABLE_ENTITY, "Task.input[0]"),
            (json!([edit("owner", json!({ "valueReference": { "reference": "Practitioner/x" } }))]), StatusCode::BAD_REQUEST, "Task.input[0].type"),
            (json!([edit("priority", json!({ "valueCode": "whenever" }))]), StatusCode::BAD_REQUEST, "Task.input[0].valueCode"),
            (json!([edit("priority", json!({}))]), StatusCode::BAD_REQUEST, "Task.input[0].value[x]"),
            (json!([edit("input", json!({ "valueString": "x" }))]), StatusCode::BAD_REQUEST, "Task.input[0].type"),
        ];
        for (inputs, status, at) in cases {
            let error = parse_edits(&change(inputs.clone())).expect_err(&inputs.to_string());
            let client = error.as_client().unwrap();
            assert_eq!(
                (client.status, client.expression.as_deref()),
                (status, Some(at)),
                "{inputs}"
            );
        }
    }

    #[test]
    fn a_change_sets_elements_and_replaces_or_adds_inputs() {
        let focal = json!({
            "resourceType": "Task", "id": "f1", "status": "in-progress", "intent": "order",
            "priority": "routine",
            "input": [{ "type": { "coding": [{ "system": "http://loinc.org", "code": "1975-2" }], "text": "bilirubin" },
                        "valueString": "old" }],
        });
        let request = change(json!([
            edit("priority", json!({ "valueCode": "urgent" })),
            edit("restriction-period", json!({ "valuePeriod": { "end": "2026-05-01" } })),
            { "type": { "coding": [{ "system": CHANGE_SYSTEM, "code": "input" }, { "system": "http://loinc.org", "code": "1975-2" }] },
              "valueBoolean": true },
            { "type": { "coding": [{ "system": CHANGE_SYSTEM, "code": "input" }, { "code": "note" }] },
              "valueString": "call first" },
        ]));
        let changed = apply_change(&focal, &request, "http://h/fhir").unwrap();
        assert_eq!(changed["priority"], "urgent");
        assert_eq!(changed["restriction"]["period"]["end"], "2026-05-01");
        assert_eq!(changed["input"][0]["type"]["text"], "bilirubin");
        assert_eq!(changed["input"][0]["valueBoolean"], true);
        assert!(changed["input"][0].get("valueString").is_none());
        assert_eq!(changed["input"][1]["valueString"], "call first");
        assert_eq!(changed["status"], "in-progress");
    }

    #[test]
    fn a_pinned_version_must_still_be_current() {
        let mut request = change(json!([]));
        assert!(check_pinned(&request, Version::FIRST).is_ok());
        request["focus"]["reference"] = json!("Task/f1/_history/1");
        assert!(check_pinned(&request, Version::FIRST).is_ok());
        let error = check_pinned(&request, Version::FIRST.next()).unwrap_err();
        assert_eq!(error.as_client().unwrap().status, StatusCode::CONFLICT);
    }
}
