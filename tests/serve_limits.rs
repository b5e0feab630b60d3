//! SPEC §9 limits, against the fake connection manager (no XMPP server behaviour is involved,
//! and it can push large volumes on demand): pages per user, users per daemon, slow pages,
//! handshake and dead-peer timeouts, send rate, upgrade rate.

mod support;

use std::time::Duration;

use boshmux::config::Config;
use boshmux::fake_cm::FakeCm;
use boshmux::xmpp::ns;
use support::chat;
use support::daemon::{Daemon, Page};

async fn fake() -> FakeCm {
    support::fake_with(&[("u0", "p0"), ("u1", "p1"), ("u2", "p2"), ("u3", "p3")]).await
}

async fn daemon(fake: &FakeCm, tune: impl FnOnce(&mut Config)) -> Daemon {
    Daemon::start(&fake.url(), "example.test", tune).await
}

#[tokio::test]
async fn a_page_over_the_per_user_limit_is_closed_with_4003() {
    let f = fake().await;
    let d = daemon(&f, |c| c.limits.pages_per_user = 2).await;
    let h = d.handoff("u0", "p0").await;
    let _p1 = d.page("u0", &h.token).await;
    let _p2 = d.page("u0", &h.token).await;
    let mut p3 = Page::open(&d, &[]).await.unwrap();
    p3.open_stream().await;
    assert!(
        p3.auth("PLAIN", &format!("\0u0\0{}", h.token))
            .await
            .is("success", ns::SASL)
    );
    let closed = p3.bind().await.unwrap_err();
    assert_eq!(closed.code, 4003);
    d.stop().await;
}

#[tokio::test]
async fn users_over_the_daemon_limit_are_refused() {
    let f = fake().await;
    let d = daemon(&f, |c| c.limits.users = 1).await;
    d.handoff("u0", "p0").await;
    let (status, body) = d
        .api(
            reqwest::Method::POST,
            "/api/v1/sessions",
            Some(serde_json::json!({"jid": "u1@example.test", "password": "p1"})),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    d.stop().await;
}

#[tokio::test]
async fn a_page_that_does_not_read_is_closed_with_4002_and_the_others_never_wait() {
    let f = fake().await;
    let d = daemon(&f, |c| c.limits.page_queue_bytes = 1024 * 1024).await;
    let h = d.handoff("u0", "p0").await;
    let mut reader = d.page("u0", &h.token).await;
    let mut stalled = d.page("u0", &h.token).await; // never reads until the end
    let chunk = "y".repeat(16 * 1024);
    // Far more than the stalled page's socket buffers and queue can hold.
    let total = 1200;
    for i in 0..total {
        let msg = chat("u0@example.test", &chunk)
            .with_attr("id", i.to_string())
            .with_attr("from", "x@example.test/y");
        assert_eq!(f.push("u0@example.test", msg), 1);
        if i % 20 == 19 {
            // Keep the fake's bodies moderate: wait until the reader has this batch.
            reader
                .next_where(|e| e.attr("id") == Some(&i.to_string()))
                .await;
        }
    }
    let closed = stalled.closed().await;
    assert_eq!(closed.code, 4002);
    assert_eq!(d.info("u0@example.test").await["slow_pages"], 1);
    assert_eq!(d.info("u0@example.test").await["pages"], 1);
    d.stop().await;
}

#[tokio::test]
async fn a_silent_upgrade_is_closed_after_the_handshake_timeout() {
    let f = fake().await;
    let d = daemon(&f, |c| {
        c.limits.handshake_timeout = Duration::from_millis(300)
    })
    .await;
    let mut page = Page::open(&d, &[]).await.unwrap();
    let closed = page.closed().await;
    assert_eq!(closed.code, 1008);
    assert!(
        closed.frames[0].contains("connection-timeout"),
        "{closed:?}"
    );
    d.stop().await;
}

#[tokio::test]
async fn a_page_that_stops_answering_pings_is_closed() {
    let f = fake().await;
    let d = daemon(&f, |c| {
        c.limits.ws_ping_interval = Duration::from_millis(100);
        c.limits.ws_dead_peer_timeout = Duration::from_millis(400);
    })
    .await;
    let h = d.handoff("u0", "p0").await;
    // A raw socket that writes nothing more is what a dead peer looks like: no pong goes back,
    // and no late pong can reset the connection before the close frame is read.
    let mut tcp = d.page("u0", &h.token).await.into_tcp();
    support::eventually(
        "the daemon to drop the silent page",
        Duration::from_secs(10),
        || async { (d.info("u0@example.test").await["pages"] == 0).then_some(()) },
    )
    .await;
    assert_eq!(support::daemon::read_close_code(&mut tcp).await, Some(1001));
    d.stop().await;
}

#[tokio::test]
async fn a_page_sending_too_fast_gets_resource_constraint_errors() {
    let f = fake().await;
    let d = daemon(&f, |c| c.limits.page_send_rate = 5).await;
    let h = d.handoff("u0", "p0").await;
    let mut page = d.page("u0", &h.token).await;
    for i in 0..30 {
        page.send(&chat("u1@example.test", "spam").with_attr("id", format!("s{i}")))
            .await;
    }
    let err = page.next_where(|e| e.attr("type") == Some("error")).await;
    assert!(
        err.child("error", ns::CLIENT)
            .unwrap()
            .child("resource-constraint", ns::STANZAS)
            .is_some(),
        "{err}"
    );
    d.stop().await;
}

#[tokio::test]
async fn upgrades_beyond_the_rate_are_refused_with_429() {
    let f = fake().await;
    let d = daemon(&f, |c| c.limits.upgrade_rate = 2).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(Page::open(&d, &[]).await.err());
    }
    assert!(statuses.contains(&Some(429)), "{statuses:?}");
    assert!(statuses.contains(&None), "{statuses:?}");
    d.stop().await;
}

#[tokio::test]
async fn the_subprotocol_is_required() {
    let f = fake().await;
    let d = daemon(&f, |_| {}).await;
    let refused = Page::open_url(&d.ws_url(), "example.test", &[], false).await;
    assert_eq!(refused.err(), Some(400));
    let mut wrong_domain = Page::open(&d, &[]).await.unwrap();
    wrong_domain
        .send_raw(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='other.example' version='1.0'/>",
        )
        .await;
    let closed = wrong_domain.closed().await;
    assert!(closed.frames[0].contains("host-unknown"), "{closed:?}");
    d.stop().await;
}
