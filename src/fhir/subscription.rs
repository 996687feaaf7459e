//! The incoming R4 Subscription (Subscriptions R5 Backport IG 1.1.0): the checks it must pass
//! and the `SubscriptionSpec` the hub runs it from.
//!
//! The backport IG says a server SHALL reject a topic, filter, channel or payload it cannot
//! honour, and the design goes further: anything the hub would otherwise ignore (an unknown
//! extension, an R5 element, a modifier extension) is refused too, because a subscription
//! accepted and then silently served differently from what was asked is worse than a 400. Every
//! refusal names the offending element, both in the diagnostic and as the issue expression, and
//! says what the hub supports instead.
//!
//! Diagnostics never repeat header values, signing secrets or URLs that carry credentials, since
//! OperationOutcomes end up in client logs.
//!
//! Decisions the specifications leave open, made here once:
//! - `status`: a client may ask for `requested`, `active` or `off`; the hub decides the real
//!   status. `error` is refused because only the hub can know that deliveries fail; a client
//!   that has fixed a failing subscription re-requests it with `requested` or `active`.
//! - An absent `backport-payload-content` means `id-only`. The profile makes it 1..1, but
//!   refusing would only break clients written against R4 examples, and `id-only` discloses no
//!   resource content.
//! - `channel.payload` may carry `;fhirVersion=4.0` (the only version the hub writes) and
//!   `;charset=utf-8` (the only encoding it writes); `content_type` keeps the text as given,
//!   because the notification `Content-Type` must start with it.
//! - A filter `+` stays a plus sign: a filter is a JSON string, not a form-encoded query, and a
//!   time-zone offset such as `+01:00` must survive.
//! - A `message` (AMQP) endpoint without `routing_key` publishes with the empty routing key,
//!   which a fanout exchange ignores and a direct exchange routes to queues bound with `""`.
//!   The key never depends on the subscription, so that one binding serves all of them.
//!
//! Everything here is pure: the caller supplies the topics, the policy and the limits.
//!
//! This file holds the public types, `parse_subscription` and the checks of the resource's top
//! level; the parts of the resource with grammars of their own have files of their own:
//! `filters` (`_criteria`), `channel` (`Subscription.channel` and AMQP endpoints),
//! `extensions` (the channel's extensions) and `elements` (the JSON helpers they all share).

use std::fmt;

use reqwest::Url;
use serde_json::{Map, Value};

use crate::error::{Error, IssueCode, Result};
use crate::fhir::datetime::{DateKind, parse_range};
use crate::fhir::ids::ChannelType;
use crate::fhir::notification::{ContentLevel, SubscriptionStatus};
use crate::fhir::search::{Predicate, SearchLimits};
use crate::fhir::{ID_RULE, check_text_content, is_valid_id};

mod channel;
mod elements;
mod extensions;
mod filters;

pub use channel::parse_amqp_endpoint;
use channel::parse_channel;
use elements::{array, fail, json_type, simple_extension, string};
pub use filters::parse_filter_criteria;
use filters::parse_filters;

/// The common prefix of the backport IG's StructureDefinitions.
pub const BACKPORT_BASE: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/";
pub const FILTER_CRITERIA_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
pub const PAYLOAD_CONTENT_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
pub const HEARTBEAT_PERIOD_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period";
pub const TIMEOUT_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-timeout";
pub const MAX_COUNT_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count";
/// Baton's extension on `Subscription.channel` carrying a Standard Webhooks signing secret.
pub const SIGNING_SECRET_EXTENSION: &str =
    "https://baton.dev/fhir/StructureDefinition/webhook-secret";

/// The longest heartbeat period accepted, in seconds (a day). A longer one would make a
/// heartbeat useless as a liveness signal.
pub const MAX_HEARTBEAT_PERIOD: u32 = 86_400;
/// The longest per-attempt delivery timeout accepted, in seconds. A slower endpoint would hold
/// a delivery worker for longer than the retry schedule is designed around.
pub const MAX_TIMEOUT: u32 = 120;
/// The most events one notification bundle may be asked to carry.
pub const MAX_MAX_COUNT: u32 = 1000;
/// The shortest signing key accepted, in bytes: shorter keys make HMAC signatures guessable.
pub const MIN_SECRET_BYTES: usize = 16;
/// The longest signing key accepted, in bytes, as in the Standard Webhooks specification.
pub const MAX_SECRET_BYTES: usize = 64;
/// The broker port when an `amqp://` endpoint names none.
pub const DEFAULT_AMQP_PORT: u16 = 5672;

/// The payload MIME types the hub writes.
const MIME_TYPES: &[&str] = &["application/fhir+json", "application/json"];

/// Header names the hub sets itself on every rest-hook POST (or that belong to the connection
/// rather than the message), so a subscription may not set or override them.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "host",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The elements of an R4 Subscription, plus `_criteria`, where the filters live.
const SUBSCRIPTION_ELEMENTS: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "implicitRules",
    "language",
    "text",
    "contained",
    "extension",
    "modifierExtension",
    "status",
    "contact",
    "end",
    "reason",
    "criteria",
    "_criteria",
    "error",
    "channel",
];

/// The elements of `Subscription.channel` the hub reads.
const CHANNEL_ELEMENTS: &[&str] = &[
    "type",
    "_type",
    "endpoint",
    "payload",
    "_payload",
    "header",
    "extension",
];

/// What the caller knows about a topic: its canonical URL and which filters it allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilters {
    pub url: String,
    pub id: String,
    /// Each filter parameter the topic allows, with the modifiers allowed on it (`not`, `missing`).
    pub params: Vec<(String, Vec<String>)>,
}

impl TopicFilters {
    fn modifiers(&self, param: &str) -> Option<&[String]> {
        self.params
            .iter()
            .find(|(name, _)| name == param)
            .map(|(_, modifiers)| modifiers.as_slice())
    }

    fn describe(&self) -> String {
        if self.params.is_empty() {
            return "no filters".into();
        }
        self.params
            .iter()
            .map(|(name, modifiers)| {
                if modifiers.is_empty() {
                    name.clone()
                } else {
                    let modifiers: Vec<String> =
                        modifiers.iter().map(|m| format!(":{m}")).collect();
                    format!("{name} ({})", modifiers.join(", "))
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How notifications reach the subscriber.
#[derive(Clone, PartialEq, Eq)]
pub enum ChannelSpec {
    /// POST each notification to `endpoint`, with the client's extra headers.
    RestHook {
        endpoint: String,
        headers: Vec<(String, String)>,
    },
    /// Push to the sockets bound with `$get-ws-binding-token`.
    WebSocket,
    /// Publish to an exchange on the broker the hub is configured for.
    Message { endpoint: AmqpEndpoint },
}

impl ChannelSpec {
    /// The channel's `Subscription.channel.type`.
    pub fn channel_type(&self) -> ChannelType {
        match self {
            ChannelSpec::RestHook { .. } => ChannelType::RestHook,
            ChannelSpec::WebSocket => ChannelType::WebSocket,
            ChannelSpec::Message { .. } => ChannelType::Message,
        }
    }
}

/// An `amqp://HOST[:PORT]/VHOST?exchange=NAME&routing_key=KEY` endpoint. It only names a
/// destination: credentials and TLS settings stay in the hub's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpEndpoint {
    /// Lower-cased host name, or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// The decoded virtual host; `/` when the URL gives none.
    pub vhost: String,
    pub exchange: String,
    /// The routing key; empty when the URL gives none.
    pub routing_key: String,
}

/// A Subscription the hub can honour, as parsed from the resource.
#[derive(Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    pub topic_url: String,
    pub topic_id: String,
    /// The filters of every `backport-filter-criteria`, ANDed.
    pub filters: Vec<Predicate>,
    /// The `backport-filter-criteria` strings as given.
    pub filter_criteria: Vec<String>,
    pub channel: ChannelSpec,
    /// The payload MIME type without parameters, lower-cased: `application/fhir+json` or
    /// `application/json`.
    pub mime_type: String,
    /// `channel.payload` exactly as given, parameters included. Notifications are sent with this
    /// `Content-Type`, because the IG (and Inferno) require it to match the subscription.
    pub content_type: String,
    pub content: ContentLevel,
    pub heartbeat_period: Option<u32>,
    pub timeout: Option<u32>,
    pub max_count: Option<u32>,
    /// `end` as given; whether it lies in the future is the caller's business.
    pub end: Option<String>,
    /// The status the client asked for: requested, active or off.
    pub requested_status: SubscriptionStatus,
    /// The `whsec_…` signing secret as given, for rest-hook subscriptions that want signatures.
    pub signing_secret: Option<String>,
    /// Whether `criteria` named a topic or was a classic R4 search string, and so how
    /// notifications are shaped.
    pub form: SubscriptionForm,
}

/// The id of the built-in topic a classic R4 subscription runs on.
pub const CLASSIC_TOPIC_ID: &str = "task-changed";

/// What kind of Subscription a client sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionForm {
    /// `criteria` names a SubscriptionTopic (the backport IG): a handshake, then notification
    /// Bundles.
    Topic,
    /// `criteria` is a classic R4 search string (`Task?owner=Practitioner/1`): the
    /// subscription runs on the built-in `task-changed` topic with the criteria as its one
    /// filter, has no handshake (R4 has none), and notifies in the form given.
    Classic(ClassicPayload),
}

impl SubscriptionForm {
    pub fn is_classic(self) -> bool {
        matches!(self, SubscriptionForm::Classic(_))
    }

    /// The classic R4 forms that send one request per event instead of a Bundle: a ping,
    /// or the resource itself.
    pub fn sends_requests_per_event(self) -> bool {
        matches!(
            self,
            SubscriptionForm::Classic(ClassicPayload::Ping | ClassicPayload::Resource)
        )
    }
}

/// How a classic R4 subscription's notifications look (R4 `Subscription.channel.payload`,
/// as HAPI FHIR reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassicPayload {
    /// No `channel.payload`: a POST to the endpoint with no body (on a websocket, `ping <id>`).
    Ping,
    /// `channel.payload` is a FHIR JSON type: the Task PUT to `{endpoint}/Task/{id}` after a
    /// create or update, a DELETE of that URL after a delete.
    Resource,
    /// The backport `backport-payload-content` extension is present as well: the backport
    /// notification Bundle, as for a topic subscription.
    Bundle,
}

/// What the hub's configuration allows for channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelPolicy {
    /// Whether plain `http:` rest-hook endpoints are accepted (development set-ups).
    pub allow_http_endpoints: bool,
    /// Whether the hub has an AMQP broker to publish to.
    pub amqp_configured: bool,
}

impl ChannelPolicy {
    /// Accepts every channel the hub knows, whatever its configuration: what matching needs
    /// of a stored subscription (delivery checks the real policy).
    pub const ANY_CHANNEL: ChannelPolicy = ChannelPolicy {
        allow_http_endpoints: true,
        amqp_configured: true,
    };

    /// The least a configuration must allow to deliver over `channel`: what of a channel
    /// the policy decides (a plain `http:` endpoint, the AMQP broker). The rest of a channel
    /// was checked when it was written and reads the same under any configuration.
    pub fn least_for(channel: &ChannelSpec) -> ChannelPolicy {
        let plain_http = |endpoint: &str| {
            endpoint
                .split_once(':')
                .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("http"))
        };
        ChannelPolicy {
            allow_http_endpoints: matches!(channel,
                ChannelSpec::RestHook { endpoint, .. } if plain_http(endpoint)),
            amqp_configured: matches!(channel, ChannelSpec::Message { .. }),
        }
    }

    /// Whether this configuration allows everything `needed` asks for.
    pub fn allows(&self, needed: ChannelPolicy) -> bool {
        (self.allow_http_endpoints || !needed.allow_http_endpoints)
            && (self.amqp_configured || !needed.amqp_configured)
    }
}

// Header values and signing secrets are credentials, and a derived `Debug` would put them into
// any log line or panic message that formats a spec, so these two print them redacted.
impl fmt::Debug for ChannelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelSpec::RestHook { endpoint, headers } => f
                .debug_struct("RestHook")
                .field("endpoint", endpoint)
                .field(
                    "headers",
                    &headers
                        .iter()
                        .map(|(name, _)| format!("{name}: <redacted>"))
                        .collect::<Vec<_>>(),
                )
                .finish(),
            ChannelSpec::WebSocket => f.write_str("WebSocket"),
            ChannelSpec::Message { endpoint } => f
                .debug_struct("Message")
                .field("endpoint", endpoint)
                .finish(),
        }
    }
}

impl fmt::Debug for SubscriptionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionSpec")
            .field("topic_url", &self.topic_url)
            .field("topic_id", &self.topic_id)
            .field("filters", &self.filters)
            .field("filter_criteria", &self.filter_criteria)
            .field("channel", &self.channel)
            .field("mime_type", &self.mime_type)
            .field("content_type", &self.content_type)
            .field("content", &self.content)
            .field("heartbeat_period", &self.heartbeat_period)
            .field("timeout", &self.timeout)
            .field("max_count", &self.max_count)
            .field("end", &self.end)
            .field("requested_status", &self.requested_status)
            .field(
                "signing_secret",
                &self.signing_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("form", &self.form)
            .finish()
    }
}

/// Checks an incoming Subscription and turns it into the spec the hub runs it from. The first
/// problem found is reported as a 4xx OperationOutcome naming the element; the caller stores
/// nothing in that case.
pub fn parse_subscription(
    resource: &Value,
    find_topic: &dyn Fn(&str) -> Option<TopicFilters>,
    policy: &ChannelPolicy,
    limits: &SearchLimits,
    base_url: &str,
) -> Result<SubscriptionSpec> {
    let Value::Object(subscription) = resource else {
        return Err(fail(
            IssueCode::Structure,
            "Subscription",
            format_args!(
                "must be a JSON object holding a Subscription resource, not a JSON {}",
                json_type(resource)
            ),
        ));
    };
    check_resource_type(subscription)?;
    check_elements(subscription)?;
    check_text_content(resource, "Subscription")?;
    if let Some(id) = string(subscription, "id", "Subscription.id")?
        && !is_valid_id(id)
    {
        return Err(fail(
            IssueCode::Invalid,
            "Subscription.id",
            format_args!("'{id}' is not a valid id ({ID_RULE})"),
        ));
    }
    let requested_status = parse_status(subscription)?;
    if string(subscription, "reason", "Subscription.reason")?.is_none() {
        return Err(fail(
            IssueCode::Required,
            "Subscription.reason",
            "is required in R4: say why the subscription exists",
        ));
    }
    let end = string(subscription, "end", "Subscription.end")?;
    if let Some(end) = end {
        parse_range(end, DateKind::DateTime)
            .map_err(|e| fail(IssueCode::Invalid, "Subscription.end", e))?;
    }
    refuse_extensions(subscription, "extension", "Subscription.extension")?;
    refuse_extensions(
        subscription,
        "modifierExtension",
        "Subscription.modifierExtension",
    )?;

    let criteria = parse_criteria(subscription, find_topic, base_url)?;
    let classic = matches!(criteria, Criteria::Classic { .. });
    let (topic, filters, filter_criteria) = match criteria {
        Criteria::Topic(topic) => {
            let (filters, filter_criteria) = parse_filters(subscription, &topic, limits, base_url)?;
            (topic, filters, filter_criteria)
        }
        Criteria::Classic { topic, search } => {
            if subscription.contains_key("_criteria") {
                return Err(fail(
                    IssueCode::Invalid,
                    "Subscription._criteria",
                    "must be absent when criteria is a classic search string: the search is \
                     the filter. Use backport-filter-criteria with a topic URL in criteria \
                     instead",
                ));
            }
            let filters = parse_classic_criteria(&search, &topic, limits, base_url)?;
            // `Task` alone filters nothing; it is kept as no filter at all.
            let filter_criteria = if filters.is_empty() {
                Vec::new()
            } else {
                vec![search]
            };
            (topic, filters, filter_criteria)
        }
    };

    let channel = match subscription.get("channel") {
        Some(Value::Object(channel)) => channel,
        Some(other) => {
            return Err(fail(
                IssueCode::Structure,
                "Subscription.channel",
                format_args!("must be a JSON object, not a JSON {}", json_type(other)),
            ));
        }
        None => {
            return Err(fail(
                IssueCode::Required,
                "Subscription.channel",
                "is required: it says how notifications are delivered",
            ));
        }
    };
    let parsed = parse_channel(channel, policy, classic)?;
    let form = if classic {
        let payload = parsed.classic_payload;
        if payload != ClassicPayload::Bundle {
            refuse_for_classic(&parsed)?;
        }
        SubscriptionForm::Classic(payload)
    } else {
        SubscriptionForm::Topic
    };

    Ok(SubscriptionSpec {
        topic_url: topic.url,
        topic_id: topic.id,
        filters,
        filter_criteria,
        channel: parsed.channel,
        mime_type: parsed.mime_type,
        content_type: parsed.content_type,
        content: parsed.content,
        heartbeat_period: parsed.heartbeat_period,
        timeout: parsed.timeout,
        max_count: parsed.max_count,
        end: end.map(String::from),
        requested_status,
        signing_secret: parsed.signing_secret,
        form,
    })
}

/// Whether a stored Subscription resource is a classic R4 one (its `criteria` a search
/// string rather than a topic URL).
pub fn is_classic(resource: &Value) -> bool {
    resource
        .get("criteria")
        .and_then(Value::as_str)
        .is_some_and(|criteria| !is_topic_url(criteria))
}

/// What `criteria` asks for: a topic, or a classic R4 search on Tasks.
enum Criteria {
    Topic(TopicFilters),
    Classic { topic: TopicFilters, search: String },
}

/// Refuses what a classic subscription sending a ping or the resource cannot honour: those
/// forms carry no Bundle, so no heartbeat and no batching.
fn refuse_for_classic(parsed: &channel::ParsedChannel) -> Result<()> {
    let at = "Subscription.channel.extension";
    if parsed.heartbeat_period.is_some() {
        return Err(fail(
            IssueCode::NotSupported,
            at,
            format_args!(
                "has '{HEARTBEAT_PERIOD_EXTENSION}', but a classic R4 subscription (criteria a \
                 search string) without backport-payload-content sends a ping or the resource, \
                 which have no heartbeat form. Add backport-payload-content to receive \
                 notification Bundles, or name a topic in criteria"
            ),
        ));
    }
    if parsed.max_count.is_some() {
        return Err(fail(
            IssueCode::NotSupported,
            at,
            format_args!(
                "has '{MAX_COUNT_EXTENSION}', but a classic R4 subscription (criteria a search \
                 string) without backport-payload-content sends one request per event. Add \
                 backport-payload-content to receive notification Bundles, or name a topic \
                 in criteria"
            ),
        ));
    }
    if matches!(parsed.channel, ChannelSpec::Message { .. }) {
        return Err(fail(
            IssueCode::NotSupported,
            "Subscription.channel.type",
            "is message, which a classic R4 subscription (criteria a search string) delivers \
             only as backport notification Bundles: add backport-payload-content on \
             channel._payload, or use rest-hook or websocket",
        ));
    }
    Ok(())
}

/// The classic search string's predicates, checked against the `task-changed` topic's filters,
/// with refusals naming `Subscription.criteria`.
fn parse_classic_criteria(
    search: &str,
    topic: &TopicFilters,
    limits: &SearchLimits,
    base_url: &str,
) -> Result<Vec<Predicate>> {
    if search == "Task" || search == "Task?" {
        return Ok(Vec::new());
    }
    parse_filter_criteria(&[search.to_string()], topic, limits, base_url).map_err(|e| match e {
        Error::Client(mut client) => {
            client.expression = Some("Subscription.criteria".into());
            client.diagnostics = client.diagnostics.replacen(
                "Subscription._criteria.extension[0]",
                "Subscription.criteria",
                1,
            );
            Error::Client(client)
        }
        other => other,
    })
}

// ---------------------------------------------------------------------------------------------
// Top level.

fn check_resource_type(subscription: &Map<String, Value>) -> Result<()> {
    let at = "Subscription.resourceType";
    match subscription.get("resourceType") {
        Some(Value::String(kind)) if kind == "Subscription" => Ok(()),
        Some(Value::String(kind)) => Err(fail(
            IssueCode::Invalid,
            at,
            format_args!("is '{kind}', but this endpoint accepts only Subscription resources"),
        )),
        Some(other) => Err(fail(
            IssueCode::Structure,
            at,
            format_args!(
                "must be the string \"Subscription\", not a JSON {}",
                json_type(other)
            ),
        )),
        None => Err(fail(
            IssueCode::Required,
            at,
            "is required and must be \"Subscription\"",
        )),
    }
}

/// Refuses elements that are not in R4 Subscription, with a hint for the R5 names that clients
/// of the backport most often send by mistake.
fn check_elements(subscription: &Map<String, Value>) -> Result<()> {
    for name in subscription.keys() {
        if SUBSCRIPTION_ELEMENTS.contains(&name.as_str()) {
            continue;
        }
        let hint = match name.as_str() {
            "topic" => {
                "; this hub speaks R4 with the backport IG, so put the topic URL in criteria"
            }
            "filterBy" => {
                "; in R4 filters go in _criteria.extension as backport-filter-criteria strings"
            }
            "channelType" | "endpoint" | "parameter" | "heartbeatPeriod" | "timeout"
            | "contentType" | "content" | "maxCount" => {
                "; in R4 the channel settings go in Subscription.channel and its backport \
                 extensions"
            }
            _ => "",
        };
        let path = format!("Subscription.{name}");
        return Err(fail(
            IssueCode::Structure,
            &path,
            format_args!("is not an element of an R4 Subscription{hint}"),
        ));
    }
    Ok(())
}

fn parse_status(subscription: &Map<String, Value>) -> Result<SubscriptionStatus> {
    let at = "Subscription.status";
    let Some(code) = string(subscription, "status", at)? else {
        return Err(fail(
            IssueCode::Required,
            at,
            "is required: ask for requested, active or off",
        ));
    };
    match SubscriptionStatus::parse(code) {
        Some(SubscriptionStatus::Error) => Err(Error::business_rule(format!(
            "{at} cannot be set to error by a client: the hub alone reports delivery failures. \
             Ask for requested or active to (re)start the subscription, or off to stop it"
        ))
        .at(at)),
        Some(status) => Ok(status),
        None => Err(fail(
            IssueCode::Invalid,
            at,
            format_args!(
                "'{code}' is not an R4 subscription status; ask for requested, active or off"
            ),
        )),
    }
}

/// Refuses every extension in `key`: the hub honours none there, and an extension it ignored
/// could change what the client believes it subscribed to.
fn refuse_extensions(object: &Map<String, Value>, key: &str, path: &str) -> Result<()> {
    let Some(first) = array(object, key, path)?.first() else {
        return Ok(());
    };
    let at = format!("{path}[0]");
    let (url, _) = simple_extension(first, &at)?;
    Err(fail(
        IssueCode::NotSupported,
        &at,
        format_args!("has the extension '{url}', which this hub does not support there"),
    ))
}

/// Whether `criteria` is written as a topic's canonical URL.
fn is_topic_url(criteria: &str) -> bool {
    (criteria.starts_with("https://") || criteria.starts_with("http://"))
        && !criteria.chars().any(char::is_whitespace)
        && Url::parse(criteria).is_ok_and(|url| url.host().is_some())
}

fn parse_criteria(
    subscription: &Map<String, Value>,
    find_topic: &dyn Fn(&str) -> Option<TopicFilters>,
    base_url: &str,
) -> Result<Criteria> {
    let at = "Subscription.criteria";
    let Some(criteria) = string(subscription, "criteria", at)? else {
        return Err(fail(
            IssueCode::Required,
            at,
            "is required: the canonical URL of a SubscriptionTopic this hub offers, or a \
             classic R4 search on Tasks such as 'Task?status=requested'",
        ));
    };
    if !is_topic_url(criteria) {
        let kind = criteria.split_once('?').map_or(criteria, |(kind, _)| kind);
        if kind != "Task" {
            return Err(fail(
                IssueCode::NotSupported,
                at,
                format_args!(
                    "'{criteria}' is neither a topic canonical URL nor a classic R4 search on \
                     Tasks: this hub serves Task subscriptions only. Write e.g. \
                     'Task?owner=Practitioner/1&status=requested', or name a topic"
                ),
            ));
        }
        let url = format!(
            "{}/SubscriptionTopic/{CLASSIC_TOPIC_ID}",
            base_url.trim_end_matches('/')
        );
        let topic = find_topic(&url).ok_or_else(|| {
            fail(
                IssueCode::NotSupported,
                at,
                format_args!(
                    "is a classic R4 search, which runs on the built-in topic \
                     '{CLASSIC_TOPIC_ID}', and this hub does not offer it"
                ),
            )
        })?;
        return Ok(Criteria::Classic {
            topic,
            search: criteria.to_string(),
        });
    }
    find_topic(criteria).map(Criteria::Topic).ok_or_else(|| {
        fail(
            IssueCode::NotSupported,
            at,
            format_args!(
                "names the unknown topic '{criteria}': name a topic of this hub by its \
                 canonical URL (listed at [base]/SubscriptionTopic and in the \
                 CapabilityStatement)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::search::{DateComparison, Prefix, SystemMatch, TokenValue};
    use serde_json::json;

    const BASE: &str = "http://h/fhir";
    const TOPIC: &str = "http://h/fhir/SubscriptionTopic/task-changed";
    const LIMITS: SearchLimits = SearchLimits {
        default_count: 20,
        max_count: 100,
        default_total: crate::fhir::search::TotalMode::Accurate,
    };
    const STRICT: ChannelPolicy = ChannelPolicy {
        allow_http_endpoints: false,
        amqp_configured: true,
    };
    const NO_AMQP: ChannelPolicy = ChannelPolicy {
        allow_http_endpoints: false,
        amqp_configured: false,
    };
    const HTTP_OK: ChannelPolicy = ChannelPolicy {
        allow_http_endpoints: true,
        amqp_configured: true,
    };
    /// 24 random bytes in Standard Webhooks form.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    /// A header value that stands for a credential: no diagnostic may repeat it.
    const TOKEN: &str = "s3cret-token";

    fn topic() -> TopicFilters {
        let allow = |name: &str, modifiers: &[&str]| {
            (
                name.to_string(),
                modifiers.iter().map(|m| m.to_string()).collect(),
            )
        };
        TopicFilters {
            url: TOPIC.into(),
            id: "task-changed".into(),
            params: vec![
                allow("owner", &["not", "missing"]),
                allow("status", &["not"]),
                allow("authored-on", &["missing"]),
            ],
        }
    }

    fn find_topic(url: &str) -> Option<TopicFilters> {
        (url == TOPIC).then(topic)
    }

    fn ext(url: &str, key: &str, value: Value) -> Value {
        let mut extension = json!({ "url": url });
        extension[key] = value;
        extension
    }

    /// A rest-hook subscription that uses every element the hub reads.
    fn rest_hook() -> Value {
        json!({
            "resourceType": "Subscription",
            "id": "s1",
            "meta": { "versionId": "1" },
            "status": "requested",
            "reason": "Watch the lab's tasks",
            "end": "2030-01-01T00:00:00Z",
            "criteria": TOPIC,
            "_criteria": { "extension": [
                ext(FILTER_CRITERIA_EXTENSION, "valueString",
                    json!("Task?owner=Practitioner/1&status=requested")),
            ]},
            "channel": {
                "type": "rest-hook",
                "endpoint": "https://receiver.example.org/hook?x=1",
                "payload": "application/fhir+json",
                "_payload": { "extension": [
                    ext(PAYLOAD_CONTENT_EXTENSION, "valueCode", json!("full-resource")),
                ]},
                "header": [format!("Authorization: Bearer {TOKEN}"), "X-Tenant:lab-7"],
                "extension": [
                    ext(HEARTBEAT_PERIOD_EXTENSION, "valueUnsignedInt", json!(60)),
                    ext(TIMEOUT_EXTENSION, "valueUnsignedInt", json!(30)),
                    ext(MAX_COUNT_EXTENSION, "valuePositiveInt", json!(20)),
                    ext(SIGNING_SECRET_EXTENSION, "valueString", json!(SECRET)),
                ]
            }
        })
    }

    fn minimal(channel: Value) -> Value {
        json!({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "r",
            "criteria": TOPIC,
            "channel": channel,
        })
    }

    fn parse(resource: &Value, policy: &ChannelPolicy) -> Result<SubscriptionSpec> {
        parse_subscription(resource, &find_topic, policy, &LIMITS, BASE)
    }

    fn reference(param: &'static str, negated: bool, refs: &[&str]) -> Predicate {
        Predicate::Token {
            param,
            negated,
            any_of: refs
                .iter()
                .map(|r| TokenValue {
                    system: SystemMatch::Any,
                    code: Some(r.to_string()),
                })
                .collect(),
        }
    }

    #[test]
    fn a_full_rest_hook_subscription_is_read_completely() {
        let spec = parse(&rest_hook(), &STRICT).unwrap();
        let expected = SubscriptionSpec {
            topic_url: TOPIC.into(),
            topic_id: "task-changed".into(),
            filters: vec![
                reference("owner", false, &["Practitioner/1"]),
                reference("status", false, &["requested"]),
            ],
            filter_criteria: vec!["Task?owner=Practitioner/1&status=requested".into()],
            channel: ChannelSpec::RestHook {
                endpoint: "https://receiver.example.org/hook?x=1".into(),
                headers: vec![
                    ("Authorization".into(), format!("Bearer {TOKEN}")),
                    ("X-Tenant".into(), "lab-7".into()),
                ],
            },
            mime_type: "application/fhir+json".into(),
            content_type: "application/fhir+json".into(),
            content: ContentLevel::FullResource,
            heartbeat_period: Some(60),
            timeout: Some(30),
            max_count: Some(20),
            end: Some("2030-01-01T00:00:00Z".into()),
            requested_status: SubscriptionStatus::Requested,
            signing_secret: Some(SECRET.into()),
            form: SubscriptionForm::Topic,
        };
        assert_eq!(spec, expected);
    }

    #[test]
    fn debug_output_hides_header_values_and_the_signing_secret() {
        let spec = parse(&rest_hook(), &STRICT).unwrap();
        let printed = format!("{spec:?}");
        assert!(!printed.contains(TOKEN), "{printed}");
        assert!(!printed.contains(SECRET), "{printed}");
        assert!(printed.contains("Authorization: <redacted>"), "{printed}");
    }

    #[test]
    fn every_filter_spelling_gives_the_same_predicates() {
        let owner = || reference("owner", false, &["Practitioner/1"]);
        let cases: Vec<(Vec<&str>, Vec<Predicate>)> = vec![
            (
                vec!["Task?owner=Practitioner/1&status=requested"],
                vec![owner(), reference("status", false, &["requested"])],
            ),
            (vec!["owner=Practitioner/1"], vec![owner()]),
            (vec!["Task.owner=Practitioner/1"], vec![owner()]),
            (vec!["Task?Task.owner=Practitioner/1"], vec![owner()]),
            (vec!["owner=Practitioner%2F1"], vec![owner()]),
            (vec!["owner=http://h/fhir/Practitioner/1"], vec![owner()]),
            (vec!["owner=Practitioner/1&"], vec![owner()]),
            (
                vec!["owner:not=Practitioner/1"],
                vec![reference("owner", true, &["Practitioner/1"])],
            ),
            (
                vec!["Task.owner:not=Practitioner/1"],
                vec![reference("owner", true, &["Practitioner/1"])],
            ),
            (
                vec!["Task.owner:missing=true"],
                vec![Predicate::Missing {
                    param: "owner",
                    missing: true,
                }],
            ),
            (
                vec!["status=requested,ready"],
                vec![reference("status", false, &["requested", "ready"])],
            ),
            // Filters in separate extensions are ANDed, like the pairs of one filter.
            (
                vec!["owner=Practitioner/1", "Task.status:not=completed"],
                vec![owner(), reference("status", true, &["completed"])],
            ),
            // A plus sign is kept, so a time-zone offset survives.
            (
                vec!["authored-on=ge2024-01-01T00:00:00+01:00"],
                vec![Predicate::Date {
                    param: "authored-on",
                    any_of: vec![DateComparison {
                        prefix: Prefix::Ge,
                        start: "2023-12-31T23:00:00.000Z".into(),
                        end: "2023-12-31T23:00:01.000Z".into(),
                    }],
                }],
            ),
        ];
        for (filters, expected) in cases {
            let mut resource =
                minimal(json!({ "type": "websocket", "payload": "application/json" }));
            resource["_criteria"] = json!({ "extension": filters
                .iter()
                .map(|f| ext(FILTER_CRITERIA_EXTENSION, "valueString", json!(f)))
                .collect::<Vec<_>>() });
            let spec = parse(&resource, &STRICT).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
            assert_eq!(spec.filters, expected, "{filters:?}");
            assert_eq!(spec.filter_criteria, filters, "{filters:?}");
        }
    }

    #[test]
    fn a_subscription_without_filters_matches_every_event_of_its_topic() {
        let spec = parse(
            &minimal(json!({ "type": "websocket", "payload": "application/json" })),
            &STRICT,
        )
        .unwrap();
        assert!(spec.filters.is_empty());
        assert!(spec.filter_criteria.is_empty());
    }

    #[test]
    fn each_channel_and_payload_form_is_accepted() {
        struct Case {
            channel: Value,
            policy: ChannelPolicy,
            expected: ChannelSpec,
            mime_type: &'static str,
            content: ContentLevel,
        }
        let cases = [
            Case {
                channel: json!({ "type": "websocket", "payload": "application/fhir+json" }),
                policy: STRICT,
                expected: ChannelSpec::WebSocket,
                mime_type: "application/fhir+json",
                // An absent backport-payload-content means id-only.
                content: ContentLevel::IdOnly,
            },
            Case {
                channel: json!({
                    "type": "message",
                    "endpoint": "amqp://rabbit:5673/%2F?exchange=baton.events&routing_key=tasks",
                    "payload": "application/json",
                    "_payload": { "extension": [
                        ext(PAYLOAD_CONTENT_EXTENSION, "valueCode", json!("empty")),
                    ]},
                    "extension": [ext(HEARTBEAT_PERIOD_EXTENSION, "valueUnsignedInt", json!(86_400))],
                }),
                policy: STRICT,
                expected: ChannelSpec::Message {
                    endpoint: AmqpEndpoint {
                        host: "rabbit".into(),
                        port: 5673,
                        vhost: "/".into(),
                        exchange: "baton.events".into(),
                        routing_key: "tasks".into(),
                    },
                },
                mime_type: "application/json",
                content: ContentLevel::Empty,
            },
            Case {
                channel: json!({
                    "type": "rest-hook",
                    "endpoint": "http://localhost:9000/hook",
                    "payload": "application/fhir+json;fhirVersion=4.0",
                }),
                policy: HTTP_OK,
                expected: ChannelSpec::RestHook {
                    endpoint: "http://localhost:9000/hook".into(),
                    headers: vec![],
                },
                mime_type: "application/fhir+json",
                content: ContentLevel::IdOnly,
            },
            Case {
                channel: json!({
                    "type": "rest-hook",
                    "endpoint": "HTTPS://Receiver.example.org",
                    "payload": "Application/FHIR+json; charset=UTF-8",
                    "_payload": { "extension": [
                        ext(PAYLOAD_CONTENT_EXTENSION, "valueCode", json!("id-only")),
                    ]},
                }),
                policy: STRICT,
                expected: ChannelSpec::RestHook {
                    endpoint: "HTTPS://Receiver.example.org".into(),
                    headers: vec![],
                },
                mime_type: "application/fhir+json",
                content: ContentLevel::IdOnly,
            },
        ];
        for case in cases {
            let payload = case.channel["payload"].as_str().unwrap().to_string();
            let resource = minimal(case.channel);
            let spec = parse(&resource, &case.policy).unwrap_or_else(|e| panic!("{resource}: {e}"));
            assert_eq!(spec.channel, case.expected, "{resource}");
            assert_eq!(spec.mime_type, case.mime_type, "{resource}");
            assert_eq!(spec.content_type, payload, "{resource}");
            assert_eq!(spec.content, case.content, "{resource}");
        }
    }

    fn classic(criteria: &str, channel: Value) -> Value {
        json!({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "r",
            "criteria": criteria,
            "channel": channel,
        })
    }

    /// The topic lookup the hub gives: the built-in topic found on this server's base.
    fn find_on_base(url: &str) -> Option<TopicFilters> {
        (url == "http://h/fhir/SubscriptionTopic/task-changed").then(|| TopicFilters {
            url: TOPIC.into(),
            ..topic()
        })
    }

    #[test]
    fn a_classic_search_runs_on_task_changed_with_the_search_as_its_filter() {
        let hook = |payload: Option<&str>| {
            let mut channel =
                json!({ "type": "rest-hook", "endpoint": "https://r.example.org/fhir" });
            if let Some(payload) = payload {
                channel["payload"] = json!(payload);
            }
            channel
        };
        let with_content = {
            let mut channel = hook(Some("application/fhir+json"));
            channel["_payload"] = json!({ "extension": [
                ext(PAYLOAD_CONTENT_EXTENSION, "valueCode", json!("full-resource")),
            ]});
            channel
        };
        let cases = [
            (hook(None), ClassicPayload::Ping, ContentLevel::IdOnly, ""),
            (
                hook(Some("application/fhir+json")),
                ClassicPayload::Resource,
                ContentLevel::FullResource,
                "application/fhir+json",
            ),
            (
                hook(Some("application/json")),
                ClassicPayload::Resource,
                ContentLevel::FullResource,
                "application/json",
            ),
            (
                with_content,
                ClassicPayload::Bundle,
                ContentLevel::FullResource,
                "application/fhir+json",
            ),
            (
                json!({ "type": "websocket" }),
                ClassicPayload::Ping,
                ContentLevel::IdOnly,
                "",
            ),
        ];
        for (channel, payload, content, content_type) in cases {
            let resource = classic("Task?owner=Practitioner/1&status=requested", channel);
            let spec = parse_subscription(&resource, &find_on_base, &STRICT, &LIMITS, BASE)
                .unwrap_or_else(|e| panic!("{resource}: {e}"));
            assert_eq!(spec.form, SubscriptionForm::Classic(payload), "{resource}");
            assert_eq!(spec.content, content, "{resource}");
            assert_eq!(spec.content_type, content_type, "{resource}");
            assert_eq!(spec.topic_url, TOPIC);
            assert_eq!(
                spec.filters,
                vec![
                    reference("owner", false, &["Practitioner/1"]),
                    reference("status", false, &["requested"]),
                ]
            );
            assert_eq!(
                spec.filter_criteria,
                vec!["Task?owner=Practitioner/1&status=requested".to_string()]
            );
            assert!(is_classic(&resource));
        }
        // `Task` alone is every Task.
        let spec = parse_subscription(
            &classic("Task", hook(None)),
            &find_on_base,
            &STRICT,
            &LIMITS,
            BASE,
        )
        .unwrap();
        assert!(spec.filters.is_empty() && spec.filter_criteria.is_empty());
        assert!(!is_classic(&rest_hook()));
        assert_eq!(
            parse(&rest_hook(), &STRICT).unwrap().form,
            SubscriptionForm::Topic
        );
    }

    #[test]
    fn classic_refusals_name_the_element() {
        let hook = json!({ "type": "rest-hook", "endpoint": "https://r.example.org/fhir" });
        let amqp = json!({
            "type": "message",
            "endpoint": "amqp://rabbit/%2F?exchange=x",
            "payload": "application/json",
        });
        let cases = [
            (
                classic("Observation?code=1", hook.clone()),
                "Subscription.criteria",
            ),
            (classic("Patient", hook.clone()), "Subscription.criteria"),
            (
                classic("Task?nope=1", hook.clone()),
                "Subscription.criteria",
            ),
            (classic("Task?owner", hook.clone()), "Subscription.criteria"),
            (
                classic("Task?status:below=x", hook.clone()),
                "Subscription.criteria",
            ),
            (
                classic("Task?status=requested", amqp),
                "Subscription.channel.type",
            ),
        ];
        for (resource, expression) in cases {
            let Err(Error::Client(refusal)) =
                parse_subscription(&resource, &find_on_base, &STRICT, &LIMITS, BASE)
            else {
                panic!("accepted {resource}");
            };
            assert_eq!(
                refusal.expression.as_deref(),
                Some(expression),
                "{resource}"
            );
            assert!(
                refusal.diagnostics.starts_with(expression),
                "{}",
                refusal.diagnostics
            );
        }
        // Without the built-in topic there is nothing to run a classic search on.
        let none = |_: &str| None;
        assert!(
            parse_subscription(
                &classic("Task?status=requested", hook),
                &none,
                &STRICT,
                &LIMITS,
                BASE
            )
            .is_err()
        );
    }

    #[test]
    fn a_client_may_ask_for_requested_active_or_off() {
        for (code, status) in [
            ("requested", SubscriptionStatus::Requested),
            ("active", SubscriptionStatus::Active),
            ("off", SubscriptionStatus::Off),
        ] {
            let mut resource = rest_hook();
            resource["status"] = json!(code);
            assert_eq!(parse(&resource, &STRICT).unwrap().requested_status, status);
        }
    }

    type Mutation = fn(&mut Value);

    fn remove(value: &mut Value, key: &str) {
        value.as_object_mut().unwrap().remove(key);
    }

    fn to_websocket(v: &mut Value) {
        v["channel"]["type"] = json!("websocket");
        remove(&mut v["channel"], "endpoint");
        remove(&mut v["channel"], "header");
        v["channel"]["extension"] = json!([ext(TIMEOUT_EXTENSION, "valueUnsignedInt", json!(5))]);
    }

    fn to_message(v: &mut Value) {
        v["channel"]["type"] = json!("message");
        v["channel"]["endpoint"] = json!("amqp://rabbit/%2F?exchange=baton");
        remove(&mut v["channel"], "header");
        remove(&mut v["channel"], "extension");
    }

    fn filter(v: &mut Value, text: &str) {
        v["_criteria"]["extension"][0]["valueString"] = json!(text);
    }

    fn channel_extension(v: &mut Value, extension: Value) {
        v["channel"]["extension"] = json!([extension]);
    }

    #[test]
    fn subscriptions_the_hub_cannot_honour_are_refused() {
        use IssueCode::*;
        let cases: &[(&str, Mutation, &ChannelPolicy, u16, IssueCode, &str)] = &[
            (
                "not an object",
                |v| *v = json!([]),
                &STRICT,
                400,
                Structure,
                "JSON object",
            ),
            (
                "another resource type",
                |v| v["resourceType"] = json!("Task"),
                &STRICT,
                400,
                Invalid,
                "'Task'",
            ),
            (
                "no resource type",
                |v| remove(v, "resourceType"),
                &STRICT,
                400,
                Required,
                "resourceType",
            ),
            (
                "an R5 topic element",
                |v| v["topic"] = json!(TOPIC),
                &STRICT,
                400,
                Structure,
                "Subscription.topic",
            ),
            (
                "an unknown element",
                |v| v["colour"] = json!("red"),
                &STRICT,
                400,
                Structure,
                "Subscription.colour",
            ),
            (
                "a narrative with a script",
                |v| {
                    v["text"] = json!({
                        "status": "generated",
                        "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><script>x()</script></div>"
                    })
                },
                &STRICT,
                400,
                IssueCode::Value,
                "Subscription.text.div contains <script>",
            ),
            (
                "a NUL in the reason",
                |v| v["reason"] = json!("watch\u{0}"),
                &STRICT,
                400,
                IssueCode::Value,
                "Subscription.reason contains the control character U+0000",
            ),
            (
                "an id of dots",
                |v| v["id"] = json!(".."),
                &STRICT,
                400,
                Invalid,
                "not only dots",
            ),
            (
                "an invalid id",
                |v| v["id"] = json!("a b"),
                &STRICT,
                400,
                Invalid,
                "'a b'",
            ),
            (
                "no status",
                |v| remove(v, "status"),
                &STRICT,
                400,
                Required,
                "Subscription.status",
            ),
            (
                "status error",
                |v| v["status"] = json!("error"),
                &STRICT,
                422,
                BusinessRule,
                "error",
            ),
            (
                "an R5-only status",
                |v| v["status"] = json!("entered-in-error"),
                &STRICT,
                400,
                Invalid,
                "entered-in-error",
            ),
            (
                "a status that is not a string",
                |v| v["status"] = json!(1),
                &STRICT,
                400,
                Structure,
                "Subscription.status",
            ),
            (
                "no reason",
                |v| remove(v, "reason"),
                &STRICT,
                400,
                Required,
                "Subscription.reason",
            ),
            (
                "an empty reason",
                |v| v["reason"] = json!(""),
                &STRICT,
                400,
                Invalid,
                "Subscription.reason",
            ),
            (
                "an end that is no date",
                |v| v["end"] = json!("tomorrow"),
                &STRICT,
                400,
                Invalid,
                "tomorrow",
            ),
            (
                "an extension on the Subscription",
                |v| {
                    v["extension"] = json!([ext(
                        "http://example.org/priority",
                        "valueCode",
                        json!("high")
                    )])
                },
                &STRICT,
                400,
                NotSupported,
                "http://example.org/priority",
            ),
            (
                "a modifier extension",
                |v| {
                    v["modifierExtension"] = json!([ext(
                        "http://example.org/dry-run",
                        "valueBoolean",
                        json!(true)
                    )])
                },
                &STRICT,
                400,
                NotSupported,
                "http://example.org/dry-run",
            ),
            (
                "no criteria",
                |v| remove(v, "criteria"),
                &STRICT,
                400,
                Required,
                "Subscription.criteria",
            ),
            (
                "classic search criteria on another resource type",
                |v| v["criteria"] = json!("Observation?code=1975-2"),
                &STRICT,
                400,
                NotSupported,
                "neither a topic canonical URL nor a classic R4 search on Tasks",
            ),
            (
                "an unknown topic",
                |v| v["criteria"] = json!("http://h/fhir/SubscriptionTopic/encounter-start"),
                &STRICT,
                400,
                NotSupported,
                "unknown topic 'http://h/fhir/SubscriptionTopic/encounter-start'",
            ),
            (
                "Inferno 6.01: the cross-version filter extension",
                |v| {
                    v["_criteria"] = json!({ "extension": [ext(
                    "http://hl7.org/fhir/5.0/subscriptions-backport/StructureDefinition/backport-filter-criteria",
                    "valueString", json!("Encounter.patient=Patient/123"))] })
                },
                &STRICT,
                400,
                NotSupported,
                "http://hl7.org/fhir/5.0/subscriptions-backport/StructureDefinition/backport-filter-criteria",
            ),
            (
                "a filter that is not a valueString",
                |v| {
                    v["_criteria"]["extension"][0] =
                        ext(FILTER_CRITERIA_EXTENSION, "valueCode", json!("owner=x"))
                },
                &STRICT,
                400,
                Invalid,
                "valueString",
            ),
            (
                "an unexpected element in _criteria",
                |v| v["_criteria"]["value"] = json!("x"),
                &STRICT,
                400,
                Structure,
                "_criteria.value",
            ),
            (
                "a filter on Encounter (search form)",
                |v| filter(v, "Encounter?patient=Patient/123"),
                &STRICT,
                400,
                NotSupported,
                "'Encounter'",
            ),
            (
                "a filter on Encounter (dotted form)",
                |v| filter(v, "Encounter.patient=Patient/123"),
                &STRICT,
                400,
                NotSupported,
                "'Encounter'",
            ),
            (
                "a filter the topic does not list",
                |v| filter(v, "code=lab"),
                &STRICT,
                400,
                NotSupported,
                "'code'",
            ),
            (
                "a modifier the topic does not allow",
                |v| filter(v, "status:missing=true"),
                &STRICT,
                400,
                NotSupported,
                ":missing",
            ),
            (
                "a result parameter _count",
                |v| filter(v, "Task?owner=Practitioner/1&_count=10"),
                &STRICT,
                400,
                Invalid,
                "_count",
            ),
            (
                "a result parameter _sort",
                |v| filter(v, "_sort=status"),
                &STRICT,
                400,
                Invalid,
                "_sort",
            ),
            (
                "a filter without '='",
                |v| filter(v, "owner"),
                &STRICT,
                400,
                Invalid,
                "'owner'",
            ),
            (
                "a broken percent escape",
                |v| filter(v, "owner=Practitioner%2"),
                &STRICT,
                400,
                Invalid,
                "'%'",
            ),
            (
                "a filter value the search parser refuses",
                |v| filter(v, "authored-on=yesterday"),
                &STRICT,
                400,
                Invalid,
                "authored-on",
            ),
            (
                "an empty filter",
                |v| filter(v, "Task?"),
                &STRICT,
                400,
                Invalid,
                "without any parameter",
            ),
            (
                "no channel",
                |v| remove(v, "channel"),
                &STRICT,
                400,
                Required,
                "Subscription.channel",
            ),
            (
                "a channel that is not an object",
                |v| v["channel"] = json!("rest-hook"),
                &STRICT,
                400,
                Structure,
                "Subscription.channel",
            ),
            (
                "an unknown channel element",
                |v| v["channel"]["timeout"] = json!(5),
                &STRICT,
                400,
                Structure,
                "channel.timeout",
            ),
            (
                "no channel type",
                |v| remove(&mut v["channel"], "type"),
                &STRICT,
                400,
                Required,
                "channel.type",
            ),
            (
                "the email channel",
                |v| v["channel"]["type"] = json!("email"),
                &STRICT,
                400,
                NotSupported,
                "'email'",
            ),
            (
                "the sms channel",
                |v| v["channel"]["type"] = json!("sms"),
                &STRICT,
                400,
                NotSupported,
                "'sms'",
            ),
            (
                "a channel type outside R4",
                |v| v["channel"]["type"] = json!("pigeon"),
                &STRICT,
                400,
                Invalid,
                "'pigeon'",
            ),
            (
                "a custom channel type",
                |v| {
                    v["channel"]["_type"] = json!({ "extension": [ext(
                    &format!("{BACKPORT_BASE}backport-channel-type"), "valueCoding",
                    json!({ "system": "http://example.org/subscription-channel-type", "code": "zulip" }))] })
                },
                &STRICT,
                400,
                NotSupported,
                "custom channel types",
            ),
            (
                "a rest-hook without endpoint",
                |v| remove(&mut v["channel"], "endpoint"),
                &STRICT,
                400,
                Required,
                "channel.endpoint",
            ),
            (
                "an http endpoint",
                |v| v["channel"]["endpoint"] = json!("http://receiver.example.org/hook"),
                &STRICT,
                400,
                NotSupported,
                "https",
            ),
            (
                "an ftp endpoint",
                |v| v["channel"]["endpoint"] = json!("ftp://receiver.example.org/hook"),
                &HTTP_OK,
                400,
                NotSupported,
                "https or http",
            ),
            (
                "an endpoint with credentials",
                |v| v["channel"]["endpoint"] = json!("https://bob:hunter2@receiver.example.org/"),
                &STRICT,
                400,
                Invalid,
                "user name or password",
            ),
            (
                "an endpoint with spaces",
                |v| v["channel"]["endpoint"] = json!("https://receiver example.org/"),
                &STRICT,
                400,
                Invalid,
                "spaces",
            ),
            (
                "an endpoint without host",
                |v| v["channel"]["endpoint"] = json!("https://"),
                &STRICT,
                400,
                Invalid,
                "not a valid URL",
            ),
            (
                "an endpoint with a fragment",
                |v| v["channel"]["endpoint"] = json!("https://r.example.org/#x"),
                &STRICT,
                400,
                Invalid,
                "#fragment",
            ),
            (
                "a websocket channel with an endpoint",
                |v| {
                    to_websocket(v);
                    v["channel"]["endpoint"] = json!("wss://client.example.org/");
                },
                &STRICT,
                400,
                Invalid,
                "websocket",
            ),
            (
                "the message channel on a hub without AMQP",
                to_message,
                &NO_AMQP,
                400,
                NotSupported,
                "not configured",
            ),
            (
                "a message channel without endpoint",
                |v| {
                    to_message(v);
                    remove(&mut v["channel"], "endpoint");
                },
                &STRICT,
                400,
                Required,
                "channel.endpoint",
            ),
            (
                "a message channel with an https endpoint",
                |v| {
                    to_message(v);
                    v["channel"]["endpoint"] = json!("https://rabbit/");
                },
                &STRICT,
                400,
                Invalid,
                "amqp://",
            ),
            (
                "a message channel with broker credentials",
                |v| {
                    to_message(v);
                    v["channel"]["endpoint"] = json!("amqp://bob:hunter2@rabbit/?exchange=e");
                },
                &STRICT,
                400,
                Invalid,
                "credentials stay in the hub",
            ),
            (
                "no payload",
                |v| remove(&mut v["channel"], "payload"),
                &STRICT,
                400,
                Required,
                "channel.payload",
            ),
            (
                "an XML payload",
                |v| v["channel"]["payload"] = json!("application/fhir+xml"),
                &STRICT,
                400,
                NotSupported,
                "'application/fhir+xml'",
            ),
            (
                "an R5 payload",
                |v| v["channel"]["payload"] = json!("application/fhir+json;fhirVersion=5.0"),
                &STRICT,
                400,
                NotSupported,
                "fhirVersion=5.0",
            ),
            (
                "an unknown payload extension",
                |v| {
                    v["channel"]["_payload"]["extension"][0]["url"] =
                        json!("http://example.org/payload-compression")
                },
                &STRICT,
                400,
                NotSupported,
                "http://example.org/payload-compression",
            ),
            (
                "an unknown content level",
                |v| v["channel"]["_payload"]["extension"][0]["valueCode"] = json!("everything"),
                &STRICT,
                400,
                NotSupported,
                "'everything'",
            ),
            (
                "a content level that is not a valueCode",
                |v| {
                    v["channel"]["_payload"]["extension"][0] =
                        ext(PAYLOAD_CONTENT_EXTENSION, "valueString", json!("empty"))
                },
                &STRICT,
                400,
                Invalid,
                "valueCode",
            ),
            (
                "a header without colon",
                |v| v["channel"]["header"] = json!(["X-Token s3cret-token"]),
                &STRICT,
                400,
                Invalid,
                "'Name: value'",
            ),
            (
                "a header the hub sets",
                |v| v["channel"]["header"] = json!(["Content-Type: text/plain"]),
                &STRICT,
                400,
                NotSupported,
                "'Content-Type'",
            ),
            (
                "a forged signature header",
                |v| v["channel"]["header"] = json!(["webhook-signature: v1,abc"]),
                &STRICT,
                400,
                NotSupported,
                "'webhook-signature'",
            ),
            (
                "an invalid header name",
                |v| v["channel"]["header"] = json!(["X Token: s3cret-token"]),
                &STRICT,
                400,
                Invalid,
                "'X Token'",
            ),
            (
                // Control characters are what make a header value invalid; the check that
                // every string of the resource is free of them names the element first.
                "an invalid header value",
                |v| v["channel"]["header"] = json!(["X-Token: s3cret-token\u{7f}"]),
                &STRICT,
                400,
                IssueCode::Value,
                "Subscription.channel.header[0] contains the control character U+007F",
            ),
            (
                "a header that is not a string",
                |v| v["channel"]["header"] = json!([{ "X-Token": TOKEN }]),
                &STRICT,
                400,
                Structure,
                "header[0]",
            ),
            (
                "an empty header list",
                |v| v["channel"]["header"] = json!([]),
                &STRICT,
                400,
                Invalid,
                "empty array",
            ),
            (
                "headers on a websocket channel",
                |v| {
                    to_websocket(v);
                    v["channel"]["header"] = json!(["X-A: b"]);
                },
                &STRICT,
                400,
                NotSupported,
                "rest-hook",
            ),
            (
                "a zero heartbeat period",
                |v| {
                    channel_extension(
                        v,
                        ext(HEARTBEAT_PERIOD_EXTENSION, "valueUnsignedInt", json!(0)),
                    )
                },
                &STRICT,
                400,
                Invalid,
                "(backport-heartbeat-period) has valueUnsignedInt 0",
            ),
            (
                "a heartbeat period over a day",
                |v| {
                    channel_extension(
                        v,
                        ext(
                            HEARTBEAT_PERIOD_EXTENSION,
                            "valueUnsignedInt",
                            json!(86_401),
                        ),
                    )
                },
                &STRICT,
                400,
                Invalid,
                "86401",
            ),
            (
                "a heartbeat period of the wrong type",
                |v| {
                    channel_extension(
                        v,
                        ext(HEARTBEAT_PERIOD_EXTENSION, "valueInteger", json!(60)),
                    )
                },
                &STRICT,
                400,
                Invalid,
                "valueUnsignedInt",
            ),
            (
                "a heartbeat period written as a string",
                |v| {
                    channel_extension(
                        v,
                        ext(HEARTBEAT_PERIOD_EXTENSION, "valueUnsignedInt", json!("60")),
                    )
                },
                &STRICT,
                400,
                Invalid,
                "1 to 86400",
            ),
            (
                "a timeout over two minutes",
                |v| channel_extension(v, ext(TIMEOUT_EXTENSION, "valueUnsignedInt", json!(121))),
                &STRICT,
                400,
                Invalid,
                "(backport-timeout) has valueUnsignedInt 121",
            ),
            (
                "a zero max count",
                |v| channel_extension(v, ext(MAX_COUNT_EXTENSION, "valuePositiveInt", json!(0))),
                &STRICT,
                400,
                Invalid,
                "(backport-max-count) has valuePositiveInt 0",
            ),
            (
                "a max count over a thousand",
                |v| channel_extension(v, ext(MAX_COUNT_EXTENSION, "valuePositiveInt", json!(1001))),
                &STRICT,
                400,
                Invalid,
                "1001",
            ),
            (
                "a repeated heartbeat period",
                |v| {
                    v["channel"]["extension"] = json!([
                        ext(HEARTBEAT_PERIOD_EXTENSION, "valueUnsignedInt", json!(60)),
                        ext(HEARTBEAT_PERIOD_EXTENSION, "valueUnsignedInt", json!(30)),
                    ])
                },
                &STRICT,
                400,
                Invalid,
                "only once",
            ),
            (
                "an unknown channel extension",
                |v| {
                    channel_extension(
                        v,
                        ext(
                            "http://example.org/retry-forever",
                            "valueBoolean",
                            json!(true),
                        ),
                    )
                },
                &STRICT,
                400,
                NotSupported,
                "http://example.org/retry-forever",
            ),
            (
                "the channel-type extension on the channel",
                |v| {
                    channel_extension(
                        v,
                        ext(
                            &format!("{BACKPORT_BASE}backport-channel-type"),
                            "valueCoding",
                            json!({ "code": "zulip" }),
                        ),
                    )
                },
                &STRICT,
                400,
                NotSupported,
                "backport-channel-type",
            ),
            (
                "a nested extension",
                |v| channel_extension(v, json!({ "url": TIMEOUT_EXTENSION, "extension": [] })),
                &STRICT,
                400,
                NotSupported,
                "'extension'",
            ),
            (
                "a signing secret without the whsec_ prefix",
                |v| {
                    channel_extension(
                        v,
                        ext(
                            SIGNING_SECRET_EXTENSION,
                            "valueString",
                            json!("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                        ),
                    )
                },
                &STRICT,
                400,
                Invalid,
                "whsec_",
            ),
            (
                "a signing secret that is too short",
                |v| {
                    channel_extension(
                        v,
                        ext(
                            SIGNING_SECRET_EXTENSION,
                            "valueString",
                            json!("whsec_c2hvcnQ="),
                        ),
                    )
                },
                &STRICT,
                400,
                Invalid,
                "16 to 64",
            ),
            (
                "a signing secret that is not base64",
                |v| {
                    channel_extension(
                        v,
                        ext(
                            SIGNING_SECRET_EXTENSION,
                            "valueString",
                            json!("whsec_not*base64*at*all*here!!"),
                        ),
                    )
                },
                &STRICT,
                400,
                Invalid,
                "base64",
            ),
            (
                "a signing secret on a websocket channel",
                |v| {
                    to_websocket(v);
                    channel_extension(
                        v,
                        ext(SIGNING_SECRET_EXTENSION, "valueString", json!(SECRET)),
                    );
                },
                &STRICT,
                400,
                NotSupported,
                "only rest-hook",
            ),
        ];
        assert!(cases.len() >= 35);
        for (name, mutate, policy, status, code, needle) in cases {
            let mut resource = rest_hook();
            mutate(&mut resource);
            let error = match parse(&resource, policy) {
                Ok(spec) => panic!("{name}: accepted as {spec:?}"),
                Err(error) => error,
            };
            let client = error
                .as_client()
                .unwrap_or_else(|| panic!("{name}: not a client error: {error}"));
            assert_eq!(
                client.status.as_u16(),
                *status,
                "{name}: {}",
                client.diagnostics
            );
            assert_eq!(client.code, *code, "{name}: {}", client.diagnostics);
            assert!(
                client.diagnostics.contains(needle),
                "{name}: '{}' does not mention {needle}",
                client.diagnostics
            );
            let expression = client.expression.as_deref().unwrap_or_default();
            assert!(
                expression.starts_with("Subscription"),
                "{name}: at '{expression}'"
            );
            for secret in [TOKEN, SECRET, "hunter2"] {
                assert!(
                    !client.diagnostics.contains(secret),
                    "{name}: '{}' leaks a credential",
                    client.diagnostics
                );
            }
        }
    }

    #[test]
    fn amqp_endpoints_name_a_broker_destination() {
        let endpoint =
            |host: &str, port, vhost: &str, exchange: &str, routing_key: &str| AmqpEndpoint {
                host: host.into(),
                port,
                vhost: vhost.into(),
                exchange: exchange.into(),
                routing_key: routing_key.into(),
            };
        let cases = [
            (
                "amqp://broker/%2F?exchange=baton&routing_key=tasks",
                endpoint("broker", 5672, "/", "baton", "tasks"),
            ),
            (
                "amqp://Broker.Example:5673/prod?exchange=ex",
                endpoint("broker.example", 5673, "prod", "ex", ""),
            ),
            (
                "amqp://broker?exchange=ex",
                endpoint("broker", 5672, "/", "ex", ""),
            ),
            (
                "amqp://broker/?exchange=ex",
                endpoint("broker", 5672, "/", "ex", ""),
            ),
            (
                "amqp://10.0.0.7/a%2Fb?routing_key=k.1&exchange=amq.topic",
                endpoint("10.0.0.7", 5672, "a/b", "amq.topic", "k.1"),
            ),
            (
                "amqp://[::1]:5671/v%20h?exchange=a.b:c",
                endpoint("::1", 5671, "v h", "a.b:c", ""),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_amqp_endpoint(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn amqp_endpoints_the_hub_cannot_use_are_refused() {
        let cases = [
            ("amqps://broker/?exchange=e", "amqps"),
            ("https://broker/?exchange=e", "amqp://"),
            ("amqp://guest:hunter2@broker/?exchange=e", "password"),
            ("amqp://guest@broker/?exchange=e", "user name"),
            ("amqp://broker/%2F", "exchange"),
            ("amqp://broker/%2F?exchange=", "exchange"),
            ("amqp://broker/a/b?exchange=e", "one path segment"),
            ("amqp://broker/%zz?exchange=e", "virtual host"),
            ("amqp://broker:0/?exchange=e", "port 0"),
            ("amqp://broker:99999/?exchange=e", "not a valid URL"),
            ("amqp://broker/?exchange=e&queue=q", "'queue'"),
            ("amqp://broker/?exchange=e&exchange=f", "more than once"),
            ("amqp://broker/?exchange=a%2Fb", "'a/b'"),
            ("amqp://broker/?exchange=e#top", "#fragment"),
            ("amqp:///vh?exchange=e", "host"),
            ("amqp://bro_ker/?exchange=e", "'bro_ker'"),
            ("amqp://broker/?exchange=e f", "spaces"),
        ];
        for (text, needle) in cases {
            let error = parse_amqp_endpoint(text).expect_err(text);
            assert!(error.contains(needle), "{text}: '{error}' lacks {needle}");
            assert!(
                !error.contains("hunter2"),
                "{text}: '{error}' leaks the password"
            );
        }
    }
}
