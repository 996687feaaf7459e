//! Typed, layered configuration: embedded defaults, then a TOML file (`config/baton.toml` or
//! `--config FILE`), then `BATON_*` environment variables. `validate` runs at start-up and
//! fails with a message that names the setting to change.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The file read when no `--config` is given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "config/baton.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server binds, `host:port` (`BATON_LISTEN`).
    pub listen: String,
    /// Base URL used in `fullUrl`, `Location` and references (`BATON_PUBLIC_URL`).
    /// Defaults to `http://<listen>/fhir`.
    pub public_url: Option<String>,
    /// Directory for the embedded database and the generated development JWT secret.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` (default `sqlite://<data_dir>/baton.db`) or `postgres://…`.
    pub database_url: Option<String>,
    /// HS256 key for bearer tokens (`BATON_JWT_SECRET`). When unset, see `auth::resolve_secret`.
    pub jwt_secret: Option<String>,
    /// RabbitMQ broker for the AMQP channel, with credentials (`BATON_AMQP_URL`).
    pub amqp_url: Option<String>,
    /// Redis for cluster signalling (`BATON_REDIS_URL`).
    pub redis_url: Option<String>,
    /// Let rest-hook endpoints resolve to loopback, private or link-local addresses.
    pub allow_private_endpoints: bool,
    /// Let rest-hook endpoints use plain `http://`.
    pub allow_http_endpoints: bool,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// `text` or `json` log lines.
    pub log_format: LogFormat,
    /// How long in-flight requests may take to finish after a shutdown signal, in seconds.
    pub shutdown_grace_seconds: u64,
    /// Extra SubscriptionTopic definitions (`*.json`) besides the built-in ones.
    pub topics_dir: Option<PathBuf>,
    /// How often the hub looks for Tasks whose due date passed (`task-overdue`), in seconds.
    pub overdue_check_seconds: u64,
    pub auth: AuthConfig,
    pub search: SearchConfig,
    pub store: StoreConfig,
    pub hub: HubConfig,
    pub delivery: DeliveryConfig,
    pub websocket: WebSocketConfig,
    pub cluster: ClusterConfig,
    pub limits: LimitsConfig,
    pub cors: CorsConfig,
    pub http: HttpConfig,
    pub audit: AuditConfig,
    pub telemetry: TelemetryConfig,
}

/// The audit trail (`AuditEvent`s, see `crate::audit`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Whether Baton records AuditEvents at all. Off only to measure what auditing costs.
    pub enabled: bool,
    /// Whether reads, searches and history requests are audited too (writes, Subscription
    /// changes and refusals always are while `enabled`).
    pub reads: bool,
    /// Whether each rest-hook and AMQP delivery attempt leaves an AuditEvent (the delivery
    /// ledger) while `enabled`. Off, the console's ledger and a practitioner's ledger search
    /// are empty; `$status` still says why a subscription failed.
    pub delivery_attempts: bool,
    /// How long the node's audit queue gathers AuditEvents (of reads, searches, refusals and
    /// Subscription changes; a delivery attempt's is written with its result) before writing them as one batch, in
    /// milliseconds; 0 writes whatever gathered during the previous write. Every write ends
    /// with a commit, and each commit makes every search connection drop its map of the
    /// database file and fault its pages in again, so a longer window makes audited searches
    /// cheaper; a crash loses at most this long of those AuditEvents (never a Task write's),
    /// and another node sees them this much later.
    pub batch_window_ms: u64,
    /// Days an AuditEvent is kept; older ones are pruned hourly. 0 keeps them forever.
    pub retention_days: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            enabled: true,
            reads: true,
            delivery_attempts: true,
            batch_window_ms: 100,
            retention_days: 365,
        }
    }
}

/// How the HTTP surface is laid out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// More base paths serving the same FHIR API as `/fhir`, e.g. `["/api/fhir"]`. Links in
    /// responses (`fullUrl`, `Location`, paging) follow the path a request came in on.
    pub extra_base_paths: Vec<String>,
}

/// Paths outside the FHIR API that an extra base path may not take over.
const RESERVED_PATHS: &[&str] = &["/fhir", "/healthz", "/readyz", "/metrics", "/console"];

impl HttpConfig {
    /// Checks each extra base path: absolute, no trailing slash, plain segments, not one of
    /// Baton's own paths, no repeats.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, path) in self.extra_base_paths.iter().enumerate() {
            let segments_ok = path.strip_prefix('/').is_some_and(|rest| {
                !rest.is_empty()
                    && rest.split('/').all(|segment| {
                        !segment.is_empty()
                            && segment != "."
                            && segment != ".."
                            && segment.chars().all(|c| {
                                c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~')
                            })
                    })
            });
            if !segments_ok {
                return Err(ConfigError(format!(
                    "http.extra_base_paths entry '{path}' must be an absolute path of plain segments without a trailing slash, e.g. \"/api/fhir\" (BATON_HTTP__EXTRA_BASE_PATHS)"
                )));
            }
            if let Some(reserved) = RESERVED_PATHS.iter().find(|r| {
                path == *r
                    || path.starts_with(&format!("{r}/"))
                    || r.starts_with(&format!("{path}/"))
            }) {
                return Err(ConfigError(format!(
                    "http.extra_base_paths entry '{path}' overlaps Baton's own path {reserved}; choose another path (BATON_HTTP__EXTRA_BASE_PATHS)"
                )));
            }
            if let Some(other) = self.extra_base_paths[..i].iter().find(|o| {
                *o == path
                    || path.starts_with(&format!("{o}/"))
                    || o.starts_with(&format!("{path}/"))
            }) {
                return Err(ConfigError(format!(
                    "http.extra_base_paths lists '{path}' and '{other}', which overlap; keep one (BATON_HTTP__EXTRA_BASE_PATHS)"
                )));
            }
        }
        Ok(())
    }

    /// The base URL of the FHIR API under `path`, given the primary one: the primary base with
    /// its final `/fhir` replaced by `path` (`https://x/fhir` → `https://x/api/fhir`); a base
    /// that does not end in `/fhir` keeps its origin only.
    pub fn base_url_for(&self, primary: &str, path: &str) -> String {
        let primary = primary.trim_end_matches('/');
        if let Some(prefix) = primary.strip_suffix("/fhir") {
            return format!("{prefix}{path}");
        }
        match reqwest::Url::parse(primary) {
            Ok(url) => format!("{}{path}", url.origin().ascii_serialization()),
            Err(_) => format!("{primary}{path}"),
        }
    }
}

/// Browser clients on other origins (`[cors]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins (`scheme://host[:port]`) whose pages may call the FHIR API and open the
    /// websocket. Empty: no CORS headers at all, and websockets from any browser page refused.
    pub allowed_origins: Vec<String>,
}

/// Bounds on what one client can make the node do, so that no client can exhaust it for the
/// others. Refusals past a limit are 429 (or 413 for sizes) with an OperationOutcome, and a
/// `Retry-After` header where waiting helps. A value of 0 turns a count or rate limit off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Live subscriptions one author (a practitioner or auditor identity) may hold; admins,
    /// the integration accounts, are not counted. 0: no quota.
    pub subscriptions_per_author: usize,
    /// Sustained requests per second one practitioner or auditor identity may make (admins
    /// are not limited); bursts up to `request_burst_per_token`. 0: no limit.
    pub requests_per_second_per_token: u32,
    /// Requests one identity may make at once before the per-second rate applies.
    pub request_burst_per_token: u32,
    /// Open client connections (HTTP and websocket) the node accepts; more wait in the
    /// kernel's backlog. 0: no limit.
    pub max_connections: usize,
    /// Open connections from one client address; behind a proxy every client shares the
    /// proxy's address, so raise it or set 0 there.
    pub max_connections_per_client: usize,
    /// Time a client has to send a request's headers once it starts one, in seconds.
    pub header_read_timeout_seconds: u64,
    /// A connection with no request in progress for this long is closed, in seconds.
    pub idle_timeout_seconds: u64,
    /// A websocket that has bound no subscription this long after opening is closed, in seconds.
    pub websocket_bind_timeout_seconds: u64,
    /// Most operations in one JSON Patch document.
    pub max_patch_operations: usize,
    /// Most entries in one batch or transaction Bundle.
    pub max_transaction_entries: usize,
    /// Searches (and other reads that may scan) evaluated at once on this node.
    pub max_concurrent_searches: usize,
    /// Searches that may wait for a free slot; past this a search is refused with 503 and
    /// `Retry-After`.
    pub search_queue: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            subscriptions_per_author: 100,
            requests_per_second_per_token: 100,
            request_burst_per_token: 200,
            max_connections: 16_384,
            max_connections_per_client: 1024,
            header_read_timeout_seconds: 10,
            idle_timeout_seconds: 120,
            websocket_bind_timeout_seconds: 30,
            max_patch_operations: 100,
            max_transaction_entries: 1000,
            max_concurrent_searches: 8,
            search_queue: 64,
        }
    }
}

/// How nodes of a cluster (PostgreSQL store, Redis signalling) share work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name in leases and logs; unique among running nodes. Default: host name,
    /// process id and a random suffix. A fixed name is safe: a restarted node renews what it
    /// held before it died, which no live node holds.
    pub node_id: Option<String>,
    /// Prefix of every Redis key and channel; the nodes of one cluster share it, and two
    /// clusters on one Redis must not.
    pub redis_prefix: String,
    /// How long the matcher's lease and a delivery claim outlive a node that stops renewing
    /// them (a delivery claim also covers the attempt's timeout), in seconds.
    pub lease_seconds: u64,
    /// How often each node looks for delivery work that no node holds, in seconds.
    pub scan_seconds: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: None,
            redis_prefix: "baton".into(),
            lease_seconds: 10,
            scan_seconds: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Lifetime of a `$get-ws-binding-token` token, in seconds. Tokens are also single-use.
    pub token_ttl_seconds: u64,
    /// Notifications queued per socket; a socket whose queue is full is closed as too slow.
    pub outbox_capacity: usize,
    /// Interval of server pings that keep idle sockets alive through proxies, in seconds.
    pub ping_interval_seconds: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            token_ttl_seconds: 120,
            outbox_capacity: 256,
            ping_interval_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Delay before each retry after 1, 2, 3… consecutive failures, in seconds; the last repeats.
    pub retry_schedule_seconds: Vec<u64>,
    /// Random spread applied to each delay, as a fraction (0.2 = ±20 %).
    pub jitter_ratio: f64,
    /// Consecutive failures after which a subscription's status becomes `error`.
    pub error_after_failures: u32,
    /// How long a subscription may keep failing before it is turned `off`, in seconds.
    pub off_after_seconds: u64,
    /// Deliveries in flight at once across all subscriptions (one per subscription at most).
    pub max_concurrent: usize,
    /// Per-attempt timeout when a subscription sets no `backport-timeout`, in seconds.
    pub default_timeout_seconds: u64,
    /// Events per notification when a subscription sets no `backport-max-count`.
    pub default_max_count: u32,
    /// Delivered events older than this are removed from the event log (`$events`), in days.
    pub event_retention_days: u64,
    /// AMQP channels in confirm mode on the hub's broker connection. Each carries one publish
    /// awaiting its confirm at a time, so this bounds the AMQP notifications in flight.
    pub amqp_channels: usize,
    /// Worker threads of the delivery runtime, which runs the matcher, the delivery scheduler
    /// and the channel senders apart from the API's runtime, so that a broad fan-out never
    /// holds every thread an API request needs. 0 chooses half the cores, at least one.
    pub threads: usize,
    /// The operating system's nice value (0–19) of the delivery runtime's threads. Above 0,
    /// an API request that wants a core while the fan-out is busy gets it first; with idle
    /// cores the fan-out still runs at full speed. 0 shares the cores equally.
    pub nice: i32,
    /// Milliseconds the delivery recorder gathers best-effort delivery positions (websocket
    /// sends that ran ahead of their record) before writing them, so that a broad websocket
    /// fan-out costs the SQLite writer a few jobs a second rather than one per commit. A
    /// result an attempt waits for (rest-hook, AMQP, a status change) is written at once,
    /// with whatever has gathered. 0 writes every batch at once.
    pub position_record_ms: u64,
}

impl DeliveryConfig {
    /// The delivery runtime's worker threads: `threads`, or half the cores (at least one).
    pub fn runtime_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (cores / 2).max(1)
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry_schedule_seconds: vec![1, 5, 15, 60, 300, 900, 3600],
            jitter_ratio: 0.2,
            error_after_failures: 3,
            off_after_seconds: 3 * 24 * 3600,
            max_concurrent: 64,
            default_timeout_seconds: 10,
            default_max_count: 20,
            event_retention_days: 30,
            amqp_channels: 4,
            threads: 0,
            nice: 0,
            position_record_ms: 100,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Name of the token claim listing the performer types (`system|code`) a practitioner works as.
    pub performer_types_claim: String,
    /// Clock skew tolerated when checking `exp`, in seconds.
    pub leeway_seconds: u64,
    /// Lifetime of tokens minted by `baton token` when `--ttl` is not given, in seconds.
    pub default_token_ttl_seconds: u64,
    /// How long a fetched JWKS is used before it is fetched again, in seconds.
    pub jwks_cache_seconds: u64,
    /// Least time between two JWKS fetches of one issuer, in seconds: a token naming an
    /// unknown `kid` triggers a fetch at most this often, so a flood of bogus `kid`s cannot make
    /// Baton hammer the identity provider.
    pub jwks_min_refresh_seconds: u64,
    /// Trusted identity providers whose asymmetric tokens are accepted (`[[auth.issuers]]`).
    pub issuers: Vec<IssuerConfig>,
    /// Whether local HS256 tokens (`baton token`, signed with `BATON_JWT_SECRET` or the
    /// development secret) are accepted. Behind an identity provider, turn them off so that
    /// only the provider's tokens count; it needs at least one issuer.
    pub local_tokens: bool,
}

/// The asymmetric signature algorithms an issuer may be configured with, by their JOSE names
/// (`auth::issuers::parse_algorithm` reads each). HMAC is only for the local secret.
pub const ISSUER_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

/// One trusted token issuer (an OpenID provider or OAuth authorization server).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` of its tokens, e.g. `https://idp.example/realms/hospital`.
    pub issuer: String,
    /// The `aud` its tokens must carry for Baton.
    pub audience: String,
    /// Where its signing keys are published; when absent, read from the issuer's OIDC
    /// discovery document (`<issuer>/.well-known/openid-configuration`).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Signature algorithms accepted from it: RS256/384/512, PS256/384/512, ES256/384, EdDSA.
    #[serde(default = "default_issuer_algorithms")]
    pub algorithms: Vec<String>,
    /// Dotted path of the claim naming the role (a string or a list of strings), e.g. `role` or
    /// `realm_access.roles`.
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    /// Dotted path of the claim holding the FHIR user reference (`Practitioner/123`).
    #[serde(default = "default_fhir_user_claim")]
    pub fhir_user_claim: String,
    /// Builds the FHIR user from `sub` when the token has no FHIR user claim, e.g.
    /// `Practitioner/{sub}`.
    #[serde(default)]
    pub fhir_user_template: Option<String>,
    /// Dotted path of the claim listing the performer types (`system|code`).
    #[serde(default = "default_performer_types_claim")]
    pub performer_types_claim: String,
    /// The provider's token endpoint, advertised in SMART discovery; when absent, read from its
    /// OIDC discovery document.
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// The provider's authorization endpoint, likewise.
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    /// Refuse tokens of this issuer that carry no SMART scopes, instead of letting the role
    /// alone decide.
    #[serde(default)]
    pub require_scopes: bool,
}

fn default_issuer_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}

fn default_role_claim() -> String {
    "role".into()
}

fn default_fhir_user_claim() -> String {
    "fhirUser".into()
}

fn default_performer_types_claim() -> String {
    "performer_types".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    /// Page size when the client gives no `_count`.
    pub default_count: usize,
    /// Largest page size; a larger `_count` is reduced to this.
    pub max_count: usize,
    /// Most Tasks `_revinclude=Task:part-of:iterate` adds to one page.
    pub max_included: usize,
    /// Most levels of sub-tasks `_revinclude=Task:part-of:iterate` follows down from a match.
    pub max_include_depth: usize,
    /// Most bytes of resources (matches and included) in one page of search results; a page
    /// that reaches it ends early with a `next` link. At least `max_body_bytes`, so that any
    /// stored Task fits on a page.
    pub max_page_bytes: usize,
    /// What `Bundle.total` a search without `_total` gets (see `DefaultTotal`).
    pub default_total: DefaultTotal,
}

/// The `_total` of a search that does not say: `estimate` counts up to
/// `api::task::search::ESTIMATE_LIMIT` matches (exact below it, left out above it), `accurate`
/// counts every match (a count of all the Tasks of a large listing costs more than its page),
/// `none` counts nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultTotal {
    None,
    Estimate,
    Accurate,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Most writes committed together in one transaction (group commit; on PostgreSQL, the
    /// most plain Task writes of one group statement).
    pub max_batch: usize,
    /// Connections used for reads and searches (SQLite).
    pub read_connections: u32,
    /// Size of the connection pool shared by reads and writes (PostgreSQL).
    pub postgres_connections: u32,
    /// Connections, beside `postgres_connections`, each writing the plain Task creates and
    /// changes waiting for it as one statement (PostgreSQL; at most `max_batch` at a time).
    pub postgres_group_writers: u32,
    /// Tasks whose last version this node wrote it remembers, so that their next change is
    /// decided without reading them first and written in one group statement (PostgreSQL;
    /// 0 remembers none). A remembered version is checked by the write, never trusted.
    pub postgres_recent_tasks: usize,
    /// PostgreSQL cancels any statement of the serving pool that runs longer, in seconds.
    pub statement_timeout_seconds: u64,
    /// SQLite durability: `full` fsyncs the WAL at every commit (an acknowledged write
    /// survives a killed process and a power cut); `normal` fsyncs only at checkpoints (it
    /// survives a killed process, but a power cut may lose the last commits).
    pub synchronous: Synchronous,
    /// Writes waiting for the database beyond which a new Task or subscription write is
    /// refused with 429 and `Retry-After` (see `store::pressure`).
    pub max_queue: usize,
    /// Committed Task changes not yet matched and recorded beyond which a new Task write is
    /// refused with 429 and `Retry-After`.
    pub max_fanout_lag: u64,
    /// How many MiB of the database file each SQLite search connection maps into memory
    /// (`PRAGMA mmap_size`; SQLite itself maps at most 2 GiB); 0 (the default) reads pages by
    /// system call into each connection's page cache instead. SQLite unmaps a connection's
    /// whole mapping when it starts reading after any commit, so under writes (read
    /// auditing is one) a mapping costs more than it saves (BENCHMARKS.md, issue 16).
    pub search_mmap_mib: u64,
    /// How many MiB of current Tasks' texts SQLite search pages keep in memory: a page walks
    /// its index for ids and takes each Task's text from there, reading from the table only
    /// the Tasks it misses; 0 reads every page's Tasks from the table. PostgreSQL ignores it.
    pub search_text_cache_mib: u64,
}

/// How the outbox consumer records what it matched.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Most matches recorded in one store transaction (one SQLite writer job). A change heard
    /// by more subscriptions is recorded in several chunks, and Task writes queued meanwhile
    /// commit between them, so a Task write waits for one chunk, never a whole fan-out.
    pub fanout_chunk: usize,
    /// Milliseconds the outbox waits after recording a broad fan-out (a batch whose changes
    /// were each heard by 16 or more subscriptions on average) before it reads the next batch,
    /// so that a broad listener's events are recorded in longer runs and fewer commits. 0 never
    /// waits.
    pub fanout_linger_ms: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            fanout_chunk: 2000,
            fanout_linger_ms: 20,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Full,
    Normal,
}

impl Synchronous {
    /// The value of SQLite's `PRAGMA synchronous`.
    pub fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            public_url: None,
            data_dir: PathBuf::from("data"),
            database_url: None,
            jwt_secret: None,
            amqp_url: None,
            redis_url: None,
            allow_private_endpoints: false,
            allow_http_endpoints: false,
            max_body_bytes: 1024 * 1024,
            log_format: LogFormat::Text,
            shutdown_grace_seconds: 10,
            topics_dir: None,
            overdue_check_seconds: 15,
            auth: AuthConfig::default(),
            search: SearchConfig::default(),
            store: StoreConfig::default(),
            hub: HubConfig::default(),
            delivery: DeliveryConfig::default(),
            websocket: WebSocketConfig::default(),
            cluster: ClusterConfig::default(),
            limits: LimitsConfig::default(),
            cors: CorsConfig::default(),
            http: HttpConfig::default(),
            audit: AuditConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

impl AuthConfig {
    /// Checks `[[auth.issuers]]`: each issuer once, with an audience, URLs that are https (or
    /// http on a loopback host, for development), known asymmetric algorithms only, and claim
    /// paths that name something.
    fn validate_issuers(&self) -> Result<(), ConfigError> {
        if !self.local_tokens && self.issuers.is_empty() {
            return Err(ConfigError(
                "auth.local_tokens = false refuses every local HS256 token, so at least one [[auth.issuers]] is needed; configure an issuer or set local_tokens = true (BATON_AUTH__LOCAL_TOKENS)".into(),
            ));
        }
        if self.jwks_cache_seconds == 0 || self.jwks_min_refresh_seconds == 0 {
            return Err(ConfigError(
                "auth.jwks_cache_seconds and auth.jwks_min_refresh_seconds must be at least 1 (the second bounds how often a flood of unknown key ids can make Baton fetch keys)".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, issuer) in self.issuers.iter().enumerate() {
            let at = format!("auth.issuers[{i}]");
            if !seen.insert(issuer.issuer.as_str()) {
                return Err(ConfigError(format!(
                    "{at}: the issuer '{}' is listed twice; keep one [[auth.issuers]] table per issuer",
                    issuer.issuer
                )));
            }
            check_identity_url(&format!("{at}.issuer"), &issuer.issuer)?;
            for (name, uri) in [
                ("jwks_uri", &issuer.jwks_uri),
                ("token_endpoint", &issuer.token_endpoint),
                ("authorization_endpoint", &issuer.authorization_endpoint),
            ] {
                if let Some(uri) = uri {
                    check_identity_url(&format!("{at}.{name}"), uri)?;
                }
            }
            if issuer.audience.is_empty() {
                return Err(ConfigError(format!(
                    "{at}.audience must name the audience Baton's tokens carry (the 'aud' claim)"
                )));
            }
            if issuer.algorithms.is_empty() {
                return Err(ConfigError(format!(
                    "{at}.algorithms must list at least one algorithm, e.g. [\"RS256\"]"
                )));
            }
            for alg in &issuer.algorithms {
                if !ISSUER_ALGORITHMS.contains(&alg.as_str()) {
                    return Err(ConfigError(format!(
                        "{at}.algorithms: '{alg}' is not supported; use one of {} (HS256 is only for the local BATON_JWT_SECRET)",
                        ISSUER_ALGORITHMS.join(", ")
                    )));
                }
            }
            for (name, path) in [
                ("role_claim", &issuer.role_claim),
                ("fhir_user_claim", &issuer.fhir_user_claim),
                ("performer_types_claim", &issuer.performer_types_claim),
            ] {
                if path.is_empty() || path.split('.').any(str::is_empty) {
                    return Err(ConfigError(format!(
                        "{at}.{name} '{path}' must be a claim name or a dotted path such as realm_access.roles"
                    )));
                }
            }
            if let Some(template) = &issuer.fhir_user_template {
                let filled = template.replace("{sub}", "x");
                if !template.contains("{sub}") || !filled.contains('/') {
                    return Err(ConfigError(format!(
                        "{at}.fhir_user_template '{template}' must be a reference containing {{sub}}, e.g. Practitioner/{{sub}}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// An identity provider URL must be https, or http on a loopback host (development and tests):
/// keys fetched in the clear from elsewhere could be swapped on the way.
fn check_identity_url(what: &str, url: &str) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|_| ConfigError(format!("{what} '{url}' is not a URL")))?;
    let loopback = match parsed.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(ConfigError(format!(
            "{what} '{url}' must be an https URL (http only on localhost, for development)"
        ))),
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            performer_types_claim: "performer_types".into(),
            leeway_seconds: 30,
            default_token_ttl_seconds: 3600,
            jwks_cache_seconds: 300,
            jwks_min_refresh_seconds: 10,
            issuers: Vec::new(),
            local_tokens: true,
        }
    }
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            default_count: 50,
            max_count: 1000,
            max_included: 1000,
            max_include_depth: 8,
            max_page_bytes: 4 * 1024 * 1024,
            default_total: DefaultTotal::Estimate,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_batch: 256,
            read_connections: 8,
            postgres_connections: 16,
            postgres_group_writers: 2,
            postgres_recent_tasks: 10_000,
            statement_timeout_seconds: 30,
            synchronous: Synchronous::Full,
            max_queue: 4096,
            max_fanout_lag: 50_000,
            search_mmap_mib: 0,
            search_text_cache_mib: 256,
        }
    }
}

/// Exporting spans over OTLP: the request, the match and each delivery attempt of a change,
/// in the trace the request came with (`trace::TraceContext`). Off unless an endpoint is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP collector, e.g. `http://127.0.0.1:4318` (spans go to `/v1/traces` on it)
    /// (`BATON_TELEMETRY__OTLP_ENDPOINT`).
    pub otlp_endpoint: Option<String>,
    /// How spans are encoded: `http/protobuf` (the OTLP default) or `http/json`.
    pub otlp_protocol: OtlpProtocol,
}

/// The OTLP/HTTP encodings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    HttpJson,
}

impl TelemetryConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError(format!(
                "telemetry.otlp_endpoint '{endpoint}' must be an http(s) URL of an OTLP/HTTP collector, e.g. http://127.0.0.1:4318 (BATON_TELEMETRY__OTLP_ENDPOINT)"
            )));
        }
        Ok(())
    }

    /// Where spans are posted: the endpoint's `/v1/traces`, unless it names that path already.
    pub fn traces_url(&self) -> Option<String> {
        let endpoint = self.otlp_endpoint.as_deref()?.trim_end_matches('/');
        Some(if endpoint.ends_with("/v1/traces") {
            endpoint.to_string()
        } else {
            format!("{endpoint}/v1/traces")
        })
    }
}

/// A configuration problem, phrased as what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The database backends Baton knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

/// Whether `key` (an environment variable's name after `BATON_`) is one that Kubernetes
/// injects into every pod for a Service named `baton`: `BATON_PORT`, `BATON_SERVICE_HOST`,
/// `BATON_SERVICE_PORT[_NAME]`, `BATON_PORT_8080_TCP[_ADDR|_PORT|_PROTO]`. They are not
/// settings, so they are passed over, while any other unknown `BATON_*` name (a misspelt
/// setting) still stops start-up.
fn is_kubernetes_service_variable(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key == "port" || key == "service_host" || key == "service_port" {
        return true;
    }
    if key.starts_with("service_port_") {
        return true;
    }
    let Some(rest) = key.strip_prefix("port_") else {
        return false;
    };
    let mut parts = rest.split('_');
    let port = parts.next().unwrap_or_default();
    let protocol = parts.next().unwrap_or_default();
    let field = parts.next();
    !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && matches!(protocol, "tcp" | "udp" | "sctp")
        && matches!(field, None | Some("addr" | "port" | "proto"))
        && parts.next().is_none()
}

/// The file `Config::load` reads for this `--config` argument: the one given, else the default
/// file if it exists. Start-up names it in the log, so an operator sees which file counted.
pub fn file_used(explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(path) => Some(path.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.is_file()),
    }
}

impl Config {
    /// Loads defaults, then the file (the explicit one must exist), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.is_file() {
                    return Err(ConfigError(format!(
                        "configuration file {} does not exist",
                        path.display()
                    )));
                }
                figment = figment.merge(Toml::file(path));
            }
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                figment = figment.merge(Toml::file(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        figment = figment.merge(
            Env::prefixed("BATON_")
                .filter(|key| !is_kubernetes_service_variable(key.as_str()))
                .split("__"),
        );
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError(format!("invalid configuration: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every setting and says what to change. Called by `load` and by `run`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.http.validate()?;
        self.telemetry.validate()?;
        if let Some(url) = &self.public_url {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && reqwest::Url::parse(url).is_ok();
            if !ok {
                return Err(ConfigError(format!(
                    "BATON_PUBLIC_URL '{url}' must be an absolute http(s) URL such as https://baton.example.org/fhir"
                )));
            }
        }
        if let (DatabaseUrl::Sqlite(_), Some(_)) = (self.database()?, &self.redis_url) {
            return Err(ConfigError(
                "BATON_REDIS_URL is set but the database is SQLite, which serves one node: Redis signalling is for a cluster on BATON_DATABASE_URL=postgres://…; unset one of them".into(),
            ));
        }
        if self.cluster.lease_seconds < 2 || self.cluster.scan_seconds == 0 {
            return Err(ConfigError(
                "cluster.lease_seconds must be at least 2 and cluster.scan_seconds at least 1 (BATON_CLUSTER__LEASE_SECONDS, BATON_CLUSTER__SCAN_SECONDS)".into(),
            ));
        }
        if self.cluster.redis_prefix.is_empty()
            || self.cluster.redis_prefix.contains(char::is_whitespace)
        {
            return Err(ConfigError(
                "cluster.redis_prefix must be a non-empty word without spaces (BATON_CLUSTER__REDIS_PREFIX)".into(),
            ));
        }
        if self.store.statement_timeout_seconds == 0 {
            return Err(ConfigError(
                "store.statement_timeout_seconds must be at least 1 (BATON_STORE__STATEMENT_TIMEOUT_SECONDS)".into(),
            ));
        }
        if self.store.postgres_connections < 2 {
            return Err(ConfigError(
                "store.postgres_connections must be at least 2 (BATON_STORE__POSTGRES_CONNECTIONS)"
                    .into(),
            ));
        }
        if self.store.postgres_group_writers == 0 {
            return Err(ConfigError(
                "store.postgres_group_writers must be at least 1 (BATON_STORE__POSTGRES_GROUP_WRITERS)"
                    .into(),
            ));
        }
        if let Some(secret) = &self.jwt_secret
            && secret.trim().is_empty()
        {
            return Err(ConfigError(
                "BATON_JWT_SECRET is set but empty; set a random string of at least 32 characters or unset it".into(),
            ));
        }
        if let Some(url) = &self.amqp_url
            && !url.starts_with("amqp://")
        {
            return Err(ConfigError(format!(
                "BATON_AMQP_URL must start with amqp:// (this build has no TLS for AMQP; terminate it at a local proxy), got '{}'",
                redact_url(url)
            )));
        }
        if let Some(url) = &self.redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(ConfigError(format!(
                "BATON_REDIS_URL must start with redis:// or rediss://, got '{}'",
                redact_url(url)
            )));
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError(
                "max_body_bytes must be at least 1024 (BATON_MAX_BODY_BYTES)".into(),
            ));
        }
        if self.search.default_count == 0 || self.search.default_count > self.search.max_count {
            return Err(ConfigError(
                "search.default_count must be between 1 and search.max_count".into(),
            ));
        }
        if self.search.max_page_bytes < self.max_body_bytes || self.search.max_include_depth == 0 {
            return Err(ConfigError(
                "search.max_page_bytes must be at least max_body_bytes, and search.max_include_depth at least 1".into(),
            ));
        }
        if self.store.max_batch == 0 || self.store.read_connections == 0 {
            return Err(ConfigError(
                "store.max_batch and store.read_connections must be at least 1".into(),
            ));
        }
        if self.audit.batch_window_ms > 10_000 {
            return Err(ConfigError(
                "audit.batch_window_ms must be between 0 and 10000 (BATON_AUDIT__BATCH_WINDOW_MS)"
                    .into(),
            ));
        }
        if self.audit.retention_days > 36_500 {
            return Err(ConfigError(
                "audit.retention_days must be between 0 (keep forever) and 36500 (BATON_AUDIT__RETENTION_DAYS)".into(),
            ));
        }
        if !(1..=100_000).contains(&self.hub.fanout_chunk) {
            return Err(ConfigError(
                "hub.fanout_chunk must be between 1 and 100000 (matches per fan-out transaction; BATON_HUB__FANOUT_CHUNK)"
                    .into(),
            ));
        }
        if self.hub.fanout_linger_ms > 1000 {
            return Err(ConfigError(
                "hub.fanout_linger_ms must be between 0 and 1000 (milliseconds; BATON_HUB__FANOUT_LINGER_MS)"
                    .into(),
            ));
        }
        if self.store.max_queue == 0 || self.store.max_fanout_lag == 0 {
            return Err(ConfigError(
                "store.max_queue and store.max_fanout_lag must be at least 1 (BATON_STORE__MAX_QUEUE, BATON_STORE__MAX_FANOUT_LAG)".into(),
            ));
        }
        let d = &self.delivery;
        if d.retry_schedule_seconds.is_empty() || d.retry_schedule_seconds.contains(&0) {
            return Err(ConfigError(
                "delivery.retry_schedule_seconds must list at least one delay, each at least 1 second".into(),
            ));
        }
        if !(0.0..1.0).contains(&d.jitter_ratio) {
            return Err(ConfigError(
                "delivery.jitter_ratio must be at least 0 and below 1".into(),
            ));
        }
        if d.error_after_failures == 0 || d.max_concurrent == 0 || d.default_max_count == 0 {
            return Err(ConfigError(
                "delivery.error_after_failures, delivery.max_concurrent and delivery.default_max_count must be at least 1".into(),
            ));
        }
        if d.amqp_channels == 0 || d.amqp_channels > 256 {
            return Err(ConfigError(
                "delivery.amqp_channels must be between 1 and 256".into(),
            ));
        }
        if d.position_record_ms > 1000 {
            return Err(ConfigError(
                "delivery.position_record_ms must be between 0 and 1000 (milliseconds; BATON_DELIVERY__POSITION_RECORD_MS)".into(),
            ));
        }
        if !(0..=19).contains(&d.nice) {
            return Err(ConfigError(
                "delivery.nice must be between 0 and 19 (raising a thread's priority needs privileges Baton does not ask for)".into(),
            ));
        }
        if d.default_timeout_seconds == 0 || d.default_timeout_seconds > 120 {
            return Err(ConfigError(
                "delivery.default_timeout_seconds must be between 1 and 120".into(),
            ));
        }
        if d.event_retention_days == 0 || d.event_retention_days > 36_500 {
            return Err(ConfigError(
                "delivery.event_retention_days must be between 1 and 36500".into(),
            ));
        }
        if d.off_after_seconds > 10 * 365 * 24 * 3600 {
            return Err(ConfigError(
                "delivery.off_after_seconds must be at most ten years (315360000)".into(),
            ));
        }
        if self.overdue_check_seconds == 0 {
            return Err(ConfigError(
                "overdue_check_seconds must be at least 1".into(),
            ));
        }
        let w = &self.websocket;
        if w.token_ttl_seconds > 86_400 {
            return Err(ConfigError(
                "websocket.token_ttl_seconds must be at most 86400 (a day); binding tokens are meant to be short-lived".into(),
            ));
        }
        if w.token_ttl_seconds == 0 || w.outbox_capacity == 0 || w.ping_interval_seconds == 0 {
            return Err(ConfigError(
                "websocket.token_ttl_seconds, websocket.outbox_capacity and websocket.ping_interval_seconds must be at least 1".into(),
            ));
        }
        if let Some(dir) = &self.topics_dir
            && !dir.is_dir()
        {
            return Err(ConfigError(format!(
                "topics_dir {} is not a directory (BATON_TOPICS_DIR)",
                dir.display()
            )));
        }
        let l = &self.limits;
        if l.header_read_timeout_seconds == 0
            || l.idle_timeout_seconds == 0
            || l.websocket_bind_timeout_seconds == 0
        {
            return Err(ConfigError(
                "limits.header_read_timeout_seconds, limits.idle_timeout_seconds and limits.websocket_bind_timeout_seconds must be at least 1".into(),
            ));
        }
        if l.max_patch_operations == 0
            || l.max_transaction_entries == 0
            || l.max_concurrent_searches == 0
        {
            return Err(ConfigError(
                "limits.max_patch_operations, limits.max_transaction_entries and limits.max_concurrent_searches must be at least 1".into(),
            ));
        }
        if l.requests_per_second_per_token > 0 && l.request_burst_per_token == 0 {
            return Err(ConfigError(
                "limits.request_burst_per_token must be at least 1 while limits.requests_per_second_per_token is set".into(),
            ));
        }
        if self.auth.performer_types_claim.is_empty() {
            return Err(ConfigError(
                "auth.performer_types_claim must name a claim".into(),
            ));
        }
        self.auth.validate_issuers()?;
        for origin in &self.cors.allowed_origins {
            let parsed = reqwest::Url::parse(origin).ok();
            let exact = parsed.as_ref().is_some_and(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some()
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.path() == "/"
                    && u.query().is_none()
                    && u.fragment().is_none()
                    && !origin.ends_with('/')
            });
            if !exact {
                return Err(ConfigError(format!(
                    "cors.allowed_origins: '{origin}' must be an origin, scheme://host[:port] without a path or trailing slash, e.g. https://board.example.org (wildcards are not accepted)"
                )));
            }
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            ConfigError(format!(
                "BATON_LISTEN '{}' must be host:port with a numeric address, e.g. 127.0.0.1:8080",
                self.listen
            ))
        })
    }

    pub fn database(&self) -> Result<DatabaseUrl, ConfigError> {
        let Some(url) = &self.database_url else {
            return Ok(DatabaseUrl::Sqlite(self.data_dir.join("baton.db")));
        };
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(ConfigError(
                    "BATON_DATABASE_URL sqlite:// needs a file path, e.g. sqlite://data/baton.db"
                        .into(),
                ));
            }
            return Ok(DatabaseUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url.clone()));
        }
        Err(ConfigError(format!(
            "BATON_DATABASE_URL must start with sqlite:// or postgres://, got '{}'",
            redact_url(url)
        )))
    }

    /// The FHIR base URL: the configured one, or `http://<bound address>/fhir`.
    pub fn base_url(&self, bound: SocketAddr) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("http://{bound}/fhir"),
        }
    }
}

/// Hides the password of a URL so it can be shown in an error or a log line.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("****"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_base_paths_take_the_origin_of_the_public_url() {
        let http = HttpConfig {
            extra_base_paths: vec!["/api/fhir".into(), "/r4".into()],
        };
        let config = Config {
            http: http.clone(),
            ..Config::default()
        };
        config.validate().unwrap();
        #[rustfmt::skip]
        let cases = [
            ("http://127.0.0.1:8080/fhir", "/api/fhir", "http://127.0.0.1:8080/api/fhir"),
            ("https://x.example/baton/fhir/", "/api/fhir", "https://x.example/baton/api/fhir"),
            ("https://x.example/r4-base", "/r4", "https://x.example/r4"),
        ];
        for (primary, path, expected) in cases {
            assert_eq!(http.base_url_for(primary, path), expected, "{primary}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(
            Config::default().database().unwrap(),
            DatabaseUrl::Sqlite(PathBuf::from("data/baton.db"))
        );
    }

    #[test]
    fn kubernetes_service_variables_are_told_from_settings() {
        for key in [
            "PORT",
            "SERVICE_HOST",
            "SERVICE_PORT",
            "SERVICE_PORT_HTTP",
            "PORT_8080_TCP",
            "PORT_8080_TCP_ADDR",
            "PORT_8080_TCP_PORT",
            "PORT_8080_TCP_PROTO",
            "PORT_5672_UDP",
        ] {
            assert!(is_kubernetes_service_variable(key), "{key}");
        }
        for key in [
            "LISTEN",
            "LISTN",
            "PORTS",
            "PORT_HTTP",
            "PORT_8080",
            "PORT_8080_TCP_HOST",
            "PORT_X_TCP",
            "SERVICE",
            "DELIVERY__MAX_CONCURRENT",
        ] {
            assert!(!is_kubernetes_service_variable(key), "{key}");
        }
    }

    #[test]
    fn invalid_settings_name_what_to_change() {
        type Mutation = fn(&mut Config);
        let cases: Vec<(Mutation, &str)> = vec![
            (|c| c.listen = "localhost".into(), "BATON_LISTEN"),
            (
                |c| c.public_url = Some("ftp://x".into()),
                "BATON_PUBLIC_URL",
            ),
            (
                |c| c.database_url = Some("mysql://x".into()),
                "BATON_DATABASE_URL",
            ),
            (
                |c| c.database_url = Some("sqlite://".into()),
                "BATON_DATABASE_URL",
            ),
            (
                |c| c.redis_url = Some("redis://127.0.0.1:6379".into()),
                "postgres://",
            ),
            (|c| c.cluster.lease_seconds = 1, "cluster.lease_seconds"),
            (
                |c| c.store.postgres_group_writers = 0,
                "BATON_STORE__POSTGRES_GROUP_WRITERS",
            ),
            (
                |c| c.cluster.redis_prefix = "a b".into(),
                "cluster.redis_prefix",
            ),
            (|c| c.jwt_secret = Some(" ".into()), "BATON_JWT_SECRET"),
            (|c| c.amqp_url = Some("http://x".into()), "BATON_AMQP_URL"),
            (|c| c.redis_url = Some("x".into()), "BATON_REDIS_URL"),
            (|c| c.max_body_bytes = 10, "max_body_bytes"),
            (
                |c| c.audit.batch_window_ms = 60_000,
                "BATON_AUDIT__BATCH_WINDOW_MS",
            ),
            (
                |c| c.audit.retention_days = 100_000,
                "BATON_AUDIT__RETENTION_DAYS",
            ),
            (|c| c.search.default_count = 0, "search.default_count"),
            (|c| c.search.max_page_bytes = 1000, "search.max_page_bytes"),
            (
                |c| c.search.max_include_depth = 0,
                "search.max_include_depth",
            ),
            (
                |c| c.http.extra_base_paths = vec!["api/fhir".into()],
                "http.extra_base_paths",
            ),
            (
                |c| c.http.extra_base_paths = vec!["/api/fhir/".into()],
                "http.extra_base_paths",
            ),
            (
                |c| c.http.extra_base_paths = vec!["/api/../fhir".into()],
                "http.extra_base_paths",
            ),
            (
                |c| c.http.extra_base_paths = vec!["/fhir".into()],
                "overlaps Baton's own path /fhir",
            ),
            (
                |c| c.http.extra_base_paths = vec!["/metrics/x".into()],
                "overlaps",
            ),
            (
                |c| c.http.extra_base_paths = vec!["/api".into(), "/api/fhir".into()],
                "overlap",
            ),
        ];
        for (mutate, needle) in cases {
            let mut config = Config::default();
            mutate(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@localhost:5672/%2f"),
            "amqp://guest:****@localhost:5672/%2f"
        );
    }
}
