//! `boshmux serve` in front of the real Prosody: many pages, one upstream session, and the
//! multiplexing rules of SPEC §6 as pages and other accounts see them. Each test uses its own
//! group of accounts (see scripts/prosody.sh).

mod support;

use std::time::Duration;

use boshmux::bosh::BoshSession;
use boshmux::xmpp::{Element, ns};
use support::daemon::{Daemon, Page};
use support::{
    Prosody, Server, body_text, both, chat, eventually, is_self_presence, muc_join, next_message,
};

const LIMIT: Duration = Duration::from_secs(15);

async fn daemon(p: &Prosody) -> Daemon {
    Daemon::start(&p.bosh, &p.domain, |_| {}).await
}

/// Another account, logged in directly over BOSH and online.
async fn contact(p: &Prosody, user: &str) -> BoshSession {
    p.contact(user, "other").await
}

fn presence() -> Element {
    Element::new("presence", ns::CLIENT)
}

/// Waits for an available presence from `from` (bare JID prefix) at a page.
async fn sees_online(page: &mut Page, from: &str) {
    page.next_where(|e| {
        e.is("presence", ns::CLIENT)
            && e.attr("type").is_none()
            && e.attr("from").is_some_and(|f| f.starts_with(from))
    })
    .await;
}

/// A round trip through the session whose answer must be the page's very next frame: nothing
/// stray (another page's answer, a duplicate) arrived before it.
async fn strict_sync(page: &mut Page) {
    let id = format!("strict-{}", uuid::Uuid::new_v4().simple());
    let ping = Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", id.clone())
        .with_attr("to", "localhost")
        .with_child(Element::new("ping", ns::PING));
    page.send(&ping).await;
    let next = page.next().await;
    assert!(
        next.is("iq", ns::CLIENT) && next.attr("id") == Some(id.as_str()),
        "a stray frame before the round trip's answer: {next}"
    );
}

both!(three_pages_bind_the_same_jid_over_one_upstream_session);
async fn three_pages_bind_the_same_jid_over_one_upstream_session(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g08a", "pw-g08a").await;
    assert_eq!(h.status, 201);
    assert_eq!(h.jid, "g08a@localhost/boshmux");
    let mut pages = Vec::new();
    for _ in 0..3 {
        pages.push(d.page("g08a", &h.token).await);
    }
    for page in &pages {
        assert_eq!(page.jid, "g08a@localhost/boshmux");
    }
    // A second handoff reuses the live session.
    let again = d.handoff("g08a", "pw-g08a").await;
    assert_eq!(
        (again.status, again.jid.as_str()),
        (200, "g08a@localhost/boshmux")
    );
    assert_ne!(again.token, h.token);
    pages.push(d.page("g08a", &again.token).await);
    let (jid, _) = p.user("g08a");
    assert_eq!(p.sessions_of(&jid), ["g08a@localhost/boshmux"]);
    assert_eq!(d.info("g08a@localhost").await["pages"], 4);
    d.stop().await;
}

both!(a_message_from_another_account_reaches_every_page_exactly_once);
async fn a_message_from_another_account_reaches_every_page_exactly_once(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g09a", "pw-g09a").await;
    let mut pages = Vec::new();
    for _ in 0..3 {
        pages.push(d.page("g09a", &h.token).await);
    }
    pages[0].send(&presence()).await;
    let b = contact(&p, "g09b").await;
    for page in &mut pages {
        sees_online(page, "g09b@localhost").await;
    }
    b.handle.send(chat("g09a@localhost", "one")).await.unwrap();
    b.handle.send(chat("g09a@localhost", "two")).await.unwrap();
    for page in &mut pages {
        let first = page.next_message().await;
        let second = page.next_message().await;
        assert_eq!(
            (body_text(&first).as_deref(), body_text(&second).as_deref()),
            (Some("one"), Some("two")),
            "each page gets each message once, in order"
        );
        assert_eq!(first.attr("from"), Some("g09b@localhost/other"));
    }
    d.stop().await;
}

both!(a_pages_message_reaches_the_contact_once_and_the_other_pages_as_carbons);
async fn a_pages_message_reaches_the_contact_once_and_the_other_pages_as_carbons(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g10a", "pw-g10a").await;
    let mut p1 = d.page("g10a", &h.token).await;
    let mut p2 = d.page("g10a", &h.token).await;
    let mut p3 = d.page("g10a", &h.token).await;
    p1.send(&presence()).await;
    let mut b = contact(&p, "g10b").await;

    p1.send(&chat("g10b@localhost", "from tab 1").with_attr("id", "m1"))
        .await;
    p1.send(&chat("g10b@localhost", "marker")).await;
    let got = next_message(&mut b.events, LIMIT).await;
    assert_eq!(body_text(&got).as_deref(), Some("from tab 1"));
    assert_eq!(got.attr("from"), Some("g10a@localhost/boshmux"));
    let next = next_message(&mut b.events, LIMIT).await;
    assert_eq!(
        body_text(&next).as_deref(),
        Some("marker"),
        "the contact got it once"
    );

    for page in [&mut p2, &mut p3] {
        let carbon = page.next_where(|e| e.is("message", ns::CLIENT)).await;
        assert_eq!(carbon.attr("from"), Some("g10a@localhost"));
        assert_eq!(carbon.attr("to"), Some("g10a@localhost/boshmux"));
        let inner = carbon
            .child("sent", ns::CARBONS)
            .and_then(|s| s.child("forwarded", ns::FORWARD))
            .and_then(|f| f.child("message", ns::CLIENT))
            .expect("a XEP-0280 sent carbon");
        assert_eq!(body_text(inner).as_deref(), Some("from tab 1"));
        assert_eq!(inner.attr("to"), Some("g10b@localhost"));
        assert_eq!(inner.attr("from"), Some("g10a@localhost/boshmux"));
    }
    // The sender sees no carbon of its own message: its next message is the contact's reply.
    b.handle
        .send(chat("g10a@localhost/boshmux", "reply"))
        .await
        .unwrap();
    let next = p1.next_where(|e| e.is("message", ns::CLIENT)).await;
    assert_eq!(body_text(&next).as_deref(), Some("reply"));
    d.stop().await;
}

both!(two_pages_using_the_same_iq_id_each_get_only_their_own_answer);
async fn two_pages_using_the_same_iq_id_each_get_only_their_own_answer(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g11a", "pw-g11a").await;
    let mut p1 = d.page("g11a", &h.token).await;
    let mut p2 = d.page("g11a", &h.token).await;
    let query = |ns_: &str| {
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", "same-id")
            .with_attr("to", "localhost")
            .with_child(Element::new("query", ns_))
    };
    p1.send(&query("http://jabber.org/protocol/disco#info"))
        .await;
    p2.send(&query("http://jabber.org/protocol/disco#items"))
        .await;
    let r1 = p1.next_where(|e| e.is("iq", ns::CLIENT)).await;
    let r2 = p2.next_where(|e| e.is("iq", ns::CLIENT)).await;
    assert_eq!(
        (r1.attr("id"), r2.attr("id")),
        (Some("same-id"), Some("same-id"))
    );
    assert!(
        r1.child("query", "http://jabber.org/protocol/disco#info")
            .is_some(),
        "{r1}"
    );
    assert!(
        r2.child("query", "http://jabber.org/protocol/disco#items")
            .is_some(),
        "{r2}"
    );
    // Neither got the other's answer: the very next frame on each is a fresh round trip's.
    strict_sync(&mut p1).await;
    strict_sync(&mut p2).await;
    d.stop().await;
}

both!(unavailable_from_one_page_leaves_the_user_online_for_contacts);
async fn unavailable_from_one_page_leaves_the_user_online_for_contacts(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g12a", "pw-g12a").await;
    let mut p1 = d.page("g12a", &h.token).await;
    let mut p2 = d.page("g12a", &h.token).await;
    p1.send(&presence()).await;
    p2.send(&presence()).await;
    let mut b = contact(&p, "g12b").await;
    // b sees a online.
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.is("presence", ns::CLIENT) && s.attr("from") == Some("g12a@localhost/boshmux") {
            assert_eq!(s.attr("type"), None);
            break;
        }
    }
    p1.send(&presence().with_attr("type", "unavailable")).await;
    p1.sync().await; // the unavailable was handled before anything p2 sends next
    p2.send(&chat("g12b@localhost", "still here")).await;
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("from") == Some("g12a@localhost/boshmux") {
            assert!(
                s.is("message", ns::CLIENT),
                "contact saw {s} before the message"
            );
            assert_eq!(body_text(&s).as_deref(), Some("still here"));
            break;
        }
    }
    d.stop().await;
}

both!(a_late_page_gets_contacts_presence_replayed);
async fn a_late_page_gets_contacts_presence_replayed(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g13a", "pw-g13a").await;
    let mut p1 = d.page("g13a", &h.token).await;
    let _b = contact(&p, "g13b").await;
    p1.send(&presence()).await;
    sees_online(&mut p1, "g13b@localhost").await;

    let mut late = d.page("g13a", &h.token).await;
    late.send(&presence()).await;
    sees_online(&mut late, "g13b@localhost").await;
    d.stop().await;
}

both!(logout_closes_every_page_with_4001_and_revokes_the_token);
async fn logout_closes_every_page_with_4001_and_revokes_the_token(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g17a", "pw-g17a").await;
    let mut p1 = d.page("g17a", &h.token).await;
    let mut p2 = d.page("g17a", &h.token).await;
    let (status, _) = d
        .api(
            reqwest::Method::DELETE,
            "/api/v1/sessions/g17a@localhost",
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(p1.closed().await.code, 4001);
    assert_eq!(p2.closed().await.code, 4001);
    let mut again = Page::open(&d, &[]).await.unwrap();
    let err = again.login_plain("g17a", &h.token).await.unwrap_err();
    assert!(err.contains("not-authorized"), "{err}");
    let (jid, _) = p.user("g17a");
    p.await_sessions(&jid, "the upstream session to end", LIMIT, |s| s.is_empty())
        .await;
    let (status, _) = d
        .api(
            reqwest::Method::GET,
            "/api/v1/sessions/g17a@localhost",
            None,
        )
        .await;
    assert_eq!(status, 404);
    d.stop().await;
}

both!(cookies_count_only_from_an_allowed_origin);
async fn cookies_count_only_from_an_allowed_origin(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g18a", "pw-g18a").await;
    let cookie = format!("boshmux_token={}", h.token);

    // A foreign origin is refused before the upgrade.
    let refused = Page::open(
        &d,
        &[("origin", "https://evil.example"), ("cookie", &cookie)],
    )
    .await;
    assert_eq!(refused.err(), Some(403));

    // From the allowed origin, the cookie offers EXTERNAL and EXTERNAL works.
    let mut page = Page::open(
        &d,
        &[("origin", support::daemon::ORIGIN), ("cookie", &cookie)],
    )
    .await
    .unwrap();
    let features = page.open_stream().await;
    assert_eq!(Page::mechanisms(&features), ["EXTERNAL", "PLAIN"]);
    assert!(page.auth("EXTERNAL", "").await.is("success", ns::SASL));
    assert_eq!(page.bind().await.unwrap(), "g18a@localhost/boshmux");

    // Without an Origin header, a cookie is no credential.
    let mut bare = Page::open(&d, &[("cookie", &cookie)]).await.unwrap();
    let features = bare.open_stream().await;
    assert_eq!(Page::mechanisms(&features), ["PLAIN"]);
    let failure = bare.auth("EXTERNAL", "").await;
    assert!(failure.is("failure", ns::SASL), "{failure}");

    // The ticket redirect sets the cookie itself.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = http
        .get(d.url(&format!("/handoff?ticket={}&next=/app", h.ticket)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    assert_eq!(resp.headers()["location"], "/app");
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        set.starts_with("boshmux_token=")
            && set.contains("HttpOnly")
            && set.contains("SameSite=Lax"),
        "{set}"
    );
    let again = http
        .get(d.url(&format!("/handoff?ticket={}&next=/app", h.ticket)))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 403, "a ticket works once");
    d.stop().await;
}

both!(the_api_refuses_browsers_and_wrong_keys);
async fn the_api_refuses_browsers_and_wrong_keys(p: Server) {
    let d = daemon(&p).await;
    let http = reqwest::Client::new();
    let url = d.url("/api/v1/sessions");
    let no_key = http.get(&url).send().await.unwrap();
    assert_eq!(no_key.status().as_u16(), 401);
    let wrong = http
        .get(&url)
        .bearer_auth("wrong-key-wrong-key")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let browser = http
        .get(&url)
        .bearer_auth(support::daemon::API_KEY)
        .header("origin", support::daemon::ORIGIN)
        .send()
        .await
        .unwrap();
    assert_eq!(browser.status().as_u16(), 403);
    let body: serde_json::Value = serde_json::from_slice(&browser.bytes().await.unwrap()).unwrap();
    assert!(body["error"].as_str().unwrap().contains("Origin"));
    let (status, body) = d
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": "g18b@localhost", "password": "wrong"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"],
        "login refused: authentication failed: not-authorized"
    );
    let (status, _) = d
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": "nobody"})),
        )
        .await;
    assert_eq!(status, 400);
    d.stop().await;
}

both!(a_session_killed_by_the_server_is_restored_and_pages_keep_working);
async fn a_session_killed_by_the_server_is_restored_and_pages_keep_working(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g19a", "pw-g19a").await;
    let mut page = d.page("g19a", &h.token).await;
    let enable = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "notices")
        .with_child(Element::new("enable", ns::BOSHMUX_STATUS));
    assert_eq!(page.iq(enable).await.attr("type"), Some("result"));
    // A second page that did not ask for status notices.
    let mut quiet = d.page("g19a", &h.token).await;
    page.send(&presence()).await;
    let mut b = contact(&p, "g19b").await;
    sees_online(&mut page, "g19b@localhost").await;
    // The contact sees the user online.
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.is("presence", ns::CLIENT) && s.attr("from") == Some("g19a@localhost/boshmux") {
            break;
        }
    }
    let room = "g19room@conference.localhost";
    let in_room = |e: &Element| {
        is_self_presence(e) && e.attr("from") == Some("g19room@conference.localhost/ay")
    };
    page.send(&muc_join(room, "ay")).await;
    page.next_where(in_room).await;

    p.kill_session("g19a@localhost/boshmux");
    let notice = |state: &'static str| {
        move |e: &Element| {
            e.child("status", ns::BOSHMUX_STATUS)
                .is_some_and(|s| s.attr("state") == Some(state))
        }
    };
    page.next_where(notice("reconnecting")).await;
    page.next_where(notice("restored")).await;
    // The room was joined again by the new upstream session.
    page.next_where(in_room).await;
    let (jid, _) = p.user("g19a");
    assert_eq!(
        p.sessions_of(&jid),
        ["g19a@localhost/boshmux"],
        "same resource after re-login"
    );
    assert_eq!(d.info("g19a@localhost").await["relogins"], 1);
    // Presence was restored: after the server's offline for the lost session, online again.
    let mut seen = Vec::new();
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.is("presence", ns::CLIENT) && s.attr("from") == Some("g19a@localhost/boshmux") {
            seen.push(s.attr("type").unwrap_or("available").to_owned());
            if seen.last().map(String::as_str) == Some("available") {
                break;
            }
        }
    }
    // Prosody tells the contact about the lost session before the new one; ejabberd (after
    // `kick_user`) was seen to send only the new session's available. Either way the contact ends
    // up seeing the user online.
    match p.kind {
        support::Kind::Prosody => assert_eq!(seen, ["unavailable", "available"]),
        support::Kind::Ejabberd => assert_eq!(seen.last().map(String::as_str), Some("available")),
    }
    b.handle
        .send(chat("g19a@localhost", "after the restore"))
        .await
        .unwrap();
    assert_eq!(
        body_text(&page.next_message().await).as_deref(),
        Some("after the restore")
    );
    // The page that did not opt in saw no notice: its next message is the contact's.
    let next = quiet
        .next_where(|e| {
            e.is("message", ns::CLIENT)
                && (e.child("body", ns::CLIENT).is_some()
                    || e.child("status", ns::BOSHMUX_STATUS).is_some())
        })
        .await;
    assert_eq!(
        body_text(&next).as_deref(),
        Some("after the restore"),
        "{next}"
    );
    page.send(&chat("g19b@localhost", "me too")).await;
    assert_eq!(
        body_text(&next_message(&mut b.events, LIMIT).await).as_deref(),
        Some("me too")
    );
    d.stop().await;
}

both!(a_room_joined_from_two_pages_is_joined_once_and_left_with_the_last_page);
async fn a_room_joined_from_two_pages_is_joined_once_and_left_with_the_last_page(p: Server) {
    let d = daemon(&p).await;
    let room = "g14room@conference.localhost";
    // The contact is in the room first and watches who comes and goes.
    let mut b = contact(&p, "g14b").await;
    b.handle.send(muc_join(room, "bee")).await.unwrap();
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if is_self_presence(&s) {
            break;
        }
    }
    // A new room stays locked until configured: accept the defaults (an "instant room").
    let instant = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "instant")
        .with_attr("to", room)
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

    let h = d.handoff("g14a", "pw-g14a").await;
    let mut p1 = d.page("g14a", &h.token).await;
    let mut p2 = d.page("g14a", &h.token).await;
    p1.send(&muc_join(room, "ay")).await;
    p1.next_where(is_self_presence).await;
    p2.send(&muc_join(room, "ay")).await;
    // The second page gets the room replayed: the other occupant and its own presence.
    p2.next_where(|e| {
        e.is("presence", ns::CLIENT) && e.attr("from") == Some(&format!("{room}/bee"))
    })
    .await;
    p2.next_where(is_self_presence).await;
    // The room's presence reaches every page anyway: make sure the session has taken p2's join.
    p2.sync().await;

    let from_ay = format!("{room}/ay");
    let leave = presence()
        .with_attr("to", format!("{room}/ay"))
        .with_attr("type", "unavailable");
    p1.send(&leave).await;
    let gone = p1
        .next_where(|e| e.attr("from") == Some(from_ay.as_str()))
        .await;
    assert_eq!(
        gone.attr("type"),
        Some("unavailable"),
        "the leaving page sees itself leave"
    );
    p1.sync().await;
    // The room still has us: a message from the other page goes through...
    p2.send(&chat(room, "still in").with_attr("type", "groupchat"))
        .await;
    // ...and the watcher saw one join, no leave, then the message.
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
            assert_eq!(body_text(&s).as_deref(), Some("still in"));
            break;
        }
    }
    assert_eq!(joins, 1, "joined upstream exactly once");
    // The last page leaves: now the room sees us go.
    p2.send(&leave).await;
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("from") == Some(from_ay.as_str()) && s.is("presence", ns::CLIENT) {
            assert_eq!(s.attr("type"), Some("unavailable"));
            break;
        }
    }
    d.stop().await;
}

both!(after_the_last_page_and_the_grace_period_the_user_goes_offline);
async fn after_the_last_page_and_the_grace_period_the_user_goes_offline(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |c| c.grace = Duration::from_millis(300)).await;
    let h = d.handoff("g15a", "pw-g15a").await;
    let mut page = d.page("g15a", &h.token).await;
    page.send(&presence()).await;
    let mut b = contact(&p, "g15b").await;
    sees_online(&mut page, "g15b@localhost").await;
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("from") == Some("g15a@localhost/boshmux") && s.attr("type").is_none() {
            break;
        }
    }
    assert_eq!(page.close().await.code, 1000);
    // After the grace period the contact sees the user go offline.
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("from") == Some("g15a@localhost/boshmux") {
            assert_eq!(s.attr("type"), Some("unavailable"));
            break;
        }
    }
    let (jid, _) = p.user("g15a");
    p.await_sessions(&jid, "no upstream session", LIMIT, |s| s.is_empty())
        .await;
    eventually("the session gone from the API", LIMIT, || async {
        let (status, _) = d
            .api(
                reqwest::Method::GET,
                "/api/v1/sessions/g15a@localhost",
                None,
            )
            .await;
        (status == 404).then_some(())
    })
    .await;
    d.stop().await;
}

both!(a_page_back_within_the_grace_period_gets_what_arrived_meanwhile_once_and_in_order);
async fn a_page_back_within_the_grace_period_gets_what_arrived_meanwhile_once_and_in_order(
    p: Server,
) {
    let d = Daemon::start(&p.bosh, &p.domain, |c| c.grace = Duration::from_secs(30)).await;
    let h = d.handoff("g16a", "pw-g16a").await;
    let mut page = d.page("g16a", &h.token).await;
    page.send(&presence()).await;
    let b = contact(&p, "g16b").await;
    sees_online(&mut page, "g16b@localhost").await;
    page.drop_connection().await; // a reload: no goodbye

    eventually("the page to be gone", LIMIT, || async {
        (d.info("g16a@localhost").await["pages"] == 0).then_some(())
    })
    .await;
    for text in ["first", "second", "third"] {
        b.handle.send(chat("g16a@localhost", text)).await.unwrap();
    }
    eventually("three buffered messages", LIMIT, || async {
        (d.info("g16a@localhost").await["buffered"] == 3).then_some(())
    })
    .await;
    let mut back = d.page("g16a", &h.token).await;
    for want in ["first", "second", "third"] {
        assert_eq!(body_text(&back.next_message().await).as_deref(), Some(want));
    }
    // Delivered once: another page sees none of them, only what comes next.
    let mut other = d.page("g16a", &h.token).await;
    b.handle
        .send(chat("g16a@localhost", "fourth"))
        .await
        .unwrap();
    assert_eq!(
        body_text(&other.next_message().await).as_deref(),
        Some("fourth")
    );
    assert_eq!(
        body_text(&back.next_message().await).as_deref(),
        Some("fourth")
    );
    let (jid, _) = p.user("g16a");
    assert_eq!(
        p.sessions_of(&jid),
        ["g16a@localhost/boshmux"],
        "the same upstream session throughout"
    );
    d.stop().await;
}

both!(attach_hands_an_existing_bosh_session_to_pages_and_its_loss_is_4004);
async fn attach_hands_an_existing_bosh_session_to_pages_and_its_loss_is_4004(p: Server) {
    let d = daemon(&p).await;
    let (jid, pw) = p.user("g21a");
    // The web app logs in itself and hands over sid and rid, as for Strophe's attach().
    let (full, sid, rid) = support::raw_login(&p.bosh, &jid, &pw, "webapp").await;
    let (status, json) = d
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": full.to_string(), "sid": sid, "rid": rid})),
        )
        .await;
    assert_eq!(status, 201, "{json}");
    assert_eq!(json["jid"], "g21a@localhost/webapp");
    let token = json["token"].as_str().unwrap().to_owned();
    let mut page = d.page("g21a", &token).await;
    assert_eq!(page.jid, "g21a@localhost/webapp");
    page.send(&presence()).await;
    let mut b = contact(&p, "g21b").await;
    sees_online(&mut page, "g21b@localhost").await;
    page.send(&chat("g21b@localhost", "from the attached session"))
        .await;
    assert_eq!(
        body_text(&next_message(&mut b.events, LIMIT).await).as_deref(),
        Some("from the attached session")
    );
    b.handle
        .send(chat("g21a@localhost/webapp", "back"))
        .await
        .unwrap();
    assert_eq!(
        body_text(&page.next_message().await).as_deref(),
        Some("back")
    );
    assert_eq!(d.info("g21a@localhost").await["attached"], true);
    assert_eq!(p.sessions_of(&jid), ["g21a@localhost/webapp"]);

    // No password is held, so a lost session cannot be restored: pages are told 4004.
    p.kill_session("g21a@localhost/webapp");
    assert_eq!(page.closed().await.code, 4004);
    d.stop().await;
}

fn version_query(id: &str, to: &str) -> Element {
    Element::new("iq", ns::CLIENT)
        .with_attr("type", "get")
        .with_attr("id", id)
        .with_attr("to", to)
        .with_child(Element::new("query", "jabber:iq:version"))
}

both!(a_request_from_a_contact_goes_to_every_page_and_the_first_answer_wins);
async fn a_request_from_a_contact_goes_to_every_page_and_the_first_answer_wins(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |c| c.grace = Duration::from_secs(30)).await;
    let h = d.handoff("g24a", "pw-g24a").await;
    let mut p1 = d.page("g24a", &h.token).await;
    let mut p2 = d.page("g24a", &h.token).await;
    let mut b = contact(&p, "g24b").await;

    b.handle
        .send(version_query("v1", "g24a@localhost/boshmux"))
        .await
        .unwrap();
    let is_query = |e: &Element| e.is("iq", ns::CLIENT) && e.attr("id") == Some("v1");
    let q1 = p1.next_where(is_query).await;
    let q2 = p2.next_where(is_query).await;
    assert_eq!(q1.attr("from"), Some("g24b@localhost/other"));
    let answer = |name: &str| {
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "result")
            .with_attr("id", "v1")
            .with_attr("to", "g24b@localhost/other")
            .with_child(
                Element::new("query", "jabber:iq:version")
                    .with_child(Element::new("name", "jabber:iq:version").with_text(name)),
            )
    };
    assert_eq!(q2.attr("from"), Some("g24b@localhost/other"));
    p2.send(&answer("tab two")).await;
    p2.sync().await;
    p1.send(&answer("tab one")).await;
    p1.sync().await;
    // Whatever a's session sent upstream in between reaches b before this marker.
    p1.send(&chat("g24b@localhost", "marker")).await;
    let mut answers = Vec::new();
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.is("iq", ns::CLIENT) && s.attr("id") == Some("v1") {
            answers.push(
                s.child("query", "jabber:iq:version")
                    .unwrap()
                    .elements()
                    .next()
                    .unwrap()
                    .text(),
            );
        }
        if body_text(&s).as_deref() == Some("marker") {
            break;
        }
    }
    assert_eq!(
        answers,
        ["tab two"],
        "only the first page's answer goes upstream"
    );

    // With no page attached the daemon answers for the user.
    p1.close().await;
    p2.close().await;
    support::eventually("no pages", LIMIT, || async {
        (d.info("g24a@localhost").await["pages"] == 0).then_some(())
    })
    .await;
    b.handle
        .send(version_query("v3", "g24a@localhost/boshmux"))
        .await
        .unwrap();
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("id") == Some("v3") {
            assert_eq!(s.attr("type"), Some("error"));
            assert!(
                s.child("error", ns::CLIENT)
                    .unwrap()
                    .child("service-unavailable", ns::STANZAS)
                    .is_some(),
                "{s}"
            );
            break;
        }
    }
    d.stop().await;
}

both!(a_second_pages_roster_request_is_answered_from_the_cache);
async fn a_second_pages_roster_request_is_answered_from_the_cache(p: Server) {
    let d = daemon(&p).await;
    let h = d.handoff("g13c", "pw-g13c").await;
    let mut p1 = d.page("g13c", &h.token).await;
    let mut p2 = d.page("g13c", &h.token).await;
    let roster_get = |id: &str| {
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "get")
            .with_attr("id", id)
            .with_child(Element::new("query", ns::ROSTER))
    };
    let items = |r: &Element| -> Vec<String> {
        let mut v: Vec<String> = r
            .child("query", ns::ROSTER)
            .unwrap()
            .elements()
            .filter_map(|i| i.attr("jid").map(str::to_owned))
            .collect();
        v.sort();
        v
    };
    let first = p1.iq(roster_get("r1")).await;
    assert_eq!(
        items(&first),
        ["g13a@localhost", "g13b@localhost", "g13d@localhost"]
    );
    let sent_before = d.info("g13c@localhost").await["stanzas_out"].clone();
    let second = p2.iq(roster_get("r2")).await;
    assert_eq!(second.attr("id"), Some("r2"));
    assert_eq!(items(&second), items(&first));
    assert_eq!(
        d.info("g13c@localhost").await["stanzas_out"],
        sent_before,
        "answered without asking upstream"
    );
    d.stop().await;
}

// ---- Rooms, presence, carbons and server requests as a real client would see them (SPEC §6) ----

/// The next stanza at a directly connected account that matches `want`.
async fn until(s: &mut BoshSession, want: impl Fn(&Element) -> bool) -> Element {
    loop {
        let e = support::next_stanza(&mut s.events, LIMIT).await;
        if want(&e) {
            return e;
        }
    }
}

/// Sends an iq from a directly connected account and waits for its answer.
async fn direct_iq(s: &mut BoshSession, iq: Element) -> Element {
    let id = iq.attr("id").expect("iq id").to_owned();
    s.handle.send(iq).await.unwrap();
    until(s, |e| {
        e.is("iq", ns::CLIENT) && e.attr("id") == Some(id.as_str())
    })
    .await
}

const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";
const MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";

/// `s` creates `room` as `nick` and configures it with `fields` (XEP-0045 §10.1.3).
async fn create_room(s: &mut BoshSession, room: &str, nick: &str, fields: &[(&str, &str)]) {
    s.handle.send(muc_join(room, nick)).await.unwrap();
    until(s, is_self_presence).await;
    let mut form = Element::new("x", "jabber:x:data")
        .with_attr("type", "submit")
        .with_child(
            Element::new("field", "jabber:x:data")
                .with_attr("var", "FORM_TYPE")
                .with_child(
                    Element::new("value", "jabber:x:data")
                        .with_text("http://jabber.org/protocol/muc#roomconfig"),
                ),
        );
    for (var, value) in fields {
        form.push_child(
            Element::new("field", "jabber:x:data")
                .with_attr("var", *var)
                .with_child(Element::new("value", "jabber:x:data").with_text(*value)),
        );
    }
    let config = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "config")
        .with_attr("to", room)
        .with_child(Element::new("query", MUC_OWNER).with_child(form));
    let answer = direct_iq(s, config).await;
    assert_eq!(answer.attr("type"), Some("result"), "{answer}");
}

fn status_codes(e: &Element) -> Vec<String> {
    e.child("x", ns::MUC_USER)
        .map(|x| {
            x.elements()
                .filter(|s| s.name == "status")
                .filter_map(|s| s.attr("code").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn groupchat(room: &str, body: &str) -> Element {
    chat(room, body).with_attr("type", "groupchat")
}

async fn a_nick_change_then_a_sibling_leaving_keeps_the_room_under_the_new_nick(p: Prosody) {
    let d = daemon(&p).await;
    let room = "g27room@conference.localhost";
    let mut b = contact(&p, "g27b").await;
    create_room(&mut b, room, "bee", &[]).await;
    let h = d.handoff("g27a", "pw-g27a").await;
    let mut p1 = d.page("g27a", &h.token).await;
    let mut p2 = d.page("g27a", &h.token).await;
    p1.send(&muc_join(room, "ay")).await;
    p1.next_where(is_self_presence).await;
    p2.send(&muc_join(room, "ay")).await;
    p2.next_where(is_self_presence).await;
    let (old, new) = (format!("{room}/ay"), format!("{room}/ay2"));
    until(&mut b, |e| e.attr("from") == Some(old.as_str())).await;

    // Page 1 renames: the room answers 303 for the old nick, then the new self-presence.
    p1.send(&presence().with_attr("to", new.clone())).await;
    let renamed = p1
        .next_where(|e| e.attr("from") == Some(new.as_str()) && is_self_presence(e))
        .await;
    assert_eq!(renamed.attr("type"), None);
    p2.next_where(|e| e.attr("from") == Some(new.as_str()))
        .await;
    // Page 2 leaves, as its client knows the room: it alone sees itself go.
    p2.send(
        &presence()
            .with_attr("to", new.clone())
            .with_attr("type", "unavailable"),
    )
    .await;
    let gone = p2
        .next_where(|e| e.attr("from") == Some(new.as_str()))
        .await;
    assert_eq!(gone.attr("type"), Some("unavailable"));
    p2.sync().await;
    p1.send(&groupchat(room, "still in")).await;
    // Page 1 is still in the room: its message comes back from the room.
    let echo = p1
        .next_where(|e| e.is("message", ns::CLIENT) && e.attr("from") == Some(new.as_str()))
        .await;
    assert_eq!(body_text(&echo).as_deref(), Some("still in"), "{echo}");
    // The occupants saw one rename and no leave.
    let mut seen = Vec::new();
    loop {
        let s = until(&mut b, |e| {
            e.attr("from") == Some(old.as_str()) || e.attr("from") == Some(new.as_str())
        })
        .await;
        if s.is("message", ns::CLIENT) {
            assert_eq!(body_text(&s).as_deref(), Some("still in"));
            break;
        }
        seen.push((
            s.attr("from")
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned(),
            s.attr("type").map(str::to_owned),
            status_codes(&s),
        ));
    }
    assert_eq!(
        seen,
        [
            (
                "ay".into(),
                Some("unavailable".into()),
                vec!["303".to_owned()]
            ),
            ("ay2".into(), None, vec![]),
        ],
        "one rename, nothing else"
    );
    d.stop().await;
}

both!(a_nick_change_then_a_sibling_leaving_keeps_the_room_under_the_new_nick);

async fn a_refused_join_reaches_the_asking_page_and_a_retry_gets_in(p: Prosody) {
    let d = daemon(&p).await;
    let room = "g28room@conference.localhost";
    let mut b = contact(&p, "g28b").await;
    create_room(
        &mut b,
        room,
        "bee",
        &[
            ("muc#roomconfig_passwordprotectedroom", "1"),
            ("muc#roomconfig_roomsecret", "s3cret"),
        ],
    )
    .await;
    let h = d.handoff("g28a", "pw-g28a").await;
    let mut p1 = d.page("g28a", &h.token).await;
    let mut p2 = d.page("g28a", &h.token).await;
    let me = format!("{room}/ay");
    p1.send(&muc_join(room, "ay")).await;
    let refused = p1.next_where(|e| e.attr("from") == Some(me.as_str())).await;
    assert_eq!(refused.attr("type"), Some("error"), "{refused}");
    assert!(
        refused
            .child("error", ns::CLIENT)
            .and_then(|e| e.child("not-authorized", ns::STANZAS))
            .is_some(),
        "{refused}"
    );
    // The other page did not ask and is not told.
    strict_sync(&mut p2).await;
    // Same nick, with the password: goes upstream and gets in.
    let with_password = presence().with_attr("to", me.clone()).with_child(
        Element::new("x", ns::MUC)
            .with_child(Element::new("password", ns::MUC).with_text("s3cret"))
            .with_child(Element::new("history", ns::MUC).with_attr("maxchars", "0")),
    );
    p1.send(&with_password).await;
    let joined = p1.next_where(|e| e.attr("from") == Some(me.as_str())).await;
    assert!(is_self_presence(&joined), "{joined}");
    assert_eq!(joined.attr("type"), None);
    let seen = until(&mut b, |e| e.attr("from") == Some(me.as_str())).await;
    assert_eq!(seen.attr("type"), None, "the room sees the user join");
    d.stop().await;
}

both!(a_refused_join_reaches_the_asking_page_and_a_retry_gets_in);

async fn the_only_page_in_a_room_reloading_within_grace_is_invisible_to_occupants(p: Prosody) {
    let d = Daemon::start(&p.bosh, &p.domain, |c| c.grace = Duration::from_secs(30)).await;
    let room = "g29room@conference.localhost";
    let mut b = contact(&p, "g29b").await;
    create_room(&mut b, room, "bee", &[]).await;
    let h = d.handoff("g29a", "pw-g29a").await;
    let mut page = d.page("g29a", &h.token).await;
    let me = format!("{room}/ay");
    page.send(&muc_join(room, "ay")).await;
    page.next_where(is_self_presence).await;
    until(&mut b, |e| e.attr("from") == Some(me.as_str())).await;

    page.drop_connection().await; // a reload
    eventually("the page to be gone", LIMIT, || async {
        (d.info("g29a@localhost").await["pages"] == 0).then_some(())
    })
    .await;
    let mut back = d.page("g29a", &h.token).await;
    let sent_before = d.info("g29a@localhost").await["stanzas_out"].clone();
    back.send(&muc_join(room, "ay")).await;
    // Answered from the replay: the other occupant, then our own presence.
    back.next_where(|e| e.attr("from") == Some(format!("{room}/bee").as_str()))
        .await;
    back.next_where(is_self_presence).await;
    assert_eq!(
        d.info("g29a@localhost").await["stanzas_out"],
        sent_before,
        "the join did not go upstream"
    );
    back.send(&groupchat(room, "back")).await;
    // The occupant saw nothing from us between the join and this message.
    let next = until(&mut b, |e| e.attr("from") == Some(me.as_str())).await;
    assert!(next.is("message", ns::CLIENT), "occupants saw {next}");
    assert_eq!(body_text(&next).as_deref(), Some("back"));
    d.stop().await;
}

both!(the_only_page_in_a_room_reloading_within_grace_is_invisible_to_occupants);

async fn kick_ban_and_destroy_reach_every_page_and_a_later_join_goes_upstream(p: Prosody) {
    let d = daemon(&p).await;
    let room = "g30room@conference.localhost";
    let mut b = contact(&p, "g30b").await;
    create_room(&mut b, room, "bee", &[]).await;
    let h = d.handoff("g30a", "pw-g30a").await;
    let mut p1 = d.page("g30a", &h.token).await;
    let mut p2 = d.page("g30a", &h.token).await;
    let me = format!("{room}/ay");
    let both_join = async |p1: &mut Page, p2: &mut Page, room: &str| {
        p1.send(&muc_join(room, "ay")).await;
        p1.next_where(is_self_presence).await;
        p2.send(&muc_join(room, "ay")).await;
        p2.next_where(is_self_presence).await;
    };
    let admin = |id: &str, to: &str, item: Element| {
        Element::new("iq", ns::CLIENT)
            .with_attr("type", "set")
            .with_attr("id", id)
            .with_attr("to", to)
            .with_child(Element::new("query", MUC_ADMIN).with_child(item))
    };
    let ended = |e: &Element| is_self_presence(e) && e.attr("type") == Some("unavailable");

    // Kicked (307): every page sees it.
    both_join(&mut p1, &mut p2, room).await;
    let kick = Element::new("item", MUC_ADMIN)
        .with_attr("nick", "ay")
        .with_attr("role", "none");
    assert_eq!(
        direct_iq(&mut b, admin("kick", room, kick))
            .await
            .attr("type"),
        Some("result")
    );
    for page in [&mut p1, &mut p2] {
        let e = page.next_where(ended).await;
        assert!(status_codes(&e).contains(&"307".to_owned()), "{e}");
    }
    // A later join goes upstream: the room sees us come back.
    p1.send(&muc_join(room, "ay")).await;
    p1.next_where(|e| is_self_presence(e) && e.attr("type").is_none())
        .await;
    until(&mut b, |e| {
        e.attr("from") == Some(me.as_str()) && e.attr("type").is_none()
    })
    .await;
    p2.send(&muc_join(room, "ay")).await;
    p2.next_where(is_self_presence).await;

    // Banned (301): every page sees it, and a later join is refused by the room itself.
    let ban = Element::new("item", MUC_ADMIN)
        .with_attr("jid", "g30a@localhost")
        .with_attr("affiliation", "outcast");
    assert_eq!(
        direct_iq(&mut b, admin("ban", room, ban))
            .await
            .attr("type"),
        Some("result")
    );
    for page in [&mut p1, &mut p2] {
        let e = page.next_where(ended).await;
        assert!(status_codes(&e).contains(&"301".to_owned()), "{e}");
    }
    p2.send(&muc_join(room, "ay")).await;
    let refused = p2.next_where(|e| e.attr("from") == Some(me.as_str())).await;
    assert_eq!(refused.attr("type"), Some("error"), "{refused}");

    // Destroyed: every page sees it; joining again creates a new room upstream (status 201).
    let room2 = "g30room2@conference.localhost";
    create_room(&mut b, room2, "bee", &[]).await;
    both_join(&mut p1, &mut p2, room2).await;
    let destroy = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "destroy")
        .with_attr("to", room2)
        .with_child(
            Element::new("query", MUC_OWNER).with_child(Element::new("destroy", MUC_OWNER)),
        );
    assert_eq!(
        direct_iq(&mut b, destroy).await.attr("type"),
        Some("result")
    );
    let me2 = format!("{room2}/ay");
    for page in [&mut p1, &mut p2] {
        let e = page
            .next_where(|e| {
                e.attr("from") == Some(me2.as_str()) && e.attr("type") == Some("unavailable")
            })
            .await;
        assert!(
            e.child("x", ns::MUC_USER)
                .and_then(|x| x.child("destroy", ns::MUC_USER))
                .is_some(),
            "{e}"
        );
    }
    p1.send(&muc_join(room2, "ay")).await;
    let created = p1
        .next_where(|e| e.attr("from") == Some(me2.as_str()))
        .await;
    assert!(
        status_codes(&created).contains(&"201".to_owned()),
        "a fresh room: {created}"
    );
    d.stop().await;
}

both!(kick_ban_and_destroy_reach_every_page_and_a_later_join_goes_upstream);

async fn two_pages_unavailable_and_still_open_show_the_user_offline(p: Prosody) {
    let d = daemon(&p).await;
    let h = d.handoff("g31a", "pw-g31a").await;
    let mut p1 = d.page("g31a", &h.token).await;
    let mut p2 = d.page("g31a", &h.token).await;
    p1.send(&presence()).await;
    p2.send(&presence()).await;
    let mut b = contact(&p, "g31b").await;
    let me = "g31a@localhost/boshmux";
    let online = until(&mut b, |e| {
        e.is("presence", ns::CLIENT) && e.attr("from") == Some(me)
    })
    .await;
    assert_eq!(online.attr("type"), None);
    p1.send(&presence().with_attr("type", "unavailable")).await;
    p1.sync().await;
    p2.send(&presence().with_attr("type", "unavailable")).await;
    p2.sync().await;
    p2.send(&chat("g31b@localhost", "marker")).await;
    // The contact sees the user go offline before the marker, though both pages stay open.
    let next = until(&mut b, |e| e.attr("from") == Some(me)).await;
    assert!(next.is("presence", ns::CLIENT), "contact saw {next} first");
    assert_eq!(next.attr("type"), Some("unavailable"));
    assert_eq!(d.info("g31a@localhost").await["pages"], 2);
    d.stop().await;
}

both!(two_pages_unavailable_and_still_open_show_the_user_offline);

async fn a_subscription_request_is_replayed_to_a_reloaded_page_until_answered(p: Prosody) {
    let d = Daemon::start(&p.bosh, &p.domain, |c| c.grace = Duration::from_secs(30)).await;
    let h = d.handoff("g32a", "pw-g32a").await;
    let mut page = d.page("g32a", &h.token).await;
    page.send(&presence()).await;
    page.sync().await;
    // Someone not in the roster asks to subscribe.
    let bob = contact(&p, "g31d").await;
    bob.handle
        .send(
            presence()
                .with_attr("to", "g32a@localhost")
                .with_attr("type", "subscribe"),
        )
        .await
        .unwrap();
    let asks = |e: &Element| {
        e.is("presence", ns::CLIENT)
            && e.attr("type") == Some("subscribe")
            && e.attr("from") == Some("g31d@localhost")
    };
    page.next_where(asks).await;
    let gone = async |page: Page| {
        page.drop_connection().await;
        eventually("the page to be gone", LIMIT, || async {
            (d.info("g32a@localhost").await["pages"] == 0).then_some(())
        })
        .await;
    };
    gone(page).await;
    let mut back = d.page("g32a", &h.token).await;
    back.send(&presence()).await;
    back.next_where(asks).await;
    // Answered from the reloaded page: the next reload is not asked again.
    back.send(
        &presence()
            .with_attr("to", "g31d@localhost")
            .with_attr("type", "subscribed"),
    )
    .await;
    back.sync().await;
    gone(back).await;
    let mut again = d.page("g32a", &h.token).await;
    again.send(&presence()).await;
    again.sync().await;
    assert!(
        !again
            .seen_frames()
            .iter()
            .any(|f| f.contains("type=\"subscribe\"")),
        "{:?}",
        again.seen_frames()
    );
    d.stop().await;
}

both!(a_subscription_request_is_replayed_to_a_reloaded_page_until_answered);

async fn carbons_are_made_as_the_server_makes_them_between_real_resources(p: Prosody) {
    let d = daemon(&p).await;
    let h = d.handoff("g28c", "pw-g28c").await;
    let mut p1 = d.page("g28c", &h.token).await;
    let mut p2 = d.page("g28c", &h.token).await;
    p1.send(&presence()).await;
    // A real second resource of the same account, with carbons enabled: what Prosody copies to
    // it is what the other pages must see.
    let mut real = p.contact("g28c", "real").await;
    let enable = Element::new("iq", ns::CLIENT)
        .with_attr("type", "set")
        .with_attr("id", "carbons")
        .with_child(Element::new("enable", ns::CARBONS));
    assert_eq!(
        direct_iq(&mut real, enable).await.attr("type"),
        Some("result")
    );
    // The recipient is online: to an offline account (the test servers keep no offline
    // storage) every message bounces, and the bounce, an inbound message, reaches every page
    // (SPEC §6.3) — racing the carbons this test reads at the second page.
    let _recipient = contact(&p, "g28d").await;
    let to = "g28d@localhost";
    let normal = |body: Option<&str>| {
        let m = Element::new("message", ns::CLIENT).with_attr("to", to);
        match body {
            Some(b) => m.with_child(Element::new("body", ns::CLIENT).with_text(b)),
            None => m.with_child(Element::new("x", "jabber:x:oob")),
        }
    };
    let messages = [
        chat(to, "chat"),
        chat(to, "private").with_child(Element::new("private", ns::CARBONS)),
        chat(to, "no-copy").with_child(Element::new("no-copy", "urn:xmpp:hints")),
        chat(to, "headline").with_attr("type", "headline"),
        normal(Some("normal")),
        normal(None).with_attr("id", "no-body"),
        chat(to, "end"),
    ];
    for m in &messages {
        p1.send(m).await;
    }
    let sent = |e: &Element| -> Option<String> {
        let inner = e
            .child("sent", ns::CARBONS)?
            .child("forwarded", ns::FORWARD)?
            .child("message", ns::CLIENT)?;
        Some(
            body_text(inner)
                .or_else(|| inner.attr("id").map(str::to_owned))
                .unwrap_or_default(),
        )
    };
    let mut at_page = Vec::new();
    while at_page.last().map(String::as_str) != Some("end") {
        let m = p2.next_where(|e| e.is("message", ns::CLIENT)).await;
        at_page.push(sent(&m).unwrap_or_else(|| panic!("not a carbon: {m}")));
    }
    let mut at_real = Vec::new();
    while at_real.last().map(String::as_str) != Some("end") {
        let m = until(&mut real, |e| {
            e.is("message", ns::CLIENT) && sent(e).is_some()
        })
        .await;
        at_real.push(sent(&m).unwrap());
    }
    assert_eq!(
        at_page, at_real,
        "the other pages see what a real resource sees"
    );
    assert_eq!(at_page, ["chat", "normal", "end"]);
    d.stop().await;
}

both!(carbons_are_made_as_the_server_makes_them_between_real_resources);

async fn a_server_request_takes_the_first_result_and_an_error_waits_for_the_other_pages(
    p: Prosody,
) {
    let d = daemon(&p).await;
    let h = d.handoff("g30c", "pw-g30c").await;
    let mut p1 = d.page("g30c", &h.token).await;
    let mut p2 = d.page("g30c", &h.token).await;
    let mut b = contact(&p, "g30d").await;
    let answer = |ty: &str, id: &str, name: &str| {
        Element::new("iq", ns::CLIENT)
            .with_attr("type", ty)
            .with_attr("id", id)
            .with_attr("to", "g30d@localhost/other")
            .with_attr("name", name)
    };
    let refuse = |id: &str, name: &str| {
        answer("error", id, name).with_child(
            Element::new("error", ns::CLIENT)
                .with_attr("type", "cancel")
                .with_child(Element::new("service-unavailable", ns::STANZAS))
                // Which page answered, in the error text: servers keep that (ejabberd drops
                // attributes it does not know from an iq).
                .with_child(Element::new("text", ns::STANZAS).with_text(name)),
        )
    };
    // Page 1 does not know the request and refuses; page 2 answers: the answer wins.
    b.handle
        .send(version_query("v1", "g30c@localhost/boshmux"))
        .await
        .unwrap();
    for page in [&mut p1, &mut p2] {
        page.next_where(|e| e.is("iq", ns::CLIENT) && e.attr("id") == Some("v1"))
            .await;
    }
    p1.send(&refuse("v1", "one")).await;
    p1.sync().await;
    p2.send(&answer("result", "v1", "two")).await;
    let got = until(&mut b, |e| {
        e.is("iq", ns::CLIENT) && e.attr("id") == Some("v1")
    })
    .await;
    assert_eq!(got.attr("type"), Some("result"), "{got}");

    // Both refuse: the first error is held until the second page answered, and goes once.
    b.handle
        .send(version_query("v2", "g30c@localhost/boshmux"))
        .await
        .unwrap();
    for page in [&mut p1, &mut p2] {
        page.next_where(|e| e.is("iq", ns::CLIENT) && e.attr("id") == Some("v2"))
            .await;
    }
    let answers_before = async |b: &mut BoshSession, page: &mut Page, marker: &str| {
        page.send(&chat("g30d@localhost", marker)).await;
        let mut answers = Vec::new();
        loop {
            let s = support::next_stanza(&mut b.events, LIMIT).await;
            if s.is("iq", ns::CLIENT) && s.attr("id") == Some("v2") {
                let text = s
                    .child("error", ns::CLIENT)
                    .and_then(|e| e.child("text", ns::STANZAS))
                    .map(Element::text);
                answers.push(text.unwrap_or_default());
            }
            if body_text(&s).as_deref() == Some(marker) {
                return answers;
            }
        }
    };
    p2.send(&refuse("v2", "two")).await;
    p2.sync().await;
    assert!(
        answers_before(&mut b, &mut p2, "marker 1").await.is_empty(),
        "the error waits for the other page"
    );
    p1.send(&refuse("v2", "one")).await;
    p1.sync().await;
    assert_eq!(answers_before(&mut b, &mut p1, "marker 2").await, ["two"]);
    d.stop().await;
}

both!(a_server_request_takes_the_first_result_and_an_error_waits_for_the_other_pages);
