//! Spans exported over OTLP (`[telemetry]`), and what `/metrics` says about itself and about
//! the subscriptions: `# HELP` text for every family Baton records, `baton_build_info`, and
//! the subscription gauges, read from the store when someone scrapes (in the background: a
//! scrape shows what the previous read found, and costs nothing when nobody scrapes).

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};

use crate::config::{OtlpProtocol, TelemetryConfig};
use crate::store::{Store, SubscriptionGauges};
use crate::trace::TraceContext;

/// A span to export: one piece of Baton's work in a trace, with the ids Baton gave it (the
/// same ids it logs and sends on in `traceparent` headers, so an exported trace joins the
/// receiver's spans).
pub struct FinishedSpan {
    pub name: Cow<'static, str>,
    pub kind: SpanKind,
    /// The span's own trace and span id.
    pub context: TraceContext,
    /// The span it was done for, if any: the caller's (remote) or Baton's own.
    pub parent: Option<Parent>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// A span's parent: its id, and whether it is another process's.
#[derive(Debug, Clone, Copy)]
pub struct Parent {
    pub span_id: [u8; 8],
    pub remote: bool,
}

/// The exporter, when `[telemetry] otlp_endpoint` is set: a batch processor posting to the
/// collector from a thread of its own, so no request or delivery ever waits for it.
struct Export {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
}

/// One per process (tests start several servers in one process; the first configures it).
static EXPORT: OnceLock<Export> = OnceLock::new();

/// Starts exporting spans if the configuration asks for it. A collector that is down costs
/// only dropped spans (the processor's queue is bounded), never a slower request.
pub fn start_export(config: &TelemetryConfig, node: &str) -> Result<(), String> {
    let Some(url) = config.traces_url() else {
        return Ok(());
    };
    if EXPORT.get().is_some() {
        return Ok(());
    }
    let protocol = match config.otlp_protocol {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
        OtlpProtocol::HttpJson => Protocol::HttpJson,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url.clone())
        .with_protocol(protocol)
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint {url}: {e}"))?;
    let mut processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_scheduled_delay(Duration::from_millis(500))
                .build(),
        )
        .build();
    processor.set_resource(
        &Resource::builder()
            .with_service_name("baton")
            .with_attribute(KeyValue::new("service.instance.id", node.to_string()))
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build(),
    );
    let scope = InstrumentationScope::builder("baton")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    if EXPORT.set(Export { processor, scope }).is_ok() {
        tracing::info!(otlp.endpoint = %url, "exporting spans over OTLP");
    }
    Ok(())
}

/// Whether spans are exported: callers skip building them otherwise.
pub fn exporting() -> bool {
    EXPORT.get().is_some()
}

/// Hands a finished span to the exporter (nothing when export is off).
pub fn export(span: FinishedSpan) {
    let Some(export) = EXPORT.get() else {
        return;
    };
    let (trace_id, span_id, sampled) = span.context.parts();
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let status = match span.error {
        Some(message) => Status::error(message),
        None => Status::Unset,
    };
    export.processor.on_end(SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(trace_id),
            SpanId::from_bytes(span_id),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: span
            .parent
            .map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.span_id)),
        parent_span_is_remote: span.parent.is_some_and(|p| p.remote),
        span_kind: span.kind,
        name: span.name,
        start_time: span.start,
        end_time: span.end,
        attributes: span.attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: export.scope.clone(),
    });
}

/// Sends what is queued (at shutdown, so the last spans are not lost). It waits for the
/// collector, so it runs off the async workers.
pub async fn flush_export() {
    if EXPORT.get().is_none() {
        return;
    }
    let flushed =
        tokio::task::spawn_blocking(|| EXPORT.get().map(|e| e.processor.force_flush())).await;
    if let Ok(Some(Err(e))) = flushed {
        tracing::warn!(error = %e, "could not flush the spans to the OTLP collector");
    }
}

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
        "baton_search_inline_overruns_total",
        "Task searches (SQLite) that outran their time on the API runtime and ran again on a blocking thread.",
    ),
    (
        Kind::Counter,
        "baton_search_text_cache_hits_total",
        "Tasks of SQLite search pages whose text came from the in-memory text cache (store.search_text_cache_mib).",
    ),
    (
        Kind::Counter,
        "baton_search_text_cache_misses_total",
        "Tasks of SQLite search pages read from the table because the text cache did not hold them.",
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
        Kind::Counter,
        "baton_store_locked_changes_total",
        "PostgreSQL Task changes written in a transaction that locks the Task: those with effects on other Tasks, deletes, and those whose Task changed between the unlocked read and the write.",
    ),
    (
        Kind::Counter,
        "baton_store_put_groups_split_total",
        "PostgreSQL groups of plain Task writes the server refused as a whole (e.g. two writes to one Task), written again one write at a time.",
    ),
    (
        Kind::Histogram,
        "baton_store_write_wait_seconds",
        "Time from queueing a write for the SQLite writer to its answer (after its group's commit, and with store.synchronous = full after the WAL sync), by lane (request: Task and Subscription writes; hub: fan-out chunks, delivery results, audits).",
    ),
    (
        Kind::Histogram,
        "baton_store_wal_sync_seconds",
        "Time of one fdatasync of the SQLite WAL by the syncer thread, which answers the groups committed before it (store.synchronous = full).",
    ),
    (
        Kind::Counter,
        "baton_writer_groups_total",
        "Groups committed by the SQLite writer, by what they held (requests, hub, both: requests that shared their commit with the hub's bookkeeping).",
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
        Kind::Counter,
        "baton_audit_dropped_total",
        "AuditEvents of reads, searches, refusals, Subscription changes and deliveries lost: the queue was full or its write failed.",
    ),
    (
        Kind::Counter,
        "baton_audit_refusals_dropped_total",
        "401/403 refusals not recorded as AuditEvents: over the per-address budget (10/s, burst 50).",
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
    (
        Kind::Counter,
        "baton_issuer_tokens_verified_total",
        "Issuer tokens whose signature was checked, by whether an earlier check of the same token was reused (cached) or the signature was verified (verified).",
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

/// Whether a read of the subscription gauges is under way.
static REFRESHING: AtomicBool = AtomicBool::new(false);

/// The longest a read of the subscription gauges may take before it is given up.
const GAUGES_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts reading the subscription gauges from the store, unless a read is under way, and
/// returns at once: a scrape renders what the last read found and never waits for the
/// database (a stuck or locked database must not take `/metrics` down with it). So the
/// figures are one scrape old, and the database is read only as often as someone scrapes.
pub fn refresh_subscription_gauges(store: Arc<dyn Store>) {
    if REFRESHING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async move {
        match tokio::time::timeout(
            GAUGES_TIMEOUT,
            store.subscription_gauges(MAX_BACKLOG_SERIES),
        )
        .await
        {
            Ok(Ok(gauges)) => set_subscription_gauges(&gauges, time::OffsetDateTime::now_utc()),
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error::error_chain(&e), "could not read the subscription gauges for /metrics");
            }
            Err(_) => tracing::warn!(
                "reading the subscription gauges for /metrics took over 30 s; given up"
            ),
        }
        REFRESHING.store(false, Ordering::Release);
    });
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
