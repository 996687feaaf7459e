//! JSON Merge Patch (RFC 7386) turned into JSON Patch operations against the document it
//! patches, so that it is applied under the same bounds as any patch. A member set to `null`
//! is removed (when it is there), an object merges into an object, and anything else replaces
//! what is there; arrays are replaced whole, as the RFC says.

use axum::http::StatusCode;
use json_patch::PatchOperation;
use serde_json::{Map, Value};

use super::{operation, pointer_child};
use crate::error::{Error, IssueCode, Result};

/// The operations that merge `patch` into `target`: at most `max_operations` of them (413
/// past it, `limits.max_patch_operations`), one per member that changes something.
pub(super) fn operations(
    target: &Value,
    patch: &Value,
    max_operations: usize,
) -> Result<Vec<PatchOperation>> {
    let Value::Object(members) = patch else {
        return Err(Error::bad_request(
            IssueCode::Structure,
            "a merge patch must be a JSON object holding the elements to change (null removes \
             one)",
        ));
    };
    let mut out = Vec::new();
    merge_into(target, members, "", &mut out, max_operations)?;
    Ok(out)
}

/// Merges `members` into the object `target` found at `pointer`. Recursion follows the
/// patch's nesting, which the JSON reader has already bounded.
fn merge_into(
    target: &Value,
    members: &Map<String, Value>,
    pointer: &str,
    out: &mut Vec<PatchOperation>,
    max_operations: usize,
) -> Result<()> {
    for (key, value) in members {
        let child = pointer_child(pointer, key);
        match (value, target.get(key)) {
            (Value::Null, None) => continue,
            (Value::Null, Some(_)) => out.push(operation("remove", &child, None, None)?),
            (Value::Object(inner), Some(existing @ Value::Object(_))) => {
                merge_into(existing, inner, &child, out, max_operations)?;
            }
            (value, _) => out.push(operation("add", &child, Some(without_nulls(value)), None)?),
        }
        if out.len() > max_operations {
            return Err(Error::client(
                StatusCode::PAYLOAD_TOO_LARGE,
                IssueCode::TooLong,
                format!(
                    "the merge patch changes more than limits.max_patch_operations \
                     ({max_operations}) elements; send the Task with PUT instead"
                ),
            ));
        }
    }
    Ok(())
}

/// A value as it lands where nothing of its shape was: an object's `null` members mean
/// "absent", so they are left out (arrays are taken as they are).
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(members) => Value::Object(
            members
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn merged(target: Value, patch: Value) -> Value {
        let operations = operations(&target, &patch, 100).unwrap();
        let mut document = target;
        json_patch::patch(&mut document, &operations).unwrap();
        document
    }

    #[test]
    fn merges_as_rfc_7386_says() {
        // The RFC's appendix A, case by case.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
            (json!({"a": "b"}), json!({"x": null}), json!({"a": "b"})),
            (json!({"a/b~": 1}), json!({"a/b~": 2}), json!({"a/b~": 2})),
        ];
        for (target, patch, expected) in cases {
            assert_eq!(
                merged(target.clone(), patch.clone()),
                expected,
                "{target} + {patch}"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_an_object_and_too_many_changes() {
        let status = |r: Result<Vec<PatchOperation>>| r.unwrap_err().as_client().unwrap().status;
        assert_eq!(status(operations(&json!({}), &json!([1]), 10)), 400);
        assert_eq!(status(operations(&json!({}), &json!("x"), 10)), 400);
        let wide: Map<String, Value> = (0..11).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(
            status(operations(&json!({}), &Value::Object(wide.clone()), 10)),
            413
        );
        assert_eq!(
            operations(&json!({}), &Value::Object(wide), 11)
                .unwrap()
                .len(),
            11
        );
    }
}
