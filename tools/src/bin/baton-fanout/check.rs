//! The fan-out verdict for one listener: its stream of events, in arrival order, against the
//! writes it should have heard. Pure.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use baton_tools::common::notification::NumberCheck;
use serde_json::{Value, json};

/// One event as a listener received it.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub at: Instant,
    pub number: i64,
    /// The Task's index in the run (`Names::task_index`).
    pub task: u32,
    pub version: u32,
}

/// A Task update whose notifications are expected.
#[derive(Clone, Copy)]
pub struct Write {
    pub task: u32,
    pub version: u32,
    pub responded: Instant,
}

/// Each write's index in `writes`, by (Task, version).
pub fn write_index(writes: &[Write]) -> HashMap<(u32, u32), usize> {
    writes
        .iter()
        .enumerate()
        .map(|(i, w)| ((w.task, w.version), i))
        .collect()
}

/// What one listener's stream of events looked like against what it should have been.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub expected: u64,
    pub received: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub unexpected: u64,
    /// Event numbers not contiguous from the first one received.
    pub holes: u64,
    pub repeated_numbers: u64,
    pub out_of_order: u64,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.expected += other.expected;
        self.received += other.received;
        self.missing += other.missing;
        self.duplicates += other.duplicates;
        self.unexpected += other.unexpected;
        self.holes += other.holes;
        self.repeated_numbers += other.repeated_numbers;
        self.out_of_order += other.out_of_order;
    }

    pub fn clean(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.unexpected == 0
            && self.holes == 0
            && self.repeated_numbers == 0
            && self.out_of_order == 0
    }

    pub fn line(&self) -> String {
        format!(
            "expected {}, received {}, missing {}, duplicates {}, unexpected {}, number holes {}, repeated numbers {}, out of order {}",
            self.expected,
            self.received,
            self.missing,
            self.duplicates,
            self.unexpected,
            self.holes,
            self.repeated_numbers,
            self.out_of_order
        )
    }

    pub fn json(&self) -> Value {
        json!({
            "expected": self.expected,
            "received": self.received,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "unexpected": self.unexpected,
            "number_holes": self.holes,
            "repeated_numbers": self.repeated_numbers,
            "out_of_order": self.out_of_order,
        })
    }
}

/// Checks one listener's arrivals (in arrival order) against the writes it should have
/// heard (`expected` indexes into the writes). Returns the tally and, per expected write, the
/// first arrival time.
pub fn check_listener(
    arrivals: &[Arrival],
    write_index: &HashMap<(u32, u32), usize>,
    expected: &[usize],
) -> (Tally, HashMap<usize, Instant>) {
    let wanted: HashSet<usize> = expected.iter().copied().collect();
    let mut first: HashMap<usize, Instant> = HashMap::with_capacity(expected.len());
    let mut tally = Tally {
        expected: expected.len() as u64,
        received: arrivals.len() as u64,
        ..Tally::default()
    };
    for arrival in arrivals {
        match write_index.get(&(arrival.task, arrival.version)) {
            Some(w) if wanted.contains(w) => match first.entry(*w) {
                // A repeat counts as a duplicate; the latency is the first arrival's.
                Entry::Occupied(_) => tally.duplicates += 1,
                Entry::Vacant(slot) => {
                    slot.insert(arrival.at);
                }
            },
            _ => tally.unexpected += 1,
        }
    }
    tally.missing = expected.iter().filter(|w| !first.contains_key(w)).count() as u64;
    // A listener may bind after its subscription's first events: numbers count from the
    // first one it received.
    let numbers: Vec<i64> = arrivals.iter().map(|a| a.number).collect();
    let check = NumberCheck::of(&numbers, None);
    tally.out_of_order = check.out_of_order;
    tally.repeated_numbers = check.repeated;
    tally.holes = check.holes;
    (tally, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_checks() {
        let at = Instant::now();
        let writes: Vec<Write> = [(0, 2), (1, 2), (0, 3)]
            .map(|(task, version)| Write {
                task,
                version,
                responded: at,
            })
            .to_vec();
        let index = write_index(&writes);
        let heard = |events: &[(i64, u32, u32)]| -> Vec<Arrival> {
            events
                .iter()
                .map(|&(number, task, version)| Arrival {
                    at,
                    number,
                    task,
                    version,
                })
                .collect()
        };
        let cases = [
            (
                "all, in order",
                heard(&[(4, 0, 2), (5, 1, 2), (6, 0, 3)]),
                &[0, 1, 2][..],
                Tally::default(),
            ),
            (
                "a repeat",
                heard(&[(4, 0, 2), (4, 0, 2), (5, 1, 2), (6, 0, 3)]),
                &[0, 1, 2][..],
                Tally {
                    duplicates: 1,
                    repeated_numbers: 1,
                    out_of_order: 1,
                    ..Tally::default()
                },
            ),
            (
                "one lost",
                heard(&[(4, 0, 2), (6, 0, 3)]),
                &[0, 1, 2][..],
                Tally {
                    missing: 1,
                    holes: 1,
                    ..Tally::default()
                },
            ),
            (
                "another owner's write",
                heard(&[(1, 0, 2), (2, 1, 2)]),
                &[0][..],
                Tally {
                    unexpected: 1,
                    ..Tally::default()
                },
            ),
        ];
        for (name, arrivals, expected, mut tally) in cases {
            tally.expected = expected.len() as u64;
            tally.received = arrivals.len() as u64;
            let (got, first) = check_listener(&arrivals, &index, expected);
            assert_eq!(got, tally, "{name}");
            assert_eq!(got.clean(), name == "all, in order", "{name}");
            assert_eq!(first.len() as u64, tally.expected - tally.missing, "{name}");
        }
    }
}
