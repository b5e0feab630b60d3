//! The in-memory XML element used for every stanza, and its serializer.
//!
//! Everything boshmux sends anywhere is written from this tree, never spliced from received bytes:
//! the serializer declares each namespace where it changes, so an element cut out of a BOSH body or
//! a page frame is complete on its own.
//!
//! Elements are written in the default-namespace style clients expect (`<x xmlns="…">`, never a
//! prefix); attributes in a namespace get a prefix declared once, on the first element written
//! that needs it, and reused by its descendants. The size of the output is bounded by what
//! the parser counted ([`super::parse`]), so no input expands past the stanza limit.

use std::fmt::{self, Write as _};

use super::ns;

/// An XML element with its resolved namespace. Unknown children are kept as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Element {
    /// Local name, without any prefix.
    pub name: String,
    /// Namespace URI the element is in (empty for no namespace).
    pub ns: String,
    /// Attributes in document order, `xmlns` declarations excluded.
    pub attrs: Vec<Attr>,
    /// Child nodes in document order.
    pub children: Vec<Node>,
}

/// One attribute. `ns` is `None` for the usual unprefixed attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Namespace of a prefixed attribute (`xml:lang` has [`ns::XML`]).
    pub ns: Option<String>,
    /// Local name.
    pub name: String,
    /// Unescaped value.
    pub value: String,
}

/// A child of an element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// A child element.
    Element(Element),
    /// Character data, unescaped.
    Text(String),
}

impl Element {
    /// An empty element `name` in namespace `ns`.
    pub fn new(name: impl Into<String>, ns: impl Into<String>) -> Self {
        Element {
            name: name.into(),
            ns: ns.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Builder form of [`Element::set_attr`].
    #[must_use]
    pub fn with_attr(mut self, name: &str, value: impl Into<String>) -> Self {
        self.set_attr(name, value);
        self
    }

    /// Builder form of [`Element::push_child`].
    #[must_use]
    pub fn with_child(mut self, child: Element) -> Self {
        self.push_child(child);
        self
    }

    /// Builder form of [`Element::push_text`].
    #[must_use]
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.push_text(text);
        self
    }

    /// True when this is `name` in namespace `ns`.
    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    /// The value of the unprefixed attribute `name`.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attr_ns(None, name)
    }

    /// The value of attribute `name` in namespace `ns` (`None` for unprefixed).
    pub fn attr_ns(&self, ns: Option<&str>, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.name == name && a.ns.as_deref() == ns)
            .map(|a| a.value.as_str())
    }

    /// Sets (or replaces) the unprefixed attribute `name`.
    pub fn set_attr(&mut self, name: &str, value: impl Into<String>) {
        self.set_attr_ns(None, name, value);
    }

    /// Sets (or replaces) attribute `name` in namespace `ns`.
    pub fn set_attr_ns(&mut self, ns: Option<&str>, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self
            .attrs
            .iter_mut()
            .find(|a| a.name == name && a.ns.as_deref() == ns)
        {
            Some(a) => a.value = value,
            None => self.attrs.push(Attr {
                ns: ns.map(str::to_owned),
                name: name.to_owned(),
                value,
            }),
        }
    }

    /// Removes the unprefixed attribute `name`, returning its value.
    pub fn remove_attr(&mut self, name: &str) -> Option<String> {
        let i = self
            .attrs
            .iter()
            .position(|a| a.name == name && a.ns.is_none())?;
        Some(self.attrs.remove(i).value)
    }

    /// Appends a child element.
    pub fn push_child(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    /// Appends character data.
    pub fn push_text(&mut self, text: impl Into<String>) {
        let text = text.into();
        if !text.is_empty() {
            self.children.push(Node::Text(text));
        }
    }

    /// The child elements, in order.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The first child element `name` in namespace `ns`.
    pub fn child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(name, ns))
    }

    /// The concatenated character data directly inside this element.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                out.push_str(t);
            }
        }
        out
    }

    /// Serializes as a standalone fragment: the root declares its namespace.
    pub fn to_xml(&self) -> String {
        let mut out = String::with_capacity(128);
        self.write_xml(&mut out, "");
        out
    }

    /// Serializes into `out`, declaring the default namespace wherever it differs from
    /// `parent_ns` (the default namespace in scope where this element is written).
    pub fn write_xml(&self, out: &mut String, parent_ns: &str) {
        self.write_scoped(out, parent_ns, &mut Vec::new());
    }

    /// `scope` holds the attribute namespaces the ancestors being written declared, with their
    /// prefixes; what this element adds is removed again when it is closed.
    fn write_scoped<'a>(
        &'a self,
        out: &mut String,
        parent_ns: &str,
        scope: &mut Vec<Declared<'a>>,
    ) {
        let mark = scope.len();
        out.push('<');
        out.push_str(&self.name);
        if self.ns != parent_ns {
            out.push_str(" xmlns=\"");
            escape_attr(out, &self.ns);
            out.push('"');
        }
        for a in &self.attrs {
            out.push(' ');
            match a.ns.as_deref() {
                None => {}
                Some(ns::XML) => out.push_str("xml:"),
                Some(uri) => {
                    let prefix = match scope.iter().find(|d| d.ns == uri) {
                        Some(d) => d.prefix,
                        None => {
                            let prefix = if uri == ns::XBOSH {
                                // Named `xmpp:` as XEP-0206 writes it.
                                Prefix::Xmpp
                            } else {
                                let n = scope.iter().filter(|d| d.prefix != Prefix::Xmpp).count();
                                Prefix::Numbered(n)
                            };
                            out.push_str("xmlns:");
                            prefix.write(out);
                            out.push_str("=\"");
                            escape_attr(out, uri);
                            out.push_str("\" ");
                            scope.push(Declared { ns: uri, prefix });
                            prefix
                        }
                    };
                    prefix.write(out);
                    out.push(':');
                }
            }
            out.push_str(&a.name);
            out.push_str("=\"");
            escape_attr(out, &a.value);
            out.push('"');
        }
        if self.children.is_empty() {
            out.push_str("/>");
        } else {
            out.push('>');
            for n in &self.children {
                match n {
                    Node::Element(e) => e.write_scoped(out, &self.ns, scope),
                    Node::Text(t) => escape_text(out, t),
                }
            }
            out.push_str("</");
            out.push_str(&self.name);
            out.push('>');
        }
        scope.truncate(mark);
    }
}

/// An attribute namespace declared on an element being written.
struct Declared<'a> {
    ns: &'a str,
    prefix: Prefix,
}

/// The prefixes the serializer gives attribute namespaces: `xmpp` for XEP-0206's, `aN`
/// otherwise, numbered so that no declaration in scope is ever shadowed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prefix {
    Xmpp,
    Numbered(usize),
}

impl Prefix {
    fn write(self, out: &mut String) {
        match self {
            Prefix::Xmpp => out.push_str("xmpp"),
            Prefix::Numbered(n) => {
                let _ = write!(out, "a{n}");
            }
        }
    }
}

/// An upper bound of the bytes `s` takes once escaped, as text or as an attribute value.
pub(crate) fn escaped_len(s: &str) -> usize {
    s.len()
        + s.bytes()
            .map(|b| match b {
                b'"' => 5,
                b'&' | b'\n' | b'\r' => 4,
                b'<' | b'>' | b'\t' => 3,
                _ => 0,
            })
            .sum::<usize>()
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_xml())
    }
}

/// Escapes character data: `&`, `<` and `>` (the last so `]]>` can never appear).
fn escape_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            // A literal CR would be normalized to LF by the reader; keep it as sent.
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// Escapes an attribute value for double quotes. Whitespace other than space is written as a
/// character reference, since a reader would otherwise normalize it to a space.
fn escape_attr(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_namespace_only_where_it_changes() {
        let m = Element::new("message", ns::CLIENT)
            .with_attr("to", "a@b")
            .with_child(Element::new("body", ns::CLIENT).with_text("hi <&> \"x\""))
            .with_child(Element::new(
                "active",
                "http://jabber.org/protocol/chatstates",
            ));
        assert_eq!(
            m.to_xml(),
            "<message xmlns=\"jabber:client\" to=\"a@b\"><body>hi &lt;&amp;&gt; \"x\"</body>\
             <active xmlns=\"http://jabber.org/protocol/chatstates\"/></message>"
        );
    }

    #[test]
    fn escapes_attribute_values() {
        let e = Element::new("x", "").with_attr("v", "a\"b<c&d\te\nf");
        assert_eq!(e.to_xml(), "<x v=\"a&quot;b&lt;c&amp;d&#9;e&#10;f\"/>");
    }

    #[test]
    fn prefixed_attributes_get_declarations() {
        let mut e = Element::new("body", ns::HTTPBIND);
        e.set_attr_ns(Some(ns::XML), "lang", "en");
        e.set_attr_ns(Some(ns::XBOSH), "version", "1.0");
        e.set_attr_ns(Some("urn:other"), "k", "v");
        assert_eq!(
            e.to_xml(),
            "<body xmlns=\"http://jabber.org/protocol/httpbind\" xml:lang=\"en\" \
             xmlns:xmpp=\"urn:xmpp:xbosh\" xmpp:version=\"1.0\" xmlns:a0=\"urn:other\" a0:k=\"v\"/>"
        );
        assert_eq!(e.attr_ns(Some(ns::XBOSH), "version"), Some("1.0"));
        assert_eq!(e.attr("version"), None);
    }

    #[test]
    fn each_attribute_namespace_is_declared_once_in_scope() {
        let mut inner = Element::new("c", "urn:c");
        inner.set_attr_ns(Some("urn:other"), "k", "1");
        inner.set_attr_ns(Some("urn:third"), "m", "2");
        let mut e = Element::new("body", ns::HTTPBIND)
            .with_child(inner.clone())
            .with_child(inner);
        e.set_attr_ns(Some(ns::XBOSH), "version", "1.0");
        e.set_attr_ns(Some(ns::XBOSH), "restart", "true");
        e.set_attr_ns(Some("urn:other"), "k", "v");
        e.set_attr_ns(Some("urn:other"), "l", "w");
        assert_eq!(
            e.to_xml(),
            "<body xmlns=\"http://jabber.org/protocol/httpbind\" \
             xmlns:xmpp=\"urn:xmpp:xbosh\" xmpp:version=\"1.0\" xmpp:restart=\"true\" \
             xmlns:a0=\"urn:other\" a0:k=\"v\" a0:l=\"w\">\
             <c xmlns=\"urn:c\" a0:k=\"1\" xmlns:a1=\"urn:third\" a1:m=\"2\"/>\
             <c xmlns=\"urn:c\" a0:k=\"1\" xmlns:a1=\"urn:third\" a1:m=\"2\"/></body>"
        );
        assert_eq!(
            crate::xmpp::parse(e.to_xml().as_bytes(), &crate::xmpp::Limits::PAGE),
            Ok(e)
        );
    }

    #[test]
    fn set_attr_replaces() {
        let mut e = Element::new("iq", ns::CLIENT).with_attr("id", "1");
        e.set_attr("id", "2");
        assert_eq!(e.attrs.len(), 1);
        assert_eq!(e.remove_attr("id").as_deref(), Some("2"));
        assert!(e.attrs.is_empty());
    }
}
