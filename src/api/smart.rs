//! `GET /fhir/.well-known/smart-configuration`: SMART on FHIR discovery (SMART App Launch 2.0,
//! section 2.0.8), and the CapabilityStatement's `rest.security` that points the same way. It
//! needs no token.
//!
//! The identity provider advertised is the first of `[[auth.issuers]]`; its endpoints come from
//! its configuration or else from its OIDC discovery document (read with its keys). A server
//! without issuers is not a SMART server: the document is then a 404 that says so.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use super::AppState;
use crate::auth::issuers::Endpoints;
use crate::error::Error;

pub fn router() -> Router<AppState> {
    Router::new().route("/.well-known/smart-configuration", get(smart_configuration))
}

/// The scopes Baton understands (`auth::scopes`), in the forms clients ask for.
pub const SCOPES_SUPPORTED: &[&str] = &[
    "openid",
    "fhirUser",
    "launch/patient",
    "system/Task.cruds",
    "system/Task.rs",
    "system/Subscription.cruds",
    "user/Task.cruds",
    "user/Task.rs",
    "user/Subscription.cruds",
    "user/Subscription.rs",
    "patient/Task.rs",
    "system/*.read",
    "user/*.read",
    "user/*.write",
    "*.*",
];

/// The first issuer's endpoints: configured ones first, then those of its discovery document.
fn advertised(state: &AppState) -> Option<(String, Endpoints)> {
    let issuers = state.auth.issuers();
    let issuer = issuers.all().first()?;
    let discovered = issuers.endpoints(issuer).unwrap_or_default();
    let config = &issuer.config;
    Some((
        config.issuer.clone(),
        Endpoints {
            jwks_uri: config.jwks_uri.clone().or(discovered.jwks_uri),
            token_endpoint: config.token_endpoint.clone().or(discovered.token_endpoint),
            authorization_endpoint: config
                .authorization_endpoint
                .clone()
                .or(discovered.authorization_endpoint),
        },
    ))
}

async fn smart_configuration(State(state): State<AppState>) -> Response {
    let Some((issuer, endpoints)) = advertised(&state) else {
        return Error::not_found(
            "this server trusts no identity provider ([[auth.issuers]] is empty), so it offers no SMART configuration",
        )
        .into_response();
    };
    let mut document = json!({
        "issuer": issuer,
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "private_key_jwt"],
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": [
            "launch-standalone",
            "client-public",
            "client-confidential-symmetric",
            "client-confidential-asymmetric",
            "sso-openid-connect",
            "context-standalone-patient",
            "permission-patient",
            "permission-user",
            "permission-v1",
            "permission-v2",
        ],
    });
    for (name, value) in [
        ("jwks_uri", endpoints.jwks_uri),
        ("token_endpoint", endpoints.token_endpoint),
        ("authorization_endpoint", endpoints.authorization_endpoint),
    ] {
        if let Some(value) = value {
            document[name] = json!(value);
        }
    }
    (StatusCode::OK, axum::Json(document)).into_response()
}

/// The CapabilityStatement's `rest.security`: SMART-on-FHIR with the `oauth-uris` extension
/// when an issuer is configured, else the local bearer tokens.
pub fn security(state: &AppState) -> Value {
    let cors = !state.config.cors.allowed_origins.is_empty();
    let Some((_, endpoints)) = advertised(state) else {
        return json!({
            "cors": cors,
            "description": "Bearer JWT (HS256) in the Authorization header, with a 'role' claim of admin, practitioner or auditor; practitioners carry 'fhirUser'. Only /metadata is open.",
        });
    };
    let mut uris = Vec::new();
    if let Some(token) = endpoints.token_endpoint {
        uris.push(json!({"url": "token", "valueUri": token}));
    }
    if let Some(authorize) = endpoints.authorization_endpoint {
        uris.push(json!({"url": "authorize", "valueUri": authorize}));
    }
    json!({
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": uris,
        }],
        "cors": cors,
        "service": [{
            "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR",
            }],
            "text": "OAuth2 using SMART-on-FHIR profile (see .well-known/smart-configuration)",
        }],
        "description": "Bearer JWTs from the configured identity providers (SMART scopes narrow each role), or HS256 tokens from the local key. Only /metadata and /.well-known/smart-configuration are open.",
    })
}
