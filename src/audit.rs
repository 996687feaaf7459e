//! The audit trail: who did what to which Task or Subscription, as FHIR `AuditEvent`s in the
//! shapes of the Basic Audit Log Patterns IG (BALP).
//!
//! The API opens a `RequestAudit` for every FHIR request (a task-local, like the trace
//! context): the node, the caller's network address, and, once the bearer token is verified,
//! the agent. A Task write's AuditEvent is built by the store from it and written beside the
//! change event, so the change and its AuditEvent commit together; reads, searches,
//! Subscription changes and refusals are recorded by the API after the response is known.
//! The builders here are pure: they take the time and the facts, and never see a token, a
//! secret or a request header.

use std::future::Future;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
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
    /// The AuditEvent `agent` entry of the verified caller, written once (`record`).
    agent_json: OnceLock<Vec<u8>>,
}

impl RequestAudit {
    pub fn new(node: String, address: Option<String>, patch: bool) -> RequestAudit {
        RequestAudit {
            node,
            address,
            patch,
            agent: OnceLock::new(),
            agent_json: OnceLock::new(),
        }
    }

    pub fn agent(&self) -> Option<&AuditAgent> {
        self.agent.get()
    }

    /// The AuditEvent of one Task version a write stored, built inside its transaction.
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
        let entity = AuditEntity::Resource {
            reference: format!("Task/{id}"),
            version: Some(version.to_string()),
        };
        self.record(subtype, AuditOutcome::Success, recorded, Some(entity), None)
    }

    /// An AuditEvent of this request.
    ///
    /// Written straight to JSON text rather than built as a `Value` and serialised: a Task
    /// write's AuditEvent is built on the SQLite writer's thread, inside its transaction,
    /// and the `Value` form was ~15 % of that thread's time on transaction Bundles
    /// (BENCHMARKS.md, issue 17). The keys come in the order of `record_value` (the
    /// reference form, kept in the tests), and
    /// `tests::records_are_written_as_serde_json_writes_their_value` holds the two together.
    pub fn record(
        &self,
        subtype: &str,
        outcome: AuditOutcome,
        recorded: &StoredInstant,
        entity: Option<AuditEntity>,
        outcome_desc: Option<&str>,
    ) -> AuditRecord {
        let agent = self.agent();
        let mut out = Vec::with_capacity(1024);
        start_event(
            &mut out,
            recorded,
            (TYPE_SYSTEM, TYPE_REST, "Restful Operation"),
            (SUBTYPE_SYSTEM, subtype),
        );
        out.extend_from_slice(br#","action":"#);
        write_json(&mut out, &action_of(subtype));
        out.extend_from_slice(br#","recorded":"#);
        write_json(&mut out, &recorded.as_str());
        out.extend_from_slice(br#","outcome":"#);
        write_json(&mut out, &outcome.code());
        out.extend_from_slice(br#","agent":["#);
        match agent {
            // The agent is set once and never changes, so its JSON is written once for all
            // the AuditEvents of the request (a transaction Bundle has one per entry).
            Some(_) => out.extend_from_slice(
                self.agent_json
                    .get_or_init(|| agent_json(agent, self.address.as_deref())),
            ),
            None => out.extend_from_slice(&agent_json(None, self.address.as_deref())),
        }
        out.extend_from_slice(br#"],"source":{"observer":{"display":"#);
        write_json(&mut out, &self.node);
        out.extend_from_slice(
            br#"},"type":[{"system":"http://terminology.hl7.org/CodeSystem/security-source-type","code":"4","display":"Application Server"}]}"#,
        );
        if let Some(desc) = outcome_desc {
            out.extend_from_slice(br#","outcomeDesc":"#);
            write_json(&mut out, &desc);
        }
        let entity_key = entity.as_ref().and_then(AuditEntity::search_key);
        if let Some(entity) = &entity {
            out.extend_from_slice(br#","entity":["#);
            entity.write_json(&mut out);
            out.push(b']');
        }
        out.push(b'}');
        AuditRecord {
            type_code: TYPE_REST,
            recorded: recorded.clone(),
            subtype: subtype.to_string(),
            outcome: outcome.code(),
            agent: agent.map(AuditAgent::search_key),
            entity: entity_key,
            // Only `&str`s and `Value`s went in, each written by serde_json.
            resource: String::from_utf8(out).unwrap_or_default(),
        }
    }
}

/// The JSON of an AuditEvent's `agent` entry for a request by `agent` (None: before any
/// token was verified) from `address`.
fn agent_json(agent: Option<&AuditAgent>, address: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(384);
    out.extend_from_slice(
        br#"{"type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ParticipationType","code":"IRCP","display":"information recipient"}]},"who":{"#,
    );
    match agent {
        Some(AuditAgent {
            fhir_user: Some(user),
            ..
        }) => {
            out.extend_from_slice(br#""reference":"#);
            write_json(&mut out, user);
        }
        Some(agent) => {
            out.extend_from_slice(br#""identifier":{"value":"#);
            write_json(&mut out, &agent.subject);
            if let Some(issuer) = &agent.issuer {
                out.extend_from_slice(br#","system":"#);
                write_json(&mut out, issuer);
            }
            out.push(b'}');
        }
        None => out.extend_from_slice(br#""display":"unauthenticated caller""#),
    }
    out.extend_from_slice(br#"},"requestor":true"#);
    if let Some(agent) = agent {
        out.extend_from_slice(br#","role":[{"text":"#);
        write_json(&mut out, &agent.role);
        out.extend_from_slice(b"}]");
    }
    if let Some(address) = address {
        out.extend_from_slice(br#","network":{"address":"#);
        write_json(&mut out, &address);
        out.extend_from_slice(br#","type":"2"}"#);
    }
    out.push(b'}');
    out
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
    /// `Value` (a Task write's AuditEvent has one; see `RequestAudit::record`).
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
    pub duration_ms: u128,
    /// The channel's failure (`HTTP 503`, `connection refused…`); None when delivered.
    pub error: Option<&'a str>,
}

/// The AuditEvent of one delivery attempt: the node is the agent, the Subscription the
/// entity, the attempt's facts its details.
///
/// Written straight to JSON text, as `RequestAudit::record` writes a request's: the hub
/// records one per attempt, thousands a second under load. The keys come in the order of
/// the `Value` form kept in the tests (`delivery_value`), and
/// `tests::delivery_attempts_are_written_as_serde_json_writes_their_value` holds the two
/// together.
pub fn delivery_attempt(facts: &DeliveryFacts<'_>, recorded: &StoredInstant) -> AuditRecord {
    let outcome = if facts.error.is_some() {
        AuditOutcome::SeriousFailure
    } else {
        AuditOutcome::Success
    };
    let subscription = format!("Subscription/{}", facts.subscription);
    let mut out = Vec::with_capacity(1024);
    start_event(
        &mut out,
        recorded,
        (DELIVERY_SYSTEM, TYPE_TRANSMIT, "Notification sent"),
        (DELIVERY_SYSTEM, facts.kind),
    );
    out.extend_from_slice(br#","action":"E","recorded":"#);
    write_json(&mut out, &recorded.as_str());
    out.extend_from_slice(br#","outcome":"#);
    write_json(&mut out, &outcome.code());
    out.extend_from_slice(br#","agent":[{"who":{"display":"#);
    write_json(&mut out, &facts.node);
    out.extend_from_slice(br#"},"requestor":false}],"source":{"observer":{"display":"#);
    write_json(&mut out, &facts.node);
    out.extend_from_slice(
        br#"},"type":[{"system":"http://terminology.hl7.org/CodeSystem/security-source-type","code":"4","display":"Application Server"}]},"entity":[{"what":{"reference":"#,
    );
    write_json(&mut out, &subscription);
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
    detail(&mut out, true, "notification-type", &facts.kind);
    detail(&mut out, false, "channel", &facts.channel);
    detail(&mut out, false, "duration-ms", &facts.duration_ms);
    if let Some((from, to)) = facts.events {
        detail(&mut out, false, "events", &format_args!("{from}..{to}"));
    }
    if let Some(host) = facts.endpoint_host {
        detail(&mut out, false, "endpoint-host", &host);
    }
    if let Some(error) = facts.error {
        detail(&mut out, false, "error", &error);
    }
    out.extend_from_slice(b"]}]");
    if let Some(error) = facts.error {
        out.extend_from_slice(br#","outcomeDesc":"#);
        write_json(&mut out, &error);
    }
    out.push(b'}');
    AuditRecord {
        type_code: TYPE_TRANSMIT,
        recorded: recorded.clone(),
        subtype: facts.kind.to_string(),
        outcome: outcome.code(),
        agent: None,
        entity: Some(subscription),
        // Only `&str`s and numbers went in, each written by serde_json.
        resource: String::from_utf8(out).unwrap_or_default(),
    }
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

/// One AuditEvent as the store keeps it: the resource and the columns its search reads.
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
    /// The AuditEvent, compact JSON.
    pub resource: String,
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

/// Writes the start of an AuditEvent as text, up to its `subtype`: `resourceType`, `meta`,
/// `type` (system, code, display) and one `subtype` (system, code). No `id`: the store derives
/// it from the row (`store::audit_sql::event_id`) and writes it in right after
/// `resourceType` when the AuditEvent is read.
fn start_event(
    out: &mut Vec<u8>,
    recorded: &StoredInstant,
    (type_system, type_code, type_display): (&str, &str, &str),
    (subtype_system, subtype_code): (&str, &str),
) {
    out.extend_from_slice(
        br#"{"resourceType":"AuditEvent","meta":{"versionId":"1","lastUpdated":"#,
    );
    write_json(out, &recorded.as_str());
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

    /// The AuditEvent `record` writes, built as a `Value` (the form it had before it was
    /// written straight to bytes), with the id `record` chose.
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

    /// A delivery attempt's AuditEvent as the `Value` it was first built as: what
    /// `delivery_attempt` must write.
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
        fn records_are_written_as_serde_json_writes_their_value(
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
            twice in any::<bool>(),
        ) {
            let audit = RequestAudit::new(node, address, false);
            if let Some((fhir_user, issuer, subject, role)) = agent {
                audit.agent.set(AuditAgent { fhir_user, issuer, subject, role }).unwrap();
            }
            let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
            // The second record of a request reuses the agent's JSON written by the first.
            let rounds = if twice { 2 } else { 1 };
            for _ in 0..rounds {
                let record = audit.record(
                    &subtype, outcome, &now, entity.clone(), outcome_desc.as_deref(),
                );
                let expected = record_value(
                    &audit, &subtype, outcome, &now, entity.as_ref(),
                    outcome_desc.as_deref(),
                );
                prop_assert_eq!(&record.resource, &expected.to_string());
            }
        }
    }

    proptest! {
        #[test]
        fn delivery_attempts_are_written_as_serde_json_writes_their_value(
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
                duration_ms: u128::from(duration_ms),
                error: error.as_deref(),
            };
            let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
            let record = delivery_attempt(&facts, &now);
            prop_assert_eq!(&record.resource, &delivery_value(&facts, &now).to_string());
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
    fn every_audit_event_leaves_the_place_of_its_id_where_the_store_writes_it() {
        use crate::store::audit_sql::{AuditRow, RESOURCE_START};
        let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
        let id = TaskId::parse("t1").unwrap();
        let facts = DeliveryFacts {
            node: "node-1",
            subscription: "s1",
            kind: "event-notification",
            events: Some((1, 2)),
            channel: "rest-hook",
            endpoint_host: Some("example.org"),
            duration_ms: 3,
            error: None,
        };
        for record in [
            request().task_change(&id, Version::FIRST, Interaction::Create, &now),
            delivery_attempt(&facts, &now),
        ] {
            assert!(
                record.resource.starts_with(RESOURCE_START),
                "{}",
                record.resource
            );
            let row = AuditRow {
                seq: 7,
                recorded: now.as_str().to_string(),
                resource: record.resource,
                legacy_id: None,
            };
            let served: Value = serde_json::from_str(&row.into_resource()).unwrap();
            assert_eq!(served["id"], "7-20260102030405006");
            assert_eq!(served["recorded"], now.as_str());
        }
    }

    #[test]
    fn a_task_change_names_the_version_the_agent_and_the_node() {
        let now = StoredInstant::parse("2026-01-02T03:04:05.006Z").unwrap();
        let id = TaskId::parse("t1").unwrap();
        let record = request().task_change(&id, Version::FIRST, Interaction::Create, &now);
        let event: Value = serde_json::from_str(&record.resource).unwrap();
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
        let event: Value = serde_json::from_str(&record.resource).unwrap();
        assert_eq!(event["entity"][0]["query"], "c3RhdHVzPXJlYWR5");
        assert_eq!(event["action"], "R");
        assert_eq!(record.entity, None);
    }
}
