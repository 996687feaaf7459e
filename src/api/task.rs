//! The FHIR RESTful API for `Task`: create, read, update, patch, delete, history, vread and
//! search. Each write is handed to the store as a decision closure, so the If-Match check, the
//! state machine and the role rules run against the version the write replaces, inside the
//! same transaction.
//!
//! This file holds the router and the responses every handler shares; the handlers are in
//! `write` (with the checks a write makes), `links` (the Tasks a Task links to), `read` (read,
//! vread, history) and `search`.

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::Value;

use super::{AppState, Prefer};
use super::{fhir_json, fhir_json_bytes};
use crate::error::{Error, IssueCode};
use crate::fhir::ids::{StoredInstant, TaskId, Version};
use crate::store::{CurrentTask, StoredVersion};

mod bundle;
mod links;
mod read;
mod search;
mod write;

use read::{history, read, type_history, vread};
use search::{search_get, search_post};
use write::{conditional_delete, conditional_update, create, delete, patch, update};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", post(bundle::process))
        .route(
            "/Task",
            post(create)
                .get(search_get)
                .put(conditional_update)
                .delete(conditional_delete),
        )
        .route("/Task/_search", post(search_post))
        .route("/Task/_history", get(type_history))
        .route(
            "/Task/{id}",
            get(read).put(update).patch(patch).delete(delete),
        )
        .route("/Task/{id}/_history", get(history))
        .route("/Task/{id}/_history/{vid}", get(vread))
}

// ---------------------------------------------------------------------------------------------
// Responses

/// A 410 for a deleted Task or version, with the ETag of the deletion.
fn gone_with_etag(diagnostics: String, version: Version) -> Response {
    let mut response = axum::response::IntoResponse::into_response(Error::gone(diagnostics));
    set_etag(response.headers_mut(), version);
    response
}

fn set_etag(headers: &mut HeaderMap, version: Version) {
    if let Ok(value) = HeaderValue::from_str(&format!("W/\"{version}\"")) {
        headers.insert(header::ETAG, value);
    }
}

fn current_response(
    state: &AppState,
    status: StatusCode,
    task: &CurrentTask,
    prefer: Prefer,
) -> Response {
    respond(
        state,
        status,
        &task.id,
        task.version,
        &task.last_updated,
        Shown::Value(&task.resource),
        prefer,
        false,
    )
}

/// The answer with a version of a Task: the text the write stored when it gives that back
/// (`StoredVersion::text`, the same JSON as the resource serialised), else the resource.
fn version_response(
    state: &AppState,
    status: StatusCode,
    version: StoredVersion,
    prefer: Prefer,
    with_location: bool,
) -> Response {
    let StoredVersion {
        id,
        version,
        last_updated,
        resource,
        text,
        ..
    } = version;
    let shown = match (text, &resource) {
        (Some(text), _) => Shown::Text(text.into_bytes()),
        (None, Some(resource)) => Shown::Value(resource),
        (None, None) => Shown::Value(&Value::Null),
    };
    respond(
        state,
        status,
        &id,
        version,
        &last_updated,
        shown,
        prefer,
        with_location,
    )
}

/// A Task as a response body shows it: a resource to serialise, or the JSON text of one.
enum Shown<'a> {
    Value(&'a Value),
    Text(Vec<u8>),
}

#[allow(clippy::too_many_arguments)]
fn respond(
    state: &AppState,
    status: StatusCode,
    id: &TaskId,
    version: Version,
    last_updated: &StoredInstant,
    resource: Shown<'_>,
    prefer: Prefer,
    with_location: bool,
) -> Response {
    let mut response = if prefer.minimal {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = status;
        r
    } else if prefer.outcome {
        fhir_json(
            status,
            &crate::error::operation_outcome(
                "information",
                IssueCode::Informational,
                &format!("Task/{id} is at version {version}"),
                None,
            ),
        )
    } else {
        match resource {
            Shown::Value(resource) => fhir_json(status, resource),
            Shown::Text(text) => fhir_json_bytes(status, text),
        }
    };
    let headers = response.headers_mut();
    set_validators(headers, version, last_updated);
    if with_location
        && let Ok(value) =
            HeaderValue::from_str(&format!("{}/Task/{id}/_history/{version}", state.link_base))
    {
        headers.insert(header::LOCATION, value);
    }
    response
}

/// `ETag` and `Last-Modified`.
fn set_validators(headers: &mut HeaderMap, version: Version, last_updated: &StoredInstant) {
    set_etag(headers, version);
    if let Some(http_date) = http_date(last_updated)
        && let Ok(value) = HeaderValue::from_str(&http_date)
    {
        headers.insert(header::LAST_MODIFIED, value);
    }
}

/// Formats an instant as an HTTP date (`Last-Modified`).
fn http_date(instant: &StoredInstant) -> Option<String> {
    let at = instant.datetime()?;
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    at.format(&format).ok()
}
