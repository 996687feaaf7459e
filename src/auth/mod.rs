//! Bearer-token authentication and the role rules of the design.
//!
//! Tokens are HS256 JWTs with `sub`, `exp`, `role`, (for practitioners) `fhirUser` and
//! optionally `iss`. The algorithm is pinned: a token whose header names any other algorithm,
//! `none` included, is rejected. The rules deciding who may read or write a Task are plain
//! functions of the principal and the resource, so the API, search and every notification
//! apply the very same rule.
//!
//! Whatever a principal owns (a subscription, a binding token) is owned by its whole
//! `Identity` — issuer, subject, role and FHIR user — never by `sub` alone: two tokens that
//! share a `sub` but differ in role or FHIR user are two different owners.

pub mod issuers;
pub mod scopes;
pub mod verified;

use std::path::Path;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value, json};

use crate::config::IssuerConfig;
use crate::error::{Error, Result};
use crate::fhir::ids::TaskId;
use crate::fhir::search::{Predicate, SystemMatch, TokenValue};
use crate::fhir::task::{self, Ownership};
use crate::fhir::workflow::{self, information};
pub use scopes::{Permission, Resource, Scopes};
use verified::VerifiedTokens;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Practitioner,
    Auditor,
}

impl Role {
    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "admin" => Some(Role::Admin),
            "practitioner" => Some(Role::Practitioner),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Practitioner => "practitioner",
            Role::Auditor => "auditor",
        }
    }
}

/// A performer type a practitioner works as: `system|code`, or a bare code matching any system.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PerformerType {
    pub system: Option<String>,
    pub code: String,
}

impl PerformerType {
    pub fn parse(text: &str) -> Option<PerformerType> {
        let (system, code) = match text.split_once('|') {
            Some((s, c)) => (Some(s.to_string()).filter(|s| !s.is_empty()), c),
            None => (None, text),
        };
        (!code.is_empty()).then(|| PerformerType {
            system,
            code: code.to_string(),
        })
    }

    fn matches(&self, system: Option<&str>, code: &str) -> bool {
        self.code == code && self.system.as_deref().is_none_or(|s| Some(s) == system)
    }
}

/// Who is calling, as established by a verified token.
///
/// Stored as the author of a subscription (JSON), where it decides what the subscription's
/// notifications may carry. Authors stored before `issuer` existed read back with none, which
/// is what a token without `iss` gives: the local issuer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Principal {
    /// The token's `iss`; None for a token without one (see `Identity::issuer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    pub subject: String,
    pub role: Role,
    /// `Type/id` of the FHIR user behind the token; always present for practitioners.
    pub fhir_user: Option<String>,
    pub performer_types: Vec<PerformerType>,
    /// The token's SMART resource scopes, which narrow the role; None when it carries none
    /// (the role alone decides). Kept with a subscription's author, so its notifications are
    /// held to the scopes it was created with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Scopes>,
    /// The token's `patient` launch context (`Patient/123`), which `patient/` scopes need.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
}

impl Principal {
    /// Refuses with 403 `insufficient_scope` unless the token's scopes (if any) allow
    /// `permission` on `resource`. The role rules are checked besides, not instead.
    pub fn require_scope(&self, resource: Resource, permission: Permission) -> Result<()> {
        let Some(scopes) = &self.scopes else {
            return Ok(());
        };
        if scopes.allow(resource, permission, self.patient.is_some()) {
            return Ok(());
        }
        let context = scopes.context().unwrap_or(match self.fhir_user {
            None => "system",
            Some(_) => "user",
        });
        let needed = scopes::needed(context, resource, permission);
        Err(Error::insufficient_scope(
            needed.clone(),
            format!(
                "the token's scopes do not allow this: it needs {needed} (or a scope that includes it)"
            ),
        ))
    }

    /// The patient a permission on Tasks is limited to: Some when the token's scopes grant it
    /// only through `patient/` scopes (then only Tasks whose `for` is that patient).
    fn patient_bound(&self, permission: Permission) -> Option<&str> {
        let scopes = self.scopes.as_ref()?;
        scopes
            .patient_only(Resource::Task, permission)
            .then(|| self.patient.as_deref().unwrap_or_default())
    }

    /// Whether the token's scopes let it read Task content at all (read or search).
    fn scopes_read_tasks(&self) -> bool {
        self.scopes.as_ref().is_none_or(|s| {
            let patient = self.patient.is_some();
            s.allow(Resource::Task, Permission::Read, patient)
                || s.allow(Resource::Task, Permission::Search, patient)
        })
    }

    /// The identity that owns what this principal creates, and that must match exactly for
    /// the principal to act as that owner.
    pub fn identity(&self) -> Identity {
        Identity {
            issuer: self.issuer.clone(),
            subject: self.subject.clone(),
            role: self.role,
            fhir_user: self.fhir_user.clone(),
        }
    }

    /// Whether this principal is the owner `identity`: every part must agree, so a token
    /// with the same `sub` but another role, FHIR user or issuer is someone else.
    pub fn is(&self, identity: &Identity) -> bool {
        self.issuer == identity.issuer
            && self.subject == identity.subject
            && self.role == identity.role
            && self.fhir_user == identity.fhir_user
    }
}

/// The owner of a subscription or a binding token: everything about a token that says who it
/// speaks for. Performer types are left out on purpose: they say which queues a practitioner
/// works, not who it is, and may change from one token to the next.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The token's `iss`. None means the token carried no `iss`: it was minted with the
    /// configured HS256 key (`baton token`, development and service tokens), the "local
    /// issuer". A token with an `iss` is never the same owner as one without, even with the
    /// same `sub`.
    pub issuer: Option<String>,
    pub subject: String,
    pub role: Role,
    pub fhir_user: Option<String>,
}

/// Verifies tokens of the trusted issuers (`[[auth.issuers]]`), and verifies and mints the
/// local HS256 tokens.
#[derive(Clone)]
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    performer_types_claim: String,
    issuers: Arc<issuers::Issuers>,
    /// Whether local HS256 tokens are accepted (`auth.local_tokens`); minting them is always
    /// possible, for the `baton token` command.
    local_tokens: bool,
    /// Local tokens verified before, as the principals they verified to (`verified`): a
    /// client sends the same token with every request.
    local_verified: Arc<VerifiedTokens<Principal>>,
}

impl Authenticator {
    pub fn new(secret: &str, leeway_seconds: u64, performer_types_claim: &str) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_seconds;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
            performer_types_claim: performer_types_claim.to_string(),
            issuers: Arc::new(issuers::Issuers::new(&crate::config::AuthConfig::default())),
            local_tokens: true,
            local_verified: Arc::new(VerifiedTokens::new(
                verified::MAX_VERIFIED_TOKENS,
                leeway_seconds,
            )),
        }
    }

    /// Trusts the issuers of `config` besides the local HS256 key.
    pub fn with_issuers(mut self, config: &crate::config::AuthConfig) -> Authenticator {
        self.issuers = Arc::new(issuers::Issuers::new(config));
        self.local_tokens = config.local_tokens;
        self
    }

    pub fn issuers(&self) -> &issuers::Issuers {
        &self.issuers
    }

    /// Verifies a bearer token of any kind: a token whose (not yet verified) `iss` names a
    /// configured issuer is checked against that issuer's keys and rules only; any other token
    /// must be a local HS256 token. So an issuer's name never lets a token choose HS256, and a
    /// token signed by anyone else is refused for its issuer, not its algorithm.
    pub async fn authenticate(&self, token: &str) -> Result<Principal> {
        if !self.issuers.is_empty() {
            let iss = unverified_issuer(token);
            if let Some(issuer) = iss.as_deref().and_then(|iss| self.issuers.find(iss)) {
                let claims = self.issuers.verify(issuer, token).await?;
                check_token_json(token)?;
                return map_issuer_claims(&issuer.config, &claims);
            }
            let local = jsonwebtoken::decode_header(token)
                .map(|h| h.alg == Algorithm::HS256)
                .unwrap_or(false);
            if local && !self.local_tokens {
                return Err(Error::unauthorized(
                    "local HS256 tokens are turned off here (auth.local_tokens = false); use a token from a trusted issuer",
                ));
            }
            if !local {
                return Err(Error::unauthorized(match iss {
                    Some(iss) => format!(
                        "the token's issuer '{}' is not trusted (see [[auth.issuers]])",
                        iss.escape_debug()
                    ),
                    None => "the token names no trusted issuer ('iss')".to_string(),
                }));
            }
        }
        self.verify(token)
    }

    /// Verifies a local HS256 bearer token and turns its claims into a principal; a token
    /// verified before and not expired since is answered from `local_verified`.
    pub fn verify(&self, token: &str) -> Result<Principal> {
        let digest = verified::digest(token);
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(principal) = self.local_verified.get(&digest, "", 0, now) {
            return Ok(principal);
        }
        let (principal, exp) = self.verify_fully(token)?;
        self.local_verified
            .insert(digest, "", 0, exp.as_ref(), principal.clone(), now);
        Ok(principal)
    }

    /// The full check of a local token: signature, times, JSON and claims; with the principal,
    /// the token's `exp` claim.
    fn verify_fully(&self, token: &str) -> Result<(Principal, Option<Value>)> {
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &self.decoding, &self.validation)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind;
                    let why = match e.kind() {
                        ErrorKind::ExpiredSignature => "the token has expired",
                        ErrorKind::ImmatureSignature => {
                            "the token is not valid yet: its 'nbf' (not before) time is in the \
                             future"
                        }
                        ErrorKind::InvalidClaimFormat(_) => {
                            "the token's 'exp' and 'nbf' claims must be numeric dates"
                        }
                        ErrorKind::InvalidSignature => "the token signature is not valid",
                        ErrorKind::InvalidAlgorithm => "the token must be signed with HS256",
                        ErrorKind::MissingRequiredClaim(_) => {
                            "the token must carry 'sub' and 'exp'"
                        }
                        _ => "the token is malformed",
                    };
                    Error::unauthorized(why)
                })?;
        check_token_json(token)?;
        let claims = data.claims;
        let subject = subject_claim(&claims)?;
        // An empty `iss` would be a third state between "no issuer" and "this issuer";
        // refusing it keeps the identity's issuer one of the two.
        let issuer = match claims.get("iss") {
            None => None,
            Some(Value::String(iss)) if is_identity_text(iss) => Some(iss.clone()),
            Some(_) => {
                return Err(Error::unauthorized(
                    "the token's 'iss' claim must be a non-empty string without control characters",
                ));
            }
        };
        let role = claims
            .get("role")
            .and_then(Value::as_str)
            .and_then(Role::parse)
            .ok_or_else(|| {
                Error::unauthorized(
                    "the token's 'role' claim must be admin, practitioner or auditor",
                )
            })?;
        let fhir_user = match claims.get("fhirUser") {
            None => None,
            Some(Value::String(user)) => Some(
                crate::fhir::normalize_reference(user, "")
                    .filter(|r| r.contains('/') && !r.contains(':'))
                    .ok_or_else(|| {
                        Error::unauthorized(
                            "the token's 'fhirUser' must be a reference like Practitioner/123",
                        )
                    })?,
            ),
            Some(_) => {
                return Err(Error::unauthorized(
                    "the token's 'fhirUser' must be a string",
                ));
            }
        };
        if role == Role::Practitioner && fhir_user.is_none() {
            return Err(Error::unauthorized(
                "a practitioner token must carry a 'fhirUser' claim",
            ));
        }
        let performer_types = match claims.get(&self.performer_types_claim) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().and_then(PerformerType::parse))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Error::unauthorized(format!(
                        "the token's '{}' claim must be a list of 'system|code' strings",
                        self.performer_types_claim
                    ))
                })?,
            Some(_) => {
                return Err(Error::unauthorized(format!(
                    "the token's '{}' claim must be a list",
                    self.performer_types_claim
                )));
            }
        };
        let (scopes, patient) = smart_context(&claims)?;
        let principal = Principal {
            issuer,
            subject,
            role,
            fhir_user,
            performer_types,
            scopes,
            patient,
        };
        Ok((principal, claims.get("exp").cloned()))
    }

    /// Mints a token, for `baton token`, the start-up admin token and the tests. The token
    /// carries no `iss` (the local issuer), and its subject names the role as well as the FHIR
    /// user (`practitioner:Practitioner/7`, `auditor:Practitioner/7`; `admin-cli` without a
    /// FHIR user), so tokens minted for different roles never share a `sub`.
    pub fn issue(
        &self,
        role: Role,
        fhir_user: Option<&str>,
        performer_types: &[String],
        ttl_seconds: u64,
    ) -> Result<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let subject = minted_subject(role, fhir_user);
        let mut claims = json!({
            "sub": subject,
            "iat": now,
            "exp": now + ttl_seconds as i64,
            "role": role.as_str(),
        });
        if let Some(user) = fhir_user {
            claims["fhirUser"] = json!(user);
        }
        if !performer_types.is_empty() {
            claims[&self.performer_types_claim] = json!(performer_types);
        }
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::internal("signing a token failed", e))
    }
}

/// Checks the JSON of a token whose signature has been verified: neither its header nor its
/// payload may repeat a key (a JSON parser keeps one of them, and which one differs between
/// parsers, so `"role"` twice could mean admin here and auditor in an audit log), and the
/// header may not carry `crit`: it lists extensions the recipient must understand, and Baton
/// understands none (RFC 7515 section 4.1.11).
fn check_token_json(token: &str) -> Result<()> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    for (part, what) in [(parts.next(), "header"), (parts.next(), "payload")] {
        let json = part
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .ok_or_else(|| Error::unauthorized("the token is malformed"))?;
        let value = crate::fhir::json::parse(&json).map_err(|e| match e {
            crate::fhir::json::JsonError::DuplicateKey { key, .. } => Error::unauthorized(format!(
                "the token's {what} has the key '{key}' more than once"
            )),
            _ => Error::unauthorized("the token is malformed"),
        })?;
        if what == "header" && value.get("crit").is_some() {
            return Err(Error::unauthorized(
                "the token's header lists critical extensions ('crit'), which this server does \
                 not support",
            ));
        }
    }
    Ok(())
}

/// The `iss` of a token's payload, read before its signature is checked: only to choose which
/// issuer's keys check it.
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = URL_SAFE_NO_PAD.decode(token.split('.').nth(1)?).ok()?;
    let claims: Value = serde_json::from_slice(&payload).ok()?;
    claims.get("iss")?.as_str().map(String::from)
}

/// The value at a claim path: the whole path as one claim name first (claim names may contain
/// dots, e.g. `https://example.org/roles`), else each dot-separated part one object deeper
/// (`realm_access.roles`).
pub fn claim_at<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(value) = claims.get(path) {
        return Some(value);
    }
    let mut parts = path.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// The token's `sub`: a non-empty string without control characters, or 401.
fn subject_claim(claims: &Map<String, Value>) -> Result<String> {
    claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| is_identity_text(s))
        .ok_or_else(|| {
            Error::unauthorized(
                "the token's 'sub' claim must be a non-empty string without control characters",
            )
        })
        .map(str::to_string)
}

/// Turns the verified claims of an issuer's token into a principal, as the issuer's mapping
/// says. The token is genuine, so a claim that does not map is a 403 naming the claim, not a
/// 401: another token will not help, a change at the identity provider will.
pub fn map_issuer_claims(config: &IssuerConfig, claims: &Map<String, Value>) -> Result<Principal> {
    let unmappable = |why: String| Error::forbidden(why);
    let issuer = config.issuer.clone();
    let subject = subject_claim(claims)?;
    let role_path = &config.role_claim;
    let roles: Vec<Role> = match claim_at(claims, role_path) {
        None => {
            return Err(unmappable(format!(
                "the token carries no '{role_path}' claim, which names the role (admin, practitioner or auditor)"
            )));
        }
        Some(Value::String(one)) => Role::parse(one).into_iter().collect(),
        Some(Value::Array(items)) => {
            let mut roles: Vec<Role> = items
                .iter()
                .filter_map(Value::as_str)
                .filter_map(Role::parse)
                .collect();
            roles.sort_by_key(|r| r.as_str());
            roles.dedup();
            roles
        }
        Some(_) => Vec::new(),
    };
    let role = match roles.as_slice() {
        [one] => *one,
        [] => {
            return Err(unmappable(format!(
                "the token's '{role_path}' claim names no role: it must be or include admin, practitioner or auditor"
            )));
        }
        _ => {
            return Err(unmappable(format!(
                "the token's '{role_path}' claim names more than one of admin, practitioner and auditor; a token must act as one"
            )));
        }
    };
    let user_path = &config.fhir_user_claim;
    let from_claim = match claim_at(claims, user_path) {
        None => None,
        Some(Value::String(user)) => Some(user.clone()),
        Some(_) => {
            return Err(unmappable(format!(
                "the token's '{user_path}' claim must be a string like Practitioner/123"
            )));
        }
    };
    let from_template = config
        .fhir_user_template
        .as_ref()
        .map(|t| t.replace("{sub}", &subject));
    let fhir_user = match from_claim.or(from_template) {
        None => None,
        Some(user) => Some(
            crate::fhir::normalize_reference(&user, "")
                .filter(|r| r.contains('/') && !r.contains(':'))
                .ok_or_else(|| {
                    unmappable(format!(
                        "the token's FHIR user '{}' (from '{user_path}' or fhir_user_template) must be a reference like Practitioner/123",
                        user.escape_debug()
                    ))
                })?,
        ),
    };
    if role == Role::Practitioner && fhir_user.is_none() {
        return Err(unmappable(format!(
            "a practitioner token must carry a '{user_path}' claim (or the issuer a fhir_user_template)"
        )));
    }
    let types_path = &config.performer_types_claim;
    let performer_types = match claim_at(claims, types_path) {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().and_then(PerformerType::parse))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                unmappable(format!(
                    "the token's '{types_path}' claim must be a list of 'system|code' strings"
                ))
            })?,
        Some(_) => {
            return Err(unmappable(format!(
                "the token's '{types_path}' claim must be a list"
            )));
        }
    };
    let (scopes, patient) = smart_context(claims)?;
    // An issuer that requires scopes lets a token without any do nothing: every request is
    // refused naming the scope it needs.
    let scopes = match scopes {
        None if config.require_scopes => Some(Scopes::none()),
        scopes => scopes,
    };
    Ok(Principal {
        issuer: Some(issuer),
        subject,
        role,
        fhir_user,
        performer_types,
        scopes,
        patient,
    })
}

/// A token's SMART resource scopes (from `scope`, a space-separated string, or `scp`, a list
/// or a string) and its `patient` launch context (an id, or `Patient/<id>`).
fn smart_context(claims: &Map<String, Value>) -> Result<(Option<Scopes>, Option<String>)> {
    let malformed = |name: &str| {
        Error::unauthorized(format!(
            "the token's '{name}' claim must be a space-separated string or a list of strings"
        ))
    };
    let mut texts: Vec<&str> = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            None => {}
            Some(Value::String(list)) => texts.extend(list.split_whitespace()),
            Some(Value::Array(items)) => {
                for item in items {
                    texts.push(item.as_str().ok_or_else(|| malformed(name))?);
                }
            }
            Some(_) => return Err(malformed(name)),
        }
    }
    let patient = match claims.get("patient") {
        None => None,
        Some(Value::String(id)) if crate::fhir::is_valid_id(id) => Some(format!("Patient/{id}")),
        Some(Value::String(reference)) => Some(
            crate::fhir::normalize_reference(reference, "")
                .filter(|r| r.starts_with("Patient/"))
                .ok_or_else(|| {
                    Error::unauthorized(
                        "the token's 'patient' claim must be a Patient id or Patient/<id>",
                    )
                })?,
        ),
        Some(_) => {
            return Err(Error::unauthorized(
                "the token's 'patient' claim must be a string",
            ));
        }
    };
    Ok((Scopes::parse(texts), patient))
}

/// Whether a claim can be part of an identity: not empty (the store writes "none" as ''), and
/// free of control characters, which the stores would not keep exactly as given.
fn is_identity_text(text: &str) -> bool {
    !text.is_empty() && !text.chars().any(char::is_control)
}

/// The `sub` that `issue` gives a token.
pub fn minted_subject(role: Role, fhir_user: Option<&str>) -> String {
    match fhir_user {
        Some(user) => format!("{}:{user}", role.as_str()),
        None => format!("{}-cli", role.as_str()),
    }
}

/// Reads the secret from the configuration, or else from `<data_dir>/jwt-secret`, creating
/// that file with a random secret (mode 0600) the first time. The second case is a development
/// convenience: `baton serve` and `baton token` share the file, so a newcomer needs no setup.
/// Production deployments set `BATON_JWT_SECRET`.
pub fn resolve_secret(
    configured: Option<&str>,
    data_dir: &Path,
) -> std::io::Result<(String, bool)> {
    if let Some(secret) = configured {
        return Ok((secret.to_string(), false));
    }
    let path = data_dir.join("jwt-secret");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim().to_string();
        if !existing.is_empty() {
            return Ok((existing, true));
        }
    }
    std::fs::create_dir_all(data_dir)?;
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    options.open(&path)?.write_all(secret.as_bytes())?;
    Ok((secret, true))
}

/// Whether the principal may read this Task: the one read rule of the design, applied to
/// reads, every version in the history, searches and notifications alike. A practitioner
/// reads the Tasks whose `owner` references its FHIR user, and Tasks with no `owner` at all
/// waiting in one of its role queues; an `owner` named only by `display` or `identifier` is
/// someone else, so such a Task is for admins and auditors only.
///
/// SMART scopes narrow it: a token whose scopes grant neither read nor search on Task reads
/// none, and one whose scopes reach Tasks only through `patient/` scopes reads only those of
/// its patient.
pub fn may_read_task(principal: &Principal, resource: &Value, base_url: &str) -> bool {
    if !principal.scopes_read_tasks() {
        return false;
    }
    if let Some(patient) = principal.patient_bound(Permission::Read)
        && principal.patient_bound(Permission::Search).is_some()
        && !is_for_patient(resource, patient, base_url)
    {
        return false;
    }
    may_read(
        principal.role,
        principal.fhir_user.as_deref(),
        &principal.performer_types,
        resource,
        base_url,
    )
}

/// What the read rule looks at of a principal, and nothing else: what the matcher keeps of
/// each subscription's author. Admins and auditors read every Task, so one `Reader` stands
/// for all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reader {
    Everything,
    Practitioner {
        fhir_user: Option<Box<str>>,
        performer_types: Box<[PerformerType]>,
    },
    /// An author whose scopes grant no Task reads.
    Nothing,
    /// An author whose scopes reach Tasks only through `patient/` scopes: the Tasks `inner`
    /// reads whose `for` is this patient.
    Patient {
        patient: Box<str>,
        inner: Box<Reader>,
    },
}

impl Reader {
    pub fn of(principal: &Principal) -> Reader {
        if !principal.scopes_read_tasks() {
            return Reader::Nothing;
        }
        let role = Reader::of_role(principal);
        match (
            principal.patient_bound(Permission::Read),
            principal.patient_bound(Permission::Search),
        ) {
            (Some(patient), Some(_)) => Reader::Patient {
                patient: patient.into(),
                inner: Box::new(role),
            },
            _ => role,
        }
    }

    fn of_role(principal: &Principal) -> Reader {
        match principal.role {
            Role::Admin | Role::Auditor => Reader::Everything,
            Role::Practitioner => Reader::Practitioner {
                fhir_user: principal.fhir_user.as_deref().map(Box::from),
                performer_types: principal.performer_types.clone().into_boxed_slice(),
            },
        }
    }

    /// `may_read_task` for the principal this reader was made of.
    pub fn may_read_task(&self, resource: &Value, base_url: &str) -> bool {
        match self {
            Reader::Everything => true,
            Reader::Nothing => false,
            Reader::Patient { patient, inner } => {
                is_for_patient(resource, patient, base_url)
                    && inner.may_read_task(resource, base_url)
            }
            Reader::Practitioner {
                fhir_user,
                performer_types,
            } => may_read(
                Role::Practitioner,
                fhir_user.as_deref(),
                performer_types,
                resource,
                base_url,
            ),
        }
    }
}

/// The read rule, over the parts of a principal it looks at: the Tasks the principal may
/// work on (`may_work_on`), and, for a practitioner, the workflow Tasks it asked for and may
/// only watch (`asked_for`).
fn may_read(
    role: Role,
    fhir_user: Option<&str>,
    performer_types: &[PerformerType],
    resource: &Value,
    base_url: &str,
) -> bool {
    may_work_on(role, fhir_user, performer_types, resource, base_url)
        || (role == Role::Practitioner && asked_for(fhir_user, resource, base_url))
}

/// The Tasks a principal may change as well as read: admins and auditors (whose writes the
/// role rules refuse anyway) every Task; a practitioner the Tasks it owns and the unowned ones
/// waiting in its role queues.
fn may_work_on(
    role: Role,
    fhir_user: Option<&str>,
    performer_types: &[PerformerType],
    resource: &Value,
    base_url: &str,
) -> bool {
    match role {
        Role::Admin | Role::Auditor => true,
        Role::Practitioner => match task::ownership(resource, base_url) {
            Ownership::Reference(owner) => Some(owner.as_str()) == fhir_user,
            Ownership::Unowned => in_role_queue(performer_types, resource),
            Ownership::Unresolved => false,
        },
    }
}

/// The workflow Tasks a practitioner reads, without owning them, because it asked for them
/// (`fhir::workflow::asked_by`): the bids on a bidding Task it placed (a bid's `requester` is
/// its bidding Task's, held so by the store), and the information requests it sent to a
/// placer. Narrow on purpose: nothing else with `requester` = the practitioner becomes
/// readable, and these grant no write beyond withdrawing an information request
/// (`authorize_task_write`).
fn asked_for(fhir_user: Option<&str>, resource: &Value, base_url: &str) -> bool {
    fhir_user.is_some_and(|me| workflow::asked_by(resource, base_url).as_deref() == Some(me))
}

/// Whether the Task is `for` this patient (`Patient/123`).
fn is_for_patient(resource: &Value, patient: &str, base_url: &str) -> bool {
    resource["for"]["reference"]
        .as_str()
        .and_then(|r| crate::fhir::normalize_reference(r, base_url))
        .is_some_and(|r| !patient.is_empty() && r == patient)
}

/// Whether the Task's `owner` references the principal's FHIR user.
fn owns(principal: &Principal, resource: &Value, base_url: &str) -> bool {
    match task::ownership(resource, base_url) {
        Ownership::Reference(owner) => Some(&owner) == principal.fhir_user.as_ref(),
        Ownership::Unowned | Ownership::Unresolved => false,
    }
}

/// Whether an unowned Task waits in one of the practitioner's role queues.
fn in_role_queue(performer_types: &[PerformerType], resource: &Value) -> bool {
    task::performer_types(resource)
        .iter()
        .any(|(system, code)| {
            performer_types
                .iter()
                .any(|p| p.matches(system.as_deref(), code))
        })
}

/// The read rule as a search predicate, so that searches only ever see readable Tasks.
/// `None` means no restriction. The queue branch's `owner:missing=true` leaves out Tasks whose
/// owner has no reference, because `fhir::search::index_task` files those under `owner` too.
pub fn read_scope(principal: &Principal) -> Option<Predicate> {
    let role = read_scope_of_role(principal);
    // Searches reaching Tasks only through `patient/` scopes see only the patient's.
    let Some(patient) = principal.patient_bound(Permission::Search) else {
        return role;
    };
    let for_patient = Predicate::Token {
        param: "patient",
        negated: false,
        any_of: vec![TokenValue {
            system: SystemMatch::Any,
            code: Some(patient.to_string()),
        }],
    };
    Some(match role {
        Some(role) => Predicate::And(vec![role, for_patient]),
        None => for_patient,
    })
}

fn read_scope_of_role(principal: &Principal) -> Option<Predicate> {
    if principal.role != Role::Practitioner {
        return None;
    }
    let me = principal.fhir_user.clone().unwrap_or_default();
    let owned = Predicate::Token {
        param: "owner",
        negated: false,
        any_of: vec![TokenValue {
            system: SystemMatch::Any,
            code: Some(me.clone()),
        }],
    };
    // The workflow Tasks it asked for (`asked_for`): the same rule as a search predicate, one
    // branch per kind, so that each code is one `system|code` the token index looks up by
    // equality (a list of alternatives would read every code of every Task).
    let asked = Predicate::Or(
        workflow::ASKED_FOR_CODES
            .iter()
            .map(|code| {
                Predicate::And(vec![
                    Predicate::Token {
                        param: "requester",
                        negated: false,
                        any_of: vec![TokenValue {
                            system: SystemMatch::Any,
                            code: Some(me.clone()),
                        }],
                    },
                    Predicate::Token {
                        param: "code",
                        negated: false,
                        any_of: vec![TokenValue {
                            system: SystemMatch::Exact(
                                workflow::information::WORKFLOW_TASK_SYSTEM.into(),
                            ),
                            code: Some((*code).into()),
                        }],
                    },
                ])
            })
            .collect(),
    );
    if principal.performer_types.is_empty() {
        return Some(Predicate::Or(vec![owned, asked]));
    }
    let queue = Predicate::And(vec![
        Predicate::Missing {
            param: "owner",
            missing: true,
        },
        Predicate::Token {
            param: "performer",
            negated: false,
            any_of: principal
                .performer_types
                .iter()
                .map(|p| TokenValue {
                    system: p
                        .system
                        .clone()
                        .map_or(SystemMatch::Any, SystemMatch::Exact),
                    code: Some(p.code.clone()),
                })
                .collect(),
        },
    ]);
    Some(Predicate::Or(vec![owned, queue, asked]))
}

/// Checks a Task write against the role rules: `before` is the current version (None on
/// create), `after` the proposed one. Both must already be valid Tasks. Without `after`, it
/// checks only that the principal may change `before` at all (deletes have their own rule,
/// `authorize_task_delete`).
pub fn authorize_task_write(
    principal: &Principal,
    before: Option<&Value>,
    after: Option<&Value>,
    base_url: &str,
) -> Result<()> {
    // Writes allowed only through `patient/` scopes stay within the patient's Tasks.
    let permission = if before.is_some() {
        Permission::Update
    } else {
        Permission::Create
    };
    if let Some(patient) = principal.patient_bound(permission) {
        for task in before.into_iter().chain(after) {
            if !is_for_patient(task, patient, base_url) {
                return Err(Error::insufficient_scope(
                    scopes::needed("user", Resource::Task, permission),
                    format!(
                        "the token's patient/ scopes reach only the Tasks of {patient}, and this Task is not for it"
                    ),
                ));
            }
        }
    }
    match principal.role {
        Role::Admin => Ok(()),
        Role::Auditor => Err(Error::forbidden("auditors have read-only access to Tasks")),
        Role::Practitioner => {
            let me = principal.fhir_user.as_deref().unwrap_or_default();
            // The role's own read rule: whether the Task is the practitioner's to change. Its
            // scopes were checked for the write itself; a write-only token may change its own
            // Tasks without being allowed to read them back.
            if let Some(before) = before
                && !may_work_on(
                    principal.role,
                    principal.fhir_user.as_deref(),
                    &principal.performer_types,
                    before,
                    base_url,
                )
            {
                // The one write a Task it only asked for allows: withdrawing its own
                // information request (`fhir::workflow::information::check_withdrawal`).
                if asked_for(principal.fhir_user.as_deref(), before, base_url)
                    && information::is_information_request(before)
                {
                    // Without `after` the question is only whether it may change the Task
                    // at all; a delete is refused by `authorize_task_delete` (not its owner).
                    return match after {
                        None => Ok(()),
                        Some(after) => information::check_withdrawal(before, after),
                    };
                }
                return Err(Error::forbidden(format!(
                    "this Task is not owned by {me} and not in one of its role queues"
                )));
            }
            let Some(after) = after else {
                return Ok(());
            };
            match task::ownership(after, base_url) {
                Ownership::Reference(owner) if owner == me => Ok(()),
                Ownership::Reference(owner) => Err(Error::forbidden(format!(
                    "a practitioner may only own its own Tasks: Task.owner must be {me}, not {owner}"
                ))),
                Ownership::Unresolved => Err(Error::forbidden(format!(
                    "a practitioner may only own its own Tasks: Task.owner must reference {me}, \
                     not only name an owner by display or identifier"
                ))),
                // Releasing a claim returns the Task to the queue; allowed only while the
                // practitioner can still see it there, so nobody hands work into the void.
                Ownership::Unowned
                    if before.is_some() && in_role_queue(&principal.performer_types, after) =>
                {
                    Ok(())
                }
                Ownership::Unowned => Err(Error::forbidden(format!(
                    "a practitioner may only create or keep Tasks it owns: set Task.owner to {me}"
                ))),
            }
        }
    }
}

/// Checks a delete of the Task whose content is `before` (for a Task already deleted, its
/// content before the delete). Deleting takes more than reading: admins, and the practitioner
/// that owns the Task — never the practitioners of a queue it merely waits in.
pub fn authorize_task_delete(principal: &Principal, before: &Value, base_url: &str) -> Result<()> {
    authorize_task_write(principal, Some(before), None, base_url)?;
    if principal.role == Role::Practitioner && !owns(principal, before, base_url) {
        let me = principal.fhir_user.as_deref().unwrap_or_default();
        return Err(Error::forbidden(format!(
            "only an admin or the Task's owner may delete it, and {me} does not own it; a \
             queued Task stays in its queue"
        )));
    }
    Ok(())
}

/// Checks that the principal may create a Task again under the id of a deleted one, whose
/// last content was `deleted`. The id's history stays with the id, so only whoever could
/// have deleted that Task — an admin, or the practitioner who owned it — may take the id
/// over; anyone else would otherwise inherit a place next to versions they must not read.
pub fn authorize_task_recreate(
    principal: &Principal,
    deleted: &Value,
    id: &TaskId,
    base_url: &str,
) -> Result<()> {
    authorize_task_delete(principal, deleted, base_url).map_err(|_| {
        Error::forbidden(format!(
            "Task/{id} was deleted; only an admin or the practitioner who owned it may create \
             a Task with this id again"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "unit-test-secret-of-at-least-32-bytes!";

    fn auth() -> Authenticator {
        Authenticator::new(SECRET, 0, "performer_types")
    }

    fn sign(claims: Value, alg: Algorithm, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn exp() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp() + 600
    }

    #[test]
    fn issued_tokens_verify() {
        let a = auth();
        let token = a
            .issue(
                Role::Practitioner,
                Some("Practitioner/7"),
                &["http://x|lab".into()],
                60,
            )
            .unwrap();
        let p = a.verify(&token).unwrap();
        assert_eq!(p.role, Role::Practitioner);
        assert_eq!(p.fhir_user.as_deref(), Some("Practitioner/7"));
        assert_eq!(
            p.performer_types,
            vec![PerformerType {
                system: Some("http://x".into()),
                code: "lab".into()
            }]
        );
    }

    #[test]
    fn a_local_token_verified_once_is_remembered_and_changes_nothing_else() {
        let a = auth();
        let token = a
            .issue(Role::Practitioner, Some("Practitioner/7"), &[], 60)
            .unwrap();
        let first = a.verify(&token).unwrap();
        assert_eq!(a.local_verified.len(), 1);
        assert_eq!(a.verify(&token).unwrap(), first, "the remembered principal");
        assert_eq!(a.local_verified.len(), 1);
        // The same claims under another signature are another token: checked in full.
        let (head, signature) = token.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
        let forged = format!("{head}.{flipped}{}", &signature[1..]);
        assert!(a.verify(&forged).is_err(), "a forged signature after a hit");
        // A token that fails its check is not remembered, and fails every time.
        let expired = sign(
            json!({"sub": "u", "exp": exp() - 1_200, "role": "admin"}),
            Algorithm::HS256,
            SECRET,
        );
        for _ in 0..2 {
            assert!(a.verify(&expired).is_err());
        }
        assert_eq!(a.local_verified.len(), 1);
    }

    #[test]
    fn bad_tokens_are_rejected() {
        let a = auth();
        let good = json!({"sub": "u", "exp": exp(), "role": "admin"});
        let unsigned = {
            use base64::Engine;
            let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.",
                e.encode(br#"{"alg":"none","typ":"JWT"}"#),
                e.encode(good.to_string())
            )
        };
        let cases = [
            ("alg none", unsigned),
            ("HS512", sign(good.clone(), Algorithm::HS512, SECRET)),
            (
                "other key",
                sign(
                    good.clone(),
                    Algorithm::HS256,
                    "another-secret-another-secret-xx",
                ),
            ),
            (
                "expired",
                sign(
                    json!({"sub": "u", "exp": 1000, "role": "admin"}),
                    Algorithm::HS256,
                    SECRET,
                ),
            ),
            (
                "no exp",
                sign(
                    json!({"sub": "u", "role": "admin"}),
                    Algorithm::HS256,
                    SECRET,
                ),
            ),
            (
                "bad role",
                sign(
                    json!({"sub": "u", "exp": exp(), "role": "root"}),
                    Algorithm::HS256,
                    SECRET,
                ),
            ),
            (
                "practitioner without fhirUser",
                sign(
                    json!({"sub": "u", "exp": exp(), "role": "practitioner"}),
                    Algorithm::HS256,
                    SECRET,
                ),
            ),
            ("garbage", "not.a.token".to_string()),
        ];
        for (name, token) in cases {
            let err = a.verify(&token).expect_err(name);
            assert_eq!(err.status(), 401, "{name}");
        }
        a.verify(&sign(good, Algorithm::HS256, SECRET)).unwrap();
    }

    /// Signs header and payload exactly as given, so that the JSON can be anything.
    fn sign_raw(header: &str, payload: &str) -> String {
        use base64::Engine;
        use hmac::Mac;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let message = format!("{}.{}", e.encode(header), e.encode(payload));
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(message.as_bytes());
        format!("{message}.{}", e.encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn ambiguous_premature_and_critical_tokens_are_rejected() {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let exp = now + 600;
        let header = r#"{"alg":"HS256","typ":"JWT"}"#;
        let cases = [
            (
                "role twice",
                sign_raw(
                    header,
                    &format!(r#"{{"sub":"u","exp":{exp},"role":"auditor","role":"admin"}}"#),
                ),
                "the token's payload has the key 'role' more than once",
            ),
            (
                "nested key twice",
                sign_raw(
                    header,
                    &format!(r#"{{"sub":"u","exp":{exp},"role":"admin","x":{{"a":1,"a":2}}}}"#),
                ),
                "the token's payload has the key 'a' more than once",
            ),
            (
                "header key twice",
                sign_raw(
                    r#"{"alg":"HS256","typ":"JWT","kid":"a","kid":"b"}"#,
                    &format!(r#"{{"sub":"u","exp":{exp},"role":"admin"}}"#),
                ),
                "",
            ),
            (
                "crit",
                sign_raw(
                    r#"{"alg":"HS256","typ":"JWT","crit":["exp"],"exp":1}"#,
                    &format!(r#"{{"sub":"u","exp":{exp},"role":"admin"}}"#),
                ),
                "critical extensions ('crit')",
            ),
            (
                "nbf in the future",
                sign_raw(
                    header,
                    &format!(
                        r#"{{"sub":"u","exp":{exp},"nbf":{},"role":"admin"}}"#,
                        now + 300
                    ),
                ),
                "not valid yet",
            ),
            (
                "nbf not a number",
                sign_raw(
                    header,
                    &format!(r#"{{"sub":"u","exp":{exp},"nbf":"soon","role":"admin"}}"#),
                ),
                "numeric dates",
            ),
        ];
        for (name, token, expected) in cases {
            let err = auth().verify(&token).expect_err(name);
            let client = err.as_client().unwrap();
            assert_eq!(client.status, 401, "{name}");
            assert!(
                client.diagnostics.contains(expected),
                "{name}: {}",
                client.diagnostics
            );
        }
        // A past nbf is fine, and a future one within the leeway too.
        let past = format!(
            r#"{{"sub":"u","exp":{exp},"nbf":{},"role":"admin"}}"#,
            now - 5
        );
        auth().verify(&sign_raw(header, &past)).unwrap();
        let soon = format!(
            r#"{{"sub":"u","exp":{exp},"nbf":{},"role":"admin"}}"#,
            now + 20
        );
        Authenticator::new(SECRET, 60, "performer_types")
            .verify(&sign_raw(header, &soon))
            .unwrap();
        // The same claims once each are accepted.
        let once = format!(r#"{{"sub":"u","exp":{exp},"role":"admin"}}"#);
        auth().verify(&sign_raw(header, &once)).unwrap();
    }

    fn practitioner(user: &str, types: &[&str]) -> Principal {
        Principal {
            issuer: None,
            subject: user.into(),
            role: Role::Practitioner,
            fhir_user: Some(user.into()),
            performer_types: types
                .iter()
                .filter_map(|t| PerformerType::parse(t))
                .collect(),
            scopes: None,
            patient: None,
        }
    }

    fn task_owned_by(owner: Option<&str>, performer: Option<&str>) -> Value {
        let mut t = json!({"resourceType": "Task", "status": "requested", "intent": "order"});
        if let Some(o) = owner {
            t["owner"] = json!({"reference": o});
        }
        if let Some(p) = performer {
            t["performerType"] = json!([{"coding": [{"system": "http://x", "code": p}]}]);
        }
        t
    }

    #[test]
    fn practitioners_read_own_and_queued_tasks_only() {
        let p = practitioner("Practitioner/1", &["http://x|lab"]);
        let base = "http://h/fhir";
        assert!(may_read_task(
            &p,
            &task_owned_by(Some("Practitioner/1"), None),
            base
        ));
        assert!(may_read_task(
            &p,
            &task_owned_by(Some("http://h/fhir/Practitioner/1"), None),
            base
        ));
        assert!(!may_read_task(
            &p,
            &task_owned_by(Some("Practitioner/2"), None),
            base
        ));
        assert!(may_read_task(&p, &task_owned_by(None, Some("lab")), base));
        assert!(!may_read_task(
            &p,
            &task_owned_by(None, Some("radiology")),
            base
        ));
        assert!(!may_read_task(
            &p,
            &task_owned_by(Some("Practitioner/2"), Some("lab")),
            base
        ));
    }

    /// A Task of Baton's workflow kinds (`bid`, `information-request`, …) asked for by
    /// `requester` and owned by `owner`.
    fn workflow_task(kind: &str, requester: Option<&str>, owner: &str) -> Value {
        let mut t = task_owned_by(Some(owner), None);
        t["code"] = json!({ "coding": [{ "system": workflow::information::WORKFLOW_TASK_SYSTEM, "code": kind }] });
        if let Some(r) = requester {
            t["requester"] = json!({ "reference": r });
        }
        t
    }

    #[test]
    fn askers_read_their_bids_and_questions_and_nothing_else_they_requested() {
        let base = "http://h/fhir";
        let placer = practitioner("Practitioner/placer", &[]);
        #[rustfmt::skip]
        let cases: &[(&str, Value, bool)] = &[
            ("a bid on its bidding Task", workflow_task("bid", Some("Practitioner/placer"), "Practitioner/bob"), true),
            ("by an absolute reference", workflow_task("bid", Some("http://h/fhir/Practitioner/placer"), "Practitioner/bob"), true),
            ("its information request", workflow_task("information-request", Some("Practitioner/placer"), "Organization/o"), true),
            ("someone else's bid", workflow_task("bid", Some("Practitioner/other"), "Practitioner/bob"), false),
            ("a bid with no placer", workflow_task("bid", None, "Practitioner/bob"), false),
            ("a bidding Task it requested", workflow_task("bidding", Some("Practitioner/placer"), "Practitioner/bob"), false),
            ("a plain Task it requested", { let mut t = task_owned_by(Some("Practitioner/bob"), None); t["requester"] = json!({ "reference": "Practitioner/placer" }); t }, false),
            ("a bid code of another system", { let mut t = workflow_task("bid", Some("Practitioner/placer"), "Practitioner/bob"); t["code"]["coding"][0]["system"] = json!("http://other"); t }, false),
        ];
        for (label, task, readable) in cases {
            assert_eq!(may_read_task(&placer, task, base), *readable, "{label}");
        }
        // Reading is not changing: the placer may not write a bid, even to take it.
        let bid = &cases[0].1;
        let mut taken = bid.clone();
        taken["owner"] = json!({ "reference": "Practitioner/placer" });
        assert!(authorize_task_write(&placer, Some(bid), Some(&taken), base).is_err());
        assert!(authorize_task_delete(&placer, bid, base).is_err());
    }

    /// The read rule as a search predicate selects exactly the Tasks `may_read_task` allows,
    /// for every kind of reader and Task.
    #[test]
    fn read_scope_agrees_with_may_read_task() {
        use crate::fhir::search::{index_task, matches};
        let base = "http://h/fhir";
        let readers = [
            practitioner("Practitioner/placer", &[]),
            practitioner("Practitioner/bob", &["http://x|lab"]),
            practitioner("Practitioner/1", &["http://x|lab", "http://x|radiology"]),
        ];
        let mut tasks = vec![
            task_owned_by(Some("Practitioner/1"), None),
            task_owned_by(Some("Practitioner/bob"), Some("lab")),
            task_owned_by(None, Some("lab")),
            task_owned_by(None, Some("radiology")),
            task_owned_by(None, None),
        ];
        for kind in ["bid", "bidding", "information-request", "other"] {
            for requester in [Some("Practitioner/placer"), Some("Practitioner/bob"), None] {
                tasks.push(workflow_task(kind, requester, "Practitioner/1"));
            }
        }
        for (i, task) in tasks.iter_mut().enumerate() {
            task["id"] = json!(format!("t{i}"));
            task["meta"] = json!({ "lastUpdated": "2026-01-01T00:00:00Z" });
        }
        for reader in &readers {
            let scope: Vec<Predicate> = read_scope(reader).into_iter().collect();
            for task in &tasks {
                assert_eq!(
                    matches(&index_task(task, base), &scope),
                    may_read_task(reader, task, base),
                    "{:?} reading {task}",
                    reader.fhir_user
                );
            }
        }
    }

    #[test]
    fn write_rules_follow_the_role_table() {
        let base = "http://h/fhir";
        let me = practitioner("Practitioner/1", &["http://x|lab"]);
        let mine = task_owned_by(Some("Practitioner/1"), Some("lab"));
        let theirs = task_owned_by(Some("Practitioner/2"), Some("lab"));
        let queued = task_owned_by(None, Some("lab"));
        let admin = Principal {
            role: Role::Admin,
            ..me.clone()
        };
        let auditor = Principal {
            role: Role::Auditor,
            ..me.clone()
        };
        let ok = |r: Result<()>| r.is_ok();
        assert!(ok(authorize_task_write(&me, None, Some(&mine), base)));
        assert!(!ok(authorize_task_write(&me, None, Some(&theirs), base)));
        assert!(!ok(authorize_task_write(&me, None, Some(&queued), base)));
        assert!(
            ok(authorize_task_write(&me, Some(&queued), Some(&mine), base)),
            "claim"
        );
        assert!(
            ok(authorize_task_write(&me, Some(&mine), Some(&queued), base)),
            "release"
        );
        assert!(
            !ok(authorize_task_write(&me, Some(&mine), Some(&theirs), base)),
            "hand over"
        );
        assert!(
            !ok(authorize_task_write(&me, Some(&theirs), Some(&mine), base)),
            "steal"
        );
        assert!(ok(authorize_task_delete(&me, &mine, base)), "delete own");
        assert!(
            ok(authorize_task_write(&me, Some(&queued), None, base)),
            "a queued Task may be changed (claimed)"
        );
        assert!(ok(authorize_task_write(
            &admin,
            Some(&theirs),
            Some(&queued),
            base
        )));
        let err = authorize_task_write(&auditor, None, Some(&mine), base).unwrap_err();
        assert_eq!(err.status(), 403);
    }

    #[test]
    fn ownership_needs_the_whole_identity() {
        let author = practitioner("Practitioner/1", &["http://x|lab"]);
        let owner = author.identity();
        let cases: [(&str, Principal, bool); 7] = [
            ("the author itself", author.clone(), true),
            (
                "other performer types (not part of who it is)",
                Principal {
                    performer_types: Vec::new(),
                    ..author.clone()
                },
                true,
            ),
            (
                "same sub, auditor role",
                Principal {
                    role: Role::Auditor,
                    ..author.clone()
                },
                false,
            ),
            (
                "same sub, admin role",
                Principal {
                    role: Role::Admin,
                    ..author.clone()
                },
                false,
            ),
            (
                "same sub, other fhirUser",
                Principal {
                    fhir_user: Some("Practitioner/2".into()),
                    ..author.clone()
                },
                false,
            ),
            (
                "same sub, with an issuer",
                Principal {
                    issuer: Some("https://idp.example".into()),
                    ..author.clone()
                },
                false,
            ),
            (
                "other sub",
                Principal {
                    subject: "someone-else".into(),
                    ..author.clone()
                },
                false,
            ),
        ];
        for (name, caller, expected) in cases {
            assert_eq!(caller.is(&owner), expected, "{name}");
            assert_eq!(caller.identity() == owner, expected, "{name}");
        }
    }

    #[test]
    fn issuer_and_subject_claims_map_to_the_identity() {
        let a = auth();
        let token = |extra: Value| {
            let mut claims = json!({"sub": "u", "exp": exp(), "role": "auditor"});
            for (k, v) in extra.as_object().unwrap() {
                claims[k] = v.clone();
            }
            sign(claims, Algorithm::HS256, SECRET)
        };
        let cases: [(&str, Value, Option<Option<&str>>); 7] = [
            ("no iss: the local issuer", json!({}), Some(None)),
            (
                "an iss is kept",
                json!({"iss": "https://idp.example"}),
                Some(Some("https://idp.example")),
            ),
            ("empty iss", json!({"iss": ""}), None),
            ("iss not a string", json!({"iss": 7}), None),
            (
                "iss with a control character",
                json!({"iss": "a\u{1}b"}),
                None,
            ),
            ("empty sub", json!({"sub": ""}), None),
            ("sub with a control character", json!({"sub": "a\nb"}), None),
        ];
        for (name, extra, expected) in cases {
            match (a.verify(&token(extra)), expected) {
                (Ok(p), Some(issuer)) => assert_eq!(p.issuer.as_deref(), issuer, "{name}"),
                (Err(e), None) => assert_eq!(e.status(), 401, "{name}"),
                (got, _) => panic!("{name}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn minted_tokens_have_one_subject_per_role() {
        let a = auth();
        let cases = [
            (
                Role::Practitioner,
                Some("Practitioner/7"),
                "practitioner:Practitioner/7",
            ),
            (
                Role::Auditor,
                Some("Practitioner/7"),
                "auditor:Practitioner/7",
            ),
            (Role::Admin, Some("Practitioner/7"), "admin:Practitioner/7"),
            (Role::Admin, None, "admin-cli"),
            (Role::Auditor, None, "auditor-cli"),
        ];
        let mut identities = Vec::new();
        for (role, user, subject) in cases {
            let p = a.verify(&a.issue(role, user, &[], 60).unwrap()).unwrap();
            assert_eq!(p.subject, subject);
            assert_eq!(p.issuer, None, "baton token is the local issuer");
            identities.push(p.identity());
        }
        for (i, x) in identities.iter().enumerate() {
            for y in &identities[i + 1..] {
                assert_ne!(x.subject, y.subject);
            }
        }
    }

    #[test]
    fn authors_stored_without_an_issuer_are_the_local_issuer() {
        let stored = json!({"subject": "Practitioner/1", "role": "practitioner",
            "fhir_user": "Practitioner/1", "performer_types": []});
        let author: Principal = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(author.issuer, None);
        assert_eq!(
            serde_json::to_value(&author).unwrap(),
            stored,
            "a local author is stored as before"
        );
        let remote = Principal {
            issuer: Some("https://idp.example".into()),
            ..author
        };
        let round: Principal =
            serde_json::from_value(serde_json::to_value(&remote).unwrap()).unwrap();
        assert_eq!(round, remote);
    }

    #[test]
    fn an_owner_without_a_reference_is_someone_else() {
        let base = "http://h/fhir";
        let queued_lab = |owner: Value| {
            let mut t = task_owned_by(None, Some("lab"));
            t["owner"] = owner;
            t
        };
        let me = practitioner("Practitioner/1", &["http://x|lab"]);
        let auditor = Principal {
            role: Role::Auditor,
            ..me.clone()
        };
        let admin = Principal {
            role: Role::Admin,
            ..me.clone()
        };
        let owners = [
            json!({"display": "Dr. One"}),
            json!({"identifier": {"system": "http://x", "value": "1"}}),
            json!({"display": "Practitioner/1"}),
        ];
        for owner in owners {
            let task = queued_lab(owner.clone());
            assert!(!may_read_task(&me, &task, base), "{owner}");
            assert!(may_read_task(&auditor, &task, base), "{owner}");
            assert!(may_read_task(&admin, &task, base), "{owner}");
            let claimed = task_owned_by(Some("Practitioner/1"), Some("lab"));
            assert_eq!(
                authorize_task_write(&me, Some(&task), Some(&claimed), base)
                    .unwrap_err()
                    .status(),
                403,
                "claim {owner}"
            );
            assert_eq!(
                authorize_task_write(&me, None, Some(&task), base)
                    .unwrap_err()
                    .status(),
                403,
                "create {owner}"
            );
        }
    }

    #[test]
    fn deleting_and_recreating_take_ownership() {
        let base = "http://h/fhir";
        let me = practitioner("Practitioner/1", &["http://x|lab"]);
        let admin = Principal {
            role: Role::Admin,
            ..me.clone()
        };
        let auditor = Principal {
            role: Role::Auditor,
            ..me.clone()
        };
        let mine = task_owned_by(Some("Practitioner/1"), Some("lab"));
        let theirs = task_owned_by(Some("Practitioner/2"), Some("lab"));
        let queued = task_owned_by(None, Some("lab"));
        let mut display_only = task_owned_by(None, Some("lab"));
        display_only["owner"] = json!({"display": "Dr. One"});
        // (who, the Task as last stored, may delete it and so re-create its id)
        let cases = [
            ("owner", &me, &mine, true),
            ("another's", &me, &theirs, false),
            ("queued, in my queue", &me, &queued, false),
            ("owned by display only", &me, &display_only, false),
            ("admin, another's", &admin, &theirs, true),
            ("admin, queued", &admin, &queued, true),
            ("auditor, any", &auditor, &mine, false),
        ];
        for (name, who, task, allowed) in cases {
            let delete = authorize_task_delete(who, task, base);
            let recreate = authorize_task_recreate(who, task, &TaskId::parse("t1").unwrap(), base);
            assert_eq!(delete.is_ok(), allowed, "delete: {name}");
            assert_eq!(recreate.is_ok(), allowed, "re-create: {name}");
            for refused in [delete, recreate].into_iter().filter_map(Result::err) {
                assert_eq!(refused.status(), 403, "{name}");
            }
        }
    }
}
