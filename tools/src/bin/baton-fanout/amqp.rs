//! `baton-fanout amqp`: message-channel subscriptions publishing to one exchange bound to one
//! queue, closed-loop Task updates, and a consumer that timestamps every message; afterwards
//! the confirmed notifications per second, the delay from update response to consumer
//! arrival, and lost, duplicate and reordered events.

mod verify;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_tools::common::amqp::Topology;
use baton_tools::common::api::{create_subscription, delete_subscriptions};
use baton_tools::common::cpu::{CpuMeter, CpuUse};
use baton_tools::common::fhir::{Channel, subscription_body};
use baton_tools::common::{lock, parse_duration, poll_until, positions, run_bounded};
use clap::ValueEnum;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio::task::JoinSet;

use crate::check::Write;
use crate::server::{Names, Server, ServerArgs};

/// The routing key every AMQP subscription of a run publishes with.
const ROUTING_KEY: &str = "fanout";

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    server: ServerArgs,
    /// The broker, for this tool's own topology and consumer (with credentials).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// The broker as subscriptions name it: the hub's BATON_AMQP_URL host, port and vhost.
    #[arg(long, default_value = "amqp://127.0.0.1:5672/%2f")]
    endpoint_broker: String,
    /// Message subscriptions, all publishing to one exchange bound to one queue.
    #[arg(long, default_value_t = 1)]
    subscriptions: usize,
    /// What each subscription listens to.
    #[arg(long, value_enum, default_value_t = Filter::None)]
    filter: Filter,
    /// Tasks updated; Task i belongs to owner i mod subscriptions.
    #[arg(long, default_value_t = 100)]
    tasks: usize,
    /// Closed-loop writers, each with one update in flight at a time.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// Events per notification at most (`backport-max-count`); 1 makes every event its own
    /// message. Without it the hub's `delivery.default_max_count` applies.
    #[arg(long)]
    max_count: Option<u32>,
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Longest wait, after the last update, for every notification to arrive.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Extra wait once everything arrived, to catch late duplicates.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Filter {
    /// Every subscription hears every update (fan-out).
    None,
    /// Each subscription hears only its own owner's Tasks.
    Owner,
}

impl Filter {
    fn name(self) -> &'static str {
        match self {
            Filter::None => "none",
            Filter::Owner => "owner",
        }
    }
}

pub async fn run(options: &Options) -> anyhow::Result<bool> {
    if options.subscriptions == 0 || options.tasks == 0 || options.writers == 0 {
        bail!("--subscriptions, --tasks and --writers must be positive");
    }
    let setup = setup(options).await?;
    let driven = drive(options, &setup).await?;
    let collected = collect(options, &setup, &driven).await;
    let findings = verify::verify(options, &setup, &driven, &collected);
    findings.print(options, &driven, &collected);
    let run = setup.names.run.clone();
    teardown(options, setup).await;
    println!("{}", findings.json(options, &driven, &run));
    Ok(findings.passed)
}

/// A message as the consumer took it from the queue, with its arrival time.
type Inbox = Arc<Mutex<Vec<(Instant, lapin::message::Delivery)>>>;

/// The broker topology, the consumer, the Tasks and the subscriptions, all handshaken.
struct Setup {
    server: Server,
    names: Arc<Names>,
    connection: Connection,
    setup_channel: lapin::Channel,
    consume_channel: lapin::Channel,
    topology: Topology,
    inbox: Inbox,
    consumer_task: tokio::task::JoinHandle<()>,
    subscription_ids: Vec<String>,
    subscription_of: HashMap<String, usize>,
}

async fn setup(options: &Options) -> anyhow::Result<Setup> {
    let target = &options.server.target;
    let m = options.subscriptions;
    let server = Server::new(
        target,
        options.writers.max(options.server.setup_concurrency),
    )?;
    let names = Arc::new(Names::new());
    let exchange = format!("baton-fanout-{}", names.run);
    println!(
        "amqp: run {}, {m} subscriptions (filter {}, max count {}) -> exchange/queue {exchange}, {} writers over {} Tasks for {:.0} s",
        names.run,
        options.filter.name(),
        options
            .max_count
            .map_or("hub default".to_string(), |n| n.to_string()),
        options.writers,
        options.tasks,
        options.duration.as_secs_f64()
    );

    // A durable direct exchange and a durable queue, as an integration engine would have; the
    // queue expires on its own if this run dies before deleting it.
    let topology = Topology {
        queue: exchange.clone(),
        exchange,
        routing_key: ROUTING_KEY.into(),
        exchange_auto_delete: false,
        queue_expires: Duration::from_secs(30 * 60),
    };
    let connection = Connection::connect(&options.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to the broker")?;
    let setup_channel = connection.create_channel().await?;
    topology.declare(&setup_channel).await?;

    // The consumer: no acks, so the broker pushes as fast as it can and this tool's cost stays
    // small; every message is timestamped on arrival and parsed later.
    let consume_channel = connection.create_channel().await?;
    consume_channel
        .basic_qos(2000, BasicQosOptions::default())
        .await?;
    let mut consumer = consume_channel
        .basic_consume(
            topology.queue.as_str().into(),
            "baton-fanout".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("consuming")?;
    let inbox: Inbox = Arc::default();
    let consumed = Arc::new(AtomicU64::new(0));
    let consumer_task = {
        let (inbox, consumed) = (inbox.clone(), consumed.clone());
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let at = Instant::now();
                consumed.fetch_add(1, Ordering::Relaxed);
                lock(&inbox).push((at, delivery));
            }
        })
    };

    // Tasks before subscriptions, so their creation notifies nobody.
    let started = Instant::now();
    server
        .create_tasks(
            &names,
            options.tasks,
            |i| i % m,
            options.server.setup_concurrency,
        )
        .await?;
    let subscription_ids = subscribe(&server, &names, &topology, options).await?;
    let handshaken = poll_until(Duration::from_secs(60), Duration::from_millis(50), || {
        consumed.load(Ordering::Relaxed) >= m as u64 && {
            let handshakes = handshakes(&lock(&inbox));
            subscription_ids.iter().all(|id| handshakes.contains(id))
        }
    })
    .await;
    if !handshaken {
        bail!("not every handshake arrived within 60 s");
    }
    println!(
        "  setup      {} Tasks and {m} subscriptions created, all handshakes in {:.1} s",
        options.tasks,
        started.elapsed().as_secs_f64()
    );
    Ok(Setup {
        server,
        names,
        connection,
        setup_channel,
        consume_channel,
        topology,
        inbox,
        consumer_task,
        subscription_of: positions(&subscription_ids),
        subscription_ids,
    })
}

async fn subscribe(
    server: &Server,
    names: &Names,
    topology: &Topology,
    options: &Options,
) -> anyhow::Result<Vec<String>> {
    let endpoint = format!(
        "{}?exchange={}&routing_key={ROUTING_KEY}",
        options.endpoint_broker, topology.exchange
    );
    run_bounded(options.subscriptions, options.server.setup_concurrency, |i| {
        let filter = match options.filter {
            Filter::None => None,
            Filter::Owner => Some(format!("owner={}", names.owner(i))),
        };
        let channel = Channel::Message {
            endpoint: &endpoint,
            max_count: options.max_count,
        };
        let body = subscription_body(&server.base, "baton_fanout", filter.as_deref(), channel);
        let server = server.clone();
        async move { create_subscription(&server.client, &server.bearer, &server.base, &body).await }
    })
    .await
}

/// The subscriptions whose handshake is among `messages`.
fn handshakes(messages: &[(Instant, lapin::message::Delivery)]) -> HashSet<String> {
    messages
        .iter()
        .filter_map(|(_, d)| {
            let headers = d.properties.headers().as_ref()?;
            (header_text(headers, "notification-type")? == "handshake")
                .then(|| header_text(headers, "subscription-id"))?
        })
        .collect()
}

pub fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_string),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

pub fn header_number(headers: &FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// The closed loop as it ran.
struct Driven {
    writes: Vec<Write>,
    failures: BTreeMap<String, u64>,
    started: Instant,
    ended: Instant,
    cpu: CpuUse,
}

impl Driven {
    fn window(&self) -> Duration {
        self.ended - self.started
    }
}

/// Closed loop: writer w updates Tasks w, w + W, w + 2W, … in turn until the duration passes.
async fn drive(options: &Options, setup: &Setup) -> anyhow::Result<Driven> {
    let m = options.subscriptions;
    let stop_at = Instant::now() + options.duration;
    let started = Instant::now();
    let cpu = CpuMeter::start(options.server.target.server_pid);
    let mut writers = JoinSet::new();
    for w in 0..options.writers {
        let (server, names) = (setup.server.clone(), setup.names.clone());
        let tasks: Vec<usize> = (w..options.tasks).step_by(options.writers).collect();
        writers.spawn(async move {
            let mut done = Vec::new();
            let mut failures: BTreeMap<String, u64> = BTreeMap::new();
            let mut k = 0u64;
            while Instant::now() < stop_at && !tasks.is_empty() {
                let task = tasks[(k as usize) % tasks.len()];
                let outcome = server.update_task(&names, task, task % m, k).await;
                let responded = Instant::now();
                match outcome {
                    Ok(version) => done.push(Write {
                        task: task as u32,
                        version,
                        responded,
                    }),
                    Err(key) => *failures.entry(key).or_default() += 1,
                }
                k += 1;
            }
            (done, failures)
        });
    }
    let mut writes = Vec::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(joined) = writers.join_next().await {
        let (done, failed) = joined.context("a writer panicked")?;
        writes.extend(done);
        for (key, count) in failed {
            *failures.entry(key).or_default() += count;
        }
    }
    Ok(Driven {
        writes,
        failures,
        started,
        ended: Instant::now(),
        cpu: cpu.finish(),
    })
}

/// Per subscription, the writes it must hear and the messages it got.
struct Collected {
    /// Per subscription, indexes into the writes.
    expected: Vec<Vec<usize>>,
    drained: bool,
    final_metrics: Vec<String>,
    deliveries: Vec<(Instant, lapin::message::Delivery)>,
}

/// Waits until the messages' headers account for every expected event (or the drain timeout
/// passes), then a short settle; takes every message consumed.
async fn collect(options: &Options, setup: &Setup, driven: &Driven) -> Collected {
    let m = options.subscriptions;
    let mut expected: Vec<Vec<usize>> = vec![Vec::new(); m];
    for (w, write) in driven.writes.iter().enumerate() {
        match options.filter {
            Filter::None => expected.iter_mut().for_each(|e| e.push(w)),
            Filter::Owner => expected[write.task as usize % m].push(w),
        }
    }
    let expected_events: u64 = expected.iter().map(|e| e.len() as u64).sum();
    let events_in = |inbox: &[(Instant, lapin::message::Delivery)]| -> u64 {
        inbox
            .iter()
            .filter_map(|(_, d)| {
                let headers = d.properties.headers().as_ref()?;
                let first = header_number(headers, "first-event")?;
                Some((header_number(headers, "last-event")? - first + 1) as u64)
            })
            .sum()
    };
    let drained = poll_until(options.drain_timeout, Duration::from_millis(200), || {
        events_in(&lock(&setup.inbox)) >= expected_events
    })
    .await;
    tokio::time::sleep(options.settle).await;
    Collected {
        expected,
        drained,
        final_metrics: setup.server.metrics_lines("message").await,
        deliveries: std::mem::take(&mut *lock(&setup.inbox)),
    }
}

/// Subscriptions first, so the hub stops publishing; then the consumer and the topology.
async fn teardown(options: &Options, setup: Setup) {
    let server = &setup.server;
    delete_subscriptions(
        &server.client,
        &server.bearer,
        &server.base,
        &setup.subscription_ids,
        options.server.setup_concurrency,
    )
    .await;
    setup.consumer_task.abort();
    let _ = setup.consume_channel.close(200, "OK".into()).await;
    setup.topology.remove(&setup.setup_channel).await;
    let _ = setup.connection.close(200, "OK".into()).await;
}
