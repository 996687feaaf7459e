//! `GET /fhir/ws`: the websocket endpoint named in `$get-ws-binding-token` results, and the
//! session each socket runs. The upgrade needs no bearer token (browsers cannot send one); the
//! binding token sent on the socket is the credential.
//!
//! A listener obtains a short-lived, single-use binding token (`$get-ws-binding-token`),
//! opens a socket and sends `bind-with-token <token>` (also `bind-with-token: <token>` and
//! `{"type":"bind-with-token","payload":{"token":"…"}}`). One socket may carry several
//! subscriptions, bound together or one after another. A socket that binds nothing in time is
//! closed (1008), so an idle connection cannot hold a slot.
//!
//! The session is HTTP's side of the websocket channel: it reads frames, redeems tokens
//! (through `signals`, so any node can redeem them), sends handshakes and owns the socket's
//! writer. What the pipeline pushes reaches it through the connection `Registry` in
//! `channels::websocket`, which never waits on a socket.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::AppState;
use crate::channels::websocket::{Outbound, Registry};
use crate::config::WebSocketConfig;
use crate::error::IssueCode;
use crate::fhir::datetime::format_instant;
use crate::fhir::ids::ChannelType;
use crate::fhir::notification::{
    ContentLevel, NotificationType, StatusSnapshot, SubscriptionStatus, notification_bundle,
};
use crate::signals::Signals;
use crate::store::Store;

/// Close code for policy problems: a bad token, or a listener too slow to keep up.
const POLICY: u16 = 1008;
/// Close code for a server going away.
const GOING_AWAY: u16 = 1001;
/// Why a socket that never bound is closed.
const UNBOUND: &str =
    "no subscription was bound in time: send bind-with-token right after connecting";

/// Binding messages are tiny; anything large is a mistake or an attack.
const MAX_INCOMING: usize = 16 * 1024;

/// Listeners send almost nothing, so each socket's read buffer can be small: the default
/// (128 KiB, zero-filled on first read) made an idle bound socket cost 140 KiB; with 4 KiB it
/// costs about 16 KiB (BENCHMARKS.md).
const READ_BUFFER: usize = 4 * 1024;

pub fn router() -> Router<AppState> {
    Router::new().route("/ws", get(upgrade))
}

/// Opens a socket. A browser page says where it comes from (`Origin`): only the pages of
/// `[cors] allowed_origins` may open one, the same as may call the API, and this server's own
/// pages (the console at `/console`). Clients that are not browsers send no `Origin` and are
/// not affected.
async fn upgrade(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let origin = headers.get(axum::http::header::ORIGIN);
    let listed =
        super::cors::AllowedOrigins::new(&state.config.cors.allowed_origins).allows(origin);
    if !listed && !same_origin(origin, &headers, &state.base_url) {
        let shown: String = origin
            .and_then(|o| o.to_str().ok())
            .unwrap_or("?")
            .chars()
            .take(100)
            .collect();
        return crate::error::Error::forbidden(format!(
            "pages from the origin '{shown}' may not open a websocket here; add it to [cors] allowed_origins"
        ))
        .into_response();
    }
    // A bearer token on the upgrade request is optional: it is what lets the socket use
    // R4's classic `bind <id>`, which carries no credential of its own. A token that is given
    // must be valid.
    let principal = match headers.get(axum::http::header::AUTHORIZATION) {
        None => None,
        Some(value) => {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
                .filter(|t| !t.is_empty());
            let Some(token) = token else {
                return crate::error::Error::unauthenticated(
                    "the Authorization header must use the Bearer scheme",
                )
                .into_response();
            };
            let authenticator: &crate::auth::Authenticator = state.as_ref();
            match authenticator.authenticate(token).await {
                Ok(principal) => Some(principal),
                Err(e) => return e.into_response(),
            }
        }
    };
    let hub = state.websockets.clone();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING)
        .on_upgrade(move |socket| serve_socket(socket, hub, principal))
}

/// Whether the page opening the socket is one of this server's own: its origin is the
/// public base URL's, or the origin the request was addressed to (`Host`). Such a page could
/// call the API without CORS anyway, so this widens nothing; the socket still binds only with
/// a binding token, which only a valid bearer token gets.
fn same_origin(
    origin: Option<&axum::http::HeaderValue>,
    headers: &axum::http::HeaderMap,
    base_url: &str,
) -> bool {
    let Some(origin) = origin.and_then(|o| o.to_str().ok()) else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    if !matches!(scheme, "http" | "https") {
        return false;
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok());
    base_url.starts_with(&format!("{origin}/"))
        || host.is_some_and(|h| h.eq_ignore_ascii_case(authority))
}

/// What a socket needs from the rest of the hub.
pub struct WebSocketHub {
    pub registry: Arc<Registry>,
    /// Binding tokens live here, so that any node can redeem them.
    pub signals: Arc<dyn Signals>,
    pub store: Arc<dyn Store>,
    pub base_url: String,
    pub config: WebSocketConfig,
    /// Cancelled at shutdown: every socket gets a close frame.
    pub shutdown: CancellationToken,
    /// A socket that has bound no subscription this long after opening is closed (1008): it
    /// would only hold a connection (`limits.websocket_bind_timeout_seconds`).
    pub bind_timeout: Duration,
    /// The delivery runtime, where each socket's writer runs (see `runtimes`): under a broad
    /// fan-out the writes are delivery work, and must not hold the API's threads.
    pub writers: tokio::runtime::Handle,
}

/// The bind frames a socket understands, for the refusal of anything else.
const BIND_SPELLINGS: &str = "expected 'bind-with-token <token>', 'bind-with-token: <token>' or {\"type\":\"bind-with-token\",\"payload\":{\"token\":\"…\"}}";

/// Extracts the token from any of the accepted bind spellings; the error is the diagnostic
/// for the client. A JSON frame is read like any client JSON: a repeated key is refused
/// rather than resolved, so that `type` or `token` cannot mean two things.
pub fn parse_bind(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.starts_with('{') {
        let value = crate::fhir::json::parse(text.as_bytes()).map_err(|e| match e {
            crate::fhir::json::JsonError::DuplicateKey { .. } => {
                format!("the bind frame repeats a JSON key: {e}")
            }
            _ => BIND_SPELLINGS.to_string(),
        })?;
        if value["type"] != "bind-with-token" {
            return Err(BIND_SPELLINGS.to_string());
        }
        return value["payload"]["token"]
            .as_str()
            .map(str::to_string)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| BIND_SPELLINGS.to_string());
    }
    let rest = text
        .strip_prefix("bind-with-token")
        .ok_or_else(|| BIND_SPELLINGS.to_string())?;
    let token = rest.strip_prefix(':').unwrap_or(rest).trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(BIND_SPELLINGS.to_string());
    }
    Ok(token.to_string())
}

fn outcome_frame(code: IssueCode, diagnostics: &str) -> Utf8Bytes {
    Utf8Bytes::from(crate::error::operation_outcome("error", code, diagnostics, None).to_string())
}

/// A classic R4 bind frame, `bind <id>`: the subscription id, or None for any other frame.
pub fn parse_classic_bind(text: &str) -> Option<&str> {
    let id = text.trim().strip_prefix("bind ")?.trim();
    (!id.is_empty() && !id.contains(char::is_whitespace)).then_some(id)
}

/// Serves one socket until it closes, the hub shuts down, or it falls behind. `principal` is
/// who the upgrade request's bearer token speaks for, if it carried one: the only credential
/// a classic `bind <id>` is checked against.
pub async fn serve_socket(
    socket: WebSocket,
    hub: Arc<WebSocketHub>,
    principal: Option<crate::auth::Principal>,
) {
    let (mut sink, mut stream) = socket.split();
    let (outbox, mut queued) = mpsc::channel::<Outbound>(hub.config.outbox_capacity);
    let close = CancellationToken::new();
    let id = hub.registry.add(outbox.clone(), close.clone());
    tracing::debug!(socket.id = id, "websocket opened");

    // The writer owns the sink: queued notifications, pings, and the close frame.
    let writer_close = close.clone();
    let shutdown = hub.shutdown.clone();
    let ping_every = Duration::from_secs(hub.config.ping_interval_seconds);
    let writer = hub.writers.spawn(async move {
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        const TOO_SLOW: (u16, &str) = (POLICY, "too slow: notifications were not read in time");
        const SHUTTING_DOWN: (u16, &str) = (GOING_AWAY, "server shutting down");
        let (code, reason) = loop {
            // Closing comes first: at shutdown the reader drops the queue too, and a closed
            // queue must not win the race and end the socket without its 1001.
            let message = tokio::select! {
                biased;
                () = writer_close.cancelled() => break TOO_SLOW,
                () = shutdown.cancelled() => break SHUTTING_DOWN,
                next = queued.recv() => match next {
                    Some(Outbound::Text(text)) => Message::Text(text),
                    Some(Outbound::Close(code, reason)) => break (code, reason),
                    None => return,
                },
                _ = ping.tick() => Message::Ping(Default::default()),
            };
            // A peer that stops reading blocks the send; the close signal must still win.
            tokio::select! {
                sent = sink.send(message) => if sent.is_err() { return },
                () = writer_close.cancelled() => break TOO_SLOW,
                () = shutdown.cancelled() => break SHUTTING_DOWN,
            }
        };
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        // A peer that reads nothing can hold the sink; the close frame gets a short deadline.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            sink.send(Message::Close(Some(frame))),
        )
        .await;
    });

    // Once a subscription is bound the socket lives on its pings; until then, on this deadline.
    let bind_deadline = tokio::time::sleep(hub.bind_timeout);
    let mut bind_deadline = std::pin::pin!(bind_deadline);
    let mut ever_bound = false;
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            () = close.cancelled() => break,
            () = hub.shutdown.cancelled() => break,
            () = &mut bind_deadline, if !ever_bound => {
                metrics::counter!("baton_websocket_closed_unbound_total").increment(1);
                tracing::debug!(socket.id = id, "closing a websocket that bound nothing in time");
                let _ = outbox.try_send(Outbound::Close(POLICY, UNBOUND));
                break;
            }
        };
        let Some(Ok(message)) = message else { break };
        match message {
            Message::Text(text) => {
                if let Some(subscription) = parse_classic_bind(text.as_str()) {
                    let bound = bind_classic(&hub, id, subscription, principal.as_ref()).await;
                    ever_bound |= bound;
                    let reply = if bound {
                        format!("bound {subscription}")
                    } else {
                        format!("error {subscription}")
                    };
                    if outbox
                        .try_send(Outbound::Text(Utf8Bytes::from(reply)))
                        .is_err()
                    {
                        break;
                    }
                    continue;
                }
                let token = match parse_bind(text.as_str()) {
                    Ok(token) => token,
                    Err(why) => {
                        let frame = outcome_frame(IssueCode::NotSupported, &why);
                        if outbox.try_send(Outbound::Text(frame)).is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let bound_before = hub.registry.carries_any(id);
                let bound = bind(&hub, id, &token, &outbox).await;
                ever_bound |= bound;
                if !bound && !bound_before {
                    // A socket with nothing bound has no use: after the error frame it is
                    // closed with 1008, so the client cannot mistake silence for success.
                    let _ = outbox
                        .try_send(Outbound::Close(POLICY, "invalid or expired binding token"));
                    break;
                }
            }
            Message::Close(_) => break,
            Message::Binary(_) => {
                let frame =
                    outcome_frame(IssueCode::NotSupported, "binary frames are not supported");
                let _ = outbox.try_send(Outbound::Text(frame));
            }
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
    hub.registry.remove(id);
    drop(outbox);
    let _ = writer.await;
    tracing::debug!(socket.id = id, "websocket closed");
}

/// Binds a classic R4 websocket subscription (`bind <id>`) for the socket's principal: the
/// subscription must exist, be a classic websocket subscription that is not off, and be the
/// principal's own (or the principal an admin, who may read every subscription). Any failure
/// reads the same to the client (`error <id>`), so a socket cannot probe which ids exist.
async fn bind_classic(
    hub: &WebSocketHub,
    socket: u64,
    subscription: &str,
    principal: Option<&crate::auth::Principal>,
) -> bool {
    let Some(principal) = principal else {
        return false;
    };
    let Ok(subscription_id) = crate::fhir::ids::SubscriptionId::parse(subscription) else {
        return false;
    };
    let Ok(Some(stored)) = hub.store.read_subscription(&subscription_id).await else {
        return false;
    };
    // As for `$get-ws-binding-token`: the author (or an admin) whose token's scopes, if it
    // has any, allow reading Subscriptions.
    let allowed = (principal.role == crate::auth::Role::Admin
        || stored.owner == principal.identity())
        && principal
            .require_scope(
                crate::auth::Resource::Subscription,
                crate::auth::Permission::Read,
            )
            .is_ok();
    if stored.channel_type != ChannelType::WebSocket
        || stored.status == SubscriptionStatus::Off
        || !crate::fhir::subscription::is_classic(&stored.resource)
        || !allowed
    {
        return false;
    }
    if !hub.registry.bind(socket, &subscription_id) {
        return false;
    }
    tracing::info!(socket.id = socket, subscription.id = %stored.id, "websocket bound (classic)");
    true
}

/// Redeems a token and binds its subscriptions, sending one handshake each. Returns false
/// (after sending an error frame) when the token is not usable.
async fn bind(
    hub: &WebSocketHub,
    socket: u64,
    token: &str,
    outbox: &mpsc::Sender<Outbound>,
) -> bool {
    let now = time::OffsetDateTime::now_utc();
    let Some(grant) = hub.signals.redeem_token(token, now).await else {
        let frame = outcome_frame(
            IssueCode::Security,
            "the binding token is unknown, already used or expired; get a new one with $get-ws-binding-token",
        );
        let _ = outbox.try_send(Outbound::Text(frame));
        return false;
    };
    let mut bound = 0;
    for subscription_id in &grant.subscriptions {
        let stored = match hub.store.read_subscription(subscription_id).await {
            Ok(Some(s)) => s,
            _ => continue,
        };
        // The subscription must still be a live websocket subscription of the same author.
        let same_author = stored.owner == grant.owner;
        if stored.channel_type != ChannelType::WebSocket
            || stored.status == SubscriptionStatus::Off
            || !same_author
        {
            continue;
        }
        if !hub.registry.bind(socket, subscription_id) {
            return false;
        }
        bound += 1;
        let snapshot = StatusSnapshot {
            subscription_id: &stored.id,
            topic_url: &stored.topic_url,
            status: stored.status,
            events_since_start: stored.events_since_start,
            notification_type: NotificationType::Handshake,
            error: None,
            last_delivered: None,
        };
        let bundle = notification_bundle(
            &hub.base_url,
            &uuid::Uuid::new_v4().to_string(),
            &format_instant(now),
            &snapshot,
            &[],
            ContentLevel::IdOnly,
        );
        if outbox
            .try_send(Outbound::Text(Utf8Bytes::from(bundle.to_string())))
            .is_err()
        {
            return false;
        }
        tracing::info!(socket.id = socket, subscription.id = %stored.id, "websocket bound");
    }
    if bound == 0 {
        let frame = outcome_frame(
            IssueCode::NotFound,
            "none of the token's subscriptions can be bound any more",
        );
        let _ = outbox.try_send(Outbound::Text(frame));
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_servers_own_pages_count_as_same_origin() {
        let base = "https://baton.example.org/fhir";
        let headers = |host: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(axum::http::header::HOST, host.parse().unwrap());
            h
        };
        let cases = [
            ("https://baton.example.org", "10.0.0.5:8080", true),
            ("http://127.0.0.1:8080", "127.0.0.1:8080", true),
            ("https://evil.example", "baton.example.org", false),
            (
                "https://baton.example.org.evil.example",
                "10.0.0.5:8080",
                false,
            ),
            ("null", "baton.example.org", false),
            ("file://baton.example.org", "baton.example.org", false),
        ];
        for (origin, host, expected) in cases {
            let origin = axum::http::HeaderValue::from_str(origin).unwrap();
            assert_eq!(
                same_origin(Some(&origin), &headers(host), base),
                expected,
                "{origin:?} with Host {host}"
            );
        }
        assert!(!same_origin(None, &headers("baton.example.org"), base));
    }

    #[test]
    fn bind_spellings() {
        let cases = [
            ("bind-with-token abc123", Some("abc123")),
            ("bind-with-token: abc123", Some("abc123")),
            ("  bind-with-token:abc123 ", Some("abc123")),
            (
                r#"{"type":"bind-with-token","payload":{"token":"abc123"}}"#,
                Some("abc123"),
            ),
            (r#"{"type":"unbind","payload":{"token":"abc123"}}"#, None),
            ("bind-with-token", None),
            ("bind-with-token a b", None),
            ("bind abc123", None),
            ("", None),
            (r#"{"type":"bind-with-token","payload":{"token":""}}"#, None),
            (r#"{"type":"bind-with-token","#, None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_bind(text).ok().as_deref(), expected, "{text}");
        }
    }

    #[test]
    fn classic_bind_frames() {
        let cases = [
            ("bind abc123", Some("abc123")),
            ("  bind   abc123 \n", Some("abc123")),
            ("bind", None),
            ("bind ", None),
            ("bind a b", None),
            ("bind-with-token abc123", None),
            ("bound abc123", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_classic_bind(text), expected, "{text}");
        }
    }

    #[test]
    fn bind_frames_with_repeated_keys_are_refused_by_name() {
        let cases = [
            (
                r#"{"type":"unbind","type":"bind-with-token","payload":{"token":"a"}}"#,
                "'type' occurs twice in the top-level object",
            ),
            (
                r#"{"type":"bind-with-token","payload":{"token":"a","token":"b"}}"#,
                "'token' occurs twice in the object at payload",
            ),
        ];
        for (text, expected) in cases {
            let why = parse_bind(text).unwrap_err();
            assert!(why.contains(expected), "{text}: {why}");
        }
        assert!(
            parse_bind("nonsense")
                .unwrap_err()
                .contains("bind-with-token <token>")
        );
    }
}
