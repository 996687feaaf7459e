//! The AuditEvent search as SQL, once for both backends: conditions on the columns of
//! `audit_event`, newest or oldest first by `(recorded, seq)`, and the keyset condition of a
//! `next` link. And the AuditEvent's id: derived from its row, never stored with it.
//!
//! An AuditEvent's id is `{seq}-{the digits of recorded}` (`event_id`). It is known only once
//! the row is inserted, so the stored resource has no `id`, and `AuditRow::into_resource`
//! writes it in as the row is read; a read by id is a primary-key lookup. Deriving it keeps
//! a random-key UNIQUE index out of every audited write (BENCHMARKS.md, "The audit trail's
//! cost"). The `recorded` part keeps ids unique where a `seq` can be handed out twice: SQLite
//! reuses the rowid of a newest row that was pruned. AuditEvents written before sqlite
//! migration 0016 (postgres 0013) keep their random ids, stored in `legacy_id` and in the
//! resource.

use super::search_sql::Placeholder;

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
pub const ROW_COLUMNS: &str = "seq, recorded, resource, legacy_id";

/// One row a search reads (both stores read it by these column names).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRow {
    pub seq: i64,
    pub recorded: String,
    /// The AuditEvent without its `id` (with it, for a row that has a `legacy_id`).
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

    /// The AuditEvent as served: its id written in after `resourceType`, where the
    /// builders in `crate::audit` leave its place.
    pub fn into_resource(self) -> String {
        if self.legacy_id.is_some() {
            return self.resource;
        }
        let id = self.id();
        match self.resource.strip_prefix(RESOURCE_START) {
            Some(rest) => {
                let mut out = String::with_capacity(self.resource.len() + id.len() + 8);
                out.push_str(RESOURCE_START);
                out.push_str("\"id\":\"");
                out.push_str(&id);
                out.push_str("\",");
                out.push_str(rest);
                out
            }
            // Not written by `crate::audit`: served as stored rather than guessed at.
            None => self.resource,
        }
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

/// How every AuditEvent Baton writes begins; its id goes right after it.
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
    pub fn found(&self, rows: Vec<AuditRow>) -> Option<String> {
        rows.into_iter()
            .find(|row| row.is(self))
            .map(AuditRow::into_resource)
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
        let row = |seq: i64, recorded: &str| AuditRow {
            seq,
            recorded: recorded.into(),
            resource: r#"{"resourceType":"AuditEvent","meta":{"versionId":"1"}}"#.into(),
            legacy_id: None,
        };
        let served = lookup.found(vec![row(42, recorded)]).unwrap();
        assert_eq!(
            served,
            r#"{"resourceType":"AuditEvent","id":"42-20261207091730123","meta":{"versionId":"1"}}"#
        );
        // The same seq handed out again later is another AuditEvent.
        assert_eq!(
            lookup.found(vec![row(42, "2027-01-01T00:00:00.000Z")]),
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
            seq: 1,
            recorded: "2001-01-01T00:00:00.000Z".into(),
            resource: stored.into(),
            legacy_id: Some("old-one".into()),
        };
        assert_eq!(row.id(), "old-one");
        // Its derived id does not name it: only its own does.
        assert_eq!(
            IdLookup::of(&event_id(1, &row.recorded)).found(vec![row.clone()]),
            None
        );
        assert_eq!(
            IdLookup::of("old-one").found(vec![row]).as_deref(),
            Some(stored)
        );
    }
}
