//! The FHIR RESTful API for `Task`: create, read, update, patch, delete, history, vread and
//! search. Each write is handed to the store as a decision closure, so the If-Match check, the
//! state machine and the role rules run against the version the write replaces, inside the
//! same transaction.

use std::collections::HashSet;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{AppState, BodyKind, Prefer, fhir_json, parse_json, read_body};
use crate::auth::{self, Principal};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::interaction::Interaction;
use crate::fhir::search::{self, Handling, Predicate, RevInclude, TotalMode};
use crate::fhir::shape::{ShapeLimits, check_shape};
use crate::fhir::workflow::{self, RequestKind};
use crate::fhir::{self, normalize_reference, task as task_rules};
use crate::store::{CurrentTask, Decision, PageRequest, StoredVersion, WriteOutcome, WriteRequest};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/Task", post(create).get(search_get))
        .route("/Task/_search", post(search_post))
        .route(
            "/Task/{id}",
            get(read).put(update).patch(patch).delete(delete),
        )
        .route("/Task/{id}/_history", get(history))
        .route("/Task/{id}/_history/{vid}", get(vread))
}

// ---------------------------------------------------------------------------------------------
// Writes

async fn create(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let prefer = Prefer::from_headers(&headers);
    let bytes = read_body(&state, &headers, body, BodyKind::FhirJson).await?;
    let mut resource = parse_json(&bytes)?;
    task_rules::validate_task(&resource, &state.base_url)?;
    check_shape(&resource, stored_limits(&state), "Task")?;
    // The server assigns ids and versions on create; whatever the client sent is ignored.
    if let Some(object) = resource.as_object_mut() {
        object.remove("id");
    }
    clear_server_meta(&mut resource);
    auth::authorize_task_write(&principal, None, Some(&resource), &state.base_url)?;
    // Every link of a new Task is new: its parents and its focal Task must exist and be
    // readable, and a request must be one its focal Task can honour.
    let links = new_links(None, &resource, None, &state.base_url)?;
    check_links(&state, &principal, &links, &resource).await?;
    let if_none_exist = match headers.get("if-none-exist") {
        None => None,
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                Error::bad_request(IssueCode::Invalid, "If-None-Exist is not valid text")
            })?;
            let text = text.trim_start_matches("Task?").trim_start_matches('?');
            let pairs = parse_pairs(text)?;
            let query = search::parse_query(
                &pairs,
                &state.search_limits,
                &state.base_url,
                Handling::Strict,
            )
            .map_err(|e| e.at("If-None-Exist"))?;
            if query.predicates.is_empty() {
                return Err(Error::bad_request(
                    IssueCode::Invalid,
                    "If-None-Exist needs at least one search criterion, e.g. identifier=http://x|123",
                ));
            }
            let mut predicates = query.predicates;
            predicates.extend(auth::read_scope(&principal));
            Some(predicates)
        }
    };
    // Conditional criteria are a search (the store evaluates them before the writer), so
    // they take a search slot like any other.
    let _admitted = match if_none_exist {
        Some(_) => Some(state.searches.enter().await?),
        None => None,
    };
    let outcome = state
        .store
        .write(WriteRequest::Create {
            resource,
            if_none_exist,
        })
        .await?;
    match outcome {
        WriteOutcome::Written(version) => {
            record_write(Interaction::Create);
            Ok(version_response(
                &state,
                StatusCode::CREATED,
                &version,
                prefer,
                true,
            ))
        }
        WriteOutcome::Existing(current) => {
            Ok(current_response(&state, StatusCode::OK, &current, prefer))
        }
        WriteOutcome::Unchanged => Err(Error::internal(
            "create wrote nothing",
            "unexpected outcome",
        )),
    }
}

async fn update(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    check_id(&id)?;
    let prefer = Prefer::from_headers(&headers);
    let if_match = parse_if_match(&headers)?;
    let bytes = read_body(&state, &headers, body, BodyKind::FhirJson).await?;
    let mut resource = parse_json(&bytes)?;
    task_rules::validate_task(&resource, &state.base_url)?;
    check_shape(&resource, stored_limits(&state), "Task")?;
    match resource.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(Error::invalid(
                "Task.id",
                format!("the body's id '{body_id}' does not match the URL's id '{id}'"),
            ));
        }
        None => {
            return Err(Error::bad_request(
                IssueCode::Required,
                "an update must carry the Task's id in the body",
            )
            .at("Task.id"));
        }
    }
    clear_server_meta(&mut resource);
    // Links are checked against the version read now, and the decision below refuses any new
    // link that this check did not see (the Task changed meanwhile). A Task without links
    // makes none, so it costs no extra read.
    let checked = if links(&resource, Some(&id), &state.base_url)?.is_empty() {
        HashSet::new()
    } else {
        let before = state.store.read(&id).await?.filter(|c| !c.deleted);
        match before {
            Some(before)
                if auth::authorize_task_write(
                    &principal,
                    Some(&before.resource),
                    None,
                    &state.base_url,
                )
                .is_err() =>
            {
                // The decision refuses it with 403 whatever it links to.
                HashSet::new()
            }
            before => {
                let fresh = new_links(
                    before.as_ref().map(|c| &c.resource),
                    &resource,
                    Some(&id),
                    &state.base_url,
                )?;
                check_links(&state, &principal, &fresh, &resource).await?
            }
        }
    };
    let base_url = state.base_url.clone();
    let task_id = id.clone();
    let decide = Box::new(move |current: Option<&CurrentTask>| {
        let live = current.filter(|c| !c.deleted);
        check_version(if_match, live)?;
        let before = live.map(|c| &c.resource);
        auth::authorize_task_write(&principal, before, Some(&resource), &base_url)?;
        if let Some(deleted) = current.filter(|c| c.deleted) {
            auth::authorize_task_recreate(&principal, &deleted.resource, &task_id, &base_url)?;
        }
        check_status_change(before, &resource)?;
        ensure_links_checked(before, &resource, &checked, &task_id, &base_url)?;
        Ok(Decision::Put(resource))
    });
    let outcome = state
        .store
        .write(WriteRequest::Change { id, decide })
        .await?;
    written_response(&state, outcome, prefer)
}

async fn patch(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    check_id(&id)?;
    let prefer = Prefer::from_headers(&headers);
    let if_match = parse_if_match(&headers)?;
    let bytes = read_body(&state, &headers, body, BodyKind::JsonPatch).await?;
    let operations = parse_json(&bytes)?;
    let touches_links = may_change_links(&operations);
    let patch = fhir::patch::parse_patch(operations, state.config.limits.max_patch_operations)?;
    let limits = stored_limits(&state);
    // The patch is applied and judged here, against the version read now, so that a patch
    // that fails (or grows the Task past the limits) is answered without ever reaching the
    // writer. The decision below repeats only the cheap checks, unless the Task changed in
    // between.
    let before = state.store.read(&id).await?;
    let before = require_live(before.as_ref(), &id)?;
    check_version(if_match, Some(before))?;
    // Reading rights come first, so a foreign Task is a 403 whatever the patch says.
    auth::authorize_task_write(&principal, Some(&before.resource), None, &state.base_url)?;
    let prepared = patched_task(before, &patch, limits, &state.base_url)?;
    auth::authorize_task_write(
        &principal,
        Some(&before.resource),
        Some(&prepared),
        &state.base_url,
    )?;
    check_status_change(Some(&before.resource), &prepared)?;
    let checked = if touches_links {
        let fresh = new_links(
            Some(&before.resource),
            &prepared,
            Some(&id),
            &state.base_url,
        )?;
        check_links(&state, &principal, &fresh, &prepared).await?
    } else {
        HashSet::new()
    };
    let prepared_from = before.version;
    let base_url = state.base_url.clone();
    let task_id = id.clone();
    let decide = Box::new(move |current: Option<&CurrentTask>| {
        let current = require_live(current, &task_id)?;
        check_version(if_match, Some(current))?;
        auth::authorize_task_write(&principal, Some(&current.resource), None, &base_url)?;
        // Versions only grow, so the same version is the same content: what was prepared
        // stands. Otherwise the patch is applied again, with the same bounds, to what is there.
        let patched = if current.version == prepared_from {
            prepared
        } else {
            patched_task(current, &patch, limits, &base_url)?
        };
        auth::authorize_task_write(
            &principal,
            Some(&current.resource),
            Some(&patched),
            &base_url,
        )?;
        check_status_change(Some(&current.resource), &patched)?;
        ensure_links_checked(
            Some(&current.resource),
            &patched,
            &checked,
            &task_id,
            &base_url,
        )?;
        Ok(Decision::Put(patched))
    });
    let outcome = state
        .store
        .write(WriteRequest::Change { id, decide })
        .await?;
    written_response(&state, outcome, prefer)
}

/// Applies a patch to a stored Task within the limits (`fhir::patch::apply_patch`) and checks
/// that the result is a Task Baton may store under the same id.
fn patched_task(
    current: &CurrentTask,
    patch: &json_patch::Patch,
    limits: ShapeLimits,
    base_url: &str,
) -> Result<Value> {
    let what = format!("Task/{}", current.id);
    let mut patched = fhir::patch::apply_patch(&current.resource, patch, limits, &what)?;
    if patched.get("id").and_then(Value::as_str) != Some(current.id.as_str()) {
        return Err(Error::client(
            StatusCode::UNPROCESSABLE_ENTITY,
            IssueCode::Processing,
            "a patch may not change or remove the Task's id",
        ));
    }
    task_rules::validate_task(&patched, base_url)?;
    clear_server_meta(&mut patched);
    Ok(patched)
}

async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    check_id(&id)?;
    let if_match = parse_if_match(&headers)?;
    let base_url = state.base_url.clone();
    let task_id = id.clone();
    let decide = Box::new(move |current: Option<&CurrentTask>| match current {
        None => Err(Error::not_found(format!("Task/{task_id} does not exist"))),
        // Deleting again changes nothing and answers 204, as FHIR allows, but only to whoever
        // could have deleted it: anyone else learns no more than a live Task would tell them.
        Some(c) if c.deleted => {
            auth::authorize_task_delete(&principal, &c.resource, &base_url)?;
            Ok(Decision::Keep)
        }
        Some(c) => {
            check_version(if_match, Some(c))?;
            auth::authorize_task_delete(&principal, &c.resource, &base_url)?;
            Ok(Decision::Delete)
        }
    });
    let outcome = state
        .store
        .write(WriteRequest::Change { id, decide })
        .await?;
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    if let WriteOutcome::Written(version) = outcome {
        record_write(Interaction::Delete);
        set_etag(response.headers_mut(), version.version);
    }
    Ok(response)
}

fn written_response(state: &AppState, outcome: WriteOutcome, prefer: Prefer) -> Result<Response> {
    match outcome {
        WriteOutcome::Written(version) => {
            record_write(version.interaction);
            let status = if version.interaction == Interaction::Create {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(version_response(
                state,
                status,
                &version,
                prefer,
                status == StatusCode::CREATED,
            ))
        }
        _ => Err(Error::internal(
            "an update wrote nothing",
            "unexpected outcome",
        )),
    }
}

/// What a stored Task may not exceed: the body-size limit as compact JSON, and
/// `shape::MAX_DEPTH` levels of nesting, so that every stored Task can be read back.
fn stored_limits(state: &AppState) -> ShapeLimits {
    ShapeLimits::stored(state.config.max_body_bytes)
}

fn record_write(interaction: Interaction) {
    metrics::counter!("baton_task_writes_total", "interaction" => interaction.as_str())
        .increment(1);
}

fn require_live<'a>(current: Option<&'a CurrentTask>, id: &str) -> Result<&'a CurrentTask> {
    match current {
        None => Err(Error::not_found(format!("Task/{id} does not exist"))),
        Some(c) if c.deleted => Err(Error::gone(format!("Task/{id} has been deleted"))),
        Some(c) => Ok(c),
    }
}

// ---------------------------------------------------------------------------------------------
// Links to other Tasks: sub-task parents (`partOf`) and the focal Task of a request.

/// What a linked Task is to the Task that links to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkRole {
    Parent,
    Focal(RequestKind),
}

/// A Task on this server that a Task links to, and the element that links to it.
#[derive(Debug, Clone)]
struct Link {
    task_id: String,
    role: LinkRole,
    at: String,
}

/// Every link of a Task, refusing the ones Baton cannot check: a `partOf` that is not a
/// reference to a Task here (422), a malformed request (400, see `workflow::parse_request`),
/// or a Task linking to itself (422). `own_id` is the Task's id when it already has one.
fn links(task: &Value, own_id: Option<&str>, base_url: &str) -> Result<Vec<Link>> {
    let mut links = Vec::new();
    let parents = task.get("partOf").and_then(Value::as_array);
    for (i, parent) in parents.into_iter().flatten().enumerate() {
        let at = format!("Task.partOf[{i}]");
        let reference = parent.get("reference").and_then(Value::as_str);
        let local = reference
            .and_then(|r| normalize_reference(r, base_url))
            .and_then(|r| r.strip_prefix("Task/").map(str::to_string));
        let Some(task_id) = local else {
            return Err(Error::business_rule(format!(
                "{at} must reference a Task on this server (Task/{{id}}), so that Baton can check \
                 that the parent exists and keep the sub-task tree searchable; it is {}",
                reference.map_or_else(|| "not a literal reference".into(), |r| format!("'{r}'"))
            ))
            .at(at));
        };
        links.push(Link {
            task_id,
            role: LinkRole::Parent,
            at,
        });
    }
    if let Some(request) = workflow::parse_request(task, base_url)? {
        links.push(Link {
            task_id: request.focal_id,
            role: LinkRole::Focal(request.kind),
            at: "Task.focus".into(),
        });
    }
    if let Some(link) = links.iter().find(|l| Some(l.task_id.as_str()) == own_id) {
        return Err(Error::business_rule(format!(
            "{} names this Task itself; a Task can be neither its own parent nor its own focus",
            link.at
        ))
        .at(link.at.clone()));
    }
    Ok(links)
}

/// The links `after` makes that `before` did not: the ones to check. A stored version whose
/// links Baton would no longer accept is read leniently, so it does not block later writes.
fn new_links(
    before: Option<&Value>,
    after: &Value,
    own_id: Option<&str>,
    base_url: &str,
) -> Result<Vec<Link>> {
    let old: Vec<Link> = before
        .and_then(|b| links(b, own_id, base_url).ok())
        .unwrap_or_default();
    Ok(links(after, own_id, base_url)?
        .into_iter()
        .filter(|new| {
            !old.iter()
                .any(|o| o.task_id == new.task_id && o.role == new.role)
        })
        .collect())
}

/// Checks new links against the stored Tasks: each linked Task exists and is not deleted
/// (404), and the caller may read it (403). A pending or completing request also needs a focal
/// Task it can act on and must be addressed to that Task's owner (422). Returns the ids
/// checked, which the write's decision compares with what it is about to store.
async fn check_links(
    state: &AppState,
    principal: &Principal,
    links: &[Link],
    task: &Value,
) -> Result<HashSet<String>> {
    let status = task_rules::status(task).unwrap_or_default();
    let asks_now = !task_rules::is_terminal(status) || status == "completed";
    let mut checked = HashSet::new();
    for link in links {
        let id = &link.task_id;
        let linked = match state.store.read(id).await? {
            Some(linked) if !linked.deleted => linked,
            found => {
                let why = if found.is_some() {
                    "has been deleted"
                } else {
                    "does not exist"
                };
                return Err(
                    Error::not_found(format!("{} names Task/{id}, which {why}", link.at))
                        .at(link.at.clone()),
                );
            }
        };
        if !auth::may_read_task(principal, &linked.resource, &state.base_url) {
            return Err(Error::forbidden(format!(
                "{} names Task/{id}, which is not owned by you and not in one of your role queues",
                link.at
            ))
            .at(link.at.clone()));
        }
        if let LinkRole::Focal(kind) = link.role
            && asks_now
        {
            workflow::check_request(kind, &linked.resource)?;
            workflow::check_addressee(task, &linked.resource, &state.base_url)?;
        }
        checked.insert(id.clone());
    }
    Ok(checked)
}

/// Inside the transaction: refuses a write whose new links were not checked beforehand, which
/// happens only when the Task changed between that check and this decision (409, retry).
fn ensure_links_checked(
    before: Option<&Value>,
    after: &Value,
    checked: &HashSet<String>,
    id: &str,
    base_url: &str,
) -> Result<()> {
    let fresh = new_links(before, after, Some(id), base_url)?;
    match fresh.iter().find(|l| !checked.contains(&l.task_id)) {
        None => Ok(()),
        Some(link) => Err(Error::conflict(format!(
            "Task/{id} changed while this write was being checked, and {} now names Task/{} \
             anew; read it again and retry",
            link.at, link.task_id
        ))
        .at(link.at.clone())),
    }
}

/// Whether a JSON Patch may change what a Task links to: `partOf`, `focus`, or `code` (which
/// makes a Task a request), or the whole document.
fn may_change_links(operations: &Value) -> bool {
    let mut paths = operations
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|op| ["path", "from"].map(|key| op.get(key).and_then(Value::as_str)))
        .flatten();
    paths.any(|path| {
        path.is_empty()
            || ["/partOf", "/focus", "/code"].iter().any(|element| {
                path.strip_prefix(element)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    })
}

/// The If-Match check: a stale version is a 412 that names the current one.
fn check_version(expected: Option<i64>, current: Option<&CurrentTask>) -> Result<()> {
    match (expected, current) {
        (None, _) => Ok(()),
        (Some(v), Some(c)) if c.version == v => Ok(()),
        (Some(v), Some(c)) => Err(Error::precondition_failed(format!(
            "If-Match names version {v} but Task/{} is at version {}; read it again and retry",
            c.id, c.version
        ))),
        (Some(_), None) => Err(Error::precondition_failed(
            "If-Match was given but the Task does not exist",
        )),
    }
}

fn check_status_change(before: Option<&Value>, after: &Value) -> Result<()> {
    let next = task_rules::status(after).unwrap_or_default();
    task_rules::check_transition(before.and_then(task_rules::status), next)
}

/// Removes `meta.versionId` and `meta.lastUpdated`, which only the server sets.
fn clear_server_meta(resource: &mut Value) {
    if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            resource.as_object_mut().map(|o| o.remove("meta"));
        }
    }
}

fn check_id(id: &str) -> Result<()> {
    if fhir::is_valid_id(id) {
        Ok(())
    } else {
        Err(Error::bad_request(
            IssueCode::Invalid,
            format!("'{id}' is not a valid FHIR id ({})", fhir::ID_RULE),
        ))
    }
}

/// Parses `If-Match: W/"3"` (also `"3"` and `3`).
pub(crate) fn parse_if_match(headers: &HeaderMap) -> Result<Option<i64>> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    let bare = text.strip_prefix("W/").unwrap_or(text).trim_matches('"');
    bare.parse::<i64>().map(Some).map_err(|_| {
        Error::bad_request(
            IssueCode::Invalid,
            format!("If-Match '{text}' must be an ETag such as W/\"3\""),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Reads

async fn read(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    check_id(&id)?;
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
async fn readable_current(
    state: &AppState,
    principal: &Principal,
    id: &str,
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

async fn vread(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, vid)): Path<(String, String)>,
) -> Result<Response> {
    check_id(&id)?;
    let version: i64 = vid.parse().map_err(|_| {
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
            .read_version(&id, version.saturating_sub(1))
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

async fn history(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    check_id(&id)?;
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
    id: &str,
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

// ---------------------------------------------------------------------------------------------
// Search

async fn search_get(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let pairs = parse_pairs(query.as_deref().unwrap_or(""))?;
    run_search(&state, &principal, &headers, pairs).await
}

async fn search_post(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response> {
    let bytes = read_body(&state, &headers, body, BodyKind::Form).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::bad_request(IssueCode::Structure, "the form body is not UTF-8"))?;
    let mut pairs = parse_pairs(query.as_deref().unwrap_or(""))?;
    pairs.extend(parse_pairs(text)?);
    run_search(&state, &principal, &headers, pairs).await
}

fn parse_pairs(text: &str) -> Result<Vec<(String, String)>> {
    super::query_pairs(Some(text))
}

async fn run_search(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
) -> Result<Response> {
    let prefer = Prefer::from_headers(headers);
    let handling = if prefer.lenient {
        Handling::Lenient
    } else {
        Handling::Strict
    };
    let query = search::parse_query(&pairs, &state.search_limits, &state.base_url, handling)?;
    // A malformed query is refused above without taking a slot; from here on the search
    // holds one until its Bundle is built.
    let _admitted = state.searches.enter().await?;
    let scope: Vec<Predicate> = auth::read_scope(principal).into_iter().collect();
    let mut predicates = query.predicates.clone();
    predicates.extend(scope.iter().cloned());
    let count = if query.summary_count { 0 } else { query.count };
    let with_total = query.summary_count || query.total == TotalMode::Accurate;
    let max_page_bytes = state.config.search.max_page_bytes;
    let page = state
        .store
        .search(PageRequest {
            predicates: &predicates,
            sort: &query.sort,
            count,
            offset: query.offset,
            with_total,
            max_bytes: max_page_bytes,
        })
        .await?;

    let mut entries: Vec<Value> = page
        .tasks
        .iter()
        .map(|t| search_entry(&state.base_url, t, "match"))
        .collect();
    // Where the page stops short of what was asked, an `outcome` entry says why.
    let mut warnings = Vec::new();
    if page.truncated {
        warnings.push(format!(
            "this page holds {} of the {} Tasks asked for: it reached search.max_page_bytes              ({max_page_bytes} bytes); the next link continues after them",
            page.tasks.len(),
            query.count
        ));
    }
    if let Some(revinclude) = query.revinclude.filter(|_| !page.tasks.is_empty()) {
        let budget = max_page_bytes.saturating_sub(page.bytes);
        let (included, stop) = sub_tasks(state, &page.tasks, &scope, revinclude, budget).await?;
        entries.extend(
            included
                .iter()
                .map(|t| search_entry(&state.base_url, t, "include")),
        );
        if let Some(stop) = stop {
            warnings.push(stop.explain(state));
        }
    }
    entries.extend(warnings.iter().map(|warning| {
        json!({
            "resource": crate::error::operation_outcome(
                "warning",
                IssueCode::TooCostly,
                warning,
                None,
            ),
            "search": { "mode": "outcome" },
        })
    }));

    let self_base = format!("{}/Task", state.base_url);
    let page_url = |offset: usize| {
        let mut params = query.link_params.clone();
        params.push(("_count".into(), query.count.to_string()));
        params.push(("_offset".into(), offset.to_string()));
        format!(
            "{self_base}?{}",
            serde_urlencoded::to_string(&params).unwrap_or_default()
        )
    };
    let mut links = vec![link("self", &page_url(query.offset))];
    if !query.summary_count {
        links.push(link("first", &page_url(0)));
        // A page the byte budget ended holds fewer Tasks than asked for; the next one starts
        // right after the last it holds.
        let next = query.offset + page.tasks.len();
        let has_next = page.truncated
            || match page.total {
                Some(total) => next < total as usize,
                None => page.tasks.len() == query.count,
            };
        if has_next {
            links.push(link("next", &page_url(next)));
        }
        if query.offset > 0 {
            links.push(link(
                "previous",
                &page_url(query.offset.saturating_sub(query.count)),
            ));
        }
        if let Some(total) = page.total
            && query.count > 0
        {
            let total = total as usize;
            let last = if total == 0 {
                0
            } else {
                (total - 1) / query.count * query.count
            };
            links.push(link("last", &page_url(last)));
        }
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": now() },
        "type": "searchset",
        "link": links,
    });
    if let Some(total) = page.total {
        bundle["total"] = json!(total);
    }
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    metrics::counter!("baton_task_searches_total").increment(1);
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// Why the included sub-tasks of a page stop short of the whole tree below its matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IncludeStop {
    /// `search.max_included` Tasks were included.
    Count,
    /// The page's byte budget was spent.
    Bytes,
    /// `:iterate` went `search.max_include_depth` levels down.
    Depth,
}

impl IncludeStop {
    fn explain(self, state: &AppState) -> String {
        let search = &state.config.search;
        match self {
            IncludeStop::Count => format!(
                "included sub-tasks stop at search.max_included ({}); more may exist",
                search.max_included
            ),
            IncludeStop::Bytes => format!(
                "included sub-tasks stop where the page reached search.max_page_bytes ({} \
                 bytes); more may exist",
                search.max_page_bytes
            ),
            IncludeStop::Depth => format!(
                "included sub-tasks stop {} levels below the matches \
                 (search.max_include_depth); deeper ones, if any, are not included",
                search.max_include_depth
            ),
        }
    }
}

/// Follows `partOf` downwards from the matched Tasks: one level, or (`:iterate`) down to
/// `search.max_include_depth` levels, bounded by `search.max_included` Tasks and by
/// `max_bytes` of them, and applying the caller's read scope at each level. Says where it
/// stopped short, if it did.
async fn sub_tasks(
    state: &AppState,
    matched: &[CurrentTask],
    scope: &[Predicate],
    revinclude: RevInclude,
    max_bytes: usize,
) -> Result<(Vec<CurrentTask>, Option<IncludeStop>)> {
    let limit = state.config.search.max_included;
    let max_depth = match revinclude {
        RevInclude::PartOf => 1,
        RevInclude::PartOfIterate => state.config.search.max_include_depth,
    };
    let mut seen: HashSet<String> = matched.iter().map(|t| t.id.clone()).collect();
    let mut frontier: Vec<String> = matched.iter().map(|t| format!("Task/{}", t.id)).collect();
    let mut included = Vec::new();
    let mut bytes_left = max_bytes;
    let mut depth = 0;
    while !frontier.is_empty() {
        if depth == max_depth {
            let stop = (revinclude == RevInclude::PartOfIterate).then_some(IncludeStop::Depth);
            return Ok((included, stop));
        }
        let wanted = limit - included.len();
        let children = state
            .store
            .children_of(&frontier, scope, wanted, bytes_left)
            .await?;
        depth += 1;
        bytes_left = bytes_left.saturating_sub(children.bytes);
        let full = children.tasks.len() == wanted;
        frontier = Vec::new();
        for child in children.tasks {
            if seen.insert(child.id.clone()) {
                frontier.push(format!("Task/{}", child.id));
                included.push(child);
            }
        }
        if children.truncated {
            return Ok((included, Some(IncludeStop::Bytes)));
        }
        if full {
            return Ok((included, Some(IncludeStop::Count)));
        }
    }
    Ok((included, None))
}

fn search_entry(base_url: &str, task: &CurrentTask, mode: &str) -> Value {
    json!({
        "fullUrl": format!("{base_url}/Task/{}", task.id),
        "resource": task.resource,
        "search": { "mode": mode },
    })
}

fn link(relation: &str, url: &str) -> Value {
    json!({ "relation": relation, "url": url })
}

fn now() -> String {
    fhir::datetime::format_instant(time::OffsetDateTime::now_utc())
}

// ---------------------------------------------------------------------------------------------
// Responses

/// A 410 for a deleted Task or version, with the ETag of the deletion.
fn gone_with_etag(diagnostics: String, version: i64) -> Response {
    let mut response = axum::response::IntoResponse::into_response(Error::gone(diagnostics));
    set_etag(response.headers_mut(), version);
    response
}

fn set_etag(headers: &mut HeaderMap, version: i64) {
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
        &task.resource,
        prefer,
        false,
    )
}

fn version_response(
    state: &AppState,
    status: StatusCode,
    version: &StoredVersion,
    prefer: Prefer,
    with_location: bool,
) -> Response {
    let resource = version.resource.clone().unwrap_or(Value::Null);
    respond(
        state,
        status,
        &version.id,
        version.version,
        &version.last_updated,
        &resource,
        prefer,
        with_location,
    )
}

#[allow(clippy::too_many_arguments)]
fn respond(
    state: &AppState,
    status: StatusCode,
    id: &str,
    version: i64,
    last_updated: &str,
    resource: &Value,
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
        fhir_json(status, resource)
    };
    let headers = response.headers_mut();
    set_etag(headers, version);
    if let Some(http_date) = http_date(last_updated)
        && let Ok(value) = HeaderValue::from_str(&http_date)
    {
        headers.insert(header::LAST_MODIFIED, value);
    }
    if with_location
        && let Ok(value) =
            HeaderValue::from_str(&format!("{}/Task/{id}/_history/{version}", state.base_url))
    {
        headers.insert(header::LOCATION, value);
    }
    response
}

/// Formats an instant as an HTTP date (`Last-Modified`).
fn http_date(instant: &str) -> Option<String> {
    let at = fhir::datetime::parse_instant(instant)?;
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    at.format(&format).ok()
}
