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
//! Each runs in four phases — setup, drive, collect, verify — one function each.
//! Only meant for loopback targets: it creates and deletes data on the server it is pointed at.

mod bare_server;
mod hub;
mod tasks;

use std::process::ExitCode;
use std::time::Duration;

use baton_tools::common::cpu::{CpuUse, cores};
use baton_tools::common::token::Admin;
use clap::{Parser, Subcommand};

/// The token `baton-load` mints when given only the JWT secret.
const ADMIN: Admin = Admin {
    subject: "baton-load",
    lifetime: Duration::from_secs(3600),
};

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
    BareServer(bare_server::Options),
    /// Closed-loop Task creates or updates from concurrent workers.
    Tasks(tasks::Options),
    /// Rest-hook subscriptions plus an open-loop update schedule; checks every notification.
    Hub(hub::Options),
}

/// Whether a run met its correctness checks (setup failures are errors instead).
enum Verdict {
    Passed,
    Failed,
}

impl Verdict {
    fn of(passed: bool) -> Verdict {
        if passed {
            Verdict::Passed
        } else {
            Verdict::Failed
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
            Command::BareServer(options) => bare_server::run(&options).await,
            Command::Tasks(options) => tasks::run(&options).await,
            Command::Hub(options) => hub::run(&options).await,
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

/// The report's `cpu` line.
fn cpu_line(cpu: &CpuUse) -> String {
    format!(
        "server {}, baton-load {}, whole machine {} of {}% (steal {}); percent of one core",
        CpuUse::show(cpu.server),
        CpuUse::show(cpu.own),
        CpuUse::show(cpu.machine),
        cores() * 100,
        CpuUse::show(cpu.steal),
    )
}
