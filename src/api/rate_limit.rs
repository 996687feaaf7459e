//! Per-identity request rates (`limits.requests_per_second_per_token`, with
//! `limits.request_burst_per_token` as the burst), with governor's keyed GCRA limiter.
//!
//! The key is the verified identity (`auth::Identity`: issuer, subject, role and fhirUser),
//! never the token text: only a
//! token that verified can add a key, and new tokens for one identity share its budget. Admins
//! (the placer systems and integration engines) are not limited. The check runs where the
//! principal is produced (the `Principal` extractor, `api::principal`), so every authenticated
//! request is counted once and unauthenticated ones (`/fhir/metadata`, the websocket upgrade)
//! are not.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use crate::auth::{Identity, Principal, Role};
use crate::config::LimitsConfig;
use crate::error::{Error, Result};

/// The node's request-rate limiter; cheap to clone. Off when the rate is 0.
#[derive(Clone)]
pub struct RequestLimiter {
    limiter: Option<Arc<DefaultKeyedRateLimiter<Identity>>>,
}

impl RequestLimiter {
    pub fn new(limits: &LimitsConfig) -> RequestLimiter {
        let limiter = NonZeroU32::new(limits.requests_per_second_per_token).map(|rate| {
            // `validate` requires a burst of at least 1 while a rate is set.
            let burst = NonZeroU32::new(limits.request_burst_per_token).unwrap_or(rate);
            Arc::new(RateLimiter::keyed(
                Quota::per_second(rate).allow_burst(burst),
            ))
        });
        RequestLimiter { limiter }
    }

    /// Counts one request of this principal: `Err` (429 with `Retry-After`) when its identity
    /// has used up its budget. A refused request does not use any.
    pub fn admit(&self, principal: &Principal) -> Result<()> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if principal.role == Role::Admin {
            return Ok(());
        }
        match limiter.check_key(&principal.identity()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(limiter.clock().now());
                metrics::counter!("baton_requests_throttled_total", "role" => principal.role.as_str())
                    .increment(1);
                Err(Error::too_many_requests(
                    "too many requests for this identity (limits.requests_per_second_per_token); retry after the time in Retry-After",
                    retry_after_seconds(wait),
                ))
            }
        }
    }

    /// Identities with a budget in use; the rest were forgotten by `keep_small`.
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    /// Forgets identities whose budget is full again (they would start fresh anyway) every
    /// `every`, so the table holds only recent callers, not everyone ever seen.
    pub async fn keep_small(self, every: Duration, stop: CancellationToken) {
        let Some(limiter) = self.limiter else {
            // Off: nothing to keep small, but the task lives as long as the node.
            stop.cancelled().await;
            return;
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
            limiter.retain_recent();
            limiter.shrink_to_fit();
            metrics::gauge!("baton_rate_limited_identities").set(limiter.len() as f64);
        }
    }
}

/// `Retry-After` is in whole seconds: round up, and never say 0 (that invites an instant retry
/// that would be refused again).
fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

/// States whose extractor applies the request-rate limit (the `Principal` extractor).
pub trait RateLimited {
    fn request_limiter(&self) -> &RequestLimiter;
}

impl RateLimited for super::AppState {
    fn request_limiter(&self) -> &RequestLimiter {
        &self.inner.rate_limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(subject: &str, role: Role, fhir_user: Option<&str>) -> Principal {
        Principal {
            issuer: None,
            subject: subject.into(),
            role,
            fhir_user: fhir_user.map(str::to_string),
            performer_types: Vec::new(),
            scopes: None,
            patient: None,
        }
    }

    fn limits(rate: u32, burst: u32) -> LimitsConfig {
        LimitsConfig {
            requests_per_second_per_token: rate,
            request_burst_per_token: burst,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn retry_after_rounds_up_to_at_least_a_second() {
        let cases = [
            (Duration::ZERO, 1),
            (Duration::from_millis(1), 1),
            (Duration::from_millis(999), 1),
            (Duration::from_secs(1), 1),
            (Duration::from_millis(1001), 2),
            (Duration::from_secs(30), 30),
        ];
        for (wait, expected) in cases {
            assert_eq!(retry_after_seconds(wait), expected, "{wait:?}");
        }
    }

    #[test]
    fn each_identity_has_its_own_budget_and_admins_none() {
        // One request per second with a burst of two: the third at once is refused.
        let limiter = RequestLimiter::new(&limits(1, 2));
        let alice = principal("alice", Role::Practitioner, Some("Practitioner/alice"));
        assert!(limiter.admit(&alice).is_ok());
        assert!(limiter.admit(&alice).is_ok());
        let refused = limiter.admit(&alice).unwrap_err();
        let client = refused.as_client().expect("a client error");
        assert_eq!(client.status.as_u16(), 429);
        assert!(client.retry_after.is_some_and(|s| s >= 1));

        // The same subject under another role or fhirUser is another identity.
        let cases = [
            principal("alice", Role::Auditor, Some("Practitioner/alice")),
            principal("alice", Role::Practitioner, Some("Practitioner/other")),
            principal("bob", Role::Practitioner, Some("Practitioner/alice")),
        ];
        for other in cases {
            assert!(limiter.admit(&other).is_ok(), "{other:?}");
        }
        let admin = principal("admin-cli", Role::Admin, None);
        for _ in 0..100 {
            assert!(limiter.admit(&admin).is_ok(), "admins are not limited");
        }
        assert_eq!(limiter.tracked(), 4, "admins leave no key");
    }

    #[test]
    fn a_rate_of_zero_turns_it_off() {
        let limiter = RequestLimiter::new(&limits(0, 0));
        let alice = principal("alice", Role::Practitioner, Some("Practitioner/alice"));
        for _ in 0..100 {
            assert!(limiter.admit(&alice).is_ok());
        }
        assert_eq!(limiter.tracked(), 0);
    }
}
