//! What one request may cost: a JSON Patch is bounded before any writer work, the API stores
//! only what it can read back, conditional creates are decided beside the writer, searches
//! are bounded in criteria, bytes per page and include depth, and a node evaluates a bounded
//! number of them at once, refusing the rest with 503 and `Retry-After`; writes past the
//! database queue's depth are refused with 429 and `Retry-After`, storing nothing.

mod common;

use common::{TestServer, assert_outcome, body, task};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn patch(
    server: &TestServer,
    id: &str,
    token: &str,
    operations: &Value,
) -> (StatusCode, Value) {
    let response = server
        .request(Method::PATCH, &format!("/Task/{id}"), token)
        .header("content-type", "application/json-patch+json")
        .body(operations.to_string())
        .send()
        .await
        .unwrap();
    body(response).await
}

async fn create_with_note(server: &TestServer) -> (String, Value) {
    let mut t = task("requested", Some("Practitioner/1"));
    t["note"] = json!([{ "text": "a note that a patch will try to copy into itself" }]);
    let created = server.create_task(&t).await;
    (created["id"].as_str().unwrap().to_string(), created)
}

/// `levels` extensions, each inside the one before: two levels of JSON (array and object) each.
fn nested_extensions(levels: usize) -> Value {
    let mut extension = json!({ "url": "urn:leaf", "valueString": "x" });
    for _ in 1..levels {
        extension = json!({ "url": "urn:level", "extension": [extension] });
    }
    json!([extension])
}

async fn current(server: &TestServer, id: &str) -> Value {
    let (status, task) = server.get(&format!("/Task/{id}"), &server.admin()).await;
    assert_eq!(status, StatusCode::OK, "{task}");
    task
}

#[tokio::test]
async fn a_patch_that_doubles_the_task_is_refused_before_the_writer() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let (id, created) = create_with_note(&server).await;
    // Eighteen copies of the notes into themselves: 2^18 notes, hundreds of megabytes.
    let doubling = Value::Array(vec![
        json!({ "op": "copy", "from": "/note", "path": "/note/-" });
        18
    ]);
    let (status, outcome) = patch(&server, &id, &admin, &doubling).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{outcome}");
    assert_outcome(&outcome, "too-long");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("max_body_bytes"),
        "{outcome}"
    );
    assert_eq!(
        current(&server, &id).await,
        created,
        "the Task is unchanged"
    );

    // Other writes are served as before: a create, and a patch of the same Task.
    server.create_task(&task("draft", None)).await;
    let accept = json!([{ "op": "replace", "path": "/status", "value": "accepted" }]);
    let (status, patched) = patch(&server, &id, &admin, &accept).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["meta"]["versionId"], "2");

    // More operations than limits.max_patch_operations (100 by default): 413, unread.
    let many = Value::Array(vec![
        json!({ "op": "test", "path": "/status", "value": "accepted" });
        101
    ]);
    let (status, outcome) = patch(&server, &id, &admin, &many).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{outcome}");
    assert_outcome(&outcome, "too-long");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("limits.max_patch_operations (100)"),
        "{outcome}"
    );
    assert_eq!(current(&server, &id).await["meta"]["versionId"], "2");
    server.stop().await;
}

#[tokio::test]
async fn a_failing_patch_is_answered_without_reaching_the_writer() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let (id, created) = create_with_note(&server).await;
    // json_patch's own `patch` panics undoing this one (the `move` cannot be undone once the
    // `add` fails); it is applied to a copy, one operation at a time, and refused.
    let undo_breaker = json!([
        { "op": "move", "from": "/note/0", "path": "/note" },
        { "op": "add", "path": "/nothing/0", "value": 1 },
    ]);
    let (status, outcome) = patch(&server, &id, &admin, &undo_breaker).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{outcome}");
    assert_outcome(&outcome, "processing");
    assert_eq!(current(&server, &id).await, created);
    let accept = json!([{ "op": "replace", "path": "/status", "value": "accepted" }]);
    let (status, _) = patch(&server, &id, &admin, &accept).await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn tasks_nested_past_the_depth_limit_are_never_stored() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let (id, created) = create_with_note(&server).await;
    let assert_too_deep = |status: StatusCode, outcome: &Value| {
        assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
        assert_outcome(outcome, "too-long");
        assert!(
            outcome["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("64 levels"),
            "{outcome}"
        );
    };

    // PUT of the existing Task with 33 nested extensions (67 levels): refused, unchanged.
    let mut deep = created.clone();
    deep["extension"] = nested_extensions(33);
    let (status, outcome) = server.put_json(&format!("/Task/{id}"), &admin, &deep).await;
    assert_too_deep(status, &outcome);
    assert_eq!(current(&server, &id).await, created);
    // PUT that would create: refused, nothing created.
    deep["id"] = json!("too-deep");
    let (status, outcome) = server.put_json("/Task/too-deep", &admin, &deep).await;
    assert_too_deep(status, &outcome);
    let (status, _) = server.get("/Task/too-deep", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // POST: refused.
    let (status, outcome) = server.post_json("/Task", &admin, &deep).await;
    assert_too_deep(status, &outcome);

    // PATCH adding the nested extensions at once, or nesting by copies: refused, unchanged.
    let add = json!([{ "op": "add", "path": "/extension", "value": nested_extensions(33) }]);
    let (status, outcome) = patch(&server, &id, &admin, &add).await;
    assert_too_deep(status, &outcome);
    let mut copies =
        vec![json!({ "op": "add", "path": "/extension", "value": nested_extensions(4) })];
    for _ in 0..10 {
        // Each copy puts the whole tree under its innermost extension, eight levels down.
        copies.push(json!({
            "op": "copy", "from": "/extension",
            "path": "/extension/0/extension/0/extension/0/extension/0/extension",
        }));
    }
    let (status, outcome) = patch(&server, &id, &admin, &Value::Array(copies)).await;
    assert_too_deep(status, &outcome);
    assert_eq!(current(&server, &id).await, created);

    // Just under the limit (31 nested extensions, 63 levels) is stored and read back.
    let shallow = json!([{ "op": "add", "path": "/extension", "value": nested_extensions(31) }]);
    let (status, patched) = patch(&server, &id, &admin, &shallow).await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(current(&server, &id).await, patched);
    server.stop().await;
}

#[tokio::test]
async fn racing_conditional_creates_create_one_task() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let mut order = task("requested", None);
    order["identifier"] = json!([{ "system": "urn:orders", "value": "race-1" }]);
    let create = |criteria: &'static str| {
        server
            .request(Method::POST, "/Task", &admin)
            .header("content-type", "application/fhir+json")
            .header("if-none-exist", criteria)
            .body(order.to_string())
            .send()
    };
    // All at once: whichever the writer takes first creates, and every other one finds it,
    // in the read-pool check or in the writer's re-check of what was written since.
    let answers =
        futures::future::join_all((0..12).map(|_| create("identifier=urn:orders|race-1"))).await;
    let mut created = Vec::new();
    let mut found = Vec::new();
    for answer in answers {
        let (status, task) = body(answer.unwrap()).await;
        match status {
            StatusCode::CREATED => created.push(task["id"].clone()),
            StatusCode::OK => found.push(task["id"].clone()),
            other => panic!("unexpected {other}: {task}"),
        }
    }
    assert_eq!(created.len(), 1, "{created:?}");
    assert!(found.iter().all(|id| *id == created[0]), "{found:?}");
    assert_eq!(
        server
            .search_ids("identifier=urn:orders|race-1", &admin)
            .await
            .len(),
        1
    );
    // Two matches: 412, nothing written.
    server.create_task(&order).await;
    let (status, outcome) = body(create("identifier=urn:orders|race-1").await.unwrap()).await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{outcome}");
    assert_eq!(
        server
            .search_ids("identifier=urn:orders|race-1", &admin)
            .await
            .len(),
        2
    );
    server.stop().await;
}

#[tokio::test]
async fn searches_too_large_to_compile_are_refused_as_the_clients_mistake() {
    let server = TestServer::start().await;
    let admin = server.admin();
    server.create_task(&task("requested", None)).await;
    let ids = |n: usize| (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>();
    let search = |query: String| {
        let server = &server;
        let admin = admin.clone();
        async move {
            let response = server
                .request(Method::POST, "/Task/_search", &admin)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(query)
                .send()
                .await
                .unwrap();
            body(response).await
        }
    };
    // Up to 992 ANDed values once answered 500 ("Expression tree is too large").
    for criteria in [17, 995] {
        let query: Vec<String> = ids(criteria)
            .iter()
            .map(|id| format!("_id:not={id}"))
            .collect();
        let (status, outcome) = search(query.join("&")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{criteria}: {outcome}");
        assert_outcome(&outcome, "too-costly");
    }
    // Values ORed in one parameter: 500 `system|code` pairs once answered 500 as well.
    let pairs = |n: usize| {
        let pairs: Vec<String> = (0..n).map(|i| format!("urn:x|v{i}")).collect();
        format!("identifier={}", pairs.join(","))
    };
    for query in [format!("_id={}", ids(1000).join(",")), pairs(500)] {
        let (status, outcome) = search(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{outcome}");
        assert_outcome(&outcome, "too-costly");
    }
    // At the caps (16 criteria, 512 values) the search runs.
    let query: Vec<String> = ids(16).iter().map(|id| format!("_id:not={id}")).collect();
    let (status, bundle) = search(query.join("&")).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(bundle["total"], 1);
    for query in [format!("_id={}", ids(512).join(",")), pairs(256)] {
        let (status, bundle) = search(query).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
    }
    server.stop().await;
}

#[tokio::test]
async fn pages_stop_at_their_byte_budget_and_continue_with_next() {
    let server = TestServer::start_with(|c| {
        c.max_body_bytes = 4096;
        c.search.max_page_bytes = 4096;
    })
    .await;
    let admin = server.admin();
    let mut made = Vec::new();
    for i in 0..10 {
        let mut t = task("requested", None);
        t["description"] = json!(format!("{i:02} {}", "x".repeat(900)));
        made.push(
            server.create_task(&t).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut seen = Vec::new();
    let mut url = format!("{}/Task?_count=100&_sort=_lastUpdated", server.base);
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 10, "paging does not end");
        let (status, bundle) = server.get(&url, &admin).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        let entries = bundle["entry"].as_array().unwrap();
        let matches: Vec<&Value> = entries
            .iter()
            .filter(|e| e["search"]["mode"] == "match")
            .collect();
        let bytes: usize = matches
            .iter()
            .map(|e| e["resource"].to_string().len())
            .sum();
        assert!(bytes <= 4096, "page of {bytes} bytes");
        seen.extend(
            matches
                .iter()
                .map(|e| e["resource"]["id"].as_str().unwrap().to_string()),
        );
        let next = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
        let said_why = entries.iter().any(|e| {
            e["search"]["mode"] == "outcome"
                && e["resource"]["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap()
                    .contains("search.max_page_bytes")
        });
        match next {
            Some(next) => {
                assert!(said_why, "a short page says why: {bundle}");
                url = next;
            }
            None => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");
    // Tasks written in the same millisecond are ordered by id, so compare as sets.
    seen.sort();
    made.sort();
    assert_eq!(seen, made, "every Task once");
    server.stop().await;
}

#[tokio::test]
async fn iterated_includes_stop_at_the_depth_limit_and_say_so() {
    let server = TestServer::start_with(|c| c.search.max_include_depth = 2).await;
    let admin = server.admin();
    let root = server.create_task(&task("requested", None)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut chain = vec![root.clone()];
    for _ in 0..3 {
        let mut child = task("requested", None);
        child["partOf"] = json!([{ "reference": format!("Task/{}", chain.last().unwrap()) }]);
        chain.push(
            server.create_task(&child).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (status, bundle) = server
        .get(
            &format!("/Task?_id={root}&_revinclude:iterate=Task:part-of"),
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let entries = bundle["entry"].as_array().unwrap();
    let included: Vec<&str> = entries
        .iter()
        .filter(|e| e["search"]["mode"] == "include")
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(included, [chain[1].as_str(), chain[2].as_str()]);
    let outcome = entries
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .expect("an outcome entry");
    assert!(
        outcome["resource"]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("search.max_include_depth"),
        "{outcome}"
    );
    server.stop().await;
}

/// Drops a PostgreSQL database when the test ends, however it ends.
struct DropDatabase(String);

impl Drop for DropDatabase {
    fn drop(&mut self) {
        common::drop_database(&self.0);
    }
}

/// The queue is filled deterministically: on PostgreSQL (whatever the suite's backend), the
/// test locks the task table, so a search that has its slot cannot finish until the lock goes.
#[tokio::test]
async fn a_full_search_queue_answers_503_with_retry_after() {
    use sqlx::Connection;
    let name = format!(
        "baton_t_queue_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    common::create_database(&name).await;
    let _cleanup = DropDatabase(name.clone());
    let url = common::postgres_url(&name);
    let server_url = url.clone();
    let server = TestServer::start_with(move |c| {
        c.database_url = Some(server_url);
        c.limits.max_concurrent_searches = 1;
        c.limits.search_queue = 1;
    })
    .await;
    let admin = server.admin();
    server.create_task(&task("requested", None)).await;

    let mut locker = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE task IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    // Three searches at once: one gets the slot and waits on the lock, one waits in the
    // queue, and the third, whichever it is, is refused at once.
    let search = || {
        let request = server.request(Method::GET, "/Task?status=requested", &admin);
        Box::pin(async move { request.send().await.unwrap() })
    };
    let (first, _, others) = futures::future::select_all([search(), search(), search()]).await;
    assert_eq!(first.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        first
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let (_, outcome) = body(first).await;
    assert_outcome(&outcome, "transient");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("limits.search_queue"),
        "{outcome}"
    );

    // The lock goes: the running and the queued search both finish.
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();
    for response in futures::future::join_all(others).await {
        let (status, bundle) = body(response).await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        assert_eq!(bundle["total"], 1);
    }
    server.stop().await;
}

/// What holds the database's write lock so that the writes admitted meanwhile stay queued:
/// a second SQLite connection in an immediate transaction, or a PostgreSQL table lock.
enum WriteLock {
    Sqlite(rusqlite::Connection),
    Postgres(sqlx::PgConnection),
}

impl WriteLock {
    async fn take(server: &TestServer) -> WriteLock {
        use sqlx::Connection;
        if common::postgres_backend() {
            let (url, _) = common::database_url_for(&server.data_dir).await;
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::raw_sql("BEGIN; LOCK TABLE change_event IN ACCESS EXCLUSIVE MODE")
                .execute(&mut conn)
                .await
                .unwrap();
            WriteLock::Postgres(conn)
        } else {
            let conn = rusqlite::Connection::open(server.data_dir.join("baton.db")).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            WriteLock::Sqlite(conn)
        }
    }

    async fn release(self) {
        match self {
            WriteLock::Sqlite(conn) => conn.execute_batch("ROLLBACK").unwrap(),
            WriteLock::Postgres(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
            }
        }
    }
}

/// The writer's queue depth as `/metrics` shows it.
async fn writer_queue_depth(server: &TestServer) -> f64 {
    let text = server.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix("baton_writer_queue_depth "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Past `store.max_queue` writes waiting for the database, a write is refused at once with
/// 429, `Retry-After` and an OperationOutcome, and nothing of it is stored. The queue is held
/// full deterministically: the test takes the database's write lock, so whatever write is
/// queued cannot finish until the lock goes.
#[tokio::test]
async fn writes_past_the_queue_depth_are_refused_with_429_and_nothing_is_stored() {
    let server = TestServer::start_with(|c| c.store.max_queue = 1).await;
    let admin = server.admin();
    let lock = WriteLock::take(&server).await;

    // A write that waits on the lock (or, on SQLite, a job of the hub's already waiting, in
    // which case this one is refused too).
    let create = || {
        let request = server
            .request(Method::POST, "/Task", &admin)
            .json(&task("requested", Some("Practitioner/1")));
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    let waiting = create();
    let mut depth = 0.0;
    for _ in 0..400 {
        depth = writer_queue_depth(&server).await;
        if depth >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(depth >= 1.0, "nothing ever waited for the locked database");

    let refused = create().await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let (_, outcome) = body(refused).await;
    assert_outcome(&outcome, "throttled");
    assert!(
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("store.max_queue"),
        "{outcome}"
    );

    lock.release().await;
    let first = waiting.await.unwrap().status();
    assert!(
        first == StatusCode::CREATED || first == StatusCode::TOO_MANY_REQUESTS,
        "{first}"
    );
    // Exactly what was acknowledged is stored: the refused write left nothing behind.
    let (status, bundle) = server.get("/Task?_total=accurate", &admin).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    let stored = u64::from(first == StatusCode::CREATED);
    assert_eq!(bundle["total"], stored, "{bundle}");
    server.stop().await;
}
