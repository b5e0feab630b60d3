//! Properties of the parser/serializer pair and of the response reader, on generated trees and
//! on mutated inputs (seeded, so every run checks the same cases):
//! - what the parser accepts writes out within the limit, and that output parses back to the
//!   same tree (so what goes upstream or to a page is what was checked, and the strict parser
//!   accepts it);
//! - the page-side check and the response reader never panic, and the reader gives the same
//!   result however the response is cut into chunks.

use boshmux::bosh::{BodyReader, ReadLimits};
use boshmux::page::frame;
use boshmux::xmpp::{self, Attr, Element, Jid, Limits, Node, ns};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

fn config(cases: u32) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(0x0b05_4d0c),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Namespaces of elements: none, the usual, a long one, the framing ones.
fn element_ns() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(ns::CLIENT.to_owned()),
        Just("urn:a".to_owned()),
        Just(format!("urn:{}", "l".repeat(300))),
        Just(ns::STANZAS.to_owned()),
    ]
}

fn attr_ns() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        4 => Just(None),
        1 => Just(Some(ns::XML.to_owned())),
        1 => Just(Some(ns::XBOSH.to_owned())),
        1 => Just(Some("urn:p".to_owned())),
        1 => Just(Some("urn:q".to_owned())),
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_.-]{0,6}"
}

/// Text and attribute values: what needs escaping, whitespace, non-ASCII and astral characters.
fn chars() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just('a'),
            Just(' '),
            Just('&'),
            Just('<'),
            Just('>'),
            Just('"'),
            Just('\''),
            Just('\t'),
            Just('\n'),
            Just('\r'),
            Just(']'),
            Just('ș'),
            Just('𝒳'),
            Just('\u{a0}'),
        ],
        0..12,
    )
    .prop_map(|v| v.into_iter().collect())
}

fn tree() -> impl Strategy<Value = Element> {
    let leaf = (
        name(),
        element_ns(),
        proptest::collection::vec((attr_ns(), name(), chars()), 0..4),
    )
        .prop_map(|(name, ns, attrs)| {
            let mut el = Element::new(name, ns);
            for (ns, name, value) in attrs {
                if el.attr_ns(ns.as_deref(), &name).is_none() {
                    el.attrs.push(Attr { ns, name, value });
                }
            }
            el
        });
    leaf.prop_recursive(4, 40, 5, |inner| {
        (
            inner.clone(),
            proptest::collection::vec(
                prop_oneof![
                    inner.prop_map(Node::Element),
                    chars()
                        .prop_filter("text is never empty", |t| !t.is_empty())
                        .prop_map(Node::Text),
                ],
                0..5,
            ),
        )
            .prop_map(|(mut el, kids)| {
                for k in kids {
                    // The parser merges adjacent text; generate it merged.
                    match (el.children.last_mut(), k) {
                        (Some(Node::Text(prev)), Node::Text(t)) => prev.push_str(&t),
                        (_, k) => el.children.push(k),
                    }
                }
                el
            })
    })
}

/// Snippets a mutation splices in: markup, reserved names and namespaces, references.
const SNIPPETS: &[&str] = &[
    "<",
    ">",
    "/>",
    "</",
    "&",
    "&amp;",
    "&#0;",
    "&#x1F600;",
    "'",
    "\"",
    "=",
    ":",
    " ",
    "ș",
    "𝒳",
    "xml:",
    "xmlns:",
    " xmlns='http://www.w3.org/XML/1998/namespace'",
    " xmlns:p='http://www.w3.org/2000/xmlns/'",
    " xmlns:p=''",
    " xmlns:xml='urn:x'",
    "<p:x/>",
    " xmlns:p='urn:p'",
    "<![CDATA[",
    "]]>",
    "<!--",
    "<?pi?>",
    "<!DOCTYPE a>",
    "\u{1}",
    "\r\n",
];

#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, &'static str),
    Delete(usize, usize),
    Byte(usize, u8),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(
        prop_oneof![
            (any::<usize>(), proptest::sample::select(SNIPPETS))
                .prop_map(|(i, s)| Edit::Insert(i, s)),
            (any::<usize>(), 1..8usize).prop_map(|(i, n)| Edit::Delete(i, n)),
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
        ],
        1..4,
    )
}

fn mutate(input: &str, edits: &[Edit]) -> Vec<u8> {
    let mut bytes = input.as_bytes().to_vec();
    for e in edits {
        let at = |i: usize| i % (bytes.len() + 1);
        match *e {
            Edit::Insert(i, s) => {
                let i = at(i);
                bytes.splice(i..i, s.bytes());
            }
            Edit::Delete(i, n) => {
                let i = at(i);
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
            Edit::Byte(i, b) => {
                if !bytes.is_empty() {
                    let i = i % bytes.len();
                    bytes[i] = b;
                }
            }
        }
    }
    bytes
}

/// What the parser accepted writes out within the limit and parses back to the same tree.
fn check_accepted(input: &[u8], limits: &Limits) {
    if let Ok(el) = xmpp::parse(input, limits) {
        let written = el.to_xml();
        assert!(
            written.len() <= limits.max_bytes,
            "{} bytes written from {} accepted",
            written.len(),
            input.len()
        );
        assert_eq!(
            xmpp::parse(written.as_bytes(), limits).as_ref(),
            Ok(&el),
            "{written}"
        );
    }
}

const SMALL: Limits = Limits {
    max_bytes: 2048,
    ..Limits::PAGE
};

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn generated_trees_round_trip(el in tree()) {
        let written = el.to_xml();
        let big = Limits { max_bytes: 1 << 20, ..Limits::PAGE };
        prop_assert_eq!(xmpp::parse(written.as_bytes(), &big), Ok(el.clone()));
        check_accepted(written.as_bytes(), &SMALL);
        // Inside a BOSH body too, as a response carrying it.
        let mut inside = String::new();
        el.write_xml(&mut inside, ns::HTTPBIND);
        let body = format!("<body xmlns='http://jabber.org/protocol/httpbind'>{inside}</body>");
        let mut reader = BodyReader::new(ReadLimits { stanza_bytes: 1 << 20, body_bytes: 1 << 20 });
        reader.feed(body.as_bytes()).unwrap();
        let read = reader.finish().unwrap();
        prop_assert_eq!(read.body.into_children(), vec![el]);
    }

    #[test]
    fn mutated_inputs_are_refused_or_round_trip(el in tree(), edits in edits()) {
        let input = mutate(&el.to_xml(), &edits);
        check_accepted(&input, &SMALL);
        check_accepted(&input, &Limits { max_bytes: 1 << 20, ..Limits::PAGE });
    }

    #[test]
    fn the_page_check_never_panics(el in tree(), edits in edits()) {
        let me = Jid::parse("alice@example.com/boshmux").unwrap();
        let mut stanza = Element::new("message", ns::CLIENT).with_attr("to", "bob@example.com");
        stanza.children.push(Node::Element(el));
        let input = mutate(&stanza.to_xml(), &edits);
        if let Ok(text) = std::str::from_utf8(&input) {
            let limits = Limits { max_bytes: 2048, ..Limits::PAGE };
            if let Ok(frame::PageInput::Stanza(s)) = frame::read(text, &limits, &me) {
                let written = s.to_xml();
                prop_assert!(written.len() <= limits.max_bytes, "{} > limit", written.len());
                prop_assert_eq!(xmpp::parse(written.as_bytes(), &limits), Ok(s));
            }
        }
    }

    #[test]
    fn the_reader_gives_one_answer_whatever_the_chunks(
        el in tree(), edits in edits(), cuts in proptest::collection::vec(any::<usize>(), 0..6)
    ) {
        let body = format!(
            "<body xmlns='http://jabber.org/protocol/httpbind' xmlns:p='urn:p'><message xmlns='jabber:client'/>{}<iq xmlns='jabber:client'/></body>",
            { let mut s = String::new(); el.write_xml(&mut s, ns::HTTPBIND); s }
        );
        let input = mutate(&body, &edits);
        let limits = ReadLimits { stanza_bytes: 512, body_bytes: 2048 };
        let whole = {
            let mut r = BodyReader::new(limits);
            r.feed(&input).and_then(|()| r.finish())
        };
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut r = BodyReader::new(limits);
        let mut fed = Ok(());
        let mut from = 0;
        for c in cuts.into_iter().chain([input.len()]) {
            fed = fed.and_then(|()| r.feed(&input[from..c]));
            from = c;
        }
        let chunked = fed.and_then(|()| r.finish());
        prop_assert_eq!(&chunked, &whole);
        // Whatever was kept is something a page's parser accepts and writes out within the cap.
        if let Ok(read) = whole {
            for s in read.body.children() {
                let written = s.to_xml();
                prop_assert!(written.len() <= limits.stanza_bytes);
                let page = Limits { max_bytes: limits.stanza_bytes, ..Limits::PAGE };
                let back = xmpp::parse(written.as_bytes(), &page);
                prop_assert_eq!(back.as_ref(), Ok(s));
            }
        }
    }
}
