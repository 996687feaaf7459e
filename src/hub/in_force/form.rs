//! A subscription's matching form: what putting it in force at start-up needs of it, derived
//! from its parsed resource and stored with it (the `matching` column) at every create and
//! replace, so that a node starting with a million subscriptions reads a few dozen bytes of
//! each instead of parsing and checking every Subscription resource again.
//!
//! It keeps the parts of the resource that are read the same under any configuration as they
//! were given (the topic's URL, the filter criteria as written, the heartbeat period) and what
//! the channel asks of the configuration. Start-up reads the filters with the hub's current
//! topics and base URL, as a parse of the resource would: a topic that is gone, or one that no
//! longer allows a filter, withdraws the subscription as before. The author comes from its own
//! column, written in the same statement. A form of another `v` than `FORMAT` (or none, on rows
//! written before the column existed) is derived again from the resource and written back.

use serde::{Deserialize, Serialize};

use crate::fhir::subscription::{ChannelPolicy, SubscriptionSpec};

/// The version of the form written now. Raise it whenever what the form holds, or how it is
/// read, changes: stored forms of another version are then derived again from the resource.
pub const FORMAT: u32 = 1;

/// The matching form, as its JSON is stored (short keys: a million of them are read at once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchingForm {
    /// `FORMAT` when written.
    pub v: u32,
    /// The topic's canonical URL.
    pub topic: String,
    /// The `backport-filter-criteria` strings as given (`SubscriptionSpec::filter_criteria`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// The heartbeat period, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat: Option<u32>,
    /// The channel is a rest-hook on a plain `http:` endpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub http: bool,
    /// The channel is AMQP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub amqp: bool,
}

impl MatchingForm {
    /// The form of a subscription as parsed from its resource.
    pub fn of(spec: &SubscriptionSpec) -> MatchingForm {
        let needs = ChannelPolicy::least_for(&spec.channel);
        MatchingForm {
            v: FORMAT,
            topic: spec.topic_url.clone(),
            filters: spec.filter_criteria.clone(),
            heartbeat: spec.heartbeat_period,
            http: needs.allow_http_endpoints,
            amqp: needs.amqp_configured,
        }
    }

    /// The stored text of the form.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("a matching form serialises")
    }

    /// A stored form, when it is of the current `FORMAT`; None otherwise (derive it again).
    pub fn read(text: &str) -> Option<MatchingForm> {
        serde_json::from_str::<MatchingForm>(text)
            .ok()
            .filter(|form| form.v == FORMAT)
    }

    /// What the channel asks of the configuration.
    pub fn needs(&self) -> ChannelPolicy {
        ChannelPolicy {
            allow_http_endpoints: self.http,
            amqp_configured: self.amqp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_reads_back_as_written_and_another_version_is_not_read() {
        let form = MatchingForm {
            v: FORMAT,
            topic: "http://h/SubscriptionTopic/task-changed".into(),
            filters: vec!["owner=Practitioner/7".into(), "status=requested".into()],
            heartbeat: Some(60),
            http: true,
            amqp: false,
        };
        assert_eq!(MatchingForm::read(&form.to_text()), Some(form.clone()));
        let minimal = MatchingForm {
            filters: vec![],
            heartbeat: None,
            http: false,
            ..form.clone()
        };
        assert_eq!(
            minimal.to_text(),
            r#"{"v":1,"topic":"http://h/SubscriptionTopic/task-changed"}"#
        );
        let newer = MatchingForm {
            v: FORMAT + 1,
            ..form
        };
        assert_eq!(MatchingForm::read(&newer.to_text()), None);
        assert_eq!(MatchingForm::read("not json"), None);
    }
}
