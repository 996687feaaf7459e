//! `baton-fault`: the fault campaign (RELIABILITY.md).
//!
//! It starts the release `baton` binary as child processes on loopback ports, runs a mixed
//! load against them — Task creates and updates from several writers, a rest-hook subscriber
//! behind an endpoint that sometimes fails, a websocket listener that reconnects and fills gaps
//! through `$events`, an AMQP subscriber consuming from a queue bound to an exchange the
//! campaign declares — and injects one kind of fault at random moments:
//!
//! - `kill`: `kill -9` of a SQLite node, N times, each followed by a restart;
//! - `rabbitmq`: `rabbitmqctl stop_app` / `start_app` of the local broker;
//! - `postgres`: a restart of the local PostgreSQL under a cluster of nodes (plus Redis);
//! - `disk-full`: the SQLite data directory on a small tmpfs, filled, then freed;
//! - `flap`: rest-hook endpoints that refuse, fail, hang, answer slowly or reset, on and off;
//! - `all`: each of the above in turn, within a total time bound.
//!
//! Afterwards it drains and checks: every acknowledged write is in the store with its content,
//! every committed change was numbered once and reached every rest-hook and AMQP subscriber
//! (websocket: live, or else through `$events`), in order, without gaps; nodes exit cleanly on
//! SIGTERM and never panicked. It prints a table per scenario and, as the last line, a JSON
//! object, and exits 0 when everything held, 1 when a check failed, 2 when a scenario could not
//! run.
//!
//! Each scenario is its phases: setup (nodes, subscribers, load), drive (its faults), collect
//! (stop the load, drain) and verify (the checks of verify.rs, a clean shutdown, no panics).
//!
//! `rabbitmq` and `postgres` disturb every other user of the machine's broker and database;
//! `disk-full` mounts a tmpfs (root). None of this runs inside `cargo nextest run`, which runs
//! only the verdict's unit tests. `cargo build --release --bin baton --bin baton-fault`, then
//! `target/release/baton-fault <scenario> [options]`.

mod api;
mod campaign;
mod fhir;
mod listeners;
mod load;
mod node;
mod receiver;
mod report;
mod scenarios;
mod subscribers;
mod verify;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use baton_tools::common::{parse_duration, runtime};
use clap::Parser;
use serde_json::json;

use campaign::Common;
use report::Report;
use scenarios::{DiskOptions, FlapOptions, KillOptions, PostgresOptions, RabbitOptions};

#[derive(Parser)]
#[command(
    name = "baton-fault",
    about = "Fault campaign for Baton: kills, broker and database restarts, a full disk and flapping endpoints under mixed load (loopback only)"
)]
enum Command {
    /// kill -9 a SQLite node N times under mixed load, restarting it each time.
    Kill {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        options: KillOptions,
    },
    /// Stop and start RabbitMQ (rabbitmqctl) under mixed load. Disturbs other broker users.
    Rabbitmq {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        options: RabbitOptions,
    },
    /// Restart PostgreSQL under a cluster of nodes. Disturbs other database users.
    Postgres {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        options: PostgresOptions,
    },
    /// Fill the tmpfs under a SQLite node's data, then free it (needs root to mount).
    DiskFull {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        options: DiskOptions,
    },
    /// Flap rest-hook endpoints (refuse, 500, Retry-After, hang, slow, reset).
    Flap {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        options: FlapOptions,
    },
    /// Every scenario in turn: kill, flap, disk-full, rabbitmq, postgres.
    All {
        #[command(flatten)]
        common: Common,
        /// Bound on the whole campaign; scenarios that would start past it are not run.
        #[arg(long, default_value = "40m", value_parser = parse_duration)]
        total: Duration,
        #[command(flatten)]
        kill: KillOptions,
        #[command(flatten)]
        flap: FlapOptions,
        #[command(flatten)]
        disk: DiskOptions,
        #[command(flatten)]
        rabbitmq: RabbitOptions,
        #[command(flatten)]
        postgres: PostgresOptions,
    },
}

/// Bound on one scenario on its own: its faults, the drain and the checks.
const SCENARIO_BOUND: Duration = Duration::from_secs(15 * 60);

fn main() -> ExitCode {
    let command = Command::parse();
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let reports = runtime.block_on(async {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(e) => {
                    eprintln!("error: listening for SIGTERM: {e}");
                    return vec![Report::incomplete(
                        "start",
                        format!("listening for SIGTERM: {e}"),
                    )];
                }
            };
        // On SIGINT or SIGTERM (e.g. from `timeout`) the scenario is dropped, which kills its
        // nodes, starts the broker again if it was stopped, stops a private PostgreSQL and
        // unmounts the tmpfs.
        tokio::select! {
            reports = run(command) => reports,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("interrupted");
                vec![Report::incomplete("interrupted", "interrupted (SIGINT)".into())]
            }
            _ = terminate.recv() => {
                eprintln!("terminated");
                vec![Report::incomplete("terminated", "terminated (SIGTERM)".into())]
            }
        }
    });
    let passed = reports.iter().all(Report::passed);
    let incomplete = reports.iter().any(|r| !r.complete);
    println!();
    for report in &reports {
        println!(
            "{:<10} {}",
            report.scenario,
            if report.passed() { "PASS" } else { "FAIL" }
        );
    }
    println!(
        "{}",
        json!({
            "passed": passed,
            "scenarios": reports.iter().map(Report::json).collect::<Vec<_>>(),
        })
    );
    runtime.shutdown_timeout(Duration::from_secs(5));
    match (passed, incomplete) {
        (true, _) => ExitCode::SUCCESS,
        (false, false) => ExitCode::from(1),
        (false, true) => ExitCode::from(2),
    }
}

async fn run(command: Command) -> Vec<Report> {
    match command {
        Command::Kill { common, options } => {
            vec![
                bounded(
                    "kill",
                    SCENARIO_BOUND,
                    &common,
                    scenarios::kill(&common, &options),
                )
                .await,
            ]
        }
        Command::Rabbitmq { common, options } => vec![
            bounded(
                "rabbitmq",
                SCENARIO_BOUND,
                &common,
                scenarios::rabbitmq(&common, &options),
            )
            .await,
        ],
        Command::Postgres { common, options } => vec![
            bounded(
                "postgres",
                SCENARIO_BOUND,
                &common,
                scenarios::postgres(&common, &options),
            )
            .await,
        ],
        Command::DiskFull { common, options } => vec![
            bounded(
                "disk-full",
                SCENARIO_BOUND,
                &common,
                scenarios::disk_full(&common, &options),
            )
            .await,
        ],
        Command::Flap { common, options } => {
            vec![
                bounded(
                    "flap",
                    SCENARIO_BOUND,
                    &common,
                    scenarios::flap(&common, &options),
                )
                .await,
            ]
        }
        Command::All {
            common,
            total,
            kill,
            flap,
            disk,
            rabbitmq,
            postgres,
        } => {
            let started = Instant::now();
            let mut reports = Vec::new();
            for name in ["kill", "flap", "disk-full", "rabbitmq", "postgres"] {
                let left = total.saturating_sub(started.elapsed());
                if left < Duration::from_secs(60) {
                    reports.push(Report::incomplete(
                        name,
                        format!(
                            "the campaign's bound of {:.0} s was reached",
                            total.as_secs_f64()
                        ),
                    ));
                    continue;
                }
                let bound = left.min(SCENARIO_BOUND);
                let report = match name {
                    "kill" => bounded(name, bound, &common, scenarios::kill(&common, &kill)).await,
                    "flap" => bounded(name, bound, &common, scenarios::flap(&common, &flap)).await,
                    "disk-full" => {
                        bounded(name, bound, &common, scenarios::disk_full(&common, &disk)).await
                    }
                    "rabbitmq" => {
                        bounded(
                            name,
                            bound,
                            &common,
                            scenarios::rabbitmq(&common, &rabbitmq),
                        )
                        .await
                    }
                    _ => {
                        bounded(
                            name,
                            bound,
                            &common,
                            scenarios::postgres(&common, &postgres),
                        )
                        .await
                    }
                };
                reports.push(report);
            }
            reports
        }
    }
}

/// Runs one scenario within `bound`, prints its report and removes its run directory when it
/// passed (unless `--keep`).
async fn bounded(
    name: &str,
    bound: Duration,
    common: &Common,
    scenario: impl std::future::Future<Output = anyhow::Result<Report>>,
) -> Report {
    println!(
        "baton-fault {name}: starting (bound {:.0} s)",
        bound.as_secs_f64()
    );
    let report = match tokio::time::timeout(bound, scenario).await {
        Ok(Ok(report)) => report,
        Ok(Err(e)) => Report::incomplete(name, format!("{e:#}")),
        Err(_) => Report::incomplete(
            name,
            format!(
                "did not finish within its bound of {:.0} s",
                bound.as_secs_f64()
            ),
        ),
    };
    report.print();
    if report.passed() && !common.keep && !report.run_dir.as_os_str().is_empty() {
        let _ = std::fs::remove_dir_all(&report.run_dir);
    }
    report
}
