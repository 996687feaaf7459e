//! The reads: read, vread and `_history`, with the read rule applied to every version they
//! show. They are kept apart because they look at one Task's versions, and history pages through
//! versions the caller may only partly see.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::search::{link, now, parse_pairs};
use super::{current_response, gone_with_etag, version_response};
use crate::api::fhir_json;
use crate::api::{AppState, Prefer};
use crate::auth::{self, Principal};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::datetime::{self, DateKind};
use crate::fhir::ids::{StoredInstant, TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::fhir::search;
use crate::fhir::subset::{self, Subset};
use crate::store::{CurrentTask, HistoryKey, HistoryRequest, HistoryVersion, StoredVersion};

pub(super) async fn read(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let id = TaskId::parse(&id)?;
    let subset = read_subset(&parse_pairs(query.as_deref().unwrap_or(""))?)?;
    let mut current = readable_current(&state, &principal, &id).await?;
    if current.deleted {
        return Ok(gone_with_etag(
            format!("Task/{id} has been deleted"),
            current.version,
        ));
    }
    if not_modified(&headers, current.version, &current.last_updated) {
        return Ok(not_modified_response(
            current.version,
            &current.last_updated,
        ));
    }
    if let Some(subset) = subset {
        current.resource = subset.apply(&current.resource);
    }
    Ok(current_response(
        &state,
        StatusCode::OK,
        &current,
        Prefer::default(),
    ))
}

/// `_summary` and `_elements` on a read (other parameters are ignored, as `_format` is).
fn read_subset(pairs: &[(String, String)]) -> Result<Option<Subset>> {
    let mut subset = None;
    let mut given = 0;
    for (name, value) in pairs {
        let next = match name.as_str() {
            "_summary" => subset::parse_summary(value)?,
            "_elements" => Some(subset::parse_elements(value)?),
            _ => continue,
        };
        given += 1;
        if given > 1 {
            return Err(subset::both_given());
        }
        subset = next;
    }
    Ok(subset)
}

/// Whether a conditional read may be answered 304: `If-None-Match` names the current
/// version (or is `*`), or, without it, `If-Modified-Since` is no earlier than the last
/// change (at the second, as HTTP dates go). An unreadable date is ignored, as HTTP says.
fn not_modified(headers: &HeaderMap, version: Version, last_updated: &StoredInstant) -> bool {
    if let Some(value) = headers.get(header::IF_NONE_MATCH) {
        let text = value.to_str().unwrap_or("");
        return text.split(',').map(str::trim).any(|tag| {
            tag == "*"
                || tag.strip_prefix("W/").unwrap_or(tag).trim_matches('"') == version.to_string()
        });
    }
    let since = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_http_date);
    match (since, last_updated.datetime()) {
        (Some(since), Some(changed)) => changed.replace_millisecond(0).unwrap_or(changed) <= since,
        _ => false,
    }
}

fn parse_http_date(text: &str) -> Option<time::OffsetDateTime> {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::PrimitiveDateTime::parse(text.trim(), &format)
        .ok()
        .map(time::PrimitiveDateTime::assume_utc)
}

/// 304 Not Modified, with the validators a cache keeps.
fn not_modified_response(version: Version, last_updated: &StoredInstant) -> Response {
    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    super::set_validators(response.headers_mut(), version, last_updated);
    response
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
    headers: HeaderMap,
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
    // A version never changes, so a cache holding it (its ETag in `If-None-Match`, or any
    // copy no older than it) is told so, as a read would; the read rule was applied first.
    if stored.resource.is_some() && not_modified(&headers, version, &stored.last_updated) {
        return Ok(not_modified_response(version, &stored.last_updated));
    }
    if stored.resource.is_some() {
        Ok(version_response(
            &state,
            StatusCode::OK,
            stored,
            Prefer::default(),
            false,
        ))
    } else {
        Ok(gone_with_etag(
            format!("version {version} of Task/{id} is its deletion"),
            version,
        ))
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
    let mut view = HistoryView::default();
    for (name, value) in &pairs {
        if view.take(name, value)? {
            continue;
        }
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
                    "history supports _count, _offset, _summary and _elements, not '{other}'"
                )));
            }
        }
    }
    // `_summary=count` asks for the total only: no versions are kept, only counted.
    let page_size = if view.count_only { 0 } else { count };
    let (versions, total) = readable_history(&state, &principal, &id, page_size, offset).await?;
    let self_url = format!("{}/Task/{id}/_history", state.link_base);
    let link_to = |offset: usize| {
        let mut params = vec![
            ("_count".to_string(), count.to_string()),
            ("_offset".to_string(), offset.to_string()),
        ];
        params.extend(view.param.clone());
        format!(
            "{self_url}?{}",
            serde_urlencoded::to_string(&params).unwrap_or_default()
        )
    };
    let mut links = vec![link("self", &link_to(offset))];
    if !view.count_only {
        if (offset + count) < total as usize {
            links.push(link("next", &link_to(offset + count)));
        }
        if offset > 0 {
            links.push(link("previous", &link_to(offset.saturating_sub(count))));
        }
    }
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| history_entry(&state.link_base, v, view.subset.as_ref()))
        .collect();
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": now() },
        "type": "history",
        "total": total,
        "link": links,
    });
    if !view.count_only {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// `_summary` and `_elements` on a history, as on a search: the part of each version to
/// show (tagged `SUBSETTED`; a deletion has no content to cut), or, with `_summary=count`,
/// none of them, only how many there are.
#[derive(Debug, Default)]
struct HistoryView {
    subset: Option<Subset>,
    count_only: bool,
    /// The parameter as given, for the paging links.
    param: Option<(String, String)>,
}

impl HistoryView {
    /// Takes `_summary` or `_elements` (true), or leaves any other parameter (false). Both,
    /// or either twice, is a 400, as on a search.
    fn take(&mut self, name: &str, value: &str) -> Result<bool> {
        if !matches!(name, "_summary" | "_elements") {
            return Ok(false);
        }
        if self.subset.is_some() || self.count_only {
            return Err(subset::both_given());
        }
        if name == "_summary" && value == "count" {
            self.count_only = true;
        } else if name == "_summary" {
            self.subset = subset::parse_summary(value)?;
        } else {
            self.subset = Some(subset::parse_elements(value)?);
        }
        self.param = Some((name.to_string(), value.to_string()));
        Ok(true)
    }
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

/// `GET /fhir/Task/_history`: every version of every Task the caller may read, newest
/// first, with `_since`, `_at`, `_count` and keyset `next` links (`_cursor`). There is no
/// `total`: counting the whole history costs more than a page of it.
///
/// The read rule judges each version on its own content, as the instance history does: a
/// practitioner sees the versions of a Task during which it owned it (or the Task waited in
/// one of its queues), not those from before it took it or after it handed it on; a
/// deletion shows when the version it deleted does. A caller whose read has a scope has the
/// history filtered as it is read, at most `TYPE_HISTORY_SCAN` versions per page: a page may
/// hold fewer than `_count` entries and still have a `next` link, which goes on from the
/// last version looked at.
pub(super) async fn type_history(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let strict = Prefer::from_headers(&headers).strict;
    let pairs = parse_pairs(query.as_deref().unwrap_or(""))?;
    let mut count = state.config.search.default_count;
    let mut request = HistoryRequest {
        since: None,
        at: None,
        after: None,
        limit: 0,
    };
    let mut link_params: Vec<(String, String)> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    let mut view = HistoryView::default();
    for (name, value) in &pairs {
        let name = name.as_str();
        if view.take(name, value)? {
            if view.count_only {
                // Counting every version of every Task costs more than the history itself,
                // which is why this Bundle has no total either.
                return Err(Error::not_supported(
                    "_summary=count is not supported on the history of all Tasks, which has no \
                     total; count the versions of one Task with Task/{id}/_history?_summary=count",
                ));
            }
            link_params.extend(view.param.clone());
            continue;
        }
        if matches!(name, "_since" | "_at" | "_count" | "_cursor") {
            if seen.contains(&name) {
                return Err(Error::bad_request(
                    IssueCode::Invalid,
                    format!("the parameter '{name}' may appear only once"),
                ));
            }
            seen.push(name);
        }
        match name {
            "_count" => {
                count = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        Error::bad_request(
                            IssueCode::Invalid,
                            format!("_count must be a positive integer, not '{value}'"),
                        )
                    })?
                    .min(state.config.search.max_count);
            }
            "_since" => {
                let since = StoredInstant::parse(value).ok_or_else(|| {
                    Error::bad_request(
                        IssueCode::Invalid,
                        format!(
                            "_since must be an instant with a time zone, such as \
                             2026-01-01T00:00:00Z, not '{value}'"
                        ),
                    )
                })?;
                request.since = Some(since);
                link_params.push((name.into(), value.clone()));
            }
            "_at" => {
                let range = datetime::parse_range(value, DateKind::DateTime).map_err(|e| {
                    Error::bad_request(
                        IssueCode::Invalid,
                        format!("_at must be a date or dateTime, not '{value}': {e}"),
                    )
                })?;
                request.at = Some((range.start_key(), range.end_key()));
                link_params.push((name.into(), value.clone()));
            }
            "_cursor" => request.after = Some(decode_history_cursor(value)?),
            "_format" | "_pretty" => {}
            other if strict => {
                return Err(Error::not_supported(format!(
                    "the history of all Tasks supports _since, _at, _count and _cursor, not \
                     '{other}'"
                )));
            }
            // Lenient by default, as searches are: an unknown parameter is left out of the links.
            _ => {}
        }
    }
    let first_after = request.after.clone();
    let (entries, next_after) =
        history_page(&state, &principal, request, count, view.subset.as_ref()).await?;
    let self_base = format!("{}/Task/_history", state.link_base);
    let link_to = |after: Option<&HistoryKey>| {
        let mut params = link_params.clone();
        params.push(("_count".into(), count.to_string()));
        if let Some(after) = after {
            params.push(("_cursor".into(), encode_history_cursor(after)));
        }
        format!(
            "{self_base}?{}",
            serde_urlencoded::to_string(&params).unwrap_or_default()
        )
    };
    let mut links = vec![link("self", &link_to(first_after.as_ref()))];
    if let Some(after) = &next_after {
        links.push(link("next", &link_to(Some(after))));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": now() },
        "type": "history",
        "link": links,
    });
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// One page of the type-level history: its entries, and the key the `next` link goes on
/// from when more may follow. A caller who reads everything gets `count` versions in one
/// query; anyone else has them filtered by the read rule as they are read, in chunks, until
/// the page is full or `TYPE_HISTORY_SCAN` versions were looked at.
async fn history_page(
    state: &AppState,
    principal: &Principal,
    mut request: HistoryRequest,
    count: usize,
    subset: Option<&Subset>,
) -> Result<(Vec<Value>, Option<HistoryKey>)> {
    let entry =
        |version: &HistoryVersion| history_entry(&state.link_base, &version.version, subset);
    if auth::read_scope(principal).is_none() {
        request.limit = count + 1;
        let mut versions = state.store.task_history(&request).await?;
        let mut next_after = None;
        if versions.len() > count {
            versions.truncate(count);
            next_after = versions.last().map(HistoryVersion::key);
        }
        return Ok((versions.iter().map(entry).collect(), next_after));
    }
    let mut entries = Vec::new();
    let mut scanned = 0usize;
    loop {
        request.limit = HISTORY_CHUNK.min(TYPE_HISTORY_SCAN - scanned);
        let chunk = state.store.task_history(&request).await?;
        let exhausted = chunk.len() < request.limit;
        for (i, version) in chunk.iter().enumerate() {
            scanned += 1;
            let key = version.key();
            let content = version
                .version
                .resource
                .as_ref()
                .or(version.deleted.as_ref());
            if content.is_some_and(|r| auth::may_read_task(principal, r, &state.base_url)) {
                entries.push(entry(version));
                if entries.len() == count {
                    let last_of_all = exhausted && i + 1 == chunk.len();
                    return Ok((entries, (!last_of_all).then_some(key)));
                }
            }
            request.after = Some(key);
        }
        if exhausted {
            return Ok((entries, None));
        }
        if scanned >= TYPE_HISTORY_SCAN {
            return Ok((entries, request.after));
        }
    }
}

/// Versions one page of the type-level history looks at, at most, for a caller whose read
/// has a scope; the page ends there with a `next` link.
const TYPE_HISTORY_SCAN: usize = 1000;

/// A `next` link's `_cursor`: the key of the last version a page looked at, as base64url of
/// `last_updated`, id and version (opaque to clients; checked when it comes back).
fn encode_history_cursor(key: &HistoryKey) -> String {
    use base64::Engine;
    let text = format!("{}\n{}\n{}", key.last_updated, key.id, key.version);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn decode_history_cursor(text: &str) -> Result<HistoryKey> {
    use base64::Engine;
    let invalid = || {
        Error::bad_request(
            IssueCode::Invalid,
            "_cursor is not one this server made; follow the history's next links as they are",
        )
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.split('\n');
    let (Some(last_updated), Some(id), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let last_updated = StoredInstant::parse(last_updated)
        .filter(|parsed| parsed.as_str() == last_updated)
        .ok_or_else(invalid)?;
    Ok(HistoryKey {
        last_updated,
        id: TaskId::parse(id).map_err(|_| invalid())?,
        version: version.parse().map_err(|_| invalid())?,
    })
}

fn history_entry(base_url: &str, version: &StoredVersion, subset: Option<&Subset>) -> Value {
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
        entry["resource"] = match subset {
            Some(subset) => subset.apply(resource),
            None => resource.clone(),
        };
    }
    entry
}
