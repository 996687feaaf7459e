//! The HTTP surface: one file per resource or operation, each with its own router, joined
//! here with the shared state, request metrics and the FHIR error fallbacks.

pub mod admission;
pub mod health;
pub mod metadata;
pub mod subscription;
pub mod task;
pub mod topic;
pub mod websocket;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::error::{Error, IssueCode, Result};
use crate::fhir::search::SearchLimits;
use crate::store::Store;

/// Everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Shared>,
}

pub struct Shared {
    pub hub: subscription::Hub,
    pub config: Config,
    /// The FHIR base URL, e.g. `http://127.0.0.1:8080/fhir`.
    pub base_url: String,
    pub auth: Authenticator,
    pub store: Arc<dyn Store>,
    pub metrics: PrometheusHandle,
    pub search_limits: SearchLimits,
    /// Slots and a wait queue for searches, so a burst of them cannot take all the memory
    /// and connections (`limits.max_concurrent_searches`, `limits.search_queue`).
    pub searches: admission::Admission,
    /// Cancelled when shutdown begins; `/readyz` then answers 503 so balancers drain us.
    pub shutdown: CancellationToken,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.inner
    }
}

impl AsRef<Authenticator> for AppState {
    fn as_ref(&self) -> &Authenticator {
        &self.inner.auth
    }
}

/// Builds the whole router.
pub fn router(state: AppState) -> Router {
    let fhir = Router::new()
        .merge(metadata::router())
        .merge(task::router())
        .merge(subscription::router())
        .merge(topic::router())
        .merge(websocket::router())
        .fallback(unknown_route);
    Router::new()
        .nest("/fhir", fhir)
        .merge(health::router())
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(record_request))
        .with_state(state)
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> Error {
    Error::not_found(format!(
        "no such endpoint: {method} {}; this server supports Task (see /fhir/metadata)",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Error {
    Error::client(
        StatusCode::METHOD_NOT_ALLOWED,
        IssueCode::NotSupported,
        format!("{method} is not supported on {}", uri.path()),
    )
}

/// Counts and times every request by route template (never the raw path: ids stay out of
/// label values and logs).
async fn record_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16().to_string();
    metrics::counter!("baton_http_requests_total", "method" => method.to_string(), "route" => route.clone(), "status" => status.clone()).increment(1);
    metrics::histogram!("baton_http_request_duration_seconds", "method" => method.to_string(), "route" => route.clone()).record(elapsed.as_secs_f64());
    tracing::debug!(http.method = %method, http.route = %route, http.status = %status, duration_ms = elapsed.as_millis() as u64, "request");
    response
}

/// How a request body is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/fhir+json` or `application/json`.
    FhirJson,
    /// `application/json-patch+json`.
    JsonPatch,
    /// `application/x-www-form-urlencoded` (POST `_search`).
    Form,
}

impl BodyKind {
    fn accepts(self, media_type: &str) -> bool {
        match self {
            BodyKind::FhirJson => {
                matches!(media_type, "application/fhir+json" | "application/json")
            }
            BodyKind::JsonPatch => media_type == "application/json-patch+json",
            BodyKind::Form => media_type == "application/x-www-form-urlencoded",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            BodyKind::FhirJson => "application/fhir+json or application/json",
            BodyKind::JsonPatch => "application/json-patch+json",
            BodyKind::Form => "application/x-www-form-urlencoded",
        }
    }
}

/// Reads a body of the expected kind, enforcing the size limit, and returns its bytes.
pub async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    kind: BodyKind,
) -> Result<Bytes> {
    let media_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match media_type {
        Some(m) if kind.accepts(&m) => {}
        Some(m) => {
            return Err(Error::client(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                IssueCode::NotSupported,
                format!(
                    "Content-Type '{m}' is not supported here; send {}",
                    kind.expected()
                ),
            ));
        }
        None => {
            return Err(Error::client(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                IssueCode::NotSupported,
                format!(
                    "a Content-Type header is required; send {}",
                    kind.expected()
                ),
            ));
        }
    }
    let limit = state.config.max_body_bytes;
    let too_large = || {
        Error::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueCode::TooLong,
            format!("the request body exceeds the limit of {limit} bytes"),
        )
    };
    if let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && length > limit
    {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let is_limit = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if is_limit {
            too_large()
        } else {
            Error::bad_request(IssueCode::Structure, "the request body could not be read")
        }
    })
}

/// Splits a query string (or a form body) into name/value pairs, decoded.
pub fn query_pairs(text: Option<&str>) -> Result<Vec<(String, String)>> {
    serde_urlencoded::from_str(text.unwrap_or("")).map_err(|e| {
        Error::bad_request(
            IssueCode::Invalid,
            format!("the query string is malformed: {e}"),
        )
    })
}

/// Parses JSON, reporting where it is malformed.
pub fn parse_json(bytes: &[u8]) -> Result<Value> {
    if bytes.is_empty() {
        return Err(Error::bad_request(
            IssueCode::Required,
            "the request body is empty; send a FHIR JSON resource",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        Error::bad_request(
            IssueCode::Structure,
            format!("the body is not valid JSON: {e}"),
        )
    })
}

/// Reads the `Prefer` header's `return` and `handling` preferences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prefer {
    pub minimal: bool,
    pub outcome: bool,
    pub lenient: bool,
}

impl Prefer {
    pub fn from_headers(headers: &HeaderMap) -> Prefer {
        let mut prefer = Prefer::default();
        for value in headers.get_all("prefer") {
            let Ok(text) = value.to_str() else { continue };
            for item in text.split([',', ';']).map(str::trim) {
                match item {
                    "return=minimal" => prefer.minimal = true,
                    "return=OperationOutcome" => prefer.outcome = true,
                    "handling=lenient" => prefer.lenient = true,
                    _ => {}
                }
            }
        }
        prefer
    }
}

/// `GET /metrics` body and `/readyz` use this; kept here so the state stays private.
pub fn render_metrics(state: &AppState) -> Response {
    let body = state.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// A `State` extractor alias used by the handlers.
pub type AppStateExtract = State<AppState>;
