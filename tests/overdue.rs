//! The `task-overdue` topic: the hub's timer reports an open Task whose due date passed,
//! exactly once per due date, and not again after a restart.

mod common;

use common::receiver::Receiver;
use common::{TestServer, subscription, task};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn due(status: &str, end: &str) -> Value {
    let mut t = task(status, None);
    t["focus"] = json!({ "reference": "ServiceRequest/sr1" });
    t["restriction"] = json!({ "period": { "end": end } });
    t
}

fn hub() -> impl FnOnce(&mut baton::Config) {
    |c: &mut baton::Config| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.overdue_check_seconds = 1;
    }
}

fn focus_ids(receiver: &Receiver, subscription: &str) -> Vec<String> {
    receiver
        .of(subscription, "event-notification")
        .iter()
        .map(|r| {
            r.body["entry"][1]["fullUrl"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn an_open_task_past_its_due_date_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start().await;
    let server = TestServer::start_in(dir.path(), hub()).await;
    let admin = server.admin();
    let (status, created) = server
        .post_json(
            "/Subscription",
            &admin,
            &subscription(&server.base, "task-overdue", &[], &receiver.url, "id-only"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let overdue = created["id"].as_str().unwrap().to_string();
    let (_, changed) = server
        .post_json(
            "/Subscription",
            &admin,
            &subscription(
                &server.base,
                "task-changed",
                &["status=in-progress"],
                &receiver.url,
                "id-only",
            ),
        )
        .await;
    let changed = changed["id"].as_str().unwrap().to_string();

    let late = server
        .create_task(&due("in-progress", "2020-01-01T00:00:00Z"))
        .await;
    server
        .create_task(&due("completed", "2020-01-01T00:00:00Z"))
        .await; // terminal: never overdue
    server.create_task(&due("in-progress", "2999-01-01")).await; // not yet due
    receiver
        .wait_for("the overdue event", |_| {
            !focus_ids(&receiver, &overdue).is_empty()
        })
        .await;
    assert_eq!(
        focus_ids(&receiver, &overdue),
        vec![late["id"].as_str().unwrap().to_string()]
    );
    let event = &receiver.of(&overdue, "event-notification")[0];
    assert_eq!(event.body["entry"][1]["request"]["method"], "GET");
    server.stop().await;

    // After a restart, only a new overdue Task is reported; the first is not repeated.
    let server = TestServer::start_in(dir.path(), hub()).await;
    let later = server.create_task(&due("requested", "2021-06-01")).await;
    receiver
        .wait_for("the second overdue event", |_| {
            focus_ids(&receiver, &overdue).len() >= 2
        })
        .await;
    assert_eq!(
        focus_ids(&receiver, &overdue),
        vec![
            late["id"].as_str().unwrap().to_string(),
            later["id"].as_str().unwrap().to_string()
        ]
    );
    assert_eq!(receiver.event_numbers(&overdue), vec![1, 2]);
    // A resource topic never hears the overdue event: task-changed saw only the two creates
    // (events 1 and 2, perhaps in one notification, perhaps still in flight across the
    // restart).
    receiver
        .wait_for("the two creates on task-changed", |_| {
            receiver.event_numbers(&changed).len() >= 2
        })
        .await;
    assert_eq!(receiver.event_numbers(&changed), vec![1, 2]);
    server.stop().await;
    common::forget_database(dir.path());
}
