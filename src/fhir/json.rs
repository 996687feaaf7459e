//! Reading client JSON strictly, and the string rule every FHIR resource obeys.
//!
//! `serde_json` keeps the last of two equal keys in an object, so `{"role": "auditor",
//! "role": "admin"}` silently means admin, and two parsers that disagree on which one wins
//! (a proxy, an audit log, this server) see different documents. [`parse`] builds the same
//! `serde_json::Value` (key order kept, as with `preserve_order`) but refuses a repeated key,
//! saying which one and where. Nesting is bounded by [`MAX_DEPTH`], below `serde_json`'s own
//! limit, so that whatever is accepted here can be read back by the store and by clients
//! after the server wraps it in a Bundle.
//!
//! [`control_character`] finds the characters FHIR strings may not hold.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};

/// The deepest nesting of arrays and objects a client document may have.
pub const MAX_DEPTH: usize = 100;

/// Writes `value` as JSON to `out`, as `serde_json` writes it: for documents written
/// straight to bytes on hot paths (notifications, AuditEvents) instead of built as a `Value`.
pub fn write_json(out: &mut Vec<u8>, value: &impl serde::Serialize) {
    // Writing plain strings, numbers and `Value`s into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// The value at a JSON Pointer such as `/requester/reference`, as `Value::pointer` finds it,
/// without its two allocations per step (`Value::pointer` undoes `~1` and `~0` escapes into a
/// new `String` for every token, even when there are none): the fixed paths read on every
/// Task write added up to ~5 % of the server's samples on transaction Bundles (BENCHMARKS.md,
/// issue 17, seventh sitting). A token with an escape is left to `Value::pointer`.
pub fn at<'a>(value: &'a Value, pointer: &str) -> Option<&'a Value> {
    if pointer.contains('~') {
        return value.pointer(pointer);
    }
    if pointer.is_empty() {
        return Some(value);
    }
    let mut target = value;
    for token in pointer.strip_prefix('/')?.split('/') {
        target = match target {
            Value::Object(map) => map.get(token)?,
            Value::Array(items) => items.get(array_index(token)?)?,
            _ => return None,
        };
    }
    Some(target)
}

/// An array index in a JSON Pointer as `Value::pointer` takes it: decimal digits without a
/// leading zero (and not `+`), or `0` itself.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
        return None;
    }
    token.parse().ok()
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// An object names the same key twice.
    DuplicateKey {
        key: String,
        /// Where the object is, e.g. `contained[0].meta`; empty for the top level.
        path: String,
        line: usize,
        column: usize,
    },
    /// Arrays and objects nest deeper than [`MAX_DEPTH`].
    TooDeep { line: usize, column: usize },
    /// Not JSON at all; the text is `serde_json`'s, with its position.
    Syntax(String),
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::DuplicateKey {
                key,
                path,
                line,
                column,
            } => {
                let place = if path.is_empty() {
                    "the top-level object".to_string()
                } else {
                    format!("the object at {path}")
                };
                write!(
                    f,
                    "the key '{key}' occurs twice in {place} (line {line}, column {column}); \
                     each key may occur only once"
                )
            }
            JsonError::TooDeep { line, column } => write!(
                f,
                "arrays and objects nest more than {MAX_DEPTH} levels deep (line {line}, \
                 column {column})"
            ),
            JsonError::Syntax(message) => f.write_str(message),
        }
    }
}

/// Parses a JSON document, refusing repeated keys and nesting deeper than [`MAX_DEPTH`].
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let mut state = State::default();
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = ValueSeed {
        state: &mut state,
        depth: 0,
    }
    .deserialize(&mut deserializer)
    .and_then(|value| deserializer.end().map(|()| value));
    parsed.map_err(|e| match state.refusal.take() {
        Some(Refusal::Duplicate { key, enclosing }) => JsonError::DuplicateKey {
            key,
            path: path_text(&enclosing),
            line: e.line(),
            column: e.column(),
        },
        Some(Refusal::TooDeep) => JsonError::TooDeep {
            line: e.line(),
            column: e.column(),
        },
        None => JsonError::Syntax(e.to_string()),
    })
}

/// The first character FHIR does not allow in a string — a control character other than
/// tab, carriage return and line feed — anywhere in `value`, keys included, with the path of
/// the element that holds it (`root.note[0].text`).
pub fn control_character(value: &Value, root: &str) -> Option<(String, char)> {
    let bad = |text: &str| {
        text.chars()
            .find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    };
    find_path(value, root, &|key, value| match key.and_then(bad) {
        Some(c) => Some(c),
        None => value.as_str().and_then(bad),
    })
}

/// Walks `value` depth first and returns the first finding of `check` (which sees each
/// object key, if any, and the value under it, the root included) with the path to it. The
/// path is only built for the finding, so the walk allocates nothing while all is well: it
/// runs on every write, inside the writer for patches.
pub fn find_path<T>(
    value: &Value,
    root: &str,
    check: &dyn Fn(Option<&str>, &Value) -> Option<T>,
) -> Option<(String, T)> {
    fn walk<T>(
        value: &Value,
        check: &dyn Fn(Option<&str>, &Value) -> Option<T>,
        path: &mut Vec<String>,
    ) -> Option<T> {
        match value {
            Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
                let found = check(None, item).or_else(|| walk(item, check, path))?;
                path.push(format!("[{i}]"));
                Some(found)
            }),
            Value::Object(map) => map.iter().find_map(|(key, item)| {
                let found = check(Some(key), item).or_else(|| walk(item, check, path))?;
                path.push(format!(".{key}"));
                Some(found)
            }),
            _ => None,
        }
    }
    let mut path = Vec::new();
    let found = check(None, value).or_else(|| walk(value, check, &mut path))?;
    path.push(root.to_string());
    path.reverse();
    Some((path.concat(), found))
}

/// What went wrong, kept aside because `serde_json` only carries a message string.
enum Refusal {
    /// `enclosing`: the keys and indexes that lead to the object, innermost first. Each array
    /// and object adds its own as the error passes back through it (`State::inside`), so that
    /// a document without a repeated key, the common case, is read without keeping its path
    /// (a copy of every key of a transaction Bundle, BENCHMARKS.md, issue 17).
    Duplicate {
        key: String,
        enclosing: Vec<Segment>,
    },
    TooDeep,
}

/// The refusal, once there is one.
#[derive(Default)]
struct State {
    refusal: Option<Refusal>,
}

enum Segment {
    Key(String),
    Index(usize),
}

impl State {
    /// Notes that a repeated key refused below lies inside `segment` of the value being read.
    fn inside(&mut self, segment: Segment) {
        if let Some(Refusal::Duplicate { enclosing, .. }) = &mut self.refusal {
            enclosing.push(segment);
        }
    }
}

/// The path the segments lead along, outermost first (`contained[0].meta`); empty for the
/// top level.
fn path_text(innermost_first: &[Segment]) -> String {
    let mut out = String::new();
    for segment in innermost_first.iter().rev() {
        match segment {
            Segment::Key(key) if out.is_empty() => out.push_str(key),
            Segment::Key(key) => {
                out.push('.');
                out.push_str(key);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

struct ValueSeed<'s> {
    state: &'s mut State,
    /// How many arrays and objects enclose this value.
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl ValueSeed<'_> {
    /// Entering an array or object: refuses one level too many.
    fn enter<E: de::Error>(&mut self) -> Result<usize, E> {
        if self.depth >= MAX_DEPTH {
            self.state.refusal = Some(Refusal::TooDeep);
            return Err(E::custom("nesting too deep"));
        }
        Ok(self.depth + 1)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text has no NaN or infinity, so this always holds a number.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.enter()?;
        let mut items = Vec::new();
        loop {
            let item = seq.next_element_seed(ValueSeed {
                state: &mut *self.state,
                depth,
            });
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    self.state.inside(Segment::Index(items.len()));
                    return Err(e);
                }
            };
            match item {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut access: A) -> Result<Value, A::Error> {
        let depth = self.enter()?;
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            let slot = match map.entry(key) {
                Entry::Vacant(slot) => slot,
                Entry::Occupied(taken) => {
                    self.state.refusal = Some(Refusal::Duplicate {
                        key: taken.key().clone(),
                        enclosing: Vec::new(),
                    });
                    return Err(de::Error::custom("duplicate key"));
                }
            };
            let value = access.next_value_seed(ValueSeed {
                state: &mut *self.state,
                depth,
            });
            match value {
                Ok(value) => {
                    slot.insert(value);
                }
                Err(e) => {
                    self.state.inside(Segment::Key(slot.key().clone()));
                    return Err(e);
                }
            }
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `at` finds what `Value::pointer` finds, for every path into a document: objects,
    /// arrays, missing keys, indexes it refuses (a leading zero, a sign, past the end) and
    /// escaped tokens.
    #[test]
    fn at_finds_what_value_pointer_finds() {
        let document = serde_json::json!({
            "requester": { "reference": "Practitioner/1" },
            "input": [{ "valueReference": { "reference": "Task/2" } }, 7],
            "a/b": { "m~n": 1 },
            "": { "": 2 },
        });
        let pointers = [
            "",
            "/",
            "/requester",
            "/requester/reference",
            "/requester/reference/x",
            "/requester/missing",
            "/input/0/valueReference/reference",
            "/input/1",
            "/input/2",
            "/input/01",
            "/input/+1",
            "/input/-1",
            "/input/x",
            "/a~1b/m~0n",
            "/a~1b",
            "/a/b",
            "//",
            "requester",
        ];
        for pointer in pointers {
            assert_eq!(
                at(&document, pointer),
                document.pointer(pointer),
                "{pointer}"
            );
        }
    }
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn documents_parse_as_serde_json_reads_them() {
        let texts = [
            r#"{"resourceType":"Task","b":1,"a":[1,2.5,-3,true,null,"x"],"c":{"d":{}}}"#,
            r#"[]"#,
            r#""just a string""#,
            r#"  {"z":1,"y":2}  "#,
            r#"{"big":18446744073709551615,"neg":-9223372036854775808,"e":1e300}"#,
            r#"{"escaped":"\u00e9\n\"q\""}"#,
        ];
        for text in texts {
            let ours = parse(text.as_bytes()).unwrap();
            let theirs: Value = serde_json::from_str(text).unwrap();
            assert_eq!(ours, theirs, "{text}");
            // Key order is the document's, as with preserve_order.
            assert_eq!(ours.to_string(), theirs.to_string(), "{text}");
        }
    }

    #[test]
    fn repeated_keys_are_refused_with_their_place() {
        let cases = [
            (r#"{"role":"auditor","role":"admin"}"#, "role", ""),
            (
                r#"{"contained":[{"meta":{"versionId":"1","versionId":"2"}}]}"#,
                "versionId",
                "contained[0].meta",
            ),
            (r#"[{"a":1},{"b":{"c":1,"c":1}}]"#, "c", "[1].b"),
            (r#"{"a":{"x":1},"a":{"x":1}}"#, "a", ""),
            (
                r#"{"a":[{"b":[1,{"c":{"d":1,"d":2}}]}],"e":1}"#,
                "d",
                "a[0].b[1].c",
            ),
        ];
        for (text, key, path) in cases {
            match parse(text.as_bytes()) {
                Err(JsonError::DuplicateKey {
                    key: k, path: p, ..
                }) => {
                    assert_eq!((k.as_str(), p.as_str()), (key, path), "{text}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        let message = parse(br#"{"a":1,"a":2}"#).unwrap_err().to_string();
        assert!(
            message.contains("'a' occurs twice in the top-level object (line 1, column"),
            "{message}"
        );
        // Equal keys in different objects are fine.
        parse(br#"{"a":{"a":1},"b":[{"a":1},{"a":2}]}"#).unwrap();
    }

    #[test]
    fn nesting_is_bounded() {
        let nest = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        parse(nest(MAX_DEPTH).as_bytes()).unwrap();
        assert!(matches!(
            parse(nest(MAX_DEPTH + 1).as_bytes()),
            Err(JsonError::TooDeep { .. })
        ));
        // Far past serde_json's own limit, still a refusal rather than a stack overflow.
        let deep = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
        assert!(matches!(
            parse(deep.as_bytes()),
            Err(JsonError::TooDeep { .. })
        ));
    }

    #[test]
    fn malformed_documents_are_syntax_errors() {
        for text in [
            "",
            "{",
            r#"{"a":1,}"#,
            "[1] [2]",
            r#"{"a":"\ud800"}"#,
            "nul",
        ] {
            assert!(
                matches!(parse(text.as_bytes()), Err(JsonError::Syntax(_))),
                "{text}"
            );
        }
    }

    #[test]
    fn control_characters_are_found_with_their_element() {
        let cases = [
            (json!({"a": "fine\ttab\r\nlines"}), None),
            (json!({"a": "nul\u{0}"}), Some(("R.a", '\u{0}'))),
            (
                json!({"a": [1, {"b": "bell\u{7}"}]}),
                Some(("R.a[1].b", '\u{7}')),
            ),
            (json!({"k\u{1b}": 1}), Some(("R.k\u{1b}", '\u{1b}'))),
            (json!({"a": "del\u{7f}"}), Some(("R.a", '\u{7f}'))),
            (json!({"a": "c1\u{85}"}), Some(("R.a", '\u{85}'))),
            (json!({"a": "ünïcödé ✓"}), None),
        ];
        for (value, expected) in cases {
            let found = control_character(&value, "R");
            assert_eq!(
                found.as_ref().map(|(p, c)| (p.as_str(), *c)),
                expected,
                "{value}"
            );
        }
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_document_without_repeats_reads_as_serde_json_reads_it(value in any_json()) {
            let text = serde_json::to_string(&value).unwrap();
            let theirs: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(parse(text.as_bytes()).unwrap(), theirs);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes);
        }
    }
}
