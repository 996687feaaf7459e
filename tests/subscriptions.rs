//! Subscriptions end to end with a real webhook receiver: handshake, filters, content levels,
//! event numbering, `$status`, `$events`, the read rule, signing, heartbeats, outages and
//! rejections.

mod common;

use common::receiver::{Receiver, parameter};
use common::{TestServer, assert_outcome, body, eventually, subscription, task};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn subscribe(server: &TestServer, token: &str, body: &Value) -> String {
    let (status, created) = server.post_json("/Subscription", token, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["status"], "requested");
    created["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn status_changes_reach_the_owner_filtered_hook_in_order() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let body = subscription(
        &server.base,
        "task-status-changed",
        &["Task?owner=Practitioner/1"],
        &receiver.url,
        "id-only",
    );
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED);
    // The create response carries what the client sent, headers included (Inferno reads them).
    assert_eq!(created["channel"]["header"][0], "X-Test-Token: secret-123");
    let id = created["id"].as_str().unwrap().to_string();

    // Handshake first, with status requested; then the subscription is active.
    let received = receiver.wait_for("handshake", |r| !r.is_empty()).await;
    let handshake = &received[0];
    assert_eq!(handshake.kind(), "handshake");
    assert_eq!(
        parameter(&handshake.body, "status").as_deref(),
        Some("requested")
    );
    assert_eq!(handshake.headers["x-test-token"], "secret-123");
    assert!(
        handshake.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json")
    );
    eventually("active", || async {
        let (_, s) = server.get(&format!("/Subscription/{id}"), &admin).await;
        (s["status"] == "active").then_some(())
    })
    .await;

    // Tasks for owner 1 notify; owner 2 does not; an update that keeps the status does not.
    let mine = server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await;
    server
        .create_task(&task("requested", Some("Practitioner/2")))
        .await;
    let task_id = mine["id"].as_str().unwrap();
    let mut next = mine.clone();
    next["description"] = json!("same status, new text");
    assert_eq!(
        server
            .put_json(&format!("/Task/{task_id}"), &admin, &next)
            .await
            .0,
        StatusCode::OK
    );
    for status in ["accepted", "in-progress", "completed"] {
        let patch = json!([{ "op": "replace", "path": "/status", "value": status }]);
        let r = server
            .request(Method::PATCH, &format!("/Task/{task_id}"), &admin)
            .header("content-type", "application/json-patch+json")
            .body(patch.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    receiver
        .wait_for("four events", |_| receiver.event_numbers(&id).len() >= 4)
        .await;
    assert_eq!(
        receiver.event_numbers(&id),
        vec![1, 2, 3, 4],
        "contiguous, in order, no duplicates"
    );
    for (i, event) in receiver.of(&id, "event-notification").iter().enumerate() {
        let bundle = &event.body;
        assert_eq!(bundle["type"], "history");
        assert_eq!(parameter(bundle, "status").as_deref(), Some("active"));
        for entry in bundle["entry"].as_array().unwrap() {
            assert!(
                entry["request"].is_object() && entry["response"].is_object(),
                "every entry has request and response"
            );
        }
        let focus_entry = &bundle["entry"][1];
        assert_eq!(
            focus_entry["fullUrl"],
            format!("{}/Task/{task_id}", server.base)
        );
        assert!(
            focus_entry.get("resource").is_none(),
            "id-only carries no resource"
        );
        assert!(
            bundle["entry"][0]["request"]["url"]
                .as_str()
                .unwrap()
                .ends_with(&format!("Subscription/{id}/$status"))
        );
        // The counter covers at least every event this notification carries.
        let since: i64 = parameter(bundle, "events-since-subscription-start")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            since >= event.event_numbers()[0],
            "notification {i}: {since}"
        );
    }

    // $status and $events agree with what was delivered.
    let (status, status_bundle) = server
        .get(&format!("/Subscription/{id}/$status"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(status_bundle["type"], "searchset");
    let params = &status_bundle["entry"][0]["resource"];
    assert_eq!(params["resourceType"], "Parameters");
    let events_count = params["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "events-since-subscription-start")
        .unwrap();
    assert_eq!(events_count["valueString"], "4");
    let (status, replay) = server.get(&format!("/Subscription/{id}/$events?eventsSinceNumber=2&eventsUntilNumber=3&content=full-resource"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(parameter(&replay, "type").as_deref(), Some("query-event"));
    let numbers: Vec<String> = replay["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .map(|p| p["part"][0]["valueString"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(numbers, ["2", "3"]);
    assert_eq!(
        replay["entry"][1]["resource"]["status"], "accepted",
        "full-resource replays the exact version"
    );
    assert_eq!(replay["entry"][2]["resource"]["status"], "in-progress");

    // The type-level $status lists it too.
    let (_, all) = server
        .get("/Subscription/$status?status=active", &admin)
        .await;
    assert_eq!(all["entry"].as_array().unwrap().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn content_levels_follow_the_ig() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let mut ids = std::collections::HashMap::new();
    for content in ["empty", "id-only", "full-resource"] {
        let id = subscribe(
            &server,
            &admin,
            &subscription(
                &server.base,
                "task-changed",
                &["status=ready"],
                &receiver.url,
                content,
            ),
        )
        .await;
        ids.insert(content, id);
    }
    receiver
        .wait_for("three handshakes", |r| {
            r.iter().filter(|x| x.kind() == "handshake").count() == 3
        })
        .await;
    let created = server.create_task(&task("ready", None)).await;
    let task_id = created["id"].as_str().unwrap();
    for (content, id) in &ids {
        receiver
            .wait_for(content, |_| {
                !receiver.of(id, "event-notification").is_empty()
            })
            .await;
        let bundle = &receiver.of(id, "event-notification")[0].body;
        let entries = bundle["entry"].as_array().unwrap();
        let params = bundle["entry"][0]["resource"]["parameter"]
            .as_array()
            .unwrap();
        let event = params
            .iter()
            .find(|p| p["name"] == "notification-event")
            .expect("a notification-event");
        let focus = event["part"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "focus");
        match *content {
            "empty" => {
                assert_eq!(entries.len(), 1, "empty has only the status");
                assert!(focus.is_none(), "empty has no focus");
                assert!(
                    parameter(bundle, "topic").is_none(),
                    "empty does not name the topic"
                );
            }
            "id-only" => {
                assert_eq!(entries.len(), 2);
                assert!(entries[1].get("resource").is_none());
                assert_eq!(
                    entries[1]["fullUrl"],
                    format!("{}/Task/{task_id}", server.base)
                );
                assert!(focus.is_some());
            }
            _ => {
                assert_eq!(entries.len(), 2);
                assert_eq!(entries[1]["resource"]["id"], task_id.to_string());
                assert_eq!(entries[1]["request"]["method"], "POST");
                let reference = focus.unwrap()["valueReference"]["reference"]
                    .as_str()
                    .unwrap()
                    .to_string();
                assert_eq!(
                    reference,
                    entries[1]["fullUrl"].as_str().unwrap(),
                    "the focus resolves to an entry"
                );
                assert!(parameter(bundle, "topic").is_some());
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_practitioners_broad_subscription_carries_only_its_own_tasks() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let alice = server.practitioner("Practitioner/alice");
    let id = subscribe(
        &server,
        &alice,
        &subscription(
            &server.base,
            "task-changed",
            &[],
            &receiver.url,
            "full-resource",
        ),
    )
    .await;
    receiver.wait_for("handshake", |r| !r.is_empty()).await;
    let bobs = server
        .create_task(&task("requested", Some("Practitioner/bob")))
        .await;
    let alices = server
        .create_task(&task("requested", Some("Practitioner/alice")))
        .await;
    receiver
        .wait_for("alice's event", |_| !receiver.event_numbers(&id).is_empty())
        .await;
    // Give Bob's earlier write every chance to have shown up wrongly.
    let (_, status) = server
        .get(&format!("/Subscription/{id}/$status"), &alice)
        .await;
    let count = status["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "events-since-subscription-start")
        .unwrap()["valueString"]
        .clone();
    assert_eq!(count, "1", "bob's task was never an event for alice");
    let delivered: Vec<String> = receiver
        .of(&id, "event-notification")
        .iter()
        .map(|r| {
            r.body["entry"][1]["resource"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(delivered, vec![alices["id"].as_str().unwrap().to_string()]);
    assert!(!receiver.received().iter().any(|r| {
        r.raw
            .windows(bobs["id"].as_str().unwrap().len())
            .any(|w| w == bobs["id"].as_str().unwrap().as_bytes())
    }));
    // Others' subscriptions are not Alice's business.
    let bob = server.practitioner("Practitioner/bob");
    assert_eq!(
        server.get(&format!("/Subscription/{id}"), &bob).await.0,
        StatusCode::FORBIDDEN
    );
    let (_, admin_view) = server
        .get(&format!("/Subscription/{id}"), &server.admin())
        .await;
    assert_eq!(
        admin_view["channel"]["header"][0], "X-Test-Token: ****",
        "header values hidden from non-authors"
    );
    server.stop().await;
}

#[tokio::test]
async fn filters_owner_missing_and_status_not() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let queue = subscribe(
        &server,
        &admin,
        &subscription(
            &server.base,
            "task-changed",
            &["owner:missing=true", "Task.status:not=cancelled"],
            &receiver.url,
            "id-only",
        ),
    )
    .await;
    receiver.wait_for("handshake", |r| !r.is_empty()).await;
    server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await; // owned: no
    server.create_task(&task("cancelled", None)).await; // cancelled: no
    let hit = server.create_task(&task("requested", None)).await; // yes
    receiver
        .wait_for("one event", |_| !receiver.event_numbers(&queue).is_empty())
        .await;
    let events = receiver.of(&queue, "event-notification");
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].body["entry"][1]["fullUrl"],
        format!("{}/Task/{}", server.base, hit["id"].as_str().unwrap())
    );
    server.stop().await;
}

#[tokio::test]
async fn an_outage_is_retried_in_order_and_the_status_recovers() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let id = subscribe(
        &server,
        &admin,
        &subscription(&server.base, "task-changed", &[], &receiver.url, "id-only"),
    )
    .await;
    receiver.wait_for("handshake", |r| !r.is_empty()).await;
    receiver.fail_with(Some(503));
    for _ in 0..5 {
        server.create_task(&task("requested", None)).await;
    }
    eventually("error status", || async {
        let (_, s) = server.get(&format!("/Subscription/{id}"), &admin).await;
        (s["status"] == "error").then_some(())
    })
    .await;
    let (_, s) = server
        .get(&format!("/Subscription/{id}/$status"), &admin)
        .await;
    assert_eq!(
        s["entry"][0]["resource"]["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "status")
            .unwrap()["valueCode"],
        "error"
    );
    // Events keep counting while the endpoint is down.
    server.create_task(&task("requested", None)).await;
    receiver.fail_with(None);
    receiver
        .wait_for("six events", |_| receiver.event_numbers(&id).len() >= 6)
        .await;
    assert_eq!(receiver.event_numbers(&id), vec![1, 2, 3, 4, 5, 6]);
    eventually("active again", || async {
        let (_, s) = server.get(&format!("/Subscription/{id}"), &admin).await;
        (s["status"] == "active").then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn signed_notifications_and_heartbeats() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
    body["channel"]["extension"] = json!([
        { "url": "https://baton.dev/fhir/StructureDefinition/webhook-secret", "valueString": secret },
        { "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period", "valueUnsignedInt": 1 },
    ]);
    let signed = subscribe(&server, &admin, &body).await;
    let quiet = subscribe(
        &server,
        &admin,
        &subscription(&server.base, "task-changed", &[], &receiver.url, "id-only"),
    )
    .await;
    receiver
        .wait_for("two heartbeats", |_| {
            receiver.of(&signed, "heartbeat").len() >= 2
        })
        .await;
    assert!(
        receiver.of(&quiet, "heartbeat").is_empty(),
        "no heartbeats without a period"
    );
    let key = baton::channels::signature::parse_secret(secret).unwrap();
    for r in receiver
        .received()
        .iter()
        .filter(|r| r.subscription_id() == signed)
    {
        let id = r.headers["webhook-id"].to_str().unwrap();
        let ts: i64 = r.headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let sig = r.headers["webhook-signature"].to_str().unwrap();
        assert!(
            baton::channels::signature::verify(&key, id, ts, &r.raw, sig),
            "valid signature"
        );
    }
    assert!(
        receiver.of(&quiet, "handshake")[0]
            .headers
            .get("webhook-signature")
            .is_none()
    );
    server.stop().await;
}

#[tokio::test]
async fn unsupported_subscriptions_are_rejected_and_not_stored() {
    let server = TestServer::start_with(|c| c.allow_http_endpoints = false).await;
    let admin = server.admin();
    let hook = "https://hooks.example.org/baton";
    let base = subscription(&server.base, "task-changed", &[], hook, "id-only");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut s = base.clone();
        f(&mut s);
        s
    };
    let cases: Vec<(&str, Value)> = vec![
        (
            "unknown topic",
            with(&|s| s["criteria"] = json!("http://localhost/fhir/SubscriptionTopic/nope")),
        ),
        (
            "classic criteria on another resource type",
            with(&|s| s["criteria"] = json!("Observation?code=1975-2")),
        ),
        (
            "unknown filter",
            with(
                &|s| s["_criteria"] = json!({"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria", "valueString": "colour=red"}]}),
            ),
        ),
        (
            "cross-version filter extension",
            with(
                &|s| s["_criteria"] = json!({"extension": [{"url": "http://hl7.org/fhir/5.0/subscriptions-backport/StructureDefinition/backport-filter-criteria", "valueString": "Encounter.patient=Patient/123"}]}),
            ),
        ),
        (
            "filter on another resource",
            with(
                &|s| s["_criteria"] = json!({"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria", "valueString": "Encounter?patient=Patient/1"}]}),
            ),
        ),
        (
            "email channel",
            with(&|s| s["channel"]["type"] = json!("email")),
        ),
        (
            "websocket channel with an endpoint",
            with(&|s| {
                s["channel"]["type"] = json!("websocket");
                s["channel"].as_object_mut().unwrap().remove("header");
            }),
        ),
        (
            "xml payload",
            with(&|s| s["channel"]["payload"] = json!("application/fhir+xml")),
        ),
        (
            "unknown content level",
            with(&|s| s["channel"]["_payload"]["extension"][0]["valueCode"] = json!("everything")),
        ),
        (
            "unknown channel extension",
            with(&|s| {
                s["channel"]["extension"] =
                    json!([{"url": "http://example.org/retry", "valueInteger": 3}])
            }),
        ),
        (
            "plain http endpoint",
            with(&|s| s["channel"]["endpoint"] = json!("http://hooks.example.org/baton")),
        ),
        (
            "loopback endpoint",
            with(&|s| s["channel"]["endpoint"] = json!("https://127.0.0.1/hook")),
        ),
        (
            "private endpoint",
            with(&|s| s["channel"]["endpoint"] = json!("https://10.0.0.8/hook")),
        ),
        (
            "missing endpoint",
            with(&|s| {
                s["channel"].as_object_mut().unwrap().remove("endpoint");
            }),
        ),
        (
            "custom channel type",
            with(
                &|s| s["channel"]["_type"] = json!({"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-channel-type", "valueCoding": {"code": "zulip"}}]}),
            ),
        ),
    ];
    for (name, body) in cases {
        let (status, outcome) = server.post_json("/Subscription", &admin, &body).await;
        assert!(status.is_client_error(), "{name}: {status} {outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{name}");
    }
    let (_, none) = server.get("/Subscription", &admin).await;
    assert_eq!(none["total"], 0, "nothing was stored");
    let (status, outcome) = server.get("/Subscription/nope/$status", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&outcome, "not-found");
    server.stop().await;
}

#[tokio::test]
async fn topics_are_discoverable() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let (_, topics) = server.get("/SubscriptionTopic", &admin).await;
    let ids: Vec<&str> = topics["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    for id in [
        "task-changed",
        "task-status-changed",
        "task-owner-changed",
        "task-business-status-changed",
    ] {
        assert!(ids.contains(&id), "{id} missing");
        let (status, topic) = server
            .get(&format!("/SubscriptionTopic/{id}"), &admin)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            topic["url"],
            format!("{}/SubscriptionTopic/{id}", server.base)
        );
    }
    let metadata: Value = server
        .client
        .get(format!("{}/metadata", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let subscription = metadata["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Subscription")
        .unwrap();
    let canonicals: Vec<&str> = subscription["extension"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["valueCanonical"].as_str().unwrap())
        .collect();
    assert!(
        canonicals.contains(&format!("{}/SubscriptionTopic/task-changed", server.base).as_str())
    );
    assert!(
        subscription["supportedProfile"][0]
            .as_str()
            .unwrap()
            .ends_with("backport-subscription")
    );
    server.stop().await;
}

#[tokio::test]
async fn topics_are_readable_as_basic_resources_for_r4_clients() {
    let server = TestServer::start().await;
    let extension = "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.";
    let url_of = |basic: &Value| -> String {
        basic["extension"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["url"] == format!("{extension}url"))
            .map(|e| e["valueUri"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    // Any role reads topics, as at /SubscriptionTopic.
    for token in [
        server.admin(),
        server.auditor(),
        server.practitioner("Practitioner/p1"),
    ] {
        let (status, bundle) = server
            .get(
                "/Basic?code=http://hl7.org/fhir/fhir-types%7CSubscriptionTopic",
                &token,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        assert_eq!(bundle["type"], "searchset");
        let ids: Vec<&str> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "task-changed",
                "task-status-changed",
                "task-owner-changed",
                "task-business-status-changed",
                "task-overdue"
            ]
        );
        assert_eq!(bundle["total"], 5);
    }
    let admin = server.admin();
    let (status, basic) = server.get("/Basic/task-owner-changed", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(basic["resourceType"], "Basic");
    assert_eq!(
        basic["code"]["coding"][0],
        json!({ "system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic" })
    );
    assert_eq!(
        url_of(&basic),
        format!("{}/SubscriptionTopic/task-owner-changed", server.base)
    );
    assert_eq!(
        basic["modifierExtension"][0],
        json!({ "url": format!("{extension}status"), "valueCode": "active" })
    );
    let filters = basic["extension"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["url"] == format!("{extension}canFilterBy"))
        .count();
    assert!(filters > 10, "every filter is carried: {basic}");
    // The same topic a Subscription names: the url leads back to the R4B topic.
    let (_, topic) = server
        .get("/SubscriptionTopic/task-owner-changed", &admin)
        .await;
    assert_eq!(url_of(&basic), topic["url"].as_str().unwrap());

    // Searches by id, url and another code; lenient about the rest, strict on request.
    let (_, by_url) = server
        .get(
            &format!(
                "/Basic?url={}/SubscriptionTopic/task-changed&colour=red",
                server.base
            ),
            &admin,
        )
        .await;
    assert_eq!(by_url["total"], 1, "{by_url}");
    assert_eq!(by_url["entry"][0]["resource"]["id"], "task-changed");
    let self_link = by_url["link"][0]["url"].as_str().unwrap();
    assert!(!self_link.contains("colour"), "{self_link}");
    let (_, by_id) = server.get("/Basic?_id=task-overdue,nope", &admin).await;
    assert_eq!(by_id["total"], 1);
    let (_, other) = server
        .get("/Basic?code=http://hl7.org/fhir/fhir-types%7CTask", &admin)
        .await;
    assert_eq!(other["total"], 0);
    assert!(other.get("entry").is_none());
    let response = server
        .request(Method::GET, "/Basic?colour=red", &admin)
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    let (status, outcome) = body(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert_outcome(&outcome, "not-supported");
    let (status, outcome) = server.get("/Basic/nope", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&outcome, "not-found");
    let (status, _) = server.get("/Basic/task-changed", "not-a-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The CapabilityStatement lists Basic with its code search.
    let (_, metadata) = server.get("/metadata", "unused").await;
    let basic = metadata["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Basic")
        .expect("Basic in the CapabilityStatement");
    assert!(
        basic["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "code")
    );
    server.stop().await;
}

#[tokio::test]
async fn event_numbers_continue_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let hub = |c: &mut baton::Config| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
    };
    let server = TestServer::start_in(dir.path(), hub).await;
    let admin = server.admin();
    let id = subscribe(
        &server,
        &admin,
        &subscription(&server.base, "task-changed", &[], &receiver.url, "id-only"),
    )
    .await;
    for _ in 0..3 {
        server.create_task(&task("requested", None)).await;
    }
    receiver
        .wait_for("three", |_| receiver.event_numbers(&id).len() == 3)
        .await;
    server.stop().await;
    let server = TestServer::start_in(dir.path(), hub).await;
    for _ in 0..2 {
        server.create_task(&task("requested", None)).await;
    }
    receiver
        .wait_for("five", |_| receiver.event_numbers(&id).len() == 5)
        .await;
    assert_eq!(receiver.event_numbers(&id), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        receiver.of(&id, "handshake").len(),
        1,
        "no second handshake after a restart"
    );
    server.stop().await;
    common::forget_database(dir.path());
}

#[tokio::test]
async fn a_hanging_endpoint_does_not_delay_another_subscription() {
    let server = TestServer::start_hub().await;
    let stuck = Receiver::start().await;
    let healthy = Receiver::start().await;
    let admin = server.admin();
    let mut slow_body = subscription(&server.base, "task-changed", &[], &stuck.url, "id-only");
    slow_body["channel"]["extension"] = json!([{
        "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-timeout",
        "valueUnsignedInt": 30
    }]);
    let slow = subscribe(&server, &admin, &slow_body).await;
    let fast = subscribe(
        &server,
        &admin,
        &subscription(&server.base, "task-changed", &[], &healthy.url, "id-only"),
    )
    .await;
    stuck.wait_for("slow handshake", |r| !r.is_empty()).await;
    healthy.wait_for("fast handshake", |r| !r.is_empty()).await;
    // From now on the first endpoint holds every request for 25 s.
    stuck.hang(Some(std::time::Duration::from_secs(25)));
    for _ in 0..10 {
        server.create_task(&task("requested", None)).await;
    }
    healthy
        .wait_for("all ten events", |_| {
            healthy.event_numbers(&fast).len() == 10
        })
        .await;
    assert_eq!(healthy.event_numbers(&fast), (1..=10).collect::<Vec<_>>());
    // The stuck endpoint's first notification may still be on its way (its attempt can start
    // after the other subscription's): wait until the endpoint holds it, then check that it
    // has answered nothing while the other subscription got everything.
    eventually("the stuck endpoint to hold a request", || async {
        (stuck.hanging() >= 1).then_some(())
    })
    .await;
    assert!(stuck.event_numbers(&slow).is_empty());
    stuck.hang(None);
    server.stop().await;
}

/// A subscription replaced with another filter (and content level) is matched and delivered by
/// the new version from the next change on, although the old one had matched and been
/// delivered (so the hub's spec cache held it): the old filter no longer matches, and the
/// notification has the new content. After a restart the index is rebuilt from the matching
/// form written with the replacement; its heartbeat, which the scheduler takes from the hub at
/// start, resumes. A row without a form (written before the column existed) is read from its
/// resource at the next start, matches the same, and has its form written back.
#[tokio::test]
async fn a_replaced_filter_holds_from_the_next_change_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let hub = |c: &mut baton::Config| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
    };
    let server = TestServer::start_in(dir.path(), hub).await;
    let admin = server.admin();
    let body = |owner: &str, content: &str| {
        let mut body = subscription(
            &server.base,
            "task-changed",
            &[&format!("owner={owner}")],
            &receiver.url,
            content,
        );
        body["channel"]["extension"] = json!([{
            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period",
            "valueUnsignedInt": 1
        }]);
        body
    };
    let id = subscribe(&server, &admin, &body("Practitioner/1", "id-only")).await;
    receiver.wait_for("handshake", |r| !r.is_empty()).await;
    let first = server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await;
    receiver
        .wait_for("the first event", |_| {
            !receiver.event_numbers(&id).is_empty()
        })
        .await;
    let mut replaced = body("Practitioner/2", "full-resource");
    replaced["id"] = json!(id);
    let (status, stored) = server
        .put_json(&format!("/Subscription/{id}"), &admin, &replaced)
        .await;
    assert_eq!(status, StatusCode::OK, "{stored}");
    server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await; // the old filter: no
    let second = server
        .create_task(&task("requested", Some("Practitioner/2")))
        .await;
    receiver
        .wait_for("two events", |_| receiver.event_numbers(&id).len() >= 2)
        .await;
    server.stop().await;

    let server = TestServer::start_in(dir.path(), hub).await;
    let heartbeats = receiver.of(&id, "heartbeat").len();
    server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await; // still no
    let third = server
        .create_task(&task("requested", Some("Practitioner/2")))
        .await;
    receiver
        .wait_for("three events", |_| receiver.event_numbers(&id).len() >= 3)
        .await;
    receiver
        .wait_for("a heartbeat after the restart", |_| {
            receiver.of(&id, "heartbeat").len() > heartbeats
        })
        .await;
    server.stop().await;

    // As if written before the matching form existed.
    let forms = |sql: &'static str| common::database_execute(dir.path(), sql);
    forms("UPDATE subscription SET matching = NULL").await;
    let server = TestServer::start_in(dir.path(), hub).await;
    server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await; // still no
    let fourth = server
        .create_task(&task("requested", Some("Practitioner/2")))
        .await;
    receiver
        .wait_for("four events", |_| receiver.event_numbers(&id).len() >= 4)
        .await;
    server.stop().await;
    let written_back = common::database_scalar(
        dir.path(),
        "SELECT matching FROM subscription WHERE matching IS NOT NULL",
    )
    .await;
    assert!(
        written_back.contains(r#""filters":["owner=Practitioner/2"]"#),
        "the form derived at start-up is written back: {written_back}"
    );

    let events = receiver.of(&id, "event-notification");
    // Each server had its own port, so only the Task part of the URL is compared.
    let focus = |n: usize| {
        let url = events[n].body["entry"][1]["fullUrl"].as_str().unwrap();
        url.rsplit_once("/Task/").unwrap().1.to_string()
    };
    assert_eq!(
        events.len(),
        4,
        "the first Task, then only Practitioner/2's"
    );
    for (n, task) in [&first, &second, &third, &fourth].into_iter().enumerate() {
        assert_eq!(focus(n), task["id"].as_str().unwrap(), "event {}", n + 1);
    }
    assert_eq!(receiver.event_numbers(&id), [1, 2, 3, 4]);
    // id-only before the replacement, full-resource from the next change on.
    assert!(events[0].body["entry"][1].get("resource").is_none());
    for event in &events[1..] {
        assert_eq!(
            event.body["entry"][1]["resource"]["owner"]["reference"],
            "Practitioner/2"
        );
    }
    common::forget_database(dir.path());
}
