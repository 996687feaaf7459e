//! `kill`: a SQLite node under mixed load, killed with SIGKILL at random moments and restarted
//! each time.

use std::time::{Duration, Instant};

use baton_tools::common::{lock, parse_duration};
use rand::rngs::StdRng;

use super::{between, check_binary, mixed_plan, rng_for, since_fault, sqlite_node};
use crate::campaign::{Common, READY_WAIT, Rig, Run, collect, setup, verify};
use crate::report::Report;

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
    let nodes = std::slice::from_mut(&mut node);
    let mut rig = setup(&run, common, nodes, mixed_plan(common, amqp)).await?;
    drive(&mut rig, &run, options, &mut rng, &mut report).await?;
    let collected = collect(rig, common, &mut report).await?;
    verify(collected, &run, common, &mut report).await?;
    Ok(report)
}

/// The kills, each followed by a restart; then how long each kind of traffic took to resume.
async fn drive(
    rig: &mut Rig<'_>,
    run: &Run,
    options: &KillOptions,
    rng: &mut StdRng,
    report: &mut Report,
) -> anyhow::Result<()> {
    let log = rig.load.log.clone();
    // (kill time, ready-again time) per kill.
    let mut moments = Vec::new();
    for k in 1..=options.kills {
        tokio::time::sleep(between(rng, options.up_min, options.up_max)).await;
        let acked = log.acknowledged();
        let killed = Instant::now();
        let node = &mut rig.nodes[0];
        node.kill9().await?;
        node.start(&rig.api.client, READY_WAIT).await?;
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
        since_fault(&moments, |t| log.first_ack_after(t)),
    ));
    let subscribers = &rig.subscribers;
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
        let gaps = lock(&ws.inbox.reconnect_gaps).clone();
        report
            .recovery
            .push(("websocket disconnected -> bound again".into(), gaps));
    }
    Ok(())
}
