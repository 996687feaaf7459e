//! Input hygiene (issue 13): repeated JSON keys, token `nbf`/`crit`, narratives with active
//! content, control characters, compressed bodies, dot-segment ids, topics named on another
//! server's base, and rest-hook endpoints that reach internal addresses. Each refusal is a
//! precise 4xx with an OperationOutcome, and nothing is stored.

mod common;

use std::time::Duration;

use common::{SECRET, TestServer, assert_outcome, subscription, task};
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const XHTML: &str = "http://www.w3.org/1999/xhtml";

fn div(inner: &str) -> String {
    format!("<div xmlns=\"{XHTML}\">{inner}</div>")
}

/// Sends a body as given, with its content type and any extra headers.
async fn send(
    server: &TestServer,
    method: Method,
    path: &str,
    content_type: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut request = server
        .request(method, path, &server.admin())
        .header("content-type", content_type)
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    common::body(request.send().await.unwrap()).await
}

/// Asserts a 4xx OperationOutcome with the code, a diagnostic containing `needle` and, when
/// given, the expression.
fn assert_refused(
    what: &str,
    (status, body): &(StatusCode, Value),
    expected: StatusCode,
    code: &str,
    needle: &str,
    expression: Option<&str>,
) {
    assert_eq!(*status, expected, "{what}: {body}");
    assert_outcome(body, code);
    let diagnostics = body["issue"][0]["diagnostics"].as_str().unwrap_or_default();
    assert!(
        diagnostics.contains(needle),
        "{what}: '{diagnostics}' does not contain '{needle}'"
    );
    if let Some(expression) = expression {
        assert_eq!(
            body["issue"][0]["expression"],
            json!([expression]),
            "{what}: {body}"
        );
    }
}

/// Every Task id the admin can see.
async fn task_ids(server: &TestServer) -> Vec<String> {
    server.search_ids("_count=100", &server.admin()).await
}

/// Every Subscription id.
async fn subscription_ids(server: &TestServer) -> Vec<String> {
    let (status, bundle) = server.get("/Subscription", &server.admin()).await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect()
}

/// A websocket Subscription (active at once, no handshake) to a topic on the server's base.
fn ws_subscription(server: &TestServer) -> Value {
    let mut s = subscription(&server.base, "task-changed", &[], "unused", "id-only");
    s["channel"] = json!({ "type": "websocket", "payload": "application/fhir+json" });
    s
}

#[tokio::test]
async fn repeated_json_keys_are_refused_wherever_a_client_sends_json() {
    let server = TestServer::start().await;
    let existing = server.create_task(&task("requested", None)).await;
    let id = existing["id"].as_str().unwrap().to_string();
    let fhir = "application/fhir+json";
    let cases = [
        (
            "top-level key twice",
            Method::POST,
            "/Task".to_string(),
            fhir,
            r#"{"resourceType":"Task","status":"requested","intent":"order","status":"draft"}"#
                .to_string(),
            "the key 'status' occurs twice in the top-level object",
        ),
        (
            "nested key twice",
            Method::POST,
            "/Task".to_string(),
            fhir,
            r##"{"resourceType":"Task","status":"requested","intent":"order",
                "for":{"reference":"#p"},
                "contained":[{"resourceType":"Patient","id":"p","id":"q"}]}"##
                .to_string(),
            "the key 'id' occurs twice in the object at contained[0]",
        ),
        (
            "update with a key twice",
            Method::PUT,
            format!("/Task/{id}"),
            fhir,
            format!(
                r#"{{"resourceType":"Task","id":"{id}","status":"ready","intent":"order",
                    "owner":{{"reference":"Practitioner/1"}},
                    "owner":{{"reference":"Practitioner/2"}}}}"#
            ),
            "the key 'owner' occurs twice",
        ),
        (
            "patch operation with a key twice",
            Method::PATCH,
            format!("/Task/{id}"),
            "application/json-patch+json",
            r#"[{"op":"replace","path":"/status","value":"ready","value":"cancelled"}]"#
                .to_string(),
            "the key 'value' occurs twice in the object at [0]",
        ),
        (
            "subscription with a key twice",
            Method::POST,
            "/Subscription".to_string(),
            fhir,
            {
                let mut text = ws_subscription(&server).to_string();
                text.insert_str(1, r#""reason":"first","#);
                text
            },
            "the key 'reason' occurs twice",
        ),
    ];
    for (what, method, path, content_type, body, needle) in cases {
        let answer = send(&server, method, &path, content_type, &body, &[]).await;
        assert_refused(
            what,
            &answer,
            StatusCode::BAD_REQUEST,
            "structure",
            needle,
            None,
        );
    }
    assert_eq!(task_ids(&server).await, vec![id.clone()]);
    let (_, current) = server.get(&format!("/Task/{id}"), &server.admin()).await;
    assert_eq!(current["meta"]["versionId"], "1", "{current}");
    assert_eq!(current["status"], "requested");
    assert!(subscription_ids(&server).await.is_empty());
}

/// Signs a token whose header and payload are exactly the given JSON text.
fn sign_raw(header: &str, payload: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!("{}.{}", e.encode(header), e.encode(payload));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(message.as_bytes());
    format!("{message}.{}", e.encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn tokens_with_repeated_claims_crit_or_a_future_nbf_are_refused() {
    let server = TestServer::start().await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let exp = now + 600;
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;
    let cases = [
        (
            "role twice, the last one admin",
            sign_raw(
                header,
                &format!(
                    r#"{{"sub":"Practitioner/1","exp":{exp},"role":"auditor","fhirUser":"Practitioner/1","role":"admin"}}"#
                ),
            ),
            "the token's payload has the key 'role' more than once",
        ),
        (
            "crit in the header",
            sign_raw(
                r#"{"alg":"HS256","typ":"JWT","crit":["x-policy"],"x-policy":"strict"}"#,
                &format!(r#"{{"sub":"a","exp":{exp},"role":"admin"}}"#),
            ),
            "critical extensions ('crit')",
        ),
        (
            "nbf an hour from now",
            sign_raw(
                header,
                &format!(
                    r#"{{"sub":"a","exp":{exp},"nbf":{},"role":"admin"}}"#,
                    now + 3600
                ),
            ),
            "the token is not valid yet",
        ),
    ];
    for (what, token, needle) in cases {
        let response = server
            .request(Method::GET, "/Task", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers().get("www-authenticate").unwrap(),
            r#"Bearer error="invalid_token""#
        );
        let answer = common::body(response).await;
        assert_refused(
            what,
            &answer,
            StatusCode::UNAUTHORIZED,
            "login",
            needle,
            None,
        );
    }
    // The same signing with sound JSON and a past nbf is accepted: the refusals above are
    // about the JSON, not the signature.
    let sound = sign_raw(
        header,
        &format!(
            r#"{{"sub":"a","exp":{exp},"nbf":{},"role":"admin"}}"#,
            now - 60
        ),
    );
    let (status, body) = server.get("/Task", &sound).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn bind_frames_with_repeated_keys_are_refused_by_name() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let (status, created) = server
        .post_json("/Subscription", &admin, &ws_subscription(&server))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, params) = server
        .get(&format!("/Subscription/{id}/$get-ws-binding-token"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{params}");
    let token = params["parameter"][0]["valueString"].as_str().unwrap();
    let url = format!("{}/ws", server.base.replace("http://", "ws://"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    // The token twice: which one a lenient parser keeps is exactly the ambiguity refused.
    let frame =
        format!(r#"{{"type":"bind-with-token","payload":{{"token":"forged","token":"{token}"}}}}"#);
    socket.send(Message::text(frame)).await.unwrap();
    let reply = loop {
        let next = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a frame within 20 s")
            .expect("the socket is open")
            .expect("a valid frame");
        if let Message::Text(text) = next {
            break serde_json::from_str::<Value>(text.as_str()).unwrap();
        }
    };
    assert_outcome(&reply, "not-supported");
    let diagnostics = reply["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        diagnostics.contains("the key 'token' occurs twice in the object at payload"),
        "{diagnostics}"
    );
    // The socket stays usable: the single-key frame binds and the handshake arrives.
    socket
        .send(Message::text(format!("bind-with-token {token}")))
        .await
        .unwrap();
    let handshake = loop {
        let next = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a frame within 20 s")
            .expect("the socket is open")
            .expect("a valid frame");
        if let Message::Text(text) = next {
            break serde_json::from_str::<Value>(text.as_str()).unwrap();
        }
    };
    assert_eq!(handshake["resourceType"], "Bundle", "{handshake}");
}

#[tokio::test]
async fn narratives_with_active_content_are_refused_and_not_stored() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let existing = server.create_task(&task("requested", None)).await;
    let id = existing["id"].as_str().unwrap().to_string();
    let with_text = |inner: &str| {
        let mut t = task("requested", None);
        t["text"] = json!({ "status": "generated", "div": div(inner) });
        t
    };
    let cases = [
        ("script", with_text("<script>alert(1)</script>"), "<script>"),
        (
            "event handler",
            with_text("<p onclick=\"alert(1)\">x</p>"),
            "event-handler attribute 'onclick'",
        ),
        (
            "image error handler",
            with_text("<img src=\"x\" onerror=\"alert(1)\"/>"),
            "'onerror'",
        ),
        (
            "javascript link",
            with_text("<a href=\"javascript:alert(1)\">x</a>"),
            "'javascript:' URL",
        ),
        (
            "encoded javascript link",
            with_text("<a href=\"&#106;ava&#x09;script:alert(1)\">x</a>"),
            "'javascript:' URL",
        ),
        (
            "vbscript link",
            with_text("<a href=\"vbscript:x\">x</a>"),
            "'vbscript:' URL",
        ),
        (
            "data image",
            with_text("<img src=\"data:text/html,x\"/>"),
            "'data:' URL",
        ),
        (
            "iframe",
            with_text("<iframe src=\"https://x\"></iframe>"),
            "<iframe>",
        ),
        ("object", with_text("<object>x</object>"), "<object>"),
        ("embed", with_text("<embed src=\"x\"/>"), "<embed>"),
        ("form", with_text("<form><p>x</p></form>"), "<form>"),
        (
            "style expression",
            with_text("<p style=\"width:expression(alert(1))\">x</p>"),
            "'expression('",
        ),
        (
            "comment hiding markup",
            with_text("<!-- --!><script>x</script> -->"),
            "a comment",
        ),
        (
            "no XHTML namespace",
            {
                let mut t = task("requested", None);
                t["text"] = json!({ "status": "generated", "div": "<div>x</div>" });
                t
            },
            "must declare the XHTML namespace",
        ),
    ];
    for (what, resource, needle) in cases {
        let answer = server.post_json("/Task", &admin, &resource).await;
        assert_refused(
            what,
            &answer,
            StatusCode::BAD_REQUEST,
            "value",
            needle,
            Some("Task.text.div"),
        );
    }
    // A contained resource's narrative is held to the same rules.
    let mut contained = task("requested", None);
    contained["for"] = json!({ "reference": "#p" });
    contained["contained"] = json!([{
        "resourceType": "Patient",
        "id": "p",
        "text": { "status": "generated", "div": div("<b onmouseover=\"x()\">Jo</b>") }
    }]);
    let answer = server.post_json("/Task", &admin, &contained).await;
    assert_refused(
        "contained narrative",
        &answer,
        StatusCode::BAD_REQUEST,
        "value",
        "'onmouseover'",
        Some("Task.contained[0].text.div"),
    );
    // So are updates and patches of an existing Task.
    let mut update = with_text("<script>x</script>");
    update["id"] = json!(id);
    let answer = server
        .put_json(&format!("/Task/{id}"), &admin, &update)
        .await;
    assert_refused(
        "update",
        &answer,
        StatusCode::BAD_REQUEST,
        "value",
        "<script>",
        Some("Task.text.div"),
    );
    let patch = json!([{ "op": "add", "path": "/text", "value": {
        "status": "generated", "div": div("<a href=\"javascript:x()\">x</a>")
    }}]);
    let answer = send(
        &server,
        Method::PATCH,
        &format!("/Task/{id}"),
        "application/json-patch+json",
        &patch.to_string(),
        &[],
    )
    .await;
    assert_refused(
        "patch",
        &answer,
        StatusCode::BAD_REQUEST,
        "value",
        "'javascript:' URL",
        Some("Task.text.div"),
    );
    // And a Subscription's narrative.
    let mut sub = ws_subscription(&server);
    sub["text"] = json!({ "status": "generated", "div": div("<script>x</script>") });
    let answer = server.post_json("/Subscription", &admin, &sub).await;
    assert_refused(
        "subscription narrative",
        &answer,
        StatusCode::BAD_REQUEST,
        "value",
        "<script>",
        Some("Subscription.text.div"),
    );

    assert_eq!(task_ids(&server).await, vec![id.clone()]);
    let (_, current) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(current["meta"]["versionId"], "1", "{current}");
    assert!(subscription_ids(&server).await.is_empty());

    // Basic formatting is still welcome.
    let good = with_text(
        "<p>Draw <b>two</b> tubes &amp; label them; see <a href=\"https://lab.example/how\">the \
         guide</a>.</p><table><tr><td style=\"color: rgb(200, 0, 0)\">urgent</td></tr></table>",
    );
    let (status, created) = server.post_json("/Task", &admin, &good).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["text"], good["text"]);
}

#[tokio::test]
async fn control_characters_are_refused_naming_the_element() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let existing = server.create_task(&task("requested", None)).await;
    let id = existing["id"].as_str().unwrap().to_string();
    let with = |mutate: fn(&mut Value)| {
        let mut t = task("requested", None);
        mutate(&mut t);
        t
    };
    let cases = [
        (
            "NUL in the description",
            with(|t| t["description"] = json!("draw\u{0}blood")),
            "Task.description",
            "U+0000",
        ),
        (
            "escape in a note",
            with(|t| t["note"] = json!([{ "text": "fine" }, { "text": "\u{1b}[31mred" }])),
            "Task.note[1].text",
            "U+001B",
        ),
        (
            "bell in a code",
            with(|t| t["code"] = json!({ "coding": [{ "system": "http://x", "code": "a\u{7}" }] })),
            "Task.code.coding[0].code",
            "U+0007",
        ),
        (
            "C1 control in a contained resource",
            with(|t| {
                t["for"] = json!({ "reference": "#p" });
                t["contained"] = json!([{ "resourceType": "Patient", "id": "p",
                    "name": [{ "family": "Do\u{85}e" }] }]);
            }),
            "Task.contained[0].name[0].family",
            "U+0085",
        ),
    ];
    for (what, resource, expression, needle) in cases {
        let answer = server.post_json("/Task", &admin, &resource).await;
        assert_refused(
            what,
            &answer,
            StatusCode::BAD_REQUEST,
            "value",
            needle,
            Some(expression),
        );
    }
    let patch = json!([{ "op": "add", "path": "/description", "value": "x\u{0}" }]);
    let answer = send(
        &server,
        Method::PATCH,
        &format!("/Task/{id}"),
        "application/json-patch+json",
        &patch.to_string(),
        &[],
    )
    .await;
    assert_refused(
        "patch",
        &answer,
        StatusCode::BAD_REQUEST,
        "value",
        "U+0000",
        Some("Task.description"),
    );
    let mut sub = ws_subscription(&server);
    sub["reason"] = json!("watch\u{0}");
    let answer = server.post_json("/Subscription", &admin, &sub).await;
    assert_refused(
        "subscription",
        &answer,
        StatusCode::BAD_REQUEST,
        "value",
        "U+0000",
        Some("Subscription.reason"),
    );
    assert_eq!(task_ids(&server).await, vec![id.clone()]);
    assert!(subscription_ids(&server).await.is_empty());

    // Tab, carriage return and line feed are text.
    let fine = with(|t| t["description"] = json!("line one\r\n\tline two"));
    let (status, created) = server.post_json("/Task", &admin, &fine).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["description"], "line one\r\n\tline two");
}

#[tokio::test]
async fn compressed_bodies_are_refused_on_every_endpoint_that_reads_one() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let existing = server.create_task(&task("requested", None)).await;
    let id = existing["id"].as_str().unwrap().to_string();
    let (status, sub) = server
        .post_json("/Subscription", &admin, &ws_subscription(&server))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sub}");
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let fhir = "application/fhir+json";
    let mut update = existing.clone();
    update["status"] = json!("ready");
    let mut sub_update = ws_subscription(&server);
    sub_update["id"] = json!(sub_id);
    sub_update["reason"] = json!("changed");
    // Plain bodies labelled as compressed: before the fix they were read as if plain.
    let endpoints = [
        (
            Method::POST,
            "/Task".to_string(),
            fhir,
            task("requested", None).to_string(),
        ),
        (Method::PUT, format!("/Task/{id}"), fhir, update.to_string()),
        (
            Method::PATCH,
            format!("/Task/{id}"),
            "application/json-patch+json",
            json!([{ "op": "replace", "path": "/status", "value": "ready" }]).to_string(),
        ),
        (
            Method::POST,
            "/Task/_search".to_string(),
            "application/x-www-form-urlencoded",
            "status=requested".to_string(),
        ),
        (
            Method::POST,
            "/Subscription".to_string(),
            fhir,
            ws_subscription(&server).to_string(),
        ),
        (
            Method::PUT,
            format!("/Subscription/{sub_id}"),
            fhir,
            sub_update.to_string(),
        ),
    ];
    for (method, path, content_type, body) in &endpoints {
        for encoding in ["br", "gzip", "deflate", "identity, gzip", "x-unknown"] {
            let answer = send(
                &server,
                method.clone(),
                path,
                content_type,
                body,
                &[("content-encoding", encoding)],
            )
            .await;
            let what = format!("{method} {path} with {encoding}");
            let shown = encoding.rsplit(", ").next().unwrap();
            assert_refused(
                &what,
                &answer,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "not-supported",
                &format!("Content-Encoding '{shown}' is not supported"),
                None,
            );
        }
    }
    assert_eq!(task_ids(&server).await, vec![id.clone()]);
    let (_, current) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(current["meta"]["versionId"], "1", "{current}");
    assert_eq!(subscription_ids(&server).await, vec![sub_id.clone()]);
    let (_, stored) = server.get(&format!("/Subscription/{sub_id}"), &admin).await;
    assert_eq!(stored["reason"], "integration test", "{stored}");

    // identity is the absence of an encoding.
    let (method, path, content_type, body) = &endpoints[0];
    let (status, created) = send(
        &server,
        method.clone(),
        path,
        content_type,
        body,
        &[("content-encoding", "identity")],
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
}

/// Sends a request exactly as written (no URL normalisation, which would remove `..`) and
/// returns the status and the JSON body.
async fn raw(server: &TestServer, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let address = server.root.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.admin(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("an answer within 20 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = serde_json::from_str(body).unwrap_or(json!({ "raw": body }));
    (status, body)
}

#[tokio::test]
async fn ids_that_are_dot_segments_are_refused_on_every_route() {
    let server = TestServer::start().await;
    let dots = |id: &str| {
        let mut t = task("requested", None);
        t["id"] = json!(id);
        t.to_string()
    };
    let mut cases = Vec::new();
    for id in ["..", ".", "...", "%2e%2e", "%2E."] {
        let decoded = id.replace("%2e", ".").replace("%2E", ".");
        cases.extend([
            ("PUT", format!("/fhir/Task/{id}"), Some(dots(&decoded))),
            ("GET", format!("/fhir/Task/{id}"), None),
            ("PATCH", format!("/fhir/Task/{id}"), Some("[]".to_string())),
            ("DELETE", format!("/fhir/Task/{id}"), None),
            ("GET", format!("/fhir/Task/{id}/_history"), None),
            ("GET", format!("/fhir/Task/{id}/_history/1"), None),
            ("GET", format!("/fhir/Subscription/{id}"), None),
            (
                "PUT",
                format!("/fhir/Subscription/{id}"),
                Some("{}".to_string()),
            ),
            ("DELETE", format!("/fhir/Subscription/{id}"), None),
            ("GET", format!("/fhir/Subscription/{id}/$status"), None),
            ("GET", format!("/fhir/Subscription/{id}/$events"), None),
            (
                "GET",
                format!("/fhir/Subscription/{id}/$get-ws-binding-token"),
                None,
            ),
        ]);
    }
    for (method, path, body) in cases {
        let (status, answer) = raw(&server, method, &path, body.as_deref()).await;
        assert_eq!(status, 400, "{method} {path}: {answer}");
        assert_outcome(&answer, "invalid");
        let diagnostics = answer["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(
            diagnostics.contains("not only dots"),
            "{method} {path}: {diagnostics}"
        );
    }
    assert!(task_ids(&server).await.is_empty());
    // An id with dots among other characters is an ordinary id.
    let (status, created) = raw(&server, "PUT", "/fhir/Task/a..b", Some(&dots("a..b"))).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(task_ids(&server).await, vec!["a..b".to_string()]);
}

#[tokio::test]
async fn criteria_must_name_a_topic_of_this_server() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let with_criteria = |criteria: &str| {
        let mut s = ws_subscription(&server);
        s["criteria"] = json!(criteria);
        s
    };
    let own = format!("{}/SubscriptionTopic/task-changed", server.base);
    let refused = [
        "http://evil.example/fhir/SubscriptionTopic/task-changed".to_string(),
        "http://localhost/fhir/SubscriptionTopic/task-changed".to_string(),
        format!("{}/other/SubscriptionTopic/task-changed", server.root),
        format!("{own}/extra"),
        format!("{}/SubscriptionTopic/nope", server.base),
    ];
    for criteria in &refused {
        let answer = server
            .post_json("/Subscription", &admin, &with_criteria(criteria))
            .await;
        assert_refused(
            criteria,
            &answer,
            StatusCode::BAD_REQUEST,
            "not-supported",
            "names the unknown topic",
            Some("Subscription.criteria"),
        );
        // The refusal lists the topics there are.
        let diagnostics = answer.1["issue"][0]["diagnostics"].as_str().unwrap();
        for topic in ["task-changed", "task-status-changed", "task-overdue"] {
            let url = format!("{}/SubscriptionTopic/{topic}", server.base);
            assert!(diagnostics.contains(&url), "{diagnostics}");
        }
    }
    assert!(subscription_ids(&server).await.is_empty());

    let (status, created) = server
        .post_json("/Subscription", &admin, &with_criteria(&own))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    // An update cannot move it to another server's topic either.
    let mut moved = with_criteria(&refused[0]);
    moved["id"] = json!(id);
    let answer = server
        .put_json(&format!("/Subscription/{id}"), &admin, &moved)
        .await;
    assert_refused(
        "update",
        &answer,
        StatusCode::BAD_REQUEST,
        "not-supported",
        "evil.example",
        Some("Subscription.criteria"),
    );
    let (_, stored) = server.get(&format!("/Subscription/{id}"), &admin).await;
    assert_eq!(stored["criteria"], json!(own));
}

#[tokio::test]
async fn endpoints_that_lead_to_internal_addresses_are_refused() {
    // The default policy: https only, no internal targets.
    let server = TestServer::start().await;
    let admin = server.admin();
    let endpoints = [
        "https://2130706433/hook",
        "https://0x7f.1/hook",
        "https://0177.0.0.1/hook",
        "https://127.0.0.1./hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://[::ffff:a9fe:a9fe]/hook",
        "https://[::127.0.0.1]/hook",
        "https://[64:ff9b::a9fe:a9fe]/hook",
        "https://[64:ff9b:1::1]/hook",
        "https://[2002:7f00:1::1]/hook",
        "https://[2001::1]/hook",
        "https://[fc00::1]/hook",
        "https://[fe80::1]/hook",
        "https://[fec0::1]/hook",
        "https://[ff02::1]/hook",
        "https://[::]/hook",
        "https://[100::1]/hook",
        "https://[2001:db8::1]/hook",
        "https://0.1.2.3/hook",
        "https://100.64.0.1/hook",
        "https://192.0.0.8/hook",
        "https://198.18.0.1/hook",
        "https://240.0.0.1/hook",
        "https://255.255.255.255/hook",
    ];
    for endpoint in endpoints {
        let body = subscription(&server.base, "task-changed", &[], endpoint, "id-only");
        let answer = server.post_json("/Subscription", &admin, &body).await;
        assert_refused(
            endpoint,
            &answer,
            StatusCode::BAD_REQUEST,
            "invalid",
            "an internal address",
            Some("Subscription.channel.endpoint"),
        );
    }
    assert!(subscription_ids(&server).await.is_empty());
}
