//! `SubscriptionTopic`: the built-in and operator-defined topics, read-only.

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use serde_json::{Value, json};

use super::{AppState, fhir_json};
use crate::auth::Principal;
use crate::error::{Error, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/SubscriptionTopic", get(search))
        .route("/SubscriptionTopic/{id}", get(read))
}

async fn read(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    let topic = state
        .hub
        .topics
        .iter()
        .find(|t| t.id == id)
        .ok_or_else(|| Error::not_found(format!("SubscriptionTopic/{id} does not exist")))?;
    Ok(fhir_json(StatusCode::OK, &topic.definition))
}

async fn search(
    State(state): State<AppState>,
    _principal: Principal,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let pairs = super::query_pairs(query.as_deref())?;
    let mut urls: Option<Vec<String>> = None;
    let mut ids: Option<Vec<String>> = None;
    for (name, value) in pairs {
        match name.as_str() {
            "url" | "derived-or-self" => {
                urls = Some(value.split(',').map(str::to_string).collect())
            }
            "_id" => ids = Some(value.split(',').map(str::to_string).collect()),
            "_format" | "_pretty" => {}
            other => {
                return Err(Error::not_supported(format!(
                    "SubscriptionTopic search supports url, derived-or-self and _id, not '{other}'"
                )));
            }
        }
    }
    let entries: Vec<Value> = state
        .hub
        .topics
        .iter()
        .filter(|t| urls.as_ref().is_none_or(|u| u.contains(&t.url)))
        .filter(|t| ids.as_ref().is_none_or(|i| i.contains(&t.id)))
        .map(|t| {
            json!({
                "fullUrl": format!("{}/SubscriptionTopic/{}", state.link_base, t.id),
                "resource": t.definition,
                "search": { "mode": "match" },
            })
        })
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "searchset",
        "total": entries.len(),
        "entry": entries,
    });
    Ok(fhir_json(StatusCode::OK, &bundle))
}
