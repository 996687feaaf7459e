//! FHIR shapes shared by the API, the store and the matcher: references, dates, ids, the Task
//! rules and the Task search parameters. Pure: nothing here builds an HTTP response or
//! touches storage (errors carry their status through `crate::error`).

pub mod basic_topic;
pub mod datetime;
pub mod ids;
pub mod interaction;
pub mod json;
pub mod narrative;
pub mod notification;
pub mod patch;
pub mod search;
pub mod shape;
pub mod subscription;
pub mod subset;
pub mod task;
pub mod workflow;

use serde_json::Value;

/// Resource types a reference may name. Used to recognise `Type/id` and to expand a bare id
/// in a reference search.
pub const RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AllergyIntolerance",
    "Appointment",
    "CarePlan",
    "CareTeam",
    "Claim",
    "Communication",
    "CommunicationRequest",
    "Condition",
    "Coverage",
    "Device",
    "DeviceRequest",
    "DiagnosticReport",
    "DocumentReference",
    "Encounter",
    "EpisodeOfCare",
    "Group",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "Location",
    "Medication",
    "MedicationDispense",
    "MedicationRequest",
    "NutritionOrder",
    "Observation",
    "Organization",
    "Patient",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ServiceRequest",
    "Specimen",
    "Subscription",
    "SupplyRequest",
    "Task",
    "VisionPrescription",
];

/// Whether `s` is a valid FHIR resource id: 1–64 of `[A-Za-z0-9-.]`, and not made of dots
/// alone. FHIR's id pattern admits `.` and `..`, but in a URL (`/fhir/Task/..`) those are dot
/// segments that clients, proxies and URL parsers remove, so the resource could never be
/// addressed; `...` and longer are refused with them, so that the rule is one sentence.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !s.bytes().all(|b| b == b'.')
}

/// What an id must look like, for diagnostics.
pub const ID_RULE: &str = "1 to 64 of A-Z, a-z, 0-9, '-' and '.', and not only dots";

/// Refuses what no string in a resource may hold, wherever it is (contained resources
/// included): control characters other than tab, carriage return and line feed (FHIR's
/// string rule), and narratives with active content or other markup FHIR does not allow
/// (txt-1, txt-2). `root` is the resource type, which starts every path reported.
pub fn check_text_content(resource: &Value, root: &str) -> crate::error::Result<()> {
    use crate::error::{Error, IssueCode};
    if let Some((path, c)) = json::control_character(resource, root) {
        return Err(Error::bad_request(
            IssueCode::Value,
            format!(
                "{path} contains the control character U+{:04X}; FHIR strings may hold tab, \
                 carriage return and line feed, but no other control characters",
                u32::from(c)
            ),
        )
        .at(path));
    }
    if let Some((path, problem)) = narrative::find_problem(resource, root) {
        return Err(Error::bad_request(IssueCode::Value, format!("{path} {problem}")).at(path));
    }
    Ok(())
}

/// Normalises a literal reference to `Type/id` when it points at a resource on this server
/// (relative, or absolute under `base_url`), dropping any `/_history/N` suffix. Other absolute
/// URLs, `urn:` and contained (`#id`) references are returned unchanged. Returns `None` when
/// the text is not a reference shape FHIR allows.
pub fn normalize_reference(reference: &str, base_url: &str) -> Option<String> {
    if reference.is_empty() || reference.chars().any(char::is_whitespace) {
        return None;
    }
    if let Some(local) = reference.strip_prefix('#') {
        return (local.is_empty() || is_valid_id(local)).then(|| reference.to_string());
    }
    if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
        return Some(reference.to_string());
    }
    let base = base_url.trim_end_matches('/');
    let relative = match reference.strip_prefix(base) {
        Some(rest) if rest.starts_with('/') => &rest[1..],
        _ if reference.starts_with("http://") || reference.starts_with("https://") => {
            return Some(reference.to_string());
        }
        _ => reference,
    };
    let mut parts = relative.split('/');
    let (Some(kind), Some(id)) = (parts.next(), parts.next()) else {
        return None;
    };
    let valid_type = kind.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && kind.chars().all(|c| c.is_ascii_alphanumeric());
    if !valid_type || !is_valid_id(id) {
        return None;
    }
    // `Type/id` is the start of `relative`: sliced, not formatted (`format!` was most of this
    // function's cost, which runs several times for every Task written).
    let type_and_id = &relative[..kind.len() + 1 + id.len()];
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => Some(type_and_id.to_string()),
        (Some("_history"), Some(v), None) if is_valid_id(v) => Some(type_and_id.to_string()),
        _ => None,
    }
}

/// Baton's extension for a Task that is about several resources at once (grouped focus).
/// Each occurrence carries one `valueReference`; `focus` search and filters match these too.
pub const MULTI_FOCUS_EXTENSION: &str = "https://baton.dev/fhir/StructureDefinition/task-focus";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_fhir_and_are_never_dot_segments() {
        let cases = [
            ("a", true),
            ("Task-1.2", true),
            ("a..", true),
            (".a", true),
            (&"x".repeat(64), true),
            (&"x".repeat(65), false),
            ("", false),
            (".", false),
            ("..", false),
            ("...", false),
            ("a/b", false),
            ("a b", false),
            ("ä", false),
            ("%2e%2e", false),
        ];
        for (id, valid) in cases {
            assert_eq!(is_valid_id(id), valid, "{id}");
        }
    }

    #[test]
    fn text_content_is_checked_everywhere_in_a_resource() {
        use serde_json::json;
        let div =
            |inner: &str| format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{inner}</div>");
        let cases = [
            (json!({"description": "ok\ttab\nline"}), None),
            (json!({"description": "nul\u{0}"}), Some("Task.description")),
            (
                json!({"note": [{"text": "a"}, {"text": "bell\u{7}"}]}),
                Some("Task.note[1].text"),
            ),
            (
                json!({"text": {"status": "generated", "div": div("<p onclick=\"x\">y</p>")}}),
                Some("Task.text.div"),
            ),
            (
                json!({"contained": [{"resourceType": "Patient", "id": "p", "text": {"div": div("<script>x</script>")}}]}),
                Some("Task.contained[0].text.div"),
            ),
            (
                json!({"text": {"status": "generated", "div": div("fine")}}),
                None,
            ),
            // A note's text is a markdown string, not a narrative.
            (json!({"note": [{"text": "<script>"}]}), None),
        ];
        for (resource, expected) in cases {
            let found = check_text_content(&resource, "Task")
                .err()
                .and_then(|e| e.as_client().and_then(|c| c.expression.clone()));
            assert_eq!(found.as_deref(), expected, "{resource}");
        }
    }

    #[test]
    fn references_normalise_to_type_and_id() {
        let base = "http://h/fhir";
        let cases = [
            ("Practitioner/1", Some("Practitioner/1")),
            ("http://h/fhir/Practitioner/1", Some("Practitioner/1")),
            ("Task/a/_history/3", Some("Task/a")),
            (
                "https://other/fhir/Patient/9",
                Some("https://other/fhir/Patient/9"),
            ),
            ("#c1", Some("#c1")),
            ("urn:uuid:0b1e", Some("urn:uuid:0b1e")),
            ("Practitioner", None),
            ("practitioner/1", None),
            ("Practitioner/has space", None),
            ("Practitioner/1/extra", None),
            ("Task/..", None),
            ("Task/.", None),
            ("Task/a..b", Some("Task/a..b")),
            ("", None),
        ];
        for (input, expected) in cases {
            assert_eq!(
                normalize_reference(input, base).as_deref(),
                expected,
                "{input}"
            );
        }
    }
}
