//! `baton-fanout websocket`: owner-filtered and catch-all websocket listeners, each bound on
//! its own socket; the server's memory per idle socket; then an open-loop schedule of Task
//! updates and, per update, how long until every listener that should hear it had it.

mod listener;
mod verify;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_tools::common::api::create_subscription;
use baton_tools::common::cpu::{CpuMeter, CpuUse};
use baton_tools::common::fhir::{Channel, subscription_body};
use baton_tools::common::schedule::{OpenLoop, Schedule};
use baton_tools::common::websocket::{BindDeadlines, bind};
use baton_tools::common::{lock, parse_duration, poll_until, run_bounded};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::check::Write;
use crate::server::{Names, Server, ServerArgs, metric_sum, proc_status_kib};
use listener::ListenerLog;

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    server: ServerArgs,
    /// Owners, each with one Task and one websocket subscription filtered on it.
    #[arg(long, default_value_t = 10_000)]
    owners: usize,
    /// Websocket subscriptions without a filter: they hear every update.
    #[arg(long, default_value_t = 100)]
    catch_all: usize,
    /// Target Task updates per second, round-robin over the owners' Tasks (open loop).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Updates in flight at most; when reached, the schedule waits and the run reports it.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// How long the bound sockets sit idle before the memory is read.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    idle: Duration,
    /// Longest wait, after the last update, for every notification to arrive.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Extra wait once everything arrived, to catch late duplicates.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
    /// Print, per second of the run, updates answered, events received and server memory.
    #[arg(long)]
    timeline: bool,
    /// No subscriptions and no sockets: the same Tasks and schedule of updates with nobody
    /// listening, the baseline for the updates' own latency beside the fan-out.
    #[arg(long)]
    no_listeners: bool,
    /// The nice value (0-19) of the threads that read the listeners' sockets (this process's
    /// runtime), not of the updates' own thread. On a machine that runs the server too, the
    /// 10 100 readers want the cores the server and the updates need; with a higher value the
    /// kernel serves those first, as if the listeners ran elsewhere, and the readers take
    /// what is idle (their arrival times, and so the notification latencies, may then be
    /// later than the server's sends). 0: as the process runs.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    listeners_nice: i32,
}

pub async fn run(options: &Options) -> anyhow::Result<bool> {
    if options.owners == 0 || options.rate <= 0.0 || options.max_in_flight == 0 {
        bail!("--owners, --rate and --max-in-flight must be positive");
    }
    if options.listeners_nice > 0 {
        lower_runtime_priority(options.listeners_nice)?;
    }
    let (setup, listeners) = setup(options).await?;
    let driven = drive(options, &setup, &listeners).await?;
    let collected = collect(options, &setup, listeners, driven).await;
    Ok(verify::verify(options, &setup, &collected))
}

/// Sets the nice value of every thread of this process but the calling one: the runtime's
/// workers, which will read the listeners' sockets. `run` is called on the main thread (the
/// runtime's `block_on`), which keeps its priority, and so does the updates' thread it starts
/// later (a new thread takes its creator's nice value). On Linux a nice value is a thread's
/// own.
fn lower_runtime_priority(nice: i32) -> anyhow::Result<()> {
    let tid_of = |path: &std::path::Path| {
        path.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<i32>().ok())
    };
    let own = tid_of(&std::fs::read_link("/proc/thread-self").context("finding this thread")?);
    let mut lowered = 0;
    for entry in std::fs::read_dir("/proc/self/task").context("listing this process's threads")? {
        let tid = tid_of(&entry?.path());
        if tid == own {
            continue;
        }
        if let Some(tid) = tid.and_then(rustix::process::Pid::from_raw) {
            rustix::process::setpriority_process(Some(tid), nice)
                .with_context(|| format!("setting the listeners' threads to nice {nice}"))?;
            lowered += 1;
        }
    }
    println!("  setup      {lowered} listener threads at nice {nice}");
    Ok(())
}

/// The run's Tasks, subscriptions and server, and its memory before the sockets.
struct Setup {
    server: Server,
    names: Arc<Names>,
    pid: u32,
    /// Listener i < owners filters on owner i; the rest are catch-alls.
    listeners: usize,
    rss_start: u64,
    rss_before: u64,
}

impl Setup {
    fn rss(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS:").unwrap_or(0)
    }
}

/// The bound listeners, reading until `stop`.
struct Listeners {
    readers: JoinSet<(usize, Option<ListenerLog>)>,
    stop: CancellationToken,
    /// Events received by all listeners so far.
    received: Arc<AtomicU64>,
    /// Which listeners bound.
    bound: HashSet<usize>,
}

async fn setup(options: &Options) -> anyhow::Result<(Setup, Listeners)> {
    let target = &options.server.target;
    let owners = options.owners;
    let pid = target
        .server_pid
        .context("--server-pid is needed to read the server's memory")?;
    let server = Server::new(
        target,
        options.max_in_flight.max(options.server.setup_concurrency),
    )?;
    let names = Arc::new(Names::new());
    let mut setup = Setup {
        server,
        names,
        pid,
        listeners: if options.no_listeners {
            0
        } else {
            owners + options.catch_all
        },
        rss_start: 0,
        rss_before: 0,
    };
    println!(
        "websocket: run {}, {owners} owner listeners + {} catch-all listeners, {} updates/s for {:.0} s",
        setup.names.run,
        options.catch_all,
        options.rate,
        options.duration.as_secs_f64()
    );
    setup.rss_start = setup.rss();

    // Tasks first: no subscription exists yet, so their creation notifies nobody.
    let started = Instant::now();
    setup
        .server
        .create_tasks(
            &setup.names,
            owners,
            |i| i,
            options.server.setup_concurrency,
        )
        .await?;
    println!(
        "  setup      {owners} Tasks created in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let subscriptions = Arc::new(subscribe(&setup, options).await?);
    println!(
        "  setup      {} websocket subscriptions created in {:.1} s",
        setup.listeners,
        started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    setup.rss_before = setup.rss();
    let listeners = bind_all(&setup, options, subscriptions).await?;
    Ok((setup, listeners))
}

async fn subscribe(setup: &Setup, options: &Options) -> anyhow::Result<Vec<String>> {
    let server = &setup.server;
    run_bounded(setup.listeners, options.server.setup_concurrency, |i| {
        let filter = (i < options.owners).then(|| format!("owner={}", setup.names.owner(i)));
        let body = subscription_body(&server.base, "baton_fanout", filter.as_deref(), Channel::WebSocket);
        let server = server.clone();
        async move { create_subscription(&server.client, &server.bearer, &server.base, &body).await }
    })
    .await
}

/// Binds every listener on its own socket; each keeps reading until the run stops it.
async fn bind_all(
    setup: &Setup,
    options: &Options,
    subscriptions: Arc<Vec<String>>,
) -> anyhow::Result<Listeners> {
    let started = Instant::now();
    let stop = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    let bound: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(options.server.setup_concurrency.max(1)));
    let mut readers = JoinSet::new();
    let deadlines = BindDeadlines {
        connect: None,
        handshake: Duration::from_secs(60),
    };
    for i in 0..setup.listeners {
        let permit = permits.clone().acquire_owned().await?;
        let (server, subscriptions, names) = (
            setup.server.clone(),
            subscriptions.clone(),
            setup.names.clone(),
        );
        let (stop, received, bound, failed, errors) = (
            stop.clone(),
            received.clone(),
            bound.clone(),
            failed.clone(),
            errors.clone(),
        );
        readers.spawn(async move {
            let socket = bind(
                &server.client,
                &server.bearer,
                &server.base,
                &subscriptions[i],
                deadlines,
            )
            .await;
            drop(permit);
            match socket {
                Ok((socket, _handshake)) => {
                    lock(&bound).insert(i);
                    (i, Some(listener::read(socket, stop, names, received).await))
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    *lock(&errors).entry(format!("{e:#}")).or_default() += 1;
                    (i, None)
                }
            }
        });
    }
    let answered = || lock(&bound).len() as u64 + failed.load(Ordering::Relaxed);
    poll_until(Duration::MAX, Duration::from_millis(50), || {
        answered() >= setup.listeners as u64
    })
    .await;
    let bound = std::mem::take(&mut *lock(&bound));
    println!(
        "  setup      {} of {} sockets bound in {:.1} s ({} failed)",
        bound.len(),
        setup.listeners,
        started.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    for (error, count) in lock(&errors).iter() {
        println!("    {count} x {error}");
    }
    Ok(Listeners {
        readers,
        stop,
        received,
        bound,
    })
}

/// One second of the run, as the sampler saw it (counters are cumulative).
struct Sample {
    second: u64,
    answered: u64,
    matched: u64,
    received: u64,
    rss_kib: u64,
}

/// How one scheduled update went: its Task, its version when written or why it did not
/// count, when it was answered, and how long the request took.
type Answered = (u32, Result<u32, String>, Instant, Duration);

/// The idle memory and the schedule as it ran; the sampler still samples.
struct Driven {
    rss_idle: u64,
    per_socket_kib: f64,
    writes: Vec<Write>,
    /// Each update's request to response, failed ones included.
    update_latencies: Vec<Duration>,
    failures: BTreeMap<String, u64>,
    schedule: Schedule,
    total: u64,
    cpu: CpuUse,
    sampler: tokio::task::JoinHandle<Vec<Sample>>,
    sampler_stop: CancellationToken,
}

/// The sockets sit idle, the memory is read; then the open-loop schedule of updates, with a
/// sampler reading the counters once a second.
async fn drive(options: &Options, setup: &Setup, listeners: &Listeners) -> anyhow::Result<Driven> {
    let server = &setup.server;
    let bound = listeners.bound.len();
    tokio::time::sleep(options.idle).await;
    let rss_idle = setup.rss();
    let per_socket_kib = if bound > 0 {
        (rss_idle as f64 - setup.rss_before as f64) / bound as f64
    } else {
        0.0
    };
    let idle_metrics = server.metrics_lines("websocket").await;
    println!(
        "  memory     server VmRSS {} KiB at start, {} KiB with Tasks and subscriptions, \
         {rss_idle} KiB with {bound} sockets bound and idle {:.0} s: {per_socket_kib:.1} KiB per socket",
        setup.rss_start,
        setup.rss_before,
        options.idle.as_secs_f64()
    );
    println!(
        "  gauge      baton_websocket_connections {}",
        metric_sum(&idle_metrics, "baton_websocket_connections").unwrap_or(f64::NAN)
    );

    let plan = OpenLoop::new(options.rate, options.duration, options.max_in_flight);
    let results: Arc<Mutex<Vec<Answered>>> =
        Arc::new(Mutex::new(Vec::with_capacity(plan.total as usize)));
    let answered = Arc::new(AtomicU64::new(0));
    let sampler_stop = CancellationToken::new();
    let sampler = tokio::spawn(sample(
        server.clone(),
        setup.pid,
        answered.clone(),
        listeners.received.clone(),
        sampler_stop.clone(),
    ));
    let cpu = CpuMeter::start(Some(setup.pid));
    let schedule = run_updates(
        plan,
        options,
        setup.names.clone(),
        results.clone(),
        answered.clone(),
    )
    .await?;
    let cpu = cpu.finish();
    let mut writes = Vec::with_capacity(plan.total as usize);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut update_latencies = Vec::with_capacity(plan.total as usize);
    for (task, outcome, responded, took) in lock(&results).drain(..) {
        update_latencies.push(took);
        match outcome {
            Ok(version) => writes.push(Write {
                task,
                version,
                responded,
            }),
            Err(key) => *failures.entry(key).or_default() += 1,
        }
    }
    Ok(Driven {
        rss_idle,
        per_socket_kib,
        writes,
        update_latencies,
        failures,
        schedule,
        total: plan.total,
        cpu,
        sampler,
        sampler_stop,
    })
}

/// Runs the open-loop schedule of updates on a thread and a runtime of its own, with its own
/// connections, and waits for it. On this process's runtime the updates would share the
/// worker threads with the listeners' sockets (50 000 frames a second in the run):
/// their timers and answers would wait behind the tool's own reading, and the latency the run
/// reports would be partly the tool's rather than the server's.
async fn run_updates(
    plan: OpenLoop,
    options: &Options,
    names: Arc<Names>,
    results: Arc<Mutex<Vec<Answered>>>,
    answered: Arc<AtomicU64>,
) -> anyhow::Result<Schedule> {
    let target = options.server.target.clone();
    let connections = options.max_in_flight;
    let owners = options.owners as u64;
    let (done, outcome) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fanout-updates".into())
        .spawn(move || {
            let run = || -> anyhow::Result<Schedule> {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the updates' runtime")?;
                runtime.block_on(async {
                    let server = Server::new(&target, connections)?;
                    plan.run(|k| {
                        let task = (k % owners) as usize;
                        let (server, names) = (server.clone(), names.clone());
                        let (results, answered) = (results.clone(), answered.clone());
                        async move {
                            let sent = Instant::now();
                            let outcome = server.update_task(&names, task, task, k).await;
                            let responded = Instant::now();
                            answered.fetch_add(1, Ordering::Relaxed);
                            lock(&results).push((
                                task as u32,
                                outcome,
                                responded,
                                responded - sent,
                            ));
                        }
                    })
                    .await
                })
            };
            let _ = done.send(run());
        })
        .context("starting the updates' thread")?;
    outcome
        .await
        .context("the updates' thread ended without an answer")?
}

/// Once a second until `stop`: updates answered, events the hub numbered and listeners
/// received, and the server's memory.
async fn sample(
    server: Server,
    pid: u32,
    answered: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let start = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        // How far the hub's matcher got: events numbered so far.
        let matched = metric_sum(
            &server.metrics_lines("websocket").await,
            "baton_events_total",
        )
        .unwrap_or(0.0) as u64;
        samples.push(Sample {
            second: start.elapsed().as_secs(),
            answered: answered.load(Ordering::Relaxed),
            matched,
            received: received.load(Ordering::Relaxed),
            rss_kib: proc_status_kib(pid, "VmRSS:").unwrap_or(0),
        });
    }
    samples
}

/// Everything the listeners and the sampler saw.
struct Collected {
    driven: Driven,
    /// Per owner, the indexes of the writes to its Task.
    by_task: Vec<Vec<usize>>,
    drained: bool,
    rss_after: u64,
    final_metrics: Vec<String>,
    samples: Vec<Sample>,
    /// Per listener, its log (`None`: it never bound).
    logs: Vec<Option<ListenerLog>>,
    sockets_bound: usize,
    received: u64,
}

/// Waits until every expected event arrived (or the drain timeout passes), then a short
/// settle; stops the listeners and the sampler.
async fn collect(
    options: &Options,
    setup: &Setup,
    mut listeners: Listeners,
    mut driven: Driven,
) -> Collected {
    let writes = &driven.writes;
    let mut by_task: Vec<Vec<usize>> = vec![Vec::new(); options.owners];
    for (w, write) in writes.iter().enumerate() {
        by_task[write.task as usize].push(w);
    }
    let expected_events: u64 = listeners
        .bound
        .iter()
        .map(|&i| if i >= options.owners { writes.len() } else { by_task[i].len() } as u64)
        .sum();
    let received = listeners.received.clone();
    let drained = poll_until(options.drain_timeout, Duration::from_millis(100), || {
        received.load(Ordering::Relaxed) >= expected_events
    })
    .await;
    tokio::time::sleep(options.settle).await;
    let rss_after = setup.rss();
    let final_metrics = setup.server.metrics_lines("websocket").await;
    listeners.stop.cancel();
    driven.sampler_stop.cancel();
    let samples = (&mut driven.sampler).await.unwrap_or_default();
    let mut logs: Vec<Option<ListenerLog>> = (0..setup.listeners).map(|_| None).collect();
    while let Some(joined) = listeners.readers.join_next().await {
        if let Ok((i, log)) = joined {
            logs[i] = log;
        }
    }
    Collected {
        by_task,
        drained,
        rss_after,
        final_metrics,
        samples,
        logs,
        sockets_bound: listeners.bound.len(),
        received: received.load(Ordering::Relaxed),
        driven,
    }
}
