//! SPEC §9 operations: `/healthz`, `/metrics`, `/status`, what logs may contain, and a stop that
//! closes every page with 1012 in bounded time. Against the fake connection manager.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use boshmux::fake_cm::{FakeCm, FakeCmConfig};
use boshmux::xmpp::ns;
use parking_lot::Mutex;
use support::chat;
use support::daemon::{API_KEY, Daemon};

const PASSWORD: &str = "pw-CANARY-7d1e4";
const SENT_BODY: &str = "body-CANARY-91ab";
const RECEIVED_BODY: &str = "inbound-CANARY-55c0";

async fn fake() -> FakeCm {
    let users: HashMap<String, String> = [
        ("alice".to_owned(), PASSWORD.to_owned()),
        ("bob".to_owned(), "pw-bob".to_owned()),
    ]
    .into();
    FakeCm::start(FakeCmConfig {
        users,
        ..FakeCmConfig::default()
    })
    .await
    .unwrap()
}

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything runs on this test's one thread, so the thread's default subscriber sees every log
/// line of the daemon, the session actors and the BOSH client.
#[tokio::test(flavor = "current_thread")]
async fn no_secret_or_message_reaches_the_logs_at_the_default_level_nor_a_page() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = fake().await;
    let d = Daemon::start(&f.url(), "example.test", |_| {}).await;
    let h = d.handoff("alice", PASSWORD).await;
    let mut page = d.page("alice", &h.token).await;
    page.send(&chat("bob@example.test", SENT_BODY)).await;
    page.sync().await;
    let from = chat("alice@example.test", RECEIVED_BODY).with_attr("from", "bob@example.test/x");
    assert_eq!(f.push("alice@example.test", from), 1);
    let got = page.next_message().await;
    assert_eq!(support::body_text(&got).as_deref(), Some(RECEIVED_BODY));
    let sid = f
        .records()
        .iter()
        .find_map(|r| r.sid.clone())
        .expect("a request with a sid");
    // Something went wrong upstream too, so the error paths log as well.
    d.api(
        reqwest::Method::POST,
        "/api/v1/sessions",
        Some(serde_json::json!({"jid": "bob@example.test", "password": "wrong"})),
    )
    .await;
    let frames = page.seen_frames().join("\n");
    page.close().await;
    d.stop().await;

    let text = String::from_utf8(logs.0.lock().clone()).unwrap();
    assert!(
        text.contains("session established"),
        "logs were captured: {text}"
    );
    for (what, canary) in [
        ("password", PASSWORD),
        ("token", h.token.as_str()),
        ("ticket", h.ticket.as_str()),
        ("sid", sid.as_str()),
        ("sent message", SENT_BODY),
        ("received message", RECEIVED_BODY),
    ] {
        assert!(
            !text.contains(canary),
            "the {what} appears in the logs:\n{text}"
        );
    }
    for (what, canary) in [
        ("password", PASSWORD),
        ("token", h.token.as_str()),
        ("sid", sid.as_str()),
    ] {
        assert!(
            !frames.contains(canary),
            "the {what} was sent to a page:\n{frames}"
        );
    }
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
async fn a_stop_closes_every_page_with_1012_and_ends_the_upstream_sessions() {
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
        assert_eq!(closed.code, 1012);
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
