//! Tokens from a real OpenID provider: the `oidc-provider` package (tests/support/oidc), started
//! by each test on a loopback port. Tokens are obtained from its token endpoint with the
//! client_credentials grant, as a client would, then used against Baton configured with the
//! provider in `[[auth.issuers]]`.
//!
//! Without Node or the provider's packages (`npm ci --prefix tests/support/oidc`) the tests fail
//! when `CI=true` and are skipped with a note otherwise.

mod common;

use std::process::Stdio;

use baton::config::{Config, IssuerConfig};
use common::browser::{Browser, Engine};
use common::{TestServer, assert_outcome, task};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const AUDIENCE: &str = "https://baton.test/fhir";

/// One running provider process; killed when dropped.
struct Provider {
    issuer: String,
    http: reqwest::Client,
    _child: tokio::process::Child,
}

impl Provider {
    /// Starts a provider, or None (after a note) when it cannot run here and CI is not set.
    async fn start(test: &str) -> Option<Provider> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/oidc");
        let missing = if !dir.join("node_modules/oidc-provider").is_dir() {
            Some("the provider's packages are not installed (npm ci --prefix tests/support/oidc)")
        } else if std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_err()
        {
            Some("node is not installed")
        } else {
            None
        };
        if let Some(why) = missing {
            if std::env::var("CI").is_ok_and(|ci| ci == "true") {
                panic!("{test}: the OpenID provider is required when CI=true, but {why}");
            }
            eprintln!("{test}: skipped: {why}");
            return None;
        }
        let mut child = tokio::process::Command::new("node")
            .arg("provider.mjs")
            .arg(AUDIENCE)
            .current_dir(&dir)
            .env("EXIT_WITH_STDIN", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("starting node");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("provider output") {
                if let Some(port) = line.strip_prefix("READY ") {
                    return port.trim().to_string();
                }
            }
            panic!("the provider exited before it was ready");
        })
        .await
        .expect("the provider did not start in 30 s");
        Some(Provider {
            issuer: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            _child: child,
        })
    }

    /// `[[auth.issuers]]` for this provider, mapping roles as Keycloak puts them.
    fn issuer_config(&self) -> IssuerConfig {
        IssuerConfig {
            issuer: self.issuer.clone(),
            audience: AUDIENCE.into(),
            jwks_uri: None,
            algorithms: vec!["RS256".into(), "PS256".into(), "ES256".into()],
            role_claim: "realm_access.roles".into(),
            fhir_user_claim: "fhirUser".into(),
            fhir_user_template: Some("Practitioner/{sub}".into()),
            performer_types_claim: "performer_types".into(),
            token_endpoint: None,
            authorization_endpoint: None,
            require_scopes: false,
        }
    }

    /// An access token for `client` from the token endpoint (client_credentials).
    async fn token_for(&self, client: &str, scope: Option<&str>, resource: &str) -> String {
        let secret = format!("{client}-secret");
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client),
            ("client_secret", secret.as_str()),
            ("resource", resource),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        let mut encoded = reqwest::Url::parse("http://form.invalid/").unwrap();
        encoded.query_pairs_mut().extend_pairs(&form);
        let response = self
            .http
            .post(format!("{}/token", self.issuer))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(encoded.query().unwrap_or_default().to_string())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::OK, "token for {client}: {body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    async fn token(&self, client: &str) -> String {
        self.token_for(client, None, AUDIENCE).await
    }

    async fn control(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method, format!("{}/_test/{path}", self.issuer));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert!(response.status().is_success(), "control {path}");
        let text = response.text().await.unwrap();
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    }

    async fn jwks_fetches(&self) -> u64 {
        self.control(Method::GET, "stats", None).await["jwks"]
            .as_u64()
            .unwrap()
    }

    /// A token with exactly these claims, signed with the provider's current key of `alg`.
    async fn sign(&self, claims: Value, alg: &str) -> String {
        let signed = self
            .control(
                Method::POST,
                "sign",
                Some(json!({"claims": claims, "alg": alg})),
            )
            .await;
        signed["token"].as_str().unwrap().to_string()
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Baton trusting `provider`, with key fetches allowed every `min_refresh` seconds.
async fn baton_for(
    provider: &Provider,
    min_refresh: u64,
    adjust: impl FnOnce(&mut Config),
) -> TestServer {
    let issuer = provider.issuer_config();
    TestServer::start_with(move |c| {
        c.auth.issuers = vec![issuer];
        c.auth.jwks_min_refresh_seconds = min_refresh;
        adjust(c);
    })
    .await
}

fn b64(value: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
}

/// Asserts a 401 with the RFC 6750 challenge and an OperationOutcome whose diagnostics
/// contain `why`.
async fn assert_invalid_token(server: &TestServer, token: &str, why: &str, name: &str) {
    let response = server
        .request(Method::POST, "/Task", token)
        .header("content-type", "application/fhir+json")
        .body(task("requested", None).to_string())
        .send()
        .await
        .unwrap();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let (status, body) = common::body(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {body}");
    assert_eq!(
        challenge.as_deref(),
        Some(r#"Bearer error="invalid_token""#),
        "{name}"
    );
    assert_outcome(&body, "login");
    let diagnostics = body["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(diagnostics.contains(why), "{name}: {diagnostics}");
}

#[tokio::test]
async fn provider_tokens_act_as_their_mapped_roles() {
    let Some(provider) = Provider::start("provider_tokens_act_as_their_mapped_roles").await else {
        return;
    };
    let server = baton_for(&provider, 10, |_| {}).await;

    // An admin token from the provider (RS256) creates Tasks; so do ES256 and PS256 ones.
    let admin = provider.token("admin-app").await;
    let (status, mine) = server
        .post_json(
            "/Task",
            &admin,
            &json!({"resourceType": "Task", "status": "requested", "intent": "order",
                "owner": {"reference": "Practitioner/n1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{mine}");
    let (status, theirs) = server
        .post_json("/Task", &admin, &task("requested", Some("Practitioner/n2")))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{theirs}");
    for client in ["es-app", "ps-app"] {
        let token = provider.token(client).await;
        let (status, body) = server.get("/Task", &token).await;
        assert_eq!(status, StatusCode::OK, "{client}: {body}");
        assert_eq!(common::match_ids(&body).len(), 2, "{client}");
    }

    // The practitioner's fhirUser claim decides what it reads: only its own Task.
    let nurse = provider.token("nurse-app").await;
    assert_eq!(
        server.search_ids("", &nurse).await,
        vec![mine["id"].as_str().unwrap().to_string()]
    );
    let (status, _) = server
        .get(&format!("/Task/{}", theirs["id"].as_str().unwrap()), &nurse)
        .await;
    assert!(
        status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND,
        "{status}"
    );

    // Without a fhirUser claim, the template builds one from `sub` (the client id here).
    let templated = provider.token("template-app").await;
    let (status, created) = server
        .post_json(
            "/Task",
            &templated,
            &task("requested", Some("Practitioner/template-app")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");

    // The auditor reads everything and writes nothing.
    let auditor = provider.token("auditor-app").await;
    assert_eq!(server.search_ids("", &auditor).await.len(), 3);
    let (status, _) = server
        .post_json("/Task", &auditor, &task("requested", None))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The local HS256 tokens keep working beside the issuer.
    assert_eq!(server.search_ids("", &server.admin()).await.len(), 3);

    // Keys were found through OIDC discovery, and /readyz says the issuer is fine.
    let stats = provider.control(Method::GET, "stats", None).await;
    assert!(stats["discovery"].as_u64().unwrap() >= 1, "{stats}");
    let ready: Value = server
        .client
        .get(format!("{}/readyz", server.root))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["issuers"][0]["status"], "ok", "{ready}");
    assert!(ready.get("degraded").is_none(), "{ready}");
    server.stop().await;
}

#[tokio::test]
async fn local_tokens_can_be_turned_off_behind_a_provider() {
    let Some(provider) = Provider::start("local_tokens_can_be_turned_off_behind_a_provider").await
    else {
        return;
    };
    let server = baton_for(&provider, 10, |c| c.auth.local_tokens = false).await;
    // The HS256 admin token `baton token` would mint is refused, and nothing is stored.
    let (status, body) = server
        .post_json("/Task", &server.admin(), &task("requested", None))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_outcome(&body, "login");
    // The provider's tokens still work.
    let admin = provider.token("admin-app").await;
    let (status, body) = server.get("/Task", &admin).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["total"], 0,
        "the refused create stored nothing: {body}"
    );
    server.stop().await;

    // Without an issuer, turning local tokens off would lock everyone out: refused at start.
    let mut config = Config::default();
    config.auth.local_tokens = false;
    let refused = config.validate().expect_err("no issuer");
    assert!(refused.0.contains("auth.local_tokens"), "{refused}");
}

#[tokio::test]
async fn claims_that_do_not_map_are_refused_naming_the_claim() {
    let Some(provider) =
        Provider::start("claims_that_do_not_map_are_refused_naming_the_claim").await
    else {
        return;
    };
    let server = baton_for(&provider, 10, |c| {
        c.auth.issuers[0].fhir_user_template = None;
    })
    .await;
    let cases = [
        ("norole-app", "'realm_access.roles' claim names no role"),
        (
            "two-roles-app",
            "more than one of admin, practitioner and auditor",
        ),
        // A practitioner with neither a fhirUser claim nor a template.
        ("template-app", "must carry a 'fhirUser' claim"),
    ];
    for (client, why) in cases {
        let token = provider.token(client).await;
        let (status, body) = server
            .post_json("/Task", &token, &task("requested", None))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{client}: {body}");
        assert_outcome(&body, "forbidden");
        assert!(
            body["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains(why),
            "{client}: {body}"
        );
    }
    assert!(server.search_ids("", &server.admin()).await.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn forged_and_unfit_tokens_are_refused() {
    let Some(provider) = Provider::start("forged_and_unfit_tokens_are_refused").await else {
        return;
    };
    let Some(stranger) = Provider::start("forged_and_unfit_tokens_are_refused").await else {
        return;
    };
    let server = baton_for(&provider, 10, |_| {}).await;
    let genuine = provider.token("admin-app").await;
    let parts: Vec<&str> = genuine.split('.').collect();
    let claims = |overrides: Value| {
        let mut c = json!({"iss": provider.issuer, "aud": AUDIENCE, "sub": "forger",
            "exp": now() + 600, "realm_access": {"roles": ["admin"]}});
        for (k, v) in overrides.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };

    // alg none: the genuine payload, no signature.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        parts[1]
    );
    // HS256 with the provider's RSA public key (PEM) as the shared secret.
    let pem = provider.control(Method::GET, "public.pem", None).await;
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims(json!({})),
        &jsonwebtoken::EncodingKey::from_secret(pem.as_str().unwrap().as_bytes()),
    )
    .unwrap();
    // A genuine token of another provider, and one of its keys claiming the trusted issuer.
    let untrusted = stranger.token("admin-app").await;
    let impostor = stranger.sign(claims(json!({})), "RS256").await;
    // Genuine signatures on claims the provider would never issue for Baton.
    let wrong_aud = provider
        .token_for("admin-app", None, "https://other.example/api")
        .await;
    let expired = provider
        .sign(
            claims(json!({"exp": now() - 120, "iat": now() - 720})),
            "RS256",
        )
        .await;
    let not_yet = provider
        .sign(claims(json!({"nbf": now() + 300})), "RS256")
        .await;
    let no_exp = provider
        .sign(
            {
                let mut c = claims(json!({}));
                c.as_object_mut().unwrap().remove("exp");
                c
            },
            "RS256",
        )
        .await;
    // An ES256 signature presented under the RSA key's kid: the key decides the algorithm.
    let es = provider.sign(claims(json!({})), "ES256").await;
    let rsa_kid = jsonwebtoken::decode_header(&genuine).unwrap().kid.unwrap();
    let es_parts: Vec<&str> = es.split('.').collect();
    let swapped = format!(
        "{}.{}.{}",
        b64(&json!({"alg": "ES256", "kid": rsa_kid})),
        es_parts[1],
        es_parts[2]
    );
    // A tampered payload under a genuine signature.
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(&claims(json!({"sub": "someone-else"}))),
        parts[2]
    );

    let cases = [
        ("alg none", none, "header is malformed"),
        (
            "HS256 with the public key",
            confused,
            "HS256, which is not allowed",
        ),
        ("untrusted issuer", untrusted, "is not trusted"),
        ("impostor key", impostor, "is not among the keys published"),
        ("wrong audience", wrong_aud, "audience ('aud') must include"),
        ("expired", expired, "has expired"),
        ("not yet valid", not_yet, "not valid yet"),
        ("no exp", no_exp, "must carry 'exp'"),
        (
            "ES256 under an RSA kid",
            swapped,
            "does not match its signing key",
        ),
        ("tampered payload", tampered, "signature is not valid"),
    ];
    for (name, token, why) in &cases {
        assert_invalid_token(&server, token, why, name).await;
    }
    // Nothing was written by any of them.
    assert!(server.search_ids("", &server.admin()).await.is_empty());
    // The genuine token itself works.
    let (status, _) = server.get("/Task", &genuine).await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn rotated_keys_are_learnt_and_removed_keys_refused() {
    let Some(provider) = Provider::start("rotated_keys_are_learnt_and_removed_keys_refused").await
    else {
        return;
    };
    let server = baton_for(&provider, 1, |_| {}).await;
    let before = provider.token("admin-app").await;
    let (status, _) = server.get("/Task", &before).await;
    assert_eq!(status, StatusCode::OK);

    let rotated = provider.control(Method::POST, "rotate", None).await;
    let after = provider.token("admin-app").await;
    assert_eq!(
        jsonwebtoken::decode_header(&after).unwrap().kid.as_deref(),
        rotated["kid"].as_str()
    );
    // The new kid is learnt without restarting Baton (once the refresh interval allows).
    common::eventually("a token with the new key is accepted", || async {
        (server.get("/Task", &after).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    // The old key left the provider's JWKS, so it left Baton's cache with the same fetch.
    assert_invalid_token(
        &server,
        &before,
        "is not among the keys published",
        "removed key",
    )
    .await;
    server.stop().await;
}

#[tokio::test]
async fn a_flood_of_unknown_kids_costs_the_provider_one_fetch() {
    let Some(provider) =
        Provider::start("a_flood_of_unknown_kids_costs_the_provider_one_fetch").await
    else {
        return;
    };
    let server = baton_for(&provider, 3600, |_| {}).await;
    let genuine = provider.token("admin-app").await;
    let (status, _) = server.get("/Task", &genuine).await;
    assert_eq!(status, StatusCode::OK);
    let fetches_before = provider.jwks_fetches().await;
    let parts: Vec<&str> = genuine.split('.').collect();
    let mut flood = Vec::new();
    for i in 0..100 {
        let header = b64(&json!({"alg": "RS256", "typ": "JWT", "kid": format!("bogus-{i}")}));
        let token = format!("{header}.{}.{}", parts[1], parts[2]);
        let request = server.request(Method::GET, "/Task", &token).send();
        flood.push(request);
    }
    for response in futures::future::join_all(flood).await {
        assert_eq!(response.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    let fetched = provider.jwks_fetches().await - fetches_before;
    assert!(
        fetched <= 1,
        "{fetched} JWKS fetches for 100 unknown kids within one refresh interval"
    );
    // Genuine tokens are not disturbed.
    let (status, _) = server.get("/Task", &genuine).await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

/// A token's signature is checked once and its verified claims reused for its next requests;
/// a token differing from it in any byte (here, its signature) is checked in full and refused.
#[tokio::test]
async fn a_token_is_verified_once_and_a_tampered_copy_is_not() {
    let Some(provider) =
        Provider::start("a_token_is_verified_once_and_a_tampered_copy_is_not").await
    else {
        return;
    };
    let server = baton_for(&provider, 10, |_| {}).await;
    let genuine = provider.token("admin-app").await;
    for _ in 0..3 {
        let (status, _) = server.get("/Task", &genuine).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(token_checks(&server, "verified").await, 1.0);
    assert_eq!(token_checks(&server, "cached").await, 2.0);

    // The same header and claims with another signature: not the remembered token.
    let (unsigned, signature) = genuine.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    let tampered = format!("{unsigned}.{flipped}{}", &signature[1..]);
    assert_invalid_token(&server, &tampered, "signature", "tampered signature").await;
    assert_eq!(token_checks(&server, "verified").await, 1.0);
    assert_eq!(token_checks(&server, "cached").await, 2.0);
    let (status, _) = server.get("/Task", &genuine).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(token_checks(&server, "cached").await, 3.0);
    server.stop().await;
}

/// `baton_issuer_tokens_verified_total{check}` as `/metrics` shows it.
async fn token_checks(server: &TestServer, check: &str) -> f64 {
    let text = server.metrics().await;
    let prefix = format!("baton_issuer_tokens_verified_total{{check=\"{check}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn cached_keys_outlive_a_provider_outage_and_readyz_says_so() {
    let Some(provider) =
        Provider::start("cached_keys_outlive_a_provider_outage_and_readyz_says_so").await
    else {
        return;
    };
    let explicit = format!("{}/jwks", provider.issuer);
    let server = baton_for(&provider, 1, |c| {
        c.auth.jwks_cache_seconds = 1;
        c.auth.issuers[0].jwks_uri = Some(explicit);
    })
    .await;
    let token = provider.token("admin-app").await;
    let (status, _) = server.get("/Task", &token).await;
    assert_eq!(status, StatusCode::OK);
    // With jwks_uri configured, no discovery document is read.
    let stats = provider.control(Method::GET, "stats", None).await;
    assert_eq!(stats["discovery"], 0, "{stats}");

    provider.control(Method::POST, "down", None).await;
    let readyz = || async {
        let r = server
            .client
            .get(format!("{}/readyz", server.root))
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    // Each request past the cache's age tries a refresh, which fails; the cached key still works.
    let ready = common::eventually("readyz reports the provider unreachable", || async {
        let (status, _) = server.get("/Task", &token).await;
        assert_eq!(status, StatusCode::OK, "a cached key must keep working");
        let (status, body) = readyz().await;
        assert_eq!(status, StatusCode::OK, "the node stays ready: {body}");
        (body["issuers"][0]["status"] == "unreachable").then_some(body)
    })
    .await;
    assert_eq!(ready["degraded"], json!(["identity"]), "{ready}");

    provider.control(Method::POST, "up", None).await;
    common::eventually("readyz reports the provider back", || async {
        let (status, _) = server.get("/Task", &token).await;
        assert_eq!(status, StatusCode::OK);
        let (_, body) = readyz().await;
        (body["issuers"][0]["status"] == "ok" && body.get("degraded").is_none()).then_some(())
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn issuer_configuration_is_checked_at_start_up() {
    let base = IssuerConfig {
        issuer: "https://idp.example/realms/h".into(),
        audience: AUDIENCE.into(),
        jwks_uri: None,
        algorithms: vec!["RS256".into()],
        role_claim: "realm_access.roles".into(),
        fhir_user_claim: "fhirUser".into(),
        fhir_user_template: None,
        performer_types_claim: "performer_types".into(),
        token_endpoint: None,
        authorization_endpoint: None,
        require_scopes: false,
    };
    let cases: [(&str, IssuerConfig, &str); 6] = [
        (
            "HS256",
            IssuerConfig {
                algorithms: vec!["HS256".into()],
                ..base.clone()
            },
            "'HS256' is not supported",
        ),
        (
            "none",
            IssuerConfig {
                algorithms: vec!["none".into()],
                ..base.clone()
            },
            "'none' is not supported",
        ),
        (
            "plain http",
            IssuerConfig {
                issuer: "http://idp.example".into(),
                ..base.clone()
            },
            "must be an https URL",
        ),
        (
            "no audience",
            IssuerConfig {
                audience: String::new(),
                ..base.clone()
            },
            "audience must name",
        ),
        (
            "bad claim path",
            IssuerConfig {
                role_claim: "realm_access..roles".into(),
                ..base.clone()
            },
            "role_claim",
        ),
        (
            "template without sub",
            IssuerConfig {
                fhir_user_template: Some("Practitioner/x".into()),
                ..base.clone()
            },
            "must be a reference containing {sub}",
        ),
    ];
    for (name, issuer, why) in cases {
        let mut config = Config::default();
        config.auth.issuers = vec![issuer];
        let err = config.validate().expect_err(name).to_string();
        assert!(err.contains(why), "{name}: {err}");
    }
    let mut twice = Config::default();
    twice.auth.issuers = vec![base.clone(), base.clone()];
    assert!(
        twice
            .validate()
            .unwrap_err()
            .to_string()
            .contains("listed twice")
    );
    let mut unbounded = Config::default();
    unbounded.auth.jwks_min_refresh_seconds = 0;
    assert!(
        unbounded
            .validate()
            .unwrap_err()
            .to_string()
            .contains("jwks_min_refresh_seconds")
    );
    let mut fine = Config::default();
    fine.auth.issuers = vec![base];
    fine.validate().unwrap();
}

#[tokio::test]
async fn provider_scopes_narrow_the_role_and_can_be_required() {
    let Some(provider) =
        Provider::start("provider_scopes_narrow_the_role_and_can_be_required").await
    else {
        return;
    };
    let server = baton_for(&provider, 10, |c| c.auth.issuers[0].require_scopes = true).await;
    let refused = |response: reqwest::Response| async move {
        let challenge = response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_string();
        let (status, body) = common::body(response).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        challenge
    };
    // An admin token with read scopes only reads.
    let reader = provider
        .token_for("admin-app", Some("system/Task.rs"), AUDIENCE)
        .await;
    let (status, _) = server.get("/Task", &reader).await;
    assert_eq!(status, StatusCode::OK);
    let create = |token: String| {
        server
            .request(Method::POST, "/Task", &token)
            .header("content-type", "application/fhir+json")
            .body(task("requested", None).to_string())
            .send()
    };
    let challenge = refused(create(reader).await.unwrap()).await;
    assert_eq!(
        challenge,
        r#"Bearer error="insufficient_scope", scope="system/Task.c""#
    );
    // The issuer requires scopes: a token without any may do nothing.
    let unscoped = provider.token("admin-app").await;
    let challenge = refused(
        server
            .request(Method::GET, "/Task", &unscoped)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(challenge.contains("insufficient_scope"), "{challenge}");
    // A practitioner with user/Task.cruds still writes only its own Tasks.
    let nurse = provider
        .token_for("nurse-app", Some("user/Task.cruds"), AUDIENCE)
        .await;
    let (status, body) = server
        .post_json("/Task", &nurse, &task("requested", Some("Practitioner/n2")))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = server
        .post_json("/Task", &nurse, &task("requested", Some("Practitioner/n1")))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    server.stop().await;
}

#[tokio::test]
async fn smart_discovery_advertises_the_provider() {
    let Some(provider) = Provider::start("smart_discovery_advertises_the_provider").await else {
        return;
    };
    let server = baton_for(&provider, 10, |c| {
        c.cors.allowed_origins = vec!["https://board.example".into()];
    })
    .await;
    // The endpoints come from the provider's discovery document, read with its keys at start.
    let document = common::eventually("the SMART configuration", || async {
        let response = server
            .client
            .get(format!("{}/.well-known/smart-configuration", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let document: Value = response.json().await.unwrap();
        document.get("token_endpoint").is_some().then_some(document)
    })
    .await;
    assert_eq!(document["issuer"], provider.issuer);
    assert_eq!(
        document["token_endpoint"],
        format!("{}/token", provider.issuer)
    );
    assert_eq!(
        document["authorization_endpoint"],
        format!("{}/auth", provider.issuer)
    );
    assert_eq!(document["jwks_uri"], format!("{}/jwks", provider.issuer));
    for capability in [
        "permission-v2",
        "permission-v1",
        "client-confidential-symmetric",
    ] {
        assert!(
            document["capabilities"]
                .as_array()
                .unwrap()
                .contains(&json!(capability)),
            "{document}"
        );
    }
    assert!(
        document["scopes_supported"]
            .as_array()
            .unwrap()
            .contains(&json!("user/Task.cruds"))
    );

    let (status, statement) = server.get("/metadata", "unused").await;
    assert_eq!(status, StatusCode::OK);
    let security = &statement["rest"][0]["security"];
    assert_eq!(security["cors"], true);
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = &security["extension"][0];
    assert_eq!(
        uris["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    assert!(
        uris["extension"]
            .as_array()
            .unwrap()
            .contains(&json!({"url": "token", "valueUri": format!("{}/token", provider.issuer)})),
        "{security}"
    );
    server.stop().await;

    // Without issuers Baton is no SMART server, and says so.
    let plain = TestServer::start().await;
    let (status, body) = plain
        .get("/.well-known/smart-configuration", "unused")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_outcome(&body, "not-found");
    let (_, statement) = plain.get("/metadata", "unused").await;
    assert_eq!(statement["rest"][0]["security"]["cors"], false);
    assert!(statement["rest"][0]["security"].get("service").is_none());
    plain.stop().await;
}

/// The page's origin as Baton's `[cors] allowed_origins` lists it.
fn board_origins(page_origin: &str) -> Vec<String> {
    vec![page_origin.to_string()]
}

#[tokio::test]
async fn a_browser_page_lists_tasks_and_hears_notifications() {
    let test = "a_browser_page_lists_tasks_and_hears_notifications";
    let Some(provider) = Provider::start(test).await else {
        return;
    };
    let Some(browser) = Browser::start(test, Engine::Chromium).await else {
        return;
    };
    // The example page, served from an origin of its own.
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/browser/index.html"),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/index.html",
        axum::routing::get(move || async move { axum::response::Html(page) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let allowed = board_origins(&origin);
    let server = baton_for(&provider, 10, move |c| c.cors.allowed_origins = allowed).await;
    let earlier = server.create_task(&task("requested", None)).await;

    let query = reqwest::Url::parse_with_params(
        &format!("{origin}/index.html"),
        [
            ("fhir", server.base.as_str()),
            ("token_endpoint", &format!("{}/token", provider.issuer)),
            ("client_id", "board-app"),
            ("client_secret", "board-app-secret"),
            ("resource", AUDIENCE),
        ],
    )
    .unwrap();
    browser.open(query.as_str()).await;
    common::eventually("the page listens on its websocket", || async {
        let status = browser
            .run("return document.getElementById('status').textContent")
            .await;
        assert!(
            !status.as_str().unwrap_or_default().starts_with("failed"),
            "the page failed: {status}"
        );
        (status == "listening").then_some(())
    })
    .await;
    assert_eq!(
        browser
            .run("return document.getElementById('task-count').textContent")
            .await,
        "1",
        "the page found {earlier}"
    );

    let mut created = task("requested", None);
    created["description"] = json!("seen in the browser");
    let created = server.create_task(&created).await;
    let id = created["id"].as_str().unwrap().to_string();
    common::eventually("the page shows the notification", || async {
        let shown = browser
            .run(
                "return [...document.querySelectorAll('.notification')].map((e) => e.dataset.task)",
            )
            .await;
        shown
            .as_array()
            .is_some_and(|ids| ids.contains(&json!(id)))
            .then_some(())
    })
    .await;
    browser.close().await;
    server.stop().await;
}
