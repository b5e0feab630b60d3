//! The BOSH client's suspend and resume (from the session store) against the real ejabberd that
//! `scripts/test` starts, where its rid rules bite (RECOVERY.md): a resent held request echoes
//! its own stanzas, a resent rid older than the two-reply cache is never answered, and a held rid
//! resent on a new connection must come back with the same rid. These tests fail when ejabberd
//! is not running.

mod support;

use std::time::Duration;

use boshmux::bosh::{BoshClient, BoshEvent, BoshSession, SessionMeta, body};
use boshmux::store::{SessionRecord, Store};
use boshmux::xmpp::Jid;
use support::{Server, body_text, chat, eventually, go_online, next_message, one_by_one};

const LIMIT: Duration = Duration::from_secs(15);

async fn logged_in(
    p: &Server,
    user: &str,
    resource: &str,
    store: &Store,
) -> (BoshClient, BoshSession) {
    let (jid, pw) = p.user(user);
    let client = BoshClient::new(p.bosh_config()).unwrap();
    let s = client
        .login(&jid, &pw, Some(resource), store)
        .await
        .unwrap();
    let mut s = one_by_one(s);
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

/// Suspends `s` as a restart does, drains its last events and returns its record as the store
/// has it then.
async fn suspend(mut s: BoshSession, store: &Store) -> SessionRecord {
    assert!(s.handle.suspend().await.unwrap().is_empty());
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(200), s.events.recv()).await
    {
        if matches!(ev, BoshEvent::Ended(_)) {
            break;
        }
    }
    store.load().await.unwrap().sessions.remove(0)
}

/// A new owner takes the session of `record` over.
async fn resume(client: &BoshClient, store: &Store, record: &SessionRecord) -> BoshSession {
    let taken = store.take_over(record).await.unwrap();
    one_by_one(client.resume(record, taken).unwrap())
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
    let store = Store::memory();
    let (client, a) = logged_in(&p, "g32c", "tab", &store).await;
    let mut c = p.contact("g32d", "held").await;
    a.handle
        .send(chat(&c.jid.to_string(), "mine"))
        .await
        .unwrap();
    let got = next_message(&mut c.events, LIMIT).await;
    assert_eq!(body_text(&got).as_deref(), Some("mine"));
    // The request that carried "mine" is now the one ejabberd holds.
    only_held(&a).await;
    let (jid, record) = (a.jid.clone(), suspend(a, &store).await);
    assert_eq!(record.requests.len(), 1, "{record:?}");

    let mut a = resume(&client, &store, &record).await;
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
    let store = Store::memory();
    let (client, a) = logged_in(&p, "g31c", "tab", &store).await;
    let mut c = p.contact("g32d", "cut").await;
    let jid: Jid = a.jid.clone();

    // The held request's connection is cut from our side (suspend aborts it) and the same rid
    // is resent on a new connection.
    only_held(&a).await;
    let record = suspend(a, &store).await;
    let held: Vec<u64> = record.requests.iter().map(|(r, _)| *r).collect();
    assert_eq!(
        held,
        [record.handed_on + 1],
        "the held rid is resent, not a new one"
    );
    let mut a = resume(&client, &store, &record).await;
    both_ways(&mut a, &mut c, "after the cut").await;
    assert_eq!(p.sessions_of(&jid.to_bare()), [jid.to_string()]);

    // A record that still lists a rid older than ejabberd's two-reply cache (as when the marks
    // of later rids could not be written): resending it would never be answered and would wedge
    // the session.
    only_held(&a).await;
    let mut record = suspend(a, &store).await;
    let held = record.requests[0].0;
    let old = held - 2;
    let sid = SessionMeta::decode(&record.meta).unwrap().params.sid;
    record
        .requests
        .insert(0, (old, body::request_bytes(old, &sid, "")));
    record.handed_on = old - 1;
    let mut a = resume(&client, &store, &record).await;
    both_ways(&mut a, &mut c, "after the stale resume").await;
    both_ways(&mut a, &mut c, "and again").await;
    assert_eq!(p.sessions_of(&jid.to_bare()), [jid.to_string()]);
    a.handle.terminate(vec![]).await.unwrap();
    c.handle.terminate(vec![]).await.unwrap();
}
