//! FHIRPath Patch (FHIR R4 "FHIRPath Patch"): a `Parameters` resource whose `operation`
//! parameters add, insert, delete, replace or move elements. Each operation is turned into
//! one JSON Patch operation against the document as it stands, so the bounds of `patch`
//! apply to it unchanged.
//!
//! The paths are the subset clients send: element paths from the resource type, each step
//! optionally indexed — `Task.status`, `Task.note`, `Task.note[0].text`, `Task.input[1]`.
//! Functions (`where()`, `first()`, …), other resource types and anything else are refused
//! with a 400 naming the path, rather than evaluated in part.

use axum::http::StatusCode;
use json_patch::PatchOperation;
use serde_json::{Map, Value};

use super::{operation, pointer_child};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::task;

/// What an operation does (`type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Add,
    Insert,
    Delete,
    Replace,
    Move,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Add => "add",
            Kind::Insert => "insert",
            Kind::Delete => "delete",
            Kind::Replace => "replace",
            Kind::Move => "move",
        }
    }
}

/// One step of a path: an element name and, when given, the index into its list.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    name: String,
    index: Option<usize>,
}

/// One parsed `operation` parameter.
#[derive(Debug, Clone)]
pub struct Operation {
    kind: Kind,
    /// The path as the client wrote it, for messages.
    path_text: String,
    /// The steps below the resource type.
    path: Vec<Step>,
    name: Option<String>,
    value: Option<Value>,
    index: Option<usize>,
    source: Option<usize>,
    destination: Option<usize>,
}

/// Reads a FHIRPath Patch `Parameters` resource, refusing one with more than
/// `max_operations` operations (413) before reading any, and any malformed operation (400,
/// naming it).
pub fn parse(body: &Value, max_operations: usize) -> Result<Vec<Operation>> {
    let parameters = match body.get("parameter") {
        None => return Ok(Vec::new()),
        Some(Value::Array(parameters)) => parameters,
        Some(_) => return Err(malformed("Parameters.parameter must be an array")),
    };
    if parameters.len() > max_operations {
        return Err(Error::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueCode::TooLong,
            format!(
                "the FHIRPath Patch has {} operations; the most one patch may have is \
                 limits.max_patch_operations ({max_operations})",
                parameters.len()
            ),
        ));
    }
    parameters
        .iter()
        .enumerate()
        .map(|(i, parameter)| parse_operation(parameter, i))
        .collect()
}

fn malformed(diagnostics: impl Into<String>) -> Error {
    Error::bad_request(IssueCode::Structure, diagnostics)
}

fn parse_operation(parameter: &Value, i: usize) -> Result<Operation> {
    let at = |what: String| malformed(format!("FHIRPath Patch operation {i}: {what}"));
    if parameter.get("name").and_then(Value::as_str) != Some("operation") {
        return Err(at("every parameter must be named 'operation'".into()));
    }
    let Some(parts) = parameter.get("part").and_then(Value::as_array) else {
        return Err(at("it has no parts (type, path, …)".into()));
    };
    let mut found: Map<String, Value> = Map::new();
    for part in parts {
        let Some(name) = part.get("name").and_then(Value::as_str) else {
            return Err(at("a part has no name".into()));
        };
        if !matches!(
            name,
            "type" | "path" | "name" | "value" | "index" | "source" | "destination"
        ) {
            return Err(at(format!(
                "the part '{name}' is not one of type, path, name, value, index, source, \
                 destination"
            )));
        }
        if found.contains_key(name) {
            return Err(at(format!("the part '{name}' is given twice")));
        }
        found.insert(name.to_string(), part.clone());
    }
    let text = |name: &str, key: &str| -> Result<Option<String>> {
        match found.get(name) {
            None => Ok(None),
            Some(part) => part
                .get(key)
                .and_then(Value::as_str)
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| at(format!("the part '{name}' needs a {key}"))),
        }
    };
    let position = |name: &str| -> Result<Option<usize>> {
        match found.get(name) {
            None => Ok(None),
            Some(part) => part
                .get("valueInteger")
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    at(format!(
                        "the part '{name}' needs a valueInteger of 0 or more"
                    ))
                }),
        }
    };
    let kind = match text("type", "valueCode")?.as_deref() {
        Some("add") => Kind::Add,
        Some("insert") => Kind::Insert,
        Some("delete") => Kind::Delete,
        Some("replace") => Kind::Replace,
        Some("move") => Kind::Move,
        Some(other) => {
            return Err(at(format!(
                "the type '{other}' is not one of add, insert, delete, replace, move"
            )));
        }
        None => return Err(at("it has no type".into())),
    };
    let Some(path_text) = text("path", "valueString")? else {
        return Err(at("it has no path".into()));
    };
    let path = parse_path(&path_text).map_err(|why| {
        Error::client(
            StatusCode::BAD_REQUEST,
            IssueCode::NotSupported,
            format!(
                "FHIRPath Patch operation {i} ({} at '{path_text}'): {why}; Baton takes element \
                 paths such as Task.status, Task.note, Task.note[0].text or Task.input[1], \
                 without functions such as where()",
                kind.name()
            ),
        )
    })?;
    let name = text("name", "valueString")?;
    if let Some(name) = &name
        && !is_element_name(name)
    {
        return Err(at(format!("the name '{name}' is not an element name")));
    }
    let value = match found.get("value") {
        None => None,
        Some(part) => Some(
            part_value(part)
                .ok_or_else(|| at("the part 'value' has neither a value[x] nor parts".into()))?,
        ),
    };
    let operation = Operation {
        kind,
        path_text,
        path,
        name,
        value,
        index: position("index")?,
        source: position("source")?,
        destination: position("destination")?,
    };
    let needs: &[(&str, bool)] = match kind {
        Kind::Add => &[
            ("name", operation.name.is_some()),
            ("value", operation.value.is_some()),
        ],
        Kind::Insert => &[
            ("value", operation.value.is_some()),
            ("index", operation.index.is_some()),
        ],
        Kind::Delete => &[],
        Kind::Replace => &[("value", operation.value.is_some())],
        Kind::Move => &[
            ("source", operation.source.is_some()),
            ("destination", operation.destination.is_some()),
        ],
    };
    if let Some((missing, _)) = needs.iter().find(|(_, present)| !present) {
        return Err(at(format!("a {} needs the part '{missing}'", kind.name())));
    }
    Ok(operation)
}

fn is_element_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `Task.a[0].b` into its steps below `Task`; the reason when it is not such a path.
fn parse_path(text: &str) -> std::result::Result<Vec<Step>, String> {
    let mut pieces = text.split('.');
    if pieces.next() != Some("Task") {
        return Err("the path must start with 'Task'".into());
    }
    pieces
        .map(|piece| {
            let (name, index) = match piece.split_once('[') {
                None => (piece, None),
                Some((name, rest)) => {
                    let digits = rest
                        .strip_suffix(']')
                        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or_else(|| format!("'{piece}' is not an element with an index"))?;
                    let index = digits
                        .parse::<usize>()
                        .map_err(|_| format!("the index in '{piece}' is too large"))?;
                    (name, Some(index))
                }
            };
            if !is_element_name(name) {
                return Err(format!("'{piece}' is not an element name"));
            }
            Ok(Step {
                name: name.to_string(),
                index,
            })
        })
        .collect()
}

/// A `value` part's value: its one `value[x]`, or an object built from its parts (how a
/// backbone element such as `Task.input` is written). Parts with the same name make a list.
fn part_value(part: &Value) -> Option<Value> {
    let object = part.as_object()?;
    if let Some((_, value)) = object
        .iter()
        .find(|(key, _)| key.starts_with("value") && key.len() > "value".len())
    {
        return Some(value.clone());
    }
    let parts = object.get("part")?.as_array()?;
    let mut built = Map::new();
    for part in parts {
        let name = part.get("name")?.as_str()?.to_string();
        let value = part_value(part)?;
        match built.get_mut(&name) {
            None => {
                built.insert(name, value);
            }
            Some(Value::Array(items)) => items.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
        }
    }
    Some(Value::Object(built))
}

/// One element's pointer, and the list it is an item of with that list's length.
type Located = (String, Option<(String, usize)>);

/// Where a path leads in a document.
enum Found {
    /// Nowhere: some step is absent.
    Nothing,
    /// One element; `list` is the list it is an item of, with its length.
    One {
        pointer: String,
        list: Option<(String, usize)>,
    },
    /// A whole list (the last step names a repeating element without an index).
    List { pointer: String, len: usize },
    /// Several elements (a step before the last names a list of more than one).
    Several,
}

fn resolve(document: &Value, path: &[Step]) -> Found {
    let mut pointer = String::new();
    let mut node = document;
    let mut list = None;
    for (i, step) in path.iter().enumerate() {
        let Some(child) = node.as_object().and_then(|o| o.get(&step.name)) else {
            return Found::Nothing;
        };
        let child_pointer = pointer_child(&pointer, &step.name);
        match (child, step.index) {
            (Value::Array(items), Some(index)) => {
                let Some(item) = items.get(index) else {
                    return Found::Nothing;
                };
                list = Some((child_pointer.clone(), items.len()));
                pointer = format!("{child_pointer}/{index}");
                node = item;
            }
            (_, Some(index)) if index > 0 => return Found::Nothing,
            (Value::Array(items), None) if i + 1 == path.len() => {
                return Found::List {
                    pointer: child_pointer,
                    len: items.len(),
                };
            }
            (Value::Array(items), None) => match items.as_slice() {
                [only] => {
                    list = Some((child_pointer.clone(), 1));
                    pointer = format!("{child_pointer}/0");
                    node = only;
                }
                _ => return Found::Several,
            },
            (_, _) => {
                list = None;
                pointer = child_pointer;
                node = child;
            }
        }
    }
    Found::One { pointer, list }
}

impl Operation {
    /// How refusals name this operation.
    pub(super) fn label(&self, i: usize) -> String {
        format!(
            "FHIRPath Patch operation {i} ({} at '{}')",
            self.kind.name(),
            self.path_text
        )
    }

    /// The JSON Patch operations that do this operation to `document` (none when a delete
    /// finds nothing, as the specification says); a 422 naming it when it cannot be done.
    pub(super) fn steps(
        &self,
        document: &Value,
        what: &str,
        i: usize,
    ) -> Result<Vec<PatchOperation>> {
        let refuse = |why: String| {
            Error::client(
                StatusCode::UNPROCESSABLE_ENTITY,
                IssueCode::Processing,
                format!("{} cannot be applied to {what}: {why}", self.label(i)),
            )
        };
        let value = || self.value.clone();
        let names: Vec<&str> = self.path.iter().map(|s| s.name.as_str()).collect();
        let found = resolve(document, &self.path);
        let single = |found: Found| -> Result<Option<Located>> {
            match found {
                Found::Nothing => Ok(None),
                Found::One { pointer, list } => Ok(Some((pointer, list))),
                Found::List { pointer, len: 1 } => {
                    Ok(Some((format!("{pointer}/0"), Some((pointer, 1)))))
                }
                Found::List { len, .. } => Err(refuse(format!(
                    "the path matches {len} elements; name one with an index"
                ))),
                Found::Several => Err(refuse(
                    "the path matches several elements; name one with an index".into(),
                )),
            }
        };
        let step = match self.kind {
            Kind::Add => {
                let parent = if self.path.is_empty() {
                    String::new()
                } else {
                    match single(found)? {
                        Some((pointer, _)) => pointer,
                        None => return Err(refuse("the path matches nothing".into())),
                    }
                };
                if !document.pointer(&parent).is_some_and(Value::is_object) {
                    return Err(refuse("the path is not an element with children".into()));
                }
                let name = self.name.as_deref().unwrap_or_default();
                let child = pointer_child(&parent, name);
                let mut element = names.clone();
                element.push(name);
                match document.pointer(&child) {
                    Some(Value::Array(_)) => {
                        operation("add", &format!("{child}/-"), value(), None)?
                    }
                    Some(_) => {
                        return Err(refuse(format!(
                            "'{name}' already has a value; replace it instead"
                        )));
                    }
                    None if task::repeats(&element) == Some(true) => {
                        let list = Value::Array(value().into_iter().collect());
                        operation("add", &child, Some(list), None)?
                    }
                    None => operation("add", &child, value(), None)?,
                }
            }
            Kind::Insert => {
                let index = self.index.unwrap_or_default();
                match found {
                    Found::List { pointer, len } if index <= len => {
                        operation("add", &format!("{pointer}/{index}"), value(), None)?
                    }
                    Found::List { len, .. } => {
                        return Err(refuse(format!(
                            "index {index} is past the end of the list of {len}"
                        )));
                    }
                    // An absent list is an empty one: inserting at 0 starts it.
                    Found::Nothing if index == 0 && task::repeats(&names) == Some(true) => {
                        let (last, parents) = self
                            .path
                            .split_last()
                            .ok_or_else(|| refuse("the path is not a list".into()))?;
                        let parent = match parents {
                            [] => String::new(),
                            parents => match single(resolve(document, parents))? {
                                Some((pointer, _)) => pointer,
                                None => return Err(refuse("the path matches nothing".into())),
                            },
                        };
                        let list = Value::Array(value().into_iter().collect());
                        operation("add", &pointer_child(&parent, &last.name), Some(list), None)?
                    }
                    _ => return Err(refuse("the path is not a list".into())),
                }
            }
            Kind::Delete => match single(found)? {
                None => return Ok(Vec::new()),
                // The last item of a list takes the list with it: FHIR JSON has no empty lists.
                Some((_, Some((list, 1)))) => operation("remove", &list, None, None)?,
                Some((pointer, _)) => operation("remove", &pointer, None, None)?,
            },
            Kind::Replace => match single(found)? {
                None => return Err(refuse("the path matches nothing".into())),
                Some((pointer, _)) => operation("replace", &pointer, value(), None)?,
            },
            Kind::Move => {
                let (source, destination) = (
                    self.source.unwrap_or_default(),
                    self.destination.unwrap_or_default(),
                );
                match found {
                    Found::List { pointer, len } if source < len && destination < len => operation(
                        "move",
                        &format!("{pointer}/{destination}"),
                        None,
                        Some(&format!("{pointer}/{source}")),
                    )?,
                    Found::List { len, .. } => {
                        return Err(refuse(format!(
                            "source {source} and destination {destination} must both be \
                             below the list's length, {len}"
                        )));
                    }
                    _ => return Err(refuse("the path is not a list".into())),
                }
            }
        };
        Ok(vec![step])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::patch::{TaskPatch, apply_task_patch};
    use crate::fhir::shape::{MAX_DEPTH, ShapeLimits};
    use serde_json::json;

    const LIMITS: ShapeLimits = ShapeLimits {
        max_bytes: 4096,
        max_depth: MAX_DEPTH,
    };

    fn task() -> Value {
        json!({
            "resourceType": "Task", "id": "t1", "status": "requested", "intent": "order",
            "note": [{ "text": "first" }, { "text": "second" }],
            "input": [{ "type": { "text": "kind" }, "valueString": "a" }],
        })
    }

    fn op(parts: Value) -> Value {
        json!({ "name": "operation", "part": parts })
    }

    fn apply(operations: Vec<Value>) -> Result<Value> {
        let body = json!({ "resourceType": "Parameters", "parameter": operations });
        let parsed = parse(&body, 10)?;
        apply_task_patch(&task(), &TaskPatch::FhirPath(parsed), LIMITS, "Task/t1")
    }

    fn status(result: Result<Value>) -> (u16, String) {
        let error = result.unwrap_err();
        let client = error.as_client().unwrap();
        (client.status.as_u16(), client.diagnostics.clone())
    }

    #[test]
    fn each_operation_does_what_the_specification_says() {
        let cases: Vec<(&str, Vec<Value>, Value)> = vec![
            (
                "replace a primitive",
                vec![op(json!([
                    { "name": "type", "valueCode": "replace" },
                    { "name": "path", "valueString": "Task.status" },
                    { "name": "value", "valueCode": "accepted" },
                ]))],
                json!({ "status": "accepted" }),
            ),
            (
                "add a single element",
                vec![op(json!([
                    { "name": "type", "valueCode": "add" },
                    { "name": "path", "valueString": "Task" },
                    { "name": "name", "valueString": "owner" },
                    { "name": "value", "valueReference": { "reference": "Practitioner/a" } },
                ]))],
                json!({ "owner": { "reference": "Practitioner/a" } }),
            ),
            (
                "add to a list that is absent starts it",
                vec![op(json!([
                    { "name": "type", "valueCode": "add" },
                    { "name": "path", "valueString": "Task" },
                    { "name": "name", "valueString": "partOf" },
                    { "name": "value", "valueReference": { "reference": "Task/p" } },
                ]))],
                json!({ "partOf": [{ "reference": "Task/p" }] }),
            ),
            (
                "add a backbone element from parts",
                vec![op(json!([
                    { "name": "type", "valueCode": "add" },
                    { "name": "path", "valueString": "Task" },
                    { "name": "name", "valueString": "input" },
                    { "name": "value", "part": [
                        { "name": "type", "valueCodeableConcept": { "text": "kind" } },
                        { "name": "valueString", "valueString": "b" },
                    ] },
                ]))],
                json!({ "input": [
                    { "type": { "text": "kind" }, "valueString": "a" },
                    { "type": { "text": "kind" }, "valueString": "b" },
                ] }),
            ),
            (
                "insert at an index",
                vec![op(json!([
                    { "name": "type", "valueCode": "insert" },
                    { "name": "path", "valueString": "Task.note" },
                    { "name": "index", "valueInteger": 1 },
                    { "name": "value", "valueAnnotation": { "text": "middle" } },
                ]))],
                json!({ "note": [{ "text": "first" }, { "text": "middle" }, { "text": "second" }] }),
            ),
            (
                "delete an item, then the last one takes the list with it",
                vec![
                    op(json!([
                        { "name": "type", "valueCode": "delete" },
                        { "name": "path", "valueString": "Task.note[0]" },
                    ])),
                    op(json!([
                        { "name": "type", "valueCode": "delete" },
                        { "name": "path", "valueString": "Task.note[0]" },
                    ])),
                ],
                json!({ "note": null }),
            ),
            (
                "delete of nothing changes nothing",
                vec![op(json!([
                    { "name": "type", "valueCode": "delete" },
                    { "name": "path", "valueString": "Task.owner" },
                ]))],
                json!({}),
            ),
            (
                "replace inside an item",
                vec![op(json!([
                    { "name": "type", "valueCode": "replace" },
                    { "name": "path", "valueString": "Task.note[1].text" },
                    { "name": "value", "valueString": "changed" },
                ]))],
                json!({ "note": [{ "text": "first" }, { "text": "changed" }] }),
            ),
            (
                "move within a list",
                vec![op(json!([
                    { "name": "type", "valueCode": "move" },
                    { "name": "path", "valueString": "Task.note" },
                    { "name": "source", "valueInteger": 1 },
                    { "name": "destination", "valueInteger": 0 },
                ]))],
                json!({ "note": [{ "text": "second" }, { "text": "first" }] }),
            ),
        ];
        for (name, operations, changes) in cases {
            let mut expected = task();
            for (key, value) in changes.as_object().unwrap() {
                if value.is_null() {
                    expected.as_object_mut().unwrap().remove(key);
                } else {
                    expected[key] = value.clone();
                }
            }
            assert_eq!(apply(operations).unwrap(), expected, "{name}");
        }
    }

    #[test]
    fn refusals_name_the_operation_and_the_path() {
        let cases: Vec<(Vec<Value>, u16, &str)> = vec![
            (
                vec![op(json!([
                    { "name": "type", "valueCode": "replace" },
                    { "name": "path", "valueString": "Task.note.where(text='first')" },
                    { "name": "value", "valueString": "x" },
                ]))],
                400,
                "operation 0 (replace at 'Task.note.where(text='first')')",
            ),
            (
                vec![op(json!([
                    { "name": "type", "valueCode": "replace" },
                    { "name": "path", "valueString": "Patient.name" },
                    { "name": "value", "valueString": "x" },
                ]))],
                400,
                "must start with 'Task'",
            ),
            (
                vec![op(json!([
                    { "name": "type", "valueCode": "replace" },
                    { "name": "path", "valueString": "Task.note" },
                    { "name": "value", "valueAnnotation": { "text": "x" } },
                ]))],
                422,
                "matches 2 elements",
            ),
            (
                vec![op(json!([
                    { "name": "type", "valueCode": "replace" },
                    { "name": "path", "valueString": "Task.owner" },
                    { "name": "value", "valueReference": { "reference": "Practitioner/a" } },
                ]))],
                422,
                "operation 0 (replace at 'Task.owner') cannot be applied to Task/t1: the path \
                 matches nothing",
            ),
            (
                vec![op(json!([
                    { "name": "type", "valueCode": "add" },
                    { "name": "path", "valueString": "Task" },
                    { "name": "name", "valueString": "status" },
                    { "name": "value", "valueCode": "ready" },
                ]))],
                422,
                "already has a value",
            ),
            (
                vec![op(json!([
                    { "name": "type", "valueCode": "insert" },
                    { "name": "path", "valueString": "Task.note" },
                    { "name": "index", "valueInteger": 5 },
                    { "name": "value", "valueAnnotation": { "text": "x" } },
                ]))],
                422,
                "past the end",
            ),
            (
                vec![op(json!([
                    { "name": "type", "valueCode": "move" },
                    { "name": "path", "valueString": "Task.note" },
                    { "name": "source", "valueInteger": 0 },
                    { "name": "destination", "valueInteger": 2 },
                ]))],
                422,
                "below the list's length",
            ),
            (
                vec![op(json!([
                    { "name": "type", "valueCode": "explode" },
                    { "name": "path", "valueString": "Task" },
                ]))],
                400,
                "operation 0: the type 'explode'",
            ),
            (
                vec![op(
                    json!([{ "name": "type", "valueCode": "add" }, { "name": "path", "valueString": "Task" }]),
                )],
                400,
                "needs the part 'name'",
            ),
            (vec![json!({ "name": "op" })], 400, "named 'operation'"),
            (
                vec![op(json!([
                    { "name": "type", "valueCode": "delete" },
                    { "name": "type", "valueCode": "delete" },
                ]))],
                400,
                "given twice",
            ),
        ];
        for (operations, expected_status, fragment) in cases {
            let (got, diagnostics) = status(apply(operations));
            assert_eq!(got, expected_status, "{diagnostics}");
            assert!(diagnostics.contains(fragment), "{fragment}: {diagnostics}");
        }
        let eleven = vec![op(json!([{ "name": "type", "valueCode": "delete" }])); 11];
        assert_eq!(status(apply(eleven)).0, 413);
    }

    #[test]
    fn a_growing_patch_stops_at_the_size_limit() {
        let copy = op(json!([
            { "name": "type", "valueCode": "add" },
            { "name": "path", "valueString": "Task" },
            { "name": "name", "valueString": "note" },
            { "name": "value", "valueAnnotation": { "text": "x".repeat(1000) } },
        ]));
        assert_eq!(status(apply(vec![copy; 5])).0, 413);
    }
}
