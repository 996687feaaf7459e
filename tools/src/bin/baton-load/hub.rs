//! `baton-load hub`: rest-hook subscriptions, one per Task owner, to a receiver in this
//! process; an open-loop schedule of Task updates; for every write the delay until its
//! notification arrived; and the check that every write was notified exactly once, with
//! contiguous event numbers, in order.

mod receiver;
mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_tools::common::api::{
    create_subscription, delete_subscriptions, http_client, success_text,
};
use baton_tools::common::cpu::{CpuMeter, CpuUse};
use baton_tools::common::fhir::{Channel, FHIR_JSON, etag_version, subscription_body, task_body};
use baton_tools::common::schedule::{OpenLoop, Schedule};
use baton_tools::common::target::Target;
use baton_tools::common::{lock, parse_duration, poll_until, positions, run_bounded};
use reqwest::header;
use serde_json::Value;

use crate::ADMIN;
use crate::tasks::transport_error;
use receiver::{Arrival, Inbox};

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    target: Target,
    /// Rest-hook subscriptions, each filtering on its own Task owner.
    #[arg(long, default_value_t = 1000)]
    subscriptions: usize,
    /// Target Task updates per second, spread round-robin over the subscriptions' Tasks.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of the update schedule.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Port of the local receiver on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    receivers_port: u16,
    /// Updates in flight at most; when reached, the schedule waits and the run reports it.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Concurrent requests while creating and deleting subscriptions and Tasks.
    #[arg(long, default_value_t = 16)]
    setup_concurrency: usize,
    /// Longest wait for all handshakes after the subscriptions are created.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Longest wait, after the last update, for every notification to arrive.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Extra wait once everything arrived, to catch late duplicates.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
    /// Leave the subscriptions on the server afterwards (by default they are deleted).
    #[arg(long)]
    keep_subscriptions: bool,
    /// Print, for each second of the run, the events received and their worst latency.
    #[arg(long)]
    timeline: bool,
    /// Answer every Nth event notification with 503 and ignore it, as a flaky endpoint
    /// would, so the run also exercises Baton's retries (0: accept everything).
    #[arg(long, default_value_t = 0)]
    reject_every: u64,
    /// Send the updates round-robin to these FHIR base URLs (the nodes of a cluster)
    /// instead of --base, which still takes the set-up; comma-separated.
    #[arg(long, value_delimiter = ',')]
    write_base: Vec<String>,
}

pub async fn run(options: &Options) -> anyhow::Result<bool> {
    if options.subscriptions == 0 || options.rate <= 0.0 || options.max_in_flight == 0 {
        bail!("--subscriptions, --rate and --max-in-flight must be positive");
    }
    let setup = setup(options).await?;
    let driven = drive(options, &setup).await?;
    let collected = collect(options, &setup, driven).await;
    let findings = verify::verify(&setup, &collected);
    findings.print(options, &collected);
    if !options.keep_subscriptions {
        setup.delete_subscriptions(options).await;
    }
    setup.receiver.abort();
    println!("{}", findings.json(options, &setup, &collected));
    Ok(findings.passed)
}

/// A Task write whose notification is expected.
#[derive(Clone, Copy)]
struct Write {
    sent: Instant,
    responded: Instant,
    /// Part of the update schedule (the initial creates are checked but not timed).
    scheduled: bool,
}

/// A Task version: (id, versionId).
type TaskVersion = (String, u32);

/// The receiver, the subscriptions and one Task per owner, all created and handshaken.
struct Setup {
    client: reqwest::Client,
    bearer: Arc<String>,
    base: Arc<String>,
    /// This run's code, in its owners' names.
    run: String,
    inbox: Arc<Inbox>,
    receiver: tokio::task::JoinHandle<std::io::Result<()>>,
    subscription_ids: Vec<String>,
    subscription_of: HashMap<String, usize>,
    /// Owner i's Task is `task_ids[i]`; subscription i filters on owner i.
    owners: Arc<Vec<String>>,
    task_ids: Arc<Vec<String>>,
    /// The Task creates, each of which must be notified too.
    creates: HashMap<TaskVersion, Write>,
}

impl Setup {
    async fn delete_subscriptions(&self, options: &Options) {
        delete_subscriptions(
            &self.client,
            &self.bearer,
            &self.base,
            &self.subscription_ids,
            options.setup_concurrency,
        )
        .await;
    }
}

async fn setup(options: &Options) -> anyhow::Result<Setup> {
    let n = options.subscriptions;
    let bearer = Arc::new(options.target.bearer(&ADMIN)?);
    let base = Arc::new(options.target.base().to_string());
    let client = http_client(
        options.max_in_flight.max(options.setup_concurrency),
        Duration::from_secs(30),
    )?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let inbox = Arc::new(Inbox {
        reject_every: options.reject_every,
        ..Inbox::default()
    });
    let (receiver_addr, receiver) = receiver::start(options.receivers_port, inbox.clone()).await?;
    println!(
        "hub: run {run}, {n} subscriptions -> receiver http://{receiver_addr}/hook/{{n}}, {} updates/s for {:.0} s",
        options.rate,
        options.duration.as_secs_f64()
    );

    let started = Instant::now();
    let owners: Vec<String> = (0..n).map(|i| format!("Practitioner/{run}-{i}")).collect();
    let subscription_ids =
        subscribe(&client, &bearer, &base, &owners, receiver_addr, options).await?;
    let created_in = started.elapsed();
    let mut setup = Setup {
        client,
        bearer,
        base,
        run,
        inbox,
        receiver,
        subscription_of: positions(&subscription_ids),
        subscription_ids,
        owners: Arc::new(owners),
        task_ids: Arc::default(),
        creates: HashMap::new(),
    };
    let handshaken = poll_until(options.handshake_timeout, Duration::from_millis(50), || {
        setup.inbox.handshaken(&setup.subscription_ids) == n
    })
    .await;
    if !handshaken {
        setup.delete_subscriptions(options).await;
        bail!(
            "only {} of {n} handshakes arrived within {:.0} s",
            setup.inbox.handshaken(&setup.subscription_ids),
            options.handshake_timeout.as_secs_f64()
        );
    }
    println!(
        "  setup      {n} subscriptions created in {:.1} s, all handshakes in {:.1} s",
        created_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    match create_tasks(&setup, options).await {
        Ok(created) => {
            let mut task_ids = Vec::with_capacity(n);
            for (id, version, sent, responded) in created {
                let write = Write {
                    sent,
                    responded,
                    scheduled: false,
                };
                setup.creates.insert((id.clone(), version), write);
                task_ids.push(id);
            }
            setup.task_ids = Arc::new(task_ids);
        }
        Err(e) => {
            setup.delete_subscriptions(options).await;
            return Err(e);
        }
    }
    println!("  setup      {n} Tasks created; starting the update schedule");
    Ok(setup)
}

/// One `task-changed` rest-hook subscription per owner, filtered on it, with id-only content.
async fn subscribe(
    client: &reqwest::Client,
    bearer: &Arc<String>,
    base: &Arc<String>,
    owners: &[String],
    receiver: SocketAddr,
    options: &Options,
) -> anyhow::Result<Vec<String>> {
    run_bounded(owners.len(), options.setup_concurrency, |i| {
        let (client, bearer, base) = (client.clone(), bearer.clone(), base.clone());
        let endpoint = format!("http://{receiver}/hook/{i}");
        let filter = format!("owner={}", owners[i]);
        let channel = Channel::RestHook {
            endpoint: &endpoint,
            timeout: None,
        };
        let body = subscription_body(&base, "baton-load hub", Some(&filter), channel);
        async move { create_subscription(&client, &bearer, &base, &body).await }
    })
    .await
}

/// One Task per owner; each create is itself an event that must be notified.
async fn create_tasks(
    setup: &Setup,
    options: &Options,
) -> anyhow::Result<Vec<(String, u32, Instant, Instant)>> {
    run_bounded(setup.owners.len(), options.setup_concurrency, |i| {
        let (client, bearer, base) = (
            setup.client.clone(),
            setup.bearer.clone(),
            setup.base.clone(),
        );
        let body = task_body(&setup.owners[i], None, None).to_string();
        async move {
            let sent = Instant::now();
            let response = client
                .post(format!("{base}/Task"))
                .header(header::AUTHORIZATION, bearer.as_str())
                .header(header::CONTENT_TYPE, FHIR_JSON)
                .body(body)
                .send()
                .await
                .context("creating a Task")?;
            let responded = Instant::now();
            let version = response_version(&response).unwrap_or(1);
            let text = success_text(response, "creating a Task").await?;
            let task: Value = serde_json::from_str(&text).context("reading the Task")?;
            let id = task["id"].as_str().context("the created Task has no id")?;
            Ok((id.to_string(), version, sent, responded))
        }
    })
    .await
}

fn response_version(response: &reqwest::Response) -> Option<u32> {
    etag_version(response.headers().get(header::ETAG)?.to_str().ok()?)
}

/// How one scheduled update went.
enum UpdateResult {
    /// 2xx: the write happened; its notification must arrive.
    Written {
        task_id: String,
        version: u32,
        sent: Instant,
        responded: Instant,
    },
    /// 4xx: nothing was written.
    Refused(String),
    /// 5xx or no answer: the write may or may not have happened.
    Uncertain(String),
}

/// The schedule as it ran.
struct Driven {
    results: Vec<UpdateResult>,
    schedule: Schedule,
    total: u64,
    cpu: CpuUse,
}

/// The open-loop schedule of PUTs, round-robin over the owners' Tasks (and over
/// `--write-base`, when given).
async fn drive(options: &Options, setup: &Setup) -> anyhow::Result<Driven> {
    let plan = OpenLoop::new(options.rate, options.duration, options.max_in_flight);
    let results: Arc<Mutex<Vec<UpdateResult>>> =
        Arc::new(Mutex::new(Vec::with_capacity(plan.total as usize)));
    let n = setup.task_ids.len() as u64;
    let cpu = CpuMeter::start(options.target.server_pid);
    let schedule = plan
        .run(|k| {
            let i = (k % n) as usize;
            let base = match options.write_base.len() {
                0 => setup.base.to_string(),
                nodes => options.write_base[(k % nodes as u64) as usize]
                    .trim_end_matches('/')
                    .to_string(),
            };
            let (client, bearer) = (setup.client.clone(), setup.bearer.clone());
            let (task_ids, owners, results) = (
                setup.task_ids.clone(),
                setup.owners.clone(),
                results.clone(),
            );
            async move {
                let id = &task_ids[i];
                let body = task_body(&owners[i], Some(id), Some(&format!("load update {k}")));
                let result = update(&client, &bearer, &base, id, body).await;
                lock(&results).push(result);
            }
        })
        .await?;
    let cpu = cpu.finish();
    let results = std::mem::take(&mut *lock(&results));
    Ok(Driven {
        results,
        schedule,
        total: plan.total,
        cpu,
    })
}

async fn update(
    client: &reqwest::Client,
    bearer: &str,
    base: &str,
    id: &str,
    body: Value,
) -> UpdateResult {
    let sent = Instant::now();
    let outcome = client
        .put(format!("{base}/Task/{id}"))
        .header(header::AUTHORIZATION, bearer)
        .header(header::CONTENT_TYPE, FHIR_JSON)
        .body(body.to_string())
        .send()
        .await;
    let response = match outcome {
        Ok(response) => response,
        Err(e) => return UpdateResult::Uncertain(transport_error(&e)),
    };
    let responded = Instant::now();
    let status = response.status();
    let version = response_version(&response);
    let _ = response.bytes().await;
    match (status.as_u16(), version) {
        (200..=299, Some(version)) => UpdateResult::Written {
            task_id: id.to_string(),
            version,
            sent,
            responded,
        },
        (200..=299, None) => UpdateResult::Uncertain("2xx without ETag".into()),
        (400..=499, _) => UpdateResult::Refused(format!("HTTP {status}")),
        _ => UpdateResult::Uncertain(format!("HTTP {status}")),
    }
}

/// The writes, their answers and every notification received.
struct Collected {
    /// Every write that must be notified: the creates and the acknowledged updates.
    writes: HashMap<TaskVersion, Write>,
    update_latencies: Vec<Duration>,
    refused: BTreeMap<String, u64>,
    uncertain: BTreeMap<String, u64>,
    last_response: Instant,
    schedule: Schedule,
    total: u64,
    cpu: CpuUse,
    drained: bool,
    drain_wait: Duration,
    arrivals: Vec<Arrival>,
}

/// Sorts the answers, then waits until every write has been notified at least once (or the
/// drain timeout passes), plus the settle time for late duplicates.
async fn collect(options: &Options, setup: &Setup, driven: Driven) -> Collected {
    let mut writes = setup.creates.clone();
    let mut update_latencies = Vec::new();
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    let mut uncertain: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_response = driven.schedule.started;
    for result in driven.results {
        match result {
            UpdateResult::Written {
                task_id,
                version,
                sent,
                responded,
            } => {
                update_latencies.push(responded - sent);
                last_response = last_response.max(responded);
                let write = Write {
                    sent,
                    responded,
                    scheduled: true,
                };
                writes.insert((task_id, version), write);
            }
            UpdateResult::Refused(key) => *refused.entry(key).or_default() += 1,
            UpdateResult::Uncertain(key) => *uncertain.entry(key).or_default() += 1,
        }
    }

    let inbox = &setup.inbox;
    let expected = writes.len() as u64;
    let drain_start = Instant::now();
    let drained = poll_until(options.drain_timeout, Duration::from_millis(100), || {
        inbox.events.load(Ordering::Relaxed) >= expected && all_arrived(&writes, inbox)
    })
    .await;
    let drain_wait = drain_start.elapsed();
    if drained {
        tokio::time::sleep(options.settle).await;
    }
    Collected {
        writes,
        update_latencies,
        refused,
        uncertain,
        last_response,
        schedule: driven.schedule,
        total: driven.total,
        cpu: driven.cpu,
        drained,
        drain_wait,
        arrivals: std::mem::take(&mut *lock(&inbox.arrivals)),
    }
}

/// Whether every expected write has at least one received event.
fn all_arrived(writes: &HashMap<TaskVersion, Write>, inbox: &Inbox) -> bool {
    let arrivals = lock(&inbox.arrivals);
    let mut seen: HashSet<(&str, u32)> = HashSet::with_capacity(writes.len());
    for arrival in arrivals.iter() {
        for event in &arrival.events {
            seen.insert((event.task.as_str(), event.version));
        }
    }
    writes
        .keys()
        .all(|(id, version)| seen.contains(&(id.as_str(), *version)))
}
