//! The websocket run's verdict and report: every listener got each of its events exactly
//! once, in order, with contiguous numbers; latencies to all catch-alls, to one, and to the
//! owner's listener.

use std::collections::BTreeMap;
use std::time::Instant;

use baton_tools::common::percentiles::{Percentiles, round2};
use serde_json::json;

use super::{Collected, Options, Setup};
use crate::check::{Tally, check_listener, write_index};
use crate::server::{metric_sum, proc_status_kib};

/// Checks every listener, prints the report and its JSON line; returns whether the run passed.
pub fn verify(options: &Options, setup: &Setup, collected: &Collected) -> bool {
    let driven = &collected.driven;
    let writes = &driven.writes;
    let owners = options.owners;
    let index = write_index(writes);
    let last_response = writes
        .iter()
        .map(|w| w.responded)
        .max()
        .unwrap_or(driven.schedule.started);
    let all_writes: Vec<usize> = (0..writes.len()).collect();
    let mut catch_all_tally = Tally::default();
    let mut owner_tally = Tally::default();
    let mut per_listener = Vec::new();
    let mut owner_latencies = Vec::new();
    // Per write: the latest first-arrival over the catch-alls, and how many had it.
    let mut latest: Vec<Option<Instant>> = vec![None; writes.len()];
    let mut heard_by: Vec<u32> = vec![0; writes.len()];
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    let (mut notifications, mut heartbeats, mut malformed, mut foreign) = (0u64, 0u64, 0u64, 0u64);
    let mut unbound = 0u64;
    let mut catch_alls_bound = 0u32;
    for (i, log) in collected.logs.iter().enumerate() {
        let Some(log) = log else {
            unbound += 1;
            continue;
        };
        notifications += log.notifications;
        heartbeats += log.heartbeats;
        malformed += log.malformed;
        foreign += log.foreign;
        *ends.entry(log.end.describe()).or_default() += 1;
        let catch_all = i >= owners;
        let expected = if catch_all {
            &all_writes
        } else {
            &collected.by_task[i]
        };
        let (tally, first) = check_listener(&log.arrivals, &index, expected);
        if catch_all {
            catch_alls_bound += 1;
            catch_all_tally.add(&tally);
            for (&w, &at) in &first {
                per_listener.push(at.saturating_duration_since(writes[w].responded));
                heard_by[w] += 1;
                latest[w] = Some(latest[w].map_or(at, |l: Instant| l.max(at)));
            }
        } else {
            owner_tally.add(&tally);
            owner_latencies.extend(
                first
                    .iter()
                    .map(|(&w, &at)| at.saturating_duration_since(writes[w].responded)),
            );
        }
    }
    let mut all_listeners = Vec::new();
    let mut not_by_all = 0u64;
    for (w, write) in writes.iter().enumerate() {
        match latest[w] {
            Some(at) if heard_by[w] == catch_alls_bound => {
                all_listeners.push(at.saturating_duration_since(write.responded));
            }
            _ => not_by_all += 1,
        }
    }
    let last_arrival = collected
        .logs
        .iter()
        .flatten()
        .filter_map(|l| l.arrivals.iter().map(|a| a.at).max())
        .max()
        .unwrap_or(last_response);
    let all_p = Percentiles::of(all_listeners);
    let per_listener_p = Percentiles::of(per_listener);
    let owner_p = Percentiles::of(owner_latencies);
    let update_p = Percentiles::of(driven.update_latencies.clone());
    // The share of updates slower than each bucket bound of the server's request-duration
    // histogram (`baton_http_request_duration_seconds`), so that what the tool saw can be
    // set against what the server measured for the same requests.
    let update_over = slower_than(&driven.update_latencies, &[1.0, 2.5, 5.0, 10.0, 25.0]);
    let passed = catch_all_tally.clean()
        && owner_tally.clean()
        && unbound == 0
        && malformed == 0
        && collected.drained
        && driven.failures.is_empty();
    // The counter appears only once it was first incremented.
    let closed_slow = metric_sum(
        &collected.final_metrics,
        "baton_websocket_closed_slow_total",
    )
    .unwrap_or(0.0);
    let window = driven.schedule.window();

    println!(
        "  updates    {} ok of {} scheduled in {:.1} s = {:.0}/s; late starts {}",
        writes.len(),
        driven.total,
        window.as_secs_f64(),
        writes.len() as f64 / window.as_secs_f64(),
        driven.schedule.late_starts
    );
    for (key, count) in &driven.failures {
        println!("    {key}: {count}");
    }
    println!(
        "  latency    update request -> its response:           {}",
        update_p.line()
    );
    println!(
        "  cpu        {}",
        driven.cpu.line_with_load_average(crate::NAME)
    );
    println!(
        "  notified   {} events in {notifications} notifications ({:.2} events each), {heartbeats} heartbeats; \
         last event {:.2} s after the last update response{}",
        collected.received,
        collected.received as f64 / notifications.max(1) as f64,
        last_arrival
            .saturating_duration_since(last_response)
            .as_secs_f64(),
        if collected.drained {
            String::new()
        } else {
            format!(
                "; gave up waiting after {:.0} s",
                options.drain_timeout.as_secs_f64()
            )
        }
    );
    println!(
        "  latency    update response -> all {catch_alls_bound} catch-alls had it: {}",
        all_p.line()
    );
    println!(
        "  latency    update response -> one catch-all listener:   {}",
        per_listener_p.line()
    );
    println!(
        "  latency    update response -> its owner's listener:     {}",
        owner_p.line()
    );
    println!(
        "  check      catch-alls: {}; not heard by every catch-all: {not_by_all}",
        catch_all_tally.line()
    );
    println!("  check      owners:     {}", owner_tally.line());
    println!("  check      unbound {unbound}, malformed {malformed}, foreign {foreign}");
    println!("  slow       baton_websocket_closed_slow_total {closed_slow}");
    for (end, count) in &ends {
        println!("  sockets    {count} x {end}");
    }
    println!(
        "  memory     server VmRSS {} KiB after the run (VmHWM {} KiB)",
        collected.rss_after,
        proc_status_kib(setup.pid, "VmHWM:").unwrap_or(0)
    );
    println!("  metrics    after the run:");
    for line in &collected.final_metrics {
        println!("    {line}");
    }
    if options.timeline {
        println!(
            "  timeline   second: updates answered, events numbered by the hub, events received, server VmRSS KiB"
        );
        let mut previous = (0, 0, 0);
        for sample in &collected.samples {
            println!(
                "    {:>4}: {:>6}  {:>8}  {:>8}  {:>9}",
                sample.second,
                sample.answered - previous.0,
                sample.matched.saturating_sub(previous.1),
                sample.received - previous.2,
                sample.rss_kib
            );
            previous = (sample.answered, sample.matched, sample.received);
        }
    }
    println!("  verdict    {}", if passed { "PASS" } else { "FAIL" });
    println!(
        "{}",
        json!({
            "mode": "websocket",
            "run": setup.names.run,
            "owners": owners,
            "catch_all": options.catch_all,
            "no_listeners": options.no_listeners,
            "sockets_bound": collected.sockets_bound,
            "rss_kib": { "start": setup.rss_start, "before_sockets": setup.rss_before, "idle": driven.rss_idle, "after_run": collected.rss_after },
            "kib_per_idle_socket": round2(driven.per_socket_kib),
            "rate_target": options.rate,
            "updates_ok": writes.len(),
            "updates_failed": driven.failures.values().sum::<u64>(),
            "late_starts": driven.schedule.late_starts,
            "duration_s": round2(window.as_secs_f64()),
            "update_latency_ms": update_p.json_with_count(),
            "update_percent_over_ms": update_over,
            "latency_all_catch_alls_ms": all_p.json_with_count(),
            "latency_per_catch_all_ms": per_listener_p.json_with_count(),
            "latency_owner_ms": owner_p.json_with_count(),
            "catch_alls": catch_all_tally.json(),
            "owners_check": owner_tally.json(),
            "not_heard_by_all": not_by_all,
            "notifications": notifications,
            "closed_slow_total": closed_slow,
            "cpu_percent": { "load": driven.cpu.own, "server": driven.cpu.server },
            "passed": passed,
        })
    );
    passed
}

/// For each bound in milliseconds, the percentage of `latencies` above it (rounded to tenths).
fn slower_than(latencies: &[std::time::Duration], bounds_ms: &[f64]) -> serde_json::Value {
    let total = latencies.len().max(1) as f64;
    let shares = bounds_ms.iter().map(|&bound| {
        let over = latencies
            .iter()
            .filter(|l| l.as_secs_f64() * 1000.0 > bound)
            .count();
        (
            bound.to_string(),
            serde_json::json!((over as f64 * 1000.0 / total).round() / 10.0),
        )
    });
    serde_json::Value::Object(shares.collect())
}
