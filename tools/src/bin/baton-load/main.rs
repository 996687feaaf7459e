//! `baton-load`: load generator and measuring receiver for Baton's benchmarks (BENCHMARKS.md).
//!
//! Four subcommands, each printing a short report and, as its last line, one JSON object:
//!
//! - `bare-server`: an axum handler that echoes Task creates and updates without storing
//!   anything, so the HTTP stack's ceiling can be measured with the same client and request.
//! - `tasks`: closed-loop load (N workers, one keep-alive HTTP/1.1 client) of Task creates or
//!   updates, with throughput, latency percentiles and errors by status.
//! - `search`: seeds a work-list data set of N Tasks through the API, then runs issue 16's
//!   work-list searches (a closed-loop mix, or each alone from one client) and reports each
//!   query's rate and latency; every answer is checked against its query.
//! - `hub`: N rest-hook subscriptions received by a local receiver, an open-loop schedule of
//!   Task updates, and for every update the delay until its notification arrived; afterwards it
//!   checks that every write was notified exactly once with contiguous event numbers.
//!
//! Each runs in four phases — setup, drive, collect, verify — one function each.
//! Only meant for loopback targets: it creates and deletes data on the server it is pointed at.

mod bare_server;
mod hub;
mod search;
mod tasks;

use std::process::ExitCode;
use std::time::Duration;

use baton_tools::common::run_to_exit;
use baton_tools::common::token::Admin;
use clap::Parser;

/// How the tool names itself in its reports (and the server's logs, as the token's subject).
const NAME: &str = "baton-load";

/// The token `baton-load` mints when given only the JWT secret.
const ADMIN: Admin = Admin {
    subject: NAME,
    lifetime: Duration::from_secs(3600),
};

#[derive(Parser)]
#[command(
    name = "baton-load",
    version,
    about = "Load generator and notification receiver for Baton benchmarks (loopback only)"
)]
enum Command {
    /// Echo server for POST /fhir/Task and PUT /fhir/Task/{id}: the ceiling without storage.
    BareServer(bare_server::Options),
    /// Closed-loop Task creates or updates from concurrent workers.
    Tasks(tasks::Options),
    /// Work-list searches on a seeded data set: rate and latency per query, answers checked.
    Search(search::Options),
    /// Rest-hook subscriptions plus an open-loop update schedule; checks every notification.
    Hub(hub::Options),
}

/// Exit 0 when the run's checks passed, 1 when one failed, 2 when it could not run.
fn main() -> ExitCode {
    let command = Command::parse();
    run_to_exit(async {
        match command {
            Command::BareServer(options) => bare_server::run(&options).await,
            Command::Tasks(options) => tasks::run(&options).await,
            Command::Search(options) => search::run(&options).await,
            Command::Hub(options) => hub::run(&options).await,
        }
    })
}
