//! The walker: the generic code that applies the FHIR JSON rules and an element table
//! to a value, with the checks of primitive values, references and contained resources. It is
//! kept apart from the tables because it knows no element by name.

use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Value};

use super::tables::{
    Card, Complex, ELEMENT, Kind, Primitive, REFERENCE, TASK, Text, VALUE_TYPES, ValueChoice,
};
use super::{CORE_PROFILE_BASE, fail, json_type};
use crate::error::{IssueCode, Result};
use crate::fhir::datetime::{DateKind, parse_range};
use crate::fhir::{ID_RULE, is_valid_id, normalize_reference};

/// Where an element is (`Task.owner.reference`, `Task.input[0]`), written out only when a
/// check fails: a valid Task, the common case, is walked without building a path for each of
/// its elements.
#[derive(Clone, Copy)]
pub(super) enum Path<'a> {
    Root(&'a str),
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn key<'k>(&'k self, key: &'k str) -> Path<'k> {
        Path::Key(self, key)
    }

    fn index(&self, i: usize) -> Path<'_> {
        Path::Index(self, i)
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root(root) => f.write_str(root),
            Path::Key(parent, key) => write!(f, "{parent}.{key}"),
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// What the walk needs besides the element being checked.
pub(super) struct Context<'a> {
    pub(super) base_url: &'a str,
    /// Contained resources by id, with their resource type, to resolve `#id` references.
    pub(super) contained: HashMap<&'a str, &'a str>,
}

impl<'a> Context<'a> {
    /// The resource type a normalised reference points at, where it can be told without IO:
    /// local `Type/id` references and contained resources. Absolute URLs to other servers and
    /// `urn:` references say nothing reliable about their type.
    fn referenced_type<'r>(&'r self, reference: &'r str, at: &Path) -> Result<Option<&'r str>> {
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

/// The FHIR JSON rules that hold everywhere, contained resources included: no empty strings,
/// objects or arrays, and no `null` except where it keeps a primitive array aligned with its
/// `_name` sibling (`"given": ["Jo", null], "_given": [null, {…}]`).
pub(super) fn check_json_rules(value: &Value, path: &Path) -> Result<()> {
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
            .try_for_each(|(i, item)| check_json_rules(item, &path.index(i))),
        Value::Object(map) => {
            for (key, child) in map {
                let child_path = path.key(key);
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
                        child_path,
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
                        check_json_rules(item, &child_path.index(i))?;
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

/// Whether the Task element reached by `names` (e.g. `["note"]`, `["restriction",
/// "recipient"]`) repeats; `None` when Task has no such element or it lies inside a type the
/// tables do not model. A FHIRPath Patch `add` needs it to know whether to write a value or
/// a list.
pub(super) fn element_repeats(names: &[&str]) -> Option<bool> {
    let (last, parents) = names.split_last()?;
    let mut def: &Complex = &TASK;
    for name in parents {
        match lookup(def, name)? {
            (_, Kind::Complex(next), _) => def = next,
            _ => return None,
        }
    }
    lookup(def, last).map(|(card, _, _)| card == Card::Many)
}

pub(super) fn check_object(
    map: &Map<String, Value>,
    path: &Path,
    def: &Complex,
    cx: &Context,
) -> Result<()> {
    let mut choices: Vec<&str> = Vec::new();
    for (key, value) in map {
        let key_path = path.key(key);
        let sibling_of = key.strip_prefix('_');
        let name = sibling_of.unwrap_or(key);
        let Some((card, kind, is_choice)) = lookup(def, name) else {
            return Err(fail(
                IssueCode::Structure,
                key_path,
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
                    key_path,
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
                path.key(field.name),
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
            path.key("value[x]"),
            "is required (valueString, valueReference, …)",
        ));
    }
    match def.rule {
        Some(rule) => rule(map, path),
        None => Ok(()),
    }
}

/// Checks an element's JSON shape against its cardinality, then each item against its type.
fn check_value(value: &Value, card: Card, kind: Kind, path: &Path, cx: &Context) -> Result<()> {
    match (card, value) {
        (Card::Many, Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                // The JSON rules have already admitted this null: it keeps a primitive array
                // aligned with its `_name` sibling.
                if !item.is_null() {
                    check_kind(item, kind, &path.index(i), cx)?;
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

fn check_kind(value: &Value, kind: Kind, path: &Path, cx: &Context) -> Result<()> {
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

fn expect_object<'v>(value: &'v Value, path: &Path, what: &str) -> Result<&'v Map<String, Value>> {
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

fn expect_string<'v>(value: &'v Value, path: &Path) -> Result<&'v str> {
    value.as_str().ok_or_else(|| {
        fail(
            IssueCode::Structure,
            path,
            format_args!("must be a JSON string, not a JSON {}", json_type(value)),
        )
    })
}

fn check_primitive(value: &Value, primitive: Primitive, path: &Path) -> Result<()> {
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
fn check_text(value: &str, kind: Text, path: &Path) -> Result<()> {
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
    path: &Path,
    targets: &[&str],
    cx: &Context,
) -> Result<()> {
    let declared = map
        .get("type")
        .and_then(Value::as_str)
        .map(|t| t.strip_prefix(CORE_PROFILE_BASE).unwrap_or(t));
    let reference_path = path.key("reference");
    let normalized = match map.get("reference").and_then(Value::as_str) {
        Some(text) => Some(normalize_reference(text, cx.base_url).ok_or_else(|| {
            fail(
                IssueCode::Value,
                reference_path,
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
            path.key("type"),
            format_args!("is '{declared}', but the reference points at a {named}"),
        ));
    }
    let (actual, actual_path) = match (named, declared) {
        (Some(named), _) => (named, reference_path),
        (None, Some(declared)) => (declared, path.key("type")),
        (None, None) => return Ok(()),
    };
    if targets.is_empty() || targets.contains(&actual) {
        return Ok(());
    }
    Err(fail(
        IssueCode::Value,
        actual_path,
        format_args!(
            "points at a {actual}, but {path} may only reference {}",
            targets.join(", ")
        ),
    ))
}

/// A contained resource is checked for what the container can vouch for; its own elements
/// are only held to the generic JSON rules.
fn check_contained(resource: &Map<String, Value>, path: &Path) -> Result<()> {
    let type_path = path.key("resourceType");
    let Some(kind) = resource.get("resourceType") else {
        return Err(fail(
            IssueCode::Required,
            type_path,
            "is required: a contained resource names its type",
        ));
    };
    let kind = expect_string(kind, &type_path)?;
    let is_type_name = kind.starts_with(|c: char| c.is_ascii_uppercase())
        && kind.chars().all(|c| c.is_ascii_alphanumeric());
    if !is_type_name {
        return Err(fail(
            IssueCode::Value,
            type_path,
            format_args!("'{kind}' is not a resource type name"),
        ));
    }
    if let Some(id) = resource.get("id") {
        let id_path = path.key("id");
        check_text(expect_string(id, &id_path)?, Text::Id, &id_path)?;
    }
    if resource.contains_key("contained") {
        return Err(fail(
            IssueCode::Invariant,
            path.key("contained"),
            "is not allowed: a contained resource cannot contain resources itself (dom-2)",
        ));
    }
    if let Some(meta) = resource.get("meta")
        && (meta.get("versionId").is_some() || meta.get("lastUpdated").is_some())
    {
        return Err(fail(
            IssueCode::Invariant,
            path.key("meta"),
            "must not carry versionId or lastUpdated: a contained resource has no version of \
             its own (dom-4)",
        ));
    }
    Ok(())
}
