//! Baton: a FHIR R4 workflow Task server with a topic-based Subscription notification hub.
//!
//! `run` starts the whole server on a listener that the caller provides, so the integration
//! tests drive exactly what `baton serve` runs. See ARCHITECTURE.md for the map.

pub mod api;
pub mod auth;
pub mod channels;
pub mod config;
pub mod delivery;
pub mod error;
pub mod fhir;
pub mod matcher;
pub mod outbox;
pub mod overdue;
pub mod signals;
pub mod store;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::{Error, Result};

use crate::api::subscription::Hub;
use crate::api::{AppState, Shared};
use crate::auth::Authenticator;
use crate::channels::rest_hook::RestHook;
use crate::config::DatabaseUrl;
use crate::delivery::Deliverer;
use crate::fhir::search::SearchLimits;
use crate::matcher::topic;
use crate::signals::Signals;
use crate::signals::redis::{RedisSetup, RedisSignals};
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;

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
    );

    let committed = Arc::new(Notify::new());
    let store: Arc<dyn Store> = match config
        .database()
        .map_err(|e| Error::internal("invalid configuration", e))?
    {
        DatabaseUrl::Sqlite(path) => {
            tracing::info!(path = %path.display(), "opening the SQLite store");
            Arc::new(SqliteStore::open(&path, &base_url, &config.store, committed.clone()).await?)
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
    };
    let rest_hook = RestHook::new(config.allow_private_endpoints, config.allow_http_endpoints);
    let tasks = tokio_util::task::TaskTracker::new();
    let pipeline_stop = CancellationToken::new();

    let parse_topics = topics.clone();
    let parse_config = config.clone();
    let parse_limits = search_limits;
    let parse_base = base_url.clone();
    let parse: delivery::ParseSubscription = Arc::new(move |resource| {
        api::subscription::parse_with(
            &parse_topics,
            &parse_config,
            &parse_limits,
            &parse_base,
            resource,
        )
    });
    let registry = Arc::new(channels::websocket::Registry::default());
    // Signals: in-process for one node; Redis when the nodes of a cluster must hear each other.
    let (notices, mut remote_changes) = tokio::sync::mpsc::unbounded_channel::<String>();
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
                },
                pipeline_stop.clone(),
                &tasks,
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
            channels::amqp::AmqpPublisher::start(url, amqp_stop.clone())
                .map_err(|e| Error::internal("invalid configuration", e))?,
        ),
        None => None,
    };
    let deliverer = Arc::new(Deliverer {
        store: store.clone(),
        rest_hook: rest_hook.clone(),
        amqp: amqp.clone(),
        signals: signals.clone(),
        base_url: base_url.clone(),
        config: config.delivery.clone(),
        parse: parse.clone(),
        node: node.clone(),
        lease: Duration::from_secs(config.cluster.lease_seconds),
        scan_every: Duration::from_secs(config.cluster.scan_seconds),
    });
    let (delivery, scheduler) = delivery::start(deliverer, pipeline_stop.clone()).await?;

    let state = AppState {
        inner: Arc::new(Shared {
            hub: Hub {
                topics: topics.clone(),
                index: Default::default(),
                delivery: delivery.clone(),
                rest_hook,
                amqp: amqp.clone(),
                websockets: Arc::new(channels::websocket::WebSocketHub {
                    registry,
                    signals,
                    store: store.clone(),
                    base_url: base_url.clone(),
                    config: config.websocket.clone(),
                    shutdown: shutdown.clone(),
                }),
                matching: Default::default(),
                node: node.clone(),
            },
            search_limits,
            searches: api::admission::Admission::new(
                config.limits.max_concurrent_searches,
                config.limits.search_queue,
            ),
            base_url: base_url.clone(),
            auth: authenticator,
            store: store.clone(),
            metrics: metrics_handle(),
            shutdown: shutdown.clone(),
            config,
        }),
    };
    let grace = Duration::from_secs(state.config.shutdown_grace_seconds);
    // Every live subscription goes back into the matcher index before the first change is read;
    // the generation is read first, so the outbox catches up on anything written meanwhile.
    let generation = store.subscription_generation().await?;
    for stored in store.live_subscriptions().await? {
        match api::subscription::parse_spec(&state, &stored.resource) {
            Ok(spec) => api::subscription::index_only(&state, &stored, &spec),
            Err(e) => {
                tracing::warn!(subscription.id = %stored.id, error = %error::error_chain(&e), "a stored subscription is no longer valid and is not matched")
            }
        }
    }
    let outbox = outbox::Outbox {
        store: store.clone(),
        topics,
        index: state.hub.index.clone(),
        delivery,
        base_url: base_url.clone(),
        parse,
        node: node.clone(),
        lease: Duration::from_secs(state.config.cluster.lease_seconds),
        generation,
        matching: state.hub.matching.clone(),
    };
    tasks.spawn(outbox.run(matcher_wake.clone(), pipeline_stop.clone()));
    // Subscriptions written on other nodes: this node's scheduler, sockets and index follow.
    let remote_state = state.clone();
    let remote_stop = pipeline_stop.clone();
    tasks.spawn(async move {
        loop {
            let id = tokio::select! {
                id = remote_changes.recv() => match id {
                    Some(id) => id,
                    None => return,
                },
                () = remote_stop.cancelled() => return,
            };
            api::subscription::apply_remote_change(&remote_state, &id).await;
            matcher_wake.notify_one();
        }
    });
    tasks.spawn(overdue::run(
        store.clone(),
        Duration::from_secs(state.config.overdue_check_seconds),
        pipeline_stop.clone(),
    ));
    tasks.spawn(prune_events(
        store.clone(),
        state.config.delivery.event_retention_days,
        pipeline_stop.clone(),
    ));
    tasks.close();
    let app = api::router(state);

    // Counters that alerts watch exist from the start, at 0, rather than after the first event.
    metrics::counter!("baton_websocket_closed_slow_total").increment(0);
    metrics::counter!("baton_events_withheld_total").increment(0);
    tracing::info!(listen = %bound, base_url = %base_url, "Baton is serving");
    let server = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future();
    let mut server = std::pin::pin!(server);
    let served = tokio::select! {
        result = &mut server => result,
        () = shutdown.cancelled() => {
            // Graceful shutdown has begun inside axum; give in-flight requests the grace period.
            match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(grace_seconds = grace.as_secs(), "requests still running at the shutdown deadline were cut off");
                    Ok(())
                }
            }
        }
    };
    // The pipeline stops after the last request: what it has not finished stays in the store.
    pipeline_stop.cancel();
    tasks.wait().await;
    let _ = scheduler.await;
    amqp_stop.cancel();
    if let Some(amqp) = &amqp {
        amqp.closed().await;
    }
    store.close().await;
    tracing::info!("Baton stopped");
    served.map_err(|e| Error::internal("the HTTP server failed", e))
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
async fn prune_events(store: Arc<dyn Store>, retention_days: u64, stop: CancellationToken) {
    loop {
        let cutoff = time::OffsetDateTime::now_utc() - time::Duration::days(retention_days as i64);
        match store
            .prune_events(&fhir::datetime::format_instant(cutoff))
            .await
        {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "pruned delivered events past retention"),
            Err(e) => {
                tracing::warn!(error = %error::error_chain(&e), "pruning the event log failed")
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
                .expect("no other metrics recorder is installed")
        })
        .clone()
}
