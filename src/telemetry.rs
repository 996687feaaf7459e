//! What `/metrics` says about itself and about the subscriptions: `# HELP` text for every
//! family Baton records, `baton_build_info`, and the subscription gauges read from the store
//! at each scrape (so they are never stale and cost nothing between scrapes).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use crate::store::{Store, SubscriptionGauges};

/// The most subscriptions given their own backlog series: the largest backlogs, which are the
/// ones an operator looks for, without one series per subscription of a large hub.
pub const MAX_BACKLOG_SERIES: usize = 100;

/// Every statistic Baton records, with its help text. Kept in one table so that a family
/// without help shows up in review, and `tests/operating.rs` checks `/metrics` against it.
const FAMILIES: &[(Kind, &str, &str)] = &[
    (
        Kind::Gauge,
        "baton_build_info",
        "Always 1; the label `version` is this build's version.",
    ),
    (
        Kind::Counter,
        "baton_http_requests_total",
        "HTTP requests answered, by method, route and status.",
    ),
    (
        Kind::Histogram,
        "baton_http_request_duration_seconds",
        "Time to answer an HTTP request, by method and route.",
    ),
    (
        Kind::Counter,
        "baton_request_panics_total",
        "Requests whose handler panicked (answered 500; the node goes on).",
    ),
    (
        Kind::Counter,
        "baton_task_writes_total",
        "Task writes committed, by interaction.",
    ),
    (
        Kind::Counter,
        "baton_task_searches_total",
        "Task searches served.",
    ),
    (
        Kind::Gauge,
        "baton_searches_running",
        "Task searches running now.",
    ),
    (
        Kind::Gauge,
        "baton_searches_waiting",
        "Task searches waiting for a slot.",
    ),
    (
        Kind::Counter,
        "baton_searches_refused_total",
        "Task searches refused (429) because too many were waiting.",
    ),
    (
        Kind::Counter,
        "baton_requests_throttled_total",
        "Requests refused (429) by the per-token rate limit, by role.",
    ),
    (
        Kind::Gauge,
        "baton_rate_limited_identities",
        "Identities the rate limiter is tracking.",
    ),
    (
        Kind::Counter,
        "baton_writes_refused_total",
        "Writes refused (429) under back-pressure, by reason (write-queue, fanout-lag).",
    ),
    (
        Kind::Gauge,
        "baton_writer_queue_depth",
        "Jobs waiting for the SQLite writer.",
    ),
    (
        Kind::Histogram,
        "baton_store_commit_seconds",
        "Time to commit one group of writes.",
    ),
    (
        Kind::Histogram,
        "baton_store_commit_batch_size",
        "Jobs committed together by the SQLite writer.",
    ),
    (
        Kind::Counter,
        "baton_write_job_panics_total",
        "Write jobs that panicked (rolled back alone; the writer goes on).",
    ),
    (
        Kind::Counter,
        "baton_unreadable_versions_total",
        "Stored Task versions that could not be read back.",
    ),
    (
        Kind::Counter,
        "baton_events_total",
        "Subscription events recorded by the matcher.",
    ),
    (
        Kind::Counter,
        "baton_changes_matched_total",
        "Task changes matched against the subscriptions.",
    ),
    (
        Kind::Counter,
        "baton_changes_skipped_total",
        "Task changes passed over by the matcher, by reason.",
    ),
    (
        Kind::Histogram,
        "baton_match_batch_seconds",
        "Time to match and record one batch of changes.",
    ),
    (
        Kind::Counter,
        "baton_fanout_chunks_total",
        "Fan-out transactions (bounded chunks of matches) committed.",
    ),
    (
        Kind::Gauge,
        "baton_fanout_lag_changes",
        "Committed Task changes not yet matched to subscriptions.",
    ),
    (
        Kind::Counter,
        "baton_deliveries_total",
        "Delivery attempts, by channel, notification type and result.",
    ),
    (
        Kind::Histogram,
        "baton_delivery_seconds",
        "Time of one delivery attempt, by channel.",
    ),
    (
        Kind::Counter,
        "baton_delivery_claims_busy_total",
        "Delivery attempts skipped because another attempt held the subscription.",
    ),
    (
        Kind::Histogram,
        "baton_delivery_reports_per_write",
        "Delivery results recorded in one store write.",
    ),
    (
        Kind::Counter,
        "baton_events_withheld_total",
        "Events left out of a notification because its author may not read the Task.",
    ),
    (
        Kind::Counter,
        "baton_subscriptions_undeliverable_total",
        "Attempts this node's configuration could not make (e.g. no AMQP broker), by reason.",
    ),
    (
        Kind::Gauge,
        "baton_subscriptions",
        "Subscriptions in the store, by status (the same on every node).",
    ),
    (
        Kind::Gauge,
        "baton_subscription_backlog_events",
        "Events counted and not yet delivered, for the subscriptions with the largest backlogs.",
    ),
    (
        Kind::Gauge,
        "baton_oldest_undelivered_event_age_seconds",
        "Age of the oldest event not yet delivered to its subscription (0 when none).",
    ),
    (
        Kind::Counter,
        "baton_tasks_overdue_total",
        "Tasks found past their due date (task-overdue events).",
    ),
    (
        Kind::Gauge,
        "baton_websocket_connections",
        "Open websocket connections.",
    ),
    (
        Kind::Counter,
        "baton_websocket_closed_slow_total",
        "Websockets closed because they could not keep up.",
    ),
    (
        Kind::Counter,
        "baton_websocket_closed_unbound_total",
        "Websockets closed because they bound no subscription in time.",
    ),
    (
        Kind::Gauge,
        "baton_connections_open",
        "Open HTTP connections.",
    ),
    (
        Kind::Counter,
        "baton_connections_refused_total",
        "HTTP connections refused, by reason.",
    ),
    (
        Kind::Counter,
        "baton_connections_deferred_total",
        "HTTP connections made to wait for a free slot.",
    ),
    (
        Kind::Counter,
        "baton_connections_closed_total",
        "HTTP connections closed by the server, by reason.",
    ),
    (
        Kind::Counter,
        "baton_signals_dropped_total",
        "Cluster signals (Redis) that could not be sent.",
    ),
    (
        Kind::Gauge,
        "baton_task_up",
        "1 while a supervised background task runs, by task.",
    ),
    (
        Kind::Gauge,
        "baton_task_restarts",
        "Restarts of a supervised background task, by task.",
    ),
    (
        Kind::Counter,
        "baton_task_failures_total",
        "Failures of a supervised background task, by task.",
    ),
    (
        Kind::Counter,
        "baton_panics_total",
        "Panics anywhere in the process.",
    ),
    (
        Kind::Counter,
        "baton_jwks_fetches_total",
        "Fetches of a trusted issuer's signing keys (JWKS), successful or not.",
    ),
    (
        Kind::Counter,
        "baton_jwks_fetch_failures_total",
        "Fetches of a trusted issuer's signing keys that failed (the cached keys stay in use).",
    ),
];

#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Gives every family its help text and sets `baton_build_info`. Called once, when the
/// process-wide recorder is installed.
pub fn describe_metrics() {
    for (kind, name, help) in FAMILIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
    metrics::gauge!("baton_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The names of every family described here.
pub fn family_names() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().map(|(_, name, _)| *name)
}

/// The subscriptions that had a backlog series at the last scrape: a series whose backlog
/// is gone is set to 0 rather than left at its last value.
static BACKLOG_SERIES: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Reads the subscription gauges from the store and sets them, before a scrape renders.
pub async fn record_subscription_gauges(store: &dyn Store, now: time::OffsetDateTime) {
    let gauges = match store.subscription_gauges(MAX_BACKLOG_SERIES).await {
        Ok(gauges) => gauges,
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "could not read the subscription gauges for /metrics");
            return;
        }
    };
    set_subscription_gauges(&gauges, now);
}

fn set_subscription_gauges(gauges: &SubscriptionGauges, now: time::OffsetDateTime) {
    for status in ["requested", "active", "error", "off"] {
        let count = gauges
            .by_status
            .iter()
            .find(|(s, _)| s == status)
            .map_or(0, |(_, n)| *n);
        metrics::gauge!("baton_subscriptions", "status" => status).set(count as f64);
    }
    let mut series = BACKLOG_SERIES
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let before = series.take().unwrap_or_default();
    let now_listed: HashSet<String> = gauges
        .backlogs
        .iter()
        .map(|(id, _)| id.to_string())
        .collect();
    for gone in before.difference(&now_listed) {
        metrics::gauge!("baton_subscription_backlog_events", "subscription" => gone.clone())
            .set(0.0);
    }
    for (id, backlog) in &gauges.backlogs {
        metrics::gauge!("baton_subscription_backlog_events", "subscription" => id.to_string())
            .set(*backlog as f64);
    }
    *series = Some(now_listed);
    let age = gauges
        .oldest_undelivered
        .as_ref()
        .and_then(|at| at.datetime())
        .map_or(0.0, |at| (now - at).as_seconds_f64().max(0.0));
    metrics::gauge!("baton_oldest_undelivered_event_age_seconds").set(age);
}
