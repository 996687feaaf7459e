//! A SubscriptionTopic wrapped in a `Basic` resource, as the Subscriptions R5 Backport IG
//! (1.2.0, `BackportTopics.fsh`, "Backported SubscriptionTopic: R4 Encounter Complete")
//! represents topics for FHIR R4, which has no SubscriptionTopic resource. Pure.
//!
//! The shape:
//! - `Basic.code` is `http://hl7.org/fhir/fhir-types|SubscriptionTopic`, which is how an R4
//!   client finds the topics among Basic resources (`GET [base]/Basic?code=…`);
//! - `Basic.id` is the topic's id; `meta`, `implicitRules`, `language`, `text` and
//!   `contained` are carried over as they are; the topic's own `extension`s come first;
//! - every other element of the R5 SubscriptionTopic becomes the cross-version extension
//!   `http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.<element>`:
//!   a primitive as its `value[x]` of the R5 type (`valueUri`, `valueMarkdown`, …), a
//!   repeating element as one extension per item, a backbone element (`resourceTrigger`,
//!   `canFilterBy`, `notificationShape`, `eventTrigger`, and `queryCriteria` inside a
//!   trigger) as an extension whose nested extensions are its elements, named by their
//!   element name (`resource`, `filterParameter`, …);
//! - `status`, which changes what the topic means, is the modifier extension
//!   `…extension-SubscriptionTopic.status`.
//!
//! The definitions served are those `matcher::topic` parsed, which accepts only the elements
//! listed here; an element the table does not know (none today) would be left out rather
//! than served with a guessed type.

use serde_json::{Map, Value, json};

/// The code system of `Basic.code` for a wrapped topic.
pub const FHIR_TYPES_SYSTEM: &str = "http://hl7.org/fhir/fhir-types";
/// The code of `Basic.code` for a wrapped topic.
pub const TOPIC_CODE: &str = "SubscriptionTopic";
/// The prefix of every cross-version extension that carries an element of the topic.
pub const EXTENSION_PREFIX: &str =
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";

/// How an element of the R5 SubscriptionTopic travels in an extension.
enum Kind {
    /// A primitive or a datatype: `value` followed by this type's name (`valueUri`).
    Value(&'static str),
    /// A backbone element: nested extensions, one per element, named by the element.
    Backbone(&'static [(&'static str, Kind)]),
}

use Kind::{Backbone, Value as V};

const QUERY_CRITERIA: &[(&str, Kind)] = &[
    ("previous", V("String")),
    ("resultForCreate", V("Code")),
    ("current", V("String")),
    ("resultForDelete", V("Code")),
    ("requireBoth", V("Boolean")),
];

const RESOURCE_TRIGGER: &[(&str, Kind)] = &[
    ("description", V("Markdown")),
    ("resource", V("Uri")),
    ("supportedInteraction", V("Code")),
    ("queryCriteria", Backbone(QUERY_CRITERIA)),
    ("fhirPathCriteria", V("String")),
];

const EVENT_TRIGGER: &[(&str, Kind)] = &[
    ("description", V("Markdown")),
    ("event", V("CodeableConcept")),
    ("resource", V("Uri")),
];

const CAN_FILTER_BY: &[(&str, Kind)] = &[
    ("description", V("Markdown")),
    ("resource", V("Uri")),
    ("filterParameter", V("String")),
    ("filterDefinition", V("Uri")),
    ("comparator", V("Code")),
    ("modifier", V("Code")),
];

const NOTIFICATION_SHAPE: &[(&str, Kind)] = &[
    ("resource", V("Uri")),
    ("include", V("String")),
    ("revInclude", V("String")),
];

/// The elements of the R5 SubscriptionTopic that become extensions, in R5's order
/// (`status` aside: it is a modifier extension).
const TOPIC_ELEMENTS: &[(&str, Kind)] = &[
    ("url", V("Uri")),
    ("identifier", V("Identifier")),
    ("version", V("String")),
    ("versionAlgorithmString", V("String")),
    ("versionAlgorithmCoding", V("Coding")),
    ("name", V("String")),
    ("title", V("String")),
    ("derivedFrom", V("Canonical")),
    ("experimental", V("Boolean")),
    ("date", V("DateTime")),
    ("publisher", V("String")),
    ("contact", V("ContactDetail")),
    ("description", V("Markdown")),
    ("useContext", V("UsageContext")),
    ("jurisdiction", V("CodeableConcept")),
    ("purpose", V("Markdown")),
    ("copyright", V("Markdown")),
    ("copyrightLabel", V("String")),
    ("approvalDate", V("Date")),
    ("lastReviewDate", V("Date")),
    ("effectivePeriod", V("Period")),
    ("resourceTrigger", Backbone(RESOURCE_TRIGGER)),
    ("eventTrigger", Backbone(EVENT_TRIGGER)),
    ("canFilterBy", Backbone(CAN_FILTER_BY)),
    ("notificationShape", Backbone(NOTIFICATION_SHAPE)),
];

/// Elements of the resource itself (not of the topic) that Basic has too.
const CARRIED: &[&str] = &["meta", "implicitRules", "language", "text", "contained"];

/// The `Basic.code` of a wrapped topic.
pub fn topic_code() -> Value {
    json!({ "coding": [{ "system": FHIR_TYPES_SYSTEM, "code": TOPIC_CODE }] })
}

/// The Basic resource that carries a SubscriptionTopic (R5 or R4B JSON) to an R4 client.
pub fn wrap(topic: &Value) -> Value {
    let empty = Map::new();
    let topic = topic.as_object().unwrap_or(&empty);
    let mut basic = Map::new();
    basic.insert("resourceType".into(), json!("Basic"));
    if let Some(id) = topic.get("id") {
        basic.insert("id".into(), id.clone());
    }
    for key in CARRIED {
        if let Some(value) = topic.get(*key) {
            basic.insert((*key).into(), value.clone());
        }
    }
    let mut extensions: Vec<Value> = topic
        .get("extension")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (name, kind) in TOPIC_ELEMENTS {
        if let Some(value) = topic.get(*name) {
            // `versionAlgorithm[x]` is one element whatever its type.
            let element = name
                .strip_suffix("String")
                .or_else(|| name.strip_suffix("Coding"))
                .filter(|_| name.starts_with("versionAlgorithm"))
                .unwrap_or(name);
            let url = format!("{EXTENSION_PREFIX}{element}");
            extensions.extend(items(value).map(|item| extension(&url, kind, item)));
        }
    }
    if !extensions.is_empty() {
        basic.insert("extension".into(), Value::Array(extensions));
    }
    if let Some(status) = topic.get("status") {
        basic.insert(
            "modifierExtension".into(),
            json!([{ "url": format!("{EXTENSION_PREFIX}status"), "valueCode": status }]),
        );
    }
    basic.insert("code".into(), topic_code());
    Value::Object(basic)
}

/// The items of an element: each item of an array, or the value itself.
fn items(value: &Value) -> impl Iterator<Item = &Value> {
    match value {
        Value::Array(items) => items.iter().collect::<Vec<_>>().into_iter(),
        other => vec![other].into_iter(),
    }
}

/// One extension carrying one item of an element.
fn extension(url: &str, kind: &Kind, item: &Value) -> Value {
    let mut extension = Map::new();
    match kind {
        V(type_name) => {
            extension.insert("url".into(), json!(url));
            extension.insert(format!("value{type_name}"), item.clone());
        }
        Backbone(elements) => {
            let empty = Map::new();
            let fields = item.as_object().unwrap_or(&empty);
            if let Some(id) = fields.get("id") {
                extension.insert("id".into(), id.clone());
            }
            // The element's own extensions keep their absolute urls, beside its elements.
            let mut nested: Vec<Value> = fields
                .get("extension")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (name, kind) in *elements {
                if let Some(value) = fields.get(*name) {
                    nested.extend(items(value).map(|item| self::extension(name, kind, item)));
                }
            }
            extension.insert("extension".into(), Value::Array(nested));
            extension.insert("url".into(), json!(url));
        }
    }
    Value::Object(extension)
}

/// Whether a token search value (`code`, `system|code`, `system|`, `|code`) matches the
/// `Basic.code` of a wrapped topic.
pub fn code_matches(token: &str) -> bool {
    match token.split_once('|') {
        None => token == TOPIC_CODE,
        Some(("", _)) => false, // `|code` asks for a coding without a system.
        Some((system, "")) => system == FHIR_TYPES_SYSTEM,
        Some((system, code)) => system == FHIR_TYPES_SYSTEM && code == TOPIC_CODE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_is_wrapped_as_the_backport_ig_shows() {
        let topic = json!({
            "resourceType": "SubscriptionTopic",
            "id": "done",
            "url": "http://baton.test/fhir/SubscriptionTopic/done",
            "name": "Done",
            "title": "Done",
            "status": "active",
            "description": "A Task is completed.",
            "resourceTrigger": [{
                "description": "completed",
                "resource": "Task",
                "supportedInteraction": ["create", "update"],
                "queryCriteria": { "current": "status=completed", "requireBoth": false },
            }],
            "canFilterBy": [
                { "filterParameter": "owner", "modifier": ["not"] },
                { "filterParameter": "authored-on", "comparator": ["ge", "lt"] },
            ],
            "notificationShape": [{ "resource": "Task", "include": ["Task:owner"] }],
        });
        let x = |name: &str| format!("{EXTENSION_PREFIX}{name}");
        assert_eq!(
            wrap(&topic),
            json!({
                "resourceType": "Basic",
                "id": "done",
                "extension": [
                    { "url": x("url"), "valueUri": "http://baton.test/fhir/SubscriptionTopic/done" },
                    { "url": x("name"), "valueString": "Done" },
                    { "url": x("title"), "valueString": "Done" },
                    { "url": x("description"), "valueMarkdown": "A Task is completed." },
                    { "url": x("resourceTrigger"), "extension": [
                        { "url": "description", "valueMarkdown": "completed" },
                        { "url": "resource", "valueUri": "Task" },
                        { "url": "supportedInteraction", "valueCode": "create" },
                        { "url": "supportedInteraction", "valueCode": "update" },
                        { "url": "queryCriteria", "extension": [
                            { "url": "current", "valueString": "status=completed" },
                            { "url": "requireBoth", "valueBoolean": false },
                        ] },
                    ] },
                    { "url": x("canFilterBy"), "extension": [
                        { "url": "filterParameter", "valueString": "owner" },
                        { "url": "modifier", "valueCode": "not" },
                    ] },
                    { "url": x("canFilterBy"), "extension": [
                        { "url": "filterParameter", "valueString": "authored-on" },
                        { "url": "comparator", "valueCode": "ge" },
                        { "url": "comparator", "valueCode": "lt" },
                    ] },
                    { "url": x("notificationShape"), "extension": [
                        { "url": "resource", "valueUri": "Task" },
                        { "url": "include", "valueString": "Task:owner" },
                    ] },
                ],
                "modifierExtension": [{ "url": x("status"), "valueCode": "active" }],
                "code": { "coding": [{
                    "system": "http://hl7.org/fhir/fhir-types",
                    "code": "SubscriptionTopic",
                }] },
            })
        );
    }

    #[test]
    fn code_tokens_match_the_fhir_types_coding() {
        for (token, matches) in [
            ("SubscriptionTopic", true),
            ("http://hl7.org/fhir/fhir-types|SubscriptionTopic", true),
            ("http://hl7.org/fhir/fhir-types|", true),
            ("|SubscriptionTopic", false),
            ("http://example.org|SubscriptionTopic", false),
            ("Subscription", false),
            ("http://hl7.org/fhir/fhir-types|Task", false),
        ] {
            assert_eq!(code_matches(token), matches, "{token}");
        }
    }
}
