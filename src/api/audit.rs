//! The audit trail over HTTP: the layer that opens each FHIR request's audit facts and
//! records what the store does not (reads, searches, Subscription changes, 401/403
//! refusals), and `GET /AuditEvent` (search and read) for admins and auditors. A
//! practitioner may search only the delivery ledger of a subscription it authored
//! (`entity=Subscription/{id}`, delivery attempts only).
//!
//! A Task write's AuditEvent is not written here: the store writes it in the write's own
//! transaction from the facts this layer opened (see `crate::audit`).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use base64::Engine as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::{Value, json};

use super::subscription::is_author;
use super::{AppState, fhir_json};
use crate::audit::{
    AuditEntity, AuditOutcome, DELIVERY_SYSTEM, RequestAudit, SUBTYPE_SYSTEM, TYPE_SYSTEM,
    TYPE_TRANSMIT,
};
use crate::auth::{Principal, Role};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::datetime::{DateKind, parse_range};
use crate::fhir::ids::{StoredInstant, SubscriptionId};
use crate::store::audit_sql::{AuditQuery, DateBound};

/// The most subscriptions whose ledgers a practitioner reads in one search (each is read to
/// check its author); as many as the console's subscriptions table shows.
const MAX_OWN_LEDGERS: usize = 100;
/// Page size of an AuditEvent search without `_count`, and the largest one served.
const DEFAULT_COUNT: usize = 50;
const MAX_COUNT: usize = 1000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/AuditEvent", get(search))
        .route("/AuditEvent/{id}", get(read))
}

/// Opens the request's audit facts for the handlers and the store, then records the
/// AuditEvent of a read, search, Subscription change or refusal once the answer is known.
pub async fn audit_request(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let settings = &state.config.audit;
    if !settings.enabled {
        return next.run(request).await;
    }
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().map(str::to_string);
    let address = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let audit = Arc::new(RequestAudit::new(
        state.hub.node.clone(),
        address.clone(),
        method == Method::PATCH,
    ));
    let response = crate::audit::in_request(Some(audit.clone()), next.run(request)).await;
    let seen = Seen {
        method: &method,
        path: &path,
        query: query.as_deref().unwrap_or(""),
        status: response.status(),
        headers: response.headers(),
    };
    if let Some(event) = classify(&seen, settings.reads) {
        if is_refusal(seen.status) && !refusal_recorded(address.as_deref()) {
            metrics::counter!("baton_audit_refusals_dropped_total").increment(1);
            return response;
        }
        let record = audit.record(
            event.subtype,
            event.outcome,
            &StoredInstant::now(),
            event.entity,
            event.description.as_deref(),
        );
        state.hub.audits.record(record);
    }
    response
}

/// How many refusals (401/403) per second one client address may have recorded, and the
/// burst: a flood of bad tokens must not become a flood of writes. What is over it is counted
/// in `baton_audit_refusals_dropped_total`, not recorded.
const REFUSALS_PER_SECOND: u32 = 10;
const REFUSAL_BURST: u32 = 50;

/// Whether this refusal may be recorded under the per-address budget (one for the process).
fn refusal_recorded(address: Option<&str>) -> bool {
    static LIMITER: OnceLock<DefaultKeyedRateLimiter<String>> = OnceLock::new();
    let limiter = LIMITER.get_or_init(|| {
        let rate = NonZeroU32::new(REFUSALS_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(REFUSAL_BURST).unwrap_or(rate);
        RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
    });
    // Addresses not seen for a while are forgotten, so a scan from many addresses cannot
    // grow the table without bound.
    if limiter.len() > 10_000 {
        limiter.retain_recent();
    }
    limiter
        .check_key(&address.unwrap_or("unknown").to_string())
        .is_ok()
}

/// What the layer saw of one request and its answer.
struct Seen<'a> {
    method: &'a Method,
    /// The path under the FHIR base, e.g. `/Task/1`.
    path: &'a str,
    query: &'a str,
    status: StatusCode,
    headers: &'a HeaderMap,
}

/// An AuditEvent the layer records.
#[derive(Debug, PartialEq)]
struct LayerEvent {
    subtype: &'static str,
    outcome: AuditOutcome,
    entity: Option<AuditEntity>,
    description: Option<String>,
}

/// Which AuditEvent a request gets from this layer, if any: every 401/403; successful reads,
/// searches and history of Tasks and Subscriptions when `reads`; successful Subscription
/// changes and operations; Task writes that failed with 409, 412 or 422. Successful Task
/// writes are audited by the store; AuditEvent reads and the CapabilityStatement are not
/// audited.
fn classify(seen: &Seen<'_>, reads: bool) -> Option<LayerEvent> {
    let segments: Vec<&str> = seen.path.split('/').filter(|s| !s.is_empty()).collect();
    let resource_type = segments.first().copied().unwrap_or("");
    if !is_refusal(seen.status) && !matches!(resource_type, "Task" | "Subscription") {
        return None;
    }
    let subtype = interaction(seen.method, &segments);
    let instance = segments
        .get(1)
        .filter(|s| !s.starts_with('_') && !s.starts_with('$'))
        .map(|id| format!("{resource_type}/{id}"));
    if is_refusal(seen.status) {
        let entity = match (&instance, subtype) {
            (Some(reference), _) => Some(AuditEntity::Resource {
                reference: reference.clone(),
                version: None,
            }),
            (None, "search-type") => Some(AuditEntity::Query {
                resource_type: resource_type.to_string(),
                query: seen.query.to_string(),
            }),
            _ => None,
        };
        return Some(LayerEvent {
            subtype,
            outcome: AuditOutcome::MinorFailure,
            entity,
            description: Some(format!(
                "refused with {} {}",
                seen.status.as_u16(),
                seen.status.canonical_reason().unwrap_or("")
            )),
        });
    }
    if resource_type == "Task"
        && is_failed_write(seen.status)
        && matches!(subtype, "create" | "update" | "patch" | "delete")
    {
        // The write changed nothing, so its record has no transaction to join; it says why
        // it failed (a conflict, a stale If-Match, a business rule).
        return Some(LayerEvent {
            subtype,
            outcome: AuditOutcome::MinorFailure,
            entity: instance.map(|reference| AuditEntity::Resource {
                reference,
                version: None,
            }),
            description: Some(format!(
                "failed with {} {}",
                seen.status.as_u16(),
                seen.status.canonical_reason().unwrap_or("")
            )),
        });
    }
    if !seen.status.is_success() {
        return None;
    }
    let is_read = matches!(
        subtype,
        "read" | "vread" | "search-type" | "history-instance" | "history-type"
    ) || (subtype == "operation" && seen.method == Method::GET);
    if is_read && !reads {
        return None;
    }
    if resource_type == "Task" && !is_read {
        // Task writes are audited by the store, in their own transaction.
        return None;
    }
    let entity = match subtype {
        "search-type" | "history-type" => Some(AuditEntity::Query {
            resource_type: resource_type.to_string(),
            query: seen.query.to_string(),
        }),
        "vread" => instance.map(|reference| AuditEntity::Resource {
            reference,
            version: segments.get(3).map(|v| v.to_string()),
        }),
        "create" => created_reference(seen.headers, resource_type)
            .map(|(reference, version)| AuditEntity::Resource { reference, version }),
        "delete" => instance.map(|reference| AuditEntity::Resource {
            reference,
            version: None,
        }),
        _ => instance.map(|reference| AuditEntity::Resource {
            reference,
            version: etag_version(seen.headers),
        }),
    };
    let description = (subtype == "operation")
        .then(|| segments.last().map(|op| op.to_string()))
        .flatten();
    Some(LayerEvent {
        subtype,
        outcome: AuditOutcome::Success,
        entity,
        description,
    })
}

/// A Task write that reached the store's rules and failed there: a conflict (409), a stale
/// `If-Match` (412) or a broken rule of the Task state machine (422).
fn is_failed_write(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::CONFLICT | StatusCode::PRECONDITION_FAILED | StatusCode::UNPROCESSABLE_ENTITY
    )
}

fn is_refusal(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

/// The FHIR interaction a method and path name (`restful-interaction` codes).
fn interaction(method: &Method, segments: &[&str]) -> &'static str {
    let operation = segments.last().is_some_and(|s| s.starts_with('$'));
    match (method.as_str(), segments.len()) {
        _ if operation => "operation",
        ("GET", 0) => "capabilities",
        ("POST", 0) => "transaction",
        ("GET", 1) => "search-type",
        ("POST", 2) if segments[1] == "_search" => "search-type",
        ("GET", 2) if segments[1] == "_history" => "history-type",
        ("GET", 2) => "read",
        ("GET", 3) => "history-instance",
        ("GET", 4) => "vread",
        ("POST", 1) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => "operation",
    }
}

/// The version in a weak ETag (`W/"3"`).
fn etag_version(headers: &HeaderMap) -> Option<String> {
    let tag = headers.get(header::ETAG)?.to_str().ok()?;
    let version = tag.trim_start_matches("W/").trim_matches('"');
    (!version.is_empty()).then(|| version.to_string())
}

/// The reference and version a `Location` header names (`…/Subscription/{id}/_history/{v}`).
fn created_reference(headers: &HeaderMap, resource_type: &str) -> Option<(String, Option<String>)> {
    let location = headers.get(header::LOCATION)?.to_str().ok()?;
    let tail = location.rsplit_once(&format!("{resource_type}/"))?.1;
    let mut parts = tail.split('/');
    let id = parts.next().filter(|id| !id.is_empty())?;
    let version = match (parts.next(), parts.next()) {
        (Some("_history"), Some(v)) => Some(v.to_string()),
        _ => etag_version(headers),
    };
    Some((format!("{resource_type}/{id}"), version))
}

/// Only admins and auditors read the audit trail as a whole (and single AuditEvents).
fn authorize(principal: &Principal) -> Result<()> {
    match principal.role {
        Role::Admin | Role::Auditor => Ok(()),
        Role::Practitioner => Err(Error::forbidden(
            "only admins and auditors may read AuditEvents",
        )),
    }
}

/// A practitioner's search must name subscriptions it authored (`entity=Subscription/{id}`,
/// one, or several in one comma-separated `entity` — the console's table asks for all its
/// rows at once), and reads only their delivery attempts (`type=transmit`): who else changed
/// them, and every other record, stay the auditors'.
async fn confine_to_own_ledger(
    state: &AppState,
    principal: &Principal,
    query: &mut AuditQuery,
) -> Result<()> {
    let refuse = || {
        Error::forbidden(
            "a practitioner may read only the delivery ledger of its own subscriptions: \
             search with entity=Subscription/{id} naming subscriptions it authored",
        )
    };
    let [references] = query.entity.as_slice() else {
        return Err(refuse());
    };
    if references.is_empty() || references.len() > MAX_OWN_LEDGERS {
        return Err(Error::forbidden(format!(
            "a practitioner may read the delivery ledgers of 1 to {MAX_OWN_LEDGERS} of its own subscriptions in one search"
        )));
    }
    for reference in references {
        let id = reference.strip_prefix("Subscription/").ok_or_else(refuse)?;
        let id = SubscriptionId::parse(id).map_err(|_| refuse())?;
        let stored = state.store.read_subscription(&id).await?;
        if !stored.is_some_and(|s| is_author(principal, &s)) {
            return Err(Error::forbidden(format!(
                "Subscription/{id} is not one of yours; a practitioner may read only the delivery ledger of its own subscriptions"
            )));
        }
    }
    query.type_code.push(vec![TYPE_TRANSMIT.to_string()]);
    Ok(())
}

async fn read(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    authorize(&principal)?;
    // What this node has queued is written first, so its own trail reads back whole.
    state.hub.audits.flush().await;
    let stored = state
        .store
        .read_audit(&id)
        .await?
        .ok_or_else(|| Error::not_found(format!("AuditEvent/{id} is not known")))?;
    let resource: Value = serde_json::from_str(&stored)
        .map_err(|e| Error::internal("a stored AuditEvent is not JSON", e.to_string()))?;
    Ok(fhir_json(StatusCode::OK, &resource))
}

async fn search(
    State(state): State<AppState>,
    principal: Principal,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| {
        Error::bad_request(IssueCode::Invalid, format!("the query is not valid: {e}"))
    })?;
    let (mut audit_query, count) = parse_query(&pairs, &state.base_url)?;
    if principal.role == Role::Practitioner {
        confine_to_own_ledger(&state, &principal, &mut audit_query).await?;
    }
    state.hub.audits.flush().await;
    audit_query.limit = count + 1;
    let mut rows = state.store.search_audit(&audit_query).await?;
    let more = rows.len() > count;
    rows.truncate(count);
    let base = &state.link_base;
    let kept: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "_cursor")
        .cloned()
        .collect();
    let self_query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
    let mut links =
        vec![json!({ "relation": "self", "url": format!("{base}/AuditEvent?{self_query}") })];
    if more && let Some(last) = rows.last() {
        let mut next = kept.clone();
        next.push(("_cursor".into(), encode_cursor(&last.recorded, last.seq)));
        let next_query = serde_urlencoded::to_string(&next).unwrap_or_default();
        links.push(json!({ "relation": "next", "url": format!("{base}/AuditEvent?{next_query}") }));
    }
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        let id = row.id();
        let resource: Value = serde_json::from_str(&row.into_resource()?)
            .map_err(|e| Error::internal("a stored AuditEvent is not JSON", e.to_string()))?;
        entries.push(json!({
            "fullUrl": format!("{base}/AuditEvent/{id}"),
            "resource": resource,
            "search": { "mode": "match" },
        }));
    }
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// The query of an AuditEvent search and its page size, every value checked.
fn parse_query(pairs: &[(String, String)], base_url: &str) -> Result<(AuditQuery, usize)> {
    let mut query = AuditQuery {
        newest_first: true,
        ..AuditQuery::default()
    };
    let mut count = DEFAULT_COUNT;
    let invalid = |name: &str, message: String| Error::invalid(name.to_string(), message);
    for (name, value) in pairs {
        let values = || -> Vec<String> { value.split(',').map(str::to_string).collect() };
        match name.as_str() {
            "date" => {
                let (prefix, text) = split_prefix(value);
                let range =
                    parse_range(text, DateKind::SearchValue).map_err(|e| invalid("date", e))?;
                let (start, end) = (range.start_key(), range.end_key());
                match prefix {
                    "eq" => {
                        query.dates.push((DateBound::AtLeast, start));
                        query.dates.push((DateBound::Before, end));
                    }
                    "ge" => query.dates.push((DateBound::AtLeast, start)),
                    "gt" => query.dates.push((DateBound::AtLeast, end)),
                    "lt" => query.dates.push((DateBound::Before, start)),
                    "le" => query.dates.push((DateBound::Before, end)),
                    other => {
                        return Err(invalid(
                            "date",
                            format!(
                                "the date prefix '{other}' is not supported; use eq, ge, gt, le or lt"
                            ),
                        ));
                    }
                }
            }
            "entity" | "agent" => {
                let references = values()
                    .into_iter()
                    .map(|v| plain_reference(&v, base_url))
                    .collect();
                if name == "entity" {
                    query.entity.push(references);
                } else {
                    query.agent.push(references);
                }
            }
            "type" => query
                .type_code
                .push(token_codes(&values(), &[TYPE_SYSTEM, DELIVERY_SYSTEM])),
            "subtype" => query
                .subtype
                .push(token_codes(&values(), &[SUBTYPE_SYSTEM, DELIVERY_SYSTEM])),
            "outcome" => {
                let codes = values();
                if let Some(bad) = codes
                    .iter()
                    .find(|c| !matches!(c.as_str(), "0" | "4" | "8" | "12"))
                {
                    return Err(invalid(
                        "outcome",
                        format!("'{bad}' is not an AuditEvent outcome; use 0, 4, 8 or 12"),
                    ));
                }
                query.outcome.push(codes);
            }
            "_sort" => {
                query.newest_first = match value.as_str() {
                    "-date" => true,
                    "date" => false,
                    other => {
                        return Err(invalid(
                            "_sort",
                            format!("AuditEvents sort by date or -date, not '{other}'"),
                        ));
                    }
                }
            }
            "_count" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| invalid("_count", format!("'{value}' is not a page size")))?;
                if n == 0 {
                    return Err(invalid("_count", "_count must be at least 1".into()));
                }
                count = n.min(MAX_COUNT);
            }
            "_cursor" => {
                query.after = Some(decode_cursor(value).ok_or_else(|| {
                    invalid(
                        "_cursor",
                        "the paging cursor is not one this server gave".into(),
                    )
                })?);
            }
            "_format" => {}
            other => {
                return Err(Error::bad_request(
                    IssueCode::NotSupported,
                    format!(
                        "AuditEvent search has no parameter '{other}'; use date, entity, agent, type, subtype, outcome, _sort or _count"
                    ),
                ));
            }
        }
    }
    Ok((query, count))
}

/// A date search value's prefix (default `eq`) and the date after it.
fn split_prefix(value: &str) -> (&str, &str) {
    let prefix = value.get(..2).unwrap_or("");
    if prefix.chars().all(|c| c.is_ascii_lowercase()) && prefix.len() == 2 {
        (prefix, &value[2..])
    } else {
        ("eq", value)
    }
}

/// A reference as the index keeps it: relative, without a version.
fn plain_reference(value: &str, base_url: &str) -> String {
    let relative = value
        .strip_prefix(base_url)
        .map(|rest| rest.trim_start_matches('/'))
        .unwrap_or(value);
    match relative.split_once("/_history/") {
        Some((reference, _)) => reference.to_string(),
        None => relative.to_string(),
    }
}

/// The codes of token values (`system|code` or `code`); a value of another system matches
/// nothing.
fn token_codes(values: &[String], systems: &[&str]) -> Vec<String> {
    values
        .iter()
        .map(|v| match v.split_once('|') {
            Some((s, code)) if s.is_empty() || systems.contains(&s) => code.to_string(),
            Some(_) => String::from("\u{1}no such code"),
            None => v.clone(),
        })
        .collect()
}

fn encode_cursor(recorded: &str, seq: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{seq},{recorded}"))
}

fn decode_cursor(text: &str) -> Option<(String, i64)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (seq, recorded) = text.split_once(',')?;
    StoredInstant::parse(recorded)?;
    Some((recorded.to_string(), seq.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen<'a>(
        method: &'a Method,
        path: &'a str,
        status: StatusCode,
        headers: &'a HeaderMap,
    ) -> Seen<'a> {
        Seen {
            method,
            path,
            query: "status=ready",
            status,
            headers,
        }
    }

    #[test]
    fn requests_are_classified_by_method_path_and_status() {
        let none = HeaderMap::new();
        let mut etag = HeaderMap::new();
        etag.insert(header::ETAG, "W/\"3\"".parse().unwrap());
        let get = Method::GET;
        let put = Method::PUT;
        let read = classify(&seen(&get, "/Task/a", StatusCode::OK, &etag), true).unwrap();
        assert_eq!(read.subtype, "read");
        assert_eq!(
            read.entity,
            Some(AuditEntity::Resource {
                reference: "Task/a".into(),
                version: Some("3".into())
            })
        );
        let search = classify(&seen(&get, "/Task", StatusCode::OK, &none), true).unwrap();
        assert_eq!(search.subtype, "search-type");
        assert!(classify(&seen(&get, "/Task", StatusCode::OK, &none), false).is_none());
        // Task writes belong to the store; a refused one is the layer's.
        assert!(classify(&seen(&put, "/Task/a", StatusCode::OK, &none), true).is_none());
        let refused =
            classify(&seen(&put, "/Task/a", StatusCode::FORBIDDEN, &none), false).unwrap();
        assert_eq!(
            (refused.subtype, refused.outcome),
            ("update", AuditOutcome::MinorFailure)
        );
        for status in [
            StatusCode::CONFLICT,
            StatusCode::PRECONDITION_FAILED,
            StatusCode::UNPROCESSABLE_ENTITY,
        ] {
            let failed = classify(&seen(&put, "/Task/a", status, &none), false).unwrap();
            assert_eq!(
                (failed.subtype, failed.outcome),
                ("update", AuditOutcome::MinorFailure)
            );
            assert_eq!(
                failed.description.unwrap(),
                format!(
                    "failed with {} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap()
                )
            );
        }
        // A failed read, or a bad request, is not a failed write.
        assert!(classify(&seen(&get, "/Task/a", StatusCode::CONFLICT, &none), true).is_none());
        assert!(classify(&seen(&put, "/Task/a", StatusCode::BAD_REQUEST, &none), true).is_none());
        let sub = classify(&seen(&put, "/Subscription/s", StatusCode::OK, &etag), false).unwrap();
        assert_eq!(sub.subtype, "update");
        assert!(classify(&seen(&get, "/AuditEvent", StatusCode::OK, &none), true).is_none());
        assert!(classify(&seen(&get, "/metadata", StatusCode::OK, &none), true).is_none());
    }

    #[test]
    fn cursors_round_trip_and_refuse_other_text() {
        let cursor = encode_cursor("2026-01-01T00:00:00.000Z", 42);
        assert_eq!(
            decode_cursor(&cursor),
            Some(("2026-01-01T00:00:00.000Z".into(), 42))
        );
        assert_eq!(decode_cursor("not a cursor"), None);
    }

    #[test]
    fn query_values_are_checked() {
        let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let (q, count) = parse_query(
            &pairs(&[
                ("date", "ge2026-01-01"),
                ("entity", "http://x/fhir/Task/1/_history/2"),
                ("_count", "5"),
            ]),
            "http://x/fhir",
        )
        .unwrap();
        assert_eq!(count, 5);
        assert_eq!(q.entity, vec![vec!["Task/1".to_string()]]);
        assert_eq!(
            q.dates,
            vec![(DateBound::AtLeast, "2026-01-01T00:00:00.000Z".to_string())]
        );
        assert!(parse_query(&pairs(&[("date", "ne2026")]), "").is_err());
        assert!(parse_query(&pairs(&[("outcome", "1")]), "").is_err());
        assert!(parse_query(&pairs(&[("bogus", "1")]), "").is_err());
        assert!(parse_query(&pairs(&[("_count", "0")]), "").is_err());
    }
}
