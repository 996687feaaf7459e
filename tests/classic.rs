//! Classic R4 Subscriptions (`criteria` a search string such as `Task?status=requested`):
//! each rest-hook payload form as a real local endpoint receives it (method, path, headers,
//! body), criteria filtering, the read rule at send time, order across retries, the R4
//! websocket protocol (`bind <id>` / `bound <id>` / `ping <id>`) and the refusals that store
//! nothing. Both backends (`TEST_BACKEND=postgres` for PostgreSQL).

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use common::socket::{Socket, next_text};
use common::{TestServer, eventually, task};
use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// One request a classic endpoint received.
#[derive(Debug, Clone)]
struct Hit {
    method: Method,
    path: String,
    headers: HeaderMap,
    raw: Bytes,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.raw).unwrap_or(Value::Null)
    }
}

#[derive(Default)]
struct Inner {
    hits: Vec<Hit>,
    /// Statuses to answer with, one per request; 200 once empty.
    script: Vec<u16>,
}

/// A local FHIR-ish endpoint that accepts any method on any path, as a classic rest-hook
/// receiver must (`PUT {endpoint}/Task/{id}`).
#[derive(Clone)]
struct Endpoint {
    root: String,
    inner: Arc<Mutex<Inner>>,
}

async fn take(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Bytes,
) -> StatusCode {
    let mut inner = inner.lock().unwrap();
    let status = if inner.script.is_empty() {
        200
    } else {
        inner.script.remove(0)
    };
    if status < 300 {
        inner.hits.push(Hit {
            method,
            path: uri.to_string(),
            headers,
            raw,
        });
    }
    StatusCode::from_u16(status).unwrap()
}

impl Endpoint {
    async fn start() -> Endpoint {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().fallback(take).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Endpoint {
            root: format!("http://{addr}"),
            inner,
        }
    }

    fn hits(&self, prefix: &str) -> Vec<Hit> {
        self.inner
            .lock()
            .unwrap()
            .hits
            .iter()
            .filter(|h| h.path.starts_with(prefix))
            .cloned()
            .collect()
    }

    fn script(&self, statuses: &[u16]) {
        self.inner.lock().unwrap().script = statuses.to_vec();
    }

    async fn wait_for(&self, prefix: &str, count: usize) -> Vec<Hit> {
        eventually(&format!("{count} requests under {prefix}"), || async {
            let hits = self.hits(prefix);
            (hits.len() >= count).then_some(hits)
        })
        .await
    }
}

/// A classic rest-hook Subscription; `payload` None leaves `channel.payload` out (a ping).
fn classic(criteria: &str, endpoint: &str, payload: Option<&str>) -> Value {
    let mut s = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "classic R4 test",
        "criteria": criteria,
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "header": ["X-Test-Token: secret-123"],
        },
    });
    if let Some(payload) = payload {
        s["channel"]["payload"] = json!(payload);
    }
    s
}

async fn create(server: &TestServer, token: &str, subscription: &Value) -> String {
    let (status, created) = server.post_json("/Subscription", token, subscription).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        created["status"], "active",
        "a classic subscription has no handshake: active at once"
    );
    created["id"].as_str().unwrap().to_string()
}

fn id_of(task: &Value) -> String {
    task["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn each_payload_form_reaches_the_endpoint_as_r4_and_hapi_send_it() {
    let server = TestServer::start_hub().await;
    let admin = server.admin();
    let endpoint = Endpoint::start().await;
    let criteria = "Task?owner=Practitioner/1&status=requested";
    let root = &endpoint.root;
    create(
        &server,
        &admin,
        &classic(criteria, &format!("{root}/ping"), None),
    )
    .await;
    create(
        &server,
        &admin,
        &classic(
            criteria,
            &format!("{root}/fhir/?tenant=7"),
            Some("application/fhir+json"),
        ),
    )
    .await;
    let mut bundled = classic(
        criteria,
        &format!("{root}/bundle"),
        Some("application/json"),
    );
    bundled["channel"]["_payload"] = json!({ "extension": [{
        "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content",
        "valueCode": "id-only",
    }]});
    let bundled_id = create(&server, &admin, &bundled).await;

    // Neither of these matches: another owner, another status.
    let other_owner = server
        .create_task(&task("requested", Some("Practitioner/2")))
        .await;
    let other_status = server
        .create_task(&task("ready", Some("Practitioner/1")))
        .await;
    let matching = server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await;
    let id = id_of(&matching);

    let pings = endpoint.wait_for("/ping", 1).await;
    assert_eq!(pings[0].method, Method::POST);
    assert_eq!(pings[0].path, "/ping");
    assert!(pings[0].raw.is_empty(), "a ping has no body");
    assert!(pings[0].headers.get("content-type").is_none());
    assert_eq!(pings[0].headers["x-test-token"], "secret-123");

    let puts = endpoint.wait_for("/fhir", 1).await;
    assert_eq!(puts[0].method, Method::PUT);
    assert_eq!(
        puts[0].path,
        format!("/fhir/Task/{id}?tenant=7"),
        "the Task goes to {{endpoint}}/Task/{{id}}, the endpoint's query kept"
    );
    assert_eq!(puts[0].headers["content-type"], "application/fhir+json");
    assert_eq!(puts[0].headers["x-test-token"], "secret-123");
    let sent = puts[0].json();
    assert_eq!(sent["resourceType"], "Task");
    assert_eq!(sent["id"], id.as_str());
    assert_eq!(sent["meta"]["versionId"], "1");

    let bundles = endpoint.wait_for("/bundle", 1).await;
    assert_eq!(bundles[0].method, Method::POST);
    let bundle = bundles[0].json();
    assert_eq!(bundle["type"], "history");
    assert_eq!(bundles[0].headers["content-type"], "application/json");
    assert!(
        bundle.to_string().contains(&format!("Task/{id}")),
        "{bundle}"
    );

    // What was sent is only about the matching Task: the earlier changes never went out.
    for hit in endpoint.hits("/") {
        for other in [id_of(&other_owner), id_of(&other_status)] {
            assert!(!hit.path.contains(&other), "{hit:?}");
            assert!(
                !String::from_utf8_lossy(&hit.raw).contains(&other),
                "{hit:?}"
            );
        }
    }

    // An update that still matches is put again; one that stops matching sends nothing;
    // a delete of a Task that matched before it is a DELETE (HAPI's delete message).
    let mut updated = sent.clone();
    updated["priority"] = json!("urgent");
    let (status, _) = server
        .put_json(&format!("/Task/{id}"), &admin, &updated)
        .await;
    assert_eq!(status, StatusCode::OK);
    let puts = endpoint.wait_for("/fhir", 2).await;
    assert_eq!(puts[1].method, Method::PUT);
    assert_eq!(puts[1].json()["meta"]["versionId"], "2");

    let other = server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await;
    let other_id = id_of(&other);
    let mut moved = other.clone();
    moved["status"] = json!("ready");
    let (status, _) = server
        .put_json(&format!("/Task/{other_id}"), &admin, &moved)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .request(reqwest::Method::DELETE, &format!("/Task/{id}"), &admin)
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert!(status.is_success(), "{status}");
    let hits = endpoint.wait_for("/fhir", 4).await;
    let calls: Vec<(Method, String)> = hits
        .iter()
        .map(|h| (h.method.clone(), h.path.clone()))
        .collect();
    assert_eq!(
        calls,
        vec![
            (Method::PUT, format!("/fhir/Task/{id}?tenant=7")),
            (Method::PUT, format!("/fhir/Task/{id}?tenant=7")),
            (Method::PUT, format!("/fhir/Task/{other_id}?tenant=7")),
            (Method::DELETE, format!("/fhir/Task/{id}?tenant=7")),
        ],
        "in event order; the update that stopped matching sent nothing"
    );
    assert!(hits[3].raw.is_empty());
    assert_eq!(endpoint.wait_for("/ping", 4).await.len(), 4);

    // `$status` and `$events` work as for a topic subscription.
    let (status, events) = server
        .get(&format!("/Subscription/{bundled_id}/$events"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{events}");
    assert_eq!(common::receiver::event_numbers(&events), vec![1, 2, 3, 4]);
    let (status, found) = server
        .get(&format!("/Subscription/{bundled_id}/$status"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert!(found.to_string().contains("\"active\""), "{found}");
    server.stop().await;
}

#[tokio::test]
async fn a_practitioner_hears_only_about_tasks_it_may_read() {
    let server = TestServer::start_hub().await;
    let admin = server.admin();
    let alice = server.practitioner("Practitioner/alice");
    let endpoint = Endpoint::start().await;
    // Broad criteria: the read rule, not the filter, must keep bob's Task out.
    create(
        &server,
        &alice,
        &classic(
            "Task?status=requested",
            &format!("{}/fhir", endpoint.root),
            Some("application/fhir+json"),
        ),
    )
    .await;
    let bobs = server
        .create_task(&task("requested", Some("Practitioner/bob")))
        .await;
    let alices = server
        .create_task(&task("requested", Some("Practitioner/alice")))
        .await;
    let hits = endpoint.wait_for("/fhir", 1).await;
    assert_eq!(hits[0].path, format!("/fhir/Task/{}", id_of(&alices)));
    // Bob's change came first: had it gone out, it would be here before alice's.
    assert!(
        endpoint
            .hits("/")
            .iter()
            .all(|h| !h.path.contains(&id_of(&bobs))),
        "bob's Task never reaches alice's endpoint"
    );
    assert_eq!(endpoint.hits("/").len(), 1);
    let _ = admin;
    server.stop().await;
}

#[tokio::test]
async fn a_failing_endpoint_gets_every_event_in_order_after_retries() {
    let server = TestServer::start_hub().await;
    let admin = server.admin();
    let endpoint = Endpoint::start().await;
    endpoint.script(&[503, 500]);
    let id = create(
        &server,
        &admin,
        &classic(
            "Task?code=lab",
            &format!("{}/fhir", endpoint.root),
            Some("application/fhir+json"),
        ),
    )
    .await;
    let mut created = Vec::new();
    for _ in 0..4 {
        let mut t = task("requested", None);
        t["code"] = json!({ "coding": [{ "code": "lab" }] });
        created.push(id_of(&server.create_task(&t).await));
    }
    let hits = endpoint.wait_for("/fhir", 4).await;
    let paths: Vec<String> = hits.iter().map(|h| h.path.clone()).collect();
    let expected: Vec<String> = created.iter().map(|t| format!("/fhir/Task/{t}")).collect();
    assert_eq!(
        paths, expected,
        "each Task once, in order, after two failures"
    );
    let (_, sub) = server.get(&format!("/Subscription/{id}"), &admin).await;
    assert_eq!(
        sub["status"], "active",
        "recovered after the retries: {sub}"
    );
    server.stop().await;
}

#[tokio::test]
async fn events_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::start().await;
    let adjust = |c: &mut baton::config::Config| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.delivery.retry_schedule_seconds = vec![1];
        c.delivery.jitter_ratio = 0.0;
    };
    let server = TestServer::start_in(dir.path(), adjust).await;
    let admin = server.admin();
    create(
        &server,
        &admin,
        &classic(
            "Task?status=requested",
            &format!("{}/ping", endpoint.root),
            None,
        ),
    )
    .await;
    server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await;
    endpoint.wait_for("/ping", 1).await;
    server.stop().await;

    let server = TestServer::start_in(dir.path(), adjust).await;
    server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await;
    endpoint.wait_for("/ping", 2).await;
    server.stop().await;
    common::forget_database(dir.path());
}

#[tokio::test]
async fn unsupported_criteria_are_refused_and_nothing_is_stored() {
    let server = TestServer::start_hub().await;
    let admin = server.admin();
    let endpoint = "http://127.0.0.1:9/fhir";
    let heartbeat = {
        let mut s = classic("Task?status=requested", endpoint, None);
        s["channel"]["extension"] = json!([{
            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-heartbeat-period",
            "valueUnsignedInt": 60,
        }]);
        s
    };
    let both = {
        let mut s = classic("Task?status=requested", endpoint, None);
        s["_criteria"] = json!({ "extension": [{
            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
            "valueString": "Task?owner=Practitioner/1",
        }]});
        s
    };
    let cases = [
        (
            classic("Observation?code=1234-5", endpoint, None),
            "Subscription.criteria",
            "Task",
        ),
        (
            classic("Task?no-such-param=1", endpoint, None),
            "Subscription.criteria",
            "no-such-param",
        ),
        (
            classic("Task?status:above=ready", endpoint, None),
            "Subscription.criteria",
            ":above",
        ),
        (
            classic("Task?_count=10", endpoint, None),
            "Subscription.criteria",
            "_count",
        ),
        (
            classic("Task?owner", endpoint, None),
            "Subscription.criteria",
            "=",
        ),
        (
            classic("Task?status=requested", endpoint, Some("text/plain")),
            "Subscription.channel.payload",
            "text/plain",
        ),
        (heartbeat, "Subscription.channel.extension", "heartbeat"),
        (both, "Subscription._criteria", "classic"),
    ];
    for (subscription, expression, mentions) in cases {
        let (status, outcome) = server
            .post_json("/Subscription", &admin, &subscription)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{subscription}: {outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
        assert_eq!(
            outcome["issue"][0]["expression"][0], expression,
            "{subscription}: {outcome}"
        );
        let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(diagnostics.contains(mentions), "{diagnostics}");
    }
    let (status, found) = server.get("/Subscription", &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(found["total"], 0, "nothing stored: {found}");
    server.stop().await;
}

async fn connect(server: &TestServer, token: Option<&str>) -> Socket {
    let url = format!("{}/fhir/ws", server.root.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket connects")
        .0
}

/// A local token for practitioner `user` (the same subject `TestServer::practitioner` mints)
/// carrying `scope`.
fn scoped_token(user: &str, scope: &str) -> String {
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
    let claims = json!({
        "sub": format!("practitioner:{user}"), "role": "practitioner", "fhirUser": user,
        "scope": scope, "exp": exp,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(common::SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_websocket_binds_by_id_and_hears_pings_only_for_its_own_subscription() {
    let server = TestServer::start_hub().await;
    let alice = server.practitioner("Practitioner/alice");
    let bob = server.practitioner("Practitioner/bob");
    let subscription = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "classic websocket",
        "criteria": "Task?owner=Practitioner/alice",
        "channel": { "type": "websocket" },
    });
    let id = create(&server, &alice, &subscription).await;

    // Without a token, or with someone else's, `bind` learns nothing.
    let mut anonymous = connect(&server, None).await;
    anonymous
        .send(Message::Text(format!("bind {id}").into()))
        .await
        .unwrap();
    assert_eq!(next_text(&mut anonymous).await, format!("error {id}"));
    let mut bobs = connect(&server, Some(&bob)).await;
    bobs.send(Message::Text(format!("bind {id}").into()))
        .await
        .unwrap();
    assert_eq!(next_text(&mut bobs).await, format!("error {id}"));
    bobs.send(Message::Text("bind no-such-subscription".into()))
        .await
        .unwrap();
    assert_eq!(next_text(&mut bobs).await, "error no-such-subscription");
    // Alice's own token, narrowed by its scopes to Tasks: binding needs Subscription read,
    // as `$get-ws-binding-token` does.
    let narrowed = scoped_token("Practitioner/alice", "user/Task.rs");
    let mut tasks_only = connect(&server, Some(&narrowed)).await;
    tasks_only
        .send(Message::Text(format!("bind {id}").into()))
        .await
        .unwrap();
    assert_eq!(next_text(&mut tasks_only).await, format!("error {id}"));

    let mut socket = connect(&server, Some(&alice)).await;
    socket
        .send(Message::Text(format!("bind {id}").into()))
        .await
        .unwrap();
    assert_eq!(next_text(&mut socket).await, format!("bound {id}"));
    let (status, _) = server
        .post_json(
            "/Task",
            &alice,
            &task("requested", Some("Practitioner/alice")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(next_text(&mut socket).await, format!("ping {id}"));
    let (status, _) = server
        .post_json("/Task", &alice, &task("ready", Some("Practitioner/alice")))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(next_text(&mut socket).await, format!("ping {id}"));

    // A bad token on the upgrade is refused outright.
    let url = format!("{}/fhir/ws", server.root.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer not-a-jwt".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn the_capability_statement_lists_r4_types_and_the_classic_websocket() {
    let server = TestServer::start().await;
    let (status, statement) = server.get("/metadata", "unused").await;
    assert_eq!(status, StatusCode::OK);
    let rest = &statement["rest"][0];
    let types: Vec<&str> = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["Task", "Subscription", "Basic", "AuditEvent"],
        "R4 resource types only (R4 has no SubscriptionTopic; topics are Basic-wrapped)"
    );
    let websocket = rest["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["url"] == "http://hl7.org/fhir/StructureDefinition/capabilitystatement-websocket"
        })
        .expect("the classic websocket URL is advertised");
    assert_eq!(
        websocket["valueUri"],
        format!("{}/fhir/ws", server.root.replacen("http", "ws", 1))
    );
    // Topics stay readable, in R4B's shape: comparators folded into modifier.
    let (status, topic) = server
        .get("/SubscriptionTopic/task-changed", &server.admin())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!topic.to_string().contains("comparator"), "{topic}");
    server.stop().await;
}
