//! `Subscription.channel`: its type, endpoint, payload MIME type and content level, headers,
//! and the grammar of an AMQP endpoint. They are kept apart because the channel is where the
//! hub's channel policy applies, and what decides how a notification leaves the hub.

use axum::http::{HeaderName, HeaderValue};
use reqwest::Url;
use serde_json::{Map, Value};

use super::elements::{
    array, fail, json_type, primitive_extension_element, simple_extension, string,
};
use super::extensions::parse_channel_extensions;
use super::filters::percent_decode;
use super::{
    AmqpEndpoint, CHANNEL_ELEMENTS, ChannelPolicy, ChannelSpec, ClassicPayload, DEFAULT_AMQP_PORT,
    MIME_TYPES, PAYLOAD_CONTENT_EXTENSION, RESERVED_HEADERS,
};
use crate::error::{IssueCode, Result};
use crate::fhir::ids::ChannelType;
use crate::fhir::notification::ContentLevel;

pub(super) struct ParsedChannel {
    pub(super) channel: ChannelSpec,
    pub(super) mime_type: String,
    pub(super) content_type: String,
    pub(super) content: ContentLevel,
    pub(super) heartbeat_period: Option<u32>,
    pub(super) timeout: Option<u32>,
    pub(super) max_count: Option<u32>,
    pub(super) signing_secret: Option<String>,
    /// The form a classic R4 subscription's notifications take (read, but unused, for a
    /// topic subscription).
    pub(super) classic_payload: ClassicPayload,
}

/// `classic`: whether `criteria` is a classic R4 search string, whose `channel.payload` may be
/// absent (R4: "blank for no payload", a ping).
pub(super) fn parse_channel(
    channel: &Map<String, Value>,
    policy: &ChannelPolicy,
    classic: bool,
) -> Result<ParsedChannel> {
    for name in channel.keys() {
        if !CHANNEL_ELEMENTS.contains(&name.as_str()) {
            let path = format!("Subscription.channel.{name}");
            return Err(fail(
                IssueCode::Structure,
                &path,
                format_args!(
                    "is not an element this hub reads on an R4 Subscription channel; it reads {}",
                    CHANNEL_ELEMENTS.join(", ")
                ),
            ));
        }
    }
    let kind = parse_channel_type(channel)?;
    let endpoint = string(channel, "endpoint", "Subscription.channel.endpoint")?;
    let content_given = channel.contains_key("_payload");
    let payload_given = channel.contains_key("payload");
    let classic_payload = match (payload_given, content_given) {
        (_, true) => ClassicPayload::Bundle,
        (true, false) => ClassicPayload::Resource,
        (false, false) => ClassicPayload::Ping,
    };
    let (mime_type, content_type) = if classic && classic_payload == ClassicPayload::Ping {
        (String::new(), String::new())
    } else {
        parse_payload_type(channel)?
    };
    let content = match (classic, classic_payload) {
        // The resource itself goes out, so its version is loaded, and the read rule checked
        // against it at send time.
        (true, ClassicPayload::Resource) => ContentLevel::FullResource,
        // A ping carries no content; id-only still has the read rule checked at send time.
        (true, ClassicPayload::Ping) => ContentLevel::IdOnly,
        _ => parse_payload_content(channel)?,
    };
    let headers = parse_headers(channel, kind)?;
    let extensions = parse_channel_extensions(channel, kind)?;

    let at = "Subscription.channel.endpoint";
    let spec = match kind {
        ChannelType::RestHook => {
            let Some(endpoint) = endpoint else {
                return Err(fail(
                    IssueCode::Required,
                    at,
                    "is required for a rest-hook channel: the https URL notifications are POSTed to",
                ));
            };
            check_rest_hook_endpoint(endpoint, policy)?;
            ChannelSpec::RestHook {
                endpoint: endpoint.to_string(),
                headers,
            }
        }
        ChannelType::WebSocket => {
            if endpoint.is_some() {
                return Err(fail(
                    IssueCode::Invalid,
                    at,
                    "must be absent for a websocket channel: the socket URL comes from \
                     $get-ws-binding-token",
                ));
            }
            ChannelSpec::WebSocket
        }
        ChannelType::Message => {
            if !policy.amqp_configured {
                return Err(fail(
                    IssueCode::NotSupported,
                    "Subscription.channel.type",
                    "is message, but the message (AMQP) channel is not configured on this hub; \
                     use rest-hook or websocket",
                ));
            }
            let Some(endpoint) = endpoint else {
                return Err(fail(
                    IssueCode::Required,
                    at,
                    "is required for a message channel: \
                     amqp://HOST[:PORT]/VHOST?exchange=NAME&routing_key=KEY",
                ));
            };
            let endpoint =
                parse_amqp_endpoint(endpoint).map_err(|e| fail(IssueCode::Invalid, at, e))?;
            ChannelSpec::Message { endpoint }
        }
    };
    Ok(ParsedChannel {
        channel: spec,
        mime_type,
        content_type,
        content,
        heartbeat_period: extensions.heartbeat_period,
        timeout: extensions.timeout,
        max_count: extensions.max_count,
        signing_secret: extensions.signing_secret,
        classic_payload,
    })
}

fn parse_channel_type(channel: &Map<String, Value>) -> Result<ChannelType> {
    let at = "Subscription.channel.type";
    // A custom channel (backport-channel-type) is one the hub cannot deliver on, and reading
    // `type` alone would deliver on the standard channel the client only gave as a fallback.
    if let Some(element) = primitive_extension_element(channel, "_type", "Subscription.channel")?
        && let Some(first) =
            array(element, "extension", "Subscription.channel._type.extension")?.first()
    {
        let (url, _) = simple_extension(first, "Subscription.channel._type.extension[0]")?;
        return Err(fail(
            IssueCode::NotSupported,
            "Subscription.channel._type.extension[0]",
            format_args!(
                "has the extension '{url}': custom channel types are not supported; this hub \
                 delivers on rest-hook, websocket and message"
            ),
        ));
    }
    let Some(code) = string(channel, "type", at)? else {
        return Err(fail(
            IssueCode::Required,
            at,
            "is required: rest-hook, websocket or message",
        ));
    };
    if let Some(channel_type) = ChannelType::parse(code) {
        return Ok(channel_type);
    }
    match code {
        "email" | "sms" => Err(fail(
            IssueCode::NotSupported,
            at,
            format_args!(
                "'{code}' is not supported by this hub; it delivers on rest-hook, websocket and \
                 message"
            ),
        )),
        _ => Err(fail(
            IssueCode::Invalid,
            at,
            format_args!(
                "'{code}' is not an R4 channel type; this hub delivers on rest-hook, websocket \
                 and message"
            ),
        )),
    }
}

fn check_rest_hook_endpoint(endpoint: &str, policy: &ChannelPolicy) -> Result<()> {
    let at = "Subscription.channel.endpoint";
    let expected = if policy.allow_http_endpoints {
        "an absolute https or http URL"
    } else {
        "an absolute https URL"
    };
    // The URL parser drops surrounding spaces and escapes inner ones without complaint, so the
    // URL sent to would differ from the one the client sees echoed back.
    if endpoint
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(fail(
            IssueCode::Invalid,
            at,
            format_args!("must be {expected} without spaces or control characters"),
        ));
    }
    let scheme = endpoint.split_once(':').map(|(scheme, _)| scheme);
    let scheme_ok = match scheme.map(str::to_ascii_lowercase).as_deref() {
        Some("https") => true,
        Some("http") => policy.allow_http_endpoints,
        _ => false,
    };
    if !scheme_ok {
        return Err(fail(
            IssueCode::NotSupported,
            at,
            format_args!(
                "must be {expected}; notifications carry health data, so this hub does not send \
                 them over other schemes"
            ),
        ));
    }
    let url = Url::parse(endpoint).map_err(|e| {
        fail(
            IssueCode::Invalid,
            at,
            format_args!("is not a valid URL ({e}); it must be {expected}"),
        )
    })?;
    // Credentials in the URL would be echoed in every read of the Subscription; a token belongs
    // in channel.header, whose values are shown only to the author.
    if !url.username().is_empty() || url.password().is_some() {
        return Err(fail(
            IssueCode::Invalid,
            at,
            "must not carry a user name or password; send credentials in channel.header instead",
        ));
    }
    if url.fragment().is_some() {
        return Err(fail(
            IssueCode::Invalid,
            at,
            "must not have a #fragment, which is never sent to the server",
        ));
    }
    Ok(())
}

/// Parses `channel.payload`: the MIME type without parameters, and the text as given.
fn parse_payload_type(channel: &Map<String, Value>) -> Result<(String, String)> {
    let at = "Subscription.channel.payload";
    let Some(payload) = string(channel, "payload", at)? else {
        return Err(fail(
            IssueCode::Required,
            at,
            "is required: application/fhir+json or application/json",
        ));
    };
    let mut parts = payload.split(';');
    let mime_type = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
    if !MIME_TYPES.contains(&mime_type.as_str()) {
        return Err(fail(
            IssueCode::NotSupported,
            at,
            format_args!(
                "'{payload}' is not supported; this hub sends application/fhir+json or \
                 application/json, optionally with ;fhirVersion=4.0"
            ),
        ));
    }
    for parameter in parts {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let (name, value) = (name.trim(), value.trim());
        let supported = if name.eq_ignore_ascii_case("fhirVersion") {
            value == "4.0"
        } else if name.eq_ignore_ascii_case("charset") {
            value.eq_ignore_ascii_case("utf-8")
        } else {
            false
        };
        if !supported {
            return Err(fail(
                IssueCode::NotSupported,
                at,
                format_args!(
                    "has the parameter '{}', which this hub cannot honour; it writes FHIR 4.0 \
                     (;fhirVersion=4.0) in UTF-8 only",
                    parameter.trim()
                ),
            ));
        }
    }
    Ok((mime_type, payload.to_string()))
}

fn parse_payload_content(channel: &Map<String, Value>) -> Result<ContentLevel> {
    let mut content = None;
    let Some(element) = primitive_extension_element(channel, "_payload", "Subscription.channel")?
    else {
        return Ok(ContentLevel::IdOnly);
    };
    let path = "Subscription.channel._payload.extension";
    for (index, extension) in array(element, "extension", path)?.iter().enumerate() {
        let at = format!("{path}[{index}]");
        let (url, value) = simple_extension(extension, &at)?;
        if url != PAYLOAD_CONTENT_EXTENSION {
            return Err(fail(
                IssueCode::NotSupported,
                &at,
                format_args!(
                    "has the extension '{url}', which this hub does not support; the payload \
                     content level goes in '{PAYLOAD_CONTENT_EXTENSION}'"
                ),
            ));
        }
        let level = match value {
            Some(("valueCode", Value::String(code))) => {
                ContentLevel::parse(code).ok_or_else(|| {
                    fail(
                        IssueCode::NotSupported,
                        &at,
                        format_args!(
                            "asks for the payload content '{code}'; this hub supports empty, \
                             id-only and full-resource"
                        ),
                    )
                })?
            }
            _ => {
                return Err(fail(
                    IssueCode::Invalid,
                    &at,
                    "must carry a valueCode: empty, id-only or full-resource",
                ));
            }
        };
        if content.replace(level).is_some() {
            return Err(fail(
                IssueCode::Invalid,
                &at,
                "repeats backport-payload-content, which may appear only once",
            ));
        }
    }
    Ok(content.unwrap_or(ContentLevel::IdOnly))
}

fn parse_headers(channel: &Map<String, Value>, kind: ChannelType) -> Result<Vec<(String, String)>> {
    let path = "Subscription.channel.header";
    let lines = array(channel, "header", path)?;
    if !lines.is_empty() && kind != ChannelType::RestHook {
        return Err(fail(
            IssueCode::NotSupported,
            path,
            "is only sent on rest-hook channels; remove it for this channel type",
        ));
    }
    let mut headers = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        let at = format!("{path}[{index}]");
        // The value is never repeated in a diagnostic: headers usually carry credentials.
        let Value::String(line) = line else {
            return Err(fail(
                IssueCode::Structure,
                &at,
                format_args!(
                    "must be a string 'Name: value', not a JSON {}",
                    json_type(line)
                ),
            ));
        };
        let Some((name, value)) = line.split_once(':') else {
            return Err(fail(
                IssueCode::Invalid,
                &at,
                "must have the form 'Name: value'",
            ));
        };
        let (name, value) = (name.trim(), value.trim());
        if HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(fail(
                IssueCode::Invalid,
                &at,
                format_args!(
                    "has the header name '{}', which is not a valid HTTP header name",
                    name.escape_debug()
                ),
            ));
        }
        if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(fail(
                IssueCode::NotSupported,
                &at,
                format_args!(
                    "sets the header '{name}', which the hub controls itself; the reserved \
                     headers are {}",
                    RESERVED_HEADERS.join(", ")
                ),
            ));
        }
        if HeaderValue::from_str(value).is_err() {
            return Err(fail(
                IssueCode::Invalid,
                &at,
                format_args!(
                    "has a value for '{name}' that is not a valid HTTP header value (visible \
                     ASCII, spaces and tabs only)"
                ),
            ));
        }
        headers.push((name.to_string(), value.to_string()));
    }
    Ok(headers)
}

/// Parses `amqp://HOST[:PORT]/VHOST?exchange=NAME&routing_key=KEY`. The error is a sentence
/// about the endpoint, without the element path, for the caller to place.
///
/// The endpoint only names a destination, so user information (credentials), `amqps` (TLS is
/// the hub's configuration) and unknown query parameters are refused rather than ignored.
pub fn parse_amqp_endpoint(text: &str) -> Result<AmqpEndpoint, String> {
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    let Some(rest) = text.strip_prefix("amqp://") else {
        return Err(if text.starts_with("amqps://") {
            "uses amqps, which an endpoint cannot choose: TLS to the broker is set in the hub's \
             configuration, so write amqp://HOST[:PORT]/VHOST?exchange=NAME"
                .into()
        } else {
            "must be an amqp:// URL of the form amqp://HOST[:PORT]/VHOST?exchange=NAME&routing_key=KEY"
                .into()
        });
    };
    // The URL parser would accept credentials silently, and an error that echoed the text would
    // leak them, so user information is looked for before anything else.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    if rest[..authority_end].contains('@') {
        return Err(
            "must not carry a user name or password: broker credentials stay in the hub's \
             configuration"
                .into(),
        );
    }
    let url = Url::parse(text).map_err(|e| format!("is not a valid URL: {e}"))?;
    if url.fragment().is_some() {
        return Err("must not have a #fragment".into());
    }
    // An `amqp` URL is not special to the URL parser, so its host stays as written: an IPv6
    // address keeps its brackets, and anything else must look like a host name or IPv4 address.
    let host = match url.host_str() {
        Some(bracketed) if bracketed.starts_with('[') => bracketed
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        Some(name)
            if !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') =>
        {
            name.to_ascii_lowercase()
        }
        Some(name) => return Err(format!("has an invalid host name '{name}'")),
        None => return Err("must name the broker host: amqp://HOST[:PORT]/VHOST".into()),
    };
    let port = match url.port() {
        Some(0) => return Err("has port 0, which no broker listens on".into()),
        Some(port) => port,
        None => DEFAULT_AMQP_PORT,
    };
    let vhost = match url.path() {
        // The AMQP URI specification reads `amqp://host/` as the empty vhost, which no broker
        // has; clients who write it mean the default vhost, as with no path at all.
        "" | "/" => "/".to_string(),
        path => {
            let segment = &path[1..];
            if segment.contains('/') {
                return Err(format!(
                    "has the path '{path}', but the virtual host must be one path segment; \
                     write '/' inside it as %2F"
                ));
            }
            percent_decode(segment).map_err(|e| format!("has an invalid virtual host: {e}"))?
        }
    };
    let mut exchange = None;
    let mut routing_key = None;
    for (name, value) in url.query_pairs() {
        let slot = match name.as_ref() {
            "exchange" => &mut exchange,
            "routing_key" => &mut routing_key,
            other => {
                return Err(format!(
                    "has the query parameter '{other}'; the supported ones are exchange and \
                     routing_key"
                ));
            }
        };
        if slot.is_some() {
            return Err(format!("gives the query parameter '{name}' more than once"));
        }
        *slot = Some(value.into_owned());
    }
    let exchange = match exchange {
        Some(name) if !name.is_empty() => name,
        _ => {
            return Err(
                "must name an exchange: add ?exchange=NAME (the default exchange cannot be chosen)"
                    .into(),
            );
        }
    };
    // These are the AMQP 0-9-1 grammar and length limits; a name outside them would only fail
    // later, at the broker, where the client cannot see why.
    let exchange_ok = exchange.len() <= 127
        && exchange
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if !exchange_ok {
        return Err(format!(
            "has the exchange '{exchange}', but exchange names are at most 127 of A-Z, a-z, 0-9, \
             '-', '_', '.' and ':'"
        ));
    }
    let routing_key = routing_key.unwrap_or_default();
    if routing_key.len() > 255 {
        return Err("has a routing key longer than 255 bytes".into());
    }
    Ok(AmqpEndpoint {
        host,
        port,
        vhost,
        exchange,
        routing_key,
    })
}
