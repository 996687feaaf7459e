//! Connection limits and request rates against the real server: header-read and idle
//! deadlines, the per-client and global connection caps, the websocket bind deadline, the
//! per-identity request rate, and graceful shutdown through our own accept loop.
//!
//! Raw TCP connections stand in for misbehaving clients. Several clients on one machine are
//! told apart by their source address: every address of 127.0.0.0/8 reaches the server.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::TestServer;
use common::socket::{Socket, next_json};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

/// The server's TCP address.
fn address(server: &TestServer) -> SocketAddr {
    server.root.trim_start_matches("http://").parse().unwrap()
}

/// A TCP connection from `source` (a loopback address), so that one test can be several clients.
async fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(server).await.unwrap()
}

/// Everything the server sends until it closes the connection; panics if it stays open
/// past a bounded wait.
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the server kept the connection open; it sent: {}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Ok(Err(e)) => panic!("reading failed: {e}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Reads one response (head and `content-length` body) from a kept-alive connection.
async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            let status = head.split(' ').nth(1).unwrap().parse().unwrap();
            // An interim 100 Continue has no body and is followed by the real answer.
            if status == 100 {
                return (100, String::new());
            }
            if body.len() >= length {
                return (status, body.to_string());
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .expect("a response within 20 s")
            .expect("the connection is open");
        assert!(n > 0, "closed before a whole response: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

/// One request on a kept-alive connection; returns the status.
async fn exchange(stream: &mut TcpStream, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nhost: baton\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(stream).await.0
}

/// The value of a counter with these labels in `/metrics`, if it is there.
async fn metric(server: &TestServer, name_and_labels: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", server.root))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_read_timeout() {
    let server = TestServer::start_with(|c| {
        c.limits.header_read_timeout_seconds = 1;
        c.limits.idle_timeout_seconds = 600;
    })
    .await;
    let mut silent = connect_from("127.0.0.2", address(&server)).await;
    assert_eq!(
        read_until_closed(&mut silent).await,
        "",
        "closed without a word"
    );
    let closed = metric(
        &server,
        "baton_connections_closed_total{reason=\"header_timeout\"}",
    )
    .await;
    assert!(closed.is_some_and(|n| n >= 1.0), "counted: {closed:?}");
}

#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_read_timeout() {
    let server = TestServer::start_with(|c| {
        c.limits.header_read_timeout_seconds = 1;
        c.limits.idle_timeout_seconds = 600;
    })
    .await;
    // A first request is answered, so the deadline also holds for a later head on a kept-alive
    // connection, counted from its first byte.
    let mut slow = connect_from("127.0.0.2", address(&server)).await;
    assert_eq!(exchange(&mut slow, "/healthz").await, 200);
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: baton\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_until_closed(&mut slow).await,
        "",
        "no answer to half a head"
    );

    let mut fresh = connect_from("127.0.0.2", address(&server)).await;
    fresh
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: baton\r\n")
        .await
        .unwrap();
    assert_eq!(read_until_closed(&mut fresh).await, "");
}

#[tokio::test]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout_but_never_mid_request() {
    let server = TestServer::start_with(|c| {
        c.limits.header_read_timeout_seconds = 600;
        c.limits.idle_timeout_seconds = 1;
    })
    .await;
    let admin = server.admin();
    // A request whose body is still coming is in progress: it outlasts the idle timeout.
    let body =
        json!({"resourceType": "Task", "status": "requested", "intent": "order"}).to_string();
    let mut busy = connect_from("127.0.0.2", address(&server)).await;
    let head = format!(
        "POST /fhir/Task HTTP/1.1\r\nhost: baton\r\nauthorization: Bearer {admin}\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
        body.len()
    );
    busy.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(
        read_response(&mut busy).await.0,
        100,
        "the handler is reading the body"
    );

    // A kept-alive connection serves several requests, then is closed once idle.
    let mut idle = connect_from("127.0.0.2", address(&server)).await;
    assert_eq!(exchange(&mut idle, "/healthz").await, 200);
    assert_eq!(exchange(&mut idle, "/healthz").await, 200);
    assert_eq!(read_until_closed(&mut idle).await, "");

    // `idle` sat idle for the idle timeout after `busy` began its request: `busy` is still
    // served.
    busy.write_all(body.as_bytes()).await.unwrap();
    let (status, created) = read_response(&mut busy).await;
    assert_eq!(status, 201, "{created}");
    let closed = metric(
        &server,
        "baton_connections_closed_total{reason=\"idle_timeout\"}",
    )
    .await;
    assert!(closed.is_some_and(|n| n >= 1.0), "counted: {closed:?}");
}

#[tokio::test]
async fn connections_over_the_per_client_cap_are_refused_while_others_are_served() {
    let server = TestServer::start_with(|c| {
        c.limits.max_connections_per_client = 2;
        c.limits.header_read_timeout_seconds = 600;
        c.limits.idle_timeout_seconds = 600;
    })
    .await;
    let at = address(&server);
    let mut first = connect_from("127.0.0.2", at).await;
    let mut second = connect_from("127.0.0.2", at).await;
    assert_eq!(exchange(&mut first, "/healthz").await, 200);
    assert_eq!(exchange(&mut second, "/healthz").await, 200);

    let mut third = connect_from("127.0.0.2", at).await;
    let refusal = read_until_closed(&mut third).await;
    assert!(refusal.starts_with("HTTP/1.1 429 "), "{refusal}");
    assert!(
        refusal.to_ascii_lowercase().contains("retry-after: 1"),
        "{refusal}"
    );
    let outcome: Value = serde_json::from_str(refusal.split_once("\r\n\r\n").unwrap().1).unwrap();
    common::assert_outcome(&outcome, "throttled");

    // Another client is served meanwhile, and the first one is again once it closes one.
    let mut other = connect_from("127.0.0.3", at).await;
    assert_eq!(exchange(&mut other, "/healthz").await, 200);
    drop(first);
    common::eventually("a slot for the first client again", || async {
        let mut again = connect_from("127.0.0.2", at).await;
        again
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: baton\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        read_until_closed(&mut again)
            .await
            .starts_with("HTTP/1.1 200 ")
            .then_some(())
    })
    .await;
    assert_eq!(exchange(&mut second, "/healthz").await, 200);
    let refused = metric(
        &server,
        "baton_connections_refused_total{reason=\"per_client\"}",
    )
    .await;
    assert!(refused.is_some_and(|n| n >= 1.0), "counted: {refused:?}");
}

async fn connect_ws(url: &str) -> Socket {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects")
        .0
}

#[tokio::test]
async fn at_the_global_cap_new_connections_wait_until_one_closes() {
    let server = TestServer::start_with(|c| {
        c.limits.max_connections = 2;
        c.limits.max_connections_per_client = 0;
        // Short deadlines reap the test client's own pooled connection.
        c.limits.header_read_timeout_seconds = 1;
        c.limits.idle_timeout_seconds = 1;
        c.limits.websocket_bind_timeout_seconds = 600;
    })
    .await;
    // Two websockets hold both slots: the HTTP deadlines end with the upgrade.
    let url = format!("ws://{}/fhir/ws", address(&server));
    let mut holders = vec![connect_ws(&url).await, connect_ws(&url).await];

    let mut waiting = connect_from("127.0.0.2", address(&server)).await;
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: baton\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_secs(2), waiting.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "at the cap the connection waits in the backlog, unanswered: {early:?}"
    );

    holders.pop().unwrap().close(None).await.unwrap();
    let answer = read_until_closed(&mut waiting).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    let deferred = metric(&server, "baton_connections_deferred_total").await;
    assert!(deferred.is_some_and(|n| n >= 1.0), "counted: {deferred:?}");
}

fn ws_subscription(base: &str) -> Value {
    let mut s = common::subscription(
        base,
        "task-changed",
        &["owner=Practitioner/bound"],
        "unused",
        "id-only",
    );
    s["channel"] = json!({
        "type": "websocket",
        "payload": "application/fhir+json",
        "_payload": s["channel"]["_payload"].clone(),
    });
    s
}

/// Waits (bounded) for the server's close frame and returns its code and reason.
async fn close_frame(socket: &mut Socket) -> (CloseCode, String) {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a frame within 20 s")
            .expect("a close frame before the end")
            .expect("a valid frame");
        match frame {
            Message::Close(Some(frame)) => return (frame.code, frame.reason.to_string()),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_unbound_websocket_is_closed_after_the_bind_deadline_while_a_bound_one_stays() {
    let server = TestServer::start_with(|c| {
        c.limits.websocket_bind_timeout_seconds = 2;
        c.limits.header_read_timeout_seconds = 1;
        c.limits.idle_timeout_seconds = 1;
    })
    .await;
    let admin = server.admin();
    let (status, created) = server
        .post_json("/Subscription", &admin, &ws_subscription(&server.base))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap();
    let (token, url) = server.ws_binding(&admin, id).await;
    let mut bound = connect_ws(&url).await;
    bound
        .send(Message::Text(format!("bind-with-token {token}").into()))
        .await
        .unwrap();
    let handshake = next_json(&mut bound).await;
    assert_eq!(
        common::receiver::parameter(&handshake, "type").as_deref(),
        Some("handshake")
    );

    let mut unbound = connect_ws(&url).await;
    let (code, reason) = close_frame(&mut unbound).await;
    assert_eq!(code, CloseCode::Policy, "{reason}");
    assert!(reason.contains("bind"), "{reason}");

    // The bound socket has been quiet for longer than the bind deadline and the HTTP idle
    // timeout, and is still served.
    server
        .create_task(&common::task("requested", Some("Practitioner/bound")))
        .await;
    let event = next_json(&mut bound).await;
    assert_eq!(
        common::receiver::parameter(&event, "type").as_deref(),
        Some("event-notification")
    );
    let closed = metric(&server, "baton_websocket_closed_unbound_total").await;
    assert!(closed.is_some_and(|n| n >= 1.0), "counted: {closed:?}");
}

#[tokio::test]
async fn a_practitioner_over_its_rate_gets_429_while_others_and_admins_do_not() {
    let server = TestServer::start_with(|c| {
        c.limits.requests_per_second_per_token = 1;
        c.limits.request_burst_per_token = 2;
    })
    .await;
    let alice = server.practitioner("Practitioner/alice");
    // At one request a second with a burst of two, a run of quick requests meets a refusal.
    let mut refusal = None;
    for _ in 0..50 {
        let response = server
            .request(reqwest::Method::GET, "/Task?_count=1", &alice)
            .send()
            .await
            .unwrap();
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            refusal = Some(response);
            break;
        }
        assert_eq!(response.status(), StatusCode::OK);
    }
    let refusal = refusal.expect("a 429 within 50 quick requests");
    let retry_after: u64 = refusal.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    let (_, outcome) = common::body(refusal).await;
    common::assert_outcome(&outcome, "throttled");

    // Another identity has its own budget, and admins (integration accounts) have none.
    let bob = server.practitioner("Practitioner/bob");
    let (status, _) = server.get("/Task?_count=1", &bob).await;
    assert_eq!(status, StatusCode::OK);
    let admin = server.admin();
    for _ in 0..50 {
        let (status, body) = server.get("/Task?_count=1", &admin).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let throttled = metric(
        &server,
        "baton_requests_throttled_total{role=\"practitioner\"}",
    )
    .await;
    assert!(
        throttled.is_some_and(|n| n >= 1.0),
        "counted: {throttled:?}"
    );
}

/// A server whose shutdown the test controls.
struct Running {
    address: SocketAddr,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<baton::Result<()>>,
    admin: String,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(grace_seconds: u64) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let (url, _) = common::database_url_for(dir.path()).await;
        let config = baton::Config {
            data_dir: dir.path().to_path_buf(),
            jwt_secret: Some(common::SECRET.into()),
            database_url: Some(url),
            shutdown_grace_seconds: grace_seconds,
            ..baton::Config::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(baton::run(config.clone(), listener, shutdown.clone()));
        common::eventually("the server answers", || async {
            let mut stream = TcpStream::connect(address).await.ok()?;
            (exchange(&mut stream, "/readyz").await == 200).then_some(())
        })
        .await;
        let admin =
            baton::auth::Authenticator::new(common::SECRET, 0, &config.auth.performer_types_claim)
                .issue(baton::auth::Role::Admin, None, &[], 600)
                .unwrap();
        Running {
            address,
            shutdown,
            handle,
            admin,
            _dir: dir,
        }
    }

    /// Starts creating a Task and stops once the handler is reading its body: the request is
    /// in progress until the body is sent.
    async fn request_in_progress(&self) -> (TcpStream, String) {
        let body =
            json!({"resourceType": "Task", "status": "requested", "intent": "order"}).to_string();
        let mut stream = TcpStream::connect(self.address).await.unwrap();
        let head = format!(
            "POST /fhir/Task HTTP/1.1\r\nhost: baton\r\nauthorization: Bearer {}\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nexpect: 100-continue\r\n\r\n",
            self.admin,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut stream).await.0, 100);
        (stream, body)
    }

    /// Waits (bounded) for `run` to return, and returns its result.
    async fn stopped(self) -> baton::Result<()> {
        let result = tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("the server stops within 30 s")
            .expect("the server task");
        common::forget_database(self._dir.path());
        result
    }
}

#[tokio::test]
async fn shutdown_finishes_requests_in_progress_and_closes_websockets_with_1001() {
    let server = Running::start(60).await;
    let mut socket = connect_ws(&format!("ws://{}/fhir/ws", server.address)).await;
    let (mut stream, body) = server.request_in_progress().await;

    server.shutdown.cancel();
    let (code, reason) = close_frame(&mut socket).await;
    assert_eq!(code, CloseCode::Away, "{reason}");
    common::eventually("new connections are refused", || async {
        TcpStream::connect(server.address)
            .await
            .is_err()
            .then_some(())
    })
    .await;

    stream.write_all(body.as_bytes()).await.unwrap();
    let (status, created) = read_response(&mut stream).await;
    assert_eq!(
        status, 201,
        "the request in progress is answered: {created}"
    );
    server.stopped().await.expect("a clean stop");
}

#[tokio::test]
async fn requests_still_running_at_the_grace_deadline_are_cut_off() {
    let server = Running::start(1).await;
    let (mut stream, _body) = server.request_in_progress().await;
    server.shutdown.cancel();
    // The body never comes: at the end of the grace period the connection is dropped and
    // the server stops.
    let answer = read_until_closed(&mut stream).await;
    assert!(!answer.contains("201"), "{answer}");
    server.stopped().await.expect("a clean stop");
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_still_served() {
    let server = TestServer::start_with(|c| {
        c.limits.header_read_timeout_seconds = 1;
        c.limits.idle_timeout_seconds = 1;
    })
    .await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let admin = server.admin();
    for _ in 0..3 {
        let response = client
            .get(format!("{}/Task?_count=1", server.base))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
    }
}
