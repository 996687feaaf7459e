//! Search: `GET` and `POST _search`, paging, `_revinclude` of sub-tasks within the include
//! budget, and the Bundle they answer with. It is kept apart because it is the one handler that
//! answers with many Tasks, under the search admission and byte budgets.

use std::collections::HashSet;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use crate::api::fhir_json_bytes;
use crate::api::{AppState, BodyKind, Prefer, read_body};
use crate::auth::{self, Principal};
use crate::error::{Error, IssueCode, Result};
use crate::fhir;
use crate::fhir::ids::TaskId;
use crate::fhir::search::{
    self, Handling, Include, Predicate, RevInclude, SystemMatch, TokenValue, TotalMode, cursor,
};
use crate::store::{Counting, ListedTask, PageRequest};

/// How far `_total=estimate` counts (see `config::DefaultTotal`): below it the total is
/// exact; above it the total is left out. Counting a thousand index entries costs about as
/// much as reading a page, and a work list whose count passes a thousand is read as "many".
pub const ESTIMATE_LIMIT: u64 = 1000;

pub(super) async fn search_get(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let pairs = parse_pairs(query.as_deref().unwrap_or(""))?;
    run_search(&state, &principal, &headers, pairs).await
}

pub(super) async fn search_post(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response> {
    let bytes = read_body(&state, &headers, body, BodyKind::Form).await?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::bad_request(IssueCode::Structure, "the form body is not UTF-8"))?;
    let mut pairs = parse_pairs(query.as_deref().unwrap_or(""))?;
    pairs.extend(parse_pairs(text)?);
    run_search(&state, &principal, &headers, pairs).await
}

pub(super) fn parse_pairs(text: &str) -> Result<Vec<(String, String)>> {
    crate::api::query_pairs(Some(text))
}

pub(super) async fn run_search(
    state: &AppState,
    principal: &Principal,
    headers: &HeaderMap,
    pairs: Vec<(String, String)>,
) -> Result<Response> {
    let prefer = Prefer::from_headers(headers);
    let handling = if prefer.strict {
        Handling::Strict
    } else {
        Handling::Lenient
    };
    let query = search::parse_query(&pairs, &state.search_limits, &state.base_url, handling)?;
    // A malformed query is refused above without taking a slot; from here on the search
    // holds one until its Bundle is built.
    let _admitted = state.searches.enter().await?;
    let scope: Vec<Predicate> = auth::read_scope(principal).into_iter().collect();
    let mut predicates = query.predicates.clone();
    predicates.extend(scope.iter().cloned());
    let count = if query.summary_count { 0 } else { query.count };
    let counting = match query.total {
        _ if query.summary_count => Counting::All,
        TotalMode::None => Counting::Skip,
        TotalMode::Estimate => Counting::UpTo(ESTIMATE_LIMIT),
        TotalMode::Accurate => Counting::All,
    };
    let max_page_bytes = state.config.search.max_page_bytes;
    let page = state
        .store
        .search(PageRequest {
            predicates: &predicates,
            sort: &query.sort,
            count,
            offset: query.offset,
            after: query.after.as_deref(),
            counting,
            max_bytes: max_page_bytes,
        })
        .await?;
    // An estimate past its limit says only "more than ESTIMATE_LIMIT": no total is given.
    let total = page
        .total
        .filter(|total| counting != Counting::UpTo(ESTIMATE_LIMIT) || *total <= ESTIMATE_LIMIT);

    // Where the page stops short of what was asked, an `outcome` entry says why.
    let mut warnings = Vec::new();
    if page.truncated {
        warnings.push(format!(
            "this page holds {} of the {} Tasks asked for: it reached search.max_page_bytes \
             ({max_page_bytes} bytes); the next link continues after them",
            page.tasks.len(),
            query.count
        ));
    }
    let mut included = Vec::new();
    if let Some(revinclude) = query.revinclude.filter(|_| !page.tasks.is_empty()) {
        let budget = max_page_bytes.saturating_sub(page.bytes);
        let stop;
        (included, stop) = sub_tasks(state, &page.tasks, &scope, revinclude, budget).await?;
        if let Some(stop) = stop {
            warnings.push(stop.explain(state));
        }
    }
    let includes = !query.includes.is_empty() || !query.iterated_includes.is_empty();
    if includes && !page.tasks.is_empty() {
        let shown: HashSet<&str> = page
            .tasks
            .iter()
            .chain(&included)
            .map(|t| t.id.as_str())
            .collect();
        let budget = max_page_bytes.saturating_sub(page.bytes);
        let follow = Follow {
            first: &query.includes,
            iterated: &query.iterated_includes,
        };
        let (parents, stop) =
            included_tasks(state, &page.tasks, follow, &shown, &scope, budget).await?;
        included.extend(parents);
        if let Some(stop) = stop {
            warnings.push(stop.explain(state));
        }
    }
    // A subset is written here; a whole Task goes into the Bundle as it was stored.
    let mut entries: Vec<Entry> = Vec::with_capacity(page.tasks.len() + included.len());
    for task in &page.tasks {
        entries.push(match &query.subset {
            Some(subset) => Entry::Written(json!({
                "fullUrl": format!("{}/Task/{}", state.link_base, task.id),
                "resource": subset.apply(&task.resource()?),
                "search": { "mode": "match" },
            })),
            None => Entry::Task(task, "match"),
        });
    }
    entries.extend(included.iter().map(|task| Entry::Task(task, "include")));
    entries.extend(warnings.iter().map(|warning| {
        Entry::Written(json!({
            "resource": crate::error::operation_outcome(
                "warning",
                IssueCode::TooCostly,
                warning,
                None,
            ),
            "search": { "mode": "outcome" },
        }))
    }));

    let self_base = format!("{}/Task", state.link_base);
    let link_to = |paging: (&str, String)| {
        let mut params = query.link_params.clone();
        params.push(("_count".into(), query.count.to_string()));
        params.push((paging.0.into(), paging.1));
        format!(
            "{self_base}?{}",
            serde_urlencoded::to_string(&params).unwrap_or_default()
        )
    };
    let offset_url = |offset: usize| link_to(("_offset", offset.to_string()));
    let self_url = match &query.after {
        Some(values) => link_to(("_cursor", cursor::encode(&query.sort, values))),
        None => offset_url(query.offset),
    };
    let mut links = vec![link("self", &self_url)];
    if !query.summary_count {
        links.push(link("first", &offset_url(0)));
        // The next page starts after the last Task of this one (a keyset cursor), however
        // it was reached, so that Tasks written meanwhile neither shift nor repeat the rest.
        // A page the byte budget ended holds fewer Tasks than asked for and goes on too.
        let full = page.truncated || page.tasks.len() == query.count;
        let more = match total {
            Some(total) if query.after.is_none() => {
                query.offset + page.tasks.len() < total as usize
            }
            _ => full,
        };
        if full
            && more
            && let Some(values) = &page.last_sort_values
        {
            links.push(link(
                "next",
                &link_to(("_cursor", cursor::encode(&query.sort, values))),
            ));
        }
        // Offsets stay for clients that page by them; a cursor cannot go back.
        if query.offset > 0 {
            links.push(link(
                "previous",
                &offset_url(query.offset.saturating_sub(query.count)),
            ));
        }
        if let Some(total) = total
            && query.count > 0
            && query.after.is_none()
        {
            let total = total as usize;
            let last = if total == 0 {
                0
            } else {
                (total - 1) / query.count * query.count
            };
            links.push(link("last", &offset_url(last)));
        }
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": { "lastUpdated": now() },
        "type": "searchset",
        "link": links,
    });
    if let Some(total) = total {
        bundle["total"] = json!(total);
    }
    metrics::counter!("baton_task_searches_total").increment(1);
    Ok(fhir_json_bytes(
        StatusCode::OK,
        bundle_bytes(&bundle, &entries, &state.link_base),
    ))
}

/// An entry of a searchset Bundle.
enum Entry<'a> {
    /// A Task found (`match`) or included (`include`), as stored.
    Task(&'a ListedTask, &'static str),
    /// An entry written here: an OperationOutcome's, or a Task's subset (`_summary`,
    /// `_elements`).
    Written(Value),
}

/// The Bundle whose every member but `entry` is in `head`, with `entries` after them. A Task's
/// stored JSON goes into its entry as it was stored: parsing every Task of a page and writing
/// it again was most of a search's cost (BENCHMARKS.md, issue 16).
fn bundle_bytes(head: &Value, entries: &[Entry<'_>], base_url: &str) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(head).unwrap_or_default();
    if entries.is_empty() || bytes.pop() != Some(b'}') {
        return bytes;
    }
    let size: usize = entries
        .iter()
        .map(|entry| match entry {
            Entry::Task(task, _) => task.json.len() + base_url.len() + 80,
            Entry::Written(_) => 512,
        })
        .sum();
    bytes.reserve(size + 16);
    bytes.extend_from_slice(b",\"entry\":[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            bytes.push(b',');
        }
        match entry {
            Entry::Task(task, mode) => {
                bytes.extend_from_slice(b"{\"fullUrl\":");
                let full_url = format!("{base_url}/Task/{}", task.id);
                serde_json::to_writer(&mut bytes, &full_url).unwrap_or_default();
                bytes.extend_from_slice(b",\"resource\":");
                bytes.extend_from_slice(task.json.as_bytes());
                bytes.extend_from_slice(b",\"search\":{\"mode\":\"");
                bytes.extend_from_slice(mode.as_bytes());
                bytes.extend_from_slice(b"\"}}");
            }
            Entry::Written(value) => {
                serde_json::to_writer(&mut bytes, value).unwrap_or_default();
            }
        }
    }
    bytes.extend_from_slice(b"]}");
    bytes
}

/// Why the included sub-tasks of a page stop short of the whole tree below its matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IncludeStop {
    /// `search.max_included` Tasks were included (or, for `_include`, as many Tasks as one
    /// search may name).
    Count,
    /// The page's byte budget was spent.
    Bytes,
    /// `:iterate` went `search.max_include_depth` levels down (sub-tasks) or up (the Tasks
    /// included Tasks name).
    Depth,
}

impl IncludeStop {
    fn explain(self, state: &AppState) -> String {
        let search = &state.config.search;
        match self {
            IncludeStop::Count => format!(
                "included Tasks stop at search.max_included ({}); more may exist",
                search.max_included
            ),
            IncludeStop::Bytes => format!(
                "included Tasks stop where the page reached search.max_page_bytes ({} \
                 bytes); more may exist",
                search.max_page_bytes
            ),
            IncludeStop::Depth => format!(
                "included Tasks stop {} levels from the matches (search.max_include_depth); \
                 further ones, if any, are not included",
                search.max_include_depth
            ),
        }
    }
}

/// The includes of a search: those followed from the matches only, and those (`:iterate`)
/// followed from the matches and then from every Task included, level after level.
#[derive(Debug, Clone, Copy)]
struct Follow<'a> {
    first: &'a [Include],
    iterated: &'a [Include],
}

/// `_include=Task:part-of` / `Task:based-on`: the Tasks the matched ones name in those
/// elements (references to other resource types are not followed), read with the caller's
/// read scope, so an included Task obeys the read rule as a matched one does; those already
/// in the Bundle are not repeated. With `:iterate`, the Tasks those name in turn, and so on up
/// the chain, at most `search.max_include_depth` levels from the matches. At most
/// `search.max_included` Tasks in all and `max_bytes` of stored JSON; where any of these
/// bounds stops the walk short, the returned `IncludeStop` says which (a warning in the
/// Bundle), so a request that would amplify is answered in part, never without end.
async fn included_tasks(
    state: &AppState,
    matched: &[ListedTask],
    follow: Follow<'_>,
    shown: &HashSet<&str>,
    scope: &[Predicate],
    max_bytes: usize,
) -> Result<(Vec<ListedTask>, Option<IncludeStop>)> {
    let limit = state.config.search.max_included;
    let max_depth = if follow.iterated.is_empty() {
        1
    } else {
        state.config.search.max_include_depth
    };
    let mut seen: HashSet<String> = shown.iter().map(|id| id.to_string()).collect();
    let mut included: Vec<ListedTask> = Vec::new();
    let mut bytes_left = max_bytes;
    // The first level follows every include from the matches; later ones the iterated ones
    // from the Tasks the level before included.
    let mut following: Vec<Include> = follow.first.to_vec();
    following.extend(follow.iterated.iter().filter(|i| !follow.first.contains(i)));
    // Only the Tasks whose links are followed are parsed; the page itself stays as stored.
    let mut sources = matched
        .iter()
        .map(ListedTask::resource)
        .collect::<Result<Vec<_>>>()?;
    let mut depth = 0;
    loop {
        let mut stop = None;
        let mut targets: Vec<String> = Vec::new();
        let references = sources.iter().flat_map(|task| {
            following.iter().flat_map(move |include| {
                task[include.element()]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r["reference"].as_str())
            })
        });
        for reference in references {
            let Some(id) = fhir::normalize_reference(reference, &state.base_url)
                .and_then(|r| r.strip_prefix("Task/").map(str::to_string))
            else {
                continue;
            };
            if seen.contains(&id) || targets.contains(&id) {
                continue;
            }
            if included.len() + targets.len() == limit || targets.len() == search::MAX_SEARCH_VALUES
            {
                stop = Some(IncludeStop::Count);
                break;
            }
            targets.push(id);
        }
        if targets.is_empty() {
            return Ok((included, stop));
        }
        if depth == max_depth {
            return Ok((included, Some(IncludeStop::Depth)));
        }
        let mut predicates = vec![Predicate::Token {
            param: "_id",
            negated: false,
            any_of: targets
                .iter()
                .map(|id| TokenValue {
                    system: SystemMatch::Any,
                    code: Some(id.clone()),
                })
                .collect(),
        }];
        predicates.extend(scope.iter().cloned());
        let found = state
            .store
            .search(PageRequest {
                predicates: &predicates,
                sort: &[],
                count: targets.len(),
                offset: 0,
                after: None,
                counting: Counting::Skip,
                max_bytes: bytes_left,
            })
            .await?;
        depth += 1;
        bytes_left = bytes_left.saturating_sub(found.bytes);
        if found.truncated {
            stop = Some(IncludeStop::Bytes);
        }
        // A target the read rule hides is not looked for again.
        seen.extend(targets);
        if stop.is_some() || follow.iterated.is_empty() {
            included.extend(found.tasks);
            return Ok((included, stop));
        }
        sources = found
            .tasks
            .iter()
            .map(ListedTask::resource)
            .collect::<Result<Vec<_>>>()?;
        included.extend(found.tasks);
        following = follow.iterated.to_vec();
    }
}

/// Follows `partOf` downwards from the matched Tasks: one level, or (`:iterate`) down to
/// `search.max_include_depth` levels, bounded by `search.max_included` Tasks and by
/// `max_bytes` of them, and applying the caller's read scope at each level. Says where it
/// stopped short, if it did.
async fn sub_tasks(
    state: &AppState,
    matched: &[ListedTask],
    scope: &[Predicate],
    revinclude: RevInclude,
    max_bytes: usize,
) -> Result<(Vec<ListedTask>, Option<IncludeStop>)> {
    let limit = state.config.search.max_included;
    let max_depth = match revinclude {
        RevInclude::PartOf => 1,
        RevInclude::PartOfIterate => state.config.search.max_include_depth,
    };
    let mut seen: HashSet<TaskId> = matched.iter().map(|t| t.id.clone()).collect();
    let mut frontier: Vec<String> = matched.iter().map(|t| format!("Task/{}", t.id)).collect();
    let mut included = Vec::new();
    let mut bytes_left = max_bytes;
    let mut depth = 0;
    while !frontier.is_empty() {
        if depth == max_depth {
            let stop = (revinclude == RevInclude::PartOfIterate).then_some(IncludeStop::Depth);
            return Ok((included, stop));
        }
        let wanted = limit - included.len();
        let children = state
            .store
            .children_of(&frontier, scope, wanted, bytes_left)
            .await?;
        depth += 1;
        bytes_left = bytes_left.saturating_sub(children.bytes);
        let full = children.tasks.len() == wanted;
        frontier = Vec::new();
        for child in children.tasks {
            if seen.insert(child.id.clone()) {
                frontier.push(format!("Task/{}", child.id));
                included.push(child);
            }
        }
        if children.truncated {
            return Ok((included, Some(IncludeStop::Bytes)));
        }
        if full {
            return Ok((included, Some(IncludeStop::Count)));
        }
    }
    Ok((included, None))
}

pub(super) fn link(relation: &str, url: &str) -> Value {
    json!({ "relation": relation, "url": url })
}

pub(super) fn now() -> String {
    fhir::datetime::format_instant(time::OffsetDateTime::now_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::ids::{StoredInstant, Version};

    fn listed(id: &str, json: &str) -> ListedTask {
        ListedTask {
            id: TaskId::parse(id).unwrap(),
            version: Version::FIRST,
            last_updated: StoredInstant::parse("2026-12-06T10:00:00.000000Z").unwrap(),
            json: json.to_string(),
        }
    }

    /// The Bundle written as bytes, stored Tasks spliced in, reads back as the Bundle built
    /// as a value would: members in order, escapes kept, an outcome entry after the Tasks.
    #[test]
    fn the_bundle_written_as_bytes_is_the_bundle() {
        let head = json!({ "resourceType": "Bundle", "type": "searchset", "total": 2 });
        let a = r#"{"resourceType":"Task","id":"a","description":"\"quoted\" é \u0001"}"#;
        let b = r#"{"resourceType":"Task","id":"b"}"#;
        let (a, b) = (listed("a", a), listed("b", b));
        let outcome = json!({ "search": { "mode": "outcome" } });
        let entries = [
            Entry::Task(&a, "match"),
            Entry::Task(&b, "include"),
            Entry::Written(outcome.clone()),
        ];
        let bytes = bundle_bytes(&head, &entries, "http://baton.test/fhir");
        let read: Value = serde_json::from_slice(&bytes).unwrap();
        let expected = json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 2,
            "entry": [
                {
                    "fullUrl": "http://baton.test/fhir/Task/a",
                    "resource": a.resource().unwrap(),
                    "search": { "mode": "match" },
                },
                {
                    "fullUrl": "http://baton.test/fhir/Task/b",
                    "resource": b.resource().unwrap(),
                    "search": { "mode": "include" },
                },
                outcome,
            ],
        });
        assert_eq!(read, expected);
        let keys: Vec<&String> = read.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["resourceType", "type", "total", "entry"]);
        // No entries: no `entry` member at all.
        let bare: Value = serde_json::from_slice(&bundle_bytes(&head, &[], "x")).unwrap();
        assert_eq!(bare, head);
    }
}
