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
    assert_eq!(server.get(&format!("/Task/{id}"), &admin).await.1, updated);

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

/// Sends a PATCH with the given content type and body; answers the status and JSON body.
async fn patch(
    server: &TestServer,
    id: &str,
    token: &str,
    content_type: &str,
    if_match: Option<&str>,
    body_value: &Value,
) -> (StatusCode, Value) {
    let mut request = server
        .request(Method::PATCH, &format!("/Task/{id}"), token)
        .header("content-type", content_type)
        .body(body_value.to_string());
    if let Some(version) = if_match {
        request = request.header("if-match", format!("W/\"{version}\""));
    }
    body(request.send().await.unwrap()).await
}

fn fhirpath_op(parts: Value) -> Value {
    json!({ "name": "operation", "part": parts })
}

fn parameters(operations: Vec<Value>) -> Value {
    json!({ "resourceType": "Parameters", "parameter": operations })
}

#[tokio::test]
async fn patches_in_every_form_clients_send() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let alice = server.practitioner("Practitioner/alice");
    let mut new = task("requested", Some("Practitioner/alice"));
    new["note"] = json!([{ "text": "first" }]);
    let created = server.create_task(&new).await;
    let id = created["id"].as_str().unwrap().to_string();

    // JSON Merge Patch: a member changes, a null removes one.
    let (status, patched) = patch(
        &server,
        &id,
        &alice,
        "application/merge-patch+json",
        Some("1"),
        &json!({ "status": "accepted", "note": null, "description": "draw blood" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["status"], "accepted");
    assert_eq!(patched["description"], "draw blood");
    assert!(patched.get("note").is_none(), "{patched}");
    assert_eq!(patched["meta"]["versionId"], "2");

    // fhirpy's patch(): the elements to change as application/json, resourceType included.
    let (status, patched) = patch(
        &server,
        &id,
        &alice,
        "application/json",
        None,
        &json!({ "resourceType": "Task", "status": "in-progress" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["status"], "in-progress");
    assert_eq!(patched["description"], "draw blood");

    // FHIRPath Patch: add a note, replace inside it, insert before it, move, delete.
    let operations = vec![
        fhirpath_op(json!([
            { "name": "type", "valueCode": "add" },
            { "name": "path", "valueString": "Task" },
            { "name": "name", "valueString": "note" },
            { "name": "value", "valueAnnotation": { "text": "second" } },
        ])),
        fhirpath_op(json!([
            { "name": "type", "valueCode": "insert" },
            { "name": "path", "valueString": "Task.note" },
            { "name": "index", "valueInteger": 0 },
            { "name": "value", "valueAnnotation": { "text": "first" } },
        ])),
        fhirpath_op(json!([
            { "name": "type", "valueCode": "replace" },
            { "name": "path", "valueString": "Task.note[1].text" },
            { "name": "value", "valueString": "second, changed" },
        ])),
        fhirpath_op(json!([
            { "name": "type", "valueCode": "move" },
            { "name": "path", "valueString": "Task.note" },
            { "name": "source", "valueInteger": 1 },
            { "name": "destination", "valueInteger": 0 },
        ])),
        fhirpath_op(json!([
            { "name": "type", "valueCode": "delete" },
            { "name": "path", "valueString": "Task.description" },
        ])),
    ];
    let (status, patched) = patch(
        &server,
        &id,
        &alice,
        "application/fhir+json",
        Some("3"),
        &parameters(operations),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(
        patched["note"],
        json!([{ "text": "second, changed" }, { "text": "first" }])
    );
    assert!(patched.get("description").is_none(), "{patched}");
    assert_eq!(patched["meta"]["versionId"], "4");

    // Each form honours If-Match, the state machine and the roles; a refusal stores nothing.
    let replace_status = |status: &str| {
        parameters(vec![fhirpath_op(json!([
            { "name": "type", "valueCode": "replace" },
            { "name": "path", "valueString": "Task.status" },
            { "name": "value", "valueCode": status },
        ]))])
    };
    // (content type, If-Match, body, status, a fragment of the diagnostics)
    let refusals: Vec<(&str, Option<&str>, Value, StatusCode, &str)> = vec![
        (
            "application/merge-patch+json",
            Some("3"),
            json!({ "status": "completed" }),
            StatusCode::PRECONDITION_FAILED,
            "If-Match names version 3",
        ),
        (
            "application/fhir+json",
            Some("2"),
            replace_status("completed"),
            StatusCode::PRECONDITION_FAILED,
            "If-Match names version 2",
        ),
        (
            "application/json",
            None,
            json!({ "owner": { "reference": "Practitioner/bob" } }),
            StatusCode::FORBIDDEN,
            "",
        ),
        (
            "application/json",
            None,
            json!({ "status": "finished" }),
            StatusCode::BAD_REQUEST,
            "Task.status",
        ),
        (
            "application/merge-patch+json",
            None,
            json!(["not", "an", "object"]),
            StatusCode::BAD_REQUEST,
            "a merge patch must be a JSON object",
        ),
        (
            "application/fhir+json",
            None,
            parameters(vec![fhirpath_op(json!([
                { "name": "type", "valueCode": "replace" },
                { "name": "path", "valueString": "Task.note.where(text='first').text" },
                { "name": "value", "valueString": "x" },
            ]))]),
            StatusCode::BAD_REQUEST,
            "Task.note.where(text='first').text",
        ),
        (
            "application/fhir+json",
            None,
            parameters(vec![fhirpath_op(json!([
                { "name": "type", "valueCode": "replace" },
                { "name": "path", "valueString": "Task.note" },
                { "name": "value", "valueAnnotation": { "text": "x" } },
            ]))]),
            StatusCode::UNPROCESSABLE_ENTITY,
            "FHIRPath Patch operation 0 (replace at 'Task.note')",
        ),
        (
            "application/fhir+json",
            None,
            task("requested", Some("Practitioner/alice")),
            StatusCode::BAD_REQUEST,
            "must be a FHIRPath Patch",
        ),
        (
            "text/plain",
            None,
            json!({ "status": "completed" }),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/merge-patch+json",
        ),
    ];
    for (content_type, if_match, patch_body, expected, fragment) in refusals {
        let (status, outcome) =
            patch(&server, &id, &alice, content_type, if_match, &patch_body).await;
        assert_eq!(status, expected, "{content_type} {patch_body}: {outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
        assert!(
            outcome.to_string().contains(fragment),
            "{fragment}: {outcome}"
        );
    }
    // Completed is terminal: no patch form brings it back.
    let (status, _) = patch(
        &server,
        &id,
        &alice,
        "application/fhir+json",
        None,
        &replace_status("completed"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for (content_type, patch_body) in [
        (
            "application/merge-patch+json",
            json!({ "status": "in-progress" }),
        ),
        ("application/json", json!({ "status": "in-progress" })),
        ("application/fhir+json", replace_status("in-progress")),
    ] {
        let (status, outcome) = patch(&server, &id, &alice, content_type, None, &patch_body).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{content_type}: {outcome}"
        );
    }
    let (_, read) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(
        read["meta"]["versionId"], "5",
        "only the accepted patches wrote: {read}"
    );
    assert_eq!(read["status"], "completed");
    server.stop().await;
}

#[tokio::test]
async fn patches_are_bounded_like_json_patch() {
    let server = TestServer::start_with(|c| c.limits.max_patch_operations = 3).await;
    let admin = server.admin();
    let created = server.create_task(&task("requested", None)).await;
    let id = created["id"].as_str().unwrap().to_string();
    let wide = json!({ "description": "a", "priority": "urgent", "note": [{ "text": "n" }],
                       "authoredOn": "2024-01-01" });
    let (status, outcome) = patch(
        &server,
        &id,
        &admin,
        "application/merge-patch+json",
        None,
        &wide,
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{outcome}");
    assert!(
        outcome.to_string().contains("limits.max_patch_operations"),
        "{outcome}"
    );
    let delete = fhirpath_op(json!([
        { "name": "type", "valueCode": "delete" },
        { "name": "path", "valueString": "Task.note" },
    ]));
    let (status, outcome) = patch(
        &server,
        &id,
        &admin,
        "application/fhir+json",
        None,
        &parameters(vec![delete; 4]),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{outcome}");
    // A body past max_body_bytes is a 413 before it is read as a patch of any form.
    let huge = json!({ "description": "x".repeat(2 * 1024 * 1024) });
    let (status, _) = patch(
        &server,
        &id,
        &admin,
        "application/merge-patch+json",
        None,
        &huge,
    )
    .await;
    assert!(status == StatusCode::PAYLOAD_TOO_LARGE, "{status}");
    let (_, read) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(read["meta"]["versionId"], "1", "{read}");
    server.stop().await;
}

/// Waits (bounded) until the clock has passed `instant` at the store's millisecond precision,
/// so that the next write gets a later `lastUpdated` than it.
async fn after_instant(instant: &str) {
    common::eventually("the clock passes the last write", || async {
        let now = time::OffsetDateTime::now_utc();
        let then =
            time::OffsetDateTime::parse(instant, &time::format_description::well_known::Rfc3339)
                .unwrap();
        (now - then > time::Duration::milliseconds(1)).then_some(())
    })
    .await;
}

/// Every entry of a type-level history, following `next` links to the end.
async fn all_history(server: &TestServer, first: &str, token: &str) -> Vec<Value> {
    let mut entries = Vec::new();
    let mut url = first.to_string();
    for _ in 0..50 {
        let (status, bundle) = server.get(&url, token).await;
        assert_eq!(status, StatusCode::OK, "{url}: {bundle}");
        assert_eq!(bundle["type"], "history");
        entries.extend(bundle["entry"].as_array().cloned().unwrap_or_default());
        let next = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
        match next {
            Some(next) => url = next.strip_prefix(&server.base).unwrap().to_string(),
            None => return entries,
        }
    }
    panic!("the history did not end in 50 pages");
}

/// (id, version) of each entry, in order.
fn versions_of(entries: &[Value]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|e| {
            let url = e["fullUrl"].as_str().unwrap();
            let id = url.rsplit('/').next().unwrap().to_string();
            let etag = e["response"]["etag"].as_str().unwrap();
            (
                id,
                etag.trim_start_matches("W/").trim_matches('"').to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn type_level_history_pages_every_version_newest_first_under_the_read_rule() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let alice = server.practitioner("Practitioner/alice");
    let bob = server.practitioner("Practitioner/bob");
    // A: alice's, updated by her, then handed to bob by an admin. B: bob's, then deleted.
    let a = server
        .create_task(&task("requested", Some("Practitioner/alice")))
        .await;
    let a_id = a["id"].as_str().unwrap().to_string();
    let mut stamps = vec![a["meta"]["lastUpdated"].as_str().unwrap().to_string()];
    after_instant(&stamps[0]).await;
    let b = server
        .create_task(&task("requested", Some("Practitioner/bob")))
        .await;
    let b_id = b["id"].as_str().unwrap().to_string();
    stamps.push(b["meta"]["lastUpdated"].as_str().unwrap().to_string());
    for (token, owner, status) in [
        (&alice, "Practitioner/alice", "accepted"),
        (&admin, "Practitioner/bob", "in-progress"),
    ] {
        after_instant(stamps.last().unwrap()).await;
        let mut next = task(status, Some(owner));
        next["id"] = json!(a_id);
        let (code, written) = server
            .put_json(&format!("/Task/{a_id}"), token, &next)
            .await;
        assert_eq!(code, StatusCode::OK, "{written}");
        stamps.push(written["meta"]["lastUpdated"].as_str().unwrap().to_string());
    }
    after_instant(stamps.last().unwrap()).await;
    let response = server
        .request(Method::DELETE, &format!("/Task/{b_id}"), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let v = |id: &str, version: &str| (id.to_string(), version.to_string());
    let everything = vec![
        v(&b_id, "2"),
        v(&a_id, "3"),
        v(&a_id, "2"),
        v(&b_id, "1"),
        v(&a_id, "1"),
    ];
    // One page, then pages of two: the same versions, newest first, none twice.
    let all = all_history(&server, "/Task/_history", &admin).await;
    assert_eq!(versions_of(&all), everything);
    assert_eq!(
        versions_of(&all_history(&server, "/Task/_history?_count=2", &admin).await),
        everything
    );
    let (_, first_page) = server.get("/Task/_history?_count=2", &admin).await;
    assert_eq!(first_page["entry"].as_array().unwrap().len(), 2);
    assert!(first_page.get("total").is_none(), "{first_page}");

    // The deletion: request DELETE, no resource; the others carry request and response.
    assert_eq!(
        all[0]["request"],
        json!({ "method": "DELETE", "url": format!("Task/{b_id}") })
    );
    assert!(all[0].get("resource").is_none(), "{}", all[0]);
    assert_eq!(all[0]["response"]["status"], "204 No Content");
    assert_eq!(
        all[4]["request"],
        json!({ "method": "POST", "url": "Task" })
    );
    assert_eq!(all[4]["response"]["status"], "201 Created");
    assert_eq!(all[4]["response"]["lastModified"], stamps[0]);
    assert_eq!(all[1]["request"]["method"], "PUT");
    assert_eq!(all[1]["resource"]["meta"]["versionId"], "3");

    // _since: from A's second version on. _at: what was current at A's first write.
    let since = format!("/Task/_history?_since={}", stamps[2].replace('+', "%2B"));
    assert_eq!(
        versions_of(&all_history(&server, &since, &admin).await),
        everything[..3].to_vec()
    );
    let at = format!("/Task/_history?_at={}", stamps[0]);
    assert_eq!(
        versions_of(&all_history(&server, &at, &admin).await),
        vec![v(&a_id, "1")]
    );
    let at = format!("/Task/_history?_at={}", stamps[1]);
    assert_eq!(
        versions_of(&all_history(&server, &at, &admin).await),
        vec![v(&b_id, "1"), v(&a_id, "1")]
    );

    // Each version is judged on its own content: alice sees A while it was hers, bob sees
    // it since it is his, and his B with its deletion.
    assert_eq!(
        versions_of(&all_history(&server, "/Task/_history?_count=1", &alice).await),
        vec![v(&a_id, "2"), v(&a_id, "1")]
    );
    assert_eq!(
        versions_of(&all_history(&server, "/Task/_history", &bob).await),
        vec![v(&b_id, "2"), v(&a_id, "3"), v(&b_id, "1")]
    );
    assert_eq!(
        versions_of(&all_history(&server, "/Task/_history", &server.auditor()).await),
        everything
    );

    // Bad values are 400s; an unknown parameter is ignored unless handling is strict.
    for query in [
        "_since=yesterday",
        "_since=2026-01-01",
        "_at=soon",
        "_count=0",
        "_cursor=abc",
        "_count=1&_count=2",
    ] {
        let (status, outcome) = server.get(&format!("/Task/_history?{query}"), &admin).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome");
    }
    let (status, bundle) = server
        .get("/Task/_history?colour=red&_count=1", &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert!(
        !bundle["link"][0]["url"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{bundle}"
    );
    let response = server
        .request(Method::GET, "/Task/_history?colour=red", &admin)
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    server.stop().await;
}

#[tokio::test]
async fn conditional_reads_formats_and_locations() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let created = server.create_task(&task("requested", None)).await;
    let id = created["id"].as_str().unwrap().to_string();
    let path = format!("/Task/{id}");
    let read_with = |name: &'static str, value: String| {
        server
            .request(Method::GET, &path, &admin)
            .header(name, value)
            .send()
    };
    let first = server
        .request(Method::GET, &path, &admin)
        .send()
        .await
        .unwrap();
    let last_modified = first.headers()["last-modified"]
        .to_str()
        .unwrap()
        .to_string();

    // If-None-Match naming the current version, or If-Modified-Since at or after the last
    // change: 304 with the validators and no body.
    for (name, value) in [
        ("if-none-match", "W/\"1\"".to_string()),
        ("if-none-match", "\"1\"".to_string()),
        ("if-none-match", "*".to_string()),
        ("if-modified-since", last_modified.clone()),
        (
            "if-modified-since",
            "Fri, 01 Jan 2100 00:00:00 GMT".to_string(),
        ),
    ] {
        let response = read_with(name, value.clone()).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::NOT_MODIFIED,
            "{name}: {value}"
        );
        assert_eq!(response.headers()["etag"], "W/\"1\"");
        assert!(response.text().await.unwrap().is_empty());
    }
    for (name, value) in [
        ("if-none-match", "W/\"2\"".to_string()),
        (
            "if-modified-since",
            "Mon, 01 Jan 2001 00:00:00 GMT".to_string(),
        ),
        ("if-modified-since", "not a date".to_string()),
    ] {
        let response = read_with(name, value.clone()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{name}: {value}");
    }

    // Accept and _format: JSON in any of its names is fine, anything else a 406.
    for accept in [
        "application/fhir+json",
        "application/fhir+json; fhirVersion=4.0",
        "application/json",
        "*/*",
        "text/html, application/xhtml+xml, */*;q=0.8",
    ] {
        let response = read_with("accept", accept.to_string()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{accept}");
    }
    for accept in [
        "application/fhir+xml",
        "text/xml",
        "application/xml, text/plain",
        "application/fhir+json;q=0",
    ] {
        let response = read_with("accept", accept.to_string()).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_ACCEPTABLE, "{accept}");
        let (_, outcome) = body(response).await;
        assert_outcome(&outcome, "not-supported");
    }
    for (format, expected) in [
        ("json", StatusCode::OK),
        ("application/fhir%2Bjson", StatusCode::OK),
        ("application/fhir+json", StatusCode::OK),
        ("xml", StatusCode::NOT_ACCEPTABLE),
        ("application/fhir%2Bxml", StatusCode::NOT_ACCEPTABLE),
    ] {
        let (status, _) = server.get(&format!("/Task?_format={format}"), &admin).await;
        assert_eq!(status, expected, "_format={format}");
    }
    // _format wins over Accept.
    let response = server
        .request(Method::GET, &format!("{path}?_format=json"), &admin)
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // Every create answers with Location …/{id}/_history/{vid}, and it can be read.
    let mut subscription =
        common::subscription(&server.base, "task-changed", &[], "unused", "id-only");
    subscription["channel"] = json!({ "type": "websocket", "payload": "application/fhir+json" });
    let response = server
        .request(Method::POST, "/Subscription", &admin)
        .header("content-type", "application/fhir+json")
        .body(subscription.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let (_, created) = body(response).await;
    let sub_id = created["id"].as_str().unwrap();
    assert_eq!(
        location,
        format!("{}/Subscription/{sub_id}/_history/1", server.base)
    );
    let (status, read) = server
        .get(location.strip_prefix(&server.base).unwrap(), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["id"], sub_id);
    let (status, _) = server
        .get(&format!("/Subscription/{sub_id}/_history/7"), &admin)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn a_filtered_history_page_stops_after_its_scan_budget_and_goes_on() {
    let server = TestServer::start().await;
    let alice = server.practitioner("Practitioner/alice");
    // Alice's one Task is the oldest version; above it, more than one page's scan budget
    // (1 000 versions) of Tasks she may not read.
    let hers = server
        .create_task(&task("requested", Some("Practitioner/alice")))
        .await;
    after_instant(hers["meta"]["lastUpdated"].as_str().unwrap()).await;
    let bobs = task("requested", Some("Practitioner/bob"));
    for _ in 0..21 {
        futures::future::join_all((0..50).map(|_| server.create_task(&bobs))).await;
    }
    let (status, first) = server.get("/Task/_history?_count=5", &alice).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert!(
        first.get("entry").is_none(),
        "nothing of hers in the newest 1 000: {first}"
    );
    let pages = all_history(&server, "/Task/_history?_count=5", &alice).await;
    assert_eq!(
        versions_of(&pages),
        vec![(hers["id"].as_str().unwrap().to_string(), "1".to_string())]
    );
    server.stop().await;
}

#[tokio::test]
async fn vreads_answer_304_and_histories_take_summary_and_elements() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let mut first = task("requested", Some("Practitioner/1"));
    first["description"] = json!("take the sample");
    first["note"] = json!([{ "text": "left arm" }]);
    let created = server.create_task(&first).await;
    let id = created["id"].as_str().unwrap().to_string();
    let mut second = created.clone();
    second["status"] = json!("accepted");
    let (status, _) = server
        .put_json(&format!("/Task/{id}"), &admin, &second)
        .await;
    assert_eq!(status, StatusCode::OK);

    // vread: the version's ETag in If-None-Match (or `*`, or a date no earlier than it) is a
    // 304 with the validators and no body; another version's ETag is the version.
    let vread_with = |version: u32, token: &str, name: &'static str, value: &str| {
        server
            .request(
                Method::GET,
                &format!("/Task/{id}/_history/{version}"),
                token,
            )
            .header(name, value)
            .send()
    };
    for (version, name, value) in [
        (1, "if-none-match", "W/\"1\""),
        (1, "if-none-match", "W/\"9\", \"1\""),
        (2, "if-none-match", "*"),
        (1, "if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT"),
    ] {
        let response = vread_with(version, &admin, name, value).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::NOT_MODIFIED,
            "v{version} {name}: {value}"
        );
        assert_eq!(response.headers()["etag"], format!("W/\"{version}\""));
        assert!(response.text().await.unwrap().is_empty());
    }
    for (version, name, value) in [
        (1, "if-none-match", "W/\"2\""),
        (2, "if-none-match", "W/\"1\""),
        (1, "if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT"),
    ] {
        let response = vread_with(version, &admin, name, value).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "v{version} {name}: {value}"
        );
        let (_, resource) = body(response).await;
        assert_eq!(resource["meta"]["versionId"], version.to_string());
    }
    // The read rule comes first: a matching ETag tells nothing to someone who may not read.
    let stranger = server.practitioner("Practitioner/2");
    let response = vread_with(1, &stranger, "if-none-match", "W/\"1\"")
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // Instance history: _summary and _elements cut each version, tagged SUBSETTED, and the
    // links keep them; _summary=count is the total alone.
    let subsetted = |resource: &Value| {
        resource["meta"]["tag"]
            .as_array()
            .is_some_and(|tags| tags.iter().any(|t| t["code"] == "SUBSETTED"))
    };
    let history = format!("/Task/{id}/_history");
    for (query, note, description) in [
        ("_summary=true", false, true),
        ("_summary=data", true, true),
        ("_summary=text", false, false),
        ("_elements=note", true, false),
    ] {
        let (status, bundle) = server.get(&format!("{history}?{query}"), &admin).await;
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        assert_eq!(bundle["total"], 2, "{query}");
        let entries = bundle["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 2, "{query}");
        for entry in entries {
            let resource = &entry["resource"];
            assert!(subsetted(resource), "{query}: {resource}");
            assert_eq!(resource.get("note").is_some(), note, "{query}: {resource}");
            assert_eq!(
                resource.get("description").is_some(),
                description,
                "{query}: {resource}"
            );
            assert!(resource["status"].is_string(), "{query}");
        }
        let self_link = bundle["link"][0]["url"].as_str().unwrap();
        assert!(
            self_link.contains(&query.replace(',', "%2C")),
            "{query}: {self_link}"
        );
    }
    let (_, whole) = server.get(&history, &admin).await;
    assert!(!subsetted(&whole["entry"][0]["resource"]));
    assert!(whole["entry"][0]["resource"]["note"].is_array());
    let (status, count) = server
        .get(&format!("{history}?_summary=count"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{count}");
    assert_eq!(count["total"], 2);
    assert!(count.get("entry").is_none(), "{count}");
    let (_, paged) = server
        .get(&format!("{history}?_summary=true&_count=1"), &admin)
        .await;
    let next = paged["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .expect("a next link");
    assert!(next["url"].as_str().unwrap().contains("_summary=true"));
    for query in [
        "_summary=maybe",
        "_summary=true&_elements=note",
        "_summary=count&_summary=true",
    ] {
        let (status, outcome) = server.get(&format!("{history}?{query}"), &admin).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
        assert_outcome(&outcome, "invalid");
    }

    // Type-level history: the same cut, carried by its links; counting it is refused.
    let (status, bundle) = server
        .get("/Task/_history?_summary=true&_count=1", &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let resource = &bundle["entry"][0]["resource"];
    assert!(subsetted(resource), "{resource}");
    assert!(resource.get("note").is_none(), "{resource}");
    for link in bundle["link"].as_array().unwrap() {
        assert!(
            link["url"].as_str().unwrap().contains("_summary=true"),
            "{link}"
        );
    }
    let (_, data) = server.get("/Task/_history?_summary=data", &admin).await;
    assert!(data["entry"][0]["resource"]["note"].is_array(), "{data}");
    let (status, outcome) = server.get("/Task/_history?_summary=count", &admin).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
    assert_outcome(&outcome, "not-supported");
    server.stop().await;
}
