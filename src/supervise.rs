//! Supervision of the long-running tasks: the pipeline stages, the timers, the connections to
//! Redis and RabbitMQ, and the SQLite writer.
//!
//! Every such task runs under one of two policies. A *restartable* task is rebuilt from its
//! factory when it panics or ends before shutdown, after a back-off that doubles from one
//! second to thirty (and resets once an incarnation has run for a minute): the outbox
//! consumer, the delivery scheduler and the timers keep their durable state in the store, so a
//! fresh incarnation picks up where the last one stopped. A *vital* task owns state that
//! cannot be rebuilt in place (the SQLite writer's connection and queue, the Redis publisher's
//! queue): when it dies, the node says so on `/readyz` and `run` returns an error, so the
//! process exits non-zero and its own supervisor (systemd, Kubernetes) starts a fresh one.
//!
//! `Health` is what `/readyz` shows: each task's state, its restarts and its last failure.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The first wait before a restart; it doubles with each failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An incarnation that ran this long counts as healthy: the next failure waits the least.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// What a supervised task is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Running,
    /// It failed and waits for its back-off before the next incarnation.
    Restarting,
    /// It ended with the shutdown, as it should.
    Stopped,
    /// A vital task died: the process is on its way out.
    Failed,
}

/// One task's health, as `/readyz` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskHealth {
    pub state: TaskState,
    pub restarts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// How long a condition noted by `Health::note` keeps the node `degraded` after its last
/// occurrence.
const CONDITION_LASTS: Duration = Duration::from_secs(30);

/// The health of every supervised task of this node.
#[derive(Debug, Default)]
pub struct Health {
    tasks: Mutex<BTreeMap<&'static str, TaskHealth>>,
    /// Conditions that degrade the node while they recur (e.g. `disk-full`), by when last seen.
    conditions: Mutex<BTreeMap<&'static str, Instant>>,
    /// Cancelled when a vital task dies; `run` then stops the node with an error.
    fatal: CancellationToken,
    /// Why the node must stop.
    fatal_reason: Mutex<Option<String>>,
}

impl Health {
    /// A snapshot of every task's health, by name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, TaskHealth> {
        self.lock().clone()
    }

    /// Whether every task runs (or stopped with the shutdown) and none has failed.
    pub fn all_running(&self) -> bool {
        self.lock()
            .values()
            .all(|t| matches!(t.state, TaskState::Running | TaskState::Stopped))
    }

    /// Notes that a condition occurred now: `/readyz` lists it as degraded until it has not
    /// recurred for 30 s (a full disk is noted by each write it refuses).
    pub fn note(&self, condition: &'static str) {
        self.conditions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(condition, Instant::now());
    }

    /// The conditions noted within the last 30 s.
    pub fn conditions(&self) -> Vec<&'static str> {
        let mut conditions = self.conditions.lock().unwrap_or_else(|e| e.into_inner());
        conditions.retain(|_, at| at.elapsed() < CONDITION_LASTS);
        conditions.keys().copied().collect()
    }

    /// Resolves when a vital task has died.
    pub async fn failed(&self) {
        self.fatal.cancelled().await;
    }

    /// Why the node must stop, once a vital task has died.
    pub fn fatal_reason(&self) -> Option<String> {
        self.fatal_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records that a vital part of the node died: `/readyz` turns 503 and `run` returns.
    pub fn fatal(&self, name: &'static str, reason: String) {
        tracing::error!(task = name, error = %reason, "a vital task stopped; the node stops so that its supervisor can restart it");
        metrics::counter!("baton_task_failures_total", "task" => name).increment(1);
        self.set(name, TaskState::Failed, Some(reason.clone()), false);
        self.fatal_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(format!("{name}: {reason}"));
        self.fatal.cancel();
    }

    fn set(&self, name: &'static str, state: TaskState, error: Option<String>, restarted: bool) {
        let mut tasks = self.lock();
        let entry = tasks.entry(name).or_insert(TaskHealth {
            state,
            restarts: 0,
            last_error: None,
        });
        entry.state = state;
        if restarted {
            entry.restarts += 1;
        }
        if error.is_some() {
            entry.last_error = error;
        }
        let restarts = entry.restarts;
        drop(tasks);
        metrics::gauge!("baton_task_up", "task" => name).set(match state {
            TaskState::Running | TaskState::Stopped => 1.0,
            TaskState::Restarting | TaskState::Failed => 0.0,
        });
        metrics::gauge!("baton_task_restarts", "task" => name).set(f64::from(restarts));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, TaskHealth>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why one incarnation of a task ended early, in words for the log and `/readyz`.
fn describe(ended: std::thread::Result<()>) -> String {
    match ended {
        Ok(()) => "it ended unexpectedly".to_string(),
        Err(panic) => format!("it panicked: {}", panic_message(panic.as_ref())),
    }
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Reports every panic as one error line in the log (with where it happened, not a
/// backtrace unless `RUST_BACKTRACE` asks for one) and counts it in `baton_panics_total`.
/// `baton serve` installs it; the tests install their own tripwire instead.
pub fn log_panics() {
    let default = std::panic::take_hook();
    let backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
    std::panic::set_hook(Box::new(move |info| {
        metrics::counter!("baton_panics_total").increment(1);
        let message = panic_message(info.payload());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(thread = thread.name().unwrap_or("unnamed"), location = %location, panic = %message, "panic (a bug; the task or request it hit is recovered or restarted)");
        if backtrace {
            default(info);
        }
    }));
}

/// The wait before the next incarnation after `failures` failures in a row (1, 2, …).
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// Runs a task built by `make` until `stop`, rebuilding it after each panic or early end.
pub fn restartable<F, Fut>(
    tasks: &TaskTracker,
    health: Arc<Health>,
    name: &'static str,
    stop: CancellationToken,
    mut make: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    health.set(name, TaskState::Running, None, false);
    tasks.spawn(async move {
        let mut failures = 0u32;
        loop {
            let started = Instant::now();
            let ended = AssertUnwindSafe(make()).catch_unwind().await;
            if stop.is_cancelled() {
                health.set(name, TaskState::Stopped, None, false);
                return;
            }
            failures = if started.elapsed() >= HEALTHY_AFTER {
                1
            } else {
                failures + 1
            };
            let why = describe(ended);
            let wait = backoff(failures);
            tracing::error!(task = name, error = %why, retry_in_ms = wait.as_millis() as u64, "a task stopped; restarting it");
            metrics::counter!("baton_task_failures_total", "task" => name).increment(1);
            health.set(name, TaskState::Restarting, Some(why), true);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => {
                    health.set(name, TaskState::Stopped, None, false);
                    return;
                }
            }
            health.set(name, TaskState::Running, None, false);
        }
    });
}

/// Runs a task that cannot be rebuilt in place: if it panics or ends before `stop`, the node
/// is marked failed and `run` stops it.
pub fn vital<Fut>(
    tasks: &TaskTracker,
    health: Arc<Health>,
    name: &'static str,
    stop: CancellationToken,
    task: Fut,
) where
    Fut: Future<Output = ()> + Send + 'static,
{
    health.set(name, TaskState::Running, None, false);
    tasks.spawn(watch_vital(health, name, stop, task));
}

/// The body of `vital`, for tasks spawned elsewhere (the SQLite store spawns the future that
/// resolves when its writer thread ends).
pub async fn watch_vital<Fut>(
    health: Arc<Health>,
    name: &'static str,
    stop: CancellationToken,
    task: Fut,
) where
    Fut: Future<Output = ()> + Send,
{
    health.set(name, TaskState::Running, None, false);
    let ended = AssertUnwindSafe(task).catch_unwind().await;
    if stop.is_cancelled() {
        health.set(name, TaskState::Stopped, None, false);
    } else {
        health.fatal(name, describe(ended));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_its_cap() {
        let cases = [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 30), (40, 30)];
        for (failures, seconds) in cases {
            assert_eq!(
                backoff(failures),
                Duration::from_secs(seconds),
                "{failures}"
            );
        }
    }

    #[test]
    fn panic_messages_are_read_from_both_payload_kinds() {
        let text: Box<dyn std::any::Any + Send> = Box::new("static text");
        let owned: Box<dyn std::any::Any + Send> = Box::new(String::from("formatted 7"));
        let other: Box<dyn std::any::Any + Send> = Box::new(7u8);
        assert_eq!(panic_message(text.as_ref()), "static text");
        assert_eq!(panic_message(owned.as_ref()), "formatted 7");
        assert_eq!(panic_message(other.as_ref()), "a panic without a message");
    }

    #[tokio::test(start_paused = true)]
    async fn a_restartable_task_is_rebuilt_after_a_panic_and_stops_with_the_node() {
        let health = Arc::new(Health::default());
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let (ran, mut runs) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let mut incarnation = 0u32;
        restartable(&tasks, health.clone(), "flaky", stop.clone(), move || {
            incarnation += 1;
            let this = incarnation;
            let ran = ran.clone();
            async move {
                let _ = ran.send(this);
                if this == 1 {
                    panic!("first incarnation fails");
                }
                std::future::pending::<()>().await;
            }
        });
        assert_eq!(runs.recv().await, Some(1));
        assert_eq!(runs.recv().await, Some(2), "rebuilt after the back-off");
        let flaky = health.snapshot()["flaky"].clone();
        assert_eq!(flaky.state, TaskState::Running);
        assert_eq!(flaky.restarts, 1);
        assert!(
            flaky
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("first incarnation fails")),
            "{flaky:?}"
        );
        assert!(!health.fatal.is_cancelled());
        stop.cancel();
        tasks.close();
        // The second incarnation waits forever; stopping the node means dropping it.
        drop(runs);
    }

    #[tokio::test]
    async fn a_vital_task_that_dies_fails_the_node() {
        let health = Arc::new(Health::default());
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        vital(&tasks, health.clone(), "writer", stop.clone(), async {
            panic!("the writer broke");
        });
        tokio::time::timeout(Duration::from_secs(10), health.failed())
            .await
            .expect("the node is marked failed");
        assert!(!health.all_running());
        assert!(
            health
                .fatal_reason()
                .is_some_and(|r| r.contains("writer") && r.contains("the writer broke"))
        );
    }

    #[tokio::test]
    async fn a_vital_task_that_ends_with_the_shutdown_is_stopped_not_failed() {
        let health = Arc::new(Health::default());
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let watched = stop.clone();
        vital(
            &tasks,
            health.clone(),
            "listener",
            stop.clone(),
            async move {
                watched.cancelled().await;
            },
        );
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        assert_eq!(health.snapshot()["listener"].state, TaskState::Stopped);
        assert!(health.fatal_reason().is_none());
    }
}
