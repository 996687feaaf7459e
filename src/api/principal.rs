//! The `Principal` extractor: every authenticated handler names a `Principal` argument, and
//! this is where it comes from. The bearer token is verified by `auth` (which knows tokens and
//! role rules, not HTTP requests), then the verified identity is counted against its request
//! rate (`rate_limit`), so every authenticated request is counted exactly once, and its SMART
//! scopes are checked against the interaction (`auth::scopes::for_request`): a token refused
//! for its scopes gets 403 `insufficient_scope` before any handler runs, so nothing changes.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::rate_limit::RateLimited;
use crate::auth::{Authenticator, Principal, scopes};
use crate::error::Error;

impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync + AsRef<Authenticator> + RateLimited,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                Error::unauthenticated("an 'Authorization: Bearer <token>' header is required")
            })?;
        let value = header
            .to_str()
            .map_err(|_| Error::unauthorized("the Authorization header is not valid text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::unauthenticated("the Authorization header must use the Bearer scheme")
            })?;
        let principal = state.as_ref().authenticate(token).await?;
        // The request's AuditEvent names the verified caller (see `crate::audit`).
        crate::audit::note_principal(&principal);
        // Only a verified identity is counted, so unverified text never grows the limiter.
        state.request_limiter().admit(&principal)?;
        // SMART scopes narrow the role: the interaction must be one they allow. The role rules
        // are applied by the handler besides. (Inside the nested FHIR router the path is already
        // below the base; outside it, the base is stripped here.)
        let path = parts.uri.path();
        let path = path.strip_prefix("/fhir").unwrap_or(path);
        if let Some((resource, permission)) = scopes::for_request(&parts.method, path) {
            principal.require_scope(resource, permission)?;
        }
        Ok(principal)
    }
}
