//! The AuditEvent search as SQL, once for both backends: conditions on the columns of
//! `audit_event`, newest or oldest first by `(recorded, seq)`, and the keyset condition of a
//! `next` link.

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

/// One row a search reads (both stores read it by these column names).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditRow {
    pub seq: i64,
    pub recorded: String,
    pub resource: String,
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
        "SELECT seq, recorded, resource FROM audit_event {filter}
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
}
