//! Query parsing: a search's name/value pairs into predicates and result controls (`_sort`,
//! `_count`, `_total`, `_revinclude`, …), with the caps on criteria and values. It is kept apart
//! because it is where client text is read, and where every refusal of a search is phrased.

use super::predicate::{DateComparison, Predicate, Prefix, SystemMatch, TokenValue};
use super::{
    CONTROL_PARAMS, MAX_SEARCH_CRITERIA, MAX_SEARCH_VALUES, ParamDef, ParamType, TASK_PARAMS,
    parse_offset, task_param,
};
use crate::error::{Error, IssueCode, Result};
use crate::fhir::datetime::{self, DateKind};
use crate::fhir::subset::{self, Subset};
use crate::fhir::{is_valid_id, normalize_reference};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    pub param: &'static str,
    pub descending: bool,
}

/// What `Bundle.total` a search asks for (`_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotalMode {
    None,
    /// A count that stops at a limit: exact below it, left out above it.
    Estimate,
    Accurate,
}

/// `_revinclude=Task:part-of`: add the children of the matches; iterated, their descendants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevInclude {
    PartOf,
    PartOfIterate,
}

/// `_include=Task:part-of` or `Task:based-on`: add the Tasks the matches point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    /// `Task.partOf`.
    PartOf,
    /// `Task.basedOn`, where it names a Task.
    BasedOn,
}

impl Include {
    /// The element of Task the include follows.
    pub fn element(self) -> &'static str {
        match self {
            Include::PartOf => "partOf",
            Include::BasedOn => "basedOn",
        }
    }
}

/// A parsed Task search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchQuery {
    /// ANDed.
    pub predicates: Vec<Predicate>,
    pub count: usize,
    pub offset: usize,
    /// `_cursor`: the sort values of the Task this page starts after (see `cursor`).
    pub after: Option<Vec<Option<String>>>,
    pub sort: Vec<SortKey>,
    pub total: TotalMode,
    /// `_summary=count` or `_count=0`: only the total is wanted.
    pub summary_count: bool,
    /// `_summary=true|text|data` or `_elements`: the part of each matched Task to answer with.
    pub subset: Option<Subset>,
    pub revinclude: Option<RevInclude>,
    /// `_include`s, each once.
    pub includes: Vec<Include>,
    /// `_include:iterate`s, each once: followed from the matches and then from the Tasks they
    /// include, level after level (bounded by the search limits where they run).
    pub iterated_includes: Vec<Include>,
    /// The accepted parameters, for the bundle's self and next links. `_count`, `_offset` and
    /// `_cursor` are left out (the links set them), as are ignored parameters.
    pub link_params: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchLimits {
    pub default_count: usize,
    pub max_count: usize,
    /// The `_total` of a search that does not say (`search.default_total`).
    pub default_total: TotalMode,
}

/// `Prefer: handling=strict|lenient`: whether an unknown parameter is an error or ignored.
/// Lenient is what a search gets by default (the FHIR search page's recommendation); an
/// ignored parameter is left out of `link_params`, so the Bundle's `self` link shows what was
/// applied. Bad values and unsupported modifiers of known parameters are errors either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    Strict,
    Lenient,
}

pub(super) fn invalid(diagnostics: String) -> Error {
    Error::bad_request(IssueCode::Invalid, diagnostics)
}

/// 400 `too-costly`: a search larger than Baton evaluates.
fn too_costly(diagnostics: String) -> Error {
    Error::bad_request(IssueCode::TooCostly, diagnostics)
}

/// Parses the (already percent-decoded) query parameters of a Task search.
///
/// Errors in a known parameter are always a 400, whatever the handling: a client that asked
/// for a filter and got a silently broader result could act on the wrong Tasks.
pub fn parse_query(
    pairs: &[(String, String)],
    limits: &SearchLimits,
    base_url: &str,
    handling: Handling,
) -> Result<SearchQuery> {
    let mut query = SearchQuery {
        predicates: Vec::new(),
        count: limits.default_count.min(limits.max_count),
        offset: 0,
        after: None,
        sort: Vec::new(),
        total: limits.default_total,
        summary_count: false,
        subset: None,
        revinclude: None,
        includes: Vec::new(),
        iterated_includes: Vec::new(),
        link_params: Vec::new(),
    };
    let mut seen_once: Vec<&str> = Vec::new();
    let mut cursor = None;
    for (key, value) in pairs {
        if key == "_cursor" {
            if cursor.is_some() {
                return Err(invalid(
                    "The parameter '_cursor' may appear only once".into(),
                ));
            }
            cursor = Some(value.as_str());
            continue;
        }
        let (name, modifier) = match key.split_once(':') {
            Some((name, modifier)) => (name, Some(modifier)),
            None => (key.as_str(), None),
        };
        if CONTROL_PARAMS.contains(&name) {
            apply_control(
                &mut query,
                name,
                modifier,
                key,
                value,
                limits,
                &mut seen_once,
            )?;
        } else if let Some(def) = task_param(name) {
            if query.predicates.len() == MAX_SEARCH_CRITERIA {
                return Err(too_costly(format!(
                    "The search has more than {MAX_SEARCH_CRITERIA} criteria; the most one \
                     search may have is {MAX_SEARCH_CRITERIA} (values ORed in one parameter, \
                     'status=ready,requested', count as one criterion)"
                )));
            }
            query
                .predicates
                .push(parse_param(def, modifier, key, value, base_url)?);
            query.link_params.push((key.clone(), value.clone()));
        } else if handling == Handling::Strict {
            return Err(Error::not_supported(format!(
                "The search parameter '{key}' is not supported on Task. Supported parameters: {}; \
                 control parameters: {}. Without 'Prefer: handling=strict' unknown parameters are ignored.",
                TASK_PARAMS
                    .iter()
                    .map(|d| d.code)
                    .collect::<Vec<_>>()
                    .join(", "),
                CONTROL_PARAMS.join(", "),
            )));
        }
    }
    let values: usize = query.predicates.iter().map(Predicate::value_count).sum();
    if values > MAX_SEARCH_VALUES {
        return Err(too_costly(format!(
            "The search has {values} values (bare reference ids count once per possible type); \
             the most one search may have is {MAX_SEARCH_VALUES}"
        )));
    }
    match query.revinclude {
        Some(RevInclude::PartOf) => query
            .link_params
            .push(("_revinclude".into(), "Task:part-of".into())),
        Some(RevInclude::PartOfIterate) => query
            .link_params
            .push(("_revinclude:iterate".into(), "Task:part-of".into())),
        None => {}
    }
    if let Some(text) = cursor {
        if query.offset != 0 {
            return Err(invalid(
                "A search pages either by '_cursor' (the next links) or by '_offset', not both"
                    .into(),
            ));
        }
        query.after = Some(super::cursor::decode(text, &query.sort)?);
    }
    // A count-only answer is nothing but the total, so `_total=none` cannot switch it off.
    if query.summary_count {
        query.total = TotalMode::Accurate;
    }
    Ok(query)
}

fn apply_control<'k>(
    query: &mut SearchQuery,
    name: &'k str,
    modifier: Option<&str>,
    key: &str,
    value: &str,
    limits: &SearchLimits,
    seen_once: &mut Vec<&'k str>,
) -> Result<()> {
    let iterate = match (name, modifier) {
        (_, None) => false,
        ("_revinclude" | "_include", Some("iterate" | "recurse")) => true,
        (_, Some(_)) => {
            return Err(Error::not_supported(format!(
                "The parameter '{key}' is not supported: '{name}' takes no modifier"
            )));
        }
    };
    // `_revinclude` may be given more than once (plain and iterated); the others are single values
    // and two conflicting ones would leave the result ambiguous.
    if !matches!(name, "_revinclude" | "_include" | "_format" | "_pretty") {
        if seen_once.contains(&name) {
            return Err(invalid(format!(
                "The parameter '{name}' may appear only once"
            )));
        }
        seen_once.push(name);
    }
    let integer = |what: &str| {
        value.parse::<usize>().map_err(|_| {
            invalid(format!(
                "The value of '{name}' must be {what}, not '{value}'"
            ))
        })
    };
    match name {
        "_count" => {
            let count = integer("a non-negative integer")?;
            query.count = count.min(limits.max_count);
            if count == 0 {
                query.summary_count = true;
            }
        }
        "_offset" => query.offset = parse_offset(name, value)?,
        "_sort" => {
            query.sort = parse_sort(value)?;
            query.link_params.push((key.into(), value.into()));
        }
        "_total" => {
            query.total = match value {
                "none" => TotalMode::None,
                "estimate" => TotalMode::Estimate,
                "accurate" => TotalMode::Accurate,
                _ => {
                    return Err(invalid(format!(
                        "The value of '_total' must be none, estimate or accurate, not '{value}'"
                    )));
                }
            };
            query.link_params.push((key.into(), value.into()));
        }
        "_summary" => {
            if value == "count" {
                query.summary_count = true;
            } else if let Some(subset) = subset::parse_summary(value)? {
                if query.subset.is_some() {
                    return Err(subset::both_given());
                }
                query.subset = Some(subset);
            }
            query.link_params.push((key.into(), value.into()));
        }
        "_elements" => {
            if query.subset.is_some() {
                return Err(subset::both_given());
            }
            query.subset = Some(subset::parse_elements(value)?);
            query.link_params.push((key.into(), value.into()));
        }
        "_include" => {
            let include = match value {
                "Task:part-of" | "Task:part-of:Task" => Include::PartOf,
                "Task:based-on:Task" | "Task:based-on" => Include::BasedOn,
                _ => {
                    return Err(Error::not_supported(format!(
                        "'{key}={value}' is not supported; the includes are Task:part-of and \
                         Task:based-on (the Tasks they name)"
                    )));
                }
            };
            let includes = if iterate {
                &mut query.iterated_includes
            } else {
                &mut query.includes
            };
            if !includes.contains(&include) {
                includes.push(include);
                query.link_params.push((key.into(), value.into()));
            }
        }
        "_revinclude" => {
            let iterate = match value {
                "Task:part-of" => iterate,
                "Task:part-of:iterate" => true,
                _ => {
                    return Err(Error::not_supported(format!(
                        "'{key}={value}' is not supported; the only reverse include is Task:part-of"
                    )));
                }
            };
            // Iterating includes everything a single step does, so the stronger request wins.
            query.revinclude = Some(
                if iterate || query.revinclude == Some(RevInclude::PartOfIterate) {
                    RevInclude::PartOfIterate
                } else {
                    RevInclude::PartOf
                },
            );
        }
        // Baton only speaks FHIR JSON and its layout carries no meaning, so these change nothing.
        _ => {}
    }
    Ok(())
}

fn parse_sort(value: &str) -> Result<Vec<SortKey>> {
    value
        .split(',')
        .map(|item| {
            let (code, descending) = match item.strip_prefix('-') {
                Some(code) => (code, true),
                None => (item, false),
            };
            if code.is_empty() {
                return Err(invalid(format!("'_sort={value}' has an empty sort key")));
            }
            match task_param(code) {
                Some(def) if def.sortable => Ok(SortKey {
                    param: def.code,
                    descending,
                }),
                _ => Err(Error::not_supported(format!(
                    "Task searches cannot be sorted by '{code}'; sortable parameters: {}",
                    TASK_PARAMS
                        .iter()
                        .filter(|d| d.sortable)
                        .map(|d| d.code)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        })
        .collect()
}

fn parse_param(
    def: &'static ParamDef,
    modifier: Option<&str>,
    key: &str,
    value: &str,
    base_url: &str,
) -> Result<Predicate> {
    let code = def.code;
    let mut negated = false;
    let mut reference_type = None;
    match modifier {
        None => {}
        Some("missing") => {
            let missing = match value {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(invalid(format!(
                        "The value of '{key}' must be true or false, not '{value}'"
                    )));
                }
            };
            return Ok(Predicate::Missing {
                param: code,
                missing,
            });
        }
        Some("not") if def.kind != ParamType::Date => negated = true,
        Some(ty) if def.kind == ParamType::Reference && def.targets.contains(&ty) => {
            reference_type = Some(ty);
        }
        Some(other) => {
            let supported = match def.kind {
                ParamType::Date => ":missing",
                ParamType::Token => ":not, :missing",
                ParamType::Reference => ":not, :missing, :[type]",
            };
            return Err(Error::not_supported(format!(
                "The modifier ':{other}' is not supported on '{code}'; supported: {supported}"
            )));
        }
    }
    if value.is_empty() {
        return Err(invalid(format!("The parameter '{key}' has an empty value")));
    }
    let pieces = split_unescaped(value, ',');
    if pieces.iter().any(|p| p.is_empty()) {
        return Err(invalid(format!(
            "The parameter '{key}' has an empty value in '{value}'"
        )));
    }
    match def.kind {
        ParamType::Token => {
            let any_of = pieces
                .iter()
                .map(|piece| parse_token(piece, key))
                .collect::<Result<_>>()?;
            Ok(Predicate::Token {
                param: code,
                negated,
                any_of,
            })
        }
        ParamType::Reference => {
            let mut any_of = Vec::new();
            for piece in &pieces {
                for reference in parse_reference(def, reference_type, piece, key, base_url)? {
                    any_of.push(TokenValue {
                        system: SystemMatch::Any,
                        code: Some(reference),
                    });
                }
            }
            Ok(Predicate::Token {
                param: code,
                negated,
                any_of,
            })
        }
        ParamType::Date => {
            let any_of = pieces
                .iter()
                .map(|piece| parse_date(piece, key))
                .collect::<Result<_>>()?;
            Ok(Predicate::Date {
                param: code,
                any_of,
            })
        }
    }
}

fn parse_token(piece: &str, key: &str) -> Result<TokenValue> {
    let Some((system, code)) = split_once_unescaped(piece, '|') else {
        return Ok(TokenValue {
            system: SystemMatch::Any,
            code: Some(unescape(piece)),
        });
    };
    let (system, code) = (unescape(system), unescape(code));
    match (system.is_empty(), code.is_empty()) {
        (true, true) => Err(invalid(format!(
            "The parameter '{key}' has a value '{piece}' with neither system nor code"
        ))),
        (true, false) => Ok(TokenValue {
            system: SystemMatch::NoSystem,
            code: Some(code),
        }),
        (false, true) => Ok(TokenValue {
            system: SystemMatch::Exact(system),
            code: None,
        }),
        (false, false) => Ok(TokenValue {
            system: SystemMatch::Exact(system),
            code: Some(code),
        }),
    }
}

/// Turns one reference search value into the normalised references it stands for: `Type/id`
/// and local absolute URLs name one resource; a bare id names that id in every target type
/// (or in the type of a `:[type]` modifier).
fn parse_reference(
    def: &ParamDef,
    reference_type: Option<&str>,
    piece: &str,
    key: &str,
    base_url: &str,
) -> Result<Vec<String>> {
    let text = unescape(piece);
    if let Some(normalized) = normalize_reference(&text, base_url) {
        if let Some(ty) = reference_type
            && !normalized.starts_with(&format!("{ty}/"))
        {
            return Err(invalid(format!(
                "The parameter '{key}' asks for a {ty} but '{text}' is not one"
            )));
        }
        return Ok(vec![normalized]);
    }
    if is_valid_id(&text) {
        return Ok(match reference_type {
            Some(ty) => vec![format!("{ty}/{text}")],
            None => def
                .targets
                .iter()
                .map(|ty| format!("{ty}/{text}"))
                .collect(),
        });
    }
    Err(invalid(format!(
        "The parameter '{key}' has '{text}', which is neither a reference (Type/id or a URL) nor an id"
    )))
}

fn parse_date(piece: &str, key: &str) -> Result<DateComparison> {
    let text = unescape(piece);
    // Dates start with a digit, so a leading letter can only be a prefix.
    let (prefix, date_text) = if text.starts_with(|c: char| c.is_ascii_alphabetic()) {
        let prefix = text.get(..2).and_then(Prefix::parse).ok_or_else(|| {
            invalid(format!(
                "The parameter '{key}' has '{text}', which does not start with a date or one of \
                     the prefixes eq, ne, gt, lt, ge, le, sa, eb, ap"
            ))
        })?;
        (prefix, &text[2..])
    } else {
        (Prefix::Eq, text.as_str())
    };
    let range = datetime::parse_range(date_text, DateKind::SearchValue)
        .map_err(|e| invalid(format!("The parameter '{key}' has an invalid date: {e}")))?;
    Ok(DateComparison {
        prefix,
        start: range.start_key(),
        end: range.end_key(),
    })
}

/// Splits at every `sep` not escaped by a backslash; the pieces keep their escapes.
fn split_unescaped(text: &str, sep: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            pieces.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    pieces.push(&text[start..]);
    pieces
}

fn split_once_unescaped(text: &str, sep: char) -> Option<(&str, &str)> {
    let first = split_unescaped(text, sep)[0];
    (first.len() < text.len()).then(|| (first, &text[first.len() + sep.len_utf8()..]))
}

/// Removes the backslash of FHIR's search escapes (`\,`, `\|`, `\$`, `\\`); any other
/// backslash is an ordinary character.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(&next) = chars.peek()
            && matches!(next, ',' | '|' | '$' | '\\')
        {
            out.push(next);
            chars.next();
            continue;
        }
        out.push(c);
    }
    out
}
