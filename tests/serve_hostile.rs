//! SPEC §5 against the real Prosody and ejabberd: every kind of hostile frame costs only the page
//! that sent it. After each one, the user's other page still exchanges messages with a contact,
//! and the upstream session is the same one (the server shows one session, the daemon no
//! re-login). Hostile stanzas from a contact reach pages only as strict XML, whatever the
//! server's own parser let through.

mod support;

use std::time::Duration;

use boshmux::xmpp::{Element, ns};
use support::daemon::API_KEY;
use support::daemon::Daemon;
use support::{Kind, Server, body_text, both, chat, next_message, raw_login};

const LIMIT: Duration = Duration::from_secs(15);

enum Expect {
    /// A stream error with this condition, then close 1008.
    Stream(&'static str),
    /// A stanza error with this condition; the page stays open.
    Stanza(&'static str),
}

fn cases() -> Vec<(&'static str, String, Expect)> {
    use Expect::{Stanza, Stream};
    let deep = format!(
        "<message xmlns='jabber:client' to='g20b@localhost'>{}{}</message>",
        "<x>".repeat(100),
        "</x>".repeat(100)
    );
    let attrs: String = (0..100).map(|i| format!(" a{i}='v'")).collect();
    let big = format!(
        "<message xmlns='jabber:client' to='g20b@localhost'><body>{}</body></message>",
        "x".repeat(300 * 1024)
    );
    // One prefix declared once with a long namespace, used on ~43 000 children: 256 KiB as
    // sent, ~44 MB if every child declared the namespace again.
    let expanding = format!(
        "<message xmlns='jabber:client' id='wide' to='g20b@localhost' xmlns:p='urn:{}'>{}</message>",
        "n".repeat(1000),
        "<p:c/>".repeat(43_000)
    );
    assert!(expanding.len() <= 256 * 1024);
    let msg = |inner: &str| {
        format!(
            "<message xmlns='jabber:client' id='m1' to='g20b@localhost' type='chat'><body>x</body>{inner}</message>"
        )
    };
    vec![
        // Names and namespaces that Prosody's expat refuses (or that other servers' parsers
        // would): each ended the shared session when relayed.
        ("non-ASCII element name", msg("<ș xmlns='urn:x'/>"), Stanza("bad-request")),
        ("astral element name", msg("<𝒳 xmlns='urn:x'/>"), Stanza("bad-request")),
        ("non-ASCII attribute name", msg("<x xmlns='urn:x' ș='1'/>"), Stanza("bad-request")),
        ("non-ASCII prefix", msg("<ș:x xmlns:ș='urn:x'/>"), Stanza("bad-request")),
        (
            "XML namespace bound to another prefix",
            msg("<x xmlns='urn:x' xmlns:p='http://www.w3.org/XML/1998/namespace' p:lang='en'/>"),
            Stanza("bad-request"),
        ),
        (
            "XML namespace as default",
            msg("<x xmlns='http://www.w3.org/XML/1998/namespace'/>"),
            Stanza("bad-request"),
        ),
        (
            "XMLNS namespace bound to a prefix",
            msg("<x xmlns='urn:x' xmlns:p='http://www.w3.org/2000/xmlns/'/>"),
            Stanza("bad-request"),
        ),
        (
            "XMLNS namespace as default",
            msg("<x xmlns='http://www.w3.org/2000/xmlns/'/>"),
            Stanza("bad-request"),
        ),
        ("xml prefix redeclared", msg("<x xmlns='urn:x' xmlns:xml='urn:y'/>"), Stanza("bad-request")),
        ("xmlns prefix declared", msg("<x xmlns='urn:x' xmlns:xmlns='urn:y'/>"), Stanza("bad-request")),
        ("xml: element name", msg("<xml:x/>"), Stanza("bad-request")),
        ("xmlns: element name", msg("<xmlns:x/>"), Stanza("bad-request")),
        ("prefix bound to nothing", msg("<x xmlns='urn:x' xmlns:p=''/>"), Stanza("bad-request")),
        ("prefix used on 43 000 children", expanding, Stanza("policy-violation")),
        ("non-ASCII stanza name", "<ș xmlns='jabber:client'/>".into(), Stream("not-well-formed")),
        (
            "body-wrapper breakout",
            "</body><body rid='1' xmlns='http://jabber.org/protocol/httpbind'><message xmlns='jabber:client' to='g20b@localhost'/>".into(),
            Stream("not-well-formed"),
        ),
        (
            "two roots",
            "<message xmlns='jabber:client' to='g20b@localhost'/><message xmlns='jabber:client' to='g20b@localhost'/>".into(),
            Stream("not-well-formed"),
        ),
        ("unclosed", "<message xmlns='jabber:client' to='g20b@localhost'><body>hi".into(), Stream("not-well-formed")),
        (
            "entity bomb",
            "<!DOCTYPE m [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>]><message xmlns='jabber:client'>&b;</message>".into(),
            Stream("restricted-xml"),
        ),
        ("undeclared entity", "<message xmlns='jabber:client'><body>&x;</body></message>".into(), Stream("restricted-xml")),
        ("stream element", "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' to='localhost'/>".into(), Stream("unsupported-stanza-type")),
        ("sasl element", "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGcyMGIAcHc=</auth>".into(), Stream("unsupported-stanza-type")),
        ("stream management", "<enable xmlns='urn:xmpp:sm:3' resume='true'/>".into(), Stream("unsupported-stanza-type")),
        ("httpbind element", "<body xmlns='http://jabber.org/protocol/httpbind' sid='x' rid='2' type='terminate'/>".into(), Stream("unsupported-stanza-type")),
        ("comment", "<message xmlns='jabber:client' to='g20b@localhost'><!-- hi --></message>".into(), Stream("restricted-xml")),
        ("processing instruction", "<?xml-stylesheet href='x'?><message xmlns='jabber:client'/>".into(), Stream("restricted-xml")),
        ("control character", "<message xmlns='jabber:client' to='g20b@localhost'><body>a\u{1}b</body></message>".into(), Stream("not-well-formed")),
        ("control character reference", "<message xmlns='jabber:client' to='g20b@localhost'><body>a&#0;b</body></message>".into(), Stream("not-well-formed")),
        ("oversize", big, Stream("policy-violation")),
        ("deep nesting", deep, Stream("policy-violation")),
        ("too many attributes", format!("<message xmlns='jabber:client'{attrs}/>"), Stream("policy-violation")),
        ("iq without id", "<iq xmlns='jabber:client' type='get' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>".into(), Stanza("bad-request")),
        ("iq with a bad type", "<iq xmlns='jabber:client' type='fetch' id='q1' to='localhost'><ping xmlns='urn:xmpp:ping'/></iq>".into(), Stanza("bad-request")),
        ("bad address", "<message xmlns='jabber:client' id='m1' to='a@b@c'><body>x</body></message>".into(), Stanza("jid-malformed")),
    ]
}

both!(each_hostile_frame_costs_only_the_page_that_sent_it);
async fn each_hostile_frame_costs_only_the_page_that_sent_it(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
    let h = d.handoff("g20a", "pw-g20a").await;
    let mut steady = d.page("g20a", &h.token).await;
    steady.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g20b", "b").await;
    let (a_jid, _) = p.user("g20a");

    for (round, (name, frame, expect)) in cases().into_iter().enumerate() {
        let mut bad = d.page("g20a", &h.token).await;
        bad.send_raw(&frame).await;
        match expect {
            Expect::Stream(condition) => {
                let closed = bad.closed().await;
                assert_eq!(closed.code, 1008, "{name}: {closed:?}");
                let error = closed
                    .frames
                    .first()
                    .unwrap_or_else(|| panic!("{name}: no stream error"));
                assert!(
                    error.starts_with("<stream:error") && error.contains(&format!("<{condition} ")),
                    "{name}: expected {condition}, got {error}"
                );
            }
            Expect::Stanza(condition) => {
                let reply = bad.next().await;
                assert_eq!(reply.attr("type"), Some("error"), "{name}: {reply}");
                let error = reply.child("error", ns::CLIENT).unwrap();
                assert!(
                    error.child(condition, ns::STANZAS).is_some(),
                    "{name}: {reply}"
                );
                bad.sync().await; // still open and working
            }
        }
        // The user's other page and the shared session are untouched.
        let text = format!("round {round} after {name}");
        steady.send(&chat("g20b@localhost", &text)).await;
        assert_eq!(
            body_text(&next_message(&mut b.events, LIMIT).await),
            Some(text.clone()),
            "{name}"
        );
        b.handle
            .send(chat("g20a@localhost", &format!("ack {round}")))
            .await
            .unwrap();
        assert_eq!(
            body_text(&steady.next_message().await),
            Some(format!("ack {round}")),
            "{name}"
        );
    }
    assert_eq!(p.sessions_of(&a_jid), ["g20a@localhost/boshmux"]);
    assert_eq!(d.info("g20a@localhost").await["relogins"], 0);
    d.stop().await;
}

both!(a_forged_from_is_replaced_by_the_sessions_jid);
async fn a_forged_from_is_replaced_by_the_sessions_jid(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
    let h = d.handoff("g20c", "pw-g20c").await;
    let mut page = d.page("g20c", &h.token).await;
    let mut b = p.contact("g20d", "d").await;
    page.send_raw("<message xmlns='jabber:client' from='g20a@localhost/boshmux' to='g20d@localhost' type='chat'><body>who am i</body></message>")
        .await;
    let got = next_message(&mut b.events, LIMIT).await;
    assert_eq!(got.attr("from"), Some("g20c@localhost/boshmux"));
    d.stop().await;
}

both!(invalid_utf8_and_binary_frames_close_only_that_page);
async fn invalid_utf8_and_binary_frames_close_only_that_page(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
    let h = d.handoff("g23a", "pw-g23a").await;
    let mut steady = d.page("g23a", &h.token).await;

    let mut binary = d.page("g23a", &h.token).await;
    binary
        .send_message(tokio_tungstenite::tungstenite::Message::Binary(
            b"<message xmlns='jabber:client'/>".to_vec().into(),
        ))
        .await;
    let closed = binary.closed().await;
    assert_eq!(closed.code, 1008);
    assert!(
        closed.frames[0].contains("unsupported-encoding"),
        "{closed:?}"
    );

    let mut invalid = d.page("g23a", &h.token).await;
    let frame = tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
        b"<message xmlns='jabber:client'><body>\xff\xfe</body></message>".to_vec(),
        tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
            tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    invalid
        .send_message(tokio_tungstenite::tungstenite::Message::Frame(frame))
        .await;
    let closed = invalid.closed().await;
    assert!(matches!(closed.code, 1007 | 1006), "{closed:?}");

    steady.sync().await;
    let (a_jid, _) = p.user("g23a");
    assert_eq!(p.sessions_of(&a_jid), ["g23a@localhost/boshmux"]);
    d.stop().await;
}

/// A contact's session on the test server driven with raw BOSH bodies, so it can send bytes our
/// own serializer would never write. Requests are sent without waiting for their (held)
/// responses; the responses' stanzas arrive on `inbox`, each response's end as `None`.
struct RawContact {
    http: reqwest::Client,
    url: String,
    sid: String,
    rid: u64,
    inbox: tokio::sync::mpsc::UnboundedReceiver<Option<Element>>,
    inbox_tx: tokio::sync::mpsc::UnboundedSender<Option<Element>>,
    /// Requests not answered yet.
    outstanding: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Received and not yet asked for.
    pending: Vec<Element>,
}

impl RawContact {
    async fn login(p: &Server, user: &str) -> RawContact {
        let (jid, pw) = p.user(user);
        let (_, sid, rid) = raw_login(&p.bosh, &jid, &pw, "raw").await;
        let (inbox_tx, inbox) = tokio::sync::mpsc::unbounded_channel();
        RawContact {
            http: reqwest::Client::new(),
            url: p.bosh.clone(),
            sid,
            rid,
            inbox,
            inbox_tx,
            outstanding: std::sync::Arc::default(),
            pending: Vec::new(),
        }
    }

    /// Posts `payload` (raw XML) in the next request.
    fn send(&mut self, payload: &str) {
        let body = format!(
            "<body xmlns='http://jabber.org/protocol/httpbind' rid='{}' sid='{}'>{payload}</body>",
            self.rid, self.sid
        );
        self.rid += 1;
        let (http, url, tx) = (self.http.clone(), self.url.clone(), self.inbox_tx.clone());
        let outstanding = self.outstanding.clone();
        outstanding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::spawn(async move {
            let raw = http
                .post(url)
                .body(body)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            if let Ok(body) = boshmux::bosh::Body::parse(&raw) {
                for el in body.into_children() {
                    let _ = tx.send(Some(el));
                }
            }
            outstanding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            let _ = tx.send(None);
        });
    }

    /// The first stanza received that matches `want`, waiting up to `limit` for it.
    async fn next_where(&mut self, limit: Duration, want: impl Fn(&Element) -> bool) -> Element {
        if let Some(i) = self.pending.iter().position(&want) {
            return self.pending.remove(i);
        }
        tokio::time::timeout(limit, async {
            loop {
                // Keep a request at the server, as a client does, so it can answer.
                if self.outstanding.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                    self.send("");
                }
                match self.inbox.recv().await.expect("contact inbox open") {
                    Some(el) if want(&el) => return el,
                    Some(el) => self.pending.push(el),
                    None => {}
                }
            }
        })
        .await
        .expect("timed out waiting for the contact's stanza")
    }
}

/// The daemon's `/metrics` text.
async fn metrics(d: &Daemon) -> String {
    reqwest::Client::new()
        .get(d.url("/metrics"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

fn is_error_with(el: &Element, condition: &str) -> bool {
    el.attr("type") == Some("error")
        && el
            .child("error", ns::CLIENT)
            .is_some_and(|e| e.child(condition, ns::STANZAS).is_some())
}

both!(a_contacts_stanza_that_expands_upstream_is_dropped_not_retried);
/// A 180 KiB message declaring a 1 000-character namespace once, used on 30 000 children. The
/// daemon drops that one stanza (counted, bounced to the sender), keeps the session and delivers
/// the next message, whatever the server made of it:
/// - Prosody relays it declaring the namespace on every child, a ~30 MB response: dropped as
///   too large, `policy-violation`;
/// - ejabberd relays it unexpanded but leaves out the prefix declaration on `<message>` (its codec
///   rebuilds the message's own attributes), so every `<p:c/>` has an unbound prefix: dropped as
///   invalid, `not-acceptable`.
async fn a_contacts_stanza_that_expands_upstream_is_dropped_not_retried(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
    let h = d.handoff("g29a", "pw-g29a").await;
    let mut page = d.page("g29a", &h.token).await;
    page.send(&Element::new("presence", ns::CLIENT)).await;
    page.sync().await;
    let (a_jid, _) = p.user("g29a");
    let mut bob = RawContact::login(&p, "g29b").await;
    let before = metrics(&d).await;

    let hostile = format!(
        "<message xmlns='jabber:client' to='g29a@localhost/boshmux' type='chat' id='huge' xmlns:p='urn:{}'>\
         <body>hostile</body>{}</message>",
        "n".repeat(1000),
        "<p:c/>".repeat(30_000)
    );
    assert!(hostile.len() < 190 * 1024);
    bob.send(&hostile);
    // Prosody takes a while to write the ~30 MB.
    let bounce = bob
        .next_where(Duration::from_secs(90), |e| e.attr("id") == Some("huge"))
        .await;
    let (condition, reason) = match p.kind {
        Kind::Prosody => ("policy-violation", "too_large"),
        Kind::Ejabberd => ("not-acceptable", "invalid"),
    };
    assert!(is_error_with(&bounce, condition), "{bounce}");
    bob.send(
        "<message xmlns='jabber:client' to='g29a@localhost/boshmux' type='chat' id='next'><body>after</body></message>",
    );
    let got = page.next_message().await;
    assert_eq!(body_text(&got), Some("after".into()), "{got}");

    let after = metrics(&d).await;
    let dropped = format!("boshmux_inbound_stanzas_dropped_total{{reason=\"{reason}\"}}");
    assert_eq!(metric(&after, &dropped) - metric(&before, &dropped), 1);
    // Nothing of it reached the page.
    assert!(
        !page.seen_frames().iter().any(|f| f.contains("hostile")),
        "{:.300?}",
        page.seen_frames()
    );
    // (A resend may happen when Prosody takes longer than `wait` to write the ~30 MB; the
    // dropped stanza is still counted once, and nothing ends the session.)
    assert_eq!(metric(&after, "boshmux_relogins_total"), 0);
    assert_eq!(metric(&after, "boshmux_logins_total"), 1);
    assert_eq!(p.sessions_of(&a_jid), ["g29a@localhost/boshmux"]);
    assert_eq!(d.info("g29a@localhost").await["relogins"], 0);
    d.stop().await;
}

both!(pages_get_only_what_the_strict_parser_accepts_from_a_contact);
/// What the server's parser accepts and relays but a page's strict parser refuses (non-ASCII
/// names of XML 1.0's older character tables, such as `é`; Prosody's expat refuses `ș` or `𝒳`
/// itself; ejabberd's fast_xml relays the two below just the same) is dropped and counted, the sender
/// told; what can be written acceptably (prefixed attributes, redundant declarations) arrives
/// rewritten. Every frame a page gets parses under the page rules, and each message arrives once.
async fn pages_get_only_what_the_strict_parser_accepts_from_a_contact(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
    let h = d.handoff("g30a", "pw-g30a").await;
    let mut page = d.page("g30a", &h.token).await;
    page.send(&Element::new("presence", ns::CLIENT)).await;
    page.sync().await;
    let (a_jid, _) = p.user("g30a");
    let mut bob = RawContact::login(&p, "g30b").await;
    let before = metrics(&d).await;

    let to = "to='g30a@localhost/boshmux' type='chat'";
    let cases = [
        (
            "name",
            format!(
                "<message xmlns='jabber:client' {to} id='n1'><body>1</body><café xmlns='urn:x'/></message>"
            ),
        ),
        (
            "astral",
            format!(
                "<message xmlns='jabber:client' {to} id='n2'><body>2</body><x xmlns='urn:x' ñ='1'/></message>"
            ),
        ),
    ];
    // All in one request: a raw client posting three at once would run past the server's
    // `requests` window (ejabberd destroys a session for a rid 3 ahead).
    let mut payload: String = cases.iter().map(|(_, s)| s.as_str()).collect();
    // Redundant declarations and a prefixed attribute: repaired by being written anew.
    payload.push_str(&format!(
        "<message xmlns='jabber:client' {to} id='ok'><body>ok</body>\
         <x xmlns='urn:x' xmlns:q='urn:q' xmlns:unused='urn:unused' q:k='v'><q:y/></x></message>"
    ));
    bob.send(&payload);
    let got = page.next_message().await;
    assert_eq!(got.attr("id"), Some("ok"), "{got}");
    let x = got.child("x", "urn:x").unwrap();
    assert_eq!(x.attr_ns(Some("urn:q"), "k"), Some("v"));
    assert!(x.child("y", "urn:q").is_some());
    for id in ["n1", "n2"] {
        let bounce = bob.next_where(LIMIT, |e| e.attr("id") == Some(id)).await;
        assert!(is_error_with(&bounce, "not-acceptable"), "{bounce}");
    }
    let after = metrics(&d).await;
    let dropped = "boshmux_inbound_stanzas_dropped_total{reason=\"invalid\"}";
    assert_eq!(metric(&after, dropped) - metric(&before, dropped), 2);
    // The repaired message came once, and every frame the page got passes the page-side parser.
    page.sync().await;
    let ok = page
        .seen_frames()
        .iter()
        .filter(|f| f.contains("<body>ok</body>"))
        .count();
    assert_eq!(ok, 1, "{:?}", page.seen_frames());
    for frame in page.seen_frames() {
        if frame.starts_with("<stream:")
            || frame.starts_with("<open")
            || frame.starts_with("<close")
        {
            continue;
        }
        boshmux::xmpp::parse(frame.as_bytes(), &boshmux::xmpp::Limits::PAGE)
            .unwrap_or_else(|e| panic!("page got {frame:.200}: {e}"));
    }
    assert_eq!(metric(&after, "boshmux_relogins_total"), 0);
    assert_eq!(p.sessions_of(&a_jid), ["g30a@localhost/boshmux"]);
    d.stop().await;
}
