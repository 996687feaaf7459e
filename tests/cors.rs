//! Browser pages on the origins of `[cors] allowed_origins` may call the FHIR API and open the
//! websocket; pages of any other origin get no CORS header and no socket.

mod common;

use common::TestServer;
use reqwest::{Method, StatusCode};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const BOARD: &str = "http://board.example:8081";
const EVIL: &str = "https://evil.example";

async fn cors_server() -> TestServer {
    TestServer::start_with(|c| c.cors.allowed_origins = vec![BOARD.into()]).await
}

fn cors_headers(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .unwrap_or_default()
}

async fn preflight(server: &TestServer, origin: &str) -> reqwest::Response {
    server
        .client
        .request(Method::OPTIONS, format!("{}/Task/abc", server.base))
        .header("origin", origin)
        .header("access-control-request-method", "PUT")
        .header(
            "access-control-request-headers",
            "authorization, content-type, if-match, prefer",
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn listed_origins_get_preflights_and_exposed_headers() {
    let server = cors_server().await;
    let response = preflight(&server, BOARD).await;
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(header(&response, "access-control-allow-origin"), BOARD);
    let methods = header(&response, "access-control-allow-methods");
    for method in ["get", "post", "put", "patch", "delete"] {
        assert!(methods.contains(method), "{methods}");
    }
    let allowed = header(&response, "access-control-allow-headers");
    for name in ["authorization", "content-type", "if-match", "prefer"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert_eq!(
        header(&response, "access-control-allow-credentials"),
        "",
        "tokens travel in Authorization, not cookies"
    );

    // A create from the page: the answer says who may read it and exposes Location and ETag.
    let response = server
        .request(Method::POST, "/Task", &server.admin())
        .header("origin", BOARD)
        .header("content-type", "application/fhir+json")
        .body(common::task("requested", None).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(header(&response, "access-control-allow-origin"), BOARD);
    let exposed = header(&response, "access-control-expose-headers");
    for name in ["etag", "location", "content-location"] {
        assert!(exposed.contains(name), "{exposed}");
    }
    assert!(!header(&response, "location").is_empty());

    // Errors carry the headers too, so the page can read the OperationOutcome.
    let response = server
        .client
        .get(format!("{}/Task", server.base))
        .header("origin", BOARD)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(header(&response, "access-control-allow-origin"), BOARD);
    server.stop().await;
}

#[tokio::test]
async fn other_origins_get_no_cors_headers_at_all() {
    let server = cors_server().await;
    let response = preflight(&server, EVIL).await;
    assert_eq!(cors_headers(&response), Vec::<String>::new());
    let response = server
        .request(Method::GET, "/Task", &server.admin())
        .header("origin", EVIL)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(cors_headers(&response), Vec::<String>::new());
    server.stop().await;

    // Without [cors], not even a listed-looking origin gets any.
    let plain = TestServer::start().await;
    let response = preflight(&plain, BOARD).await;
    assert_eq!(cors_headers(&response), Vec::<String>::new());
    plain.stop().await;
}

#[tokio::test]
async fn the_websocket_checks_the_origin() {
    let server = cors_server().await;
    let url = format!("{}/ws", server.base.replacen("http", "ws", 1));
    let connect = |origin: Option<&str>| {
        let mut request = url.clone().into_client_request().unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
    };
    assert!(connect(Some(BOARD)).await.is_ok(), "a listed origin");
    assert!(
        connect(Some(&server.root)).await.is_ok(),
        "this server's own pages (the console at /console)"
    );
    assert!(
        connect(None).await.is_ok(),
        "a client that is not a browser"
    );
    match connect(Some(EVIL)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::FORBIDDEN);
        }
        other => panic!("an unlisted origin opened a socket: {other:?}"),
    }
    server.stop().await;
}

#[tokio::test]
async fn origins_are_checked_at_start_up() {
    for origin in [
        "https://board.example/",
        "https://board.example/app",
        "*",
        "board.example",
        "ftp://board.example",
    ] {
        let mut config = baton::Config::default();
        config.cors.allowed_origins = vec![origin.into()];
        let err = config.validate().expect_err(origin).to_string();
        assert!(err.contains("cors.allowed_origins"), "{origin}: {err}");
    }
    let mut config = baton::Config::default();
    config.cors.allowed_origins = vec!["https://board.example:8443".into()];
    config.validate().unwrap();
}
