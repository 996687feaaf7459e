//! The AMQP channel against the real local RabbitMQ: what a consumer receives (body, properties,
//! headers), failures that must count as failed attempts (unroutable, missing exchange, no
//! broker), recovery after the broker drops the connection or disappears, and order.
//!
//! Each test declares its own uniquely named exchange and queue (or its own vhost) and deletes
//! them at the end; queues also expire on their own, so a failed test leaves nothing behind.
//! Without a reachable broker the tests fail when `CI=true` and are skipped with a note
//! otherwise. Set `BATON_TEST_AMQP_URL` to use another broker than guest@127.0.0.1:5672.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use baton::channels::SendError;
use baton::channels::amqp::{AmqpMessage, AmqpPublisher};
use baton::fhir::ids::{EventNumber, SubscriptionId};
use baton::fhir::subscription::{AmqpEndpoint, parse_amqp_endpoint};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DEFAULT_BROKER_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The per-publish timeout the tests use; generous, because the machine is shared.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a test waits for eventual state (a reconnect, a message) before failing.
const EVENTUALLY: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The publisher against a real broker.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_notifications_arrive_with_their_properties_and_headers() {
    if !broker_available("published_notifications_arrive_with_their_properties_and_headers").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let (publisher, stop) = start_publisher(&broker_url());
    let endpoint = fixture.endpoint(&fixture.exchange, "tasks");
    assert!(publisher.serves(&endpoint));

    let body = br#"{"resourceType":"Bundle","type":"history"}"#;
    let subscription = SubscriptionId::parse("sub-1").unwrap();
    publisher
        .publish(
            &endpoint,
            AmqpMessage {
                body,
                content_type: "application/fhir+json;fhirVersion=4.0",
                message_id: "sub-1/7",
                subscription_id: &subscription,
                notification_type: "event-notification",
                first_event: Some(EventNumber::new(5)),
                last_event: Some(EventNumber::new(7)),
                events_since_start: EventNumber::new(7),
                timestamp_secs: 1_700_000_000,
                traceparent: None,
            },
            PUBLISH_TIMEOUT,
        )
        .await
        .expect("publish");
    // A heartbeat carries no events, so it has no event-number headers.
    publisher
        .publish(
            &endpoint,
            AmqpMessage {
                body: b"{}",
                content_type: "application/json",
                message_id: "sub-1/heartbeat-1",
                subscription_id: &subscription,
                notification_type: "heartbeat",
                first_event: None,
                last_event: None,
                events_since_start: EventNumber::new(7),
                timestamp_secs: 1_700_000_060,
                traceparent: None,
            },
            PUBLISH_TIMEOUT,
        )
        .await
        .expect("publish heartbeat");
    assert!(publisher.is_connected());

    let received = fixture.take(2).await;
    let notification = &received[0];
    assert_eq!(notification.data, body);
    assert_eq!(notification.routing_key.as_str(), "tasks");
    let properties = &notification.properties;
    assert_eq!(
        text(properties.content_type()),
        Some("application/fhir+json;fhirVersion=4.0")
    );
    assert_eq!(text(properties.message_id()), Some("sub-1/7"));
    assert_eq!(text(properties.app_id()), Some("baton"));
    assert_eq!(*properties.delivery_mode(), Some(2), "not persistent");
    assert_eq!(*properties.timestamp(), Some(1_700_000_000));
    let headers = properties.headers().as_ref().expect("headers").inner();
    assert_eq!(header_text(headers.get("subscription-id")), Some("sub-1"));
    assert_eq!(
        header_text(headers.get("notification-type")),
        Some("event-notification")
    );
    assert_eq!(header_number(headers.get("first-event")), Some(5));
    assert_eq!(header_number(headers.get("last-event")), Some(7));
    assert_eq!(
        header_number(headers.get("events-since-subscription-start")),
        Some(7)
    );

    let heartbeat = &received[1];
    assert_eq!(
        text(heartbeat.properties.message_id()),
        Some("sub-1/heartbeat-1")
    );
    assert_eq!(
        text(heartbeat.properties.content_type()),
        Some("application/json")
    );
    let headers = heartbeat
        .properties
        .headers()
        .as_ref()
        .expect("headers")
        .inner();
    assert_eq!(
        header_text(headers.get("notification-type")),
        Some("heartbeat")
    );
    assert!(!headers.contains_key("first-event"), "{headers:?}");
    assert!(!headers.contains_key("last-event"), "{headers:?}");
    assert_eq!(
        header_number(headers.get("events-since-subscription-start")),
        Some(7)
    );

    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;
}

/// Everything logged in this test process (every thread, lapin's included), for checking
/// what a shutdown logs.
#[derive(Clone, Default)]
struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_after_publishing_logs_no_error() {
    if !broker_available("a_clean_shutdown_after_publishing_logs_no_error").await {
        return;
    }
    let log = CapturedLog::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let fixture = Fixture::declare("shutdown", Durability::Transient).await;
    let (publisher, stop) = start_publisher(&broker_url());
    let endpoint = fixture.endpoint(&fixture.exchange, "shutdown");
    // Publishes on several channels, so that shutdown has open channels to close.
    let sent =
        futures::future::join_all((1..=4).map(|n| publish_numbered(&publisher, &endpoint, n)))
            .await;
    assert!(sent.iter().all(Result::is_ok), "{sent:?}");
    fixture.take(4).await;
    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;

    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("closed the AMQP connection"),
        "the shutdown was logged:\n{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.contains(" ERROR ") || l.contains(" WARN ")),
        "a clean shutdown logs no error or warning:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_routing_key_is_a_failed_attempt() {
    if !broker_available("an_unroutable_routing_key_is_a_failed_attempt").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let (publisher, stop) = start_publisher(&broker_url());

    let nowhere = fixture.endpoint(&fixture.exchange, "nobody-listens-here");
    let error = publish_numbered(&publisher, &nowhere, 1)
        .await
        .expect_err("an unroutable message was reported as delivered");
    assert!(error.message.contains("unroutable"), "{}", error.message);
    assert!(error.message.contains("NO_ROUTE"), "{}", error.message);
    assert!(
        error.message.contains("nobody-listens-here"),
        "{}",
        error.message
    );

    // The return did not break anything: the next message, routable, arrives, and it is the
    // only one in the queue.
    let routable = fixture.endpoint(&fixture.exchange, "tasks");
    publish_numbered(&publisher, &routable, 2)
        .await
        .expect("publish after a return");
    let received = fixture.take(1).await;
    assert_eq!(message_ids(&received), ["message-2"]);
    assert_eq!(fixture.message_count().await, 0);

    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_exchange_fails_and_the_next_publish_succeeds() {
    if !broker_available("a_missing_exchange_fails_and_the_next_publish_succeeds").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let (publisher, stop) = start_publisher(&broker_url());
    let missing = format!("{}-missing", fixture.exchange);

    // Twice, so that the second attempt runs on the replacement of the channel the broker closed.
    for attempt in 1..=2 {
        let error = publish_numbered(&publisher, &fixture.endpoint(&missing, "tasks"), attempt)
            .await
            .expect_err("a publish to a missing exchange was reported as delivered");
        assert!(error.message.contains("NOT_FOUND"), "{}", error.message);
        assert!(error.message.contains(&missing), "{}", error.message);
    }

    let good = fixture.endpoint(&fixture.exchange, "tasks");
    publish_numbered(&publisher, &good, 3)
        .await
        .expect("the publish after a channel error");
    assert!(
        publisher.is_connected(),
        "a channel error closed the connection"
    );
    assert_eq!(message_ids(&fixture.take(1).await), ["message-3"]);

    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sequential_publishes_arrive_in_order() {
    if !broker_available("two_hundred_sequential_publishes_arrive_in_order").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let (publisher, stop) = start_publisher(&broker_url());
    let endpoint = fixture.endpoint(&fixture.exchange, "tasks");

    for n in 1..=200 {
        publish_numbered(&publisher, &endpoint, n)
            .await
            .unwrap_or_else(|e| panic!("publish {n}: {}", e.message));
    }
    let expected: Vec<String> = (1..=200).map(|n| format!("message-{n}")).collect();
    assert_eq!(message_ids(&fixture.take(200).await), expected);

    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_are_all_confirmed_and_delivered() {
    if !broker_available("concurrent_publishes_are_all_confirmed_and_delivered").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let (publisher, stop) = start_publisher(&broker_url());
    let endpoint = fixture.endpoint(&fixture.exchange, "tasks");

    // More publishers than channels, so some queue for a channel while others are in flight.
    let mut publishes = tokio::task::JoinSet::new();
    for n in 1..=40 {
        let publisher = publisher.clone();
        let endpoint = endpoint.clone();
        publishes.spawn(async move {
            publish_numbered(&publisher, &endpoint, n)
                .await
                .map_err(|e| format!("publish {n}: {}", e.message))
        });
    }
    while let Some(result) = publishes.join_next().await {
        result.expect("publish task").expect("publish");
    }
    let mut received = message_ids(&fixture.take(40).await);
    received.sort_by_key(|id| id["message-".len()..].parse::<u32>().unwrap());
    let expected: Vec<String> = (1..=40).map(|n| format!("message-{n}")).collect();
    assert_eq!(received, expected);
    assert_eq!(fixture.message_count().await, 0, "a message arrived twice");

    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_by_the_broker_is_reopened() {
    if !broker_available("a_connection_closed_by_the_broker_is_reopened").await {
        return;
    }
    // An own vhost, so that closing "all" connections closes this test's publisher and nobody
    // else's: other tests and other people use the same broker.
    let fixture = Fixture::declare_in_own_vhost("tasks").await;
    let (publisher, stop) = start_publisher(&fixture.url);
    let endpoint = fixture.endpoint(&fixture.exchange, "tasks");
    publish_numbered(&publisher, &endpoint, 1)
        .await
        .expect("publish before the close");

    for round in 0..2 {
        close_connections(&fixture.vhost).await;
        // The publisher reconnects by itself; publishes succeed again within a bounded time.
        let deadline = Instant::now() + EVENTUALLY;
        let mut failures = Vec::new();
        let n = 2 + round;
        loop {
            match publish_numbered(&publisher, &endpoint, n).await {
                Ok(()) => break,
                Err(e) => failures.push(e.message),
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: publishes still fail after {EVENTUALLY:?}: {failures:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(publisher.is_connected());
    for n in 4..=10 {
        publish_numbered(&publisher, &endpoint, n)
            .await
            .unwrap_or_else(|e| panic!("publish {n} after reconnecting: {}", e.message));
    }
    let expected: Vec<String> = (1..=10).map(|n| format!("message-{n}")).collect();
    assert_eq!(message_ids(&fixture.take(10).await), expected);

    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;
}

/// When the broker closes a connection that had been working (for ten seconds, to the
/// supervisor), publishes made while the hub reconnects wait for the new connection instead of
/// failing; at most the one in flight at the moment of the close fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_wait_for_the_reconnect_after_a_working_connection_is_closed() {
    if !broker_available("publishes_wait_for_the_reconnect_after_a_working_connection_is_closed")
        .await
    {
        return;
    }
    let fixture = Fixture::declare_in_own_vhost("tasks").await;
    let (publisher, stop) = start_publisher(&fixture.url);
    let endpoint = fixture.endpoint(&fixture.exchange, "tasks");
    publish_numbered(&publisher, &endpoint, 1)
        .await
        .expect("publish before the close");
    // Elapsed time, not eventual state: the connection must have worked for ten seconds.
    tokio::time::sleep(Duration::from_secs(11)).await;

    let published = Arc::new(AtomicU32::new(1));
    let done = CancellationToken::new();
    let publishing = tokio::spawn({
        let (publisher, endpoint) = (publisher.clone(), endpoint.clone());
        let (published, done) = (published.clone(), done.clone());
        async move {
            let mut failures = Vec::new();
            let mut n = 2;
            while !done.is_cancelled() {
                match publish_numbered(&publisher, &endpoint, n).await {
                    Ok(()) => {
                        published.store(n, Ordering::SeqCst);
                        n += 1;
                    }
                    Err(e) => failures.push(e.message),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failures
        }
    });
    let before = published.load(Ordering::SeqCst);
    close_connections(&fixture.vhost).await;
    let after_close = published.load(Ordering::SeqCst);
    eventually("publishes on the new connection", || async {
        (published.load(Ordering::SeqCst) >= after_close + 20).then_some(())
    })
    .await;
    done.cancel();
    let failures = publishing.await.expect("the publishing task");
    let last = published.load(Ordering::SeqCst);
    assert!(last > before, "nothing was published around the close");
    assert!(
        failures.len() <= 1,
        "publishes failed while the hub reconnected: {failures:?}"
    );

    // At least once: the publish that failed may still have reached the queue, so its message
    // can appear twice in a row, but the order holds and nothing is missing.
    let mut received = message_ids(&fixture.take(last as usize).await);
    loop {
        let mut unique = received.clone();
        unique.dedup();
        if unique.len() >= last as usize {
            break;
        }
        received.extend(message_ids(
            &fixture.take(last as usize - unique.len()).await,
        ));
    }
    received.dedup();
    let expected: Vec<String> = (1..=last).map(|n| format!("message-{n}")).collect();
    assert_eq!(received, expected);

    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_fast_and_is_used_again_when_it_returns() {
    if !broker_available("an_unreachable_broker_fails_fast_and_is_used_again_when_it_returns").await
    {
        return;
    }
    // The outage is a TCP proxy in front of the broker going away and coming back on the same
    // port: for the hub that is a broker outage, and the shared broker itself stays up.
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let mut proxy = Proxy::start(0, broker_address()).await;
    let proxied = with_port(&broker_url(), proxy.port);
    let (publisher, stop) = start_publisher(&proxied);
    let endpoint = parse_amqp_endpoint(&format!(
        "amqp://127.0.0.1:{}/%2F?exchange={}&routing_key=tasks",
        proxy.port, fixture.exchange
    ))
    .unwrap();
    publish_numbered(&publisher, &endpoint, 1)
        .await
        .expect("publish before the outage");

    proxy.stop().await;
    eventually("the publisher to notice the outage", || async {
        (!publisher.is_connected()).then_some(())
    })
    .await;
    let started = Instant::now();
    let error = publish_numbered(&publisher, &endpoint, 2)
        .await
        .expect_err("a publish without a broker was reported as delivered");
    assert!(
        error
            .message
            .starts_with("no connection to the AMQP broker"),
        "{}",
        error.message
    );
    // The failure is known, so the attempt does not hold a delivery worker until its timeout.
    assert!(
        started.elapsed() < PUBLISH_TIMEOUT / 2,
        "the failed publish took {:?}",
        started.elapsed()
    );

    proxy = Proxy::start(proxy.port, broker_address()).await;
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        match publish_numbered(&publisher, &endpoint, 3).await {
            Ok(()) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "publishes still fail {EVENTUALLY:?} after the broker returned: {}",
                e.message
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(publisher.is_connected());
    assert_eq!(
        message_ids(&fixture.take(2).await),
        ["message-1", "message-3"]
    );

    stop_publisher(&publisher, &stop).await;
    proxy.stop().await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_publishes_with_the_brokers_reason() {
    if !broker_available("refused_credentials_fail_publishes_with_the_brokers_reason").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let mut url = reqwest::Url::parse(&broker_url()).unwrap();
    url.set_password(Some("not-the-password")).unwrap();
    let (publisher, stop) = start_publisher(url.as_str());
    let error = publish_numbered(&publisher, &fixture.endpoint(&fixture.exchange, "tasks"), 1)
        .await
        .expect_err("published with refused credentials");
    assert!(
        error.message.contains("ACCESS_REFUSED"),
        "{}",
        error.message
    );
    assert!(
        !error.message.contains("not-the-password"),
        "{}",
        error.message
    );
    assert!(!publisher.is_connected());
    assert_eq!(fixture.message_count().await, 0);
    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_connection_and_stops_publishing() {
    if !broker_available("shutdown_closes_the_connection_and_stops_publishing").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let (publisher, stop) = start_publisher(&broker_url());
    let endpoint = fixture.endpoint(&fixture.exchange, "tasks");
    publish_numbered(&publisher, &endpoint, 1)
        .await
        .expect("publish");

    stop_publisher(&publisher, &stop).await;
    assert!(!publisher.is_connected());
    let error = publish_numbered(&publisher, &endpoint, 2)
        .await
        .expect_err("published after shutdown");
    assert!(error.message.contains("shut down"), "{}", error.message);
    assert_eq!(message_ids(&fixture.take(1).await), ["message-1"]);
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_naming_another_broker_are_not_published_to() {
    // No broker is needed: the publisher refuses before it would connect.
    let (publisher, stop) = start_publisher("amqp://guest:guest@127.0.0.1:5672/%2f");
    let elsewhere = parse_amqp_endpoint("amqp://localhost:5672/%2F?exchange=baton").unwrap();
    assert!(!publisher.serves(&elsewhere));
    assert!(
        publisher
            .check_endpoint(&elsewhere)
            .unwrap_err()
            .contains("127.0.0.1:5672")
    );
    let other_vhost = parse_amqp_endpoint("amqp://127.0.0.1/prod?exchange=baton").unwrap();
    assert!(!publisher.serves(&other_vhost));
    let error = publish_numbered(&publisher, &elsewhere, 1)
        .await
        .expect_err("published to another broker");
    assert!(error.message.contains("broker"), "{}", error.message);
    stop.cancel();

    assert!(
        AmqpPublisher::start(
            "amqps://u:secret@rabbit/",
            4,
            CancellationToken::new(),
            Default::default()
        )
        .is_err()
    );
    let error = AmqpPublisher::start(
        "amqp:u:secret@rabbit",
        4,
        CancellationToken::new(),
        Default::default(),
    )
    .err()
    .expect("a malformed URL was accepted");
    assert!(!error.contains("secret"), "{error}");
}

/// A broker restart: a persistent message in a durable queue survives it, the publisher fails
/// while the broker is down and publishes again, in order, once it is back. It stops the shared
/// broker's application for a few seconds, which would break anyone else's test running then,
/// so it only runs on request: `cargo test --test amqp -- --ignored a_broker_restart`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops and starts the shared RabbitMQ application; run it alone"]
async fn a_broker_restart_is_survived_without_losing_messages() {
    if !broker_available("a_broker_restart_is_survived_without_losing_messages").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Durable).await;
    let (publisher, stop) = start_publisher(&broker_url());
    let endpoint = fixture.endpoint(&fixture.exchange, "tasks");
    publish_numbered(&publisher, &endpoint, 1)
        .await
        .expect("publish before the restart");

    rabbitmqctl(&["stop_app"]).await;
    let down = publish_numbered(&publisher, &endpoint, 2).await;
    rabbitmqctl(&["start_app"]).await;
    rabbitmqctl(&["await_startup"]).await;
    assert!(down.is_err(), "published while the broker was stopped");

    let deadline = Instant::now() + EVENTUALLY;
    loop {
        match publish_numbered(&publisher, &endpoint, 3).await {
            Ok(()) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "publishes still fail {EVENTUALLY:?} after the restart: {}",
                e.message
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in 4..=6 {
        publish_numbered(&publisher, &endpoint, n)
            .await
            .unwrap_or_else(|e| panic!("publish {n}: {}", e.message));
    }
    // Message 1 was in the durable queue during the restart; 2 was never confirmed.
    assert_eq!(
        message_ids(&fixture.take(5).await),
        [
            "message-1",
            "message-3",
            "message-4",
            "message-5",
            "message-6"
        ]
    );

    stop_publisher(&publisher, &stop).await;
    fixture.delete().await;
}

// ---------------------------------------------------------------------------------------------
// End to end through the hub: these need the delivery wiring of the message channel.

/// A `message` Subscription publishing to `fixture`'s exchange with `routing_key`.
fn message_subscription(
    base: &str,
    fixture: &Fixture,
    routing_key: &str,
    filters: &[&str],
    content: &str,
) -> Value {
    let mut body = common::subscription(
        base,
        "task-status-changed",
        filters,
        "https://unused.example",
        content,
    );
    body["channel"]["type"] = json!("message");
    body["channel"]["endpoint"] = json!(fixture.endpoint_url(&fixture.exchange, routing_key));
    body["channel"].as_object_mut().unwrap().remove("header");
    body
}

async fn amqp_hub(url: &str) -> common::TestServer {
    let url = url.to_string();
    common::TestServer::start_with(move |c| {
        c.amqp_url = Some(url);
        c.delivery.retry_schedule_seconds = vec![1];
        c.delivery.jitter_ratio = 0.0;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_subscription_delivers_bundles_in_order_with_headers() {
    if !broker_available("a_message_subscription_delivers_bundles_in_order_with_headers").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let server = amqp_hub(&broker_url()).await;
    let admin = server.admin();
    let body = message_subscription(&server.base, &fixture, "tasks", &[], "full-resource");
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();

    let handshake = fixture.take(1).await;
    let headers = handshake[0].properties.headers().as_ref().unwrap().inner();
    assert_eq!(
        header_text(headers.get("notification-type")),
        Some("handshake")
    );
    assert_eq!(
        header_text(headers.get("subscription-id")),
        Some(id.as_str())
    );
    common::eventually("the subscription to be active", || async {
        let (_, s) = server.get(&format!("/Subscription/{id}"), &admin).await;
        (s["status"] == "active").then_some(())
    })
    .await;

    // The create continues the caller's trace; its notification carries it on.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let response = server
        .request(reqwest::Method::POST, "/Task", &admin)
        .header("content-type", "application/fhir+json")
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&common::task("requested", None))
        .send()
        .await
        .unwrap();
    let (code, task) = common::body(response).await;
    assert_eq!(code, StatusCode::CREATED, "{task}");
    let task_id = task["id"].as_str().unwrap();
    for status in ["accepted", "in-progress", "completed"] {
        let mut changed = task.clone();
        changed["status"] = json!(status);
        changed.as_object_mut().unwrap().remove("meta");
        let (code, updated) = server
            .put_json(&format!("/Task/{task_id}"), &admin, &changed)
            .await;
        assert_eq!(code, StatusCode::OK, "{updated}");
    }
    // Notifications may batch events; together they carry 1..=4 exactly once, in order.
    let mut numbers = Vec::new();
    let mut message_ids = std::collections::HashSet::new();
    while numbers.len() < 4 {
        let delivery = fixture.take(1).await.remove(0);
        let properties = &delivery.properties;
        assert_eq!(*properties.delivery_mode(), Some(2));
        assert_eq!(
            text(properties.content_type()),
            Some("application/fhir+json")
        );
        let message_id = text(properties.message_id())
            .expect("message_id")
            .to_string();
        assert!(message_ids.insert(message_id), "a message_id was reused");
        let bundle: Value = serde_json::from_slice(&delivery.data).expect("a JSON Bundle");
        assert_eq!(bundle["resourceType"], "Bundle");
        // The body is the rest-hook notification: with full-resource, the Tasks themselves.
        let resources: Vec<&Value> = bundle["entry"].as_array().unwrap()[1..]
            .iter()
            .map(|entry| &entry["resource"])
            .collect();
        assert!(!resources.is_empty(), "no resources in {bundle}");
        assert!(
            resources
                .iter()
                .all(|r| r["resourceType"] == "Task" && r["id"] == task_id),
            "{bundle}"
        );
        let carried = common::receiver::event_numbers(&bundle);
        let headers = properties.headers().as_ref().unwrap().inner();
        if carried.first() == Some(&1) {
            let traceparent = header_text(headers.get("traceparent")).expect("a traceparent");
            assert_eq!(
                traceparent.split('-').nth(1),
                Some(trace_id),
                "{traceparent}"
            );
            assert_ne!(traceparent.split('-').nth(2), Some("b7ad6b7169203331"));
        }
        assert_eq!(
            header_text(headers.get("notification-type")),
            Some("event-notification")
        );
        assert_eq!(
            header_number(headers.get("first-event")),
            carried.first().copied()
        );
        assert_eq!(
            header_number(headers.get("last-event")),
            carried.last().copied()
        );
        numbers.extend(carried);
    }
    assert_eq!(numbers, [1, 2, 3, 4]);

    server.stop().await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_subscription_to_another_broker_is_rejected() {
    if !broker_available("a_message_subscription_to_another_broker_is_rejected").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let server = amqp_hub(&broker_url()).await;
    let mut body = message_subscription(&server.base, &fixture, "tasks", &[], "id-only");
    body["channel"]["endpoint"] = json!(format!(
        "amqp://rabbit.elsewhere.example/%2F?exchange={}",
        fixture.exchange
    ));
    let (status, outcome) = server
        .post_json("/Subscription", &server.admin(), &body)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    common::assert_outcome(&outcome, "invalid");
    server.stop().await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_routing_key_puts_the_subscription_in_error() {
    if !broker_available("an_unroutable_routing_key_puts_the_subscription_in_error").await {
        return;
    }
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let server = amqp_hub(&broker_url()).await;
    let admin = server.admin();
    let body = message_subscription(
        &server.base,
        &fixture,
        "nobody-listens-here",
        &[],
        "id-only",
    );
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let subscription = common::eventually("the subscription to be in error", || async {
        let (_, s) = server.get(&format!("/Subscription/{id}"), &admin).await;
        (s["status"] == "error").then_some(s)
    })
    .await;
    assert!(
        subscription["error"].to_string().contains("unroutable"),
        "{subscription}"
    );
    assert_eq!(fixture.message_count().await, 0);
    server.stop().await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_published_across_a_dropped_connection_all_arrive_in_order() {
    if !broker_available("events_published_across_a_dropped_connection_all_arrive_in_order").await {
        return;
    }
    let fixture = Fixture::declare_in_own_vhost("tasks").await;
    let server = amqp_hub(&fixture.url).await;
    let admin = server.admin();
    let body = message_subscription(&server.base, &fixture, "tasks", &[], "id-only");
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(fixture.take(1).await.len(), 1, "no handshake");

    // Tasks change while the hub's connection is closed from the broker side, twice.
    for round in 0..3 {
        for _ in 0..5 {
            server.create_task(&common::task("requested", None)).await;
        }
        if round < 2 {
            close_connections(&fixture.vhost).await;
        }
    }
    assert_in_order_at_least_once(&fixture, 15).await;
    server.stop().await;
    fixture.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_while_the_broker_is_unreachable_and_then_arrive_in_order() {
    if !broker_available("events_wait_while_the_broker_is_unreachable_and_then_arrive_in_order")
        .await
    {
        return;
    }
    // The hub reaches the broker through a proxy that goes away: a broker outage for the hub
    // that leaves the shared broker running.
    let fixture = Fixture::declare("tasks", Durability::Transient).await;
    let mut proxy = Proxy::start(0, broker_address()).await;
    let server = amqp_hub(&with_port(&broker_url(), proxy.port)).await;
    let admin = server.admin();
    let mut body = message_subscription(&server.base, &fixture, "tasks", &[], "id-only");
    body["channel"]["endpoint"] = json!(format!(
        "amqp://127.0.0.1:{}/%2F?exchange={}&routing_key=tasks",
        proxy.port, fixture.exchange
    ));
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(fixture.take(1).await.len(), 1, "no handshake");
    for _ in 0..3 {
        server.create_task(&common::task("requested", None)).await;
    }

    proxy.stop().await;
    for _ in 0..5 {
        server.create_task(&common::task("requested", None)).await;
    }
    // Deliveries fail while the broker is away, so the subscription shows the error.
    let failing = common::eventually("the subscription to record failures", || async {
        let (_, s) = server.get(&format!("/Subscription/{id}"), &admin).await;
        (s["status"] == "error").then_some(s)
    })
    .await;
    assert!(failing["error"].to_string().contains("AMQP"), "{failing}");

    proxy = Proxy::start(proxy.port, broker_address()).await;
    for _ in 0..2 {
        server.create_task(&common::task("requested", None)).await;
    }
    assert_in_order_at_least_once(&fixture, 10).await;
    common::eventually("the subscription to be active again", || async {
        let (_, s) = server.get(&format!("/Subscription/{id}"), &admin).await;
        (s["status"] == "active").then_some(())
    })
    .await;
    server.stop().await;
    proxy.stop().await;
    fixture.delete().await;
}

/// Consumes event notifications until events 1..=`count` have all arrived, and checks the
/// at-least-once ordering guarantee: every notification carries consecutive events and starts
/// no later than right after the highest event seen so far. A notification whose confirm was
/// lost may come again, possibly batched with later events, but nothing is skipped.
async fn assert_in_order_at_least_once(fixture: &Fixture, count: i64) {
    let mut highest = 0;
    let mut notifications = Vec::new();
    while highest < count {
        let delivery = fixture.take(1).await.remove(0);
        let bundle: Value = serde_json::from_slice(&delivery.data).expect("a JSON Bundle");
        let numbers = common::receiver::event_numbers(&bundle);
        let (Some(&first), Some(&last)) = (numbers.first(), numbers.last()) else {
            continue;
        };
        assert!(
            numbers.windows(2).all(|pair| pair[1] == pair[0] + 1),
            "a notification carries non-consecutive events {numbers:?}"
        );
        assert!(
            first <= highest + 1,
            "events {} to {} were skipped; notifications so far: {notifications:?}",
            highest + 1,
            first - 1
        );
        highest = highest.max(last);
        notifications.push(numbers);
    }
    assert_eq!(
        highest, count,
        "more events than expected: {notifications:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers.

/// The broker the tests use, with credentials.
fn broker_url() -> String {
    std::env::var("BATON_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_BROKER_URL.to_string())
}

/// `host:port` of the test broker, for messages and the proxy (never the credentials).
fn broker_host_port() -> (String, u16) {
    let url = reqwest::Url::parse(&broker_url()).expect("BATON_TEST_AMQP_URL is a URL");
    (
        url.host_str().expect("a broker host").to_string(),
        url.port().unwrap_or(5672),
    )
}

fn broker_address() -> SocketAddr {
    let (host, port) = broker_host_port();
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .expect("the broker host resolves")
        .next()
        .expect("the broker host has an address")
}

/// The test broker URL with another port (the proxy's) and host 127.0.0.1.
fn with_port(url: &str, port: u16) -> String {
    let mut url = reqwest::Url::parse(url).unwrap();
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(port)).unwrap();
    url.to_string()
}

/// Whether the tests can use the broker. With `CI=true` an unreachable broker fails the test,
/// because CI must exercise the AMQP channel for real; elsewhere the test prints a note and
/// returns early, so that `cargo test` works on a machine without RabbitMQ.
async fn broker_available(test: &str) -> bool {
    let (host, port) = broker_host_port();
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&broker_url(), ConnectionProperties::default()),
    )
    .await;
    let problem = match attempt {
        Ok(Ok(connection)) => {
            let _ = connection.close(200, "OK".into()).await;
            return true;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 10s".to_string(),
    };
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!(
            "{test}: RabbitMQ is required when CI=true, but the broker at {host}:{port} is \
             unreachable: {problem}"
        );
    }
    eprintln!(
        "note: {test} skipped: RabbitMQ at {host}:{port} is unreachable ({problem}); with CI=true \
         this fails"
    );
    false
}

fn start_publisher(url: &str) -> (AmqpPublisher, CancellationToken) {
    let stop = CancellationToken::new();
    let publisher =
        AmqpPublisher::start(url, 4, stop.clone(), Default::default()).expect("a valid broker URL");
    (publisher, stop)
}

async fn stop_publisher(publisher: &AmqpPublisher, stop: &CancellationToken) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), publisher.closed())
        .await
        .expect("the publisher did not close its connection");
}

/// Publishes a small notification numbered `n`, with message id `message-N`.
async fn publish_numbered(
    publisher: &AmqpPublisher,
    endpoint: &AmqpEndpoint,
    n: u32,
) -> Result<(), SendError> {
    let message_id = format!("message-{n}");
    let subscription = SubscriptionId::parse("sub-1").unwrap();
    let number = EventNumber::new(i64::from(n));
    let message = AmqpMessage {
        body: b"{\"resourceType\":\"Bundle\"}",
        content_type: "application/fhir+json",
        message_id: &message_id,
        subscription_id: &subscription,
        notification_type: "event-notification",
        first_event: Some(number),
        last_event: Some(number),
        events_since_start: number,
        timestamp_secs: 1_700_000_000,
        traceparent: None,
    };
    publisher.publish(endpoint, message, PUBLISH_TIMEOUT).await
}

fn message_ids(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| {
            text(d.properties.message_id())
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn text(value: &Option<lapin::types::ShortString>) -> Option<&str> {
    value.as_ref().map(|s| s.as_str())
}

fn header_text(value: Option<&AMQPValue>) -> Option<&str> {
    match value? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        other => panic!("expected a string header, got {other:?}"),
    }
}

fn header_number(value: Option<&AMQPValue>) -> Option<i64> {
    match value? {
        AMQPValue::LongLongInt(n) => Some(*n),
        other => panic!("expected a 64-bit integer header, got {other:?}"),
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<()>>,
{
    let deadline = Instant::now() + EVENTUALLY;
    while check().await.is_none() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `rabbitmqctl` and returns its output; a failure to run it fails the test.
async fn rabbitmqctl(args: &[&str]) -> String {
    let output = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("could not run rabbitmqctl {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {stdout}{stderr}"
    );
    format!("{stdout}{stderr}")
}

/// Closes every connection to `vhost` from the broker side, and checks that there was one.
async fn close_connections(vhost: &str) {
    let output = rabbitmqctl(&[
        "close_all_connections",
        "--vhost",
        vhost,
        "closed by the baton amqp test",
    ])
    .await;
    let closed = output
        .split("Closed ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse::<u32>().ok());
    assert!(
        closed.is_some_and(|count| count > 0),
        "rabbitmqctl closed no connection, so the publisher had none: {output}"
    );
}

#[derive(Clone, Copy, PartialEq)]
enum Durability {
    /// Gone with the broker's restart; enough for every test but the restart one.
    Transient,
    /// Survives a broker restart.
    Durable,
}

/// A test's own exchange (direct) and queue, bound under one routing key.
struct Fixture {
    /// The broker URL for `vhost`, with credentials.
    url: String,
    vhost: String,
    exchange: String,
    queue: String,
    own_vhost: bool,
}

impl Fixture {
    async fn declare(routing_key: &str, durability: Durability) -> Fixture {
        let (_, _, _, vhost) = parts();
        let fixture = Fixture {
            url: broker_url(),
            vhost,
            exchange: unique_name("exchange"),
            queue: unique_name("queue"),
            own_vhost: false,
        };
        fixture.declare_topology(routing_key, durability).await;
        fixture
    }

    /// The same in a vhost of its own, created for the test.
    async fn declare_in_own_vhost(routing_key: &str) -> Fixture {
        let vhost = unique_name("vhost");
        let mut url = reqwest::Url::parse(&broker_url()).unwrap();
        url.set_path(&format!("/{vhost}"));
        rabbitmqctl(&["add_vhost", &vhost]).await;
        // From here on, dropping the fixture deletes the vhost, even if a step below fails.
        let fixture = Fixture {
            url: url.to_string(),
            vhost,
            exchange: unique_name("exchange"),
            queue: unique_name("queue"),
            own_vhost: true,
        };
        let (user, _, _, _) = parts();
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &fixture.vhost,
            &user,
            ".*",
            ".*",
            ".*",
        ])
        .await;
        fixture
            .declare_topology(routing_key, Durability::Transient)
            .await;
        fixture
    }

    async fn declare_topology(&self, routing_key: &str, durability: Durability) {
        let (connection, channel) = self.connect().await;
        let durable = durability == Durability::Durable;
        // The exchange goes when its queue does, and the queue expires ten minutes after its
        // last use, so that a test failing before its clean-up leaves nothing behind for long.
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable,
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the exchange");
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("declare the queue");
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind the queue");
        let _ = connection.close(200, "OK".into()).await;
    }

    /// A connection of the test's own, opened per operation so that closing the publisher's
    /// connections from the broker side never closes it.
    async fn connect(&self) -> (Connection, Channel) {
        let connection = Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .expect("the test's own connection to the broker");
        let channel = connection.create_channel().await.expect("a channel");
        (connection, channel)
    }

    /// The endpoint URL a Subscription would carry for `exchange` and `routing_key` here.
    fn endpoint_url(&self, exchange: &str, routing_key: &str) -> String {
        let (_, host, port, _) = parts();
        let vhost = if self.vhost == "/" {
            "%2F".to_string()
        } else {
            self.vhost.clone()
        };
        format!("amqp://{host}:{port}/{vhost}?exchange={exchange}&routing_key={routing_key}")
    }

    fn endpoint(&self, exchange: &str, routing_key: &str) -> AmqpEndpoint {
        parse_amqp_endpoint(&self.endpoint_url(exchange, routing_key)).expect("a valid endpoint")
    }

    /// Consumes the next `count` messages, failing if they do not arrive in time.
    async fn take(&self, count: usize) -> Vec<Delivery> {
        let (connection, channel) = self.connect().await;
        channel
            .basic_qos(count.min(1000) as u16, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                "baton-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut received = Vec::with_capacity(count);
        let deadline = Instant::now() + EVENTUALLY;
        while received.len() < count {
            let next = tokio::time::timeout_at(deadline, consumer.next()).await;
            let delivery = match next {
                Ok(Some(Ok(delivery))) => delivery,
                Ok(Some(Err(e))) => panic!("consuming failed: {e}"),
                Ok(None) => panic!("the consumer was cancelled"),
                Err(_) => panic!(
                    "only {} of {count} messages arrived within {EVENTUALLY:?}",
                    received.len()
                ),
            };
            delivery
                .ack(lapin::options::BasicAckOptions::default())
                .await
                .expect("ack");
            received.push(delivery);
        }
        // Closing the channel returns any prefetched but unacknowledged message to the queue.
        let _ = channel.close(200, "OK".into()).await;
        let _ = connection.close(200, "OK".into()).await;
        received
    }

    /// How many messages wait in the queue now.
    async fn message_count(&self) -> u32 {
        let (connection, channel) = self.connect().await;
        let queue = channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the queue exists");
        let _ = connection.close(200, "OK".into()).await;
        queue.message_count()
    }

    async fn delete(mut self) {
        if self.own_vhost {
            rabbitmqctl(&["delete_vhost", &self.vhost]).await;
            self.own_vhost = false;
            return;
        }
        let (connection, channel) = self.connect().await;
        channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await
            .expect("delete the exchange");
        channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the queue");
        let _ = connection.close(200, "OK".into()).await;
    }
}

impl Drop for Fixture {
    /// A vhost does not expire like the queues in it, so a test that failed before `delete`
    /// removes its vhost here, while unwinding.
    fn drop(&mut self) {
        if self.own_vhost {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["delete_vhost", &self.vhost])
                .output();
        }
    }
}

/// User, host, port and decoded vhost of the test broker URL.
fn parts() -> (String, String, u16, String) {
    let url = reqwest::Url::parse(&broker_url()).expect("BATON_TEST_AMQP_URL is a URL");
    let user = match url.username() {
        "" => "guest".to_string(),
        user => user.to_string(),
    };
    let vhost = match url.path() {
        "" | "/" | "/%2f" | "/%2F" => "/".to_string(),
        path => path[1..].to_string(),
    };
    let (host, port) = broker_host_port();
    (user, host, port, vhost)
}

fn unique_name(kind: &str) -> String {
    format!("baton-test-{kind}-{}", uuid::Uuid::new_v4().simple())
}

/// A TCP proxy to the broker that can be stopped and started again on the same port, to make
/// the broker unreachable for the hub without touching the shared broker.
struct Proxy {
    port: u16,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(port: u16, upstream: SocketAddr) -> Proxy {
        // The old listener may take a moment to be released after `stop`.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(listener) => break listener,
                Err(e) => {
                    assert!(Instant::now() < deadline, "could not bind port {port}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let port = listener.local_addr().unwrap().port();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    () = stopped.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
            // Dropping the listener and every proxied connection is the outage.
            connections.shutdown().await;
        });
        Proxy { port, stop, task }
    }

    async fn stop(&mut self) {
        self.stop.cancel();
        (&mut self.task).await.expect("the proxy task");
    }
}
