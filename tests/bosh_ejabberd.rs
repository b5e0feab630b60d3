//! The BOSH client's suspend and resume against the real ejabberd that `scripts/test` starts,
//! where its rid rules bite (RECOVERY.md): a resent held request echoes its own stanzas, a
//! resent rid older than the two-reply cache is never answered, and a held rid resent on a new
//! connection must come back with the same rid. These tests fail when ejabberd is not running.

mod support;

use std::time::Duration;

use boshmux::bosh::{BoshClient, BoshEvent, BoshSession, body};
use boshmux::xmpp::Jid;
use support::{Server, body_text, chat, eventually, go_online, next_message};

const LIMIT: Duration = Duration::from_secs(15);

async fn logged_in(p: &Server, user: &str, resource: &str) -> (BoshClient, BoshSession) {
    let (jid, pw) = p.user(user);
    let client = BoshClient::new(p.bosh_config()).unwrap();
    let mut s = client.login(&jid, &pw, Some(resource)).await.unwrap();
    go_online(&mut s, LIMIT).await;
    (client, s)
}

/// Waits until only the held request is in flight: everything sent was answered or is held.
async fn only_held(s: &BoshSession) {
    eventually("one request held at the server", LIMIT, || async {
        (s.handle.stats().await.unwrap().in_flight == 1).then_some(())
    })
    .await;
}

/// Suspends `s` as a restart does and drains its last events.
async fn suspend(mut s: BoshSession) -> boshmux::bosh::Suspended {
    let suspended = s.handle.suspend().await.unwrap();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), s.events.recv()).await
    {
        if matches!(ev, BoshEvent::Ended(_)) {
            break;
        }
    }
    suspended
}

/// Messages go both ways between `a` and the contact `c`.
async fn both_ways(a: &mut BoshSession, c: &mut BoshSession, text: &str) {
    c.handle
        .send(chat(&a.jid.to_string(), &format!("to a: {text}")))
        .await
        .unwrap();
    let got = next_message(&mut a.events, LIMIT).await;
    assert_eq!(body_text(&got), Some(format!("to a: {text}")), "got {got}");
    a.handle
        .send(chat(&c.jid.to_string(), &format!("to c: {text}")))
        .await
        .unwrap();
    let got = next_message(&mut c.events, LIMIT).await;
    assert_eq!(body_text(&got), Some(format!("to c: {text}")), "got {got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_with_a_stanza_in_the_held_request_neither_echoes_nor_repeats_it() {
    let p = support::ejabberd();
    let (client, a) = logged_in(&p, "g32c", "tab").await;
    let mut c = p.contact("g32d", "held").await;
    a.handle
        .send(chat(&c.jid.to_string(), "mine"))
        .await
        .unwrap();
    let got = next_message(&mut c.events, LIMIT).await;
    assert_eq!(body_text(&got).as_deref(), Some("mine"));
    // The request that carried "mine" is now the one ejabberd holds.
    only_held(&a).await;
    let (jid, suspended) = (a.jid.clone(), suspend(a).await);
    assert_eq!(suspended.unanswered.len(), 1, "{suspended:?}");

    let mut a = client.resume(jid.clone(), suspended);
    // A new request releases the resent held one with nothing new: ejabberd echoes "mine".
    a.handle
        .send(chat(&c.jid.to_string(), "next"))
        .await
        .unwrap();
    let got = next_message(&mut c.events, LIMIT).await;
    assert_eq!(
        body_text(&got).as_deref(),
        Some("next"),
        "the contact got {got} (\"mine\" twice?)"
    );
    c.handle
        .send(chat(&jid.to_string(), "theirs"))
        .await
        .unwrap();
    let got = next_message(&mut a.events, LIMIT).await;
    assert_eq!(
        body_text(&got).as_deref(),
        Some("theirs"),
        "the page got {got} back as if incoming"
    );
    assert_eq!(p.sessions_of(&jid.to_bare()), [jid.to_string()]);
    a.handle.terminate(vec![]).await.unwrap();
    c.handle.terminate(vec![]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_held_request_and_a_resume_past_the_cache_keep_the_session() {
    let p = support::ejabberd();
    let (client, a) = logged_in(&p, "g31c", "tab").await;
    let mut c = p.contact("g32d", "cut").await;
    let jid: Jid = a.jid.clone();

    // The held request's connection is cut from our side (suspend aborts it) and the same rid
    // is resent on a new connection.
    only_held(&a).await;
    let suspended = suspend(a).await;
    let held: Vec<u64> = suspended.unanswered.iter().map(|(r, _)| *r).collect();
    assert_eq!(held.len(), 1, "{suspended:?}");
    let next_rid = suspended.next_rid;
    assert_eq!(
        held[0] + 1,
        next_rid,
        "the held rid is resent, not a new one"
    );
    let mut a = client.resume(jid.clone(), suspended);
    both_ways(&mut a, &mut c, "after the cut").await;
    assert_eq!(p.sessions_of(&jid.to_bare()), [jid.to_string()]);

    // Saved state that still lists a rid older than ejabberd's two-reply cache (as after more
    // requests than the cache holds): resending it would never be answered and would wedge the
    // session.
    only_held(&a).await;
    let mut suspended = suspend(a).await;
    let held = suspended.unanswered[0].0;
    let old = held - 2;
    suspended.unanswered.insert(
        0,
        (old, body::request_bytes(old, &suspended.params.sid, "")),
    );
    let mut a = client.resume(jid.clone(), suspended);
    both_ways(&mut a, &mut c, "after the stale resume").await;
    both_ways(&mut a, &mut c, "and again").await;
    assert_eq!(p.sessions_of(&jid.to_bare()), [jid.to_string()]);
    a.handle.terminate(vec![]).await.unwrap();
    c.handle.terminate(vec![]).await.unwrap();
}
