//! What a scenario found, as a table per scenario and a JSON object: the writes, each
//! subscriber's row, recovery times, faults, notes and failures.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use baton_tools::common::cpu::load_average;
use baton_tools::common::lock;
use serde_json::{Value, json};

use crate::campaign::Run;
use crate::load::LoadLog;
use crate::verify::{ChannelCheck, TransactionCheck, WriteCheck};

/// One subscriber's row of the report.
pub struct ChannelRow {
    pub label: String,
    pub check: ChannelCheck,
    /// The subscription's status after the drain (`active`, `error`, `off`).
    pub status: String,
    pub notes: String,
}

/// `; 2 malformed, 1 for another subscription` where there were any.
pub fn unusual(malformed: u64, foreign: u64) -> String {
    if malformed + foreign == 0 {
        String::new()
    } else {
        format!("; {malformed} malformed, {foreign} for another subscription")
    }
}

// ---------------------------------------------------------------------------------------------
// Report

/// Min, median and max of some durations.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spread {
    pub n: usize,
    pub min: Duration,
    pub p50: Duration,
    pub max: Duration,
}

impl Spread {
    pub fn of(samples: &[Duration]) -> Spread {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        match sorted.len() {
            0 => Spread::default(),
            n => Spread {
                n,
                min: sorted[0],
                p50: sorted[(n - 1) / 2],
                max: sorted[n - 1],
            },
        }
    }

    pub fn text(&self) -> String {
        if self.n == 0 {
            return "n/a".into();
        }
        format!(
            "min {:.2} s / median {:.2} s / max {:.2} s (n={})",
            self.min.as_secs_f64(),
            self.p50.as_secs_f64(),
            self.max.as_secs_f64(),
            self.n
        )
    }

    fn json(&self) -> Value {
        json!({
            "n": self.n,
            "min_s": round3(self.min.as_secs_f64()),
            "median_s": round3(self.p50.as_secs_f64()),
            "max_s": round3(self.max.as_secs_f64()),
        })
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Everything a scenario found.
pub struct Report {
    pub scenario: String,
    /// False when the scenario could not run or stopped early (setup error, time bound).
    pub complete: bool,
    pub summary: String,
    pub run_dir: PathBuf,
    pub writes: Option<WriteCheck>,
    pub transactions: Option<TransactionCheck>,
    pub attempts: u64,
    pub creates: u64,
    pub updates: u64,
    /// Unacknowledged writes by how they were answered, with one example body each.
    pub refusals: BTreeMap<String, (u64, String, Duration)>,
    pub channels: Vec<ChannelRow>,
    pub recovery: Vec<(String, Vec<Duration>)>,
    /// What happened when, one line per fault.
    pub timeline: Vec<String>,
    /// Findings that fail the scenario.
    pub failures: Vec<String>,
    /// Findings that do not (observations).
    pub notes: Vec<String>,
    pub drained_in: Option<Duration>,
    pub machine: String,
    pub elapsed: Duration,
}

impl Report {
    pub fn new(run: &Run, summary: String) -> Report {
        Report::blank(run.scenario, summary, run.dir.clone())
    }

    /// A scenario that could not run or did not finish (no tmpfs, a set-up error, its time
    /// bound): it fails, saying why.
    pub fn incomplete(scenario: &str, why: String) -> Report {
        let mut report = Report::blank(scenario, "did not complete".into(), PathBuf::new());
        report.complete = false;
        report.failures.push(why);
        report.machine = load_average();
        report
    }

    fn blank(scenario: &str, summary: String, run_dir: PathBuf) -> Report {
        Report {
            scenario: scenario.to_string(),
            complete: true,
            summary,
            run_dir,
            writes: None,
            transactions: None,
            attempts: 0,
            creates: 0,
            updates: 0,
            refusals: BTreeMap::new(),
            channels: Vec::new(),
            recovery: Vec::new(),
            timeline: Vec::new(),
            failures: Vec::new(),
            notes: Vec::new(),
            drained_in: None,
            machine: String::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// Takes the load's counters and refusals.
    pub fn add_load(&mut self, log: &LoadLog) {
        use std::sync::atomic::Ordering;
        self.attempts = log.attempts.load(Ordering::Relaxed);
        self.creates = log.creates.load(Ordering::Relaxed);
        self.updates = log.updates.load(Ordering::Relaxed);
        for (kind, failure) in lock(&log.failures).iter() {
            self.refusals.insert(
                kind.clone(),
                (failure.count, failure.first_body.clone(), failure.slowest),
            );
        }
    }

    /// Takes the checks and turns what they found into failures.
    /// The transactions' all-or-nothing check.
    pub fn add_transactions(&mut self, transactions: TransactionCheck) {
        self.failures.extend(transactions.failures());
        self.transactions = Some(transactions);
    }

    pub fn add_checks(
        &mut self,
        writes: WriteCheck,
        channels: Vec<ChannelRow>,
        drained_in: Option<Duration>,
        drain_timeout: Duration,
    ) {
        self.failures.extend(writes.failures());
        for row in &channels {
            for failure in row.check.failures() {
                self.failures.push(format!("{}: {failure}", row.label));
            }
        }
        if drained_in.is_none() {
            self.failures.push(format!(
                "not every notification arrived within the drain timeout ({:.0} s)",
                drain_timeout.as_secs_f64()
            ));
        }
        self.writes = Some(writes);
        self.channels = channels;
        self.drained_in = drained_in;
    }

    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    pub fn print(&self) {
        println!();
        println!("== {}: {}", self.scenario, self.summary);
        if !self.run_dir.as_os_str().is_empty() {
            println!("   run dir   {}", self.run_dir.display());
        }
        println!("   machine   {}", self.machine);
        println!("   elapsed   {:.1} s", self.elapsed.as_secs_f64());
        for line in &self.timeline {
            println!("   fault     {line}");
        }
        if let Some(w) = &self.writes {
            println!(
                "   writes    {} attempted, {} acknowledged ({} creates, {} updates); {} Task versions in the store, {} of them from writes whose answer was lost; acknowledged but missing: {}; Tasks with history holes: {}",
                self.attempts,
                w.acknowledged,
                self.creates,
                self.updates,
                w.committed,
                w.unacknowledged_committed,
                w.missing,
                w.history_holes
            );
        }
        if let Some(t) = &self.transactions {
            println!(
                "   txs       {} transaction Bundles sent ({} Tasks each); {} in the store whole, {} not at all, half committed: {}",
                t.attempted,
                crate::verify::TRANSACTION_ENTRIES,
                t.committed,
                t.attempted - t.committed - t.partial,
                t.partial
            );
        }
        for (kind, (count, body, slowest)) in &self.refusals {
            println!(
                "   refused   {count:>6} x {kind} (slowest {:.2} s){}",
                slowest.as_secs_f64(),
                if body.is_empty() {
                    String::new()
                } else {
                    format!(": {body}")
                }
            );
        }
        if !self.channels.is_empty() {
            println!(
                "   {:<26} {:>8} {:>8} {:>9} {:>8} {:>6} {:>5} {:>6} {:>5} {:>8} {:>9}  status",
                "subscriber",
                "expected",
                "numbered",
                "delivered",
                "replayed",
                "lost",
                "dup",
                "order",
                "gaps",
                "phantom",
                "conflicts"
            );
            for row in &self.channels {
                let c = &row.check;
                println!(
                    "   {:<26} {:>8} {:>8} {:>9} {:>8} {:>6} {:>5} {:>6} {:>5} {:>8} {:>9}  {}",
                    row.label,
                    c.expected,
                    c.numbered,
                    c.delivered,
                    c.replayed_only,
                    c.lost,
                    c.duplicated,
                    c.out_of_order,
                    c.gaps,
                    c.phantom,
                    c.conflicts + c.version_order,
                    row.status
                );
                println!("   {:<26} {}", "", row.notes);
            }
        }
        if let Some(d) = self.drained_in {
            println!(
                "   drained   {:.1} s after the load stopped",
                d.as_secs_f64()
            );
        }
        for (label, samples) in &self.recovery {
            println!("   recovery  {label}: {}", Spread::of(samples).text());
        }
        for note in &self.notes {
            println!("   note      {note}");
        }
        for failure in &self.failures {
            println!("   FAILURE   {failure}");
        }
        println!(
            "   verdict   {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
    }

    pub fn json(&self) -> Value {
        let channels: Vec<Value> = self
            .channels
            .iter()
            .map(|r| {
                let c = &r.check;
                json!({
                    "subscriber": r.label,
                    "status": r.status,
                    "expected": c.expected,
                    "numbered": c.numbered,
                    "deliveries": c.deliveries,
                    "delivered": c.delivered,
                    "replayed_only": c.replayed_only,
                    "lost": c.lost,
                    "duplicated": c.duplicated,
                    "out_of_order": c.out_of_order,
                    "gaps": c.gaps,
                    "phantom": c.phantom,
                    "conflicts": c.conflicts,
                    "version_order": c.version_order,
                })
            })
            .collect();
        let recovery: serde_json::Map<String, Value> = self
            .recovery
            .iter()
            .map(|(label, samples)| (label.clone(), Spread::of(samples).json()))
            .collect();
        json!({
            "scenario": self.scenario,
            "passed": self.passed(),
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "attempted": self.attempts,
            "writes": self.writes.as_ref().map(|w| json!({
                "acknowledged": w.acknowledged,
                "committed": w.committed,
                "unacknowledged_committed": w.unacknowledged_committed,
                "missing": w.missing,
                "history_holes": w.history_holes,
            })),
            "transactions": self.transactions.as_ref().map(|t| json!({
                "attempted": t.attempted,
                "committed": t.committed,
                "partial": t.partial,
            })),
            "refused": self.refusals.iter().map(|(k, (n, _, _))| (k.clone(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "channels": channels,
            "recovery": recovery,
            "drained_s": self.drained_in.map(|d| round3(d.as_secs_f64())),
            "failures": self.failures,
            "machine": self.machine,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        let cases = [
            (ms(&[]), 0, 0, 0, 0),
            (ms(&[5]), 1, 5, 5, 5),
            (ms(&[30, 10, 20]), 3, 10, 20, 30),
            (ms(&[40, 10, 30, 20]), 4, 10, 20, 40),
        ];
        for (samples, n, min, p50, max) in cases {
            let spread = Spread::of(&samples);
            assert_eq!(
                (
                    spread.n,
                    spread.min.as_millis(),
                    spread.p50.as_millis(),
                    spread.max.as_millis()
                ),
                (n, min, p50, max),
                "{samples:?}"
            );
        }
    }
}
