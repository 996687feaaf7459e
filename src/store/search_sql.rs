//! Search predicates and sort keys as SQL over the index tables, for both stores.
//!
//! The work-list parameters `status`, `owner`, `performer` and `due-date` are columns of the
//! Task row (`fhir::search::TaskColumns`) and are answered from them, as `_id` and
//! `_lastUpdated` are from the row's key and `last_updated`; the index tables hold the
//! rest of what `fhir::search::index_task` extracts (`TaskColumns::rows_beside`): one
//! `task_token` row per token or reference value and one `task_date` row per date range
//! (`authored-on` included: its column holds only its sort key), and the performer types of a
//! Task that has several. Each predicate becomes
//! `t.id [NOT] IN (SELECT task_id FROM task_… WHERE param = ? AND …)`, which the
//! `(param, value, task_id)` and `(param, start_at, task_id)` indexes answer, and which has the
//! same meaning as `Predicate::matches`: "some value of the parameter satisfies the condition".
//! Every value is bound; the only text spliced into SQL comes from Baton's own parameter table.

use super::rows::CURRENT_COLUMNS;
use super::{Counting, HistoryRequest};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::datetime::{MAX_KEY, MIN_KEY};
use crate::fhir::search::{
    DateComparison, ParamType, Predicate, Prefix, SEVERAL, STATUS_SYSTEM, SortKey, SystemMatch,
    TokenValue, task_param,
};
use crate::fhir::task::TASK_STATUSES;

/// How bind parameters are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// SQLite: `?`, bound in order.
    Question,
    /// PostgreSQL: `$1`, `$2`, … numbered from `first_bind`.
    Dollar,
}

/// The type-level history query and its text binds in order (numbers are written into the
/// SQL, as they come from Baton's own types). Newest first over the
/// `task_version (last_updated, id, version)` index; a deletion is joined to the version it
/// deleted (`deleted_resource`), and with `_at` each version to the one after it, which
/// ends its time as the current one.
pub fn history_sql(request: &HistoryRequest, style: Placeholder) -> (String, Vec<String>) {
    let mut binds: Vec<String> = Vec::new();
    let next = |value: &str, binds: &mut Vec<String>| {
        binds.push(value.to_string());
        match style {
            Placeholder::Question => "?".to_string(),
            Placeholder::Dollar => format!("${}", binds.len()),
        }
    };
    let mut sql = String::from(
        "SELECT v.id, v.version, v.last_updated, v.interaction, v.resource, \
         p.resource AS deleted_resource FROM task_version v \
         LEFT JOIN task_version p ON v.resource IS NULL AND p.id = v.id \
         AND p.version = v.version - 1",
    );
    if request.at.is_some() {
        sql.push_str(" LEFT JOIN task_version n ON n.id = v.id AND n.version = v.version + 1");
    }
    sql.push_str(" WHERE 1=1");
    if let Some(since) = &request.since {
        let since = next(since.as_str(), &mut binds);
        sql.push_str(&format!(" AND v.last_updated >= {since}"));
    }
    if let Some((start, end)) = &request.at {
        let end = next(end, &mut binds);
        let start = next(start, &mut binds);
        sql.push_str(&format!(
            " AND v.last_updated < {end} AND (n.last_updated IS NULL OR n.last_updated > {start})"
        ));
    }
    if let Some(after) = &request.after {
        let last_updated = next(after.last_updated.as_str(), &mut binds);
        let id = next(after.id.as_str(), &mut binds);
        sql.push_str(&format!(
            " AND (v.last_updated, v.id, v.version) < ({last_updated}, {id}, {})",
            after.version.get()
        ));
    }
    sql.push_str(&format!(
        " ORDER BY v.last_updated DESC, v.id DESC, v.version DESC LIMIT {}",
        request.limit
    ));
    (sql, binds)
}

/// A SQL condition over the task table aliased `t`, and its bind values in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlFilter {
    pub sql: String,
    pub binds: Vec<String>,
}

/// Builds the condition for ANDed predicates; `1=1` when there are none. The caller adds
/// `t.deleted = 0`. With `Placeholder::Dollar`, the first bind is `$first_bind`, so that the
/// caller can put its own binds before this condition.
pub fn where_clause(predicates: &[Predicate], style: Placeholder, first_bind: usize) -> SqlFilter {
    let mut writer = Writer {
        style,
        next: first_bind,
        binds: Vec::new(),
        arm: Arm::Both,
    };
    let sql = writer.all(predicates);
    SqlFilter {
        sql,
        binds: writer.binds,
    }
}

/// Accumulates bind values while the SQL text is written left to right, so the order of the
/// binds is the order of the placeholders.
struct Writer {
    style: Placeholder,
    next: usize,
    binds: Vec<String>,
    /// Which Tasks a token column that may say `SEVERAL` is written for (see `Arm`).
    arm: Arm,
}

/// Which Tasks the condition on a token column with a system of its own (`performer`) is
/// written for. A search whose criteria require such a value is answered as two arms, one per
/// kind of Task, merged in the sort order: each arm then walks an index in that order, where
/// one condition covering both kinds (`IN (code, 'SEVERAL')`) would make the database sort
/// every match (the role queue of issue 16: a walk of all requested Tasks, or a sort of a
/// whole queue). Every Task is of exactly one kind, so the arms never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arm {
    /// Both kinds in one condition.
    Both,
    /// Tasks with one value in the column.
    One,
    /// Tasks whose column says `SEVERAL`, looked up in the index table.
    Several,
}

impl Writer {
    fn bind(&mut self, value: &str) -> String {
        self.binds.push(value.to_string());
        self.placeholder()
    }

    /// The next placeholder; its value is bound by the caller unless `bind` pushed it.
    fn placeholder(&mut self) -> String {
        match self.style {
            Placeholder::Question => "?".to_string(),
            Placeholder::Dollar => {
                let placeholder = format!("${}", self.next);
                self.next += 1;
                placeholder
            }
        }
    }

    fn all(&mut self, predicates: &[Predicate]) -> String {
        if predicates.is_empty() {
            return "1=1".to_string();
        }
        let parts: Vec<String> = predicates.iter().map(|p| self.predicate(p)).collect();
        parts.join(" AND ")
    }

    fn predicate(&mut self, predicate: &Predicate) -> String {
        match predicate {
            Predicate::Token {
                param,
                negated,
                any_of,
            } => match (column_of(param), negated) {
                (Some(Column::Token(column)), false) if has_codes(any_of) => {
                    self.token_column(param, &column, any_of)
                }
                (Some(Column::Token(column)), true)
                    if has_codes(any_of) && !matches!(column.system, ColumnSystem::Own(_)) =>
                {
                    self.token_column_negated(&column, any_of)
                }
                // The other forms on a column (`system|` without a code, `performer:not`):
                // the column's general condition, which is never NULL-true, negated with
                // its NULLs (no value) counted as "no match".
                (Some(Column::Token(column)), negated) => {
                    let matched = self.token_column_any(param, &column, any_of);
                    if *negated {
                        format!("NOT COALESCE(({matched}), FALSE)")
                    } else {
                        format!("COALESCE(({matched}), FALSE)")
                    }
                }
                _ => {
                    let subquery = self.token_subquery(param, any_of);
                    membership(*negated, &subquery)
                }
            },
            Predicate::Missing { param, missing } => {
                if let Some(column) = column_of(param) {
                    let name = match column {
                        Column::Token(token) => token.name,
                        Column::Date { start, .. } | Column::Instant(start) => start,
                    };
                    let test = if *missing { "IS NULL" } else { "IS NOT NULL" };
                    return format!("{name} {test}");
                }
                let table = match task_param(param).map(|def| def.kind) {
                    Some(ParamType::Date) => "task_date",
                    _ => "task_token",
                };
                let param = self.bind(param);
                let subquery = format!("SELECT task_id FROM {table} WHERE param = {param}");
                membership(*missing, &subquery)
            }
            Predicate::Date { param, any_of } => {
                if any_of.is_empty() {
                    return "0=1".to_string();
                }
                if let Some(Column::Date { start, end }) = column_of(param) {
                    // One value per Task: "some value satisfies" is "the column satisfies",
                    // and a Task without one (NULL) satisfies no comparison.
                    let parts: Vec<String> = any_of
                        .iter()
                        .map(|c| self.date_condition(c, start, end))
                        .collect();
                    return format!("({})", parts.join(" OR "));
                }
                if let Some(Column::Instant(name)) = column_of(param) {
                    let parts: Vec<String> = any_of
                        .iter()
                        .map(|c| self.instant_condition(c, name))
                        .collect();
                    return format!("({})", parts.join(" OR "));
                }
                let param = self.bind(param);
                let parts: Vec<String> = any_of
                    .iter()
                    .map(|c| self.date_condition(c, "start_at", "end_at"))
                    .collect();
                let subquery = format!(
                    "SELECT task_id FROM task_date WHERE param = {param} AND ({})",
                    parts.join(" OR ")
                );
                membership(false, &subquery)
            }
            Predicate::Or(any) => {
                if any.is_empty() {
                    return "0=1".to_string();
                }
                let parts: Vec<String> = any.iter().map(|p| self.predicate(p)).collect();
                format!("({})", parts.join(" OR "))
            }
            Predicate::And(all) => {
                let parts = self.all(all);
                format!("({parts})")
            }
        }
    }

    /// `SELECT task_id FROM task_token …` of the Tasks with a value of `param` among `any_of`.
    fn token_subquery(&mut self, param: &str, any_of: &[TokenValue]) -> String {
        let param = self.bind(param);
        let values = self.token_values(any_of);
        format!("SELECT task_id FROM task_token WHERE param = {param} AND {values}")
    }

    /// A token predicate on a parameter kept in a column of the Task row: the column is one of
    /// the codes, and its system (fixed for the parameter, or in a column of its own) is one
    /// the value accepts. A Task whose column says it has several values (`SEVERAL`) is looked
    /// up in the index table instead.
    fn token_column(&mut self, param: &str, column: &TokenColumn, any_of: &[TokenValue]) -> String {
        let name = column.name;
        let accepted: Vec<&TokenValue> = any_of
            .iter()
            .filter(|value| column.system.may_hold(&value.system))
            .collect();
        if accepted.is_empty() {
            return "0=1".to_string();
        }
        let codes = |writer: &mut Writer| {
            let codes: Vec<String> = accepted
                .iter()
                .map(|value| writer.bind(value.code.as_deref().unwrap_or_default()))
                .collect();
            codes.join(", ")
        };
        let ColumnSystem::Own(system_column) = column.system else {
            // The system is the parameter's own, checked above; the column holds one value.
            return format!("{name} IN ({})", codes(self));
        };
        // Correlated, so that only the rare Task with several values pays for the lookup.
        let several = |writer: &mut Writer| {
            let param_bind = writer.bind(param);
            let values = writer.token_values(any_of);
            format!(
                "EXISTS (SELECT 1 FROM task_token WHERE task_id = t.id AND param = {param_bind} AND {values})"
            )
        };
        let one = |writer: &mut Writer| {
            let mut one = Vec::new();
            for value in &accepted {
                let code = writer.bind(value.code.as_deref().unwrap_or_default());
                one.push(match &value.system {
                    SystemMatch::Any => format!("{name} = {code}"),
                    SystemMatch::NoSystem => {
                        format!("({name} = {code} AND {system_column} IS NULL)")
                    }
                    SystemMatch::Exact(system) => {
                        format!(
                            "({name} = {code} AND {system_column} = {})",
                            writer.bind(system)
                        )
                    }
                });
            }
            one.join(" OR ")
        };
        // Each part is written (and so bound) in the order of the text.
        match self.arm {
            Arm::Both => {
                let codes = codes(self);
                let several = several(self);
                let one = one(self);
                format!(
                    "{name} IN ({codes}, '{SEVERAL}') AND CASE WHEN {name} = '{SEVERAL}' \
                     THEN {several} ELSE ({one}) END"
                )
            }
            Arm::One => {
                let codes = codes(self);
                format!("{name} IN ({codes}) AND ({})", one(self))
            }
            Arm::Several => format!("{name} = '{SEVERAL}' AND {}", several(self)),
        }
    }

    /// Any token predicate on a column, codes or not: true when some value of the Task
    /// matches one of `any_of`, false or NULL otherwise. (The forms the indexes serve best
    /// are written by `token_column` and `token_column_negated`.)
    fn token_column_any(
        &mut self,
        param: &str,
        column: &TokenColumn,
        any_of: &[TokenValue],
    ) -> String {
        let name = column.name;
        let accepted: Vec<&TokenValue> = any_of
            .iter()
            .filter(|value| column.system.may_hold(&value.system))
            .collect();
        if accepted.is_empty() {
            return "0=1".to_string();
        }
        let ColumnSystem::Own(system_column) = column.system else {
            // The system is the parameter's own, checked above: only the code is left.
            let parts: Vec<String> = accepted
                .iter()
                .map(|value| match value.code.as_deref() {
                    Some(code) => format!("{name} = {}", self.bind(code)),
                    None => format!("{name} IS NOT NULL"),
                })
                .collect();
            return format!("({})", parts.join(" OR "));
        };
        let param_bind = self.bind(param);
        let values = self.token_values(any_of);
        let mut one = Vec::new();
        for value in &accepted {
            // Bound in the order of the text: the code, then the system.
            let code = match value.code.as_deref() {
                Some(code) => format!("{name} = {}", self.bind(code)),
                None => format!("{name} IS NOT NULL"),
            };
            let system = match &value.system {
                SystemMatch::Any => None,
                SystemMatch::NoSystem => Some(format!("{system_column} IS NULL")),
                SystemMatch::Exact(system) => {
                    Some(format!("{system_column} = {}", self.bind(system)))
                }
            };
            one.push(match system {
                Some(system) => format!("({code} AND {system})"),
                None => code,
            });
        }
        format!(
            "CASE WHEN {name} = '{SEVERAL}' THEN EXISTS (SELECT 1 FROM task_token \
             WHERE task_id = t.id AND param = {param_bind} AND {values}) ELSE ({}) END",
            one.join(" OR ")
        )
    }

    /// `:not` on a single-valued column with a fixed system: no value of the Task is one of the
    /// codes. `status` always has one of the statuses Task allows (the validator refuses any
    /// other), so its negation is the list of the other statuses, which its index serves.
    fn token_column_negated(&mut self, column: &TokenColumn, any_of: &[TokenValue]) -> String {
        let name = column.name;
        let excluded: Vec<&str> = any_of
            .iter()
            .filter(|value| column.system.may_hold(&value.system))
            .filter_map(|value| value.code.as_deref())
            .collect();
        if excluded.is_empty() {
            return "1=1".to_string();
        }
        if let Some(allowed) = column.allowed {
            let rest: Vec<&str> = allowed
                .iter()
                .copied()
                .filter(|code| !excluded.contains(code))
                .collect();
            if rest.is_empty() {
                return "0=1".to_string();
            }
            // What is left after a negation is most of the Tasks, so on SQLite, which plans
            // without statistics, the term is kept from choosing the index (a unary `+`):
            // a date range or a sort order then serves the search instead of a walk through
            // most of the table. There the codes excluded are named instead of the ones left:
            // the column holds only allowed codes or nothing, so both say the same, and a
            // walk checks every index entry it passes against one code rather than against
            // an eleven-code list (an owner's count at 1 000 000 Tasks passes ~700 entries;
            // BENCHMARKS.md, issue 16, seventh sitting). PostgreSQL weighs the list by its
            // statistics and keeps it.
            if self.style == Placeholder::Question {
                let codes: Vec<String> = excluded.iter().map(|code| self.bind(code)).collect();
                return format!("+{name} NOT IN ({})", codes.join(", "));
            }
            let codes: Vec<String> = rest.iter().map(|code| self.bind(code)).collect();
            return format!("{name} IN ({})", codes.join(", "));
        }
        let codes: Vec<String> = excluded.iter().map(|code| self.bind(code)).collect();
        format!("({name} IS NULL OR {name} NOT IN ({}))", codes.join(", "))
    }

    /// The OR of the token values. Plain codes (any system) are gathered into one
    /// `value IN (…)`, the common case and the one the index serves best.
    fn token_values(&mut self, any_of: &[TokenValue]) -> String {
        let mut parts = Vec::new();
        let plain: Vec<&str> = any_of
            .iter()
            .filter(|v| v.system == SystemMatch::Any)
            .filter_map(|v| v.code.as_deref())
            .collect();
        if !plain.is_empty() {
            let placeholders: Vec<String> = plain.iter().map(|code| self.bind(code)).collect();
            parts.push(format!("value IN ({})", placeholders.join(", ")));
        }
        for value in any_of {
            let system = match &value.system {
                SystemMatch::Any if value.code.is_some() => continue,
                SystemMatch::Any => None,
                SystemMatch::NoSystem => Some("system IS NULL".to_string()),
                SystemMatch::Exact(system) => Some(format!("system = {}", self.bind(system))),
            };
            let code = value
                .code
                .as_deref()
                .map(|code| format!("value = {}", self.bind(code)));
            parts.push(match (system, code) {
                (Some(system), Some(code)) => format!("({system} AND {code})"),
                (Some(only), None) | (None, Some(only)) => only,
                (None, None) => "1=1".to_string(),
            });
        }
        if parts.is_empty() {
            "0=1".to_string()
        } else {
            format!("({})", parts.join(" OR "))
        }
    }

    /// The prefix semantics of `DateComparison::matches`, on the range `[start, end)` held in
    /// the columns `start` and `end`, against the search range `[a, b)`.
    fn date_condition(&mut self, comparison: &DateComparison, start: &str, end: &str) -> String {
        let (a, b) = (comparison.start.as_str(), comparison.end.as_str());
        match comparison.prefix {
            Prefix::Eq => format!(
                "({start} >= {} AND {end} <= {})",
                self.bind(a),
                self.bind(b)
            ),
            Prefix::Ne => format!(
                "NOT ({start} >= {} AND {end} <= {})",
                self.bind(a),
                self.bind(b)
            ),
            Prefix::Gt => format!("{end} > {}", self.bind(b)),
            Prefix::Lt => format!("{start} < {}", self.bind(a)),
            Prefix::Ge => format!("{end} > {}", self.bind(a)),
            Prefix::Le => format!("{start} < {}", self.bind(b)),
            Prefix::Sa => format!("{start} >= {}", self.bind(b)),
            Prefix::Eb => format!("{end} <= {}", self.bind(a)),
            Prefix::Ap => format!("({start} < {} AND {end} > {})", self.bind(b), self.bind(a)),
        }
    }
}

impl Writer {
    /// `date_condition` on the range of a stored instant held in the column `name`: the range
    /// `[s, s + 1 ms)` of the instant `s` (`fhir::datetime::parse_range`). Every key counts
    /// whole milliseconds (the search's `[a, b)` too), so `s + 1 ms > x` is `s >= x` and
    /// `s + 1 ms <= x` is `s < x`, and each prefix is a comparison of the column itself,
    /// which an index on it (`task (last_updated, id)`) serves.
    fn instant_condition(&mut self, comparison: &DateComparison, name: &str) -> String {
        let (a, b) = (comparison.start.as_str(), comparison.end.as_str());
        match comparison.prefix {
            Prefix::Eq => format!("({name} >= {} AND {name} < {})", self.bind(a), self.bind(b)),
            Prefix::Ne => format!(
                "NOT ({name} >= {} AND {name} < {})",
                self.bind(a),
                self.bind(b)
            ),
            // The open side is closed at the first or the last key, which every instant lies
            // within: SQLite, planning without statistics, takes a range bounded on both
            // sides to be narrow and searches the index for it, where it would scan a
            // covering work-list index for a range open on one side.
            Prefix::Gt | Prefix::Sa => {
                format!("({name} >= {} AND {name} <= '{MAX_KEY}')", self.bind(b))
            }
            Prefix::Lt | Prefix::Eb => {
                format!("({name} < {} AND {name} >= '{MIN_KEY}')", self.bind(a))
            }
            Prefix::Ge => format!("({name} >= {} AND {name} <= '{MAX_KEY}')", self.bind(a)),
            Prefix::Le => format!("({name} < {} AND {name} >= '{MIN_KEY}')", self.bind(b)),
            Prefix::Ap => format!("({name} < {} AND {name} >= {})", self.bind(b), self.bind(a)),
        }
    }
}

/// How the system of a token kept in a column is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnSystem {
    /// Every value of the parameter has this system (or none).
    Fixed(Option<&'static str>),
    /// The system is in this column of its own.
    Own(&'static str),
}

impl ColumnSystem {
    /// Whether a value with this system may be in the column at all.
    fn may_hold(self, wanted: &SystemMatch) -> bool {
        match (self, wanted) {
            (_, SystemMatch::Any) | (ColumnSystem::Own(_), _) => true,
            (ColumnSystem::Fixed(fixed), SystemMatch::NoSystem) => fixed.is_none(),
            (ColumnSystem::Fixed(fixed), SystemMatch::Exact(system)) => {
                fixed == Some(system.as_str())
            }
        }
    }
}

/// A token parameter kept in a column of the Task row (see `fhir::search::TaskColumns`).
#[derive(Debug, Clone, Copy)]
struct TokenColumn {
    name: &'static str,
    system: ColumnSystem,
    /// Every code the column can hold, when the validator limits them.
    allowed: Option<&'static [&'static str]>,
}

/// A work-list parameter kept on the Task row.
#[derive(Debug, Clone, Copy)]
enum Column {
    Token(TokenColumn),
    Date {
        start: &'static str,
        end: &'static str,
    },
    /// A stored instant (`_lastUpdated`): one value per Task, its range one millisecond wide.
    Instant(&'static str),
}

/// The column of a work-list parameter, if it has one.
fn column_of(param: &str) -> Option<Column> {
    Some(match param {
        "status" => Column::Token(TokenColumn {
            name: "t.status",
            system: ColumnSystem::Fixed(Some(STATUS_SYSTEM)),
            allowed: Some(TASK_STATUSES),
        }),
        "owner" => Column::Token(TokenColumn {
            name: "t.owner",
            system: ColumnSystem::Fixed(None),
            allowed: None,
        }),
        "performer" => Column::Token(TokenColumn {
            name: "t.performer",
            system: ColumnSystem::Own("t.performer_system"),
            allowed: None,
        }),
        "due-date" => Column::Date {
            start: "t.due_start",
            end: "t.due_end",
        },
        // The row's own key and instant (`fhir::search::ON_THE_ROW`): no index rows.
        "_id" => Column::Token(TokenColumn {
            name: "t.id",
            system: ColumnSystem::Fixed(None),
            allowed: None,
        }),
        "_lastUpdated" => Column::Instant("t.last_updated"),
        _ => return None,
    })
}

/// Whether every value names a code (`system|` alone is left to the index table).
fn has_codes(any_of: &[TokenValue]) -> bool {
    any_of.iter().all(|value| value.code.is_some())
}

/// The statements of a page of search results: the count of the matches (if asked for), and
/// the page of current Tasks (`CURRENT_COLUMNS`, then each sort value as text, `sort_0`, …),
/// sorted; the page's size and then its offset are bound after `binds`, by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSql {
    pub count: Option<String>,
    /// The binds of `count`.
    pub count_binds: Vec<String>,
    pub rows: String,
    /// The binds of `rows`, before its page size and offset.
    pub binds: Vec<String>,
}

/// How `PageSql::rows` ends: the page size and offset, as placeholders.
const WINDOW_PLACEHOLDERS: &str = " LIMIT ? OFFSET ?";

impl PageSql {
    /// `rows` with the page size and offset written into the text (`?` placeholders only),
    /// for SQLite. SQLite plans with the value bound to a `LIMIT ?`, so it marks that
    /// parameter, and any later bind of it, even of the same value, expires the statement:
    /// every search re-prepared its page statement at its first step (13 % of the server's
    /// CPU in a profile of the work-list mix, BENCHMARKS.md, issue 16). With the numbers in
    /// the text, a prepared statement is used again as it is. Both are Baton's own numbers
    /// (the capped `_count`, the offset), and a work list asks the same few.
    pub fn rows_with_window(&self, count: usize, offset: usize) -> Result<String> {
        let rows = self.rows.strip_suffix(WINDOW_PLACEHOLDERS).ok_or_else(|| {
            Error::internal(
                "a search page's statement does not end in its window",
                self.rows.clone(),
            )
        })?;
        Ok(format!("{rows} LIMIT {count} OFFSET {offset}"))
    }
}

/// What a page of search results is: its criteria, its order, where it starts and how its
/// matches are counted.
#[derive(Debug, Clone, Copy)]
pub struct PageSpec<'a> {
    pub predicates: &'a [Predicate],
    pub sort: &'a [SortKey],
    /// The sort values of the Task the page starts after (a keyset cursor).
    pub after: Option<&'a [Option<String>]>,
    pub counting: Counting,
}

/// The statements of a search for live Tasks matching `predicates`, sorted by `sort`. A
/// cursor (`after`) that does not fit the sort is a 400: it was made for another search or
/// altered.
pub fn page_sql(spec: PageSpec<'_>, style: Placeholder) -> Result<PageSql> {
    let terms = sort_terms(spec.sort, spec.predicates);
    let writer = |arm| Writer {
        style,
        next: 1,
        binds: Vec::new(),
        arm,
    };
    let matches = |filter: &str| format!("FROM task t WHERE t.deleted = 0 AND ({filter})");
    let mut counter = writer(Arm::Both);
    let counted = matches(&counter.all(spec.predicates));
    let count = match spec.counting {
        Counting::Skip => None,
        Counting::All => Some(format!("SELECT count(*) {counted}")),
        // The limit is a number of Baton's, not a client's value.
        Counting::UpTo(limit) => Some(format!(
            "SELECT count(*) FROM (SELECT 1 {counted} LIMIT {}) AS counted",
            limit.saturating_add(1)
        )),
    };
    let sort_values: String = terms
        .iter()
        .enumerate()
        .map(|(i, term)| format!(", CAST({} AS TEXT) AS sort_{i}", term.expression))
        .collect();
    let arms = if requires_several_column(spec.predicates) {
        vec![Arm::One, Arm::Several]
    } else {
        vec![Arm::Both]
    };
    // Two arms are merged by the raw sort values (`order_{i}`), which each arm selects: their
    // text forms (`sort_{i}`) would sort integers as text.
    let (order_values, order): (String, Vec<String>) = if arms.len() > 1 {
        (
            terms
                .iter()
                .enumerate()
                .map(|(i, term)| format!(", {} AS order_{i}", term.expression))
                .collect(),
            terms
                .iter()
                .enumerate()
                .map(|(i, term)| term.order_as(&format!("order_{i}")))
                .collect(),
        )
    } else {
        (String::new(), terms.iter().map(SortTerm::order).collect())
    };
    let mut rows = writer(Arm::Both);
    let mut selects = Vec::new();
    for arm in &arms {
        rows.arm = *arm;
        let filter = rows.all(spec.predicates);
        let after = match spec.after {
            Some(values) => format!(" AND {}", rows.after(&terms, values)?),
            None => String::new(),
        };
        selects.push(format!(
            "SELECT {CURRENT_COLUMNS}{sort_values}{order_values} {}{after}",
            matches(&filter)
        ));
    }
    let (limit, offset) = (rows.placeholder(), rows.placeholder());
    // PostgreSQL (15) sorts the whole of a UNION ALL under an ORDER BY … LIMIT instead of
    // merging its arms in order: each arm read every Task of the queue (1 800 at 1 000 000
    // Tasks, 35 ms) to return 50. An arm that is ordered and limited itself walks its index
    // and stops, and the arms are then merged (Merge Append). SQLite merges a compound
    // SELECT's arms in order by itself, and its `?` cannot be bound twice.
    if arms.len() > 1 && style == Placeholder::Dollar {
        let arm_order: Vec<String> = terms.iter().map(SortTerm::order).collect();
        for (k, select) in selects.iter_mut().enumerate() {
            *select = format!(
                "SELECT * FROM ({select} ORDER BY {} LIMIT CAST({limit} AS bigint) + CAST({offset} AS bigint)) AS arm_{k}",
                arm_order.join(", ")
            );
        }
    }
    Ok(PageSql {
        count,
        count_binds: counter.binds,
        rows: format!(
            "{} ORDER BY {} LIMIT {limit} OFFSET {offset}",
            selects.join(" UNION ALL "),
            order.join(", ")
        ),
        binds: rows.binds,
    })
}

/// Whether the ANDed predicates require a value of a token column with a system of its own
/// (`performer=…`), whose Tasks are then read in two arms (see `Arm`).
fn requires_several_column(predicates: &[Predicate]) -> bool {
    predicates.iter().any(|predicate| match predicate {
        Predicate::Token {
            param,
            negated: false,
            any_of,
        } => {
            matches!(
                column_of(param),
                Some(Column::Token(TokenColumn {
                    system: ColumnSystem::Own(_),
                    ..
                }))
            ) && has_codes(any_of)
        }
        Predicate::And(all) => requires_several_column(all),
        _ => false,
    })
}

/// How many sort values a page's rows carry (`sort_0`, …) for these sort keys.
pub fn sort_value_count(sort: &[SortKey]) -> usize {
    sort_terms(sort, &[]).len()
}

impl Writer {
    /// The keyset condition "after the row with these sort values" in the order of `terms`:
    /// some term is past its value and every term before it equal to its own. The first term
    /// is also bounded on its own (`>=` or `<=`), which an index on it serves as a range.
    fn after(&mut self, terms: &[SortTerm], values: &[Option<String>]) -> Result<String> {
        if values.len() != terms.len() {
            return Err(bad_cursor("it was made for another sort order"));
        }
        for (term, value) in terms.iter().zip(values) {
            match value {
                None if !term.nullable => return Err(bad_cursor("a sort value is missing")),
                Some(text) if term.integer && text.parse::<i64>().is_err() => {
                    return Err(bad_cursor("a sort value is not a number"));
                }
                _ => {}
            }
        }
        // Written first, so bound first: the binds follow the text.
        let first = &terms[0];
        let bound = match values[0].as_deref() {
            Some(value) if !first.nullable => {
                let operator = if first.descending { "<=" } else { ">=" };
                let value = self.sort_value(first, value);
                format!("{} {operator} {value} AND ", first.expression)
            }
            _ => String::new(),
        };
        let mut alternatives = Vec::new();
        for i in 0..terms.len() {
            let mut parts = Vec::new();
            for (term, value) in terms[..i].iter().zip(values) {
                parts.push(self.equal(term, value.as_deref()));
            }
            parts.push(self.past(&terms[i], values[i].as_deref()));
            alternatives.push(format!("({})", parts.join(" AND ")));
        }
        Ok(format!("{bound}({})", alternatives.join(" OR ")))
    }

    /// A bound sort value, as an integer where the term is one.
    fn sort_value(&mut self, term: &SortTerm, value: &str) -> String {
        let placeholder = self.bind(value);
        match (term.integer, self.style) {
            (false, _) => placeholder,
            (true, Placeholder::Question) => format!("CAST({placeholder} AS INTEGER)"),
            (true, Placeholder::Dollar) => format!("CAST({placeholder} AS bigint)"),
        }
    }

    fn equal(&mut self, term: &SortTerm, value: Option<&str>) -> String {
        match value {
            Some(value) => format!("{} = {}", term.expression, self.sort_value(term, value)),
            None => format!("{} IS NULL", term.expression),
        }
    }

    /// Strictly after `value` in the term's order; Tasks without a value come last.
    fn past(&mut self, term: &SortTerm, value: Option<&str>) -> String {
        let Some(value) = value else {
            return "0=1".to_string();
        };
        let operator = if term.descending { "<" } else { ">" };
        let value = self.sort_value(term, value);
        if term.nullable {
            format!("({0} {operator} {value} OR {0} IS NULL)", term.expression)
        } else {
            format!("{} {operator} {value}", term.expression)
        }
    }
}

fn bad_cursor(why: &str) -> Error {
    Error::bad_request(
        IssueCode::Invalid,
        format!(
            "The value of '_cursor' is not a cursor of this search: {why}. Follow the 'next' \
             link of a page as it is, or start again without '_cursor'"
        ),
    )
}

/// The statement of the live Tasks whose `partOf` names one of `parents` (as `Task/id`) and
/// that match `scope`, oldest first; how many at most is bound after the filter's binds, by
/// the caller.
pub fn children_sql(parents: &[String], scope: &[Predicate], style: Placeholder) -> SqlFilter {
    let mut writer = Writer {
        style,
        next: 1,
        binds: Vec::new(),
        arm: Arm::Both,
    };
    let parents: Vec<String> = parents.iter().map(|p| writer.bind(p)).collect();
    let filter = writer.all(scope);
    let limit = writer.placeholder();
    SqlFilter {
        sql: format!(
            "SELECT {CURRENT_COLUMNS} FROM task t WHERE t.deleted = 0
               AND t.id IN (SELECT task_id FROM task_token WHERE param = 'part-of' AND value IN ({}))
               AND ({filter}) ORDER BY t.last_updated, t.id LIMIT {limit}",
            parents.join(", ")
        ),
        binds: writer.binds,
    }
}

fn membership(negated: bool, subquery: &str) -> String {
    if negated {
        format!("t.id NOT IN ({subquery})")
    } else {
        format!("t.id IN ({subquery})")
    }
}

/// One term of a search's order: an expression over the task table `t` and its direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortTerm {
    pub expression: String,
    pub descending: bool,
    /// Whether some matching Task may have no value (NULL), which sorts last either way.
    pub nullable: bool,
    /// Whether the values are integers (a cursor carries them as text).
    pub integer: bool,
}

impl SortTerm {
    fn new(expression: impl Into<String>, descending: bool) -> SortTerm {
        SortTerm {
            expression: expression.into(),
            descending,
            nullable: false,
            integer: false,
        }
    }

    /// The term as ORDER BY writes it; NULLS LAST is spelled out where it matters, because
    /// SQLite and PostgreSQL disagree by default, and only there, because a database that
    /// must put NULLs last against its index order sorts instead of walking the index.
    fn order(&self) -> String {
        self.order_as(&self.expression)
    }

    /// The term's direction applied to another expression (a result column of a merge).
    fn order_as(&self, expression: &str) -> String {
        let direction = if self.descending { "DESC" } else { "ASC" };
        if self.nullable {
            format!("{expression} {direction} NULLS LAST")
        } else {
            format!("{expression} {direction}")
        }
    }
}

/// The terms of a search's order for the sort keys, ending in `t.id` so that the order is
/// total and pages never overlap or skip (without keys: `t.last_updated, t.id`). Work-list parameters sort by their
/// column (`column_of`), which an index walks; the others by the smallest indexed value.
/// `predicates` tell which sort values every match has (a date criterion on the parameter
/// excludes Tasks without one), which spares the NULLS LAST that would stop an index walk.
pub fn sort_terms(sort: &[SortKey], predicates: &[Predicate]) -> Vec<SortTerm> {
    let mut terms = Vec::new();
    for key in sort {
        let descending = key.descending;
        match key.param {
            "_id" => {
                // Ids are unique, so nothing after this key can change the order.
                terms.push(SortTerm::new("t.id", descending));
                return terms;
            }
            "_lastUpdated" => terms.push(SortTerm::new("t.last_updated", descending)),
            "priority" => terms.push(SortTerm {
                integer: true,
                ..SortTerm::new("t.priority_rank", descending)
            }),
            // Every Task has a status (the validator requires one).
            "status" => terms.push(SortTerm::new("t.status", descending)),
            "due-date" | "authored-on" => {
                let column = if key.param == "due-date" {
                    "t.due_start"
                } else {
                    "t.authored_on"
                };
                terms.push(SortTerm {
                    nullable: !always_present(predicates, key.param),
                    ..SortTerm::new(column, descending)
                });
            }
            other => {
                // The parameter code is spliced into the SQL, so it must come from Baton's own
                // table; a key that does not name a parameter is skipped.
                let Some(def) = task_param(other) else {
                    continue;
                };
                let expression = match def.kind {
                    ParamType::Date => format!(
                        "(SELECT min(d.start_at) FROM task_date d WHERE d.task_id = t.id AND d.param = '{}')",
                        def.code
                    ),
                    ParamType::Token | ParamType::Reference => format!(
                        "(SELECT min(k.value) FROM task_token k WHERE k.task_id = t.id AND k.param = '{}')",
                        def.code
                    ),
                };
                terms.push(SortTerm {
                    nullable: true,
                    ..SortTerm::new(expression, descending)
                });
            }
        }
    }
    // Without a sort key of the client's, oldest change first. After the client's keys the
    // tie-break is the id alone: a page's `next` link starts after its last Task's sort
    // values, and a tie-break on the last change would bring back a Task of an earlier page
    // whose change (a status update, a note) moved it past that point while the client paged.
    if terms.is_empty() {
        terms.push(SortTerm::new("t.last_updated", false));
    }
    terms.push(SortTerm::new("t.id", false));
    terms
}

/// Whether the ANDed predicates let through only Tasks that have a value of `param`: a date
/// criterion on it (no comparison holds for a missing value), or `:missing=false`.
fn always_present(predicates: &[Predicate], param: &str) -> bool {
    predicates.iter().any(|predicate| match predicate {
        Predicate::Date { param: p, .. } => *p == param,
        Predicate::Missing { param: p, missing } => *p == param && !missing,
        Predicate::And(all) => always_present(all, param),
        _ => false,
    })
}

/// The content of an ORDER BY clause for the sort keys (see `sort_terms`).
pub fn order_by(sort: &[SortKey], predicates: &[Predicate]) -> String {
    sort_terms(sort, predicates)
        .iter()
        .map(SortTerm::order)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::MULTI_FOCUS_EXTENSION;
    use crate::fhir::search::{
        Handling, SearchLimits, TaskColumns, TaskIndex, TokenValue, index_task, matches,
        parse_query, priority_rank,
    };
    use serde_json::{Value, json};
    use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
    use sqlx::{AssertSqlSafe, Row};
    use std::cmp::Ordering;

    const BASE: &str = "http://baton.test/fhir";

    fn pick<T: Clone>(options: &[T], i: usize) -> T {
        options[i % options.len()].clone()
    }

    /// Thirty Tasks that between them use every parameter with and without systems, with
    /// absent elements, absolute references, multi-focus extensions, dates of every precision
    /// and open periods. Pairs of Tasks share a `lastUpdated` so that the tiebreak is exercised.
    fn fleet() -> Vec<Value> {
        (0..30)
            .map(|i| {
                let mut task = json!({
                    "resourceType": "Task",
                    "id": format!("t{i:02}"),
                    "meta": { "lastUpdated": format!("2024-01-{:02}T08:00:00.000Z", 1 + i / 2) },
                    "status": pick(&["draft", "requested", "received", "accepted", "ready",
                        "in-progress", "on-hold", "completed", "cancelled", "failed"], i),
                    "intent": pick(&["order", "plan", "proposal"], i),
                });
                if let Some(priority) = pick(&[None, Some("routine"), Some("urgent"), Some("asap"), Some("stat")], i) {
                    task["priority"] = json!(priority);
                }
                if let Some(owner) = pick(&[None, Some("Practitioner/1"), Some("Practitioner/2"),
                    Some("http://baton.test/fhir/Organization/1"),
                    Some("https://other.example/fhir/Practitioner/1"), Some("PractitionerRole/1/_history/4")], i)
                {
                    task["owner"] = json!({ "reference": owner });
                }
                if let Some(subject) = pick(&[None, Some("Patient/p1"), Some("Patient/p2"), Some("Group/g1"),
                    Some("http://baton.test/fhir/Patient/p1")], i)
                {
                    task["for"] = json!({ "reference": subject });
                }
                if i % 3 == 0 {
                    task["focus"] = json!({ "reference": format!("ServiceRequest/sr{}", i % 4) });
                }
                if i % 5 == 1 {
                    task["extension"] = json!([
                        { "url": MULTI_FOCUS_EXTENSION, "valueReference": { "reference": "ServiceRequest/sr9" } },
                        { "url": MULTI_FOCUS_EXTENSION, "valueReference": { "reference": format!("MedicationRequest/m{}", i % 2) } },
                        { "url": "urn:not-focus", "valueReference": { "reference": "ServiceRequest/sr8" } },
                    ]);
                }
                if i >= 3 && i % 3 == 1 {
                    task["partOf"] = json!([{ "reference": format!("Task/t{:02}", i / 3) }]);
                }
                if i % 4 == 2 {
                    task["basedOn"] = json!([{ "reference": "ServiceRequest/sr1" }, { "reference": "CarePlan/cp1" }]);
                }
                if i % 2 == 0 {
                    task["requester"] = json!({ "reference": "Practitioner/dr" });
                } else if i % 7 == 1 {
                    task["requester"] = json!({ "reference": "Organization/1" });
                }
                match i % 3 {
                    0 => task["code"] = json!({ "coding": [{ "system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill" }] }),
                    1 => task["code"] = json!({ "coding": [{ "system": "urn:local", "code": "review" }, { "code": "Fulfill" }] }),
                    _ => {}
                }
                match i % 4 {
                    1 => task["businessStatus"] = json!({ "coding": [{ "system": "urn:bs", "code": "waiting" }] }),
                    2 => task["businessStatus"] = json!({ "coding": [{ "code": "waiting" }] }),
                    3 => task["businessStatus"] = json!({ "coding": [{ "system": "urn:bs", "code": "done" }] }),
                    _ => {}
                }
                match i % 3 {
                    0 => task["performerType"] = json!([{ "coding": [{ "system": "urn:roles", "code": "nurse" }] }]),
                    1 => task["performerType"] = json!([
                        { "coding": [{ "system": "urn:roles", "code": "pharmacist" }] },
                        { "coding": [{ "code": "clerk" }] },
                    ]),
                    _ => {}
                }
                let mut identifiers = Vec::new();
                if i % 2 == 0 {
                    identifiers.push(json!({ "system": "urn:ids", "value": format!("A-{i}") }));
                }
                if i % 5 == 0 {
                    identifiers.push(json!({ "value": "loose" }));
                }
                if !identifiers.is_empty() {
                    task["identifier"] = json!(identifiers);
                }
                let authored = [
                    None,
                    Some("2024-02".to_string()),
                    Some(format!("2024-02-{:02}", 10 + i % 10)),
                    Some(format!("2024-02-{:02}T01:30:00+02:00", 10 + i % 10)),
                    Some("2024-03-01T00:00:00Z".to_string()),
                    Some("2023".to_string()),
                ];
                if let Some(authored) = pick(&authored, i) {
                    task["authoredOn"] = json!(authored);
                }
                if i % 3 != 0 {
                    task["lastModified"] = json!(format!("2024-02-{:02}T12:00:00Z", 1 + i % 25));
                }
                let start = format!("2024-04-{:02}", 1 + i % 20);
                let end = format!("2024-05-{:02}T18:00:00Z", 1 + i % 20);
                match i % 5 {
                    1 => task["executionPeriod"] = json!({ "start": start }),
                    2 => task["executionPeriod"] = json!({ "end": end }),
                    3 => task["executionPeriod"] = json!({ "start": start, "end": end }),
                    4 => task["executionPeriod"] = json!({}),
                    _ => {}
                }
                if i % 4 == 3 {
                    task["restriction"] = json!({ "period": { "end": format!("2024-03-{:02}", 1 + i % 28) } });
                }
                task
            })
            .collect()
    }

    /// Tasks that exist but are deleted; no search may return them.
    const DELETED: &[&str] = &["t07", "t20"];

    struct Indexed {
        id: String,
        last_updated: String,
        rank: i64,
        deleted: bool,
        index: TaskIndex,
    }

    async fn load(pool: &SqlitePool) -> Vec<Indexed> {
        // The real schema, so that the statements meet the columns and indexes they will in use.
        sqlx::migrate!("migrations/sqlite").run(pool).await.unwrap();
        let mut loaded = Vec::new();
        for task in fleet() {
            let id = task["id"].as_str().unwrap().to_string();
            let last_updated = task["meta"]["lastUpdated"].as_str().unwrap().to_string();
            let deleted = DELETED.contains(&id.as_str());
            let index = index_task(&task, BASE);
            let c = TaskColumns::from_index(&index);
            sqlx::query(
                "INSERT INTO task (id, version, last_updated, deleted, priority_rank, resource,
                   status, owner, performer, performer_system, due_start, due_end, authored_on)
                 VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(&id)
            .bind(&last_updated)
            .bind(i64::from(deleted))
            .bind(priority_rank(&task))
            .bind(task.to_string())
            .bind(&c.status)
            .bind(&c.owner)
            .bind(&c.performer)
            .bind(&c.performer_system)
            .bind(&c.due_start)
            .bind(&c.due_end)
            .bind(&c.authored_on)
            .execute(pool)
            .await
            .unwrap();
            // As the store writes them: the index rows hold what the columns do not.
            let rows = c.rows_beside(&index);
            for entry in &rows.tokens {
                sqlx::query(
                    "INSERT INTO task_token (task_id, param, system, value) VALUES (?, ?, ?, ?)",
                )
                .bind(&id)
                .bind(entry.param)
                .bind(entry.system.as_deref())
                .bind(&entry.value)
                .execute(pool)
                .await
                .unwrap();
            }
            for entry in &rows.dates {
                sqlx::query(
                    "INSERT INTO task_date (task_id, param, start_at, end_at) VALUES (?, ?, ?, ?)",
                )
                .bind(&id)
                .bind(entry.param)
                .bind(&entry.start)
                .bind(&entry.end)
                .execute(pool)
                .await
                .unwrap();
            }
            loaded.push(Indexed {
                id,
                last_updated,
                rank: priority_rank(&task),
                deleted,
                index,
            });
        }
        loaded
    }

    /// A query string's `name=value` pairs, as the API hands them to `parse_query`.
    pub(super) fn pairs(query: &str) -> Vec<(String, String)> {
        query
            .split('&')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
    enum SortValue {
        Rank(i64),
        Text(String),
    }

    /// What a sort key sorts a Task by, computed from the index as the SQL computes it from
    /// the tables: the smallest value, with Tasks lacking one last in either direction.
    fn sort_value(task: &Indexed, key: &SortKey) -> Option<SortValue> {
        match key.param {
            "_id" => Some(SortValue::Text(task.id.clone())),
            "_lastUpdated" => Some(SortValue::Text(task.last_updated.clone())),
            "priority" => Some(SortValue::Rank(task.rank)),
            param => match task_param(param).unwrap().kind {
                ParamType::Date => task
                    .index
                    .dates
                    .iter()
                    .filter(|d| d.param == param)
                    .map(|d| d.start.clone())
                    .min(),
                _ => task
                    .index
                    .tokens
                    .iter()
                    .filter(|t| t.param == param)
                    .map(|t| t.value.clone())
                    .min(),
            }
            .map(SortValue::Text),
        }
    }

    fn expected_order(tasks: &[&Indexed], sort: &[SortKey]) -> Vec<String> {
        let mut sorted = tasks.to_vec();
        sorted.sort_by(|a, b| {
            for key in sort {
                let ordering = match (sort_value(a, key), sort_value(b, key)) {
                    (Some(x), Some(y)) if key.descending => y.cmp(&x),
                    (Some(x), Some(y)) => x.cmp(&y),
                    (Some(_), None) => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (None, None) => Ordering::Equal,
                };
                if ordering != Ordering::Equal {
                    return ordering;
                }
            }
            a.last_updated
                .cmp(&b.last_updated)
                .then_with(|| a.id.cmp(&b.id))
        });
        sorted.into_iter().map(|t| t.id.clone()).collect()
    }

    async fn sql_ids(
        pool: &SqlitePool,
        predicates: &[Predicate],
        sort: &[SortKey],
        style: Placeholder,
    ) -> Vec<String> {
        let (deleted, first_bind) = match style {
            Placeholder::Question => ("0", 1),
            // `$1` is taken by the caller's own bind, as a PostgreSQL store would do.
            Placeholder::Dollar => ("$1", 2),
        };
        let filter = where_clause(predicates, style, first_bind);
        let sql = format!(
            "SELECT t.id FROM task t WHERE t.deleted = {deleted} AND ({}) ORDER BY {}",
            filter.sql,
            order_by(sort, predicates)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql.clone()));
        if style == Placeholder::Dollar {
            query = query.bind(0_i64);
        }
        for bind in &filter.binds {
            query = query.bind(bind);
        }
        let rows = query
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.iter().map(|row| row.get::<String, _>(0)).collect()
    }

    const QUERIES: &[&str] = &[
        "_id=t01,t05,t07",
        "_id:not=t01",
        "status=ready",
        "status=ready,in-progress,completed",
        "status=http://hl7.org/fhir/task-status|draft",
        "status=urn:wrong|draft",
        "status:not=draft,failed",
        "business-status=waiting",
        "business-status=urn:bs|waiting",
        "business-status=|waiting",
        "business-status=urn:bs|",
        "business-status:not=urn:bs|done",
        "business-status:missing=true",
        "owner=Practitioner/1",
        "owner=1",
        "owner=http://baton.test/fhir/Organization/1",
        "owner=https://other.example/fhir/Practitioner/1",
        "owner:PractitionerRole=1",
        "owner:not=Practitioner/1",
        "owner:missing=true",
        "performer=nurse,clerk",
        "performer=|clerk",
        "performer=urn:roles|pharmacist",
        "performer:missing=false",
        "patient=p1",
        "patient:missing=true",
        "subject=Group/g1",
        "subject=p2",
        "focus=sr9",
        "focus=ServiceRequest/sr0,MedicationRequest/m1",
        "focus=ServiceRequest/sr8",
        "focus:missing=true",
        "part-of=t01",
        "part-of:missing=false",
        "based-on=CarePlan/cp1",
        "requester=Organization/1",
        "requester:not=Practitioner/dr",
        "code=fulfill",
        "code=Fulfill",
        "code=http://hl7.org/fhir/CodeSystem/task-code|fulfill",
        "priority=stat,asap",
        "priority:missing=true",
        "priority:not=routine",
        "intent=plan",
        "identifier=urn:ids|A-4",
        "identifier=loose",
        "identifier=|loose",
        "_lastUpdated=2024-01-03",
        "_lastUpdated=ge2024-01-10",
        "_lastUpdated=lt2024-01-05T08:00:00Z",
        // `_lastUpdated` is the row's instant (`Column::Instant`): every prefix at the
        // millisecond of some Tasks' instant and next to it, where `[s, s + 1 ms)` and the
        // comparisons of `s` alone must agree.
        "_lastUpdated=2024-01-03T08:00:00.000Z",
        "_lastUpdated=ne2024-01-03T08:00:00.000Z",
        "_lastUpdated=gt2024-01-03T08:00:00.000Z",
        "_lastUpdated=gt2024-01-03T07:59:59.999Z",
        "_lastUpdated=ge2024-01-03T08:00:00.001Z",
        "_lastUpdated=ge2024-01-03T08:00:00.000Z",
        "_lastUpdated=lt2024-01-03T08:00:00.001Z",
        "_lastUpdated=le2024-01-03T07:59:59.999Z",
        "_lastUpdated=le2024-01-03T08:00:00.000Z",
        "_lastUpdated=sa2024-01-03T07:59:59.999Z",
        "_lastUpdated=sa2024-01-03T08:00:00.000Z",
        "_lastUpdated=eb2024-01-03T08:00:00.000Z",
        "_lastUpdated=eb2024-01-03T08:00:00.001Z",
        "_lastUpdated=ap2024-01-03T08:00:00.000Z",
        "_lastUpdated=ap2024-01-03T08:00Z",
        "_lastUpdated=2024-01-03T08:00:00.0004Z",
        "_lastUpdated:missing=true",
        "_id=|t01,t02",
        "_id=urn:x|t01",
        "_id:not=t01,t02,t03",
        "authored-on=2024-02",
        "authored-on=eq2024-02-12",
        "authored-on=ne2024-02",
        "authored-on=gt2024-02-14",
        "authored-on=lt2024-02-14",
        "authored-on=ge2024-02-14",
        "authored-on=le2024-02-14",
        "authored-on=sa2024-02-14",
        "authored-on=eb2024-02-14",
        "authored-on=ap2024-02-13T23:30:00Z",
        // Boundaries: "2024-02" is [02-01, 03-01), so each of these lands exactly on an edge.
        "authored-on=gt2024-02-29",
        "authored-on=lt2024-02",
        "authored-on=ge2024-03-01",
        "authored-on=le2024-01-31",
        "authored-on=sa2024-01-31",
        "authored-on=eb2024-03-01",
        "authored-on=ap2024-03-01",
        "authored-on=2023,2024-03-01",
        "authored-on:missing=true",
        "modified=ge2024-02-10T12:00:00Z",
        "modified=le2024-02-05",
        "period=2024",
        "period=gt2024-05-15",
        "period=lt2024-04-05",
        "period=sa2024-04-10",
        "period=eb2024-05-10",
        "period=ne2024",
        "period:missing=true",
        "due-date=le2024-03-12",
        "due-date=ge2024-03-20",
        "due-date=2024-03-04,2024-03-08",
        "due-date=ne2024-03-04",
        "due-date:missing=true",
        // The work-list columns in every form (they have no index rows but for a Task with
        // several performer types).
        "status=http://hl7.org/fhir/task-status|&priority=stat",
        "status=|ready",
        "status:not=http://hl7.org/fhir/task-status|&priority=stat",
        "status:not=urn:wrong|draft&priority=stat",
        "status:missing=false&priority=stat",
        "owner:not=Practitioner/1,Organization/1",
        "owner:Practitioner=1",
        "owner:missing=false",
        "performer=urn:roles|",
        "performer=urn:roles|,|clerk",
        "performer:not=nurse",
        "performer:not=urn:roles|pharmacist",
        "performer:not=|clerk,urn:roles|nurse",
        "performer:not=urn:roles|",
        "performer:missing=true",
        "authored-on:missing=false",
        "status=ready,in-progress,on-hold&owner:missing=true",
        "authored-on=ge2024-02&authored-on=lt2024-02-15",
        "performer=nurse&priority:not=routine&requester=dr",
        "intent=order&patient=p1&_lastUpdated=le2024-01-12",
    ];

    /// Queries in QUERIES for values that no live Task has.
    const FIND_NOTHING: &[&str] = &[
        "status=urn:wrong|draft",
        "focus=ServiceRequest/sr8",
        "status=|ready",
        "status:not=http://hl7.org/fhir/task-status|&priority=stat",
        "_lastUpdated:missing=true",
        "_id=urn:x|t01",
    ];

    async fn pool() -> SqlitePool {
        SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn sql_finds_exactly_what_the_matcher_matches() {
        let pool = pool().await;
        let tasks = load(&pool).await;
        let limits = SearchLimits {
            default_count: 10,
            max_count: 100,
            default_total: crate::fhir::search::TotalMode::Accurate,
        };
        let live: Vec<&Indexed> = tasks.iter().filter(|t| !t.deleted).collect();
        for query in QUERIES {
            let parsed = parse_query(&pairs(query), &limits, BASE, Handling::Strict)
                .unwrap_or_else(|e| panic!("{query}: {e}"));
            let matched: Vec<&Indexed> = live
                .iter()
                .copied()
                .filter(|t| matches(&t.index, &parsed.predicates))
                .collect();
            // Each query must tell Tasks apart, or it could not catch a wrong translation; the few
            // that check a value nobody has must find nothing.
            let nothing = FIND_NOTHING.contains(query);
            assert!(
                matched.is_empty() == nothing && matched.len() < live.len(),
                "{query} matches {} of {} Tasks",
                matched.len(),
                live.len()
            );
            let expected = expected_order(&matched, &[]);
            for style in [Placeholder::Question, Placeholder::Dollar] {
                let found = sql_ids(&pool, &parsed.predicates, &[], style).await;
                assert_eq!(found, expected, "{query} ({style:?})");
            }
        }
    }

    #[tokio::test]
    async fn compound_predicates_agree_with_the_matcher() {
        let pool = pool().await;
        let tasks = load(&pool).await;
        let owner = |code: &str| Predicate::Token {
            param: "owner",
            negated: false,
            any_of: vec![TokenValue {
                system: SystemMatch::Any,
                code: Some(code.into()),
            }],
        };
        let nurse_queue = Predicate::And(vec![
            Predicate::Missing {
                param: "owner",
                missing: true,
            },
            Predicate::Token {
                param: "performer",
                negated: false,
                any_of: vec![TokenValue {
                    system: SystemMatch::Exact("urn:roles".into()),
                    code: Some("nurse".into()),
                }],
            },
        ]);
        let cases = vec![
            vec![Predicate::Or(vec![
                owner("Practitioner/1"),
                nurse_queue.clone(),
            ])],
            vec![
                Predicate::Or(vec![owner("Practitioner/2"), owner("Organization/1")]),
                Predicate::Missing {
                    param: "due-date",
                    missing: false,
                },
            ],
            vec![Predicate::Or(vec![])],
            vec![Predicate::And(vec![])],
            vec![Predicate::Token {
                param: "status",
                negated: true,
                any_of: vec![],
            }],
            vec![Predicate::Date {
                param: "period",
                any_of: vec![],
            }],
            vec![Predicate::Token {
                param: "code",
                negated: false,
                any_of: vec![TokenValue {
                    system: SystemMatch::NoSystem,
                    code: None,
                }],
            }],
        ];
        for predicates in cases {
            let matched: Vec<&Indexed> = tasks
                .iter()
                .filter(|t| !t.deleted && matches(&t.index, &predicates))
                .collect();
            let expected = expected_order(&matched, &[]);
            for style in [Placeholder::Question, Placeholder::Dollar] {
                let found = sql_ids(&pool, &predicates, &[], style).await;
                assert_eq!(found, expected, "{predicates:?} ({style:?})");
            }
        }
    }

    #[tokio::test]
    async fn sql_orders_as_the_sort_keys_say() {
        let pool = pool().await;
        let tasks = load(&pool).await;
        let limits = SearchLimits {
            default_count: 10,
            max_count: 100,
            default_total: crate::fhir::search::TotalMode::Accurate,
        };
        let live: Vec<&Indexed> = tasks.iter().filter(|t| !t.deleted).collect();
        let sorts = [
            "_sort=-priority",
            "_sort=priority",
            "_sort=-_lastUpdated",
            "_sort=_lastUpdated",
            "_sort=authored-on",
            "_sort=-authored-on",
            "_sort=status,-priority",
            "_sort=-_id",
            "_sort=intent,-modified",
            "_sort=period",
            "_sort=-due-date,priority",
            "status:not=completed&_sort=-priority,authored-on",
            "_sort=-status",
            "owner=Practitioner/1,Practitioner/2&status:not=completed&_sort=-priority",
            "owner=Practitioner/2&_sort=priority",
        ];
        for query in sorts {
            let parsed = parse_query(&pairs(query), &limits, BASE, Handling::Strict).unwrap();
            let matched: Vec<&Indexed> = live
                .iter()
                .copied()
                .filter(|t| matches(&t.index, &parsed.predicates))
                .collect();
            let expected = expected_order(&matched, &parsed.sort);
            let found = sql_ids(
                &pool,
                &parsed.predicates,
                &parsed.sort,
                Placeholder::Question,
            )
            .await;
            assert_eq!(found, expected, "{query}");
        }
        // Spot-check the comparator itself, so that the test does not share a mistake with the SQL.
        let parsed =
            parse_query(&pairs("_sort=-priority"), &limits, BASE, Handling::Strict).unwrap();
        let order = expected_order(&live, &parsed.sort);
        let ranks: Vec<i64> = order
            .iter()
            .map(|id| live.iter().find(|t| &t.id == id).unwrap().rank)
            .collect();
        assert!(ranks.windows(2).all(|w| w[0] >= w[1]), "{ranks:?}");
        assert_eq!(ranks[0], 4);
        let parsed =
            parse_query(&pairs("_sort=authored-on"), &limits, BASE, Handling::Strict).unwrap();
        let order = expected_order(&live, &parsed.sort);
        let first = live.iter().find(|t| t.id == order[0]).unwrap();
        assert_eq!(
            sort_value(first, &parsed.sort[0]),
            Some(SortValue::Text("2023-01-01T00:00:00.000Z".into()))
        );
        let last = live
            .iter()
            .find(|t| &t.id == order.last().unwrap())
            .unwrap();
        assert_eq!(sort_value(last, &parsed.sort[0]), None);
    }

    #[test]
    fn dollar_placeholders_are_numbered_from_first_bind() {
        let predicates = vec![
            Predicate::Token {
                param: "status",
                negated: false,
                any_of: vec![
                    TokenValue {
                        system: SystemMatch::Any,
                        code: Some("ready".into()),
                    },
                    TokenValue {
                        system: SystemMatch::Exact("urn:s".into()),
                        code: Some("x".into()),
                    },
                ],
            },
            Predicate::Missing {
                param: "period",
                missing: true,
            },
        ];
        let filter = where_clause(&predicates, Placeholder::Dollar, 3);
        assert_eq!(
            filter.sql,
            "t.status IN ($3) AND t.id NOT IN (SELECT task_id FROM task_date WHERE param = $4)"
        );
        assert_eq!(filter.binds, ["ready", "period"]);
        let filter = where_clause(&predicates, Placeholder::Question, 1);
        assert_eq!(filter.sql.matches('?').count(), filter.binds.len());
        assert!(
            !filter.sql.contains("ready"),
            "values are bound, never spliced"
        );
        assert_eq!(where_clause(&[], Placeholder::Question, 1).sql, "1=1");
    }

    #[test]
    fn order_by_always_ends_in_a_unique_tiebreak() {
        let key = |param, descending| SortKey { param, descending };
        let cases = [
            (vec![], "t.last_updated ASC, t.id ASC"),
            (
                vec![key("priority", true)],
                "t.priority_rank DESC, t.id ASC",
            ),
            (
                vec![key("_lastUpdated", true)],
                "t.last_updated DESC, t.id ASC",
            ),
            (vec![key("_id", true), key("priority", false)], "t.id DESC"),
            (
                vec![key("due-date", false)],
                "t.due_start ASC NULLS LAST, t.id ASC",
            ),
            (
                vec![key("modified", true)],
                "(SELECT min(d.start_at) FROM task_date d WHERE d.task_id = t.id AND d.param = 'modified') DESC NULLS LAST, \
                 t.id ASC",
            ),
            (
                vec![key("not-a-param", false)],
                "t.last_updated ASC, t.id ASC",
            ),
        ];
        for (sort, expected) in cases {
            assert_eq!(order_by(&sort, &[]), expected, "{sort:?}");
        }
    }

    /// `status:not=completed` names the one code excluded on SQLite (a walk checks each entry
    /// against one code) and the eleven left on PostgreSQL (which plans by them); both keep
    /// the status from choosing the index on SQLite. `sql_finds_exactly_what_the_matcher_matches`
    /// checks what the SQLite form finds.
    #[test]
    fn a_negated_status_names_the_excluded_code_on_sqlite() {
        let predicates = vec![Predicate::Token {
            param: "status",
            negated: true,
            any_of: vec![TokenValue {
                system: SystemMatch::Any,
                code: Some("completed".into()),
            }],
        }];
        let sqlite = where_clause(&predicates, Placeholder::Question, 1);
        assert_eq!(sqlite.sql, "+t.status NOT IN (?)");
        assert_eq!(sqlite.binds, ["completed"]);
        let postgres = where_clause(&predicates, Placeholder::Dollar, 1);
        assert!(
            postgres.sql.starts_with("t.status IN ($1, "),
            "{}",
            postgres.sql
        );
        assert_eq!(
            postgres.binds.len(),
            crate::fhir::task::TASK_STATUSES.len() - 1
        );
        assert!(!postgres.binds.iter().any(|code| code == "completed"));
    }

    /// A page's size and offset, and a child search's limit, take the placeholders after the
    /// filter's; a child search's parents come first.
    #[test]
    fn statements_number_their_own_placeholders_after_the_filter() {
        let predicates = vec![Predicate::Missing {
            param: "period",
            missing: true,
        }];
        let spec = |counting| PageSpec {
            predicates: &predicates,
            sort: &[],
            after: None,
            counting,
        };
        let page = page_sql(spec(Counting::All), Placeholder::Dollar).unwrap();
        assert_eq!(page.binds, ["period"]);
        let count = page.count.unwrap();
        assert!(count.ends_with("param = $1))"), "{count}");
        assert!(page.rows.ends_with("LIMIT $2 OFFSET $3"), "{}", page.rows);
        let page = page_sql(spec(Counting::UpTo(1000)), Placeholder::Question).unwrap();
        assert!(page.rows.ends_with("LIMIT ? OFFSET ?"), "{}", page.rows);
        assert!(page.count.unwrap().ends_with("LIMIT 1001) AS counted"));
        assert_eq!(
            page_sql(spec(Counting::Skip), Placeholder::Question)
                .unwrap()
                .count,
            None
        );
        // A cursor's values come after the filter's, before the page size.
        let after = [
            Some("2024-01-01T00:00:00.000Z".to_string()),
            Some("t1".to_string()),
        ];
        let page = page_sql(
            PageSpec {
                after: Some(&after),
                ..spec(Counting::Skip)
            },
            Placeholder::Dollar,
        )
        .unwrap();
        // In the order of the text: `t.last_updated >= $2 AND ((t.last_updated > $3) OR
        // (t.last_updated = $4 AND t.id > $5))`.
        let at = "2024-01-01T00:00:00.000Z";
        assert_eq!(page.binds, ["period", at, at, at, "t1"]);
        assert!(
            page.rows.contains("t.last_updated >= $2 AND"),
            "{}",
            page.rows
        );
        assert!(page.rows.ends_with("LIMIT $6 OFFSET $7"), "{}", page.rows);
        let wrong = [Some("t1".to_string())];
        let error = page_sql(
            PageSpec {
                after: Some(&wrong),
                ..spec(Counting::Skip)
            },
            Placeholder::Dollar,
        )
        .unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST);

        let parents = ["Task/a".to_string(), "Task/b".to_string()];
        let children = children_sql(&parents, &predicates, Placeholder::Dollar);
        assert_eq!(children.binds, ["Task/a", "Task/b", "period"]);
        assert!(
            children.sql.contains("value IN ($1, $2)"),
            "{}",
            children.sql
        );
        assert!(children.sql.contains("param = $3"), "{}", children.sql);
        assert!(children.sql.ends_with("LIMIT $4"), "{}", children.sql);
    }
}

#[cfg(test)]
mod plans {
    use super::*;
    use crate::fhir::search::{Handling, SearchLimits, TotalMode, parse_query};
    use sqlx::{AssertSqlSafe, Row};

    /// The steps of SQLite's plan for `statement` with `binds` (and a first page's LIMIT and
    /// OFFSET, where it pages by offset).
    pub(super) async fn explain(
        pool: &sqlx::SqlitePool,
        statement: &str,
        binds: &[String],
    ) -> Vec<String> {
        let mut explain = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {statement}")));
        for bind in binds {
            explain = explain.bind(bind);
        }
        if statement.contains("LIMIT ? OFFSET ?") {
            explain = explain.bind(20_i64).bind(0_i64);
        }
        explain
            .fetch_all(pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect()
    }

    /// An in-memory database with the real schema (every SQLite migration), no statistics.
    /// `query` parsed as the API parses it (strict), `scope` (a role's read rule) added.
    pub(super) fn parsed(
        query: &str,
        limits: &SearchLimits,
        scope: Option<Predicate>,
    ) -> crate::fhir::search::SearchQuery {
        let mut parsed = parse_query(
            &super::tests::pairs(query),
            limits,
            "http://baton.test/fhir",
            Handling::Strict,
        )
        .unwrap();
        parsed.predicates.extend(scope);
        parsed
    }

    /// The statements of `parsed`'s page after `after` (None: the first), counting up to
    /// 1 000, with SQLite's placeholders.
    pub(super) fn page_of(
        parsed: &crate::fhir::search::SearchQuery,
        after: Option<&[Option<String>]>,
    ) -> PageSql {
        page_sql(
            PageSpec {
                predicates: &parsed.predicates,
                sort: &parsed.sort,
                after,
                counting: Counting::UpTo(1000),
            },
            Placeholder::Question,
        )
        .unwrap()
    }

    pub(super) async fn migrated_pool() -> sqlx::SqlitePool {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::migrate!("migrations/sqlite")
            .run(&pool)
            .await
            .unwrap();
        pool
    }

    /// The six work-list searches of issue 16, and whether the page must come out of an index
    /// in its order (a sort of a few hundred matches of one owner or patient is fine; a sort of
    /// a status's, a queue's or the whole table's matches is not, and neither is a walk of
    /// every requested Task in search of one queue's).
    const WORK_LISTS: &[(&str, bool)] = &[
        (
            "owner=Practitioner/p17&status:not=completed&_sort=-priority",
            true,
        ),
        (
            "owner:missing=true&performer=http://baton.example/CodeSystem/work-queue|triage&status=requested",
            true,
        ),
        ("status=requested&_count=20", true),
        (
            "status:not=completed&due-date=lt2027-03-15&_sort=due-date&_count=20",
            true,
        ),
        ("patient=Patient/pt42", false),
        ("_count=20", true),
    ];

    /// The plan of every statement of the six work-list searches (the estimate count, the first
    /// page and a page after a cursor), on the real schema, has no full scan of the task table
    /// or of an index table, and the large listings walk an index in their order instead of
    /// sorting: a later change that loses an index or a rewrite fails here. SQLite has no
    /// statistics here, as on a freshly loaded database, so the plans are the ones Baton gets
    /// without `ANALYZE`.
    #[tokio::test]
    async fn work_list_searches_use_indexes_not_scans() {
        let pool = migrated_pool().await;
        let limits = SearchLimits {
            default_count: 50,
            max_count: 1000,
            default_total: TotalMode::Estimate,
        };
        for (query, walks_index) in WORK_LISTS {
            let parsed = parsed(query, &limits, None);
            let cursor: Vec<Option<String>> = sort_terms(&parsed.sort, &parsed.predicates)
                .iter()
                .map(|term| Some(if term.integer { "2" } else { "x" }.to_string()))
                .collect();
            for after in [None, Some(cursor.as_slice())] {
                let sql = page_of(&parsed, after);
                let count = sql.count.clone().unwrap();
                let statements = [
                    (count, sql.count_binds.clone(), false),
                    (sql.rows.clone(), sql.binds.clone(), *walks_index),
                ];
                for (statement, binds, ordered) in statements {
                    let plan = explain(&pool, &statement, &binds).await;
                    let full_scan = plan.iter().find(|step| {
                        let scans_table = step.starts_with("SCAN ")
                            && !step.starts_with("SCAN (subquery")
                            && *step != "SCAN counted"
                            && !step.contains(" INDEX ");
                        let scans_index_table = step.starts_with("SCAN task_token")
                            || step.starts_with("SCAN task_date");
                        scans_table || scans_index_table
                    });
                    assert!(
                        full_scan.is_none(),
                        "{query}: {full_scan:?} in {plan:#?}\n{statement}"
                    );
                    if ordered {
                        assert!(
                            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
                            "{query} sorts instead of walking an index: {plan:#?}\n{statement}"
                        );
                    }
                    // A role queue's count reads its index alone (the performer system is
                    // in it), not a Task row per match.
                    if !ordered && query.contains("performer=") {
                        assert!(
                            plan.iter()
                                .any(|step| step.contains("COVERING INDEX task_queue")),
                            "{query} counts from the table: {plan:#?}\n{statement}"
                        );
                    }
                    // "My open tasks" walks the owner's index in priority order, checks the
                    // status from it (its count reads the index alone) and stops at `_count`.
                    if query.starts_with("owner=") {
                        let index = if ordered {
                            "INDEX task_by_owner"
                        } else {
                            "COVERING INDEX task_by_owner"
                        };
                        assert!(
                            plan.iter().any(|step| step.contains(index)),
                            "{query} does not use {index}: {plan:#?}\n{statement}"
                        );
                    }
                    // A role queue's page walks its own queue, not every requested Task.
                    if ordered && query.contains("performer=") {
                        assert!(
                            plan.iter().all(|step| !step.contains("task_by_status")),
                            "{query} walks the status index: {plan:#?}\n{statement}"
                        );
                    }
                }
            }
        }
    }

    /// `_id` and `_lastUpdated` have no index rows (`fhir::search::ON_THE_ROW`): a search on
    /// them looks the row up by its key, or walks `task (last_updated, id)` from the bound,
    /// never a scan of the task table.
    #[tokio::test]
    async fn row_key_and_instant_searches_use_the_rows_indexes() {
        let pool = migrated_pool().await;
        let limits = SearchLimits {
            default_count: 50,
            max_count: 1000,
            default_total: TotalMode::Estimate,
        };
        let cases = [
            ("_id=a,b", "sqlite_autoindex_task_1"),
            ("_lastUpdated=ge2027-01-01", "task_by_last_updated"),
            (
                "_lastUpdated=gt2027-01-01&_lastUpdated=lt2027-02-01&_sort=-_lastUpdated",
                "task_by_last_updated",
            ),
        ];
        for (query, index) in cases {
            let sql = page_of(&parsed(query, &limits, None), None);
            for (statement, binds) in [
                (sql.count.clone().unwrap(), sql.count_binds.clone()),
                (sql.rows.clone(), sql.binds.clone()),
            ] {
                let plan = explain(&pool, &statement, &binds).await;
                assert!(
                    plan.iter()
                        .any(|step| step.starts_with("SEARCH t ") && step.contains(index)),
                    "{query} does not search {index}: {plan:#?}\n{statement}"
                );
                assert!(
                    !plan.iter().any(|step| step.starts_with("SCAN t")
                        || step.contains("task_token")
                        || step.contains("task_date")),
                    "{query}: {plan:#?}\n{statement}"
                );
            }
        }
    }

    /// The overdue timer's statements read the due-date column through its index, never a
    /// scan of the task table (they read `task_date` before issue 16's columns).
    #[tokio::test]
    async fn the_overdue_timer_walks_the_due_date_index() {
        use crate::store::hub_sql;
        let pool = migrated_pool().await;
        let statements = [
            (hub_sql::NEXT_DUE.to_string(), 1),
            (hub_sql::overdue_tasks(), 2),
            (hub_sql::overdue_version(""), 3),
        ];
        for (statement, binds) in statements {
            let mut explain = sqlx::query(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {statement}")));
            for _ in 0..binds {
                explain = explain.bind("2027-01-01T00:00:00.000Z");
            }
            let plan: Vec<String> = explain
                .fetch_all(&pool)
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<String, _>("detail"))
                .collect();
            assert!(
                plan.iter().all(|step| {
                    let full_scan = step.starts_with("SCAN ") && !step.contains(" INDEX ");
                    let sorts = step.contains("TEMP B-TREE");
                    !full_scan && !sorts
                }),
                "{plan:#?}\n{statement}"
            );
        }
    }
}

/// The read scope of a practitioner, added to every search it makes, looks its token values up
/// by equality: the branch for the workflow Tasks it asked for (`auth::read_scope`) reads the
/// bids and information requests it requested, never every `code` of every Task.
#[cfg(test)]
mod read_scope_plans {
    use super::plans::{explain, migrated_pool, page_of, parsed};
    use crate::auth::{PerformerType, Principal, Role, read_scope};
    use crate::fhir::search::{SearchLimits, TotalMode};

    #[tokio::test]
    async fn a_practitioner_scope_looks_up_tokens_by_equality() {
        let pool = migrated_pool().await;
        let limits = SearchLimits {
            default_count: 50,
            max_count: 1000,
            default_total: TotalMode::Estimate,
        };
        for types in [vec![], vec![PerformerType::parse("http://x|lab").unwrap()]] {
            let practitioner = Principal {
                issuer: None,
                subject: "s".into(),
                role: Role::Practitioner,
                fhir_user: Some("Practitioner/p17".into()),
                performer_types: types,
                scopes: None,
                patient: None,
            };
            for query in [
                "owner=Practitioner/p17&status:not=completed&_sort=-priority",
                "status=requested&_count=20",
                "_count=20",
            ] {
                let sql = page_of(&parsed(query, &limits, read_scope(&practitioner)), None);
                let plan = explain(&pool, &sql.rows, &sql.binds).await;
                let broad = plan.iter().find(|step| {
                    step.starts_with("SCAN task_token")
                        || (step.contains("task_token") && step.ends_with("(param=?)"))
                        || (step.starts_with("SCAN t") && !step.contains(" INDEX "))
                });
                assert!(broad.is_none(), "{query}: {broad:?} in {plan:#?}");
            }
        }
    }
}
