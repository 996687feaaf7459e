//! The audit trail: every Task interaction, Subscription change and refusal leaves a FHIR
//! AuditEvent, found again by searching `/fhir/AuditEvent`; a Task change and its AuditEvent
//! commit together; nothing secret is stored; old AuditEvents are pruned.

mod common;

use common::receiver::Receiver;
use common::{
    TestServer, assert_outcome, database_execute, database_scalar, eventually, forget_database,
    migrate_database_to, postgres_backend, subscription, task,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The AuditEvents a search finds (first page), as the auditor sees them.
async fn audit_events(server: &TestServer, query: &str) -> Vec<Value> {
    let (status, bundle) = server
        .get(&format!("/AuditEvent?{query}"), &server.auditor())
        .await;
    assert_eq!(status, StatusCode::OK, "AuditEvent?{query}: {bundle}");
    resources(&bundle)
}

/// The resources of a Bundle's entries, in order.
fn resources(bundle: &Value) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].clone())
        .collect()
}

fn subtypes(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["subtype"][0]["code"].as_str().unwrap().to_string())
        .collect()
}

fn entity_of(event: &Value) -> String {
    event["entity"][0]["what"]["reference"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn each_task_interaction_leaves_an_audit_event() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let alice = server.practitioner("Practitioner/alice");

    let (status, created) = server
        .post_json(
            "/Task",
            &alice,
            &task("requested", Some("Practitioner/alice")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        server.get(&format!("/Task/{id}"), &alice).await.0,
        StatusCode::OK
    );
    assert_eq!(
        server
            .get(&format!("/Task/{id}/_history/1"), &alice)
            .await
            .0,
        StatusCode::OK
    );
    let patch = server
        .request(Method::PATCH, &format!("/Task/{id}"), &admin)
        .header("content-type", "application/json-patch+json")
        .body(json!([{ "op": "replace", "path": "/status", "value": "accepted" }]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), StatusCode::OK);
    let mut updated = task("in-progress", Some("Practitioner/alice"));
    updated["id"] = json!(id);
    let (status, body) = server
        .put_json(&format!("/Task/{id}"), &admin, &updated)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let search = server
        .search_ids("status=in-progress&_count=5", &alice)
        .await;
    assert_eq!(search, vec![id.clone()]);
    let deleted = server
        .request(Method::DELETE, &format!("/Task/{id}"), &admin)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());

    // Everything about the Task, oldest first. The reads' records are written by the audit
    // queue after its batch window, so a read and the write after it recorded in the same
    // millisecond may come in either order (ties go by row): the order is the instants'.
    let mut events = audit_events(&server, &format!("entity=Task/{id}&_sort=date")).await;
    let recorded = |e: &Value| e["recorded"].as_str().unwrap().to_string();
    assert!(
        events
            .windows(2)
            .all(|w| recorded(&w[0]) <= recorded(&w[1])),
        "{events:#?}"
    );
    let order = ["create", "read", "vread", "patch", "update", "delete"];
    events.sort_by_key(|e| {
        let position = order.iter().position(|s| e["subtype"][0]["code"] == *s);
        (recorded(e), position)
    });
    assert_eq!(subtypes(&events), order, "{events:#?}");
    let entities: Vec<String> = events.iter().map(entity_of).collect();
    assert_eq!(
        entities,
        [
            format!("Task/{id}/_history/1"),
            format!("Task/{id}/_history/1"),
            format!("Task/{id}/_history/1"),
            format!("Task/{id}/_history/2"),
            format!("Task/{id}/_history/3"),
            format!("Task/{id}/_history/4"),
        ]
    );
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["C", "R", "R", "U", "U", "D"]);
    for event in &events {
        assert_eq!(event["resourceType"], "AuditEvent");
        assert_eq!(event["type"]["code"], "rest");
        assert_eq!(event["outcome"], "0");
        assert_eq!(event["agent"][0]["requestor"], true);
        assert_eq!(event["agent"][0]["network"]["address"], "127.0.0.1");
        assert!(
            event["source"]["observer"]["display"].is_string(),
            "{event}"
        );
    }
    assert_eq!(
        events[0]["agent"][0]["who"]["reference"],
        "Practitioner/alice"
    );
    assert_eq!(events[0]["agent"][0]["role"][0]["text"], "practitioner");
    // The admin's token has no fhirUser: its sub names it.
    assert!(events[3]["agent"][0]["who"]["identifier"]["value"].is_string());

    // Alice's own trail holds her search, with its query.
    let alices = audit_events(&server, "agent=Practitioner/alice&subtype=search-type").await;
    assert_eq!(alices.len(), 1, "{alices:#?}");
    assert_eq!(
        alices[0]["entity"][0]["description"],
        "Task?status=in-progress&_count=5"
    );
    assert_eq!(
        alices[0]["entity"][0]["query"],
        "c3RhdHVzPWluLXByb2dyZXNzJl9jb3VudD01"
    );
    // Type, outcome and date narrow a search; an AuditEvent reads back by id.
    assert_eq!(audit_events(&server, &format!("entity=Task/{id}&type=http://terminology.hl7.org/CodeSystem/audit-event-type|rest&outcome=0")).await.len(), 6);
    assert_eq!(
        audit_events(&server, &format!("entity=Task/{id}&date=lt2000-01-01"))
            .await
            .len(),
        0
    );
    assert_eq!(
        audit_events(
            &server,
            &format!("entity=Task/{id}&date=ge2000-01-01&date=lt3000")
        )
        .await
        .len(),
        6
    );
    let first_id = events[0]["id"].as_str().unwrap();
    let (status, read) = server.get(&format!("/AuditEvent/{first_id}"), &admin).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read, events[0]);
    server.stop().await;
}

#[tokio::test]
async fn a_refused_request_changes_nothing_and_leaves_an_audit_event() {
    let server = TestServer::start().await;
    let alice = server.practitioner("Practitioner/alice");
    let bob = server.practitioner("Practitioner/bob");
    let created = server
        .create_task(&task("requested", Some("Practitioner/alice")))
        .await;
    let id = created["id"].as_str().unwrap().to_string();

    let mut taken = task("requested", Some("Practitioner/bob"));
    taken["id"] = json!(id);
    let (status, body) = server.put_json(&format!("/Task/{id}"), &bob, &taken).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = server.get(&format!("/Task/{id}"), "not-a-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Practitioners do not read the audit trail.
    let (status, body) = server.get("/AuditEvent", &alice).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_outcome(&body, "forbidden");

    let (_, stored) = server.get(&format!("/Task/{id}"), &server.admin()).await;
    assert_eq!(
        stored["meta"]["versionId"], "1",
        "the refused update changed nothing"
    );
    assert_eq!(stored["owner"]["reference"], "Practitioner/alice");

    let refused = audit_events(&server, "outcome=4&_sort=date").await;
    assert_eq!(
        subtypes(&refused),
        ["update", "read", "search-type"],
        "{refused:#?}"
    );
    assert_eq!(
        refused[0]["agent"][0]["who"]["reference"],
        "Practitioner/bob"
    );
    assert_eq!(entity_of(&refused[0]), format!("Task/{id}"));
    assert!(refused[0]["outcomeDesc"].as_str().unwrap().contains("403"));
    // The 401 names no agent: nobody was verified.
    assert!(refused[1]["agent"][0]["who"]["reference"].is_null());
    assert!(refused[1]["outcomeDesc"].as_str().unwrap().contains("401"));
    assert_eq!(
        refused[2]["agent"][0]["who"]["reference"],
        "Practitioner/alice"
    );
    // No update of the Task was recorded as a success.
    let updates = audit_events(
        &server,
        &format!("entity=Task/{id}&subtype=update&outcome=0"),
    )
    .await;
    assert!(updates.is_empty(), "{updates:#?}");
    server.stop().await;
}

#[tokio::test]
async fn a_failed_write_leaves_neither_change_nor_audit_event() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let created = server.create_task(&task("requested", None)).await;
    let id = created["id"].as_str().unwrap().to_string();

    // A stale If-Match fails inside the write's transaction.
    let mut changed = task("accepted", None);
    changed["id"] = json!(id);
    let stale = server
        .request(Method::PUT, &format!("/Task/{id}"), &admin)
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"7\"")
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);

    // A transaction whose second entry fails: its first entry's create is rolled back, and
    // so is that create's AuditEvent.
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:6f1d1d3e-0000-4000-8000-000000000001",
                "resource": task("requested", None),
                "request": { "method": "POST", "url": "Task" }
            },
            {
                "resource": changed,
                "request": { "method": "PUT", "url": format!("Task/{id}"), "ifMatch": "W/\"7\"" }
            }
        ]
    });
    let (status, body) = server.post_json("", &admin, &bundle).await;
    assert!(status.is_client_error(), "{status} {body}");

    let (_, stored) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(stored["meta"]["versionId"], "1");
    let writes = audit_events(&server, "subtype=create,update,patch,delete&outcome=0").await;
    assert_eq!(subtypes(&writes), ["create"], "{writes:#?}");
    assert_eq!(entity_of(&writes[0]), format!("Task/{id}/_history/1"));
    // The stale PUT is on record as a failed update, and it names no version it made.
    let failed = audit_events(&server, "subtype=update&outcome=4").await;
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(entity_of(&failed[0]), format!("Task/{id}"));
    assert_eq!(
        failed[0]["outcomeDesc"],
        "failed with 412 Precondition Failed"
    );
    let (_, tasks) = server.get("/Task?_summary=count", &admin).await;
    assert_eq!(tasks["total"], 1, "the rolled-back create left no Task");
    server.stop().await;
}

#[tokio::test]
async fn failed_task_writes_are_audited_with_why() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let created = server.create_task(&task("requested", None)).await;
    let id = created["id"].as_str().unwrap().to_string();
    let put = |body: Value, if_match: Option<&str>| {
        let mut request = server
            .request(Method::PUT, &format!("/Task/{id}"), &admin)
            .header("content-type", "application/fhir+json");
        if let Some(tag) = if_match {
            request = request.header("if-match", tag);
        }
        request.body(body.to_string()).send()
    };
    let mut changed = task("accepted", None);
    changed["id"] = json!(id);
    // 412: a stale If-Match.
    let stale = put(changed.clone(), Some("W/\"9\"")).await.unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    // 422: a terminal Task may not come back.
    let mut done = task("completed", None);
    done["id"] = json!(id);
    assert_eq!(put(done, None).await.unwrap().status(), StatusCode::OK);
    let revived = put(changed, None).await.unwrap();
    assert_eq!(revived.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let failed = audit_events(&server, "subtype=update&outcome=4&_sort=date").await;
    let why: Vec<&str> = failed
        .iter()
        .map(|e| e["outcomeDesc"].as_str().unwrap())
        .collect();
    assert_eq!(
        why,
        [
            "failed with 412 Precondition Failed",
            "failed with 422 Unprocessable Entity"
        ],
        "{failed:#?}"
    );
    assert!(failed.iter().all(|e| entity_of(e) == format!("Task/{id}")));
    // The one update that succeeded is the store's record, with its version.
    let done = audit_events(&server, "subtype=update&outcome=0").await;
    assert_eq!(done.len(), 1, "{done:#?}");
    assert_eq!(entity_of(&done[0]), format!("Task/{id}/_history/2"));
    server.stop().await;
}

#[tokio::test]
async fn subscription_changes_are_audited_without_secrets() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let sub_id = created["id"].as_str().unwrap().to_string();
    let mut changed = body.clone();
    changed["id"] = json!(sub_id);
    changed["reason"] = json!("changed");
    let (status, replaced) = server
        .put_json(&format!("/Subscription/{sub_id}"), &admin, &changed)
        .await;
    assert_eq!(status, StatusCode::OK, "{replaced}");
    server.create_task(&task("requested", None)).await;
    let deleted = server
        .request(Method::DELETE, &format!("/Subscription/{sub_id}"), &admin)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());

    let events = audit_events(
        &server,
        &format!("entity=Subscription/{sub_id}&type=rest&_sort=date"),
    )
    .await;
    let subs: Vec<String> = subtypes(&events)
        .into_iter()
        .filter(|s| s != "read")
        .collect();
    assert_eq!(subs, ["create", "update", "delete"], "{events:#?}");
    assert!(entity_of(&events[0]).starts_with(&format!("Subscription/{sub_id}")));

    // Neither the bearer token nor the channel header is anywhere in the stored trail.
    let all = if postgres_backend() {
        "SELECT coalesce(string_agg(resource, ' '), '') FROM audit_event"
    } else {
        "SELECT coalesce(group_concat(resource, ' '), '') FROM audit_event"
    };
    let stored = database_scalar(&server.data_dir, all).await;
    // What a row keeps is the AuditEvent's facts, e.g. the Subscription's version.
    assert!(
        stored.contains(r#""v":"1""#),
        "the trail is there: {stored}"
    );
    assert!(!stored.contains(&admin), "a bearer token was stored");
    assert!(
        !stored.contains("secret-123"),
        "a channel.header value was stored"
    );
    assert!(
        !stored.contains("X-Test-Token"),
        "a channel.header name was stored"
    );
    server.stop().await;
}

#[tokio::test]
async fn searches_page_with_next_links() {
    let server = TestServer::start().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let created = server.create_task(&task("requested", None)).await;
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    let auditor = server.auditor();
    let mut seen = Vec::new();
    let mut next = Some(format!(
        "{}/AuditEvent?subtype=create&_sort=date&_count=2",
        server.base
    ));
    let mut pages = 0;
    while let Some(url) = next {
        let (status, bundle) = server.get(&url, &auditor).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        pages += 1;
        for entry in bundle["entry"].as_array().unwrap() {
            let reference = entity_of(&entry["resource"]);
            seen.push(reference.split('/').nth(1).unwrap().to_string());
        }
        next = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "oldest first, each once");
    let newest = audit_events(&server, "subtype=create&_count=1").await;
    assert_eq!(entity_of(&newest[0]), format!("Task/{}/_history/1", ids[4]));

    let (status, body) = server.get("/AuditEvent?date=ne2020", &auditor).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, _) = server.get("/AuditEvent?_cursor=bogus", &auditor).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = server.get("/AuditEvent?color=red", &auditor).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = server.get("/AuditEvent/no-such-event", &auditor).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The CapabilityStatement lists the resource and its search parameters.
    let (_, capabilities) = server.get("/metadata", &auditor).await;
    let audit = capabilities["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "AuditEvent")
        .expect("AuditEvent in the CapabilityStatement")
        .clone();
    let params: Vec<&str> = audit["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        params,
        ["date", "entity", "agent", "type", "subtype", "outcome"]
    );
    server.stop().await;
}

#[tokio::test]
async fn reads_are_not_audited_when_turned_off() {
    let server = TestServer::start_with(|c| c.audit.reads = false).await;
    let admin = server.admin();
    let created = server.create_task(&task("requested", None)).await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        server.get(&format!("/Task/{id}"), &admin).await.0,
        StatusCode::OK
    );
    server.search_ids("status=requested", &admin).await;
    let (status, _) = server.get(&format!("/Task/{id}"), "not-a-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let events = audit_events(&server, "_sort=date").await;
    assert_eq!(subtypes(&events), ["create", "read"], "{events:#?}");
    assert_eq!(
        events[1]["outcome"], "4",
        "refusals are audited all the same"
    );
    server.stop().await;
}

#[tokio::test]
async fn nothing_is_audited_when_auditing_is_off() {
    let server = TestServer::start_with(|c| c.audit.enabled = false).await;
    server.create_task(&task("requested", None)).await;
    assert!(audit_events(&server, "").await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn delivery_attempts_are_not_audited_when_turned_off_and_the_rest_still_is() {
    let server = TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.audit.delivery_attempts = false;
    })
    .await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let sub_id = created["id"].as_str().unwrap().to_string();
    let task_id = server.create_task(&task("requested", None)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    receiver
        .wait_for("the handshake and the event", |r| {
            r.iter().any(|n| n.kind() == "handshake")
                && r.iter().any(|n| n.kind() == "event-notification")
        })
        .await;
    // The delivery ledger stays empty; the Subscription's change and the Task's are there.
    assert!(
        audit_events(&server, "type=transmit").await.is_empty(),
        "no delivery attempt is audited"
    );
    let subscription_events = audit_events(&server, &format!("entity=Subscription/{sub_id}")).await;
    assert_eq!(subtypes(&subscription_events), ["create"]);
    let task_events = audit_events(&server, &format!("entity=Task/{task_id}")).await;
    assert_eq!(subtypes(&task_events), ["create"]);
    server.stop().await;
}

#[tokio::test]
async fn pruning_removes_audit_events_past_retention() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |c| c.audit.retention_days = 30).await;
    let created = server.create_task(&task("requested", None)).await;
    let id = created["id"].as_str().unwrap().to_string();
    server.stop().await;
    // An AuditEvent recorded long ago, as an older run of Baton would have left it (with a
    // random id of its own, kept as `legacy_id`).
    database_execute(
        dir.path(),
        "INSERT INTO audit_event (legacy_id, recorded, type_code, subtype, outcome, agent, entity, resource)
         VALUES ('old-one', '2001-01-01T00:00:00.000Z', 'rest', 'read', '0', NULL, 'Task/old',
                 '{\"resourceType\":\"AuditEvent\",\"id\":\"old-one\"}')",
    )
    .await;
    assert_eq!(
        database_scalar(
            dir.path(),
            "SELECT legacy_id FROM audit_event WHERE legacy_id = 'old-one'"
        )
        .await,
        "old-one"
    );
    // Pruning runs as the server starts, then hourly.
    let server = TestServer::start_in(dir.path(), |c| c.audit.retention_days = 30).await;
    let auditor = server.auditor();
    eventually("the old AuditEvent is pruned", || async {
        let (status, _) = server.get("/AuditEvent/old-one", &auditor).await;
        (status == StatusCode::NOT_FOUND).then_some(())
    })
    .await;
    let kept = audit_events(&server, &format!("entity=Task/{id}")).await;
    assert_eq!(subtypes(&kept), ["create"], "a recent AuditEvent is kept");
    server.stop().await;
    forget_database(dir.path());
}

/// The id of the AuditEvent an older Baton left in the test below, and its JSON.
const LEGACY_ID: &str = "0193f1a2-7c3e-7d41-9a55-2f1e8b6c0d11";

#[tokio::test]
async fn audit_events_written_before_ids_were_derived_still_read_by_id_and_search() {
    let dir = tempfile::tempdir().unwrap();
    // The schema before AuditEvent ids were derived from `seq` (sqlite 0016, postgres 0013),
    // and an AuditEvent written as that Baton wrote it: a random id, in its column and its JSON.
    migrate_database_to(dir.path(), 15, 12).await;
    database_execute(
        dir.path(),
        "INSERT INTO audit_event (id, recorded, type_code, subtype, outcome, agent, entity, resource)
         VALUES ('0193f1a2-7c3e-7d41-9a55-2f1e8b6c0d11', '2026-01-02T03:04:05.006Z', 'rest',
                 'create', '0', 'Practitioner/p1', 'Task/legacy-1',
                 '{\"resourceType\":\"AuditEvent\",\"id\":\"0193f1a2-7c3e-7d41-9a55-2f1e8b6c0d11\",\"recorded\":\"2026-01-02T03:04:05.006Z\",\"subtype\":[{\"system\":\"http://hl7.org/fhir/restful-interaction\",\"code\":\"create\"}],\"entity\":[{\"what\":{\"reference\":\"Task/legacy-1/_history/1\"}}]}')",
    )
    .await;
    // Kept forever, so the old date is not pruned away at start-up.
    let server = TestServer::start_in(dir.path(), |c| c.audit.retention_days = 0).await;
    let auditor = server.auditor();
    let (status, read) = server
        .get(&format!("/AuditEvent/{LEGACY_ID}"), &auditor)
        .await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["id"], LEGACY_ID);
    for query in ["entity=Task/legacy-1", "agent=Practitioner/p1"] {
        let found = audit_events(&server, query).await;
        assert_eq!(found.len(), 1, "{query}: {found:?}");
        assert_eq!(found[0]["id"], LEGACY_ID, "{query}");
    }
    // An AuditEvent written after the migration has a derived id, reads back by it, and pages
    // after the old one.
    let created = server.create_task(&task("requested", None)).await;
    let task_id = created["id"].as_str().unwrap();
    let creates = audit_events(&server, "subtype=create&_sort=date").await;
    assert_eq!(creates.len(), 2, "{creates:?}");
    assert_eq!(creates[0]["id"], LEGACY_ID);
    assert_eq!(entity_of(&creates[1]), format!("Task/{task_id}/_history/1"));
    let new_id = creates[1]["id"].as_str().unwrap();
    assert_ne!(new_id, LEGACY_ID);
    let (status, read) = server.get(&format!("/AuditEvent/{new_id}"), &auditor).await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read, creates[1]);
    let newest = audit_events(&server, "subtype=create&_count=1").await;
    assert_eq!(newest[0]["id"], new_id, "newest first");
    server.stop().await;
    forget_database(dir.path());
}

#[tokio::test]
async fn delivery_attempts_are_audited_with_their_outcome() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let sub_id = created["id"].as_str().unwrap().to_string();
    receiver
        .wait_for("the handshake", |r| {
            r.iter().any(|n| n.kind() == "handshake")
        })
        .await;
    server.create_task(&task("requested", None)).await;
    receiver
        .wait_for("the first event", |r| {
            r.iter().any(|n| n.kind() == "event-notification")
        })
        .await;
    // The endpoint starts failing: the next attempt is audited as a failure, with why.
    receiver.fail_with(Some(503));
    server.create_task(&task("requested", None)).await;
    let failed = eventually("a failed attempt's AuditEvent", || async {
        let events = audit_events(
            &server,
            &format!("entity=Subscription/{sub_id}&type=transmit&outcome=8"),
        )
        .await;
        events.into_iter().next()
    })
    .await;
    assert!(
        failed["outcomeDesc"].as_str().unwrap().contains("503"),
        "{failed}"
    );
    let delivered = audit_events(
        &server,
        &format!("entity=Subscription/{sub_id}&type=transmit&outcome=0&_sort=date"),
    )
    .await;
    assert_eq!(
        subtypes(&delivered)[..2],
        ["handshake", "event-notification"],
        "{delivered:#?}"
    );
    let details = delivered[1]["entity"][0]["detail"].as_array().unwrap();
    let detail = |name: &str| {
        details
            .iter()
            .find(|d| d["type"] == name)
            .map(|d| d["valueString"].as_str().unwrap().to_string())
    };
    assert_eq!(detail("events").as_deref(), Some("1..1"));
    assert_eq!(detail("channel").as_deref(), Some("rest-hook"));
    assert_eq!(detail("endpoint-host").as_deref(), Some("127.0.0.1"));
    assert!(detail("duration-ms").is_some());
    assert_eq!(delivered[1]["agent"][0]["requestor"], false);
    // The channel's header value never reaches the ledger.
    assert!(!delivered[1].to_string().contains("secret-123"));
    assert!(!failed.to_string().contains("secret-123"));
    server.stop().await;
}

/// An attempt's AuditEvent commits with the attempt's result, not after it through the audit
/// queue: with the queue holding its records for its longest window, the ledger rows are in
/// the database as soon as the subscription's row says the delivery (or failure) was recorded.
#[tokio::test]
async fn an_attempts_audit_event_commits_with_its_delivery_result() {
    let server = TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.delivery.retry_schedule_seconds = vec![1];
        c.delivery.jitter_ratio = 0.0;
        c.audit.batch_window_ms = 10_000;
    })
    .await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    server.create_task(&task("requested", None)).await;
    // The first moment the event's delivery is on record, the handshake's and the event's
    // AuditEvents are too.
    eventually("the event's delivery recorded", || async {
        let through = database_scalar(
            &server.data_dir,
            "SELECT CAST(delivered_through AS TEXT) FROM subscription",
        )
        .await;
        (through == "1").then_some(())
    })
    .await;
    let delivered = database_scalar(
        &server.data_dir,
        "SELECT CAST(count(*) AS TEXT) FROM audit_event WHERE type_code = 'transmit' AND outcome = '0'",
    )
    .await;
    assert_eq!(
        delivered, "2",
        "the handshake's and the event's AuditEvents"
    );
    // A failed attempt: its AuditEvent commits with the failure count.
    receiver.fail_with(Some(503));
    server.create_task(&task("requested", None)).await;
    eventually("the failure recorded", || async {
        let failures = database_scalar(
            &server.data_dir,
            "SELECT CAST(failures AS TEXT) FROM subscription",
        )
        .await;
        (failures != "0").then_some(())
    })
    .await;
    let failed = database_scalar(
        &server.data_dir,
        "SELECT CAST(count(*) AS TEXT) FROM audit_event WHERE type_code = 'transmit' AND outcome = '8'",
    )
    .await;
    assert_ne!(failed, "0", "the failed attempt's AuditEvent");
    server.stop().await;
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_recorded_up_to_a_budget_not_written_whole() {
    let server = TestServer::start().await;
    // 200 refusals from one address at once: the burst (50) is recorded, the rest counted.
    for _ in 0..200 {
        let (status, _) = server.get("/Task", "not-a-token").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let refused = audit_events(&server, "outcome=4&_count=1000").await;
    assert!(
        (50..200).contains(&refused.len()),
        "{} refusals recorded",
        refused.len()
    );
    let metrics = server.metrics().await;
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("baton_audit_refusals_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert_eq!(dropped as usize + refused.len(), 200, "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn a_practitioner_reads_only_its_own_subscriptions_delivery_ledger() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let alice = server.practitioner("Practitioner/alice");
    let bob = server.practitioner("Practitioner/bob");
    let mut created = Vec::new();
    for token in [&alice, &bob] {
        let body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
        let (status, sub) = server.post_json("/Subscription", token, &body).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        created.push(sub["id"].as_str().unwrap().to_string());
    }
    let (alices, bobs) = (&created[0], &created[1]);
    let (status, made) = server
        .post_json(
            "/Task",
            &alice,
            &task("requested", Some("Practitioner/alice")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let on = &server;
    let ledger = move |token: String, query: String| async move {
        on.get(&format!("/AuditEvent?{query}"), &token).await
    };
    // Alice reads her subscription's delivery attempts: the handshake and the event.
    let rows = eventually("alice's ledger shows the event's delivery", || async {
        let (status, bundle) = ledger(alice.clone(), format!("entity=Subscription/{alices}")).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        let rows = resources(&bundle);
        subtypes(&rows)
            .contains(&"event-notification".to_string())
            .then_some(rows)
    })
    .await;
    assert!(
        subtypes(&rows).contains(&"handshake".to_string()),
        "{rows:#?}"
    );
    // Only delivery attempts: the record of who created the subscription stays the auditors'.
    assert!(
        rows.iter().all(|r| r["type"]["code"] == "transmit"),
        "{rows:#?}"
    );
    assert!(
        rows.iter()
            .all(|r| entity_of(r) == format!("Subscription/{alices}"))
    );
    let changes = audit_events(&server, &format!("entity=Subscription/{alices}&type=rest")).await;
    assert!(
        !changes.is_empty(),
        "the subscription's creation is audited"
    );
    // The full URL of the reference names the same subscription.
    let (status, _) = ledger(
        alice.clone(),
        format!("entity={}/Subscription/{alices}&_count=1", server.base),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Several of her own in one search (as the console's table asks): each one's attempts.
    let body = subscription(&server.base, "task-changed", &[], &receiver.url, "id-only");
    let (status, second) = server.post_json("/Subscription", &alice, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let second = second["id"].as_str().unwrap().to_string();
    let both = eventually("both of alice's ledgers in one search", || async {
        let (status, bundle) = ledger(
            alice.clone(),
            format!("entity=Subscription/{alices},Subscription/{second}&_count=1000"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        let rows = resources(&bundle);
        rows.iter()
            .any(|r| entity_of(r) == format!("Subscription/{second}"))
            .then_some(rows)
    })
    .await;
    assert!(
        both.iter().all(|r| r["type"]["code"] == "transmit"),
        "{both:#?}"
    );
    assert!(
        both.iter()
            .any(|r| entity_of(r) == format!("Subscription/{alices}")),
        "{both:#?}"
    );

    // Everything else is refused with a 403 OperationOutcome.
    let refused = [
        (alice.clone(), String::new()),
        (alice.clone(), "type=transmit".to_string()),
        (
            alice.clone(),
            format!("entity=Task/{}", made["id"].as_str().unwrap()),
        ),
        (alice.clone(), format!("entity=Subscription/{bobs}")),
        (
            alice.clone(),
            format!("entity=Subscription/{alices},Subscription/{bobs}"),
        ),
        (
            alice.clone(),
            format!("entity=Subscription/{alices}&entity=Subscription/{bobs}"),
        ),
        (alice.clone(), "entity=Subscription/no-such-one".to_string()),
        (bob.clone(), format!("entity=Subscription/{alices}")),
    ];
    for (token, query) in refused {
        let (status, body) = ledger(token, query.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "AuditEvent?{query}: {body}");
        assert_outcome(&body, "forbidden");
    }
    // A single AuditEvent stays the auditors' too, even one of her own ledger.
    let id = rows[0]["id"].as_str().unwrap();
    let (status, body) = server.get(&format!("/AuditEvent/{id}"), &alice).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    server.stop().await;
}
