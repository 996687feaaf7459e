//! `baton-load search`: the work-list searches of issue 16 on a realistic data set. It seeds
//! N Tasks through the API (`POST /Task`, as clients write them; `data.rs` says what they look
//! like), then runs the work-list query mix closed-loop from concurrent workers, or each query
//! in turn from one client (`--single`), and reports per query the request rate and latency,
//! errors by status and the Tasks returned. Every answer is checked against its query
//! (`queries::check`), so the tool never reports the speed of a wrong answer.

mod data;
mod queries;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use baton_tools::common::api::{http_client, success_text};
use baton_tools::common::cpu::{CpuMeter, CpuUse, load_average};
use baton_tools::common::fhir::FHIR_JSON;
use baton_tools::common::percentiles::{Percentiles, millis, round2};
use baton_tools::common::target::Target;
use baton_tools::common::{parse_duration, run_bounded, snippet};
use reqwest::header;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::ADMIN;
use crate::tasks::transport_error;
use data::{IDENTIFIER_SYSTEM, Shape, parse_day};
use queries::{ALL_KINDS, Answer, FAR_PAGE, Kind, PAGE, Query, WORK_LISTS};

#[derive(clap::Args)]
pub struct Options {
    #[command(flatten)]
    target: Target,
    /// Tasks in the data set: seeded through the API unless --skip-seed.
    #[arg(long, default_value_t = 100_000)]
    seed: u64,
    /// The server already holds the data set of these flags (--seed, --rng-seed, --owners,
    /// --patients, --due-from, --due-days): do not write it again.
    #[arg(long)]
    skip_seed: bool,
    /// Concurrent creates while seeding.
    #[arg(long, default_value_t = 16)]
    seed_concurrency: usize,
    /// Seed of the data set: the same flags write the same Tasks.
    #[arg(long, default_value_t = 1)]
    rng_seed: u64,
    /// Owners `Practitioner/p0` … of the 70 % owned Tasks.
    #[arg(long, default_value_t = 1000)]
    owners: u64,
    /// Patients `Patient/pt0` … the Tasks are for.
    #[arg(long, default_value_t = 20_000)]
    patients: u64,
    /// First day of the due dates (`restriction.period.end`). Keep it after the day of the
    /// run: Tasks seeded already past due are each reported by the server's overdue timer, a
    /// backlog of background writes that would run during the measurement.
    #[arg(long, default_value = "2027-01-01", value_parser = parse_day)]
    due_from: time::Date,
    /// Days over which the due dates spread.
    #[arg(long, default_value_t = 365)]
    due_days: u32,
    /// The queries to run, taking turns (default: the six work lists; with --single, the six
    /// and the paging pair page-1 / page-500).
    #[arg(long, value_enum, value_delimiter = ',')]
    queries: Vec<Kind>,
    /// Closed-loop workers, each with one search in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Measured time of the mix (e.g. 20s, 2m).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before the measured time.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    warmup: Duration,
    /// Instead of the mix: one client runs each query this many times (after one unmeasured
    /// round), for the single-client latency of each.
    #[arg(long)]
    single: Option<u64>,
}

impl Options {
    fn shape(&self) -> Shape {
        Shape {
            tasks: self.seed,
            owners: self.owners,
            patients: self.patients,
            rng_seed: self.rng_seed,
            due_from: self.due_from,
            due_days: self.due_days,
        }
    }

    fn kinds(&self) -> Vec<Kind> {
        match (self.queries.is_empty(), self.single) {
            (false, _) => self.queries.clone(),
            (true, Some(_)) => ALL_KINDS.to_vec(),
            (true, None) => WORK_LISTS.to_vec(),
        }
    }
}

pub async fn run(options: &Options) -> anyhow::Result<bool> {
    ensure!(
        options.concurrency > 0 && options.seed_concurrency > 0,
        "--concurrency and --seed-concurrency must be at least 1"
    );
    ensure!(
        options.seed > 0 && options.owners > 0 && options.patients > 0 && options.due_days > 0,
        "--seed, --owners, --patients and --due-days must be positive"
    );
    let setup = Arc::new(setup(options).await?);
    let driven = drive(options, &setup).await;
    let collected = collect(driven).await?;
    Ok(verify(options, &setup, &collected))
}

/// What the workers share.
struct Setup {
    client: reqwest::Client,
    bearer: String,
    base: String,
    shape: Shape,
    kinds: Vec<Kind>,
    /// How long seeding took, when this run seeded.
    seeded_in: Option<Duration>,
    /// The query of page `FAR_PAGE`, as the server's next links reach it.
    far_page: String,
}

/// Seeds the data set (or checks that the server holds it), and finds page `FAR_PAGE` by the
/// server's next links.
async fn setup(options: &Options) -> anyhow::Result<Setup> {
    let bearer = options.target.bearer(&ADMIN)?;
    let client = http_client(
        options.concurrency.max(options.seed_concurrency) * 2,
        Duration::from_secs(120),
    )?;
    let base = options.target.base().to_string();
    let shape = options.shape();
    let mut setup = Setup {
        client,
        bearer,
        base,
        shape,
        kinds: options.kinds(),
        seeded_in: None,
        far_page: String::new(),
    };
    let first_held = setup.holds(0).await?;
    if options.skip_seed {
        ensure!(
            first_held && setup.holds(shape.tasks - 1).await?,
            "the server does not hold the data set of these flags (no Task {IDENTIFIER_SYSTEM}|{} \
             or |{}); seed it first, without --skip-seed",
            shape.identifier(0),
            shape.identifier(shape.tasks - 1)
        );
    } else {
        ensure!(
            !first_held,
            "the server already holds Tasks of --rng-seed {}; pass --skip-seed to reuse them, \
             or seed a fresh database",
            shape.rng_seed
        );
        setup.seeded_in = Some(setup.seed(options.seed_concurrency).await?);
    }
    setup.far_page = setup.find_far_page().await?;
    Ok(setup)
}

impl Setup {
    fn get(&self, query: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}/Task?{query}", self.base))
            .header(header::AUTHORIZATION, &self.bearer)
    }

    /// Whether the server holds the `number`-th Task of the data set (by its identifier).
    async fn holds(&self, number: u64) -> anyhow::Result<bool> {
        let query = format!(
            "identifier={IDENTIFIER_SYSTEM}|{}&_summary=count",
            self.shape.identifier(number)
        );
        let response = self
            .get(&query)
            .send()
            .await
            .context("searching by identifier")?;
        let body: Value = serde_json::from_str(&success_text(response, "a count").await?)?;
        Ok(body["total"].as_u64().unwrap_or(0) > 0)
    }

    /// Posts every Task of the data set, `concurrency` at a time; returns how long it took.
    async fn seed(&self, concurrency: usize) -> anyhow::Result<Duration> {
        let tasks = self.shape.tasks;
        println!("seeding {tasks} Tasks through POST /Task, {concurrency} at a time");
        let started = Instant::now();
        let created = Arc::new(AtomicU64::new(0));
        let step = (tasks / 10).max(1);
        run_bounded(tasks as usize, concurrency, |i| {
            let request = self
                .client
                .post(format!("{}/Task", self.base))
                .header(header::AUTHORIZATION, &self.bearer)
                .header(header::CONTENT_TYPE, FHIR_JSON)
                .body(self.shape.task(i as u64).to_string());
            let created = created.clone();
            async move {
                let response = request.send().await.context("seeding a Task")?;
                success_text(response, "seeding a Task").await?;
                let done = created.fetch_add(1, Ordering::Relaxed) + 1;
                if done.is_multiple_of(step) {
                    let elapsed = started.elapsed().as_secs_f64();
                    eprintln!(
                        "  {done} created in {elapsed:.0} s ({:.0}/s)",
                        done as f64 / elapsed
                    );
                }
                Ok(())
            }
        })
        .await?;
        Ok(started.elapsed())
    }

    /// The query of page `FAR_PAGE` of the unfiltered listing as the server's own `next`
    /// links reach it (a keyset `_cursor` since issue 16, `_offset` before), found once by
    /// following them from the first page; the paging measure then asks for it directly.
    async fn find_far_page(&self) -> anyhow::Result<String> {
        let mut query = format!("_count={PAGE}");
        for page in 1..FAR_PAGE {
            let response = self.get(&query).send().await?;
            let body: Value = serde_json::from_str(&success_text(response, "a page").await?)?;
            let next = body["link"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|l| l["relation"] == "next")
                .and_then(|l| l["url"].as_str())
                .unwrap_or_default();
            let Some((_, next_query)) = next.split_once('?') else {
                bail!("page {page} of the unfiltered listing has no next link ('{next}')");
            };
            query = next_query.to_string();
        }
        Ok(query)
    }
}

/// How a search failed: an HTTP status or transport error, or a wrong answer.
#[derive(Debug, Clone)]
struct Failure {
    key: String,
    sample: String,
}

/// Sends one search and judges its answer; the latency is to the last byte of the body, the
/// judging is not timed.
async fn search_once(setup: &Setup, query: &Query) -> (Duration, Result<Answer, Failure>) {
    let sent = Instant::now();
    // Page 500 is asked for as the server's next links reach it (see `find_far_page`).
    let text = if query.kind == Kind::Page500 {
        &setup.far_page
    } else {
        &query.text
    };
    let outcome = match setup.get(text).send().await {
        Ok(response) => {
            let status = response.status();
            response.bytes().await.map(|body| (status, body))
        }
        Err(e) => Err(e),
    };
    let latency = sent.elapsed();
    let result = match outcome {
        Ok((status, body)) if status.is_success() => {
            queries::check(query, &body).map_err(|e| Failure {
                key: "wrong answer".into(),
                sample: format!("{}: {e}", query.text),
            })
        }
        Ok((status, body)) => Err(Failure {
            key: format!("HTTP {}", status.as_u16()),
            sample: snippet(&String::from_utf8_lossy(&body)),
        }),
        Err(e) => Err(Failure {
            key: transport_error(&e),
            sample: e.to_string(),
        }),
    };
    (latency, result)
}

/// What was measured of one query kind.
#[derive(Default)]
struct KindStats {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
    /// Over the answers that passed: matches returned and `Bundle.total`s given.
    answered: u64,
    entries: u64,
    totals: u64,
    totals_given: u64,
    /// An example of the query, for the report.
    example: String,
}

impl KindStats {
    fn record(&mut self, query: &Query, latency: Duration, result: Result<Answer, Failure>) {
        if self.example.is_empty() {
            self.example = query.text.clone();
        }
        self.latencies.push(latency);
        match result {
            Ok(answer) => {
                self.answered += 1;
                self.entries += answer.entries as u64;
                if let Some(total) = answer.total {
                    self.totals += total;
                    self.totals_given += 1;
                }
            }
            Err(Failure { key, sample }) => {
                *self.errors.entry(key.clone()).or_default() += 1;
                self.samples.entry(key).or_insert(sample);
            }
        }
    }

    fn merge(&mut self, other: KindStats) {
        self.latencies.extend(other.latencies);
        for (key, count) in other.errors {
            *self.errors.entry(key).or_default() += count;
        }
        for (key, sample) in other.samples {
            self.samples.entry(key).or_insert(sample);
        }
        self.answered += other.answered;
        self.entries += other.entries;
        self.totals += other.totals;
        self.totals_given += other.totals_given;
        if self.example.is_empty() {
            self.example = other.example;
        }
    }
}

type Stats = BTreeMap<Kind, KindStats>;

/// What a worker measured, and when its last measured answer came.
struct WorkerStats {
    stats: Stats,
    last_done: Option<Instant>,
}

/// The running workers, and when their measured time began.
struct Driven {
    workers: JoinSet<WorkerStats>,
    measure_from: Instant,
    cpu: CpuMeter,
}

/// Starts the mix (closed-loop workers, each taking the next query of the run's sequence,
/// until the warm-up and the measured time have passed; only searches sent after the warm-up
/// count) or, with `--single`, one client that runs
/// each query in turn, one unmeasured round and then `--single` measured ones.
async fn drive(options: &Options, setup: &Arc<Setup>) -> Driven {
    let single = options.single;
    let workers_count = if single.is_some() {
        1
    } else {
        options.concurrency
    };
    let started = Instant::now();
    let cpu = CpuMeter::start(options.target.server_pid);
    let measure_from = started + options.warmup;
    let deadline = measure_from + options.duration;
    let mut workers = JoinSet::new();
    // One sequence for all workers, so that the kinds take turns across the whole run
    // whatever the number of workers.
    let sequence = Arc::new(AtomicU64::new(0));
    for _ in 0..workers_count {
        let setup = setup.clone();
        let sequence = sequence.clone();
        workers.spawn(async move {
            let kinds = &setup.kinds;
            let rounds = single.map(|k| (k + 1) * kinds.len() as u64);
            let mut worker_stats = WorkerStats {
                stats: Stats::new(),
                last_done: None,
            };
            loop {
                let n = sequence.fetch_add(1, Ordering::Relaxed);
                let measured = match rounds {
                    Some(rounds) if n >= rounds => break,
                    Some(_) => n >= kinds.len() as u64,
                    None if Instant::now() >= deadline => break,
                    None => Instant::now() >= measure_from,
                };
                let query = queries::nth(kinds, n, &setup.shape);
                let (latency, result) = search_once(&setup, &query).await;
                if measured {
                    worker_stats.last_done = Some(Instant::now());
                    worker_stats
                        .stats
                        .entry(query.kind)
                        .or_default()
                        .record(&query, latency, result);
                }
            }
            worker_stats
        });
    }
    Driven {
        workers,
        measure_from: if single.is_some() {
            started
        } else {
            measure_from
        },
        cpu,
    }
}

/// Every worker's figures together.
struct Collected {
    stats: Stats,
    /// From the end of the warm-up to the last measured answer.
    window: Duration,
    cpu: CpuUse,
}

async fn collect(mut driven: Driven) -> anyhow::Result<Collected> {
    let mut stats = Stats::new();
    let mut last_done = driven.measure_from;
    while let Some(joined) = driven.workers.join_next().await {
        let worker = joined.context("a worker panicked")?;
        for (kind, kind_stats) in worker.stats {
            stats.entry(kind).or_default().merge(kind_stats);
        }
        if let Some(done) = worker.last_done {
            last_done = last_done.max(done);
        }
    }
    Ok(Collected {
        stats,
        window: (last_done - driven.measure_from).max(Duration::from_millis(1)),
        cpu: driven.cpu.finish(),
    })
}

/// Whether the data set guarantees that some answer of every query holds Tasks: at 10 000
/// Tasks every owner, queue, day and page 500 has some, and a patient has several on average.
fn expects_matches(shape: &Shape) -> bool {
    shape.tasks >= 10_000
}

/// Reports the figures; the run passes when every search answered 200 with a searchset
/// Bundle that matched its query, and no query came back empty every time where the data
/// set guarantees matches.
fn verify(options: &Options, setup: &Setup, collected: &Collected) -> bool {
    let Collected { stats, window, cpu } = collected;
    let shape = &setup.shape;
    let mut passed = true;
    let run = if options.single.is_some() {
        "single"
    } else {
        "mix"
    };
    let workers = if options.single.is_some() {
        1
    } else {
        options.concurrency
    };
    match options.single {
        Some(k) => println!(
            "search single: {}, one client, each query {k} times after one unmeasured round",
            setup.base
        ),
        None => println!(
            "search mix: {}, {workers} workers, {:.1} s measured after {:.1} s warm-up",
            setup.base,
            window.as_secs_f64(),
            options.warmup.as_secs_f64()
        ),
    }
    println!(
        "  data       {} Tasks, {} owners, {} patients, due from {} over {} days, rng seed {}",
        shape.tasks,
        shape.owners,
        shape.patients,
        data::day_text(shape.due_from),
        shape.due_days,
        shape.rng_seed
    );
    let seeding = setup.seeded_in.map(|elapsed| {
        let rate = shape.tasks as f64 / elapsed.as_secs_f64();
        println!(
            "  seeded     {} Tasks in {:.1} s ({rate:.0}/s, {} at a time, through POST /Task)",
            shape.tasks,
            elapsed.as_secs_f64(),
            options.seed_concurrency
        );
        json!({
            "tasks": shape.tasks,
            "seconds": round2(elapsed.as_secs_f64()),
            "per_s": round2(rate),
            "concurrency": options.seed_concurrency,
        })
    });
    println!(
        "  {:<13} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>7}",
        "query",
        "requests",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "entries",
        "total",
        "errors"
    );
    let mut per_query = serde_json::Map::new();
    let (mut requests, mut errors) = (0usize, 0u64);
    for (kind, s) in stats {
        let p = Percentiles::of(s.latencies.clone());
        // In the mix the kinds share the measured time; one client's rate is its own time's.
        let busy = match options.single {
            Some(_) => s.latencies.iter().sum::<Duration>(),
            None => *window,
        };
        let rate = s.latencies.len() as f64 / busy.as_secs_f64().max(1e-3);
        let mean = |sum: u64, n: u64| if n == 0 { 0.0 } else { sum as f64 / n as f64 };
        let entries = mean(s.entries, s.answered);
        let total = (s.totals_given > 0).then(|| mean(s.totals, s.totals_given));
        let kind_errors: u64 = s.errors.values().sum();
        println!(
            "  {:<13} {:>8} {:>8.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.1} {:>9} {:>7}",
            kind.name(),
            p.count,
            rate,
            p.p50,
            p.p90,
            p.p99,
            p.max,
            entries,
            total.map_or("-".to_string(), |t| format!("{t:.0}")),
            kind_errors
        );
        for (key, count) in &s.errors {
            println!("      {key}: {count}  e.g. {}", s.samples[key]);
        }
        if s.entries == 0 && kind_errors == 0 && expects_matches(shape) {
            println!("      no answer held a Task, though the data set has matches");
            passed = false;
        }
        requests += p.count;
        errors += kind_errors;
        per_query.insert(
            kind.name().into(),
            json!({
                "query": s.example,
                "requests": p.count,
                "requests_per_s": round2(rate),
                "latency_ms": p.json(),
                "mean_ms": round2(millis(s.latencies.iter().sum()) / p.count.max(1) as f64),
                "entries_mean": round2(entries),
                "total_mean": total.map(round2),
                "errors": kind_errors,
                "errors_by_status": s.errors,
            }),
        );
    }
    let rate = requests as f64 / window.as_secs_f64();
    let load = load_average();
    println!("  all        {requests} requests ({rate:.1}/s), {errors} errors");
    println!("  cpu        {}", cpu.line_with_machine(crate::NAME));
    println!("  load       {load} (load average at the end)");
    passed &= errors == 0;
    println!("  verdict    {}", if passed { "PASS" } else { "FAIL" });
    println!(
        "{}",
        json!({
            "mode": "search",
            "run": run,
            "base": setup.base,
            "data": {
                "tasks": shape.tasks,
                "owners": shape.owners,
                "patients": shape.patients,
                "rng_seed": shape.rng_seed,
                "due_from": data::day_text(shape.due_from),
                "due_days": shape.due_days,
            },
            "seeding": seeding,
            "concurrency": workers,
            "duration_s": round2(window.as_secs_f64()),
            "requests": requests,
            "requests_per_s": round2(rate),
            "errors": errors,
            "queries": per_query,
            "cpu_percent": cpu.json(),
            "load_average": load,
            "passed": passed,
        })
    );
    passed
}
