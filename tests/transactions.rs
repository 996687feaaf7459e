//! Batch and transaction Bundles (`POST /fhir`) and conditional update and delete, over real
//! HTTP on the configured backend: ids and `urn:uuid` references, atomicity (nothing stored
//! and nobody notified when one entry fails), notifications in entry order, per-entry batch
//! answers, and the 4xx answers to bad Bundles.

mod common;

use common::receiver::Receiver;
use common::{TestServer, assert_outcome, eventually, subscription, task};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A Bundle of `kind` with these entries.
fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({ "resourceType": "Bundle", "type": kind, "entry": entries })
}

/// A POST entry creating `resource`, known in the Bundle as `full_url`.
fn post(full_url: &str, resource: Value) -> Value {
    json!({ "fullUrl": full_url, "resource": resource, "request": { "method": "POST", "url": "Task" } })
}

fn with_identifier(mut task: Value, value: &str) -> Value {
    task["identifier"] = json!([{ "system": "http://example.org/orders", "value": value }]);
    task
}

fn sub_task(parent: &str, value: &str) -> Value {
    let mut t = with_identifier(task("requested", Some("Practitioner/1")), value);
    t["partOf"] = json!([{ "reference": parent }]);
    t
}

/// Ids (from `Task/{id}/_history/{v}`) of the entries of an answering Bundle.
fn locations(answer: &Value) -> Vec<String> {
    answer["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let location = e["response"]["location"].as_str().unwrap_or("");
            location.split('/').nth(1).unwrap_or("").to_string()
        })
        .collect()
}

/// A catch-all subscription on `task-changed` (admin), whose `$events` list every change.
async fn catch_all(server: &TestServer, receiver: &Receiver) -> String {
    let body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
    let (status, created) = server
        .post_json("/Subscription", &server.admin(), &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["id"].as_str().unwrap().to_string()
}

/// The Task ids of a subscription's event log, in event-number order.
async fn event_task_ids(server: &TestServer, subscription: &str) -> Vec<String> {
    let (status, events) = server
        .get(
            &format!("/Subscription/{subscription}/$events?content=id-only"),
            &server.admin(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{events}");
    events["entry"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .filter_map(|e| e["fullUrl"].as_str())
        .map(|url| {
            let after = url.split("/Task/").nth(1).unwrap_or("");
            after.split('/').next().unwrap_or("").to_string()
        })
        .collect()
}

/// Ids of the Tasks an identifier search finds.
async fn found(server: &TestServer, value: &str) -> Vec<String> {
    server
        .search_ids(
            &format!("identifier=http://example.org/orders|{value}"),
            &server.admin(),
        )
        .await
}

#[tokio::test]
async fn a_transaction_creates_a_parent_and_sub_tasks_linked_by_urn_uuid() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let watch = catch_all(&server, &receiver).await;
    let admin = server.admin();
    let parent = "urn:uuid:6f1c1f1e-0000-4000-8000-000000000001";
    let request = bundle(
        "transaction",
        vec![
            post(
                parent,
                with_identifier(task("requested", Some("Practitioner/1")), "coord"),
            ),
            post(
                "urn:uuid:6f1c1f1e-0000-4000-8000-000000000002",
                sub_task(parent, "sub-1"),
            ),
            post(
                "urn:uuid:6f1c1f1e-0000-4000-8000-000000000003",
                sub_task(parent, "sub-2"),
            ),
        ],
    );
    let (status, answer) = server.post_json("", &admin, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["resourceType"], "Bundle");
    assert_eq!(answer["type"], "transaction-response");
    let ids = locations(&answer);
    assert_eq!(ids.len(), 3);
    for (i, entry) in answer["entry"].as_array().unwrap().iter().enumerate() {
        assert_eq!(entry["response"]["status"], "201 Created", "{entry}");
        assert_eq!(entry["response"]["etag"], "W/\"1\"");
        assert_eq!(
            entry["response"]["location"],
            format!("Task/{}/_history/1", ids[i])
        );
        assert!(entry["response"]["lastModified"].is_string());
        assert_eq!(entry["resource"]["id"], ids[i]);
    }
    // Each entry shows its Task as stored (the text the write stored, sent as it is): what a
    // read of it returns, stamped with the version and instant of its response.
    for (i, entry) in answer["entry"].as_array().unwrap().iter().enumerate() {
        let (_, stored) = server.get(&format!("/Task/{}", ids[i]), &admin).await;
        assert_eq!(entry["resource"], stored, "entry {i}");
        assert_eq!(entry["resource"]["meta"]["versionId"], "1");
        assert_eq!(
            entry["resource"]["meta"]["lastUpdated"],
            entry["response"]["lastModified"]
        );
    }
    // The sub-tasks' partOf now names the parent's new id, and the tree is searchable.
    for sub in &ids[1..] {
        let (_, stored) = server.get(&format!("/Task/{sub}"), &admin).await;
        assert_eq!(stored["partOf"][0]["reference"], format!("Task/{}", ids[0]));
    }
    let mut children = server
        .search_ids(&format!("part-of=Task/{}", ids[0]), &admin)
        .await;
    children.sort();
    let mut expected = ids[1..].to_vec();
    expected.sort();
    assert_eq!(children, expected);

    // The subscription hears the three creates in entry order.
    let heard = eventually("three events", || async {
        let heard = event_task_ids(&server, &watch).await;
        (heard.len() >= 3).then_some(heard)
    })
    .await;
    assert_eq!(heard, ids);
}

#[tokio::test]
async fn sub_tasks_may_be_listed_before_their_parent_and_reference_each_other() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let (a, b) = (
        "urn:uuid:a0000000-0000-4000-8000-00000000000a",
        "urn:uuid:b0000000-0000-4000-8000-00000000000b",
    );
    // Each Task is partOf the other: ids are assigned before references are resolved, so a
    // cycle between new Tasks is accepted as sent.
    let request = bundle(
        "transaction",
        vec![
            post(a, sub_task(b, "cycle-a")),
            post(b, sub_task(a, "cycle-b")),
        ],
    );
    let (status, answer) = server.post_json("", &admin, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let ids = locations(&answer);
    assert_eq!(
        answer["entry"][0]["resource"]["partOf"][0]["reference"],
        format!("Task/{}", ids[1])
    );
    assert_eq!(
        answer["entry"][1]["resource"]["partOf"][0]["reference"],
        format!("Task/{}", ids[0])
    );
}

#[tokio::test]
async fn a_transaction_with_one_bad_entry_stores_nothing_and_notifies_nobody() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let watch = catch_all(&server, &receiver).await;
    let admin = server.admin();
    let existing = server
        .create_task(&with_identifier(
            task("requested", Some("Practitioner/1")),
            "kept",
        ))
        .await;
    let existing_id = existing["id"].as_str().unwrap().to_string();
    let parent = "urn:uuid:10000000-0000-4000-8000-000000000001";
    let good = |n: &str| {
        post(
            &format!("urn:uuid:20000000-0000-4000-8000-00000000000{n}"),
            sub_task(parent, &format!("rolled-back-{n}")),
        )
    };
    let first = post(
        parent,
        with_identifier(
            task("requested", Some("Practitioner/1")),
            "rolled-back-parent",
        ),
    );

    let mut changed = existing.clone();
    changed["status"] = json!("accepted");
    let mut reopened = existing.clone();
    reopened["status"] = json!("bogus");
    let cases: Vec<(&str, Value, StatusCode, String)> = vec![
        (
            "an invalid status",
            json!({ "resource": reopened, "request": { "method": "PUT", "url": format!("Task/{existing_id}") } }),
            StatusCode::BAD_REQUEST,
            admin.clone(),
        ),
        (
            "a stale ifMatch",
            json!({ "resource": changed.clone(), "request": { "method": "PUT", "url": format!("Task/{existing_id}"), "ifMatch": "W/\"7\"" } }),
            StatusCode::PRECONDITION_FAILED,
            admin.clone(),
        ),
        (
            "an unresolvable urn:uuid",
            post(
                "urn:uuid:30000000-0000-4000-8000-000000000003",
                sub_task("urn:uuid:99999999-0000-4000-8000-000000000009", "orphan"),
            ),
            StatusCode::BAD_REQUEST,
            admin.clone(),
        ),
        (
            "an update the role forbids",
            json!({ "resource": changed.clone(), "request": { "method": "PUT", "url": format!("Task/{existing_id}") } }),
            StatusCode::FORBIDDEN,
            server.practitioner("Practitioner/2"),
        ),
    ];
    for (what, bad, expected, token) in cases {
        // A practitioner may only create Tasks it owns: its own good entries say so.
        let (first, second, third) = if token == admin {
            (first.clone(), good("1"), good("2"))
        } else {
            let mine = |t: Value| {
                let mut t = t;
                t["resource"]["owner"] = json!({ "reference": "Practitioner/2" });
                t
            };
            (mine(first.clone()), mine(good("1")), mine(good("2")))
        };
        let request = bundle("transaction", vec![first, second, bad, third]);
        let (status, answer) = server.post_json("", &token, &request).await;
        assert_eq!(status, expected, "{what}: {answer}");
        assert_eq!(answer["resourceType"], "OperationOutcome", "{what}");
        assert_eq!(
            answer["issue"][0]["expression"][0], "Bundle.entry[2]",
            "{what}: {answer}"
        );
        assert!(
            found(&server, "rolled-back-parent").await.is_empty(),
            "{what}"
        );
        assert!(found(&server, "rolled-back-1").await.is_empty(), "{what}");
    }
    let (_, unchanged) = server.get(&format!("/Task/{existing_id}"), &admin).await;
    assert_eq!(unchanged["meta"]["versionId"], "1");
    // A marker written after the failed transactions: once it is heard, everything before it
    // was, and the log holds only the two single creates.
    let marker = server
        .create_task(&with_identifier(task("requested", None), "marker"))
        .await;
    let marker_id = marker["id"].as_str().unwrap().to_string();
    let heard = eventually("the marker", || async {
        let heard = event_task_ids(&server, &watch).await;
        heard.contains(&marker_id).then_some(heard)
    })
    .await;
    assert_eq!(heard, [existing_id, marker_id]);
}

#[tokio::test]
async fn a_batch_answers_each_entry_and_keeps_the_good_ones() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let stored = server
        .create_task(&with_identifier(
            task("requested", Some("Practitioner/1")),
            "batch-kept",
        ))
        .await;
    let id = stored["id"].as_str().unwrap();
    let mut bad = task("requested", None);
    bad["status"] = json!("nonsense");
    let request = bundle(
        "batch",
        vec![
            post(
                "urn:uuid:40000000-0000-4000-8000-000000000001",
                with_identifier(task("requested", None), "batch-new"),
            ),
            post("urn:uuid:40000000-0000-4000-8000-000000000002", bad),
            json!({ "request": { "method": "GET", "url": format!("Task/{id}") } }),
            json!({ "request": { "method": "GET", "url": "Task/does-not-exist" } }),
            json!({ "request": { "method": "GET", "url": "Task?identifier=http://example.org/orders|batch-kept" } }),
            json!({ "request": { "method": "DELETE", "url": format!("Task/{id}") } }),
            json!({ "request": { "method": "GET", "url": "Patient/1" } }),
        ],
    );
    let (status, answer) = server.post_json("", &admin, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["type"], "batch-response");
    let entries = answer["entry"].as_array().unwrap();
    let statuses: Vec<&str> = entries
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "201 Created",
            "400 Bad Request",
            "200 OK",
            "404 Not Found",
            "200 OK",
            "204 No Content",
            "400 Bad Request"
        ]
    );
    assert_eq!(
        entries[1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(entries[2]["resource"]["id"], id);
    assert_eq!(entries[4]["resource"]["type"], "searchset");
    assert_eq!(entries[4]["resource"]["total"], 1);
    assert_eq!(found(&server, "batch-new").await.len(), 1);
    assert!(
        found(&server, "batch-kept").await.is_empty(),
        "deleted by the batch"
    );
}

#[tokio::test]
async fn prefer_return_shapes_the_entries() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let request = bundle(
        "transaction",
        vec![post(
            "urn:uuid:50000000-0000-4000-8000-000000000001",
            task("requested", None),
        )],
    );
    for (prefer, has_resource, has_outcome) in [
        ("return=minimal", false, false),
        ("return=OperationOutcome", false, true),
        ("return=representation", true, false),
    ] {
        let response = server
            .request(Method::POST, "", &admin)
            .header("content-type", "application/fhir+json")
            .header("prefer", prefer)
            .body(request.to_string())
            .send()
            .await
            .unwrap();
        let (status, answer) = common::body(response).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let entry = &answer["entry"][0];
        assert_eq!(entry["response"]["status"], "201 Created");
        assert_eq!(
            entry.get("resource").is_some(),
            has_resource,
            "{prefer}: {entry}"
        );
        assert_eq!(
            entry["response"].get("outcome").is_some(),
            has_outcome,
            "{prefer}: {entry}"
        );
    }
}

#[tokio::test]
async fn bad_bundles_are_refused_with_an_outcome_and_store_nothing() {
    let server = TestServer::start_with(|c| c.limits.max_transaction_entries = 3).await;
    let admin = server.admin();
    let marked = |value: &str| {
        post(
            "urn:uuid:60000000-0000-4000-8000-000000000001",
            with_identifier(task("requested", None), value),
        )
    };
    server
        .create_task(&with_identifier(task("requested", None), "twin"))
        .await;
    server
        .create_task(&with_identifier(task("requested", None), "twin"))
        .await;
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "not a Bundle",
            task("requested", None),
            StatusCode::BAD_REQUEST,
            "Bundle.resourceType",
        ),
        (
            "a searchset",
            bundle("searchset", vec![marked("bad-1")]),
            StatusCode::BAD_REQUEST,
            "Bundle.type",
        ),
        (
            "no type",
            json!({ "resourceType": "Bundle", "entry": [marked("bad-2")] }),
            StatusCode::BAD_REQUEST,
            "Bundle.type",
        ),
        (
            "entries not an array",
            json!({ "resourceType": "Bundle", "type": "transaction", "entry": {} }),
            StatusCode::BAD_REQUEST,
            "Bundle.entry",
        ),
        (
            "a Patient entry",
            bundle(
                "transaction",
                vec![
                    marked("bad-3"),
                    json!({ "resource": { "resourceType": "Patient" }, "request": { "method": "POST", "url": "Patient" } }),
                ],
            ),
            StatusCode::BAD_REQUEST,
            "Bundle.entry[1]",
        ),
        (
            "no request",
            bundle(
                "transaction",
                vec![
                    marked("bad-4"),
                    json!({ "resource": task("requested", None) }),
                ],
            ),
            StatusCode::BAD_REQUEST,
            "Bundle.entry[1]",
        ),
        (
            "a GET in a transaction",
            bundle(
                "transaction",
                vec![
                    marked("bad-5"),
                    json!({ "request": { "method": "GET", "url": "Task" } }),
                ],
            ),
            StatusCode::BAD_REQUEST,
            "Bundle.entry[1]",
        ),
        (
            "a conditional update matching several",
            bundle(
                "transaction",
                vec![
                    marked("bad-6"),
                    json!({ "resource": task("requested", None), "request": { "method": "PUT", "url": "Task?identifier=http://example.org/orders|twin" } }),
                ],
            ),
            StatusCode::PRECONDITION_FAILED,
            "Bundle.entry[1]",
        ),
        (
            "an ifNoneExist matching several",
            bundle(
                "transaction",
                vec![
                    marked("bad-7"),
                    json!({ "resource": task("requested", None), "request": { "method": "POST", "url": "Task", "ifNoneExist": "identifier=http://example.org/orders|twin" } }),
                ],
            ),
            StatusCode::PRECONDITION_FAILED,
            "Bundle.entry[1]",
        ),
        (
            "four entries in a transaction over a limit of three",
            bundle(
                "transaction",
                vec![
                    json!({ "request": { "method": "DELETE", "url": "Task?identifier=http://example.org/orders|bad-9" } }),
                    marked("bad-8"),
                    json!({ "request": { "method": "DELETE", "url": "Task/same" } }),
                    json!({ "request": { "method": "DELETE", "url": "Task/same" } }),
                ],
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "Bundle.entry",
        ),
        (
            "over the entry limit",
            bundle(
                "batch",
                vec![
                    marked("bad-10"),
                    marked("bad-11"),
                    marked("bad-12"),
                    marked("bad-13"),
                ],
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "Bundle.entry",
        ),
    ];
    for (what, request, expected, at) in cases {
        let (status, answer) = server.post_json("", &admin, &request).await;
        assert_eq!(status, expected, "{what}: {answer}");
        assert_eq!(answer["resourceType"], "OperationOutcome", "{what}");
        assert_eq!(answer["issue"][0]["expression"][0], at, "{what}: {answer}");
    }
    // Touching one Task twice, within the limit.
    let doubled = bundle(
        "transaction",
        vec![
            marked("bad-14"),
            json!({ "request": { "method": "DELETE", "url": "Task/same" } }),
            json!({ "request": { "method": "DELETE", "url": "Task/same" } }),
        ],
    );
    let (status, answer) = server.post_json("", &admin, &doubled).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_outcome(&answer, "duplicate");
    assert_eq!(answer["issue"][0]["expression"][0], "Bundle.entry[2]");
    for n in 1..=14 {
        assert!(
            found(&server, &format!("bad-{n}")).await.is_empty(),
            "bad-{n} was stored"
        );
    }
    // Malformed JSON.
    let response = server
        .request(Method::POST, "", &admin)
        .header("content-type", "application/fhir+json")
        .body("{\"resourceType\": \"Bundle\",")
        .send()
        .await
        .unwrap();
    let (status, answer) = common::body(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["resourceType"], "OperationOutcome");
}

#[tokio::test]
async fn conditional_update_creates_updates_or_refuses_by_match_count() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let watch = catch_all(&server, &receiver).await;
    let admin = server.admin();
    let path = "/Task?identifier=http://example.org/orders|cond-1";

    // No match: the body (without an id) creates the Task.
    let body = with_identifier(task("requested", Some("Practitioner/1")), "cond-1");
    let (status, created) = server.put_json(path, &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    // A body id with no match is refused: the server assigns a new Task's id.
    let mut with_id = with_identifier(task("requested", None), "cond-none");
    with_id["id"] = json!("chosen");
    let (status, refused) = server
        .put_json(
            "/Task?identifier=http://example.org/orders|cond-none",
            &admin,
            &with_id,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");

    // One match: that Task is updated; the body's id may be left out, or must be its id.
    let mut accepted = body.clone();
    accepted["status"] = json!("accepted");
    let (status, updated) = server.put_json(path, &admin, &accepted).await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    assert_eq!(updated["id"], id.as_str());
    assert_eq!(updated["meta"]["versionId"], "2");
    let mut wrong = accepted.clone();
    wrong["id"] = json!("someone-else");
    let (status, refused) = server.put_json(path, &admin, &wrong).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");

    // The criteria only see what the caller may read: a stranger's match is not theirs to update.
    let stranger = server.practitioner("Practitioner/9");
    let mut theirs = accepted.clone();
    theirs["owner"] = json!({ "reference": "Practitioner/9" });
    theirs["identifier"][0]["value"] = json!("cond-9");
    let (status, _) = server
        .put_json(
            "/Task?identifier=http://example.org/orders|cond-1",
            &stranger,
            &{
                let mut t = theirs.clone();
                t["identifier"][0]["value"] = json!("cond-1");
                t
            },
        )
        .await;
    // Practitioner 9 sees no Task with cond-1, so its PUT creates its own.
    assert_eq!(status, StatusCode::CREATED);

    // Several matches (the admin sees both now): 412.
    let (status, refused) = server.put_json(path, &admin, &accepted).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{refused}");
    assert_outcome(&refused, "multiple-matches");

    // Criteria are required.
    let (status, refused) = server.put_json("/Task", &admin, &accepted).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");

    let heard = eventually("three events", || async {
        let heard = event_task_ids(&server, &watch).await;
        (heard.len() >= 3).then_some(heard)
    })
    .await;
    assert_eq!(heard[..2], [id.clone(), id]);
}

#[tokio::test]
async fn conditional_delete_deletes_one_or_nothing_and_refuses_several() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let delete = |query: &str| {
        server
            .request(Method::DELETE, &format!("/Task?{query}"), &admin)
            .send()
    };
    // No match: 204, nothing changes.
    let response = delete("identifier=http://example.org/orders|del-none")
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // One match: deleted, with the deletion's ETag.
    let one = server
        .create_task(&with_identifier(task("requested", None), "del-1"))
        .await;
    let response = delete("identifier=http://example.org/orders|del-1")
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(response.headers()["etag"], "W/\"2\"");
    let (status, _) = server
        .get(&format!("/Task/{}", one["id"].as_str().unwrap()), &admin)
        .await;
    assert_eq!(status, StatusCode::GONE);

    // Several: 412, both stay.
    for _ in 0..2 {
        server
            .create_task(&with_identifier(task("requested", None), "del-2"))
            .await;
    }
    let response = delete("identifier=http://example.org/orders|del-2")
        .await
        .unwrap();
    let (status, refused) = common::body(response).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{refused}");
    assert_eq!(found(&server, "del-2").await.len(), 2);

    // In a transaction, a conditional delete that matches nothing is a 204 entry.
    let request = bundle(
        "transaction",
        vec![
            json!({ "request": { "method": "DELETE", "url": "Task?identifier=http://example.org/orders|del-none" } }),
        ],
    );
    let (status, answer) = server.post_json("", &admin, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["entry"][0]["response"]["status"], "204 No Content");
}

#[tokio::test]
async fn a_transaction_mixes_creates_updates_deletes_and_conditional_creates() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let kept = server
        .create_task(&with_identifier(task("requested", None), "mix-kept"))
        .await;
    let gone = server
        .create_task(&with_identifier(task("requested", None), "mix-gone"))
        .await;
    let found_task = server
        .create_task(&with_identifier(task("requested", None), "mix-found"))
        .await;
    let mut accepted = kept.clone();
    accepted["status"] = json!("accepted");
    let parent = "urn:uuid:70000000-0000-4000-8000-000000000001";
    let request = bundle(
        "transaction",
        vec![
            json!({ "resource": accepted, "request": { "method": "PUT", "url": format!("Task/{}", kept["id"].as_str().unwrap()), "ifMatch": "W/\"1\"" } }),
            json!({ "request": { "method": "DELETE", "url": format!("Task/{}", gone["id"].as_str().unwrap()) } }),
            // Found by its ifNoneExist: nothing written, and references to it resolve to it.
            json!({ "fullUrl": parent, "resource": task("requested", None), "request": { "method": "POST", "url": "Task", "ifNoneExist": "identifier=http://example.org/orders|mix-found" } }),
            post(
                "urn:uuid:70000000-0000-4000-8000-000000000002",
                sub_task(parent, "mix-child"),
            ),
        ],
    );
    let (status, answer) = server.post_json("", &admin, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let statuses: Vec<&str> = answer["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["200 OK", "204 No Content", "200 OK", "201 Created"]
    );
    assert_eq!(answer["entry"][0]["response"]["etag"], "W/\"2\"");
    // An update's entry, too, shows its Task as stored.
    let (_, stored) = server
        .get(&format!("/Task/{}", kept["id"].as_str().unwrap()), &admin)
        .await;
    assert_eq!(answer["entry"][0]["resource"], stored);
    assert_eq!(answer["entry"][2]["resource"]["id"], found_task["id"]);
    assert_eq!(
        answer["entry"][3]["resource"]["partOf"][0]["reference"],
        format!("Task/{}", found_task["id"].as_str().unwrap())
    );
    assert!(found(&server, "mix-gone").await.is_empty());

    // The Task an ifNoneExist finds counts as touched: deleting it in the same transaction
    // is refused, and nothing is stored.
    let request = bundle(
        "transaction",
        vec![
            json!({ "resource": task("requested", None), "request": { "method": "POST", "url": "Task", "ifNoneExist": "identifier=http://example.org/orders|mix-kept" } }),
            json!({ "request": { "method": "DELETE", "url": format!("Task/{}", kept["id"].as_str().unwrap()) } }),
        ],
    );
    let (status, refused) = server.post_json("", &admin, &request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_outcome(&refused, "duplicate");
    assert_eq!(found(&server, "mix-kept").await.len(), 1);
}

#[tokio::test]
async fn a_batch_creates_reads_updates_and_deletes_subscriptions() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let alice = server.practitioner("Practitioner/alice");
    let body = subscription(
        &server.base,
        "task-changed",
        &["Task?owner=Practitioner/alice"],
        &receiver.url,
        "id-only",
    );
    let mut bad = body.clone();
    bad["criteria"] = json!("http://example.org/no-such-topic");
    let request = bundle(
        "batch",
        vec![
            json!({ "resource": body, "request": { "method": "POST", "url": "Subscription" } }),
            json!({ "resource": bad, "request": { "method": "POST", "url": "Subscription" } }),
        ],
    );
    let (status, answer) = server.post_json("", &alice, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["entry"][0]["response"]["status"], "201 Created",
        "{answer}"
    );
    assert_eq!(
        answer["entry"][1]["response"]["status"], "400 Bad Request",
        "{answer}"
    );
    let id = answer["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        answer["entry"][0]["response"]["location"],
        format!("Subscription/{id}")
    );
    // The subscription is the author's and in force: it is read back through the API.
    let (status, stored) = server.get(&format!("/Subscription/{id}"), &alice).await;
    assert_eq!(status, StatusCode::OK, "{stored}");

    let mut off = stored.clone();
    off["status"] = json!("off");
    let stranger = server.practitioner("Practitioner/bob");
    let request = bundle(
        "batch",
        vec![
            json!({ "request": { "method": "GET", "url": format!("Subscription/{id}") } }),
            json!({ "resource": off, "request": { "method": "PUT", "url": format!("Subscription/{id}") } }),
        ],
    );
    let (_, answer) = server.post_json("", &stranger, &request).await;
    assert_eq!(
        answer["entry"][0]["response"]["status"], "403 Forbidden",
        "{answer}"
    );
    assert_eq!(
        answer["entry"][1]["response"]["status"], "403 Forbidden",
        "{answer}"
    );
    let (_, answer) = server.post_json("", &alice, &request).await;
    assert_eq!(
        answer["entry"][0]["response"]["status"], "200 OK",
        "{answer}"
    );
    assert_eq!(
        answer["entry"][1]["response"]["status"], "200 OK",
        "{answer}"
    );
    assert_eq!(answer["entry"][1]["resource"]["status"], "off", "{answer}");

    // In a transaction a Subscription entry is refused: only Task writes roll back together.
    let transaction = bundle(
        "transaction",
        vec![json!({ "request": { "method": "DELETE", "url": format!("Subscription/{id}") } })],
    );
    let (status, refused) = server.post_json("", &alice, &transaction).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert_eq!(refused["issue"][0]["expression"][0], "Bundle.entry[0]");

    let request = bundle(
        "batch",
        vec![json!({ "request": { "method": "DELETE", "url": format!("Subscription/{id}") } })],
    );
    let (_, answer) = server.post_json("", &alice, &request).await;
    assert_eq!(
        answer["entry"][0]["response"]["status"], "204 No Content",
        "{answer}"
    );
    let (status, _) = server.get(&format!("/Subscription/{id}"), &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------------------
// PATCH entries

/// A PATCH entry of `Task/{id}` carrying `patch` (a Parameters or a Binary), with `ifMatch`.
fn patch_entry(id: &str, patch: Value, if_match: Option<&str>) -> Value {
    let mut entry =
        json!({ "resource": patch, "request": { "method": "PATCH", "url": format!("Task/{id}") } });
    if let Some(version) = if_match {
        entry["request"]["ifMatch"] = json!(format!("W/\"{version}\""));
    }
    entry
}

/// A JSON Patch (or merge patch, by `content_type`) in a Binary, as HAPI FHIR takes it.
fn binary(content_type: &str, document: &Value) -> Value {
    use base64::Engine;
    let data = base64::engine::general_purpose::STANDARD.encode(document.to_string());
    json!({ "resourceType": "Binary", "contentType": content_type, "data": data })
}

/// A FHIRPath Patch replacing `path` with `value` (`value_key`, e.g. valueCode).
fn fhirpath_replace(path: &str, value_key: &str, value: Value) -> Value {
    json!({ "resourceType": "Parameters", "parameter": [{ "name": "operation", "part": [
        { "name": "type", "valueCode": "replace" },
        { "name": "path", "valueString": path },
        { "name": "value", value_key: value },
    ] }] })
}

/// `(status, versionId)` of a Task as the admin reads it.
async fn version_of(server: &TestServer, id: &str) -> (String, String) {
    let (status, task) = server.get(&format!("/Task/{id}"), &server.admin()).await;
    assert_eq!(status, StatusCode::OK, "{task}");
    (
        task["status"].as_str().unwrap().to_string(),
        task["meta"]["versionId"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn patch_entries_change_tasks_in_a_transaction_and_in_a_batch() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let watch = catch_all(&server, &receiver).await;
    let bob = server.practitioner("Practitioner/bob");
    let mine = |value: &str| with_identifier(task("requested", Some("Practitioner/bob")), value);
    let first = server.create_task(&mine("patched-1")).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let second = server.create_task(&mine("patched-2")).await["id"]
        .as_str()
        .unwrap()
        .to_string();

    // The owner claims one Task with a JSON Patch in a Binary (If-Match), starts the other
    // with a FHIRPath Patch, and creates a third, all at once.
    let claim = json!([
        { "op": "test", "path": "/status", "value": "requested" },
        { "op": "replace", "path": "/status", "value": "accepted" },
    ]);
    let request = bundle(
        "transaction",
        vec![
            patch_entry(
                &first,
                binary("application/json-patch+json", &claim),
                Some("1"),
            ),
            patch_entry(
                &second,
                fhirpath_replace("Task.status", "valueCode", json!("in-progress")),
                None,
            ),
            post(
                "urn:uuid:70000000-0000-4000-8000-000000000001",
                mine("patched-new"),
            ),
        ],
    );
    let (status, answer) = server.post_json("", &bob, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let entries = answer["entry"].as_array().unwrap();
    assert_eq!(entries[0]["response"]["status"], "200 OK", "{answer}");
    assert_eq!(entries[0]["response"]["etag"], "W/\"2\"");
    assert_eq!(entries[0]["resource"]["status"], "accepted");
    assert_eq!(entries[1]["response"]["status"], "200 OK");
    assert_eq!(entries[1]["resource"]["status"], "in-progress");
    assert_eq!(entries[2]["response"]["status"], "201 Created");
    assert_eq!(
        version_of(&server, &first).await,
        ("accepted".into(), "2".into())
    );
    assert_eq!(
        version_of(&server, &second).await,
        ("in-progress".into(), "2".into())
    );
    let created = locations(&answer)[2].clone();
    // Subscribers hear of the three changes in entry order.
    eventually("the transaction's events", || async {
        let heard = event_task_ids(&server, &watch).await;
        (heard.len() == 5).then_some(())
    })
    .await;
    assert_eq!(
        event_task_ids(&server, &watch).await[2..],
        [first.clone(), second.clone(), created]
    );

    // A batch answers each PATCH entry on its own: a merge patch passes, a stale If-Match
    // fails in its place.
    let request = bundle(
        "batch",
        vec![
            patch_entry(
                &first,
                binary(
                    "application/merge-patch+json",
                    &json!({ "status": "in-progress" }),
                ),
                Some("2"),
            ),
            patch_entry(
                &second,
                fhirpath_replace("Task.status", "valueCode", json!("completed")),
                Some("1"),
            ),
        ],
    );
    let (status, answer) = server.post_json("", &bob, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let entries = answer["entry"].as_array().unwrap();
    assert_eq!(entries[0]["response"]["status"], "200 OK", "{answer}");
    assert_eq!(
        entries[1]["response"]["status"], "412 Precondition Failed",
        "{answer}"
    );
    assert_outcome(&entries[1]["response"]["outcome"], "conflict");
    assert_eq!(
        version_of(&server, &first).await,
        ("in-progress".into(), "3".into())
    );
    assert_eq!(
        version_of(&server, &second).await,
        ("in-progress".into(), "2".into())
    );
    server.stop().await;
}

#[tokio::test]
async fn a_bad_patch_entry_fails_the_whole_transaction_naming_it() {
    let server = TestServer::start_with(|c| c.limits.max_patch_operations = 3).await;
    let admin = server.admin();
    let bob = server.practitioner("Practitioner/bob");
    let mine = |value: &str| with_identifier(task("requested", Some("Practitioner/bob")), value);
    let target = server.create_task(&mine("target")).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let other = server.create_task(&mine("other")).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let carols = server
        .create_task(&with_identifier(
            task("requested", Some("Practitioner/carol")),
            "carols",
        ))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let done = server
        .create_task(&with_identifier(
            task("completed", Some("Practitioner/bob")),
            "done",
        ))
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let json_patch = |operations: Value| binary("application/json-patch+json", &operations);
    let accept = json!([{ "op": "replace", "path": "/status", "value": "accepted" }]);
    let replace =
        |path: &str, value: Value| json!([{ "op": "replace", "path": path, "value": value }]);
    #[rustfmt::skip]
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        ("a failing test operation",
            patch_entry(&other, json_patch(json!([{ "op": "test", "path": "/status", "value": "accepted" }])), None),
            StatusCode::UNPROCESSABLE_ENTITY, "test"),
        ("a stale ifMatch", patch_entry(&other, json_patch(accept.clone()), Some("4")),
            StatusCode::PRECONDITION_FAILED, "version"),
        ("a status the state machine forbids", patch_entry(&done, json_patch(replace("/status", json!("in-progress"))), None),
            StatusCode::UNPROCESSABLE_ENTITY, "Task.status"),
        ("an element fixed at creation", patch_entry(&other, fhirpath_replace("Task.intent", "valueCode", json!("plan")), None),
            StatusCode::UNPROCESSABLE_ENTITY, "Task.intent"),
        ("a request element the fulfiller may not change", patch_entry(&other, json_patch(json!([{ "op": "add", "path": "/priority", "value": "stat" }])), None),
            StatusCode::FORBIDDEN, "Task.priority"),
        ("another practitioner's Task", patch_entry(&carols, json_patch(accept.clone()), None),
            StatusCode::FORBIDDEN, "not owned"),
        ("too many operations", patch_entry(&other, json_patch(json!([
                { "op": "test", "path": "/status", "value": "requested" },
                { "op": "test", "path": "/status", "value": "requested" },
                { "op": "test", "path": "/status", "value": "requested" },
                { "op": "replace", "path": "/status", "value": "accepted" }])), None),
            StatusCode::PAYLOAD_TOO_LARGE, "max_patch_operations"),
        ("an invalid result", patch_entry(&other, json_patch(replace("/status", json!("bogus"))), None),
            StatusCode::BAD_REQUEST, "status"),
        ("a Binary of another type", patch_entry(&other, binary("text/plain", &accept), None),
            StatusCode::UNSUPPORTED_MEDIA_TYPE, "resource.contentType"),
        ("a Binary that is not base64",
            patch_entry(&other, json!({ "resourceType": "Binary", "contentType": "application/json-patch+json", "data": "%%%" }), None),
            StatusCode::BAD_REQUEST, "resource.data"),
        ("a Task instead of a patch", patch_entry(&other, task("accepted", Some("Practitioner/bob")), None),
            StatusCode::BAD_REQUEST, "resourceType"),
        ("no patch at all", json!({ "request": { "method": "PATCH", "url": format!("Task/{other}") } }),
            StatusCode::BAD_REQUEST, "resource"),
        ("a conditional PATCH",
            json!({ "resource": json_patch(accept.clone()),
                    "request": { "method": "PATCH", "url": "Task?identifier=http://example.org/orders|other" } }),
            StatusCode::BAD_REQUEST, "request.url"),
        ("a Task that does not exist", patch_entry("no-such-task", json_patch(accept.clone()), None),
            StatusCode::NOT_FOUND, "no-such-task"),
    ];
    for (what, bad, expected, named) in cases {
        let request = bundle(
            "transaction",
            vec![
                post(
                    "urn:uuid:80000000-0000-4000-8000-000000000001",
                    mine("rolled-back"),
                ),
                patch_entry(&target, json_patch(accept.clone()), Some("1")),
                bad,
            ],
        );
        let (status, answer) = server.post_json("", &bob, &request).await;
        assert_eq!(status, expected, "{what}: {answer}");
        assert_eq!(answer["resourceType"], "OperationOutcome", "{what}");
        assert_eq!(
            answer["issue"][0]["expression"][0], "Bundle.entry[2]",
            "{what}: {answer}"
        );
        let diagnostics = answer["issue"][0]["diagnostics"].as_str().unwrap_or("");
        assert!(
            diagnostics.contains(named),
            "{what}: '{named}' not in {diagnostics}"
        );
        // Nothing of the transaction stands: not the create, not the good patch.
        assert!(found(&server, "rolled-back").await.is_empty(), "{what}");
        assert_eq!(
            version_of(&server, &target).await,
            ("requested".into(), "1".into()),
            "{what}"
        );
    }
    for id in [&other, &carols, &done] {
        let (_, task) = server.get(&format!("/Task/{id}"), &admin).await;
        assert_eq!(task["meta"]["versionId"], "1", "{task}");
    }
    server.stop().await;
}

#[tokio::test]
async fn conditional_references_resolve_to_the_one_task_they_match_or_fail_the_transaction() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let watch = catch_all(&server, &receiver).await;
    let admin = server.admin();
    let order = server
        .create_task(&with_identifier(
            task("requested", Some("Practitioner/1")),
            "order-1",
        ))
        .await;
    let order_id = order["id"].as_str().unwrap().to_string();
    // Two Tasks sharing an identifier make a reference to it ambiguous.
    let mut singles = vec![order_id.clone()];
    for _ in 0..2 {
        let twin = server
            .create_task(&with_identifier(
                task("requested", Some("Practitioner/1")),
                "twin",
            ))
            .await;
        singles.push(twin["id"].as_str().unwrap().to_string());
    }
    let by_identifier = |value: &str| format!("Task?identifier=http://example.org/orders|{value}");
    let parent = "urn:uuid:40000000-0000-4000-8000-000000000001";
    let child_url = "urn:uuid:40000000-0000-4000-8000-000000000002";
    let transaction = |reference: &str, label: &str, owner: &str| {
        let mut child = sub_task(parent, &format!("{label}-child"));
        child["basedOn"] = json!([{ "reference": reference }]);
        child["owner"] = json!({ "reference": owner });
        bundle(
            "transaction",
            vec![
                post(
                    parent,
                    with_identifier(task("requested", Some(owner)), &format!("{label}-parent")),
                ),
                post(child_url, child),
            ],
        )
    };

    // One match: the reference becomes Task/{id}, beside a urn:uuid reference to a new Task.
    let request = transaction(&by_identifier("order-1"), "resolved", "Practitioner/1");
    let (status, answer) = server.post_json("", &admin, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let ids = locations(&answer);
    let (_, child) = server.get(&format!("/Task/{}", ids[1]), &admin).await;
    assert_eq!(child["basedOn"][0]["reference"], format!("Task/{order_id}"));
    assert_eq!(child["partOf"][0]["reference"], format!("Task/{}", ids[0]));
    assert_eq!(
        server
            .search_ids(&format!("based-on=Task/{order_id}"), &admin)
            .await,
        [ids[1].clone()]
    );
    // The same reference under this server's base resolves too.
    let absolute = format!("{}/{}", server.base, by_identifier("order-1"));
    let request = transaction(&absolute, "absolute", "Practitioner/1");
    let (status, answer) = server.post_json("", &admin, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let absolute_ids = locations(&answer);
    let (_, child) = server
        .get(&format!("/Task/{}", absolute_ids[1]), &admin)
        .await;
    assert_eq!(child["basedOn"][0]["reference"], format!("Task/{order_id}"));

    // No match, several, another resource type, and a Task the caller may not read: the
    // transaction fails naming the entry and the element, and stores nothing.
    let practitioner = server.practitioner("Practitioner/2");
    let cases = [
        (
            "no match",
            by_identifier("nobody"),
            &admin,
            "Practitioner/1",
            StatusCode::BAD_REQUEST,
        ),
        (
            "two matches",
            by_identifier("twin"),
            &admin,
            "Practitioner/1",
            StatusCode::PRECONDITION_FAILED,
        ),
        (
            "another type",
            "Patient?identifier=http://example.org/mrn|7".to_string(),
            &admin,
            "Practitioner/1",
            StatusCode::BAD_REQUEST,
        ),
        (
            "a Task the caller may not read",
            by_identifier("order-1"),
            &practitioner,
            "Practitioner/2",
            StatusCode::BAD_REQUEST,
        ),
        (
            "bad criteria",
            "Task?colour=red".to_string(),
            &admin,
            "Practitioner/1",
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (what, reference, token, owner, expected) in cases {
        let request = transaction(&reference, "rolled-back", owner);
        let (status, answer) = server.post_json("", token, &request).await;
        assert_eq!(status, expected, "{what}: {answer}");
        assert_eq!(answer["resourceType"], "OperationOutcome", "{what}");
        assert_eq!(
            answer["issue"][0]["expression"][0], "Bundle.entry[1]",
            "{what}: {answer}"
        );
        let diagnostics = answer["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(
            diagnostics.contains("basedOn[0].reference"),
            "{what}: {diagnostics}"
        );
        assert!(
            found(&server, "rolled-back-parent").await.is_empty(),
            "{what}"
        );
        assert!(
            found(&server, "rolled-back-child").await.is_empty(),
            "{what}"
        );
    }

    // A batch entry resolves its own conditional references; a failing one fails alone.
    let mut resolved = with_identifier(task("requested", Some("Practitioner/1")), "batch-ok");
    resolved["basedOn"] = json!([{ "reference": by_identifier("order-1") }]);
    let mut ambiguous = with_identifier(task("requested", Some("Practitioner/1")), "batch-bad");
    ambiguous["basedOn"] = json!([{ "reference": by_identifier("twin") }]);
    let request = bundle(
        "batch",
        vec![
            json!({ "resource": resolved, "request": { "method": "POST", "url": "Task" } }),
            json!({ "resource": ambiguous, "request": { "method": "POST", "url": "Task" } }),
        ],
    );
    let (status, answer) = server.post_json("", &admin, &request).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["entry"][0]["response"]["status"], "201 Created");
    assert!(
        answer["entry"][1]["response"]["status"]
            .as_str()
            .unwrap()
            .starts_with("412"),
        "{answer}"
    );
    let batch_ids = found(&server, "batch-ok").await;
    let (_, stored) = server.get(&format!("/Task/{}", batch_ids[0]), &admin).await;
    assert_eq!(
        stored["basedOn"][0]["reference"],
        format!("Task/{order_id}")
    );
    assert!(found(&server, "batch-bad").await.is_empty());

    // Only the writes that were stored were heard, in order.
    let heard = eventually("the batch's create", || async {
        let heard = event_task_ids(&server, &watch).await;
        heard.contains(&batch_ids[0]).then_some(heard)
    })
    .await;
    let mut expected = singles;
    expected.extend(ids);
    expected.extend(absolute_ids);
    expected.extend(batch_ids);
    assert_eq!(heard, expected);
}
