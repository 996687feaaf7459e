//! Search predicates and sort keys as SQL over the index tables, for both stores.
//!
//! The index tables hold exactly what `fhir::search::index_task` extracts: one `task_token` row
//! per token or reference value and one `task_date` row per date range. Each predicate becomes
//! `t.id [NOT] IN (SELECT task_id FROM task_… WHERE param = ? AND …)`, which the
//! `(param, value, task_id)` and `(param, start_at, task_id)` indexes answer, and which has the
//! same meaning as `Predicate::matches`: "some value of the parameter satisfies the condition".
//! Every value is bound; the only text spliced into SQL comes from Baton's own parameter table.

use super::rows::CURRENT_COLUMNS;
use crate::fhir::search::{
    DateComparison, ParamType, Predicate, Prefix, SortKey, SystemMatch, TokenValue, task_param,
};

/// How bind parameters are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    /// SQLite: `?`, bound in order.
    Question,
    /// PostgreSQL: `$1`, `$2`, … numbered from `first_bind`.
    Dollar,
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
            } => {
                let param = self.bind(param);
                let values = self.token_values(any_of);
                let subquery =
                    format!("SELECT task_id FROM task_token WHERE param = {param} AND {values}");
                membership(*negated, &subquery)
            }
            Predicate::Missing { param, missing } => {
                let table = match task_param(param).map(|def| def.kind) {
                    Some(ParamType::Date) => "task_date",
                    _ => "task_token",
                };
                let param = self.bind(param);
                let subquery = format!("SELECT task_id FROM {table} WHERE param = {param}");
                membership(*missing, &subquery)
            }
            Predicate::Date { param, any_of } => {
                let param = self.bind(param);
                let conditions = if any_of.is_empty() {
                    "0=1".to_string()
                } else {
                    let parts: Vec<String> =
                        any_of.iter().map(|c| self.date_condition(c)).collect();
                    format!("({})", parts.join(" OR "))
                };
                let subquery =
                    format!("SELECT task_id FROM task_date WHERE param = {param} AND {conditions}");
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

    /// The prefix semantics of `DateComparison::matches`, on the row's `[start_at, end_at)`
    /// against the search range `[a, b)`.
    fn date_condition(&mut self, comparison: &DateComparison) -> String {
        let (a, b) = (comparison.start.as_str(), comparison.end.as_str());
        match comparison.prefix {
            Prefix::Eq => format!(
                "(start_at >= {} AND end_at <= {})",
                self.bind(a),
                self.bind(b)
            ),
            Prefix::Ne => format!(
                "NOT (start_at >= {} AND end_at <= {})",
                self.bind(a),
                self.bind(b)
            ),
            Prefix::Gt => format!("end_at > {}", self.bind(b)),
            Prefix::Lt => format!("start_at < {}", self.bind(a)),
            Prefix::Ge => format!("end_at > {}", self.bind(a)),
            Prefix::Le => format!("start_at < {}", self.bind(b)),
            Prefix::Sa => format!("start_at >= {}", self.bind(b)),
            Prefix::Eb => format!("end_at <= {}", self.bind(a)),
            Prefix::Ap => format!(
                "(start_at < {} AND end_at > {})",
                self.bind(b),
                self.bind(a)
            ),
        }
    }
}

/// The statements of a page of search results: the count of every match, and the page of
/// current Tasks (`CURRENT_COLUMNS`), sorted; the page's size and then its offset are bound
/// after `binds`, by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSql {
    pub count: String,
    pub rows: String,
    pub binds: Vec<String>,
}

/// The statements of a search for live Tasks matching `predicates`, sorted by `sort`.
pub fn page_sql(predicates: &[Predicate], sort: &[SortKey], style: Placeholder) -> PageSql {
    let mut writer = Writer {
        style,
        next: 1,
        binds: Vec::new(),
    };
    let filter = writer.all(predicates);
    let (limit, offset) = (writer.placeholder(), writer.placeholder());
    PageSql {
        count: format!("SELECT count(*) FROM task t WHERE t.deleted = 0 AND ({filter})"),
        rows: format!(
            "SELECT {CURRENT_COLUMNS} FROM task t WHERE t.deleted = 0 AND ({filter}) ORDER BY {}
             LIMIT {limit} OFFSET {offset}",
            order_by(sort)
        ),
        binds: writer.binds,
    }
}

/// The statement of the live Tasks whose `partOf` names one of `parents` (as `Task/id`) and
/// that match `scope`, oldest first; how many at most is bound after the filter's binds, by
/// the caller.
pub fn children_sql(parents: &[String], scope: &[Predicate], style: Placeholder) -> SqlFilter {
    let mut writer = Writer {
        style,
        next: 1,
        binds: Vec::new(),
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

/// The content of an ORDER BY clause for the sort keys, ending in `t.last_updated, t.id` so
/// that pages never overlap or skip. Tasks without a value for a sort parameter come last
/// in either direction (written out, because SQLite and PostgreSQL disagree by default).
pub fn order_by(sort: &[SortKey]) -> String {
    let mut terms = Vec::new();
    let mut by_last_updated = false;
    for key in sort {
        let direction = if key.descending { "DESC" } else { "ASC" };
        match key.param {
            "_id" => {
                // Ids are unique, so nothing after this key can change the order.
                terms.push(format!("t.id {direction}"));
                return terms.join(", ");
            }
            "_lastUpdated" => {
                by_last_updated = true;
                terms.push(format!("t.last_updated {direction}"));
            }
            "priority" => terms.push(format!("t.priority_rank {direction}")),
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
                terms.push(format!("{expression} {direction} NULLS LAST"));
            }
        }
    }
    if !by_last_updated {
        terms.push("t.last_updated ASC".to_string());
    }
    terms.push("t.id ASC".to_string());
    terms.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::MULTI_FOCUS_EXTENSION;
    use crate::fhir::search::{
        Handling, SearchLimits, TaskIndex, TokenValue, index_task, matches, parse_query,
        priority_rank,
    };
    use serde_json::{Value, json};
    use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
    use sqlx::{AssertSqlSafe, Row};
    use std::cmp::Ordering;

    const BASE: &str = "http://baton.test/fhir";

    const SCHEMA: &str = "
        CREATE TABLE task (id TEXT PRIMARY KEY, version INTEGER NOT NULL, last_updated TEXT NOT NULL,
            deleted INTEGER NOT NULL DEFAULT 0, priority_rank INTEGER NOT NULL, resource TEXT NOT NULL);
        CREATE TABLE task_token (task_id TEXT NOT NULL, param TEXT NOT NULL, system TEXT, value TEXT NOT NULL);
        CREATE INDEX task_token_lookup ON task_token (param, value, task_id);
        CREATE INDEX task_token_task ON task_token (task_id);
        CREATE TABLE task_date (task_id TEXT NOT NULL, param TEXT NOT NULL, start_at TEXT NOT NULL, end_at TEXT NOT NULL);
        CREATE INDEX task_date_lookup ON task_date (param, start_at, task_id);
        CREATE INDEX task_date_task ON task_date (task_id);
    ";

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
        sqlx::raw_sql(SCHEMA).execute(pool).await.unwrap();
        let mut loaded = Vec::new();
        for task in fleet() {
            let id = task["id"].as_str().unwrap().to_string();
            let last_updated = task["meta"]["lastUpdated"].as_str().unwrap().to_string();
            let deleted = DELETED.contains(&id.as_str());
            let index = index_task(&task, BASE);
            sqlx::query("INSERT INTO task (id, version, last_updated, deleted, priority_rank, resource) VALUES (?, 1, ?, ?, ?, ?)")
                .bind(&id)
                .bind(&last_updated)
                .bind(i64::from(deleted))
                .bind(priority_rank(&task))
                .bind(task.to_string())
                .execute(pool)
                .await
                .unwrap();
            for entry in &index.tokens {
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
            for entry in &index.dates {
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

    fn pairs(query: &str) -> Vec<(String, String)> {
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
            order_by(sort)
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
        "status=ready,in-progress,on-hold&owner:missing=true",
        "authored-on=ge2024-02&authored-on=lt2024-02-15",
        "performer=nurse&priority:not=routine&requester=dr",
        "intent=order&patient=p1&_lastUpdated=le2024-01-12",
    ];

    /// Queries in QUERIES for values that no live Task has.
    const FIND_NOTHING: &[&str] = &["status=urn:wrong|draft", "focus=ServiceRequest/sr8"];

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
            "t.id IN (SELECT task_id FROM task_token WHERE param = $3 AND (value IN ($4) OR (system = $5 AND value = $6))) \
             AND t.id NOT IN (SELECT task_id FROM task_date WHERE param = $7)"
        );
        assert_eq!(filter.binds, ["status", "ready", "urn:s", "x", "period"]);
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
                "t.priority_rank DESC, t.last_updated ASC, t.id ASC",
            ),
            (
                vec![key("_lastUpdated", true)],
                "t.last_updated DESC, t.id ASC",
            ),
            (vec![key("_id", true), key("priority", false)], "t.id DESC"),
            (
                vec![key("due-date", false)],
                "(SELECT min(d.start_at) FROM task_date d WHERE d.task_id = t.id AND d.param = 'due-date') ASC NULLS LAST, \
                 t.last_updated ASC, t.id ASC",
            ),
            (
                vec![key("not-a-param", false)],
                "t.last_updated ASC, t.id ASC",
            ),
        ];
        for (sort, expected) in cases {
            assert_eq!(order_by(&sort), expected, "{sort:?}");
        }
    }

    /// A page's size and offset, and a child search's limit, take the placeholders after the
    /// filter's; a child search's parents come first.
    #[test]
    fn statements_number_their_own_placeholders_after_the_filter() {
        let predicates = vec![Predicate::Missing {
            param: "owner",
            missing: true,
        }];
        let page = page_sql(&predicates, &[], Placeholder::Dollar);
        assert_eq!(page.binds, ["owner"]);
        assert!(page.count.ends_with("param = $1))"), "{}", page.count);
        assert!(page.rows.ends_with("LIMIT $2 OFFSET $3"), "{}", page.rows);
        let page = page_sql(&predicates, &[], Placeholder::Question);
        assert!(page.rows.ends_with("LIMIT ? OFFSET ?"), "{}", page.rows);

        let parents = ["Task/a".to_string(), "Task/b".to_string()];
        let children = children_sql(&parents, &predicates, Placeholder::Dollar);
        assert_eq!(children.binds, ["Task/a", "Task/b", "owner"]);
        assert!(
            children.sql.contains("value IN ($1, $2)"),
            "{}",
            children.sql
        );
        assert!(children.sql.contains("param = $3"), "{}", children.sql);
        assert!(children.sql.ends_with("LIMIT $4"), "{}", children.sql);
    }
}
