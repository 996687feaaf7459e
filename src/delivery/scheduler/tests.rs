use super::*;

/// One step of a scenario; times are milliseconds after the scenario starts.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// The clock moves on to this time.
    At(u64),
    Wake(&'static str),
    Changed(&'static str),
    Forget(&'static str),
    /// A retry time found in the store, as at start-up.
    Resume(&'static str, u64),
    /// Heartbeats at this period (in milliseconds), or none.
    Heartbeat(&'static str, Option<u64>),
    /// The subscription's attempt ends now with this outcome.
    Finish(&'static str, Outcome),
    /// `due` now returns exactly these attempts, in this order.
    Due(&'static [(&'static str, Attempt)]),
    /// `next_wake` is this time.
    NextWake(Option<u64>),
}

use Attempt::{Heartbeat as Beat, Work};
use Step::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn play(name: &str, max_concurrent: usize, steps: &[Step]) {
    // Any instant will do as the origin: every time in a scenario is relative to it.
    let origin = Instant::now();
    let mut now = origin;
    let mut scheduler = Scheduler::new(max_concurrent);
    let id = |text: &str| SubscriptionId::parse(text).unwrap();
    for (n, step) in steps.iter().enumerate() {
        let at = format!("{name}, step {n} ({step:?})");
        match *step {
            At(t) => now = origin + ms(t),
            Wake(s) => scheduler.wake(&id(s)),
            Changed(s) => scheduler.changed(&id(s)),
            Forget(s) => scheduler.forget(&id(s)),
            Resume(s, t) => scheduler.resume(&id(s), origin + ms(t)),
            Heartbeat(s, period) => scheduler.set_heartbeat(&id(s), period.map(ms), now),
            Finish(s, outcome) => scheduler.attempt_finished(&id(s), outcome, now),
            Due(expected) => {
                let due = scheduler.due(now);
                let expected: Vec<(SubscriptionId, Attempt)> = expected
                    .iter()
                    .map(|(s, attempt)| (id(s), *attempt))
                    .collect();
                assert_eq!(due, expected, "{at}");
            }
            NextWake(expected) => {
                assert_eq!(
                    scheduler.next_wake(),
                    expected.map(|t| origin + ms(t)),
                    "{at}"
                );
            }
        }
    }
}

#[test]
fn scenarios() {
    let retry_5s = Outcome::RetryAt(ms(5000));
    #[rustfmt::skip]
    let cases: &[(&str, usize, &[Step])] = &[
        ("a wake starts an attempt at once", 4, &[
            NextWake(None), Due(&[]), Wake("a"), Due(&[("a", Work)]), Due(&[]),
        ]),
        ("one attempt per subscription; work that arrives in flight runs when it ends", 4, &[
            Wake("a"), Due(&[("a", Work)]),
            Wake("a"), Changed("a"), Due(&[]),
            Finish("a", Outcome::Sent), Due(&[("a", Work)]),
            Finish("a", Outcome::Idle), Due(&[]),
        ]),
        ("a wake in flight is looked at again after an idle attempt too", 4, &[
            Wake("a"), Due(&[("a", Work)]), Wake("a"),
            Finish("a", Outcome::Idle), Due(&[("a", Work)]),
        ]),
        ("a failed attempt drops the wake it collected: the retry covers it", 4, &[
            Wake("a"), Due(&[("a", Work)]), Wake("a"),
            Finish("a", retry_5s), Due(&[]),
            At(5000), Due(&[("a", Work)]),
        ]),
        ("a wake during a retry waits for it", 4, &[
            Wake("a"), Due(&[("a", Work)]), Finish("a", retry_5s), NextWake(Some(5000)),
            Wake("a"), Due(&[]),
            At(4999), Due(&[]),
            At(5000), Due(&[("a", Work)]),
        ]),
        ("changed cuts the back-off; the old retry timer is passed over", 4, &[
            Wake("a"), Due(&[("a", Work)]), Finish("a", retry_5s),
            At(10), Changed("a"), Due(&[("a", Work)]), Finish("a", Outcome::Sent),
            At(5000), Due(&[]),
            Wake("a"), Due(&[("a", Work)]),
        ]),
        ("a busy claim is looked at again 100 ms later", 4, &[
            Wake("a"), Due(&[("a", Work)]), Finish("a", Outcome::Busy), NextWake(Some(100)),
            Wake("a"), At(99), Due(&[]),
            At(100), Due(&[("a", Work)]),
        ]),
        ("a busy claim does not shorten a pending retry", 4, &[
            Heartbeat("a", Some(1000)), At(1000), Due(&[("a", Beat)]),
            Resume("a", 3000), Finish("a", Outcome::Busy),
            At(1100), Due(&[]),
            At(3000), Due(&[("a", Work)]),
        ]),
        ("more waiting re-queues the subscription behind the others", 1, &[
            Wake("a"), Wake("b"), Due(&[("a", Work)]),
            Finish("a", Outcome::More), Due(&[("b", Work)]),
            Finish("b", Outcome::Sent), Due(&[("a", Work)]),
        ]),
        ("at most max_concurrent attempts at once", 2, &[
            Wake("a"), Wake("b"), Wake("c"), Due(&[("a", Work), ("b", Work)]), Due(&[]),
            Finish("b", Outcome::Sent), Due(&[("c", Work)]),
            Finish("a", Outcome::Sent), Finish("c", Outcome::Sent), Due(&[]),
        ]),
        ("the ready queue is first come, first served, each subscription once", 8, &[
            Wake("b"), Wake("a"), Wake("b"), Changed("a"), Wake("c"),
            Due(&[("b", Work), ("a", Work), ("c", Work)]),
        ]),
        ("a heartbeat comes due a period after the last thing sent", 4, &[
            Heartbeat("a", Some(1000)), NextWake(Some(1000)),
            At(600), Wake("a"), Due(&[("a", Work)]), Finish("a", Outcome::Sent),
            At(1000), Due(&[]),
            At(1600), Due(&[("a", Beat)]), NextWake(Some(2600)),
            Finish("a", Outcome::Idle),
            At(2600), Due(&[("a", Beat)]),
        ]),
        ("an idle attempt does not put the heartbeat off", 4, &[
            Heartbeat("a", Some(1000)),
            At(500), Wake("a"), Due(&[("a", Work)]), Finish("a", Outcome::Idle),
            At(1000), Due(&[("a", Beat)]),
        ]),
        ("more waiting puts the heartbeat off too", 4, &[
            Heartbeat("a", Some(1000)),
            At(500), Wake("a"), Due(&[("a", Work)]), Finish("a", Outcome::More),
            At(1000), Due(&[("a", Work)]), Finish("a", Outcome::Sent),
            At(1500), Due(&[]),
            At(2000), Due(&[("a", Beat)]),
        ]),
        ("a heartbeat due while a retry backs off is skipped; the next success re-arms it", 4, &[
            Heartbeat("a", Some(1000)), Wake("a"), Due(&[("a", Work)]), Finish("a", retry_5s),
            At(1000), Due(&[]),
            At(5000), Due(&[("a", Work)]), Finish("a", Outcome::Sent),
            At(5999), Due(&[]),
            At(6000), Due(&[("a", Beat)]),
        ]),
        ("a heartbeat in flight does not run again when it ends", 4, &[
            Heartbeat("a", Some(1000)), At(1000), Due(&[("a", Beat)]),
            At(2000), Due(&[]), Finish("a", Outcome::Idle), Due(&[]),
            At(3000), Due(&[("a", Beat)]),
        ]),
        ("a heartbeat due while work waits for a slot joins that attempt", 1, &[
            Heartbeat("a", Some(1000)), Wake("b"), Due(&[("b", Work)]),
            Wake("a"), At(1000), Due(&[]),
            Finish("b", Outcome::Sent), Due(&[("a", Work)]),
        ]),
        ("heartbeats stop when asked", 4, &[
            Heartbeat("a", Some(1000)), Heartbeat("a", None), At(1000), Due(&[]), NextWake(None),
        ]),
        ("a subscription gone drops its heartbeat", 4, &[
            Heartbeat("a", Some(1000)), Wake("a"), Due(&[("a", Work)]), Finish("a", Outcome::Gone),
            At(1000), Due(&[]),
        ]),
        ("forget drops every timer", 4, &[
            Heartbeat("a", Some(1000)), Wake("a"), Due(&[("a", Work)]),
            Finish("a", Outcome::RetryAt(ms(500))), Forget("a"),
            At(500), Due(&[]), At(1000), Due(&[]),
            Wake("a"), Due(&[("a", Work)]),
        ]),
        ("a retry time found at start-up is honoured", 4, &[
            Resume("a", 3000), Resume("b", 0), Wake("a"), Due(&[("b", Work)]),
            At(3000), Due(&[("a", Work)]),
        ]),
        ("timers that come due together start in time order", 4, &[
            Resume("b", 200), Resume("a", 100), Heartbeat("c", Some(150)),
            At(300), Due(&[("a", Work), ("c", Beat), ("b", Work)]),
        ]),
    ];
    for (name, max_concurrent, steps) in cases {
        play(name, *max_concurrent, steps);
    }
}

#[test]
fn an_attempt_that_only_waits_for_its_record_frees_its_slot_but_not_its_subscription() {
    let origin = Instant::now();
    let mut scheduler = Scheduler::new(1);
    let id = |text: &str| SubscriptionId::parse(text).unwrap();
    scheduler.wake(&id("a"));
    scheduler.wake(&id("b"));
    assert_eq!(scheduler.due(origin), vec![(id("a"), Work)], "one slot");
    assert_eq!(scheduler.due(origin), vec![], "a holds it while it sends");
    scheduler.slot_released(&id("a"));
    assert_eq!(
        scheduler.due(origin),
        vec![(id("b"), Work)],
        "a's send is done: its slot goes to b"
    );
    scheduler.wake(&id("a"));
    scheduler.slot_released(&id("b"));
    assert_eq!(
        scheduler.due(origin),
        vec![],
        "a is woken, but its attempt waits for its record: no second attempt for a"
    );
    scheduler.attempt_finished(&id("a"), Outcome::Sent, origin);
    assert_eq!(
        scheduler.due(origin),
        vec![(id("a"), Work)],
        "once a's record is committed, the wake runs"
    );
    // A release that arrives for an attempt that already ended changes nothing.
    scheduler.attempt_finished(&id("b"), Outcome::Sent, origin);
    scheduler.slot_released(&id("b"));
    scheduler.wake(&id("b"));
    assert_eq!(scheduler.due(origin), vec![], "a still holds the one slot");
}

/// Ten thousand subscriptions with one event each and a catch-all with a backlog: the
/// catch-all is never passed over more than once per round of the others, and its backlog
/// never keeps the others waiting beyond its own turn.
#[test]
fn a_catch_all_with_a_backlog_and_ten_thousand_single_events_share_the_slots_fairly() {
    const OWNERS: usize = 10_000;
    const SLOTS: usize = 64;
    const CATCH_ALL_ATTEMPTS: usize = 25;
    let origin = Instant::now();
    let mut scheduler = Scheduler::new(SLOTS);
    let catch_all = SubscriptionId::parse("catch-all").unwrap();
    let owners: Vec<SubscriptionId> = (0..OWNERS)
        .map(|n| SubscriptionId::parse(&format!("owner-{n}")).unwrap())
        .collect();
    scheduler.wake(&catch_all);
    for owner in &owners {
        scheduler.wake(owner);
    }
    // The order attempts start in, as positions: where each catch-all attempt started, and
    // where each owner's did.
    let mut started = 0usize;
    let mut catch_all_at = Vec::new();
    let mut owner_at = vec![None; OWNERS];
    let mut catch_all_left = CATCH_ALL_ATTEMPTS;
    loop {
        let due = scheduler.due(origin);
        if due.is_empty() {
            break;
        }
        for (id, _) in &due {
            if *id == catch_all {
                catch_all_at.push(started);
            } else {
                let n: usize = id.as_str()["owner-".len()..].parse().unwrap();
                assert!(owner_at[n].is_none(), "one event, one attempt");
                owner_at[n] = Some(started);
            }
            started += 1;
        }
        // Every send completes and is recorded: the catch-all always has more.
        for (id, _) in due {
            let outcome = if id == catch_all {
                catch_all_left -= 1;
                if catch_all_left == 0 {
                    Outcome::Sent
                } else {
                    Outcome::More
                }
            } else {
                Outcome::Sent
            };
            scheduler.slot_released(&id);
            scheduler.attempt_finished(&id, outcome, origin);
        }
    }
    assert_eq!(
        catch_all_at.len(),
        CATCH_ALL_ATTEMPTS,
        "its backlog was all sent"
    );
    assert_eq!(catch_all_at[0], 0, "waiting longest, it went first");
    for pair in catch_all_at.windows(2) {
        assert!(
            pair[1] - pair[0] <= OWNERS + SLOTS,
            "the catch-all waited at most one round of the others: {pair:?}"
        );
    }
    let last_owner = owner_at
        .iter()
        .map(|at| at.expect("every owner was served"))
        .max();
    assert!(
        last_owner < Some(catch_all_at[1]),
        "every single-event subscription was served before the catch-all's second attempt: \
         its backlog did not hold them up"
    );
}
