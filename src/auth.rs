//! Bearer-token authentication and the role rules of the design.
//!
//! Tokens are HS256 JWTs with `sub`, `exp`, `role` and (for practitioners) `fhirUser`. The
//! algorithm is pinned: a token whose header names any other algorithm, `none` included, is
//! rejected. The rules deciding who may read or write a Task are plain functions of the
//! principal and the resource, so the API, search and (later) every notification apply the
//! very same rule.

use std::path::Path;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};
use crate::fhir::search::{Predicate, SystemMatch, TokenValue};
use crate::fhir::task;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Principal {
    pub subject: String,
    pub role: Role,
    /// `Type/id` of the FHIR user behind the token; always present for practitioners.
    pub fhir_user: Option<String>,
    pub performer_types: Vec<PerformerType>,
}

/// Verifies and mints tokens with one HS256 key.
#[derive(Clone)]
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    performer_types_claim: String,
}

impl Authenticator {
    pub fn new(secret: &str, leeway_seconds: u64, performer_types_claim: &str) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_seconds;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            validation,
            performer_types_claim: performer_types_claim.to_string(),
        }
    }

    /// Verifies a bearer token and turns its claims into a principal.
    pub fn verify(&self, token: &str) -> Result<Principal> {
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &self.decoding, &self.validation)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind;
                    let why = match e.kind() {
                        ErrorKind::ExpiredSignature => "the token has expired",
                        ErrorKind::InvalidSignature => "the token signature is not valid",
                        ErrorKind::InvalidAlgorithm => "the token must be signed with HS256",
                        ErrorKind::MissingRequiredClaim(_) => {
                            "the token must carry 'sub' and 'exp'"
                        }
                        _ => "the token is malformed",
                    };
                    Error::unauthorized(why)
                })?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::unauthorized("the token's 'sub' claim must be a string"))?
            .to_string();
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
        Ok(Principal {
            subject,
            role,
            fhir_user,
            performer_types,
        })
    }

    /// Mints a token, for `baton token`, the start-up admin token and the tests.
    pub fn issue(
        &self,
        role: Role,
        fhir_user: Option<&str>,
        performer_types: &[String],
        ttl_seconds: u64,
    ) -> Result<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let subject = fhir_user.map_or_else(|| format!("{}-cli", role.as_str()), str::to_string);
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

impl<S> FromRequestParts<S> for Principal
where
    S: Send + Sync + AsRef<Authenticator> + crate::api::rate_limit::RateLimited,
{
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                Error::unauthorized("an 'Authorization: Bearer <token>' header is required")
            })?;
        let value = header
            .to_str()
            .map_err(|_| Error::unauthorized("the Authorization header is not valid text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::unauthorized("the Authorization header must use the Bearer scheme")
            })?;
        let principal = state.as_ref().verify(token)?;
        // Only a verified identity is counted, so unverified text never grows the limiter.
        state.request_limiter().admit(&principal)?;
        Ok(principal)
    }
}

/// Whether the principal may read this Task: the one read rule of the design, applied to
/// reads, searches and notifications alike.
pub fn may_read_task(principal: &Principal, resource: &Value, base_url: &str) -> bool {
    match principal.role {
        Role::Admin | Role::Auditor => true,
        Role::Practitioner => {
            let owner = task::owner(resource, base_url);
            match owner {
                Some(owner) => Some(&owner) == principal.fhir_user.as_ref(),
                None => in_role_queue(principal, resource),
            }
        }
    }
}

/// Whether an unowned Task waits in one of the practitioner's role queues.
fn in_role_queue(principal: &Principal, resource: &Value) -> bool {
    task::performer_types(resource)
        .iter()
        .any(|(system, code)| {
            principal
                .performer_types
                .iter()
                .any(|p| p.matches(system.as_deref(), code))
        })
}

/// The read rule as a search predicate, so that searches only ever see readable Tasks.
/// `None` means no restriction.
pub fn read_scope(principal: &Principal) -> Option<Predicate> {
    if principal.role != Role::Practitioner {
        return None;
    }
    let me = principal.fhir_user.clone().unwrap_or_default();
    let owned = Predicate::Token {
        param: "owner",
        negated: false,
        any_of: vec![TokenValue {
            system: SystemMatch::Any,
            code: Some(me),
        }],
    };
    if principal.performer_types.is_empty() {
        return Some(owned);
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
    Some(Predicate::Or(vec![owned, queue]))
}

/// Checks a Task write against the role rules: `before` is the current version (None on
/// create), `after` the proposed one (None on delete). Both must already be valid Tasks.
pub fn authorize_task_write(
    principal: &Principal,
    before: Option<&Value>,
    after: Option<&Value>,
    base_url: &str,
) -> Result<()> {
    match principal.role {
        Role::Admin => Ok(()),
        Role::Auditor => Err(Error::forbidden("auditors have read-only access to Tasks")),
        Role::Practitioner => {
            let me = principal.fhir_user.as_deref().unwrap_or_default();
            if let Some(before) = before
                && !may_read_task(principal, before, base_url)
            {
                return Err(Error::forbidden(format!(
                    "this Task is not owned by {me} and not in one of its role queues"
                )));
            }
            let Some(after) = after else {
                return Ok(());
            };
            match task::owner(after, base_url) {
                Some(owner) if owner == me => Ok(()),
                Some(owner) => Err(Error::forbidden(format!(
                    "a practitioner may only own its own Tasks: Task.owner must be {me}, not {owner}"
                ))),
                // Releasing a claim returns the Task to the queue; allowed only while the
                // practitioner can still see it there, so nobody hands work into the void.
                None if before.is_some() && in_role_queue(principal, after) => Ok(()),
                None => Err(Error::forbidden(format!(
                    "a practitioner may only create or keep Tasks it owns: set Task.owner to {me}"
                ))),
            }
        }
    }
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

    fn practitioner(user: &str, types: &[&str]) -> Principal {
        Principal {
            subject: user.into(),
            role: Role::Practitioner,
            fhir_user: Some(user.into()),
            performer_types: types
                .iter()
                .filter_map(|t| PerformerType::parse(t))
                .collect(),
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
        assert!(
            ok(authorize_task_write(&me, Some(&mine), None, base)),
            "delete own"
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
}
