//! SubscriptionTopic definitions: parsing them from R5/R4B JSON, and deciding whether a Task
//! change fires one of their triggers.
//!
//! A topic is accepted only when Baton can evaluate every part of it exactly. A topic with an
//! element we would ignore (an `eventTrigger`, an unknown key, a FHIRPath we cannot evaluate)
//! is refused at start-up with a message naming the file and the element, because a topic
//! that quietly fires on the wrong changes is worse than one that is never loaded.
//!
//! The built-in topics live as JSON files in `config/topics/` and are embedded in the binary;
//! operators can add their own with `load_topic_dir`. Everything here except that loader is
//! pure.

use std::path::Path;

use serde_json::{Map, Value};

use crate::fhir::interaction::Interaction;
use crate::fhir::is_valid_id;
use crate::fhir::search::{
    Handling, ParamType, Predicate, SearchLimits, TASK_PARAMS, TaskIndex, matches, parse_query,
    task_param,
};
use crate::matcher::fhirpath::{self, Expression};

/// A SubscriptionTopic Baton can evaluate.
#[derive(Debug, Clone)]
pub struct Topic {
    pub id: String,
    /// The canonical URL subscriptions name in `criteria`.
    pub url: String,
    pub title: String,
    /// `draft`, `active`, `retired` or `unknown`, as the definition says.
    pub status: String,
    /// OR-joined: a change that fires any trigger fires the topic.
    pub triggers: Vec<Trigger>,
    /// Whether an `eventTrigger` asks for Baton's own `overdue` event (see `OVERDUE_EVENT`).
    pub on_overdue: bool,
    pub filters: Vec<FilterDef>,
    /// The SubscriptionTopic JSON served at `/fhir/SubscriptionTopic/{id}`, with its final url.
    pub definition: Value,
}

/// One `resourceTrigger`.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// The interactions the trigger applies to; empty means all of them.
    pub interactions: Vec<Interaction>,
    pub query: Option<QueryCriteria>,
    pub fhirpath: Option<Expression>,
}

/// `resourceTrigger.queryCriteria`: search tests on the Task before and after the change.
#[derive(Debug, Clone)]
pub struct QueryCriteria {
    /// ANDed predicates on the Task before the change.
    pub previous: Option<Vec<Predicate>>,
    /// ANDed predicates on the Task after the change.
    pub current: Option<Vec<Predicate>>,
    /// What the `previous` test yields on a create, when there is no previous Task.
    pub result_for_create: bool,
    /// What the `current` test yields on a delete, when there is no current Task.
    pub result_for_delete: bool,
    /// Whether `previous` and `current` must both pass, rather than either.
    pub require_both: bool,
}

/// One `canFilterBy`: a Task search parameter subscriptions to the topic may filter on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterDef {
    pub param: String,
    /// The modifiers (`not`, `missing`, `type`) and comparators (`eq`, `gt`, …) allowed with it.
    /// R5 lists them separately and R4B folds comparators into `modifier`; Baton keeps one list
    /// because a parameter's kind already tells which of them can apply.
    pub modifiers: Vec<String>,
}

/// A version of a Task as the matcher sees it: the resource for FHIRPath criteria and its
/// search index for query criteria, both computed once per change.
#[derive(Debug, Clone, Copy)]
pub struct TaskState<'a> {
    pub resource: &'a Value,
    pub index: &'a TaskIndex,
}

impl Topic {
    /// Whether a change fires this topic. `previous` is the Task before the change and
    /// `current` the Task after it. Whatever the caller passes, a create has no previous state
    /// and a delete no current one, as the specification defines the missing state as empty.
    pub fn fires(
        &self,
        interaction: Interaction,
        previous: Option<TaskState<'_>>,
        current: Option<TaskState<'_>>,
    ) -> bool {
        // The overdue event is not a REST interaction: only an eventTrigger asks for it, and
        // resource triggers (even those listing no interaction) never see it.
        if interaction == Interaction::Overdue {
            return self.on_overdue;
        }
        let previous = previous.filter(|_| interaction != Interaction::Create);
        let current = current.filter(|_| interaction != Interaction::Delete);
        self.triggers
            .iter()
            .any(|trigger| trigger.fires(interaction, previous, current))
    }

    /// Whether subscriptions to this topic may filter on `param`, with `modifier` when given.
    /// The modifier is what follows the colon in a filter (`not`, `missing`, or a resource type
    /// such as `Practitioner`, which the topic allows through the `type` modifier), or a
    /// comparator (`ge`) for a date.
    pub fn allows_filter(&self, param: &str, modifier: Option<&str>) -> bool {
        let Some(filter) = self.filters.iter().find(|f| f.param == param) else {
            return false;
        };
        let Some(modifier) = modifier else {
            return true;
        };
        if filter.modifiers.iter().any(|m| m == modifier) {
            return true;
        }
        task_param(param).is_some_and(|def| {
            def.kind == ParamType::Reference
                && def.targets.contains(&modifier)
                && filter.modifiers.iter().any(|m| m == "type")
        })
    }
}

impl Trigger {
    /// Interactions gate first; then every criterion present must pass.
    fn fires(
        &self,
        interaction: Interaction,
        previous: Option<TaskState<'_>>,
        current: Option<TaskState<'_>>,
    ) -> bool {
        if !self.interactions.is_empty() && !self.interactions.contains(&interaction) {
            return false;
        }
        let query_passes = self
            .query
            .as_ref()
            .is_none_or(|query| query.passes(interaction, previous, current));
        query_passes
            && self.fhirpath.as_ref().is_none_or(|expression| {
                expression.evaluate(previous.map(|s| s.resource), current.map(|s| s.resource))
            })
    }
}

impl QueryCriteria {
    /// Runs the previous and current tests. A create has no previous Task, so its previous
    /// test is `resultForCreate`; a delete has no current Task, so its current test is
    /// `resultForDelete`. With only one of the two criteria, that test alone decides.
    fn passes(
        &self,
        interaction: Interaction,
        previous: Option<TaskState<'_>>,
        current: Option<TaskState<'_>>,
    ) -> bool {
        let previous_test = self.previous.as_ref().map(|predicates| {
            if interaction == Interaction::Create {
                self.result_for_create
            } else {
                previous.is_some_and(|state| matches(state.index, predicates))
            }
        });
        let current_test = self.current.as_ref().map(|predicates| {
            if interaction == Interaction::Delete {
                self.result_for_delete
            } else {
                current.is_some_and(|state| matches(state.index, predicates))
            }
        });
        match (previous_test, current_test) {
            (Some(previous), Some(current)) if self.require_both => previous && current,
            (Some(previous), Some(current)) => previous || current,
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// The built-in topics, embedded so that the binary needs no files to run.
const BUILTIN_TOPICS: &[(&str, &str)] = &[
    (
        "task-changed.json",
        include_str!("../../config/topics/task-changed.json"),
    ),
    (
        "task-status-changed.json",
        include_str!("../../config/topics/task-status-changed.json"),
    ),
    (
        "task-owner-changed.json",
        include_str!("../../config/topics/task-owner-changed.json"),
    ),
    (
        "task-business-status-changed.json",
        include_str!("../../config/topics/task-business-status-changed.json"),
    ),
    (
        "task-overdue.json",
        include_str!("../../config/topics/task-overdue.json"),
    ),
];

/// The built-in topics (`config/topics/*.json`), with canonical URLs under `base_url`.
pub fn builtin_topics(base_url: &str) -> Result<Vec<Topic>, String> {
    let topics = BUILTIN_TOPICS
        .iter()
        .map(|(file, text)| {
            let source = format!("config/topics/{file}");
            parse_topic_text(text, base_url)
                .map(|topic| (source.clone(), topic))
                .map_err(|e| format!("{source}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_unique(&topics)?;
    Ok(topics.into_iter().map(|(_, topic)| topic).collect())
}

/// The operator's topics: every `*.json` file in `dir`, in file-name order.
pub fn load_topic_dir(dir: &Path, base_url: &str) -> Result<Vec<Topic>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read the topic directory {}: {e}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("cannot read the topic directory {}: {e}", dir.display()))?
            .path();
        // Editors leave hidden swap and backup files next to the real ones; they are not topics.
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if path.is_file() && !hidden && path.extension().is_some_and(|e| e == "json") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut topics = Vec::with_capacity(paths.len());
    for path in paths {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{source}: {e}"))?;
        let topic = parse_topic_text(&text, base_url).map_err(|e| format!("{source}: {e}"))?;
        topics.push((source, topic));
    }
    check_unique(&topics)?;
    Ok(topics.into_iter().map(|(_, topic)| topic).collect())
}

/// Joins the built-in and the operator's topics, refusing an operator topic that reuses a
/// built-in id or URL: subscriptions name topics by URL, so two topics with one URL would make
/// it a matter of chance which one a subscription gets.
pub fn combine_topics(builtin: Vec<Topic>, operator: Vec<Topic>) -> Result<Vec<Topic>, String> {
    let labelled: Vec<(String, Topic)> = builtin
        .into_iter()
        .map(|topic| ("the built-in topics".to_string(), topic))
        .chain(
            operator
                .into_iter()
                .map(|topic| ("the topic directory".to_string(), topic)),
        )
        .collect();
    check_unique(&labelled)?;
    Ok(labelled.into_iter().map(|(_, topic)| topic).collect())
}

fn check_unique(topics: &[(String, Topic)]) -> Result<(), String> {
    for (i, (source, topic)) in topics.iter().enumerate() {
        for (other_source, other) in &topics[..i] {
            if other.id == topic.id {
                return Err(format!(
                    "{source}: the SubscriptionTopic id '{}' is already used by {other_source}",
                    topic.id
                ));
            }
            if other.url == topic.url {
                return Err(format!(
                    "{source}: the SubscriptionTopic url '{}' is already used by {other_source} (topic '{}')",
                    topic.url, other.id
                ));
            }
        }
    }
    Ok(())
}

fn parse_topic_text(text: &str, base_url: &str) -> Result<Topic, String> {
    let definition: Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    parse_topic(&definition, base_url)
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

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
const COMPARATORS: &[&str] = &["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap"];

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::search::index_task;
    use serde_json::json;

    const BASE: &str = "http://baton.test/fhir";

    /// A Task with the given status, owner and business-status code.
    fn task(status: &str, owner: Option<&str>, business: Option<&str>) -> Value {
        let mut task = json!({
            "resourceType": "Task",
            "id": "t1",
            "meta": { "lastUpdated": "2024-03-05T10:00:00.000Z" },
            "status": status,
            "intent": "order"
        });
        if let Some(owner) = owner {
            task["owner"] = json!({ "reference": owner });
        }
        if let Some(code) = business {
            task["businessStatus"] =
                json!({ "coding": [{ "system": "urn:bs", "code": code }], "text": code });
        }
        task
    }

    /// Evaluates `topic` for a change, indexing each state as the matcher will.
    fn fires(
        topic: &Topic,
        interaction: Interaction,
        previous: Option<&Value>,
        current: Option<&Value>,
    ) -> bool {
        let previous_index = previous.map(|t| index_task(t, BASE));
        let current_index = current.map(|t| index_task(t, BASE));
        fn state<'a>(
            resource: Option<&'a Value>,
            index: &'a Option<TaskIndex>,
        ) -> Option<TaskState<'a>> {
            resource
                .zip(index.as_ref())
                .map(|(resource, index)| TaskState { resource, index })
        }
        topic.fires(
            interaction,
            state(previous, &previous_index),
            state(current, &current_index),
        )
    }

    fn builtin(id: &str) -> Topic {
        builtin_topics(BASE)
            .unwrap()
            .into_iter()
            .find(|t| t.id == id)
            .unwrap_or_else(|| panic!("no built-in topic {id}"))
    }

    #[test]
    fn only_the_overdue_topic_hears_the_overdue_event() {
        let task =
            json!({"resourceType": "Task", "id": "t", "status": "in-progress", "intent": "order"});
        for id in [
            "task-changed",
            "task-status-changed",
            "task-owner-changed",
            "task-business-status-changed",
        ] {
            assert!(
                !fires(&builtin(id), Interaction::Overdue, None, Some(&task)),
                "{id}"
            );
        }
        let overdue = builtin("task-overdue");
        assert!(fires(&overdue, Interaction::Overdue, None, Some(&task)));
        for interaction in [
            Interaction::Create,
            Interaction::Update,
            Interaction::Delete,
        ] {
            assert!(
                !fires(&overdue, interaction, Some(&task), Some(&task)),
                "{interaction:?}"
            );
        }
    }

    #[test]
    fn builtin_topics_load_with_urls_under_the_base() {
        let topics = builtin_topics("http://baton.test/fhir/").unwrap();
        let ids: Vec<&str> = topics.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "task-changed",
                "task-status-changed",
                "task-owner-changed",
                "task-business-status-changed",
                "task-overdue"
            ]
        );
        for (topic, (file, text)) in topics.iter().zip(BUILTIN_TOPICS) {
            assert_eq!(*file, format!("{}.json", topic.id));
            // The url is derived so that it follows the server's public address.
            let raw: Value = serde_json::from_str(text).unwrap();
            assert!(raw.get("url").is_none(), "{file} must not carry a url");
            let url = format!("http://baton.test/fhir/SubscriptionTopic/{}", topic.id);
            assert_eq!(topic.url, url);
            assert_eq!(topic.definition["url"], json!(url));
            let keys: Vec<&String> = topic.definition.as_object().unwrap().keys().collect();
            assert_eq!(keys[..3], ["resourceType", "id", "url"], "{file}");
            assert_eq!(topic.status, "active");
            assert!(!topic.title.is_empty());
            assert!(topic.definition["description"].as_str().unwrap().len() > 80);
            assert_eq!(
                topic.definition["notificationShape"],
                json!([{ "resource": "Task" }])
            );
            // Every Task search parameter is offered, with the modifiers search supports.
            assert_eq!(topic.filters.len(), TASK_PARAMS.len(), "{file}");
            for def in TASK_PARAMS {
                let filter = topic
                    .filters
                    .iter()
                    .find(|f| f.param == def.code)
                    .unwrap_or_else(|| panic!("{file} lacks {}", def.code));
                let expected: Vec<&str> = match def.kind {
                    ParamType::Date => COMPARATORS.iter().copied().chain(["missing"]).collect(),
                    _ => vec!["not", "missing"],
                };
                assert_eq!(filter.modifiers, expected, "{file}: {}", def.code);
            }
        }
    }

    #[test]
    fn builtin_topics_fire_on_the_changes_they_describe() {
        use Interaction::{Create, Delete, Update};
        let bare = task("requested", None, None);
        let owned = task("requested", Some("Practitioner/p1"), None);
        let reowned = task("requested", Some("Practitioner/p2"), None);
        let accepted = task("accepted", None, None);
        let waiting = task("requested", None, Some("waiting"));
        let collected = task("requested", None, Some("collected"));
        let mut relabelled = waiting.clone();
        relabelled["businessStatus"]["text"] = json!("Waiting for porter");
        relabelled["businessStatus"]["coding"][0]["display"] = json!("Waiting");

        // Expected: (task-changed, task-status-changed, task-owner-changed,
        // task-business-status-changed).
        type Row<'a> = (
            &'a str,
            Interaction,
            Option<&'a Value>,
            Option<&'a Value>,
            [bool; 4],
        );
        let rows: Vec<Row> = vec![
            (
                "create, no owner",
                Create,
                None,
                Some(&bare),
                [true, true, false, false],
            ),
            (
                "create with owner",
                Create,
                None,
                Some(&owned),
                [true, true, true, false],
            ),
            (
                "create with business status",
                Create,
                None,
                Some(&waiting),
                [true, true, false, true],
            ),
            (
                "status changes",
                Update,
                Some(&bare),
                Some(&accepted),
                [true, true, false, false],
            ),
            (
                "no-op update",
                Update,
                Some(&owned),
                Some(&owned),
                [true, false, false, false],
            ),
            (
                "owner set",
                Update,
                Some(&bare),
                Some(&owned),
                [true, false, true, false],
            ),
            (
                "owner cleared",
                Update,
                Some(&owned),
                Some(&bare),
                [true, false, true, false],
            ),
            (
                "owner changed",
                Update,
                Some(&owned),
                Some(&reowned),
                [true, false, true, false],
            ),
            (
                "business status set",
                Update,
                Some(&bare),
                Some(&waiting),
                [true, false, false, true],
            ),
            (
                "business status changed",
                Update,
                Some(&waiting),
                Some(&collected),
                [true, false, false, true],
            ),
            (
                "business status cleared",
                Update,
                Some(&collected),
                Some(&bare),
                [true, false, false, true],
            ),
            (
                "business status relabelled only",
                Update,
                Some(&waiting),
                Some(&relabelled),
                [true, false, false, false],
            ),
            (
                "delete",
                Delete,
                Some(&owned),
                None,
                [true, false, false, false],
            ),
            // A caller that hands over the tombstone's content as `current` still gets delete
            // semantics: the missing state is empty whatever is passed.
            (
                "delete with content passed",
                Delete,
                Some(&waiting),
                Some(&collected),
                [true, false, false, false],
            ),
            (
                "create with stale previous passed",
                Create,
                Some(&owned),
                Some(&owned),
                [true, true, true, false],
            ),
        ];
        let topics = [
            builtin("task-changed"),
            builtin("task-status-changed"),
            builtin("task-owner-changed"),
            builtin("task-business-status-changed"),
        ];
        for (label, interaction, previous, current, expected) in rows {
            for (topic, expected) in topics.iter().zip(expected) {
                assert_eq!(
                    fires(topic, interaction, previous, current),
                    expected,
                    "{} on {label}",
                    topic.id
                );
            }
        }
    }

    /// A Task topic whose single trigger is `trigger`.
    fn topic_with_trigger(trigger: Value) -> Value {
        json!({
            "resourceType": "SubscriptionTopic",
            "id": "custom",
            "status": "active",
            "resourceTrigger": [trigger]
        })
    }

    fn parsed(definition: Value) -> Topic {
        parse_topic(&definition, BASE).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn query_criteria_follow_previous_current_and_the_create_delete_results() {
        use Interaction::{Create, Delete, Update};
        let requested = task("requested", Some("Practitioner/p1"), None);
        let completed = task("completed", Some("Practitioner/p1"), None);
        let completed_elsewhere = task("completed", Some("Practitioner/p2"), None);
        let cancelled = task("cancelled", None, None);

        let completion = |extra: Value| {
            let mut criteria = json!({
                "previous": "status:not=completed",
                "current": "status=completed"
            });
            criteria
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            parsed(topic_with_trigger(json!({
                "resource": "http://hl7.org/fhir/StructureDefinition/Task",
                "supportedInteraction": ["create", "update", "delete"],
                "queryCriteria": criteria
            })))
        };
        // The specification's example: a Task becomes completed, created that way included.
        let example = completion(json!({ "resultForCreate": "test-passes", "requireBoth": true }));
        // The same without resultForCreate, which Baton reads as test-fails.
        let strict = completion(json!({ "requireBoth": true }));
        // Either test suffices.
        let either = completion(json!({}));
        // On delete the current test is resultForDelete.
        let on_delete =
            completion(json!({ "resultForDelete": "test-passes", "requireBoth": true }));
        let only_current = parsed(topic_with_trigger(json!({
            "resource": "Task",
            "queryCriteria": { "current": "status=completed", "requireBoth": true }
        })));
        let only_previous = parsed(topic_with_trigger(json!({
            "resource": "Task",
            "queryCriteria": { "previous": "status=completed", "resultForDelete": "test-fails" }
        })));
        // Both encodings are accepted; `&` ANDs terms; a literal `+` stays a time zone.
        let encoded = parsed(topic_with_trigger(json!({
            "resource": "Task",
            "queryCriteria": {
                "current": "status%3Anot=requested&status=completed&owner=Practitioner%2Fp1&_lastUpdated=ge2024-03-05T11:00:00+01:00"
            }
        })));

        type Row<'a> = (
            &'a str,
            &'a Topic,
            Interaction,
            Option<&'a Value>,
            Option<&'a Value>,
            bool,
        );
        let rows: Vec<Row> = vec![
            (
                "example: created completed",
                &example,
                Create,
                None,
                Some(&completed),
                true,
            ),
            (
                "example: created requested",
                &example,
                Create,
                None,
                Some(&requested),
                false,
            ),
            (
                "example: completes",
                &example,
                Update,
                Some(&requested),
                Some(&completed),
                true,
            ),
            (
                "example: stays completed",
                &example,
                Update,
                Some(&completed),
                Some(&completed_elsewhere),
                false,
            ),
            (
                "example: cancelled",
                &example,
                Update,
                Some(&requested),
                Some(&cancelled),
                false,
            ),
            (
                "example: deleted",
                &example,
                Delete,
                Some(&completed),
                None,
                false,
            ),
            (
                "strict: created completed",
                &strict,
                Create,
                None,
                Some(&completed),
                false,
            ),
            (
                "strict: completes",
                &strict,
                Update,
                Some(&requested),
                Some(&completed),
                true,
            ),
            (
                "either: created requested",
                &either,
                Create,
                None,
                Some(&requested),
                false,
            ),
            (
                "either: created completed",
                &either,
                Create,
                None,
                Some(&completed),
                true,
            ),
            (
                "either: stays completed",
                &either,
                Update,
                Some(&completed),
                Some(&completed),
                true,
            ),
            (
                "either: requested to cancelled",
                &either,
                Update,
                Some(&requested),
                Some(&cancelled),
                true,
            ),
            (
                "either: deleted while requested",
                &either,
                Delete,
                Some(&requested),
                None,
                true,
            ),
            (
                "on delete: requested deleted",
                &on_delete,
                Delete,
                Some(&requested),
                None,
                true,
            ),
            (
                "on delete: completed deleted",
                &on_delete,
                Delete,
                Some(&completed),
                None,
                false,
            ),
            (
                "only current: create completed",
                &only_current,
                Create,
                None,
                Some(&completed),
                true,
            ),
            (
                "only current: stays completed",
                &only_current,
                Update,
                Some(&completed),
                Some(&completed),
                true,
            ),
            (
                "only current: delete",
                &only_current,
                Delete,
                Some(&completed),
                None,
                false,
            ),
            (
                "only previous: create",
                &only_previous,
                Create,
                None,
                Some(&completed),
                false,
            ),
            (
                "only previous: reopened",
                &only_previous,
                Update,
                Some(&completed),
                Some(&requested),
                true,
            ),
            (
                "only previous: completed deleted",
                &only_previous,
                Delete,
                Some(&completed),
                None,
                true,
            ),
            (
                "encoded: completed by p1 after 10:00Z",
                &encoded,
                Update,
                Some(&requested),
                Some(&completed),
                true,
            ),
            (
                "encoded: completed by p2",
                &encoded,
                Update,
                Some(&requested),
                Some(&completed_elsewhere),
                false,
            ),
            (
                "encoded: not completed",
                &encoded,
                Update,
                Some(&completed),
                Some(&requested),
                false,
            ),
        ];
        for (label, topic, interaction, previous, current, expected) in rows {
            assert_eq!(
                fires(topic, interaction, previous, current),
                expected,
                "{label}"
            );
        }

        let criteria = example.triggers[0].query.as_ref().unwrap();
        assert!(criteria.result_for_create && criteria.require_both && !criteria.result_for_delete);
        assert_eq!(
            encoded.triggers[0]
                .query
                .as_ref()
                .unwrap()
                .current
                .as_ref()
                .unwrap()
                .len(),
            4
        );
    }

    #[test]
    fn triggers_or_and_criteria_within_a_trigger_and() {
        use Interaction::{Create, Delete, Update};
        let requested = task("requested", None, None);
        let ready = task("ready", None, None);
        let ready_owned = task("ready", Some("Organization/lab"), None);
        let topic = parsed(json!({
            "resourceType": "SubscriptionTopic",
            "id": "ready-or-gone",
            "status": "active",
            "resourceTrigger": [
                {
                    "resource": "Task",
                    "supportedInteraction": ["update"],
                    "queryCriteria": { "current": "status=ready" },
                    "fhirPathCriteria": "%current.owner.exists()"
                },
                { "resource": "Task", "supportedInteraction": ["delete"] }
            ]
        }));
        let cases = [
            (
                "update to ready with owner",
                Update,
                Some(&requested),
                Some(&ready_owned),
                true,
            ),
            (
                "update to ready without owner",
                Update,
                Some(&requested),
                Some(&ready),
                false,
            ),
            (
                "update with owner, not ready",
                Update,
                Some(&ready_owned),
                Some(&requested),
                false,
            ),
            (
                "create ready with owner",
                Create,
                None,
                Some(&ready_owned),
                false,
            ),
            ("delete", Delete, Some(&requested), None, true),
        ];
        for (label, interaction, previous, current, expected) in cases {
            assert_eq!(
                fires(&topic, interaction, previous, current),
                expected,
                "{label}"
            );
        }

        // A trigger without interactions applies to all of them.
        let all = parsed(topic_with_trigger(json!({ "resource": "Task" })));
        assert!(all.triggers[0].interactions.is_empty());
        assert!(fires(&all, Create, None, Some(&ready)));
        assert!(fires(&all, Update, Some(&ready), Some(&ready)));
        assert!(fires(&all, Delete, Some(&ready), None));
    }

    #[test]
    fn definitions_keep_a_given_url_and_fall_back_for_the_title() {
        let topic = parsed(json!({
            "resourceType": "SubscriptionTopic",
            "id": "lab",
            "url": "https://example.org/topics/lab",
            "name": "LabTasks",
            "status": "draft",
            "resourceTrigger": [{ "resource": "Task" }],
            "canFilterBy": [
                { "filterParameter": "authored-on", "comparator": ["ge"] },
                { "filterParameter": "authored-on", "comparator": ["lt"], "modifier": ["missing"] },
                { "filterParameter": "owner", "modifier": ["type", "=", "not"] },
                { "filterParameter": "due-date", "modifier": ["ge", "le"] }
            ]
        }));
        assert_eq!(topic.url, "https://example.org/topics/lab");
        assert_eq!(
            topic.definition["url"],
            json!("https://example.org/topics/lab")
        );
        assert_eq!(
            (topic.title.as_str(), topic.status.as_str()),
            ("LabTasks", "draft")
        );
        assert_eq!(
            topic.filters,
            vec![
                FilterDef {
                    param: "authored-on".into(),
                    modifiers: vec!["ge".into(), "lt".into(), "missing".into()]
                },
                FilterDef {
                    param: "owner".into(),
                    modifiers: vec!["type".into(), "=".into(), "not".into()]
                },
                FilterDef {
                    param: "due-date".into(),
                    modifiers: vec!["ge".into(), "le".into()]
                },
            ]
        );
        let untitled = parsed(topic_with_trigger(json!({ "resource": "Task" })));
        assert_eq!(untitled.title, "custom");
        assert_eq!(
            untitled.url,
            "http://baton.test/fhir/SubscriptionTopic/custom"
        );
    }

    #[test]
    fn filters_are_allowed_as_declared() {
        let topic = parsed(json!({
            "resourceType": "SubscriptionTopic",
            "id": "filters",
            "status": "active",
            "resourceTrigger": [{ "resource": "Task" }],
            "canFilterBy": [
                { "filterParameter": "status", "modifier": ["not"] },
                { "filterParameter": "owner", "modifier": ["type"] },
                { "filterParameter": "patient" },
                { "filterParameter": "due-date", "comparator": ["lt", "le"] }
            ]
        }));
        let cases = [
            ("status", None, true),
            ("status", Some("not"), true),
            ("status", Some("missing"), false),
            ("owner", None, true),
            ("owner", Some("Practitioner"), true),
            ("owner", Some("Task"), false),
            ("owner", Some("not"), false),
            ("patient", None, true),
            ("patient", Some("Patient"), false),
            ("due-date", Some("lt"), true),
            ("due-date", Some("gt"), false),
            ("code", None, false),
            ("nonsense", None, false),
        ];
        for (param, modifier, expected) in cases {
            assert_eq!(
                topic.allows_filter(param, modifier),
                expected,
                "{param}:{modifier:?}"
            );
        }
        let builtin = builtin("task-changed");
        assert!(builtin.allows_filter("owner", Some("not")));
        assert!(builtin.allows_filter("due-date", Some("missing")));
        assert!(builtin.allows_filter("authored-on", Some("ge")));
        assert!(!builtin.allows_filter("authored-on", Some("not")));
    }

    #[test]
    fn unsupported_definitions_are_refused_with_the_reason() {
        type Patch = fn(&mut Value);
        let cases: &[(Patch, &str)] = &[
            (|t| *t = json!([]), "must be a JSON object"),
            (
                |t| t["resourceType"] = json!("Subscription"),
                "resourceType must be SubscriptionTopic",
            ),
            (
                |t| {
                    t.as_object_mut().unwrap().remove("resourceType");
                },
                "resourceType SubscriptionTopic is missing",
            ),
            (
                |t| {
                    t.as_object_mut().unwrap().remove("id");
                },
                "has no id",
            ),
            (
                |t| t["id"] = json!("has space"),
                "id \"has space\" is not a valid FHIR id",
            ),
            (|t| t["id"] = json!(7), "id 7 is not a valid FHIR id"),
            (
                |t| t["eventTrigger"] = json!([{ "resource": "Encounter" }]),
                "SubscriptionTopic 'sample': eventTrigger[0].resource must be Task",
            ),
            (
                |t| {
                    t["eventTrigger"] = json!([{
                        "resource": "Task",
                        "event": { "coding": [{ "system": "http://example.org/events", "code": "escalated" }] }
                    }])
                },
                "Baton raises only the event https://baton.dev/fhir/CodeSystem/task-event|overdue",
            ),
            (
                |t| t["eventTrigger"] = json!([{ "resource": "Task" }]),
                "eventTrigger[0].event needs a coding",
            ),
            (
                |t| t["trigger"] = json!([]),
                "'trigger' is the R6 draft form",
            ),
            (
                |t| t["modifierExtension"] = json!([]),
                "the topic has the element 'modifierExtension', which Baton does not support (a modifier extension",
            ),
            (
                |t| t["implicitRules"] = json!("urn:x"),
                "element 'implicitRules'",
            ),
            (
                |t| t["resourceTriggers"] = json!([]),
                "the topic has the element 'resourceTriggers'",
            ),
            (|t| t["url"] = json!(""), "'url' is empty"),
            (|t| t["url"] = json!(3), "url must be a string, not 3"),
            (
                |t| {
                    t.as_object_mut().unwrap().remove("status");
                },
                "'status' is missing",
            ),
            (|t| t["status"] = json!("live"), "'status' is 'live'"),
            (|t| t["title"] = json!(["x"]), "title must be a string"),
            (
                |t| {
                    t.as_object_mut().unwrap().remove("resourceTrigger");
                },
                "has no resourceTrigger, so it could never fire",
            ),
            (
                |t| t["resourceTrigger"] = json!([]),
                "has no resourceTrigger",
            ),
            (
                |t| t["resourceTrigger"] = json!({ "resource": "Task" }),
                "resourceTrigger must be an array",
            ),
            (
                |t| t["resourceTrigger"][0] = json!("Task"),
                "resourceTrigger[0] must be a JSON object",
            ),
            (
                |t| t["resourceTrigger"][0]["resource"] = json!("Patient"),
                "resourceTrigger[0].resource is 'Patient'; Baton holds only Tasks",
            ),
            (
                |t| {
                    t["resourceTrigger"][0]["resource"] =
                        json!("http://hl7.org/fhir/StructureDefinition/ServiceRequest")
                },
                "resource is 'http://hl7.org/fhir/StructureDefinition/ServiceRequest'",
            ),
            (
                |t| {
                    t["resourceTrigger"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("resource");
                },
                "resourceTrigger[0] has no resource",
            ),
            (
                |t| t["resourceTrigger"][0]["supportedInteraction"] = json!(["create", "read"]),
                "resourceTrigger[0].supportedInteraction[1] is \"read\"; it must be create, update or delete",
            ),
            (
                |t| t["resourceTrigger"][0]["supportedInteraction"] = json!("create"),
                "resourceTrigger[0].supportedInteraction must be an array",
            ),
            (
                |t| t["resourceTrigger"][0]["canFilterBy"] = json!([]),
                "resourceTrigger[0] has the element 'canFilterBy'",
            ),
            (
                |t| t["resourceTrigger"][0]["modifierExtension"] = json!([]),
                "resourceTrigger[0] has the element 'modifierExtension'",
            ),
            (
                |t| {
                    t["resourceTrigger"][0]["fhirPathCriteria"] =
                        json!("%current.status.where(true)")
                },
                "resourceTrigger[0].fhirPathCriteria '%current.status.where(true)' cannot be evaluated by Baton: the function 'where()' is not supported",
            ),
            (
                |t| t["resourceTrigger"][0]["fhirPathCriteria"] = json!("%resource.status = 'x'"),
                "variable '%resource' is not supported",
            ),
            (
                |t| t["resourceTrigger"][0]["fhirPathCriteria"] = json!(true),
                "fhirPathCriteria must be a string",
            ),
            (
                |t| t["resourceTrigger"][0]["queryCriteria"] = json!({}),
                "resourceTrigger[0].queryCriteria has neither 'previous' nor 'current'",
            ),
            (
                |t| {
                    t["resourceTrigger"][0]["queryCriteria"] =
                        json!({ "current": "status=ready", "requireAll": true })
                },
                "resourceTrigger[0].queryCriteria has the element 'requireAll'",
            ),
            (
                |t| t["resourceTrigger"][0]["queryCriteria"] = json!({ "current": "colour=red" }),
                "resourceTrigger[0].queryCriteria.current: 'colour' is not a Task search parameter",
            ),
            (
                |t| t["resourceTrigger"][0]["queryCriteria"] = json!({ "current": "_count=1" }),
                "'_count' is not a Task search parameter",
            ),
            (
                |t| {
                    t["resourceTrigger"][0]["queryCriteria"] =
                        json!({ "current": "status:text=ready" })
                },
                "queryCriteria.current: The modifier ':text' is not supported on 'status'",
            ),
            (
                |t| {
                    t["resourceTrigger"][0]["queryCriteria"] =
                        json!({ "previous": "authored-on=yesterday" })
                },
                "queryCriteria.previous: The parameter 'authored-on' has 'yesterday', which does not start with a date",
            ),
            (
                |t| t["resourceTrigger"][0]["queryCriteria"] = json!({ "previous": "status" }),
                "'status' is not of the form parameter=value",
            ),
            (
                |t| t["resourceTrigger"][0]["queryCriteria"] = json!({ "previous": "&" }),
                "queryCriteria.previous: the criterion is empty",
            ),
            (
                |t| t["resourceTrigger"][0]["queryCriteria"] = json!({ "previous": "status=100%" }),
                "'100%' has a '%' that does not start a %XX escape",
            ),
            (
                |t| t["resourceTrigger"][0]["queryCriteria"] = json!({ "previous": "status=%FF" }),
                "decodes to invalid UTF-8",
            ),
            (
                |t| {
                    t["resourceTrigger"][0]["queryCriteria"] =
                        json!({ "previous": "status=ready", "resultForCreate": "pass" })
                },
                "queryCriteria.resultForCreate is 'pass'; it must be test-passes or test-fails",
            ),
            (
                |t| {
                    t["resourceTrigger"][0]["queryCriteria"] =
                        json!({ "current": "status=ready", "resultForDelete": true })
                },
                "resultForDelete must be a string",
            ),
            (
                |t| {
                    t["resourceTrigger"][0]["queryCriteria"] =
                        json!({ "current": "status=ready", "requireBoth": "yes" })
                },
                "requireBoth is \"yes\"; it must be true or false",
            ),
            (
                |t| t["canFilterBy"] = json!([{ "filterParameter": "colour" }]),
                "canFilterBy[0].filterParameter 'colour' is not a Task search parameter Baton supports",
            ),
            (
                |t| t["canFilterBy"] = json!([{ "resource": "Task" }]),
                "canFilterBy[0] has no filterParameter",
            ),
            (
                |t| {
                    t["canFilterBy"] =
                        json!([{ "resource": "Patient", "filterParameter": "status" }])
                },
                "canFilterBy[0].resource is 'Patient'",
            ),
            (
                |t| t["canFilterBy"] = json!([{ "filterParameter": "status", "event": [] }]),
                "canFilterBy[0] has the element 'event'",
            ),
            (
                |t| {
                    t["canFilterBy"] =
                        json!([{ "filterParameter": "status", "modifier": ["text"] }])
                },
                "canFilterBy[0].modifier[0] 'text' is not supported on 'status' (token parameter); supported: not, missing",
            ),
            (
                |t| {
                    t["canFilterBy"] =
                        json!([{ "filterParameter": "owner", "modifier": ["not", "identifier"] }])
                },
                "canFilterBy[0].modifier[1] 'identifier' is not supported on 'owner' (reference parameter)",
            ),
            (
                |t| {
                    t["canFilterBy"] = json!([{ "filterParameter": "period", "modifier": ["not"] }])
                },
                "'not' is not supported on 'period' (date parameter); supported: missing, eq",
            ),
            (
                |t| {
                    t["canFilterBy"] =
                        json!([{ "filterParameter": "status", "comparator": ["gt"] }])
                },
                "canFilterBy[0].comparator[0] 'gt' is not supported on 'status' (token parameter); comparators apply only to date parameters",
            ),
            (
                |t| {
                    t["canFilterBy"] =
                        json!([{ "filterParameter": "period", "comparator": ["above"] }])
                },
                "'above' is not supported on 'period' (date parameter); supported: eq, ne",
            ),
            (
                |t| t["canFilterBy"] = json!([{ "filterParameter": "period", "comparator": [1] }]),
                "canFilterBy[0].comparator[0] is 1, not a code",
            ),
            (
                |t| t["canFilterBy"] = json!({}),
                "canFilterBy must be an array",
            ),
            (
                |t| t["notificationShape"] = json!([{ "resource": "Patient" }]),
                "notificationShape[0].resource is 'Patient'",
            ),
            (
                |t| t["notificationShape"] = json!([{ "include": ["Task:owner"] }]),
                "notificationShape[0] has no resource",
            ),
            (
                |t| {
                    t["notificationShape"] =
                        json!([{ "resource": "Task", "include": "Task:owner" }])
                },
                "notificationShape[0].include must be an array",
            ),
            (
                |t| t["notificationShape"] = json!([{ "resource": "Task", "revinclude": [] }]),
                "notificationShape[0] has the element 'revinclude'",
            ),
        ];
        for (patch, needle) in cases {
            let mut definition = json!({
                "resourceType": "SubscriptionTopic",
                "id": "sample",
                "status": "active",
                "resourceTrigger": [{ "resource": "Task", "supportedInteraction": ["update"] }],
                "canFilterBy": [{ "filterParameter": "status" }],
                "notificationShape": [{ "resource": "Task", "include": ["Task:owner"] }]
            });
            patch(&mut definition);
            let err = parse_topic(&definition, BASE).expect_err(needle);
            assert!(err.contains(needle), "'{err}' lacks '{needle}'");
            if definition.get("id") == Some(&json!("sample")) {
                assert!(err.starts_with("SubscriptionTopic 'sample': "), "{err}");
            }
        }
        // The unpatched sample is accepted, so each refusal above is due to its patch.
        let sample = json!({
            "resourceType": "SubscriptionTopic",
            "id": "sample",
            "status": "active",
            "_status": { "extension": [] },
            "resourceTrigger": [{ "resource": "Task", "supportedInteraction": ["update"] }],
            "canFilterBy": [{ "filterParameter": "status" }],
            "notificationShape": [{ "resource": "Task", "include": ["Task:owner"] }]
        });
        parsed(sample);
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    fn topic_json(id: &str) -> String {
        topic_with_trigger(json!({ "resource": "Task" }))
            .as_object()
            .map(|o| {
                let mut o = o.clone();
                o.insert("id".into(), json!(id));
                Value::Object(o).to_string()
            })
            .unwrap()
    }

    #[test]
    fn operator_topics_load_from_a_directory_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.json", &topic_json("second"));
        write(dir.path(), "a.json", &topic_json("first"));
        write(dir.path(), "notes.txt", "not a topic");
        write(dir.path(), ".a.json.swp", "{");
        std::fs::create_dir(dir.path().join("sub.json")).unwrap();
        let topics = load_topic_dir(dir.path(), BASE).unwrap();
        let ids: Vec<&str> = topics.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["first", "second"]);

        let all = combine_topics(builtin_topics(BASE).unwrap(), topics).unwrap();
        assert_eq!(all.len(), 7);

        let clash = combine_topics(
            builtin_topics(BASE).unwrap(),
            vec![parsed(
                serde_json::from_str(&topic_json("task-changed")).unwrap(),
            )],
        )
        .unwrap_err();
        assert!(clash.contains("the topic directory: the SubscriptionTopic id 'task-changed' is already used by the built-in topics"), "{clash}");

        let mut same_url: Value = serde_json::from_str(&topic_json("other")).unwrap();
        same_url["url"] = json!("http://baton.test/fhir/SubscriptionTopic/task-owner-changed");
        let clash =
            combine_topics(builtin_topics(BASE).unwrap(), vec![parsed(same_url)]).unwrap_err();
        assert!(clash.contains("url 'http://baton.test/fhir/SubscriptionTopic/task-owner-changed' is already used by the built-in topics (topic 'task-owner-changed')"), "{clash}");
    }

    #[test]
    fn directory_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.json", &topic_json("same"));
        write(dir.path(), "b.json", &topic_json("same"));
        let err = load_topic_dir(dir.path(), BASE).unwrap_err();
        assert!(
            err.contains("b.json: the SubscriptionTopic id 'same' is already used by"),
            "{err}"
        );
        assert!(err.contains("a.json"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "broken.json", "{ \"resourceType\": ");
        let err = load_topic_dir(dir.path(), BASE).unwrap_err();
        assert!(err.contains("broken.json: not valid JSON"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let mut bad: Value = serde_json::from_str(&topic_json("bad")).unwrap();
        bad["resourceTrigger"][0]["resource"] = json!("Encounter");
        write(dir.path(), "bad.json", &bad.to_string());
        let err = load_topic_dir(dir.path(), BASE).unwrap_err();
        assert!(
            err.contains(
                "bad.json: SubscriptionTopic 'bad': resourceTrigger[0].resource is 'Encounter'"
            ),
            "{err}"
        );

        let missing = dir.path().join("nowhere");
        let err = load_topic_dir(&missing, BASE).unwrap_err();
        assert!(err.starts_with("cannot read the topic directory"), "{err}");
        assert!(err.contains("nowhere"), "{err}");

        let empty = tempfile::tempdir().unwrap();
        assert!(load_topic_dir(empty.path(), BASE).unwrap().is_empty());
    }
}
