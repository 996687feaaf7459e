//! The invariants that span several elements (`dom-3`, `per-1`, `ext-1`, the multi-focus
//! extension, the one author of an Annotation): small functions the element tables name as
//! rules. They are kept apart because each is a rule of its own, not a shape.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::fail;
use super::walker::Path;
use crate::error::{IssueCode, Result};
use crate::fhir::MULTI_FOCUS_EXTENSION;
use crate::fhir::datetime::{DateKind, parse_range};

/// dom-3: a contained resource exists only to be referenced from its container, so one that
/// nothing points at (and that does not point back at the container with `#`) is an error.
pub(super) fn contained_are_referenced(task: &Map<String, Value>, path: &Path) -> Result<()> {
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
                format_args!("{path}.contained[{i}]"),
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
pub(super) fn period_ends_after_start(period: &Map<String, Value>, path: &Path) -> Result<()> {
    let bound = |name: &str| {
        let value = period.get(name)?.as_str()?;
        parse_range(value, DateKind::DateTime).ok()
    };
    if let (Some(start), Some(end)) = (bound("start"), bound("end"))
        && end.end <= start.start
    {
        return Err(fail(
            IssueCode::Invariant,
            format_args!("{path}.end"),
            "is before the start; a period cannot end before it begins (per-1)",
        ));
    }
    Ok(())
}

/// ext-1: an extension holds either a value or nested extensions, never both and never
/// neither. Baton's multi-focus extension must hold a reference, since focus search reads it.
pub(super) fn extension_holds_one_thing(extension: &Map<String, Value>, path: &Path) -> Result<()> {
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
pub(super) fn annotation_has_one_author(note: &Map<String, Value>, path: &Path) -> Result<()> {
    if note.contains_key("authorReference") && note.contains_key("authorString") {
        return Err(fail(
            IssueCode::Structure,
            path,
            "has both authorReference and authorString; author[x] takes exactly one type",
        ));
    }
    Ok(())
}
