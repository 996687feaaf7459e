//! Baton: a FHIR R4 workflow Task server with a topic-based Subscription notification hub.
//!
//! `run` starts the whole server on a listener that the caller provides, so the integration
//! tests drive exactly what `baton serve` runs. See ARCHITECTURE.md for the map.

pub mod api;
pub mod audit;
pub mod auth;
pub mod channels;
pub mod config;
pub mod delivery;
pub mod error;
pub mod fhir;
pub mod hub;
pub mod matcher;
pub mod membership;
pub mod outbox;
pub mod overdue;
pub mod runtimes;
pub mod server;
pub mod signals;
pub mod store;
pub mod supervise;
pub mod telemetry;
pub mod trace;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::{Error, Result};

use crate::api::{AppState, Shared};
use crate::auth::Authenticator;
use crate::channels::rest_hook::RestHook;
use crate::config::DatabaseUrl;
use crate::delivery::Deliverer;
use crate::fhir::ids::{StoredInstant, SubscriptionId};
use crate::fhir::search::{SearchLimits, TotalMode};
use crate::hub::Hub;
use crate::matcher::topic;
use crate::signals::Signals;
use crate::signals::redis::{RedisSetup, RedisSignals};
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::supervise::Health;

/// Runs the server on `listener` until `shutdown` is cancelled, then drains: in-flight requests
/// get `shutdown_grace_seconds` to finish, and the store finishes its queued writes and closes.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    config
        .validate()
        .map_err(|e| Error::internal("invalid configuration", e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::internal("reading the listener address failed", e))?;
    let base_url = config.base_url(bound);
    // The matcher, the delivery scheduler and the channel senders run here, apart from the
    // API (see `runtimes`); dropped when `run` returns, after the store has closed.
    let deliveries =
        runtimes::DeliveryRuntime::start(config.delivery.runtime_threads(), config.delivery.nice)?;

    let (secret, from_file) = auth::resolve_secret(config.jwt_secret.as_deref(), &config.data_dir)
        .map_err(|e| Error::internal("reading or creating the development JWT secret failed", e))?;
    if from_file {
        tracing::warn!(
            path = %config.data_dir.join("jwt-secret").display(),
            "BATON_JWT_SECRET is not set: using the development secret kept in the data directory; \
             mint tokens with `baton token --role admin`. Set BATON_JWT_SECRET in production."
        );
    }
    let authenticator = Authenticator::new(
        &secret,
        config.auth.leeway_seconds,
        &config.auth.performer_types_claim,
    )
    .with_issuers(&config.auth);

    let committed = Arc::new(Notify::new());
    // Every long-running task reports here; a vital one dying stops the node (below).
    let health = Arc::new(Health::default());
    let store: Arc<dyn Store> = match config
        .database()
        .map_err(|e| Error::internal("invalid configuration", e))?
    {
        DatabaseUrl::Sqlite(path) => {
            tracing::info!(path = %path.display(), "opening the SQLite store");
            Arc::new(
                SqliteStore::open(
                    &path,
                    &base_url,
                    &config.store,
                    committed.clone(),
                    health.clone(),
                )
                .await?,
            )
        }
        DatabaseUrl::Postgres(url) => {
            tracing::info!(database = %config::redact_url(&url), "opening the PostgreSQL store");
            Arc::new(PostgresStore::open(&url, &base_url, &config.store, committed.clone()).await?)
        }
    };
    let node = config
        .cluster
        .node_id
        .clone()
        .unwrap_or_else(default_node_id);
    telemetry::start_export(&config.telemetry, &node)
        .map_err(|e| Error::internal("starting the OTLP span export failed", e))?;

    // Topics: the built-in ones plus the operator's; anything unsupported stops start-up.
    let mut topics = topic::builtin_topics(&base_url)
        .map_err(|e| Error::internal("loading the built-in topics failed", e))?;
    if let Some(dir) = &config.topics_dir {
        let extra = topic::load_topic_dir(dir, &base_url)
            .map_err(|e| Error::internal("loading topics_dir failed", e))?;
        topics = topic::combine_topics(topics, extra)
            .map_err(|e| Error::internal("loading topics_dir failed", e))?;
    }
    let topics = Arc::new(topics);
    let search_limits = SearchLimits {
        default_count: config.search.default_count,
        max_count: config.search.max_count,
        default_total: match config.search.default_total {
            config::DefaultTotal::None => TotalMode::None,
            config::DefaultTotal::Estimate => TotalMode::Estimate,
            config::DefaultTotal::Accurate => TotalMode::Accurate,
        },
    };
    let rest_hook = RestHook::new(config.allow_private_endpoints, config.allow_http_endpoints);
    let tasks = tokio_util::task::TaskTracker::new();
    let pipeline_stop = CancellationToken::new();

    let registry = Arc::new(channels::websocket::Registry::default());
    // The hub holds the scheduler's inbox; the scheduler consumes what is sent to it (and, in
    // a cluster, the Redis listener wakes it for work another node's matcher numbered).
    let (inbox, commands) = hub::inbox();
    // Signals: in-process for one node; Redis when the nodes of a cluster must hear each other.
    let (notices, remote_changes) = tokio::sync::mpsc::unbounded_channel::<SubscriptionId>();
    let (signals, matcher_wake): (Arc<dyn Signals>, Arc<Notify>) = match &config.redis_url {
        Some(url) => {
            let matcher_wake = Arc::new(Notify::new());
            let redis = RedisSignals::start(
                RedisSetup {
                    url: url.clone(),
                    prefix: config.cluster.redis_prefix.clone(),
                    node: node.clone(),
                    registry: registry.clone(),
                    committed: committed.clone(),
                    matcher_wake: matcher_wake.clone(),
                    notices,
                    delivery: inbox.clone(),
                },
                pipeline_stop.clone(),
                &tasks,
                &health,
            )?;
            tracing::info!(redis = %config::redact_url(url), prefix = %config.cluster.redis_prefix, node = %node, "cluster signalling through Redis");
            (Arc::new(redis), matcher_wake)
        }
        None => {
            drop(notices);
            (
                Arc::new(signals::InProcess::new(registry.clone())),
                committed.clone(),
            )
        }
    };
    // The AMQP publisher connects in the background; it stops when `run` returns, however it
    // returns, and on a normal shutdown after the last delivery (below).
    let amqp_stop = CancellationToken::new();
    let _amqp_stop_guard = amqp_stop.clone().drop_guard();
    let amqp = match &config.amqp_url {
        Some(url) => Some(
            channels::amqp::AmqpPublisher::start(
                url,
                config.delivery.amqp_channels,
                amqp_stop.clone(),
                health.clone(),
            )
            .map_err(|e| Error::internal("invalid configuration", e))?,
        ),
        None => None,
    };
    let hub = Arc::new(Hub {
        topics,
        policy: hub::channel_policy(&config),
        search_limits,
        base_url: base_url.clone(),
        index: Default::default(),
        specs: Default::default(),
        shared: Default::default(),
        heartbeats: Default::default(),
        delivery: inbox,
        rest_hook,
        amqp: amqp.clone(),
        sockets: registry.clone(),
        node: node.clone(),
        matching: Default::default(),
        nodes: hub::nodes::LiveNodes::new(&node),
        audits: crate::store::audit_queue::AuditQueue::start(
            store.clone(),
            std::time::Duration::from_millis(config.audit.batch_window_ms),
        ),
    });
    // The deliverer starts its recorder on the delivery runtime.
    let deliverer = {
        let _on_deliveries = deliveries.handle().enter();
        Arc::new(Deliverer::new(
            store.clone(),
            signals.clone(),
            hub.clone(),
            &config,
        ))
    };

    let state = AppState {
        inner: Arc::new(Shared {
            hub: hub.clone(),
            websockets: Arc::new(api::websocket::WebSocketHub {
                registry,
                signals: signals.clone(),
                store: store.clone(),
                base_url: base_url.clone(),
                config: config.websocket.clone(),
                shutdown: shutdown.clone(),
                bind_timeout: Duration::from_secs(config.limits.websocket_bind_timeout_seconds),
                writers: deliveries.handle().clone(),
            }),
            search_limits,
            rate_limit: api::rate_limit::RequestLimiter::new(&config.limits),
            searches: api::admission::Admission::new(
                config.limits.max_concurrent_searches,
                config.limits.search_queue,
            ),
            base_url: base_url.clone(),
            auth: authenticator,
            store: store.clone(),
            metrics: metrics_handle(),
            shutdown: shutdown.clone(),
            health: health.clone(),
            config,
        }),
        link_base: Arc::from(base_url.as_str()),
    };
    let grace = Duration::from_secs(state.config.shutdown_grace_seconds);
    // The issuers' keys are fetched once in the background, so the first tokens find them;
    // a provider that is down does not hold up start-up (`/readyz` says so).
    if !state.auth.issuers().is_empty() {
        let auth = state.auth.clone();
        let stop = pipeline_stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = auth.issuers().warm_up() => {}
                () = stop.cancelled() => {}
            }
        });
    }
    // Every live subscription goes back into the matcher index before the first change is read;
    // the generation is read first, so the outbox catches up on anything written meanwhile.
    // One the hub can no longer deliver is handed to the scheduler (`Occasion::StartUp`).
    // They are read a page at a time; each page is parsed on every core while the next one
    // is read. The scheduler starts once they are in: it takes their heartbeats from the hub.
    let generation = store.subscription_generation().await?;
    hub.put_live_in_force(store.as_ref()).await?;
    // The scheduler and the matcher are spawned on the delivery runtime (`tasks` spawns on
    // the runtime entered), and whatever they spawn stays there.
    {
        let _on_deliveries = deliveries.handle().enter();
        delivery::start(
            deliverer,
            commands,
            health.clone(),
            &tasks,
            pipeline_stop.clone(),
        );
        let outbox = outbox::Outbox {
            store: store.clone(),
            hub: hub.clone(),
            signals,
            node: node.clone(),
            lease: Duration::from_secs(state.config.cluster.lease_seconds),
            generation,
            fanout_chunk: state.config.hub.fanout_chunk,
            fanout_linger: Duration::from_millis(state.config.hub.fanout_linger_ms),
        };
        let outbox_wake = matcher_wake.clone();
        let outbox_stop = pipeline_stop.clone();
        supervise::restartable(
            &tasks,
            health.clone(),
            "matcher",
            pipeline_stop.clone(),
            move || outbox.clone().run(outbox_wake.clone(), outbox_stop.clone()),
        );
    }
    // Subscriptions written on other nodes (a cluster signals them through Redis): this
    // node's scheduler, sockets and index follow.
    let remote_hub = hub.clone();
    let remote_store = store.clone();
    let remote_stop = pipeline_stop.clone();
    let remote_changes = Arc::new(tokio::sync::Mutex::new(remote_changes));
    let follow_remote = state.config.redis_url.is_some();
    if follow_remote {
        supervise::restartable(
            &tasks,
            health.clone(),
            "subscription-changes",
            pipeline_stop.clone(),
            move || {
                let hub = remote_hub.clone();
                let store = remote_store.clone();
                let stop = remote_stop.clone();
                let changes = remote_changes.clone();
                let wake = matcher_wake.clone();
                async move {
                    let mut changes = changes.lock().await;
                    loop {
                        let id = tokio::select! {
                            id = changes.recv() => match id {
                                Some(id) => id,
                                None => return,
                            },
                            () = stop.cancelled() => return,
                        };
                        hub.apply_remote_change(store.as_ref(), &id).await;
                        wake.notify_one();
                    }
                }
            },
        );
    }
    // This node's presence lease, and the list of live nodes that says which node each
    // subscription's deliveries prefer.
    let members_store = store.clone();
    let members_hub = hub.clone();
    let members_lease = Duration::from_secs(state.config.cluster.lease_seconds);
    let members_stop = pipeline_stop.clone();
    supervise::restartable(
        &tasks,
        health.clone(),
        "membership",
        pipeline_stop.clone(),
        move || {
            membership::run(
                members_store.clone(),
                members_hub.clone(),
                members_lease,
                members_stop.clone(),
            )
        },
    );
    let overdue_store = store.clone();
    let overdue_every = Duration::from_secs(state.config.overdue_check_seconds);
    let overdue_stop = pipeline_stop.clone();
    supervise::restartable(
        &tasks,
        health.clone(),
        "overdue",
        pipeline_stop.clone(),
        move || overdue::run(overdue_store.clone(), overdue_every, overdue_stop.clone()),
    );
    let prune_store = store.clone();
    let retention_days = state.config.delivery.event_retention_days;
    let audit_retention_days = state.config.audit.retention_days;
    let prune_stop = pipeline_stop.clone();
    supervise::restartable(
        &tasks,
        health.clone(),
        "pruning",
        pipeline_stop.clone(),
        move || {
            prune_events(
                prune_store.clone(),
                retention_days,
                audit_retention_days,
                prune_stop.clone(),
            )
        },
    );
    // The rate limiter forgets identities whose budget is full again, so its table only holds
    // recent callers.
    let rate_limit = state.rate_limit.clone();
    let rate_stop = pipeline_stop.clone();
    supervise::restartable(
        &tasks,
        health.clone(),
        "rate-limit-pruning",
        pipeline_stop.clone(),
        move || {
            rate_limit
                .clone()
                .keep_small(Duration::from_secs(60), rate_stop.clone())
        },
    );
    tasks.close();
    let connection_limits = server::ConnectionLimits::from_config(&state.config.limits);
    let app = api::router(state);

    // Counters that alerts watch exist from the start, at 0, rather than after the first event.
    metrics::counter!("baton_websocket_closed_slow_total").increment(0);
    metrics::counter!("baton_events_withheld_total").increment(0);
    metrics::counter!("baton_websocket_closed_unbound_total").increment(0);
    for role in ["practitioner", "auditor"] {
        metrics::counter!("baton_requests_throttled_total", "role" => role).increment(0);
    }
    tracing::info!(listen = %bound, base_url = %base_url, "Baton is serving");
    // Stops accepting at shutdown; in-flight requests get the grace period, then are cut off.
    // A vital task that dies starts the same shutdown (readiness already says so), so that
    // `run` returns its reason and the process exits non-zero to be restarted.
    let serving = server::serve(listener, app, connection_limits, grace, shutdown.clone());
    let mut serving = std::pin::pin!(serving);
    tokio::select! {
        () = &mut serving => {}
        () = health.failed() => {
            shutdown.cancel();
            serving.await;
        }
    }
    // The pipeline stops after the last request: what it has not finished stays in the store.
    pipeline_stop.cancel();
    tasks.wait().await;
    amqp_stop.cancel();
    if let Some(amqp) = &amqp {
        amqp.closed().await;
    }
    hub.audits.flush().await;
    store.close().await;
    telemetry::flush_export().await;
    if let Some(reason) = health.fatal_reason() {
        tracing::error!(reason = %reason, "Baton stopped because a vital task died");
        return Err(Error::internal("a vital task stopped", reason));
    }
    tracing::info!("Baton stopped");
    Ok(())
}

/// A node name that is unique even across restarts of the same host: host, process, random.
fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "baton".into());
    let suffix: u16 = rand::random();
    format!("{host}-{}-{suffix:04x}", std::process::id())
}

/// Removes delivered events older than the retention period from the event log, hourly.
/// Removes AuditEvents older than `audit.retention_days` too (0 keeps them forever).
async fn prune_events(
    store: Arc<dyn Store>,
    retention_days: u64,
    audit_retention_days: u64,
    stop: CancellationToken,
) {
    loop {
        let now = time::OffsetDateTime::now_utc();
        let cutoff = now - time::Duration::days(retention_days as i64);
        match store.prune_events(&StoredInstant::at(cutoff)).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "pruned delivered events past retention"),
            Err(e) => {
                tracing::warn!(error = %error::error_chain(&e), "pruning the event log failed")
            }
        }
        if audit_retention_days > 0 {
            let cutoff = now - time::Duration::days(audit_retention_days as i64);
            match store.prune_audit(&StoredInstant::at(cutoff)).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "pruned AuditEvents past retention"),
                Err(e) => {
                    tracing::warn!(error = %error::error_chain(&e), "pruning the audit trail failed")
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// The process-wide Prometheus recorder, installed on first use (tests run several servers in
/// one process and share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
                .expect("the bucket list is not empty")
                .install_recorder()
                .inspect(|_| telemetry::describe_metrics())
                .expect("no other metrics recorder is installed")
        })
        .clone()
}
