//! The BOSH `<body/>` wrapper (XEP-0124 / XEP-0206): building requests, reading responses and the
//! session parameters a creation response carries.

use bytes::Bytes;

use crate::xmpp::{self, Element, ParseError, ns};

use super::reader::{BodyReader, ReadLimits};

/// Why a response body could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not well-formed framing (a stanza's own faults only drop that stanza).
    #[error("response is not a BOSH body: {0}")]
    Xml(#[from] ParseError),
    /// Well-formed, but the root is not `<body xmlns='http://jabber.org/protocol/httpbind'/>`.
    #[error("expected <body/> in the httpbind namespace, found <{name}/> in {ns:?}")]
    NotBody {
        /// Local name of the root found.
        name: String,
        /// Its namespace.
        ns: String,
    },
    /// A required attribute is absent.
    #[error("session creation response lacks the {0:?} attribute")]
    MissingAttr(&'static str),
    /// A numeric attribute that is not a number.
    #[error("attribute {attr:?} is not a number: {value:?}")]
    BadNumber {
        /// The attribute's name.
        attr: &'static str,
        /// The value found.
        value: String,
    },
}

/// The `type` attribute of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// No `type`: an ordinary response.
    Normal,
    /// `type='terminate'`: the session is over (XEP-0124 §17.2).
    Terminate,
    /// `type='error'`: recoverable binding error; resend every unanswered request (XEP-0124 §17.3).
    Error,
}

/// A parsed `<body/>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body {
    /// The element itself; its children are the stanzas or stream-level elements carried.
    pub element: Element,
}

impl Body {
    /// An empty `<body/>`: what an answer that carries nothing for the owner is taken as.
    pub fn empty() -> Body {
        Body {
            element: Element::new("body", ns::HTTPBIND),
        }
    }

    /// Parses a whole body under the default [`ReadLimits`], leaving out any stanza the
    /// reader drops; see [`BodyReader`] for reading a response as it arrives and learning
    /// what was dropped.
    pub fn parse(bytes: &[u8]) -> Result<Body, BodyError> {
        let mut reader = BodyReader::new(ReadLimits::DEFAULT);
        reader.feed(bytes)?;
        Ok(reader.finish()?.body)
    }

    /// What kind of response this is.
    pub fn body_type(&self) -> BodyType {
        match self.element.attr("type") {
            Some("terminate") => BodyType::Terminate,
            Some("error") => BodyType::Error,
            _ => BodyType::Normal,
        }
    }

    /// The `condition` attribute of a terminate or error body.
    pub fn condition(&self) -> Option<&str> {
        self.element.attr("condition")
    }

    /// The elements carried, in order.
    pub fn children(&self) -> impl Iterator<Item = &Element> {
        self.element.elements()
    }

    /// Takes the carried elements out.
    pub fn into_children(self) -> Vec<Element> {
        self.element
            .children
            .into_iter()
            .filter_map(|n| match n {
                xmpp::Node::Element(e) => Some(e),
                xmpp::Node::Text(_) => None,
            })
            .collect()
    }

    /// Serializes for the wire. Carried stanzas declare their own namespace, since the body's
    /// default namespace is httpbind.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(self.element.to_xml())
    }

    /// A session creation request (XEP-0124 §7.1, XEP-0206 §4).
    pub fn create(rid: u64, to: &str, wait: u32, lang: &str) -> Body {
        let mut el = Element::new("body", ns::HTTPBIND)
            .with_attr("content", "text/xml; charset=utf-8")
            .with_attr("hold", "1")
            .with_attr("rid", rid.to_string())
            .with_attr("to", to)
            .with_attr("ver", "1.6")
            .with_attr("wait", wait.to_string());
        el.set_attr_ns(Some(ns::XML), "lang", lang);
        el.set_attr_ns(Some(ns::XBOSH), "version", "1.0");
        Body { element: el }
    }

    /// An ordinary request carrying `stanzas` (possibly none).
    pub fn request(rid: u64, sid: &str, stanzas: impl IntoIterator<Item = Element>) -> Body {
        let mut el = Element::new("body", ns::HTTPBIND)
            .with_attr("rid", rid.to_string())
            .with_attr("sid", sid);
        for s in stanzas {
            el.push_child(s);
        }
        Body { element: el }
    }

    /// A stream restart request after SASL success (XEP-0206 §5).
    pub fn restart(rid: u64, sid: &str, to: &str, lang: &str) -> Body {
        let mut body = Body::request(rid, sid, []);
        body.element.set_attr("to", to);
        body.element.set_attr_ns(Some(ns::XML), "lang", lang);
        body.element.set_attr_ns(Some(ns::XBOSH), "restart", "true");
        body
    }

    /// A terminate request, optionally carrying last stanzas such as unavailable presence.
    pub fn terminate(rid: u64, sid: &str, stanzas: impl IntoIterator<Item = Element>) -> Body {
        let mut body = Body::request(rid, sid, stanzas);
        body.element.set_attr("type", "terminate");
        body
    }
}

/// The bytes of an ordinary request whose stanzas are already serialized (in the httpbind
/// default namespace, as [`Element::write_xml`] writes them with that parent): the scheduler's
/// fast path, equal to `Body::request(..).to_bytes()`.
pub fn request_bytes(rid: u64, sid: &str, payload: &str) -> Bytes {
    wrap(rid, sid, "", payload)
}

/// Like [`request_bytes`], for a `type='terminate'` request.
pub fn terminate_bytes(rid: u64, sid: &str, payload: &str) -> Bytes {
    wrap(rid, sid, " type=\"terminate\"", payload)
}

fn wrap(rid: u64, sid: &str, extra: &str, payload: &str) -> Bytes {
    let head = Element::new("body", ns::HTTPBIND)
        .with_attr("rid", rid.to_string())
        .with_attr("sid", sid)
        .to_xml();
    // `head` is `<body …/>`: open it, add the payload, close it.
    let open = &head[..head.len() - 2];
    if payload.is_empty() {
        return Bytes::from(format!("{open}{extra}/>"));
    }
    Bytes::from(format!("{open}{extra}>{payload}</body>"))
}

/// What a session creation response told us (XEP-0124 §7.2). Every attribute is kept, so that
/// later parts (status page, restart survival) can show or persist them. `Debug` leaves out the
/// sid, which is a credential for the session.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionParams {
    /// Session id.
    pub sid: String,
    /// Longest time the server holds a request, seconds.
    pub wait: u32,
    /// Most requests the client may have outstanding.
    pub requests: u32,
    /// Most requests the server holds.
    pub hold: u32,
    /// Shortest allowed interval between empty polling requests, seconds.
    pub polling: Option<u32>,
    /// Longest the server tolerates no request outstanding, seconds.
    pub inactivity: Option<u32>,
    /// Longest pause the server allows, seconds.
    pub maxpause: Option<u32>,
    /// BOSH protocol version the server speaks.
    pub ver: Option<String>,
    /// The stream id.
    pub authid: Option<String>,
    /// The domain the server answered for.
    pub from: Option<String>,
    /// Whether the server considers the link to the XMPP server secure.
    pub secure: Option<bool>,
    /// Content encodings the server accepts.
    pub accept: Option<String>,
    /// `xmpp:version`, `1.0` when the server supports XMPP 1.0 features (XEP-0206).
    pub xmpp_version: Option<String>,
}

impl std::fmt::Debug for SessionParams {
    // By hand, naming every field so that a new one is a compile error here, not a leak.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let SessionParams {
            sid: _,
            wait,
            requests,
            hold,
            polling,
            inactivity,
            maxpause,
            ver,
            authid,
            from,
            secure,
            accept,
            xmpp_version,
        } = self;
        f.debug_struct("SessionParams")
            .field("sid", &"<hidden>")
            .field("wait", wait)
            .field("requests", requests)
            .field("hold", hold)
            .field("polling", polling)
            .field("inactivity", inactivity)
            .field("maxpause", maxpause)
            .field("ver", ver)
            .field("authid", authid)
            .field("from", from)
            .field("secure", secure)
            .field("accept", accept)
            .field("xmpp_version", xmpp_version)
            .finish()
    }
}

impl SessionParams {
    /// Reads the parameters from a creation response.
    pub fn from_body(body: &Body) -> Result<SessionParams, BodyError> {
        let el = &body.element;
        let sid = el.attr("sid").ok_or(BodyError::MissingAttr("sid"))?;
        let wait = number(el, "wait")?.ok_or(BodyError::MissingAttr("wait"))?;
        Ok(SessionParams {
            sid: sid.to_owned(),
            wait,
            // XEP-0124 §7.2: absent `requests` means the client may keep hold + 1 requests.
            requests: number(el, "requests")?.unwrap_or(2).max(1),
            hold: number(el, "hold")?.unwrap_or(1),
            polling: number(el, "polling")?,
            inactivity: number(el, "inactivity")?,
            maxpause: number(el, "maxpause")?,
            ver: el.attr("ver").map(str::to_owned),
            authid: el.attr("authid").map(str::to_owned),
            from: el.attr("from").map(str::to_owned),
            secure: el.attr("secure").map(|v| v == "true" || v == "1"),
            accept: el.attr("accept").map(str::to_owned),
            xmpp_version: el.attr_ns(Some(ns::XBOSH), "version").map(str::to_owned),
        })
    }
}

fn number(el: &Element, attr: &'static str) -> Result<Option<u32>, BodyError> {
    el.attr(attr)
        .map(|v| {
            v.trim().parse().map_err(|_| BodyError::BadNumber {
                attr,
                value: v.to_owned(),
            })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_request_has_every_attribute() {
        let b = Body::create(1000, "example.com", 30, "en");
        assert_eq!(
            std::str::from_utf8(&b.to_bytes()).unwrap(),
            "<body xmlns=\"http://jabber.org/protocol/httpbind\" content=\"text/xml; charset=utf-8\" \
             hold=\"1\" rid=\"1000\" to=\"example.com\" ver=\"1.6\" wait=\"30\" xml:lang=\"en\" \
             xmlns:xmpp=\"urn:xmpp:xbosh\" xmpp:version=\"1.0\"/>"
        );
    }

    #[test]
    fn request_round_trips_with_stanzas_in_their_own_namespace() {
        let msg = Element::new("message", ns::CLIENT)
            .with_attr("to", "b@x")
            .with_child(Element::new("body", ns::CLIENT).with_text("1 < 2"));
        let req = Body::request(7, "s1", [msg.clone()]);
        let bytes = req.to_bytes();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            "<body xmlns=\"http://jabber.org/protocol/httpbind\" rid=\"7\" sid=\"s1\">\
             <message xmlns=\"jabber:client\" to=\"b@x\"><body>1 &lt; 2</body></message></body>"
        );
        let back = Body::parse(&bytes).unwrap();
        assert_eq!(back, req);
        assert_eq!(back.into_children(), vec![msg]);
    }

    #[test]
    fn fast_path_bytes_equal_the_tree_serialization() {
        let msg = Element::new("message", ns::CLIENT).with_attr("to", "b@x");
        let mut payload = String::new();
        msg.write_xml(&mut payload, ns::HTTPBIND);
        msg.write_xml(&mut payload, ns::HTTPBIND);
        assert_eq!(
            request_bytes(5, "s\"1", &payload),
            Body::request(5, "s\"1", [msg.clone(), msg.clone()]).to_bytes()
        );
        assert_eq!(
            request_bytes(5, "s", ""),
            Body::request(5, "s", []).to_bytes()
        );
        assert_eq!(
            terminate_bytes(6, "s", &payload),
            Body::terminate(6, "s", [msg.clone(), msg]).to_bytes()
        );
        assert_eq!(
            terminate_bytes(6, "s", ""),
            Body::terminate(6, "s", []).to_bytes()
        );
    }

    #[test]
    fn restart_and_terminate_requests() {
        let r = Body::restart(8, "s1", "x", "en");
        assert_eq!(r.element.attr_ns(Some(ns::XBOSH), "restart"), Some("true"));
        let t = Body::terminate(9, "s1", []);
        assert_eq!(t.body_type(), BodyType::Terminate);
    }

    #[test]
    fn debug_hides_the_sid_here_and_in_what_holds_it() {
        let sid = "sid-CANARY-31f0";
        let raw = format!(
            "<body xmlns='http://jabber.org/protocol/httpbind' sid='{sid}' wait='60' requests='2'/>"
        );
        let params = SessionParams::from_body(&Body::parse(raw.as_bytes()).unwrap()).unwrap();
        let request = Body::request(7, sid, []).to_bytes();
        let meta = crate::bosh::SessionMeta {
            jid: "a@b/c".into(),
            params: params.clone(),
            attached: false,
            created: 0,
        };
        let record = crate::store::SessionRecord {
            bare: "a@b".into(),
            epoch: 1,
            meta: meta.encode(),
            caches: bytes::Bytes::new(),
            handed_on: 6,
            requests: vec![(7, request)],
        };
        for shown in [
            format!("{params:?}"),
            format!("{meta:?}"),
            format!("{record:?}"),
        ] {
            assert!(!shown.contains(sid), "{shown}");
        }
        assert!(format!("{params:?}").contains("wait: 60"));
    }

    #[test]
    fn reads_a_prosody_creation_response() {
        // As Prosody 0.12 answers, `stream:` prefix declared on the body.
        let raw = "<body xmlns:stream='http://etherx.jabber.org/streams' xmlns:xmpp='urn:xmpp:xbosh' \
                   requests='2' hold='1' wait='10' polling='5' inactivity='60' secure='true' ver='1.6' \
                   xmpp:version='1.0' sid='abc' authid='def' from='localhost' \
                   xmlns='http://jabber.org/protocol/httpbind'><stream:features>\
                   <mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><mechanism>PLAIN</mechanism>\
                   </mechanisms></stream:features></body>";
        let body = Body::parse(raw.as_bytes()).unwrap();
        let p = SessionParams::from_body(&body).unwrap();
        assert_eq!(
            p,
            SessionParams {
                sid: "abc".into(),
                wait: 10,
                requests: 2,
                hold: 1,
                polling: Some(5),
                inactivity: Some(60),
                maxpause: None,
                ver: Some("1.6".into()),
                authid: Some("def".into()),
                from: Some("localhost".into()),
                secure: Some(true),
                accept: None,
                xmpp_version: Some("1.0".into()),
            }
        );
        let features = body.children().next().unwrap();
        assert!(features.is("features", ns::STREAM));
        // Cut out of the body, the features element carries its own namespace.
        assert!(
            features
                .to_xml()
                .starts_with("<features xmlns=\"http://etherx.jabber.org/streams\">")
        );
    }

    #[test]
    fn terminate_with_condition() {
        let b = Body::parse(
            b"<body type='terminate' condition='item-not-found' xmlns='http://jabber.org/protocol/httpbind'/>",
        )
        .unwrap();
        assert_eq!(b.body_type(), BodyType::Terminate);
        assert_eq!(b.condition(), Some("item-not-found"));
    }

    #[test]
    fn exact_errors_for_bad_bodies() {
        assert_eq!(
            Body::parse(b"<html><p>502</p></html>"),
            Err(BodyError::NotBody {
                name: "html".into(),
                ns: String::new()
            })
        );
        assert_eq!(
            Body::parse(b"<body xmlns='http://jabber.org/protocol/httpbind'>"),
            Err(BodyError::Xml(ParseError::Unclosed("body".into())))
        );
        assert_eq!(Body::parse(b""), Err(BodyError::Xml(ParseError::Empty)));
        let no_sid =
            Body::parse(b"<body wait='5' xmlns='http://jabber.org/protocol/httpbind'/>").unwrap();
        assert_eq!(
            SessionParams::from_body(&no_sid),
            Err(BodyError::MissingAttr("sid"))
        );
        let bad_wait =
            Body::parse(b"<body sid='a' wait='soon' xmlns='http://jabber.org/protocol/httpbind'/>")
                .unwrap();
        assert_eq!(
            SessionParams::from_body(&bad_wait),
            Err(BodyError::BadNumber {
                attr: "wait",
                value: "soon".into()
            })
        );
        assert_eq!(
            BodyError::NotBody {
                name: "html".into(),
                ns: String::new()
            }
            .to_string(),
            "expected <body/> in the httpbind namespace, found <html/> in \"\""
        );
    }
}
