//! `Subscription` (R4 + Subscriptions Backport IG): create, read, update, delete, search, and
//! the `$status`, `$events` and `$get-ws-binding-token` operations, and Baton's `$resend`
//! (an admin restarts a subscription's delivery from an event number). What a subscription means
//! to the node once it is written (parsing with the hub's topics, putting it in force) is the
//! hub's (`crate::hub`).

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{AppState, BodyKind, fhir_json, parse_json, read_body};
use crate::auth::{Principal, Role};
use crate::channels::websocket::{Grant, binding_parameters, websocket_url};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::datetime::format_instant;
use crate::fhir::ids::{ChannelType, EventNumber, StoredInstant, SubscriptionId, Version};
use crate::fhir::notification::{
    ContentLevel, NotificationType, StatusSnapshot, SubscriptionStatus, add_events_delivered,
    notification_bundle, status_search_bundle,
};
use crate::hub::{Occasion, live_quota, record_for};
use crate::store::{StoredSubscription, SubscriptionQuery, SubscriptionRecord};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/Subscription", get(search).post(create))
        .route("/Subscription/$status", get(status_type).post(status_type))
        .route("/Subscription/{id}", get(read).put(update).delete(delete))
        .route("/Subscription/{id}/_history/{vid}", get(vread))
        .route(
            "/Subscription/{id}/$status",
            get(status_instance).post(status_instance),
        )
        .route("/Subscription/{id}/$events", get(events).post(events))
        .route("/Subscription/{id}/$resend", post(resend))
        .route(
            "/Subscription/$get-ws-binding-token",
            get(binding_token_type).post(binding_token_type),
        )
        .route(
            "/Subscription/{id}/$get-ws-binding-token",
            get(binding_token_instance).post(binding_token_instance),
        )
}

async fn create(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let bytes = read_body(&state, &headers, body, BodyKind::FhirJson).await?;
    let resource = parse_json(&bytes)?;
    let stored = create_subscription(&state, &principal, resource).await?;
    Ok(respond(&state, &principal, &stored, StatusCode::CREATED))
}

/// Creates a subscription for `principal` and puts it in force: the work of a POST, and of a
/// batch entry that creates one.
pub(crate) async fn create_subscription(
    state: &AppState,
    principal: &Principal,
    mut resource: Value,
) -> Result<StoredSubscription> {
    let spec = state.hub.parse_request(&resource)?;
    state.hub.check_deliverable(&spec).await?;
    if let Some(object) = resource.as_object_mut() {
        object.remove("id");
        object.remove("error");
    }
    let stored = state
        .store
        .create_subscription(record_for(
            &spec,
            resource,
            principal,
            live_quota(state.config.limits.subscriptions_per_author, principal.role),
        ))
        .await?;
    state.hub.put_in_force(&stored, Occasion::Written);
    state.websockets.signals.subscription_changed(&stored.id);
    tracing::info!(subscription.id = %stored.id, topic = %stored.topic_url, channel = %stored.channel_type, "subscription created");
    Ok(stored)
}

async fn read(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = SubscriptionId::parse(&id)?;
    let stored = visible(&state, &principal, &id).await?;
    Ok(respond(&state, &principal, &stored, StatusCode::OK))
}

/// A Subscription keeps no version history, so only its current version can be read by
/// version; it is what a create's `Location` (`…/Subscription/{id}/_history/{vid}`, the form
/// every create answers with) names.
async fn vread(
    State(state): State<AppState>,
    principal: Principal,
    Path((id, vid)): Path<(String, String)>,
) -> Result<Response> {
    let id = SubscriptionId::parse(&id)?;
    let stored = visible(&state, &principal, &id).await?;
    if vid != stored.version.to_string() {
        return Err(Error::not_found(format!(
            "Subscription/{id} is at version {}; subscriptions keep no earlier versions, and \
             '{vid}' is not the current one",
            stored.version
        )));
    }
    Ok(respond(&state, &principal, &stored, StatusCode::OK))
}

async fn update(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let id = SubscriptionId::parse(&id)?;
    visible(&state, &principal, &id).await?;
    let bytes = read_body(&state, &headers, body, BodyKind::FhirJson).await?;
    let resource = parse_json(&bytes)?;
    let if_match = super::parse_if_match(&headers)?;
    let stored = update_subscription(&state, &principal, &id, resource, if_match).await?;
    Ok(respond(&state, &principal, &stored, StatusCode::OK))
}

/// Replaces a subscription and puts the new version in force: the work of a PUT, and of a
/// batch entry that updates one. The caller has checked that it may see it (`visible`).
pub(crate) async fn update_subscription(
    state: &AppState,
    principal: &Principal,
    id: &SubscriptionId,
    mut resource: Value,
    if_match: Option<Version>,
) -> Result<StoredSubscription> {
    if resource.get("id").and_then(Value::as_str) != Some(id.as_str()) {
        return Err(Error::invalid(
            "Subscription.id",
            format!("the body's id must be '{id}', as in the URL"),
        ));
    }
    let spec = state.hub.parse_request(&resource)?;
    state.hub.check_deliverable(&spec).await?;
    if let Some(object) = resource.as_object_mut() {
        object.remove("error");
    }
    let record = record_for(&spec, resource, principal, None);
    let limit = state.config.limits.subscriptions_per_author;
    let caller = principal.clone();
    let decide = Box::new(move |current: &StoredSubscription| {
        if let Some(v) = if_match
            && v != current.version
        {
            return Err(Error::precondition_failed(format!(
                "If-Match names version {v} but the Subscription is at version {}",
                current.version
            )));
        }
        // The owner stays the original one, whoever (author or admin) updates, and so does
        // the quota that applies. An update by the author itself also refreshes the stored
        // principal (its performer types), so notifications follow the author's current rights.
        let author = if caller.is(&current.owner) {
            record.author
        } else {
            current.author.clone()
        };
        Ok(SubscriptionRecord {
            author,
            owner: current.owner.clone(),
            live_quota: live_quota(limit, current.owner.role),
            ..record
        })
    });
    let stored = state.store.replace_subscription(id, decide).await?;
    state.hub.put_in_force(&stored, Occasion::Written);
    state.websockets.signals.subscription_changed(&stored.id);
    Ok(stored)
}

async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = SubscriptionId::parse(&id)?;
    delete_subscription(&state, &principal, &id).await?;
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

/// Deletes a subscription the caller may see and withdraws it: the work of a DELETE, and of a
/// batch entry that deletes one.
pub(crate) async fn delete_subscription(
    state: &AppState,
    principal: &Principal,
    id: &SubscriptionId,
) -> Result<()> {
    visible(state, principal, id).await?;
    state.store.delete_subscription(id).await?;
    state.hub.withdraw(id, Occasion::Written);
    state.websockets.signals.subscription_changed(id);
    tracing::info!(subscription.id = %id, "subscription deleted");
    Ok(())
}

async fn search(
    State(state): State<AppState>,
    principal: Principal,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let pairs = super::query_pairs(query.as_deref())?;
    let mut filter = author_scope(&principal);
    let mut count = state.config.search.default_count;
    let mut offset = 0usize;
    for (name, value) in &pairs {
        match name.as_str() {
            "url" => filter.endpoint = Some(value.clone()),
            "status" => filter.status = Some(value.split(',').map(str::to_string).collect()),
            "_id" => filter.ids = Some(value.split(',').map(str::to_string).collect()),
            "_count" => count = parse_number(name, value)?.min(state.config.search.max_count),
            "_offset" => offset = crate::fhir::search::parse_offset(name, value)?,
            "_format" | "_pretty" => {}
            other => {
                return Err(Error::not_supported(format!(
                    "Subscription search supports url, status, _id, _count and _offset, not '{other}'"
                )));
            }
        }
    }
    let (found, total) = state
        .store
        .search_subscriptions(&filter, count, offset)
        .await?;
    let entries: Vec<Value> = found
        .iter()
        .map(|s| {
            json!({
                "fullUrl": format!("{}/Subscription/{}", state.link_base, s.id),
                "resource": render(s, is_author(&principal, s)),
                "search": { "mode": "match" },
            })
        })
        .collect();
    let mut links = vec![
        json!({"relation": "self", "url": format!("{}/Subscription?{}", state.link_base, query.unwrap_or_default())}),
    ];
    if offset + count < total as usize {
        let mut params: Vec<(String, String)> = pairs
            .into_iter()
            .filter(|(n, _)| n != "_offset" && n != "_count")
            .collect();
        params.push(("_count".into(), count.to_string()));
        params.push(("_offset".into(), (offset + count).to_string()));
        links.push(json!({"relation": "next", "url": format!("{}/Subscription?{}", state.link_base, serde_urlencoded::to_string(&params).unwrap_or_default())}));
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    });
    Ok(fhir_json(StatusCode::OK, &bundle))
}

fn parse_number(name: &str, value: &str) -> Result<usize> {
    value.parse().map_err(|_| {
        Error::bad_request(
            IssueCode::Invalid,
            format!("{name} must be a non-negative integer"),
        )
    })
}

/// Admins see every subscription; everyone else only those its whole identity owns.
fn author_scope(principal: &Principal) -> SubscriptionQuery {
    SubscriptionQuery {
        author: (principal.role != Role::Admin).then(|| principal.identity()),
        ..SubscriptionQuery::default()
    }
}

/// Whether the caller is the subscription's author: issuer, subject, role and FHIR user all
/// as stored. A token sharing only the `sub` is someone else.
pub(crate) fn is_author(principal: &Principal, stored: &StoredSubscription) -> bool {
    principal.is(&stored.owner)
}

/// The subscription as `principal` may see it: only its author (or an admin) may.
pub(crate) async fn visible(
    state: &AppState,
    principal: &Principal,
    id: &SubscriptionId,
) -> Result<StoredSubscription> {
    let stored = state
        .store
        .read_subscription(id)
        .await?
        .ok_or_else(|| Error::not_found(format!("Subscription/{id} does not exist")))?;
    if principal.role != Role::Admin && !is_author(principal, &stored) {
        return Err(Error::forbidden(format!(
            "Subscription/{id} belongs to someone else"
        )));
    }
    Ok(stored)
}

/// The Subscription as a client sees it: the authoritative status and last error, and header
/// values and the signing secret hidden from anyone but the author.
pub fn render(stored: &StoredSubscription, for_author: bool) -> Value {
    let mut resource = stored.resource.clone();
    resource["status"] = json!(stored.status.as_str());
    match &stored.last_error {
        Some(error) if stored.status != SubscriptionStatus::Active => {
            resource["error"] = json!(error)
        }
        _ => {
            resource.as_object_mut().map(|o| o.remove("error"));
        }
    }
    if !for_author {
        if let Some(headers) = resource
            .pointer_mut("/channel/header")
            .and_then(Value::as_array_mut)
        {
            for h in headers.iter_mut() {
                let name = h
                    .as_str()
                    .and_then(|t| t.split_once(':'))
                    .map(|(n, _)| n.trim().to_string());
                *h = json!(format!("{}: ****", name.unwrap_or_default()));
            }
        }
        if let Some(extensions) = resource
            .pointer_mut("/channel/extension")
            .and_then(Value::as_array_mut)
        {
            for e in extensions.iter_mut() {
                if e["url"] == crate::fhir::subscription::SIGNING_SECRET_EXTENSION {
                    e["valueString"] = json!("****");
                }
            }
        }
    }
    resource
}

/// The Subscription as `principal` may see it, with its ETag (and `Location` when created).
fn respond(
    state: &AppState,
    principal: &Principal,
    stored: &StoredSubscription,
    status: StatusCode,
) -> Response {
    let mut response = fhir_json(status, &render(stored, is_author(principal, stored)));
    set_version_headers(state, &mut response, stored, status == StatusCode::CREATED);
    response
}

fn set_version_headers(
    state: &AppState,
    response: &mut Response,
    stored: &StoredSubscription,
    location: bool,
) {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("W/\"{}\"", stored.version)) {
        headers.insert(header::ETAG, v);
    }
    if location
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{}/Subscription/{}/_history/{}",
            state.link_base, stored.id, stored.version
        ))
    {
        headers.insert(header::LOCATION, v);
    }
}

fn snapshot<'a>(stored: &'a StoredSubscription, kind: NotificationType) -> StatusSnapshot<'a> {
    StatusSnapshot {
        subscription_id: &stored.id,
        topic_url: &stored.topic_url,
        status: stored.status,
        events_since_start: stored.events_since_start,
        notification_type: kind,
        error: stored
            .last_error
            .as_deref()
            .filter(|_| stored.status != SubscriptionStatus::Active),
        last_delivered: stored.last_sent_at.as_ref().map(StoredInstant::as_str),
    }
}

fn now() -> String {
    format_instant(time::OffsetDateTime::now_utc())
}

async fn status_instance(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = SubscriptionId::parse(&id)?;
    let stored = visible(&state, &principal, &id).await?;
    // The hub's counters as read may still wait for their sync: answered once durable, as a
    // notification would be (`Store::until_durable`).
    state.store.until_durable().await;
    let mut bundle = status_search_bundle(
        &state.base_url,
        &uuid::Uuid::new_v4().to_string(),
        &now(),
        &[snapshot(&stored, NotificationType::QueryStatus)],
    );
    add_events_delivered(&mut bundle, &[stored.delivered_through]);
    Ok(fhir_json(StatusCode::OK, &bundle))
}

async fn status_type(
    State(state): State<AppState>,
    principal: Principal,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let pairs = super::query_pairs(query.as_deref())?;
    let mut filter = author_scope(&principal);
    for (name, value) in pairs {
        // Repeated and comma-separated values are ORed, as the operation defines.
        let values = value.split(',').map(str::to_string);
        match name.as_str() {
            "id" => filter.ids.get_or_insert_with(Vec::new).extend(values),
            "status" => filter.status.get_or_insert_with(Vec::new).extend(values),
            other => {
                return Err(Error::not_supported(format!(
                    "$status takes id and status, not '{other}'"
                )));
            }
        }
    }
    let max = state.config.search.max_count;
    let (found, _) = state.store.search_subscriptions(&filter, max, 0).await?;
    state.store.until_durable().await;
    let snapshots: Vec<StatusSnapshot<'_>> = found
        .iter()
        .map(|s| snapshot(s, NotificationType::QueryStatus))
        .collect();
    let mut bundle = status_search_bundle(
        &state.base_url,
        &uuid::Uuid::new_v4().to_string(),
        &now(),
        &snapshots,
    );
    let delivered: Vec<EventNumber> = found.iter().map(|s| s.delivered_through).collect();
    add_events_delivered(&mut bundle, &delivered);
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// Most events one `$events` call returns.
const EVENTS_PAGE: i64 = 100;

async fn events(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let id = SubscriptionId::parse(&id)?;
    let stored = visible(&state, &principal, &id).await?;
    let spec = state.hub.spec_for_delivery(&stored)?;
    let pairs = super::query_pairs(query.as_deref())?;
    let mut since = EventNumber::new(1);
    let mut until = stored.events_since_start;
    let mut content = spec.content;
    for (name, value) in &pairs {
        let number = || {
            value
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 1)
                .map(EventNumber::new)
                .ok_or_else(|| {
                    Error::bad_request(
                        IssueCode::Invalid,
                        format!("{name} must be a positive event number"),
                    )
                })
        };
        match name.as_str() {
            "eventsSinceNumber" => since = number()?,
            "eventsUntilNumber" => until = number()?.min(stored.events_since_start),
            "content" => {
                content = ContentLevel::parse(value).ok_or_else(|| {
                    Error::bad_request(
                        IssueCode::Value,
                        "content must be empty, id-only or full-resource",
                    )
                })?
            }
            other => {
                return Err(Error::not_supported(format!(
                    "$events takes eventsSinceNumber, eventsUntilNumber and content, not '{other}'"
                )));
            }
        }
    }
    // Saturating: `eventsSinceNumber` may be as large as an i64 holds.
    let until = until.min(since.saturating_add(EVENTS_PAGE - 1));
    let records = if since <= until {
        state.store.subscription_events(&id, since, until).await?
    } else {
        Vec::new()
    };
    let author: Option<Principal> = serde_json::from_value(stored.author.clone()).ok();
    let versions = crate::delivery::load_versions(state.store.as_ref(), &records, content).await?;
    // Event numbers as read may still wait for their sync: answered once durable.
    state.store.until_durable().await;
    let events =
        crate::delivery::readable_events(&records, &versions, author.as_ref(), &state.base_url);
    let bundle = notification_bundle(
        &state.base_url,
        &uuid::Uuid::new_v4().to_string(),
        &now(),
        &snapshot(&stored, NotificationType::QueryEvent),
        &events,
        content,
    );
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// `$resend?eventsSinceNumber=N`: an admin restarts a rest-hook or AMQP subscription's
/// delivery at event N, for a receiver that lost what it was sent. Events N onwards go out
/// again, in order, with their original numbers, then delivery goes on as before. A
/// websocket subscription has no queue to restart (its listeners catch up with `$events`),
/// and an `off` one is switched on again by writing it as `requested`, which resumes from its
/// first undelivered event. Answers with the subscription's `$status`.
async fn resend(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let id = SubscriptionId::parse(&id)?;
    if principal.role != Role::Admin {
        return Err(Error::forbidden(
            "only an admin may restart a subscription's delivery",
        ));
    }
    let stored = visible(&state, &principal, &id).await?;
    let pairs = super::query_pairs(query.as_deref())?;
    let mut since = None;
    for (name, value) in &pairs {
        match name.as_str() {
            "eventsSinceNumber" if since.is_some() => {
                return Err(Error::bad_request(
                    IssueCode::Invalid,
                    "eventsSinceNumber is given more than once",
                ));
            }
            "eventsSinceNumber" => since = Some(value),
            other => {
                return Err(Error::not_supported(format!(
                    "$resend takes eventsSinceNumber, not '{other}'"
                )));
            }
        }
    }
    let Some(since) = since else {
        return Err(Error::bad_request(
            IssueCode::Required,
            "$resend needs eventsSinceNumber, the first event number to send again",
        ));
    };
    if stored.channel_type == ChannelType::WebSocket {
        return Err(Error::not_supported(
            "a websocket subscription has no delivery queue to restart; its listeners catch up with $events",
        ));
    }
    if stored.status == SubscriptionStatus::Off {
        return Err(Error::conflict(format!(
            "Subscription/{id} is off; write it with status 'requested' to switch it on, which resumes from its first undelivered event"
        )));
    }
    let last = stored.events_since_start;
    let from = since
        .parse::<i64>()
        .ok()
        .filter(|n| (1..=last.get()).contains(n))
        .map(EventNumber::new)
        .ok_or_else(|| {
            Error::bad_request(
                IssueCode::Invalid,
                format!(
                    "eventsSinceNumber must be an event number this subscription has had, 1 to {last}; got '{since}'"
                ),
            )
        })?;
    if state
        .store
        .subscription_events(&id, from, from)
        .await?
        .is_empty()
    {
        return Err(Error::bad_request(
            IssueCode::Invalid,
            format!(
                "event {from} of Subscription/{id} is past retention (delivery.event_retention_days) and can no longer be sent"
            ),
        ));
    }
    let restarted = state
        .store
        .restart_delivery(&id, from)
        .await?
        .ok_or_else(|| {
            Error::conflict(format!(
                "Subscription/{id} was deleted or switched off meanwhile"
            ))
        })?;
    tracing::info!(subscription.id = %id, event.from = %from, "delivery restarted by an admin");
    state.hub.delivery.wake(&id);
    let mut bundle = status_search_bundle(
        &state.base_url,
        &uuid::Uuid::new_v4().to_string(),
        &now(),
        &[snapshot(&restarted, NotificationType::QueryStatus)],
    );
    add_events_delivered(&mut bundle, &[restarted.delivered_through]);
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// Issues a binding token for these (already authorised) websocket subscriptions.
async fn issue_binding_token(
    state: &AppState,
    principal: &Principal,
    ids: Vec<SubscriptionId>,
) -> Response {
    let expires_at = time::OffsetDateTime::now_utc()
        + time::Duration::seconds(state.config.websocket.token_ttl_seconds as i64);
    let token = state
        .websockets
        .signals
        .issue_token(Grant {
            owner: principal.identity(),
            subscriptions: ids.clone(),
            expires_at,
        })
        .await;
    let url = websocket_url(&state.base_url);
    fhir_json(
        StatusCode::OK,
        &binding_parameters(&token, expires_at, &ids, &url),
    )
}

/// Binding tokens are for live websocket subscriptions, and only their author gets one.
fn check_bindable(principal: &Principal, stored: &StoredSubscription) -> Result<()> {
    if stored.channel_type != ChannelType::WebSocket {
        return Err(Error::not_supported(format!(
            "Subscription/{} uses the {} channel; binding tokens are for websocket subscriptions",
            stored.id, stored.channel_type
        )));
    }
    if stored.status == SubscriptionStatus::Off {
        return Err(Error::business_rule(format!(
            "Subscription/{} is off",
            stored.id
        )));
    }
    if !is_author(principal, stored) {
        return Err(Error::forbidden(format!(
            "only the author of Subscription/{} may bind to it",
            stored.id
        )));
    }
    Ok(())
}

async fn binding_token_instance(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    let id = SubscriptionId::parse(&id)?;
    let stored = visible(&state, &principal, &id).await?;
    check_bindable(&principal, &stored)?;
    Ok(issue_binding_token(&state, &principal, vec![id]).await)
}

async fn binding_token_type(
    State(state): State<AppState>,
    principal: Principal,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let pairs = super::query_pairs(query.as_deref())?;
    let mut named = Vec::new();
    for (name, value) in pairs {
        match name.as_str() {
            "id" => named.extend(value.split(',').map(str::to_string)),
            other => {
                return Err(Error::not_supported(format!(
                    "$get-ws-binding-token takes id, not '{other}'"
                )));
            }
        }
    }
    let mut ids = Vec::with_capacity(named.len());
    if named.is_empty() {
        // Without ids: every live websocket subscription of the caller.
        let filter = SubscriptionQuery {
            author: Some(principal.identity()),
            status: Some(vec!["requested".into(), "active".into(), "error".into()]),
            ..SubscriptionQuery::default()
        };
        let (found, _) = state
            .store
            .search_subscriptions(&filter, state.config.search.max_count, 0)
            .await?;
        ids = found
            .into_iter()
            .filter(|s| s.channel_type == ChannelType::WebSocket)
            .map(|s| s.id)
            .collect();
        if ids.is_empty() {
            return Err(Error::not_found(
                "you have no live websocket subscriptions to bind",
            ));
        }
    } else {
        for id in &named {
            let id = SubscriptionId::parse(id)?;
            let stored = visible(&state, &principal, &id).await?;
            check_bindable(&principal, &stored)?;
            ids.push(id);
        }
    }
    Ok(issue_binding_token(&state, &principal, ids).await)
}
