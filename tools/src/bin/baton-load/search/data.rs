//! The work-list data set of issue 16: what the `n`-th seeded Task looks like, as a pure
//! function of the data set's shape and the Task's number. Each Task is drawn from a hash of
//! (`rng_seed`, number, field), not from a sequential generator, so any number of workers may
//! seed in any order and two runs with the same flags write the same Tasks; a later run
//! with `--skip-seed` knows the value ranges from the same flags.

use serde_json::{Value, json};
use time::{Date, Month};

/// The code system of the role queues (`Task.performerType`): a local system, as a hospital
/// would define its own work queues.
pub const QUEUE_SYSTEM: &str = "http://baton.example/CodeSystem/work-queue";

/// The twenty role queues.
pub const QUEUES: [&str; 20] = [
    "triage",
    "pharmacy",
    "radiology",
    "laboratory",
    "discharge",
    "bed-management",
    "wound-care",
    "physiotherapy",
    "dietetics",
    "social-work",
    "cardiology",
    "oncology",
    "transport",
    "scheduling",
    "clinical-coding",
    "billing",
    "infection-control",
    "pain-team",
    "respiratory",
    "palliative-care",
];

/// The identifier system of seeded Tasks; the value is `{rng_seed}-{number}`, so a run with
/// `--skip-seed` can check that the server holds the data set it assumes.
pub const IDENTIFIER_SYSTEM: &str = "urn:baton-load:search";

/// Statuses and their share in percent: 60 % completed, the rest open work.
pub const STATUS_WEIGHTS: [(&str, u64); 7] = [
    ("completed", 60),
    ("requested", 12),
    ("accepted", 8),
    ("in-progress", 10),
    ("on-hold", 4),
    ("ready", 3),
    ("cancelled", 3),
];

/// Priorities and their share in percent.
pub const PRIORITY_WEIGHTS: [(&str, u64); 4] =
    [("routine", 70), ("urgent", 20), ("asap", 7), ("stat", 3)];

/// Percent of Tasks without an owner: they wait in their role queue.
pub const UNOWNED_PERCENT: u64 = 30;

/// The size and value ranges of a data set; every seeded value follows from these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub tasks: u64,
    /// Owners are `Practitioner/p0` … `Practitioner/p{owners-1}`.
    pub owners: u64,
    /// Patients are `Patient/pt0` … `Patient/pt{patients-1}`.
    pub patients: u64,
    pub rng_seed: u64,
    /// Due dates fall on `due_days` days from this one.
    pub due_from: Date,
    pub due_days: u32,
}

/// One seeded Task, before it becomes JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub number: u64,
    pub status: &'static str,
    pub priority: &'static str,
    /// Index of the owner (`Practitioner/p{k}`), or none for a role-queue Task.
    pub owner: Option<u64>,
    /// Index into `QUEUES`: every Task came from a role queue, owned ones were claimed.
    pub queue: usize,
    pub patient: u64,
    pub due_day: Date,
    /// Hour of the due time (UTC), 08 to 17.
    pub due_hour: u8,
}

/// The fields a Task is drawn for; each gets its own hash stream.
#[derive(Clone, Copy)]
enum Field {
    Status = 1,
    Priority,
    Owned,
    Owner,
    Queue,
    Patient,
    DueDay,
    DueHour,
    Requester,
}

impl Shape {
    /// The `number`-th Task of the data set.
    pub fn plan(&self, number: u64) -> Planned {
        let draw = |field: Field| mix(self.rng_seed, number, field as u64);
        let owned = draw(Field::Owned) % 100 >= UNOWNED_PERCENT;
        Planned {
            number,
            status: weighted(&STATUS_WEIGHTS, draw(Field::Status)),
            priority: weighted(&PRIORITY_WEIGHTS, draw(Field::Priority)),
            owner: owned.then(|| draw(Field::Owner) % self.owners.max(1)),
            queue: (draw(Field::Queue) % QUEUES.len() as u64) as usize,
            patient: draw(Field::Patient) % self.patients.max(1),
            due_day: self.day(draw(Field::DueDay)),
            due_hour: 8 + (draw(Field::DueHour) % 10) as u8,
        }
    }

    /// The `number`-th Task as the JSON that is posted.
    pub fn task(&self, number: u64) -> Value {
        let planned = self.plan(number);
        let requester = mix(self.rng_seed, number, Field::Requester as u64) % self.owners.max(1);
        let due = format!(
            "{}T{:02}:00:00Z",
            day_text(planned.due_day),
            planned.due_hour
        );
        let authored = planned.due_day - time::Duration::days(7);
        let mut task = json!({
            "resourceType": "Task",
            "identifier": [{ "system": IDENTIFIER_SYSTEM, "value": self.identifier(number) }],
            "status": planned.status,
            "intent": "order",
            "priority": planned.priority,
            "code": { "coding": [{ "system": "http://hl7.org/fhir/CodeSystem/task-code", "code": "fulfill" }] },
            "description": format!("Work-list Task {number}"),
            "focus": { "reference": format!("ServiceRequest/sr{number}") },
            "for": { "reference": format!("Patient/pt{}", planned.patient) },
            "authoredOn": format!("{}T08:00:00Z", day_text(authored)),
            "requester": { "reference": format!("Practitioner/p{requester}") },
            "performerType": [{ "coding": [{ "system": QUEUE_SYSTEM, "code": QUEUES[planned.queue] }] }],
            "restriction": { "period": { "end": due } },
        });
        if let Some(owner) = planned.owner {
            task["owner"] = json!({ "reference": format!("Practitioner/p{owner}") });
        }
        task
    }

    /// The identifier value of the `number`-th Task.
    pub fn identifier(&self, number: u64) -> String {
        format!("{}-{number}", self.rng_seed)
    }

    /// The day a draw falls on, within the due-date range.
    pub fn day(&self, draw: u64) -> Date {
        self.due_from + time::Duration::days((draw % u64::from(self.due_days.max(1))) as i64)
    }
}

/// Picks from `(value, weight)` pairs whose weights sum to 100.
fn weighted(table: &[(&'static str, u64)], draw: u64) -> &'static str {
    let mut point = draw % table.iter().map(|(_, w)| w).sum::<u64>();
    for (value, weight) in table {
        if point < *weight {
            return value;
        }
        point -= weight;
    }
    table[table.len() - 1].0
}

/// A well-mixed 64-bit hash of three numbers (splitmix64's finaliser over each in turn), so
/// that neighbouring numbers and fields give unrelated draws.
pub fn mix(seed: u64, number: u64, field: u64) -> u64 {
    let mut state = seed;
    for word in [number, field] {
        state = splitmix(state ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    }
    state
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `2027-03-15`.
pub fn day_text(day: Date) -> String {
    format!(
        "{}-{:02}-{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

/// Reads `YYYY-MM-DD` (the `--due-from` flag).
pub fn parse_day(text: &str) -> Result<Date, String> {
    let bad = || format!("'{text}' is not a date such as 2026-07-01");
    let mut parts = text.trim().splitn(3, '-');
    let mut next = || parts.next().ok_or_else(bad);
    let year: i32 = next()?.parse().map_err(|_| bad())?;
    let month: u8 = next()?.parse().map_err(|_| bad())?;
    let day: u8 = next()?.parse().map_err(|_| bad())?;
    let month = Month::try_from(month).map_err(|_| bad())?;
    Date::from_calendar_date(year, month, day).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(tasks: u64) -> Shape {
        Shape {
            tasks,
            owners: 1000,
            patients: 20_000,
            rng_seed: 7,
            due_from: parse_day("2026-07-01").unwrap(),
            due_days: 365,
        }
    }

    /// The share of `plans` for which `test` holds, in percent.
    fn percent(plans: &[Planned], test: impl Fn(&Planned) -> bool) -> f64 {
        100.0 * plans.iter().filter(|p| test(p)).count() as f64 / plans.len() as f64
    }

    #[test]
    fn the_distribution_is_the_issues() {
        let shape = shape(100_000);
        let plans: Vec<Planned> = (0..shape.tasks).map(|n| shape.plan(n)).collect();
        for (status, weight) in STATUS_WEIGHTS {
            let share = percent(&plans, |p| p.status == status);
            assert!((share - weight as f64).abs() < 0.6, "{status}: {share}%");
        }
        for (priority, weight) in PRIORITY_WEIGHTS {
            let share = percent(&plans, |p| p.priority == priority);
            assert!((share - weight as f64).abs() < 0.6, "{priority}: {share}%");
        }
        let unowned = percent(&plans, |p| p.owner.is_none());
        assert!((unowned - 30.0).abs() < 0.6, "unowned {unowned}%");
        // Every owner, queue and due day is used, and nothing falls outside the ranges.
        let mut owners = vec![0u32; 1000];
        let mut queues = [0u32; 20];
        let mut days = std::collections::BTreeSet::new();
        for plan in &plans {
            owners[plan.owner.map_or(0, |o| o as usize)] += 1;
            queues[plan.queue] += 1;
            assert!(plan.patient < 20_000);
            assert!((8..18).contains(&plan.due_hour));
            days.insert(plan.due_day);
        }
        // 70 000 owned Tasks over 1000 owners: about 70 each, none far off.
        assert!(
            owners[1..].iter().all(|&n| (35..=110).contains(&n)),
            "{owners:?}"
        );
        assert!(
            queues.iter().all(|&n| (4500..=5500).contains(&n)),
            "{queues:?}"
        );
        assert_eq!(days.len(), 365);
        assert_eq!(days.first().copied(), Some(shape.due_from));
        assert_eq!(
            days.last().map(|d| day_text(*d)).as_deref(),
            Some("2027-06-30")
        );
    }

    #[test]
    fn tasks_depend_only_on_the_seed_and_their_number() {
        let a = shape(10);
        assert_eq!(a.task(3), a.task(3));
        assert_ne!(a.task(3), a.task(4));
        let other = Shape { rng_seed: 8, ..a };
        assert_ne!(a.plan(3), other.plan(3));
        assert_eq!(a.task(3)["identifier"][0]["value"], "7-3");
    }

    #[test]
    fn a_task_carries_every_work_list_field() {
        let shape = shape(100);
        let (owned, unowned) = (0..100)
            .map(|n| (shape.plan(n), shape.task(n)))
            .partition::<Vec<_>, _>(|(plan, _)| plan.owner.is_some());
        let (plan, task) = &owned[0];
        assert_eq!(task["status"], plan.status);
        assert_eq!(task["priority"], plan.priority);
        assert_eq!(
            task["owner"]["reference"],
            format!("Practitioner/p{}", plan.owner.unwrap())
        );
        assert_eq!(
            task["for"]["reference"],
            format!("Patient/pt{}", plan.patient)
        );
        assert_eq!(
            task["performerType"][0]["coding"][0],
            json!({ "system": QUEUE_SYSTEM, "code": QUEUES[plan.queue] })
        );
        let due = task["restriction"]["period"]["end"].as_str().unwrap();
        assert!(due.starts_with(&day_text(plan.due_day)), "{due}");
        assert!(due.ends_with(":00:00Z"), "{due}");
        assert!(unowned[0].1.get("owner").is_none());
    }

    #[test]
    fn days_parse_and_print() {
        assert_eq!(day_text(parse_day("2027-03-05").unwrap()), "2027-03-05");
        for bad in ["2027-13-01", "2027-02-30", "tomorrow", "2027-03"] {
            assert!(parse_day(bad).is_err(), "{bad}");
        }
    }
}
