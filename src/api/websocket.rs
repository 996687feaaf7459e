//! `GET /fhir/ws`: the websocket endpoint named in `$get-ws-binding-token` results. The
//! upgrade needs no bearer token (browsers cannot send one); the binding token sent on the
//! socket is the credential.

use axum::Router;
use axum::extract::State;
use axum::extract::ws::WebSocketUpgrade;
use axum::response::Response;
use axum::routing::get;

use super::AppState;
use crate::channels::websocket::serve_socket;

/// Binding messages are tiny; anything large is a mistake or an attack.
const MAX_INCOMING: usize = 16 * 1024;

/// Listeners send almost nothing, so each socket's read buffer can be small: the default
/// (128 KiB, zero-filled on first read) made an idle bound socket cost 140 KiB; with 4 KiB it
/// costs about 16 KiB (BENCHMARKS.md).
const READ_BUFFER: usize = 4 * 1024;

pub fn router() -> Router<AppState> {
    Router::new().route("/ws", get(upgrade))
}

async fn upgrade(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    let hub = state.websockets.clone();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING)
        .on_upgrade(move |socket| serve_socket(socket, hub))
}
