//! `baton-fanout`: fan-out benchmarks for the websocket and AMQP channels (BENCHMARKS.md). Run
//! it against a Baton started on its own, throw-away database: it creates Tasks and
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
//! Each runs in four phases — setup, drive, collect, verify — and prints a short report and,
//! as its last line, one JSON object. Only meant for loopback targets.

mod amqp;
mod check;
mod server;
mod websocket;

use std::process::ExitCode;
use std::time::Duration;

use baton_tools::common::cpu::{CpuUse, cores, load_average};
use baton_tools::common::token::Admin;
use clap::{Parser, Subcommand};

/// The token `baton-fanout` mints when given only the JWT secret.
const ADMIN: Admin = Admin {
    subject: "baton-fanout",
    lifetime: Duration::from_secs(2 * 3600),
};

#[derive(Parser)]
#[command(
    name = "baton-fanout",
    about = "Websocket and AMQP fan-out benchmarks for Baton (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bound websocket listeners: memory per idle socket, then latency under open-loop updates.
    Websocket(websocket::Options),
    /// Message-channel subscriptions sharing one RabbitMQ queue under closed-loop updates.
    Amqp(amqp::Options),
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
            Command::Websocket(options) => websocket::run(&options).await,
            Command::Amqp(options) => amqp::run(&options).await,
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

/// The report's `cpu` line.
fn cpu_line(cpu: &CpuUse) -> String {
    format!(
        "server {}, baton-fanout {} (percent of one core; the machine has {}); load average {}",
        CpuUse::show(cpu.server),
        CpuUse::show(cpu.own),
        cores(),
        load_average()
    )
}
