//! The subscription hub: what a Subscription means to this node, from the moment a client
//! sends one until it is deleted.
//!
//! The hub reads Subscriptions with this node's topics and policies: strictly when a client
//! sends one, and, for one already stored, once per version (`specs`). It puts a stored
//! subscription in force — the matcher index, the scheduler's heartbeat and an attempt — or
//! withdraws it (`in_force`); the API's writes, start-up, the loop that follows writes made on
//! other nodes and the outbox's catch-up all go through that one path, each saying how far it
//! reaches. Delivery takes its commands from the hub's inbox (`inbox`), its settings from
//! the hub's parsed subscriptions, and the parts of a notification that every subscription
//! hearing of the same change shares from `shared`.
//!
//! The hub stands below `api`, `outbox` and `delivery` and imports none of them.

mod accept;
mod in_force;
mod inbox;
pub mod nodes;
mod shared;
mod specs;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use serde_json::Value;

use crate::channels::amqp::AmqpPublisher;
use crate::channels::rest_hook::RestHook;
use crate::channels::websocket::Registry;
use crate::error::{Error, Result};
use crate::fhir::ids::SubscriptionId;
use crate::fhir::search::SearchLimits;
use crate::fhir::subscription::{
    ChannelPolicy, SubscriptionSpec, TopicFilters, parse_subscription,
};
use crate::matcher::SubscriptionIndex;
use crate::matcher::topic::Topic;
use crate::store::StoredSubscription;
use crate::store::audit_queue::AuditQueue;

pub use accept::{live_quota, record_for};
/// The start-up scenario each store's tests run (`in_force::tests`).
#[cfg(test)]
pub(crate) use in_force::tests::{ClearForms, start_up_puts_in_force_what_one_by_one_does};
pub use in_force::{InForce, MatchingForm, Occasion};
pub use inbox::{Command, Commands, DeliveryHandle, inbox};
pub use shared::{EntryKey, SharedParts};
use specs::{Parsed, SpecCache, refusal_or_spec};

/// What the subscription lifecycle needs on this node, shared by the API, the outbox and
/// delivery.
pub struct Hub {
    /// The topics subscriptions may name: the built-in ones and the operator's.
    pub topics: Arc<Vec<Topic>>,
    /// The channels this configuration can deliver to.
    pub policy: ChannelPolicy,
    /// The caps on the search criteria of a subscription's filters.
    pub search_limits: SearchLimits,
    /// The FHIR base URL: topics may be named on it, and filters resolve references with it.
    pub base_url: String,
    /// The subscriptions in force, as the outbox matches changes against them.
    pub index: RwLock<SubscriptionIndex>,
    /// Stored subscriptions as parsed, per version: those delivery, the API and catch-up used
    /// last, up to a bound (start-up does not fill it).
    pub(crate) specs: SpecCache,
    /// The recent Task versions and serialised event entries, shared by every notification
    /// about the same change (the outbox fills the versions as it matches).
    pub shared: SharedParts,
    /// The heartbeat period, in seconds, of each subscription in force that has one: what
    /// the scheduler's start needs of each subscription's settings, without parsing them all
    /// again.
    pub(crate) heartbeats: std::sync::Mutex<std::collections::HashMap<SubscriptionId, u32>>,
    /// The delivery scheduler's inbox.
    pub delivery: DeliveryHandle,
    /// Checks a rest-hook endpoint a client names (scheme, and no internal address once its
    /// name is resolved).
    pub rest_hook: RestHook,
    /// The AMQP publisher, when `BATON_AMQP_URL` is set: checks a message endpoint a client
    /// names, and `/readyz` shows its connection.
    pub amqp: Option<AmqpPublisher>,
    /// The sockets bound to each subscription: a subscription withdrawn is unbound from them.
    pub sockets: Arc<Registry>,
    /// This node's name in leases and claims.
    pub node: String,
    /// Whether this node holds the matcher lease (set by the outbox, shown by `/readyz`).
    pub matching: AtomicBool,
    /// The live nodes of the cluster, and which of them each subscription prefers for its
    /// deliveries (`nodes`).
    pub nodes: nodes::LiveNodes,
    /// The node's queue of AuditEvents that commit with nothing else (reads, searches,
    /// refusals, Subscription changes, delivery attempts), shared by the API and delivery.
    pub audits: AuditQueue,
}

/// The channels this hub's configuration can deliver to.
pub fn channel_policy(config: &crate::config::Config) -> ChannelPolicy {
    ChannelPolicy {
        allow_http_endpoints: config.allow_http_endpoints,
        amqp_configured: config.amqp_url.is_some(),
    }
}

#[cfg(test)]
impl Hub {
    /// A hub for unit tests: the built-in topics at `base_url`, an empty index, a policy that
    /// allows neither plain http endpoints nor AMQP; and its scheduler's inbox.
    pub(crate) fn for_tests(base_url: &str, node: &str) -> (Hub, Commands) {
        let (delivery, commands) = inbox();
        let hub = Hub {
            topics: Arc::new(
                crate::matcher::topic::builtin_topics(base_url).expect("the built-in topics load"),
            ),
            policy: ChannelPolicy {
                allow_http_endpoints: false,
                amqp_configured: false,
            },
            search_limits: SearchLimits {
                default_count: 50,
                max_count: 1000,
                default_total: crate::fhir::search::TotalMode::Accurate,
            },
            base_url: base_url.into(),
            index: Default::default(),
            specs: Default::default(),
            shared: Default::default(),
            heartbeats: Default::default(),
            delivery,
            rest_hook: RestHook::new(false, false),
            amqp: None,
            sockets: Default::default(),
            node: node.into(),
            matching: Default::default(),
            nodes: nodes::LiveNodes::new(node),
            audits: AuditQueue::disconnected(),
        };
        (hub, commands)
    }
}

impl Hub {
    /// Parses a Subscription a client sent, with this hub's topics and policies; its topic must
    /// be named by canonical URL or on this server's base.
    pub fn parse_request(&self, resource: &Value) -> Result<SubscriptionSpec> {
        parse_named(
            &self.topics,
            &self.policy,
            &self.search_limits,
            &self.base_url,
            resource,
            TopicNames::OwnBase(&self.base_url),
        )
        .map_err(|e| name_the_topics(e, &self.topics, &self.base_url))
    }

    /// A stored subscription's settings for matching only: its topic and filters must still be
    /// understood, while its channel may be one the current configuration cannot serve (such a
    /// subscription keeps counting its events, in `error`, until the configuration serves it).
    pub fn spec_for_matching(&self, stored: &StoredSubscription) -> Result<Arc<SubscriptionSpec>> {
        self.parsed(stored)?.for_matching()
    }

    /// A stored subscription's settings for delivering to it: its channel must be one this
    /// configuration can serve.
    pub fn spec_for_delivery(&self, stored: &StoredSubscription) -> Result<Arc<SubscriptionSpec>> {
        self.parsed(stored)?.for_delivery()
    }

    /// A stored subscription read both ways, once per version while it stays cached.
    fn parsed(&self, stored: &StoredSubscription) -> Result<Arc<Parsed>> {
        self.specs.get_or_parse(&stored.id, stored.version, || {
            self.parse_stored(&stored.resource)
        })
    }

    /// A stored subscription's resource read both ways, uncached.
    fn parse_stored(&self, resource: &Value) -> Result<Parsed> {
        let parse = |policy: &ChannelPolicy| {
            refusal_or_spec(parse_with(
                &self.topics,
                policy,
                &self.search_limits,
                &self.base_url,
                resource,
            ))
        };
        let delivery = parse(&self.policy)?;
        // The channel policy only accepts or refuses: what the configuration accepts, any
        // channel accepts, and reads the same.
        let matching = match &delivery {
            Ok(spec) => Ok(spec.clone()),
            Err(_) => parse(&ChannelPolicy::ANY_CHANNEL)?,
        };
        Ok(Parsed { matching, delivery })
    }

    /// The heartbeat periods of the subscriptions in force, for the scheduler's start.
    pub fn heartbeats(&self) -> Vec<(SubscriptionId, u32)> {
        self.heartbeats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, period)| (id.clone(), *period))
            .collect()
    }

    fn set_heartbeat(&self, id: &SubscriptionId, period: Option<u32>) {
        let mut heartbeats = self.heartbeats.lock().unwrap_or_else(|e| e.into_inner());
        match period {
            Some(period) => {
                heartbeats.insert(id.clone(), period);
            }
            None => {
                heartbeats.remove(id);
            }
        }
    }
}

/// Which URLs name a topic of this hub in a subscription's `criteria`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicNames<'b> {
    /// What a client sends: the topic's canonical URL, or `{base}/SubscriptionTopic/<id>` on
    /// this server's own base. A URL on another server's base names that server's topic,
    /// which this hub does not have.
    OwnBase(&'b str),
    /// A subscription already stored, which was held to `OwnBase` when it was written: the
    /// canonical URL, or any URL ending in `/SubscriptionTopic/<id>`. The nodes of a cluster
    /// may each have their own public URL (`deploy/cluster.sh` runs them so), and a
    /// subscription written through one node must run on all of them.
    Stored,
}

/// Finds a topic by a URL from a subscription's `criteria`.
pub fn find_topic<'a>(
    topics: &'a [Topic],
    url: &str,
    names: TopicNames<'_>,
) -> Option<(usize, &'a Topic)> {
    if let Some(found) = topics.iter().enumerate().find(|(_, t)| t.url == url) {
        return Some(found);
    }
    let id = match names {
        TopicNames::OwnBase(base_url) => url
            .strip_prefix(base_url.trim_end_matches('/'))?
            .strip_prefix("/SubscriptionTopic/")?,
        TopicNames::Stored => url.rsplit_once("/SubscriptionTopic/")?.1,
    };
    topics.iter().enumerate().find(|(_, t)| t.id == id)
}

/// A refusal of `criteria` says which topics there are, so the client can pick one.
fn name_the_topics(error: Error, topics: &[Topic], base_url: &str) -> Error {
    let Error::Client(mut client) = error else {
        return error;
    };
    // A classic search's refusal is about its parameters, and says which are allowed.
    if client.expression.as_deref() == Some("Subscription.criteria")
        && (client.diagnostics.contains("unknown topic")
            || client.diagnostics.contains("topic canonical URL"))
    {
        let urls: Vec<&str> = topics.iter().map(|t| t.url.as_str()).collect();
        client.diagnostics.push_str(&format!(
            ". This hub's topics are: {}; a topic may also be named \
             {base_url}/SubscriptionTopic/<id>",
            urls.join(", ")
        ));
    }
    Error::Client(client)
}

/// Parses a stored Subscription resource from the parts of a hub, with the channel policy
/// given; uncached (the fuzz tests call it without a hub).
pub fn parse_with(
    topics: &[Topic],
    policy: &ChannelPolicy,
    limits: &SearchLimits,
    base_url: &str,
    resource: &Value,
) -> Result<SubscriptionSpec> {
    parse_named(
        topics,
        policy,
        limits,
        base_url,
        resource,
        TopicNames::Stored,
    )
}

fn parse_named(
    topics: &[Topic],
    policy: &ChannelPolicy,
    limits: &SearchLimits,
    base_url: &str,
    resource: &Value,
    names: TopicNames<'_>,
) -> Result<SubscriptionSpec> {
    let lookup = |url: &str| find_topic(topics, url, names).map(|(_, t)| topic_filters(t));
    parse_subscription(resource, &lookup, policy, limits, base_url)
}

/// What a subscription's filters are checked against of its topic.
fn topic_filters(topic: &Topic) -> TopicFilters {
    TopicFilters {
        url: topic.url.clone(),
        id: topic.id.clone(),
        params: topic
            .filters
            .iter()
            .map(|f| (f.param.clone(), f.modifiers.clone()))
            .collect(),
    }
}
