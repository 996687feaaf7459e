//! FHIR shapes shared by the API, the store and the matcher: JSON responses, references,
//! dates, the Task rules and the Task search parameters.

pub mod datetime;
pub mod notification;
pub mod patch;
pub mod search;
pub mod shape;
pub mod subscription;
pub mod task;
pub mod workflow;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// The media type of every FHIR JSON body Baton sends.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Builds a response whose body is FHIR JSON.
pub fn fhir_json(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = (status, bytes).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

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

/// Whether `s` is a valid FHIR resource id: 1–64 of `[A-Za-z0-9-.]`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
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
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => Some(format!("{kind}/{id}")),
        (Some("_history"), Some(v), None) if is_valid_id(v) => Some(format!("{kind}/{id}")),
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
