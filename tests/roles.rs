//! The role matrix of the design: each role × create/read/update/search/delete, on its own
//! and on foreign Tasks, and the token checks.

mod common;

use common::{TestServer, assert_outcome, task};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn role_matrix() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let auditor = server.auditor();
    let alice = server.practitioner("Practitioner/alice");
    let bob = server.practitioner("Practitioner/bob");

    let alices = server
        .create_task(&task("requested", Some("Practitioner/alice")))
        .await;
    let bobs = server
        .create_task(&task("requested", Some("Practitioner/bob")))
        .await;
    let alice_id = alices["id"].as_str().unwrap();
    let bob_id = bobs["id"].as_str().unwrap();

    // Create.
    let (s, _) = server
        .post_json(
            "/Task",
            &alice,
            &task("requested", Some("Practitioner/alice")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "practitioner creates its own task");
    let (s, o) = server
        .post_json(
            "/Task",
            &alice,
            &task("requested", Some("Practitioner/bob")),
        )
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "practitioner creates a task for someone else"
    );
    assert_outcome(&o, "forbidden");
    let (s, _) = server
        .post_json("/Task", &alice, &task("requested", None))
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "practitioner creates an unowned task outside any queue"
    );
    let (s, o) = server
        .post_json("/Task", &auditor, &task("requested", None))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "auditor creates");
    assert_outcome(&o, "forbidden");
    let (s, _) = server
        .post_json(
            "/Task",
            &admin,
            &task("requested", Some("Practitioner/bob")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "admin creates anything");

    // Read.
    assert_eq!(
        server.get(&format!("/Task/{alice_id}"), &alice).await.0,
        StatusCode::OK
    );
    let (s, o) = server.get(&format!("/Task/{bob_id}"), &alice).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "practitioner reads a foreign task"
    );
    assert_outcome(&o, "forbidden");
    assert_eq!(
        server
            .get(&format!("/Task/{bob_id}/_history"), &alice)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        server
            .get(&format!("/Task/{bob_id}/_history/1"), &alice)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        server.get(&format!("/Task/{bob_id}"), &auditor).await.0,
        StatusCode::OK
    );
    assert_eq!(
        server.get(&format!("/Task/{bob_id}"), &admin).await.0,
        StatusCode::OK
    );

    // Search: practitioners see only their own, auditors and admins everything.
    let mine = server.search_ids("", &alice).await;
    assert_eq!(mine.len(), 2);
    let (_, all) = server.get("/Task?_summary=count", &auditor).await;
    assert_eq!(all["total"], 4);
    assert!(
        server
            .search_ids(&format!("_id={bob_id}"), &alice)
            .await
            .is_empty()
    );

    // Update.
    let mut update = alices.clone();
    update["status"] = json!("accepted");
    assert_eq!(
        server
            .put_json(&format!("/Task/{alice_id}"), &alice, &update)
            .await
            .0,
        StatusCode::OK
    );
    let mut handover = update.clone();
    handover["owner"] = json!({ "reference": "Practitioner/bob" });
    let (s, o) = server
        .put_json(&format!("/Task/{alice_id}"), &alice, &handover)
        .await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "practitioner hands its task to someone else"
    );
    assert_outcome(&o, "forbidden");
    let mut steal = bobs.clone();
    steal["owner"] = json!({ "reference": "Practitioner/alice" });
    assert_eq!(
        server
            .put_json(&format!("/Task/{bob_id}"), &alice, &steal)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    let patch = json!([{ "op": "replace", "path": "/status", "value": "accepted" }]);
    let r = server
        .request(Method::PATCH, &format!("/Task/{bob_id}"), &alice)
        .header("content-type", "application/json-patch+json")
        .body(patch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "practitioner patches a foreign task"
    );
    assert_eq!(
        server
            .put_json(&format!("/Task/{bob_id}"), &auditor, &bobs)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        server
            .put_json(
                &format!("/Task/{bob_id}"),
                &admin,
                &handover
                    .clone()
                    .as_object()
                    .map(|_| {
                        let mut t = bobs.clone();
                        t["status"] = json!("accepted");
                        t
                    })
                    .unwrap()
            )
            .await
            .0,
        StatusCode::OK
    );

    // Delete.
    let r = server
        .request(Method::DELETE, &format!("/Task/{bob_id}"), &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = server
        .request(Method::DELETE, &format!("/Task/{bob_id}"), &auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = server
        .request(Method::DELETE, &format!("/Task/{alice_id}"), &alice)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NO_CONTENT,
        "practitioner deletes its own task"
    );

    // Bob's own view is untouched by all of Alice's attempts.
    let (_, bobs_now) = server.get(&format!("/Task/{bob_id}"), &bob).await;
    assert_eq!(bobs_now["owner"]["reference"], "Practitioner/bob");
    server.stop().await;
}

#[tokio::test]
async fn role_queues_widen_what_a_practitioner_sees() {
    let server = TestServer::start().await;
    let lab = "http://example.org/roles|lab";
    let mut queued = task("requested", None);
    queued["performerType"] =
        json!([{ "coding": [{ "system": "http://example.org/roles", "code": "lab" }] }]);
    let mut other = task("requested", None);
    other["performerType"] =
        json!([{ "coding": [{ "system": "http://example.org/roles", "code": "radiology" }] }]);
    let queued = server.create_task(&queued).await;
    server.create_task(&other).await;
    let carol = server.practitioner_with_types("Practitioner/carol", &[lab]);
    let dave = server.practitioner("Practitioner/dave");
    let ids = server.search_ids("owner:missing=true", &carol).await;
    assert_eq!(ids, vec![queued["id"].as_str().unwrap().to_string()]);
    assert!(
        server
            .search_ids("owner:missing=true", &dave)
            .await
            .is_empty()
    );
    let id = queued["id"].as_str().unwrap();
    assert_eq!(
        server.get(&format!("/Task/{id}"), &carol).await.0,
        StatusCode::OK
    );
    assert_eq!(
        server.get(&format!("/Task/{id}"), &dave).await.0,
        StatusCode::FORBIDDEN
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_tokens_get_401() {
    let server = TestServer::start().await;
    let url = format!("{}/Task", server.base);
    let forged = {
        let good = server.admin();
        let mut parts: Vec<&str> = good.split('.').collect();
        let sig = "AAAA".repeat(10);
        parts[2] = &sig;
        parts.join(".")
    };
    let cases = [
        ("missing", None),
        ("not bearer", Some("Basic YWRtaW46YWRtaW4=".to_string())),
        ("garbage", Some("Bearer abc".to_string())),
        ("forged signature", Some(format!("Bearer {forged}"))),
    ];
    for (name, header) in cases {
        let mut request = server.client.get(&url);
        if let Some(h) = header {
            request = request.header("authorization", h);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{name}");
        assert_eq!(r.headers()["www-authenticate"], "Bearer", "{name}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_outcome(&body, "login");
    }
    server.stop().await;
}
