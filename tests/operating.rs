//! What an operator meets first: start-up under the variables Kubernetes injects for a
//! Service named `baton` (while a misspelt setting still stops it), tried with the real
//! binary; `/metrics` with help text for every family, the build, and what waits for delivery.

mod common;

use std::process::Command;

use common::receiver::Receiver;
use common::{TestServer, eventually, subscription, task};
use reqwest::StatusCode;

/// `baton check-config` with these environment variables (and no others of Baton's).
fn check_config(vars: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_baton"));
    command.arg("check-config");
    for (name, _) in std::env::vars() {
        if name.starts_with("BATON_") {
            command.env_remove(name);
        }
    }
    let data = tempfile::tempdir().unwrap();
    command
        .current_dir(data.path())
        .envs(vars.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn kubernetes_service_variables_do_not_stop_start_up_but_a_misspelt_setting_does() {
    let injected = [
        ("BATON_PORT", "tcp://10.96.0.17:8080"),
        ("BATON_PORT_8080_TCP", "tcp://10.96.0.17:8080"),
        ("BATON_PORT_8080_TCP_ADDR", "10.96.0.17"),
        ("BATON_PORT_8080_TCP_PORT", "8080"),
        ("BATON_PORT_8080_TCP_PROTO", "tcp"),
        ("BATON_SERVICE_HOST", "10.96.0.17"),
        ("BATON_SERVICE_PORT", "8080"),
        ("BATON_SERVICE_PORT_HTTP", "8080"),
    ];
    let output = check_config(&injected);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let mut misspelt = injected.to_vec();
    misspelt.push(("BATON_LISTN", "0.0.0.0:8080"));
    let output = check_config(&misspelt);
    assert!(!output.status.success(), "a misspelt setting must stop it");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("listn"), "names the setting: {stderr}");
}

/// A receiver subscribed to every Task change, its subscription id and resource, once the
/// handshake has arrived.
async fn subscribed(server: &TestServer) -> (Receiver, String, serde_json::Value) {
    let receiver = Receiver::start().await;
    let body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
    let (status, created) = server
        .post_json("/Subscription", &server.admin(), &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    receiver
        .wait_for("the handshake", |r| {
            r.iter().any(|r| r.kind() == "handshake")
        })
        .await;
    (receiver, id, created)
}

/// The value of the one sample whose line starts with `series`.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn metrics_explain_themselves_and_show_what_waits_for_delivery() {
    let server = TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.delivery.retry_schedule_seconds = vec![3600];
        c.delivery.error_after_failures = 1;
    })
    .await;
    let (receiver, id, created) = subscribed(&server).await;
    receiver.fail_with(Some(503));
    for _ in 0..3 {
        server.create_task(&task("requested", None)).await;
    }
    let backlog = format!("baton_subscription_backlog_events{{subscription=\"{id}\"}}");
    // The gauges are read in the background when someone scrapes: one scrape old.
    let metrics = eventually("three undelivered events in /metrics", || async {
        let metrics = server.metrics().await;
        (sample(&metrics, &backlog) == Some(3.0)
            && sample(&metrics, "baton_subscriptions{status=\"error\"}") >= Some(1.0))
        .then_some(metrics)
    })
    .await;

    // Every family has its help text, and the ones this test made happen are there.
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        let family = line.split(' ').nth(2).unwrap();
        assert!(
            metrics.contains(&format!("# HELP {family} ")),
            "{family} has no # HELP line:\n{metrics}"
        );
    }
    for family in baton::telemetry::family_names() {
        if metrics.contains(&format!("# TYPE {family} ")) {
            continue;
        }
        // Families recorded only when something rare happens need not appear yet.
        assert!(
            !matches!(
                family,
                "baton_build_info"
                    | "baton_subscriptions"
                    | "baton_oldest_undelivered_event_age_seconds"
                    | "baton_http_requests_total"
            ),
            "{family} missing:\n{metrics}"
        );
    }
    assert_eq!(
        sample(
            &metrics,
            &format!(
                "baton_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    if !common::postgres_backend() {
        // The SQLite writer's waits, requests apart from the hub's bookkeeping: the three
        // creates and the subscription were requests; their change events' chunks hub jobs.
        let waited = |lane: &str| {
            sample(
                &metrics,
                &format!("baton_store_write_wait_seconds_count{{lane=\"{lane}\"}}"),
            )
        };
        assert!(waited("request") >= Some(4.0), "{metrics}");
        assert!(waited("hub") >= Some(1.0), "{metrics}");
        assert!(
            metrics.contains("baton_writer_groups_total{lanes=\""),
            "{metrics}"
        );
    }
    let in_error = sample(&metrics, "baton_subscriptions{status=\"error\"}");
    assert!(in_error >= Some(1.0), "{metrics}");
    let age = sample(&metrics, "baton_oldest_undelivered_event_age_seconds").unwrap();
    assert!(age >= 0.0, "{metrics}");

    // Delivered at last: the backlog series drops to 0.
    receiver.fail_with(None);
    let mut again = created.clone();
    again["status"] = serde_json::json!("requested");
    let (status, _) = server
        .put_json(&format!("/Subscription/{id}"), &server.admin(), &again)
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually("the backlog delivered", || async {
        let metrics = server.metrics().await;
        (sample(&metrics, &backlog) == Some(0.0)).then_some(())
    })
    .await;
    server.stop().await;
}

/// The `error` parameter of a subscription's `$status` once it has one.
async fn status_error(server: &TestServer, id: &str) -> serde_json::Value {
    eventually("a delivery error in $status", || async {
        let (_, bundle) = server
            .get(&format!("/Subscription/{id}/$status"), &server.admin())
            .await;
        bundle["entry"][0]["resource"]["parameter"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "error")
            .map(|p| p["valueCodeableConcept"].clone())
    })
    .await
}

#[tokio::test]
async fn a_delivery_failure_says_why_and_names_the_endpoint_host() {
    let server = TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.delivery.retry_schedule_seconds = vec![3600];
    })
    .await;
    for (endpoint, code, says) in [
        (
            "http://127.0.0.1:9/hook",
            "no-response",
            "connection refused by 127.0.0.1",
        ),
        (
            "http://baton-test.invalid/hook",
            "dns-resolution-error",
            "DNS: baton-test.invalid",
        ),
    ] {
        let body = subscription(&server.base, "task-changed", &[], endpoint, "id-only");
        let (status, created) = server
            .post_json("/Subscription", &server.admin(), &body)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        let error = status_error(&server, created["id"].as_str().unwrap()).await;
        assert_eq!(error["coding"][0]["code"], code, "{endpoint}: {error}");
        assert!(
            error["text"].as_str().is_some_and(|t| t.starts_with(says)),
            "{endpoint}: {error}"
        );
    }
    server.stop().await;
}

/// Creates a Task, sending `traceparent` with the request when given.
async fn create_task_in_trace(server: &TestServer, traceparent: Option<&str>) {
    let mut request = server
        .request(reqwest::Method::POST, "/Task", &server.admin())
        .header("content-type", "application/fhir+json");
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.json(&task("requested", None)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}

/// The `traceparent` the receiver got with the first notification carrying event `number`.
fn traceparent_of(receiver: &Receiver, subscription: &str, number: i64) -> String {
    receiver
        .of(subscription, "event-notification")
        .iter()
        .find(|r| r.event_numbers().contains(&number))
        .and_then(|r| r.headers.get("traceparent"))
        .and_then(|v| v.to_str().ok())
        .expect("a traceparent header")
        .to_string()
}

#[tokio::test]
async fn a_notification_continues_the_trace_of_the_write_that_caused_it() {
    let server = TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
    })
    .await;
    let (receiver, id, _) = subscribed(&server).await;

    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    // One at a time: a notification carrying several events continues its first one's trace.
    for (n, traceparent) in [Some(caller), None, Some("00-not-a-trace-01")]
        .into_iter()
        .enumerate()
    {
        create_task_in_trace(&server, traceparent).await;
        receiver
            .wait_for("the event", |_| receiver.event_numbers(&id).len() == n + 1)
            .await;
    }
    let sent: Vec<String> = (1..=3).map(|n| traceparent_of(&receiver, &id, n)).collect();
    // Each is a valid W3C traceparent of a span of Baton's own.
    for traceparent in &sent {
        let fields: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(fields.len(), 4, "{traceparent}");
        assert_eq!(
            (fields[0], fields[1].len(), fields[2].len()),
            ("00", 32, 16)
        );
        assert_ne!(fields[2], "00f067aa0ba902b7", "{traceparent}");
    }
    // The first continues the caller's trace; the other two each started one of their own.
    let trace = |t: &String| t.split('-').nth(1).unwrap().to_string();
    assert_eq!(trace(&sent[0]), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(trace(&sent[1]), trace(&sent[0]));
    assert_ne!(trace(&sent[2]), trace(&sent[0]));
    assert_ne!(trace(&sent[2]), trace(&sent[1]));
    server.stop().await;
}

/// An OTLP/HTTP collector that keeps every span posted to it (JSON encoding).
async fn collector() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use axum::routing::post;
    let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let mut kept = kept.lock().unwrap();
                for resource in request["resourceSpans"].as_array().into_iter().flatten() {
                    for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                        kept.extend(scope["spans"].as_array().into_iter().flatten().cloned());
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_for_the_request_the_match_and_the_delivery_reach_the_otlp_collector() {
    let (otlp, spans) = collector().await;
    let server = TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.telemetry.otlp_endpoint = Some(otlp.clone());
        c.telemetry.otlp_protocol = baton::config::OtlpProtocol::HttpJson;
    })
    .await;
    let (receiver, id, _) = subscribed(&server).await;

    let trace = "5af7651916cd43dd8448eb211c80319c";
    let caller_span = "b7ad6b7169203331";
    create_task_in_trace(&server, Some(&format!("00-{trace}-{caller_span}-01"))).await;
    receiver
        .wait_for("event 1", |_| receiver.event_numbers(&id) == [1])
        .await;
    let sent = traceparent_of(&receiver, &id, 1);
    let sent_span = sent.split('-').nth(2).unwrap().to_string();

    let of_trace = eventually("the three spans of the trace at the collector", || async {
        let spans: Vec<serde_json::Value> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s["traceId"] == trace)
            .cloned()
            .collect();
        let names: Vec<&str> = spans.iter().filter_map(|s| s["name"].as_str()).collect();
        (names.contains(&"outbox.match") && names.contains(&"delivery.attempt")).then_some(spans)
    })
    .await;
    let named = |name: &str| {
        of_trace
            .iter()
            .find(|s| s["name"].as_str().is_some_and(|n| n.contains(name)))
            .unwrap_or_else(|| panic!("no {name} span in {of_trace:?}"))
            .clone()
    };
    let request = named("POST");
    let matched = named("outbox.match");
    let delivery = named("delivery.attempt");
    // The request continues the caller's span; the match and the delivery hang under it; the
    // receiver was told the delivery span as its parent.
    assert_eq!(request["parentSpanId"], caller_span, "{request}");
    assert_eq!(matched["parentSpanId"], request["spanId"], "{matched}");
    assert_eq!(delivery["parentSpanId"], request["spanId"], "{delivery}");
    assert_eq!(delivery["spanId"], sent_span.as_str(), "{delivery}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_push_is_exported_as_a_delivery_span_of_the_writes_trace() {
    use futures::{SinkExt, StreamExt};
    let (otlp, spans) = collector().await;
    let server = TestServer::start_with(|c| {
        c.telemetry.otlp_endpoint = Some(otlp.clone());
        c.telemetry.otlp_protocol = baton::config::OtlpProtocol::HttpJson;
    })
    .await;
    let admin = server.admin();
    let mut body = subscription(&server.base, "task-changed", &[], "unused", "id-only");
    body["channel"] = serde_json::json!({
        "type": "websocket",
        "payload": "application/fhir+json",
        "_payload": body["channel"]["_payload"].clone(),
    });
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let (status, binding) = server
        .get(&format!("/Subscription/{id}/$get-ws-binding-token"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{binding}");
    let value = |name: &str| {
        binding["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["valueString"].as_str().or(p["valueUrl"].as_str()))
            .unwrap()
            .to_string()
    };
    let (mut socket, _) = tokio_tungstenite::connect_async(value("websocket-url"))
        .await
        .expect("websocket connects");
    socket
        .send(tokio_tungstenite::tungstenite::Message::text(format!(
            "bind-with-token {}",
            value("token")
        )))
        .await
        .unwrap();
    // The handshake on binding, then the event.
    let mut kinds = Vec::new();
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let caller_span = "c7ad6b7169203331";
    while !kinds.contains(&"event-notification".to_string()) {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(20), socket.next())
            .await
            .expect("a frame within 20 s")
            .expect("the socket is open")
            .expect("a valid frame");
        let tokio_tungstenite::tungstenite::Message::Text(text) = frame else {
            continue;
        };
        let bundle: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        let kind = common::receiver::parameter(&bundle, "type").unwrap_or_default();
        if kind == "handshake" {
            create_task_in_trace(&server, Some(&format!("00-{trace}-{caller_span}-01"))).await;
        }
        kinds.push(kind);
    }

    let delivery = eventually("the websocket delivery span at the collector", || async {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s["traceId"] == trace && s["name"] == "delivery.attempt")
            .cloned()
    })
    .await;
    let request = eventually("the request span", || async {
        spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s["traceId"] == trace && s["parentSpanId"] == caller_span)
            .cloned()
    })
    .await;
    assert_eq!(delivery["parentSpanId"], request["spanId"], "{delivery}");
    let attributes = delivery["attributes"].to_string();
    assert!(
        attributes.contains(r#""key":"baton.channel","value":{"stringValue":"websocket"}"#),
        "{attributes}"
    );
    assert!(attributes.contains(&id), "{attributes}");
    server.stop().await;
}
