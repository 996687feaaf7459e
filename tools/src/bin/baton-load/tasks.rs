//! `baton-load tasks`: closed-loop Task creates or updates from concurrent workers, each with
//! one request in flight, on one keep-alive HTTP/1.1 client. `--mode transaction` posts the
//! creates to the FHIR base as transaction Bundles of `--entries` Tasks each, and reports
//! creates per second beside requests per second.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_tools::common::api::{http_client, success_text};
use baton_tools::common::cpu::{CpuMeter, CpuUse};
use baton_tools::common::fhir::{FHIR_JSON, task_body, task_id};
use baton_tools::common::percentiles::{Percentiles, round2};
use baton_tools::common::target::Target;
use baton_tools::common::{parse_duration, snippet};
use clap::ValueEnum;
use reqwest::header;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::ADMIN;

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    target: Target,
    /// Workers, each with one request in flight at a time.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Measured time (e.g. 20s, 500ms, 2m).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before the measured time.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    #[arg(long, value_enum, default_value_t = Mode::Create)]
    mode: Mode,
    /// Transaction mode: Task creates in each transaction Bundle.
    #[arg(long, default_value_t = 10)]
    entries: usize,
    /// Each worker sends at most one request per this interval (e.g. 20ms: 50 a second per
    /// worker), so that a few paced workers probe a server's latency under someone else's load
    /// without adding much of their own. A request still waits for the previous answer; the
    /// wait for the next slot is not part of the latency. Unset: back to back (closed loop).
    #[arg(long, value_parser = parse_duration)]
    pace: Option<Duration>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Create,
    Update,
    /// Creates in transaction Bundles (`POST /fhir`), `--entries` per Bundle.
    Transaction,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Create => "create",
            Mode::Update => "update",
            Mode::Transaction => "transaction",
        }
    }
}

/// A transaction Bundle creating `entries` Tasks, each `task` (a Task's JSON text), written as
/// text: the load tool shares the machine with the server it measures, and building each
/// Bundle as a `serde_json::Value` (an allocation per key and string of every entry) was a
/// cost it took from the server's cores (BENCHMARKS.md, issue 17, seventh sitting).
fn transaction_body(task: &str, entries: usize) -> String {
    const HEAD: &str = r#"{"resourceType":"Bundle","type":"transaction","entry":["#;
    const ENTRY: &str = r#"{"fullUrl":"urn:uuid:"#;
    const RESOURCE: &str = r#"","resource":"#;
    const REQUEST: &str = r#","request":{"method":"POST","url":"Task"}}"#;
    let mut uuid = uuid::Uuid::encode_buffer();
    let entry_len = ENTRY.len() + 36 + RESOURCE.len() + task.len() + REQUEST.len() + 1;
    let mut body = String::with_capacity(HEAD.len() + entries * entry_len + 2);
    body.push_str(HEAD);
    for n in 0..entries {
        if n > 0 {
            body.push(',');
        }
        body.push_str(ENTRY);
        body.push_str(uuid::Uuid::new_v4().hyphenated().encode_lower(&mut uuid));
        body.push_str(RESOURCE);
        body.push_str(task);
        body.push_str(REQUEST);
    }
    body.push_str("]}");
    body
}

pub async fn run(options: &Options) -> anyhow::Result<bool> {
    if options.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if options.entries == 0 {
        bail!("--entries must be at least 1");
    }
    let setup = setup(options).await?;
    let driven = drive(options, &setup).await;
    let collected = collect(driven).await?;
    Ok(verify(options, &setup, &collected))
}

/// What the workers share.
struct Setup {
    client: reqwest::Client,
    bearer: String,
    base: String,
    /// Update mode: each worker's own (owner, Task id), so workers never contend for a row.
    own_tasks: Vec<(String, String)>,
}

async fn setup(options: &Options) -> anyhow::Result<Setup> {
    let bearer = options.target.bearer(&ADMIN)?;
    let client = http_client(options.concurrency * 2, Duration::from_secs(30))?;
    let base = options.target.base().to_string();
    let mut own_tasks = Vec::new();
    if options.mode == Mode::Update {
        for worker in 0..options.concurrency {
            let owner = format!("Practitioner/load-{worker}");
            let response = client
                .post(format!("{base}/Task"))
                .header(header::AUTHORIZATION, &bearer)
                .header(header::CONTENT_TYPE, FHIR_JSON)
                .body(task_body(&owner, None, None).to_string())
                .send()
                .await
                .context("creating the Tasks to update")?;
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(task_id)
                .map(str::to_string);
            let body = success_text(response, "creating a Task to update").await?;
            // The bare server echoes the body without an id; any id will do there.
            let id = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string))
                .or(location)
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            own_tasks.push((owner, id));
        }
    }
    Ok(Setup {
        client,
        bearer,
        base,
        own_tasks,
    })
}

/// What one closed-loop worker measured.
#[derive(Default)]
struct WorkerStats {
    latencies: Vec<Duration>,
    /// Completion of the last measured request.
    last_done: Option<Instant>,
    errors: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
}

/// The running workers, and when their measured time began.
struct Driven {
    workers: JoinSet<WorkerStats>,
    measure_from: Instant,
    cpu: CpuMeter,
}

/// Starts the workers: each sends its next request when the last is answered, until the
/// warm-up and the measured time have passed; only requests sent after the warm-up count.
async fn drive(options: &Options, setup: &Setup) -> Driven {
    let started = Instant::now();
    let cpu = CpuMeter::start(options.target.server_pid);
    let measure_from = started + options.warmup;
    let deadline = measure_from + options.duration;
    let mut workers = JoinSet::new();
    for worker in 0..options.concurrency {
        let client = setup.client.clone();
        let bearer = setup.bearer.clone();
        let base = setup.base.clone();
        let own = setup.own_tasks.get(worker).cloned();
        let transaction = (options.mode == Mode::Transaction).then_some(options.entries);
        // Every Task a worker creates is the same; its text is made once.
        let new_task = task_body(&format!("Practitioner/load-{worker}"), None, None).to_string();
        let pace = options.pace;
        workers.spawn(async move {
            let mut stats = WorkerStats::default();
            let mut n: u64 = 0;
            let mut slots = pace.map(|every| {
                let mut slots = tokio::time::interval(every);
                slots.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                slots
            });
            while Instant::now() < deadline {
                if let Some(slots) = &mut slots {
                    slots.tick().await;
                }
                n += 1;
                let request = match (&own, transaction) {
                    (_, Some(entries)) => client
                        .post(base.clone())
                        .body(transaction_body(&new_task, entries)),
                    (None, None) => client.post(format!("{base}/Task")).body(new_task.clone()),
                    (Some((owner, id)), None) => client.put(format!("{base}/Task/{id}")).body(
                        task_body(owner, Some(id), Some(&format!("load {worker}-{n}"))).to_string(),
                    ),
                };
                let sent = Instant::now();
                let outcome = request
                    .header(header::AUTHORIZATION, &bearer)
                    .header(header::CONTENT_TYPE, FHIR_JSON)
                    .send()
                    .await;
                let failure = match outcome {
                    Ok(response) => {
                        let status = response.status();
                        match response.bytes().await {
                            Ok(_) if status.is_success() => None,
                            Ok(body) => Some((
                                format!("HTTP {}", status.as_u16()),
                                snippet(&String::from_utf8_lossy(&body)),
                            )),
                            Err(e) => Some((transport_error(&e), e.to_string())),
                        }
                    }
                    Err(e) => Some((transport_error(&e), e.to_string())),
                };
                let done = Instant::now();
                if sent < measure_from {
                    continue;
                }
                stats.latencies.push(done - sent);
                stats.last_done = Some(done);
                if let Some((key, sample)) = failure {
                    *stats.errors.entry(key.clone()).or_default() += 1;
                    stats.samples.entry(key).or_insert(sample);
                }
            }
            stats
        });
    }
    Driven {
        workers,
        measure_from,
        cpu,
    }
}

/// Every worker's figures together.
struct Collected {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
    /// From the end of the warm-up to the last measured answer.
    window: Duration,
    cpu: CpuUse,
}

async fn collect(mut driven: Driven) -> anyhow::Result<Collected> {
    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let mut last_done = driven.measure_from;
    while let Some(joined) = driven.workers.join_next().await {
        let stats = joined.context("a worker panicked")?;
        latencies.extend(stats.latencies);
        if let Some(done) = stats.last_done {
            last_done = last_done.max(done);
        }
        for (key, count) in stats.errors {
            *errors.entry(key).or_default() += count;
        }
        for (key, sample) in stats.samples {
            samples.entry(key).or_insert(sample);
        }
    }
    Ok(Collected {
        latencies,
        errors,
        samples,
        window: (last_done - driven.measure_from).max(Duration::from_millis(1)),
        cpu: driven.cpu.finish(),
    })
}

/// Reports the figures; the run passes when no request failed.
fn verify(options: &Options, setup: &Setup, collected: &Collected) -> bool {
    let Collected {
        latencies,
        errors,
        samples,
        window,
        cpu,
    } = collected;
    let (base, concurrency, mode_name) = (&setup.base, options.concurrency, options.mode.name());
    let requests = latencies.len();
    let error_count: u64 = errors.values().sum();
    let throughput = requests as f64 / window.as_secs_f64();
    // Each request creates one Task, or `--entries` in transaction mode.
    let per_request = match options.mode {
        Mode::Transaction => options.entries,
        Mode::Create | Mode::Update => 1,
    };
    let writes = requests * per_request;
    let write_rate = writes as f64 / window.as_secs_f64();
    let percentiles = Percentiles::of(latencies.clone());

    println!(
        "tasks {mode_name}: {base}, {concurrency} workers, {:.1} s measured after {:.1} s warm-up",
        window.as_secs_f64(),
        options.warmup.as_secs_f64()
    );
    println!("  requests   {requests} ({throughput:.0}/s)");
    println!("  Tasks      {writes} ({write_rate:.0}/s, {per_request} per request)");
    println!("  latency    {}", percentiles.line());
    println!("  cpu        {}", cpu.line_with_machine(crate::NAME));
    println!("  errors     {error_count}");
    for (key, count) in errors {
        println!("    {key}: {count}  e.g. {}", samples[key]);
    }
    println!(
        "{}",
        json!({
            "mode": "tasks",
            "operation": mode_name,
            "base": base,
            "concurrency": concurrency,
            "duration_s": round2(window.as_secs_f64()),
            "requests": requests,
            "requests_per_s": round2(throughput),
            "entries_per_request": per_request,
            "tasks_written": writes,
            "tasks_per_s": round2(write_rate),
            "latency_ms": percentiles.json(),
            "errors": error_count,
            "errors_by_status": errors,
            "cpu_percent": cpu.json(),
        })
    );
    error_count == 0
}

/// The error key of a request that got no status: `transport: timeout`, `transport: connect`, ….
pub fn transport_error(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    };
    format!("transport: {kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Bundle written as text is the JSON the load tool built before as a `Value`: a
    /// transaction of `entries` POSTs of the Task, each with its own `urn:uuid:` fullUrl.
    #[test]
    fn a_transaction_body_is_the_bundle_of_its_creates() {
        let task = task_body("Practitioner/load-3", None, None);
        for entries in [1, 2, 100] {
            let body: Value = serde_json::from_str(&transaction_body(&task.to_string(), entries))
                .expect("the body is JSON");
            let bundle_entries = body["entry"].as_array().expect("entries");
            assert_eq!(bundle_entries.len(), entries);
            let expected = json!({
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": bundle_entries
                    .iter()
                    .map(|entry| json!({
                        "fullUrl": entry["fullUrl"],
                        "resource": task,
                        "request": { "method": "POST", "url": "Task" },
                    }))
                    .collect::<Vec<_>>(),
            });
            assert_eq!(body, expected);
            let urls: std::collections::HashSet<&str> = bundle_entries
                .iter()
                .map(|entry| entry["fullUrl"].as_str().expect("a fullUrl"))
                .collect();
            assert_eq!(urls.len(), entries, "every fullUrl is its own");
            assert!(urls.iter().all(|url| {
                url.strip_prefix("urn:uuid:")
                    .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok())
            }));
        }
    }
}
