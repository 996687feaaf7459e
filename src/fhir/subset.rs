//! `_summary` and `_elements`: the parts of a Task a client asked for, marked `SUBSETTED` as
//! the FHIR search page requires, so that no one takes the part for the whole and writes it
//! back. Pure; read and search apply it to what they answer with.

use serde_json::{Map, Value};

use crate::error::{Error, IssueCode, Result};

/// The tag that marks a resource as incomplete (`meta.tag`).
pub const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
pub const SUBSETTED_CODE: &str = "SUBSETTED";

/// The Task elements marked as summary (Σ) in FHIR R4, beside `id` and `meta`.
const SUMMARY_ELEMENTS: &[&str] = &[
    "implicitRules",
    "modifierExtension",
    "identifier",
    "instantiatesCanonical",
    "instantiatesUri",
    "basedOn",
    "groupIdentifier",
    "partOf",
    "status",
    "statusReason",
    "businessStatus",
    "intent",
    "code",
    "description",
    "focus",
    "for",
    "encounter",
    "executionPeriod",
    "lastModified",
    "requester",
    "owner",
    "location",
];

/// Elements every subset keeps: what identifies the Task, and its mandatory elements (the
/// FHIR search page says servers should return them whatever was asked for).
const ALWAYS: &[&str] = &["resourceType", "id", "meta", "status", "intent"];

/// Which part of a Task to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subset {
    /// `_summary=true`: the summary elements.
    Summary,
    /// `_summary=text`: the narrative and the mandatory elements.
    Text,
    /// `_summary=data`: everything but the narrative.
    Data,
    /// `_elements=a,b`: these top-level elements and the mandatory ones.
    Elements(Vec<String>),
}

/// Reads `_summary` (other than `count`, which is a search's business, and `false`, which
/// asks for everything): `None` for the whole Task.
pub fn parse_summary(value: &str) -> Result<Option<Subset>> {
    match value {
        "true" => Ok(Some(Subset::Summary)),
        "text" => Ok(Some(Subset::Text)),
        "data" => Ok(Some(Subset::Data)),
        "false" => Ok(None),
        _ => Err(Error::bad_request(
            IssueCode::Invalid,
            format!("_summary must be one of true, text, data, count or false, not '{value}'"),
        )),
    }
}

/// Reads `_elements`: element names of Task, comma-separated, each optionally written
/// `Task.name`.
pub fn parse_elements(value: &str) -> Result<Subset> {
    let names = value
        .split(',')
        .map(|name| {
            let name = name.trim();
            let name = name.strip_prefix("Task.").unwrap_or(name);
            let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if valid {
                Ok(name.to_string())
            } else {
                Err(Error::bad_request(
                    IssueCode::Invalid,
                    format!(
                        "_elements takes element names of Task separated by commas, such as \
                         'status,owner'; '{name}' is not one"
                    ),
                ))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Subset::Elements(names))
}

/// Both `_summary` (other than `false`) and `_elements`: FHIR leaves the combination
/// undefined, so it is refused rather than guessed at.
pub fn both_given() -> Error {
    Error::bad_request(
        IssueCode::Invalid,
        "_summary and _elements cannot be combined; send one of them",
    )
}

impl Subset {
    /// The part of `resource` this subset keeps, tagged `SUBSETTED`.
    pub fn apply(&self, resource: &Value) -> Value {
        let Value::Object(members) = resource else {
            return resource.clone();
        };
        let keep = |name: &str| -> bool {
            ALWAYS.contains(&name)
                || match self {
                    Subset::Summary => SUMMARY_ELEMENTS.contains(&name),
                    Subset::Text => name == "text",
                    Subset::Data => name != "text",
                    Subset::Elements(names) => names.iter().any(|n| n == name),
                }
        };
        let mut kept: Map<String, Value> = members
            .iter()
            .filter(|(name, _)| keep(name))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        let meta = kept
            .entry("meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(meta) = meta {
            let tags = meta
                .entry("tag")
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(tags) = tags {
                let tagged = tags
                    .iter()
                    .any(|t| t["system"] == SUBSETTED_SYSTEM && t["code"] == SUBSETTED_CODE);
                if !tagged {
                    tags.push(serde_json::json!({
                        "system": SUBSETTED_SYSTEM,
                        "code": SUBSETTED_CODE,
                    }));
                }
            }
        }
        Value::Object(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task() -> Value {
        json!({
            "resourceType": "Task", "id": "t1",
            "meta": { "versionId": "2", "tag": [{ "system": "http://x", "code": "y" }] },
            "text": { "status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">t</div>" },
            "status": "requested", "intent": "order", "priority": "urgent",
            "owner": { "reference": "Practitioner/a" }, "note": [{ "text": "n" }],
        })
    }

    fn keys(value: &Value) -> Vec<&str> {
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn each_subset_keeps_its_elements_and_is_tagged() {
        let cases: Vec<(Subset, Vec<&str>)> = vec![
            (
                Subset::Summary,
                vec!["id", "intent", "meta", "owner", "resourceType", "status"],
            ),
            (
                Subset::Text,
                vec!["id", "intent", "meta", "resourceType", "status", "text"],
            ),
            (
                Subset::Data,
                vec![
                    "id",
                    "intent",
                    "meta",
                    "note",
                    "owner",
                    "priority",
                    "resourceType",
                    "status",
                ],
            ),
            (
                parse_elements("note,Task.priority").unwrap(),
                vec![
                    "id",
                    "intent",
                    "meta",
                    "note",
                    "priority",
                    "resourceType",
                    "status",
                ],
            ),
        ];
        for (subset, expected) in cases {
            let subsetted = subset.apply(&task());
            assert_eq!(keys(&subsetted), expected, "{subset:?}");
            assert_eq!(
                subsetted["meta"]["tag"],
                json!([{ "system": "http://x", "code": "y" },
                       { "system": SUBSETTED_SYSTEM, "code": SUBSETTED_CODE }]),
            );
            assert_eq!(subsetted["meta"]["versionId"], "2");
        }
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse_summary("maybe").is_err());
        assert_eq!(parse_summary("false").unwrap(), None);
        assert!(parse_elements("status,,owner").is_err());
        assert!(parse_elements("note.text").is_err());
    }
}
