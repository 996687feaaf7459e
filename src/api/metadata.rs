//! `GET /fhir/metadata`: the CapabilityStatement, listing exactly what this server supports.
//! It needs no token.
//!
//! It claims FHIR 4.0.1 and so lists only R4 resource types: R4 has no SubscriptionTopic, and
//! an R4 client knows the topics by the `capabilitystatement-subscriptiontopic-canonical`
//! extensions on Subscription (the backport IG's R4 discovery) and reads them as `Basic`
//! resources (`api::basic`). `/fhir/SubscriptionTopic` still serves them, in R4B's shape, for
//! R4B and R5 clients (`api::topic`).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use serde_json::{Value, json};

use super::{AppState, fhir_json};
use crate::fhir::search::{ParamType, TASK_PARAMS};

pub fn router() -> Router<AppState> {
    Router::new().route("/metadata", get(capability_statement))
}

async fn capability_statement(State(state): State<AppState>) -> Response {
    let topic_urls: Vec<&str> = state.hub.topics.iter().map(|t| t.url.as_str()).collect();
    let mut statement = build(&state.base_url, &topic_urls);
    statement["rest"][0]["security"] = super::smart::security(&state);
    fhir_json(StatusCode::OK, &statement)
}

const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport";

/// The CapabilityStatement for a server at `base_url` offering these topics.
pub fn build(base_url: &str, topic_urls: &[&str]) -> Value {
    let topic_extensions: Vec<Value> = topic_urls
        .iter()
        .map(|url| {
            json!({
                "url": format!("{BACKPORT}/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"),
                "valueCanonical": url,
            })
        })
        .collect();
    let search_params: Vec<Value> = TASK_PARAMS
        .iter()
        .map(|p| {
            let kind = match p.kind {
                ParamType::Token => "token",
                ParamType::Reference => "reference",
                ParamType::Date => "date",
            };
            let mut param = json!({
                "name": p.code,
                "type": kind,
                "documentation": p.description,
            });
            if let Some(definition) = definition(p.code) {
                param["definition"] = json!(definition);
            }
            param
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": crate::fhir::datetime::format_instant(time::OffsetDateTime::now_utc()),
        "publisher": "Baton",
        "kind": "instance",
        "software": { "name": "Baton", "version": env!("CARGO_PKG_VERSION") },
        "implementation": {
            "description": "Baton FHIR workflow Task server",
            "url": base_url,
        },
        "fhirVersion": "4.0.1",
        "instantiates": [format!("{BACKPORT}/CapabilityStatement/backport-subscription-server-r4")],
        "implementationGuide": [format!("{BACKPORT}/ImplementationGuide/hl7.fhir.uv.subscriptions-backport")],
        "format": ["application/fhir+json", "json"],
        "patchFormat": [
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/fhir+json",
        ],
        "rest": [{
            "mode": "server",
            // Where classic R4 websocket subscriptions connect (`bind <id>`, R4's protocol).
            "extension": [{
                "url": "http://hl7.org/fhir/StructureDefinition/capabilitystatement-websocket",
                "valueUri": crate::channels::websocket::websocket_url(base_url),
            }],
            "security": {
                "cors": false,
                "description": "Bearer JWT (HS256) in the Authorization header, with a 'role' claim of admin, practitioner or auditor; practitioners carry 'fhirUser'. Only /metadata is open.",
            },
            "resource": [{
                "type": "Task",
                "profile": "http://hl7.org/fhir/StructureDefinition/Task",
                "interaction": [
                    { "code": "read" },
                    { "code": "vread" },
                    { "code": "update" },
                    { "code": "patch" },
                    { "code": "delete" },
                    { "code": "history-instance" },
                    { "code": "history-type" },
                    { "code": "create" },
                    { "code": "search-type" },
                ],
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "single",
                "searchInclude": ["Task:part-of", "Task:based-on"],
                "searchRevInclude": ["Task:part-of"],
                "searchParam": search_params,
            }, {
                "extension": topic_extensions,
                "type": "Subscription",
                "supportedProfile": [format!("{BACKPORT}/StructureDefinition/backport-subscription")],
                "interaction": [
                    { "code": "read" },
                    { "code": "create" },
                    { "code": "update" },
                    { "code": "delete" },
                    { "code": "search-type" },
                ],
                "versioning": "versioned",
                "searchParam": [
                    { "name": "url", "type": "uri", "definition": "http://hl7.org/fhir/SearchParameter/Subscription-url", "documentation": "The channel endpoint" },
                    { "name": "status", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Subscription-status", "documentation": "requested, active, error or off" },
                ],
                "operation": [
                    { "name": "status", "definition": format!("{BACKPORT}/OperationDefinition/backport-subscription-status") },
                    { "name": "events", "definition": format!("{BACKPORT}/OperationDefinition/backport-subscription-events") },
                    { "name": "get-ws-binding-token", "definition": format!("{BACKPORT}/OperationDefinition/backport-subscription-get-ws-binding-token") },
                    { "name": "resend", "definition": "https://baton.dev/fhir/OperationDefinition/Subscription-resend", "documentation": "Admin only: POST [base]/Subscription/{id}/$resend?eventsSinceNumber=N delivers events N onwards again, in order, with their original numbers (rest-hook and AMQP)." },
                ],
            }, {
                "type": "Basic",
                "documentation": "The topics for R4 clients: each SubscriptionTopic wrapped in a Basic resource (code http://hl7.org/fhir/fhir-types|SubscriptionTopic, the topic's elements as the R5 cross-version extensions), as the Subscriptions R5 Backport IG shows. Read-only; the id is the topic's id.",
                "interaction": [{ "code": "read" }, { "code": "search-type" }],
                "searchParam": [
                    { "name": "code", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Basic-code", "documentation": "SubscriptionTopic or http://hl7.org/fhir/fhir-types|SubscriptionTopic lists the topics" },
                    { "name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "documentation": "The topic's id" },
                    { "name": "url", "type": "uri", "documentation": "The topic's canonical URL" },
                ],
            }, {
                "type": "AuditEvent",
                "documentation": "The audit trail, read by admins and auditors; a practitioner reads only the delivery ledgers of its own subscriptions (entity=Subscription/{id}, up to 100 comma-separated).",
                "interaction": [{ "code": "read" }, { "code": "search-type" }],
                "searchParam": [
                    { "name": "date", "type": "date", "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-date", "documentation": "When the event was recorded" },
                    { "name": "entity", "type": "reference", "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-entity", "documentation": "The resource the event is about (any version)" },
                    { "name": "agent", "type": "reference", "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-agent", "documentation": "The caller's fhirUser, or the sub of a token without one" },
                    { "name": "type", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-type", "documentation": "rest for requests, transmit for delivery attempts" },
                    { "name": "subtype", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-subtype", "documentation": "The FHIR interaction: create, update, patch, delete, read, vread, search-type, history-instance, history-type, operation; for a delivery attempt handshake, heartbeat or event-notification" },
                    { "name": "outcome", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-outcome", "documentation": "0 success, 4 refused, 8 failed (a delivery attempt that failed)" },
                ],
            }],
            "interaction": [{ "code": "transaction" }, { "code": "batch" }],
        }],
    })
}

/// The canonical SearchParameter behind each code, where FHIR defines one.
fn definition(code: &str) -> Option<String> {
    match code {
        "_id" => Some("http://hl7.org/fhir/SearchParameter/Resource-id".into()),
        "_lastUpdated" => Some("http://hl7.org/fhir/SearchParameter/Resource-lastUpdated".into()),
        "due-date" => None,
        other => Some(format!("http://hl7.org/fhir/SearchParameter/Task-{other}")),
    }
}
