//! SPEC §8 and §12 (first step: one node on Redis): the daemon as a real process with
//! `store = "redis://…"` against the real Prosody and ejabberd, `kill -9`, then a new process on
//! the same Redis. Checked from outside: the server's view (the same single session), the pages'
//! (the same JID, the token from before the crash, the message sent meanwhile once), the new
//! process's counters (no login) and Redis's keys (the session was there, not in a directory).
//!
//! Uses Redis database 2 (Prosody) and 3 (ejabberd) of the test Redis (scripts/redis.sh), each
//! emptied first: no other test uses them, and the two runs (same JIDs) must not share keys.
//! Accounts: group g76.

mod support;

use std::time::Duration;

use boshmux::xmpp::{Element, ns};
use support::process::{DaemonProcess, sees_available, store_dir};
use support::{Kind, Server, body_text, both, chat};

const LIMIT: Duration = Duration::from_secs(20);

/// The test Redis's database `db`. Panics when the run was not started by scripts/test.
fn redis_url(db: u8) -> String {
    let url = std::env::var("BOSHMUX_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("BOSHMUX_TEST_REDIS_URL is not set: tests that need Redis run through scripts/test")
    });
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    format!("{base}/{db}")
}

both!(a_kill_9_on_redis_costs_no_login_and_no_message);
async fn a_kill_9_on_redis_costs_no_login_and_no_message(p: Server) {
    let url = redis_url(match p.kind {
        Kind::Prosody => 2,
        Kind::Ejabberd => 3,
    });
    let mut redis = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut redis).await.unwrap();

    let (a, _) = p.user("g76a");
    let a_full = format!("{a}/boshmux");
    let (b_jid, _) = p.user("g76b");
    let mut d = DaemonProcess::start(&p, &store_dir("redis"), &[("BOSHMUX_STORE", &url)]).await;
    let h = d.daemon.handoff("g76a", "pw-g76a").await;
    let mut page = d.daemon.page("g76a", &h.token).await;
    page.send(&Element::new("presence", ns::CLIENT)).await;
    let mut b = p.contact("g76b", "b").await;
    sees_available(&mut b, &a_full).await;
    assert_eq!(p.sessions_of(&a), std::slice::from_ref(&a_full));
    assert!(
        !d.store().exists(),
        "no embedded store directory: the store is Redis"
    );

    d.kill9().await;
    drop(page);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("boshmux:*")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        keys.contains(&format!("boshmux:session:{a}")),
        "the session is in Redis: {keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.starts_with("boshmux:cred:token:")),
        "its token hash too: {keys:?}"
    );
    b.handle
        .send(chat(&a.to_string(), "while you were down"))
        .await
        .unwrap();

    d.restart().await;
    let mut page = d.daemon.page("g76a", &h.token).await; // the token from before the crash
    assert_eq!(page.jid, a_full, "back on the same JID");
    loop {
        let m = page.next_message().await;
        if body_text(&m).as_deref() == Some("while you were down") {
            break;
        }
    }
    b.handle
        .send(chat(&a.to_string(), "after the restart"))
        .await
        .unwrap();
    assert_eq!(
        body_text(&page.next_message().await).as_deref(),
        Some("after the restart"),
        "nothing delivered twice"
    );
    page.send(&chat(&b_jid.to_string(), "back")).await;
    loop {
        let s = support::next_stanza(&mut b.events, LIMIT).await;
        if s.attr("from") == Some(a_full.as_str()) {
            assert!(s.is("message", ns::CLIENT), "the contact saw {s}");
            assert_eq!(body_text(&s).as_deref(), Some("back"));
            break;
        }
    }
    assert_eq!(
        p.sessions_of(&a),
        std::slice::from_ref(&a_full),
        "the same single session upstream"
    );
    assert_eq!(
        d.counter("boshmux_logins_total").await,
        0,
        "no login after the crash"
    );
}
