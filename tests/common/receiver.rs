//! A real local webhook receiver: records every POST (headers and JSON body) and answers with
//! a status the test controls.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub raw: Bytes,
    pub body: Value,
}

impl Received {
    /// The `type` parameter of the status Parameters in entry 0.
    pub fn kind(&self) -> String {
        parameter(&self.body, "type").unwrap_or_default()
    }

    /// Event numbers carried by the notification, in order.
    pub fn event_numbers(&self) -> Vec<i64> {
        event_numbers(&self.body)
    }

    /// The subscription id, from the `subscription` reference.
    pub fn subscription_id(&self) -> String {
        self.body["entry"][0]["resource"]["parameter"]
            .as_array()
            .and_then(|params| params.iter().find(|p| p["name"] == "subscription"))
            .and_then(|p| p["valueReference"]["reference"].as_str())
            .and_then(|r| r.rsplit('/').next())
            .unwrap_or_default()
            .to_string()
    }
}

/// The `event-number`s of a notification Bundle's status Parameters, in order.
pub fn event_numbers(bundle: &Value) -> Vec<i64> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .map(|params| {
            params
                .iter()
                .filter(|p| p["name"] == "notification-event")
                .filter_map(|p| {
                    p["part"]
                        .as_array()?
                        .iter()
                        .find(|part| part["name"] == "event-number")?["valueString"]
                        .as_str()?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The value of a top-level parameter of the status Parameters in entry 0.
pub fn parameter(bundle: &Value, name: &str) -> Option<String> {
    let params = bundle["entry"][0]["resource"]["parameter"].as_array()?;
    let p = params.iter().find(|p| p["name"] == name)?;
    ["valueCode", "valueString", "valueCanonical"]
        .iter()
        .find_map(|k| p[*k].as_str())
        .map(str::to_string)
        .or_else(|| {
            p["valueReference"]["reference"]
                .as_str()
                .map(str::to_string)
        })
}

#[derive(Default)]
struct Inner {
    received: Vec<Received>,
    /// Statuses to answer with, consumed one per request; 200 when empty.
    script: Vec<u16>,
    /// Answer every request with this status while set.
    failing: Option<u16>,
    /// Hold every request this long before answering.
    hang: Option<Duration>,
    /// Requests being held right now.
    hanging: usize,
}

#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

async fn receive(
    State(shared): State<Arc<Mutex<Inner>>>,
    headers: HeaderMap,
    raw: Bytes,
) -> StatusCode {
    let hang = shared.lock().unwrap().hang;
    if let Some(hang) = hang {
        shared.lock().unwrap().hanging += 1;
        tokio::time::sleep(hang).await;
        shared.lock().unwrap().hanging -= 1;
    }
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    let mut inner = shared.lock().unwrap();
    let status = if let Some(s) = inner.failing {
        s
    } else if !inner.script.is_empty() {
        inner.script.remove(0)
    } else {
        200
    };
    if status < 300 {
        inner.received.push(Received { headers, raw, body });
    }
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    pub async fn start() -> Receiver {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver {
            url: format!("http://{addr}/hook"),
            inner,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }

    /// Accepted notifications of one type for one subscription.
    pub fn of(&self, subscription: &str, kind: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.subscription_id() == subscription && r.kind() == kind)
            .collect()
    }

    /// Event numbers accepted for a subscription, in arrival order.
    pub fn event_numbers(&self, subscription: &str) -> Vec<i64> {
        self.of(subscription, "event-notification")
            .iter()
            .flat_map(Received::event_numbers)
            .collect()
    }

    /// Holds every request for `delay` before answering (an endpoint that hangs).
    pub fn hang(&self, delay: Option<Duration>) {
        self.inner.lock().unwrap().hang = delay;
    }

    /// How many requests are being held right now.
    pub fn hanging(&self) -> usize {
        self.inner.lock().unwrap().hanging
    }

    pub fn fail_with(&self, status: Option<u16>) {
        self.inner.lock().unwrap().failing = status;
    }

    pub fn script(&self, statuses: &[u16]) {
        self.inner.lock().unwrap().script = statuses.to_vec();
    }

    /// Waits (bounded) until `check` holds on what was received.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let received = self.received();
            if check(&received) {
                return received;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; received {} notifications: {:#?}",
                received.len(),
                received
                    .iter()
                    .map(|r| (r.subscription_id(), r.kind(), r.event_numbers()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
