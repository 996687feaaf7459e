//! The FHIR R4 `Task`: its code sets, the checks an incoming Task must pass, the status state
//! machine, and the few accessors that the store, the matcher and the access rules share.
//!
//! Validation is table-driven. Each R4 element definition Baton checks (Task itself and the
//! datatypes it uses) is a table of elements with their cardinality and type, and one generic
//! walker applies the FHIR JSON rules to it. Constraints that span several elements (the FHIR
//! invariants `per-1`, `ext-1`, `ref-1`, `dom-2`, `dom-3`, `dom-4`) are small functions hung on
//! the table they belong to. Everything here is pure: no IO, no clock.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;

use serde_json::{Map, Value};

use crate::error::{Error, IssueCode, Result};
use crate::fhir::datetime::{DateKind, parse_range};
use crate::fhir::shape::{MAX_DEPTH, ShapeLimits, check_shape};
use crate::fhir::{
    ID_RULE, MULTI_FOCUS_EXTENSION, check_text_content, is_valid_id, normalize_reference,
};

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
    check_json_rules(resource, "Task")?;
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
    check_object(task, "Task", &TASK, &cx)?;
    // Contained resources are not walked element by element, so their strings and
    // narratives are checked here, with the Task's own.
    check_text_content(resource, "Task")
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

// ---------------------------------------------------------------------------------------------
// Element tables.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Card {
    Optional,
    Required,
    Many,
}

#[derive(Clone, Copy)]
enum Kind {
    /// The `resourceType` discriminator; its value is checked before the walk starts.
    ResourceType,
    Primitive(Primitive),
    Complex(&'static Complex),
    /// A Reference and the resource types it may point at (empty: any).
    Reference(&'static [&'static str]),
    /// A contained resource of any type.
    Resource,
    /// A datatype Baton does not model field by field (Quantity, Attachment, …). It only
    /// occurs as a `value[x]`, and the generic JSON rules still apply inside it.
    Object,
}

#[derive(Clone, Copy)]
enum Primitive {
    Boolean,
    Decimal,
    Integer { min: i64, what: &'static str },
    Text(Text),
}

/// The primitive types written as JSON strings, each with its own lexical rule.
#[derive(Clone, Copy)]
enum Text {
    String,
    /// A code, from the given required value set unless it is empty.
    Code(&'static [&'static str]),
    Language,
    Id,
    Uri,
    Base64,
    Date,
    DateTime,
    Instant,
    Time,
    Xhtml,
}

#[derive(Clone, Copy)]
struct Field {
    name: &'static str,
    card: Card,
    kind: Kind,
}

/// Whether a complex type has a `value[x]` choice element.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ValueChoice {
    Absent,
    Optional,
    Required,
}

/// A constraint across the elements of one object, checked after its elements.
type Rule = fn(&Map<String, Value>, &str) -> Result<()>;

struct Complex {
    name: &'static str,
    fields: &'static [Field],
    value: ValueChoice,
    rule: Option<Rule>,
}

const fn complex(name: &'static str, fields: &'static [Field]) -> Complex {
    Complex {
        name,
        fields,
        value: ValueChoice::Absent,
        rule: None,
    }
}

const fn opt(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        card: Card::Optional,
        kind,
    }
}

const fn req(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        card: Card::Required,
        kind,
    }
}

const fn many(name: &'static str, kind: Kind) -> Field {
    Field {
        name,
        card: Card::Many,
        kind,
    }
}

const fn text(text: Text) -> Kind {
    Kind::Primitive(Primitive::Text(text))
}

const fn code(codes: &'static [&'static str]) -> Kind {
    text(Text::Code(codes))
}

const STRING: Kind = text(Text::String);
const URI: Kind = text(Text::Uri);
const DATE_TIME: Kind = text(Text::DateTime);
const ANY_REFERENCE: Kind = Kind::Reference(&[]);
const EXTENSION_KIND: Kind = Kind::Complex(&EXTENSION);
const CONCEPT: Kind = Kind::Complex(&CODEABLE_CONCEPT);
const IDENTIFIER_KIND: Kind = Kind::Complex(&IDENTIFIER);
const PERIOD_KIND: Kind = Kind::Complex(&PERIOD);
/// `id` and `extension`, which every datatype inherits from Element.
const ELEMENT_ID: Field = opt("id", STRING);
const EXTENSIONS: Field = many("extension", EXTENSION_KIND);
const MODIFIER_EXTENSIONS: Field = many("modifierExtension", EXTENSION_KIND);

static TASK: Complex = Complex {
    rule: Some(contained_are_referenced),
    ..complex(
        "Task",
        &[
            req("resourceType", Kind::ResourceType),
            opt("id", text(Text::Id)),
            opt("meta", Kind::Complex(&META)),
            opt("implicitRules", URI),
            opt("language", text(Text::Language)),
            opt("text", Kind::Complex(&NARRATIVE)),
            many("contained", Kind::Resource),
            EXTENSIONS,
            MODIFIER_EXTENSIONS,
            many("identifier", IDENTIFIER_KIND),
            opt("instantiatesCanonical", URI),
            opt("instantiatesUri", URI),
            many("basedOn", ANY_REFERENCE),
            opt("groupIdentifier", IDENTIFIER_KIND),
            many("partOf", Kind::Reference(&["Task"])),
            req("status", code(TASK_STATUSES)),
            opt("statusReason", CONCEPT),
            opt("businessStatus", CONCEPT),
            req("intent", code(TASK_INTENTS)),
            opt("priority", code(PRIORITIES)),
            opt("code", CONCEPT),
            opt("description", STRING),
            opt("focus", ANY_REFERENCE),
            opt("for", ANY_REFERENCE),
            opt("encounter", Kind::Reference(&["Encounter"])),
            opt("executionPeriod", PERIOD_KIND),
            opt("authoredOn", DATE_TIME),
            opt("lastModified", DATE_TIME),
            opt("requester", Kind::Reference(REQUESTER_TARGETS)),
            many("performerType", CONCEPT),
            opt("owner", Kind::Reference(OWNER_TARGETS)),
            opt("location", Kind::Reference(&["Location"])),
            opt("reasonCode", CONCEPT),
            opt("reasonReference", ANY_REFERENCE),
            many("insurance", Kind::Reference(&["Coverage", "ClaimResponse"])),
            many("note", Kind::Complex(&ANNOTATION)),
            many("relevantHistory", Kind::Reference(&["Provenance"])),
            opt("restriction", Kind::Complex(&RESTRICTION)),
            many("input", Kind::Complex(&TASK_INPUT)),
            many("output", Kind::Complex(&TASK_OUTPUT)),
        ],
    )
};

static RESTRICTION: Complex = complex(
    "Task.restriction",
    &[
        ELEMENT_ID,
        EXTENSIONS,
        MODIFIER_EXTENSIONS,
        opt(
            "repetitions",
            Kind::Primitive(Primitive::Integer {
                min: 1,
                what: "a positive integer",
            }),
        ),
        opt("period", PERIOD_KIND),
        many("recipient", Kind::Reference(RECIPIENT_TARGETS)),
    ],
);

/// `Task.input` and `Task.output` share their shape: a type and exactly one value.
const PARAMETER_FIELDS: &[Field] = &[
    ELEMENT_ID,
    EXTENSIONS,
    MODIFIER_EXTENSIONS,
    req("type", CONCEPT),
];

static TASK_INPUT: Complex = Complex {
    value: ValueChoice::Required,
    ..complex("Task.input", PARAMETER_FIELDS)
};

static TASK_OUTPUT: Complex = Complex {
    value: ValueChoice::Required,
    ..complex("Task.output", PARAMETER_FIELDS)
};

/// What a primitive's `_name` sibling may hold.
static ELEMENT: Complex = complex("Element", &[ELEMENT_ID, EXTENSIONS]);

/// Nested extensions name this static directly: the `EXTENSIONS` constant points at it, and a
/// constant is evaluated together with what it points at, which would make a cycle here.
static EXTENSION: Complex = Complex {
    value: ValueChoice::Optional,
    rule: Some(extension_holds_one_thing),
    ..complex(
        "Extension",
        &[
            ELEMENT_ID,
            many("extension", Kind::Complex(&EXTENSION)),
            req("url", URI),
        ],
    )
};

static META: Complex = complex(
    "Meta",
    &[
        ELEMENT_ID,
        EXTENSIONS,
        opt("versionId", text(Text::Id)),
        opt("lastUpdated", text(Text::Instant)),
        opt("source", URI),
        many("profile", URI),
        many("security", Kind::Complex(&CODING)),
        many("tag", Kind::Complex(&CODING)),
    ],
);

static NARRATIVE: Complex = complex(
    "Narrative",
    &[
        ELEMENT_ID,
        EXTENSIONS,
        req("status", code(NARRATIVE_STATUSES)),
        req("div", text(Text::Xhtml)),
    ],
);

static CODING: Complex = complex(
    "Coding",
    &[
        ELEMENT_ID,
        EXTENSIONS,
        opt("system", URI),
        opt("version", STRING),
        opt("code", code(&[])),
        opt("display", STRING),
        opt("userSelected", Kind::Primitive(Primitive::Boolean)),
    ],
);

static CODEABLE_CONCEPT: Complex = complex(
    "CodeableConcept",
    &[
        ELEMENT_ID,
        EXTENSIONS,
        many("coding", Kind::Complex(&CODING)),
        opt("text", STRING),
    ],
);

static IDENTIFIER: Complex = complex(
    "Identifier",
    &[
        ELEMENT_ID,
        EXTENSIONS,
        opt("use", code(IDENTIFIER_USES)),
        opt("type", CONCEPT),
        opt("system", URI),
        opt("value", STRING),
        opt("period", PERIOD_KIND),
        opt("assigner", Kind::Reference(&["Organization"])),
    ],
);

static PERIOD: Complex = Complex {
    rule: Some(period_ends_after_start),
    ..complex(
        "Period",
        &[
            ELEMENT_ID,
            EXTENSIONS,
            opt("start", DATE_TIME),
            opt("end", DATE_TIME),
        ],
    )
};

static ANNOTATION: Complex = Complex {
    rule: Some(annotation_has_one_author),
    ..complex(
        "Annotation",
        &[
            ELEMENT_ID,
            EXTENSIONS,
            opt(
                "authorReference",
                Kind::Reference(&["Practitioner", "Patient", "RelatedPerson", "Organization"]),
            ),
            opt("authorString", STRING),
            opt("time", DATE_TIME),
            req("text", STRING),
        ],
    )
};

static REFERENCE: Complex = complex(
    "Reference",
    &[
        ELEMENT_ID,
        EXTENSIONS,
        opt("reference", STRING),
        opt("type", URI),
        opt("identifier", IDENTIFIER_KIND),
        opt("display", STRING),
    ],
);

/// The R4 open type list: every type a `value[x]` of an extension or a Task input/output may
/// take, by the suffix it gives the element name (`valueString`, `valueReference`, …).
static VALUE_TYPES: &[(&str, Kind)] = &[
    ("Base64Binary", text(Text::Base64)),
    ("Boolean", Kind::Primitive(Primitive::Boolean)),
    ("Canonical", URI),
    ("Code", code(&[])),
    ("Date", text(Text::Date)),
    ("DateTime", DATE_TIME),
    ("Decimal", Kind::Primitive(Primitive::Decimal)),
    ("Id", text(Text::Id)),
    ("Instant", text(Text::Instant)),
    (
        "Integer",
        Kind::Primitive(Primitive::Integer {
            min: i32::MIN as i64,
            what: "an integer",
        }),
    ),
    ("Markdown", STRING),
    ("Oid", URI),
    (
        "PositiveInt",
        Kind::Primitive(Primitive::Integer {
            min: 1,
            what: "a positive integer",
        }),
    ),
    ("String", STRING),
    ("Time", text(Text::Time)),
    (
        "UnsignedInt",
        Kind::Primitive(Primitive::Integer {
            min: 0,
            what: "a non-negative integer",
        }),
    ),
    ("Uri", URI),
    ("Url", URI),
    ("Uuid", URI),
    ("Annotation", Kind::Complex(&ANNOTATION)),
    ("CodeableConcept", CONCEPT),
    ("Coding", Kind::Complex(&CODING)),
    ("Identifier", IDENTIFIER_KIND),
    ("Meta", Kind::Complex(&META)),
    ("Period", PERIOD_KIND),
    ("Reference", ANY_REFERENCE),
    ("Address", Kind::Object),
    ("Age", Kind::Object),
    ("Attachment", Kind::Object),
    ("ContactPoint", Kind::Object),
    ("Count", Kind::Object),
    ("Distance", Kind::Object),
    ("Duration", Kind::Object),
    ("HumanName", Kind::Object),
    ("Money", Kind::Object),
    ("Quantity", Kind::Object),
    ("Range", Kind::Object),
    ("Ratio", Kind::Object),
    ("SampledData", Kind::Object),
    ("Signature", Kind::Object),
    ("Timing", Kind::Object),
    ("ContactDetail", Kind::Object),
    ("Contributor", Kind::Object),
    ("DataRequirement", Kind::Object),
    ("Expression", Kind::Object),
    ("ParameterDefinition", Kind::Object),
    ("RelatedArtifact", Kind::Object),
    ("TriggerDefinition", Kind::Object),
    ("UsageContext", Kind::Object),
    ("Dosage", Kind::Object),
];

// ---------------------------------------------------------------------------------------------
// The walker.

/// What the walk needs besides the element being checked.
struct Context<'a> {
    base_url: &'a str,
    /// Contained resources by id, with their resource type, to resolve `#id` references.
    contained: HashMap<&'a str, &'a str>,
}

impl<'a> Context<'a> {
    /// The resource type a normalised reference points at, where it can be told without IO:
    /// local `Type/id` references and contained resources. Absolute URLs to other servers and
    /// `urn:` references say nothing reliable about their type.
    fn referenced_type<'r>(&'r self, reference: &'r str, at: &str) -> Result<Option<&'r str>> {
        if reference == "#" {
            return Ok(Some("Task"));
        }
        if let Some(id) = reference.strip_prefix('#') {
            return match self.contained.get(id) {
                Some(kind) => Ok(Some(kind)),
                None => Err(fail(
                    IssueCode::Invariant,
                    at,
                    format_args!(
                        "is '{reference}', which matches no contained resource's id (ref-1)"
                    ),
                )),
            };
        }
        if reference.contains(':') {
            return Ok(None);
        }
        Ok(reference.split('/').next())
    }
}

/// Builds a 400 whose diagnostic starts with the element it is about.
fn fail(code: IssueCode, path: &str, problem: impl Display) -> Error {
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

/// The FHIR JSON rules that hold everywhere, contained resources included: no empty strings,
/// objects or arrays, and no `null` except where it keeps a primitive array aligned with its
/// `_name` sibling (`"given": ["Jo", null], "_given": [null, {…}]`).
fn check_json_rules(value: &Value, path: &str) -> Result<()> {
    let absent = "FHIR JSON leaves out an element that has no value";
    match value {
        Value::Null => Err(fail(
            IssueCode::Structure,
            path,
            format_args!("is null; {absent}"),
        )),
        Value::String(s) if s.is_empty() => Err(fail(
            IssueCode::Structure,
            path,
            format_args!("is an empty string; {absent}"),
        )),
        Value::Array(items) if items.is_empty() => Err(fail(
            IssueCode::Structure,
            path,
            format_args!("is an empty array; {absent}"),
        )),
        Value::Object(map) if map.is_empty() => Err(fail(
            IssueCode::Structure,
            path,
            format_args!("is an empty object; {absent}"),
        )),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, item)| check_json_rules(item, &format!("{path}[{i}]"))),
        Value::Object(map) => {
            for (key, child) in map {
                let child_path = format!("{path}.{key}");
                let Value::Array(items) = child else {
                    check_json_rules(child, &child_path)?;
                    continue;
                };
                if items.is_empty() {
                    // The generic arm above words the complaint about an empty array.
                    return check_json_rules(child, &child_path);
                }
                let partner_key = match key.strip_prefix('_') {
                    Some(name) => name.to_string(),
                    None => format!("_{key}"),
                };
                let partner = map.get(&partner_key).and_then(Value::as_array);
                if let Some(partner) = partner
                    && partner.len() != items.len()
                {
                    return Err(fail(
                        IssueCode::Structure,
                        &child_path,
                        format_args!(
                            "has {} items but {path}.{partner_key} has {}; a primitive array and \
                             its `_` sibling line up item by item",
                            items.len(),
                            partner.len()
                        ),
                    ));
                }
                for (i, item) in items.iter().enumerate() {
                    let keeps_alignment = item.is_null()
                        && partner
                            .and_then(|p| p.get(i))
                            .is_some_and(|other| !other.is_null());
                    if !keeps_alignment {
                        check_json_rules(item, &format!("{child_path}[{i}]"))?;
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Finds an element of `def` by name, including a `value[x]` choice. The flag says whether
/// the element is that choice.
fn lookup(def: &Complex, name: &str) -> Option<(Card, Kind, bool)> {
    if let Some(field) = def.fields.iter().find(|f| f.name == name) {
        return Some((field.card, field.kind, false));
    }
    if def.value == ValueChoice::Absent {
        return None;
    }
    let suffix = name.strip_prefix("value")?;
    VALUE_TYPES
        .iter()
        .find(|(type_name, _)| *type_name == suffix)
        .map(|(_, kind)| (Card::Optional, *kind, true))
}

fn check_object(map: &Map<String, Value>, path: &str, def: &Complex, cx: &Context) -> Result<()> {
    let mut choices: Vec<&str> = Vec::new();
    for (key, value) in map {
        let key_path = format!("{path}.{key}");
        let sibling_of = key.strip_prefix('_');
        let name = sibling_of.unwrap_or(key);
        let Some((card, kind, is_choice)) = lookup(def, name) else {
            return Err(fail(
                IssueCode::Structure,
                &key_path,
                format_args!("is not an element of {} in FHIR R4", def.name),
            ));
        };
        if is_choice && !choices.contains(&name) {
            choices.push(name);
        }
        match (sibling_of, kind) {
            (None, _) => check_value(value, card, kind, &key_path, cx)?,
            (Some(_), Kind::Primitive(_)) => {
                // A `_name` sibling carries the id and extensions of a primitive, one per item
                // when the primitive repeats.
                let card = if card == Card::Many {
                    Card::Many
                } else {
                    Card::Optional
                };
                check_value(value, card, Kind::Complex(&ELEMENT), &key_path, cx)?;
            }
            (Some(_), _) => {
                return Err(fail(
                    IssueCode::Structure,
                    &key_path,
                    format_args!(
                        "is not allowed: only primitive elements have a `_` sibling, and \
                         {path}.{name} is not a primitive"
                    ),
                ));
            }
        }
    }
    for field in def.fields {
        if field.card == Card::Required && !map.contains_key(field.name) {
            return Err(fail(
                IssueCode::Required,
                &format!("{path}.{}", field.name),
                "is required",
            ));
        }
    }
    if choices.len() > 1 {
        return Err(fail(
            IssueCode::Structure,
            path,
            format_args!(
                "has more than one value[x] ({}); a choice element takes exactly one type",
                choices.join(", ")
            ),
        ));
    }
    if def.value == ValueChoice::Required && choices.is_empty() {
        return Err(fail(
            IssueCode::Required,
            &format!("{path}.value[x]"),
            "is required (valueString, valueReference, …)",
        ));
    }
    match def.rule {
        Some(rule) => rule(map, path),
        None => Ok(()),
    }
}

/// Checks an element's JSON shape against its cardinality, then each item against its type.
fn check_value(value: &Value, card: Card, kind: Kind, path: &str, cx: &Context) -> Result<()> {
    match (card, value) {
        (Card::Many, Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                // The JSON rules have already admitted this null: it keeps a primitive array
                // aligned with its `_name` sibling.
                if !item.is_null() {
                    check_kind(item, kind, &format!("{path}[{i}]"), cx)?;
                }
            }
            Ok(())
        }
        (Card::Many, other) => Err(fail(
            IssueCode::Structure,
            path,
            format_args!(
                "must be a JSON array because the element repeats (0..*), not a JSON {}",
                json_type(other)
            ),
        )),
        (_, Value::Array(_)) => Err(fail(
            IssueCode::Structure,
            path,
            "must be a single value, not an array: the element does not repeat (0..1)",
        )),
        (_, single) => check_kind(single, kind, path, cx),
    }
}

fn check_kind(value: &Value, kind: Kind, path: &str, cx: &Context) -> Result<()> {
    match kind {
        Kind::ResourceType => expect_string(value, path).map(drop),
        Kind::Primitive(primitive) => check_primitive(value, primitive, path),
        Kind::Complex(def) => check_object(expect_object(value, path, def.name)?, path, def, cx),
        Kind::Reference(targets) => {
            let map = expect_object(value, path, "Reference")?;
            check_object(map, path, &REFERENCE, cx)?;
            check_reference(map, path, targets, cx)
        }
        Kind::Resource => check_contained(expect_object(value, path, "resource")?, path),
        Kind::Object => expect_object(value, path, "complex datatype").map(drop),
    }
}

fn expect_object<'v>(value: &'v Value, path: &str, what: &str) -> Result<&'v Map<String, Value>> {
    value.as_object().ok_or_else(|| {
        fail(
            IssueCode::Structure,
            path,
            format_args!(
                "must be a JSON object ({what}), not a JSON {}",
                json_type(value)
            ),
        )
    })
}

fn expect_string<'v>(value: &'v Value, path: &str) -> Result<&'v str> {
    value.as_str().ok_or_else(|| {
        fail(
            IssueCode::Structure,
            path,
            format_args!("must be a JSON string, not a JSON {}", json_type(value)),
        )
    })
}

fn check_primitive(value: &Value, primitive: Primitive, path: &str) -> Result<()> {
    let wrong_type = |expected: &str| {
        fail(
            IssueCode::Structure,
            path,
            format_args!("must be a JSON {expected}, not a JSON {}", json_type(value)),
        )
    };
    match primitive {
        Primitive::Boolean if value.is_boolean() => Ok(()),
        Primitive::Boolean => Err(wrong_type("boolean")),
        Primitive::Decimal if value.is_number() => Ok(()),
        Primitive::Decimal => Err(wrong_type("number")),
        Primitive::Integer { min, what } => {
            if !value.is_number() {
                return Err(wrong_type("number"));
            }
            match value.as_i64() {
                Some(n) if n >= min && n <= i64::from(i32::MAX) => Ok(()),
                _ => Err(fail(
                    IssueCode::Value,
                    path,
                    format_args!("must be {what} that fits in 32 bits, not {value}"),
                )),
            }
        }
        Primitive::Text(kind) => check_text(expect_string(value, path)?, kind, path),
    }
}

/// Checks the lexical form of a primitive written as a JSON string.
fn check_text(value: &str, kind: Text, path: &str) -> Result<()> {
    let problem = match kind {
        Text::String => None,
        Text::Code(_) if !is_code(value) => Some(format!(
            "'{value}' is not a valid code: a code has no leading, trailing or repeated whitespace"
        )),
        Text::Code(codes) if !codes.is_empty() && !codes.contains(&value) => Some(format!(
            "has unknown code '{value}'; allowed codes are: {}",
            codes.join(", ")
        )),
        Text::Code(_) => None,
        Text::Language => (!is_language_tag(value))
            .then(|| format!("'{value}' is not a BCP-47 language tag such as 'en' or 'en-GB'")),
        Text::Id => {
            (!is_valid_id(value)).then(|| format!("'{value}' is not a valid id: {ID_RULE}"))
        }
        Text::Uri => value
            .contains(char::is_whitespace)
            .then(|| format!("'{value}' is not a valid URI: it contains whitespace")),
        Text::Base64 => (!value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b) || b.is_ascii_whitespace()))
        .then(|| "is not valid base64".to_string()),
        Text::Date => parse_range(value, DateKind::Date).err(),
        Text::DateTime => parse_range(value, DateKind::DateTime).err(),
        Text::Instant => parse_range(value, DateKind::Instant).err(),
        // A time has the clock part of a dateTime without a zone, so it is parsed as one on an
        // arbitrary day in UTC; a zone in the value makes the combined text invalid.
        Text::Time => parse_range(&format!("1970-01-01T{value}Z"), DateKind::DateTime)
            .err()
            .map(|_| format!("'{value}' is not a valid FHIR time (hh:mm:ss[.sss], no zone)")),
        Text::Xhtml => xhtml_problem(value),
    };
    match problem {
        Some(problem) => Err(fail(IssueCode::Value, path, problem)),
        None => Ok(()),
    }
}

/// FHIR's code rule: non-whitespace runs separated by single whitespace characters.
fn is_code(value: &str) -> bool {
    value
        .split(char::is_whitespace)
        .all(|part| !part.is_empty())
}

/// A loose BCP-47 check: subtags of 1 to 8 ASCII letters or digits joined by hyphens.
fn is_language_tag(value: &str) -> bool {
    value
        .split('-')
        .all(|tag| (1..=8).contains(&tag.len()) && tag.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Narrative must be a single XHTML `div` with only basic formatting (txt-1, txt-2), because
/// clients render it as HTML; `fhir::narrative` holds the rules.
fn xhtml_problem(div: &str) -> Option<String> {
    crate::fhir::narrative::problem(div)
}

/// Checks a Reference's text and, where its target's type can be told, that the type is one
/// the element allows and agrees with `Reference.type`.
fn check_reference(
    map: &Map<String, Value>,
    path: &str,
    targets: &[&str],
    cx: &Context,
) -> Result<()> {
    let declared = map
        .get("type")
        .and_then(Value::as_str)
        .map(|t| t.strip_prefix(CORE_PROFILE_BASE).unwrap_or(t));
    let reference_path = format!("{path}.reference");
    let normalized = match map.get("reference").and_then(Value::as_str) {
        Some(text) => Some(normalize_reference(text, cx.base_url).ok_or_else(|| {
            fail(
                IssueCode::Value,
                &reference_path,
                format_args!(
                    "'{text}' is not a valid reference: use Type/id, an absolute URL, \
                     urn:uuid:, urn:oid: or #contained-id"
                ),
            )
        })?),
        None => None,
    };
    let named = match &normalized {
        Some(reference) => cx.referenced_type(reference, &reference_path)?,
        None => None,
    };
    if let (Some(declared), Some(named)) = (declared, named)
        && declared != named
    {
        return Err(fail(
            IssueCode::Value,
            &format!("{path}.type"),
            format_args!("is '{declared}', but the reference points at a {named}"),
        ));
    }
    let (actual, actual_path) = match (named, declared) {
        (Some(named), _) => (named, reference_path),
        (None, Some(declared)) => (declared, format!("{path}.type")),
        (None, None) => return Ok(()),
    };
    if targets.is_empty() || targets.contains(&actual) {
        return Ok(());
    }
    Err(fail(
        IssueCode::Value,
        &actual_path,
        format_args!(
            "points at a {actual}, but {path} may only reference {}",
            targets.join(", ")
        ),
    ))
}

/// A contained resource is checked for what the container can vouch for; its own elements
/// are only held to the generic JSON rules.
fn check_contained(resource: &Map<String, Value>, path: &str) -> Result<()> {
    let type_path = format!("{path}.resourceType");
    let Some(kind) = resource.get("resourceType") else {
        return Err(fail(
            IssueCode::Required,
            &type_path,
            "is required: a contained resource names its type",
        ));
    };
    let kind = expect_string(kind, &type_path)?;
    let is_type_name = kind.starts_with(|c: char| c.is_ascii_uppercase())
        && kind.chars().all(|c| c.is_ascii_alphanumeric());
    if !is_type_name {
        return Err(fail(
            IssueCode::Value,
            &type_path,
            format_args!("'{kind}' is not a resource type name"),
        ));
    }
    if let Some(id) = resource.get("id") {
        check_text(
            expect_string(id, &format!("{path}.id"))?,
            Text::Id,
            &format!("{path}.id"),
        )?;
    }
    if resource.contains_key("contained") {
        return Err(fail(
            IssueCode::Invariant,
            &format!("{path}.contained"),
            "is not allowed: a contained resource cannot contain resources itself (dom-2)",
        ));
    }
    if let Some(meta) = resource.get("meta")
        && (meta.get("versionId").is_some() || meta.get("lastUpdated").is_some())
    {
        return Err(fail(
            IssueCode::Invariant,
            &format!("{path}.meta"),
            "must not carry versionId or lastUpdated: a contained resource has no version of \
             its own (dom-4)",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Invariants.

/// dom-3: a contained resource exists only to be referenced from its container, so one that
/// nothing points at (and that does not point back at the container with `#`) is an error.
fn contained_are_referenced(task: &Map<String, Value>, path: &str) -> Result<()> {
    let Some(Value::Array(contained)) = task.get("contained") else {
        return Ok(());
    };
    let mut local = HashSet::new();
    task.values()
        .for_each(|value| collect_local_references(value, &mut local));
    for (i, resource) in contained.iter().enumerate() {
        let referenced = resource
            .get("id")
            .and_then(Value::as_str)
            .is_some_and(|id| local.contains(format!("#{id}").as_str()));
        let mut inside = HashSet::new();
        collect_local_references(resource, &mut inside);
        if !referenced && !inside.contains("#") {
            return Err(fail(
                IssueCode::Invariant,
                &format!("{path}.contained[{i}]"),
                "is not referenced from anywhere in the Task; a contained resource must be \
                 referenced as '#id' or refer to its container as '#' (dom-3)",
            ));
        }
    }
    Ok(())
}

fn collect_local_references<'v>(value: &'v Value, into: &mut HashSet<&'v str>) {
    match value {
        Value::String(s) if s.starts_with('#') => {
            into.insert(s);
        }
        Value::Array(items) => items.iter().for_each(|v| collect_local_references(v, into)),
        Value::Object(map) => map.values().for_each(|v| collect_local_references(v, into)),
        _ => {}
    }
}

/// per-1: a period cannot end before it starts. Partial dates are compared as ranges, and only
/// an end that lies wholly before the start is refused, as FHIRPath leaves the rest undecided.
fn period_ends_after_start(period: &Map<String, Value>, path: &str) -> Result<()> {
    let bound = |name: &str| {
        let value = period.get(name)?.as_str()?;
        parse_range(value, DateKind::DateTime).ok()
    };
    if let (Some(start), Some(end)) = (bound("start"), bound("end"))
        && end.end <= start.start
    {
        return Err(fail(
            IssueCode::Invariant,
            &format!("{path}.end"),
            "is before the start; a period cannot end before it begins (per-1)",
        ));
    }
    Ok(())
}

/// ext-1: an extension holds either a value or nested extensions, never both and never
/// neither. Baton's multi-focus extension must hold a reference, since focus search reads it.
fn extension_holds_one_thing(extension: &Map<String, Value>, path: &str) -> Result<()> {
    let has_value = extension
        .keys()
        .any(|k| k.trim_start_matches('_').starts_with("value"));
    let has_nested = extension.contains_key("extension");
    if has_value && has_nested {
        return Err(fail(
            IssueCode::Invariant,
            path,
            "has both a value[x] and nested extensions; an extension holds one or the other \
             (ext-1)",
        ));
    }
    if !has_value && !has_nested {
        return Err(fail(
            IssueCode::Invariant,
            path,
            "has neither a value[x] nor nested extensions (ext-1)",
        ));
    }
    let is_multi_focus =
        extension.get("url").and_then(Value::as_str) == Some(MULTI_FOCUS_EXTENSION);
    if is_multi_focus && !extension.contains_key("valueReference") {
        return Err(fail(
            IssueCode::Value,
            path,
            format_args!(
                "is the multi-focus extension ({MULTI_FOCUS_EXTENSION}), which must hold a \
                 valueReference to one focus resource"
            ),
        ));
    }
    Ok(())
}

/// `Annotation.author[x]` is a choice: a reference or a plain name, not both.
fn annotation_has_one_author(note: &Map<String, Value>, path: &str) -> Result<()> {
    if note.contains_key("authorReference") && note.contains_key("authorString") {
        return Err(fail(
            IssueCode::Structure,
            path,
            "has both authorReference and authorString; author[x] takes exactly one type",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use serde_json::json;

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
