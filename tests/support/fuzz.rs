//! A seeded generator of mutated stanzas for the differential fuzz run (`tests/fuzz_prosody.rs`).
//!
//! Each case is raw XML text, derived only from `(seed, index)`, so one case can be replayed
//! alone. Cases aim at the places where the daemon's strict parser, its serializer and the
//! server's parser (expat in Prosody) can disagree: names, namespaces and prefixes, entities and
//! character references, astral characters, sizes around the stanza limit, deep and wide trees,
//! attribute counts at the limit, bad iq types and ids, bad addresses. Most cases are plausible
//! stanzas with one to three mutations; some are not well-formed at all.

use std::fmt::Write as _;

/// SplitMix64: tiny, fast and fixed forever, so a printed seed replays the same case on any
/// later build (a library RNG may change its stream between versions).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T: ?Sized>(&mut self, items: &[&'a T]) -> &'a T {
        items[self.below(items.len())]
    }
}

/// Which way a case travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Sent by a page through the daemon to the server.
    Page,
    /// Sent by a contact straight to the server, toward the user's pages.
    Contact,
}

/// Addresses a case may use.
#[derive(Clone, Debug)]
pub struct Addresses {
    /// The user behind the pages: bare and full JID.
    pub bare: String,
    pub full: String,
    /// The server's domain.
    pub domain: String,
    /// Another account (for page cases: one no loop depends on).
    pub other: String,
    /// An account that does not exist.
    pub stranger: String,
}

/// One generated stanza.
#[derive(Clone, Debug)]
pub struct Case {
    pub seed: u64,
    pub index: u64,
    /// The mutations this case carries (see [`KINDS`]).
    pub kinds: Vec<&'static str>,
    /// The frame as sent, byte for byte.
    pub xml: String,
}

/// Every mutation kind the generator knows.
pub const KINDS: &[&str] = &[
    "plain",
    "non-ascii-name",
    "astral",
    "colon-name",
    "reserved-ns",
    "stream-ns",
    "long-ns-wide",
    "attr-ns",
    "entities",
    "escape-growth",
    "size-limit",
    "deep",
    "wide",
    "attrs-limit",
    "bad-type",
    "bad-id",
    "bad-address",
    "iq-children",
    "whitespace",
    "dup-attr",
    "malformed",
];

/// The reserved namespace URIs of "Namespaces in XML" §3.
const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";
const XMLNS_NS: &str = "http://www.w3.org/2000/xmlns/";

const ASCII_NAMES: &[&str] = &["x", "item", "a-b", "a.b", "a_b", "X9", "data", "query", "q"];
const NON_ASCII_NAMES: &[&str] = &["ș", "é", "жук", "中文", "café", "Ωmega", "ﬀ", "ä-ö"];
const ASTRAL_NAMES: &[&str] = &["𝒳", "𝒳y", "a𝒳", "𐐀", "x𝔘𝔫"];
const URIS: &[&str] = &[
    "urn:x:fuzz",
    "urn:x:fuzz:2",
    "http://example.com/ns",
    "jabber:x:data",
    "urn:xmpp:ping",
    "",
];
const STREAM_URIS: &[&str] = &[
    "jabber:client",
    "jabber:server",
    "http://etherx.jabber.org/streams",
    "http://jabber.org/protocol/httpbind",
    "urn:ietf:params:xml:ns:xmpp-framing",
    "urn:ietf:params:xml:ns:xmpp-sasl",
    "urn:ietf:params:xml:ns:xmpp-stanzas",
    "urn:xmpp:carbons:2",
    "urn:xmpp:forward:0",
    "urn:boshmux:status:0",
];
const ASTRAL_TEXT: &[&str] = &["𝒳", "😀", "𐐀", "🂡", "\u{10FFFD}", "\u{E000}"];
const GOOD_REFS: &[&str] = &[
    "&amp;",
    "&lt;",
    "&gt;",
    "&quot;",
    "&apos;",
    "&#x1D4B3;",
    "&#119987;",
    "&#x9;",
    "&#xA;",
    "&#xD;",
    "&#13;",
    "&#x10FFFF;",
    "&#xFFFD;",
    "&#xE000;",
    "&#x219;",
    "&#60;",
    "&#x26;",
];
const BAD_REFS: &[&str] = &[
    "&x;",
    "&nbsp;",
    "&#0;",
    "&#x0;",
    "&#xD800;",
    "&#xDFFF;",
    "&#xFFFE;",
    "&#xFFFF;",
    "&#x110000;",
    "&#1;",
    "&#x1F;",
    "&#;",
    "&#x;",
    "&amp",
    "&",
];

/// The case `index` of the run `seed`, for a frame limit of `limit` bytes.
pub fn case(seed: u64, index: u64, side: Side, addr: &Addresses, limit: usize) -> Case {
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    rng.next_u64();
    let mut g = Gen {
        rng,
        side,
        addr,
        limit,
        kinds: Vec::new(),
        on: Vec::new(),
    };
    let xml = g.stanza();
    let mut kinds = g.kinds;
    if kinds.is_empty() {
        kinds.push("plain");
    }
    kinds.sort_unstable();
    kinds.dedup();
    Case {
        seed,
        index,
        kinds,
        xml,
    }
}

struct Gen<'a> {
    rng: Rng,
    side: Side,
    addr: &'a Addresses,
    limit: usize,
    /// Kinds this case ended up exercising.
    kinds: Vec<&'static str>,
    /// Kinds switched on for this case (they apply with some probability at each spot).
    on: Vec<&'static str>,
}

impl Gen<'_> {
    fn is_on(&self, kind: &str) -> bool {
        self.on.contains(&kind)
    }

    /// Uses kind `kind` at this spot with `percent` probability, if it is on.
    fn take(&mut self, kind: &'static str, percent: usize) -> bool {
        if self.is_on(kind) && self.rng.chance(percent) {
            self.kinds.push(kind);
            true
        } else {
            false
        }
    }

    fn stanza(&mut self) -> String {
        // Mutations for this case: the sized shapes are exclusive, the others combine.
        const SHAPES: &[&str] = &["long-ns-wide", "size-limit", "deep", "wide", "attrs-limit"];
        const SPOTS: &[&str] = &[
            "non-ascii-name",
            "astral",
            "colon-name",
            "reserved-ns",
            "stream-ns",
            "attr-ns",
            "entities",
            "escape-growth",
            "bad-type",
            "bad-id",
            "bad-address",
            "iq-children",
            "whitespace",
            "dup-attr",
        ];
        let shape = if self.rng.chance(30) {
            Some(self.rng.pick(SHAPES))
        } else {
            None
        };
        for _ in 0..self.rng.range(0, 3) {
            let k = self.rng.pick(SPOTS);
            self.on.push(k);
        }
        let mut xml = match self.rng.below(100) {
            0..55 => self.message(),
            55..80 => self.iq(),
            _ => self.presence(),
        };
        match shape {
            Some("long-ns-wide") => xml = self.insert(&xml, |g, room| g.long_ns_wide(room)),
            Some("wide") => xml = self.insert(&xml, |g, room| g.wide(room)),
            Some("deep") => xml = self.insert(&xml, |g, _| g.deep()),
            Some("attrs-limit") => xml = self.attrs_limit(&xml),
            Some("size-limit") => xml = self.size_limit(&xml),
            _ => {}
        }
        if self.rng.chance(4) {
            self.kinds.push("malformed");
            xml = self.malform(xml);
        }
        xml
    }

    /// Puts the payload `make(room)` just before the root's end tag, `room` being the bytes
    /// left under the limit (sometimes a little more).
    fn insert(&mut self, xml: &str, make: impl FnOnce(&mut Self, usize) -> String) -> String {
        let close = xml.rfind("</").unwrap_or(xml.len());
        let self_closing = xml.ends_with("/>") && close == xml.len();
        let room = (self.limit + self.rng.range(0, 64)).saturating_sub(xml.len() + 16);
        let inner = make(self, room);
        if self_closing {
            let head = &xml[..xml.len() - 2];
            let name = root_name(xml);
            format!("{head}>{inner}</{name}>")
        } else {
            format!("{}{inner}{}", &xml[..close], &xml[close..])
        }
    }

    // --- stanzas -------------------------------------------------------------------------

    fn message(&mut self) -> String {
        let ty = self.stanza_type(&["chat", "normal", "headline", "groupchat", "error", ""]);
        let mut s = String::from("<message xmlns='jabber:client'");
        let to = self.to();
        self.attrs_of_root(&mut s, to, ty, false);
        s.push('>');
        if self.rng.chance(85) {
            let len = self.rng.range(0, 60);
            let body = self.text(len);
            write!(s, "<body>{body}</body>").unwrap();
        }
        for _ in 0..self.rng.range(0, 3) {
            let p = self.element(3);
            s.push_str(&p);
        }
        s.push_str("</message>");
        s
    }

    fn iq(&mut self) -> String {
        let ty = self.stanza_type(&["get", "set", "get", "set", "result", "error"]);
        let mut s = String::from("<iq xmlns='jabber:client'");
        let to = self.to();
        let request = matches!(ty.as_deref(), Some("get" | "set"));
        self.attrs_of_root(&mut s, to, ty, true);
        s.push('>');
        let children = if self.take("iq-children", 60) {
            *self.rng.pick(&[&0usize, &2, &3])
        } else if request {
            1
        } else {
            self.rng.range(0, 1)
        };
        for _ in 0..children {
            let p = self.element(3);
            s.push_str(&p);
        }
        s.push_str("</iq>");
        s
    }

    fn presence(&mut self) -> String {
        // Always directed: an undirected presence would change what every contact sees.
        let ty = self.stanza_type(&["", "", "unavailable", "probe", "error"]);
        let mut s = String::from("<presence xmlns='jabber:client'");
        let to = Some(self.to().unwrap_or_else(|| self.addr.other.clone()));
        self.attrs_of_root(&mut s, to, ty, false);
        s.push('>');
        if self.rng.chance(50) {
            let status = self.text(20);
            write!(s, "<status>{status}</status>").unwrap();
        }
        if self.rng.chance(50) {
            let p = self.element(2);
            s.push_str(&p);
        }
        s.push_str("</presence>");
        s
    }

    /// `type`, sometimes an invalid one; `None` means no attribute.
    fn stanza_type(&mut self, valid: &[&str]) -> Option<String> {
        if self.take("bad-type", 70) {
            let bad = self.rng.pick(&[
                "fetch", "", "GET", "chat ", " set", "ș", "𝒳", "result2", "&#x67;et", "get&amp;",
            ]);
            return Some(bad.to_owned());
        }
        let t = self.rng.pick(valid);
        (!t.is_empty()).then(|| t.to_owned())
    }

    fn to(&mut self) -> Option<String> {
        if self.take("bad-address", 70) {
            let long = format!("{}@{}", "l".repeat(1100), self.addr.domain);
            let bad = [
                "a@b@c".to_owned(),
                String::new(),
                format!("@{}", self.addr.domain),
                format!("{}/", self.addr.bare),
                format!("{} x", self.addr.bare),
                format!("ș𝒳@{}", self.addr.domain),
                format!("{}/𝒳 r", self.addr.bare),
                format!("{}@{}", "&#x219;", self.addr.domain),
                format!("x&amp;y@{}", self.addr.domain),
                format!("x\"y@{}", self.addr.domain),
                "[::1]".to_owned(),
                format!(
                    "{}@{}",
                    self.addr.bare.split('@').next().unwrap_or("u"),
                    "LOCALHOST"
                ),
                long,
                format!("{}/{}", self.addr.bare, "r".repeat(1100)),
            ];
            return Some(bad[self.rng.below(bad.len())].clone());
        }
        let a = self.addr;
        match self.side {
            Side::Page => {
                let pick = self.rng.below(6);
                match pick {
                    0 | 1 => Some(a.bare.clone()),
                    2 => Some(a.full.clone()),
                    3 => Some(a.domain.clone()),
                    4 => Some(a.other.clone()),
                    _ => Some(a.stranger.clone()),
                }
            }
            Side::Contact => Some(if self.rng.chance(50) {
                a.bare.clone()
            } else {
                a.full.clone()
            }),
        }
    }

    /// `to`, `type`, `id` and a few extra attributes on the stanza itself.
    fn attrs_of_root(&mut self, s: &mut String, to: Option<String>, ty: Option<String>, iq: bool) {
        if let Some(to) = to {
            let q = self.quote();
            write!(s, " to={q}{}{q}", escape(&to, q)).unwrap();
        }
        if let Some(ty) = ty {
            write!(s, " type='{ty}'").unwrap();
        }
        let id = if self.take("bad-id", 70) {
            let bad = [
                None,
                Some(String::new()),
                Some("i".repeat(self.rng.range(1000, 5000))),
                Some("ș𝒳-id".to_owned()),
                Some("bmx1".to_owned()),
                Some("a&amp;b&lt;c".to_owned()),
                Some("&#x1D4B3;".to_owned()),
                Some("sp ace\t".to_owned()),
            ];
            bad[self.rng.below(bad.len())].clone()
        } else if iq || self.rng.chance(50) {
            Some(format!("f{}", self.rng.below(1_000_000)))
        } else {
            None
        };
        if let Some(id) = id {
            write!(s, " id='{id}'").unwrap();
        }
        if self.rng.chance(20) {
            let lang = self.rng.pick(&["en", "ro", "", "x-𝒳", "en&#x9;"]);
            write!(s, " xml:lang='{lang}'").unwrap();
        }
        if self.take("whitespace", 50) {
            s.push_str("\n\t ");
        }
        if self.take("dup-attr", 40) {
            s.push_str(" id='dup' id='dup2'");
        }
    }

    // --- payload trees -------------------------------------------------------------------

    /// A payload element, at most `depth` levels deep, with the mutations switched on.
    fn element(&mut self, depth: usize) -> String {
        let mut s = String::new();
        let mut decls = String::new();
        let name = self.name(&mut decls, true);
        write!(s, "<{name}").unwrap();
        // Its namespace: a fresh default namespace most of the time.
        if self.take("reserved-ns", 50) {
            let bindings = [
                format!(" xmlns='{XML_NS}'"),
                format!(" xmlns='{XMLNS_NS}'"),
                format!(" xmlns:p='{XML_NS}'"),
                format!(" xmlns:p='{XMLNS_NS}'"),
                " xmlns:xml='urn:x:not-xml'".to_owned(),
                format!(" xmlns:xml='{XML_NS}'"),
                " xmlns:xmlns='urn:x:fuzz'".to_owned(),
                " xmlns:p=''".to_owned(),
            ];
            s.push_str(&bindings[self.rng.below(bindings.len())]);
        } else if self.take("stream-ns", 50) {
            let uri = self.rng.pick(STREAM_URIS);
            write!(s, " xmlns='{uri}'").unwrap();
        } else if !name.contains(':') && self.rng.chance(70) {
            let uri = self.rng.pick(URIS);
            write!(s, " xmlns='{uri}'").unwrap();
        }
        s.push_str(&decls);
        let attrs = self.rng.range(0, 3);
        let mut names = Vec::new();
        for _ in 0..attrs {
            let mut d = String::new();
            let an = self.name(&mut d, false);
            if names.contains(&an) {
                continue;
            }
            s.push_str(&d);
            let v = self.attr_value(20);
            let q = self.quote();
            write!(
                s,
                " {an}={q}{}{q}",
                v.replace(q, if q == '"' { "&quot;" } else { "&apos;" })
            )
            .unwrap();
            names.push(an);
        }
        if self.take("attr-ns", 60) {
            write!(s, " xmlns:n='urn:x:attr' n:a='1' n:b='2'").unwrap();
        }
        if self.take("dup-attr", 30) {
            s.push_str(" xmlns:d1='urn:x:d' xmlns:d2='urn:x:d' d1:z='1' d2:z='2'");
        }
        if self.take("whitespace", 30) {
            s.push_str(" \r\n");
        }
        let children = if depth == 0 { 0 } else { self.rng.range(0, 3) };
        if children == 0 && self.rng.chance(40) {
            s.push_str("/>");
            return s;
        }
        s.push('>');
        for i in 0..children.max(1) {
            if i < children {
                let c = self.element(depth - 1);
                s.push_str(&c);
            }
            if self.rng.chance(50) {
                let t = self.text(15);
                s.push_str(&t);
            }
        }
        write!(s, "</{name}>").unwrap();
        s
    }

    /// An element or attribute name; prefix declarations it needs go to `decls`.
    fn name(&mut self, decls: &mut String, element: bool) -> String {
        if self.take("non-ascii-name", 50) {
            return self.rng.pick(NON_ASCII_NAMES).to_owned();
        }
        if self.is_on("astral") && self.rng.chance(30) {
            // Astral letters in names are non-ASCII names too.
            self.kinds.push("non-ascii-name");
            return self.rng.pick(ASTRAL_NAMES).to_owned();
        }
        if self.take("colon-name", 50) {
            return match self.rng.below(7) {
                0 => {
                    decls.push_str(" xmlns:p='urn:x:prefixed'");
                    "p:x".to_owned()
                }
                1 => "undeclared:x".to_owned(),
                2 if element => "xml:foo".to_owned(),
                2 => "xml:space".to_owned(),
                3 if element => "xmlns:foo".to_owned(),
                3 => "xml:lang".to_owned(),
                4 => "a:b:c".to_owned(),
                5 => ":x".to_owned(),
                _ => {
                    self.kinds.push("non-ascii-name");
                    decls.push_str(" xmlns:ș='urn:x:non-ascii-prefix'");
                    "ș:x".to_owned()
                }
            };
        }
        self.rng.pick(ASCII_NAMES).to_owned()
    }

    /// Character data of about `len` units, escaped for content.
    fn text(&mut self, len: usize) -> String {
        let mut s = String::new();
        for _ in 0..len {
            if self.take("entities", 15) {
                let r = if self.rng.chance(75) {
                    self.rng.pick(GOOD_REFS)
                } else {
                    self.rng.pick(BAD_REFS)
                };
                s.push_str(r);
            } else if self.take("astral", 10) {
                s.push_str(self.rng.pick(ASTRAL_TEXT));
            } else if self.take("escape-growth", 30) {
                s.push_str(self.rng.pick(&[">", ">>>>", "]]&gt;", "\r", "\r\n"]));
            } else if self.is_on("entities") && self.rng.chance(2) {
                s.push_str(
                    self.rng
                        .pick(&["<![CDATA[c<d]]>", "]]>", "\u{FEFF}", "\u{FFFE}"]),
                );
            } else {
                s.push(char::from(b'a' + self.rng.below(26) as u8));
            }
        }
        s
    }

    /// An attribute value (not yet quoted).
    fn attr_value(&mut self, len: usize) -> String {
        let mut s = String::new();
        for _ in 0..len {
            if self.take("escape-growth", 30) {
                s.push_str(self.rng.pick(&["\"", "\t", "\n", "'", ">"]));
            } else if self.take("entities", 15) {
                s.push_str(self.rng.pick(GOOD_REFS));
            } else if self.take("astral", 10) {
                s.push_str(self.rng.pick(ASTRAL_TEXT));
            } else {
                s.push(char::from(b'a' + self.rng.below(26) as u8));
            }
        }
        s
    }

    fn quote(&mut self) -> char {
        if self.rng.chance(50) { '\'' } else { '"' }
    }

    // --- sized shapes ----------------------------------------------------------------------

    /// One prefix bound to a long URI once, used on many children (and their attributes):
    /// small on the wire, large once every child declares the namespace itself.
    fn long_ns_wide(&mut self, room: usize) -> String {
        self.kinds.push("long-ns-wide");
        let uri_len = *self.rng.pick(&[&200usize, &1000, &4000]);
        let uri = format!("urn:x:{}", "n".repeat(uri_len));
        let with_attr = self.rng.chance(40);
        if with_attr {
            self.kinds.push("attr-ns");
        }
        let child = if with_attr {
            "<l:c l:a='1'/>"
        } else {
            "<l:c/>"
        };
        let head = format!("<l:w xmlns:l='{uri}'>");
        let tail = "</l:w>";
        let fill = self.rng.range(room * 7 / 10, room.max(1));
        let count = fill.saturating_sub(head.len() + tail.len()) / child.len();
        format!("{head}{}{tail}", child.repeat(count.max(1)))
    }

    /// Thousands of small siblings.
    fn wide(&mut self, room: usize) -> String {
        self.kinds.push("wide");
        let child = *self
            .rng
            .pick(&[&"<i/>", &"<i>x</i>", &"<i xmlns='urn:x:w'/>", &"<𝒳/>"]);
        if child.contains('𝒳') {
            self.kinds.push("non-ascii-name");
        }
        let fill = self.rng.range(room / 10, room.max(1));
        let count = fill.saturating_sub(32) / child.len();
        format!("<w xmlns='urn:x:wide'>{}</w>", child.repeat(count.max(1)))
    }

    /// Nesting right at, below and above the page limit of 32 levels (the stanza is level 1).
    fn deep(&mut self) -> String {
        self.kinds.push("deep");
        let depth = self.rng.range(29, 34) - 1;
        let ns = if self.rng.chance(50) {
            " xmlns='urn:x:deep'"
        } else {
            ""
        };
        format!(
            "{}{}",
            format!("<d{ns}>").repeat(depth),
            "</d>".repeat(depth)
        )
    }

    /// 63 to 66 attributes (namespace declarations included) on the stanza or a child.
    fn attrs_limit(&mut self, xml: &str) -> String {
        self.kinds.push("attrs-limit");
        let n = self.rng.range(62, 66);
        let on_root = self.rng.chance(50);
        let decls = if self.rng.chance(30) { 4 } else { 0 };
        let mut a = String::new();
        for i in 0..decls {
            write!(a, " xmlns:z{i}='urn:x:z{i}'").unwrap();
        }
        // The root already has xmlns and some of to/type/id.
        let present = if on_root {
            xml[..xml.find('>').unwrap_or(0)].matches('=').count()
        } else {
            0
        };
        for i in 0..n.saturating_sub(decls + present) {
            write!(a, " k{i}='v'").unwrap();
        }
        if on_root {
            let end = xml.find('>').unwrap_or(0);
            let end = if xml[..end].ends_with('/') {
                end - 1
            } else {
                end
            };
            format!("{}{a}{}", &xml[..end], &xml[end..])
        } else {
            self.insert(xml, |_, _| format!("<many xmlns='urn:x:many'{a}/>"))
        }
    }

    /// Padding that brings the frame to the limit, one byte either side, or just under it, in
    /// one- or multi-byte characters or character references.
    fn size_limit(&mut self, xml: &str) -> String {
        self.kinds.push("size-limit");
        let target = self.limit as isize + *self.rng.pick(&[&-1isize, &0, &1, &-200, &-4096]);
        let pad_unit = *self
            .rng
            .pick(&[&"a", &"é", &"𝒳", &"&amp;", &"&#x1D4B3;", &">"]);
        let open = "<pad xmlns='urn:x:pad'>";
        let close = "</pad>";
        let close_at = xml.rfind("</").unwrap_or(xml.len());
        let base = xml.len() + open.len() + close.len();
        let room = (target - base as isize).max(0) as usize;
        let mut pad = pad_unit.repeat(room / pad_unit.len());
        pad.push_str(&"b".repeat(room - pad.len()));
        if xml.ends_with("/>") && close_at == xml.len() {
            let name = root_name(xml);
            format!("{}>{open}{pad}{close}</{name}>", &xml[..xml.len() - 2])
        } else {
            format!("{}{open}{pad}{close}{}", &xml[..close_at], &xml[close_at..])
        }
    }

    /// Breaks well-formedness: truncated, mismatched or doubled.
    fn malform(&mut self, xml: String) -> String {
        match self.rng.below(5) {
            0 => xml[..floor_char_boundary(&xml, xml.len() * 2 / 3)].to_owned(),
            1 => xml.replacen("</", "</z", 1),
            2 => format!("{xml}{xml}"),
            3 => xml.replacen('>', " a='1' a='2'>", 1),
            _ => xml.replacen('<', "<\u{1}", 1),
        }
    }
}

/// `s` escaped for an attribute value in `quote`s.
fn escape(s: &str, quote: char) -> String {
    let s = s.replace('<', "&lt;");
    match quote {
        '"' => s.replace('"', "&quot;"),
        _ => s.replace('\'', "&apos;"),
    }
}

fn root_name(xml: &str) -> &str {
    let rest = &xml[1..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
        .unwrap_or(rest.len());
    &rest[..end]
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A short printable view of a frame: its size, its start and its end.
pub fn excerpt(xml: &str) -> String {
    if xml.len() <= 1200 {
        return xml.to_owned();
    }
    let head = &xml[..floor_char_boundary(xml, 800)];
    let tail = &xml[floor_char_boundary(xml, xml.len() - 300)..];
    format!("{head} … [{} bytes in all] … {tail}", xml.len())
}
