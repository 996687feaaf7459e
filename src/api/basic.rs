//! `Basic`: the topics again, each wrapped for R4 clients as the Subscriptions R5 Backport IG
//! shows (`fhir::basic_topic`), read-only. Baton keeps no other Basic resources, so
//! `GET /fhir/Basic?code=http://hl7.org/fhir/fhir-types|SubscriptionTopic` lists the topics
//! and `GET /fhir/Basic/{id}` reads one by the topic's id. The rules are the topics': any
//! authenticated caller may read them, whatever its role.

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use serde_json::{Value, json};

use super::{AppState, Prefer, fhir_json};
use crate::auth::Principal;
use crate::error::{Error, IssueCode, Result};
use crate::fhir::basic_topic;
use crate::matcher::topic::Topic;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/Basic", get(search))
        .route("/Basic/{id}", get(read))
}

async fn read(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    let topic = super::topic::topic_by_id(&state, &id, "Basic")?;
    Ok(fhir_json(
        StatusCode::OK,
        &basic_topic::wrap(&topic.definition),
    ))
}

/// The search parameters a Basic search applies: `code`, `_id` and `url` (the topic's
/// canonical URL, as the backport IG's R4 topic search allows), each a comma-separated list
/// (any of them), repeated parameters all holding. Paging and format parameters change
/// nothing (every topic fits in one page); anything else is left out of the `self` link, or,
/// with `Prefer: handling=strict`, refused.
#[derive(Debug, Default, PartialEq, Eq)]
struct BasicQuery {
    /// Each repetition of a parameter, as (name, its values).
    criteria: Vec<(&'static str, Vec<String>)>,
    /// What the `self` link shows: the parameters applied.
    applied: Vec<(String, String)>,
}

fn parse_query(pairs: Vec<(String, String)>, strict: bool) -> Result<BasicQuery> {
    let mut query = BasicQuery::default();
    for (key, value) in pairs {
        let (name, modifier) = match key.split_once(':') {
            Some((name, modifier)) => (name, Some(modifier)),
            None => (key.as_str(), None),
        };
        let param = match name {
            "code" => "code",
            "_id" => "_id",
            "url" => "url",
            "_count" | "_total" | "_format" | "_pretty" => continue,
            other if strict => {
                return Err(Error::not_supported(format!(
                    "Basic search supports code, _id and url, not '{other}'"
                )));
            }
            // Lenient by default, as Task searches are.
            _ => continue,
        };
        if modifier.is_some() {
            // A modifier changes what a parameter means; ignoring it would answer another
            // question than the one asked.
            return Err(Error::not_supported(format!(
                "the parameter '{key}' is not supported: '{param}' takes no modifier on Basic"
            )));
        }
        if value.is_empty() {
            return Err(Error::bad_request(
                IssueCode::Invalid,
                format!("the parameter '{param}' needs a value"),
            ));
        }
        query
            .criteria
            .push((param, value.split(',').map(str::to_string).collect()));
        query.applied.push((key, value));
    }
    Ok(query)
}

impl BasicQuery {
    fn matches(&self, topic: &Topic) -> bool {
        self.criteria.iter().all(|(param, values)| {
            values.iter().any(|value| match *param {
                "code" => basic_topic::code_matches(value),
                "_id" => *value == topic.id,
                _ => *value == topic.url,
            })
        })
    }
}

async fn search(
    State(state): State<AppState>,
    _principal: Principal,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let pairs = super::query_pairs(query.as_deref())?;
    let query = parse_query(pairs, Prefer::from_headers(&headers).strict)?;
    let entries: Vec<Value> = state
        .hub
        .topics
        .iter()
        .filter(|t| query.matches(t))
        .map(|t| {
            json!({
                "fullUrl": format!("{}/Basic/{}", state.link_base, t.id),
                "resource": basic_topic::wrap(&t.definition),
                "search": { "mode": "match" },
            })
        })
        .collect();
    let self_url = match serde_urlencoded::to_string(&query.applied).unwrap_or_default() {
        params if params.is_empty() => format!("{}/Basic", state.link_base),
        params => format!("{}/Basic?{params}", state.link_base),
    };
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "searchset",
        "total": entries.len(),
        "link": [{ "relation": "self", "url": self_url }],
    });
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(fhir_json(StatusCode::OK, &bundle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::basic_topic::EXTENSION_PREFIX;

    fn pairs(text: &str) -> Vec<(String, String)> {
        serde_urlencoded::from_str(text).unwrap()
    }

    #[test]
    fn queries_apply_code_id_and_url_and_leave_the_rest_out() {
        let topics = crate::matcher::topic::builtin_topics("http://h/fhir").unwrap();
        let ids = |text: &str| -> Vec<String> {
            let query = parse_query(pairs(text), false).unwrap();
            topics
                .iter()
                .filter(|t| query.matches(t))
                .map(|t| t.id.clone())
                .collect()
        };
        assert_eq!(ids("").len(), topics.len());
        assert_eq!(ids("code=SubscriptionTopic").len(), topics.len());
        assert!(ids("code=http://hl7.org/fhir/fhir-types|Task").is_empty());
        assert_eq!(
            ids("code=SubscriptionTopic&_id=task-changed,task-overdue"),
            ["task-changed", "task-overdue"]
        );
        assert_eq!(
            ids("url=http://h/fhir/SubscriptionTopic/task-owner-changed"),
            ["task-owner-changed"]
        );
        assert!(ids("_id=task-changed&_id=task-overdue").is_empty());
        let lenient = parse_query(pairs("code=SubscriptionTopic&colour=red&_count=5"), false);
        assert_eq!(
            lenient.unwrap().applied,
            [("code".to_string(), "SubscriptionTopic".to_string())]
        );
        assert!(parse_query(pairs("colour=red"), true).is_err());
        assert!(parse_query(pairs("code:not=SubscriptionTopic"), false).is_err());
        assert!(parse_query(pairs("code="), false).is_err());
    }

    #[test]
    fn every_element_of_the_builtin_topics_is_carried() {
        for topic in crate::matcher::topic::builtin_topics("http://h/fhir").unwrap() {
            let basic = basic_topic::wrap(&topic.definition);
            let definition = topic.definition.as_object().unwrap();
            let urls: Vec<&str> = basic["extension"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["url"].as_str().unwrap())
                .collect();
            for key in definition.keys() {
                if ["resourceType", "id", "status"].contains(&key.as_str()) {
                    continue;
                }
                assert!(
                    urls.contains(&format!("{EXTENSION_PREFIX}{key}").as_str()),
                    "{}: {key} is not carried",
                    topic.id
                );
            }
            // One extension per filter, each with exactly one value or nested extensions.
            let filters = urls.iter().filter(|u| u.ends_with(".canFilterBy")).count();
            assert_eq!(filters, topic.filters.len(), "{}", topic.id);
            let mut stack: Vec<&Value> = basic["extension"].as_array().unwrap().iter().collect();
            while let Some(extension) = stack.pop() {
                let object = extension.as_object().unwrap();
                let values = object.keys().filter(|k| k.starts_with("value")).count();
                let nested = object.get("extension").and_then(Value::as_array);
                assert_eq!(
                    values + usize::from(nested.is_some()),
                    1,
                    "{}: {extension}",
                    topic.id
                );
                stack.extend(nested.into_iter().flatten());
            }
            assert_eq!(basic["id"], topic.definition["id"]);
            assert_eq!(basic["modifierExtension"][0]["valueCode"], "active");
        }
    }
}
