//! Links to other Tasks: sub-task parents (`partOf`) and the focal Task of a request, checked
//! against the stored Tasks before a write, and confirmed inside its decision. They are kept
//! apart because they are the one part of a write that reads other Tasks.

use std::collections::HashSet;

use serde_json::Value;

use crate::api::AppState;
use crate::auth::{self, Principal};
use crate::error::{Error, Result};
use crate::fhir::ids::TaskId;
use crate::fhir::workflow::{self, RequestKind, information};
use crate::fhir::{normalize_reference, task as task_rules};

/// What a linked Task is to the Task that links to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkRole {
    Parent,
    Focal(RequestKind),
    /// The coordination Task an information request asks about.
    Asks,
}

/// A Task on this server that a Task links to, and the element that links to it.
#[derive(Debug, Clone)]
pub(super) struct Link {
    task_id: TaskId,
    role: LinkRole,
    at: String,
}

/// Every link of a Task, refusing the ones Baton cannot check: a `partOf` that is not a
/// reference to a Task here (422), a malformed request (400, see `workflow::parse_request`),
/// or a Task linking to itself (422). `own_id` is the Task's id when it already has one.
pub(super) fn links(task: &Value, own_id: Option<&TaskId>, base_url: &str) -> Result<Vec<Link>> {
    let mut links = Vec::new();
    let parents = task.get("partOf").and_then(Value::as_array);
    for (i, parent) in parents.into_iter().flatten().enumerate() {
        let at = format!("Task.partOf[{i}]");
        let reference = parent.get("reference").and_then(Value::as_str);
        let local = reference
            .and_then(|r| normalize_reference(r, base_url))
            .and_then(|r| TaskId::parse(r.strip_prefix("Task/")?).ok());
        let Some(task_id) = local else {
            return Err(Error::business_rule(format!(
                "{at} must reference a Task on this server (Task/{{id}}), so that Baton can check \
                 that the parent exists and keep the sub-task tree searchable; it is {}",
                reference.map_or_else(|| "not a literal reference".into(), |r| format!("'{r}'"))
            ))
            .at(at));
        };
        links.push(Link {
            task_id,
            role: LinkRole::Parent,
            at,
        });
    }
    if let Some(request) = workflow::parse_request(task, base_url)? {
        links.push(Link {
            task_id: request.focal_id,
            role: LinkRole::Focal(request.kind),
            at: "Task.focus".into(),
        });
    }
    if let Some(task_id) = information::parse(task, base_url)? {
        links.push(Link {
            task_id,
            role: LinkRole::Asks,
            at: "Task.focus".into(),
        });
    }
    if let Some(link) = links.iter().find(|l| Some(&l.task_id) == own_id) {
        return Err(Error::business_rule(format!(
            "{} names this Task itself; a Task can be neither its own parent nor its own focus",
            link.at
        ))
        .at(link.at.clone()));
    }
    Ok(links)
}

/// The links `after` makes that `before` did not: the ones to check. A stored version whose
/// links Baton would no longer accept is read leniently, so it does not block later writes.
pub(super) fn new_links(
    before: Option<&Value>,
    after: &Value,
    own_id: Option<&TaskId>,
    base_url: &str,
) -> Result<Vec<Link>> {
    let old: Vec<Link> = before
        .and_then(|b| links(b, own_id, base_url).ok())
        .unwrap_or_default();
    Ok(links(after, own_id, base_url)?
        .into_iter()
        .filter(|new| {
            !old.iter()
                .any(|o| o.task_id == new.task_id && o.role == new.role)
        })
        .collect())
}

/// Checks new links against the stored Tasks: each linked Task exists and is not deleted
/// (404), and the caller may read it (403). A pending or completing request also needs a focal
/// Task it can act on and must be addressed to that Task's owner (422). A link to a Task in
/// `created` (one the same transaction creates) is taken as checked when it names a parent;
/// a request's focal Task must exist before the transaction, since what a request asks is
/// judged against the focal Task's state. Returns the ids checked, which the write's decision
/// compares with what it is about to store.
pub(super) async fn check_links(
    state: &AppState,
    principal: &Principal,
    links: &[Link],
    task: &Value,
    created: &HashSet<TaskId>,
) -> Result<HashSet<TaskId>> {
    let status = task_rules::status(task).unwrap_or_default();
    let asks_now = !task_rules::is_terminal(status) || status == "completed";
    let mut checked = HashSet::new();
    for link in links {
        let id = &link.task_id;
        if created.contains(id) {
            if let LinkRole::Focal(_) | LinkRole::Asks = link.role {
                return Err(Error::business_rule(format!(
                    "{} names a Task this transaction creates; a request's focal Task must \
                     exist before the request is made",
                    link.at
                ))
                .at(link.at.clone()));
            }
            checked.insert(id.clone());
            continue;
        }
        let linked = match state.store.read(id).await? {
            Some(linked) if !linked.deleted => linked,
            found => {
                let why = if found.is_some() {
                    "has been deleted"
                } else {
                    "does not exist"
                };
                return Err(
                    Error::not_found(format!("{} names Task/{id}, which {why}", link.at))
                        .at(link.at.clone()),
                );
            }
        };
        if !auth::may_read_task(principal, &linked.resource, &state.base_url) {
            return Err(Error::forbidden(format!(
                "{} names Task/{id}, which is not owned by you and not in one of your role queues",
                link.at
            ))
            .at(link.at.clone()));
        }
        if let LinkRole::Focal(kind) = link.role
            && asks_now
        {
            workflow::check_request(kind, &linked.resource)?;
            workflow::check_addressee(task, &linked.resource, &state.base_url)?;
            if kind == RequestKind::Change {
                // The change must apply to the focal Task as it is now (and, if the request
                // names a version, be made against it).
                workflow::apply_request(
                    kind,
                    &linked.resource,
                    linked.version,
                    task,
                    None,
                    &state.base_url,
                )?;
            }
        }
        if link.role == LinkRole::Asks && asks_now {
            information::check_against(task, &linked.resource, &state.base_url)?;
        }
        checked.insert(id.clone());
    }
    Ok(checked)
}

/// Inside the transaction: refuses a write whose new links were not checked beforehand, which
/// happens only when the Task changed between that check and this decision (409, retry).
pub(super) fn ensure_links_checked(
    before: Option<&Value>,
    after: &Value,
    checked: &HashSet<TaskId>,
    id: &TaskId,
    base_url: &str,
) -> Result<()> {
    let fresh = new_links(before, after, Some(id), base_url)?;
    match fresh.iter().find(|l| !checked.contains(&l.task_id)) {
        None => Ok(()),
        Some(link) => Err(Error::conflict(format!(
            "Task/{id} changed while this write was being checked, and {} now names Task/{} \
             anew; read it again and retry",
            link.at, link.task_id
        ))
        .at(link.at.clone())),
    }
}

/// Whether a JSON Patch may change what a Task links to: `partOf`, `focus`, or `code` (which
/// makes a Task a request), or the whole document.
pub(super) fn may_change_links(operations: &Value) -> bool {
    let mut paths = operations
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|op| ["path", "from"].map(|key| op.get(key).and_then(Value::as_str)))
        .flatten();
    paths.any(|path| {
        path.is_empty()
            || ["/partOf", "/focus", "/code"].iter().any(|element| {
                path.strip_prefix(element)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            })
    })
}
