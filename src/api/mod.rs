//! The HTTP surface: one file per resource or operation, each with its own router, joined
//! here with the shared state, request metrics and the FHIR error fallbacks.

pub mod admission;
pub mod audit;
pub mod basic;
pub mod console;
pub mod cors;
pub mod health;
pub mod metadata;
pub mod principal;
pub mod rate_limit;
pub mod smart;
pub mod subscription;
pub mod task;
pub mod topic;
pub mod websocket;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::error::{Error, FHIR_JSON, IssueCode, Result};
use crate::fhir::ids::Version;
use crate::fhir::search::SearchLimits;
use crate::store::Store;
use crate::telemetry;
use crate::trace::{TraceContext, in_trace};

/// Everything a handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub inner: Arc<Shared>,
    /// The base URL of the path a request came in on: `base_url` under `/fhir`, the same
    /// origin with another path under each of `http.extra_base_paths`. Links a response gives
    /// (`fullUrl`, `Location`, paging links) start with it, so a client stays on its path;
    /// references are still read and stored against `base_url`.
    pub link_base: Arc<str>,
}

impl AppState {
    /// The state as the FHIR API under another base path sees it: everything shared, only
    /// `link_base` differs.
    pub fn under(&self, link_base: &str) -> AppState {
        AppState {
            inner: self.inner.clone(),
            link_base: Arc::from(link_base),
        }
    }
}

pub struct Shared {
    /// The subscription hub, shared with the outbox and delivery.
    pub hub: Arc<crate::hub::Hub>,
    /// What a websocket session needs: binding tokens, the socket registry, the deadlines.
    pub websockets: Arc<websocket::WebSocketHub>,
    pub config: Config,
    /// The FHIR base URL, e.g. `http://127.0.0.1:8080/fhir`.
    pub base_url: String,
    pub auth: Authenticator,
    pub store: Arc<dyn Store>,
    pub metrics: PrometheusHandle,
    pub search_limits: SearchLimits,
    /// Requests per second per practitioner or auditor identity, checked as the principal is
    /// verified.
    pub rate_limit: rate_limit::RequestLimiter,
    /// Slots and a wait queue for searches, so a burst of them cannot take all the memory
    /// and connections (`limits.max_concurrent_searches`, `limits.search_queue`).
    pub searches: admission::Admission,
    /// Cancelled when shutdown begins; `/readyz` then answers 503 so balancers drain us.
    pub shutdown: CancellationToken,
    /// The long-running tasks' health, shown by `/readyz`.
    pub health: Arc<crate::supervise::Health>,
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
    let mut app = Router::new().nest("/fhir", fhir_router(&state));
    // The same API under each extra base path, with links that follow the path.
    for path in &state.config.http.extra_base_paths {
        let link_base = state.config.http.base_url_for(&state.base_url, path);
        let under = state.under(&link_base);
        app = app.nest(path, fhir_router(&under).with_state(under));
    }
    let router = app
        .merge(health::router())
        .merge(console::router())
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(outcome_for_rejections))
        .layer(axum::middleware::from_fn(record_request))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            answer_panic,
        ));
    // CORS outermost, so that preflights are answered before anything else looks at them and
    // every answer, errors included, carries the headers a listed page needs to read it.
    let origins = cors::AllowedOrigins::new(&state.config.cors.allowed_origins);
    let router = match origins.is_empty() {
        true => router,
        false => router
            .layer(origins.layer())
            .layer(axum::middleware::from_fn_with_state(
                origins,
                cors::only_listed_origins,
            )),
    };
    router.with_state(state)
}

/// The FHIR API, served under `/fhir` and each of `http.extra_base_paths`.
fn fhir_router(state: &AppState) -> Router<AppState> {
    Router::new()
        .merge(metadata::router())
        .merge(audit::router())
        .merge(smart::router())
        .merge(task::router())
        .merge(subscription::router())
        .merge(topic::router())
        .merge(basic::router())
        .merge(websocket::router())
        .fallback(unknown_route)
        .layer(axum::middleware::from_fn(negotiate_format))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::audit_request,
        ))
}

/// A handler that panics (a bug) answers an opaque 500 OperationOutcome, logged once with
/// its message, instead of dropping the connection; the node goes on serving.
fn answer_panic(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    metrics::counter!("baton_request_panics_total").increment(1);
    Error::internal(
        "a request handler panicked",
        crate::supervise::panic_message(panic.as_ref()),
    )
    .into_response()
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

/// Baton writes FHIR JSON and nothing else, so a request that accepts only something else
/// (`Accept: application/fhir+xml`, `_format=xml`) gets a 406 OperationOutcome instead of
/// JSON it did not ask for. `_format` overrides `Accept`, as FHIR says.
async fn negotiate_format(request: Request, next: Next) -> Response {
    match check_format(request.headers(), request.uri().query()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// Whether a response in FHIR JSON is acceptable to the request: a 406 naming what was asked
/// for when it is not. No `Accept` (or an empty one) accepts anything; so does `*/*`.
pub fn check_format(headers: &HeaderMap, query: Option<&str>) -> Result<()> {
    let refuse = |asked: &str| {
        let shown: String = asked.chars().take(80).collect();
        Error::client(
            StatusCode::NOT_ACCEPTABLE,
            IssueCode::NotSupported,
            format!(
                "this server answers only in FHIR JSON (application/fhir+json), not '{shown}'; \
                 accept application/fhir+json, application/json or */*, or send _format=json"
            ),
        )
    };
    // A malformed query string is the handler's to refuse.
    let format = serde_urlencoded::from_str::<Vec<(String, String)>>(query.unwrap_or(""))
        .ok()
        .and_then(|pairs| pairs.into_iter().find(|(name, _)| name == "_format"));
    if let Some((_, value)) = format {
        // A `+` left unescaped in a query string arrives as a space.
        let media = value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .replace(' ', "+");
        return match media.to_ascii_lowercase().as_str() {
            "json" | "application/json" | "application/fhir+json" => Ok(()),
            _ => Err(refuse(&value)),
        };
    }
    let mut ranges = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|range| !range.is_empty())
        .peekable();
    if ranges.peek().is_none() {
        return Ok(());
    }
    let mut asked = Vec::new();
    for range in ranges {
        let mut pieces = range.split(';').map(str::trim);
        let media = pieces.next().unwrap_or("").to_ascii_lowercase();
        // `q=0` means "not this one".
        let refused = pieces.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        if !refused
            && matches!(
                media.as_str(),
                "*/*" | "application/*" | "application/json" | "application/fhir+json"
            )
        {
            return Ok(());
        }
        asked.push(media);
    }
    Err(refuse(&asked.join(", ")))
}

/// axum's own extractors refuse some requests before a handler runs, and answer in plain
/// text: a path segment that is not UTF-8 once decoded (`/fhir/Task/%FF`), a websocket upgrade
/// without its headers. Every client error is owed an OperationOutcome, so such an answer is
/// rewritten into one with the same status, its text as the diagnostics, and its other
/// headers (`Allow`, `Sec-WebSocket-Version`) kept.
async fn outcome_for_rejections(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let plain_text = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/plain"));
    if !response.status().is_client_error() || !plain_text {
        return response;
    }
    let (parts, body) = response.into_parts();
    // Rejection texts are a line long; a longer body is cut rather than buffered.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let code = match parts.status {
        StatusCode::NOT_FOUND => IssueCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED
        | StatusCode::UNSUPPORTED_MEDIA_TYPE
        | StatusCode::UPGRADE_REQUIRED => IssueCode::NotSupported,
        StatusCode::PAYLOAD_TOO_LARGE => IssueCode::TooLong,
        StatusCode::UNAUTHORIZED => IssueCode::Login,
        StatusCode::FORBIDDEN => IssueCode::Forbidden,
        _ => IssueCode::Invalid,
    };
    let diagnostics = if text.is_empty() {
        format!("the request was refused ({})", parts.status)
    } else {
        text
    };
    let mut rewritten = Error::client(parts.status, code, diagnostics).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().append(name.clone(), value.clone());
        }
    }
    rewritten
}

/// Counts and times every request by route template (never the raw path: ids stay out of
/// label values and logs), and runs it in its trace: the caller's `traceparent` continued,
/// or a new trace. Log lines of the request carry `trace_id`; a change it writes stores the
/// trace with its change event (`telemetry::current_trace`).
async fn record_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let caller = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let trace = caller.map_or_else(TraceContext::new_root, |caller| caller.child());
    let span = tracing::info_span!("http.request", trace_id = %trace.trace_id());
    let started_at = std::time::SystemTime::now();
    let response = in_trace(Some(trace), next.run(request))
        .instrument(span)
        .await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16().to_string();
    if telemetry::exporting() {
        telemetry::export(telemetry::FinishedSpan {
            name: format!("{method} {route}").into(),
            kind: opentelemetry::trace::SpanKind::Server,
            context: trace,
            parent: caller.map(|c| telemetry::Parent {
                span_id: c.parts().1,
                remote: true,
            }),
            start: started_at,
            end: started_at + elapsed,
            attributes: vec![
                opentelemetry::KeyValue::new("http.request.method", method.to_string()),
                opentelemetry::KeyValue::new("http.route", route.clone()),
                opentelemetry::KeyValue::new(
                    "http.response.status_code",
                    i64::from(response.status().as_u16()),
                ),
            ],
            error: response
                .status()
                .is_server_error()
                .then(|| format!("HTTP {status}")),
        });
    }
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
    /// A PATCH body: `application/json-patch+json`, `application/merge-patch+json`, or
    /// `application/fhir+json` / `application/json` (FHIRPath Patch or merge patch).
    Patch,
    /// `application/x-www-form-urlencoded` (POST `_search`).
    Form,
}

impl BodyKind {
    fn accepts(self, media_type: &str) -> bool {
        match self {
            BodyKind::FhirJson => {
                matches!(media_type, "application/fhir+json" | "application/json")
            }
            BodyKind::Patch => matches!(
                media_type,
                "application/json-patch+json"
                    | "application/merge-patch+json"
                    | "application/fhir+json"
                    | "application/json"
            ),
            BodyKind::Form => media_type == "application/x-www-form-urlencoded",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            BodyKind::FhirJson => "application/fhir+json or application/json",
            BodyKind::Patch => {
                "application/json-patch+json, application/merge-patch+json or application/fhir+json \
                 (FHIRPath Patch)"
            }
            BodyKind::Form => "application/x-www-form-urlencoded",
        }
    }
}

/// The body's media type: `Content-Type` without its parameters, lower-cased.
pub fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// Reads a body of the expected kind, enforcing the size limit, and returns its bytes.
pub async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    kind: BodyKind,
) -> Result<Bytes> {
    check_content_encoding(headers)?;
    match media_type(headers) {
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

/// Refuses a body sent with any `Content-Encoding` but `identity` (415). Baton does not
/// decompress request bodies (nothing in FHIR needs it, and it would turn the size limit into
/// a limit on compressed bytes); reading a compressed body as if it were plain would store
/// garbage or misread it.
fn check_content_encoding(headers: &HeaderMap) -> Result<()> {
    for value in headers.get_all(header::CONTENT_ENCODING) {
        let text = String::from_utf8_lossy(value.as_bytes());
        let refused = text
            .split(',')
            .map(str::trim)
            .find(|coding| !coding.eq_ignore_ascii_case("identity"));
        if let Some(coding) = refused {
            let shown: String = coding.chars().take(40).collect();
            return Err(Error::client(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                IssueCode::NotSupported,
                format!(
                    "Content-Encoding '{shown}' is not supported; send the body uncompressed (identity)"
                ),
            ));
        }
    }
    Ok(())
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

/// Parses a JSON body, reporting where it is malformed. A key repeated in one object is
/// refused (see `fhir::json`): FHIR JSON allows each key once, and silently keeping one of
/// them would let two readers of the same body disagree.
pub fn parse_json(bytes: &[u8]) -> Result<Value> {
    if bytes.is_empty() {
        return Err(Error::bad_request(
            IssueCode::Required,
            "the request body is empty; send a FHIR JSON resource",
        ));
    }
    crate::fhir::json::parse(bytes).map_err(|e| {
        use crate::fhir::json::JsonError;
        let diagnostics = match e {
            JsonError::DuplicateKey { .. } => format!("the body repeats a JSON key: {e}"),
            JsonError::TooDeep { .. } | JsonError::Syntax(_) => {
                format!("the body is not valid JSON: {e}")
            }
        };
        Error::bad_request(IssueCode::Structure, diagnostics)
    })
}

/// Reads the `Prefer` header's `return` and `handling` preferences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prefer {
    pub minimal: bool,
    pub outcome: bool,
    /// `handling=strict`: an unknown search parameter is an error. Lenient (the default the
    /// FHIR search page recommends, and `handling=lenient`) ignores it.
    pub strict: bool,
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
                    "handling=strict" => prefer.strict = true,
                    "handling=lenient" => prefer.strict = false,
                    _ => {}
                }
            }
        }
        prefer
    }
}

/// Builds a response whose body is FHIR JSON.
pub fn fhir_json(status: StatusCode, body: &Value) -> Response {
    fhir_json_bytes(status, serde_json::to_vec(body).unwrap_or_default())
}

/// A FHIR JSON response whose body is already written.
pub fn fhir_json_bytes(status: StatusCode, bytes: Vec<u8>) -> Response {
    let mut response = (status, bytes).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    response
}

/// `GET /metrics` body and `/readyz` use this; kept here so the state stays private.
pub fn render_metrics(state: &AppState) -> Response {
    let body = state.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// A `State` extractor alias used by the handlers.
pub type AppStateExtract = State<AppState>;

/// Parses `If-Match: W/"3"` (also `"3"` and `3`).
pub(crate) fn parse_if_match(headers: &HeaderMap) -> Result<Option<Version>> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    parse_if_match_text(value.to_str().unwrap_or(""))
}

/// Parses an ETag as If-Match (or a Bundle entry's `request.ifMatch`) gives it.
pub(crate) fn parse_if_match_text(text: &str) -> Result<Option<Version>> {
    let text = text.trim();
    let bare = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    bare.parse::<Version>().map(Some).map_err(|_| {
        Error::bad_request(
            IssueCode::Invalid,
            format!("If-Match '{text}' must be an ETag such as W/\"3\""),
        )
    })
}
