//! What a page sends and what it is sent, one WebSocket text frame at a time (RFC 7395).
//!
//! Page input is hostile (SPEC §5): every frame is parsed under limits and checked here, and
//! only the resulting [`Element`] travels on, to be written anew. A frame that cannot be read is
//! a stream error for that page (and close 1008); a readable stanza with a fault gets a stanza
//! error. Neither touches the shared session.

use crate::xmpp::{self, Element, Jid, Limits, ParseError, ns};

/// A frame from a bound page, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageInput {
    /// A stanza to process; `from` already set to the session's full JID.
    Stanza(Element),
    /// `<close/>`: the page ends its stream.
    Close,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The frame could not be used at all: send this stream error, then close with 1008.
    Stream {
        /// RFC 6120 §4.9.3 condition.
        condition: &'static str,
        /// Human-readable detail (never echoes input).
        text: String,
    },
    /// A stanza with a fault: send this error stanza to the page, nothing upstream.
    Stanza(Element),
    /// A faulty stanza that must not be answered (it was itself an error).
    Drop,
}

/// Levels a carbon adds around a stanza: `<message><sent><forwarded>` (XEP-0280 §6).
const CARBON_DEPTH: usize = 3;
/// Bytes of a carbon's wrapper other than its two JIDs (XEP-0280 §6), rounded up.
const CARBON_BYTES: usize = 256;

/// Reads one frame from a bound page.
///
/// The stanza, once `from` is set, writes out within `limits.max_bytes` (the parse keeps room
/// for the `from`), so what goes upstream is never larger than the stanza limit. A stanza that
/// is well-formed but breaks a rule only servers' parsers differ on (a non-ASCII name, a
/// reserved namespace binding) or that expands past the limit gets a stanza error when its
/// root can be read, a stream error otherwise.
pub fn read(frame: &str, limits: &Limits, full_jid: &Jid) -> Result<PageInput, Rejection> {
    let from = full_jid.to_string();
    // ` from="…"`: the stanza may have none, and the JID is written escaped. Then room for the
    // carbon that may wrap it for the user's other pages (SPEC §6.4): its three elements and
    // two JIDs, so that every page's parser accepts what it is sent.
    let reserve = 8 + from.len() * 6 + CARBON_BYTES + 2 * from.len() * 6;
    let limits = &Limits {
        max_depth: limits.max_depth.saturating_sub(CARBON_DEPTH),
        // The `from` set below is one attribute more.
        max_attrs: limits.max_attrs.saturating_sub(1),
        ..*limits
    };
    let mut el = match xmpp::parse::parse_reserving(frame.as_bytes(), limits, reserve) {
        Ok(el) => el,
        Err(
            e
            @ (ParseError::NonAsciiName(_) | ParseError::BadNamespace(_) | ParseError::Expands(_)),
        ) => {
            let root = xmpp::parse::parse_root(frame.as_bytes(), limits, None).filter(|r| {
                r.ns == ns::CLIENT && matches!(r.name.as_str(), "message" | "presence" | "iq")
            });
            let Some(mut root) = root else {
                return Err(parse_rejection(e));
            };
            root.set_attr("from", from);
            let condition = if matches!(e, ParseError::Expands(_)) {
                "policy-violation"
            } else {
                "bad-request"
            };
            return Err(stanza_error(&root, "modify", condition, &e.to_string()));
        }
        Err(e) => return Err(parse_rejection(e)),
    };
    if el.is("close", ns::FRAMING) {
        return Ok(PageInput::Close);
    }
    if el.ns != ns::CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
        return Err(Rejection::Stream {
            condition: "unsupported-stanza-type",
            text: format!("<{}/> in namespace {:?} is not a stanza", el.name, el.ns),
        });
    }
    el.set_attr("from", from);
    if let Some(to) = el.attr("to")
        && Jid::parse(to).is_err()
    {
        return Err(stanza_error(
            &el,
            "modify",
            "jid-malformed",
            "invalid 'to' address",
        ));
    }
    let ty = el.attr("type");
    let ok_type = match el.name.as_str() {
        "message" => matches!(
            ty,
            None | Some("chat" | "error" | "groupchat" | "headline" | "normal")
        ),
        "presence" => matches!(
            ty,
            None | Some(
                "error"
                    | "probe"
                    | "subscribe"
                    | "subscribed"
                    | "unavailable"
                    | "unsubscribe"
                    | "unsubscribed"
            )
        ),
        _ => matches!(ty, Some("get" | "set" | "result" | "error")),
    };
    if !ok_type {
        return Err(stanza_error(&el, "modify", "bad-request", "invalid 'type'"));
    }
    if el.name == "iq" {
        if el.attr("id").is_none_or(str::is_empty) {
            return Err(stanza_error(
                &el,
                "modify",
                "bad-request",
                "an iq needs an 'id'",
            ));
        }
        let children = el.elements().count();
        if matches!(ty, Some("get" | "set")) && children != 1 {
            return Err(stanza_error(
                &el,
                "modify",
                "bad-request",
                "an iq request carries exactly one child element",
            ));
        }
    }
    Ok(PageInput::Stanza(el))
}

/// Maps a parse failure to the RFC 6120 stream error condition a server would use.
fn parse_rejection(e: ParseError) -> Rejection {
    let condition = match &e {
        ParseError::TooLarge { .. }
        | ParseError::TooDeep(_)
        | ParseError::TooManyAttrs(_)
        | ParseError::Expands(_) => "policy-violation",
        ParseError::Doctype
        | ParseError::Comment
        | ParseError::ProcessingInstruction
        | ParseError::Entity(_)
        | ParseError::Declaration => "restricted-xml",
        ParseError::InvalidUtf8(_) => "unsupported-encoding",
        ParseError::UnknownPrefix(_) | ParseError::BadNamespace(_) => "invalid-namespace",
        _ => "not-well-formed",
    };
    Rejection::Stream {
        condition,
        text: e.to_string(),
    }
}

/// The error reply to `stanza` (to the page that sent it), or [`Rejection::Drop`] when `stanza`
/// is an error itself (errors are never answered, to avoid loops).
pub fn stanza_error(stanza: &Element, kind: &str, condition: &str, text: &str) -> Rejection {
    if stanza.attr("type") == Some("error") {
        return Rejection::Drop;
    }
    Rejection::Stanza(error_reply(stanza, kind, condition, text))
}

/// Builds `stanza`'s error reply: same name and id, addresses swapped, `<error/>` appended.
pub fn error_reply(stanza: &Element, kind: &str, condition: &str, text: &str) -> Element {
    let mut reply = Element::new(stanza.name.clone(), ns::CLIENT).with_attr("type", "error");
    if let Some(id) = stanza.attr("id") {
        reply.set_attr("id", id);
    }
    if let Some(to) = stanza.attr("to") {
        reply.set_attr("from", to);
    }
    if let Some(from) = stanza.attr("from") {
        reply.set_attr("to", from);
    }
    let mut error = Element::new("error", ns::CLIENT)
        .with_attr("type", kind)
        .with_child(Element::new(condition, ns::STANZAS));
    if !text.is_empty() {
        error.push_child(Element::new("text", ns::STANZAS).with_text(text));
    }
    reply.with_child(error)
}

/// `<open/>` answering a page's `<open/>`.
pub fn open(domain: &str, stream_id: &str) -> String {
    let mut el = Element::new("open", ns::FRAMING)
        .with_attr("from", domain)
        .with_attr("id", stream_id)
        .with_attr("version", "1.0");
    el.set_attr_ns(Some(ns::XML), "lang", "en");
    el.to_xml()
}

/// `<close/>`.
pub fn close() -> String {
    Element::new("close", ns::FRAMING).to_xml()
}

/// Writes a `stream:`-level element with the `stream:` prefix, as clients expect to find
/// `stream:features` / `stream:error` by that qualified name.
fn stream_element(name: &str, children: &[Element]) -> String {
    let mut out = format!("<stream:{name} xmlns:stream=\"{}\">", ns::STREAM);
    for c in children {
        c.write_xml(&mut out, "");
    }
    out.push_str("</stream:");
    out.push_str(name);
    out.push('>');
    out
}

/// Features before authentication: EXTERNAL when the upgrade carried a valid cookie, PLAIN always.
pub fn sasl_features(external: bool) -> String {
    let mut mechanisms = Element::new("mechanisms", ns::SASL);
    if external {
        mechanisms.push_child(Element::new("mechanism", ns::SASL).with_text("EXTERNAL"));
    }
    mechanisms.push_child(Element::new("mechanism", ns::SASL).with_text("PLAIN"));
    stream_element("features", &[mechanisms])
}

/// Features after authentication: bind, and the legacy session marked optional.
pub fn bind_features() -> String {
    stream_element(
        "features",
        &[
            Element::new("bind", ns::BIND),
            Element::new("session", ns::SESSION).with_child(Element::new("optional", ns::SESSION)),
        ],
    )
}

/// A stream error frame.
pub fn stream_error(condition: &str, text: &str) -> String {
    let mut children = vec![Element::new(condition, ns::STREAMS)];
    if !text.is_empty() {
        children.push(Element::new("text", ns::STREAMS).with_text(text));
    }
    stream_element("error", &children)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Jid {
        Jid::parse("alice@example.com/boshmux").unwrap()
    }

    fn check(frame: &str) -> Result<PageInput, Rejection> {
        read(frame, &Limits::PAGE, &me())
    }

    fn stream(condition: &'static str) -> impl Fn(&Result<PageInput, Rejection>) -> bool {
        move |r| matches!(r, Err(Rejection::Stream { condition: c, .. }) if *c == condition)
    }

    #[test]
    fn stanzas_pass_with_from_replaced() {
        let Ok(PageInput::Stanza(m)) = check(
            "<message xmlns='jabber:client' to='bob@example.com' from='mallory@evil' type='chat'><body>hi</body></message>",
        ) else {
            panic!("rejected")
        };
        assert_eq!(m.attr("from"), Some("alice@example.com/boshmux"));
        assert_eq!(
            check("<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>"),
            Ok(PageInput::Close)
        );
    }

    #[test]
    fn unreadable_frames_are_stream_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "</body><body xmlns='http://jabber.org/protocol/httpbind'>",
                "not-well-formed",
            ),
            (
                "<message xmlns='jabber:client'/><message xmlns='jabber:client'/>",
                "not-well-formed",
            ),
            ("<message xmlns='jabber:client'>", "not-well-formed"),
            (
                "<!DOCTYPE m [<!ENTITY a 'aaaa'><!ENTITY b '&a;&a;'>]><message xmlns='jabber:client'>&b;</message>",
                "restricted-xml",
            ),
            (
                "<message xmlns='jabber:client'><!-- x --></message>",
                "restricted-xml",
            ),
            ("<?x y?><message xmlns='jabber:client'/>", "restricted-xml"),
            (
                "<message xmlns='jabber:client'>&lol;</message>",
                "restricted-xml",
            ),
            (
                "<message xmlns='jabber:client'>\u{7}</message>",
                "not-well-formed",
            ),
            (
                "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>",
                "unsupported-stanza-type",
            ),
            (
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AA==</auth>",
                "unsupported-stanza-type",
            ),
            ("<enable xmlns='urn:xmpp:sm:3'/>", "unsupported-stanza-type"),
            ("<r xmlns='urn:xmpp:sm:3'/>", "unsupported-stanza-type"),
            (
                "<body xmlns='http://jabber.org/protocol/httpbind' rid='1'/>",
                "unsupported-stanza-type",
            ),
            (
                "<message xmlns='jabber:server'/>",
                "unsupported-stanza-type",
            ),
            (
                "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.com' version='1.0'/>",
                "unsupported-stanza-type",
            ),
        ];
        for (frame, condition) in cases {
            assert!(
                stream(condition)(&check(frame)),
                "{frame:?}: {:?}",
                check(frame)
            );
        }
    }

    #[test]
    fn limits_are_policy_violations() {
        let deep = format!(
            "<message xmlns='jabber:client'>{}{}</message>",
            "<x>".repeat(40),
            "</x>".repeat(40)
        );
        assert!(stream("policy-violation")(&check(&deep)));
        let attrs: String = (0..70).map(|i| format!(" a{i}='1'")).collect();
        assert!(stream("policy-violation")(&check(&format!(
            "<message xmlns='jabber:client'{attrs}/>"
        ))));
        let big = format!(
            "<message xmlns='jabber:client'><body>{}</body></message>",
            "x".repeat(300 * 1024)
        );
        assert!(stream("policy-violation")(&check(&big)));
    }

    #[test]
    fn faulty_stanzas_get_stanza_errors() {
        let Err(Rejection::Stanza(reply)) = check(
            "<iq xmlns='jabber:client' type='get' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>",
        ) else {
            panic!("iq without id accepted")
        };
        assert_eq!(
            reply.to_xml(),
            "<iq xmlns=\"jabber:client\" type=\"error\" from=\"example.com\" to=\"alice@example.com/boshmux\">\
             <error type=\"modify\"><bad-request xmlns=\"urn:ietf:params:xml:ns:xmpp-stanzas\"/>\
             <text xmlns=\"urn:ietf:params:xml:ns:xmpp-stanzas\">an iq needs an 'id'</text></error></iq>"
        );
        for frame in [
            "<iq xmlns='jabber:client' id='1' type='fetch'><q xmlns='x'/></iq>",
            "<iq xmlns='jabber:client' id='1' type='get'/>",
            "<iq xmlns='jabber:client' id='1' type='set'><a xmlns='x'/><b xmlns='x'/></iq>",
            "<message xmlns='jabber:client' type='shout'/>",
            "<presence xmlns='jabber:client' type='online'/>",
        ] {
            assert!(matches!(check(frame), Err(Rejection::Stanza(_))), "{frame}");
        }
        let Err(Rejection::Stanza(reply)) =
            check("<message xmlns='jabber:client' to='a@b@c' id='m1'/>")
        else {
            panic!("bad to accepted")
        };
        assert!(
            reply
                .child("error", ns::CLIENT)
                .unwrap()
                .child("jid-malformed", ns::STANZAS)
                .is_some()
        );
        assert_eq!(
            check("<iq xmlns='jabber:client' type='error'/>"),
            Err(Rejection::Drop)
        );
    }

    #[test]
    fn stanzas_servers_would_refuse_get_stanza_errors() {
        for (frame, condition) in [
            (
                "<message xmlns='jabber:client' id='m1' to='b@x'><ș/></message>",
                "bad-request",
            ),
            (
                "<message xmlns='jabber:client' id='m1' to='b@x'><x xmlns='http://www.w3.org/XML/1998/namespace'/></message>",
                "bad-request",
            ),
            (
                &format!(
                    "<message xmlns='jabber:client' id='m1' to='b@x' xmlns:p='urn:{}'>{}</message>",
                    "u".repeat(1000),
                    "<p:c/>".repeat(1000)
                ),
                "policy-violation",
            ),
        ] {
            let Err(Rejection::Stanza(err)) = check(frame) else {
                panic!("{frame:.80}: {:?}", check(frame));
            };
            assert_eq!(err.attr("id"), Some("m1"));
            assert_eq!(err.attr("to"), Some(me().to_string().as_str()));
            assert!(
                err.child("error", ns::CLIENT)
                    .unwrap()
                    .child(condition, ns::STANZAS)
                    .is_some(),
                "{frame:.80}"
            );
        }
        // A root that cannot be read is a stream error.
        assert!(stream("not-well-formed")(&check(
            "<ș xmlns='jabber:client'/>"
        )));
    }

    #[test]
    fn stream_level_frames() {
        assert_eq!(
            open("example.com", "s1"),
            "<open xmlns=\"urn:ietf:params:xml:ns:xmpp-framing\" from=\"example.com\" id=\"s1\" version=\"1.0\" xml:lang=\"en\"/>"
        );
        assert_eq!(
            sasl_features(true),
            "<stream:features xmlns:stream=\"http://etherx.jabber.org/streams\"><mechanisms \
             xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\"><mechanism>EXTERNAL</mechanism><mechanism>PLAIN\
             </mechanism></mechanisms></stream:features>"
        );
        // What we send must itself parse back.
        for f in [
            sasl_features(false),
            bind_features(),
            stream_error("policy-violation", "too big"),
            close(),
        ] {
            xmpp::parse(f.as_bytes(), &Limits::PAGE).unwrap();
        }
    }
}
