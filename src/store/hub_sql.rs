//! The hub's statements that read alike in both dialects, written once: each carries a rule
//! (what an event-log range returns, which events may be pruned, which subscriptions have
//! work waiting, which Tasks are overdue), so a change to one cannot land on one backend
//! only. Each backend runs them with its own executor (SQLite's writer or read pool, a
//! PostgreSQL transaction or pool) and binds their values itself.
//!
//! They use PostgreSQL's numbered placeholders, `$1`, `$2`, …, which sqlx binds by number
//! on SQLite too. Each number first appears after the ones below it, so SQLite's own
//! numbering of named parameters (by first appearance) gives the same order to any client.

use std::collections::HashMap;

use super::owner_columns;
use super::search_sql::Placeholder;
use super::{MatchRow, SubscriptionQuery};
use crate::fhir::ids::{ChangeSeq, EventNumber, SubscriptionId};
use crate::fhir::task::TERMINAL_STATUSES;

/// Events `$2..=$3` of subscription `$1`'s log, oldest first, expanded from its runs: a row
/// of `subscription_event` is a run of `events` consecutive event numbers from
/// `event_number`, told of the changes `change_seq`, `change_seq + 1`, … (`plan_runs` makes
/// runs only of consecutive `seq`s), and the change itself is read from `change_event`,
/// which is never pruned. The run holding `$2` is found by one seek on the key; the runs
/// after it up to `$3` follow it on the same index.
pub(crate) const SUBSCRIPTION_EVENTS: &str =
    "SELECT e.event_number + (c.seq - e.change_seq) AS event_number, c.seq AS change_seq,
            c.resource_id AS task_id, c.version, c.interaction, c.recorded_at AS occurred_at,
            c.traceparent
     FROM subscription_event e
     JOIN change_event c ON c.seq BETWEEN e.change_seq AND e.change_seq + e.events - 1
     WHERE e.subscription_id = $1
       AND e.event_number >= coalesce((SELECT max(f.event_number) FROM subscription_event f
                                       WHERE f.subscription_id = $1 AND f.event_number <= $2), 0)
       AND e.event_number <= $3
       AND e.event_number + (c.seq - e.change_seq) BETWEEN $2 AND $3
     ORDER BY 1";

/// The time of the latest change of the run `r` (columns `change_seq`, `events`): the run's
/// `occurred_at`, which pruning compares (every event of the run happened by then).
pub(crate) const RUN_OCCURRED_AT: &str = "(SELECT max(c.recorded_at) FROM change_event c
      WHERE c.seq BETWEEN r.change_seq AND r.change_seq + r.events - 1)";

/// A page of live subscriptions in id order, from `after` (the first placeholder; '' for the
/// start), at most the second placeholder many: only what start-up needs. The resource comes
/// only with a row that has no matching form yet (written before the column existed).
pub(crate) fn live_page(after: &str, limit: &str) -> String {
    format!("{LIVE_COLUMNS} WHERE status <> 'off' AND id > {after} ORDER BY id LIMIT {limit}")
}

/// What start-up reads of each live subscription, in this order (`rows::LiveRow` reads it
/// by position through rusqlite).
pub(crate) const LIVE_COLUMNS: &str = "SELECT id, version, status, author, matching,
            CASE WHEN matching IS NULL THEN resource END AS resource, created_after_seq
     FROM subscription";

/// How many subscriptions are live (SQLite counts them from `subscription_by_status`).
pub(crate) const COUNT_LIVE: &str = "SELECT count(*) FROM subscription WHERE status <> 'off'";

/// The live subscriptions with a handshake or events owed.
pub(crate) const PENDING_DELIVERIES: &str = "SELECT id, next_attempt_at FROM subscription
     WHERE status <> 'off' AND (handshake_pending <> 0 OR delivered_through < events_since_start)";

/// Deletes the runs of events that all happened before `$1` and were all delivered.
/// Undelivered events are kept whatever their age: the queue must never lose them (a run
/// with one undelivered event is kept whole).
pub(crate) const PRUNE_EVENTS: &str =
    "DELETE FROM subscription_event WHERE occurred_at < $1 AND event_number + events - 1 <=
       (SELECT s.delivered_through FROM subscription s WHERE s.id = subscription_event.subscription_id)";

/// The condition on `subscription s` of work that has waited since before `$1`: a live
/// subscription owing a handshake since then, or whose oldest undelivered event (or its
/// retry time, once an attempt failed) is that old.
pub(crate) const WORK_WAITING: &str = "s.status <> 'off'
       AND ((s.handshake_pending <> 0 AND s.last_updated <= $1)
         OR (s.delivered_through < s.events_since_start
             AND coalesce(s.next_attempt_at,
                   (SELECT c.recorded_at FROM change_event c WHERE c.seq =
                      (SELECT e.change_seq + (s.delivered_through + 1 - e.event_number)
                       FROM subscription_event e
                       WHERE e.subscription_id = s.id AND e.event_number <= s.delivered_through + 1
                       ORDER BY e.event_number DESC LIMIT 1))) <= $1))";

/// How a chunk of matches is written: each subscription's number of matches (its counter
/// moves once, by that many) and the runs its event-log rows hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RunPlan {
    /// Each matched subscription and its number of matches, in order of first match.
    pub counts: Vec<(SubscriptionId, i64)>,
    pub runs: Vec<Run>,
}

/// Consecutive matches of one subscription whose changes have consecutive `seq`s: one row
/// of `subscription_event`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    /// The subscription, by its place in `RunPlan::counts`.
    pub subscription: usize,
    /// How many of the subscription's matches in this chunk come before the run: its first
    /// event number is the counter before the chunk plus this plus 1.
    pub offset: i64,
    pub change_seq: ChangeSeq,
    pub events: i64,
}

/// Plans the rows of a chunk of matches, numbered in the order given. A catch-all
/// subscription that hears every change of the chunk gets one run; one that hears a single
/// change gets a run of one. `seq`s with a gap between them never share a run, so a run
/// can be expanded from `change_event` by `seq` alone (`SUBSCRIPTION_EVENTS`).
pub(crate) fn plan_runs(matches: &[MatchRow]) -> RunPlan {
    let mut places: HashMap<&str, usize> = HashMap::new();
    let mut counts: Vec<(SubscriptionId, i64)> = Vec::new();
    // The run each subscription's last match went to.
    let mut last_run: Vec<usize> = Vec::new();
    let mut runs: Vec<Run> = Vec::new();
    for m in matches {
        let place = *places.entry(m.subscription_id.as_str()).or_insert_with(|| {
            counts.push((m.subscription_id.clone(), 0));
            last_run.push(usize::MAX);
            counts.len() - 1
        });
        let offset = counts[place].1;
        let extends = runs.get(last_run[place]).is_some_and(|run| {
            run.change_seq.get().checked_add(run.events) == Some(m.change_seq.get())
        });
        if extends {
            runs[last_run[place]].events += 1;
        } else {
            runs.push(Run {
                subscription: place,
                offset,
                change_seq: m.change_seq,
                events: 1,
            });
            last_run[place] = runs.len() - 1;
        }
        counts[place].1 += 1;
    }
    RunPlan { counts, runs }
}

/// The event number of each match whose subscription was counted, in the order given,
/// from each subscription's counter before the chunk (`before`; a subscription missing from
/// it, deleted or `off`, gets none).
pub(crate) fn number_matches(
    matches: Vec<MatchRow>,
    before: &HashMap<SubscriptionId, i64>,
) -> Vec<(SubscriptionId, EventNumber)> {
    let mut next: HashMap<SubscriptionId, i64> = HashMap::with_capacity(before.len());
    let mut numbered = Vec::with_capacity(matches.len());
    for m in matches {
        let Some(&start) = before.get(&m.subscription_id) else {
            continue;
        };
        let number = next.entry(m.subscription_id.clone()).or_insert(start);
        *number += 1;
        numbered.push((m.subscription_id, EventNumber::new(*number)));
    }
    numbered
}

/// The earliest due date after `$1` (the due date is the `due_end` column of the Task row,
/// served by the partial index `task_due_end`).
pub(crate) const NEXT_DUE: &str =
    "SELECT min(due_end) FROM task WHERE deleted = 0 AND due_end > $1";

/// Marks Task `$1` reported for due date `$2`; inserts nothing when it already was.
pub(crate) const MARK_OVERDUE: &str =
    "INSERT INTO task_overdue (task_id, due_at) VALUES ($1, $2) ON CONFLICT DO NOTHING";

/// The `overdue` change event of version `$2` of Task `$1`, recorded at `$3`.
pub(crate) const OVERDUE_EVENT: &str =
    "INSERT INTO change_event (resource_type, resource_id, version, previous_version, interaction, recorded_at)
     VALUES ('Task', $1, $2, NULL, 'overdue', $3)";

/// The condition on `task t` of a Task that is still open: its status is not terminal.
fn still_open() -> String {
    let terminal: Vec<String> = TERMINAL_STATUSES.iter().map(|s| format!("'{s}'")).collect();
    format!("t.status NOT IN ({})", terminal.join(", "))
}

/// At most `$2` live, open Tasks whose due date passed by `$1` and was not yet reported, as
/// `(task_id, end_at)`, earliest first. (SQLite numbers `$N` in order of first appearance, so
/// each statement here names its parameters in their numeric order.)
pub(crate) fn overdue_tasks() -> String {
    format!(
        "SELECT t.id AS task_id, t.due_end AS end_at FROM task t
         WHERE t.deleted = 0 AND t.due_end <= $1
           AND {}
           AND NOT EXISTS (SELECT 1 FROM task_overdue o WHERE o.task_id = t.id AND o.due_at = t.due_end)
         ORDER BY t.due_end LIMIT $2",
        still_open()
    )
}

/// The current version of Task `$2` if it is live, open, and due `$1`, which passed by
/// `$3`: checked again inside the transaction that reports it, since the Task may have been
/// completed or given a new due date after it was found. `lock` ends the statement (a
/// backend's row lock, or nothing).
pub(crate) fn overdue_version(lock: &str) -> String {
    format!(
        "SELECT t.version FROM task t
         WHERE t.due_end = $1 AND t.id = $2 AND t.deleted = 0 AND t.due_end <= $3
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

/// Subscriptions per status, for `/metrics`.
pub(crate) const SUBSCRIPTIONS_BY_STATUS: &str =
    "SELECT status, count(*) FROM subscription GROUP BY status";

/// The largest backlogs (events counted and not delivered, whatever the status), at most
/// `$1`, largest first, for `/metrics`.
pub(crate) const LARGEST_BACKLOGS: &str =
    "SELECT id, events_since_start - delivered_through FROM subscription
     WHERE delivered_through < events_since_start
     ORDER BY 2 DESC, id LIMIT $1";

/// When the oldest undelivered event of any subscription happened: per subscription with a
/// backlog, the change of its first undelivered event (found in its run as `WORK_WAITING`
/// finds it), for `/metrics`.
pub(crate) const OLDEST_UNDELIVERED: &str = "SELECT min(c.recorded_at) FROM subscription s
     JOIN change_event c ON c.seq =
       (SELECT e.change_seq + (s.delivered_through + 1 - e.event_number)
        FROM subscription_event e
        WHERE e.subscription_id = s.id AND e.event_number <= s.delivered_through + 1
        ORDER BY e.event_number DESC LIMIT 1)
     WHERE s.delivered_through < s.events_since_start";

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

    fn m(subscription: &str, seq: i64) -> MatchRow {
        MatchRow {
            subscription_id: SubscriptionId::parse(subscription).unwrap(),
            change_seq: ChangeSeq::new(seq),
        }
    }

    /// A catch-all that hears every change of a chunk gets one run; one that hears changes
    /// with a gap between them a run per stretch; each counter moves by its matches.
    #[test]
    fn runs_cover_consecutive_changes_of_a_subscription() {
        let matches = [
            m("all", 10),
            m("owner", 10),
            m("all", 11),
            m("gappy", 11),
            m("all", 12),
            m("gappy", 13),
            m("gappy", 14),
        ];
        let plan = plan_runs(&matches);
        let id = |s: &str| SubscriptionId::parse(s).unwrap();
        assert_eq!(
            plan.counts,
            [(id("all"), 3), (id("owner"), 1), (id("gappy"), 3)]
        );
        let runs: Vec<(usize, i64, i64, i64)> = plan
            .runs
            .iter()
            .map(|r| (r.subscription, r.offset, r.change_seq.get(), r.events))
            .collect();
        assert_eq!(
            runs,
            [(0, 0, 10, 3), (1, 0, 10, 1), (2, 0, 11, 1), (2, 1, 13, 2)]
        );
        assert_eq!(
            plan_runs(&[]),
            RunPlan {
                counts: vec![],
                runs: vec![]
            }
        );
    }

    /// Numbers follow each counter in the order given; an uncounted subscription (deleted or
    /// off) gets none, and the others are not shifted by it.
    #[test]
    fn matches_are_numbered_from_each_counter() {
        let id = |s: &str| SubscriptionId::parse(s).unwrap();
        let before = HashMap::from([(id("a"), 7), (id("b"), 0)]);
        let numbered = number_matches(
            vec![m("a", 1), m("off", 1), m("b", 1), m("a", 2), m("b", 5)],
            &before,
        );
        let numbered: Vec<(String, i64)> = numbered
            .into_iter()
            .map(|(s, n)| (s.to_string(), n.get()))
            .collect();
        assert_eq!(
            numbered,
            [
                ("a".into(), 8),
                ("b".into(), 1),
                ("a".into(), 9),
                ("b".into(), 2)
            ]
        );
    }

    /// The open-Task condition names exactly the terminal statuses of `fhir::task`.
    #[test]
    fn overdue_tasks_are_the_open_ones() {
        let sql = overdue_tasks();
        assert!(sql.contains(
            "t.status NOT IN ('completed', 'cancelled', 'failed', 'rejected', 'entered-in-error')"
        ));
        assert!(overdue_version("FOR SHARE OF t").ends_with(" FOR SHARE OF t"));
    }
}
