//! The `baton` command: `serve`, `token` and `check-config`. All the work is in the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use baton::auth::{Authenticator, Role, resolve_secret};
use baton::config::{Config, LogFormat};

// mimalloc, so that memory goes back to the system after a burst of large requests
// (searches hold megabytes each): run with MIMALLOC_PURGE_DELAY=0 (the Dockerfile sets it),
// 32 parallel 4 MB searches leave 50 MB resident instead of glibc's 163 MB. Without that
// setting it keeps about as much as glibc. BENCHMARKS.md, "Memory after a burst".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "baton",
    version,
    about = "FHIR workflow Task server and Subscription hub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Configuration file (default: config/baton.toml if present).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a bearer token signed with the configured key. Its `sub` names the role and the
    /// FHIR user (`practitioner:Practitioner/123`; `admin-cli` without a FHIR user), so tokens
    /// for different roles are different owners; it carries no `iss` (the local issuer).
    Token {
        /// admin, practitioner or auditor.
        #[arg(long)]
        role: String,
        /// The FHIR user behind the token, e.g. Practitioner/123 (required for practitioners).
        #[arg(long = "fhir-user")]
        fhir_user: Option<String>,
        /// Lifetime in seconds (default: auth.default_token_ttl_seconds).
        #[arg(long)]
        ttl: Option<u64>,
        /// A performer type the practitioner works as, `system|code`; repeatable.
        #[arg(long = "performer-type")]
        performer_types: Vec<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Load and validate the configuration, then print it (secrets hidden).
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line that says what to change; no backtrace for an operator to wade through.
            eprintln!("baton: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let file = baton::config::file_used(config.as_deref());
            let config = Config::load(config.as_deref())?;
            init_logging(config.log_format);
            baton::supervise::log_panics();
            log_start_up(&config, file.as_deref());
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(serve(config))
        }
        Command::Token {
            role,
            fhir_user,
            ttl,
            performer_types,
            config,
        } => {
            let config = Config::load(config.as_deref())?;
            let role = Role::parse(&role).with_context(|| {
                format!("--role must be admin, practitioner or auditor, not '{role}'")
            })?;
            if role == Role::Practitioner && fhir_user.is_none() {
                anyhow::bail!(
                    "a practitioner token needs --fhir-user, e.g. --fhir-user Practitioner/123"
                );
            }
            let (secret, _) = resolve_secret(config.jwt_secret.as_deref(), &config.data_dir)
                .context("reading the JWT secret")?;
            let auth = Authenticator::new(&secret, 0, &config.auth.performer_types_claim);
            let ttl = ttl.unwrap_or(config.auth.default_token_ttl_seconds);
            let token = auth.issue(role, fhir_user.as_deref(), &performer_types, ttl)?;
            println!("{token}");
            Ok(())
        }
        Command::CheckConfig { config } => {
            let mut config = Config::load(config.as_deref())?;
            if config.jwt_secret.is_some() {
                config.jwt_secret = Some("****".into());
            } else {
                eprintln!(
                    "note: BATON_JWT_SECRET is not set; serve will use the development secret in {}",
                    config.data_dir.join("jwt-secret").display()
                );
            }
            config.amqp_url = config.amqp_url.as_deref().map(baton::config::redact_url);
            config.redis_url = config.redis_url.as_deref().map(baton::config::redact_url);
            config.database_url = config
                .database_url
                .as_deref()
                .map(baton::config::redact_url);
            println!("configuration is valid:\n{}", as_json(&config));
            Ok(())
        }
    }
}

/// What an operator checks first in the log: which build, which configuration file, and any
/// relaxed endpoint policy (a warning: it lets subscriptions post to internal addresses).
fn log_start_up(config: &Config, file: Option<&std::path::Path>) {
    let file = file.map_or_else(
        || "none (embedded defaults and environment)".to_string(),
        |f| f.display().to_string(),
    );
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config_file = %file,
        "starting Baton"
    );
    if config.allow_private_endpoints {
        tracing::warn!(
            "allow_private_endpoints is on: rest-hook subscriptions may post to loopback, private and link-local addresses (BATON_ALLOW_PRIVATE_ENDPOINTS)"
        );
    }
    if config.allow_http_endpoints {
        tracing::warn!(
            "allow_http_endpoints is on: rest-hook subscriptions may post over plain http, unencrypted (BATON_ALLOW_HTTP_ENDPOINTS)"
        );
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let addr = config.listen_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (BATON_LISTEN)"))?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        signal.cancel();
    });
    baton::run(config, listener, shutdown)
        .await
        .map_err(|e| anyhow::anyhow!(baton::error::error_chain(&e)))
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    use std::io::IsTerminal;
    // Colour only for a person at a terminal; files and log shippers get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn as_json(config: &Config) -> String {
    serde_json::to_string_pretty(config).unwrap_or_default()
}
