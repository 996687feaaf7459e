//! Starts the real server in-process on `127.0.0.1:0` with its own data directory, and gives
//! tests an HTTP client, tokens and small helpers.
#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod receiver;
pub mod socket;
pub mod tripwire;

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton::auth::{Authenticator, Role};
use baton::config::Config;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// Whether the suite runs against PostgreSQL (`TEST_BACKEND=postgres`) instead of the
/// embedded SQLite store. CI runs it both ways.
pub fn postgres_backend() -> bool {
    std::env::var("TEST_BACKEND").is_ok_and(|b| b == "postgres")
}

/// The server and user the tests create their databases with.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The URL of database `name` on the test server.
pub fn postgres_url(name: &str) -> String {
    let admin = postgres_admin_url();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    format!("{base}/{name}")
}

/// Creates an empty database (or keeps the one that exists). Fails the test, saying so, when
/// PostgreSQL is not reachable.
pub async fn create_database(name: &str) {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&postgres_admin_url())
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL is needed for this test ({}): {e}",
                postgres_admin_url()
            )
        });
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut admin)
        .await
        .unwrap();
    if exists.is_none() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

/// Drops a database, disconnecting whoever still uses it. Runs on its own thread, so it can
/// be called from `Drop` inside a test's runtime.
pub fn drop_database(name: &str) {
    let name = name.to_string();
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            use sqlx::Connection;
            if let Ok(mut admin) = sqlx::PgConnection::connect(&postgres_admin_url()).await {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await;
            }
        });
    })
    .join();
}

/// The database a server on `data_dir` uses: SQLite inside the directory, or, on the
/// PostgreSQL backend, a database named after the directory (so a restart finds its data).
pub async fn database_url_for(data_dir: &Path) -> (String, Option<String>) {
    if !postgres_backend() {
        let url = format!("sqlite://{}", data_dir.join("baton.db").display());
        return (url, None);
    }
    let name = database_name(data_dir);
    create_database(&name).await;
    (postgres_url(&name), Some(name))
}

fn database_name(data_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(data_dir.to_string_lossy().as_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("baton_t_{name}")
}

/// Drops the PostgreSQL database of servers started with `start_in(data_dir)`, once the test
/// is done restarting them; nothing to do on SQLite, where it lives in the directory.
pub fn forget_database(data_dir: &Path) {
    if postgres_backend() {
        drop_database(&database_name(data_dir));
    }
}

/// Runs one statement on the database of servers started with `start_in(data_dir)`, while
/// none is running: what an older version, or an operator, left there.
pub async fn database_execute(data_dir: &Path, sql: &'static str) {
    use sqlx::Connection;
    let (url, _) = database_url_for(data_dir).await;
    if postgres_backend() {
        let mut db = sqlx::PgConnection::connect(&url)
            .await
            .expect("the test database");
        sqlx::query(sql)
            .execute(&mut db)
            .await
            .expect("the statement");
    } else {
        let mut db = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("the test database");
        sqlx::query(sql)
            .execute(&mut db)
            .await
            .expect("the statement");
    }
}

/// Creates the database of servers started with `start_in(data_dir)` with the schema of an
/// older Baton: the repository's migrations up to and including `sqlite_last` (SQLite) or
/// `postgres_last` (PostgreSQL), recorded as applied, so that a server started on it runs
/// only the newer ones.
pub async fn migrate_database_to(data_dir: &Path, sqlite_last: i64, postgres_last: i64) {
    use sqlx::Connection;
    let backend = if postgres_backend() {
        "postgres"
    } else {
        "sqlite"
    };
    let last = if postgres_backend() {
        postgres_last
    } else {
        sqlite_last
    };
    // The older migrations, as files: `Migrator::new` reads a directory.
    let older = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend);
    for file in std::fs::read_dir(&source).unwrap() {
        let file = file.unwrap();
        let name = file.file_name().to_string_lossy().into_owned();
        let version: i64 = name.split('_').next().unwrap().parse().unwrap();
        if version <= last {
            std::fs::copy(file.path(), older.path().join(&name)).unwrap();
        }
    }
    let migrator = sqlx::migrate::Migrator::new(older.path()).await.unwrap();
    let (url, _) = database_url_for(data_dir).await;
    if postgres_backend() {
        let mut db = sqlx::PgConnection::connect(&url)
            .await
            .expect("the test database");
        migrator.run(&mut db).await.unwrap();
    } else {
        let mut db = sqlx::SqliteConnection::connect(&format!("{url}?mode=rwc"))
            .await
            .expect("the test database");
        migrator.run(&mut db).await.unwrap();
    }
}

/// The one text value a query gives on that database.
pub async fn database_scalar(data_dir: &Path, sql: &'static str) -> String {
    use sqlx::Connection;
    let (url, _) = database_url_for(data_dir).await;
    if postgres_backend() {
        let mut db = sqlx::PgConnection::connect(&url)
            .await
            .expect("the test database");
        sqlx::query_scalar(sql)
            .fetch_one(&mut db)
            .await
            .expect("the query")
    } else {
        let mut db = sqlx::SqliteConnection::connect(&url)
            .await
            .expect("the test database");
        sqlx::query_scalar(sql)
            .fetch_one(&mut db)
            .await
            .expect("the query")
    }
}

pub struct TestServer {
    /// `http://127.0.0.1:PORT`
    pub root: String,
    /// `http://127.0.0.1:PORT/fhir`
    pub base: String,
    pub client: reqwest::Client,
    pub data_dir: PathBuf,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<baton::Result<()>>,
    auth: Authenticator,
    /// The PostgreSQL database, on that backend.
    database: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A server that owns its directory owns its database too; one started on a
        // directory the test keeps may be restarted on it, so its database stays.
        if let (Some(name), Some(_)) = (&self.database, &self._dir) {
            self.shutdown.cancel();
            drop_database(name);
        }
        // Every test ends here, whether or not it stopped its server: a server panic fails
        // the test even when the requests around it looked fine.
        tripwire::check("the test server was dropped");
    }
}

impl TestServer {
    /// A server on a fresh, private database.
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_path_buf();
        let mut server = Self::start_in(&path, |_| {}).await;
        server._dir = Some(dir);
        server
    }

    /// A server on a fresh database with adjusted configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_path_buf();
        let mut server = Self::start_in(&path, adjust).await;
        server._dir = Some(dir);
        server
    }

    /// A server whose rest-hooks may reach the local test receivers (plain http, loopback).
    pub async fn start_hub() -> TestServer {
        Self::start_with(|c| {
            c.allow_http_endpoints = true;
            c.allow_private_endpoints = true;
            c.delivery.retry_schedule_seconds = vec![1];
            c.delivery.jitter_ratio = 0.0;
        })
        .await
    }

    /// A server on the database in `data_dir` (which the caller keeps alive).
    pub async fn start_in(data_dir: &Path, adjust: impl FnOnce(&mut Config)) -> TestServer {
        tripwire::arm();
        let mut config = Config {
            data_dir: data_dir.to_path_buf(),
            jwt_secret: Some(SECRET.into()),
            listen: "127.0.0.1:0".into(),
            ..Config::default()
        };
        let (url, database) = database_url_for(data_dir).await;
        config.database_url = Some(url);
        adjust(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(baton::run(config.clone(), listener, shutdown.clone()));
        let root = format!("http://{addr}");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        // Wait (bounded) until the server answers.
        let mut ready = false;
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("{root}/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(ready, "server did not become ready");
        TestServer {
            base: format!("{root}/fhir"),
            root,
            client,
            data_dir: data_dir.to_path_buf(),
            shutdown,
            handle,
            auth: Authenticator::new(SECRET, 0, &config.auth.performer_types_claim),
            database,
            _dir: None,
        }
    }

    /// Stops the server and waits for it to close its database. A server that owns its
    /// directory then drops its PostgreSQL database (on that backend) as it goes.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        (&mut self.handle)
            .await
            .expect("server task")
            .expect("server result");
        tripwire::check("the server stopped");
    }

    pub fn admin(&self) -> String {
        self.auth.issue(Role::Admin, None, &[], 600).unwrap()
    }

    pub fn auditor(&self) -> String {
        self.auth
            .issue(Role::Auditor, Some("Practitioner/audit"), &[], 600)
            .unwrap()
    }

    pub fn practitioner(&self, user: &str) -> String {
        self.auth
            .issue(Role::Practitioner, Some(user), &[], 600)
            .unwrap()
    }

    pub fn practitioner_with_types(&self, user: &str, types: &[&str]) -> String {
        let types: Vec<String> = types.iter().map(|t| t.to_string()).collect();
        self.auth
            .issue(Role::Practitioner, Some(user), &types, 600)
            .unwrap()
    }

    pub fn request(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{}", self.base, path)
        };
        self.client.request(method, url).bearer_auth(token)
    }

    /// The server's `/metrics` text (Prometheus exposition format).
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.root))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        body(self.request(Method::GET, path, token).send().await.unwrap()).await
    }

    pub async fn post_json(
        &self,
        path: &str,
        token: &str,
        resource: &Value,
    ) -> (StatusCode, Value) {
        let r = self
            .request(Method::POST, path, token)
            .header("content-type", "application/fhir+json")
            .body(resource.to_string())
            .send()
            .await
            .unwrap();
        body(r).await
    }

    pub async fn put_json(&self, path: &str, token: &str, resource: &Value) -> (StatusCode, Value) {
        let r = self
            .request(Method::PUT, path, token)
            .header("content-type", "application/fhir+json")
            .body(resource.to_string())
            .send()
            .await
            .unwrap();
        body(r).await
    }

    /// Creates a Task as admin and returns it as stored.
    pub async fn create_task(&self, task: &Value) -> Value {
        let (status, body) = self.post_json("/Task", &self.admin(), task).await;
        assert_eq!(status, StatusCode::CREATED, "create failed: {body}");
        body
    }

    /// Ids of the `match` entries of a search, in order.
    pub async fn search_ids(&self, query: &str, token: &str) -> Vec<String> {
        let (status, bundle) = self.get(&format!("/Task?{query}"), token).await;
        assert_eq!(status, StatusCode::OK, "search {query} failed: {bundle}");
        match_ids(&bundle)
    }
}

pub fn match_ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["search"]["mode"] == "match")
                .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

pub async fn body(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap();
    let value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }))
    };
    (status, value)
}

/// A rest-hook Subscription to a built-in topic, with filter criteria strings. `base` is the
/// FHIR base of the server it is sent to: a topic is named on that server's own base.
pub fn subscription(
    base: &str,
    topic: &str,
    filters: &[&str],
    endpoint: &str,
    content: &str,
) -> Value {
    let criteria: Vec<Value> = filters
        .iter()
        .map(|f| json!({
            "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria",
            "valueString": f,
        }))
        .collect();
    let mut s = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "integration test",
        "criteria": format!("{base}/SubscriptionTopic/{topic}"),
        "channel": {
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": { "extension": [{
                "url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content",
                "valueCode": content,
            }]},
            "header": ["X-Test-Token: secret-123"],
        },
    });
    if !criteria.is_empty() {
        s["_criteria"] = json!({ "extension": criteria });
    }
    s
}

/// Polls (bounded) until `check` returns Some.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A minimal valid Task.
pub fn task(status: &str, owner: Option<&str>) -> Value {
    let mut t = json!({
        "resourceType": "Task",
        "status": status,
        "intent": "order",
    });
    if let Some(owner) = owner {
        t["owner"] = json!({ "reference": owner });
    }
    t
}

/// Asserts an OperationOutcome with the given issue code.
pub fn assert_outcome(body: &Value, code: &str) {
    assert_eq!(
        body["resourceType"], "OperationOutcome",
        "not an OperationOutcome: {body}"
    );
    assert_eq!(body["issue"][0]["code"], code, "unexpected issue: {body}");
    assert!(
        body["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "no diagnostics: {body}"
    );
}
