//! Strict parsing of one XML element (a page frame or a BOSH body) into an [`Element`].
//!
//! Stricter than XML itself, as RFC 6120 §11.1 asks of XMPP: no DTD, no comments, no processing
//! instructions, no entity references but the five predefined ones and character references.
//! Every limit is checked while reading, so hostile input costs at most `max_bytes` of work.
//!
//! Stricter than XML also where servers' parsers differ, so that nothing accepted here is refused
//! upstream or by a page (SPEC §5): names are ASCII (see [`check_qname`]); the reserved `xml` and
//! `xmlns` prefixes and namespaces cannot be bound, redeclared or used to name elements; a prefix
//! cannot be bound to the empty string; namespace names carry no references, quotes, angle
//! brackets or whitespace. The tree is bounded as written out, not only as read: `max_bytes` also
//! caps the size [`Element::write_xml`] gives the result (counted while parsing, so a namespace
//! declared once and used on thousands of children is refused before it is copied thousands of
//! times), and the bytes the tree holds stay under [`HELD_FACTOR`] × `max_bytes`.

use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{NamespaceError, ResolveResult};
use quick_xml::reader::NsReader;

use super::element::{self, Attr, Element, Node};
use super::ns;

/// The bytes a parsed tree may hold (names, namespace names, attributes, text), as a multiple
/// of `max_bytes`: every element keeps its own copy of its namespace name, so a frame within
/// the limit could otherwise hold far more than it weighs.
pub const HELD_FACTOR: usize = 4;

/// The reserved namespace of the `xmlns` prefix, which nothing may bind.
const XMLNS: &str = "http://www.w3.org/2000/xmlns/";

/// Bounds on what one parse accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest input, in bytes.
    pub max_bytes: usize,
    /// Deepest element nesting; the root is depth 1.
    pub max_depth: usize,
    /// Most attributes (namespace declarations included) on one element.
    pub max_attrs: usize,
    /// Whether an XML declaration may precede the root (HTTP bodies, not page frames).
    pub allow_declaration: bool,
}

impl Limits {
    /// Defaults for a frame from a page (SPEC §5).
    pub const PAGE: Limits = Limits {
        max_bytes: 256 * 1024,
        max_depth: 32,
        max_attrs: 64,
        allow_declaration: false,
    };
}

/// Why input was rejected. Messages are shown to the page that sent it, so they name the problem
/// without echoing the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The input is larger than [`Limits::max_bytes`].
    #[error("{size} bytes exceed the limit of {limit}")]
    TooLarge {
        /// Size of the input.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The bytes are not UTF-8.
    #[error("invalid UTF-8 at byte {0}")]
    InvalidUtf8(usize),
    /// A character XML 1.0 forbids, such as a control character.
    #[error("character U+{0:04X} is not allowed in XML")]
    ForbiddenChar(u32),
    /// Nothing but whitespace.
    #[error("no element")]
    Empty,
    /// A second element after the root was closed.
    #[error("more than one root element")]
    MultipleRoots,
    /// Non-whitespace text before or after the root.
    #[error("text outside the root element")]
    TextOutsideRoot,
    /// The input ended inside an element.
    #[error("element <{0}> is not closed")]
    Unclosed(String),
    /// A `<!DOCTYPE …>`.
    #[error("DOCTYPE is not allowed")]
    Doctype,
    /// An XML comment.
    #[error("comments are not allowed")]
    Comment,
    /// A processing instruction.
    #[error("processing instructions are not allowed")]
    ProcessingInstruction,
    /// An XML declaration where none may be.
    #[error("an XML declaration is not allowed here")]
    Declaration,
    /// A reference to an entity other than the five predefined ones.
    #[error("entity reference &{0}; is not allowed")]
    Entity(String),
    /// Nesting deeper than [`Limits::max_depth`].
    #[error("elements nested deeper than {0}")]
    TooDeep(usize),
    /// More attributes on one element than [`Limits::max_attrs`].
    #[error("more than {0} attributes on one element")]
    TooManyAttrs(usize),
    /// A prefix with no namespace declaration in scope.
    #[error("undeclared namespace prefix {0:?}")]
    UnknownPrefix(String),
    /// An element or attribute name that is not an XML name.
    #[error("invalid name {0:?}")]
    BadName(String),
    /// A name XML allows but outside the ASCII subset every server accepts (e.g. `ș`).
    #[error("name {0:?} is not ASCII")]
    NonAsciiName(String),
    /// A namespace declaration or prefix use that servers refuse: binding the reserved `xml`
    /// or `xmlns` prefixes or namespaces, naming an element with them, binding a prefix to the
    /// empty string, or a namespace name with references, quotes, `<`, `>` or whitespace.
    #[error("namespace not allowed: {0}")]
    BadNamespace(&'static str),
    /// Written out, the element would be larger than [`Limits::max_bytes`] (or hold more than
    /// [`HELD_FACTOR`] times that).
    #[error("the element expands beyond the limit of {0} bytes")]
    Expands(usize),
    /// An end tag with no open element (e.g. `</body>` breaking out of a wrapper).
    #[error("end tag </{0}> without a start tag")]
    UnmatchedEnd(String),
    /// An end tag that does not close the innermost open element.
    #[error("end tag </{found}> does not close <{expected}>")]
    MismatchedEnd {
        /// The element open at that point.
        expected: String,
        /// The end tag found.
        found: String,
    },
    /// Anything else that is not well-formed XML.
    #[error("malformed XML: {0}")]
    Malformed(String),
}

/// Parses exactly one element (whitespace around it allowed) under `limits`.
pub fn parse(input: &[u8], limits: &Limits) -> Result<Element, ParseError> {
    parse_in(input, limits, None)
}

/// Like [`parse`], for an element that appears inside another whose start tag is `scope` (the
/// text between `<` and `>`, e.g. `body xmlns='…' xmlns:stream='…'`): the namespace
/// declarations of `scope` are in force, as for a stanza read out of a BOSH body. `scope` must
/// itself have passed this parser.
pub fn parse_in(input: &[u8], limits: &Limits, scope: Option<&str>) -> Result<Element, ParseError> {
    let text = checked_text(input, limits)?;
    Parser::new(text, limits, scope)?.run(false)
}

/// Like [`parse`], keeping `reserve` bytes of the written-out size free for what the caller
/// adds before writing (e.g. the `from` a page's stanza gets): the result, so changed, still
/// writes out within `max_bytes`.
pub fn parse_reserving(
    input: &[u8],
    limits: &Limits,
    reserve: usize,
) -> Result<Element, ParseError> {
    let text = checked_text(input, limits)?;
    let mut parser = Parser::new(text, limits, None)?;
    parser.written = reserve;
    parser.run(false)
}

/// The root element's name, namespace and attributes, without its content: what an error reply
/// needs when the whole element was refused (e.g. for its size or a name deep inside). `None`
/// when even the root's start tag cannot be read under `limits`.
pub fn parse_root(input: &[u8], limits: &Limits, scope: Option<&str>) -> Option<Element> {
    let text = checked_text(input, limits).ok()?;
    Parser::new(text, limits, scope).ok()?.run(true).ok()
}

fn checked_text<'i>(input: &'i [u8], limits: &Limits) -> Result<&'i str, ParseError> {
    if input.len() > limits.max_bytes {
        return Err(ParseError::TooLarge {
            size: input.len(),
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(input).map_err(|e| ParseError::InvalidUtf8(e.valid_up_to()))?;
    check_chars(text)?;
    Ok(text)
}

struct Parser<'i> {
    reader: NsReader<&'i [u8]>,
    limits: &'i Limits,
    /// Open elements, innermost last.
    stack: Vec<Element>,
    root: Option<Element>,
    seen_anything: bool,
    /// Bytes [`Element::write_xml`] will need for what was read so far (an upper bound).
    written: usize,
    /// Bytes the tree holds so far.
    held: usize,
}

impl<'i> Parser<'i> {
    fn new(text: &'i str, limits: &'i Limits, scope: Option<&str>) -> Result<Self, ParseError> {
        let mut reader = NsReader::from_str(text);
        let config = reader.config_mut();
        config.check_end_names = true;
        config.check_comments = true;
        config.allow_dangling_amp = false;
        config.allow_unmatched_ends = false;
        if let Some(scope) = scope {
            let name_len = scope
                .find(|c: char| c.is_ascii_whitespace() || c == '/')
                .unwrap_or(scope.len());
            reader
                .resolver_mut()
                .push(&BytesStart::from_content(scope, name_len))
                .map_err(namespace_error)?;
        }
        Ok(Parser {
            reader,
            limits,
            stack: Vec::new(),
            root: None,
            seen_anything: false,
            written: 0,
            held: 0,
        })
    }

    /// Parses the input; with `root_only`, returns the root as soon as its start tag is read.
    fn run(mut self, root_only: bool) -> Result<Element, ParseError> {
        loop {
            let (ns, event) = self.reader.read_resolved_event().map_err(reader_error)?;
            let ns = match ns {
                ResolveResult::Bound(n) => Some(n.as_ref().to_owned()),
                ResolveResult::Unbound => None,
                ResolveResult::Unknown(p) => return Err(ParseError::UnknownPrefix(p)),
            };
            match event {
                Event::Start(start) => {
                    let el = self.open(&start, ns)?;
                    if root_only {
                        return Ok(el);
                    }
                    self.stack.push(el);
                }
                Event::Empty(start) => {
                    let el = self.open(&start, ns)?;
                    if root_only {
                        return Ok(el);
                    }
                    self.close(el);
                }
                Event::End(_) => {
                    // The reader has checked that the name matches the open element.
                    let el = self
                        .stack
                        .pop()
                        .ok_or_else(|| ParseError::Malformed("unexpected end tag".into()))?;
                    self.close(el);
                }
                Event::Text(t) => self.text(&t.xml_content(XmlVersion::Implicit1_0))?,
                Event::CData(t) => self.text(&t.into_inner())?,
                Event::GeneralRef(r) => {
                    let c = if r.is_char_ref() {
                        let c = r.resolve_char_ref().map_err(malformed)?.ok_or_else(|| {
                            ParseError::Malformed("bad character reference".into())
                        })?;
                        if !allowed_char(c) {
                            return Err(ParseError::ForbiddenChar(c as u32));
                        }
                        c
                    } else {
                        predefined_entity(&r)?
                    };
                    self.text(c.encode_utf8(&mut [0; 4]))?;
                }
                Event::Comment(_) => return Err(ParseError::Comment),
                Event::PI(_) => return Err(ParseError::ProcessingInstruction),
                Event::DocType(_) => return Err(ParseError::Doctype),
                Event::Decl(_) => {
                    if !self.limits.allow_declaration || self.seen_anything {
                        return Err(ParseError::Declaration);
                    }
                }
                Event::Eof => break,
            }
            self.seen_anything = true;
        }
        if let Some(open) = self.stack.first() {
            return Err(ParseError::Unclosed(open.name.clone()));
        }
        self.root.ok_or(ParseError::Empty)
    }

    /// Builds the element for a start tag, checking depth, names and attributes.
    fn open(&mut self, start: &BytesStart<'_>, ns: Option<String>) -> Result<Element, ParseError> {
        if self.root.is_some() {
            return Err(ParseError::MultipleRoots);
        }
        if self.stack.len() >= self.limits.max_depth {
            return Err(ParseError::TooDeep(self.limits.max_depth));
        }
        let qname = start.name();
        check_qname(qname.as_ref())?;
        if let Some(prefix) = qname.prefix()
            && matches!(prefix.as_ref(), "xml" | "xmlns")
        {
            return Err(ParseError::BadNamespace(
                "the xml and xmlns prefixes cannot name elements",
            ));
        }
        let mut el = Element::new(start.local_name().as_ref(), ns.unwrap_or_default());
        // Written as `<name xmlns="ns" …></name>`: the declaration only where the namespace
        // changes, as the serializer does (the root always counts it).
        let parent_ns = self.stack.last().map(|p| p.ns.as_str());
        let mut written = 5 + 2 * el.name.len();
        if parent_ns != Some(el.ns.as_str()) {
            written += 9 + element::escaped_len(&el.ns);
        }
        let mut held = el.name.len() + el.ns.len();
        let mut count = 0usize;
        for attr in start.attributes() {
            let attr = attr.map_err(malformed)?;
            count += 1;
            if count > self.limits.max_attrs {
                return Err(ParseError::TooManyAttrs(self.limits.max_attrs));
            }
            let key = attr.key.as_ref();
            if key == "xmlns" || key.starts_with("xmlns:") {
                // Applied by the namespace resolver; checked here for what it lets through.
                check_declaration(key, attr.value.as_bytes())?;
                continue;
            }
            check_qname(key)?;
            let (resolved, local) = self.reader.resolver().resolve_attribute(attr.key);
            let attr_ns = match resolved {
                ResolveResult::Bound(n) => Some(n.as_ref().to_owned()),
                ResolveResult::Unbound => None,
                ResolveResult::Unknown(p) => return Err(ParseError::UnknownPrefix(p)),
            };
            let value = attr
                .normalized_value(XmlVersion::Implicit1_0)
                .map_err(|e| match e {
                    quick_xml::Error::Escape(
                        quick_xml::escape::EscapeError::UnrecognizedEntity(_, name),
                    ) => ParseError::Entity(name),
                    other => malformed(other),
                })?;
            if let Some(c) = value.chars().find(|&c| !allowed_char(c)) {
                return Err(ParseError::ForbiddenChar(c as u32));
            }
            if el.attr_ns(attr_ns.as_deref(), local.as_ref()).is_some() {
                return Err(ParseError::Malformed(format!(
                    "duplicate attribute {:?}",
                    local.as_ref()
                )));
            }
            // ` name="value"`, plus `xml:` or a prefix declared for it (at most 40 bytes
            // besides the namespace name, whatever prefix the serializer picks).
            written += 4 + local.as_ref().len() + element::escaped_len(&value);
            held += local.as_ref().len() + value.len();
            if let Some(n) = &attr_ns {
                written += 40 + element::escaped_len(n);
                held += n.len();
            }
            el.attrs.push(Attr {
                ns: attr_ns,
                name: local.as_ref().to_owned(),
                value: value.into_owned(),
            });
        }
        self.spend(written, held)?;
        Ok(el)
    }

    /// Counts `written` bytes of output and `held` bytes of tree against the limits.
    fn spend(&mut self, written: usize, held: usize) -> Result<(), ParseError> {
        self.written += written;
        self.held += held;
        let limit = self.limits.max_bytes;
        if self.written > limit || self.held > limit.saturating_mul(HELD_FACTOR) {
            return Err(ParseError::Expands(limit));
        }
        Ok(())
    }

    /// Attaches a finished element to its parent, or makes it the root.
    fn close(&mut self, el: Element) {
        match self.stack.last_mut() {
            Some(parent) => parent.children.push(Node::Element(el)),
            None => self.root = Some(el),
        }
    }

    fn text(&mut self, t: &str) -> Result<(), ParseError> {
        if self.stack.is_empty() {
            if t.chars().all(|c| matches!(c, ' ' | '\t' | '\n' | '\r')) {
                return Ok(());
            }
            return Err(ParseError::TextOutsideRoot);
        }
        self.spend(element::escaped_len(t), t.len())?;
        let Some(parent) = self.stack.last_mut() else {
            return Err(ParseError::TextOutsideRoot);
        };
        match parent.children.last_mut() {
            Some(Node::Text(prev)) => prev.push_str(t),
            _ => parent.children.push(Node::Text(t.to_owned())),
        }
        Ok(())
    }
}

fn reader_error(e: quick_xml::Error) -> ParseError {
    use quick_xml::errors::IllFormedError;
    match e {
        quick_xml::Error::IllFormed(IllFormedError::UnmatchedEndTag(name)) => {
            ParseError::UnmatchedEnd(name)
        }
        quick_xml::Error::IllFormed(IllFormedError::MismatchedEndTag { expected, found }) => {
            ParseError::MismatchedEnd { expected, found }
        }
        quick_xml::Error::Namespace(e) => namespace_error(e),
        other => malformed(other),
    }
}

fn namespace_error(e: NamespaceError) -> ParseError {
    match e {
        NamespaceError::UnknownPrefix(p) => ParseError::UnknownPrefix(p),
        NamespaceError::InvalidXmlPrefixBind(_) | NamespaceError::InvalidXmlnsPrefixBind(_) => {
            ParseError::BadNamespace("the xml and xmlns prefixes cannot be declared")
        }
        NamespaceError::InvalidPrefixForXml(_) | NamespaceError::InvalidPrefixForXmlns(_) => {
            ParseError::BadNamespace("the reserved XML and XMLNS namespaces cannot be bound")
        }
        other => malformed(other),
    }
}

/// Checks an `xmlns` or `xmlns:prefix` attribute (raw value) against what every server accepts.
fn check_declaration(key: &str, raw: &[u8]) -> Result<(), ParseError> {
    if let Some(prefix) = key.strip_prefix("xmlns:") {
        check_qname(prefix)?;
        if prefix.contains(':') {
            return Err(ParseError::BadName(key.to_owned()));
        }
        if matches!(prefix, "xml" | "xmlns") {
            return Err(ParseError::BadNamespace(
                "the xml and xmlns prefixes cannot be declared",
            ));
        }
        if raw.is_empty() {
            return Err(ParseError::BadNamespace(
                "a prefix cannot be bound to the empty namespace",
            ));
        }
    }
    if raw == ns::XML.as_bytes() || raw == XMLNS.as_bytes() {
        return Err(ParseError::BadNamespace(
            "the reserved XML and XMLNS namespaces cannot be bound",
        ));
    }
    // The resolver takes the value raw: a reference or normalized whitespace would make the
    // namespace name differ from what other parsers see, and would not survive being written.
    if raw
        .iter()
        .any(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b' ' | b'\t' | b'\n' | b'\r'))
    {
        return Err(ParseError::BadNamespace(
            "a namespace name cannot contain references, quotes, angle brackets or whitespace",
        ));
    }
    Ok(())
}

fn malformed(e: impl std::fmt::Display) -> ParseError {
    ParseError::Malformed(e.to_string())
}

fn predefined_entity(name: &str) -> Result<char, ParseError> {
    Ok(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "apos" => '\'',
        "quot" => '"',
        other => return Err(ParseError::Entity(other.to_owned())),
    })
}

/// XML 1.0 `Char`: Rust strings already exclude surrogates.
fn allowed_char(c: char) -> bool {
    !matches!(c, '\0'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{fffe}' | '\u{ffff}')
}

fn check_chars(text: &str) -> Result<(), ParseError> {
    // Fast path over bytes: only control bytes and the EF BF BE/BF sequences can be forbidden.
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r') {
            return Err(ParseError::ForbiddenChar(u32::from(b)));
        }
        if b == 0xEF
            && bytes.get(i + 1) == Some(&0xBF)
            && matches!(bytes.get(i + 2), Some(0xBE | 0xBF))
        {
            return Err(ParseError::ForbiddenChar(if bytes[i + 2] == 0xBE {
                0xFFFE
            } else {
                0xFFFF
            }));
        }
    }
    Ok(())
}

/// Checks `prefix:local` or `local`: each part is an ASCII name, a letter or `_` followed by
/// letters, digits, `_`, `-` and `.` — the ASCII subset of XML's `NameStartChar`/`NameChar`.
/// Every XML parser accepts these; beyond ASCII, parsers differ (expat follows XML 1.0 fifth
/// edition, others the older character tables), and a name one side accepts and the other
/// refuses ends the shared session.
pub fn check_qname(q: &str) -> Result<(), ParseError> {
    if !q.is_ascii() {
        return Err(ParseError::NonAsciiName(q.to_owned()));
    }
    let mut parts = q.splitn(2, ':');
    let ok = parts.all(|p| {
        let mut bytes = p.bytes();
        bytes
            .next()
            .is_some_and(|b| b == b'_' || b.is_ascii_alphabetic())
            && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    });
    if ok {
        Ok(())
    } else {
        Err(ParseError::BadName(q.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmpp::ns;

    fn page(s: &str) -> Result<Element, ParseError> {
        parse(s.as_bytes(), &Limits::PAGE)
    }

    #[test]
    fn parses_a_stanza_with_namespaces() {
        let e = page(
            "<message xmlns='jabber:client' to='a@b' xml:lang='en'><body>x &amp; y &#x263A;</body>\
             <foo:x xmlns:foo='urn:foo' foo:k='v'/></message>",
        )
        .unwrap();
        assert!(e.is("message", ns::CLIENT));
        assert_eq!(e.attr("to"), Some("a@b"));
        assert_eq!(e.attr_ns(Some(ns::XML), "lang"), Some("en"));
        assert_eq!(
            e.child("body", ns::CLIENT).unwrap().text(),
            "x & y \u{263a}"
        );
        let x = e.child("x", "urn:foo").unwrap();
        assert_eq!(x.attr_ns(Some("urn:foo"), "k"), Some("v"));
    }

    #[test]
    fn round_trips_through_the_serializer() {
        let src = "<iq xmlns=\"jabber:client\" type=\"set\" id=\"a&quot;b\"><query xmlns=\"jabber:iq:roster\">\
                   <item jid=\"x@y\" name=\"&lt;tab&#9;&gt;\">text &amp; more</item></query></iq>";
        let e = page(src).unwrap();
        assert_eq!(e.to_xml(), src);
        assert_eq!(page(&e.to_xml()).unwrap(), e);
    }

    #[test]
    fn rejects_hostile_and_malformed_input_with_exact_errors() {
        use ParseError::*;
        let cases: &[(&str, ParseError)] = &[
            ("", Empty),
            ("   ", Empty),
            ("<a xmlns='jabber:client'/><b/>", MultipleRoots),
            ("</body><message/>", UnmatchedEnd("body".into())),
            ("<a>", Unclosed("a".into())),
            (
                "<a><b></a>",
                MismatchedEnd {
                    expected: "b".into(),
                    found: "a".into(),
                },
            ),
            (
                "<a",
                Malformed("syntax error: tag not closed: `>` not found before end of input".into()),
            ),
            ("x<a/>", TextOutsideRoot),
            ("<a/>x", TextOutsideRoot),
            ("<!DOCTYPE a [<!ENTITY x 'y'>]><a/>", Doctype),
            ("<a>&x;</a>", Entity("x".into())),
            ("<a b='&x;'/>", Entity("x".into())),
            ("<a><!-- c --></a>", Comment),
            ("<?pi x?><a/>", ProcessingInstruction),
            ("<?xml version='1.0'?><a/>", Declaration),
            ("<a>\u{1}</a>", ForbiddenChar(1)),
            ("<a>&#1;</a>", ForbiddenChar(1)),
            ("<a b='&#x1F;'/>", ForbiddenChar(0x1f)),
            ("<a>\u{ffff}</a>", ForbiddenChar(0xffff)),
            ("<p:a/>", UnknownPrefix("p".into())),
            ("<a p:b='1'/>", UnknownPrefix("p".into())),
            ("<1a/>", BadName("1a".into())),
        ];
        for (input, want) in cases {
            assert_eq!(page(input).as_ref(), Err(want), "input {input:?}");
        }
    }

    #[test]
    fn names_are_ascii_and_reserved_namespaces_stay_reserved() {
        use ParseError::*;
        let reserved = BadNamespace("the reserved XML and XMLNS namespaces cannot be bound");
        let prefixes = BadNamespace("the xml and xmlns prefixes cannot be declared");
        let elements = BadNamespace("the xml and xmlns prefixes cannot name elements");
        let cases: &[(&str, ParseError)] = &[
            ("<a><ș/></a>", NonAsciiName("ș".into())),
            ("<a><x 𝒳='1'/></a>", NonAsciiName("𝒳".into())),
            ("<a xmlns:ș='u'/>", NonAsciiName("ș".into())),
            ("<a><b:c:d xmlns:b='u'/></a>", BadName("b:c:d".into())),
            (
                "<a><b xmlns:p='http://www.w3.org/XML/1998/namespace'/></a>",
                reserved.clone(),
            ),
            (
                "<a><b xmlns='http://www.w3.org/XML/1998/namespace'/></a>",
                reserved.clone(),
            ),
            (
                "<a><b xmlns='http://www.w3.org/2000/xmlns/'/></a>",
                reserved.clone(),
            ),
            (
                "<a><b xmlns:p='http://www.w3.org/2000/xmlns/'/></a>",
                reserved,
            ),
            ("<a><b xmlns:xml='urn:x'/></a>", prefixes.clone()),
            (
                "<a><b xmlns:xml='http://www.w3.org/XML/1998/namespace'/></a>",
                prefixes.clone(),
            ),
            ("<a><b xmlns:xmlns='urn:x'/></a>", prefixes),
            ("<a><xml:b/></a>", elements.clone()),
            ("<a><xmlns:b/></a>", elements),
            (
                "<a><b xmlns:p=''/></a>",
                BadNamespace("a prefix cannot be bound to the empty namespace"),
            ),
            (
                "<a xmlns='u&amp;v'/>",
                BadNamespace(
                    "a namespace name cannot contain references, quotes, angle brackets or whitespace",
                ),
            ),
            (
                "<a xmlns='u v'/>",
                BadNamespace(
                    "a namespace name cannot contain references, quotes, angle brackets or whitespace",
                ),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(page(input).as_ref(), Err(want), "input {input:?}");
        }
        // Still fine: xml:lang, an undeclared default namespace, a prefix bound once and used.
        assert!(
            page("<a xml:lang='en' xmlns='u'><b xmlns=''/><p:c xmlns:p='v' p:k='1'/></a>").is_ok()
        );
    }

    #[test]
    fn the_written_size_is_bounded_by_the_limit() {
        let limits = Limits {
            max_bytes: 4096,
            ..Limits::PAGE
        };
        // Declared once, used on many children: small as read, large as written (each child
        // declares it) — refused.
        let uri = format!("urn:{}", "u".repeat(200));
        let frame = format!("<a xmlns:p='{uri}'>{}</a>", "<p:c/>".repeat(100));
        assert!(frame.len() < 1024);
        assert_eq!(
            parse(frame.as_bytes(), &limits),
            Err(ParseError::Expands(4096))
        );
        // Inherited, it is not written again, but each element holds a copy: bounded too.
        let frame = format!("<a xmlns='{uri}'>{}</a>", "<c/>".repeat(200));
        assert_eq!(
            parse(frame.as_bytes(), &limits),
            Err(ParseError::Expands(4096))
        );
        // Escaping counts: 1000 `"` are 6000 bytes written.
        let frame = format!("<a v='{}'/>", "\"".repeat(1000));
        assert_eq!(
            parse(frame.as_bytes(), &limits),
            Err(ParseError::Expands(4096))
        );
        let ok = format!("<a xmlns:p='{uri}'>{}</a>", "<p:c/>".repeat(10));
        let el = parse(ok.as_bytes(), &limits).unwrap();
        assert!(el.to_xml().len() <= 4096);
    }

    #[test]
    fn the_root_alone_can_be_read_for_an_error_reply() {
        let root = parse_root(
            b"<iq xmlns='jabber:client' id='1' type='get'><\xc8\x99/></iq>",
            &Limits::PAGE,
            None,
        )
        .unwrap();
        assert_eq!(root.attr("id"), Some("1"));
        assert!(root.children.is_empty());
        assert_eq!(parse_root("<ș/>".as_bytes(), &Limits::PAGE, None), None);
    }

    #[test]
    fn rejects_invalid_utf8() {
        assert_eq!(
            parse(b"<a>\xff</a>", &Limits::PAGE),
            Err(ParseError::InvalidUtf8(3))
        );
    }

    #[test]
    fn enforces_limits() {
        let limits = Limits {
            max_bytes: 64,
            max_depth: 3,
            max_attrs: 2,
            allow_declaration: false,
        };
        assert_eq!(
            parse(&[b' '; 65], &limits),
            Err(ParseError::TooLarge {
                size: 65,
                limit: 64
            })
        );
        assert_eq!(
            parse(b"<a><b><c><d/></c></b></a>", &limits),
            Err(ParseError::TooDeep(3))
        );
        assert!(parse(b"<a><b><c/></b></a>", &limits).is_ok());
        assert_eq!(
            parse(b"<a x='1' y='2' z='3'/>", &limits),
            Err(ParseError::TooManyAttrs(2))
        );
    }

    #[test]
    fn declaration_allowed_only_where_asked_and_only_first() {
        let mut limits = Limits::PAGE;
        limits.allow_declaration = true;
        assert!(parse(b"<?xml version='1.0' encoding='UTF-8'?><a/>", &limits).is_ok());
        assert_eq!(
            parse(b"<a/><?xml version='1.0'?>", &limits),
            Err(ParseError::Declaration)
        );
    }

    #[test]
    fn duplicate_attributes_are_rejected() {
        assert!(matches!(
            page("<a x='1' x='2'/>"),
            Err(ParseError::Malformed(_))
        ));
        assert!(matches!(
            page("<a xmlns:p='u' xmlns:q='u' p:x='1' q:x='2'/>"),
            Err(ParseError::Malformed(_))
        ));
    }
}
