//! The element tables: each R4 element definition Baton checks (Task and the datatypes it uses)
//! as a table of elements with their cardinality and type, and the invariant rule it names.
//! They are kept apart from the walker because they are data: reading R4 means reading these.

use serde_json::{Map, Value};

use super::invariants::{
    annotation_has_one_author, contained_are_referenced, extension_holds_one_thing,
    period_ends_after_start,
};
use super::walker::Path;
use super::{
    IDENTIFIER_USES, NARRATIVE_STATUSES, OWNER_TARGETS, PRIORITIES, RECIPIENT_TARGETS,
    REQUESTER_TARGETS, TASK_INTENTS, TASK_STATUSES,
};
use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Card {
    Optional,
    Required,
    Many,
}

#[derive(Clone, Copy)]
pub(super) enum Kind {
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
pub(super) enum Primitive {
    Boolean,
    Decimal,
    Integer { min: i64, what: &'static str },
    Text(Text),
}

/// The primitive types written as JSON strings, each with its own lexical rule.
#[derive(Clone, Copy)]
pub(super) enum Text {
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
pub(super) struct Field {
    pub(super) name: &'static str,
    pub(super) card: Card,
    pub(super) kind: Kind,
}

/// Whether a complex type has a `value[x]` choice element.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ValueChoice {
    Absent,
    Optional,
    Required,
}

/// A constraint across the elements of one object, checked after its elements.
pub(super) type Rule = fn(&Map<String, Value>, &Path) -> Result<()>;

pub(super) struct Complex {
    pub(super) name: &'static str,
    pub(super) fields: &'static [Field],
    pub(super) value: ValueChoice,
    pub(super) rule: Option<Rule>,
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

pub(super) static TASK: Complex = Complex {
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
pub(super) static ELEMENT: Complex = complex("Element", &[ELEMENT_ID, EXTENSIONS]);

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

pub(super) static REFERENCE: Complex = complex(
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
pub(super) static VALUE_TYPES: &[(&str, Kind)] = &[
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
