//! Patches with bounded cost: JSON Patch (RFC 6902) with a capped number of operations,
//! applied one at a time, with the document's size and depth bounded after each; and the
//! forms turned into such operations as they are applied — JSON Merge Patch (RFC 7386,
//! `merge`) and FHIRPath Patch (`fhirpath`).
//!
//! A patch is small, but what it makes need not be: each `copy` of a document's largest
//! element into itself doubles it, so eighteen operations turn a one-note Task into hundreds
//! of megabytes, and a `copy` into a deeper place can nest a document past what the JSON
//! parser reads back. So the size and depth of the document are bounded after every
//! operation, cheaply: each operation's growth is bounded by the size of what it inserts
//! (measured with an early exit), and the whole document is measured again only when that
//! running bound passes a limit. Pure: the API applies a patch in the request handler, and the
//! store's decision closure applies it again, with the same bounds, when the Task changed in
//! between.

use axum::http::StatusCode;
use json_patch::{Patch, PatchOperation};
use serde_json::Value;

use crate::error::{Error, IssueCode, Result};
use crate::fhir::shape::{Exceeded, Shape, ShapeLimits, measure, too_deep, too_large};

pub mod fhirpath;
mod merge;

/// Reads a JSON Patch document, refusing one with more than `max_operations` operations
/// (413, `limits.max_patch_operations`) before converting any of them.
pub fn parse_patch(body: Value, max_operations: usize) -> Result<Patch> {
    let Some(operations) = body.as_array() else {
        return Err(Error::bad_request(
            IssueCode::Structure,
            "the body is not a valid JSON Patch (RFC 6902) document: it must be an array of \
             operations",
        ));
    };
    if operations.len() > max_operations {
        return Err(Error::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueCode::TooLong,
            format!(
                "the patch has {} operations; the most one patch may have is \
                 limits.max_patch_operations ({max_operations})",
                operations.len()
            ),
        ));
    }
    serde_json::from_value(body).map_err(|e| {
        Error::bad_request(
            IssueCode::Structure,
            format!("the body is not a valid JSON Patch (RFC 6902) document: {e}"),
        )
    })
}

/// A patch in one of the forms Baton accepts. Each is applied as JSON Patch operations, one
/// at a time, under the same bounds; merge and FHIRPath patches are turned into operations
/// against the document as it stands when they are applied, since what they mean depends on
/// what is there.
#[derive(Debug, Clone)]
pub enum TaskPatch {
    /// `application/json-patch+json` (RFC 6902).
    Json(Patch),
    /// `application/merge-patch+json` (RFC 7386), or `application/json` with an object body;
    /// it makes at most `max_operations` operations.
    Merge { patch: Value, max_operations: usize },
    /// FHIRPath Patch: a `Parameters` resource of `operation`s.
    FhirPath(Vec<fhirpath::Operation>),
}

/// Applies any form of patch to a copy of `target` (see `apply_patch` for the bounds and
/// the statuses of refusals).
pub fn apply_task_patch(
    target: &Value,
    patch: &TaskPatch,
    limits: ShapeLimits,
    what: &str,
) -> Result<Value> {
    match patch {
        TaskPatch::Json(patch) => apply_patch(target, patch, limits, what),
        TaskPatch::Merge {
            patch,
            max_operations,
        } => {
            let operations = merge::operations(target, patch, *max_operations)?;
            let mut applier = Applier::new(target, limits, what)?;
            for operation in &operations {
                applier.apply(operation, || {
                    format!(
                        "the merge patch's {} at '{}'",
                        op_name(operation),
                        operation.path()
                    )
                })?;
            }
            Ok(applier.document)
        }
        TaskPatch::FhirPath(operations) => {
            let mut applier = Applier::new(target, limits, what)?;
            for (i, operation) in operations.iter().enumerate() {
                let label = || operation.label(i);
                for step in operation.steps(&applier.document, what, i)? {
                    applier.apply(&step, label)?;
                }
            }
            Ok(applier.document)
        }
    }
}

/// Applies `patch` to a copy of `target`, one operation at a time, and returns the result.
/// The copy is thrown away on failure, so nothing is undone: `json_patch::patch`, which undoes
/// a failed patch in place, panics on some (a `move` of an element into its parent's place
/// followed by an operation that fails).
/// `what` names the target in errors (e.g. `Task/42`). An operation that cannot be applied is
/// a 422; a document that grows past `limits.max_bytes` is a 413 and one nested deeper than
/// `limits.max_depth` a 400, as soon as the operation that does it is applied.
pub fn apply_patch(
    target: &Value,
    patch: &Patch,
    limits: ShapeLimits,
    what: &str,
) -> Result<Value> {
    let mut applier = Applier::new(target, limits, what)?;
    for (i, operation) in patch.iter().enumerate() {
        applier.apply(operation, || {
            format!(
                "operation {i} ({} at '{}')",
                op_name(operation),
                operation.path()
            )
        })?;
    }
    Ok(applier.document)
}

/// A document being patched, with a running upper bound on its size and depth.
struct Applier<'w> {
    document: Value,
    bound: Shape,
    limits: ShapeLimits,
    what: &'w str,
}

impl<'w> Applier<'w> {
    fn new(target: &Value, limits: ShapeLimits, what: &'w str) -> Result<Self> {
        let document = target.clone();
        let bound = exact(&document, limits, what)?;
        Ok(Applier {
            document,
            bound,
            limits,
            what,
        })
    }

    /// Applies one operation; `label` names it in a refusal (e.g. "operation 2 (add at '/note')").
    fn apply(&mut self, operation: &PatchOperation, label: impl Fn() -> String) -> Result<()> {
        let (limits, what) = (self.limits, self.what);
        let growth = growth(&self.document, operation, limits, what)?;
        json_patch::patch_unsafe(&mut self.document, std::slice::from_ref(operation)).map_err(
            |e| {
                Error::client(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    IssueCode::Processing,
                    format!("{} cannot be applied to {what}: {}", label(), e.kind),
                )
            },
        )?;
        self.bound = Shape {
            bytes: self.bound.bytes.saturating_add(growth.bytes),
            depth: self.bound.depth.max(growth.depth),
        };
        if self.bound.bytes > limits.max_bytes || self.bound.depth > limits.max_depth {
            // The bound is loose (removals never lower it): measure what is really there.
            self.bound = exact(&self.document, limits, what)?;
        }
        Ok(())
    }
}

/// One JSON Patch operation from its parts (the forms that are turned into JSON Patch use it).
fn operation(
    op: &str,
    path: &str,
    value: Option<Value>,
    from: Option<&str>,
) -> Result<PatchOperation> {
    let mut body = serde_json::json!({ "op": op, "path": path });
    if let Some(value) = value {
        body["value"] = value;
    }
    if let Some(from) = from {
        body["from"] = Value::String(from.to_string());
    }
    serde_json::from_value(body)
        .map_err(|e| Error::internal("a generated patch operation did not parse", e.to_string()))
}

/// Appends a key to a JSON Pointer, escaped as RFC 6901 says.
fn pointer_child(pointer: &str, key: &str) -> String {
    format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"))
}

/// The size and depth of the whole document, or the refusal of the limit it passes.
fn exact(document: &Value, limits: ShapeLimits, what: &str) -> Result<Shape> {
    measure(document, limits).map_err(|exceeded| refuse(exceeded, limits, what))
}

fn refuse(exceeded: Exceeded, limits: ShapeLimits, what: &str) -> Error {
    match exceeded {
        Exceeded::Bytes => too_large(what, limits.max_bytes),
        Exceeded::Depth => too_deep(what, limits.max_depth),
    }
}

/// An upper bound on what one operation adds to the document: the bytes of the value it
/// inserts plus its key and separators, and the depth that value reaches where it lands. An
/// operation whose source does not exist adds nothing (applying it fails).
fn growth(
    document: &Value,
    operation: &PatchOperation,
    limits: ShapeLimits,
    what: &str,
) -> Result<Shape> {
    let (inserted, path, moved) = match operation {
        PatchOperation::Add(op) => (Some(&op.value), &op.path, false),
        PatchOperation::Replace(op) => (Some(&op.value), &op.path, false),
        PatchOperation::Copy(op) => (document.pointer(op.from.as_str()), &op.path, false),
        PatchOperation::Move(op) => (document.pointer(op.from.as_str()), &op.path, true),
        PatchOperation::Remove(_) | PatchOperation::Test(_) => {
            return Ok(Shape { bytes: 0, depth: 0 });
        }
    };
    let Some(inserted) = inserted else {
        return Ok(Shape { bytes: 0, depth: 0 });
    };
    let shape = measure(inserted, limits).map_err(|exceeded| refuse(exceeded, limits, what))?;
    // The new member's key (each byte escapes to at most six), its quotes, colon and comma.
    let key = 6 * path.as_str().len() + 4;
    Ok(Shape {
        // A moved value leaves its old place, so only its new key is added.
        bytes: if moved { key } else { shape.bytes + key },
        depth: path.count() + shape.depth,
    })
}

fn op_name(operation: &PatchOperation) -> &'static str {
    match operation {
        PatchOperation::Add(_) => "add",
        PatchOperation::Remove(_) => "remove",
        PatchOperation::Replace(_) => "replace",
        PatchOperation::Move(_) => "move",
        PatchOperation::Copy(_) => "copy",
        PatchOperation::Test(_) => "test",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::shape::MAX_DEPTH;
    use proptest::prelude::*;
    use serde_json::json;

    const LIMITS: ShapeLimits = ShapeLimits {
        max_bytes: 4096,
        max_depth: MAX_DEPTH,
    };

    fn task() -> Value {
        json!({
            "resourceType": "Task",
            "id": "t1",
            "status": "requested",
            "intent": "order",
            "note": [{ "text": "one note of some length, to be copied" }],
        })
    }

    fn parse(operations: Value) -> Patch {
        parse_patch(operations, 100).unwrap()
    }

    fn status(error: &Error) -> u16 {
        error.as_client().unwrap().status.as_u16()
    }

    #[test]
    fn patches_are_parsed_with_a_capped_operation_count() {
        let op = json!({ "op": "remove", "path": "/note" });
        let cases: Vec<(Value, usize, Option<u16>)> = vec![
            (Value::Array(vec![op.clone(); 3]), 3, None),
            (Value::Array(vec![op.clone(); 4]), 3, Some(413)),
            (json!([]), 3, None),
            (json!({ "op": "remove" }), 3, Some(400)),
            (json!([{ "op": "explode", "path": "/x" }]), 3, Some(400)),
            (
                json!([{ "op": "add", "path": "no-slash", "value": 1 }]),
                3,
                Some(400),
            ),
        ];
        for (body, max, expected) in cases {
            let result = parse_patch(body.clone(), max);
            assert_eq!(result.as_ref().err().map(status), expected, "{body}");
        }
    }

    #[test]
    fn patches_apply_or_fail_at_the_operation_that_breaks() {
        struct Case {
            name: &'static str,
            patch: Value,
            /// The result, or the status and a fragment of the diagnostics.
            expected: std::result::Result<Value, (u16, &'static str)>,
        }
        let mut with_two_notes = task();
        with_two_notes["note"] = json!([
            { "text": "one note of some length, to be copied" },
            { "text": "one note of some length, to be copied" },
        ]);
        let mut accepted = task();
        accepted["status"] = json!("accepted");
        let mut deep = json!("leaf");
        for _ in 0..MAX_DEPTH {
            deep = json!([deep]);
        }
        let cases = vec![
            Case {
                name: "replace",
                patch: json!([{ "op": "replace", "path": "/status", "value": "accepted" }]),
                expected: Ok(accepted.clone()),
            },
            Case {
                name: "test then replace",
                patch: json!([
                    { "op": "test", "path": "/status", "value": "requested" },
                    { "op": "replace", "path": "/status", "value": "accepted" },
                ]),
                expected: Ok(accepted),
            },
            Case {
                name: "one copy",
                patch: json!([{ "op": "copy", "from": "/note/0", "path": "/note/-" }]),
                expected: Ok(with_two_notes),
            },
            Case {
                name: "a failed test",
                patch: json!([
                    { "op": "replace", "path": "/status", "value": "accepted" },
                    { "op": "test", "path": "/status", "value": "requested" },
                ]),
                expected: Err((422, "operation 1 (test at '/status')")),
            },
            Case {
                name: "a missing source",
                patch: json!([{ "op": "copy", "from": "/nothing", "path": "/note/-" }]),
                expected: Err((422, "operation 0 (copy at '/note/-')")),
            },
            Case {
                name: "copies doubling the notes",
                patch: Value::Array(vec![
                    json!({ "op": "copy", "from": "/note", "path": "/note/-" });
                    18
                ]),
                expected: Err((413, "max_body_bytes (4096)")),
            },
            Case {
                name: "one large value",
                patch: json!([{ "op": "add", "path": "/text", "value": "x".repeat(5000) }]),
                expected: Err((413, "larger than 4096 bytes")),
            },
            Case {
                name: "a value nested too deep where it lands",
                patch: json!([{ "op": "add", "path": "/extension", "value": deep }]),
                expected: Err((400, "more than 64 levels")),
            },
            Case {
                name: "copies nesting ever deeper",
                patch: json!([
                    { "op": "add", "path": "/x", "value": [[[[[[[[1]]]]]]]] },
                    // Each copy lands eight levels down: 9 + 8 × 7 = 65 levels after the seventh.
                    { "op": "copy", "from": "/x", "path": "/x/0/0/0/0/0/0/0/0" },
                    { "op": "copy", "from": "/x", "path": "/x/0/0/0/0/0/0/0/0" },
                    { "op": "copy", "from": "/x", "path": "/x/0/0/0/0/0/0/0/0" },
                    { "op": "copy", "from": "/x", "path": "/x/0/0/0/0/0/0/0/0" },
                    { "op": "copy", "from": "/x", "path": "/x/0/0/0/0/0/0/0/0" },
                    { "op": "copy", "from": "/x", "path": "/x/0/0/0/0/0/0/0/0" },
                    { "op": "copy", "from": "/x", "path": "/x/0/0/0/0/0/0/0/0" },
                ]),
                expected: Err((400, "more than 64 levels")),
            },
        ];
        for case in cases {
            let result = apply_patch(&task(), &parse(case.patch), LIMITS, "Task/t1");
            match (result, case.expected) {
                (Ok(patched), Ok(expected)) => assert_eq!(patched, expected, "{}", case.name),
                (Err(e), Err((code, fragment))) => {
                    let e = e.as_client().unwrap();
                    assert_eq!(e.status.as_u16(), code, "{}: {}", case.name, e.diagnostics);
                    assert!(
                        e.diagnostics.contains(fragment),
                        "{}: {}",
                        case.name,
                        e.diagnostics
                    );
                }
                (result, expected) => {
                    panic!("{}: got {result:?}, expected {expected:?}", case.name)
                }
            }
        }
    }

    #[test]
    fn a_large_document_may_shrink_and_grow_within_the_limit() {
        // Removing and copying back the same note many times never passes the limit, although
        // the running bound (which removals do not lower) does: the exact measure clears it.
        let mut big = task();
        big["note"] = json!([{ "text": "y".repeat(1500) }]);
        let mut operations = Vec::new();
        for _ in 0..20 {
            operations.push(json!({ "op": "copy", "from": "/note/0", "path": "/note/-" }));
            operations.push(json!({ "op": "remove", "path": "/note/1" }));
        }
        let patched = apply_patch(&big, &parse(Value::Array(operations)), LIMITS, "Task/t1");
        assert_eq!(patched.unwrap(), big);
    }

    #[test]
    fn a_document_already_past_the_limit_takes_no_patch() {
        let mut big = task();
        big["text"] = json!("z".repeat(5000));
        let patch = parse(json!([{ "op": "remove", "path": "/text" }]));
        let error = apply_patch(&big, &patch, LIMITS, "Task/t1").unwrap_err();
        assert_eq!(status(&error), 413);
    }

    fn any_operation() -> impl Strategy<Value = Value> {
        let paths = prop::sample::select(vec![
            "/note",
            "/note/0",
            "/note/-",
            "/note/0/text",
            "/x",
            "/x/0",
            "/x/-",
            "/status",
            "",
        ]);
        let values = prop_oneof![
            Just(json!("a string")),
            Just(json!([1, 2, 3])),
            Just(json!({ "nested": [{ "deeper": ["x"] }] })),
            "[a-z\\\\\"\u{1}]{0,40}".prop_map(Value::String),
        ];
        let ops = prop::sample::select(vec!["add", "remove", "replace", "move", "copy", "test"]);
        (ops, paths.clone(), paths, values).prop_map(|(op, path, from, value)| {
            json!({ "op": op, "path": path, "from": from, "value": value })
        })
    }

    proptest! {
        /// Whatever the operations, a patch either fails or yields a document within the
        /// limits, and one within the limits is exactly what the unbounded patch yields.
        #[test]
        fn bounded_patches_agree_with_json_patch(
            operations in prop::collection::vec(any_operation(), 0..24),
            max_bytes in 150usize..2000,
        ) {
            let patch = parse(Value::Array(operations));
            let limits = ShapeLimits { max_bytes, max_depth: 6 };
            let mut unbounded = task();
            // `json_patch::patch` itself would panic undoing some failed patches (a `move` of a
            // value into its parent's place, then a failing operation), so the reference is
            // the undo-free application; its result only counts when it succeeds.
            let unbounded_ok = json_patch::patch_unsafe(&mut unbounded, &patch).is_ok();
            match apply_patch(&task(), &patch, limits, "Task/t1") {
                Ok(patched) => {
                    prop_assert!(unbounded_ok);
                    prop_assert_eq!(&patched, &unbounded);
                    prop_assert!(measure(&patched, limits).is_ok());
                }
                Err(e) => {
                    let status = e.as_client().unwrap().status.as_u16();
                    prop_assert!(matches!(status, 400 | 413 | 422));
                    if status == 422 {
                        prop_assert!(!unbounded_ok);
                    }
                }
            }
        }
    }
}
