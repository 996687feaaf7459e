//! Ownership of subscriptions is bound to the whole identity of a token — issuer, subject,
//! role and FHIR user — never to `sub` alone; and each practitioner or auditor identity holds
//! at most `limits.subscriptions_per_author` live subscriptions, however many it asks for at
//! once.

mod common;

use common::{TestServer, assert_outcome, task};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A token with exactly these claims, signed with the test server's key.
fn token(sub: &str, role: &str, fhir_user: Option<&str>, issuer: Option<&str>) -> String {
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
    let mut claims = json!({ "sub": sub, "role": role, "exp": exp });
    if let Some(user) = fhir_user {
        claims["fhirUser"] = json!(user);
    }
    if let Some(iss) = issuer {
        claims["iss"] = json!(iss);
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    )
    .unwrap()
}

fn ws_subscription(base: &str, topic: &str, content: &str) -> Value {
    let mut s = common::subscription(base, topic, &[], "unused", content);
    s["channel"] = json!({
        "type": "websocket",
        "payload": "application/fhir+json",
        "_payload": s["channel"]["_payload"].clone(),
    });
    s
}

const SECRET_HEADER: &str = "X-Test-Token: secret-123";
const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A rest-hook subscription carrying a header value and a signing secret, to a closed port
/// (its handshake fails, which does not matter here).
fn secret_rest_hook(base: &str) -> Value {
    let mut s = common::subscription(
        base,
        "task-changed",
        &[],
        "http://127.0.0.1:9/hook",
        "id-only",
    );
    s["channel"]["extension"] = json!([{
        "url": "https://baton.dev/fhir/StructureDefinition/webhook-secret",
        "valueString": SIGNING_SECRET,
    }]);
    s
}

async fn create(server: &TestServer, token: &str, body: &Value) -> String {
    let (status, created) = server.post_json("/Subscription", token, body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["id"].as_str().unwrap().to_string()
}

/// Whether a rendered Subscription shows its secrets in clear.
fn shows_secrets(subscription: &Value) -> bool {
    let header = subscription["channel"]["header"][0].as_str().unwrap();
    let secret = subscription["channel"]["extension"][0]["valueString"]
        .as_str()
        .unwrap();
    match (header == SECRET_HEADER, secret == SIGNING_SECRET) {
        (true, true) => true,
        (false, false) => {
            assert_eq!(header, "X-Test-Token: ****");
            assert_eq!(secret, "****");
            false
        }
        mixed => panic!("half masked: {mixed:?} in {subscription}"),
    }
}

/// Every way to reach a subscription by id, and what `caller` gets for each.
async fn instance_statuses(server: &TestServer, caller: &str, id: &str) -> Vec<StatusCode> {
    let mut statuses = Vec::new();
    for path in [
        format!("/Subscription/{id}"),
        format!("/Subscription/{id}/$status"),
        format!("/Subscription/{id}/$events?content=full-resource"),
        format!("/Subscription/{id}/$get-ws-binding-token"),
    ] {
        statuses.push(server.get(&path, caller).await.0);
    }
    statuses
}

#[tokio::test]
async fn a_token_sharing_only_the_sub_is_not_the_author() {
    let server = TestServer::start_hub().await;
    let author = token("shared", "practitioner", Some("Practitioner/alice"), None);
    let id = create(&server, &author, &secret_rest_hook(&server.base)).await;

    let (status, mine) = server.get(&format!("/Subscription/{id}"), &author).await;
    assert_eq!(status, StatusCode::OK);
    assert!(shows_secrets(&mine), "the author sees its own secrets");

    // Each of these shares `sub` (and some the FHIR user) with the author but is someone else.
    let impostors = [
        (
            "auditor, same sub and fhirUser",
            token("shared", "auditor", Some("Practitioner/alice"), None),
        ),
        (
            "practitioner, same sub, other fhirUser",
            token("shared", "practitioner", Some("Practitioner/bob"), None),
        ),
        (
            "practitioner, same sub and fhirUser, another issuer",
            token(
                "shared",
                "practitioner",
                Some("Practitioner/alice"),
                Some("https://idp.example"),
            ),
        ),
        (
            "admin, same sub and fhirUser",
            token("shared", "admin", Some("Practitioner/alice"), None),
        ),
    ];
    for (name, impostor) in &impostors {
        let (_, found) = server.get("/Subscription", impostor).await;
        let admin = name.starts_with("admin");
        if admin {
            // An admin reads every subscription, but not its author's secrets.
            assert_eq!(found["total"], 1, "{name}");
            assert!(!shows_secrets(&found["entry"][0]["resource"]), "{name}");
            let (_, read) = server.get(&format!("/Subscription/{id}"), impostor).await;
            assert!(!shows_secrets(&read), "{name}");
        } else {
            assert_eq!(found["total"], 0, "{name}: {found}");
            let statuses = instance_statuses(&server, impostor, &id).await;
            assert!(
                statuses.iter().all(|s| *s == StatusCode::FORBIDDEN),
                "{name}: {statuses:?}"
            );
            let (_, status_all) = server.get("/Subscription/$status", impostor).await;
            assert_eq!(status_all["total"], 0, "{name}: {status_all}");
            let r = server
                .request(Method::DELETE, &format!("/Subscription/{id}"), impostor)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{name}");
        }
    }
    // The author's own view is untouched.
    let (status, mine) = server.get(&format!("/Subscription/{id}"), &author).await;
    assert_eq!(status, StatusCode::OK);
    assert!(shows_secrets(&mine));
    server.stop().await;
}

#[tokio::test]
async fn events_never_exceed_the_role_of_whoever_asks() {
    let server = TestServer::start().await;
    // The attack of the issue: an auditor token and a practitioner token with one `sub` (and
    // one FHIR user). The auditor's broad full-resource subscription hears about every Task.
    let auditor = token("alice", "auditor", Some("Practitioner/alice"), None);
    let alice = token("alice", "practitioner", Some("Practitioner/alice"), None);
    let id = create(
        &server,
        &auditor,
        &ws_subscription(&server.base, "task-changed", "full-resource"),
    )
    .await;
    let bobs = server
        .create_task(&task("requested", Some("Practitioner/bob")))
        .await;
    let events = common::eventually("Bob's Task numbered for the auditor", || async {
        let (_, bundle) = server
            .get(
                &format!("/Subscription/{id}/$events?content=full-resource"),
                &auditor,
            )
            .await;
        bundle["entry"]
            .as_array()
            .filter(|e| e.len() > 1)
            .map(|_| bundle.clone())
    })
    .await;
    assert_eq!(
        events["entry"][1]["resource"]["id"], bobs["id"],
        "the auditor itself reads Bob's Task"
    );

    // Alice, with the same sub, gets nothing of it.
    let (status, outcome) = server
        .get(
            &format!("/Subscription/{id}/$events?content=full-resource"),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    assert_outcome(&outcome, "forbidden");
    let (status, _) = server
        .get(&format!("/Subscription/{id}/$get-ws-binding-token"), &alice)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server
        .get("/Subscription/$get-ws-binding-token", &alice)
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "Alice has no websocket subscription of her own to bind"
    );
    let (status, _) = server
        .get(
            &format!("/Subscription/$get-ws-binding-token?id={id}"),
            &alice,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // The auditor binds its own.
    let (status, _) = server
        .get("/Subscription/$get-ws-binding-token", &auditor)
        .await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn tokens_minted_for_two_roles_are_two_authors() {
    let server = TestServer::start().await;
    // The test helpers mint through `Authenticator::issue`, as `baton token` does: the same
    // FHIR user as auditor and as practitioner.
    let auditor = server.auditor();
    let practitioner = server.practitioner("Practitioner/audit");
    let id = create(
        &server,
        &auditor,
        &ws_subscription(&server.base, "task-changed", "full-resource"),
    )
    .await;
    let statuses = instance_statuses(&server, &practitioner, &id).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::FORBIDDEN),
        "{statuses:?}"
    );
    let statuses = instance_statuses(&server, &auditor, &id).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_quota_holds_under_concurrent_creates() {
    const QUOTA: usize = 3;
    const ATTEMPTS: usize = 3000;
    let server = TestServer::start_with(|c| {
        c.limits.subscriptions_per_author = QUOTA;
        // Only the quota is under test: no request-rate or connection limit may refuse first.
        c.limits.requests_per_second_per_token = 0;
        c.limits.max_connections_per_client = 0;
    })
    .await;
    let alice = server.practitioner("Practitioner/alice");
    let body = ws_subscription(&server.base, "task-changed", "id-only").to_string();
    let attempts = (0..ATTEMPTS).map(|_| {
        server
            .request(Method::POST, "/Subscription", &alice)
            .header("content-type", "application/fhir+json")
            .body(body.clone())
            .send()
    });
    let responses = futures::future::join_all(attempts).await;
    let mut created = Vec::new();
    let mut refused = 0;
    for response in responses {
        let response = response.expect("every create is answered");
        match response.status() {
            StatusCode::CREATED => {
                let body: Value = response.json().await.unwrap();
                created.push(body["id"].as_str().unwrap().to_string());
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(
                    response.headers().get("retry-after").is_none(),
                    "waiting frees no slot"
                );
                if refused == 0 {
                    let body: Value = response.json().await.unwrap();
                    assert_outcome(&body, "throttled");
                    let why = body["issue"][0]["diagnostics"].as_str().unwrap();
                    assert!(why.contains(&QUOTA.to_string()), "{why}");
                    assert!(why.contains("subscriptions_per_author"), "{why}");
                    assert!(why.contains("off"), "says how to free a slot: {why}");
                }
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created.len(), QUOTA, "exactly the quota was created");
    assert_eq!(refused, ATTEMPTS - QUOTA);
    let (_, mine) = server.get("/Subscription", &alice).await;
    assert_eq!(mine["total"], QUOTA);

    // The quota is per identity: the same FHIR user as auditor has its own, admins none.
    let auditor = token("alice", "auditor", Some("Practitioner/alice"), None);
    let (status, _) = server
        .post_json(
            "/Subscription",
            &auditor,
            &ws_subscription(&server.base, "task-changed", "id-only"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let admin = server.admin();
    for _ in 0..QUOTA + 2 {
        let (status, _) = server
            .post_json(
                "/Subscription",
                &admin,
                &ws_subscription(&server.base, "task-changed", "id-only"),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "admins have no quota");
    }

    // Turning one off frees a slot; turning it back on needs one.
    let first = &created[0];
    let (_, mut current) = server.get(&format!("/Subscription/{first}"), &alice).await;
    current["status"] = json!("off");
    let (status, off) = server
        .put_json(&format!("/Subscription/{first}"), &alice, &current)
        .await;
    assert_eq!(status, StatusCode::OK, "{off}");
    let (status, _) = server
        .post_json(
            "/Subscription",
            &alice,
            &ws_subscription(&server.base, "task-changed", "id-only"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "the freed slot is taken");
    let mut again = off.clone();
    again["status"] = json!("requested");
    let (status, outcome) = server
        .put_json(&format!("/Subscription/{first}"), &alice, &again)
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{outcome}");
    // An admin turning it back on is held to its author's quota too.
    let (status, _) = server
        .put_json(&format!("/Subscription/{first}"), &admin, &again)
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Updating a live one takes no new slot.
    let second = &created[1];
    let (_, mut live) = server.get(&format!("/Subscription/{second}"), &alice).await;
    live["reason"] = json!("still mine");
    let (status, _) = server
        .put_json(&format!("/Subscription/{second}"), &alice, &live)
        .await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn an_update_by_the_author_brings_its_rights_up_to_date() {
    let server = TestServer::start().await;
    let lab = "http://example.org/roles|lab";
    // Two tokens of one identity: performer types say which queues it works, not who it is.
    let with_queue = server.practitioner_with_types("Practitioner/carol", &[lab]);
    let without_queue = server.practitioner("Practitioner/carol");
    let id = create(
        &server,
        &with_queue,
        &ws_subscription(&server.base, "task-changed", "full-resource"),
    )
    .await;
    let mut queued = task("requested", None);
    queued["performerType"] =
        json!([{ "coding": [{ "system": "http://example.org/roles", "code": "lab" }] }]);
    let queued = server.create_task(&queued).await;
    let events_path = format!("/Subscription/{id}/$events?content=full-resource");
    common::eventually("the queued Task numbered for Carol", || async {
        let (_, bundle) = server.get(&events_path, &without_queue).await;
        (bundle["entry"].as_array().map_or(0, Vec::len) > 1).then_some(())
    })
    .await;
    let (_, bundle) = server.get(&events_path, &with_queue).await;
    assert_eq!(bundle["entry"][1]["resource"]["id"], queued["id"]);

    // Carol updates her subscription with a token that no longer works the lab queue: the
    // subscription now carries only what that token may read.
    let (status, mut current) = server
        .get(&format!("/Subscription/{id}"), &without_queue)
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the same identity, whatever its queues"
    );
    current["reason"] = json!("no longer on the lab rota");
    let (status, _) = server
        .put_json(&format!("/Subscription/{id}"), &without_queue, &current)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, bundle) = server.get(&events_path, &with_queue).await;
    assert_eq!(
        bundle["entry"].as_array().unwrap().len(),
        1,
        "the queued Task is withheld now: {bundle}"
    );
    server.stop().await;
}
