//! Bidding Tasks: the placer solicits offers from potential fulfillers before it gives the
//! work to one of them.
//!
//! - The **bidding Task** (`code` `bidding` of `WORKFLOW_TASK_SYSTEM`) has no owner and a
//!   `performerType`: it waits in that role queue, where every candidate sees it. Its
//!   `requester` is the placer. Its `focus`, if any, is the coordination Task to award, open
//!   and without an owner; without one the award creates it (`new_coordination`). Candidate
//!   owners may be narrowed further with `CANDIDATE_EXTENSION` (one `valueReference` each).
//! - A **bid** (`code` `bid`) is a Task `partOf` the bidding Task, owned by the candidate,
//!   whose `requester` is the bidding Task's (`settle_placer`), so only the candidate, the
//!   placer (read-only, `auth::may_read_task`) and the placer's systems (admins, auditors)
//!   ever read it. Its `output` says whether the candidate is willing (`willing`,
//!   `valueBoolean`, required) and how: `earliest-start` (`valueDateTime`), `cost`
//!   (`valueMoney`), `conditions` (`valueString`), typed with `BID_SYSTEM`. One bid per
//!   candidate; none once the bidding is closed (409).
//! - The **award**: the placer completes the bidding Task with an `output` `awarded`
//!   (`valueReference` to the chosen bid). In the same transaction the coordination Task gets
//!   the chosen candidate as `owner` (or is created with it, and named in the bidding Task's
//!   `output` `coordination`), the chosen bid becomes `accepted` and every other open bid
//!   `rejected` (so each candidate hears it). Cancelling or rejecting the bidding Task closes
//!   it without an award: the open bids become `rejected`.

use serde_json::{Value, json};

use crate::error::{Error, IssueCode, Result};
use crate::fhir::ids::TaskId;
use crate::fhir::json;
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
    json::at(task, "/code/coding")
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
        json::at(o, "/type/coding")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|c| {
                c.get("system").and_then(Value::as_str) == Some(BID_SYSTEM)
                    && c.get("code").and_then(Value::as_str) == Some(code)
            })
    })
}

/// Checks a bidding Task's own shape: a role queue for its candidates and no owner (422), and
/// a `focus`, when it has one, on the coordination Task here (400). Returns the coordination
/// Task's id; `None` when the bidding Task has no `focus`, so that the award creates the
/// coordination Task (`new_coordination`).
pub fn parse_bidding(task: &Value, base_url: &str) -> Result<Option<TaskId>> {
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
    if task.get("focus").is_none() {
        return Ok(None);
    }
    focal_task(task, base_url).map(Some).ok_or_else(|| {
        Error::bad_request(
            IssueCode::Value,
            "Task.focus of a bidding Task must reference the coordination Task on this server \
             that the award gives an owner (Task/{id}); leave it out and the award creates one",
        )
        .at("Task.focus.reference")
    })
}

/// The elements a coordination Task created by an award copies from its bidding Task: what
/// was asked (`basedOn`, `groupIdentifier`, `for`, `encounter`, `requester`, `description`,
/// `priority`, `restriction`, `reasonCode`, `reasonReference`, `insurance`, `note`) and for
/// which role queue (`performerType`). Not the bidding Task's own `code`, `intent`, `input`,
/// `output` or candidate extensions, which are about the bidding.
pub const COPIED_TO_COORDINATION: &[&str] = &[
    "basedOn",
    "groupIdentifier",
    "for",
    "encounter",
    "requester",
    "description",
    "priority",
    "restriction",
    "reasonCode",
    "reasonReference",
    "insurance",
    "note",
    "performerType",
];

/// The coordination Task an award creates when its bidding Task named none: `status`
/// `requested`, `intent` `order`, `owner` the chosen bid's owner, `authoredOn` the award's
/// `now`, and the request elements of `COPIED_TO_COORDINATION`. The store gives it its id.
pub fn new_coordination(bidding: &Value, bid: &Value, now: &str) -> Value {
    let mut task = json!({
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "authoredOn": now,
    });
    for element in COPIED_TO_COORDINATION {
        if let Some(value) = bidding.get(*element) {
            task[*element] = value.clone();
        }
    }
    task["owner"] = bid["owner"].clone();
    task
}

/// The output an award adds to its bidding Task when it created the coordination Task: typed
/// `coordination` of `BID_SYSTEM`, a `valueReference` to it.
pub fn coordination_output(id: &TaskId) -> Value {
    json!({ "type": { "coding": [{ "system": BID_SYSTEM, "code": "coordination" }] },
            "valueReference": { "reference": format!("Task/{id}") } })
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
        .filter_map(|e| json::at(e, "/valueReference/reference")?.as_str())
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

/// Gives a new bid its placer: the bidding Task's `requester`, copied when the bid names none,
/// and a 422 when it names another (or names one the bidding Task does not have). The read rule
/// lets that practitioner read the bid (`workflow::asked_by`), and `elements` keeps both
/// `requester`s from changing afterwards, so "the placer of a bidding Task reads its bids"
/// holds from the bid alone — in reads, searches and at send time alike. True when it
/// amended the bid.
pub fn settle_placer(bid: &mut Value, bidding: &Value, base_url: &str) -> Result<bool> {
    let normal = |task: &Value| {
        json::at(task, "/requester/reference")
            .and_then(Value::as_str)
            .and_then(|r| normalize_reference(r, base_url))
    };
    let placer = normal(bidding);
    let id = id_of(bidding);
    let problem = match (bid.get("requester").is_some(), placer) {
        (false, None) => return Ok(false),
        (false, Some(_)) => {
            bid["requester"] = bidding["requester"].clone();
            return Ok(true);
        }
        (true, Some(placer)) if normal(bid).as_deref() == Some(placer.as_str()) => {
            return Ok(false);
        }
        (true, Some(placer)) => format!(
            "a bid answers the placer of its bidding Task: Task.requester must be {placer}, the \
             requester of Task/{id} (leave it out and it is copied)"
        ),
        (true, None) => format!(
            "Task/{id} names no requester, so its bids name none either: leave out Task.requester"
        ),
    };
    Err(Error::business_rule(problem).at("Task.requester"))
}

/// The bid an award chooses (`awarded` output), for a bidding Task being completed; a 400
/// when it names none.
pub fn awarded(bidding: &Value, base_url: &str) -> Result<TaskId> {
    output(bidding, "awarded")
        .and_then(|o| json::at(o, "/valueReference/reference"))
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

/// What closing a bidding changes: the coordination Task, if awarded, and each open bid's new
/// version, by its index among the bids.
#[derive(Debug)]
pub struct Closing {
    /// The coordination Task as the award leaves it: the existing one with its new owner, or
    /// (when the bidding Task names none) a new one to create (`new_coordination`).
    pub coordination: Option<Coordination>,
    pub bids: Vec<(usize, Value)>,
}

/// The coordination Task an award writes.
#[derive(Debug)]
pub enum Coordination {
    Updated(Value),
    Created(Value),
}

/// The coordination Task a closing bidding Task is about: the current version of the one its
/// `focus` names (`None` if it no longer exists), or none named at all.
#[derive(Debug, Clone, Copy)]
pub enum Focus<'a> {
    Named(Option<&'a Value>),
    None,
}

/// What closing the bidding changes: the coordination Task (when awarded) and each open bid,
/// as `(index into bids, new version)`. `chosen` is the awarded bid's id, if any; it must be
/// an open, willing bid among `bids` (422 otherwise), and a named coordination Task must still
/// be there, open and unowned (409: someone took it meanwhile); without one, the award creates
/// it from `bidding` at `now`.
pub fn close(
    chosen: Option<&TaskId>,
    bidding: &Value,
    focus: Focus<'_>,
    bids: &[Value],
    now: &str,
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
        coordination_after = Some(match focus {
            Focus::None => Coordination::Created(new_coordination(bidding, bid, now)),
            Focus::Named(None) => {
                return Err(Error::conflict(
                    "the coordination Task in this bidding Task's focus no longer exists",
                )
                .at("Task.focus"));
            }
            Focus::Named(Some(coordination)) => {
                check_coordination(coordination).map_err(|e| {
                    Error::conflict(
                        e.as_client()
                            .map_or_else(String::new, |c| c.diagnostics.clone()),
                    )
                    .at("Task.focus")
                })?;
                let mut changed = coordination.clone();
                changed["owner"] = bid["owner"].clone();
                Coordination::Updated(changed)
            }
        });
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
    Ok(Closing {
        coordination: coordination_after,
        bids: bids_after,
    })
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
        assert_eq!(
            parse_bidding(&bidding(), B).unwrap().unwrap().as_str(),
            "c1"
        );
        let mut unfocused = bidding();
        unfocused.as_object_mut().unwrap().remove("focus");
        assert_eq!(parse_bidding(&unfocused, B).unwrap(), None);
        unfocused["focus"] = json!({ "reference": "ServiceRequest/1" });
        assert_eq!(
            status(parse_bidding(&unfocused, B)),
            StatusCode::BAD_REQUEST
        );
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
        let named = Focus::Named(Some(&coordination));
        let now = "2026-12-07T06:00:00Z";
        let chosen = TaskId::parse("b2").unwrap();
        let closing = close(Some(&chosen), &bidding(), named, &bids, now).unwrap();
        let Some(Coordination::Updated(c)) = closing.coordination else {
            panic!("{closing:?}")
        };
        assert_eq!(c["owner"]["reference"], "Practitioner/b");
        let statuses: Vec<(usize, &str)> = closing
            .bids
            .iter()
            .map(|(i, t)| (*i, t["status"].as_str().unwrap()))
            .collect();
        assert_eq!(
            statuses,
            vec![(0, "rejected"), (1, "accepted"), (2, "rejected")]
        );
        // Not a bid here, a declined one, or work someone took meanwhile, or that is gone.
        let other = TaskId::parse("zz").unwrap();
        assert_eq!(
            status(close(Some(&other), &bidding(), named, &bids, now)),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        let declined = TaskId::parse("b3").unwrap();
        assert_eq!(
            status(close(Some(&declined), &bidding(), named, &bids, now)),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        let mut taken = coordination.clone();
        taken["owner"] = json!({ "reference": "Practitioner/z" });
        assert_eq!(
            status(close(
                Some(&chosen),
                &bidding(),
                Focus::Named(Some(&taken)),
                &bids,
                now
            )),
            StatusCode::CONFLICT
        );
        assert_eq!(
            status(close(
                Some(&chosen),
                &bidding(),
                Focus::Named(None),
                &bids,
                now
            )),
            StatusCode::CONFLICT
        );
        // Closed without an award: every open bid is told.
        let closing = close(None, &bidding(), Focus::None, &bids, now).unwrap();
        assert!(closing.coordination.is_none());
        assert!(closing.bids.iter().all(|(_, t)| t["status"] == "rejected"));
    }

    #[test]
    fn an_award_without_a_coordination_task_creates_one_from_the_bidding_task() {
        let mut placed = bidding();
        placed.as_object_mut().unwrap().remove("focus");
        placed["requester"] = json!({ "reference": "Practitioner/placer" });
        placed["for"] = json!({ "reference": "Patient/p" });
        placed["basedOn"] = json!([{ "reference": "ServiceRequest/s" }]);
        placed["priority"] = json!("urgent");
        placed["description"] = json!("hip replacement");
        placed["input"] = json!([{ "type": { "text": "x" }, "valueString": "y" }]);
        let bids = [bid("b1", "Practitioner/a", true)];
        let chosen = TaskId::parse("b1").unwrap();
        let closing = close(Some(&chosen), &placed, Focus::None, &bids, "2026-12-07").unwrap();
        let Some(Coordination::Created(c)) = closing.coordination else {
            panic!("{closing:?}")
        };
        assert_eq!(
            c,
            json!({ "resourceType": "Task", "status": "requested", "intent": "order",
                    "authoredOn": "2026-12-07",
                    "owner": { "reference": "Practitioner/a" },
                    "requester": { "reference": "Practitioner/placer" },
                    "for": { "reference": "Patient/p" },
                    "basedOn": [{ "reference": "ServiceRequest/s" }],
                    "priority": "urgent", "description": "hip replacement",
                    "performerType": placed["performerType"] })
        );
        task_rules::validate_task(&c, B).unwrap();
    }
}
