//! The JSON helpers every part of the Subscription parser reads elements with: FHIR's rules for
//! strings, arrays and extensions, and the refusal that names the element. They are kept apart
//! because the top level, the filters and the channel all share them.

use std::fmt;

use serde_json::{Map, Value};

use crate::error::{Error, IssueCode, Result};

pub(super) fn fail(code: IssueCode, path: &str, problem: impl fmt::Display) -> Error {
    Error::bad_request(code, format!("{path} {problem}")).at(path)
}

pub(super) fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// An optional string element; FHIR JSON allows neither empty strings nor other JSON types.
pub(super) fn string<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<Option<&'a str>> {
    match object.get(key) {
        None => Ok(None),
        Some(Value::String(text)) if !text.trim().is_empty() => Ok(Some(text)),
        Some(Value::String(_)) => Err(fail(
            IssueCode::Invalid,
            path,
            "must not be empty; leave the element out instead",
        )),
        Some(other) => Err(fail(
            IssueCode::Structure,
            path,
            format_args!("must be a JSON string, not a JSON {}", json_type(other)),
        )),
    }
}

/// An optional repeating element; absent reads as empty.
pub(super) fn array<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a [Value]> {
    match object.get(key) {
        None => Ok(&[]),
        Some(Value::Array(items)) if !items.is_empty() => Ok(items),
        Some(Value::Array(_)) => Err(fail(
            IssueCode::Invalid,
            path,
            "must not be an empty array; leave the element out instead",
        )),
        Some(other) => Err(fail(
            IssueCode::Structure,
            path,
            format_args!("must be a JSON array, not a JSON {}", json_type(other)),
        )),
    }
}

/// The `_name` object that carries a primitive element's id and extensions, if present.
pub(super) fn primitive_extension_element<'a>(
    object: &'a Map<String, Value>,
    key: &str,
    parent: &str,
) -> Result<Option<&'a Map<String, Value>>> {
    let path = format!("{parent}.{key}");
    let element = match object.get(key) {
        None => return Ok(None),
        Some(Value::Object(element)) => element,
        Some(other) => {
            return Err(fail(
                IssueCode::Structure,
                &path,
                format_args!("must be a JSON object, not a JSON {}", json_type(other)),
            ));
        }
    };
    if let Some(name) = element
        .keys()
        .find(|k| !matches!(k.as_str(), "id" | "extension"))
    {
        return Err(fail(
            IssueCode::Structure,
            &format!("{path}.{name}"),
            format_args!("is not allowed: {path} may hold only id and extension"),
        ));
    }
    Ok(Some(element))
}

/// Reads an extension that carries one `value[x]` (or none): its URL and its value with the
/// `value…` key. Nested extensions are refused, since no extension the hub reads has them.
pub(super) fn simple_extension<'a>(
    extension: &'a Value,
    at: &str,
) -> Result<(&'a str, Option<(&'a str, &'a Value)>)> {
    let Value::Object(fields) = extension else {
        return Err(fail(
            IssueCode::Structure,
            at,
            format_args!("must be a JSON object, not a JSON {}", json_type(extension)),
        ));
    };
    let url = match fields.get("url") {
        Some(Value::String(url)) if !url.is_empty() => url.as_str(),
        _ => {
            return Err(fail(
                IssueCode::Required,
                at,
                "must have a url naming the extension",
            ));
        }
    };
    let mut value = None;
    for (key, field) in fields {
        match key.as_str() {
            "url" | "id" => {}
            name if name.starts_with("value") => {
                if value.replace((name, field)).is_some() {
                    return Err(fail(
                        IssueCode::Invalid,
                        at,
                        format_args!("('{url}') has more than one value[x]"),
                    ));
                }
            }
            other => {
                return Err(fail(
                    IssueCode::NotSupported,
                    at,
                    format_args!(
                        "('{url}') has '{other}', which this hub does not read on an extension"
                    ),
                ));
            }
        }
    }
    Ok((url, value))
}
