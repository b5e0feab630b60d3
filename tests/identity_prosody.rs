//! Identity (SPEC §3a) against the real Prosody and ejabberd: however a JID is spelled, one account is one
//! user, one upstream session and one token space; replies from the server's canonical spelling
//! match requests to another; SASLprep makes a password with a no-break space log in. Accounts:
//! group g27 and g28, `zoë` and `nbsp` (see scripts/prosody.sh and scripts/ejabberd.sh, which
//! register them through each server's admin tool so that the server prepares them itself).

mod support;

use std::time::Duration;

use boshmux::bosh::BoshClient;
use boshmux::xmpp::sasl::Mechanism;
use boshmux::xmpp::{Element, Jid, ns};
use reqwest::Method;
use support::daemon::{Daemon, Handoff};
use support::{Kind, Server, body_text, both, chat, next_stanza};

const LIMIT: Duration = Duration::from_secs(15);
const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";

async fn daemon(p: &Server) -> Daemon {
    Daemon::start(&p.bosh, &p.domain, |_| {}).await
}

/// `POST /api/v1/sessions` with `jid` spelled as given.
async fn hand_off(d: &Daemon, jid: &str, password: &str) -> (u16, serde_json::Value) {
    d.api(
        Method::POST,
        "/api/v1/sessions",
        Some(serde_json::json!({"jid": jid, "password": password})),
    )
    .await
}

/// A successful hand-off of `jid` spelled as given.
async fn handed_off(d: &Daemon, jid: &str, password: &str) -> Handoff {
    let (status, json) = hand_off(d, jid, password).await;
    assert!(
        status == 200 || status == 201,
        "hand-off of {jid:?}: {status} {json}"
    );
    Handoff {
        status,
        jid: json["jid"].as_str().unwrap().to_owned(),
        token: json["token"].as_str().unwrap().to_owned(),
        ticket: json["ticket"].as_str().unwrap().to_owned(),
    }
}

fn disco_info(id: &str, to: &str) -> Element {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", id)
        .with_attr("to", to)
        .with_child(Element::new("query", DISCO_INFO))
}

both!(spellings_of_one_account_are_one_session_and_one_token_space);
async fn spellings_of_one_account_are_one_session_and_one_token_space(p: Server) {
    let d = daemon(&p).await;
    let first = d.handoff("g27a", "pw-g27a").await;
    assert_eq!(
        (first.status, first.jid.as_str()),
        (201, "g27a@localhost/boshmux")
    );
    let mut page = d.page("g27a", &first.token).await;

    let mut tokens = vec![first.token.clone()];
    for spelling in ["G27A@localhost", "g27a@LocalHost.", "G27a@LOCALHOST"] {
        let again = handed_off(&d, spelling, "pw-g27a").await;
        assert_eq!(
            (again.status, again.jid.as_str()),
            (200, "g27a@localhost/boshmux"),
            "{spelling}"
        );
        tokens.push(again.token);
    }
    // Every token opens a page of the one session, whatever spelling the page's PLAIN authcid uses.
    let mut others = Vec::new();
    for (token, authcid) in tokens
        .iter()
        .zip(["g27a", "G27A", "g27a@LOCALHOST", "G27a"])
    {
        let other = d.page(authcid, token).await;
        assert_eq!(other.jid, "g27a@localhost/boshmux");
        others.push(other);
    }
    // The first page was never disturbed: its session still answers it.
    page.sync().await;
    assert!(
        !page.seen_frames().iter().any(|f| f.contains("<close")),
        "{:?}",
        page.seen_frames()
    );
    let bare = Jid::parse("g27a@localhost").unwrap();
    assert_eq!(p.sessions_of(&bare), ["g27a@localhost/boshmux"]);
    // The API finds the session under any spelling too.
    assert_eq!(d.info("G27A@LocalHost.").await["pages"], 5);
    let (status, list) = d.api(Method::GET, "/api/v1/sessions", None).await;
    assert_eq!((status, list.as_array().map(Vec::len)), (200, Some(1)));
    d.stop().await;
}

both!(an_iq_to_a_capitalised_jid_gets_the_answer_from_its_canonical_form);
async fn an_iq_to_a_capitalised_jid_gets_the_answer_from_its_canonical_form(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g28a", "pw-g28a").await;
    let mut page = d.page("g28a", &h.token).await;

    // The server answers for the account, and the answer reaches the page.
    let reply = page.iq(disco_info("q-bare", "G28B@LocalHost")).await;
    match p.kind {
        // Prosody answers from the canonical bare JID.
        Kind::Prosody => {
            assert_eq!(reply.attr("type"), Some("result"), "{reply}");
            assert_eq!(reply.attr("from"), Some("g28b@localhost"), "{reply}");
            assert!(reply.child("query", DISCO_INFO).is_some(), "{reply}");
        }
        // ejabberd refuses disco#info on another user's account (`not-allowed`) and writes its
        // answer from the spelling the request was sent to.
        Kind::Ejabberd => {
            assert_eq!(reply.attr("type"), Some("error"), "{reply}");
            assert_eq!(reply.attr("from"), Some("G28B@LocalHost"), "{reply}");
            assert!(reply.to_xml().contains("not-allowed"), "{reply}");
        }
    }

    // A request to a resource that holds its answer back, while a third party forges one.
    let mut b = p.contact("g28b", "other").await;
    let c = p.contact("g28c", "forger").await;
    page.send(&disco_info("q-full", "G28B@localhost/other"))
        .await;
    let request = loop {
        let s = next_stanza(&mut b.events, LIMIT).await;
        if s.is("iq", ns::CLIENT) && s.attr("type") == Some("get") {
            break s;
        }
    };
    let upstream_id = request.attr("id").unwrap().to_owned();
    let forged = Element::new("iq", ns::CLIENT)
        .with_attr("type", "result")
        .with_attr("id", upstream_id.clone())
        .with_attr("to", h.jid.clone())
        .with_child(
            Element::new("query", DISCO_INFO).with_child(
                Element::new("identity", DISCO_INFO)
                    .with_attr("category", "client")
                    .with_attr("type", "forged"),
            ),
        );
    c.handle.send(forged).await.unwrap();
    // Both servers deliver the forger's stanzas in order: once its message is at the page, the
    // forged answer has been through the daemon.
    c.handle
        .send(chat(&h.jid, "after the forgery"))
        .await
        .unwrap();
    let m = page.next_message().await;
    assert_eq!(body_text(&m).as_deref(), Some("after the forgery"));
    assert!(
        !page.seen_frames().iter().any(|f| f.contains("forged")),
        "a forged answer reached the page: {:?}",
        page.seen_frames()
    );

    let answer = Element::new("iq", ns::CLIENT)
        .with_attr("type", "result")
        .with_attr("id", upstream_id)
        .with_attr("to", request.attr("from").unwrap())
        .with_child(
            Element::new("query", DISCO_INFO).with_child(
                Element::new("identity", DISCO_INFO)
                    .with_attr("category", "client")
                    .with_attr("type", "web"),
            ),
        );
    b.handle.send(answer).await.unwrap();
    let reply = page
        .next_where(|e| e.is("iq", ns::CLIENT) && e.attr("id") == Some("q-full"))
        .await;
    assert_eq!(reply.attr("type"), Some("result"), "{reply}");
    assert_eq!(reply.attr("from"), Some("g28b@localhost/other"), "{reply}");
    assert!(reply.to_xml().contains("type=\"web\""), "{reply}");
    d.stop().await;
}

both!(a_non_ascii_localpart_in_any_case_is_one_session);
async fn a_non_ascii_localpart_in_any_case_is_one_session(p: Server) {
    let d = daemon(&p).await;
    let upper = handed_off(&d, "ZOË@localhost", "pw-zoë").await;
    assert_eq!(
        (upper.status, upper.jid.as_str()),
        (201, "zoë@localhost/boshmux")
    );
    let mut page = d.page("ZOË", &upper.token).await;
    // Composed or decomposed ë, upper or lower case: the same account.
    for spelling in ["zoë@localhost", "zoe\u{308}@localhost", "Zoë@LOCALHOST"] {
        let again = handed_off(&d, spelling, "pw-zoë").await;
        assert_eq!(
            (again.status, again.jid.as_str()),
            (200, "zoë@localhost/boshmux"),
            "{spelling:?}"
        );
        d.page("zoë", &again.token).await;
    }
    page.sync().await;
    let bare = Jid::parse("zoë@localhost").unwrap();
    assert_eq!(p.sessions_of(&bare), ["zoë@localhost/boshmux"]);
    d.stop().await;
}

both!(a_password_with_a_no_break_space_logs_in);
/// The server stored the password as SASLprep prepared it (U+00A0 became a space).
async fn a_password_with_a_no_break_space_logs_in(p: Server) {
    let jid = Jid::parse("nbsp@localhost").unwrap();
    let password = "pw-no\u{a0}break";
    for mechanism in [Mechanism::ScramSha1, Mechanism::Plain] {
        let mut cfg = p.bosh_config();
        cfg.mechanisms = vec![mechanism];
        let s = support::login(
            &BoshClient::new(cfg).unwrap(),
            &jid,
            password,
            Some("direct"),
        )
        .await
        .unwrap_or_else(|e| panic!("{mechanism:?}: {e}"));
        assert_eq!(s.jid.to_string(), "nbsp@localhost/direct");
        s.handle.terminate(Vec::new()).await.unwrap();
    }
    // Through the daemon, which picks a SCRAM mechanism from the server's offer.
    let d = daemon(&p).await;
    let h = handed_off(&d, "nbsp@localhost", password).await;
    assert_eq!((h.status, h.jid.as_str()), (201, "nbsp@localhost/boshmux"));
    d.page("nbsp", &h.token).await.sync().await;
    d.stop().await;
}

both!(a_jid_that_fails_preparation_is_a_clear_400);
async fn a_jid_that_fails_preparation_is_a_clear_400(p: Server) {
    let d = daemon(&p).await;
    for (jid, error) in [
        (
            "g27b\"x@localhost",
            "jid: localpart fails nodeprep: prohibited character `\"`",
        ),
        (
            "g27b\u{a0}@localhost",
            "jid: localpart fails nodeprep: prohibited character ` `",
        ),
        (
            "\u{5d0}g27b@localhost",
            "jid: localpart fails nodeprep: prohibited bidirectional text",
        ),
        (
            "g27b@local host",
            "jid: domain \"local host\" is not a valid domain name",
        ),
        ("@localhost", "jid: empty localpart"),
        ("g27b@localhost/", "jid: empty resource"),
    ] {
        let (status, json) = hand_off(&d, jid, "pw-g27b").await;
        assert_eq!(
            (status, json["error"].as_str()),
            (400, Some(error)),
            "{jid:?}"
        );
    }
    let long = format!("{}@localhost", "x".repeat(1024));
    let (status, json) = hand_off(&d, &long, "pw").await;
    assert_eq!(
        (status, json["error"].as_str()),
        (400, Some("jid: localpart longer than 1023 bytes"))
    );
    let (status, json) = hand_off(&d, "g27b@localhost", "pw\u{7}").await;
    assert_eq!(
        (status, json["error"].as_str()),
        (400, Some("password fails SASLprep (RFC 4013)"))
    );
    let (status, json) = d
        .api(Method::GET, "/api/v1/sessions/a%22b@localhost", None)
        .await;
    assert_eq!(status, 400, "{json}");
    let (status, list) = d.api(Method::GET, "/api/v1/sessions", None).await;
    assert_eq!((status, list), (200, serde_json::json!([])));

    // A page's stanza to such an address gets jid-malformed; its session carries on.
    let h = d.handoff("g27b", "pw-g27b").await;
    let mut page = d.page("g27b", &h.token).await;
    let reply = page.iq(disco_info("bad-to", "a\"b@localhost")).await;
    assert_eq!(reply.attr("type"), Some("error"), "{reply}");
    assert!(reply.to_xml().contains("jid-malformed"), "{reply}");
    page.sync().await;
    d.stop().await;
}
