//! SPEC §9 operations: `/healthz`, `/metrics`, `/status`, and a stop that closes every page in
//! bounded time. Against the fake connection manager. (What logs may contain: tests/log_canary.rs.)

mod support;

use std::time::Duration;

use boshmux::fake_cm::FakeCm;
use boshmux::xmpp::ns;
use support::chat;
use support::daemon::{API_KEY, Daemon};

const PASSWORD: &str = "pw-CANARY-7d1e4";

async fn fake() -> FakeCm {
    support::fake_with(&[("alice", PASSWORD), ("bob", "pw-bob")]).await
}

#[tokio::test]
async fn health_metrics_and_status() {
    let f = fake().await;
    let d = Daemon::start(&f.url(), "example.test", |_| {}).await;
    let http = reqwest::Client::new();
    let health = http.get(d.url("/healthz")).send().await.unwrap();
    assert_eq!(
        (health.status().as_u16(), health.text().await.unwrap()),
        (200, "ok\n".to_owned())
    );

    let h = d.handoff("alice", PASSWORD).await;
    let mut p1 = d.page("alice", &h.token).await;
    let mut p2 = d.page("alice", &h.token).await;
    for i in 0..5 {
        f.push(
            "alice@example.test",
            chat("alice@example.test", &format!("m{i}")),
        );
    }
    for page in [&mut p1, &mut p2] {
        for _ in 0..5 {
            page.next_message().await;
        }
    }
    p1.send(&chat("bob@example.test", "out")).await;
    p1.sync().await;
    let text = http
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("boshmux_sessions"), 1.0);
    assert_eq!(value("boshmux_pages"), 2.0);
    assert!(value("boshmux_upstream_requests_total") >= 3.0);
    assert!(value("boshmux_stanzas_in_total") >= 5.0);
    assert!(value("boshmux_stanzas_out_total") >= 2.0);
    assert!(value("boshmux_frames_to_pages_total") >= 10.0);
    assert!(value("boshmux_fanout_seconds_count") >= 10.0);
    assert!(value("boshmux_upstream_request_seconds_count") >= 1.0);
    assert!(text.contains("# TYPE boshmux_fanout_seconds histogram"));

    let no_key = http.get(d.url("/status")).send().await.unwrap();
    assert_eq!(no_key.status().as_u16(), 401);
    assert!(
        no_key.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let page = http
        .get(d.url("/status"))
        .basic_auth("ops", Some(API_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("alice@example.test/boshmux"), "{html}");
    assert!(
        html.contains("<span class=\"pill ok\">live</span>"),
        "{html}"
    );
    assert!(html.contains("<b>2</b> pages"), "{html}");
    d.stop().await;
}

#[tokio::test]
async fn a_stop_without_a_store_closes_every_page_with_4004_and_ends_the_upstream_sessions() {
    let f = fake().await;
    let d = Daemon::start(&f.url(), "example.test", |_| {}).await;
    let h = d.handoff("alice", PASSWORD).await;
    let mut pages = Vec::new();
    for _ in 0..3 {
        pages.push(d.page("alice", &h.token).await);
    }
    let stop = tokio::spawn(d.stop());
    for page in &mut pages {
        let closed = page.closed().await;
        assert_eq!(
            closed.code, 4004,
            "nothing survives: pages must not reconnect"
        );
        assert!(
            closed.frames.iter().any(|f| f.contains(ns::FRAMING)),
            "{closed:?}"
        );
    }
    tokio::time::timeout(Duration::from_secs(20), stop)
        .await
        .expect("stop is bounded")
        .unwrap();
    let terminated = f.records().iter().any(|r| {
        std::str::from_utf8(&r.raw)
            .unwrap()
            .contains("type=\"terminate\"")
    });
    assert!(terminated, "the upstream session was terminated");
}

#[tokio::test]
async fn a_login_in_progress_neither_delays_a_stop_nor_keeps_other_sessions_out_of_the_store() {
    let f = fake().await;
    let store = boshmux::store::Store::memory();
    let d = Daemon::start_with_store(&f.url(), "example.test", &store, |_| {}).await;
    d.handoff("alice", PASSWORD).await;
    // From now on the upstream answers nothing: bob's login hangs.
    let _requests = f.intercept();
    let api = d.url("/api/v1/sessions");
    let pending = tokio::spawn(async move {
        reqwest::Client::new()
            .post(api)
            .bearer_auth(support::daemon::API_KEY)
            .header("content-type", "application/json")
            .body(r#"{"jid":"bob@example.test","password":"pw-bob"}"#)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    support::eventually("bob's session to exist", Duration::from_secs(5), || async {
        let (status, list) = d.api(reqwest::Method::GET, "/api/v1/sessions", None).await;
        (status == 200 && list.as_array().is_some_and(|l| l.len() == 2)).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    d.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the stop took {:?}",
        started.elapsed()
    );
    assert_eq!(
        pending.await.unwrap().unwrap(),
        503,
        "the hand-off is told the daemon is stopping"
    );
    let stored: Vec<String> = store
        .load()
        .await
        .unwrap()
        .sessions
        .iter()
        .map(|r| r.bare.clone())
        .collect();
    assert_eq!(
        stored,
        ["alice@example.test"],
        "alice kept, bob never logged in"
    );
}

#[tokio::test]
async fn a_damaged_stored_session_is_dropped_at_start_and_the_others_are_taken_over() {
    let f = fake().await;
    let store = boshmux::store::Store::memory();
    let d = Daemon::start_with_store(&f.url(), "example.test", &store, |_| {}).await;
    let h = d.handoff("alice", PASSWORD).await;
    d.stop().await;
    // A record whose description of the session cannot be read.
    store
        .create(
            "bob@example.test",
            bytes::Bytes::from_static(b"not json"),
            0,
        )
        .await
        .unwrap();

    let d = Daemon::start_with_store(&f.url(), "example.test", &store, |_| {}).await;
    support::eventually(
        "the damaged record to be dropped",
        Duration::from_secs(5),
        || async {
            let stored: Vec<String> = store
                .load()
                .await
                .unwrap()
                .sessions
                .into_iter()
                .map(|r| r.bare)
                .collect();
            (stored == ["alice@example.test"]).then_some(())
        },
    )
    .await;
    let (status, _) = d
        .api(
            reqwest::Method::GET,
            "/api/v1/sessions/bob@example.test",
            None,
        )
        .await;
    assert_eq!(status, 404);
    let page = d.page("alice", &h.token).await;
    assert_eq!(page.jid, "alice@example.test/boshmux");
    d.stop().await;
}
