//! SPEC §8 against the real servers: a daemon stopped with a store and started again keeps
//! every session — the same upstream session (no re-login, contacts see no offline/online flap),
//! pages back with their cookie on the same JID, and what arrived meanwhile delivered once.

mod support;

use std::time::Duration;

use boshmux::store::Store;
use boshmux::xmpp::{Element, ns};
use support::daemon::{Daemon, Page};
use support::{Server, body_text, both, chat, eventually};

const LIMIT: Duration = Duration::from_secs(15);

/// Everything the store holds, as text, to look for what must never be in it.
async fn stored_text(store: &Store) -> String {
    let snap = store.load().await.unwrap();
    let mut text = format!("{:?}", snap.credentials);
    for r in &snap.sessions {
        text.push_str(&String::from_utf8_lossy(&r.meta));
        text.push_str(&String::from_utf8_lossy(&r.caches));
        for (_, req) in &r.requests {
            text.push_str(&String::from_utf8_lossy(req));
        }
    }
    text
}

both!(a_restart_keeps_the_upstream_session_and_delivers_what_arrived_meanwhile_once);
async fn a_restart_keeps_the_upstream_session_and_delivers_what_arrived_meanwhile_once(p: Server) {
    let store = Store::memory();
    let first = Daemon::start_with_store(&p.bosh, &p.domain, &store, |_| {}).await;
    let h = first.handoff("g25a", "pw-g25a").await;
    let mut p1 = first.page("g25a", &h.token).await;
    let mut p2 = first.page("g25a", &h.token).await;
    p1.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g25b", "b").await;
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.is("presence", ns::CLIENT) && s.attr("from") == Some("g25a@localhost/boshmux") {
            break;
        }
    }

    first.stop().await;
    assert_eq!(p1.closed().await.code, 1012);
    assert_eq!(p2.closed().await.code, 1012);
    let saved = stored_text(&store).await;
    assert!(
        saved.contains("g25a@localhost/boshmux"),
        "the session is stored: {saved}"
    );
    assert!(!saved.contains("pw-g25a"), "no password in the store");
    assert!(
        !saved.contains(&h.token),
        "no token in the store, only its hash"
    );
    let (a_jid, _) = p.user("g25a");
    assert_eq!(
        p.sessions_of(&a_jid),
        ["g25a@localhost/boshmux"],
        "still alive upstream while down"
    );

    b.handle
        .send(chat("g25a@localhost", "while you were away"))
        .await
        .unwrap();

    let second = Daemon::start_with_store(&p.bosh, &p.domain, &store, |_| {}).await;
    let mut p1 = second.page("g25a", &h.token).await; // the same cookie/token works
    assert_eq!(p1.jid, "g25a@localhost/boshmux");
    assert_eq!(
        body_text(&p1.next_message().await).as_deref(),
        Some("while you were away")
    );
    let mut p2 = second.page("g25a", &h.token).await;
    p1.send(&chat("g25b@localhost", "back")).await;
    // The contact saw nothing of the restart: the next thing from a is this message.
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("from") == Some("g25a@localhost/boshmux") {
            assert!(s.is("message", ns::CLIENT), "contact saw {s}");
            assert_eq!(body_text(&s).as_deref(), Some("back"));
            break;
        }
    }
    // Delivered once: the second page only gets what comes next.
    b.handle.send(chat("g25a@localhost", "next")).await.unwrap();
    assert_eq!(body_text(&p2.next_message().await).as_deref(), Some("next"));
    assert_eq!(p.sessions_of(&a_jid), ["g25a@localhost/boshmux"]);
    let metrics = reqwest::get(second.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("\nboshmux_logins_total 0\n"),
        "no login after the restart:\n{metrics}"
    );
    assert_eq!(second.info("g25a@localhost").await["relogins"], 0);
    drop(p1);
    drop(p2);
    second.stop().await;
}

both!(a_session_lost_upstream_while_down_is_dropped_cleanly);
async fn a_session_lost_upstream_while_down_is_dropped_cleanly(p: Server) {
    let store = Store::memory();
    let first = Daemon::start_with_store(&p.bosh, &p.domain, &store, |_| {}).await;
    let h = first.handoff("g26a", "pw-g26a").await;
    let mut page = first.page("g26a", &h.token).await;
    first.stop().await;
    assert_eq!(page.closed().await.code, 1012);
    // As if the server's inactivity window had passed: the session is gone upstream.
    p.kill_session("g26a@localhost/boshmux");

    let second = Daemon::start_with_store(&p.bosh, &p.domain, &store, |_| {}).await;
    eventually("the dead session to be dropped", LIMIT, || async {
        let (status, _) = second
            .api(
                reqwest::Method::GET,
                "/api/v1/sessions/g26a@localhost",
                None,
            )
            .await;
        (status == 404).then_some(())
    })
    .await;
    let mut again = Page::open(&second, &[]).await.unwrap();
    let err = again.login_plain("g26a", &h.token).await.unwrap_err();
    assert!(err.contains("not-authorized"), "{err}");
    // A new hand-off logs in afresh.
    let fresh = second.handoff("g26a", "pw-g26a").await;
    assert_eq!(fresh.status, 201);
    second.page("g26a", &fresh.token).await;
    second.stop().await;
}

both!(a_message_in_the_held_request_at_a_restart_is_not_echoed_back_to_the_page);
/// A page's message still in the request the server holds when the daemon stops: after the
/// restart that request is resent, and when the next request releases it with nothing new,
/// ejabberd answers it with the request's own stanzas. The page must not see its own message
/// come back as if a contact had sent it.
async fn a_message_in_the_held_request_at_a_restart_is_not_echoed_back_to_the_page(p: Server) {
    let store = Store::memory();
    let first = Daemon::start_with_store(&p.bosh, &p.domain, &store, |_| {}).await;
    let h = first.handoff("g32a", "pw-g32a").await;
    let mut page = first.page("g32a", &h.token).await;
    page.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g32b", "b").await;
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.is("presence", ns::CLIENT) && s.attr("from") == Some("g32a@localhost/boshmux") {
            break;
        }
    }
    page.send(&chat("g32b@localhost", "sent just before the stop"))
        .await;
    // Once b has it, the request that carried it is held by the server with nothing to answer.
    assert_eq!(
        body_text(&support::next_message(&mut b.events, LIMIT).await).as_deref(),
        Some("sent just before the stop")
    );
    first.stop().await;
    assert_eq!(page.closed().await.code, 1012);

    let second = Daemon::start_with_store(&p.bosh, &p.domain, &store, |_| {}).await;
    let mut page = second.page("g32a", &h.token).await;
    // A new request makes the server release the resent one, with nothing new in it.
    page.send(&chat("g32b@localhost", "sent after the restart"))
        .await;
    assert_eq!(
        body_text(&support::next_message(&mut b.events, LIMIT).await).as_deref(),
        Some("sent after the restart")
    );
    b.handle
        .send(chat("g32a@localhost", "reply after the restart"))
        .await
        .unwrap();
    let got = page.next_message().await;
    assert_eq!(
        body_text(&got).as_deref(),
        Some("reply after the restart"),
        "the page got {got}"
    );
    assert_eq!(got.attr("from"), Some("g32b@localhost/b"));
    drop(page);
    second.stop().await;
}
