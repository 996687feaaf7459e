//! Predicates: the parsed criteria of a search or a subscription filter, and their evaluation
//! against a `TaskIndex` in memory (`matches`). They are kept apart because they are the
//! vocabulary both the query parser and the store's SQL translation speak.

use super::index::{TaskIndex, TokenEntry};

/// Which systems a token search value accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemMatch {
    /// `code`: any system, or none.
    Any,
    /// `|code`: only values without a system.
    NoSystem,
    /// `system|code` or `system|`: exactly this system.
    Exact(String),
}

/// One token search value. `code` is `None` for `system|`, which matches any code in the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenValue {
    pub system: SystemMatch,
    pub code: Option<String>,
}

/// A date search prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl Prefix {
    pub(super) fn parse(text: &str) -> Option<Prefix> {
        Some(match text {
            "eq" => Prefix::Eq,
            "ne" => Prefix::Ne,
            "gt" => Prefix::Gt,
            "lt" => Prefix::Lt,
            "ge" => Prefix::Ge,
            "le" => Prefix::Le,
            "sa" => Prefix::Sa,
            "eb" => Prefix::Eb,
            "ap" => Prefix::Ap,
            _ => return None,
        })
    }
}

/// One date search value: a prefix and the search range `[start, end)` as sortable keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DateComparison {
    pub prefix: Prefix,
    pub start: String,
    pub end: String,
}

impl DateComparison {
    /// Compares the resource range `[s, e)` with the search range `[a, b)`. The store's SQL
    /// (`store::search_sql`) spells out the same conditions on `start_at`/`end_at`:
    ///
    /// - `eq`: the search range contains the resource range: `s >= a && e <= b`.
    /// - `ne`: not `eq`.
    /// - `gt`: the resource range reaches past the end of the search range: `e > b`.
    /// - `lt`: the resource range begins before the search range: `s < a`.
    /// - `ge`: the resource range ends after the search range starts: `e > a`.
    /// - `le`: the resource range starts before the search range ends: `s < b`.
    /// - `sa`: the resource range starts after the search range: `s >= b`.
    /// - `eb`: the resource range ends before the search range: `e <= a`.
    /// - `ap`: the ranges overlap: `s < b && e > a`.
    ///
    /// The keys are fixed-width UTC strings, so comparing them as text compares the instants.
    pub fn matches(&self, start: &str, end: &str) -> bool {
        let (a, b) = (self.start.as_str(), self.end.as_str());
        match self.prefix {
            Prefix::Eq => start >= a && end <= b,
            Prefix::Ne => !(start >= a && end <= b),
            Prefix::Gt => end > b,
            Prefix::Lt => start < a,
            Prefix::Ge => end > a,
            Prefix::Le => start < b,
            Prefix::Sa => start >= b,
            Prefix::Eb => end <= a,
            Prefix::Ap => start < b && end > a,
        }
    }
}

/// A condition on a Task's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Predicate {
    /// Some value of `param` matches one of `any_of`; with `negated` (`:not`), none does, which
    /// includes the Task having no value at all.
    Token {
        param: &'static str,
        negated: bool,
        any_of: Vec<TokenValue>,
    },
    /// `:missing`: whether the Task has no value for `param`.
    Missing {
        param: &'static str,
        missing: bool,
    },
    /// Some value of `param` satisfies one of `any_of`. A Task without a value never matches.
    Date {
        param: &'static str,
        any_of: Vec<DateComparison>,
    },
    Or(Vec<Predicate>),
    And(Vec<Predicate>),
}

impl TokenValue {
    fn matches(&self, entry: &TokenEntry) -> bool {
        let system_ok = match &self.system {
            SystemMatch::Any => true,
            SystemMatch::NoSystem => entry.system.is_none(),
            SystemMatch::Exact(system) => entry.system.as_deref() == Some(system.as_str()),
        };
        system_ok && self.code.as_ref().is_none_or(|code| *code == entry.value)
    }
}

impl Predicate {
    /// How many values this predicate compares with, counted as its SQL binds them.
    pub(super) fn value_count(&self) -> usize {
        match self {
            Predicate::Token { any_of, .. } => any_of
                .iter()
                .map(|value| match (&value.system, &value.code) {
                    (SystemMatch::Exact(_), Some(_)) => 2,
                    _ => 1,
                })
                .sum(),
            Predicate::Date { any_of, .. } => any_of.len() * 2,
            Predicate::Missing { .. } => 1,
            Predicate::Or(all) | Predicate::And(all) => all.iter().map(Self::value_count).sum(),
        }
    }

    /// Evaluates this predicate against one Task's index.
    pub fn matches(&self, index: &TaskIndex) -> bool {
        match self {
            Predicate::Token {
                param,
                negated,
                any_of,
            } => {
                let found = index
                    .tokens
                    .iter()
                    .filter(|entry| entry.param == *param)
                    .any(|entry| any_of.iter().any(|value| value.matches(entry)));
                found != *negated
            }
            Predicate::Missing { param, missing } => {
                let present = index.tokens.iter().any(|entry| entry.param == *param)
                    || index.dates.iter().any(|entry| entry.param == *param);
                present != *missing
            }
            Predicate::Date { param, any_of } => index
                .dates
                .iter()
                .filter(|entry| entry.param == *param)
                .any(|entry| any_of.iter().any(|c| c.matches(&entry.start, &entry.end))),
            Predicate::Or(any) => any.iter().any(|p| p.matches(index)),
            Predicate::And(all) => all.iter().all(|p| p.matches(index)),
        }
    }
}

/// Whether a Task's index satisfies every predicate (they are ANDed; none means all Tasks).
pub fn matches(index: &TaskIndex, predicates: &[Predicate]) -> bool {
    predicates.iter().all(|p| p.matches(index))
}
