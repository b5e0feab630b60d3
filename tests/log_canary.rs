//! What logs may contain (SPEC §9): a session run with canary values — password, token, ticket,
//! sid, message bodies — none of which may appear in the logs at the default level, nor the
//! secrets in any frame sent to a page. Alone in its test binary: tracing's per-callsite interest
//! is process-wide, so tests running beside it without a subscriber could hide log lines.

mod support;

use std::io::Write;
use std::sync::Arc;

use boshmux::fake_cm::FakeCm;
use parking_lot::Mutex;
use support::chat;
use support::daemon::Daemon;

const PASSWORD: &str = "pw-CANARY-7d1e4";
const SENT_BODY: &str = "body-CANARY-91ab";
const RECEIVED_BODY: &str = "inbound-CANARY-55c0";

async fn fake() -> FakeCm {
    support::fake_with(&[("alice", PASSWORD), ("bob", "pw-bob")]).await
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
