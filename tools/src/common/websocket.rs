//! A websocket listener's start: a binding token, the socket, `bind-with-token`, and the
//! handshake the hub answers with. What the listener then reads is each tool's own affair.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::common::api::binding_token;
use crate::common::notification::{Notification, NotificationType, read_notification};
use crate::common::snippet;

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long binding may take.
#[derive(Debug, Clone, Copy)]
pub struct BindDeadlines {
    /// For the connection (`None`: as long as the operating system tries).
    pub connect: Option<Duration>,
    /// From `bind-with-token` to the handshake.
    pub handshake: Duration,
}

/// Binds one subscription on a socket of its own; returns the socket and the handshake.
pub async fn bind(
    client: &reqwest::Client,
    bearer: &str,
    base: &str,
    subscription: &str,
    deadlines: BindDeadlines,
) -> anyhow::Result<(Socket, Notification)> {
    let binding = binding_token(client, bearer, base, subscription).await?;
    let connecting = tokio_tungstenite::connect_async(binding.websocket_url.as_str());
    let (mut socket, _) = match deadlines.connect {
        Some(limit) => tokio::time::timeout(limit, connecting)
            .await
            .context("connecting the websocket timed out")?,
        None => connecting.await,
    }
    .context("connecting the websocket")?;
    socket
        .send(Message::text(format!("bind-with-token {}", binding.token)))
        .await
        .context("sending bind-with-token")?;
    let first = tokio::time::timeout(deadlines.handshake, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Close(frame))) => bail!("closed while binding: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("reading the handshake: {e}"),
                None => bail!("the socket ended while binding"),
            }
        }
    })
    .await
    .with_context(|| {
        format!(
            "no handshake within {:.0} s",
            deadlines.handshake.as_secs_f64()
        )
    })??;
    match read_notification(first.as_bytes()) {
        Some(handshake)
            if handshake.kind == NotificationType::Handshake
                && handshake.subscription == subscription =>
        {
            Ok((socket, handshake))
        }
        _ => bail!("expected a handshake, got: {}", snippet(first.as_str())),
    }
}
