//! What every scenario shares: the run's identity, directory and token, and the phases around
//! its faults — setup (nodes, subscribers, write load), collect (stop the load, drain) and
//! verify (check every write and subscriber, stop the nodes, look for panics). Each scenario
//! (scenarios/) is its own drive phase between them.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use baton_tools::common::cpu::{CpuMeter, CpuUse, cores, load_average};
use baton_tools::common::token::Admin;
use baton_tools::common::{lock, parse_duration};
use futures::StreamExt;

use crate::api::Api;
use crate::load::{Load, LoadLog, LoadShape};
use crate::node::{Node, panics_in};
use crate::report::{ChannelRow, Report, Spread, unusual};
use crate::subscribers::{Plan, Subscribers};
use crate::verify::{
    OrderRule, TransactionCheck, Truth, WriteCheck, check_channel, check_transactions, check_writes,
};

/// The campaign's token: admin, so neither rate limits nor quotas stand in the way, and
/// valid for longer than the longest campaign.
const ADMIN: Admin = Admin {
    subject: "baton-fault",
    lifetime: Duration::from_secs(6 * 3600),
};

/// How long a node may take to become ready after a (re)start.
pub const READY_WAIT: Duration = Duration::from_secs(60);

/// Settings every scenario takes.
#[derive(clap::Args, Clone, Debug)]
pub struct Common {
    /// The Baton binary the campaign starts (a release build).
    #[arg(long, default_value = "target/release/baton")]
    pub binary: PathBuf,
    /// Where node data and logs go; each run gets `<dir>/<scenario>-<run id>`.
    #[arg(long, default_value = "target/fault")]
    pub run_dir: PathBuf,
    /// Concurrent writers.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Writes per second over all writers (0: as fast as answers come).
    #[arg(long, default_value_t = 150.0)]
    pub rate: f64,
    /// Longest wait, after the faults and the load, for every notification to arrive.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// RabbitMQ for the AMQP subscriber (with credentials); the nodes get the same URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp_url: String,
    /// Run without the AMQP subscriber (no broker needed, except for `rabbitmq`).
    #[arg(long)]
    pub no_amqp: bool,
    /// Keep the run directory (node data and logs) after a passing run.
    #[arg(long)]
    pub keep: bool,
    /// Seed for the random fault moments and behaviours (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// One run of one scenario: its id, directory and token key.
pub struct Run {
    pub scenario: &'static str,
    pub id: String,
    pub dir: PathBuf,
    pub secret: String,
    pub bearer: String,
    pub started: Instant,
    cpu: CpuMeter,
}

impl Run {
    pub fn new(scenario: &'static str, common: &Common) -> anyhow::Result<Run> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let dir = std::path::absolute(common.run_dir.join(format!("{scenario}-{id}")))?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        println!(
            "baton-fault {scenario}: node data and logs in {}",
            dir.display()
        );
        let secret =
            uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
        let bearer = format!("Bearer {}", ADMIN.mint(&secret)?);
        Ok(Run {
            scenario,
            id,
            dir,
            secret,
            bearer,
            started: Instant::now(),
            cpu: CpuMeter::start(None),
        })
    }

    /// How busy the whole machine was since the run started, steal included, in percent of
    /// one core, and the load average now.
    pub fn machine(&self) -> String {
        let CpuUse { machine, steal, .. } = self.cpu.finish();
        let busy = match (machine, steal) {
            (Some(machine), Some(steal)) => {
                format!("{:.0} % of {} cores busy", machine + steal, cores())
            }
            _ => "busy share unknown".into(),
        };
        format!("{busy}; load average {}", load_average())
    }

    /// The shape of the write load every scenario runs.
    pub fn load_shape(common: &Common) -> LoadShape {
        LoadShape {
            writers: common.writers,
            rate: common.rate,
            create_share: 0.25,
            timeout: Duration::from_secs(10),
        }
    }
}

/// `amqp://user:pass@host:port/vhost` → `amqp://host:port/vhost`: subscriptions name the
/// broker without credentials.
pub fn broker_endpoint(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
            format!("{scheme}://{rest}")
        }
        None => url.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Setup

/// What runs while a scenario injects its faults.
pub struct Rig<'n> {
    /// Requests to the nodes, as the run's admin.
    pub api: Api,
    pub nodes: &'n mut [Node],
    pub subscribers: Subscribers,
    pub load: Load,
}

/// Starts the nodes (until each is ready), the subscribers (until each is handshaken), then
/// the write load, spread over the nodes.
pub async fn setup<'n>(
    run: &Run,
    common: &Common,
    nodes: &'n mut [Node],
    plan: Plan,
) -> anyhow::Result<Rig<'n>> {
    let api = Api::new(
        run.bearer.clone(),
        nodes.iter().map(Node::base).collect(),
        run.id.clone(),
    )?;
    for node in nodes.iter_mut() {
        node.start(&api.client, READY_WAIT).await?;
    }
    let subscribers = Subscribers::start(&api, run, plan).await?;
    let load = Load::start(
        api.client.clone(),
        run.bearer.clone(),
        api.bases.clone(),
        run.id.clone(),
        Run::load_shape(common),
    );
    Ok(Rig {
        api,
        nodes,
        subscribers,
        load,
    })
}

// ---------------------------------------------------------------------------------------------
// Collect

/// Everything the checks look at, once the load stopped and the notifications drained.
pub struct Collected<'n> {
    api: Api,
    nodes: &'n mut [Node],
    subscribers: Subscribers,
    log: Arc<LoadLog>,
    truth: Truth,
    drained_in: Option<Duration>,
}

/// Stops the load (its counters go into the report), restarts any node that exited on its
/// own (a failure), and drains.
pub async fn collect<'n>(
    rig: Rig<'n>,
    common: &Common,
    report: &mut Report,
) -> anyhow::Result<Collected<'n>> {
    let Rig {
        api,
        nodes,
        subscribers,
        load,
    } = rig;
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
    let (truth, drained_in) = drain(&api, &subscribers, common.drain_timeout).await?;
    Ok(Collected {
        api,
        nodes,
        subscribers,
        log,
        truth,
        drained_in,
    })
}

/// Waits until every committed change was numbered for every subscription and every rest-hook
/// and AMQP subscriber has received all of them (or `timeout` passes), then a short settle for
/// late repeats. Returns the store's truth and how long draining took.
async fn drain(
    api: &Api,
    subscribers: &Subscribers,
    timeout: Duration,
) -> anyhow::Result<(Truth, Option<Duration>)> {
    let started = Instant::now();
    let mut truth = api.truth().await.context("reading what the store holds")?;
    let mut drained = None;
    while started.elapsed() < timeout {
        if delivered_everywhere(api, subscribers, &truth).await? {
            // A write that timed out on the client may still have been in the server's
            // queue: the store must not have changed meanwhile.
            let again = api.truth().await.context("reading what the store holds")?;
            if again.versions == truth.versions {
                drained = Some(started.elapsed());
                break;
            }
            truth = again;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Repeats of the last batches arrive soon after, if at all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok((truth, drained))
}

/// Whether every subscription numbered every committed change and every rest-hook and AMQP
/// subscriber received all of them.
async fn delivered_everywhere(
    api: &Api,
    subscribers: &Subscribers,
    truth: &Truth,
) -> anyhow::Result<bool> {
    let committed = truth.committed();
    for (_, arrivals) in subscribers.strict_streams() {
        let received: HashSet<(&str, u32)> = arrivals
            .iter()
            .map(|a| (a.task.as_str(), a.version))
            .collect();
        if !committed
            .iter()
            .all(|(t, v)| received.contains(&(t.as_str(), *v)))
        {
            return Ok(false);
        }
    }
    for id in subscribers.ids() {
        let (_, numbered) = api.status(&id).await?;
        if numbered < committed.len() as i64 {
            return Ok(false);
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// Verify

/// Checks the writes and every subscriber against the store, stops the subscribers and the
/// nodes (which must exit cleanly on SIGTERM), and looks for panics in the node logs.
pub async fn verify(
    collected: Collected<'_>,
    run: &Run,
    common: &Common,
    report: &mut Report,
) -> anyhow::Result<()> {
    let Collected {
        api,
        nodes,
        subscribers,
        log,
        truth,
        drained_in,
    } = collected;
    let (writes, transactions, rows) = check(&api, &subscribers, &truth, &log).await?;
    report.add_checks(writes, rows, drained_in, common.drain_timeout);
    report.add_transactions(transactions);
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

/// Checks acknowledged writes and transactions against the store and every subscriber
/// against the truth.
async fn check(
    api: &Api,
    subscribers: &Subscribers,
    truth: &Truth,
    log: &LoadLog,
) -> anyhow::Result<(WriteCheck, TransactionCheck, Vec<ChannelRow>)> {
    let histories: Vec<anyhow::Result<(String, BTreeMap<u32, String>)>> =
        futures::stream::iter(truth.versions.keys().cloned())
            .map(|task| async move {
                let history = api.history(&task).await?;
                Ok((task, history))
            })
            .buffer_unordered(8)
            .collect()
            .await;
    let mut history = BTreeMap::new();
    for entry in histories {
        let (task, versions) = entry?;
        history.insert(task, versions);
    }
    let acked = lock(&log.acked).clone();
    let writes = check_writes(&acked, truth, &history);
    let transactions = check_transactions(&lock(&log.transactions), &history);

    let mut rows = Vec::new();
    for rest in &subscribers.rest_hooks {
        let (status, numbered) = api.status(&rest.id).await?;
        let stats = rest.endpoint.stats();
        rows.push(ChannelRow {
            label: format!("rest-hook {}", rest.label),
            check: check_channel(
                truth,
                numbered,
                &rest.endpoint.arrivals(),
                OrderRule::Strict,
            ),
            status,
            notes: format!(
                "{} requests: {} accepted, {} failed on purpose; {} connections reset; {} handshakes",
                stats.requests,
                stats.accepted,
                stats.refused_answers,
                stats.resets,
                rest.endpoint.handshakes()
            ) + &unusual(stats.malformed, stats.foreign),
        });
    }
    if let Some(amqp) = &subscribers.amqp {
        let (status, numbered) = api.status(&amqp.id).await?;
        rows.push(ChannelRow {
            label: "amqp".into(),
            check: check_channel(truth, numbered, &amqp.inbox.arrivals(), OrderRule::Strict),
            status,
            notes: format!(
                "{} consumer connections",
                amqp.inbox
                    .connections
                    .load(std::sync::atomic::Ordering::Relaxed)
            ) + &unusual(
                amqp.inbox
                    .malformed
                    .load(std::sync::atomic::Ordering::Relaxed),
                amqp.inbox
                    .foreign
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        });
    }
    if let Some(ws) = &subscribers.websocket {
        let (status, numbered) = api.status(&ws.id).await?;
        let mut arrivals = ws.inbox.arrivals();
        arrivals.extend(api.replay(&ws.id, 1, numbered).await?);
        let gaps = lock(&ws.inbox.reconnect_gaps).clone();
        rows.push(ChannelRow {
            label: "websocket".into(),
            check: check_channel(truth, numbered, &arrivals, OrderRule::PerConnection),
            status,
            notes: format!(
                "{} connections, {} events filled from $events on reconnect, reconnect {}",
                ws.inbox
                    .connections
                    .load(std::sync::atomic::Ordering::Relaxed),
                ws.inbox
                    .gap_filled
                    .load(std::sync::atomic::Ordering::Relaxed),
                Spread::of(&gaps).text()
            ) + &unusual(
                ws.inbox
                    .malformed
                    .load(std::sync::atomic::Ordering::Relaxed),
                ws.inbox.foreign.load(std::sync::atomic::Ordering::Relaxed),
            ),
        });
    }
    Ok((writes, transactions, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_endpoints_drop_credentials() {
        let cases = [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://127.0.0.1:5672/%2f",
            ),
            ("amqp://127.0.0.1:5672/%2f", "amqp://127.0.0.1:5672/%2f"),
            ("amqp://u:p@w@host/vh", "amqp://host/vh"),
        ];
        for (url, expected) in cases {
            assert_eq!(broker_endpoint(url), expected, "{url}");
        }
    }
}
