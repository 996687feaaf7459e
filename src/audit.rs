//! The audit trail: who did what to which Task or Subscription, as FHIR `AuditEvent`s in the
//! shapes of the Basic Audit Log Patterns IG (BALP).
//!
//! The API opens a `RequestAudit` for every FHIR request (a task-local, like the trace
//! context): the node, the caller's network address, and, once the bearer token is verified,
//! the agent. A Task write's AuditEvent is recorded by the store from it and written beside
//! the change event, so the change and its AuditEvent commit together; reads, searches,
//! Subscription changes and refusals are recorded by the API after the response is known.
//! The builders here are pure: they take the time and the facts, and never see a token, a
//! secret or a request header.
//!
//! **What is stored is the facts, not the resource.** Most of an AuditEvent is the same text
//! for every event of a kind (the codings of `type`, `agent.type`, `source.type`,
//! `entity.type` and `role`). A record keeps what varies: the searched columns (`recorded`,
//! `type`, `subtype`, `outcome`, `agent`, `entity`) and the rest of the facts in a short JSON
//! object (`StoredFacts`, ~100 bytes against ~1 KB for the resource). `expand` writes the
//! AuditEvent from a row when it is read, byte for byte what was written before the facts
//! were stored instead (the `tests` hold both to the `Value` forms). The row is what every
//! audited write, search and delivery attempt pays for in the SQLite writer's pages and WAL
//! (BENCHMARKS.md, "The audit trail's cost").

use std::borrow::Cow;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::Principal;
use crate::fhir::ids::{StoredInstant, TaskId, Version};
use crate::fhir::interaction::Interaction;
use crate::fhir::json::write_json;

/// The code system of `AuditEvent.type`.
pub const TYPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
/// Every AuditEvent Baton writes is a RESTful operation.
pub const TYPE_REST: &str = "rest";
/// The code system of `AuditEvent.subtype`: the FHIR interaction.
pub const SUBTYPE_SYSTEM: &str = "http://hl7.org/fhir/restful-interaction";

/// `AuditEvent.outcome`: how the request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    /// `0`: success.
    Success,
    /// `4`: minor failure, e.g. a refused request.
    MinorFailure,
    /// `8`: serious failure.
    SeriousFailure,
}

impl AuditOutcome {
    pub fn code(self) -> &'static str {
        match self {
            AuditOutcome::Success => "0",
            AuditOutcome::MinorFailure => "4",
            AuditOutcome::SeriousFailure => "8",
        }
    }
}

/// Who made a request, as an AuditEvent names it: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditAgent {
    /// The token's `fhirUser` (`Type/id`), when it has one.
    pub fhir_user: Option<String>,
    /// The token's `iss`.
    pub issuer: Option<String>,
    /// The token's `sub`.
    pub subject: String,
    /// Baton's role of the token.
    pub role: &'static str,
}

impl AuditAgent {
    pub fn of(principal: &Principal) -> AuditAgent {
        AuditAgent {
            fhir_user: principal.fhir_user.clone(),
            issuer: principal.issuer.clone(),
            subject: principal.subject.clone(),
            role: principal.role.as_str(),
        }
    }

    /// What `agent` search compares: the `fhirUser` reference, or the `sub` of a token
    /// without one.
    pub fn search_key(&self) -> String {
        self.fhir_user
            .clone()
            .unwrap_or_else(|| self.subject.clone())
    }
}

/// The audit facts of one request, open while it is served.
#[derive(Debug)]
pub struct RequestAudit {
    /// This node's name, shown as `source.observer`.
    pub node: String,
    /// The caller's IP address (`agent.network.address`).
    pub address: Option<String>,
    /// Whether the request is a PATCH: the store sees an update, the audit says `patch`.
    pub patch: bool,
    /// The verified caller; unset until (unless) a bearer token is verified.
    agent: OnceLock<AuditAgent>,
    /// What every Task change of this request stores alike, built once the caller is known
    /// (`prepare_task_changes`, on the request's thread), so that the SQLite writer, the
    /// serial stage, only splices each change's version in.
    task_changes: OnceLock<TaskChangeFacts>,
}

/// The parts of a request's Task-change AuditEvent record that do not depend on the change.
#[derive(Debug)]
struct TaskChangeFacts {
    /// The agent's search key (`AuditAgent::search_key`).
    agent: Option<String>,
    /// The stored facts without the version and the closing brace: for a Task change the
    /// version is the last key `StoredFacts` writes.
    facts_head: String,
}

impl RequestAudit {
    pub fn new(node: String, address: Option<String>, patch: bool) -> RequestAudit {
        RequestAudit {
            node,
            address,
            patch,
            agent: OnceLock::new(),
            task_changes: OnceLock::new(),
        }
    }

    pub fn agent(&self) -> Option<&AuditAgent> {
        self.agent.get()
    }

    /// The AuditEvent of one Task version a write stored, recorded inside its transaction.
    pub fn task_change(
        &self,
        id: &TaskId,
        version: Version,
        interaction: Interaction,
        recorded: &StoredInstant,
    ) -> AuditRecord {
        let subtype = match interaction {
            Interaction::Create => "create",
            Interaction::Delete => "delete",
            _ if self.patch => "patch",
            _ => "update",
        };
        let Some(prepared) = self.prepared_task_changes() else {
            let entity = AuditEntity::Resource {
                reference: format!("Task/{id}"),
                version: Some(version.to_string()),
            };
            return self.record(subtype, AuditOutcome::Success, recorded, Some(entity), None);
        };
        // What `record` stores for this change, byte for byte
        // (`tests::a_prepared_task_change_stores_what_record_stores`).
        AuditRecord {
            type_code: TYPE_REST,
            recorded: recorded.clone(),
            subtype: subtype.to_string(),
            outcome: AuditOutcome::Success.code(),
            agent: prepared.agent.clone(),
            entity: Some(format!("Task/{id}")),
            facts: format!(r#"{},"v":"{version}"}}"#, prepared.facts_head),
        }
    }

    /// Builds what this request's Task changes share, once its caller is known: called on
    /// the request's thread before a write is queued for the SQLite writer. Before a token
    /// is verified nothing is prepared, and `task_change` builds its record whole.
    pub fn prepare_task_changes(&self) {
        let _ = self.prepared_task_changes();
    }

    fn prepared_task_changes(&self) -> Option<&TaskChangeFacts> {
        let agent = self.agent()?;
        Some(self.task_changes.get_or_init(|| {
            // A record whose entity has no version: its facts are the change's without the
            // `v` key, which `StoredFacts` writes last of those a Task change has.
            let entity = AuditEntity::Resource {
                reference: String::new(),
                version: None,
            };
            let mut facts_head = self
                .record(
                    "update",
                    AuditOutcome::Success,
                    &StoredInstant::now(),
                    Some(entity),
                    None,
                )
                .facts;
            facts_head.pop();
            TaskChangeFacts {
                agent: Some(agent.search_key()),
                facts_head,
            }
        }))
    }

    /// An AuditEvent of this request, as the store keeps it: its search columns and the
    /// facts `expand` writes the rest of the resource from. A Task write's record is made on
    /// the SQLite writer's thread, inside its transaction, so this stays small: one short
    /// JSON object, no resource text.
    pub fn record(
        &self,
        subtype: &str,
        outcome: AuditOutcome,
        recorded: &StoredInstant,
        entity: Option<AuditEntity>,
        outcome_desc: Option<&str>,
    ) -> AuditRecord {
        let agent = self.agent();
        // Only a token without `fhirUser` is named by its `sub` (and `iss`).
        let by_subject = agent.filter(|a| a.fhir_user.is_none());
        let (version, query_type, query) = match &entity {
            Some(AuditEntity::Resource { version, .. }) => (version.as_deref(), None, None),
            Some(AuditEntity::Query {
                resource_type,
                query,
            }) => (None, Some(resource_type.as_str()), Some(query.as_str())),
            None => (None, None, None),
        };
        let facts = StoredFacts {
            node: Cow::Borrowed(&self.node),
            address: self.address.as_deref().map(Cow::Borrowed),
            fhir_user: agent
                .and_then(|a| a.fhir_user.as_deref())
                .map(Cow::Borrowed),
            subject: by_subject.map(|a| Cow::Borrowed(a.subject.as_str())),
            issuer: by_subject
                .and_then(|a| a.issuer.as_deref())
                .map(Cow::Borrowed),
            role: agent.map(|a| Cow::Borrowed(a.role)),
            version: version.map(Cow::Borrowed),
            query_type: query_type.map(Cow::Borrowed),
            query: query.map(Cow::Borrowed),
            description: outcome_desc.map(Cow::Borrowed),
            ..StoredFacts::default()
        };
        AuditRecord {
            type_code: TYPE_REST,
            recorded: recorded.clone(),
            subtype: subtype.to_string(),
            outcome: outcome.code(),
            agent: agent.map(AuditAgent::search_key),
            entity: entity.as_ref().and_then(AuditEntity::search_key),
            facts: facts.to_text(),
        }
    }
}

/// The agent of a request's AuditEvent, borrowed from a `RequestAudit` or a stored row.
#[derive(Debug, Clone, Copy)]
struct AgentRef<'a> {
    fhir_user: Option<&'a str>,
    issuer: Option<&'a str>,
    subject: &'a str,
    role: &'a str,
}

/// The JSON of an AuditEvent's `agent` entry for a request by `agent` (None: before any
/// token was verified) from `address`.
fn write_agent(out: &mut Vec<u8>, agent: Option<AgentRef<'_>>, address: Option<&str>) {
    out.extend_from_slice(
        br#"{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ParticipationType","code":"IRCP","display":"information recipient"}]},"who":{"#,
    );
    match agent {
        Some(AgentRef {
            fhir_user: Some(user),
            ..
        }) => {
            out.extend_from_slice(br#""reference":"#);
            write_json(out, &user);
        }
        Some(agent) => {
            out.extend_from_slice(br#""identifier":{"value":"#);
            write_json(out, &agent.subject);
            if let Some(issuer) = agent.issuer {
                out.extend_from_slice(br#","system":"#);
                write_json(out, &issuer);
            }
            out.push(b'}');
        }
        None => out.extend_from_slice(br#""display":"unauthenticated caller""#),
    }
    out.extend_from_slice(br#"},"requestor":true"#);
    if let Some(agent) = agent {
        out.extend_from_slice(br#","role":[{"text":"#);
        write_json(out, &agent.role);
        out.extend_from_slice(b"}]");
    }
    if let Some(address) = address {
        out.extend_from_slice(br#","network":{"address":"#);
        write_json(out, &address);
        out.extend_from_slice(br#","type":"2"}"#);
    }
    out.push(b'}');
}

/// What an AuditEvent is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditEntity {
    /// A resource (`Task/1`), at a version when one is known.
    Resource {
        reference: String,
        version: Option<String>,
    },
    /// A search: the resource type and the query string as the client sent it.
    Query {
        resource_type: String,
        query: String,
    },
}

impl AuditEntity {
    /// What `entity` search compares: the resource reference without its version.
    fn search_key(&self) -> Option<String> {
        match self {
            AuditEntity::Resource { reference, .. } => Some(reference.clone()),
            AuditEntity::Query { .. } => None,
        }
    }

    /// Writes what `serde_json` writes for `to_json`, without building a resource's as a
    /// `Value`.
    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            AuditEntity::Resource { reference, version } => {
                out.extend_from_slice(br#"{"what":{"reference":"#);
                match version {
                    Some(v) => write_json(out, &format_args!("{reference}/_history/{v}")),
                    None => write_json(out, reference),
                }
                out.extend_from_slice(
                    br#"},"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"2","display":"System Object"},"role":{"system":"http://terminology.hl7.org/CodeSystem/object-role","code":"4","display":"Domain Resource"}}"#,
                );
            }
            AuditEntity::Query { .. } => write_json(out, &self.to_json()),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            AuditEntity::Resource { reference, version } => {
                let reference = match version {
                    Some(v) => format!("{reference}/_history/{v}"),
                    None => reference.clone(),
                };
                json!({
                    "what": { "reference": reference },
                    "type": {
                        "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                        "code": "2",
                        "display": "System Object"
                    },
                    "role": {
                        "system": "http://terminology.hl7.org/CodeSystem/object-role",
                        "code": "4",
                        "display": "Domain Resource"
                    }
                })
            }
            AuditEntity::Query {
                resource_type,
                query,
            } => json!({
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                    "display": "System Object"
                },
                "role": {
                    "system": "http://terminology.hl7.org/CodeSystem/object-role",
                    "code": "24",
                    "display": "Query"
                },
                "description": format!("{resource_type}?{query}"),
                "query": base64::engine::general_purpose::STANDARD.encode(query.as_bytes()),
            }),
        }
    }
}

/// The code system of a delivery attempt's `type` and `subtype`: Baton's own, since no FHIR
/// code names "a notification was sent to an endpoint".
pub const DELIVERY_SYSTEM: &str = "https://baton.dev/fhir/CodeSystem/audit-event-type";
/// `AuditEvent.type` (and `subtype`) of a delivery attempt.
pub const TYPE_TRANSMIT: &str = "transmit";

/// What one delivery attempt did, for its AuditEvent. No header, secret or payload: only the
/// endpoint's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryFacts<'a> {
    pub node: &'a str,
    pub subscription: &'a str,
    /// `handshake`, `heartbeat` or `event-notification`.
    pub kind: &'a str,
    /// The first and last event numbers sent, for an event notification.
    pub events: Option<(i64, i64)>,
    /// `rest-hook` or `message`.
    pub channel: &'a str,
    pub endpoint_host: Option<&'a str>,
    pub duration_ms: u64,
    /// The channel's failure (`HTTP 503`, `connection refused…`); None when delivered.
    pub error: Option<&'a str>,
}

/// The AuditEvent of one delivery attempt (the node is the agent, the Subscription the
/// entity, the attempt's facts its details), as the store keeps it. The hub records one
/// per attempt, thousands a second under load, all through the one SQLite writer beside the
/// Task writes: the stored facts are a few dozen bytes.
pub fn delivery_attempt(facts: &DeliveryFacts<'_>, recorded: &StoredInstant) -> AuditRecord {
    let outcome = if facts.error.is_some() {
        AuditOutcome::SeriousFailure
    } else {
        AuditOutcome::Success
    };
    let stored = StoredFacts {
        node: Cow::Borrowed(facts.node),
        channel: Some(Cow::Borrowed(facts.channel)),
        endpoint_host: facts.endpoint_host.map(Cow::Borrowed),
        duration_ms: Some(facts.duration_ms),
        events: facts.events,
        description: facts.error.map(Cow::Borrowed),
        ..StoredFacts::default()
    };
    AuditRecord {
        type_code: TYPE_TRANSMIT,
        recorded: recorded.clone(),
        subtype: facts.kind.to_string(),
        outcome: outcome.code(),
        agent: None,
        entity: Some(format!("Subscription/{}", facts.subscription)),
        facts: stored.to_text(),
    }
}

/// Writes a delivery attempt's AuditEvent. The keys come in the order of the `Value` form
/// kept in the tests (`delivery_value`), and
/// `tests::delivery_attempts_expand_to_what_serde_json_writes_for_their_value` holds the
/// two together.
fn write_delivery_event(
    out: &mut Vec<u8>,
    id: &str,
    recorded: &str,
    outcome: &str,
    facts: &DeliveryFacts<'_>,
) {
    start_event(
        out,
        id,
        recorded,
        (DELIVERY_SYSTEM, TYPE_TRANSMIT, "Notification sent"),
        (DELIVERY_SYSTEM, facts.kind),
    );
    out.extend_from_slice(br#","action":"E","recorded":"#);
    write_json(out, &recorded);
    out.extend_from_slice(br#","outcome":"#);
    write_json(out, &outcome);
    out.extend_from_slice(br#","agent":[{"who":{"display":"#);
    write_json(out, &facts.node);
    out.extend_from_slice(br#"},"requestor":false}],"source":{"observer":{"display":"#);
    write_json(out, &facts.node);
    out.extend_from_slice(
        br#"},"type":[{"system":"http://terminology.hl7.org/CodeSystem/security-source-type","code":"4","display":"Application Server"}]},"entity":[{"what":{"reference":"#,
    );
    write_json(out, &format_args!("Subscription/{}", facts.subscription));
    out.extend_from_slice(
        br#"},"type":{"system":"http://terminology.hl7.org/CodeSystem/audit-entity-type","code":"2","display":"System Object"},"detail":["#,
    );
    let detail = |out: &mut Vec<u8>, first: bool, kind: &str, value: &dyn std::fmt::Display| {
        if !first {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"type":"#);
        write_json(out, &kind);
        out.extend_from_slice(br#","valueString":"#);
        write_json(out, &format_args!("{value}"));
        out.push(b'}');
    };
    detail(out, true, "notification-type", &facts.kind);
    detail(out, false, "channel", &facts.channel);
    detail(out, false, "duration-ms", &facts.duration_ms);
    if let Some((from, to)) = facts.events {
        detail(out, false, "events", &format_args!("{from}..{to}"));
    }
    if let Some(host) = facts.endpoint_host {
        detail(out, false, "endpoint-host", &host);
    }
    if let Some(error) = facts.error {
        detail(out, false, "error", &error);
    }
    out.extend_from_slice(b"]}]");
    if let Some(error) = facts.error {
        out.extend_from_slice(br#","outcomeDesc":"#);
        write_json(out, &error);
    }
    out.push(b'}');
}

/// A request's AuditEvent, as `write_request_event` writes it.
struct RequestEvent<'a> {
    node: &'a str,
    address: Option<&'a str>,
    agent: Option<AgentRef<'a>>,
    subtype: &'a str,
    outcome: &'a str,
    recorded: &'a str,
    entity: Option<&'a AuditEntity>,
    outcome_desc: Option<&'a str>,
}

/// Writes a request's AuditEvent. The keys come in the order of `record_value` (the
/// reference form, kept in the tests), and
/// `tests::records_expand_to_what_serde_json_writes_for_their_value` holds the two together.
fn write_request_event(out: &mut Vec<u8>, id: &str, event: &RequestEvent<'_>) {
    start_event(
        out,
        id,
        event.recorded,
        (TYPE_SYSTEM, TYPE_REST, "Restful Operation"),
        (SUBTYPE_SYSTEM, event.subtype),
    );
    out.extend_from_slice(br#","action":"#);
    write_json(out, &action_of(event.subtype));
    out.extend_from_slice(br#","recorded":"#);
    write_json(out, &event.recorded);
    out.extend_from_slice(br#","outcome":"#);
    write_json(out, &event.outcome);
    out.extend_from_slice(br#","agent":["#);
    write_agent(out, event.agent, event.address);
    out.extend_from_slice(br#"],"source":{"observer":{"display":"#);
    write_json(out, &event.node);
    out.extend_from_slice(
        br#"},"type":[{"system":"http://terminology.hl7.org/CodeSystem/security-source-type","code":"4","display":"Application Server"}]}"#,
    );
    if let Some(desc) = event.outcome_desc {
        out.extend_from_slice(br#","outcomeDesc":"#);
        write_json(out, &desc);
    }
    if let Some(entity) = event.entity {
        out.extend_from_slice(br#","entity":["#);
        entity.write_json(out);
        out.push(b']');
    }
    out.push(b'}');
}

/// The CRUDE action of an interaction.
fn action_of(subtype: &str) -> &'static str {
    match subtype {
        "create" => "C",
        "update" | "patch" => "U",
        "delete" => "D",
        "read" | "vread" | "search-type" | "search-system" | "history-instance"
        | "history-type" => "R",
        _ => "E",
    }
}

/// One AuditEvent as the store keeps it: the columns its search reads, and the rest of its
/// facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// `AuditEvent.type` code: `rest` for requests, `transmit` for delivery attempts.
    pub type_code: &'static str,
    pub recorded: StoredInstant,
    pub subtype: String,
    pub outcome: &'static str,
    /// The agent's search key (see `AuditAgent::search_key`).
    pub agent: Option<String>,
    /// The entity's reference without its version.
    pub entity: Option<String>,
    /// The facts the columns do not hold (`StoredFacts`, compact JSON), stored in the row's
    /// `resource` column; `expand` writes the AuditEvent from them and the columns.
    pub facts: String,
}

/// How the stored facts of an AuditEvent begin (the form's number is always the first key),
/// where a row written before they were stored begins with `{"resourceType":`.
pub const FACTS_START: &str = r#"{"f":"#;

/// The facts of an AuditEvent that its row's columns do not hold, as stored. Short keys: the
/// object is written for every audited request and delivery attempt. A key is left out when
/// its fact is absent.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredFacts<'a> {
    /// The form's number (1), first so that a row's text tells its form (`FACTS_START`).
    #[serde(rename = "f")]
    form: Form,
    /// The node that recorded it: `source.observer`, and a delivery attempt's agent.
    #[serde(rename = "n", borrow)]
    node: Cow<'a, str>,
    /// The caller's address (`agent.network.address`).
    #[serde(rename = "a", borrow, default, skip_serializing_if = "Option::is_none")]
    address: Option<Cow<'a, str>>,
    /// The caller's `fhirUser`.
    #[serde(rename = "u", borrow, default, skip_serializing_if = "Option::is_none")]
    fhir_user: Option<Cow<'a, str>>,
    /// The caller's `sub`, for a token without `fhirUser`.
    #[serde(rename = "s", borrow, default, skip_serializing_if = "Option::is_none")]
    subject: Option<Cow<'a, str>>,
    /// The caller's `iss`, for a token without `fhirUser`.
    #[serde(rename = "i", borrow, default, skip_serializing_if = "Option::is_none")]
    issuer: Option<Cow<'a, str>>,
    /// The caller's role; present whenever a token was verified.
    #[serde(rename = "r", borrow, default, skip_serializing_if = "Option::is_none")]
    role: Option<Cow<'a, str>>,
    /// The version of the entity the `entity` column names.
    #[serde(rename = "v", borrow, default, skip_serializing_if = "Option::is_none")]
    version: Option<Cow<'a, str>>,
    /// A search's resource type; present for a query entity.
    #[serde(rename = "t", borrow, default, skip_serializing_if = "Option::is_none")]
    query_type: Option<Cow<'a, str>>,
    /// A search's query string as the client sent it.
    #[serde(rename = "q", borrow, default, skip_serializing_if = "Option::is_none")]
    query: Option<Cow<'a, str>>,
    /// `outcomeDesc`: why a request failed, the operation, or a delivery attempt's error.
    #[serde(rename = "d", borrow, default, skip_serializing_if = "Option::is_none")]
    description: Option<Cow<'a, str>>,
    /// A delivery attempt's channel; present for every delivery attempt.
    #[serde(rename = "c", borrow, default, skip_serializing_if = "Option::is_none")]
    channel: Option<Cow<'a, str>>,
    #[serde(rename = "h", borrow, default, skip_serializing_if = "Option::is_none")]
    endpoint_host: Option<Cow<'a, str>>,
    #[serde(rename = "ms", default, skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
    /// The first and last event numbers a notification carried.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    events: Option<(i64, i64)>,
}

/// The number of the stored facts' form; a row with another number is refused when read
/// rather than served wrong.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
struct Form;

impl From<Form> for u8 {
    fn from(_: Form) -> u8 {
        1
    }
}

impl TryFrom<u8> for Form {
    type Error = String;

    fn try_from(number: u8) -> Result<Form, String> {
        match number {
            1 => Ok(Form),
            other => Err(format!(
                "stored AuditEvent facts of form {other} are not known"
            )),
        }
    }
}

impl StoredFacts<'_> {
    fn to_text(&self) -> String {
        // Strings and numbers only: writing them cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One stored AuditEvent row, as `expand` reads it.
#[derive(Debug, Clone, Copy)]
pub struct StoredEvent<'a> {
    /// The AuditEvent's id (`store::audit_sql::event_id`).
    pub id: &'a str,
    pub type_code: &'a str,
    pub recorded: &'a str,
    pub subtype: &'a str,
    pub outcome: &'a str,
    /// The entity column: the reference without its version.
    pub entity: Option<&'a str>,
    /// The stored facts (`AuditRecord::facts`).
    pub facts: &'a str,
}

/// The AuditEvent a row's columns and facts describe, as served (with its id). Fails only
/// on facts that are not the stored form.
pub fn expand(row: &StoredEvent<'_>) -> Result<String, serde_json::Error> {
    let facts: StoredFacts<'_> = serde_json::from_str(row.facts)?;
    let mut out = Vec::with_capacity(1024);
    if row.type_code == TYPE_TRANSMIT {
        let subscription = row.entity.unwrap_or_default();
        let delivery = DeliveryFacts {
            node: &facts.node,
            subscription: subscription
                .strip_prefix("Subscription/")
                .unwrap_or(subscription),
            kind: row.subtype,
            events: facts.events,
            channel: facts.channel.as_deref().unwrap_or_default(),
            endpoint_host: facts.endpoint_host.as_deref(),
            duration_ms: facts.duration_ms.unwrap_or_default(),
            error: facts.description.as_deref(),
        };
        write_delivery_event(&mut out, row.id, row.recorded, row.outcome, &delivery);
    } else {
        let entity = match (&facts.query_type, row.entity) {
            (Some(resource_type), _) => Some(AuditEntity::Query {
                resource_type: resource_type.to_string(),
                query: facts.query.as_deref().unwrap_or_default().to_string(),
            }),
            (None, Some(reference)) => Some(AuditEntity::Resource {
                reference: reference.to_string(),
                version: facts.version.as_deref().map(str::to_string),
            }),
            (None, None) => None,
        };
        let agent = facts.role.as_deref().map(|role| AgentRef {
            fhir_user: facts.fhir_user.as_deref(),
            issuer: facts.issuer.as_deref(),
            subject: facts.subject.as_deref().unwrap_or_default(),
            role,
        });
        let event = RequestEvent {
            node: &facts.node,
            address: facts.address.as_deref(),
            agent,
            subtype: row.subtype,
            outcome: row.outcome,
            recorded: row.recorded,
            entity: entity.as_ref(),
            outcome_desc: facts.description.as_deref(),
        };
        write_request_event(&mut out, row.id, &event);
    }
    // Only `&str`s and numbers went in, each written by serde_json.
    Ok(String::from_utf8(out).unwrap_or_default())
}

tokio::task_local! {
    static REQUEST: Arc<RequestAudit>;
}

/// The audit facts of the request being served, if auditing is on and one is.
pub fn current() -> Option<Arc<RequestAudit>> {
    REQUEST.try_with(Arc::clone).ok()
}

/// Notes the verified caller of the request being served (the first one wins).
pub fn note_principal(principal: &Principal) {
    let _ = REQUEST.try_with(|r| r.agent.set(AuditAgent::of(principal)));
}

/// Runs `work` with `audit` as the request's audit facts (none: nothing is audited).
pub async fn in_request<F: Future>(audit: Option<Arc<RequestAudit>>, work: F) -> F::Output {
    match audit {
        Some(audit) => REQUEST.scope(audit, work).await,
        None => work.await,
    }
}

/// Writes the start of an AuditEvent as text, up to its `subtype`: `resourceType`, `id`,
/// `meta`, `type` (system, code, display) and one `subtype` (system, code).
fn start_event(
    out: &mut Vec<u8>,
    id: &str,
    recorded: &str,
    (type_system, type_code, type_display): (&str, &str, &str),
    (subtype_system, subtype_code): (&str, &str),
) {
    out.extend_from_slice(br#"{"resourceType":"AuditEvent","id":"#);
    write_json(out, &id);
    out.extend_from_slice(br#","meta":{"versionId":"1","lastUpdated":"#);
    write_json(out, &recorded);
    out.extend_from_slice(br#"},"type":{"system":"#);
    write_json(out, &type_system);
    out.extend_from_slice(br#","code":"#);
    write_json(out, &type_code);
    out.extend_from_slice(br#","display":"#);
    write_json(out, &type_display);
    out.extend_from_slice(br#"},"subtype":[{"system":"#);
    write_json(out, &subtype_system);
    out.extend_from_slice(br#","code":"#);
    write_json(out, &subtype_code);
    out.extend_from_slice(b"}]");
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The id the tests' rows are read with.
    const ID: &str = "7-20260102030405006";

    /// The AuditEvent the row of `record` is served as.
    fn served(record: &AuditRecord) -> String {
        expand(&StoredEvent {
            id: ID,
            type_code: record.type_code,
            recorded: record.recorded.as_str(),
            subtype: &record.subtype,
            outcome: record.outcome,
            entity: record.entity.as_deref(),
            facts: &record.facts,
        })
        .unwrap()
    }

    /// The AuditEvent of a request, built as a `Value` (the form it had before it was
    /// written straight to bytes, and before its facts were stored instead of it).
    fn record_value(
        audit: &RequestAudit,
        subtype: &str,
        outcome: AuditOutcome,
        recorded: &StoredInstant,
        entity: Option<&AuditEntity>,
        outcome_desc: Option<&str>,
    ) -> Value {
        let agent = audit.agent();
        let mut who = json!({});
        if let Some(agent) = agent {
            match &agent.fhir_user {
                Some(user) => who["reference"] = json!(user),
                None => {
                    let mut identifier = json!({ "value": agent.subject });
                    if let Some(issuer) = &agent.issuer {
                        identifier["system"] = json!(issuer);
                    }
                    who["identifier"] = identifier;
                }
            }
        } else {
            who["display"] = json!("unauthenticated caller");
        }
        let mut agent_json = json!({
            "type": { "coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                "code": "IRCP",
                "display": "information recipient"
            }]},
            "who": who,
            "requestor": true,
        });
        if let Some(agent) = agent {
            agent_json["role"] = json!([{ "text": agent.role }]);
        }
        if let Some(address) = &audit.address {
            agent_json["network"] = json!({ "address": address, "type": "2" });
        }
        let mut resource = json!({
            "resourceType": "AuditEvent",
            "id": ID,
            "meta": { "versionId": "1", "lastUpdated": recorded.as_str() },
            "type": { "system": TYPE_SYSTEM, "code": TYPE_REST, "display": "Restful Operation" },
            "subtype": [{ "system": SUBTYPE_SYSTEM, "code": subtype }],
            "action": action_of(subtype),
            "recorded": recorded.as_str(),
            "outcome": outcome.code(),
            "agent": [agent_json],
            "source": {
                "observer": { "display": audit.node },
                "type": [{
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server"
                }]
            },
        });
        if let Some(desc) = outcome_desc {
            resource["outcomeDesc"] = json!(desc);
        }
        if let Some(entity) = entity {
            resource["entity"] = json!([entity.to_json()]);
        }
        resource
    }

    /// A delivery attempt's AuditEvent as the `Value` it was first built as: what its row
    /// must be served as.
    fn delivery_value(facts: &DeliveryFacts<'_>, recorded: &StoredInstant) -> Value {
        let outcome = if facts.error.is_some() {
            AuditOutcome::SeriousFailure
        } else {
            AuditOutcome::Success
        };
        let mut details = vec![
            json!({ "type": "notification-type", "valueString": facts.kind }),
            json!({ "type": "channel", "valueString": facts.channel }),
            json!({ "type": "duration-ms", "valueString": facts.duration_ms.to_string() }),
        ];
        if let Some((from, to)) = facts.events {
            details.push(json!({ "type": "events", "valueString": format!("{from}..{to}") }));
        }
        if let Some(host) = facts.endpoint_host {
            details.push(json!({ "type": "endpoint-host", "valueString": host }));
        }
        if let Some(error) = facts.error {
            details.push(json!({ "type": "error", "valueString": error }));
        }
        let subscription = format!("Subscription/{}", facts.subscription);
        let mut resource = json!({
            "resourceType": "AuditEvent",
            "id": ID,
            "meta": { "versionId": "1", "lastUpdated": recorded.as_str() },
            "type": { "system": DELIVERY_SYSTEM, "code": TYPE_TRANSMIT, "display": "Notification sent" },
            "subtype": [{ "system": DELIVERY_SYSTEM, "code": facts.kind }],
            "action": "E",
            "recorded": recorded.as_str(),
            "outcome": outcome.code(),
            "agent": [{
                "who": { "display": facts.node },
                "requestor": false,
            }],
            "source": {
                "observer": { "display": facts.node },
                "type": [{
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server"
                }]
            },
            "entity": [{
                "what": { "reference": subscription },
                "type": {
                    "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "code": "2",
                    "display": "System Object"
                },
                "detail": details,
            }],
        });
        if let Some(error) = facts.error {
            resource["outcomeDesc"] = json!(error);
        }
        resource
    }

    fn text() -> impl Strategy<Value = String> {
        // Quotes, backslashes, control characters and non-ASCII: what escaping must get right.
        proptest::string::string_regex(r#"[a-zA-Z0-9/\\"\x00-\x1fé€😀 .:=&?-]{0,24}"#).unwrap()
    }

    proptest! {
        #[test]
        fn records_expand_to_what_serde_json_writes_for_their_value(
            node in text(),
            address in proptest::option::of(text()),
            agent in proptest::option::of((
                proptest::option::of(text()),
                proptest::option::of(text()),
                text(),
                prop_oneof![Just("admin"), Just("practitioner"), Just("auditor")],
            )),
            subtype in prop_oneof![
                Just("create".to_string()), Just("patch".to_string()), Just("search-type".to_string()), text()
            ],
            outcome in prop_oneof![
                Just(AuditOutcome::Success), Just(AuditOutcome::MinorFailure), Just(AuditOutcome::SeriousFailure)
            ],
            entity in proptest::option::of(prop_oneof![
                (text(), proptest::option::of(text()))
                    .prop_map(|(reference, version)| AuditEntity::Resource { reference, version }),
                (text(), text())
                    .prop_map(|(resource_type, query)| AuditEntity::Query { resource_type, query }),
            ]),
            outcome_desc in proptest::option::of(text()),
        ) {
            let audit = RequestAudit::new(node, address, false);
            if let Some((fhir_user, issuer, subject, role)) = agent {
                audit.agent.set(AuditAgent { fhir_user, issuer, subject, role }).unwrap();
            }
            let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
            let record = audit.record(&subtype, outcome, &now, entity.clone(), outcome_desc.as_deref());
            prop_assert!(record.facts.starts_with(FACTS_START), "{}", record.facts);
            let expected = record_value(
                &audit, &subtype, outcome, &now, entity.as_ref(), outcome_desc.as_deref(),
            );
            prop_assert_eq!(served(&record), expected.to_string());
        }
    }

    proptest! {
        #[test]
        fn delivery_attempts_expand_to_what_serde_json_writes_for_their_value(
            node in text(),
            subscription in text(),
            kind in prop_oneof![Just("handshake".to_string()), Just("event-notification".to_string()), text()],
            events in proptest::option::of((any::<i64>(), any::<i64>())),
            channel in text(),
            endpoint_host in proptest::option::of(text()),
            duration_ms in any::<u64>(),
            error in proptest::option::of(text()),
        ) {
            let facts = DeliveryFacts {
                node: &node,
                subscription: &subscription,
                kind: &kind,
                events,
                channel: &channel,
                endpoint_host: endpoint_host.as_deref(),
                duration_ms,
                error: error.as_deref(),
            };
            let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
            let record = delivery_attempt(&facts, &now);
            prop_assert!(record.facts.starts_with(FACTS_START), "{}", record.facts);
            prop_assert_eq!(served(&record), delivery_value(&facts, &now).to_string());
        }
    }

    fn request() -> RequestAudit {
        let audit = RequestAudit::new("node-1".into(), Some("10.0.0.1".into()), false);
        audit
            .agent
            .set(AuditAgent {
                fhir_user: Some("Practitioner/p1".into()),
                issuer: None,
                subject: "p1".into(),
                role: "practitioner",
            })
            .unwrap();
        audit
    }

    #[test]
    fn a_task_change_names_the_version_the_agent_and_the_node() {
        let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
        let id = TaskId::parse("t1").unwrap();
        let record = request().task_change(&id, Version::FIRST, Interaction::Create, &now);
        let event: Value = serde_json::from_str(&served(&record)).unwrap();
        assert_eq!(event["id"], ID);
        assert_eq!(event["subtype"][0]["code"], "create");
        assert_eq!(event["action"], "C");
        assert_eq!(event["outcome"], "0");
        assert_eq!(
            event["entity"][0]["what"]["reference"],
            "Task/t1/_history/1"
        );
        assert_eq!(event["agent"][0]["who"]["reference"], "Practitioner/p1");
        assert_eq!(event["agent"][0]["network"]["address"], "10.0.0.1");
        assert_eq!(event["source"]["observer"]["display"], "node-1");
        assert_eq!(record.entity.as_deref(), Some("Task/t1"));
        assert_eq!(record.agent.as_deref(), Some("Practitioner/p1"));
    }

    #[test]
    fn what_a_task_change_stores_is_its_facts_not_its_resource() {
        let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
        let id = TaskId::parse("0193f1a2-7c3e-7d41-9a55-2f1e8b6c0d11").unwrap();
        let record = request().task_change(&id, Version::FIRST, Interaction::Create, &now);
        assert_eq!(
            record.facts,
            r#"{"f":1,"n":"node-1","a":"10.0.0.1","u":"Practitioner/p1","r":"practitioner","v":"1"}"#
        );
        // What is served is the whole resource, ten times the size.
        assert!(served(&record).len() > 8 * record.facts.len());
    }

    proptest! {
        #[test]
        fn a_prepared_task_change_stores_what_record_stores(
            node in text(),
            address in proptest::option::of(text()),
            fhir_user in proptest::option::of(text()),
            issuer in proptest::option::of(text()),
            subject in text(),
            version in 1u64..1_000_000,
            patch in any::<bool>(),
        ) {
            let audit = RequestAudit::new(node, address, patch);
            audit.agent.set(AuditAgent { fhir_user, issuer, subject, role: "admin" }).unwrap();
            audit.prepare_task_changes();
            let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
            let id = TaskId::parse("t1").unwrap();
            let version: Version = version.to_string().parse().unwrap();
            for (interaction, subtype) in [
                (Interaction::Create, "create"),
                (Interaction::Update, if patch { "patch" } else { "update" }),
                (Interaction::Delete, "delete"),
            ] {
                let entity = AuditEntity::Resource {
                    reference: "Task/t1".into(),
                    version: Some(version.to_string()),
                };
                let whole = audit.record(subtype, AuditOutcome::Success, &now, Some(entity), None);
                prop_assert_eq!(audit.task_change(&id, version, interaction, &now), whole);
            }
        }
    }

    #[test]
    fn a_search_keeps_its_query_in_base64() {
        let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
        let entity = AuditEntity::Query {
            resource_type: "Task".into(),
            query: "status=ready".into(),
        };
        let record = request().record(
            "search-type",
            AuditOutcome::Success,
            &now,
            Some(entity),
            None,
        );
        let event: Value = serde_json::from_str(&served(&record)).unwrap();
        assert_eq!(event["entity"][0]["query"], "c3RhdHVzPXJlYWR5");
        assert_eq!(event["entity"][0]["description"], "Task?status=ready");
        assert_eq!(event["action"], "R");
        assert_eq!(record.entity, None);
    }

    #[test]
    fn facts_of_an_unknown_form_or_not_json_are_refused_not_guessed_at() {
        for facts in [r#"{"f":2,"n":"node-1"}"#, r#"{"f":1}"#, "not json"] {
            let row = StoredEvent {
                id: ID,
                type_code: TYPE_REST,
                recorded: "2026-01-02T03:04:05.006Z",
                subtype: "read",
                outcome: "0",
                entity: None,
                facts,
            };
            assert!(expand(&row).is_err(), "{facts}");
        }
    }
}
