//! `SubscriptionTopic`: the built-in and operator-defined topics, read-only.
//!
//! Topics are served in R4B's shape, the only FHIR version before R5 that has the resource
//! (`GET /fhir/metadata` claims 4.0.1, where topics are known by their canonical URLs, listed
//! in the CapabilityStatement): a definition written in R5's shape (`canFilterBy.comparator`)
//! has its comparators folded into `canFilterBy.modifier`, as R4B lists them, and R5's `name`
//! (which R4B lacks; `title` stays) left out (`served`).

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
    let topic = topic_by_id(&state, &id, "SubscriptionTopic")?;
    Ok(fhir_json(StatusCode::OK, &served(&topic.definition)))
}

/// The topic with this id, or a 404 naming it as `served_as/{id}` (`SubscriptionTopic`, or
/// `Basic` for its R4 form).
pub(super) fn topic_by_id<'a>(
    state: &'a AppState,
    id: &str,
    served_as: &str,
) -> Result<&'a crate::matcher::topic::Topic> {
    state
        .hub
        .topics
        .iter()
        .find(|t| t.id == id)
        .ok_or_else(|| Error::not_found(format!("{served_as}/{id} does not exist")))
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
                "resource": served(&t.definition),
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

/// A topic definition in R4B's shape: R5's `canFilterBy.comparator` codes folded into
/// `modifier` (R4B's `subscription-search-modifier` codes include the comparators), ahead of
/// the modifiers, and R5's `name` left out.
pub fn served(definition: &Value) -> Value {
    let mut served = definition.clone();
    if let Some(topic) = served.as_object_mut() {
        topic.remove("name");
    }
    if let Some(filters) = served.get_mut("canFilterBy").and_then(Value::as_array_mut) {
        for filter in filters.iter_mut().filter_map(Value::as_object_mut) {
            let Some(Value::Array(comparators)) = filter.remove("comparator") else {
                continue;
            };
            let modifiers = match filter.remove("modifier") {
                Some(Value::Array(modifiers)) => modifiers,
                _ => Vec::new(),
            };
            let folded: Vec<Value> = comparators.into_iter().chain(modifiers).collect();
            filter.insert("modifier".into(), Value::Array(folded));
        }
    }
    served
}

#[cfg(test)]
mod tests {
    use super::served;
    use serde_json::json;

    #[test]
    fn comparators_are_served_as_r4b_modifiers() {
        let r5 = json!({
            "resourceType": "SubscriptionTopic",
            "name": "R5Only",
            "canFilterBy": [
                { "filterParameter": "authored-on", "comparator": ["ge", "lt"], "modifier": ["missing"] },
                { "filterParameter": "due-date", "comparator": ["le"] },
                { "filterParameter": "owner", "modifier": ["not"] },
            ],
        });
        assert!(served(&r5).get("name").is_none());
        assert_eq!(
            served(&r5)["canFilterBy"],
            json!([
                { "filterParameter": "authored-on", "modifier": ["ge", "lt", "missing"] },
                { "filterParameter": "due-date", "modifier": ["le"] },
                { "filterParameter": "owner", "modifier": ["not"] },
            ])
        );
        // Served topics read back as the same topics.
        let base = "http://h/fhir";
        for topic in crate::matcher::topic::builtin_topics(base).unwrap() {
            let again = crate::matcher::topic::parse_topic(&served(&topic.definition), base)
                .unwrap_or_else(|e| panic!("{}: {e}", topic.id));
            assert_eq!(again.filters, topic.filters, "{}", topic.id);
        }
    }
}
