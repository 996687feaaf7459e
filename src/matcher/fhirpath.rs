//! The small subset of FHIRPath that SubscriptionTopic `fhirPathCriteria` need.
//!
//! A topic's FHIRPath criterion compares the Task before and after a change, e.g.
//! `(%previous.id.empty() or %previous.status != 'completed') and %current.status = 'completed'`.
//! Supporting the whole language would mean a type system, dozens of functions and date
//! arithmetic, and every construct we accept is one we must evaluate exactly as the FHIRPath
//! specification says. So this module accepts only what topics use, and refuses everything
//! else when the topic is loaded: a topic that silently evaluated part of its expression would
//! notify the wrong people.
//!
//! Supported: the variables `%previous` and `%current`, member paths, single-quoted string
//! literals, `true`/`false`, parentheses, `=`, `!=`, `and`, `or`, and the functions `not()`,
//! `empty()` and `exists()`. Evaluation is pure and never fails: a runtime error in FHIRPath
//! terms (a boolean operator given several values) makes the whole expression not true.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

/// A parsed FHIRPath expression from the supported subset.
#[derive(Debug, Clone)]
pub struct Expression {
    source: String,
    root: Node,
}

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Previous,
    Current,
    String(String),
    Boolean(bool),
    /// `subject.name`: the `name` children of every item of `subject`, flattened.
    Member(Box<Node>, String),
    Function(Box<Node>, Function),
    Equal(Box<Node>, Box<Node>),
    NotEqual(Box<Node>, Box<Node>),
    And(Box<Node>, Box<Node>),
    Or(Box<Node>, Box<Node>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Function {
    Not,
    Empty,
    Exists,
}

impl Function {
    fn from_name(name: &str) -> Option<Function> {
        match name {
            "not" => Some(Function::Not),
            "empty" => Some(Function::Empty),
            "exists" => Some(Function::Exists),
            _ => None,
        }
    }
}

impl fmt::Display for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Expression {
    /// The text the expression was parsed from.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression with `%previous` and `%current` bound to the Task before and
    /// after the change; an absent state is the empty collection. The result is true only when
    /// the expression yields exactly one boolean `true`, which is how FHIR decides whether a
    /// criterion "passes".
    pub fn evaluate(&self, previous: Option<&Value>, current: Option<&Value>) -> bool {
        let env = Environment { previous, current };
        match eval(&self.root, &env) {
            Ok(items) => matches!(items.as_slice(), [item] if item.as_ref() == &Value::Bool(true)),
            Err(MultipleValues) => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

struct Environment<'a> {
    previous: Option<&'a Value>,
    current: Option<&'a Value>,
}

/// A FHIRPath collection. Resource nodes are borrowed; literals and function results are owned.
type Collection<'a> = Vec<Cow<'a, Value>>;

/// FHIRPath signals an error when a boolean operator meets a collection of several items; we
/// carry that up to `evaluate`, which treats it as "did not pass".
#[derive(Debug)]
struct MultipleValues;

fn eval<'a>(node: &Node, env: &Environment<'a>) -> Result<Collection<'a>, MultipleValues> {
    Ok(match node {
        Node::Previous => env.previous.map(Cow::Borrowed).into_iter().collect(),
        Node::Current => env.current.map(Cow::Borrowed).into_iter().collect(),
        Node::String(text) => vec![Cow::Owned(Value::String(text.clone()))],
        Node::Boolean(b) => boolean(*b),
        Node::Member(subject, name) => {
            let mut out = Vec::new();
            for item in eval(subject, env)? {
                children(item, name, &mut out);
            }
            out
        }
        Node::Function(subject, function) => {
            let items = eval(subject, env)?;
            match function {
                Function::Empty => boolean(items.is_empty()),
                Function::Exists => boolean(!items.is_empty()),
                Function::Not => match singleton_boolean(&items)? {
                    Some(b) => boolean(!b),
                    None => Vec::new(),
                },
            }
        }
        Node::Equal(left, right) => optional(equal(&eval(left, env)?, &eval(right, env)?)),
        Node::NotEqual(left, right) => {
            optional(equal(&eval(left, env)?, &eval(right, env)?).map(|b| !b))
        }
        Node::And(left, right) => {
            let left = singleton_boolean(&eval(left, env)?)?;
            let right = singleton_boolean(&eval(right, env)?)?;
            optional(match (left, right) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            })
        }
        Node::Or(left, right) => {
            let left = singleton_boolean(&eval(left, env)?)?;
            let right = singleton_boolean(&eval(right, env)?)?;
            optional(match (left, right) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            })
        }
    })
}

fn boolean<'a>(b: bool) -> Collection<'a> {
    vec![Cow::Owned(Value::Bool(b))]
}

/// A three-valued result as a collection: empty stands for "unknown".
fn optional<'a>(b: Option<bool>) -> Collection<'a> {
    b.map(boolean).unwrap_or_default()
}

/// Appends the `name` children of `item`. FHIR JSON repeats an element as an array, and
/// FHIRPath sees each element of it as its own item, so arrays are flattened. JSON `null`
/// only pads primitive arrays that carry extensions and is no value.
fn children<'a>(item: Cow<'a, Value>, name: &str, out: &mut Collection<'a>) {
    // Only literals and booleans are owned, and they have no children.
    let Cow::Borrowed(value) = item else {
        return;
    };
    let found: &[Value] = match value.get(name) {
        Some(Value::Array(elements)) => elements,
        Some(child) => std::slice::from_ref(child),
        None => &[],
    };
    out.extend(
        found
            .iter()
            .filter(|child| !child.is_null())
            .map(Cow::Borrowed),
    );
}

/// FHIRPath's singleton evaluation of a collection where a boolean is expected: empty stays
/// empty, a single boolean is itself, any other single item counts as true, and several items
/// are an error.
fn singleton_boolean(items: &Collection<'_>) -> Result<Option<bool>, MultipleValues> {
    match items.as_slice() {
        [] => Ok(None),
        [item] => Ok(Some(item.as_bool().unwrap_or(true))),
        _ => Err(MultipleValues),
    }
}

/// FHIRPath `=` on collections: empty if either side is empty, false if the sizes differ,
/// otherwise whether the items are equal pairwise in order.
fn equal(left: &Collection<'_>, right: &Collection<'_>) -> Option<bool> {
    if left.is_empty() || right.is_empty() {
        return None;
    }
    Some(
        left.len() == right.len()
            && left
                .iter()
                .zip(right)
                .all(|(a, b)| values_equal(a.as_ref(), b.as_ref())),
    )
}

/// Item equality. Strings, booleans and date/time texts compare exactly (FHIR JSON carries no
/// type to tell a date from a string, and Task dates are stored as written). Numbers compare by
/// value so that `1` equals `1.0`. Complex values are equal when all their children are.
fn values_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(key, value)| y.get(key).is_some_and(|other| values_equal(value, other)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| values_equal(a, b))
        }
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------------------------
// Lexing
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// `%name`.
    Variable(String),
    Identifier(String),
    String(String),
    Dot,
    OpenParen,
    CloseParen,
    Equal,
    NotEqual,
    End,
    /// A symbol outside the subset; holds the message naming it.
    Invalid(String),
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Variable(name) => format!("'%{name}'"),
            Token::Identifier(name) => format!("'{name}'"),
            Token::String(_) => "a string literal".into(),
            Token::Dot => "'.'".into(),
            Token::OpenParen => "'('".into(),
            Token::CloseParen => "')'".into(),
            Token::Equal => "'='".into(),
            Token::NotEqual => "'!='".into(),
            Token::End => "the end of the expression".into(),
            Token::Invalid(message) => message.clone(),
        }
    }
}

/// A token and the 1-based character position where it starts.
#[derive(Debug, Clone)]
struct Spanned {
    token: Token,
    position: usize,
}

fn error_at(position: usize, message: impl fmt::Display) -> String {
    format!("{message} (at character {position})")
}

/// Splits the text into tokens, refusing at once any symbol of FHIRPath outside the subset so
/// that the message can name it.
fn lex(text: &str) -> Vec<Spanned> {
    let mut tokens = Vec::new();
    match lex_into(text, &mut tokens) {
        Ok(end) => tokens.push(Spanned {
            token: Token::End,
            position: end,
        }),
        // The parser reports the problem when it reaches it, so that of two problems the
        // earlier one in the text is the one named.
        Err(message) => tokens.push(Spanned {
            token: Token::Invalid(message),
            position: 0,
        }),
    }
    tokens
}

/// Appends the tokens of `text` and returns the position after the last character, or stops
/// at the first symbol outside the subset.
fn lex_into(text: &str, tokens: &mut Vec<Spanned>) -> Result<usize, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let position = i + 1;
        let next = chars.get(i + 1).copied();
        let simple = |token: Token, width: usize, tokens: &mut Vec<Spanned>| {
            tokens.push(Spanned { token, position });
            width
        };
        i += match c {
            _ if c.is_whitespace() => 1,
            '/' if next == Some('/') => {
                let end = chars[i..].iter().position(|&c| c == '\n');
                end.map_or(chars.len() - i, |n| n + 1)
            }
            '/' if next == Some('*') => {
                let rest: String = chars[i + 2..].iter().collect();
                let end = rest
                    .find("*/")
                    .ok_or_else(|| error_at(position, "the comment '/*' is never closed"))?;
                2 + rest[..end].chars().count() + 2
            }
            '.' => simple(Token::Dot, 1, tokens),
            '(' => simple(Token::OpenParen, 1, tokens),
            ')' => simple(Token::CloseParen, 1, tokens),
            '=' => simple(Token::Equal, 1, tokens),
            '!' if next == Some('=') => simple(Token::NotEqual, 2, tokens),
            '!' if next == Some('~') => {
                return Err(error_at(
                    position,
                    "the equivalence operator '!~' is not supported; use '!='",
                ));
            }
            '~' => {
                return Err(error_at(
                    position,
                    "the equivalence operator '~' is not supported; use '='",
                ));
            }
            '<' | '>' => {
                let op: String = if next == Some('=') {
                    [c, '='].iter().collect()
                } else {
                    c.to_string()
                };
                return Err(error_at(
                    position,
                    format!("the comparison operator '{op}' is not supported"),
                ));
            }
            '+' | '-' | '*' | '/' | '&' => {
                return Err(error_at(
                    position,
                    format!("the arithmetic operator '{c}' is not supported"),
                ));
            }
            '|' => {
                return Err(error_at(
                    position,
                    "the union operator '|' is not supported",
                ));
            }
            '[' | ']' => {
                return Err(error_at(position, "indexers ('[...]') are not supported"));
            }
            ',' => {
                return Err(error_at(position, "function arguments are not supported"));
            }
            '{' => {
                return Err(error_at(
                    position,
                    "the empty collection literal '{}' is not supported; use empty()",
                ));
            }
            '@' => {
                return Err(error_at(
                    position,
                    "date and time literals ('@...') are not supported",
                ));
            }
            '`' => {
                return Err(error_at(
                    position,
                    "delimited identifiers ('`...`') are not supported",
                ));
            }
            '"' => {
                return Err(error_at(
                    position,
                    "double-quoted strings are not FHIRPath; use single quotes",
                ));
            }
            '$' => {
                let name = word(&chars[i + 1..]);
                return Err(error_at(
                    position,
                    format!("the variable '${name}' is not supported"),
                ));
            }
            '%' => {
                let name = word(&chars[i + 1..]);
                match name.as_str() {
                    "previous" | "current" => {}
                    "" => {
                        return Err(error_at(
                            position,
                            "'%' must be followed by a variable name (%previous or %current)",
                        ));
                    }
                    _ => {
                        return Err(error_at(
                            position,
                            format!(
                                "the variable '%{name}' is not supported; only %previous and %current are"
                            ),
                        ));
                    }
                }
                let width = 1 + name.len();
                simple(Token::Variable(name), width, tokens)
            }
            '\'' => {
                let (value, width) = string_literal(&chars[i..], position)?;
                simple(Token::String(value), width, tokens)
            }
            _ if c.is_ascii_digit() => {
                return Err(error_at(position, "number literals are not supported"));
            }
            _ if c.is_ascii_alphabetic() || c == '_' => {
                let name = word(&chars[i..]);
                let width = name.len();
                simple(Token::Identifier(name), width, tokens)
            }
            _ => {
                return Err(error_at(
                    position,
                    format!("the character '{c}' is not allowed here"),
                ));
            }
        };
    }
    Ok(chars.len() + 1)
}

/// The identifier characters at the start of `chars`.
fn word(chars: &[char]) -> String {
    chars
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || **c == '_')
        .collect()
}

/// Reads a single-quoted string starting at `chars[0]`, returning its value and how many
/// characters it spans. The escapes are FHIRPath's.
fn string_literal(chars: &[char], position: usize) -> Result<(String, usize), String> {
    let mut value = String::new();
    let mut i = 1;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err(error_at(position, "the string literal is never closed"));
        };
        match c {
            '\'' => return Ok((value, i + 1)),
            '\\' => {
                let escape_at = position + i;
                let escaped = chars
                    .get(i + 1)
                    .ok_or_else(|| error_at(position, "the string literal is never closed"))?;
                match escaped {
                    '\'' | '"' | '`' | '\\' | '/' => value.push(*escaped),
                    'f' => value.push('\u{c}'),
                    'n' => value.push('\n'),
                    'r' => value.push('\r'),
                    't' => value.push('\t'),
                    'u' => {
                        let hex: String = chars.iter().skip(i + 2).take(4).collect();
                        let decoded = (hex.len() == 4)
                            .then(|| u32::from_str_radix(&hex, 16).ok())
                            .flatten()
                            .and_then(char::from_u32)
                            .ok_or_else(|| {
                                error_at(escape_at, "'\\u' must be followed by four hex digits")
                            })?;
                        value.push(decoded);
                        i += 4;
                    }
                    other => {
                        return Err(error_at(
                            escape_at,
                            format!("the escape '\\{other}' is not valid in a string"),
                        ));
                    }
                }
                i += 2;
            }
            _ => {
                value.push(c);
                i += 1;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// FHIRPath keywords that are operators in the full language; after an operand they would
/// otherwise read as a stray identifier, so they get their own message.
const UNSUPPORTED_OPERATORS: &[&str] =
    &["implies", "xor", "is", "as", "in", "contains", "div", "mod"];

/// Parses a FHIRPath expression of the supported subset. The error names the first construct
/// outside the subset and the character where it starts.
pub fn parse(text: &str) -> Result<Expression, String> {
    let tokens = lex(text);
    let mut parser = Parser { tokens, next: 0 };
    if parser.peek()?.token == Token::End {
        return Err("the expression is empty".into());
    }
    let root = parser.or_expression()?;
    let rest = parser.peek()?;
    if rest.token != Token::End {
        return Err(parser.unexpected(rest));
    }
    Ok(Expression {
        source: text.to_string(),
        root,
    })
}

struct Parser {
    tokens: Vec<Spanned>,
    next: usize,
}

impl Parser {
    /// The next token; reaching a symbol the lexer refused is the error it describes.
    fn peek(&self) -> Result<Spanned, String> {
        let token = self.tokens[self.next].clone();
        match token.token {
            Token::Invalid(message) => Err(message),
            _ => Ok(token),
        }
    }

    fn advance(&mut self) -> Result<Spanned, String> {
        let token = self.peek()?;
        if token.token != Token::End {
            self.next += 1;
        }
        Ok(token)
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(&self.tokens[self.next].token, Token::Identifier(name) if name == keyword)
    }

    /// The message for a token that cannot appear where it does.
    fn unexpected(&self, found: Spanned) -> String {
        match &found.token {
            Token::Identifier(name) if UNSUPPORTED_OPERATORS.contains(&name.as_str()) => error_at(
                found.position,
                format!("the operator '{name}' is not supported"),
            ),
            token => error_at(found.position, format!("unexpected {}", token.describe())),
        }
    }

    fn or_expression(&mut self) -> Result<Node, String> {
        let mut node = self.and_expression()?;
        while self.is_keyword("or") {
            self.advance()?;
            let right = self.and_expression()?;
            node = Node::Or(Box::new(node), Box::new(right));
        }
        Ok(node)
    }

    fn and_expression(&mut self) -> Result<Node, String> {
        let mut node = self.equality()?;
        while self.is_keyword("and") {
            self.advance()?;
            let right = self.equality()?;
            node = Node::And(Box::new(node), Box::new(right));
        }
        Ok(node)
    }

    fn equality(&mut self) -> Result<Node, String> {
        let mut node = self.postfix()?;
        loop {
            let equal = match self.peek()?.token {
                Token::Equal => true,
                Token::NotEqual => false,
                _ => return Ok(node),
            };
            self.advance()?;
            let right = Box::new(self.postfix()?);
            node = if equal {
                Node::Equal(Box::new(node), right)
            } else {
                Node::NotEqual(Box::new(node), right)
            };
        }
    }

    /// A term followed by any number of `.member` and `.function()` invocations.
    fn postfix(&mut self) -> Result<Node, String> {
        let mut node = self.term()?;
        while self.peek()?.token == Token::Dot {
            self.advance()?;
            let name_token = self.advance()?;
            let Token::Identifier(name) = name_token.token else {
                return Err(error_at(
                    name_token.position,
                    format!(
                        "expected a name after '.', found {}",
                        name_token.token.describe()
                    ),
                ));
            };
            if self.peek()?.token == Token::OpenParen {
                let function = self.function_call(&name, name_token.position)?;
                node = Node::Function(Box::new(node), function);
            } else {
                node = Node::Member(Box::new(node), name);
            }
        }
        Ok(node)
    }

    /// Parses the `()` after a function name, which must be one of the supported functions
    /// and take no arguments.
    fn function_call(&mut self, name: &str, position: usize) -> Result<Function, String> {
        let Some(function) = Function::from_name(name) else {
            return Err(error_at(
                position,
                format!(
                    "the function '{name}()' is not supported; only not(), empty() and exists() are"
                ),
            ));
        };
        self.advance()?;
        let close = self.peek()?;
        if close.token != Token::CloseParen {
            return Err(error_at(
                close.position,
                format!("'{name}()' takes no arguments here"),
            ));
        }
        self.advance()?;
        Ok(function)
    }

    fn term(&mut self) -> Result<Node, String> {
        let token = self.advance()?;
        match token.token {
            Token::Variable(name) => Ok(match name.as_str() {
                "previous" => Node::Previous,
                _ => Node::Current,
            }),
            Token::String(value) => Ok(Node::String(value)),
            Token::OpenParen => {
                let inner = self.or_expression()?;
                let close = self.advance()?;
                if close.token != Token::CloseParen {
                    return Err(error_at(
                        close.position,
                        format!("expected ')', found {}", close.token.describe()),
                    ));
                }
                Ok(inner)
            }
            Token::Identifier(name) => match name.as_str() {
                "true" => Ok(Node::Boolean(true)),
                "false" => Ok(Node::Boolean(false)),
                _ if self.peek()?.token == Token::OpenParen => {
                    if Function::from_name(&name).is_some() {
                        Err(error_at(
                            token.position,
                            format!(
                                "'{name}()' needs a subject, e.g. '%current.{name}()'; there is no implicit context"
                            ),
                        ))
                    } else {
                        Err(error_at(
                            token.position,
                            format!("the function '{name}()' is not supported"),
                        ))
                    }
                }
                _ if UNSUPPORTED_OPERATORS.contains(&name.as_str()) => {
                    Err(self.unexpected(Spanned {
                        token: Token::Identifier(name),
                        position: token.position,
                    }))
                }
                _ => Err(error_at(
                    token.position,
                    format!(
                        "the path '{name}' has no subject; paths must start with %previous or %current"
                    ),
                )),
            },
            other => Err(error_at(
                token.position,
                format!("expected a value, found {}", other.describe()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(status: &str) -> Value {
        json!({
            "resourceType": "Task",
            "id": "t1",
            "status": status,
            "intent": "order",
            "owner": { "reference": "Practitioner/p1", "display": "Dr One" },
            "businessStatus": {
                "coding": [
                    { "system": "urn:bs", "code": "waiting" },
                    { "system": "urn:other", "code": "w" }
                ]
            },
            "identifier": [{ "value": "A" }, { "value": "B" }],
            "input": [
                { "type": { "text": "x" }, "valueInteger": 1 },
                { "type": { "text": "y" }, "valueDecimal": 1.0 }
            ]
        })
    }

    /// What an expression yields for a create (no previous), an update (both) and a delete
    /// (no current); `None` marks a state the case does not check.
    struct Case {
        expression: &'static str,
        create: Option<bool>,
        update: Option<bool>,
        delete: Option<bool>,
    }

    const fn case(
        expression: &'static str,
        create: Option<bool>,
        update: Option<bool>,
        delete: Option<bool>,
    ) -> Case {
        Case {
            expression,
            create,
            update,
            delete,
        }
    }

    const T: Option<bool> = Some(true);
    const F: Option<bool> = Some(false);

    #[test]
    fn expressions_evaluate_over_create_update_and_delete() {
        // The update moves the Task from `requested` to `completed`.
        let before = task("requested");
        let after = task("completed");
        let cases = [
            // The specification's example: true on a create or update into completed.
            case(
                "(%previous.id.empty() or %previous.status != 'completed') and %current.status = 'completed'",
                T,
                T,
                F,
            ),
            case(
                "%previous.empty() or %previous.status != %current.status",
                T,
                T,
                F,
            ),
            case("%current.status = 'completed'", T, T, F),
            case("%current.status != 'completed'", F, F, F),
            case("%previous.status = 'requested'", F, T, T),
            case("%previous.exists()", F, T, T),
            case("%current.exists()", T, T, F),
            case("%current.empty().not()", T, T, F),
            case("%previous.not()", F, F, F),
            case("%previous.empty().not() and %current.empty()", F, F, T),
            // Paths flatten through arrays, and lists compare element-wise in order.
            case(
                "%previous.businessStatus.coding.code = %current.businessStatus.coding.code",
                F,
                T,
                F,
            ),
            case("%current.identifier.value = 'A'", F, F, F),
            case("%current.businessStatus.coding.code.exists()", T, T, F),
            case("%current.owner.reference = 'Practitioner/p1'", T, T, F),
            case("%current.owner = %current.owner", T, T, F),
            case("%current.owner.nothing.empty()", T, T, T),
            // A non-boolean result never counts as true.
            case("%current.status", F, F, F),
            case("%current", F, F, F),
            case("'completed'", F, F, F),
            case("true", T, T, T),
            case("false", F, F, F),
            case("true and (false or true)", T, T, T),
            case("true or false and false", T, T, T),
            case("(true or false) and false", F, F, F),
            // Member access on a literal yields nothing, so the comparison is empty.
            case("'x'.length = 'x'", F, F, F),
            // Escapes in literals.
            case(r"'it\'s' = 'it' and true", F, F, F),
            case(r"%current.status != 'it\'s'", T, T, F),
            // Comments are whitespace.
            case(
                "%current.status = 'completed' // only finished work\n",
                T,
                T,
                F,
            ),
            case("/* a */ %current.exists()", T, T, F),
        ];
        for Case {
            expression,
            create,
            update,
            delete,
        } in cases
        {
            let parsed = parse(expression).unwrap_or_else(|e| panic!("{expression}: {e}"));
            let runs = [
                ("create", create, None, Some(&after)),
                ("update", update, Some(&before), Some(&after)),
                ("delete", delete, Some(&before), None),
            ];
            for (label, expected, previous, current) in runs {
                if let Some(expected) = expected {
                    assert_eq!(
                        parsed.evaluate(previous, current),
                        expected,
                        "{expression} on {label}"
                    );
                }
            }
        }
    }

    /// Evaluates one expression with `%previous` and `%current` bound to the given JSON.
    fn eval_with(expression: &str, previous: Value, current: Value) -> bool {
        parse(expression)
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
            .evaluate(Some(&previous), Some(&current))
    }

    #[test]
    fn collection_equality_and_three_valued_logic_follow_fhirpath() {
        let cases = [
            // Empty on either side of `=` or `!=` is empty, which is not true...
            (
                "%previous.a = %current.a",
                json!({}),
                json!({"a": "x"}),
                false,
            ),
            (
                "%previous.a != %current.a",
                json!({}),
                json!({"a": "x"}),
                false,
            ),
            // ...and `not()` of empty is still empty.
            (
                "(%previous.a = %current.a).not()",
                json!({}),
                json!({"a": "x"}),
                false,
            ),
            // `or` with an empty side is true only when the other side is true.
            ("%previous.a = 'x' or true", json!({}), json!({}), true),
            ("%previous.a = 'x' or false", json!({}), json!({}), false),
            (
                "(%previous.a = 'x' or false).empty()",
                json!({}),
                json!({}),
                true,
            ),
            // `and` with an empty side is false only when the other side is false.
            (
                "(%previous.a = 'x' and false) = false",
                json!({}),
                json!({}),
                true,
            ),
            (
                "(%previous.a = 'x' and true).empty()",
                json!({}),
                json!({}),
                true,
            ),
            // Lists: same items in the same order.
            (
                "%previous.a = %current.a",
                json!({"a": ["x", "y"]}),
                json!({"a": ["x", "y"]}),
                true,
            ),
            (
                "%previous.a != %current.a",
                json!({"a": ["x", "y"]}),
                json!({"a": ["y", "x"]}),
                true,
            ),
            (
                "%previous.a != %current.a",
                json!({"a": ["x"]}),
                json!({"a": ["x", "y"]}),
                true,
            ),
            (
                "%previous.a = %current.a",
                json!({"a": ["x", "y"]}),
                json!({"a": ["x"]}),
                false,
            ),
            // A single-item array is the same collection as a single value.
            (
                "%previous.a = %current.a",
                json!({"a": ["x"]}),
                json!({"a": "x"}),
                true,
            ),
            // Numbers compare by value; booleans are not strings.
            (
                "%previous.n = %current.n",
                json!({"n": 1}),
                json!({"n": 1.0}),
                true,
            ),
            ("%previous.b = 'true'", json!({"b": true}), json!({}), false),
            ("%previous.b", json!({"b": true}), json!({}), true),
            (
                "%previous.b and %current.b",
                json!({"b": true}),
                json!({"b": false}),
                false,
            ),
            // A single non-boolean item counts as true in a boolean position.
            ("%previous.a and true", json!({"a": "x"}), json!({}), true),
            ("%previous.a.not()", json!({"a": "x"}), json!({}), false),
            // Several items where a boolean is expected are an error, which is not true.
            (
                "%previous.a or true",
                json!({"a": ["x", "y"]}),
                json!({}),
                false,
            ),
            (
                "%previous.a.not() or true",
                json!({"a": ["x", "y"]}),
                json!({}),
                false,
            ),
            // Complex values compare all their children.
            (
                "%previous.o = %current.o",
                json!({"o": {"x": 1, "y": "a"}}),
                json!({"o": {"y": "a", "x": 1}}),
                true,
            ),
            (
                "%previous.o = %current.o",
                json!({"o": {"x": 1}}),
                json!({"o": {"x": 1, "y": "a"}}),
                false,
            ),
            // JSON null pads primitive arrays and is no value.
            (
                "%previous.a = %current.a",
                json!({"a": [null, "x"]}),
                json!({"a": ["x"]}),
                true,
            ),
            ("%previous.a.empty()", json!({"a": null}), json!({}), true),
            // Paths through arrays of objects collect every child.
            (
                "%previous.c.d = %current.d",
                json!({"c": [{"d": "1"}, {"e": "2"}, {"d": "3"}]}),
                json!({"d": ["1", "3"]}),
                true,
            ),
        ];
        for (expression, previous, current, expected) in cases {
            assert_eq!(
                eval_with(expression, previous.clone(), current.clone()),
                expected,
                "{expression} with previous {previous} and current {current}"
            );
        }
    }

    #[test]
    fn both_states_absent_is_empty_everywhere() {
        let expression = parse("%previous.empty() and %current.empty()").unwrap();
        assert!(expression.evaluate(None, None));
        assert!(
            !parse("%current.status = %previous.status")
                .unwrap()
                .evaluate(None, None)
        );
    }

    #[test]
    fn constructs_outside_the_subset_are_refused_by_name_and_position() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            (
                "%current.status.where(true)",
                "the function 'where()' is not supported; only not(), empty() and exists() are (at character 17)",
            ),
            (
                "%current.exists(status)",
                "'exists()' takes no arguments here (at character 17)",
            ),
            ("%current.status.count() = 1", "'count()' is not supported"),
            (
                "%current.status = 1",
                "number literals are not supported (at character 19)",
            ),
            (
                "%current.a + %current.b",
                "arithmetic operator '+' is not supported (at character 12)",
            ),
            ("%current.a - 'x'", "arithmetic operator '-'"),
            ("%current.a * 'x'", "arithmetic operator '*'"),
            ("%current.a & 'x'", "arithmetic operator '&'"),
            ("%current.a / 'x'", "arithmetic operator '/'"),
            (
                "%current.a div 'x'",
                "operator 'div' is not supported (at character 12)",
            ),
            (
                "%previous.a implies %current.a",
                "operator 'implies' is not supported (at character 13)",
            ),
            ("true xor false", "operator 'xor' is not supported"),
            ("%current.status in 'x'", "operator 'in' is not supported"),
            ("%current is Task", "operator 'is' is not supported"),
            (
                "%current.a | %previous.a",
                "union operator '|' is not supported (at character 12)",
            ),
            (
                "%current.identifier[0]",
                "indexers ('[...]') are not supported (at character 20)",
            ),
            (
                "%current.a < 'x'",
                "comparison operator '<' is not supported",
            ),
            (
                "%current.a >= 'x'",
                "comparison operator '>=' is not supported",
            ),
            (
                "%current.a ~ 'x'",
                "equivalence operator '~' is not supported",
            ),
            (
                "%current.a !~ 'x'",
                "equivalence operator '!~' is not supported",
            ),
            (
                "$this.status",
                "variable '$this' is not supported (at character 1)",
            ),
            (
                "%resource.status",
                "variable '%resource' is not supported; only %previous and %current are (at character 1)",
            ),
            ("%context", "variable '%context'"),
            ("% previous", "'%' must be followed by a variable name"),
            (
                "status = 'x'",
                "the path 'status' has no subject; paths must start with %previous or %current (at character 1)",
            ),
            ("Task.status = 'x'", "the path 'Task' has no subject"),
            ("exists()", "'exists()' needs a subject"),
            (
                "iif(true, 'a', 'b')",
                "the function 'iif()' is not supported",
            ),
            ("%current.a = @2024-01-01", "date and time literals"),
            ("%current.a = {}", "empty collection literal"),
            ("%current.`div`", "delimited identifiers"),
            ("%current.a = \"x\"", "double-quoted strings"),
            ("%current.a = 'x", "never closed"),
            (
                r"%current.a = '\q'",
                r"the escape '\q' is not valid in a string (at character 15)",
            ),
            (
                "(%current.a = 'x'",
                "expected ')', found the end of the expression (at character 18)",
            ),
            ("%current.a = 'x')", "unexpected ')' (at character 17)"),
            (
                "%current.",
                "expected a name after '.', found the end of the expression",
            ),
            (
                "%current.a =",
                "expected a value, found the end of the expression",
            ),
            (
                "%current %previous",
                "unexpected '%previous' (at character 10)",
            ),
            ("%current.a = 'x' /* open", "comment '/*' is never closed"),
            (
                "%current.a # 1",
                "the character '#' is not allowed here (at character 12)",
            ),
        ];
        for (expression, needle) in cases {
            let err = parse(expression).expect_err(expression);
            assert!(
                err.contains(needle),
                "{expression}: '{err}' lacks '{needle}'"
            );
        }
    }

    #[test]
    fn string_escapes_decode() {
        let cases = [
            (r"'it\'s'", "it's"),
            (r"'a\\b'", r"a\b"),
            (r"'tab\tend'", "tab\tend"),
            (r"'\u00e9t\u00E9'", "été"),
            (r#"'\/\`\"'"#, "/`\""),
            ("'ünïcode'", "ünïcode"),
        ];
        for (literal, expected) in cases {
            let expression = parse(&format!("%current.s = {literal}")).unwrap();
            assert!(
                expression.evaluate(None, Some(&json!({ "s": expected }))),
                "{literal}"
            );
        }
        assert!(
            parse(r"%current.s = '\u12'")
                .unwrap_err()
                .contains("four hex digits")
        );
    }

    #[test]
    fn the_source_text_is_kept() {
        let text = "%current.status = 'ready'";
        let expression = parse(text).unwrap();
        assert_eq!(expression.as_str(), text);
        assert_eq!(expression.to_string(), text);
    }
}
