//! The extensions on `Subscription.channel`: heartbeat period, timeout and maximum count, each
//! a whole number within bounds, and the webhook signing secret. They are kept apart because
//! each is a small grammar of its own, with limits the hub depends on.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

use super::elements::{array, fail, simple_extension};
use super::{
    BACKPORT_BASE, HEARTBEAT_PERIOD_EXTENSION, MAX_COUNT_EXTENSION, MAX_HEARTBEAT_PERIOD,
    MAX_MAX_COUNT, MAX_SECRET_BYTES, MAX_TIMEOUT, MIN_SECRET_BYTES, SIGNING_SECRET_EXTENSION,
    TIMEOUT_EXTENSION,
};
use crate::error::{IssueCode, Result};
use crate::fhir::ids::ChannelType;

#[derive(Default)]
pub(super) struct ChannelExtensions {
    pub(super) heartbeat_period: Option<u32>,
    pub(super) timeout: Option<u32>,
    pub(super) max_count: Option<u32>,
    pub(super) signing_secret: Option<String>,
}

pub(super) fn parse_channel_extensions(
    channel: &Map<String, Value>,
    kind: ChannelType,
) -> Result<ChannelExtensions> {
    let path = "Subscription.channel.extension";
    let mut parsed = ChannelExtensions::default();
    for (index, extension) in array(channel, "extension", path)?.iter().enumerate() {
        let at = format!("{path}[{index}]");
        let (url, value) = simple_extension(extension, &at)?;
        let (slot, number) = match url {
            HEARTBEAT_PERIOD_EXTENSION => (
                &mut parsed.heartbeat_period,
                bounded(value, Bounds::HEARTBEAT_PERIOD, &at)?,
            ),
            TIMEOUT_EXTENSION => (&mut parsed.timeout, bounded(value, Bounds::TIMEOUT, &at)?),
            MAX_COUNT_EXTENSION => (
                &mut parsed.max_count,
                bounded(value, Bounds::MAX_COUNT, &at)?,
            ),
            SIGNING_SECRET_EXTENSION => {
                if kind != ChannelType::RestHook {
                    return Err(fail(
                        IssueCode::NotSupported,
                        &at,
                        "carries a webhook signing secret, but only rest-hook notifications are \
                         signed",
                    ));
                }
                let secret = signing_secret(value, &at)?;
                if parsed.signing_secret.replace(secret).is_some() {
                    return Err(fail(
                        IssueCode::Invalid,
                        &at,
                        "repeats the webhook signing secret, which may appear only once",
                    ));
                }
                continue;
            }
            other => {
                return Err(fail(
                    IssueCode::NotSupported,
                    &at,
                    format_args!(
                        "has the extension '{other}', which this hub does not support; on the \
                         channel it honours backport-heartbeat-period, backport-timeout, \
                         backport-max-count (under {BACKPORT_BASE}) and {SIGNING_SECRET_EXTENSION}"
                    ),
                ));
            }
        };
        if slot.replace(number).is_some() {
            return Err(fail(
                IssueCode::Invalid,
                &at,
                format_args!("repeats '{url}', which may appear only once"),
            ));
        }
    }
    Ok(parsed)
}

/// The value type and range of a whole-number channel extension.
struct Bounds {
    extension: &'static str,
    key: &'static str,
    min: u32,
    max: u32,
}

impl Bounds {
    const HEARTBEAT_PERIOD: Bounds = Bounds {
        extension: "backport-heartbeat-period",
        key: "valueUnsignedInt",
        min: 1,
        max: MAX_HEARTBEAT_PERIOD,
    };
    const TIMEOUT: Bounds = Bounds {
        extension: "backport-timeout",
        key: "valueUnsignedInt",
        min: 1,
        max: MAX_TIMEOUT,
    };
    const MAX_COUNT: Bounds = Bounds {
        extension: "backport-max-count",
        key: "valuePositiveInt",
        min: 1,
        max: MAX_MAX_COUNT,
    };
}

/// Reads a whole-number extension value and checks its type and range.
fn bounded(value: Option<(&str, &Value)>, bounds: Bounds, at: &str) -> Result<u32> {
    let Bounds {
        extension,
        key,
        min,
        max,
    } = bounds;
    let Some((_, number)) = value.filter(|(found, _)| *found == key) else {
        return Err(fail(
            IssueCode::Invalid,
            at,
            format_args!("({extension}) must carry a {key} from {min} to {max}"),
        ));
    };
    number
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            fail(
                IssueCode::Invalid,
                at,
                format_args!(
                    "({extension}) has {key} {number}, but this hub accepts whole numbers from \
                     {min} to {max}"
                ),
            )
        })
}

/// Checks a Standard Webhooks secret: `whsec_` and the base64 of 16 to 64 random bytes.
fn signing_secret(value: Option<(&str, &Value)>, at: &str) -> Result<String> {
    let format =
        "must carry a valueString 'whsec_' followed by the base64 of 16 to 64 random bytes";
    let Some(("valueString", Value::String(secret))) = value else {
        return Err(fail(IssueCode::Invalid, at, format));
    };
    // The secret itself never appears in a diagnostic.
    let key = secret
        .strip_prefix("whsec_")
        .and_then(|encoded| STANDARD.decode(encoded).ok())
        .filter(|key| (MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()));
    match key {
        Some(_) => Ok(secret.clone()),
        None => Err(fail(IssueCode::Invalid, at, format)),
    }
}
