//! `baton-load bare-server`: the ceiling. An axum handler for the same routes as Baton's Task
//! writes that echoes the body (no auth, no parsing, no storage), driven by `tasks` with the
//! same client and request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{post, put};
use baton_tools::common::fhir::FHIR_JSON;
use serde_json::json;

#[derive(clap::Args)]
pub struct Options {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

pub async fn run(options: &Options) -> anyhow::Result<bool> {
    let (listener, served) = setup(options.listen).await?;
    drive(listener, served.clone()).await?;
    // Collect and verify: the echo server counts its requests; it has nothing to check.
    let served = served.load(Ordering::Relaxed);
    println!("bare-server: served {served} requests");
    println!(
        "{}",
        json!({ "mode": "bare-server", "listen": options.listen.to_string(), "requests": served })
    );
    Ok(true)
}

async fn setup(listen: SocketAddr) -> anyhow::Result<(tokio::net::TcpListener, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!(
        "bare-server: echoing POST /fhir/Task and PUT /fhir/Task/{{id}} on http://{listen}/fhir (Ctrl-C or SIGTERM stops)"
    );
    Ok((listener, Arc::default()))
}

/// Serves until SIGINT or SIGTERM.
async fn drive(listener: tokio::net::TcpListener, served: Arc<AtomicU64>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/fhir/Task", post(create))
        .route("/fhir/Task/{id}", put(update))
        .with_state(served);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await
        .context("serving")
}

async fn create(State(served): State<Arc<AtomicU64>>, body: Bytes) -> impl IntoResponse {
    served.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        body,
    )
}

async fn update(
    State(served): State<Arc<AtomicU64>>,
    Path(_id): Path<String>,
    body: Bytes,
) -> impl IntoResponse {
    served.fetch_add(1, Ordering::Relaxed);
    (StatusCode::OK, [(header::CONTENT_TYPE, FHIR_JSON)], body)
}

async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
