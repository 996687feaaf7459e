//! Bidding Tasks: the placer solicits offers from potential fulfillers before it gives the
//! work to one of them.
//!
//! - The **bidding Task** (`code` `bidding` of `WORKFLOW_TASK_SYSTEM`) has no owner and a
//!   `performerType`: it waits in that role queue, where every candidate sees it. Its `focus`
//!   is the coordination Task to award, open and without an owner. Candidate owners may be
//!   narrowed further with `CANDIDATE_EXTENSION` (one `valueReference` per candidate).
//! - A **bid** (`code` `bid`) is a Task `partOf` the bidding Task, owned by the candidate, so
//!   only the candidate and the placer's systems (admins, auditors) ever read it. Its `output`
//!   says whether the candidate is willing (`willing`, `valueBoolean`, required) and how:
//!   `earliest-start` (`valueDateTime`), `cost` (`valueMoney`), `conditions` (`valueString`),
//!   typed with `BID_SYSTEM`. One bid per candidate; none once the bidding is closed (409).
//! - The **award**: the placer completes the bidding Task with an `output` `awarded`
//!   (`valueReference` to the chosen bid). In the same transaction the coordination Task gets
//!   the chosen candidate as `owner`, the chosen bid becomes `accepted` and every other open
//!   bid `rejected` (so each candidate hears it). Cancelling or rejecting the bidding Task
//!   closes it without an award: the open bids become `rejected`.

use serde_json::{Value, json};

use crate::error::{Error, IssueCode, Result};
use crate::fhir::ids::TaskId;
use crate::fhir::normalize_reference;
use crate::fhir::task as task_rules;
use crate::fhir::workflow::focal_task;
use crate::fhir::workflow::information::WORKFLOW_TASK_SYSTEM;

/// The code of a bidding Task.
pub const BIDDING: &str = "bidding";
/// The code of a bid.
pub const BID: &str = "bid";
/// The code system of a bid's and an award's outputs.
pub const BID_SYSTEM: &str = "https://baton.dev/fhir/CodeSystem/bid";
/// One candidate owner of a bidding Task.
pub const CANDIDATE_EXTENSION: &str = "https://baton.dev/fhir/StructureDefinition/task-candidate";
/// Most bids one bidding Task takes, so that its award is one bounded transaction.
pub const MAX_BIDS: usize = 500;

fn has_code(task: &Value, code: &str) -> bool {
    task.pointer("/code/coding")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| {
            c.get("system").and_then(Value::as_str) == Some(WORKFLOW_TASK_SYSTEM)
                && c.get("code").and_then(Value::as_str) == Some(code)
        })
}

pub fn is_bidding(task: &Value) -> bool {
    has_code(task, BIDDING)
}

pub fn is_bid(task: &Value) -> bool {
    has_code(task, BID)
}

fn is_open(task: &Value) -> bool {
    !task_rules::is_terminal(task_rules::status(task).unwrap_or_default())
}

fn id_of(task: &Value) -> &str {
    task.get("id").and_then(Value::as_str).unwrap_or("?")
}

/// The output of `task` typed `code` of `BID_SYSTEM`.
fn output<'a>(task: &'a Value, code: &str) -> Option<&'a Value> {
    task.get("output")?.as_array()?.iter().find(|o| {
        o.pointer("/type/coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| {
                c.get("system").and_then(Value::as_str) == Some(BID_SYSTEM)
                    && c.get("code").and_then(Value::as_str) == Some(code)
            })
    })
}

/// Checks a bidding Task's own shape: a role queue for its candidates and no owner (422), a
/// `focus` on the coordination Task here (400). Returns the coordination Task's id.
pub fn parse_bidding(task: &Value, base_url: &str) -> Result<TaskId> {
    if task_rules::performer_types(task).is_empty() {
        return Err(Error::business_rule(
            "a bidding Task reaches its candidates through their role queue: give it a \
             performerType (and, to narrow it, candidate owners in the task-candidate extension)",
        )
        .at("Task.performerType"));
    }
    if task.get("owner").is_some() {
        return Err(Error::business_rule(
            "a bidding Task has no owner while candidates answer; the award gives the \
             coordination Task in its focus an owner",
        )
        .at("Task.owner"));
    }
    focal_task(task, base_url).ok_or_else(|| {
        Error::bad_request(
            IssueCode::Required,
            "Task.focus of a bidding Task must reference the coordination Task on this server \
             that the award gives an owner (Task/{id})",
        )
        .at("Task.focus")
    })
}

/// Checks the coordination Task a bidding Task is about: open and without an owner (422).
pub fn check_coordination(coordination: &Value) -> Result<()> {
    let id = id_of(coordination);
    if !is_open(coordination) {
        return Err(Error::business_rule(format!(
            "Task/{id} is finished, so there is no work left to award"
        ))
        .at("Task.focus"));
    }
    if coordination.get("owner").is_some() {
        return Err(Error::business_rule(format!(
            "Task/{id} already has an owner, so there is no work left to award"
        ))
        .at("Task.focus"));
    }
    Ok(())
}

/// The bidding Task a bid answers (its one `partOf`), after checking the bid's shape: a
/// `willing` output (400).
pub fn parse_bid(task: &Value, base_url: &str) -> Result<TaskId> {
    let parents = task.get("partOf").and_then(Value::as_array);
    let parent = match parents.map(Vec::as_slice) {
        Some([parent]) => parent
            .get("reference")
            .and_then(Value::as_str)
            .and_then(|r| normalize_reference(r, base_url))
            .and_then(|r| TaskId::parse(r.strip_prefix("Task/")?).ok()),
        _ => None,
    };
    let Some(parent) = parent else {
        return Err(Error::bad_request(
            IssueCode::Required,
            "a bid answers one bidding Task: Task.partOf must hold exactly one reference to it",
        )
        .at("Task.partOf"));
    };
    if output(task, "willing")
        .and_then(|o| o.get("valueBoolean"))
        .and_then(Value::as_bool)
        .is_none()
    {
        return Err(Error::bad_request(
            IssueCode::Required,
            format!(
                "a bid says whether its candidate is willing: an output typed {BID_SYSTEM}|willing \
                 with a valueBoolean"
            ),
        )
        .at("Task.output"));
    }
    Ok(parent)
}

/// Checks a new bid against its bidding Task and the bids it already has: the bidding Task
/// is one and still open (409 once closed: it was awarded meanwhile), the bid's owner is a
/// candidate (403), and has not bid already (409).
pub fn check_bid(bid: &Value, bidding: &Value, bids: &[Value], base_url: &str) -> Result<()> {
    let id = id_of(bidding);
    if !is_bidding(bidding) {
        return Err(Error::business_rule(format!(
            "Task/{id} is not a bidding Task, so it takes no bids"
        ))
        .at("Task.partOf"));
    }
    if !is_open(bidding) {
        return Err(Error::conflict(format!(
            "the bidding of Task/{id} is closed ({}); it takes no more bids",
            task_rules::status(bidding).unwrap_or_default()
        ))
        .at("Task.partOf"));
    }
    let owner = task_rules::owner(bid, base_url).unwrap_or_default();
    let candidates: Vec<String> = bidding
        .get("extension")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.get("url").and_then(Value::as_str) == Some(CANDIDATE_EXTENSION))
        .filter_map(|e| e.pointer("/valueReference/reference")?.as_str())
        .filter_map(|r| normalize_reference(r, base_url))
        .collect();
    if !candidates.is_empty() && !candidates.contains(&owner) {
        return Err(Error::forbidden(format!(
            "{owner} is not one of the candidates Task/{id} asked"
        ))
        .at("Task.owner"));
    }
    if bids
        .iter()
        .any(|b| is_bid(b) && task_rules::owner(b, base_url).as_deref() == Some(owner.as_str()))
    {
        return Err(Error::conflict(format!(
            "{owner} has already bid on Task/{id}; change that bid instead"
        ))
        .at("Task.partOf"));
    }
    if bids.len() >= MAX_BIDS {
        return Err(Error::conflict(format!(
            "Task/{id} has {MAX_BIDS} bids, as many as it takes"
        ))
        .at("Task.partOf"));
    }
    Ok(())
}

/// The bid an award chooses (`awarded` output), for a bidding Task being completed; a 400
/// when it names none.
pub fn awarded(bidding: &Value, base_url: &str) -> Result<TaskId> {
    output(bidding, "awarded")
        .and_then(|o| o.pointer("/valueReference/reference"))
        .and_then(Value::as_str)
        .and_then(|r| normalize_reference(r, base_url))
        .and_then(|r| TaskId::parse(r.strip_prefix("Task/")?).ok())
        .ok_or_else(|| {
            Error::bad_request(
                IssueCode::Required,
                format!(
                    "completing a bidding Task awards it: add an output typed \
                     {BID_SYSTEM}|awarded whose valueReference is the chosen bid (Task/{{id}})"
                ),
            )
            .at("Task.output")
        })
}

/// What closing a bidding changes: the coordination Task's new version, if awarded, and each
/// open bid's, by its index among the bids.
pub type Closing = (Option<Value>, Vec<(usize, Value)>);

/// What closing the bidding changes: the coordination Task (when awarded) and each open bid,
/// as `(index into bids, new version)`. `chosen` is the awarded bid's id, if any; it must be
/// an open, willing bid among `bids` (422 otherwise), and the coordination Task must still be
/// open and unowned (409: someone took it meanwhile).
pub fn close(
    chosen: Option<&TaskId>,
    coordination: Option<&Value>,
    bids: &[Value],
) -> Result<Closing> {
    let mut coordination_after = None;
    if let Some(chosen) = chosen {
        let bid = bids
            .iter()
            .find(|b| is_bid(b) && id_of(b) == chosen.as_str());
        let Some(bid) = bid.filter(|b| is_open(b)) else {
            return Err(Error::business_rule(format!(
                "Task/{chosen} is not an open bid on this bidding Task, so it cannot be awarded; \
                 award one of the candidates' bids"
            ))
            .at("Task.output"));
        };
        let willing = output(bid, "willing")
            .and_then(|o| o.get("valueBoolean"))
            .and_then(Value::as_bool);
        if willing != Some(true) {
            return Err(Error::business_rule(format!(
                "Task/{chosen} declined the work (willing is false), so it cannot be awarded"
            ))
            .at("Task.output"));
        }
        let Some(coordination) = coordination else {
            return Err(Error::conflict(
                "the coordination Task in this bidding Task's focus no longer exists",
            )
            .at("Task.focus"));
        };
        check_coordination(coordination).map_err(|e| {
            Error::conflict(
                e.as_client()
                    .map_or_else(String::new, |c| c.diagnostics.clone()),
            )
            .at("Task.focus")
        })?;
        let mut changed = coordination.clone();
        changed["owner"] = bid["owner"].clone();
        coordination_after = Some(changed);
    }
    let mut bids_after = Vec::new();
    for (i, bid) in bids.iter().enumerate() {
        if !is_bid(bid) || !is_open(bid) {
            continue;
        }
        let mut changed = bid.clone();
        if chosen.is_some_and(|c| c.as_str() == id_of(bid)) {
            changed["status"] = json!("accepted");
        } else {
            changed["status"] = json!("rejected");
            changed["statusReason"] = json!({ "text": if chosen.is_some() {
                "the work was awarded to another candidate"
            } else {
                "the bidding was closed without an award"
            } });
        }
        bids_after.push((i, changed));
    }
    Ok((coordination_after, bids_after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    const B: &str = "http://h/fhir";

    fn bidding() -> Value {
        json!({ "resourceType": "Task", "id": "bt", "status": "requested", "intent": "proposal",
                "code": { "coding": [{ "system": WORKFLOW_TASK_SYSTEM, "code": BIDDING }] },
                "performerType": [{ "coding": [{ "code": "surgeon" }] }],
                "focus": { "reference": "Task/c1" } })
    }

    fn bid(id: &str, owner: &str, willing: bool) -> Value {
        json!({ "resourceType": "Task", "id": id, "status": "requested", "intent": "proposal",
                "code": { "coding": [{ "system": WORKFLOW_TASK_SYSTEM, "code": BID }] },
                "partOf": [{ "reference": "Task/bt" }],
                "owner": { "reference": owner },
                "output": [{ "type": { "coding": [{ "system": BID_SYSTEM, "code": "willing" }] },
                             "valueBoolean": willing }] })
    }

    fn status(result: Result<impl std::fmt::Debug>) -> StatusCode {
        result.unwrap_err().as_client().unwrap().status
    }

    #[test]
    fn shapes_are_checked() {
        assert_eq!(parse_bidding(&bidding(), B).unwrap().as_str(), "c1");
        let mut owned = bidding();
        owned["owner"] = json!({ "reference": "Practitioner/x" });
        assert_eq!(
            status(parse_bidding(&owned, B)),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            parse_bid(&bid("b1", "Practitioner/a", true), B)
                .unwrap()
                .as_str(),
            "bt"
        );
        let mut silent = bid("b1", "Practitioner/a", true);
        silent.as_object_mut().unwrap().remove("output");
        assert_eq!(status(parse_bid(&silent, B)), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn bids_come_from_candidates_while_bidding_is_open() {
        let a = bid("b1", "Practitioner/a", true);
        check_bid(&a, &bidding(), &[], B).unwrap();
        assert_eq!(
            status(check_bid(&a, &bidding(), std::slice::from_ref(&a), B)),
            StatusCode::CONFLICT
        );
        let mut closed = bidding();
        closed["status"] = json!("completed");
        assert_eq!(status(check_bid(&a, &closed, &[], B)), StatusCode::CONFLICT);
        let mut listed = bidding();
        listed["extension"] = json!([{ "url": CANDIDATE_EXTENSION, "valueReference": { "reference": "Practitioner/b" } }]);
        assert_eq!(
            status(check_bid(&a, &listed, &[], B)),
            StatusCode::FORBIDDEN
        );
        check_bid(&bid("b2", "Practitioner/b", true), &listed, &[], B).unwrap();
    }

    #[test]
    fn an_award_gives_the_work_to_the_chosen_bid_and_tells_the_others() {
        let bids = [
            bid("b1", "Practitioner/a", true),
            bid("b2", "Practitioner/b", true),
            bid("b3", "Practitioner/c", false),
        ];
        let coordination =
            json!({ "resourceType": "Task", "id": "c1", "status": "requested", "intent": "plan" });
        let chosen = TaskId::parse("b2").unwrap();
        let (c, changed) = close(Some(&chosen), Some(&coordination), &bids).unwrap();
        assert_eq!(c.unwrap()["owner"]["reference"], "Practitioner/b");
        let statuses: Vec<(usize, &str)> = changed
            .iter()
            .map(|(i, t)| (*i, t["status"].as_str().unwrap()))
            .collect();
        assert_eq!(
            statuses,
            vec![(0, "rejected"), (1, "accepted"), (2, "rejected")]
        );
        // Not a bid here, a declined one, or work someone took meanwhile.
        let other = TaskId::parse("zz").unwrap();
        assert_eq!(
            status(close(Some(&other), Some(&coordination), &bids)),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        let declined = TaskId::parse("b3").unwrap();
        assert_eq!(
            status(close(Some(&declined), Some(&coordination), &bids)),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        let mut taken = coordination.clone();
        taken["owner"] = json!({ "reference": "Practitioner/z" });
        assert_eq!(
            status(close(Some(&chosen), Some(&taken), &bids)),
            StatusCode::CONFLICT
        );
        // Closed without an award: every open bid is told.
        let (c, changed) = close(None, None, &bids).unwrap();
        assert!(c.is_none());
        assert!(changed.iter().all(|(_, t)| t["status"] == "rejected"));
    }
}
