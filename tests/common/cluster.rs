//! Several `baton` processes on loopback ports sharing one fresh PostgreSQL database and one
//! Redis key prefix, as `deploy/cluster.sh` runs them. Each cluster has its own database and
//! prefix, so cluster tests run in parallel without seeing each other.

use std::time::Duration;

use baton::auth::{Authenticator, Role};
use reqwest::StatusCode;
use serde_json::Value;

use super::SECRET;

pub struct Node {
    process: tokio::process::Child,
    pub base: String,
    pub root: String,
}

pub struct Cluster {
    pub database: String,
    pub prefix: String,
    pub redis_url: String,
    pub client: reqwest::Client,
    nodes: Vec<Option<Node>>,
    ports: Vec<u16>,
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
    auth: Authenticator,
}

/// The Redis the tests use unless a test brings its own.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// Starts `count` nodes (all ready before this returns) with extra `BATON_*` settings.
    pub async fn start(count: usize, redis_url: &str, env: &[(&str, &str)]) -> Cluster {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let database = format!("baton_c_{}", &id[..16]);
        super::create_database(&database).await;
        let mut cluster = Cluster {
            database,
            prefix: format!("baton-test-{}", &id[..16]),
            redis_url: redis_url.to_string(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            nodes: (0..count).map(|_| None).collect(),
            ports: (0..count).map(|_| free_port()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir: tempfile::tempdir().unwrap(),
            auth: Authenticator::new(SECRET, 0, "performer_types"),
        };
        for i in 0..count {
            cluster.start_node(i).await;
        }
        cluster
    }

    /// Starts (or restarts) node `i` on its port and waits until it is ready.
    pub async fn start_node(&mut self, i: usize) {
        let port = self.ports[i];
        let data = self.dir.path().join(format!("node-{i}"));
        std::fs::create_dir_all(&data).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton"));
        command
            .arg("serve")
            .env("BATON_LISTEN", format!("127.0.0.1:{port}"))
            .env("BATON_DATA_DIR", &data)
            .env("BATON_DATABASE_URL", super::postgres_url(&self.database))
            .env("BATON_REDIS_URL", &self.redis_url)
            .env("BATON_CLUSTER__REDIS_PREFIX", &self.prefix)
            .env(
                "BATON_CLUSTER__NODE_ID",
                format!("node-{i}-{}", uuid::Uuid::new_v4().simple()),
            )
            .env("BATON_CLUSTER__LEASE_SECONDS", "3")
            .env("BATON_CLUSTER__SCAN_SECONDS", "1")
            .env("BATON_JWT_SECRET", SECRET)
            .env("BATON_ALLOW_HTTP_ENDPOINTS", "true")
            .env("BATON_ALLOW_PRIVATE_ENDPOINTS", "true")
            .env("BATON_STORE__POSTGRES_CONNECTIONS", "8")
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut process = command.spawn().expect("the baton binary starts");
        if let Some(stderr) = process.stderr.take() {
            super::tripwire::watch_stderr(&format!("node {i}"), stderr);
        }
        let root = format!("http://127.0.0.1:{port}");
        for _ in 0..800 {
            if let Ok(r) = self.client.get(format!("{root}/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                self.nodes[i] = Some(Node {
                    process,
                    base: format!("{root}/fhir"),
                    root,
                });
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("node {i} did not become ready on port {port}");
    }

    /// Starts one more node, on a new port.
    pub async fn add_node(&mut self) {
        self.nodes.push(None);
        self.ports.push(free_port());
        self.start_node(self.nodes.len() - 1).await;
    }

    /// Kills node `i` without warning (SIGKILL), as a crash or a pulled plug would.
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.process.kill().await.expect("kill -9 the node");
        }
    }

    pub fn base(&self, i: usize) -> &str {
        &self.nodes[i].as_ref().expect("the node runs").base
    }

    pub fn root(&self, i: usize) -> &str {
        &self.nodes[i].as_ref().expect("the node runs").root
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn admin(&self) -> String {
        self.auth.issue(Role::Admin, None, &[], 3600).unwrap()
    }

    /// `/readyz` of node `i`.
    pub async fn ready(&self, i: usize) -> Value {
        let response = self
            .client
            .get(format!("{}/readyz", self.root(i)))
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    /// The node holding the matcher lease, if a running node says it does.
    pub async fn matcher(&self) -> Option<usize> {
        for i in 0..self.len() {
            if self.is_up(i) && self.ready(i).await["matcher"] == true {
                return Some(i);
            }
        }
        None
    }

    pub async fn post(&self, i: usize, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base(i)))
            .bearer_auth(self.admin())
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        super::body(response).await
    }

    pub async fn put(&self, i: usize, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .client
            .put(format!("{}{path}", self.base(i)))
            .bearer_auth(self.admin())
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        super::body(response).await
    }

    pub async fn get(&self, i: usize, path: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.base(i)))
            .bearer_auth(self.admin())
            .send()
            .await
            .unwrap();
        super::body(response).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().filter_map(Option::take) {
            let mut process = node.process;
            let _ = process.start_kill();
        }
        super::drop_database(&self.database);
        super::tripwire::check("the cluster was dropped");
    }
}
