//! The BOSH client against ejabberd's rid rules (see the fake's `ejabberd_rids` mode, which
//! reproduces ejabberd 23.01): a resumed session never resends anything older than the server's
//! two-reply cache, and takes ejabberd's echo of a resent held request as empty.

mod support;

use std::time::Duration;

use boshmux::bosh::{BoshClient, BoshConfig, BoshEvent, BoshSession, Suspended, Timeouts, body};
use boshmux::fake_cm::{FakeCm, FakeCmConfig};
use boshmux::xmpp::Jid;
use support::{body_text, chat, eventually, next_message};

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

/// Alice logged in, online, and then suspended (her held empty request stays at the server).
async fn suspended_alice(fake: &FakeCm) -> (Jid, Suspended) {
    let mut s = client(fake)
        .login(
            &Jid::parse("alice@example.test").unwrap(),
            "pa",
            Some("tab"),
        )
        .await
        .unwrap();
    eventually("a request held at the server", LIMIT, || async {
        (s.handle.stats().await.unwrap().in_flight == 1).then_some(())
    })
    .await;
    let jid = s.jid.clone();
    let suspended = s.handle.suspend().await.unwrap();
    drain(&mut s).await;
    (jid, suspended)
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
    let s = c
        .login(
            &Jid::parse("alice@example.test").unwrap(),
            "pa",
            Some("tab"),
        )
        .await
        .unwrap();
    s.handle
        .send(chat("bob@example.test", "mine"))
        .await
        .unwrap();
    // Processed and then held with nothing to answer: the server has it.
    eventually("the message at the server", LIMIT, || async {
        (!fake.received("alice@example.test/tab").is_empty()).then_some(())
    })
    .await;
    let jid = s.jid.clone();
    let suspended = s.handle.suspend().await.unwrap();
    assert_eq!(suspended.unanswered.len(), 1, "the held request");

    let mut s = c.resume(jid, suspended);
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
    let (jid, mut suspended) = suspended_alice(&fake).await;
    let held = suspended.unanswered[0].0;
    // As if two more rids had been answered since an old one the saved state still lists.
    let old = held - 2;
    suspended.unanswered.insert(
        0,
        (old, body::request_bytes(old, &suspended.params.sid, "")),
    );
    let before = fake.records().len();
    let mut s = client(&fake).resume(jid, suspended);
    still_works(&fake, &mut s, "after resume").await;
    let resent: Vec<u64> = fake.records()[before..]
        .iter()
        .filter_map(|r| r.rid)
        .collect();
    assert!(!resent.contains(&old), "resent {resent:?}");
}
