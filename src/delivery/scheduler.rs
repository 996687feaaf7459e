//! The scheduler's decisions: which subscription to try next, and when.
//!
//! A plain struct with synchronous methods. Each takes the current instant when it needs one
//! and changes nothing but its own fields; the async loop (`run`) reads the clock, waits for
//! whatever comes first (a command, a finished attempt, `next_wake`, the scan) and calls these
//! methods, so every decision is tested here without a runtime or a clock.
//!
//! It runs at most one attempt per subscription at a time (that is what keeps events in
//! order), at most `max_concurrent` attempts sending at once (so one dead endpoint cannot hold
//! up the others) — an attempt whose send is done and that only waits for its result to be
//! recorded (`slot_released`) no longer takes a slot, but still counts as its subscription's
//! one attempt — and keeps the timers for retries and heartbeats in one binary heap rather than a
//! sleeping task per subscription.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::fhir::ids::SubscriptionId;

/// Why an attempt starts. Either way it sends whatever is owed (a handshake, events); a
/// heartbeat only when one is due and nothing else went out within the period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A handshake or events may be owed.
    Work,
    /// The heartbeat period passed with nothing sent.
    Heartbeat,
}

/// What an attempt found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent, or passed over with nobody listening; more is waiting.
    More,
    /// Sent, and nothing more is waiting.
    Sent,
    /// Nothing was sent: nothing was owed, or nobody was listening.
    Idle,
    /// Failed; try again after this delay.
    RetryAt(Duration),
    /// Deleted, off, or not a channel this queue serves.
    Gone,
    /// Another node is working on it; look again shortly, in case it leaves work behind.
    Busy,
}

/// How soon to look again at a subscription another node was working on.
pub const BUSY_RETRY: Duration = Duration::from_millis(100);

/// The two kinds of timer. Retries sort first: at the same instant, the attempt that a retry
/// starts also covers the heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Retry,
    Heartbeat,
}

/// The in-memory schedule over the durable queue in the store.
#[derive(Debug)]
pub struct Scheduler {
    /// The most attempts in flight at once.
    max_concurrent: usize,
    /// Every timer, soonest first. An entry superseded since it was filed is left in place
    /// and passed over when it comes up: a retry whose time is no longer `retry_at`'s, a
    /// heartbeat whose period something sent since has covered.
    timers: BinaryHeap<Reverse<(Instant, Timer, SubscriptionId)>>,
    /// The retry time currently in force per subscription. While one is pending, new work
    /// waits for it: the back-off holds, and the new events are in the log behind the old.
    retry_at: HashMap<SubscriptionId, Instant>,
    /// The heartbeat period of each subscription that has one.
    heartbeats: HashMap<SubscriptionId, Duration>,
    /// When each subscription last had something sent (or a heartbeat started): the next
    /// heartbeat is due a period after it.
    last_sent: HashMap<SubscriptionId, Instant>,
    /// Subscriptions waiting for a free slot, first come first served, with why.
    ready: VecDeque<(SubscriptionId, Attempt)>,
    /// The subscriptions in `ready`, so none is queued twice.
    queued: HashSet<SubscriptionId>,
    /// The subscriptions with an attempt running (sending, or waiting for its record).
    in_flight: HashSet<SubscriptionId>,
    /// Those of `in_flight` whose send is done: they wait for their result's commit, without
    /// a slot.
    recording: HashSet<SubscriptionId>,
    /// Woken while in flight: look again when the attempt ends.
    rerun: HashSet<SubscriptionId>,
}

impl Scheduler {
    pub fn new(max_concurrent: usize) -> Scheduler {
        Scheduler {
            max_concurrent,
            timers: BinaryHeap::new(),
            retry_at: HashMap::new(),
            heartbeats: HashMap::new(),
            last_sent: HashMap::new(),
            ready: VecDeque::new(),
            queued: HashSet::new(),
            in_flight: HashSet::new(),
            recording: HashSet::new(),
            rerun: HashSet::new(),
        }
    }

    /// New events or a handshake owed: try now, unless a retry is pending.
    pub fn wake(&mut self, id: &SubscriptionId) {
        // New work overrides nothing while a retry is pending: order and back-off both hold,
        // the new events simply wait with the old ones.
        if !self.retry_at.contains_key(id) {
            self.make_ready(id, Attempt::Work);
        }
    }

    /// The subscription was created or replaced: a pending back-off belonged to the old
    /// version, so try now whatever it said.
    pub fn changed(&mut self, id: &SubscriptionId) {
        self.retry_at.remove(id);
        self.make_ready(id, Attempt::Work);
    }

    /// Work found waiting in the store (at start-up, with a retry time recorded before the
    /// restart): try at `at`.
    pub fn resume(&mut self, id: &SubscriptionId, at: Instant) {
        self.schedule_retry(id, at);
    }

    /// Starts or stops heartbeats at this period; the first is due a period after the last
    /// notification sent, or after `now`.
    pub fn set_heartbeat(&mut self, id: &SubscriptionId, period: Option<Duration>, now: Instant) {
        match period {
            Some(period) => {
                self.heartbeats.insert(id.clone(), period);
                self.arm_heartbeat(id, now);
            }
            None => {
                self.heartbeats.remove(id);
            }
        }
    }

    /// The subscription is gone or off: its timers are dropped (the heap's entries go stale).
    pub fn forget(&mut self, id: &SubscriptionId) {
        self.retry_at.remove(id);
        self.heartbeats.remove(id);
        self.last_sent.remove(id);
        self.rerun.remove(id);
    }

    /// The attempt in flight for `id` has sent its notification and now only waits for its
    /// result to be recorded: its slot is free for another subscription, while no other
    /// attempt for `id` starts before it ends (the next one must read what this one sent).
    pub fn slot_released(&mut self, id: &SubscriptionId) {
        if self.in_flight.contains(id) {
            self.recording.insert(id.clone());
        }
    }

    /// An attempt ended at `now` with this outcome.
    pub fn attempt_finished(&mut self, id: &SubscriptionId, outcome: Outcome, now: Instant) {
        self.in_flight.remove(id);
        self.recording.remove(id);
        let rerun = self.rerun.remove(id);
        match outcome {
            Outcome::More => {
                self.last_sent.insert(id.clone(), now);
                self.make_ready(id, Attempt::Work);
            }
            Outcome::Sent => {
                self.last_sent.insert(id.clone(), now);
                self.arm_heartbeat(id, now);
                if rerun {
                    self.make_ready(id, Attempt::Work);
                }
            }
            Outcome::Idle => {
                if rerun {
                    self.make_ready(id, Attempt::Work);
                }
            }
            Outcome::RetryAt(delay) => self.schedule_retry(id, now + delay),
            Outcome::Busy => {
                if !self.retry_at.contains_key(id) {
                    self.schedule_retry(id, now + BUSY_RETRY);
                }
            }
            Outcome::Gone => {
                self.heartbeats.remove(id);
                self.last_sent.remove(id);
            }
        }
    }

    /// The attempts to start at `now`: the timers that came due put their subscriptions in
    /// the ready queue, and the queue is taken in order while slots are free. Each returned
    /// subscription is in flight until `attempt_finished`.
    ///
    /// The queue is fair by construction: a subscription is in it at most once, joins at the
    /// back when it becomes ready, and goes to the back again after each attempt that leaves
    /// more waiting (`Outcome::More`). So the oldest-waiting subscription goes first, and a
    /// catch-all with a backlog gets one attempt (of up to `maxCount` events) per pass over
    /// everyone else ready, however many single-event subscriptions there are — and they get
    /// theirs however long its backlog.
    pub fn due(&mut self, now: Instant) -> Vec<(SubscriptionId, Attempt)> {
        self.fire_timers(now);
        let mut starting = Vec::new();
        while self.sending() < self.max_concurrent {
            let Some((id, attempt)) = self.ready.pop_front() else {
                break;
            };
            self.queued.remove(&id);
            self.in_flight.insert(id.clone());
            starting.push((id, attempt));
        }
        starting
    }

    /// Attempts holding a slot: in flight and not yet only waiting for their record.
    fn sending(&self) -> usize {
        self.in_flight.len().saturating_sub(self.recording.len())
    }

    /// When the next timer comes due, if any; `due` is to be called then.
    pub fn next_wake(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _, _))| *at)
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, timer, id))) = self.timers.pop() else {
                break;
            };
            match timer {
                Timer::Retry => {
                    if self.retry_at.get(&id) == Some(&at) {
                        self.retry_at.remove(&id);
                        self.make_ready(&id, Attempt::Work);
                    }
                }
                Timer::Heartbeat => self.heartbeat_due(&id, now),
            }
        }
    }

    fn heartbeat_due(&mut self, id: &SubscriptionId, now: Instant) {
        let Some(period) = self.heartbeats.get(id).copied() else {
            return;
        };
        // While a retry is pending the endpoint is failing: a heartbeat attempt would only
        // send the waiting events early, around the back-off. The next success re-arms the
        // heartbeat.
        if self.retry_at.contains_key(id) {
            return;
        }
        let last = self.last_sent.get(id).copied();
        if last.is_some_and(|l| now < l + period) {
            return; // Something was sent since; a newer timer exists.
        }
        self.last_sent.insert(id.clone(), now);
        self.arm_heartbeat(id, now);
        self.make_ready(id, Attempt::Heartbeat);
    }

    fn schedule_retry(&mut self, id: &SubscriptionId, at: Instant) {
        self.retry_at.insert(id.clone(), at);
        self.timers.push(Reverse((at, Timer::Retry, id.clone())));
    }

    fn arm_heartbeat(&mut self, id: &SubscriptionId, now: Instant) {
        if let Some(period) = self.heartbeats.get(id).copied() {
            let since = self.last_sent.get(id).copied().unwrap_or(now);
            self.timers
                .push(Reverse((since + period, Timer::Heartbeat, id.clone())));
        }
    }

    /// Puts a subscription in the ready queue unless it is already queued or in flight. Work
    /// that arrives while it is in flight is looked at again when the attempt ends; a
    /// heartbeat then is not, since the attempt in flight covers it.
    fn make_ready(&mut self, id: &SubscriptionId, attempt: Attempt) {
        if self.in_flight.contains(id) {
            if attempt == Attempt::Work {
                self.rerun.insert(id.clone());
            }
            return;
        }
        if self.queued.insert(id.clone()) {
            self.ready.push_back((id.clone(), attempt));
        }
    }
}

#[cfg(test)]
mod tests;
