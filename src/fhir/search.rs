//! The Task search parameters: what each one indexes, how a query string is parsed into
//! predicates, and how predicates are evaluated against an index in memory.
//!
//! This module is the single source of truth for search. The store writes the entries that
//! `index_task` produces into its index tables and turns predicates into SQL
//! (`store::search_sql`); the subscription matcher evaluates the same predicates with
//! `matches`. Both read the same `TaskIndex` shape, so a Task found by a search is exactly a
//! Task a filter matches. Nothing here does IO.
//!
//! This file defines the parameters and the caps on a query; `index` reads a Task into a
//! `TaskIndex`, `predicate` holds the parsed criteria and `matches`, and `query` parses a
//! query string.

use crate::error::Result;
use crate::fhir::RESOURCE_TYPES;

mod columns;
pub mod cursor;
mod index;
mod predicate;
mod query;

pub use columns::{ON_THE_ROW, SEVERAL, SINGLE_VALUED, TaskColumns, add_row_entries};
pub use index::{DateEntry, TaskIndex, TokenEntry, index_task, last_updated_entry, priority_rank};
pub use predicate::{DateComparison, Predicate, Prefix, SystemMatch, TokenValue, matches};
use query::invalid;
pub use query::{
    Handling, Include, RevInclude, SearchLimits, SearchQuery, SortKey, TotalMode, parse_query,
};

/// How a parameter's values are written and compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// `[system|]code`, compared exactly.
    Token,
    /// A reference, indexed and compared as normalised `Type/id` (or the absolute URL).
    Reference,
    /// A date range with an optional comparison prefix.
    Date,
}

/// One search parameter of Task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamDef {
    pub code: &'static str,
    pub kind: ParamType,
    pub sortable: bool,
    /// The resource types a bare id expands to; empty for non-reference parameters.
    pub targets: &'static [&'static str],
    pub description: &'static str,
}

pub const STATUS_SYSTEM: &str = "http://hl7.org/fhir/task-status";
const PRIORITY_SYSTEM: &str = "http://hl7.org/fhir/request-priority";
const INTENT_SYSTEM: &str = "http://hl7.org/fhir/task-intent";

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
const REQUESTER_TARGETS: &[&str] = &[
    "Device",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
];
const PATIENT_TARGETS: &[&str] = &["Patient"];
const TASK_TARGETS: &[&str] = &["Task"];

/// Every search parameter Baton supports on Task, in the order the CapabilityStatement lists them.
pub static TASK_PARAMS: &[ParamDef] = &[
    ParamDef {
        code: "_id",
        kind: ParamType::Token,
        sortable: true,
        targets: &[],
        description: "The logical id of the Task",
    },
    ParamDef {
        code: "_lastUpdated",
        kind: ParamType::Date,
        sortable: true,
        targets: &[],
        description: "When the Task was last changed on this server (meta.lastUpdated)",
    },
    ParamDef {
        code: "status",
        kind: ParamType::Token,
        sortable: true,
        targets: &[],
        description: "The Task status",
    },
    ParamDef {
        code: "business-status",
        kind: ParamType::Token,
        sortable: false,
        targets: &[],
        description: "The business status of the Task (businessStatus codings)",
    },
    ParamDef {
        code: "owner",
        kind: ParamType::Reference,
        sortable: false,
        targets: OWNER_TARGETS,
        description: "The party responsible for carrying out the Task",
    },
    ParamDef {
        code: "performer",
        kind: ParamType::Token,
        sortable: false,
        targets: &[],
        description: "The kind of performer the Task is for (performerType codings)",
    },
    ParamDef {
        code: "patient",
        kind: ParamType::Reference,
        sortable: false,
        targets: PATIENT_TARGETS,
        description: "The patient the Task is for (Task.for when it is a Patient)",
    },
    ParamDef {
        code: "subject",
        kind: ParamType::Reference,
        sortable: false,
        targets: RESOURCE_TYPES,
        description: "Whom or what the Task is for (Task.for)",
    },
    ParamDef {
        code: "focus",
        kind: ParamType::Reference,
        sortable: false,
        targets: RESOURCE_TYPES,
        description: "What the Task acts on: Task.focus and every multi-focus extension",
    },
    ParamDef {
        code: "part-of",
        kind: ParamType::Reference,
        sortable: false,
        targets: TASK_TARGETS,
        description: "The parent Task (Task.partOf)",
    },
    ParamDef {
        code: "based-on",
        kind: ParamType::Reference,
        sortable: false,
        targets: RESOURCE_TYPES,
        description: "The request the Task fulfils (Task.basedOn)",
    },
    ParamDef {
        code: "requester",
        kind: ParamType::Reference,
        sortable: false,
        targets: REQUESTER_TARGETS,
        description: "Who asked for the Task",
    },
    ParamDef {
        code: "code",
        kind: ParamType::Token,
        sortable: false,
        targets: &[],
        description: "The kind of Task (Task.code codings)",
    },
    ParamDef {
        code: "priority",
        kind: ParamType::Token,
        sortable: true,
        targets: &[],
        description: "The Task priority; sorting orders by urgency (routine < urgent < asap < stat)",
    },
    ParamDef {
        code: "intent",
        kind: ParamType::Token,
        sortable: true,
        targets: &[],
        description: "The Task intent",
    },
    ParamDef {
        code: "identifier",
        kind: ParamType::Token,
        sortable: false,
        targets: &[],
        description: "A business identifier of the Task",
    },
    ParamDef {
        code: "authored-on",
        kind: ParamType::Date,
        sortable: true,
        targets: &[],
        description: "When the Task was created (Task.authoredOn)",
    },
    ParamDef {
        code: "modified",
        kind: ParamType::Date,
        sortable: true,
        targets: &[],
        description: "When the Task was last modified (Task.lastModified)",
    },
    ParamDef {
        code: "period",
        kind: ParamType::Date,
        sortable: true,
        targets: &[],
        description: "When the Task is carried out (Task.executionPeriod); open ends are unbounded",
    },
    ParamDef {
        code: "due-date",
        kind: ParamType::Date,
        sortable: true,
        targets: &[],
        description: "When the Task must be done by (Task.restriction.period.end)",
    },
];

/// Parameters that shape the result rather than filter it.
const CONTROL_PARAMS: &[&str] = &[
    "_count",
    "_offset",
    "_cursor",
    "_sort",
    "_total",
    "_summary",
    "_elements",
    "_include",
    "_revinclude",
    "_format",
    "_pretty",
];

/// The most search criteria (parameters other than the control ones, ANDed) one search may
/// carry. Each becomes a subquery, and what a database pays for a query grows with their
/// number and with the rows each matches: on 5 000 Tasks, 32 criteria that match every Task
/// cost over a second on PostgreSQL, and SQLite refuses a thousand outright ("Expression
/// tree is too large"). Real searches use a handful. BENCHMARKS.md has the measurements.
pub const MAX_SEARCH_CRITERIA: usize = 16;

/// The most values one search may carry in all, counted as the store binds them: a code,
/// a reference or `:missing` is one, `system|code` and a date are two, and a bare reference
/// id counts once per resource type it may name. Values ORed in one parameter are cheap when
/// they are plain codes, but `system|code` pairs and dates become a chain of ORs that SQLite
/// cannot compile past about 450 terms; 512 keeps every chain under 260.
pub const MAX_SEARCH_VALUES: usize = 512;

/// The largest `_offset` a page (of a search, a history, a subscription list) may start at.
/// The stores bind offsets as signed 64-bit integers and the paging links add a page to them,
/// so a larger value would wrap (PostgreSQL refuses the negative result; the addition
/// overflows) where it must be refused; no client pages this far.
pub const MAX_OFFSET: usize = i32::MAX as usize;

/// Reads an `_offset` value: an integer from 0 to `MAX_OFFSET`, else a 400 naming it.
pub fn parse_offset(name: &str, value: &str) -> Result<usize> {
    value
        .parse::<usize>()
        .ok()
        .filter(|offset| *offset <= MAX_OFFSET)
        .ok_or_else(|| {
            invalid(format!(
                "The value of '{name}' must be an integer from 0 to {MAX_OFFSET}, not '{value}'"
            ))
        })
}

/// Looks up a Task search parameter by its code.
pub fn task_param(code: &str) -> Option<&'static ParamDef> {
    TASK_PARAMS.iter().find(|def| def.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::IssueCode;
    use crate::fhir::MULTI_FOCUS_EXTENSION;
    use crate::fhir::datetime::{MAX_KEY, MIN_KEY};
    use serde_json::{Value, json};

    const BASE: &str = "http://baton.test/fhir";

    fn full_task() -> Value {
        json!({
            "resourceType": "Task",
            "id": "t1",
            "meta": { "lastUpdated": "2024-03-05T10:00:00.000Z" },
            "identifier": [
                { "system": "urn:ids", "value": "A-1" },
                { "value": "loose" },
                { "system": "urn:ids" }
            ],
            "basedOn": [{ "reference": "ServiceRequest/sr1" }, { "display": "no reference" }],
            "partOf": [{ "reference": "http://baton.test/fhir/Task/parent" }],
            "status": "in-progress",
            "businessStatus": {
                "coding": [
                    { "system": "urn:bs", "code": "waiting" },
                    { "code": "bare" },
                    { "system": "urn:bs", "display": "no code" }
                ],
                "text": "Waiting"
            },
            "intent": "order",
            "priority": "asap",
            "code": { "coding": [{ "system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill" }] },
            "focus": { "reference": "ServiceRequest/sr1" },
            "for": { "reference": "Patient/p1" },
            "authoredOn": "2024-03-01T09:30:00+01:00",
            "lastModified": "2024-03-04",
            "requester": { "reference": "Practitioner/dr" },
            "performerType": [
                { "coding": [{ "system": "urn:roles", "code": "nurse" }] },
                { "coding": [{ "system": "urn:roles", "code": "pharmacist" }, { "code": "clerk" }] }
            ],
            "owner": { "reference": "http://baton.test/fhir/Organization/o1/_history/2" },
            "executionPeriod": { "start": "2024-03-02", "end": "2024-03-09T12:00:00Z" },
            "restriction": { "period": { "end": "2024-03-10" } },
            "extension": [
                { "url": MULTI_FOCUS_EXTENSION, "valueReference": { "reference": "ServiceRequest/sr2" } },
                { "url": MULTI_FOCUS_EXTENSION, "valueReference": { "reference": "ServiceRequest/sr1" } },
                { "url": "urn:other", "valueReference": { "reference": "ServiceRequest/sr3" } }
            ]
        })
    }

    fn tokens_of<'a>(index: &'a TaskIndex, param: &str) -> Vec<(Option<&'a str>, &'a str)> {
        index
            .tokens
            .iter()
            .filter(|e| e.param == param)
            .map(|e| (e.system.as_deref(), e.value.as_str()))
            .collect()
    }

    fn dates_of<'a>(index: &'a TaskIndex, param: &str) -> Vec<(&'a str, &'a str)> {
        index
            .dates
            .iter()
            .filter(|e| e.param == param)
            .map(|e| (e.start.as_str(), e.end.as_str()))
            .collect()
    }

    #[test]
    fn every_token_and_reference_parameter_is_extracted() {
        let index = index_task(&full_task(), BASE);
        type Expected<'a> = &'a [(Option<&'a str>, &'a str)];
        let cases: &[(&str, Expected)] = &[
            ("_id", &[(None, "t1")]),
            ("status", &[(Some(STATUS_SYSTEM), "in-progress")]),
            (
                "business-status",
                &[(Some("urn:bs"), "waiting"), (None, "bare")],
            ),
            ("owner", &[(None, "Organization/o1")]),
            (
                "performer",
                &[
                    (Some("urn:roles"), "nurse"),
                    (Some("urn:roles"), "pharmacist"),
                    (None, "clerk"),
                ],
            ),
            ("patient", &[(None, "Patient/p1")]),
            ("subject", &[(None, "Patient/p1")]),
            // The focus and the first extension name the same request; it is indexed once.
            (
                "focus",
                &[(None, "ServiceRequest/sr1"), (None, "ServiceRequest/sr2")],
            ),
            ("part-of", &[(None, "Task/parent")]),
            ("based-on", &[(None, "ServiceRequest/sr1")]),
            ("requester", &[(None, "Practitioner/dr")]),
            (
                "code",
                &[(Some("http://hl7.org/fhir/CodeSystem/task-code"), "fulfill")],
            ),
            ("priority", &[(Some(PRIORITY_SYSTEM), "asap")]),
            ("intent", &[(Some(INTENT_SYSTEM), "order")]),
            ("identifier", &[(Some("urn:ids"), "A-1"), (None, "loose")]),
        ];
        for (param, expected) in cases {
            assert_eq!(tokens_of(&index, param), expected.to_vec(), "{param}");
        }
        let covered: Vec<&str> = cases.iter().map(|(p, _)| *p).collect();
        for entry in &index.tokens {
            assert!(covered.contains(&entry.param), "unexpected {entry:?}");
        }
    }

    #[test]
    fn every_date_parameter_is_extracted_as_a_range() {
        let index = index_task(&full_task(), BASE);
        let cases = [
            (
                "_lastUpdated",
                ("2024-03-05T10:00:00.000Z", "2024-03-05T10:00:00.001Z"),
            ),
            // 09:30+01:00 is 08:30 UTC; a dateTime to the second is a one-second range.
            (
                "authored-on",
                ("2024-03-01T08:30:00.000Z", "2024-03-01T08:30:01.000Z"),
            ),
            (
                "modified",
                ("2024-03-04T00:00:00.000Z", "2024-03-05T00:00:00.000Z"),
            ),
            // From the start of the start day to the end of the end second.
            (
                "period",
                ("2024-03-02T00:00:00.000Z", "2024-03-09T12:00:01.000Z"),
            ),
            (
                "due-date",
                ("2024-03-10T00:00:00.000Z", "2024-03-11T00:00:00.000Z"),
            ),
        ];
        for (param, range) in cases {
            assert_eq!(dates_of(&index, param), vec![range], "{param}");
        }
        assert_eq!(index.dates.len(), cases.len());
    }

    #[test]
    fn periods_with_open_ends_are_unbounded() {
        let cases = [
            (
                json!({ "start": "2024-05" }),
                Some(("2024-05-01T00:00:00.000Z", MAX_KEY)),
            ),
            (
                json!({ "end": "2024-05" }),
                Some((MIN_KEY, "2024-06-01T00:00:00.000Z")),
            ),
            (json!({}), None),
            (json!({ "start": "not a date" }), None),
        ];
        for (period, expected) in cases {
            let task = json!({
                "id": "p", "meta": { "lastUpdated": "2024-01-01T00:00:00Z" },
                "status": "ready", "intent": "order", "executionPeriod": period
            });
            let index = index_task(&task, BASE);
            assert_eq!(
                dates_of(&index, "period"),
                expected.into_iter().collect::<Vec<_>>(),
                "{period}"
            );
        }
    }

    #[test]
    fn patient_is_indexed_only_when_the_subject_is_a_patient() {
        let cases = [
            (json!({ "reference": "Patient/p1" }), Some("Patient/p1")),
            (
                json!({ "reference": "http://baton.test/fhir/Patient/p2/_history/1" }),
                Some("Patient/p2"),
            ),
            (
                json!({ "reference": "https://other.example/fhir/Patient/p3" }),
                Some("https://other.example/fhir/Patient/p3"),
            ),
            (
                json!({ "reference": "urn:uuid:1234", "type": "Patient" }),
                Some("urn:uuid:1234"),
            ),
            (json!({ "reference": "Group/g1" }), None),
            (
                json!({ "reference": "https://other.example/fhir/Group/g1" }),
                None,
            ),
            (json!({ "display": "someone" }), None),
        ];
        for (subject, expected) in cases {
            let task = json!({ "id": "x", "status": "ready", "intent": "order", "for": subject });
            let index = index_task(&task, BASE);
            let patient: Vec<&str> = tokens_of(&index, "patient").iter().map(|t| t.1).collect();
            assert_eq!(
                patient,
                expected.into_iter().collect::<Vec<_>>(),
                "{subject}"
            );
            assert_eq!(
                tokens_of(&index, "subject").len(),
                usize::from(subject.get("reference").is_some()),
                "{subject}"
            );
        }
    }

    #[test]
    fn a_minimal_task_indexes_only_what_it_has() {
        let task = json!({
            "resourceType": "Task", "id": "m", "meta": { "lastUpdated": "2024-01-01T00:00:00Z" },
            "status": "draft", "intent": "plan"
        });
        let index = index_task(&task, BASE);
        let params: Vec<&str> = index.tokens.iter().map(|e| e.param).collect();
        assert_eq!(params, ["_id", "status", "intent"]);
        let params: Vec<&str> = index.dates.iter().map(|e| e.param).collect();
        assert_eq!(params, ["_lastUpdated"]);
    }

    #[test]
    fn an_owner_without_a_reference_is_not_missing() {
        let task = |owner: Value| {
            json!({
                "resourceType": "Task", "id": "o", "meta": { "lastUpdated": "2024-01-01T00:00:00Z" },
                "status": "requested", "intent": "order", "owner": owner,
                "performerType": [{ "coding": [{ "system": "http://x", "code": "lab" }] }]
            })
        };
        let queue = "owner:missing=true&performer=http://x|lab";
        let cases = [
            (json!({ "display": "Dr. One" }), "owner:missing=true", false),
            (json!({ "display": "Dr. One" }), "owner:missing=false", true),
            (json!({ "display": "Dr. One" }), queue, false),
            (json!({ "identifier": { "value": "1" } }), queue, false),
            (
                json!({ "display": "Dr. One" }),
                "owner=Practitioner/1",
                false,
            ),
            (
                json!({ "reference": "Practitioner/1" }),
                "owner=Practitioner/1",
                true,
            ),
            (json!({ "reference": "Practitioner/1" }), queue, false),
        ];
        for (owner, query, expected) in cases {
            let index = index_task(&task(owner.clone()), BASE);
            let parsed = parse(query).unwrap();
            assert_eq!(
                matches(&index, &parsed.predicates),
                expected,
                "{owner} {query}"
            );
        }
    }

    #[test]
    fn priority_ranks_by_urgency() {
        let cases = [
            (json!({}), 1),
            (json!({ "priority": "routine" }), 1),
            (json!({ "priority": "urgent" }), 2),
            (json!({ "priority": "asap" }), 3),
            (json!({ "priority": "stat" }), 4),
        ];
        for (task, rank) in cases {
            assert_eq!(priority_rank(&task), rank, "{task}");
        }
    }

    #[test]
    fn parameter_codes_are_safe_to_splice_into_sql() {
        // The store writes parameter codes into ORDER BY subqueries as literals.
        for def in TASK_PARAMS {
            assert!(
                def.code
                    .bytes()
                    .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_'),
                "{}",
                def.code
            );
            assert_eq!(
                def.targets.is_empty(),
                def.kind != ParamType::Reference,
                "{}",
                def.code
            );
        }
    }

    // --- parsing -------------------------------------------------------------------------------

    const LIMITS: SearchLimits = SearchLimits {
        default_count: 20,
        max_count: 100,
        default_total: crate::fhir::search::TotalMode::Accurate,
    };

    /// Splits a test query string; the tests avoid characters that would need percent-encoding.
    fn pairs(query: &str) -> Vec<(String, String)> {
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    fn parse(query: &str) -> Result<SearchQuery> {
        parse_query(&pairs(query), &LIMITS, BASE, Handling::Strict)
    }

    fn only_predicate(query: &str) -> Predicate {
        let parsed = parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        assert_eq!(parsed.predicates.len(), 1, "{query}");
        parsed.predicates.into_iter().next().unwrap()
    }

    fn any(code: &str) -> TokenValue {
        TokenValue {
            system: SystemMatch::Any,
            code: Some(code.into()),
        }
    }

    fn token(param: &'static str, negated: bool, any_of: Vec<TokenValue>) -> Predicate {
        Predicate::Token {
            param,
            negated,
            any_of,
        }
    }

    fn date(prefix: Prefix, start: &str, end: &str) -> DateComparison {
        DateComparison {
            prefix,
            start: start.into(),
            end: end.into(),
        }
    }

    fn expanded(types: &[&str], id: &str) -> Vec<TokenValue> {
        types.iter().map(|t| any(&format!("{t}/{id}"))).collect()
    }

    #[test]
    fn token_parameters_parse_system_and_code() {
        let exact = |s: &str, c: Option<&str>| TokenValue {
            system: SystemMatch::Exact(s.into()),
            code: c.map(Into::into),
        };
        let cases = [
            ("_id=t1", token("_id", false, vec![any("t1")])),
            (
                "status=ready,in-progress",
                token("status", false, vec![any("ready"), any("in-progress")]),
            ),
            (
                "status=http://hl7.org/fhir/task-status|ready",
                token(
                    "status",
                    false,
                    vec![exact("http://hl7.org/fhir/task-status", Some("ready"))],
                ),
            ),
            (
                "business-status=|bare",
                token(
                    "business-status",
                    false,
                    vec![TokenValue {
                        system: SystemMatch::NoSystem,
                        code: Some("bare".into()),
                    }],
                ),
            ),
            (
                "performer=urn:roles|",
                token("performer", false, vec![exact("urn:roles", None)]),
            ),
            (
                "code:not=fulfill",
                token("code", true, vec![any("fulfill")]),
            ),
            ("priority=stat", token("priority", false, vec![any("stat")])),
            ("intent=order", token("intent", false, vec![any("order")])),
            (
                "identifier=urn:ids|A-1",
                token("identifier", false, vec![exact("urn:ids", Some("A-1"))]),
            ),
            // FHIR's escapes let a code contain a comma or a bar.
            (
                r"identifier=urn:ids|a\,b,c\|d",
                token(
                    "identifier",
                    false,
                    vec![exact("urn:ids", Some("a,b")), any("c|d")],
                ),
            ),
            (
                "status:missing=true",
                Predicate::Missing {
                    param: "status",
                    missing: true,
                },
            ),
            (
                "business-status:missing=false",
                Predicate::Missing {
                    param: "business-status",
                    missing: false,
                },
            ),
        ];
        for (query, expected) in cases {
            assert_eq!(only_predicate(query), expected, "{query}");
        }
    }

    #[test]
    fn reference_parameters_normalise_and_expand_bare_ids() {
        let cases = [
            (
                "owner=Practitioner/1",
                token("owner", false, vec![any("Practitioner/1")]),
            ),
            (
                "owner=http://baton.test/fhir/Practitioner/1",
                token("owner", false, vec![any("Practitioner/1")]),
            ),
            (
                "owner=https://elsewhere/fhir/Practitioner/1",
                token(
                    "owner",
                    false,
                    vec![any("https://elsewhere/fhir/Practitioner/1")],
                ),
            ),
            (
                "owner=1",
                token("owner", false, expanded(OWNER_TARGETS, "1")),
            ),
            (
                "requester=dr",
                token("requester", false, expanded(REQUESTER_TARGETS, "dr")),
            ),
            (
                "patient=p1",
                token("patient", false, vec![any("Patient/p1")]),
            ),
            (
                "subject=p1",
                token("subject", false, expanded(RESOURCE_TYPES, "p1")),
            ),
            (
                "subject:Group=g1",
                token("subject", false, vec![any("Group/g1")]),
            ),
            (
                "focus=ServiceRequest/sr1,ServiceRequest/sr2",
                token(
                    "focus",
                    false,
                    vec![any("ServiceRequest/sr1"), any("ServiceRequest/sr2")],
                ),
            ),
            (
                "part-of=parent",
                token("part-of", false, vec![any("Task/parent")]),
            ),
            (
                "part-of:not=Task/parent/_history/3",
                token("part-of", true, vec![any("Task/parent")]),
            ),
            (
                "based-on=sr1",
                token("based-on", false, expanded(RESOURCE_TYPES, "sr1")),
            ),
            (
                "owner:missing=true",
                Predicate::Missing {
                    param: "owner",
                    missing: true,
                },
            ),
        ];
        for (query, expected) in cases {
            assert_eq!(only_predicate(query), expected, "{query}");
        }
    }

    #[test]
    fn date_parameters_parse_every_prefix() {
        let day = ("2024-03-01T00:00:00.000Z", "2024-03-02T00:00:00.000Z");
        let cases = [
            ("authored-on=2024-03-01", Prefix::Eq),
            ("authored-on=eq2024-03-01", Prefix::Eq),
            ("modified=ne2024-03-01", Prefix::Ne),
            ("period=gt2024-03-01", Prefix::Gt),
            ("due-date=lt2024-03-01", Prefix::Lt),
            ("_lastUpdated=ge2024-03-01", Prefix::Ge),
            ("authored-on=le2024-03-01", Prefix::Le),
            ("authored-on=sa2024-03-01", Prefix::Sa),
            ("authored-on=eb2024-03-01", Prefix::Eb),
            ("authored-on=ap2024-03-01", Prefix::Ap),
        ];
        for (query, prefix) in cases {
            let param = task_param(query.split('=').next().unwrap()).unwrap().code;
            assert_eq!(
                only_predicate(query),
                Predicate::Date {
                    param,
                    any_of: vec![date(prefix, day.0, day.1)]
                },
                "{query}"
            );
        }
        assert_eq!(
            only_predicate("period=lt2024,ge2025-06-01T10:00"),
            Predicate::Date {
                param: "period",
                any_of: vec![
                    date(
                        Prefix::Lt,
                        "2024-01-01T00:00:00.000Z",
                        "2025-01-01T00:00:00.000Z"
                    ),
                    date(
                        Prefix::Ge,
                        "2025-06-01T10:00:00.000Z",
                        "2025-06-01T10:01:00.000Z"
                    ),
                ]
            }
        );
        assert_eq!(
            only_predicate("due-date:missing=true"),
            Predicate::Missing {
                param: "due-date",
                missing: true
            }
        );
    }

    #[test]
    fn repeated_parameters_are_anded() {
        let parsed =
            parse("status=ready&status:not=draft&authored-on=ge2024&authored-on=lt2025").unwrap();
        assert_eq!(parsed.predicates.len(), 4);
        assert_eq!(
            parsed.link_params,
            pairs("status=ready&status:not=draft&authored-on=ge2024&authored-on=lt2025")
        );
    }

    #[test]
    fn control_parameters_shape_the_query() {
        let parsed = parse("").unwrap();
        assert_eq!(
            parsed,
            SearchQuery {
                predicates: vec![],
                count: 20,
                offset: 0,
                after: None,
                sort: vec![],
                total: TotalMode::Accurate,
                summary_count: false,
                subset: None,
                includes: Vec::new(),
                iterated_includes: Vec::new(),
                revinclude: None,
                link_params: vec![],
            }
        );

        let parsed = parse("_count=5&_offset=10&_sort=-priority,_lastUpdated&_total=none").unwrap();
        assert_eq!((parsed.count, parsed.offset), (5, 10));
        assert_eq!(
            parsed.sort,
            vec![
                SortKey {
                    param: "priority",
                    descending: true
                },
                SortKey {
                    param: "_lastUpdated",
                    descending: false
                },
            ]
        );
        assert_eq!(parsed.total, TotalMode::None);
        assert_eq!(
            parsed.link_params,
            pairs("_sort=-priority,_lastUpdated&_total=none")
        );

        type Check = fn(&SearchQuery) -> bool;
        let cases: &[(&str, Check)] = &[
            ("_count=1000", |q| q.count == 100 && !q.summary_count),
            ("_count=0", |q| q.count == 0 && q.summary_count),
            ("_summary=count", |q| q.summary_count && q.count == 20),
            ("_summary=count&_total=none", |q| {
                q.summary_count && q.total == TotalMode::Accurate
            }),
            ("_summary=false", |q| !q.summary_count),
            ("_total=estimate", |q| q.total == TotalMode::Estimate),
            ("_total=accurate", |q| q.total == TotalMode::Accurate),
            ("_format=json&_pretty=true", |q| q.link_params.is_empty()),
            ("_revinclude=Task:part-of", |q| {
                q.revinclude == Some(RevInclude::PartOf)
                    && q.link_params == pairs("_revinclude=Task:part-of")
            }),
            ("_revinclude=Task:part-of:iterate", |q| {
                q.revinclude == Some(RevInclude::PartOfIterate)
                    && q.link_params == pairs("_revinclude:iterate=Task:part-of")
            }),
            ("_revinclude:iterate=Task:part-of", |q| {
                q.revinclude == Some(RevInclude::PartOfIterate)
            }),
            (
                "_include:iterate=Task:part-of&_include=Task:based-on",
                |q| {
                    q.iterated_includes == [Include::PartOf]
                        && q.includes == [Include::BasedOn]
                        && q.link_params
                            == pairs("_include:iterate=Task:part-of&_include=Task:based-on")
                },
            ),
            ("_revinclude:recurse=Task:part-of", |q| {
                q.revinclude == Some(RevInclude::PartOfIterate)
            }),
            (
                "_revinclude:iterate=Task:part-of&_revinclude=Task:part-of",
                |q| q.revinclude == Some(RevInclude::PartOfIterate) && q.link_params.len() == 1,
            ),
            (
                "_sort=_id,-authored-on,status,intent,modified,period,due-date",
                |q| q.sort.len() == 7 && q.sort[1].descending && !q.sort[0].descending,
            ),
        ];
        for (query, check) in cases {
            let parsed = parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
            assert!(check(&parsed), "{query}: {parsed:?}");
        }
    }

    #[test]
    fn bad_queries_are_rejected_naming_the_parameter() {
        use IssueCode::{Invalid, NotSupported, TooCostly};
        let cases = [
            ("foo=bar", NotSupported, "'foo'"),
            ("_include=Task:owner", NotSupported, "'_include=Task:owner'"),
            ("_elements:x=status", NotSupported, "'_elements:x'"),
            (
                "_has:Task:part-of:status=ready",
                NotSupported,
                "'_has:Task:part-of:status'",
            ),
            ("status:text=ready", NotSupported, "':text'"),
            ("status:exact=ready", NotSupported, "'status'"),
            ("authored-on:not=2024", NotSupported, "'authored-on'"),
            ("owner:Task=1", NotSupported, "'owner'"),
            ("patient:Group=1", NotSupported, "'patient'"),
            ("status:missing=yes", Invalid, "'status:missing'"),
            ("status=", Invalid, "'status'"),
            ("status=ready,,done", Invalid, "'status'"),
            ("status=|", Invalid, "'status'"),
            ("owner=not a ref", Invalid, "'owner'"),
            ("subject:Patient=Group/1", Invalid, "'subject:Patient'"),
            ("authored-on=yesterday", Invalid, "'authored-on'"),
            ("authored-on=xx2024", Invalid, "'authored-on'"),
            ("authored-on=gt", Invalid, "'authored-on'"),
            ("authored-on=2024-13", Invalid, "'authored-on'"),
            ("_lastUpdated=", Invalid, "'_lastUpdated'"),
            ("_count=ten", Invalid, "'_count'"),
            ("_count=-1", Invalid, "'_count'"),
            ("_offset=1.5", Invalid, "'_offset'"),
            ("_offset=2147483648", Invalid, "'_offset'"),
            ("_offset=18446744073709551616", Invalid, "'_offset'"),
            ("_count=1&_count=2", Invalid, "'_count'"),
            ("_sort=", Invalid, "'_sort="),
            ("_sort=status,", Invalid, "'_sort="),
            ("_sort=owner", NotSupported, "'owner'"),
            ("_sort=nonsense", NotSupported, "'nonsense'"),
            ("_sort:desc=status", NotSupported, "'_sort:desc'"),
            ("_total=maybe", Invalid, "'_total'"),
            ("_summary=maybe", Invalid, "'maybe'"),
            ("_elements=a.b", Invalid, "'a.b'"),
            (
                "_revinclude=Task:based-on",
                NotSupported,
                "_revinclude=Task:based-on",
            ),
            (
                "_revinclude:deep=Task:part-of",
                NotSupported,
                "'_revinclude:deep'",
            ),
            (
                "subject=a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q,r,s,t,u,v,w,x",
                TooCostly,
                "512",
            ),
        ];
        for (query, code, needle) in cases {
            let err = parse(query).expect_err(query);
            let client = err.as_client().expect("a client error");
            assert_eq!(
                client.status,
                axum::http::StatusCode::BAD_REQUEST,
                "{query}"
            );
            assert_eq!(client.code, code, "{query}: {}", client.diagnostics);
            assert!(
                client.diagnostics.contains(needle),
                "{query}: '{}' lacks {needle}",
                client.diagnostics
            );
        }
    }

    #[test]
    fn criteria_and_values_are_capped() {
        let repeated = |param: &str, n: usize| vec![param; n].join("&");
        let ids = |n: usize| {
            let ids: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
            format!("_id={}", ids.join(","))
        };
        let pairs = |n: usize| {
            let pairs: Vec<String> = (0..n).map(|i| format!("urn:x|v{i}")).collect();
            format!("identifier={}", pairs.join(","))
        };
        let max = MAX_SEARCH_CRITERIA;
        let too_many = format!("more than {max} criteria");
        let cases = [
            (repeated("status=ready", max), None),
            (repeated("status=ready", max + 1), Some(too_many.clone())),
            (repeated("_id:missing=false", 995), Some(too_many)),
            (ids(MAX_SEARCH_VALUES), None),
            (ids(MAX_SEARCH_VALUES + 1), Some("513 values".to_string())),
            // `system|code` binds two values.
            (pairs(MAX_SEARCH_VALUES / 2), None),
            (
                pairs(MAX_SEARCH_VALUES / 2 + 1),
                Some("514 values".to_string()),
            ),
            // Control parameters are not criteria.
            (
                format!(
                    "{}&_count=5&_sort=status&_total=none",
                    repeated("status=ready", max)
                ),
                None,
            ),
        ];
        for (query, refused) in cases {
            match (parse(&query), refused) {
                (Ok(_), None) => {}
                (Err(e), Some(needle)) => {
                    let client = e.as_client().unwrap();
                    assert_eq!(client.code, IssueCode::TooCostly, "{}", client.diagnostics);
                    assert!(
                        client.diagnostics.contains(&needle),
                        "{}",
                        client.diagnostics
                    );
                }
                (result, _) => panic!("{}: {result:?}", &query[..40.min(query.len())]),
            }
        }
    }

    #[test]
    fn unknown_parameter_lists_the_supported_ones() {
        let err = parse("colour=red").unwrap_err();
        let diagnostics = &err.as_client().unwrap().diagnostics;
        for def in TASK_PARAMS {
            assert!(diagnostics.contains(def.code), "{diagnostics}");
        }
        assert!(diagnostics.contains("_count"), "{diagnostics}");
    }

    #[test]
    fn lenient_handling_ignores_unknown_parameters_only() {
        let lenient = |q: &str| parse_query(&pairs(q), &LIMITS, BASE, Handling::Lenient);
        let parsed = lenient("colour=red&_has:Task:part-of:status=ready&status=ready").unwrap();
        assert_eq!(
            parsed.predicates,
            vec![token("status", false, vec![any("ready")])]
        );
        assert_eq!(parsed.link_params, pairs("status=ready"));
        // A known parameter with a bad value is still an error: ignoring it would widen the result.
        assert!(lenient("status:text=ready").is_err());
        assert!(lenient("authored-on=soon").is_err());
    }

    // --- matching ------------------------------------------------------------------------------

    fn index_with(
        tokens: &[(&'static str, Option<&str>, &str)],
        dates: &[(&'static str, &str, &str)],
    ) -> TaskIndex {
        TaskIndex {
            tokens: tokens
                .iter()
                .map(|(param, system, value)| TokenEntry {
                    param,
                    system: system.map(Into::into),
                    value: (*value).into(),
                })
                .collect(),
            dates: dates
                .iter()
                .map(|(param, start, end)| DateEntry {
                    param,
                    start: (*start).into(),
                    end: (*end).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn token_matching_respects_systems_and_case() {
        let index = index_with(
            &[
                ("code", Some("urn:a"), "x"),
                ("code", None, "y"),
                ("status", Some(STATUS_SYSTEM), "ready"),
            ],
            &[],
        );
        let cases = [
            ("code=x", true),
            ("code=X", false),
            ("code=urn:a|x", true),
            ("code=urn:b|x", false),
            ("code=|x", false),
            ("code=|y", true),
            ("code=urn:a|y", false),
            ("code=urn:a|", true),
            ("code=urn:b|", false),
            ("code=z,y", true),
            ("code:not=x", false),
            ("code:not=z", true),
            ("code:not=z,x", false),
            // `:not` is true when the element is absent.
            ("performer:not=nurse", true),
            ("performer=nurse", false),
            ("code:missing=false", true),
            ("code:missing=true", false),
            ("owner:missing=true", true),
            ("status=ready&code=x", true),
            ("status=ready&code=z", false),
        ];
        for (query, expected) in cases {
            let parsed = parse(query).unwrap();
            assert_eq!(matches(&index, &parsed.predicates), expected, "{query}");
        }
    }

    #[test]
    fn date_prefixes_compare_ranges() {
        // The resource range is the whole of 2024-03-10.
        let index = index_with(
            &[],
            &[(
                "authored-on",
                "2024-03-10T00:00:00.000Z",
                "2024-03-11T00:00:00.000Z",
            )],
        );
        let cases = [
            ("2024-03-10", true),
            ("2024-03", true),
            ("2024-03-10T12:00", false),
            ("ne2024-03-10T12:00", true),
            ("ne2024-03", false),
            ("gt2024-03-09", true),
            ("gt2024-03-10", false),
            ("gt2024-03-10T12:00", true),
            ("lt2024-03-11", true),
            ("lt2024-03-10", false),
            ("lt2024-03-10T12:00", true),
            ("ge2024-03-10", true),
            ("ge2024-03-11", false),
            ("le2024-03-10", true),
            ("le2024-03-09", false),
            ("sa2024-03-09", true),
            ("sa2024-03-10", false),
            ("eb2024-03-11", true),
            ("eb2024-03-10", false),
            ("ap2024-03-10T23:59", true),
            ("ap2024-03-11", false),
            ("ap2024-03-09", false),
            ("2024-03-09,2024-03-10", true),
        ];
        for (value, expected) in cases {
            let query = format!("authored-on={value}");
            let parsed = parse(&query).unwrap();
            assert_eq!(matches(&index, &parsed.predicates), expected, "{query}");
            // An absent element matches no comparison, not even `ne`.
            let other = format!("modified={value}");
            assert!(
                !matches(&index, &parse(&other).unwrap().predicates),
                "{other}"
            );
        }
    }

    #[test]
    fn open_periods_reach_to_the_ends_of_time() {
        let index = index_with(&[], &[("period", "2024-05-01T00:00:00.000Z", MAX_KEY)]);
        let cases = [
            ("period=gt9000", true),
            ("period=lt2024-05-01", false),
            ("period=ge2024-04", true),
            ("period=eb2030", false),
            ("period=2024-05", false),
        ];
        for (query, expected) in cases {
            assert_eq!(
                matches(&index, &parse(query).unwrap().predicates),
                expected,
                "{query}"
            );
        }
    }

    #[test]
    fn compound_predicates_combine() {
        let index = index_with(&[("status", None, "ready")], &[]);
        let ready = token("status", false, vec![any("ready")]);
        let done = token("status", false, vec![any("done")]);
        let cases = [
            (Predicate::Or(vec![]), false),
            (Predicate::And(vec![]), true),
            (Predicate::Or(vec![done.clone(), ready.clone()]), true),
            (Predicate::And(vec![done.clone(), ready.clone()]), false),
            (
                Predicate::And(vec![ready.clone(), Predicate::Or(vec![done, ready])]),
                true,
            ),
            (token("status", false, vec![]), false),
            (token("status", true, vec![]), true),
            (
                Predicate::Date {
                    param: "period",
                    any_of: vec![],
                },
                false,
            ),
        ];
        for (predicate, expected) in cases {
            assert_eq!(predicate.matches(&index), expected, "{predicate:?}");
        }
        assert!(matches(&index, &[]));
    }

    #[test]
    fn parsed_queries_match_an_indexed_task() {
        let index = index_task(&full_task(), BASE);
        let hits = [
            "_id=t1",
            "status=in-progress",
            "owner=o1",
            "owner=http://baton.test/fhir/Organization/o1",
            "focus=sr2",
            "focus=ServiceRequest/sr1",
            "focus:not=ServiceRequest/sr3",
            "part-of=parent",
            "patient=p1",
            "subject:Patient=p1",
            "requester=Practitioner/dr",
            "performer=urn:roles|pharmacist",
            "identifier=urn:ids|A-1",
            "identifier=|loose",
            "authored-on=2024-03-01",
            "_lastUpdated=ge2024-03-05",
            "period=ap2024-03-05",
            "due-date=le2024-03-10",
            "modified=2024-03-04",
            "priority=asap,stat",
        ];
        for query in hits {
            assert!(
                matches(&index, &parse(query).unwrap().predicates),
                "{query}"
            );
        }
        let misses = [
            "focus=ServiceRequest/sr3",
            "owner=Practitioner/o1",
            "patient:missing=true",
            "due-date=gt2024-03-10",
            "authored-on=2024-02",
            "priority:not=asap",
        ];
        for query in misses {
            assert!(
                !matches(&index, &parse(query).unwrap().predicates),
                "{query}"
            );
        }
    }
}
