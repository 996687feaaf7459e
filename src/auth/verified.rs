//! Issuer tokens already verified, so that a client sending the same token with every request
//! pays for one signature check, not one per request.
//!
//! An RS256 or ES256 signature check costs tens to hundreds of microseconds of CPU (RustCrypto),
//! which at thousands of requests a second is a large share of a core (BENCHMARKS.md, "Tokens
//! from an identity provider"). An HS256 check is cheaper, but with the base64 and JSON of the
//! token, the duplicate-key check and the principal built from the claims it was still ~8 % of
//! the API workers' time on single Task creates. What is cached is what a token verified to
//! (an issuer's token: its claims; a local HS256 token: its principal), keyed by the SHA-256 of
//! the whole token (so no bearer token is kept in memory, and a token differing in any byte is
//! a different entry), together with the key that verified it and the token's `exp`. A hit is
//! used only if:
//! - the issuer still publishes that key, as fetched by the same JWKS fetch (`Key::fetch`), so
//!   a key removed or replaced at the provider stops its tokens exactly as without the cache;
//!   the caller looks the key up (refreshing the keys when due) before asking the cache (the
//!   local HS256 key is fixed for the process's life: one key, never fetched);
//! - the token has not expired, with the same leeway as a full check.
//!
//! `nbf`, `iss`, `aud` and the signature are properties of the token's bytes and of time moving
//! forward, so a token that passed them once passes them again. The cache is bounded: when
//! full, expired entries go first, and if none has expired the cache starts over (a full
//! check costs only the signature again).

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Most tokens remembered per issuer: about the number of distinct clients and users active
/// within a token's lifetime, at ~1 KB of claims each.
pub const MAX_VERIFIED_TOKENS: usize = 16_384;

/// The digest a token is remembered by.
pub type TokenDigest = [u8; 32];

pub fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

struct Entry<T> {
    /// Which fetch of the issuer's keys the verifying key came from.
    key_fetch: u64,
    kid: Box<str>,
    /// The token's `exp`, in seconds since the Unix epoch.
    expires_at: u64,
    verified: T,
}

/// One issuer's verified tokens: what each verified to (by default its claims).
pub struct VerifiedTokens<T = Map<String, Value>> {
    entries: Mutex<HashMap<TokenDigest, Entry<T>>>,
    capacity: usize,
    leeway: u64,
}

impl<T: Clone> VerifiedTokens<T> {
    pub fn new(capacity: usize, leeway: u64) -> VerifiedTokens<T> {
        VerifiedTokens {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            leeway,
        }
    }

    /// What a token verified before by the key `kid` of fetch `key_fetch` verified to, if it
    /// has not expired at `now` (seconds since the Unix epoch). An entry that no longer holds
    /// is dropped.
    pub fn get(&self, digest: &TokenDigest, kid: &str, key_fetch: u64, now: u64) -> Option<T> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.get(digest)?;
        if entry.key_fetch == key_fetch
            && *entry.kid == *kid
            && now <= entry.expires_at.saturating_add(self.leeway)
        {
            return Some(entry.verified.clone());
        }
        entries.remove(digest);
        None
    }

    /// Remembers what a token whose `exp` claim is `exp` verified to; a token without a
    /// numeric `exp` is not remembered (a full check requires one anyway).
    pub fn insert(
        &self,
        digest: TokenDigest,
        kid: &str,
        key_fetch: u64,
        exp: Option<&Value>,
        verified: T,
        now: u64,
    ) {
        let Some(expires_at) = exp.and_then(Value::as_u64) else {
            return;
        };
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity && !entries.contains_key(&digest) {
            let leeway = self.leeway;
            entries.retain(|_, e| now <= e.expires_at.saturating_add(leeway));
            if entries.len() >= self.capacity {
                entries.clear();
            }
        }
        entries.insert(
            digest,
            Entry {
                key_fetch,
                kid: kid.into(),
                expires_at,
                verified,
            },
        );
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(exp: u64) -> Map<String, Value> {
        json!({"sub": "s", "exp": exp}).as_object().unwrap().clone()
    }

    /// Remembers `claims` as the issuers do: under their own `exp`.
    fn remember(
        cache: &VerifiedTokens,
        token: TokenDigest,
        kid: &str,
        fetch: u64,
        claims: &Map<String, Value>,
        now: u64,
    ) {
        cache.insert(token, kid, fetch, claims.get("exp"), claims.clone(), now);
    }

    #[test]
    fn a_verified_token_is_remembered_until_it_expires_with_the_leeway() {
        let cache = VerifiedTokens::new(8, 30);
        let token = digest("a.b.c");
        remember(&cache, token, "k1", 1, &claims(1_000), 900);
        assert_eq!(cache.get(&token, "k1", 1, 999), Some(claims(1_000)));
        assert_eq!(cache.get(&token, "k1", 1, 1_030), Some(claims(1_000)));
        assert_eq!(cache.get(&token, "k1", 1, 1_031), None, "expired");
        assert!(cache.is_empty(), "an expired entry is dropped when met");
    }

    #[test]
    fn a_hit_needs_the_same_key_from_the_same_fetch() {
        let cache = VerifiedTokens::new(8, 0);
        let token = digest("a.b.c");
        remember(&cache, token, "k1", 1, &claims(1_000), 900);
        assert_eq!(cache.get(&token, "k1", 2, 950), None, "keys fetched again");
        remember(&cache, token, "k1", 1, &claims(1_000), 900);
        assert_eq!(cache.get(&token, "k2", 1, 950), None, "another key");
        assert_eq!(
            cache.get(&digest("a.b.d"), "k1", 1, 950),
            None,
            "another token"
        );
    }

    #[test]
    fn a_token_without_a_numeric_exp_is_not_remembered() {
        let cache = VerifiedTokens::new(8, 0);
        let mut no_exp = claims(0);
        no_exp.remove("exp");
        remember(&cache, digest("x"), "k", 1, &no_exp, 0);
        no_exp.insert("exp".into(), json!("1000"));
        remember(&cache, digest("y"), "k", 1, &no_exp, 0);
        assert!(cache.is_empty());
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first_then_starts_over() {
        let cache = VerifiedTokens::new(3, 0);
        remember(&cache, digest("old"), "k", 1, &claims(100), 50);
        remember(&cache, digest("a"), "k", 1, &claims(1_000), 50);
        remember(&cache, digest("b"), "k", 1, &claims(1_000), 50);
        // At 200 "old" has expired: it makes room.
        remember(&cache, digest("c"), "k", 1, &claims(1_000), 200);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&digest("a"), "k", 1, 200).is_some());
        // Nothing has expired: the cache starts over with the new entry.
        remember(&cache, digest("d"), "k", 1, &claims(1_000), 200);
        assert_eq!(cache.len(), 1);
        assert!(cache.get(&digest("d"), "k", 1, 200).is_some());
    }
}
