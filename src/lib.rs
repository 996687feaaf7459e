//! Baton: a FHIR R4 workflow Task server with a topic-based Subscription notification hub.
//!
//! `run` starts the whole server on a listener that the caller provides, so the integration
//! tests drive exactly what `baton serve` runs. See ARCHITECTURE.md for the map.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod fhir;
pub mod store;

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
use crate::config::DatabaseUrl;
use crate::fhir::search::SearchLimits;
use crate::store::Store;
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
        DatabaseUrl::Postgres(_) => {
            return Err(Error::internal(
                "invalid configuration",
                "the PostgreSQL store is not available in this version; use sqlite://",
            ));
        }
    };

    let state = AppState {
        inner: Arc::new(Shared {
            search_limits: SearchLimits {
                default_count: config.search.default_count,
                max_count: config.search.max_count,
            },
            base_url: base_url.clone(),
            auth: authenticator,
            store: store.clone(),
            metrics: metrics_handle(),
            shutdown: shutdown.clone(),
            config,
        }),
    };
    let grace = Duration::from_secs(state.config.shutdown_grace_seconds);
    let app = api::router(state);

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
    store.close().await;
    tracing::info!("Baton stopped");
    served.map_err(|e| Error::internal("the HTTP server failed", e))
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
