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
    // RFC 6750: a request without a bearer token gets the bare challenge, a bad token
    // `error="invalid_token"`.
    let bare = "Bearer";
    let invalid = r#"Bearer error="invalid_token""#;
    let cases = [
        ("missing", None, bare),
        (
            "not bearer",
            Some("Basic YWRtaW46YWRtaW4=".to_string()),
            bare,
        ),
        ("garbage", Some("Bearer abc".to_string()), invalid),
        (
            "forged signature",
            Some(format!("Bearer {forged}")),
            invalid,
        ),
    ];
    for (name, header, challenge) in cases {
        let mut request = server.client.get(&url);
        if let Some(h) = header {
            request = request.header("authorization", h);
        }
        let r = request.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{name}");
        assert_eq!(r.headers()["www-authenticate"], challenge, "{name}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_outcome(&body, "login");
    }
    server.stop().await;
}

async fn delete(server: &TestServer, id: &str, token: &str) -> StatusCode {
    server
        .request(Method::DELETE, &format!("/Task/{id}"), token)
        .send()
        .await
        .unwrap()
        .status()
}

/// The version numbers in a history Bundle, newest first.
fn history_versions(bundle: &serde_json::Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["response"]["etag"]
                .as_str()
                .unwrap()
                .trim_start_matches("W/\"")
                .trim_end_matches('"')
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn recreating_a_deleted_id_does_not_hand_over_its_past() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let auditor = server.auditor();
    let alice = server.practitioner("Practitioner/alice");
    let bob = server.practitioner("Practitioner/bob");
    let mut bobs = task("requested", Some("Practitioner/bob"));
    bobs["id"] = json!("shared-id");
    bobs["description"] = json!("Bob's confidential work");
    let (s, _) = server.put_json("/Task/shared-id", &bob, &bobs).await;
    assert_eq!(s, StatusCode::CREATED, "v1, Bob's");
    bobs["status"] = json!("accepted");
    let (s, _) = server.put_json("/Task/shared-id", &bob, &bobs).await;
    assert_eq!(s, StatusCode::OK, "v2, Bob's");
    assert_eq!(
        delete(&server, "shared-id", &bob).await,
        StatusCode::NO_CONTENT
    );

    // Alice may not take the id over: it would sit next to Bob's versions.
    let mut alices = task("requested", Some("Practitioner/alice"));
    alices["id"] = json!("shared-id");
    let (s, o) = server.put_json("/Task/shared-id", &alice, &alices).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{o}");
    assert_outcome(&o, "forbidden");
    for path in ["/Task/shared-id/_history", "/Task/shared-id/_history/1"] {
        assert_eq!(
            server.get(path, &alice).await.0,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }

    // An admin may, and gives it to Alice (v4): Alice then reads her version only.
    let (s, _) = server.put_json("/Task/shared-id", &admin, &alices).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        server.get("/Task/shared-id", &alice).await.0,
        StatusCode::OK
    );
    let (s, history) = server.get("/Task/shared-id/_history", &alice).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(history_versions(&history), ["4"]);
    assert_eq!(history["total"], 1, "total counts what the caller may see");
    assert!(!history.to_string().contains("confidential"), "{history}");
    let (_, paged) = server
        .get("/Task/shared-id/_history?_count=1", &alice)
        .await;
    assert_eq!(history_versions(&paged), ["4"]);
    assert!(
        !paged["link"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "next"),
        "no next page of hidden versions: {paged}"
    );
    for version in ["1", "2", "3"] {
        let (s, o) = server
            .get(&format!("/Task/shared-id/_history/{version}"), &alice)
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "vread {version}: {o}");
        assert_outcome(&o, "forbidden");
    }
    assert_eq!(
        server.get("/Task/shared-id/_history/4", &alice).await.0,
        StatusCode::OK
    );

    // Auditors and admins still read the whole history.
    for reader in [&auditor, &admin] {
        let (_, history) = server.get("/Task/shared-id/_history", reader).await;
        assert_eq!(history_versions(&history), ["4", "3", "2", "1"]);
        assert_eq!(history["total"], 4);
    }

    // The former owner may re-create its own deleted Task, and reads its whole past.
    let mut mine = task("requested", Some("Practitioner/bob"));
    mine["id"] = json!("bobs-again");
    let (s, _) = server.put_json("/Task/bobs-again", &bob, &mine).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(
        delete(&server, "bobs-again", &bob).await,
        StatusCode::NO_CONTENT
    );
    let (s, _) = server.put_json("/Task/bobs-again", &bob, &mine).await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, history) = server.get("/Task/bobs-again/_history", &bob).await;
    assert_eq!(history_versions(&history), ["3", "2", "1"]);
    assert_eq!(history["total"], 3);
    server.stop().await;
}

#[tokio::test]
async fn history_shows_each_version_only_to_who_may_read_it() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let lab = "http://example.org/roles|lab";
    let carol = server.practitioner_with_types("Practitioner/carol", &[lab]);
    let dave = server.practitioner("Practitioner/dave");
    // v1 Dave's, v2 handed to Carol by an admin, v3 Carol's update.
    let mut t = task("requested", Some("Practitioner/dave"));
    t["description"] = json!("dave's notes");
    let created = server.create_task(&t).await;
    let id = created["id"].as_str().unwrap();
    let mut handed = created.clone();
    handed["owner"] = json!({ "reference": "Practitioner/carol" });
    handed["description"] = json!("for carol");
    assert_eq!(
        server
            .put_json(&format!("/Task/{id}"), &admin, &handed)
            .await
            .0,
        StatusCode::OK
    );
    handed["status"] = json!("accepted");
    assert_eq!(
        server
            .put_json(&format!("/Task/{id}"), &carol, &handed)
            .await
            .0,
        StatusCode::OK
    );
    let (_, history) = server.get(&format!("/Task/{id}/_history"), &carol).await;
    assert_eq!(history_versions(&history), ["3", "2"]);
    assert_eq!(history["total"], 2);
    assert!(!history.to_string().contains("dave's notes"));
    let (_, page) = server
        .get(&format!("/Task/{id}/_history?_count=1&_offset=1"), &carol)
        .await;
    assert_eq!(history_versions(&page), ["2"]);
    assert_eq!(page["total"], 2);
    assert_eq!(
        server
            .get(&format!("/Task/{id}/_history/1"), &carol)
            .await
            .0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        server.get(&format!("/Task/{id}/_history"), &dave).await.0,
        StatusCode::FORBIDDEN,
        "Dave no longer reads the Task at all"
    );
    // Carol deletes it: the deletion shows to her, as the version it deleted was hers.
    assert_eq!(delete(&server, id, &carol).await, StatusCode::NO_CONTENT);
    let (_, history) = server.get(&format!("/Task/{id}/_history"), &carol).await;
    assert_eq!(history_versions(&history), ["4", "3", "2"]);
    assert_eq!(
        server
            .get(&format!("/Task/{id}/_history/4"), &carol)
            .await
            .0,
        StatusCode::GONE
    );
    server.stop().await;
}

#[tokio::test]
async fn an_owner_named_without_a_reference_is_not_in_the_queue() {
    let server = TestServer::start().await;
    let lab = "http://example.org/roles|lab";
    let carol = server.practitioner_with_types("Practitioner/carol", &[lab]);
    let auditor = server.auditor();
    let performer =
        json!([{ "coding": [{ "system": "http://example.org/roles", "code": "lab" }] }]);
    let owners = [
        json!({ "display": "Dr. Elsewhere" }),
        json!({ "identifier": { "system": "http://example.org/staff", "value": "42" } }),
    ];
    let mut queued = task("requested", None);
    queued["performerType"] = performer.clone();
    let queued = server.create_task(&queued).await;
    for owner in owners {
        let mut t = task("requested", None);
        t["performerType"] = performer.clone();
        t["owner"] = owner.clone();
        let created = server.create_task(&t).await;
        let id = created["id"].as_str().unwrap();
        assert_eq!(
            server.get(&format!("/Task/{id}"), &carol).await.0,
            StatusCode::FORBIDDEN,
            "{owner}"
        );
        assert_eq!(
            server.get(&format!("/Task/{id}"), &auditor).await.0,
            StatusCode::OK,
            "{owner}"
        );
        for query in ["", "owner:missing=true", &format!("_id={id}")] {
            assert!(
                !server
                    .search_ids(query, &carol)
                    .await
                    .contains(&id.to_string()),
                "{owner} found by '{query}'"
            );
        }
        assert!(
            server
                .search_ids("owner:missing=false", &auditor)
                .await
                .contains(&id.to_string()),
            "{owner} is owned"
        );
        // Claiming it is refused: it is not Carol's queue's to take.
        let claim = json!([{ "op": "replace", "path": "/owner",
                             "value": { "reference": "Practitioner/carol" } }]);
        let r = server
            .request(Method::PATCH, &format!("/Task/{id}"), &carol)
            .header("content-type", "application/json-patch+json")
            .body(claim.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{owner}");
        let (_, still) = server.get(&format!("/Task/{id}"), &auditor).await;
        assert_eq!(still["owner"], owner);
    }
    // The genuinely unowned Task is still Carol's queue's.
    assert_eq!(
        server.search_ids("owner:missing=true", &carol).await,
        [queued["id"].as_str().unwrap()]
    );
    server.stop().await;
}

#[tokio::test]
async fn only_admins_and_owners_delete() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let auditor = server.auditor();
    let lab = "http://example.org/roles|lab";
    let carol = server.practitioner_with_types("Practitioner/carol", &[lab]);
    let dave = server.practitioner("Practitioner/dave");
    let mut queued = task("requested", None);
    queued["performerType"] =
        json!([{ "coding": [{ "system": "http://example.org/roles", "code": "lab" }] }]);
    let queued = server.create_task(&queued).await;
    let id = queued["id"].as_str().unwrap();

    // Carol reads and may claim the queued Task, but may not delete it from the queue.
    assert_eq!(
        server.get(&format!("/Task/{id}"), &carol).await.0,
        StatusCode::OK
    );
    assert_eq!(delete(&server, id, &carol).await, StatusCode::FORBIDDEN);
    assert_eq!(
        server.get(&format!("/Task/{id}"), &admin).await.0,
        StatusCode::OK
    );

    // Once hers, she may.
    let mut claimed = queued.clone();
    claimed["owner"] = json!({ "reference": "Practitioner/carol" });
    assert_eq!(
        server
            .put_json(&format!("/Task/{id}"), &carol, &claimed)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(delete(&server, id, &carol).await, StatusCode::NO_CONTENT);

    // Deleting it again: 204 to whoever could have deleted it, 403 to anyone else.
    let cases = [
        ("its owner", &carol, StatusCode::NO_CONTENT),
        ("an admin", &admin, StatusCode::NO_CONTENT),
        ("a stranger", &dave, StatusCode::FORBIDDEN),
        ("an auditor", &auditor, StatusCode::FORBIDDEN),
    ];
    for (who, token, expected) in cases {
        assert_eq!(delete(&server, id, token).await, expected, "{who}");
    }
    assert_eq!(
        delete(&server, "never-existed", &admin).await,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}
