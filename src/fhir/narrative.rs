//! The XHTML of a FHIR narrative (`Narrative.div`), checked against FHIR's own rules.
//!
//! Clients render narratives as HTML, so a narrative that carries a script, an event
//! handler or a `javascript:` link is stored cross-site scripting. FHIR R4 already forbids it:
//! txt-1 allows "only the basic html formatting elements and attributes" (the element and
//! attribute lists below are those of txt-1's schematron), txt-2 asks for some content, and
//! the FHIR JSON format requires one `<div>` in the XHTML namespace. The checker is an
//! allowlist over a small, strict XML reader:
//! - elements and attributes must be on txt-1's lists, and the root a `div` declaring
//!   `xmlns="http://www.w3.org/1999/xhtml"`;
//! - URL attributes (`href`, `src`, `cite`, `longdesc`) may be relative or use `http`,
//!   `https`, `mailto`, `tel` or `urn`, read as a browser reads them (entities decoded, tabs
//!   and newlines dropped);
//! - `style` may use plain CSS values and the colour functions `rgb()`, `rgba()`, `hsl()`,
//!   `hsla()`; any other function (`url()`, `expression()`), CSS escapes, comments and
//!   at-rules are refused;
//! - comments, CDATA sections, declarations and processing instructions are refused, because
//!   HTML and XML parsers do not agree on where they end (the classic way to hide markup
//!   from a checker); entities are the five XML ones and numeric character references.
//!
//! Everything here is pure, and the XHTML reader is iterative: no recursion, whatever the
//! nesting.

use serde_json::Value;

/// The namespace FHIR requires on the narrative's `div`.
pub const XHTML_NAMESPACE: &str = "http://www.w3.org/1999/xhtml";

/// txt-1's elements.
const ELEMENTS: &[&str] = &[
    "a",
    "abbr",
    "acronym",
    "b",
    "big",
    "blockquote",
    "br",
    "caption",
    "cite",
    "code",
    "col",
    "colgroup",
    "dd",
    "dfn",
    "div",
    "dl",
    "dt",
    "em",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "i",
    "img",
    "li",
    "ol",
    "p",
    "pre",
    "q",
    "samp",
    "small",
    "span",
    "strong",
    "sub",
    "sup",
    "table",
    "tbody",
    "td",
    "tfoot",
    "th",
    "thead",
    "tr",
    "tt",
    "ul",
    "var",
];

/// txt-1's attributes, plus `xml:lang` and `xml:space`, which XHTML defines and which carry
/// no content. `xmlns` is handled on its own: it may only name the XHTML namespace.
const ATTRIBUTES: &[&str] = &[
    "abbr",
    "accesskey",
    "align",
    "alt",
    "axis",
    "bgcolor",
    "border",
    "cellhalign",
    "cellpadding",
    "cellspacing",
    "cellvalign",
    "char",
    "charoff",
    "charset",
    "cite",
    "class",
    "colspan",
    "compact",
    "coords",
    "dir",
    "frame",
    "headers",
    "height",
    "href",
    "hreflang",
    "hspace",
    "id",
    "lang",
    "longdesc",
    "name",
    "nowrap",
    "rel",
    "rev",
    "rowspan",
    "rules",
    "scope",
    "shape",
    "span",
    "src",
    "start",
    "style",
    "summary",
    "tabindex",
    "title",
    "type",
    "valign",
    "value",
    "vspace",
    "width",
    "xml:lang",
    "xml:space",
];

/// Attributes whose value a browser follows or loads as a URL.
const URL_ATTRIBUTES: &[&str] = &["href", "src", "cite", "longdesc"];

/// The URL schemes a narrative may link to or load from.
const URL_SCHEMES: &[&str] = &["http", "https", "mailto", "tel", "urn"];

/// The CSS functions a `style` may call: colours only.
const CSS_FUNCTIONS: &[&str] = &["rgb", "rgba", "hsl", "hsla"];

/// Elements that run, embed or submit something; named as active content in the refusal.
const ACTIVE_ELEMENTS: &[&str] = &[
    "script", "iframe", "frame", "frameset", "object", "embed", "applet", "form", "input",
    "button", "select", "textarea", "style", "link", "meta", "base", "svg", "math", "template",
    "noscript", "video", "audio", "source", "portal",
];

/// Checks a narrative `div`. The problem, if any, reads after the element's path:
/// "Task.text.div {problem}".
pub fn problem(div: &str) -> Option<String> {
    Reader::new(div).run().err()
}

/// The first narrative anywhere in `resource` (its own `text.div`, a contained resource's,
/// a resource inside those) that breaks the rules: its path and the problem.
pub fn find_problem(resource: &Value, root: &str) -> Option<(String, String)> {
    let (path, problem) = crate::fhir::json::find_path(resource, root, &|key, value| {
        if key != Some("text") {
            return None;
        }
        problem(value.get("div")?.as_str()?)
    })?;
    Some((format!("{path}.div"), problem))
}

/// Names and values from the document, shortened for a diagnostic.
fn shown(text: &str) -> String {
    const LIMIT: usize = 40;
    match text.char_indices().nth(LIMIT) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

fn is_xml_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

struct Reader<'d> {
    text: &'d str,
    bytes: &'d [u8],
    pos: usize,
    /// The elements open at `pos`, outermost first.
    open: Vec<&'d str>,
    /// txt-2: some text that is not whitespace, or an image with a source.
    has_content: bool,
}

type Check<T = ()> = Result<T, String>;

impl<'d> Reader<'d> {
    fn new(div: &'d str) -> Reader<'d> {
        let text = div.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
        Reader {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            open: Vec::new(),
            has_content: false,
        }
    }

    fn run(mut self) -> Check {
        if !self.text.starts_with("<div") {
            return Err(format!(
                "must be XHTML in a single <div xmlns=\"{XHTML_NAMESPACE}\"> element"
            ));
        }
        let mut closed_root = false;
        while self.pos < self.bytes.len() {
            if closed_root {
                return Err(format!(
                    "has content after its closing </div>; a narrative is a single <div \
                     xmlns=\"{XHTML_NAMESPACE}\"> element"
                ));
            }
            if self.bytes[self.pos] == b'<' {
                closed_root = self.markup()?;
            } else {
                self.text_run()?;
            }
        }
        if let Some(name) = self.open.last() {
            return Err(format!(
                "is not well-formed XHTML: <{}> is never closed",
                shown(name)
            ));
        }
        if !self.has_content {
            return Err(
                "has no text and no image; a narrative must have some non-whitespace content \
                 (txt-2)"
                    .to_string(),
            );
        }
        Ok(())
    }

    /// Reads one tag at `pos`; says whether it closed the root `div`.
    fn markup(&mut self) -> Check<bool> {
        match self.bytes.get(self.pos + 1) {
            Some(b'!') => Err(
                "contains a comment, CDATA section or declaration ('<!'); a narrative holds only \
                 elements and text, since HTML and XML parsers disagree on where those end"
                    .to_string(),
            ),
            Some(b'?') => Err(
                "contains a processing instruction ('<?'); a narrative holds only elements and \
                 text"
                    .to_string(),
            ),
            Some(b'/') => {
                self.pos += 2;
                let name = self.name();
                self.skip_space();
                if self.bytes.get(self.pos) != Some(&b'>') {
                    return Err(format!(
                        "is not well-formed XHTML: the end tag </{}> is not closed with '>'",
                        shown(name)
                    ));
                }
                self.pos += 1;
                match self.open.pop() {
                    Some(open) if open == name => Ok(self.open.is_empty()),
                    Some(open) => Err(format!(
                        "is not well-formed XHTML: <{}> is closed by </{}>",
                        shown(open),
                        shown(name)
                    )),
                    None => Err(format!(
                        "is not well-formed XHTML: </{}> closes nothing",
                        shown(name)
                    )),
                }
            }
            _ => self.start_tag(),
        }
    }

    fn start_tag(&mut self) -> Check<bool> {
        self.pos += 1;
        let element = self.name();
        if element.is_empty() {
            return Err(
                "is not well-formed XHTML: a '<' starts no tag; write a literal '<' as &lt;"
                    .to_string(),
            );
        }
        check_element(element)?;
        let is_root = self.open.is_empty();
        if is_root && element != "div" {
            return Err(format!(
                "must be XHTML in a single <div xmlns=\"{XHTML_NAMESPACE}\"> element"
            ));
        }
        let mut seen: Vec<&str> = Vec::new();
        let mut namespace = None;
        let self_closing = loop {
            let had_space = self.skip_space();
            match self.bytes.get(self.pos) {
                Some(b'>') => {
                    self.pos += 1;
                    break false;
                }
                Some(b'/') if self.bytes.get(self.pos + 1) == Some(&b'>') => {
                    self.pos += 2;
                    break true;
                }
                None => {
                    return Err(format!(
                        "is not well-formed XHTML: the tag <{}> is never closed with '>'",
                        shown(element)
                    ));
                }
                Some(_) if !had_space => {
                    return Err(format!(
                        "is not well-formed XHTML: the attributes of <{}> must be separated by \
                         spaces",
                        shown(element)
                    ));
                }
                Some(_) => {}
            }
            let (name, value) = self.attribute(element)?;
            if seen.contains(&name) {
                return Err(format!(
                    "is not well-formed XHTML: <{}> has the attribute '{}' twice",
                    shown(element),
                    shown(name)
                ));
            }
            seen.push(name);
            if name == "xmlns" {
                if value != XHTML_NAMESPACE {
                    return Err(format!(
                        "puts <{}> in the namespace '{}'; a narrative is XHTML only ({})",
                        shown(element),
                        shown(&value),
                        XHTML_NAMESPACE
                    ));
                }
                namespace = Some(value);
                continue;
            }
            check_attribute(element, name, &value)?;
            if element == "img" && name == "src" {
                self.has_content = true;
            }
        };
        if is_root && namespace.is_none() {
            return Err(format!(
                "must declare the XHTML namespace: <div xmlns=\"{XHTML_NAMESPACE}\">"
            ));
        }
        if self_closing {
            return Ok(is_root);
        }
        self.open.push(element);
        Ok(false)
    }

    /// Reads `name="value"` (or single quotes) and returns the name and the decoded value.
    fn attribute(&mut self, element: &str) -> Check<(&'d str, String)> {
        let name = self.name();
        if name.is_empty() {
            return Err(format!(
                "is not well-formed XHTML: unexpected '{}' in the tag <{}>",
                shown(
                    &self.text[self.pos..]
                        .chars()
                        .next()
                        .unwrap_or(' ')
                        .to_string()
                ),
                shown(element)
            ));
        }
        self.skip_space();
        if self.bytes.get(self.pos) != Some(&b'=') {
            return Err(format!(
                "is not well-formed XHTML: the attribute '{}' of <{}> has no value; XHTML \
                 writes name=\"value\"",
                shown(name),
                shown(element)
            ));
        }
        self.pos += 1;
        self.skip_space();
        let quote = match self.bytes.get(self.pos) {
            Some(&q @ (b'"' | b'\'')) => q,
            _ => {
                return Err(format!(
                    "is not well-formed XHTML: the value of '{}' on <{}> must be quoted",
                    shown(name),
                    shown(element)
                ));
            }
        };
        let start = self.pos + 1;
        let Some(length) = self.bytes[start..].iter().position(|&b| b == quote) else {
            return Err(format!(
                "is not well-formed XHTML: the value of '{}' on <{}> is never closed",
                shown(name),
                shown(element)
            ));
        };
        let raw = &self.text[start..start + length];
        self.pos = start + length + 1;
        if raw.contains('<') {
            return Err(format!(
                "is not well-formed XHTML: the value of '{}' on <{}> contains '<'; write &lt;",
                shown(name),
                shown(element)
            ));
        }
        Ok((name, decode(raw)?))
    }

    /// Reads character data up to the next tag.
    fn text_run(&mut self) -> Check {
        let start = self.pos;
        let length = self.bytes[start..]
            .iter()
            .position(|&b| b == b'<')
            .unwrap_or(self.bytes.len() - start);
        let raw = &self.text[start..start + length];
        self.pos = start + length;
        if raw.contains("]]>") {
            return Err("is not well-formed XHTML: text may not contain ']]>'".to_string());
        }
        let text = decode(raw)?;
        if !text.chars().all(char::is_whitespace) {
            self.has_content = true;
        }
        Ok(())
    }

    /// An XML name (possibly prefixed, `xml:lang`); empty if none starts at `pos`.
    fn name(&mut self) -> &'d str {
        let start = self.pos;
        while let Some(&b) = self.bytes.get(self.pos) {
            if is_xml_space(b) || matches!(b, b'/' | b'>' | b'<' | b'=' | b'"' | b'\'' | b'&') {
                break;
            }
            self.pos += 1;
        }
        &self.text[start..self.pos]
    }

    /// Skips XML whitespace; says whether there was any.
    fn skip_space(&mut self) -> bool {
        let start = self.pos;
        while self.bytes.get(self.pos).is_some_and(|&b| is_xml_space(b)) {
            self.pos += 1;
        }
        self.pos > start
    }
}

fn check_element(element: &str) -> Check {
    if ELEMENTS.contains(&element) {
        return Ok(());
    }
    let lower = element.to_ascii_lowercase();
    if ACTIVE_ELEMENTS.contains(&lower.as_str()) {
        return Err(format!(
            "contains <{}>, which is active or embedded content; a narrative may only use \
             basic HTML formatting (txt-1)",
            shown(element)
        ));
    }
    Err(format!(
        "contains <{}>, which is not one of the basic HTML formatting elements a narrative may \
         use (txt-1)",
        shown(element)
    ))
}

fn check_attribute(element: &str, name: &str, value: &str) -> Check {
    if !ATTRIBUTES.contains(&name) {
        if name.len() > 2 && name.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("on")) {
            return Err(format!(
                "has the event-handler attribute '{}' on <{}>; a narrative may not carry active \
                 content (txt-1)",
                shown(name),
                shown(element)
            ));
        }
        return Err(format!(
            "has the attribute '{}' on <{}>, which is not one of the basic HTML formatting \
             attributes a narrative may use (txt-1)",
            shown(name),
            shown(element)
        ));
    }
    if URL_ATTRIBUTES.contains(&name)
        && let Some(scheme) = url_scheme(value)
        && !URL_SCHEMES.contains(&scheme.as_str())
    {
        return Err(format!(
            "has a '{}:' URL in the {name} of <{}>; narrative links and images may only be \
             relative or use {} (txt-1)",
            shown(&scheme),
            shown(element),
            URL_SCHEMES.join(", ")
        ));
    }
    if name == "style" {
        return check_style(element, value);
    }
    Ok(())
}

/// The scheme of a URL as a browser reads it (lower case), or None for a relative URL.
/// Browsers drop tabs and newlines anywhere and control characters and spaces at either end,
/// so `" jav&#9;ascript:"` is a `javascript:` URL.
fn url_scheme(value: &str) -> Option<String> {
    let cleaned: String = value
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let cleaned = cleaned.trim_matches(|c: char| c <= ' ');
    let (scheme, _) = cleaned.split_once(':')?;
    let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    is_scheme.then(|| scheme.to_ascii_lowercase())
}

/// A `style` may set plain CSS values: nothing that loads (`url()`, `image-set()`), runs
/// (`expression()`, `behavior`) or hides either (escapes, comments, at-rules).
fn check_style(element: &str, style: &str) -> Check {
    let refuse = |what: &str| {
        Err(format!(
            "has a style on <{}> with {what}; a narrative style may use plain CSS values and \
             the colour functions {}(), not url(), expression() or other functions (txt-1)",
            shown(element),
            CSS_FUNCTIONS.join("(), ")
        ))
    };
    if style.contains('\\') {
        return refuse("a CSS escape ('\\')");
    }
    if style.contains("/*") {
        return refuse("a CSS comment");
    }
    if style.contains('@') {
        return refuse("an at-rule ('@')");
    }
    for (at, _) in style.match_indices('(') {
        let before = style[..at].trim_end();
        let start = before
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .map_or(0, |i| i + 1);
        let function = before[start..].to_ascii_lowercase();
        if !CSS_FUNCTIONS.contains(&function.as_str()) {
            return refuse(&format!("the function '{}('", shown(&function)));
        }
    }
    Ok(())
}

/// Decodes the five XML entities and numeric character references, refusing anything else
/// (an XHTML narrative has no DTD, so `&nbsp;` is undefined) and characters XML forbids.
fn decode(raw: &str) -> Check<String> {
    if !raw.contains('&') {
        return Ok(raw.to_string());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let Some(end) = after.find(';').filter(|&end| end <= 12) else {
            return Err(
                "is not well-formed XHTML: a '&' starts no entity; write a literal '&' as &amp;"
                    .to_string(),
            );
        };
        let entity = &after[..end];
        let decoded = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => numeric_reference(entity).ok_or_else(|| {
                format!(
                    "uses the entity '&{};', which XHTML without a DTD does not define; use the \
                     five XML entities or a character reference such as &#160;",
                    shown(entity)
                )
            })?,
        };
        out.push(decoded);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `#160` or `#xA0`, if it names a character XML allows (no NUL, no C0 controls but tab,
/// newline and carriage return).
fn numeric_reference(entity: &str) -> Option<char> {
    let digits = entity.strip_prefix('#')?;
    let code = match digits.strip_prefix(['x', 'X']) {
        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().ok()?
        }
        None => return None,
    };
    let c = char::from_u32(code)?;
    let allowed = matches!(c, '\t' | '\n' | '\r') || !c.is_control();
    allowed.then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn div(inner: &str) -> String {
        format!("<div xmlns=\"{XHTML_NAMESPACE}\">{inner}</div>")
    }

    #[test]
    fn basic_formatting_is_accepted() {
        let good = [
            div("Draw blood"),
            div(
                "<p>Take <b>two</b> samples &amp; label them &#8212; see <a href=\"https://lab.example/how?x=1&amp;y=2\">the guide</a>.</p>",
            ),
            div(
                "<table border=\"1\"><thead><tr><th>A</th></tr></thead><tbody><tr><td style=\"color: rgb(1, 2, 3); font-weight:bold\">1</td></tr></tbody></table>",
            ),
            div("<img src=\"#photo\" alt=\"\"/>"),
            div(
                "<ul><li><a href=\"Patient/1\">Patient</a></li><li><a href=\"mailto:lab@example.org\">mail</a></li><li><a name=\"x\">anchor</a></li></ul>",
            ),
            div("<span xml:lang=\"en\" lang=\"en\">hi</span><br/><hr />"),
            div("<p xmlns=\"http://www.w3.org/1999/xhtml\">redundant namespace</p>"),
            format!("  \n{}\n", div("surrounding whitespace")),
            format!("<div xmlns='{XHTML_NAMESPACE}' class = \"n\">single quotes</div>"),
            div("a &gt; b, &lt;c&gt;, &quot;d&quot;, &apos;e&apos;, &#xA0;"),
            div(
                "<a href=\"urn:uuid:0b1e\">x</a><a href=\"tel:+123\">y</a><a href=\"HTTP://x\">z</a>",
            ),
            div("<a href=\"/path:with/colon\">relative with a colon later</a>"),
        ];
        for text in good {
            assert_eq!(problem(&text), None, "{text}");
        }
    }

    #[test]
    fn active_content_and_malformed_xhtml_are_refused() {
        let cases: &[(&str, String, &str)] = &[
            (
                "script",
                div("<script>alert(1)</script>"),
                "<script>, which is active",
            ),
            (
                "upper-case script",
                div("<SCRIPT>alert(1)</SCRIPT>"),
                "<SCRIPT>, which is active",
            ),
            (
                "iframe",
                div("<iframe src=\"https://x\"></iframe>"),
                "<iframe>",
            ),
            ("object", div("<object data=\"x\"></object>"), "<object>"),
            ("embed", div("<embed src=\"x\"/>"), "<embed>"),
            ("form", div("<form action=\"x\"><p>x</p></form>"), "<form>"),
            ("svg", div("<svg onload=\"x\"/>"), "<svg>"),
            ("style element", div("<style>p{}</style>"), "<style>"),
            (
                "unknown element",
                div("<blink>x</blink>"),
                "<blink>, which is not one of",
            ),
            (
                "event handler",
                div("<p onclick=\"alert(1)\">x</p>"),
                "event-handler attribute 'onclick' on <p>",
            ),
            (
                "event handler in caps",
                div("<img src=\"x\" ONERROR=\"alert(1)\"/>"),
                "event-handler attribute 'ONERROR'",
            ),
            (
                "unknown attribute",
                div("<p data-x=\"1\">x</p>"),
                "attribute 'data-x' on <p>",
            ),
            (
                "javascript href",
                div("<a href=\"javascript:alert(1)\">x</a>"),
                "'javascript:' URL in the href of <a>",
            ),
            (
                "javascript href in caps",
                div("<a href=\"JaVaScRiPt:alert(1)\">x</a>"),
                "'javascript:' URL",
            ),
            (
                "javascript with a tab entity",
                div("<a href=\"jav&#9;ascript:alert(1)\">x</a>"),
                "'javascript:' URL",
            ),
            (
                "javascript with entities",
                div("<a href=\"&#106;avascript:alert(1)\">x</a>"),
                "'javascript:' URL",
            ),
            (
                "javascript after spaces",
                div("<a href=\"  javascript:alert(1)\">x</a>"),
                "'javascript:' URL",
            ),
            (
                "vbscript",
                div("<a href=\"vbscript:msgbox\">x</a>"),
                "'vbscript:' URL",
            ),
            (
                "data src",
                div("<img src=\"data:image/svg+xml,&lt;svg/&gt;\"/>"),
                "'data:' URL in the src of <img>",
            ),
            (
                "javascript cite",
                div("<q cite=\"javascript:x\">q</q>"),
                "'javascript:' URL in the cite",
            ),
            (
                "style expression",
                div("<p style=\"width: expression(alert(1))\">x</p>"),
                "the function 'expression('",
            ),
            (
                "style url",
                div("<p style=\"background: url(https://x/y.png)\">x</p>"),
                "the function 'url('",
            ),
            (
                "style url with spaces",
                div("<p style=\"background: url (x)\">x</p>"),
                "the function 'url('",
            ),
            (
                "style escape",
                div("<p style=\"width: e\\78 pression(1)\">x</p>"),
                "a CSS escape",
            ),
            (
                "style comment",
                div("<p style=\"width: expr/**/ession(1)\">x</p>"),
                "a CSS comment",
            ),
            (
                "style import",
                div("<p style=\"@import 'x'\">x</p>"),
                "an at-rule",
            ),
            (
                "comment",
                div("<!-- x --><p>y</p>"),
                "a comment, CDATA section",
            ),
            (
                "html comment trick",
                div("<!-- --!><script>x</script> -->"),
                "a comment",
            ),
            (
                "cdata",
                div("<![CDATA[<script>x</script>]]>"),
                "a comment, CDATA",
            ),
            (
                "processing instruction",
                div("<?php echo 1 ?>x"),
                "processing instruction",
            ),
            (
                "no namespace",
                "<div>text</div>".into(),
                "must declare the XHTML namespace",
            ),
            (
                "other namespace",
                "<div xmlns=\"http://www.w3.org/2000/svg\">x</div>".into(),
                "namespace 'http://www.w3.org/2000/svg'",
            ),
            (
                "inner namespace",
                div("<p xmlns=\"urn:x\">x</p>"),
                "namespace 'urn:x'",
            ),
            ("not a div", "<p>hi</p>".into(), "single <div"),
            (
                "text outside",
                format!("{}tail", div("x")),
                "content after its closing </div>",
            ),
            (
                "second root",
                format!("{}{}", div("x"), div("y")),
                "content after its closing",
            ),
            (
                "unclosed",
                format!("<div xmlns=\"{XHTML_NAMESPACE}\"><p>x</div>"),
                "<p> is closed by </div>",
            ),
            (
                "never closed",
                format!("<div xmlns=\"{XHTML_NAMESPACE}\">x"),
                "<div> is never closed",
            ),
            (
                "void without slash",
                div("a<br>b"),
                "<br> is closed by </div>",
            ),
            (
                "stray close",
                format!("{}</p>", div("x")),
                "content after its closing",
            ),
            ("unquoted value", div("<p class=x>y</p>"), "must be quoted"),
            ("bare attribute", div("<td nowrap>y</td>"), "has no value"),
            (
                "duplicate attribute",
                div("<a href=\"x\" href=\"javascript:y\">z</a>"),
                "attribute 'href' twice",
            ),
            (
                "glued attributes",
                div("<a title=\"x\"href=\"y\">z</a>"),
                "separated by spaces",
            ),
            (
                "lone ampersand",
                div("fish & chips"),
                "'&' starts no entity",
            ),
            ("html entity", div("a&nbsp;b"), "entity '&nbsp;'"),
            ("nul reference", div("a&#0;b"), "entity '&#0;'"),
            ("lone lt", div("a < b"), "a '<' starts no tag"),
            (
                "lt in attribute",
                div("<p title=\"a<b\">x</p>"),
                "contains '<'",
            ),
            ("empty", div(""), "has no text and no image"),
            ("whitespace only", div(" <p> </p> "), "txt-2"),
            ("image without src", div("<img alt=\"x\"/>"), "txt-2"),
        ];
        for (name, text, expected) in cases {
            let problem = problem(text).unwrap_or_else(|| panic!("{name}: accepted {text}"));
            assert!(problem.contains(expected), "{name}: {problem}");
        }
    }

    #[test]
    fn long_names_are_shortened_in_diagnostics() {
        let name = "x".repeat(10_000);
        let problem = problem(&div(&format!("<{name}>y</{name}>"))).unwrap();
        assert!(problem.len() < 300, "{problem}");
    }

    #[test]
    fn deep_nesting_is_read_without_recursion() {
        let depth = 100_000;
        let text = div(&format!("{}x{}", "<b>".repeat(depth), "</b>".repeat(depth)));
        assert_eq!(problem(&text), None);
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = problem(&text);
            let _ = problem(&div(&text));
        }

        #[test]
        fn markup_like_text_never_panics(text in "[<>/=\"'&#;a-z0-9 :!?-]{0,120}") {
            let _ = problem(&div(&text));
        }
    }
}
