//! `rabbitmq`: a SQLite node with AMQP under mixed load while the machine's RabbitMQ is stopped
//! (`rabbitmqctl stop_app`) and started again. Disturbs every other user of the broker.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_tools::common::{lock, parse_duration};
use rand::rngs::StdRng;

use super::{between, check_binary, mixed_plan, rng_for, since_fault, sqlite_node};
use crate::campaign::{Common, Rig, Run, collect, setup, verify};
use crate::report::Report;

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
    let nodes = std::slice::from_mut(&mut node);
    let mut rig = setup(&run, common, nodes, mixed_plan(common, true)).await?;
    drive(&mut rig, &run, options, &mut rng, &mut report).await?;
    let collected = collect(rig, common, &mut report).await?;
    verify(collected, &run, common, &mut report).await?;
    Ok(report)
}

/// The broker stops and starts; each time, how long until the hub and the consumer are back.
async fn drive(
    rig: &mut Rig<'_>,
    run: &Run,
    options: &RabbitOptions,
    rng: &mut StdRng,
    report: &mut Report,
) -> anyhow::Result<()> {
    let root = rig.nodes[0].root();
    let mut guard = BrokerGuard { stopped: false };
    let mut moments = Vec::new();
    let mut reconnected = Vec::new();
    for k in 1..=options.broker_restarts {
        tokio::time::sleep(between(rng, options.broker_up / 2, options.broker_up)).await;
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
            if let Some((_, body)) = rig.api.readyz(&root).await
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
    if let Some(amqp) = &rig.subscribers.amqp {
        let inbox = amqp.inbox.clone();
        report.recovery.push((
            "start_app -> next AMQP notification".into(),
            since_fault(&moments, |t| inbox.first_notified_after(t)),
        ));
        let gaps = lock(&amqp.inbox.reconnect_gaps).clone();
        report
            .recovery
            .push(("consumer disconnected -> consuming again".into(), gaps));
    }
    Ok(())
}

/// Starts the broker again if the campaign stopped it and did not get to start it (an error
/// or an interrupt in between).
struct BrokerGuard {
    stopped: bool,
}

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if self.stopped {
            eprintln!("baton-fault: starting RabbitMQ again (rabbitmqctl start_app)");
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
