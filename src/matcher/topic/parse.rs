//! Parsing: an R5 or R4B SubscriptionTopic into a `Topic`, refusing every element Baton could
//! not evaluate exactly. It is kept apart because it runs once, at start-up, while the rest of
//! the module runs for every change.

use serde_json::{Map, Value};

use super::{FilterDef, QueryCriteria, Topic, Trigger};
use crate::fhir::interaction::Interaction;
use crate::fhir::is_valid_id;
use crate::fhir::search::{
    Handling, ParamType, Predicate, SearchLimits, TASK_PARAMS, parse_query, task_param,
};
use crate::matcher::fhirpath;

const TASK_TYPE_URL: &str = "http://hl7.org/fhir/StructureDefinition/Task";

/// The top-level elements of an R5 or R4B SubscriptionTopic Baton accepts. `eventTrigger`,
/// `modifierExtension` and `implicitRules` are left out on purpose: each would change what the
/// topic means in a way Baton cannot honour.
const TOPIC_KEYS: &[&str] = &[
    "eventTrigger",
    "resourceType",
    "id",
    "meta",
    "language",
    "text",
    "contained",
    "extension",
    "url",
    "identifier",
    "version",
    "versionAlgorithmString",
    "versionAlgorithmCoding",
    "name",
    "title",
    "derivedFrom",
    "status",
    "experimental",
    "date",
    "publisher",
    "contact",
    "description",
    "useContext",
    "jurisdiction",
    "purpose",
    "copyright",
    "copyrightLabel",
    "approvalDate",
    "lastReviewDate",
    "effectivePeriod",
    "resourceTrigger",
    "canFilterBy",
    "notificationShape",
];
const TRIGGER_KEYS: &[&str] = &[
    "id",
    "extension",
    "description",
    "resource",
    "supportedInteraction",
    "queryCriteria",
    "fhirPathCriteria",
];
const QUERY_KEYS: &[&str] = &[
    "id",
    "extension",
    "previous",
    "resultForCreate",
    "current",
    "resultForDelete",
    "requireBoth",
];
const FILTER_KEYS: &[&str] = &[
    "id",
    "extension",
    "description",
    "resource",
    "filterParameter",
    "filterDefinition",
    "comparator",
    "modifier",
];
const SHAPE_KEYS: &[&str] = &["id", "extension", "resource", "include", "revInclude"];

const TOPIC_STATUSES: &[&str] = &["draft", "active", "retired", "unknown"];

/// The date comparators Baton's search understands as value prefixes.
pub(super) const COMPARATORS: &[&str] = &["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"];

/// Parses and checks a SubscriptionTopic. The canonical URL is the definition's own `url`, or
/// `{base_url}/SubscriptionTopic/{id}` when it has none, so that the built-in topics follow the
/// server's public address.
pub fn parse_topic(definition: &Value, base_url: &str) -> Result<Topic, String> {
    let object = definition
        .as_object()
        .ok_or("a SubscriptionTopic must be a JSON object")?;
    let id = match object.get("id") {
        Some(Value::String(id)) if is_valid_id(id) => id.clone(),
        Some(other) => {
            return Err(format!(
                "SubscriptionTopic id {other} is not a valid FHIR id (1-64 of A-Z, a-z, 0-9, '-', '.')"
            ));
        }
        None => return Err("the SubscriptionTopic has no id".into()),
    };
    parse_checked(object, id.clone(), base_url)
        .map_err(|e| format!("SubscriptionTopic '{id}': {e}"))
}

fn parse_checked(object: &Map<String, Value>, id: String, base_url: &str) -> Result<Topic, String> {
    match object.get("resourceType") {
        Some(Value::String(t)) if t == "SubscriptionTopic" => {}
        Some(other) => {
            return Err(format!(
                "the resourceType must be SubscriptionTopic, not {other}"
            ));
        }
        None => return Err("the resourceType SubscriptionTopic is missing".into()),
    }
    if object.contains_key("trigger") {
        return Err(
            "'trigger' is the R6 draft form, which Baton does not read; \
                    use the R5/R4B 'resourceTrigger' and top-level 'canFilterBy'"
                .into(),
        );
    }
    let on_overdue = parse_event_triggers(object)?;
    check_keys(object, TOPIC_KEYS, "the topic")?;

    let url = match optional_string(object, "url", "url")? {
        Some(url) if url.trim().is_empty() => return Err("'url' is empty".into()),
        Some(url) => url.to_string(),
        None => format!("{}/SubscriptionTopic/{id}", base_url.trim_end_matches('/')),
    };
    let status = optional_string(object, "status", "status")?
        .ok_or("'status' is missing; it must be one of draft, active, retired, unknown")?;
    if !TOPIC_STATUSES.contains(&status) {
        return Err(format!(
            "'status' is '{status}'; it must be one of draft, active, retired, unknown"
        ));
    }
    let title = match optional_string(object, "title", "title")? {
        Some(title) => title.to_string(),
        None => optional_string(object, "name", "name")?
            .unwrap_or(&id)
            .to_string(),
    };
    optional_string(object, "description", "description")?;

    let triggers = array(object, "resourceTrigger", "resourceTrigger")?;
    if triggers.is_empty() && !on_overdue {
        return Err("the topic has no resourceTrigger, so it could never fire".into());
    }
    let triggers = triggers
        .iter()
        .enumerate()
        .map(|(i, trigger)| parse_trigger(trigger, &format!("resourceTrigger[{i}]"), base_url))
        .collect::<Result<Vec<_>, _>>()?;

    let mut filters: Vec<FilterDef> = Vec::new();
    for (i, filter) in array(object, "canFilterBy", "canFilterBy")?
        .iter()
        .enumerate()
    {
        let parsed = parse_filter(filter, &format!("canFilterBy[{i}]"))?;
        // R5 examples list one entry per comparator for the same parameter, so entries for one
        // parameter are merged rather than refused.
        match filters.iter_mut().find(|f| f.param == parsed.param) {
            Some(existing) => {
                for modifier in parsed.modifiers {
                    if !existing.modifiers.contains(&modifier) {
                        existing.modifiers.push(modifier);
                    }
                }
            }
            None => filters.push(parsed),
        }
    }

    for (i, shape) in array(object, "notificationShape", "notificationShape")?
        .iter()
        .enumerate()
    {
        let place = format!("notificationShape[{i}]");
        let shape = as_object(shape, &place)?;
        check_keys(shape, SHAPE_KEYS, &place)?;
        let resource = optional_string(shape, "resource", &format!("{place}.resource"))?
            .ok_or_else(|| format!("{place} has no resource"))?;
        if !is_task(resource) {
            return Err(format!(
                "{place}.resource is '{resource}'; Baton's notifications are about Tasks only"
            ));
        }
        // Includes are served as written and otherwise ignored, which the specification allows
        // for servers without include support; clients must work without them.
        array(shape, "include", &format!("{place}.include"))?;
        array(shape, "revInclude", &format!("{place}.revInclude"))?;
    }

    let mut definition = Map::with_capacity(object.len() + 1);
    for (key, value) in object {
        if key == "url" {
            continue;
        }
        definition.insert(key.clone(), value.clone());
        // The url reads best right after the id, where FHIR's own examples put it.
        if key == "id" {
            definition.insert("url".into(), Value::String(url.clone()));
        }
    }
    Ok(Topic {
        id,
        url,
        title,
        status: status.to_string(),
        triggers,
        on_overdue,
        filters,
        definition: Value::Object(definition),
    })
}

fn parse_trigger(value: &Value, place: &str, base_url: &str) -> Result<Trigger, String> {
    let trigger = as_object(value, place)?;
    check_keys(trigger, TRIGGER_KEYS, place)?;
    let resource = optional_string(trigger, "resource", &format!("{place}.resource"))?
        .ok_or_else(|| format!("{place} has no resource; it must be Task"))?;
    if !is_task(resource) {
        return Err(format!(
            "{place}.resource is '{resource}'; Baton holds only Tasks, so it must be Task"
        ));
    }

    let mut interactions = Vec::new();
    for (i, code) in array(
        trigger,
        "supportedInteraction",
        &format!("{place}.supportedInteraction"),
    )?
    .iter()
    .enumerate()
    {
        let code_place = format!("{place}.supportedInteraction[{i}]");
        let interaction = code.as_str().and_then(Interaction::parse).ok_or_else(|| {
            format!("{code_place} is {code}; it must be create, update or delete")
        })?;
        if !interactions.contains(&interaction) {
            interactions.push(interaction);
        }
    }

    let query = match trigger.get("queryCriteria") {
        Some(criteria) => Some(parse_query_criteria(
            criteria,
            &format!("{place}.queryCriteria"),
            base_url,
        )?),
        None => None,
    };
    let fhirpath_place = format!("{place}.fhirPathCriteria");
    let fhirpath =
        match optional_string(trigger, "fhirPathCriteria", &fhirpath_place)? {
            Some(text) => Some(fhirpath::parse(text).map_err(|e| {
                format!("{fhirpath_place} '{text}' cannot be evaluated by Baton: {e}")
            })?),
            None => None,
        };
    Ok(Trigger {
        interactions,
        query,
        fhirpath,
    })
}

fn parse_query_criteria(
    value: &Value,
    place: &str,
    base_url: &str,
) -> Result<QueryCriteria, String> {
    let criteria = as_object(value, place)?;
    check_keys(criteria, QUERY_KEYS, place)?;
    let test = |key: &str| -> Result<Option<Vec<Predicate>>, String> {
        let key_place = format!("{place}.{key}");
        optional_string(criteria, key, &key_place)?
            .map(|text| parse_search(text, base_url).map_err(|e| format!("{key_place}: {e}")))
            .transpose()
    };
    let previous = test("previous")?;
    let current = test("current")?;
    if previous.is_none() && current.is_none() {
        return Err(format!(
            "{place} has neither 'previous' nor 'current', so it tests nothing"
        ));
    }
    // The specification leaves an absent resultForCreate/resultForDelete to the server. Baton
    // reads absence as test-fails, the answer a search gives when there is no resource to
    // search: nothing matches. It is also what CANDLE, the reference implementation, does, so
    // topics written against it behave the same here. Authors who want a create to count write
    // `test-passes`.
    let result = |key: &str| -> Result<bool, String> {
        match optional_string(criteria, key, &format!("{place}.{key}"))? {
            None | Some("test-fails") => Ok(false),
            Some("test-passes") => Ok(true),
            Some(other) => Err(format!(
                "{place}.{key} is '{other}'; it must be test-passes or test-fails"
            )),
        }
    };
    let require_both = match criteria.get("requireBoth") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(format!(
                "{place}.requireBoth is {other}; it must be true or false"
            ));
        }
    };
    Ok(QueryCriteria {
        previous,
        current,
        result_for_create: result("resultForCreate")?,
        result_for_delete: result("resultForDelete")?,
        require_both,
    })
}

/// Parses a query criterion such as `status:not=completed&owner=Practitioner/1` into ANDed
/// predicates with the same parser as Task searches, so a criterion means exactly what the
/// same search would. The specification does not require criteria to be URL-encoded, so both
/// forms are read; a `+` stays a `+` because in unencoded text it is far more likely a time
/// zone offset than a form-encoded space.
fn parse_search(text: &str, base_url: &str) -> Result<Vec<Predicate>, String> {
    let mut pairs = Vec::new();
    for term in text.split('&').filter(|term| !term.is_empty()) {
        let (key, value) = term
            .split_once('=')
            .ok_or_else(|| format!("'{term}' is not of the form parameter=value"))?;
        let key = percent_decode(key)?;
        let value = percent_decode(value)?;
        let name = key.split(':').next().unwrap_or_default();
        if task_param(name).is_none() {
            return Err(format!(
                "'{key}' is not a Task search parameter; criteria may use: {}",
                TASK_PARAMS
                    .iter()
                    .map(|def| def.code)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        pairs.push((key, value));
    }
    if pairs.is_empty() {
        return Err("the criterion is empty".into());
    }
    // The limits only shape result pages, which a criterion does not have.
    let limits = SearchLimits {
        default_count: 1,
        max_count: 1,
        default_total: crate::fhir::search::TotalMode::Accurate,
    };
    parse_query(&pairs, &limits, base_url, Handling::Strict)
        .map(|query| query.predicates)
        .map_err(|e| e.to_string())
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("'{text}' has a '%' that does not start a %XX escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{text}' decodes to invalid UTF-8"))
}

fn parse_filter(value: &Value, place: &str) -> Result<FilterDef, String> {
    let filter = as_object(value, place)?;
    check_keys(filter, FILTER_KEYS, place)?;
    if let Some(resource) = optional_string(filter, "resource", &format!("{place}.resource"))?
        && !is_task(resource)
    {
        return Err(format!(
            "{place}.resource is '{resource}'; Baton filters only on Task"
        ));
    }
    optional_string(
        filter,
        "filterDefinition",
        &format!("{place}.filterDefinition"),
    )?;
    let param = optional_string(
        filter,
        "filterParameter",
        &format!("{place}.filterParameter"),
    )?
    .ok_or_else(|| format!("{place} has no filterParameter"))?;
    let def = task_param(param).ok_or_else(|| {
        format!(
            "{place}.filterParameter '{param}' is not a Task search parameter Baton supports; \
             supported: {}",
            TASK_PARAMS
                .iter()
                .map(|def| def.code)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;

    let (allowed_modifiers, allowed_comparators): (&[&str], &[&str]) = match def.kind {
        ParamType::Token => (&["not", "missing"], &[]),
        ParamType::Reference => (&["not", "missing", "type"], &[]),
        ParamType::Date => (&["missing"], COMPARATORS),
    };
    let mut modifiers: Vec<String> = Vec::new();
    let add = |code: &str, modifiers: &mut Vec<String>| {
        if !modifiers.iter().any(|m| m == code) {
            modifiers.push(code.to_string());
        }
    };
    let kind = match def.kind {
        ParamType::Token => "token",
        ParamType::Reference => "reference",
        ParamType::Date => "date",
    };
    for (i, code) in array(filter, "comparator", &format!("{place}.comparator"))?
        .iter()
        .enumerate()
    {
        let code_place = format!("{place}.comparator[{i}]");
        let code = code
            .as_str()
            .ok_or_else(|| format!("{code_place} is {code}, not a code"))?;
        if !allowed_comparators.contains(&code) {
            return Err(format!(
                "{code_place} '{code}' is not supported on '{param}' ({kind} parameter); {}",
                if allowed_comparators.is_empty() {
                    "comparators apply only to date parameters".to_string()
                } else {
                    format!("supported: {}", allowed_comparators.join(", "))
                }
            ));
        }
        add(code, &mut modifiers);
    }
    for (i, code) in array(filter, "modifier", &format!("{place}.modifier"))?
        .iter()
        .enumerate()
    {
        let code_place = format!("{place}.modifier[{i}]");
        let code = code
            .as_str()
            .ok_or_else(|| format!("{code_place} is {code}, not a code"))?;
        // R4B's modifier list also carries comparators, and '=' for plain equality.
        if code == "=" || allowed_modifiers.contains(&code) || allowed_comparators.contains(&code) {
            add(code, &mut modifiers);
        } else {
            let mut supported: Vec<&str> = allowed_modifiers.to_vec();
            supported.extend_from_slice(allowed_comparators);
            return Err(format!(
                "{code_place} '{code}' is not supported on '{param}' ({kind} parameter); \
                 supported: {}",
                supported.join(", ")
            ));
        }
    }
    Ok(FilterDef {
        param: def.code.to_string(),
        modifiers,
    })
}

fn is_task(resource: &str) -> bool {
    resource == "Task" || resource == TASK_TYPE_URL
}

fn as_object<'v>(value: &'v Value, place: &str) -> Result<&'v Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{place} must be a JSON object"))
}

/// Refuses any element outside `allowed`. A primitive's `_name` companion (its id and
/// extensions) goes with `name`.
fn check_keys(object: &Map<String, Value>, allowed: &[&str], place: &str) -> Result<(), String> {
    for key in object.keys() {
        let base = key.strip_prefix('_').unwrap_or(key);
        if !allowed.contains(&base) {
            let why = if key == "modifierExtension" {
                " (a modifier extension changes what the element means, and Baton knows none)"
            } else {
                ""
            };
            return Err(format!(
                "{place} has the element '{key}', which Baton does not support{why}; \
                 supported: {}",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

fn optional_string<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    place: &str,
) -> Result<Option<&'v str>, String> {
    match object.get(key) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(format!("{place} must be a string, not {other}")),
    }
}

/// The array `key` of `object`, or an empty slice when it is absent.
/// The code system of the events Baton raises itself, and its one event: a Task's due date
/// (`restriction.period.end`) passed while the Task was not in a terminal state.
pub const EVENT_SYSTEM: &str = "https://baton.dev/fhir/CodeSystem/task-event";
pub const OVERDUE_EVENT: &str = "overdue";

/// Reads `eventTrigger`: Baton raises exactly one non-REST event, `overdue` on Task, so every
/// other event is refused rather than accepted and never fired.
fn parse_event_triggers(object: &Map<String, Value>) -> Result<bool, String> {
    let mut on_overdue = false;
    for (i, trigger) in array(object, "eventTrigger", "eventTrigger")?
        .iter()
        .enumerate()
    {
        let place = format!("eventTrigger[{i}]");
        let trigger = trigger
            .as_object()
            .ok_or_else(|| format!("{place} must be an object"))?;
        check_keys(trigger, &["description", "event", "resource"], &place)?;
        match trigger.get("resource").and_then(Value::as_str) {
            Some("Task") | Some(TASK_TYPE_URL) => {}
            _ => return Err(format!("{place}.resource must be Task")),
        }
        let codings = trigger
            .get("event")
            .and_then(|e| e.get("coding"))
            .and_then(Value::as_array)
            .ok_or_else(|| format!("{place}.event needs a coding"))?;
        let known = codings.iter().any(|c| {
            c.get("system").and_then(Value::as_str) == Some(EVENT_SYSTEM)
                && c.get("code").and_then(Value::as_str) == Some(OVERDUE_EVENT)
        });
        if !known {
            return Err(format!(
                "{place}: Baton raises only the event {EVENT_SYSTEM}|{OVERDUE_EVENT}"
            ));
        }
        on_overdue = true;
    }
    Ok(on_overdue)
}

fn array<'v>(
    object: &'v Map<String, Value>,
    key: &str,
    place: &str,
) -> Result<&'v [Value], String> {
    match object.get(key) {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(format!("{place} must be an array, not {other}")),
    }
}
