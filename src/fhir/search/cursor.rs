//! Keyset cursors: where the next page of a search starts, carried in its `next` link as
//! `_cursor`. A cursor holds the sort values of the last Task of a page (one per term of the
//! store's order, which ends in `_lastUpdated` and id, so it names one position exactly) and
//! the `_sort` it was made for. The next page is "the matches after that position", so a Task
//! created or changed while a client pages moves in or out of the pages still to come but
//! never shifts the others: no Task that stays put is skipped or repeated, which `_offset`
//! cannot promise, and page 500 is found by an index seek like page 1.
//!
//! The cursor is opaque to clients (URL-safe base64 of a small JSON document) but not secret:
//! its values are bound as SQL parameters and only say where to start, so an altered cursor
//! can at most start a search elsewhere among the Tasks the client may read anyway. A cursor
//! that does not decode, or was made for another `_sort`, is refused with a 400.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::SortKey;
use super::query::invalid;
use crate::error::Result;

/// The `_sort` a cursor belongs to, as the client wrote it (`-priority,due-date`).
fn sort_text(sort: &[SortKey]) -> String {
    sort.iter()
        .map(|key| {
            if key.descending {
                format!("-{}", key.param)
            } else {
                key.param.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The cursor of the position after the Task with these sort values.
pub fn encode(sort: &[SortKey], values: &[Option<String>]) -> String {
    let document = json!({ "sort": sort_text(sort), "after": values });
    URL_SAFE_NO_PAD.encode(document.to_string())
}

/// The sort values a cursor holds, if it was made for this `_sort`. How many values and of
/// what kind the store checks against its order (`store::search_sql::page_sql`).
pub fn decode(text: &str, sort: &[SortKey]) -> Result<Vec<Option<String>>> {
    let malformed = || {
        invalid(format!(
            "The value of '_cursor' is not a cursor Baton made ('{}'); follow the 'next' link \
             of a page as it is, or start again without '_cursor'",
            text.chars().take(80).collect::<String>()
        ))
    };
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| malformed())?;
    let document: Value = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    if document.get("sort").and_then(Value::as_str) != Some(sort_text(sort).as_str()) {
        return Err(invalid(
            "The '_cursor' was made for another '_sort'; a search keeps its '_sort' from page \
             to page"
                .into(),
        ));
    }
    let values = document
        .get("after")
        .and_then(Value::as_array)
        .filter(|values| !values.is_empty())
        .ok_or_else(malformed)?;
    values
        .iter()
        .map(|value| match value {
            Value::Null => Ok(None),
            Value::String(text) => Ok(Some(text.clone())),
            _ => Err(malformed()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BY_PRIORITY: &[SortKey] = &[SortKey {
        param: "priority",
        descending: true,
    }];

    #[test]
    fn a_cursor_gives_back_its_values_for_its_own_sort_only() {
        let values = vec![Some("3".to_string()), None, Some("abc\"/é".to_string())];
        let cursor = encode(BY_PRIORITY, &values);
        assert!(
            cursor
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(decode(&cursor, BY_PRIORITY).unwrap(), values);
        let other = decode(&cursor, &[]).unwrap_err();
        assert!(other.to_string().contains("another '_sort'"), "{other}");
    }

    #[test]
    fn malformed_cursors_are_refused() {
        let not_json = URL_SAFE_NO_PAD.encode("nope");
        let wrong_shape = URL_SAFE_NO_PAD.encode(r#"{"sort":"-priority","after":[3]}"#);
        let empty = URL_SAFE_NO_PAD.encode(r#"{"sort":"-priority","after":[]}"#);
        for text in [
            "",
            "%%%",
            "a b",
            not_json.as_str(),
            wrong_shape.as_str(),
            empty.as_str(),
        ] {
            let error = decode(text, BY_PRIORITY).unwrap_err();
            assert_eq!(
                error.status(),
                axum::http::StatusCode::BAD_REQUEST,
                "{text}"
            );
        }
    }
}
