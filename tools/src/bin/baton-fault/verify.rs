//! The campaign's verdict, as pure functions of what was written, what the store holds after
//! recovery, and what each subscriber received.
//!
//! Definitions (RELIABILITY.md repeats them):
//! - **expected**: every Task version the store holds after recovery. Each one is a committed
//!   change, so each must be numbered once and delivered, whether or not its writer saw the
//!   answer.
//! - **lost**: an expected version no delivery carried (websocket: neither live nor through
//!   `$events`).
//! - **duplicated**: deliveries of an event number already delivered (allowed: delivery is at
//!   least once; reported).
//! - **out of order**: a delivery of event `n` before every event below `n` had been delivered
//!   at least once (rest-hook, AMQP); for a websocket, whose live stream may start anywhere, a
//!   first delivery of `n` on a connection that already carried a higher number. A repeat of
//!   numbers already delivered (a re-sent batch) is a duplicate, not a reordering.
//! - **gaps**: numbers between 1 and the hub's `events-since-subscription-start` never seen.
//! - **phantom**: a delivered Task version the store does not hold (a notification about a
//!   write that was lost).
//! - **conflicts**: one number carrying two different Task versions, or one version under two
//!   numbers.
//! - **version order**: a Task's later version numbered before its earlier one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// One Task version, as `(id, versionId)`.
pub type TaskVersion = (String, u32);

/// How an event reached the campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Pushed by the hub; for a websocket, the number of the connection it came on.
    Delivery(u32),
    /// Read back through `$events` (websocket gap filling and the final check).
    Replay,
}

/// One event as a subscriber received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arrival {
    pub number: i64,
    pub task: String,
    pub version: u32,
    pub via: Via,
}

/// How delivery order is judged for a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderRule {
    /// rest-hook and AMQP: per subscription, in event-number order, at least once.
    Strict,
    /// websocket: live and best effort; each connection's new numbers must increase.
    PerConnection,
}

/// What the store holds after recovery: the current version of every Task of the run.
#[derive(Debug, Default, Clone)]
pub struct Truth {
    pub versions: BTreeMap<String, u32>,
}

impl Truth {
    /// Every committed Task version: versions 1..=current of each Task.
    pub fn committed(&self) -> BTreeSet<TaskVersion> {
        self.versions
            .iter()
            .flat_map(|(task, &current)| (1..=current).map(move |v| (task.clone(), v)))
            .collect()
    }

    pub fn holds(&self, task: &str, version: u32) -> bool {
        self.versions
            .get(task)
            .is_some_and(|&current| version >= 1 && version <= current)
    }
}

/// One subscription's stream against the truth.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ChannelCheck {
    pub expected: u64,
    /// The hub's `events-since-subscription-start` after the drain.
    pub numbered: i64,
    /// Events pushed by the hub, repeats included.
    pub deliveries: u64,
    /// Distinct expected events pushed by the hub.
    pub delivered: u64,
    /// Distinct expected events that only `$events` supplied.
    pub replayed_only: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub gaps: u64,
    pub phantom: u64,
    pub conflicts: u64,
    pub version_order: u64,
}

impl ChannelCheck {
    /// Whether this stream breaks a guarantee. Duplicates are allowed (at least once), and a
    /// websocket may miss live events that `$events` still has.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let mut fail = |count: u64, what: &str| {
            if count > 0 {
                failures.push(format!("{count} {what}"));
            }
        };
        fail(self.lost, "lost");
        fail(self.out_of_order, "out of order");
        fail(self.gaps, "gaps in event numbers");
        fail(self.phantom, "phantom (delivered, not stored)");
        fail(self.conflicts, "conflicting numbers");
        fail(self.version_order, "versions numbered out of order");
        if self.numbered != self.expected as i64 {
            failures.push(format!(
                "the hub numbered {} events for {} committed changes",
                self.numbered, self.expected
            ));
        }
        failures
    }
}

/// Checks one subscription's arrivals (in arrival order) against the committed versions and
/// the hub's final event count.
pub fn check_channel(
    truth: &Truth,
    numbered: i64,
    arrivals: &[Arrival],
    rule: OrderRule,
) -> ChannelCheck {
    let committed = truth.committed();
    let mut check = ChannelCheck {
        expected: committed.len() as u64,
        numbered,
        ..ChannelCheck::default()
    };
    let mut by_number: HashMap<i64, TaskVersion> = HashMap::new();
    let mut by_version: HashMap<TaskVersion, i64> = HashMap::new();
    let mut delivered_numbers: HashSet<i64> = HashSet::new();
    let mut delivered: HashSet<TaskVersion> = HashSet::new();
    let mut seen: HashSet<TaskVersion> = HashSet::new();
    let mut phantoms: HashSet<TaskVersion> = HashSet::new();
    let mut contiguous = 0i64;
    let mut last_on_connection: HashMap<u32, i64> = HashMap::new();
    for arrival in arrivals {
        let key = (arrival.task.clone(), arrival.version);
        match by_number.get(&arrival.number) {
            Some(known) if *known != key => check.conflicts += 1,
            Some(_) => {}
            None => {
                by_number.insert(arrival.number, key.clone());
            }
        }
        match by_version.get(&key) {
            Some(&number) if number != arrival.number => check.conflicts += 1,
            Some(_) => {}
            None => {
                by_version.insert(key.clone(), arrival.number);
            }
        }
        if !truth.holds(&arrival.task, arrival.version) {
            phantoms.insert(key.clone());
        }
        seen.insert(key.clone());
        let Via::Delivery(connection) = arrival.via else {
            continue;
        };
        check.deliveries += 1;
        let repeat = !delivered_numbers.insert(arrival.number);
        if repeat {
            check.duplicated += 1;
        }
        delivered.insert(key);
        match rule {
            OrderRule::Strict => {
                if arrival.number > contiguous + 1 {
                    check.out_of_order += 1;
                }
                while delivered_numbers.contains(&(contiguous + 1)) {
                    contiguous += 1;
                }
            }
            OrderRule::PerConnection => {
                let last = last_on_connection.entry(connection).or_insert(0);
                if !repeat && arrival.number < *last {
                    check.out_of_order += 1;
                }
                *last = (*last).max(arrival.number);
            }
        }
    }
    check.phantom = phantoms.len() as u64;
    check.delivered = committed.iter().filter(|k| delivered.contains(*k)).count() as u64;
    check.replayed_only = committed
        .iter()
        .filter(|k| seen.contains(*k) && !delivered.contains(*k))
        .count() as u64;
    check.lost = committed.iter().filter(|k| !seen.contains(*k)).count() as u64;
    check.gaps = (1..=numbered.max(0))
        .filter(|n| !by_number.contains_key(n))
        .count() as u64;
    // Per Task, event numbers must rise with the version.
    let mut per_task: BTreeMap<&str, Vec<(u32, i64)>> = BTreeMap::new();
    for ((task, version), number) in &by_version {
        per_task
            .entry(task.as_str())
            .or_default()
            .push((*version, *number));
    }
    for numbers in per_task.values_mut() {
        numbers.sort_unstable();
        check.version_order += numbers.windows(2).filter(|w| w[1].1 <= w[0].1).count() as u64;
    }
    check
}

/// One write the server acknowledged (2xx with an ETag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedWrite {
    pub task: String,
    pub version: u32,
    pub marker: String,
}

/// Acknowledged writes against what the store holds after recovery.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteCheck {
    pub acknowledged: u64,
    /// Task versions the store holds (creates and updates).
    pub committed: u64,
    /// Acknowledged writes whose version is absent, or holds another write's content.
    pub missing: u64,
    /// Committed versions no writer saw acknowledged (the answer was lost to a fault).
    pub unacknowledged_committed: u64,
    /// Tasks whose history is not exactly versions 1..=current.
    pub history_holes: u64,
}

impl WriteCheck {
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        if self.missing > 0 {
            failures.push(format!(
                "{} acknowledged writes missing after recovery",
                self.missing
            ));
        }
        if self.history_holes > 0 {
            failures.push(format!(
                "{} Tasks with holes in their history",
                self.history_holes
            ));
        }
        failures
    }
}

/// Checks acknowledged writes against each Task's history (`version → description`).
pub fn check_writes(
    acked: &[AckedWrite],
    truth: &Truth,
    history: &BTreeMap<String, BTreeMap<u32, String>>,
) -> WriteCheck {
    let committed = truth.committed().len() as u64;
    let missing = acked
        .iter()
        .filter(|w| {
            history
                .get(&w.task)
                .and_then(|versions| versions.get(&w.version))
                != Some(&w.marker)
        })
        .count() as u64;
    let history_holes = truth
        .versions
        .iter()
        .filter(|(task, current)| {
            let versions: Vec<u32> = history
                .get(*task)
                .map(|h| h.keys().copied().collect())
                .unwrap_or_default();
            versions != (1..=**current).collect::<Vec<u32>>()
        })
        .count() as u64;
    let acknowledged = acked.len() as u64;
    WriteCheck {
        acknowledged,
        committed,
        missing,
        unacknowledged_committed: committed.saturating_sub(acknowledged - missing),
        history_holes,
    }
}

/// How many Tasks one transaction of the load creates: a coordination Task and its sub-tasks.
pub const TRANSACTION_ENTRIES: usize = 3;

/// The `description` of entry `entry` of the transaction with `marker`, in its first version.
pub fn transaction_entry_marker(marker: &str, entry: usize) -> String {
    format!("{marker}/e{entry}")
}

/// Transaction Bundles sent, against what the store holds: each creates
/// `TRANSACTION_ENTRIES` Tasks together or none of them, whether or not its answer arrived.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TransactionCheck {
    pub attempted: u64,
    /// Transactions whose every Task is in the store.
    pub committed: u64,
    /// Transactions with some of their Tasks in the store and not all: atomicity broken.
    pub partial: u64,
}

impl TransactionCheck {
    pub fn failures(&self) -> Vec<String> {
        if self.partial == 0 {
            return Vec::new();
        }
        vec![format!(
            "{} transactions half committed (some of their Tasks in the store, not all)",
            self.partial
        )]
    }
}

/// Counts, per attempted transaction, the Tasks whose first version carries one of its entry
/// markers (`history`: every Task of the run, `version → description`).
pub fn check_transactions(
    attempted: &[String],
    history: &BTreeMap<String, BTreeMap<u32, String>>,
) -> TransactionCheck {
    let mut found: BTreeMap<&str, usize> = BTreeMap::new();
    for versions in history.values() {
        if let Some((marker, _entry)) = versions.get(&1).and_then(|d| d.rsplit_once("/e")) {
            *found.entry(marker).or_default() += 1;
        }
    }
    let mut check = TransactionCheck {
        attempted: attempted.len() as u64,
        ..TransactionCheck::default()
    };
    for marker in attempted {
        match found.get(marker.as_str()) {
            None => {}
            Some(&n) if n == TRANSACTION_ENTRIES => check.committed += 1,
            Some(_) => check.partial += 1,
        }
    }
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth(tasks: &[(&str, u32)]) -> Truth {
        Truth {
            versions: tasks.iter().map(|(t, v)| (t.to_string(), *v)).collect(),
        }
    }

    fn delivered(events: &[(i64, &str, u32)]) -> Vec<Arrival> {
        on(0, events)
    }

    fn on(connection: u32, events: &[(i64, &str, u32)]) -> Vec<Arrival> {
        events
            .iter()
            .map(|(n, t, v)| Arrival {
                number: *n,
                task: t.to_string(),
                version: *v,
                via: Via::Delivery(connection),
            })
            .collect()
    }

    fn replayed(events: &[(i64, &str, u32)]) -> Vec<Arrival> {
        events
            .iter()
            .map(|(n, t, v)| Arrival {
                number: *n,
                task: t.to_string(),
                version: *v,
                via: Via::Replay,
            })
            .collect()
    }

    #[test]
    fn channel_checks() {
        // Task a has versions 1..=2, b has 1: three events numbered 1..=3.
        let store = truth(&[("a", 2), ("b", 1)]);
        let in_order = delivered(&[(1, "a", 1), (2, "b", 1), (3, "a", 2)]);
        let cases: Vec<(&str, i64, Vec<Arrival>, OrderRule, ChannelCheck)> = vec![
            (
                "clean",
                3,
                in_order.clone(),
                OrderRule::Strict,
                ChannelCheck {
                    expected: 3,
                    numbered: 3,
                    deliveries: 3,
                    delivered: 3,
                    ..ChannelCheck::default()
                },
            ),
            (
                "a re-sent batch is a duplicate, not out of order",
                3,
                [in_order.clone(), delivered(&[(2, "b", 1), (3, "a", 2)])].concat(),
                OrderRule::Strict,
                ChannelCheck {
                    expected: 3,
                    numbered: 3,
                    deliveries: 5,
                    delivered: 3,
                    duplicated: 2,
                    ..ChannelCheck::default()
                },
            ),
            (
                "skipping ahead is out of order",
                3,
                delivered(&[(1, "a", 1), (3, "a", 2), (2, "b", 1)]),
                OrderRule::Strict,
                ChannelCheck {
                    expected: 3,
                    numbered: 3,
                    deliveries: 3,
                    delivered: 3,
                    out_of_order: 1,
                    ..ChannelCheck::default()
                },
            ),
            (
                "a lost event is lost and a gap",
                3,
                delivered(&[(1, "a", 1), (2, "b", 1)]),
                OrderRule::Strict,
                ChannelCheck {
                    expected: 3,
                    numbered: 3,
                    deliveries: 2,
                    delivered: 2,
                    lost: 1,
                    gaps: 1,
                    ..ChannelCheck::default()
                },
            ),
            (
                "a notification about a version the store lost is a phantom",
                4,
                [in_order.clone(), delivered(&[(4, "a", 3)])].concat(),
                OrderRule::Strict,
                ChannelCheck {
                    expected: 3,
                    numbered: 4,
                    deliveries: 4,
                    delivered: 3,
                    phantom: 1,
                    ..ChannelCheck::default()
                },
            ),
            (
                "one number for two versions conflicts",
                3,
                [in_order.clone(), delivered(&[(3, "b", 1)])].concat(),
                OrderRule::Strict,
                ChannelCheck {
                    expected: 3,
                    numbered: 3,
                    deliveries: 4,
                    delivered: 3,
                    duplicated: 1,
                    conflicts: 2,
                    ..ChannelCheck::default()
                },
            ),
            (
                "a later version numbered first",
                3,
                delivered(&[(1, "a", 2), (2, "b", 1), (3, "a", 1)]),
                OrderRule::Strict,
                ChannelCheck {
                    expected: 3,
                    numbered: 3,
                    deliveries: 3,
                    delivered: 3,
                    version_order: 1,
                    ..ChannelCheck::default()
                },
            ),
            (
                "websocket: missed live, replayed, reconnected",
                3,
                [
                    on(1, &[(1, "a", 1)]),
                    replayed(&[(2, "b", 1)]),
                    on(2, &[(3, "a", 2)]),
                ]
                .concat(),
                OrderRule::PerConnection,
                ChannelCheck {
                    expected: 3,
                    numbered: 3,
                    deliveries: 2,
                    delivered: 2,
                    replayed_only: 1,
                    ..ChannelCheck::default()
                },
            ),
            (
                "websocket: a re-sent batch on one connection is a duplicate",
                3,
                [
                    on(1, &[(1, "a", 1), (2, "b", 1), (1, "a", 1), (2, "b", 1)]),
                    replayed(&[(3, "a", 2)]),
                ]
                .concat(),
                OrderRule::PerConnection,
                ChannelCheck {
                    expected: 3,
                    numbered: 3,
                    deliveries: 4,
                    delivered: 2,
                    replayed_only: 1,
                    duplicated: 2,
                    ..ChannelCheck::default()
                },
            ),
            (
                "websocket: backwards on one connection",
                3,
                [on(1, &[(2, "b", 1), (1, "a", 1)]), replayed(&[(3, "a", 2)])].concat(),
                OrderRule::PerConnection,
                ChannelCheck {
                    expected: 3,
                    numbered: 3,
                    deliveries: 2,
                    delivered: 2,
                    replayed_only: 1,
                    out_of_order: 1,
                    ..ChannelCheck::default()
                },
            ),
            (
                "fewer numbers than committed changes",
                2,
                delivered(&[(1, "a", 1), (2, "b", 1)]),
                OrderRule::Strict,
                ChannelCheck {
                    expected: 3,
                    numbered: 2,
                    deliveries: 2,
                    delivered: 2,
                    lost: 1,
                    ..ChannelCheck::default()
                },
            ),
        ];
        for (name, numbered, arrivals, rule, expected) in cases {
            let got = check_channel(&store, numbered, &arrivals, rule);
            assert_eq!(got, expected, "{name}");
            // Repeats, and live websocket events missed but replayable, are allowed.
            let clean = [
                "clean",
                "a re-sent batch is a duplicate, not out of order",
                "websocket: missed live, replayed, reconnected",
                "websocket: a re-sent batch on one connection is a duplicate",
            ]
            .contains(&name);
            assert_eq!(
                got.failures().is_empty(),
                clean,
                "{name}: {:?}",
                got.failures()
            );
        }
    }

    #[test]
    fn write_checks() {
        let store = truth(&[("a", 2), ("b", 1)]);
        let history = |entries: &[(&str, u32, &str)]| {
            let mut h: BTreeMap<String, BTreeMap<u32, String>> = BTreeMap::new();
            for (t, v, m) in entries {
                h.entry(t.to_string())
                    .or_default()
                    .insert(*v, m.to_string());
            }
            h
        };
        let acked = |entries: &[(&str, u32, &str)]| -> Vec<AckedWrite> {
            entries
                .iter()
                .map(|(t, v, m)| AckedWrite {
                    task: t.to_string(),
                    version: *v,
                    marker: m.to_string(),
                })
                .collect()
        };
        let full = history(&[("a", 1, "w1"), ("a", 2, "w2"), ("b", 1, "w3")]);
        let cases = vec![
            (
                "all there; one committed write was never acknowledged",
                acked(&[("a", 1, "w1"), ("a", 2, "w2")]),
                full.clone(),
                WriteCheck {
                    acknowledged: 2,
                    committed: 3,
                    missing: 0,
                    unacknowledged_committed: 1,
                    history_holes: 0,
                },
            ),
            (
                "an acknowledged version holds another write",
                acked(&[("a", 2, "other"), ("b", 1, "w3")]),
                full.clone(),
                WriteCheck {
                    acknowledged: 2,
                    committed: 3,
                    missing: 1,
                    unacknowledged_committed: 2,
                    history_holes: 0,
                },
            ),
            (
                "an acknowledged version is gone",
                acked(&[("a", 3, "w4")]),
                full.clone(),
                WriteCheck {
                    acknowledged: 1,
                    committed: 3,
                    missing: 1,
                    unacknowledged_committed: 3,
                    history_holes: 0,
                },
            ),
            (
                "a hole in a history",
                acked(&[]),
                history(&[("a", 2, "w2"), ("b", 1, "w3")]),
                WriteCheck {
                    acknowledged: 0,
                    committed: 3,
                    missing: 0,
                    unacknowledged_committed: 3,
                    history_holes: 1,
                },
            ),
        ];
        for (name, acked, history, expected) in cases {
            assert_eq!(check_writes(&acked, &store, &history), expected, "{name}");
        }
    }

    #[test]
    fn transaction_checks() {
        let mut history: BTreeMap<String, BTreeMap<u32, String>> = BTreeMap::new();
        let mut first_version = |task: &str, description: String| {
            history
                .entry(task.to_string())
                .or_default()
                .insert(1, description);
        };
        for e in 0..TRANSACTION_ENTRIES {
            first_version(&format!("whole-{e}"), transaction_entry_marker("r:0:1", e));
        }
        first_version("half-0", transaction_entry_marker("r:0:2", 0));
        first_version("plain", "r:0:3".into());
        // A later version of a transaction's Task does not move it out of its transaction.
        history
            .get_mut("whole-0")
            .unwrap()
            .insert(2, "r:1:9".into());
        let attempted: Vec<String> = ["r:0:1", "r:0:2", "r:0:4"].map(String::from).to_vec();
        let check = check_transactions(&attempted, &history);
        assert_eq!(
            check,
            TransactionCheck {
                attempted: 3,
                committed: 1,
                partial: 1,
            }
        );
        assert_eq!(check.failures().len(), 1);
    }
}
