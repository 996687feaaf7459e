//! The hub's statements that read alike in both dialects, written once: each carries a rule
//! (what an event-log range returns, which events may be pruned, which subscriptions have
//! work waiting, which Tasks are overdue), so a change to one cannot land on one backend
//! only. Each backend runs them with its own executor (SQLite's writer or read pool, a
//! PostgreSQL transaction or pool) and binds their values itself.
//!
//! They use PostgreSQL's numbered placeholders, `$1`, `$2`, …, which sqlx binds by number
//! on SQLite too. Each number first appears after the ones below it, so SQLite's own
//! numbering of named parameters (by first appearance) gives the same order to any client.

use super::SubscriptionQuery;
use super::owner_columns;
use super::search_sql::Placeholder;
use crate::fhir::task::TERMINAL_STATUSES;

/// Events `$2..=$3` of subscription `$1`'s log, oldest first.
pub(crate) const SUBSCRIPTION_EVENTS: &str =
    "SELECT event_number, change_seq, task_id, version, interaction, occurred_at
     FROM subscription_event WHERE subscription_id = $1 AND event_number BETWEEN $2 AND $3
     ORDER BY event_number";

/// Deletes the events that happened before `$1` and were delivered. Undelivered events are
/// kept whatever their age: the queue must never lose them.
/// A page of live subscriptions in id order, from `after` (the first placeholder; '' for the
/// start), at most the second placeholder many: only what start-up needs. The resource comes
/// only with a row that has no matching form yet (written before the column existed).
pub(crate) fn live_page(after: &str, limit: &str) -> String {
    format!(
        "SELECT id, version, status, author, matching,
                CASE WHEN matching IS NULL THEN resource END AS resource, created_after_seq
         FROM subscription
         WHERE status <> 'off' AND id > {after} ORDER BY id LIMIT {limit}"
    )
}

/// The live subscriptions with a handshake or events owed.
pub(crate) const PENDING_DELIVERIES: &str = "SELECT id, next_attempt_at FROM subscription
     WHERE status <> 'off' AND (handshake_pending <> 0 OR delivered_through < events_since_start)";

pub(crate) const PRUNE_EVENTS: &str =
    "DELETE FROM subscription_event WHERE occurred_at < $1 AND event_number <=
       (SELECT s.delivered_through FROM subscription s WHERE s.id = subscription_event.subscription_id)";

/// The condition on `subscription s` of work that has waited since before `$1`: a live
/// subscription owing a handshake since then, or whose oldest undelivered event (or its
/// retry time, once an attempt failed) is that old.
pub(crate) const WORK_WAITING: &str = "s.status <> 'off'
       AND ((s.handshake_pending <> 0 AND s.last_updated <= $1)
         OR (s.delivered_through < s.events_since_start
             AND coalesce(s.next_attempt_at,
                   (SELECT e.occurred_at FROM subscription_event e
                    WHERE e.subscription_id = s.id
                      AND e.event_number = s.delivered_through + 1)) <= $1))";

/// The earliest due date after `$1`.
pub(crate) const NEXT_DUE: &str =
    "SELECT min(end_at) FROM task_date WHERE param = 'due-date' AND end_at > $1";

/// Marks Task `$1` reported for due date `$2`; inserts nothing when it already was.
pub(crate) const MARK_OVERDUE: &str =
    "INSERT INTO task_overdue (task_id, due_at) VALUES ($1, $2) ON CONFLICT DO NOTHING";

/// The `overdue` change event of version `$2` of Task `$1`, recorded at `$3`.
pub(crate) const OVERDUE_EVENT: &str =
    "INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at)
     VALUES ('Task', $1, $2, NULL, 'overdue', $3)";

/// The condition on `task t` of a Task that is still open: no status of it is terminal.
fn still_open() -> String {
    let terminal: Vec<String> = TERMINAL_STATUSES.iter().map(|s| format!("'{s}'")).collect();
    format!(
        "t.id NOT IN (SELECT task_id FROM task_token WHERE param = 'status' AND value IN ({}))",
        terminal.join(", ")
    )
}

/// At most `$2` live, open Tasks whose due date passed by `$1` and was not yet reported, as
/// `(task_id, end_at)`, earliest first.
pub(crate) fn overdue_tasks() -> String {
    format!(
        "SELECT d.task_id, d.end_at FROM task_date d JOIN task t ON t.id = d.task_id
         WHERE d.param = 'due-date' AND d.end_at <= $1 AND t.deleted = 0
           AND {}
           AND NOT EXISTS (SELECT 1 FROM task_overdue o WHERE o.task_id = d.task_id AND o.due_at = d.end_at)
         ORDER BY d.end_at LIMIT $2",
        still_open()
    )
}

/// The current version of Task `$2` if it is live, open, and due `$1`, which passed by
/// `$3`: checked again inside the transaction that reports it, since the Task may have been
/// completed or given a new due date after it was found. `lock` ends the statement (a
/// backend's row lock, or nothing).
pub(crate) fn overdue_version(lock: &str) -> String {
    format!(
        "SELECT t.version FROM task t JOIN task_date d ON d.task_id = t.id AND d.param = 'due-date' AND d.end_at = $1
         WHERE t.id = $2 AND t.deleted = 0 AND d.end_at <= $3
           AND {} {lock}",
        still_open()
    )
}

/// A subscription search as SQL: the count, the page (ordered, with the page's size and
/// offset bound after the filter's values), and the filter's values in bind order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubscriptionSearch {
    pub count: String,
    pub page: String,
    pub binds: Vec<String>,
}

/// Builds the statements of a subscription search with the backend's placeholders. Lists
/// (statuses, ids) are written as `IN (…)` with one placeholder per value; an empty list
/// matches nothing.
pub(crate) fn subscription_search(
    query: &SubscriptionQuery,
    style: Placeholder,
) -> SubscriptionSearch {
    let mut binds = Binds {
        style,
        values: Vec::new(),
    };
    let mut conditions = vec!["1 = 1".to_string()];
    if let Some(author) = &query.author {
        let [issuer, subject, role, fhir_user] = owner_columns(author);
        for (column, value) in [
            ("author_subject", subject),
            ("author_role", role),
            ("author_fhir_user", fhir_user),
            ("author_issuer", issuer),
        ] {
            conditions.push(format!("{column} = {}", binds.push(value)));
        }
    }
    if let Some(statuses) = &query.status {
        conditions.push(binds.one_of("status", statuses));
    }
    if let Some(endpoint) = &query.endpoint {
        conditions.push(format!("endpoint = {}", binds.push(endpoint)));
    }
    if let Some(ids) = &query.ids {
        conditions.push(binds.one_of("id", ids));
    }
    let filter = conditions.join(" AND ");
    let count = format!("SELECT count(*) FROM subscription WHERE {filter}");
    let bound = binds.values.len();
    let (limit, offset) = (binds.placeholder(bound + 1), binds.placeholder(bound + 2));
    let page = format!(
        "SELECT * FROM subscription WHERE {filter} ORDER BY last_updated, id LIMIT {limit} OFFSET {offset}"
    );
    SubscriptionSearch {
        count,
        page,
        binds: binds.values,
    }
}

/// Bind values in the order their placeholders are written.
struct Binds {
    style: Placeholder,
    values: Vec<String>,
}

impl Binds {
    /// The placeholder of a value bound after those before it.
    fn push(&mut self, value: &str) -> String {
        self.values.push(value.to_string());
        self.placeholder(self.values.len())
    }

    /// The placeholder of the value bound `number`th, counting from 1.
    fn placeholder(&self, number: usize) -> String {
        match self.style {
            Placeholder::Question => "?".to_string(),
            Placeholder::Dollar => format!("${number}"),
        }
    }

    /// `column IN (…)`, or a condition that is never true for no values.
    fn one_of(&mut self, column: &str, values: &[String]) -> String {
        if values.is_empty() {
            return "0 = 1".to_string();
        }
        let placeholders: Vec<String> = values.iter().map(|v| self.push(v)).collect();
        format!("{column} IN ({})", placeholders.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Identity, Role};

    /// The filters in the order they are written and bound, in both placeholder styles.
    #[test]
    fn subscription_searches_bind_in_the_order_they_are_written() {
        let query = SubscriptionQuery {
            author: Some(Identity {
                issuer: None,
                subject: "alice".into(),
                role: Role::Practitioner,
                fhir_user: Some("Practitioner/1".into()),
            }),
            status: Some(vec!["active".into(), "error".into()]),
            endpoint: Some("https://example.org/hook".into()),
            ids: Some(vec![]),
        };
        let dollar = subscription_search(&query, Placeholder::Dollar);
        assert_eq!(
            dollar.count,
            "SELECT count(*) FROM subscription WHERE 1 = 1 AND author_subject = $1 \
             AND author_role = $2 AND author_fhir_user = $3 AND author_issuer = $4 \
             AND status IN ($5, $6) AND endpoint = $7 AND 0 = 1"
        );
        assert!(
            dollar
                .page
                .ends_with("ORDER BY last_updated, id LIMIT $8 OFFSET $9")
        );
        assert_eq!(
            dollar.binds,
            [
                "alice",
                "practitioner",
                "Practitioner/1",
                "",
                "active",
                "error",
                "https://example.org/hook"
            ]
        );
        let question = subscription_search(&query, Placeholder::Question);
        assert_eq!(question.binds, dollar.binds);
        assert!(question.count.contains("status IN (?, ?) AND endpoint = ?"));
        assert!(question.page.ends_with("LIMIT ? OFFSET ?"));

        let everything = subscription_search(&SubscriptionQuery::default(), Placeholder::Dollar);
        assert_eq!(
            everything.count,
            "SELECT count(*) FROM subscription WHERE 1 = 1"
        );
        assert!(everything.page.ends_with("LIMIT $1 OFFSET $2"));
        assert!(everything.binds.is_empty());
    }

    /// The open-Task condition names exactly the terminal statuses of `fhir::task`.
    #[test]
    fn overdue_tasks_are_the_open_ones() {
        let sql = overdue_tasks();
        assert!(sql.contains(
            "value IN ('completed', 'cancelled', 'failed', 'rejected', 'entered-in-error')"
        ));
        assert!(overdue_version("FOR SHARE OF t").ends_with(" FOR SHARE OF t"));
    }
}
