//! A BOSH page's session creation names the service in any spelling of its domain (SPEC §3a,
//! §4b): `to` is prepared as a JID, as the WebSocket `<open to>` is, so the two transports accept
//! and refuse the same addresses. Against the fake connection manager.

mod support;

use boshmux::fake_cm::{FakeCm, FakeCmConfig};
use support::bosh_page::{Answer, post, terminate_condition};
use support::daemon::Daemon;

/// The service's domain, as the test servers' (`localhost`), in the canonical spelling.
const DOMAIN: &str = "localhost";

async fn daemon() -> (FakeCm, Daemon) {
    let f = FakeCm::start(FakeCmConfig {
        domain: DOMAIN.into(),
        ..FakeCmConfig::default()
    })
    .await
    .unwrap();
    let d = Daemon::start(&f.url(), DOMAIN, |_| {}).await;
    (f, d)
}

/// POSTs a session creation request to `to`.
async fn create(d: &Daemon, to: &str) -> Answer {
    let rid = 1000 + u64::from(rand::random::<u16>());
    post(
        &d.url("/http-bind"),
        None,
        &format!(
            "<body xmlns='http://jabber.org/protocol/httpbind' xmlns:xmpp='urn:xmpp:xbosh' \
             content='text/xml; charset=utf-8' hold='1' rid='{rid}' to='{to}' ver='1.6' \
             wait='10' xml:lang='en' xmpp:version='1.0'/>"
        ),
    )
    .await
}

#[tokio::test]
async fn any_spelling_of_the_domain_creates_a_bosh_page() {
    let (_f, d) = daemon().await;
    // Case, one trailing dot, full-width letters (NFKC): all prepare to `localhost`.
    for to in [
        "localhost",
        "LocalHost",
        "localhost.",
        "LOCALHOST.",
        "\u{ff4c}ocal\u{ff28}ost",
    ] {
        let a = create(&d, to).await;
        assert_eq!(a.status, 200, "{to:?}: {}", a.text);
        let body = a.body();
        assert_eq!(terminate_condition(&body), None, "{to:?}: {}", a.text);
        assert!(body.attr("sid").is_some(), "{to:?}: no sid: {}", a.text);
        assert_eq!(body.attr("from"), Some(DOMAIN), "{to:?}: {}", a.text);
    }
    d.stop().await;
}

#[tokio::test]
async fn another_domain_or_a_jid_that_is_not_the_domain_is_host_unknown() {
    let (_f, d) = daemon().await;
    for to in [
        "example.test",
        "localhost.localdomain",
        "localhost..",
        "u0@localhost",
        "localhost/res",
        "local host",
        "",
    ] {
        let a = create(&d, to).await;
        assert_eq!(a.status, 200, "{to:?}: {}", a.text);
        assert_eq!(
            terminate_condition(&a.body()).as_deref(),
            Some("host-unknown"),
            "{to:?}: {}",
            a.text
        );
    }
    // The refusals cost nothing: the right domain still gets a page.
    let ok = create(&d, DOMAIN).await;
    assert!(ok.body().attr("sid").is_some(), "{}", ok.text);
    d.stop().await;
}
