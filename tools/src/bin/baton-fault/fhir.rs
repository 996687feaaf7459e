//! What the campaign sends to Baton beyond the common bodies: every Task and subscription of a
//! run carries the run's code, so subscriptions hear only this run's Tasks. Pure, no IO.

use baton_tools::common::fhir::{Channel, subscription_body, task_body};
use serde_json::{Value, json};

/// The code system that tags every Task of a run.
pub const RUN_SYSTEM: &str = "https://baton.dev/fault-campaign";

/// A Task of this run. `marker` goes into `description`, so that each acknowledged write can
/// later be recognised in the Task's history.
pub fn run_task(id: Option<&str>, run: &str, owner: &str, marker: &str) -> Value {
    let mut task = task_body(owner, id, Some(marker));
    task["code"] = json!({ "coding": [{ "system": RUN_SYSTEM, "code": run }] });
    task
}

/// A `task-changed` subscription filtered on this run's code, with id-only content (each event
/// then names its Task and version, which is all the campaign checks).
pub fn run_subscription(base: &str, run: &str, reason: &str, channel: Channel<'_>) -> Value {
    let filter = format!("code={RUN_SYSTEM}|{run}");
    subscription_body(base, reason, Some(&filter), channel)
}

/// Whether a body is a FHIR OperationOutcome with at least one issue.
pub fn is_operation_outcome(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        v["resourceType"] == "OperationOutcome"
            && v["issue"].as_array().is_some_and(|i| !i.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_bodies() {
        let task = run_task(Some("t1"), "r1", "Practitioner/fault-0", "r1:0:7");
        assert_eq!(task["id"], "t1");
        assert_eq!(task["description"], "r1:0:7");
        assert_eq!(task["code"]["coding"][0]["code"], "r1");
        let subscription = run_subscription("http://h/fhir", "r1", "why", Channel::WebSocket);
        assert_eq!(
            subscription["_criteria"]["extension"][0]["valueString"],
            format!("code={RUN_SYSTEM}|r1")
        );
        let outcomes = [
            (
                &br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error"}]}"#[..],
                true,
            ),
            (
                &br#"{"resourceType":"OperationOutcome","issue":[]}"#[..],
                false,
            ),
            (&b"internal error"[..], false),
        ];
        for (body, expected) in outcomes {
            assert_eq!(
                is_operation_outcome(body),
                expected,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
