//! When to try a failed delivery again: the retry policy as data, and one pure function that
//! turns a failure into the next step.
//!
//! Nothing here sleeps or reads the clock. The delivery worker passes in how long the endpoint
//! has been failing, what it asked for in `Retry-After` and a random number, and stores the
//! answer in the durable queue, so a restart neither loses nor hurries a retry.

use std::time::Duration;

use crate::config::DeliveryConfig;

/// The longest wait an endpoint can impose through `Retry-After`. Without a cap, one answer
/// could park a subscription's whole queue for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// How a subscription's failed deliveries are retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// The delay before attempt n+1 after n failures; the last delay repeats.
    pub schedule: Vec<Duration>,
    /// How far a delay may move either way, as a fraction in 0..=1 (0.2 is ±20%). Jitter keeps
    /// endpoints that failed together from being retried together.
    pub jitter_ratio: f64,
    /// The number of consecutive failures after which the subscription's status becomes `error`.
    pub error_after_failures: u32,
    /// The retry horizon, measured from the first failure in the current run of failures. A retry
    /// that would fall beyond it turns the subscription `off` instead.
    pub off_after: Duration,
}

impl Default for RetryPolicy {
    /// Quick retries for blips, then backing off to hourly, with the subscription marked `error`
    /// after five failures and switched off after three days of failing.
    fn default() -> Self {
        RetryPolicy {
            schedule: [5, 30, 120, 600, 1800, 3600]
                .map(Duration::from_secs)
                .to_vec(),
            jitter_ratio: 0.2,
            error_after_failures: 5,
            off_after: Duration::from_secs(3 * 24 * 60 * 60),
        }
    }
}

impl From<&DeliveryConfig> for RetryPolicy {
    /// The policy the configuration describes, built once when delivery starts.
    fn from(config: &DeliveryConfig) -> Self {
        RetryPolicy {
            schedule: config
                .retry_schedule_seconds
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            jitter_ratio: config.jitter_ratio,
            error_after_failures: config.error_after_failures,
            off_after: Duration::from_secs(config.off_after_seconds),
        }
    }
}

impl RetryPolicy {
    /// Checks the policy at start-up, so a bad configuration fails there with a message that
    /// says what to change rather than later as a stuck or spinning queue.
    pub fn validate(&self) -> Result<(), String> {
        if self.schedule.is_empty() {
            return Err(
                "the retry schedule is empty; give at least one delay, e.g. [\"30s\"]".into(),
            );
        }
        if self.schedule.iter().all(Duration::is_zero) {
            return Err(
                "every delay in the retry schedule is zero; give at least one positive delay"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.jitter_ratio) {
            return Err(format!(
                "the retry jitter ratio is {}; use a value from 0 to 1 (0.2 means ±20%)",
                self.jitter_ratio
            ));
        }
        if self.off_after.is_zero() {
            return Err("the retry horizon is zero; give how long an endpoint may fail before its subscription is switched off".into());
        }
        Ok(())
    }
}

/// What to do after a failed delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AfterFailure {
    /// Try again after `delay`; when `mark_error` is set, the subscription's status becomes
    /// `error` now (it keeps counting events and the retry still happens).
    RetryAt { delay: Duration, mark_error: bool },
    /// The retry would fall past the horizon: switch the subscription `off`.
    TurnOff,
}

/// Decides the next step after a failed attempt.
///
/// `failures_so_far` counts this failure too; `failing_for` is the time since the first failure
/// of the current run; `retry_after` is what the endpoint asked for; `random_unit` is a number in
/// `[0, 1)` that the caller draws, so tests can fix it. The scheduled delay gets the jitter, then
/// `Retry-After` (capped at [`MAX_RETRY_AFTER`]) may lengthen it but never shortens it: the
/// endpoint knows when it will be back, but must not make us hammer it either.
pub fn after_failure(
    policy: &RetryPolicy,
    failures_so_far: u32,
    failing_for: Duration,
    retry_after: Option<Duration>,
    random_unit: f64,
) -> AfterFailure {
    let index = (failures_so_far.max(1) as usize - 1).min(policy.schedule.len().saturating_sub(1));
    let scheduled = policy.schedule.get(index).copied().unwrap_or_default();
    let mut delay = with_jitter(scheduled, policy.jitter_ratio, random_unit);
    if let Some(asked) = retry_after {
        delay = delay.max(asked.min(MAX_RETRY_AFTER));
    }
    if failing_for.saturating_add(delay) > policy.off_after {
        return AfterFailure::TurnOff;
    }
    AfterFailure::RetryAt {
        delay,
        mark_error: failures_so_far >= policy.error_after_failures,
    }
}

/// Spreads `delay` uniformly over ±`ratio` of itself. Out-of-range inputs are clamped rather than
/// trusted, because a NaN or negative factor would otherwise panic inside `Duration`.
fn with_jitter(delay: Duration, ratio: f64, random_unit: f64) -> Duration {
    let ratio = if ratio.is_finite() {
        ratio.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let unit = if random_unit.is_finite() {
        random_unit.clamp(0.0, 1.0)
    } else {
        0.5
    };
    let factor = 1.0 + ratio * (2.0 * unit - 1.0);
    Duration::try_from_secs_f64(delay.as_secs_f64() * factor).unwrap_or(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule: vec![secs(10), secs(60), secs(600)],
            jitter_ratio: 0.2,
            error_after_failures: 3,
            off_after: secs(3600),
        }
    }

    fn retry(delay: Duration, mark_error: bool) -> AfterFailure {
        AfterFailure::RetryAt { delay, mark_error }
    }

    #[test]
    fn delays_follow_the_schedule_and_the_last_repeats() {
        // random_unit 0.5 is the centre of the jitter range, so the delay is exactly the schedule.
        let cases = [
            (1, secs(10), false),
            (2, secs(60), false),
            (3, secs(600), true),
            (4, secs(600), true),
            (40, secs(600), true),
            // Zero failures is a caller bug; it is read as the first failure, not an underflow.
            (0, secs(10), false),
        ];
        for (failures, delay, mark_error) in cases {
            assert_eq!(
                after_failure(&policy(), failures, Duration::ZERO, None, 0.5),
                retry(delay, mark_error),
                "after {failures} failures"
            );
        }
    }

    #[test]
    fn jitter_spreads_the_delay_within_the_ratio() {
        let cases = [
            (0.0, Duration::from_secs(8)),
            (0.25, Duration::from_secs(9)),
            (0.5, Duration::from_secs(10)),
            (0.75, Duration::from_secs(11)),
            // Out-of-range draws are clamped to the ends of the range.
            (-3.0, Duration::from_secs(8)),
            (7.0, Duration::from_secs(12)),
            (f64::NAN, Duration::from_secs(10)),
        ];
        for (unit, expected) in cases {
            let AfterFailure::RetryAt { delay, .. } =
                after_failure(&policy(), 1, Duration::ZERO, None, unit)
            else {
                panic!("expected a retry for unit {unit}");
            };
            let error = delay.as_secs_f64() - expected.as_secs_f64();
            assert!(error.abs() < 1e-6, "unit {unit}: {delay:?} != {expected:?}");
        }
        let no_jitter = RetryPolicy {
            jitter_ratio: 0.0,
            ..policy()
        };
        assert_eq!(
            after_failure(&no_jitter, 1, Duration::ZERO, None, 0.99),
            retry(secs(10), false)
        );
    }

    #[test]
    fn retry_after_only_ever_lengthens_the_delay_and_is_capped() {
        let cases = [
            // The endpoint asks for less than the schedule: the schedule wins.
            (Some(secs(3)), secs(10)),
            // It asks for more: it gets it.
            (Some(secs(45)), secs(45)),
            // It asks for more than the cap: it gets the cap.
            (Some(secs(5 * 3600)), MAX_RETRY_AFTER),
            (Some(Duration::ZERO), secs(10)),
            (None, secs(10)),
        ];
        let long_horizon = RetryPolicy {
            off_after: secs(24 * 3600),
            ..policy()
        };
        for (asked, delay) in cases {
            assert_eq!(
                after_failure(&long_horizon, 1, Duration::ZERO, asked, 0.5),
                retry(delay, false),
                "Retry-After {asked:?}"
            );
        }
    }

    #[test]
    fn past_the_horizon_the_subscription_is_turned_off() {
        // Horizon 3600 s; the third failure onwards waits 600 s.
        let cases = [
            (3, secs(0), retry(secs(600), true)),
            (3, secs(3000), retry(secs(600), true)),
            (3, secs(3001), AfterFailure::TurnOff),
            (9, secs(7200), AfterFailure::TurnOff),
            // Early in a run the horizon is far away.
            (1, secs(1000), retry(secs(10), false)),
        ];
        for (failures, failing_for, expected) in cases {
            assert_eq!(
                after_failure(&policy(), failures, failing_for, None, 0.5),
                expected,
                "{failures} failures over {failing_for:?}"
            );
        }
        // A long Retry-After can push the retry past the horizon too.
        assert_eq!(
            after_failure(&policy(), 1, secs(1000), Some(secs(3000)), 0.5),
            AfterFailure::TurnOff
        );
        assert_eq!(
            after_failure(&policy(), 1, Duration::MAX, None, 0.5),
            AfterFailure::TurnOff
        );
    }

    #[test]
    fn error_is_marked_from_the_configured_failure_count() {
        let cases = [
            (0, 1, true),
            (1, 1, true),
            (2, 1, false),
            (2, 2, true),
            (5, 4, false),
        ];
        for (error_after_failures, failures, mark_error) in cases {
            let policy = RetryPolicy {
                error_after_failures,
                ..policy()
            };
            let AfterFailure::RetryAt {
                mark_error: marked, ..
            } = after_failure(&policy, failures, Duration::ZERO, None, 0.5)
            else {
                panic!("expected a retry");
            };
            assert_eq!(
                marked, mark_error,
                "threshold {error_after_failures}, {failures} failures"
            );
        }
    }

    #[test]
    fn an_empty_schedule_does_not_panic_and_fails_validation() {
        let empty = RetryPolicy {
            schedule: Vec::new(),
            ..policy()
        };
        assert_eq!(
            after_failure(&empty, 2, Duration::ZERO, Some(secs(5)), 0.5),
            retry(secs(5), false)
        );
        assert!(empty.validate().is_err());
    }

    #[test]
    fn validation_names_what_to_change() {
        // Each case changes one field of a valid policy and names a word the message must contain.
        type Change = fn(&mut RetryPolicy);
        let cases: [(Change, Option<&str>); 6] = [
            (|_| {}, None),
            (|p| p.schedule.clear(), Some("schedule is empty")),
            (|p| p.schedule = vec![Duration::ZERO], Some("zero")),
            (|p| p.jitter_ratio = 1.5, Some("jitter")),
            (|p| p.jitter_ratio = f64::NAN, Some("jitter")),
            (|p| p.off_after = Duration::ZERO, Some("horizon")),
        ];
        for (change, expected) in cases {
            let mut policy = policy();
            change(&mut policy);
            match (policy.validate(), expected) {
                (Ok(()), None) => {}
                (Err(message), Some(part)) => assert!(message.contains(part), "{message}"),
                (result, expected) => panic!("{result:?} but expected {expected:?}"),
            }
        }
        assert_eq!(RetryPolicy::default().validate(), Ok(()));
    }
}
