//! The FHIR R4 `Task`: its code sets, the checks an incoming Task must pass, the status state
//! machine, and the few accessors that the store, the matcher and the access rules share.
//!
//! Validation is table-driven. Each R4 element definition Baton checks (Task itself and the
//! datatypes it uses) is a table of elements with their cardinality and type, and one generic
//! walker applies the FHIR JSON rules to it. Constraints that span several elements (the FHIR
//! invariants `per-1`, `ext-1`, `ref-1`, `dom-2`, `dom-3`, `dom-4`) are small functions hung on
//! the table they belong to. Everything here is pure: no IO, no clock.
//!
//! This file holds the code sets, the entry points and the accessors; the tables are in
//! `tables`, the walker in `walker` and the multi-element invariants in `invariants`.

use std::fmt::Display;

use serde_json::Value;

use crate::error::{Error, IssueCode, Result};
use crate::fhir::shape::{MAX_DEPTH, ShapeLimits, check_shape};
use crate::fhir::{check_text_content, normalize_reference};

mod invariants;
mod tables;
mod walker;

use tables::TASK;
use walker::{Context, Path, check_json_rules, check_object, element_repeats};

/// `Task.status` codes (http://hl7.org/fhir/task-status, R4 4.0.1).
pub const TASK_STATUSES: &[&str] = &[
    "draft",
    "requested",
    "received",
    "accepted",
    "rejected",
    "ready",
    "cancelled",
    "in-progress",
    "on-hold",
    "failed",
    "completed",
    "entered-in-error",
];

/// Statuses from which a Task does not move on, except to `entered-in-error`.
pub const TERMINAL_STATUSES: &[&str] = &[
    "completed",
    "cancelled",
    "failed",
    "rejected",
    "entered-in-error",
];

/// `Task.intent` codes (http://hl7.org/fhir/task-intent, R4 4.0.1).
pub const TASK_INTENTS: &[&str] = &[
    "unknown",
    "proposal",
    "plan",
    "order",
    "original-order",
    "reflex-order",
    "filler-order",
    "instance-order",
    "option",
];

/// `Task.priority` codes (http://hl7.org/fhir/request-priority).
pub const PRIORITIES: &[&str] = &["routine", "urgent", "asap", "stat"];

/// The resource types `Task.owner` may reference in R4.
const OWNER_TARGETS: &[&str] = &[
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "CareTeam",
    "HealthcareService",
    "Patient",
    "Device",
    "RelatedPerson",
];

/// The resource types `Task.requester` may reference in R4.
const REQUESTER_TARGETS: &[&str] = &[
    "Device",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
];

/// The resource types `Task.restriction.recipient` may reference in R4.
const RECIPIENT_TARGETS: &[&str] = &[
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
    "Group",
    "Organization",
];

const NARRATIVE_STATUSES: &[&str] = &["generated", "extensions", "additional", "empty"];
const IDENTIFIER_USES: &[&str] = &["usual", "official", "temp", "secondary", "old"];

/// `Reference.type` may name a core type by its StructureDefinition URL; this prefix is
/// stripped so that it compares equal to the plain type name.
const CORE_PROFILE_BASE: &str = "http://hl7.org/fhir/StructureDefinition/";

/// Checks an incoming R4 Task and reports the first problem as a 400 OperationOutcome whose
/// diagnostic starts with the offending element, which is also set as the issue expression.
/// A Task nested more than `shape::MAX_DEPTH` levels deep is refused before anything else is
/// walked; its size is the caller's to check (`shape::check_shape`), against the configured
/// body-size limit.
pub fn validate_task(resource: &Value, base_url: &str) -> Result<()> {
    let Value::Object(task) = resource else {
        return Err(fail(
            IssueCode::Structure,
            "Task",
            format_args!(
                "must be a JSON object holding a Task resource, not a JSON {}",
                json_type(resource)
            ),
        ));
    };
    // The resource type is checked before anything else, so that a client who posts the wrong
    // resource hears that, rather than a complaint about the first element Task lacks.
    let at = "Task.resourceType";
    match task.get("resourceType") {
        Some(Value::String(kind)) if kind == "Task" => {}
        Some(Value::String(kind)) => {
            return Err(Error::invalid(
                at,
                format!("{at} is '{kind}', but this endpoint accepts only Task resources"),
            ));
        }
        Some(other) => {
            return Err(fail(
                IssueCode::Structure,
                at,
                format_args!(
                    "must be the string \"Task\", not a JSON {}",
                    json_type(other)
                ),
            ));
        }
        None => {
            return Err(fail(
                IssueCode::Required,
                at,
                "is required and must be \"Task\"",
            ));
        }
    }
    // Depth first: it bounds the recursion of the walks below, and a resource nested past the
    // JSON parser's limit could be stored but never read back.
    check_shape(
        resource,
        ShapeLimits {
            max_bytes: usize::MAX,
            max_depth: MAX_DEPTH,
        },
        "Task",
    )?;
    let root = Path::Root("Task");
    check_json_rules(resource, &root)?;
    let contained = task
        .get("contained")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r.get("id")?.as_str()?, r.get("resourceType")?.as_str()?)))
        .collect();
    let cx = Context {
        base_url,
        contained,
    };
    check_object(task, &root, &TASK, &cx)?;
    // Contained resources are not walked element by element, so their strings and
    // narratives are checked here, with the Task's own.
    check_text_content(resource, "Task")
}

/// Whether the Task element at `names` (below `Task`, e.g. `["note"]`) repeats; `None` when
/// the tables know no such element.
pub fn repeats(names: &[&str]) -> Option<bool> {
    element_repeats(names)
}

/// Enforces the FHIR Task state machine on a status change, as a 422 `business-rule`.
/// `previous` is `None` when the Task is being created, which may start in any status.
pub fn check_transition(previous: Option<&str>, next: &str) -> Result<()> {
    let Some(previous) = previous else {
        return Ok(());
    };
    if previous == next {
        return Ok(());
    }
    let refusal = if previous == "entered-in-error" {
        format!(
            "Task status cannot change from entered-in-error to {next}: a Task recorded in error \
             stays that way"
        )
    } else if is_terminal(previous) && next != "entered-in-error" {
        format!(
            "Task status cannot change from {previous} to {next}: {previous} is a terminal state, \
             and the only change allowed from it is to entered-in-error"
        )
    } else if next == "draft" {
        format!(
            "Task status cannot move from {previous} back to draft: once a Task has left draft it \
             cannot return to it"
        )
    } else {
        return Ok(());
    };
    Err(Error::business_rule(refusal).at("Task.status"))
}

/// The Task's `status` code, if it has one.
pub fn status(task: &Value) -> Option<&str> {
    task.get("status")?.as_str()
}

/// The Task's owner as a normalised reference (`Practitioner/123` for a local owner).
pub fn owner(task: &Value, base_url: &str) -> Option<String> {
    let reference = task.get("owner")?.get("reference")?.as_str()?;
    normalize_reference(reference, base_url)
}

/// Who holds a Task, as the role rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// No `owner` at all: the Task waits in the queues of its performer types.
    Unowned,
    /// `owner.reference`, normalised (`Practitioner/123` for a local owner).
    Reference(String),
    /// An `owner` that names someone without a reference (only `display`, `identifier` or
    /// extensions): owned by a party Baton cannot match to any token, so by no practitioner,
    /// and not waiting in any queue either.
    Unresolved,
}

/// The search value `fhir::search::index_task` files an `Ownership::Unresolved` owner under,
/// so that `owner:missing=true` (the role queues) leaves such a Task out. It contains a space,
/// which no normalised reference does, so no `owner=` search or filter can name it.
pub const OWNER_WITHOUT_REFERENCE: &str = "(owner without reference)";

/// Who holds the Task: the owner's reference, nobody, or someone named without a reference.
pub fn ownership(task: &Value, base_url: &str) -> Ownership {
    match task.get("owner") {
        None | Some(Value::Null) => Ownership::Unowned,
        Some(owner) => owner
            .get("reference")
            .and_then(Value::as_str)
            .and_then(|r| normalize_reference(r, base_url))
            .map_or(Ownership::Unresolved, Ownership::Reference),
    }
}

/// The `(system, code)` pairs of every `performerType[].coding[]` that has a code.
pub fn performer_types(task: &Value) -> Vec<(Option<String>, String)> {
    task.get("performerType")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|concept| concept.get("coding")?.as_array())
        .flatten()
        .filter_map(|coding| {
            let code = coding.get("code")?.as_str()?;
            let system = coding.get("system").and_then(Value::as_str);
            Some((system.map(String::from), code.to_string()))
        })
        .collect()
}

/// Whether a Task in this status is finished for good (only `entered-in-error` may follow).
pub fn is_terminal(status: &str) -> bool {
    TERMINAL_STATUSES.contains(&status)
}

/// Builds a 400 whose diagnostic starts with the element it is about.
fn fail(code: IssueCode, path: impl Display, problem: impl Display) -> Error {
    let path = path.to_string();
    Error::bad_request(code, format!("{path} {problem}")).at(path)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::MULTI_FOCUS_EXTENSION;
    use axum::http::StatusCode;
    use serde_json::json;
    use std::collections::HashSet;

    const BASE: &str = "http://h/fhir";

    /// A Task that uses every R4 Task element at least once. It is built in parts because one
    /// `json!` literal this large exceeds the macro recursion limit.
    fn rich_task() -> Value {
        let meta = json!({
            "versionId": "3",
            "lastUpdated": "2024-05-01T10:00:00.000Z",
            "source": "urn:uuid:0b1e6a8e-6f7a-4b6b-9d5e-1f2a3b4c5d6e",
            "profile": ["http://example.org/StructureDefinition/lab-task"],
            "security": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                "code": "N"
            }],
            "tag": [{ "code": "triage" }]
        });
        let contained = json!([{
            "resourceType": "Patient",
            "id": "p1",
            "name": [{
                "family": "Doe",
                "given": ["Jane", null],
                "_given": [null, { "extension": [{
                    "url": "http://example.org/initial",
                    "valueString": "Q"
                }]}]
            }]
        }]);
        let extension = json!([
            { "url": MULTI_FOCUS_EXTENSION, "valueReference": { "reference": "Specimen/s1" } },
            {
                "url": "http://example.org/draw-details",
                "extension": [
                    { "url": "volume", "valueQuantity": { "value": 4, "unit": "mL" } },
                    { "url": "attempts", "valuePositiveInt": 2 }
                ]
            }
        ]);
        let identifier = json!([{
            "use": "official",
            "type": { "text": "placer number" },
            "system": "http://example.org/tasks",
            "value": "T-1",
            "period": { "start": "2024" },
            "assigner": { "reference": "Organization/o1" }
        }]);
        let business_status = json!({ "coding": [{
            "system": "http://example.org/business-status",
            "version": "1",
            "code": "specimen-drawn",
            "display": "Specimen drawn",
            "userSelected": true
        }]});
        let performer_type = json!([{ "coding": [{
            "system": "http://snomed.info/sct",
            "code": "159738005",
            "display": "Phlebotomist"
        }]}]);
        let note = json!([
            {
                "authorReference": { "reference": "Practitioner/123" },
                "time": "2024-05-01T09:10:00Z",
                "text": "Patient is **fasting**."
            },
            { "authorString": "ward clerk", "text": "Room 12" }
        ]);
        let restriction = json!({
            "repetitions": 1,
            "period": { "end": "2024-05-02" },
            "recipient": [{ "reference": "Patient/p9" }]
        });
        let input = json!([
            { "type": { "text": "tube" }, "valueString": "EDTA" },
            { "type": { "text": "volume" }, "valueQuantity": { "value": 4, "unit": "mL" } },
            { "type": { "text": "fasting" }, "valueBoolean": true },
            { "type": { "text": "due" }, "valueDateTime": "2024-05-01T11:00:00Z" }
        ]);
        let output = json!([{
            "type": { "text": "specimen" },
            "valueReference": { "reference": "Specimen/s1" }
        }]);
        json!({
            "resourceType": "Task",
            "id": "t-1",
            "meta": meta,
            "implicitRules": "http://example.org/rules",
            "language": "en-GB",
            "text": {
                "status": "generated",
                "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Draw blood</div>"
            },
            "contained": contained,
            "extension": extension,
            "modifierExtension": [{ "url": "http://example.org/simulated", "valueBoolean": false }],
            "identifier": identifier,
            "instantiatesCanonical": "http://example.org/ActivityDefinition/draw|1.0",
            "instantiatesUri": "http://example.org/protocols/draw",
            "basedOn": [{ "reference": "ServiceRequest/sr1" }],
            "groupIdentifier": { "system": "http://example.org/groups", "value": "G-7" },
            "partOf": [{ "reference": "http://h/fhir/Task/parent/_history/2", "type": "Task" }],
            "status": "in-progress",
            "_status": { "extension": [{
                "url": "http://example.org/status-note",
                "valueString": "started late"
            }]},
            "statusReason": { "text": "waiting for the patient" },
            "businessStatus": business_status,
            "intent": "order",
            "priority": "urgent",
            "code": { "coding": [{
                "system": "http://hl7.org/fhir/CodeSystem/task-code",
                "code": "fulfill"
            }]},
            "description": "Draw blood for a full blood count",
            "focus": { "reference": "ServiceRequest/sr1" },
            "for": { "reference": "#p1", "display": "Jane Doe" },
            "encounter": { "reference": "Encounter/e1" },
            "executionPeriod": {
                "start": "2024-05-01T09:00:00Z",
                "end": "2024-05-01T12:00:00+02:00"
            },
            "authoredOn": "2024-05-01T08:30:00Z",
            "lastModified": "2024-05-01T09:15:00Z",
            "requester": { "reference": "PractitionerRole/pr1", "type": "PractitionerRole" },
            "performerType": performer_type,
            "owner": { "reference": "http://h/fhir/Practitioner/123" },
            "location": { "reference": "Location/ward-3" },
            "reasonCode": { "text": "routine monitoring" },
            "reasonReference": { "reference": "Condition/c1" },
            "insurance": [{ "reference": "Coverage/cov1" }],
            "note": note,
            "relevantHistory": [{ "reference": "Provenance/pv1" }],
            "restriction": restriction,
            "input": input,
            "output": output
        })
    }

    /// `levels` extensions, each inside the one before: two levels (array and object) each.
    fn nested_extensions(levels: usize) -> Value {
        let mut extension = json!({ "url": "urn:leaf", "valueString": "x" });
        for _ in 1..levels {
            extension = json!({ "url": "urn:level", "extension": [extension] });
        }
        json!([extension])
    }

    fn nested_arrays(levels: usize) -> Value {
        let mut value = json!("x");
        for _ in 0..levels {
            value = json!([value]);
        }
        value
    }

    fn remove(task: &mut Value, key: &str) {
        task.as_object_mut().unwrap().remove(key);
    }

    #[test]
    fn rich_task_is_valid() {
        let task = rich_task();
        let covered: HashSet<&str> = task
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        for field in TASK.fields {
            assert!(
                covered.contains(field.name),
                "rich task lacks {}",
                field.name
            );
        }
        validate_task(&task, BASE).unwrap();
    }

    #[test]
    fn tasks_nested_up_to_the_depth_limit_are_valid() {
        // Thirty-one nested extensions put the innermost one at level 63 (of 64).
        let mut task = rich_task();
        task["extension"] = nested_extensions(31);
        validate_task(&task, BASE).unwrap();
    }

    #[test]
    fn minimal_task_is_valid() {
        let task = json!({ "resourceType": "Task", "status": "requested", "intent": "order" });
        validate_task(&task, BASE).unwrap();
    }

    type Mutation = fn(&mut Value);

    #[test]
    fn invalid_tasks_are_rejected_at_the_offending_element() {
        use IssueCode::{Invalid, Invariant, Required, Structure, TooLong, Value as Val};
        // One case per line: what is broken, how, the issue code and the expression expected.
        #[rustfmt::skip]
        let cases: &[(&str, Mutation, IssueCode, &str)] = &[
            ("body not an object", |t| *t = json!(["Task"]), Structure, "Task"),
            ("wrong resource type", |t| t["resourceType"] = json!("Patient"), Invalid, "Task.resourceType"),
            ("no resource type", |t| remove(t, "resourceType"), Required, "Task.resourceType"),
            ("bad id", |t| t["id"] = json!("a b"), Val, "Task.id"),
            ("unknown element", |t| t["subject"] = json!({ "reference": "Patient/1" }), Structure, "Task.subject"),
            ("_ sibling of a complex element", |t| t["_code"] = json!({ "id": "x" }), Structure, "Task._code"),
            ("_status not an object", |t| t["_status"] = json!("x"), Structure, "Task._status"),
            ("no status", |t| remove(t, "status"), Required, "Task.status"),
            ("unknown status", |t| t["status"] = json!("done"), Val, "Task.status"),
            ("status not a string", |t| t["status"] = json!(1), Structure, "Task.status"),
            ("no intent", |t| remove(t, "intent"), Required, "Task.intent"),
            ("unknown intent", |t| t["intent"] = json!("directive"), Val, "Task.intent"),
            ("unknown priority", |t| t["priority"] = json!("high"), Val, "Task.priority"),
            ("repeating element not an array", |t| t["basedOn"] = json!({ "reference": "ServiceRequest/1" }), Structure, "Task.basedOn"),
            ("single element as an array", |t| t["owner"] = json!([{ "reference": "Practitioner/1" }]), Structure, "Task.owner"),
            ("null element", |t| t["description"] = Value::Null, Structure, "Task.description"),
            ("empty string", |t| t["description"] = json!(""), Structure, "Task.description"),
            ("empty array", |t| t["note"] = json!([]), Structure, "Task.note"),
            ("empty object", |t| t["statusReason"] = json!({}), Structure, "Task.statusReason"),
            ("nested null", |t| t["code"]["coding"][0]["display"] = Value::Null, Structure, "Task.code.coding[0].display"),
            ("null not aligned with a _ sibling", |t| t["contained"][0]["name"][0]["_given"][1] = Value::Null, Structure, "Task.contained[0].name[0].given[1]"),
            ("malformed owner reference", |t| t["owner"]["reference"] = json!("practitioner/1"), Val, "Task.owner.reference"),
            ("owner of a type Task.owner cannot name", |t| t["owner"]["reference"] = json!("Task/1"), Val, "Task.owner.reference"),
            ("requester of a type Task.requester cannot name", |t| t["requester"] = json!({ "reference": "CareTeam/1" }), Val, "Task.requester.reference"),
            ("requester type disagrees with its reference", |t| t["requester"]["type"] = json!("Patient"), Val, "Task.requester.type"),
            ("partOf not a Task", |t| t["partOf"][0] = json!({ "reference": "ServiceRequest/1" }), Val, "Task.partOf[0].reference"),
            ("encounter not an Encounter", |t| t["encounter"]["reference"] = json!("Patient/1"), Val, "Task.encounter.reference"),
            ("unknown Reference element", |t| t["focus"]["target"] = json!("x"), Structure, "Task.focus.target"),
            ("Reference.type not a string", |t| t["focus"]["type"] = json!(7), Structure, "Task.focus.type"),
            ("unresolved contained reference", |t| t["for"]["reference"] = json!("#nobody"), Invariant, "Task.for.reference"),
            ("unreferenced contained resource", |t| t["for"]["reference"] = json!("Patient/p1"), Invariant, "Task.contained[0]"),
            ("contained resource without a type", |t| remove(&mut t["contained"][0], "resourceType"), Required, "Task.contained[0].resourceType"),
            ("nested contained resource", |t| t["contained"][0]["contained"] = json!([{ "resourceType": "Basic" }]), Invariant, "Task.contained[0].contained"),
            ("bad multi-focus reference", |t| t["extension"][0]["valueReference"]["reference"] = json!("not a reference"), Val, "Task.extension[0].valueReference.reference"),
            ("multi-focus without a reference", |t| t["extension"][0] = json!({ "url": MULTI_FOCUS_EXTENSION, "valueString": "Specimen/s1" }), Val, "Task.extension[0]"),
            ("bad authoredOn", |t| t["authoredOn"] = json!("2024-13-01"), Val, "Task.authoredOn"),
            ("lastModified without a zone", |t| t["lastModified"] = json!("2024-05-01T09:15:00"), Val, "Task.lastModified"),
            ("execution ends before it starts", |t| t["executionPeriod"]["end"] = json!("2024-05-01T08:00:00Z"), Invariant, "Task.executionPeriod.end"),
            ("restriction ends before it starts", |t| t["restriction"]["period"]["start"] = json!("2024-06-01"), Invariant, "Task.restriction.period.end"),
            ("lastUpdated not an instant", |t| t["meta"]["lastUpdated"] = json!("2024-05-01"), Val, "Task.meta.lastUpdated"),
            ("coding not an array", |t| t["businessStatus"]["coding"] = json!({ "code": "x" }), Structure, "Task.businessStatus.coding"),
            ("coding system not a string", |t| t["businessStatus"]["coding"][0]["system"] = json!(1), Structure, "Task.businessStatus.coding[0].system"),
            ("performerType not an array", |t| t["performerType"] = json!({ "text": "nurse" }), Structure, "Task.performerType"),
            ("identifier value not a string", |t| t["identifier"][0]["value"] = json!(42), Structure, "Task.identifier[0].value"),
            ("unknown identifier use", |t| t["identifier"][0]["use"] = json!("primary"), Val, "Task.identifier[0].use"),
            ("groupIdentifier as an array", |t| t["groupIdentifier"] = json!([{ "value": "G" }]), Structure, "Task.groupIdentifier"),
            ("note without text", |t| remove(&mut t["note"][1], "text"), Required, "Task.note[1].text"),
            ("note with two authors", |t| t["note"][0]["authorString"] = json!("someone"), Structure, "Task.note[0]"),
            ("extension without url", |t| remove(&mut t["extension"][1], "url"), Required, "Task.extension[1].url"),
            ("extension with value and nested extensions", |t| t["extension"][1]["valueString"] = json!("x"), Invariant, "Task.extension[1]"),
            ("extension with neither value nor extensions", |t| remove(&mut t["modifierExtension"][0], "valueBoolean"), Invariant, "Task.modifierExtension[0]"),
            ("extension with two values", |t| t["modifierExtension"][0]["valueString"] = json!("x"), Structure, "Task.modifierExtension[0]"),
            ("extension value of the wrong JSON type", |t| t["modifierExtension"][0]["valueBoolean"] = json!("false"), Structure, "Task.modifierExtension[0].valueBoolean"),
            ("zero repetitions", |t| t["restriction"]["repetitions"] = json!(0), Val, "Task.restriction.repetitions"),
            ("repetitions as a string", |t| t["restriction"]["repetitions"] = json!("1"), Structure, "Task.restriction.repetitions"),
            ("recipient of a type it cannot name", |t| t["restriction"]["recipient"][0]["reference"] = json!("Device/d1"), Val, "Task.restriction.recipient[0].reference"),
            ("input without type", |t| remove(&mut t["input"][0], "type"), Required, "Task.input[0].type"),
            ("input without value", |t| remove(&mut t["input"][0], "valueString"), Required, "Task.input[0].value[x]"),
            ("output with two values", |t| t["output"][0]["valueString"] = json!("x"), Structure, "Task.output[0]"),
            ("input value of an unknown type", |t| t["input"][0] = json!({ "type": { "text": "x" }, "valueFoo": "y" }), Structure, "Task.input[0].valueFoo"),
            ("text without div", |t| remove(&mut t["text"], "div"), Required, "Task.text.div"),
            ("unknown narrative status", |t| t["text"]["status"] = json!("written"), Val, "Task.text.status"),
            ("narrative not a div", |t| t["text"]["div"] = json!("<p>hi</p>"), Val, "Task.text.div"),
            ("narrative with a script", |t| t["text"]["div"] = json!("<div xmlns=\"http://www.w3.org/1999/xhtml\"><script>alert(1)</script></div>"), Val, "Task.text.div"),
            ("narrative with an event handler", |t| t["text"]["div"] = json!("<div xmlns=\"http://www.w3.org/1999/xhtml\"><p onmouseover=\"x()\">hi</p></div>"), Val, "Task.text.div"),
            ("narrative with a javascript link", |t| t["text"]["div"] = json!("<div xmlns=\"http://www.w3.org/1999/xhtml\"><a href=\"javascript:x()\">hi</a></div>"), Val, "Task.text.div"),
            ("narrative without the XHTML namespace", |t| t["text"]["div"] = json!("<div>hi</div>"), Val, "Task.text.div"),
            ("contained narrative with active content", |t| t["contained"][0]["text"] = json!({ "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><iframe src=\"https://x\"></iframe></div>" }), Val, "Task.contained[0].text.div"),
            ("NUL in a string", |t| t["description"] = json!("draw\u{0}blood"), Val, "Task.description"),
            ("control character deep inside", |t| t["note"][1]["text"] = json!("ring \u{7} the bell"), Val, "Task.note[1].text"),
            ("control character in a contained resource", |t| t["contained"][0]["name"][0]["family"] = json!("Esc\u{1b}ape"), Val, "Task.contained[0].name[0].family"),
            ("id of dots", |t| t["id"] = json!(".."), Val, "Task.id"),
            ("language not a language tag", |t| t["language"] = json!("en GB"), Val, "Task.language"),
            ("uri with whitespace", |t| t["instantiatesUri"] = json!("http://example.org/a b"), Val, "Task.instantiatesUri"),
            ("extensions nested 65 levels deep", |t| t["extension"] = nested_extensions(32), TooLong, "Task"),
            ("contained resource nested 65 levels deep", |t| t["contained"][0]["x"] = nested_arrays(62), TooLong, "Task"),
        ];
        for (what, mutate, code, expression) in cases {
            let mut task = rich_task();
            mutate(&mut task);
            let err = validate_task(&task, BASE).expect_err(what);
            let client = err
                .as_client()
                .unwrap_or_else(|| panic!("{what}: not a client error"));
            assert_eq!(client.status, StatusCode::BAD_REQUEST, "{what}");
            assert_eq!(client.code, *code, "{what}: {}", client.diagnostics);
            assert_eq!(
                client.expression.as_deref(),
                Some(*expression),
                "{what}: {}",
                client.diagnostics
            );
            assert!(
                client.diagnostics.starts_with(expression),
                "{what}: diagnostic should name {expression}: {}",
                client.diagnostics
            );
        }
        assert!(cases.len() >= 30);
    }

    #[test]
    fn unknown_codes_list_the_allowed_ones() {
        let mut task = rich_task();
        task["status"] = json!("done");
        let err = validate_task(&task, BASE).unwrap_err();
        let diagnostics = &err.as_client().unwrap().diagnostics;
        assert!(diagnostics.contains("'done'"), "{diagnostics}");
        for code in TASK_STATUSES {
            assert!(diagnostics.contains(code), "{diagnostics}");
        }
    }

    #[test]
    fn transitions_follow_the_task_state_machine() {
        // Columns are the next status, in TASK_STATUSES order:
        // draft requested received accepted rejected ready cancelled in-progress on-hold
        // failed completed entered-in-error. `Y` is allowed, `.` is refused.
        let table: &[(Option<&str>, &str)] = &[
            (None, "YYYYYYYYYYYY"),
            (Some("draft"), "YYYYYYYYYYYY"),
            (Some("requested"), ".YYYYYYYYYYY"),
            (Some("received"), ".YYYYYYYYYYY"),
            (Some("accepted"), ".YYYYYYYYYYY"),
            (Some("rejected"), "....Y......Y"),
            (Some("ready"), ".YYYYYYYYYYY"),
            (Some("cancelled"), "......Y....Y"),
            (Some("in-progress"), ".YYYYYYYYYYY"),
            (Some("on-hold"), ".YYYYYYYYYYY"),
            (Some("failed"), ".........Y.Y"),
            (Some("completed"), "..........YY"),
            (Some("entered-in-error"), "...........Y"),
        ];
        assert_eq!(table.len(), TASK_STATUSES.len() + 1);
        for (previous, row) in table {
            for (next, allowed) in TASK_STATUSES.iter().zip(row.chars()) {
                let result = check_transition(*previous, next);
                let case = format!("{previous:?} -> {next}");
                if allowed == 'Y' {
                    assert!(result.is_ok(), "{case} should be allowed: {result:?}");
                } else {
                    let err = result.expect_err(&case);
                    let client = err.as_client().unwrap();
                    assert_eq!(client.status, StatusCode::UNPROCESSABLE_ENTITY, "{case}");
                    assert_eq!(client.code, IssueCode::BusinessRule, "{case}");
                    assert_eq!(client.expression.as_deref(), Some("Task.status"), "{case}");
                }
            }
        }
    }

    #[test]
    fn accessors_read_the_task() {
        let task = rich_task();
        assert_eq!(status(&task), Some("in-progress"));
        assert_eq!(owner(&task, BASE).as_deref(), Some("Practitioner/123"));
        assert_eq!(
            performer_types(&task),
            vec![(
                Some("http://snomed.info/sct".to_string()),
                "159738005".to_string()
            )]
        );
        let bare = json!({ "resourceType": "Task" });
        assert_eq!(status(&bare), None);
        assert_eq!(owner(&bare, BASE), None);
        assert!(performer_types(&bare).is_empty());
        for status in TASK_STATUSES {
            assert_eq!(is_terminal(status), TERMINAL_STATUSES.contains(status));
        }
        assert!(is_terminal("completed") && !is_terminal("in-progress"));
    }

    #[test]
    fn ownership_tells_unowned_from_unresolved() {
        let cases = [
            (json!({}), Ownership::Unowned),
            (json!({ "owner": null }), Ownership::Unowned),
            (
                json!({ "owner": { "reference": "Practitioner/1" } }),
                Ownership::Reference("Practitioner/1".into()),
            ),
            (
                json!({ "owner": { "reference": "http://h/fhir/Practitioner/1", "display": "Dr." } }),
                Ownership::Reference("Practitioner/1".into()),
            ),
            (
                json!({ "owner": { "display": "Dr. One" } }),
                Ownership::Unresolved,
            ),
            (
                json!({ "owner": { "identifier": { "system": "http://x", "value": "1" } } }),
                Ownership::Unresolved,
            ),
            (json!({ "owner": {} }), Ownership::Unresolved),
        ];
        for (task, expected) in cases {
            assert_eq!(ownership(&task, BASE), expected, "{task}");
        }
    }
}
