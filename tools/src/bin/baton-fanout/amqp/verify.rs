//! The AMQP run's verdict and report: every expected event consumed, none unexpected, numbers
//! contiguous, each subscription's messages in event order; events per second and latency.

use std::time::Duration;

use baton_tools::common::notification::{NotificationType, read_notification};
use baton_tools::common::percentiles::{Percentiles, round2};
use serde_json::{Value, json};

use super::{Collected, Driven, Options, Setup, header_number, header_text};
use crate::check::{Arrival, Tally, check_listener, write_index};

pub struct Findings {
    pub passed: bool,
    tally: Tally,
    latency: Percentiles,
    total_received: u64,
    event_messages: u64,
    events_in_window: u64,
    /// From the first update to the last event that arrived.
    sustained_window: Duration,
    /// From the last update's answer to the last event.
    drain: Duration,
    message_order_violations: u64,
    malformed: u64,
    foreign: u64,
}

pub fn verify(
    options: &Options,
    setup: &Setup,
    driven: &Driven,
    collected: &Collected,
) -> Findings {
    let m = options.subscriptions;
    let mut per_subscription: Vec<Vec<Arrival>> = vec![Vec::new(); m];
    // Per subscription, the first event number of each message, in arrival order.
    let mut firsts: Vec<Vec<i64>> = vec![Vec::new(); m];
    let (mut event_messages, mut events_in_window, mut foreign, mut malformed) =
        (0u64, 0u64, 0u64, 0u64);
    for (at, delivery) in &collected.deliveries {
        let Some(headers) = delivery.properties.headers().as_ref() else {
            malformed += 1;
            continue;
        };
        let events = match read_notification(&delivery.data) {
            Some(n) if n.kind == NotificationType::EventNotification => n.events,
            Some(n)
                if matches!(
                    n.kind,
                    NotificationType::Handshake | NotificationType::Heartbeat
                ) =>
            {
                Vec::new()
            }
            Some(_) | None => {
                malformed += 1;
                Vec::new()
            }
        };
        if header_text(headers, "notification-type").as_deref() != Some("event-notification") {
            continue;
        }
        let subscription = header_text(headers, "subscription-id").unwrap_or_default();
        let Some(&s) = setup.subscription_of.get(&subscription) else {
            foreign += 1;
            continue;
        };
        event_messages += 1;
        if let Some(first) = header_number(headers, "first-event") {
            firsts[s].push(first);
        }
        for event in events {
            if *at <= driven.ended {
                events_in_window += 1;
            }
            match setup.names.task_index(&event.task) {
                Some(task) => per_subscription[s].push(Arrival {
                    at: *at,
                    number: event.number,
                    task,
                    version: event.version,
                }),
                None => foreign += 1,
            }
        }
    }
    let index = write_index(&driven.writes);
    let mut tally = Tally::default();
    let mut latencies = Vec::new();
    let mut last_arrival = driven.started;
    for (arrivals, expected) in per_subscription.iter().zip(&collected.expected) {
        let (t, first) = check_listener(arrivals, &index, expected);
        tally.add(&t);
        for (&w, &at) in &first {
            latencies.push(at.saturating_duration_since(driven.writes[w].responded));
            last_arrival = last_arrival.max(at);
        }
    }
    // Messages of one subscription must arrive in event order.
    let message_order_violations: u64 = firsts
        .iter()
        .map(|f| f.windows(2).filter(|w| w[1] <= w[0]).count() as u64)
        .sum();
    let passed = tally.missing == 0
        && tally.unexpected == 0
        && tally.holes == 0
        && malformed == 0
        && collected.drained
        && message_order_violations == 0;
    Findings {
        passed,
        tally,
        latency: Percentiles::of(latencies),
        total_received: per_subscription.iter().map(|a| a.len() as u64).sum(),
        event_messages,
        events_in_window,
        sustained_window: last_arrival.saturating_duration_since(driven.started),
        drain: last_arrival.saturating_duration_since(driven.ended),
        message_order_violations,
        malformed,
        foreign,
    }
}

impl Findings {
    fn per_second(&self, events: u64, window: Duration) -> f64 {
        events as f64 / window.as_secs_f64().max(1e-3)
    }

    pub fn print(&self, options: &Options, driven: &Driven, collected: &Collected) {
        let window = driven.window();
        println!(
            "  updates    {} ok in {:.1} s = {:.0}/s from {} closed-loop writers",
            driven.writes.len(),
            window.as_secs_f64(),
            driven.writes.len() as f64 / window.as_secs_f64(),
            options.writers
        );
        for (key, count) in &driven.failures {
            println!("    {key}: {count}");
        }
        println!(
            "  cpu        {}",
            driven.cpu.line_with_load_average(crate::NAME)
        );
        println!(
            "  consumed   {} events in {} event messages ({:.2} events each); \
             {:.0} events/s while updates ran, {:.0} events/s until the last arrived ({:.2} s after the last update)",
            self.total_received,
            self.event_messages,
            self.total_received as f64 / self.event_messages.max(1) as f64,
            self.events_in_window as f64 / window.as_secs_f64(),
            self.per_second(self.total_received, self.sustained_window),
            self.drain.as_secs_f64()
        );
        println!(
            "  latency    update response -> consumer arrival: {}",
            self.latency.line()
        );
        println!(
            "  check      {}; message order violations {}; malformed {}, foreign {}{}",
            self.tally.line(),
            self.message_order_violations,
            self.malformed,
            self.foreign,
            if collected.drained {
                ""
            } else {
                "; drain timed out"
            }
        );
        println!("  metrics    after the run:");
        for line in &collected.final_metrics {
            println!("    {line}");
        }
        println!("  verdict    {}", if self.passed { "PASS" } else { "FAIL" });
    }

    /// The report's last line.
    pub fn json(&self, options: &Options, driven: &Driven, run: &str) -> Value {
        let window = driven.window();
        json!({
            "mode": "amqp",
            "run": run,
            "subscriptions": options.subscriptions,
            "filter": options.filter.name(),
            "writers": options.writers,
            "max_count": options.max_count,
            "tasks": options.tasks,
            "duration_s": round2(window.as_secs_f64()),
            "updates_ok": driven.writes.len(),
            "updates_per_s": round2(driven.writes.len() as f64 / window.as_secs_f64()),
            "updates_failed": driven.failures.values().sum::<u64>(),
            "events_received": self.total_received,
            "event_messages": self.event_messages,
            "events_per_s_during_updates": round2(self.events_in_window as f64 / window.as_secs_f64()),
            "events_per_s_until_drained": round2(self.per_second(self.total_received, self.sustained_window)),
            "drain_s": round2(self.drain.as_secs_f64()),
            "latency_ms": self.latency.json_with_count(),
            "check": self.tally.json(),
            "message_order_violations": self.message_order_violations,
            "cpu_percent": { "load": driven.cpu.own, "server": driven.cpu.server },
            "passed": self.passed,
        })
    }
}
