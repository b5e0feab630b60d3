//! Reading a BOSH response as it arrives, one stanza at a time.
//!
//! A response is never held whole: the bytes are scanned for the `<body/>` start tag and for the
//! boundaries of each element it carries, and each stanza is parsed on its own (with the
//! namespace declarations of the body in scope) under the same rules as a page's frame
//! ([`crate::xmpp::parse`]). A stanza over the per-stanza cap, or one those rules refuse, is
//! dropped and reported in [`Response::dropped`] — the stanzas before and after it are kept, in
//! order, and the response as a whole still counts as answered: repeating the request would
//! only bring the same stanza again. Memory is bounded by the cap for the stanza being read plus
//! [`ReadLimits::body_bytes`] for the stanzas kept.
//!
//! Only a response whose framing is broken (not a `<body/>`, cut short, comments, DOCTYPE or
//! processing instructions after the XML declaration) is an error, which the caller treats as a
//! transport failure (e.g. a proxy cut the response).

use crate::xmpp::{self, Element, Limits, ParseError, ns};

use super::body::{Body, BodyError};

/// Bounds on what one response may make us hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    /// Largest stanza, in bytes as received and as written out again; larger ones are dropped.
    pub stanza_bytes: usize,
    /// Most bytes of stanzas kept from one response; stanzas beyond are dropped.
    pub body_bytes: usize,
}

impl ReadLimits {
    /// Defaults: stanzas up to 512 KiB (twice the default page stanza limit, as server-built
    /// results such as a large roster may exceed what a client may send), 16 MiB per response.
    pub const DEFAULT: ReadLimits = ReadLimits {
        stanza_bytes: 512 * 1024,
        body_bytes: 16 * 1024 * 1024,
    };
}

/// The largest `<body>` start tag accepted.
const MAX_BODY_TAG: usize = 64 * 1024;

/// Why a stanza in a response was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Over [`ReadLimits::stanza_bytes`] as received, or once written out.
    TooLarge,
    /// The response already gave [`ReadLimits::body_bytes`] of stanzas.
    BodyFull,
    /// Refused by the strict parser (e.g. a non-ASCII name, a reserved namespace binding),
    /// which a page's parser could refuse too.
    Invalid,
}

impl DropReason {
    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::BodyFull => "body_full",
            DropReason::Invalid => "invalid",
        }
    }
}

/// A stanza dropped from a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Why.
    pub reason: DropReason,
    /// The stanza's root element without its content (name, namespace, attributes), when its
    /// start tag could be read: enough to answer the sender with an error.
    pub root: Option<Element>,
}

/// A response as read: the body with the stanzas kept, and what was dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The `<body/>` with the stanzas kept, in order.
    pub body: Body,
    /// The stanzas left out, in order.
    pub dropped: Vec<Dropped>,
}

/// Where the scanner is in the XML syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    /// Character data.
    Text,
    /// Just after `<`.
    Lt,
    /// Inside a start or end tag; `quote` is the open quote (0 outside values), `slash` whether
    /// the last byte outside a value was `/`.
    Tag { end: bool, quote: u8, slash: bool },
    /// Inside `<?…?>`; `q` whether the last byte was `?`.
    Pi { q: bool },
    /// After `<!`: how much of `[CDATA[` matched.
    Bang(u8),
    /// Inside a CDATA section: how many `]` just passed (at most 2).
    CData(u8),
}

/// Where the reader is in the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the `<body>` start tag.
    Prolog,
    /// Inside the body.
    Body,
    /// After the body ended.
    Done,
}

/// Incremental reader of one response: [`feed`](Self::feed) the bytes as they come (in chunks
/// of any size), then [`finish`](Self::finish).
#[derive(Debug)]
pub struct BodyReader {
    limits: ReadLimits,
    stanza: Limits,
    phase: Phase,
    tok: Tok,
    /// Open elements inside the body (0 between stanzas).
    depth: usize,
    /// Bytes of the tag or stanza being read.
    buf: Vec<u8>,
    /// Whether the current bytes go into `buf`.
    capturing: bool,
    /// The current stanza is over the cap: its bytes are scanned, not kept.
    skipping: bool,
    /// Where the current stanza's root start tag ends in `buf`.
    root_end: Option<usize>,
    /// The body's start tag without `<`, `>` (and a final `/`): the namespace scope of stanzas.
    scope: String,
    body: Option<Element>,
    kept_bytes: usize,
    children: Vec<Element>,
    dropped: Vec<Dropped>,
    /// Any non-whitespace seen (to tell an empty response from a cut one).
    seen: bool,
    /// The XML declaration was read.
    declared: bool,
}

impl BodyReader {
    /// A reader for one response.
    pub fn new(limits: ReadLimits) -> Self {
        BodyReader {
            limits,
            stanza: Limits {
                max_bytes: limits.stanza_bytes,
                ..Limits::PAGE
            },
            phase: Phase::Prolog,
            tok: Tok::Text,
            depth: 0,
            buf: Vec::new(),
            capturing: false,
            skipping: false,
            root_end: None,
            scope: String::new(),
            body: None,
            kept_bytes: 0,
            children: Vec::new(),
            dropped: Vec::new(),
            seen: false,
            declared: false,
        }
    }

    /// Reads the next bytes of the response.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        for &b in chunk {
            self.byte(b)?;
        }
        Ok(())
    }

    /// The body, once the whole response was fed.
    pub fn finish(self) -> Result<Response, BodyError> {
        match (self.phase, self.body) {
            (Phase::Done, Some(mut element)) => {
                element
                    .children
                    .extend(self.children.into_iter().map(xmpp::Node::Element));
                Ok(Response {
                    body: Body { element },
                    dropped: self.dropped,
                })
            }
            (_, Some(body)) => Err(ParseError::Unclosed(body.name).into()),
            (_, None) if !self.seen => Err(ParseError::Empty.into()),
            (_, None) => Err(ParseError::Malformed("response ends inside a tag".into()).into()),
        }
    }

    fn byte(&mut self, b: u8) -> Result<(), BodyError> {
        if self.tok == Tok::Text && b == b'<' && self.depth == 0 {
            // A tag outside any stanza: the body's, a stanza's root, or the body's end.
            self.buf.clear();
            self.capturing = true;
            self.skipping = false;
            self.root_end = None;
        }
        if self.capturing && !self.skipping {
            self.buf.push(b);
            self.check_size()?;
        }
        match self.tok {
            Tok::Text => {
                if b == b'<' {
                    self.tok = Tok::Lt;
                    self.seen = true;
                } else if self.depth == 0 && !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                    // Text between stanzas is ignored (as it was in the tree), outside the
                    // body it is an error.
                    if self.phase != Phase::Body {
                        return Err(ParseError::TextOutsideRoot.into());
                    }
                }
            }
            Tok::Lt => {
                self.tok = match b {
                    b'/' => Tok::Tag {
                        end: true,
                        quote: 0,
                        slash: false,
                    },
                    b'?' => Tok::Pi { q: false },
                    b'!' => Tok::Bang(0),
                    _ => Tok::Tag {
                        end: false,
                        quote: 0,
                        slash: false,
                    },
                };
            }
            Tok::Tag { end, quote, slash } => {
                if quote != 0 {
                    if b == quote {
                        self.tok = Tok::Tag {
                            end,
                            quote: 0,
                            slash: false,
                        };
                    }
                } else if b == b'"' || b == b'\'' {
                    self.tok = Tok::Tag {
                        end,
                        quote: b,
                        slash: false,
                    };
                } else if b == b'>' {
                    self.tok = Tok::Text;
                    self.tag(end, slash)?;
                } else {
                    self.tok = Tok::Tag {
                        end,
                        quote: 0,
                        slash: b == b'/',
                    };
                }
            }
            Tok::Pi { q } => {
                if q && b == b'>' {
                    // Only the XML declaration, once, before the body.
                    if self.phase != Phase::Prolog
                        || self.declared
                        || !self.buf.starts_with(b"<?xml")
                    {
                        return Err(ParseError::ProcessingInstruction.into());
                    }
                    self.declared = true;
                    self.tok = Tok::Text;
                    self.capturing = false;
                    self.buf.clear();
                } else {
                    self.tok = Tok::Pi { q: b == b'?' };
                }
            }
            Tok::Bang(n) => {
                const CDATA: &[u8] = b"[CDATA[";
                if b != CDATA[usize::from(n)] {
                    return Err(if n == 0 && b == b'-' {
                        ParseError::Comment
                    } else if n == 0 && b == b'D' {
                        ParseError::Doctype
                    } else {
                        ParseError::Malformed("unexpected markup after `<!`".into())
                    }
                    .into());
                }
                if usize::from(n) + 1 == CDATA.len() {
                    if self.depth == 0 {
                        return Err(ParseError::TextOutsideRoot.into());
                    }
                    self.tok = Tok::CData(0);
                } else {
                    self.tok = Tok::Bang(n + 1);
                }
            }
            Tok::CData(k) => {
                self.tok = match b {
                    b']' => Tok::CData((k + 1).min(2)),
                    b'>' if k == 2 => Tok::Text,
                    _ => Tok::CData(0),
                };
            }
        }
        Ok(())
    }

    /// Switches to skipping once the stanza being read is over the cap; a body start tag over
    /// its own cap is an error.
    fn check_size(&mut self) -> Result<(), BodyError> {
        match self.phase {
            Phase::Prolog if self.buf.len() > MAX_BODY_TAG => Err(ParseError::TooLarge {
                size: self.buf.len(),
                limit: MAX_BODY_TAG,
            }
            .into()),
            Phase::Body if self.buf.len() > self.limits.stanza_bytes => {
                self.skipping = true;
                // Keep the root's start tag, if it was complete, for an error reply.
                self.buf.truncate(self.root_end.unwrap_or(0));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// A tag ended (`>` read).
    fn tag(&mut self, end: bool, empty: bool) -> Result<(), BodyError> {
        match self.phase {
            Phase::Prolog => {
                if end {
                    return Err(ParseError::UnmatchedEnd(String::new()).into());
                }
                self.open_body(empty)
            }
            Phase::Done => Err(ParseError::MultipleRoots.into()),
            Phase::Body => {
                if end {
                    if self.depth == 0 {
                        self.phase = Phase::Done;
                        self.capturing = false;
                        return Ok(());
                    }
                    self.depth -= 1;
                    if self.depth == 0 {
                        self.stanza_done();
                    }
                } else if empty {
                    if self.depth == 0 {
                        if !self.skipping {
                            self.root_end = Some(self.buf.len());
                        }
                        self.stanza_done();
                    }
                } else {
                    self.depth += 1;
                    if self.depth == 1 && !self.skipping {
                        self.root_end = Some(self.buf.len());
                    }
                }
                Ok(())
            }
        }
    }

    /// The `<body>` start tag is in `buf`.
    fn open_body(&mut self, empty: bool) -> Result<(), BodyError> {
        if self.buf.len() > MAX_BODY_TAG {
            return Err(ParseError::TooLarge {
                size: self.buf.len(),
                limit: MAX_BODY_TAG,
            }
            .into());
        }
        let tag =
            std::str::from_utf8(&self.buf).map_err(|e| ParseError::InvalidUtf8(e.valid_up_to()))?;
        let inner = &tag[1..tag.len() - 1];
        let inner = if empty {
            &inner[..inner.len() - 1]
        } else {
            inner
        };
        let element = xmpp::parse(
            format!("<{inner}/>").as_bytes(),
            &Limits {
                max_bytes: MAX_BODY_TAG + 3,
                max_depth: 1,
                max_attrs: 256,
                allow_declaration: false,
            },
        )?;
        if !element.is("body", ns::HTTPBIND) {
            return Err(BodyError::NotBody {
                name: element.name,
                ns: element.ns,
            });
        }
        self.scope = inner.to_owned();
        self.body = Some(element);
        self.phase = if empty { Phase::Done } else { Phase::Body };
        self.capturing = false;
        self.buf.clear();
        Ok(())
    }

    /// A stanza ended: parse it, or record why it is dropped.
    fn stanza_done(&mut self) {
        self.capturing = false;
        let bytes = std::mem::take(&mut self.buf);
        let root = |this: &Self, bytes: &[u8]| {
            this.root_end.and_then(|end| {
                xmpp::parse::parse_root(
                    &bytes[..end.min(bytes.len())],
                    &this.stanza,
                    Some(&this.scope),
                )
            })
        };
        let reason = if self.skipping {
            DropReason::TooLarge
        } else if self.kept_bytes + bytes.len() > self.limits.body_bytes {
            DropReason::BodyFull
        } else {
            match xmpp::parse::parse_in(&bytes, &self.stanza, Some(&self.scope)) {
                Ok(el) => {
                    self.kept_bytes += bytes.len();
                    self.children.push(el);
                    self.buf = bytes;
                    self.buf.clear();
                    return;
                }
                Err(ParseError::Expands(_) | ParseError::TooLarge { .. }) => DropReason::TooLarge,
                Err(_) => DropReason::Invalid,
            }
        };
        let root = root(self, &bytes);
        self.dropped.push(Dropped { reason, root });
        self.skipping = false;
        self.buf = bytes;
        self.buf.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: ReadLimits = ReadLimits {
        stanza_bytes: 200,
        body_bytes: 1000,
    };

    /// Reads `input` fed in two chunks split at every byte (and in one), checking that every
    /// split gives the same result; returns it.
    fn read(input: &str, limits: ReadLimits) -> Result<Response, BodyError> {
        let whole = {
            let mut r = BodyReader::new(limits);
            r.feed(input.as_bytes()).and_then(|()| r.finish())
        };
        for split in 0..=input.len() {
            let mut r = BodyReader::new(limits);
            let (a, b) = input.as_bytes().split_at(split);
            let got = r.feed(a).and_then(|()| r.feed(b)).and_then(|()| r.finish());
            assert_eq!(got, whole, "split at {split} of {input:?}");
        }
        // One byte at a time, too.
        let mut r = BodyReader::new(limits);
        let mut got = Ok(());
        for b in input.as_bytes() {
            got = got.and_then(|()| r.feed(std::slice::from_ref(b)));
        }
        assert_eq!(got.and_then(|()| r.finish()), whole, "bytewise {input:?}");
        whole
    }

    fn names(r: &Response) -> Vec<String> {
        r.body
            .children()
            .map(|e| e.attr("id").unwrap_or(&e.name).to_owned())
            .collect()
    }

    const OPEN: &str = "<?xml version='1.0'?><body xmlns='http://jabber.org/protocol/httpbind' \
                        xmlns:stream='http://etherx.jabber.org/streams' sid='s'>";

    #[test]
    fn stanzas_keep_order_and_the_body_scope() {
        let input = format!(
            "{OPEN}<message xmlns='jabber:client' id='1'><body>a &lt; b <![CDATA[<x>]]]]></body></message>\
             <stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>\
             <iq xmlns='jabber:client' id='2' type='result' a='>'/></body>"
        );
        let r = read(&input, SMALL).unwrap();
        assert_eq!(names(&r), ["1", "features", "2"]);
        assert!(r.dropped.is_empty());
        let kids: Vec<&Element> = r.body.children().collect();
        assert_eq!(
            kids[0].child("body", ns::CLIENT).unwrap().text(),
            "a < b <x>]]"
        );
        assert!(kids[1].is("features", ns::STREAM));
        assert_eq!(r.body.element.attr("sid"), Some("s"));
    }

    #[test]
    fn an_oversized_stanza_is_dropped_between_its_neighbours() {
        let big = "x".repeat(300);
        let input = format!(
            "{OPEN}<message xmlns='jabber:client' id='1'/>\
             <message xmlns='jabber:client' id='2' from='b@x/r' type='chat'><body>{big}</body></message>\
             <message xmlns='jabber:client' id='3'/></body>"
        );
        let r = read(&input, SMALL).unwrap();
        assert_eq!(names(&r), ["1", "3"]);
        assert_eq!(r.dropped.len(), 1);
        assert_eq!(r.dropped[0].reason, DropReason::TooLarge);
        let root = r.dropped[0].root.as_ref().unwrap();
        assert_eq!(
            (root.attr("id"), root.attr("from")),
            (Some("2"), Some("b@x/r"))
        );
        assert!(root.children.is_empty());
    }

    #[test]
    fn a_stanza_expanding_past_the_cap_is_dropped() {
        // Within the cap as received, but each child inherits a long namespace it would be
        // written (and held) with.
        let ns_name = format!("urn:{}", "n".repeat(60));
        let input = format!(
            "{OPEN}<message xmlns='jabber:client' id='1' xmlns:p='{ns_name}'><p:a/><p:a/><p:a/></message>\
             <message xmlns='jabber:client' id='2'/></body>"
        );
        let r = read(&input, SMALL).unwrap();
        assert_eq!(names(&r), ["2"]);
        assert_eq!(r.dropped[0].reason, DropReason::TooLarge);
    }

    #[test]
    fn a_stanza_the_strict_parser_refuses_is_dropped() {
        let input = format!(
            "{OPEN}<message xmlns='jabber:client' id='1'><ș/></message>\
             <message xmlns='jabber:client' id='2' xmlns:x='http://www.w3.org/XML/1998/namespace'/>\
             <message xmlns='jabber:client' id='3'/></body>"
        );
        let r = read(&input, SMALL).unwrap();
        assert_eq!(names(&r), ["3"]);
        assert_eq!(
            r.dropped.iter().map(|d| d.reason).collect::<Vec<_>>(),
            [DropReason::Invalid, DropReason::Invalid]
        );
        assert_eq!(r.dropped[0].root.as_ref().unwrap().attr("id"), Some("1"));
    }

    #[test]
    fn stanzas_beyond_the_body_budget_are_dropped() {
        let one = format!(
            "<message xmlns='jabber:client' id='m'><body>{}</body></message>",
            "y".repeat(100)
        );
        assert_eq!(one.len(), 161);
        let input = format!("{OPEN}{}</body>", one.repeat(8));
        let r = read(&input, SMALL).unwrap();
        assert_eq!(r.body.children().count(), 6);
        assert_eq!(r.dropped.len(), 2);
        assert!(r.dropped.iter().all(|d| d.reason == DropReason::BodyFull));
    }

    #[test]
    fn empty_and_terminate_bodies() {
        let r = read(
            "<body type='terminate' condition='x' xmlns='http://jabber.org/protocol/httpbind'/>",
            SMALL,
        )
        .unwrap();
        assert_eq!(r.body.condition(), Some("x"));
        assert_eq!(r.body.children().count(), 0);
    }

    #[test]
    fn broken_framing_is_an_error() {
        use ParseError::*;
        let cases: &[(&str, BodyError)] = &[
            ("", Empty.into()),
            ("  ", Empty.into()),
            (
                "<body xmlns='http://jabber.org/protocol/httpbind'>",
                Unclosed("body".into()).into(),
            ),
            (
                "<body xmlns='http://jabber.org/protocol/httpbind'><message xmlns='jabber:client'>",
                Unclosed("body".into()).into(),
            ),
            (
                "<body xmlns='http://jabber.org/protocol/httpbind'/><x/>",
                MultipleRoots.into(),
            ),
            (
                "<body xmlns='http://jabber.org/protocol/httpbind'/>x",
                TextOutsideRoot.into(),
            ),
            (
                "<!-- c --><body xmlns='http://jabber.org/protocol/httpbind'/>",
                Comment.into(),
            ),
            ("<!DOCTYPE body><body/>", Doctype.into()),
            (
                "<body xmlns='http://jabber.org/protocol/httpbind'><?pi?></body>",
                ProcessingInstruction.into(),
            ),
            (
                "<html><p>502</p></html>",
                BodyError::NotBody {
                    name: "html".into(),
                    ns: String::new(),
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(read(input, SMALL).as_ref(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn memory_stays_bounded_for_a_huge_stanza() {
        let limits = ReadLimits {
            stanza_bytes: 1024,
            body_bytes: 4096,
        };
        let mut r = BodyReader::new(limits);
        r.feed(OPEN.as_bytes()).unwrap();
        r.feed(b"<message xmlns='jabber:client' from='b@x/r' id='big' type='chat'>")
            .unwrap();
        let child = format!("<x xmlns='urn:{}'/>", "n".repeat(1000));
        for _ in 0..5000 {
            r.feed(child.as_bytes()).unwrap();
            assert!(
                r.buf.capacity() <= 4 * 1024,
                "buffer grew to {}",
                r.buf.capacity()
            );
        }
        r.feed(b"</message><message xmlns='jabber:client' id='after'/></body>")
            .unwrap();
        let r = r.finish().unwrap();
        assert_eq!(names(&r), ["after"]);
        assert_eq!(r.dropped[0].root.as_ref().unwrap().attr("id"), Some("big"));
    }
}
