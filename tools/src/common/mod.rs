//! The parts every tool needs: where the server is and as whom to call it (`target`, `token`,
//! `api`), what it sends back (`fhir`, `notification` — the one reader of notification
//! Bundles), how to hold a socket or a queue open for them (`websocket`, `amqp`), how to drive
//! and time a load (`schedule`, `percentiles`, `cpu`), and a few small helpers below.

pub mod amqp;
pub mod api;
pub mod cpu;
pub mod fhir;
pub mod notification;
pub mod percentiles;
pub mod schedule;
pub mod target;
pub mod token;
pub mod websocket;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The tools' async runtime; when it cannot start, the error is printed and the exit code is 2.
pub fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new().map_err(|e| {
        eprintln!("error: starting the async runtime: {e}");
        ExitCode::from(2)
    })
}

/// Runs a load subcommand to its exit code: 0 when its checks passed, 1 when one failed, 2
/// when it could not run (the error is printed).
pub fn run_to_exit(run: impl Future<Output = anyhow::Result<bool>>) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(run) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Each id's position in `ids`: which of a run's subscriptions a notification names.
pub fn positions(ids: &[String]) -> HashMap<String, usize> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i))
        .collect()
}

/// Parses `20s`, `500ms`, `2m` or a bare number of seconds (every duration flag of the tools).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
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

/// The first characters of a response body, for error messages and reports.
pub fn snippet(body: &str) -> String {
    body.chars().take(300).collect()
}

/// Locks a mutex whose holder may have panicked: the tools' shared state stays readable.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `make(i)` for i in 0..n with at most `limit` at a time; results in index order. The
/// first failure fails the whole (set-up) step.
pub async fn run_bounded<T, F, Fut>(n: usize, limit: usize, make: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
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

/// Polls `done` every `every` until it holds or `timeout` passes; returns whether it held.
pub async fn poll_until(
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> bool {
    let started = Instant::now();
    loop {
        if done() {
            return true;
        }
        if started.elapsed() >= timeout {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases: [(&str, Option<Duration>); 7] = [
            ("500ms", Some(Duration::from_millis(500))),
            ("2m", Some(Duration::from_secs(120))),
            ("3", Some(Duration::from_secs(3))),
            ("1.5s", Some(Duration::from_millis(1500))),
            (" 20s ", Some(Duration::from_secs(20))),
            ("3h", None),
            ("s", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text).ok(), expected, "{text}");
        }
    }

    #[tokio::test]
    async fn bounded_runs_keep_index_order_and_fail_on_the_first_error() {
        let squares = run_bounded(5, 2, |i| async move { Ok(i * i) })
            .await
            .unwrap();
        assert_eq!(squares, vec![0, 1, 4, 9, 16]);
        let failed = run_bounded(3, 2, |i| async move {
            anyhow::ensure!(i != 1, "number {i}");
            Ok(i)
        })
        .await;
        assert!(failed.is_err());
    }
}
