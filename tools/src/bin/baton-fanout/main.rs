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

use baton_tools::common::run_to_exit;
use baton_tools::common::token::Admin;
use clap::Parser;

/// How the tool names itself in its reports (and the server's logs, as the token's subject).
const NAME: &str = "baton-fanout";

/// The token `baton-fanout` mints when given only the JWT secret.
const ADMIN: Admin = Admin {
    subject: NAME,
    lifetime: Duration::from_secs(2 * 3600),
};

#[derive(Parser)]
#[command(
    name = "baton-fanout",
    about = "Websocket and AMQP fan-out benchmarks for Baton (loopback only)"
)]
enum Command {
    /// Bound websocket listeners: memory per idle socket, then latency under open-loop updates.
    Websocket(websocket::Options),
    /// Message-channel subscriptions sharing one RabbitMQ queue under closed-loop updates.
    Amqp(amqp::Options),
}

/// Exit 0 when the run's checks passed, 1 when one failed, 2 when it could not run.
fn main() -> ExitCode {
    let command = Command::parse();
    run_to_exit(async {
        match command {
            Command::Websocket(options) => websocket::run(&options).await,
            Command::Amqp(options) => amqp::run(&options).await,
        }
    })
}
