//! `POST /fhir`: batch and transaction Bundles of Task interactions.
//!
//! Each entry is turned into the same store request as the single interaction it stands for
//! (`write::create_request`, `update_request`, `delete_request` and the conditional ones), so
//! it obeys the same validation, roles, state machine and link checks. A batch runs its
//! entries one by one and answers each; a transaction prepares every entry first, then hands
//! all its writes to `Store::transaction`, which commits them and their change events
//! together or not at all.
//!
//! Choices the specification leaves open:
//! - A transaction's writes are applied in entry order, so their change events, and so every
//!   subscription's notifications, follow entry order. The specification's processing order
//!   (DELETE, POST, PUT, GET) gives the same result because no two entries may touch the same
//!   Task (400) and every conditional criterion is evaluated before any entry is written.
//! - A transaction may not hold GET entries (400): a read inside an atomic write would see
//!   the state before it, which the processing order says it must not. A batch may read.
//! - New Tasks get their ids before any reference is resolved, so `urn:uuid:` references
//!   between the entries created by one transaction are rewritten to `Task/{id}` in any
//!   direction, cycles included (two Tasks each `partOf` the other are stored as sent). A
//!   `urn:uuid:` that names no entry is a 400 naming the entry that holds it. A request Task's
//!   focal Task must exist before the transaction (see `links::check_links`).
//! - Conditional references (`"reference": "Task?identifier=http://x|123"`, relative or under
//!   this server's base) in a transaction's resources are resolved before anything is written,
//!   each distinct one by one search with the caller's read rule, as FHIR's transaction rules
//!   say: one match becomes `Task/{id}`; none is a 400 and several a 412 (as for a conditional
//!   create), naming the entry and the element, and nothing is stored. They resolve against the
//!   Tasks as they were before the transaction (a Task it creates is named by its `urn:uuid:`
//!   instead), and only Tasks: Baton stores no other resource type to search, so a conditional
//!   reference to another type is a 400. A batch entry's are resolved in the same way, for
//!   that entry alone.
//! - A PATCH entry (`Task/{id}` only) carries its patch as the entry's resource, as HAPI FHIR
//!   takes it: a FHIRPath Patch `Parameters`, or a `Binary` whose `contentType` is
//!   `application/json-patch+json` (or `application/merge-patch+json`) and whose `data` is the
//!   patch's base64. It goes through `write::patch_request`, as `PATCH /fhir/Task/{id}` does:
//!   `ifMatch`, the role and element rules, the state machine and `limits.max_patch_operations`.
//! - A batch may also create, read, update and delete Subscriptions (through the same
//!   functions as `api::subscription`); a transaction holds Task entries only (400), since a
//!   subscription write puts it in force on the hub, which no database rollback could undo.
//!   Any other resource type is a 400 naming the entry.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

use super::read::readable_current;
use super::search::{parse_pairs, run_search};
use super::write::{
    Created, conditional_delete_request, conditional_update_request, create_request, criteria,
    delete_request, find_matches, patch_request, race_lost, read_patch, record_write,
    update_request,
};
use crate::api::{
    AppState, BodyKind, Prefer, fhir_json_bytes, parse_if_match_text, parse_json, read_body,
    subscription,
};
use crate::auth::{Permission, Principal, Resource};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::ids::{StoredInstant, SubscriptionId, TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::fhir::json::write_json;
use crate::fhir::patch::TaskPatch;
use crate::store::{CurrentTask, StoredSubscription, StoredVersion, WriteOutcome, WriteRequest};

/// The kind of Bundle posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Batch,
    Transaction,
}

impl Kind {
    fn response_type(self) -> &'static str {
        match self {
            Kind::Batch => "batch-response",
            Kind::Transaction => "transaction-response",
        }
    }
}

/// What an entry's `request.url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// `Task`: the type (a create).
    Type,
    /// `Task/{id}`.
    Instance(TaskId),
    /// `Task?criteria`: a conditional update or delete, or a search.
    Conditional(String),
    /// `Subscription`: a create (batch only).
    Subscriptions,
    /// `Subscription/{id}` (batch only).
    Subscription(SubscriptionId),
}

impl Target {
    /// The resource type an entry's resource must have.
    fn resource_type(&self) -> &'static str {
        match self {
            Target::Subscriptions | Target::Subscription(_) => "Subscription",
            Target::Type | Target::Instance(_) | Target::Conditional(_) => "Task",
        }
    }
}

/// An entry's interaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

/// Checks an entry's interaction against the token's SMART scopes, as the extractor does for
/// a request of its own.
fn require_entry_scope(principal: &Principal, entry: &Entry) -> Result<()> {
    let resource = match entry.target {
        Target::Subscriptions | Target::Subscription(_) => Resource::Subscription,
        _ => Resource::Task,
    };
    let permission = match (entry.method, &entry.target) {
        (Method::Get, Target::Instance(_) | Target::Subscription(_)) => Permission::Read,
        (Method::Get, _) => Permission::Search,
        (Method::Post, _) => Permission::Create,
        (Method::Put | Method::Patch, _) => Permission::Update,
        (Method::Delete, _) => Permission::Delete,
    };
    principal
        .require_scope(resource, permission)
        .map_err(|e| e.in_entry(entry.index))
}

/// One entry of the Bundle, parsed.
#[derive(Debug)]
struct Entry {
    index: usize,
    full_url: Option<String>,
    method: Method,
    target: Target,
    resource: Option<Value>,
    if_match: Option<Version>,
    if_none_exist: Option<String>,
}

/// What an entry came to: its `response` (and `resource`) in the answering Bundle.
enum Answer {
    /// A version was written, or found by a conditional create.
    Version {
        status: StatusCode,
        id: TaskId,
        version: Version,
        last_updated: StoredInstant,
        resource: Option<Content>,
    },
    /// A delete (the version is None when there was nothing to delete).
    Deleted(Option<Version>),
    /// A search's Bundle.
    Searchset(Value),
    /// A Subscription created, read or updated (batch only).
    Subscription {
        status: StatusCode,
        id: SubscriptionId,
        version: Version,
        resource: Value,
    },
    /// The entry failed (batch only).
    Failed(Error),
}

pub(super) async fn process(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let prefer = Prefer::from_headers(&headers);
    let bytes = read_body(&state, &headers, body, BodyKind::FhirJson).await?;
    let bundle = parse_json(&bytes)?;
    let (kind, raw_entries) = bundle_parts(bundle, state.config.limits.max_transaction_entries)?;
    let answers = match kind {
        Kind::Batch => run_batch(&state, &principal, raw_entries).await,
        Kind::Transaction => run_transaction(&state, &principal, raw_entries).await?,
    };
    Ok(fhir_json_bytes(
        StatusCode::OK,
        response_bundle(&state, kind, answers, prefer),
    ))
}

/// The Bundle's type and entries, taken out of it, or a 400 for anything that is not a batch
/// or transaction Bundle, and a 413 past `max_entries`.
fn bundle_parts(mut bundle: Value, max_entries: usize) -> Result<(Kind, Vec<Value>)> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(Error::invalid(
            "Bundle.resourceType",
            "POST to the FHIR base takes a Bundle of type batch or transaction",
        ));
    }
    let kind = match bundle.get("type").and_then(Value::as_str) {
        Some("batch") => Kind::Batch,
        Some("transaction") => Kind::Transaction,
        other => {
            return Err(Error::invalid(
                "Bundle.type",
                format!(
                    "Bundle.type must be 'batch' or 'transaction' to be processed; it is {}",
                    other.map_or_else(|| "missing".into(), |t| format!("'{t}'"))
                ),
            ));
        }
    };
    let entries = match bundle.get_mut("entry").map(Value::take) {
        None => Vec::new(),
        Some(Value::Array(entries)) => entries,
        Some(_) => {
            return Err(Error::invalid(
                "Bundle.entry",
                "Bundle.entry must be an array",
            ));
        }
    };
    if entries.len() > max_entries {
        return Err(Error::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            IssueCode::TooCostly,
            format!(
                "the Bundle has {} entries; at most {max_entries} (limits.max_transaction_entries) \
                 are processed in one request; split it",
                entries.len()
            ),
        )
        .at("Bundle.entry"));
    }
    Ok((kind, entries))
}

/// Parses one entry, taking its resource out of it; every error names it.
fn parse_entry(index: usize, raw: Value, bases: &[&str]) -> Result<Entry> {
    parse_entry_inner(index, raw, bases).map_err(|e| e.in_entry(index))
}

fn parse_entry_inner(index: usize, mut raw: Value, bases: &[&str]) -> Result<Entry> {
    let resource = raw
        .as_object_mut()
        .and_then(|entry| entry.remove("resource"));
    let Some(entry) = raw.as_object() else {
        return Err(Error::bad_request(
            IssueCode::Structure,
            "an entry must be an object",
        ));
    };
    let Some(request) = entry.get("request").and_then(Value::as_object) else {
        return Err(Error::bad_request(
            IssueCode::Required,
            "the entry has no request (method and url)",
        )
        .at("request"));
    };
    let method = match request.get("method").and_then(Value::as_str) {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("PATCH") => Method::Patch,
        Some("DELETE") => Method::Delete,
        Some(other) => {
            return Err(Error::not_supported(format!(
                "request.method '{other}' is not supported in a Bundle; use GET, POST, PUT, \
                 PATCH or DELETE"
            ))
            .at("request.method"));
        }
        None => {
            return Err(
                Error::bad_request(IssueCode::Required, "request.method is required")
                    .at("request.method"),
            );
        }
    };
    let Some(url) = request.get("url").and_then(Value::as_str) else {
        return Err(
            Error::bad_request(IssueCode::Required, "request.url is required").at("request.url"),
        );
    };
    let target = parse_url(url, bases)?;
    match (method, &target) {
        (Method::Post, Target::Type | Target::Subscriptions)
        | (
            Method::Put | Method::Delete,
            Target::Instance(_) | Target::Conditional(_) | Target::Subscription(_),
        )
        | (Method::Patch, Target::Instance(_))
        | (Method::Get, Target::Type | Target::Instance(_) | Target::Conditional(_))
        | (Method::Get, Target::Subscription(_)) => {}
        _ => {
            return Err(Error::bad_request(
                IssueCode::NotSupported,
                format!("request.url '{url}' does not fit request.method {method:?}"),
            )
            .at("request.url"));
        }
    }
    let needs_resource = matches!(method, Method::Post | Method::Put | Method::Patch);
    match (&resource, needs_resource) {
        (None, true) if method == Method::Patch => {
            return Err(Error::bad_request(
                IssueCode::Required,
                "a PATCH entry carries its patch in entry.resource: a FHIRPath Patch \
                 (Parameters) or a JSON Patch in a Binary (contentType \
                 application/json-patch+json, data its base64)",
            )
            .at("resource"));
        }
        (None, true) => {
            return Err(Error::bad_request(
                IssueCode::Required,
                "a POST or PUT entry must carry the Task in entry.resource",
            )
            .at("resource"));
        }
        (Some(_), false) => {
            return Err(Error::bad_request(
                IssueCode::Invalid,
                "a GET or DELETE entry carries no resource",
            )
            .at("resource"));
        }
        _ => {}
    }
    if let Some(resource) = &resource
        && method == Method::Patch
    {
        let kind = resource.get("resourceType").and_then(Value::as_str);
        if !matches!(kind, Some("Parameters" | "Binary")) {
            return Err(Error::invalid(
                "resource.resourceType",
                format!(
                    "a PATCH entry's resource is the patch: a Parameters resource (FHIRPath \
                     Patch) or a Binary holding a JSON Patch, not {}",
                    kind.map_or_else(|| "a resource without a type".into(), |k| format!("a {k}"))
                ),
            ));
        }
    } else if let Some(resource) = &resource
        && resource.get("resourceType").and_then(Value::as_str) != Some(target.resource_type())
    {
        return Err(Error::invalid(
            "resource.resourceType",
            format!(
                "request.url '{url}' takes a {} in entry.resource",
                target.resource_type()
            ),
        ));
    }
    let text = |key: &str| -> Result<Option<String>> {
        match request.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Error::invalid(
                format!("request.{key}"),
                format!("request.{key} must be a string"),
            )),
        }
    };
    let if_match = match text("ifMatch")? {
        None => None,
        Some(etag) => parse_if_match_text(&etag)?,
    };
    let if_none_exist = text("ifNoneExist")?;
    if if_none_exist.is_some() && method != Method::Post {
        return Err(Error::invalid(
            "request.ifNoneExist",
            "ifNoneExist belongs to a POST (a conditional create)",
        ));
    }
    let full_url = match entry.get("fullUrl") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(Error::invalid("fullUrl", "fullUrl must be a string")),
    };
    Ok(Entry {
        index,
        full_url,
        method,
        target,
        resource,
        if_match,
        if_none_exist,
    })
}

/// `Task`, `Task/{id}` or `Task?criteria`, relative or on one of this server's bases (the
/// path the Bundle came in on, and `public_url`).
fn parse_url(url: &str, bases: &[&str]) -> Result<Target> {
    let relative = bases
        .iter()
        .find_map(|base| url.strip_prefix(base))
        .unwrap_or(url)
        .trim_start_matches('/');
    let (path, query) = match relative.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (relative, None),
    };
    let mut parts = path.split('/');
    let resource_type = parts.next().unwrap_or("");
    if resource_type == "Subscription" && query.is_none() {
        return match (parts.next(), parts.next()) {
            (None, _) => Ok(Target::Subscriptions),
            (Some(id), None) => Ok(Target::Subscription(SubscriptionId::parse(id)?)),
            _ => Err(Error::not_supported(format!(
                "request.url '{url}' is not Subscription or Subscription/{{id}}"
            ))
            .at("request.url")),
        };
    }
    if resource_type != "Task" {
        return Err(Error::not_supported(format!(
            "request.url '{url}' names a {}; only Task and Subscription entries are supported in \
             a Bundle",
            if resource_type.is_empty() {
                "no resource type".to_owned()
            } else {
                format!("'{resource_type}'")
            }
        ))
        .at("request.url"));
    }
    match (parts.next(), parts.next(), query) {
        (None, _, None) => Ok(Target::Type),
        (None, _, Some(query)) => Ok(Target::Conditional(query.to_owned())),
        (Some(id), None, None) => Ok(Target::Instance(TaskId::parse(id)?)),
        _ => Err(Error::not_supported(format!(
            "request.url '{url}' is not Task, Task/{{id}} or Task?criteria"
        ))
        .at("request.url")),
    }
}

// ---------------------------------------------------------------------------------------------
// Batch

/// Runs each entry on its own: one entry's failure is reported in its place and changes
/// nothing else.
async fn run_batch(state: &AppState, principal: &Principal, raw: Vec<Value>) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        let answer = match batch_entry(state, principal, index, raw).await {
            Ok(answer) => answer,
            Err(e) => Answer::Failed(e),
        };
        answers.push(answer);
    }
    answers
}

async fn batch_entry(
    state: &AppState,
    principal: &Principal,
    index: usize,
    raw: Value,
) -> Result<Answer> {
    let mut entry = parse_entry(index, raw, &[&state.link_base, &state.base_url])?;
    require_entry_scope(principal, &entry)?;
    // Conditional references are resolved for the entry alone, as in a transaction.
    let resolved =
        resolve_conditional_references(state, principal, std::slice::from_ref(&entry)).await?;
    if let Some(resource) = &mut entry.resource {
        // A batch's entries are independent: a reference to another entry cannot be resolved.
        rewrite_references(resource, &HashMap::new(), &resolved)?;
    }
    if matches!(
        entry.target,
        Target::Subscriptions | Target::Subscription(_)
    ) {
        return subscription_entry(state, principal, entry).await;
    }
    if entry.method == Method::Get {
        return read_entry(state, principal, &entry).await;
    }
    match prepare_write(state, principal, entry, &Created::new()).await? {
        Prepared::Answered(answer) => Ok(answer),
        Prepared::Write {
            request,
            conditional,
        } => {
            let conditional_create = matches!(
                request,
                WriteRequest::Create {
                    if_none_exist: Some(_),
                    ..
                }
            );
            let _admitted = match conditional_create {
                true => Some(state.searches.enter().await?),
                false => None,
            };
            let outcome = state.store.write(request).await?;
            answer_of(outcome, conditional)
        }
    }
}

/// A Subscription entry of a batch, through the same functions as the Subscription API.
async fn subscription_entry(
    state: &AppState,
    principal: &Principal,
    entry: Entry,
) -> Result<Answer> {
    let answer = |status: StatusCode, stored: StoredSubscription| Answer::Subscription {
        status,
        resource: subscription::render(&stored, subscription::is_author(principal, &stored)),
        id: stored.id,
        version: stored.version,
    };
    let resource = entry.resource.unwrap_or(Value::Null);
    match (entry.method, entry.target) {
        (Method::Post, _) => {
            let stored = subscription::create_subscription(state, principal, resource).await?;
            Ok(answer(StatusCode::CREATED, stored))
        }
        (Method::Get, Target::Subscription(id)) => {
            let stored = subscription::visible(state, principal, &id).await?;
            Ok(answer(StatusCode::OK, stored))
        }
        (Method::Put, Target::Subscription(id)) => {
            subscription::visible(state, principal, &id).await?;
            let stored =
                subscription::update_subscription(state, principal, &id, resource, entry.if_match)
                    .await?;
            Ok(answer(StatusCode::OK, stored))
        }
        (Method::Delete, Target::Subscription(id)) => {
            subscription::delete_subscription(state, principal, &id).await?;
            Ok(Answer::Deleted(None))
        }
        _ => Err(Error::not_supported(
            "this combination of request.method and request.url is not supported",
        )),
    }
}

/// A GET entry of a batch: a read (with the read rule) or a search.
async fn read_entry(state: &AppState, principal: &Principal, entry: &Entry) -> Result<Answer> {
    match &entry.target {
        Target::Instance(id) => {
            let current = readable_current(state, principal, id).await?;
            if current.deleted {
                return Err(Error::gone(format!("Task/{id} has been deleted")));
            }
            Ok(existing(StatusCode::OK, current))
        }
        Target::Subscriptions | Target::Subscription(_) => Err(Error::not_supported(
            "read Subscriptions with GET Subscription/{id}",
        )),
        Target::Type | Target::Conditional(_) => {
            let query = match &entry.target {
                Target::Conditional(query) => query.as_str(),
                _ => "",
            };
            let pairs = parse_pairs(query)?;
            let response = run_search(state, principal, &HeaderMap::new(), pairs).await?;
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .map_err(|e| Error::internal("reading a search Bundle back", e))?;
            let bundle: Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::internal("reading a search Bundle back", e))?;
            Ok(Answer::Searchset(bundle))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transaction

/// Prepares every entry, then commits all their writes in one store transaction. Any failure
/// fails the whole, with the error of the first failing entry, and nothing is stored.
async fn run_transaction(
    state: &AppState,
    principal: &Principal,
    raw: Vec<Value>,
) -> Result<Vec<Answer>> {
    let mut entries = Vec::with_capacity(raw.len());
    for (index, raw) in raw.into_iter().enumerate() {
        let entry = parse_entry(index, raw, &[&state.link_base, &state.base_url])?;
        require_entry_scope(principal, &entry)?;
        if entry.method == Method::Get {
            return Err(Error::not_supported(
                "a transaction may not read (GET); send reads in a batch, or after the transaction",
            )
            .in_entry(index));
        }
        if entry.target.resource_type() != "Task" {
            return Err(Error::not_supported(
                "a transaction holds Task entries only; create, update or delete Subscriptions \
                 in a batch",
            )
            .in_entry(index));
        }
        entries.push(entry);
    }
    let resolved = resolve_conditional_references(state, principal, &entries).await?;
    // Ids first: every Task the transaction creates gets its id now, or the id of the Task its
    // ifNoneExist finds, so that references between entries can be resolved in any direction.
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut created = Created::new();
    let mut assigned: Vec<Option<Assigned>> = Vec::with_capacity(entries.len());
    for entry in &entries {
        let assignment = assign_id(state, principal, entry)
            .await
            .map_err(|e| e.in_entry(entry.index))?;
        let id = match (&assignment, &entry.target) {
            (Some(Assigned::New(id)), _) => {
                created.insert(id.clone());
                Some(id.clone())
            }
            (Some(Assigned::Found(task)), _) => Some(task.id.clone()),
            (None, Target::Instance(id)) => Some(id.clone()),
            (None, _) => None,
        };
        if let Some(full_url) = &entry.full_url {
            if ids.contains_key(full_url) {
                return Err(Error::invalid(
                    "fullUrl",
                    format!("fullUrl '{full_url}' is given to more than one entry"),
                )
                .in_entry(entry.index));
            }
            if let Some(id) = id {
                ids.insert(full_url.clone(), format!("Task/{id}"));
            }
        }
        assigned.push(assignment);
    }
    // Then each entry as the single interaction would prepare it, its references resolved.
    let mut answers: Vec<Option<Answer>> = Vec::with_capacity(entries.len());
    let mut writes = Vec::with_capacity(entries.len());
    let mut touched: HashSet<TaskId> = HashSet::new();
    for (mut entry, assignment) in entries.into_iter().zip(assigned) {
        let index = entry.index;
        let fail = |e: Error| e.in_entry(index);
        if let Some(resource) = &mut entry.resource {
            rewrite_references(resource, &ids, &resolved).map_err(fail)?;
        }
        let (answer, request) = match assignment {
            Some(Assigned::Found(task)) => (Some(existing(StatusCode::OK, task)), None),
            Some(Assigned::New(id)) => {
                let resource = entry.resource.take().unwrap_or(Value::Null);
                let request = create_request(
                    state,
                    principal,
                    resource,
                    entry.if_none_exist.as_deref(),
                    Some(id),
                    &created,
                )
                .await
                .map_err(fail)?;
                (None, Some((request, false)))
            }
            None => match prepare_write(state, principal, entry, &created)
                .await
                .map_err(fail)?
            {
                Prepared::Answered(answer) => (Some(answer), None),
                Prepared::Write {
                    request,
                    conditional,
                } => (None, Some((request, conditional))),
            },
        };
        // The Task each entry stands for: no two entries may touch the same one, the Task an
        // ifNoneExist found included.
        let target = match (&request, &answer) {
            (Some((WriteRequest::Create { id, .. }, _)), _) => id.clone(),
            (Some((WriteRequest::Change { id, .. }, _)), _) => Some(id.clone()),
            (None, Some(Answer::Version { id, .. })) => Some(id.clone()),
            (None, _) => None,
        };
        if let Some(id) = target
            && !touched.insert(id.clone())
        {
            return Err(Error::bad_request(
                IssueCode::Duplicate,
                format!(
                    "Task/{id} is the target of more than one entry; a transaction may touch \
                     each Task once"
                ),
            )
            .in_entry(index));
        }
        if let Some((request, conditional)) = request {
            writes.push((index, request, conditional));
        }
        answers.push(answer);
    }
    let conditional: Vec<(usize, bool)> = writes.iter().map(|(i, _, c)| (*i, *c)).collect();
    let outcomes = if writes.is_empty() {
        Vec::new()
    } else {
        state
            .store
            .transaction(writes.into_iter().map(|(i, r, _)| (i, r)).collect())
            .await?
    };
    for ((index, conditional), outcome) in conditional.into_iter().zip(outcomes) {
        let answer = answer_of(outcome, conditional).map_err(|e| e.in_entry(index))?;
        if let Some(slot) = answers.get_mut(index) {
            *slot = Some(answer);
        }
    }
    answers
        .into_iter()
        .enumerate()
        .map(|(index, answer)| {
            answer.ok_or_else(|| {
                Error::internal(
                    "a transaction entry got no answer",
                    format!("entry {index}"),
                )
            })
        })
        .collect()
}

/// A Task version as an answer carries it: the text its write stored, when the write gives
/// that back (`StoredVersion::text`: every create and update; it is the resource's JSON as
/// `serde_json` writes it, so it goes into the answering Bundle as it is), or the resource.
#[derive(Debug, Clone, PartialEq)]
enum Content {
    Text(String),
    Value(Value),
}

impl Content {
    fn into_value(self) -> Value {
        match self {
            Content::Value(value) => value,
            Content::Text(text) => serde_json::from_str(&text).unwrap_or(Value::Null),
        }
    }
}

/// The id a POST entry of a transaction stands for.
enum Assigned {
    /// A new Task's id, chosen now.
    New(TaskId),
    /// The Task its ifNoneExist found: nothing is written for it.
    Found(CurrentTask),
}

/// Chooses the id of a POST entry: a new one, or the Task its ifNoneExist matches (several
/// are a 412). Other entries get none here.
async fn assign_id(
    state: &AppState,
    principal: &Principal,
    entry: &Entry,
) -> Result<Option<Assigned>> {
    if entry.method != Method::Post {
        return Ok(None);
    }
    let Some(text) = &entry.if_none_exist else {
        return Ok(Some(Assigned::New(TaskId::generate())));
    };
    let predicates = criteria(state, principal, text, "request.ifNoneExist")?;
    let mut found = find_matches(state, &predicates).await?;
    match (found.pop(), found.pop()) {
        (None, _) => Ok(Some(Assigned::New(TaskId::generate()))),
        (Some(task), None) => Ok(Some(Assigned::Found(task))),
        (Some(_), Some(_)) => Err(Error::precondition_failed(
            "ifNoneExist matches more than one Task; make the criteria more selective",
        )
        .at("request.ifNoneExist")),
    }
}

// ---------------------------------------------------------------------------------------------
// Shared by both

/// A write entry as the store takes it, or its answer when there is nothing to write (a
/// conditional delete that matches nothing).
enum Prepared {
    Answered(Answer),
    /// `conditional`: a conditional update that creates, whose store answer `Existing` means
    /// a matching Task was written meanwhile (409).
    Write {
        request: WriteRequest,
        conditional: bool,
    },
}

async fn prepare_write(
    state: &AppState,
    principal: &Principal,
    entry: Entry,
    created: &Created,
) -> Result<Prepared> {
    let principal = principal.clone();
    let resource = entry.resource.unwrap_or(Value::Null);
    let write = |request: WriteRequest| Prepared::Write {
        request,
        conditional: false,
    };
    Ok(match (entry.method, entry.target) {
        (Method::Post, _) => write(
            create_request(
                state,
                &principal,
                resource,
                entry.if_none_exist.as_deref(),
                None,
                created,
            )
            .await?,
        ),
        (Method::Put, Target::Instance(id)) => {
            write(update_request(state, principal, id, resource, entry.if_match, created).await?)
        }
        (Method::Put, Target::Conditional(query)) => {
            let request = conditional_update_request(
                state,
                principal,
                &query,
                resource,
                entry.if_match,
                created,
            )
            .await?;
            let conditional = matches!(request, WriteRequest::Create { .. });
            Prepared::Write {
                request,
                conditional,
            }
        }
        (Method::Patch, Target::Instance(id)) => {
            let (patch, touches_links) = entry_patch(state, resource)?;
            write(
                patch_request(
                    state,
                    principal,
                    id,
                    patch,
                    touches_links,
                    entry.if_match,
                    created,
                )
                .await?,
            )
        }
        (Method::Delete, Target::Instance(id)) => {
            write(delete_request(state, principal, id, entry.if_match))
        }
        (Method::Delete, Target::Conditional(query)) => {
            match conditional_delete_request(state, principal, &query, entry.if_match).await? {
                Some(request) => write(request),
                None => Prepared::Answered(Answer::Deleted(None)),
            }
        }
        _ => {
            return Err(Error::not_supported(
                "this combination of request.method and request.url is not supported",
            ));
        }
    })
}

/// The patch a PATCH entry carries, as HAPI FHIR and the FHIR R4 http page take it: a
/// `Parameters` resource is a FHIRPath Patch; a `Binary` holds a JSON Patch
/// (`contentType` `application/json-patch+json`) or a JSON Merge Patch
/// (`application/merge-patch+json`) as the base64 of its JSON in `data`. Every refusal names
/// the element at fault (the caller adds the entry). References to other entries
/// (`urn:uuid:`) are resolved in a Parameters patch, like those in a resource; a Binary's
/// bytes are taken as they are.
fn entry_patch(state: &AppState, resource: Value) -> Result<(TaskPatch, bool)> {
    if resource.get("resourceType").and_then(Value::as_str) == Some("Parameters") {
        return read_patch(resource, Some("application/fhir+json"), state);
    }
    let content_type = resource.get("contentType").and_then(Value::as_str);
    let media_type = match content_type.map(|t| t.split(';').next().unwrap_or("").trim()) {
        Some(media_type @ ("application/json-patch+json" | "application/merge-patch+json")) => {
            media_type
        }
        other => {
            return Err(Error::client(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                IssueCode::NotSupported,
                format!(
                    "a Binary in a PATCH entry holds a JSON Patch (contentType \
                     application/json-patch+json) or a JSON Merge Patch \
                     (application/merge-patch+json), not {}",
                    other.map_or_else(
                        || "a Binary without a contentType".into(),
                        |t| format!("'{t}'")
                    )
                ),
            )
            .at("resource.contentType"));
        }
    };
    let Some(data) = resource.get("data").and_then(Value::as_str) else {
        return Err(Error::bad_request(
            IssueCode::Required,
            "the Binary in a PATCH entry carries its patch as base64 in Binary.data",
        )
        .at("resource.data"));
    };
    let bytes = STANDARD.decode(data.trim()).map_err(|e| {
        Error::bad_request(
            IssueCode::Invalid,
            format!("Binary.data is not base64: {e}"),
        )
        .at("resource.data")
    })?;
    let document: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Error::bad_request(
            IssueCode::Invalid,
            format!("Binary.data does not hold JSON: {e}"),
        )
        .at("resource.data")
    })?;
    read_patch(document, Some(media_type), state)
}

/// The answer an entry gets from its write's outcome.
fn answer_of(outcome: WriteOutcome, conditional: bool) -> Result<Answer> {
    Ok(match outcome {
        WriteOutcome::Written(version) => {
            record_write(version.interaction);
            written(version)
        }
        WriteOutcome::Existing(_) if conditional => return Err(race_lost()),
        WriteOutcome::Existing(task) => existing(StatusCode::OK, task),
        WriteOutcome::Unchanged => Answer::Deleted(None),
    })
}

fn written(version: StoredVersion) -> Answer {
    match version.interaction {
        Interaction::Delete => Answer::Deleted(Some(version.version)),
        interaction => Answer::Version {
            status: if interaction == Interaction::Create {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            id: version.id,
            version: version.version,
            last_updated: version.last_updated,
            resource: match (version.text, version.resource) {
                (Some(text), _) => Some(Content::Text(text)),
                (None, resource) => resource.map(Content::Value),
            },
        },
    }
}

fn existing(status: StatusCode, task: CurrentTask) -> Answer {
    Answer::Version {
        status,
        id: task.id,
        version: task.version,
        last_updated: task.last_updated,
        resource: Some(Content::Value(task.resource)),
    }
}

/// The conditional references of a transaction's entries, each resolved to `Task/{id}`: the
/// one Task its search finds now (see the module's notes). Each distinct reference is searched
/// once; a transaction may resolve at most as many as it may hold entries.
async fn resolve_conditional_references(
    state: &AppState,
    principal: &Principal,
    entries: &[Entry],
) -> Result<HashMap<String, String>> {
    let mut resolved: HashMap<String, String> = HashMap::new();
    for entry in entries {
        let Some(resource) = &entry.resource else {
            continue;
        };
        for (place, reference) in conditional_references(resource) {
            if resolved.contains_key(&reference) {
                continue;
            }
            if resolved.len() == state.config.limits.max_transaction_entries {
                return Err(Error::client(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    IssueCode::TooCostly,
                    format!(
                        "a transaction may resolve at most {} distinct conditional references \
                         (limits.max_transaction_entries)",
                        state.config.limits.max_transaction_entries
                    ),
                )
                .in_entry(entry.index));
            }
            let task = resolve_conditional_reference(state, principal, &reference)
                .await
                .map_err(|e| e.at(format!("resource.{place}")).in_entry(entry.index))?;
            resolved.insert(reference, task);
        }
    }
    Ok(resolved)
}

/// Whether a `reference` holds a search (`Type?…`) rather than naming a resource.
fn is_conditional_reference(reference: &str) -> bool {
    reference.contains('?') && !reference.starts_with("urn:") && !reference.starts_with('#')
}

/// Whether a resource holds any conditional reference: the walk of `conditional_references`
/// without the names of the places it passes, which cost an allocation per element of every
/// entry when (as nearly always) there is none.
fn has_conditional_reference(resource: &Value) -> bool {
    let mut stack = vec![resource];
    while let Some(value) = stack.pop() {
        match value {
            Value::Object(object) => {
                if let Some(Value::String(reference)) = object.get("reference")
                    && is_conditional_reference(reference)
                {
                    return true;
                }
                stack.extend(object.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    false
}

/// The conditional references in a resource (a `reference` holding a search: `Type?…`), with
/// where each is (`partOf[0].reference`).
fn conditional_references(resource: &Value) -> Vec<(String, String)> {
    if !has_conditional_reference(resource) {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut stack: Vec<(String, &Value)> = vec![(String::new(), resource)];
    while let Some((place, value)) = stack.pop() {
        let join = |name: &str| match place.as_str() {
            "" => name.to_string(),
            _ => format!("{place}.{name}"),
        };
        match value {
            Value::Object(object) => {
                if let Some(Value::String(reference)) = object.get("reference")
                    && is_conditional_reference(reference)
                {
                    found.push((join("reference"), reference.clone()));
                }
                stack.extend(object.iter().map(|(name, value)| (join(name), value)));
            }
            Value::Array(items) => stack.extend(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (format!("{place}[{i}]"), item)),
            ),
            _ => {}
        }
    }
    // In the order of their places, so that which one a refusal names does not depend on
    // the walk.
    found.sort();
    found
}

/// Resolves one conditional reference to `Task/{id}`: 400 for another resource type or for
/// no match, 412 for several.
async fn resolve_conditional_reference(
    state: &AppState,
    principal: &Principal,
    reference: &str,
) -> Result<String> {
    let relative = [&*state.link_base, state.base_url.as_str()]
        .iter()
        .find_map(|base| {
            reference
                .strip_prefix(base.trim_end_matches('/'))
                .and_then(|rest| rest.strip_prefix('/'))
        })
        .unwrap_or(reference);
    let (resource_type, query) = relative.split_once('?').unwrap_or((relative, ""));
    if resource_type != "Task" {
        return Err(Error::bad_request(
            IssueCode::NotSupported,
            format!(
                "the conditional reference '{reference}' searches {resource_type}; this server \
                 resolves conditional references to Tasks only (Task?identifier=system|value)"
            ),
        ));
    }
    let predicates = criteria(state, principal, query, "conditional reference")?;
    let mut found = find_matches(state, &predicates).await?;
    match (found.pop(), found.pop()) {
        (Some(task), None) => Ok(format!("Task/{}", task.id)),
        (None, _) => Err(Error::bad_request(
            IssueCode::NotFound,
            format!(
                "the conditional reference '{reference}' matches no Task you may read; a \
                 conditional reference must match exactly one"
            ),
        )),
        (Some(_), Some(_)) => Err(Error::precondition_failed(format!(
            "the conditional reference '{reference}' matches more than one Task; make the \
             criteria more selective"
        ))),
    }
}

/// Rewrites every `reference` in a resource that is the `fullUrl` of an entry (`urn:uuid:…`)
/// to the Task it stands for, and every conditional reference to the Task it was resolved to;
/// a `urn:uuid:` reference that names no entry is a 400.
fn rewrite_references(
    resource: &mut Value,
    ids: &HashMap<String, String>,
    resolved: &HashMap<String, String>,
) -> Result<()> {
    // An explicit stack: the resource's depth was bounded when it was parsed, but recursion
    // is not needed to walk it.
    let mut stack = vec![resource];
    while let Some(value) = stack.pop() {
        match value {
            Value::Object(object) => {
                if let Some(Value::String(reference)) = object.get_mut("reference")
                    && let Some(task) = resolved.get(reference.as_str())
                {
                    *reference = task.clone();
                } else if let Some(Value::String(reference)) = object.get_mut("reference")
                    && reference.starts_with("urn:uuid:")
                {
                    match ids.get(reference.as_str()) {
                        Some(task) => *reference = task.clone(),
                        None => {
                            return Err(Error::bad_request(
                                IssueCode::NotFound,
                                format!(
                                    "the reference '{reference}' names no entry of this Bundle; \
                                     a urn:uuid reference must be the fullUrl of a POST or PUT \
                                     entry of the same transaction"
                                ),
                            ));
                        }
                    }
                }
                stack.extend(object.values_mut());
            }
            Value::Array(items) => stack.extend(items.iter_mut()),
            _ => {}
        }
    }
    Ok(())
}

/// The answering Bundle, written as text: an entry that stands for a Task version (every
/// entry of a transaction of creates) straight to JSON (`write_version_entry`), any other
/// through `entry_json`. Building each entry as a `Value` first cost an allocation per key
/// and per string of every entry.
fn response_bundle(state: &AppState, kind: Kind, answers: Vec<Answer>, prefer: Prefer) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 * answers.len() + 64);
    out.extend_from_slice(br#"{"resourceType":"Bundle","type":"#);
    write_json(&mut out, &kind.response_type());
    out.extend_from_slice(br#","entry":["#);
    for (n, answer) in answers.into_iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        match answer {
            Answer::Version {
                status,
                id,
                version,
                last_updated,
                resource,
            } if !prefer.outcome => {
                let resource = resource.filter(|_| !prefer.minimal);
                write_version_entry(
                    &mut out,
                    &state.link_base,
                    status,
                    &id,
                    version,
                    &last_updated,
                    resource.as_ref(),
                );
            }
            answer => write_json(&mut out, &entry_json(&state.link_base, answer, prefer)),
        }
    }
    out.extend_from_slice(b"]}");
    out
}

/// What `entry_json` makes of a Task version without `Prefer: return=OperationOutcome`, key
/// for key (`tests::version_entries_are_written_as_entry_json_builds_them`).
fn write_version_entry(
    out: &mut Vec<u8>,
    link_base: &str,
    status: StatusCode,
    id: &TaskId,
    version: Version,
    last_updated: &StoredInstant,
    resource: Option<&Content>,
) {
    // The texts are written in pieces rather than each made with `format!` first: a
    // `TaskId` is a FHIR id and a `Version` a number, neither of which JSON escapes, so only
    // the link base goes through `write_json` (its closing quote taken off to go on).
    out.extend_from_slice(br#"{"fullUrl":"#);
    write_json(out, &link_base);
    out.pop();
    out.extend_from_slice(b"/Task/");
    out.extend_from_slice(id.as_str().as_bytes());
    out.push(b'"');
    match resource {
        Some(Content::Text(text)) => {
            out.extend_from_slice(br#","resource":"#);
            out.extend_from_slice(text.as_bytes());
        }
        Some(Content::Value(resource)) => {
            out.extend_from_slice(br#","resource":"#);
            write_json(out, resource);
        }
        None => {}
    }
    out.extend_from_slice(br#","response":{"status":"#);
    write_json(out, &status_line(status));
    out.extend_from_slice(br#","location":"Task/"#);
    out.extend_from_slice(id.as_str().as_bytes());
    let _ = write!(out, r#"/_history/{version}","etag":"W/\"{version}\"""#);
    out.extend_from_slice(br#","lastModified":"#);
    write_json(out, last_updated);
    out.extend_from_slice(b"}}");
}

/// An entry of the answering Bundle: `response` (status, location, etag, lastModified,
/// outcome) and `resource` as `Prefer: return=` asks.
fn entry_json(link_base: &str, answer: Answer, prefer: Prefer) -> Value {
    let mut response = Map::new();
    let mut entry = Map::new();
    match answer {
        Answer::Version {
            status,
            id,
            version,
            last_updated,
            resource,
        } => {
            response.insert("status".into(), json!(status_line(status)));
            response.insert(
                "location".into(),
                json!(format!("Task/{id}/_history/{version}")),
            );
            response.insert("etag".into(), json!(format!("W/\"{version}\"")));
            response.insert("lastModified".into(), json!(last_updated));
            entry.insert("fullUrl".into(), json!(format!("{link_base}/Task/{id}")));
            if prefer.outcome {
                response.insert(
                    "outcome".into(),
                    crate::error::operation_outcome(
                        "information",
                        IssueCode::Informational,
                        &format!("Task/{id} is at version {version}"),
                        None,
                    ),
                );
            } else if !prefer.minimal
                && let Some(resource) = resource
            {
                entry.insert("resource".into(), resource.into_value());
            }
        }
        Answer::Deleted(version) => {
            response.insert("status".into(), json!(status_line(StatusCode::NO_CONTENT)));
            if let Some(version) = version {
                response.insert("etag".into(), json!(format!("W/\"{version}\"")));
            }
        }
        Answer::Subscription {
            status,
            id,
            version,
            resource,
        } => {
            response.insert("status".into(), json!(status_line(status)));
            response.insert("location".into(), json!(format!("Subscription/{id}")));
            response.insert("etag".into(), json!(format!("W/\"{version}\"")));
            entry.insert(
                "fullUrl".into(),
                json!(format!("{link_base}/Subscription/{id}")),
            );
            if !prefer.minimal {
                entry.insert("resource".into(), resource);
            }
        }
        Answer::Searchset(bundle) => {
            response.insert("status".into(), json!(status_line(StatusCode::OK)));
            entry.insert("resource".into(), bundle);
        }
        Answer::Failed(error) => {
            let (status, outcome) = error.outcome();
            response.insert("status".into(), json!(status_line(status)));
            response.insert("outcome".into(), outcome);
        }
    }
    entry.insert("response".into(), Value::Object(response));
    Value::Object(entry)
}

/// `201 Created`, as `Bundle.entry.response.status` carries it.
fn status_line(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "http://localhost/fhir";

    #[test]
    fn urls_name_the_type_an_instance_or_criteria() {
        let id = TaskId::parse("a1").unwrap();
        let cases = [
            ("Task", Some(Target::Type)),
            ("/Task", Some(Target::Type)),
            ("Task/a1", Some(Target::Instance(id.clone()))),
            ("http://localhost/fhir/Task/a1", Some(Target::Instance(id))),
            (
                "Task?identifier=x|1",
                Some(Target::Conditional("identifier=x|1".into())),
            ),
            ("Patient/1", None),
            ("Task/a1/_history/2", None),
            ("", None),
            ("Task/a1?x=1", None),
        ];
        for (url, expected) in cases {
            assert_eq!(parse_url(url, &[BASE]).ok(), expected, "{url}");
        }
    }

    #[test]
    fn references_to_entries_are_rewritten_and_unknown_ones_refused() {
        let ids = HashMap::from([("urn:uuid:1".to_owned(), "Task/t1".to_owned())]);
        let mut task = json!({
            "partOf": [{ "reference": "urn:uuid:1" }],
            "focus": { "reference": "Patient/7" },
            "input": [{ "valueReference": { "reference": "urn:uuid:1" } }],
        });
        let resolved = HashMap::from([(
            "Task?identifier=http://x|1".to_owned(),
            "Task/t9".to_owned(),
        )]);
        task["basedOn"] = json!([{ "reference": "Task?identifier=http://x|1" }]);
        rewrite_references(&mut task, &ids, &resolved).unwrap();
        assert_eq!(task["basedOn"][0]["reference"], "Task/t9");
        assert_eq!(task["partOf"][0]["reference"], "Task/t1");
        assert_eq!(task["input"][0]["valueReference"]["reference"], "Task/t1");
        assert_eq!(task["focus"]["reference"], "Patient/7");

        let mut unknown = json!({ "partOf": [{ "reference": "urn:uuid:2" }] });
        let error = rewrite_references(&mut unknown, &ids, &HashMap::new()).unwrap_err();
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn conditional_references_are_found_with_their_place() {
        let task = json!({
            "partOf": [
                { "reference": "urn:uuid:1" },
                { "reference": "Task?identifier=http://x|1" },
            ],
            "focus": { "reference": "Patient?identifier=p" },
            "input": [{ "valueReference": { "reference": "Task/t2" } }],
            "contained": [{ "resourceType": "Basic", "id": "c" }],
            "owner": { "reference": "#c" },
        });
        assert_eq!(
            conditional_references(&task),
            [
                (
                    "focus.reference".to_owned(),
                    "Patient?identifier=p".to_owned()
                ),
                (
                    "partOf[1].reference".to_owned(),
                    "Task?identifier=http://x|1".to_owned()
                ),
            ]
        );
    }

    /// An entry written as text is the entry `entry_json` builds, whatever `Prefer: return`
    /// leaves of it, and the whole answer is one JSON document; a version the write answered
    /// with its stored text is answered byte for byte as one it answered with the resource.
    #[test]
    fn version_entries_are_written_as_entry_json_builds_them() {
        let answer = |status, resource: Option<Content>| Answer::Version {
            status,
            id: TaskId::parse("t1").unwrap(),
            version: Version::new(3),
            last_updated: StoredInstant::parse("2026-12-07T10:00:00.000001Z").unwrap(),
            resource,
        };
        let task = json!({ "resourceType": "Task", "id": "t1", "description": "\"quoted\" é" });
        let text = serde_json::to_string(&task).unwrap();
        let base = "http://localhost/fhir \"x\"";
        for (status, resource) in [
            (StatusCode::CREATED, Some(Content::Value(task.clone()))),
            (StatusCode::CREATED, Some(Content::Text(text.clone()))),
            (StatusCode::OK, Some(Content::Value(task.clone()))),
            (StatusCode::OK, Some(Content::Text(text))),
            (StatusCode::OK, None),
        ] {
            for minimal in [false, true] {
                let prefer = Prefer {
                    minimal,
                    ..Prefer::default()
                };
                let written = |resource: Option<Content>| {
                    let Answer::Version {
                        status,
                        id,
                        version,
                        last_updated,
                        resource: shown,
                    } = answer(status, resource)
                    else {
                        unreachable!()
                    };
                    let mut out = Vec::new();
                    let shown = shown.filter(|_| !prefer.minimal);
                    write_version_entry(
                        &mut out,
                        base,
                        status,
                        &id,
                        version,
                        &last_updated,
                        shown.as_ref(),
                    );
                    String::from_utf8(out).unwrap()
                };
                let expected =
                    serde_json::to_vec(&entry_json(base, answer(status, resource.clone()), prefer))
                        .unwrap();
                let out = written(resource.clone());
                assert_eq!(out, String::from_utf8(expected).unwrap());
                let as_value = written(resource.clone().map(|r| Content::Value(r.into_value())));
                assert_eq!(
                    out, as_value,
                    "the stored text or the resource: the same bytes"
                );
            }
        }
    }

    #[test]
    fn entry_status_lines_carry_the_reason() {
        assert_eq!(status_line(StatusCode::CREATED), "201 Created");
        assert_eq!(status_line(StatusCode::NO_CONTENT), "204 No Content");
    }
}
