//! The scenarios: each starts its nodes and subscribers, runs the write load, injects its
//! faults at random moments, then drains and checks (campaign.rs). Each is bounded in time by
//! its options and by the caller's overall bound.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::campaign::{Common, Plan, Report, Run, Subscribers, drain, verify};
use crate::fhir::parse_duration;
use crate::load::{Load, LoadShape};
use crate::node::{Node, NodeSpec, base_env, free_port, panics_in};
use crate::receiver::Behaviour;

/// How long a node may take to become ready after a (re)start.
const READY_WAIT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Clone, Debug)]
pub struct KillOptions {
    /// How many times the node is killed with SIGKILL (and restarted).
    #[arg(long, default_value_t = 20)]
    pub kills: u32,
    /// Shortest time the node runs under load before the next kill.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub up_min: Duration,
    /// Longest time the node runs under load before the next kill.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub up_max: Duration,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RabbitOptions {
    /// How many times the broker is stopped (`rabbitmqctl stop_app`) and started again.
    #[arg(long, default_value_t = 3)]
    pub broker_restarts: u32,
    /// How long the broker stays stopped each time.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub broker_down: Duration,
    /// Load before the first stop, between restarts and after the last.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub broker_up: Duration,
}

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

#[derive(clap::Args, Clone, Debug)]
pub struct DiskOptions {
    /// Size of the tmpfs that holds the node's data directory, in MiB.
    #[arg(long, default_value_t = 48)]
    pub tmpfs_mib: u32,
    /// Load before the disk is filled.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// How long the disk stays full under load.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub full_for: Duration,
    /// How long writes may take to resume once space is freed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub resume_timeout: Duration,
}

#[derive(clap::Args, Clone, Debug)]
pub struct FlapOptions {
    /// How long the endpoints flap under load.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub flap_duration: Duration,
    /// Shortest phase (up or down) of a flapping endpoint.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub flap_min: Duration,
    /// Longest phase (up or down) of a flapping endpoint.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub flap_max: Duration,
}

fn rng_for(common: &Common, report: &mut Report) -> StdRng {
    let seed = common.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    report.notes.push(format!(
        "seed {seed} (--seed {seed} repeats the fault moments)"
    ));
    StdRng::seed_from_u64(seed)
}

fn between(rng: &mut StdRng, min: Duration, max: Duration) -> Duration {
    if max <= min {
        return min;
    }
    Duration::from_secs_f64(rng.random_range(min.as_secs_f64()..=max.as_secs_f64()))
}

fn shape(common: &Common) -> LoadShape {
    LoadShape {
        writers: common.writers,
        rate: common.rate,
        create_share: 0.25,
        timeout: Duration::from_secs(10),
    }
}

/// A SQLite node on `data_dir`, with the AMQP channel unless turned off.
fn sqlite_node(common: &Common, run: &Run, data_dir: &Path, amqp: bool) -> anyhow::Result<Node> {
    let mut env = base_env(&run.secret, amqp.then_some(common.amqp_url.as_str()));
    env.push((
        "BATON_DATABASE_URL".into(),
        format!("sqlite://{}", data_dir.join("baton.db").display()),
    ));
    Ok(Node::new(NodeSpec {
        binary: std::path::absolute(&common.binary)?,
        port: free_port()?,
        data_dir: data_dir.to_path_buf(),
        log: run.dir.join("node-1.log"),
        env,
    }))
}

fn check_binary(common: &Common) -> anyhow::Result<()> {
    if !common.binary.is_file() {
        bail!(
            "no Baton binary at {} (cargo build --release --bin baton, or --binary PATH)",
            common.binary.display()
        );
    }
    Ok(())
}

/// After the faults: stops the load, drains, checks, stops the nodes cleanly and looks for
/// panics in their logs.
async fn finish(
    run: &Run,
    common: &Common,
    report: &mut Report,
    api: &Api,
    subscribers: Subscribers,
    load: Load,
    nodes: &mut [Node],
) -> anyhow::Result<()> {
    let log = load.stop().await;
    report.add_load(&log);
    for (i, node) in nodes.iter_mut().enumerate() {
        if let Some(status) = node.exited() {
            report.failures.push(format!(
                "node {} exited on its own ({status}); restarted for the checks",
                i + 1
            ));
            node.start(&api.client, READY_WAIT).await?;
        }
    }
    let (truth, drained) = drain(api, &subscribers, common.drain_timeout).await?;
    let (writes, rows) = verify(api, &subscribers, &truth, &log).await?;
    report.add_checks(writes, rows, drained, common.drain_timeout);
    subscribers.stop().await;
    for (i, node) in nodes.iter_mut().enumerate() {
        match node.terminate(Duration::from_secs(20)).await? {
            Some(status) if status.success() => {}
            Some(status) => report
                .failures
                .push(format!("node {} exited with {status} after SIGTERM", i + 1)),
            None => report.failures.push(format!(
                "node {} did not exit within 20 s of SIGTERM",
                i + 1
            )),
        }
    }
    let mut logs: Vec<PathBuf> = nodes.iter().map(|n| n.spec.log.clone()).collect();
    logs.dedup();
    for log in logs {
        let panics = panics_in(&log);
        if !panics.is_empty() {
            report.failures.push(format!(
                "{} panic(s) in {}, first: {}",
                panics.len(),
                log.display(),
                panics[0]
            ));
        }
    }
    report.machine = run.machine();
    report.elapsed = run.started.elapsed();
    Ok(())
}

/// The rest-hook receiver of the mixed-load scenarios fails one notification in ten.
fn mixed_plan(common: &Common, amqp: bool) -> Plan {
    Plan {
        rest_hooks: vec![("flaky".into(), Behaviour::Flaky { fail_one_in: 10 }, None)],
        websocket: true,
        amqp: amqp.then(|| common.amqp_url.clone()),
    }
}

/// For each `(fault, repaired)` moment, the time from the fault to the first event of some
/// kind after the repair, counting only events that came before the next fault.
fn since_fault(
    moments: &[(Instant, Instant)],
    first_after: impl Fn(Instant) -> Option<Instant>,
) -> Vec<Duration> {
    recoveries(moments, first_after)
        .into_iter()
        .map(|(fault, _, at)| at - fault)
        .collect()
}

/// As `since_fault`, but timed from the repair.
fn since_repair(
    moments: &[(Instant, Instant)],
    first_after: impl Fn(Instant) -> Option<Instant>,
) -> Vec<Duration> {
    recoveries(moments, first_after)
        .into_iter()
        .map(|(_, repaired, at)| at - repaired)
        .collect()
}

fn recoveries(
    moments: &[(Instant, Instant)],
    first_after: impl Fn(Instant) -> Option<Instant>,
) -> Vec<(Instant, Instant, Instant)> {
    moments
        .iter()
        .enumerate()
        .filter_map(|(i, (fault, repaired))| {
            let at = first_after(*repaired)?;
            let next = moments.get(i + 1).map(|(f, _)| *f);
            (next.is_none_or(|n| at < n)).then_some((*fault, *repaired, at))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------

pub async fn kill(common: &Common, options: &KillOptions) -> anyhow::Result<Report> {
    check_binary(common)?;
    let run = Run::new("kill", common)?;
    let amqp = !common.no_amqp;
    let mut report = Report::new(
        &run,
        format!(
            "SQLite node, mixed load, kill -9 {} times at random moments, restart each time",
            options.kills
        ),
    );
    let mut rng = rng_for(common, &mut report);
    let mut node = sqlite_node(common, &run, &run.dir.join("node-1"), amqp)?;
    let api = Api::new(run.bearer.clone(), vec![node.base()], run.id.clone())?;
    node.start(&api.client, READY_WAIT).await?;
    let subscribers = Subscribers::start(&api, &run, mixed_plan(common, amqp)).await?;
    let load = Load::start(
        api.client.clone(),
        run.bearer.clone(),
        api.bases.clone(),
        run.id.clone(),
        shape(common),
    );
    // (kill time, ready-again time) per kill.
    let mut moments = Vec::new();
    for k in 1..=options.kills {
        tokio::time::sleep(between(&mut rng, options.up_min, options.up_max)).await;
        let acked = load.log.acknowledged();
        let killed = Instant::now();
        node.kill9().await?;
        node.start(&api.client, READY_WAIT).await?;
        let ready = Instant::now();
        report.timeline.push(format!(
            "kill -9 #{k} at {:.1} s ({acked} writes acknowledged so far); ready again {:.2} s later",
            (killed - run.started).as_secs_f64(),
            (ready - killed).as_secs_f64()
        ));
        moments.push((killed, ready));
    }
    tokio::time::sleep(options.up_min).await;
    report.recovery.push((
        "kill -9 -> /readyz 200".into(),
        moments.iter().map(|(k, r)| *r - *k).collect(),
    ));
    report.recovery.push((
        "kill -9 -> next acknowledged write".into(),
        since_fault(&moments, |t| load.log.first_ack_after(t)),
    ));
    let rest = subscribers.rest_hooks[0].endpoint.clone();
    report.recovery.push((
        "kill -9 -> next rest-hook notification".into(),
        since_fault(&moments, |t| rest.first_accepted_after(t)),
    ));
    if let Some(amqp) = &subscribers.amqp {
        let inbox = amqp.inbox.clone();
        report.recovery.push((
            "kill -9 -> next AMQP notification".into(),
            since_fault(&moments, |t| inbox.first_notified_after(t)),
        ));
    }
    if let Some(ws) = &subscribers.websocket {
        let gaps = crate::receiver::lock(&ws.inbox.reconnect_gaps).clone();
        report
            .recovery
            .push(("websocket disconnected -> bound again".into(), gaps));
    }
    finish(
        &run,
        common,
        &mut report,
        &api,
        subscribers,
        load,
        std::slice::from_mut(&mut node),
    )
    .await?;
    Ok(report)
}

// ---------------------------------------------------------------------------------------------

/// Starts the broker again if the campaign stopped it and did not get to start it (an error
/// or an interrupt in between).
struct BrokerGuard {
    stopped: bool,
}

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if self.stopped {
            eprintln!("baton_fault: starting RabbitMQ again (rabbitmqctl start_app)");
            let _ = std::process::Command::new("rabbitmqctl")
                .arg("start_app")
                .stdout(std::process::Stdio::null())
                .status();
        }
    }
}

async fn rabbitmqctl(command: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("rabbitmqctl")
            .arg(command)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("rabbitmqctl {command} took more than 120 s"))?
    .context("running rabbitmqctl (is it installed and are we allowed to use it?)")?;
    if !output.status.success() {
        bail!(
            "rabbitmqctl {command} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(started.elapsed())
}

pub async fn rabbitmq(common: &Common, options: &RabbitOptions) -> anyhow::Result<Report> {
    check_binary(common)?;
    let run = Run::new("rabbitmq", common)?;
    let mut report = Report::new(
        &run,
        format!(
            "SQLite node with AMQP, mixed load, RabbitMQ stopped (rabbitmqctl stop_app) {} times for {:.0} s",
            options.broker_restarts,
            options.broker_down.as_secs_f64()
        ),
    );
    report.notes.push(
        "this scenario stops the machine's RabbitMQ: every other user of the broker is disturbed while it runs"
            .into(),
    );
    let mut rng = rng_for(common, &mut report);
    let mut node = sqlite_node(common, &run, &run.dir.join("node-1"), true)?;
    let api = Api::new(run.bearer.clone(), vec![node.base()], run.id.clone())?;
    node.start(&api.client, READY_WAIT).await?;
    let subscribers = Subscribers::start(&api, &run, mixed_plan(common, true)).await?;
    let load = Load::start(
        api.client.clone(),
        run.bearer.clone(),
        api.bases.clone(),
        run.id.clone(),
        shape(common),
    );
    let mut guard = BrokerGuard { stopped: false };
    let mut moments = Vec::new();
    let mut reconnected = Vec::new();
    for k in 1..=options.broker_restarts {
        tokio::time::sleep(between(&mut rng, options.broker_up / 2, options.broker_up)).await;
        let stopping = Instant::now();
        guard.stopped = true;
        let stop_took = rabbitmqctl("stop_app").await?;
        tokio::time::sleep(options.broker_down).await;
        let start_took = rabbitmqctl("start_app").await?;
        guard.stopped = false;
        let started = Instant::now();
        // How long the hub takes to see the broker again (`/readyz` says "connected").
        let deadline = started + Duration::from_secs(60);
        let mut hub_back = None;
        while Instant::now() < deadline {
            if let Some((_, body)) = api.readyz(&node.root()).await
                && body["amqp"] == "connected"
            {
                hub_back = Some(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match hub_back {
            Some(d) => reconnected.push(d),
            None => report.failures.push(format!(
                "after start_app #{k} the hub's /readyz did not report amqp connected within 60 s"
            )),
        }
        report.timeline.push(format!(
            "stop_app #{k} at {:.1} s (took {:.1} s), down {:.0} s, start_app took {:.1} s; hub reconnected {}",
            (stopping - run.started).as_secs_f64(),
            stop_took.as_secs_f64(),
            options.broker_down.as_secs_f64(),
            start_took.as_secs_f64(),
            hub_back.map_or("never".into(), |d| format!("{:.2} s after", d.as_secs_f64()))
        ));
        moments.push((started, started));
    }
    tokio::time::sleep(options.broker_up).await;
    report.recovery.push((
        "start_app -> hub reports amqp connected".into(),
        reconnected,
    ));
    if let Some(amqp) = &subscribers.amqp {
        let inbox = amqp.inbox.clone();
        report.recovery.push((
            "start_app -> next AMQP notification".into(),
            since_fault(&moments, |t| inbox.first_notified_after(t)),
        ));
        let gaps = crate::receiver::lock(&amqp.inbox.reconnect_gaps).clone();
        report
            .recovery
            .push(("consumer disconnected -> consuming again".into(), gaps));
    }
    finish(
        &run,
        common,
        &mut report,
        &api,
        subscribers,
        load,
        std::slice::from_mut(&mut node),
    )
    .await?;
    drop(guard);
    Ok(report)
}

// ---------------------------------------------------------------------------------------------

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
    let api = Api::new(
        run.bearer.clone(),
        nodes.iter().map(Node::base).collect(),
        run.id.clone(),
    )?;
    for node in &mut nodes {
        node.start(&api.client, READY_WAIT).await?;
    }
    let subscribers = Subscribers::start(&api, run, mixed_plan(common, !common.no_amqp)).await?;
    let load = Load::start(
        api.client.clone(),
        run.bearer.clone(),
        api.bases.clone(),
        run.id.clone(),
        shape(common),
    );
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
            for node in &nodes {
                if !matches!(api.readyz(&node.root()).await, Some((200, _))) {
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
        for (i, node) in nodes.iter_mut().enumerate() {
            if let Some(status) = node.exited() {
                exited.push(format!("node {} exited ({status})", i + 1));
                node.start(&api.client, READY_WAIT).await?;
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
        since_fault(&moments, |t| load.log.first_ack_after(t)),
    ));
    let rest = subscribers.rest_hooks[0].endpoint.clone();
    report.recovery.push((
        "restart begins -> next rest-hook notification after it".into(),
        since_fault(&moments, |t| rest.first_accepted_after(t)),
    ));
    for ((restarting, restarted), k) in moments.iter().zip(1..) {
        let refused = load
            .log
            .failures_between(*restarting, *restarted + Duration::from_secs(5));
        if !refused.is_empty() {
            report.notes.push(format!(
                "writes refused from PostgreSQL restart #{k} until 5 s after it: {refused:?}"
            ));
        }
    }
    finish(run, common, report, &api, subscribers, load, &mut nodes).await
}

fn amqp_url(common: &Common) -> Option<&str> {
    (!common.no_amqp).then_some(common.amqp_url.as_str())
}

// ---------------------------------------------------------------------------------------------

/// A tmpfs mounted for the scenario; unmounted when dropped (the node must be gone by then).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, mib: u32) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let output = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .context("running mount")?;
        if !output.status.success() {
            bail!(
                "mount -t tmpfs -o size={mib}m tmpfs {} failed ({}): {}",
                path.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for _ in 0..50 {
            let unmounted = std::process::Command::new("umount")
                .arg(&self.path)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if unmounted {
                let _ = std::fs::remove_dir(&self.path);
                return;
            }
            // A killed node may still be closing its files.
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "baton_fault: could not unmount {}; unmount it by hand",
            self.path.display()
        );
    }
}

/// Writes zeros into `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> std::io::Result<u64> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => return Err(e),
        }
    }
    // Whatever is left below a chunk.
    let small = vec![0u8; 512];
    while let Ok(n) = file.write(&small) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    let _ = file.sync_all();
    Ok(written)
}

/// `PRAGMA integrity_check` of a database file; `ok` when sound.
async fn integrity_check(path: &Path) -> anyhow::Result<Vec<String>> {
    use sqlx::Connection;
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .read_only(true);
    let mut connection = sqlx::SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut connection)
        .await
        .context("PRAGMA integrity_check")?;
    let _ = connection.close().await;
    Ok(rows)
}

pub async fn disk_full(common: &Common, options: &DiskOptions) -> anyhow::Result<Report> {
    check_binary(common)?;
    let run = Run::new("disk-full", common)?;
    let mount_point = run.dir.join("tmpfs");
    let tmpfs = match Tmpfs::mount(&mount_point, options.tmpfs_mib) {
        Ok(tmpfs) => tmpfs,
        Err(e) => {
            return Ok(Report::incomplete(
                "disk-full",
                format!(
                    "{e:#}; the scenario needs to mount a tmpfs (root or CAP_SYS_ADMIN) and stops here"
                ),
            ));
        }
    };
    let amqp = !common.no_amqp;
    let mut report = Report::new(
        &run,
        format!(
            "SQLite node on a {} MiB tmpfs, mixed load, disk filled for {:.0} s, then space freed",
            options.tmpfs_mib,
            options.full_for.as_secs_f64()
        ),
    );
    let data_dir = tmpfs.path.join("node-1");
    let mut node = sqlite_node(common, &run, &data_dir, amqp)?;
    let outcome = disk_full_run(common, options, &run, &mut report, &mut node, &tmpfs.path).await;
    // The node goes before its file system does.
    let _ = node.kill9().await;
    if outcome.is_ok() {
        match integrity_check(&data_dir.join("baton.db")).await {
            Ok(rows) if rows == ["ok"] => report
                .notes
                .push("PRAGMA integrity_check after the run: ok".into()),
            Ok(rows) => report.failures.push(format!(
                "PRAGMA integrity_check after the run: {}",
                rows.join("; ")
            )),
            Err(e) => report
                .failures
                .push(format!("PRAGMA integrity_check could not run: {e:#}")),
        }
    }
    drop(tmpfs);
    outcome?;
    Ok(report)
}

async fn disk_full_run(
    common: &Common,
    options: &DiskOptions,
    run: &Run,
    report: &mut Report,
    node: &mut Node,
    mount_point: &Path,
) -> anyhow::Result<()> {
    let api = Api::new(run.bearer.clone(), vec![node.base()], run.id.clone())?;
    node.start(&api.client, READY_WAIT).await?;
    let subscribers = Subscribers::start(&api, run, mixed_plan(common, !common.no_amqp)).await?;
    let load = Load::start(
        api.client.clone(),
        run.bearer.clone(),
        api.bases.clone(),
        run.id.clone(),
        shape(common),
    );
    tokio::time::sleep(options.warmup).await;

    let filler = mount_point.join("filler");
    let filling = Instant::now();
    let bytes = {
        let filler = filler.clone();
        tokio::task::spawn_blocking(move || fill(&filler)).await??
    };
    let full = Instant::now();
    report.timeline.push(format!(
        "disk filled at {:.1} s ({:.1} MiB of zeros in {:.2} s)",
        (filling - run.started).as_secs_f64(),
        bytes as f64 / 1048576.0,
        (full - filling).as_secs_f64()
    ));
    // While full: what /readyz, /healthz and a read say, once a second.
    let mut probes: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    let until = full + options.full_for;
    while Instant::now() < until {
        let readyz = api.readyz(&node.root()).await.map(|(s, _)| s);
        let healthz = api
            .client
            .get(format!("{}/healthz", node.root()))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok();
        let read = api
            .client
            .get(format!("{}/Task?_count=1", node.base()))
            .header(reqwest::header::AUTHORIZATION, &api.bearer)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok();
        let key = format!(
            "/readyz {}, /healthz {}, search {}",
            readyz.map_or("no answer".into(), |s| s.to_string()),
            healthz.map_or("no answer".into(), |s| s.to_string()),
            read.map_or("no answer".into(), |s| s.to_string())
        );
        *probes.entry(key).or_default() += 1;
        if let Some(status) = node.exited() {
            report.failures.push(format!(
                "the node exited while the disk was full ({status})"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let freeing = Instant::now();
    std::fs::remove_file(&filler).context("removing the filler file")?;
    let freed = Instant::now();
    for (probe, count) in &probes {
        report
            .notes
            .push(format!("while full, {count} probe(s) saw: {probe}"));
    }
    let refused = load.log.failures_between(full, freeing);
    let acked_while_full = load.log.acks_between(full, freeing);
    report.timeline.push(format!(
        "space freed at {:.1} s; while full: {acked_while_full} writes acknowledged, refused: {refused:?}",
        (freeing - run.started).as_secs_f64()
    ));
    for (kind, count) in &refused {
        let acceptable =
            kind == "HTTP 507 (OperationOutcome)" || kind == "HTTP 503 (OperationOutcome)";
        if !acceptable {
            report.failures.push(format!(
                "{count} writes answered '{kind}' while the disk was full (expected 507 or 503 with an OperationOutcome)"
            ));
        }
    }
    if refused.is_empty() && acked_while_full > 0 {
        report.notes.push(
            "no write was refused while the disk was full: SQLite still found room (free pages, WAL)".into(),
        );
    }
    // Writes must resume once there is space again.
    let deadline = freed + options.resume_timeout;
    let mut resumed = None;
    while Instant::now() < deadline {
        if let Some(at) = load.log.first_ack_after(freed) {
            resumed = Some(at - freed);
            break;
        }
        if node.exited().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match resumed {
        Some(d) => report
            .recovery
            .push(("space freed -> next acknowledged write".into(), vec![d])),
        None => {
            let after = load.log.failures_between(freed, Instant::now());
            let readyz = api.readyz(&node.root()).await;
            report.failures.push(format!(
                "writes did not resume within {:.0} s of freeing space; meanwhile writes got {after:?}; /readyz: {}; process {}",
                options.resume_timeout.as_secs_f64(),
                readyz.map_or("no answer".into(), |(s, b)| format!("{s} {b}")),
                if node.is_running() { "still running" } else { "gone" }
            ));
            report
                .notes
                .push("the node was killed and restarted to check the rest".into());
            node.kill9().await?;
            let restarted = Instant::now();
            node.start(&api.client, READY_WAIT).await?;
            report.timeline.push(format!(
                "node restarted at {:.1} s to continue",
                (restarted - run.started).as_secs_f64()
            ));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    finish(
        run,
        common,
        report,
        &api,
        subscribers,
        load,
        std::slice::from_mut(node),
    )
    .await
}

// ---------------------------------------------------------------------------------------------

pub async fn flap(common: &Common, options: &FlapOptions) -> anyhow::Result<Report> {
    check_binary(common)?;
    let run = Run::new("flap", common)?;
    let mut report = Report::new(
        &run,
        format!(
            "SQLite node, rest-hook endpoints flapping for {:.0} s (refuse, 500, 503 Retry-After, hang past the timeout, slow, reset, mixed), retries [1, 2] s",
            options.flap_duration.as_secs_f64()
        ),
    );
    let mut rng = rng_for(common, &mut report);
    // The subscriptions' timeout is 2 s: a hang of 4 s outlasts it, 1 s of slowness does not.
    let faults: Vec<(&str, Vec<Behaviour>)> = vec![
        ("refuse", vec![Behaviour::Refuse]),
        ("500", vec![Behaviour::Status(500)]),
        ("retry-after", vec![Behaviour::RetryAfter(2)]),
        ("hang", vec![Behaviour::Hang(Duration::from_secs(4))]),
        ("slow", vec![Behaviour::Slow(Duration::from_secs(1))]),
        ("reset", vec![Behaviour::Reset]),
        (
            "mixed",
            vec![
                Behaviour::Refuse,
                Behaviour::Status(502),
                Behaviour::RetryAfter(1),
                Behaviour::Hang(Duration::from_secs(4)),
                Behaviour::Slow(Duration::from_millis(1500)),
                Behaviour::Reset,
            ],
        ),
    ];
    let mut node = sqlite_node(common, &run, &run.dir.join("node-1"), false)?;
    let api = Api::new(run.bearer.clone(), vec![node.base()], run.id.clone())?;
    node.start(&api.client, READY_WAIT).await?;
    let plan = Plan {
        rest_hooks: faults
            .iter()
            .map(|(label, _)| (label.to_string(), Behaviour::Accept, Some(2)))
            .collect(),
        websocket: false,
        amqp: None,
    };
    let subscribers = Subscribers::start(&api, &run, plan).await?;
    let load = Load::start(
        api.client.clone(),
        run.bearer.clone(),
        api.bases.clone(),
        run.id.clone(),
        shape(common),
    );
    let stop = CancellationToken::new();
    let mut flappers = Vec::new();
    for (rest, (_, behaviours)) in subscribers.rest_hooks.iter().zip(&faults) {
        let endpoint = rest.endpoint.clone();
        let behaviours = behaviours.clone();
        let stop = stop.clone();
        let seed: u64 = rng.random();
        let (min, max) = (options.flap_min, options.flap_max);
        flappers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            // (went down, came up) per cycle.
            let mut cycles = Vec::new();
            let mut switches = 0u32;
            while !stop.is_cancelled() {
                tokio::select! {
                    () = tokio::time::sleep(between(&mut rng, min, max)) => {}
                    () = stop.cancelled() => break,
                }
                let fault = behaviours[rng.random_range(0..behaviours.len())];
                let down = Instant::now();
                endpoint.set(fault).await?;
                tokio::select! {
                    () = tokio::time::sleep(between(&mut rng, min, max)) => {}
                    () = stop.cancelled() => {}
                }
                endpoint.set(Behaviour::Accept).await?;
                cycles.push((down, Instant::now()));
                switches += 1;
            }
            endpoint.set(Behaviour::Accept).await?;
            anyhow::Ok((cycles, switches))
        }));
    }
    tokio::time::sleep(options.flap_duration).await;
    stop.cancel();
    let mut recovered = Vec::new();
    for (flapper, rest) in flappers.into_iter().zip(&subscribers.rest_hooks) {
        let (cycles, switches) = flapper.await.context("a flapping endpoint panicked")??;
        let endpoint = rest.endpoint.clone();
        recovered.extend(since_repair(&cycles, |t| endpoint.first_accepted_after(t)));
        report.timeline.push(format!(
            "endpoint {}: {switches} down/up cycles",
            rest.label
        ));
    }
    report.recovery.push((
        "endpoint back up -> first notification accepted".into(),
        recovered,
    ));
    finish(
        &run,
        common,
        &mut report,
        &api,
        subscribers,
        load,
        std::slice::from_mut(&mut node),
    )
    .await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recoveries_count_only_events_before_the_next_fault() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Faults at 0 and 1000 ms, each repaired 100 ms later.
        let moments = [(at(0), at(100)), (at(1000), at(1100))];
        // Name, events, then the expected delays in ms from the fault and from the repair.
        type Case = (&'static str, Vec<Instant>, Vec<u128>, Vec<u128>);
        let cases: Vec<Case> = vec![
            (
                "an event after each repair",
                vec![at(150), at(1300)],
                vec![150, 300],
                vec![50, 200],
            ),
            (
                "nothing between the first repair and the next fault",
                vec![at(1300)],
                vec![300],
                vec![200],
            ),
            (
                "an event before the repair does not count",
                vec![at(50)],
                vec![],
                vec![],
            ),
        ];
        for (name, events, from_fault, from_repair) in cases {
            let first_after = |t: Instant| events.iter().copied().find(|e| *e >= t);
            let millis = |d: Vec<Duration>| d.iter().map(Duration::as_millis).collect::<Vec<_>>();
            assert_eq!(
                millis(since_fault(&moments, first_after)),
                from_fault,
                "{name}"
            );
            assert_eq!(
                millis(since_repair(&moments, first_after)),
                from_repair,
                "{name}"
            );
        }
    }
}
