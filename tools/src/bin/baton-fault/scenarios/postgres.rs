//! `postgres`: a cluster of nodes on PostgreSQL and Redis under mixed load while PostgreSQL
//! restarts: the machine's cluster (disturbing its other users) or a private throwaway server.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_tools::common::parse_duration;
use rand::rngs::StdRng;

use super::{between, check_binary, mixed_plan, rng_for, since_fault};
use crate::campaign::{Common, READY_WAIT, Rig, Run, collect, setup, verify};
use crate::node::{Node, NodeSpec, base_env, free_port};
use crate::report::Report;

#[derive(clap::Args, Clone, Debug)]
pub struct PostgresOptions {
    /// Nodes of the cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// How many times PostgreSQL is restarted under the cluster.
    #[arg(long, default_value_t = 3)]
    pub pg_restarts: u32,
    /// Which PostgreSQL to restart: the machine's (`pg_ctlcluster`, disturbs its other users)
    /// or a throwaway server of the campaign's own (`initdb` + `pg_ctl`, needs root to run it
    /// as the `postgres` user).
    #[arg(long, value_enum, default_value_t = PgServerKind::Machine)]
    pub pg_server: PgServerKind,
    /// The machine's cluster to restart, as VERSION/NAME (default: the one `pg_lsclusters`
    /// lists on port 5432).
    #[arg(long)]
    pub pg_cluster: Option<String>,
    /// Server and user the campaign creates its database with (the machine's server).
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pub pg_admin_url: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Load before the first restart, between restarts and after the last.
    #[arg(long, default_value = "6s", value_parser = parse_duration)]
    pub pg_up: Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgServerKind {
    Machine,
    Private,
}

/// `VERSION NAME` of the PostgreSQL cluster on port 5432, from `pg_lsclusters`.
async fn local_pg_cluster() -> anyhow::Result<(String, String)> {
    let output = tokio::process::Command::new("pg_lsclusters")
        .arg("--no-header")
        .output()
        .await
        .context(
            "running pg_lsclusters (PostgreSQL's Debian tools are needed; or give --pg-cluster)",
        )?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 3 && f[2] == "5432")
        .map(|f| (f[0].to_string(), f[1].to_string()))
        .context(
            "no PostgreSQL cluster on port 5432 in pg_lsclusters; give --pg-cluster VERSION/NAME",
        )
}

async fn pg_database(admin_url: &str, name: &str, create: bool) -> anyhow::Result<()> {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {admin_url}"))?;
    let statement = if create {
        format!("CREATE DATABASE \"{name}\"")
    } else {
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
        .execute(&mut admin)
        .await
        .with_context(|| {
            format!(
                "{} database {name}",
                if create { "creating" } else { "dropping" }
            )
        })?;
    Ok(())
}

pub async fn postgres(common: &Common, options: &PostgresOptions) -> anyhow::Result<Report> {
    check_binary(common)?;
    let run = Run::new("postgres", common)?;
    let server = match options.pg_server {
        PgServerKind::Machine => {
            let (version, name) = match &options.pg_cluster {
                Some(spec) => spec
                    .split_once('/')
                    .map(|(v, n)| (v.to_string(), n.to_string()))
                    .context("--pg-cluster is VERSION/NAME, e.g. 15/main")?,
                None => local_pg_cluster().await?,
            };
            PgServer::Cluster {
                version,
                name,
                admin_url: options.pg_admin_url.clone(),
            }
        }
        PgServerKind::Private => PgServer::Private(PrivatePg::start(&run).await?),
    };
    let mut report = Report::new(
        &run,
        format!(
            "{}-node cluster on PostgreSQL + Redis, mixed load over all nodes, {} restarted {} times",
            options.nodes,
            server.describe(),
            options.pg_restarts
        ),
    );
    if let PgServer::Cluster { .. } = server {
        report.notes.push(
            "this scenario restarts the machine's PostgreSQL: every other user of it is disturbed while it runs"
                .into(),
        );
    }
    let mut rng = rng_for(common, &mut report);
    let database = format!("baton_fault_{}", run.id);
    pg_database(&server.admin_url(), &database, true).await?;
    let outcome = postgres_run(
        common,
        options,
        &run,
        &mut report,
        &mut rng,
        &database,
        &server,
    )
    .await;
    let dropped = pg_database(&server.admin_url(), &database, false).await;
    outcome?;
    dropped?;
    Ok(report)
}

/// The PostgreSQL server the `postgres` scenario restarts.
enum PgServer {
    /// One of the machine's clusters, restarted with `pg_ctlcluster`.
    Cluster {
        version: String,
        name: String,
        admin_url: String,
    },
    /// A throwaway server of the campaign's own.
    Private(PrivatePg),
}

impl PgServer {
    fn admin_url(&self) -> String {
        match self {
            PgServer::Cluster { admin_url, .. } => admin_url.clone(),
            PgServer::Private(private) => {
                format!("postgres://postgres@127.0.0.1:{}/postgres", private.port)
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            PgServer::Cluster { version, name, .. } => {
                format!("the machine's PostgreSQL {version}/{name}")
            }
            PgServer::Private(private) => format!(
                "a private PostgreSQL ({}) on port {}",
                private.bin.display(),
                private.port
            ),
        }
    }

    async fn restart(&self) -> anyhow::Result<()> {
        let output = match self {
            PgServer::Cluster { version, name, .. } => {
                tokio::process::Command::new("pg_ctlcluster")
                    .args([version.as_str(), name.as_str(), "restart"])
                    .output()
                    .await
                    .context("running pg_ctlcluster")?
            }
            PgServer::Private(private) => private.restart().await?,
        };
        if !output.status.success() {
            bail!(
                "restarting {} failed: {}",
                self.describe(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}

/// A PostgreSQL server in a temporary directory, run as the `postgres` user, on a free port;
/// stopped and removed when dropped.
struct PrivatePg {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PrivatePg {
    async fn start(run: &Run) -> anyhow::Result<PrivatePg> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL's server binaries are needed under /usr/lib/postgresql")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").is_file())
            .max()
            .context("no /usr/lib/postgresql/<version>/bin/initdb")?;
        let dir = std::env::temp_dir().join(format!("baton-fault-pg-{}", run.id));
        std::fs::create_dir_all(&dir)?;
        let private = PrivatePg {
            dir,
            bin,
            port: free_port()?,
        };
        let chown = tokio::process::Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&private.dir)
            .status()
            .await?;
        anyhow::ensure!(
            chown.success(),
            "chown postgres {} failed",
            private.dir.display()
        );
        let initdb = tokio::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(private.bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "-D"])
            .arg(private.dir.join("data"))
            .output()
            .await
            .context("running initdb as postgres (runuser needs root)")?;
        anyhow::ensure!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr).trim()
        );
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            private.port,
            private.dir.display()
        );
        let log = private.log();
        let started = private
            .pg_ctl(&["-w", "-l", &log, "-o", &options, "start"])
            .await?;
        anyhow::ensure!(
            started.status.success(),
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&started.stderr).trim()
        );
        Ok(private)
    }

    /// The server's log; also where its output goes, so that it never holds on to the pipes
    /// `pg_ctl`'s output is read from (which would make reading it wait forever).
    fn log(&self) -> String {
        self.dir.join("postgres.log").to_string_lossy().into_owned()
    }

    async fn restart(&self) -> anyhow::Result<std::process::Output> {
        self.pg_ctl(&["-m", "fast", "-w", "-l", &self.log(), "restart"])
            .await
    }

    async fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        tokio::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args)
            .output()
            .await
            .context("running pg_ctl as postgres")
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn postgres_run(
    common: &Common,
    options: &PostgresOptions,
    run: &Run,
    report: &mut Report,
    rng: &mut StdRng,
    database: &str,
    server: &PgServer,
) -> anyhow::Result<()> {
    let mut nodes = cluster_nodes(common, options, run, database, server)?;
    let mut rig = setup(run, common, &mut nodes, mixed_plan(common, !common.no_amqp)).await?;
    drive(&mut rig, options, run, report, rng, server).await?;
    let collected = collect(rig, common, report).await?;
    verify(collected, run, common, report).await
}

/// The cluster: `--nodes` nodes on the run's database and Redis prefix, with short leases.
fn cluster_nodes(
    common: &Common,
    options: &PostgresOptions,
    run: &Run,
    database: &str,
    server: &PgServer,
) -> anyhow::Result<Vec<Node>> {
    let database_url = match server.admin_url().rsplit_once('/') {
        Some((server, _)) => format!("{server}/{database}"),
        None => bail!("--pg-admin-url must end in /DATABASE"),
    };
    let binary = std::path::absolute(&common.binary)?;
    let mut nodes = Vec::new();
    for i in 1..=options.nodes.max(1) {
        let mut env = base_env(&run.secret, amqp_url(common));
        env.extend(
            [
                ("BATON_DATABASE_URL", database_url.clone()),
                ("BATON_REDIS_URL", options.redis_url.clone()),
                (
                    "BATON_CLUSTER__REDIS_PREFIX",
                    format!("baton-fault-{}", run.id),
                ),
                ("BATON_CLUSTER__NODE_ID", format!("fault-{}-{i}", run.id)),
                ("BATON_CLUSTER__LEASE_SECONDS", "3".into()),
                ("BATON_CLUSTER__SCAN_SECONDS", "1".into()),
                ("BATON_STORE__POSTGRES_CONNECTIONS", "8".into()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        nodes.push(Node::new(NodeSpec {
            binary: binary.clone(),
            port: free_port()?,
            data_dir: run.dir.join(format!("node-{i}")),
            log: run.dir.join(format!("node-{i}.log")),
            env,
        }));
    }
    Ok(nodes)
}

/// The restarts; after each, how long until every node is ready and writes and notifications
/// flow again.
async fn drive(
    rig: &mut Rig<'_>,
    options: &PostgresOptions,
    run: &Run,
    report: &mut Report,
    rng: &mut StdRng,
    server: &PgServer,
) -> anyhow::Result<()> {
    let mut moments = Vec::new();
    let mut all_ready = Vec::new();
    for k in 1..=options.pg_restarts {
        tokio::time::sleep(between(rng, options.pg_up / 2, options.pg_up)).await;
        let restarting = Instant::now();
        tokio::time::timeout(Duration::from_secs(120), server.restart())
            .await
            .context("restarting PostgreSQL took more than 120 s")??;
        let restarted = Instant::now();
        // Every node answers /readyz 200 again (or has died, which the end reports).
        let deadline = restarted + Duration::from_secs(60);
        let mut ready_after = None;
        while Instant::now() < deadline {
            let mut ready = true;
            for node in rig.nodes.iter() {
                if !matches!(rig.api.readyz(&node.root()).await, Some((200, _))) {
                    ready = false;
                }
            }
            if ready {
                ready_after = Some(restarting.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match ready_after {
            Some(d) => all_ready.push(d),
            None => report.failures.push(format!(
                "not every node answered /readyz 200 within 60 s of PostgreSQL restart #{k}"
            )),
        }
        let mut exited = Vec::new();
        for (i, node) in rig.nodes.iter_mut().enumerate() {
            if let Some(status) = node.exited() {
                exited.push(format!("node {} exited ({status})", i + 1));
                node.start(&rig.api.client, READY_WAIT).await?;
            }
        }
        if !exited.is_empty() {
            report.failures.push(format!(
                "PostgreSQL restart #{k}: {}; restarted",
                exited.join(", ")
            ));
        }
        report.timeline.push(format!(
            "PostgreSQL restart #{k} at {:.1} s took {:.1} s; all nodes ready {}",
            (restarting - run.started).as_secs_f64(),
            (restarted - restarting).as_secs_f64(),
            ready_after.map_or("never".into(), |d| format!(
                "{:.2} s after it began",
                d.as_secs_f64()
            ))
        ));
        moments.push((restarting, restarted));
    }
    tokio::time::sleep(options.pg_up).await;
    report
        .recovery
        .push(("restart begins -> every node /readyz 200".into(), all_ready));
    report.recovery.push((
        "restart begins -> next acknowledged write after it".into(),
        since_fault(&moments, |t| rig.load.log.first_ack_after(t)),
    ));
    let rest = rig.subscribers.rest_hooks[0].endpoint.clone();
    report.recovery.push((
        "restart begins -> next rest-hook notification after it".into(),
        since_fault(&moments, |t| rest.first_accepted_after(t)),
    ));
    for ((restarting, restarted), k) in moments.iter().zip(1..) {
        let refused = rig
            .load
            .log
            .failures_between(*restarting, *restarted + Duration::from_secs(5));
        if !refused.is_empty() {
            report.notes.push(format!(
                "writes refused from PostgreSQL restart #{k} until 5 s after it: {refused:?}"
            ));
        }
    }
    Ok(())
}

fn amqp_url(common: &Common) -> Option<&str> {
    (!common.no_amqp).then_some(common.amqp_url.as_str())
}
