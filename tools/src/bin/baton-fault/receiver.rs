//! A rest-hook endpoint on loopback whose behaviour the campaign switches while the hub
//! delivers to it: accept, fail at random, answer an error status, ask to retry later, hang
//! past the hub's timeout, answer slowly, reset connections, or not listen at all.
//!
//! Only notifications answered with 2xx are recorded: those are the ones the hub may count as
//! delivered.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use baton_tools::common::lock;
use baton_tools::common::notification::{NotificationType, read_notification};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::Rng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::verify::{Arrival, Via};

/// What the endpoint does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Accept,
    /// Answers one request in `fail_one_in` with 500, at random.
    Flaky {
        fail_one_in: u32,
    },
    /// Answers every request with this status.
    Status(u16),
    /// 503 with `Retry-After` in seconds.
    RetryAfter(u64),
    /// Holds each request this long, then answers 503: meant to outlast the hub's timeout.
    Hang(Duration),
    /// Holds each request this long, then accepts it: meant to stay within the timeout.
    Slow(Duration),
    /// Accepts each TCP connection and closes it at once, before any answer.
    Reset,
    /// Nothing listens on the port: connections are refused.
    Refuse,
}

/// What the endpoint received, shared with its connection tasks.
struct Shared {
    behaviour: Mutex<Behaviour>,
    arrivals: Mutex<Vec<Arrival>>,
    /// When each accepted event notification arrived, for recovery times.
    accepted_at: Mutex<Vec<Instant>>,
    subscription: Mutex<Option<String>>,
    requests: AtomicU64,
    accepted: AtomicU64,
    handshakes: AtomicU64,
    refused_answers: AtomicU64,
    /// Connections closed at once (`Reset`).
    resets: AtomicU64,
    /// Cancelled to close every open connection: switching to `Reset` must also cut the
    /// keep-alive connections the hub already holds.
    close_open: Mutex<CancellationToken>,
    malformed: AtomicU64,
    /// Notifications for another subscription than the first one seen (one endpoint serves
    /// one subscription in the campaign).
    foreign: AtomicU64,
}

pub struct Endpoint {
    pub url: String,
    port: u16,
    shared: Arc<Shared>,
    server: Mutex<Option<CancellationToken>>,
}

impl Endpoint {
    /// Starts an accepting endpoint on a free loopback port.
    pub async fn start() -> anyhow::Result<Arc<Endpoint>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a rest-hook endpoint")?;
        let port = listener.local_addr()?.port();
        let endpoint = Arc::new(Endpoint {
            url: format!("http://127.0.0.1:{port}/hook"),
            port,
            shared: Arc::new(Shared {
                behaviour: Mutex::new(Behaviour::Accept),
                arrivals: Mutex::default(),
                accepted_at: Mutex::default(),
                subscription: Mutex::default(),
                requests: AtomicU64::new(0),
                accepted: AtomicU64::new(0),
                handshakes: AtomicU64::new(0),
                refused_answers: AtomicU64::new(0),
                resets: AtomicU64::new(0),
                close_open: Mutex::new(CancellationToken::new()),
                malformed: AtomicU64::new(0),
                foreign: AtomicU64::new(0),
            }),
            server: Mutex::new(None),
        });
        endpoint.serve(listener);
        Ok(endpoint)
    }

    /// Switches behaviour; `Refuse` closes the port and every open connection, leaving it
    /// re-opens the port; `Reset` closes every open connection.
    pub async fn set(&self, behaviour: Behaviour) -> anyhow::Result<()> {
        *lock(&self.shared.behaviour) = behaviour;
        if behaviour == Behaviour::Reset {
            let close = std::mem::take(&mut *lock(&self.shared.close_open));
            close.cancel();
        }
        let running = lock(&self.server).is_some();
        match (behaviour == Behaviour::Refuse, running) {
            (true, true) => {
                if let Some(stop) = lock(&self.server).take() {
                    stop.cancel();
                }
            }
            (false, false) => {
                // The port was just closed; rebinding it may need a moment.
                let mut attempts = 0;
                let listener = loop {
                    match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                        Ok(listener) => break listener,
                        Err(_) if attempts < 50 => {
                            attempts += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => return Err(e).context("re-opening the endpoint's port"),
                    }
                };
                self.serve(listener);
            }
            _ => {}
        }
        Ok(())
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let stop = CancellationToken::new();
        *lock(&self.server) = Some(stop.clone());
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stop.cancelled() => break,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                if *lock(&shared.behaviour) == Behaviour::Reset {
                    shared.resets.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                    continue;
                }
                let close = lock(&shared.close_open).clone();
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(answer(&shared, request).await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    // Dropping the connection closes the socket, mid-request or not.
                    tokio::select! {
                        _ = connection => {}
                        () = close.cancelled() => {}
                    }
                });
                // Finished connections are reaped as the loop goes.
                while connections.try_join_next().is_some() {}
            }
            // Dropping the listener and aborting the connections: the port now refuses.
            connections.abort_all();
        });
    }

    /// Events accepted so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.shared.arrivals).clone()
    }

    /// The first accepted event notification at or after `since`.
    pub fn first_accepted_after(&self, since: Instant) -> Option<Instant> {
        lock(&self.shared.accepted_at)
            .iter()
            .copied()
            .find(|at| *at >= since)
    }

    pub fn handshakes(&self) -> u64 {
        self.shared.handshakes.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> EndpointStats {
        EndpointStats {
            requests: self.shared.requests.load(Ordering::Relaxed),
            accepted: self.shared.accepted.load(Ordering::Relaxed),
            refused_answers: self.shared.refused_answers.load(Ordering::Relaxed),
            resets: self.shared.resets.load(Ordering::Relaxed),
            malformed: self.shared.malformed.load(Ordering::Relaxed),
            foreign: self.shared.foreign.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct EndpointStats {
    /// Requests that reached the handler (refused and reset connections never do).
    pub requests: u64,
    pub accepted: u64,
    /// Requests failed on purpose: an error status, or held past the hub's timeout.
    pub refused_answers: u64,
    /// Connections closed on purpose before any request.
    pub resets: u64,
    pub malformed: u64,
    pub foreign: u64,
}

async fn answer(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let behaviour = *lock(&shared.behaviour);
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST),
    };
    let refuse = |code: u16| {
        shared.refused_answers.fetch_add(1, Ordering::Relaxed);
        status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
    };
    match behaviour {
        Behaviour::Accept | Behaviour::Reset | Behaviour::Refuse => {}
        Behaviour::Flaky { fail_one_in } => {
            if fail_one_in > 0 && rand::rng().random_range(0..fail_one_in) == 0 {
                return refuse(500);
            }
        }
        Behaviour::Status(code) => return refuse(code),
        Behaviour::RetryAfter(seconds) => {
            let mut response = refuse(503);
            if let Ok(value) = seconds.to_string().parse() {
                response.headers_mut().insert("retry-after", value);
            }
            return response;
        }
        Behaviour::Hang(hold) => {
            // Counted before the wait: the hub usually gives up (and drops the connection)
            // before the answer would go out.
            shared.refused_answers.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(hold).await;
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
        Behaviour::Slow(hold) => tokio::time::sleep(hold).await,
    }
    record(shared, &body);
    status(StatusCode::OK)
}

fn record(shared: &Shared, body: &[u8]) {
    let Some(notice) = read_notification(body) else {
        shared.malformed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    {
        let mut subscription = lock(&shared.subscription);
        match subscription.as_deref() {
            None => *subscription = Some(notice.subscription.clone()),
            Some(s) if s != notice.subscription => {
                shared.foreign.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(_) => {}
        }
    }
    shared.accepted.fetch_add(1, Ordering::Relaxed);
    match notice.kind {
        NotificationType::Handshake => {
            shared.handshakes.fetch_add(1, Ordering::Relaxed);
        }
        NotificationType::EventNotification | NotificationType::QueryEvent => {
            lock(&shared.accepted_at).push(Instant::now());
            lock(&shared.arrivals).extend(notice.events.into_iter().map(|e| Arrival {
                number: e.number,
                task: e.task,
                version: e.version,
                via: Via::Delivery(0),
            }));
        }
        NotificationType::Heartbeat | NotificationType::QueryStatus => {}
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}
