//! Baton nodes as child processes of the campaign: started on a loopback port with a data
//! directory and `BATON_*` settings, killed with SIGKILL or stopped with SIGTERM, restarted on
//! the same port and data. Each node's stderr goes to `<run dir>/node-<i>.log`, which the
//! campaign scans for panics at the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How to start one node; restarts reuse it unchanged.
#[derive(Clone)]
pub struct NodeSpec {
    pub binary: PathBuf,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// `BATON_*` settings (and `RUST_LOG`).
    pub env: Vec<(String, String)>,
}

pub struct Node {
    pub spec: NodeSpec,
    child: Option<tokio::process::Child>,
    /// Times this node was started (1 after the first start).
    pub starts: u32,
}

impl Node {
    pub fn new(spec: NodeSpec) -> Node {
        Node {
            spec,
            child: None,
            starts: 0,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn root(&self) -> String {
        format!("http://127.0.0.1:{}", self.spec.port)
    }

    /// `http://127.0.0.1:PORT/fhir`.
    pub fn base(&self) -> String {
        format!("{}/fhir", self.root())
    }

    /// Starts the process and waits (at most `wait`) until `/readyz` answers 200. Returns how
    /// long that took.
    pub async fn start(
        &mut self,
        client: &reqwest::Client,
        wait: Duration,
    ) -> anyhow::Result<Duration> {
        if self.child.is_some() {
            bail!("node on port {} is already running", self.spec.port);
        }
        std::fs::create_dir_all(&self.spec.data_dir)
            .with_context(|| format!("creating {}", self.spec.data_dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)
            .with_context(|| format!("opening {}", self.spec.log.display()))?;
        use std::io::Write;
        let _ = writeln!(
            &log,
            "=== baton-fault: start {} of the node on port {}",
            self.starts + 1,
            self.spec.port
        );
        let mut command = tokio::process::Command::new(&self.spec.binary);
        command
            .arg("serve")
            // The node's own directory as working directory, so no config/baton.toml of the
            // caller's checkout applies: everything comes from the environment below.
            .current_dir(&self.spec.data_dir)
            .env("BATON_LISTEN", format!("127.0.0.1:{}", self.spec.port))
            .env("BATON_DATA_DIR", &self.spec.data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        for (key, value) in &self.spec.env {
            command.env(key, value);
        }
        let started = Instant::now();
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.spec.binary.display()))?;
        self.child = Some(child);
        self.starts += 1;
        let readyz = format!("{}/readyz", self.root());
        loop {
            if let Ok(r) = client.get(&readyz).send().await
                && r.status() == reqwest::StatusCode::OK
            {
                return Ok(started.elapsed());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "the node on port {} exited during start-up ({status}); see {}",
                    self.spec.port,
                    self.spec.log.display()
                );
            }
            if started.elapsed() > wait {
                bail!(
                    "the node on port {} was not ready after {:.0} s; see {}",
                    self.spec.port,
                    wait.as_secs_f64(),
                    self.spec.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, as a crash or a pulled plug would; waits until the process is gone.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("kill -9 of the node")?;
        }
        Ok(())
    }

    /// SIGTERM and a wait (at most `grace`) for a clean exit, then SIGKILL. Returns whether
    /// the node exited by itself, and its exit status.
    pub async fn terminate(
        &mut self,
        grace: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        if let Some(pid) = child.id() {
            // The campaign signals only the process it started, by its id.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => Ok(Some(status.context("waiting for the node")?)),
            Err(_) => {
                child
                    .kill()
                    .await
                    .context("kill -9 after the grace period")?;
                Ok(None)
            }
        }
    }

    /// Whether the process is still running; `Some(status)` once it exited on its own.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A free loopback port (the kernel's choice; released before the node binds it).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Lines of a node log that record a panic (the log format puts `panicked` in them).
pub fn panics_in(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("panicked"))
        .map(str::to_string)
        .collect()
}

/// The settings every campaign node gets: the run's token key, local rest-hook endpoints
/// allowed, short retries so that recovery is quick, and warnings only in the log.
pub fn base_env(secret: &str, amqp_url: Option<&str>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("BATON_JWT_SECRET", secret),
        ("BATON_ALLOW_HTTP_ENDPOINTS", "true"),
        ("BATON_ALLOW_PRIVATE_ENDPOINTS", "true"),
        ("BATON_DELIVERY__RETRY_SCHEDULE_SECONDS", "[1, 2]"),
        ("BATON_DELIVERY__JITTER_RATIO", "0.2"),
        ("BATON_DELIVERY__DEFAULT_TIMEOUT_SECONDS", "3"),
        ("BATON_SHUTDOWN_GRACE_SECONDS", "5"),
        ("RUST_LOG", "warn"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if let Some(url) = amqp_url {
        env.push(("BATON_AMQP_URL".into(), url.into()));
    }
    env
}
