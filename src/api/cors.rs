//! CORS for the browser pages of `[cors] allowed_origins`, with tower-http's `CorsLayer`.
//!
//! A listed origin may send the FHIR API's requests from a page: preflights allow the methods
//! Baton serves and the headers its clients send (`Authorization`, `Content-Type` for the FHIR
//! media types, `If-Match`, `If-None-Match`, `If-None-Exist`, `Prefer`, `traceparent`), and the
//! headers a client reads back are exposed (`ETag`, `Location`, `Content-Location`,
//! `Last-Modified`, `Retry-After`). Credentials (cookies) are not allowed: tokens travel in
//! `Authorization`.
//!
//! Any other origin gets no CORS header at all. tower-http adds the methods, headers and
//! exposed headers whatever the origin (only `Access-Control-Allow-Origin` depends on it), so
//! `only_listed_origins` takes every `Access-Control-*` header off the answers to an origin not
//! listed. The websocket endpoint checks `Origin` against the same list (`allows`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The configured origins, as header values to compare with `Origin` exactly.
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(Arc<[HeaderValue]>);

impl AllowedOrigins {
    pub fn new(origins: &[String]) -> AllowedOrigins {
        AllowedOrigins(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a request with this `Origin` (None: no browser page) may be served.
    pub fn allows(&self, origin: Option<&HeaderValue>) -> bool {
        origin.is_none_or(|o| self.0.contains(o))
    }

    /// The tower-http layer for these origins.
    pub fn layer(&self) -> CorsLayer {
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(self.0.iter().cloned()))
            .allow_methods([
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::ACCEPT,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                header::IF_MODIFIED_SINCE,
                HeaderName::from_static("if-none-exist"),
                HeaderName::from_static("prefer"),
                HeaderName::from_static("traceparent"),
            ])
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                header::CONTENT_LOCATION,
                header::LAST_MODIFIED,
                header::RETRY_AFTER,
                header::WWW_AUTHENTICATE,
            ])
            .max_age(Duration::from_secs(600))
    }
}

/// Takes tower-http's CORS headers off the answers to a request whose `Origin` is not listed
/// (or absent), so such an origin learns nothing of what Baton would allow.
pub async fn only_listed_origins(
    State(origins): State<AllowedOrigins>,
    request: Request,
    next: Next,
) -> Response {
    let listed = request
        .headers()
        .get(header::ORIGIN)
        .is_some_and(|o| origins.0.contains(o));
    let mut response = next.run(request).await;
    if !listed {
        let headers = response.headers_mut();
        let cors: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("access-control-"))
            .cloned()
            .collect();
        for name in cors {
            headers.remove(name);
        }
    }
    response
}
