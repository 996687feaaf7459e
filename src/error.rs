//! The one error type of Baton and its single HTTP mapping.
//!
//! Client errors carry an HTTP status, a FHIR `OperationOutcome.issue.code` and a diagnostic
//! that tells the caller what to change. Everything else is an opaque 500: the cause chain is
//! logged once, at the boundary, and never sent to the client.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// The media type of every FHIR JSON body Baton sends, OperationOutcomes and resources alike.
/// It is defined here, in the base layer, because the error's own response needs it and the
/// API's responses (`api::fhir_json`) build on it.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// FHIR `IssueType` codes Baton reports (http://hl7.org/fhir/issue-type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    Invalid,
    Structure,
    Required,
    Value,
    Invariant,
    Security,
    Login,
    Forbidden,
    NotFound,
    Deleted,
    TooLong,
    NotSupported,
    Duplicate,
    MultipleMatches,
    Conflict,
    BusinessRule,
    Processing,
    Exception,
    Transient,
    Throttled,
    TooCostly,
    NoStore,
    Informational,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::Invalid => "invalid",
            IssueCode::Structure => "structure",
            IssueCode::Required => "required",
            IssueCode::Value => "value",
            IssueCode::Invariant => "invariant",
            IssueCode::Security => "security",
            IssueCode::Login => "login",
            IssueCode::Forbidden => "forbidden",
            IssueCode::NotFound => "not-found",
            IssueCode::Deleted => "deleted",
            IssueCode::TooLong => "too-long",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Duplicate => "duplicate",
            IssueCode::MultipleMatches => "multiple-matches",
            IssueCode::Conflict => "conflict",
            IssueCode::BusinessRule => "business-rule",
            IssueCode::Processing => "processing",
            IssueCode::Exception => "exception",
            IssueCode::Transient => "transient",
            IssueCode::Throttled => "throttled",
            IssueCode::TooCostly => "too-costly",
            IssueCode::NoStore => "no-store",
            IssueCode::Informational => "informational",
        }
    }
}

/// A problem the client can fix: what went wrong and, where known, which element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub status: StatusCode,
    pub code: IssueCode,
    pub diagnostics: String,
    /// FHIRPath-ish location of the offending element, e.g. `Task.status`.
    pub expression: Option<String>,
    /// Seconds after which the same request may succeed (`Retry-After`), for refusals that
    /// waiting cures: rate limits, full queues.
    pub retry_after: Option<u64>,
    /// The RFC 6750 error code of a bearer-token refusal, sent in `WWW-Authenticate`.
    pub bearer_error: Option<BearerError>,
}

/// Why a bearer token was refused (RFC 6750 section 3.1), for `WWW-Authenticate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BearerError {
    /// 401: the token is expired, forged, malformed or from an issuer not trusted.
    InvalidToken,
    /// 403: the token is genuine but its scopes do not cover the request; names the scope
    /// that would.
    InsufficientScope { scope: String },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", .0.diagnostics)]
    Client(Box<ClientError>),
    #[error("{context}")]
    Internal {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn client(status: StatusCode, code: IssueCode, diagnostics: impl Into<String>) -> Self {
        Error::Client(Box::new(ClientError {
            status,
            code,
            diagnostics: diagnostics.into(),
            expression: None,
            retry_after: None,
            bearer_error: None,
        }))
    }

    /// Tells the client when to try again (`Retry-After`); only client errors carry it.
    pub fn retry_after(self, seconds: u64) -> Self {
        match self {
            Error::Client(mut e) => {
                e.retry_after = Some(seconds);
                Error::Client(e)
            }
            other => other,
        }
    }

    /// 429: this client asked for more than its share; try again after `seconds`.
    pub fn too_many_requests(diagnostics: impl Into<String>, seconds: u64) -> Self {
        Self::client(
            StatusCode::TOO_MANY_REQUESTS,
            IssueCode::Throttled,
            diagnostics,
        )
        .retry_after(seconds)
    }

    /// 503: the node is busy or a part of it is down; try again after `seconds`.
    pub fn unavailable(diagnostics: impl Into<String>, seconds: u64) -> Self {
        Self::client(
            StatusCode::SERVICE_UNAVAILABLE,
            IssueCode::Transient,
            diagnostics,
        )
        .retry_after(seconds)
    }

    /// Attaches the location of the offending element to a client error.
    pub fn at(self, expression: impl Into<String>) -> Self {
        match self {
            Error::Client(mut e) => {
                e.expression = Some(expression.into());
                Error::Client(e)
            }
            other => other,
        }
    }

    /// Names the Bundle entry a client error comes from (`Bundle.entry[3]`), for a batch or
    /// transaction: the entry becomes the location, and the element the error named inside the
    /// entry's resource stays in the diagnostics.
    pub fn in_entry(self, entry: usize) -> Self {
        match self {
            Error::Client(mut e) => {
                let inner = e.expression.take();
                e.diagnostics = match inner {
                    Some(at) => format!("Bundle.entry[{entry}] ({at}): {}", e.diagnostics),
                    None => format!("Bundle.entry[{entry}]: {}", e.diagnostics),
                };
                e.expression = Some(format!("Bundle.entry[{entry}]"));
                Error::Client(e)
            }
            other => other,
        }
    }

    /// 400: the request itself is malformed (bad JSON, bad parameter).
    pub fn bad_request(code: IssueCode, diagnostics: impl Into<String>) -> Self {
        Self::client(StatusCode::BAD_REQUEST, code, diagnostics)
    }

    /// 400 `invalid` at a given element: the resource content breaks a rule.
    pub fn invalid(expression: impl Into<String>, diagnostics: impl Into<String>) -> Self {
        Self::bad_request(IssueCode::Invalid, diagnostics).at(expression)
    }

    /// 401 for a request without a bearer token (RFC 6750: no error code, only the scheme).
    pub fn unauthenticated(diagnostics: impl Into<String>) -> Self {
        Self::client(StatusCode::UNAUTHORIZED, IssueCode::Login, diagnostics)
    }

    /// 401 for a bearer token that is not valid: `WWW-Authenticate: Bearer
    /// error="invalid_token"`.
    pub fn unauthorized(diagnostics: impl Into<String>) -> Self {
        match Self::client(StatusCode::UNAUTHORIZED, IssueCode::Login, diagnostics) {
            Error::Client(mut e) => {
                e.bearer_error = Some(BearerError::InvalidToken);
                Error::Client(e)
            }
            other => other,
        }
    }

    /// 403 for a genuine token whose scopes do not allow the request: `WWW-Authenticate:
    /// Bearer error="insufficient_scope", scope="<the scope needed>"`.
    pub fn insufficient_scope(scope: impl Into<String>, diagnostics: impl Into<String>) -> Self {
        match Self::forbidden(diagnostics) {
            Error::Client(mut e) => {
                e.bearer_error = Some(BearerError::InsufficientScope {
                    scope: scope.into(),
                });
                Error::Client(e)
            }
            other => other,
        }
    }

    pub fn forbidden(diagnostics: impl Into<String>) -> Self {
        Self::client(StatusCode::FORBIDDEN, IssueCode::Forbidden, diagnostics)
    }

    pub fn not_found(diagnostics: impl Into<String>) -> Self {
        Self::client(StatusCode::NOT_FOUND, IssueCode::NotFound, diagnostics)
    }

    pub fn gone(diagnostics: impl Into<String>) -> Self {
        Self::client(StatusCode::GONE, IssueCode::Deleted, diagnostics)
    }

    pub fn conflict(diagnostics: impl Into<String>) -> Self {
        Self::client(StatusCode::CONFLICT, IssueCode::Conflict, diagnostics)
    }

    pub fn precondition_failed(diagnostics: impl Into<String>) -> Self {
        Self::client(
            StatusCode::PRECONDITION_FAILED,
            IssueCode::Conflict,
            diagnostics,
        )
    }

    /// 422: well-formed, but it breaks a business rule (e.g. the Task state machine).
    pub fn business_rule(diagnostics: impl Into<String>) -> Self {
        Self::client(
            StatusCode::UNPROCESSABLE_ENTITY,
            IssueCode::BusinessRule,
            diagnostics,
        )
    }

    pub fn not_supported(diagnostics: impl Into<String>) -> Self {
        Self::bad_request(IssueCode::NotSupported, diagnostics)
    }

    pub fn internal(
        context: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Internal {
            context,
            source: source.into(),
        }
    }

    /// The client part of this error, if it is one.
    pub fn as_client(&self) -> Option<&ClientError> {
        match self {
            Error::Client(e) => Some(e),
            Error::Internal { .. } => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Client(e) => e.status,
            Error::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl Error {
    /// The same answer for another request that shared the failed work (a group commit): a
    /// client error is repeated as it is, anything else becomes an opaque internal error.
    pub fn for_another_request(&self) -> Error {
        match self {
            Error::Client(e) => Error::Client(e.clone()),
            Error::Internal { context, .. } => Error::internal(context, error_chain(self)),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        database_error(storage_trouble(&e), e)
    }
}

/// The SQLite writer's errors (`store::sqlite::writer`, on rusqlite) follow the same policy as
/// the read pool's (on sqlx): one classification of SQLite's result codes, one answer each.
impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        let trouble = match &e {
            rusqlite::Error::SqliteFailure(failure, _) => {
                sqlite_trouble(i64::from(failure.extended_code))
            }
            _ => None,
        };
        database_error(trouble, e)
    }
}

/// The answer to a failed database call: 507 when the disk is full, 503 when the database is
/// unavailable (each logged at most once every ten seconds), otherwise an opaque 500.
fn database_error<E>(trouble: Option<StorageTrouble>, e: E) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    match trouble {
        Some(StorageTrouble::Full) => {
            // Every write is refused while the disk is full: say so once in a while, not
            // once per refused write.
            if log_now(&LAST_FULL_LOG) {
                tracing::error!(error = %e, "the database has no space left; writes are refused with 507 until space is freed");
            }
            Error::client(
                StatusCode::INSUFFICIENT_STORAGE,
                IssueCode::NoStore,
                "the server's database is out of disk space, so nothing was stored; retry once an operator has freed space",
            )
            .retry_after(30)
        }
        Some(StorageTrouble::Unavailable) => {
            if log_now(&LAST_UNAVAILABLE_LOG) {
                tracing::warn!(error = %e, "the database is unavailable; requests are answered 503");
            }
            Error::unavailable(
                "the server's database is unavailable for the moment, so nothing was stored; retry shortly",
                5,
            )
        }
        None => Error::internal("database error", e),
    }
}

static LAST_FULL_LOG: AtomicU64 = AtomicU64::new(0);
static LAST_UNAVAILABLE_LOG: AtomicU64 = AtomicU64::new(0);

/// Whether a recurring condition should be logged now: at most once every ten seconds.
fn log_now(last: &AtomicU64) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let before = last.load(Ordering::Relaxed);
    now >= before.saturating_add(10)
        && last
            .compare_exchange(before, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// A database failure that is about the database, not the request: it is out of space, or
/// down, busy or unreachable for a while. Both leave the store as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageTrouble {
    Full,
    Unavailable,
}

fn storage_trouble(e: &sqlx::Error) -> Option<StorageTrouble> {
    match e {
        sqlx::Error::Database(db) => {
            if let Some(sqlite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                let code: i64 = sqlx::error::DatabaseError::code(sqlite)?.parse().ok()?;
                return sqlite_trouble(code);
            }
            let code = db.code()?;
            match code.as_ref() {
                "53100" => Some(StorageTrouble::Full), // disk_full
                // Insufficient resources, operator intervention (a statement cancelled by
                // `statement_timeout` included), connection exceptions.
                c if c.starts_with("53") || c.starts_with("57") || c.starts_with("08") => {
                    Some(StorageTrouble::Unavailable)
                }
                _ => None,
            }
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            Some(StorageTrouble::Unavailable)
        }
        _ => None,
    }
}

/// What a SQLite result code says about the database, whichever client reported it.
fn sqlite_trouble(code: i64) -> Option<StorageTrouble> {
    // Extended result codes keep the primary code in their low byte.
    match code & 0xff {
        13 => Some(StorageTrouble::Full),                     // SQLITE_FULL
        5 | 6 | 10 | 14 => Some(StorageTrouble::Unavailable), // BUSY, LOCKED, IOERR, CANTOPEN
        _ => None,
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::internal("database migration failed", e)
    }
}

/// Builds a FHIR OperationOutcome with one issue.
pub fn operation_outcome(
    severity: &str,
    code: IssueCode,
    diagnostics: &str,
    expression: Option<&str>,
) -> Value {
    let mut issue = json!({
        "severity": severity,
        "code": code.as_str(),
        "diagnostics": diagnostics,
    });
    if let Some(expr) = expression {
        issue["expression"] = json!([expr]);
    }
    json!({ "resourceType": "OperationOutcome", "issue": [issue] })
}

impl Error {
    /// The status and OperationOutcome this error answers with (an internal error is logged
    /// here, once, and answered opaquely): a response's body, or a Bundle entry's `outcome`.
    pub fn outcome(&self) -> (StatusCode, Value) {
        match self {
            Error::Client(e) => (
                e.status,
                operation_outcome("error", e.code, &e.diagnostics, e.expression.as_deref()),
            ),
            Error::Internal { .. } => {
                tracing::error!(error = %error_chain(self), "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    operation_outcome(
                        "fatal",
                        IssueCode::Exception,
                        "internal server error; the cause has been logged",
                        None,
                    ),
                )
            }
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let retry_after = self.as_client().and_then(|e| e.retry_after);
        let challenge = match self.as_client().and_then(|e| e.bearer_error.as_ref()) {
            Some(BearerError::InvalidToken) => {
                Some(HeaderValue::from_static(r#"Bearer error="invalid_token""#))
            }
            // Scopes are checked against a fixed grammar, so the value is always a valid header;
            // should it not be, the challenge still names the error.
            Some(BearerError::InsufficientScope { scope }) => Some(
                HeaderValue::from_str(&format!(
                    r#"Bearer error="insufficient_scope", scope="{scope}""#
                ))
                .unwrap_or(HeaderValue::from_static(
                    r#"Bearer error="insufficient_scope""#,
                )),
            ),
            None if self.status() == StatusCode::UNAUTHORIZED => {
                Some(HeaderValue::from_static("Bearer"))
            }
            None => None,
        };
        let (status, body) = self.outcome();
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut response = (status, [(header::CONTENT_TYPE, FHIR_JSON)], bytes).into_response();
        if let Some(challenge) = challenge {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// Renders an error with its whole `source()` chain, for logs.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
