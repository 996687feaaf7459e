//! Nothing is lost to an endpoint that stayed down: a subscription turned `off` past the retry
//! horizon keeps its undelivered events, and writing it back as `requested` handshakes again
//! and delivers them in order with their original numbers; an admin can restart delivery from
//! an event number with `$resend`, for a receiver that lost data on its side.

mod common;

use common::receiver::{Receiver, parameter};
use common::{TestServer, assert_outcome, eventually, subscription, task};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A hub that gives up fast: one failure marks `error`, retries a second apart, and a second
/// of failing turns the subscription `off`.
async fn impatient_hub() -> TestServer {
    TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.delivery.retry_schedule_seconds = vec![1];
        c.delivery.jitter_ratio = 0.0;
        c.delivery.error_after_failures = 1;
        c.delivery.off_after_seconds = 1;
    })
    .await
}

async fn status_of(server: &TestServer, id: &str) -> Value {
    let (status, bundle) = server
        .get(&format!("/Subscription/{id}/$status"), &server.admin())
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    bundle
}

/// Subscribes `receiver` to every Task change and waits until the handshake made it active.
async fn subscribe(server: &TestServer, receiver: &Receiver) -> (String, Value) {
    let body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
    let (status, created) = server
        .post_json("/Subscription", &server.admin(), &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    eventually("the subscription to become active", || async {
        (parameter(&status_of(server, &id).await, "status").as_deref() == Some("active"))
            .then_some(())
    })
    .await;
    (id, created)
}

/// An impatient hub with one subscriber that has received events 1 to `count`.
async fn delivered(count: usize) -> (TestServer, Receiver, String) {
    let server = impatient_hub().await;
    let receiver = Receiver::start().await;
    let (id, _) = subscribe(&server, &receiver).await;
    create_tasks(&server, count).await;
    let expected: Vec<i64> = (1..=count as i64).collect();
    receiver
        .wait_for("the first events", |_| {
            receiver.event_numbers(&id) == expected
        })
        .await;
    (server, receiver, id)
}

async fn create_tasks(server: &TestServer, count: usize) {
    for _ in 0..count {
        server.create_task(&task("requested", None)).await;
    }
}

async fn resend(server: &TestServer, id: &str, query: &str, token: &str) -> (StatusCode, Value) {
    let response = server
        .request(
            Method::POST,
            &format!("/Subscription/{id}/$resend{query}"),
            token,
        )
        .send()
        .await
        .unwrap();
    common::body(response).await
}

#[tokio::test]
async fn a_subscription_turned_off_and_back_on_delivers_what_it_missed_in_order() {
    let server = impatient_hub().await;
    let receiver = Receiver::start().await;
    let (id, created) = subscribe(&server, &receiver).await;

    create_tasks(&server, 1).await;
    receiver
        .wait_for("event 1", |_| receiver.event_numbers(&id) == [1])
        .await;

    // The endpoint goes down: events 2 and 3 fail until the subscription is turned off.
    receiver.fail_with(Some(503));
    create_tasks(&server, 2).await;
    let off = eventually("the subscription to be turned off", || async {
        let bundle = status_of(&server, &id).await;
        (parameter(&bundle, "status").as_deref() == Some("off")).then_some(bundle)
    })
    .await;
    assert_eq!(
        parameter(&off, "events-since-subscription-start").as_deref(),
        Some("3"),
        "{off}"
    );
    // `$status` says why, and since when nothing has arrived.
    let error = off["entry"][0]["resource"]["parameter"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "error"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        error["valueCodeableConcept"]["coding"][0]["code"], "error-response",
        "{off}"
    );
    assert!(
        error["valueCodeableConcept"]["text"]
            .as_str()
            .is_some_and(|t| t.contains("503")),
        "{off}"
    );
    assert_eq!(
        error["extension"][0]["url"],
        "https://baton.dev/fhir/StructureDefinition/last-delivered"
    );
    assert!(error["extension"][0]["valueInstant"].is_string(), "{off}");
    let (_, read) = server
        .get(&format!("/Subscription/{id}"), &server.admin())
        .await;
    assert!(
        read["error"].as_str().is_some_and(|e| e.contains("503")),
        "an off subscription says why: {read}"
    );

    // The endpoint is back and the client switches the subscription on again.
    receiver.fail_with(None);
    let mut again = created.clone();
    again["status"] = json!("requested");
    let (status, replaced) = server
        .put_json(&format!("/Subscription/{id}"), &server.admin(), &again)
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    receiver
        .wait_for("events 2 and 3 after a new handshake", |_| {
            receiver.event_numbers(&id) == [1, 2, 3]
        })
        .await;
    assert_eq!(
        receiver.of(&id, "handshake").len(),
        2,
        "re-enabling handshakes again"
    );
    eventually("active again", || async {
        (parameter(&status_of(&server, &id).await, "status").as_deref() == Some("active"))
            .then_some(())
    })
    .await;

    // New events follow on with the next numbers.
    create_tasks(&server, 1).await;
    receiver
        .wait_for("event 4", |_| receiver.event_numbers(&id) == [1, 2, 3, 4])
        .await;
    server.stop().await;
}

#[tokio::test]
async fn resend_redelivers_from_the_event_number_given() {
    let (server, receiver, id) = delivered(4).await;

    let admin = server.admin();
    let (status, bundle) = resend(&server, &id, "?eventsSinceNumber=2", &admin).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(bundle["resourceType"], "Bundle", "{bundle}");
    receiver
        .wait_for("events 2 to 4 again", |_| {
            receiver.event_numbers(&id) == [1, 2, 3, 4, 2, 3, 4]
        })
        .await;

    // Delivery goes on from where it was: the next event is 5, sent once.
    create_tasks(&server, 1).await;
    receiver
        .wait_for("event 5", |_| {
            receiver.event_numbers(&id) == [1, 2, 3, 4, 2, 3, 4, 5]
        })
        .await;
    server.stop().await;
}

#[tokio::test]
async fn a_delivery_in_flight_during_a_resend_does_not_undo_it() {
    let (server, receiver, id) = delivered(2).await;

    // Event 3 is on its way when the admin asks for everything from 2 again: the answer to
    // event 3 arrives after the restart and must not move the position past it.
    receiver.hang(Some(Duration::from_millis(1500)));
    create_tasks(&server, 1).await;
    eventually("event 3 in flight", || async {
        (receiver.hanging() == 1).then_some(())
    })
    .await;
    let (status, bundle) = resend(&server, &id, "?eventsSinceNumber=2", &server.admin()).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    receiver.hang(None);
    receiver
        .wait_for("event 3, then 2 and 3 again", |_| {
            receiver.event_numbers(&id) == [1, 2, 3, 2, 3]
        })
        .await;
    server.stop().await;
}

#[tokio::test]
async fn resend_refuses_what_it_cannot_do_and_changes_nothing() {
    let (server, receiver, id) = delivered(2).await;
    let admin = server.admin();

    for (query, code) in [
        ("", "required"),
        ("?eventsSinceNumber=abc", "invalid"),
        ("?eventsSinceNumber=0", "invalid"),
        ("?eventsSinceNumber=3", "invalid"),
        ("?eventsSinceNumber=1&eventsSinceNumber=2", "invalid"),
    ] {
        let (status, body) = resend(&server, &id, query, &admin).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_outcome(&body, code);
    }
    let (status, body) = resend(
        &server,
        &id,
        "?eventsSinceNumber=1",
        &server.practitioner("Practitioner/p1"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = resend(
        &server,
        "00000000-0000-4000-8000-000000000000",
        "?eventsSinceNumber=1",
        &admin,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // A websocket subscription has no queue to rewind: its listeners catch up with $events.
    let mut ws = subscription(&server.base, "task-changed", &[], "unused", "id-only");
    ws["channel"] = json!({ "type": "websocket", "payload": "application/fhir+json" });
    let (status, created) = server.post_json("/Subscription", &admin, &ws).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let ws_id = created["id"].as_str().unwrap();
    let (status, body) = resend(&server, ws_id, "?eventsSinceNumber=1", &admin).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_outcome(&body, "not-supported");

    // None of the refusals re-sent anything.
    create_tasks(&server, 1).await;
    receiver
        .wait_for("event 3", |_| receiver.event_numbers(&id) == [1, 2, 3])
        .await;
    server.stop().await;
}
