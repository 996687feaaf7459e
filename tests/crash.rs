//! Kill -9 mid-stream: the `baton` binary runs as a child process while Tasks are written in
//! a loop and a receiver counts notifications; it is killed without warning and restarted on
//! the same data. Every acknowledged change must be delivered, event numbers must be
//! contiguous from 1, and duplicates may only come from attempts that were in flight; every
//! stored Task has its create AuditEvent and no AuditEvent names a Task that was not stored.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::receiver::Receiver;
use common::{SECRET, subscription, task};
use reqwest::StatusCode;

struct Child {
    process: tokio::process::Child,
    base: String,
}

async fn spawn(data: &Path, port: u16) -> Child {
    let (database_url, _) = common::database_url_for(data).await;
    let process = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .arg("serve")
        .env("BATON_LISTEN", format!("127.0.0.1:{port}"))
        .env("BATON_DATA_DIR", data)
        .env("BATON_DATABASE_URL", database_url)
        .env("BATON_JWT_SECRET", SECRET)
        .env("BATON_ALLOW_HTTP_ENDPOINTS", "true")
        .env("BATON_ALLOW_PRIVATE_ENDPOINTS", "true")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the baton binary starts");
    let root = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if let Ok(r) = client.get(format!("{root}/readyz")).send().await
            && r.status() == StatusCode::OK
        {
            return Child {
                process,
                base: format!("{root}/fhir"),
            };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("baton did not become ready on port {port}");
}

/// An admin token for the child servers' secret, and an HTTP client with a timeout.
fn admin_client() -> (String, reqwest::Client) {
    let auth = baton::auth::Authenticator::new(SECRET, 0, "performer_types");
    let admin = auth
        .issue(baton::auth::Role::Admin, None, &[], 600)
        .unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    (admin, client)
}

/// Creates an id-only rest-hook subscription to every Task change, sent to `endpoint`; its id.
async fn subscribe(client: &reqwest::Client, base: &str, admin: &str, endpoint: &str) -> String {
    let r = client
        .post(format!("{base}/Subscription"))
        .bearer_auth(admin)
        .header("content-type", "application/fhir+json")
        .body(subscription(base, "task-changed", &[], endpoint, "id-only").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = Receiver::start().await;
    let (admin, client) = admin_client();

    let mut child = spawn(dir.path(), port).await;
    let subscription_id = subscribe(&client, &child.base, &admin, &receiver.url).await;

    // Write until well past the kill; remember what was acknowledged.
    let writer = {
        let client = client.clone();
        let base = child.base.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..100_000 {
                let body = task("requested", Some(&format!("Practitioner/{}", i % 7)));
                let sent = client
                    .post(format!("{base}/Task"))
                    .bearer_auth(&admin)
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        let created: serde_json::Value = r.json().await.unwrap();
                        acknowledged.push(created["id"].as_str().unwrap().to_string());
                    }
                    _ => break,
                }
            }
            acknowledged
        })
    };
    // Kill once a stream of writes and deliveries is under way.
    receiver
        .wait_for("deliveries under way", |r| r.len() > 150)
        .await;
    child.process.start_kill().unwrap();
    child.process.wait().await.unwrap();
    let acknowledged = writer.await.unwrap();
    assert!(
        acknowledged.len() > 140,
        "only {} writes before the kill",
        acknowledged.len()
    );

    // Restart on the same data: the backlog drains.
    let restarted = spawn(dir.path(), port).await;
    let wanted: BTreeSet<String> = acknowledged.iter().cloned().collect();
    let delivered_ids = |received: &[common::receiver::Received]| -> BTreeSet<String> {
        received
            .iter()
            .filter(|r| r.subscription_id() == subscription_id && r.kind() == "event-notification")
            .flat_map(|r| {
                r.body["entry"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .skip(1)
                    .filter_map(|e| {
                        e["fullUrl"]
                            .as_str()
                            .and_then(|u| u.rsplit('/').next())
                            .map(str::to_string)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    receiver
        .wait_for("every acknowledged Task delivered", |r| {
            delivered_ids(r).is_superset(&wanted)
        })
        .await;

    // Event numbers: contiguous from 1, duplicates only re-sends of an in-flight batch.
    let numbers = receiver.event_numbers(&subscription_id);
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for n in &numbers {
        *counts.entry(*n).or_default() += 1;
    }
    let highest = *counts.keys().last().unwrap();
    assert_eq!(
        counts.len() as i64,
        highest,
        "event numbers 1..={highest} without gaps"
    );
    assert_eq!(*counts.keys().next().unwrap(), 1);
    let duplicated: usize = counts.values().map(|c| c - 1).sum();
    assert!(
        duplicated <= 20,
        "{duplicated} duplicates: more than one in-flight batch was repeated"
    );
    // Every event after the first delivery is in order: numbers never go backwards except for
    // the one re-sent batch.
    let backwards = numbers.windows(2).filter(|w| w[1] < w[0]).count();
    eprintln!(
        "acknowledged {} writes, delivered events 1..={highest}, {duplicated} duplicates",
        acknowledged.len()
    );
    assert!(
        backwards <= 1,
        "order broken {backwards} times: {numbers:?}"
    );
    // Each Task and its create AuditEvent committed together: never one without the other.
    let tasks_without_audit = common::database_scalar(
        dir.path(),
        "SELECT CAST(count(*) AS TEXT) FROM task t WHERE NOT EXISTS
           (SELECT 1 FROM audit_event a WHERE a.subtype = 'create' AND a.entity = 'Task/' || t.id)",
    )
    .await;
    let audits_without_task = common::database_scalar(
        dir.path(),
        "SELECT CAST(count(*) AS TEXT) FROM audit_event a WHERE a.subtype = 'create'
           AND a.entity LIKE 'Task/%'
           AND NOT EXISTS (SELECT 1 FROM task t WHERE 'Task/' || t.id = a.entity)",
    )
    .await;
    let audited = common::database_scalar(
        dir.path(),
        "SELECT CAST(count(*) AS TEXT) FROM audit_event WHERE subtype = 'create' AND entity LIKE 'Task/%'",
    )
    .await;
    assert_eq!(
        tasks_without_audit, "0",
        "Tasks stored without their AuditEvent"
    );
    assert_eq!(
        audits_without_task, "0",
        "AuditEvents of Tasks never stored"
    );
    assert!(
        audited.parse::<usize>().unwrap() >= acknowledged.len(),
        "{audited} create AuditEvents for {} acknowledged creates",
        acknowledged.len()
    );
    drop(restarted);
    common::forget_database(dir.path());
}

/// Kill -9 while transaction Bundles are being written from several clients: after a restart
/// each transaction is either wholly stored with the change events of all its entries, or
/// wholly absent, acknowledged ones present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_transactions_leaves_each_whole_or_absent() {
    const ENTRIES: usize = 5;
    const WRITERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let receiver = Receiver::start().await;
    let (admin, client) = admin_client();
    let child = spawn(dir.path(), port).await;
    let subscription_id = subscribe(&client, &child.base, &admin, &receiver.url).await;

    // Each writer sends transactions tagged `w{writer}-{n}` on all their entries (a parent and
    // sub-tasks linked by urn:uuid) until the server is gone.
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let (client, base, admin) = (client.clone(), child.base.clone(), admin.clone());
        let acknowledged = acknowledged.clone();
        writers.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut acked = Vec::new();
            for n in 0..100_000 {
                let tag = format!("w{writer}-{n}");
                let parent = format!("urn:uuid:{}", uuid::Uuid::new_v4());
                let entries: Vec<serde_json::Value> = (0..ENTRIES)
                    .map(|i| {
                        let mut t = task("requested", Some("Practitioner/1"));
                        t["identifier"] =
                            serde_json::json!([{ "system": "http://example.org/tx", "value": tag }]);
                        let full_url = if i == 0 {
                            parent.clone()
                        } else {
                            t["partOf"] = serde_json::json!([{ "reference": parent }]);
                            format!("urn:uuid:{}", uuid::Uuid::new_v4())
                        };
                        serde_json::json!({ "fullUrl": full_url, "resource": t, "request": { "method": "POST", "url": "Task" } })
                    })
                    .collect();
                let bundle = serde_json::json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
                sent.push(tag.clone());
                let answer = client
                    .post(&base)
                    .bearer_auth(&admin)
                    .header("content-type", "application/fhir+json")
                    .body(bundle.to_string())
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status() == StatusCode::OK => {
                        acked.push(tag);
                        acknowledged.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    _ => break,
                }
            }
            (sent, acked)
        }));
    }
    common::eventually("transactions under way", || async {
        (acknowledged.load(std::sync::atomic::Ordering::Relaxed) > 40).then_some(())
    })
    .await;
    let mut child = child;
    child.process.start_kill().unwrap();
    child.process.wait().await.unwrap();
    let mut sent = Vec::new();
    let mut acked = BTreeSet::new();
    for writer in writers {
        let (s, a) = writer.await.unwrap();
        sent.extend(s);
        acked.extend(a);
    }

    let restarted = spawn(dir.path(), port).await;
    let count = |query: String| {
        let (client, base, admin) = (client.clone(), restarted.base.clone(), admin.clone());
        async move {
            let r = client
                .get(format!(
                    "{base}/Task?{query}&_summary=count&_total=accurate"
                ))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            r.json::<serde_json::Value>().await.unwrap()["total"]
                .as_u64()
                .unwrap() as usize
        }
    };
    let mut stored = 0;
    for tag in &sent {
        let found = count(format!("identifier=http://example.org/tx|{tag}")).await;
        assert!(
            found == 0 || found == ENTRIES,
            "transaction {tag} is partly stored: {found} of {ENTRIES} Tasks"
        );
        if acked.contains(tag) {
            assert_eq!(found, ENTRIES, "acknowledged transaction {tag} is missing");
        }
        stored += found;
    }
    assert!(stored >= acked.len() * ENTRIES);
    // Every stored Task's change event is matched: the subscription counts exactly one event
    // per stored Task.
    let status_url = format!("{}/Subscription/{subscription_id}/$status", restarted.base);
    common::eventually("one event per stored Task", || {
        let (client, admin, url) = (client.clone(), admin.clone(), status_url.clone());
        async move {
            let r = client.get(url).bearer_auth(&admin).send().await.ok()?;
            let bundle: serde_json::Value = r.json().await.ok()?;
            let events = common::receiver::parameter(&bundle, "events-since-subscription-start")?;
            let events: usize = events.parse().ok()?;
            assert!(events <= stored, "{events} events for {stored} Tasks");
            (events == stored).then_some(())
        }
    })
    .await;
    eprintln!(
        "{} transactions sent, {} acknowledged, {stored} Tasks stored",
        sent.len(),
        acked.len()
    );
    drop(restarted);
    common::forget_database(dir.path());
}
