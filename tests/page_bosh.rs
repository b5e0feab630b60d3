//! Pages that speak BOSH (SPEC §4b) against the fake connection manager: the handshake, the rid
//! window and response cache, terminate, inactivity, hostile input, CORS, prebind and its
//! limits, how closes of SPEC §4 reach a BOSH page, and the rules of SPEC §5, §6 and §9 that
//! hold for every page (send rate, `pages_per_user`, the upgrade bucket, the handshake timeout,
//! the grace buffer). Against both real servers: rooms, presence replay, and BOSH and WebSocket
//! pages sharing one session (groups g30, g37, g38).

mod support;

use std::time::Duration;

use boshmux::config::Config;
use boshmux::fake_cm::FakeCm;
use boshmux::xmpp::{Element, ns};
use support::bosh_page::{BoshPage, post, terminate_condition};
use support::daemon::{API_KEY, Daemon, ORIGIN};
use support::{Server, both, chat, is_self_presence, muc_join};

async fn fake() -> FakeCm {
    support::fake_with(&[("u0", "p0"), ("u1", "p1")]).await
}

async fn daemon(fake: &FakeCm, tune: impl FnOnce(&mut Config)) -> Daemon {
    Daemon::start(&fake.url(), "example.test", tune).await
}

fn from_contact(text: &str) -> Element {
    chat("u0@example.test", text).with_attr("from", "friend@example.test/x")
}

async fn pages_of(d: &Daemon) -> u64 {
    d.info("u0@example.test").await["pages"].as_u64().unwrap()
}

/// `boshmux_bosh_pages` and `boshmux_prebinds_unused` from `/metrics`.
async fn bosh_gauges(d: &Daemon) -> (u64, u64) {
    let text = reqwest::get(d.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let gauge = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    };
    (
        gauge("boshmux_bosh_pages"),
        gauge("boshmux_prebinds_unused"),
    )
}

#[tokio::test]
async fn a_bosh_page_binds_to_the_sessions_jid_and_relays_both_ways() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let h = d.handoff("u0", "p0").await;
    let mut page = BoshPage::login(&d, "u0", &h.token).await;
    assert_eq!(page.jid, h.jid);
    assert_eq!(f.push("u0@example.test", from_contact("hello")), 1);
    let m = page.next_message().await;
    assert_eq!(support::body_text(&m).as_deref(), Some("hello"));
    // A stanza inheriting the body's namespace is a jabber:client stanza (XEP-0206).
    page.request("<message to='friend@example.test' type='chat' id='m1'><body>hi</body></message>")
        .await;
    support::eventually("the message upstream", Duration::from_secs(10), || async {
        f.received(&h.jid)
            .iter()
            .any(|s| s.attr("id") == Some("m1") && s.attr("from") == Some(h.jid.as_str()))
            .then_some(())
    })
    .await;
    d.stop().await;
}

#[tokio::test]
async fn a_repeated_rid_gets_the_cached_response_byte_for_byte() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let h = d.handoff("u0", "p0").await;
    let page = BoshPage::login(&d, "u0", &h.token).await;
    f.push("u0@example.test", from_contact("once"));
    let rid = page.rid;
    let text = page.body_text(rid, "");
    let first = page.raw(rid, &text).await;
    assert!(first.text.contains("once"), "{}", first.text);
    let again = page.raw(rid, &text).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.text, first.text);
    d.stop().await;
}

#[tokio::test]
async fn a_rid_out_of_window_ends_that_page_and_no_other() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let h = d.handoff("u0", "p0").await;
    let bad = BoshPage::login(&d, "u0", &h.token).await;
    let mut other = BoshPage::login(&d, "u0", &h.token).await;
    let mut ws = d.page("u0", &h.token).await;
    assert_eq!(pages_of(&d).await, 3);
    let ahead = bad.rid + 50;
    let a = bad.raw(ahead, &bad.body_text(ahead, "")).await;
    assert_eq!(
        terminate_condition(&a.body()).as_deref(),
        Some("item-not-found")
    );
    // The sid is gone: its next request is told so too.
    let rid = bad.rid;
    let a = bad.raw(rid, &bad.body_text(rid, "")).await;
    assert_eq!(
        terminate_condition(&a.body()).as_deref(),
        Some("item-not-found")
    );
    // A rid below the window (never sent, not cached) is out of window as well.
    let probe = BoshPage::login(&d, "u0", &h.token).await;
    let low = probe.rid - 30;
    let a = probe.raw(low, &probe.body_text(low, "")).await;
    assert_eq!(
        terminate_condition(&a.body()).as_deref(),
        Some("item-not-found")
    );
    f.push("u0@example.test", from_contact("still here"));
    assert!(other.next_message().await.to_xml().contains("still here"));
    assert!(ws.next_message().await.to_xml().contains("still here"));
    assert_eq!(pages_of(&d).await, 2);
    d.stop().await;
}

#[tokio::test]
async fn terminate_ends_that_page_only() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let h = d.handoff("u0", "p0").await;
    let mut leaving = BoshPage::login(&d, "u0", &h.token).await;
    let mut staying = BoshPage::login(&d, "u0", &h.token).await;
    let rid = leaving.rid;
    let a = leaving
        .raw(
            rid,
            &format!(
                "<body xmlns='http://jabber.org/protocol/httpbind' rid='{rid}' sid='{}' type='terminate'>\
                 <presence xmlns='jabber:client' type='unavailable'/></body>",
                leaving.sid
            ),
        )
        .await;
    assert_eq!(terminate_condition(&a.body()).as_deref(), Some(""));
    leaving.rid += 1;
    let after = leaving.request("").await;
    assert_eq!(
        terminate_condition(&after).as_deref(),
        Some("item-not-found")
    );
    f.push("u0@example.test", from_contact("for the one left"));
    assert!(
        staying
            .next_message()
            .await
            .to_xml()
            .contains("for the one left")
    );
    assert_eq!(pages_of(&d).await, 1);
    d.stop().await;
}

#[tokio::test]
async fn an_inactive_bosh_page_is_gone_and_the_session_stays() {
    let f = fake().await;
    let d = daemon(&f, |c| {
        c.limits.ws_dead_peer_timeout = Duration::from_secs(1);
        c.grace = Duration::from_secs(60);
    })
    .await;
    let h = d.handoff("u0", "p0").await;
    let (created, body) = BoshPage::create(&d, None, 1).await;
    assert_eq!(body.attr("inactivity"), Some("1"));
    drop(created);
    let mut silent = BoshPage::login(&d, "u0", &h.token).await;
    assert_eq!(pages_of(&d).await, 1);
    support::eventually("the silent page gone", Duration::from_secs(10), || async {
        (pages_of(&d).await == 0).then_some(())
    })
    .await;
    // The session stays (its grace applies), and a page after it binds again.
    assert_eq!(
        silent.request("").await.attr("condition"),
        Some("item-not-found")
    );
    let h2 = d.handoff("u0", "p0").await;
    assert_eq!(h2.status, 200, "the session was reused, not created again");
    let page = BoshPage::login(&d, "u0", &h2.token).await;
    assert_eq!(page.jid, h.jid);
    d.stop().await;
}

#[tokio::test]
async fn hostile_input_over_bosh_costs_that_page_only() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let h = d.handoff("u0", "p0").await;
    let mut hostile = BoshPage::login(&d, "u0", &h.token).await;
    let mut other = BoshPage::login(&d, "u0", &h.token).await;
    // A readable stanza with a fault: a stanza error, nothing upstream.
    let r = hostile
        .request("<iq xmlns='jabber:client' type='get' to='example.test'><ping xmlns='urn:xmpp:ping'/></iq>")
        .await;
    let err = r
        .elements()
        .next()
        .unwrap_or_else(|| panic!("no error: {r}"));
    assert_eq!(err.attr("type"), Some("error"), "{r}");
    // Not a stanza: a stream error for this page (remote-stream-error), nothing upstream.
    let r = hostile
        .request("<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>")
        .await;
    assert_eq!(
        terminate_condition(&r).as_deref(),
        Some("remote-stream-error"),
        "{r}"
    );
    assert!(
        r.child("error", ns::STREAM)
            .and_then(|e| e.child("unsupported-stanza-type", ns::STREAMS))
            .is_some(),
        "{r}"
    );
    // Not even XML: bad-request, the session untouched.
    let a = post(
        &d.url("/http-bind"),
        None,
        "<body xmlns='http://jabber.org/protocol/httpbind' rid='1' sid='x'>&lol;</body>",
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(
        terminate_condition(&a.body()).as_deref(),
        Some("bad-request")
    );
    f.push("u0@example.test", from_contact("all is well"));
    assert!(other.next_message().await.to_xml().contains("all is well"));
    let upstream = f.received(&h.jid);
    assert!(
        upstream
            .iter()
            .all(|s| s.name != "stream" && s.child("ping", ns::PING).is_none()),
        "{upstream:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn cors_is_answered_for_allowed_origins_only() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, d.url("/http-bind"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
            .send()
    };
    let ok = preflight(ORIGIN).await.unwrap();
    assert_eq!(ok.status(), 204);
    let h = ok.headers();
    assert_eq!(h["access-control-allow-origin"], ORIGIN);
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert!(
        h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase()
            .contains("content-type")
    );
    // A preflight is a browser's: without an Origin it is refused.
    let no_origin = http
        .request(reqwest::Method::OPTIONS, d.url("/http-bind"))
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(no_origin.status(), 403);
    assert!(
        no_origin
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    let refused = preflight("https://evil.example").await.unwrap();
    assert_eq!(refused.status(), 403);
    assert!(
        refused
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    // The POST itself from the allowed origin: allowed with credentials, per origin.
    let created = post(
        &d.url("/http-bind"),
        Some(ORIGIN),
        "<body xmlns='http://jabber.org/protocol/httpbind' rid='5' to='example.test' wait='1' hold='1'/>",
    )
    .await;
    assert_eq!(created.status, 200);
    assert!(created.body().attr("sid").is_some(), "{}", created.text);
    assert_eq!(created.headers["access-control-allow-origin"], ORIGIN);
    assert_eq!(created.headers["access-control-allow-credentials"], "true");
    assert_eq!(created.headers["vary"], "Origin");
    let a = post(
        &d.url("/http-bind"),
        Some("https://evil.example"),
        "<body xmlns='http://jabber.org/protocol/httpbind' rid='5' to='example.test' wait='1' hold='1'/>",
    )
    .await;
    assert_eq!(a.status, 403);
    assert!(a.headers.get("access-control-allow-origin").is_none());
    d.stop().await;
}

#[tokio::test]
async fn the_cookie_offers_external_from_an_allowed_origin() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let h = d.handoff("u0", "p0").await;
    let url = d.url("/http-bind");
    let create = "<body xmlns='http://jabber.org/protocol/httpbind' rid='77' to='example.test' wait='1' hold='1' ver='1.6'/>";
    let with_cookie = |origin: Option<&'static str>| {
        let mut req = reqwest::Client::new()
            .post(&url)
            .header("cookie", format!("boshmux_token={}", h.token))
            .body(create);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    let mechanisms = |text: String| {
        let body = boshmux::xmpp::parse(text.as_bytes(), &boshmux::xmpp::Limits::PAGE).unwrap();
        let mut names: Vec<String> = body
            .child("features", ns::STREAM)
            .unwrap()
            .child("mechanisms", ns::SASL)
            .unwrap()
            .elements()
            .map(Element::text)
            .collect();
        names.sort();
        (body.attr("sid").unwrap().to_owned(), names)
    };
    let (sid, names) = mechanisms(
        with_cookie(Some(ORIGIN))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(names, ["EXTERNAL", "PLAIN"]);
    let (_, names) = mechanisms(with_cookie(None).await.unwrap().text().await.unwrap());
    assert_eq!(
        names,
        ["PLAIN"],
        "a cookie without an Origin is no browser credential"
    );
    let a = post(
        &url,
        Some(ORIGIN),
        &format!(
            "<body xmlns='http://jabber.org/protocol/httpbind' rid='78' sid='{sid}'>\
             <auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth></body>"
        ),
    )
    .await;
    assert!(a.body().child("success", ns::SASL).is_some(), "{}", a.text);
    d.stop().await;
}

async fn prebind(
    d: &Daemon,
    user: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    d.api(
        reqwest::Method::POST,
        &format!("/api/v1/sessions/{user}@example.test/prebind"),
        body,
    )
    .await
}

#[tokio::test]
async fn a_prebind_logs_in_and_a_page_attaches_with_its_sid_and_rid() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let (status, json) = prebind(&d, "u1", None).await;
    assert_eq!(status, 404, "no session and no password: {json}");
    let (status, json) = prebind(&d, "u1", Some(serde_json::json!({"password": "p1"}))).await;
    assert_eq!(status, 201, "{json}");
    assert_eq!(json["jid"], "u1@example.test/boshmux");
    let sid = json["sid"].as_str().unwrap();
    let rid = json["rid"].as_u64().unwrap();
    let mut page = BoshPage::attach(&d, json["jid"].as_str().unwrap(), sid, rid);
    // The first request attaches the page; the contact's message reaches it.
    f.push(
        "u1@example.test",
        chat("u1@example.test", "welcome").with_attr("from", "friend@example.test/x"),
    );
    assert!(page.next_message().await.to_xml().contains("welcome"));
    assert_eq!(d.info("u1@example.test").await["pages"], 1);
    // A second prebind reuses the session.
    let (status, json) = prebind(&d, "u1", None).await;
    assert_eq!(status, 201, "{json}");
    assert_eq!(json["jid"], "u1@example.test/boshmux");
    let (status, _) = prebind(
        &d,
        "nobody-at-all",
        Some(serde_json::json!({"password": "x"})),
    )
    .await;
    assert_eq!(status, 422);
    d.stop().await;
}

#[tokio::test]
async fn prebind_called_in_a_loop_never_leaves_more_than_pages_per_user() {
    let f = fake().await;
    // The loop is long on a busy machine: pages must not time out meanwhile.
    let d = daemon(&f, |c| {
        c.limits.pages_per_user = 4;
        c.limits.ws_dead_peer_timeout = Duration::from_secs(600);
    })
    .await;
    let h = d.handoff("u0", "p0").await;
    let _attached = d.page("u0", &h.token).await;
    // A Converse tab that cannot reach /http-bind calls prebind_url again and again.
    let mut sids = Vec::new();
    for _ in 0..850 {
        let (status, json) = prebind(&d, "u0", None).await;
        assert_eq!(status, 201, "{json}");
        sids.push((
            json["sid"].as_str().unwrap().to_owned(),
            json["rid"].as_u64().unwrap(),
        ));
    }
    // Only the last three (4 minus the page attached) are live, and attach. (Their first
    // requests are held, as a page's poll is: they run on their own.)
    // The daemon holds three virtual sessions, all unused prebinds: nothing was left behind.
    assert_eq!(bosh_gauges(&d).await, (3, 3));
    let status = reqwest::Client::new()
        .get(d.url("/status"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        status.contains("<b>3</b> virtual BOSH sessions (<b>3</b> unused prebinds)"),
        "{status}"
    );
    let (evicted, newest) = sids.split_at(sids.len() - 3);
    let mut live = Vec::new();
    for (sid, rid) in newest {
        let mut page = BoshPage::attach(&d, &h.jid, sid, *rid);
        live.push(tokio::spawn(async move { page.request("").await }));
    }
    support::eventually(
        "the prebound pages attached",
        Duration::from_secs(10),
        || async { (pages_of(&d).await == 4).then_some(()) },
    )
    .await;
    // Every earlier one was evicted, oldest first: its sid is gone.
    for (sid, rid) in evicted {
        let mut page = BoshPage::attach(&d, &h.jid, sid, *rid);
        let body = page.request("").await;
        assert_eq!(
            terminate_condition(&body).as_deref(),
            Some("item-not-found"),
            "{body}"
        );
    }
    assert_eq!(pages_of(&d).await, 4);
    assert_eq!(bosh_gauges(&d).await, (3, 0));
    // Every slot holds an attached page: nothing to evict, a clear 429.
    let (status, json) = prebind(&d, "u0", None).await;
    assert_eq!(status, 429, "{json}");
    assert!(json["error"].as_str().unwrap().contains("too many pages"));
    d.stop().await;
}

#[tokio::test]
async fn a_logout_reaches_bosh_pages_as_a_terminate_condition() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let h = d.handoff("u0", "p0").await;
    let mut page = BoshPage::login(&d, "u0", &h.token).await;
    let (status, _) = d
        .api(
            reqwest::Method::DELETE,
            "/api/v1/sessions/u0@example.test",
            None,
        )
        .await;
    assert_eq!(status, 204);
    let t = page.terminated().await;
    assert_eq!(t.attr("condition"), Some("remote-stream-error"), "{t}");
    assert!(
        t.child("error", ns::STREAM)
            .and_then(|e| e.child("not-authorized", ns::STREAMS))
            .is_some(),
        "{t}"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_bosh_page_that_does_not_poll_is_ended_when_its_queue_is_full() {
    let f = fake().await;
    let d = daemon(&f, |c| c.limits.page_queue_bytes = 64 * 1024).await;
    let h = d.handoff("u0", "p0").await;
    let mut slow = BoshPage::login(&d, "u0", &h.token).await;
    let mut ws = d.page("u0", &h.token).await;
    let chunk = "z".repeat(8 * 1024);
    for i in 0..12 {
        f.push(
            "u0@example.test",
            from_contact(&chunk).with_attr("id", i.to_string()),
        );
        ws.next_where(|e| e.attr("id") == Some(&i.to_string()))
            .await;
    }
    let t = slow.terminated().await;
    assert_eq!(t.attr("condition"), Some("remote-stream-error"), "{t}");
    assert!(
        t.child("error", ns::STREAM)
            .and_then(|e| e.child("resource-constraint", ns::STREAMS))
            .is_some(),
        "{t}"
    );
    assert_eq!(pages_of(&d).await, 1);
    d.stop().await;
}

// Against each real server `scripts/test` starts: two BOSH pages (one logged in with the token,
// one prebound) and one WebSocket page of one user share the session — a contact's message
// reaches all three, a BOSH page's send reaches the others as a carbon, iq answers go to the
// page that asked.
both!(bosh_and_websocket_pages_share_one_session);
async fn bosh_and_websocket_pages_share_one_session(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
    let me = format!("g30a@{}", p.domain);
    let h = d.handoff("g30a", "pw-g30a").await;
    let mut b1 = BoshPage::login(&d, "g30a", &h.token).await;
    let (status, json) = d
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/sessions/{me}/prebind"),
            None,
        )
        .await;
    assert_eq!(status, 201, "{json}");
    let mut b2 = BoshPage::attach(
        &d,
        json["jid"].as_str().unwrap(),
        json["sid"].as_str().unwrap(),
        json["rid"].as_u64().unwrap(),
    );
    let mut ws = d.page("g30a", &h.token).await;
    assert_eq!(b1.jid, h.jid);
    assert_eq!(json["jid"], h.jid.as_str());
    b1.send(&Element::new("presence", ns::CLIENT)).await;
    let mut contact = p.contact("g30b", "desk").await;

    // The prebound page's first request attaches it; held until something comes.
    let b2_first = tokio::spawn(async move {
        let m = b2.next_message().await;
        (b2, m)
    });
    support::eventually("three pages", Duration::from_secs(10), || async {
        (d.info(&me).await["pages"] == 3).then_some(())
    })
    .await;
    contact
        .handle
        .send(chat(&me, "to every tab").with_attr("id", "c1"))
        .await
        .unwrap();
    let (mut b2, m) = b2_first.await.unwrap();
    assert_eq!(support::body_text(&m).as_deref(), Some("to every tab"));
    assert_eq!(
        support::body_text(&b1.next_message().await).as_deref(),
        Some("to every tab")
    );
    assert_eq!(
        support::body_text(&ws.next_message().await).as_deref(),
        Some("to every tab")
    );

    // A send from one BOSH page: the contact gets it once, the other pages a carbon.
    let contact_jid = format!("g30b@{}", p.domain);
    b1.send(&chat(&contact_jid, "from bosh tab").with_attr("id", "s1"))
        .await;
    let got = support::next_message(&mut contact.events, Duration::from_secs(15)).await;
    assert_eq!(support::body_text(&got).as_deref(), Some("from bosh tab"));
    assert_eq!(got.attr("from"), Some(h.jid.as_str()));
    let inner_of = |carbon: &Element| {
        carbon
            .child("sent", ns::CARBONS)
            .and_then(|s| s.child("forwarded", ns::FORWARD))
            .and_then(|f| f.child("message", ns::CLIENT))
            .and_then(support::body_text)
    };
    let c2 = b2.next_message().await;
    assert_eq!(inner_of(&c2).as_deref(), Some("from bosh tab"), "{c2}");
    let c3 = ws.next_where(|e| e.is("message", ns::CLIENT)).await;
    assert_eq!(inner_of(&c3).as_deref(), Some("from bosh tab"), "{c3}");

    // iq routing: the same id from a BOSH page and the WebSocket page, each gets its own answer.
    let query = |q: &str| {
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", "same-id")
            .with_attr("to", p.domain.as_str())
            .with_child(Element::new("query", q))
    };
    ws.send(&query("http://jabber.org/protocol/disco#items"))
        .await;
    b2.send(&query("http://jabber.org/protocol/disco#info"))
        .await;
    let r2 = b2.next_where(|e| e.is("iq", ns::CLIENT)).await;
    assert_eq!(r2.attr("id"), Some("same-id"));
    assert!(
        r2.child("query", "http://jabber.org/protocol/disco#info")
            .is_some(),
        "{r2}"
    );
    let r3 = ws.next_where(|e| e.is("iq", ns::CLIENT)).await;
    assert!(
        r3.child("query", "http://jabber.org/protocol/disco#items")
            .is_some(),
        "{r3}"
    );
    // One upstream session for the three pages.
    assert_eq!(
        p.sessions_of(&boshmux::xmpp::Jid::parse(&me).unwrap())
            .len(),
        1
    );
    d.stop().await;
}

#[tokio::test]
async fn the_prebind_call_refuses_browsers_missing_keys_and_bodies_not_declared_json() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let url = d.url("/api/v1/sessions/u0@example.test/prebind");
    let http = reqwest::Client::new();
    let json = r#"{"password": "p0"}"#;
    let no_key = http
        .post(&url)
        .header("content-type", "application/json")
        .body(json)
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let browser = http
        .post(&url)
        .bearer_auth(API_KEY)
        .header("origin", ORIGIN)
        .header("content-type", "application/json")
        .body(json)
        .send()
        .await
        .unwrap();
    assert_eq!(browser.status(), 403);
    let not_json = http
        .post(&url)
        .bearer_auth(API_KEY)
        .header("content-type", "text/plain")
        .body(json)
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 415);
    let err: serde_json::Value = serde_json::from_slice(&not_json.bytes().await.unwrap()).unwrap();
    assert!(err["error"].is_string(), "{err}");
    // None of them logged in; the same body declared JSON does.
    assert_eq!(
        d.api(
            reqwest::Method::GET,
            "/api/v1/sessions/u0@example.test",
            None
        )
        .await
        .0,
        404
    );
    let ok = http
        .post(&url)
        .bearer_auth(API_KEY)
        .header("content-type", "application/json; charset=utf-8")
        .body(json)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    d.stop().await;
}

#[tokio::test]
async fn a_bosh_page_sending_too_fast_gets_resource_constraint_errors() {
    let f = fake().await;
    let d = daemon(&f, |c| c.limits.page_send_rate = 5).await;
    let h = d.handoff("u0", "p0").await;
    let mut page = BoshPage::login(&d, "u0", &h.token).await;
    // 30 messages in one request: over the burst (twice the rate), each gets an error.
    let burst: String = (0..30)
        .map(|i| {
            chat("u1@example.test", "spam")
                .with_attr("id", format!("s{i}"))
                .to_xml()
        })
        .collect();
    let answer = page.request(&burst).await;
    let errors: Vec<&Element> = answer
        .elements()
        .filter(|e| e.attr("type") == Some("error"))
        .collect();
    for err in &errors {
        assert!(
            err.child("error", ns::CLIENT)
                .and_then(|e| e.child("resource-constraint", ns::STANZAS))
                .is_some(),
            "{err}"
        );
    }
    // The burst (10) went on, more only as the rate refills (a slow machine); the rest refused.
    assert!((5..=20).contains(&errors.len()), "{answer}");
    let sent_upstream = || {
        f.received(&h.jid)
            .iter()
            .filter(|s| s.attr("id").is_some_and(|id| id.starts_with('s')))
            .count()
    };
    support::eventually(
        "the accepted ones upstream",
        Duration::from_secs(10),
        || async { (sent_upstream() == 30 - errors.len()).then_some(()) },
    )
    .await;
    assert_eq!(pages_of(&d).await, 1, "the page stays");
    d.stop().await;
}

#[tokio::test]
async fn pages_per_user_counts_bosh_and_websocket_pages_together() {
    let f = fake().await;
    let d = daemon(&f, |c| c.limits.pages_per_user = 4).await;
    let h = d.handoff("u0", "p0").await;
    let _ws1 = d.page("u0", &h.token).await;
    let _b1 = BoshPage::login(&d, "u0", &h.token).await;
    let _ws2 = d.page("u0", &h.token).await;
    let _b2 = BoshPage::login(&d, "u0", &h.token).await;
    assert_eq!(pages_of(&d).await, 4);
    // A fifth page over BOSH: refused at bind with the condition README names for 4003.
    let mut fifth = BoshPage::authenticated(&d, "u0", &h.token).await;
    let refused = fifth.bind_answer().await;
    assert_eq!(
        terminate_condition(&refused).as_deref(),
        Some("policy-violation"),
        "{refused}"
    );
    // And over WebSocket: 4003.
    let mut ws = support::daemon::Page::open(&d, &[]).await.unwrap();
    ws.open_stream().await;
    let answer = ws.auth("PLAIN", &format!("\0u0\0{}", h.token)).await;
    assert!(answer.is("success", ns::SASL), "{answer}");
    assert_eq!(ws.bind().await.unwrap_err().code, 4003);
    assert_eq!(pages_of(&d).await, 4);
    d.stop().await;
}

#[tokio::test]
async fn bosh_page_creation_over_the_per_client_rate_is_refused_with_429() {
    let f = fake().await;
    let d = daemon(&f, |c| {
        c.limits.upgrade_rate = 1000;
        c.limits.upgrade_rate_per_client = 2;
    })
    .await;
    let create = "<body xmlns='http://jabber.org/protocol/httpbind' rid='9' to='example.test' wait='1' hold='1'/>";
    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..8 {
        let a = post(&d.url("/http-bind"), None, create).await;
        if a.status == 429 {
            refusal = Some(a.body());
        }
        statuses.push(a.status);
    }
    assert_eq!(statuses[0], 200, "{statuses:?}");
    let refusal = refusal.unwrap_or_else(|| panic!("never refused: {statuses:?}"));
    assert_eq!(
        terminate_condition(&refusal).as_deref(),
        Some("policy-violation"),
        "{refusal}"
    );
    // The bucket is this client's: another address still gets in.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap()
        .post(d.url("/http-bind"))
        .header("content-type", "text/xml; charset=utf-8")
        .body(create)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    d.stop().await;
}

/// CPU time this thread has used (user + system), from /proc (clock ticks of 10 ms).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // Fields 14 and 15 of proc(5), counted from the state (field 3) here.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// The daemon runs on this test's one thread (a current-thread runtime), so the thread's CPU
/// time is the daemon's.
#[tokio::test]
async fn a_bosh_page_that_never_authenticates_is_ended_after_the_handshake_timeout() {
    let f = fake().await;
    let d = daemon(&f, |c| {
        c.limits.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    let (mut waiting, _) = BoshPage::create(&d, None, 5).await;
    let (mut silent, _) = BoshPage::create(&d, None, 5).await;
    // A request held past the deadline is answered with the end.
    let end = waiting.request("").await;
    assert_eq!(
        terminate_condition(&end).as_deref(),
        Some("remote-stream-error"),
        "{end}"
    );
    assert!(
        end.child("error", ns::STREAM)
            .and_then(|e| e.child("connection-timeout", ns::STREAMS))
            .is_some(),
        "{end}"
    );
    // A page with no request held learns it at its next request; meanwhile its ended task
    // sleeps (it once woke for the past deadline in a loop, a core busy until `inactivity`).
    let before = thread_cpu();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = thread_cpu() - before;
    assert!(
        spent < Duration::from_millis(300),
        "{spent:?} of CPU in 2 s with one ended page idle"
    );
    let end = silent.request("").await;
    assert!(
        end.child("error", ns::STREAM)
            .and_then(|e| e.child("connection-timeout", ns::STREAMS))
            .is_some(),
        "{end}"
    );
    let after = silent.request("").await;
    assert_eq!(
        terminate_condition(&after).as_deref(),
        Some("item-not-found")
    );
    d.stop().await;
}

#[tokio::test]
async fn a_bosh_page_back_within_the_grace_period_gets_what_arrived_meanwhile() {
    let f = fake().await;
    let d = daemon(&f, |c| c.grace = Duration::from_secs(60)).await;
    let h = d.handoff("u0", "p0").await;
    let mut page = BoshPage::login(&d, "u0", &h.token).await;
    let rid = page.rid;
    let bye = page
        .raw(
            rid,
            &format!(
                "<body xmlns='http://jabber.org/protocol/httpbind' rid='{rid}' sid='{}' type='terminate'/>",
                page.sid
            ),
        )
        .await;
    assert_eq!(terminate_condition(&bye.body()).as_deref(), Some(""));
    page.rid += 1;
    assert_eq!(pages_of(&d).await, 0);
    for text in ["first", "second", "third"] {
        assert_eq!(f.push("u0@example.test", from_contact(text)), 1);
    }
    support::eventually(
        "three buffered messages",
        Duration::from_secs(10),
        || async { (d.info("u0@example.test").await["buffered"] == 3).then_some(()) },
    )
    .await;
    let mut back = BoshPage::login(&d, "u0", &h.token).await;
    for want in ["first", "second", "third"] {
        assert_eq!(
            support::body_text(&back.next_message().await).as_deref(),
            Some(want)
        );
    }
    // Delivered once: a page after it gets only what comes next.
    let mut other = BoshPage::login(&d, "u0", &h.token).await;
    f.push("u0@example.test", from_contact("fourth"));
    assert_eq!(
        support::body_text(&other.next_message().await).as_deref(),
        Some("fourth")
    );
    assert_eq!(
        support::body_text(&back.next_message().await).as_deref(),
        Some("fourth")
    );
    d.stop().await;
}

/// Waits for an available presence from `from` (bare JID prefix) at a BOSH page.
async fn sees_online(page: &mut BoshPage, from: &str) {
    page.next_where(|e| {
        e.is("presence", ns::CLIENT)
            && e.attr("type").is_none()
            && e.attr("from").is_some_and(|f| f.starts_with(from))
    })
    .await;
}

both!(a_late_bosh_page_gets_contacts_presence_replayed);
async fn a_late_bosh_page_gets_contacts_presence_replayed(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
    let h = d.handoff("g37a", "pw-g37a").await;
    let mut first = d.page("g37a", &h.token).await;
    let _b = p.contact("g37b", "other").await;
    let contact = format!("g37b@{}/", p.domain);
    first.send(&Element::new("presence", ns::CLIENT)).await;
    first
        .next_where(|e| {
            e.is("presence", ns::CLIENT)
                && e.attr("type").is_none()
                && e.attr("from").is_some_and(|f| f.starts_with(&contact))
        })
        .await;
    // The contact's presence came once, before this page: it is replayed from memory.
    let mut late = BoshPage::login(&d, "g37a", &h.token).await;
    late.send(&Element::new("presence", ns::CLIENT)).await;
    sees_online(&mut late, &contact).await;
    d.stop().await;
}

both!(a_room_joined_from_a_websocket_and_a_bosh_page_is_joined_once_and_left_with_the_last);
async fn a_room_joined_from_a_websocket_and_a_bosh_page_is_joined_once_and_left_with_the_last(
    p: Server,
) {
    const LIMIT: Duration = Duration::from_secs(15);
    let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
    let room = format!("g38room@{}", p.muc);
    // The contact is in the room first (an instant room) and watches who comes and goes.
    let mut b = p.contact("g38b", "other").await;
    b.handle.send(muc_join(&room, "bee")).await.unwrap();
    loop {
        if is_self_presence(&support::next_stanza(&mut b.events, LIMIT).await) {
            break;
        }
    }
    let instant = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "instant")
        .with_attr("to", room.as_str())
        .with_child(
            Element::new("query", "http://jabber.org/protocol/muc#owner")
                .with_child(Element::new("x", "jabber:x:data").with_attr("type", "submit")),
        );
    b.handle.send(instant).await.unwrap();
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.is("iq", ns::CLIENT) && s.attr("id") == Some("instant") {
            assert_eq!(s.attr("type"), Some("result"), "{s}");
            break;
        }
    }

    let h = d.handoff("g38a", "pw-g38a").await;
    let mut ws = d.page("g38a", &h.token).await;
    let mut bosh = BoshPage::login(&d, "g38a", &h.token).await;
    ws.send(&muc_join(&room, "ay")).await;
    ws.next_where(is_self_presence).await;
    // The BOSH page joins second: the room is replayed to it (the other occupant, then itself).
    let bee = format!("{room}/bee");
    bosh.send(&muc_join(&room, "ay")).await;
    bosh.next_where(|e| e.is("presence", ns::CLIENT) && e.attr("from") == Some(bee.as_str()))
        .await;
    bosh.next_where(is_self_presence).await;
    bosh.sync().await;

    // The BOSH page leaves first: it sees itself leave, the room does not.
    let from_ay = format!("{room}/ay");
    let leave = Element::new("presence", ns::CLIENT)
        .with_attr("to", from_ay.as_str())
        .with_attr("type", "unavailable");
    bosh.send(&leave).await;
    let gone = bosh
        .next_where(|e| e.attr("from") == Some(from_ay.as_str()))
        .await;
    assert_eq!(gone.attr("type"), Some("unavailable"), "{gone}");
    bosh.sync().await;
    ws.send(&chat(&room, "still in").with_attr("type", "groupchat"))
        .await;
    let mut joins = 0;
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("from") != Some(from_ay.as_str()) {
            continue;
        }
        if s.is("presence", ns::CLIENT) {
            assert_ne!(
                s.attr("type"),
                Some("unavailable"),
                "left upstream while a page was still in"
            );
            joins += 1;
        } else if s.is("message", ns::CLIENT) {
            assert_eq!(support::body_text(&s).as_deref(), Some("still in"));
            break;
        }
    }
    assert_eq!(joins, 1, "joined upstream exactly once");
    // The last page leaves: now the room sees us go.
    ws.send(&leave).await;
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("from") == Some(from_ay.as_str()) && s.is("presence", ns::CLIENT) {
            assert_eq!(s.attr("type"), Some("unavailable"), "{s}");
            break;
        }
    }
    d.stop().await;
}
