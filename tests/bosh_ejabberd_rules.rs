//! The BOSH client against ejabberd's rid rules (see the fake's `ejabberd_rids` mode, which
//! reproduces ejabberd 23.01): a session resumed from its store record never resends anything
//! older than the server's two-reply cache, and takes ejabberd's echo of a resent held request as
//! empty. In intercept
//! mode, where the test is the server: a deferred "+2" rid is never posted twice, and no rid ever
//! runs 2 or more ahead of the oldest unanswered one.

mod support;

use std::time::Duration;

use std::collections::BTreeSet;

use boshmux::bosh::{BoshClient, BoshConfig, BoshEvent, BoshSession, Timeouts, body};
use boshmux::fake_cm::{Action, FakeCm, FakeCmConfig, Intercepted};
use boshmux::store::{SessionRecord, Store};
use boshmux::xmpp::Jid;
use support::{body_text, chat, eventually, next_event, next_message, one_by_one};
use tokio::sync::mpsc::UnboundedReceiver;

const LIMIT: Duration = Duration::from_secs(10);

async fn ejabberd_like() -> FakeCm {
    FakeCm::start(FakeCmConfig {
        users: [("alice".to_owned(), "pa".to_owned())].into(),
        ejabberd_rids: true,
        max_wait: 2,
        ..FakeCmConfig::default()
    })
    .await
    .unwrap()
}

fn client(fake: &FakeCm) -> BoshClient {
    let mut cfg = BoshConfig::new(fake.url());
    cfg.timeouts = Timeouts {
        margin: Duration::from_secs(1),
        ..Timeouts::tight()
    };
    cfg.wait = 2;
    BoshClient::new(cfg).unwrap()
}

/// Alice logged in with her record in `store`, every response handed on as it comes.
async fn alice(c: &BoshClient, store: &Store) -> BoshSession {
    let s = c
        .login(
            &Jid::parse("alice@example.test").unwrap(),
            "pa",
            Some("tab"),
            store,
        )
        .await
        .unwrap();
    one_by_one(s)
}

/// Suspends `s` and returns its record as the store has it then.
async fn suspend(mut s: BoshSession, store: &Store) -> SessionRecord {
    assert!(s.handle.suspend().await.unwrap().is_empty());
    drain(&mut s).await;
    store.load().await.unwrap().sessions.remove(0)
}

/// A new owner takes the session of `record` over from `store`.
async fn resume(c: &BoshClient, store: &Store, record: &SessionRecord) -> BoshSession {
    let taken = store.take_over(record).await.unwrap();
    one_by_one(c.resume(record, taken).unwrap())
}

/// Alice logged in, online, and then suspended (her held empty request stays at the server).
async fn suspended_alice(fake: &FakeCm, store: &Store) -> SessionRecord {
    let s = alice(&client(fake), store).await;
    eventually("a request held at the server", LIMIT, || async {
        (s.handle.stats().await.unwrap().in_flight == 1).then_some(())
    })
    .await;
    suspend(s, store).await
}

async fn drain(s: &mut BoshSession) {
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(50), s.events.recv()).await
    {
        if matches!(ev, BoshEvent::Ended(_)) {
            break;
        }
    }
}

/// The session still works: a stanza pushed by the server arrives, and one sent reaches it.
async fn still_works(fake: &FakeCm, s: &mut BoshSession, text: &str) {
    let pushed = chat("alice@example.test/tab", text).with_attr("from", "bob@example.test/x");
    assert_eq!(fake.push("alice@example.test/tab", pushed), 1);
    assert_eq!(
        body_text(&next_message(&mut s.events, LIMIT).await).as_deref(),
        Some(text)
    );
    s.handle.send(chat("bob@example.test", text)).await.unwrap();
    eventually("the sent stanza at the server", LIMIT, || async {
        fake.received("alice@example.test/tab")
            .iter()
            .any(|e| body_text(e).as_deref() == Some(text))
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_resent_held_request_echoed_by_the_server_is_taken_as_empty() {
    let fake = ejabberd_like().await;
    let c = client(&fake);
    let store = Store::memory();
    let s = alice(&c, &store).await;
    s.handle
        .send(chat("bob@example.test", "mine"))
        .await
        .unwrap();
    // Processed and then held with nothing to answer: the server has it.
    eventually("the message at the server", LIMIT, || async {
        (!fake.received("alice@example.test/tab").is_empty()).then_some(())
    })
    .await;
    eventually("only the held request left", LIMIT, || async {
        (s.handle.stats().await.unwrap().in_flight == 1).then_some(())
    })
    .await;
    let record = suspend(s, &store).await;
    assert_eq!(record.requests.len(), 1, "the held request: {record:?}");

    let mut s = resume(&c, &store, &record).await;
    // A new request releases the resent one with nothing new: the server echoes "mine".
    s.handle
        .send(chat("bob@example.test", "next"))
        .await
        .unwrap();
    let pushed = chat("alice@example.test/tab", "theirs").with_attr("from", "bob@example.test/x");
    eventually("the next request at the server", LIMIT, || async {
        fake.received("alice@example.test/tab")
            .iter()
            .any(|e| body_text(e).as_deref() == Some("next"))
            .then_some(())
    })
    .await;
    fake.push("alice@example.test/tab", pushed);
    let got = next_message(&mut s.events, LIMIT).await;
    assert_eq!(body_text(&got).as_deref(), Some("theirs"), "got {got}");
}

#[tokio::test]
async fn a_resend_older_than_the_servers_cache_is_never_sent() {
    let fake = ejabberd_like().await;
    let store = Store::memory();
    let mut record = suspended_alice(&fake, &store).await;
    let held = record.requests[0].0;
    // As if the marks of two more rids had not been written since an old one the record still
    // lists (a store that failed for a while).
    let old = held - 2;
    let meta = boshmux::bosh::SessionMeta::decode(&record.meta).unwrap();
    record
        .requests
        .insert(0, (old, body::request_bytes(old, &meta.params.sid, "")));
    record.handed_on = old - 1;
    let before = fake.records().len();
    let mut s = resume(&client(&fake), &store, &record).await;
    still_works(&fake, &mut s, "after resume").await;
    let resent: Vec<u64> = fake.records()[before..]
        .iter()
        .filter_map(|r| r.rid)
        .collect();
    assert!(!resent.contains(&old), "resent {resent:?}");
}

const FIRST_RID: u64 = 1000;

/// A fake in intercept mode (the test answers every request) and a session attached to it at
/// rid [`FIRST_RID`], with `wait` 2 s.
async fn attached() -> (FakeCm, UnboundedReceiver<Intercepted>, BoshSession) {
    let fake = FakeCm::start(FakeCmConfig::default()).await.unwrap();
    let requests = fake.intercept();
    let mut cfg = BoshConfig::new(fake.url());
    cfg.timeouts = Timeouts {
        attach_wait: Duration::from_secs(2),
        ..Timeouts::tight()
    };
    let jid = Jid::parse("alice@example.test/tab").unwrap();
    let session = BoshClient::new(cfg)
        .unwrap()
        .attach(jid, "sid-1".into(), FIRST_RID, &Store::none())
        .await;
    (fake, requests, one_by_one(session))
}

async fn next_request(rx: &mut UnboundedReceiver<Intercepted>) -> Intercepted {
    tokio::time::timeout(LIMIT, rx.recv())
        .await
        .expect("timed out waiting for a request at the fake")
        .expect("fake stopped")
}

/// Waits for the session's `Retrying` event for `rid` (other events before it are skipped).
async fn retrying(s: &mut BoshSession, want: u64) {
    loop {
        match next_event(&mut s.events, LIMIT).await {
            BoshEvent::Retrying { rid, .. } if rid == want => return,
            BoshEvent::Ended(r) => panic!("session ended: {r:?}"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_deferred_rid_is_not_posted_again_when_the_older_one_is_resent() {
    let (fake, mut rx, mut s) = attached().await;
    let held = next_request(&mut rx).await;
    assert_eq!(held.rid, FIRST_RID);
    s.handle
        .send(chat("bob@example.test", "one"))
        .await
        .unwrap();
    let ahead = next_request(&mut rx).await;
    assert_eq!(ahead.rid, FIRST_RID + 1);

    // The held request's connection breaks while the younger one is still at the server
    // (deferred there, as ejabberd does with a "+2" rid).
    held.answer(Action::Drop);
    retrying(&mut s, FIRST_RID).await;
    let resent = next_request(&mut rx).await;
    assert_eq!(resent.rid, FIRST_RID, "the broken request is resent first");
    resent.respond(vec![]);
    ahead.respond(vec![chat("alice@example.test/tab", "two")]);
    assert_eq!(
        body_text(&next_message(&mut s.events, LIMIT).await).as_deref(),
        Some("two")
    );
    // The session goes on with a new rid; the deferred one went out exactly once.
    let next = next_request(&mut rx).await;
    assert_eq!(next.rid, FIRST_RID + 2);
    let posted: Vec<u64> = fake.records().iter().filter_map(|r| r.rid).collect();
    assert_eq!(
        posted.iter().filter(|r| **r == FIRST_RID + 1).count(),
        1,
        "posted {posted:?}"
    );
}

/// Paused time: the retry backoff (tens of ms) and the held request's timeout (`wait` + margin)
/// pass in order, so a resend that does not wait would arrive first.
#[tokio::test(start_paused = true)]
async fn a_failed_younger_request_is_resent_only_after_the_older_one_is_answered() {
    let (_fake, mut rx, mut s) = attached().await;
    let held = next_request(&mut rx).await;
    assert_eq!(held.rid, FIRST_RID);
    s.handle
        .send(chat("bob@example.test", "one"))
        .await
        .unwrap();
    let ahead = next_request(&mut rx).await;
    assert_eq!(ahead.rid, FIRST_RID + 1);
    let ahead_raw = ahead.raw.clone();
    ahead.answer(Action::Drop);
    retrying(&mut s, FIRST_RID + 1).await;

    // Nothing may come until the older request is answered or fails: its own resend (after its
    // timeout) is the next request the server sees, not a second copy of the younger one.
    let next = next_request(&mut rx).await;
    assert_eq!(
        next.rid, FIRST_RID,
        "a copy of a possibly deferred rid was sent"
    );
    drop(held);
    next.respond(vec![]);
    let again = next_request(&mut rx).await;
    assert_eq!(again.rid, FIRST_RID + 1);
    assert_eq!(again.raw, ahead_raw, "a resend is byte-identical");
    again.respond(vec![chat("alice@example.test/tab", "two")]);
    assert_eq!(
        body_text(&next_message(&mut s.events, LIMIT).await).as_deref(),
        Some("two")
    );
}

#[tokio::test]
async fn no_rid_runs_two_ahead_of_the_oldest_unanswered_one_while_requests_fail() {
    let (_fake, mut rx, mut s) = attached().await;
    // What the server has answered; the test plays the server and checks every rid it gets.
    let mut answered: BTreeSet<u64> = BTreeSet::new();
    let mut max_ahead = 0;
    let mut check = |rid: u64, answered: &BTreeSet<u64>| {
        let oldest = (FIRST_RID..).find(|r| !answered.contains(r)).unwrap();
        max_ahead = max_ahead.max(rid.saturating_sub(oldest));
        rid.saturating_sub(oldest)
    };
    let held = next_request(&mut rx).await;
    check(held.rid, &answered);
    s.handle.send(chat("bob@example.test", "m0")).await.unwrap();
    let ahead = next_request(&mut rx).await;
    assert!(check(ahead.rid, &answered) < 2);
    // Both requests are out: these wait in the queue.
    for i in 1..5 {
        s.handle
            .send(chat("bob@example.test", &format!("m{i}")))
            .await
            .unwrap();
    }
    assert_eq!(s.handle.stats().await.unwrap().queued, 4);
    // Both requests fail, the younger first; the stanzas still queued must wait.
    ahead.answer(Action::Drop);
    retrying(&mut s, FIRST_RID + 1).await;
    held.answer(Action::Drop);
    let mut sent = Vec::new();
    let mut pending: Vec<Intercepted> = Vec::new();
    // Serve until every queued stanza has arrived: answer the oldest open request each time,
    // failing each rid's first resend once more.
    let mut failed_again = BTreeSet::new();
    while sent.len() < 5 {
        let req = next_request(&mut rx).await;
        assert!(
            check(req.rid, &answered) < 2,
            "rid {} with {answered:?} answered",
            req.rid
        );
        pending.push(req);
        pending.sort_by_key(|r| r.rid);
        let oldest = pending.remove(0);
        if failed_again.insert(oldest.rid) {
            oldest.answer(Action::Drop);
            continue;
        }
        sent.extend(oldest.stanzas().iter().filter_map(body_text));
        answered.insert(oldest.rid);
        oldest.respond(vec![]);
        // A duplicate of an answered request is answered at once (as from the cache).
        pending.retain(|r| !answered.contains(&r.rid));
    }
    sent.dedup();
    assert_eq!(sent, ["m0", "m1", "m2", "m3", "m4"]);
    assert!(max_ahead < 2, "a rid ran {max_ahead} ahead");
}
