//! Trusted identity providers (`[[auth.issuers]]`): their signing keys, fetched from a JWKS
//! and cached, and the checks a token of theirs must pass.
//!
//! - **Keys** come from the issuer's `jwks_uri`, or from its OIDC discovery document when none
//!   is configured. They are fetched once at start-up (in the background), again when the cache
//!   is older than `auth.jwks_cache_seconds`, and again when a token names a `kid` the cache
//!   does not hold (a rotated key) — but never more often than once per
//!   `auth.jwks_min_refresh_seconds` per issuer, so a flood of tokens with bogus `kid`s costs
//!   the provider one fetch per interval. A failed fetch keeps the keys already cached: the
//!   provider being down does not stop tokens it signed before; `/readyz` reports it.
//! - **The algorithm** is the token's only if the issuer's configuration allows it and the key
//!   named by `kid` is of that algorithm (its `kty`, its curve, its `alg` when the JWK has
//!   one). HMAC keys are never taken from a JWKS, and `none` is not an algorithm here.
//! - `iss` must be the configured issuer exactly, `aud` must include the configured audience,
//!   and `exp` / `nbf` are checked with `auth.leeway_seconds`.
//!
//! When to fetch is a pure function (`refresh_due`) of the cache's times, tested without a
//! network.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio::time::Instant;

use super::verified::{self, MAX_VERIFIED_TOKENS, VerifiedTokens};
use crate::config::{AuthConfig, IssuerConfig};
use crate::error::{Error, Result};

/// One of the asymmetric algorithms an issuer may be configured with
/// (`config::ISSUER_ALGORITHMS`); HMAC is only for the local secret, so it is not one of them.
pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        "PS256" => Some(Algorithm::PS256),
        "PS384" => Some(Algorithm::PS384),
        "PS512" => Some(Algorithm::PS512),
        "ES256" => Some(Algorithm::ES256),
        "ES384" => Some(Algorithm::ES384),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// How long keys are trusted without asking again, and how often the provider may be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTiming {
    pub cache: Duration,
    pub min_refresh: Duration,
}

/// When the keys were last fetched and last tried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Freshness {
    /// The last successful fetch.
    pub fetched_at: Option<Instant>,
    /// The last attempt, successful or not.
    pub attempted_at: Option<Instant>,
}

/// Whether to fetch the JWKS now: never within `min_refresh` of the last attempt; otherwise when
/// the token's `kid` is not cached, when nothing was ever fetched, or when the cache is older
/// than `cache`.
pub fn refresh_due(now: Instant, freshness: Freshness, kid_known: bool, timing: KeyTiming) -> bool {
    if let Some(attempted) = freshness.attempted_at
        && now.saturating_duration_since(attempted) < timing.min_refresh
    {
        return false;
    }
    if !kid_known {
        return true;
    }
    match freshness.fetched_at {
        None => true,
        Some(fetched) => now.saturating_duration_since(fetched) >= timing.cache,
    }
}

/// A verification key from a JWKS.
#[derive(Clone)]
struct Key {
    decoding: DecodingKey,
    /// The number of the fetch this key came from (`KeyState::fetches`), which ties the
    /// tokens it verified (`verified::VerifiedTokens`) to exactly this key.
    fetch: u64,
    /// The algorithms this key may verify: from its `alg` when the JWK names one, else from its
    /// type (and curve).
    algorithms: Vec<Algorithm>,
}

/// What the provider's discovery document says, as far as Baton uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub jwks_uri: Option<String>,
    pub token_endpoint: Option<String>,
    pub authorization_endpoint: Option<String>,
}

#[derive(Default)]
struct KeyState {
    keys: HashMap<String, Key>,
    freshness: Freshness,
    /// Why the last attempt failed; None after a success.
    last_error: Option<String>,
    /// Successful fetches so far.
    fetches: u64,
    endpoints: Option<Endpoints>,
}

/// One trusted issuer and its cached keys.
pub struct Issuer {
    pub config: IssuerConfig,
    algorithms: Vec<Algorithm>,
    state: Mutex<KeyState>,
    /// Held while fetching, so that concurrent requests with a new `kid` wait for one fetch
    /// instead of each starting their own.
    fetching: tokio::sync::Mutex<()>,
    /// Its tokens verified before, reused while their key stands and they have not expired.
    verified: VerifiedTokens,
}

/// The state of one issuer's keys, for `/readyz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IssuerStatus {
    pub issuer: String,
    /// `ok`, `pending` (never fetched yet) or `unreachable` (the last fetch failed).
    pub status: &'static str,
    pub keys: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every configured issuer, and the HTTP client that fetches their keys.
pub struct Issuers {
    list: Vec<Arc<Issuer>>,
    client: reqwest::Client,
    timing: KeyTiming,
    leeway: u64,
}

/// Most bytes read of a discovery document or JWKS.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

impl Issuers {
    pub fn new(config: &AuthConfig) -> Issuers {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_default();
        Issuers {
            list: config
                .issuers
                .iter()
                .map(|c| {
                    Arc::new(Issuer {
                        algorithms: c
                            .algorithms
                            .iter()
                            .filter_map(|a| parse_algorithm(a))
                            .collect(),
                        config: c.clone(),
                        state: Mutex::new(KeyState::default()),
                        fetching: tokio::sync::Mutex::new(()),
                        verified: VerifiedTokens::new(MAX_VERIFIED_TOKENS, config.leeway_seconds),
                    })
                })
                .collect(),
            client,
            timing: KeyTiming {
                cache: Duration::from_secs(config.jwks_cache_seconds),
                min_refresh: Duration::from_secs(config.jwks_min_refresh_seconds),
            },
            leeway: config.leeway_seconds,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn all(&self) -> &[Arc<Issuer>] {
        &self.list
    }

    /// The configured issuer whose `issuer` is exactly `iss`.
    pub fn find(&self, iss: &str) -> Option<&Arc<Issuer>> {
        self.list.iter().find(|i| i.config.issuer == iss)
    }

    /// Fetches every issuer's keys once, so the first tokens do not wait for it.
    pub async fn warm_up(&self) {
        for issuer in &self.list {
            let _guard = issuer.fetching.lock().await;
            self.refresh(issuer).await;
        }
    }

    pub fn status(&self) -> Vec<IssuerStatus> {
        self.list
            .iter()
            .map(|issuer| {
                let state = issuer.state.lock().unwrap_or_else(|e| e.into_inner());
                let status = match (&state.last_error, state.freshness.fetched_at) {
                    (Some(_), _) => "unreachable",
                    (None, None) => "pending",
                    (None, Some(_)) => "ok",
                };
                IssuerStatus {
                    issuer: issuer.config.issuer.clone(),
                    status,
                    keys: state.keys.len(),
                    error: state.last_error.clone(),
                }
            })
            .collect()
    }

    /// The endpoints from the first issuer's discovery document (fetched with its keys), for
    /// SMART discovery; None before it was read or when the issuer has none.
    pub fn endpoints(&self, issuer: &Issuer) -> Option<Endpoints> {
        let state = issuer.state.lock().unwrap_or_else(|e| e.into_inner());
        state.endpoints.clone()
    }

    /// Verifies a token of `issuer` (whose `iss` claim, not yet verified, named it) and returns
    /// its verified claims.
    pub async fn verify(&self, issuer: &Issuer, token: &str) -> Result<Map<String, Value>> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Error::unauthorized("the token's header is malformed"))?;
        let alg = header.alg;
        if !issuer.algorithms.contains(&alg) {
            return Err(Error::unauthorized(format!(
                "the token is signed with {alg:?}, which is not allowed for the issuer '{}' (allowed: {})",
                issuer.config.issuer,
                issuer.config.algorithms.join(", ")
            )));
        }
        let kid = header.kid.filter(|k| !k.is_empty()).ok_or_else(|| {
            Error::unauthorized("the token's header must name its signing key ('kid')")
        })?;
        let key = self.key(issuer, &kid).await.ok_or_else(|| {
            Error::unauthorized(format!(
                "the token's signing key '{}' is not among the keys published by its issuer",
                kid.escape_debug()
            ))
        })?;
        if !key.algorithms.contains(&alg) {
            return Err(Error::unauthorized(format!(
                "the token's algorithm {alg:?} does not match its signing key"
            )));
        }
        let digest = verified::digest(token);
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(claims) = issuer.verified.get(&digest, &kid, key.fetch, now) {
            metrics::counter!("baton_issuer_tokens_verified_total", "check" => "cached")
                .increment(1);
            return Ok(claims);
        }
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = self.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_issuer(&[&issuer.config.issuer]);
        validation.set_audience(&[&issuer.config.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                Error::unauthorized(match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired".to_string(),
                    ErrorKind::ImmatureSignature => {
                        "the token is not valid yet: its 'nbf' (not before) time is in the future"
                            .to_string()
                    }
                    ErrorKind::InvalidAudience => format!(
                        "the token's audience ('aud') must include '{}'",
                        issuer.config.audience
                    ),
                    ErrorKind::InvalidIssuer => "the token's issuer is not trusted".to_string(),
                    ErrorKind::InvalidSignature => "the token signature is not valid".to_string(),
                    ErrorKind::MissingRequiredClaim(claim) => {
                        format!("the token must carry '{claim}'")
                    }
                    ErrorKind::InvalidClaimFormat(_) => {
                        "the token's 'exp' and 'nbf' claims must be numeric dates".to_string()
                    }
                    _ => "the token is malformed or its signature is not valid".to_string(),
                })
            })?;
        metrics::counter!("baton_issuer_tokens_verified_total", "check" => "verified").increment(1);
        issuer.verified.insert(
            digest,
            &kid,
            key.fetch,
            data.claims.get("exp"),
            data.claims.clone(),
            now,
        );
        Ok(data.claims)
    }

    /// The key named `kid`, fetching the JWKS first when `refresh_due` says so.
    async fn key(&self, issuer: &Issuer, kid: &str) -> Option<Key> {
        let due = |now| {
            let state = issuer.state.lock().unwrap_or_else(|e| e.into_inner());
            let key = state.keys.get(kid).cloned();
            let due = refresh_due(now, state.freshness, key.is_some(), self.timing);
            (key, due)
        };
        let (key, refresh) = due(Instant::now());
        if key.is_some() && !refresh {
            return key;
        }
        // An unknown kid waits for a fetch under way (the start-up one, or another request's)
        // before concluding the key does not exist.
        let _guard = issuer.fetching.lock().await;
        // Another request may have fetched while this one waited.
        let (key, refresh) = due(Instant::now());
        if !refresh {
            return key;
        }
        self.refresh(issuer).await;
        let state = issuer.state.lock().unwrap_or_else(|e| e.into_inner());
        state.keys.get(kid).cloned()
    }

    /// Fetches the issuer's keys (after its discovery document, when needed) and replaces the
    /// cached ones; on failure keeps them and records why. The caller holds `fetching`.
    async fn refresh(&self, issuer: &Issuer) {
        {
            let mut state = issuer.state.lock().unwrap_or_else(|e| e.into_inner());
            state.freshness.attempted_at = Some(Instant::now());
        }
        metrics::counter!("baton_jwks_fetches_total").increment(1);
        let result = self.fetch(issuer).await;
        let mut state = issuer.state.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok((endpoints, mut keys)) => {
                tracing::info!(issuer = %issuer.config.issuer, keys = keys.len(), "fetched the issuer's signing keys");
                state.fetches += 1;
                for key in keys.values_mut() {
                    key.fetch = state.fetches;
                }
                state.keys = keys;
                state.endpoints = Some(endpoints);
                state.freshness.fetched_at = Some(Instant::now());
                state.last_error = None;
            }
            Err(why) => {
                metrics::counter!("baton_jwks_fetch_failures_total").increment(1);
                tracing::warn!(issuer = %issuer.config.issuer, error = %why, cached_keys = state.keys.len(), "fetching the issuer's signing keys failed; keeping the cached keys");
                state.last_error = Some(why);
            }
        }
    }

    async fn fetch(&self, issuer: &Issuer) -> Result<(Endpoints, HashMap<String, Key>), String> {
        let endpoints = match &issuer.config.jwks_uri {
            Some(uri) => Endpoints {
                jwks_uri: Some(uri.clone()),
                ..Default::default()
            },
            None => self.discover(&issuer.config.issuer).await?,
        };
        let jwks_uri = endpoints
            .jwks_uri
            .clone()
            .ok_or("the discovery document has no jwks_uri")?;
        let jwks = self.get_json(&jwks_uri).await?;
        let keys = parse_jwks(&jwks)?;
        Ok((endpoints, keys))
    }

    async fn discover(&self, issuer: &str) -> Result<Endpoints, String> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let document = self.get_json(&url).await?;
        // OpenID Connect Discovery 1.0 section 4.3: the document must be the issuer's own.
        if document.get("issuer").and_then(Value::as_str) != Some(issuer) {
            return Err(format!(
                "the discovery document at {url} names another issuer"
            ));
        }
        let text = |name: &str| document.get(name).and_then(Value::as_str).map(String::from);
        Ok(Endpoints {
            jwks_uri: text("jwks_uri"),
            token_endpoint: text("token_endpoint"),
            authorization_endpoint: text("authorization_endpoint"),
        })
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let mut response = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url} failed: {}", crate::error::error_chain(&e)))?;
        if !response.status().is_success() {
            return Err(format!("GET {url} answered {}", response.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading {url} failed: {e}"))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_DOCUMENT_BYTES {
                return Err(format!("{url} is larger than {MAX_DOCUMENT_BYTES} bytes"));
            }
        }
        serde_json::from_slice(&body).map_err(|e| format!("{url} is not JSON: {e}"))
    }
}

/// The signing keys of a JWKS document, by `kid`. Keys without a `kid`, for encryption, of a
/// symmetric type, or that jsonwebtoken cannot read are left out (a JWKS may publish keys for
/// other uses); a document that is not a JWKS at all is an error.
fn parse_jwks(document: &Value) -> Result<HashMap<String, Key>, String> {
    let items = document
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("the JWKS has no 'keys' list")?;
    let mut keys = HashMap::new();
    for item in items {
        let Ok(jwk) = serde_json::from_value::<Jwk>(item.clone()) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone().filter(|k| !k.is_empty()) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let by_type: Vec<Algorithm> = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => continue,
            },
            AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
            // Never a shared secret from a published key set.
            _ => continue,
        };
        let algorithms = match jwk.common.key_algorithm {
            None => by_type,
            Some(named) => {
                let named = format!("{named:?}");
                by_type
                    .into_iter()
                    .filter(|a| format!("{a:?}") == named)
                    .collect()
            }
        };
        if algorithms.is_empty() {
            continue;
        }
        let Ok(decoding) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        keys.insert(
            kid,
            Key {
                decoding,
                fetch: 0,
                algorithms,
            },
        );
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_configurable_algorithm_is_read_and_no_other() {
        for name in crate::config::ISSUER_ALGORITHMS {
            assert!(parse_algorithm(name).is_some(), "{name}");
        }
        for name in ["HS256", "HS384", "HS512", "none", "rs256", ""] {
            assert_eq!(parse_algorithm(name), None, "{name}");
        }
    }

    #[test]
    fn keys_are_fetched_when_unknown_or_stale_and_never_too_often() {
        let start = Instant::now();
        let s = Duration::from_secs;
        let timing = KeyTiming {
            cache: s(300),
            min_refresh: s(10),
        };
        let fresh = |fetched: u64, attempted: u64| Freshness {
            fetched_at: Some(start + s(fetched)),
            attempted_at: Some(start + s(attempted)),
        };
        let never = Freshness::default();
        let failed_once = Freshness {
            fetched_at: None,
            attempted_at: Some(start),
        };
        // (name, now, freshness, kid known, due)
        let cases = [
            ("never fetched", 0, never, false, true),
            ("known kid, fresh cache", 20, fresh(0, 0), true, false),
            (
                "unknown kid, past the interval",
                20,
                fresh(0, 0),
                false,
                true,
            ),
            (
                "unknown kid, within the interval",
                5,
                fresh(0, 0),
                false,
                false,
            ),
            ("known kid, stale cache", 300, fresh(0, 0), true, true),
            (
                "known kid, stale, attempted just now (provider down)",
                305,
                fresh(0, 300),
                true,
                false,
            ),
            (
                "first fetch failed, retried after the interval",
                10,
                failed_once,
                false,
                true,
            ),
            (
                "first fetch failed, within the interval",
                9,
                failed_once,
                false,
                false,
            ),
        ];
        for (name, now, freshness, known, expected) in cases {
            assert_eq!(
                refresh_due(start + s(now), freshness, known, timing),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn only_asymmetric_signing_keys_are_taken_from_a_jwks() {
        // A real P-256 point and a real RSA modulus (from RFC 7517 appendix A.1).
        let ec = json!({"kty": "EC", "crv": "P-256", "kid": "ec",
            "x": "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",
            "y": "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM"});
        let rsa = json!({"kty": "RSA", "kid": "rsa", "e": "AQAB",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        let cases = [
            (
                "rsa",
                rsa.clone(),
                Some(vec![
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ]),
            ),
            ("ec", ec.clone(), Some(vec![Algorithm::ES256])),
            (
                "rsa with alg",
                {
                    let mut k = rsa.clone();
                    k["alg"] = json!("PS256");
                    k
                },
                Some(vec![Algorithm::PS256]),
            ),
            (
                "rsa claiming ES256",
                {
                    let mut k = rsa.clone();
                    k["alg"] = json!("ES256");
                    k
                },
                None,
            ),
            (
                "encryption key",
                {
                    let mut k = rsa.clone();
                    k["use"] = json!("enc");
                    k
                },
                None,
            ),
            (
                "no kid",
                {
                    let mut k = ec.clone();
                    k.as_object_mut().unwrap().remove("kid");
                    k
                },
                None,
            ),
            (
                "shared secret",
                json!({"kty": "oct", "kid": "oct", "k": "c2VjcmV0"}),
                None,
            ),
            ("garbage", json!({"kty": "RSA", "kid": "bad"}), None),
        ];
        for (name, key, expected) in cases {
            let keys = parse_jwks(&json!({"keys": [key]})).unwrap();
            let got = keys.values().next().map(|k| k.algorithms.clone());
            assert_eq!(got, expected, "{name}");
        }
        assert!(parse_jwks(&json!({"nokeys": []})).is_err());
    }
}
