//! Proof that the page protocol is real RFC 7395: an unmodified third-party XMPP library from npm
//! (@xmpp/client, run by node; see tests/node) logs in through `/ws` with a token as its password
//! and exchanges messages with another account on the real Prosody.

mod support;

use std::process::Stdio;
use std::time::Duration;

use boshmux::bosh::BoshClient;
use support::daemon::Daemon;
use support::{Server, body_text, both, chat, go_online, next_message};

const LIMIT: Duration = Duration::from_secs(30);

both!(xmpp_js_logs_in_with_a_token_and_exchanges_messages);
async fn xmpp_js_logs_in_with_a_token_and_exchanges_messages(p: Server) {
    let d = Daemon::start(&p.bosh, &p.domain, |_| {}).await;
    let h = d.handoff("g22a", "pw-g22a").await;
    let (b_jid, b_pw) = p.user("g22b");
    let mut b = support::login(
        &BoshClient::new(p.bosh_config()).unwrap(),
        &b_jid,
        &b_pw,
        Some("peer"),
    )
    .await
    .unwrap();
    go_online(&mut b, LIMIT).await;

    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/@xmpp/client")
            .exists(),
        "tests/node/node_modules is missing: scripts/test runs `npm ci` there"
    );
    let child = tokio::process::Command::new("node")
        .arg("third_party_client.mjs")
        .current_dir(dir)
        .env("XMPP_WS_URL", d.ws_url())
        .env("XMPP_DOMAIN", &p.domain)
        .env("XMPP_USER", "g22a")
        .env("XMPP_PASSWORD", &h.token)
        .env("XMPP_PEER", "g22b@localhost")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");

    let hello = next_message(&mut b.events, LIMIT).await;
    assert_eq!(body_text(&hello).as_deref(), Some("hello from xmpp.js"));
    assert_eq!(hello.attr("from"), Some("g22a@localhost/boshmux"));
    b.handle
        .send(chat("g22a@localhost/boshmux", "hello back"))
        .await
        .unwrap();

    let out = tokio::time::timeout(LIMIT, child.wait_with_output())
        .await
        .expect("node finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "node failed: {stdout}\n{stderr}");
    assert!(stdout.contains("online g22a@localhost/boshmux"), "{stdout}");
    assert!(
        stdout.contains("received hello back from g22b@localhost/peer"),
        "{stdout}"
    );
    d.stop().await;
}
