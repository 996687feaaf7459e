//! Cluster mode, end to end: three `baton` processes share one PostgreSQL database and one
//! Redis prefix. Writes go to every node while a webhook receiver, a websocket listener and an
//! AMQP consumer count what they hear; nodes are killed with SIGKILL, Redis is restarted, and
//! a node started late takes over. These tests need PostgreSQL, Redis and RabbitMQ and fail
//! (never skip) when one is missing.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cluster::{Cluster, redis_url};
use common::receiver::{Receiver, event_numbers};
use common::{eventually, subscription, task};
use futures::{SinkExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Asserts that `numbers` (in arrival order) hold every event from 1 to at least `at_least`,
/// with nothing missing, and returns how many arrived more than once.
fn check_contiguous(what: &str, numbers: &[i64], at_least: i64) -> usize {
    let distinct: BTreeSet<i64> = numbers.iter().copied().collect();
    let highest = distinct.last().copied().unwrap_or(0);
    assert!(
        highest >= at_least,
        "{what}: heard up to event {highest}, expected at least {at_least}"
    );
    let expected: BTreeSet<i64> = (1..=highest).collect();
    assert_eq!(distinct, expected, "{what}: event numbers have gaps");
    numbers.len() - distinct.len()
}

/// Creates `count` Tasks, then updates them `rounds` times each, sending every request to the
/// next running node in turn; returns how many writes were acknowledged. A request to a node
/// that is down is sent to the next one.
async fn write_everywhere(cluster: &Cluster, count: usize, rounds: usize) -> usize {
    let mut ids = Vec::new();
    let mut next = 0;
    let mut acknowledged = 0;
    let mut node = |cluster: &Cluster| loop {
        next = (next + 1) % cluster.len();
        if cluster.is_up(next) {
            return next;
        }
    };
    for _ in 0..count {
        let (status, created) = cluster
            .post(
                node(cluster),
                "/Task",
                &task("requested", Some("Practitioner/alice")),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        ids.push(created["id"].as_str().unwrap().to_string());
        acknowledged += 1;
    }
    for round in 0..rounds {
        for id in &ids {
            let mut body = task("in-progress", Some("Practitioner/alice"));
            body["id"] = json!(id);
            body["description"] = json!(format!("round {round}"));
            let (status, updated) = cluster
                .put(node(cluster), &format!("/Task/{id}"), &body)
                .await;
            assert_eq!(status, StatusCode::OK, "{updated}");
            acknowledged += 1;
        }
    }
    acknowledged
}

/// Writes in the background — Task updates sent round-robin to every node — until stopped,
/// while the test kills a node or restarts Redis. A request a node refuses to connect is sent
/// to the next node; one that fails after it was sent may or may not have committed.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(i64, i64)>,
}

impl Load {
    fn start(cluster: &Cluster) -> Load {
        let bases: Vec<String> = (0..cluster.len())
            .filter(|&i| cluster.is_up(i))
            .map(|i| cluster.base(i).to_string())
            .collect();
        let token = cluster.admin();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let task = tokio::spawn(async move {
            let (mut acknowledged, mut uncertain) = (0, 0);
            let mut ids = Vec::new();
            let mut k = 0usize;
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                k += 1;
                let base = &bases[k % bases.len()];
                let request = if ids.len() < 4 {
                    client
                        .post(format!("{base}/Task"))
                        .body(task("requested", Some("Practitioner/alice")).to_string())
                } else {
                    let id: &String = &ids[k % ids.len()];
                    let mut body = task("in-progress", Some("Practitioner/alice"));
                    body["id"] = json!(id);
                    body["description"] = json!(format!("write {k}"));
                    client
                        .put(format!("{base}/Task/{id}"))
                        .body(body.to_string())
                };
                let sent = request
                    .bearer_auth(&token)
                    .header("content-type", "application/fhir+json")
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => {
                        let created: Value = response.json().await.unwrap();
                        if ids.len() < 4 {
                            ids.push(created["id"].as_str().unwrap().to_string());
                        }
                        acknowledged += 1;
                    }
                    Ok(response) => panic!("a write was refused: {}", response.status()),
                    Err(e) if e.is_connect() => {}
                    Err(_) => uncertain += 1,
                }
            }
            (acknowledged, uncertain)
        });
        Load { stop, task }
    }

    /// Stops writing; returns (acknowledged writes, writes whose fate is unknown).
    async fn stop(self) -> (i64, i64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Waits until the receiver holds every acknowledged write's event and asserts the numbers
/// are contiguous; returns how many arrived twice.
async fn all_delivered(
    receiver: &Receiver,
    hook: &str,
    acknowledged: i64,
    uncertain: i64,
) -> usize {
    let numbers = eventually("every acknowledged write is delivered", || async {
        let numbers = receiver.event_numbers(hook);
        let distinct: BTreeSet<i64> = numbers.iter().copied().collect();
        (distinct.len() as i64 >= acknowledged).then_some(numbers)
    })
    .await;
    let distinct: BTreeSet<i64> = numbers.iter().copied().collect();
    assert!(
        distinct.len() as i64 <= acknowledged + uncertain,
        "{} events for {acknowledged} acknowledged and {uncertain} uncertain writes",
        distinct.len()
    );
    check_contiguous("webhook", &numbers, acknowledged)
}

async fn subscribe(cluster: &Cluster, node: usize, body: &Value) -> String {
    let (status, created) = cluster.post(node, "/Subscription", body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    created["id"].as_str().unwrap().to_string()
}

fn websocket_subscription(base: &str) -> Value {
    let mut s = subscription(base, "task-changed", &[], "unused", "id-only");
    s["channel"] = json!({
        "type": "websocket",
        "payload": "application/fhir+json",
        "_payload": s["channel"]["_payload"].clone(),
    });
    s
}

/// A websocket bound on node `bind_on` with a token minted on node `mint_on`; every event
/// number it hears is pushed to the returned list.
async fn listen(
    cluster: &Cluster,
    subscription: &str,
    mint_on: usize,
    bind_on: usize,
) -> Arc<Mutex<Vec<i64>>> {
    let (status, params) = cluster
        .get(
            mint_on,
            &format!("/Subscription/{subscription}/$get-ws-binding-token"),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{params}");
    let token = params["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "token")
        .unwrap()["valueString"]
        .as_str()
        .unwrap()
        .to_string();
    let url = format!("{}/ws", cluster.base(bind_on).replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects");
    socket
        .send(Message::Text(format!("bind-with-token {token}").into()))
        .await
        .unwrap();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let handshake = Arc::new(tokio::sync::Notify::new());
    let (sink, handshaken) = (heard.clone(), handshake.clone());
    tokio::spawn(async move {
        while let Some(Ok(frame)) = socket.next().await {
            let Message::Text(text) = frame else { continue };
            let bundle: Value = serde_json::from_str(text.as_str()).unwrap();
            let kind = common::receiver::parameter(&bundle, "type").unwrap_or_default();
            assert_ne!(
                bundle["resourceType"], "OperationOutcome",
                "bind failed: {bundle}"
            );
            if kind == "handshake" {
                handshaken.notify_one();
            }
            sink.lock().unwrap().extend(event_numbers(&bundle));
        }
    });
    tokio::time::timeout(Duration::from_secs(20), handshake.notified())
        .await
        .expect("the token minted on one node binds on another");
    heard
}

/// An exchange and an exclusive queue on the local RabbitMQ; event numbers of every message
/// consumed go to the returned list.
async fn consume(routing_key: &str) -> (String, Arc<Mutex<Vec<i64>>>, Connection) {
    let connection = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("RabbitMQ is needed for the cluster tests (127.0.0.1:5672, guest/guest)");
    let channel = connection.create_channel().await.unwrap();
    let exchange = format!("baton-cluster-{}", uuid::Uuid::new_v4().simple());
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.name().as_str().into(),
            exchange.as_str().into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.name().as_str().into(),
            "cluster-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let sink = heard.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let bundle: Value = serde_json::from_slice(&delivery.data).unwrap();
            sink.lock().unwrap().extend(event_numbers(&bundle));
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
    });
    (exchange, heard, connection)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_on_every_node_reach_every_channel_once_and_in_order() {
    let cluster = Cluster::start(3, &redis_url(), &[("BATON_AMQP_URL", BROKER)]).await;
    let receiver = Receiver::start().await;
    let hook = subscribe(
        &cluster,
        0,
        &subscription(
            cluster.base(0),
            "task-changed",
            &[],
            &receiver.url,
            "id-only",
        ),
    )
    .await;
    receiver
        .wait_for("the handshake", |r| {
            r.iter().any(|n| n.kind() == "handshake")
        })
        .await;
    let socket = subscribe(&cluster, 1, &websocket_subscription(cluster.base(1))).await;
    let heard_socket = listen(&cluster, &socket, 0, 2).await;
    let (exchange, heard_queue, _connection) = consume("cluster").await;
    let mut message = subscription(cluster.base(2), "task-changed", &[], "unused", "id-only");
    message["channel"] = json!({
        "type": "message",
        "endpoint": format!("amqp://127.0.0.1:5672/%2F?exchange={exchange}&routing_key=cluster"),
        "payload": "application/fhir+json",
        "_payload": message["channel"]["_payload"].clone(),
    });
    let queue = subscribe(&cluster, 2, &message).await;

    let written = write_everywhere(&cluster, 6, 10).await as i64;

    let hook_numbers = eventually("every write reaches the webhook", || async {
        let numbers = receiver.event_numbers(&hook);
        (numbers.len() as i64 >= written).then_some(numbers)
    })
    .await;
    let socket_numbers = eventually("every write reaches the websocket", || async {
        let numbers = heard_socket.lock().unwrap().clone();
        (numbers.len() as i64 >= written).then_some(numbers)
    })
    .await;
    let queue_numbers = eventually("every write reaches the queue", || async {
        let numbers = heard_queue.lock().unwrap().clone();
        (numbers.len() as i64 >= written).then_some(numbers)
    })
    .await;
    // A moment for anything extra to arrive, then: all of them, once each, in order.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (what, numbers) in [
        ("webhook", receiver.event_numbers(&hook)),
        ("websocket", heard_socket.lock().unwrap().clone()),
        ("queue", heard_queue.lock().unwrap().clone()),
    ] {
        assert_eq!(
            check_contiguous(what, &numbers, written),
            0,
            "{what}: duplicates"
        );
        assert_eq!(numbers.len() as i64, written, "{what}: one event per write");
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "{what}: out of order: {numbers:?}"
        );
    }
    drop((hook_numbers, socket_numbers, queue_numbers));
    let (_, status) = cluster
        .get(1, &format!("/Subscription/{queue}/$status"))
        .await;
    assert_eq!(
        common::receiver::parameter(&status, "events-since-subscription-start").as_deref(),
        Some(written.to_string().as_str()),
        "any node reports the shared counter: {status}"
    );
    // Exactly one node matches.
    let mut matching = 0;
    for i in 0..3 {
        if cluster.ready(i).await["matcher"] == true {
            matching += 1;
        }
    }
    assert_eq!(matching, 1, "one matcher lease holder");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_load_leaves_nothing_undone() {
    let mut cluster = Cluster::start(3, &redis_url(), &[]).await;
    let receiver = Receiver::start().await;
    let hook = subscribe(
        &cluster,
        1,
        &subscription(
            cluster.base(1),
            "task-changed",
            &[],
            &receiver.url,
            "id-only",
        ),
    )
    .await;
    receiver
        .wait_for("the handshake", |r| {
            r.iter().any(|n| n.kind() == "handshake")
        })
        .await;
    let load = Load::start(&cluster);
    // Kill the node that numbers events while writes land on every node and its deliveries
    // are in flight.
    eventually("some writes delivered", || async {
        (receiver.event_numbers(&hook).len() >= 20).then_some(())
    })
    .await;
    let victim = eventually("a matcher", || cluster.matcher()).await;
    cluster.kill(victim).await;
    eventually("a surviving node takes over the matcher", || async {
        cluster.matcher().await.filter(|&m| m != victim)
    })
    .await;
    // Writes go on for a while under the new matcher.
    let seen = receiver.event_numbers(&hook).len();
    eventually("deliveries after the take-over", || async {
        (receiver.event_numbers(&hook).len() >= seen + 20).then_some(())
    })
    .await;
    let (acknowledged, uncertain) = load.stop().await;
    let duplicates = all_delivered(&receiver, &hook, acknowledged, uncertain).await;
    // Only what was in flight when the node died may be sent again.
    assert!(duplicates <= 20, "{duplicates} duplicates after one crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_node_finishes_what_a_dead_node_left() {
    let mut cluster = Cluster::start(1, &redis_url(), &[]).await;
    let receiver = Receiver::start().await;
    let hook = subscribe(
        &cluster,
        0,
        &subscription(
            cluster.base(0),
            "task-changed",
            &[],
            &receiver.url,
            "id-only",
        ),
    )
    .await;
    receiver
        .wait_for("the handshake", |r| {
            r.iter().any(|n| n.kind() == "handshake")
        })
        .await;
    // The endpoint goes down; events pile up in the store.
    receiver.fail_with(Some(503));
    let written = write_everywhere(&cluster, 3, 3).await as i64;
    eventually("the changes are matched before the node dies", || async {
        let (_, status) = cluster
            .get(0, &format!("/Subscription/{hook}/$status"))
            .await;
        let counted = common::receiver::parameter(&status, "events-since-subscription-start")?;
        (counted.parse::<i64>().ok()? >= written).then_some(())
    })
    .await;
    cluster.kill(0).await;
    receiver.fail_with(None);
    let mut late = cluster;
    late.add_node().await;
    let numbers = eventually("the late node delivers everything", || async {
        let numbers: Vec<i64> = receiver.event_numbers(&hook);
        let distinct: BTreeSet<i64> = numbers.iter().copied().collect();
        (distinct.len() as i64 >= written).then_some(numbers)
    })
    .await;
    check_contiguous("webhook", &numbers, written);
    // New writes on the late node are matched and delivered too: it holds the matcher now.
    let more = write_everywhere(&late, 1, 1).await as i64;
    eventually("the late node matches new writes", || async {
        let distinct: BTreeSet<i64> = receiver.event_numbers(&hook).into_iter().collect();
        (distinct.len() as i64 >= written + more).then_some(())
    })
    .await;
}

/// How many event notifications node `i` has delivered to rest-hooks, from its `/metrics`.
async fn notifications_sent(cluster: &Cluster, i: usize) -> f64 {
    let text = cluster
        .client
        .get(format!("{}/metrics", cluster.root(i)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("baton_deliveries_total{")
                && l.contains("channel=\"rest-hook\"")
                && l.contains("type=\"event-notification\"")
                && l.contains("result=\"ok\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_delivers_what_prefers_it_and_a_dead_nodes_share_moves() {
    let mut cluster = Cluster::start(3, &redis_url(), &[]).await;
    let mut names = Vec::new();
    for i in 0..3 {
        eventually("every node sees three live nodes", || async {
            (cluster.ready(i).await["live_nodes"] == 3).then_some(())
        })
        .await;
        names.push(cluster.ready(i).await["node"].as_str().unwrap().to_string());
    }
    let receiver = Receiver::start().await;
    // Enough subscriptions that each node is preferred by some (by chance all but certain:
    // a node is preferred by none of 48 with probability 3 * (2/3)^48, about 1e-8).
    let mut hooks = Vec::new();
    for k in 0..48 {
        let node = k % 3;
        let body = subscription(
            cluster.base(node),
            "task-changed",
            &[],
            &receiver.url,
            "id-only",
        );
        hooks.push(subscribe(&cluster, node, &body).await);
    }
    receiver
        .wait_for("every handshake", |r| {
            r.iter().filter(|n| n.kind() == "handshake").count() >= hooks.len()
        })
        .await;
    let all_heard = |expected: i64| {
        let receiver = &receiver;
        let hooks = &hooks;
        async move {
            hooks
                .iter()
                .all(|h| {
                    let distinct: BTreeSet<i64> = receiver.event_numbers(h).into_iter().collect();
                    distinct.len() as i64 >= expected
                })
                .then_some(())
        }
    };
    let written = write_everywhere(&cluster, 3, 2).await as i64;
    eventually("every subscription hears every write", || {
        all_heard(written)
    })
    .await;
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(notifications_sent(&cluster, i).await);
    }
    let total: f64 = sent.iter().sum();
    for (i, n) in sent.iter().enumerate() {
        // Not the matcher lease holder doing nearly all of it: every node its share.
        assert!(
            *n > 0.0 && *n < 0.75 * total,
            "node {i} sent {n} of {total} notifications: {sent:?}"
        );
    }

    // Kill a node that does not match, so that only its deliveries have to move.
    let matcher = eventually("a matcher", || cluster.matcher()).await;
    let victim = (matcher + 1) % 3;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let orphaned: Vec<&String> = hooks
        .iter()
        .filter(|h| baton::hub::nodes::preferred_node(h, &names) == Some(names[victim].as_str()))
        .collect();
    assert!(!orphaned.is_empty(), "the victim is preferred by some");
    cluster.kill(victim).await;
    let before: Vec<f64> = {
        let mut before = Vec::new();
        for &i in &survivors {
            before.push(notifications_sent(&cluster, i).await);
        }
        before
    };
    let more = write_everywhere(&cluster, 3, 2).await as i64;
    eventually(
        "every subscription, the victim's too, hears the writes after the kill",
        || all_heard(written + more),
    )
    .await;
    for hook in &hooks {
        check_contiguous(hook, &receiver.event_numbers(hook), written + more);
    }
    let mut grown = 0.0;
    for (k, &i) in survivors.iter().enumerate() {
        let now = notifications_sent(&cluster, i).await;
        assert!(now > before[k], "survivor {i} kept delivering");
        grown += now - before[k];
    }
    // Each of the victim's subscriptions heard at least one notification after the kill,
    // and only the survivors were left to send it.
    assert!(
        grown >= orphaned.len() as f64,
        "{grown} notifications after the kill, {} subscriptions moved",
        orphaned.len()
    );
}

/// A Redis server of the test's own, so that restarting it disturbs no other test.
struct OwnRedis {
    port: u16,
    process: Option<tokio::process::Child>,
}

impl OwnRedis {
    async fn start(port: u16) -> OwnRedis {
        let mut redis = OwnRedis {
            port,
            process: None,
        };
        redis.restart().await;
        redis
    }

    async fn restart(&mut self) {
        self.stop().await;
        let process = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server is needed for this test");
        self.process = Some(process);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill().await.unwrap();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = OwnRedis::start(port).await;
    let cluster = Cluster::start(3, &redis.url(), &[]).await;
    let receiver = Receiver::start().await;
    let hook = subscribe(
        &cluster,
        0,
        &subscription(
            cluster.base(0),
            "task-changed",
            &[],
            &receiver.url,
            "id-only",
        ),
    )
    .await;
    receiver
        .wait_for("the handshake", |r| {
            r.iter().any(|n| n.kind() == "handshake")
        })
        .await;
    let load = Load::start(&cluster);
    eventually("some writes delivered", || async {
        (receiver.event_numbers(&hook).len() >= 10).then_some(())
    })
    .await;

    redis.stop().await;
    // Each node notices on its own next Redis command or reconnect, so each is waited for.
    eventually("the nodes notice Redis is gone", || async {
        let mut all = true;
        for i in 0..2 {
            all &= cluster.ready(i).await["redis"] == "unavailable";
        }
        all.then_some(())
    })
    .await;
    let ready = cluster.ready(1).await;
    assert_eq!(ready["status"], "ready", "still serving: {ready}");
    assert_eq!(ready["degraded"], json!(["redis"]), "{ready}");
    // Without Redis the nodes poll: writes are still matched and delivered.
    let seen = receiver.event_numbers(&hook).len();
    eventually("delivery goes on without Redis", || async {
        (receiver.event_numbers(&hook).len() >= seen + 10).then_some(())
    })
    .await;

    redis.restart().await;
    eventually("the nodes are back on Redis", || async {
        let mut all = true;
        for i in 0..3 {
            all &= cluster.ready(i).await["redis"] == "ok";
        }
        all.then_some(())
    })
    .await;
    let seen = receiver.event_numbers(&hook).len();
    eventually("deliveries after Redis is back", || async {
        (receiver.event_numbers(&hook).len() >= seen + 10).then_some(())
    })
    .await;
    let (acknowledged, uncertain) = load.stop().await;
    assert_eq!(uncertain, 0, "no node died, so every write has an answer");
    assert_eq!(
        all_delivered(&receiver, &hook, acknowledged, uncertain).await,
        0,
        "no duplicates"
    );
}
