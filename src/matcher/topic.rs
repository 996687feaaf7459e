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
//!
//! This file holds the parsed `Topic` and the evaluation of its triggers against a change;
//! `load` finds the topic definitions and `parse` reads one.

use serde_json::Value;

use crate::fhir::interaction::Interaction;
use crate::fhir::search::{ParamType, Predicate, TaskIndex, matches, task_param};
use crate::matcher::fhirpath::Expression;

mod load;
mod parse;

pub use load::{builtin_topics, combine_topics, load_topic_dir};
pub use parse::{EVENT_SYSTEM, OVERDUE_EVENT, parse_topic};

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

#[cfg(test)]
mod tests {
    use super::load::BUILTIN_TOPICS;
    use super::parse::COMPARATORS;
    use super::*;
    use crate::fhir::search::{TASK_PARAMS, index_task};
    use serde_json::json;
    use std::path::Path;

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
