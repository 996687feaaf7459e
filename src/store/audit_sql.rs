//! The AuditEvent search as SQL, once for both backends: conditions on the columns of
//! `audit_event`, newest or oldest first by `(recorded, seq)`, and the keyset condition of a
//! `next` link. And the AuditEvent as served: written from its row, its id derived from it.
//!
//! A row's `resource` column holds the AuditEvent's stored facts (`crate::audit::StoredFacts`,
//! ~100 bytes), and `AuditRow::into_resource` writes the whole AuditEvent from them and the
//! row's columns (`crate::audit::expand`) as it is read. Rows written before the facts were
//! stored hold the resource itself, and are served as stored.
//!
//! An AuditEvent's id is `{seq}-{the digits of recorded}` (`event_id`). It is known only once
//! the row is inserted, so it is never stored; a read by id is a primary-key lookup. Deriving
//! it keeps a random-key UNIQUE index out of every audited write (BENCHMARKS.md, "The audit
//! trail's cost"). The `recorded` part keeps ids unique where a `seq` can be handed out
//! twice: SQLite reuses the rowid of a newest row that was pruned. AuditEvents written before
//! sqlite migration 0016 (postgres 0013) keep their random ids, stored in `legacy_id` and in
//! the resource.

use super::search_sql::Placeholder;
use crate::audit::{FACTS_START, StoredEvent};
use crate::error::{Error, Result};

/// How a `date` value's range `[start, end)` bounds `recorded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateBound {
    /// `recorded >= key`
    AtLeast,
    /// `recorded < key`
    Before,
}

/// An AuditEvent search, its values already checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub dates: Vec<(DateBound, String)>,
    /// Each list is one parameter's values: any of them matches (several parameters: all).
    pub entity: Vec<Vec<String>>,
    pub agent: Vec<Vec<String>>,
    pub subtype: Vec<Vec<String>>,
    pub type_code: Vec<Vec<String>>,
    pub outcome: Vec<Vec<String>>,
    /// Newest first (`_sort=-date`, the default) or oldest first (`_sort=date`).
    pub newest_first: bool,
    /// The `(recorded, seq)` of the last row of the previous page.
    pub after: Option<(String, i64)>,
    /// Rows to read: the page size plus one, to know whether a next page exists.
    pub limit: usize,
}

/// The columns a search or a read by id returns, in `AuditRow`'s order.
pub const ROW_COLUMNS: &str =
    "seq, recorded, type_code, subtype, outcome, entity, resource, legacy_id";

/// One row a search reads (both stores read it by these column names).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRow {
    pub seq: i64,
    pub recorded: String,
    pub type_code: String,
    pub subtype: String,
    pub outcome: String,
    pub entity: Option<String>,
    /// The AuditEvent's stored facts; or, in a row written before they were stored, the
    /// AuditEvent itself, without its `id` (with it, for a row that has a `legacy_id`).
    pub resource: String,
    pub legacy_id: Option<String>,
}

impl AuditRow {
    /// The AuditEvent's id.
    pub fn id(&self) -> String {
        match &self.legacy_id {
            Some(id) => id.clone(),
            None => event_id(self.seq, &self.recorded),
        }
    }

    /// The AuditEvent as served: written from the row's facts and columns, with its id; a
    /// row that holds the resource itself has its id written in after `resourceType`.
    pub fn into_resource(self) -> Result<String> {
        if self.legacy_id.is_some() {
            return Ok(self.resource);
        }
        let id = self.id();
        if self.resource.starts_with(FACTS_START) {
            return crate::audit::expand(&StoredEvent {
                id: &id,
                type_code: &self.type_code,
                recorded: &self.recorded,
                subtype: &self.subtype,
                outcome: &self.outcome,
                entity: self.entity.as_deref(),
                facts: &self.resource,
            })
            .map_err(|e| Error::internal("a stored AuditEvent's facts are not readable", e));
        }
        Ok(match self.resource.strip_prefix(RESOURCE_START) {
            Some(rest) => {
                let mut out = String::with_capacity(self.resource.len() + id.len() + 8);
                out.push_str(RESOURCE_START);
                out.push_str("\"id\":\"");
                out.push_str(&id);
                out.push_str("\",");
                out.push_str(rest);
                out
            }
            // Not written by Baton: served as stored rather than guessed at.
            None => self.resource,
        })
    }

    /// Whether this row is the AuditEvent `lookup` names.
    fn is(&self, lookup: &IdLookup<'_>) -> bool {
        match lookup {
            IdLookup::Derived {
                seq,
                recorded_digits,
            } => {
                self.legacy_id.is_none()
                    && self.seq == *seq
                    && digits(&self.recorded).eq(recorded_digits.bytes())
            }
            IdLookup::Legacy(id) => self.legacy_id.as_deref() == Some(*id),
        }
    }
}

/// How every AuditEvent Baton stored whole (before it stored the facts) begins; its id goes
/// right after it.
pub const RESOURCE_START: &str = r#"{"resourceType":"AuditEvent","#;

/// The id of the AuditEvent stored in row `seq`, recorded at `recorded`.
pub fn event_id(seq: i64, recorded: &str) -> String {
    let mut id = seq.to_string();
    id.push('-');
    id.extend(digits(recorded).map(char::from));
    id
}

fn digits(text: &str) -> impl Iterator<Item = u8> + '_ {
    text.bytes().filter(u8::is_ascii_digit)
}

/// Where the AuditEvent of an id is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdLookup<'a> {
    /// An id `event_id` made: the row `seq`, if it was recorded then.
    Derived { seq: i64, recorded_digits: &'a str },
    /// Any other id: one written before ids were derived.
    Legacy(&'a str),
}

impl<'a> IdLookup<'a> {
    pub fn of(id: &'a str) -> IdLookup<'a> {
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if let Some((seq, recorded)) = id.split_once('-')
            && plain(seq)
            && plain(recorded)
            && let Ok(seq) = seq.parse()
        {
            return IdLookup::Derived {
                seq,
                recorded_digits: recorded,
            };
        }
        IdLookup::Legacy(id)
    }

    /// The statement that reads the candidate rows, and its one bind.
    pub fn sql(&self, style: Placeholder) -> (String, String) {
        let p = match style {
            Placeholder::Question => "?",
            Placeholder::Dollar => "$1",
        };
        match self {
            IdLookup::Derived { seq, .. } => (
                format!("SELECT {ROW_COLUMNS} FROM audit_event WHERE seq = CAST({p} AS BIGINT)"),
                seq.to_string(),
            ),
            IdLookup::Legacy(id) => (
                format!("SELECT {ROW_COLUMNS} FROM audit_event WHERE legacy_id = {p}"),
                (*id).to_string(),
            ),
        }
    }

    /// The AuditEvent among the rows `sql` read, as served.
    pub fn found(&self, rows: Vec<AuditRow>) -> Result<Option<String>> {
        rows.into_iter()
            .find(|row| row.is(self))
            .map(AuditRow::into_resource)
            .transpose()
    }
}

/// The statement of a search and its text binds in order.
pub fn search_sql(query: &AuditQuery, style: Placeholder) -> (String, Vec<String>) {
    let mut binds: Vec<String> = Vec::new();
    let next = |value: String, binds: &mut Vec<String>| {
        binds.push(value);
        match style {
            Placeholder::Question => "?".to_string(),
            Placeholder::Dollar => format!("${}", binds.len()),
        }
    };
    let mut conditions: Vec<String> = Vec::new();
    for (bound, key) in &query.dates {
        let p = next(key.clone(), &mut binds);
        conditions.push(match bound {
            DateBound::AtLeast => format!("recorded >= {p}"),
            DateBound::Before => format!("recorded < {p}"),
        });
    }
    for (column, lists) in [
        ("entity", &query.entity),
        ("agent", &query.agent),
        ("subtype", &query.subtype),
        ("type_code", &query.type_code),
        ("outcome", &query.outcome),
    ] {
        for values in lists {
            let ps: Vec<String> = values.iter().map(|v| next(v.clone(), &mut binds)).collect();
            conditions.push(format!("{column} IN ({})", ps.join(", ")));
        }
    }
    let (cmp, order) = if query.newest_first {
        ("<", "DESC")
    } else {
        (">", "ASC")
    };
    if let Some((recorded, seq)) = &query.after {
        let p1 = next(recorded.clone(), &mut binds);
        let p2 = next(recorded.clone(), &mut binds);
        conditions.push(format!(
            "(recorded {cmp} {p1} OR (recorded = {p2} AND seq {cmp} {seq}))"
        ));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM audit_event {filter}
         ORDER BY recorded {order}, seq {order} LIMIT {}",
        query.limit
    );
    (sql, binds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_bind_in_order_and_page_after_the_last_row() {
        let query = AuditQuery {
            dates: vec![(DateBound::AtLeast, "2026-01-01T00:00:00.000Z".into())],
            entity: vec![vec!["Task/1".into(), "Task/2".into()]],
            newest_first: true,
            after: Some(("2026-02-01T00:00:00.000Z".into(), 7)),
            limit: 11,
            ..AuditQuery::default()
        };
        let (sql, binds) = search_sql(&query, Placeholder::Dollar);
        assert!(
            sql.contains("recorded >= $1 AND entity IN ($2, $3)"),
            "{sql}"
        );
        assert!(
            sql.contains("(recorded < $4 OR (recorded = $5 AND seq < 7))"),
            "{sql}"
        );
        assert!(
            sql.contains("ORDER BY recorded DESC, seq DESC LIMIT 11"),
            "{sql}"
        );
        assert_eq!(binds.len(), 5);
    }

    #[test]
    fn a_derived_id_names_its_row_and_instant_and_is_written_into_the_resource() {
        let recorded = "2026-12-07T09:17:30.123Z";
        let id = event_id(42, recorded);
        assert_eq!(id, "42-20261207091730123");
        let lookup = IdLookup::of(&id);
        assert_eq!(
            lookup,
            IdLookup::Derived {
                seq: 42,
                recorded_digits: "20261207091730123"
            }
        );
        // A row as stored before the facts were: the resource without its id.
        let row = |seq: i64, recorded: &str| AuditRow {
            resource: r#"{"resourceType":"AuditEvent","meta":{"versionId":"1"}}"#.into(),
            ..stored_row(seq, recorded)
        };
        let served = lookup.found(vec![row(42, recorded)]).unwrap().unwrap();
        assert_eq!(
            served,
            r#"{"resourceType":"AuditEvent","id":"42-20261207091730123","meta":{"versionId":"1"}}"#
        );
        // The same seq handed out again later is another AuditEvent.
        assert_eq!(
            lookup
                .found(vec![row(42, "2027-01-01T00:00:00.000Z")])
                .unwrap(),
            None
        );
    }

    #[test]
    fn ids_from_before_derivation_are_looked_up_as_stored() {
        for id in [
            "0193f1a2-7c3e-7d41-9a55-2f1e8b6c0d11",
            "old-one",
            "42",
            "-1",
            "4-x",
        ] {
            assert_eq!(IdLookup::of(id), IdLookup::Legacy(id), "{id}");
        }
        let stored = r#"{"resourceType":"AuditEvent","id":"old-one"}"#;
        let row = AuditRow {
            resource: stored.into(),
            legacy_id: Some("old-one".into()),
            ..stored_row(1, "2001-01-01T00:00:00.000Z")
        };
        assert_eq!(row.id(), "old-one");
        // Its derived id does not name it: only its own does.
        assert_eq!(
            IdLookup::of(&event_id(1, &row.recorded))
                .found(vec![row.clone()])
                .unwrap(),
            None
        );
        assert_eq!(
            IdLookup::of("old-one").found(vec![row]).unwrap().as_deref(),
            Some(stored)
        );
    }

    /// The row of a Task create's AuditEvent, as stored now: its facts.
    fn stored_row(seq: i64, recorded: &str) -> AuditRow {
        AuditRow {
            seq,
            recorded: recorded.into(),
            type_code: "rest".into(),
            subtype: "create".into(),
            outcome: "0".into(),
            entity: Some("Task/t1".into()),
            resource: r#"{"f":1,"n":"node-1","u":"Practitioner/p1","r":"practitioner","v":"1"}"#
                .into(),
            legacy_id: None,
        }
    }

    #[test]
    fn a_row_of_facts_is_served_as_its_whole_audit_event_with_its_derived_id() {
        let recorded = "2026-12-07T09:17:30.123Z";
        let id = event_id(42, recorded);
        let served = IdLookup::of(&id)
            .found(vec![stored_row(42, recorded)])
            .unwrap()
            .unwrap();
        let event: serde_json::Value = serde_json::from_str(&served).unwrap();
        assert!(served.starts_with(r#"{"resourceType":"AuditEvent","id":"42-"#));
        assert_eq!(event["id"], id.as_str());
        assert_eq!(event["recorded"], recorded);
        assert_eq!(event["meta"]["lastUpdated"], recorded);
        assert_eq!(event["subtype"][0]["code"], "create");
        assert_eq!(event["outcome"], "0");
        assert_eq!(event["agent"][0]["who"]["reference"], "Practitioner/p1");
        assert_eq!(event["agent"][0]["role"][0]["text"], "practitioner");
        assert_eq!(
            event["entity"][0]["what"]["reference"],
            "Task/t1/_history/1"
        );
        assert_eq!(event["source"]["observer"]["display"], "node-1");
        // Facts that are not the stored form fail the read; they are never served half-made.
        let broken = AuditRow {
            resource: r#"{"f":9}"#.into(),
            ..stored_row(42, recorded)
        };
        assert!(broken.into_resource().is_err());
    }
}
