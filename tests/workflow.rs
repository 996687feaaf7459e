//! The FHIR workflow patterns end to end against the real server: request Tasks with effect
//! (abort, suspend, resume), coordination Tasks with sub-tasks, and role queues, plus the
//! notifications a completed request sends about both Tasks.

mod common;

use std::collections::BTreeSet;

use common::receiver::Receiver;
use common::socket::{Socket, next_json};
use common::{TestServer, assert_outcome, eventually, match_ids, subscription, task};
use futures::SinkExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const TASK_CODE: &str = "http://hl7.org/fhir/CodeSystem/task-code";
const PERFORMER_TYPES: &str = "http://terminology.hl7.org/CodeSystem/task-performer-type";

/// A request Task (`abort`, `suspend`, `resume`) about `focal`, addressed to `owner`.
fn request(kind: &str, focal: Option<&str>, owner: &str, reason: &str) -> Value {
    let mut t = json!({
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": { "coding": [{ "system": TASK_CODE, "code": kind }] },
        "requester": { "reference": "Practitioner/placer" },
        "owner": { "reference": owner },
        "statusReason": { "text": reason },
    });
    if let Some(focal) = focal {
        t["focus"] = json!({ "reference": focal });
    }
    t
}

/// A Task waiting in the role queue of `code` (no owner).
fn queued(code: &str) -> Value {
    let mut t = task("requested", None);
    t["performerType"] = json!([{ "coding": [{ "system": PERFORMER_TYPES, "code": code }] }]);
    t
}

fn id_of(resource: &Value) -> String {
    resource["id"].as_str().expect("an id").to_string()
}

async fn patch(
    server: &TestServer,
    path: &str,
    token: &str,
    operations: Value,
    if_match: Option<&str>,
) -> (StatusCode, Value) {
    let mut builder = server
        .request(Method::PATCH, path, token)
        .header("content-type", "application/json-patch+json")
        .body(operations.to_string());
    if let Some(version) = if_match {
        builder = builder.header("if-match", format!("W/\"{version}\""));
    }
    common::body(builder.send().await.unwrap()).await
}

async fn set_status(
    server: &TestServer,
    id: &str,
    token: &str,
    status: &str,
) -> (StatusCode, Value) {
    let operations = json!([{ "op": "replace", "path": "/status", "value": status }]);
    patch(server, &format!("/Task/{id}"), token, operations, None).await
}

/// `(status, versionId)` of a Task as the admin reads it.
async fn state_of(server: &TestServer, id: &str) -> (String, String) {
    let (status, task) = server.get(&format!("/Task/{id}"), &server.admin()).await;
    assert_eq!(status, StatusCode::OK, "{task}");
    (
        task["status"].as_str().unwrap().to_string(),
        task["meta"]["versionId"].as_str().unwrap().to_string(),
    )
}

/// The statuses of a Task's versions, newest first.
async fn history_statuses(server: &TestServer, id: &str) -> Vec<String> {
    let (status, bundle) = server
        .get(&format!("/Task/{id}/_history"), &server.admin())
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["resource"]["status"]
                .as_str()
                .unwrap_or("deleted")
                .to_string()
        })
        .collect()
}

async fn task_count(server: &TestServer) -> u64 {
    let (_, bundle) = server.get("/Task?_summary=count", &server.admin()).await;
    bundle["total"].as_u64().unwrap()
}

#[tokio::test]
async fn a_completed_abort_request_cancels_its_focal_task() {
    let server = TestServer::start().await;
    let bob = server.practitioner("Practitioner/bob");
    let focal = server
        .create_task(&task("in-progress", Some("Practitioner/bob")))
        .await;
    let focal_id = id_of(&focal);
    let abort = server
        .create_task(&request(
            "abort",
            Some(&format!("Task/{focal_id}")),
            "Practitioner/bob",
            "patient transferred",
        ))
        .await;
    let abort_id = id_of(&abort);
    // Creating the request changes nothing yet.
    assert_eq!(
        state_of(&server, &focal_id).await,
        ("in-progress".into(), "1".into())
    );

    // The owner accepts, then completes the request (as its owner, under the role rules).
    assert_eq!(
        set_status(&server, &abort_id, &bob, "accepted").await.0,
        StatusCode::OK
    );
    let (status, completed) = patch(
        &server,
        &format!("/Task/{abort_id}"),
        &bob,
        json!([{ "op": "replace", "path": "/status", "value": "completed" }]),
        Some("2"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{completed}");
    assert_eq!(completed["status"], "completed");

    let (_, cancelled) = server.get(&format!("/Task/{focal_id}"), &bob).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(
        cancelled["statusReason"],
        json!({ "text": "patient transferred" })
    );
    assert_eq!(cancelled["meta"]["versionId"], "2");
    // Both changes are versions of their own, visible in each Task's history.
    assert_eq!(
        history_statuses(&server, &focal_id).await,
        ["cancelled", "in-progress"]
    );
    assert_eq!(
        history_statuses(&server, &abort_id).await,
        ["completed", "accepted", "requested"]
    );

    // A request created already completed takes effect at once.
    let other = server
        .create_task(&task("accepted", Some("Practitioner/bob")))
        .await;
    let mut done = request(
        "abort",
        Some(&format!("{}/Task/{}", server.base, id_of(&other))),
        "Practitioner/bob",
        "duplicate order",
    );
    done["status"] = json!("completed");
    let (status, body) = server.post_json("/Task", &bob, &done).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(state_of(&server, &id_of(&other)).await.0, "cancelled");
    server.stop().await;
}

#[tokio::test]
async fn a_rejected_request_leaves_its_focal_task_alone() {
    let server = TestServer::start().await;
    let bob = server.practitioner("Practitioner/bob");
    let focal_id = id_of(
        &server
            .create_task(&task("in-progress", Some("Practitioner/bob")))
            .await,
    );
    let abort_id = id_of(
        &server
            .create_task(&request(
                "abort",
                Some(&format!("Task/{focal_id}")),
                "Practitioner/bob",
                "changed my mind",
            ))
            .await,
    );
    let (status, body) = set_status(&server, &abort_id, &bob, "rejected").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        state_of(&server, &focal_id).await,
        ("in-progress".into(), "1".into())
    );
    assert_eq!(history_statuses(&server, &focal_id).await, ["in-progress"]);
    // Rejected is final: the request cannot be completed afterwards.
    let (status, body) = set_status(&server, &abort_id, &bob, "completed").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(state_of(&server, &focal_id).await.0, "in-progress");
    server.stop().await;
}

#[tokio::test]
async fn suspend_then_resume_restores_the_status_before_the_hold() {
    let server = TestServer::start().await;
    let bob = server.practitioner("Practitioner/bob");
    let focal_id = id_of(
        &server
            .create_task(&task("accepted", Some("Practitioner/bob")))
            .await,
    );
    assert_eq!(
        set_status(&server, &focal_id, &bob, "in-progress").await.0,
        StatusCode::OK
    );
    let focal_ref = format!("Task/{focal_id}");

    let suspend_id = id_of(
        &server
            .create_task(&request(
                "suspend",
                Some(&focal_ref),
                "Practitioner/bob",
                "awaiting consent",
            ))
            .await,
    );
    let (status, body) = set_status(&server, &suspend_id, &bob, "completed").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, held) = server.get(&format!("/Task/{focal_id}"), &bob).await;
    assert_eq!(held["status"], "on-hold");
    assert_eq!(held["statusReason"]["text"], "awaiting consent");

    // A second suspend is refused while it is on hold; an edit on hold keeps the streak going.
    let (status, body) = server
        .post_json(
            "/Task",
            &server.admin(),
            &request("suspend", Some(&focal_ref), "Practitioner/bob", "again"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_outcome(&body, "business-rule");
    let note =
        json!([{ "op": "add", "path": "/note", "value": [{ "text": "consent form sent" }] }]);
    assert_eq!(
        patch(&server, &format!("/Task/{focal_id}"), &bob, note, None)
            .await
            .0,
        StatusCode::OK
    );

    let resume_id = id_of(
        &server
            .create_task(&request(
                "resume",
                Some(&focal_ref),
                "Practitioner/bob",
                "consent given",
            ))
            .await,
    );
    let (status, body) = set_status(&server, &resume_id, &bob, "completed").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, resumed) = server.get(&format!("/Task/{focal_id}"), &bob).await;
    assert_eq!(
        resumed["status"], "in-progress",
        "the status before the hold, not accepted"
    );
    assert_eq!(resumed["statusReason"]["text"], "consent given");
    assert_eq!(resumed["note"][0]["text"], "consent form sent");
    assert_eq!(
        history_statuses(&server, &focal_id).await,
        [
            "in-progress",
            "on-hold",
            "on-hold",
            "in-progress",
            "accepted"
        ]
    );

    // A resume needs a Task on hold.
    let (status, body) = server
        .post_json(
            "/Task",
            &server.admin(),
            &request("resume", Some(&focal_ref), "Practitioner/bob", "again"),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn invalid_requests_are_refused_and_nothing_is_stored() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let alice = server.practitioner("Practitioner/alice");
    let open = id_of(
        &server
            .create_task(&task("in-progress", Some("Practitioner/bob")))
            .await,
    );
    let done = id_of(
        &server
            .create_task(&task("completed", Some("Practitioner/bob")))
            .await,
    );
    let gone = id_of(
        &server
            .create_task(&task("in-progress", Some("Practitioner/bob")))
            .await,
    );
    let r = server
        .request(Method::DELETE, &format!("/Task/{gone}"), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let stored = task_count(&server).await;

    let bob = "Practitioner/bob";
    let open_ref = format!("Task/{open}");
    let cases: Vec<(&str, &str, Value, StatusCode, &str)> = vec![
        (
            "missing focus",
            &admin,
            request("abort", None, bob, "x"),
            StatusCode::BAD_REQUEST,
            "required",
        ),
        (
            "focus not a Task",
            &admin,
            request("abort", Some("ServiceRequest/sr1"), bob, "x"),
            StatusCode::BAD_REQUEST,
            "value",
        ),
        (
            "focus on another server",
            &admin,
            request(
                "suspend",
                Some("https://elsewhere.example/fhir/Task/1"),
                bob,
                "x",
            ),
            StatusCode::BAD_REQUEST,
            "value",
        ),
        (
            "focal Task missing",
            &admin,
            request("abort", Some("Task/no-such-task"), bob, "x"),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            "focal Task deleted",
            &admin,
            request("abort", Some(&format!("Task/{gone}")), bob, "x"),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            "focal Task terminal",
            &admin,
            request("abort", Some(&format!("Task/{done}")), bob, "x"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
        ),
        (
            "resume of a Task not on hold",
            &admin,
            request("resume", Some(&open_ref), bob, "x"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
        ),
        (
            "not addressed to the focal owner",
            &admin,
            request("abort", Some(&open_ref), "Practitioner/carol", "x"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
        ),
        (
            "focal Task the practitioner cannot read",
            &alice,
            request("abort", Some(&open_ref), "Practitioner/alice", "x"),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "a request for someone else (role rules)",
            &alice,
            request("abort", Some(&open_ref), bob, "x"),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
    ];
    for (label, token, body, expected, code) in cases {
        let (status, outcome) = server.post_json("/Task", token, &body).await;
        assert_eq!(status, expected, "{label}: {outcome}");
        assert_outcome(&outcome, code);
    }
    assert_eq!(task_count(&server).await, stored, "nothing was stored");
    assert_eq!(
        state_of(&server, &open).await,
        ("in-progress".into(), "1".into())
    );
    server.stop().await;
}

#[tokio::test]
async fn completing_a_request_fails_when_its_focal_task_changed_meanwhile() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let bob = server.practitioner("Practitioner/bob");
    let new_pair = || async {
        let focal = id_of(
            &server
                .create_task(&task("in-progress", Some("Practitioner/bob")))
                .await,
        );
        let abort = id_of(
            &server
                .create_task(&request(
                    "abort",
                    Some(&format!("Task/{focal}")),
                    "Practitioner/bob",
                    "stop",
                ))
                .await,
        );
        (focal, abort)
    };

    // The focal Task was completed meanwhile: 422, the request stays as it was.
    let (focal, abort) = new_pair().await;
    assert_eq!(
        set_status(&server, &focal, &admin, "completed").await.0,
        StatusCode::OK
    );
    let (status, body) = set_status(&server, &abort, &bob, "completed").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_outcome(&body, "business-rule");
    assert_eq!(
        state_of(&server, &abort).await,
        ("requested".into(), "1".into())
    );
    assert_eq!(
        state_of(&server, &focal).await,
        ("completed".into(), "2".into())
    );
    // Rejecting it is still possible.
    assert_eq!(
        set_status(&server, &abort, &bob, "rejected").await.0,
        StatusCode::OK
    );

    // The focal Task was deleted meanwhile: 409.
    let (focal, abort) = new_pair().await;
    let r = server
        .request(Method::DELETE, &format!("/Task/{focal}"), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, body) = set_status(&server, &abort, &bob, "completed").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_outcome(&body, "conflict");
    assert_eq!(
        state_of(&server, &abort).await,
        ("requested".into(), "1".into())
    );

    // The request was handed to someone who does not own the focal Task: completing it
    // would let them change a Task they may not touch, so it is refused.
    let (focal, abort) = new_pair().await;
    let (_, mut readdressed) = server.get(&format!("/Task/{abort}"), &admin).await;
    readdressed["owner"] = json!({ "reference": "Practitioner/mallory" });
    assert_eq!(
        server
            .put_json(&format!("/Task/{abort}"), &admin, &readdressed)
            .await
            .0,
        StatusCode::OK
    );
    let mallory = server.practitioner("Practitioner/mallory");
    let (status, body) = set_status(&server, &abort, &mallory, "completed").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        state_of(&server, &focal).await,
        ("in-progress".into(), "1".into())
    );
    assert_eq!(state_of(&server, &abort).await.0, "requested");
    server.stop().await;
}

#[tokio::test]
async fn sub_tasks_need_a_parent_the_caller_may_read() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let alice = server.practitioner("Practitioner/alice");
    let mine = id_of(
        &server
            .create_task(&task("in-progress", Some("Practitioner/alice")))
            .await,
    );
    let bobs = id_of(
        &server
            .create_task(&task("in-progress", Some("Practitioner/bob")))
            .await,
    );
    let deleted = id_of(
        &server
            .create_task(&task("in-progress", Some("Practitioner/alice")))
            .await,
    );
    let r = server
        .request(Method::DELETE, &format!("/Task/{deleted}"), &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let stored = task_count(&server).await;

    let child = |parent: &str| {
        let mut t = task("requested", Some("Practitioner/alice"));
        t["partOf"] = json!([{ "reference": parent }]);
        t
    };
    let cases = [
        (
            "missing parent",
            "Task/no-such-task".to_string(),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            "deleted parent",
            format!("Task/{deleted}"),
            StatusCode::NOT_FOUND,
            "not-found",
        ),
        (
            "unreadable parent",
            format!("Task/{bobs}"),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "parent on another server",
            "https://elsewhere.example/fhir/Task/1".to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
        ),
    ];
    for (label, parent, expected, code) in &cases {
        let (status, outcome) = server.post_json("/Task", &alice, &child(parent)).await;
        assert_eq!(status, *expected, "{label}: {outcome}");
        assert_outcome(&outcome, code);
    }
    assert_eq!(task_count(&server).await, stored, "nothing was stored");

    // Under her own Task it works, and the same checks guard moving it by update or patch.
    let (status, created) = server
        .post_json("/Task", &alice, &child(&format!("Task/{mine}")))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let child_id = id_of(&created);
    let mut moved = created.clone();
    moved["partOf"] = json!([{ "reference": format!("Task/{bobs}") }]);
    let (status, outcome) = server
        .put_json(&format!("/Task/{child_id}"), &alice, &moved)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{outcome}");
    let (status, outcome) = patch(
        &server,
        &format!("/Task/{child_id}"),
        &alice,
        json!([{ "op": "add", "path": "/partOf/-", "value": { "reference": "Task/no-such-task" } }]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{outcome}");
    let (status, outcome) = patch(
        &server,
        &format!("/Task/{child_id}"),
        &alice,
        json!([{ "op": "add", "path": "/partOf/-", "value": { "reference": format!("Task/{child_id}") } }]),
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a Task is not its own parent: {outcome}"
    );
    assert_eq!(
        state_of(&server, &child_id).await.1,
        "1",
        "no refused change was stored"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_sub_task_tree_comes_back_in_one_search() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let mut coordination = task("in-progress", None);
    coordination["intent"] = json!("plan");
    let root = id_of(&server.create_task(&coordination).await);
    let sub_task = |parent: &str| {
        let mut t = task("requested", None);
        t["partOf"] = json!([{ "reference": format!("Task/{parent}") }]);
        t
    };
    let draw = id_of(&server.create_task(&sub_task(&root)).await);
    let analyse = id_of(&server.create_task(&sub_task(&root)).await);
    let aliquot = id_of(&server.create_task(&sub_task(&draw)).await);
    let unrelated = id_of(&server.create_task(&task("requested", None)).await);

    let (status, bundle) = server
        .get(
            &format!("/Task?_id={root}&_revinclude:iterate=Task:part-of"),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(match_ids(&bundle), vec![root.clone()]);
    let included: BTreeSet<String> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "include")
        .map(|e| id_of(&e["resource"]))
        .collect();
    assert_eq!(
        included,
        BTreeSet::from([draw.clone(), analyse, aliquot.clone()])
    );
    assert!(!included.contains(&unrelated));

    // Without :iterate only the direct children come back.
    let (_, bundle) = server
        .get(
            &format!("/Task?_id={root}&_revinclude=Task:part-of"),
            &admin,
        )
        .await;
    let direct = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "include")
        .count();
    assert_eq!(direct, 2);
    server.stop().await;
}

#[tokio::test]
async fn role_queues_show_work_by_performer_type_and_a_race_has_one_winner() {
    let server = TestServer::start().await;
    let lab = format!("{PERFORMER_TYPES}|lab");
    let alice = server.practitioner_with_types("Practitioner/alice", &[&lab]);
    let bob = server.practitioner_with_types("Practitioner/bob", &[&lab]);
    let carol = server.practitioner_with_types(
        "Practitioner/carol",
        &[&format!("{PERFORMER_TYPES}|radiology")],
    );
    let work = id_of(&server.create_task(&queued("lab")).await);
    let scan = id_of(&server.create_task(&queued("radiology")).await);

    let queue = "owner:missing=true&status=requested";
    assert_eq!(server.search_ids(queue, &alice).await, vec![work.clone()]);
    assert_eq!(server.search_ids(queue, &bob).await, vec![work.clone()]);
    assert_eq!(server.search_ids(queue, &carol).await, vec![scan.clone()]);
    assert_eq!(
        server.get(&format!("/Task/{work}"), &carol).await.0,
        StatusCode::FORBIDDEN
    );

    // Both claim version 1 at once: exactly one wins, the other is told its version is stale.
    let path = format!("/Task/{work}");
    let claim = |user: &'static str, token: &str| {
        let (server, path, token) = (&server, path.clone(), token.to_string());
        async move {
            let claim = json!([
                { "op": "add", "path": "/owner", "value": { "reference": user } },
                { "op": "replace", "path": "/status", "value": "accepted" },
            ]);
            patch(server, &path, &token, claim, Some("1")).await
        }
    };
    let (a, b) = tokio::join!(
        claim("Practitioner/alice", &alice),
        claim("Practitioner/bob", &bob)
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
        "{a:?} {b:?}"
    );
    let (winner, loser) = if a.0 == StatusCode::OK {
        (&alice, &bob)
    } else {
        (&bob, &alice)
    };
    let lost = if a.0 == StatusCode::OK { &b.1 } else { &a.1 };
    assert_outcome(lost, "conflict");

    // The claimed Task has left the queue: the loser no longer sees it, the winner does.
    assert!(server.search_ids(queue, &alice).await.is_empty());
    assert_eq!(
        server.get(&format!("/Task/{work}"), loser).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        server.get(&format!("/Task/{work}"), winner).await.0,
        StatusCode::OK
    );

    // Releasing the claim returns it to the queue for everyone of that type.
    let release = json!([
        { "op": "remove", "path": "/owner" },
        { "op": "replace", "path": "/status", "value": "requested" },
    ]);
    let (status, body) = patch(&server, &format!("/Task/{work}"), winner, release, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(server.search_ids(queue, loser).await, vec![work.clone()]);
    server.stop().await;
}

#[tokio::test]
async fn completing_an_abort_request_notifies_about_both_tasks() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let bob = server.practitioner("Practitioner/bob");
    let (status, created) = server
        .post_json(
            "/Subscription",
            &admin,
            &subscription(
                &server.base,
                "task-status-changed",
                &[],
                &receiver.url,
                "full-resource",
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let subscription_id = id_of(&created);
    eventually("an active subscription", || async {
        let (_, s) = server
            .get(&format!("/Subscription/{subscription_id}"), &admin)
            .await;
        (s["status"] == "active").then_some(())
    })
    .await;

    let focal = id_of(
        &server
            .create_task(&task("in-progress", Some("Practitioner/bob")))
            .await,
    );
    let abort = id_of(
        &server
            .create_task(&request(
                "abort",
                Some(&format!("Task/{focal}")),
                "Practitioner/bob",
                "no longer needed",
            ))
            .await,
    );
    let (status, body) = set_status(&server, &abort, &bob, "completed").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Every (Task id, status) the subscriber was told about.
    let told = || -> BTreeSet<(String, String)> {
        receiver
            .of(&subscription_id, "event-notification")
            .iter()
            .flat_map(|r| r.body["entry"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["resource"]["resourceType"] == "Task")
            .map(|e| {
                (
                    id_of(&e["resource"]),
                    e["resource"]["status"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    receiver
        .wait_for("both Tasks' changes", |_| {
            let told = told();
            told.contains(&(abort.clone(), "completed".into()))
                && told.contains(&(focal.clone(), "cancelled".into()))
        })
        .await;
    let numbers = receiver.event_numbers(&subscription_id);
    let mut sorted = numbers.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        numbers, sorted,
        "numbered in order, none twice: {numbers:?}"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Immutable elements

/// Asserts a refusal whose OperationOutcome names `expression`.
fn assert_refused_at(status: StatusCode, body: &Value, expected: StatusCode, expression: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert_eq!(body["issue"][0]["expression"][0], expression, "{body}");
}

async fn patch_as(
    server: &TestServer,
    id: &str,
    token: &str,
    content_type: &str,
    document: &Value,
) -> (StatusCode, Value) {
    let request = server
        .request(Method::PATCH, &format!("/Task/{id}"), token)
        .header("content-type", content_type)
        .body(document.to_string());
    common::body(request.send().await.unwrap()).await
}

#[tokio::test]
async fn intent_and_authored_on_never_change_and_request_elements_only_for_the_placer() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let bob = server.practitioner("Practitioner/bob");
    let mut new = task("requested", Some("Practitioner/bob"));
    new["requester"] = json!({ "reference": "Practitioner/placer" });
    new["for"] = json!({ "reference": "Patient/p1" });
    new["priority"] = json!("routine");
    new["authoredOn"] = json!("2026-01-05T10:00:00Z");
    let created = server.create_task(&new).await;
    let id = id_of(&created);
    let path = format!("/Task/{id}");

    // PUT changing intent: refused for everyone, the admin included (the issue's own case).
    let mut plan = created.clone();
    plan["intent"] = json!("plan");
    for token in [&admin, &bob] {
        let (status, body) = server.put_json(&path, token, &plan).await;
        assert_refused_at(
            status,
            &body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "Task.intent",
        );
    }
    // Every patch form, too.
    let fhirpath = json!({ "resourceType": "Parameters", "parameter": [{ "name": "operation", "part": [
        { "name": "type", "valueCode": "replace" },
        { "name": "path", "valueString": "Task.intent" },
        { "name": "value", "valueCode": "plan" },
    ]}]});
    #[rustfmt::skip]
    let patches = [
        ("application/json-patch+json", json!([{ "op": "replace", "path": "/intent", "value": "plan" }]), "Task.intent"),
        ("application/merge-patch+json", json!({ "intent": "proposal" }), "Task.intent"),
        ("application/fhir+json", fhirpath, "Task.intent"),
        ("application/json-patch+json", json!([{ "op": "remove", "path": "/authoredOn" }]), "Task.authoredOn"),
    ];
    for (content_type, document, expression) in &patches {
        let (status, body) = patch_as(&server, &id, &admin, content_type, document).await;
        assert_refused_at(status, &body, StatusCode::UNPROCESSABLE_ENTITY, expression);
    }

    // The fulfiller may not rewrite what the placer asked for...
    #[rustfmt::skip]
    let fulfiller_patches = [
        (json!([{ "op": "replace", "path": "/priority", "value": "stat" }]), "Task.priority"),
        (json!([{ "op": "replace", "path": "/for", "value": { "reference": "Patient/p2" } }]), "Task.for"),
        (json!([{ "op": "remove", "path": "/requester" }]), "Task.requester"),
        (json!([{ "op": "add", "path": "/basedOn", "value": [{ "reference": "ServiceRequest/s1" }] }]), "Task.basedOn"),
    ];
    for (document, expression) in &fulfiller_patches {
        let (status, body) =
            patch_as(&server, &id, &bob, "application/json-patch+json", document).await;
        assert_refused_at(status, &body, StatusCode::FORBIDDEN, expression);
    }
    let mut moved = created.clone();
    moved["for"] = json!({ "reference": "Patient/p2" });
    let (status, body) = server.put_json(&path, &bob, &moved).await;
    assert_refused_at(status, &body, StatusCode::FORBIDDEN, "Task.for");
    // ...nor through a transaction entry; the transaction stores nothing.
    let other = server
        .create_task(&task("requested", Some("Practitioner/bob")))
        .await;
    let mut other_done = other.clone();
    other_done["status"] = json!("accepted");
    let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        { "resource": other_done, "request": { "method": "PUT", "url": format!("Task/{}", id_of(&other)) } },
        { "resource": moved, "request": { "method": "PUT", "url": format!("Task/{id}") } },
    ]});
    let (status, body) = server.post_json("", &bob, &bundle).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        body["issue"][0]["expression"][0], "Bundle.entry[1]",
        "{body}"
    );
    assert!(
        body["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| d.contains("(Task.for)")),
        "{body}"
    );
    assert_eq!(state_of(&server, &id_of(&other)).await.1, "1");
    assert_eq!(
        state_of(&server, &id).await,
        ("requested".into(), "1".into())
    );

    // What the fulfiller reports is its own to change.
    let (status, body) = patch_as(
        &server,
        &id,
        &bob,
        "application/merge-patch+json",
        &json!({ "status": "in-progress", "businessStatus": { "text": "sample drawn" },
                 "note": [{ "text": "called the patient" }] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The placer (the admin, or the practitioner named as requester) may change the request.
    let (status, body) = patch_as(
        &server,
        &id,
        &admin,
        "application/json-patch+json",
        &json!([{ "op": "replace", "path": "/priority", "value": "urgent" }]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let carol = server.practitioner("Practitioner/carol");
    let mut own = task("requested", Some("Practitioner/carol"));
    own["requester"] = json!({ "reference": "Practitioner/carol" });
    let own = server.create_task(&own).await;
    let (status, body) = patch_as(
        &server,
        &id_of(&own),
        &carol,
        "application/json-patch+json",
        &json!([{ "op": "add", "path": "/priority", "value": "asap" }]),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(history_statuses(&server, &id).await.len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Modification requests

const CHANGE: &str = "https://baton.dev/fhir/CodeSystem/task-change";

/// A modification request about `focus` (a Task reference, maybe with a version), owned by
/// the focal Task's owner and asked by `requester`, with these inputs.
fn change_request(focus: &str, owner: &str, requester: &str, inputs: Value) -> Value {
    json!({
        "resourceType": "Task", "status": "requested", "intent": "order",
        "code": { "coding": [{ "system": TASK_CODE, "code": "change" }] },
        "focus": { "reference": focus },
        "owner": { "reference": owner },
        "requester": { "reference": requester },
        "input": inputs,
    })
}

fn edit(element: &str, value_key: &str, value: Value) -> Value {
    json!({ "type": { "coding": [{ "system": CHANGE, "code": element }] }, value_key: value })
}

/// A listener: a rest-hook subscription to `task-changed` made with `token`, active.
async fn listen(server: &TestServer, token: &str, receiver: &Receiver, filters: &[&str]) -> String {
    let (status, created) = server
        .post_json(
            "/Subscription",
            token,
            &subscription(
                &server.base,
                "task-changed",
                filters,
                &receiver.url,
                "full-resource",
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = id_of(&created);
    eventually("an active subscription", || async {
        let (_, s) = server.get(&format!("/Subscription/{id}"), token).await;
        (s["status"] == "active").then_some(())
    })
    .await;
    id
}

/// Every (Task id, version, status) a subscription was told about.
fn told(receiver: &Receiver, subscription: &str) -> BTreeSet<(String, String, String)> {
    receiver
        .of(subscription, "event-notification")
        .iter()
        .flat_map(|r| r.body["entry"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["resource"]["resourceType"] == "Task")
        .map(|e| {
            let t = &e["resource"];
            (
                id_of(t),
                t["meta"]["versionId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                t["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn modification_requests_change_the_focal_task_only_when_the_other_side_completes_them() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let bob = server.practitioner("Practitioner/bob");
    let carol = server.practitioner("Practitioner/carol");
    let placer_listens = listen(&server, &admin, &receiver, &[]).await;
    let bob_listens = listen(&server, &bob, &receiver, &[]).await;
    let carol_listens = listen(&server, &carol, &receiver, &[]).await;
    // "Modification requests addressed to me".
    let bob_requests = listen(
        &server,
        &bob,
        &receiver,
        &[&format!("code={TASK_CODE}|change&owner=Practitioner/bob")],
    )
    .await;

    let mut focal = task("in-progress", Some("Practitioner/bob"));
    focal["requester"] = json!({ "reference": "Practitioner/placer" });
    focal["priority"] = json!("routine");
    focal["input"] = json!([{ "type": { "coding": [{ "system": "http://loinc.org", "code": "1975-2" }] },
                              "valueString": "non-fasting" }]);
    let focal = id_of(&server.create_task(&focal).await);
    let focal_ref = format!("Task/{focal}");

    // 1. The placer asks for a higher priority and an earlier deadline; the fulfiller agrees.
    let asked = server
        .create_task(&change_request(
            &focal_ref,
            "Practitioner/bob",
            "Practitioner/placer",
            json!([
                edit("priority", "valueCode", json!("stat")),
                edit(
                    "restriction-period",
                    "valuePeriod",
                    json!({ "end": "2026-12-31T17:00:00Z" })
                ),
            ]),
        ))
        .await;
    let asked = id_of(&asked);
    assert_eq!(
        state_of(&server, &focal).await.1,
        "1",
        "asking changes nothing"
    );
    let (status, body) = set_status(&server, &asked, &bob, "completed").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, changed) = server.get(&format!("/Task/{focal}"), &bob).await;
    assert_eq!(changed["priority"], "stat", "{changed}");
    assert_eq!(
        changed["restriction"]["period"]["end"],
        "2026-12-31T17:00:00Z"
    );
    assert_eq!(changed["meta"]["versionId"], "2");
    assert_eq!(changed["status"], "in-progress");

    // 2. The fulfiller asks for a new description; it cannot approve its own request, and the
    //    placer rejects it: the focal Task stays as it is.
    let mut own = change_request(
        &focal_ref,
        "Practitioner/bob",
        "Practitioner/bob",
        json!([edit("description", "valueString", json!("draw at home"))]),
    );
    let (status, body) = server.post_json("/Task", &bob, &own).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let refused = id_of(&body);
    let (status, body) = set_status(&server, &refused, &bob, "completed").await;
    assert_refused_at(status, &body, StatusCode::FORBIDDEN, "Task.status");
    let (status, body) = set_status(&server, &refused, &admin, "rejected").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        state_of(&server, &focal).await,
        ("in-progress".into(), "2".into())
    );

    // 3. The fulfiller asks again, against version 2; the placer's approval races the
    //    fulfiller's own update of the focal Task made against the same version: one wins.
    own["focus"] = json!({ "reference": format!("{focal_ref}/_history/2") });
    own["input"] = json!([{
        "type": { "coding": [{ "system": CHANGE, "code": "input" }, { "system": "http://loinc.org", "code": "1975-2" }] },
        "valueString": "fasting",
    }]);
    let (status, body) = server.post_json("/Task", &bob, &own).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let racing = id_of(&body);
    let focal_path = format!("/Task/{focal}");
    let approve = set_status(&server, &racing, &admin, "completed");
    let update = patch(
        &server,
        &focal_path,
        &bob,
        json!([{ "op": "add", "path": "/businessStatus", "value": { "text": "sample drawn" } }]),
        Some("2"),
    );
    let ((approved, approve_body), (updated, update_body)) = tokio::join!(approve, update);
    let (_, after) = server.get(&format!("/Task/{focal}"), &admin).await;
    assert_eq!(
        after["meta"]["versionId"], "3",
        "exactly one write: {after}"
    );
    match (approved, updated) {
        (StatusCode::OK, StatusCode::PRECONDITION_FAILED) => {
            assert_eq!(after["input"][0]["valueString"], "fasting");
            assert!(after.get("businessStatus").is_none());
        }
        (StatusCode::CONFLICT, StatusCode::OK) => {
            assert_eq!(after["input"][0]["valueString"], "non-fasting");
            assert_eq!(after["businessStatus"]["text"], "sample drawn");
            assert_eq!(state_of(&server, &racing).await.0, "requested");
        }
        other => panic!("not one winner: {other:?} {approve_body} {update_body}"),
    }

    // Both sides heard of every step that concerns them; the other practitioner of nothing.
    receiver
        .wait_for("the placer and the fulfiller told", |_| {
            let placer = told(&receiver, &placer_listens);
            let fulfiller = told(&receiver, &bob_listens);
            let seen = |set: &BTreeSet<(String, String, String)>, id: &str, status: &str| {
                set.iter().any(|(i, _, s)| i == id && s == status)
            };
            [&placer, &fulfiller].iter().all(|set| {
                seen(set, &asked, "completed")
                    && seen(set, &refused, "rejected")
                    && set.contains(&(focal.clone(), "2".into(), "in-progress".into()))
                    && set.iter().any(|(i, v, _)| i == &focal && v == "3")
            })
        })
        .await;
    assert!(
        receiver.of(&carol_listens, "event-notification").is_empty(),
        "carol was told about Tasks that are not hers"
    );
    receiver
        .wait_for("the requests addressed to Bob", |_| {
            let requests = told(&receiver, &bob_requests);
            requests.contains(&(asked.clone(), "1".into(), "requested".into()))
                && requests.contains(&(asked.clone(), "2".into(), "completed".into()))
        })
        .await;
    let requests = told(&receiver, &bob_requests);
    assert!(
        requests
            .iter()
            .all(|(id, _, _)| [&asked, &refused, &racing].contains(&id)),
        "only modification requests: {requests:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_modification_requests_are_refused_and_nothing_changes() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let bob = server.practitioner("Practitioner/bob");
    let carol = server.practitioner("Practitioner/carol");
    let focal = id_of(
        &server
            .create_task(&task("in-progress", Some("Practitioner/bob")))
            .await,
    );
    let finished = id_of(
        &server
            .create_task(&task("completed", Some("Practitioner/bob")))
            .await,
    );
    let focal_ref = format!("Task/{focal}");
    let priority = || json!([edit("priority", "valueCode", json!("urgent"))]);
    let before = task_count(&server).await;
    #[rustfmt::skip]
    let cases: Vec<(&str, &String, Value, StatusCode, &str)> = vec![
        ("an immutable element", &admin,
            change_request(&focal_ref, "Practitioner/bob", "Practitioner/placer", json!([edit("intent", "valueCode", json!("plan"))])),
            StatusCode::UNPROCESSABLE_ENTITY, "Task.input[0]"),
        ("an element it does not set", &admin,
            change_request(&focal_ref, "Practitioner/bob", "Practitioner/placer", json!([edit("status", "valueCode", json!("completed"))])),
            StatusCode::BAD_REQUEST, "Task.input[0].type"),
        ("no change at all", &admin,
            change_request(&focal_ref, "Practitioner/bob", "Practitioner/placer", json!([])),
            StatusCode::BAD_REQUEST, "Task.input"),
        ("a finished focal Task", &admin,
            change_request(&format!("Task/{finished}"), "Practitioner/bob", "Practitioner/placer", priority()),
            StatusCode::UNPROCESSABLE_ENTITY, "Task.focus"),
        ("addressed to someone else", &admin,
            change_request(&focal_ref, "Practitioner/carol", "Practitioner/placer", priority()),
            StatusCode::UNPROCESSABLE_ENTITY, "Task.owner"),
        ("asked in someone else's name", &bob,
            change_request(&focal_ref, "Practitioner/bob", "Practitioner/placer", priority()),
            StatusCode::FORBIDDEN, "Task.requester"),
        ("against an old version", &admin,
            change_request(&format!("{focal_ref}/_history/7"), "Practitioner/bob", "Practitioner/placer", priority()),
            StatusCode::CONFLICT, "Task.focus"),
        ("a focal Task the asker may not read", &carol,
            change_request(&focal_ref, "Practitioner/carol", "Practitioner/carol", priority()),
            StatusCode::FORBIDDEN, "Task.focus"),
    ];
    for (label, token, body, expected, expression) in &cases {
        let (status, answer) = server.post_json("/Task", token, body).await;
        assert_eq!(status, *expected, "{label}: {answer}");
        assert_eq!(
            answer["issue"][0]["expression"][0], *expression,
            "{label}: {answer}"
        );
    }
    // Created completed by the one who asked: an answer to its own request.
    let mut self_approved = change_request(
        &focal_ref,
        "Practitioner/bob",
        "Practitioner/bob",
        priority(),
    );
    self_approved["status"] = json!("completed");
    let (status, answer) = server.post_json("/Task", &bob, &self_approved).await;
    assert_refused_at(status, &answer, StatusCode::FORBIDDEN, "Task.status");
    assert_eq!(task_count(&server).await, before, "nothing stored");

    // An answer by someone who was not asked, and a requester rewritten to turn it around.
    let asked = id_of(
        &server
            .create_task(&change_request(
                &focal_ref,
                "Practitioner/bob",
                "Practitioner/bob",
                priority(),
            ))
            .await,
    );
    let (status, _) = set_status(&server, &asked, &carol, "completed").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, answer) = patch(
        &server,
        &format!("/Task/{asked}"),
        &admin,
        json!([{ "op": "replace", "path": "/requester", "value": { "reference": "Practitioner/placer" } }]),
        None,
    )
    .await;
    assert_refused_at(
        status,
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Task.requester",
    );
    // The focal Task finished meanwhile: approving is refused, and nothing changes.
    let (status, _) = set_status(&server, &focal, &bob, "completed").await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = set_status(&server, &asked, &admin, "completed").await;
    assert_refused_at(
        status,
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Task.focus",
    );
    assert_eq!(
        state_of(&server, &focal).await,
        ("completed".into(), "2".into())
    );
    assert_eq!(
        state_of(&server, &asked).await,
        ("requested".into(), "1".into())
    );
    // Withdrawing is the asker's.
    let (status, answer) = set_status(&server, &asked, &bob, "cancelled").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

// ---------------------------------------------------------------------------------------------
// The fulfiller needs more information

const WORKFLOW_TASK: &str = "https://baton.dev/fhir/CodeSystem/workflow-task";

fn information_request(coordination: &str, placer: &str, asker: &str) -> Value {
    json!({
        "resourceType": "Task", "status": "requested", "intent": "order",
        "code": { "coding": [{ "system": WORKFLOW_TASK, "code": "information-request" }] },
        "focus": { "reference": format!("Task/{coordination}") },
        "owner": { "reference": placer },
        "requester": { "reference": asker },
        "input": [{ "type": { "text": "questionnaire" },
                    "valueCanonical": "http://forms.example/Questionnaire/allergies" }],
    })
}

#[tokio::test]
async fn a_fulfiller_asks_its_placer_for_information_and_the_answer_reaches_it() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let placer = server.practitioner("Practitioner/placer");
    let bob = server.practitioner("Practitioner/bob");
    let carol = server.practitioner("Practitioner/carol");
    // "Information requests addressed to me", and the fulfiller's and a bystander's work.
    let placer_listens = listen(
        &server,
        &placer,
        &receiver,
        &[&format!(
            "code={WORKFLOW_TASK}|information-request&owner=Practitioner/placer"
        )],
    )
    .await;
    let bob_listens = listen(&server, &bob, &receiver, &[]).await;
    let carol_listens = listen(&server, &carol, &receiver, &[]).await;

    let mut coordination = task("in-progress", Some("Practitioner/bob"));
    coordination["intent"] = json!("plan");
    coordination["requester"] = json!({ "reference": "Practitioner/placer" });
    coordination["businessStatus"] = json!({ "text": "theatre booked" });
    let coordination = id_of(&server.create_task(&coordination).await);
    // The placer's own Task that is no information request: not for that subscription.
    server
        .create_task(&task("requested", Some("Practitioner/placer")))
        .await;

    // Bad questions first: nothing is stored.
    let before = task_count(&server).await;
    let no_question = {
        let mut q = information_request(&coordination, "Practitioner/placer", "Practitioner/bob");
        q.as_object_mut().unwrap().remove("input");
        q
    };
    #[rustfmt::skip]
    let cases: Vec<(&str, &String, Value, StatusCode, &str)> = vec![
        ("no question", &bob, no_question, StatusCode::BAD_REQUEST, "Task.input"),
        ("not to the placer", &bob, information_request(&coordination, "Practitioner/carol", "Practitioner/bob"),
            StatusCode::UNPROCESSABLE_ENTITY, "Task.owner"),
        ("in someone else's name", &bob, information_request(&coordination, "Practitioner/placer", "Practitioner/carol"),
            StatusCode::FORBIDDEN, "Task.requester"),
        ("about a Task the asker does not hold", &carol, information_request(&coordination, "Practitioner/placer", "Practitioner/carol"),
            StatusCode::FORBIDDEN, "Task.focus"),
    ];
    for (label, token, body, expected, expression) in &cases {
        let (status, answer) = server.post_json("/Task", token, body).await;
        assert_refused_at(status, &answer, *expected, expression);
        let _ = label;
    }
    assert_eq!(task_count(&server).await, before);
    assert_eq!(state_of(&server, &coordination).await.1, "1");

    // Bob asks; his coordination Task shows that it waits, in the same transaction.
    let (status, asked) = server
        .post_json(
            "/Task",
            &bob,
            &information_request(&coordination, "Practitioner/placer", "Practitioner/bob"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let question = id_of(&asked);
    let (_, waiting) = server.get(&format!("/Task/{coordination}"), &bob).await;
    assert_eq!(
        waiting["businessStatus"]["coding"][0]["code"], "waiting-for-information",
        "{waiting}"
    );
    assert_eq!(waiting["meta"]["versionId"], "2");
    // Bob reads his question, and Carol does not; only the placer answers it.
    let (status, _) = server.get(&format!("/Task/{question}"), &bob).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.get(&format!("/Task/{question}"), &carol).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = set_status(&server, &question, &bob, "completed").await;
    assert_refused_at(status, &body, StatusCode::FORBIDDEN, "Task.status");
    // An answer without output is no answer.
    let (status, body) = set_status(&server, &question, &placer, "completed").await;
    assert_refused_at(status, &body, StatusCode::BAD_REQUEST, "Task.output");
    assert_eq!(
        state_of(&server, &question).await,
        ("requested".into(), "1".into())
    );

    let (status, body) = patch(
        &server,
        &format!("/Task/{question}"),
        &placer,
        json!([
            { "op": "replace", "path": "/status", "value": "completed" },
            { "op": "add", "path": "/output", "value": [{ "type": { "text": "answers" },
              "valueReference": { "reference": "QuestionnaireResponse/r1" } }] },
        ]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The answer reaches Bob's Task, and its business status is what it was before it waited.
    let (_, answered) = server.get(&format!("/Task/{coordination}"), &bob).await;
    assert_eq!(
        answered["businessStatus"],
        json!({ "text": "theatre booked" }),
        "{answered}"
    );
    assert!(answered.get("extension").is_none(), "{answered}");
    assert_eq!(
        answered["input"][0]["valueReference"]["reference"], "QuestionnaireResponse/r1",
        "{answered}"
    );
    assert_eq!(answered["meta"]["versionId"], "3");

    receiver
        .wait_for("the placer asked and the fulfiller answered", |_| {
            let placer_told = told(&receiver, &placer_listens);
            let bob_told = told(&receiver, &bob_listens);
            placer_told.contains(&(question.clone(), "1".into(), "requested".into()))
                && placer_told.contains(&(question.clone(), "2".into(), "completed".into()))
                && bob_told.contains(&(coordination.clone(), "2".into(), "in-progress".into()))
                && bob_told.contains(&(coordination.clone(), "3".into(), "in-progress".into()))
        })
        .await;
    let placer_told = told(&receiver, &placer_listens);
    assert!(
        placer_told.iter().all(|(id, _, _)| id == &question),
        "only the information request: {placer_told:?}"
    );
    assert!(
        told(&receiver, &bob_listens)
            .iter()
            .all(|(id, _, _)| id == &coordination || id == &question),
        "Bob hears of his own Task and his question only"
    );
    assert!(receiver.of(&carol_listens, "event-notification").is_empty());
    let _ = admin;
    server.stop().await;
}

#[tokio::test]
async fn the_asker_reads_and_withdraws_its_information_request_and_nobody_else_sees_it() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let placer = server.practitioner("Practitioner/placer");
    let bob = server.practitioner("Practitioner/bob");
    let carol = server.practitioner("Practitioner/carol");
    let bob_listens = listen(&server, &bob, &receiver, &[]).await;
    let carol_listens = listen(&server, &carol, &receiver, &[]).await;

    let mut coordination = task("in-progress", Some("Practitioner/bob"));
    coordination["intent"] = json!("plan");
    coordination["requester"] = json!({ "reference": "Practitioner/placer" });
    coordination["businessStatus"] = json!({ "text": "theatre booked" });
    let coordination = id_of(&server.create_task(&coordination).await);
    let (status, asked) = server
        .post_json(
            "/Task",
            &bob,
            &information_request(&coordination, "Practitioner/placer", "Practitioner/bob"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{asked}");
    let question = id_of(&asked);

    // Bob and the placer read it, by id and by search; Carol sees nothing of it.
    let questions = format!("code={WORKFLOW_TASK}|information-request");
    for (token, expected) in [
        (&bob, StatusCode::OK),
        (&placer, StatusCode::OK),
        (&carol, StatusCode::FORBIDDEN),
    ] {
        let (status, _) = server.get(&format!("/Task/{question}"), token).await;
        assert_eq!(status, expected);
    }
    assert_eq!(
        server.search_ids(&questions, &bob).await,
        vec![question.clone()]
    );
    assert_eq!(
        server.search_ids(&questions, &placer).await,
        vec![question.clone()]
    );
    assert!(server.search_ids(&questions, &carol).await.is_empty());

    // Withdrawing is all Bob may do with it: each other change is refused, nothing changes.
    #[rustfmt::skip]
    let refusals: Vec<(&String, Value, StatusCode, &str)> = vec![
        (&bob, json!([{ "op": "replace", "path": "/status", "value": "completed" },
                      { "op": "add", "path": "/output", "value": [{ "type": { "text": "a" }, "valueString": "b" }] }]),
            StatusCode::FORBIDDEN, "Task.status"),
        (&bob, json!([{ "op": "replace", "path": "/status", "value": "cancelled" },
                      { "op": "replace", "path": "/input/0/valueCanonical", "value": "http://forms.example/Questionnaire/other" }]),
            StatusCode::FORBIDDEN, "Task.input"),
        (&bob, json!([{ "op": "replace", "path": "/status", "value": "cancelled" },
                      { "op": "replace", "path": "/owner", "value": { "reference": "Practitioner/bob" } }]),
            StatusCode::FORBIDDEN, "Task.owner"),
        (&carol, json!([{ "op": "replace", "path": "/status", "value": "cancelled" }]),
            StatusCode::FORBIDDEN, ""),
    ];
    for (token, operations, expected, expression) in &refusals {
        let (status, body) = patch(
            &server,
            &format!("/Task/{question}"),
            token,
            operations.clone(),
            None,
        )
        .await;
        if expression.is_empty() {
            assert_eq!(status, *expected, "{body}");
            assert_outcome(&body, "forbidden");
        } else {
            assert_refused_at(status, &body, *expected, expression);
        }
    }
    let response = server
        .request(Method::DELETE, &format!("/Task/{question}"), &bob)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        state_of(&server, &question).await,
        ("requested".into(), "1".into())
    );
    assert_eq!(state_of(&server, &coordination).await.1, "2");

    // Bob withdraws it: the coordination Task stops waiting, in the same transaction, and
    // shows its business status from before.
    let (status, body) = patch(
        &server,
        &format!("/Task/{question}"),
        &bob,
        json!([
            { "op": "replace", "path": "/status", "value": "cancelled" },
            { "op": "add", "path": "/statusReason", "value": { "text": "found it in the notes" } },
        ]),
        Some("1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, after) = server.get(&format!("/Task/{coordination}"), &bob).await;
    assert_eq!(after["meta"]["versionId"], "3", "{after}");
    assert_eq!(after["businessStatus"], json!({ "text": "theatre booked" }));
    // Withdrawn once is final.
    let (status, body) = set_status(&server, &question, &bob, "cancelled").await;
    assert_refused_at(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Task.status",
    );

    receiver
        .wait_for("Bob told of his question and of his Task", |_| {
            let bob_told = told(&receiver, &bob_listens);
            bob_told.contains(&(question.clone(), "1".into(), "requested".into()))
                && bob_told.contains(&(question.clone(), "2".into(), "cancelled".into()))
                && bob_told.contains(&(coordination.clone(), "3".into(), "in-progress".into()))
        })
        .await;
    assert!(receiver.of(&carol_listens, "event-notification").is_empty());
    let _ = admin;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Bidding

const BID: &str = "https://baton.dev/fhir/CodeSystem/bid";
const CANDIDATE: &str = "https://baton.dev/fhir/StructureDefinition/task-candidate";

fn bid(bidding: &str, owner: &str, willing: bool, extra: Value) -> Value {
    let mut output = vec![
        json!({ "type": { "coding": [{ "system": BID, "code": "willing" }] },
                                  "valueBoolean": willing }),
    ];
    output.extend(extra.as_array().cloned().unwrap_or_default());
    json!({
        "resourceType": "Task", "status": "requested", "intent": "proposal",
        "code": { "coding": [{ "system": WORKFLOW_TASK, "code": "bid" }] },
        "partOf": [{ "reference": format!("Task/{bidding}") }],
        "owner": { "reference": owner },
        "output": output,
    })
}

fn award(bid: &str) -> Value {
    json!([
        { "op": "replace", "path": "/status", "value": "completed" },
        { "op": "add", "path": "/output", "value": [{ "type": { "coding": [{ "system": BID, "code": "awarded" }] },
          "valueReference": { "reference": format!("Task/{bid}") } }] },
    ])
}

#[tokio::test]
async fn bidding_candidates_answer_alone_and_one_award_gives_the_work() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let surgeon = format!("{PERFORMER_TYPES}|surgeon");
    let bob = server.practitioner_with_types("Practitioner/bob", &[&surgeon]);
    let carol = server.practitioner_with_types("Practitioner/carol", &[&surgeon]);
    let dave = server.practitioner_with_types("Practitioner/dave", &[&surgeon]);
    let erin = server.practitioner_with_types("Practitioner/erin", &[&surgeon]);
    let eve = server.practitioner("Practitioner/eve");
    // "Answers to my bidding Tasks", for the placer system.
    let placer_listens = listen(
        &server,
        &admin,
        &receiver,
        &[&format!("code={WORKFLOW_TASK}|bid")],
    )
    .await;
    let bob_listens = listen(&server, &bob, &receiver, &[]).await;
    let carol_listens = listen(&server, &carol, &receiver, &[]).await;
    let eve_listens = listen(&server, &eve, &receiver, &[]).await;

    let coordination = id_of(
        &server
            .create_task(
                &json!({ "resourceType": "Task", "status": "requested", "intent": "plan",
                                  "description": "hip replacement, week 12" }),
            )
            .await,
    );
    let bidding = json!({
        "resourceType": "Task", "status": "requested", "intent": "proposal",
        "code": { "coding": [{ "system": WORKFLOW_TASK, "code": "bidding" }] },
        "focus": { "reference": format!("Task/{coordination}") },
        "performerType": [{ "coding": [{ "system": PERFORMER_TYPES, "code": "surgeon" }] }],
        "extension": [
            { "url": CANDIDATE, "valueReference": { "reference": "Practitioner/bob" } },
            { "url": CANDIDATE, "valueReference": { "reference": "Practitioner/carol" } },
            { "url": CANDIDATE, "valueReference": { "reference": "Practitioner/erin" } },
        ],
    });
    let (status, body) = server.post_json("/Task", &admin, &bidding).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let bidding_id = id_of(&body);

    // Each candidate answers; nobody sees another's bid.
    let (status, body) = server
        .post_json(
            "/Task",
            &bob,
            &bid(&bidding_id, "Practitioner/bob", true, json!([
                { "type": { "coding": [{ "system": BID, "code": "earliest-start" }] }, "valueDateTime": "2026-03-02" },
            ])),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let bob_bid = id_of(&body);
    let (status, body) = server
        .post_json(
            "/Task",
            &carol,
            &bid(&bidding_id, "Practitioner/carol", true, json!([
                { "type": { "coding": [{ "system": BID, "code": "cost" }] }, "valueMoney": { "value": 1200, "currency": "EUR" } },
            ])),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let carol_bid = id_of(&body);
    assert_eq!(
        server
            .search_ids(&format!("part-of=Task/{bidding_id}"), &bob)
            .await,
        vec![bob_bid.clone()]
    );
    assert_eq!(
        server
            .search_ids(&format!("part-of=Task/{bidding_id}"), &admin)
            .await
            .len(),
        2
    );

    // Answers by someone who was not asked, twice, or without saying whether: refused.
    let before = task_count(&server).await;
    #[rustfmt::skip]
    let refusals: Vec<(&String, Value, StatusCode, &str)> = vec![
        (&dave, bid(&bidding_id, "Practitioner/dave", true, json!([])), StatusCode::FORBIDDEN, "Task.owner"),
        (&eve, bid(&bidding_id, "Practitioner/eve", true, json!([])), StatusCode::FORBIDDEN, "Task.partOf[0]"),
        (&bob, bid(&bidding_id, "Practitioner/bob", false, json!([])), StatusCode::CONFLICT, "Task.partOf"),
        (&erin, { let mut b = bid(&bidding_id, "Practitioner/erin", true, json!([])); b["output"] = json!([]); b },
            StatusCode::BAD_REQUEST, "Task.output"),
    ];
    for (token, body, expected, expression) in &refusals {
        let (status, answer) = server.post_json("/Task", token, body).await;
        assert_refused_at(status, &answer, *expected, expression);
    }
    assert_eq!(task_count(&server).await, before);
    // An award to someone who did not bid: 422, nothing changes.
    let (status, answer) = patch(
        &server,
        &format!("/Task/{bidding_id}"),
        &admin,
        award(&coordination),
        None,
    )
    .await;
    assert_refused_at(
        status,
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Task.output",
    );
    assert_eq!(
        state_of(&server, &bidding_id).await,
        ("requested".into(), "1".into())
    );

    // Two awards race on the version they read: one wins, the other gets 412.
    let path = format!("/Task/{bidding_id}");
    let (first, second) = tokio::join!(
        patch(&server, &path, &admin, award(&bob_bid), Some("1")),
        patch(&server, &path, &admin, award(&carol_bid), Some("1")),
    );
    let (winner, loser, winner_token, loser_listens) = match (first.0, second.0) {
        (StatusCode::OK, StatusCode::PRECONDITION_FAILED) => {
            ("Practitioner/bob", &carol_bid, &bob, &carol_listens)
        }
        (StatusCode::PRECONDITION_FAILED, StatusCode::OK) => {
            ("Practitioner/carol", &bob_bid, &carol, &bob_listens)
        }
        other => panic!("not one winner: {other:?} {} {}", first.1, second.1),
    };
    let (_, awarded) = server
        .get(&format!("/Task/{coordination}"), winner_token)
        .await;
    assert_eq!(awarded["owner"]["reference"], winner, "{awarded}");
    assert_eq!(state_of(&server, loser).await.0, "rejected");
    assert_eq!(state_of(&server, &bidding_id).await.0, "completed");
    // A late answer finds the bidding closed.
    let (status, answer) = server
        .post_json(
            "/Task",
            &erin,
            &bid(&bidding_id, "Practitioner/erin", true, json!([])),
        )
        .await;
    assert_refused_at(status, &answer, StatusCode::CONFLICT, "Task.partOf");

    receiver
        .wait_for(
            "the placer told of every answer, each candidate of its own",
            |_| {
                let placer = told(&receiver, &placer_listens);
                let seen = |set: &BTreeSet<(String, String, String)>, id: &str, status: &str| {
                    set.iter().any(|(i, _, s)| i == id && s == status)
                };
                let loser_told = told(&receiver, loser_listens);
                seen(&placer, &bob_bid, "requested")
                    && seen(&placer, &carol_bid, "requested")
                    && seen(&placer, loser, "rejected")
                    && seen(&loser_told, loser, "rejected")
                    && seen(
                        &told(
                            &receiver,
                            if winner.ends_with("bob") {
                                &bob_listens
                            } else {
                                &carol_listens
                            },
                        ),
                        &coordination,
                        "requested",
                    )
            },
        )
        .await;
    // The placer's filter carries bids only; the loser never hears of the coordination Task,
    // nor of the other's bid; eve hears nothing.
    assert!(
        told(&receiver, &placer_listens)
            .iter()
            .all(|(id, _, _)| id == &bob_bid || id == &carol_bid)
    );
    let loser_told = told(&receiver, loser_listens);
    assert!(
        !loser_told.iter().any(|(id, _, _)| id == &coordination),
        "{loser_told:?}"
    );
    let other_bid = if loser == &bob_bid {
        &carol_bid
    } else {
        &bob_bid
    };
    assert!(
        !loser_told.iter().any(|(id, _, _)| id == other_bid),
        "{loser_told:?}"
    );
    assert!(receiver.of(&eve_listens, "event-notification").is_empty());
    server.stop().await;
}

/// A websocket listener: a `task-changed` subscription (full resources) made with `token`,
/// bound on its own socket with a binding token; returns the subscription id and the socket
/// after its handshake.
async fn listen_on_socket(server: &TestServer, token: &str, filters: &[&str]) -> (String, Socket) {
    let mut body = subscription(
        &server.base,
        "task-changed",
        filters,
        "unused",
        "full-resource",
    );
    body["channel"] = json!({
        "type": "websocket",
        "payload": "application/fhir+json",
        "_payload": body["channel"]["_payload"].clone(),
    });
    let (status, created) = server.post_json("/Subscription", token, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = id_of(&created);
    let (binding, url) = server.ws_binding(token, &id).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the websocket connects");
    socket
        .send(Message::Text(format!("bind-with-token {binding}").into()))
        .await
        .unwrap();
    let handshake = next_json(&mut socket).await;
    assert_eq!(
        common::receiver::parameter(&handshake, "type").as_deref(),
        Some("handshake"),
        "{handshake}"
    );
    (id, socket)
}

/// The (Task id, version, status) of every Task a socket is told about, in order, until it
/// has been told about `until` (a Task id and status); every frame must be an event
/// notification.
async fn told_on_socket(socket: &mut Socket, until: (&str, &str)) -> Vec<(String, String, String)> {
    let mut told = Vec::new();
    loop {
        let bundle = next_json(socket).await;
        assert_eq!(
            common::receiver::parameter(&bundle, "type").as_deref(),
            Some("event-notification"),
            "{bundle}"
        );
        for entry in bundle["entry"].as_array().unwrap().iter().skip(1) {
            let t = &entry["resource"];
            told.push((
                id_of(t),
                t["meta"]["versionId"].as_str().unwrap().to_string(),
                t["status"].as_str().unwrap().to_string(),
            ));
        }
        if told
            .iter()
            .any(|(id, _, status)| id == until.0 && status == until.1)
        {
            return told;
        }
    }
}

#[tokio::test]
async fn a_practitioner_placer_reads_and_hears_the_bids_on_its_bidding_task_and_no_one_else_does() {
    let server = TestServer::start_hub().await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let surgeon = format!("{PERFORMER_TYPES}|surgeon");
    let placer = server.practitioner("Practitioner/placer");
    let bob = server.practitioner_with_types("Practitioner/bob", &[&surgeon]);
    let carol = server.practitioner_with_types("Practitioner/carol", &[&surgeon]);
    let dave = server.practitioner_with_types("Practitioner/dave", &[&surgeon]);
    let bids_filter = format!("code={WORKFLOW_TASK}|bid");
    // "Answers to my bidding Tasks": the placer listens over a websocket, Dave (a surgeon who
    // does not bid) asks for the same, and Bob and Carol listen to everything they may read.
    let (placer_listens, mut placer_socket) =
        listen_on_socket(&server, &placer, &[&bids_filter]).await;
    let dave_listens = listen(&server, &dave, &receiver, &[&bids_filter]).await;
    let bob_listens = listen(&server, &bob, &receiver, &[]).await;
    let carol_listens = listen(&server, &carol, &receiver, &[]).await;

    // The placer system opens the bidding for the practitioner placer, with no coordination
    // Task yet: the award creates it.
    let bidding_of = |description: &str| {
        json!({
            "resourceType": "Task", "status": "requested", "intent": "proposal",
            "code": { "coding": [{ "system": WORKFLOW_TASK, "code": "bidding" }] },
            "requester": { "reference": "Practitioner/placer" },
            "for": { "reference": "Patient/p1" },
            "basedOn": [{ "reference": "ServiceRequest/hip-1" }],
            "priority": "urgent",
            "description": description,
            "performerType": [{ "coding": [{ "system": PERFORMER_TYPES, "code": "surgeon" }] }],
            "extension": [
                { "url": CANDIDATE, "valueReference": { "reference": "Practitioner/bob" } },
                { "url": CANDIDATE, "valueReference": { "reference": "Practitioner/carol" } },
            ],
        })
    };
    let (status, body) = server
        .post_json("/Task", &admin, &bidding_of("hip replacement, week 12"))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let bidding_id = id_of(&body);

    // Bob's bid names nobody as requester: it gets the bidding Task's placer. A bid naming
    // another placer is refused, nothing stored.
    let before = task_count(&server).await;
    let mut misdirected = bid(&bidding_id, "Practitioner/carol", true, json!([]));
    misdirected["requester"] = json!({ "reference": "Practitioner/dave" });
    let (status, answer) = server.post_json("/Task", &carol, &misdirected).await;
    assert_refused_at(
        status,
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Task.requester",
    );
    assert_eq!(task_count(&server).await, before);
    let (status, body) = server
        .post_json(
            "/Task",
            &bob,
            &bid(&bidding_id, "Practitioner/bob", true, json!([])),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["requester"]["reference"], "Practitioner/placer");
    let bob_bid = id_of(&body);
    let mut carols = bid(&bidding_id, "Practitioner/carol", true, json!([]));
    carols["requester"] = json!({ "reference": "Practitioner/placer" });
    let (status, body) = server.post_json("/Task", &carol, &carols).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let carol_bid = id_of(&body);

    // Reads and searches: the placer sees both bids, each candidate its own, Dave none.
    let mut both = vec![bob_bid.clone(), carol_bid.clone()];
    both.sort();
    let part_of = format!("part-of=Task/{bidding_id}");
    let mut placer_sees = server.search_ids(&part_of, &placer).await;
    placer_sees.sort();
    assert_eq!(placer_sees, both);
    assert_eq!(
        server.search_ids(&bids_filter, &placer).await.len(),
        2,
        "by code too"
    );
    assert_eq!(
        server.search_ids(&part_of, &bob).await,
        vec![bob_bid.clone()]
    );
    assert_eq!(
        server.search_ids(&part_of, &carol).await,
        vec![carol_bid.clone()]
    );
    assert!(server.search_ids(&part_of, &dave).await.is_empty());
    for (token, id, expected) in [
        (&placer, &bob_bid, StatusCode::OK),
        (&placer, &carol_bid, StatusCode::OK),
        (&bob, &carol_bid, StatusCode::FORBIDDEN),
        (&carol, &bob_bid, StatusCode::FORBIDDEN),
        (&dave, &bob_bid, StatusCode::FORBIDDEN),
    ] {
        let (status, body) = server.get(&format!("/Task/{id}"), token).await;
        assert_eq!(status, expected, "{body}");
        let (status, _) = server.get(&format!("/Task/{id}/_history"), token).await;
        assert_eq!(status, expected);
    }
    // Reading is all the placer may do with a bid: no taking it over, no delete. Nobody
    // rewrites who placed it, not even an admin.
    let (status, body) = patch(
        &server,
        &format!("/Task/{bob_bid}"),
        &placer,
        json!([{ "op": "replace", "path": "/owner", "value": { "reference": "Practitioner/placer" } }]),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let response = server
        .request(Method::DELETE, &format!("/Task/{bob_bid}"), &placer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let (status, body) = patch(
        &server,
        &format!("/Task/{bob_bid}"),
        &admin,
        json!([{ "op": "replace", "path": "/requester", "value": { "reference": "Practitioner/dave" } }]),
        None,
    )
    .await;
    assert_refused_at(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Task.requester",
    );
    assert_eq!(
        state_of(&server, &bob_bid).await,
        ("requested".into(), "1".into())
    );

    // The award: the coordination Task is created for Bob in the same transaction that
    // closes the bidding and accepts and rejects the bids.
    let (status, awarded) = patch(
        &server,
        &format!("/Task/{bidding_id}"),
        &admin,
        award(&bob_bid),
        Some("1"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{awarded}");
    let coordination = awarded["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"]["coding"][0]["code"] == "coordination")
        .and_then(|o| o["valueReference"]["reference"].as_str())
        .and_then(|r| r.strip_prefix("Task/"))
        .unwrap_or_else(|| panic!("no coordination output: {awarded}"))
        .to_string();
    let (status, created) = server.get(&format!("/Task/{coordination}"), &bob).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!(created["owner"]["reference"], "Practitioner/bob");
    assert_eq!(created["requester"]["reference"], "Practitioner/placer");
    assert_eq!(created["for"]["reference"], "Patient/p1");
    assert_eq!(created["basedOn"][0]["reference"], "ServiceRequest/hip-1");
    assert_eq!(created["priority"], "urgent");
    assert_eq!(created["description"], "hip replacement, week 12");
    assert_eq!(
        (&created["status"], &created["intent"]),
        (&json!("requested"), &json!("order"))
    );
    assert_eq!(created["meta"]["versionId"], "1");
    assert_eq!(state_of(&server, &bob_bid).await.0, "accepted");
    assert_eq!(state_of(&server, &carol_bid).await.0, "rejected");
    let (status, _) = server.get(&format!("/Task/{coordination}"), &carol).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A later bid on another of the placer's biddings marks the end of what the socket hears:
    // events reach one subscription in order, so everything before it has been sent.
    let (_, other) = server
        .post_json("/Task", &admin, &bidding_of("knee, week 14"))
        .await;
    let (status, body) = server
        .post_json(
            "/Task",
            &carol,
            &bid(&id_of(&other), "Practitioner/carol", false, json!([])),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let last_bid = id_of(&body);
    let heard = told_on_socket(&mut placer_socket, (&last_bid, "requested")).await;
    let heard: BTreeSet<(String, String, String)> = heard.into_iter().collect();
    let expected: BTreeSet<(String, String, String)> = [
        (bob_bid.clone(), "1", "requested"),
        (carol_bid.clone(), "1", "requested"),
        (bob_bid.clone(), "2", "accepted"),
        (carol_bid.clone(), "2", "rejected"),
        (last_bid.clone(), "1", "requested"),
    ]
    .into_iter()
    .map(|(id, v, s)| (id, v.to_string(), s.to_string()))
    .collect();
    assert_eq!(heard, expected, "the placer hears exactly the answers");
    // $events replays the same for the placer.
    let (status, events) = server
        .get(
            &format!("/Subscription/{placer_listens}/$events?content=id-only"),
            &placer,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{events}");
    assert_eq!(events["entry"].as_array().unwrap().len(), 1 + 5, "{events}");

    receiver
        .wait_for(
            "each candidate told of its own bid and the winner of the work",
            |_| {
                let bob_told = told(&receiver, &bob_listens);
                let carol_told = told(&receiver, &carol_listens);
                bob_told.contains(&(bob_bid.clone(), "2".into(), "accepted".into()))
                    && bob_told.contains(&(coordination.clone(), "1".into(), "requested".into()))
                    && carol_told.contains(&(carol_bid.clone(), "2".into(), "rejected".into()))
                    && carol_told.contains(&(last_bid.clone(), "1".into(), "requested".into()))
            },
        )
        .await;
    let carol_told = told(&receiver, &carol_listens);
    assert!(
        !carol_told
            .iter()
            .any(|(id, _, _)| id == &bob_bid || id == &coordination),
        "{carol_told:?}"
    );
    let bob_told = told(&receiver, &bob_listens);
    assert!(
        !bob_told
            .iter()
            .any(|(id, _, _)| id == &carol_bid || id == &last_bid),
        "{bob_told:?}"
    );
    // Dave asked for bids too, and may read none of them.
    assert!(receiver.of(&dave_listens, "event-notification").is_empty());
    let (_, events) = server
        .get(
            &format!("/Subscription/{dave_listens}/$events?content=id-only"),
            &dave,
        )
        .await;
    assert_eq!(
        events["entry"].as_array().map_or(0, Vec::len),
        1,
        "{events}"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Profiles

#[tokio::test]
async fn tasks_that_declare_a_workflow_profile_are_held_to_it() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let focal = id_of(
        &server
            .create_task(&task("in-progress", Some("Practitioner/bob")))
            .await,
    );
    let coordination = json!({
        "resourceType": "Task", "status": "requested", "intent": "order",
        "meta": { "profile": ["https://baton.dev/fhir/StructureDefinition/coordination-task"] },
        "code": { "coding": [{ "system": TASK_CODE, "code": "fulfill" }] },
        "focus": { "reference": "ServiceRequest/sr1" },
        "requester": { "reference": "Practitioner/placer" },
    });
    let cancellation = json!({
        "resourceType": "Task", "status": "requested", "intent": "order",
        "meta": { "profile": ["https://baton.dev/fhir/StructureDefinition/cancellation-request-task"] },
        "code": { "coding": [{ "system": TASK_CODE, "code": "abort" }] },
        "focus": { "reference": format!("Task/{focal}") },
        "owner": { "reference": "Practitioner/bob" },
        "requester": { "reference": "Practitioner/placer" },
    });
    let before = task_count(&server).await;
    let without = |t: &Value, element: &str| {
        let mut t = t.clone();
        t.as_object_mut().unwrap().remove(element);
        t
    };
    let with = |t: &Value, element: &str, value: Value| {
        let mut t = t.clone();
        t[element] = value;
        t
    };
    #[rustfmt::skip]
    let cases = [
        (without(&coordination, "requester"), "Task.requester"),
        (with(&coordination, "intent", json!("plan")), "Task.intent"),
        (without(&coordination, "code"), "Task.code"),
        (with(&cancellation, "code", json!({ "coding": [{ "system": TASK_CODE, "code": "suspend" }] })), "Task.code"),
        (without(&cancellation, "requester"), "Task.requester"),
    ];
    for (body, expression) in &cases {
        let (status, answer) = server.post_json("/Task", &admin, body).await;
        assert_refused_at(
            status,
            &answer,
            StatusCode::UNPROCESSABLE_ENTITY,
            expression,
        );
        assert!(
            answer["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("profile"),
            "{answer}"
        );
    }
    assert_eq!(task_count(&server).await, before, "nothing stored");
    let coordination_id = id_of(&server.create_task(&coordination).await);
    server.create_task(&cancellation).await;
    // A later write is held to the profile too.
    let (status, answer) = patch(
        &server,
        &format!("/Task/{coordination_id}"),
        &admin,
        json!([{ "op": "remove", "path": "/focus" }]),
        None,
    )
    .await;
    assert_refused_at(
        status,
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "Task.focus",
    );
    assert_eq!(state_of(&server, &coordination_id).await.1, "1");
}
