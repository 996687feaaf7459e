//! Work-list columns: the few search values that task-queue applications filter and sort by
//! all day (status, owner, performer type, due date, authored date), which the store keeps on
//! the Task row itself, beside the generic index tables, so that one index on the row can serve
//! a whole work-list search. They are derived here from the `TaskIndex`, the one reading of a
//! Task for search, so a column can never disagree with the index rows written beside it, and
//! `store::search_sql` translates a predicate on such a parameter to the column exactly when
//! the result is the same.
//!
//! A column holds the parameter's one value, or NULL when the Task has none. `status`, `owner`,
//! `due-date` and `authored-on` have at most one value by construction (`index_task` reads a
//! single element for each); `performer` (every coding of every `performerType`) may have
//! several, and then its column holds `SEVERAL` (the empty string, which no indexed code can
//! be) and the search falls back to the index table for that Task.
//!
//! What a column answers every search form of is not written again as index rows
//! (`TaskColumns::rows_beside`): `status`, `owner`, `due-date`, and `performer` unless the Task
//! has several. `authored-on` keeps its index row: the column holds only the start of its range
//! (its sort key), and putting the end on the row too would have meant rewriting every stored
//! Task when upgrading (measured: far too long at a million Tasks).
//! `_id` and `_lastUpdated` are the row's own key and `last_updated` (`ON_THE_ROW`): they are
//! never written as index rows either, which spares every Task write seven B-tree entries (a
//! `task_token` row's three, a `task_date` row's four) and their deletion at the next version.
//! `TaskColumns::add_entries` and `add_row_entries` give the index entries back from the row,
//! so that the whole `TaskIndex` of a stored Task is its rows plus its row's values.

use super::STATUS_SYSTEM;
use super::index::{DateEntry, TaskIndex, TokenEntry, last_updated_entry};

/// What the `performer` column holds for a Task with more than one performer type coding.
/// Indexed codes are never empty (`TaskIndex::token` skips them), so it cannot be a code.
pub const SEVERAL: &str = "";

/// The work-list values of one Task version, as the store writes them on its row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskColumns {
    /// `status` (its system is always the task-status system).
    pub status: Option<String>,
    /// `owner`: the normalised reference, or `task::OWNER_WITHOUT_REFERENCE`.
    pub owner: Option<String>,
    /// `performer`: the one code, or `SEVERAL`.
    pub performer: Option<String>,
    /// The system of the one performer code (None when it has none, or for `SEVERAL`).
    pub performer_system: Option<String>,
    /// `due-date` as its range `[start, end)`.
    pub due_start: Option<String>,
    pub due_end: Option<String>,
    /// The start of `authored-on`, its sort key.
    pub authored_on: Option<String>,
}

impl TaskColumns {
    /// The columns of a Task whose search values are `index`.
    pub fn from_index(index: &TaskIndex) -> TaskColumns {
        let token = |param: &str| {
            index
                .tokens
                .iter()
                .find(|t| t.param == param)
                .map(|t| t.value.clone())
        };
        let date = |param: &str| index.dates.iter().find(|d| d.param == param);
        let performers: Vec<_> = index
            .tokens
            .iter()
            .filter(|t| t.param == "performer")
            .collect();
        let (performer, performer_system) = match performers.as_slice() {
            [] => (None, None),
            [one] => (Some(one.value.clone()), one.system.clone()),
            _ => (Some(SEVERAL.to_string()), None),
        };
        let due = date("due-date");
        TaskColumns {
            status: token("status"),
            owner: token("owner"),
            performer,
            performer_system,
            due_start: due.map(|d| d.start.clone()),
            due_end: due.map(|d| d.end.clone()),
            authored_on: date("authored-on").map(|d| d.start.clone()),
        }
    }

    /// Whether the index entries of `param` are held by these columns (and so not written as
    /// index rows): always for `HELD` and `ON_THE_ROW`, for `performer` unless the Task has
    /// several.
    pub fn holds(&self, param: &str) -> bool {
        match param {
            "performer" => self.performer.as_deref() != Some(SEVERAL),
            other => HELD.contains(&other) || ON_THE_ROW.contains(&other),
        }
    }

    /// The columns of a Task whose search values are `index`, and the entries of `index` they
    /// do not hold (what `rows_beside` gives), kept in place rather than copied: what a write
    /// works out of a Task's index, which it needs no more.
    pub fn split(index: TaskIndex) -> (TaskColumns, TaskIndex) {
        let columns = TaskColumns::from_index(&index);
        let mut rows = index;
        rows.tokens.retain(|t| !columns.holds(t.param));
        rows.dates.retain(|d| !columns.holds(d.param));
        (columns, rows)
    }

    /// The entries of `index` that the columns do not hold: what the store writes as index
    /// rows beside them.
    pub fn rows_beside(&self, index: &TaskIndex) -> TaskIndex {
        TaskIndex {
            tokens: index
                .tokens
                .iter()
                .filter(|t| !self.holds(t.param))
                .cloned()
                .collect(),
            dates: index
                .dates
                .iter()
                .filter(|d| !self.holds(d.param))
                .cloned()
                .collect(),
        }
    }

    /// The index entries the columns hold, added to `rows` (the entries read back from the
    /// index rows), which gives the Task's whole `TaskIndex` again.
    pub fn add_entries(&self, rows: &mut TaskIndex) {
        if let Some(status) = &self.status {
            rows.tokens.push(TokenEntry {
                param: "status",
                system: Some(STATUS_SYSTEM.to_string()),
                value: status.clone(),
            });
        }
        if let Some(owner) = &self.owner {
            rows.tokens.push(TokenEntry {
                param: "owner",
                system: None,
                value: owner.clone(),
            });
        }
        if let Some(performer) = self.performer.as_ref().filter(|p| *p != SEVERAL) {
            rows.tokens.push(TokenEntry {
                param: "performer",
                system: self.performer_system.clone(),
                value: performer.clone(),
            });
        }
        if let (Some(start), Some(end)) = (&self.due_start, &self.due_end) {
            rows.dates.push(DateEntry {
                param: "due-date",
                start: start.clone(),
                end: end.clone(),
            });
        }
    }
}

/// The index entries of the Task row's own key and instant (`ON_THE_ROW`), added to `rows`:
/// `_id` (no system) and `_lastUpdated` (the range of the stored instant), as `index_task`
/// extracts them from a stored version, whose `id` and `meta.lastUpdated` are the row's.
pub fn add_row_entries(id: &str, last_updated: &str, rows: &mut TaskIndex) {
    rows.tokens.push(TokenEntry {
        param: "_id",
        system: None,
        value: id.to_string(),
    });
    if let Some(entry) = last_updated_entry(Some(last_updated)) {
        rows.dates.push(entry);
    }
}

/// The parameters answered from the Task row's own `id` and `last_updated`, which therefore
/// have no index rows (`store::search_sql` turns their predicates into conditions on those).
pub const ON_THE_ROW: &[&str] = &["_id", "_lastUpdated"];

/// The parameters whose values `index_task` extracts at most once per Task, so that a column
/// holds all of them (checked by a test over every element that feeds them).
pub const SINGLE_VALUED: &[&str] = &["status", "owner", "due-date", "authored-on"];

/// The single-valued parameters whose every search form the columns answer, which therefore
/// have no index rows (`authored-on` has only its start on the row).
pub const HELD: &[&str] = &["status", "owner", "due-date"];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::search::index_task;
    use serde_json::json;

    const BASE: &str = "http://baton.test/fhir";

    #[test]
    fn columns_hold_the_one_value_or_say_several() {
        let task = json!({
            "resourceType": "Task", "id": "a", "meta": { "lastUpdated": "2024-01-01T00:00:00.000Z" },
            "status": "ready", "intent": "order",
            "owner": { "reference": "Practitioner/p1" },
            "performerType": [{ "coding": [{ "system": "urn:q", "code": "triage" }] }],
            "restriction": { "period": { "end": "2024-03-10" } },
            "authoredOn": "2024-02-01T10:00:00Z",
        });
        let columns = TaskColumns::from_index(&index_task(&task, BASE));
        assert_eq!(columns.status.as_deref(), Some("ready"));
        assert_eq!(columns.owner.as_deref(), Some("Practitioner/p1"));
        assert_eq!(columns.performer.as_deref(), Some("triage"));
        assert_eq!(columns.performer_system.as_deref(), Some("urn:q"));
        assert!(columns.due_start.is_some() && columns.due_start < columns.due_end);
        assert!(columns.authored_on.is_some());

        let several = json!({
            "resourceType": "Task", "id": "b", "meta": { "lastUpdated": "2024-01-01T00:00:00.000Z" },
            "status": "ready", "intent": "order",
            "owner": { "display": "the ward clerk" },
            "performerType": [{ "coding": [{ "system": "urn:q", "code": "triage" }, { "code": "x" }] }],
        });
        let columns = TaskColumns::from_index(&index_task(&several, BASE));
        assert_eq!(columns.performer.as_deref(), Some(SEVERAL));
        assert_eq!(columns.performer_system, None);
        assert_eq!(
            columns.owner.as_deref(),
            Some(crate::fhir::task::OWNER_WITHOUT_REFERENCE)
        );
        assert_eq!(columns.due_start, None);
        assert_eq!(columns.authored_on, None);
    }

    /// The rows written beside the columns and the columns together give the whole index back;
    /// `split` gives the columns and rows that `from_index` and `rows_beside` do.
    #[test]
    fn rows_and_columns_together_are_the_whole_index() {
        let one = json!({
            "resourceType": "Task", "id": "a", "meta": { "lastUpdated": "2024-01-01T00:00:00.000Z" },
            "status": "ready", "intent": "order", "priority": "urgent",
            "owner": { "reference": "Practitioner/p1" },
            "for": { "reference": "Patient/x" },
            "performerType": [{ "coding": [{ "system": "urn:q", "code": "triage" }] }],
            "restriction": { "period": { "end": "2024-03-10" } },
            "authoredOn": "2024-02",
        });
        let several = json!({
            "resourceType": "Task", "id": "b", "meta": { "lastUpdated": "2024-01-01T00:00:00.000Z" },
            "status": "ready", "intent": "order",
            "performerType": [{ "coding": [{ "system": "urn:q", "code": "triage" }, { "code": "x" }] }],
        });
        for task in [one, several] {
            let index = index_task(&task, BASE);
            let columns = TaskColumns::from_index(&index);
            let mut rows = columns.rows_beside(&index);
            // What a write takes: the same, in the same order, without copying the rows.
            assert_eq!(
                TaskColumns::split(index.clone()),
                (columns.clone(), rows.clone())
            );
            for param in HELD.iter().chain(ON_THE_ROW) {
                assert!(!rows.tokens.iter().any(|t| t.param == *param), "{param}");
                assert!(!rows.dates.iter().any(|d| d.param == *param), "{param}");
            }
            let authored = rows
                .dates
                .iter()
                .filter(|d| d.param == "authored-on")
                .count();
            assert_eq!(authored, usize::from(columns.authored_on.is_some()));
            let performer_rows = rows
                .tokens
                .iter()
                .filter(|t| t.param == "performer")
                .count();
            assert_eq!(
                performer_rows > 0,
                columns.performer.as_deref() == Some(SEVERAL)
            );
            columns.add_entries(&mut rows);
            add_row_entries(
                task["id"].as_str().unwrap(),
                task["meta"]["lastUpdated"].as_str().unwrap(),
                &mut rows,
            );
            let sorted = |mut i: TaskIndex| {
                i.tokens.sort_by(|a, b| {
                    (a.param, &a.system, &a.value).cmp(&(b.param, &b.system, &b.value))
                });
                i.dates
                    .sort_by(|a, b| (a.param, &a.start).cmp(&(b.param, &b.start)));
                i
            };
            assert_eq!(sorted(rows), sorted(index));
        }
    }

    /// A column can hold only one value: every element that feeds a single-valued parameter
    /// is filled in here at once, and each must still give one index entry.
    #[test]
    fn single_valued_parameters_never_index_two_values() {
        let crowded = json!({
            "resourceType": "Task", "id": "c", "meta": { "lastUpdated": "2024-01-01T00:00:00.000Z" },
            "status": "ready", "intent": "order",
            "owner": { "reference": "Practitioner/p1", "display": "Dr One", "identifier": { "value": "x" } },
            "restriction": { "period": { "start": "2024-03-01", "end": "2024-03-10" } },
            "authoredOn": "2024-02-01T10:00:00Z",
            "lastModified": "2024-02-02T10:00:00Z",
        });
        let unresolved = json!({
            "resourceType": "Task", "id": "d", "meta": { "lastUpdated": "2024-01-01T00:00:00.000Z" },
            "status": "ready", "intent": "order",
            "owner": { "reference": "#contained", "display": "someone" },
        });
        for task in [crowded, unresolved] {
            let index = index_task(&task, BASE);
            for param in SINGLE_VALUED {
                let tokens = index.tokens.iter().filter(|t| t.param == *param).count();
                let dates = index.dates.iter().filter(|d| d.param == *param).count();
                assert!(tokens + dates <= 1, "{param} of {task}");
            }
        }
    }
}
