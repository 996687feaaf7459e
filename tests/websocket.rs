//! The websocket channel with a real client: bind spellings, several subscriptions on one
//! socket, handshakes then ordered events, heartbeats, bad and expired tokens, someone else's
//! subscription, deletion while bound, a slow reader closed while a fast one keeps up, and
//! reconnecting with `$events` to fill the gap.

mod common;

use std::time::Duration;

use common::socket::{Socket, next_json};
use common::{TestServer, task};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn ws_subscription(base: &str, topic: &str, filters: &[&str], content: &str) -> Value {
    let mut s = common::subscription(base, topic, filters, "unused", content);
    s["channel"] = json!({
        "type": "websocket",
        "payload": "application/fhir+json",
        "_payload": s["channel"]["_payload"].clone(),
    });
    s
}

async fn create(server: &TestServer, token: &str, body: &Value) -> String {
    let (status, created) = server.post_json("/Subscription", token, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        created["status"], "active",
        "websocket subscriptions are active at once"
    );
    created["id"].as_str().unwrap().to_string()
}

async fn connect(url: &str) -> Socket {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects")
        .0
}

fn kind(bundle: &Value) -> String {
    common::receiver::parameter(bundle, "type").unwrap_or_default()
}

fn subscription_of(bundle: &Value) -> String {
    common::receiver::parameter(bundle, "subscription")
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn several_subscriptions_on_one_socket_with_every_bind_spelling() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let subs = [
        create(
            &server,
            &admin,
            &ws_subscription(
                &server.base,
                "task-changed",
                &["owner=Practitioner/a"],
                "id-only",
            ),
        )
        .await,
        create(
            &server,
            &admin,
            &ws_subscription(
                &server.base,
                "task-changed",
                &["owner=Practitioner/b"],
                "full-resource",
            ),
        )
        .await,
        create(
            &server,
            &admin,
            &ws_subscription(
                &server.base,
                "task-status-changed",
                &["owner=Practitioner/c"],
                "empty",
            ),
        )
        .await,
    ];
    let mut url = String::new();
    let mut binds = Vec::new();
    for (i, id) in subs.iter().enumerate() {
        let (token, ws_url) = server.ws_binding(&admin, id).await;
        url = ws_url;
        binds.push(match i {
            0 => format!("bind-with-token {token}"),
            1 => format!("bind-with-token: {token}"),
            _ => json!({"type": "bind-with-token", "payload": {"token": token}}).to_string(),
        });
    }
    assert!(url.starts_with("ws://") && url.ends_with("/fhir/ws"));
    let mut socket = connect(&url).await;
    let mut handshakes = Vec::new();
    for bind in binds {
        socket.send(Message::Text(bind.into())).await.unwrap();
        let handshake = next_json(&mut socket).await;
        assert_eq!(kind(&handshake), "handshake");
        handshakes.push(subscription_of(&handshake));
    }
    assert_eq!(handshakes, subs.to_vec());

    // Events: three for a, two for b, one status change for c, interleaved.
    for owner in ["a", "b", "a", "c", "b", "a"] {
        server
            .create_task(&task("requested", Some(&format!("Practitioner/{owner}"))))
            .await;
    }
    let mut seen: std::collections::HashMap<String, Vec<i64>> = Default::default();
    while seen.values().map(Vec::len).sum::<usize>() < 6 {
        let bundle = next_json(&mut socket).await;
        assert_eq!(kind(&bundle), "event-notification");
        seen.entry(subscription_of(&bundle))
            .or_default()
            .extend(common::receiver::event_numbers(&bundle));
        if subscription_of(&bundle) == subs[1] {
            assert!(
                bundle["entry"][1]["resource"]["owner"]["reference"] == "Practitioner/b",
                "full-resource carries the Task"
            );
        }
    }
    assert_eq!(seen[&subs[0]], vec![1, 2, 3]);
    assert_eq!(seen[&subs[1]], vec![1, 2]);
    assert_eq!(seen[&subs[2]], vec![1]);
    server.stop().await;
}

#[tokio::test]
async fn heartbeats_tokens_and_authorisation() {
    let server = TestServer::start_with(|c| c.websocket.token_ttl_seconds = 1).await;
    let alice = server.practitioner("Practitioner/alice");
    let bob = server.practitioner("Practitioner/bob");
    let mut with_heartbeat = ws_subscription(&server.base, "task-changed", &[], "id-only");
    with_heartbeat["channel"]["extension"] = json!([{ "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period", "valueUnsignedInt": 1 }]);
    let id = create(&server, &alice, &with_heartbeat).await;

    // Someone else's subscription: no token.
    let (status, outcome) = server
        .get(&format!("/Subscription/{id}/$get-ws-binding-token"), &bob)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    // A rest-hook subscription has no binding token either; type level without ids finds Alice's.
    let (status, params) = server
        .get("/Subscription/$get-ws-binding-token", &alice)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        params["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "subscription" && p["valueString"] == id.as_str())
    );
    let (status, _) = server
        .get("/Subscription/$get-ws-binding-token", &bob)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "bob has nothing to bind");

    // Heartbeats at the period, after the handshake.
    let (token, url) = server.ws_binding(&alice, &id).await;
    let mut socket = connect(&url).await;
    socket
        .send(Message::Text(format!("bind-with-token {token}").into()))
        .await
        .unwrap();
    assert_eq!(kind(&next_json(&mut socket).await), "handshake");
    assert_eq!(kind(&next_json(&mut socket).await), "heartbeat");
    assert_eq!(kind(&next_json(&mut socket).await), "heartbeat");

    // A used token is refused with an error frame; the socket stays, it still has a binding.
    socket
        .send(Message::Text(format!("bind-with-token {token}").into()))
        .await
        .unwrap();
    loop {
        let frame = next_json(&mut socket).await;
        if frame["resourceType"] == "OperationOutcome" {
            assert_eq!(frame["issue"][0]["code"], "security");
            break;
        }
    }

    // On a fresh socket, a bad token gets an error frame and a 1008 close.
    let mut fresh = connect(&url).await;
    fresh
        .send(Message::Text("bind-with-token not-a-token".into()))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut fresh).await["resourceType"],
        "OperationOutcome"
    );
    let close = tokio::time::timeout(Duration::from_secs(10), fresh.next())
        .await
        .unwrap();
    match close {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a 1008 close, got {other:?}"),
    }

    // An expired token (ttl 1 s) is refused the same way.
    let (late, _) = server.ws_binding(&alice, &id).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let mut another = connect(&url).await;
    another
        .send(Message::Text(format!("bind-with-token {late}").into()))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut another).await["resourceType"],
        "OperationOutcome"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_deleted_subscription_stops_and_the_read_rule_holds() {
    let server = TestServer::start().await;
    let alice = server.practitioner("Practitioner/alice");
    let gone = create(
        &server,
        &alice,
        &ws_subscription(&server.base, "task-changed", &["code=gone"], "id-only"),
    )
    .await;
    let kept = create(
        &server,
        &alice,
        &ws_subscription(&server.base, "task-changed", &[], "full-resource"),
    )
    .await;
    let (t1, url) = server.ws_binding(&alice, &gone).await;
    let (t2, _) = server.ws_binding(&alice, &kept).await;
    let mut socket = connect(&url).await;
    for t in [t1, t2] {
        socket
            .send(Message::Text(format!("bind-with-token {t}").into()))
            .await
            .unwrap();
        assert_eq!(kind(&next_json(&mut socket).await), "handshake");
    }
    let r = server
        .request(
            reqwest::Method::DELETE,
            &format!("/Subscription/{gone}"),
            &alice,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let mut coded = task("requested", Some("Practitioner/alice"));
    coded["code"] = json!({"coding": [{"code": "gone"}]});
    server.create_task(&coded).await;
    // Bob's task must never reach Alice's catch-all subscription; her own must.
    server
        .create_task(&task("requested", Some("Practitioner/bob")))
        .await;
    let last = server
        .create_task(&task("requested", Some("Practitioner/alice")))
        .await;
    // A notification carries up to `default_max_count` events: when delivery runs behind the
    // writes (a loaded machine), the three changes arrive together in one Bundle.
    let mut arrived: Vec<String> = Vec::new();
    while arrived.last().map(String::as_str) != last["id"].as_str() {
        let bundle = next_json(&mut socket).await;
        assert_eq!(
            subscription_of(&bundle),
            kept,
            "nothing arrives for the deleted subscription"
        );
        for entry in &bundle["entry"].as_array().unwrap()[1..] {
            assert_eq!(
                entry["resource"]["owner"]["reference"],
                "Practitioner/alice"
            );
            arrived.push(entry["resource"]["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        arrived.len(),
        2,
        "the coded task and the last one: {arrived:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_slow_reader_is_closed_while_a_fast_one_gets_everything() {
    let server = TestServer::start_with(|c| c.websocket.outbox_capacity = 4).await;
    let admin = server.admin();
    let id = create(
        &server,
        &admin,
        &ws_subscription(&server.base, "task-changed", &[], "full-resource"),
    )
    .await;
    let (slow_token, url) = server.ws_binding(&admin, &id).await;
    let (fast_token, _) = server.ws_binding(&admin, &id).await;
    let mut slow = connect(&url).await;
    slow.send(Message::Text(
        format!("bind-with-token {slow_token}").into(),
    ))
    .await
    .unwrap();
    assert_eq!(kind(&next_json(&mut slow).await), "handshake");
    let mut fast = connect(&url).await;
    fast.send(Message::Text(
        format!("bind-with-token {fast_token}").into(),
    ))
    .await
    .unwrap();
    assert_eq!(kind(&next_json(&mut fast).await), "handshake");

    // Large notifications fill the slow socket's buffers quickly; it never reads.
    let total = 80;
    let writer = {
        let base = server.base.clone();
        let client = server.client.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
            for i in 0..total {
                let mut t = task("requested", None);
                t["description"] = json!(format!("{i}:{}", "x".repeat(200_000)));
                let r = client
                    .post(format!("{base}/Task"))
                    .bearer_auth(&admin)
                    .header("content-type", "application/fhir+json")
                    .body(t.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        })
    };
    let mut got = Vec::new();
    while got.len() < total {
        let bundle = next_json(&mut fast).await;
        got.extend(common::receiver::event_numbers(&bundle));
    }
    writer.await.unwrap();
    assert_eq!(
        got,
        (1..=total as i64).collect::<Vec<_>>(),
        "the fast reader got every event in order"
    );

    // The slow reader was cut off: draining it ends in a close (or a dropped connection).
    let mut slow_events = 0;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(frame) = slow.next().await {
            match frame {
                Ok(Message::Text(_)) => slow_events += 1,
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("the slow socket ends");
    eprintln!("slow reader: {slow_events} of {total} events, then {ended:?}");
    assert!(
        slow_events < total,
        "the slow reader did not get everything ({slow_events})"
    );
    if let Some(code) = ended {
        assert_eq!(code, 1008);
    }
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("baton_websocket_closed_slow_total"),
        "counted in the metrics"
    );
    server.stop().await;
}

#[tokio::test]
async fn reconnect_and_fill_the_gap_with_events() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let id = create(
        &server,
        &admin,
        &ws_subscription(&server.base, "task-changed", &[], "id-only"),
    )
    .await;
    let (token, url) = server.ws_binding(&admin, &id).await;
    let mut socket = connect(&url).await;
    socket
        .send(Message::Text(format!("bind-with-token {token}").into()))
        .await
        .unwrap();
    assert_eq!(kind(&next_json(&mut socket).await), "handshake");
    server.create_task(&task("requested", None)).await;
    let first = next_json(&mut socket).await;
    let last_seen = *common::receiver::event_numbers(&first).last().unwrap();
    socket.close(None).await.unwrap();

    // While away: two more events.
    server.create_task(&task("requested", None)).await;
    server.create_task(&task("requested", None)).await;
    common::eventually("events counted", || async {
        let (_, s) = server
            .get(&format!("/Subscription/{id}/$status"), &admin)
            .await;
        let count = common::receiver::parameter(&s, "events-since-subscription-start");
        (count.as_deref() == Some("3")).then_some(())
    })
    .await;

    // Reconnect, bind, then $events from the last number seen.
    let (token, _) = server.ws_binding(&admin, &id).await;
    let mut socket = connect(&url).await;
    socket
        .send(Message::Text(format!("bind-with-token {token}").into()))
        .await
        .unwrap();
    let handshake = next_json(&mut socket).await;
    assert_eq!(
        common::receiver::parameter(&handshake, "events-since-subscription-start").as_deref(),
        Some("3")
    );
    let (_, replay) = server
        .get(
            &format!(
                "/Subscription/{id}/$events?eventsSinceNumber={}",
                last_seen + 1
            ),
            &admin,
        )
        .await;
    assert_eq!(common::receiver::event_numbers(&replay), vec![2, 3]);
    server.stop().await;
}

/// Listeners with a backlog, served faster than their records commit (on SQLite a websocket
/// delivery runs ahead of its record): four catch-alls with small notifications (`maxCount`
/// 1 to 3), bound on their own sockets, hear every Task that four writers create at once.
/// Each socket gets every event number exactly once, 1..=N, in increasing order — an attempt
/// that started while an earlier one's record was committing neither re-sent what that one
/// sent nor skipped anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_with_a_backlog_get_each_event_once_in_order() {
    const LISTENERS: usize = 4;
    const WRITES: usize = 60;
    let server = TestServer::start().await;
    let admin = server.admin();
    let mut sockets = Vec::new();
    for n in 0..LISTENERS {
        let mut body = ws_subscription(&server.base, "task-changed", &[], "id-only");
        body["channel"]["extension"] = json!([{
            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count",
            "valuePositiveInt": 1 + n % 3,
        }]);
        let id = create(&server, &admin, &body).await;
        let (token, url) = server.ws_binding(&admin, &id).await;
        let mut socket = connect(&url).await;
        socket
            .send(Message::Text(format!("bind-with-token {token}").into()))
            .await
            .unwrap();
        assert_eq!(kind(&next_json(&mut socket).await), "handshake");
        sockets.push(socket);
    }

    let mut writers = Vec::new();
    for _ in 0..4 {
        let client = server.client.clone();
        let base = server.base.clone();
        let admin = admin.clone();
        writers.push(tokio::spawn(async move {
            for _ in 0..WRITES {
                let created = client
                    .post(format!("{base}/Task"))
                    .bearer_auth(&admin)
                    .header("content-type", "application/fhir+json")
                    .body(task("requested", None).to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(created.status(), StatusCode::CREATED);
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }

    let total = (4 * WRITES) as i64;
    for socket in &mut sockets {
        let mut numbers = Vec::new();
        while numbers.last().copied().unwrap_or(0) < total {
            let bundle = next_json(socket).await;
            if kind(&bundle) == "event-notification" {
                numbers.extend(common::receiver::event_numbers(&bundle));
            }
        }
        let wanted: Vec<i64> = (1..=total).collect();
        assert_eq!(numbers, wanted, "each event once, in order, none skipped");
    }
    server.stop().await;
}
