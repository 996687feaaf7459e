//! The Task REST API over real HTTP: lifecycle, headers, history, conditional create,
//! If-Match races, restarts and the operator endpoints.

mod common;

use common::{TestServer, assert_outcome, body, task};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn create_read_update_patch_delete_round_trip() {
    let server = TestServer::start().await;
    let admin = server.admin();

    // Create: 201 with Location, ETag and server-assigned id and meta.
    let mut new = task("requested", Some("Practitioner/1"));
    new["id"] = json!("client-chosen");
    let response = server
        .request(Method::POST, "/Task", &admin)
        .header("content-type", "application/fhir+json")
        .body(new.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let etag = response.headers()["etag"].to_str().unwrap().to_string();
    let location = response.headers()["location"].to_str().unwrap().to_string();
    assert!(response.headers().contains_key("last-modified"));
    let (_, created) = body(response).await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_ne!(id, "client-chosen", "the server assigns ids on create");
    assert_eq!(etag, "W/\"1\"");
    assert_eq!(location, format!("{}/Task/{id}/_history/1", server.base));
    assert_eq!(created["meta"]["versionId"], "1");
    assert!(
        created["meta"]["lastUpdated"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    // Read.
    let (status, read) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read, created);

    // Update with If-Match.
    let mut changed = read.clone();
    changed["status"] = json!("accepted");
    let response = server
        .request(Method::PUT, &format!("/Task/{id}"), &admin)
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"1\"")
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"], "W/\"2\"");
    let (_, updated) = body(response).await;
    assert_eq!(updated["status"], "accepted");
    assert_eq!(updated["meta"]["versionId"], "2");

    // A stale If-Match is refused and changes nothing.
    let response = server
        .request(Method::PUT, &format!("/Task/{id}"), &admin)
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"1\"")
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    assert_outcome(&body(response).await.1, "conflict");

    // JSON Patch with If-Match, Prefer: return=minimal.
    let patch = json!([{ "op": "replace", "path": "/status", "value": "in-progress" }]);
    let response = server
        .request(Method::PATCH, &format!("/Task/{id}"), &admin)
        .header("content-type", "application/json-patch+json")
        .header("if-match", "W/\"2\"")
        .header("prefer", "return=minimal")
        .body(patch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"], "W/\"3\"");
    assert!(
        response.text().await.unwrap().is_empty(),
        "return=minimal sends no body"
    );
    let (_, read) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(read["status"], "in-progress");

    // Delete, then read is 410 and search no longer finds it.
    let response = server
        .request(Method::DELETE, &format!("/Task/{id}"), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, gone) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(status, StatusCode::GONE);
    assert_outcome(&gone, "deleted");
    assert!(
        server
            .search_ids(&format!("_id={id}"), &admin)
            .await
            .is_empty()
    );

    // History has all four versions, newest first; vread works for each.
    let (status, history) = server.get(&format!("/Task/{id}/_history"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["type"], "history");
    assert_eq!(history["total"], 4);
    let methods: Vec<&str> = history["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["DELETE", "PUT", "PUT", "POST"]);
    for entry in history["entry"].as_array().unwrap() {
        assert!(entry["response"]["status"].is_string());
    }
    let (status, v2) = server.get(&format!("/Task/{id}/_history/2"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v2["status"], "accepted");
    let (status, _) = server.get(&format!("/Task/{id}/_history/4"), &admin).await;
    assert_eq!(
        status,
        StatusCode::GONE,
        "the delete version has no content"
    );
    let (status, _) = server.get(&format!("/Task/{id}/_history/9"), &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    server.stop().await;
}

#[tokio::test]
async fn update_as_create_and_conditional_create() {
    let server = TestServer::start().await;
    let admin = server.admin();

    // PUT to a new id creates it (201).
    let mut t = task("requested", None);
    t["id"] = json!("lab-order-1");
    let (status, created) = server.put_json("/Task/lab-order-1", &admin, &t).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["id"], "lab-order-1");

    // Conditional create: the first creates, the second finds it.
    let mut with_identifier = task("requested", None);
    with_identifier["identifier"] =
        json!([{ "system": "http://lab.example/orders", "value": "A-1" }]);
    let create = |token: String, body: Value| {
        server
            .request(Method::POST, "/Task", &token)
            .header("content-type", "application/fhir+json")
            .header("if-none-exist", "identifier=http://lab.example/orders|A-1")
            .body(body.to_string())
            .send()
    };
    let first = create(admin.clone(), with_identifier.clone())
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let (_, first) = body(first).await;
    let second = create(admin.clone(), with_identifier.clone())
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    let (_, second) = body(second).await;
    assert_eq!(first["id"], second["id"]);
    assert_eq!(second["meta"]["versionId"], "1", "nothing new was written");

    // Two matches: 412.
    let _ = server
        .create_task(&with_identifier)
        .await
        .get("id")
        .cloned();
    let mut dup = with_identifier.clone();
    dup["identifier"][0]["value"] = json!("A-2");
    server.create_task(&dup).await;
    server.create_task(&dup).await;
    let response = server
        .request(Method::POST, "/Task", &admin)
        .header("content-type", "application/fhir+json")
        .header("if-none-exist", "identifier=http://lab.example/orders|A-2")
        .body(dup.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PRECONDITION_FAILED);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_claims_with_if_match_have_exactly_one_winner() {
    let server = TestServer::start().await;
    let queue_type = "http://terminology.hl7.org/CodeSystem/task-performer-type|performer";
    let mut queued = task("requested", None);
    queued["performerType"] = json!([{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/task-performer-type", "code": "performer" }] }]);
    let id = server.create_task(&queued).await["id"]
        .as_str()
        .unwrap()
        .to_string();

    for round in 0..5 {
        // Re-queue for each round (admin clears the owner).
        let (_, current) = server.get(&format!("/Task/{id}"), &server.admin()).await;
        let version = current["meta"]["versionId"].as_str().unwrap().to_string();
        let claim = |user: &'static str| {
            let token = server.practitioner_with_types(user, &[queue_type]);
            let patch = json!([{ "op": "add", "path": "/owner", "value": { "reference": user } }]);
            server
                .request(Method::PATCH, &format!("/Task/{id}"), &token)
                .header("content-type", "application/json-patch+json")
                .header("if-match", format!("W/\"{version}\""))
                .body(patch.to_string())
                .send()
        };
        let (a, b) = tokio::join!(claim("Practitioner/alice"), claim("Practitioner/bob"));
        let mut statuses = [a.unwrap().status(), b.unwrap().status()];
        statuses.sort();
        assert_eq!(
            statuses,
            [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
            "round {round}"
        );
        let (_, claimed) = server.get(&format!("/Task/{id}"), &server.admin()).await;
        let owner = claimed["owner"]["reference"].as_str().unwrap().to_string();
        assert!(owner == "Practitioner/alice" || owner == "Practitioner/bob");
        // The winner releases the claim back to the queue.
        let token = server.practitioner_with_types(&owner, &[queue_type]);
        let release = json!([{ "op": "remove", "path": "/owner" }]);
        let response = server
            .request(Method::PATCH, &format!("/Task/{id}"), &token)
            .header("content-type", "application/json-patch+json")
            .body(release.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "release in round {round}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn terminal_states_stay_terminal() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let created = server.create_task(&task("in-progress", None)).await;
    let id = created["id"].as_str().unwrap();
    let mut done = created.clone();
    done["status"] = json!("completed");
    let (status, _) = server.put_json(&format!("/Task/{id}"), &admin, &done).await;
    assert_eq!(status, StatusCode::OK);
    let mut back = done.clone();
    back["status"] = json!("in-progress");
    let (status, outcome) = server.put_json(&format!("/Task/{id}"), &admin, &back).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_outcome(&outcome, "business-rule");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("completed")
    );
    let (_, read) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(
        read["meta"]["versionId"], "2",
        "the refused update stored nothing"
    );
    // Correcting a mistake is still possible.
    let mut error = done.clone();
    error["status"] = json!("entered-in-error");
    let (status, _) = server
        .put_json(&format!("/Task/{id}"), &admin, &error)
        .await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn everything_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    let admin = server.admin();
    let mut ids = Vec::new();
    for i in 0..20 {
        let created = server
            .create_task(&task("requested", Some(&format!("Practitioner/{i}"))))
            .await;
        let id = created["id"].as_str().unwrap().to_string();
        let mut next = created.clone();
        next["status"] = json!("accepted");
        let (status, _) = server.put_json(&format!("/Task/{id}"), &admin, &next).await;
        assert_eq!(status, StatusCode::OK);
        ids.push(id);
    }
    server.stop().await;

    let server = TestServer::start_in(dir.path(), |_| {}).await;
    let admin = server.admin();
    for id in &ids {
        let (status, current) = server.get(&format!("/Task/{id}"), &admin).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(current["meta"]["versionId"], "2");
        assert_eq!(current["status"], "accepted");
        let (_, v1) = server.get(&format!("/Task/{id}/_history/1"), &admin).await;
        assert_eq!(v1["status"], "requested");
    }
    let (_, bundle) = server.get("/Task?_summary=count", &admin).await;
    assert_eq!(bundle["total"], 20);
    server.stop().await;
}

#[tokio::test]
async fn operator_endpoints_and_metadata() {
    let server = TestServer::start().await;
    let client = &server.client;
    let metadata = client
        .get(format!("{}/metadata", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(metadata.status(), StatusCode::OK);
    assert!(
        metadata.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json")
    );
    let statement: Value = metadata.json().await.unwrap();
    assert_eq!(statement["resourceType"], "CapabilityStatement");
    assert_eq!(statement["fhirVersion"], "4.0.1");
    let task = &statement["rest"][0]["resource"][0];
    assert_eq!(task["type"], "Task");
    let params: Vec<&str> = task["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for expected in [
        "_id",
        "_lastUpdated",
        "status",
        "business-status",
        "owner",
        "performer",
        "patient",
        "subject",
        "focus",
        "part-of",
        "based-on",
        "requester",
        "code",
        "priority",
        "intent",
        "identifier",
        "authored-on",
        "modified",
        "period",
    ] {
        assert!(params.contains(&expected), "metadata lacks {expected}");
    }
    for path in ["/healthz", "/readyz"] {
        let r = client
            .get(format!("{}{path}", server.root))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    // One request so the counters exist, then scrape.
    server.get("/Task", &server.admin()).await;
    let metrics = client
        .get(format!("{}/metrics", server.root))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("baton_http_requests_total"), "{metrics}");
    assert!(metrics.contains("baton_http_request_duration_seconds"));
    // Unknown endpoints and methods are FHIR errors.
    let (status, outcome) = server.get("/Patient/1", &server.admin()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_outcome(&outcome, "not-found");
    // (DELETE /Task is the conditional delete; PATCH has no type-level meaning.)
    let r = server
        .request(Method::PATCH, "/Task", &server.admin())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    server.stop().await;
}
