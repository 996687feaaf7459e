//! The write load: several writers, each creating Tasks (PUT to a new id, POST, or a
//! transaction Bundle creating a coordination Task and its sub-tasks) and updating its own
//! Tasks (PUT or JSON Patch), paced to a total rate. Each write carries a unique marker
//! in `description`; each one the server acknowledges (2xx with an ETag) is remembered with
//! its Task, version and marker, so the campaign can later check it is in the store exactly.
//! A write that fails is not retried as such: the writer goes on with a new one, as a client
//! that gave up would, and the store's state after recovery decides what was committed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use baton_tools::common::fhir::{FHIR_JSON, etag_version, task_id};
use baton_tools::common::{lock, snippet};

use crate::fhir::{is_operation_outcome, run_task};
use crate::verify::{AckedWrite, TRANSACTION_ENTRIES, transaction_entry_marker};

#[derive(Clone, Copy)]
pub struct LoadShape {
    pub writers: usize,
    /// Writes per second over all writers; 0 means each writer sends its next write as soon as
    /// the previous one is answered.
    pub rate: f64,
    /// Share of writes that create a Task (the rest update one).
    pub create_share: f64,
    /// Per-request timeout: a write not answered by then counts as "timeout".
    pub timeout: Duration,
}

/// How a write that was not acknowledged was answered, and one example of it.
#[derive(Debug, Default, Clone)]
pub struct FailureKind {
    pub count: u64,
    pub first_body: String,
    pub first_at: Option<Instant>,
    pub last_at: Option<Instant>,
    /// The slowest answer of this kind (hangs show here).
    pub slowest: Duration,
}

/// Shared between the writers and the campaign while the load runs.
#[derive(Default)]
pub struct LoadLog {
    pub acked: Mutex<Vec<AckedWrite>>,
    /// When each acknowledgement came, in order per writer (merged unsorted).
    pub acked_at: Mutex<Vec<Instant>>,
    pub failures: Mutex<BTreeMap<String, FailureKind>>,
    /// Every failure with its time, for counts within a fault's window.
    pub failure_times: Mutex<Vec<(Instant, String)>>,
    pub creates: AtomicU64,
    pub updates: AtomicU64,
    /// Task writes sent, answered or not (a transaction Bundle counts its entries).
    pub attempts: AtomicU64,
    /// The marker of every transaction Bundle sent, answered or not: each must be in the
    /// store whole or not at all.
    pub transactions: Mutex<Vec<String>>,
}

impl LoadLog {
    pub fn acknowledged(&self) -> usize {
        lock(&self.acked).len()
    }

    /// The first acknowledgement at or after `since`.
    pub fn first_ack_after(&self, since: Instant) -> Option<Instant> {
        lock(&self.acked_at)
            .iter()
            .copied()
            .filter(|at| *at >= since)
            .min()
    }

    /// Failures answered between `from` and `to`, by kind.
    pub fn failures_between(&self, from: Instant, to: Instant) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for (at, kind) in lock(&self.failure_times).iter() {
            if *at >= from && *at <= to {
                *counts.entry(kind.clone()).or_default() += 1;
            }
        }
        counts
    }

    /// Acknowledgements between `from` and `to`.
    pub fn acks_between(&self, from: Instant, to: Instant) -> usize {
        lock(&self.acked_at)
            .iter()
            .filter(|at| **at >= from && **at <= to)
            .count()
    }

    fn fail(&self, kind: String, body: &str, elapsed: Duration) {
        let now = Instant::now();
        lock(&self.failure_times).push((now, kind.clone()));
        let mut failures = lock(&self.failures);
        let entry = failures.entry(kind).or_default();
        entry.count += 1;
        if entry.first_at.is_none() {
            entry.first_at = Some(now);
            entry.first_body = snippet(body);
        }
        entry.last_at = Some(now);
        entry.slowest = entry.slowest.max(elapsed);
    }
}

pub struct Load {
    stop: CancellationToken,
    writers: Vec<tokio::task::JoinHandle<()>>,
    pub log: Arc<LoadLog>,
}

impl Load {
    /// Starts the writers against `bases` (round-robin per write).
    pub fn start(
        client: reqwest::Client,
        bearer: String,
        bases: Vec<String>,
        run: String,
        shape: LoadShape,
    ) -> Load {
        let stop = CancellationToken::new();
        let log = Arc::new(LoadLog::default());
        let writers = (0..shape.writers.max(1))
            .map(|w| {
                let writer = Writer {
                    id: w,
                    client: client.clone(),
                    bearer: bearer.clone(),
                    bases: bases.clone(),
                    run: run.clone(),
                    shape,
                    log: log.clone(),
                    tasks: Vec::new(),
                };
                tokio::spawn(writer.run(stop.clone()))
            })
            .collect();
        Load { stop, writers, log }
    }

    /// Stops the writers and waits for their last writes to be answered.
    pub async fn stop(self) -> Arc<LoadLog> {
        self.stop.cancel();
        for writer in self.writers {
            let _ = writer.await;
        }
        self.log
    }
}

struct Writer {
    id: usize,
    client: reqwest::Client,
    bearer: String,
    bases: Vec<String>,
    run: String,
    shape: LoadShape,
    log: Arc<LoadLog>,
    /// Tasks this writer created and saw acknowledged; only it updates them.
    tasks: Vec<String>,
}

enum Write {
    PutCreate(String),
    PostCreate,
    /// A transaction Bundle: a coordination Task and its sub-tasks (`partOf` by `urn:uuid`).
    Transaction,
    PutUpdate(String),
    Patch(String),
}

impl Writer {
    async fn run(mut self, stop: CancellationToken) {
        let period = (self.shape.rate > 0.0)
            .then(|| Duration::from_secs_f64(self.shape.writers as f64 / self.shape.rate));
        let mut pace = period.map(|p| {
            let mut interval = tokio::time::interval(p);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        let mut k = 0u64;
        while !stop.is_cancelled() {
            if let Some(pace) = pace.as_mut() {
                tokio::select! {
                    _ = pace.tick() => {}
                    () = stop.cancelled() => break,
                }
            }
            let base = self.bases[(self.id + k as usize) % self.bases.len()].clone();
            let acked = self.write_once(&base, k).await;
            k += 1;
            if !acked && pace.is_none() {
                // Closed loop against a node that is down: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn choose(&self, k: u64) -> Write {
        let mut rng = rand::rng();
        if self.tasks.is_empty() || rng.random_bool(self.shape.create_share.clamp(0.0, 1.0)) {
            match rng.random_range(0..10) {
                0..=4 => Write::PutCreate(format!("f-{}-{}-{k}", self.run, self.id)),
                5..=8 => Write::PostCreate,
                _ => Write::Transaction,
            }
        } else {
            let task = self.tasks[rng.random_range(0..self.tasks.len())].clone();
            if rng.random_bool(0.5) {
                Write::PutUpdate(task)
            } else {
                Write::Patch(task)
            }
        }
    }

    /// Sends one write; returns whether it was acknowledged.
    async fn write_once(&mut self, base: &str, k: u64) -> bool {
        let marker = format!("{}:{}:{k}", self.run, self.id);
        let owner = format!("Practitioner/fault-{}", self.id % 3);
        let write = self.choose(k);
        if matches!(write, Write::Transaction) {
            return self.transaction_once(base, marker, &owner).await;
        }
        let (request, known_id, creates) = match &write {
            Write::PutCreate(id) | Write::PutUpdate(id) => (
                self.client
                    .put(format!("{base}/Task/{id}"))
                    .header(reqwest::header::CONTENT_TYPE, FHIR_JSON)
                    .body(run_task(Some(id), &self.run, &owner, &marker).to_string()),
                Some(id.clone()),
                matches!(write, Write::PutCreate(_)),
            ),
            Write::Transaction => unreachable!("sent by transaction_once"),
            Write::PostCreate => (
                self.client
                    .post(format!("{base}/Task"))
                    .header(reqwest::header::CONTENT_TYPE, FHIR_JSON)
                    .body(run_task(None, &self.run, &owner, &marker).to_string()),
                None,
                true,
            ),
            Write::Patch(id) => (
                self.client
                    .patch(format!("{base}/Task/{id}"))
                    .header(reqwest::header::CONTENT_TYPE, "application/json-patch+json")
                    .body(
                        json!([{ "op": "replace", "path": "/description", "value": marker }])
                            .to_string(),
                    ),
                Some(id.clone()),
                false,
            ),
        };
        self.log.attempts.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let sent = request
            .header(reqwest::header::AUTHORIZATION, &self.bearer)
            .header("prefer", "return=minimal")
            .timeout(self.shape.timeout)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                self.log.fail(no_answer(&e).into(), "", started.elapsed());
                return false;
            }
        };
        let status = response.status();
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(etag_version);
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match response.bytes().await {
            Ok(body) => body,
            Err(_) => {
                self.log
                    .fail("no answer: body cut off".into(), "", started.elapsed());
                return false;
            }
        };
        let elapsed = started.elapsed();
        if !status.is_success() {
            let outcome = if is_operation_outcome(&body) {
                "OperationOutcome"
            } else if body.is_empty() {
                "empty body"
            } else {
                "not an OperationOutcome"
            };
            self.log.fail(
                format!("HTTP {} ({outcome})", status.as_u16()),
                &String::from_utf8_lossy(&body),
                elapsed,
            );
            return false;
        }
        // `Location: …/Task/{id}/_history/{version}`
        let id = known_id.or_else(|| Some(task_id(location.as_deref()?)?.to_string()));
        let (Some(id), Some(version)) = (id, etag) else {
            self.log.fail(
                format!("HTTP {} without ETag or Location", status.as_u16()),
                "",
                elapsed,
            );
            return false;
        };
        if creates {
            self.log.creates.fetch_add(1, Ordering::Relaxed);
            self.tasks.push(id.clone());
        } else {
            self.log.updates.fetch_add(1, Ordering::Relaxed);
        }
        lock(&self.log.acked).push(AckedWrite {
            task: id,
            version,
            marker,
        });
        lock(&self.log.acked_at).push(Instant::now());
        true
    }

    /// Sends one transaction Bundle creating `TRANSACTION_ENTRIES` Tasks (the first the
    /// coordination Task, the others `partOf` it by `urn:uuid`); returns whether it was
    /// acknowledged, with every entry's location and ETag.
    async fn transaction_once(&mut self, base: &str, marker: String, owner: &str) -> bool {
        let urn = |entry: usize| {
            format!("urn:uuid:{}", uuid::Uuid::new_v4().simple()) + &format!("-{entry}")
        };
        let parent = urn(0);
        let entries: Vec<serde_json::Value> = (0..TRANSACTION_ENTRIES)
            .map(|entry| {
                let mut task = run_task(
                    None,
                    &self.run,
                    owner,
                    &transaction_entry_marker(&marker, entry),
                );
                let full_url = if entry == 0 {
                    parent.clone()
                } else {
                    urn(entry)
                };
                if entry > 0 {
                    task["partOf"] = json!([{ "reference": parent }]);
                }
                json!({
                    "fullUrl": full_url,
                    "resource": task,
                    "request": { "method": "POST", "url": "Task" },
                })
            })
            .collect();
        let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries });
        lock(&self.log.transactions).push(marker.clone());
        // Counted in Task writes, as its acknowledgements are (one per entry).
        self.log
            .attempts
            .fetch_add(TRANSACTION_ENTRIES as u64, Ordering::Relaxed);
        let started = Instant::now();
        let sent = self
            .client
            .post(base)
            .header(reqwest::header::CONTENT_TYPE, FHIR_JSON)
            .header(reqwest::header::AUTHORIZATION, &self.bearer)
            .timeout(self.shape.timeout)
            .body(bundle.to_string())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                self.log.fail(no_answer(&e).into(), "", started.elapsed());
                return false;
            }
        };
        let status = response.status();
        let body = response.bytes().await.unwrap_or_default();
        let elapsed = started.elapsed();
        if !status.is_success() {
            let outcome = if is_operation_outcome(&body) {
                "OperationOutcome"
            } else {
                "not an OperationOutcome"
            };
            self.log.fail(
                format!("transaction HTTP {} ({outcome})", status.as_u16()),
                &String::from_utf8_lossy(&body),
                elapsed,
            );
            return false;
        }
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let written: Option<Vec<(String, u32)>> = answer["entry"].as_array().map(|entries| {
            entries
                .iter()
                .filter_map(|e| {
                    let id = task_id(e["response"]["location"].as_str()?)?.to_string();
                    let version = etag_version(e["response"]["etag"].as_str()?)?;
                    Some((id, version))
                })
                .collect()
        });
        let Some(written) = written.filter(|w| w.len() == TRANSACTION_ENTRIES) else {
            self.log.fail(
                "transaction answered without every entry's location and ETag".into(),
                &String::from_utf8_lossy(&body),
                elapsed,
            );
            return false;
        };
        let now = Instant::now();
        for (entry, (id, version)) in written.into_iter().enumerate() {
            self.log.creates.fetch_add(1, Ordering::Relaxed);
            self.tasks.push(id.clone());
            lock(&self.log.acked).push(AckedWrite {
                task: id,
                version,
                marker: transaction_entry_marker(&marker, entry),
            });
            lock(&self.log.acked_at).push(now);
        }
        true
    }
}

/// How a write that got no answer failed, in the words of the report.
fn no_answer(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "no answer: timeout"
    } else if error.is_connect() {
        "no answer: connection refused"
    } else {
        "no answer: connection closed"
    }
}
