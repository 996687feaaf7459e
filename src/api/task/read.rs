//! The reads: read, vread and `_history`, with the read rule applied to every version they
//! show. They are kept apart because they look at one Task's versions, and history pages through
//! versions the caller may only partly see.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::search::{link, now, parse_pairs};
use super::{current_response, gone_with_etag, version_response};
use crate::api::fhir_json;
use crate::api::{AppState, Prefer};
use crate::auth::{self, Principal};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::ids::{TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::fhir::search;
use crate::store::{CurrentTask, StoredVersion};

pub(super) async fn read(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = TaskId::parse(&id)?;
    let current = readable_current(&state, &principal, &id).await?;
    if current.deleted {
        return Ok(gone_with_etag(
            format!("Task/{id} has been deleted"),
            current.version,
        ));
    }
    Ok(current_response(
        &state,
        StatusCode::OK,
        &current,
        Prefer::default(),
    ))
}

/// Loads a Task (live or deleted) and applies the read rule to its latest content.
pub(super) async fn readable_current(
    state: &AppState,
    principal: &Principal,
    id: &TaskId,
) -> Result<CurrentTask> {
    let current = state
        .store
        .read(id)
        .await?
        .ok_or_else(|| Error::not_found(format!("Task/{id} does not exist")))?;
    if !auth::may_read_task(principal, &current.resource, &state.base_url) {
        return Err(Error::forbidden(format!(
            "Task/{id} is not owned by you and not in one of your role queues"
        )));
    }
    Ok(current)
}

pub(super) async fn vread(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, vid)): Path<(String, String)>,
) -> Result<Response> {
    let id = TaskId::parse(&id)?;
    let version: Version = vid.parse().map_err(|_| {
        Error::bad_request(
            IssueCode::Invalid,
            format!("'{vid}' is not a version number"),
        )
    })?;
    readable_current(&state, &principal, &id).await?;
    let stored = state
        .store
        .read_version(&id, version)
        .await?
        .ok_or_else(|| Error::not_found(format!("Task/{id} has no version {version}")))?;
    // The read rule holds for every version: a Task's past may belong to someone else (it
    // changed hands, or its id was deleted and created again).
    let content = match &stored.resource {
        Some(resource) => Some(resource.clone()),
        // A deletion shows as much as the version it deleted.
        None => state
            .store
            .read_version(&id, version.previous())
            .await?
            .and_then(|v| v.resource),
    };
    if !content.is_some_and(|r| auth::may_read_task(&principal, &r, &state.base_url)) {
        return Err(Error::forbidden(format!(
            "version {version} of Task/{id} is not owned by you and was not in one of your role queues"
        )));
    }
    match &stored.resource {
        Some(_) => Ok(version_response(
            &state,
            StatusCode::OK,
            &stored,
            Prefer::default(),
            false,
        )),
        None => Ok(gone_with_etag(
            format!("version {version} of Task/{id} is its deletion"),
            version,
        )),
    }
}

pub(super) async fn history(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let id = TaskId::parse(&id)?;
    readable_current(&state, &principal, &id).await?;
    let pairs = parse_pairs(query.as_deref().unwrap_or(""))?;
    let mut count = state.config.search.default_count;
    let mut offset = 0usize;
    for (name, value) in &pairs {
        let number = || {
            value.parse::<usize>().map_err(|_| {
                Error::bad_request(
                    IssueCode::Invalid,
                    format!("{name} must be a non-negative integer"),
                )
            })
        };
        match name.as_str() {
            "_count" => count = number()?.min(state.config.search.max_count),
            "_offset" => offset = search::parse_offset(name, value)?,
            "_format" | "_pretty" => {}
            other => {
                return Err(Error::not_supported(format!(
                    "history supports _count and _offset, not '{other}'"
                )));
            }
        }
    }
    let (versions, total) = readable_history(&state, &principal, &id, count, offset).await?;
    let self_url = format!("{}/Task/{id}/_history", state.base_url);
    let mut links = vec![link(
        "self",
        &format!("{self_url}?_count={count}&_offset={offset}"),
    )];
    if (offset + count) < total as usize {
        links.push(link(
            "next",
            &format!("{self_url}?_count={count}&_offset={}", offset + count),
        ));
    }
    if offset > 0 {
        links.push(link(
            "previous",
            &format!(
                "{self_url}?_count={count}&_offset={}",
                offset.saturating_sub(count)
            ),
        ));
    }
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| history_entry(&state.base_url, v))
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": now() },
        "type": "history",
        "total": total,
        "link": links,
        "entry": entries,
    });
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// Versions read from the store at a time while filtering a history.
const HISTORY_CHUNK: usize = 100;

/// One page (newest first) of the versions of a Task that `principal` may read, and how many
/// it may read in all: the Bundle's `total` and its paging count only what the caller sees,
/// so neither betrays how many versions were left out. A deletion counts as readable when
/// the version it deleted is.
async fn readable_history(
    state: &AppState,
    principal: &Principal,
    id: &TaskId,
    count: usize,
    offset: usize,
) -> Result<(Vec<StoredVersion>, u64)> {
    // No search restriction means the read rule lets this principal read every Task, and so
    // every version: the store pages directly.
    if auth::read_scope(principal).is_none() {
        return state.store.history(id, count, offset).await;
    }
    // Anyone else walks the whole history in chunks, deciding version by version; a Task's
    // history is short next to the cost of a wrong answer, and only `count` versions are kept.
    let mut page = Vec::new();
    let mut readable = 0usize;
    let mut keep = |version: StoredVersion| {
        if readable >= offset && page.len() < count {
            page.push(version);
        }
        readable += 1;
    };
    // Newest first, a deletion comes just before the version it deleted, which decides it.
    let mut deletion: Option<StoredVersion> = None;
    let mut position = 0usize;
    loop {
        let (chunk, total) = state.store.history(id, HISTORY_CHUNK, position).await?;
        let read = chunk.len();
        for version in chunk {
            let may_read = version
                .resource
                .as_ref()
                .is_some_and(|r| auth::may_read_task(principal, r, &state.base_url));
            if let Some(deleted) = deletion.take()
                && may_read
            {
                keep(deleted);
            }
            if version.resource.is_none() {
                deletion = Some(version);
            } else if may_read {
                keep(version);
            }
        }
        position += read;
        if read == 0 || position as u64 >= total {
            break;
        }
    }
    Ok((page, readable as u64))
}

fn history_entry(base_url: &str, version: &StoredVersion) -> Value {
    let url = format!("Task/{}", version.id);
    let (method, status) = match version.interaction {
        Interaction::Create => ("POST", "201 Created"),
        // History rows are only ever create, update or delete; overdue lives in the outbox.
        Interaction::Update | Interaction::Overdue => ("PUT", "200 OK"),
        Interaction::Delete => ("DELETE", "204 No Content"),
    };
    let mut entry = json!({
        "fullUrl": format!("{base_url}/{url}"),
        "request": { "method": method, "url": if method == "POST" { "Task".to_string() } else { url } },
        "response": {
            "status": status,
            "etag": format!("W/\"{}\"", version.version),
            "lastModified": version.last_updated,
        },
    });
    if let Some(resource) = &version.resource {
        entry["resource"] = resource.clone();
    }
    entry
}
