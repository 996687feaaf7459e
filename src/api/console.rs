//! `/console`: the operator console, a few static files embedded in the binary (plain HTML,
//! CSS and JavaScript modules, with uPlot 1.6.32 vendored under `console/vendor/` for the
//! charts). No build step: what is in `src/api/console/` is what is served.
//!
//! The files are public and hold no data. Every datum the console shows comes through the
//! FHIR API under `/fhir` with the token the operator pastes, so the console can do nothing
//! that token could not do with curl, and `/console` needs no auth of its own. Each answer
//! carries a Content-Security-Policy that lets the page load only these files and talk only
//! to this server (its FHIR API and its websocket).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use crate::channels::websocket::websocket_url;
use crate::error::Error;

/// One embedded file.
struct Asset {
    /// The name under `/console/`.
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// Every file the console has; anything else under `/console/` is a 404.
const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("console/index.html"),
    },
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("console/console.css"),
    },
    Asset {
        name: "console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("console/console.js"),
    },
    Asset {
        name: "fhir.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("console/fhir.js"),
    },
    Asset {
        name: "vendor/uPlot.esm.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("console/vendor/uPlot.esm.js"),
    },
    Asset {
        name: "vendor/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("console/vendor/uPlot.min.css"),
    },
    Asset {
        name: "vendor/uPlot.LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("console/vendor/uPlot.LICENSE"),
    },
];

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/console", get(to_index))
        .route("/console/", get(index))
        .route("/console/{*name}", get(asset))
}

/// `/console` answers with the page's own URL, `/console/`, so that the page's relative links
/// (its files, and `../fhir`) resolve under whatever path a proxy serves Baton on.
async fn to_index() -> Response {
    (
        StatusCode::PERMANENT_REDIRECT,
        [(header::LOCATION, "console/")],
    )
        .into_response()
}

async fn index(State(state): State<AppState>) -> Response {
    serve(&state, "index.html")
}

async fn asset(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    serve(&state, &name)
}

fn serve(state: &AppState, name: &str) -> Response {
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return Error::not_found(format!("the console has no file '{name}'")).into_response();
    };
    let mut response = asset.body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    // The files change with the binary; a browser asks again rather than keep an old one.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if let Ok(policy) = HeaderValue::from_str(&content_security_policy(&state.base_url)) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    response
}

/// The console's policy: its own scripts and styles only (no inline code, no `eval`), data
/// fetched only from this server, and the websocket only at the URL `$get-ws-binding-token`
/// names (the public base URL's origin, which may differ from the page's behind a proxy). No
/// framing, no forms posted anywhere, no `<base>`.
pub fn content_security_policy(base_url: &str) -> String {
    let socket = websocket_url(base_url);
    let socket_origin = socket
        .find("://")
        .and_then(|scheme| {
            let rest = &socket[scheme + 3..];
            rest.find('/').map(|path| &socket[..scheme + 3 + path])
        })
        .unwrap_or(&socket);
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self' {socket_origin}; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_only_this_server_and_its_websocket() {
        let cases = [
            ("http://127.0.0.1:8080/fhir", "ws://127.0.0.1:8080"),
            (
                "https://baton.example.org/api/fhir",
                "wss://baton.example.org",
            ),
        ];
        for (base, socket) in cases {
            let policy = content_security_policy(base);
            assert!(
                policy.contains(&format!("connect-src 'self' {socket};")),
                "{policy}"
            );
            assert!(policy.starts_with("default-src 'none'; script-src 'self';"));
            assert!(!policy.contains("unsafe"), "{policy}");
        }
    }

    #[test]
    fn every_file_the_page_names_is_embedded() {
        let page = std::str::from_utf8(ASSETS[0].body).unwrap();
        let script = std::str::from_utf8(ASSETS[2].body).unwrap();
        for name in ["console.css", "console.js", "vendor/uPlot.min.css"] {
            assert!(page.contains(&format!("\"{name}\"")), "{name}");
        }
        for name in ["./fhir.js", "./vendor/uPlot.esm.js"] {
            assert!(script.contains(&format!("'{name}'")), "{name}");
        }
        for asset in ASSETS {
            assert!(!asset.body.is_empty(), "{}", asset.name);
        }
    }
}
