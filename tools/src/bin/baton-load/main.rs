//! `baton-load`: load generator and measuring receiver for Baton's benchmarks (BENCHMARKS.md).
//!
//! Three subcommands, each printing a short report and, as its last line, one JSON object:
//!
//! - `bare-server`: an axum handler that echoes Task creates and updates without storing
//!   anything, so the HTTP stack's ceiling can be measured with the same client and request.
//! - `tasks`: closed-loop load (N workers, one keep-alive HTTP/1.1 client) of Task creates or
//!   updates, with throughput, latency percentiles and errors by status.
//! - `hub`: N rest-hook subscriptions received by a local receiver, an open-loop schedule of
//!   Task updates, and for every update the delay until its notification arrived; afterwards it
//!   checks that every write was notified exactly once with contiguous event numbers.
//!
//! Only meant for loopback targets: it creates and deletes data on the server it is pointed at.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{post, put};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const FHIR_JSON: &str = "application/fhir+json";
const FILTER_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
const PAYLOAD_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";

#[derive(Parser)]
#[command(
    name = "baton-load",
    version,
    about = "Load generator and notification receiver for Baton benchmarks (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo server for POST /fhir/Task and PUT /fhir/Task/{id}: the ceiling without storage.
    BareServer {
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
    },
    /// Closed-loop Task creates or updates from concurrent workers.
    Tasks {
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
    },
    /// Rest-hook subscriptions plus an open-loop update schedule; checks every notification.
    Hub {
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
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Create,
    Update,
}

#[derive(clap::Args, Clone)]
struct Target {
    /// FHIR base URL, e.g. http://127.0.0.1:8080/fhir.
    #[arg(long)]
    base: String,
    /// Bearer token (an admin token: `baton token --role admin`).
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Without --token, mint a one-hour admin token with this HS256 key.
    #[arg(long, env = "BATON_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Also report the CPU the server process used during the run (Linux /proc).
    #[arg(long)]
    server_pid: Option<u32>,
}

impl Target {
    fn base(&self) -> &str {
        self.base.trim_end_matches('/')
    }

    fn bearer(&self) -> anyhow::Result<String> {
        match (&self.token, &self.jwt_secret) {
            (Some(token), _) => Ok(format!("Bearer {token}")),
            (None, Some(secret)) => Ok(format!("Bearer {}", mint_admin_token(secret)?)),
            (None, None) => bail!("give --token (or BATON_TOKEN), or BATON_JWT_SECRET to mint one"),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::BareServer { listen } => bare_server(listen).await,
            Command::Tasks {
                target,
                concurrency,
                duration,
                warmup,
                mode,
            } => tasks(&target, concurrency, duration, warmup, mode).await,
            Command::Hub {
                target,
                subscriptions,
                rate,
                duration,
                receivers_port,
                max_in_flight,
                setup_concurrency,
                handshake_timeout,
                drain_timeout,
                settle,
                keep_subscriptions,
                timeline,
                reject_every,
                write_base,
            } => {
                let options = HubOptions {
                    subscriptions,
                    rate,
                    duration,
                    receivers_port,
                    max_in_flight,
                    setup_concurrency,
                    handshake_timeout,
                    drain_timeout,
                    settle,
                    keep_subscriptions,
                    timeline,
                    reject_every,
                    write_base,
                };
                hub(&target, &options).await
            }
        }
    });
    match result {
        Ok(Verdict::Passed) => ExitCode::SUCCESS,
        Ok(Verdict::Failed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Whether a run met its correctness checks (setup failures are errors instead).
enum Verdict {
    Passed,
    Failed,
}

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// Parses `20s`, `500ms`, `2m` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration such as 20s, 500ms or 2m"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit '{unit}' in '{text}'; use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("'{text}': {e}"))
}

/// An HS256 JWT with the claims Baton requires of an admin (`sub`, `exp`, `role`).
fn mint_admin_token(secret: &str) -> anyhow::Result<String> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::{Hmac, Mac};

    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = json!({ "sub": "baton-load", "exp": exp, "role": "admin" });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .context("the JWT secret cannot key HMAC-SHA256")?;
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{signing_input}.{signature}"))
}

/// One keep-alive HTTP/1.1 client for all workers, as a typical integration client would use.
fn http_client(connections: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(30))
        .build()
        .context("building the HTTP client")
}

/// `W/"3"` → 3.
fn etag_version(headers: &reqwest::header::HeaderMap) -> Option<i64> {
    let text = headers.get(reqwest::header::ETAG)?.to_str().ok()?;
    text.trim_start_matches("W/").trim_matches('"').parse().ok()
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces, so count the fields after its ')'. They
    // start at field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this tool targets.
    Some(Duration::from_millis(ticks * 10))
}

/// Machine-wide CPU time so far from the first line of `/proc/stat`: (busy, steal), where busy
/// excludes idle, iowait and steal.
fn machine_cpu_time() -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, _idle, _iowait, irq, softirq, steal] = ticks[..] else {
        return None;
    };
    let busy = user + nice + system + irq + softirq;
    Some((
        Duration::from_millis(busy * 10),
        Duration::from_millis(steal * 10),
    ))
}

/// CPU used by this process, the server (when given) and the whole machine, between `start`
/// and `finish`, so a report shows how much of the machine other work took.
struct CpuMeter {
    at: Instant,
    own: Option<Duration>,
    server_pid: Option<String>,
    server: Option<Duration>,
    machine: Option<(Duration, Duration)>,
}

/// Percent of one core each consumer used.
struct CpuUse {
    own: Option<f64>,
    server: Option<f64>,
    machine: Option<f64>,
    steal: Option<f64>,
}

impl CpuMeter {
    fn start(server_pid: Option<u32>) -> CpuMeter {
        let server_pid = server_pid.map(|p| p.to_string());
        CpuMeter {
            at: Instant::now(),
            own: cpu_time("self"),
            server: server_pid.as_deref().and_then(cpu_time),
            server_pid,
            machine: machine_cpu_time(),
        }
    }

    fn finish(&self) -> CpuUse {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        let percent = |before: Option<Duration>, now: Option<Duration>| {
            Some(round2(
                100.0 * (now?.checked_sub(before?)?).as_secs_f64() / wall,
            ))
        };
        let server_now = self.server_pid.as_deref().and_then(cpu_time);
        let machine_now = machine_cpu_time();
        CpuUse {
            own: percent(self.own, cpu_time("self")),
            server: percent(self.server, server_now),
            machine: percent(self.machine.map(|m| m.0), machine_now.map(|m| m.0)),
            steal: percent(self.machine.map(|m| m.1), machine_now.map(|m| m.1)),
        }
    }
}

impl CpuUse {
    fn line(&self) -> String {
        let show = |p: Option<f64>| p.map_or("n/a".to_string(), |p| format!("{p:.0}%"));
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        format!(
            "server {}, baton-load {}, whole machine {} of {}% (steal {}); percent of one core",
            show(self.server),
            show(self.own),
            show(self.machine),
            cores * 100,
            show(self.steal),
        )
    }

    fn json(&self) -> Value {
        json!({
            "server": self.server,
            "load": self.own,
            "machine": self.machine,
            "steal": self.steal,
        })
    }
}

/// Latency percentiles in milliseconds (nearest rank).
#[derive(Default)]
struct Percentiles {
    count: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut samples: Vec<Duration>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let rank = |q: f64| {
            let index = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            millis(samples[index])
        };
        Percentiles {
            count: samples.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: millis(samples[samples.len() - 1]),
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
            self.p50, self.p90, self.p99, self.max, self.count
        )
    }

    fn json(&self) -> Value {
        json!({
            "p50": round2(self.p50),
            "p90": round2(self.p90),
            "p99": round2(self.p99),
            "max": round2(self.max),
        })
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The error key of a failed request: `HTTP 409` or `transport: …`.
fn transport_error(e: &reqwest::Error) -> String {
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

fn snippet(body: &str) -> String {
    body.chars().take(200).collect()
}

fn task_body(owner: &str, id: Option<&str>, description: Option<&str>) -> Value {
    let mut task = json!({
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "owner": { "reference": owner },
    });
    if let Some(id) = id {
        task["id"] = json!(id);
    }
    if let Some(description) = description {
        task["description"] = json!(description);
    }
    task
}

// ---------------------------------------------------------------------------------------------
// bare-server

async fn bare_server(listen: SocketAddr) -> anyhow::Result<Verdict> {
    let served = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/fhir/Task", post(bare_create))
        .route("/fhir/Task/{id}", put(bare_update))
        .with_state(served.clone());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!(
        "bare-server: echoing POST /fhir/Task and PUT /fhir/Task/{{id}} on http://{listen}/fhir (Ctrl-C or SIGTERM stops)"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop_signal())
        .await
        .context("serving")?;
    let served = served.load(Ordering::Relaxed);
    println!("bare-server: served {served} requests");
    println!(
        "{}",
        json!({ "mode": "bare-server", "listen": listen.to_string(), "requests": served })
    );
    Ok(Verdict::Passed)
}

async fn bare_create(State(served): State<Arc<AtomicU64>>, body: Bytes) -> impl IntoResponse {
    served.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        body,
    )
}

async fn bare_update(
    State(served): State<Arc<AtomicU64>>,
    Path(_id): Path<String>,
    body: Bytes,
) -> impl IntoResponse {
    served.fetch_add(1, Ordering::Relaxed);
    (StatusCode::OK, [(header::CONTENT_TYPE, FHIR_JSON)], body)
}

async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

// ---------------------------------------------------------------------------------------------
// tasks

/// What one closed-loop worker measured.
#[derive(Default)]
struct WorkerStats {
    latencies: Vec<Duration>,
    /// Completion of the last measured request.
    last_done: Option<Instant>,
    errors: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
}

async fn tasks(
    target: &Target,
    concurrency: usize,
    duration: Duration,
    warmup: Duration,
    mode: Mode,
) -> anyhow::Result<Verdict> {
    if concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let bearer = target.bearer()?;
    let client = http_client(concurrency * 2)?;
    let base = target.base().to_string();
    let mode_name = match mode {
        Mode::Create => "create",
        Mode::Update => "update",
    };

    // Update mode: one Task per worker, so workers never contend for the same row.
    let mut ids = Vec::new();
    if mode == Mode::Update {
        for worker in 0..concurrency {
            let owner = format!("Practitioner/load-{worker}");
            let response = client
                .post(format!("{base}/Task"))
                .header(header::AUTHORIZATION, &bearer)
                .header(header::CONTENT_TYPE, FHIR_JSON)
                .body(task_body(&owner, None, None).to_string())
                .send()
                .await
                .context("creating the Tasks to update")?;
            let status = response.status();
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response.text().await.unwrap_or_default();
            if !status.is_success() {
                bail!(
                    "creating a Task to update: HTTP {status}: {}",
                    snippet(&body)
                );
            }
            // The bare server echoes the body without an id; any id will do there.
            let id = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_string))
                .or_else(|| location.and_then(|l| id_from_location(&l)))
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            ids.push((owner, id));
        }
    }

    let started = Instant::now();
    let cpu = CpuMeter::start(target.server_pid);
    let measure_from = started + warmup;
    let deadline = measure_from + duration;
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let client = client.clone();
        let bearer = bearer.clone();
        let base = base.clone();
        let own = ids.get(worker).cloned();
        workers.spawn(async move {
            let mut stats = WorkerStats::default();
            let mut n: u64 = 0;
            while Instant::now() < deadline {
                n += 1;
                let request = match &own {
                    None => client.post(format!("{base}/Task")).body(
                        task_body(&format!("Practitioner/load-{worker}"), None, None).to_string(),
                    ),
                    Some((owner, id)) => client.put(format!("{base}/Task/{id}")).body(
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
                        let body = response.bytes().await;
                        match body {
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

    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let mut last_done = measure_from;
    while let Some(joined) = workers.join_next().await {
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
    let cpu = cpu.finish();
    let window = (last_done - measure_from).max(Duration::from_millis(1));
    let requests = latencies.len();
    let error_count: u64 = errors.values().sum();
    let throughput = requests as f64 / window.as_secs_f64();
    let percentiles = Percentiles::of(latencies);

    println!(
        "tasks {mode_name}: {base}, {concurrency} workers, {:.1} s measured after {:.1} s warm-up",
        window.as_secs_f64(),
        warmup.as_secs_f64()
    );
    println!("  requests   {requests} ({throughput:.0}/s)");
    println!("  latency    {}", percentiles.line());
    println!("  cpu        {}", cpu.line());
    println!("  errors     {error_count}");
    for (key, count) in &errors {
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
            "latency_ms": percentiles.json(),
            "errors": error_count,
            "errors_by_status": errors,
            "cpu_percent": cpu.json(),
        })
    );
    Ok(if error_count == 0 {
        Verdict::Passed
    } else {
        Verdict::Failed
    })
}

fn id_from_location(location: &str) -> Option<String> {
    let after = location.split("/Task/").nth(1)?;
    Some(after.split('/').next()?.to_string())
}

// ---------------------------------------------------------------------------------------------
// hub: the receiver

struct HubOptions {
    subscriptions: usize,
    rate: f64,
    duration: Duration,
    receivers_port: u16,
    max_in_flight: usize,
    setup_concurrency: usize,
    handshake_timeout: Duration,
    drain_timeout: Duration,
    settle: Duration,
    keep_subscriptions: bool,
    timeline: bool,
    reject_every: u64,
    write_base: Vec<String>,
}

/// One event of an event notification, as the receiver saw it.
struct ReceivedEvent {
    event_number: i64,
    task_id: String,
    version: i64,
}

/// One notification POST that carried events.
struct Arrival {
    at: Instant,
    subscription_id: String,
    events: Vec<ReceivedEvent>,
}

/// What the receiver collects; the analysis happens after the run.
#[derive(Default)]
struct Inbox {
    handshakes: Mutex<HashSet<String>>,
    arrivals: Mutex<Vec<Arrival>>,
    posts: AtomicU64,
    heartbeats: AtomicU64,
    /// Bodies that were not a notification Bundle this tool understands.
    malformed: AtomicU64,
    /// Events received so far (cheap progress for the drain wait).
    events: AtomicU64,
    /// Answer every Nth event notification with 503 (0: never).
    reject_every: u64,
    event_posts: AtomicU64,
    rejected: AtomicU64,
}

async fn receive(
    State(inbox): State<Arc<Inbox>>,
    Path(_hook): Path<u32>,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    inbox.posts.fetch_add(1, Ordering::Relaxed);
    let Ok(bundle) = serde_json::from_slice::<Value>(&body) else {
        inbox.malformed.fetch_add(1, Ordering::Relaxed);
        return StatusCode::OK;
    };
    match parse_notification(&bundle) {
        Some(Notification::Handshake(subscription_id)) => {
            lock(&inbox.handshakes).insert(subscription_id);
        }
        Some(Notification::Heartbeat) => {
            inbox.heartbeats.fetch_add(1, Ordering::Relaxed);
        }
        Some(Notification::Events(subscription_id, events)) => {
            let nth = inbox.event_posts.fetch_add(1, Ordering::Relaxed) + 1;
            if inbox.reject_every > 0 && nth % inbox.reject_every == 0 {
                inbox.rejected.fetch_add(1, Ordering::Relaxed);
                return StatusCode::SERVICE_UNAVAILABLE;
            }
            inbox
                .events
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            lock(&inbox.arrivals).push(Arrival {
                at,
                subscription_id,
                events,
            });
        }
        None => {
            inbox.malformed.fetch_add(1, Ordering::Relaxed);
        }
    }
    StatusCode::OK
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

enum Notification {
    Handshake(String),
    Heartbeat,
    Events(String, Vec<ReceivedEvent>),
}

/// Reads a backport notification Bundle: the status `Parameters` in entry 0 (type,
/// subscription, `notification-event`s), then one entry per event whose `fullUrl` names the Task
/// and whose `response.etag` gives the version the event is about.
fn parse_notification(bundle: &Value) -> Option<Notification> {
    let entries = bundle["entry"].as_array()?;
    let parameters = entries.first()?["resource"]["parameter"].as_array()?;
    let named = |name: &str| parameters.iter().find(|p| p["name"] == name);
    let kind = named("type")?["valueCode"].as_str()?;
    let subscription = named("subscription")?["valueReference"]["reference"].as_str()?;
    let subscription_id = subscription.rsplit('/').next()?.to_string();
    match kind {
        "handshake" => return Some(Notification::Handshake(subscription_id)),
        "heartbeat" => return Some(Notification::Heartbeat),
        "event-notification" => {}
        _ => return None,
    }
    let mut events = Vec::new();
    let numbered = parameters
        .iter()
        .filter(|p| p["name"] == "notification-event");
    for (index, event) in numbered.enumerate() {
        let parts = event["part"].as_array()?;
        let part = |name: &str| parts.iter().find(|p| p["name"] == name);
        let event_number = part("event-number")?["valueString"]
            .as_str()?
            .parse()
            .ok()?;
        let focus = part("focus")?["valueReference"]["reference"].as_str()?;
        let task_id = focus.rsplit('/').next()?.to_string();
        let entry = entries.get(index + 1)?;
        let full_url = entry["fullUrl"].as_str()?;
        if full_url.rsplit('/').next()? != task_id {
            return None;
        }
        let etag = entry["response"]["etag"].as_str()?;
        let version = etag
            .trim_start_matches("W/")
            .trim_matches('"')
            .parse()
            .ok()?;
        events.push(ReceivedEvent {
            event_number,
            task_id,
            version,
        });
    }
    Some(Notification::Events(subscription_id, events))
}

// ---------------------------------------------------------------------------------------------
// hub: the run

/// A Task write whose notification is expected.
struct Write {
    sent: Instant,
    responded: Instant,
    /// Part of the update schedule (the initial creates are checked but not timed).
    scheduled: bool,
}

/// How one scheduled update went.
enum UpdateResult {
    /// 2xx: the write happened; its notification must arrive.
    Written {
        task_id: String,
        version: i64,
        sent: Instant,
        responded: Instant,
    },
    /// 4xx: nothing was written.
    Refused(String),
    /// 5xx or no answer: the write may or may not have happened.
    Uncertain(String),
}

async fn hub(target: &Target, options: &HubOptions) -> anyhow::Result<Verdict> {
    let n = options.subscriptions;
    if n == 0 || options.rate <= 0.0 || options.max_in_flight == 0 {
        bail!("--subscriptions, --rate and --max-in-flight must be positive");
    }
    let bearer = Arc::new(target.bearer()?);
    let base = Arc::new(target.base().to_string());
    let client = http_client(options.max_in_flight.max(options.setup_concurrency))?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();

    // The receiver.
    let inbox = Arc::new(Inbox {
        reject_every: options.reject_every,
        ..Inbox::default()
    });
    let listener =
        tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], options.receivers_port)))
            .await
            .context("binding the receiver (--receivers-port)")?;
    let receiver_addr = listener.local_addr()?;
    let app = Router::new()
        .route("/hook/{n}", post(receive))
        .with_state(inbox.clone());
    let receiver = tokio::spawn(async move { axum::serve(listener, app).await });
    println!(
        "hub: run {run}, {n} subscriptions -> receiver http://{receiver_addr}/hook/{{n}}, {} updates/s for {:.0} s",
        options.rate,
        options.duration.as_secs_f64()
    );

    // Subscriptions, one per owner.
    let setup = Instant::now();
    let topic = format!("{base}/SubscriptionTopic/task-changed");
    let owners: Vec<String> = (0..n).map(|i| format!("Practitioner/{run}-{i}")).collect();
    let subscription_ids = run_bounded(n, options.setup_concurrency, |i| {
        let client = client.clone();
        let bearer = bearer.clone();
        let base = base.clone();
        let body = json!({
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "baton-load hub",
            "criteria": topic,
            "_criteria": { "extension": [{
                "url": FILTER_EXTENSION,
                "valueString": format!("owner={}", owners[i]),
            }]},
            "channel": {
                "type": "rest-hook",
                "endpoint": format!("http://{receiver_addr}/hook/{i}"),
                "payload": FHIR_JSON,
                "_payload": { "extension": [{ "url": PAYLOAD_EXTENSION, "valueCode": "id-only" }] },
            },
        });
        async move {
            let response = client
                .post(format!("{base}/Subscription"))
                .header(header::AUTHORIZATION, bearer.as_str())
                .header(header::CONTENT_TYPE, FHIR_JSON)
                .body(body.to_string())
                .send()
                .await
                .context("creating a subscription")?;
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            if !status.is_success() {
                bail!("creating a subscription: HTTP {status}: {}", snippet(&text));
            }
            let created: Value = serde_json::from_str(&text).context("reading the subscription")?;
            created["id"]
                .as_str()
                .map(str::to_string)
                .context("the created subscription has no id")
        }
    })
    .await?;
    let created_in = setup.elapsed();
    let subscription_of: HashMap<String, usize> = subscription_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i))
        .collect();

    // Handshakes.
    let handshake_deadline = Instant::now() + options.handshake_timeout;
    loop {
        let done = {
            let handshakes = lock(&inbox.handshakes);
            subscription_ids
                .iter()
                .filter(|id| handshakes.contains(*id))
                .count()
        };
        if done == n {
            break;
        }
        if Instant::now() >= handshake_deadline {
            delete_subscriptions(&client, &bearer, &base, &subscription_ids, options).await;
            bail!(
                "only {done} of {n} handshakes arrived within {:.0} s",
                options.handshake_timeout.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handshaken_in = setup.elapsed();
    println!(
        "  setup      {n} subscriptions created in {:.1} s, all handshakes in {:.1} s",
        created_in.as_secs_f64(),
        handshaken_in.as_secs_f64()
    );

    // One Task per owner; each create is itself an event that must be notified.
    let mut writes: HashMap<(String, i64), Write> = HashMap::new();
    let created = run_bounded(n, options.setup_concurrency, |i| {
        let client = client.clone();
        let bearer = bearer.clone();
        let base = base.clone();
        let body = task_body(&owners[i], None, None).to_string();
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
            let status = response.status();
            let version = etag_version(response.headers()).unwrap_or(1);
            let text = response.text().await.unwrap_or_default();
            if !status.is_success() {
                bail!("creating a Task: HTTP {status}: {}", snippet(&text));
            }
            let task: Value = serde_json::from_str(&text).context("reading the Task")?;
            let id = task["id"].as_str().context("the created Task has no id")?;
            Ok((id.to_string(), version, sent, responded))
        }
    })
    .await;
    let created = match created {
        Ok(created) => created,
        Err(e) => {
            delete_subscriptions(&client, &bearer, &base, &subscription_ids, options).await;
            return Err(e);
        }
    };
    let mut task_ids = Vec::with_capacity(n);
    for (id, version, sent, responded) in created {
        writes.insert(
            (id.clone(), version),
            Write {
                sent,
                responded,
                scheduled: false,
            },
        );
        task_ids.push(id);
    }
    println!("  setup      {n} Tasks created; starting the update schedule");

    // The open-loop schedule: update k is due at start + k/rate, whatever earlier ones do.
    let task_ids = Arc::new(task_ids);
    let owners = Arc::new(owners);
    let total = (options.rate * options.duration.as_secs_f64()).round() as u64;
    let permits = Arc::new(Semaphore::new(options.max_in_flight));
    let results: Arc<Mutex<Vec<UpdateResult>>> =
        Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let tick = Duration::from_secs_f64(1.0 / options.rate).max(Duration::from_millis(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut late_starts: u64 = 0;
    let mut peak_in_flight = 0;
    let mut issued: u64 = 0;
    let schedule_start = Instant::now();
    let cpu = CpuMeter::start(target.server_pid);
    while issued < total {
        interval.tick().await;
        let due = ((schedule_start.elapsed().as_secs_f64() * options.rate) as u64 + 1).min(total);
        while issued < due {
            let permit = match permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    late_starts += 1;
                    permits.clone().acquire_owned().await?
                }
            };
            peak_in_flight =
                peak_in_flight.max(options.max_in_flight - permits.available_permits());
            let k = issued;
            issued += 1;
            let i = (k % n as u64) as usize;
            let client = client.clone();
            let bearer = bearer.clone();
            let base = match options.write_base.len() {
                0 => base.clone(),
                nodes => Arc::new(
                    options.write_base[(k % nodes as u64) as usize]
                        .trim_end_matches('/')
                        .to_string(),
                ),
            };
            let task_ids = task_ids.clone();
            let owners = owners.clone();
            let results = results.clone();
            tokio::spawn(async move {
                let id = &task_ids[i];
                let body = task_body(&owners[i], Some(id), Some(&format!("load update {k}")));
                let sent = Instant::now();
                let outcome = client
                    .put(format!("{base}/Task/{id}"))
                    .header(header::AUTHORIZATION, bearer.as_str())
                    .header(header::CONTENT_TYPE, FHIR_JSON)
                    .body(body.to_string())
                    .send()
                    .await;
                let result = match outcome {
                    Ok(response) => {
                        let responded = Instant::now();
                        let status = response.status();
                        let version = etag_version(response.headers());
                        let _ = response.bytes().await;
                        match (status.as_u16(), version) {
                            (200..=299, Some(version)) => UpdateResult::Written {
                                task_id: id.clone(),
                                version,
                                sent,
                                responded,
                            },
                            (200..=299, None) => UpdateResult::Uncertain("2xx without ETag".into()),
                            (400..=499, _) => UpdateResult::Refused(format!("HTTP {status}")),
                            _ => UpdateResult::Uncertain(format!("HTTP {status}")),
                        }
                    }
                    Err(e) => UpdateResult::Uncertain(transport_error(&e)),
                };
                lock(&results).push(result);
                drop(permit);
            });
        }
    }
    let _all_done = permits.acquire_many(options.max_in_flight as u32).await?;
    let schedule_end = Instant::now();
    let cpu = cpu.finish();

    let mut update_latencies = Vec::new();
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    let mut uncertain: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_response = schedule_start;
    for result in lock(&results).drain(..) {
        match result {
            UpdateResult::Written {
                task_id,
                version,
                sent,
                responded,
            } => {
                update_latencies.push(responded - sent);
                last_response = last_response.max(responded);
                writes.insert(
                    (task_id, version),
                    Write {
                        sent,
                        responded,
                        scheduled: true,
                    },
                );
            }
            UpdateResult::Refused(key) => *refused.entry(key).or_default() += 1,
            UpdateResult::Uncertain(key) => *uncertain.entry(key).or_default() += 1,
        }
    }
    let updates_ok = update_latencies.len();
    let refused_count: u64 = refused.values().sum();
    let uncertain_count: u64 = uncertain.values().sum();
    let schedule_window = schedule_end - schedule_start;
    let update_percentiles = Percentiles::of(update_latencies);

    // Drain: wait until every write has been notified at least once, or the time is up.
    let drain_start = Instant::now();
    let expected = writes.len() as u64;
    let mut drained = false;
    while drain_start.elapsed() < options.drain_timeout {
        if inbox.events.load(Ordering::Relaxed) >= expected && all_arrived(&writes, &inbox) {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_wait = drain_start.elapsed();
    if drained {
        tokio::time::sleep(options.settle).await;
    }

    // Analysis.
    let arrivals = std::mem::take(&mut *lock(&inbox.arrivals));
    let mut seen: HashMap<&(String, i64), u32> = HashMap::new();
    let mut latencies = Vec::new();
    let mut end_to_end = Vec::new();
    let mut early = 0u64;
    let mut unexpected = 0u64;
    let mut foreign = 0u64;
    let mut numbers: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut last_arrival = schedule_start;
    let mut events_in_window = 0u64;
    let mut timeline: BTreeMap<u64, (u64, Duration)> = BTreeMap::new();
    for arrival in &arrivals {
        if !subscription_of.contains_key(&arrival.subscription_id) {
            foreign += arrival.events.len() as u64;
            continue;
        }
        last_arrival = last_arrival.max(arrival.at);
        for event in &arrival.events {
            numbers
                .entry(arrival.subscription_id.as_str())
                .or_default()
                .push(event.event_number);
            if arrival.at >= schedule_start && arrival.at <= schedule_end {
                events_in_window += 1;
            }
            let key = (event.task_id.clone(), event.version);
            let Some((key, write)) = writes.get_key_value(&key) else {
                unexpected += 1;
                continue;
            };
            let count = seen.entry(key).or_default();
            *count += 1;
            if *count > 1 || !write.scheduled {
                continue;
            }
            if arrival.at < write.responded {
                early += 1;
            }
            let latency = arrival.at.saturating_duration_since(write.responded);
            latencies.push(latency);
            end_to_end.push(arrival.at.saturating_duration_since(write.sent));
            if arrival.at >= schedule_start {
                let second = (arrival.at - schedule_start).as_secs();
                let slot = timeline.entry(second).or_default();
                slot.0 += 1;
                slot.1 = slot.1.max(latency);
            }
        }
    }
    let mut missing_writes: Vec<&(String, i64)> = writes
        .keys()
        .filter(|key| !seen.contains_key(key))
        .collect();
    missing_writes.sort();
    let missing = missing_writes.len() as u64;
    let duplicates: u64 = seen.values().map(|c| u64::from(c - 1)).sum();
    let mut holes = 0u64;
    let mut repeated_numbers = 0u64;
    let mut out_of_order = 0u64;
    for list in numbers.values() {
        out_of_order += list.windows(2).filter(|w| w[1] <= w[0]).count() as u64;
        let distinct: HashSet<i64> = list.iter().copied().collect();
        repeated_numbers += (list.len() - distinct.len()) as u64;
        let max = list.iter().copied().max().unwrap_or(0);
        holes += (1..=max).filter(|k| !distinct.contains(k)).count() as u64;
    }
    let silent_subscriptions = n - numbers.len();
    let received: u64 = arrivals.iter().map(|a| a.events.len() as u64).sum::<u64>() - foreign;
    let updates_per_s = updates_ok as f64 / schedule_window.as_secs_f64();
    let notifications_per_s = events_in_window as f64 / schedule_window.as_secs_f64();
    let drain_after_last_update = last_arrival.saturating_duration_since(last_response);
    let latency = Percentiles::of(latencies);
    let e2e = Percentiles::of(end_to_end);
    let posts = inbox.posts.load(Ordering::Relaxed);
    let malformed = inbox.malformed.load(Ordering::Relaxed);
    let rejected = inbox.rejected.load(Ordering::Relaxed);
    // Refused or uncertain updates may legitimately explain events nobody expected.
    let unexplained = unexpected.saturating_sub(uncertain_count);
    let passed = missing == 0
        && duplicates == 0
        && holes == 0
        && repeated_numbers == 0
        && out_of_order == 0
        && unexplained == 0
        && malformed == 0;

    println!(
        "  updates    {updates_ok} ok of {total} scheduled in {:.1} s = {updates_per_s:.0}/s; \
         refused {refused_count}, uncertain {uncertain_count}, late starts {late_starts}, peak in flight {peak_in_flight}",
        schedule_window.as_secs_f64()
    );
    for (key, count) in refused.iter().chain(uncertain.iter()) {
        println!("    {key}: {count}");
    }
    println!("  update     {}", update_percentiles.line());
    println!("  cpu        {}", cpu.line());
    println!(
        "  notified   {received} events in {posts} POSTs; {notifications_per_s:.0} events/s during the schedule; \
         last arrived {:.2} s after the last update response",
        drain_after_last_update.as_secs_f64()
    );
    if rejected > 0 {
        println!("  rejected   {rejected} notifications answered 503 on purpose (--reject-every)");
    }
    println!(
        "  latency    (update response -> arrival) {}",
        latency.line()
    );
    println!("  end-to-end (update sent -> arrival)     {}", e2e.line());
    if early > 0 {
        println!(
            "  note       {early} notifications arrived before their update's response was read (counted as 0 ms)"
        );
    }
    println!(
        "  check      expected {expected}, missing {missing}, duplicates {duplicates}, unexpected {unexpected}, \
         event-number holes {holes}, repeated numbers {repeated_numbers}, out of order {out_of_order}, \
         silent subscriptions {silent_subscriptions}, malformed {malformed}, foreign {foreign}"
    );
    if !drained {
        println!(
            "  drain      gave up after {:.0} s with {missing} writes not notified",
            drain_wait.as_secs_f64()
        );
        for key in missing_writes.iter().take(5) {
            println!("    missing Task/{}/_history/{}", key.0, key.1);
        }
    }
    if options.timeline {
        println!("  timeline   second: events received, max latency (ms)");
        for (second, (count, max)) in &timeline {
            println!("    {second:>4}: {count:>6}  {:>9.1}", millis(*max));
        }
    }
    println!("  verdict    {}", if passed { "PASS" } else { "FAIL" });

    if !options.keep_subscriptions {
        delete_subscriptions(&client, &bearer, &base, &subscription_ids, options).await;
    }
    receiver.abort();

    println!(
        "{}",
        json!({
            "mode": "hub",
            "base": base.as_str(),
            "run": run,
            "subscriptions": n,
            "rate_target": options.rate,
            "duration_s": round2(schedule_window.as_secs_f64()),
            "updates_scheduled": total,
            "updates_ok": updates_ok,
            "updates_refused": refused_count,
            "updates_uncertain": uncertain_count,
            "late_starts": late_starts,
            "peak_in_flight": peak_in_flight,
            "updates_per_s": round2(updates_per_s),
            "update_latency_ms": update_percentiles.json(),
            "notifications_per_s": round2(notifications_per_s),
            "notification_posts": posts,
            "latency_ms": latency.json(),
            "end_to_end_ms": e2e.json(),
            "drain_s": round2(drain_after_last_update.as_secs_f64()),
            "expected_events": expected,
            "received_events": received,
            "missing": missing,
            "duplicates": duplicates,
            "unexpected": unexpected,
            "event_number_holes": holes,
            "repeated_event_numbers": repeated_numbers,
            "out_of_order": out_of_order,
            "malformed": malformed,
            "rejected_on_purpose": rejected,
            "cpu_percent": cpu.json(),
            "passed": passed,
        })
    );
    Ok(if passed {
        Verdict::Passed
    } else {
        Verdict::Failed
    })
}

/// Whether every expected write has at least one received event.
fn all_arrived(writes: &HashMap<(String, i64), Write>, inbox: &Inbox) -> bool {
    let arrivals = lock(&inbox.arrivals);
    let mut seen: HashSet<(&str, i64)> = HashSet::with_capacity(writes.len());
    for arrival in arrivals.iter() {
        for event in &arrival.events {
            seen.insert((event.task_id.as_str(), event.version));
        }
    }
    writes
        .keys()
        .all(|(id, version)| seen.contains(&(id.as_str(), *version)))
}

/// Runs `make(i)` for i in 0..n with at most `limit` at a time; results in index order.
async fn run_bounded<T, F, Fut>(n: usize, limit: usize, make: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limit.max(1)));
    let mut set = JoinSet::new();
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let job = make(i);
        set.spawn(async move {
            let result = job.await;
            drop(permit);
            (i, result)
        });
    }
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (i, result) = joined.context("a setup request panicked")?;
        results[i] = Some(result?);
    }
    Ok(results.into_iter().flatten().collect())
}

async fn delete_subscriptions(
    client: &reqwest::Client,
    bearer: &Arc<String>,
    base: &Arc<String>,
    ids: &[String],
    options: &HubOptions,
) {
    let ids = Arc::new(ids.to_vec());
    let result = run_bounded(ids.len(), options.setup_concurrency, |i| {
        let request = client
            .delete(format!("{base}/Subscription/{}", ids[i]))
            .header(header::AUTHORIZATION, bearer.as_str());
        async move {
            let response = request.send().await?;
            if !response.status().is_success() {
                bail!("HTTP {}", response.status());
            }
            Ok(())
        }
    })
    .await;
    if let Err(e) = result {
        eprintln!("warning: deleting the subscriptions failed: {e:#}");
    }
}
