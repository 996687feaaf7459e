//! SMART scopes narrow the role: a token may do what both its role and its scopes allow. The
//! matrix runs each role with each scope form through each interaction, expects 2xx or 403,
//! and checks that nothing changed on a 403. Tokens are local HS256 tokens carrying a `scope`
//! claim (the rule is the same for an issuer's tokens; tests/oidc.rs covers those).

mod common;

use common::{TestServer, receiver::Receiver};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interaction {
    Read,
    Search,
    Create,
    Update,
    Patch,
    Delete,
    Subscribe,
}
use Interaction::*;

const ALL: [Interaction; 7] = [Read, Search, Create, Update, Patch, Delete, Subscribe];

fn token(role: &str, scope: Option<&str>, patient: Option<&str>) -> String {
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 600;
    let mut claims = json!({"sub": format!("{role}-scoped"), "role": role, "exp": exp});
    if role != "admin" {
        claims["fhirUser"] = json!("Practitioner/p1");
    }
    if let Some(scope) = scope {
        claims["scope"] = json!(scope);
    }
    if let Some(patient) = patient {
        claims["patient"] = json!(patient);
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    )
    .unwrap()
}

/// A Task the practitioner p1 owns, for Patient/1.
fn owned_task(marker: &str) -> Value {
    json!({"resourceType": "Task", "status": "requested", "intent": "order",
        "owner": {"reference": "Practitioner/p1"}, "for": {"reference": "Patient/1"},
        "identifier": [{"system": "urn:test", "value": marker}]})
}

/// What the role alone allows (p1 owns every Task of the test).
fn role_allows(role: &str, interaction: Interaction) -> bool {
    match role {
        "auditor" => matches!(interaction, Read | Search | Subscribe),
        _ => true,
    }
}

#[tokio::test]
async fn scope_matrix() {
    let server = TestServer::start_hub().await;
    let admin = server.admin();
    let (status, shared) = server
        .post_json("/Task", &admin, &owned_task("shared"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{shared}");
    let shared_id = shared["id"].as_str().unwrap().to_string();

    // (scope claim, patient claim, the interactions the scopes allow)
    let forms: [(Option<&str>, Option<&str>, &[Interaction]); 10] = [
        (None, None, &ALL),
        (
            Some("system/Task.cruds system/Subscription.cruds"),
            None,
            &ALL,
        ),
        (Some("system/Task.rs"), None, &[Read, Search]),
        (
            Some("user/Task.read user/Subscription.read"),
            None,
            &[Read, Search],
        ),
        (
            Some("user/Task.write"),
            None,
            &[Create, Update, Patch, Delete],
        ),
        (Some("*.*"), None, &ALL),
        (
            Some("user/Task.cu user/Subscription.c"),
            None,
            &[Create, Update, Patch, Subscribe],
        ),
        (Some("user/Subscription.cruds openid"), None, &[Subscribe]),
        (Some("patient/Task.rs"), Some("1"), &[Read, Search]),
        (Some("patient/Task.rs"), None, &[]),
    ];
    let receiver = Receiver::start().await;
    let mut case = 0;
    for role in ["admin", "practitioner", "auditor"] {
        for (scope, patient, scope_allows) in forms {
            let token = token(role, scope, patient);
            for interaction in ALL {
                case += 1;
                let name = format!("{role} {scope:?} patient={patient:?} {interaction:?}");
                let expected =
                    role_allows(role, interaction) && scope_allows.contains(&interaction);
                // A fresh Task for each write, so an allowed write does not change the next case.
                let (_, target) = server
                    .post_json("/Task", &admin, &owned_task(&format!("target-{case}")))
                    .await;
                let target_id = target["id"].as_str().unwrap().to_string();
                let marker = format!("created-{case}");
                let request = match interaction {
                    Read => server.request(Method::GET, &format!("/Task/{shared_id}"), &token),
                    Search => {
                        server.request(Method::GET, &format!("/Task?_id={shared_id}"), &token)
                    }
                    Create => server
                        .request(Method::POST, "/Task", &token)
                        .header("content-type", "application/fhir+json")
                        .body(owned_task(&marker).to_string()),
                    Update => {
                        let mut changed = target.clone();
                        changed["status"] = json!("accepted");
                        server
                            .request(Method::PUT, &format!("/Task/{target_id}"), &token)
                            .header("content-type", "application/fhir+json")
                            .body(changed.to_string())
                    }
                    Patch => server
                        .request(Method::PATCH, &format!("/Task/{target_id}"), &token)
                        .header("content-type", "application/json-patch+json")
                        .body(
                            json!([{"op": "replace", "path": "/status", "value": "accepted"}])
                                .to_string(),
                        ),
                    Delete => server.request(Method::DELETE, &format!("/Task/{target_id}"), &token),
                    Subscribe => {
                        let mut s = common::subscription(
                            &server.base,
                            "task-changed",
                            &[],
                            &receiver.url,
                            "id-only",
                        );
                        s["reason"] = json!(marker);
                        server
                            .request(Method::POST, "/Subscription", &token)
                            .header("content-type", "application/fhir+json")
                            .body(s.to_string())
                    }
                };
                let response = request.send().await.unwrap();
                let challenge = response
                    .headers()
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap().to_string());
                let (status, body) = common::body(response).await;
                if expected {
                    assert!(status.is_success(), "{name}: {status} {body}");
                    continue;
                }
                assert_eq!(status, StatusCode::FORBIDDEN, "{name}: {body}");
                common::assert_outcome(&body, "forbidden");
                // Refused for its scopes (the role would allow it): the challenge names the scope.
                if role_allows(role, interaction) {
                    let challenge = challenge.unwrap_or_default();
                    assert!(
                        challenge.starts_with(r#"Bearer error="insufficient_scope", scope=""#),
                        "{name}: {challenge}"
                    );
                }
                // Nothing changed.
                let (_, now) = server.get(&format!("/Task/{target_id}"), &admin).await;
                assert_eq!(
                    now["meta"]["versionId"], target["meta"]["versionId"],
                    "{name}"
                );
                assert_eq!(now["status"], "requested", "{name}");
                assert!(
                    server
                        .search_ids(&format!("identifier=urn:test|{marker}"), &admin)
                        .await
                        .is_empty(),
                    "{name}: a Task was created"
                );
                let (_, subscriptions) = server.get("/Subscription", &admin).await;
                let made = subscriptions["entry"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["resource"]["reason"] == marker.as_str());
                assert!(!made, "{name}: a Subscription was created");
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn patient_scopes_reach_only_the_patients_tasks() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let mut other = owned_task("other");
    other["for"] = json!({"reference": "Patient/2"});
    let (_, mine) = server.post_json("/Task", &admin, &owned_task("mine")).await;
    let (_, theirs) = server.post_json("/Task", &admin, &other).await;
    let token = token("practitioner", Some("patient/Task.rs"), Some("Patient/1"));
    assert_eq!(
        server.search_ids("", &token).await,
        vec![mine["id"].as_str().unwrap().to_string()]
    );
    let (status, _) = server
        .get(&format!("/Task/{}", theirs["id"].as_str().unwrap()), &token)
        .await;
    assert!(
        status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND,
        "{status}"
    );
    // The same practitioner without the patient scope reads both (its role decides).
    let unscoped = token_for_role_only();
    assert_eq!(server.search_ids("", &unscoped).await.len(), 2);
    server.stop().await;
}

fn token_for_role_only() -> String {
    token("practitioner", None, None)
}

#[tokio::test]
async fn notifications_follow_the_authors_scopes() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    // Both may subscribe; only the first may read Tasks.
    let readers = [
        ("reads", "user/Subscription.cruds user/Task.rs", true),
        ("blind", "user/Subscription.cruds", false),
    ];
    let mut ids = Vec::new();
    for (name, scope, _) in readers {
        let token = token("practitioner", Some(scope), None);
        let s = common::subscription(
            &server.base,
            "task-changed",
            &[],
            &receiver.url,
            "full-resource",
        );
        let (status, created) = server.post_json("/Subscription", &token, &s).await;
        assert_eq!(status, StatusCode::CREATED, "{name}: {created}");
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        common::eventually("the handshake", || async {
            (!receiver.of(id, "handshake").is_empty()).then_some(())
        })
        .await;
    }
    server.create_task(&owned_task("notified")).await;
    common::eventually("the reader's notification", || async {
        (!receiver.event_numbers(&ids[0]).is_empty()).then_some(())
    })
    .await;
    // The same change was matched for both at once: the blind author's subscription counted
    // no event for it, and was sent none.
    let admin = server.admin();
    let (status, report) = server
        .get(&format!("/Subscription/{}/$status", ids[1]), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    // $status answers a Bundle whose first entry is the status Parameters.
    let since = common::receiver::parameter(&report, "events-since-subscription-start");
    assert_eq!(since.as_deref(), Some("0"), "{report}");
    assert!(receiver.event_numbers(&ids[1]).is_empty());
    server.stop().await;
}
