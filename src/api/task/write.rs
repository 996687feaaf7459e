//! The writes: create (with If-None-Exist), update, patch (JSON Patch, merge patch, FHIRPath
//! Patch) and delete, each handed to the
//! store as a decision closure, and the checks they make (If-Match, the state machine, ids).
//! They are kept apart from reads because only writes go through the writer.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::Value;

use super::links::{check_links, ensure_links_checked, links, may_change_links, new_links};
use super::search::parse_pairs;
use super::{current_response, set_etag, version_response};
use crate::api::{AppState, BodyKind, Prefer, media_type, parse_if_match, parse_json, read_body};
use crate::auth::{self, Principal};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::ids::{TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::fhir::json;
use crate::fhir::patch::TaskPatch;
use crate::fhir::search::{self, Handling, Predicate, index_task};
use crate::fhir::shape::{ShapeLimits, check_shape};
use crate::fhir::workflow::{change, elements, information, profiles};
use crate::fhir::{self, task as task_rules};
use crate::store::{
    Counting, CurrentTask, Decide, Decision, PageRequest, WriteOutcome, WriteRequest,
};

/// Tasks a transaction creates, by the ids given to them before any is written: links to
/// them are taken as checked, since they are written in the same transaction by the same
/// caller (who may read what it may create). Empty for a single request and a batch entry.
pub(crate) type Created = HashSet<TaskId>;

pub(super) async fn create(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let prefer = Prefer::from_headers(&headers);
    let bytes = read_body(&state, &headers, body, BodyKind::FhirJson).await?;
    let resource = parse_json(&bytes)?;
    let if_none_exist = match headers.get("if-none-exist") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            Error::bad_request(IssueCode::Invalid, "If-None-Exist is not valid text")
        })?),
    };
    let request = create_request(
        &state,
        &principal,
        resource,
        if_none_exist,
        None,
        &Created::new(),
    )
    .await?;
    // Conditional criteria are a search (the store evaluates them before the writer), so
    // they take a search slot like any other.
    let _admitted = match &request {
        WriteRequest::Create {
            if_none_exist: Some(_),
            ..
        } => Some(state.searches.enter().await?),
        _ => None,
    };
    let outcome = state.store.write(request).await?;
    created_response(&state, outcome, prefer)
}

/// The answer to a create: 201 with the new version, or 200 with the Task If-None-Exist found.
fn created_response(state: &AppState, outcome: WriteOutcome, prefer: Prefer) -> Result<Response> {
    match outcome {
        WriteOutcome::Written(version) => {
            record_write(Interaction::Create);
            Ok(version_response(
                state,
                StatusCode::CREATED,
                version,
                prefer,
                true,
            ))
        }
        WriteOutcome::Existing(current) => {
            Ok(current_response(state, StatusCode::OK, &current, prefer))
        }
        WriteOutcome::Unchanged => Err(Error::internal(
            "create wrote nothing",
            "unexpected outcome",
        )),
    }
}

/// A create as the store takes it, after every check that needs no transaction: validation,
/// shape, the role rule, the links (those to Tasks in `created` are taken as checked), and
/// If-None-Exist criteria parsed and scoped to what the caller may read. `id` is the id a
/// transaction gave the new Task beforehand; None lets the store choose.
pub(crate) async fn create_request(
    state: &AppState,
    principal: &Principal,
    mut resource: Value,
    if_none_exist: Option<&str>,
    id: Option<TaskId>,
    created: &Created,
) -> Result<WriteRequest> {
    task_rules::validate_task(&resource, &state.base_url)?;
    profiles::check_declared(&resource)?;
    check_shape(&resource, stored_limits(state), "Task")?;
    // The server assigns ids and versions on create; whatever the client sent is ignored.
    if let Some(object) = resource.as_object_mut() {
        object.remove("id");
    }
    clear_server_meta(&mut resource);
    authorize_create(principal, &resource, &state.base_url)?;
    check_request_write(principal, None, &resource, &state.base_url)?;
    // Every link of a new Task is new: its parents and its focal Task must exist and be
    // readable, and a request must be one its focal Task can honour.
    let links = new_links(None, &resource, id.as_ref(), &state.base_url)?;
    check_links(state, principal, &links, &resource, created).await?;
    let if_none_exist = match if_none_exist {
        None => None,
        Some(text) => Some(criteria(state, principal, text, "If-None-Exist")?),
    };
    Ok(WriteRequest::Create {
        id,
        resource,
        if_none_exist,
    })
}

/// The role rule of a create, with the one case the workflow guidance adds: a fulfiller asks
/// its placer for information with a Task the placer owns (`fhir::workflow::information`). A
/// practitioner may create such a Task open and in its own name (`requester`); that it is
/// owned by the placer of a coordination Task the practitioner owns is checked with the links.
fn authorize_create(principal: &Principal, resource: &Value, base_url: &str) -> Result<()> {
    if principal.role != auth::Role::Practitioner || !information::is_information_request(resource)
    {
        return auth::authorize_task_write(principal, None, Some(resource), base_url);
    }
    let me = principal.fhir_user.as_deref().unwrap_or_default();
    let requester = json::at(resource, "/requester/reference")
        .and_then(Value::as_str)
        .and_then(|r| fhir::normalize_reference(r, base_url));
    if requester.as_deref() != Some(me) {
        return Err(Error::forbidden(format!(
            "a practitioner asks for information in its own name: Task.requester must be {me}"
        ))
        .at("Task.requester"));
    }
    if task_rules::is_terminal(task_rules::status(resource).unwrap_or_default()) {
        return Err(Error::business_rule(
            "an information request is created open (e.g. requested); the placer closes it",
        )
        .at("Task.status"));
    }
    Ok(())
}

/// Conditional criteria (`If-None-Exist`, a conditional update's or delete's query) as
/// predicates, with the caller's read scope: a caller's condition never sees, and so never
/// reveals or touches, a Task it may not read. `what` names the criteria in errors.
pub(crate) fn criteria(
    state: &AppState,
    principal: &Principal,
    text: &str,
    what: &str,
) -> Result<Vec<Predicate>> {
    let text = text.trim_start_matches("Task?").trim_start_matches('?');
    let pairs = parse_pairs(text)?;
    let query = search::parse_query(
        &pairs,
        &state.search_limits,
        &state.base_url,
        Handling::Strict,
    )
    .map_err(|e| e.at(what))?;
    if query.predicates.is_empty() {
        return Err(Error::bad_request(
            IssueCode::Invalid,
            format!("{what} needs at least one search criterion, e.g. identifier=http://x|123"),
        )
        .at(what));
    }
    let mut predicates = query.predicates;
    predicates.extend(auth::read_scope(principal));
    Ok(predicates)
}

/// The Tasks conditional criteria match now: none, one, or (as two) several. The search
/// takes a search slot like any other.
pub(crate) async fn find_matches(
    state: &AppState,
    predicates: &[Predicate],
) -> Result<Vec<CurrentTask>> {
    let _admitted = state.searches.enter().await?;
    let page = state
        .store
        .search(PageRequest {
            predicates,
            sort: &[],
            count: 2,
            offset: 0,
            after: None,
            counting: Counting::Skip,
            max_bytes: usize::MAX,
        })
        .await?;
    // A search lists live Tasks only.
    page.tasks
        .into_iter()
        .map(|listed| {
            Ok(CurrentTask {
                resource: listed.resource()?,
                id: listed.id,
                version: listed.version,
                last_updated: listed.last_updated,
                deleted: false,
            })
        })
        .collect()
}

/// Wraps a change's decision so that it first confirms that the Task still matches the
/// conditional criteria that chose it: a Task changed between the search and the write so
/// that it no longer matches is a 409 (retry), never a write to the wrong Task.
pub(crate) fn while_matching(
    decide: Decide,
    predicates: Vec<Predicate>,
    base_url: String,
) -> Decide {
    Box::new(move |current: Option<&CurrentTask>| {
        let still = current
            .filter(|c| !c.deleted)
            .is_some_and(|c| search::matches(&index_task(&c.resource, &base_url), &predicates));
        if !still {
            return Err(Error::conflict(
                "the Task the conditional criteria matched changed before it could be written; \
                 retry the request",
            ));
        }
        decide(current)
    })
}

pub(super) async fn update(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let id = TaskId::parse(&id)?;
    let prefer = Prefer::from_headers(&headers);
    let if_match = parse_if_match(&headers)?;
    let bytes = read_body(&state, &headers, body, BodyKind::FhirJson).await?;
    let resource = parse_json(&bytes)?;
    let request =
        update_request(&state, principal, id, resource, if_match, &Created::new()).await?;
    let outcome = state.store.write(request).await?;
    written_response(&state, outcome, prefer)
}

/// `PUT /fhir/Task?criteria`, the conditional update: no match creates the Task (its body may
/// not carry an id, since the server assigns ids), one match updates that Task (the body's id,
/// if any, must be its id), several are a 412.
pub(super) async fn conditional_update(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response> {
    let prefer = Prefer::from_headers(&headers);
    let if_match = parse_if_match(&headers)?;
    let bytes = read_body(&state, &headers, body, BodyKind::FhirJson).await?;
    let resource = parse_json(&bytes)?;
    let request = conditional_update_request(
        &state,
        principal,
        query.as_deref().unwrap_or(""),
        resource,
        if_match,
        &Created::new(),
    )
    .await?;
    let creates = matches!(request, WriteRequest::Create { .. });
    let outcome = state.store.write(request).await?;
    if creates {
        conditional_created(&state, outcome, prefer)
    } else {
        written_response(&state, outcome, prefer)
    }
}

/// A conditional update that found nothing creates the Task; if a matching Task was written
/// in the meantime (the store found it again), the create did not happen: 409, retry.
fn conditional_created(
    state: &AppState,
    outcome: WriteOutcome,
    prefer: Prefer,
) -> Result<Response> {
    match outcome {
        WriteOutcome::Existing(_) => Err(race_lost()),
        outcome => created_response(state, outcome, prefer),
    }
}

pub(crate) fn race_lost() -> Error {
    Error::conflict(
        "a Task matching the conditional criteria was written while this request was checked; \
         retry the request",
    )
}

/// A conditional update as the store takes it (see `conditional_update`): a create guarded by
/// the same criteria as If-None-Exist when nothing matches, an update of the one Task matched
/// (guarded by `while_matching`) otherwise.
pub(crate) async fn conditional_update_request(
    state: &AppState,
    principal: Principal,
    query: &str,
    resource: Value,
    if_match: Option<Version>,
    created: &Created,
) -> Result<WriteRequest> {
    let predicates = criteria(
        state,
        &principal,
        query,
        "the conditional update's criteria",
    )?;
    let mut found = find_matches(state, &predicates).await?;
    match found.len() {
        0 => {
            if resource.get("id").is_some() {
                return Err(Error::invalid(
                    "Task.id",
                    "no Task matches the conditional update's criteria, so it creates one, and \
                     the server assigns the id of a new Task; remove the id from the body",
                ));
            }
            let mut request =
                create_request(state, &principal, resource, None, None, created).await?;
            if let WriteRequest::Create { if_none_exist, .. } = &mut request {
                *if_none_exist = Some(predicates);
            }
            Ok(request)
        }
        1 => {
            let Some(target) = found.pop() else {
                return Err(Error::internal("conditional update", "no match"));
            };
            // A body without an id updates the Task found; one with an id must name it
            // (`update_request` checks).
            let mut resource = resource;
            if resource.get("id").is_none() {
                resource["id"] = Value::String(target.id.to_string());
            }
            let request =
                update_request(state, principal, target.id, resource, if_match, created).await?;
            Ok(guard(request, predicates, &state.base_url))
        }
        _ => Err(several("the conditional update's criteria")),
    }
}

/// A 412 for conditional criteria that match more than one Task.
fn several(what: &str) -> Error {
    Error::client(
        StatusCode::PRECONDITION_FAILED,
        IssueCode::MultipleMatches,
        format!("{what} match more than one Task; make them more selective"),
    )
}

/// A change request guarded by `while_matching`.
fn guard(request: WriteRequest, predicates: Vec<Predicate>, base_url: &str) -> WriteRequest {
    match request {
        WriteRequest::Change { id, decide } => WriteRequest::Change {
            id,
            decide: while_matching(decide, predicates, base_url.to_owned()),
        },
        other => other,
    }
}

/// The body's id must be the Task's.
fn check_body_id(resource: &Value, id: &TaskId) -> Result<()> {
    match resource.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id.as_str() => Ok(()),
        Some(body_id) => Err(Error::invalid(
            "Task.id",
            format!("the body's id '{body_id}' does not match the URL's id '{id}'"),
        )),
        None => Err(Error::bad_request(
            IssueCode::Required,
            "an update must carry the Task's id in the body",
        )
        .at("Task.id")),
    }
}

/// An update as the store takes it: validation and shape first, the links checked against
/// the version read now (those to Tasks in `created` taken as checked), and a decision that
/// runs inside the transaction with If-Match, the role rules, the state machine and the links
/// against the version it replaces.
pub(crate) async fn update_request(
    state: &AppState,
    principal: Principal,
    id: TaskId,
    mut resource: Value,
    if_match: Option<Version>,
    created: &Created,
) -> Result<WriteRequest> {
    task_rules::validate_task(&resource, &state.base_url)?;
    profiles::check_declared(&resource)?;
    check_shape(&resource, stored_limits(state), "Task")?;
    check_body_id(&resource, &id)?;
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
                check_links(state, &principal, &fresh, &resource, created).await?
            }
        }
    };
    let base_url = state.base_url.clone();
    let task_id = id.clone();
    let proposed = Arc::new(resource);
    let decide = Box::new(move |current: Option<&CurrentTask>| {
        let resource: &Value = &proposed;
        let live = current.filter(|c| !c.deleted);
        check_version(if_match, live)?;
        let before = live.map(|c| &c.resource);
        auth::authorize_task_write(&principal, before, Some(resource), &base_url)?;
        if let Some(deleted) = current.filter(|c| c.deleted) {
            auth::authorize_task_recreate(&principal, &deleted.resource, &task_id, &base_url)?;
        }
        if let Some(before) = before {
            check_rewrite(&principal, before, resource, &base_url)?;
        }
        check_request_write(&principal, before, resource, &base_url)?;
        check_status_change(before, resource)?;
        ensure_links_checked(before, resource, &checked, &task_id, &base_url)?;
        Ok(Decision::Put(Arc::clone(&proposed)))
    });
    Ok(WriteRequest::Change { id, decide })
}

pub(super) async fn patch(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let id = TaskId::parse(&id)?;
    let prefer = Prefer::from_headers(&headers);
    let if_match = parse_if_match(&headers)?;
    let bytes = read_body(&state, &headers, body, BodyKind::Patch).await?;
    let document = parse_json(&bytes)?;
    let (patch, touches_links) = read_patch(document, media_type(&headers).as_deref(), &state)?;
    let request = patch_request(
        &state,
        principal,
        id,
        patch,
        touches_links,
        if_match,
        &Created::new(),
    )
    .await?;
    let outcome = state.store.write(request).await?;
    written_response(&state, outcome, prefer)
}

/// A patch as the store takes it: the patch applied and judged against the version read now,
/// so that a patch that fails (or grows the Task past the limits) is answered without ever
/// reaching the writer, and a decision that repeats only the cheap checks, unless the Task
/// changed in between (then the patch is applied again to what is there). `touches_links`
/// says whether the patch may change the Task's links (those to Tasks in `created` are taken
/// as checked).
pub(crate) async fn patch_request(
    state: &AppState,
    principal: Principal,
    id: TaskId,
    patch: TaskPatch,
    touches_links: bool,
    if_match: Option<Version>,
    created: &Created,
) -> Result<WriteRequest> {
    let limits = stored_limits(state);
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
    check_rewrite(&principal, &before.resource, &prepared, &state.base_url)?;
    check_request_write(
        &principal,
        Some(&before.resource),
        &prepared,
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
        check_links(state, &principal, &fresh, &prepared, created).await?
    } else {
        HashSet::new()
    };
    let prepared_from = before.version;
    let prepared = Arc::new(prepared);
    let base_url = state.base_url.clone();
    let task_id = id.clone();
    let decide = Box::new(move |current: Option<&CurrentTask>| {
        let current = require_live(current, &task_id)?;
        check_version(if_match, Some(current))?;
        auth::authorize_task_write(&principal, Some(&current.resource), None, &base_url)?;
        // Versions only grow, so the same version is the same content: what was prepared
        // stands. Otherwise the patch is applied again, with the same bounds, to what is there.
        let patched = if current.version == prepared_from {
            Arc::clone(&prepared)
        } else {
            Arc::new(patched_task(current, &patch, limits, &base_url)?)
        };
        auth::authorize_task_write(
            &principal,
            Some(&current.resource),
            Some(&*patched),
            &base_url,
        )?;
        check_rewrite(&principal, &current.resource, &patched, &base_url)?;
        check_request_write(&principal, Some(&current.resource), &patched, &base_url)?;
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
    Ok(WriteRequest::Change { id, decide })
}

/// Reads a PATCH body in the form its media type says, and whether it may change the Task's
/// links (a JSON Patch says by its paths; the other forms are checked for new links always,
/// which costs nothing when there are none):
/// - `application/json-patch+json`: JSON Patch;
/// - `application/merge-patch+json`: JSON Merge Patch;
/// - `application/fhir+json`: FHIRPath Patch, a `Parameters` resource;
/// - `application/json`: an array is JSON Patch, a `Parameters` resource FHIRPath Patch, any
///   other object a merge patch (what fhirpy's `patch()` sends: the elements to change).
pub(crate) fn read_patch(
    document: Value,
    media_type: Option<&str>,
    state: &AppState,
) -> Result<(TaskPatch, bool)> {
    let max_operations = state.config.limits.max_patch_operations;
    let is_parameters = document.get("resourceType").and_then(Value::as_str) == Some("Parameters");
    let json_patch = |document: Value| -> Result<(TaskPatch, bool)> {
        let touches_links = may_change_links(&document);
        let patch = fhir::patch::parse_patch(document, max_operations)?;
        Ok((TaskPatch::Json(patch), touches_links))
    };
    let fhirpath = |document: &Value| -> Result<(TaskPatch, bool)> {
        let operations = fhir::patch::fhirpath::parse(document, max_operations)?;
        Ok((TaskPatch::FhirPath(operations), true))
    };
    let merge = |patch: Value| {
        (
            TaskPatch::Merge {
                patch,
                max_operations,
            },
            true,
        )
    };
    match media_type {
        Some("application/merge-patch+json") => Ok(merge(document)),
        Some("application/fhir+json") if is_parameters => fhirpath(&document),
        Some("application/fhir+json") => Err(Error::bad_request(
            IssueCode::Structure,
            "a PATCH sent as application/fhir+json must be a FHIRPath Patch: a Parameters \
             resource of 'operation' parameters; send a JSON Patch as \
             application/json-patch+json and a merge patch as application/merge-patch+json",
        )),
        Some("application/json") if document.is_array() => json_patch(document),
        Some("application/json") if is_parameters => fhirpath(&document),
        Some("application/json") => Ok(merge(document)),
        _ => json_patch(document),
    }
}

/// Applies a patch to a stored Task within the limits (`fhir::patch::apply_task_patch`) and
/// checks that the result is a Task Baton may store under the same id.
fn patched_task(
    current: &CurrentTask,
    patch: &TaskPatch,
    limits: ShapeLimits,
    base_url: &str,
) -> Result<Value> {
    let what = format!("Task/{}", current.id);
    let mut patched = fhir::patch::apply_task_patch(&current.resource, patch, limits, &what)?;
    if patched.get("id").and_then(Value::as_str) != Some(current.id.as_str()) {
        return Err(Error::client(
            StatusCode::UNPROCESSABLE_ENTITY,
            IssueCode::Processing,
            "a patch may not change or remove the Task's id",
        ));
    }
    task_rules::validate_task(&patched, base_url)?;
    profiles::check_declared(&patched)?;
    clear_server_meta(&mut patched);
    Ok(patched)
}

pub(super) async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    let id = TaskId::parse(&id)?;
    let if_match = parse_if_match(&headers)?;
    let outcome = state
        .store
        .write(delete_request(&state, principal, id, if_match))
        .await?;
    Ok(deleted_response(outcome))
}

/// `DELETE /fhir/Task?criteria`, the conditional delete: no match is a 204 that changes
/// nothing, one match deletes that Task, several are a 412 (Baton deletes one Task per
/// request, so a mistaken criterion cannot empty a work list).
pub(super) async fn conditional_delete(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let if_match = parse_if_match(&headers)?;
    match conditional_delete_request(&state, principal, query.as_deref().unwrap_or(""), if_match)
        .await?
    {
        None => Ok(deleted_response(WriteOutcome::Unchanged)),
        Some(request) => Ok(deleted_response(state.store.write(request).await?)),
    }
}

/// A conditional delete as the store takes it: None when nothing matches (nothing to do),
/// the delete of the one Task matched (guarded by `while_matching`), or a 412 for several.
pub(crate) async fn conditional_delete_request(
    state: &AppState,
    principal: Principal,
    query: &str,
    if_match: Option<Version>,
) -> Result<Option<WriteRequest>> {
    let predicates = criteria(
        state,
        &principal,
        query,
        "the conditional delete's criteria",
    )?;
    let mut found = find_matches(state, &predicates).await?;
    if found.len() > 1 {
        return Err(several("the conditional delete's criteria"));
    }
    Ok(found.pop().map(|target| {
        guard(
            delete_request(state, principal, target.id, if_match),
            predicates,
            &state.base_url,
        )
    }))
}

/// A delete as the store takes it: the decision checks If-Match and the role rule against
/// the version it deletes.
pub(crate) fn delete_request(
    state: &AppState,
    principal: Principal,
    id: TaskId,
    if_match: Option<Version>,
) -> WriteRequest {
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
    WriteRequest::Change { id, decide }
}

fn deleted_response(outcome: WriteOutcome) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    if let WriteOutcome::Written(version) = outcome {
        record_write(Interaction::Delete);
        set_etag(response.headers_mut(), version.version);
    }
    response
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
                version,
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

pub(crate) fn record_write(interaction: Interaction) {
    metrics::counter!("baton_task_writes_total", "interaction" => interaction.as_str())
        .increment(1);
}

fn require_live<'a>(current: Option<&'a CurrentTask>, id: &TaskId) -> Result<&'a CurrentTask> {
    match current {
        None => Err(Error::not_found(format!("Task/{id} does not exist"))),
        Some(c) if c.deleted => Err(Error::gone(format!("Task/{id} has been deleted"))),
        Some(c) => Ok(c),
    }
}

/// The If-Match check: a stale version is a 412 that names the current one.
fn check_version(expected: Option<Version>, current: Option<&CurrentTask>) -> Result<()> {
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

/// Refuses a change to an element that is fixed once the Task exists, or that states the
/// request and the caller is not its placer (`fhir::workflow::elements`).
fn check_rewrite(
    principal: &Principal,
    before: &Value,
    after: &Value,
    base_url: &str,
) -> Result<()> {
    let side = elements::side_of(
        principal.role == auth::Role::Admin,
        principal.fhir_user.as_deref(),
        before,
        base_url,
    );
    elements::check_rewrite(side, before, after)
}

/// The rules of a modification request's direction (`fhir::workflow::change`).
fn check_request_write(
    principal: &Principal,
    before: Option<&Value>,
    after: &Value,
    base_url: &str,
) -> Result<()> {
    change::check_request_write(
        principal.role == auth::Role::Admin,
        principal.fhir_user.as_deref(),
        before,
        after,
        base_url,
    )
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
