//! What every scenario shares: the run's identity and directory, the subscribers, the drain
//! after the faults, the checks, and the report.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::fhir::{Channel, subscription_body};
use crate::listeners::{AmqpTopology, Inbox, start_amqp, start_websocket};
use crate::load::LoadLog;
use crate::receiver::{Behaviour, Endpoint, lock};
use crate::verify::{ChannelCheck, OrderRule, Truth, WriteCheck, check_channel, check_writes};

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
    #[arg(long, default_value = "120s", value_parser = crate::fhir::parse_duration)]
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
    cpu_before: Option<(u64, u64)>,
}

impl Run {
    pub fn new(scenario: &'static str, common: &Common) -> anyhow::Result<Run> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let dir = std::path::absolute(common.run_dir.join(format!("{scenario}-{id}")))?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        println!(
            "baton_fault {scenario}: node data and logs in {}",
            dir.display()
        );
        let secret =
            uuid::Uuid::new_v4().simple().to_string() + &uuid::Uuid::new_v4().simple().to_string();
        let bearer = format!("Bearer {}", crate::fhir::mint_admin_token(&secret)?);
        Ok(Run {
            scenario,
            id,
            dir,
            secret,
            bearer,
            started: Instant::now(),
            cpu_before: machine_cpu(),
        })
    }

    /// Busy share of the whole machine since the run started, in percent of all cores
    /// (`/proc/stat`), and the load average now.
    pub fn machine(&self) -> String {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = match (self.cpu_before, machine_cpu()) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => format!(
                "{:.0} % of {cores} cores busy",
                100.0 * (busy1 - busy0) as f64 / (total1 - total0) as f64 * cores as f64
            ),
            _ => "busy share unknown".into(),
        };
        format!("{busy}; load average {}", load_average())
    }
}

/// Busy and total jiffies of all CPUs.
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().sum();
    // Idle and I/O wait count as not busy.
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
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
// Subscribers

pub struct RestHook {
    pub label: String,
    pub endpoint: Arc<Endpoint>,
    pub id: String,
}

pub struct WebSocketSubscriber {
    pub id: String,
    pub inbox: Arc<Inbox>,
}

pub struct AmqpSubscriber {
    pub id: String,
    pub topology: AmqpTopology,
    pub inbox: Arc<Inbox>,
}

/// What to subscribe.
pub struct Plan {
    /// Label, starting behaviour and `backport-timeout` of each rest-hook subscription.
    pub rest_hooks: Vec<(String, Behaviour, Option<u32>)>,
    pub websocket: bool,
    /// The broker URL (with credentials) for the AMQP subscriber.
    pub amqp: Option<String>,
}

pub struct Subscribers {
    pub rest_hooks: Vec<RestHook>,
    pub websocket: Option<WebSocketSubscriber>,
    pub amqp: Option<AmqpSubscriber>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Subscribers {
    /// Creates the subscriptions and their receivers, and waits until every one is active.
    pub async fn start(api: &Api, run: &Run, plan: Plan) -> anyhow::Result<Subscribers> {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut rest_hooks = Vec::new();
        for (label, behaviour, timeout) in plan.rest_hooks {
            let endpoint = Endpoint::start().await?;
            endpoint.set(behaviour).await?;
            let body = subscription_body(
                api.base(),
                &api.run,
                &format!("baton_fault {label}"),
                Channel::RestHook {
                    endpoint: &endpoint.url,
                    timeout,
                },
            );
            let id = api.create_subscription(&body).await?;
            rest_hooks.push(RestHook {
                label,
                endpoint,
                id,
            });
        }
        let amqp = match plan.amqp {
            Some(url) => {
                let topology = AmqpTopology {
                    url: url.clone(),
                    exchange: format!("baton-fault-{}", run.id),
                    queue: format!("baton-fault-{}", run.id),
                    routing_key: "fault".into(),
                };
                topology.declare().await?;
                let wanted = Arc::new(Mutex::new(None));
                let (inbox, task) = start_amqp(
                    url.clone(),
                    topology.queue.clone(),
                    wanted.clone(),
                    stop.clone(),
                );
                tasks.push(task);
                let endpoint = format!(
                    "{}?exchange={}&routing_key={}",
                    broker_endpoint(&url),
                    topology.exchange,
                    topology.routing_key
                );
                let body = subscription_body(
                    api.base(),
                    &api.run,
                    "baton_fault amqp",
                    Channel::Message {
                        endpoint: &endpoint,
                    },
                );
                let id = api.create_subscription(&body).await?;
                *lock(&wanted) = Some(id.clone());
                Some(AmqpSubscriber {
                    id,
                    topology,
                    inbox,
                })
            }
            None => None,
        };
        let websocket = if plan.websocket {
            let body = subscription_body(
                api.base(),
                &api.run,
                "baton_fault websocket",
                Channel::WebSocket,
            );
            let id = api.create_subscription(&body).await?;
            let (inbox, task) = start_websocket(api.clone(), id.clone(), stop.clone());
            tasks.push(task);
            Some(WebSocketSubscriber { id, inbox })
        } else {
            None
        };
        let subscribers = Subscribers {
            rest_hooks,
            websocket,
            amqp,
            stop,
            tasks,
        };
        // Handshakes first: a subscription is in force once it is active.
        for id in subscribers.ids() {
            api.wait_active(&id, Duration::from_secs(30)).await?;
        }
        if let Some(ws) = &subscribers.websocket {
            let deadline = Instant::now() + Duration::from_secs(30);
            while ws
                .inbox
                .connections
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
            {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the websocket listener did not bind within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(subscribers)
    }

    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.rest_hooks.iter().map(|r| r.id.clone()).collect();
        ids.extend(self.websocket.as_ref().map(|w| w.id.clone()));
        ids.extend(self.amqp.as_ref().map(|a| a.id.clone()));
        ids
    }

    /// Events received by the subscribers that must get everything (rest-hook, AMQP).
    fn strict_streams(&self) -> Vec<(String, Vec<crate::verify::Arrival>)> {
        let mut streams: Vec<(String, Vec<crate::verify::Arrival>)> = self
            .rest_hooks
            .iter()
            .map(|r| (r.id.clone(), r.endpoint.arrivals()))
            .collect();
        if let Some(amqp) = &self.amqp {
            streams.push((amqp.id.clone(), amqp.inbox.arrivals()));
        }
        streams
    }

    /// Stops the listeners and removes the campaign's broker topology.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(amqp) = &self.amqp {
            amqp.topology.remove().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Drain and checks

/// Waits until every committed change was numbered for every subscription and every rest-hook
/// and AMQP subscriber has received all of them (or `timeout` passes), then a short settle for
/// late repeats. Returns the store's truth and how long draining took.
pub async fn drain(
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

/// One subscriber's row of the report.
pub struct ChannelRow {
    pub label: String,
    pub check: ChannelCheck,
    /// The subscription's status after the drain (`active`, `error`, `off`).
    pub status: String,
    pub notes: String,
}

/// Checks acknowledged writes against the store and every subscriber against the truth.
pub async fn verify(
    api: &Api,
    subscribers: &Subscribers,
    truth: &Truth,
    log: &LoadLog,
) -> anyhow::Result<(WriteCheck, Vec<ChannelRow>)> {
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
    Ok((writes, rows))
}

fn unusual(malformed: u64, foreign: u64) -> String {
    if malformed + foreign == 0 {
        String::new()
    } else {
        format!("; {malformed} malformed, {foreign} for another subscription")
    }
}

// ---------------------------------------------------------------------------------------------
// Report

/// Min, median and max of some durations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub n: usize,
    pub min: Duration,
    pub p50: Duration,
    pub max: Duration,
}

impl Spread {
    pub fn of(samples: &[Duration]) -> Spread {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        match sorted.len() {
            0 => Spread::default(),
            n => Spread {
                n,
                min: sorted[0],
                p50: sorted[(n - 1) / 2],
                max: sorted[n - 1],
            },
        }
    }

    pub fn text(&self) -> String {
        if self.n == 0 {
            return "n/a".into();
        }
        format!(
            "min {:.2} s / median {:.2} s / max {:.2} s (n={})",
            self.min.as_secs_f64(),
            self.p50.as_secs_f64(),
            self.max.as_secs_f64(),
            self.n
        )
    }

    fn json(&self) -> Value {
        json!({
            "n": self.n,
            "min_s": round3(self.min.as_secs_f64()),
            "median_s": round3(self.p50.as_secs_f64()),
            "max_s": round3(self.max.as_secs_f64()),
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Everything a scenario found.
pub struct Report {
    pub scenario: String,
    /// False when the scenario could not run or stopped early (setup error, time bound).
    pub complete: bool,
    pub summary: String,
    pub run_dir: PathBuf,
    pub writes: Option<WriteCheck>,
    pub attempts: u64,
    pub creates: u64,
    pub updates: u64,
    /// Unacknowledged writes by how they were answered, with one example body each.
    pub refusals: BTreeMap<String, (u64, String, Duration)>,
    pub channels: Vec<ChannelRow>,
    pub recovery: Vec<(String, Vec<Duration>)>,
    /// What happened when, one line per fault.
    pub timeline: Vec<String>,
    /// Findings that fail the scenario.
    pub failures: Vec<String>,
    /// Findings that do not (observations).
    pub notes: Vec<String>,
    pub drained_in: Option<Duration>,
    pub machine: String,
    pub elapsed: Duration,
}

impl Report {
    pub fn new(run: &Run, summary: String) -> Report {
        Report {
            scenario: run.scenario.to_string(),
            complete: true,
            summary,
            run_dir: run.dir.clone(),
            writes: None,
            attempts: 0,
            creates: 0,
            updates: 0,
            refusals: BTreeMap::new(),
            channels: Vec::new(),
            recovery: Vec::new(),
            timeline: Vec::new(),
            failures: Vec::new(),
            notes: Vec::new(),
            drained_in: None,
            machine: String::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// A scenario that could not run or did not finish (no tmpfs, a set-up error, its time
    /// bound): it fails, saying why.
    pub fn incomplete(scenario: &str, why: String) -> Report {
        Report {
            scenario: scenario.to_string(),
            complete: false,
            summary: "did not complete".into(),
            run_dir: PathBuf::new(),
            writes: None,
            attempts: 0,
            creates: 0,
            updates: 0,
            refusals: BTreeMap::new(),
            channels: Vec::new(),
            recovery: Vec::new(),
            timeline: Vec::new(),
            failures: vec![why],
            notes: Vec::new(),
            drained_in: None,
            machine: load_average(),
            elapsed: Duration::ZERO,
        }
    }

    /// Takes the load's counters and refusals.
    pub fn add_load(&mut self, log: &LoadLog) {
        use std::sync::atomic::Ordering;
        self.attempts = log.attempts.load(Ordering::Relaxed);
        self.creates = log.creates.load(Ordering::Relaxed);
        self.updates = log.updates.load(Ordering::Relaxed);
        for (kind, failure) in lock(&log.failures).iter() {
            self.refusals.insert(
                kind.clone(),
                (failure.count, failure.first_body.clone(), failure.slowest),
            );
        }
    }

    /// Takes the checks and turns what they found into failures.
    pub fn add_checks(
        &mut self,
        writes: WriteCheck,
        channels: Vec<ChannelRow>,
        drained_in: Option<Duration>,
        drain_timeout: Duration,
    ) {
        self.failures.extend(writes.failures());
        for row in &channels {
            for failure in row.check.failures() {
                self.failures.push(format!("{}: {failure}", row.label));
            }
        }
        if drained_in.is_none() {
            self.failures.push(format!(
                "not every notification arrived within the drain timeout ({:.0} s)",
                drain_timeout.as_secs_f64()
            ));
        }
        self.writes = Some(writes);
        self.channels = channels;
        self.drained_in = drained_in;
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn print(&self) {
        println!();
        println!("== {}: {}", self.scenario, self.summary);
        if !self.run_dir.as_os_str().is_empty() {
            println!("   run dir   {}", self.run_dir.display());
        }
        println!("   machine   {}", self.machine);
        println!("   elapsed   {:.1} s", self.elapsed.as_secs_f64());
        for line in &self.timeline {
            println!("   fault     {line}");
        }
        if let Some(w) = &self.writes {
            println!(
                "   writes    {} attempted, {} acknowledged ({} creates, {} updates); {} Task versions in the store, {} of them from writes whose answer was lost; acknowledged but missing: {}; Tasks with history holes: {}",
                self.attempts,
                w.acknowledged,
                self.creates,
                self.updates,
                w.committed,
                w.unacknowledged_committed,
                w.missing,
                w.history_holes
            );
        }
        for (kind, (count, body, slowest)) in &self.refusals {
            println!(
                "   refused   {count:>6} x {kind} (slowest {:.2} s){}",
                slowest.as_secs_f64(),
                if body.is_empty() {
                    String::new()
                } else {
                    format!(": {body}")
                }
            );
        }
        if !self.channels.is_empty() {
            println!(
                "   {:<26} {:>8} {:>8} {:>9} {:>8} {:>6} {:>5} {:>6} {:>5} {:>8} {:>9}  status",
                "subscriber",
                "expected",
                "numbered",
                "delivered",
                "replayed",
                "lost",
                "dup",
                "order",
                "gaps",
                "phantom",
                "conflicts"
            );
            for row in &self.channels {
                let c = &row.check;
                println!(
                    "   {:<26} {:>8} {:>8} {:>9} {:>8} {:>6} {:>5} {:>6} {:>5} {:>8} {:>9}  {}",
                    row.label,
                    c.expected,
                    c.numbered,
                    c.delivered,
                    c.replayed_only,
                    c.lost,
                    c.duplicated,
                    c.out_of_order,
                    c.gaps,
                    c.phantom,
                    c.conflicts + c.version_order,
                    row.status
                );
                println!("   {:<26} {}", "", row.notes);
            }
        }
        if let Some(d) = self.drained_in {
            println!(
                "   drained   {:.1} s after the load stopped",
                d.as_secs_f64()
            );
        }
        for (label, samples) in &self.recovery {
            println!("   recovery  {label}: {}", Spread::of(samples).text());
        }
        for note in &self.notes {
            println!("   note      {note}");
        }
        for failure in &self.failures {
            println!("   FAILURE   {failure}");
        }
        println!(
            "   verdict   {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
    }

    pub fn json(&self) -> Value {
        let channels: Vec<Value> = self
            .channels
            .iter()
            .map(|r| {
                let c = &r.check;
                json!({
                    "subscriber": r.label,
                    "status": r.status,
                    "expected": c.expected,
                    "numbered": c.numbered,
                    "deliveries": c.deliveries,
                    "delivered": c.delivered,
                    "replayed_only": c.replayed_only,
                    "lost": c.lost,
                    "duplicated": c.duplicated,
                    "out_of_order": c.out_of_order,
                    "gaps": c.gaps,
                    "phantom": c.phantom,
                    "conflicts": c.conflicts,
                    "version_order": c.version_order,
                })
            })
            .collect();
        let recovery: serde_json::Map<String, Value> = self
            .recovery
            .iter()
            .map(|(label, samples)| (label.clone(), Spread::of(samples).json()))
            .collect();
        json!({
            "scenario": self.scenario,
            "passed": self.passed(),
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "attempted": self.attempts,
            "writes": self.writes.as_ref().map(|w| json!({
                "acknowledged": w.acknowledged,
                "committed": w.committed,
                "unacknowledged_committed": w.unacknowledged_committed,
                "missing": w.missing,
                "history_holes": w.history_holes,
            })),
            "refused": self.refusals.iter().map(|(k, (n, _, _))| (k.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "channels": channels,
            "recovery": recovery,
            "drained_s": self.drained_in.map(|d| round3(d.as_secs_f64())),
            "failures": self.failures,
            "machine": self.machine,
        })
    }
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

    #[test]
    fn spreads() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        let cases = [
            (ms(&[]), 0, 0, 0, 0),
            (ms(&[5]), 1, 5, 5, 5),
            (ms(&[30, 10, 20]), 3, 10, 20, 30),
            (ms(&[40, 10, 30, 20]), 4, 10, 20, 40),
        ];
        for (samples, n, min, p50, max) in cases {
            let spread = Spread::of(&samples);
            assert_eq!(
                (
                    spread.n,
                    spread.min.as_millis(),
                    spread.p50.as_millis(),
                    spread.max.as_millis()
                ),
                (n, min, p50, max),
                "{samples:?}"
            );
        }
    }
}
