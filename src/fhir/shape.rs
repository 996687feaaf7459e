//! How large and how deep a JSON document is, measured without recursion and with an early
//! exit, so that the answer costs no more than the limit it is checked against.
//!
//! Baton only stores what it can read back: serde_json refuses to parse JSON nested more than
//! 127 levels deep, and a stored Task it could not parse would fail every read of it and stall
//! the outbox. A stored resource is therefore held to `MAX_DEPTH` levels, well under the
//! parser's, and to the body-size limit as compact JSON. The walk keeps its own stack, so even
//! a document nested far deeper than that is measured without touching the thread's stack.

use std::io::Write;

use serde_json::Value;

use crate::error::{Error, IssueCode, Result};

/// The most levels of objects and arrays a stored resource may nest, the resource itself
/// being level 1 (`{"extension": [{"extension": [...]}]}` is four levels down to the inner
/// array). Half of what serde_json parses, so a stored resource can always be read back and
/// wrapped in a Bundle (two more levels) or a notification.
pub const MAX_DEPTH: usize = 64;

/// What a document may not exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeLimits {
    /// Compact JSON bytes (what `serde_json::to_string` produces).
    pub max_bytes: usize,
    /// Levels of nested objects and arrays; see `MAX_DEPTH`.
    pub max_depth: usize,
}

impl ShapeLimits {
    /// The limits of a stored resource, given the configured body-size limit.
    pub fn stored(max_bytes: usize) -> ShapeLimits {
        ShapeLimits {
            max_bytes,
            max_depth: MAX_DEPTH,
        }
    }
}

/// The size and depth of a document that is within its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Compact JSON bytes, exactly.
    pub bytes: usize,
    /// Levels of nested containers; 0 for a scalar.
    pub depth: usize,
}

/// Which limit a document passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Bytes,
    Depth,
}

/// Measures `value`, stopping as soon as it is larger or deeper than `limits` allow. The
/// work done is bounded by the limits, not by the document.
pub fn measure(value: &Value, limits: ShapeLimits) -> std::result::Result<Shape, Exceeded> {
    let mut bytes = 0usize;
    let mut depth = 0usize;
    // Each entry is a value and its level: the level its containers open.
    let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((value, level)) = stack.pop() {
        bytes += match value {
            Value::Null => 4,
            Value::Bool(true) => 4,
            Value::Bool(false) => 5,
            Value::Number(number) => number_len(number),
            Value::String(text) => quoted_len(text),
            Value::Array(items) => {
                if level > limits.max_depth {
                    return Err(Exceeded::Depth);
                }
                depth = depth.max(level);
                stack.extend(items.iter().map(|item| (item, level + 1)));
                // Brackets and the commas between the items.
                2 + items.len().saturating_sub(1)
            }
            Value::Object(map) => {
                if level > limits.max_depth {
                    return Err(Exceeded::Depth);
                }
                depth = depth.max(level);
                let mut own = 2 + map.len().saturating_sub(1);
                for (key, child) in map {
                    // The quoted key and its colon.
                    own += quoted_len(key) + 1;
                    stack.push((child, level + 1));
                }
                own
            }
        };
        if bytes > limits.max_bytes {
            return Err(Exceeded::Bytes);
        }
    }
    Ok(Shape { bytes, depth })
}

/// The length of a string as a JSON string literal, quotes included, escaped as serde_json
/// escapes: `"` and `\` take two bytes, the control characters with a short escape (`\b`,
/// `\t`, `\n`, `\f`, `\r`) two and the other control characters six (`\u00XX`).
fn quoted_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x09 | 0x0A | 0x0C | 0x0D => 2,
            0x00..=0x1F => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// The length of a number as serde_json writes it.
fn number_len(number: &serde_json::Number) -> usize {
    let mut counter = Counter(0);
    // Writing to a counter cannot fail; a number always serializes.
    let _ = serde_json::to_writer(&mut counter, number);
    counter.0
}

/// Counts the bytes written to it and keeps none.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// 400: the resource nests deeper than a stored resource may.
pub fn too_deep(what: &str, max_depth: usize) -> Error {
    Error::bad_request(
        IssueCode::TooLong,
        format!(
            "{what} nests objects and arrays more than {max_depth} levels deep; the most a \
             stored resource may have is {max_depth}"
        ),
    )
    .at(what.to_string())
}

/// 413: the resource is larger than the body-size limit.
pub fn too_large(what: &str, max_bytes: usize) -> Error {
    Error::client(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        IssueCode::TooLong,
        format!(
            "{what} would be larger than {max_bytes} bytes as compact JSON; the most a stored \
             resource may have is max_body_bytes ({max_bytes})"
        ),
    )
    .at(what.to_string())
}

/// Checks that a resource may be stored: at most `limits.max_depth` levels deep (400) and at
/// most `limits.max_bytes` bytes as compact JSON (413). `what` names it, e.g. `Task`.
pub fn check_shape(resource: &Value, limits: ShapeLimits, what: &str) -> Result<Shape> {
    measure(resource, limits).map_err(|exceeded| match exceeded {
        Exceeded::Depth => too_deep(what, limits.max_depth),
        Exceeded::Bytes => too_large(what, limits.max_bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const ROOMY: ShapeLimits = ShapeLimits {
        max_bytes: usize::MAX,
        max_depth: usize::MAX,
    };

    /// `levels` arrays nested inside each other.
    fn nested(levels: usize) -> Value {
        let mut value = json!(1);
        for _ in 0..levels {
            value = Value::Array(vec![value]);
        }
        value
    }

    #[test]
    fn sizes_equal_what_serde_json_writes() {
        let cases = [
            json!(null),
            json!(true),
            json!(false),
            json!(0),
            json!(-12),
            json!(3.25),
            json!(1e300),
            json!(u64::MAX),
            json!(""),
            json!("plain"),
            json!("quote \" backslash \\ slash /"),
            json!("\u{0} \u{1f} \u{7f} \n \t \r \u{8} \u{c}"),
            json!("naïve ☃ 𝄞"),
            json!([]),
            json!({}),
            json!([1, [2, [3]], {}]),
            json!({"a": 1, "b\"": [null, true], "": {"c": "d"}}),
        ];
        for value in cases {
            let shape = measure(&value, ROOMY).unwrap();
            assert_eq!(shape.bytes, value.to_string().len(), "{value}");
        }
    }

    #[test]
    fn depth_counts_nested_containers() {
        let cases = [
            (json!(1), 0),
            (json!("x"), 0),
            (json!([]), 1),
            (json!({}), 1),
            (json!({"a": [1]}), 2),
            (json!({"a": [{"b": {}}], "c": 1}), 4),
            (nested(64), 64),
        ];
        for (value, depth) in cases {
            assert_eq!(measure(&value, ROOMY).unwrap().depth, depth, "{value}");
        }
    }

    #[test]
    fn limits_stop_the_walk() {
        let limits = ShapeLimits {
            max_bytes: 10,
            max_depth: 3,
        };
        let cases = [
            (json!("12345678"), Ok(10)),
            (json!("123456789"), Err(Exceeded::Bytes)),
            (json!([[[1]]]), Ok(7)),
            (json!([[[[1]]]]), Err(Exceeded::Depth)),
            (nested(1000), Err(Exceeded::Depth)),
            (json!({"aaaaaaaa": 1}), Err(Exceeded::Bytes)),
        ];
        for (value, expected) in cases {
            assert_eq!(
                measure(&value, limits).map(|s| s.bytes),
                expected,
                "{value}"
            );
        }
    }

    #[test]
    fn refusals_name_the_limit() {
        let limits = ShapeLimits {
            max_bytes: 100,
            max_depth: 2,
        };
        let deep = check_shape(&nested(3), limits, "Task").unwrap_err();
        let deep = deep.as_client().unwrap();
        assert_eq!(deep.status, 400);
        assert!(
            deep.diagnostics.contains("2 levels"),
            "{}",
            deep.diagnostics
        );
        let large = check_shape(&json!("x".repeat(200)), limits, "Task").unwrap_err();
        let large = large.as_client().unwrap();
        assert_eq!(large.status, 413);
        assert!(large.diagnostics.contains("max_body_bytes (100)"));
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((any::<String>(), inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn measure_agrees_with_serde_json(value in any_json()) {
            let shape = measure(&value, ROOMY).unwrap();
            prop_assert_eq!(shape.bytes, value.to_string().len());
            let limits = ShapeLimits { max_bytes: shape.bytes, max_depth: shape.depth };
            prop_assert_eq!(measure(&value, limits), Ok(shape));
            if shape.bytes > 0 {
                let tighter = ShapeLimits { max_bytes: shape.bytes - 1, ..limits };
                prop_assert!(measure(&value, tighter).is_err());
            }
            if shape.depth > 0 {
                let shallower = ShapeLimits { max_depth: shape.depth - 1, ..limits };
                prop_assert_eq!(measure(&value, shallower), Err(Exceeded::Depth));
            }
        }
    }
}
