//! Operator endpoints outside `/fhir`: liveness, readiness and Prometheus metrics.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The process is up and serving HTTP.
async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// The node can take traffic: the database answers, no vital task has died and shutdown has
/// not begun.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "draining" })),
        )
            .into_response();
    }
    // AMQP being down degrades one channel (its deliveries wait in the durable queue); the
    // node still serves the API, so it stays ready and says what is degraded.
    let amqp = state.hub.amqp.as_ref().map(|a| {
        if a.is_connected() {
            "connected"
        } else {
            "unreachable"
        }
    });
    // Redis being down costs latency, not data (nodes poll the store, websocket listeners
    // catch up with $events): ready, and degraded.
    let redis = state.websockets.signals.redis_state();
    // Every long-running task by name: a vital one that died makes the node unready (it is
    // stopping); one being restarted after a failure degrades it.
    let tasks = state.health.snapshot();
    if let Some(reason) = state.health.fatal_reason() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "status": "failed", "reason": reason, "tasks": tasks })),
        )
            .into_response();
    }
    match state.store.ping().await {
        Ok(()) => {
            let mut body = json!({
                "status": "ready",
                "database": "ok",
                "node": state.hub.node,
                "matcher": state.hub.matching.load(std::sync::atomic::Ordering::Relaxed),
                "live_nodes": state.hub.nodes.live().len(),
                "tasks": tasks,
            });
            let mut degraded = Vec::new();
            if !state.health.all_running() {
                degraded.push("tasks");
            }
            degraded.extend(state.health.conditions());
            if let Some(amqp) = amqp {
                body["amqp"] = json!(amqp);
                if amqp != "connected" {
                    degraded.push("amqp");
                }
            }
            // An identity provider that cannot be reached degrades the node: tokens signed with
            // keys fetched before keep working, new keys cannot be learnt.
            let issuers = state.auth.issuers().status();
            if !issuers.is_empty() {
                if issuers.iter().any(|i| i.status != "ok") {
                    degraded.push("identity");
                }
                body["issuers"] = json!(issuers);
            }
            if let Some(redis) = redis {
                body["redis"] = json!(redis);
                if redis != "ok" {
                    degraded.push("redis");
                }
            }
            if !degraded.is_empty() {
                body["degraded"] = json!(degraded);
            }
            axum::Json(body).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::error_chain(&e), "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(
                    json!({ "status": "unavailable", "database": "unreachable", "tasks": tasks }),
                ),
            )
                .into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    crate::telemetry::refresh_subscription_gauges(state.store.clone());
    super::render_metrics(&state)
}
