//! The subscription's filters: the `backport-filter-criteria` strings on `_criteria`, split in
//! whichever spelling the client used, checked against what the topic allows and parsed into
//! search predicates. They are kept apart because they are the one part of a Subscription
//! written in search syntax.

use serde_json::{Map, Value};

use super::elements::{array, fail, primitive_extension_element, simple_extension};
use super::{FILTER_CRITERIA_EXTENSION, TopicFilters};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::search::{Handling, Predicate, SearchLimits, parse_query, task_param};

pub(super) fn parse_filters(
    subscription: &Map<String, Value>,
    topic: &TopicFilters,
    limits: &SearchLimits,
    base_url: &str,
) -> Result<(Vec<Predicate>, Vec<String>)> {
    let mut predicates = Vec::new();
    let mut criteria = Vec::new();
    let Some(element) = primitive_extension_element(subscription, "_criteria", "Subscription")?
    else {
        return Ok((predicates, criteria));
    };
    let path = "Subscription._criteria.extension";
    for (index, extension) in array(element, "extension", path)?.iter().enumerate() {
        let at = format!("{path}[{index}]");
        let (url, value) = simple_extension(extension, &at)?;
        if url != FILTER_CRITERIA_EXTENSION {
            return Err(fail(
                IssueCode::NotSupported,
                &at,
                format_args!(
                    "has the extension '{url}', which this hub does not support; filters go in \
                     '{FILTER_CRITERIA_EXTENSION}' (IG 1.1.0) with a valueString"
                ),
            ));
        }
        let text = match value {
            Some(("valueString", Value::String(text))) if !text.is_empty() => text,
            _ => {
                return Err(fail(
                    IssueCode::Invalid,
                    &at,
                    "must carry the filter as a non-empty valueString, e.g. 'Task?owner=Practitioner/1'",
                ));
            }
        };
        predicates.extend(parse_criterion(text, topic, limits, base_url, &at)?);
        criteria.push(text.clone());
    }
    Ok((predicates, criteria))
}

/// The predicates of `backport-filter-criteria` strings kept from a subscription that was
/// parsed before (`SubscriptionSpec::filter_criteria`), checked against the topic and read
/// exactly as `parse_subscription` reads them: what start-up makes of a stored
/// subscription's matching form without reading its resource again.
pub fn parse_filter_criteria(
    criteria: &[String],
    topic: &TopicFilters,
    limits: &SearchLimits,
    base_url: &str,
) -> Result<Vec<Predicate>> {
    let mut predicates = Vec::new();
    for (index, text) in criteria.iter().enumerate() {
        // Where a criterion sits is spelled out only for a refusal, by reading it again: start-up
        // reads a million of them, nearly all fine.
        match parse_criterion(text, topic, limits, base_url, "") {
            Ok(found) => predicates.extend(found),
            Err(_) => {
                let at = format!("Subscription._criteria.extension[{index}]");
                predicates.extend(parse_criterion(text, topic, limits, base_url, &at)?);
            }
        }
    }
    Ok(predicates)
}

/// One filter string: split, each parameter checked against the topic, parsed as a search.
fn parse_criterion(
    text: &str,
    topic: &TopicFilters,
    limits: &SearchLimits,
    base_url: &str,
    at: &str,
) -> Result<Vec<Predicate>> {
    let pairs = split_filter(text, at)?;
    for (key, _) in &pairs {
        check_filter_param(key, topic, at)?;
    }
    let query =
        parse_query(&pairs, limits, base_url, Handling::Strict).map_err(|e| locate(e, at))?;
    Ok(query.predicates)
}

/// Splits one filter string, in any of the spellings clients use (`Task?a=1&b=2`, `a=1`,
/// `Task.a=1`, each with `:modifier`), into percent-decoded `(name[:modifier], value)` pairs.
fn split_filter(text: &str, at: &str) -> Result<Vec<(String, String)>> {
    let query = match text.split_once('?') {
        Some((kind, query)) => {
            check_filter_type(kind, at)?;
            query
        }
        None => text,
    };
    let mut pairs = Vec::new();
    // An empty segment (a trailing or doubled '&') carries nothing, as in any query string.
    for segment in query.split('&').filter(|s| !s.is_empty()) {
        let Some((raw_key, raw_value)) = segment.split_once('=') else {
            return Err(fail(
                IssueCode::Invalid,
                at,
                format_args!("has the filter '{segment}', which lacks '=': write name=value"),
            ));
        };
        let raw_key = match raw_key.split_once('.') {
            Some((kind, rest)) if looks_like_type(kind) => {
                check_filter_type(kind, at)?;
                rest
            }
            _ => raw_key,
        };
        let decode = |text: &str| {
            percent_decode(text).map_err(|e| {
                fail(
                    IssueCode::Invalid,
                    at,
                    format_args!("has the filter '{segment}' with {e}"),
                )
            })
        };
        pairs.push((decode(raw_key)?, decode(raw_value)?));
    }
    if pairs.is_empty() {
        return Err(fail(
            IssueCode::Invalid,
            at,
            "has a filter without any parameter; write e.g. 'Task?owner=Practitioner/1'",
        ));
    }
    Ok(pairs)
}

fn looks_like_type(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_uppercase())
        && text.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn check_filter_type(kind: &str, at: &str) -> Result<()> {
    if kind == "Task" {
        return Ok(());
    }
    Err(fail(
        IssueCode::NotSupported,
        at,
        format_args!(
            "filters on '{kind}', but every topic of this hub is about Task; write \
             'Task?param=value', 'Task.param=value' or 'param=value'"
        ),
    ))
}

/// Checks one filter parameter against the topic, which is where the IG says filters are
/// defined: the hub could evaluate any Task search parameter, but a topic that does not list one
/// promises nothing about it.
fn check_filter_param(key: &str, topic: &TopicFilters, at: &str) -> Result<()> {
    let (name, modifier) = match key.split_once(':') {
        Some((name, modifier)) => (name, Some(modifier)),
        None => (key, None),
    };
    if name.starts_with('_') && task_param(name).is_none() {
        return Err(fail(
            IssueCode::Invalid,
            at,
            format_args!(
                "has '{key}', which shapes a search result rather than filtering it and has no \
                 meaning in a subscription filter"
            ),
        ));
    }
    let Some(modifiers) = topic.modifiers(name) else {
        return Err(fail(
            IssueCode::NotSupported,
            at,
            format_args!(
                "filters by '{name}', which the topic '{}' does not allow; it allows: {}",
                topic.url,
                topic.describe()
            ),
        ));
    };
    if let Some(modifier) = modifier
        && !modifiers.iter().any(|m| m == modifier)
    {
        let allowed = if modifiers.is_empty() {
            "none".to_string()
        } else {
            modifiers
                .iter()
                .map(|m| format!(":{m}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(fail(
            IssueCode::NotSupported,
            at,
            format_args!(
                "uses the modifier ':{modifier}' on '{name}', which the topic '{}' does not allow; \
                 modifiers allowed on '{name}': {allowed}",
                topic.url
            ),
        ));
    }
    Ok(())
}

/// Decodes `%XX` escapes. A `+` stays a plus sign (see the notes of `fhir::subscription`).
pub(super) fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .ok_or_else(|| "a '%' that is not followed by two hex digits".to_string())?;
            let high = (hex[0] as char).to_digit(16).unwrap_or(0);
            let low = (hex[1] as char).to_digit(16).unwrap_or(0);
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-escapes that are not UTF-8".to_string())
}

/// Places an error from the search parser at the filter it came from.
fn locate(error: Error, at: &str) -> Error {
    match error {
        Error::Client(mut client) => {
            client.diagnostics = format!("{at}: {}", client.diagnostics);
            client.expression = Some(at.to_string());
            Error::Client(client)
        }
        other => other,
    }
}
