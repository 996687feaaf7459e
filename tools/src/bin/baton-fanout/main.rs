//! `baton_fanout`: fan-out benchmarks for the websocket and AMQP channels (BENCHMARKS.md).
//!
//! An example rather than a binary because its clients (tokio-tungstenite) are a
//! dev-dependency. Run it with `cargo run --release --example baton_fanout -- <command> …`
//! against a Baton started on its own, throw-away database: it creates Tasks and
//! Subscriptions and leaves the websocket ones behind.
//!
//! - `websocket`: one Task and one owner-filtered websocket subscription per owner, plus
//!   catch-all subscriptions, each bound on its own socket. It reports the server's resident
//!   memory per idle bound socket (`/proc/<pid>/status`), then runs an open-loop schedule of
//!   Task updates spread over the owners and measures, per update, the delay from its HTTP
//!   response until every catch-all listener had it; it checks that every listener got each of
//!   its events exactly once, in order, with contiguous event numbers.
//! - `amqp`: subscriptions on the message channel sharing one queue, closed-loop Task updates,
//!   and a consumer that measures confirmed notifications per second, the delay from update
//!   response to consumer arrival, and lost and duplicate events.
//!
//! Each command prints a short report and, as its last line, one JSON object. Only meant for
//! loopback targets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const FHIR_JSON: &str = "application/fhir+json";
const FILTER_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria";
const PAYLOAD_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content";
const MAX_COUNT_EXTENSION: &str =
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-max-count";
/// The routing key every AMQP subscription of a run publishes with.
const ROUTING_KEY: &str = "fanout";

#[derive(Parser)]
#[command(
    name = "baton_fanout",
    about = "Websocket and AMQP fan-out benchmarks for Baton (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bound websocket listeners: memory per idle socket, then latency under open-loop updates.
    Websocket(WebSocketOptions),
    /// Message-channel subscriptions sharing one RabbitMQ queue under closed-loop updates.
    Amqp(AmqpOptions),
}

#[derive(clap::Args, Clone)]
struct Target {
    /// FHIR base URL, e.g. http://127.0.0.1:8080/fhir.
    #[arg(long)]
    base: String,
    /// Bearer token (an admin token: `baton token --role admin`).
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Without --token, mint a two-hour admin token with this HS256 key.
    #[arg(long, env = "BATON_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// The server's process id, for its memory (VmRSS) and CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Concurrent requests while creating Tasks and Subscriptions and binding sockets.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
}

impl Target {
    fn base(&self) -> &str {
        self.base.trim_end_matches('/')
    }

    /// The server root (for /metrics): the base without its `/fhir` path.
    fn root(&self) -> &str {
        self.base().trim_end_matches("/fhir")
    }

    fn bearer(&self) -> anyhow::Result<String> {
        match (&self.token, &self.jwt_secret) {
            (Some(token), _) => Ok(format!("Bearer {token}")),
            (None, Some(secret)) => Ok(format!("Bearer {}", mint_admin_token(secret)?)),
            (None, None) => bail!("give --token (or BATON_TOKEN), or BATON_JWT_SECRET to mint one"),
        }
    }
}

#[derive(clap::Args)]
struct WebSocketOptions {
    #[command(flatten)]
    target: Target,
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
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Filter {
    /// Every subscription hears every update (fan-out).
    None,
    /// Each subscription hears only its own owner's Tasks.
    Owner,
}

#[derive(clap::Args)]
struct AmqpOptions {
    #[command(flatten)]
    target: Target,
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
            Command::Websocket(options) => websocket(&options).await,
            Command::Amqp(options) => amqp(&options).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
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

    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 7200;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = json!({ "sub": "baton-fanout", "exp": exp, "role": "admin" });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .context("the JWT secret cannot key HMAC-SHA256")?;
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Ok(format!("{signing_input}.{signature}"))
}

fn http_client(connections: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(connections)
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the HTTP client")
}

/// `W/"3"` → 3.
fn etag_version(text: &str) -> Option<u32> {
    text.trim_start_matches("W/").trim_matches('"').parse().ok()
}

/// A line of `/proc/<pid>/status` in KiB, e.g. `VmRSS`.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Percent of one core used by this process and the server between `start` and `finish`.
struct CpuMeter {
    at: Instant,
    own: Option<Duration>,
    server_pid: Option<String>,
    server: Option<Duration>,
}

impl CpuMeter {
    fn start(server_pid: Option<u32>) -> CpuMeter {
        let server_pid = server_pid.map(|p| p.to_string());
        CpuMeter {
            at: Instant::now(),
            own: cpu_time("self"),
            server: server_pid.as_deref().and_then(cpu_time),
            server_pid,
        }
    }

    fn finish(&self) -> (Option<f64>, Option<f64>) {
        let wall = self.at.elapsed().as_secs_f64().max(1e-3);
        let percent = |before: Option<Duration>, now: Option<Duration>| {
            Some(round2(100.0 * (now? - before?).as_secs_f64() / wall))
        };
        let server_now = self.server_pid.as_deref().and_then(cpu_time);
        (
            percent(self.own, cpu_time("self")),
            percent(self.server, server_now),
        )
    }
}

fn cpu_line((own, server): (Option<f64>, Option<f64>)) -> String {
    let show = |p: Option<f64>| p.map_or("n/a".to_string(), |p| format!("{p:.0}%"));
    format!(
        "server {}, baton_fanout {} (percent of one core; the machine has {}); load average {}",
        show(server),
        show(own),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
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
            "n": self.count,
        })
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn snippet(body: &str) -> String {
    body.chars().take(200).collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
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

/// The ids and owners of one run's Tasks: `fo-<run>-<i>` owned by `Practitioner/fo-<run>-<i mod owners>`.
struct Names {
    run: String,
}

impl Names {
    fn new() -> Names {
        Names {
            run: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        }
    }

    fn task(&self, i: usize) -> String {
        format!("fo-{}-{i}", self.run)
    }

    fn owner(&self, i: usize) -> String {
        format!("Practitioner/fo-{}-{i}", self.run)
    }

    /// The index of one of this run's Tasks, from its id.
    fn task_index(&self, id: &str) -> Option<u32> {
        id.strip_prefix("fo-")?
            .strip_prefix(self.run.as_str())?
            .strip_prefix('-')?
            .parse()
            .ok()
    }
}

fn task_body(id: &str, owner: &str, description: &str) -> String {
    json!({
        "resourceType": "Task",
        "id": id,
        "status": "requested",
        "intent": "order",
        "owner": { "reference": owner },
        "description": description,
    })
    .to_string()
}

/// Creates Task i (PUT to a new id) for i in 0..n.
async fn create_tasks(
    client: &reqwest::Client,
    bearer: &Arc<String>,
    base: &Arc<String>,
    names: &Arc<Names>,
    n: usize,
    owner_of: impl Fn(usize) -> usize,
    concurrency: usize,
) -> anyhow::Result<()> {
    run_bounded(n, concurrency, |i| {
        let request = client
            .put(format!("{base}/Task/{}", names.task(i)))
            .header(reqwest::header::AUTHORIZATION, bearer.as_str())
            .header(reqwest::header::CONTENT_TYPE, FHIR_JSON)
            .body(task_body(
                &names.task(i),
                &names.owner(owner_of(i)),
                "fan-out",
            ));
        async move {
            let response = request.send().await.context("creating a Task")?;
            let status = response.status();
            if !status.is_success() {
                let text = response.text().await.unwrap_or_default();
                bail!("creating a Task: HTTP {status}: {}", snippet(&text));
            }
            Ok(())
        }
    })
    .await?;
    Ok(())
}

/// Creates one subscription from its channel; returns its id.
async fn create_subscription(
    client: reqwest::Client,
    bearer: Arc<String>,
    base: Arc<String>,
    filter: Option<String>,
    channel: Value,
) -> anyhow::Result<String> {
    let mut body = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "baton_fanout",
        "criteria": format!("{base}/SubscriptionTopic/task-changed"),
        "channel": channel,
    });
    if let Some(filter) = filter {
        body["_criteria"] =
            json!({ "extension": [{ "url": FILTER_EXTENSION, "valueString": filter }] });
    }
    let response = client
        .post(format!("{base}/Subscription"))
        .header(reqwest::header::AUTHORIZATION, bearer.as_str())
        .header(reqwest::header::CONTENT_TYPE, FHIR_JSON)
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

/// One Task update (PUT); returns its version, or why it did not count.
async fn update_task(
    client: &reqwest::Client,
    bearer: &str,
    base: &str,
    names: &Names,
    task: usize,
    owner: usize,
    k: u64,
) -> Result<u32, String> {
    let id = names.task(task);
    let response = client
        .put(format!("{base}/Task/{id}"))
        .header(reqwest::header::AUTHORIZATION, bearer)
        .header(reqwest::header::CONTENT_TYPE, FHIR_JSON)
        .body(task_body(&id, &names.owner(owner), &format!("update {k}")))
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                "transport: timeout".to_string()
            } else {
                "transport: error".to_string()
            }
        })?;
    let status = response.status();
    let version = response
        .headers()
        .get(reqwest::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .and_then(etag_version);
    let _ = response.bytes().await;
    match (status.is_success(), version) {
        (true, Some(version)) => Ok(version),
        (true, None) => Err("2xx without ETag".into()),
        _ => Err(format!("HTTP {}", status.as_u16())),
    }
}

/// Lines of the server's /metrics that concern these channels.
async fn metrics_lines(client: &reqwest::Client, root: &str, channel: &str) -> Vec<String> {
    let Ok(response) = client.get(format!("{root}/metrics")).send().await else {
        return vec!["(metrics unavailable)".into()];
    };
    let text = response.text().await.unwrap_or_default();
    let channel_label = format!("channel=\"{channel}\"");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with("baton_websocket")
                || (l.starts_with("baton_deliveries_total") && l.contains(&channel_label))
                || l.starts_with("baton_events_total")
                || l.starts_with("baton_events_withheld_total")
        })
        .map(str::to_string)
        .collect()
}

/// A metric's value from `metrics_lines`, summed over its label sets.
fn metric_sum(lines: &[String], name: &str) -> Option<f64> {
    let values: Vec<f64> = lines
        .iter()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

// ---------------------------------------------------------------------------------------------
// Notification Bundles, read with typed structs: the load generator shares the cores with the
// server, and a typed parse that skips what it does not need costs much less than a `Value`.

#[derive(Deserialize)]
struct WireBundle {
    #[serde(default)]
    entry: Vec<WireEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireEntry {
    full_url: Option<String>,
    resource: Option<WireParameters>,
    response: Option<WireResponse>,
}

#[derive(Deserialize)]
struct WireParameters {
    #[serde(default)]
    parameter: Vec<WireParameter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireParameter {
    name: String,
    value_code: Option<String>,
    value_string: Option<String>,
    value_reference: Option<WireReference>,
    #[serde(default)]
    part: Vec<WireParameter>,
}

#[derive(Deserialize)]
struct WireReference {
    reference: Option<String>,
}

#[derive(Deserialize)]
struct WireResponse {
    etag: Option<String>,
}

/// One event of a notification: its number and the Task version it is about.
#[derive(Debug, Clone)]
struct SeenEvent {
    number: i64,
    task: String,
    version: u32,
}

enum Notice {
    Handshake { subscription: String },
    Heartbeat,
    Events { events: Vec<SeenEvent> },
}

/// Reads a backport notification Bundle: the status `Parameters` in entry 0 (type,
/// subscription, `notification-event`s), then one entry per event whose `fullUrl` names the
/// Task and whose `response.etag` gives the version.
fn parse_notice(text: &[u8]) -> Option<Notice> {
    let bundle: WireBundle = serde_json::from_slice(text).ok()?;
    let parameters = &bundle.entry.first()?.resource.as_ref()?.parameter;
    let named = |name: &str| parameters.iter().find(|p| p.name == name);
    let kind = named("type")?.value_code.as_deref()?;
    match kind {
        "handshake" => {
            let reference = named("subscription")?
                .value_reference
                .as_ref()?
                .reference
                .as_deref()?;
            return Some(Notice::Handshake {
                subscription: reference.rsplit('/').next()?.to_string(),
            });
        }
        "heartbeat" => return Some(Notice::Heartbeat),
        "event-notification" => {}
        _ => return None,
    }
    let mut events = Vec::new();
    let numbered = parameters.iter().filter(|p| p.name == "notification-event");
    for (index, event) in numbered.enumerate() {
        let part = |name: &str| event.part.iter().find(|p| p.name == name);
        let number = part("event-number")?
            .value_string
            .as_deref()?
            .parse()
            .ok()?;
        let focus = part("focus")?
            .value_reference
            .as_ref()?
            .reference
            .as_deref()?;
        let task = focus.split("/Task/").nth(1)?.split('/').next()?.to_string();
        let entry = bundle.entry.get(index + 1)?;
        if entry.full_url.as_deref()?.rsplit('/').next()? != task {
            return None;
        }
        let version = etag_version(entry.response.as_ref()?.etag.as_deref()?)?;
        events.push(SeenEvent {
            number,
            task,
            version,
        });
    }
    Some(Notice::Events { events })
}

/// One event as a listener received it.
#[derive(Clone, Copy)]
struct Arrival {
    at: Instant,
    number: i64,
    task: u32,
    version: u32,
}

/// A Task update whose notifications are expected.
#[derive(Clone, Copy)]
struct Write {
    task: u32,
    version: u32,
    responded: Instant,
}

/// How one scheduled update went: its version when written, or why it did not count.
struct Answered {
    task: u32,
    outcome: Result<u32, String>,
    responded: Instant,
}

/// What one listener's stream of events looked like against what it should have been.
#[derive(Default)]
struct Tally {
    expected: u64,
    received: u64,
    missing: u64,
    duplicates: u64,
    unexpected: u64,
    /// Event numbers not contiguous from the first one received.
    holes: u64,
    repeated_numbers: u64,
    out_of_order: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.expected += other.expected;
        self.received += other.received;
        self.missing += other.missing;
        self.duplicates += other.duplicates;
        self.unexpected += other.unexpected;
        self.holes += other.holes;
        self.repeated_numbers += other.repeated_numbers;
        self.out_of_order += other.out_of_order;
    }

    fn clean(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.unexpected == 0
            && self.holes == 0
            && self.repeated_numbers == 0
            && self.out_of_order == 0
    }

    fn line(&self) -> String {
        format!(
            "expected {}, received {}, missing {}, duplicates {}, unexpected {}, number holes {}, repeated numbers {}, out of order {}",
            self.expected,
            self.received,
            self.missing,
            self.duplicates,
            self.unexpected,
            self.holes,
            self.repeated_numbers,
            self.out_of_order
        )
    }

    fn json(&self) -> Value {
        json!({
            "expected": self.expected,
            "received": self.received,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "number_holes": self.holes,
            "repeated_numbers": self.repeated_numbers,
            "out_of_order": self.out_of_order,
        })
    }
}

/// Checks one listener's arrivals (in arrival order) against the writes it should have
/// heard (`expected` indexes into `writes`). Returns the tally and, per expected write, the
/// first arrival time.
fn check_listener(
    arrivals: &[Arrival],
    write_index: &HashMap<(u32, u32), usize>,
    expected: &[usize],
) -> (Tally, HashMap<usize, Instant>) {
    let wanted: HashSet<usize> = expected.iter().copied().collect();
    let mut first: HashMap<usize, Instant> = HashMap::with_capacity(expected.len());
    let mut tally = Tally {
        expected: expected.len() as u64,
        received: arrivals.len() as u64,
        ..Tally::default()
    };
    for arrival in arrivals {
        match write_index.get(&(arrival.task, arrival.version)) {
            Some(w) if wanted.contains(w) => match first.entry(*w) {
                // A repeat counts as a duplicate; the latency is the first arrival's.
                std::collections::hash_map::Entry::Occupied(_) => tally.duplicates += 1,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(arrival.at);
                }
            },
            _ => tally.unexpected += 1,
        }
    }
    tally.missing = expected.iter().filter(|w| !first.contains_key(w)).count() as u64;
    let numbers: Vec<i64> = arrivals.iter().map(|a| a.number).collect();
    tally.out_of_order = numbers.windows(2).filter(|w| w[1] <= w[0]).count() as u64;
    let distinct: HashSet<i64> = numbers.iter().copied().collect();
    tally.repeated_numbers = (numbers.len() - distinct.len()) as u64;
    if let (Some(min), Some(max)) = (distinct.iter().min(), distinct.iter().max()) {
        tally.holes = (max - min + 1) as u64 - distinct.len() as u64;
    }
    (tally, first)
}

// ---------------------------------------------------------------------------------------------
// websocket

/// How a listener's socket ended.
#[derive(Debug)]
enum SocketEnd {
    /// Still open when the run stopped reading: the normal case.
    Open,
    Closed(Option<u16>, String),
    Eof,
    Error(String),
}

struct ListenerLog {
    arrivals: Vec<Arrival>,
    notifications: u64,
    heartbeats: u64,
    malformed: u64,
    foreign: u64,
    end: SocketEnd,
}

/// One second of the run, as the sampler saw it (counters are cumulative).
struct Sample {
    second: u64,
    answered: u64,
    matched: u64,
    received: u64,
    rss_kib: u64,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Gets a binding token for one subscription, connects, binds and waits for the handshake.
async fn bind_listener(
    client: &reqwest::Client,
    bearer: &str,
    base: &str,
    subscription: &str,
) -> anyhow::Result<Socket> {
    let response = client
        .get(format!(
            "{base}/Subscription/{subscription}/$get-ws-binding-token"
        ))
        .header(reqwest::header::AUTHORIZATION, bearer)
        .send()
        .await
        .context("getting a binding token")?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("getting a binding token: HTTP {status}: {}", snippet(&text));
    }
    let parameters: Value = serde_json::from_str(&text).context("reading the binding token")?;
    let find = |name: &str, field: &str| {
        parameters["parameter"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .and_then(|p| p[field].as_str())
            .map(str::to_string)
    };
    let token = find("token", "valueString").context("no token in the binding answer")?;
    let url = find("websocket-url", "valueUrl")
        .or_else(|| find("websocket-url", "valueString"))
        .context("no websocket-url in the binding answer")?;
    let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .context("connecting the websocket")?;
    socket
        .send(Message::text(format!("bind-with-token {token}")))
        .await
        .context("sending bind-with-token")?;
    let handshake = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Close(frame))) => bail!("closed while binding: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("reading the handshake: {e}"),
                None => bail!("the socket ended while binding"),
            }
        }
    })
    .await
    .context("no handshake within 60 s")??;
    match parse_notice(handshake.as_bytes()) {
        Some(Notice::Handshake { subscription: s }) if s == subscription => Ok(socket),
        _ => bail!("expected a handshake, got: {}", snippet(handshake.as_str())),
    }
}

/// Reads a bound socket until told to stop, recording every event with its arrival time.
async fn read_listener(
    mut socket: Socket,
    stop: CancellationToken,
    names: Arc<Names>,
    received: Arc<AtomicU64>,
) -> ListenerLog {
    let mut log = ListenerLog {
        arrivals: Vec::new(),
        notifications: 0,
        heartbeats: 0,
        malformed: 0,
        foreign: 0,
        end: SocketEnd::Open,
    };
    loop {
        let message = tokio::select! {
            message = socket.next() => message,
            () = stop.cancelled() => break,
        };
        let at = Instant::now();
        match message {
            Some(Ok(Message::Text(text))) => match parse_notice(text.as_bytes()) {
                Some(Notice::Events { events }) => {
                    log.notifications += 1;
                    received.fetch_add(events.len() as u64, Ordering::Relaxed);
                    for event in events {
                        match names.task_index(&event.task) {
                            Some(task) => log.arrivals.push(Arrival {
                                at,
                                number: event.number,
                                task,
                                version: event.version,
                            }),
                            None => log.foreign += 1,
                        }
                    }
                }
                Some(Notice::Heartbeat) => log.heartbeats += 1,
                Some(Notice::Handshake { .. }) | None => log.malformed += 1,
            },
            Some(Ok(Message::Close(frame))) => {
                log.end = SocketEnd::Closed(
                    frame.as_ref().map(|f| u16::from(f.code)),
                    frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                );
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                log.end = SocketEnd::Error(e.to_string());
                break;
            }
            None => {
                log.end = SocketEnd::Eof;
                break;
            }
        }
    }
    log
}

async fn websocket(options: &WebSocketOptions) -> anyhow::Result<bool> {
    let target = &options.target;
    let owners = options.owners;
    let listeners = owners + options.catch_all;
    if owners == 0 || options.rate <= 0.0 || options.max_in_flight == 0 {
        bail!("--owners, --rate and --max-in-flight must be positive");
    }
    let pid = target
        .server_pid
        .context("--server-pid is needed to read the server's memory")?;
    let bearer = Arc::new(target.bearer()?);
    let base = Arc::new(target.base().to_string());
    let client = http_client(options.max_in_flight.max(target.setup_concurrency))?;
    let names = Arc::new(Names::new());
    let rss = || proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    println!(
        "websocket: run {}, {owners} owner listeners + {} catch-all listeners, {} updates/s for {:.0} s",
        names.run,
        options.catch_all,
        options.rate,
        options.duration.as_secs_f64()
    );
    let rss_start = rss();

    // Tasks first: no subscription exists yet, so their creation notifies nobody.
    let setup = Instant::now();
    create_tasks(
        &client,
        &bearer,
        &base,
        &names,
        owners,
        |i| i,
        target.setup_concurrency,
    )
    .await?;
    println!(
        "  setup      {owners} Tasks created in {:.1} s",
        setup.elapsed().as_secs_f64()
    );

    // Listener i < owners filters on owner i; the rest are catch-alls.
    let setup = Instant::now();
    let channel = json!({
        "type": "websocket",
        "payload": FHIR_JSON,
        "_payload": { "extension": [{ "url": PAYLOAD_EXTENSION, "valueCode": "id-only" }] },
    });
    let subscriptions = Arc::new(
        run_bounded(listeners, target.setup_concurrency, |i| {
            let filter = (i < owners).then(|| format!("owner={}", names.owner(i)));
            create_subscription(
                client.clone(),
                bearer.clone(),
                base.clone(),
                filter,
                channel.clone(),
            )
        })
        .await?,
    );
    println!(
        "  setup      {listeners} websocket subscriptions created in {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss();

    // Bind every listener on its own socket; each keeps reading until the run stops it.
    let setup = Instant::now();
    let stop = CancellationToken::new();
    let received = Arc::new(AtomicU64::new(0));
    let bound = Arc::new(AtomicU64::new(0));
    let bound_set: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(target.setup_concurrency.max(1)));
    let mut readers: JoinSet<(usize, Option<ListenerLog>)> = JoinSet::new();
    for i in 0..listeners {
        let permit = permits.clone().acquire_owned().await?;
        let (client, bearer, base, subscriptions) = (
            client.clone(),
            bearer.clone(),
            base.clone(),
            subscriptions.clone(),
        );
        let (stop, names, received, bound, bound_set, failed, errors) = (
            stop.clone(),
            names.clone(),
            received.clone(),
            bound.clone(),
            bound_set.clone(),
            failed.clone(),
            errors.clone(),
        );
        readers.spawn(async move {
            let socket = bind_listener(&client, &bearer, &base, &subscriptions[i]).await;
            drop(permit);
            match socket {
                Ok(socket) => {
                    lock(&bound_set).insert(i);
                    bound.fetch_add(1, Ordering::Relaxed);
                    (i, Some(read_listener(socket, stop, names, received).await))
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    *lock(&errors).entry(format!("{e:#}")).or_default() += 1;
                    (i, None)
                }
            }
        });
    }
    while bound.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < listeners as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bound_count = bound.load(Ordering::Relaxed);
    println!(
        "  setup      {bound_count} of {listeners} sockets bound in {:.1} s ({} failed)",
        setup.elapsed().as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    for (error, count) in lock(&errors).iter() {
        println!("    {count} x {error}");
    }

    // Memory per idle bound socket.
    tokio::time::sleep(options.idle).await;
    let rss_idle = rss();
    let per_socket_kib = if bound_count > 0 {
        (rss_idle as f64 - rss_before as f64) / bound_count as f64
    } else {
        0.0
    };
    let idle_metrics = metrics_lines(&client, target.root(), "websocket").await;
    println!(
        "  memory     server VmRSS {rss_start} KiB at start, {rss_before} KiB with Tasks and subscriptions, \
         {rss_idle} KiB with {bound_count} sockets bound and idle {:.0} s: {per_socket_kib:.1} KiB per socket",
        options.idle.as_secs_f64()
    );
    println!(
        "  gauge      baton_websocket_connections {}",
        metric_sum(&idle_metrics, "baton_websocket_connections").unwrap_or(f64::NAN)
    );

    // The open-loop schedule: update k is due at start + k/rate, whatever earlier ones do.
    let total = (options.rate * options.duration.as_secs_f64()).round() as u64;
    let in_flight = Arc::new(Semaphore::new(options.max_in_flight));
    let results: Arc<Mutex<Vec<Answered>>> =
        Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let answered = Arc::new(AtomicU64::new(0));
    let sampler_stop = CancellationToken::new();
    let sampler = {
        let (received, answered, sampler_stop) =
            (received.clone(), answered.clone(), sampler_stop.clone());
        let (client, root) = (client.clone(), target.root().to_string());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let start = Instant::now();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = sampler_stop.cancelled() => break,
                }
                // How far the hub's matcher got: events numbered so far.
                let matched = metric_sum(
                    &metrics_lines(&client, &root, "websocket").await,
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
        })
    };
    let tick = Duration::from_secs_f64(1.0 / options.rate).max(Duration::from_millis(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut late_starts = 0u64;
    let mut issued = 0u64;
    let schedule_start = Instant::now();
    let cpu = CpuMeter::start(Some(pid));
    while issued < total {
        interval.tick().await;
        let due = ((schedule_start.elapsed().as_secs_f64() * options.rate) as u64 + 1).min(total);
        while issued < due {
            let permit = match in_flight.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    late_starts += 1;
                    in_flight.clone().acquire_owned().await?
                }
            };
            let k = issued;
            issued += 1;
            let task = (k % owners as u64) as usize;
            let (client, bearer, base, names, results, answered) = (
                client.clone(),
                bearer.clone(),
                base.clone(),
                names.clone(),
                results.clone(),
                answered.clone(),
            );
            tokio::spawn(async move {
                let outcome = update_task(&client, &bearer, &base, &names, task, task, k).await;
                let responded = Instant::now();
                answered.fetch_add(1, Ordering::Relaxed);
                lock(&results).push(Answered {
                    task: task as u32,
                    outcome,
                    responded,
                });
                drop(permit);
            });
        }
    }
    let _all_done = in_flight.acquire_many(options.max_in_flight as u32).await?;
    let schedule_window = schedule_start.elapsed();
    let load_cpu = cpu.finish();

    let mut writes: Vec<Write> = Vec::with_capacity(total as usize);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    for Answered {
        task,
        outcome,
        responded,
    } in lock(&results).drain(..)
    {
        match outcome {
            Ok(version) => writes.push(Write {
                task,
                version,
                responded,
            }),
            Err(key) => *failures.entry(key).or_default() += 1,
        }
    }
    let last_response = writes
        .iter()
        .map(|w| w.responded)
        .max()
        .unwrap_or(schedule_start);
    let write_index: HashMap<(u32, u32), usize> = writes
        .iter()
        .enumerate()
        .map(|(i, w)| ((w.task, w.version), i))
        .collect();
    let mut by_task: Vec<Vec<usize>> = vec![Vec::new(); owners];
    for (w, write) in writes.iter().enumerate() {
        by_task[write.task as usize].push(w);
    }
    let expected_events: u64 = lock(&bound_set)
        .iter()
        .map(|&i| {
            if i >= owners {
                writes.len() as u64
            } else {
                by_task[i].len() as u64
            }
        })
        .sum();

    // Drain: until every expected event arrived (or the time is up), then a short settle.
    let drain_start = Instant::now();
    let mut drained = false;
    while drain_start.elapsed() < options.drain_timeout {
        if received.load(Ordering::Relaxed) >= expected_events {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(options.settle).await;
    let rss_after = rss();
    let final_metrics = metrics_lines(&client, target.root(), "websocket").await;
    stop.cancel();
    sampler_stop.cancel();
    let samples = sampler.await.unwrap_or_default();

    let mut logs: Vec<Option<ListenerLog>> = (0..listeners).map(|_| None).collect();
    while let Some(joined) = readers.join_next().await {
        if let Ok((i, log)) = joined {
            logs[i] = log;
        }
    }

    // Analysis.
    let all_writes: Vec<usize> = (0..writes.len()).collect();
    let mut catch_all_tally = Tally::default();
    let mut owner_tally = Tally::default();
    let mut per_listener = Vec::new();
    let mut owner_latencies = Vec::new();
    // Per write: the latest first-arrival over the catch-alls, and how many had it.
    let mut latest: Vec<Option<Instant>> = vec![None; writes.len()];
    let mut heard_by: Vec<u32> = vec![0; writes.len()];
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    let (mut notifications, mut heartbeats, mut malformed, mut foreign) = (0u64, 0u64, 0u64, 0u64);
    let mut unbound = 0u64;
    let mut catch_alls_bound = 0u32;
    for (i, log) in logs.iter().enumerate() {
        let Some(log) = log else {
            unbound += 1;
            continue;
        };
        notifications += log.notifications;
        heartbeats += log.heartbeats;
        malformed += log.malformed;
        foreign += log.foreign;
        let end = match &log.end {
            SocketEnd::Open => "open until the end".to_string(),
            SocketEnd::Closed(code, reason) => format!("closed by the server: {code:?} {reason}"),
            SocketEnd::Eof => "ended without a close frame".to_string(),
            SocketEnd::Error(e) => format!("error: {e}"),
        };
        *ends.entry(end).or_default() += 1;
        let catch_all = i >= owners;
        let expected = if catch_all { &all_writes } else { &by_task[i] };
        let (tally, first) = check_listener(&log.arrivals, &write_index, expected);
        if catch_all {
            catch_alls_bound += 1;
            catch_all_tally.add(&tally);
            for (&w, &at) in &first {
                let latency = at.saturating_duration_since(writes[w].responded);
                per_listener.push(latency);
                heard_by[w] += 1;
                latest[w] = Some(latest[w].map_or(at, |l: Instant| l.max(at)));
            }
        } else {
            owner_tally.add(&tally);
            owner_latencies.extend(
                first
                    .iter()
                    .map(|(&w, &at)| at.saturating_duration_since(writes[w].responded)),
            );
        }
    }
    let mut all_listeners = Vec::new();
    let mut not_by_all = 0u64;
    for (w, write) in writes.iter().enumerate() {
        match latest[w] {
            Some(at) if heard_by[w] == catch_alls_bound => {
                all_listeners.push(at.saturating_duration_since(write.responded));
            }
            _ => not_by_all += 1,
        }
    }
    let last_arrival = logs
        .iter()
        .flatten()
        .filter_map(|l| l.arrivals.iter().map(|a| a.at).max())
        .max()
        .unwrap_or(last_response);
    let all_p = Percentiles::of(all_listeners);
    let per_listener_p = Percentiles::of(per_listener);
    let owner_p = Percentiles::of(owner_latencies);
    let passed = catch_all_tally.clean()
        && owner_tally.clean()
        && unbound == 0
        && malformed == 0
        && drained
        && failures.is_empty();
    // The counter appears only once it was first incremented.
    let closed_slow =
        metric_sum(&final_metrics, "baton_websocket_closed_slow_total").unwrap_or(0.0);

    println!(
        "  updates    {} ok of {total} scheduled in {:.1} s = {:.0}/s; late starts {late_starts}",
        writes.len(),
        schedule_window.as_secs_f64(),
        writes.len() as f64 / schedule_window.as_secs_f64()
    );
    for (key, count) in &failures {
        println!("    {key}: {count}");
    }
    println!("  cpu        {}", cpu_line(load_cpu));
    println!(
        "  notified   {} events in {notifications} notifications ({:.2} events each), {heartbeats} heartbeats; \
         last event {:.2} s after the last update response{}",
        received.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed) as f64 / notifications.max(1) as f64,
        last_arrival
            .saturating_duration_since(last_response)
            .as_secs_f64(),
        if drained {
            String::new()
        } else {
            format!(
                "; gave up waiting after {:.0} s",
                options.drain_timeout.as_secs_f64()
            )
        }
    );
    println!(
        "  latency    update response -> all {catch_alls_bound} catch-alls had it: {}",
        all_p.line()
    );
    println!(
        "  latency    update response -> one catch-all listener:   {}",
        per_listener_p.line()
    );
    println!(
        "  latency    update response -> its owner's listener:     {}",
        owner_p.line()
    );
    println!(
        "  check      catch-alls: {}; not heard by every catch-all: {not_by_all}",
        catch_all_tally.line()
    );
    println!("  check      owners:     {}", owner_tally.line());
    println!("  check      unbound {unbound}, malformed {malformed}, foreign {foreign}");
    println!("  slow       baton_websocket_closed_slow_total {closed_slow}");
    for (end, count) in &ends {
        println!("  sockets    {count} x {end}");
    }
    println!(
        "  memory     server VmRSS {rss_after} KiB after the run (VmHWM {} KiB)",
        proc_status_kib(pid, "VmHWM:").unwrap_or(0)
    );
    println!("  metrics    after the run:");
    for line in &final_metrics {
        println!("    {line}");
    }
    if options.timeline {
        println!(
            "  timeline   second: updates answered, events numbered by the hub, events received, server VmRSS KiB"
        );
        let mut previous = (0, 0, 0);
        for sample in &samples {
            println!(
                "    {:>4}: {:>6}  {:>8}  {:>8}  {:>9}",
                sample.second,
                sample.answered - previous.0,
                sample.matched.saturating_sub(previous.1),
                sample.received - previous.2,
                sample.rss_kib
            );
            previous = (sample.answered, sample.matched, sample.received);
        }
    }
    println!("  verdict    {}", if passed { "PASS" } else { "FAIL" });
    println!(
        "{}",
        json!({
            "mode": "websocket",
            "run": names.run,
            "owners": owners,
            "catch_all": options.catch_all,
            "sockets_bound": bound_count,
            "rss_kib": { "start": rss_start, "before_sockets": rss_before, "idle": rss_idle, "after_run": rss_after },
            "kib_per_idle_socket": round2(per_socket_kib),
            "rate_target": options.rate,
            "updates_ok": writes.len(),
            "updates_failed": failures.values().sum::<u64>(),
            "late_starts": late_starts,
            "duration_s": round2(schedule_window.as_secs_f64()),
            "latency_all_catch_alls_ms": all_p.json(),
            "latency_per_catch_all_ms": per_listener_p.json(),
            "latency_owner_ms": owner_p.json(),
            "catch_alls": catch_all_tally.json(),
            "owners_check": owner_tally.json(),
            "not_heard_by_all": not_by_all,
            "notifications": notifications,
            "closed_slow_total": closed_slow,
            "cpu_percent": { "load": load_cpu.0, "server": load_cpu.1 },
            "passed": passed,
        })
    );
    Ok(passed)
}

// ---------------------------------------------------------------------------------------------
// amqp

/// One message the consumer took from the queue.
struct Delivered {
    at: Instant,
    subscription: String,
    kind: String,
    first_event: Option<i64>,
    events: Vec<SeenEvent>,
}

fn header_text(headers: &lapin::types::FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => {
            std::str::from_utf8(s.as_bytes()).ok().map(str::to_string)
        }
        lapin::types::AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn header_number(headers: &lapin::types::FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(name)? {
        lapin::types::AMQPValue::LongLongInt(n) => Some(*n),
        lapin::types::AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

async fn amqp(options: &AmqpOptions) -> anyhow::Result<bool> {
    use lapin::options::{
        BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Connection, ConnectionProperties, ExchangeKind};

    let target = &options.target;
    let m = options.subscriptions;
    if m == 0 || options.tasks == 0 || options.writers == 0 {
        bail!("--subscriptions, --tasks and --writers must be positive");
    }
    let bearer = Arc::new(target.bearer()?);
    let base = Arc::new(target.base().to_string());
    let client = http_client(options.writers.max(target.setup_concurrency))?;
    let names = Arc::new(Names::new());
    let exchange = format!("baton-fanout-{}", names.run);
    let queue = exchange.clone();
    println!(
        "amqp: run {}, {m} subscriptions (filter {}, max count {}) -> exchange/queue {exchange}, {} writers over {} Tasks for {:.0} s",
        names.run,
        match options.filter {
            Filter::None => "none",
            Filter::Owner => "owner",
        },
        options
            .max_count
            .map_or("hub default".to_string(), |n| n.to_string()),
        options.writers,
        options.tasks,
        options.duration.as_secs_f64()
    );

    // The topology: a durable direct exchange and a durable queue, as an integration engine
    // would have; the queue expires on its own if this run dies before deleting it.
    let connection = Connection::connect(&options.amqp_url, ConnectionProperties::default())
        .await
        .context("connecting to the broker")?;
    let setup_channel = connection.create_channel().await?;
    setup_channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring the exchange")?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), AMQPValue::LongInt(1_800_000));
    setup_channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await
        .context("declaring the queue")?;
    setup_channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            ROUTING_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("binding the queue")?;

    // The consumer: no acks, so the broker pushes as fast as it can and this tool's cost stays
    // small; every message is timestamped on arrival and parsed later.
    let consume_channel = connection.create_channel().await?;
    consume_channel
        .basic_qos(2000, BasicQosOptions::default())
        .await?;
    let mut consumer = consume_channel
        .basic_consume(
            queue.as_str().into(),
            "baton-fanout".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("consuming")?;
    let inbox: Arc<Mutex<Vec<(Instant, lapin::message::Delivery)>>> = Arc::default();
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
    let setup = Instant::now();
    create_tasks(
        &client,
        &bearer,
        &base,
        &names,
        options.tasks,
        |i| i % m,
        target.setup_concurrency,
    )
    .await?;
    let endpoint = format!(
        "{}?exchange={exchange}&routing_key={ROUTING_KEY}",
        options.endpoint_broker
    );
    let mut channel = json!({
        "type": "message",
        "endpoint": endpoint,
        "payload": FHIR_JSON,
        "_payload": { "extension": [{ "url": PAYLOAD_EXTENSION, "valueCode": "id-only" }] },
    });
    if let Some(max_count) = options.max_count {
        channel["extension"] =
            json!([{ "url": MAX_COUNT_EXTENSION, "valuePositiveInt": max_count }]);
    }
    let subscription_ids = run_bounded(m, target.setup_concurrency, |i| {
        let filter = match options.filter {
            Filter::None => None,
            Filter::Owner => Some(format!("owner={}", names.owner(i))),
        };
        create_subscription(
            client.clone(),
            bearer.clone(),
            base.clone(),
            filter,
            channel.clone(),
        )
    })
    .await?;
    let subscription_of: HashMap<String, usize> = subscription_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i))
        .collect();
    // Wait for every handshake.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if consumed.load(Ordering::Relaxed) >= m as u64 {
            let handshakes: HashSet<String> = lock(&inbox)
                .iter()
                .filter_map(|(_, d)| {
                    let headers = d.properties.headers().as_ref()?;
                    (header_text(headers, "notification-type")? == "handshake")
                        .then(|| header_text(headers, "subscription-id"))?
                })
                .collect();
            if subscription_ids.iter().all(|id| handshakes.contains(id)) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("not every handshake arrived within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "  setup      {} Tasks and {m} subscriptions created, all handshakes in {:.1} s",
        options.tasks,
        setup.elapsed().as_secs_f64()
    );

    // Closed loop: writer w updates Tasks w, w + W, w + 2W, … in turn.
    let stop_at = Instant::now() + options.duration;
    let schedule_start = Instant::now();
    let cpu = CpuMeter::start(target.server_pid);
    let mut writers = JoinSet::new();
    for w in 0..options.writers {
        let (client, bearer, base, names) =
            (client.clone(), bearer.clone(), base.clone(), names.clone());
        let tasks: Vec<usize> = (w..options.tasks).step_by(options.writers).collect();
        writers.spawn(async move {
            let mut done = Vec::new();
            let mut failures: BTreeMap<String, u64> = BTreeMap::new();
            let mut k = 0u64;
            while Instant::now() < stop_at && !tasks.is_empty() {
                let task = tasks[(k as usize) % tasks.len()];
                let outcome = update_task(&client, &bearer, &base, &names, task, task % m, k).await;
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
    let schedule_end = Instant::now();
    let window = schedule_end - schedule_start;
    let load_cpu = cpu.finish();
    let write_index: HashMap<(u32, u32), usize> = writes
        .iter()
        .enumerate()
        .map(|(i, w)| ((w.task, w.version), i))
        .collect();
    // Which writes each subscription must hear.
    let mut expected: Vec<Vec<usize>> = vec![Vec::new(); m];
    for (w, write) in writes.iter().enumerate() {
        match options.filter {
            Filter::None => expected.iter_mut().for_each(|e| e.push(w)),
            Filter::Owner => expected[write.task as usize % m].push(w),
        }
    }
    let expected_events: u64 = expected.iter().map(|e| e.len() as u64).sum();

    // Drain: count events from the headers until everything expected is in.
    let drain_start = Instant::now();
    let events_in = |inbox: &[(Instant, lapin::message::Delivery)]| -> u64 {
        inbox
            .iter()
            .filter_map(|(_, d)| {
                let headers = d.properties.headers().as_ref()?;
                Some(
                    (header_number(headers, "last-event")? - header_number(headers, "first-event")?
                        + 1) as u64,
                )
            })
            .sum()
    };
    let mut drained = false;
    while drain_start.elapsed() < options.drain_timeout {
        if events_in(&lock(&inbox)) >= expected_events {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(options.settle).await;
    let final_metrics = metrics_lines(&client, target.root(), "message").await;
    let deliveries = std::mem::take(&mut *lock(&inbox));

    // Parse the messages now that nothing is measured any more.
    let mut messages: Vec<Delivered> = Vec::with_capacity(deliveries.len());
    let mut malformed = 0u64;
    for (at, delivery) in &deliveries {
        let Some(headers) = delivery.properties.headers().as_ref() else {
            malformed += 1;
            continue;
        };
        let kind = header_text(headers, "notification-type").unwrap_or_default();
        let events = match parse_notice(&delivery.data) {
            Some(Notice::Events { events }) => events,
            Some(_) => Vec::new(),
            None => {
                malformed += 1;
                Vec::new()
            }
        };
        messages.push(Delivered {
            at: *at,
            subscription: header_text(headers, "subscription-id").unwrap_or_default(),
            kind,
            first_event: header_number(headers, "first-event"),
            events,
        });
    }
    let mut per_subscription: Vec<Vec<Arrival>> = vec![Vec::new(); m];
    let mut firsts: Vec<Vec<i64>> = vec![Vec::new(); m];
    let mut event_messages = 0u64;
    let mut events_in_window = 0u64;
    let mut foreign = 0u64;
    for message in &messages {
        if message.kind != "event-notification" {
            continue;
        }
        let Some(&s) = subscription_of.get(&message.subscription) else {
            foreign += 1;
            continue;
        };
        event_messages += 1;
        if let Some(first) = message.first_event {
            firsts[s].push(first);
        }
        for event in &message.events {
            if message.at <= schedule_end {
                events_in_window += 1;
            }
            match names.task_index(&event.task) {
                Some(task) => per_subscription[s].push(Arrival {
                    at: message.at,
                    number: event.number,
                    task,
                    version: event.version,
                }),
                None => foreign += 1,
            }
        }
    }
    let mut tally = Tally::default();
    let mut latencies = Vec::new();
    let mut last_arrival = schedule_start;
    for s in 0..m {
        let (t, first) = check_listener(&per_subscription[s], &write_index, &expected[s]);
        tally.add(&t);
        for (&w, &at) in &first {
            latencies.push(at.saturating_duration_since(writes[w].responded));
            last_arrival = last_arrival.max(at);
        }
    }
    // Messages of one subscription must arrive in event order.
    let message_order_violations: u64 = firsts
        .iter()
        .map(|f| f.windows(2).filter(|w| w[1] <= w[0]).count() as u64)
        .sum();
    let total_received: u64 = per_subscription.iter().map(|a| a.len() as u64).sum();
    let sustained_window = last_arrival.saturating_duration_since(schedule_start);
    let latency = Percentiles::of(latencies);
    let passed = tally.missing == 0
        && tally.unexpected == 0
        && tally.holes == 0
        && malformed == 0
        && drained
        && message_order_violations == 0;

    println!(
        "  updates    {} ok in {:.1} s = {:.0}/s from {} closed-loop writers",
        writes.len(),
        window.as_secs_f64(),
        writes.len() as f64 / window.as_secs_f64(),
        options.writers
    );
    for (key, count) in &failures {
        println!("    {key}: {count}");
    }
    println!("  cpu        {}", cpu_line(load_cpu));
    println!(
        "  consumed   {total_received} events in {event_messages} event messages ({:.2} events each); \
         {:.0} events/s while updates ran, {:.0} events/s until the last arrived ({:.2} s after the last update)",
        total_received as f64 / event_messages.max(1) as f64,
        events_in_window as f64 / window.as_secs_f64(),
        total_received as f64 / sustained_window.as_secs_f64().max(1e-3),
        last_arrival
            .saturating_duration_since(schedule_end)
            .as_secs_f64()
    );
    println!(
        "  latency    update response -> consumer arrival: {}",
        latency.line()
    );
    println!(
        "  check      {}; message order violations {message_order_violations}; malformed {malformed}, foreign {foreign}{}",
        tally.line(),
        if drained { "" } else { "; drain timed out" }
    );
    println!("  metrics    after the run:");
    for line in &final_metrics {
        println!("    {line}");
    }
    println!("  verdict    {}", if passed { "PASS" } else { "FAIL" });

    // Clean up: subscriptions first, so the hub stops publishing, then the topology.
    let ids = Arc::new(subscription_ids);
    let deleted = run_bounded(ids.len(), target.setup_concurrency, |i| {
        let request = client
            .delete(format!("{base}/Subscription/{}", ids[i]))
            .header(reqwest::header::AUTHORIZATION, bearer.as_str());
        async move {
            let response = request.send().await?;
            if !response.status().is_success() {
                bail!("HTTP {}", response.status());
            }
            Ok(())
        }
    })
    .await;
    if let Err(e) = deleted {
        eprintln!("warning: deleting the subscriptions failed: {e:#}");
    }
    consumer_task.abort();
    let _ = consume_channel.close(200, "OK".into()).await;
    let _ = setup_channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = setup_channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = connection.close(200, "OK".into()).await;

    println!(
        "{}",
        json!({
            "mode": "amqp",
            "run": names.run,
            "subscriptions": m,
            "filter": match options.filter { Filter::None => "none", Filter::Owner => "owner" },
            "writers": options.writers,
            "max_count": options.max_count,
            "tasks": options.tasks,
            "duration_s": round2(window.as_secs_f64()),
            "updates_ok": writes.len(),
            "updates_per_s": round2(writes.len() as f64 / window.as_secs_f64()),
            "updates_failed": failures.values().sum::<u64>(),
            "events_received": total_received,
            "event_messages": event_messages,
            "events_per_s_during_updates": round2(events_in_window as f64 / window.as_secs_f64()),
            "events_per_s_until_drained": round2(total_received as f64 / sustained_window.as_secs_f64().max(1e-3)),
            "drain_s": round2(last_arrival.saturating_duration_since(schedule_end).as_secs_f64()),
            "latency_ms": latency.json(),
            "check": tally.json(),
            "message_order_violations": message_order_violations,
            "cpu_percent": { "load": load_cpu.0, "server": load_cpu.1 },
            "passed": passed,
        })
    );
    Ok(passed)
}
