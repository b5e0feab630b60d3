//! SPEC §5 against the real Prosody: every kind of hostile frame costs only the page that sent
//! it. After each one, the user's other page still exchanges messages with a contact, and the
//! upstream session is the same one (the server shows one session, the daemon no re-login).

mod support;

use std::time::Duration;

use boshmux::xmpp::{Element, ns};
use support::daemon::Daemon;
use support::{Server, body_text, both, chat, next_message};

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
    vec![
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
