//! The hub run's verdict and report: every write notified exactly once, event numbers
//! contiguous from 1 and in order per subscription, nothing unexplained; and the latencies.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use baton_tools::common::notification::NumberCheck;
use baton_tools::common::percentiles::{Percentiles, millis, round2};
use serde_json::{Value, json};

use super::{Collected, Options, Setup, TaskVersion};

/// What the run's notifications showed.
pub struct Findings {
    pub passed: bool,
    updates_ok: usize,
    refused_count: u64,
    uncertain_count: u64,
    updates_per_s: f64,
    update_latency: Percentiles,
    notifications_per_s: f64,
    /// From the last update's answer to the last notification.
    drain_after_last_update: Duration,
    latency: Percentiles,
    end_to_end: Percentiles,
    expected: u64,
    received: u64,
    /// The writes never notified, sorted.
    missing_writes: Vec<TaskVersion>,
    duplicates: u64,
    unexpected: u64,
    numbers: NumberCheck,
    silent_subscriptions: usize,
    /// Notifications read before their update's answer was (counted as 0 ms).
    early: u64,
    /// Events for subscriptions of another run.
    foreign: u64,
    posts: u64,
    malformed: u64,
    rejected: u64,
    /// Per second of the schedule: events received and their worst latency.
    timeline: BTreeMap<u64, (u64, Duration)>,
}

pub fn verify(setup: &Setup, collected: &Collected) -> Findings {
    let schedule = &collected.schedule;
    let writes = &collected.writes;
    let mut seen: HashMap<&TaskVersion, u32> = HashMap::new();
    let mut latencies = Vec::new();
    let mut end_to_end = Vec::new();
    let (mut early, mut unexpected, mut foreign, mut events_in_window) = (0u64, 0u64, 0u64, 0u64);
    let mut numbers: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut last_arrival = schedule.started;
    let mut timeline: BTreeMap<u64, (u64, Duration)> = BTreeMap::new();
    for arrival in &collected.arrivals {
        if !setup.subscription_of.contains_key(&arrival.subscription_id) {
            foreign += arrival.events.len() as u64;
            continue;
        }
        last_arrival = last_arrival.max(arrival.at);
        for event in &arrival.events {
            numbers
                .entry(arrival.subscription_id.as_str())
                .or_default()
                .push(event.number);
            if arrival.at >= schedule.started && arrival.at <= schedule.ended {
                events_in_window += 1;
            }
            let Some((key, write)) = writes.get_key_value(&(event.task.clone(), event.version))
            else {
                unexpected += 1;
                continue;
            };
            let count = seen.entry(key).or_default();
            *count += 1;
            if *count > 1 || !write.scheduled {
                continue;
            }
            if arrival.at < write.responded {
                early += 1;
            }
            let latency = arrival.at.saturating_duration_since(write.responded);
            latencies.push(latency);
            end_to_end.push(arrival.at.saturating_duration_since(write.sent));
            if arrival.at >= schedule.started {
                let slot = timeline
                    .entry((arrival.at - schedule.started).as_secs())
                    .or_default();
                slot.0 += 1;
                slot.1 = slot.1.max(latency);
            }
        }
    }
    let mut missing_writes: Vec<TaskVersion> = writes
        .keys()
        .filter(|key| !seen.contains_key(key))
        .cloned()
        .collect();
    missing_writes.sort();
    let duplicates: u64 = seen.values().map(|c| u64::from(c - 1)).sum();
    // Every subscription is heard from its start, so its numbers run from 1.
    let mut number_check = NumberCheck::default();
    for list in numbers.values() {
        let check = NumberCheck::of(list, Some(1));
        number_check.out_of_order += check.out_of_order;
        number_check.repeated += check.repeated;
        number_check.holes += check.holes;
    }
    let inbox = &setup.inbox;
    let received = collected
        .arrivals
        .iter()
        .map(|a| a.events.len() as u64)
        .sum::<u64>()
        - foreign;
    let window = schedule.window().as_secs_f64();
    let malformed = inbox.malformed.load(Ordering::Relaxed);
    let refused_count: u64 = collected.refused.values().sum();
    let uncertain_count: u64 = collected.uncertain.values().sum();
    // Refused or uncertain updates may legitimately explain events nobody expected.
    let unexplained = unexpected.saturating_sub(uncertain_count);
    let passed = missing_writes.is_empty()
        && duplicates == 0
        && number_check == NumberCheck::default()
        && unexplained == 0
        && malformed == 0;
    Findings {
        passed,
        updates_ok: collected.update_latencies.len(),
        refused_count,
        uncertain_count,
        updates_per_s: collected.update_latencies.len() as f64 / window,
        update_latency: Percentiles::of(collected.update_latencies.clone()),
        notifications_per_s: events_in_window as f64 / window,
        drain_after_last_update: last_arrival.saturating_duration_since(collected.last_response),
        latency: Percentiles::of(latencies),
        end_to_end: Percentiles::of(end_to_end),
        expected: writes.len() as u64,
        received,
        missing_writes,
        duplicates,
        unexpected,
        numbers: number_check,
        silent_subscriptions: setup.subscription_ids.len() - numbers.len(),
        early,
        foreign,
        posts: inbox.posts.load(Ordering::Relaxed),
        malformed,
        rejected: inbox.rejected.load(Ordering::Relaxed),
        timeline,
    }
}

impl Findings {
    pub fn print(&self, options: &Options, collected: &Collected) {
        let missing = self.missing_writes.len();
        println!(
            "  updates    {} ok of {} scheduled in {:.1} s = {:.0}/s; \
             refused {}, uncertain {}, late starts {}, peak in flight {}",
            self.updates_ok,
            collected.total,
            collected.schedule.window().as_secs_f64(),
            self.updates_per_s,
            self.refused_count,
            self.uncertain_count,
            collected.schedule.late_starts,
            collected.schedule.peak_in_flight
        );
        for (key, count) in collected.refused.iter().chain(collected.uncertain.iter()) {
            println!("    {key}: {count}");
        }
        println!("  update     {}", self.update_latency.line());
        println!(
            "  cpu        {}",
            collected.cpu.line_with_machine(crate::NAME)
        );
        println!(
            "  notified   {} events in {} POSTs; {:.0} events/s during the schedule; \
             last arrived {:.2} s after the last update response",
            self.received,
            self.posts,
            self.notifications_per_s,
            self.drain_after_last_update.as_secs_f64()
        );
        if self.rejected > 0 {
            println!(
                "  rejected   {} notifications answered 503 on purpose (--reject-every)",
                self.rejected
            );
        }
        println!(
            "  latency    (update response -> arrival) {}",
            self.latency.line()
        );
        println!(
            "  end-to-end (update sent -> arrival)     {}",
            self.end_to_end.line()
        );
        if self.early > 0 {
            println!(
                "  note       {} notifications arrived before their update's response was read (counted as 0 ms)",
                self.early
            );
        }
        println!(
            "  check      expected {}, missing {missing}, duplicates {}, unexpected {}, \
             event-number holes {}, repeated numbers {}, out of order {}, \
             silent subscriptions {}, malformed {}, foreign {}",
            self.expected,
            self.duplicates,
            self.unexpected,
            self.numbers.holes,
            self.numbers.repeated,
            self.numbers.out_of_order,
            self.silent_subscriptions,
            self.malformed,
            self.foreign
        );
        if !collected.drained {
            println!(
                "  drain      gave up after {:.0} s with {missing} writes not notified",
                collected.drain_wait.as_secs_f64()
            );
            for (task, version) in self.missing_writes.iter().take(5) {
                println!("    missing Task/{task}/_history/{version}");
            }
        }
        if options.timeline {
            println!("  timeline   second: events received, max latency (ms)");
            for (second, (count, max)) in &self.timeline {
                println!("    {second:>4}: {count:>6}  {:>9.1}", millis(*max));
            }
        }
        println!("  verdict    {}", if self.passed { "PASS" } else { "FAIL" });
    }

    /// The report's last line.
    pub fn json(&self, options: &Options, setup: &Setup, collected: &Collected) -> Value {
        json!({
            "mode": "hub",
            "base": setup.base.as_str(),
            "run": setup.run,
            "subscriptions": setup.subscription_ids.len(),
            "rate_target": options.rate,
            "duration_s": round2(collected.schedule.window().as_secs_f64()),
            "updates_scheduled": collected.total,
            "updates_ok": self.updates_ok,
            "updates_refused": self.refused_count,
            "updates_uncertain": self.uncertain_count,
            "late_starts": collected.schedule.late_starts,
            "peak_in_flight": collected.schedule.peak_in_flight,
            "updates_per_s": round2(self.updates_per_s),
            "update_latency_ms": self.update_latency.json(),
            "notifications_per_s": round2(self.notifications_per_s),
            "notification_posts": self.posts,
            "latency_ms": self.latency.json(),
            "end_to_end_ms": self.end_to_end.json(),
            "drain_s": round2(self.drain_after_last_update.as_secs_f64()),
            "expected_events": self.expected,
            "received_events": self.received,
            "missing": self.missing_writes.len(),
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "event_number_holes": self.numbers.holes,
            "repeated_event_numbers": self.numbers.repeated,
            "out_of_order": self.numbers.out_of_order,
            "malformed": self.malformed,
            "rejected_on_purpose": self.rejected,
            "cpu_percent": collected.cpu.json(),
            "passed": self.passed,
        })
    }
}
