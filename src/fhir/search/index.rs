//! Indexing: what a Task contributes to search, one `TaskIndex` entry per indexed value. The
//! store files these entries in its index tables and the matcher reads them in memory; they are
//! kept apart from the parameter definitions because this is the one place that reads a Task for
//! search.

use serde_json::Value;

use super::{INTENT_SYSTEM, PRIORITY_SYSTEM, STATUS_SYSTEM};
use crate::fhir::datetime::{self, DateKind, MAX_KEY, MIN_KEY};
use crate::fhir::json;
use crate::fhir::task;
use crate::fhir::{MULTI_FOCUS_EXTENSION, normalize_reference};

/// What a Task contributes to search: one entry per indexed value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TaskIndex {
    pub tokens: Vec<TokenEntry>,
    pub dates: Vec<DateEntry>,
}

/// A token or reference value. References have no system and hold `Type/id` (or an absolute
/// URL for a resource on another server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub param: &'static str,
    pub system: Option<String>,
    pub value: String,
}

/// A date value as the half-open range `[start, end)` of sortable keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateEntry {
    pub param: &'static str,
    pub start: String,
    pub end: String,
}

impl TaskIndex {
    /// Adds a token, skipping empty codes and duplicates so that the store writes each row once.
    fn token(&mut self, param: &'static str, system: Option<&str>, value: Option<&str>) {
        let Some(value) = value.filter(|v| !v.is_empty()) else {
            return;
        };
        // An empty system says nothing, so it is indexed as no system, which `|code` finds.
        let system = system.filter(|s| !s.is_empty()).map(str::to_string);
        let entry = TokenEntry {
            param,
            system,
            value: value.to_string(),
        };
        if !self.tokens.contains(&entry) {
            self.tokens.push(entry);
        }
    }

    fn codings(&mut self, param: &'static str, concept: Option<&Value>) {
        for coding in array(concept, "coding") {
            self.token(param, str_at(coding, "system"), str_at(coding, "code"));
        }
    }

    fn reference(&mut self, param: &'static str, reference: Option<&str>, base_url: &str) {
        if let Some(normalized) = reference.and_then(|r| normalize_reference(r, base_url)) {
            self.token(param, None, Some(&normalized));
        }
    }

    fn date(&mut self, param: &'static str, start: String, end: String) {
        self.dates.push(DateEntry { param, start, end });
    }
}

fn str_at<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get(key).and_then(Value::as_str)
}

/// The elements of the array `key` of `value`, or nothing when it is absent.
fn array<'a>(value: Option<&'a Value>, key: &str) -> impl Iterator<Item = &'a Value> {
    value
        .and_then(|v| v.get(key))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The `_lastUpdated` entry of a version stored at `instant` (`meta.lastUpdated`): the first
/// of `index_task`'s dates, and all a create's index lacks before its transaction stamps it
/// (`store::write::Staged`).
pub fn last_updated_entry(instant: Option<&str>) -> Option<DateEntry> {
    let range = stored_range(instant)?;
    Some(DateEntry {
        param: "_lastUpdated",
        start: range.start_key(),
        end: range.end_key(),
    })
}

/// The range of a stored date, dateTime or instant. A value the validator let through always
/// parses; anything else is left out of the index rather than indexed wrongly.
fn stored_range(text: Option<&str>) -> Option<datetime::DateRange> {
    datetime::parse_range(text?, DateKind::DateTime).ok()
}

/// The resource type a normalised reference names: `Type` of `Type/id`, or the type segment of
/// an absolute URL (ignoring a `/_history/N` suffix). Contained and `urn:` references have none.
fn reference_type(reference: &str) -> Option<&str> {
    if !reference.contains('/') || reference.starts_with('#') {
        return None;
    }
    let mut segments: Vec<&str> = reference.split('/').collect();
    if segments.len() >= 4 && segments[segments.len() - 2] == "_history" {
        segments.truncate(segments.len() - 2);
    }
    (segments.len() >= 2).then(|| segments[segments.len() - 2])
}

/// Extracts every search value of a Task. The Task must be valid and have its `id` and
/// `meta.lastUpdated` set.
pub fn index_task(task: &Value, base_url: &str) -> TaskIndex {
    let mut index = TaskIndex::default();
    let task_ref = Some(task);

    index.token("_id", None, str_at(task, "id"));
    if let Some(entry) =
        last_updated_entry(json::at(task, "/meta/lastUpdated").and_then(Value::as_str))
    {
        index.dates.push(entry);
    }

    index.token("status", Some(STATUS_SYSTEM), str_at(task, "status"));
    index.codings("business-status", task.get("businessStatus"));
    index.reference(
        "owner",
        json::at(task, "/owner/reference").and_then(Value::as_str),
        base_url,
    );
    // An owner named without a reference still owns the Task: it is not `owner:missing`,
    // and so not in any role queue (see `task::Ownership::Unresolved`).
    if task::ownership(task, base_url) == task::Ownership::Unresolved {
        index.token("owner", None, Some(task::OWNER_WITHOUT_REFERENCE));
    }
    for concept in array(task_ref, "performerType") {
        index.codings("performer", Some(concept));
    }

    // `for` feeds both `subject` and, when it is a Patient, `patient`.
    if let Some(subject) = task.get("for") {
        let normalized =
            str_at(subject, "reference").and_then(|r| normalize_reference(r, base_url));
        if let Some(normalized) = normalized {
            let is_patient = reference_type(&normalized) == Some("Patient")
                || str_at(subject, "type") == Some("Patient");
            if is_patient {
                index.token("patient", None, Some(&normalized));
            }
            index.token("subject", None, Some(&normalized));
        }
    }

    index.reference(
        "focus",
        json::at(task, "/focus/reference").and_then(Value::as_str),
        base_url,
    );
    for extension in array(task_ref, "extension") {
        if str_at(extension, "url") == Some(MULTI_FOCUS_EXTENSION) {
            let reference =
                json::at(extension, "/valueReference/reference").and_then(Value::as_str);
            index.reference("focus", reference, base_url);
        }
    }
    for parent in array(task_ref, "partOf") {
        index.reference("part-of", str_at(parent, "reference"), base_url);
    }
    for request in array(task_ref, "basedOn") {
        index.reference("based-on", str_at(request, "reference"), base_url);
    }
    index.reference(
        "requester",
        json::at(task, "/requester/reference").and_then(Value::as_str),
        base_url,
    );

    index.codings("code", task.get("code"));
    index.token("priority", Some(PRIORITY_SYSTEM), str_at(task, "priority"));
    index.token("intent", Some(INTENT_SYSTEM), str_at(task, "intent"));
    for identifier in array(task_ref, "identifier") {
        index.token(
            "identifier",
            str_at(identifier, "system"),
            str_at(identifier, "value"),
        );
    }

    if let Some(range) = stored_range(str_at(task, "authoredOn")) {
        index.date("authored-on", range.start_key(), range.end_key());
    }
    if let Some(range) = stored_range(str_at(task, "lastModified")) {
        index.date("modified", range.start_key(), range.end_key());
    }
    if let Some((start, end)) = task.get("executionPeriod").and_then(period_keys) {
        index.date("period", start, end);
    }
    if let Some(range) =
        stored_range(json::at(task, "/restriction/period/end").and_then(Value::as_str))
    {
        index.date("due-date", range.start_key(), range.end_key());
    }
    index
}

/// The range a Period covers: from the start of its start to the end of its end, with a missing
/// bound open (MIN_KEY or MAX_KEY). A Period with neither bound says nothing and is not indexed.
fn period_keys(period: &Value) -> Option<(String, String)> {
    let start_text = str_at(period, "start");
    let end_text = str_at(period, "end");
    if start_text.is_none() && end_text.is_none() {
        return None;
    }
    let start = match start_text {
        Some(_) => stored_range(start_text)?.start_key(),
        None => MIN_KEY.to_string(),
    };
    let end = match end_text {
        Some(_) => stored_range(end_text)?.end_key(),
        None => MAX_KEY.to_string(),
    };
    Some((start, end))
}

/// How urgent a Task is, for sorting by `priority`: routine (or absent) 1, urgent 2, asap 3,
/// stat 4. The store keeps this in a column so that a priority sort needs no join.
pub fn priority_rank(task: &Value) -> i64 {
    match str_at(task, "priority") {
        Some("urgent") => 2,
        Some("asap") => 3,
        Some("stat") => 4,
        _ => 1,
    }
}
