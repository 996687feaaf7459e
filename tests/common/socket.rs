//! The websocket channel as the tests listen on it: a binding token for a subscription, and
//! the next text frame, skipping pings, within a bounded wait.

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::TestServer;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl TestServer {
    /// `$get-ws-binding-token` for subscription `id`: (token, websocket-url).
    pub async fn ws_binding(&self, token: &str, id: &str) -> (String, String) {
        let (status, params) = self
            .get(&format!("/Subscription/{id}/$get-ws-binding-token"), token)
            .await;
        assert_eq!(status, StatusCode::OK, "{params}");
        let value = |name: &str, key: &str| {
            params["parameter"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap()[key]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(value("expiration", "valueDateTime").ends_with('Z'));
        (
            value("token", "valueString"),
            value("websocket-url", "valueUrl"),
        )
    }
}

/// The next text frame, skipping pings; panics after 20 s without one.
pub async fn next_text(socket: &mut Socket) -> String {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a frame within 20 s")
            .expect("the socket is open")
            .expect("a valid frame");
        match frame {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The next text frame as JSON, skipping pings; panics after 20 s without one.
pub async fn next_json(socket: &mut Socket) -> Value {
    serde_json::from_str(&next_text(socket).await).unwrap()
}
