//! One bound websocket listener: it reads its socket until the run stops it, recording every
//! event with its arrival time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use baton_tools::common::notification::{NotificationType, read_notification};
use baton_tools::common::websocket::Socket;
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::check::Arrival;
use crate::server::Names;

/// How a listener's socket ended.
#[derive(Debug)]
pub enum SocketEnd {
    /// Still open when the run stopped reading: the normal case.
    Open,
    Closed(Option<u16>, String),
    Eof,
    Error(String),
}

impl SocketEnd {
    pub fn describe(&self) -> String {
        match self {
            SocketEnd::Open => "open until the end".to_string(),
            SocketEnd::Closed(code, reason) => format!("closed by the server: {code:?} {reason}"),
            SocketEnd::Eof => "ended without a close frame".to_string(),
            SocketEnd::Error(e) => format!("error: {e}"),
        }
    }
}

pub struct ListenerLog {
    pub arrivals: Vec<Arrival>,
    pub notifications: u64,
    pub heartbeats: u64,
    pub malformed: u64,
    pub foreign: u64,
    pub end: SocketEnd,
}

/// Reads a bound socket until `stop`; `received` counts the events of every listener.
pub async fn read(
    mut socket: Socket,
    stop: CancellationToken,
    names: Arc<Names>,
    received: Arc<AtomicU64>,
) -> ListenerLog {
    let mut log = ListenerLog {
        arrivals: Vec::new(),
        notifications: 0,
        heartbeats: 0,
        malformed: 0,
        foreign: 0,
        end: SocketEnd::Open,
    };
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            () = stop.cancelled() => break,
        };
        let at = Instant::now();
        match message {
            Some(Ok(Message::Text(text))) => match read_notification(text.as_bytes()) {
                Some(n) if n.kind == NotificationType::EventNotification => {
                    log.notifications += 1;
                    received.fetch_add(n.events.len() as u64, Ordering::Relaxed);
                    for event in n.events {
                        match names.task_index(&event.task) {
                            Some(task) => log.arrivals.push(Arrival {
                                at,
                                number: event.number,
                                task,
                                version: event.version,
                            }),
                            None => log.foreign += 1,
                        }
                    }
                }
                Some(n) if n.kind == NotificationType::Heartbeat => log.heartbeats += 1,
                // A second handshake, a status answer or nothing readable.
                Some(_) | None => log.malformed += 1,
            },
            Some(Ok(Message::Close(frame))) => {
                log.end = SocketEnd::Closed(
                    frame.as_ref().map(|f| u16::from(f.code)),
                    frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                );
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                log.end = SocketEnd::Error(e.to_string());
                break;
            }
            None => {
                log.end = SocketEnd::Eof;
                break;
            }
        }
    }
    log
}
